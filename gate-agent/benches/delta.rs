//! A blacklist delta at one gate (issue 10 item 4), one command:
//! `cargo bench -p gate-agent --bench delta`.
//!
//! A gate holding a 1,000,000-entry realistic blacklist (`realistic_sample(1_000_000, 42)`, active
//! and durable in its store) is offered signed deltas of 1,000 additions and 100 removals, each on
//! the version before, through the gate's real path: [`Params::offer`] (decode, signature and hash,
//! version order, delta base version, apply, durable store with `afc_sled::Durable::sync`, switch in
//! memory). Timed: the whole `offer` call, per delta; p50 and max over the run. Then the store is
//! opened again, as at start-up, and the time to the parameters in force is printed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use afc_domain::blacklist::{realistic_sample, Blacklist, BlacklistDelta};
use afc_domain::model::{ParamKind, Timestamp};
use afc_domain::package::{BlacklistBody, Package, TrustedKeys};
use ed25519_dalek::SigningKey;
use gate_agent::metrics::Metrics;
use gate_agent::params::Params;
use gate_agent::store::Store;

const DELTAS: u64 = 20;

fn fmt(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let key = SigningKey::from_bytes(&[1u8; 32]);
    let mut keys = TrustedKeys::new();
    keys.insert(1, key.verifying_key());
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/tmp".into())).unwrap();
    let open = || {
        let store = Arc::new(Store::open(&dir.path().join("store"), 1 << 30).unwrap());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::mem::forget(rx);
        Params::open(store, keys.clone(), Metrics::new(), tx).unwrap()
    };
    let params = open();
    let entries = realistic_sample(1_000_000, 42);
    let mut list = Blacklist::from_entries(1, entries.iter().copied());
    // Signed as the station does; offered, timed, as the MQTT task does once a package is whole.
    let sign = |v: u64, body: BlacklistBody| {
        Package::sign(ParamKind::Blacklist, v, Timestamp(0), body.encode(), 1, &key).encode()
    };
    let offer = |v: u64, bytes: &[u8]| {
        let t = Instant::now();
        params.offer(ParamKind::Blacklist, v, bytes, gate_agent::gate::now()).unwrap();
        t.elapsed()
    };
    let full = sign(1, BlacklistBody::Full(list.clone()));
    println!("1M list ({} B package) offered and active in {}", full.len(), fmt(offer(1, &full)));
    let mut times = Vec::new();
    for v in 2..2 + DELTAS {
        let delta = BlacklistDelta {
            from_version: v - 1,
            to_version: v,
            add: realistic_sample(1000, 100 + v),
            remove: entries.iter().skip(100 * v as usize).take(100).copied().collect(),
        };
        let pkg = sign(v, BlacklistBody::Delta(delta.clone()));
        times.push(offer(v, &pkg));
        list.apply_delta(&delta).unwrap();
    }
    let in_force = params.in_force(gate_agent::gate::now());
    assert_eq!(*in_force.blacklist, list, "the gate's list is the list with every delta applied");
    drop(in_force);
    drop(params);
    times.sort();
    println!(
        "1,000-add/100-remove delta through Params::offer (durable), {DELTAS} deltas: p50 {}  min {}  max {}",
        fmt(times[times.len() / 2]),
        fmt(times[0]),
        fmt(times[times.len() - 1])
    );
    let t = Instant::now();
    let store = Arc::new(Store::open(&dir.path().join("store"), 1 << 30).unwrap());
    let store_open = t.elapsed();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let params = Params::open(store, keys.clone(), Metrics::new(), tx).unwrap();
    let f = params.in_force(gate_agent::gate::now());
    let reopen = t.elapsed();
    assert_eq!(*f.blacklist, list);
    println!(
        "store re-opened, 1M list + {DELTAS} deltas in force in {} (of which the store's open {})",
        fmt(reopen),
        fmt(store_open)
    );
}
