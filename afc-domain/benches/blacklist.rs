//! Blacklist figures (SPEC §11): a 1,000,000-entry realistic list (dense issuer serial ranges)
//! built, encoded, decoded, looked up, patched by a delta, signed, chunked and received.
//!
//! Run: `cargo bench -p afc-domain --bench blacklist`. Lookups are also timed one by one for p50/p99.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use afc_domain::blacklist::{realistic_sample, Blacklist, BlacklistDelta, Entry};
use afc_domain::model::{Media, ParamKind};
use afc_domain::package::{
    package_sha256, split, BlacklistBody, ChunkError, Package, Reassembler, MAX_CHUNK_BYTES,
};
use afc_test_support::keys::{blacklist_package, trusted};
use rand::seq::SliceRandom;
use rand::SeedableRng;

fn reassemble(chunks: &[Vec<u8>], sha: [u8; 32], len: usize) -> Result<Vec<u8>, ChunkError> {
    let mut r = Reassembler::new(sha, len as u64, chunks.len() as u32)?;
    for c in chunks {
        r.add(c)?;
    }
    r.finish()
}

fn lookup_percentiles(list: &Blacklist, probes: &[(Media, u64)]) {
    let mut ns: Vec<u64> = probes
        .iter()
        .map(|&(m, id)| {
            let t = Instant::now();
            std::hint::black_box(list.contains(m, std::hint::black_box(id)));
            t.elapsed().as_nanos() as u64
        })
        .collect();
    ns.sort_unstable();
    let q = |f: f64| ns[((ns.len() as f64 * f) as usize).min(ns.len() - 1)];
    println!("contains one by one: p50 {} ns, p99 {} ns, max {} ns", q(0.5), q(0.99), ns[ns.len() - 1]);
}

fn main() {
    let entries = realistic_sample(1_000_000, 7);
    let t = Instant::now();
    let list = Blacklist::from_entries(1, entries.iter().copied());
    let build = t.elapsed();
    let t = Instant::now();
    let encoded = list.encode();
    let encode = t.elapsed();
    let t = Instant::now();
    let decoded = Blacklist::decode(&encoded).unwrap();
    let decode = t.elapsed();
    assert_eq!(decoded, list);

    // Lookups: half hits (ids on the list), half misses (random ids in the same issuer pools).
    let mut probes: Vec<(Media, u64)> = entries.iter().step_by(7).map(|e| (e.media, e.first)).collect();
    probes.extend(realistic_sample(probes.len(), 8).iter().map(|e| (e.media, e.first + 1)));
    probes.shuffle(&mut rand::rngs::StdRng::seed_from_u64(1));
    let t = Instant::now();
    let mut hits = 0usize;
    for _ in 0..5 {
        for &(m, id) in &probes {
            hits += usize::from(list.contains(m, std::hint::black_box(id)));
        }
    }
    let per_lookup = t.elapsed().as_nanos() as f64 / (5 * probes.len()) as f64;
    lookup_percentiles(&list, &probes);

    let delta = BlacklistDelta {
        from_version: 1,
        to_version: 2,
        add: realistic_sample(1000, 11),
        remove: entries.iter().take(100).copied().collect(),
    };
    let mut applied = list.clone();
    let t = Instant::now();
    applied.apply_delta(&delta).unwrap();
    let apply = t.elapsed();
    let t = Instant::now();
    let built = list.with_delta(&delta).unwrap();
    let with_delta = t.elapsed();
    assert_eq!(built, applied);

    let t = Instant::now();
    let p = blacklist_package(1, &BlacklistBody::Full(list.clone())).encode();
    let sign = t.elapsed();
    let chunks = split(&p, MAX_CHUNK_BYTES);
    let t = Instant::now();
    let bytes = reassemble(&chunks, package_sha256(&p), p.len()).unwrap();
    let pkg = Package::decode_verified(&bytes, ParamKind::Blacklist, &trusted(), None).unwrap();
    let _ = BlacklistBody::from_package(&pkg).unwrap();
    let receive = t.elapsed();

    println!("items {} ids {} heap {} B", list.item_count(), list.entry_count(), list.heap_bytes());
    println!("encoded {} B = {:.2} B/entry", encoded.len(), encoded.len() as f64 / 1e6);
    println!("from_entries {build:?}, encode {encode:?}, decode {decode:?}");
    println!("contains: {per_lookup:.0} ns/lookup mean over {} lookups ({hits} hits)", 5 * probes.len());
    println!(
        "apply 1,000-add/100-remove delta: {apply:?} in place; {with_delta:?} as a new list beside the old"
    );
    println!(
        "package {} B, {} chunks; encode+sign {sign:?}; reassemble+verify+decode {receive:?}",
        p.len(),
        chunks.len()
    );

    deny_list();
}

/// The deny list: 1,000,000 denied bank tokens as the blacklist's `bank` ids (8-byte keys of
/// random 32-byte tokens, so nothing compresses into ranges), alone and beside the 1M card list.
fn deny_list() {
    let tokens = afc_domain::bank::sample_tokens(1_000_000, 9);
    let bank: Vec<Entry> = tokens.iter().map(|t| Entry::single(Media::Bank, t.deny_key())).collect();
    let t = Instant::now();
    let list = Blacklist::from_entries(1, bank.iter().copied());
    let build = t.elapsed();
    let encoded = list.encode();
    let t = Instant::now();
    let decoded = Blacklist::decode(&encoded).unwrap();
    let decode = t.elapsed();
    assert_eq!(decoded, list);
    let probes: Vec<u64> = tokens
        .iter()
        .step_by(5)
        .map(|t| t.deny_key())
        .chain(afc_domain::bank::sample_tokens(200_000, 10).iter().map(|t| t.deny_key()))
        .collect();
    let mut ns = Vec::with_capacity(probes.len());
    let mut hits = 0usize;
    for &k in &probes {
        let t0 = Instant::now();
        hits += usize::from(list.contains(Media::Bank, std::hint::black_box(k)));
        ns.push(t0.elapsed().as_nanos() as u64);
    }
    ns.sort_unstable();
    let q = |f: f64| ns[((ns.len() as f64 * f) as usize).min(ns.len() - 1)];
    let p = blacklist_package(1, &BlacklistBody::Full(list.clone())).encode();
    let chunks = split(&p, MAX_CHUNK_BYTES);
    let delta = BlacklistDelta {
        from_version: 1,
        to_version: 2,
        add: afc_domain::bank::sample_tokens(1000, 11)
            .iter()
            .map(|t| Entry::single(Media::Bank, t.deny_key()))
            .collect(),
        remove: bank.iter().take(100).copied().collect(),
    };
    let mut applied = list.clone();
    let t = Instant::now();
    applied.apply_delta(&delta).unwrap();
    let apply = t.elapsed();
    let both =
        Blacklist::from_entries(1, realistic_sample(1_000_000, 7).into_iter().chain(bank.iter().copied()));
    println!(
        "deny list 1M tokens: heap {} B ({:.2} B/token), encoded {} B, package {} B in {} chunks; from_entries {build:?}, decode {decode:?}",
        list.heap_bytes(),
        list.heap_bytes() as f64 / 1e6,
        encoded.len(),
        p.len(),
        chunks.len()
    );
    println!(
        "deny list contains ({hits} hits of {}): p50 {} ns, p99 {} ns, max {} ns; 1,000-add/100-remove delta in place {apply:?}",
        probes.len(),
        q(0.5),
        q(0.99),
        ns[ns.len() - 1]
    );
    println!("1M cards + 1M denied tokens in one list: heap {} B", both.heap_bytes());
}
