//! `GET /api/v1/openapi.json`: the OpenAPI 3.1 document, generated from [`super::ROUTES`] so it
//! lists exactly the routes the listener serves, with the role each needs, and with the schemas of
//! their query parameters, request bodies and answers derived from the handlers' own types
//! (`utoipa::ToSchema`, `utoipa::IntoParams`): a field renamed in a type is renamed in the
//! document. `controller/tests/it/openapi.rs` calls every route and validates each real answer
//! (successes and errors) against this document.

use std::collections::BTreeMap;

use actix_web::HttpResponse;
use serde_json::{json, Map, Value};
use utoipa::openapi::path::ParameterIn;
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, PartialSchema, ToSchema};

use super::{Access, Caller, RouteSpec, ROUTES};

/// The named schemas of the document (`components/schemas`), collected from the types.
#[derive(Debug, Default)]
pub struct Schemas {
    pub named: BTreeMap<String, Value>,
    /// Names given to two different schemas (a bug: one `$ref` would mean two things).
    pub clashes: Vec<String>,
}

impl Schemas {
    fn insert(&mut self, name: String, schema: RefOr<Schema>) {
        let v = serde_json::to_value(schema).unwrap_or(Value::Null);
        match self.named.get(&name) {
            Some(old) if *old != v => self.clashes.push(name),
            Some(_) => {}
            None => {
                self.named.insert(name, v);
            }
        }
    }

    /// Registers `T` and every schema it refers to; returns a `$ref` to it.
    pub fn reference<T: ToSchema>(&mut self) -> Value {
        let name = T::name().into_owned();
        let mut deps = Vec::new();
        T::schemas(&mut deps);
        for (n, s) in deps {
            self.insert(n, s);
        }
        self.insert(name.clone(), T::schema());
        json!({ "$ref": format!("#/components/schemas/{name}") })
    }
}

/// A body as the document lists it: media type and schema.
#[derive(Debug, Clone)]
pub struct Body {
    pub content_type: &'static str,
    pub schema: Value,
}

/// How a route's row names a body: one of [`json`], [`list`], [`html`], [`text`].
pub type BodyFn = fn(&mut Schemas) -> Body;
/// How a route's row names its query parameters: [`query`].
pub type ParamsFn = fn() -> Vec<Value>;

/// A JSON body of type `T`.
pub fn json<T: ToSchema>(s: &mut Schemas) -> Body {
    Body { content_type: "application/json", schema: s.reference::<T>() }
}

/// A JSON array of `T`.
pub fn list<T: ToSchema>(s: &mut Schemas) -> Body {
    Body { content_type: "application/json", schema: json!({ "type": "array", "items": s.reference::<T>() }) }
}

/// An HTML page (the console).
pub fn html<T>(_: &mut Schemas) -> Body {
    Body { content_type: "text/html; charset=utf-8", schema: json!({ "type": "string" }) }
}

/// A script (the console's).
pub fn javascript<T>(_: &mut Schemas) -> Body {
    Body { content_type: "text/javascript; charset=utf-8", schema: json!({ "type": "string" }) }
}

/// A style sheet (the console's).
pub fn css<T>(_: &mut Schemas) -> Body {
    Body { content_type: "text/css; charset=utf-8", schema: json!({ "type": "string" }) }
}

/// The Prometheus text exposition format.
pub fn text<T>(_: &mut Schemas) -> Body {
    Body { content_type: "text/plain; version=0.0.4; charset=utf-8", schema: json!({ "type": "string" }) }
}

/// CSV text with a header row (a report's `format=csv`).
pub fn csv<T>(_: &mut Schemas) -> Body {
    Body { content_type: "text/csv; charset=utf-8", schema: json!({ "type": "string" }) }
}

/// The query parameters of `T` (a `web::Query` type).
pub fn query<T: IntoParams>() -> Vec<Value> {
    T::into_params(|| Some(ParameterIn::Query))
        .into_iter()
        .map(|p| serde_json::to_value(p).unwrap_or(Value::Null))
        .collect()
}

/// The answer of `GET /api/v1/openapi.json` itself.
pub struct OpenApiDocument;

impl PartialSchema for OpenApiDocument {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some("An OpenAPI 3.1 document."))
            .property("openapi", ObjectBuilder::new().schema_type(Type::String))
            .property("info", ObjectBuilder::new().schema_type(Type::Object))
            .property("paths", ObjectBuilder::new().schema_type(Type::Object))
            .property("components", ObjectBuilder::new().schema_type(Type::Object))
            .property("security", utoipa::openapi::schema::ArrayBuilder::new())
            // Specification extensions (`x-...`) and the other fields of OpenAPI 3.1.
            .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(true)))
            .required("openapi")
            .required("info")
            .required("paths")
            .into()
    }
}

impl ToSchema for OpenApiDocument {
    fn name() -> std::borrow::Cow<'static, str> {
        "OpenApiDocument".into()
    }
}

/// Every status an [`super::ApiError`] can map to (`ResponseError::status_code`), with the codes
/// that give it. `error::tests` checks each variant's status and code is listed here.
pub const ERRORS: &[(u16, &[&str], &str)] = &[
    (400, &["bad_request", "invalid_parameters"], "malformed request, body or query; parameters the state machine refuses"),
    (401, &["unauthorized"], "no or unknown bearer token (any route: an unknown token is refused even where none is needed)"),
    (403, &["forbidden", "second_confirmer_required"], "the token's role may not do this; a second confirmation from the engineer who asked"),
    (404, &["not_found", "no_route"], "unknown gate, node, kind, version or pending upload"),
    (409, &["conflict", "command_rejected"], "conflicts with the current state; the gate refused the command"),
    (413, &["payload_too_large"], "body larger than api.max_body_bytes"),
    (500, &["internal"], "storage or internal failure"),
    (502, &["command_failed"], "the gate could not carry out the command"),
    (503, &["no_leader", "raft_stopped", "signing_key_missing", "mqtt_unavailable", "busy"], "no leader reachable; Raft core stopped; no package-signing key; gate commands unavailable; every ledger-scan slot taken (busy, with Retry-After)"),
    (504, &["command_expired", "gate_timeout"], "the command reached the gate after its expiry, or the gate did not acknowledge in time"),
];

/// The error statuses `r` can give: 401 always (an unknown token is refused on any route), 403
/// when it needs more than a viewer, 404 with path parameters, 400 and 413 with a body; a write
/// also 400, 403, 404 and 409 (the state machine's refusals, [`super::rejection_to_error`]), 500
/// and 503 (no leader); plus the row's own `errors`.
pub fn error_statuses(r: &RouteSpec) -> Vec<u16> {
    let mut s = vec![401];
    if matches!(r.access, Access::Operator | Access::Engineer) {
        s.push(403);
    }
    if r.path_params().next().is_some() {
        s.push(404);
    }
    if r.request.is_some() {
        s.extend([400, 413]);
    }
    if r.write {
        s.extend([400, 403, 404, 409, 500, 503]);
    }
    s.extend(r.errors);
    s.sort_unstable();
    s.dedup();
    s
}

fn content(body: &Body) -> Value {
    json!({ body.content_type: { "schema": body.schema } })
}

/// Builds the document and its schemas.
pub fn build() -> (Value, Schemas) {
    let mut schemas = Schemas::default();
    let error_ref = schemas.reference::<super::error::ErrorBody<'static>>();
    let mut paths = Map::new();
    for r in ROUTES {
        let entry = paths.entry(r.path.to_owned()).or_insert_with(|| json!({}));
        let mut params: Vec<Value> = r
            .path_params()
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        if let Some(q) = r.query {
            params.extend(q());
        }
        let mut responses = Map::new();
        for (status, body) in r.responses {
            let body = body(&mut schemas);
            let description = if *status == 202 { "accepted" } else { "success" };
            // A status listed twice (JSON or CSV) answers either content type.
            let entry = responses
                .entry(status.to_string())
                .or_insert_with(|| json!({ "description": description, "content": {} }));
            entry["content"][body.content_type] = json!({ "schema": body.schema });
        }
        for status in error_statuses(r) {
            responses
                .insert(status.to_string(), json!({ "$ref": format!("#/components/responses/E{status}") }));
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
        if let Some(req) = r.request {
            let body = req(&mut schemas);
            op["requestBody"] = json!({ "required": true, "content": content(&body) });
        }
        entry[r.method.to_lowercase()] = op;
    }
    let mut responses = Map::new();
    for (status, codes, why) in ERRORS {
        let mut resp = json!({
            "description": format!("{why} (code {})", codes.join(", ")),
            "content": { "application/json": { "schema": {
                "allOf": [error_ref, { "type": "object", "properties": { "code": { "type": "string", "enum": codes } } }]
            } } },
        });
        if *status == 401 {
            resp["headers"] =
                json!({ "WWW-Authenticate": { "schema": { "type": "string", "const": "Bearer" } } });
        }
        if *status == 503 {
            resp["headers"] = json!({ "Retry-After": { "description": "seconds; with code busy", "schema": { "type": "integer" } } });
        }
        responses.insert(format!("E{status}"), resp);
    }
    let doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "AFC station controller API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Operations API of the station controller cluster (SPEC §9). Any node answers; writes are forwarded to the Raft leader and recorded in the replicated audit log. Roles: viewer < operator < engineer.",
        },
        "paths": paths,
        "security": [{ "bearer": [] }],
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": schemas.named,
            "responses": responses,
        },
    });
    (doc, schemas)
}

/// The document.
pub fn document() -> Value {
    build().0
}

pub async fn openapi(_c: Caller) -> HttpResponse {
    HttpResponse::Ok().json(document())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` in `v`.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }

    #[test]
    fn every_schema_name_is_one_schema_and_every_ref_resolves() {
        let (doc, schemas) = build();
        assert!(schemas.clashes.is_empty(), "one name for two schemas: {:?}", schemas.clashes);
        // A type alias of a primitive (`NodeId`) would be named after the primitive.
        let primitive: Vec<_> = schemas.named.keys().filter(|n| n.starts_with(char::is_lowercase)).collect();
        assert!(primitive.is_empty(), "schemas named after a primitive: {primitive:?}");
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.len() > 40, "{all:?}");
        for r in all {
            let target = r.strip_prefix("#/").map(|p| p.split('/').fold(&doc, |v, k| &v[k]));
            assert!(target.is_some_and(|t| !t.is_null()), "{r} does not resolve");
        }
    }

    #[test]
    fn every_write_names_its_request_body_and_every_route_its_answer() {
        for r in ROUTES {
            assert_eq!(r.request.is_some(), r.method != "GET", "{} {}", r.method, r.path);
            assert!(!r.responses.is_empty());
        }
    }
}
