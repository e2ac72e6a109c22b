//! The shipped monitoring (deploy/prometheus, deploy/grafana): valid for promtool, alert rules that
//! pass their unit tests, and only metric names the controller exports.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::api::promtool;

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

/// Every `afc_...` name in `text`, with histogram suffixes folded into the family.
fn afc_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("afc_") {
        let start = i + pos;
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(text.len() - start);
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if boundary {
            let name = &text[start..end];
            let name = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
            out.push(name.to_owned());
        }
        i = end;
    }
    out
}

#[test]
fn the_rules_and_the_dashboard_use_only_metrics_the_controller_exports() {
    let exported = include_str!("../../src/api/metrics.rs");
    let rules = std::fs::read_to_string(deploy().join("prometheus/afc.rules.yml")).unwrap();
    let dashboard = std::fs::read_to_string(deploy().join("grafana/afc-controller.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(!parsed["panels"].as_array().unwrap().is_empty());
    for (file, text) in [("afc.rules.yml", &rules), ("afc-controller.json", &dashboard)] {
        let names = afc_names(text);
        assert!(!names.is_empty(), "{file} names no afc_ metric");
        for name in names {
            assert!(
                exported.contains(&format!("\"{name}\"")),
                "{file} uses {name}, which the controller does not export"
            );
        }
    }
}
