//! The shipped monitoring (deploy/prometheus, deploy/grafana): valid for promtool, alert rules that
//! pass their unit tests, the ledger alerts on a real node's scrapes, and only metric names the
//! services export.

use std::path::{Path, PathBuf};
use std::process::Command;

use afc_domain::ledger::TxRecord;
use afc_test_support::promtool as pt;

use crate::api::{promtool, ApiNode};
use crate::common::*;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn run_promtool(promtool: &Path, args: &[&str]) {
    let out = Command::new(promtool).args(args).current_dir(deploy().join("prometheus")).output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alert_rules_and_scrape_config_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    run_promtool(&promtool, &["check", "rules", "afc.rules.yml"]);
    run_promtool(&promtool, &["test", "rules", "afc.rules.test.yml"]);
    run_promtool(&promtool, &["check", "config", "prometheus.yml"]);
}

/// Every `afc_...` name in `text`, with histogram suffixes folded into the family; a recorded
/// series (`level:afc_...:operation`) whole, colons included.
fn afc_names(text: &str) -> Vec<String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = Vec::new();
    for token in text.split(|c: char| !word(c)) {
        if token.starts_with("afc_") || token.split(':').nth(1).is_some_and(|m| m.starts_with("afc_")) {
            let name =
                ["_bucket", "_sum", "_count"].iter().fold(token, |n, s| n.strip_suffix(s).unwrap_or(n));
            out.push(name.to_owned());
        }
    }
    out
}

#[test]
fn the_rules_and_the_dashboards_use_only_metrics_the_services_export_or_the_rules_record() {
    // The controller's families, and the gates' own (their scrape job feeds the gate dashboard
    // and the recording rules).
    let exported = [
        include_str!("../../src/metrics.rs"),
        include_str!("../../../gate-agent/src/metrics.rs"),
        include_str!("../../../afc-process/src/metrics.rs"),
    ]
    .concat();
    let rules = std::fs::read_to_string(deploy().join("prometheus/afc.rules.yml")).unwrap();
    let dashboard = std::fs::read_to_string(deploy().join("grafana/afc-controller.json")).unwrap();
    let gates = std::fs::read_to_string(deploy().join("grafana/afc-gates.json")).unwrap();
    for d in [&dashboard, &gates] {
        let parsed: serde_json::Value = serde_json::from_str(d).unwrap();
        assert!(!parsed["panels"].as_array().unwrap().is_empty());
    }
    // Recorded series (level:metric:operation) name the metric they derive from in the middle.
    for (file, text) in
        [("afc.rules.yml", &rules), ("afc-controller.json", &dashboard), ("afc-gates.json", &gates)]
    {
        let names = afc_names(text);
        assert!(!names.is_empty(), "{file} names no afc_ metric");
        for name in names {
            if name.contains(':') {
                assert!(
                    rules.contains(&format!("record: {name}\n")),
                    "{file} uses {name}, which no rule records"
                );
            } else {
                assert!(
                    exported.contains(&format!("\"{name}\"")),
                    "{file} uses {name}, which no service exports"
                );
            }
        }
    }
}

async fn scrape(n: &ApiNode) -> String {
    let r = n.http.get(format!("http://{}/metrics", n.api)).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.text().await.unwrap()
}

/// AfcDayCloseDiscrepancy on what a real node exports: nothing before the close, firing for the
/// closed day (a forced passage at g02) after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_day_close_alert_fires_on_a_real_nodes_scrapes_after_a_close_with_a_discrepancy() {
    let Some(tool) = promtool() else { return };
    let n = ApiNode::start(true).await;
    let (day, _, _) = crate::days::day_with_traffic(&n).await;
    let before = scrape(&n).await;
    let (s, v) = n
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/days/{day}/close"),
            Some(crate::api::OPERATOR),
            Some(serde_json::json!({"reason": "end of day"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let after = scrape(&n).await;
    n.stop().await;
    pt::check_metrics(&tool, &after);
    let series = pt::input_series_over(
        &[&before, &after],
        "job=\"afc-controller\",instance=\"n1\",station=\"s1\"",
        15,
    );
    let firing = |at: &str, on: bool| {
        let samples = if on {
            format!("\n          - labels: 'ALERTS{{alertname=\"AfcDayCloseDiscrepancy\",alertstate=\"firing\",day=\"{day}\",severity=\"warning\",station=\"s1\"}}'\n            value: 1\n")
        } else {
            " []\n".to_owned()
        };
        format!("      - expr: 'ALERTS{{alertname=\"AfcDayCloseDiscrepancy\"}}'\n        eval_time: {at}\n        exp_samples:{samples}")
    };
    let tests = format!("    promql_expr_test:\n{}{}", firing("10m", false), firing("20m", true));
    let dir = tempfile::tempdir().unwrap();
    let (ok, said) = pt::test_rules(&tool, dir.path(), "day.test.yml", &pt::test_file(&series, &tests));
    assert!(ok, "the day close alert on a real node's scrapes:\n{said}");
}

/// The ledger alerts on what a real node exports: a healthy scrape for 15 minutes, then one
/// after a recorded sequence gap and a refused conflicting record. Nothing fires on the first;
/// AfcLedgerSequenceGap and AfcLedgerKeyConflict fire on the second, for the right gate, and
/// AfcNoLeader never (the node is leader). An alert on a series the node no longer exports, or
/// with other labels, fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_alerts_fire_on_a_real_nodes_scrapes_and_not_on_a_healthy_one() {
    let Some(tool) = promtool() else { return };
    let n = ApiNode::start(true).await;
    let key = gate_key(1);
    n.admin_write(&register("g01", &key)).await;
    n.admin_write(&covering_batch(
        "g01",
        &key,
        (1..=2).map(|s| installed_record("g01", 1, s)).collect(),
        Some(1),
    ))
    .await;
    let healthy = scrape(&n).await;
    pt::check_metrics(&tool, &healthy);
    // 3 and 4 are lost: the gate covers from 3 and carries only 5.
    n.admin_write(&covering_batch("g01", &key, vec![installed_record("g01", 1, 5)], Some(3))).await;
    // 5 again with other content: refused and kept as a conflict.
    let other = TxRecord { id: 4242, ..installed_record("g01", 1, 5) };
    n.admin_write(&covering_batch("g01", &key, vec![other], None)).await;
    let broken = scrape(&n).await;
    n.stop().await;
    for want in
        ["afc_ledger_sequence_gaps_total{gate=\"g01\"} 1", "afc_ledger_key_conflicts_total{gate=\"g01\"} 1"]
    {
        assert!(broken.contains(want), "no {want} in\n{broken}");
    }

    let series = pt::input_series_over(
        &[&healthy, &broken],
        "job=\"afc-controller\",instance=\"n1\",station=\"s1\"",
        15,
    );
    let firing = |at: &str, alerts: &[&str]| {
        let samples: String = alerts
            .iter()
            .map(|a| format!("          - labels: 'ALERTS{{alertname=\"{a}\",alertstate=\"firing\",gate=\"g01\",severity=\"critical\",station=\"s1\"}}'\n            value: 1\n"))
            .collect();
        let samples = if samples.is_empty() { " []\n".to_owned() } else { format!("\n{samples}") };
        format!(
            "      - expr: 'ALERTS{{alertname=~\"AfcNoLeader|AfcLedgerSequenceGap|AfcLedgerKeyConflict\"}}'\n        eval_time: {at}\n        exp_samples:{samples}"
        )
    };
    let tests = format!(
        "    promql_expr_test:\n{}{}",
        firing("10m", &[]),
        firing("20m", &["AfcLedgerKeyConflict", "AfcLedgerSequenceGap"])
    );
    let dir = tempfile::tempdir().unwrap();
    let (ok, said) = pt::test_rules(&tool, dir.path(), "ledger.test.yml", &pt::test_file(&series, &tests));
    assert!(ok, "the ledger alerts on a real node's scrapes:\n{said}");
}
