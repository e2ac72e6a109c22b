//! The controller's Prometheus registry (SPEC §10) on the `prometheus` crate
//! ([`afc_process::metrics`]), with `process_*` and `afc_build_info`: [`ControllerMetrics`], which
//! the node's tasks feed (ledger append latency and transactions ingested, from `tx-ingest`;
//! implausible times; refused scans; rollout state), and the [`SCRAPED`] families that the API
//! fills at scrape time (`api/metrics.rs`, which also serves `GET /metrics`). It imports nothing
//! of the API: the API hands it a reader ([`ControllerMetrics::serve`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use afc_domain::model::ParamKind;
use afc_process::metrics::prometheus::{Histogram, IntCounter, IntCounterVec, Registry};
use afc_process::metrics::{self as m, counter, gauge, Family, Samples, ScrapeCollector};

/// Upper bounds of the ledger append latency buckets, seconds.
const APPEND_BUCKETS: [f64; 10] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];

/// What a scrape runs to fill the [`SCRAPED`] families (the API's reader of its own state).
type Scrape = Box<dyn Fn(&mut Samples<'_>) + Send + Sync>;

/// The registry of one node: `process_*`, `afc_build_info`, what the node's tasks count, and
/// [`SCRAPED`], filled at every scrape by the reader the API hands to [`ControllerMetrics::serve`].
pub struct ControllerMetrics {
    registry: Registry,
    append_seconds: Histogram,
    tx_ingested: IntCounter,
    /// Ledger scans refused with 503 `busy` (no free slot within `api.scan_wait_ms`), by [`SCANS`].
    scans_refused: IntCounterVec,
    /// Committed records with an implausible time (`controller::leader::plausible`), by gate and
    /// when (ahead, older).
    implausible_time: IntCounterVec,
    /// kind → rollout state name (`idle`, `canary`, `soak`, `rolling_out`, `done`, `rolled_back`, `aborted`).
    rollouts: Mutex<BTreeMap<String, String>>,
    /// (kind, version) → effective_from ms, so a scrape decodes each package header once.
    effective: Mutex<BTreeMap<(u8, u64), i64>>,
    /// What the scrape reads; set when the API is configured ([`ControllerMetrics::serve`]).
    source: Arc<Mutex<Option<Scrape>>>,
}

impl std::fmt::Debug for ControllerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerMetrics").finish_non_exhaustive()
    }
}

/// The rollout states `afc_rollout_state` reports, one series each.
pub const ROLLOUT_STATES: [&str; 7] =
    ["idle", "canary", "soak", "rolling_out", "done", "rolled_back", "aborted"];

/// The ledger scans `afc_api_scans_refused_total` counts, one series each.
pub const SCANS: [&str; 5] = ["verify", "search", "flow", "report", "close"];

impl Default for ControllerMetrics {
    fn default() -> Self {
        let r = m::new_registry();
        let append_seconds = m::histogram(
            "afc_ledger_append_seconds",
            "Latency of committing one gate batch to the ledger.",
            &APPEND_BUCKETS,
        );
        m::register(&r, append_seconds.clone());
        let tx_ingested = m::int_counter(
            &r,
            "afc_tx_ingested_total",
            "Transactions received from gates and committed by this node as leader.",
        );
        let scans_refused = m::int_counter_vec(
            &r,
            "afc_api_scans_refused_total",
            "Ledger scans (verify, search, report: day closes and reports) answered 503 busy: api.max_concurrent_scans were running.",
            &["scan"],
        );
        for scan in SCANS {
            scans_refused.with_label_values(&[scan]);
        }
        let implausible_time = m::int_counter_vec(
            &r,
            "afc_ledger_implausible_time_total",
            "Committed records whose occurred_at was more than 5 min ahead of this node's clock (when=ahead) or more than 7 days behind it (when=older), counted while leader.",
            &["gate", "when"],
        );
        let source: Arc<Mutex<Option<Scrape>>> = Arc::new(Mutex::new(None));
        let from = source.clone();
        let read = move |s: &mut Samples<'_>| {
            if let Some(fill) = from.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                fill(s);
            }
        };
        match ScrapeCollector::new(SCRAPED, read) {
            Ok(c) => m::register(&r, c),
            Err(e) => tracing::error!(error = %e, "metrics: the scrape-time series are not exported"),
        }
        ControllerMetrics {
            registry: r,
            append_seconds,
            tx_ingested,
            scans_refused,
            implausible_time,
            rollouts: Mutex::default(),
            effective: Mutex::default(),
            source,
        }
    }
}

impl ControllerMetrics {
    /// Committed records of `gate` whose time was implausible: `ahead` of this node's clock, `older`.
    pub fn implausible_time(&self, gate: &str, ahead: u64, older: u64) {
        self.implausible_time.with_label_values(&[gate, "ahead"]).inc_by(ahead);
        self.implausible_time.with_label_values(&[gate, "older"]).inc_by(older);
    }

    /// A ledger scan (`verify` or `search`, one of [`SCANS`]) was refused for want of a free slot.
    pub fn scan_refused(&self, scan: &str) {
        if SCANS.contains(&scan) {
            self.scans_refused.with_label_values(&[scan]).inc();
        }
    }

    /// One ledger append committed (a gate batch through Raft), with its latency and new records.
    pub fn observe_append(&self, latency: Duration, records: u64) {
        m::observe(&self.append_seconds, latency);
        self.tx_ingested.inc_by(records);
    }

    pub fn set_rollout_state(&self, kind: ParamKind, state: &str) {
        if let Ok(mut r) = self.rollouts.lock() {
            r.insert(kind.as_str().to_owned(), state.to_owned());
        }
    }

    /// From now on a scrape fills [`SCRAPED`] with `fill` (the API's reader; it holds the API's
    /// state weakly, as the state holds this registry).
    pub fn serve(&self, fill: impl Fn(&mut Samples<'_>) + Send + Sync + 'static) {
        *self.source.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(fill));
    }

    /// The rollout state each task last reported, per kind.
    pub fn rollout_states(&self) -> BTreeMap<String, String> {
        self.rollouts.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The effective_from (ms) of `kind`'s `version`, from the cache or else from `decode` (then
    /// cached, replacing the kind's older versions).
    pub fn effective_from_ms(
        &self,
        kind: ParamKind,
        version: u64,
        decode: impl FnOnce() -> Option<i64>,
    ) -> Option<i64> {
        let key = (kind.code(), version);
        if let Some(v) = self.effective.lock().ok().and_then(|m| m.get(&key).copied()) {
            return Some(v);
        }
        let ms = decode()?;
        if let Ok(mut m) = self.effective.lock() {
            m.retain(|(k, _), _| *k != kind.code());
            m.insert(key, ms);
        }
        Some(ms)
    }

    /// The text exposition of everything this registry holds.
    pub fn render(&self) -> String {
        m::encode(&self.registry)
    }
}

/// The families read from the API's state at scrape time (`api/metrics.rs` fills them).
pub const SCRAPED: &[Family] = &[
    gauge("afc_raft_state", "1 for the Raft role this node is in.", &["state"]),
    gauge(
        "afc_controller_raft_fatal",
        "1 for the reason this node's Raft core stopped (storage_full, storage_read_only, storage, panicked): not ready, exiting for a restart.",
        &["reason"],
    ),
    gauge("afc_raft_leader_known", "1 if this node knows a leader.", &[]),
    gauge("afc_raft_term", "Current Raft term.", &[]),
    gauge("afc_raft_last_log_index", "Index of the last Raft log entry.", &[]),
    gauge("afc_raft_commit_index", "Highest Raft log index known committed.", &[]),
    gauge("afc_raft_applied_index", "Highest Raft log index applied.", &[]),
    gauge("afc_raft_voters", "Voters in the current membership.", &[]),
    gauge("afc_raft_follower_lag_entries", "Log entries a member is behind the leader (leader only).", &["node"]),
    counter(
        "afc_ledger_records_total",
        "Transactions ever appended to the ledger (its last index); rate() is the ingest rate.",
        &[],
    ),
    gauge("afc_ledger_records_stored", "Ledger entries currently stored (not pruned).", &[]),
    gauge("afc_clearing_backlog_records", "Ledger entries not yet acknowledged by central clearing.", &[]),
    gauge("afc_clearing_acked_through", "Highest ledger index acknowledged by central clearing.", &[]),
    gauge("afc_gates_registered", "Gates registered in the replicated state.", &[]),
    counter(
        "afc_ledger_sequence_gaps_total",
        "Runs of a gate's sequence numbers recorded as lost (the gate no longer held them).",
        &["gate"],
    ),
    counter(
        "afc_ledger_key_conflicts_total",
        "Records refused because the ledger holds their (gate, installation, gate_seq) with other content.",
        &["gate"],
    ),
    counter("afc_audit_entries_total", "Lines ever written to the audit log.", &[]),
    gauge("afc_station_mode_bitmask", "The station's operating-mode bitmask (SPEC §2).", &[]),
    gauge("afc_station_emergency_release", "1 while emergency release is set.", &[]),
    gauge("afc_param_version", "Current stored version per parameter kind (0 = none).", &["kind"]),
    gauge(
        "afc_param_effective_from_timestamp_seconds",
        "effective_from of the current version per kind.",
        &["kind"],
    ),
    gauge(
        "afc_day_close_discrepancies",
        "Reconciliation rows that do not match (PLC passages vs recorded taps per gate and direction) in the latest closed business day, labelled with it.",
        &["day"],
    ),
    gauge("afc_day_close_not_uploaded", "Closed business days clearing has not stored yet.", &[]),
    gauge("afc_gates_online", "Gates currently online.", &[]),
    gauge("afc_gate_online", "1 if the gate is online.", &["gate"]),
    gauge("afc_gate_alarm_active", "1 per active gate alarm (plc_offline, door_fault, ...).", &["gate", "alarm"]),
    gauge(
        "afc_gate_param_drift",
        "1 if the gate's reported version of a kind differs from the desired one.",
        &["gate", "kind"],
    ),
    gauge("afc_gate_outbox_depth", "Transactions in the gate's outbox, from its heartbeat.", &["gate"]),
    gauge("afc_gate_outbox_bytes", "Bytes held by the gate's outbox, from its heartbeat.", &["gate"]),
    gauge(
        "afc_gate_outbox_capacity_bytes",
        "The gate's outbox capacity in bytes (taps are refused outbox_full beyond it), from its heartbeat.",
        &["gate"],
    ),
    gauge(
        "afc_mqtt_connected",
        "1 while this node's MQTT client is connected to the broker (only the leader connects).",
        &[],
    ),
    gauge("afc_mqtt_leader_session", "1 while this node runs the leader's MQTT duties.", &[]),
    counter("afc_mqtt_malformed_messages_total", "MQTT messages from gates refused as malformed or misaddressed.", &[]),
    counter(
        "afc_controller_unverified_messages_total",
        "Gate messages ignored because they do not verify against the gate's registered key, by topic and reason.",
        &["topic", "reason"],
    ),
    counter(
        "afc_controller_mode_restored_total",
        "Times the retained mode on the broker was not the one this leader published (cleared, forged or replayed) and was published again.",
        &[],
    ),
    counter(
        "afc_controller_state_restored_total",
        "Times the retained state on the broker was not this leader's (an old leader's will or state, cleared or forged) and was published again.",
        &[],
    ),
    counter(
        "afc_controller_leadership_unconfirmed_total",
        "Times leader duties did not start or stopped because a quorum did not confirm this node's leadership.",
        &[],
    ),
    counter("afc_tx_batches_total", "Gate transaction batches by outcome.", &["outcome"]),
    gauge("afc_clearing_enabled", "1 if a clearing URL is configured.", &[]),
    gauge(
        "afc_clearing_last_success_timestamp_seconds",
        "When a clearing upload from this node last succeeded (0 = never).",
        &[],
    ),
    counter("afc_clearing_batches_acked_total", "Batches central clearing acknowledged from this node.", &[]),
    counter("afc_clearing_records_acked_total", "Ledger records central clearing acknowledged from this node.", &[]),
    counter(
        "afc_clearing_upload_errors_total",
        "Clearing upload rounds that failed (unreachable, refused, inconsistent).",
        &[],
    ),
    counter(
        "afc_clearing_conflicts_total",
        "409 answers from clearing (a batch not starting right after its watermark).",
        &[],
    ),
    gauge(
        "afc_clearing_alarm_active",
        "1 while clearing and the station ledger disagree (behind, fork, pruned, refused).",
        &[],
    ),
    gauge(
        "afc_clearing_lag_seconds",
        "Seconds ledger records have waited with no upload acknowledged by clearing (0 when caught up, and on followers: only the leader uploads).",
        &[],
    ),
    gauge(
        "afc_clearing_lag_alarm",
        "1 while the clearing lag is at or above clearing.lag_alarm_secs (leader only).",
        &[],
    ),
    gauge("afc_rollout_state", "1 for the rollout state each parameter kind is in.", &["kind", "state"]),
];
