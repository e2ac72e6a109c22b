//! Strangers on the station LAN send the Raft/admin listener of a running node 250 MB bodies
//! without the cluster secret, on several connections at once: each is refused with 401 before its
//! body is read, the node's memory does not grow, and the cluster goes on replicating.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;
use crate::harness::*;

/// What a stranger announces and tries to send, per connection.
const BODY: usize = 250 * 1000 * 1000;
const CONNECTIONS: usize = 4;

/// Resident memory of process `pid` in KiB (`VmRSS` in /proc).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One stranger: announces `BODY` bytes to `path`, then streams them until the node answers or
/// closes. Returns the status line and how many body bytes the node let it send.
async fn stranger(addr: String, path: &'static str) -> (String, usize) {
    let s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {BODY}\r\n\r\n"
    );
    w.write_all(head.as_bytes()).await.unwrap();
    let sender = tokio::spawn(async move {
        let chunk = vec![0x5au8; 64 * 1024];
        let mut sent = 0;
        while sent < BODY {
            match tokio::time::timeout(Duration::from_secs(2), w.write_all(&chunk)).await {
                Ok(Ok(())) => sent += chunk.len(),
                _ => break, // closed by the node, or it stopped reading
            }
        }
        sent
    });
    let mut answer = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), r.read(&mut answer))
        .await
        .expect("the node answers a stranger at once")
        .unwrap_or(0);
    let status = String::from_utf8_lossy(&answer[..n]).lines().next().unwrap_or_default().to_owned();
    drop(r);
    let sent = sender.await.unwrap();
    (status, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_250_mb_bodies_are_refused_before_they_are_read_and_memory_does_not_grow() {
    let _serial = CLUSTER_LOCK.lock().await;
    let c = Cluster::start(3, Tuning::default()).await;
    let key = gate_key(1);
    c.write(1, &register("g01", &key)).await.unwrap();
    let leader = c.wait_leader(Duration::from_secs(5), None).await;
    let pid = c.nodes[&leader].pid().unwrap();
    let before = rss_kib(pid);

    let paths = ["/raft/append", "/raft/snapshot", "/admin/write", "/raft/vote"];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        tasks.spawn(stranger(c.addr(leader).to_owned(), paths[i % paths.len()]));
    }
    let mut peak = before;
    let mut results = Vec::new();
    loop {
        tokio::select! {
            done = tasks.join_next() => match done {
                Some(r) => results.push(r.unwrap()),
                None => break,
            },
            () = tokio::time::sleep(Duration::from_millis(20)) => peak = peak.max(rss_kib(pid)),
        }
    }
    let sent: usize = results.iter().map(|(_, s)| s).sum();
    for (status, _) in &results {
        assert!(status.starts_with("HTTP/1.1 401"), "a stranger got {status:?}");
    }
    eprintln!(
        "[peer_flood] {CONNECTIONS} strangers announced {} MB each: all 401; {} MB of body sent in all; leader RSS {} → peak {} KiB",
        BODY / 1_000_000,
        sent / 1_000_000,
        before,
        peak
    );
    assert!(peak < before + 32 * 1024, "the leader's memory grew from {before} to {peak} KiB");

    // The cluster goes on.
    let r = c.write(leader, &batch("g01", &key, 1..=10)).await.unwrap();
    assert!(matches!(r, controller::state::Response::Appended { appended: 10, .. }), "{r:?}");
}
