//! `GET /metrics`: the controller's Prometheus metrics (SPEC §10), text format 0.0.4, valid for
//! `promtool check metrics`.
//!
//! Most values are read at scrape time: Raft's metrics, the replicated state, the gate view, the
//! leader duties' MQTT state and counters ([`crate::leader::Duties`]) and the clearing uploader's
//! [`crate::clearing_sync::ClearingStatus`]. What only happens inside a task (ledger append
//! latency and transactions ingested, from `tx-ingest`; rollout state) is pushed into
//! [`ControllerMetrics`] by that task.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use actix_web::{web, HttpResponse};
use afc_domain::mode::ModeBits;
use afc_domain::model::ParamKind;
use afc_domain::package::Package;
use openraft::ServerState;

use super::{cluster, gates, now, ApiState, Caller};

/// Upper bounds of the ledger append latency buckets, seconds.
const APPEND_BUCKETS: [f64; 10] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Values fed by the node's tasks; read at scrape time.
#[derive(Debug, Default)]
pub struct ControllerMetrics {
    append_buckets: [AtomicU64; APPEND_BUCKETS.len()],
    append_count: AtomicU64,
    append_sum_micros: AtomicU64,
    tx_ingested: AtomicU64,
    /// Ledger scans refused with 503 `busy` (no free slot within `api.scan_wait_ms`), per [`SCANS`].
    scans_refused: [AtomicU64; SCANS.len()],
    /// kind → rollout state name (`idle`, `canary`, `soak`, `rolling_out`, `done`, `rolled_back`, `aborted`).
    rollouts: Mutex<BTreeMap<String, String>>,
    /// (kind, version) → effective_from ms, so a scrape decodes each package header once.
    effective: Mutex<BTreeMap<(u8, u64), i64>>,
    /// gate → committed records with an implausible time (ahead, older): `controller::leader::plausible`.
    implausible_time: Mutex<BTreeMap<String, (u64, u64)>>,
}

/// The rollout states `afc_rollout_state` reports, one series each.
pub const ROLLOUT_STATES: [&str; 7] =
    ["idle", "canary", "soak", "rolling_out", "done", "rolled_back", "aborted"];

/// The ledger scans `afc_api_scans_refused_total` counts, one series each.
pub const SCANS: [&str; 2] = ["verify", "search"];

impl ControllerMetrics {
    /// Committed records of `gate` whose time was implausible: `ahead` of this node's clock, `older`.
    pub fn implausible_time(&self, gate: &str, ahead: u64, older: u64) {
        let mut m = self.implausible_time.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(gate.to_owned()).or_default();
        e.0 += ahead;
        e.1 += older;
    }

    /// A ledger scan (`verify` or `search`, one of [`SCANS`]) was refused for want of a free slot.
    pub fn scan_refused(&self, scan: &str) {
        if let Some(i) = SCANS.iter().position(|s| *s == scan) {
            self.scans_refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One ledger append committed (a gate batch through Raft), with its latency and new records.
    pub fn observe_append(&self, latency: Duration, records: u64) {
        let secs = latency.as_secs_f64();
        for (i, b) in APPEND_BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.append_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.append_count.fetch_add(1, Ordering::Relaxed);
        self.append_sum_micros
            .fetch_add(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.tx_ingested.fetch_add(records, Ordering::Relaxed);
    }

    pub fn set_rollout_state(&self, kind: ParamKind, state: &str) {
        if let Ok(mut r) = self.rollouts.lock() {
            r.insert(kind.as_str().to_owned(), state.to_owned());
        }
    }
}

/// A Prometheus text-format writer: HELP and TYPE once per family, then its samples.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

fn effective_from_ms(state: &ApiState, kind: ParamKind, version: u64) -> Option<i64> {
    let key = (kind.code(), version);
    if let Some(v) = state.metrics.effective.lock().ok().and_then(|m| m.get(&key).copied()) {
        return Some(v);
    }
    let bytes = state.node.sm.package(kind, version).ok()??;
    let ms = Package::decode(&bytes).ok()?.header.effective_from.0;
    if let Ok(mut m) = state.metrics.effective.lock() {
        m.retain(|(k, _), _| *k != kind.code());
        m.insert(key, ms);
    }
    Some(ms)
}

/// The `afc_rollout_state` name of a rollout's stage.
pub fn rollout_state_name(r: &afc_domain::rollout::Rollout) -> &'static str {
    use afc_domain::rollout::{RollbackReason, Stage};
    match &r.stage {
        Stage::Canary { .. } => "canary",
        Stage::Soak { .. } => "soak",
        Stage::Full { .. } => "rolling_out",
        Stage::Done { .. } => "done",
        Stage::RolledBack { reason: RollbackReason::OperatorAbort { .. }, .. } => "aborted",
        Stage::RolledBack { .. } => "rolled_back",
    }
}

/// Renders every metric.
pub fn render(state: &ApiState) -> String {
    let mut o = Out(String::new());
    let c = cluster::snapshot(state);
    let m = state.node.raft.metrics().borrow().clone();

    o.family("afc_raft_state", "gauge", "1 for the Raft role this node is in.");
    for s in [
        ServerState::Leader,
        ServerState::Follower,
        ServerState::Candidate,
        ServerState::Learner,
        ServerState::Shutdown,
    ] {
        o.sample("afc_raft_state", &[("state", cluster::role_name(s))], f64::from(u8::from(m.state == s)));
    }
    // Why Raft stopped, if it stopped on a fatal error (the process exits soon after).
    let fatal = state.node.fatal();
    o.family(
        "afc_controller_raft_fatal",
        "gauge",
        "1 for the reason this node's Raft core stopped (storage_full, storage_read_only, storage, panicked): not ready, exiting for a restart.",
    );
    for r in crate::node::RaftFatal::REASONS {
        let on = fatal.as_ref().is_some_and(|f| f.reason == r);
        o.sample("afc_controller_raft_fatal", &[("reason", r)], f64::from(u8::from(on)));
    }
    o.one(
        "afc_raft_leader_known",
        "gauge",
        "1 if this node knows a leader.",
        f64::from(u8::from(c.leader.is_some())),
    );
    o.one("afc_raft_term", "gauge", "Current Raft term.", c.term as f64);
    o.one(
        "afc_raft_last_log_index",
        "gauge",
        "Index of the last Raft log entry.",
        c.last_log_index.unwrap_or(0) as f64,
    );
    o.one(
        "afc_raft_commit_index",
        "gauge",
        "Highest Raft log index known committed.",
        c.commit_index.unwrap_or(0) as f64,
    );
    o.one(
        "afc_raft_applied_index",
        "gauge",
        "Highest Raft log index applied.",
        c.applied_index.unwrap_or(0) as f64,
    );
    o.one(
        "afc_raft_voters",
        "gauge",
        "Voters in the current membership.",
        c.members.iter().filter(|x| x.voter).count() as f64,
    );
    o.family(
        "afc_raft_follower_lag_entries",
        "gauge",
        "Log entries a member is behind the leader (leader only).",
    );
    for mem in &c.members {
        if let Some(lag) = mem.lag {
            o.sample("afc_raft_follower_lag_entries", &[("node", &mem.id.to_string())], lag as f64);
        }
    }

    if let Ok(s) = state.node.sm.state() {
        o.one(
            "afc_ledger_records_total",
            "counter",
            "Transactions ever appended to the ledger (its last index); rate() is the ingest rate.",
            s.last_index() as f64,
        );
        o.one(
            "afc_ledger_records_stored",
            "gauge",
            "Ledger entries currently stored (not pruned).",
            s.ledger_len() as f64,
        );
        let backlog = s.last_index().saturating_sub(s.clearing_acked_through);
        o.one(
            "afc_clearing_backlog_records",
            "gauge",
            "Ledger entries not yet acknowledged by central clearing.",
            backlog as f64,
        );
        o.one(
            "afc_clearing_acked_through",
            "gauge",
            "Highest ledger index acknowledged by central clearing.",
            s.clearing_acked_through as f64,
        );
        o.one(
            "afc_gates_registered",
            "gauge",
            "Gates registered in the replicated state.",
            s.gates.len() as f64,
        );
        o.family(
            "afc_ledger_sequence_gaps_total",
            "counter",
            "Runs of a gate's sequence numbers recorded as lost (the gate no longer held them).",
        );
        o.family(
            "afc_ledger_key_conflicts_total",
            "counter",
            "Records refused because the ledger holds their (gate, installation, gate_seq) with other content.",
        );
        for (gate, g) in &s.gates {
            o.sample("afc_ledger_sequence_gaps_total", &[("gate", gate.as_str())], g.gaps as f64);
            o.sample("afc_ledger_key_conflicts_total", &[("gate", gate.as_str())], g.conflicts as f64);
        }
        o.one(
            "afc_audit_entries_total",
            "counter",
            "Lines ever written to the audit log.",
            s.next_audit.saturating_sub(1) as f64,
        );
        let bits = s.modes.bits_at(state.station_code, now());
        o.one(
            "afc_station_mode_bitmask",
            "gauge",
            "The station's operating-mode bitmask (SPEC §2).",
            f64::from(bits.0),
        );
        o.one(
            "afc_station_emergency_release",
            "gauge",
            "1 while emergency release is set.",
            f64::from(u8::from(bits.has(ModeBits::EMERGENCY_RELEASE))),
        );
        o.family("afc_param_version", "gauge", "Current stored version per parameter kind (0 = none).");
        let mut eff = Vec::new();
        for k in ParamKind::ALL {
            let v = s.packages.get(k.as_str()).map(|p| p.current()).unwrap_or(0);
            o.sample("afc_param_version", &[("kind", k.as_str())], v as f64);
            if v > 0 {
                if let Some(ms) = effective_from_ms(state, k, v) {
                    eff.push((k, ms));
                }
            }
        }
        o.family(
            "afc_param_effective_from_timestamp_seconds",
            "gauge",
            "effective_from of the current version per kind.",
        );
        for (k, ms) in eff {
            o.sample(
                "afc_param_effective_from_timestamp_seconds",
                &[("kind", k.as_str())],
                ms as f64 / 1000.0,
            );
        }
    }

    let gates = gates::all_local(state).unwrap_or_default();
    o.one(
        "afc_gates_online",
        "gauge",
        "Gates currently online.",
        gates.iter().filter(|g| g.live.online).count() as f64,
    );
    o.family("afc_gate_online", "gauge", "1 if the gate is online.");
    for g in &gates {
        o.sample("afc_gate_online", &[("gate", &g.live.gate)], f64::from(u8::from(g.live.online)));
    }
    o.family("afc_gate_alarm_active", "gauge", "1 per active gate alarm (plc_offline, door_fault, ...).");
    for g in &gates {
        for a in &g.live.alarms {
            o.sample("afc_gate_alarm_active", &[("gate", &g.live.gate), ("alarm", a)], 1.0);
        }
    }
    o.family(
        "afc_gate_param_drift",
        "gauge",
        "1 if the gate's reported version of a kind differs from the desired one.",
    );
    for g in &gates {
        for k in g.desired_versions.keys() {
            o.sample(
                "afc_gate_param_drift",
                &[("gate", &g.live.gate), ("kind", k)],
                f64::from(u8::from(g.drift.contains(k))),
            );
        }
    }
    o.family("afc_gate_outbox_depth", "gauge", "Transactions in the gate's outbox, from its heartbeat.");
    o.family("afc_gate_outbox_bytes", "gauge", "Bytes held by the gate's outbox, from its heartbeat.");
    o.family(
        "afc_gate_outbox_capacity_bytes",
        "gauge",
        "The gate's outbox capacity in bytes (taps are refused outbox_full beyond it), from its heartbeat.",
    );
    for g in &gates {
        let gate = [("gate", g.live.gate.as_str())];
        if let Some(d) = g.live.counters.get("outbox_depth") {
            o.sample("afc_gate_outbox_depth", &gate, *d as f64);
        }
        if let Some(b) = g.live.counters.get("outbox_bytes") {
            o.sample("afc_gate_outbox_bytes", &gate, *b as f64);
        }
        // Absent (0) from gates that do not send it: no series, so the alert does not divide by 0.
        if let Some(c) = g.live.counters.get("outbox_capacity_bytes").filter(|c| **c > 0) {
            o.sample("afc_gate_outbox_capacity_bytes", &gate, *c as f64);
        }
    }

    let fm = &state.metrics;
    o.family("afc_ledger_append_seconds", "histogram", "Latency of committing one gate batch to the ledger.");
    for (i, b) in APPEND_BUCKETS.iter().enumerate() {
        o.sample(
            "afc_ledger_append_seconds_bucket",
            &[("le", &b.to_string())],
            fm.append_buckets[i].load(Ordering::Relaxed) as f64,
        );
    }
    let count = fm.append_count.load(Ordering::Relaxed) as f64;
    o.sample("afc_ledger_append_seconds_bucket", &[("le", "+Inf")], count);
    o.sample("afc_ledger_append_seconds_sum", &[], fm.append_sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
    o.sample("afc_ledger_append_seconds_count", &[], count);
    o.one(
        "afc_tx_ingested_total",
        "counter",
        "Transactions received from gates and committed by this node as leader.",
        fm.tx_ingested.load(Ordering::Relaxed) as f64,
    );
    o.family(
        "afc_ledger_implausible_time_total",
        "counter",
        "Committed records whose occurred_at was more than 5 min ahead of this node's clock (when=ahead) or more than 7 days behind it (when=older), counted while leader.",
    );
    for (gate, (ahead, older)) in fm.implausible_time.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        o.sample("afc_ledger_implausible_time_total", &[("gate", gate), ("when", "ahead")], *ahead as f64);
        o.sample("afc_ledger_implausible_time_total", &[("gate", gate), ("when", "older")], *older as f64);
    }
    o.family(
        "afc_api_scans_refused_total",
        "counter",
        "Ledger scans (verify, search) answered 503 busy: api.max_concurrent_scans were running.",
    );
    for (i, scan) in SCANS.iter().enumerate() {
        o.sample(
            "afc_api_scans_refused_total",
            &[("scan", scan)],
            fm.scans_refused[i].load(Ordering::Relaxed) as f64,
        );
    }
    let duties = state.duties.as_ref().map(|d| d.status());
    o.one(
        "afc_mqtt_connected",
        "gauge",
        "1 while this node's MQTT client is connected to the broker (only the leader connects).",
        f64::from(u8::from(duties.as_ref().is_some_and(|d| d.mqtt_connected))),
    );
    o.one(
        "afc_mqtt_leader_session",
        "gauge",
        "1 while this node runs the leader's MQTT duties.",
        f64::from(u8::from(duties.as_ref().is_some_and(|d| d.leading))),
    );
    if let Some(d) = &state.duties {
        let st = &d.stats;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
        o.one(
            "afc_mqtt_malformed_messages_total",
            "counter",
            "MQTT messages from gates refused as malformed or misaddressed.",
            load(&st.malformed),
        );
        o.family(
            "afc_controller_unverified_messages_total",
            "counter",
            "Gate messages ignored because they do not verify against the gate's registered key, by topic and reason.",
        );
        for (topic, reason, n) in st.unverified() {
            o.sample(
                "afc_controller_unverified_messages_total",
                &[("topic", topic), ("reason", reason)],
                n as f64,
            );
        }
        o.one(
            "afc_controller_mode_restored_total",
            "counter",
            "Times the retained mode on the broker was not the one this leader published (cleared, forged or replayed) and was published again.",
            load(&st.mode_restored),
        );
        o.one(
            "afc_controller_state_restored_total",
            "counter",
            "Times the retained state on the broker was not this leader's (an old leader's will or state, cleared or forged) and was published again.",
            load(&st.state_restored),
        );
        o.one(
            "afc_controller_leadership_unconfirmed_total",
            "counter",
            "Times leader duties did not start or stopped because a quorum did not confirm this node's leadership.",
            load(&st.leadership_unconfirmed),
        );
        o.family("afc_tx_batches_total", "counter", "Gate transaction batches by outcome.");
        for (outcome, c) in [
            ("acked", &st.tx_batches_acked),
            ("rejected", &st.tx_batches_rejected),
            ("dropped", &st.tx_batches_dropped),
            ("propose_error", &st.tx_propose_errors),
        ] {
            o.sample("afc_tx_batches_total", &[("outcome", outcome)], load(c));
        }
    }
    let cl = state.clearing.as_ref().map(|c| c.snapshot()).unwrap_or_default();
    o.one(
        "afc_clearing_enabled",
        "gauge",
        "1 if a clearing URL is configured.",
        f64::from(u8::from(cl.enabled)),
    );
    o.one(
        "afc_clearing_last_success_timestamp_seconds",
        "gauge",
        "When a clearing upload from this node last succeeded (0 = never).",
        cl.last_success.map_or(0.0, |t| t.millis() as f64 / 1000.0),
    );
    o.one(
        "afc_clearing_batches_acked_total",
        "counter",
        "Batches central clearing acknowledged from this node.",
        cl.batches_acked as f64,
    );
    o.one(
        "afc_clearing_records_acked_total",
        "counter",
        "Ledger records central clearing acknowledged from this node.",
        cl.records_acked as f64,
    );
    o.one(
        "afc_clearing_upload_errors_total",
        "counter",
        "Clearing upload rounds that failed (unreachable, refused, inconsistent).",
        cl.errors_total as f64,
    );
    o.one(
        "afc_clearing_conflicts_total",
        "counter",
        "409 answers from clearing (a batch not starting right after its watermark).",
        cl.conflicts as f64,
    );
    o.one(
        "afc_clearing_alarm_active",
        "gauge",
        "1 while clearing and the station ledger disagree (behind, fork, pruned, refused).",
        f64::from(u8::from(cl.alarm.is_some())),
    );
    let lag = super::records::lag_now(state, &cl);
    o.one(
        "afc_clearing_lag_seconds",
        "gauge",
        "Seconds ledger records have waited with no upload acknowledged by clearing (0 when caught up, and on followers: only the leader uploads).",
        lag.lag_ms.map_or(0.0, |ms| ms as f64 / 1000.0),
    );
    o.one(
        "afc_clearing_lag_alarm",
        "gauge",
        "1 while the clearing lag is at or above clearing.lag_alarm_secs (leader only).",
        f64::from(u8::from(lag.lag_alarm)),
    );
    o.family("afc_rollout_state", "gauge", "1 for the rollout state each parameter kind is in.");
    let mut rollouts = fm.rollouts.lock().map(|r| r.clone()).unwrap_or_default();
    // The replicated rollouts (every node has them) win over a task's own report.
    if let Ok(st) = state.node.sm.state() {
        for (kind, r) in &st.rollouts.rollouts.by_kind {
            rollouts.insert(kind.as_str().to_owned(), rollout_state_name(r).to_owned());
        }
    }
    for k in ParamKind::ALL {
        let cur = rollouts.get(k.as_str()).map(String::as_str).unwrap_or("idle");
        for s in ROLLOUT_STATES {
            o.sample(
                "afc_rollout_state",
                &[("kind", k.as_str()), ("state", s)],
                f64::from(u8::from(cur == s)),
            );
        }
    }
    o.0
}

pub async fn metrics(_c: Caller, state: web::Data<ApiState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(render(&state))
}
