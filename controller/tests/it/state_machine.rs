//! The pure state machine: ledger appends, dedup, hash chain, rejections, cursor, prune.

use std::collections::BTreeMap;

use afc_domain::ledger::{CanonicalRecord, Installation, TxRecord};
use afc_domain::mode::ModeBits;
use afc_domain::model::{ParamKind, StationCode, Timestamp};
use controller::chain::{chain_hash, LedgerEntry, GENESIS_HASH};
use controller::state::{
    decode_ledger_entry, keys, KeyConflict, LedgerRead, ReadError, Rejection, Request, Response, SequenceGap,
    StationState, Write,
};

use crate::common::*;

/// An in-memory item store standing in for sled.
#[derive(Default)]
struct Items(BTreeMap<Vec<u8>, Vec<u8>>);

impl LedgerRead for Items {
    fn ledger_entry(&self, index: u64) -> Result<Option<LedgerEntry>, ReadError> {
        Ok(self.0.get(keys::ledger(index).as_slice()).map(|v| decode_ledger_entry(index, v).unwrap()))
    }

    fn tx_index(&self, key: &[u8]) -> Result<Option<u64>, ReadError> {
        Ok(self.0.get(key).map(|v| u64::from_be_bytes(v.as_slice().try_into().unwrap())))
    }

    fn package_piece(&self, upload: u64, index: u32) -> Result<Option<Vec<u8>>, ReadError> {
        Ok(self.0.get(keys::piece(upload, index).as_slice()).cloned())
    }
}

impl Items {
    fn apply(&mut self, st: &mut StationState, req: &Request) -> Response {
        let mut out = Vec::new();
        let resp = st.apply(req, self, &mut out).unwrap();
        for w in out {
            match w {
                Write::Put(k, v) => {
                    self.0.insert(k, v);
                }
                Write::Delete(k) => {
                    self.0.remove(&k);
                }
            }
        }
        resp
    }

    fn ledger(&self) -> Vec<LedgerEntry> {
        self.0
            .iter()
            .filter(|(k, _)| k[0] == keys::LEDGER_PREFIX)
            .map(|(k, v)| decode_ledger_entry(u64::from_be_bytes(k[1..9].try_into().unwrap()), v).unwrap())
            .collect()
    }
}

fn setup() -> (StationState, Items) {
    let mut st = StationState::default();
    let mut items = Items::default();
    items.apply(&mut st, &register("g01", &gate_key(1)));
    (st, items)
}

#[test]
fn a_signed_batch_is_appended_with_contiguous_indexes_and_a_hash_chain() {
    let (mut st, mut items) = setup();
    let r = items.apply(&mut st, &batch("g01", &gate_key(1), 1..=3));
    assert_eq!(
        r,
        Response::Appended {
            appended: 3,
            duplicates: 0,
            deferred: 0,
            gaps: 0,
            conflicts: 0,
            first_index: Some(1),
            last_index: Some(3),
            through_seq: 3
        }
    );
    let ledger = items.ledger();
    assert_eq!(ledger.iter().map(|e| e.index).collect::<Vec<_>>(), vec![1, 2, 3]);
    let mut prev = GENESIS_HASH;
    for e in &ledger {
        assert_eq!(e.hash, chain_hash(&prev, &e.record));
        prev = e.hash;
    }
    assert_eq!(st.last_hash, prev);
}

#[test]
fn a_group_of_batches_applies_exactly_as_the_batches_one_by_one() {
    let (mut st, mut items) = setup();
    items.apply(&mut st, &register("g02", &gate_key(2)));
    let (mut st1, mut items1) = (st.clone(), Items(items.0.clone()));
    let parts = [
        batch("g01", &gate_key(1), 1..=3),
        batch("g02", &gate_key(2), 1..=2),
        batch("g01", &gate_key(9), 4..=4),
    ];
    let one_by_one: Vec<Response> = parts.iter().map(|b| items1.apply(&mut st1, b)).collect();
    let batches = parts
        .iter()
        .map(|b| match b.clone() {
            Request::AppendTxBatch { station, gate, records, signature, covers_from } => {
                controller::state::TxBatchIn { station, gate, records, signature, covers_from }
            }
            other => panic!("{other:?}"),
        })
        .collect();
    let r = items.apply(&mut st, &Request::AppendTxBatches { batches });
    assert_eq!(r, Response::AppendedMany { results: one_by_one.clone() });
    // The forged third batch is refused on its own; the others are appended.
    assert!(matches!(one_by_one[2], Response::Rejected { .. }), "{one_by_one:?}");
    assert_eq!(items.ledger(), items1.ledger());
    assert_eq!(st.last_hash, st1.last_hash);
    assert_eq!(items.ledger().len(), 5);
}

/// Gate `g01`'s batch of `seqs` covering from 1 as it goes on the wire: `raw` (the canonical bytes,
/// what gates send) or `records` (JSON, what gates of earlier versions send).
fn wire_batch(seqs: std::ops::RangeInclusive<u64>, raw: bool) -> afc_domain::wire::TxBatch {
    let records: Vec<CanonicalRecord> = seqs.map(|s| CanonicalRecord::from(record("s1", "g01", s))).collect();
    let sig =
        controller::chain::sign_canonical_batch(&ident("s1"), &ident("g01"), Some(1), &records, &gate_key(1));
    let batch = afc_domain::wire::TxBatch {
        station: ident("s1"),
        gate: ident("g01"),
        records: (!raw).then(|| records.iter().map(|r| r.record().clone()).collect()),
        raw: raw.then(|| afc_domain::wire::TxBatch::raw_of(&records)),
        signature: hex::encode(sig),
        installation: None,
        covers_from: Some(1),
    };
    // Through the JSON, as a gate sends it and the leader reads it.
    afc_domain::wire::decode(&afc_domain::wire::encode(&batch)).unwrap()
}

fn request(batch: afc_domain::wire::TxBatch) -> Result<Request, afc_domain::wire::TxBatchError> {
    controller::state::TxBatchIn::try_from(batch).map(Request::from)
}

#[test]
fn a_raw_batch_and_a_records_batch_of_the_same_records_append_the_same_ledger() {
    let (mut st_raw, mut items_raw) = setup();
    let (mut st_json, mut items_json) = setup();
    let r_raw = items_raw.apply(&mut st_raw, &request(wire_batch(1..=4, true)).unwrap());
    let r_json = items_json.apply(&mut st_json, &request(wire_batch(1..=4, false)).unwrap());
    assert!(matches!(r_raw, Response::Appended { appended: 4, through_seq: 4, .. }), "{r_raw:?}");
    assert_eq!(r_raw, r_json);
    assert_eq!(items_raw.ledger(), items_json.ledger(), "same entries, same hashes");
    assert_eq!(items_raw.0, items_json.0, "the same stored bytes");
    assert_eq!(st_raw.last_hash, st_json.last_hash);
    // A gate upgraded midway: its old batch re-sent as raw is a duplicate, not a conflict.
    let r = items_json.apply(&mut st_json, &request(wire_batch(1..=5, true)).unwrap());
    assert!(matches!(r, Response::Appended { appended: 1, duplicates: 4, conflicts: 0, .. }), "{r:?}");
}

#[test]
fn a_batch_with_both_forms_or_neither_never_reaches_the_ledger() {
    use afc_domain::wire::TxBatchError;
    let mut both = wire_batch(1..=2, true);
    both.records = wire_batch(1..=2, false).records;
    assert_eq!(request(both).unwrap_err(), TxBatchError::BothForms);
    let mut neither = wire_batch(1..=2, true);
    neither.raw = None;
    assert_eq!(request(neither).unwrap_err(), TxBatchError::NoRecords);
}

#[test]
fn a_raw_record_whose_bytes_are_not_canonical_is_refused() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut batch = wire_batch(1..=2, true);
    let raw = batch.raw.as_mut().unwrap();
    let mut bytes = b64.decode(&raw[1]).unwrap();
    bytes.push(0);
    raw[1] = b64.encode(&bytes);
    assert!(matches!(
        request(batch).unwrap_err(),
        afc_domain::wire::TxBatchError::NotCanonical {
            position: 1,
            error: afc_domain::ledger::LedgerError::TrailingBytes(1)
        }
    ));
}

#[test]
fn a_resent_batch_is_not_counted_twice() {
    let (mut st, mut items) = setup();
    items.apply(&mut st, &batch("g01", &gate_key(1), 1..=3));
    let r = items.apply(&mut st, &batch("g01", &gate_key(1), 2..=5));
    assert_eq!(
        r,
        Response::Appended {
            appended: 2,
            duplicates: 2,
            deferred: 0,
            gaps: 0,
            conflicts: 0,
            first_index: Some(4),
            last_index: Some(5),
            through_seq: 5
        }
    );
    let r = items.apply(&mut st, &batch("g01", &gate_key(1), 1..=5));
    assert!(matches!(r, Response::Appended { appended: 0, duplicates: 5, first_index: None, .. }));
    assert_eq!(items.ledger().len(), 5);
}

#[test]
fn out_of_order_seqs_hold_the_high_water_mark_until_the_gap_fills() {
    let (mut st, mut items) = setup();
    let r = items.apply(&mut st, &batch("g01", &gate_key(1), [1, 2, 5]));
    assert!(matches!(r, Response::Appended { appended: 3, through_seq: 2, .. }));
    let r = items.apply(&mut st, &batch("g01", &gate_key(1), [3, 4]));
    assert!(matches!(r, Response::Appended { appended: 2, through_seq: 5, .. }));
}

#[test]
fn a_forged_batch_is_a_no_op_with_a_reason() {
    let (mut st, mut items) = setup();
    let before = st.clone();
    let r = items.apply(&mut st, &batch("g01", &gate_key(9), 1..=3));
    assert_eq!(r, Response::Rejected { rejection: Rejection::BadSignature });
    let Request::AppendTxBatch { station, gate, records, signature, .. } = batch("g01", &gate_key(1), 1..=2)
    else {
        unreachable!()
    };
    let mut records: Vec<TxRecord> = records.into_iter().map(CanonicalRecord::into_record).collect();
    records[1].fare_fen = 1; // tampered after signing
    let records = records.into_iter().map(CanonicalRecord::from).collect();
    let r = items
        .apply(&mut st, &Request::AppendTxBatch { station, gate, records, signature, covers_from: None });
    assert_eq!(r, Response::Rejected { rejection: Rejection::BadSignature });
    let r = items.apply(&mut st, &batch("g02", &gate_key(2), 1..=1));
    assert_eq!(r, Response::Rejected { rejection: Rejection::UnknownGate { gate: ident("g02") } });
    assert_eq!(st, before);
    assert!(items.ledger().is_empty());
}

#[test]
fn a_record_from_another_gate_in_a_batch_rejects_the_whole_batch() {
    let (mut st, mut items) = setup();
    let Request::AppendTxBatch { station, gate, records, .. } = batch("g01", &gate_key(1), 1..=2) else {
        unreachable!()
    };
    let mut records: Vec<TxRecord> = records.into_iter().map(CanonicalRecord::into_record).collect();
    records[0].gate = ident("g07");
    let sig = controller::chain::sign_batch(&station, &gate, &records, &gate_key(1));
    let records = records.into_iter().map(CanonicalRecord::from).collect();
    let req =
        Request::AppendTxBatch { station, gate, records, signature: hex::encode(sig), covers_from: None };
    assert!(matches!(
        items.apply(&mut st, &req),
        Response::Rejected { rejection: Rejection::RecordMismatch { gate_seq: 1, .. } }
    ));
}

#[test]
fn package_versions_must_increase_per_kind() {
    let (mut st, mut items) = setup();
    let put = |kind, version| Request::PutPackage { kind, version, package: vec![version as u8; 10] };
    assert!(matches!(items.apply(&mut st, &put(ParamKind::Blacklist, 2)), Response::PackageStored { .. }));
    assert!(matches!(items.apply(&mut st, &put(ParamKind::FareTable, 1)), Response::PackageStored { .. }));
    assert_eq!(
        items.apply(&mut st, &put(ParamKind::Blacklist, 2)),
        Response::Rejected {
            rejection: Rejection::StaleVersion { kind: ParamKind::Blacklist, version: 2, current: 2 }
        }
    );
    assert!(matches!(items.apply(&mut st, &put(ParamKind::Blacklist, 3)), Response::PackageStored { .. }));
}

#[test]
fn the_clearing_cursor_only_moves_forward_and_never_past_the_ledger() {
    let (mut st, mut items) = setup();
    items.apply(&mut st, &batch("g01", &gate_key(1), 1..=5));
    let ack = |n| Request::ClearingAck { through_index: n };
    assert_eq!(items.apply(&mut st, &ack(3)), Response::ClearingAcked { acked_through: 3, moved: true });
    assert_eq!(items.apply(&mut st, &ack(2)), Response::ClearingAcked { acked_through: 3, moved: false });
    assert!(matches!(
        items.apply(&mut st, &ack(6)),
        Response::Rejected { rejection: Rejection::AckBeyondLedger { through_index: 6, last_index: 5 } }
    ));
    assert_eq!(st.clearing_acked_through, 3);
}

#[test]
fn prune_drops_only_acknowledged_old_records() {
    let (mut st, mut items) = setup();
    items.apply(&mut st, &batch("g01", &gate_key(1), 1..=10));
    items.apply(&mut st, &Request::ClearingAck { through_index: 6 });
    // Records occurred at 1_800_000_000 + seq seconds: before seq 4's time drops seqs 1..=3.
    let before = Timestamp::from_secs(1_800_000_004);
    assert_eq!(
        items.apply(&mut st, &Request::Prune { before }),
        Response::Pruned { removed: 3, first_retained: 4 }
    );
    // Far in the future: stops at the acknowledged point, never beyond.
    let later = Timestamp::from_secs(1_900_000_000);
    assert_eq!(
        items.apply(&mut st, &Request::Prune { before: later }),
        Response::Pruned { removed: 3, first_retained: 7 }
    );
    assert_eq!(items.ledger().first().map(|e| e.index), Some(7));
    assert_eq!(st.ledger_len(), 4);
    // The chain continues from the head after pruning.
    let r = items.apply(&mut st, &batch("g01", &gate_key(1), 11..=11));
    assert!(matches!(r, Response::Appended { first_index: Some(11), .. }));
}

#[test]
fn mode_changes_are_kept_as_history_for_seven_days() {
    let (mut st, mut items) = setup();
    let s = StationCode(101);
    let t0 = Timestamp::from_secs(1_800_000_000);
    let set =
        |bits, at| Request::SetMode { station: s, bits, reason: "drill".into(), actor: "op1".into(), at };
    let r = items.apply(&mut st, &set(ModeBits::EMERGENCY_RELEASE, t0));
    assert_eq!(r, Response::ModeSet { bits: ModeBits::EMERGENCY_RELEASE, previous: ModeBits::NORMAL });
    items.apply(&mut st, &set(ModeBits::NORMAL, t0.plus_minutes(30)));
    assert!(st.modes.emergency_grace(s, t0, t0.plus_days(6)));
    items.apply(&mut st, &set(ModeBits::FARE_FREE, t0.plus_days(3)));
    assert_eq!(st.mode_changes.len(), 3);
    items.apply(&mut st, &set(ModeBits::NORMAL, t0.plus_days(10)));
    assert_eq!(st.mode_changes.len(), 2, "changes older than the history window are dropped");
}

#[test]
fn a_scheduled_window_adds_its_bits_from_its_start_until_its_end_and_can_be_ended_early() {
    let (mut st, mut items) = setup();
    let s = StationCode(1);
    let t0 = Timestamp::from_secs(1_800_000_000);
    let schedule = |bits, from: Timestamp, until: Timestamp| Request::ScheduleMode {
        station: s,
        bits,
        from,
        until,
        reason: "night works".into(),
        actor: "op1".into(),
        at: t0,
    };
    items.apply(
        &mut st,
        &Request::SetMode {
            station: s,
            bits: ModeBits::FARE_FREE,
            reason: "r".into(),
            actor: "op1".into(),
            at: t0,
        },
    );
    let (from, until) = (t0.plus_minutes(60), t0.plus_minutes(120));
    let r = items.apply(&mut st, &schedule(ModeBits::CLOSED, from, until));
    assert_eq!(r, Response::ModeScheduled { bits: ModeBits::CLOSED, from, until });
    // The union: the station's own bits, and the window's while it runs.
    assert_eq!(st.modes.bits_at(s, t0.plus_minutes(59)), ModeBits::FARE_FREE);
    assert_eq!(st.modes.bits_at(s, t0.plus_minutes(61)), ModeBits::FARE_FREE.with(ModeBits::CLOSED));
    assert_eq!(st.window_bits(s, t0.plus_minutes(61)), ModeBits::CLOSED);
    assert_eq!(st.modes.bits_at(s, until), ModeBits::FARE_FREE);
    // A change made at once meanwhile leaves the window alone.
    items.apply(
        &mut st,
        &Request::SetMode {
            station: s,
            bits: ModeBits::NORMAL,
            reason: "r".into(),
            actor: "op1".into(),
            at: t0.plus_minutes(90),
        },
    );
    assert_eq!(st.modes.bits_at(s, t0.plus_minutes(91)), ModeBits::CLOSED);
    // Ended early: from then on only the station's own bits.
    let end = Request::EndModeWindow { station: s, from, at: t0.plus_minutes(100) };
    assert_eq!(
        items.apply(&mut st, &end),
        Response::ModeScheduled { bits: ModeBits::CLOSED, from, until: t0.plus_minutes(100) }
    );
    assert_eq!(st.modes.bits_at(s, t0.plus_minutes(101)), ModeBits::NORMAL);
    assert!(matches!(items.apply(&mut st, &end), Response::Rejected { .. }), "ended once");
    // A window ended before it began is gone; an empty or inverted one is refused.
    let (f2, u2) = (t0.plus_days(1), t0.plus_days(2));
    items.apply(&mut st, &schedule(ModeBits::HOURS_24, f2, u2));
    items.apply(&mut st, &Request::EndModeWindow { station: s, from: f2, at: t0.plus_minutes(110) });
    assert_eq!(st.modes.bits_at(s, t0.plus_days(1).plus_minutes(1)), ModeBits::NORMAL);
    for bad in [schedule(ModeBits::CLOSED, u2, f2), schedule(ModeBits::NORMAL, f2, u2)] {
        assert!(matches!(items.apply(&mut st, &bad), Response::Rejected { .. }));
    }
}

#[test]
fn audit_lines_are_numbered() {
    let (mut st, mut items) = setup();
    let a = Request::Audit { actor: "eng".into(), action: "x".into(), detail: "y".into(), at: Timestamp(1) };
    assert_eq!(items.apply(&mut st, &a), Response::Audited { seq: 1 });
    assert_eq!(items.apply(&mut st, &a), Response::Audited { seq: 2 });
}

#[test]
fn every_request_round_trips_through_json() {
    let reqs = vec![
        batch("g01", &gate_key(1), 1..=2),
        register("g01", &gate_key(1)),
        Request::PutPackage { kind: ParamKind::QrKeys, version: 4, package: vec![0, 1, 255] },
        Request::SetMode {
            station: StationCode(1),
            bits: ModeBits::CLOSED,
            reason: "r".into(),
            actor: "a".into(),
            at: Timestamp(5),
        },
        Request::ScheduleMode {
            station: StationCode(1),
            bits: ModeBits::HOURS_24,
            from: Timestamp(10),
            until: Timestamp(20),
            reason: "r".into(),
            actor: "a".into(),
            at: Timestamp(5),
        },
        Request::EndModeWindow { station: StationCode(1), from: Timestamp(10), at: Timestamp(12) },
        Request::ClearingAck { through_index: 9 },
        Request::Audit { actor: "a".into(), action: "b".into(), detail: "c".into(), at: Timestamp(1) },
        Request::Prune { before: Timestamp(77) },
        Request::PutPackagePiece { upload: 3, index: 1, at: Timestamp(2), bytes: vec![9, 8, 7] },
        Request::CommitPackage {
            upload: 3,
            kind: ParamKind::Blacklist,
            version: 2,
            pieces: 2,
            size: 6,
            sha256: [4; 32],
        },
        Request::RecordCounters { reading: reading("g01", Timestamp(9), 3, 1) },
        Request::DayUploaded { day: afc_domain::model::Date(20_000) },
    ];
    for r in reqs {
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r, "{json}");
    }
}

/// A signed package of `kind`/`version` with a body of `len` pseudo-random bytes, cut in pieces.
fn package_in_pieces(kind: ParamKind, version: u64, len: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
    let body: Vec<u8> = (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let pkg = afc_domain::package::Package::sign(kind, version, Timestamp(1), body, 1, &key).encode();
    let pieces = pkg.chunks(controller::state::PACKAGE_PIECE_BYTES).map(<[u8]>::to_vec).collect();
    (pkg, pieces)
}

fn piece(upload: u64, index: u32, at: i64, bytes: &[u8]) -> Request {
    Request::PutPackagePiece { upload, index, at: Timestamp(at), bytes: bytes.to_vec() }
}

fn commit(upload: u64, kind: ParamKind, version: u64, pkg: &[u8], pieces: usize) -> Request {
    Request::CommitPackage {
        upload,
        kind,
        version,
        pieces: pieces as u32,
        size: pkg.len() as u64,
        sha256: sha2::Sha256::digest(pkg).into(),
    }
}

use sha2::Digest;

fn pieces_held(items: &Items) -> usize {
    items.0.keys().filter(|k| k[0] == keys::PIECE_PREFIX).count()
}

#[test]
fn a_package_sent_in_pieces_is_assembled_stored_and_its_pieces_deleted_and_a_repeat_changes_nothing() {
    let (mut st, mut items) = setup();
    let kind = ParamKind::Blacklist;
    let (pkg, pieces) = package_in_pieces(kind, 1, 600_000);
    assert_eq!(pieces.len(), 5);
    for (i, p) in pieces.iter().enumerate() {
        let r = items.apply(&mut st, &piece(9, i as u32, 10, p));
        assert_eq!(r, Response::PieceStored { upload: 9, received: i as u32 + 1 });
    }
    // A retried piece is a no-op.
    assert_eq!(
        items.apply(&mut st, &piece(9, 1, 11, &pieces[1])),
        Response::PieceStored { upload: 9, received: 5 }
    );
    assert_eq!(pieces_held(&items), 5);
    let c = commit(9, kind, 1, &pkg, pieces.len());
    let r = items.apply(&mut st, &c);
    assert!(matches!(r, Response::PackageStored { version: 1, .. }), "{r:?}");
    assert_eq!(items.0.get(keys::package(kind, 1).as_slice()), Some(&pkg));
    assert_eq!(pieces_held(&items), 0);
    assert!(st.uploads.is_empty());
    // The commit proposed again (a client retry after a lost answer): same answer, nothing new.
    let before = items.0.clone();
    assert_eq!(items.apply(&mut st, &c), r);
    assert_eq!(items.0, before);
}

#[test]
fn a_bad_upload_is_refused_with_a_reason_and_leaves_no_pieces_behind() {
    let kind = ParamKind::Blacklist;
    let (pkg, pieces) = package_in_pieces(kind, 1, 300_000);
    let upload = |items: &mut Items, st: &mut StationState, id: u64| {
        for (i, p) in pieces.iter().enumerate() {
            items.apply(st, &piece(id, i as u32, 10, p));
        }
    };
    type Expected = fn(&Rejection) -> bool;
    let cases: Vec<(&str, Request, Expected)> = vec![
        (
            "wrong hash",
            {
                let mut c = commit(1, kind, 1, &pkg, pieces.len());
                if let Request::CommitPackage { sha256, .. } = &mut c {
                    sha256[0] ^= 1;
                }
                c
            },
            |r| matches!(r, Rejection::UploadHashMismatch { .. }),
        ),
        ("wrong version", commit(1, kind, 2, &pkg, pieces.len()), |r| {
            matches!(r, Rejection::InvalidPackage { .. })
        }),
        ("wrong kind", commit(1, ParamKind::FareTable, 1, &pkg, pieces.len()), |r| {
            matches!(r, Rejection::InvalidPackage { .. })
        }),
        ("a piece short", commit(1, kind, 1, &pkg, pieces.len() + 1), |r| {
            matches!(r, Rejection::UploadIncomplete { .. })
        }),
        ("unknown upload", commit(2, kind, 1, &pkg, pieces.len()), |r| {
            matches!(r, Rejection::UnknownUpload { upload: 2 })
        }),
    ];
    for (name, c, want) in cases {
        let (mut st, mut items) = setup();
        upload(&mut items, &mut st, 1);
        match items.apply(&mut st, &c) {
            Response::Rejected { rejection } => assert!(want(&rejection), "{name}: {rejection:?}"),
            other => panic!("{name}: {other:?}"),
        }
        assert!(st.packages.get(kind.as_str()).is_none_or(|p| p.versions.is_empty()), "{name}");
        if name != "unknown upload" {
            assert_eq!(pieces_held(&items), 0, "{name}: pieces deleted");
        }
    }
    // Garbage bytes that hash right are still not a package.
    let (mut st, mut items) = setup();
    items.apply(&mut st, &piece(5, 0, 1, b"not a package"));
    let r = items.apply(&mut st, &commit(5, kind, 1, b"not a package", 1));
    assert!(matches!(r, Response::Rejected { rejection: Rejection::InvalidPackage { .. } }), "{r:?}");
    // Out of order, unopened and oversized pieces.
    let r = items.apply(&mut st, &piece(6, 1, 1, b"x"));
    assert!(matches!(r, Response::Rejected { rejection: Rejection::UnknownUpload { upload: 6 } }), "{r:?}");
    items.apply(&mut st, &piece(6, 0, 1, b"x"));
    let r = items.apply(&mut st, &piece(6, 2, 1, b"x"));
    assert!(
        matches!(r, Response::Rejected { rejection: Rejection::PieceOutOfOrder { expected: 1, .. } }),
        "{r:?}"
    );
    let big = vec![0u8; controller::state::MAX_PACKAGE_PIECE_BYTES + 1];
    let r = items.apply(&mut st, &piece(6, 1, 1, &big));
    assert!(matches!(r, Response::Rejected { rejection: Rejection::PieceTooLarge { .. } }), "{r:?}");
}

#[test]
fn abandoned_uploads_are_bounded_in_number_and_expire() {
    let (mut st, mut items) = setup();
    let ttl = controller::state::UPLOAD_TTL_MS;
    let max = controller::state::MAX_UPLOADS as u64;
    for id in 1..=max + 2 {
        items.apply(&mut st, &piece(id, 0, id as i64, &[1; 100]));
        items.apply(&mut st, &piece(id, 1, id as i64, &[2; 100]));
    }
    assert_eq!(st.uploads.len() as u64, max, "the least recently touched made room");
    assert!(!st.uploads.contains_key(&1) && !st.uploads.contains_key(&2));
    assert_eq!(pieces_held(&items) as u64, 2 * max);
    // Much later, a new upload clears every expired one.
    items.apply(&mut st, &piece(100, 0, ttl + 1_000, &[3; 10]));
    assert_eq!(st.uploads.keys().copied().collect::<Vec<_>>(), vec![100]);
    assert_eq!(pieces_held(&items), 1);
}

fn rollout_request(version: u64, from: Option<u64>, confirmation: bool) -> Request {
    use afc_domain::rollout::{RolloutPolicy, SecondConfirmation};
    Request::RolloutRequest {
        request: controller::state::RolloutStart {
            kind: ParamKind::Blacklist,
            to_version: version,
            from_version: from,
            effective_from: Timestamp(1),
            policy: RolloutPolicy::default(),
            by: "emma".into(),
            at: Timestamp(1),
            reason: "r".into(),
            confirmation: confirmation.then(|| SecondConfirmation {
                to_version: version,
                added: 250_000,
                requested_by: "emma".into(),
                requested_at: Timestamp(1),
                confirmed_by: None,
                confirmed_at: None,
            }),
        },
    }
}

fn rollout_code(r: &Response) -> String {
    match r {
        Response::Rejected { rejection: Rejection::Rollout { rollout_code, .. } } => rollout_code.clone(),
        other => format!("{other:?}"),
    }
}

#[test]
fn a_held_mass_insertion_is_confirmed_only_by_another_operator_and_a_stale_rollout_step_loses_to_an_abort() {
    use afc_domain::rollout::{Observations, Rollout, RolloutPolicy};
    let (mut st, mut items) = setup();
    let kind = ParamKind::Blacklist;
    let r = items.apply(&mut st, &rollout_request(5, None, false));
    assert!(
        matches!(r, Response::Rejected { rejection: Rejection::UnknownVersion { version: 5, .. } }),
        "{r:?}"
    );
    // The next version may be announced before it is stored.
    let r = items.apply(&mut st, &rollout_request(1, None, true));
    assert_eq!(r, Response::RolloutRequested { kind, version: 1, held: true });
    assert_eq!(st.rollouts.station_version(kind, Some(1)), None, "no pointer before the rollout starts");
    let confirm = |by: &str| Request::RolloutConfirm { kind, by: by.into(), at: Timestamp(2) };
    assert_eq!(rollout_code(&items.apply(&mut st, &confirm("emma"))), "same_operator");
    assert!(!st.rollouts.requests[&kind].ready());
    assert_eq!(items.apply(&mut st, &confirm("erik")), Response::RolloutConfirmed { kind, version: 1 });
    assert!(st.rollouts.requests[&kind].ready());
    assert_eq!(rollout_code(&items.apply(&mut st, &confirm("otto"))), "already_confirmed");

    // The leader starts it (compare and set against "no rollout"), an abort follows, and a step
    // computed before the abort is refused.
    let (started, _) = Rollout::start(
        kind,
        None,
        1,
        Timestamp(1),
        &RolloutPolicy::default(),
        Timestamp(3),
        &Observations::default(),
    )
    .unwrap();
    let start =
        Request::RolloutUpdate { kind, previous: None, next: Box::new(started.clone()), started: true };
    assert_eq!(items.apply(&mut st, &start), Response::RolloutUpdated { kind });
    assert!(st.rollouts.requests.is_empty());
    assert_eq!(st.rollouts.station_version(kind, Some(1)), Some(1), "a blacklist goes to every gate at once");
    let abort = Request::RolloutAbort { kind, by: "erik".into(), at: Timestamp(4) };
    assert_eq!(items.apply(&mut st, &abort), Response::RolloutAborted { kind, dropped_request: false });
    let mut stale = started.clone();
    stale.step(Timestamp(5), &Observations::default());
    let step = Request::RolloutUpdate {
        kind,
        previous: Some(Box::new(started)),
        next: Box::new(stale),
        started: false,
    };
    assert!(matches!(
        items.apply(&mut st, &step),
        Response::Rejected { rejection: Rejection::RolloutChanged { .. } }
    ));
    assert_eq!(rollout_code(&items.apply(&mut st, &abort)), "already_rolled_back");
    assert_eq!(
        rollout_code(&items.apply(
            &mut st,
            &Request::RolloutAbort { kind: ParamKind::QrKeys, by: "e".into(), at: Timestamp(4) }
        )),
        "no_rollout"
    );
}

#[test]
fn prune_keeps_the_version_a_rollout_points_gates_at() {
    use afc_domain::rollout::{Observations, Rollout, RolloutPolicy};
    let (mut st, mut items) = setup();
    let kind = ParamKind::Blacklist;
    for v in 1..=3 {
        items.apply(&mut st, &Request::PutPackage { kind, version: v, package: vec![v as u8] });
    }
    let (r, _) = Rollout::start(
        kind,
        None,
        1,
        Timestamp(1),
        &RolloutPolicy::default(),
        Timestamp(1),
        &Observations::default(),
    )
    .unwrap();
    items.apply(&mut st, &Request::RolloutUpdate { kind, previous: None, next: Box::new(r), started: false });
    items.apply(&mut st, &Request::Prune { before: Timestamp(0) });
    assert_eq!(st.packages[kind.as_str()].versions, vec![1, 3], "v1 is what gates run; v2 goes");
    assert!(items.0.contains_key(keys::package(kind, 1).as_slice()));
    assert!(!items.0.contains_key(keys::package(kind, 2).as_slice()));
}

/// A signed batch of `records` from g01 (key 1), covering from `covers_from` when given.
fn installed_batch(records: Vec<TxRecord>, covers_from: Option<u64>) -> Request {
    covering_batch("g01", &gate_key(1), records, covers_from)
}

fn installed(inst: u8, seq: u64) -> TxRecord {
    installed_record("g01", inst, seq)
}

fn appended(r: &Response) -> (u32, u32, u32, u32, u64) {
    match r {
        Response::Appended { appended, duplicates, gaps, conflicts, through_seq, .. } => {
            (*appended, *duplicates, *gaps, *conflicts, *through_seq)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_replaced_gate_numbering_from_one_again_under_a_new_installation_is_new_not_a_duplicate() {
    let (mut st, mut items) = setup();
    let first: Vec<TxRecord> = (1..=5).map(|s| installed(1, s)).collect();
    assert_eq!(appended(&items.apply(&mut st, &installed_batch(first.clone(), Some(1)))), (5, 0, 0, 0, 5));
    // The disk was wiped: a new installation, gate_seq from 1, and a different passenger each time.
    let second: Vec<TxRecord> = (1..=3).map(|s| TxRecord { id: 77_000 + s, ..installed(2, s) }).collect();
    assert_eq!(appended(&items.apply(&mut st, &installed_batch(second, Some(1)))), (3, 0, 0, 0, 3));
    assert_eq!(items.ledger().len(), 8);
    // The first installation's re-send is still a plain duplicate.
    assert_eq!(appended(&items.apply(&mut st, &installed_batch(first, Some(1)))), (0, 5, 0, 0, 5));
    let g = &st.gates[&ident("g01")];
    assert_eq!(g.installations.len(), 2);
    assert_eq!(g.progress_of(Some(&Installation([2; 16]))).unwrap().contiguous_through, 3);
}

#[test]
fn a_record_whose_key_is_held_with_other_content_is_refused_kept_and_counted_never_a_duplicate() {
    let (mut st, mut items) = setup();
    items.apply(&mut st, &installed_batch((1..=3).map(|s| installed(1, s)).collect(), Some(1)));
    // Same installation and gate_seq 2, another card (a restored disk image numbering again).
    let other = TxRecord { id: 555, ..installed(1, 2) };
    let r = items
        .apply(&mut st, &installed_batch(vec![installed(1, 1), other.clone(), installed(1, 4)], Some(1)));
    assert_eq!(appended(&r), (1, 1, 0, 1, 4), "seq 1 duplicate, 2 conflict, 4 new");
    assert_eq!(items.ledger().len(), 4);
    assert_eq!(items.ledger()[1].record.id, installed(1, 2).id, "the stored record stays");
    assert_eq!((st.conflicts, st.gates[&ident("g01")].conflicts), (1, 1));
    let kept: Vec<KeyConflict> = items
        .0
        .iter()
        .filter(|(k, _)| k[0] == keys::CONFLICT_PREFIX)
        .map(|(_, v)| serde_json::from_slice(v).unwrap())
        .collect();
    assert_eq!(kept, vec![KeyConflict { id: 1, ledger_index: 2, record: other.clone() }]);
    // Within one command too: a batch carrying seq 9 twice with different content.
    let twice = vec![installed(1, 5), installed(1, 6), TxRecord { id: 1, ..installed(1, 6) }];
    assert_eq!(appended(&items.apply(&mut st, &installed_batch(twice, Some(5)))), (2, 0, 0, 1, 6));
}

#[test]
fn numbers_a_covering_batch_does_not_carry_are_recorded_as_a_gap_and_the_gate_is_acked_past_them() {
    let (mut st, mut items) = setup();
    items.apply(&mut st, &installed_batch((1..=2).map(|s| installed(1, s)).collect(), Some(1)));
    // Without the covering claim, a missing 3 and 4 stall the acks at 2.
    let r = items.apply(&mut st, &installed_batch((5..=6).map(|s| installed(1, s)).collect(), None));
    assert_eq!(appended(&r), (2, 0, 0, 0, 2));
    // The gate says it holds nothing else from 3 on: 3 and 4 are lost; 5, 6 are already in.
    let r = items
        .apply(&mut st, &installed_batch(vec![installed(1, 5), installed(1, 6), installed(1, 8)], Some(3)));
    assert_eq!(appended(&r), (1, 2, 2, 0, 8), "gaps 3..=4 and 7..=7");
    let gaps: Vec<SequenceGap> = items
        .0
        .iter()
        .filter(|(k, _)| k[0] == keys::GAP_PREFIX)
        .map(|(_, v)| serde_json::from_slice(v).unwrap())
        .collect();
    assert_eq!(
        gaps.iter().map(|g| (g.id, g.from_seq, g.to_seq)).collect::<Vec<_>>(),
        vec![(1, 3, 4), (2, 7, 7)]
    );
    assert_eq!(gaps[1].ledger_index, 5, "the record after the gap got ledger index 5");
    assert_eq!(gaps[0].installation, Some(Installation([1; 16])));
    assert_eq!((st.gaps, st.gates[&ident("g01")].gaps), (2, 2));
    // A covering claim is signed: a forged wider claim does not verify.
    let Request::AppendTxBatch { station, gate, records, signature, .. } =
        installed_batch(vec![installed(1, 12)], Some(9))
    else {
        unreachable!()
    };
    let forged = Request::AppendTxBatch { station, gate, records, signature, covers_from: Some(1) };
    assert!(matches!(items.apply(&mut st, &forged), Response::Rejected { .. }));
}

#[test]
fn a_batch_mixing_installations_is_refused() {
    let (mut st, mut items) = setup();
    let r = items.apply(&mut st, &installed_batch(vec![installed(1, 1), installed(2, 2)], Some(1)));
    assert!(matches!(r, Response::Rejected { rejection: Rejection::InvalidBatch { .. } }), "{r:?}");
}

#[test]
fn a_gate_upgraded_to_records_with_an_installation_numbers_on_and_is_acked_past_its_old_records() {
    let (mut st, mut items) = setup();
    // First-version records (no installation), acked through 5.
    let old: Vec<TxRecord> = (1..=5).map(|s| record("s1", "g01", s)).collect();
    assert_eq!(appended(&items.apply(&mut st, &installed_batch(old, None))), (5, 0, 0, 0, 5));
    // Upgraded: the same gate numbers on under its installation, covering from 6.
    let r = items.apply(&mut st, &installed_batch((6..=8).map(|s| installed(1, s)).collect(), Some(6)));
    assert_eq!(appended(&r), (3, 0, 0, 0, 8), "numbers on, acked through 8, no gap");
    // A wiped gate (another installation, nothing acked, covering from 1) still starts at 1.
    let r = items.apply(&mut st, &installed_batch((1..=2).map(|s| installed(2, s)).collect(), Some(1)));
    assert_eq!(appended(&r), (2, 0, 0, 0, 2));
}

fn reading(gate: &str, at: Timestamp, entries: u64, forced: u64) -> controller::day::CounterReading {
    use afc_domain::model::BusinessDayRule;
    controller::day::CounterReading {
        gate: ident(gate),
        at,
        business_day: BusinessDayRule::default().business_day(at),
        counters: controller::day::CounterValues { entries, exits: 0, tailgating: 0, forced_passage: forced },
    }
}

/// The close of the business day of the test records (`record`'s times), computed as the API
/// does: a tally of the day's ledger records and the stored readings.
fn close_of(
    items: &Items,
    closed_at: Timestamp,
    readings: &[controller::day::CounterReading],
) -> controller::day::DayClose {
    use afc_domain::model::BusinessDayRule;
    use controller::day::{day_bounds, CloseHead, DayTally};
    let rule = BusinessDayRule::default();
    let day = rule.business_day(record("s1", "g01", 1).occurred_at);
    let (from, until) = day_bounds(rule, day);
    let mut tally = DayTally::default();
    let ledger = items.ledger();
    for e in &ledger {
        if e.record.occurred_at >= from && e.record.occurred_at < until {
            tally.add(&e.record);
        }
    }
    let mut by_gate: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for r in readings {
        by_gate.entry(r.gate.clone()).or_insert_with(Vec::new).push(r.clone());
    }
    let head = CloseHead {
        day,
        station: ident("s1"),
        rule,
        closed_at,
        closed_by: "op".into(),
        reason: "end of day".into(),
        ledger_through: ledger.len() as u64,
    };
    tally.close(head, &by_gate)
}

#[test]
fn a_closed_day_totals_the_ledger_lists_a_forced_passage_as_a_discrepancy_and_is_stored_once() {
    use afc_domain::model::BusinessDayRule;
    let (mut st, mut items) = setup();
    items.apply(&mut st, &register("g02", &gate_key(2)));
    items.apply(&mut st, &batch("g01", &gate_key(1), 1..=5));
    items.apply(&mut st, &batch("g02", &gate_key(2), 1..=3));
    let rule = BusinessDayRule::default();
    let day = rule.business_day(record("s1", "g01", 1).occurred_at);
    let (from, until) = controller::day::day_bounds(rule, day);
    // Readings: g01's PLC counted 5 passages for 5 taps; g02's 4 for 3 taps and one forced
    // passage; the registers wrap (g02 starts just below 2^32).
    let near_wrap = u64::from(u32::MAX) - 1;
    let rs = [
        reading("g01", from.plus_minutes(1), 100, 0),
        reading("g01", until.plus_minutes(1), 105, 0),
        reading("g02", from.plus_minutes(1), near_wrap, 2),
        reading("g02", until.plus_minutes(1), (near_wrap + 4) % (1 << 32), 3),
    ];
    for r in &rs {
        let resp = items.apply(&mut st, &Request::RecordCounters { reading: r.clone() });
        assert_eq!(resp, Response::CountersRecorded { recorded: true });
    }
    // A retried (or older) reading changes nothing.
    let again = items.apply(&mut st, &Request::RecordCounters { reading: rs[1].clone() });
    assert_eq!(again, Response::CountersRecorded { recorded: false });

    let close = close_of(&items, until.plus_minutes(5), &rs);
    assert_eq!(close.records, 8);
    let accepted: u64 = close.totals.iter().map(|t| t.accepted).sum();
    assert_eq!(accepted, 8);
    let g02 = close.discrepancies.iter().find(|d| d.gate == ident("g02")).expect("g02 discrepancy");
    assert_eq!(
        (g02.plc_passages, g02.recorded_taps, g02.difference, g02.forced_passage),
        (Some(4), 3, Some(1), Some(1))
    );
    assert!(close.discrepancies.iter().all(|d| d.gate != ident("g01")), "{:?}", close.discrepancies);

    let req = Request::CloseDay { close: Box::new(close.clone()) };
    assert_eq!(items.apply(&mut st, &req), Response::DayClosed { day, duplicate: false, discrepancies: 1 });
    // The same proposal again (a retry) is a duplicate; another close of the day is refused.
    assert_eq!(items.apply(&mut st, &req), Response::DayClosed { day, duplicate: true, discrepancies: 1 });
    let other = close_of(&items, until.plus_minutes(6), &rs);
    let refused = items.apply(&mut st, &Request::CloseDay { close: Box::new(other) });
    assert_eq!(
        refused,
        Response::Rejected { rejection: Rejection::DayAlreadyClosed { day: day.to_string() } }
    );
    assert_eq!(st.days[&day].discrepancies, 1);
    assert!(!st.days[&day].uploaded);
    let stored: controller::day::DayClose =
        serde_json::from_slice(&items.0[keys::day(day).as_slice()]).unwrap();
    assert_eq!(stored, close);
    assert_eq!(items.apply(&mut st, &Request::DayUploaded { day }), Response::DayUploaded { day });
    assert!(st.days[&day].uploaded);
    // The state with its days and readings round-trips (it is stored as JSON after every apply).
    let json = serde_json::to_vec(&st).unwrap();
    assert_eq!(serde_json::from_slice::<StationState>(&json).unwrap(), st);
}

#[test]
fn a_day_not_over_cannot_be_closed_and_a_reading_of_an_unknown_gate_is_refused() {
    use afc_domain::model::BusinessDayRule;
    let (mut st, mut items) = setup();
    items.apply(&mut st, &batch("g01", &gate_key(1), 1..=2));
    let rule = BusinessDayRule::default();
    let day = rule.business_day(record("s1", "g01", 1).occurred_at);
    let (_, until) = controller::day::day_bounds(rule, day);
    let early = close_of(&items, until.plus_minutes(-1), &[]);
    let r = items.apply(&mut st, &Request::CloseDay { close: Box::new(early) });
    assert!(matches!(r, Response::Rejected { rejection: Rejection::DayNotOver { .. } }), "{r:?}");
    assert!(st.days.is_empty());
    // Without readings the PLC side is unknown: taps at the gate are a discrepancy, not a match.
    let close = close_of(&items, until, &[]);
    assert_eq!(close.discrepancies.len(), 1);
    assert_eq!(close.discrepancies[0].plc_passages, None);
    let r = items.apply(&mut st, &Request::RecordCounters { reading: reading("g99", until, 1, 0) });
    assert!(matches!(r, Response::Rejected { rejection: Rejection::UnknownGate { .. } }), "{r:?}");
    let r = items.apply(&mut st, &Request::DayUploaded { day });
    assert!(matches!(r, Response::Rejected { rejection: Rejection::DayNotClosed { .. } }), "{r:?}");
}
