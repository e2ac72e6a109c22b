//! Taps through the reader port, decided, recorded and driving the simulated PLC.

use afc_domain::model::{Direction, Reason};
use afc_domain::wire::{CommandKind, DecisionKind, ReaderReply};
use gate_agent::plc_sim::{Fault, SimWrite};

use crate::harness::*;

fn response(r: ReaderReply) -> afc_domain::wire::ReaderResponse {
    match r {
        ReaderReply::Response(r) => r,
        ReaderReply::Error(e) => panic!("reader error {e:?}"),
    }
}

#[tokio::test]
async fn a_valid_exit_tap_writes_the_display_and_the_exit_coil_and_is_recorded() {
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    let mut reader = agent.reader().await;
    let entered = gate_agent::gate::now().plus_minutes(-30);
    let r = response(
        reader
            .tap(&svc_tap(Direction::Exit, card(3104_0000_0000_0001, 1000, Some((FAR, entered)))))
            .await
            .unwrap(),
    );
    // 104 → 101 is 17 km: the 4-yuan band.
    assert_eq!(
        (r.decision, r.reason, r.fare_fen, r.gate_seq),
        (DecisionKind::OpenExit, Reason::Ok, 400, Some(1))
    );
    assert_eq!(r.card_write.unwrap().balance_fen, 600);
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.exits_total == 1).await;
    assert!(ok, "{s:?}");
    assert_eq!((s.display_code, s.display_fen), (Reason::Ok.code(), 400));
    assert!(s.writes.contains(&SimWrite::Coil { addr: 1, value: true }), "{:?}", s.writes);
    assert!(!s.writes.contains(&SimWrite::Coil { addr: 0, value: true }));
    let stored = agent.running.gate.store().pending(0, 10, 1 << 20).unwrap();
    let rec = gate_agent::gate::decode_record(&stored[0].1).unwrap();
    assert_eq!((rec.gate_seq, rec.fare_fen, rec.accepted, rec.params.fare_table), (1, 400, true, 1));
}

#[tokio::test]
async fn a_blacklisted_card_is_refused_and_the_flaps_stay_shut() {
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    let mut reader = agent.reader().await;
    let r = response(reader.tap(&svc_tap(Direction::Entry, card(BLACKLISTED, 1000, None))).await.unwrap());
    assert_eq!((r.decision, r.reason), (DecisionKind::Reject, Reason::Blacklisted));
    assert!(r.card_write.is_none());
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.display_code == Reason::Blacklisted.code()).await;
    assert!(ok, "{s:?}");
    assert!(!s.writes.iter().any(|w| matches!(w, SimWrite::Coil { addr: 0 | 1, value: true })));
    assert_eq!(agent.running.metrics.decisions_with_reason("blacklisted"), 1);
}

#[tokio::test]
async fn a_silent_plc_makes_the_gate_refuse_with_plc_offline_and_it_recovers_when_the_plc_answers() {
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    let mut reader = agent.reader().await;
    plc.sim.set_fault(Fault::Silence);
    let g = agent.running.gate.clone();
    eventually("the PLC to be seen offline", || (!g.plc().online()).then_some(())).await;
    let r = response(
        reader.tap(&svc_tap(Direction::Entry, card(3104_0000_0000_0002, 1000, None))).await.unwrap(),
    );
    assert_eq!((r.decision, r.reason, r.gate_seq), (DecisionKind::Reject, Reason::PlcOffline, None));
    assert!(agent.running.metrics.events("plc_offline") >= 1);
    plc.sim.set_fault(Fault::None);
    eventually("the PLC to be back", || g.plc().online().then_some(())).await;
    let r = response(
        reader.tap(&svc_tap(Direction::Entry, card(3104_0000_0000_0002, 1000, None))).await.unwrap(),
    );
    assert_eq!((r.decision, r.reason), (DecisionKind::OpenEntry, Reason::Ok));
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.entries_total == 1).await;
    assert!(ok, "{s:?}");
}

#[tokio::test]
async fn the_emergency_input_frees_the_passage_and_emergency_release_mode_holds_it_open() {
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    plc.sim.set_emergency_input(true);
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.free_passage).await;
    assert!(ok, "{s:?}");
    plc.sim.set_emergency_input(false);
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| !s.free_passage).await;
    assert!(ok, "{s:?}");
    let msg = afc_domain::wire::ModeMessage {
        version: 1,
        bits: afc_domain::mode::ModeBits::EMERGENCY_RELEASE,
        since: gate_agent::gate::now(),
        decided_at: None,
        history_ref: None,
        history: vec![],
    };
    agent.running.gate.apply_mode(msg).await.unwrap();
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.free_passage && s.flaps_open).await;
    assert!(ok, "{s:?}");
}

#[tokio::test]
async fn malformed_reader_lines_get_an_error_line_and_the_connection_lives_on() {
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    let mut reader = agent.reader().await;
    let answer = reader.raw(b"this is not json\n").await.unwrap();
    assert!(answer.contains("malformed_request"), "{answer}");
    let answer = reader.raw(b"{\"tap\":{\"direction\":\"sideways\"}}\n").await.unwrap();
    assert!(answer.contains("malformed_request"), "{answer}");
    let mut long = vec![b'x'; afc_domain::wire::MAX_READER_LINE + 10];
    long.push(b'\n');
    let answer = reader.raw(&long).await.unwrap();
    assert!(answer.contains("too_large"), "{answer}");
    let r = response(
        reader.tap(&svc_tap(Direction::Entry, card(3104_0000_0000_0003, 1000, None))).await.unwrap(),
    );
    assert_eq!(r.decision, DecisionKind::OpenEntry);
}

#[tokio::test]
async fn without_a_fare_table_taps_are_refused_with_no_parameters_and_not_recorded() {
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    let mut reader = agent.reader().await;
    let r = response(
        reader.tap(&svc_tap(Direction::Entry, card(3104_0000_0000_0004, 1000, None))).await.unwrap(),
    );
    assert_eq!((r.reason, r.gate_seq), (Reason::NoParameters, None));
    assert_eq!(agent.running.gate.store().depth(), 0);
}

#[tokio::test]
async fn out_of_service_and_direction_commands_change_what_the_gate_accepts() {
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    let g = agent.running.gate.clone();
    let cmd = |id: &str, command| afc_domain::wire::Command {
        id: id.into(),
        gate: g.gate.clone(),
        command,
        expires_at: afc_domain::model::Timestamp(i64::MAX),
    };
    let ack = g.command(&cmd("c1", CommandKind::OutOfService)).await;
    assert_eq!(ack.result, afc_domain::wire::CommandResult::Ok);
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.out_of_service).await;
    assert!(ok, "{s:?}");
    let mut reader = agent.reader().await;
    let r = response(
        reader.tap(&svc_tap(Direction::Entry, card(3104_0000_0000_0005, 1000, None))).await.unwrap(),
    );
    assert_eq!(r.reason, Reason::OutOfService);
    g.command(&cmd("c2", CommandKind::InService)).await;
    let exit_only = CommandKind::SetDirection { direction: afc_domain::wire::GateDirection::Exit };
    g.command(&cmd("c3", exit_only)).await;
    let r = response(
        reader.tap(&svc_tap(Direction::Entry, card(3104_0000_0000_0005, 1000, None))).await.unwrap(),
    );
    assert_eq!(r.reason, Reason::WrongDirection);
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.direction == 2 && !s.out_of_service).await;
    assert!(ok, "{s:?}");
    let again = g.command(&cmd("c1", CommandKind::OutOfService)).await;
    assert_eq!(again.detail.as_deref(), Some("already executed"));
    assert!(g.in_service(), "a redelivered command must not run twice");
}

#[tokio::test]
async fn the_metrics_endpoint_serves_the_gate_series_and_healthz_answers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    let mut reader = agent.reader().await;
    reader.tap(&svc_tap(Direction::Entry, card(3104_0000_0000_0006, 1000, None))).await.unwrap();
    for (path, needle) in [
        (
            "/metrics",
            "afc_gate_decisions_total{direction=\"entry\",media=\"svc\",reason=\"ok\",result=\"accept\"} 1",
        ),
        ("/healthz", "\"ok\":true"),
    ] {
        let mut s = tokio::net::TcpStream::connect(agent.metrics_addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains(needle), "{body}");
    }
}

#[tokio::test]
async fn the_reader_simulators_mixed_taps_are_all_answered_recorded_and_a_replayed_qr_code_is_refused() {
    use afc_domain::wire::TapMedia;
    use gate_agent::reader_sim::{Presented, QrIssuer, ReaderSim};
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    let issuer_key = agent.seed_qr_issuer();
    let origins = vec![afc_domain::model::StationCode(102), FAR];
    let qr = QrIssuer { issuer: 1, key_id: 1, key: issuer_key };
    let mut sim = ReaderSim::new(7, HERE, origins, 50, Some(qr));
    let mut reader = agent.reader().await;
    let mut recorded = 0u64;
    let mut qr_ok = 0;
    let mut last_qr = None;
    for _ in 0..150 {
        let (presented, tap) = sim.next_tap(gate_agent::gate::now());
        let r = response(reader.tap(&tap).await.unwrap());
        if r.gate_seq.is_some() {
            recorded += 1;
        }
        if matches!(presented, Presented::Qr) && r.reason == Reason::Ok {
            qr_ok += 1;
            last_qr = Some(tap.clone());
        }
        sim.apply(presented, &r);
    }
    assert!(qr_ok > 0, "no QR code was accepted");
    assert_eq!(agent.running.gate.store().depth(), recorded);
    let replay = last_qr.unwrap();
    assert!(matches!(replay.media, TapMedia::Qr { .. }));
    let r = response(reader.tap(&replay).await.unwrap());
    assert_eq!((r.decision, r.reason), (DecisionKind::Reject, Reason::QrReplayed));
}

#[tokio::test]
async fn an_sm2_signed_qr_code_opens_the_gate_beside_an_ed25519_issuer_and_a_forged_one_is_refused() {
    use afc_domain::model::{ParamKind, Timestamp};
    use afc_domain::qr::{self, QrAlgorithm, QrIssue, QrIssuerKey, QrKeySet, QrSigner};
    use afc_domain::wire::{TapMedia, TapRequest};
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    // A transport-standard issuer (SM2) and an app issuer (ed25519) in one `qr_keys` set.
    let sm2 = QrSigner::sm2_from_bytes(&[9u8; 32]).unwrap();
    let ed = QrSigner::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]));
    let key = |issuer: u16, s: &QrSigner| QrIssuerKey {
        issuer,
        key_id: 1,
        algorithm: s.algorithm(),
        public_key: s.public_key(),
        valid_from: Timestamp(0),
        valid_to: Timestamp::from_secs(4_000_000_000),
    };
    let keys = QrKeySet::new(vec![key(1, &ed), key(2, &sm2)]).unwrap();
    assert_eq!(keys.get(2, 1).map(|k| k.algorithm), Some(QrAlgorithm::Sm2));
    agent.seed(ParamKind::QrKeys, 1, Timestamp(0), serde_json::to_vec(&keys).unwrap());
    let tap = |issuer: u16, nonce: u64, signer: &QrSigner, flip: Option<usize>| {
        let issue = QrIssue {
            issuer,
            key_id: 1,
            account: 77,
            issued_at: gate_agent::gate::now(),
            valid_secs: 60,
            nonce,
        };
        let mut code = qr::generate_with(&issue, signer);
        if let Some(at) = flip {
            code[at] ^= 1;
        }
        TapRequest { direction: Direction::Entry, media: TapMedia::Qr { code: qr::encode_text(&code) } }
    };
    let mut reader = agent.reader().await;
    let r = response(reader.tap(&tap(2, 1, &sm2, None)).await.unwrap());
    assert_eq!((r.decision, r.reason), (DecisionKind::OpenEntry, Reason::Ok), "{r:?}");
    let r = response(reader.tap(&tap(1, 2, &ed, None)).await.unwrap());
    assert_eq!((r.decision, r.reason), (DecisionKind::OpenEntry, Reason::Ok), "{r:?}");
    // A flipped signature bit, and an SM2 code presented under the ed25519 issuer's name.
    let r = response(reader.tap(&tap(2, 3, &sm2, Some(qr::QR_CODE_LEN - 5))).await.unwrap());
    assert_eq!((r.decision, r.reason), (DecisionKind::Reject, Reason::QrBadSignature), "{r:?}");
    let r = response(reader.tap(&tap(1, 4, &sm2, None)).await.unwrap());
    assert_eq!((r.decision, r.reason), (DecisionKind::Reject, Reason::QrBadSignature), "{r:?}");
    // The accepted SM2 code cannot be used twice.
    let r = response(reader.tap(&tap(2, 1, &sm2, None)).await.unwrap());
    assert_eq!((r.decision, r.reason), (DecisionKind::Reject, Reason::QrReplayed), "{r:?}");
    // Every tap, refusals included, is recorded.
    assert_eq!(agent.running.gate.store().depth(), 5);
}
