//! The clearing house's state: every station's stored ledger, feed and counters, and the
//! operations the HTTP layer calls. Everything here is synchronous and may block on disk; the HTTP
//! layer runs it on the blocking pool.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use afc_domain::bank::BankToken;
use afc_domain::ledger::SequenceGap;
use afc_domain::model::{Date, Ident, Media, Timestamp};
use serde_json::value::RawValue;

use crate::accept::{plan, Plan};
use crate::bank::{day_charges, due, token_days, Acquirer, Charge, ChargeResult, DayCharge, PassReport};
use crate::charges::ChargeFile;
use crate::config::Config;
use crate::days::{DayFile, DayStored};
use crate::error::ServerError;
use crate::feed::FeedStore;
use crate::gaps::{GapFile, GapReportError};
use crate::protocol::{
    Acked, DenyListBody, FeedItem, FeedKeyInfo, FeedKind, FeedPage, FeedSubmission, GapReport, GapsStored,
    StationStats, UploadBatch, Watermark,
};
use crate::store::LedgerFile;

/// Per-station counters since the server started (the stored data itself survives restarts).
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    batches_acked: u64,
    resends: u64,
    resent_records: u64,
    conflicts: u64,
    rejected: u64,
    /// Unix seconds of the last batch that stored records (0 for none).
    last_append_unix: u64,
}

/// One station: its ledger copy, its feed, its counters, behind one lock so a batch is decided
/// and stored atomically with respect to other batches of the same station.
struct Station {
    ledger: LedgerFile,
    gaps: GapFile,
    days: DayFile,
    feed: FeedStore,
    counters: Counters,
    /// The TAC counts `/metrics` reports, through the records checked so far.
    tacs: crate::tac::TacTally,
}

/// Bank charging: the stored charges and the acquirer, behind one lock that a charge pass holds
/// from start to end, so two passes (the background task and the admin endpoint) never submit
/// the same token-day.
struct Bank {
    charges: ChargeFile,
    acquirer: Acquirer,
    /// `bank_changes` as the last completed pass saw it, and whether that pass left token-days
    /// waiting: with neither changed since, a background pass has nothing to do and skips the
    /// pricing (which reads every station's whole ledger).
    last_pass: Option<(u64, u64)>,
}

/// Bank charging figures since the server started, for `/metrics`.
#[derive(Default)]
struct BankCounters {
    passes_ok: AtomicU64,
    passes_failed: AtomicU64,
    approved: AtomicU64,
    declined: AtomicU64,
    /// First-tap authorisations (attempt 0, amount 0) by answer.
    auth_approved: AtomicU64,
    auth_declined: AtomicU64,
    /// `deny_list` items published for declined tokens (one per token and station).
    deny_items: AtomicU64,
    /// Unix seconds of the last pass that completed (0: none since start).
    last_pass_unix: AtomicU64,
}

/// Shared by every HTTP worker.
pub struct ClearingState {
    config: Config,
    stations: Mutex<BTreeMap<Ident, Arc<Mutex<Station>>>>,
    bank: Mutex<Bank>,
    bank_counters: BankCounters,
    /// Bumped by whatever can make a charge pass do something new: bank records stored, a day
    /// close stored, a station opened.
    bank_changes: AtomicU64,
    /// Requests refused as malformed (400/413) or unauthorized (401), for `/metrics`.
    bad_requests: AtomicU64,
    unauthorized: AtomicU64,
}

/// Locks `m`; a poisoned lock is taken over, since the server aborts on panic (`main` installs an
/// aborting hook) and in tests a panicking request must not wedge the others.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The wall clock as a ledger timestamp.
pub fn now() -> Timestamp {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    Timestamp(i64::try_from(ms).unwrap_or(i64::MAX))
}

impl ClearingState {
    /// Opens every station already stored under the data directory (verifying each ledger).
    pub fn open(config: Config) -> Result<ClearingState, ServerError> {
        config.validate()?;
        let root = config.data_dir.join("stations");
        if !root.exists() {
            std::fs::create_dir_all(&root)?;
            // Its entry in the data directory must survive a power cut, or every station ledger
            // under it (each synced) would be unreachable: a cut lost every acknowledged batch.
            crate::store::sync_dir(&config.data_dir)?;
        }
        let bank = Bank {
            charges: ChargeFile::open(&config.data_dir.join("bank"))?,
            acquirer: Acquirer::new(config.bank.declined_tokens.clone()),
            last_pass: None,
        };
        let state = ClearingState {
            config,
            stations: Mutex::new(BTreeMap::new()),
            bank: Mutex::new(bank),
            bank_counters: BankCounters::default(),
            bank_changes: AtomicU64::new(0),
            bad_requests: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
        };
        for entry in std::fs::read_dir(&root)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| Ident::new(n).ok()) else {
                tracing::warn!(dir = ?entry.path(), "ignoring a directory that is not a station id");
                continue;
            };
            let station = state.station(&id)?;
            let st = lock(&station);
            tracing::info!(station = %id, acked_through = st.ledger.acked_through(), feed_items = st.feed.len(), "station loaded");
        }
        Ok(state)
    }

    /// The configuration the state was opened with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn station_dir(&self, id: &Ident) -> PathBuf {
        self.config.data_dir.join("stations").join(id.as_str())
    }

    /// The station, opened (and created) on first use.
    fn station(&self, id: &Ident) -> Result<Arc<Mutex<Station>>, ServerError> {
        let mut stations = lock(&self.stations);
        if let Some(s) = stations.get(id) {
            return Ok(s.clone());
        }
        let dir = self.station_dir(id);
        let mut ledger = LedgerFile::open(&dir)?;
        let gaps = GapFile::open(&dir)?;
        for g in gaps.all() {
            ledger.settle_gap(g);
        }
        let station = Arc::new(Mutex::new(Station {
            ledger,
            gaps,
            days: DayFile::open(&dir)?,
            feed: FeedStore::open(id.clone(), &dir)?,
            counters: Counters::default(),
            tacs: crate::tac::TacTally::default(),
        }));
        stations.insert(id.clone(), station.clone());
        self.bank_changes.fetch_add(1, Ordering::Relaxed);
        Ok(station)
    }

    /// Every station clearing knows: each one with a directory under `stations/` (opened at
    /// start, or created by its first request since).
    fn known_stations(&self) -> Vec<(Ident, Arc<Mutex<Station>>)> {
        lock(&self.stations).iter().map(|(id, s)| (id.clone(), s.clone())).collect()
    }

    /// Pairs and prices every station's taps of `media` (QR or bank, see [`crate::journeys`]),
    /// as of `as_of`. Each station's records are read under its lock, then priced outside every
    /// lock.
    pub fn price(&self, media: Media, as_of: Timestamp) -> Result<crate::journeys::Priced, ServerError> {
        use crate::journeys::{price, Timeline};
        let stations = self.known_stations();
        let mut records = Vec::new();
        let mut timelines = BTreeMap::new();
        for (id, station) in stations {
            let st = lock(&station);
            records.extend(st.ledger.records()?);
            let (timeline, problems) = Timeline::from_feed(st.feed.page(0, usize::MAX));
            for p in problems {
                tracing::warn!(station = %id, problem = %p, "a feed item cannot price journeys");
            }
            timelines.insert(id, Arc::new(timeline));
        }
        Ok(price(&records, media, &|s: &Ident| timelines.get(s).cloned(), as_of))
    }

    /// One charge pass (see [`crate::bank`]): prices the bank journeys as of `as_of`, submits
    /// every token-day due to the acquirer, stores the answers durably, then puts every declined
    /// token on the deny list of every known station that does not have it yet. Counted in the
    /// metrics whether it succeeds or fails. Unless `force`, a pass finding nothing changed since
    /// the last one that left nothing waiting does nothing.
    pub fn charge_pass(&self, as_of: Timestamp, force: bool) -> Result<PassReport, ServerError> {
        let result = self.run_charge_pass(as_of, force);
        let c = &self.bank_counters;
        match &result {
            Ok(_) => {
                c.passes_ok.fetch_add(1, Ordering::Relaxed);
                c.last_pass_unix.store(now_unix(), Ordering::Relaxed);
            }
            Err(e) => {
                c.passes_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "bank charge pass failed");
            }
        }
        result
    }

    fn run_charge_pass(&self, as_of: Timestamp, force: bool) -> Result<PassReport, ServerError> {
        let mut bank = lock(&self.bank);
        let changes = self.bank_changes.load(Ordering::Relaxed);
        if !force && bank.last_pass == Some((changes, 0)) {
            return Ok(PassReport::default());
        }
        let priced = self.price(Media::Bank, as_of)?;
        let days = token_days(&priced.journeys, self.config.bank.daily_cap_fen);
        let closed = self.closed_everywhere();
        let owed = due(&days, bank.charges.all(), as_of, &closed);
        let day_of = |t: Timestamp| afc_domain::model::BusinessDayRule::default().business_day(t);
        let auths = crate::bank::to_authorise(&priced, bank.charges.all(), day_of);
        let charges: Vec<Charge> = auths
            .iter()
            .map(|(token, day)| Charge {
                token: *token,
                business_day: *day,
                attempt: 0,
                journeys: 0,
                before_cap_fen: 0,
                amount_fen: 0,
                result: bank.acquirer.submit(token, *day, 0, 0),
                at: as_of,
            })
            .chain(owed.due.iter().map(|d| Charge {
                token: d.day.token,
                business_day: d.day.business_day,
                attempt: d.attempt,
                journeys: d.day.journeys,
                before_cap_fen: d.day.before_cap_fen,
                amount_fen: d.amount_fen,
                result: bank.acquirer.submit(&d.day.token, d.day.business_day, d.attempt, d.amount_fen),
                at: as_of,
            }))
            .collect();
        // Durable before anything depends on it: the deny list below, the report, the next pass.
        bank.charges.append(&charges)?;
        let (auth, paid): (Vec<&Charge>, Vec<&Charge>) = charges.iter().partition(|c| c.attempt == 0);
        let refused = |v: &[&Charge]| v.iter().filter(|c| c.result == ChargeResult::Declined).count() as u64;
        let (declined, auth_declined) = (refused(&paid), refused(&auth));
        let approved = paid.len() as u64 - declined;
        let c = &self.bank_counters;
        c.approved.fetch_add(approved, Ordering::Relaxed);
        c.declined.fetch_add(declined, Ordering::Relaxed);
        c.auth_approved.fetch_add(auth.len() as u64 - auth_declined, Ordering::Relaxed);
        c.auth_declined.fetch_add(auth_declined, Ordering::Relaxed);
        for c in &charges {
            tracing::info!(token = %c.token, day = %c.business_day, attempt = c.attempt, amount_fen = c.amount_fen, result = c.result.as_str(), "bank charge submitted");
        }
        let deny_items = self.deny_declined(bank.charges.all(), as_of)?;
        // Open entries age into unpaired ones and unpriced taps may become priceable with no new
        // record: while there are any, the next pass prices again.
        let later = owed.waiting + (priced.pending.len() + priced.unpriced.len()) as u64;
        bank.last_pass = Some((changes, later));
        Ok(PassReport {
            submitted: paid.len() as u64,
            authorised: auth.len() as u64,
            auth_declined,
            approved,
            declined,
            deny_items,
            waiting: owed.waiting,
        })
    }

    /// The business days closed everywhere they must be: a day is closed when at least one
    /// station closed it and every station that closes days has closed it, except a station
    /// whose first close is later (it was not in service yet). A station that never closed a day
    /// (a directory made by a stray request, a controller that sends no closes) holds nothing up.
    fn closed_everywhere(&self) -> impl Fn(Date) -> bool {
        let closes: Vec<BTreeSet<Date>> = self
            .known_stations()
            .iter()
            .map(|(_, station)| lock(station).days.all().iter().map(|d| d.day).collect::<BTreeSet<Date>>())
            .filter(|days| !days.is_empty())
            .collect();
        move |day| {
            closes.iter().any(|c| c.contains(&day))
                && closes.iter().all(|c| c.contains(&day) || c.first().is_some_and(|first| day < *first))
        }
    }

    /// Appends a signed `deny_list` item `{add: [token]}` (the family's next version) to the feed
    /// of every known station whose feed does not deny the token (never added it, or took it off
    /// before its newest decline), for every declined token in `charges`. The feed itself is the record of what was sent, so this is idempotent across
    /// passes and restarts, and a station that appears later gets the denials on the next pass.
    fn deny_declined(&self, charges: &[Charge], now: Timestamp) -> Result<u64, ServerError> {
        // Each declined token with its newest decline.
        let mut declined: BTreeMap<BankToken, Timestamp> = BTreeMap::new();
        for c in charges.iter().filter(|c| c.result == ChargeResult::Declined) {
            let at = declined.entry(c.token).or_insert(c.at);
            *at = (*at).max(c.at);
        }
        if declined.is_empty() {
            return Ok(0);
        }
        let mut published = 0;
        for (id, station) in self.known_stations() {
            let mut st = lock(&station);
            self.ingest_feed_dir(&id, &mut st);
            let missing: Vec<BankToken> =
                declined.iter().filter(|(t, at)| st.feed.deny_needed(t, **at)).map(|(t, _)| *t).collect();
            for token in missing {
                let body = DenyListBody { add: vec![token], remove: vec![] };
                let text = serde_json::to_string(&body).map_err(|e| ServerError::Internal(e.to_string()))?;
                let submission = FeedSubmission {
                    kind: FeedKind::DenyList,
                    version: st.feed.latest_version(FeedKind::DenyList) + 1,
                    effective_from: now,
                    body: RawValue::from_string(text).map_err(|e| ServerError::Internal(e.to_string()))?,
                };
                let item = st.feed.publish(
                    submission,
                    "bank:declined".into(),
                    &self.config.feed_key,
                    self.config.feed_key_id,
                )?;
                published += 1;
                self.bank_counters.deny_items.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(station = %id, %token, seq = item.seq, version = item.version, "declined bank token put on the station's deny list");
            }
        }
        Ok(published)
    }

    /// The stored charges of business day `day`, one row per token.
    pub fn bank_charges(&self, day: Date) -> Vec<DayCharge> {
        day_charges(lock(&self.bank).charges.all(), day)
    }

    /// Every stored stored-value TAC checked with the issuer key ([`crate::tac`]). Each station's
    /// records are read under its lock, then checked outside every lock.
    pub fn tac_report(&self) -> Result<crate::tac::TacReport, ServerError> {
        let all = self.all_records()?;
        Ok(crate::tac::report(
            self.config.tac_issuer_key.as_ref(),
            all.iter().map(|(id, r)| (id, r.as_slice())),
        ))
    }

    /// Every station's stored records, in ledger order.
    fn all_records(&self) -> Result<Vec<(Ident, Vec<afc_domain::ledger::TxRecord>)>, ServerError> {
        let stations: Vec<(Ident, Arc<Mutex<Station>>)> =
            lock(&self.stations).iter().map(|(id, s)| (id.clone(), s.clone())).collect();
        let mut out = Vec::with_capacity(stations.len());
        for (id, station) in stations {
            let records = lock(&station).ledger.records()?;
            out.push((id, records));
        }
        Ok(out)
    }

    /// Checks a presented bearer token in constant time.
    pub fn authorize(&self, presented: Option<&[u8]>) -> Result<(), ServerError> {
        match presented {
            Some(t) if constant_time_eq(t, self.config.token.as_bytes()) => Ok(()),
            _ => {
                self.unauthorized.fetch_add(1, Ordering::Relaxed);
                Err(ServerError::Unauthorized)
            }
        }
    }

    /// Counts a request refused before it reached a station (malformed, too large).
    pub fn note_bad_request(&self) {
        self.bad_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Handles one upload body: parse, verify, decide, store.
    pub fn upload(&self, id: &Ident, body: &[u8]) -> Result<Acked, ServerError> {
        let batch: UploadBatch = serde_json::from_slice(body).map_err(|e| {
            self.note_bad_request();
            ServerError::BadJson(e.to_string())
        })?;
        if batch.records.len() > self.config.max_batch_records {
            self.note_bad_request();
            return Err(ServerError::TooManyRecords {
                count: batch.records.len(),
                limit: self.config.max_batch_records,
            });
        }
        let station = self.station(id)?;
        // Hashing needs no stored state: done before taking the station lock. Each record is
        // encoded once, and the bytes hashed are the bytes stored.
        let verified = batch.verify_canonical(id);
        let mut st = lock(&station);
        let canonical = match verified {
            Ok(c) => c,
            Err(e) => {
                st.counters.rejected += 1;
                tracing::warn!(station = %id, first_index = batch.first_index, error = %e, "batch refused");
                return Err(e.into());
            }
        };
        let acked = st.ledger.acked_through();
        let decision = plan(&batch, acked, |i| st.ledger.hash_at(i));
        match decision {
            Err(e) => {
                st.counters.rejected += 1;
                tracing::error!(station = %id, first_index = batch.first_index, error = %e, "batch forks from the stored chain");
                Err(e.into())
            }
            Ok(Plan::Conflict { expected_from }) => {
                st.counters.conflicts += 1;
                Err(ServerError::NotContiguous { first_index: batch.first_index, expected_from })
            }
            Ok(Plan::Resend) => {
                st.counters.resends += 1;
                st.counters.resent_records += batch.records.len() as u64;
                Ok(Acked { acked_through: acked })
            }
            Ok(Plan::Append { skip }) => {
                let new = batch.records.get(skip..).unwrap_or_default();
                st.ledger.append_canonical(new, canonical.get(skip..).unwrap_or_default())?;
                if new.iter().any(|e| e.record.media == Media::Bank) {
                    self.bank_changes.fetch_add(1, Ordering::Relaxed);
                }
                st.counters.batches_acked += 1;
                st.counters.resent_records += skip as u64;
                st.counters.last_append_unix = now_unix();
                Ok(Acked { acked_through: st.ledger.acked_through() })
            }
        }
    }

    /// Handles one gap report: parse, store what is new, answer how far the stored gaps run.
    pub fn report_gaps(&self, id: &Ident, body: &[u8]) -> Result<GapsStored, ServerError> {
        let report: GapReport = serde_json::from_slice(body).map_err(|e| {
            self.note_bad_request();
            ServerError::BadJson(e.to_string())
        })?;
        let station = self.station(id)?;
        let mut st = lock(&station);
        let first = report.gaps.first().map_or(0, |g| g.id);
        let before = st.gaps.stored_through();
        match st.gaps.report(&report.gaps) {
            Ok(stored_through) => {
                // Only the gaps new in this report (a new leader sends the stored ones again).
                for g in report.gaps.iter().filter(|g| g.id > before) {
                    st.ledger.settle_gap(g);
                    tracing::warn!(station = %id, gate = %g.gate, from_seq = g.from_seq, to_seq = g.to_seq, "sequence gap reported");
                }
                Ok(GapsStored { stored_through })
            }
            Err(GapReportError::Gap(e)) => {
                st.counters.rejected += 1;
                tracing::error!(station = %id, error = %e, "gap report refused");
                Err(e.into())
            }
            Err(GapReportError::NotContiguous { expected_from }) => {
                st.counters.conflicts += 1;
                Err(ServerError::NotContiguous { first_index: first, expected_from })
            }
            Err(GapReportError::Store(e)) => Err(e.into()),
        }
    }

    /// Handles one day close: parse, store it unless its day is stored (same: a duplicate;
    /// other: 409).
    pub fn close_day(&self, id: &Ident, body: &[u8]) -> Result<crate::protocol::DayStored, ServerError> {
        let close: crate::protocol::DayClose = serde_json::from_slice(body).map_err(|e| {
            self.note_bad_request();
            ServerError::BadJson(e.to_string())
        })?;
        let station = self.station(id)?;
        let mut st = lock(&station);
        match st.days.store(&close) {
            Ok(stored) => {
                if stored == DayStored::New {
                    self.bank_changes.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(station = %id, day = %close.day, "business day close stored");
                }
                Ok(crate::protocol::DayStored { day: close.day, duplicate: stored == DayStored::Duplicate })
            }
            Err(None) => {
                st.counters.conflicts += 1;
                tracing::error!(station = %id, day = %close.day, "another close of a stored day refused");
                Err(ServerError::DayConflict { day: close.day })
            }
            Err(Some(e)) => Err(e.into()),
        }
    }

    /// The station's closed days.
    pub fn days(&self, id: &Ident) -> Result<Vec<crate::protocol::DayClose>, ServerError> {
        let station = self.station(id)?;
        let st = lock(&station);
        Ok(st.days.all().to_vec())
    }

    /// The station's reported gaps.
    pub fn gaps(&self, id: &Ident) -> Result<Vec<SequenceGap>, ServerError> {
        let station = self.station(id)?;
        let st = lock(&station);
        Ok(st.gaps.all().to_vec())
    }

    /// Where the station's stored ledger ends.
    pub fn watermark(&self, id: &Ident) -> Result<Watermark, ServerError> {
        let station = self.station(id)?;
        let st = lock(&station);
        Ok(Watermark { acked_through: st.ledger.acked_through(), last_hash: Some(st.ledger.last_hash()) })
    }

    /// The station's counters.
    pub fn stats(&self, id: &Ident) -> Result<StationStats, ServerError> {
        let station = self.station(id)?;
        let st = lock(&station);
        Ok(stats_of(id, &st))
    }

    fn ingest_feed_dir(&self, id: &Ident, st: &mut Station) {
        if let Some(dir) = &self.config.feed_dir {
            st.feed.ingest_dir(&dir.join(id.as_str()), &self.config.feed_key, self.config.feed_key_id);
        }
    }

    /// Up to `limit` feed items after `after`, taking new feed-directory files first.
    pub fn params(&self, id: &Ident, after: u64, limit: usize) -> Result<FeedPage, ServerError> {
        let station = self.station(id)?;
        let mut st = lock(&station);
        self.ingest_feed_dir(id, &mut st);
        let items = st.feed.page(after, limit.clamp(1, crate::protocol::MAX_FEED_PAGE)).to_vec();
        let next_after = items.last().map_or(after, |i| i.seq);
        Ok(FeedPage { items, next_after })
    }

    /// Signs and appends a submission to the station's feed.
    pub fn publish(&self, id: &Ident, submission: FeedSubmission) -> Result<FeedItem, ServerError> {
        let station = self.station(id)?;
        let mut st = lock(&station);
        self.ingest_feed_dir(id, &mut st);
        let item =
            st.feed.publish(submission, "admin".into(), &self.config.feed_key, self.config.feed_key_id)?;
        tracing::info!(station = %id, seq = item.seq, kind = item.kind.as_str(), version = item.version, "feed item published");
        Ok(item)
    }

    /// The feed key's public half.
    pub fn feed_key(&self) -> FeedKeyInfo {
        FeedKeyInfo {
            key_id: self.config.feed_key_id,
            public_key: self.config.feed_key.verifying_key().to_bytes(),
        }
    }

    /// Prometheus text exposition of every station's figures.
    pub fn metrics(&self) -> String {
        let stations: Vec<(Ident, Arc<Mutex<Station>>)> =
            lock(&self.stations).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let stats: Vec<(StationStats, u64)> = stations
            .iter()
            .map(|(id, s)| {
                let st = lock(s);
                (stats_of(id, &st), st.counters.last_append_unix)
            })
            .collect();
        let mut out = String::with_capacity(4096);
        let gauges: [Gauge; 4] = [
            ("afc_clearing_records", "Records stored for the station, each exactly once.", |s| s.records),
            ("afc_clearing_acked_through", "Highest ledger index acknowledged to the station.", |s| {
                s.acked_through
            }),
            (
                "afc_clearing_duplicate_keys",
                "Stored records whose (gate, installation, gate_seq) was already stored: fares counted twice. Must be 0.",
                |s| s.duplicate_keys,
            ),
            ("afc_clearing_feed_items", "Items in the station's parameter feed.", |s| s.feed_items),
        ];
        for (name, help, get) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (s, _) in &stats {
                let _ = writeln!(out, "{name}{{station=\"{}\"}} {}", s.station, get(s));
            }
        }
        let name = "afc_clearing_last_append_timestamp_seconds";
        let _ = writeln!(out, "# HELP {name} Unix time of the last batch that stored records (0: none since start).\n# TYPE {name} gauge");
        for (s, t) in &stats {
            let _ = writeln!(out, "{name}{{station=\"{}\"}} {t}", s.station);
        }
        let name = "afc_clearing_batches_total";
        let _ = writeln!(out, "# HELP {name} Upload batches by outcome since start.\n# TYPE {name} counter");
        for (s, _) in &stats {
            for (outcome, v) in [
                ("acked", s.batches_acked),
                ("resend", s.resends),
                ("conflict", s.conflicts),
                ("rejected", s.rejected),
            ] {
                let _ = writeln!(out, "{name}{{station=\"{}\",outcome=\"{outcome}\"}} {v}", s.station);
            }
        }
        let name = "afc_clearing_resent_records_total";
        let _ = writeln!(
            out,
            "# HELP {name} Records received again and not stored twice.\n# TYPE {name} counter"
        );
        for (s, _) in &stats {
            let _ = writeln!(out, "{name}{{station=\"{}\"}} {}", s.station, s.resent_records);
        }
        for (name, help, v) in [
            (
                "afc_clearing_bad_requests_total",
                "Requests refused as malformed or over a limit.",
                self.bad_requests.load(Ordering::Relaxed),
            ),
            (
                "afc_clearing_unauthorized_total",
                "Requests refused for a missing or wrong token.",
                self.unauthorized.load(Ordering::Relaxed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let c = &self.bank_counters;
        let name = "afc_clearing_bank_charge_passes_total";
        let _ =
            writeln!(out, "# HELP {name} Bank charge passes by outcome since start.\n# TYPE {name} counter");
        for (outcome, v) in [("ok", &c.passes_ok), ("failed", &c.passes_failed)] {
            let _ = writeln!(out, "{name}{{outcome=\"{outcome}\"}} {}", v.load(Ordering::Relaxed));
        }
        let name = "afc_clearing_bank_charges_total";
        let _ = writeln!(out, "# HELP {name} Bank charges submitted and stored since start, by the acquirer's answer.\n# TYPE {name} counter");
        for (result, v) in [("approved", &c.approved), ("declined", &c.declined)] {
            let _ = writeln!(out, "{name}{{result=\"{result}\"}} {}", v.load(Ordering::Relaxed));
        }
        let name = "afc_clearing_bank_authorisations_total";
        let _ = writeln!(out, "# HELP {name} First-tap authorisations of bank tokens since start, by the acquirer's answer.\n# TYPE {name} counter");
        for (result, v) in [("approved", &c.auth_approved), ("declined", &c.auth_declined)] {
            let _ = writeln!(out, "{name}{{result=\"{result}\"}} {}", v.load(Ordering::Relaxed));
        }
        for (name, kind, help, v) in [
            (
                "afc_clearing_bank_deny_items_total",
                "counter",
                "deny_list feed items published for declined bank tokens since start (one per token and station).",
                &c.deny_items,
            ),
            (
                "afc_clearing_bank_last_pass_timestamp_seconds",
                "gauge",
                "Unix time of the last bank charge pass that completed (0: none since start).",
                &c.last_pass_unix,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", v.load(Ordering::Relaxed));
        }
        match self.tac_tallies() {
            Ok(all) => crate::tac::metrics_text(&mut out, all.iter().map(|(id, c)| (id, *c))),
            Err(e) => tracing::error!(error = %e, "metrics: stored records unreadable, no TAC figures"),
        }
        out
    }

    /// Every station's TAC counts, brought up to date: only the records stored since the last
    /// call are read (under the station's lock) and checked (outside it). Two concurrent calls
    /// may both check the same new records; only the first to come back adds them.
    fn tac_tallies(&self) -> Result<Vec<(Ident, crate::tac::TacCounts)>, ServerError> {
        let key = self.config.tac_issuer_key.as_ref();
        let stations: Vec<(Ident, Arc<Mutex<Station>>)> =
            lock(&self.stations).iter().map(|(id, s)| (id.clone(), s.clone())).collect();
        let mut out = Vec::with_capacity(stations.len());
        for (id, station) in stations {
            let (from, (records, to)) = {
                let st = lock(&station);
                (st.tacs.through, st.ledger.records_from(st.tacs.through)?)
            };
            let mut new = crate::tac::TacCounts::default();
            new.add_records(key, &records);
            let mut st = lock(&station);
            st.tacs.advance(from, to, new);
            out.push((id, st.tacs.counts));
        }
        Ok(out)
    }
}

/// A per-station gauge: name, help text, and how to read it from the stats.
type Gauge = (&'static str, &'static str, fn(&StationStats) -> u64);

fn stats_of(id: &Ident, st: &Station) -> StationStats {
    let c = st.counters;
    StationStats {
        station: id.clone(),
        records: st.ledger.acked_through(),
        acked_through: st.ledger.acked_through(),
        last_hash: st.ledger.last_hash(),
        batches_acked: c.batches_acked,
        resends: c.resends,
        resent_records: c.resent_records,
        conflicts: c.conflicts,
        rejected: c.rejected,
        duplicate_keys: st.ledger.duplicate_keys(),
        feed_items: st.feed.len(),
        sequence_gaps: st.gaps.stored_through(),
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimizer from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}
