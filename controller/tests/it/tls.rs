//! TLS and the leader-only paths of the API, on three real controller processes: the Raft/admin
//! and API listeners serve https with certificates generated here (no private key is committed),
//! plain HTTP and untrusting clients are refused, a write sent to a follower's API is forwarded to
//! the leader, and gate commands travel over an MQTT connection that is TLS up to a terminating
//! proxy in front of the broker (as Mosquitto's TLS listener would be). With mutual TLS
//! (`tls.require_client_cert`), only clients with a certificate from the station CA get an answer
//! from the Raft/admin listener, and a node added at an address whose server has no station
//! certificate receives nothing at all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use afc_domain::topic::Topic;
use afc_domain::wire::{self, Command as WireCommand, CommandAck, CommandResult};
use afc_test_support::pki::TestCa;
use reqwest::{Method, StatusCode};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use controller::node::AddLearner;
use controller::state::Response;

use crate::common::*;
use crate::harness::*;

const OPERATOR: &str = "tls-operator-token";
const VIEWER: &str = "tls-viewer-token";

/// A test CA and one node certificate for `localhost` and `127.0.0.1`, as PEM files in `dir`.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A second certificate from the same CA, for another host (`controller-9.example`) only.
    pub other_host_cert: PathBuf,
    pub other_host_key: PathBuf,
}

impl Pki {
    pub fn generate(dir: &Path) -> Pki {
        Pki::generate_as(dir, "", "AFC test CA")
    }

    /// A CA named `ca_name` and its node certificate, in files whose names start with `prefix`.
    pub fn generate_as(dir: &Path, prefix: &str, ca_name: &str) -> Pki {
        let ca = TestCa::new(ca_name).unwrap();
        let leaf = ca.leaf(&["localhost", "127.0.0.1"]).unwrap();
        let other = ca.leaf(&["controller-9.example"]).unwrap();
        let pki = Pki {
            ca: dir.join(format!("{prefix}ca.pem")),
            cert: dir.join(format!("{prefix}node.pem")),
            key: dir.join(format!("{prefix}node.key")),
            other_host_cert: dir.join(format!("{prefix}node9.pem")),
            other_host_key: dir.join(format!("{prefix}node9.key")),
        };
        std::fs::write(&pki.other_host_cert, other.cert_pem).unwrap();
        std::fs::write(&pki.other_host_key, other.key_pem).unwrap();
        std::fs::write(&pki.ca, ca.pem()).unwrap();
        std::fs::write(&pki.cert, leaf.cert_pem).unwrap();
        std::fs::write(&pki.key, leaf.key_pem).unwrap();
        pki
    }

    /// A rustls server configuration presenting the node certificate.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        Arc::new(controller::tls::server_config(&self.cert, &self.key).unwrap())
    }

    /// A reqwest client that trusts only the test CA.
    pub fn client(&self) -> reqwest::Client {
        self.client_builder().build().unwrap()
    }

    fn client_builder(&self) -> reqwest::ClientBuilder {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&self.ca).unwrap()).unwrap();
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(20))
    }

    /// The node certificate and key as a client identity.
    pub fn identity(&self) -> reqwest::Identity {
        let mut pem = std::fs::read(&self.cert).unwrap();
        pem.extend(std::fs::read(&self.key).unwrap());
        reqwest::Identity::from_pem(&pem).unwrap()
    }

    /// The other host's certificate and key as a client identity.
    pub fn other_host_identity(&self) -> reqwest::Identity {
        let mut pem = std::fs::read(&self.other_host_cert).unwrap();
        pem.extend(std::fs::read(&self.other_host_key).unwrap());
        reqwest::Identity::from_pem(&pem).unwrap()
    }

    /// A client that trusts this test CA and presents `identity` (mutual TLS).
    pub fn client_presenting(&self, identity: reqwest::Identity) -> reqwest::Client {
        self.client_builder().identity(identity).build().unwrap()
    }

    /// `sha256:…` of the node certificate, as audit lines name a client certificate.
    pub fn fingerprint(&self) -> String {
        controller::tls::fingerprint(&controller::tls::certificates(&self.cert).unwrap()[0])
    }
}

/// A TLS-terminating proxy on a free port in front of `upstream`; counts completed handshakes.
pub async fn tls_proxy(config: Arc<rustls::ServerConfig>, upstream: SocketAddr) -> (u16, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handshakes = Arc::new(AtomicU64::new(0));
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let count = handshakes.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                count.fetch_add(1, Ordering::Relaxed);
                let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    (port, handshakes)
}

fn sha(t: &str) -> String {
    hex::encode(Sha256::digest(t.as_bytes()))
}

struct TlsCluster {
    c: Cluster,
    /// node id → API address.
    api: BTreeMap<u64, String>,
    broker: u16,
    /// Completed TLS handshakes at the MQTT proxy.
    mqtt_handshakes: Arc<AtomicU64>,
}

impl TlsCluster {
    /// Three nodes with `[tls]` (Raft/admin and API over https), an API listener each, and
    /// `[mqtt]` to a broker in this process through a TLS proxy (`[mqtt.tls]`).
    async fn start() -> TlsCluster {
        let root = tempfile::tempdir().unwrap();
        let pki = Pki::generate(root.path());
        let broker = free_port();
        let broker_addr: SocketAddr = format!("127.0.0.1:{broker}").parse().unwrap();
        controller::leader::broker::start(
            broker_addr,
            4 * 1024 * 1024,
            &controller::leader::broker::Clients::Anyone,
        )
        .unwrap();
        poll("the broker to accept connections", Duration::from_secs(10), || {
            std::net::TcpStream::connect(broker_addr).ok()
        })
        .await;
        let (proxy, mqtt_handshakes) = tls_proxy(pki.server_config(), broker_addr).await;
        let initial: BTreeMap<u64, String> =
            (1..=3).map(|id| (id, format!("127.0.0.1:{}", free_port()))).collect();
        let api: BTreeMap<u64, String> =
            (1..=3).map(|id| (id, format!("127.0.0.1:{}", free_port()))).collect();
        let mut c = Cluster {
            root,
            nodes: BTreeMap::new(),
            http: pki.client(),
            tuning: Tuning::default(),
            initial: initial.clone(),
            scheme: "https",
        };
        let key = hex::encode(gate_key(1).verifying_key().to_bytes());
        for id in 1..=3u64 {
            let extra = format!(
                r#"
[tls]
cert_file = "{cert}"
key_file = "{key_file}"
ca_file = "{ca}"

[api]
listen = "{api}"
station_code = 1
{station_key}
[[api.tokens]]
name = "otto"
role = "operator"
sha256 = "{op}"
[[api.tokens]]
name = "vera"
role = "viewer"
sha256 = "{vi}"

[mqtt]
broker = "external"
address = "localhost:{proxy}"
client_id_prefix = "ctl"
station_code = 1
backoff_max_ms = 300
command_timeout_ms = 1500

[mqtt.tls]
ca_file = "{ca}"

[[mqtt.gates]]
gate = "g01"
tx_public_key = "{key}"
[[mqtt.gates]]
gate = "g02"
tx_public_key = "{key}"
"#,
                cert = pki.cert.display(),
                key_file = pki.key.display(),
                ca = pki.ca.display(),
                api = api[&id],
                op = sha(OPERATOR),
                vi = sha(VIEWER),
                station_key = station_key_config(c.root.path()),
            );
            let raft = "heartbeat_ms = 100\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\nconnect_timeout_ms = 300\n";
            let addr = initial[&id].clone();
            c.spawn_with(
                id,
                addr,
                id == 1,
                &NodeSetup { raft, extra: &extra, rust_log: "info,openraft=warn" },
            );
        }
        c.wait_leader(Duration::from_secs(30), None).await;
        TlsCluster { c, api, broker, mqtt_handshakes }
    }

    async fn call(
        &self,
        id: u64,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut rb =
            self.c.http.request(method, format!("https://{}{}", self.api[&id], path)).bearer_auth(token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Waits until node `id`'s API answers `/readyz` over https.
    async fn wait_api(&self, id: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let url = format!("https://{}/readyz", self.api[&id]);
            if let Ok(r) = self.c.http.get(url).send().await {
                if r.status() == StatusCode::OK {
                    return;
                }
            }
            assert!(std::time::Instant::now() < deadline, "API of node {id} not ready over https");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the leader's MQTT session is connected (through the TLS proxy), as its
    /// /metrics says; returns that metrics text.
    async fn wait_mqtt(&self, leader: u64) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.metrics(leader).await;
            if text.contains("\nafc_mqtt_connected 1\n") && text.contains("\nafc_mqtt_leader_session 1\n") {
                return text;
            }
            assert!(std::time::Instant::now() < deadline, "the leader's MQTT never connected:\n{text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metrics(&self, id: u64) -> String {
        let url = format!("https://{}/metrics", self.api[&id]);
        self.c.http.get(url).send().await.unwrap().text().await.unwrap()
    }

    fn follower(&self, leader: u64) -> u64 {
        (1..=3).find(|id| *id != leader).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_serves_https_only_and_forwards_a_follower_api_write_to_the_leader() {
    let _serial = CLUSTER_LOCK.lock().await;
    let t = TlsCluster::start().await;
    // The election itself went over https (votes and appends between the nodes).
    let leader = t.c.wait_leader(Duration::from_secs(20), None).await;
    let follower = t.follower(leader);
    t.wait_api(follower).await;

    // Plain HTTP to either listener gets no HTTP answer; neither does a client without the CA.
    let plain = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    for url in
        [format!("http://{}/readyz", t.api[&follower]), format!("http://{}/healthz", t.c.addr(follower))]
    {
        let r = plain.get(&url).send().await;
        assert!(r.is_err(), "plain HTTP answered at {url}: {:?}", r.map(|r| r.status()));
    }
    let untrusting = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let r = untrusting.get(format!("https://{}/readyz", t.api[&follower])).send().await;
    assert!(r.is_err(), "a client without the test CA got an answer");

    // A write to a follower's API is forwarded (over https) to the leader and takes effect.
    let (s, v) = t
        .call(
            follower,
            Method::PUT,
            "/api/v1/mode",
            OPERATOR,
            Some(json!({"names": ["fare_free"], "reason": "via follower"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    t.wait_api(leader).await;
    let (s, m) = t.call(leader, Method::GET, "/api/v1/mode", VIEWER, None).await;
    assert_eq!((s, m["bits"].as_u64()), (StatusCode::OK, Some(0x008)), "{m}");
    let (_, audit) = t.call(leader, Method::GET, "/api/v1/audit", VIEWER, None).await;
    let line = audit.as_array().unwrap().iter().find(|a| a["action"] == "mode.set").expect("audited");
    assert_eq!(line["actor"], "otto");
    assert!(line["detail"].as_str().unwrap().contains("via follower"));
    // The follower applies the replicated change too.
    let c = &t.c;
    let applied = c.leader_applied(leader).await;
    c.wait_applied(applied, Duration::from_secs(10)).await;
    let (_, m) = t.call(follower, Method::GET, "/api/v1/mode", VIEWER, None).await;
    assert_eq!(m["bits"], 0x008);
}

/// A gate on the (plain) broker side that answers commands with `result`, or stays silent.
async fn fake_gate(broker: u16, gate: &str, result: Option<CommandResult>) -> tokio::task::JoinHandle<()> {
    let mut o = MqttOptions::new(format!("fake-{gate}"), "127.0.0.1", broker);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut ev) = AsyncClient::new(o, 100);
    let cmd = Topic::GateCmd { station: ident("s1"), gate: ident(gate) }.to_string();
    let ack_topic = Topic::GateCmdAck { station: ident("s1"), gate: ident(gate) }.to_string();
    client.subscribe(cmd, QoS::AtLeastOnce).await.unwrap();
    let (up_tx, mut up_rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = up_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    // Commands are signed by the station; the gate signs its ack (key 1 here).
                    let Ok(c) = open_from_station::<WireCommand>(&p.topic, &p.payload) else { continue };
                    if let Some(result) = result {
                        let ack = CommandAck { id: c.id, result, detail: Some("fake gate".into()) };
                        let sealed = gate_seal(&ack_topic, &ack, 1);
                        let _ = client.publish(ack_topic.clone(), QoS::AtLeastOnce, false, sealed).await;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), up_rx.recv()).await.unwrap().unwrap();
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_commands_from_any_node_reach_the_gate_over_a_tls_broker_connection() {
    let _serial = CLUSTER_LOCK.lock().await;
    let t = TlsCluster::start().await;
    let leader = t.c.wait_leader(Duration::from_secs(20), None).await;
    let follower = t.follower(leader);
    t.wait_api(leader).await;
    t.wait_api(follower).await;
    let g1 = fake_gate(t.broker, "g01", Some(CommandResult::Ok)).await;
    let g2 = fake_gate(t.broker, "g02", Some(CommandResult::Rejected)).await;

    // The leader's MQTT session comes up (only through the TLS proxy can it reach the broker),
    // and /metrics says so.
    t.wait_mqtt(leader).await;
    // The leader registers the configured gates through Raft beside its MQTT start-up; a node
    // answers 404 for a gate it has not applied yet, so wait until the follower has both.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, gates) = t.call(follower, Method::GET, "/api/v1/gates", VIEWER, None).await;
        let names: Vec<&str> =
            gates.as_array().into_iter().flatten().filter_map(|g| g["gate"].as_str()).collect();
        if names.contains(&"g01") && names.contains(&"g02") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the follower never learnt the configured gates: {gates}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cmd = |dir: Option<&str>, command: &str| {
        let mut b = json!({"command": command, "reason": "desk let a wheelchair through"});
        if let Some(d) = dir {
            b["direction"] = json!(d);
        }
        b
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (s, v) = loop {
        let (s, v) = t
            .call(
                follower,
                Method::POST,
                "/api/v1/gates/g01/commands",
                OPERATOR,
                Some(cmd(None, "open_once_entry")),
            )
            .await;
        if s != StatusCode::SERVICE_UNAVAILABLE || std::time::Instant::now() > deadline {
            break (s, v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["result"].as_str(), v["command"].as_str()), (Some("ok"), Some("open_once_entry")));
    assert!(t.mqtt_handshakes.load(Ordering::Relaxed) >= 1, "the controller never did a TLS handshake");

    // From the leader itself, with an argument.
    let (s, v) = t
        .call(
            leader,
            Method::POST,
            "/api/v1/gates/g01/commands",
            OPERATOR,
            Some(cmd(Some("exit"), "set_direction")),
        )
        .await;
    assert_eq!((s, v["result"].as_str()), (StatusCode::OK, Some("ok")), "{v}");

    // The gate's refusal, a silent gate, bad input, an unknown gate, a role that may not.
    let (s, v) = t
        .call(follower, Method::POST, "/api/v1/gates/g02/commands", OPERATOR, Some(cmd(None, "in_service")))
        .await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::CONFLICT, Some("command_rejected")), "{v}");
    g1.abort();
    let (s, v) = t
        .call(leader, Method::POST, "/api/v1/gates/g01/commands", OPERATOR, Some(cmd(None, "out_of_service")))
        .await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::GATEWAY_TIMEOUT, Some("gate_timeout")), "{v}");
    let (s, v) = t
        .call(leader, Method::POST, "/api/v1/gates/g01/commands", OPERATOR, Some(cmd(None, "fly_away")))
        .await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "{v}");
    let (s, v) = t
        .call(leader, Method::POST, "/api/v1/gates/g01/commands", OPERATOR, Some(cmd(None, "set_direction")))
        .await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "{v}");
    let (s, v) = t
        .call(leader, Method::POST, "/api/v1/gates/g99/commands", OPERATOR, Some(cmd(None, "in_service")))
        .await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{v}");
    let (s, v) = t
        .call(leader, Method::POST, "/api/v1/gates/g01/commands", VIEWER, Some(cmd(None, "in_service")))
        .await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{v}");

    // Every command that was sent is in the audit log, with who and why.
    let (_, audit) = t.call(leader, Method::GET, "/api/v1/audit", VIEWER, None).await;
    let details: Vec<String> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["action"] == "gate.command" && a["actor"] == "otto")
        .map(|a| a["detail"].as_str().unwrap().to_owned())
        .collect();
    for want in ["g01 open_once_entry", "g01 set_direction exit", "g02 in_service", "g01 out_of_service"] {
        assert!(details.iter().any(|d| d.starts_with(want)), "no audit line {want:?} in {details:?}");
    }
    assert!(details.iter().all(|d| d.contains("wheelchair")), "{details:?}");
    g2.abort();
}

/// The value of the sample `series` (name with labels, exactly as rendered) in a metrics text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_gate_traffic_and_the_ledger_can_be_searched_by_gate_and_card() {
    let _serial = CLUSTER_LOCK.lock().await;
    let t = TlsCluster::start().await;
    let leader = t.c.wait_leader(Duration::from_secs(20), None).await;
    t.wait_api(leader).await;
    let before = t.wait_mqtt(leader).await;
    assert_eq!(sample(&before, "afc_tx_ingested_total"), Some(0.0), "{before}");
    assert_eq!(sample(&before, "afc_ledger_append_seconds_count"), Some(0.0));
    // Followers do not hold the broker session.
    let follower = t.follower(leader);
    t.wait_api(follower).await;
    let f = t.metrics(follower).await;
    assert_eq!(sample(&f, "afc_mqtt_connected"), Some(0.0), "{f}");

    // A gate publishes two batches (one re-sent) on the plain side of the broker.
    let mut o = MqttOptions::new("tx-gate", "127.0.0.1", t.broker);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut ev) = AsyncClient::new(o, 100);
    let pump = tokio::spawn(async move {
        loop {
            if ev.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let topic = Topic::GateTx { station: ident("s1"), gate: ident("g01") }.to_string();
    let batch = |seqs: std::ops::RangeInclusive<u64>| {
        let records: Vec<_> = seqs.map(|s| record("s1", "g01", s)).collect();
        let sig = controller::chain::sign_batch(&ident("s1"), &ident("g01"), &records, &gate_key(1));
        wire::encode(&wire::TxBatch {
            station: ident("s1"),
            gate: ident("g01"),
            records: Some(records),
            raw: None,
            signature: hex::encode(sig),
            installation: crate::mqtt::installation("g01"),
            covers_from: None,
        })
    };
    for payload in [batch(1..=3), batch(1..=3), batch(4..=5)] {
        client.publish(topic.clone(), QoS::AtLeastOnce, false, payload).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = t.metrics(leader).await;
        if sample(&text, "afc_tx_batches_total{outcome=\"acked\"}") == Some(3.0) {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "batches never acked:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    pump.abort();
    // Five new records (the re-sent batch adds none), three appends timed.
    assert_eq!(sample(&text, "afc_tx_ingested_total"), Some(5.0), "{text}");
    assert_eq!(sample(&text, "afc_ledger_append_seconds_count"), Some(3.0));
    assert!(sample(&text, "afc_ledger_append_seconds_sum").unwrap() > 0.0);
    assert_eq!(sample(&text, "afc_ledger_append_seconds_bucket{le=\"+Inf\"}"), Some(3.0));
    assert_eq!(sample(&text, "afc_clearing_backlog_records"), Some(5.0));
    assert_eq!(sample(&text, "afc_clearing_enabled"), Some(0.0));
    if let Some(promtool) = crate::api::promtool() {
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // /api/v1/clearing is the uploader's status (disabled here) over the replicated cursor.
    let (s, c) = t.call(leader, Method::GET, "/api/v1/clearing", VIEWER, None).await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(
        (c["enabled"].as_bool(), c["backlog"].as_u64(), c["leading"].as_bool()),
        (Some(false), Some(5), Some(false))
    );

    // The ledger searched by gate and card: record n carries card 31_000_000 + n.
    let (s, v) =
        t.call(leader, Method::GET, "/api/v1/ledger/search?gate=g01&card=31000004", VIEWER, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{v}");
    assert_eq!((entries[0]["record"]["gate_seq"].as_u64(), v["next_from"].as_u64()), (Some(4), None));
}

/// Three nodes with mutual TLS on the Raft/admin listener (`require_client_cert`, station CA =
/// `pki`), each with an API listener (https) and a viewer token; the test client presents the
/// node certificate.
struct MtlsCluster {
    c: Cluster,
    pki: Pki,
    api: BTreeMap<u64, String>,
}

impl MtlsCluster {
    async fn start() -> MtlsCluster {
        let root = tempfile::tempdir().unwrap();
        let pki = Pki::generate(root.path());
        let initial: BTreeMap<u64, String> =
            (1..=3).map(|id| (id, format!("127.0.0.1:{}", free_port()))).collect();
        let api: BTreeMap<u64, String> =
            (1..=3).map(|id| (id, format!("127.0.0.1:{}", free_port()))).collect();
        let mut c = Cluster {
            root,
            nodes: BTreeMap::new(),
            http: pki.client_presenting(pki.identity()),
            tuning: Tuning::default(),
            initial: initial.clone(),
            scheme: "https",
        };
        for id in 1..=3u64 {
            let extra = format!(
                r#"
[tls]
cert_file = "{cert}"
key_file = "{key}"
ca_file = "{ca}"
require_client_cert = true

[api]
listen = "{api}"
[[api.tokens]]
name = "vera"
role = "viewer"
sha256 = "{vi}"
"#,
                cert = pki.cert.display(),
                key = pki.key.display(),
                ca = pki.ca.display(),
                api = api[&id],
                vi = sha(VIEWER),
            );
            let raft = "heartbeat_ms = 100\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\nconnect_timeout_ms = 300\n";
            let addr = initial[&id].clone();
            c.spawn_with(
                id,
                addr,
                id == 1,
                &NodeSetup { raft, extra: &extra, rust_log: "info,openraft=warn" },
            );
        }
        c.wait_leader(Duration::from_secs(30), None).await;
        MtlsCluster { c, pki, api }
    }

    /// The replicated audit log as node `id`'s API serves it.
    async fn audit(&self, id: u64) -> Vec<Value> {
        let url = format!("https://{}/api/v1/audit?from=1&limit=1000", self.api[&id]);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self.c.http.get(&url).bearer_auth(VIEWER).send().await {
                if r.status() == StatusCode::OK {
                    return r.json::<Vec<Value>>().await.unwrap();
                }
            }
            assert!(std::time::Instant::now() < deadline, "API of node {id} never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_only_clients_with_a_station_certificate_get_an_answer_and_the_cluster_replicates() {
    let _serial = CLUSTER_LOCK.lock().await;
    let m = MtlsCluster::start().await;
    let c = &m.c;
    // The election went over mutual TLS; writes sent to a follower reach every node.
    let leader = c.wait_leader(Duration::from_secs(20), None).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let key = gate_key(1);
    assert!(matches!(
        c.write(follower, &register("g01", &key)).await.unwrap(),
        Response::GateRegistered { .. }
    ));
    for i in 0..3u64 {
        let r = c.write(1 + i % 3, &batch("g01", &key, i * 5 + 1..=i * 5 + 5)).await.unwrap();
        assert!(matches!(r, Response::Appended { appended: 5, .. }), "{r:?}");
    }
    c.wait_applied(c.leader_applied(leader).await, Duration::from_secs(10)).await;
    for id in 1..=3 {
        assert_eq!(c.ledger(id).await.len(), 15, "node {id}");
    }

    // A client without a certificate, and one with a certificate from another CA, get no answer:
    // the handshake fails before a request is read, with or without the cluster secret.
    let stranger = Pki::generate_as(c.root.path(), "stranger-", "Some other CA");
    let no_cert = m.pki.client();
    let foreign_cert = m.pki.client_presenting(stranger.identity());
    for (who, client) in [("no certificate", &no_cert), ("another CA's certificate", &foreign_cert)] {
        for id in 1..=3 {
            let base = format!("https://{}", c.addr(id));
            let r = client.get(format!("{base}/healthz")).send().await;
            assert!(r.is_err(), "{who}: node {id} answered /healthz: {:?}", r.map(|r| r.status()));
            let r = client
                .post(format!("{base}/admin/write"))
                .header("x-afc-cluster-secret", SECRET)
                .json(&batch("g01", &key, [16]))
                .send()
                .await;
            assert!(r.is_err(), "{who}: node {id} answered /admin/write: {:?}", r.map(|r| r.status()));
        }
    }
    // The station certificate gets its answer.
    let r = c.http.get(format!("https://{}/healthz", c.addr(follower))).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // The gate registration the follower forwarded is audited on the replicated log, naming the
    // follower and the client certificate it presented.
    let audit = m.audit(leader).await;
    let lines = |actor: String| -> Vec<String> {
        audit
            .iter()
            .filter(|a| a["action"] == "admin.write.register_gate" && a["actor"] == actor.as_str())
            .map(|a| a["detail"].as_str().unwrap().to_owned())
            .collect()
    };
    let relayed = lines(format!("node:{follower}"));
    assert_eq!(relayed.len(), 1, "no audit line for the forwarded registration: {audit:?}");
    assert!(relayed[0].contains(&m.pki.fingerprint()) && relayed[0].contains("g01"), "{}", relayed[0]);
    // ... and the test's own call to the follower, which named no node, by its certificate.
    let direct = lines("admin-listener".to_owned());
    assert!(direct.len() == 1 && direct[0].contains(&m.pki.fingerprint()), "{audit:?}");
    // A station certificate for another host cannot speak for node 1 (whose address is
    // 127.0.0.1); naming no node, it is let through and audited under its fingerprint.
    let other = m.pki.client_presenting(m.pki.other_host_identity());
    let send = |origin: Option<&'static str>| {
        let mut rb = other
            .post(format!("https://{}/admin/write", c.addr(leader)))
            .header("x-afc-cluster-secret", SECRET)
            .json(&controller::state::Request::ClearingAck { through_index: 0 });
        if let Some(o) = origin {
            rb = rb.header("x-afc-origin-node", o);
        }
        rb.send()
    };
    let r = send(Some("1")).await.unwrap();
    let (status, text) = (r.status(), r.text().await.unwrap());
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    assert!(text.contains("not valid for 127.0.0.1"), "{text}");
    let r = send(None).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.text().await);
    let audit = m.audit(leader).await;
    let other_fp =
        controller::tls::fingerprint(&controller::tls::certificates(&m.pki.other_host_cert).unwrap()[0]);
    assert!(
        audit.iter().any(|a| a["action"] == "admin.write.clearing_ack"
            && a["actor"] == "admin-listener"
            && a["detail"].as_str().unwrap().contains(&other_fp)),
        "{audit:?}"
    );
    // Gate batches are not audited one by one: the gate's signature is their proof.
    assert!(!audit.iter().any(|a| a["action"].as_str().unwrap().contains("append_tx")), "{audit:?}");
}

/// A TLS server presenting `config`'s certificate that never answers: counts TCP connections,
/// completed handshakes and the bytes received after a handshake.
#[derive(Default)]
struct Impostor {
    connections: AtomicU64,
    handshakes: AtomicU64,
    bytes: AtomicU64,
}

async fn impostor(config: Arc<rustls::ServerConfig>) -> (u16, Arc<Impostor>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Impostor::default());
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let count = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            count.connections.fetch_add(1, Ordering::Relaxed);
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                count.handshakes.fetch_add(1, Ordering::Relaxed);
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    count.bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_at_an_address_without_a_station_certificate_receives_nothing_and_the_change_fails_clearly(
) {
    let _serial = CLUSTER_LOCK.lock().await;
    let m = MtlsCluster::start().await;
    let c = &m.c;
    let leader = c.wait_leader(Duration::from_secs(20), None).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    // A server at the new node's address with a certificate for the right names, from another CA.
    let other = Pki::generate_as(c.root.path(), "impostor-", "Impostor CA");
    let (port, seen) = impostor(other.server_config()).await;
    let addr = format!("127.0.0.1:{port}");

    // Asked through a follower (forwarded to the leader, which checks the address first).
    let r = c.post(follower, "/admin/learner", &AddLearner { node_id: 4, addr: addr.clone() }).await.unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    // Not a handshake completed, not a byte of a request (no cluster secret, no entry) reached
    // the impostor.
    assert_eq!(seen.handshakes.load(Ordering::Relaxed), 0, "a handshake with the impostor completed");
    assert_eq!(seen.bytes.load(Ordering::Relaxed), 0, "the impostor received request bytes");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("node 4 at {addr} cannot be added"))
            && message.contains("not one from the station CA")
            && message.contains("membership unchanged"),
        "{message}"
    );
    // The membership is unchanged on every node.
    for id in 1..=3 {
        let m = c.metrics(id).await.unwrap();
        let nodes: Vec<u64> = m.membership_config.membership().nodes().map(|(id, _)| *id).collect();
        assert_eq!(nodes, vec![1, 2, 3], "node {id}'s membership");
    }
    // The leader did connect (the check ran), and nothing reaches the impostor later either.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(seen.connections.load(Ordering::Relaxed) >= 1, "the leader never tried the address");
    assert_eq!(seen.handshakes.load(Ordering::Relaxed), 0, "a handshake with the impostor completed");
    assert_eq!(seen.bytes.load(Ordering::Relaxed), 0, "the impostor received request bytes");
    // The attempt is in the audit log, naming the follower that relayed it.
    let audit = m.audit(leader).await;
    assert!(
        audit.iter().any(|a| a["action"] == "admin.learner"
            && a["actor"] == format!("node:{follower}")
            && a["detail"].as_str().unwrap().contains(&addr)),
        "{audit:?}"
    );
}
