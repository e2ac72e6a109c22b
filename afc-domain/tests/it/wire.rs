//! The MQTT and reader wire formats: every message round-trips, decoders survive arbitrary bytes,
//! every topic round-trips and subscriptions reach the side they are meant for.

// Strategy and assertion helpers are test code too (clippy's allow-unwrap-in-tests only covers `#[test]` fns).
#![allow(clippy::unwrap_used)]

use std::fmt::Debug;

use afc_domain::ledger::{ParamVersions, TxRecord};
use afc_domain::mode::{ModeBits, ModePeriod};
use afc_domain::model::{CardType, Date, Direction, Ident, Media, ParamKind, Reason, StationCode, Timestamp};
use afc_domain::topic::{filters, Publisher, Topic, TopicError};
use afc_domain::wire::*;
use proptest::prelude::*;
use proptest::sample::select;

fn round_trips<T: WireMessage + PartialEq + Debug>(msg: &T) {
    let bytes = encode(msg);
    assert_eq!(&decode::<T>(&bytes).unwrap(), msg, "{}", String::from_utf8_lossy(&bytes));
    let line = encode_line(msg);
    assert_eq!(line.last(), Some(&b'\n'));
    assert_eq!(&decode_with_limit::<T>(&line, MAX_READER_LINE.max(line.len())).unwrap(), msg);
}

fn ident() -> impl Strategy<Value = Ident> {
    "[A-Za-z0-9_-]{1,64}".prop_map(|s| Ident::new(&s).unwrap())
}

fn ts() -> impl Strategy<Value = Timestamp> {
    any::<i64>().prop_map(Timestamp)
}

fn date() -> impl Strategy<Value = Date> {
    let lo = Date::from_ymd(0, 1, 1).unwrap().0;
    let hi = Date::from_ymd(9999, 12, 31).unwrap().0;
    (lo..=hi).prop_map(Date)
}

fn text() -> impl Strategy<Value = String> {
    any::<String>()
}

fn kind() -> impl Strategy<Value = ParamKind> {
    select(ParamKind::ALL.to_vec())
}

fn direction() -> impl Strategy<Value = Direction> {
    select(vec![Direction::Entry, Direction::Exit])
}

fn gate_direction() -> impl Strategy<Value = GateDirection> {
    select(vec![
        GateDirection::Closed,
        GateDirection::Entry,
        GateDirection::Exit,
        GateDirection::Bidirectional,
    ])
}

fn alarm() -> impl Strategy<Value = AlarmKind> {
    select(vec![
        AlarmKind::Tailgating,
        AlarmKind::ForcedPassage,
        AlarmKind::DoorFault,
        AlarmKind::PlcOffline,
        AlarmKind::EmergencyInput,
        AlarmKind::OutboxNearFull,
        AlarmKind::ClockDrift,
        AlarmKind::PackageRejected,
        AlarmKind::ControllerLost,
        AlarmKind::AckBeyondLastSeq,
        AlarmKind::PassageNotMade,
        AlarmKind::Other,
    ])
}

fn entry() -> impl Strategy<Value = Option<EntryRecord>> {
    proptest::option::of(
        (any::<u16>(), ts()).prop_map(|(s, time)| EntryRecord { station: StationCode(s), time }),
    )
}

fn svc_card() -> impl Strategy<Value = SvcCard> {
    (any::<u64>(), select(CardType::NAMED.to_vec()), any::<u32>(), date(), any::<u32>(), entry()).prop_map(
        |(card_id, card_type, balance_fen, expiry, tx_counter, entry)| SvcCard {
            card_id,
            card_type,
            balance_fen,
            expiry,
            tx_counter,
            entry,
        },
    )
}

fn token_card() -> impl Strategy<Value = TokenCard> {
    (any::<u64>(), any::<u16>(), any::<u32>(), date(), entry()).prop_map(
        |(token_id, origin, paid_fen, sold_on, entry)| TokenCard {
            token_id,
            origin: StationCode(origin),
            paid_fen,
            sold_on,
            entry,
        },
    )
}

fn tap() -> impl Strategy<Value = TapRequest> {
    let media = prop_oneof![
        svc_card().prop_map(|card| TapMedia::Svc { card }),
        text().prop_map(|code| TapMedia::Qr { code }),
        token_card().prop_map(|token| TapMedia::Token { token }),
    ];
    (direction(), media).prop_map(|(direction, media)| TapRequest { direction, media })
}

fn reader_response() -> impl Strategy<Value = ReaderResponse> {
    let write = (any::<u32>(), any::<u32>(), entry(), any::<bool>()).prop_map(
        |(balance_fen, tx_counter, entry, retain)| CardWrite { balance_fen, tx_counter, entry, retain },
    );
    (
        select(vec![DecisionKind::OpenEntry, DecisionKind::OpenExit, DecisionKind::Reject]),
        select(Reason::ALL.to_vec()),
        any::<u32>(),
        proptest::option::of(write),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(decision, reason, fare_fen, card_write, gate_seq)| ReaderResponse {
            decision,
            reason,
            fare_fen,
            card_write,
            gate_seq,
        })
}

fn reader_error() -> impl Strategy<Value = ReaderError> {
    (text(), text()).prop_map(|(error, message)| ReaderError { error, message })
}

fn station_state() -> impl Strategy<Value = StationState> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), ts()).prop_map(|(leader_node, term, since)| StationState::Online(
            LeaderState { leader_node, term, since }
        )),
        (proptest::option::of(any::<u64>()), proptest::option::of(any::<u64>()))
            .prop_map(|(leader_node, term)| StationState::Offline(Offline { leader_node, term })),
    ]
}

fn pointer() -> impl Strategy<Value = ParamPointer> {
    (any::<u64>(), "[0-9a-f]{64}", any::<u64>(), any::<u32>(), ts()).prop_map(
        |(version, sha256, size, chunks, effective_from)| ParamPointer {
            version,
            sha256,
            size,
            chunks,
            effective_from,
        },
    )
}

fn mode_message() -> impl Strategy<Value = ModeMessage> {
    let period = (any::<u16>(), any::<u16>(), ts(), proptest::option::of(ts())).prop_map(
        |(station, bits, from, until)| ModePeriod {
            station: StationCode(station),
            bits: ModeBits(bits),
            from,
            until,
        },
    );
    (any::<u64>(), any::<u16>(), ts(), proptest::option::of(text()), proptest::collection::vec(period, 0..5))
        .prop_map(|(version, bits, since, history_ref, history)| ModeMessage {
            version,
            bits: ModeBits(bits),
            since,
            decided_at: None,
            history_ref,
            history,
        })
}

fn gate_status() -> impl Strategy<Value = GateStatus> {
    let versions = proptest::collection::btree_map(
        kind(),
        (proptest::option::of(any::<u64>()), proptest::option::of(any::<u64>()), proptest::option::of(ts()))
            .prop_map(|(active, pending, pending_effective_from)| KindVersions {
                active,
                pending,
                pending_effective_from,
            }),
        0..5,
    );
    let hardware =
        (text(), text(), any::<u8>(), text()).prop_map(|(profile, address, unit_id, agent_version)| {
            HardwareInfo { profile, plc: PlcEndpoint { address, unit_id }, agent_version }
        });
    prop_oneof![
        (text(), versions, hardware).prop_map(|(session, versions, hardware)| GateStatus::Online(
            GateBirth { session, versions, hardware }
        )),
        text().prop_map(|session| GateStatus::Offline { session }),
    ]
}

fn heartbeat() -> impl Strategy<Value = Heartbeat> {
    let counters = any::<[u64; 6]>().prop_map(|c| GateCounters {
        taps: c[0],
        entries: c[1],
        exits: c[2],
        rejects: c[3],
        tailgating: c[4],
        forced_passage: c[5],
    });
    (
        ts(),
        any::<u64>(),
        counters,
        any::<(u64, u64)>(),
        any::<(bool, bool, bool)>(),
        gate_direction(),
        proptest::collection::vec(alarm(), 0..4),
    )
        .prop_map(
            |(
                at,
                seq,
                counters,
                (outbox_depth, outbox_bytes),
                (plc_online, in_service, free_passage),
                direction,
                alarms,
            )| {
                Heartbeat {
                    at,
                    seq,
                    counters,
                    outbox_depth,
                    outbox_bytes,
                    outbox_capacity_bytes: outbox_bytes.saturating_mul(2),
                    plc_online,
                    direction,
                    in_service,
                    free_passage,
                    alarms,
                    versions: Default::default(),
                }
            },
        )
}

fn tx_record() -> impl Strategy<Value = TxRecord> {
    let ids = (ident(), ident(), any::<u64>(), select(Media::ALL.to_vec()), any::<u64>(), direction());
    let outcome = (any::<bool>(), select(Reason::ALL.to_vec()), any::<u32>(), any::<u32>());
    let card = (
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
        entry(),
    );
    let context = (ts(), any::<u16>(), any::<[u64; 5]>(), any::<bool>());
    (ids, outcome, card, context).prop_map(
        |(
            (station, gate, gate_seq, media, id, direction),
            (accepted, reason, fare_fen, shortfall_fen),
            (balance_before, balance_after, card_tx_counter, entry),
            (occurred_at, modes, p, replay_unchecked),
        )| TxRecord {
            station,
            gate,
            gate_seq,
            media,
            id,
            direction,
            accepted,
            reason,
            fare_fen,
            shortfall_fen,
            balance_before,
            balance_after,
            card_tx_counter,
            entry_station: entry.map(|e| e.station),
            entry_time: entry.map(|e| e.time),
            occurred_at,
            modes: ModeBits(modes),
            params: ParamVersions {
                fare_table: p[0],
                blacklist: p[1],
                qr_keys: p[2],
                gate_config: p[3],
                mode: p[4],
            },
            replay_unchecked,
            qr: None,
            installation: None,
            voids: None,
            bank: None,
            tac: None,
        },
    )
}

fn tx_batch() -> impl Strategy<Value = TxBatch> {
    (
        ident(),
        ident(),
        proptest::option::of(proptest::collection::vec(tx_record(), 0..4)),
        proptest::option::of(proptest::collection::vec("[A-Za-z0-9+/]{4,40}={0,2}", 0..4)),
        "[0-9a-f]{128}",
        proptest::option::of("[0-9a-f]{32}"),
        proptest::option::of(1u64..u64::MAX),
    )
        .prop_map(|(station, gate, records, raw, signature, installation, covers_from)| TxBatch {
            station,
            gate,
            records,
            raw,
            signature,
            installation,
            covers_from,
        })
}

fn params_ack() -> impl Strategy<Value = ParamsAck> {
    (
        kind(),
        any::<u64>(),
        select(vec![ParamState::Pending, ParamState::Active, ParamState::Rejected]),
        proptest::option::of(text()),
    )
        .prop_map(|(kind, version, state, reason)| ParamsAck { kind, version, state, reason })
}

fn command() -> impl Strategy<Value = Command> {
    let kind = prop_oneof![
        Just(CommandKind::OpenOnceEntry),
        Just(CommandKind::OpenOnceExit),
        gate_direction().prop_map(|direction| CommandKind::SetDirection { direction }),
        Just(CommandKind::OutOfService),
        Just(CommandKind::InService),
    ];
    (text(), ident(), kind, ts()).prop_map(|(id, gate, command, expires_at)| Command {
        id,
        gate,
        command,
        expires_at,
    })
}

fn command_ack() -> impl Strategy<Value = CommandAck> {
    (
        text(),
        select(vec![
            CommandResult::Ok,
            CommandResult::Expired,
            CommandResult::Rejected,
            CommandResult::Failed,
        ]),
        proptest::option::of(text()),
    )
        .prop_map(|(id, result, detail)| CommandAck { id, result, detail })
}

fn gate_event() -> impl Strategy<Value = GateEvent> {
    (ts(), alarm(), any::<bool>(), proptest::option::of(text()))
        .prop_map(|(at, kind, cleared, detail)| GateEvent { at, kind, cleared, detail })
}

fn qr_used() -> impl Strategy<Value = QrUsed> {
    (any::<u16>(), any::<u64>(), any::<u64>(), ts(), ident()).prop_map(
        |(issuer, account, nonce, expires_at, gate)| QrUsed { issuer, account, nonce, expires_at, gate },
    )
}

fn topic() -> impl Strategy<Value = Topic> {
    (ident(), ident(), kind(), any::<u64>(), any::<u32>(), 0..15u8).prop_map(
        |(station, gate, kind, version, chunk, which)| match which {
            0 => Topic::State { station },
            1 => Topic::ParamCurrent { station, kind },
            2 => Topic::ParamChunk { station, kind, version, chunk },
            3 => Topic::Mode { station },
            4 => Topic::QrUsed { station },
            5 => Topic::GateStatus { station, gate },
            6 => Topic::GateHeartbeat { station, gate },
            7 => Topic::GateTx { station, gate },
            8 => Topic::GateTxAck { station, gate },
            9 => Topic::GateParamCurrent { station, gate, kind },
            10 => Topic::GateParamsAck { station, gate },
            11 => Topic::GateCmd { station, gate },
            12 => Topic::GateCmdAck { station, gate },
            13 => Topic::GateEvents { station, gate },
            _ => Topic::GateQrUsed { station, gate },
        },
    )
}

/// Decodes `bytes` as every message type; none may panic.
fn decode_as_everything(bytes: &[u8]) {
    let _ = decode::<ReaderRequest>(bytes);
    let _ = decode::<ReaderResponse>(bytes);
    let _ = decode::<ReaderReply>(bytes);
    let _ = decode::<StationState>(bytes);
    let _ = decode::<ParamPointer>(bytes);
    let _ = decode::<ModeMessage>(bytes);
    let _ = decode::<GateStatus>(bytes);
    let _ = decode::<Heartbeat>(bytes);
    let _ = decode::<TxBatch>(bytes);
    let _ = decode::<TxAck>(bytes);
    let _ = decode::<ParamsAck>(bytes);
    let _ = decode::<Command>(bytes);
    let _ = decode::<CommandAck>(bytes);
    let _ = decode::<GateEvent>(bytes);
    let _ = decode::<QrUsedBatch>(bytes);
}

#[test]
fn the_psam_exchange_lines_round_trip_and_an_older_readers_request_has_no_psam_flag() {
    use afc_domain::ledger::TacRef;
    use afc_domain::tac::TacInput;
    use afc_domain::wire::{PsamError, PsamReply, PsamSignRequest};
    let sign = PsamSignRequest {
        sign: TacInput {
            card_id: 3104_0000_0000_0123,
            tx_counter: 42,
            amount_fen: 160,
            station: Ident::new("s1").unwrap(),
            gate: Ident::new("g01").unwrap(),
            time: Timestamp(1_796_176_800_000),
        },
    };
    round_trips(&sign);
    let signed = PsamReply::Signed(TacRef { psam: 9, psam_seq: 7, tac: [0xab; 8] });
    round_trips(&signed);
    assert_eq!(
        String::from_utf8(encode(&signed)).unwrap(),
        r#"{"signed":{"psam":9,"psam_seq":7,"tac":"abababababababab"}}"#
    );
    let refused: PsamReply = decode(br#"{"psam_error":{"code":"locked"}}"#).unwrap();
    assert_eq!(refused, PsamReply::PsamError(PsamError { code: "locked".into(), message: String::new() }));
    let old: ReaderRequest = decode(br#"{"tap":{"direction":"entry","media":"qr","code":"x"}}"#).unwrap();
    assert!(!old.psam);
    assert!(!String::from_utf8(encode(&old)).unwrap().contains("psam"));
    let new: ReaderRequest =
        decode(br#"{"tap":{"direction":"entry","media":"qr","code":"x"},"psam":true}"#).unwrap();
    assert!(new.psam);
}

proptest! {
    #[test]
    fn reader_messages_round_trip(req in tap(), resp in reader_response(), err in reader_error()) {
        round_trips(&ReaderRequest::new(req.clone()));
        round_trips(&ReaderRequest { tap: req.clone(), psam: true });
        round_trips(&req);
        round_trips(&resp);
        round_trips(&err);
        round_trips(&ReaderReply::Response(resp));
        round_trips(&ReaderReply::Error(err));
    }

    #[test]
    fn controller_messages_round_trip(
        state in station_state(),
        p in pointer(),
        mode in mode_message(),
        ack in any::<u64>(),
        cmd in command(),
        used in proptest::collection::vec(qr_used(), 0..4),
    ) {
        round_trips(&state);
        round_trips(&p);
        prop_assert!(p.sha256_bytes().is_ok());
        round_trips(&mode);
        round_trips(&TxAck { through_seq: ack, installation: None });
        round_trips(&TxAck { through_seq: ack, installation: Some("0123abcd".into()) });
        round_trips(&cmd);
        for u in &used {
            round_trips(u);
        }
        round_trips(&QrUsedBatch { entries: used });
    }

    #[test]
    fn gate_messages_round_trip(
        status in gate_status(),
        hb in heartbeat(),
        batch in tx_batch(),
        pack in params_ack(),
        cack in command_ack(),
        ev in gate_event(),
    ) {
        round_trips(&status);
        round_trips(&hb);
        round_trips(&batch);
        prop_assert!(batch.signature_bytes().is_ok());
        round_trips(&pack);
        round_trips(&cack);
        round_trips(&ev);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_as_everything(&bytes);
    }

    #[test]
    fn decoding_corrupted_messages_never_panics(
        batch in tx_batch(),
        req in tap(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        for mut bytes in [encode(&batch), encode(&ReaderRequest::new(req))] {
            for (i, b) in &flips {
                let i = i.index(bytes.len());
                bytes[i] = *b;
            }
            decode_as_everything(&bytes);
            decode_as_everything(&bytes[..cut.index(bytes.len())]);
        }
    }

    #[test]
    fn every_topic_round_trips_through_its_string(t in topic()) {
        let s = t.to_string();
        prop_assert_eq!(Topic::parse(&s), Ok(t.clone()));
        prop_assert_eq!(s.parse::<Topic>(), Ok(t));
    }

    #[test]
    fn topic_parsing_never_panics_and_accepts_only_canonical_strings(
        levels in proptest::collection::vec(
            select(vec![
                "afc", "v1", "v2", "s1", "g01", "state", "mode", "qr", "used", "params", "gates", "current",
                "ack", "tx", "cmd", "status", "heartbeat", "events", "fare_table", "blacklist", "0", "7",
                "07", "+7", "18446744073709551616", "+", "#", "", "a b", "$SYS",
            ]),
            0..9,
        ),
        raw in ".{0,80}",
    ) {
        let _ = Topic::parse(&raw);
        let s = levels.join("/");
        if let Ok(t) = Topic::parse(&s) {
            prop_assert_eq!(t.to_string(), s);
        }
    }

    #[test]
    fn subscriptions_reach_the_intended_side_and_no_other_gate(t in topic(), other in ident()) {
        let station = t.station().clone();
        let s = t.to_string();
        let any_match = |filters: &[String]| filters.iter().any(|f| filters::matches(f, &s));
        match t.publisher() {
            Publisher::Gate => {
                prop_assert!(any_match(&filters::controller_subscriptions(&station)));
            }
            Publisher::Leader | Publisher::Controller => {
                prop_assert!(!any_match(&filters::controller_subscriptions(&station)));
                let reaches = |gate: &Ident| match &t {
                    Topic::ParamChunk { kind, version, .. } => {
                        filters::matches(&filters::param_chunks_filter(&station, *kind, *version), &s)
                    }
                    _ => any_match(&filters::gate_subscriptions(&station, gate)),
                };
                match t.gate() {
                    Some(gate) => {
                        prop_assert!(reaches(gate));
                        if &other != gate {
                            prop_assert!(!reaches(&other));
                        }
                    }
                    None => prop_assert!(reaches(&other)),
                }
            }
        }
    }
}

#[test]
fn every_subscription_filter_is_a_valid_mqtt_filter_under_the_root() {
    let (s, g) = (Ident::new("s1").unwrap(), Ident::new("g01").unwrap());
    let mut all = filters::gate_subscriptions(&s, &g);
    all.extend(filters::controller_subscriptions(&s));
    all.push(filters::param_chunks_filter(&s, ParamKind::Blacklist, 3));
    for f in all {
        assert!(f.starts_with("afc/v1/s1/"), "{f}");
        assert!(f.split('/').all(|l| !l.is_empty() && (l == "+" || !l.contains(['+', '#']))), "{f}");
        // A filter with a wildcard is not a topic; one without is exactly one topic.
        if f.contains('+') {
            assert_eq!(Topic::parse(&f), Err(TopicError::Wildcard), "{f}");
        } else {
            assert_eq!(Topic::parse(&f).map(|t| t.to_string()), Ok(f.clone()));
        }
    }
}

#[test]
fn a_tap_request_parses_for_each_media() {
    let svc = br#"{"tap": {"media": "svc", "direction": "entry", "card": {"card_id": 31000012345678,
        "card_type": "ordinary", "balance_fen": 5230, "expiry": "2030-12-31", "tx_counter": 17,
        "entry": null}}}"#;
    let req: ReaderRequest = decode(svc).unwrap();
    assert_eq!(req.tap.direction, Direction::Entry);
    match &req.tap.media {
        TapMedia::Svc { card } => {
            assert_eq!(card.card_id, 31_000_012_345_678);
            assert_eq!(card.expiry, Date::from_ymd(2030, 12, 31).unwrap());
            assert_eq!(card.entry, None);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(req.tap.media.media(), Media::Svc);

    let qr = br#"{"tap": {"media": "qr", "direction": "exit", "code": "AQIDBAUGBwgJ-_8"}}"#;
    let req: ReaderRequest = decode(qr).unwrap();
    assert_eq!(req.tap.media, TapMedia::Qr { code: "AQIDBAUGBwgJ-_8".into() });

    let token = br#"{"tap": {"media": "token", "direction": "exit", "token": {"token_id": 9, "origin": 101,
        "paid_fen": 300, "sold_on": "2026-11-26", "entry": {"station": 101, "time": 1795000000000}}}}"#;
    let req: ReaderRequest = decode(token).unwrap();
    match &req.tap.media {
        TapMedia::Token { token } => {
            assert_eq!(token.origin, StationCode(101));
            assert_eq!(
                token.entry,
                Some(EntryRecord { station: StationCode(101), time: Timestamp(1_795_000_000_000) })
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_tap_with_an_unknown_media_or_a_bad_date_is_invalid_not_malformed() {
    let unknown = br#"{"tap": {"media": "cash", "direction": "entry"}}"#;
    assert!(matches!(decode::<ReaderRequest>(unknown), Err(WireError::Invalid(_))));
    let bad_date =
        br#"{"tap": {"media": "token", "direction": "entry", "token": {"token_id": 9, "origin": 101,
        "paid_fen": 300, "sold_on": "2026-02-30", "entry": null}}}"#;
    assert!(matches!(decode::<ReaderRequest>(bad_date), Err(WireError::Invalid(_))));
}

#[test]
fn a_reader_response_line_looks_like_the_spec() {
    let resp = ReaderResponse {
        decision: DecisionKind::OpenExit,
        reason: Reason::Ok,
        fare_fen: 160,
        card_write: Some(CardWrite { balance_fen: 5070, tx_counter: 18, entry: None, retain: false }),
        gate_seq: Some(1042),
    };
    let line = String::from_utf8(encode_line(&resp)).unwrap();
    assert_eq!(
        line,
        "{\"decision\":\"open_exit\",\"reason\":\"ok\",\"fare_fen\":160,\"card_write\":{\"balance_fen\":5070,\
         \"tx_counter\":18,\"entry\":null,\"retain\":false},\"gate_seq\":1042}\n"
    );
    let reply: ReaderReply =
        decode(br#"{"error":"malformed_request","message":"expected {\"tap\": ...}"}"#).unwrap();
    assert!(matches!(reply, ReaderReply::Error(e) if e.error == ReaderError::MALFORMED_REQUEST));
}

#[test]
fn a_gate_birth_lists_versions_per_kind() {
    let birth =
        br#"{"online": true, "session": "7f3a", "versions": {"fare_table": {"active": 12, "pending": 13,
        "pending_effective_from": 1795000000000}, "blacklist": {"active": 880, "pending": null}},
        "hardware": {"profile": "default", "plc": {"address": "10.1.2.3:502", "unit_id": 1}}}"#;
    let status: GateStatus = decode(birth).unwrap();
    let GateStatus::Online(b) = &status else { panic!("{status:?}") };
    assert_eq!(b.versions[&ParamKind::FareTable].pending, Some(13));
    assert_eq!(b.versions[&ParamKind::Blacklist].active, Some(880));
    assert_eq!(b.hardware.agent_version, "");
    assert_eq!(status.session(), "7f3a");
    let no_hardware = br#"{"online": true, "session": "7f3a", "versions": {}}"#;
    assert!(matches!(decode::<GateStatus>(no_hardware), Err(WireError::Invalid(_))));
}

#[test]
fn a_payload_above_one_mebibyte_is_refused_before_parsing() {
    let big = vec![b' '; MAX_PAYLOAD + 1];
    assert_eq!(decode::<TxAck>(&big), Err(WireError::TooLarge { size: MAX_PAYLOAD + 1, limit: MAX_PAYLOAD }));
}
