//! The upload's bookkeeping as plain types (SPEC §5): which outbox records make the next signed
//! batch on `gates/{gate}/tx`, and whether the batch in flight is acknowledged, overdue or to be
//! sent again. No I/O: the `mqtt-upload` task reads the outbox, publishes what [`prepare`] returns
//! and tells [`Acks`] what happened.
//!
//! Records stay in the outbox until the ledger's `tx/ack` covers them; a batch is never kept in
//! the client's queue. Sending again always starts from the acknowledged point (the ledger
//! de-duplicates on gate_seq), so giving up on a batch loses nothing.

use std::time::{Duration, Instant};

use afc_domain::ledger::{sign_canonical_batch, CanonicalRecord};
use afc_domain::model::Ident;
use afc_domain::wire::{self, TxBatch};
use ed25519_dalek::SigningKey;

/// Who signs the batches: the gate, its station, its store's installation, its key.
pub struct Signer<'a> {
    pub station: &'a Ident,
    pub gate: &'a Ident,
    /// The store's installation, named in every batch.
    pub installation: &'a str,
    /// The gate's tx batch key.
    pub key: &'a SigningKey,
}

/// What to do with the outbox records after the acknowledged point.
#[derive(Debug)]
pub enum Prepared {
    /// Nothing is waiting.
    Idle,
    /// The first waiting record cannot be read by this build: it is kept, and the upload waits
    /// before it (never declared lost).
    Blocked,
    /// Publish this batch.
    Batch(Batch),
}

/// One signed batch, encoded.
#[derive(Debug)]
pub struct Batch {
    /// The `TxBatch` as sent on `gates/{gate}/tx`.
    pub payload: Vec<u8>,
    /// The first gate_seq it covers (`after + 1`).
    pub first: u64,
    /// The last record in it: the batch is acknowledged once the outbox is acked through it.
    pub last: u64,
}

/// The next batch after `after` (the acknowledged point) from `pending`, the outbox records that
/// follow it in gate_seq order as `(gate_seq, canonical bytes)`. Each record is decoded once
/// (strictly: the bytes are its canonical form) for its installation; the batch carries and signs
/// the outbox's bytes as they are (`raw`), never a record encoded again.
///
/// The batch ends before a record this build cannot read (a downgraded agent, say) and where the
/// records' installation changes (records numbered before they carried one, then with it: the
/// ledger keys them apart). It covers `after+1..=last`: the outbox holds nothing else in that
/// range (a frame it could not read back was skipped when the log was opened), so a number there
/// that is not in the batch is lost and the ledger records the gap instead of waiting for ever.
pub fn prepare(signer: &Signer<'_>, after: u64, pending: Vec<(u64, Vec<u8>)>) -> Prepared {
    if pending.is_empty() {
        return Prepared::Idle;
    }
    let mut records: Vec<CanonicalRecord> = Vec::with_capacity(pending.len());
    let mut last = after;
    for (seq, bytes) in pending {
        match CanonicalRecord::from_canonical(bytes) {
            Ok(r) if records.first().is_none_or(|f| f.installation == r.installation) => {
                records.push(r);
                last = seq;
            }
            Ok(_) => break,
            Err(e) => {
                tracing::error!(seq, error = %e, "outbox record unreadable: kept, and the upload waits before it");
                break;
            }
        }
    }
    if records.is_empty() {
        return Prepared::Blocked;
    }
    let covers_from = Some(after + 1);
    let signature =
        hex::encode(sign_canonical_batch(signer.station, signer.gate, covers_from, &records, signer.key));
    let batch = TxBatch {
        station: signer.station.clone(),
        gate: signer.gate.clone(),
        records: None,
        raw: Some(TxBatch::raw_of(&records)),
        signature,
        installation: Some(signer.installation.to_owned()),
        covers_from,
    };
    Prepared::Batch(Batch { payload: wire::encode(&batch), first: after + 1, last })
}

/// The batch in flight and when it is overdue.
#[derive(Debug)]
pub struct Acks {
    /// How long a batch waits for its `tx/ack` (`mqtt.ack_timeout_ms`).
    timeout: Duration,
    /// `(last, deadline)` of the batch sent and not yet acknowledged.
    in_flight: Option<(u64, Instant)>,
}

impl Acks {
    pub fn new(timeout: Duration) -> Acks {
        Acks { timeout, in_flight: None }
    }

    /// A batch ending at `last` was published at `now`.
    pub fn sent(&mut self, last: u64, now: Instant) {
        self.in_flight = Some((last, now + self.timeout));
    }

    /// The outbox is acknowledged through `acked_through`: whether nothing is in flight any more
    /// (the batch is covered, or none was sent).
    pub fn acked(&mut self, acked_through: u64) -> bool {
        match self.in_flight {
            Some((last, _)) if acked_through < last => false,
            _ => {
                self.in_flight = None;
                true
            }
        }
    }

    /// When the batch in flight is overdue.
    pub fn deadline(&self) -> Option<Instant> {
        self.in_flight.map(|(_, d)| d)
    }

    /// Gives up waiting for the batch in flight (overdue, the connection changed, a new leader
    /// that may never have seen it): the next one starts again from the acknowledged point.
    /// Returns the last record of the batch given up.
    pub fn give_up(&mut self) -> Option<u64> {
        self.in_flight.take().map(|(last, _)| last)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use afc_domain::ledger::{verify_canonical_batch, Installation, ParamVersions, TxRecord};
    use afc_domain::mode::ModeBits;
    use afc_domain::model::{Direction, Media, Reason, Timestamp};

    use super::*;

    fn ident(s: &str) -> Ident {
        Ident::new(s).unwrap()
    }

    fn record(seq: u64, installation: Option<Installation>) -> (u64, Vec<u8>) {
        let r = TxRecord {
            station: ident("s1"),
            gate: ident("g01"),
            gate_seq: seq,
            media: Media::Svc,
            id: 42,
            direction: Direction::Entry,
            accepted: true,
            reason: Reason::Ok,
            fare_fen: 0,
            shortfall_fen: 0,
            balance_before: Some(500),
            balance_after: Some(500),
            card_tx_counter: Some(1),
            entry_station: None,
            entry_time: None,
            occurred_at: Timestamp(1_790_000_000_000 + seq as i64),
            modes: ModeBits::NORMAL,
            params: ParamVersions::default(),
            replay_unchecked: false,
            qr: None,
            installation,
            voids: None,
            bank: None,
            tac: None,
        };
        (seq, r.canonical_bytes())
    }

    fn prepared(after: u64, pending: &[(u64, Vec<u8>)]) -> (Prepared, SigningKey) {
        let pending = pending.to_vec();
        let key = SigningKey::from_bytes(&[9u8; 32]);
        let (station, gate) = (ident("s1"), ident("g01"));
        let signer = Signer { station: &station, gate: &gate, installation: "inst", key: &key };
        (prepare(&signer, after, pending), key)
    }

    fn batch(p: Prepared) -> (Batch, TxBatch) {
        match p {
            Prepared::Batch(b) => {
                let tx = wire::decode::<TxBatch>(&b.payload).unwrap();
                (b, tx)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nothing_pending_is_idle_and_an_unreadable_first_record_blocks_the_upload() {
        assert!(matches!(prepared(0, &[]).0, Prepared::Idle));
        assert!(matches!(prepared(0, &[(1, b"garbage".to_vec())]).0, Prepared::Blocked));
    }

    #[test]
    fn a_batch_is_signed_and_covers_from_the_acknowledged_point() {
        let pending = [record(5, None), record(7, None)];
        let (p, key) = prepared(4, &pending);
        let (b, tx) = batch(p);
        assert_eq!((b.first, b.last), (5, 7));
        assert_eq!(tx.covers_from, Some(5));
        assert_eq!(tx.installation.as_deref(), Some("inst"));
        assert!(tx.records.is_none(), "the outbox's bytes are sent, not the records as JSON");
        let records = tx.canonical_records().unwrap();
        assert_eq!(records.iter().map(|r| r.gate_seq).collect::<Vec<_>>(), [5, 7]);
        assert_eq!(
            records.iter().map(|r| r.bytes().to_vec()).collect::<Vec<_>>(),
            [pending[0].1.clone(), pending[1].1.clone()]
        );
        let sig: [u8; 64] = hex::decode(&tx.signature).unwrap().try_into().unwrap();
        verify_canonical_batch(&tx.station, &tx.gate, tx.covers_from, &records, &sig, &key.verifying_key())
            .unwrap();
    }

    #[test]
    fn a_batch_ends_before_an_unreadable_record_and_where_the_installation_changes() {
        let (b, _) = batch(prepared(0, &[record(1, None), (2, b"garbage".to_vec()), record(3, None)]).0);
        assert_eq!(b.last, 1);
        let inst = Some(Installation([1; 16]));
        let (b, tx) = batch(prepared(0, &[record(1, None), record(2, None), record(3, inst)]).0);
        assert_eq!(b.last, 2);
        assert_eq!(tx.canonical_records().unwrap().len(), 2);
    }

    #[test]
    fn a_batch_is_acknowledged_only_once_the_outbox_is_acked_through_its_last_record() {
        let mut acks = Acks::new(Duration::from_secs(2));
        assert!(acks.acked(0), "nothing in flight");
        let now = Instant::now();
        acks.sent(10, now);
        assert_eq!(acks.deadline(), Some(now + Duration::from_secs(2)));
        assert!(!acks.acked(9));
        assert!(acks.acked(10));
        assert_eq!(acks.deadline(), None);
    }

    #[test]
    fn a_batch_given_up_is_no_longer_in_flight() {
        let mut acks = Acks::new(Duration::from_secs(2));
        acks.sent(10, Instant::now());
        assert_eq!(acks.give_up(), Some(10));
        assert_eq!(acks.give_up(), None);
        assert_eq!(acks.deadline(), None);
    }
}
