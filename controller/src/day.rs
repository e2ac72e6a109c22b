//! End of business day (issue 14 items 3 and 4) as pure logic: the close record of one business
//! day, its reconciliation against the gates' own passage counters, and the reports.
//!
//! The business day is the fare rule's ([`BusinessDayRule`], Dalian: rolls over at 04:00 local):
//! day `D` is the instants `[start(D), start(D + 1))`, and a ledger record belongs to the day its
//! `occurred_at` falls in (the gate's clock, as recorded).
//!
//! Where the PLC's figures come from: a gate's PLC counts completed passages in running registers
//! (`entries_total`, `exits_total` u32, `tailgating_total` u16, SPEC §6) that the gate reports in
//! every heartbeat, with its count of forced-passage alarms. The leader records through Raft a
//! [`CounterReading`] per gate at the first heartbeat it sees from the gate, and at the first one
//! after each business-day boundary (task `counter-readings`, [`crate::leader::readings`]). A
//! day's PLC passages are then `reading(first at or after start(D + 1)) − reading(first at or
//! after start(D))`, with the registers' wrapping arithmetic. The error: passages between a
//! boundary and the reading after it (at most one heartbeat period, 5 s, plus the task's 5 s
//! poll) count in the next day, on the PLC side only. A gate first seen in the middle of a day has
//! its start reading then (taps before it are listed as unmatched taps). A day without an end
//! reading (the gate silent since) reconciles as `plc: null`, listed, never as a match.
//!
//! The close is computed once, from a scan of the ledger, by the node that takes the request, and
//! carried whole in [`crate::state::Request::CloseDay`], so applying it is cheap and
//! deterministic (no node rescans 200,000 records inside the state machine, and every node stores
//! the same bytes whatever it had applied when the request arrived).

use std::collections::BTreeMap;

use afc_domain::ledger::TxRecord;
use afc_domain::model::{BusinessDayRule, Date, Direction, Ident, Media, Timestamp};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A gate's PLC counters as its heartbeat reported them, recorded through Raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CounterValues {
    /// `entries_total` (u32 register).
    pub entries: u64,
    /// `exits_total` (u32 register).
    pub exits: u64,
    /// `tailgating_total` (u16 register).
    pub tailgating: u64,
    /// Forced-passage alarms the gate agent counted since it started.
    pub forced_passage: u64,
}

/// One reading of a gate's counters ([`crate::state::Request::RecordCounters`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CounterReading {
    pub gate: Ident,
    /// When the heartbeat arrived (the leader's clock).
    pub at: Timestamp,
    #[schema(value_type = String, format = Date)]
    /// The business day `at` is in, under the rule in force when it was taken (informative: a
    /// close places readings by `at` under its own rule).
    pub business_day: Date,
    #[serde(flatten)]
    pub counters: CounterValues,
}

impl CounterValues {
    /// Passages counted from `self` to `later`: the PLC registers wrap (u32, u16); the gate's
    /// forced-passage count restarts at 0 with the agent (then the later value is the count).
    pub fn until(&self, later: &CounterValues) -> CounterValues {
        let wrap32 = |a: u64, b: u64| u64::from((b as u32).wrapping_sub(a as u32));
        let wrap16 = |a: u64, b: u64| u64::from((b as u16).wrapping_sub(a as u16));
        CounterValues {
            entries: wrap32(self.entries, later.entries),
            exits: wrap32(self.exits, later.exits),
            tailgating: wrap16(self.tailgating, later.tailgating),
            forced_passage: later
                .forced_passage
                .checked_sub(self.forced_passage)
                .unwrap_or(later.forced_passage),
        }
    }
}

/// The instants of business day `day` under `rule`: `[start, end)`.
pub fn day_bounds(rule: BusinessDayRule, day: Date) -> (Timestamp, Timestamp) {
    let start = |d: Date| {
        Timestamp::from_local(d, 0, 0, rule.utc_offset_minutes)
            .plus_minutes(i64::from(rule.rollover_minute_of_day))
    };
    (start(day), start(day.plus_days(1)))
}

/// The local hour (0–23) of `t` at the rule's UTC offset.
pub fn local_hour(rule: BusinessDayRule, t: Timestamp) -> u8 {
    let local = t.millis().saturating_add(i64::from(rule.utc_offset_minutes) * Timestamp::MINUTE_MS);
    (local.rem_euclid(Timestamp::DAY_MS) / (60 * Timestamp::MINUTE_MS)) as u8
}

/// Totals of one (gate, medium, direction) in a day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TotalRow {
    pub gate: Ident,
    #[schema(value_type = String)]
    pub media: Media,
    #[schema(value_type = String)]
    pub direction: Direction,
    /// Accepted taps (the flaps opened), voided ones included.
    pub accepted: u64,
    /// Refused taps.
    pub rejected: u64,
    /// Accepted taps whose passage a later `passage_not_made` record voided.
    pub voided: u64,
    /// Fen charged by the accepted taps (qr: 0, clearing charges the account).
    pub revenue_fen: u64,
    /// Fen not collected under fare_free.
    pub shortfall_fen: u64,
}

/// Refused taps of one reason in a day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RejectRow {
    /// The reason's ledger code.
    pub code: u16,
    pub reason: String,
    pub count: u64,
}

/// One gate and direction: what the PLC counted against what the ledger recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Reconciliation {
    pub gate: Ident,
    #[schema(value_type = String)]
    pub direction: Direction,
    /// Passages the PLC counted in the day; null without both readings.
    pub plc_passages: Option<u64>,
    /// Accepted taps minus voided passages.
    pub recorded_taps: u64,
    /// `plc_passages − recorded_taps` (positive: passages without a recorded tap; negative:
    /// taps without a passage); null without both readings.
    pub difference: Option<i64>,
    /// Tailgating detections and forced passages of the gate in the day (both directions).
    pub tailgating: Option<u64>,
    pub forced_passage: Option<u64>,
    /// The readings the PLC figures come from.
    pub from_reading: Option<Timestamp>,
    pub until_reading: Option<Timestamp>,
}

impl Reconciliation {
    /// Whether this row is a discrepancy: the figures differ (a forced passage is a passage
    /// without a tap: it shows here), or they cannot be compared while the ledger holds taps.
    pub fn is_discrepancy(&self) -> bool {
        self.difference.map_or(self.recorded_taps > 0, |d| d != 0)
    }
}

/// The close of one business day, as replicated and sent to clearing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DayClose {
    #[schema(value_type = String, format = Date)]
    pub day: Date,
    pub station: Ident,
    /// The rule the day's bounds come from (the current fare table's).
    pub rule: BusinessDayRule,
    /// The day's instants `[from, until)`.
    pub from: Timestamp,
    pub until: Timestamp,
    pub closed_at: Timestamp,
    pub closed_by: String,
    pub reason: String,
    /// The ledger was read through this index (records of the day appended later are not in it).
    pub ledger_through: u64,
    /// Ledger records of the day.
    pub records: u64,
    pub totals: Vec<TotalRow>,
    pub rejects: Vec<RejectRow>,
    /// Every gate and direction, matched or not.
    pub reconciliation: Vec<Reconciliation>,
    /// The rows of `reconciliation` that do not match.
    pub discrepancies: Vec<Reconciliation>,
}

/// Who closes which day, and how far the ledger was read.
#[derive(Debug, Clone)]
pub struct CloseHead {
    pub day: Date,
    pub station: Ident,
    pub rule: BusinessDayRule,
    pub closed_at: Timestamp,
    pub closed_by: String,
    pub reason: String,
    pub ledger_through: u64,
}

/// What a scan of one day's records adds up (see [`DayTally::add`]).
#[derive(Debug, Clone, Default)]
pub struct DayTally {
    pub records: u64,
    totals: BTreeMap<(Ident, u8, u8), TotalRow>,
    rejects: BTreeMap<u16, RejectRow>,
}

impl DayTally {
    /// Counts one record of the day.
    pub fn add(&mut self, r: &TxRecord) {
        self.records += 1;
        let key = (r.gate.clone(), r.media.code(), r.direction.code());
        let row = self.totals.entry(key).or_insert_with(|| TotalRow::empty(r));
        if r.voids.is_some() {
            // A compensating record: the voided tap's passage did not happen.
            row.voided += 1;
        } else if r.accepted {
            row.accepted += 1;
            row.revenue_fen += u64::from(r.fare_fen);
            row.shortfall_fen += u64::from(r.shortfall_fen);
        } else {
            row.rejected += 1;
            let code = r.reason.code();
            self.rejects
                .entry(code)
                .or_insert_with(|| RejectRow { code, reason: r.reason.as_str().to_owned(), count: 0 })
                .count += 1;
        }
    }

    /// The close record from this tally and the gates' readings (each gate's, sorted by `at`).
    pub fn close(self, head: CloseHead, readings: &BTreeMap<Ident, Vec<CounterReading>>) -> DayClose {
        let (from, until) = day_bounds(head.rule, head.day);
        let mut taps: BTreeMap<(Ident, u8), u64> = BTreeMap::new();
        for row in self.totals.values() {
            let t = taps.entry((row.gate.clone(), row.direction.code())).or_default();
            *t = (*t + row.accepted).saturating_sub(row.voided);
        }
        let mut gates: Vec<Ident> = taps.keys().map(|(g, _)| g.clone()).collect();
        gates.extend(readings.keys().cloned());
        gates.sort();
        gates.dedup();
        let mut reconciliation = Vec::new();
        for gate in gates {
            let rs = readings.get(&gate).map(Vec::as_slice).unwrap_or_default();
            let start = rs.iter().find(|r| r.at >= from && r.at < until);
            let end = rs.iter().find(|r| r.at >= until);
            let plc = match (start, end) {
                (Some(s), Some(e)) => Some(s.counters.until(&e.counters)),
                _ => None,
            };
            for dir in [Direction::Entry, Direction::Exit] {
                let recorded = taps.get(&(gate.clone(), dir.code())).copied().unwrap_or(0);
                let plc_passages = plc.map(|p| if dir == Direction::Entry { p.entries } else { p.exits });
                if recorded == 0 && start.is_none() {
                    // The gate was not there that day (no tap, no reading in it): no row.
                    continue;
                }
                reconciliation.push(Reconciliation {
                    gate: gate.clone(),
                    direction: dir,
                    plc_passages,
                    recorded_taps: recorded,
                    difference: plc_passages.map(|p| p as i64 - recorded as i64),
                    tailgating: plc.map(|p| p.tailgating),
                    forced_passage: plc.map(|p| p.forced_passage),
                    from_reading: start.map(|r| r.at),
                    until_reading: end.map(|r| r.at),
                });
            }
        }
        let discrepancies = reconciliation.iter().filter(|r| r.is_discrepancy()).cloned().collect();
        DayClose {
            day: head.day,
            station: head.station,
            rule: head.rule,
            from,
            until,
            closed_at: head.closed_at,
            closed_by: head.closed_by,
            reason: head.reason,
            ledger_through: head.ledger_through,
            records: self.records,
            totals: self.totals.into_values().collect(),
            rejects: self.rejects.into_values().collect(),
            reconciliation,
            discrepancies,
        }
    }
}

impl TotalRow {
    fn empty(r: &TxRecord) -> TotalRow {
        TotalRow {
            gate: r.gate.clone(),
            media: r.media,
            direction: r.direction,
            accepted: 0,
            rejected: 0,
            voided: 0,
            revenue_fen: 0,
            shortfall_fen: 0,
        }
    }
}

/// Accepted taps of one business day, local hour, direction and gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FlowRow {
    #[schema(value_type = String, format = Date)]
    pub day: Date,
    /// Local hour (the rule's UTC offset), 0–23.
    pub hour: u8,
    #[schema(value_type = String)]
    pub direction: Direction,
    pub gate: Ident,
    pub taps: u64,
}

/// Revenue of one business day, medium and fare product. The ledger record carries no card type
/// (the concession is applied on the card), so the product is the accepting reason (`ok`,
/// `ok_fare_shortfall`, `ok_train_disruption`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RevenueRow {
    #[schema(value_type = String, format = Date)]
    pub day: Date,
    #[schema(value_type = String)]
    pub media: Media,
    pub product: String,
    pub taps: u64,
    pub revenue_fen: u64,
    pub shortfall_fen: u64,
}

/// Refused taps of one business day and reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RejectsRow {
    #[schema(value_type = String, format = Date)]
    pub day: Date,
    pub code: u16,
    pub reason: String,
    pub count: u64,
}

/// Tailgating and forced passages of one gate in one business day, from its counter readings
/// (null without a reading at both ends of the day).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IncidentRow {
    #[schema(value_type = String, format = Date)]
    pub day: Date,
    pub gate: Ident,
    pub tailgating: Option<u64>,
    pub forced_passage: Option<u64>,
    /// The PLC's passages, for scale.
    pub entries: Option<u64>,
    pub exits: Option<u64>,
}

/// One CSV line per row, after a header.
pub trait CsvRow {
    const HEADER: &'static str;
    fn csv_line(&self, out: &mut String);
}

fn opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

impl CsvRow for FlowRow {
    const HEADER: &'static str = "day,hour,direction,gate,taps";
    fn csv_line(&self, out: &mut String) {
        out.push_str(&format!(
            "{},{},{},{},{}\n",
            self.day,
            self.hour,
            self.direction.as_str(),
            self.gate,
            self.taps
        ));
    }
}

impl CsvRow for RevenueRow {
    const HEADER: &'static str = "day,media,product,taps,revenue_fen,shortfall_fen";
    fn csv_line(&self, out: &mut String) {
        out.push_str(&format!(
            "{},{},{},{},{},{}\n",
            self.day,
            self.media.as_str(),
            self.product,
            self.taps,
            self.revenue_fen,
            self.shortfall_fen
        ));
    }
}

impl CsvRow for RejectsRow {
    const HEADER: &'static str = "day,code,reason,count";
    fn csv_line(&self, out: &mut String) {
        out.push_str(&format!("{},{},{},{}\n", self.day, self.code, self.reason, self.count));
    }
}

impl CsvRow for IncidentRow {
    const HEADER: &'static str = "day,gate,tailgating,forced_passage,entries,exits";
    fn csv_line(&self, out: &mut String) {
        out.push_str(&format!(
            "{},{},{},{},{},{}\n",
            self.day,
            self.gate,
            opt(self.tailgating),
            opt(self.forced_passage),
            opt(self.entries),
            opt(self.exits)
        ));
    }
}

/// The rows as CSV text with a header line (every field is a number, a date or an identifier:
/// nothing needs quoting).
pub fn csv<R: CsvRow>(rows: &[R]) -> String {
    let mut out = String::with_capacity(64 * (rows.len() + 1));
    out.push_str(R::HEADER);
    out.push('\n');
    for r in rows {
        r.csv_line(&mut out);
    }
    out
}

/// The ledger reports over a range of business days, fed one record at a time.
#[derive(Debug, Clone, Default)]
pub struct Reports {
    flow: BTreeMap<(Date, u8, u8, Ident), u64>,
    revenue: BTreeMap<(Date, u8, u16), (u64, u64, u64)>,
    rejects: BTreeMap<(Date, u16), u64>,
}

impl Reports {
    /// Counts `r`, whose business day is `day`.
    pub fn add(&mut self, rule: BusinessDayRule, day: Date, r: &TxRecord) {
        if r.voids.is_some() {
            return;
        }
        if r.accepted {
            let hour = local_hour(rule, r.occurred_at);
            *self.flow.entry((day, hour, r.direction.code(), r.gate.clone())).or_default() += 1;
            let e = self.revenue.entry((day, r.media.code(), r.reason.code())).or_default();
            e.0 += 1;
            e.1 += u64::from(r.fare_fen);
            e.2 += u64::from(r.shortfall_fen);
        } else {
            *self.rejects.entry((day, r.reason.code())).or_default() += 1;
        }
    }

    pub fn flow(&self) -> Vec<FlowRow> {
        self.flow
            .iter()
            .filter_map(|((day, hour, dir, gate), taps)| {
                Some(FlowRow {
                    day: *day,
                    hour: *hour,
                    direction: Direction::from_code(*dir)?,
                    gate: gate.clone(),
                    taps: *taps,
                })
            })
            .collect()
    }

    pub fn revenue(&self) -> Vec<RevenueRow> {
        self.revenue
            .iter()
            .filter_map(|((day, media, reason), (taps, fen, short))| {
                Some(RevenueRow {
                    day: *day,
                    media: Media::from_code(*media)?,
                    product: afc_domain::model::Reason::from_code(*reason)?.as_str().to_owned(),
                    taps: *taps,
                    revenue_fen: *fen,
                    shortfall_fen: *short,
                })
            })
            .collect()
    }

    pub fn rejects(&self) -> Vec<RejectsRow> {
        self.rejects
            .iter()
            .map(|((day, code), count)| RejectsRow {
                day: *day,
                code: *code,
                reason: afc_domain::model::Reason::from_code(*code)
                    .map_or("unknown", |r| r.as_str())
                    .to_owned(),
                count: *count,
            })
            .collect()
    }
}

/// Tailgating and forced passages per gate and day of `days`, from the readings (each gate's
/// sorted by `at`).
pub fn incidents(
    rule: BusinessDayRule,
    days: impl Iterator<Item = Date>,
    readings: &BTreeMap<Ident, Vec<CounterReading>>,
) -> Vec<IncidentRow> {
    let mut out = Vec::new();
    for day in days {
        let (from, until) = day_bounds(rule, day);
        for (gate, rs) in readings {
            let start = rs.iter().find(|r| r.at >= from && r.at < until);
            let end = rs.iter().find(|r| r.at >= until);
            if start.is_none() {
                continue;
            }
            let d = start.zip(end).map(|(s, e)| s.counters.until(&e.counters));
            out.push(IncidentRow {
                day,
                gate: gate.clone(),
                tailgating: d.map(|d| d.tailgating),
                forced_passage: d.map(|d| d.forced_passage),
                entries: d.map(|d| d.entries),
                exits: d.map(|d| d.exits),
            });
        }
    }
    out
}
