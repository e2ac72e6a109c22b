//! `promtool` on real scrapes: [`check_metrics`] lints an exposition, [`input_series`] turns it
//! into a promtool unit test's input (with the labels Prometheus adds to the scrape), and
//! [`test_rules`] runs `promtool test rules` on a test file naming the shipped rules
//! ([`rules_file`]). An alert or a recording rule on a series nothing emits then fails a test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where `promtool` is, or None (after saying so) outside CI. In CI its absence fails the test.
pub fn promtool() -> Option<PathBuf> {
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

/// The shipped rule file, `deploy/prometheus/afc.rules.yml`.
pub fn rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/prometheus/afc.rules.yml")
        .canonicalize()
        .unwrap()
}

/// `promtool check metrics` on `text` (an exposition); panics with promtool's complaints.
pub fn check_metrics(promtool: &Path, text: &str) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One sample line of an exposition as (series with `target` labels added, value); None for
/// comments, blank lines and values promtool's series notation cannot hold.
fn sample(line: &str, target: &str) -> Option<(String, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
    let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
    if !v.is_finite() {
        return None;
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
    Some((series, v))
}

/// Every sample of `text` as a promtool `input_series` entry with the `target` labels added
/// (`job="afc-gate",instance="g",...`), held at its value for `steps` one-minute steps.
pub fn input_series(text: &str, target: &str, steps: u32) -> String {
    input_series_over(&[text], target, steps)
}

/// Like [`input_series`] for consecutive scrapes: each sample takes its value in `scrapes[0]`
/// for `steps` steps, then its value in `scrapes[1]`, and so on; absent from a scrape, absent
/// (`_`) for those steps. Counters that appear or grow between scrapes make `increase()` move.
pub fn input_series_over(scrapes: &[&str], target: &str, steps: u32) -> String {
    let mut by_series: Vec<(String, Vec<Option<f64>>)> = Vec::new();
    for (i, text) in scrapes.iter().enumerate() {
        for (series, v) in text.lines().filter_map(|l| sample(l, target)) {
            match by_series.iter_mut().find(|(s, _)| *s == series) {
                Some((_, values)) => values[i] = Some(v),
                None => {
                    let mut values = vec![None; scrapes.len()];
                    values[i] = Some(v);
                    by_series.push((series, values));
                }
            }
        }
    }
    let mut out = String::new();
    for (series, values) in by_series {
        // f64's Display never uses an exponent, which promtool's series notation would misread.
        let notation: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                // promtool's `a x n` is n + 1 samples; the first scrape's run starts at time 0.
                let n = if i == 0 { steps - 1 } else { steps };
                match v {
                    Some(v) => format!("{v}x{n}"),
                    None => format!("_x{n}"),
                }
            })
            .collect();
        let _ = writeln!(out, "      - series: '{series}'\n        values: '{}'", notation.join(" "));
    }
    out
}

/// Runs `promtool test rules` on `text`, written to `dir/name`: (success, what promtool said
/// followed by the test file).
pub fn test_rules(promtool: &Path, dir: &Path, name: &str, text: &str) -> (bool, String) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let out = Command::new(promtool).arg("test").arg("rules").arg(&path).output().unwrap();
    let said = format!(
        "{}\n{}\n--- {name} ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// A promtool test file over [`rules_file`]: `input_series` (from [`input_series`]) then `tests`
/// (YAML already indented under the test: `alert_rule_test:` and/or `promql_expr_test:`).
pub fn test_file(input_series: &str, tests: &str) -> String {
    format!(
        "rule_files:\n  - '{rules}'\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{input_series}{tests}",
        rules = rules_file().display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_scrapes_become_one_series_each_with_absent_steps() {
        let a = "# HELP x X\n# TYPE x counter\nx 1\ny{k=\"v\"} 2\n";
        let b = "x 3\nz 4\n";
        let s = input_series_over(&[a, b], "job=\"j\"", 5);
        assert!(s.contains("series: 'x{job=\"j\"}'\n        values: '1x4 3x5'"), "{s}");
        assert!(s.contains("series: 'y{k=\"v\",job=\"j\"}'\n        values: '2x4 _x5'"), "{s}");
        assert!(s.contains("series: 'z{job=\"j\"}'\n        values: '_x4 4x5'"), "{s}");
    }
}
