//! The live gate view: what the leader's MQTT duties know of each gate right now, as the
//! operations API and the Raft/admin listener read it. [`GateView`] is the source (the leader's
//! [`crate::leader::Duties`] implement it over their board in `leader/view.rs`; a node without
//! `[mqtt]` uses [`NoGateView`]); [`GateSnapshot`] is one gate in it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What the live view knows of one gate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GateSnapshot {
    pub gate: String,
    pub online: bool,
    /// `closed`, `entry`, `exit` or `bidirectional`, as last reported.
    pub direction: Option<String>,
    pub in_service: bool,
    /// Free passage held (emergency release or entry_free).
    pub free_passage: bool,
    /// Active alarms (`tailgating`, `door_fault`, `plc_offline`, ...).
    pub alarms: Vec<String>,
    /// Per active alarm, when the leader first saw it raised (ms since the epoch, controller
    /// clock); a new leader's board starts again from its first heartbeat.
    #[serde(default)]
    pub alarms_since_ms: BTreeMap<String, i64>,
    /// Per parameter kind, the active version the gate reports.
    pub reported_versions: BTreeMap<String, u64>,
    /// Counters from the last heartbeat (entries, exits, outbox depth, ...).
    pub counters: BTreeMap<String, u64>,
    /// When the controller last heard from the gate (ms since the epoch).
    pub last_seen_ms: Option<i64>,
    /// Gate clock minus controller clock at the last heartbeat (alarm `clock_drift` beyond
    /// `mqtt.clock_drift_alarm_ms`).
    #[serde(default)]
    pub clock_offset_ms: Option<i64>,
    /// Records committed this leadership whose `occurred_at` was implausible (alarm
    /// `implausible_time`; `controller::leader::plausible`).
    #[serde(default)]
    pub implausible_time_records: u64,
}

/// A source of live gate state.
pub trait GateView: Send + Sync {
    /// Every gate the view knows, in any order.
    fn gates(&self) -> Vec<GateSnapshot>;
}

/// A view that knows no live state (before the leader's gate view is wired in).
#[derive(Debug, Default)]
pub struct NoGateView;

impl GateView for NoGateView {
    fn gates(&self) -> Vec<GateSnapshot> {
        Vec::new()
    }
}
