//! The station's first parameters, set through the operations API like an engineer would: the
//! Dalian fare table, a starting blacklist and the QR issuer key. Each is uploaded only while
//! the cluster holds no version of it, so a restarted station keeps what it has.

use std::time::{Duration, Instant};

use afc_domain::model::Timestamp;
use anyhow::Context as _;
use ed25519_dalek::SigningKey;
use serde_json::{json, Value};

use crate::plan::{Plan, NODES};

/// The real Dalian Metro network and its fare rule (see deploy/data/PROVENANCE.md).
pub const DALIAN_NETWORK: &str = include_str!("../../deploy/data/dalian-network.json");
pub const DALIAN_FARE_RULE: &str = include_str!("../../deploy/data/dalian-fare-rule.json");

/// Simulated cards (see `gate_agent::reader_sim`) on the starting blacklist, so the traffic
/// shows blacklist refusals.
pub const BLACKLISTED_CARDS: [usize; 3] = [13, 77, 512];

/// An HTTP client of the station's API that tries every node.
pub struct Api {
    http: reqwest::Client,
    bases: Vec<String>,
    token: String,
}

impl Api {
    pub fn new(plan: &Plan, token: &str) -> anyhow::Result<Api> {
        Ok(Api {
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?,
            bases: (1..=NODES).map(|id| format!("http://{}", plan.api(id))).collect(),
            token: token.to_owned(),
        })
    }

    /// Waits until some node answers `/readyz` (it knows a leader); returns that node's base URL.
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            for base in &self.bases {
                let ok =
                    self.http.get(format!("{base}/readyz")).send().await.map(|r| r.status().is_success());
                if ok.unwrap_or(false) {
                    return Ok(base.clone());
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "no controller knew a leader within {within:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let base = self.wait_ready(Duration::from_secs(60)).await?;
        let resp = self.http.get(format!("{base}{path}")).bearer_auth(&self.token).send().await?;
        let status = resp.status();
        let body: Value = resp.json().await.with_context(|| format!("GET {path}: {status}"))?;
        anyhow::ensure!(status.is_success(), "GET {path}: {status} {body}");
        Ok(body)
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let base = self.wait_ready(Duration::from_secs(60)).await?;
        let resp = self.http.post(format!("{base}{path}")).bearer_auth(&self.token).json(body).send().await?;
        let status = resp.status();
        let answer: Value = resp.json().await.with_context(|| format!("POST {path}: {status}"))?;
        anyhow::ensure!(status.is_success(), "POST {path}: {status} {answer}");
        Ok(answer)
    }
}

/// The current version of each parameter kind, by kind name.
pub async fn current_versions(api: &Api) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let list = api.get("/api/v1/parameters").await?;
    let mut out = std::collections::BTreeMap::new();
    for k in list.as_array().context("parameters: not a list")? {
        let kind = k.get("kind").and_then(Value::as_str).context("parameters: no kind")?;
        let current = k.get("current").and_then(Value::as_u64).unwrap_or(0);
        out.insert(kind.to_owned(), current);
    }
    Ok(out)
}

/// Uploads whatever of the starting parameters the cluster does not hold yet.
pub async fn first_parameters(api: &Api, qr_issuer: &SigningKey) -> anyhow::Result<Vec<String>> {
    let versions = current_versions(api).await?;
    let mut done = Vec::new();
    if versions.get("fare_table").copied().unwrap_or(0) == 0 {
        let body = json!({
            "network": serde_json::from_str::<Value>(DALIAN_NETWORK)?,
            "fare_rule": serde_json::from_str::<Value>(DALIAN_FARE_RULE)?,
            "reason": "local station: the Dalian Metro network and fare rule",
        });
        api.post("/api/v1/parameters/fare-table", &body).await?;
        done.push("fare table (Dalian Metro)".to_owned());
    }
    if versions.get("blacklist").copied().unwrap_or(0) == 0 {
        let cards: Vec<Value> = BLACKLISTED_CARDS
            .iter()
            .map(|i| json!({"media": "svc", "id": gate_agent::reader_sim::CARD_BASE + *i as u64 * 7 + 1}))
            .collect();
        let body = json!({"full": cards, "reason": "local station: reported lost cards"});
        api.post("/api/v1/parameters/blacklist", &body).await?;
        done.push(format!("blacklist ({} cards)", cards.len()));
    }
    if versions.get("qr_keys").copied().unwrap_or(0) == 0 {
        let now: Timestamp = gate_agent::gate::now();
        let year_ms = 365 * 24 * 3600 * 1000;
        let body = json!({
            "keys": [{
                "issuer": 1, "key_id": 1,
                "public_key": hex::encode(qr_issuer.verifying_key().to_bytes()),
                "valid_from": now.0 - 24 * 3600 * 1000, "valid_to": now.0 + year_ms,
            }],
            "reason": "local station: the simulated QR issuer's key",
        });
        api.post("/api/v1/parameters/qr-keys", &body).await?;
        done.push("QR issuer key".to_owned());
    }
    Ok(done)
}
