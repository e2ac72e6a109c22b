//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use afc_domain::ledger::{ParamVersions, TxRecord};
use afc_domain::mode::ModeBits;
use afc_domain::model::{Direction, Ident, Media, Reason, Timestamp};
use afc_domain::signed::{self, SignedError, GATE_KEY_ID};
use afc_domain::wire::WireMessage;
use controller::chain::sign_batch;
use controller::state::{Request, Response};
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
        bank: None,
        tac: None,
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
        records: records.into_iter().map(afc_domain::ledger::CanonicalRecord::from).collect(),
        signature: hex::encode(sig),
        covers_from: None,
    }
}

/// `record` of installation `[inst; 16]`.
pub fn installed_record(gate: &str, inst: u8, seq: u64) -> TxRecord {
    TxRecord { installation: Some(afc_domain::ledger::Installation([inst; 16])), ..record("s1", gate, seq) }
}

/// A signed batch of `records` from `gate` at station `s1` claiming to cover every number from
/// `covers_from` on (what it does not carry is a gap).
pub fn covering_batch(
    gate: &str,
    key: &SigningKey,
    records: Vec<TxRecord>,
    covers_from: Option<u64>,
) -> Request {
    let sig = controller::chain::sign_batch_covering(&ident("s1"), &ident(gate), covers_from, &records, key);
    Request::AppendTxBatch {
        station: ident("s1"),
        gate: ident(gate),
        records: records.into_iter().map(afc_domain::ledger::CanonicalRecord::from).collect(),
        signature: hex::encode(sig),
        covers_from,
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

/// How long [`write_via_any`] keeps trying the nodes before giving up.
#[derive(Clone, Copy, Debug)]
pub enum Retry {
    /// This many attempts per node, 20 ms apart.
    Rounds(usize),
    /// Until this much time has passed, 20 ms between attempts.
    For(Duration),
}

/// Sends `req` through `/admin/write` to the nodes in turn, from `addrs[start % len]`, until one
/// acknowledges it (resending is safe: dedup) or `retry` is used up.
pub async fn write_via_any(
    http: &reqwest::Client,
    addrs: &[String],
    start: usize,
    req: &Request,
    retry: Retry,
) -> Option<Response> {
    let deadline = match retry {
        Retry::For(d) => Some(Instant::now() + d),
        Retry::Rounds(_) => None,
    };
    let mut k = 0;
    loop {
        if let Retry::Rounds(rounds) = retry {
            if k >= addrs.len() * rounds {
                return None;
            }
        }
        let addr = &addrs[(start + k) % addrs.len()];
        k += 1;
        let r = http
            .post(format!("http://{addr}/admin/write"))
            .header("x-afc-cluster-secret", crate::harness::SECRET)
            .json(req)
            .timeout(Duration::from_secs(12))
            .send()
            .await;
        if let Ok(r) = r {
            if r.status().is_success() {
                // `Rounds` takes the first success's body as the answer, `For` retries a bad one.
                match (r.json().await, retry) {
                    (Ok(resp), _) => return Some(resp),
                    (Err(_), Retry::Rounds(_)) => return None,
                    (Err(_), Retry::For(_)) => {}
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One writer task per gate (gate `gates[i]` signs with `gate_key(i + 1)` and must be registered),
/// each appending batches of 10 records (seq 1..) through any node ([`write_via_any`]) until
/// stopped; a batch not acknowledged within `retry` fails the test.
pub struct GateWriters {
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<(String, u64)>>,
}

impl GateWriters {
    pub fn start(http: &reqwest::Client, addrs: &[String], gates: &[&str], retry: Retry) -> GateWriters {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for (i, g) in gates.iter().enumerate() {
            let (http, addrs, stop, acks) = (http.clone(), addrs.to_vec(), stop.clone(), acks.clone());
            let g = g.to_string();
            tasks.push(tokio::spawn(async move {
                let key = gate_key(i as u8 + 1);
                let (mut acked_through, mut next) = (0u64, 1u64);
                while !stop.load(Ordering::Relaxed) {
                    let req = batch(&g, &key, next..next + 10);
                    match write_via_any(&http, &addrs, i + next as usize, &req, retry).await {
                        Some(Response::Appended { through_seq, .. }) => {
                            acked_through = through_seq;
                            next += 10;
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            panic!("batch of {g} from {next} not acknowledged within {retry:?}: {other:?}")
                        }
                    }
                }
                (g, acked_through)
            }));
        }
        GateWriters { stop, acks, tasks }
    }

    /// Batches acknowledged so far, all gates together.
    pub fn acks(&self) -> u64 {
        self.acks.load(Ordering::Relaxed)
    }

    /// The shared counter behind [`GateWriters::acks`], for a task watching it.
    pub fn ack_counter(&self) -> Arc<AtomicU64> {
        self.acks.clone()
    }

    /// Stops the writers after their batch in flight; per gate the seq acknowledged through.
    pub async fn stop(self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        let mut acked = BTreeMap::new();
        for t in self.tasks {
            let (g, through) = t.await.unwrap();
            acked.insert(g, through);
        }
        acked
    }
}
