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

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: String,
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
