//! The leader's MQTT duties against a real broker (the controller's embedded rumqttd, started in
//! the test process so it outlives the nodes the tests kill) and three real controller processes.

use std::collections::BTreeMap;

use std::time::{Duration, Instant};

use afc_domain::ledger::{sign_batch, sign_canonical_batch, CanonicalRecord, TxRecord};
use afc_domain::mode::ModeBits;
use afc_domain::model::{ParamKind, StationCode, Timestamp};
use afc_domain::package::{Package, Reassembler, TrustedKeys};
use afc_domain::topic::Topic;
use afc_domain::wire::Command as WireCommand;
use afc_domain::wire::{
    self, AlarmKind, CommandAck, CommandKind, CommandResult, GateBirth, GateCounters, GateDirection,
    GateEvent, GateStatus, HardwareInfo, Heartbeat, ModeMessage, ParamPointer, ParamState, ParamsAck,
    PlcEndpoint, QrUsed, QrUsedBatch, StationState, TxAck, TxBatch, WireMessage,
};
use controller::config::{BrokerMode, Config, LedgerConfig, Member, MqttConfig, RaftTuning};
use controller::leader::broker::Clients;
use controller::leader::{CommandError, Duties};
use controller::state::{Request, Response};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;

use crate::common::*;
use crate::harness::*;

/// Starts the embedded broker on a free port and waits until it accepts connections.
pub async fn start_broker() -> u16 {
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    controller::leader::broker::start(addr, 4 * 1024 * 1024, &Clients::Anyone).unwrap();
    poll("the broker to accept connections", Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).ok()
    })
    .await;
    port
}

/// Writes node `id`'s config with an `[mqtt]` section (broker on `port`, gate g01 seeded) and starts
/// it. With `embedded_on` = Some(id), that node runs the broker itself.
fn spawn_node(c: &mut Cluster, id: u64, port: u16, embedded_on: Option<u64>) {
    let addr = c.initial[&id].clone();
    let extra = format!(
        r#"
[mqtt]
broker = "{broker}"
embedded_listen = "127.0.0.1:{port}"
{open}address = "127.0.0.1:{port}"
client_id_prefix = "ctl"
station_code = 1
backoff_max_ms = 500

[[mqtt.gates]]
gate = "g01"
tx_public_key = "{key}"

[api]
{signing}"#,
        broker = if embedded_on == Some(id) { "embedded" } else { "external" },
        open = if embedded_on == Some(id) { "embedded_allow_anonymous = true\n" } else { "" },
        key = hex::encode(gate_key(1).verifying_key().to_bytes()),
        signing = station_key_config(&c.node_dir(id)),
    );
    let raft = "heartbeat_ms = 250\nelection_timeout_min_ms = 600\nelection_timeout_max_ms = 1200\nconnect_timeout_ms = 200\n";
    c.spawn_with(
        id,
        addr,
        id == 1,
        &NodeSetup { raft, extra: &extra, rust_log: "info,openraft=warn,rumqttc=warn" },
    );
}

async fn start_cluster(port: u16, embedded_on: Option<u64>) -> Cluster {
    let mut c = Cluster::unstarted(3, Duration::from_secs(15));
    for id in 1..=3 {
        spawn_node(&mut c, id, port, embedded_on);
    }
    c.wait_leader(Duration::from_secs(20), None).await;
    c
}

/// A stand-in gate: an MQTT client whose event loop a task polls, publishes forwarded here.
pub(crate) struct FakeGate {
    pub(crate) client: AsyncClient,
    pub(crate) rx: mpsc::UnboundedReceiver<Publish>,
}

impl FakeGate {
    pub(crate) async fn connect(port: u16, name: &str, filters: &[String]) -> FakeGate {
        let mut o = MqttOptions::new(name, "127.0.0.1", port);
        o.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(o, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let (up_tx, mut up_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = up_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        for f in filters {
            client.subscribe(f.clone(), QoS::AtLeastOnce).await.unwrap();
        }
        for _ in filters {
            tokio::time::timeout(Duration::from_secs(10), up_rx.recv()).await.unwrap().unwrap();
        }
        FakeGate { client, rx }
    }

    /// The next message for which `f` returns Some, within `timeout`.
    pub(crate) async fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Publish) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(p)) => {
                    if let Some(v) = f(&p) {
                        return v;
                    }
                }
                _ => panic!("timed out waiting for {what}"),
            }
        }
    }

    /// No message matching `f` arrives within `window`.
    pub(crate) async fn none_within(&mut self, window: Duration, mut f: impl FnMut(&Publish) -> bool) {
        let deadline = Instant::now() + window;
        while let Ok(Some(p)) =
            tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), self.rx.recv()).await
        {
            assert!(!f(&p), "unexpected message on {}", p.topic);
        }
    }

    pub async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).await.unwrap();
    }

    /// Publishes `msg` on `topic` signed as gate `key_n` signs ([`gate_key`]).
    pub async fn publish_signed<T: WireMessage>(&self, topic: &str, msg: &T, key_n: u8) {
        self.publish(topic, gate_seal(topic, msg, key_n)).await;
    }
}

fn topic(t: &str) -> String {
    format!("afc/v1/s1/{t}")
}

/// The installation id the tests' gates put in their batches.
pub fn installation(gate: &str) -> Option<String> {
    Some(format!("inst-{gate}"))
}

pub fn tx_batch(gate: &str, key_n: u8, seqs: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    let records: Vec<TxRecord> = seqs.map(|s| record("s1", gate, s)).collect();
    let sig = sign_batch(&ident("s1"), &ident(gate), &records, &gate_key(key_n));
    wire::encode(&TxBatch {
        station: ident("s1"),
        gate: ident(gate),
        records: Some(records),
        raw: None,
        signature: hex::encode(sig),
        installation: installation(gate),
        covers_from: None,
    })
}

/// [`tx_batch`] as gates send it now: each record's canonical bytes in `raw`, covering from the
/// first of `seqs`.
pub fn tx_batch_raw(gate: &str, key_n: u8, seqs: std::ops::RangeInclusive<u64>) -> Vec<u8> {
    let covers_from = Some(*seqs.start());
    let records: Vec<CanonicalRecord> = seqs.map(|s| CanonicalRecord::from(record("s1", gate, s))).collect();
    let sig = sign_canonical_batch(&ident("s1"), &ident(gate), covers_from, &records, &gate_key(key_n));
    wire::encode(&TxBatch {
        station: ident("s1"),
        gate: ident(gate),
        records: None,
        raw: Some(TxBatch::raw_of(&records)),
        signature: hex::encode(sig),
        installation: installation(gate),
        covers_from,
    })
}

/// Waits for the retained `state` naming `leader`.
async fn wait_state(g: &mut FakeGate, leader: u64) {
    let state = topic("state");
    g.wait_for(&format!("state naming leader {leader}"), Duration::from_secs(15), |p| {
        (p.topic == state)
            .then(|| open_from_station::<StationState>(&p.topic, &p.payload).ok())
            .flatten()
            .filter(|s| matches!(s, StationState::Online(l) if l.leader_node == leader))
    })
    .await;
}

/// Waits for g01's `tx/ack` through `through`, signed by the station and naming g01's installation.
async fn wait_ack(g: &mut FakeGate, through: u64) {
    let ack = topic("gates/g01/tx/ack");
    let want = TxAck { through_seq: through, installation: installation("g01") };
    g.wait_for(&format!("tx/ack through {through}"), Duration::from_secs(15), |p| {
        (p.topic == ack && open_from_station::<TxAck>(&p.topic, &p.payload).ok()? == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_batch_lands_on_all_three_nodes_is_acked_and_a_resend_after_failover_is_acked_again() {
    let _serial = CLUSTER_LOCK.lock().await;
    let port = start_broker().await;
    let mut c = start_cluster(port, None).await;
    let leader = c.wait_leader(Duration::from_secs(10), None).await;
    let mut g = FakeGate::connect(port, "fake-g01", &[topic("state"), topic("gates/g01/tx/ack")]).await;
    wait_state(&mut g, leader).await;

    // Garbage, a batch of an unregistered gate, and a batch on another gate's topic: no ack, no harm.
    g.publish(&topic("gates/g01/tx"), b"{not json".to_vec()).await;
    g.publish(&topic("gates/g01/tx"), vec![0xff; 64]).await;
    g.publish(&topic("gates/g99/tx"), tx_batch("g99", 9, 1..=5)).await;
    g.publish(&topic("gates/g02/tx"), tx_batch("g01", 1, 1..=5)).await;

    let batch = tx_batch("g01", 1, 1..=10);
    g.publish(&topic("gates/g01/tx"), batch.clone()).await;
    wait_ack(&mut g, 10).await;
    c.wait_applied(c.leader_applied(leader).await, Duration::from_secs(10)).await;
    for id in 1..=3 {
        let ledger = c.ledger(id).await;
        assert_eq!(ledger.len(), 10, "node {id} holds the batch");
        assert!(ledger.iter().all(|e| e.record.gate.as_str() == "g01"), "node {id}: only g01's records");
    }

    // The leader dies; the same batch, re-sent to the next leader, changes nothing and is acked.
    c.nodes.get_mut(&leader).unwrap().kill();
    let next = c.wait_leader(Duration::from_secs(20), Some(leader)).await;
    wait_state(&mut g, next).await;
    g.publish(&topic("gates/g01/tx"), batch).await;
    wait_ack(&mut g, 10).await;
    // A batch in both forms, and one whose raw record is not canonical: refused, never acked.
    let mut both: TxBatch = wire::decode(&tx_batch_raw("g01", 1, 11..=12)).unwrap();
    both.records = Some(vec![record("s1", "g01", 11), record("s1", "g01", 12)]);
    g.publish(&topic("gates/g01/tx"), wire::encode(&both)).await;
    let mut trailing: TxBatch = wire::decode(&tx_batch_raw("g01", 1, 11..=12)).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let raw = &mut trailing.raw.as_mut().unwrap()[0];
    let mut bytes = base64::Engine::decode(&b64, raw.as_bytes()).unwrap();
    bytes.push(0);
    *raw = base64::Engine::encode(&b64, &bytes);
    g.publish(&topic("gates/g01/tx"), wire::encode(&trailing)).await;
    g.none_within(Duration::from_millis(500), |p| {
        p.topic.ends_with("tx/ack")
            && open_from_station::<TxAck>(&p.topic, &p.payload).is_ok_and(|a| a.through_seq > 10)
    })
    .await;
    // An upgraded gate sends its records' bytes as they are: the same ledger takes them.
    g.publish(&topic("gates/g01/tx"), tx_batch_raw("g01", 1, 11..=12)).await;
    wait_ack(&mut g, 12).await;
    c.wait_applied(c.leader_applied(next).await, Duration::from_secs(10)).await;
    for id in c.running() {
        assert_eq!(c.ledger(id).await.len(), 12, "node {id}: the re-sent batch was not counted twice");
    }
    // The unregistered gate was never acked.
    g.none_within(Duration::from_millis(200), |p| p.topic.contains("g99")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_node_running_the_broker_a_stored_package_is_published_as_chunks_then_a_pointer_and_an_emergency_release_within_a_second(
) {
    let _serial = CLUSTER_LOCK.lock().await;
    // Node 1 runs the embedded broker; every node connects to it.
    let port = free_port();
    let c = start_cluster(port, Some(1)).await;
    poll("node 1's broker to accept connections", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .await;
    let leader = c.wait_leader(Duration::from_secs(10), None).await;
    let kind = ParamKind::Blacklist;
    let mut g = FakeGate::connect(
        port,
        "fake-g02",
        &[topic("state"), topic("mode"), topic("params/+/current"), topic("params/blacklist/+/+")],
    )
    .await;
    wait_state(&mut g, leader).await;

    // A package of ~300 KB: two chunks. (openraft times an append out after one heartbeat, so a
    // debug build replicating a larger entry as JSON needs a longer heartbeat.)
    let signer = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let body: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let pkg = Package::sign(kind, 1, Timestamp::from_secs(1_800_000_000), body, 1, &signer).encode();
    let r = match c.write(leader, &Request::PutPackage { kind, version: 1, package: pkg.clone() }).await {
        Ok(r) => r,
        Err(e) => panic!("{e}\n{}", c.nodes[&leader].log()),
    };
    assert!(matches!(r, Response::PackageStored { version: 1, .. }), "{r:?}");

    let current = topic("params/blacklist/current");
    let mut chunks: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    let pointer: ParamPointer = g
        .wait_for("the blacklist pointer", Duration::from_secs(15), |p| {
            if let Ok(Topic::ParamChunk { chunk, version: 1, .. }) = Topic::parse(&p.topic) {
                chunks.insert(chunk, p.payload.to_vec());
            }
            (p.topic == current).then(|| wire::decode::<ParamPointer>(&p.payload).ok()).flatten()
        })
        .await;
    assert_eq!(pointer.version, 1);
    assert_eq!(pointer.chunks as usize, chunks.len(), "every chunk arrived before the pointer");
    let mut r = Reassembler::new(pointer.sha256_bytes().unwrap(), pointer.size, pointer.chunks).unwrap();
    for chunk in chunks.values() {
        r.add(chunk).unwrap();
    }
    let bytes = r.finish().unwrap();
    assert_eq!(bytes, pkg);
    let mut keys = TrustedKeys::new();
    keys.insert(1, signer.verifying_key());
    Package::decode(&bytes).unwrap().verify(&keys).unwrap();

    // Version 2 replaces it: its pointer follows, and version 1's chunks are cleared.
    let pkg2 =
        Package::sign(kind, 2, Timestamp::from_secs(1_800_000_050), vec![1; 2000], 1, &signer).encode();
    let r = c.write(leader, &Request::PutPackage { kind, version: 2, package: pkg2 }).await.unwrap();
    assert!(matches!(r, Response::PackageStored { version: 2, .. }), "{r:?}");
    let mut cleared = std::collections::BTreeSet::new();
    let mut pointer2 = None;
    g.wait_for("version 2's pointer and version 1's chunks cleared", Duration::from_secs(15), |p| {
        if let Ok(Topic::ParamChunk { chunk, version: 1, .. }) = Topic::parse(&p.topic) {
            if p.payload.is_empty() {
                cleared.insert(chunk);
            }
        }
        if p.topic == current {
            pointer2 = wire::decode::<ParamPointer>(&p.payload).ok();
        }
        (cleared.len() == chunks.len() && pointer2.as_ref().is_some_and(|p| p.version == 2)).then_some(())
    })
    .await;

    // Emergency release: the mode message reaches the gate within a second of the commit.
    let set = Request::SetMode {
        station: StationCode(1),
        bits: ModeBits::EMERGENCY_RELEASE,
        reason: "fire alarm drill".into(),
        actor: "test".into(),
        at: Timestamp::from_secs(1_800_000_100),
    };
    let r = c.write(leader, &set).await.unwrap();
    let committed = Instant::now();
    assert!(matches!(r, Response::ModeSet { .. }), "{r:?}");
    let mode = topic("mode");
    let m: ModeMessage = g
        .wait_for("the emergency mode", Duration::from_secs(5), |p| {
            (p.topic == mode)
                .then(|| open_from_station::<ModeMessage>(&p.topic, &p.payload).ok())
                .flatten()
                .filter(|m| m.bits.has(ModeBits::EMERGENCY_RELEASE))
        })
        .await;
    let took = committed.elapsed();
    assert!(took < Duration::from_secs(1), "mode published {took:?} after the commit");
    assert_eq!(m.since, Timestamp::from_secs(1_800_000_100));
    assert!(m.version > 0);
    assert!(!m.history.is_empty());

    // A scheduled window (SPEC §2: a start and an end time): the leader publishes the mode again
    // when it begins and when it ends, with no other change committed meanwhile.
    let from = Timestamp(controller::clock::now().0 + 1_500);
    let until = Timestamp(from.0 + 1_500);
    let schedule = Request::ScheduleMode {
        station: StationCode(1),
        bits: ModeBits::CLOSED,
        from,
        until,
        reason: "night works".into(),
        actor: "test".into(),
        at: controller::clock::now(),
    };
    let r = c.write(leader, &schedule).await.unwrap();
    assert!(matches!(r, Response::ModeScheduled { .. }), "{r:?}");
    let mut seen: Vec<(Timestamp, ModeMessage)> = Vec::new();
    g.wait_for("the window's start and end", Duration::from_secs(10), |p| {
        if let Some(m) =
            (p.topic == mode).then(|| open_from_station::<ModeMessage>(&p.topic, &p.payload).ok()).flatten()
        {
            seen.push((controller::clock::now(), m));
        }
        let closed = seen.iter().position(|(_, m)| m.bits.has(ModeBits::CLOSED));
        closed.and_then(|i| seen[i..].iter().position(|(_, m)| !m.bits.has(ModeBits::CLOSED))).map(|_| ())
    })
    .await;
    let start = seen.iter().find(|(_, m)| m.bits.has(ModeBits::CLOSED)).unwrap();
    let end = seen
        .iter()
        .skip_while(|(_, m)| !m.bits.has(ModeBits::CLOSED))
        .find(|(_, m)| !m.bits.has(ModeBits::CLOSED))
        .unwrap();
    println!("window {from:?}..{until:?}: published with closed at {:?}, without at {:?}", start.0, end.0);
    assert!(start.0 >= from && start.0 .0 < from.0 + 500, "start published at {:?}", start.0);
    assert!(end.0 >= until && end.0 .0 < until.0 + 500, "end published at {:?}", end.0);
    assert!(start.1.bits.has(ModeBits::EMERGENCY_RELEASE) && end.1.bits.has(ModeBits::EMERGENCY_RELEASE));
    assert!(m.version < start.1.version && start.1.version < end.1.version);
}

/// One node in this process, bootstrapped alone, with the embedded broker and the leader duties.
async fn single_node(
    root: &std::path::Path,
) -> (std::sync::Arc<controller::node::Node>, std::sync::Arc<Duties>, u16) {
    let port = free_port();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mqtt = MqttConfig {
        broker: BrokerMode::Embedded,
        embedded_allow_anonymous: true,
        embedded_listen: format!("127.0.0.1:{port}").parse().unwrap(),
        address: format!("127.0.0.1:{port}"),
        station_code: Some(1),
        command_timeout_ms: 700,
        clock_drift_alarm_ms: 2000,
        ..MqttConfig::default()
    };
    let cfg = Config {
        node_id: 1,
        station: ident("s1"),
        data_dir: root.join("data"),
        listen,
        advertise: None,
        bootstrap: true,
        initial_members: vec![Member { id: 1, addr: listen.to_string() }],
        cluster_secret_file: None,
        raft: RaftTuning::default(),
        ledger: LedgerConfig::default(),
        mqtt: Some(mqtt.clone()),
        api: controller::config::ApiConfig {
            signing_key_file: Some(root.join("station-signing.key")),
            signing_key_id: STATION_KEY_ID,
            ..Default::default()
        },
        clearing: Default::default(),
        tls: None,
        rollout: Default::default(),
        cluster_secret: SECRET.into(),
    };
    station_key_config(root);
    let node = controller::node::Node::start(std::sync::Arc::new(cfg)).await.unwrap();
    node.raft
        .wait(Some(Duration::from_secs(10)))
        .state(openraft::ServerState::Leader, "single node leads")
        .await
        .unwrap();
    controller::leader::broker::start(mqtt.embedded_listen, mqtt.max_packet_bytes, &Clients::Anyone).unwrap();
    // g01 is registered before the duties start: the session reads its key at once.
    let r = node.raft.client_write(register("g01", &gate_key(1))).await.unwrap();
    assert!(matches!(r.data, Response::GateRegistered { .. }), "{:?}", r.data);
    let duties = Duties::new(node.clone(), mqtt, Default::default()).unwrap();
    (node, duties, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_answered_gates_are_tracked_and_used_qr_codes_are_relayed_to_every_gate() {
    let _serial = CLUSTER_LOCK.lock().await;
    let root = tempfile::tempdir().unwrap();
    let (node, duties, port) = single_node(root.path()).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let supervisor = controller::leader::spawn(duties.clone(), stop.clone());
    poll("the embedded broker", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .await;
    let mut g =
        FakeGate::connect(port, "fake-g01", &[topic("state"), topic("gates/g01/cmd"), topic("qr/used")])
            .await;
    wait_state(&mut g, 1).await;

    // Birth, a heartbeat from a clock 5 s ahead, an alarm, a parameter report.
    let g01 = ident("g01");
    let birth = GateStatus::Online(GateBirth {
        session: "sess-1".into(),
        versions: BTreeMap::new(),
        hardware: HardwareInfo {
            profile: "default".into(),
            plc: PlcEndpoint { address: "127.0.0.1:502".into(), unit_id: 1 },
            agent_version: "test".into(),
        },
    });
    // Everything a gate sends but its tx batches is signed with its key (the one registered).
    g.publish_signed(&topic("gates/g01/status"), &birth, 1).await;
    let hb = Heartbeat {
        at: Timestamp(controller_now().millis() + 5_000),
        seq: 1,
        counters: GateCounters { taps: 7, ..GateCounters::default() },
        outbox_depth: 3,
        outbox_bytes: 300,
        outbox_capacity_bytes: 1000,
        plc_online: true,
        direction: GateDirection::Bidirectional,
        in_service: true,
        free_passage: false,
        alarms: vec![],
        versions: Default::default(),
    };
    g.publish_signed(&topic("gates/g01/heartbeat"), &hb, 1).await;
    let ev = GateEvent { at: controller_now(), kind: AlarmKind::DoorFault, cleared: false, detail: None };
    g.publish_signed(&topic("gates/g01/events"), &ev, 1).await;
    let ack = ParamsAck { kind: ParamKind::FareTable, version: 4, state: ParamState::Active, reason: None };
    g.publish_signed(&topic("gates/g01/params/ack"), &ack, 1).await;
    g.publish(&topic("gates/g01/heartbeat"), b"garbage".to_vec()).await;
    let view = poll_async("the gate board to show g01", Duration::from_secs(5), || {
        duties
            .gate(&g01)
            .filter(|v| v.alarms.contains(&AlarmKind::DoorFault) && !v.versions_reported.is_empty())
    })
    .await;
    assert!(view.online);
    assert_eq!(view.session.as_deref(), Some("sess-1"));
    assert!(view.clock_drift, "a clock 5 s ahead is flagged: {view:?}");
    assert!(view.alarms.contains(&AlarmKind::ClockDrift));
    assert_eq!(view.counters.taps, 7);
    assert_eq!(view.outbox_depth, 3);
    assert_eq!(view.versions_reported[&ParamKind::FareTable].active, Some(4));

    // A command: the gate answers, the caller gets the answer.
    let d = duties.clone();
    let sent = tokio::spawn(async move { d.send_command(&ident("g01"), CommandKind::OpenOnceEntry).await });
    let cmd_topic = topic("gates/g01/cmd");
    let cmd: WireCommand = g
        .wait_for("the command", Duration::from_secs(5), |p| {
            (p.topic == cmd_topic)
                .then(|| open_from_station::<WireCommand>(&p.topic, &p.payload).ok())
                .flatten()
        })
        .await;
    assert_eq!(cmd.command, CommandKind::OpenOnceEntry);
    assert_eq!(cmd.gate, ident("g01"), "the command names its gate");
    assert!(cmd.expires_at > controller_now(), "{:?}", cmd.expires_at);
    let answer = CommandAck { id: cmd.id.clone(), result: CommandResult::Ok, detail: None };
    g.publish_signed(&topic("gates/g01/cmd/ack"), &answer, 1).await;
    assert_eq!(sent.await.unwrap().unwrap(), answer);
    // A gate that never answers: the caller hears so after the timeout.
    let silent = duties.send_command(&ident("g02"), CommandKind::InService).await;
    assert!(matches!(silent, Err(CommandError::Timeout(_))), "{silent:?}");

    // A QR code used at g01 is relayed to every gate on `qr/used`.
    let used = QrUsed {
        issuer: 1,
        account: 42,
        nonce: 7,
        expires_at: Timestamp::from_secs(1_900_000_000),
        gate: g01,
    };
    let started = Instant::now();
    g.publish_signed(&topic("gates/g01/qr/used"), &QrUsedBatch { entries: vec![used.clone()] }, 1).await;
    let qr_topic = topic("qr/used");
    let relayed: QrUsedBatch = g
        .wait_for("the relayed QR code", Duration::from_secs(5), |p| {
            (p.topic == qr_topic)
                .then(|| open_from_station::<QrUsedBatch>(&p.topic, &p.payload).ok())
                .flatten()
        })
        .await;
    assert_eq!(relayed.entries, vec![used]);
    assert!(started.elapsed() < Duration::from_millis(500), "relayed after {:?}", started.elapsed());

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), supervisor).await.unwrap().unwrap();
    assert!(duties.gates().is_empty(), "the board is cleared when the duties stop");
    node.raft.shutdown().await.unwrap();
}

/// Polls `f` (which may read shared state) until it returns Some.
async fn poll_async<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    poll(what, timeout, &mut f).await
}

fn controller_now() -> Timestamp {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    Timestamp(ms as i64)
}
