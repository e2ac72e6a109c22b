//! QR ride codes from outside the crate: hostile input, round trips, key sets and the replay cache.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions unwrap too

use afc_domain::model::{Ident, Reason, Timestamp};
use afc_domain::qr::{
    decode_text, encode_text, generate, verify, verify_text, QrError, QrIssue, QrIssuerKey, QrKeyError,
    QrKeySet, QrSkew, ReplayCache, ReplayKey, ReplaySource, QR_CODE_LEN,
};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;

const T0: i64 = 1_790_000_000_000;

fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[3; 32])
}

fn keyset() -> QrKeySet {
    QrKeySet::new(vec![QrIssuerKey {
        issuer: 100,
        key_id: 1,
        algorithm: afc_domain::qr::QrAlgorithm::Ed25519,
        public_key: signing_key().verifying_key().to_bytes().to_vec(),
        valid_from: Timestamp(0),
        valid_to: Timestamp(i64::MAX),
    }])
    .unwrap()
}

fn issue(account: u64, nonce: u64) -> QrIssue {
    QrIssue { issuer: 100, key_id: 1, account, issued_at: Timestamp(T0), valid_secs: 120, nonce }
}

proptest! {
    #[test]
    fn arbitrary_bytes_and_text_never_panic_the_verifier(
        bytes in prop::collection::vec(any::<u8>(), 0..200), text in ".{0,200}",
    ) {
        let ks = keyset();
        prop_assert!(verify(&bytes, &ks, Timestamp(T0), QrSkew::default()).is_err());
        let _ = decode_text(&text);
        let _ = verify_text(&text, &ks, Timestamp(T0), QrSkew::default());
    }

    #[test]
    fn a_generated_code_verifies_to_what_was_issued(
        account in any::<u64>(), nonce in any::<u64>(), secs in 0u32..=u32::MAX,
        valid_secs in any::<u16>(), into in 0u32..=u32::MAX,
    ) {
        let issued_at = Timestamp(i64::from(secs) * 1000);
        let issued = QrIssue { issuer: 100, key_id: 1, account, issued_at, valid_secs, nonce };
        let code = generate(&issued, &signing_key());
        let now = Timestamp(issued_at.0 + i64::from(into) % (i64::from(valid_secs) * 1000 + 1));
        let claims = verify_text(&encode_text(&code), &keyset(), now, QrSkew::NONE).unwrap();
        prop_assert_eq!((claims.account, claims.nonce, claims.issued_at), (account, nonce, issued_at));
        prop_assert_eq!(claims.expires_at.0 - claims.issued_at.0, i64::from(valid_secs) * 1000);
    }

    #[test]
    fn flipping_any_bit_of_a_code_gets_it_refused(bit in 0..QR_CODE_LEN * 8) {
        let mut code = generate(&issue(1, 1), &signing_key());
        code[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(verify(&code, &keyset(), Timestamp(T0 + 1), QrSkew::default()).is_err());
    }

    #[test]
    fn the_replay_cache_never_exceeds_its_capacity_and_never_forgets_a_live_code_early_while_not_full(
        ops in prop::collection::vec((0u64..50, 0i64..100_000, 0i64..1_000), 1..300), cap in 1usize..20,
    ) {
        let mut cache = ReplayCache::new(cap, QrSkew::NONE);
        let mut now = T0;
        for (nonce, life, step) in ops {
            now += step;
            let key = ReplayKey { issuer: 1, account: 7, nonce };
            let before = (cache.len(), cache.evictions());
            cache.insert_seen(&ReplaySource::Local, key, Timestamp(now + life), Timestamp(now));
            prop_assert!(cache.len() <= cap);
            if before.0 < cap && before.1 == cache.evictions() {
                prop_assert!(cache.contains(&key, Timestamp(now)));
            }
        }
    }
}

fn gate(n: u8) -> ReplaySource {
    ReplaySource::Gate(Ident::new(&format!("g{n:02}")).unwrap())
}

proptest! {
    #[test]
    fn a_source_within_its_share_keeps_every_live_code_whatever_the_others_insert(
        genuine in prop::collection::vec((0u64..1_000, 1i64..100_000), 0..8),
        others in prop::collection::vec((0u8..6, 0u64..1_000_000, 0i64..200_000, 0i64..50), 0..400),
        sources in 2usize..6, share in 8usize..12, own_first in any::<bool>(),
    ) {
        let mut cache = ReplayCache::with_sources(share * sources, sources, QrSkew::NONE);
        let mut now = T0;
        // The genuine source (this gate's own codes, or a relaying gate) has its slot before the
        // flood starts and never exceeds its share (8 codes at most, shares of 8 or more).
        let source = if own_first { ReplaySource::Local } else { gate(1) };
        let mut held = Vec::new();
        for (nonce, life) in genuine {
            let key = ReplayKey { issuer: 1, account: 1, nonce };
            cache.insert_seen(&source, key, Timestamp(now + life), Timestamp(now));
            held.push((key, now + life));
        }
        for (g, nonce, life, step) in others {
            now += step;
            // Other gates (and the local gate when the genuine one is a relaying gate) use other
            // accounts: every key differs from the genuine ones.
            let from = if g == 0 && !own_first { ReplaySource::Local } else { gate(g + 2) };
            cache.insert_seen(&from, ReplayKey { issuer: 1, account: 2, nonce }, Timestamp(now + life), Timestamp(now));
            prop_assert!(cache.len() <= cache.capacity());
            prop_assert!(cache.held_by(&from) <= cache.share());
        }
        for (key, forget_at) in held {
            if forget_at >= now {
                prop_assert!(cache.contains(&key, Timestamp(now)), "{key:?} was evicted by another source");
            }
        }
    }

    #[test]
    fn any_mix_of_sources_stays_within_capacity_and_a_code_kept_while_its_share_had_room_is_there(
        ops in prop::collection::vec((0u8..8, 0u64..200, 0i64..100_000, 0i64..1_000), 1..400),
        cap in 1usize..40, sources in 1usize..6,
    ) {
        let mut cache = ReplayCache::with_sources(cap, sources, QrSkew::NONE);
        let mut now = T0;
        for (g, nonce, life, step) in ops {
            now += step;
            let from = if g == 0 { ReplaySource::Local } else { gate(g) };
            let key = ReplayKey { issuer: 1, account: 7, nonce };
            let before = (cache.held_by(&from), cache.evictions(), cache.contains(&key, Timestamp(now)));
            cache.insert_seen(&from, key, Timestamp(now + life), Timestamp(now));
            prop_assert!(cache.len() <= cap);
            prop_assert!(cache.held_by(&from) <= cache.share());
            if before.1 == cache.evictions() {
                prop_assert!(cache.contains(&key, Timestamp(now)), "dropped without counting it");
            }
            if before.2 {
                prop_assert!(cache.contains(&key, Timestamp(now)), "a known code was lost");
            }
        }
    }
}

#[test]
fn five_thousand_codes_from_one_gate_leave_the_other_gates_codes_in_place() {
    let mut cache = ReplayCache::with_sources(100_000, 64, QrSkew::NONE);
    let now = Timestamp(T0);
    for g in 1..=20u8 {
        for nonce in 0..100u64 {
            let key = ReplayKey { issuer: 1, account: u64::from(g), nonce };
            assert!(cache.insert_seen(&gate(g), key, Timestamp(T0 + 60_000), now));
        }
    }
    // Gate 21 floods with codes that expire later than any real one (the old policy, soonest
    // first across all sources, would have dropped the real ones first).
    for nonce in 0..5_000u64 {
        let key = ReplayKey { issuer: 1, account: 21, nonce };
        cache.insert_seen(&gate(21), key, Timestamp(T0 + 3_600_000), now);
    }
    assert_eq!(cache.share(), 1_562);
    assert_eq!(cache.held_by(&gate(21)), 1_562);
    assert_eq!(cache.evictions(), 5_000 - 1_562);
    for g in 1..=20u8 {
        assert_eq!(cache.held_by(&gate(g)), 100);
        assert!(cache.contains(&ReplayKey { issuer: 1, account: u64::from(g), nonce: 0 }, now));
    }
}

#[test]
fn a_key_set_round_trips_through_its_json_body_and_refuses_bad_bodies() {
    let ks = keyset();
    let json = serde_json::to_string(&ks).unwrap();
    assert!(json.starts_with(r#"{"keys":[{"issuer":100,"key_id":1,"public_key":""#), "{json}");
    assert_eq!(QrKeySet::from_json(json.as_bytes()).unwrap(), ks);
    assert_eq!(serde_json::from_str::<QrKeySet>(&json).unwrap(), ks);

    let dup = format!(r#"{{"keys":[{k},{k}]}}"#, k = serde_json::to_string(&ks.keys()[0]).unwrap());
    assert_eq!(QrKeySet::from_json(dup.as_bytes()), Err(QrKeyError::Duplicate { issuer: 100, key_id: 1 }));
    assert!(serde_json::from_str::<QrKeySet>(&dup).is_err());
    let short_key = r#"{"keys":[{"issuer":1,"key_id":1,"public_key":"abcd","valid_from":0,"valid_to":1}]}"#;
    assert!(matches!(QrKeySet::from_json(short_key.as_bytes()), Err(QrKeyError::BadPublicKey { .. })));
    let odd_hex = r#"{"keys":[{"issuer":1,"key_id":1,"public_key":"abc","valid_from":0,"valid_to":1}]}"#;
    assert!(matches!(QrKeySet::from_json(odd_hex.as_bytes()), Err(QrKeyError::Json(_))));
    assert!(matches!(QrKeySet::from_json(b"\xff{"), Err(QrKeyError::Json(_))));
}

#[test]
fn lookups_find_each_key_among_many_issuers() {
    let keys: Vec<_> = (0..500u16)
        .rev()
        .map(|i| QrIssuerKey {
            issuer: i / 4,
            key_id: i % 4,
            algorithm: afc_domain::qr::QrAlgorithm::Ed25519,
            public_key: SigningKey::from_bytes(&[(i % 200) as u8 + 1; 32])
                .verifying_key()
                .to_bytes()
                .to_vec(),
            valid_from: Timestamp(0),
            valid_to: Timestamp(i64::MAX),
        })
        .collect();
    let ks = QrKeySet::new(keys).unwrap();
    assert_eq!(ks.len(), 500);
    assert_eq!(ks.get(37, 2).map(|k| (k.issuer, k.key_id)), Some((37, 2)));
    assert!(ks.get(125, 0).is_none());
    let code = generate(&QrIssue { issuer: 125, key_id: 0, ..issue(1, 1) }, &signing_key());
    let err = verify(&code, &ks, Timestamp(T0), QrSkew::NONE).unwrap_err();
    assert_eq!(err.reason(), Reason::QrUnknownKey);
}

#[test]
fn a_gate_refuses_a_replay_then_the_expired_code_for_the_right_reasons() {
    let ks = keyset();
    let skew = QrSkew::from_millis(10_000);
    let mut cache = ReplayCache::new(100_000, skew);
    let text = encode_text(&generate(&issue(88, 1), &signing_key()));
    let tap = |cache: &mut ReplayCache, now: i64| -> Result<(), Reason> {
        let claims = verify_text(&text, &ks, Timestamp(now), skew).map_err(|e| e.reason())?;
        cache.check_and_insert(&claims, Timestamp(now)).map(|_| ()).map_err(|e| e.reason())
    };
    assert_eq!(tap(&mut cache, T0 + 5_000), Ok(()));
    assert_eq!(tap(&mut cache, T0 + 6_000), Err(Reason::QrReplayed));
    assert_eq!(tap(&mut cache, T0 + 130_000), Err(Reason::QrReplayed));
    assert_eq!(tap(&mut cache, T0 + 130_001), Err(Reason::QrExpired));
}

#[test]
fn a_hundred_thousand_entry_cache_stays_at_capacity_and_counts_what_it_drops() {
    let mut cache = ReplayCache::new(100_000, QrSkew::NONE);
    let now = Timestamp(T0);
    for nonce in 0..150_000u64 {
        let key = ReplayKey { issuer: 1, account: nonce % 1_000, nonce };
        cache.insert_seen(&ReplaySource::Local, key, Timestamp(T0 + 60_000 + nonce as i64), now);
    }
    assert_eq!(cache.len(), 100_000);
    assert_eq!(cache.evictions(), 50_000);
    // The soonest-expiring were dropped; the latest are kept.
    assert!(!cache.contains(&ReplayKey { issuer: 1, account: 0, nonce: 0 }, now));
    assert!(cache.contains(&ReplayKey { issuer: 1, account: 999, nonce: 149_999 }, now));
    assert_eq!(cache.purge_expired(Timestamp(T0 + 60_000 + 150_000)), 100_000);
    assert!(cache.is_empty());
}

#[test]
fn the_text_form_rejects_padding_and_the_standard_alphabet() {
    let code = generate(&issue(1, 1), &signing_key());
    let text = encode_text(&code);
    assert_eq!(decode_text(&format!("{}==", &text[..120])).unwrap_err(), QrError::TextEncoding);
    let std_alphabet: String = text.chars().map(|c| if c == '-' { '+' } else { c }).collect();
    if std_alphabet != text {
        assert_eq!(decode_text(&std_alphabet).unwrap_err(), QrError::TextEncoding);
    }
}
