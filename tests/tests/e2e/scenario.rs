//! One station's life: parameters reach every gate; passengers tap at all gates while the Raft
//! leader is killed and clearing hangs; every promised transaction reaches the ledger on all three
//! nodes and the clearing server exactly once; a blacklist delta reaches every gate; a QR code used
//! at one gate is refused at another; forged control messages change nothing (`forged.rs`);
//! emergency release frees every gate within a second.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use afc_domain::model::{Direction, Reason, StationCode};
use afc_domain::qr::{self, QrIssue};
use afc_domain::wire::{DecisionKind, ReaderReply, TapMedia, TapRequest};
use anyhow::Context as _;
use gate_agent::reader_sim::{QrIssuer, ReaderConn, ReaderSim};
use rustix::process::Signal;
use serde_json::{json, Value};
use station::plan::{Plan, NODES};
use system_tests::{eventually, Station};

/// Taps per gate during the failover, and the pause between two taps at one gate.
const TAPS_PER_GATE: usize = 150;
const TAP_GAP: Duration = Duration::from_millis(40);

pub async fn run(st: &Station) -> anyhow::Result<()> {
    let t = Instant::now();
    all_gates_hold_parameters(st).await.context("first parameters")?;
    eprintln!("[e2e] parameters on all gates after {:?}", t.elapsed());
    let promised = traffic_through_failover(st).await.context("traffic")?;
    eprintln!("[e2e] {} transactions promised to passengers", promised.len());
    exactly_once(st, &promised).await.context("exactly once")?;
    blacklist_delta_reaches_every_gate(st).await.context("blacklist delta")?;
    let used = qr_used_at_one_gate_is_refused_at_another(st).await.context("QR replay")?;
    crate::forged::forged_control_messages_change_nothing(st, &used).await.context("forged messages")?;
    emergency_release_frees_every_gate(st).await.context("emergency release")?;
    canary_rollouts(st).await.context("canary rollouts")?;
    Ok(())
}

const KINDS: [&str; 3] = ["fare_table", "blacklist", "qr_keys"];

fn active(gate: &Value, kind: &str) -> Option<u64> {
    gate.pointer(&format!("/reported_versions/{kind}")).and_then(Value::as_u64)
}

/// Every gate is online and runs the version of each kind the controllers publish; an error
/// names the first gate that does not (so a timeout says what was missing).
async fn all_gates_hold(st: &Station, want: &BTreeMap<&str, u64>) -> anyhow::Result<bool> {
    let gates = st.gates().await?;
    anyhow::ensure!(gates.len() == usize::from(st.plan.gates), "{} gates known", gates.len());
    for g in &gates {
        let ok = g.get("online").and_then(Value::as_bool) == Some(true)
            && want.iter().all(|(kind, v)| active(g, kind) == Some(*v));
        anyhow::ensure!(ok, "want {want:?}, a gate shows {g}");
    }
    Ok(true)
}

async fn current_versions(st: &Station) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let list = st.get(1, "/api/v1/parameters", &st.token("viewer")).await?;
    let mut out = BTreeMap::new();
    for kind in KINDS {
        let v = list
            .as_array()
            .and_then(|l| l.iter().find(|k| k.get("kind").and_then(Value::as_str) == Some(kind)))
            .and_then(|k| k.get("current"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        out.insert(kind, v);
    }
    Ok(out)
}

async fn all_gates_hold_parameters(st: &Station) -> anyhow::Result<()> {
    eventually("fare table, blacklist and QR keys active on every gate", Duration::from_secs(180), || async {
        let want = current_versions(st).await?;
        if want.values().any(|v| *v == 0) {
            return Ok(None);
        }
        Ok(all_gates_hold(st, &want).await?.then_some(()))
    })
    .await
}

fn qr_issuer(st: &Station) -> QrIssuer {
    QrIssuer { issuer: 1, key_id: 1, key: st.secrets.qr_issuer_key.clone() }
}

/// Passengers at every gate; meanwhile the leader is killed (SIGKILL; the station restarts it)
/// and clearing hangs for a while (SIGSTOP, then SIGCONT). Returns every `(gate, gate_seq)` a
/// gate promised a passenger.
async fn traffic_through_failover(st: &Station) -> anyhow::Result<BTreeSet<(String, u64)>> {
    let mut tasks = tokio::task::JoinSet::new();
    for (n, gate) in st.plan.gate_numbers() {
        let addr = st.plan.reader(n);
        let code = StationCode(st.plan.station_code);
        let origins = [101, 105, 116, 220, 224].map(StationCode).to_vec();
        let mut sim = ReaderSim::new(u64::from(n), code, origins, 2_000, Some(qr_issuer(st)));
        tasks.spawn(async move {
            let mut conn = ReaderConn::connect(addr).await.with_context(|| format!("reader of {gate}"))?;
            let mut promised = Vec::new();
            let mut refusals = BTreeMap::<String, u64>::new();
            for _ in 0..TAPS_PER_GATE {
                let (presented, tap) = sim.next_tap(gate_agent::gate::now());
                match conn.tap(&tap).await? {
                    ReaderReply::Response(r) => {
                        if let Some(seq) = r.gate_seq {
                            promised.push((gate.clone(), seq));
                        }
                        sim.apply(presented, &r);
                    }
                    ReaderReply::Error(e) => *refusals.entry(e.error.to_string()).or_default() += 1,
                }
                tokio::time::sleep(TAP_GAP).await;
            }
            anyhow::Ok((gate, promised, refusals))
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let leader = st.leader().await?;
    st.signal(&format!("controller-{leader}"), Signal::KILL)?;
    eprintln!("[e2e] killed the leader, controller-{leader}, under traffic");
    tokio::time::sleep(Duration::from_millis(500)).await;
    st.signal("clearing", Signal::STOP)?;
    eprintln!("[e2e] clearing server stopped (SIGSTOP)");
    tokio::time::sleep(Duration::from_secs(4)).await;
    st.signal("clearing", Signal::CONT)?;
    eprintln!("[e2e] clearing server continues (SIGCONT)");
    let mut promised = BTreeSet::new();
    while let Some(done) = tasks.join_next().await {
        let (gate, p, refusals) = done??;
        anyhow::ensure!(refusals.is_empty(), "gate {gate} could not decide some taps: {refusals:?}");
        anyhow::ensure!(p.len() == TAPS_PER_GATE, "gate {gate} recorded {} of {TAPS_PER_GATE} taps", p.len());
        for pair in p {
            anyhow::ensure!(promised.insert(pair.clone()), "gate_seq {pair:?} promised twice");
        }
    }
    let new_leader = st.leader().await?;
    eprintln!("[e2e] leader now controller-{new_leader}");
    Ok(promised)
}

/// Node `id`'s ledger: `(gate, gate_seq)` per entry, and the last hash.
async fn ledger(st: &Station, id: u16) -> anyhow::Result<(Vec<(String, u64)>, String)> {
    let rows = st.ledger(id).await?;
    let hash = rows.last().map(|r| r.hash.clone()).unwrap_or_default();
    Ok((rows.into_iter().map(|r| (r.gate, r.gate_seq)).collect(), hash))
}

async fn exactly_once(st: &Station, promised: &BTreeSet<(String, u64)>) -> anyhow::Result<()> {
    let t = Instant::now();
    // Gates re-send until the ledger acknowledges; wait for every promise on node 1's ledger.
    let (entries, hash) =
        eventually("every promised transaction in the ledger", Duration::from_secs(90), || async {
            let (entries, hash) = ledger(st, 1).await?;
            Ok((entries.len() >= promised.len()).then_some((entries, hash)))
        })
        .await?;
    let unique: BTreeSet<_> = entries.iter().cloned().collect();
    anyhow::ensure!(
        unique.len() == entries.len(),
        "the ledger holds {} duplicates",
        entries.len() - unique.len()
    );
    anyhow::ensure!(
        unique == *promised,
        "ledger and promises differ: {} in the ledger, {} promised",
        unique.len(),
        promised.len()
    );
    eprintln!("[e2e] ledger: {} entries, each promised once, after {:?}", entries.len(), t.elapsed());
    for id in 2..=NODES {
        eventually(&format!("node {id}'s ledger equal to node 1's"), Duration::from_secs(30), || async {
            let (e, h) = ledger(st, id).await?;
            Ok((e.len() == entries.len() && h == hash).then_some(()))
        })
        .await?;
    }
    let expect = entries.len() as u64;
    let stats = eventually("clearing holds the whole ledger", Duration::from_secs(90), || async {
        let s = st.clearing("stats").await?;
        Ok((s.get("records").and_then(Value::as_u64) >= Some(expect)).then_some(s))
    })
    .await?;
    anyhow::ensure!(
        stats.get("records").and_then(Value::as_u64) == Some(expect),
        "clearing stored more records than the ledger has: {stats}"
    );
    anyhow::ensure!(
        stats.get("last_hash").and_then(Value::as_str) == Some(hash.as_str()),
        "clearing's chain ends elsewhere: {stats} vs {hash}"
    );
    eprintln!("[e2e] clearing: {expect} records, same last hash, {stats}");
    Ok(())
}

async fn blacklist_delta_reaches_every_gate(st: &Station) -> anyhow::Result<()> {
    let mut want = current_versions(st).await?;
    let from = want.get("blacklist").copied().unwrap_or(0);
    let add: Vec<Value> = (0..1000u64)
        .map(|i| json!({"media": "svc", "id": gate_agent::reader_sim::CARD_BASE + 7 * i + 2}))
        .collect();
    let body = json!({"delta": {"from_version": from, "add": add}, "reason": "e2e: 1,000 lost cards"});
    let t = Instant::now();
    let (status, answer) = st.post(2, "/api/v1/parameters/blacklist", &st.token("engineer"), &body).await?;
    anyhow::ensure!((200..300).contains(&status), "delta upload: {status} {answer}");
    want.insert("blacklist", from + 1);
    eventually("blacklist delta active on every gate", Duration::from_secs(20), || async {
        Ok(all_gates_hold(st, &want).await?.then_some(()))
    })
    .await?;
    eprintln!("[e2e] 1,000-entry blacklist delta active on every gate {:?} after the upload", t.elapsed());
    // The console's board is the same from any node: followers ask the leader for the live view.
    for id in 1..=NODES {
        let gates = st.get(id, "/api/v1/gates", &st.token("viewer")).await?;
        let gates = gates.as_array().context("gates")?;
        let live =
            gates.iter().filter(|g| g["online"] == true && active(g, "blacklist") == Some(from + 1)).count();
        anyhow::ensure!(live == usize::from(st.plan.gates), "node {id} shows {live} gates live: {gates:?}");
    }
    Ok(())
}

pub async fn tap_qr(st: &Station, n: u16, code: &str) -> anyhow::Result<(DecisionKind, Reason)> {
    let mut conn = ReaderConn::connect(st.plan.reader(n)).await?;
    let tap = TapRequest { direction: Direction::Entry, media: TapMedia::Qr { code: code.to_owned() } };
    match conn.tap(&tap).await? {
        ReaderReply::Response(r) => Ok((r.decision, r.reason)),
        ReaderReply::Error(e) => anyhow::bail!("gate {n} could not decide: {e:?}"),
    }
}

/// Returns the used code.
async fn qr_used_at_one_gate_is_refused_at_another(st: &Station) -> anyhow::Result<String> {
    let issuer = qr_issuer(st);
    let issue = QrIssue {
        issuer: issuer.issuer,
        key_id: issuer.key_id,
        account: 7_000_001,
        issued_at: gate_agent::gate::now().plus_minutes(-1),
        valid_secs: 600,
        nonce: 0x00e2_e000_0001,
    };
    let code = qr::encode_text(&qr::generate(&issue, &issuer.key));
    let first = tap_qr(st, 1, &code).await?;
    anyhow::ensure!(first.0 == DecisionKind::OpenEntry, "first use at g01: {first:?}");
    // Used codes travel gate → leader → every gate in a fraction of a second.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for n in [2, st.plan.gates] {
        let again = tap_qr(st, n, &code).await?;
        anyhow::ensure!(
            again == (DecisionKind::Reject, Reason::QrReplayed),
            "the code used at g01 was not refused at {}: {again:?}",
            Plan::gate_id(n)
        );
    }
    eprintln!("[e2e] QR code used at g01 refused as replayed at g02 and {}", Plan::gate_id(st.plan.gates));
    Ok(code)
}

async fn free_passage_everywhere(st: &Station, on: bool) -> anyhow::Result<bool> {
    for n in 1..=st.plan.gates {
        let state: Value = serde_json::from_str(&st.plc(n, "state").await?)?;
        if state.get("free_passage").and_then(Value::as_bool) != Some(on) {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn emergency_release_frees_every_gate(st: &Station) -> anyhow::Result<()> {
    anyhow::ensure!(
        free_passage_everywhere(st, false).await?,
        "a gate is in free passage before the release"
    );
    let body = json!({"active": true, "confirm": true, "reason": "e2e: smoke in the concourse"});
    let t = Instant::now();
    let (status, answer) = st.post(3, "/api/v1/mode/emergency-release", &st.token("operator"), &body).await?;
    anyhow::ensure!((200..300).contains(&status), "emergency release: {status} {answer}");
    eventually("free passage on every PLC", Duration::from_secs(5), || async {
        Ok(free_passage_everywhere(st, true).await?.then_some(()))
    })
    .await?;
    let took = t.elapsed();
    eprintln!(
        "[e2e] emergency release: free passage on all {} PLCs {took:?} after the request",
        st.plan.gates
    );
    anyhow::ensure!(took <= Duration::from_secs(1), "emergency release took {took:?} (must be within 1 s)");
    let clear = json!({"active": false, "confirm": true, "reason": "e2e: all clear"});
    let (status, answer) =
        st.post(1, "/api/v1/mode/emergency-release", &st.token("operator"), &clear).await?;
    anyhow::ensure!((200..300).contains(&status), "clearing emergency release: {status} {answer}");
    eventually("flaps back to normal on every PLC", Duration::from_secs(5), || async {
        Ok(free_passage_everywhere(st, false).await?.then_some(()))
    })
    .await
}

async fn fare_table_on(st: &Station) -> anyhow::Result<Vec<Option<u64>>> {
    Ok(st.gates().await?.iter().map(|g| active(g, "fare_table")).collect())
}

async fn upload_fare_table(st: &Station, why: &str) -> anyhow::Result<u64> {
    let body = json!({
        "network": serde_json::from_str::<Value>(station::setup::DALIAN_NETWORK)?,
        "fare_rule": serde_json::from_str::<Value>(station::setup::DALIAN_FARE_RULE)?,
        "reason": why,
    });
    let (status, answer) = st.post(1, "/api/v1/parameters/fare-table", &st.token("engineer"), &body).await?;
    anyhow::ensure!((200..300).contains(&status), "fare table upload: {status} {answer}");
    answer.get("version").and_then(Value::as_u64).context("no version in the answer")
}

/// A new fare table goes to the canary gate (g01) first, soaks, then reaches every gate; the next
/// one, whose canary rejects most taps during the soak, is rolled back on every gate (the old
/// content republished under a higher version).
async fn canary_rollouts(st: &Station) -> anyhow::Result<()> {
    let before = current_versions(st).await?["fare_table"];
    let v = upload_fare_table(st, "e2e: a canary rollout that succeeds").await?;
    let on = eventually("the canary runs the new fare table", Duration::from_secs(10), || async {
        let on = fare_table_on(st).await?;
        Ok((on.first() == Some(&Some(v))).then_some(on))
    })
    .await?;
    anyhow::ensure!(
        on.iter().skip(1).all(|x| *x == Some(before)),
        "only the canary may run v{v} during the soak: {on:?}"
    );
    let t = Instant::now();
    eventually(
        "the fare table on every gate after the soak",
        Duration::from_secs(system_tests::SOAK_SECS + 30),
        || async {
            let on = fare_table_on(st).await?;
            if on.iter().all(|x| *x == Some(v)) {
                return Ok(Some(()));
            }
            let r = st.get(1, "/api/v1/rollouts", &st.token("viewer")).await?;
            anyhow::bail!("gates on {on:?}; fare table rollout {}", r["rollouts"]["fare_table"])
        },
    )
    .await?;
    eprintln!("[e2e] canary rollout of fare table v{v}: g01 first, every gate {:?} later", t.elapsed());

    let bad = upload_fare_table(st, "e2e: a canary rollout whose canary fails").await?;
    eventually("the canary runs the failing fare table", Duration::from_secs(10), || async {
        Ok((fare_table_on(st).await?.first() == Some(&Some(bad))).then_some(()))
    })
    .await?;
    // Ride codes signed by a key the gates do not trust: the canary rejects every one.
    let rogue = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    for nonce in 0..30u64 {
        let issue = QrIssue {
            issuer: 1,
            key_id: 1,
            account: 7_100_000 + nonce,
            issued_at: gate_agent::gate::now().plus_minutes(-1),
            valid_secs: 600,
            nonce: 0x0bad_0000 + nonce,
        };
        let (decision, _) = tap_qr(st, 1, &qr::encode_text(&qr::generate(&issue, &rogue))).await?;
        anyhow::ensure!(decision == DecisionKind::Reject, "a rogue code was accepted");
    }
    let on = eventually(
        "every gate back on the old fare table content",
        Duration::from_secs(system_tests::SOAK_SECS + 30),
        || async {
            let on = fare_table_on(st).await?;
            Ok(on.iter().all(|x| x.is_some_and(|x| x > bad)).then_some(on))
        },
    )
    .await?;
    eprintln!("[e2e] failing canary of fare table v{bad} rolled back: gates now on {on:?}");
    Ok(())
}
