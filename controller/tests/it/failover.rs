//! Failover leaves the broker telling the truth (issue 11 item 9): three real controllers on a
//! broker that outlives them (the embedded rumqttd, in the test process); leaders are killed and
//! restarted at once (a former leader restarts as leader of its old term), frozen with SIGSTOP
//! past their keep-alive (their will fires after the next leader published) and thawed, and
//! followers are killed. After each round a fresh subscriber must find the retained `state` naming
//! the current leader and term within 3 s, still so a second later, and no `state` naming an
//! older term than one already announced may ever be published (a non-leader publishing).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use afc_domain::topic::Topic;
use afc_domain::wire::StationState;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::common::*;
use crate::harness::*;
use crate::mqtt::start_broker;

fn state_topic() -> String {
    Topic::State { station: ident("s1") }.to_string()
}

fn spawn_node(c: &mut Cluster, id: u64, port: u16) {
    let addr = c.initial[&id].clone();
    let extra = format!(
        "[mqtt]\nbroker = \"external\"\naddress = \"127.0.0.1:{port}\"\nclient_id_prefix = \"ctl\"\n\
         station_code = 1\nbackoff_max_ms = 300\nkeep_alive_secs = 2\n\n[api]\n{}",
        station_key_config(&c.node_dir(id)),
    );
    let raft = "heartbeat_ms = 100\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\nconnect_timeout_ms = 200\n";
    c.spawn_with(
        id,
        addr,
        id == 1,
        &NodeSetup { raft, extra: &extra, rust_log: "info,openraft=warn,rumqttc=warn" },
    );
}

/// What a client connecting now finds retained on `state` (None: nothing within the wait).
async fn retained_state(port: u16, probe: u32) -> Option<StationState> {
    let mut o = MqttOptions::new(format!("probe-{probe}"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut ev) = AsyncClient::new(o, 10);
    client.subscribe(state_topic(), QoS::AtLeastOnce).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut subacked: Option<Instant> = None;
    let found = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || subacked.is_some_and(|t| t.elapsed() > Duration::from_millis(500)) {
            break None;
        }
        match tokio::time::timeout(left.min(Duration::from_millis(100)), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == state_topic() => {
                break open_from_station::<StationState>(&p.topic, &p.payload).ok();
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subacked = Some(Instant::now()),
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(100), ev.poll()).await;
    found
}

/// Every `state` message published, in order, by a subscriber that stays connected.
fn watch_state(port: u16) -> (Arc<Mutex<Vec<StationState>>>, tokio::task::JoinHandle<()>) {
    let seen: Arc<Mutex<Vec<StationState>>> = Arc::default();
    let out = seen.clone();
    let task = tokio::spawn(async move {
        let mut o = MqttOptions::new("state-watcher", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut ev) = AsyncClient::new(o, 10);
        client.subscribe(state_topic(), QoS::AtLeastOnce).await.unwrap();
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == state_topic() => {
                    if let Ok(s) = open_from_station::<StationState>(&p.topic, &p.payload) {
                        out.lock().unwrap().push(s);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    (seen, task)
}

fn signal(c: &Cluster, id: u64, sig: &str) {
    let pid = c.nodes[&id].pid().unwrap().to_string();
    assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
}

use std::process::Command;

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits until every running node agrees on a leader; returns it and its term.
async fn leader_and_term(c: &Cluster) -> (u64, u64) {
    let agreed =
        tokio::time::timeout(Duration::from_secs(20), c.wait_leader(Duration::from_secs(30), None)).await;
    let Ok(leader) = agreed else {
        let logs: String = c
            .nodes
            .values()
            .map(|n| {
                format!(
                    "--- node {}:\n{}\n",
                    n.id,
                    tail(
                        &n.log()
                            .lines()
                            .filter(|l| !l.trim_start().starts_with("at ")
                                && !l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
                            .collect::<Vec<_>>()
                            .join("\n"),
                        30
                    )
                )
            })
            .collect();
        panic!("no leader every node agrees on within 20 s:\n{logs}");
    };
    let term = c.metrics(leader).await.unwrap().current_term;
    (leader, term)
}

/// Polls fresh subscribers until the retained `state` names `leader` in `term`; returns how long
/// it took from `since`.
async fn truth_on_broker(port: u16, probe: &mut u32, leader: u64, term: u64, since: Instant) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        *probe += 1;
        let s = retained_state(port, *probe).await;
        if matches!(&s, Some(StationState::Online(l)) if l.leader_node == leader && l.term == term) {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "3 s after the cluster agreed on leader {leader} in term {term}, the retained state is {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kills_restarts_and_freezes_the_retained_state_names_the_current_leader_and_no_non_leader_publishes_it(
) {
    let _serial = CLUSTER_LOCK.lock().await;
    let port = start_broker().await;
    let (seen, watcher) = watch_state(port);
    let mut c = Cluster::unstarted(3, Duration::from_secs(15));
    for id in 1..=3 {
        spawn_node(&mut c, id, port);
    }
    let mut probe = 0u32;
    let (leader, term) = leader_and_term(&c).await;
    truth_on_broker(port, &mut probe, leader, term, Instant::now()).await;

    let mut figures = Vec::new();
    for round in 0..6 {
        let (old, _) = leader_and_term(&c).await;
        let action = match round % 3 {
            0 => "leader killed and restarted at once",
            1 => "leader frozen 4 s (past its keep-alive) and thawed",
            _ => "a follower killed and restarted",
        };
        let started = Instant::now();
        match round % 3 {
            0 => {
                c.nodes.get_mut(&old).unwrap().kill();
                // Restarted once the others have a new leader: it comes back as leader of its
                // old term and learns of the new one only from the next message it gets.
                c.wait_leader(Duration::from_secs(10), Some(old)).await;
                spawn_node(&mut c, old, port);
            }
            1 => {
                signal(&c, old, "-STOP");
                tokio::time::sleep(Duration::from_secs(4)).await;
                signal(&c, old, "-CONT");
            }
            _ => {
                let follower = *c.running().iter().find(|id| **id != old).unwrap();
                c.nodes.get_mut(&follower).unwrap().kill();
                tokio::time::sleep(Duration::from_millis(300)).await;
                spawn_node(&mut c, follower, port);
            }
        }
        let (leader, term) = leader_and_term(&c).await;
        let agreed = Instant::now();
        let took = truth_on_broker(port, &mut probe, leader, term, agreed).await;
        // ... and it stays true: no late will or stale leader overwrites it.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (now_leader, now_term) = leader_and_term(&c).await;
        probe += 1;
        let later = retained_state(port, probe).await;
        assert!(
            matches!(&later, Some(StationState::Online(l)) if l.leader_node == now_leader && l.term == now_term),
            "round {round} ({action}): a second later the retained state is {later:?}, leader {now_leader} term {now_term}"
        );
        eprintln!(
            "round {round}: {action}: leader {old} -> {leader} (term {term}); cluster agreed after {:?}, \
             retained state true {took:?} later",
            agreed - started
        );
        figures.push(took);
    }

    // No `state` naming an older term than one already announced was ever published.
    watcher.abort();
    let seen = seen.lock().unwrap().clone();
    let mut highest = 0u64;
    for s in &seen {
        if let StationState::Online(l) = s {
            assert!(
                l.term >= highest,
                "node {} published state for term {} after term {highest} was announced: {seen:?}",
                l.leader_node,
                l.term
            );
            highest = l.term;
        }
    }
    let worst = figures.iter().max().unwrap();
    eprintln!(
        "{} state messages seen; worst time to the truth after the cluster agreed: {worst:?}",
        seen.len()
    );
}
