//! Uploads to the station through the embedded broker.

use std::sync::atomic::Ordering;

use afc_domain::ledger::TxRecord;
use afc_domain::model::{Direction, Reason};
use afc_domain::wire::{DecisionKind, ReaderReply};

use crate::harness::*;

#[tokio::test]
async fn with_no_broker_taps_are_decided_and_buffered_and_once_a_broker_appears_they_are_uploaded_and_acked_with_none_lost(
) {
    let plc = plc().await;
    let port = free_port();
    let agent = Agent::start(port, &plc).await;
    agent.seed_defaults();
    let mut reader = agent.reader().await;
    for i in 0..20u64 {
        let r =
            reader.tap(&svc_tap(Direction::Entry, card(3104_0000_0000_1000 + i, 1000, None))).await.unwrap();
        assert!(matches!(r, ReaderReply::Response(ref r) if r.decision == DecisionKind::OpenEntry), "{r:?}");
    }
    assert_eq!(agent.running.gate.store().depth(), 20);
    start_broker(port).await;
    let controller = Controller::connect(port).await;
    let g = agent.running.gate.clone();
    eventually("the outbox to drain", || (g.store().depth() == 0).then_some(())).await;
    assert_eq!(controller.ledger_len(), 20);
    let seqs: Vec<u64> = controller.ledger.lock().unwrap().keys().copied().collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    assert_eq!(*controller.forged_batches.lock().unwrap(), 0);
    assert_eq!(agent.running.metrics.acked_seq.load(Ordering::Relaxed), 20);
    // Taps after the broker appeared go up at once.
    reader.tap(&svc_tap(Direction::Entry, card(3104_0000_0000_2000, 1000, None))).await.unwrap();
    eventually("the new tap to be acked", || {
        (controller.ledger_len() == 21 && g.store().depth() == 0).then_some(())
    })
    .await;
    // The birth message is retained with the session.
    assert!(controller.status.lock().unwrap().iter().any(|s| s.contains("\"online\":true")));
}

#[tokio::test]
async fn commands_over_mqtt_are_executed_and_acked() {
    let plc = plc().await;
    let port = free_port();
    start_broker(port).await;
    let controller = Controller::connect(port).await;
    let _agent = Agent::start(port, &plc).await;
    eventually("the gate's birth", || (!controller.status.lock().unwrap().is_empty()).then_some(())).await;
    let cmd = afc_domain::wire::Command {
        id: "open-1".into(),
        gate: afc_domain::model::Ident::new(GATE).unwrap(),
        command: afc_domain::wire::CommandKind::OpenOnceEntry,
        expires_at: afc_domain::model::Timestamp(i64::MAX),
    };
    controller.publish_signed(format!("afc/v1/{STATION}/gates/{GATE}/cmd"), false, &cmd).await;
    let ack = eventually("the command ack", || controller.cmd_acks.lock().unwrap().first().cloned()).await;
    assert_eq!((ack.id.as_str(), ack.result), ("open-1", afc_domain::wire::CommandResult::Ok));
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.entries_total == 1).await;
    assert!(ok, "{s:?}");
    // Everything the gate sent carried its signature.
    eventually("a heartbeat", || (!controller.heartbeats.lock().unwrap().is_empty()).then_some(())).await;
    assert!(controller.unverified.lock().unwrap().is_empty(), "{:?}", controller.unverified.lock().unwrap());
}

#[tokio::test]
async fn a_forged_ack_above_the_last_gate_seq_changes_nothing_and_raises_an_alarm() {
    let plc = plc().await;
    let port = free_port();
    start_broker(port).await;
    let controller = Controller::connect(port).await;
    controller.acking.store(false, Ordering::SeqCst);
    let agent = Agent::start(port, &plc).await;
    agent.seed_defaults();
    let mut reader = agent.reader().await;
    for i in 0..5u64 {
        reader.tap(&svc_tap(Direction::Entry, card(3104_0000_0000_3000 + i, 1000, None))).await.unwrap();
    }
    let g = agent.running.gate.clone();
    eventually("five records uploaded", || (controller.ledger_len() == 5).then_some(())).await;
    let topic = afc_domain::topic::Topic::GateTxAck {
        station: afc_domain::model::Ident::new(STATION).unwrap(),
        gate: afc_domain::model::Ident::new(GATE).unwrap(),
    };
    // Even signed by the station and naming this installation (a controller bug, or a stolen
    // key), an ack above the last gate_seq is refused.
    let installation = Some(g.store().installation().to_owned());
    assert_eq!(*controller.installation.lock().unwrap(), installation, "batches name the installation");
    let forged = afc_domain::wire::TxAck { through_seq: u64::MAX, installation };
    controller.publish_signed(topic.to_string(), false, &forged).await;
    eventually("the alarm", || {
        controller
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.kind == afc_domain::wire::AlarmKind::AckBeyondLastSeq)
            .then_some(())
    })
    .await;
    // Nothing was dropped and numbering goes on from where it was.
    assert_eq!(g.store().depth(), 5);
    assert_eq!(g.store().acked_through().unwrap(), 0);
    let r = reader.tap(&svc_tap(Direction::Entry, card(3104_0000_0000_3100, 1000, None))).await.unwrap();
    assert!(matches!(r, ReaderReply::Response(ref r) if r.gate_seq == Some(6)), "{r:?}");
    // A true ack still works.
    controller.acking.store(true, Ordering::SeqCst);
    eventually("the outbox to drain", || (g.store().depth() == 0).then_some(())).await;
}

#[tokio::test]
async fn a_stopped_gate_joins_every_task_within_the_deadline_and_keeps_its_unacknowledged_taps() {
    let plc = plc().await;
    let port = free_port();
    start_broker(port).await;
    let controller = Controller::connect(port).await;
    controller.acking.store(false, Ordering::SeqCst);
    let agent = Agent::start(port, &plc).await;
    agent.seed_defaults();
    eventually("the gate's birth", || (!controller.status.lock().unwrap().is_empty()).then_some(())).await;
    let names = agent.running.task_names();
    for name in
        ["plc", "mqtt-eventloop", "mqtt-session", "mqtt-inbox", "mqtt-upload", "reader", "storage-probe"]
    {
        assert!(names.contains(&name), "{name} not held: {names:?}");
    }
    // A reader stays connected across the stop: its connection is joined too.
    let mut reader = agent.reader().await;
    for i in 0..3u64 {
        let r =
            reader.tap(&svc_tap(Direction::Entry, card(3104_0000_0000_3000 + i, 1000, None))).await.unwrap();
        assert!(matches!(r, ReaderReply::Response(ref r) if r.decision == DecisionKind::OpenEntry), "{r:?}");
    }
    assert_eq!(agent.running.gate.store().depth(), 3);
    let started = tokio::time::Instant::now();
    let (late, dir) = agent.shut_down(gate_agent::SHUTDOWN_DEADLINE).await;
    assert!(late.is_empty(), "tasks that did not stop: {late:?}");
    assert!(started.elapsed() < gate_agent::SHUTDOWN_DEADLINE, "stopped in {:?}", started.elapsed());
    // Nothing is lost: the next agent on the same directory holds every unacknowledged tap (and
    // may hold more: on a slow machine a passage window can close before the stop, and the gate
    // then adds the tap's compensating `passage_not_made` record).
    let agent = Agent::start_in_dir(dir, port, &plc, "").await;
    let held: Vec<TxRecord> = agent
        .running
        .gate
        .store()
        .pending(0, 100, 1 << 20)
        .unwrap()
        .iter()
        .map(|(_, bytes)| TxRecord::from_canonical(bytes).unwrap())
        .collect();
    let taps: Vec<u64> = held.iter().filter(|r| r.accepted && r.voids.is_none()).map(|r| r.id).collect();
    assert_eq!(taps, (0..3).map(|i| 3104_0000_0000_3000 + i).collect::<Vec<_>>(), "{held:?}");
    assert!(held.iter().all(|r| r.voids.is_none() || r.reason == Reason::PassageNotMade), "{held:?}");
}
