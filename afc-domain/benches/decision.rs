//! Tap decision benchmark (SPEC §11): a stored-value exit decided against the real 100-station
//! Dalian OD table and a 1,000,000-entry blacklist of realistic (dense serial range) card numbers.
//!
//! Run: `cargo bench -p afc-domain --bench decision`. Criterion reports the mean; the target is a
//! p99, so after Criterion this binary also times 200,000 single decisions one by one and prints
//! p50 / p99 / p99.9 / max.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use afc_domain::bank::{BankRisk, Cryptogram};
use afc_domain::blacklist::{realistic_sample, Blacklist, Entry};
use afc_domain::decision::{decide, Params};
use afc_domain::mode::ModeState;
use afc_domain::model::{CardType, Date, Direction, Media, StationCode, Timestamp};
use afc_domain::network::{compile, FareRule, FareTable, NetworkDescription};
use afc_domain::qr::{self, QrIssue, QrIssuerKey, QrKeySet, QrSkew, ReplayCache};
use afc_domain::wire::{BankCard, EntryRecord, SvcCard, TapMedia, TapRequest};
use criterion::{black_box, criterion_group, Criterion};
use ed25519_dalek::SigningKey;

struct Setup {
    fares: FareTable,
    blacklist: Blacklist,
    qr_keys: QrKeySet,
    stations: Vec<StationCode>,
    now: Timestamp,
}

fn setup() -> Setup {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/data");
    let net: NetworkDescription =
        serde_json::from_slice(&std::fs::read(format!("{dir}/dalian-network.json")).unwrap()).unwrap();
    let rule: FareRule =
        serde_json::from_slice(&std::fs::read(format!("{dir}/dalian-fare-rule.json")).unwrap()).unwrap();
    let fares = compile(&net, &rule).unwrap();
    let blacklist = Blacklist::from_entries(1, realistic_sample(1_000_000, 42));
    assert!(blacklist.entry_count() >= 1_000_000);
    let stations = fares.stations().to_vec();
    assert_eq!(stations.len(), 100);
    let now = Timestamp::from_local(Date::from_ymd(2026, 11, 26).unwrap(), 12, 0, 480);
    Setup { fares, blacklist, qr_keys: QrKeySet::new(vec![]).unwrap(), stations, now }
}

/// A varied stream of exit taps: different cards (some blacklisted range hits), origins, stations.
fn taps(s: &Setup, n: usize) -> Vec<(StationCode, TapRequest)> {
    let blacklisted: Vec<u64> =
        s.blacklist.entries().filter(|e| e.media == Media::Svc).step_by(997).map(|e| e.first).collect();
    (0..n)
        .map(|i| {
            let here = s.stations[(i * 7) % s.stations.len()];
            let from = s.stations[(i * 13 + 5) % s.stations.len()];
            let card_id = if i % 10 == 0 {
                blacklisted[i % blacklisted.len()]
            } else {
                3104_0000_0000_0000 + (i as u64 * 7919)
            };
            let card = SvcCard {
                card_id,
                card_type: if i % 3 == 0 { CardType::STUDENT } else { CardType::ORDINARY },
                balance_fen: 5_000,
                expiry: Date::from_ymd(2030, 1, 1).unwrap(),
                tx_counter: i as u32,
                entry: Some(EntryRecord { station: from, time: s.now.plus_minutes(-40) }),
            };
            (here, TapRequest { direction: Direction::Exit, media: TapMedia::Svc { card } })
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let s = setup();
    let stream = taps(&s, 4096);
    let modes = ModeState::default();
    let mut replay = ReplayCache::new(1024, QrSkew::default());
    let mut bank = BankRisk::default();
    let mut i = 0usize;
    c.bench_function("decide_svc_exit_dalian_1m_blacklist", |b| {
        b.iter(|| {
            let (station, tap) = &stream[i % stream.len()];
            i += 1;
            let p = Params {
                station: *station,
                fares: &s.fares,
                blacklist: &s.blacklist,
                qr_keys: &s.qr_keys,
                qr_skew: QrSkew::default(),
                bank_taps_per_day: afc_domain::bank::DEFAULT_UNPAID_TAPS_PER_DAY,
            };
            black_box(decide(black_box(tap), &p, &modes, s.now, &mut replay, &mut bank))
        })
    });
}

fn percentiles() {
    let s = setup();
    let stream = taps(&s, 200_000);
    let modes = ModeState::default();
    let mut replay = ReplayCache::new(1024, QrSkew::default());
    let mut bank = BankRisk::default();
    let mut ns = Vec::with_capacity(stream.len());
    let mut opened = 0usize;
    for (station, tap) in &stream {
        let p = Params {
            station: *station,
            fares: &s.fares,
            blacklist: &s.blacklist,
            qr_keys: &s.qr_keys,
            qr_skew: QrSkew::default(),
            bank_taps_per_day: afc_domain::bank::DEFAULT_UNPAID_TAPS_PER_DAY,
        };
        let t0 = Instant::now();
        let d = black_box(decide(black_box(tap), &p, &modes, s.now, &mut replay, &mut bank));
        ns.push(t0.elapsed().as_nanos() as u64);
        opened += usize::from(d.accepted());
    }
    ns.sort_unstable();
    let q = |f: f64| ns[((ns.len() as f64 * f) as usize).min(ns.len() - 1)];
    println!(
        "decision latency over {} taps ({} opened): p50 {} ns, p99 {} ns, p99.9 {} ns, max {} ns; blacklist {} entries in {:.1} MB",
        ns.len(),
        opened,
        q(0.50),
        q(0.99),
        q(0.999),
        ns[ns.len() - 1],
        s.blacklist.entry_count(),
        s.blacklist.heap_bytes() as f64 / 1e6
    );
}

/// Each of `taps` decided one by one at the first station with a replay cache of `replay_capacity`:
/// the sorted nanoseconds of each decision, and how many opened.
fn time_each(s: &Setup, taps: &[TapRequest], replay_capacity: usize) -> (Vec<u64>, usize) {
    let modes = ModeState::default();
    let mut replay = ReplayCache::new(replay_capacity, QrSkew::default());
    let mut bank = BankRisk::default();
    let p = Params {
        station: s.stations[0],
        fares: &s.fares,
        blacklist: &s.blacklist,
        qr_keys: &s.qr_keys,
        qr_skew: QrSkew::default(),
        bank_taps_per_day: afc_domain::bank::DEFAULT_UNPAID_TAPS_PER_DAY,
    };
    let mut ns = Vec::with_capacity(taps.len());
    let mut opened = 0usize;
    for tap in taps {
        let t0 = Instant::now();
        let d = black_box(decide(black_box(tap), &p, &modes, s.now, &mut replay, &mut bank));
        ns.push(t0.elapsed().as_nanos() as u64);
        opened += usize::from(d.accepted());
    }
    ns.sort_unstable();
    (ns, opened)
}

/// QR ride codes cost one signature verification each (ed25519 or SM2, as the issuer key
/// declares); timed separately from stored-value taps, one run per algorithm.
fn qr_percentiles(signer: &qr::QrSigner) {
    let mut s = setup();
    s.qr_keys = QrKeySet::new(vec![QrIssuerKey {
        issuer: 1,
        key_id: 1,
        algorithm: signer.algorithm(),
        public_key: signer.public_key(),
        valid_from: Timestamp(0),
        valid_to: s.now.plus_days(365),
    }])
    .unwrap();
    let codes: Vec<TapRequest> = (0..20_000u64)
        .map(|nonce| {
            let issue = QrIssue {
                issuer: 1,
                key_id: 1,
                account: 10_000 + nonce % 5000,
                issued_at: s.now,
                valid_secs: 60,
                nonce,
            };
            let code = qr::encode_text(&qr::generate_with(&issue, signer));
            TapRequest { direction: Direction::Entry, media: TapMedia::Qr { code } }
        })
        .collect();
    let (ns, opened) = time_each(&s, &codes, 50_000);
    assert_eq!(opened, codes.len());
    let q = |f: f64| ns[((ns.len() as f64 * f) as usize).min(ns.len() - 1)];
    println!(
        "QR decision latency ({}) over {} codes: p50 {} ns, p99 {} ns, max {} ns",
        signer.algorithm().as_str(),
        ns.len(),
        q(0.50),
        q(0.99),
        ns[ns.len() - 1]
    );
}

/// Bank taps against a 1,000,000-token deny list (the blacklist's `bank` ids) beside the 1M card
/// list: one in ten tokens denied, the rest entering once each.
fn bank_percentiles() {
    let mut s = setup();
    let denied = afc_domain::bank::sample_tokens(1_000_000, 7);
    let entries: Vec<Entry> = s
        .blacklist
        .entries()
        .chain(denied.iter().map(|t| Entry::single(Media::Bank, t.deny_key())))
        .collect();
    s.blacklist = Blacklist::from_entries(2, entries);
    let fresh = afc_domain::bank::sample_tokens(200_000, 8);
    let expiry = Date::from_ymd(2030, 1, 31).unwrap();
    let taps: Vec<TapRequest> = fresh
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let token = if i % 10 == 0 { denied[i % denied.len()] } else { *t };
            let bank = BankCard { token, expiry, oda_passed: true, cryptogram: Cryptogram([1; 8]), atc: 1 };
            TapRequest { direction: Direction::Entry, media: TapMedia::Bank { bank } }
        })
        .collect();
    let (ns, opened) = time_each(&s, &taps, 1024);
    assert_eq!(opened, taps.len() - taps.len() / 10);
    let q = |f: f64| ns[((ns.len() as f64 * f) as usize).min(ns.len() - 1)];
    println!(
        "bank decision latency over {} taps ({} opened), 1M denied tokens + 1M cards: p50 {} ns, p99 {} ns, p99.9 {} ns, max {} ns",
        ns.len(),
        opened,
        q(0.50),
        q(0.99),
        q(0.999),
        ns[ns.len() - 1]
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    percentiles();
    bank_percentiles();
    qr_percentiles(&qr::QrSigner::Ed25519(SigningKey::from_bytes(&[7u8; 32])));
    qr_percentiles(&qr::QrSigner::sm2_from_bytes(&[7u8; 32]).expect("a valid SM2 scalar"));
}
