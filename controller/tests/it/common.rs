//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use afc_domain::ledger::{ParamVersions, TxRecord};
use afc_domain::mode::ModeBits;
use afc_domain::model::{Direction, Ident, Media, Reason, Timestamp};
use controller::chain::sign_batch;
use controller::state::Request;
use ed25519_dalek::SigningKey;

pub fn ident(s: &str) -> Ident {
    Ident::new(s).unwrap()
}

/// A deterministic gate key from a small number.
pub fn gate_key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

pub fn record(station: &str, gate: &str, seq: u64) -> TxRecord {
    TxRecord {
        station: ident(station),
        gate: ident(gate),
        gate_seq: seq,
        media: Media::Svc,
        id: 31_000_000 + seq,
        direction: Direction::Entry,
        accepted: true,
        reason: Reason::ALL[0],
        fare_fen: 0,
        shortfall_fen: 0,
        balance_before: Some(1000),
        balance_after: Some(1000),
        card_tx_counter: Some(seq as u32),
        entry_station: None,
        entry_time: None,
        occurred_at: Timestamp::from_secs(1_800_000_000 + seq as i64),
        modes: ModeBits::NORMAL,
        params: ParamVersions::default(),
        replay_unchecked: false,
        qr: None,
    }
}

pub fn register(gate: &str, key: &SigningKey) -> Request {
    Request::RegisterGate {
        gate: ident(gate),
        tx_public_key: hex::encode(key.verifying_key().to_bytes()),
        hardware_profile: "default".into(),
    }
}

/// A signed batch of `seqs` from `gate` at station `s1`.
pub fn batch(gate: &str, key: &SigningKey, seqs: impl IntoIterator<Item = u64>) -> Request {
    let records: Vec<TxRecord> = seqs.into_iter().map(|s| record("s1", gate, s)).collect();
    let sig = sign_batch(&ident("s1"), &ident(gate), &records, key);
    Request::AppendTxBatch { station: ident("s1"), gate: ident(gate), records, signature: hex::encode(sig) }
}

/// Polls `f` until it returns Some or the deadline passes.
pub async fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
