//! The controller's one clock: the wall-clock time every module stamps with (audit lines, mode
//! changes, gate board, clearing lag, package headers) and the nanosecond reading used to name
//! files and ids uniquely. Nothing else in the crate reads `SystemTime`.

use std::time::{SystemTime, UNIX_EPOCH};

use afc_domain::model::Timestamp;

/// The current time as a domain timestamp (ms since the epoch; 0 before the epoch, saturating far
/// in the future).
pub fn now() -> Timestamp {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    Timestamp(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// Nanoseconds since the epoch (0 before it): for names that must not repeat, not for time stamps.
pub fn now_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}
