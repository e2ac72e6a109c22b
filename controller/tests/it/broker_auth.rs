//! The embedded broker (rumqttd) lets in only the users of its users file: a client without
//! credentials or with a wrong password gets no ConnAck, and nothing it publishes or subscribes
//! to reaches anyone; a node refuses to run an embedded broker without users unless told to run
//! an open one; a real controller process logs in to its own broker with its user.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use controller::config::Config;
use controller::leader::broker::{self, BrokerUsers, Clients};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;

use crate::common::poll;
use crate::harness::{free_port, Cluster, NodeSetup};

const USERS: &str =
    "# the test station\ncontroller:controller-pw-0001\ng01:g01-pw-0001\nwatcher:watcher-pw-0001\n";

/// Starts the embedded broker with [`USERS`] on a free port; ready when it returns.
async fn start_broker_with_users() -> SocketAddr {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    broker::start(addr, 4 * 1024 * 1024, &Clients::Users(BrokerUsers::parse(USERS).unwrap())).unwrap();
    poll("the broker to accept connections", Duration::from_secs(10), || TcpStream::connect(addr).ok()).await;
    addr
}

/// What one rumqttc client saw: its ConnAck codes, the publishes it received, and whether its
/// connection failed.
struct Client {
    client: AsyncClient,
    connacks: mpsc::UnboundedReceiver<ConnectReturnCode>,
    publishes: mpsc::UnboundedReceiver<Publish>,
    errors: mpsc::UnboundedReceiver<String>,
    subacks: mpsc::UnboundedReceiver<()>,
}

fn client(addr: SocketAddr, id: &str, login: Option<(&str, &str)>) -> Client {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    if let Some((u, p)) = login {
        opts.set_credentials(u, p);
    }
    let (client, mut events) = AsyncClient::new(opts, 16);
    let (ack_tx, connacks) = mpsc::unbounded_channel();
    let (pub_tx, publishes) = mpsc::unbounded_channel();
    let (err_tx, errors) = mpsc::unbounded_channel();
    let (sub_tx, subacks) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    let _ = ack_tx.send(a.code);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = pub_tx.send(p);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = sub_tx.send(());
                }
                Ok(_) => {}
                Err(e) => {
                    if err_tx.send(e.to_string()).is_err() {
                        return;
                    }
                    // rumqttc reconnects on the next poll; keep trying like a real intruder would.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Client { client, connacks, publishes, errors, subacks }
}

impl Client {
    /// Waits for a successful ConnAck.
    async fn connected(&mut self) {
        let code = tokio::time::timeout(Duration::from_secs(10), self.connacks.recv()).await;
        assert!(matches!(code, Ok(Some(ConnectReturnCode::Success))), "no ConnAck success: {code:?}");
    }

    /// Subscribes to `filter` and waits for the SubAck.
    async fn subscribe(&mut self, filter: &str) {
        self.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(10), self.subacks.recv()).await;
        assert!(matches!(ack, Ok(Some(()))), "no SubAck for {filter}");
    }

    /// Waits until the connection failed at least twice, asserting no ConnAck success came.
    async fn refused(&mut self) {
        for _ in 0..2 {
            let e = tokio::time::timeout(Duration::from_secs(10), self.errors.recv()).await;
            assert!(matches!(e, Ok(Some(_))), "the broker kept the connection open");
        }
        while let Ok(code) = self.connacks.try_recv() {
            assert_ne!(code, ConnectReturnCode::Success, "the broker accepted the client");
        }
    }

    async fn wait_publish(&mut self, topic: &str, payload: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.publishes.recv()).await {
                Ok(Some(p)) if p.topic == topic && p.payload.as_ref() == payload => return,
                Ok(Some(_)) => {}
                _ => panic!("{topic} {:?} did not arrive", String::from_utf8_lossy(payload)),
            }
        }
    }
}

/// An MQTT 3.1.1 string (length-prefixed).
fn mqtt_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A packet: type byte, remaining length (varint), body.
fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// CONNECT (clean session, keep-alive 30 s) with an optional login, immediately followed (one
/// write, before any ConnAck) by a SUBSCRIBE to `topic` and a QoS 0 PUBLISH of `payload` on it:
/// what an intruder that does not wait for the broker's answer sends. Returns every byte the
/// broker sent back until it closed the connection.
fn raw_intruder(addr: SocketAddr, login: Option<(&str, &str)>, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut connect = Vec::new();
    mqtt_str(&mut connect, b"MQTT");
    connect.push(4);
    connect.push(0x02 | if login.is_some() { 0xC0 } else { 0 });
    connect.extend_from_slice(&30u16.to_be_bytes());
    mqtt_str(&mut connect, b"raw-intruder");
    if let Some((u, p)) = login {
        mqtt_str(&mut connect, u.as_bytes());
        mqtt_str(&mut connect, p.as_bytes());
    }
    let mut subscribe = 7u16.to_be_bytes().to_vec();
    mqtt_str(&mut subscribe, topic.as_bytes());
    subscribe.push(0);
    let mut publish = Vec::new();
    mqtt_str(&mut publish, topic.as_bytes());
    publish.extend_from_slice(payload);
    let mut all = packet(0x10, &connect);
    all.extend(packet(0x82, &subscribe));
    all.extend(packet(0x30, &publish));
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&all).unwrap();
    let mut got = Vec::new();
    // Until EOF (the broker dropped us) or a reset; a timeout means it kept us: fail.
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the broker kept an unauthenticated connection open ({e}); it sent {got:?}"),
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_or_with_wrong_credentials_are_refused_and_reach_nobody() {
    let addr = start_broker_with_users().await;
    let topic = "afc/v1/s1/gates/g01/cmd";

    // A legitimate client, subscribed to the topic intruders aim at.
    let mut watcher = client(addr, "watcher", Some(("watcher", "watcher-pw-0001")));
    watcher.connected().await;
    watcher.subscribe(topic).await;
    let mut g01 = client(addr, "g01", Some(("g01", "g01-pw-0001")));
    g01.connected().await;
    g01.client.publish(topic, QoS::AtLeastOnce, false, b"subscribed".to_vec()).await.unwrap();
    watcher.wait_publish(topic, b"subscribed").await;

    // rumqttc clients: none, a wrong password, a known password under another user, an unknown user.
    for (id, login) in [
        ("anonymous", None),
        ("wrong-password", Some(("g01", "g01-pw-0002"))),
        ("other-users-password", Some(("g01", "watcher-pw-0001"))),
        ("unknown-user", Some(("g99", "g01-pw-0001"))),
    ] {
        let mut c = client(addr, id, login);
        c.client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
        c.client
            .publish(topic, QoS::AtLeastOnce, false, format!("forged by {id}").into_bytes())
            .await
            .unwrap();
        c.refused().await;
        assert!(c.publishes.try_recv().is_err(), "{id} received a publish");
    }

    // Raw intruders that pipeline SUBSCRIBE and PUBLISH behind their CONNECT.
    for (id, login) in [("raw-anonymous", None), ("raw-wrong-password", Some(("g01", "nope")))] {
        let answer = raw_intruder(addr, login, topic, format!("forged by {id}").as_bytes());
        // A ConnAck is 0x20 0x02 flags code; anything but "refused, connection closed" fails.
        assert!(
            answer.is_empty() || (answer.len() == 4 && answer[0] == 0x20 && answer[3] != 0),
            "{id}: the broker answered {answer:?}"
        );
    }

    // The right credentials work, and nothing the intruders sent reached the watcher: g01's
    // marker, published after every intruder gave up, is the next thing it sees.
    g01.client.publish(topic, QoS::AtLeastOnce, false, b"marker".to_vec()).await.unwrap();
    let first =
        tokio::time::timeout(Duration::from_secs(10), watcher.publishes.recv()).await.unwrap().unwrap();
    assert_eq!(
        first.payload.as_ref(),
        b"marker",
        "the watcher got {:?}",
        String::from_utf8_lossy(&first.payload)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Ok(p) = watcher.publishes.try_recv() {
        panic!("an intruder's publish reached the watcher: {:?}", String::from_utf8_lossy(&p.payload));
    }
}

/// Writes `text` as a node config (with a cluster secret file) in `dir` and loads it.
fn load(dir: &Path, name: &str, mqtt: &str) -> Result<Config, String> {
    std::fs::write(dir.join("secret"), "0123456789abcdef-secret\n").unwrap();
    std::fs::write(dir.join("signing.key"), hex::encode([7u8; 32])).unwrap();
    let text = format!(
        "node_id = 1\nstation = \"s1\"\ndata_dir = \"{data}\"\nlisten = \"127.0.0.1:7101\"\n\
         cluster_secret_file = \"{secret}\"\n[api]\nsigning_key_file = \"{key}\"\n[mqtt]\n{mqtt}",
        data = dir.join("data").display(),
        secret = dir.join("secret").display(),
        key = dir.join("signing.key").display(),
    );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    Config::load(&path).map_err(|e| e.to_string())
}

#[test]
fn an_embedded_broker_without_users_is_refused_unless_anonymous_clients_are_allowed_explicitly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("users"), USERS).unwrap();
    std::fs::write(d.join("empty-users"), "# nobody\n").unwrap();
    std::fs::write(d.join("pw"), "controller-pw-0001\n").unwrap();
    std::fs::write(d.join("bad-pw"), "controller-pw-0002\n").unwrap();
    let users = format!("embedded_users_file = \"{}\"\n", d.join("users").display());
    let login = format!("username = \"controller\"\npassword_file = \"{}\"\n", d.join("pw").display());

    // Refused: what would run an open broker by mistake, or a node that cannot log in to its own.
    for (name, mqtt, says) in [
        ("none.toml", "broker = \"embedded\"\n".to_owned(), "embedded_users_file"),
        (
            "empty.toml",
            format!(
                "broker = \"embedded\"\nembedded_users_file = \"{}\"\n{login}",
                d.join("empty-users").display()
            ),
            "embedded_users_file",
        ),
        (
            "missing.toml",
            format!("broker = \"embedded\"\nembedded_users_file = \"{}\"\n{login}", d.join("nope").display()),
            "embedded_users_file",
        ),
        ("nologin.toml", format!("broker = \"embedded\"\n{users}"), "username"),
        (
            "badpw.toml",
            format!(
                "broker = \"embedded\"\n{users}username = \"controller\"\npassword_file = \"{}\"\n",
                d.join("bad-pw").display()
            ),
            "password",
        ),
        (
            "stranger.toml",
            format!(
                "broker = \"embedded\"\n{users}username = \"g77\"\npassword_file = \"{}\"\n",
                d.join("pw").display()
            ),
            "not in embedded_users_file",
        ),
        (
            "both.toml",
            format!("broker = \"embedded\"\n{users}{login}embedded_allow_anonymous = true\n"),
            "exclude each other",
        ),
        ("external.toml", format!("broker = \"external\"\n{users}{login}"), "embedded"),
    ] {
        let err = load(d, name, &mqtt).expect_err(name);
        assert!(err.contains(says), "{name}: {err}");
        assert!(!err.contains("pw-000"), "{name}: the error shows a password: {err}");
    }

    // Accepted: users with the node's own login among them, or an explicitly open broker.
    let cfg = load(d, "ok.toml", &format!("broker = \"embedded\"\n{users}{login}")).unwrap();
    let m = cfg.mqtt.unwrap();
    assert_eq!(m.embedded_users.names().collect::<Vec<_>>(), ["controller", "g01", "watcher"]);
    assert!(matches!(m.embedded_clients(), Clients::Users(u) if u.len() == 3));
    assert!(!format!("{m:?}").contains("pw-000"), "Debug of the config shows a password");
    let open = load(d, "open.toml", "broker = \"embedded\"\nembedded_allow_anonymous = true\n").unwrap();
    assert!(matches!(open.mqtt.unwrap().embedded_clients(), Clients::Anyone));
}

/// A real controller process running the embedded broker with a users file: it logs in as
/// `controller` and publishes its retained `state`, which a gate with its password receives; an
/// anonymous client is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_process_logs_in_to_its_own_broker_and_strangers_stay_out() {
    let _one = crate::harness::CLUSTER_LOCK.lock().await;
    let mut c = Cluster::unstarted(1, Duration::from_secs(15));
    let dir = c.node_dir(1);
    std::fs::write(dir.join("mqtt-users"), USERS).unwrap();
    std::fs::write(dir.join("mqtt-password"), "controller-pw-0001\n").unwrap();
    std::fs::write(dir.join("signing.key"), hex::encode([7u8; 32])).unwrap();
    let port = free_port();
    let extra = format!(
        "[api]\nsigning_key_file = \"{key}\"\n\n[mqtt]\nbroker = \"embedded\"\nembedded_listen = \"127.0.0.1:{port}\"\naddress = \"127.0.0.1:{port}\"\n\
         embedded_users_file = \"{users}\"\nusername = \"controller\"\npassword_file = \"{pw}\"\n\
         station_code = 1\nbackoff_max_ms = 500\n",
        users = dir.join("mqtt-users").display(),
        pw = dir.join("mqtt-password").display(),
        key = dir.join("signing.key").display(),
    );
    let addr = c.initial[&1].clone();
    let raft = "heartbeat_ms = 100\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\n";
    c.spawn_with(1, addr, true, &NodeSetup { raft, extra: &extra, rust_log: "info,openraft=warn" });
    c.wait_leader(Duration::from_secs(20), None).await;
    let broker: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    poll("the node's broker to listen", Duration::from_secs(10), || TcpStream::connect(broker).ok()).await;

    let mut gate = client(broker, "g01", Some(("g01", "g01-pw-0001")));
    gate.connected().await;
    gate.subscribe("afc/v1/s1/state").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, gate.publishes.recv()).await {
            Ok(Some(p)) if p.topic == "afc/v1/s1/state" => break,
            Ok(Some(_)) => {}
            _ => panic!("no state from the leader: its log:\n{}", c.nodes[&1].log()),
        }
    }
    let mut stranger = client(broker, "stranger", None);
    stranger.client.subscribe("afc/v1/s1/#", QoS::AtLeastOnce).await.unwrap();
    stranger.refused().await;
    assert!(stranger.publishes.try_recv().is_err());
}
