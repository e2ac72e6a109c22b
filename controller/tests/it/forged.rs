//! Forged gate messages (issue 12) against three real controller processes and the broker, with
//! the rollout test's simulated gates running: for every topic the leader takes from gates
//! (`heartbeat`, `params/ack`, `cmd/ack`, `events`, `qr/used`, `status`), a message that is
//! unsigned, signed with a wrong key, another gate's genuine message replayed under this gate's
//! topic, truncated, or oversized, published straight to the broker, changes nothing: not the
//! gate board, not the rollout (a forged `params/ack rejected` does not roll the canary back),
//! no waiting command is answered, nothing is relayed; and the leader counts each one in
//! `afc_controller_unverified_messages_total`. Everything the leader publishes to gates (`mode`,
//! `cmd`, `tx/ack`, `qr/used`) verifies with the station key and names the right gate and
//! installation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use afc_domain::model::{Ident, ParamKind, Timestamp};
use afc_domain::topic::Topic;
use afc_domain::wire::{
    self, AlarmKind, Command, CommandAck, CommandResult, GateBirth, GateCounters, GateDirection, GateEvent,
    GateStatus, HardwareInfo, Heartbeat, KindVersions, ModeMessage, ParamState, ParamsAck, PlcEndpoint,
    QrUsed, QrUsedBatch, TxAck, WireMessage, MAX_PAYLOAD,
};
use reqwest::{Method, StatusCode};
use rumqttc::{Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

use crate::api::{OPERATOR, VIEWER};
use crate::common::*;
use crate::harness::*;
use crate::mqtt::{installation, tx_batch, FakeGate};
use crate::rollout::{stage, Station};

const ROOT: &str = "afc/v1/s1";

fn t(rest: &str) -> String {
    format!("{ROOT}/{rest}")
}

/// The five forgeries of `msg` as gate `gate` (key `key_n`) would send it on `gates/{gate}/{leaf}`,
/// with the reason the leader must count each under.
fn forgeries<T: WireMessage>(gate: &str, leaf: &str, msg: &T) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let topic = t(&format!("gates/{gate}/{leaf}"));
    let key_n = gate[1..].parse::<u8>().unwrap();
    let genuine = gate_seal(&topic, msg, key_n);
    // Valid JSON (trailing blanks) whose signature verifies: refused for its size alone.
    let mut oversized = genuine.clone();
    oversized.resize(MAX_PAYLOAD + 1024, b' ');
    vec![
        ("unsigned", wire::encode(msg), "malformed"),
        ("wrong key", gate_seal(&topic, msg, 9), "bad_signature"),
        // g02's own, genuine message, on g02's topic: replayed under this gate's topic.
        ("replayed from g02", gate_seal(&t(&format!("gates/g02/{leaf}")), msg, 2), "bad_signature"),
        ("truncated", genuine[..genuine.len() - 7].to_vec(), "malformed"),
        ("oversized", oversized, "malformed"),
    ]
}

fn hardware() -> HardwareInfo {
    HardwareInfo {
        profile: "default".into(),
        plc: PlcEndpoint { address: "127.0.0.1:502".into(), unit_id: 1 },
        agent_version: "forged-test".into(),
    }
}

fn heartbeat(taps: u64, rejects: u64, alarms: Vec<AlarmKind>, free_passage: bool, outbox: u64) -> Heartbeat {
    Heartbeat {
        at: Timestamp(now_ms()),
        seq: 1,
        counters: GateCounters { taps, rejects, ..GateCounters::default() },
        outbox_depth: outbox,
        outbox_bytes: 0,
        outbox_capacity_bytes: 0,
        plc_online: true,
        direction: GateDirection::Bidirectional,
        in_service: true,
        free_passage,
        alarms,
        versions: Default::default(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// (topic, payload) of every message a client received.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Every message on `filters`, kept for the end of the test.
async fn record_all(port: u16, filters: &[String]) -> Seen {
    let seen: Seen = Arc::default();
    let mut o = MqttOptions::new("auditor", "127.0.0.1", port);
    o.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 100);
    for f in filters {
        client.subscribe(f.clone(), QoS::AtLeastOnce).await.unwrap();
    }
    let (s, (ready_tx, mut ready_rx)) = (seen.clone(), tokio::sync::mpsc::unbounded_channel());
    tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    s.lock().unwrap().push((p.topic.clone(), p.payload.to_vec()))
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    for _ in filters {
        tokio::time::timeout(Duration::from_secs(10), ready_rx.recv()).await.unwrap().unwrap();
    }
    seen
}

/// `afc_controller_unverified_messages_total` of `node`, by (topic, reason).
async fn unverified(st: &Station, node: u64) -> BTreeMap<(String, String), u64> {
    let text = st.c.http.get(format!("http://{}/metrics", st.apis[&node])).send().await.unwrap();
    let text = text.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("afc_controller_unverified_messages_total{reason=\""))
        .filter_map(|l| {
            let (reason, rest) = l.split_once("\",topic=\"")?;
            let (topic, value) = rest.split_once("\"} ")?;
            Some(((topic.to_owned(), reason.to_owned()), value.trim().parse().ok()?))
        })
        .collect()
}

async fn gate_view(st: &Station, node: u64, gate: &str) -> Value {
    let (s, v) = st.call(node, Method::GET, &format!("/api/v1/gates/{gate}"), VIEWER, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

/// An operator's command to g01 through the API of `api`, answered in the background (the
/// request waits for the gate's acknowledgement).
fn command_to_g01(
    http: reqwest::Client,
    api: String,
    command: Value,
) -> tokio::task::JoinHandle<(StatusCode, Value)> {
    tokio::spawn(async move {
        let r = http
            .post(format!("http://{api}/api/v1/gates/g01/commands"))
            .bearer_auth(OPERATOR)
            .json(&command)
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap_or(Value::Null))
    })
}

/// Publishes each forgery on `gates/{gate}/{leaf}` and adds what the leader must count to `expected`.
async fn forge(
    client: &rumqttc::AsyncClient,
    expected: &mut BTreeMap<(String, String), u64>,
    gate: &str,
    leaf: &str,
    label: &str,
    list: Vec<(&'static str, Vec<u8>, &'static str)>,
) {
    let topic = t(&format!("gates/{gate}/{leaf}"));
    for (_, payload, reason) in list {
        *expected.entry((label.to_owned(), reason.to_owned())).or_default() += 1;
        client.publish(topic.clone(), QoS::AtLeastOnce, false, payload).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_gate_messages_change_nothing_and_are_counted_and_what_the_leader_sends_gates_verifies() {
    let _serial = CLUSTER_LOCK.lock().await;
    // A soak of 10 minutes: the fare table stays in it for the whole test.
    let st = Station::start_with(600_000, "command_timeout_ms = 2000\nqr_relay_ms = 20\n").await;
    let leader = st.c.wait_leader(Duration::from_secs(10), None).await;
    let auditor =
        record_all(st.port, &[t("mode"), t("gates/+/cmd"), t("gates/+/tx/ack"), t("qr/used")]).await;
    let mut attacker = FakeGate::connect(st.port, "attacker", &[t("gates/g01/cmd"), t("qr/used")]).await;

    // The fare table: v1 on every gate, v2 soaking on the canary g01.
    let v1 = st.upload_fare_table(leader).await;
    st.wait_rollout(leader, "v1 done", |r| r["to_version"] == v1 && stage(r) == "done").await;
    st.wait_all_active(v1).await;
    let v2 = st.upload_fare_table(leader).await;
    st.wait_rollout(leader, "v2 soaking", |r| r["to_version"] == v2 && stage(r) == "soak").await;

    // g04 (registered after the fare table reached every gate, so no rollout waits for it),
    // played by this test alone: no simulated gate overwrites what the board shows of it.
    let r = st.c.write(leader, &register("g04", &gate_key(4))).await.unwrap();
    assert!(matches!(r, controller::state::Response::GateRegistered { .. }), "{r:?}");
    let birth = GateStatus::Online(GateBirth {
        session: "g04-genuine".into(),
        versions: [(
            ParamKind::Blacklist,
            KindVersions { active: Some(1), pending: None, pending_effective_from: None },
        )]
        .into(),
        hardware: hardware(),
    });
    let genuine_hb = heartbeat(10, 1, vec![], false, 3);
    let mut tries = 0;
    loop {
        // The leader learns g04's key within one publisher poll of the registration.
        attacker.publish_signed(&t("gates/g04/status"), &birth, 4).await;
        attacker.publish_signed(&t("gates/g04/heartbeat"), &genuine_hb, 4).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let v = gate_view(&st, leader, "g04").await;
        if v["online"] == true && v["counters"]["taps"] == 10 {
            break;
        }
        tries += 1;
        assert!(tries < 30, "g04's genuine messages were never taken: {v}");
    }
    let before = unverified(&st, leader).await;

    let mut expected: BTreeMap<(String, String), u64> = BTreeMap::new();
    let client = attacker.client.clone();

    // A retained message just under the embedded broker's 2 MiB cap on a topic the leader reads:
    // above the leader's own packet limit it would drop the leader's connection at every
    // delivery, and being retained, at every reconnect: no acks, no commands, for good.
    let huge = vec![b' '; 1_990_000];
    client.publish(t("gates/g04/heartbeat"), QoS::AtLeastOnce, true, huge).await.unwrap();
    *expected.entry(("heartbeat".into(), "malformed".into())).or_default() += 1;

    // Heartbeats claiming a door fault, free passage, a full outbox and every tap rejected: at
    // g04 (it would show) and at the canary g01 (it would fail the soak on its reject rate).
    let bad_hb = heartbeat(5_000_000, 5_000_000, vec![AlarmKind::DoorFault], true, 777_777);
    forge(&client, &mut expected, "g04", "heartbeat", "heartbeat", forgeries("g04", "heartbeat", &bad_hb))
        .await;
    forge(&client, &mut expected, "g01", "heartbeat", "heartbeat", forgeries("g01", "heartbeat", &bad_hb))
        .await;
    // The canary refusing v2: a genuine one would roll every gate back.
    let refusal = ParamsAck {
        kind: ParamKind::FareTable,
        version: v2,
        state: ParamState::Rejected,
        reason: Some("forged".into()),
    };
    forge(
        &client,
        &mut expected,
        "g01",
        "params/ack",
        "params_ack",
        forgeries("g01", "params/ack", &refusal),
    )
    .await;
    // An active report of a version nobody published.
    let report =
        ParamsAck { kind: ParamKind::Blacklist, version: 999, state: ParamState::Active, reason: None };
    forge(&client, &mut expected, "g04", "params/ack", "params_ack", forgeries("g04", "params/ack", &report))
        .await;
    let ev = GateEvent { at: Timestamp(now_ms()), kind: AlarmKind::DoorFault, cleared: false, detail: None };
    forge(&client, &mut expected, "g04", "events", "events", forgeries("g04", "events", &ev)).await;
    let forged_birth = GateStatus::Online(GateBirth {
        session: "forged".into(),
        versions: BTreeMap::new(),
        hardware: hardware(),
    });
    forge(&client, &mut expected, "g04", "status", "status", forgeries("g04", "status", &forged_birth)).await;
    let forged_qr = QrUsedBatch {
        entries: vec![QrUsed {
            issuer: 1,
            account: 666,
            nonce: 666,
            expires_at: Timestamp::from_secs(4_000_000_000),
            gate: ident("g04"),
        }],
    };
    forge(&client, &mut expected, "g04", "qr/used", "qr_used", forgeries("g04", "qr/used", &forged_qr)).await;
    // A gate nobody registered: its plain will and a birth signed with its own key.
    let g99 = t("gates/g99/status");
    attacker.publish(&g99, wire::encode(&GateStatus::Offline { session: "x".into() })).await;
    attacker.publish(&g99, gate_seal(&g99, &forged_birth, 99)).await;
    *expected.entry(("status".into(), "malformed".into())).or_default() += 1;
    *expected.entry(("status".into(), "unknown_key".into())).or_default() += 1;
    // A genuine g04 report of a QR code used at g01: not g04's to report (counted as malformed).
    let misattributed =
        QrUsedBatch { entries: vec![QrUsed { gate: ident("g01"), ..forged_qr.entries[0].clone() }] };
    attacker.publish_signed(&t("gates/g04/qr/used"), &misattributed, 4).await;

    // A command waiting for g01's answer gets only forged ones.
    let command = json!({"command": "open_once_entry", "reason": "forged ack test"});
    let api = st.apis[&leader].clone();
    let http = st.c.http.clone();
    let waiting = command_to_g01(http.clone(), api.clone(), command.clone());
    let cmd_topic = t("gates/g01/cmd");
    let cmd: Command = attacker
        .wait_for("the command to g01", Duration::from_secs(10), |p| {
            (p.topic == cmd_topic).then(|| open_from_station::<Command>(&p.topic, &p.payload).ok()).flatten()
        })
        .await;
    let forged_ack =
        CommandAck { id: cmd.id.clone(), result: CommandResult::Ok, detail: Some("forged".into()) };
    forge(&client, &mut expected, "g01", "cmd/ack", "cmd_ack", forgeries("g01", "cmd/ack", &forged_ack))
        .await;
    // g02's genuine answer, on its own topic, to g01's command: not g02's command to answer.
    attacker.publish_signed(&t("gates/g02/cmd/ack"), &forged_ack, 2).await;
    let (status, body) = waiting.await.unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::GATEWAY_TIMEOUT, Some("gate_timeout")),
        "{body}"
    );

    // Wait until the leader has seen every forgery (it counts each).
    let mut counted = BTreeMap::new();
    for _ in 0..100 {
        let now = unverified(&st, leader).await;
        counted = now
            .iter()
            .map(|(k, n)| (k.clone(), n - before.get(k).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect();
        if counted == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Nothing changed. The board shows g04 as its genuine messages left it.
    let v = gate_view(&st, leader, "g04").await;
    assert_eq!(v["online"], true, "{v}");
    assert_eq!(v["alarms"], json!([]), "{v}");
    assert_eq!(v["free_passage"], false, "{v}");
    assert_eq!(
        (v["counters"]["taps"].as_u64(), v["counters"]["outbox_depth"].as_u64()),
        (Some(10), Some(3)),
        "{v}"
    );
    assert_eq!(v["reported_versions"], json!({"blacklist": 1}), "{v}");
    let (s, gates) = st.call(leader, Method::GET, "/api/v1/gates", VIEWER, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!gates.to_string().contains("g99"), "an unregistered gate is not on the board: {gates}");
    let g01 = gate_view(&st, leader, "g01").await;
    assert_eq!((g01["alarms"].clone(), g01["free_passage"].clone()), (json!([]), json!(false)), "{g01}");
    // The canary was not rolled back: v2 still soaks, nothing republished.
    let r = st.rollout(leader).await;
    let ft = &r["rollouts"]["fare_table"];
    assert_eq!((ft["to_version"].as_u64(), stage(ft)), (Some(v2), "soak"), "{r}");
    assert!(ft["republished_as"].is_null(), "{r}");
    assert_eq!(st.gates["g01"].active(), Some(v2));
    // And each forgery was counted, by topic and reason.
    assert_eq!(counted, expected, "unverified messages counted by (topic, reason)");

    // The genuine paths still work: g01 answers a command, g04's used QR code is relayed.
    let answered = command_to_g01(http, api, command);
    let cmd2: Command = attacker
        .wait_for("the second command to g01", Duration::from_secs(10), |p| {
            (p.topic == cmd_topic).then(|| open_from_station::<Command>(&p.topic, &p.payload).ok()).flatten()
        })
        .await;
    assert_ne!(cmd2.id, cmd.id);
    let ack = CommandAck { id: cmd2.id.clone(), result: CommandResult::Ok, detail: None };
    attacker.publish_signed(&t("gates/g01/cmd/ack"), &ack, 1).await;
    let (status, body) = answered.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], cmd2.id.as_str());
    let genuine_qr =
        QrUsedBatch { entries: vec![QrUsed { nonce: 1, account: 1, ..forged_qr.entries[0].clone() }] };
    attacker.publish_signed(&t("gates/g04/qr/used"), &genuine_qr, 4).await;
    let qr_topic = t("qr/used");
    let relayed: QrUsedBatch = attacker
        .wait_for("the genuine QR code relayed", Duration::from_secs(10), |p| {
            (p.topic == qr_topic)
                .then(|| open_from_station::<QrUsedBatch>(&p.topic, &p.payload).ok())
                .flatten()
        })
        .await;
    assert_eq!(relayed, genuine_qr, "only the genuine code is relayed");

    // Transactions of g01 and g04: each ack names that gate's installation.
    attacker.publish(&t("gates/g01/tx"), tx_batch("g01", 1, 1..=3)).await;
    attacker.publish(&t("gates/g04/tx"), tx_batch("g04", 4, 1..=2)).await;

    // Everything the leader published to gates verifies with the station key and names its gate.
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for _ in 0..100 {
        kinds.clear();
        for (topic, payload) in auditor.lock().unwrap().iter() {
            let kind = check_station_message(topic, payload);
            *kinds.entry(kind).or_default() += 1;
        }
        if kinds.get("tx_ack").copied().unwrap_or(0) >= 2 && kinds.contains_key("qr_used") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for kind in ["mode", "cmd", "tx_ack", "qr_used"] {
        assert!(kinds.contains_key(kind), "the auditor saw no {kind} message: {kinds:?}");
    }
    assert_eq!(kinds["cmd"], 2, "{kinds:?}");
    assert_eq!(kinds["qr_used"], 1, "only the genuine QR code was relayed: {kinds:?}");
}

/// Checks one message the leader published to gates as a gate would, panicking if it does not
/// verify or names another gate or installation; returns its kind.
fn check_station_message(topic: &str, payload: &[u8]) -> &'static str {
    let gate_of = |t: &str| match Topic::parse(t) {
        Ok(Topic::GateCmd { gate, .. } | Topic::GateTxAck { gate, .. }) => gate,
        other => panic!("unexpected topic {t}: {other:?}"),
    };
    if topic.ends_with("/mode") {
        if payload.is_empty() {
            return "mode_cleared";
        }
        open_from_station::<ModeMessage>(topic, payload).unwrap_or_else(|e| panic!("{topic}: {e}"));
        "mode"
    } else if topic.ends_with("/cmd") {
        let c: Command = open_from_station(topic, payload).unwrap_or_else(|e| panic!("{topic}: {e}"));
        assert_eq!(c.gate, gate_of(topic), "the command names the gate of its topic");
        assert!(c.expires_at.millis() > now_ms() - 60_000, "{c:?}");
        "cmd"
    } else if topic.ends_with("/tx/ack") {
        let a: TxAck = open_from_station(topic, payload).unwrap_or_else(|e| panic!("{topic}: {e}"));
        let gate: Ident = gate_of(topic);
        assert_eq!(a.installation, installation(gate.as_str()), "{topic}: {a:?}");
        "tx_ack"
    } else if topic.ends_with("/qr/used") {
        open_from_station::<QrUsedBatch>(topic, payload).unwrap_or_else(|e| panic!("{topic}: {e}"));
        "qr_used"
    } else {
        panic!("unexpected topic {topic}")
    }
}

/// `afc_controller_mode_restored_total` of `node`.
async fn mode_restored(st: &Station, node: u64) -> u64 {
    let text = st.c.http.get(format!("http://{}/metrics", st.apis[&node])).send().await.unwrap();
    let text = text.text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("afc_controller_mode_restored_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Anyone who may publish on the broker can replace the retained `mode` (gates refuse what does
/// not verify, but a gate connecting later would then find no valid mode there, and miss an
/// emergency release published while it was away): the leader reads the retained mode back and
/// publishes its own again, and a gate connecting afterwards finds the genuine one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_mode_replaced_or_cleared_on_the_broker_is_published_again_by_the_leader() {
    let _serial = CLUSTER_LOCK.lock().await;
    let st = Station::start_with(600_000, "").await;
    let leader = st.c.wait_leader(Duration::from_secs(10), None).await;
    let mode_topic = t("mode");
    let genuine = |p: &rumqttc::Publish| {
        (p.topic == mode_topic).then(|| open_from_station::<ModeMessage>(&p.topic, &p.payload).ok()).flatten()
    };
    let mut attacker = FakeGate::connect(st.port, "attacker", std::slice::from_ref(&mode_topic)).await;
    let first = attacker.wait_for("the genuine retained mode", Duration::from_secs(10), genuine).await;
    let before = mode_restored(&st, leader).await;

    let forged = ModeMessage {
        version: u64::MAX,
        bits: afc_domain::mode::ModeBits::EMERGENCY_RELEASE,
        since: Timestamp(0),
        decided_at: None,
        history_ref: None,
        history: Vec::new(),
    };
    for (what, payload) in [("forged", wire::encode(&forged)), ("cleared", Vec::new())] {
        attacker.client.publish(mode_topic.clone(), QoS::AtLeastOnce, true, payload).await.unwrap();
        let back = attacker
            .wait_for(&format!("the genuine mode back after it was {what}"), Duration::from_secs(5), genuine)
            .await;
        assert_eq!(back, first, "the leader publishes the same mode again");
        // A gate connecting now finds the genuine mode retained.
        let late = format!("late-{what}");
        let mut gate = FakeGate::connect(st.port, &late, std::slice::from_ref(&mode_topic)).await;
        let retained = gate
            .wait_for("the retained mode", Duration::from_secs(5), |p| {
                (p.topic == mode_topic).then(|| p.clone())
            })
            .await;
        assert_eq!(
            genuine(&retained),
            Some(first.clone()),
            "{what}: a late gate finds {:?}",
            retained.payload
        );
        // Restorations are at least a second apart.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let restored = mode_restored(&st, leader).await - before;
    assert!(restored >= 2, "restorations counted: {restored}");
}
