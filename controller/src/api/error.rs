//! The API's one error type, mapped to an HTTP status and a stable `code` here and only here.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::node::NodeError;
use crate::storage::StoreError;

/// Everything an API request can fail with. The `code` of each variant is part of the API contract.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed request: {0}")]
    BadRequest(String),
    #[error("invalid parameters: {0}")]
    InvalidParameters(String),
    #[error("missing or unknown bearer token")]
    Unauthorized,
    #[error("the {role} role may not do this; it needs {needed}")]
    Forbidden { role: &'static str, needed: &'static str },
    #[error("the second confirmation must come from another token than {actor}")]
    SameConfirmer { actor: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("no route {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("{0}")]
    Conflict(String),
    #[error("request body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("no leader: {0}")]
    NoLeader(String),
    /// This node's Raft core stopped on a fatal error (its storage failed); it exits soon.
    #[error("raft stopped ({reason}): {error}; the node exits for its supervisor to restart it")]
    RaftStopped { reason: &'static str, error: String },
    #[error("no package-signing key is configured (api.signing_key_file)")]
    SigningKeyMissing,
    #[error("the gate refused the command: {0}")]
    CommandRejected(String),
    #[error("the command reached the gate after its expiry: {0}")]
    CommandExpired(String),
    #[error("the gate could not carry out the command: {0}")]
    CommandFailed(String),
    #[error("the gate did not acknowledge within {0} ms")]
    GateTimeout(u64),
    #[error("gate commands are unavailable: {0}")]
    MqttUnavailable(String),
    /// An expensive read (a ledger scan) found every slot taken; the client retries later.
    #[error("{what}: the node is busy; retry in {retry_after_secs} s")]
    Busy { what: String, retry_after_secs: u64 },
    #[error("internal error: {0}")]
    Internal(String),
}

/// The body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody<'a> {
    /// The stable machine-readable code ([`ApiError::code`]).
    #[schema(value_type = String)]
    pub code: &'a str,
    /// For people; may change.
    pub message: String,
}

impl ApiError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidParameters(_) => "invalid_parameters",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::SameConfirmer { .. } => "second_confirmer_required",
            ApiError::NotFound(_) => "not_found",
            ApiError::NoRoute { .. } => "no_route",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge { .. } => "payload_too_large",
            ApiError::NoLeader(_) => "no_leader",
            ApiError::RaftStopped { .. } => "raft_stopped",
            ApiError::SigningKeyMissing => "signing_key_missing",
            ApiError::CommandRejected(_) => "command_rejected",
            ApiError::CommandExpired(_) => "command_expired",
            ApiError::CommandFailed(_) => "command_failed",
            ApiError::GateTimeout(_) => "gate_timeout",
            ApiError::MqttUnavailable(_) => "mqtt_unavailable",
            ApiError::Busy { .. } => "busy",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::InvalidParameters(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } | ApiError::SameConfirmer { .. } => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) | ApiError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) | ApiError::CommandRejected(_) => StatusCode::CONFLICT,
            ApiError::CommandFailed(_) => StatusCode::BAD_GATEWAY,
            ApiError::CommandExpired(_) | ApiError::GateTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::MqttUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NoLeader(_)
            | ApiError::RaftStopped { .. }
            | ApiError::SigningKeyMissing
            | ApiError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized) {
            r.insert_header(("WWW-Authenticate", "Bearer"));
        }
        if let ApiError::Busy { retry_after_secs, .. } = self {
            r.insert_header(("Retry-After", retry_after_secs.to_string()));
        }
        r.json(ErrorBody { code: self.code(), message: self.to_string() })
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::NoLeader(_) | NodeError::TooManyHops | NodeError::Raft(_) => {
                ApiError::NoLeader(e.to_string())
            }
            NodeError::Forward { status: 503, .. } => ApiError::NoLeader(e.to_string()),
            NodeError::BadRequest(m) => ApiError::BadRequest(m),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<crate::packages::PublishError> for ApiError {
    fn from(e: crate::packages::PublishError) -> Self {
        use crate::packages::PublishError as P;
        match e {
            P::Node(e) => e.into(),
            P::Store(e) => e.into(),
            P::Rejected(r) => match super::rejection_to_error(r) {
                Err(e) => e,
                Ok(r) => ApiError::Internal(format!("unexpected response {r:?}")),
            },
            P::InvalidParameters(m) => ApiError::InvalidParameters(m),
            P::Conflict(m) => ApiError::Conflict(m),
            P::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

/// Turns actix's JSON/query/path extraction failures into [`ApiError`]s (400, or 413 when too large).
pub fn json_error(err: actix_web::error::JsonPayloadError, limit: usize) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as J;
    match err {
        J::Overflow { .. } | J::OverflowKnownLength { .. } => ApiError::TooLarge { limit }.into(),
        other => ApiError::BadRequest(other.to_string()).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of each variant; the match makes a new variant a compile error here until it is added.
    fn one_of_each() -> Vec<ApiError> {
        let all = vec![
            ApiError::BadRequest(String::new()),
            ApiError::InvalidParameters(String::new()),
            ApiError::Unauthorized,
            ApiError::Forbidden { role: "viewer", needed: "engineer" },
            ApiError::SameConfirmer { actor: String::new() },
            ApiError::NotFound(String::new()),
            ApiError::NoRoute { method: String::new(), path: String::new() },
            ApiError::Conflict(String::new()),
            ApiError::TooLarge { limit: 1 },
            ApiError::NoLeader(String::new()),
            ApiError::RaftStopped { reason: "x", error: String::new() },
            ApiError::SigningKeyMissing,
            ApiError::CommandRejected(String::new()),
            ApiError::CommandExpired(String::new()),
            ApiError::CommandFailed(String::new()),
            ApiError::GateTimeout(1),
            ApiError::MqttUnavailable(String::new()),
            ApiError::Busy { what: String::new(), retry_after_secs: 1 },
            ApiError::Internal(String::new()),
        ];
        for e in &all {
            match e {
                ApiError::BadRequest(_)
                | ApiError::InvalidParameters(_)
                | ApiError::Unauthorized
                | ApiError::Forbidden { .. }
                | ApiError::SameConfirmer { .. }
                | ApiError::NotFound(_)
                | ApiError::NoRoute { .. }
                | ApiError::Conflict(_)
                | ApiError::TooLarge { .. }
                | ApiError::NoLeader(_)
                | ApiError::RaftStopped { .. }
                | ApiError::SigningKeyMissing
                | ApiError::CommandRejected(_)
                | ApiError::CommandExpired(_)
                | ApiError::CommandFailed(_)
                | ApiError::GateTimeout(_)
                | ApiError::MqttUnavailable(_)
                | ApiError::Busy { .. }
                | ApiError::Internal(_) => {}
            }
        }
        all
    }

    #[test]
    fn the_openapi_document_lists_every_status_and_code_an_error_can_have() {
        let listed = crate::api::openapi::ERRORS;
        for e in one_of_each() {
            let status = e.status_code().as_u16();
            let codes = listed.iter().find(|(s, _, _)| *s == status).map(|(_, c, _)| *c);
            assert!(
                codes.is_some_and(|c| c.contains(&e.code())),
                "{status} {} not in openapi::ERRORS",
                e.code()
            );
        }
        let used: Vec<(u16, &str)> =
            one_of_each().iter().map(|e| (e.status_code().as_u16(), e.code())).collect();
        for (status, codes, _) in listed {
            for c in *codes {
                assert!(
                    used.contains(&(*status, *c)),
                    "openapi::ERRORS lists {status} {c}, which no error gives"
                );
            }
        }
    }
}
