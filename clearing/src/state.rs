//! The clearing house's state: every station's stored ledger, feed and counters, and the
//! operations the HTTP layer calls. Everything here is synchronous and may block on disk; the HTTP
//! layer runs it on the blocking pool.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use afc_domain::ledger::SequenceGap;
use afc_domain::model::Ident;

use crate::accept::{plan, Plan};
use crate::config::Config;
use crate::days::{DayFile, DayStored};
use crate::error::ServerError;
use crate::feed::FeedStore;
use crate::gaps::{GapFile, GapReportError};
use crate::protocol::{
    Acked, FeedItem, FeedKeyInfo, FeedPage, FeedSubmission, GapReport, GapsStored, StationStats, UploadBatch,
    Watermark,
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
}

/// Shared by every HTTP worker.
pub struct ClearingState {
    config: Config,
    stations: Mutex<BTreeMap<Ident, Arc<Mutex<Station>>>>,
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
        let state = ClearingState {
            config,
            stations: Mutex::new(BTreeMap::new()),
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
        }));
        stations.insert(id.clone(), station.clone());
        Ok(station)
    }

    /// Pairs and prices every station's QR taps (see [`crate::journeys`]), as of `as_of`. Each
    /// station's records are read under its lock, then priced outside every lock.
    pub fn price_qr(
        &self,
        as_of: afc_domain::model::Timestamp,
    ) -> Result<crate::journeys::Priced, ServerError> {
        use crate::journeys::{price_qr, Timeline};
        let stations: Vec<(Ident, Arc<Mutex<Station>>)> =
            lock(&self.stations).iter().map(|(id, s)| (id.clone(), s.clone())).collect();
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
        Ok(price_qr(&records, &|s: &Ident| timelines.get(s).cloned(), as_of))
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
        match self.all_records() {
            Ok(all) => crate::tac::metrics_text(
                &mut out,
                self.config.tac_issuer_key.as_ref(),
                all.iter().map(|(id, r)| (id, r.as_slice())),
            ),
            Err(e) => tracing::error!(error = %e, "metrics: stored records unreadable, no TAC figures"),
        }
        out
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
