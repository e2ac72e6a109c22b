//! Bearer-token authentication and role checks.
//!
//! Tokens live in the config only as sha256 hashes ([`crate::config::ApiToken`]). Each route of
//! [`super::ROUTES`] names the least [`Access`] it needs; the [`Caller`] extractor looks the matched
//! route up in that table, so a handler cannot forget its check and the OpenAPI document states the
//! same roles the server enforces.

use std::future::{ready, Ready};

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::{ApiState, ROUTES};
use crate::config::ApiToken;
use crate::network::constant_time_eq;

/// What a route needs, from least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// No token (health, metrics, the OpenAPI document, the console page).
    Public,
    /// Read the station's state.
    Viewer,
    /// Gate commands and station modes.
    Operator,
    /// Parameters, rollouts and cluster membership.
    Engineer,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Public => "public",
            Access::Viewer => "viewer",
            Access::Operator => "operator",
            Access::Engineer => "engineer",
        }
    }

    fn parse(s: &str) -> Option<Access> {
        match s {
            "viewer" => Some(Access::Viewer),
            "operator" => Some(Access::Operator),
            "engineer" => Some(Access::Engineer),
            _ => None,
        }
    }
}

/// The accepted tokens: holder name, role, sha256.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    entries: Vec<(String, Access, [u8; 32])>,
}

impl Tokens {
    /// From the (validated) config; entries with a bad role or hash are skipped.
    pub fn from_config(tokens: &[ApiToken]) -> Tokens {
        let entries = tokens
            .iter()
            .filter_map(|t| {
                let role = Access::parse(&t.role)?;
                let hash: [u8; 32] = hex::decode(&t.sha256).ok()?.try_into().ok()?;
                Some((t.name.clone(), role, hash))
            })
            .collect();
        Tokens { entries }
    }

    /// The holder and role of a presented token.
    pub fn check(&self, token: &str) -> Option<(String, Access)> {
        let given: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare with every entry, so the time taken does not tell which one matched.
        let mut found = None;
        for (name, role, hash) in &self.entries {
            if constant_time_eq(&given, hash) && found.is_none() {
                found = Some((name.clone(), *role));
            }
        }
        found
    }
}

/// The authenticated caller of a route; extraction fails with 401 or 403.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token holder's name (the audit log's actor); `anonymous` on public routes.
    pub name: String,
    pub role: Access,
}

/// The least access the route matched by `req` needs (`Engineer` if it is not in the table).
pub fn required(req: &HttpRequest) -> Access {
    let pattern = req.match_pattern();
    let method = req.method().as_str();
    ROUTES
        .iter()
        .find(|r| Some(r.path) == pattern.as_deref() && r.method == method)
        .map(|r| r.access)
        .unwrap_or(Access::Engineer)
}

fn authenticate(req: &HttpRequest) -> Result<Caller, ApiError> {
    let needed = required(req);
    let state =
        req.app_data::<web::Data<ApiState>>().ok_or_else(|| ApiError::Internal("no api state".into()))?;
    let bearer = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let caller = match bearer {
        Some(token) => {
            let (name, role) = state.tokens.check(token).ok_or(ApiError::Unauthorized)?;
            Caller { name, role }
        }
        None if needed == Access::Public => Caller { name: "anonymous".into(), role: Access::Public },
        None => return Err(ApiError::Unauthorized),
    };
    if caller.role < needed {
        return Err(ApiError::Forbidden { role: caller.role.as_str(), needed: needed.as_str() });
    }
    Ok(caller)
}

impl FromRequest for Caller {
    type Error = actix_web::Error;
    type Future = Ready<Result<Caller, actix_web::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req).map_err(Into::into))
    }
}
