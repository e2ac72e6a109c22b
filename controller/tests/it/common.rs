//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use afc_domain::ledger::{ParamVersions, TxRecord};
use afc_domain::mode::ModeBits;
use afc_domain::model::{Direction, Ident, Media, Reason, Timestamp};
use afc_domain::signed::{self, SignedError, GATE_KEY_ID};
use afc_domain::wire::WireMessage;
use controller::chain::sign_batch;
use controller::state::Request;
use ed25519_dalek::SigningKey;
use serde::de::DeserializeOwned;

pub fn ident(s: &str) -> Ident {
    Ident::new(s).unwrap()
}

/// A deterministic gate key from a small number.
pub fn gate_key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// The key id the tests' station key signs with (`api.signing_key_id`).
pub const STATION_KEY_ID: u32 = 3;

/// The station key of the tests (`api.signing_key_file`): it signs packages and everything the
/// leader publishes to gates.
pub fn station_key() -> SigningKey {
    SigningKey::from_bytes(&crate::api::SIGNING_SEED)
}

/// Writes the station key into `dir` and returns the `[api]` keys naming it.
pub fn station_key_config(dir: &std::path::Path) -> String {
    let path = dir.join("station-signing.key");
    std::fs::write(&path, hex::encode(crate::api::SIGNING_SEED)).unwrap();
    format!("signing_key_file = \"{}\"\nsigning_key_id = {STATION_KEY_ID}\n", path.display())
}

/// What gate `key_n` (its key is [`gate_key`]) publishes on `topic`: `msg` signed with its key.
pub fn gate_seal<T: WireMessage>(topic: &str, msg: &T, key_n: u8) -> Vec<u8> {
    signed::seal(topic, msg, GATE_KEY_ID, &gate_key(key_n))
}

/// A message the leader published on `topic`, checked as a gate checks it (the station key).
pub fn open_from_station<T: DeserializeOwned>(topic: &str, payload: &[u8]) -> Result<T, SignedError> {
    let key = station_key().verifying_key();
    signed::open(topic, payload, |id| (id == STATION_KEY_ID).then_some(key))
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
        installation: None,
        voids: None,
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
    Request::AppendTxBatch {
        station: ident("s1"),
        gate: ident(gate),
        records,
        signature: hex::encode(sig),
        covers_from: None,
    }
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
