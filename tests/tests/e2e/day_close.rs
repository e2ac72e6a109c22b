//! End of business day (issue 14 items 3 and 4) on a real station with two gates.
//!
//! To close a day the day must be over. The test does not bend the rule for it: an engineer
//! uploads a fare table whose business day rolls over about two minutes from now (UTC+0, the
//! rollover minute set to then), as a station changing its day boundary would. Before the
//! boundary: taps at both gates' readers and, at g02, a passage forced through the PLC
//! simulator's closed flaps. After it (the leader has read both gates' counters at their first
//! heartbeat in the new day) the operator closes the ended day and the test checks:
//! - the close counts exactly the ledger's records of the day, as read through `/api/v1/ledger`,
//!   per gate the accepted taps and the refused ones;
//! - the forced passage is a discrepancy at g02, entry: the PLC counted one passage more than the
//!   recorded taps; g01 matches;
//! - the close reaches clearing (`GET /v1/stations/{s}/days`) and is marked uploaded;
//! - a second close of the day is refused with 409.

use std::collections::BTreeMap;
use std::time::Duration;

use afc_domain::model::{BusinessDayRule, StationCode, Timestamp};
use afc_domain::wire::ReaderReply;
use anyhow::Context as _;
use gate_agent::reader_sim::{ReaderConn, ReaderSim};
use serde_json::{json, Value};
use station::plan::Plan;
use system_tests::{eventually, Station};

/// `count` decided taps at reader `n` (accepted or refused, each with a gate_seq).
async fn taps(st: &Station, sim: &mut ReaderSim, n: u16, count: usize) -> anyhow::Result<usize> {
    let mut done = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut conn = None;
    while std::time::Instant::now() < deadline {
        if conn.is_none() {
            conn = ReaderConn::connect(st.plan.reader(n)).await.ok();
        }
        let Some(c) = conn.as_mut() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (presented, tap) = sim.next_tap(gate_agent::gate::now());
        match c.tap(&tap).await {
            Ok(ReaderReply::Response(r)) => {
                if r.gate_seq.is_some() {
                    done += 1;
                }
                sim.apply(presented, &r);
            }
            Ok(_) => {}
            Err(_) => conn = None,
        }
        if done == count {
            return Ok(done);
        }
        // Let the simulated passenger through (800 ms) before the next tap: an open command
        // while the flaps are still open is no second passage, and the close would (rightly)
        // list those taps as taps without a passage.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    anyhow::bail!("reader {n}: only {done} of {count} taps decided")
}

/// The whole ledger of node `id` as raw entries.
async fn ledger(st: &Station, id: u16) -> anyhow::Result<Vec<Value>> {
    let viewer = st.token("viewer");
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let page = st.get(id, &format!("/api/v1/ledger?from={from}&limit=1000"), &viewer).await?;
        let entries = page.as_array().context("ledger page")?.clone();
        let n = entries.len();
        if let Some(last) = entries.last() {
            from = last["index"].as_u64().context("index")? + 1;
        }
        out.extend(entries);
        if n < 1000 {
            return Ok(out);
        }
    }
}

/// The reconciliation rows of `gate` in a day's close (or preview).
fn rows_of<'a>(day: &'a Value, gate: &str) -> Vec<&'a Value> {
    day["close"]["reconciliation"]
        .as_array()
        .map(|r| r.iter().filter(|x| x["gate"] == gate).collect())
        .unwrap_or_default()
}

async fn run(st: &Station) -> anyhow::Result<()> {
    let viewer = st.token("viewer");
    let leader = st.leader().await?;
    eventually("both gates online with their fare table", Duration::from_secs(90), || async {
        let gates = st.gates().await?;
        let ready = |g: &Value| {
            g["online"] == true && g.pointer("/reported_versions/fare_table").is_some_and(Value::is_u64)
        };
        Ok((gates.len() == 2 && gates.iter().all(ready)).then_some(()))
    })
    .await?;

    // The day boundary, 100 to 160 s from now: a fare table whose rule rolls over then (UTC+0).
    let now = gate_agent::gate::now();
    let boundary = Timestamp(((now.millis() + 100_000) / 60_000 + 1) * 60_000);
    let rollover = (boundary.millis().rem_euclid(Timestamp::DAY_MS) / 60_000) as u32;
    let rule = BusinessDayRule { utc_offset_minutes: 0, rollover_minute_of_day: rollover };
    let day = rule.business_day(Timestamp(boundary.millis() - 1));
    let mut fare_rule: Value = serde_json::from_str(station::setup::DALIAN_FARE_RULE)?;
    fare_rule["business_day"] = json!({"utc_offset_minutes": 0, "rollover_minute_of_day": rollover});
    let body = json!({
        "network": serde_json::from_str::<Value>(station::setup::DALIAN_NETWORK)?,
        "fare_rule": fare_rule,
        "reason": "test: the business day rolls over in two minutes",
    });
    let (s, v) = st.post(leader, "/api/v1/parameters/fare-table", &st.token("engineer"), &body).await?;
    anyhow::ensure!(s == 200, "fare table upload: {s} {v}");
    eprintln!("[e2e] business day {day} ends at {} ms (rollover {rollover} min UTC)", boundary.millis());

    // The leader reads each gate's counters at the first heartbeat it sees: the start of the day
    // at both gates, before any tap.
    let day_path = format!("/api/v1/days/{day}");
    eventually("a counter reading of both gates in the day", Duration::from_secs(30), || async {
        let d = st.get(leader, &day_path, &viewer).await?;
        let read = |g: &str| rows_of(&d, g).iter().any(|r| r["from_reading"].is_i64());
        Ok((read("g01") && read("g02")).then_some(()))
    })
    .await?;

    let code = StationCode(st.plan.station_code);
    let origins = [101, 105].map(StationCode).to_vec();
    let mut sim = ReaderSim::new(77, code, origins, 2_000, None);
    let decided = [taps(st, &mut sim, 1, 6).await?, taps(st, &mut sim, 2, 4).await?];
    // Someone pushes through g02's closed flaps.
    let answer = st.plc(2, "force entry").await?;
    eprintln!("[e2e] taps decided {decided:?}; PLC 2 force entry: {answer}");
    anyhow::ensure!(gate_agent::gate::now() < boundary, "the traffic took past the day boundary");

    // Every decided tap in the ledger, then the boundary and the readings after it.
    eventually("every tap in the ledger", Duration::from_secs(60), || async {
        let rows = ledger(st, leader).await?;
        Ok((rows.len() == decided.iter().sum::<usize>()).then_some(()))
    })
    .await?;
    eventually("the readings after the day boundary", Duration::from_secs(240), || async {
        let d = st.get(leader, &day_path, &viewer).await?;
        let read = |g: &str| {
            let rows = rows_of(&d, g);
            !rows.is_empty() && rows.iter().all(|r| r["until_reading"].is_i64())
        };
        Ok((read("g01") && read("g02")).then_some(()))
    })
    .await?;

    // Close the day; the totals against the ledger's own records of the day.
    let operator = st.token("operator");
    let reason = json!({"reason": "end of business day"});
    let (s, closed) = st.post(leader, &format!("{day_path}/close"), &operator, &reason).await?;
    anyhow::ensure!(s == 200, "close: {s} {closed}");
    let close = &closed["close"];
    let (from, until) = (close["from"].as_i64().context("from")?, close["until"].as_i64().context("until")?);
    let mut want: BTreeMap<(String, bool), u64> = BTreeMap::new();
    let mut in_day = 0u64;
    for e in ledger(st, leader).await? {
        let r = &e["record"];
        let t = r["occurred_at"].as_i64().context("occurred_at")?;
        if t >= from && t < until {
            in_day += 1;
            let key = (r["gate"].as_str().unwrap_or("").to_owned(), r["accepted"] == true);
            *want.entry(key).or_default() += 1;
        }
    }
    anyhow::ensure!(
        close["records"] == in_day && in_day > 0,
        "close counts {} records, the ledger {in_day}",
        close["records"]
    );
    let mut got: BTreeMap<(String, bool), u64> = BTreeMap::new();
    for t in close["totals"].as_array().context("totals")? {
        let gate = t["gate"].as_str().unwrap_or("").to_owned();
        *got.entry((gate.clone(), true)).or_default() += t["accepted"].as_u64().unwrap_or(0);
        *got.entry((gate, false)).or_default() += t["rejected"].as_u64().unwrap_or(0);
    }
    got.retain(|_, n| *n > 0);
    anyhow::ensure!(got == want, "close totals {got:?}, ledger {want:?}");

    // The forced passage: a discrepancy at g02's entry, nowhere at g01.
    let discrepancies = close["discrepancies"].as_array().context("discrepancies")?;
    let g02 = discrepancies
        .iter()
        .find(|d| d["gate"] == "g02" && d["direction"] == "entry")
        .with_context(|| format!("no discrepancy at g02 entry: {}", close["reconciliation"]))?;
    anyhow::ensure!(g02["difference"] == 1, "g02 entry: {g02}");
    anyhow::ensure!(g02["forced_passage"] == 1, "g02 forced passages: {g02}");
    anyhow::ensure!(
        discrepancies.iter().all(|d| d["gate"] != "g01"),
        "g01 should match: {}",
        close["reconciliation"]
    );
    anyhow::ensure!(closed["alarm"] == true, "no alarm: {closed}");

    let (s, v) = st.post(leader, &format!("{day_path}/close"), &operator, &reason).await?;
    anyhow::ensure!(s == 409, "a second close: {s} {v}");

    // At clearing, and marked uploaded.
    let at_clearing = eventually("the closed day at clearing", Duration::from_secs(60), || async {
        let days = st.clearing("days").await?;
        Ok(days.as_array().and_then(|d| d.iter().find(|x| x["day"] == day.to_string()).cloned()))
    })
    .await?;
    anyhow::ensure!(at_clearing["record"] == *close, "clearing holds another close: {at_clearing}");
    eventually("the day marked uploaded", Duration::from_secs(30), || async {
        let d = st.get(leader, "/api/v1/days", &viewer).await?;
        Ok(d.as_array()
            .and_then(|d| d.iter().find(|x| x["day"] == day.to_string()))
            .filter(|x| x["uploaded"] == true)
            .map(|_| ()))
    })
    .await?;
    let incidents = st.get(leader, &format!("/api/v1/reports/incidents?day={day}"), &viewer).await?;
    eprintln!(
        "[e2e] day {day} closed: {in_day} records, discrepancies {discrepancies:?}; incidents {incidents}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_day_equals_the_ledger_shows_a_forced_passage_as_a_discrepancy_and_reaches_clearing() {
    let _one = super::ONE_STATION_AT_A_TIME.lock().await;
    let plan = Plan { gates: 2, port_offset: 15_000, ..Plan::default() };
    let prepared = Station::prepare(&plan).expect("prepare");
    let mut st = Station::start_planned(prepared, plan).await.expect("station starts");
    if let Err(e) = run(&st).await {
        panic!("{e:#}\n\n{}", st.log_tails(40));
    }
    let _ = st.stop(Duration::from_secs(90));
}
