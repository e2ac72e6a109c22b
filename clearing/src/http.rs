//! The HTTP boundary (actix-web): routes, bearer-token check, body limits, and the mapping of
//! [`ServerError`] to a status and JSON `{code, message}` body — here and nowhere else.
//!
//! | route | auth | answer |
//! |---|---|---|
//! | `POST /v1/stations/{station}/batches` | token | [`crate::protocol::Acked`] / 409 / 422 |
//! | `GET /v1/stations/{station}/watermark` | token | [`crate::protocol::Watermark`] |
//! | `GET /v1/stations/{station}/stats` | token | [`crate::protocol::StationStats`] |
//! | `POST /v1/stations/{station}/gaps` | token | [`crate::protocol::GapsStored`] / 409 / 422 |
//! | `GET /v1/stations/{station}/gaps` | token | the stored `SequenceGap`s |
//! | `POST /v1/stations/{station}/days` | token | [`crate::protocol::DayStored`] / 409 |
//! | `GET /v1/stations/{station}/days` | token | the stored `DayClose`s |
//! | `GET /v1/stations/{station}/params?after=SEQ&limit=N` | token | [`crate::protocol::FeedPage`] |
//! | `POST /v1/admin/stations/{station}/params` | token | 201 [`crate::protocol::FeedItem`] |
//! | `GET /v1/feed-key` | token | [`crate::protocol::FeedKeyInfo`] |
//! | `GET /v1/admin/qr/journeys?as_of=MS` | token | [`crate::journeys::Priced`]: every QR journey priced, pending and unpriced taps |
//! | `GET /v1/admin/qr/settlements/{issuer}/{day}?as_of=MS` | token | the issuer's settlement file for that business day, CSV |
//! | `GET /v1/admin/bank/journeys?as_of=MS` | token | [`crate::journeys::Priced`]: every bank journey priced, pending and unpriced taps |
//! | `GET /v1/admin/bank/charges?day=YYYY-MM-DD[&format=csv]` | token | the stored charges of that business day, one [`crate::bank::DayCharge`] per token (JSON), or the acquirer settlement file (CSV) |
//! | `POST /v1/admin/bank/charge-pass` | token | [`crate::bank::PassReport`]: one full charge pass, run now |
//! | `GET /v1/admin/tac` | token | [`crate::tac::TacReport`]: every stored-value TAC verified, missing or mismatched, per gate and PSAM |
//! | `GET /metrics` | none | Prometheus text, `afc_clearing_*` |
//! | `GET /healthz` | none | `ok` |

use std::sync::Arc;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use afc_domain::model::{Ident, Media};
use serde::Deserialize;

use crate::error::ServerError;
use crate::protocol::{ErrorBody, FeedSubmission};
use crate::state::ClearingState;

impl ServerError {
    /// The status and stable code of this error: the one place errors meet HTTP.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ServerError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ServerError::BadStation(_) => (StatusCode::BAD_REQUEST, "bad_station"),
            ServerError::BadJson(_) => (StatusCode::BAD_REQUEST, "bad_json"),
            ServerError::BadQuery(_) => (StatusCode::BAD_REQUEST, "bad_query"),
            ServerError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            ServerError::TooManyRecords { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_many_records"),
            ServerError::NotContiguous { .. } => (StatusCode::CONFLICT, "not_contiguous"),
            ServerError::Batch(e) => (StatusCode::UNPROCESSABLE_ENTITY, e.code()),
            ServerError::Feed(e) => (StatusCode::UNPROCESSABLE_ENTITY, e.code()),
            ServerError::Gap(e) => (StatusCode::UNPROCESSABLE_ENTITY, e.code()),
            ServerError::DayConflict { .. } => (StatusCode::CONFLICT, "day_conflict"),
            ServerError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ServerError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage"),
            ServerError::Io(_) => (StatusCode::INTERNAL_SERVER_ERROR, "io"),
            ServerError::Config(_) => (StatusCode::INTERNAL_SERVER_ERROR, "config"),
            ServerError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl ResponseError for ServerError {
    fn status_code(&self) -> StatusCode {
        self.status_and_code().0
    }

    fn error_response(&self) -> HttpResponse {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let expected_from = match self {
            ServerError::NotContiguous { expected_from, .. } => Some(*expected_from),
            _ => None,
        };
        let mut resp = HttpResponse::build(status);
        if status == StatusCode::UNAUTHORIZED {
            resp.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        resp.json(ErrorBody { code: code.to_owned(), message: self.to_string(), expected_from })
    }
}

type State = web::Data<Arc<ClearingState>>;

/// The bearer token of `req`, if it has one.
fn bearer(req: &HttpRequest) -> Option<&[u8]> {
    let value = req.headers().get(header::AUTHORIZATION)?.as_bytes();
    value.strip_prefix(b"Bearer ").map(|t| t.trim_ascii())
}

/// Checks the token and parses the station of a `/v1/…/stations/{station}/…` request.
fn admit(req: &HttpRequest, state: &ClearingState, station: &str) -> Result<Ident, ServerError> {
    state.authorize(bearer(req))?;
    Ident::new(station).map_err(|e| {
        state.note_bad_request();
        ServerError::BadStation(e)
    })
}

/// Reads the whole body, refusing more than the configured limit.
async fn read_body(
    req: &HttpRequest,
    state: &ClearingState,
    payload: web::Payload,
) -> Result<web::Bytes, ServerError> {
    let limit = state.config().max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        state.note_bad_request();
        return Err(ServerError::BodyTooLarge { limit });
    }
    match payload.to_bytes_limited(limit).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            state.note_bad_request();
            Err(ServerError::BadJson(format!("reading the body: {e}")))
        }
        Err(_) => {
            state.note_bad_request();
            Err(ServerError::BodyTooLarge { limit })
        }
    }
}

/// Runs blocking state work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServerError> + Send + 'static,
) -> Result<T, ServerError> {
    web::block(f).await.map_err(|e| ServerError::Internal(format!("blocking pool: {e}")))?
}

async fn upload(
    req: HttpRequest,
    state: State,
    station: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ServerError> {
    let id = admit(&req, &state, &station)?;
    let body = read_body(&req, &state, payload).await?;
    let state = state.get_ref().clone();
    let acked = blocking(move || state.upload(&id, &body)).await?;
    Ok(HttpResponse::Ok().json(acked))
}

async fn report_gaps(
    req: HttpRequest,
    state: State,
    station: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ServerError> {
    let id = admit(&req, &state, &station)?;
    let body = read_body(&req, &state, payload).await?;
    let state = state.get_ref().clone();
    Ok(HttpResponse::Ok().json(blocking(move || state.report_gaps(&id, &body)).await?))
}

async fn list_gaps(
    req: HttpRequest,
    state: State,
    station: web::Path<String>,
) -> Result<HttpResponse, ServerError> {
    let id = admit(&req, &state, &station)?;
    let state = state.get_ref().clone();
    Ok(HttpResponse::Ok().json(blocking(move || state.gaps(&id)).await?))
}

async fn close_day(
    req: HttpRequest,
    state: State,
    station: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ServerError> {
    let id = admit(&req, &state, &station)?;
    let body = read_body(&req, &state, payload).await?;
    let state = state.get_ref().clone();
    Ok(HttpResponse::Ok().json(blocking(move || state.close_day(&id, &body)).await?))
}

async fn list_days(
    req: HttpRequest,
    state: State,
    station: web::Path<String>,
) -> Result<HttpResponse, ServerError> {
    let id = admit(&req, &state, &station)?;
    let state = state.get_ref().clone();
    Ok(HttpResponse::Ok().json(blocking(move || state.days(&id)).await?))
}

async fn watermark(
    req: HttpRequest,
    state: State,
    station: web::Path<String>,
) -> Result<HttpResponse, ServerError> {
    let id = admit(&req, &state, &station)?;
    let state = state.get_ref().clone();
    Ok(HttpResponse::Ok().json(blocking(move || state.watermark(&id)).await?))
}

async fn stats(
    req: HttpRequest,
    state: State,
    station: web::Path<String>,
) -> Result<HttpResponse, ServerError> {
    let id = admit(&req, &state, &station)?;
    let state = state.get_ref().clone();
    Ok(HttpResponse::Ok().json(blocking(move || state.stats(&id)).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParamsQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

async fn params(
    req: HttpRequest,
    state: State,
    station: web::Path<String>,
    query: web::Query<ParamsQuery>,
) -> Result<HttpResponse, ServerError> {
    let id = admit(&req, &state, &station)?;
    let (after, limit) = (query.after, query.limit.unwrap_or(crate::protocol::MAX_FEED_PAGE));
    let state = state.get_ref().clone();
    Ok(HttpResponse::Ok().json(blocking(move || state.params(&id, after, limit)).await?))
}

async fn publish(
    req: HttpRequest,
    state: State,
    station: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ServerError> {
    let id = admit(&req, &state, &station)?;
    let body = read_body(&req, &state, payload).await?;
    let submission: FeedSubmission = serde_json::from_slice(&body).map_err(|e| {
        state.note_bad_request();
        ServerError::BadJson(e.to_string())
    })?;
    let state = state.get_ref().clone();
    Ok(HttpResponse::Created().json(blocking(move || state.publish(&id, submission)).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PricingQuery {
    /// The instant open entries are judged at (default: now).
    as_of: Option<i64>,
}

impl PricingQuery {
    fn as_of(&self) -> afc_domain::model::Timestamp {
        self.as_of.map_or_else(crate::state::now, afc_domain::model::Timestamp)
    }
}

async fn qr_journeys(
    req: HttpRequest,
    state: State,
    query: web::Query<PricingQuery>,
) -> Result<HttpResponse, ServerError> {
    state.authorize(bearer(&req))?;
    let (state, as_of) = (state.get_ref().clone(), query.as_of());
    Ok(HttpResponse::Ok().json(blocking(move || state.price(Media::Qr, as_of)).await?))
}

async fn bank_journeys(
    req: HttpRequest,
    state: State,
    query: web::Query<PricingQuery>,
) -> Result<HttpResponse, ServerError> {
    state.authorize(bearer(&req))?;
    let (state, as_of) = (state.get_ref().clone(), query.as_of());
    Ok(HttpResponse::Ok().json(blocking(move || state.price(Media::Bank, as_of)).await?))
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ReportFormat {
    Json,
    Csv,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChargesQuery {
    day: afc_domain::model::Date,
    format: Option<ReportFormat>,
}

async fn bank_charges(
    req: HttpRequest,
    state: State,
    query: web::Query<ChargesQuery>,
) -> Result<HttpResponse, ServerError> {
    state.authorize(bearer(&req))?;
    let day = query.day;
    let state = state.get_ref().clone();
    let rows = blocking(move || Ok(state.bank_charges(day))).await?;
    Ok(match query.format {
        Some(ReportFormat::Csv) => HttpResponse::Ok()
            .content_type("text/csv; charset=utf-8")
            .body(crate::bank::settlement_csv(&rows, day)),
        None | Some(ReportFormat::Json) => HttpResponse::Ok().json(rows),
    })
}

async fn bank_charge_pass(req: HttpRequest, state: State) -> Result<HttpResponse, ServerError> {
    state.authorize(bearer(&req))?;
    let state = state.get_ref().clone();
    Ok(HttpResponse::Ok().json(blocking(move || state.charge_pass(crate::state::now(), true)).await?))
}

async fn qr_settlement(
    req: HttpRequest,
    state: State,
    path: web::Path<(u16, String)>,
    query: web::Query<PricingQuery>,
) -> Result<HttpResponse, ServerError> {
    state.authorize(bearer(&req))?;
    let (issuer, day) = path.into_inner();
    let day: afc_domain::model::Date = serde_json::from_value(serde_json::Value::String(day))
        .map_err(|e| ServerError::BadQuery(format!("day: {e}")))?;
    let (state, as_of) = (state.get_ref().clone(), query.as_of());
    let priced = blocking(move || state.price(Media::Qr, as_of)).await?;
    let csv = crate::journeys::settlement_csv(&priced.journeys, issuer, day);
    Ok(HttpResponse::Ok().content_type("text/csv; charset=utf-8").body(csv))
}

async fn tac_report(req: HttpRequest, state: State) -> Result<HttpResponse, ServerError> {
    state.authorize(bearer(&req))?;
    let state = state.get_ref().clone();
    Ok(HttpResponse::Ok().json(blocking(move || state.tac_report()).await?))
}

async fn feed_key(req: HttpRequest, state: State) -> Result<HttpResponse, ServerError> {
    state.authorize(bearer(&req))?;
    Ok(HttpResponse::Ok().json(state.feed_key()))
}

async fn metrics(state: State) -> Result<HttpResponse, ServerError> {
    let state = state.get_ref().clone();
    let text = blocking(move || Ok(state.metrics())).await?;
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(text))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok")
}

async fn not_found() -> Result<HttpResponse, ServerError> {
    Err(ServerError::NotFound)
}

/// Registers every route.
pub fn configure(state: Arc<ClearingState>) -> impl Fn(&mut web::ServiceConfig) + Clone {
    move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(web::Data::new(state.clone()))
            .app_data(
                web::QueryConfig::default()
                    .error_handler(|e, _req| ServerError::BadQuery(e.to_string()).into()),
            )
            .app_data(
                web::PathConfig::default()
                    .error_handler(|e, _req| ServerError::BadQuery(e.to_string()).into()),
            )
            .route("/v1/stations/{station}/batches", web::post().to(upload))
            .route("/v1/stations/{station}/watermark", web::get().to(watermark))
            .route("/v1/stations/{station}/gaps", web::post().to(report_gaps))
            .route("/v1/stations/{station}/gaps", web::get().to(list_gaps))
            .route("/v1/stations/{station}/days", web::post().to(close_day))
            .route("/v1/stations/{station}/days", web::get().to(list_days))
            .route("/v1/stations/{station}/stats", web::get().to(stats))
            .route("/v1/stations/{station}/params", web::get().to(params))
            .route("/v1/admin/stations/{station}/params", web::post().to(publish))
            .route("/v1/feed-key", web::get().to(feed_key))
            .route("/v1/admin/qr/journeys", web::get().to(qr_journeys))
            .route("/v1/admin/qr/settlements/{issuer}/{day}", web::get().to(qr_settlement))
            .route("/v1/admin/bank/journeys", web::get().to(bank_journeys))
            .route("/v1/admin/bank/charges", web::get().to(bank_charges))
            .route("/v1/admin/bank/charge-pass", web::post().to(bank_charge_pass))
            .route("/v1/admin/tac", web::get().to(tac_report))
            .route("/metrics", web::get().to(metrics))
            .route("/healthz", web::get().to(healthz))
            .default_service(web::to(not_found));
    }
}
