//! The station end to end, with real processes on loopback: `station up` (3 controllers, a
//! broker, 8 gate agents with PLC simulators, the reference clearing server) driven from outside
//! like passengers, operators and central clearing would.
//!
//! The same scenario runs on the station's own broker (rumqttd) and on Mosquitto. Without a
//! `mosquitto` executable the Mosquitto run says plainly that it skipped — except under CI
//! (`CI` set), where it fails: `.ci/run` installs Mosquitto.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bank;
mod clock;
mod day_close;
mod forged;
mod network;
mod replaced;
mod scenario;

use std::path::{Path, PathBuf};
use std::time::Duration;

use station::plan::Plan;
use system_tests::Station;

/// The two runs share the machine's two cores: one station at a time.
static ONE_STATION_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run(st: Station) -> Station {
    if let Err(e) = scenario::run(&st).await {
        panic!("{e:#}\n\n{}", st.log_tails(40));
    }
    st
}

/// Ctrl-C (SIGTERM) stops every service cleanly, in order.
fn stop(mut st: Station) {
    let status = st.stop(Duration::from_secs(90)).expect("station stops");
    assert!(status.success(), "station exited with {status}\n{}", st.log_tails(40));
    assert!(!st.layout.pids_file().exists(), "the pid file outlived the station");
    let log = st.log();
    assert!(log.contains("station stopped"), "no clean stop in the log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn station_end_to_end_on_its_own_broker() {
    let _one = ONE_STATION_AT_A_TIME.lock().await;
    let st = Station::start(8, 10_000, None).await.expect("station starts");
    stop(run(st).await);
}

/// `name` in the directories Debian's mosquitto package installs to.
fn find_tool(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// A Mosquitto broker on loopback for the test, stopped on drop.
struct Mosquitto {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mosquitto as deploy/mosquitto/ configures it: passwords for `controller` and every gate, the
/// ACL file from the repository, the same packet limit.
fn start_mosquitto(exe: &Path, port: u16, users: &[(String, PathBuf, String)]) -> Mosquitto {
    let dir = tempfile::tempdir().expect("tempdir");
    let passwd = dir.path().join("afc.passwd");
    for (i, (user, _, password)) in users.iter().enumerate() {
        let mut cmd = std::process::Command::new(find_tool("mosquitto_passwd").expect("mosquitto_passwd"));
        if i == 0 {
            cmd.arg("-c");
        }
        let out = cmd.arg("-b").arg(&passwd).arg(user).arg(password).output().expect("mosquitto_passwd");
        assert!(out.status.success(), "mosquitto_passwd: {out:?}");
    }
    let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto/acl.conf");
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nper_listener_settings false\nallow_anonymous false\npassword_file {}\nacl_file {}\n\
             listener {port} 127.0.0.1\nmax_packet_size 1114112\nmax_queued_messages 10000\n\
             max_inflight_messages 100\npersistence false\nlog_dest stdout\nlog_type error\nlog_type warning\n",
            passwd.display(),
            acl.display()
        ),
    )
    .expect("write mosquitto.conf");
    let log = std::fs::File::create(dir.path().join("mosquitto.log")).expect("log");
    let child = std::process::Command::new(exe)
        .arg("-c")
        .arg(&conf)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start mosquitto");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "mosquitto did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Mosquitto { child, _dir: dir }
}

/// An MQTT client logged in as `user`; its received publishes arrive on the channel.
fn mqtt_client(
    port: u16,
    user: &(String, PathBuf, String),
) -> (rumqttc::AsyncClient, tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>) {
    let mut opts = rumqttc::MqttOptions::new(format!("acl-test-{}", user.0), "127.0.0.1", port);
    opts.set_credentials(user.0.clone(), user.2.clone());
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 16);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = events.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev {
                let _ = tx.send(p);
            }
        }
    });
    (client, rx)
}

/// With deploy/mosquitto/acl.conf a gate publishes under its own `gates/{gate}/` only: g02's
/// event under g01's topic never reaches anyone, its own does.
async fn a_gate_cannot_speak_for_another(port: u16, st: &Station) {
    let user = |name: &str| st.secrets.mqtt_users.iter().find(|(u, _, _)| u == name).cloned().expect("user");
    let (watcher, mut seen) = mqtt_client(port, &user("controller"));
    let root = format!("afc/v1/{}/gates", st.plan.station);
    watcher.subscribe(format!("{root}/+/events"), rumqttc::QoS::AtLeastOnce).await.expect("subscribe");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (g02, _) = mqtt_client(port, &user("g02"));
    let event = |detail: &str| {
        afc_domain::wire::encode(&afc_domain::wire::GateEvent {
            at: gate_agent::gate::now(),
            kind: afc_domain::wire::AlarmKind::DoorFault,
            cleared: true,
            detail: Some(detail.to_owned()),
        })
    };
    g02.publish(format!("{root}/g01/events"), rumqttc::QoS::AtLeastOnce, false, event("forged by g02"))
        .await
        .expect("publish");
    g02.publish(format!("{root}/g02/events"), rumqttc::QoS::AtLeastOnce, false, event("g02's own"))
        .await
        .expect("publish");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(p)) = tokio::time::timeout_at(deadline, seen.recv()).await {
        got.push(p.topic);
    }
    assert!(got.contains(&format!("{root}/g02/events")), "g02's own event did not arrive: {got:?}");
    assert!(!got.contains(&format!("{root}/g01/events")), "g02 published under g01's topic: {got:?}");
    eprintln!("[e2e] Mosquitto ACL: g02's event under g01's topic dropped, its own delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn station_end_to_end_on_mosquitto() {
    let Some(exe) = find_tool("mosquitto") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "mosquitto is not installed, and under CI this run must not be skipped (.ci/run installs it)"
        );
        eprintln!(
            "SKIPPED station_end_to_end_on_mosquitto: no mosquitto executable (apt-get install mosquitto)"
        );
        return;
    };
    let _one = ONE_STATION_AT_A_TIME.lock().await;
    let port = 12_883;
    let plan = Plan {
        gates: 8,
        port_offset: 11_000,
        external_broker: Some(format!("127.0.0.1:{port}")),
        mqtt_auth: true,
        ..Plan::default()
    };
    let prepared = Station::prepare(&plan).expect("prepare");
    let _broker = start_mosquitto(&exe, port, &prepared.1.mqtt_users);
    let st = Station::start_planned(prepared, plan).await.expect("station starts");
    let st = run(st).await;
    a_gate_cannot_speak_for_another(port, &st).await;
    stop(st);
}
