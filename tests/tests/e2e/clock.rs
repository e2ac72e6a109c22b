//! A gate's clock off (issue 11 item 2, controller side), on a real station: one gate agent runs
//! with the test-only clock offset (`AFC_TEST_ONLY_CLOCK_OFFSET_FILE`, re-read every 100 ms); the
//! leader's gate board (`/api/v1/gates`) must raise `clock_drift` for 5 s and 10 min behind or
//! ahead, not for 0.5 s (default `mqtt.clock_drift_alarm_ms` 2 s, heartbeats every 2 s), and
//! clear it when the clock is right again; a tap recorded 10 min ahead is kept but flagged
//! (`implausible_time`, `afc_ledger_implausible_time_total`).

use std::time::{Duration, Instant};

use afc_domain::model::StationCode;
use afc_domain::wire::ReaderReply;
use gate_agent::gate::TEST_CLOCK_OFFSET_FILE_ENV;
use gate_agent::reader_sim::{ReaderConn, ReaderSim};
use serde_json::Value;
use station::plan::Plan;
use system_tests::{eventually, Station};

const MIN: i64 = 60_000;

async fn gate(st: &Station) -> anyhow::Result<Value> {
    let gates = st.gates().await?;
    gates.into_iter().find(|g| g["gate"] == "g01").ok_or_else(|| anyhow::anyhow!("no g01"))
}

fn has_alarm(g: &Value, alarm: &str) -> bool {
    g["alarms"].as_array().is_some_and(|a| a.iter().any(|x| x == alarm))
}

/// Sets the gate's clock offset and waits until the board's `clock_drift` is `raised`; returns
/// how long it took and the offset the board shows.
async fn drift_after(
    st: &Station,
    file: &std::path::Path,
    offset: i64,
    raised: bool,
) -> anyhow::Result<(Duration, i64)> {
    std::fs::write(file, offset.to_string())?;
    let t = Instant::now();
    eventually(&format!("clock_drift {raised} at offset {offset} ms"), Duration::from_secs(15), || async {
        let g = gate(st).await?;
        let shown = g["clock_offset_ms"].as_i64().unwrap_or(0);
        // The board's offset must reflect the new clock (heartbeat after the change) too.
        let current = (shown - offset).abs() < 1_000;
        Ok((current && has_alarm(&g, "clock_drift") == raised).then_some((t.elapsed(), shown)))
    })
    .await
}

async fn run(st: &Station, file: &std::path::Path) -> anyhow::Result<()> {
    eventually("g01 live on the board", Duration::from_secs(60), || async {
        Ok(gate(st).await.ok().filter(|g| g["online"] == true && g["clock_offset_ms"].is_i64()).map(|_| ()))
    })
    .await?;
    let mut figures = Vec::new();
    // Within tolerance: two heartbeats at each offset, no alarm.
    for offset in [500, -500] {
        drift_after(st, file, offset, false).await?;
        tokio::time::sleep(Duration::from_millis(4_500)).await;
        let g = gate(st).await?;
        anyhow::ensure!(!has_alarm(&g, "clock_drift"), "clock_drift at {offset} ms: {g}");
        figures.push(format!("{offset} ms: no alarm (board {} ms)", g["clock_offset_ms"]));
    }
    for (case, offset) in [
        ("5 s behind", -5_000),
        ("5 s ahead", 5_000),
        ("10 min behind", -10 * MIN),
        ("10 min ahead", 10 * MIN),
    ] {
        let (raised, shown) = drift_after(st, file, offset, true).await?;
        figures.push(format!("{case}: raised after {raised:?} (board {shown} ms)"));
        if offset == 10 * MIN {
            tap_flagged(st, &mut figures).await?;
        }
        let (cleared, _) = drift_after(st, file, 0, false).await?;
        figures.push(format!("cleared after {cleared:?}"));
    }
    eprintln!("[clock] {}", figures.join("; "));
    Ok(())
}

/// With the gate 10 min ahead: a tap's record is committed as the gate saw it and flagged.
async fn tap_flagged(st: &Station, figures: &mut Vec<String>) -> anyhow::Result<()> {
    let before = gate(st).await?["implausible_time_records"].as_u64().unwrap_or(0);
    let code = StationCode(st.plan.station_code);
    let mut sim = ReaderSim::new(11, code, [101, 105].map(StationCode).to_vec(), 2_000, None);
    let mut conn = ReaderConn::connect(st.plan.reader(1)).await?;
    let mut recorded = 0;
    for _ in 0..20 {
        let (presented, tap) = sim.next_tap(gate_agent::gate::now());
        if let ReaderReply::Response(r) = conn.tap(&tap).await? {
            recorded += u64::from(r.gate_seq.is_some());
            sim.apply(presented, &r);
        }
        if recorded >= 3 {
            break;
        }
    }
    anyhow::ensure!(recorded > 0, "no tap was recorded");
    let t = Instant::now();
    let g = eventually("implausible_time on the board", Duration::from_secs(20), || async {
        let g = gate(st).await?;
        let n = g["implausible_time_records"].as_u64().unwrap_or(0);
        Ok((n >= before + recorded && has_alarm(&g, "implausible_time")).then_some(g))
    })
    .await?;
    let leader = st.leader().await?;
    let url = format!("http://{}/metrics", st.plan.api(leader));
    let text = reqwest::Client::new().get(&url).bearer_auth(st.token("viewer")).send().await?.text().await?;
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("afc_ledger_implausible_time_total{") && l.contains("g01") && l.contains("ahead")
        })
        .ok_or_else(|| anyhow::anyhow!("no afc_ledger_implausible_time_total for g01 in\n{text}"))?;
    let counted: f64 = line.rsplit(' ').next().unwrap_or("0").parse()?;
    anyhow::ensure!(counted >= recorded as f64, "{line}: fewer than the {recorded} records");
    figures.push(format!(
        "{recorded} taps 10 min ahead flagged after {:?} ({} on the board, `{line}`)",
        t.elapsed(),
        g["implausible_time_records"]
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_drift_alarm_and_implausible_record_times_follow_a_gate_clock_off_by_5_s_or_10_min() {
    let _one = super::ONE_STATION_AT_A_TIME.lock().await;
    let plan = Plan { gates: 1, port_offset: 12_000, ..Plan::default() };
    let prepared = Station::prepare(&plan).expect("prepare");
    let file = prepared.0.path().join("gate-clock-offset-ms");
    std::fs::write(&file, "0").unwrap();
    let env = [(TEST_CLOCK_OFFSET_FILE_ENV, file.to_str().unwrap())];
    let mut st = Station::start_with(prepared, plan, &[], &env).await.expect("station starts");
    if let Err(e) = run(&st, &file).await {
        panic!("{e:#}\n\n{}", st.log_tails(40));
    }
    let _ = st.stop(Duration::from_secs(90));
}
