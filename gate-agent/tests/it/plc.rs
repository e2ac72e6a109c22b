//! The Modbus task against the PLC simulator.

use std::time::Duration;

use gate_agent::metrics::Metrics;
use gate_agent::plc::{self, Aisle, PlcConfig, PlcError, PlcEvent};
use gate_agent::plc_sim::{Fault, PlcSim, SimConfig, SimWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(10);

struct Rig {
    sim: PlcSim,
    plc: plc::PlcHandle,
    metrics: std::sync::Arc<Metrics>,
    cancel: CancellationToken,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn rig() -> Rig {
    let sim = PlcSim::new(SimConfig { passage: Duration::from_millis(20), ..SimConfig::default() });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let s = sim.clone();
    let c = cancel.clone();
    tokio::spawn(async move { s.serve(listener, c).await });
    let metrics = Metrics::new();
    let mut cfg = PlcConfig::new(addr);
    cfg.call_timeout = Duration::from_millis(150);
    cfg.poll_interval = Duration::from_millis(20);
    let plc = plc::spawn(cfg, metrics.clone(), cancel.clone());
    let mut online = plc.online_watch();
    tokio::time::timeout(DEADLINE, online.wait_for(|o| *o)).await.unwrap().unwrap();
    Rig { sim, plc, metrics, cancel }
}

#[tokio::test]
async fn an_open_command_writes_the_display_then_the_coil_and_the_passage_is_counted() {
    let r = rig().await;
    r.plc.open(Aisle::Exit, 0, 240).await.unwrap();
    let (s, ok) = r.sim.wait_for(DEADLINE, |s| s.exits_total == 1 && !s.open_exit).await;
    assert!(ok, "{s:?}");
    assert_eq!((s.display_code, s.display_fen), (0, 240));
    let coil_writes: Vec<_> =
        s.writes.iter().filter(|w| matches!(w, SimWrite::Coil { addr: 1, .. })).collect();
    assert_eq!(coil_writes, vec![&SimWrite::Coil { addr: 1, value: true }]);
}

#[tokio::test]
async fn a_silent_plc_goes_offline_and_comes_back_when_it_answers() {
    let r = rig().await;
    let mut events = r.plc.subscribe_events();
    r.sim.set_fault(Fault::Silence);
    let mut online = r.plc.online_watch();
    tokio::time::timeout(DEADLINE, online.wait_for(|o| !*o)).await.unwrap().unwrap();
    assert_eq!(r.plc.open(Aisle::Entry, 0, 0).await, Err(PlcError::Offline));
    assert!(r.metrics.modbus_errors() > 0);
    r.sim.set_fault(Fault::None);
    tokio::time::timeout(DEADLINE, online.wait_for(|o| *o)).await.unwrap().unwrap();
    r.plc.open(Aisle::Entry, 0, 0).await.unwrap();
    let mut seen = vec![];
    while let Ok(ev) = events.try_recv() {
        seen.push(ev);
    }
    assert!(seen.contains(&PlcEvent::Offline) && seen.contains(&PlcEvent::Online), "{seen:?}");
}

#[tokio::test]
async fn exceptions_and_dropped_connections_are_survived() {
    let r = rig().await;
    for fault in [Fault::Exception, Fault::Disconnect] {
        r.sim.set_fault(fault);
        let mut online = r.plc.online_watch();
        let _ = r.plc.show(24, 0).await;
        tokio::time::timeout(DEADLINE, online.wait_for(|o| !*o)).await.unwrap().unwrap();
        r.sim.set_fault(Fault::None);
        tokio::time::timeout(DEADLINE, online.wait_for(|o| *o)).await.unwrap().unwrap();
        r.plc.show(24, 0).await.unwrap();
    }
    r.sim.set_fault(Fault::Delay(20));
    r.plc.show(21, 5).await.unwrap();
    assert_eq!(r.sim.snapshot().display_code, 21);
}

#[tokio::test]
async fn the_emergency_input_frees_the_passage_without_any_controller() {
    let r = rig().await;
    let mut events = r.plc.subscribe_events();
    r.sim.set_emergency_input(true);
    let (s, ok) = r.sim.wait_for(DEADLINE, |s| s.free_passage && s.flaps_open).await;
    assert!(ok, "{s:?}");
    let ev = tokio::time::timeout(DEADLINE, events.recv()).await.unwrap().unwrap();
    assert_eq!(ev, PlcEvent::EmergencyInput(true));
    r.sim.set_emergency_input(false);
    let (s, ok) = r.sim.wait_for(DEADLINE, |s| !s.free_passage).await;
    assert!(ok, "{s:?}");
}

#[tokio::test]
async fn tailgating_and_forced_passages_raise_alarms() {
    let r = rig().await;
    let mut events = r.plc.subscribe_events();
    r.sim.tailgate();
    r.sim.force_passage(true);
    let mut seen = vec![];
    while seen.len() < 2 {
        seen.push(tokio::time::timeout(DEADLINE, events.recv()).await.unwrap().unwrap());
    }
    assert!(seen.contains(&PlcEvent::Tailgating(1)), "{seen:?}");
    assert!(seen.contains(&PlcEvent::ForcedPassage(Aisle::Entry)), "{seen:?}");
}

#[tokio::test]
async fn settings_made_while_offline_are_applied_when_the_plc_returns() {
    let r = rig().await;
    r.sim.set_fault(Fault::Silence);
    let mut online = r.plc.online_watch();
    tokio::time::timeout(DEADLINE, online.wait_for(|o| !*o)).await.unwrap().unwrap();
    r.plc.set_out_of_service(true).await.unwrap();
    r.sim.set_fault(Fault::None);
    let (s, ok) = r.sim.wait_for(DEADLINE, |s| s.out_of_service).await;
    assert!(ok, "{s:?}");
}
