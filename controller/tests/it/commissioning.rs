//! Gate commissioning through `/api/v1` (issue 11 item 5): an engineer registers, re-keys and
//! decommissions a gate; each is audited with who and why and listed in the OpenAPI document with
//! its role; an operator or viewer is refused (and leaves no audit line); a replaced key no
//! longer verifies the gate's batches, a decommissioned gate's batches are refused, and a gate
//! registered again keeps its ledger progress (its old gate_seqs stay duplicates).

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::api::{ApiNode, ENGINEER, OPERATOR, VIEWER};
use crate::common::{batch, gate_key};
use crate::harness::SECRET;

fn key_hex(n: u8) -> String {
    hex::encode(gate_key(n).verifying_key().to_bytes())
}

/// What the state machine answered to a batch of `seqs` signed with key `key_n` (through the
/// Raft/admin listener, as ingest proposes it).
async fn send_batch(n: &ApiNode, key_n: u8, seqs: std::ops::RangeInclusive<u64>) -> Value {
    let r = n
        .http
        .post(format!("http://{}/admin/write", n.raft))
        .header("x-afc-cluster-secret", SECRET)
        .json(&batch("g07", &gate_key(key_n), seqs))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    r.json().await.unwrap()
}

async fn gate_actions(n: &ApiNode) -> Vec<Value> {
    let audit = n.get("/api/v1/audit?from=1&limit=1000", VIEWER).await;
    audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["action"].as_str().unwrap().starts_with("gate."))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engineer_registers_rekeys_and_decommissions_a_gate_audited_and_the_old_key_stops_verifying() {
    let n = ApiNode::start(true).await;
    let register = |key: u8, why: &str| json!({ "gate": "g07", "tx_public_key": key_hex(key), "hardware_profile": "fast-flap", "reason": why });

    // Roles: neither a viewer nor an operator commissions anything, and nothing is audited.
    for token in [VIEWER, OPERATOR] {
        let (s, v) = n.call(Method::POST, "/api/v1/gates", Some(token), Some(register(7, "try"))).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
        let (s, _) = n
            .call(
                Method::PUT,
                "/api/v1/gates/g07/key",
                Some(token),
                Some(json!({"tx_public_key": key_hex(8), "reason": "x"})),
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let (s, _) = n
            .call(Method::POST, "/api/v1/gates/g07/decommission", Some(token), Some(json!({"reason": "x"})))
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN);
    }
    let (s, _) = n.call(Method::POST, "/api/v1/gates", None, Some(register(7, "try"))).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(gate_actions(&n).await.is_empty());
    let (s, v) = n
        .call(
            Method::POST,
            "/api/v1/gates",
            Some(ENGINEER),
            Some(json!({"gate": "g07", "tx_public_key": "abcd", "reason": "r"})),
        )
        .await;
    assert_eq!((s, v["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "{v}");

    // Register: the gate's batches verify with its key.
    let (s, v) =
        n.call(Method::POST, "/api/v1/gates", Some(ENGINEER), Some(register(7, "new gate at exit B"))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = n.call(Method::POST, "/api/v1/gates", Some(ENGINEER), Some(register(9, "again"))).await;
    assert_eq!(s, StatusCode::CONFLICT, "registering a registered gate again must be a key replacement: {v}");
    let r = send_batch(&n, 7, 1..=5).await;
    assert_eq!((r["result"].as_str(), r["appended"].as_u64()), (Some("appended"), Some(5)), "{r}");
    let g = n.get("/api/v1/gates/g07", VIEWER).await;
    assert_eq!((g["registered"].as_bool(), g["hardware_profile"].as_str()), (Some(true), Some("fast-flap")));
    assert_eq!(g["tx_public_key"], key_hex(7));

    // Replace the key: the old one no longer verifies, the new one does.
    let rekey = |key: u8| json!({ "tx_public_key": key_hex(key), "reason": "reader board replaced" });
    let (s, _) = n.call(Method::PUT, "/api/v1/gates/g07/key", Some(ENGINEER), Some(rekey(7))).await;
    assert_eq!(s, StatusCode::CONFLICT, "the same key is no replacement");
    let (s, _) = n.call(Method::PUT, "/api/v1/gates/g99/key", Some(ENGINEER), Some(rekey(8))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = n.call(Method::PUT, "/api/v1/gates/g07/key", Some(ENGINEER), Some(rekey(8))).await;
    assert_eq!((s, v["key_replaced"].as_bool()), (StatusCode::OK, Some(true)), "{v}");
    let old = send_batch(&n, 7, 6..=10).await;
    assert_eq!(
        (old["result"].as_str(), old["rejection"]["code"].as_str()),
        (Some("rejected"), Some("bad_signature")),
        "{old}"
    );
    let new = send_batch(&n, 8, 6..=10).await;
    assert_eq!(new["appended"], 5, "{new}");
    assert_eq!(
        n.get("/api/v1/gates/g07", VIEWER).await["hardware_profile"],
        "fast-flap",
        "the profile is kept"
    );

    // Decommission: nothing from the gate is taken any more.
    let (s, v) = n
        .call(
            Method::POST,
            "/api/v1/gates/g07/decommission",
            Some(ENGINEER),
            Some(json!({"reason": "gate removed for refit"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = n
        .call(
            Method::POST,
            "/api/v1/gates/g07/decommission",
            Some(ENGINEER),
            Some(json!({"reason": "twice"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = n.call(Method::PUT, "/api/v1/gates/g07/key", Some(ENGINEER), Some(rekey(9))).await;
    assert_eq!(s, StatusCode::CONFLICT, "a decommissioned gate is registered again, not re-keyed");
    let gone = send_batch(&n, 8, 11..=15).await;
    assert_eq!(gone["rejection"]["code"], "gate_decommissioned", "{gone}");
    let g = n.get("/api/v1/gates/g07", VIEWER).await;
    assert_eq!((g["registered"].as_bool(), g["decommissioned"].as_bool()), (Some(false), Some(true)), "{g}");

    // Registered again (new hardware, new key): its old seqs are still known, new ones append.
    let (s, v) = n.call(Method::POST, "/api/v1/gates", Some(ENGINEER), Some(register(9, "refit done"))).await;
    assert_eq!((s, v["recommissioned"].as_bool()), (StatusCode::OK, Some(true)), "{v}");
    let resent = send_batch(&n, 9, 1..=10).await;
    assert_eq!((resent["appended"].as_u64(), resent["duplicates"].as_u64()), (Some(0), Some(10)), "{resent}");
    assert_eq!(send_batch(&n, 9, 11..=12).await["appended"], 2);

    // Every change is audited, by the engineer, with the reason; the refusals left nothing.
    let lines = gate_actions(&n).await;
    let summary: Vec<(&str, &str)> =
        lines.iter().map(|a| (a["action"].as_str().unwrap(), a["actor"].as_str().unwrap())).collect();
    assert_eq!(
        summary,
        [
            ("gate.register", "emma"),
            ("gate.replace_key", "emma"),
            ("gate.decommission", "emma"),
            ("gate.register", "emma")
        ]
    );
    let details: Vec<&str> = lines.iter().map(|a| a["detail"].as_str().unwrap()).collect();
    for (d, why) in details.iter().zip([
        "new gate at exit B",
        "reader board replaced",
        "gate removed for refit",
        "refit done",
    ]) {
        assert!(d.contains("g07") && d.contains(why), "{d}");
    }
    assert!(
        details[1].contains(&key_hex(7)[..16]) && details[1].contains(&key_hex(8)[..16]),
        "{}",
        details[1]
    );
    assert!(details[3].contains("recommissioned"), "{}", details[3]);

    // In the OpenAPI document, with their role and as audited writes.
    let doc = n.get("/api/v1/openapi.json", VIEWER).await;
    for (path, method) in [
        ("/api/v1/gates", "post"),
        ("/api/v1/gates/{gate}/key", "put"),
        ("/api/v1/gates/{gate}/decommission", "post"),
    ] {
        let op = &doc["paths"][path][method];
        assert_eq!(
            (op["x-required-role"].as_str(), op["x-audited"].as_bool()),
            (Some("engineer"), Some(true)),
            "{path}: {op}"
        );
    }
    n.stop().await;
}
