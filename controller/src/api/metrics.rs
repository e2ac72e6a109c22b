//! `GET /metrics`: the controller's Prometheus metrics (SPEC §10), text format 0.0.4, valid for
//! `promtool check metrics`. The registry is [`crate::metrics::ControllerMetrics`].
//!
//! Most values are read at scrape time by its custom collector ([`crate::metrics::SCRAPED`], filled here from the
//! [`ApiState`]): Raft's metrics, the replicated state, the gate view, the leader duties' MQTT
//! state and counters ([`crate::leader::Duties`]) and the clearing uploader's
//! [`crate::clearing_sync::ClearingStatus`]. What only happens inside a task (ledger append
//! latency and transactions ingested, from `tx-ingest`; implausible times; refused scans; rollout
//! state) is counted in [`crate::metrics::ControllerMetrics`]'s registered series by that task.

use std::sync::{Arc, Weak};

use actix_web::{web, HttpResponse};
use afc_domain::mode::ModeBits;
use afc_domain::model::ParamKind;
use afc_domain::package::Package;
use afc_process::metrics::{self as m, Samples};
use openraft::ServerState;

use super::{cluster, gates, ApiState, Caller};
use crate::clock::now;
use crate::metrics::ROLLOUT_STATES;

fn effective_from_ms(state: &ApiState, kind: ParamKind, version: u64) -> Option<i64> {
    state.metrics.effective_from_ms(kind, version, || {
        let bytes = state.node.sm.package(kind, version).ok()??;
        Some(Package::decode(&bytes).ok()?.header.effective_from.0)
    })
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

/// Reads every [`crate::metrics::SCRAPED`] family from `state`.
fn fill(state: &ApiState, o: &mut Samples<'_>) {
    let c = cluster::snapshot(state);
    let m = state.node.raft.metrics().borrow().clone();
    for s in [
        ServerState::Leader,
        ServerState::Follower,
        ServerState::Candidate,
        ServerState::Learner,
        ServerState::Shutdown,
    ] {
        o.flag("afc_raft_state", &[cluster::role_name(s)], m.state == s);
    }
    // Why Raft stopped, if it stopped on a fatal error (the process exits soon after).
    let fatal = state.node.fatal();
    for r in crate::node::RaftFatal::REASONS {
        o.flag("afc_controller_raft_fatal", &[r], fatal.as_ref().is_some_and(|f| f.reason == r));
    }
    o.flag("afc_raft_leader_known", &[], c.leader.is_some());
    o.one("afc_raft_term", c.term as f64);
    o.one("afc_raft_last_log_index", c.last_log_index.unwrap_or(0) as f64);
    o.one("afc_raft_commit_index", c.commit_index.unwrap_or(0) as f64);
    o.one("afc_raft_applied_index", c.applied_index.unwrap_or(0) as f64);
    o.one("afc_raft_voters", c.members.iter().filter(|x| x.voter).count() as f64);
    for mem in &c.members {
        if let Some(lag) = mem.lag {
            o.set("afc_raft_follower_lag_entries", &[&mem.id.to_string()], lag as f64);
        }
    }

    if let Ok(s) = state.node.sm.state() {
        o.one("afc_ledger_records_total", s.last_index() as f64);
        o.one("afc_ledger_records_stored", s.ledger_len() as f64);
        o.one("afc_clearing_backlog_records", s.last_index().saturating_sub(s.clearing_acked_through) as f64);
        o.one("afc_clearing_acked_through", s.clearing_acked_through as f64);
        o.one("afc_gates_registered", s.gates.len() as f64);
        for (gate, g) in &s.gates {
            o.set("afc_ledger_sequence_gaps_total", &[gate.as_str()], g.gaps as f64);
            o.set("afc_ledger_key_conflicts_total", &[gate.as_str()], g.conflicts as f64);
        }
        o.one("afc_audit_entries_total", s.next_audit.saturating_sub(1) as f64);
        if let Some((day, m)) = s.days.last_key_value() {
            o.set("afc_day_close_discrepancies", &[&day.to_string()], f64::from(m.discrepancies));
        }
        o.one("afc_day_close_not_uploaded", s.days.values().filter(|m| !m.uploaded).count() as f64);
        let bits = s.modes.bits_at(state.station_code, now());
        o.one("afc_station_mode_bitmask", f64::from(bits.0));
        o.flag("afc_station_emergency_release", &[], bits.has(ModeBits::EMERGENCY_RELEASE));
        for k in ParamKind::ALL {
            let v = s.packages.get(k.as_str()).map(|p| p.current()).unwrap_or(0);
            o.set("afc_param_version", &[k.as_str()], v as f64);
            if v > 0 {
                if let Some(ms) = effective_from_ms(state, k, v) {
                    o.set("afc_param_effective_from_timestamp_seconds", &[k.as_str()], ms as f64 / 1000.0);
                }
            }
        }
    }

    let gates = gates::all_local(state).unwrap_or_default();
    o.one("afc_gates_online", gates.iter().filter(|g| g.live.online).count() as f64);
    for g in &gates {
        let gate = g.live.gate.as_str();
        o.flag("afc_gate_online", &[gate], g.live.online);
        for a in &g.live.alarms {
            o.set("afc_gate_alarm_active", &[gate, a], 1.0);
        }
        for k in g.desired_versions.keys() {
            o.flag("afc_gate_param_drift", &[gate, k], g.drift.contains(k));
        }
        if let Some(d) = g.live.counters.get("outbox_depth") {
            o.set("afc_gate_outbox_depth", &[gate], *d as f64);
        }
        if let Some(b) = g.live.counters.get("outbox_bytes") {
            o.set("afc_gate_outbox_bytes", &[gate], *b as f64);
        }
        // Absent (0) from gates that do not send it: no series, so the alert does not divide by 0.
        if let Some(c) = g.live.counters.get("outbox_capacity_bytes").filter(|c| **c > 0) {
            o.set("afc_gate_outbox_capacity_bytes", &[gate], *c as f64);
        }
    }

    let duties = state.duties.as_ref().map(|d| d.status());
    o.flag("afc_mqtt_connected", &[], duties.as_ref().is_some_and(|d| d.mqtt_connected));
    o.flag("afc_mqtt_leader_session", &[], duties.as_ref().is_some_and(|d| d.leading));
    if let Some(d) = &state.duties {
        let st = &d.stats;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed) as f64;
        o.one("afc_mqtt_malformed_messages_total", load(&st.malformed));
        for (topic, reason, n) in st.unverified() {
            o.set("afc_controller_unverified_messages_total", &[topic, reason], n as f64);
        }
        o.one("afc_controller_mode_restored_total", load(&st.mode_restored));
        o.one("afc_controller_state_restored_total", load(&st.state_restored));
        o.one("afc_controller_leadership_unconfirmed_total", load(&st.leadership_unconfirmed));
        for (outcome, c) in [
            ("acked", &st.tx_batches_acked),
            ("rejected", &st.tx_batches_rejected),
            ("dropped", &st.tx_batches_dropped),
            ("propose_error", &st.tx_propose_errors),
        ] {
            o.set("afc_tx_batches_total", &[outcome], load(c));
        }
    }
    let cl = state.clearing.as_ref().map(|c| c.snapshot()).unwrap_or_default();
    o.flag("afc_clearing_enabled", &[], cl.enabled);
    o.one(
        "afc_clearing_last_success_timestamp_seconds",
        cl.last_success.map_or(0.0, |t| t.millis() as f64 / 1000.0),
    );
    o.one("afc_clearing_batches_acked_total", cl.batches_acked as f64);
    o.one("afc_clearing_records_acked_total", cl.records_acked as f64);
    o.one("afc_clearing_upload_errors_total", cl.errors_total as f64);
    o.one("afc_clearing_conflicts_total", cl.conflicts as f64);
    o.flag("afc_clearing_alarm_active", &[], cl.alarm.is_some());
    let lag = super::records::lag_now(state, &cl);
    o.one("afc_clearing_lag_seconds", lag.lag_ms.map_or(0.0, |ms| ms as f64 / 1000.0));
    o.flag("afc_clearing_lag_alarm", &[], lag.lag_alarm);
    let mut rollouts = state.metrics.rollout_states();
    // The replicated rollouts (every node has them) win over a task's own report.
    if let Ok(st) = state.node.sm.state() {
        for (kind, r) in &st.rollouts.rollouts.by_kind {
            rollouts.insert(kind.as_str().to_owned(), rollout_state_name(r).to_owned());
        }
    }
    for k in ParamKind::ALL {
        let cur = rollouts.get(k.as_str()).map(String::as_str).unwrap_or("idle");
        for st in ROLLOUT_STATES {
            o.flag("afc_rollout_state", &[k.as_str(), st], cur == st);
        }
    }
}

/// From now on a scrape of `state.metrics` reads `state` (held weakly: the state holds the registry).
pub fn serve(state: &Arc<ApiState>) {
    let from: Weak<ApiState> = Arc::downgrade(state);
    state.metrics.serve(move |s| {
        if let Some(state) = from.upgrade() {
            fill(&state, s);
        }
    });
}

/// The text exposition of everything this node's registry holds.
pub fn render(state: &ApiState) -> String {
    state.metrics.render()
}

pub async fn metrics(_c: Caller, state: web::Data<ApiState>) -> HttpResponse {
    HttpResponse::Ok().content_type(m::CONTENT_TYPE).body(render(&state))
}
