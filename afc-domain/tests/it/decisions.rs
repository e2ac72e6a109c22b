//! Tap decisions, rule by rule and mode bit by mode bit (SPEC §2–3).
//!
//! The test network is one line A(101) – B(102) – C(103) – D(104) with 3, 4 and 10 km between
//! neighbours. Bands: ≤ 6 km 2.00, ≤ 12 km 3.00, ≤ 18 km 4.00, then +1.00 per 15 km started.
//! Ordinary cards pay 80 %, students 50 %, elderly_free 0 %; staff cards are not accepted.
//! Full fares from A: A 2.00 (minimum), B 2.00 (3 km), C 3.00 (7 km), D 4.00 (17 km).

use std::collections::BTreeMap;

use afc_domain::bank::{BankRisk, BankToken, Cryptogram};
use afc_domain::blacklist::{Blacklist, Entry};
use afc_domain::decision::{decide, Decision, Params};
use afc_domain::mode::{ModeBits, ModeState};
use afc_domain::model::{BusinessDayRule, CardType, Date, Direction, Media, Reason, StationCode, Timestamp};
use afc_domain::network::{compile, Band, FareError, FareRule, FareTable, Increment, NetworkDescription};
use afc_domain::qr::{self, QrIssue, QrIssuerKey, QrKeySet, QrSkew, ReplayCache};
use afc_domain::wire::{BankCard, DecisionKind, EntryRecord, SvcCard, TapMedia, TapRequest, TokenCard};
use ed25519_dalek::SigningKey;

const A: StationCode = StationCode(101);
const B: StationCode = StationCode(102);
const C: StationCode = StationCode(103);
const D: StationCode = StationCode(104);
const BLACKLISTED_CARD: u64 = 3104_0000_0000_0666;
const BLACKLISTED_ACCOUNT: u64 = 77;
const DENIED_TOKEN: BankToken = BankToken([0xde; 32]);

fn network() -> NetworkDescription {
    afc_test_support::network::sample()
}

fn rule(max_ride_minutes: Option<u32>, overstay_surcharge_fen: u32) -> FareRule {
    FareRule {
        name: "test".into(),
        bands: vec![
            Band { up_to_m: 6000, fare_fen: 200 },
            Band { up_to_m: 12_000, fare_fen: 300 },
            Band { up_to_m: 18_000, fare_fen: 400 },
        ],
        beyond: Some(Increment { fen: 100, per_m: 15_000 }),
        min_fare_fen: 200,
        discounts: BTreeMap::from([
            (CardType::ORDINARY, 80),
            (CardType::STUDENT, 50),
            (CardType::ELDERLY_FREE, 0),
        ]),
        token_percent: 100,
        max_ride_minutes,
        overstay_surcharge_fen,
        business_day: BusinessDayRule::default(),
        card_type_names: Default::default(),
    }
}

/// A gate's world: fare table, blacklist, QR keys, modes, clock and replay cache.
struct World {
    station: StationCode,
    fares: FareTable,
    blacklist: Blacklist,
    qr_keys: QrKeySet,
    qr_key: SigningKey,
    modes: ModeState,
    now: Timestamp,
    replay: ReplayCache,
    bank: BankRisk,
}

impl World {
    fn at(station: StationCode) -> World {
        World::with_rule(station, rule(None, 0))
    }

    fn with_rule(station: StationCode, rule: FareRule) -> World {
        let qr_key = SigningKey::from_bytes(&[7u8; 32]);
        let qr_keys = QrKeySet::new(vec![QrIssuerKey {
            issuer: 1,
            key_id: 1,
            algorithm: afc_domain::qr::QrAlgorithm::Ed25519,
            public_key: qr_key.verifying_key().to_bytes().to_vec(),
            valid_from: Timestamp(0),
            valid_to: Timestamp::from_secs(4_000_000_000),
        }])
        .unwrap();
        let blacklist = Blacklist::from_entries(
            1,
            [
                Entry { media: Media::Svc, first: BLACKLISTED_CARD, last: BLACKLISTED_CARD },
                Entry { media: Media::Qr, first: BLACKLISTED_ACCOUNT, last: BLACKLISTED_ACCOUNT },
                Entry { media: Media::Token, first: 900, last: 999 },
                Entry::single(Media::Bank, DENIED_TOKEN.deny_key()),
            ],
        );
        World {
            station,
            fares: compile(&network(), &rule).unwrap(),
            blacklist,
            qr_keys,
            qr_key,
            modes: ModeState::default(),
            now: noon(),
            replay: ReplayCache::new(1000, QrSkew::default()),
            bank: BankRisk::default(),
        }
    }

    fn mode(mut self, bits: ModeBits) -> World {
        self.modes.set(self.station, bits, self.now.plus_minutes(-1));
        self
    }

    fn tap(&mut self, direction: Direction, media: TapMedia) -> Decision {
        let params = Params {
            station: self.station,
            fares: &self.fares,
            blacklist: &self.blacklist,
            qr_keys: &self.qr_keys,
            qr_skew: QrSkew::default(),
            bank_taps_per_day: afc_domain::bank::DEFAULT_UNPAID_TAPS_PER_DAY,
        };
        decide(
            &TapRequest { direction, media },
            &params,
            &self.modes,
            self.now,
            &mut self.replay,
            &mut self.bank,
        )
    }

    fn svc(&mut self, direction: Direction, card: SvcCard) -> Decision {
        self.tap(direction, TapMedia::Svc { card })
    }

    fn qr_code(&self, account: u64, nonce: u64) -> String {
        let issue = QrIssue {
            issuer: 1,
            key_id: 1,
            account,
            issued_at: self.now.plus_minutes(-1),
            valid_secs: 300,
            nonce,
        };
        qr::encode_text(&qr::generate(&issue, &self.qr_key))
    }
}

fn today() -> Date {
    Date::from_ymd(2026, 11, 26).unwrap()
}

fn noon() -> Timestamp {
    Timestamp::from_local(today(), 12, 0, 480)
}

fn card(card_type: CardType, balance_fen: u32, entry: Option<(StationCode, i64)>) -> SvcCard {
    let entry = entry.map(|(station, minutes_ago)| (station, noon().plus_minutes(-minutes_ago)));
    afc_test_support::cards::svc(3104_0000_0000_0001, card_type, balance_fen, entry)
}

fn token(origin: StationCode, paid_fen: u32, entry: Option<StationCode>) -> TokenCard {
    TokenCard {
        token_id: 5001,
        origin,
        paid_fen,
        sold_on: today(),
        entry: entry.map(|station| EntryRecord { station, time: noon().plus_minutes(-20) }),
    }
}

fn assert_decision(
    d: &Decision,
    kind: DecisionKind,
    reason: Reason,
    fare_fen: u32,
    balance_after: Option<u32>,
) {
    assert_eq!((d.kind, d.reason), (kind, reason), "{d:?}");
    assert_eq!(d.fare_fen, fare_fen, "fare of {d:?}");
    assert_eq!(d.balance_after, balance_after, "balance after {d:?}");
}

use DecisionKind::{OpenEntry, OpenExit, Reject};
use Direction::{Entry as In, Exit as Out};

struct SvcCase {
    name: &'static str,
    at: StationCode,
    bits: ModeBits,
    direction: Direction,
    card: SvcCard,
    expect: (DecisionKind, Reason, u32, Option<u32>),
}

fn svc_cases() -> Vec<SvcCase> {
    let none = ModeBits::NORMAL;
    let c = |name, at, bits, direction, card, expect| SvcCase { name, at, bits, direction, card, expect };
    vec![
        c(
            "a valid entry opens and writes the entry",
            A,
            none,
            In,
            card(CardType::ORDINARY, 1000, None),
            (OpenEntry, Reason::Ok, 0, Some(1000)),
        ),
        c(
            "a blacklisted card is refused at entry",
            A,
            none,
            In,
            SvcCard { card_id: BLACKLISTED_CARD, ..card(CardType::ORDINARY, 1000, None) },
            (Reject, Reason::Blacklisted, 0, None),
        ),
        c(
            "a blacklisted card is refused at exit",
            D,
            none,
            Out,
            SvcCard { card_id: BLACKLISTED_CARD, ..card(CardType::ORDINARY, 1000, Some((A, 30))) },
            (Reject, Reason::Blacklisted, 0, None),
        ),
        c(
            "an expired card is refused at entry",
            A,
            none,
            In,
            SvcCard { expiry: today().plus_days(-1), ..card(CardType::ORDINARY, 1000, None) },
            (Reject, Reason::CardExpired, 0, None),
        ),
        c(
            "a card expiring today is still valid",
            A,
            none,
            In,
            SvcCard { expiry: today(), ..card(CardType::ORDINARY, 1000, None) },
            (OpenEntry, Reason::Ok, 0, Some(1000)),
        ),
        c(
            "date_free lets an expired card in",
            A,
            ModeBits::DATE_FREE,
            In,
            SvcCard { expiry: today().plus_days(-30), ..card(CardType::ORDINARY, 1000, None) },
            (OpenEntry, Reason::Ok, 0, Some(1000)),
        ),
        c(
            "an open entry is refused (anti-passback)",
            A,
            none,
            In,
            card(CardType::ORDINARY, 1000, Some((B, 30))),
            (Reject, Reason::EntryExists, 0, None),
        ),
        c(
            "sequence_free accepts an entry over an open entry",
            A,
            ModeBits::SEQUENCE_FREE,
            In,
            card(CardType::ORDINARY, 1000, Some((B, 30))),
            (OpenEntry, Reason::OkSequenceFree, 0, Some(1000)),
        ),
        c(
            "a balance below the discounted minimum fare is refused at entry",
            A,
            none,
            In,
            card(CardType::ORDINARY, 159, None),
            (Reject, Reason::InsufficientBalance, 160, None),
        ),
        c(
            "a balance equal to the discounted minimum fare enters",
            A,
            none,
            In,
            card(CardType::ORDINARY, 160, None),
            (OpenEntry, Reason::Ok, 0, Some(160)),
        ),
        c(
            "fare_free lets a low balance in",
            A,
            ModeBits::FARE_FREE,
            In,
            card(CardType::ORDINARY, 0, None),
            (OpenEntry, Reason::Ok, 0, Some(0)),
        ),
        c(
            "a card type the fare rule does not list is refused",
            A,
            none,
            In,
            card(CardType::STAFF, 1000, None),
            (Reject, Reason::CardTypeNotAccepted, 0, None),
        ),
        c(
            "an elderly_free card enters with no balance",
            A,
            none,
            In,
            card(CardType::ELDERLY_FREE, 0, None),
            (OpenEntry, Reason::Ok, 0, Some(0)),
        ),
        c(
            "an ordinary card pays 80 percent of the OD fare",
            D,
            none,
            Out,
            card(CardType::ORDINARY, 1000, Some((A, 30))),
            (OpenExit, Reason::Ok, 320, Some(680)),
        ),
        c(
            "a student card pays 50 percent of the OD fare",
            C,
            none,
            Out,
            card(CardType::STUDENT, 1000, Some((A, 30))),
            (OpenExit, Reason::Ok, 150, Some(850)),
        ),
        c(
            "an elderly_free card pays nothing",
            D,
            none,
            Out,
            card(CardType::ELDERLY_FREE, 0, Some((A, 30))),
            (OpenExit, Reason::Ok, 0, Some(0)),
        ),
        c(
            "a same-station exit pays the discounted minimum fare",
            A,
            none,
            Out,
            card(CardType::ORDINARY, 1000, Some((A, 5))),
            (OpenExit, Reason::Ok, 160, Some(840)),
        ),
        c(
            "an exit without entry is refused",
            D,
            none,
            Out,
            card(CardType::ORDINARY, 1000, None),
            (Reject, Reason::NoEntry, 0, None),
        ),
        c(
            "sequence_free prices an exit without entry at the minimum fare",
            D,
            ModeBits::SEQUENCE_FREE,
            Out,
            card(CardType::ORDINARY, 1000, None),
            (OpenExit, Reason::OkSequenceFree, 160, Some(840)),
        ),
        c(
            "insufficient balance at exit is refused with the fare due",
            D,
            none,
            Out,
            card(CardType::ORDINARY, 319, Some((A, 30))),
            (Reject, Reason::InsufficientBalance, 320, None),
        ),
        c(
            "fare_free charges what the card holds and records the shortfall",
            D,
            ModeBits::FARE_FREE,
            Out,
            card(CardType::ORDINARY, 100, Some((A, 30))),
            (OpenExit, Reason::OkFareShortfall, 100, Some(0)),
        ),
        c(
            "train_disruption makes the exit free",
            D,
            ModeBits::TRAIN_DISRUPTION,
            Out,
            card(CardType::ORDINARY, 1000, Some((A, 30))),
            (OpenExit, Reason::OkTrainDisruption, 0, Some(1000)),
        ),
        c(
            "train_disruption lets an exit without entry out free",
            D,
            ModeBits::TRAIN_DISRUPTION,
            Out,
            card(CardType::ORDINARY, 0, None),
            (OpenExit, Reason::OkTrainDisruption, 0, Some(0)),
        ),
        c(
            "closed refuses every tap",
            A,
            ModeBits::CLOSED,
            In,
            card(CardType::ORDINARY, 1000, None),
            (Reject, Reason::StationClosed, 0, None),
        ),
        c(
            "closed refuses exits too",
            D,
            ModeBits::CLOSED,
            Out,
            card(CardType::ORDINARY, 1000, Some((A, 30))),
            (Reject, Reason::StationClosed, 0, None),
        ),
        c(
            "emergency_release opens without card processing",
            A,
            ModeBits::EMERGENCY_RELEASE,
            In,
            card(CardType::ORDINARY, 0, Some((B, 30))),
            (OpenEntry, Reason::OkEmergencyRelease, 0, None),
        ),
        c(
            "emergency_release wins over closed",
            D,
            ModeBits::EMERGENCY_RELEASE.with(ModeBits::CLOSED),
            Out,
            card(CardType::ORDINARY, 0, None),
            (OpenExit, Reason::OkEmergencyRelease, 0, None),
        ),
        c(
            "entry_free opens entry without processing",
            A,
            ModeBits::ENTRY_FREE,
            In,
            SvcCard { card_id: BLACKLISTED_CARD, ..card(CardType::ORDINARY, 0, None) },
            (OpenEntry, Reason::OkEntryFree, 0, None),
        ),
        c(
            "fare_free with sequence_free lets an exit without entry and no money out",
            D,
            ModeBits::FARE_FREE.with(ModeBits::SEQUENCE_FREE),
            Out,
            card(CardType::ORDINARY, 50, None),
            (OpenExit, Reason::OkFareShortfall, 50, Some(0)),
        ),
        c(
            "train_disruption with closed is still closed",
            D,
            ModeBits::TRAIN_DISRUPTION.with(ModeBits::CLOSED),
            Out,
            card(CardType::ORDINARY, 1000, Some((A, 30))),
            (Reject, Reason::StationClosed, 0, None),
        ),
        c(
            "hours_24 alone changes nothing for a card",
            D,
            ModeBits::HOURS_24,
            Out,
            card(CardType::ORDINARY, 1000, Some((A, 30))),
            (OpenExit, Reason::Ok, 320, Some(680)),
        ),
        c(
            "time_free alone changes nothing without a ride limit",
            D,
            ModeBits::TIME_FREE,
            Out,
            card(CardType::ORDINARY, 1000, Some((A, 600))),
            (OpenExit, Reason::Ok, 320, Some(680)),
        ),
    ]
}

#[test]
fn every_stored_value_rule_and_mode_bit_decides_as_specified() {
    for case in svc_cases() {
        let mut w = World::at(case.at).mode(case.bits);
        let d = w.svc(case.direction, case.card.clone());
        let (kind, reason, fare, balance) = case.expect;
        assert_eq!(
            (d.kind, d.reason, d.fare_fen, d.balance_after),
            (kind, reason, fare, balance),
            "case: {}",
            case.name
        );
        if d.accepted() && d.reason != Reason::OkEmergencyRelease && d.reason != Reason::OkEntryFree {
            let write = d.card_write.as_ref().unwrap_or_else(|| panic!("case {}: no card write", case.name));
            assert_eq!(write.tx_counter, case.card.tx_counter + 1, "case: {}", case.name);
            assert_eq!(Some(write.balance_fen), d.balance_after, "case: {}", case.name);
            match case.direction {
                In => assert_eq!(
                    write.entry,
                    Some(EntryRecord { station: case.at, time: w.now }),
                    "case: {}",
                    case.name
                ),
                Out => assert_eq!(write.entry, None, "case: {}", case.name),
            }
        } else {
            assert_eq!(d.card_write, None, "case: {}", case.name);
        }
    }
}

#[test]
fn an_overstay_adds_the_surcharge_unless_time_free() {
    let mut w = World::with_rule(D, rule(Some(120), 300));
    let within = w.svc(Out, card(CardType::ORDINARY, 1000, Some((A, 120))));
    assert_decision(&within, OpenExit, Reason::Ok, 320, Some(680));
    // 121 minutes is within the limit plus the clock tolerance (30 s by default): 122 is over.
    let over = w.svc(Out, card(CardType::ORDINARY, 1000, Some((A, 122))));
    assert_decision(&over, OpenExit, Reason::Ok, 620, Some(380));
    let mut free = World::with_rule(D, rule(Some(120), 300)).mode(ModeBits::TIME_FREE);
    let waived = free.svc(Out, card(CardType::ORDINARY, 1000, Some((A, 500))));
    assert_decision(&waived, OpenExit, Reason::Ok, 320, Some(680));
}

#[test]
fn an_open_entry_left_at_a_station_under_emergency_release_is_accepted_anywhere_for_seven_days() {
    let entered = noon().plus_days(-3);
    let mut w = World::at(C);
    w.modes.set(A, ModeBits::EMERGENCY_RELEASE, entered.plus_minutes(5));
    w.modes.set(A, ModeBits::NORMAL, entered.plus_minutes(90));
    let stale = SvcCard {
        entry: Some(EntryRecord { station: A, time: entered }),
        ..card(CardType::ORDINARY, 1000, None)
    };
    let d = w.svc(In, stale.clone());
    assert_decision(&d, OpenEntry, Reason::OkEmergencyGrace, 0, Some(1000));
    assert_eq!(d.card_write.unwrap().entry.unwrap().station, C);

    w.now = entered.plus_days(8);
    let late = w.svc(In, stale);
    assert_eq!(late.reason, Reason::EntryExists);

    let mut no_emergency = World::at(C);
    let entered_before_release = SvcCard {
        entry: Some(EntryRecord { station: B, time: entered }),
        ..card(CardType::ORDINARY, 1000, None)
    };
    assert_eq!(no_emergency.svc(In, entered_before_release).reason, Reason::EntryExists);
}

#[test]
fn an_exit_without_entry_after_entry_free_elsewhere_is_priced_from_that_station() {
    let mut w = World::at(D);
    w.modes.set(B, ModeBits::ENTRY_FREE, noon().plus_minutes(-60));
    let d = w.svc(Out, card(CardType::ORDINARY, 1000, None));
    // B to D is 14 km: 4.00 full, 3.20 at 80 %.
    assert_decision(&d, OpenExit, Reason::OkEntryFreeExit, 320, Some(680));
    assert_eq!(d.entry.unwrap().station, B);

    let mut two = World::at(D);
    two.modes.set(A, ModeBits::ENTRY_FREE, noon().plus_minutes(-60));
    two.modes.set(C, ModeBits::ENTRY_FREE, noon().plus_minutes(-60));
    let cheapest = two.svc(Out, card(CardType::ORDINARY, 1000, None));
    assert_eq!(
        (cheapest.entry.unwrap().station, cheapest.fare_fen),
        (C, 240),
        "C to D (10 km) is cheaper than A to D"
    );

    let mut long_ago = World::at(D);
    long_ago.modes.set(B, ModeBits::ENTRY_FREE, noon().plus_days(-3));
    long_ago.modes.set(B, ModeBits::NORMAL, noon().plus_days(-3).plus_minutes(60));
    assert_eq!(long_ago.svc(Out, card(CardType::ORDINARY, 1000, None)).reason, Reason::NoEntry);
}

#[test]
fn an_entry_record_from_a_station_the_table_does_not_know_is_refused() {
    let mut w = World::at(D);
    let d = w.svc(Out, card(CardType::ORDINARY, 1000, Some((StationCode(999), 10))));
    assert_eq!(d.reason, Reason::UnknownStation);
}

#[test]
fn a_card_whose_counter_would_wrap_is_sent_to_the_desk() {
    let mut w = World::at(A);
    let d = w.svc(In, SvcCard { tx_counter: u32::MAX, ..card(CardType::ORDINARY, 1000, None) });
    assert_eq!(d.reason, Reason::CardInvalid);
}

#[test]
fn a_valid_qr_code_opens_once_and_its_replay_is_refused() {
    let mut w = World::at(A);
    let code = w.qr_code(42, 1);
    let first = w.tap(In, TapMedia::Qr { code: code.clone() });
    assert_decision(&first, OpenEntry, Reason::Ok, 0, None);
    assert_eq!((first.media, first.id), (Media::Qr, 42));
    assert!(first.qr.is_some());
    let again = w.tap(In, TapMedia::Qr { code });
    assert_eq!((again.kind, again.reason), (Reject, Reason::QrReplayed));
    let fresh = w.qr_code(42, 2);
    assert_eq!(w.tap(Out, TapMedia::Qr { code: fresh }).kind, OpenExit);
}

#[test]
fn bad_qr_codes_are_refused_with_their_reason() {
    let mut w = World::at(A);
    assert_eq!(w.tap(In, TapMedia::Qr { code: "not a code".into() }).reason, Reason::QrMalformed);
    let blacklisted = w.qr_code(BLACKLISTED_ACCOUNT, 9);
    assert_eq!(w.tap(In, TapMedia::Qr { code: blacklisted }).reason, Reason::Blacklisted);

    let forger = SigningKey::from_bytes(&[9u8; 32]);
    let issue = QrIssue { issuer: 1, key_id: 1, account: 5, issued_at: w.now, valid_secs: 300, nonce: 3 };
    let forged = qr::encode_text(&qr::generate(&issue, &forger));
    assert_eq!(w.tap(In, TapMedia::Qr { code: forged }).reason, Reason::QrBadSignature);

    let unknown = QrIssue { issuer: 2, ..issue };
    let unknown = qr::encode_text(&qr::generate(&unknown, &w.qr_key));
    assert_eq!(w.tap(In, TapMedia::Qr { code: unknown }).reason, Reason::QrUnknownKey);

    let old = QrIssue { issued_at: w.now.plus_minutes(-60), ..issue };
    let old = qr::encode_text(&qr::generate(&old, &w.qr_key));
    assert_eq!(w.tap(In, TapMedia::Qr { code: old }).reason, Reason::QrExpired);

    let future = QrIssue { issued_at: w.now.plus_minutes(60), ..issue };
    let future = qr::encode_text(&qr::generate(&future, &w.qr_key));
    assert_eq!(w.tap(In, TapMedia::Qr { code: future }).reason, Reason::QrNotYetValid);
}

#[test]
fn a_token_enters_only_at_its_origin_on_its_business_day() {
    let mut w = World::at(A);
    let d = w.tap(In, TapMedia::Token { token: token(A, 300, None) });
    assert_decision(&d, OpenEntry, Reason::Ok, 0, None);
    assert_eq!(d.card_write.unwrap().entry.unwrap().station, A);

    assert_eq!(w.tap(In, TapMedia::Token { token: token(B, 300, None) }).reason, Reason::TokenWrongStation);
    let yesterday = TokenCard { sold_on: today().plus_days(-1), ..token(A, 300, None) };
    assert_eq!(w.tap(In, TapMedia::Token { token: yesterday.clone() }).reason, Reason::TokenExpired);
    assert_eq!(
        w.tap(In, TapMedia::Token { token: token(A, 300, Some(A)) }).reason,
        Reason::TokenAlreadyEntered
    );
    assert_eq!(
        w.tap(In, TapMedia::Token { token: token(A, 950, None) }).kind,
        OpenEntry,
        "token ids 900-999 are blacklisted, token 5001 is not"
    );

    let mut night = World::at(A);
    night.modes.set(A, ModeBits::HOURS_24, Timestamp::from_local(today(), 1, 0, 480));
    assert_eq!(
        night.tap(In, TapMedia::Token { token: yesterday.clone() }).kind,
        OpenEntry,
        "hours_24 through the night keeps yesterday's token valid"
    );

    let mut set_at_noon = World::at(A).mode(ModeBits::HOURS_24);
    assert_eq!(
        set_at_noon.tap(In, TapMedia::Token { token: yesterday }).reason,
        Reason::TokenExpired,
        "hours_24 set after the rollover does not revive yesterday's tokens"
    );
}

#[test]
fn a_token_that_entered_before_the_rollover_may_leave_after_it() {
    let mut w = World::at(D);
    let entered = Timestamp::from_local(today().plus_days(1), 3, 50, 480);
    w.now = Timestamp::from_local(today().plus_days(1), 4, 10, 480);
    let t = TokenCard { entry: Some(EntryRecord { station: A, time: entered }), ..token(A, 400, None) };
    assert_eq!(w.tap(Out, TapMedia::Token { token: t }).kind, OpenExit);
    let late = TokenCard { entry: Some(EntryRecord { station: A, time: w.now }), ..token(A, 400, None) };
    assert_eq!(w.tap(Out, TapMedia::Token { token: late }).reason, Reason::TokenExpired);
}

#[test]
fn a_token_without_entry_under_sequence_free_pays_from_where_it_was_sold() {
    let mut w = World::at(D).mode(ModeBits::SEQUENCE_FREE);
    let cheap = w.tap(Out, TapMedia::Token { token: token(A, 200, None) });
    assert_eq!(
        (cheap.reason, cheap.fare_fen),
        (Reason::TokenUnderpaid, 400),
        "A to D costs 4.00, not the minimum fare"
    );
    let paid = w.tap(Out, TapMedia::Token { token: token(A, 400, None) });
    assert_decision(&paid, OpenExit, Reason::OkSequenceFree, 400, None);
}

#[test]
fn a_card_is_valid_through_the_business_day_of_its_expiry_date() {
    let mut w = World::at(A);
    w.now = Timestamp::from_local(today().plus_days(1), 0, 30, 480);
    let expiring_today = SvcCard { expiry: today(), ..card(CardType::ORDINARY, 1000, None) };
    assert_eq!(
        w.svc(In, expiring_today.clone()).kind,
        OpenEntry,
        "00:30 still belongs to the expiry's business day"
    );
    w.now = Timestamp::from_local(today().plus_days(1), 4, 0, 480);
    assert_eq!(w.svc(In, expiring_today).reason, Reason::CardExpired);
}

#[test]
fn a_qr_code_accepted_while_the_replay_cache_is_full_is_flagged_for_clearing() {
    let mut w = World::at(A);
    w.replay = ReplayCache::new(1, QrSkew::default());
    let first = w.tap(In, TapMedia::Qr { code: w.qr_code(1, 1) });
    assert!(first.accepted() && !first.replay_unchecked);
    let second = w.tap(In, TapMedia::Qr { code: w.qr_code(2, 2) });
    assert!(second.accepted() && second.replay_unchecked, "{second:?}");
    let station = "s".parse().unwrap();
    let rec = second.to_record(&station, &station, 2, Default::default(), w.now);
    assert!(rec.replay_unchecked);
    assert_eq!(rec.qr.map(|q| q.nonce), Some(2));
}

#[test]
fn a_token_exit_needs_its_paid_value_to_cover_the_fare_and_is_retained() {
    let mut w = World::at(D);
    let ok = w.tap(Out, TapMedia::Token { token: token(A, 400, Some(A)) });
    assert_decision(&ok, OpenExit, Reason::Ok, 400, None);
    assert!(ok.card_write.unwrap().retain, "the exit gate keeps the token");

    let under = w.tap(Out, TapMedia::Token { token: token(A, 300, Some(A)) });
    assert_eq!((under.kind, under.reason, under.fare_fen), (Reject, Reason::TokenUnderpaid, 400));
    assert_eq!(under.card_write, None);

    assert_eq!(w.tap(Out, TapMedia::Token { token: token(A, 400, None) }).reason, Reason::NoEntry);
    let mut blacklisted = token(A, 400, Some(A));
    blacklisted.token_id = 901;
    assert_eq!(w.tap(Out, TapMedia::Token { token: blacklisted }).reason, Reason::Blacklisted);

    let mut disrupted = World::at(D).mode(ModeBits::TRAIN_DISRUPTION);
    let free = disrupted.tap(Out, TapMedia::Token { token: token(A, 200, Some(A)) });
    assert_decision(&free, OpenExit, Reason::OkTrainDisruption, 0, None);
    assert!(free.card_write.unwrap().retain);

    let mut fare_free = World::at(D).mode(ModeBits::FARE_FREE);
    let short = fare_free.tap(Out, TapMedia::Token { token: token(A, 200, Some(A)) });
    assert_eq!((short.reason, short.fare_fen, short.shortfall_fen), (Reason::OkFareShortfall, 200, 200));
}

#[test]
fn a_decision_becomes_a_ledger_record_with_everything_clearing_needs() {
    let mut w = World::at(D);
    let d = w.svc(Out, card(CardType::ORDINARY, 1000, Some((A, 30))));
    let station = "dl-d".parse().unwrap();
    let gate = "g03".parse().unwrap();
    let rec = d.to_record(&station, &gate, 17, Default::default(), w.now);
    assert_eq!(
        (rec.gate_seq, rec.media, rec.fare_fen, rec.balance_before, rec.balance_after),
        (17, Media::Svc, 320, Some(1000), Some(680))
    );
    assert_eq!((rec.entry_station, rec.card_tx_counter, rec.accepted), (Some(A), Some(42), true));
}

/// Issue 11 item 2: the gate decides with its own clock, and a clock off by less than the
/// tolerance (`QrSkew`, 30 s by default) changes nothing; beyond it the code is refused with the
/// reason the gate's clock gives (never a panic). The QR code is issued on the true clock, valid
/// 60 s, and shown at once and at its last second; the gate's clock is off by `off` ms.
#[test]
fn qr_validity_and_the_ride_limit_use_the_gate_clock_within_the_skew_tolerance() {
    const MIN: i64 = 60_000;
    let truth = noon();
    let issue =
        |nonce| QrIssue { issuer: 1, key_id: 1, account: 4242, issued_at: truth, valid_secs: 60, nonce };
    let mut nonce = 0;
    let mut qr_at = |off: i64, shown_after_ms: i64| {
        let mut w = World::at(A);
        w.now = Timestamp(truth.0 + shown_after_ms + off);
        nonce += 1;
        let code = qr::encode_text(&qr::generate(&issue(nonce), &w.qr_key));
        let d = w.tap(In, TapMedia::Qr { code });
        (d.kind, d.reason)
    };
    for off in [-5_000, -500, 0, 500, 5_000] {
        for shown_after in [0, 59_000] {
            assert_eq!(
                qr_at(off, shown_after),
                (OpenEntry, Reason::Ok),
                "gate {off} ms off, shown after {shown_after} ms"
            );
        }
    }
    // Beyond the tolerance: a gate 10 min behind sees a code from its future, one ahead an
    // expired code; the edges of the tolerance itself hold to the millisecond.
    assert_eq!(qr_at(-10 * MIN, 0), (Reject, Reason::QrNotYetValid));
    assert_eq!(qr_at(10 * MIN, 0), (Reject, Reason::QrExpired));
    assert_eq!(qr_at(-30_000, 0), (OpenEntry, Reason::Ok));
    assert_eq!(qr_at(-30_001, 0), (Reject, Reason::QrNotYetValid));
    assert_eq!(qr_at(30_000, 60_000), (OpenEntry, Reason::Ok));
    assert_eq!(qr_at(30_001, 60_000), (Reject, Reason::QrExpired));
    // Extreme clocks are refused (the issuer key is not valid then), never a panic.
    assert_eq!(qr_at(i64::MAX / 2, 0), (Reject, Reason::QrUnknownKey));
    assert_eq!(qr_at(i64::MIN / 2, 0), (Reject, Reason::QrUnknownKey));

    // The ride limit (120 min, 300 fen surcharge): a ride of 120 min 58 s is within the limit; an
    // exit gate 0.5 s or 5 s ahead of the entry gate does not charge it, 10 min ahead does.
    let entered = Timestamp(truth.0 - (120 * MIN + 58_000));
    for (off, fare) in [(-5_000, 320), (-500, 320), (0, 320), (500, 320), (5_000, 320), (10 * MIN, 620)] {
        let mut w = World::with_rule(D, rule(Some(120), 300));
        w.now = Timestamp(truth.0 + off);
        let mut c = card(CardType::ORDINARY, 1000, None);
        c.entry = Some(EntryRecord { station: A, time: entered });
        let d = w.svc(Out, c);
        assert_decision(&d, OpenExit, Reason::Ok, fare, Some(1000 - fare));
    }
}

/// Another city's fare rule with a concession of its own (code 20, "veteran", 30 %): written as
/// data, compiled, carried in the gate's binary table, and decided on; a code it does not list is
/// refused.
#[test]
fn a_fare_rule_with_its_own_card_types_prices_them_through_the_binary_table() {
    let rule_json = r#"{
        "name": "another city", "bands": [{"up_to_m": 6000, "fare_fen": 300}, {"up_to_m": 18000, "fare_fen": 500}],
        "beyond": null, "min_fare_fen": 300, "token_percent": 100, "max_ride_minutes": null,
        "overstay_surcharge_fen": 0, "business_day": {"utc_offset_minutes": 480, "rollover_minute_of_day": 240},
        "discounts": {"ordinary": 100, "20": 30, "21": 0},
        "card_type_names": {"20": {"en": "Veteran", "zh": "优抚对象"}, "21": {"en": "Companion", "zh": "陪同人员"}}
    }"#;
    let rule: FareRule = serde_json::from_str(rule_json).unwrap();
    rule.validate().unwrap();
    assert_eq!(rule.card_type_names[&CardType(20)].zh, "优抚对象");
    // The table a gate receives is the binary body: decode what was encoded.
    let table = compile(&network(), &rule).unwrap();
    let table = FareTable::decode(&table.encode()).unwrap();
    assert_eq!(
        table.accepted_types(),
        vec![(CardType::ORDINARY, 100), (CardType(20), 30), (CardType(21), 0)]
    );
    let mut w = World::with_rule(A, rule);
    w.fares = table;
    let from_c = Some((C, 20));
    let full = w.fares.full_fare_fen(C, A).unwrap();
    let veteran = card(CardType(20), 1_000, from_c);
    assert_decision(
        &w.svc(Out, veteran),
        OpenExit,
        Reason::Ok,
        full * 30 / 100,
        Some(1_000 - full * 30 / 100),
    );
    assert_decision(
        &w.svc(Out, card(CardType::ORDINARY, 1_000, from_c)),
        OpenExit,
        Reason::Ok,
        full,
        Some(1_000 - full),
    );
    // Listed by another city only: refused here, like a type the rule does not list.
    assert_decision(
        &w.svc(In, card(CardType(22), 1_000, None)),
        Reject,
        Reason::CardTypeNotAccepted,
        0,
        None,
    );
    assert_decision(
        &w.svc(In, card(CardType::STUDENT, 1_000, None)),
        Reject,
        Reason::CardTypeNotAccepted,
        0,
        None,
    );
    // A card reports its type as the byte on the card: a name, a decimal string or a number.
    for json in [r#""20""#, "20"] {
        assert_eq!(serde_json::from_str::<CardType>(json).unwrap(), CardType(20));
    }
    assert_eq!(serde_json::to_string(&CardType(20)).unwrap(), r#""20""#);
    assert_eq!(serde_json::to_string(&CardType::ELDERLY_FREE).unwrap(), r#""elderly_free""#);
    for bad in [r#""veteran""#, "256", "-1", r#""""#, r#""2x""#] {
        assert!(serde_json::from_str::<CardType>(bad).is_err(), "{bad}");
    }
    // Names only for accepted types, and never empty.
    let mut named_only: FareRule = serde_json::from_str(rule_json).unwrap();
    named_only.discounts.remove(&CardType(21));
    assert!(matches!(
        named_only.validate(),
        Err(FareError::NamedTypeNotAccepted { card_type: CardType(21) })
    ));
    let mut empty: FareRule = serde_json::from_str(rule_json).unwrap();
    empty.card_type_names.get_mut(&CardType(20)).unwrap().en = " ".into();
    assert!(matches!(empty.validate(), Err(FareError::BadCardTypeName { .. })));
}

fn bank_card(token: u8, expiry: Date, oda_passed: bool) -> TapMedia {
    TapMedia::Bank {
        bank: BankCard {
            token: BankToken([token; 32]),
            expiry,
            oda_passed,
            cryptogram: Cryptogram([token, 1, 2, 3, 4, 5, 6, 7]),
            atc: 17,
        },
    }
}

#[test]
fn a_bank_card_is_refused_when_denied_expired_or_unauthenticated_and_otherwise_opens_with_nothing_charged() {
    let mut w = World::at(B);
    let valid = Date::from_ymd(2030, 1, 31).unwrap();
    let d = w.tap(In, bank_card(0x11, valid, true));
    assert_decision(&d, OpenEntry, Reason::Ok, 0, None);
    assert_eq!(d.media, Media::Bank);
    assert_eq!(d.id, BankToken([0x11; 32]).deny_key());
    assert_eq!(d.entry, Some(EntryRecord { station: B, time: w.now }));
    assert_eq!(d.card_write, None, "a bank card is never written");
    let record = d.to_record(
        &afc_domain::model::Ident::new("s").unwrap(),
        &afc_domain::model::Ident::new("g").unwrap(),
        1,
        Default::default(),
        w.now,
    );
    let bank = record.bank.expect("the record keeps the bank reference");
    assert_eq!((bank.token, bank.cryptogram.0[0], bank.atc), (BankToken([0x11; 32]), 0x11, 17));
    assert_eq!(afc_domain::ledger::TxRecord::from_canonical(&record.canonical_bytes()), Ok(record));

    let exit = w.tap(Out, bank_card(0x11, valid, true));
    assert_decision(&exit, OpenExit, Reason::Ok, 0, None);

    let denied = TapMedia::Bank {
        bank: BankCard {
            token: DENIED_TOKEN,
            expiry: valid,
            oda_passed: true,
            cryptogram: Cryptogram([0; 8]),
            atc: 1,
        },
    };
    assert_decision(&w.tap(In, denied.clone()), Reject, Reason::BankDenied, 0, None);
    assert_decision(&w.tap(Out, denied), Reject, Reason::BankDenied, 0, None);
    let expired = today().plus_days(-1);
    assert_decision(&w.tap(In, bank_card(0x12, expired, true)), Reject, Reason::CardExpired, 0, None);
    // The card's last day still rides; date_free lets an expired one through.
    assert_decision(&w.tap(In, bank_card(0x13, today(), true)), OpenEntry, Reason::Ok, 0, None);
    assert_decision(&w.tap(In, bank_card(0x14, valid, false)), Reject, Reason::BankAuthFailed, 0, None);
    let mut w = w.mode(ModeBits::DATE_FREE);
    assert_decision(&w.tap(In, bank_card(0x12, expired, true)), OpenEntry, Reason::Ok, 0, None);
    // Under a mode that skips card processing the record still names the token, so clearing
    // can pair the journey (an entry under entry_free, an exit under emergency release).
    for (bits, dir, reason) in [
        (ModeBits::ENTRY_FREE, In, Reason::OkEntryFree),
        (ModeBits::EMERGENCY_RELEASE, Out, Reason::OkEmergencyRelease),
    ] {
        let mut w = World::at(B).mode(bits);
        let d = w.tap(dir, bank_card(0x15, valid, true));
        assert_eq!(d.reason, reason);
        assert_eq!(d.bank.map(|b| b.token), Some(BankToken([0x15; 32])), "{d:?}");
    }
}

#[test]
fn a_bank_token_enters_at_most_the_unpaid_limit_a_day_and_is_always_let_out() {
    let mut w = World::at(B);
    let valid = Date::from_ymd(2030, 1, 31).unwrap();
    let limit = afc_domain::bank::DEFAULT_UNPAID_TAPS_PER_DAY;
    // Entries and exits both count; the limit refuses entries only.
    for i in 0..limit {
        let dir = if i % 2 == 0 { In } else { Out };
        assert!(w.tap(dir, bank_card(0x21, valid, true)).accepted(), "tap {i}");
    }
    assert_decision(&w.tap(In, bank_card(0x21, valid, true)), Reject, Reason::BankUnpaidLimit, 0, None);
    assert_decision(&w.tap(Out, bank_card(0x21, valid, true)), OpenExit, Reason::Ok, 0, None);
    // Another token is not affected, and the next business day starts again.
    assert!(w.tap(In, bank_card(0x22, valid, true)).accepted());
    w.now = w.now.plus_days(1);
    assert!(w.tap(In, bank_card(0x21, valid, true)).accepted());
}
