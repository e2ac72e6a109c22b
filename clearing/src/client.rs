//! A typed async client of the clearing protocol, for the controller's uploader and for tests.
//!
//! One pooled `reqwest` client (rustls); every call has a connect timeout and a whole-request
//! timeout. Outcomes the protocol defines are values ([`UploadOutcome::Conflict`] for a 409);
//! everything else is a [`ClearingError`], and [`ClearingError::is_retryable`] tells the caller
//! whether to try again later (network, timeout, 5xx) or raise an alarm (token, verification).

use std::time::Duration;

use afc_domain::ledger::SequenceGap;
use afc_domain::model::Ident;
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::protocol::{
    Acked, Conflict, ErrorBody, FeedItem, FeedKeyInfo, FeedPage, FeedSubmission, GapReport, GapsStored,
    StationStats, UploadBatch, Watermark,
};

/// Timeouts of a [`ClearingClient`].
#[derive(Debug, Clone, Copy)]
pub struct ClientConfig {
    /// Establishing a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// A whole small call (watermark, params, stats).
    pub request_timeout: Duration,
    /// A whole upload, body included (a 100,000-record batch is about 55 MB).
    pub upload_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            upload_timeout: Duration::from_secs(120),
        }
    }
}

/// What the clearing house did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadOutcome {
    /// Stored (or already stored) through this index.
    Acked(u64),
    /// The batch did not start right after the acknowledged point; resend from here.
    Conflict { expected_from: u64 },
}

/// Why a call failed.
#[derive(Debug, Error)]
pub enum ClearingError {
    #[error("invalid clearing base URL {0:?}")]
    BadUrl(String),
    #[error("clearing server unreachable, timed out or the connection failed: {0}")]
    Transport(#[source] reqwest::Error),
    #[error("clearing server refused the bearer token")]
    Unauthorized,
    #[error("clearing server refused the request ({status} {code}): {message}")]
    Refused { status: u16, code: String, message: String },
    #[error("clearing server answered {status} with an unexpected body: {body}")]
    Unexpected { status: u16, body: String },
}

impl ClearingError {
    /// Whether trying the same call later may succeed (transport failures and server errors);
    /// `false` for answers that will not change by themselves (token, verification, limits).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClearingError::Transport(_) => true,
            ClearingError::Refused { status, .. } | ClearingError::Unexpected { status, .. } => {
                *status >= 500
            }
            ClearingError::BadUrl(_) | ClearingError::Unauthorized => false,
        }
    }

    /// The server's error code, when it gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClearingError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A client of one clearing server.
#[derive(Clone)]
pub struct ClearingClient {
    http: reqwest::Client,
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:8480`.
    base: String,
    token: String,
    config: ClientConfig,
}

impl std::fmt::Debug for ClearingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClearingClient").field("base", &self.base).field("config", &self.config).finish()
    }
}

impl ClearingClient {
    /// A client of the server at `base_url` (`http://` or `https://`) presenting `token`.
    pub fn new(base_url: &str, token: &str, config: ClientConfig) -> Result<ClearingClient, ClearingError> {
        let base = base_url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClearingError::BadUrl(base_url.to_owned()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .map_err(ClearingError::Transport)?;
        Ok(ClearingClient { http, base, token: token.to_owned(), config })
    }

    fn station_url(&self, station: &Ident, rest: &str) -> String {
        format!("{}/v1/stations/{}/{rest}", self.base, station)
    }

    /// Uploads one batch.
    pub async fn upload(&self, station: &Ident, batch: &UploadBatch) -> Result<UploadOutcome, ClearingError> {
        let url = self.station_url(station, "batches");
        let acked: Result<Acked, u64> = self.post_or_conflict(url, batch, self.config.upload_timeout).await?;
        Ok(acked.map_or_else(
            |expected_from| UploadOutcome::Conflict { expected_from },
            |a| UploadOutcome::Acked(a.acked_through),
        ))
    }

    /// POSTs `body`: the 2xx answer, or `Err(expected_from)` for a 409, or the error.
    async fn post_or_conflict<B: serde::Serialize, A: DeserializeOwned>(
        &self,
        url: String,
        body: &B,
        timeout: Duration,
    ) -> Result<Result<A, u64>, ClearingError> {
        let resp = self
            .http
            .post(url)
            .bearer_auth(&self.token)
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(ClearingError::Transport)?;
        let status = resp.status();
        if status == StatusCode::CONFLICT {
            let body = resp.bytes().await.map_err(ClearingError::Transport)?;
            return match serde_json::from_slice::<Conflict>(&body) {
                Ok(c) => Ok(Err(c.expected_from)),
                Err(_) => Err(unexpected(status, &body)),
            };
        }
        Ok(Ok(answer(resp).await?))
    }

    /// Reports sequence gaps (ids from 1, resends allowed); how far the stored gaps run. A 409
    /// answers `Ok(UploadOutcome::Conflict)` as for batches.
    pub async fn report_gaps(
        &self,
        station: &Ident,
        gaps: &[SequenceGap],
    ) -> Result<UploadOutcome, ClearingError> {
        let url = self.station_url(station, "gaps");
        let report = GapReport { gaps: gaps.to_vec() };
        let stored: Result<GapsStored, u64> =
            self.post_or_conflict(url, &report, self.config.request_timeout).await?;
        Ok(stored.map_or_else(
            |expected_from| UploadOutcome::Conflict { expected_from },
            |s| UploadOutcome::Acked(s.stored_through),
        ))
    }

    /// Sends the close of one business day. `Ok(Ok(stored))` when stored (or already stored, the
    /// same: `duplicate`), `Ok(Err(()))` on a 409: clearing holds another close of that day.
    pub async fn close_day(
        &self,
        station: &Ident,
        close: &crate::protocol::DayClose,
    ) -> Result<Result<crate::protocol::DayStored, ()>, ClearingError> {
        let url = self.station_url(station, "days");
        let resp = self
            .http
            .post(url)
            .bearer_auth(&self.token)
            .timeout(self.config.request_timeout)
            .json(close)
            .send()
            .await
            .map_err(ClearingError::Transport)?;
        if resp.status() == StatusCode::CONFLICT {
            return Ok(Err(()));
        }
        Ok(Ok(answer(resp).await?))
    }

    /// The closed days the clearing house holds for the station.
    pub async fn days(&self, station: &Ident) -> Result<Vec<crate::protocol::DayClose>, ClearingError> {
        self.get(self.station_url(station, "days")).await
    }

    /// The sequence gaps the clearing house holds for the station.
    pub async fn gaps(&self, station: &Ident) -> Result<Vec<SequenceGap>, ClearingError> {
        self.get(self.station_url(station, "gaps")).await
    }

    /// Where the clearing house's copy of the station ledger ends.
    pub async fn watermark(&self, station: &Ident) -> Result<Watermark, ClearingError> {
        self.get(self.station_url(station, "watermark")).await
    }

    /// Feed items after `after` (at most 1,000 per call; ask again with `next_after`).
    pub async fn params(&self, station: &Ident, after: u64) -> Result<FeedPage, ClearingError> {
        self.get(self.station_url(station, &format!("params?after={after}"))).await
    }

    /// The station's counters (tests and operators).
    pub async fn stats(&self, station: &Ident) -> Result<StationStats, ClearingError> {
        self.get(self.station_url(station, "stats")).await
    }

    /// The feed key's public half.
    pub async fn feed_key(&self) -> Result<FeedKeyInfo, ClearingError> {
        self.get(format!("{}/v1/feed-key", self.base)).await
    }

    /// Publishes a parameter set to the station's feed (admin).
    pub async fn publish(
        &self,
        station: &Ident,
        submission: &FeedSubmission,
    ) -> Result<FeedItem, ClearingError> {
        let url = format!("{}/v1/admin/stations/{}/params", self.base, station);
        let resp = self
            .http
            .post(url)
            .bearer_auth(&self.token)
            .json(submission)
            .send()
            .await
            .map_err(ClearingError::Transport)?;
        answer(resp).await
    }

    async fn get<T: DeserializeOwned>(&self, url: String) -> Result<T, ClearingError> {
        let resp =
            self.http.get(url).bearer_auth(&self.token).send().await.map_err(ClearingError::Transport)?;
        answer(resp).await
    }
}

/// A 2xx answer parsed as `T`, or the error the answer describes.
async fn answer<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ClearingError> {
    let status = resp.status();
    let body = resp.bytes().await.map_err(ClearingError::Transport)?;
    if status.is_success() {
        return serde_json::from_slice(&body).map_err(|_| unexpected(status, &body));
    }
    if status == StatusCode::UNAUTHORIZED {
        return Err(ClearingError::Unauthorized);
    }
    match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(e) => Err(ClearingError::Refused { status: status.as_u16(), code: e.code, message: e.message }),
        Err(_) => Err(unexpected(status, &body)),
    }
}

fn unexpected(status: StatusCode, body: &[u8]) -> ClearingError {
    let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
    ClearingError::Unexpected { status: status.as_u16(), body: text }
}
