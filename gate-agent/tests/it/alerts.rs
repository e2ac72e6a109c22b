//! The alert rules against what a real gate emits (issue 13 item 1): a running agent's `/metrics`
//! is scraped, each sample becomes a promtool input series (with the labels Prometheus adds), and
//! `promtool test rules` runs the real `deploy/prometheus/afc.rules.yml` on them. An alert on a
//! series the gate no longer emits (renamed, dropped) then fails here, not only in production.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use afc_domain::model::Direction;
use afc_domain::wire::ReaderReply;

use crate::harness::*;

/// Where `promtool` is, or None (after saying so) outside CI. In CI its absence fails the test.
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("promtool")).find(|p| p.is_file()));
    if found.is_none() {
        assert!(
            std::env::var("CI").map(|v| v != "true").unwrap_or(true),
            "promtool is required in CI (apt-get install prometheus)"
        );
        eprintln!("SKIPPED: promtool not found on PATH (install the Debian package `prometheus`)");
    }
    found
}

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

/// Every sample line of `text` as a promtool `input_series` entry: its labels plus the target
/// labels Prometheus adds to a gate's scrape (job, instance) and the relabelled station and gate,
/// held constant for 30 minutes at one-minute steps.
fn input_series(text: &str) -> String {
    let target = format!("job=\"afc-gate\",instance=\"gate\",station=\"{STATION}\",gate=\"{GATE}\"");
    let mut out = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        if !v.is_finite() {
            continue;
        }
        let series = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("bad labels in {line:?}"));
                if labels.is_empty() {
                    format!("{name}{{{target}}}")
                } else {
                    format!("{name}{{{labels},{target}}}")
                }
            }
            None => format!("{series}{{{target}}}"),
        };
        assert!(!series.contains('\''), "a quote in {series}");
        // f64's Display never uses an exponent, which promtool's series notation would misread.
        let _ = writeln!(out, "      - series: '{series}'\n        values: '{v}x30'");
    }
    out
}

/// The rule file under test, from the workspace.
fn rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/afc.rules.yml").canonicalize().unwrap()
}

/// A promtool test file: `series` as input, `AfcOutboxNearFull` checked at 10 m against
/// `exp_alerts` (YAML, already indented as a list under `exp_alerts:`, or `[]`).
fn test_file(series: &str, exp_alerts: &str) -> String {
    format!(
        "rule_files:\n  - '{rules}'\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{series}    alert_rule_test:\n      - eval_time: 10m\n        alertname: AfcOutboxNearFull\n        exp_alerts:{exp_alerts}\n",
        rules = rules_file().display(),
    )
}

/// Runs `promtool test rules` on `text`, written to `dir/name`; (success, output).
fn promtool_test(promtool: &Path, dir: &Path, name: &str, text: &str) -> (bool, String) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(promtool).arg("test").arg("rules").arg(&path).output().unwrap();
    let said = format!(
        "{}\n{}\n--- {name} ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
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
    // The build is named on every scrape: the crate's version and the commit build.rs found.
    let info = format!("afc_build_info{{version=\"{}\",commit=\"", env!("CARGO_PKG_VERSION"));
    let commit =
        empty.lines().find_map(|l| l.strip_prefix(info.as_str())).unwrap_or_else(|| panic!("{empty}"));
    assert!(commit.ends_with("\"} 1") && commit.len() > 4, "{commit}");
    let (ok, said) =
        promtool_test(&promtool, dir.path(), "empty.test.yml", &test_file(&input_series(&empty), " []"));
    assert!(ok, "promtool on the empty outbox's scrape:\n{said}");

    // Fill the outbox past 80 % (and short of full, where taps would be refused).
    let mut reader = agent.reader().await;
    let ratio = || m.outbox_bytes.load(Ordering::Relaxed) as f64 / CAPACITY as f64;
    let mut taps = 0u64;
    while ratio() <= 0.82 {
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
        promtool_test(&promtool, dir.path(), "full.test.yml", &test_file(&input_series(&full), FIRES));
    assert!(ok, "promtool on the full outbox's scrape ({taps} taps, {:.0} % full):\n{said}", ratio() * 100.0);
}
