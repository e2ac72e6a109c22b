//! The OpenAPI document against the real API: every route of `ROUTES` is called (successes with
//! real data and valid bodies, and errors: no token, a low role, unknown names, bad bodies and
//! queries, conflicts, an oversized body), and each answer's status must be listed for its
//! operation and its body must validate against the schema listed for that status and media type.
//!
//! The validator below supports what utoipa emits (JSON Schema of OpenAPI 3.1): `$ref` into the
//! document, `type` (a name or a list, with `null`), `properties`, `required`,
//! `additionalProperties`, `propertyNames`, `items`, `minItems`/`maxItems`, `oneOf`, `anyOf`,
//! `allOf`, `enum`, `const`, `minimum`, and OpenAPI 3.0's `nullable`; `format` and annotations are
//! ignored. `integer` means a JSON number without a fraction.

use std::collections::{BTreeMap, BTreeSet};

use controller::api::ROUTES;
use ed25519_dalek::SigningKey;
use reqwest::Method;
use serde_json::{json, Value};

use crate::api::{dalian_rule, small_network, ApiNode, ENGINEER, ENGINEER2, OPERATOR, VIEWER};
use afc_domain::ledger::{sign_batch_covering, Installation, QrRef};
use controller::state::Request;

use crate::common::{batch, gate_key, ident, record, register};

// ---------------------------------------------------------------------------------------------
// A small JSON-Schema validator
// ---------------------------------------------------------------------------------------------

/// Resolves a local `$ref` (`#/components/schemas/X`) in `doc`.
fn resolve<'a>(doc: &'a Value, r: &str) -> Option<&'a Value> {
    let pointer = r.strip_prefix('#')?;
    doc.pointer(pointer)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn has_type(v: &Value, t: &str) -> bool {
    match t {
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        other => type_name(v) == other,
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!("{}…", &s[..s.char_indices().nth(80).map_or(s.len(), |(i, _)| i)])
    } else {
        s
    }
}

/// The fields an object schema declares (its `properties` and those of its `allOf` members,
/// following `$ref`s), or None when it allows others (`additionalProperties`) or declares none.
fn declared_fields(doc: &Value, schema: &Value) -> Option<BTreeSet<String>> {
    let s = schema.as_object()?;
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        return declared_fields(doc, resolve(doc, r)?);
    }
    if s.get("additionalProperties").is_some_and(|a| a != &Value::Bool(false)) {
        return None;
    }
    let mut out: BTreeSet<String> = s
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    let all = s.get("allOf").and_then(Value::as_array);
    for sub in all.into_iter().flatten() {
        // A member that is no object schema (a bare `{}`) adds nothing.
        if sub.get("properties").is_some() || sub.get("$ref").is_some() || sub.get("allOf").is_some() {
            out.extend(declared_fields(doc, sub)?);
        }
    }
    (s.contains_key("properties") || all.is_some()).then_some(out)
}

/// Validates `v` (at JSON path `at`) against `schema`, resolving `$ref`s in `doc`; pushes one
/// message per violation, each naming the JSON path.
///
/// `closed`: an object may carry only the fields its schema declares, even where JSON Schema
/// would allow more (no `additionalProperties`): the API's answers must be documented field by
/// field, so a field renamed or added without the document is caught.
pub fn validate(doc: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    check(doc, schema, v, at, errs, true)
}

fn check(doc: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>, closed: bool) {
    let Some(s) = schema.as_object() else {
        // `true` accepts everything, `false` nothing.
        if schema == &Value::Bool(false) {
            errs.push(format!("{at}: no value is allowed here, got {}", short(v)));
        }
        return;
    };
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        match resolve(doc, r) {
            Some(target) => check(doc, target, v, at, errs, closed),
            None => errs.push(format!("{at}: $ref {r} does not resolve")),
        }
    }
    if v.is_null() && s.get("nullable") == Some(&Value::Bool(true)) {
        return;
    }
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !types.iter().any(|t| has_type(v, t)) {
            errs.push(format!("{at}: expected {}, got {} {}", types.join(" or "), type_name(v), short(v)));
            return;
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errs.push(format!("{at}: {} is not one of {}", short(v), short(&Value::Array(e.clone()))));
        }
    }
    if let Some(c) = s.get("const") {
        if c != v {
            errs.push(format!("{at}: expected {}, got {}", short(c), short(v)));
        }
    }
    if let (Some(min), Some(x)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if x < min {
            errs.push(format!("{at}: {x} is below the minimum {min}"));
        }
    }
    if let Some(all) = s.get("allOf").and_then(Value::as_array) {
        // Each member sees only part of the object: the union of their fields is checked below.
        for sub in all {
            check(doc, sub, v, at, errs, false);
        }
    }
    for (key, exactly_one) in [("oneOf", true), ("anyOf", false)] {
        if let Some(alts) = s.get(key).and_then(Value::as_array) {
            let results: Vec<Vec<String>> = alts
                .iter()
                .map(|sub| {
                    let mut e = Vec::new();
                    check(doc, sub, v, at, &mut e, closed);
                    e
                })
                .collect();
            let ok = results.iter().filter(|e| e.is_empty()).count();
            if ok == 0 {
                let why: Vec<String> = results.into_iter().flatten().collect();
                errs.push(format!("{at}: matches none of {key} ({})", why.join("; ")));
            } else if exactly_one && ok > 1 {
                errs.push(format!("{at}: matches {ok} branches of oneOf, not exactly one: {}", short(v)));
            }
        }
    }
    if let Value::Object(m) = v {
        let props = s.get("properties").and_then(Value::as_object);
        if let Some(req) = s.get("required").and_then(Value::as_array) {
            for r in req.iter().filter_map(Value::as_str) {
                if !m.contains_key(r) {
                    errs.push(format!("{at}: required field {r:?} is missing"));
                }
            }
        }
        let declared = if closed && !s.contains_key("$ref") { declared_fields(doc, schema) } else { None };
        for (k, x) in m {
            let sub_at = format!("{at}.{k}");
            if declared.as_ref().is_some_and(|d| !d.contains(k)) && s.get("additionalProperties").is_none() {
                errs.push(format!("{at}: field {k:?} is not in the documented schema"));
            }
            if let Some(names) = s.get("propertyNames") {
                validate(doc, names, &Value::String(k.clone()), &format!("{at} (key {k:?})"), errs);
            }
            match (props.and_then(|p| p.get(k)), s.get("additionalProperties")) {
                (Some(p), _) => validate(doc, p, x, &sub_at, errs),
                (None, Some(Value::Bool(false))) => errs.push(format!("{at}: unexpected field {k:?}")),
                (None, Some(extra)) => validate(doc, extra, x, &sub_at, errs),
                (None, None) => {}
            }
        }
    }
    if let Value::Array(items) = v {
        if let Some(n) = s.get("minItems").and_then(Value::as_u64) {
            if (items.len() as u64) < n {
                errs.push(format!("{at}: {} items, at least {n} expected", items.len()));
            }
        }
        if let Some(n) = s.get("maxItems").and_then(Value::as_u64) {
            if items.len() as u64 > n {
                errs.push(format!("{at}: {} items, at most {n} expected", items.len()));
            }
        }
        if let Some(item) = s.get("items") {
            for (i, x) in items.iter().enumerate() {
                validate(doc, item, x, &format!("{at}[{i}]"), errs);
            }
        }
    }
}

fn errors_of(doc: &Value, schema: &Value, v: &Value) -> Vec<String> {
    let mut e = Vec::new();
    validate(doc, schema, v, "$", &mut e);
    e
}

#[test]
fn the_validator_refuses_a_missing_field_a_wrong_type_and_an_unlisted_branch() {
    let doc = json!({ "components": { "schemas": {
        "Point": { "type": "object", "required": ["x", "y"], "additionalProperties": false,
                   "properties": { "x": { "type": "integer" }, "y": { "type": ["integer", "null"] } } },
        "Shape": { "oneOf": [
            { "type": "object", "required": ["kind"], "properties": { "kind": { "enum": ["dot"] }, "at": { "$ref": "#/components/schemas/Point" } } },
            { "type": "object", "required": ["kind"], "properties": { "kind": { "enum": ["line"] } } }
        ] },
        "Shapes": { "type": "array", "items": { "$ref": "#/components/schemas/Shape" } }
    } } });
    let point = json!({ "$ref": "#/components/schemas/Point" });
    let shapes = json!({ "$ref": "#/components/schemas/Shapes" });
    assert_eq!(errors_of(&doc, &point, &json!({ "x": 1, "y": null })), Vec::<String>::new());
    assert_eq!(errors_of(&doc, &point, &json!({ "x": 1 })), ["$: required field \"y\" is missing"]);
    assert_eq!(
        errors_of(&doc, &point, &json!({ "x": 1.5, "y": 2 })),
        ["$.x: expected integer, got number 1.5"]
    );
    assert_eq!(
        errors_of(&doc, &point, &json!({ "x": "1", "y": 2 })),
        ["$.x: expected integer, got string \"1\""]
    );
    assert_eq!(errors_of(&doc, &point, &json!({ "x": 1, "y": 2, "z": 3 })), ["$: unexpected field \"z\""]);
    assert_eq!(errors_of(&doc, &point, &json!(null)), ["$: expected object, got null null"]);
    assert!(errors_of(
        &doc,
        &shapes,
        &json!([{ "kind": "dot", "at": { "x": 0, "y": 0 } }, { "kind": "line" }])
    )
    .is_empty());
    let e = errors_of(
        &doc,
        &shapes,
        &json!([{ "kind": "line" }, { "kind": "dot", "at": { "x": true, "y": 0 } }]),
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("$[1]: matches none of oneOf") && e[0].contains("$[1].at.x: expected integer"),
        "{e:?}"
    );
    assert_eq!(
        errors_of(&doc, &json!({ "type": "string", "nullable": true }), &json!(null)),
        Vec::<String>::new()
    );
    assert_eq!(errors_of(&doc, &json!({ "$ref": "#/components/schemas/Nope" }), &json!(1)).len(), 1);
    // Closed objects: an answer's fields must all be documented; `allOf` members add up.
    let named = json!({ "allOf": [
        { "$ref": "#/components/schemas/Point" },
        { "type": "object", "properties": { "name": { "type": "string" } } }
    ] });
    let pointless = json!({ "type": "object", "properties": { "name": { "type": "string" } } });
    assert!(errors_of(&doc, &pointless, &json!({ "name": "a" })).is_empty());
    assert_eq!(
        errors_of(&doc, &pointless, &json!({ "nome": "a" })),
        ["$: field \"nome\" is not in the documented schema"]
    );
    let map = json!({ "type": "object", "additionalProperties": { "type": "integer" } });
    assert!(errors_of(&doc, &map, &json!({ "a": 1, "b": 2 })).is_empty());
    assert_eq!(errors_of(&doc, &map, &json!({ "a": "1" })), ["$.a: expected integer, got string \"1\""]);
    let mut doc = doc;
    doc["components"]["schemas"]["Point"].as_object_mut().unwrap().remove("additionalProperties");
    assert!(errors_of(&doc, &named, &json!({ "x": 1, "y": 2, "name": "p" })).is_empty());
    assert_eq!(
        errors_of(&doc, &named, &json!({ "x": 1, "y": 2, "z": 0 })),
        ["$: field \"z\" is not in the documented schema"]
    );
}

// ---------------------------------------------------------------------------------------------
// Calling every route
// ---------------------------------------------------------------------------------------------

/// Calls routes, checks each answer against the document, and remembers what it saw.
struct Checker<'a> {
    n: &'a ApiNode,
    doc: Value,
    /// (method, path template) → statuses seen and validated.
    seen: BTreeMap<(String, String), BTreeSet<u16>>,
    failures: Vec<String>,
}

impl Checker<'_> {
    /// Sends `method path` (a concrete path of the route `template`) and validates the answer.
    async fn call(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self.n.http.request(m, format!("http://{}{}", self.n.api, path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = &body {
            rb = rb.json(b);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let ctype = r.headers().get("content-type").and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
        let text = r.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        self.check(method, template, path, status, &ctype, &value);
        if let Some(b) = &body {
            self.check_request(method, template, path, status, b, &value);
        }
        (status, value)
    }

    /// The request body against the documented one: a body the API took (2xx) must validate; a
    /// body serde refused (400 with a JSON deserialize error) must not.
    fn check_request(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        status: u16,
        body: &Value,
        answer: &Value,
    ) {
        let schema = &self.doc["paths"][template][method.to_lowercase()]["requestBody"]["content"]
            ["application/json"]["schema"];
        let refused_by_serde =
            status == 400 && answer["message"].as_str().is_some_and(|m| m.contains("Json deserialize error"));
        if !(200..300).contains(&status) && !refused_by_serde {
            return;
        }
        if schema.is_null() {
            self.failures.push(format!("{method} {template} takes a body the document does not describe"));
            return;
        }
        let errs = errors_of(&self.doc, schema, body);
        if (200..300).contains(&status) && !errs.is_empty() {
            self.failures.push(format!(
                "{method} {path} → {status}: the request body it took does not match the documented one:\n    {}",
                errs.join("\n    ")
            ));
        }
        if refused_by_serde && errs.is_empty() {
            self.failures.push(format!(
                "{method} {path} → 400 ({}): the documented request schema accepts {}",
                answer["message"],
                short(body)
            ));
        }
    }

    /// [`Checker::call`] with a raw body (malformed or oversized JSON).
    async fn call_raw(&mut self, method: &str, template: &str, token: &str, body: String) -> (u16, Value) {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let r = self
            .n
            .http
            .request(m, format!("http://{}{}", self.n.api, template))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let ctype = r.headers().get("content-type").and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
        let value = serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null);
        self.check(method, template, template, status, &ctype, &value);
        (status, value)
    }

    fn check(&mut self, method: &str, template: &str, path: &str, status: u16, ctype: &str, v: &Value) {
        let what = format!("{method} {path} → {status}");
        let op = &self.doc["paths"][template][method.to_lowercase()];
        if !op.is_object() {
            self.failures.push(format!("{method} {template} is not in the document"));
            return;
        }
        let mut resp = &op["responses"][status.to_string()];
        if !resp.is_object() {
            let listed: Vec<&String> =
                op["responses"].as_object().map(|m| m.keys().collect()).unwrap_or_default();
            self.failures.push(format!(
                "{what}: status {status} is not documented (listed: {listed:?}): {}",
                short(v)
            ));
            return;
        }
        if let Some(r) = resp["$ref"].as_str() {
            resp = resolve(&self.doc, r).unwrap_or(&Value::Null);
        }
        let content = resp["content"].as_object();
        let essence = |t: &str| t.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        let media = content.and_then(|c| {
            c.get(ctype).or_else(|| c.iter().find(|(k, _)| essence(k) == essence(ctype)).map(|(_, m)| m))
        });
        let Some(media) = media else {
            let listed: Vec<&String> = content.map(|m| m.keys().collect()).unwrap_or_default();
            self.failures
                .push(format!("{what}: content type {ctype:?} is not documented (listed: {listed:?})"));
            return;
        };
        let errs = errors_of(&self.doc, &media["schema"], v);
        if !errs.is_empty() {
            self.failures.push(format!(
                "{what}: the body does not match the documented schema:\n    {}",
                errs.join("\n    ")
            ));
        }
        self.seen.entry((method.to_owned(), template.to_owned())).or_default().insert(status);
    }
}

/// A signed batch of `g03` records (of one installation, QR taps) covering `covers_from..`, with
/// `edit` applied to each record.
fn g03_batch(
    key: &SigningKey,
    covers_from: u64,
    seqs: &[u64],
    edit: impl Fn(&mut afc_domain::ledger::TxRecord),
) -> Request {
    let records: Vec<_> = seqs
        .iter()
        .map(|s| {
            let mut r = record("s1", "g03", *s);
            r.installation = Some(Installation([3; 16]));
            r.media = afc_domain::model::Media::Qr;
            r.qr = Some(QrRef { issuer: 1, nonce: *s });
            r.balance_before = None;
            r.balance_after = None;
            edit(&mut r);
            r
        })
        .collect();
    let sig = sign_batch_covering(&ident("s1"), &ident("g03"), Some(covers_from), &records, key);
    Request::AppendTxBatch {
        station: ident("s1"),
        gate: ident("g03"),
        records: records.into_iter().map(afc_domain::ledger::CanonicalRecord::from).collect(),
        signature: hex::encode(sig),
        covers_from: Some(covers_from),
    }
}

fn key_hex(k: &SigningKey) -> String {
    hex::encode(k.verifying_key().to_bytes())
}

/// Path parameters filled with values that name nothing.
fn nothing(path: &str) -> String {
    path.replace("{gate}", "no-such-gate")
        .replace("{kind}", "fare_table")
        .replace("{version}", "99")
        .replace("{id}", "99")
        .replace("{day}", "2001-01-01")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_as_the_openapi_document_says() {
    let n = ApiNode::start(true).await;
    let doc = n.get("/api/v1/openapi.json", VIEWER).await;
    assert_eq!(doc["openapi"], "3.1.0");
    let mut c = Checker { n: &n, doc, seen: BTreeMap::new(), failures: Vec::new() };

    // Every route is in the document, with the success statuses its row names.
    for r in ROUTES {
        let op = &c.doc["paths"][r.path][r.method.to_lowercase()];
        assert!(op.is_object(), "{} {} is not in the document", r.method, r.path);
        for (status, _) in r.responses {
            assert!(
                op["responses"][status.to_string()]["content"].is_object(),
                "{} {} {status}",
                r.method,
                r.path
            );
        }
    }

    // Real data: a gate with ledger entries, a mode change, uploads (each with audit lines).
    let g2 = gate_key(2);
    n.admin_write(&register("g02", &g2)).await;
    n.admin_write(&batch("g02", &g2, 1..=3)).await;
    // g03 (records with an installation and a QR reference): a gap (2..=3 never reached the
    // ledger) and a conflict (seq 4 again with other content).
    let g3 = gate_key(3);
    n.admin_write(&register("g03", &g3)).await;
    n.admin_write(&g03_batch(&g3, 1, &[1, 4], |_| {})).await;
    n.admin_write(&g03_batch(&g3, 4, &[4], |r| r.fare_fen = 999)).await;

    // Every route, with no token, a wrong token, each role that may not call it, and names or
    // bodies that are wrong.
    for r in ROUTES {
        let path = nothing(r.path);
        let body = (r.method != "GET").then(|| json!({}));
        for token in [None, Some("not-a-token"), Some(VIEWER), Some(OPERATOR), Some(ENGINEER)] {
            c.call(r.method, r.path, &path, token, body.clone()).await;
        }
        if r.method != "GET" {
            c.call(r.method, r.path, &path, Some(ENGINEER), Some(json!({"reason": "x", "no_such_field": 1})))
                .await;
            c.call(r.method, r.path, &path, Some(ENGINEER), Some(json!([1, 2]))).await;
        }
    }

    // Health, console, metrics, the document.
    for p in [
        "/",
        "/console.js",
        "/i18n.js",
        "/console.css",
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/openapi.json",
        "/api/v1/cluster",
    ] {
        c.call("GET", p, p, Some(VIEWER), None).await;
    }

    // The flow over g02's and g03's records (their gate times lie outside the window: zeros), and
    // windows it refuses.
    let flow = "/api/v1/flow";
    let (s, v) = c.call("GET", flow, "/api/v1/flow?minutes=60", Some(VIEWER), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["points"].as_array().map(Vec::len), Some(60), "{v}");
    for q in ["?minutes=0", "?minutes=181", "?minutes=x", "?hours=1"] {
        let (s, v) = c.call("GET", flow, &format!("{flow}{q}"), Some(VIEWER), None).await;
        assert_eq!(s, 400, "{q}: {v}");
    }

    // Mode.
    let (s, v) = c
        .call(
            "PUT",
            "/api/v1/mode",
            "/api/v1/mode",
            Some(OPERATOR),
            Some(json!({"bits": 2, "reason": "test"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    c.call(
        "PUT",
        "/api/v1/mode",
        "/api/v1/mode",
        Some(OPERATOR),
        Some(json!({"names": ["fare_free"], "reason": "test"})),
    )
    .await;
    c.call(
        "PUT",
        "/api/v1/mode",
        "/api/v1/mode",
        Some(OPERATOR),
        Some(json!({"names": ["warp"], "reason": "x"})),
    )
    .await;
    c.call("PUT", "/api/v1/mode", "/api/v1/mode", Some(OPERATOR), Some(json!({"bits": 2, "reason": " "})))
        .await;
    // Bodies serde refuses for their content's shape: the documented request schemas refuse them
    // too. (Not integer widths: utoipa gives a u16 `minimum: 0` and no `maximum`.)
    for (m, t, body) in [
        ("PUT", "/api/v1/mode", json!({"bits": "2", "reason": "x"})),
        ("POST", "/api/v1/cluster/nodes", json!({"node_id": -1, "addr": "h:1", "reason": "x"})),
        ("POST", "/api/v1/parameters/fare-table", json!({"network": small_network(), "reason": "x"})),
        (
            "POST",
            "/api/v1/parameters/blacklist",
            json!({"full": [{"media": "svc", "id": 1, "first": 2}], "reason": "x"}),
        ),
        (
            "POST",
            "/api/v1/parameters/blacklist",
            json!({"full": [{"media": "cash", "id": 1}], "reason": "x"}),
        ),
        ("POST", "/api/v1/rollouts", json!({"kind": "fare_table", "version": 1.5, "reason": "x"})),
        ("POST", "/api/v1/gates", json!({"gate": "g09", "tx_public_key": 7, "reason": "x"})),
    ] {
        let (s, v) = c.call(m, t, t, Some(ENGINEER), Some(body)).await;
        assert_eq!(s, 400, "{m} {t}: {v}");
    }
    let (s, _) = c.call_raw("PUT", "/api/v1/mode", OPERATOR, "{\"names\": [\"fare_fr".into()).await;
    assert_eq!(s, 400);
    let (s, _) = c
        .call_raw(
            "PUT",
            "/api/v1/mode",
            OPERATOR,
            format!("{{\"reason\": \"{}\", \"bits\": 0}}", "x".repeat(100_000)),
        )
        .await;
    assert_eq!(s, 413);
    let er = "/api/v1/mode/emergency-release";
    c.call("POST", er, er, Some(OPERATOR), Some(json!({"reason": "drill"}))).await;
    let (s, v) =
        c.call("POST", er, er, Some(OPERATOR), Some(json!({"confirm": true, "reason": "drill"}))).await;
    assert_eq!(s, 200, "{v}");
    c.call(
        "POST",
        er,
        er,
        Some(OPERATOR),
        Some(json!({"active": false, "confirm": true, "reason": "drill over"})),
    )
    .await;
    // A scheduled window (SPEC §2: a mode change with a start and end time), then ended early.
    let (sched, end) = ("/api/v1/mode/schedule", "/api/v1/mode/schedule/end");
    let from = controller::clock::now().0 + 3_600_000;
    let window =
        json!({"names": ["closed"], "from": from, "until": from + 3_600_000, "reason": "night works"});
    let (s, v) = c.call("POST", sched, sched, Some(OPERATOR), Some(window)).await;
    assert_eq!(s, 200, "{v}");
    for bad in [
        json!({"names": ["emergency_release"], "from": from, "until": from + 1, "reason": "x"}),
        json!({"bits": 256, "from": from, "until": from, "reason": "x"}),
        json!({"bits": 256, "from": 0, "until": 1, "reason": "x"}),
    ] {
        let (s, v) = c.call("POST", sched, sched, Some(OPERATOR), Some(bad)).await;
        assert_eq!(s, 400, "{v}");
    }
    let (s, v) =
        c.call("POST", end, end, Some(OPERATOR), Some(json!({"from": from, "reason": "works off"}))).await;
    assert_eq!((s, v["until"].as_i64()), (200, Some(from)), "{v}");
    let (s, v) =
        c.call("POST", end, end, Some(OPERATOR), Some(json!({"from": from, "reason": "again"}))).await;
    assert_eq!(s, 400, "{v}");
    c.call("GET", "/api/v1/mode", "/api/v1/mode", Some(VIEWER), None).await;

    // Parameters: a fare table, blacklists (small, mass, a stale delta), QR keys.
    let ft = "/api/v1/parameters/fare-table";
    let (s, v) = c
        .call(
            "POST",
            ft,
            ft,
            Some(ENGINEER),
            Some(json!({"network": small_network(), "fare_rule": dalian_rule(), "reason": "new fares"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let mut bad = small_network();
    bad["lines"][0]["stops"][1]["station"] = json!("nowhere");
    c.call(
        "POST",
        ft,
        ft,
        Some(ENGINEER),
        Some(json!({"network": bad, "fare_rule": dalian_rule(), "reason": "x"})),
    )
    .await;
    let bl = "/api/v1/parameters/blacklist";
    let (s, v) = c
        .call("POST", bl, bl, Some(ENGINEER), Some(json!({"full": [{"media": "svc", "id": 42}, {"media": "qr", "first": 5, "last": 9}], "reason": "list 1"})))
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, held) = c
        .call("POST", bl, bl, Some(ENGINEER), Some(json!({"delta": {"from_version": 1, "add": [{"media": "svc", "first": 1000, "last": 1999}]}, "reason": "mass"})))
        .await;
    assert_eq!(s, 202, "{held}");
    c.call(
        "POST",
        bl,
        bl,
        Some(ENGINEER),
        Some(json!({"delta": {"from_version": 1, "add": []}, "reason": "stale"})),
    )
    .await;
    c.call(
        "POST",
        bl,
        bl,
        Some(ENGINEER),
        Some(json!({"full": [], "delta": {"from_version": 2}, "reason": "both"})),
    )
    .await;
    c.call("POST", bl, bl, Some(ENGINEER), Some(json!({"full": [{"media": "svc"}], "reason": "shape"})))
        .await;
    let confirm_t = "/api/v1/parameters/blacklist/pending/{id}/confirm";
    let confirm = format!("/api/v1/parameters/blacklist/pending/{}/confirm", held["pending_id"]);
    let (s, _) =
        c.call("POST", confirm_t, &confirm, Some(ENGINEER), Some(json!({"reason": "me again"}))).await;
    assert_eq!(s, 403);
    let (s, v) =
        c.call("POST", confirm_t, &confirm, Some(ENGINEER2), Some(json!({"reason": "checked"}))).await;
    assert_eq!(s, 200, "{v}");
    c.call("POST", confirm_t, &confirm, Some(ENGINEER2), Some(json!({"reason": "twice"}))).await;
    let qr = "/api/v1/parameters/qr-keys";
    let key = json!({"issuer": 1, "key_id": 1, "public_key": key_hex(&gate_key(9)), "valid_from": 0, "valid_to": 4_000_000_000_000_i64});
    let (s, v) =
        c.call("POST", qr, qr, Some(ENGINEER), Some(json!({"keys": [key], "reason": "issuer 1"}))).await;
    assert_eq!(s, 200, "{v}");
    c.call("POST", qr, qr, Some(ENGINEER), Some(json!({"keys": [key, key], "reason": "duplicate"}))).await;
    c.call("POST", qr, qr, Some(ENGINEER), Some(json!({"keys": [{"issuer": 1}], "reason": "short"}))).await;
    let gc = "/api/v1/parameters/gate-config";
    let config = json!({"release_on_controller_loss_secs": 60, "retap_window_secs": 90});
    let (s, v) = c
        .call(
            "POST",
            gc,
            gc,
            Some(ENGINEER),
            Some(json!({"config": config, "reason": "release after 1 min"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = c
        .call("POST", gc, gc, Some(ENGINEER), Some(json!({"config": {"retap_window": 5}, "reason": "typo"})))
        .await;
    assert_eq!(s, 400);
    c.call("GET", "/api/v1/parameters", "/api/v1/parameters", Some(VIEWER), None).await;
    let show = "/api/v1/parameters/{kind}/{version}";
    for p in [
        "/api/v1/parameters/fare_table/1",
        "/api/v1/parameters/blacklist/2",
        "/api/v1/parameters/nope/1",
        "/api/v1/parameters/fare_table/x",
    ] {
        c.call("GET", show, p, Some(VIEWER), None).await;
    }

    // Rollouts.
    c.call("GET", "/api/v1/rollouts", "/api/v1/rollouts", Some(VIEWER), None).await;
    let ro = "/api/v1/rollouts";
    // The mass insertion started again by hand: held, then confirmed by another engineer.
    let (s, v) = c
        .call(
            "POST",
            ro,
            ro,
            Some(ENGINEER),
            Some(json!({"kind": "blacklist", "version": 2, "reason": "restart"})),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let rc = "/api/v1/rollouts/{kind}/confirm";
    c.call("POST", rc, "/api/v1/rollouts/blacklist/confirm", Some(ENGINEER), Some(json!({"reason": "me"})))
        .await;
    let (s, v) = c
        .call(
            "POST",
            rc,
            "/api/v1/rollouts/blacklist/confirm",
            Some(ENGINEER2),
            Some(json!({"reason": "ok"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    for body in [
        json!({"kind": "fare_table", "version": 1, "reason": "again"}),
        json!({"kind": "qr_keys", "version": 1, "reason": "again"}),
        json!({"kind": "fare_table", "version": 99, "reason": "none"}),
        json!({"kind": "nope", "version": 1, "reason": "none"}),
    ] {
        c.call("POST", ro, ro, Some(ENGINEER), Some(body)).await;
    }
    for (t, p) in [
        ("/api/v1/rollouts/{kind}/confirm", "/api/v1/rollouts/blacklist/confirm"),
        ("/api/v1/rollouts/{kind}/abort", "/api/v1/rollouts/fare_table/abort"),
        ("/api/v1/rollouts/{kind}/abort", "/api/v1/rollouts/gate_config/abort"),
        ("/api/v1/rollouts/{kind}/confirm", "/api/v1/rollouts/nope/confirm"),
    ] {
        c.call("POST", t, p, Some(ENGINEER), Some(json!({"reason": "test"}))).await;
    }
    c.call("GET", "/api/v1/rollouts", "/api/v1/rollouts", Some(VIEWER), None).await;

    // The ledger, clearing and the audit log, with and without bad queries.
    for (t, q) in [
        ("/api/v1/ledger", "?from=1&limit=2"),
        ("/api/v1/ledger", "?limit=x"),
        ("/api/v1/ledger/search", "?gate=g02&media=svc"),
        ("/api/v1/ledger/search", "?limit=1"),
        ("/api/v1/ledger/search", "?since_ms=5&until_ms=1"),
        ("/api/v1/ledger/search", "?gate=no%20such"),
        ("/api/v1/ledger/search", "?media=cash"),
        ("/api/v1/ledger/stats", ""),
        ("/api/v1/ledger/gaps", ""),
        ("/api/v1/ledger/gaps", "?bogus=1"),
        ("/api/v1/ledger/conflicts", "?from=1"),
        ("/api/v1/ledger/verify", ""),
        ("/api/v1/clearing", ""),
        ("/api/v1/audit", ""),
        ("/api/v1/audit", "?from=2&limit=3"),
        ("/api/v1/audit", "?action=mode.&limit=2"),
        ("/api/v1/audit", "?actor=OTTO&from=1"),
        ("/api/v1/audit", "?who=otto"),
    ] {
        let (s, v) = c.call("GET", t, &format!("{t}{q}"), Some(VIEWER), None).await;
        if q.is_empty() {
            assert_eq!(s, 200, "{t}: {v}");
        }
    }

    // Gates: commissioning, the board, commands (this node has no MQTT: 503).
    let gates = "/api/v1/gates";
    let g5 = gate_key(5);
    let (s, v) = c
        .call(
            "POST",
            gates,
            gates,
            Some(ENGINEER),
            Some(json!({"gate": "g05", "tx_public_key": key_hex(&g5), "reason": "new gate"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    c.call(
        "POST",
        gates,
        gates,
        Some(ENGINEER),
        Some(json!({"gate": "g05", "tx_public_key": key_hex(&g5), "reason": "again"})),
    )
    .await;
    c.call(
        "POST",
        gates,
        gates,
        Some(ENGINEER),
        Some(json!({"gate": "g06", "tx_public_key": "abcd", "reason": "short key"})),
    )
    .await;
    c.call(
        "POST",
        gates,
        gates,
        Some(ENGINEER),
        Some(json!({"gate": "g 6", "tx_public_key": key_hex(&g5), "reason": "bad id"})),
    )
    .await;
    let key_t = "/api/v1/gates/{gate}/key";
    let (s, v) = c
        .call(
            "PUT",
            key_t,
            "/api/v1/gates/g05/key",
            Some(ENGINEER),
            Some(json!({"tx_public_key": key_hex(&gate_key(6)), "reason": "new hardware"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    c.call(
        "PUT",
        key_t,
        "/api/v1/gates/g05/key",
        Some(ENGINEER),
        Some(json!({"tx_public_key": key_hex(&gate_key(6)), "reason": "same"})),
    )
    .await;
    c.call(
        "PUT",
        key_t,
        "/api/v1/gates/g77/key",
        Some(ENGINEER),
        Some(json!({"tx_public_key": key_hex(&gate_key(6)), "reason": "none"})),
    )
    .await;
    let dec_t = "/api/v1/gates/{gate}/decommission";
    let (s, v) = c
        .call(
            "POST",
            dec_t,
            "/api/v1/gates/g05/decommission",
            Some(ENGINEER),
            Some(json!({"reason": "removed"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    c.call("POST", dec_t, "/api/v1/gates/g05/decommission", Some(ENGINEER), Some(json!({"reason": "twice"})))
        .await;
    let (s, v) = c
        .call("POST", gates, gates, Some(ENGINEER), Some(json!({"gate": "g05", "tx_public_key": key_hex(&gate_key(7)), "hardware_profile": "v2", "reason": "back"})))
        .await;
    assert_eq!(s, 200, "{v}");
    c.call("GET", gates, gates, Some(VIEWER), None).await;
    for p in ["/api/v1/gates/g02", "/api/v1/gates/g05", "/api/v1/gates/g99"] {
        c.call("GET", "/api/v1/gates/{gate}", p, Some(VIEWER), None).await;
    }
    let cmd_t = "/api/v1/gates/{gate}/commands";
    for (p, body) in [
        ("/api/v1/gates/g02/commands", json!({"command": "open_once_entry", "reason": "stuck"})),
        ("/api/v1/gates/g02/commands", json!({"command": "set_direction", "reason": "no direction"})),
        ("/api/v1/gates/g02/commands", json!({"command": "fly", "reason": "x"})),
        (
            "/api/v1/gates/g02/commands",
            json!({"command": "set_direction", "direction": "sideways", "reason": "x"}),
        ),
        ("/api/v1/gates/g99/commands", json!({"command": "in_service", "reason": "x"})),
    ] {
        c.call("POST", cmd_t, p, Some(OPERATOR), Some(body)).await;
    }

    // The cluster: this single node cannot lose its last voter; an empty address is refused.
    let nodes = "/api/v1/cluster/nodes";
    c.call("POST", nodes, nodes, Some(ENGINEER), Some(json!({"node_id": 2, "addr": " ", "reason": "x"})))
        .await;
    let rm_t = "/api/v1/cluster/nodes/{id}/remove";
    for p in
        ["/api/v1/cluster/nodes/1/remove", "/api/v1/cluster/nodes/7/remove", "/api/v1/cluster/nodes/x/remove"]
    {
        c.call("POST", rm_t, p, Some(ENGINEER), Some(json!({"reason": "x"}))).await;
    }

    // Business days: a day that is over (the records above are in 2027: none in it) is closed
    // once, then refused; today is not over; a bad date; the reports in JSON and CSV.
    let close_t = "/api/v1/days/{day}/close";
    let over =
        afc_domain::model::BusinessDayRule::default().business_day(controller::clock::now()).plus_days(-2);
    let today = over.plus_days(2);
    for d in [over.to_string(), over.to_string(), today.to_string(), "2026-02-30".to_owned()] {
        c.call(
            "POST",
            close_t,
            &format!("/api/v1/days/{d}/close"),
            Some(OPERATOR),
            Some(json!({"reason": "eod"})),
        )
        .await;
    }
    for p in [format!("/api/v1/days/{over}"), format!("/api/v1/days/{today}"), "/api/v1/days/x".to_owned()] {
        c.call("GET", "/api/v1/days/{day}", &p, Some(VIEWER), None).await;
    }
    c.call("GET", "/api/v1/days", "/api/v1/days", Some(VIEWER), None).await;
    for kind in ["flow", "revenue", "rejects", "incidents"] {
        let t = format!("/api/v1/reports/{kind}");
        for q in [format!("day={over}"), format!("from={over}&to={today}&format=csv"), "day=x".to_owned()] {
            c.call("GET", &t, &format!("{t}?{q}"), Some(VIEWER), None).await;
        }
    }

    // After all that data, the lists once more (ledger entries, audit lines, gates, rollouts).
    for t in [
        "/api/v1/ledger/gaps",
        "/api/v1/ledger/conflicts",
        "/api/v1/ledger",
        "/api/v1/ledger/search",
        "/api/v1/audit",
        "/api/v1/gates",
        "/api/v1/rollouts",
        "/api/v1/clearing",
        "/api/v1/mode",
        "/api/v1/parameters",
        "/api/v1/ledger/stats",
    ] {
        let (s, v) = c.call("GET", t, t, Some(VIEWER), None).await;
        assert_eq!(s, 200, "{t}: {v}");
        assert!(v != json!([]) && v != json!({}), "{t} holds data: {v}");
    }

    // A node that knows no leader: not ready, writes refused with 503 (after waiting for one),
    // reads still answer.
    let lone = ApiNode::start(false).await;
    c.n = &lone;
    c.call("GET", "/readyz", "/readyz", None, None).await;
    c.call("GET", "/api/v1/ledger/stats", "/api/v1/ledger/stats", Some(VIEWER), None).await;
    let body = json!({"bits": 2, "reason": "x"});
    c.call("PUT", "/api/v1/mode", "/api/v1/mode", Some(OPERATOR), Some(body)).await;

    let Checker { seen, failures, .. } = c;
    assert!(
        failures.is_empty(),
        "{} answers do not match the OpenAPI document:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    // Every route was called and answered with a success, except what one node without MQTT
    // cannot do (add a node, remove a voter, deliver a gate command): those were validated with
    // their errors.
    let no_success: BTreeSet<(&str, &str)> = [
        ("POST", "/api/v1/cluster/nodes"),
        ("POST", "/api/v1/cluster/nodes/{id}/remove"),
        ("POST", "/api/v1/gates/{gate}/commands"),
    ]
    .into();
    for r in ROUTES {
        let statuses = seen.get(&(r.method.to_owned(), r.path.to_owned()));
        assert!(
            statuses.is_some_and(|s| s.contains(&401)),
            "{} {} was not checked: {statuses:?}",
            r.method,
            r.path
        );
        let success = statuses.is_some_and(|s| s.iter().any(|s| (200..300).contains(s)));
        assert_eq!(
            success,
            !no_success.contains(&(r.method, r.path)),
            "{} {}: {statuses:?}",
            r.method,
            r.path
        );
    }
    let summary: Vec<String> = seen.iter().map(|((m, p), s)| format!("{m} {p}: {s:?}")).collect();
    eprintln!("statuses validated:\n  {}", summary.join("\n  "));
    lone.stop().await;
    n.stop().await;
}
