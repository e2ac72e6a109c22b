//! QR and bank journeys priced by clearing (issue 15 item 2).
//!
//! A QR ride code names an account, not a card, and a bank card is charged by its acquirer: for
//! both media the gate records the entry and the exit with fare 0 and leaves the charge to
//! clearing. Here every station's accepted taps of one medium are paired per [`JourneyKey`] (a QR
//! account `(issuer, account)`, or a bank card's full 32-byte payment token, from `record.bank`:
//! the ledger id is only its first 8 bytes) in time order, across stations and days, by one
//! routine for both media, and each journey is priced
//! from the fare table in force **at entry** at the entry station (compiled from that station's
//! feed: the same [`compile`] the controllers run, so the same table the gates hold), at the full
//! single-journey fare: card-type discounts belong to stored-value card products, and neither a
//! ride code nor a bank card carries a card type.
//!
//! Pairing, per account, in time order:
//! - an entry followed by an exit is a journey from the entry's station to the exit's; past the
//!   rule's ride-time limit the overstay surcharge is added;
//! - an entry followed by another entry, or an entry with no exit older than
//!   [`OPEN_ENTRY_MS`] (or the rule's ride-time limit, if longer) is an *unpaired entry*; an exit
//!   with no entry before it an *unpaired exit*. Both are charged the policy fare: the highest
//!   full fare from (for an entry) or to (for an exit) that station in the table in force then;
//! - a younger entry with no exit yet is *pending*: not charged until its exit arrives or it ages;
//! - a tap whose passage was voided (a `passage_not_made` record names it) is not a passage, nor
//!   is a refused tap (`accepted == false`);
//! - a journey (or an unpaired exit) ending with an exit the gate let out free under
//!   train_disruption (`ok_train_disruption`) costs nothing: the journey is listed, with
//!   `free_reason`, at fare 0. (QR exits never carry that reason today; bank exits do.)
//!
//! A journey's business day is the entry's (the exit's for an unpaired exit), by the day boundary
//! of the rule in force then; `day_ends_at` is when that business day ends. Taps that cannot be priced (no tariff in force, a station the network does not list)
//! are listed with the reason, never priced silently.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;

use afc_domain::bank::BankToken;
use afc_domain::ledger::{Installation, TxRecord};
use afc_domain::model::{BusinessDayRule, Date, Direction, Ident, Media, Reason, StationCode, Timestamp};
use afc_domain::network::{compile, FareError, FareRule, FareTable, NetworkDescription};
use serde::Serialize;

use crate::protocol::{FeedItem, FeedKind};

/// How long an entry with no exit stays pending when the rule sets no ride-time limit.
pub const OPEN_ENTRY_MS: i64 = 6 * 3_600_000;

/// One compiled fare table and what it was compiled from.
pub struct Tariff {
    pub network_version: u64,
    pub rule_version: u64,
    pub table: FareTable,
    /// Station id (the station's MQTT identifier) → its code.
    codes: HashMap<String, StationCode>,
}

impl Tariff {
    pub fn new(
        network_version: u64,
        network: &NetworkDescription,
        rule_version: u64,
        rule: &FareRule,
    ) -> Result<Tariff, FareError> {
        let table = compile(network, rule)?;
        let codes = network.stations.iter().map(|s| (s.id.clone(), s.code)).collect();
        Ok(Tariff { network_version, rule_version, table, codes })
    }

    /// The code of the station whose ledger a record came from.
    pub fn code_of(&self, station: &Ident) -> Option<StationCode> {
        self.codes.get(station.as_str()).copied()
    }

    /// The policy fare of an unpaired entry at `s`: the highest full fare from it.
    pub fn max_fare_from(&self, s: StationCode) -> Option<u32> {
        self.table.stations().iter().filter_map(|d| self.table.full_fare_fen(s, *d)).max()
    }

    /// The policy fare of an unpaired exit at `s`: the highest full fare to it.
    pub fn max_fare_to(&self, s: StationCode) -> Option<u32> {
        self.table.stations().iter().filter_map(|o| self.table.full_fare_fen(*o, s)).max()
    }

    fn open_entry_ms(&self) -> i64 {
        let limit = self.table.max_ride_minutes().map_or(0, |m| i64::from(m) * 60_000);
        limit.max(OPEN_ENTRY_MS)
    }
}

/// The tariffs of one station's feed over time: at each instant, the network and the fare rule
/// with the latest `effective_from` not after it (the higher version on a tie), compiled once per
/// pair.
#[derive(Default)]
pub struct Timeline {
    /// Sorted by instant; each step holds from its instant to the next.
    steps: Vec<(Timestamp, Arc<Tariff>)>,
}

impl Timeline {
    /// Builds the timeline from a station's feed items; the other kinds are ignored. A pair that
    /// does not compile is reported and leaves no tariff for its period.
    pub fn from_feed(items: &[FeedItem]) -> (Timeline, Vec<String>) {
        let mut networks: Vec<(Timestamp, u64, NetworkDescription)> = Vec::new();
        let mut rules: Vec<(Timestamp, u64, FareRule)> = Vec::new();
        let mut problems = Vec::new();
        for item in items {
            let body = item.body.get();
            match item.kind {
                FeedKind::Network => match serde_json::from_str(body) {
                    Ok(n) => networks.push((item.effective_from, item.version, n)),
                    Err(e) => problems.push(format!("network v{}: {e}", item.version)),
                },
                FeedKind::FareRule => match serde_json::from_str(body) {
                    Ok(r) => rules.push((item.effective_from, item.version, r)),
                    Err(e) => problems.push(format!("fare_rule v{}: {e}", item.version)),
                },
                _ => {}
            }
        }
        let mut instants: Vec<Timestamp> =
            networks.iter().map(|n| n.0).chain(rules.iter().map(|r| r.0)).collect();
        instants.sort_unstable();
        instants.dedup();
        fn latest<T>(t: Timestamp, list: &[(Timestamp, u64, T)]) -> Option<usize> {
            (0..list.len()).filter(|i| list[*i].0 <= t).max_by_key(|i| (list[*i].0, list[*i].1))
        }
        let mut compiled: HashMap<(u64, u64), Option<Arc<Tariff>>> = HashMap::new();
        let mut steps = Vec::new();
        for t in instants {
            let (Some(n), Some(r)) = (latest(t, &networks), latest(t, &rules)) else { continue };
            let ((_, nv, net), (_, rv, rule)) = (&networks[n], &rules[r]);
            let tariff = compiled
                .entry((*nv, *rv))
                .or_insert_with(|| match Tariff::new(*nv, net, *rv, rule) {
                    Ok(t) => Some(Arc::new(t)),
                    Err(e) => {
                        problems.push(format!("network v{nv} with fare_rule v{rv}: {e}"));
                        None
                    }
                })
                .clone();
            if let Some(tariff) = tariff {
                steps.push((t, tariff));
            }
        }
        (Timeline { steps }, problems)
    }

    /// The tariff in force at `t`.
    pub fn at(&self, t: Timestamp) -> Option<&Arc<Tariff>> {
        let i = self.steps.partition_point(|(from, _)| *from <= t);
        self.steps.get(i.checked_sub(1)?).map(|(_, tariff)| tariff)
    }
}

/// Which tap of which gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TapRef {
    pub station: Ident,
    pub gate: Ident,
    pub gate_seq: u64,
    pub at: Timestamp,
}

impl TapRef {
    fn of(r: &TxRecord) -> TapRef {
        TapRef { station: r.station.clone(), gate: r.gate.clone(), gate_seq: r.gate_seq, at: r.occurred_at }
    }
}

/// How a journey came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Paired,
    UnpairedEntry,
    UnpairedExit,
}

/// Whose journeys are paired together: one QR account, or one bank card. In JSON its fields sit
/// in the journey itself (`issuer`, `account` or `token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(untagged)]
pub enum JourneyKey {
    /// A QR ride code's account at its issuer (the ledger id is the account).
    Qr { issuer: u16, account: u64 },
    /// A bank card's payment token, in full (the ledger id is only its deny key).
    Bank { token: BankToken },
}

impl JourneyKey {
    /// The key of an accepted-or-not tap of `media`, if the record is one and carries what the
    /// key needs (a QR record its `qr`, a bank record its `bank`).
    fn of(r: &TxRecord, media: Media) -> Option<JourneyKey> {
        match (media, r.media) {
            (Media::Qr, Media::Qr) => r.qr.map(|q| JourneyKey::Qr { issuer: q.issuer, account: r.id }),
            (Media::Bank, Media::Bank) => r.bank.map(|b| JourneyKey::Bank { token: b.token }),
            _ => None,
        }
    }

    /// The QR issuer, for a QR key.
    pub fn issuer(&self) -> Option<u16> {
        match self {
            JourneyKey::Qr { issuer, .. } => Some(*issuer),
            JourneyKey::Bank { .. } => None,
        }
    }

    /// The bank token, for a bank key.
    pub fn token(&self) -> Option<BankToken> {
        match self {
            JourneyKey::Bank { token } => Some(*token),
            JourneyKey::Qr { .. } => None,
        }
    }
}

/// One charge to a QR account or a bank card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Journey {
    #[serde(flatten)]
    pub key: JourneyKey,
    pub business_day: Date,
    /// When `business_day` ends, by the rule in force at the journey: a bank card's day is
    /// charged after it.
    pub day_ends_at: Timestamp,
    pub outcome: Outcome,
    pub entry: Option<TapRef>,
    pub exit: Option<TapRef>,
    pub from: Option<StationCode>,
    pub to: Option<StationCode>,
    pub fare_fen: u32,
    /// Included in `fare_fen`: the rule's surcharge for a ride over its time limit.
    pub overstay_fen: u32,
    /// Why the journey costs nothing though it was priced (`ok_train_disruption`), if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_reason: Option<Reason>,
    pub network_version: u64,
    pub rule_version: u64,
}

/// A tap that could not be priced, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unpriced {
    pub tap: TapRef,
    pub reason: String,
}

/// An entry still waiting for its exit, and whose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pending {
    #[serde(flatten)]
    pub key: JourneyKey,
    #[serde(flatten)]
    pub tap: TapRef,
}

/// Everything one pricing run found.
#[derive(Debug, Default, Serialize)]
pub struct Priced {
    pub journeys: Vec<Journey>,
    /// Entries still waiting for their exit.
    pub pending: Vec<Pending>,
    pub unpriced: Vec<Unpriced>,
}

/// The accepted passages of `media` among `records`, without the voided ones, per key in time
/// order.
fn passages(records: &[TxRecord], media: Media) -> BTreeMap<JourneyKey, Vec<&TxRecord>> {
    type Key<'a> = (&'a Ident, &'a Ident, Option<Installation>, u64);
    let voided: HashSet<Key> =
        records.iter().filter_map(|r| Some((&r.station, &r.gate, r.installation, r.voids?))).collect();
    let mut by_account: BTreeMap<JourneyKey, Vec<&TxRecord>> = BTreeMap::new();
    for r in records {
        let Some(key) = JourneyKey::of(r, media).filter(|_| r.accepted && r.voids.is_none()) else {
            continue;
        };
        if voided.contains(&(&r.station, &r.gate, r.installation, r.gate_seq)) {
            continue;
        }
        by_account.entry(key).or_default().push(r);
    }
    for taps in by_account.values_mut() {
        taps.sort_by(|a, b| {
            (a.occurred_at, &a.station, &a.gate, a.gate_seq).cmp(&(
                b.occurred_at,
                &b.station,
                &b.gate,
                b.gate_seq,
            ))
        });
    }
    by_account
}

/// Pairs and prices the taps of `media` (QR or bank; no other medium has journeys to price here)
/// among `records` (any stations, any order). `tariffs` gives the timeline of a station's feed;
/// `as_of` decides which open entries have aged into unpaired ones.
pub fn price(
    records: &[TxRecord],
    media: Media,
    tariffs: &dyn Fn(&Ident) -> Option<Arc<Timeline>>,
    as_of: Timestamp,
) -> Priced {
    let mut out = Priced::default();
    for (key, taps) in passages(records, media) {
        let mut open: Option<&TxRecord> = None;
        for tap in taps {
            match tap.direction {
                Direction::Entry => {
                    if let Some(prev) = open.replace(tap) {
                        out.charge_unpaired(key, prev, Outcome::UnpairedEntry, tariffs);
                    }
                }
                Direction::Exit => match open.take() {
                    Some(entry) => out.charge_journey(key, entry, tap, tariffs),
                    None => out.charge_unpaired(key, tap, Outcome::UnpairedExit, tariffs),
                },
            }
        }
        if let Some(entry) = open {
            let aged =
                tariff_at(tariffs, entry).is_ok_and(|t| as_of.0 - entry.occurred_at.0 > t.open_entry_ms());
            if aged {
                out.charge_unpaired(key, entry, Outcome::UnpairedEntry, tariffs);
            } else {
                out.pending.push(Pending { key, tap: TapRef::of(entry) });
            }
        }
    }
    out.journeys.sort_by(|a, b| {
        (a.business_day, a.key, journey_time(a)).cmp(&(b.business_day, b.key, journey_time(b)))
    });
    out
}

fn journey_time(j: &Journey) -> Timestamp {
    j.entry.as_ref().or(j.exit.as_ref()).map_or(Timestamp(0), |t| t.at)
}

/// The tariff in force at the tap's station and time, with the tap's station code.
fn tariff_at(
    tariffs: &dyn Fn(&Ident) -> Option<Arc<Timeline>>,
    tap: &TxRecord,
) -> Result<Arc<Tariff>, String> {
    let timeline = tariffs(&tap.station).ok_or_else(|| format!("station {} has no feed", tap.station))?;
    timeline.at(tap.occurred_at).cloned().ok_or_else(|| {
        format!("no network and fare rule in force at station {} at {}", tap.station, tap.occurred_at.0)
    })
}

/// The instant the business day `day` ends under `rule`: the next day's rollover.
pub fn day_end(rule: &BusinessDayRule, day: Date) -> Timestamp {
    Timestamp::from_local(day.plus_days(1), 0, rule.rollover_minute_of_day, rule.utc_offset_minutes)
}

/// Why an exit costs nothing, if it does: the gate let it out free under train_disruption or
/// emergency release (the gate charges a stored-value card nothing there either).
fn free_exit(exit: Option<&TxRecord>) -> Option<Reason> {
    exit.map(|e| e.reason).filter(|r| matches!(r, Reason::OkTrainDisruption | Reason::OkEmergencyRelease))
}

fn code_in(t: &Tariff, tap: &TxRecord) -> Result<StationCode, String> {
    t.code_of(&tap.station)
        .ok_or_else(|| format!("station {} is not in network v{}", tap.station, t.network_version))
}

impl Priced {
    fn unpriced(&mut self, tap: &TxRecord, reason: String) {
        self.unpriced.push(Unpriced { tap: TapRef::of(tap), reason });
    }

    fn charge_journey(
        &mut self,
        key: JourneyKey,
        entry: &TxRecord,
        exit: &TxRecord,
        tariffs: &dyn Fn(&Ident) -> Option<Arc<Timeline>>,
    ) {
        let priced = tariff_at(tariffs, entry).and_then(|t| {
            let (from, to) = (code_in(&t, entry)?, code_in(&t, exit)?);
            let fare = t.table.full_fare_fen(from, to).ok_or_else(|| format!("no fare {from:?} → {to:?}"))?;
            Ok((t, from, to, fare))
        });
        let (t, from, to, fare) = match priced {
            Ok(p) => p,
            Err(reason) => return self.unpriced(entry, reason),
        };
        let ride_ms = exit.occurred_at.0 - entry.occurred_at.0;
        let over = t.table.max_ride_minutes().is_some_and(|m| ride_ms > i64::from(m) * 60_000);
        let free_reason = free_exit(Some(exit));
        let overstay_fen = if over && free_reason.is_none() { t.table.overstay_surcharge_fen() } else { 0 };
        let rule = t.table.business_day();
        let business_day = rule.business_day(entry.occurred_at);
        self.journeys.push(Journey {
            key,
            business_day,
            day_ends_at: day_end(&rule, business_day),
            outcome: Outcome::Paired,
            entry: Some(TapRef::of(entry)),
            exit: Some(TapRef::of(exit)),
            from: Some(from),
            to: Some(to),
            fare_fen: if free_reason.is_some() { 0 } else { fare + overstay_fen },
            overstay_fen,
            free_reason,
            network_version: t.network_version,
            rule_version: t.rule_version,
        });
    }

    fn charge_unpaired(
        &mut self,
        key: JourneyKey,
        tap: &TxRecord,
        outcome: Outcome,
        tariffs: &dyn Fn(&Ident) -> Option<Arc<Timeline>>,
    ) {
        let priced = tariff_at(tariffs, tap).and_then(|t| {
            let s = code_in(&t, tap)?;
            let fare = match outcome {
                Outcome::UnpairedExit => t.max_fare_to(s),
                _ => t.max_fare_from(s),
            };
            Ok((fare.ok_or_else(|| format!("no fare at {s:?}"))?, s, t))
        });
        let (fare, s, t) = match priced {
            Ok(p) => p,
            Err(reason) => return self.unpriced(tap, reason),
        };
        let at = Some(TapRef::of(tap));
        let (entry, exit, from, to, free_reason) = if outcome == Outcome::UnpairedExit {
            (None, at, None, Some(s), free_exit(Some(tap)))
        } else {
            (at, None, Some(s), None, None)
        };
        let rule = t.table.business_day();
        let business_day = rule.business_day(tap.occurred_at);
        self.journeys.push(Journey {
            key,
            business_day,
            day_ends_at: day_end(&rule, business_day),
            outcome,
            entry,
            exit,
            from,
            to,
            fare_fen: if free_reason.is_some() { 0 } else { fare },
            overstay_fen: 0,
            free_reason,
            network_version: t.network_version,
            rule_version: t.rule_version,
        });
    }
}

/// One issuer's settlement file for one business day: a CSV line per journey charged to its
/// accounts, then the total.
pub fn settlement_csv(journeys: &[Journey], issuer: u16, day: Date) -> String {
    let mut out = String::from(
        "business_day,issuer,account,outcome,entry_station,entry_gate,entry_seq,entry_at_ms,exit_station,exit_gate,exit_seq,exit_at_ms,from,to,fare_fen,overstay_fen,network_version,rule_version\n",
    );
    let mut total = 0u64;
    let mut count = 0u64;
    let tap = |t: &Option<TapRef>| match t {
        Some(t) => format!("{},{},{},{}", t.station, t.gate, t.gate_seq, t.at.0),
        None => ",,,".to_owned(),
    };
    let code = |c: Option<StationCode>| c.map_or(String::new(), |c| c.0.to_string());
    for j in journeys.iter().filter(|j| j.business_day == day) {
        let JourneyKey::Qr { issuer: i, account } = j.key else { continue };
        if i != issuer {
            continue;
        }
        let outcome = match j.outcome {
            Outcome::Paired => "paired",
            Outcome::UnpairedEntry => "unpaired_entry",
            Outcome::UnpairedExit => "unpaired_exit",
        };
        let _ = writeln!(
            out,
            "{},{},{},{outcome},{},{},{},{},{},{},{},{}",
            day,
            i,
            account,
            tap(&j.entry),
            tap(&j.exit),
            code(j.from),
            code(j.to),
            j.fare_fen,
            j.overstay_fen,
            j.network_version,
            j.rule_version
        );
        total += u64::from(j.fare_fen);
        count += 1;
    }
    let _ = writeln!(out, "# total,{issuer},{day},{count} journeys,{total} fen");
    out
}

#[cfg(test)]
mod tests {
    use afc_domain::bank::{BankRef, Cryptogram};
    use afc_domain::ledger::QrRef;
    use afc_domain::model::{BusinessDayRule, Reason};
    use afc_domain::network::{Band, Line, Station, Stop};
    use serde_json::value::RawValue;

    use super::*;
    use crate::testdata::record;

    /// 2026-12-02 10:00 Beijing time.
    const T0: i64 = 1_796_176_800_000;
    const MIN: i64 = 60_000;

    fn ident(s: &str) -> Ident {
        Ident::new(s).unwrap()
    }

    /// s1 —5 km— s2 —10 km— s3 on one line.
    fn network() -> NetworkDescription {
        let station = |code: u16, id: &str| Station {
            code: StationCode(code),
            id: id.into(),
            name_zh: id.into(),
            name_en: id.into(),
        };
        let stop = |s: &str, m: Option<u32>| Stop { station: s.into(), m_from_prev: m };
        NetworkDescription {
            name: "test".into(),
            provenance: vec![],
            stations: vec![station(101, "s1"), station(102, "s2"), station(103, "s3")],
            lines: vec![Line {
                id: "1".into(),
                name: "Line 1".into(),
                stops: vec![stop("s1", None), stop("s2", Some(5_000)), stop("s3", Some(10_000))],
            }],
            transfers: vec![],
        }
    }

    /// 2 yuan to 6 km, 3 to 12, 4 to 18; a ride over 2 h costs 3 yuan more. `step` raises every band.
    fn rule(step: u32) -> FareRule {
        FareRule {
            name: "test".into(),
            bands: [(6_000, 200), (12_000, 300), (18_000, 400)]
                .iter()
                .map(|&(m, fen)| Band { up_to_m: m, fare_fen: fen + step })
                .collect(),
            beyond: None,
            min_fare_fen: 200,
            discounts: [(afc_domain::model::CardType::ORDINARY, 80)].into_iter().collect(),
            token_percent: 100,
            max_ride_minutes: Some(120),
            overstay_surcharge_fen: 300,
            business_day: BusinessDayRule::default(),
            card_type_names: Default::default(),
        }
    }

    fn item(seq: u64, kind: FeedKind, version: u64, effective_from: i64, body: String) -> FeedItem {
        FeedItem {
            seq,
            kind,
            version,
            effective_from: Timestamp(effective_from),
            body: RawValue::from_string(body).unwrap(),
            signature: [0; 64],
            key_id: 1,
        }
    }

    /// Network v1 and rule v1 from the start; rule v2 (one yuan more) from T0 + 1 day.
    fn timeline() -> Arc<Timeline> {
        let net = serde_json::to_string(&network()).unwrap();
        let items = [
            item(1, FeedKind::Network, 1, 0, net),
            item(2, FeedKind::FareRule, 1, 0, serde_json::to_string(&rule(0)).unwrap()),
            item(3, FeedKind::FareRule, 2, T0 + 1_440 * MIN, serde_json::to_string(&rule(100)).unwrap()),
        ];
        let (t, problems) = Timeline::from_feed(&items);
        assert!(problems.is_empty(), "{problems:?}");
        Arc::new(t)
    }

    fn qr_tap(station: &str, seq: u64, dir: Direction, account: u64, at: i64) -> TxRecord {
        let mut r = record(&ident(station), "g01", seq);
        r.media = Media::Qr;
        r.id = account;
        r.direction = dir;
        r.fare_fen = 0;
        r.balance_before = None;
        r.balance_after = None;
        r.card_tx_counter = None;
        r.entry_station = None;
        r.entry_time = None;
        r.occurred_at = Timestamp(at);
        r.qr = Some(QrRef { issuer: 7, nonce: seq });
        r
    }

    fn account(j: &Journey) -> u64 {
        match j.key {
            JourneyKey::Qr { account, .. } => account,
            JourneyKey::Bank { token } => token.deny_key(),
        }
    }

    fn bank_tap(station: &str, seq: u64, dir: Direction, token: BankToken, at: i64) -> TxRecord {
        let mut r = qr_tap(station, seq, dir, token.deny_key(), at);
        r.media = Media::Bank;
        r.qr = None;
        r.bank = Some(BankRef { token, cryptogram: Cryptogram([seq as u8; 8]), atc: seq as u16 });
        r
    }

    fn run(records: &[TxRecord], as_of: i64) -> Priced {
        let t = timeline();
        price(
            records,
            Media::Qr,
            &|s: &Ident| (s.as_str().starts_with('s')).then(|| t.clone()),
            Timestamp(as_of),
        )
    }

    #[test]
    fn entries_and_exits_pair_per_account_across_stations_and_are_priced_from_the_table_at_entry() {
        let records = vec![
            // Account 1: s1 → s3 (15 km, 4 yuan), then s3 → s2 (10 km, 3 yuan).
            qr_tap("s1", 1, Direction::Entry, 1, T0),
            qr_tap("s3", 1, Direction::Exit, 1, T0 + 30 * MIN),
            qr_tap("s3", 2, Direction::Entry, 1, T0 + 60 * MIN),
            qr_tap("s2", 1, Direction::Exit, 1, T0 + 80 * MIN),
            // Account 2 (another account, same issuer): s2 → s1 entered before the rule change,
            // left after it: priced by the table at entry (2 yuan, not 3).
            qr_tap("s2", 2, Direction::Entry, 2, T0 + 1_440 * MIN - 10 * MIN),
            qr_tap("s1", 2, Direction::Exit, 2, T0 + 1_440 * MIN + 10 * MIN),
            // Account 3 after the change: s1 → s2 at 3 yuan.
            qr_tap("s1", 3, Direction::Entry, 3, T0 + 1_500 * MIN),
            qr_tap("s2", 3, Direction::Exit, 3, T0 + 1_520 * MIN),
        ];
        // Given in an order that is neither time nor station order.
        let mut shuffled = records.clone();
        shuffled.reverse();
        let p = run(&shuffled, T0 + 3_000 * MIN);
        // (account, from, to, fare, rule version)
        type Row = (u64, Option<u16>, Option<u16>, u32, u64);
        let fares: Vec<Row> = p
            .journeys
            .iter()
            .map(|j| (account(j), j.from.map(|c| c.0), j.to.map(|c| c.0), j.fare_fen, j.rule_version))
            .collect();
        assert_eq!(
            fares,
            vec![
                (1, Some(101), Some(103), 400, 1),
                (1, Some(103), Some(102), 300, 1),
                (2, Some(102), Some(101), 200, 1),
                (3, Some(101), Some(102), 300, 2),
            ]
        );
        assert!(p.journeys.iter().all(|j| j.outcome == Outcome::Paired && j.overstay_fen == 0));
        assert!(p.pending.is_empty() && p.unpriced.is_empty(), "{p:?}");
        assert_eq!(p.journeys[0].business_day, Date::from_ymd(2026, 12, 2).unwrap());
    }

    #[test]
    fn unpaired_taps_pay_the_policy_fare_a_young_entry_waits_and_a_long_ride_pays_the_surcharge() {
        let records = vec![
            // Entry then entry: the first is unpaired (highest fare from s2 is 3 yuan, to s3).
            qr_tap("s2", 1, Direction::Entry, 1, T0),
            qr_tap("s1", 1, Direction::Entry, 1, T0 + 20 * MIN),
            qr_tap("s3", 1, Direction::Exit, 1, T0 + 40 * MIN),
            // An exit with no entry: the highest fare to s2 (3 yuan, from s3).
            qr_tap("s2", 2, Direction::Exit, 2, T0 + 50 * MIN),
            // A ride of 3 h: 2 yuan + 3 yuan surcharge.
            qr_tap("s1", 2, Direction::Entry, 3, T0),
            qr_tap("s2", 3, Direction::Exit, 3, T0 + 180 * MIN),
            // An entry 10 min before `as_of`: pending; one 7 h before: unpaired (4 yuan from s1).
            qr_tap("s1", 3, Direction::Entry, 4, T0 + 410 * MIN),
            qr_tap("s1", 4, Direction::Entry, 5, T0),
        ];
        let p = run(&records, T0 + 420 * MIN);
        let got: Vec<(u64, Outcome, u32, u32)> =
            p.journeys.iter().map(|j| (account(j), j.outcome, j.fare_fen, j.overstay_fen)).collect();
        assert_eq!(
            got,
            vec![
                (1, Outcome::UnpairedEntry, 300, 0),
                (1, Outcome::Paired, 400, 0),
                (2, Outcome::UnpairedExit, 300, 0),
                (3, Outcome::Paired, 500, 300),
                (5, Outcome::UnpairedEntry, 400, 0),
            ]
        );
        assert_eq!(
            p.pending.iter().map(|p| (p.tap.station.as_str(), p.tap.gate_seq)).collect::<Vec<_>>(),
            [("s1", 3)]
        );
        assert_eq!(p.pending[0].key, JourneyKey::Qr { issuer: 7, account: 4 });
    }

    #[test]
    fn voided_refused_and_non_qr_taps_are_not_passages_and_an_unknown_station_is_listed_not_priced() {
        let mut refused = qr_tap("s1", 1, Direction::Entry, 1, T0);
        refused.accepted = false;
        refused.reason = Reason::QrExpired;
        let voided = qr_tap("s1", 2, Direction::Entry, 1, T0 + MIN);
        let mut void = qr_tap("s1", 3, Direction::Entry, 1, T0 + 2 * MIN);
        void.voids = Some(2);
        void.accepted = false;
        let card = record(&ident("s1"), "g01", 4);
        let entry = qr_tap("s1", 5, Direction::Entry, 1, T0 + 3 * MIN);
        let exit = qr_tap("s2", 1, Direction::Exit, 1, T0 + 20 * MIN);
        let elsewhere_in = qr_tap("x9", 1, Direction::Entry, 9, T0);
        let elsewhere_out = qr_tap("s2", 2, Direction::Exit, 9, T0 + 20 * MIN);
        let p = run(&[refused, voided, void, card, entry, exit, elsewhere_in, elsewhere_out], T0 + 60 * MIN);
        let got: Vec<(u64, Outcome, u32)> =
            p.journeys.iter().map(|j| (account(j), j.outcome, j.fare_fen)).collect();
        // Account 1: one journey s1 → s2 from the unvoided entry; account 9's entry at a station
        // with no feed cannot be priced, and is listed.
        assert_eq!(got, vec![(1, Outcome::Paired, 200)]);
        assert_eq!(p.unpriced.len(), 1, "{p:?}");
        assert!(p.unpriced[0].reason.contains("x9"), "{p:?}");
    }

    #[test]
    fn bank_taps_pair_per_full_token_not_per_deny_key_and_a_train_disruption_exit_is_free() {
        // Two cards whose tokens share the first 8 bytes (the ledger id): still two cards.
        let one = BankToken([1; 32]);
        let mut two = one;
        two.0[31] = 2;
        let t = timeline();
        let records = vec![
            bank_tap("s1", 1, Direction::Entry, one, T0),
            bank_tap("s1", 2, Direction::Entry, two, T0 + MIN),
            bank_tap("s3", 1, Direction::Exit, one, T0 + 30 * MIN),
            bank_tap("s2", 1, Direction::Exit, two, T0 + 20 * MIN),
            // A QR tap of the same id is not a bank journey.
            qr_tap("s2", 2, Direction::Exit, one.deny_key(), T0 + 25 * MIN),
        ];
        let mut disrupted = bank_tap("s3", 2, Direction::Exit, two, T0 + 200 * MIN);
        disrupted.reason = Reason::OkTrainDisruption;
        let mut records = records;
        records.push(bank_tap("s1", 3, Direction::Entry, two, T0 + 60 * MIN));
        records.push(disrupted);
        let p = price(&records, Media::Bank, &|_: &Ident| Some(t.clone()), Timestamp(T0 + 600 * MIN));
        let got: Vec<(Option<BankToken>, u32, u32, Option<Reason>)> =
            p.journeys.iter().map(|j| (j.key.token(), j.fare_fen, j.overstay_fen, j.free_reason)).collect();
        assert_eq!(
            got,
            vec![
                (Some(one), 400, 0, None),
                (Some(two), 200, 0, None),
                // s1 → s3, over the ride-time limit, but let out free: nothing to pay.
                (Some(two), 0, 0, Some(Reason::OkTrainDisruption)),
            ]
        );
        assert!(p.pending.is_empty() && p.unpriced.is_empty(), "{p:?}");
        let day = Date::from_ymd(2026, 12, 2).unwrap();
        assert_eq!(p.journeys[0].business_day, day);
        // The day ends at the next 04:00 Beijing time.
        assert_eq!(p.journeys[0].day_ends_at, Timestamp(T0 + 18 * 60 * MIN));
    }

    #[test]
    fn a_settlement_file_lists_one_issuers_journeys_of_one_day_and_their_total() {
        let mut other_issuer = qr_tap("s1", 3, Direction::Entry, 2, T0);
        other_issuer.qr = Some(QrRef { issuer: 8, nonce: 1 });
        let mut other_exit = qr_tap("s2", 3, Direction::Exit, 2, T0 + 10 * MIN);
        other_exit.qr = Some(QrRef { issuer: 8, nonce: 2 });
        let records = vec![
            qr_tap("s1", 1, Direction::Entry, 1, T0),
            qr_tap("s3", 1, Direction::Exit, 1, T0 + 30 * MIN),
            qr_tap("s1", 2, Direction::Entry, 1, T0 + 1_440 * MIN),
            qr_tap("s2", 1, Direction::Exit, 1, T0 + 1_450 * MIN),
            other_issuer,
            other_exit,
        ];
        let p = run(&records, T0 + 3_000 * MIN);
        let csv = settlement_csv(&p.journeys, 7, Date::from_ymd(2026, 12, 2).unwrap());
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3, "{csv}");
        assert!(lines[1].starts_with("2026-12-02,7,1,paired,s1,g01,1,"), "{csv}");
        assert!(lines[1].ends_with(",101,103,400,0,1,1"), "{csv}");
        assert_eq!(lines[2], "# total,7,2026-12-02,1 journeys,400 fen");
    }
}
