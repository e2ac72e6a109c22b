//! The real `gate-agent` binary, killed with SIGKILL and restarted, and stopped with SIGTERM.

use std::process::{Child, Command, Stdio};

use afc_domain::model::{Direction, ParamKind, Reason, Timestamp};
use afc_domain::wire::ReaderReply;
use gate_agent::reader_sim::ReaderConn;

use crate::harness::*;

/// The agent process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(config: &std::path::Path, log: &std::path::Path) -> Proc {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_gate-agent"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap();
    Proc(child)
}

async fn connect(addr: std::net::SocketAddr) -> ReaderConn {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(c) = ReaderConn::connect(addr).await {
            return c;
        }
        assert!(tokio::time::Instant::now() < deadline, "the agent's reader port never opened");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_agent_killed_between_answering_and_the_ack_resends_after_restart_and_each_tap_is_counted_once() {
    let plc = plc().await;
    let port = free_port();
    start_broker(port).await;
    let controller = Controller::connect(port).await;
    controller.acking.store(false, std::sync::atomic::Ordering::SeqCst);
    let fares = package(ParamKind::FareTable, 1, Timestamp(0), fare_body(100), &package_key());
    controller.publish_package(ParamKind::FareTable, &fares, 1, Timestamp(0)).await;

    let dir = tempfile::tempdir().unwrap();
    let reader_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = write_config(dir.path(), port, plc.addr, reader_addr, "");
    let log = dir.path().join("agent.log");
    let mut agent = spawn(&config, &log);
    let mut reader = connect(reader_addr).await;
    // Wait until the fare table arrived and the PLC is online: then taps open.
    let mut id = 3104_0000_0000_5000u64;
    let mut answered = vec![];
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while answered.len() < 10 {
        id += 1;
        let r = reader.tap(&svc_tap(Direction::Entry, card(id, 1000, None))).await.unwrap();
        let ReaderReply::Response(r) = r else { panic!("{r:?}") };
        if r.reason == Reason::Ok {
            answered.push(r.gate_seq.unwrap());
        } else {
            assert!(matches!(r.reason, Reason::NoParameters | Reason::PlcOffline), "{r:?}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent never became ready; see {}",
                log.display()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    assert_eq!(answered, (1..=10).collect::<Vec<_>>());
    eventually("the batch to reach the controller", || {
        (*controller.received.lock().unwrap() >= 10).then_some(())
    })
    .await;
    // SIGKILL: no shutdown path runs. The controller has not acked anything.
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    drop(reader);
    let before = *controller.received.lock().unwrap();
    controller.acking.store(true, std::sync::atomic::Ordering::SeqCst);

    let _agent = spawn(&config, &log);
    eventually("the re-sent records", || (*controller.received.lock().unwrap() >= before + 10).then_some(()))
        .await;
    let mut reader = connect(reader_addr).await;
    let next = loop {
        id += 1;
        let r = reader.tap(&svc_tap(Direction::Entry, card(id, 1000, None))).await.unwrap();
        let ReaderReply::Response(r) = r else { panic!("{r:?}") };
        if r.reason == Reason::Ok {
            break r.gate_seq.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(next, 11, "gate_seq continues after the restart, never reused");
    eventually("tap 11 in the ledger", || (controller.ledger_len() == 11).then_some(())).await;
    let ledger = controller.ledger.lock().unwrap();
    assert_eq!(ledger.keys().copied().collect::<Vec<_>>(), (1..=11).collect::<Vec<_>>());
    // Every card that opened before the kill is in the ledger exactly once.
    let ids: std::collections::BTreeSet<u64> = ledger.values().map(|r| r.id).collect();
    assert_eq!(ids.len(), 11);
}

#[tokio::test]
async fn sigterm_stops_the_agent_cleanly_with_every_task_joined_within_the_deadline() {
    let plc = plc().await;
    let port = free_port();
    start_broker(port).await;
    let controller = Controller::connect(port).await;
    let dir = tempfile::tempdir().unwrap();
    let reader_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = write_config(dir.path(), port, plc.addr, reader_addr, "");
    let log = dir.path().join("agent.log");
    let mut agent = spawn(&config, &log);
    // A reader connected and the broker session up: every task is busy with something.
    let _reader = connect(reader_addr).await;
    eventually("the gate's birth", || (!controller.status.lock().unwrap().is_empty()).then_some(())).await;
    let pid = agent.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline =
        std::time::Instant::now() + gate_agent::SHUTDOWN_DEADLINE + std::time::Duration::from_secs(5);
    let exit = loop {
        if let Some(s) = agent.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not exit after SIGTERM; see {}",
            log.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "exit status {exit:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    let order = ["shutdown 1/2", "shutdown 2/2", "gate agent stopped"];
    let positions: Vec<usize> = order.iter().map(|s| text.find(s).unwrap_or(usize::MAX)).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1] && w[1] != usize::MAX),
        "shutdown order {positions:?}: {text}"
    );
    assert!(!text.contains("did not stop"), "{text}");
}
