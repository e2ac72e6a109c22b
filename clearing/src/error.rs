//! The server's one error type. Its HTTP status and `code` are decided in [`crate::http`], only
//! there.

use afc_domain::model::IdentError;
use thiserror::Error;

use crate::feed::FeedStoreError;
use crate::protocol::{BatchError, FeedError, GapError};
use crate::store::StoreError;

/// Everything a request or the server's start can fail with.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("invalid station id: {0}")]
    BadStation(#[from] IdentError),
    #[error("request body is not valid JSON for this endpoint: {0}")]
    BadJson(String),
    #[error("invalid query: {0}")]
    BadQuery(String),
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("batch has {count} records, the limit is {limit}")]
    TooManyRecords { count: usize, limit: usize },
    #[error("batch starts at index {first_index}, expected {expected_from}")]
    NotContiguous { first_index: u64, expected_from: u64 },
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Feed(#[from] FeedError),
    #[error(transparent)]
    Gap(#[from] GapError),
    #[error("day {day} is stored with another close")]
    DayConflict { day: afc_domain::model::Date },
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
    #[error("no such endpoint")]
    NotFound,
    #[error("configuration: {0}")]
    Config(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl From<FeedStoreError> for ServerError {
    fn from(e: FeedStoreError) -> Self {
        match e {
            FeedStoreError::Feed(e) => ServerError::Feed(e),
            FeedStoreError::Store(e) => ServerError::Store(e),
        }
    }
}
