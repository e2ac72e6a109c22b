//! The station end to end, with real processes on loopback: `station up` (3 controllers, a
//! broker, 8 gate agents with PLC simulators, the reference clearing server) driven from outside
//! like passengers, operators and central clearing would.
//!
//! The same scenario runs on the station's own broker (rumqttd) and on Mosquitto. Without a
//! `mosquitto` executable the Mosquitto run says plainly that it skipped — except under CI
//! (`CI` set), where it fails: `.ci/run` installs Mosquitto.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod scenario;

use std::path::PathBuf;
use std::time::Duration;

use system_tests::Station;

/// The two runs share the machine's two cores: one station at a time.
static ONE_STATION_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run(port_offset: u16, external_broker: Option<String>) {
    let mut st = Station::start(8, port_offset, external_broker).await.expect("station starts");
    if let Err(e) = scenario::run(&st).await {
        panic!("{e:#}\n\n{}", st.log_tails(40));
    }
    // Ctrl-C (SIGTERM) stops every service cleanly, in order.
    let status = st.stop(Duration::from_secs(90)).expect("station stops");
    assert!(status.success(), "station exited with {status}\n{}", st.log_tails(40));
    assert!(!st.layout.pids_file().exists(), "the pid file outlived the station");
    let log = st.log();
    assert!(log.contains("station stopped"), "no clean stop in the log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn station_end_to_end_on_its_own_broker() {
    let _one = ONE_STATION_AT_A_TIME.lock().await;
    run(10_000, None).await;
}

fn find_mosquitto() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"]
        .iter()
        .map(PathBuf::from)
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

fn start_mosquitto(exe: &std::path::Path, port: u16) -> Mosquitto {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("mosquitto.conf");
    // The limits of deploy/mosquitto/mosquitto.conf; anonymous on loopback for the test.
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_packet_size 1114112\n\
             max_queued_messages 10000\nmax_inflight_messages 100\npersistence false\n\
             log_dest stdout\nlog_type error\nlog_type warning\n"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn station_end_to_end_on_mosquitto() {
    let Some(exe) = find_mosquitto() else {
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
    let _broker = start_mosquitto(&exe, port);
    run(11_000, Some(format!("127.0.0.1:{port}"))).await;
}
