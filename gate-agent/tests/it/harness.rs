//! What the tests run against: an embedded broker (rumqttd on its own thread), a stand-in station
//! controller (an MQTT client that verifies batches, de-duplicates by gate_seq and acks, signs
//! what it publishes with the station key the agent trusts, and checks the gate's signature on
//! everything the gate sends), the PLC simulator, the agent in process or as the real binary, and
//! signed packages of a small network.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use afc_domain::blacklist::{Blacklist, Entry};
use afc_domain::ledger::{verify_canonical_batch, TxRecord};
use afc_domain::model::{BusinessDayRule, CardType, Ident, Media, ParamKind, StationCode, Timestamp};
use afc_domain::network::{compile, Band, FareRule, Increment, NetworkDescription};
use afc_domain::package::{package_sha256, split, BlacklistBody, Package};
use afc_domain::signed::{open_gate, seal};
use afc_domain::topic::Topic;
use afc_domain::wire::{
    self, CommandAck, GateEvent, GateStatus, Heartbeat, ParamPointer, ParamsAck, QrUsedBatch, SvcCard,
    TapMedia, TapRequest, TxAck, TxBatch, WireMessage,
};
use ed25519_dalek::{SigningKey, VerifyingKey};
use gate_agent::config::Config;
use gate_agent::plc_sim::{PlcSim, SimConfig};
use gate_agent::reader_sim::ReaderConn;
use gate_agent::{Listeners, Running};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const DEADLINE: Duration = Duration::from_secs(20);
pub const STATION: &str = "s1";
pub const GATE: &str = "g01";
pub const HERE: StationCode = StationCode(101);
pub const FAR: StationCode = StationCode(104);
pub const BLACKLISTED: u64 = 3104_0000_0000_0666;
pub const PACKAGE_KEY_ID: u32 = 7;

pub fn package_key() -> SigningKey {
    SigningKey::from_bytes(&[42u8; 32])
}

pub fn gate_key() -> SigningKey {
    SigningKey::from_bytes(&[9u8; 32])
}

/// The station signs control messages with its package key (SPEC §5): the key id and key the
/// agent's `[trusted_keys]` hold.
pub const STATION_KEY_ID: u32 = PACKAGE_KEY_ID;

pub fn station_key() -> SigningKey {
    package_key()
}

/// `msg` signed by the station for `topic`, as a controller publishes it.
pub fn signed<T: WireMessage>(topic: &str, msg: &T) -> Vec<u8> {
    seal(topic, msg, STATION_KEY_ID, &station_key())
}

/// Polls `f` until it returns `Some`, or panics with `what` after the deadline.
pub async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub use afc_test_support::net::free_port;

/// Starts rumqttd on `port` on its own thread (its `start` blocks) and waits until it accepts.
pub async fn start_broker(port: u16) {
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 100
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 2097152
    max_inflight_count = 100
    dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&text).unwrap();
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        let _ = broker.start();
    });
    eventually("the broker to accept connections", || std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .await;
}

/// The test network: one line A(101) – B(102) – C(103) – D(104), 3, 4 and 10 km apart.
pub fn network() -> NetworkDescription {
    afc_test_support::network::sample()
}

/// Bands 2/3/4 yuan (scaled by `scale_percent`), ordinary cards pay 100 %.
pub fn fare_body(scale_percent: u32) -> Vec<u8> {
    let s = |f: u32| f * scale_percent / 100;
    let rule = FareRule {
        name: "test".into(),
        bands: vec![
            Band { up_to_m: 6000, fare_fen: s(200) },
            Band { up_to_m: 12_000, fare_fen: s(300) },
            Band { up_to_m: 18_000, fare_fen: s(400) },
        ],
        beyond: Some(Increment { fen: s(100), per_m: 15_000 }),
        min_fare_fen: s(200),
        discounts: BTreeMap::from([(CardType::ORDINARY, 100), (CardType::STUDENT, 50)]),
        token_percent: 100,
        max_ride_minutes: None,
        overstay_surcharge_fen: 0,
        business_day: BusinessDayRule::default(),
        card_type_names: Default::default(),
    };
    compile(&network(), &rule).unwrap().encode()
}

pub fn blacklist_body(version: u64) -> Vec<u8> {
    BlacklistBody::Full(Blacklist::from_entries(version, [Entry::single(Media::Svc, BLACKLISTED)])).encode()
}

pub fn package(
    kind: ParamKind,
    version: u64,
    effective_from: Timestamp,
    body: Vec<u8>,
    key: &SigningKey,
) -> Vec<u8> {
    Package::sign(kind, version, effective_from, body, PACKAGE_KEY_ID, key).encode()
}

pub fn pointer_for(bytes: &[u8], version: u64, chunks: u32, effective_from: Timestamp) -> ParamPointer {
    ParamPointer {
        version,
        sha256: hex::encode(package_sha256(bytes)),
        size: bytes.len() as u64,
        chunks,
        effective_from,
    }
}

pub fn card(id: u64, balance_fen: u32, entry: Option<(StationCode, Timestamp)>) -> SvcCard {
    afc_test_support::cards::svc(id, CardType::ORDINARY, balance_fen, entry)
}

pub fn svc_tap(direction: afc_domain::model::Direction, card: SvcCard) -> TapRequest {
    TapRequest { direction, media: TapMedia::Svc { card } }
}

/// A stand-in station controller on the broker.
pub struct Controller {
    pub client: AsyncClient,
    /// Records committed, by gate_seq (a re-sent record lands on the same key: counted once).
    pub ledger: Arc<Mutex<BTreeMap<u64, TxRecord>>>,
    /// How many records arrived in batches, duplicates included.
    pub received: Arc<Mutex<u64>>,
    pub forged_batches: Arc<Mutex<u64>>,
    pub acking: Arc<AtomicBool>,
    pub param_acks: Arc<Mutex<Vec<ParamsAck>>>,
    pub events: Arc<Mutex<Vec<GateEvent>>>,
    pub cmd_acks: Arc<Mutex<Vec<CommandAck>>>,
    pub status: Arc<Mutex<Vec<String>>>,
    /// Heartbeats received (each verified).
    pub heartbeats: Arc<Mutex<Vec<Heartbeat>>>,
    /// Used QR codes the gate reported (verified).
    pub qr_used: Arc<Mutex<Vec<QrUsedBatch>>>,
    /// Gate messages whose signature did not verify (topic: reason): must stay empty.
    pub unverified: Arc<Mutex<Vec<String>>>,
    /// The installation named by the last batch, which the acks name too.
    pub installation: Arc<Mutex<Option<String>>>,
    cancel: CancellationToken,
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn root() -> String {
    format!("afc/v1/{STATION}")
}

impl Controller {
    pub async fn connect(port: u16) -> Controller {
        let mut o = MqttOptions::new(format!("controller-{}", free_port()), "127.0.0.1", port);
        o.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut ev) = AsyncClient::new(o, 1024);
        let c = Controller {
            client: client.clone(),
            ledger: Arc::default(),
            received: Arc::default(),
            forged_batches: Arc::default(),
            acking: Arc::new(AtomicBool::new(true)),
            param_acks: Arc::default(),
            events: Arc::default(),
            cmd_acks: Arc::default(),
            status: Arc::default(),
            heartbeats: Arc::default(),
            qr_used: Arc::default(),
            unverified: Arc::default(),
            installation: Arc::default(),
            cancel: CancellationToken::new(),
        };
        let (ledger, received, forged, acking) =
            (c.ledger.clone(), c.received.clone(), c.forged_batches.clone(), c.acking.clone());
        let (param_acks, events, cmd_acks, status) =
            (c.param_acks.clone(), c.events.clone(), c.cmd_acks.clone(), c.status.clone());
        let (heartbeats, qr_used, unverified, installation) =
            (c.heartbeats.clone(), c.qr_used.clone(), c.unverified.clone(), c.installation.clone());
        let cancel = c.cancel.clone();
        let (connected_tx, mut connected) = tokio::sync::watch::channel(false);
        let verifying: VerifyingKey = gate_key().verifying_key();
        tokio::spawn(async move {
            loop {
                let e = tokio::select! {
                    () = cancel.cancelled() => break,
                    e = ev.poll() => e,
                };
                match e {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for f in afc_domain::topic::filters::controller_subscriptions(
                            &Ident::new(STATION).unwrap(),
                        ) {
                            client.subscribe(f, QoS::AtLeastOnce).await.unwrap();
                        }
                        let _ = connected_tx.send(true);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let Ok(topic) = Topic::parse(&p.topic) else { continue };
                        // Every gate message but the batch (signed inside) and the will (plain
                        // `offline`) must carry the gate's signature for its topic.
                        fn check<T: serde::de::DeserializeOwned>(
                            p: &rumqttc::Publish,
                            key: &VerifyingKey,
                            unverified: &Mutex<Vec<String>>,
                        ) -> Option<T> {
                            match open_gate::<T>(&p.topic, &p.payload, key) {
                                Ok(m) => Some(m),
                                Err(e) => {
                                    unverified.lock().unwrap().push(format!("{}: {}", p.topic, e.code()));
                                    None
                                }
                            }
                        }
                        match topic {
                            Topic::GateTx { gate, station } => {
                                let Ok(batch) = wire::decode::<TxBatch>(&p.payload) else { continue };
                                let sig = batch.signature_bytes().unwrap();
                                let records = batch.canonical_records().unwrap();
                                if verify_canonical_batch(
                                    &station,
                                    &gate,
                                    batch.covers_from,
                                    &records,
                                    &sig,
                                    &verifying,
                                )
                                .is_err()
                                {
                                    *forged.lock().unwrap() += 1;
                                    continue;
                                }
                                *received.lock().unwrap() += records.len() as u64;
                                let through = {
                                    let mut l = ledger.lock().unwrap();
                                    for r in records {
                                        l.entry(r.gate_seq).or_insert(r.into_record());
                                    }
                                    let mut through = 0;
                                    while l.contains_key(&(through + 1)) {
                                        through += 1;
                                    }
                                    through
                                };
                                *installation.lock().unwrap() = batch.installation.clone();
                                if acking.load(Ordering::SeqCst) {
                                    let t = Topic::GateTxAck { station, gate }.to_string();
                                    let ack =
                                        TxAck { through_seq: through, installation: batch.installation };
                                    let _ = client
                                        .publish(t.clone(), QoS::AtLeastOnce, false, signed(&t, &ack))
                                        .await;
                                }
                            }
                            Topic::GateParamsAck { .. } => {
                                if let Some(a) = check::<ParamsAck>(&p, &verifying, &unverified) {
                                    param_acks.lock().unwrap().push(a);
                                }
                            }
                            Topic::GateEvents { .. } => {
                                if let Some(e) = check::<GateEvent>(&p, &verifying, &unverified) {
                                    events.lock().unwrap().push(e);
                                }
                            }
                            Topic::GateCmdAck { .. } => {
                                if let Some(a) = check::<CommandAck>(&p, &verifying, &unverified) {
                                    cmd_acks.lock().unwrap().push(a);
                                }
                            }
                            Topic::GateHeartbeat { .. } => {
                                if let Some(h) = check::<Heartbeat>(&p, &verifying, &unverified) {
                                    heartbeats.lock().unwrap().push(h);
                                }
                            }
                            Topic::GateQrUsed { .. } => {
                                if let Some(b) = check::<QrUsedBatch>(&p, &verifying, &unverified) {
                                    qr_used.lock().unwrap().push(b);
                                }
                            }
                            Topic::GateStatus { .. } if p.payload.is_empty() => {}
                            Topic::GateStatus { .. } => {
                                // The will is plain and only ever says offline; the birth is signed.
                                let plain_offline = matches!(
                                    wire::decode::<GateStatus>(&p.payload),
                                    Ok(GateStatus::Offline { .. })
                                );
                                if plain_offline || check::<GateStatus>(&p, &verifying, &unverified).is_some()
                                {
                                    status
                                        .lock()
                                        .unwrap()
                                        .push(String::from_utf8_lossy(&p.payload).into_owned());
                                }
                            }
                            _ => {}
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(DEADLINE, connected.wait_for(|c| *c)).await.unwrap().unwrap();
        c
    }

    pub async fn publish(&self, topic: String, retain: bool, payload: Vec<u8>) {
        self.client.publish(topic, QoS::AtLeastOnce, retain, payload).await.unwrap();
    }

    /// Publishes `msg` signed by the station for `topic`.
    pub async fn publish_signed<T: WireMessage>(&self, topic: String, retain: bool, msg: &T) {
        let payload = signed(&topic, msg);
        self.publish(topic, retain, payload).await;
    }

    /// Publishes a package's chunks (retained) and then its pointer (retained).
    pub async fn publish_package(
        &self,
        kind: ParamKind,
        bytes: &[u8],
        version: u64,
        effective_from: Timestamp,
    ) {
        let chunks = split(bytes, 64 * 1024);
        for (i, c) in chunks.iter().enumerate() {
            self.publish(format!("{}/params/{kind}/{version}/{i}", root()), true, c.clone()).await;
        }
        let ptr = pointer_for(bytes, version, chunks.len() as u32, effective_from);
        self.publish(format!("{}/params/{kind}/current", root()), true, wire::encode(&ptr)).await;
    }

    pub fn acks_for(&self, kind: ParamKind, version: u64) -> Vec<ParamsAck> {
        self.param_acks
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.kind == kind && a.version == version)
            .cloned()
            .collect()
    }

    pub fn ledger_len(&self) -> usize {
        self.ledger.lock().unwrap().len()
    }
}

/// A PLC simulator on its own port.
pub struct Plc {
    pub sim: PlcSim,
    pub addr: SocketAddr,
    cancel: CancellationToken,
}

impl Drop for Plc {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub async fn plc() -> Plc {
    let sim = PlcSim::new(SimConfig { passage: Duration::from_millis(20), ..SimConfig::default() });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let (s, c) = (sim.clone(), cancel.clone());
    tokio::spawn(async move { s.serve(listener, c).await });
    Plc { sim, addr, cancel }
}

/// Writes a configuration for an agent in `dir`.
pub fn write_config(
    dir: &Path,
    broker_port: u16,
    plc: SocketAddr,
    reader: SocketAddr,
    extra: &str,
) -> PathBuf {
    let key_file = dir.join("gate.key");
    std::fs::write(&key_file, hex::encode(gate_key().to_bytes())).unwrap();
    let text = format!(
        r#"
station = "{STATION}"
gate = "{GATE}"
station_code = {here}
data_dir = "{data}"
reader_listen = "{reader}"
signing_key_file = "{key}"
{extra}
[trusted_keys]
{PACKAGE_KEY_ID} = "{pk}"
[mqtt]
brokers = ["127.0.0.1:{broker_port}"]
keep_alive_secs = 5
heartbeat_secs = 1
ack_timeout_ms = 1000
reconnect_backoff_max_ms = 300
package_timeout_ms = 1500
[plc]
address = "{plc}"
call_timeout_ms = 150
poll_interval_ms = 20
"#,
        here = HERE.0,
        data = dir.join("data").display(),
        key = key_file.display(),
        pk = hex::encode(package_key().verifying_key().to_bytes()),
    );
    let path = dir.join("gate-agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// An agent running in this process.
pub struct Agent {
    pub running: Running,
    pub reader: SocketAddr,
    pub metrics_addr: SocketAddr,
    cancel: CancellationToken,
    /// Holds the agent's data directory until the test ends (taken by [`Agent::restart`]).
    dir: Option<tempfile::TempDir>,
    broker_port: u16,
    plc: SocketAddr,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Agent {
    pub async fn start(broker_port: u16, plc: &Plc) -> Agent {
        Agent::start_with(broker_port, plc, "").await
    }

    pub async fn start_with(broker_port: u16, plc: &Plc, extra: &str) -> Agent {
        Agent::start_in(tempfile::tempdir().unwrap(), broker_port, plc.addr, extra).await
    }

    /// Starts an agent whose directory is `dir` (its data in `dir/data`, which the caller may have
    /// made a mount point).
    pub async fn start_in_dir(dir: tempfile::TempDir, broker_port: u16, plc: &Plc, extra: &str) -> Agent {
        Agent::start_in(dir, broker_port, plc.addr, extra).await
    }

    /// Stops this agent and hands back its directory (the agent's tasks let go of its files
    /// shortly after).
    pub fn stop(mut self) -> tempfile::TempDir {
        self.cancel.cancel();
        self.dir.take().unwrap()
    }

    /// Stops this agent as a signal does (cancel, then [`Running::stop`]: its tasks joined within
    /// `within`, the store flushed) and hands back the tasks that did not stop and its directory.
    pub async fn shut_down(mut self, within: Duration) -> (Vec<&'static str>, tempfile::TempDir) {
        self.cancel.cancel();
        let late = self.running.stop(within).await.unwrap();
        (late, self.dir.take().unwrap())
    }

    /// Stops this agent and starts a new one on the same data directory (as after a crash or a
    /// reboot), waiting until the old one has let go of its storage.
    pub async fn restart(mut self) -> Agent {
        self.cancel.cancel();
        let dir = self.dir.take().unwrap();
        let (port, plc) = (self.broker_port, self.plc);
        drop(self);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let dir = Arc::new(Mutex::new(Some(dir)));
        loop {
            let d = dir.lock().unwrap().take().unwrap();
            match Agent::try_start_in(d, port, plc, "").await {
                Ok(a) => return a,
                Err(d) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the old agent never released its storage"
                    );
                    *dir.lock().unwrap() = Some(d);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Starts an agent whose PLC is at `plc` (which may have nothing listening), without waiting
    /// for the PLC to answer.
    pub async fn start_unchecked(broker_port: u16, plc: SocketAddr, extra: &str) -> Agent {
        match Agent::try_start(tempfile::tempdir().unwrap(), broker_port, plc, extra, false).await {
            Ok(a) => a,
            Err(_) => panic!("the agent did not start"),
        }
    }

    async fn start_in(dir: tempfile::TempDir, broker_port: u16, plc: SocketAddr, extra: &str) -> Agent {
        match Agent::try_start_in(dir, broker_port, plc, extra).await {
            Ok(a) => a,
            Err(_) => panic!("the agent did not start"),
        }
    }

    async fn try_start_in(
        dir: tempfile::TempDir,
        broker_port: u16,
        plc: SocketAddr,
        extra: &str,
    ) -> Result<Agent, tempfile::TempDir> {
        Agent::try_start(dir, broker_port, plc, extra, true).await
    }

    async fn try_start(
        dir: tempfile::TempDir,
        broker_port: u16,
        plc: SocketAddr,
        extra: &str,
        wait_plc: bool,
    ) -> Result<Agent, tempfile::TempDir> {
        let reader = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (reader_addr, metrics_addr) = (reader.local_addr().unwrap(), metrics.local_addr().unwrap());
        let path = write_config(dir.path(), broker_port, plc, reader_addr, extra);
        let config = Config::load(&path).unwrap();
        let cancel = CancellationToken::new();
        let listeners = Listeners { reader, metrics: Some(metrics) };
        let running = match gate_agent::start(&config, listeners, cancel.clone()).await {
            Ok(r) => r,
            Err(_) => return Err(dir),
        };
        let g = running.gate.clone();
        if wait_plc {
            eventually("the PLC to be online", || g.plc().online().then_some(())).await;
        }
        Ok(Agent { running, reader: reader_addr, metrics_addr, cancel, dir: Some(dir), broker_port, plc })
    }

    /// Gives the agent parameters directly, as if they had been downloaded.
    pub fn seed(&self, kind: ParamKind, version: u64, effective_from: Timestamp, body: Vec<u8>) {
        let bytes = package(kind, version, effective_from, body, &package_key());
        self.running.gate.params.offer(kind, version, &bytes, gate_agent::gate::now()).unwrap();
    }

    /// Fare table v1 and blacklist v1, active now.
    /// Seeds QR keys trusting issuer 1 (key id 1) and returns that issuer's signing key.
    pub fn seed_qr_issuer(&self) -> SigningKey {
        use afc_domain::qr::{QrIssuerKey, QrKeySet};
        let issuer_key = SigningKey::from_bytes(&[5u8; 32]);
        let keys = QrKeySet::new(vec![QrIssuerKey {
            issuer: 1,
            key_id: 1,
            algorithm: afc_domain::qr::QrAlgorithm::Ed25519,
            public_key: issuer_key.verifying_key().to_bytes().to_vec(),
            valid_from: Timestamp(0),
            valid_to: Timestamp::from_secs(4_000_000_000),
        }])
        .unwrap();
        self.seed(ParamKind::QrKeys, 1, Timestamp(0), serde_json::to_vec(&keys).unwrap());
        issuer_key
    }

    pub fn seed_defaults(&self) {
        let past = Timestamp(0);
        self.seed(ParamKind::FareTable, 1, past, fare_body(100));
        self.seed(ParamKind::Blacklist, 1, past, blacklist_body(1));
    }

    pub async fn reader(&self) -> ReaderConn {
        ReaderConn::connect(self.reader).await.unwrap()
    }
}
