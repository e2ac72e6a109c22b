//! The clearing lag and its alarm, as a pure function of a [`ClearingStatus`] snapshot and now.
//!
//! The lag is how long ledger records have been waiting with the upload making no progress: with a
//! backlog, the time since the latest of
//!
//! - the last upload clearing acknowledged (`last_success`),
//! - the last moment the uploader found nothing to upload (`caught_up_at`: clearing held the
//!   whole ledger, so every waiting record arrived after it),
//! - the start of this node's leadership (`leading_since`: a new leader knows nothing older, so
//!   the lag it shows is a lower bound);
//!
//! and 0 without a backlog. The alarm is raised once the lag reaches `clearing.lag_alarm_secs`
//! and cleared by the next acknowledged upload (which sets the lag back to 0), even while the
//! catch-up still has records to send. Only the leader uploads, so only the leader reports a lag:
//! a follower's counters are those of its last leadership and would raise a stale alarm.

use std::time::Duration;

use afc_domain::model::Timestamp;
use serde::Serialize;

use crate::clearing_sync::ClearingStatus;

/// The lag view of `GET /api/v1/clearing` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClearingLag {
    /// Milliseconds records have waited without progress; `None` when this node does not upload
    /// (clearing not configured, or not the leader).
    pub lag_ms: Option<u64>,
    /// The lag reached `lag_alarm_secs`.
    pub lag_alarm: bool,
    /// The configured threshold.
    pub lag_alarm_secs: u64,
}

/// The lag of `s` at `now`, alarmed from `alarm_after` on.
pub fn clearing_lag(s: &ClearingStatus, now: Timestamp, alarm_after: Duration) -> ClearingLag {
    let lag_alarm_secs = alarm_after.as_secs();
    let none = ClearingLag { lag_ms: None, lag_alarm: false, lag_alarm_secs };
    if !s.enabled || !s.leading {
        return none;
    }
    if s.backlog == 0 {
        return ClearingLag { lag_ms: Some(0), ..none };
    }
    let Some(since) = [s.last_success, s.caught_up_at, s.leading_since].into_iter().flatten().max() else {
        return none;
    };
    let lag_ms = u64::try_from(now.millis().saturating_sub(since.millis())).unwrap_or(0);
    let alarm_ms = u64::try_from(alarm_after.as_millis()).unwrap_or(u64::MAX);
    ClearingLag { lag_ms: Some(lag_ms), lag_alarm: lag_ms >= alarm_ms, lag_alarm_secs }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leading(backlog: u64) -> ClearingStatus {
        ClearingStatus {
            enabled: true,
            leading: true,
            backlog,
            leading_since: Some(Timestamp(1_000)),
            ..ClearingStatus::default()
        }
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn no_backlog_no_lag() {
        let l = clearing_lag(&leading(0), Timestamp(1_000_000), T);
        assert_eq!((l.lag_ms, l.lag_alarm), (Some(0), false));
    }

    #[test]
    fn the_lag_counts_from_the_latest_progress_and_alarms_at_the_threshold() {
        let mut s = leading(5);
        s.last_success = Some(Timestamp(2_000));
        s.caught_up_at = Some(Timestamp(3_000));
        let l = clearing_lag(&s, Timestamp(12_999), T);
        assert_eq!((l.lag_ms, l.lag_alarm), (Some(9_999), false));
        let l = clearing_lag(&s, Timestamp(13_000), T);
        assert_eq!((l.lag_ms, l.lag_alarm), (Some(10_000), true));
        // An acknowledged upload clears it while records still wait.
        s.last_success = Some(Timestamp(13_500));
        let l = clearing_lag(&s, Timestamp(14_000), T);
        assert_eq!((l.lag_ms, l.lag_alarm), (Some(500), false));
    }

    #[test]
    fn a_new_leader_counts_from_its_leadership_and_a_follower_shows_none() {
        let l = clearing_lag(&leading(5), Timestamp(11_000), T);
        assert_eq!((l.lag_ms, l.lag_alarm), (Some(10_000), true));
        let mut f = leading(5);
        f.leading = false;
        f.last_success = Some(Timestamp(0));
        assert_eq!(clearing_lag(&f, Timestamp(1_000_000), T).lag_ms, None);
        assert!(!clearing_lag(&f, Timestamp(1_000_000), T).lag_alarm);
    }

    #[test]
    fn a_clock_step_back_gives_zero_not_a_wrap() {
        let l = clearing_lag(&leading(5), Timestamp(500), T);
        assert_eq!((l.lag_ms, l.lag_alarm), (Some(0), false));
    }
}
