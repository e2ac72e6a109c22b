//! Bank-card charges as pure logic (issue 15 item 2, bank part): the priced bank journeys of
//! [`crate::journeys`] aggregated per token and business day into one charge, the optional daily
//! cap, the acquirer simulation, what a charge pass must submit, and the acquirer's settlement file.
//! No I/O: the store is [`crate::charges`], the pass that drives both is `state.rs`.
//!
//! A transit aggregator does not charge a card per journey: it lets the card in on an offline
//! first-tap risk decision (the gate's deny list and unpaid-tap limit stand in for the first-tap
//! authorisation here) and settles **once per token and business day**, the day's fares added up
//! and capped. So a token-day is submitted once, when it is *due*: its business day has ended and
//! the stations have closed that day (the station's day close, `days.jsonl`: at least one station
//! closed it and every station that closes days did, but for one whose first close is later), so
//! its journeys are in. Journeys of a charged day that arrive later (a station that uploads late, an
//! entry that aged into an unpaired one) are submitted as an **adjustment**: the difference between
//! the day's capped total now and what was submitted before, never more than the cap in all. The
//! total only ever grows, so a charge is never taken back.
//!
//! Before any of that, a token is **authorised at first sight** ([`to_authorise`]): the first
//! pass that finds a token in a journey or an open entry submits a zero-amount authorisation
//! (attempt 0), as an aggregator checks a card at its first tap of the day. A declined
//! authorisation puts the token on every station's deny list at once, without waiting for the day
//! to end: so a card the acquirer refuses rides at most its first journey and the gates' unpaid-tap
//! limit, not a whole day.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use afc_domain::bank::BankToken;
use afc_domain::model::{Date, Timestamp};
use serde::{Deserialize, Serialize};

use crate::journeys::{Journey, JourneyKey};

/// One token's journeys of one business day, added up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenDay {
    pub token: BankToken,
    pub business_day: Date,
    pub journeys: u32,
    /// The day's fares added up, before the cap.
    pub before_cap_fen: u64,
    /// What the day costs: `before_cap_fen`, at most the cap.
    pub capped_fen: u64,
    /// When the business day ends (the latest of its journeys' `day_ends_at`).
    pub ends_at: Timestamp,
}

/// The bank journeys among `journeys` per (token, business day), capped at `cap_fen` a day.
pub fn token_days(journeys: &[Journey], cap_fen: Option<u32>) -> Vec<TokenDay> {
    let mut days: BTreeMap<(BankToken, Date), TokenDay> = BTreeMap::new();
    for j in journeys {
        let JourneyKey::Bank { token } = j.key else { continue };
        let d = days.entry((token, j.business_day)).or_insert(TokenDay {
            token,
            business_day: j.business_day,
            journeys: 0,
            before_cap_fen: 0,
            capped_fen: 0,
            ends_at: j.day_ends_at,
        });
        d.journeys += 1;
        d.before_cap_fen += u64::from(j.fare_fen);
        d.ends_at = d.ends_at.max(j.day_ends_at);
    }
    days.into_values()
        .map(|mut d| {
            d.capped_fen = cap_fen.map_or(d.before_cap_fen, |c| d.before_cap_fen.min(u64::from(c)));
            d
        })
        .collect()
}

/// What the acquirer answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeResult {
    Approved,
    /// Not paid: the token goes on every station's deny list.
    Declined,
}

impl ChargeResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeResult::Approved => "approved",
            ChargeResult::Declined => "declined",
        }
    }
}

/// One submission to the acquirer and its answer, as stored (one line of `bank_charges.jsonl`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Charge {
    pub token: BankToken,
    pub business_day: Date,
    /// 1 for the day's charge, 2, 3, … for its adjustments; `(token, business_day, attempt)` is
    /// the idempotency key a real acquirer would be given, and is stored once.
    pub attempt: u32,
    /// The day's journeys when submitted.
    pub journeys: u32,
    /// The day's fares before the cap, when submitted.
    pub before_cap_fen: u64,
    /// What this submission asked for: the day's capped total less what was submitted before.
    pub amount_fen: u64,
    pub result: ChargeResult,
    /// When the pass that submitted it ran.
    pub at: Timestamp,
}

/// The acquirer simulation: a fixed set of tokens is declined, every other charge approved.
#[derive(Debug, Clone, Default)]
pub struct Acquirer {
    declined: BTreeSet<BankToken>,
}

impl Acquirer {
    pub fn new(declined: BTreeSet<BankToken>) -> Acquirer {
        Acquirer { declined }
    }

    /// The answer to a charge of `amount_fen` to `token` for `business_day`, submission `attempt`.
    ///
    /// `(token, business_day, attempt)` is the idempotency key a real acquirer is given: the pass
    /// submits before its answer is fsynced, so a crash in between makes the next pass submit
    /// the same key again, and the acquirer must answer it with its first answer, not charge
    /// twice (the simulation's answer depends on the token only, so it does).
    pub fn submit(
        &self,
        token: &BankToken,
        business_day: Date,
        attempt: u32,
        amount_fen: u64,
    ) -> ChargeResult {
        let _ = (business_day, attempt, amount_fen);
        if self.declined.contains(token) {
            ChargeResult::Declined
        } else {
            ChargeResult::Approved
        }
    }
}

/// The first-tap authorisations a pass should make: each bank token among `priced`'s journeys and
/// open entries for which nothing was ever submitted, once, with the business day of its first
/// tap seen (`day_of` turns an open entry's time into its business day).
pub fn to_authorise(
    priced: &crate::journeys::Priced,
    stored: &[Charge],
    day_of: impl Fn(Timestamp) -> Date,
) -> Vec<(BankToken, Date)> {
    let known: BTreeSet<BankToken> = stored.iter().map(|c| c.token).collect();
    let mut first: BTreeMap<BankToken, Date> = BTreeMap::new();
    let seen = priced
        .journeys
        .iter()
        .filter_map(|j| match j.key {
            JourneyKey::Bank { token } => Some((token, j.business_day)),
            _ => None,
        })
        .chain(priced.pending.iter().filter_map(|p| match p.key {
            JourneyKey::Bank { token } => Some((token, day_of(p.tap.at))),
            _ => None,
        }));
    for (token, day) in seen {
        if known.contains(&token) {
            continue;
        }
        let d = first.entry(token).or_insert(day);
        *d = (*d).min(day);
    }
    first.into_iter().collect()
}

/// A token-day's submission this pass should make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub day: TokenDay,
    pub attempt: u32,
    pub amount_fen: u64,
}

/// What the token-days owe beyond what was submitted for them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Owed {
    /// Submissions to make now.
    pub due: Vec<Due>,
    /// Token-days that owe something but are not due yet (their day has not ended, or not every
    /// station has closed it).
    pub waiting: u64,
}

/// The submissions due at `as_of`: for every token-day whose business day has ended and which
/// `closed` says every station has closed, what its capped total exceeds the sum already
/// submitted for it in `stored` (declined submissions count as submitted: a declined day is not
/// charged again, it is a debt).
pub fn due(days: &[TokenDay], stored: &[Charge], as_of: Timestamp, closed: &dyn Fn(Date) -> bool) -> Owed {
    let mut submitted: BTreeMap<(BankToken, Date), (u64, u32)> = BTreeMap::new();
    for c in stored {
        let s = submitted.entry((c.token, c.business_day)).or_default();
        s.0 += c.amount_fen;
        s.1 = s.1.max(c.attempt);
    }
    let mut owed = Owed::default();
    for d in days {
        let (sum, last) = submitted.get(&(d.token, d.business_day)).copied().unwrap_or_default();
        if d.capped_fen <= sum {
            continue;
        }
        if as_of >= d.ends_at && closed(d.business_day) {
            owed.due.push(Due { day: d.clone(), attempt: last + 1, amount_fen: d.capped_fen - sum });
        } else {
            owed.waiting += 1;
        }
    }
    owed
}

/// What one charge pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PassReport {
    /// Charges submitted (and stored) by this pass: attempt 1 and later.
    pub submitted: u64,
    /// First-tap authorisations (attempt 0) made by this pass, and how many were declined.
    pub authorised: u64,
    pub auth_declined: u64,
    pub approved: u64,
    pub declined: u64,
    /// `deny_list` items published (one per declined token and station).
    pub deny_items: u64,
    /// Token-days owing something that are not due yet.
    pub waiting: u64,
}

/// One token-day as the charges report and the settlement file show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DayCharge {
    pub token: BankToken,
    pub business_day: Date,
    pub journeys: u32,
    pub before_cap_fen: u64,
    /// Approved, in all submissions of the day.
    pub charged_fen: u64,
    /// Declined, in all submissions of the day.
    pub declined_fen: u64,
    /// `approved`, `declined`, or `partly_declined` (some submissions of the day declined).
    pub result: &'static str,
    pub submissions: u32,
}

/// The stored charges of business day `day`, one row per token.
pub fn day_charges(stored: &[Charge], day: Date) -> Vec<DayCharge> {
    let mut rows: BTreeMap<BankToken, DayCharge> = BTreeMap::new();
    let mut refused: BTreeSet<BankToken> = BTreeSet::new();
    // An approved first-tap authorisation charges nothing and is not a row of its own; a declined
    // one is (the token is a debt and goes on the deny list).
    let shown = |c: &&Charge| c.business_day == day && (c.attempt > 0 || c.result == ChargeResult::Declined);
    for c in stored.iter().filter(shown) {
        let row = rows.entry(c.token).or_insert(DayCharge {
            token: c.token,
            business_day: day,
            journeys: 0,
            before_cap_fen: 0,
            charged_fen: 0,
            declined_fen: 0,
            result: "approved",
            submissions: 0,
        });
        // Each submission carries the day's figures as of then: the latest is the day's.
        row.journeys = row.journeys.max(c.journeys);
        row.before_cap_fen = row.before_cap_fen.max(c.before_cap_fen);
        row.submissions += 1;
        match c.result {
            ChargeResult::Approved => row.charged_fen += c.amount_fen,
            ChargeResult::Declined => {
                row.declined_fen += c.amount_fen;
                refused.insert(c.token);
            }
        }
        row.result = match (row.charged_fen > 0, refused.contains(&c.token)) {
            (_, false) => "approved",
            (false, true) => "declined",
            (true, true) => "partly_declined",
        };
    }
    rows.into_values().collect()
}

/// The acquirer settlement file of one business day: a CSV line per token-day, then the total.
pub fn settlement_csv(rows: &[DayCharge], day: Date) -> String {
    let mut out =
        String::from("business_day,token,journeys,amount_before_cap_fen,amount_charged_fen,result\n");
    let mut charged = 0u64;
    for r in rows {
        let _ = writeln!(
            out,
            "{day},{},{},{},{},{}",
            r.token, r.journeys, r.before_cap_fen, r.charged_fen, r.result
        );
        charged += r.charged_fen;
    }
    let _ = writeln!(out, "# total,{day},{} token-days,{charged} fen charged", rows.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journeys::Outcome;

    fn day(d: u32) -> Date {
        Date::from_ymd(2026, 12, d).unwrap()
    }

    fn journey(token: u8, d: u32, fare_fen: u32) -> Journey {
        Journey {
            key: JourneyKey::Bank { token: BankToken([token; 32]) },
            business_day: day(d),
            day_ends_at: Timestamp(i64::from(d) * 1_000),
            outcome: Outcome::Paired,
            entry: None,
            exit: None,
            from: None,
            to: None,
            fare_fen,
            overstay_fen: 0,
            free_reason: None,
            network_version: 1,
            rule_version: 1,
        }
    }

    fn stored(d: &Due, result: ChargeResult) -> Charge {
        Charge {
            token: d.day.token,
            business_day: d.day.business_day,
            attempt: d.attempt,
            journeys: d.day.journeys,
            before_cap_fen: d.day.before_cap_fen,
            amount_fen: d.amount_fen,
            result,
            at: Timestamp(0),
        }
    }

    #[test]
    fn a_token_day_is_due_once_after_its_day_ended_and_closed_and_late_journeys_are_an_adjustment_under_the_cap(
    ) {
        let mut journeys =
            vec![journey(1, 2, 300), journey(1, 2, 400), journey(1, 3, 200), journey(2, 2, 500)];
        let days = token_days(&journeys, Some(800));
        assert_eq!(
            days.iter()
                .map(|d| (d.token.0[0], d.business_day, d.before_cap_fen, d.capped_fen))
                .collect::<Vec<_>>(),
            vec![(1, day(2), 700, 700), (1, day(3), 200, 200), (2, day(2), 500, 500)]
        );
        // Day 3 has not ended at 2_500; day 2 is not closed everywhere yet, then is.
        let none = due(&days, &[], Timestamp(2_500), &|_| false);
        assert!(none.due.is_empty() && none.waiting == 3, "{none:?}");
        let owed = due(&days, &[], Timestamp(2_500), &|d| d == day(2));
        assert_eq!(owed.waiting, 1);
        let now = owed.due;
        assert_eq!(
            now.iter().map(|d| (d.day.token.0[0], d.attempt, d.amount_fen)).collect::<Vec<_>>(),
            [(1, 1, 700), (2, 1, 500)]
        );
        let mut charges: Vec<Charge> =
            vec![stored(&now[0], ChargeResult::Approved), stored(&now[1], ChargeResult::Declined)];
        // Submitted (approved or declined): nothing due again.
        assert!(due(&days, &charges, Timestamp(2_500), &|d| d == day(2)).due.is_empty());
        // A late journey of day 2: only up to the cap, as attempt 2.
        journeys.push(journey(1, 2, 300));
        let days = token_days(&journeys, Some(800));
        let late = due(&days, &charges, Timestamp(2_500), &|d| d == day(2)).due;
        assert_eq!(
            late.iter().map(|d| (d.day.token.0[0], d.attempt, d.amount_fen)).collect::<Vec<_>>(),
            [(1, 2, 100)]
        );
        charges.push(stored(&late[0], ChargeResult::Approved));
        let rows = day_charges(&charges, day(2));
        assert_eq!(
            rows.iter()
                .map(|r| (r.journeys, r.before_cap_fen, r.charged_fen, r.result, r.submissions))
                .collect::<Vec<_>>(),
            [(3, 1_000, 800, "approved", 2), (1, 500, 0, "declined", 1)]
        );
        let csv = settlement_csv(&rows, day(2));
        assert!(csv.contains(&format!("\n2026-12-02,{},3,1000,800,approved\n", BankToken([1; 32]))), "{csv}");
        assert!(csv.ends_with("# total,2026-12-02,2 token-days,800 fen charged\n"), "{csv}");
    }

    #[test]
    fn the_acquirer_declines_exactly_the_configured_tokens() {
        let acquirer = Acquirer::new([BankToken([9; 32])].into_iter().collect());
        assert_eq!(acquirer.submit(&BankToken([9; 32]), Date(20_000), 1, 100), ChargeResult::Declined);
        assert_eq!(acquirer.submit(&BankToken([8; 32]), Date(20_000), 1, 100), ChargeResult::Approved);
    }
}
