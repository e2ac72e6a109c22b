//! Parameter packages end to end: a realistic blacklist signed, chunked for MQTT, reassembled out of
//! order, verified and applied; forged and tampered packages refused; every decoder fed garbage.

use std::time::Instant;

use afc_domain::blacklist::{realistic_sample, Blacklist, BlacklistDelta, Entry};
use afc_domain::model::{Media, ParamKind, Timestamp};
use afc_domain::package::{
    package_sha256, split, BlacklistBody, ChunkError, ChunkHeader, Package, PackageError, Reassembler,
    TrustedKeys, MAX_CHUNK_BYTES,
};
use afc_test_support::keys::{blacklist_package, station_key, trusted, KEY_ID};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::SeedableRng;

#[test]
fn a_million_entry_blacklist_survives_signing_chunking_and_out_of_order_reassembly() {
    let t = Instant::now();
    let entries = realistic_sample(1_000_000, 7);
    let list = Blacklist::from_entries(12, entries.iter().copied());
    let package = blacklist_package(12, &BlacklistBody::Full(list.clone())).encode();
    let built = t.elapsed();

    let mut chunks = split(&package, MAX_CHUNK_BYTES);
    assert!(chunks.len() >= 2, "a 1M list should need several chunks, got {}", chunks.len());
    assert!(chunks.iter().all(|c| c.len() <= MAX_CHUNK_BYTES));
    let announced = (package_sha256(&package), package.len(), chunks.len() as u32);
    // Retained messages arrive in any order, and a reconnect delivers some twice.
    let dup = chunks[1].clone();
    chunks.push(dup);
    chunks.shuffle(&mut rand::rngs::StdRng::seed_from_u64(3));

    let t = Instant::now();
    let mut r = Reassembler::new(announced.0, announced.1 as u64, announced.2).unwrap();
    let mut complete = false;
    for c in &chunks {
        complete = r.add(c).unwrap();
    }
    assert!(complete);
    let bytes = r.finish().unwrap();
    let verified = Package::decode_verified(&bytes, ParamKind::Blacklist, &trusted(), Some(11)).unwrap();
    let BlacklistBody::Full(got) = BlacklistBody::from_package(&verified).unwrap() else {
        panic!("expected a full list");
    };
    let received = t.elapsed();

    assert_eq!(got, list);
    assert_eq!(got.version(), 12);
    for e in entries.iter().step_by(101) {
        assert!(got.contains(e.media, e.first), "{e:?}");
        assert!(got.contains(e.media, e.last), "{e:?}");
    }
    assert!(!got.contains(Media::Svc, 1));
    assert!(!got.contains(Media::Qr, 3104_0000_0000_0000));
    println!(
        "1M blacklist package: {} bytes in {} chunks; build+sign {built:?}, reassemble+verify+decode {received:?} (debug build)",
        package.len(),
        announced.2
    );
}

#[test]
fn a_delta_package_applies_on_its_base_and_a_gap_is_refused() {
    let base = Blacklist::from_entries(3, realistic_sample(20_000, 1));
    let delta =
        BlacklistDelta { from_version: 3, to_version: 4, add: realistic_sample(1000, 99), remove: vec![] };
    let p = blacklist_package(4, &BlacklistBody::Delta(delta.clone()));
    let got = Package::decode_verified(&p.encode(), ParamKind::Blacklist, &trusted(), Some(3)).unwrap();
    let BlacklistBody::Delta(d) = BlacklistBody::from_package(&got).unwrap() else {
        panic!("expected a delta");
    };
    let mut gate = base.clone();
    gate.apply_delta(&d).unwrap();
    assert!(delta.add.iter().all(|e| gate.contains(e.media, e.first)));
    assert_eq!(gate.version(), 4);

    let mut stale = Blacklist::from_entries(2, []);
    assert_eq!(stale.apply_delta(&d).unwrap_err().code(), "blacklist_delta_gap");
    assert_eq!(stale.version(), 2);
}

#[test]
fn a_forged_body_with_a_recomputed_hash_but_the_old_signature_is_refused() {
    let good = Blacklist::from_entries(5, [Entry::single(Media::Svc, 3104_0000_0000_0001)]);
    let mut p = blacklist_package(5, &BlacklistBody::Full(good));
    let forged = BlacklistBody::Full(Blacklist::from_entries(
        5,
        [Entry { media: Media::Svc, first: 0, last: u64::MAX }],
    ));
    p.body = forged.encode();
    p.header.body_len = p.body.len() as u64;
    p.header.body_sha256 = package_sha256(&p.body);
    let bytes = p.encode();
    let decoded = Package::decode(&bytes).unwrap();
    assert_eq!(decoded.verify(&trusted()), Err(PackageError::BadSignature { key_id: KEY_ID }));
    assert_eq!(decoded.verify(&trusted()).unwrap_err().code(), "bad_signature");
}

#[test]
fn tampering_with_any_header_field_or_the_body_is_refused() {
    let p = Package::sign(
        ParamKind::FareTable,
        9,
        Timestamp(1_780_000_000_000),
        vec![7u8; 300],
        KEY_ID,
        &station_key(),
    );
    let bytes = p.encode();
    // Trust the same key under a second id, so changing the key id is a signature failure too.
    let mut keys = trusted();
    keys.insert(KEY_ID + 1, station_key().verifying_key());
    assert!(Package::decode(&bytes).unwrap().verify(&keys).is_ok());

    // (name, byte offset) of one byte in each field of the encoded package.
    let fields = [
        ("kind", 5usize),
        ("version", 13),
        ("effective_from", 21),
        ("body_len", 29),
        ("body_sha256", 40),
        ("key_id", 65),
        ("signature", 100),
        ("body", 200),
    ];
    for (field, at) in fields {
        let mut t = bytes.clone();
        t[at] ^= if field == "kind" { 0x03 } else { 0x01 };
        let refused = Package::decode(&t).and_then(|q| q.verify(&keys));
        let err = refused.expect_err(field);
        let expected = match field {
            "body_len" => "truncated",
            "body" => "hash_mismatch",
            _ => "bad_signature",
        };
        assert_eq!(err.code(), expected, "{field}: {err}");
    }

    // A body length changed in memory, with bytes to match, is still refused by the signature.
    let mut q = p.clone();
    q.body.truncate(299);
    assert_eq!(q.verify(&keys), Err(PackageError::LengthMismatch { header: 300, actual: 299 }));
    q.header.body_len = 299;
    assert_eq!(q.verify(&keys), Err(PackageError::BadSignature { key_id: KEY_ID }));
}

#[test]
fn an_older_or_equal_version_is_refused_after_verification() {
    let p = Package::sign(ParamKind::Mode, 4, Timestamp(0), b"{}".to_vec(), KEY_ID, &station_key());
    let err = Package::decode_verified(&p.encode(), ParamKind::Mode, &trusted(), Some(4)).unwrap_err();
    assert_eq!(err, PackageError::VersionNotNewer { kind: ParamKind::Mode, held: 4, offered: 4 });
    assert_eq!(err.code(), "version_not_newer");
}

#[test]
fn a_validly_signed_package_of_another_kind_is_refused() {
    let p = Package::sign(ParamKind::Mode, 9, Timestamp(0), b"{}".to_vec(), KEY_ID, &station_key());
    let err = Package::decode_verified(&p.encode(), ParamKind::GateConfig, &trusted(), None).unwrap_err();
    assert_eq!(err, PackageError::WrongKind { expected: ParamKind::GateConfig, found: ParamKind::Mode });
    assert_eq!(err.code(), "wrong_kind");
}

#[test]
fn a_missing_chunk_is_named_by_its_index() {
    let p = Package::sign(ParamKind::FareTable, 1, Timestamp(0), vec![5u8; 10_000], KEY_ID, &station_key());
    let bytes = p.encode();
    let chunks = split(&bytes, 2048);
    let mut r = Reassembler::new(package_sha256(&bytes), bytes.len() as u64, chunks.len() as u32).unwrap();
    for (i, c) in chunks.iter().enumerate() {
        if i != 3 {
            assert!(!r.add(c).unwrap());
        }
    }
    assert_eq!(r.missing(), vec![3]);
    let err = r.finish().unwrap_err();
    assert_eq!(err, ChunkError::Missing { missing: vec![3] });
    assert!(err.to_string().contains("[3]"), "{err}");
    assert_eq!(err.code(), "chunks_missing");
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = Package::decode(&bytes);
        let _ = ChunkHeader::parse(&bytes);
        let _ = BlacklistBody::decode(&bytes);
        let _ = Blacklist::decode(&bytes);
        let _ = BlacklistDelta::decode(&bytes);
        // Behind valid magics too, so the decoders get past their first check.
        let mut p = b"AFCP\x01".to_vec();
        p.extend_from_slice(&bytes);
        let _ = Package::decode(&p);
        for tag in [1u8, 2] {
            let mut b = vec![tag, if tag == 1 { b'B' } else { b'D' }, 1];
            b.extend_from_slice(&bytes);
            let _ = BlacklistBody::decode(&b);
        }
    }

    #[test]
    fn arbitrary_chunks_never_panic_the_reassembler(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8),
        len in 1u64..5000,
    ) {
        let sha = [9u8; 32];
        let count = len.div_ceil(972) as u32;
        let mut r = Reassembler::new(sha, len, count).unwrap();
        for c in &chunks {
            let _ = r.add(c);
            // The same bytes under a matching header, to get past the framing checks.
            let mut framed = ChunkHeader { index: c.first().map_or(0, |&b| u32::from(b) % (count + 1)), count, total_len: len, package_sha256: sha }.to_bytes().to_vec();
            framed.extend_from_slice(c);
            let _ = r.add(&framed);
        }
        let _ = r.missing();
        let _ = r.finish();
    }

    #[test]
    fn packages_round_trip(kind in 1u8..=5, version in any::<u64>(), at in any::<i64>(), key_id in any::<u32>(), body in prop::collection::vec(any::<u8>(), 0..300)) {
        let kind = ParamKind::from_code(kind).unwrap();
        let p = Package::sign(kind, version, Timestamp(at), body, key_id, &station_key());
        let back = Package::decode(&p.encode()).unwrap();
        prop_assert_eq!(&back, &p);
        let mut keys = TrustedKeys::new();
        keys.insert(key_id, station_key().verifying_key());
        prop_assert!(back.verify(&keys).is_ok());
    }

    #[test]
    fn split_packages_reassemble_in_any_order(len in 1usize..20_000, size in 0usize..4000, seed in any::<u64>()) {
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut chunks = split(&bytes, size);
        let count = chunks.len();
        chunks.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let mut r = Reassembler::new(package_sha256(&bytes), len as u64, count as u32).unwrap();
        for (i, c) in chunks.iter().enumerate() {
            prop_assert_eq!(r.add(c).unwrap(), i + 1 == count);
        }
        prop_assert_eq!(r.finish().unwrap(), bytes);
    }

    #[test]
    fn blacklist_bodies_round_trip(entries in prop::collection::vec((0u64..1000, 0u64..3), 0..50), version in 1u64..100) {
        let list = Blacklist::from_entries(version, entries.iter().map(|&(f, n)| Entry { media: Media::Svc, first: f, last: f + n }));
        let full = BlacklistBody::Full(list.clone());
        prop_assert_eq!(BlacklistBody::decode(&full.encode()).unwrap(), full);
        let delta = BlacklistBody::Delta(Blacklist::from_entries(version - 1, []).delta_to(&list));
        prop_assert_eq!(BlacklistBody::decode(&delta.encode()).unwrap(), delta);
    }
}
