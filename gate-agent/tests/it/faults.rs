//! The gate's own faults (issue 11 items 6 and 8): a PLC unreachable from the start, taps under
//! the hard-wired emergency input, and release on the loss of the controllers (not only of the
//! broker).

use std::time::{Duration, Instant};

use afc_domain::wire::AlarmKind;

use crate::harness::*;

/// The agent's `/metrics` text.
async fn metrics_text(agent: &Agent) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(agent.metrics_addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

#[tokio::test]
async fn a_plc_unreachable_from_the_start_raises_plc_offline_at_once() {
    let port = free_port();
    start_broker(port).await;
    let controller = Controller::connect(port).await;
    // Nothing listens there: every connect is refused from the first attempt on.
    let nowhere: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let started = Instant::now();
    let agent = Agent::start_unchecked(port, nowhere, "").await;
    let raised = |c: &Controller| {
        c.events.lock().unwrap().iter().any(|e| e.kind == AlarmKind::PlcOffline && !e.cleared)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !raised(&controller) {
        assert!(
            Instant::now() < deadline,
            "no plc_offline alarm within 5 s of the start; events: {:?}",
            controller.events.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    println!("plc_offline alarm at the controller {took:?} after the agent started");
    assert!(controller.unverified.lock().unwrap().is_empty(), "{:?}", controller.unverified.lock().unwrap());
    assert!(!agent.running.gate.plc().online());
    let text = metrics_text(&agent).await;
    assert!(text.contains("afc_gate_plc_online 0"), "{text}");
    assert!(text.contains("afc_gate_events_total{kind=\"plc_offline\"} 1"), "{text}");
    // Announced once, not at every failed reconnect.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = controller.events.lock().unwrap().iter().filter(|e| e.kind == AlarmKind::PlcOffline).count();
    assert_eq!(n, 1, "{:?}", controller.events.lock().unwrap());
}

fn response(r: afc_domain::wire::ReaderReply) -> afc_domain::wire::ReaderResponse {
    match r {
        afc_domain::wire::ReaderReply::Response(r) => r,
        afc_domain::wire::ReaderReply::Error(e) => panic!("reader error {e:?}"),
    }
}

#[tokio::test]
async fn under_the_hard_wired_emergency_input_taps_follow_the_emergency_rules() {
    use afc_domain::mode::ModeBits;
    use afc_domain::model::{Direction, Reason};
    use afc_domain::wire::{DecisionKind, ModeMessage};
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    let g = agent.running.gate.clone();
    let mut reader = agent.reader().await;
    let entered = gate_agent::gate::now().plus_minutes(-30);
    let exit = svc_tap(Direction::Exit, card(3104_0000_0000_0011, 1000, Some((FAR, entered))));
    let answer =
        |r: &afc_domain::wire::ReaderResponse| (r.decision, r.reason, r.fare_fen, r.card_write.is_some());

    plc.sim.set_emergency_input(true);
    eventually("the emergency input to be read", || g.plc().last_inputs().emergency_input.then_some(()))
        .await;
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.free_passage && s.flaps_open).await;
    assert!(ok, "{s:?}");
    let under_input = response(reader.tap(&exit).await.unwrap());
    assert_eq!(answer(&under_input), (DecisionKind::OpenExit, Reason::OkEmergencyRelease, 0, false));
    let stored = g.store().pending(0, 10, 1 << 20).unwrap();
    let rec = gate_agent::gate::decode_record(&stored[0].1).unwrap();
    assert_eq!((rec.fare_fen, rec.reason), (0, Reason::OkEmergencyRelease));
    assert!(rec.modes.has(ModeBits::EMERGENCY_RELEASE), "{:?}", rec.modes);

    plc.sim.set_emergency_input(false);
    eventually("the emergency input to clear", || (!g.plc().last_inputs().emergency_input).then_some(()))
        .await;
    let normal = response(reader.tap(&exit).await.unwrap());
    assert_eq!(answer(&normal), (DecisionKind::OpenExit, Reason::Ok, 400, true));

    // The API's emergency release answers the same tap the same way.
    let msg = ModeMessage {
        version: 1,
        bits: ModeBits::EMERGENCY_RELEASE,
        since: gate_agent::gate::now(),
        decided_at: None,
        history_ref: None,
        history: vec![],
    };
    g.apply_mode(msg).await.unwrap();
    let under_mode = response(reader.tap(&exit).await.unwrap());
    assert_eq!(answer(&under_mode), answer(&under_input));
}

#[tokio::test]
async fn with_the_broker_up_and_the_controllers_offline_too_long_the_gate_releases() {
    use afc_domain::model::{ParamKind, Timestamp};
    use afc_domain::wire::{self, LeaderState, Offline, StationState};
    use gate_agent::params::GateConfigBody;
    const LIMIT_SECS: u64 = 2;
    let port = free_port();
    start_broker(port).await;
    let controller = Controller::connect(port).await;
    let state_topic = format!("afc/v1/{STATION}/state");
    // The leader seals every `state` (its will too) with the station key.
    let online_msg = |node, term| {
        StationState::Online(LeaderState { leader_node: node, term, since: gate_agent::gate::now() })
    };
    let online = |node, term| signed(&state_topic, &online_msg(node, term));
    let offline = |node, term| {
        signed(&state_topic, &StationState::Offline(Offline { leader_node: Some(node), term: Some(term) }))
    };
    controller.publish(state_topic.clone(), true, online(1, 1)).await;
    let plc = plc().await;
    let agent = Agent::start_in_dir(tempfile::tempdir().unwrap(), port, &plc, "").await;
    let g = agent.running.gate.clone();
    eventually("the gate's MQTT session", || {
        g.mqtt_connected.load(std::sync::atomic::Ordering::Relaxed).then_some(())
    })
    .await;
    let body =
        GateConfigBody { release_on_controller_loss_secs: Some(LIMIT_SECS), ..GateConfigBody::default() };
    agent.seed(ParamKind::GateConfig, 1, Timestamp(0), serde_json::to_vec(&body).unwrap());
    // Broker and controllers up: no release.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!plc.sim.snapshot().free_passage && !g.free_passage());

    // The leader's will: the broker stays up, the controllers are gone.
    let t0 = Instant::now();
    controller.publish(state_topic.clone(), true, offline(1, 1)).await;
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.free_passage).await;
    assert!(ok, "never released: {s:?}");
    let released_after = t0.elapsed();
    println!("released {released_after:?} after the controllers' offline state (limit {LIMIT_SECS} s)");
    assert!(released_after >= Duration::from_secs(LIMIT_SECS), "{released_after:?}");
    assert!(released_after < Duration::from_secs(LIMIT_SECS + 2), "{released_after:?}");
    eventually("the controller_lost alarm", || {
        controller
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.kind == AlarmKind::ControllerLost && !e.cleared)
            .then_some(())
    })
    .await;

    // A leader announces itself: the passage is restored.
    let t1 = Instant::now();
    controller.publish(state_topic.clone(), true, online(2, 2)).await;
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| !s.free_passage).await;
    assert!(ok, "never restored: {s:?}");
    let restored_after = t1.elapsed();
    println!("restored {restored_after:?} after the online state");
    assert!(restored_after < Duration::from_secs(1), "{restored_after:?}");
    eventually("the controller_lost alarm cleared", || {
        controller
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.kind == AlarmKind::ControllerLost && e.cleared)
            .then_some(())
    })
    .await;

    // A former leader's late will (older term) says nothing of the current leader.
    controller.publish(state_topic.clone(), true, offline(1, 1)).await;
    tokio::time::sleep(Duration::from_millis(LIMIT_SECS * 1000 + 1500)).await;
    assert!(!plc.sim.snapshot().free_passage && !g.free_passage());

    // A forged `state` on the station LAN: unsigned, it changes nothing. Taken, the online one
    // naming a far newer term would make the real leader's will below look stale, and the gate
    // would never release; the offline one would start the release.
    let m = agent.running.metrics.clone();
    controller.publish(state_topic.clone(), true, wire::encode(&online_msg(9, 1_000))).await;
    controller
        .publish(
            state_topic.clone(),
            true,
            wire::encode(&StationState::Offline(Offline { leader_node: Some(2), term: Some(2) })),
        )
        .await;
    eventually("both forged states refused", || {
        (m.unverified_messages("state", "malformed") == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(LIMIT_SECS * 1000 + 1500)).await;
    assert!(!plc.sim.snapshot().free_passage, "a forged offline state released the gate");
    // The real leader's will still releases.
    controller.publish(state_topic.clone(), true, offline(2, 2)).await;
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.free_passage).await;
    assert!(ok, "the genuine will after a forged newer term never released: {s:?}");
}
