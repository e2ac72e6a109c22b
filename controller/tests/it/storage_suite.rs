//! openraft's storage conformance suite against the sled store.

use controller::storage::{self, LogStore, StateMachineStore};
use controller::types::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().unwrap();
        let (log, sm) = storage::open(dir.path()).unwrap();
        Ok((dir, log, sm))
    }
}

#[test]
fn the_sled_store_passes_the_openraft_storage_suite() {
    // Its fsyncs would slow the timed cluster tests down: take turns.
    let _serial = crate::harness::CLUSTER_LOCK.blocking_lock();
    Suite::test_all(SledBuilder).unwrap();
}

mod codec {
    use controller::chain::{LedgerEntry, GENESIS_HASH};
    use controller::state::{decode_ledger_entry, encode_ledger_entry, Request};
    use controller::types::codec::{decode_append, decode_entry, encode_append, encode_entry};
    use controller::types::{Entry, LogId, TypeConfig, Vote};
    use openraft::raft::AppendEntriesRequest;
    use openraft::{CommittedLeaderId, EntryPayload, Membership};

    use crate::common::*;

    fn log_id(term: u64, node: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, node), index)
    }

    fn entries() -> Vec<Entry> {
        let membership = Membership::new(vec![[1u64, 2, 3].into_iter().collect()], None);
        vec![
            Entry { log_id: log_id(1, 1, 1), payload: EntryPayload::Blank },
            Entry { log_id: log_id(1, 1, 2), payload: EntryPayload::Membership(membership) },
            Entry { log_id: log_id(2, 3, 3), payload: EntryPayload::Normal(register("g01", &gate_key(1))) },
            Entry {
                log_id: log_id(2, 3, 4),
                payload: EntryPayload::Normal(batch("g01", &gate_key(1), 1..=5)),
            },
            Entry {
                log_id: log_id(2, 3, 5),
                payload: EntryPayload::Normal(Request::PutPackagePiece {
                    upload: 77,
                    index: 2,
                    at: afc_domain::model::Timestamp(1_800_000_000_000),
                    bytes: (0..5000u32).map(|i| i as u8).collect(),
                }),
            },
            Entry { log_id: log_id(2, 3, 6), payload: EntryPayload::Normal(group_of_two()) },
            // The same with a covered range (the covering kinds); the group mixes both.
            Entry {
                log_id: log_id(2, 3, 7),
                payload: EntryPayload::Normal(covering(batch("g01", &gate_key(1), 9..=9))),
            },
            Entry {
                log_id: log_id(2, 3, 8),
                payload: EntryPayload::Normal(match group_of_two() {
                    Request::AppendTxBatches { mut batches } => {
                        batches[0].covers_from = Some(6);
                        Request::AppendTxBatches { batches }
                    }
                    other => other,
                }),
            },
        ]
    }

    fn covering(req: Request) -> Request {
        match req {
            Request::AppendTxBatch { station, gate, records, signature, .. } => {
                Request::AppendTxBatch { station, gate, records, signature, covers_from: Some(9) }
            }
            other => other,
        }
    }

    /// Two gates' batches in one entry (group commit).
    fn group_of_two() -> Request {
        let one = |gate: &str, key: u8, seqs| match batch(gate, &gate_key(key), seqs) {
            Request::AppendTxBatch { station, gate, records, signature, covers_from } => {
                controller::state::TxBatchIn { station, gate, records, signature, covers_from }
            }
            other => panic!("{other:?}"),
        };
        Request::AppendTxBatches { batches: vec![one("g01", 1, 6..=8), one("g02", 2, 1..=2)] }
    }

    #[test]
    fn every_kind_of_log_entry_round_trips_through_the_binary_encoding() {
        for e in entries() {
            assert_eq!(decode_entry(&encode_entry(&e).unwrap()).unwrap(), e);
        }
    }

    #[test]
    fn a_batch_entry_carries_the_records_bytes_as_received() {
        let Request::AppendTxBatch { records, .. } = batch("g01", &gate_key(1), 1..=3) else {
            unreachable!()
        };
        let entry = Entry {
            log_id: log_id(2, 3, 4),
            payload: EntryPayload::Normal(batch("g01", &gate_key(1), 1..=3)),
        };
        let bytes = encode_entry(&entry).unwrap();
        for r in &records {
            let framed = [&(r.bytes().len() as u32).to_le_bytes()[..], r.bytes()].concat();
            assert!(
                bytes.windows(framed.len()).any(|w| w == framed),
                "record {} framed as received",
                r.gate_seq
            );
        }
        let EntryPayload::Normal(Request::AppendTxBatch { records: back, .. }) =
            decode_entry(&bytes).unwrap().payload
        else {
            unreachable!()
        };
        assert_eq!(
            back.iter().map(|r| r.bytes()).collect::<Vec<_>>(),
            records.iter().map(|r| r.bytes()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_log_entry_stored_as_json_by_an_older_version_still_decodes() {
        for e in entries() {
            assert_eq!(decode_entry(&serde_json::to_vec(&e).unwrap()).unwrap(), e);
        }
    }

    #[test]
    fn a_truncated_or_extended_log_entry_is_refused() {
        let bytes = encode_entry(&entries()[3]).unwrap();
        for cut in [1, 10, 25, bytes.len() - 1] {
            assert!(decode_entry(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_entry(&longer).is_err());
    }

    #[test]
    fn an_append_request_round_trips_through_the_binary_body() {
        let rpc = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(2, 3),
            prev_log_id: Some(log_id(1, 1, 1)),
            leader_commit: Some(log_id(1, 1, 2)),
            entries: entries(),
        };
        let back = decode_append(&encode_append(&rpc).unwrap()).unwrap();
        assert_eq!(back.vote, rpc.vote);
        assert_eq!(back.prev_log_id, rpc.prev_log_id);
        assert_eq!(back.leader_commit, rpc.leader_commit);
        assert_eq!(back.entries, rpc.entries);
    }

    #[test]
    fn a_stored_ledger_entry_round_trips_and_json_from_an_older_store_still_reads() {
        let Request::AppendTxBatch { records, .. } = batch("g01", &gate_key(1), 7..=7) else {
            unreachable!()
        };
        let entry = LedgerEntry::new(9, &GENESIS_HASH, records[0].record().clone());
        assert_eq!(decode_ledger_entry(9, &encode_ledger_entry(&entry)).unwrap(), entry);
        assert_eq!(decode_ledger_entry(9, &serde_json::to_vec(&entry).unwrap()).unwrap(), entry);
        assert!(decode_ledger_entry(9, b"\x01short").is_err());
    }
}
