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
