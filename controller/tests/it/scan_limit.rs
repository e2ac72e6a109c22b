//! Ledger scans (`/api/v1/ledger/verify`, `/api/v1/ledger/search`) are bounded per node by
//! `api.max_concurrent_scans`: beyond it a scan waits `api.scan_wait_ms`, then answers 503 `busy`
//! with `Retry-After`, counted in `afc_api_scans_refused_total`.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::api::{ApiNode, VIEWER};
use crate::common::{batch, gate_key, register};

/// Records per admin write (well under `/admin/write`'s body limit).
const BATCH: u64 = 2_000;

async fn get(n: &ApiNode, path: &str) -> (StatusCode, Option<String>, Value) {
    get_at(n.http.clone(), format!("http://{}{path}", n.api)).await
}

async fn get_at(http: reqwest::Client, url: String) -> (StatusCode, Option<String>, Value) {
    let r = http.get(url).bearer_auth(VIEWER).send().await.unwrap();
    let status = r.status();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (status, retry, r.json().await.unwrap_or(Value::Null))
}

fn refused_metric(metrics: &str, scan: &str) -> u64 {
    let prefix = format!("afc_api_scans_refused_total{{scan=\"{scan}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in /metrics"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_scan_slot_concurrent_scans_beyond_it_get_503_busy() {
    let n = ApiNode::start_with(true, "max_concurrent_scans = 1\nscan_wait_ms = 20").await;
    let key = gate_key(1);
    n.admin_write(&register("g01", &key)).await;
    // A ledger long enough that one verification takes well over the 20 ms wait, on this machine.
    let mut last = 0;
    let solo = loop {
        n.admin_write(&batch("g01", &key, last + 1..=last + BATCH)).await;
        last += BATCH;
        let t = Instant::now();
        let (s, _, v) = get(&n, "/api/v1/ledger/verify").await;
        let took = t.elapsed();
        assert_eq!((s, v["ok"].as_bool()), (StatusCode::OK, Some(true)), "{v}");
        if took >= Duration::from_millis(300) || last >= 200_000 {
            break took;
        }
    };
    eprintln!("[scan_limit] one verification of {last} entries takes {solo:?}");

    // Verifications and searches (a filter matching nothing reads up to 20,000 entries) at once.
    let paths = [
        "/api/v1/ledger/verify",
        "/api/v1/ledger/search?card=1",
        "/api/v1/ledger/verify",
        "/api/v1/ledger/search?card=1",
        "/api/v1/ledger/verify",
        "/api/v1/ledger/search?card=1",
    ];
    let mut all = tokio::task::JoinSet::new();
    for (i, p) in paths.iter().enumerate() {
        let fut = get_at(n.http.clone(), format!("http://{}{p}", n.api));
        all.spawn(async move { (i, fut.await) });
    }
    let mut answers = all.join_all().await;
    answers.sort_by_key(|(i, _)| *i);
    let answers: Vec<_> = answers.into_iter().map(|(_, a)| a).collect();
    let (mut ok, mut busy) = (0, Vec::new());
    for ((status, retry, v), path) in answers.iter().zip(paths) {
        match *status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!((v["code"].as_str(), retry.as_deref()), (Some("busy"), Some("1")), "{path}: {v}");
                busy.push(path);
            }
            other => panic!("{path}: {other} {v}"),
        }
    }
    assert_eq!((ok, busy.len()), (1, paths.len() - 1), "one scan runs, the others are refused: {answers:?}");

    // Each refusal is counted, per kind of scan.
    let (s, _, _) = get(&n, "/api/v1/ledger/stats").await;
    assert_eq!(s, StatusCode::OK);
    let metrics = n.http.get(format!("http://{}/metrics", n.api)).send().await.unwrap().text().await.unwrap();
    let counted = refused_metric(&metrics, "verify") + refused_metric(&metrics, "search");
    assert_eq!(counted, busy.len() as u64, "{metrics}");
    let searches = busy.iter().filter(|p| p.contains("search")).count() as u64;
    assert_eq!(refused_metric(&metrics, "search"), searches);

    // The slot is released: scans one after another all run.
    for path in paths {
        let (s, _, v) = get(&n, path).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
    }
    n.stop().await;
}
