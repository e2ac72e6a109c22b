//! Business days and reports (issue 14 items 3 and 4): close a day, list and show days, and the
//! flow, revenue, rejects and incidents reports as JSON or CSV. The pure part is [`crate::day`].
//!
//! A close or a ledger report reads the retained ledger on a blocking thread holding one slot of
//! the scan limiter ([`super::records::ScanLimit`]), as the ledger search does. Records are
//! placed by `occurred_at`, which does not follow the ledger index (a gate uploads late after an
//! outage), so the whole retained ledger is read; it is bounded by [`MAX_REPORT_SCAN`] (a ledger
//! above it answers 409: prune first). The business-day rule is the current fare table's.

use std::collections::BTreeMap;

use actix_web::{web, HttpResponse};
use afc_domain::ledger::TxRecord;
use afc_domain::model::{BusinessDayRule, Date, Timestamp};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiState, Caller};
use crate::clock::now;
use crate::day::{
    self, csv, day_bounds, CloseHead, CsvRow, DayClose, DayTally, FlowRow, IncidentRow, RejectsRow, Reports,
    RevenueRow,
};
use crate::state::{Request, Response};

/// Most ledger entries a close or a report reads.
pub const MAX_REPORT_SCAN: u64 = 5_000_000;
/// Most business days one report covers.
pub const MAX_REPORT_DAYS: i32 = 31;

/// The business-day rule of the current fare table (the Dalian default before the first one).
pub fn business_rule(state: &ApiState) -> Result<BusinessDayRule, ApiError> {
    crate::packages::current_rule(&state.node.sm).map_err(ApiError::Internal)
}

fn parse_day(s: &str) -> Result<Date, ApiError> {
    Date::parse(s).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// A day named in the path: one that is no date names nothing (404, as other path names).
fn path_day(s: &str) -> Result<Date, ApiError> {
    Date::parse(s).map_err(|e| ApiError::NotFound(e.to_string()))
}

/// Adds every retained ledger record whose `occurred_at` is in `[from, until)` to `acc`, on a
/// blocking thread holding a scan slot; returns (entries read, last index read, `acc`).
async fn scan<A: Send + 'static>(
    state: &ApiState,
    what: &'static str,
    (from, until): (Timestamp, Timestamp),
    mut acc: A,
    add: impl Fn(&mut A, &TxRecord) + Send + 'static,
) -> Result<(u64, u64, A), ApiError> {
    let s = state.node.sm.state()?;
    let (first, last) = (s.first_retained.max(1), s.last_index());
    if last.saturating_sub(first) + 1 > MAX_REPORT_SCAN {
        return Err(ApiError::Conflict(format!(
            "the retained ledger holds {} entries, more than a {what} reads ({MAX_REPORT_SCAN})",
            last + 1 - first
        )));
    }
    let sm = state.node.sm.clone();
    let permit = state.scans.acquire(state, "report").await?;
    tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let _permit = permit;
        let mut next = first;
        let mut read = 0u64;
        while next <= last {
            let chunk = sm.ledger_entries(next, 10_000)?;
            let Some(end) = chunk.last().map(|e| e.index) else { break };
            for e in chunk.iter().filter(|e| e.index <= last) {
                read += 1;
                let t = e.record.occurred_at;
                if t >= from && t < until {
                    add(&mut acc, &e.record);
                }
            }
            next = end + 1;
        }
        Ok((read, last, acc))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
}

/// Computes the close of `day` from the ledger and the readings (not stored).
async fn compute(state: &ApiState, day: Date, by: &str, reason: &str) -> Result<DayClose, ApiError> {
    let rule = business_rule(state)?;
    let bounds = day_bounds(rule, day);
    let (_, through, tally) = scan(state, "close", bounds, DayTally::default(), |t, r| t.add(r)).await?;
    let readings = state.node.sm.counter_readings()?;
    let head = CloseHead {
        day,
        station: state.node.config.station.clone(),
        rule,
        closed_at: now(),
        closed_by: by.to_owned(),
        reason: reason.to_owned(),
        ledger_through: through,
    };
    Ok(tally.close(head, &readings))
}

/// `POST /api/v1/days/{day}/close`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloseBody {
    pub reason: String,
}

/// A business day: closed (with its close record) or not (with what a close now would record).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DayOut {
    /// `YYYY-MM-DD`.
    pub day: String,
    pub closed: bool,
    /// Clearing stored the close.
    pub uploaded: bool,
    /// Rows of the reconciliation that do not match; any is an alarm.
    pub discrepancies: u32,
    pub alarm: bool,
    /// The stored close; for a day not closed, a preview computed now (not stored).
    pub close: DayClose,
}

/// One closed day in `GET /api/v1/days`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DaySummary {
    /// `YYYY-MM-DD`.
    pub day: String,
    pub closed_at: afc_domain::model::Timestamp,
    pub discrepancies: u32,
    pub alarm: bool,
    pub uploaded: bool,
}

pub async fn close(
    c: Caller,
    state: web::Data<ApiState>,
    path: web::Path<String>,
    body: web::Json<CloseBody>,
) -> Result<HttpResponse, ApiError> {
    let day = path_day(&path)?;
    let reason = super::reason(&body.reason)?;
    let rule = business_rule(&state)?;
    let (_, until) = day_bounds(rule, day);
    if until > now() {
        return Err(ApiError::Conflict(format!(
            "business day {day} is not over (it ends at {} ms)",
            until.millis()
        )));
    }
    if state.node.sm.state()?.days.contains_key(&day) {
        return Err(ApiError::Conflict(format!("business day {day} is already closed")));
    }
    let record = compute(&state, day, &c.name, &reason).await?;
    let detail = format!("{day}: {} discrepancies; {reason}", record.discrepancies.len());
    let resp =
        state.audited_write(&c, "close_day", detail, Request::CloseDay { close: Box::new(record) }).await?;
    match resp {
        Response::DayClosed { .. } => day_out(&state, day).await.map(|d| HttpResponse::Ok().json(d)),
        other => Err(ApiError::Internal(format!("unexpected answer {other:?}"))),
    }
}

async fn day_out(state: &ApiState, day: Date) -> Result<DayOut, ApiError> {
    let s = state.node.sm.state()?;
    match (s.days.get(&day), state.node.sm.day_close(day)?) {
        (Some(m), Some(close)) => Ok(DayOut {
            day: day.to_string(),
            closed: true,
            uploaded: m.uploaded,
            discrepancies: m.discrepancies,
            alarm: m.discrepancies > 0,
            close,
        }),
        _ => {
            let close = compute(state, day, "", "preview").await?;
            let n = u32::try_from(close.discrepancies.len()).unwrap_or(u32::MAX);
            Ok(DayOut {
                day: day.to_string(),
                closed: false,
                uploaded: false,
                discrepancies: n,
                alarm: n > 0,
                close,
            })
        }
    }
}

pub async fn show(
    _c: Caller,
    state: web::Data<ApiState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let day = path_day(&path)?;
    Ok(HttpResponse::Ok().json(day_out(&state, day).await?))
}

pub async fn list(_c: Caller, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let s = state.node.sm.state()?;
    let out: Vec<DaySummary> = s
        .days
        .iter()
        .rev()
        .map(|(d, m)| DaySummary {
            day: d.to_string(),
            closed_at: m.closed_at,
            discrepancies: m.discrepancies,
            alarm: m.discrepancies > 0,
            uploaded: m.uploaded,
        })
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

/// The query of every report: one `day`, or `from` and `to` (inclusive, at most 31 days); with
/// neither, the last business day that is over (yesterday's).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ReportQuery {
    /// One business day, `YYYY-MM-DD`.
    pub day: Option<String>,
    /// First business day of a range, `YYYY-MM-DD` (with `to`).
    pub from: Option<String>,
    /// Last business day of a range, inclusive.
    pub to: Option<String>,
    /// `json` (default) or `csv` (`text/csv`, a header row).
    pub format: Option<String>,
}

impl ReportQuery {
    /// (first day, last day, csv).
    fn parse(&self, rule: BusinessDayRule) -> Result<(Date, Date, bool), ApiError> {
        let (a, b) = match (&self.day, &self.from, &self.to) {
            (None, None, None) => {
                let d = rule.business_day(now()).plus_days(-1);
                (d, d)
            }
            (Some(d), None, None) => {
                let d = parse_day(d)?;
                (d, d)
            }
            (None, Some(f), Some(t)) => (parse_day(f)?, parse_day(t)?),
            _ => return Err(ApiError::BadRequest("give either day, or from and to".into())),
        };
        if b < a || b.0 - a.0 >= MAX_REPORT_DAYS {
            return Err(ApiError::BadRequest(format!("from..to must be 1 to {MAX_REPORT_DAYS} days")));
        }
        let csv = match self.format.as_deref() {
            None | Some("json") => false,
            Some("csv") => true,
            Some(other) => return Err(ApiError::BadRequest(format!("format {other:?}: json or csv"))),
        };
        Ok((a, b, csv))
    }
}

macro_rules! report_type {
    ($name:ident, $row:ty, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
        pub struct $name {
            /// First and last business day covered, `YYYY-MM-DD`.
            pub from: String,
            pub to: String,
            /// Ledger entries read (0 for the incidents, which come from the counter readings).
            pub scanned: u64,
            pub rows: Vec<$row>,
        }
    };
}

report_type!(FlowReport, FlowRow, "Accepted taps by business day, local hour, direction and gate.");
report_type!(RevenueReport, RevenueRow, "Revenue by business day, medium and fare product.");
report_type!(RejectsReport, RejectsRow, "Refused taps by business day and reason.");
report_type!(IncidentsReport, IncidentRow, "Tailgating and forced passages by business day and gate.");

fn answer<R: CsvRow + Serialize>(
    csv_out: bool,
    (from, to, scanned): (Date, Date, u64),
    rows: Vec<R>,
    wrap: impl FnOnce(String, String, u64, Vec<R>) -> serde_json::Value,
) -> HttpResponse {
    if csv_out {
        HttpResponse::Ok().content_type("text/csv; charset=utf-8").body(csv(&rows))
    } else {
        HttpResponse::Ok().json(wrap(from.to_string(), to.to_string(), scanned, rows))
    }
}

/// Scans the days `a..=b` into the ledger reports.
async fn ledger_reports(state: &ApiState, a: Date, b: Date) -> Result<(Reports, u64), ApiError> {
    let rule = business_rule(state)?;
    let bounds = (day_bounds(rule, a).0, day_bounds(rule, b).1);
    let (read, _, reports) = scan(state, "report", bounds, Reports::default(), move |rep, r| {
        rep.add(rule, rule.business_day(r.occurred_at), r)
    })
    .await?;
    Ok((reports, read))
}

/// One report read from the ledger: the query's days scanned once, `rows` of them, as JSON
/// (`wrap`) or CSV.
async fn ledger_report<R: CsvRow + Serialize>(
    state: &ApiState,
    q: &ReportQuery,
    rows: impl FnOnce(&Reports) -> Vec<R>,
    wrap: impl FnOnce(String, String, u64, Vec<R>) -> serde_json::Value,
) -> Result<HttpResponse, ApiError> {
    let (a, b, csv_out) = q.parse(business_rule(state)?)?;
    let (r, read) = ledger_reports(state, a, b).await?;
    Ok(answer(csv_out, (a, b, read), rows(&r), wrap))
}

pub async fn flow(
    _c: Caller,
    state: web::Data<ApiState>,
    q: web::Query<ReportQuery>,
) -> Result<HttpResponse, ApiError> {
    ledger_report(&state, &q, Reports::flow, |from, to, scanned, rows| {
        serde_json::to_value(FlowReport { from, to, scanned, rows }).unwrap_or_default()
    })
    .await
}

pub async fn revenue(
    _c: Caller,
    state: web::Data<ApiState>,
    q: web::Query<ReportQuery>,
) -> Result<HttpResponse, ApiError> {
    ledger_report(&state, &q, Reports::revenue, |from, to, scanned, rows| {
        serde_json::to_value(RevenueReport { from, to, scanned, rows }).unwrap_or_default()
    })
    .await
}

pub async fn rejects(
    _c: Caller,
    state: web::Data<ApiState>,
    q: web::Query<ReportQuery>,
) -> Result<HttpResponse, ApiError> {
    ledger_report(&state, &q, Reports::rejects, |from, to, scanned, rows| {
        serde_json::to_value(RejectsReport { from, to, scanned, rows }).unwrap_or_default()
    })
    .await
}

pub async fn incidents(
    _c: Caller,
    state: web::Data<ApiState>,
    q: web::Query<ReportQuery>,
) -> Result<HttpResponse, ApiError> {
    let rule = business_rule(&state)?;
    let (a, b, csv_out) = q.parse(rule)?;
    let readings: BTreeMap<_, _> = state.node.sm.counter_readings()?;
    let rows = day::incidents(rule, (a.0..=b.0).map(Date), &readings);
    Ok(answer(csv_out, (a, b, 0), rows, |from, to, scanned, rows| {
        serde_json::to_value(IncidentsReport { from, to, scanned, rows }).unwrap_or_default()
    }))
}
