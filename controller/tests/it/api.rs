//! The operations API (`/api/v1`, `/metrics`, health) of a real in-process node: every route ×
//! every role, each error class, audited writes, the OpenAPI document, Prometheus validity.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use controller::api::{Access, ROUTES};
use controller::config::Config;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::common::{batch, gate_key, register};
use crate::harness::SECRET;

pub const VIEWER: &str = "viewer-token-0001";
pub const OPERATOR: &str = "operator-token-0001";
pub const ENGINEER: &str = "engineer-token-0001";
pub const ENGINEER2: &str = "engineer-token-0002";
/// The station signing key's seed.
pub const SIGNING_SEED: [u8; 32] = [7; 32];

/// One controller node running in this process with its API on a port chosen at run time.
pub struct ApiNode {
    pub api: String,
    pub raft: String,
    pub http: reqwest::Client,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// Every token of the API tests: (name, role, token).
pub const TOKENS: [(&str, &str, &str); 4] = [
    ("vera", "viewer", VIEWER),
    ("otto", "operator", OPERATOR),
    ("emma", "engineer", ENGINEER),
    ("erik", "engineer", ENGINEER2),
];

pub fn sha(t: &str) -> String {
    hex::encode(Sha256::digest(t.as_bytes()))
}

impl ApiNode {
    /// A single-node cluster (bootstrapped unless `bootstrap` is false), ready when it returns.
    pub async fn start(bootstrap: bool) -> ApiNode {
        ApiNode::start_with(bootstrap, "").await
    }

    /// [`ApiNode::start`] with more `[api]` keys (`key = value` lines).
    pub async fn start_with(bootstrap: bool, api_extra: &str) -> ApiNode {
        let dir = tempfile::tempdir().unwrap();
        let raft_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let api_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let raft = raft_l.local_addr().unwrap().to_string();
        let api = api_l.local_addr().unwrap().to_string();
        std::fs::write(dir.path().join("signing.key"), hex::encode(SIGNING_SEED)).unwrap();
        let tokens: String = TOKENS
            .iter()
            .map(|(n, r, t)| {
                format!("[[api.tokens]]\nname = \"{n}\"\nrole = \"{r}\"\nsha256 = \"{}\"\n", sha(t))
            })
            .collect();
        let toml = format!(
            r#"node_id = 1
station = "s1"
data_dir = "{data}"
listen = "{raft}"
bootstrap = {bootstrap}
[[initial_members]]
id = 1
addr = "{raft}"
[raft]
heartbeat_ms = 50
election_timeout_min_ms = 200
election_timeout_max_ms = 400
[api]
station_code = 101
signing_key_file = "{key}"
signing_key_id = 3
blacklist_confirm_threshold = 100
max_body_bytes = 65536
{api_extra}
{tokens}"#,
            data = dir.path().join("data").display(),
            key = dir.path().join("signing.key").display(),
        );
        let mut cfg: Config = toml::from_str(&toml).unwrap();
        cfg.cluster_secret = SECRET.into();
        cfg.validate().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            controller::service::run_with_api(cfg, raft_l, Some(api_l), s).await.unwrap();
        });
        let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
        let node = ApiNode { api, raft, http, stop, task: Some(task), _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let want = if bootstrap { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            if let Ok(r) = node.http.get(format!("http://{}/readyz", node.api)).send().await {
                if r.status() == want {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "node not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        node
    }

    /// Sends a request with an optional token and JSON body; returns status and JSON (Null if none).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut rb = self.http.request(method, format!("http://{}{}", self.api, path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get(&self, path: &str, token: &str) -> Value {
        let (s, v) = self.call(Method::GET, path, Some(token), None).await;
        assert_eq!(s, StatusCode::OK, "GET {path}: {v}");
        v
    }

    /// Commits a request through the Raft/admin listener (as the gate ingest path would).
    pub async fn admin_write(&self, req: &controller::state::Request) {
        let r = self
            .http
            .post(format!("http://{}/admin/write", self.raft))
            .header("x-afc-cluster-secret", SECRET)
            .json(req)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

impl Drop for ApiNode {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Path parameters filled with values that name nothing.
fn concrete(path: &str) -> String {
    path.replace("{gate}", "no-such-gate")
        .replace("{kind}", "fare_table")
        .replace("{version}", "99")
        .replace("{id}", "99")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_gives_each_role_the_right_status() {
    let n = ApiNode::start(true).await;
    for r in ROUTES {
        let method = Method::from_bytes(r.method.as_bytes()).unwrap();
        let path = concrete(r.path);
        let body = (r.method != "GET").then(|| json!({}));
        // Allowed callers get past authentication: GETs answer 200 (404 when the path names
        // nothing), writes with an empty body answer 400 (no reason given).
        let allowed = if r.method != "GET" {
            StatusCode::BAD_REQUEST
        } else if r.path.contains('{') {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        };
        let cases: [(&str, Option<&str>, StatusCode); 5] = [
            ("no token", None, if r.access == Access::Public { allowed } else { StatusCode::UNAUTHORIZED }),
            ("wrong token", Some("not-a-token"), StatusCode::UNAUTHORIZED),
            (
                "viewer",
                Some(VIEWER),
                if Access::Viewer >= r.access { allowed } else { StatusCode::FORBIDDEN },
            ),
            (
                "operator",
                Some(OPERATOR),
                if Access::Operator >= r.access { allowed } else { StatusCode::FORBIDDEN },
            ),
            ("engineer", Some(ENGINEER), allowed),
        ];
        for (who, token, want) in cases {
            let (got, v) = n.call(method.clone(), &path, token, body.clone()).await;
            assert_eq!(got, want, "{} {} as {who}: {v}", r.method, r.path);
            if !got.is_success() && r.path != "/metrics" {
                assert!(
                    v["code"].is_string() && v["message"].is_string(),
                    "{} {path} as {who}: error body {v}",
                    r.method
                );
            }
        }
    }
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_error_class_has_its_status_and_code() {
    let n = ApiNode::start(true).await;
    let raw = |body: &'static str| {
        n.http
            .put(format!("http://{}/api/v1/mode", n.api))
            .bearer_auth(OPERATOR)
            .header("content-type", "application/json")
            .body(body)
    };
    let r = raw("{\"names\": [\"fare_fr").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "bad_request");

    let big = format!("{{\"reason\": \"{}\", \"bits\": 0}}", "x".repeat(100_000));
    let r = n
        .http
        .put(format!("http://{}/api/v1/mode", n.api))
        .bearer_auth(OPERATOR)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json::<Value>().await.unwrap()["code"], "payload_too_large");

    let (s, v) = n
        .call(
            Method::PUT,
            "/api/v1/mode",
            Some(OPERATOR),
            Some(json!({"names": ["warp_speed"], "reason": "x"})),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")));

    let (s, v) = n.call(Method::GET, "/api/v1/nothing-here", Some(VIEWER), None).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::NOT_FOUND, Some("no_route")));

    let (s, v) = n.call(Method::GET, "/api/v1/parameters/no_such_kind/1", Some(VIEWER), None).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));

    let (s, v) = n.call(Method::GET, "/api/v1/mode", Some("bogus"), None).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")));
    let (s, v) =
        n.call(Method::PUT, "/api/v1/mode", Some(VIEWER), Some(json!({"bits": 0, "reason": "x"}))).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")));

    let (s, v) = n
        .call(
            Method::POST,
            "/api/v1/parameters/blacklist",
            Some(ENGINEER),
            Some(json!({"delta": {"from_version": 5, "add": []}, "reason": "x"})),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")));
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_leader_is_not_ready_and_refuses_writes_with_503() {
    let n = ApiNode::start(false).await;
    let (s, v) = n.call(Method::GET, "/readyz", None, None).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("no_leader")));
    // Reads of the local state still answer.
    n.get("/api/v1/ledger/stats", VIEWER).await;
    let (s, v) =
        n.call(Method::PUT, "/api/v1/mode", Some(OPERATOR), Some(json!({"bits": 2, "reason": "test"}))).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("no_leader")), "{v}");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_changes_and_emergency_release_are_audited_with_who_and_why() {
    let n = ApiNode::start(true).await;
    let (s, v) = n
        .call(
            Method::PUT,
            "/api/v1/mode",
            Some(OPERATOR),
            Some(json!({"names": ["fare_free", "time_free"], "reason": "fare system fault"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let m = n.get("/api/v1/mode", VIEWER).await;
    assert_eq!(m["bits"], 0x00a);
    assert_eq!(m["emergency_release"], false);

    let (s, _) = n
        .call(
            Method::POST,
            "/api/v1/mode/emergency-release",
            Some(OPERATOR),
            Some(json!({"reason": "fire alarm"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "emergency release without confirmation");
    // Nor as a bit of the whole mode: PUT /mode leaves emergency release as it is.
    let (s, v) = n
        .call(
            Method::PUT,
            "/api/v1/mode",
            Some(OPERATOR),
            Some(json!({"names": ["fare_free", "time_free", "emergency_release"], "reason": "sneaky"})),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_parameters")), "{v}");
    assert_eq!(n.get("/api/v1/mode", VIEWER).await["emergency_release"], false);
    let (s, v) = n
        .call(
            Method::POST,
            "/api/v1/mode/emergency-release",
            Some(OPERATOR),
            Some(json!({"confirm": true, "reason": "fire alarm B exit"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let m = n.get("/api/v1/mode", VIEWER).await;
    assert_eq!(m["emergency_release"], true);
    assert_eq!(m["bits"], 0x08a);
    assert_eq!(m["history"].as_array().unwrap().len(), 2);

    let audit = n.get("/api/v1/audit", VIEWER).await;
    let lines: Vec<(String, String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["actor"].as_str().unwrap().into(),
                a["action"].as_str().unwrap().into(),
                a["detail"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!((lines[0].0.as_str(), lines[0].1.as_str()), ("otto", "mode.set"));
    assert!(lines[0].2.contains("fare system fault"));
    assert_eq!((lines[1].0.as_str(), lines[1].1.as_str()), ("otto", "mode.emergency_release.set"));
    assert!(lines[1].2.contains("fire alarm B exit"));
    assert!(audit[1]["at"].as_i64().unwrap() > 1_700_000_000_000);
    // Other bits change with emergency release kept; dropping it through PUT is refused.
    let (s, v) = n
        .call(
            Method::PUT,
            "/api/v1/mode",
            Some(OPERATOR),
            Some(json!({"bits": 0x082, "reason": "fares back"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = n
        .call(Method::PUT, "/api/v1/mode", Some(OPERATOR), Some(json!({"bits": 0x002, "reason": "oops"})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "emergency release cleared through PUT");
    let (s, v) = n
        .call(
            Method::PUT,
            "/api/v1/mode",
            Some(OPERATOR),
            Some(json!({"bits": 0x08a, "reason": "fault again"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_mode_sent_back_during_a_window_does_not_make_the_windows_bits_outlive_it() {
    let n = ApiNode::start(true).await;
    let put = |names: Value, reason: &str| json!({"names": names, "reason": reason});
    let (s, v) =
        n.call(Method::PUT, "/api/v1/mode", Some(OPERATOR), Some(put(json!(["time_free"]), "a"))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let from = controller::clock::now().0;
    let window =
        json!({"names": ["closed", "time_free"], "from": from, "until": from + 3_600_000, "reason": "works"});
    let (s, v) = n.call(Method::POST, "/api/v1/mode/schedule", Some(OPERATOR), Some(window)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(n.get("/api/v1/mode", VIEWER).await["bits"], 0x102, "the window's bits are in force");
    // The console sends the whole set it shows, with one bit more.
    let all = put(json!(["closed", "time_free", "fare_free"]), "b");
    let (s, v) = n.call(Method::PUT, "/api/v1/mode", Some(OPERATOR), Some(all)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["bits"], 0x00a, "closed is the window's, time_free the station's own too: {v}");
    let end = json!({"from": from, "reason": "works done"});
    let (s, v) = n.call(Method::POST, "/api/v1/mode/schedule/end", Some(OPERATOR), Some(end)).await;
    assert_eq!((s, v["bits"].as_u64()), (StatusCode::OK, Some(0x102)), "{v}");
    assert_eq!(n.get("/api/v1/mode", VIEWER).await["bits"], 0x00a, "only the station's own bits remain");
    n.stop().await;
}

pub fn small_network() -> Value {
    json!({
        "name": "test line",
        "stations": [
            {"code": 101, "id": "a", "name_zh": "甲", "name_en": "A"},
            {"code": 102, "id": "b", "name_zh": "乙", "name_en": "B"},
            {"code": 103, "id": "c", "name_zh": "丙", "name_en": "C"}
        ],
        "lines": [{"id": "1", "name": "Line 1", "stops": [
            {"station": "a", "m_from_prev": null}, {"station": "b", "m_from_prev": 5000}, {"station": "c", "m_from_prev": 9000}
        ]}]
    })
}

pub fn dalian_rule() -> Value {
    json!({
        "name": "Dalian 2024",
        "bands": [{"up_to_m": 6000, "fare_fen": 200}, {"up_to_m": 12000, "fare_fen": 300}, {"up_to_m": 18000, "fare_fen": 400}],
        "beyond": {"fen": 100, "per_m": 15000},
        "min_fare_fen": 200,
        "discounts": {"ordinary": 80, "student": 50},
        "token_percent": 100,
        "max_ride_minutes": null,
        "overstay_surcharge_fen": 0,
        "business_day": {"utc_offset_minutes": 480, "rollover_minute_of_day": 240}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fare_table_upload_is_compiled_signed_stored_and_audited() {
    let n = ApiNode::start(true).await;
    let body = json!({"network": small_network(), "fare_rule": dalian_rule(), "reason": "new fares 2025"});
    let (s, v) = n.call(Method::POST, "/api/v1/parameters/fare-table", Some(ENGINEER), Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["version"], 1);
    let list = n.get("/api/v1/parameters", VIEWER).await;
    let ft = list.as_array().unwrap().iter().find(|k| k["kind"] == "fare_table").unwrap();
    assert_eq!(ft["current"], 1);
    let shown = n.get("/api/v1/parameters/fare_table/1", VIEWER).await;
    assert_eq!(shown["key_id"], 3);
    let (s, _) = n.call(Method::GET, "/api/v1/parameters/fare_table/2", Some(VIEWER), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A network that does not compile is a 400 and stores nothing.
    let mut bad = small_network();
    bad["lines"][0]["stops"][1]["station"] = json!("nowhere");
    let (s, v) = n
        .call(
            Method::POST,
            "/api/v1/parameters/fare-table",
            Some(ENGINEER),
            Some(json!({"network": bad, "fare_rule": dalian_rule(), "reason": "x"})),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_parameters")), "{v}");
    let audit = n.get("/api/v1/audit", VIEWER).await;
    let actions: Vec<&str> =
        audit.as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["parameters.fare_table"]);
    assert_eq!(audit[0]["actor"], "emma");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_blacklist_insertion_waits_for_a_second_engineer() {
    let n = ApiNode::start(true).await;
    let full = json!({"full": [{"media": "svc", "first": 1_000_000, "last": 1_000_999}], "reason": "clearing list 42"});
    let (s, v) = n.call(Method::POST, "/api/v1/parameters/blacklist", Some(ENGINEER), Some(full)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["code"], "confirmation_required");
    let id = v["pending_id"].as_u64().unwrap();
    assert_eq!((id, v["added"].as_u64()), (1, Some(1000)), "{v}");
    // Stored, but held: its rollout request waits, so no gate is pointed at it.
    let rollouts = n.get("/api/v1/rollouts", VIEWER).await;
    assert_eq!(rollouts["requests"]["blacklist"]["confirmation"]["added"], 1000, "{rollouts}");
    assert!(rollouts["station_versions"]["blacklist"].is_null(), "nothing on gates: {rollouts}");

    let path = format!("/api/v1/parameters/blacklist/pending/{id}/confirm");
    let (s, v) = n.call(Method::POST, &path, Some(ENGINEER), Some(json!({"reason": "me again"}))).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::FORBIDDEN, Some("second_confirmer_required")));
    let (s, v) =
        n.call(Method::POST, &path, Some(ENGINEER2), Some(json!({"reason": "checked with clearing"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["version"], 1);
    let (s, _) = n.call(Method::POST, &path, Some(ENGINEER2), Some(json!({"reason": "twice"}))).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a confirmation is used once");

    // This node runs no rollout driver, so gates still hold nothing: a delta on v1 is judged by
    // the list it makes (1,001 ids added to nothing), and held again. One against an old version
    // is a conflict.
    let delta = json!({"delta": {"from_version": 1, "add": [{"media": "svc", "id": 5}], "remove": []}, "reason": "lost card"});
    let (s, v) =
        n.call(Method::POST, "/api/v1/parameters/blacklist", Some(ENGINEER), Some(delta.clone())).await;
    assert_eq!((s, v["added"].as_u64()), (StatusCode::ACCEPTED, Some(1001)), "{v}");
    assert_eq!(v["version"], 2);
    let (s, _) = n.call(Method::POST, "/api/v1/parameters/blacklist", Some(ENGINEER), Some(delta)).await;
    assert_eq!(s, StatusCode::CONFLICT);
    // A held request replaced by a newer one is no longer pending.
    let (s, _) = n.call(Method::POST, &path, Some(ENGINEER2), Some(json!({"reason": "late"}))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let audit = n.get("/api/v1/audit", VIEWER).await;
    let lines: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["actor"].as_str().unwrap().into(), a["action"].as_str().unwrap().into()))
        .collect();
    let want = [
        ("emma", "parameters.blacklist.held"),
        ("erik", "parameters.blacklist"),
        ("emma", "parameters.blacklist.held"),
    ];
    assert_eq!(lines, want.map(|(a, b)| (a.to_owned(), b.to_owned())));
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_mass_insertion_reaches_no_gate_when_a_small_delta_replaces_its_request_or_it_is_aborted() {
    let n = ApiNode::start(true).await;
    let upload = "/api/v1/parameters/blacklist";
    let full = json!({"full": [{"media": "svc", "first": 1_000_000, "last": 1_000_999}], "reason": "clearing list 42"});
    let (s, v) = n.call(Method::POST, upload, Some(ENGINEER), Some(full)).await;
    assert_eq!((s, v["version"].as_u64()), (StatusCode::ACCEPTED, Some(1)), "{v}");
    // A one-id delta on the held list brings the held list with it: judged by what gates hold.
    let delta =
        json!({"delta": {"from_version": 1, "add": [{"media": "svc", "id": 5}]}, "reason": "lost card"});
    let (s, v) = n.call(Method::POST, upload, Some(ENGINEER), Some(delta)).await;
    assert_eq!((s, v["added"].as_u64()), (StatusCode::ACCEPTED, Some(1001)), "{v}");
    let on_gates =
        || async { n.get("/api/v1/rollouts", VIEWER).await["station_versions"]["blacklist"].clone() };
    assert!(on_gates().await.is_null());
    // Dropping the held request leaves gates where they were, not on the latest stored version.
    let abort = "/api/v1/rollouts/blacklist/abort";
    let (s, v) = n.call(Method::POST, abort, Some(ENGINEER), Some(json!({"reason": "mine now"}))).await;
    assert_eq!((s, v["dropped_request"].as_bool()), (StatusCode::OK, Some(true)), "{v}");
    assert!(on_gates().await.is_null(), "the aborted mass insertion reached the gates");
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_of_a_mass_blacklist_insertion_waits_for_another_engineer_and_every_step_is_audited() {
    let n = ApiNode::start(true).await;
    let full = json!({"full": [{"media": "svc", "first": 1_000_000, "last": 1_000_999}], "reason": "clearing list 42"});
    let (s, v) = n.call(Method::POST, "/api/v1/parameters/blacklist", Some(ENGINEER), Some(full)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let path = format!("/api/v1/parameters/blacklist/pending/{}/confirm", v["pending_id"]);
    let (s, v) = n.call(Method::POST, &path, Some(ENGINEER2), Some(json!({"reason": "checked"}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rollout"], json!({"requested": true, "held_for_confirmation": false}), "{v}");
    let status = n.get("/api/v1/rollouts", VIEWER).await;
    let c = &status["requests"]["blacklist"]["confirmation"];
    assert_eq!(
        (c["requested_by"].as_str(), c["confirmed_by"].as_str()),
        (Some("emma"), Some("erik")),
        "{status}"
    );

    // Started again by hand: held until an engineer other than the starter confirms.
    let start = json!({"kind": "blacklist", "version": 1, "reason": "restart"});
    let (s, v) = n.call(Method::POST, "/api/v1/rollouts", Some(ENGINEER), Some(start)).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::ACCEPTED, Some("confirmation_required")), "{v}");
    let confirm = "/api/v1/rollouts/blacklist/confirm";
    let why = json!({"reason": "looked at it"});
    let (s, v) = n.call(Method::POST, confirm, Some(ENGINEER), Some(why.clone())).await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::FORBIDDEN, Some("second_confirmer_required")), "{v}");
    let (s, v) = n.call(Method::POST, confirm, Some(OPERATOR), Some(why.clone())).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "an operator may not confirm: {v}");
    let (s, v) = n.call(Method::POST, confirm, Some(ENGINEER2), Some(why.clone())).await;
    assert_eq!((s, &v), (StatusCode::OK, &json!({"kind": "blacklist", "version": 1})));
    let (s, v) = n.call(Method::POST, confirm, Some(ENGINEER2), Some(why.clone())).await;
    assert_eq!(s, StatusCode::CONFLICT, "confirmed once: {v}");

    // Bad input gets a clear error.
    let (s, v) = n
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(ENGINEER),
            Some(json!({"kind": "fare_table", "version": 9, "reason": "x"})),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{v}");
    let (s, v) = n
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(ENGINEER),
            Some(json!({"kind": "tariff", "version": 1, "reason": "x"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, _) =
        n.call(Method::POST, "/api/v1/rollouts", Some(ENGINEER), Some(json!({"kind": "blacklist"}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Abort drops the request not started yet; there is then nothing to abort.
    let abort = "/api/v1/rollouts/blacklist/abort";
    let (s, v) = n.call(Method::POST, abort, Some(ENGINEER), Some(json!({"reason": "wrong list"}))).await;
    assert_eq!((s, &v), (StatusCode::OK, &json!({"kind": "blacklist", "dropped_request": true})));
    let (s, v) = n.call(Method::POST, abort, Some(ENGINEER), Some(json!({"reason": "again"}))).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");

    let audit = n.get("/api/v1/audit", VIEWER).await;
    let actions: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["actor"].as_str().unwrap().into(), a["action"].as_str().unwrap().into()))
        .filter(|(_, a): &(String, String)| a.starts_with("rollouts."))
        .collect();
    let want = [
        ("emma", "rollouts.start"),
        ("emma", "rollouts.confirm"),
        ("erik", "rollouts.confirm"),
        ("erik", "rollouts.confirm"),
        ("emma", "rollouts.abort"),
        ("emma", "rollouts.abort"),
    ];
    assert_eq!(
        actions,
        want.map(|(a, b)| (a.to_owned(), b.to_owned())),
        "audit lines precede each write, refused or not"
    );
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_gates_and_clearing_show_what_gates_uploaded() {
    let n = ApiNode::start(true).await;
    let key = gate_key(1);
    n.admin_write(&register("g01", &key)).await;
    n.admin_write(&batch("g01", &key, 1..=5)).await;
    let entries = n.get("/api/v1/ledger?from=2&limit=2", VIEWER).await;
    assert_eq!(
        entries.as_array().unwrap().iter().map(|e| e["index"].as_u64().unwrap()).collect::<Vec<_>>(),
        [2, 3]
    );
    let stats = n.get("/api/v1/ledger/stats", VIEWER).await;
    assert_eq!((stats["last_index"].as_u64(), stats["clearing_backlog"].as_u64()), (Some(5), Some(5)));
    let verify = n.get("/api/v1/ledger/verify", VIEWER).await;
    assert_eq!((verify["ok"].as_bool(), verify["checked"].as_u64()), (Some(true), Some(5)), "{verify}");
    let clearing = n.get("/api/v1/clearing", VIEWER).await;
    assert_eq!(clearing["backlog"], 5);
    let gates = n.get("/api/v1/gates", VIEWER).await;
    assert_eq!(gates[0]["gate"], "g01");
    assert_eq!(gates[0]["registered"], true);
    assert_eq!(gates[0]["ledger_through_seq"], 5);
    let g = n.get("/api/v1/gates/g01", VIEWER).await;
    assert_eq!(g["hardware_profile"], "default");
    let c = n.get("/api/v1/cluster", VIEWER).await;
    assert_eq!((c["role"].as_str(), c["leader"].as_u64()), (Some("leader"), Some(1)));
    assert_eq!(c["commit_index"], c["last_log_index"]);
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_exactly_the_served_routes() {
    let n = ApiNode::start(true).await;
    let doc = n.get("/api/v1/openapi.json", VIEWER).await;
    assert_eq!(doc["openapi"], "3.1.0");
    let mut listed = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            listed.insert((method.to_uppercase(), path.clone()));
            assert!(op["x-required-role"].is_string());
            // Every listed operation is served: it never answers `no_route`.
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let (_, v) =
                n.call(m, &concrete(path), Some(ENGINEER), (method != "get").then(|| json!({}))).await;
            assert_ne!(v["code"], "no_route", "{method} {path}");
        }
    }
    let table: BTreeSet<(String, String)> =
        ROUTES.iter().map(|r| (r.method.to_owned(), r.path.to_owned())).collect();
    assert_eq!(listed, table);
    n.stop().await;
}

pub use afc_test_support::promtool::promtool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_check_metrics() {
    let n = ApiNode::start(true).await;
    let key = gate_key(2);
    n.admin_write(&register("g02", &key)).await;
    n.admin_write(&batch("g02", &key, 1..=3)).await;
    let r = n.http.get(format!("http://{}/metrics", n.api)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    for name in [
        "afc_raft_state{state=\"leader\"} 1",
        "afc_raft_term ",
        "afc_raft_commit_index ",
        "afc_raft_applied_index ",
        "afc_ledger_records_total 3",
        "afc_ledger_append_seconds_bucket",
        "afc_gates_online ",
        "afc_tx_ingested_total ",
        "afc_rollout_state{",
        "afc_clearing_backlog_records 3",
        "afc_clearing_last_success_timestamp_seconds ",
        "afc_mqtt_connected ",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    n.stop().await;
    let Some(promtool) = promtool() else { return };
    afc_test_support::promtool::check_metrics(&promtool, &text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_is_searched_by_time_gate_and_card_page_by_page() {
    let n = ApiNode::start(true).await;
    let (k1, k2) = (gate_key(1), gate_key(2));
    n.admin_write(&register("g01", &k1)).await;
    n.admin_write(&register("g02", &k2)).await;
    n.admin_write(&batch("g01", &k1, 1..=6)).await;
    n.admin_write(&batch("g02", &k2, 1..=4)).await;
    let seqs = |v: &Value| -> Vec<(String, u64)> {
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (e["record"]["gate"].as_str().unwrap().to_owned(), e["record"]["gate_seq"].as_u64().unwrap())
            })
            .collect()
    };
    // By gate, two per page: next_from continues where the last page stopped.
    let p1 = n.get("/api/v1/ledger/search?gate=g02&limit=2", VIEWER).await;
    assert_eq!(seqs(&p1), [("g02".to_owned(), 1), ("g02".to_owned(), 2)]);
    let next = p1["next_from"].as_u64().unwrap();
    let p2 = n.get(&format!("/api/v1/ledger/search?gate=g02&limit=2&from={next}"), VIEWER).await;
    assert_eq!(seqs(&p2), [("g02".to_owned(), 3), ("g02".to_owned(), 4)]);
    let next = p2["next_from"].as_u64().unwrap();
    let p3 = n.get(&format!("/api/v1/ledger/search?gate=g02&limit=2&from={next}"), VIEWER).await;
    assert_eq!((seqs(&p3).len(), p3["next_from"].is_null()), (0, true), "{p3}");

    // By time: record n occurred at 1_800_000_000 + n seconds (both gates); [t2, t4) holds 2 and 3.
    let t = |s: i64| (1_800_000_000 + s) * 1000;
    let v = n.get(&format!("/api/v1/ledger/search?since_ms={}&until_ms={}", t(2), t(4)), VIEWER).await;
    assert_eq!(
        seqs(&v),
        [("g01".to_owned(), 2), ("g01".to_owned(), 3), ("g02".to_owned(), 2), ("g02".to_owned(), 3)]
    );
    assert!(v["next_from"].is_null());

    // By card (record n carries card 31_000_000 + n), with media.
    let v = n.get("/api/v1/ledger/search?card=31000005&media=svc", VIEWER).await;
    assert_eq!(seqs(&v), [("g01".to_owned(), 5)]);
    let v = n.get("/api/v1/ledger/search?card=31000005&media=qr", VIEWER).await;
    assert_eq!(seqs(&v).len(), 0);

    // Bad input is a 400 with a code, never a panic.
    for bad in [
        format!("since_ms={}&until_ms={}", t(4), t(2)),
        "gate=no%20spaces%20allowed!".to_owned(),
        "media=paper".to_owned(),
        "card=-1".to_owned(),
        "colour=red".to_owned(),
    ] {
        let (s, v) = n.call(Method::GET, &format!("/api/v1/ledger/search?{bad}"), Some(VIEWER), None).await;
        assert_eq!((s, v["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "{bad}: {v}");
    }
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_is_filtered_by_actor_and_action_over_the_whole_log() {
    let n = ApiNode::start(true).await;
    let set = |token: &'static str, bits: u16| {
        let n = &n;
        async move {
            let body = json!({"bits": bits, "reason": format!("step {bits}")});
            let (s, v) = n.call(Method::PUT, "/api/v1/mode", Some(token), Some(body)).await;
            assert_eq!(s, StatusCode::OK, "{v}");
        }
    };
    set(OPERATOR, 1).await;
    set(ENGINEER, 2).await;
    set(OPERATOR, 4).await;
    set(ENGINEER, 8).await;
    set(OPERATOR, 16).await;
    let body = json!({"confirm": true, "reason": "drill"});
    let (s, v) = n.call(Method::POST, "/api/v1/mode/emergency-release", Some(ENGINEER), Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let details = |v: Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|a| {
                format!(
                    "{} {} {}",
                    a["actor"].as_str().unwrap(),
                    a["action"].as_str().unwrap(),
                    a["detail"].as_str().unwrap()
                )
            })
            .collect()
    };
    let emma = details(n.get("/api/v1/audit?actor=EMM", VIEWER).await);
    assert_eq!(emma.len(), 3, "{emma:?}");
    assert!(emma[0].starts_with("emma mode.set") && emma[0].ends_with("step 2"), "{emma:?}");
    assert!(emma[2].starts_with("emma mode.emergency_release.set"), "{emma:?}");
    let er = details(n.get("/api/v1/audit?action=emergency", VIEWER).await);
    assert_eq!(er.len(), 1, "{er:?}");
    // The latest two of otto's, oldest first; from the start, the first two.
    let latest = details(n.get("/api/v1/audit?actor=otto&action=mode.set&limit=2", VIEWER).await);
    assert!(
        latest[0].ends_with("step 4") && latest[1].ends_with("step 16") && latest.len() == 2,
        "{latest:?}"
    );
    let first = details(n.get("/api/v1/audit?actor=otto&from=1&limit=2", VIEWER).await);
    assert!(first[0].ends_with("step 1") && first[1].ends_with("step 4") && first.len() == 2, "{first:?}");
    assert_eq!(n.get("/api/v1/audit?actor=nobody", VIEWER).await, json!([]));
    // No filter: as before, the latest lines.
    assert_eq!(n.get("/api/v1/audit?limit=1", VIEWER).await.as_array().unwrap().len(), 1);
    n.stop().await;
}
