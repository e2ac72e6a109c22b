//! The ledger's canonical bytes, hash chain, gate progress and signed batches, from outside the crate.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions unwrap too

use std::collections::BTreeSet;

use afc_domain::bank::{BankRef, BankToken, Cryptogram};
use afc_domain::ledger::{
    batch_signing_bytes, batch_signing_bytes_covering, chain_hash, sign_batch, sign_batch_covering,
    verify_batch, verify_batch_covering, verify_chain, ChainError, GateProgress, Installation, LedgerEntry,
    LedgerError, LedgerHead, ParamVersions, QrRef, TacRef, TxRecord, GENESIS_HASH,
};
use afc_domain::mode::ModeBits;
use afc_domain::model::{Direction, Ident, Media, Reason, StationCode, Timestamp};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;

fn ident(s: &str) -> Ident {
    Ident::new(s).unwrap()
}

fn record(gate: &str, seq: u64) -> TxRecord {
    TxRecord {
        station: ident("xian_rd"),
        gate: ident(gate),
        gate_seq: seq,
        media: Media::Svc,
        id: 3_100_000_000_000 + seq,
        direction: Direction::Entry,
        accepted: true,
        reason: Reason::Ok,
        fare_fen: 0,
        shortfall_fen: 0,
        balance_before: Some(1_000),
        balance_after: Some(1_000),
        card_tx_counter: Some(3),
        entry_station: None,
        entry_time: None,
        occurred_at: Timestamp(1_790_000_000_000 + seq as i64 * 1_000),
        modes: ModeBits::NORMAL,
        params: ParamVersions { fare_table: 1, blacklist: 1, qr_keys: 1, gate_config: 1, mode: 1 },
        replay_unchecked: false,
        qr: None,
        installation: None,
        voids: None,
        bank: None,
        tac: None,
    }
}

prop_compose! {
    fn arb_ident()(s in "[A-Za-z0-9_-]{1,64}") -> Ident { Ident::new(&s).unwrap() }
}

prop_compose! {
    fn arb_params()(v in proptest::array::uniform5(any::<u64>())) -> ParamVersions {
        ParamVersions { fare_table: v[0], blacklist: v[1], qr_keys: v[2], gate_config: v[3], mode: v[4] }
    }
}

prop_compose! {
    fn arb_record()(
        (station, gate, gate_seq, media, id, direction) in (
            arb_ident(), arb_ident(), any::<u64>(), prop::sample::select(Media::ALL.to_vec()), any::<u64>(),
            prop::bool::ANY.prop_map(|b| if b { Direction::Entry } else { Direction::Exit }),
        ),
        (accepted, reason, fare_fen, shortfall_fen, balance_before, balance_after) in (
            any::<bool>(), prop::sample::select(Reason::ALL.to_vec()), any::<u32>(), any::<u32>(),
            any::<Option<u32>>(), any::<Option<u32>>(),
        ),
        (card_tx_counter, entry_station, entry_time, occurred_at, modes, params, replay_unchecked) in (
            any::<Option<u32>>(), any::<Option<u16>>(), any::<Option<i64>>(), any::<i64>(), any::<u16>(),
            arb_params(), any::<bool>(),
        ),
        qr in any::<Option<(u16, u64)>>(),
        (installation, voids) in (any::<Option<[u8; 16]>>(), any::<Option<u64>>()),
        (bank, tac) in (any::<Option<([u8; 32], [u8; 8], u16)>>(), any::<Option<(u64, u32, [u8; 8])>>()),
    ) -> TxRecord {
        TxRecord {
            station, gate, gate_seq, media, id, direction, accepted, reason, fare_fen, shortfall_fen,
            balance_before, balance_after, card_tx_counter,
            entry_station: entry_station.map(StationCode),
            entry_time: entry_time.map(Timestamp),
            occurred_at: Timestamp(occurred_at),
            modes: ModeBits(modes),
            params,
            replay_unchecked,
            qr: qr.map(|(issuer, nonce)| QrRef { issuer, nonce }),
            installation: installation.map(Installation),
            voids,
            bank: bank.map(|(token, cryptogram, atc)| BankRef {
                token: BankToken(token),
                cryptogram: Cryptogram(cryptogram),
                atc,
            }),
            tac: tac.map(|(psam, psam_seq, tac)| TacRef { psam, psam_seq, tac }),
        }
    }
}

proptest! {
    #[test]
    fn any_record_round_trips_exactly_through_canonical_bytes_and_json(r in arb_record()) {
        let bytes = r.canonical_bytes();
        prop_assert_eq!(TxRecord::from_canonical(&bytes), Ok(r.clone()));
        let json = serde_json::to_string(&r).unwrap();
        prop_assert_eq!(serde_json::from_str::<TxRecord>(&json).unwrap(), r);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(r) = TxRecord::from_canonical(&bytes) {
            prop_assert_eq!(r.canonical_bytes(), bytes);
        }
    }

    #[test]
    fn a_mutated_record_either_is_refused_or_decodes_to_its_exact_bytes(
        r in arb_record(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<bool>(),
    ) {
        let mut bytes = r.canonical_bytes();
        let i = at.index(bytes.len());
        if cut { bytes.truncate(i) } else { bytes[i] = byte }
        if let Ok(decoded) = TxRecord::from_canonical(&bytes) {
            prop_assert_eq!(decoded.canonical_bytes(), bytes);
        }
    }

    #[test]
    fn gate_progress_matches_a_plain_set_whatever_the_arrival_order(
        seqs in prop::collection::vec(1u64..200, 0..400),
    ) {
        let mut p = GateProgress::default();
        let mut seen = BTreeSet::new();
        for &s in &seqs {
            prop_assert_eq!(p.record(s), seen.insert(s));
        }
        let contiguous = (1..).take_while(|s| seen.contains(s)).last().unwrap_or(0);
        prop_assert_eq!(p.contiguous_through, contiguous);
        prop_assert!(p.pending.iter().all(|&s| s > contiguous + 1));
        for s in 0..210 {
            prop_assert_eq!(p.contains(s), seen.contains(&s));
        }
    }
}

#[test]
fn any_single_field_change_changes_the_hash() {
    let base = TxRecord {
        entry_station: Some(StationCode(105)),
        entry_time: Some(Timestamp(1_789_999_000_000)),
        ..record("g01", 9)
    };
    type Change = Box<dyn Fn(&mut TxRecord)>;
    let changes: Vec<Change> = vec![
        Box::new(|r| r.station = ident("xian_rd2")),
        Box::new(|r| r.gate = ident("g02")),
        Box::new(|r| r.gate_seq += 1),
        Box::new(|r| r.media = Media::Token),
        Box::new(|r| r.id += 1),
        Box::new(|r| r.direction = Direction::Exit),
        Box::new(|r| r.accepted = false),
        Box::new(|r| r.reason = Reason::OkSequenceFree),
        Box::new(|r| r.fare_fen += 1),
        Box::new(|r| r.shortfall_fen += 1),
        Box::new(|r| r.balance_before = None),
        Box::new(|r| r.balance_after = Some(999)),
        Box::new(|r| r.card_tx_counter = Some(4)),
        Box::new(|r| r.entry_station = Some(StationCode(106))),
        Box::new(|r| r.entry_time = None),
        Box::new(|r| r.occurred_at = Timestamp(r.occurred_at.0 + 1)),
        Box::new(|r| r.modes = ModeBits::FARE_FREE),
        Box::new(|r| r.params.fare_table += 1),
        Box::new(|r| r.params.blacklist += 1),
        Box::new(|r| r.params.qr_keys += 1),
        Box::new(|r| r.params.gate_config += 1),
        Box::new(|r| r.params.mode += 1),
        Box::new(|r| r.replay_unchecked = true),
        Box::new(|r| r.installation = Some(Installation([7; 16]))),
        Box::new(|r| r.voids = Some(3)),
    ];
    let mut hashes = BTreeSet::from([chain_hash(&GENESIS_HASH, &base)]);
    for (i, change) in changes.iter().enumerate() {
        let mut r = base.clone();
        change(&mut r);
        assert!(hashes.insert(chain_hash(&GENESIS_HASH, &r)), "change {i} kept a hash");
    }
    assert_ne!(chain_hash(&GENESIS_HASH, &base), chain_hash(&[1; 32], &base));
}

fn chain(n: u64) -> (Vec<LedgerEntry>, LedgerHead) {
    let mut head = LedgerHead::genesis();
    let entries = (1..=n).map(|s| head.append(record("g01", s))).collect();
    (entries, head)
}

#[test]
fn a_chain_of_a_thousand_verifies_and_a_tampered_middle_record_is_found_at_its_index() {
    let (mut entries, head) = chain(1_000);
    assert_eq!(verify_chain(GENESIS_HASH, 1, &entries), Ok(head.last_hash));

    entries[499].record.fare_fen = 1;
    assert_eq!(verify_chain(GENESIS_HASH, 1, &entries), Err(ChainError::HashMismatch { index: 500 }));

    // Re-hashing the altered entry does not help: the next one no longer follows.
    entries[499] = LedgerEntry::new(500, &entries[498].hash, entries[499].record.clone());
    assert_eq!(verify_chain(GENESIS_HASH, 1, &entries), Err(ChainError::HashMismatch { index: 501 }));
}

#[test]
fn a_gap_or_a_wrong_start_is_reported_by_position() {
    let (mut entries, _) = chain(10);
    assert_eq!(
        verify_chain(GENESIS_HASH, 2, &entries),
        Err(ChainError::IndexGap { position: 0, expected: 2, found: 1 })
    );
    entries.remove(4);
    assert_eq!(
        verify_chain(GENESIS_HASH, 1, &entries),
        Err(ChainError::IndexGap { position: 4, expected: 5, found: 6 })
    );
    assert_eq!(verify_chain([9; 32], 1, &entries[..1]), Err(ChainError::HashMismatch { index: 1 }));
}

#[test]
fn ledger_entries_round_trip_through_json_with_hex_hashes() {
    let (entries, _) = chain(3);
    let json = serde_json::to_string(&entries).unwrap();
    assert!(json.contains(&hex::encode(entries[2].hash)));
    let back: Vec<LedgerEntry> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, entries);
}

#[test]
fn forged_batches_are_refused() {
    let gate_key = SigningKey::from_bytes(&[1; 32]);
    let other_key = SigningKey::from_bytes(&[2; 32]);
    let vk = gate_key.verifying_key();
    let (st, g) = (ident("xian_rd"), ident("g01"));
    let records: Vec<_> = (1..=20).map(|s| record("g01", s)).collect();
    let sig = sign_batch(&st, &g, &records, &gate_key);
    assert_eq!(verify_batch(&st, &g, &records, &sig, &vk), Ok(()));

    let wrong_key = sign_batch(&st, &g, &records, &other_key);
    assert_eq!(verify_batch(&st, &g, &records, &wrong_key, &vk), Err(LedgerError::BadSignature));

    let mut altered = records.clone();
    altered[7].fare_fen += 100;
    assert_eq!(verify_batch(&st, &g, &altered, &sig, &vk), Err(LedgerError::BadSignature));

    assert_eq!(verify_batch(&st, &g, &records[1..], &sig, &vk), Err(LedgerError::BadSignature));

    // Signed by g01's own key, but carrying a record of g02: refused before the signature check.
    let mut smuggled = records.clone();
    smuggled.push(record("g02", 21));
    let sig = sign_batch(&st, &g, &smuggled, &gate_key);
    assert_eq!(verify_batch(&st, &g, &smuggled, &sig, &vk), Err(LedgerError::ForeignRecord { position: 20 }));

    // The same records claimed for another gate do not verify under that gate's name.
    let g2 = ident("g02");
    let sig = sign_batch(&st, &g, &records, &gate_key);
    assert_eq!(verify_batch(&st, &g2, &records, &sig, &vk), Err(LedgerError::ForeignRecord { position: 0 }));

    let zero = vec![record("g01", 0)];
    let sig = sign_batch(&st, &g, &zero, &gate_key);
    assert_eq!(verify_batch(&st, &g, &zero, &sig, &vk), Err(LedgerError::ZeroGateSeq { position: 0 }));
}

#[test]
fn batch_signing_bytes_are_domain_separated_and_frame_each_record() {
    let (st, g) = (ident("xian_rd"), ident("g01"));
    let one = batch_signing_bytes(&st, &g, &[record("g01", 1)]);
    assert!(one.starts_with(afc_domain::ledger::BATCH_SIGNING_DOMAIN));
    let empty = batch_signing_bytes(&st, &g, &[]);
    assert_ne!(one, empty);
    assert!(one.ends_with(&record("g01", 1).canonical_bytes()));
}

#[test]
fn re_sent_records_leave_the_ledger_unchanged() {
    let mut head = LedgerHead::genesis();
    let mut progress = GateProgress::default();
    let mut appended = Vec::new();
    for seq in [1, 2, 4, 2, 3, 1, 4, 5, 5] {
        appended.extend(head.append_new(&mut progress, record("g01", seq)));
    }
    let seqs: Vec<_> = appended.iter().map(|e| e.record.gate_seq).collect();
    assert_eq!(seqs, [1, 2, 4, 3, 5]);
    assert_eq!(progress.contiguous_through, 5);
    assert_eq!(verify_chain(GENESIS_HASH, 1, &appended), Ok(head.last_hash));
}

#[test]
fn a_record_without_installation_keeps_its_first_version_bytes_and_one_with_it_is_version_2() {
    let v1 = record("g01", 9);
    let bytes = v1.canonical_bytes();
    assert_eq!(bytes[0], 1);
    let v2 = TxRecord { installation: Some(Installation([0xab; 16])), ..v1.clone() };
    let b2 = v2.canonical_bytes();
    assert_eq!((b2[0], b2.len()), (2, bytes.len() + 1 + 16 + 1), "presence + 16 bytes + voids absent");
    assert_eq!(&b2[1..bytes.len()], &bytes[1..], "version 2 appends to the first version's fields");
    assert_eq!(TxRecord::from_canonical(&b2).unwrap(), v2);
    // Version 2 with neither field is the first version's record in another form: refused.
    let mut alias = bytes.clone();
    alias[0] = 2;
    alias.extend_from_slice(&[0, 0]);
    assert_eq!(TxRecord::from_canonical(&alias), Err(LedgerError::NonCanonical));
    // A version 1 record cannot carry the new fields.
    let mut trailing = bytes;
    trailing.extend_from_slice(&[1; 17]);
    assert!(matches!(TxRecord::from_canonical(&trailing), Err(LedgerError::TrailingBytes(_))));
    // JSON: the installation as 32 hex digits, absent when none.
    let json = serde_json::to_value(&v2).unwrap();
    assert_eq!(json["installation"], "abababababababababababababababab");
    assert!(serde_json::to_value(&v1).unwrap().get("installation").is_none());
    assert_eq!(Installation::parse("zz"), None);
}

#[test]
fn a_batch_naming_its_covered_range_signs_it_and_the_range_cannot_be_changed() {
    let (st, g) = (ident("xian_rd"), ident("g01"));
    let key = SigningKey::from_bytes(&[5; 32]);
    let vk = key.verifying_key();
    let records: Vec<TxRecord> = [3, 5].iter().map(|s| record("g01", *s)).collect();
    let sig = sign_batch_covering(&st, &g, Some(3), &records, &key);
    assert_eq!(verify_batch_covering(&st, &g, Some(3), &records, &sig, &vk), Ok(()));
    // Claiming more was lost (from 1) or dropping the claim does not verify.
    assert_eq!(verify_batch_covering(&st, &g, Some(1), &records, &sig, &vk), Err(LedgerError::BadSignature));
    assert_eq!(verify_batch(&st, &g, &records, &sig, &vk), Err(LedgerError::BadSignature));
    assert_ne!(
        batch_signing_bytes_covering(&st, &g, Some(3), &records),
        batch_signing_bytes(&st, &g, &records)
    );
}

#[test]
fn filling_a_covered_range_settles_it_and_returns_only_what_the_ledger_lacked() {
    let mut p = GateProgress::default();
    for s in [1, 2, 5, 7] {
        p.record(s);
    }
    // 3, 4 and 6 are missing below 8: the gaps, and the mark moves past 7.
    assert_eq!(p.fill(3, 7), vec![(3, 4), (6, 6)]);
    assert_eq!((p.contiguous_through, p.pending.len()), (7, 0));
    // Already settled: nothing.
    assert_eq!(p.fill(1, 7), vec![]);
    // A range that does not start at the contiguous edge says nothing about what is below it.
    p.record(10);
    assert_eq!(p.fill(9, 9), vec![]);
    assert_eq!(p.contiguous_through, 7);
    // From the edge: 8 and 9 are gaps, and the pending 10 joins the mark.
    assert_eq!(p.fill(8, 9), vec![(8, 9)]);
    assert_eq!(p.contiguous_through, 10);
}

#[test]
fn a_compensating_record_and_the_free_re_tap_keep_their_reasons_and_the_voided_seq_in_canonical_bytes() {
    let voided = TxRecord { installation: Some(Installation([7; 16])), ..record("g01", 41) };
    let compensating = TxRecord {
        gate_seq: 42,
        accepted: false,
        reason: Reason::PassageNotMade,
        voids: Some(voided.gate_seq),
        ..voided.clone()
    };
    let retap =
        TxRecord { gate_seq: 43, reason: Reason::OkRetapAfterFailedPassage, voids: None, ..voided.clone() };
    for r in [&compensating, &retap] {
        let bytes = r.canonical_bytes();
        assert_eq!(bytes[0], 2);
        let back = TxRecord::from_canonical(&bytes).unwrap();
        assert_eq!(&back, r);
        assert_eq!(Reason::from_code(back.reason.code()), Some(r.reason));
    }
    assert_eq!(TxRecord::from_canonical(&compensating.canonical_bytes()).unwrap().voids, Some(41));
    assert_ne!(chain_hash(&GENESIS_HASH, &compensating), chain_hash(&GENESIS_HASH, &voided));
}
