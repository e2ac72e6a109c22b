//! Staged rollouts run by the leader (SPEC §4) on a real 3-node cluster, with simulated gates that
//! speak MQTT to the broker: canary first, soak with health checks, then every gate; a canary
//! reject-rate spike and an operator abort roll every gate back under a new version.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use afc_domain::model::{ParamKind, Timestamp};
use afc_domain::topic::Topic;
use afc_domain::wire::{
    self, GateBirth, GateCounters, GateDirection, GateStatus, HardwareInfo, Heartbeat, KindVersions,
    ParamPointer, ParamState, ParamsAck, PlcEndpoint,
};
use reqwest::StatusCode;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

use crate::api::{dalian_rule, small_network, ENGINEER, ENGINEER2};
use crate::common::*;
use crate::harness::*;
use crate::packages::api_section;

const FT: ParamKind = ParamKind::FareTable;
const GATES: [&str; 3] = ["g01", "g02", "g03"];

/// What a simulated gate does and holds.
#[derive(Default)]
struct SimState {
    station_ptr: Option<u64>,
    gate_ptr: Option<u64>,
    active: Option<u64>,
    /// While this version is active, half the taps are rejected.
    bad_version: Option<u64>,
    /// This version is refused (a `rejected` ack, as for a bad signature) and never activated.
    refuse_version: Option<u64>,
    /// Every pointer this gate was given, in order: (per-gate override?, version).
    seen: Vec<(bool, u64)>,
}

/// A gate speaking MQTT: birth, heartbeats with counters every 200 ms, and an `active` ack for
/// every fare-table pointer naming a higher version (it does not download the chunks: the
/// controller's side is under test here).
pub(crate) struct SimGate {
    state: Arc<Mutex<SimState>>,
}

impl SimGate {
    async fn start(port: u16, gate: &'static str) -> SimGate {
        // Its key is the one registered for it (g01 → gate_key(1), ...): it signs what it sends.
        let key_n = GATES.iter().position(|g| *g == gate).unwrap() as u8 + 1;
        let state: Arc<Mutex<SimState>> = Arc::default();
        let mut o = MqttOptions::new(format!("sim-{gate}"), "127.0.0.1", port);
        o.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        let (client, mut eventloop) = AsyncClient::new(o, 100);
        let root = "afc/v1/s1";
        for f in [
            format!("{root}/params/fare_table/current"),
            format!("{root}/gates/{gate}/params/fare_table/current"),
        ] {
            client.subscribe(f, QoS::AtLeastOnce).await.unwrap();
        }
        let birth = GateStatus::Online(birth_of(gate));
        let status = format!("{root}/gates/{gate}/status");
        client
            .publish(status.clone(), QoS::AtLeastOnce, true, gate_seal(&status, &birth, key_n))
            .await
            .unwrap();
        let (c, s) = (client.clone(), state.clone());
        tokio::spawn(async move {
            loop {
                let p = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => p,
                    Ok(_) => continue,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let per_gate = matches!(Topic::parse(&p.topic), Ok(Topic::GateParamCurrent { .. }));
                let ptr =
                    if p.payload.is_empty() { None } else { wire::decode::<ParamPointer>(&p.payload).ok() };
                let ack = {
                    let mut g = s.lock().unwrap();
                    if let Some(ptr) = &ptr {
                        g.seen.push((per_gate, ptr.version));
                    }
                    if per_gate {
                        g.gate_ptr = ptr.map(|p| p.version)
                    } else {
                        g.station_ptr = ptr.map(|p| p.version)
                    }
                    let target = g.gate_ptr.or(g.station_ptr);
                    match target {
                        Some(t) if g.refuse_version == Some(t) => {
                            let a = ParamsAck {
                                kind: FT,
                                version: t,
                                state: ParamState::Rejected,
                                reason: Some("bad_signature".into()),
                            };
                            let topic = format!("{root}/gates/{gate}/params/ack");
                            let c = c.clone();
                            tokio::spawn(async move {
                                let payload = gate_seal(&topic, &a, key_n);
                                let _ = c.publish(topic, QoS::AtLeastOnce, false, payload).await;
                            });
                            None
                        }
                        Some(t) if g.active.is_none_or(|a| t > a) => {
                            g.active = Some(t);
                            Some(t)
                        }
                        _ => None,
                    }
                };
                if let Some(version) = ack {
                    let a = ParamsAck { kind: FT, version, state: ParamState::Active, reason: None };
                    let topic = format!("{root}/gates/{gate}/params/ack");
                    let payload = gate_seal(&topic, &a, key_n);
                    let _ = c.publish(topic, QoS::AtLeastOnce, false, payload).await;
                    // The retained birth says what the gate holds, for a leader that comes later.
                    let held =
                        KindVersions { active: Some(version), pending: None, pending_effective_from: None };
                    let birth =
                        GateStatus::Online(GateBirth { versions: [(FT, held)].into(), ..birth_of(gate) });
                    let topic = format!("{root}/gates/{gate}/status");
                    let payload = gate_seal(&topic, &birth, key_n);
                    let _ = c.publish(topic, QoS::AtLeastOnce, true, payload).await;
                }
            }
        });
        let s = state.clone();
        tokio::spawn(async move {
            let mut counters = GateCounters::default();
            for seq in 1.. {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let bad = {
                    let g = s.lock().unwrap();
                    g.active.is_some() && g.active == g.bad_version
                };
                counters.taps += 10;
                counters.rejects += if bad { 5 } else { 0 };
                let hb = Heartbeat {
                    at: Timestamp(now_ms()),
                    seq,
                    counters,
                    outbox_depth: 0,
                    outbox_bytes: 0,
                    outbox_capacity_bytes: 0,
                    plc_online: true,
                    direction: GateDirection::Bidirectional,
                    in_service: true,
                    free_passage: false,
                    alarms: vec![],
                    versions: Default::default(),
                };
                let topic = format!("{root}/gates/{gate}/heartbeat");
                let payload = gate_seal(&topic, &hb, key_n);
                if client.publish(topic, QoS::AtMostOnce, false, payload).await.is_err() {
                    return;
                }
            }
        });
        SimGate { state }
    }

    pub(crate) fn active(&self) -> Option<u64> {
        self.state.lock().unwrap().active
    }
}

fn birth_of(gate: &str) -> GateBirth {
    GateBirth {
        session: format!("{gate}-session"),
        versions: BTreeMap::new(),
        hardware: HardwareInfo {
            profile: "default".into(),
            plc: PlcEndpoint { address: "127.0.0.1:502".into(), unit_id: 1 },
            agent_version: "sim".into(),
        },
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

pub(crate) struct Station {
    pub(crate) c: Cluster,
    pub(crate) apis: BTreeMap<u64, String>,
    pub(crate) gates: BTreeMap<&'static str, SimGate>,
    /// The broker's port.
    pub(crate) port: u16,
}

impl Station {
    async fn start(soak_ms: u64) -> Station {
        Station::start_with(soak_ms, "").await
    }

    /// [`Station::start`] with further `[mqtt]` keys.
    pub(crate) async fn start_with(soak_ms: u64, mqtt_extra: &str) -> Station {
        let port = crate::mqtt::start_broker().await;
        let mut c = Cluster::unstarted(3, Duration::from_secs(20));
        let apis: BTreeMap<u64, String> =
            (1..=3).map(|id| (id, format!("127.0.0.1:{}", free_port()))).collect();
        let seeds: String = GATES
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let key = hex::encode(gate_key(i as u8 + 1).verifying_key().to_bytes());
                format!("[[mqtt.gates]]\ngate = \"{g}\"\ntx_public_key = \"{key}\"\n")
            })
            .collect();
        for id in 1..=3 {
            let extra = format!(
                "[mqtt]\nbroker = \"external\"\nembedded_listen = \"127.0.0.1:{port}\"\naddress = \"127.0.0.1:{port}\"\n\
                 client_id_prefix = \"ctl\"\nstation_code = 1\nbackoff_max_ms = 500\n{mqtt_extra}\n{seeds}\n\
                 [rollout]\ncanary_gates = [\"g01\"]\nsoak_ms = {soak_ms}\nack_deadline_ms = 5000\nmin_taps_for_rate = 10\n\n{api}",
                api = api_section(&c, id, &apis[&id], "blacklist_confirm_threshold = 100"),
            );
            let raft = "heartbeat_ms = 250\nelection_timeout_min_ms = 600\nelection_timeout_max_ms = 1200\nconnect_timeout_ms = 200\n";
            let addr = c.initial[&id].clone();
            c.spawn_with(
                id,
                addr,
                id == 1,
                &NodeSetup { raft, extra: &extra, rust_log: "info,openraft=warn,rumqttc=warn" },
            );
        }
        c.wait_leader(Duration::from_secs(20), None).await;
        let mut gates = BTreeMap::new();
        for g in GATES {
            gates.insert(g, SimGate::start(port, g).await);
        }
        Station { c, apis, gates, port }
    }

    pub(crate) async fn call(
        &self,
        node: u64,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut rb =
            self.c.http.request(method, format!("http://{}{}", self.apis[&node], path)).bearer_auth(token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let s = r.status();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn upload_fare_table(&self, node: u64) -> u64 {
        let body = json!({ "network": small_network(), "fare_rule": dalian_rule(), "reason": "new fares" });
        let (s, v) = self
            .call(node, reqwest::Method::POST, "/api/v1/parameters/fare-table", ENGINEER, Some(body))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["rollout"]["requested"], true, "{v}");
        v["version"].as_u64().unwrap()
    }

    async fn package_body_sha(&self, node: u64, version: u64) -> Value {
        let path = format!("/api/v1/parameters/fare_table/{version}");
        let (s, p) = self.call(node, reqwest::Method::GET, &path, ENGINEER, None).await;
        assert_eq!(s, StatusCode::OK, "{p}");
        p["body_sha256"].clone()
    }

    pub(crate) async fn rollout(&self, node: u64) -> Value {
        let (s, v) = self.call(node, reqwest::Method::GET, "/api/v1/rollouts", ENGINEER, None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    /// Polls the fare-table rollout (on `node`) until `f` accepts it.
    pub(crate) async fn wait_rollout(&self, node: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.rollout(node).await;
            if f(&v["rollouts"]["fare_table"]) {
                return v["rollouts"]["fare_table"].clone();
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn wait_all_active(&self, version: u64) {
        let gates = &self.gates;
        poll(&format!("every gate active on {version}"), Duration::from_secs(20), || {
            gates.values().all(|g| g.active() == Some(version)).then_some(())
        })
        .await;
    }
}

pub(crate) fn stage(r: &Value) -> &str {
    r["stage"]["stage"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_goes_first_then_every_gate_and_a_canary_reject_spike_rolls_every_gate_back_under_a_new_version(
) {
    let _serial = CLUSTER_LOCK.lock().await;
    let st = Station::start(1500).await;
    let leader = st.c.wait_leader(Duration::from_secs(10), None).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();

    // The first fare table reaches every gate through the stages.
    let v1 = st.upload_fare_table(follower).await;
    st.wait_rollout(follower, "v1 done", |r| r["to_version"] == v1 && stage(r) == "done").await;
    st.wait_all_active(v1).await;

    // v2: the canary g01 alone first (override), the others only after the soak.
    let v2 = st.upload_fare_table(follower).await;
    let soak = st.wait_rollout(follower, "v2 soaking", |r| r["to_version"] == v2 && stage(r) == "soak").await;
    assert_eq!(soak["canaries"], json!(["g01"]));
    assert_eq!(st.gates["g01"].active(), Some(v2), "the canary runs v2");
    for g in ["g02", "g03"] {
        assert_eq!(st.gates[g].active(), Some(v1), "{g} waits for the soak");
    }
    let done = st.wait_rollout(follower, "v2 done", |r| r["to_version"] == v2 && stage(r) == "done").await;
    st.wait_all_active(v2).await;
    assert!(done["republished_as"].is_null());
    let g01 = st.gates["g01"].state.lock().unwrap().seen.clone();
    assert!(g01.contains(&(true, v2)), "g01 got v2 as a per-gate override: {g01:?}");
    let g02 = st.gates["g02"].state.lock().unwrap().seen.clone();
    assert!(!g02.iter().any(|(per_gate, _)| *per_gate), "g02 never got an override: {g02:?}");

    // v3 makes the canary reject half its taps while the others stay calm: rolled back, and the
    // content of v2 republished as v4 for every gate.
    st.gates["g01"].state.lock().unwrap().bad_version = Some(v2 + 1);
    let v3 = st.upload_fare_table(follower).await;
    assert_eq!(v3, v2 + 1);
    let back = st
        .wait_rollout(follower, "v3 rolled back and republished", |r| {
            r["to_version"] == v3 && stage(r) == "rolled_back" && r["republished_as"].is_u64()
        })
        .await;
    assert_eq!(back["stage"]["reason"]["cause"], "reject_rate", "{back}");
    let v4 = back["republished_as"].as_u64().unwrap();
    assert!(v4 > v3);
    st.wait_all_active(v4).await;
    let metrics = st.c.http.get(format!("http://{}/metrics", st.apis[&follower])).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("afc_rollout_state{kind=\"fare_table\",state=\"rolled_back\"} 1"),
        "the rollback shows in the metrics"
    );
    let sha4 = st.package_body_sha(follower, v4).await;
    assert_eq!(sha4, st.package_body_sha(follower, v2).await, "v4 carries v2's fares");
    for g in ["g02", "g03"] {
        let seen = st.gates[g].state.lock().unwrap().seen.clone();
        assert!(!seen.iter().any(|(_, v)| *v == v3), "{g} never saw v3: {seen:?}");
    }

    // v5: the canary refuses the package (a `rejected` ack): rolled back at once, v4's fares
    // republished above it.
    st.gates["g01"].state.lock().unwrap().refuse_version = Some(v4 + 1);
    let v5 = st.upload_fare_table(follower).await;
    assert_eq!(v5, v4 + 1);
    let back = st
        .wait_rollout(follower, "v5 rolled back and republished", |r| {
            r["to_version"] == v5 && stage(r) == "rolled_back" && r["republished_as"].is_u64()
        })
        .await;
    assert_eq!(back["stage"]["reason"], json!({"cause": "canary_rejected", "gate": "g01", "version": v5}));
    let v6 = back["republished_as"].as_u64().unwrap();
    st.wait_all_active(v6).await;
    assert_eq!(st.package_body_sha(follower, v6).await, st.package_body_sha(follower, v4).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_abort_during_the_soak_rolls_every_gate_back_a_blacklist_is_not_held_by_the_soak_and_the_abort_cannot_be_repeated(
) {
    let _serial = CLUSTER_LOCK.lock().await;
    let st = Station::start(5000).await;
    let leader = st.c.wait_leader(Duration::from_secs(10), None).await;

    let v1 = st.upload_fare_table(leader).await;
    st.wait_rollout(leader, "v1 done", |r| r["to_version"] == v1 && stage(r) == "done").await;
    st.wait_all_active(v1).await;

    let v2 = st.upload_fare_table(leader).await;
    st.wait_rollout(leader, "v2 soaking", |r| r["to_version"] == v2 && stage(r) == "soak").await;
    assert_eq!(st.gates["g01"].active(), Some(v2));
    // A blacklist uploaded during the fare-table soak goes to every gate at once.
    let bl =
        json!({"full": [{"media": "svc", "id": 7}, {"media": "svc", "id": 9}], "reason": "stolen cards"});
    let (s, v) =
        st.call(leader, reqwest::Method::POST, "/api/v1/parameters/blacklist", ENGINEER, Some(bl)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let status = st.rollout(leader).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut status = status;
    while status["station_versions"]["blacklist"] != 1 {
        assert!(Instant::now() < deadline, "the blacklist was not published to every gate: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = st.rollout(leader).await;
    }
    assert!(status["rollouts"]["blacklist"]["canaries"].as_array().unwrap().is_empty(), "{status}");
    assert_eq!(stage(&status["rollouts"]["fare_table"]), "soak", "the fare soak goes on: {status}");
    let abort = json!({"reason": "complaints at the service desk"});
    let (s, v) = st
        .call(
            leader,
            reqwest::Method::POST,
            "/api/v1/rollouts/fare_table/abort",
            ENGINEER2,
            Some(abort.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let back = st
        .wait_rollout(leader, "v2 rolled back and republished", |r| {
            r["to_version"] == v2 && stage(r) == "rolled_back" && r["republished_as"].is_u64()
        })
        .await;
    assert_eq!(back["stage"]["reason"], json!({"cause": "operator_abort", "by": "erik"}));
    assert_eq!(back["from_version"].as_u64(), Some(v1));
    let v3 = back["republished_as"].as_u64().unwrap();
    st.wait_all_active(v3).await;
    for g in ["g02", "g03"] {
        let seen = st.gates[g].state.lock().unwrap().seen.clone();
        assert!(!seen.iter().any(|(_, v)| *v == v2), "{g} never saw the aborted v2: {seen:?}");
    }
    let (s, v) = st
        .call(leader, reqwest::Method::POST, "/api/v1/rollouts/fare_table/abort", ENGINEER, Some(abort))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "a rolled back rollout cannot be aborted again: {v}");
    // The abort is in the audit log with who and why.
    let (s, audit) =
        st.call(leader, reqwest::Method::GET, "/api/v1/audit?from=1&limit=1000", ENGINEER, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        audit.as_array().unwrap().iter().any(|a| a["action"] == "rollouts.abort" && a["actor"] == "erik"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_carries_on_a_rollout_whose_leader_died_during_the_soak() {
    let _serial = CLUSTER_LOCK.lock().await;
    let mut st = Station::start(3000).await;
    let leader = st.c.wait_leader(Duration::from_secs(10), None).await;
    let v1 = st.upload_fare_table(leader).await;
    st.wait_rollout(leader, "v1 done", |r| r["to_version"] == v1 && stage(r) == "done").await;
    st.wait_all_active(v1).await;

    let v2 = st.upload_fare_table(leader).await;
    st.wait_rollout(leader, "v2 soaking", |r| r["to_version"] == v2 && stage(r) == "soak").await;
    st.c.nodes.get_mut(&leader).unwrap().kill();
    let next = st.c.wait_leader(Duration::from_secs(20), Some(leader)).await;
    let done = st
        .wait_rollout(next, "v2 done under the new leader", |r| r["to_version"] == v2 && stage(r) == "done")
        .await;
    assert!(done["republished_as"].is_null(), "no rollback: {done}");
    st.wait_all_active(v2).await;
}

/// A full blacklist of `n` single svc ids from `base`, no two adjacent (so none merge into ranges).
fn singles(base: u64, n: u64) -> Vec<Value> {
    (0..n).map(|i| json!({"media": "svc", "id": base + 3 * i})).collect()
}

impl Station {
    /// Polls until the blacklist version every gate is pointed at is `version`.
    async fn wait_blacklist_on_gates(&self, node: u64, version: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.rollout(node).await;
            if v["station_versions"]["blacklist"] == version {
                return v;
            }
            assert!(Instant::now() < deadline, "blacklist v{version} never reached the gates: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_blacklist_swapping_every_id_for_as_many_others_waits_for_a_second_engineer_and_a_resend_with_a_few_more_does_not(
) {
    let _serial = CLUSTER_LOCK.lock().await;
    let st = Station::start(1000).await;
    let leader = st.c.wait_leader(Duration::from_secs(10), None).await;
    let post = |path: &'static str, token: &'static str, body: Value| {
        st.call(leader, reqwest::Method::POST, path, token, Some(body))
    };
    let upload = "/api/v1/parameters/blacklist";
    let why = json!({"reason": "checked the list with clearing"});

    // The base list: 10,000 ids (threshold 100), confirmed by a second engineer, on every gate.
    let old = singles(3_104_000_000_000_000, 10_000);
    let (s, v) = post(upload, ENGINEER, json!({"full": old, "reason": "base list"})).await;
    assert_eq!((s, v["pending_id"].as_u64()), (StatusCode::ACCEPTED, Some(1)), "{v}");
    let (s, v) = post("/api/v1/parameters/blacklist/pending/1/confirm", ENGINEER2, why.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    st.wait_blacklist_on_gates(leader, 1).await;

    // 10,000 other ids: the same entry count, 10,000 ids added. Stored, held, not on any gate.
    let swapped = singles(3_104_900_000_000_000, 10_000);
    let (s, v) = post(upload, ENGINEER, json!({"full": swapped.clone(), "reason": "clearing list 43"})).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::ACCEPTED, Some("confirmation_required")), "{v}");
    assert_eq!((v["pending_id"].as_u64(), v["added"].as_u64()), (Some(2), Some(10_000)), "{v}");
    // The uploader cannot confirm it, by either confirmation route.
    let (s, v) = post("/api/v1/parameters/blacklist/pending/2/confirm", ENGINEER, why.clone()).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::FORBIDDEN, Some("second_confirmer_required")), "{v}");
    let (s, v) = post("/api/v1/rollouts/blacklist/confirm", ENGINEER, why.clone()).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::FORBIDDEN, Some("second_confirmer_required")), "{v}");
    // Nor start it past the hold by hand: the request is held again.
    let start = json!({"kind": "blacklist", "version": 2, "reason": "urgent"});
    let (s, v) = post("/api/v1/rollouts", ENGINEER, start).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::ACCEPTED, Some("confirmation_required")), "{v}");
    let status = st.rollout(leader).await;
    let waiting = &status["requests"]["blacklist"];
    assert_eq!(
        (waiting["to_version"].as_u64(), waiting["confirmation"]["added"].as_u64()),
        (Some(2), Some(10_000)),
        "{status}"
    );
    assert!(waiting["confirmation"]["confirmed_by"].is_null(), "{status}");
    assert_eq!(status["station_versions"]["blacklist"], 1, "gates keep v1: {status}");
    assert_eq!(status["rollouts"]["blacklist"]["to_version"], 1, "no rollout of v2: {status}");

    // Another engineer confirms: it goes to every gate.
    let (s, v) = post("/api/v1/parameters/blacklist/pending/2/confirm", ENGINEER2, why.clone()).await;
    assert_eq!((s, v["version"].as_u64()), (StatusCode::OK, Some(2)), "{v}");
    st.wait_blacklist_on_gates(leader, 2).await;

    // The same 10,000 ids again with 5 new ones: 5 ids added, not held.
    let mut resent = swapped;
    resent.extend(singles(1_000_000, 5));
    let (s, v) = post(upload, ENGINEER, json!({"full": resent, "reason": "clearing list 44"})).await;
    assert_eq!((s, v["added"].as_u64()), (StatusCode::OK, Some(5)), "{v}");
    assert_eq!(v["rollout"], json!({"requested": true, "held_for_confirmation": false}), "{v}");
    st.wait_blacklist_on_gates(leader, 3).await;

    let (s, audit) =
        st.call(leader, reqwest::Method::GET, "/api/v1/audit?from=1&limit=1000", ENGINEER, None).await;
    assert_eq!(s, StatusCode::OK);
    let lines: Vec<(&str, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["actor"].as_str().unwrap(), a["action"].as_str().unwrap()))
        .filter(|(_, a)| a.starts_with("parameters.blacklist"))
        .collect();
    assert_eq!(
        lines,
        [
            ("emma", "parameters.blacklist.held"),
            ("erik", "parameters.blacklist"),
            ("emma", "parameters.blacklist.held"),
            ("erik", "parameters.blacklist"),
            ("emma", "parameters.blacklist"),
        ],
        "{audit}"
    );
}
