//! After a broker restart, 40 gates come back spread over their backoff window, not at one
//! instant (issue 13 item 6: backoff with jitter).
//!
//! The gates are 40 real gate agents (in this process, each with its own store, reader listener and
//! MQTT session) connected to rumqttd through a front we control. The "restart" closes every
//! connection and the listening socket at one instant, refuses connections for 4 s (so every gate
//! backs off to its cap), then listens again: from a gate's side that is what a broker restart is
//! (connections reset, connects refused, then accepted). The front reads each MQTT CONNECT's client
//! id, so each gate's first reconnection is timed. Without jitter every gate follows the same
//! schedule from the same instant and all 40 arrive within a few milliseconds.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gate_agent::config::Config;
use gate_agent::{Listeners, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::harness::*;

const GATES: u16 = 40;
/// The gates' `mqtt.reconnect_backoff_max_ms`: the window the reconnections should spread over.
const CAP_MS: u64 = 2_000;
/// How long the broker stays down: long enough for every gate's step to reach the cap.
const DOWN: Duration = Duration::from_secs(4);

/// The MQTT CONNECTs the front has seen: (client id, when).
type Connects = Arc<Mutex<Vec<(String, Instant)>>>;

/// The client id of the MQTT CONNECT at the start of `buf`, once it holds enough of it.
fn client_id(buf: &[u8]) -> Option<String> {
    // Fixed header: type, remaining length (varint).
    let mut i = 1;
    while *buf.get(i)? & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    // Variable header: protocol name (2-byte length + name), level, flags, keep-alive.
    let name_len = usize::from(u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]));
    // (MQTT 3.1.1, as the gates speak: no properties before the payload.)
    i += 2 + name_len + 1 + 1 + 2;
    let id_len = usize::from(u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]));
    let id = buf.get(i + 2..i + 2 + id_len)?;
    Some(String::from_utf8_lossy(id).into_owned())
}

/// Accepts on `listener` until `stop`, piping each connection to the broker on `upstream`; every
/// pipe ends at `stop` too (the connections reset, as when a broker process dies).
async fn front(listener: TcpListener, upstream: u16, connects: Connects, stop: CancellationToken) {
    loop {
        let (mut client, _) = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        let (connects, stop) = (connects.clone(), stop.clone());
        tokio::spawn(async move {
            let mut first = Vec::new();
            let mut buf = [0u8; 512];
            let id = loop {
                let n = tokio::select! {
                    () = stop.cancelled() => return,
                    n = client.read(&mut buf) => n.unwrap_or(0),
                };
                if n == 0 {
                    return;
                }
                first.extend_from_slice(&buf[..n]);
                if let Some(id) = client_id(&first) {
                    break id;
                }
                if first.len() > 4096 {
                    return;
                }
            };
            connects.lock().unwrap().push((id, Instant::now()));
            let Ok(mut broker) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
            if broker.write_all(&first).await.is_err() {
                return;
            }
            tokio::select! {
                () = stop.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut client, &mut broker) => {}
            }
        });
    }
}

/// A gate agent named `gate` on the broker at `port` with a `CAP_MS` reconnect cap.
async fn gate(n: u16, port: u16, plc: &Plc) -> (Running, CancellationToken, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let reader = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let path = write_config(dir.path(), port, plc.addr, reader.local_addr().unwrap(), "");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text
        .replace(&format!("gate = \"{GATE}\""), &format!("gate = \"g{n:02}\""))
        .replace("reconnect_backoff_max_ms = 300", &format!("reconnect_backoff_max_ms = {CAP_MS}"));
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let cancel = CancellationToken::new();
    let running =
        gate_agent::start(&config, Listeners { reader, metrics: None }, cancel.clone()).await.unwrap();
    (running, cancel, dir)
}

/// Each client's first CONNECT at or after `since`, as milliseconds after `since`.
fn first_after(connects: &Connects, since: Instant) -> BTreeMap<String, u64> {
    let mut first = BTreeMap::new();
    for (id, at) in connects.lock().unwrap().iter().filter(|(_, at)| *at >= since) {
        first.entry(id.clone()).or_insert_with(|| at.duration_since(since).as_millis() as u64);
    }
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_gates_reconnect_after_a_broker_restart_spread_over_the_backoff_window() {
    let broker = free_port();
    start_broker(broker).await;
    let port = free_port();
    let connects: Connects = Arc::default();
    let stop = CancellationToken::new();
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(front(listener, broker, connects.clone(), stop.clone()));
    let plc = plc().await;
    let t0 = Instant::now();
    let mut gates = Vec::new();
    for n in 1..=GATES {
        gates.push(gate(n, port, &plc).await);
    }
    eventually("every gate connected", || {
        (first_after(&connects, t0).len() == usize::from(GATES)).then_some(())
    })
    .await;
    // Let the sessions settle (subscriptions, birth), then the broker "dies".
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    tokio::time::sleep(DOWN).await;
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let up = Instant::now();
    let stop = CancellationToken::new();
    tokio::spawn(front(listener, broker, connects.clone(), stop.clone()));
    eventually("every gate reconnected", || {
        (first_after(&connects, up).len() == usize::from(GATES)).then_some(())
    })
    .await;
    let back = first_after(&connects, up);
    let mut at: Vec<u64> = back.values().copied().collect();
    at.sort_unstable();
    let spread = at[at.len() - 1] - at[0];
    let mut per_100ms = BTreeMap::<u64, usize>::new();
    for t in &at {
        *per_100ms.entry(t / 100).or_default() += 1;
    }
    let busiest = per_100ms.values().copied().max().unwrap_or(0);
    println!(
        "{GATES} gates back {}–{} ms after the broker (spread {spread} ms, cap {CAP_MS} ms); per 100 ms: {per_100ms:?}",
        at[0],
        at[at.len() - 1]
    );
    // Every gate is back within one capped wait (with room for a loaded test machine).
    assert!(at[at.len() - 1] <= CAP_MS + 3_000, "a gate took {} ms: {back:?}", at[at.len() - 1]);
    // Spread over the window: without jitter all 40 arrive in one 100 ms slot within ~15 ms. The
    // bounds leave room for a starved test runtime stamping a few connections late together.
    assert!(spread >= CAP_MS / 4, "reconnections spread over only {spread} ms: {per_100ms:?}");
    assert!(busiest <= usize::from(GATES) / 2, "{busiest} gates in one 100 ms slot: {per_100ms:?}");
    stop.cancel();
    for (running, cancel, _dir) in gates {
        cancel.cancel();
        let _ = running.stop(Duration::from_secs(5)).await;
    }
}
