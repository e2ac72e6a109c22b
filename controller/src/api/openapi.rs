//! `GET /api/v1/openapi.json`: the OpenAPI 3.0 document, generated from [`super::ROUTES`] so it
//! lists exactly the routes the listener serves, with the role each needs.

use actix_web::HttpResponse;
use serde_json::{json, Map, Value};

use super::{Access, Caller, ROUTES};

/// The error responses every route may give, by status.
const ERRORS: [(&str, &str); 7] = [
    ("400", "malformed request (code bad_request, invalid_parameters)"),
    ("401", "no or unknown bearer token (code unauthorized)"),
    ("403", "the token's role may not do this (code forbidden)"),
    ("404", "unknown gate, version or route (code not_found, no_route)"),
    ("409", "conflicts with the current state (code conflict)"),
    ("413", "body larger than api.max_body_bytes (code payload_too_large)"),
    ("503", "no leader reachable (code no_leader); for ledger scans, every api.max_concurrent_scans slot taken (code busy, with Retry-After)"),
];

/// Builds the document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for r in ROUTES {
        let entry = paths.entry(r.path.to_owned()).or_insert_with(|| json!({}));
        let params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        let mut responses = Map::new();
        responses.insert("200".into(), json!({ "description": "success" }));
        for (status, _) in ERRORS {
            responses.insert(status.into(), json!({ "$ref": format!("#/components/responses/E{status}") }));
        }
        let mut op = json!({
            "summary": r.summary,
            "operationId": format!("{}_{}", r.method.to_lowercase(), r.path.trim_start_matches('/').replace(['/', '-', '.', '{', '}'], "_")),
            "x-required-role": r.access.as_str(),
            "x-audited": r.write,
            "parameters": params,
            "responses": responses,
        });
        if r.access == Access::Public {
            op["security"] = json!([]);
        }
        if r.method == "POST" || r.method == "PUT" {
            op["requestBody"] = json!({
                "required": true,
                "content": { "application/json": { "schema": { "type": "object", "required": ["reason"], "properties": { "reason": { "type": "string" } } } } }
            });
        }
        entry[r.method.to_lowercase()] = op;
    }
    let mut responses = Map::new();
    for (status, why) in ERRORS {
        responses.insert(
            format!("E{status}"),
            json!({ "description": why, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } }),
        );
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "AFC station controller API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Operations API of the station controller cluster (SPEC §9). Any node answers; writes are forwarded to the Raft leader and recorded in the replicated audit log. Roles: viewer < operator < engineer.",
        },
        "paths": paths,
        "security": [{ "bearer": [] }],
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": { "Error": { "type": "object", "required": ["code", "message"], "properties": { "code": { "type": "string" }, "message": { "type": "string" } } } },
            "responses": responses,
        },
    })
}

pub async fn openapi(_c: Caller) -> HttpResponse {
    HttpResponse::Ok().json(document())
}
