//! The alert rules against what a real gate emits (issue 13 item 1): a running agent's `/metrics`
//! is scraped, each sample becomes a promtool input series (with the labels Prometheus adds), and
//! `promtool test rules` runs the real `deploy/prometheus/afc.rules.yml` on them. An alert on a
//! series the gate no longer emits (renamed, dropped) then fails here, not only in production.

use std::sync::atomic::Ordering;

use afc_domain::model::Direction;
use afc_domain::wire::ReaderReply;

use std::fmt::Write as _;

use afc_test_support::promtool::{self, promtool};

use crate::harness::*;

/// The agent's `/metrics` body (status checked).
async fn scrape(agent: &Agent) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(agent.metrics_addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The labels Prometheus adds to a gate's scrape (job, instance) and the relabelled station and gate.
fn target() -> String {
    format!("job=\"afc-gate\",instance=\"gate\",station=\"{STATION}\",gate=\"{GATE}\"")
}

/// Every sample of `text` held for 30 minutes at one-minute steps.
fn input_series(text: &str) -> String {
    promtool::input_series(text, &target(), 31)
}

/// A promtool test file: `series` as input, `AfcOutboxNearFull` checked at 10 m against
/// `exp_alerts` (YAML, already indented as a list under `exp_alerts:`, or `[]`).
fn test_file(series: &str, exp_alerts: &str) -> String {
    promtool::test_file(
        series,
        &format!("    alert_rule_test:\n      - eval_time: 10m\n        alertname: AfcOutboxNearFull\n        exp_alerts:{exp_alerts}\n"),
    )
}

/// A small outbox: some thirty taps fill it past 80 %.
const CAPACITY: u64 = 4096;

const FIRES: &str = "
          - exp_labels:
              severity: critical
              station: s1
              gate: g01
            exp_annotations:
              summary: \"Gate g01 outbox over 80% full\"
              description: \"The gate cannot upload its transactions; when the outbox is full it stops accepting taps.\"";

#[tokio::test]
async fn outbox_near_full_fires_on_a_real_gates_scrape_and_not_on_an_empty_outbox() {
    let Some(promtool) = promtool() else { return };
    let plc = plc().await;
    let port = free_port();
    start_broker(port).await;
    // The controllers take the batches but never ack: every tap stays in the outbox.
    let controller = Controller::connect(port).await;
    controller.acking.store(false, Ordering::SeqCst);
    let agent = Agent::start_with(port, &plc, &format!("[outbox]\nmax_bytes = {CAPACITY}\n")).await;
    agent.seed_defaults();
    let m = agent.running.metrics.clone();
    let dir = tempfile::tempdir().unwrap();

    // Before any tap: the outbox is empty and the alert stays silent.
    eventually("the outbox capacity to be published", || {
        (m.outbox_capacity_bytes.load(Ordering::Relaxed) == CAPACITY).then_some(())
    })
    .await;
    let empty = scrape(&agent).await;
    // The build is named on every scrape: the commit build.rs found and the crate's version.
    let info = format!(",version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    let commit = empty
        .lines()
        .find_map(|l| l.strip_prefix("afc_build_info{commit=\"")?.strip_suffix(info.as_str()))
        .unwrap_or_else(|| panic!("{empty}"));
    assert!(commit.len() > 1 && commit.ends_with('"'), "{commit}");
    // The process series are there too (memory, CPU, open files).
    for p in ["process_resident_memory_bytes ", "process_cpu_seconds_total ", "process_open_fds "] {
        assert!(empty.contains(p), "no {p} in\n{empty}");
    }
    promtool::check_metrics(&promtool, &empty);
    let (ok, said) = promtool::test_rules(
        &promtool,
        dir.path(),
        "empty.test.yml",
        &test_file(&input_series(&empty), " []"),
    );
    assert!(ok, "promtool on the empty outbox's scrape:\n{said}");

    // Fill the outbox past 80 % (and short of full, where taps would be refused).
    let mut reader = agent.reader().await;
    let ratio = || m.outbox_bytes.load(Ordering::Relaxed) as f64 / CAPACITY as f64;
    let mut taps = 0u64;
    let mut half = None;
    while ratio() <= 0.82 {
        if half.is_none() && ratio() > 0.4 {
            half = Some(scrape(&agent).await);
        }
        assert!(
            taps < 500,
            "the outbox never filled: {} bytes after {taps} taps",
            m.outbox_bytes.load(Ordering::Relaxed)
        );
        let r = reader
            .tap(&svc_tap(Direction::Entry, card(3104_0000_0001_0000 + taps, 1000, None)))
            .await
            .unwrap();
        assert!(matches!(r, ReaderReply::Response(ref r) if r.gate_seq.is_some()), "tap {taps}: {r:?}");
        taps += 1;
    }
    assert!(ratio() < 1.0, "the outbox overflowed: {}", ratio());
    let full = scrape(&agent).await;
    assert!(full.contains(&format!("afc_gate_outbox_depth {taps}")), "{full}");
    let (ok, said) =
        promtool::test_rules(&promtool, dir.path(), "full.test.yml", &test_file(&input_series(&full), FIRES));
    assert!(ok, "promtool on the full outbox's scrape ({taps} taps, {:.0} % full):\n{said}", ratio() * 100.0);
    promtool::check_metrics(&promtool, &full);

    // The recording rules on the three scrapes, 15 minutes each: at 32 m the last 5 minutes
    // hold the step from the half-full to the full scrape, so every rate and quantile has moved.
    let half = half.expect("a scrape at half full");
    let series = promtool::input_series_over(&[&empty, &half, &full], &target(), 15);
    let gate = format!("gate=\"{GATE}\",station=\"{STATION}\"");
    let recorded = [
        (
            "gate:afc_gate_decisions:rate5m{result=\"accept\"}",
            format!("direction=\"entry\",{gate},result=\"accept\""),
        ),
        (
            "station:afc_gate_decisions:rate5m{result=\"accept\"}",
            format!("direction=\"entry\",result=\"accept\",station=\"{STATION}\""),
        ),
        ("gate:afc_gate_tap_to_flap_seconds:p99_5m", gate.clone()),
        ("station:afc_gate_tap_to_flap_seconds:p99_5m", format!("station=\"{STATION}\"")),
        ("gate:afc_gate_modbus_call_seconds:p99_5m{op=\"write_coil\"}", format!("{gate},op=\"write_coil\"")),
        ("gate:afc_gate_outbox_fill:ratio > 0.8 ", format!("{gate},instance=\"gate\",job=\"afc-gate\"")),
    ];
    let mut tests = String::from("    promql_expr_test:\n");
    for (expr, labels) in &recorded {
        // `> bool 0`: the rule produced a positive value for exactly these labels.
        let _ = write!(
            tests,
            "      - expr: '{expr} > bool 0'\n        eval_time: 32m\n        exp_samples:\n          - labels: '{{{labels}}}'\n            value: 1\n"
        );
    }
    let (ok, said) = promtool::test_rules(
        &promtool,
        dir.path(),
        "recorded.test.yml",
        &promtool::test_file(&series, &tests),
    );
    assert!(ok, "the recording rules on a real gate's scrapes:\n{said}");
}
