//! A whole station started service by service in the private network of [`crate::net`]: the
//! three controllers each in their own namespace (`station controller run`), and in the world the
//! station's broker, the clearing server, and per gate a PLC simulator and a gate agent. The
//! configuration is the one `station up` writes ([`station::provision`]), with the controllers,
//! the broker and clearing moved to their addresses in the private network.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use afc_domain::model::StationCode;
use afc_domain::topic::Topic;
use afc_domain::wire::{ReaderReply, TxAck};
use anyhow::Context as _;
use gate_agent::reader_sim::{QrIssuer, ReaderConn, ReaderSim};
use powercut::service::Service;
use serde_json::{json, Value};
use station::plan::{Layout, Plan, NODES};
use station::provision::Secrets;
use system_tests::{eventually, station_exe, LedgerRow};

use crate::net::{node_ip, Net, BROKER, HUB};

/// The canary soak (first versions go to every gate at once, so it hardly matters here).
const SOAK_SECS: u64 = 8;

/// The pause between two taps at one gate.
pub const TAP_GAP: Duration = Duration::from_millis(100);

/// Every `(gate, gate_seq)` a gate answered the reader with.
pub type Promises = Arc<Mutex<BTreeSet<(String, u64)>>>;

/// Every `tx/ack` seen on the broker: when, for which gate, through which gate_seq.
pub type Acks = Arc<Mutex<Vec<(Instant, String, u64)>>>;

/// One node's `/api/v1/cluster`.
#[derive(Debug, Clone)]
pub struct View {
    pub role: String,
    pub term: u64,
    pub leader: Option<u16>,
}

pub struct Cluster {
    // Field order is drop order: gates stop before the controllers, the network goes last.
    gates: Vec<Service>,
    plcs: Vec<Service>,
    controllers: Vec<Service>,
    broker: Service,
    clearing: Service,
    pub plan: Plan,
    pub secrets: Secrets,
    http: reqwest::Client,
    pub net: Net,
    _dir: tempfile::TempDir,
}

fn os(items: &[&str]) -> Vec<OsString> {
    items.iter().map(OsString::from).collect()
}

/// `"127.0.0.1:port"` → `"ip:port"` in a generated configuration.
fn moved(text: &str, port: u16, ip: &str) -> String {
    text.replace(&format!("127.0.0.1:{port}\""), &format!("{ip}:{port}\""))
}

impl Cluster {
    /// Starts everything in `net` with `gates` gates, sets the first parameters through the API,
    /// and waits until every gate is online and running them.
    pub async fn start(net: Net, gates: u16) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let plan = Plan { gates, ..Plan::default() };
        let layout = Layout::new(&dir.path().join("station"));
        layout.load_or_create(&plan)?;
        let secrets = station::provision::secrets(&layout, &plan)?;
        let cfg_dir = layout.config();
        let logs = layout.logs();
        std::fs::create_dir_all(&cfg_dir)?;
        std::fs::create_dir_all(&logs)?;
        // `PARTITIONS_STATION_EXE`: another build of `station` (e.g. of a clean checkout).
        let exe =
            std::env::var_os("PARTITIONS_STATION_EXE").map_or_else(station_exe, std::path::PathBuf::from);
        let broker_addr = format!("{BROKER}:1883");
        let clearing_addr = format!("{HUB}:8480");

        let mut args = os(&["clearing-server", "--listen", &clearing_addr, "--data-dir"]);
        args.push(layout.data("clearing").into());
        args.extend([OsString::from("--token-file"), secrets.clearing_token_file.clone().into()]);
        args.extend([OsString::from("--feed-key-file"), secrets.feed_key_file.clone().into()]);
        let mut clearing = Service::new("clearing", &exe, args, logs.join("clearing.log"));
        clearing.start()?;

        let users = secrets.broker_users_file.clone().context("the station's own broker has a users file")?;
        let mut args = os(&["broker", "--listen", &broker_addr, "--users-file"]);
        args.push(users.into());
        let mut broker = Service::new("broker", &exe, args, logs.join("broker.log"));
        broker.start()?;

        let mut controllers = Vec::new();
        for id in 1..=NODES {
            let mut text = station::provision::controller_config(&layout, &plan, &secrets, id, SOAK_SECS);
            for m in 1..=NODES {
                text = moved(&text, plan.raft(m).port(), &node_ip(m));
            }
            text = moved(&text, plan.api(id).port(), &node_ip(id));
            text = moved(&text, plan.broker_listen().port(), BROKER);
            text = text.replace(&format!("http://{}", plan.clearing()), &format!("http://{clearing_addr}"));
            anyhow::ensure!(
                !text.contains("127.0.0.1"),
                "controller {id}: a loopback address is left:\n{text}"
            );
            let path = cfg_dir.join(format!("controller-{id}.toml"));
            std::fs::write(&path, text)?;
            let mut args = os(&["netns", "exec", net.node_ns(id)]);
            args.push(exe.clone().into());
            args.extend(os(&["controller", "run", "--config"]));
            args.push(path.into());
            if id == 1 {
                args.push("--bootstrap".into());
            }
            let mut svc = Service::new(
                &format!("controller-{id}"),
                "ip",
                args,
                logs.join(format!("controller-{id}.log")),
            );
            svc.start()?;
            controllers.push(svc);
        }

        let mut plcs = Vec::new();
        let mut gate_procs = Vec::new();
        for (n, gate) in plan.gate_numbers() {
            let a = [
                "plc-sim",
                "--listen",
                &plan.plc(n).to_string(),
                "--control",
                &plan.plc_control(n).to_string(),
            ];
            let mut plc =
                Service::new(&format!("plc-{gate}"), &exe, os(&a), logs.join(format!("plc-{gate}.log")));
            plc.start()?;
            plcs.push(plc);
            let text = station::provision::gate_config(&layout, &plan, &secrets, n)?;
            let text = moved(&text, plan.broker_listen().port(), BROKER);
            let path = cfg_dir.join(format!("gate-{gate}.toml"));
            std::fs::write(&path, text)?;
            let mut args = os(&["gate-agent", "--config"]);
            args.push(path.into());
            let mut g =
                Service::new(&format!("gate-{gate}"), &exe, args, logs.join(format!("gate-{gate}.log")));
            g.start()?;
            gate_procs.push(g);
        }
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
        let c = Cluster {
            gates: gate_procs,
            plcs,
            controllers,
            broker,
            clearing,
            plan,
            secrets,
            http,
            net,
            _dir: dir,
        };
        c.first_parameters().await?;
        c.parameters_on_every_gate().await?;
        Ok(c)
    }

    fn api(&self, id: u16) -> String {
        format!("http://{}:{}", node_ip(id), self.plan.api(id).port())
    }

    pub fn token(&self, name: &str) -> String {
        self.secrets.api_token(name).unwrap_or_default().to_owned()
    }

    pub async fn get(&self, id: u16, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.api(id));
        let r = self.http.get(&url).bearer_auth(self.token("viewer")).send().await?;
        let status = r.status();
        let body: Value = r.json().await.with_context(|| format!("GET {url}: {status}"))?;
        anyhow::ensure!(status.is_success(), "GET {url}: {status} {body}");
        Ok(body)
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let leader = self.leader(Duration::from_secs(60)).await?;
        let url = format!("{}{path}", self.api(leader));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
        let r = http.post(&url).bearer_auth(self.token("engineer")).json(body).send().await?;
        let status = r.status();
        let answer: Value = r.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(status.is_success(), "POST {url}: {status} {answer}");
        Ok(answer)
    }

    /// Node `id`'s view of the cluster.
    pub async fn view(&self, id: u16) -> anyhow::Result<View> {
        let c = self.get(id, "/api/v1/cluster").await?;
        Ok(View {
            role: c["role"].as_str().unwrap_or_default().to_owned(),
            term: c["term"].as_u64().unwrap_or(0),
            leader: c["leader"].as_u64().map(|l| l as u16),
        })
    }

    /// The node that calls itself leader and that every node names, within `within`.
    pub async fn leader(&self, within: Duration) -> anyhow::Result<u16> {
        let all: Vec<u16> = (1..=NODES).collect();
        self.leader_among(&all, within).await
    }

    /// The one node of `among` that calls itself leader and that all of `among` name.
    pub async fn leader_among(&self, among: &[u16], within: Duration) -> anyhow::Result<u16> {
        eventually(&format!("one leader nodes {among:?} agree on"), within, || async {
            let mut named = BTreeSet::new();
            let mut leaders = Vec::new();
            for &id in among {
                let v = self.view(id).await?;
                named.insert(v.leader);
                if v.role == "leader" {
                    leaders.push(id);
                }
            }
            Ok(match (leaders.as_slice(), named.len()) {
                ([l], 1) if named.contains(&Some(*l)) => Some(*l),
                _ => None,
            })
        })
        .await
    }

    /// Node `id`'s whole ledger from its API.
    pub async fn ledger(&self, id: u16) -> anyhow::Result<Vec<LedgerRow>> {
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let page = self.get(id, &format!("/api/v1/ledger?from={from}&limit=1000")).await?;
            let rows = system_tests::ledger_rows(&page)?;
            let entries = rows.len();
            if let Some(last) = rows.last() {
                from = last.index + 1;
            }
            out.extend(rows);
            if entries < 1000 {
                return Ok(out);
            }
        }
    }

    /// `GET` on the clearing server's station resource `path`.
    pub async fn clearing(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("http://{HUB}:8480/v1/stations/{}/{path}", self.plan.station);
        let r = self.http.get(&url).bearer_auth(&self.secrets.clearing_token).send().await?;
        let status = r.status();
        let body: Value = r.json().await.with_context(|| format!("GET {url}: {status}"))?;
        anyhow::ensure!(status.is_success(), "GET {url}: {status} {body}");
        Ok(body)
    }

    /// The Dalian fare table, a blacklist and the QR issuer key, as `station up` sets them.
    async fn first_parameters(&self) -> anyhow::Result<()> {
        let body = json!({
            "network": serde_json::from_str::<Value>(station::setup::DALIAN_NETWORK)?,
            "fare_rule": serde_json::from_str::<Value>(station::setup::DALIAN_FARE_RULE)?,
            "reason": "partition test",
        });
        self.post("/api/v1/parameters/fare-table", &body).await?;
        let cards: Vec<Value> = station::setup::BLACKLISTED_CARDS
            .iter()
            .map(|i| json!({"media": "svc", "id": gate_agent::reader_sim::CARD_BASE + *i as u64 * 7 + 1}))
            .collect();
        self.post("/api/v1/parameters/blacklist", &json!({"full": cards, "reason": "partition test"}))
            .await?;
        let now = gate_agent::gate::now();
        let key = hex::encode(self.secrets.qr_issuer_key.verifying_key().to_bytes());
        let keys = json!({
            "keys": [{"issuer": 1, "key_id": 1, "public_key": key,
                      "valid_from": now.0 - 24 * 3600 * 1000, "valid_to": now.0 + 365 * 24 * 3600 * 1000}],
            "reason": "partition test",
        });
        self.post("/api/v1/parameters/qr-keys", &keys).await?;
        Ok(())
    }

    async fn parameters_on_every_gate(&self) -> anyhow::Result<()> {
        eventually("parameters active on every gate", Duration::from_secs(120), || async {
            let leader = self.leader(Duration::from_secs(10)).await?;
            let gates = self.get(leader, "/api/v1/gates").await?;
            let gates = gates.as_array().context("gates: not a list")?;
            let ready = gates.len() == usize::from(self.plan.gates)
                && gates.iter().all(|g| {
                    g["online"] == true
                        && ["fare_table", "blacklist", "qr_keys"].iter().all(|k| {
                            g.pointer(&format!("/reported_versions/{k}")).and_then(Value::as_u64) > Some(0)
                        })
                });
            Ok(ready.then_some(()))
        })
        .await
    }

    /// Passengers at every gate until `stop`; every promise lands in `promises`.
    pub fn traffic(
        &self,
        promises: &Promises,
        stop: &tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinSet<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for (n, gate) in self.plan.gate_numbers() {
            let addr = self.plan.reader(n);
            let code = StationCode(self.plan.station_code);
            let origins = [101, 105, 116, 220, 224].map(StationCode).to_vec();
            let issuer = QrIssuer { issuer: 1, key_id: 1, key: self.secrets.qr_issuer_key.clone() };
            let mut sim = ReaderSim::new(u64::from(n), code, origins, 2_000, Some(issuer));
            let (promises, stop) = (promises.clone(), stop.clone());
            tasks.spawn(async move {
                let mut conn = None;
                while !stop.is_cancelled() {
                    if conn.is_none() {
                        conn = ReaderConn::connect(addr).await.ok();
                    }
                    if let Some(c) = conn.as_mut() {
                        let (presented, tap) = sim.next_tap(gate_agent::gate::now());
                        match c.tap(&tap).await {
                            Ok(ReaderReply::Response(r)) => {
                                if let Some(seq) = r.gate_seq {
                                    promises
                                        .lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .insert((gate.clone(), seq));
                                }
                                sim.apply(presented, &r);
                            }
                            Ok(ReaderReply::Error(_)) => {}
                            Err(_) => conn = None,
                        }
                    }
                    tokio::time::sleep(TAP_GAP).await;
                }
            });
        }
        tasks
    }

    /// Listens on the broker for every gate's `tx/ack` (checking the station's signature, as a
    /// gate does) until `stop`.
    pub async fn watch_acks(
        &self,
        acks: &Acks,
        stop: &tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let (_, _, password) = self
            .secrets
            .mqtt_users
            .iter()
            .find(|(u, _, _)| u == "controller")
            .context("no controller MQTT login")?
            .clone();
        let mut o = rumqttc::MqttOptions::new("partition-test-ack-watch", BROKER, 1883);
        o.set_credentials("controller", password);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(4 << 20, 1 << 20);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 64);
        let filter = format!("afc/v1/{}/gates/+/tx/ack", self.plan.station);
        let key = self.secrets.package_key.verifying_key();
        let (acks, stop) = (acks.clone(), stop.clone());
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                let ev = tokio::select! {
                    () = stop.cancelled() => return,
                    ev = eventloop.poll() => ev,
                };
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = client.subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce).await;
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let Ok(Topic::GateTxAck { gate, .. }) = Topic::parse(&p.topic) else { continue };
                        match afc_domain::signed::open::<TxAck>(&p.topic, &p.payload, |_| Some(key)) {
                            Ok(a) => acks.lock().unwrap_or_else(|e| e.into_inner()).push((
                                Instant::now(),
                                gate.to_string(),
                                a.through_seq,
                            )),
                            Err(e) => eprintln!("[partitions] unverifiable tx/ack on {}: {e}", p.topic),
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed).await.context("ack watch: no SubAck")??;
        Ok(task)
    }

    /// The last lines of every service's log, for a failure message.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for s in self.controllers.iter().chain([&self.broker, &self.clearing]).chain(&self.gates) {
            out += &format!("--- {}\n", s.log_tail(lines));
        }
        out
    }

    /// With `PARTITIONS_KEEP_LOGS=dir`, copies every service log there (for a look after a run).
    fn keep_logs(&self) {
        let Some(to) = std::env::var_os("PARTITIONS_KEEP_LOGS") else { return };
        let to = std::path::Path::new(&to).join(self.net.tag());
        let _ = std::fs::create_dir_all(&to);
        let logs = Layout::new(&self._dir.path().join("station")).logs();
        for e in std::fs::read_dir(logs).into_iter().flatten().flatten() {
            let _ = std::fs::copy(e.path(), to.join(e.file_name()));
        }
        eprintln!("[partitions] logs kept in {}", to.display());
    }

    /// Panics (with the log) if a service exited by itself.
    pub fn assert_running(&mut self) {
        for s in self.controllers.iter_mut().chain(self.gates.iter_mut()).chain(self.plcs.iter_mut()) {
            s.assert_running();
        }
        self.broker.assert_running();
        self.clearing.assert_running();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.keep_logs();
    }
}

/// Per gate, the highest `through_seq` among `acks` (all of them, or those seen before `until`).
pub fn acked_through(acks: &Acks, until: Option<Instant>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (at, gate, through) in acks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        if until.is_none_or(|u| *at <= u) {
            let best = out.entry(gate.clone()).or_insert(0);
            *best = (*best).max(*through);
        }
    }
    out
}
