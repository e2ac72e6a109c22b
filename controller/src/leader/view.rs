//! What the leader knows about each gate, in memory (SPEC §4, §5, §9): the read model behind the
//! console's gate list and detail.
//!
//! [`GateView`] is one gate's snapshot, built by the leader from `gates/+/status`, `heartbeat`,
//! `params/ack` and `events`. The board is leader-local: a new leader starts empty and fills it
//! from the retained birth messages and the next heartbeats (within one heartbeat period).
//! Read it through [`super::Duties::gates`] / [`super::Duties::gate`]; it is never written to disk.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use afc_domain::model::{Ident, ParamKind, Timestamp};
use afc_domain::rollout::{GateObservation, Observations};
use afc_domain::wire::{
    AlarmKind, GateCounters, GateDirection, GateEvent, GateStatus, Heartbeat, KindVersions, ParamState,
    ParamsAck,
};
use serde::Serialize;

/// Most recent events kept per gate for the console.
pub const RECENT_EVENTS: usize = 20;

/// One gate as the leader sees it; serialised as-is by the HTTP API (`/api/v1/gates`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GateView {
    pub gate: Ident,
    /// Its MQTT session is alive (birth seen, no will since).
    pub online: bool,
    /// The agent session of the last birth, to match a will to it (a late will of an old session
    /// is ignored).
    pub session: Option<String>,
    /// When the last heartbeat arrived, on the controller's clock.
    pub last_heartbeat: Option<Timestamp>,
    /// Gate clock minus controller clock at the last heartbeat (transit time included).
    pub clock_offset_ms: Option<i64>,
    /// `|clock_offset_ms|` beyond `mqtt.clock_drift_alarm_ms`: the gate's clock needs attention.
    pub clock_drift: bool,
    /// Committed records with an implausible `occurred_at` ([`super::plausible`]) this leadership:
    /// ahead of the controller's clock, and too old.
    pub implausible_ahead: u64,
    pub implausible_older: u64,
    /// The last committed batch had such records (alarm `implausible_time`).
    pub implausible_time: bool,
    /// Highest gate_seq looked at by [`Board::on_committed_times`] (each record counts once).
    pub times_checked_through: u64,
    /// Per kind, what the gate reports holding (birth, then `params/ack`).
    pub versions_reported: BTreeMap<ParamKind, ReportedVersions>,
    /// Per kind, the version the controller publishes (the pointer's version).
    pub versions_desired: BTreeMap<ParamKind, u64>,
    /// Some desired version is neither active nor pending at the gate.
    pub drift: bool,
    /// Alarms in force (raised and not cleared), from events and heartbeats.
    pub alarms: BTreeSet<AlarmKind>,
    /// Per alarm in force, when this leader first saw it raised (controller clock): kept while the
    /// alarm stays in force, dropped when it clears ([`GateView::stamp_alarms`]).
    pub alarms_since: BTreeMap<AlarmKind, Timestamp>,
    /// The gate's counters at the last heartbeat.
    pub counters: GateCounters,
    /// Transactions waiting in the gate's outbox at the last heartbeat.
    pub outbox_depth: u64,
    /// Bytes they take, and the outbox's capacity in bytes (the limit taps are refused at).
    pub outbox_bytes: u64,
    pub outbox_capacity_bytes: u64,
    /// The aisle setting, service state and free passage at the last heartbeat.
    pub direction: Option<GateDirection>,
    pub in_service: bool,
    pub free_passage: bool,
    /// The gate's last events, newest last, at most [`RECENT_EVENTS`].
    pub recent_events: VecDeque<GateEvent>,
}

/// The versions a gate reports for one kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReportedVersions {
    pub active: Option<u64>,
    pub pending: Option<u64>,
    /// The last version the gate refused, and why.
    pub rejected: Option<(u64, Option<String>)>,
}

impl GateView {
    fn new(gate: Ident) -> GateView {
        GateView {
            gate,
            online: false,
            session: None,
            last_heartbeat: None,
            clock_offset_ms: None,
            clock_drift: false,
            implausible_ahead: 0,
            implausible_older: 0,
            implausible_time: false,
            times_checked_through: 0,
            versions_reported: BTreeMap::new(),
            versions_desired: BTreeMap::new(),
            drift: false,
            alarms: BTreeSet::new(),
            alarms_since: BTreeMap::new(),
            counters: GateCounters::default(),
            outbox_depth: 0,
            outbox_bytes: 0,
            outbox_capacity_bytes: 0,
            direction: None,
            in_service: false,
            free_passage: false,
            recent_events: VecDeque::new(),
        }
    }

    /// Brings `alarms_since` in line with `alarms`: an alarm that appeared gets `now`, one still in
    /// force keeps its first time, a cleared one is dropped.
    fn stamp_alarms(&mut self, now: Timestamp) {
        let alarms = &self.alarms;
        self.alarms_since.retain(|k, _| alarms.contains(k));
        for a in alarms {
            self.alarms_since.entry(*a).or_insert(now);
        }
    }
}

/// The leader's board: every gate heard from, and the desired versions.
#[derive(Debug, Default)]
pub struct Board {
    gates: BTreeMap<Ident, GateView>,
    desired: BTreeMap<ParamKind, u64>,
    /// Per kind, the canaries' override versions (they want these instead of `desired`).
    overrides: BTreeMap<ParamKind, BTreeMap<Ident, u64>>,
}

impl Board {
    fn entry(&mut self, gate: &Ident) -> &mut GateView {
        self.gates.entry(gate.clone()).or_insert_with(|| GateView::new(gate.clone()))
    }

    /// A leadership ended: what this node knew goes stale.
    pub fn clear(&mut self) {
        self.gates.clear();
    }

    pub fn set_desired(&mut self, kind: ParamKind, version: u64) {
        self.desired.insert(kind, version);
    }

    pub fn set_overrides(&mut self, kind: ParamKind, overrides: BTreeMap<Ident, u64>) {
        self.overrides.insert(kind, overrides);
    }

    pub fn on_status(&mut self, gate: &Ident, status: GateStatus) {
        let v = self.entry(gate);
        match status {
            GateStatus::Online(birth) => {
                v.online = true;
                v.session = Some(birth.session);
                for (kind, kv) in birth.versions {
                    let KindVersions { active, pending, .. } = kv;
                    let r = v.versions_reported.entry(kind).or_default();
                    r.active = active;
                    r.pending = pending;
                }
            }
            GateStatus::Offline { session } => {
                if v.session.as_deref().is_none_or(|s| s == session) {
                    v.online = false;
                }
            }
        }
    }

    pub fn on_heartbeat(&mut self, gate: &Ident, hb: &Heartbeat, now: Timestamp, drift_bound_ms: i64) {
        let v = self.entry(gate);
        v.online = true;
        v.last_heartbeat = Some(now);
        let offset = hb.at.millis().saturating_sub(now.millis());
        v.clock_offset_ms = Some(offset);
        v.clock_drift = offset.abs() > drift_bound_ms;
        v.counters = hb.counters;
        v.outbox_depth = hb.outbox_depth;
        v.outbox_bytes = hb.outbox_bytes;
        v.outbox_capacity_bytes = hb.outbox_capacity_bytes;
        v.direction = Some(hb.direction);
        v.in_service = hb.in_service;
        v.free_passage = hb.free_passage;
        v.alarms = hb.alarms.iter().copied().collect();
        for (kind, kv) in &hb.versions {
            let r = v.versions_reported.entry(*kind).or_default();
            r.active = kv.active;
            r.pending = kv.pending;
        }
        if v.clock_drift {
            v.alarms.insert(AlarmKind::ClockDrift);
        }
        if v.implausible_time {
            v.alarms.insert(AlarmKind::ImplausibleTime);
        }
        v.stamp_alarms(now);
    }

    /// A committed batch's `(gate_seq, occurred_at)`, at controller time `now`: the records not
    /// looked at before, classified ([`super::plausible::classify`]); raises or clears the gate's
    /// `implausible_time` flag. `None` when every record was looked at already (a re-sent batch).
    pub fn on_committed_times(
        &mut self,
        gate: &Ident,
        times: &[(u64, Timestamp)],
        now: Timestamp,
    ) -> Option<(u64, u64, Timestamp)> {
        let v = self.entry(gate);
        let fresh: Vec<(u64, Timestamp)> =
            times.iter().copied().filter(|(seq, _)| *seq > v.times_checked_through).collect();
        let last = fresh.iter().map(|(seq, _)| *seq).max()?;
        v.times_checked_through = last;
        let (ahead, older) = super::plausible::classify(&fresh, now);
        v.implausible_ahead += ahead;
        v.implausible_older += older;
        v.implausible_time = ahead + older > 0;
        if v.implausible_time {
            v.alarms.insert(AlarmKind::ImplausibleTime);
        } else {
            v.alarms.remove(&AlarmKind::ImplausibleTime);
        }
        v.stamp_alarms(now);
        let example = fresh.iter().map(|(_, t)| *t).max_by_key(|t| (t.0 - now.0).abs()).unwrap_or(now);
        Some((ahead, older, example))
    }

    pub fn on_params_ack(&mut self, gate: &Ident, ack: &ParamsAck) {
        let r = self.entry(gate).versions_reported.entry(ack.kind).or_default();
        match ack.state {
            ParamState::Pending => r.pending = Some(ack.version),
            ParamState::Active => {
                r.active = Some(ack.version);
                if r.pending.is_some_and(|p| p <= ack.version) {
                    r.pending = None;
                }
            }
            ParamState::Rejected => r.rejected = Some((ack.version, ack.reason.clone())),
        }
    }

    /// A gate event, heard at controller time `now`.
    pub fn on_event(&mut self, gate: &Ident, ev: GateEvent, now: Timestamp) {
        let v = self.entry(gate);
        if ev.cleared {
            v.alarms.remove(&ev.kind);
        } else {
            v.alarms.insert(ev.kind);
        }
        v.stamp_alarms(now);
        if v.recent_events.len() >= RECENT_EVENTS {
            v.recent_events.pop_front();
        }
        v.recent_events.push_back(ev);
    }

    /// What the gates report, as the rollout state machine reads it.
    pub fn observations(&self) -> Observations {
        let gates = self
            .gates
            .iter()
            .map(|(id, v)| {
                let versions = v
                    .versions_reported
                    .iter()
                    .map(|(k, r)| {
                        (
                            *k,
                            KindVersions {
                                active: r.active,
                                pending: r.pending,
                                pending_effective_from: None,
                            },
                        )
                    })
                    .collect();
                let rejected = v
                    .versions_reported
                    .iter()
                    .filter_map(|(k, r)| r.rejected.as_ref().map(|(v, _)| (*k, *v)))
                    .collect();
                let obs = GateObservation {
                    online: v.online,
                    versions,
                    rejected,
                    counters: v.last_heartbeat.map(|_| v.counters),
                };
                (id.clone(), obs)
            })
            .collect();
        Observations { gates }
    }

    /// Every gate, with the desired versions and drift filled in.
    pub fn snapshot(&self) -> Vec<GateView> {
        self.gates.values().map(|v| self.complete(v)).collect()
    }

    pub fn get(&self, gate: &Ident) -> Option<GateView> {
        self.gates.get(gate).map(|v| self.complete(v))
    }

    fn complete(&self, v: &GateView) -> GateView {
        let mut v = v.clone();
        v.versions_desired = self.desired.clone();
        for (kind, o) in &self.overrides {
            if let Some(want) = o.get(&v.gate) {
                v.versions_desired.insert(*kind, *want);
            }
        }
        v.drift = v.versions_desired.iter().any(|(kind, want)| {
            let r = v.versions_reported.get(kind);
            r.is_none_or(|r| r.active != Some(*want) && r.pending != Some(*want))
        });
        v
    }
}

/// The snake_case JSON name of a unit enum value (`door_fault`, `bidirectional`).
fn json_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|j| j.as_str().map(str::to_owned)).unwrap_or_default()
}

/// The operations API's gate list (`/api/v1/gates`) reads the board through this.
impl crate::gate_view::GateView for super::Duties {
    fn gates(&self) -> Vec<crate::gate_view::GateSnapshot> {
        super::Duties::gates(self)
            .into_iter()
            .map(|v| crate::gate_view::GateSnapshot {
                gate: v.gate.to_string(),
                online: v.online,
                direction: v.direction.map(|d| json_name(&d)),
                in_service: v.in_service,
                free_passage: v.free_passage,
                alarms: v.alarms.iter().map(json_name).collect(),
                alarms_since_ms: v.alarms_since.iter().map(|(k, t)| (json_name(k), t.millis())).collect(),
                reported_versions: v
                    .versions_reported
                    .iter()
                    .filter_map(|(k, r)| r.active.map(|a| (k.to_string(), a)))
                    .collect(),
                counters: [
                    ("taps", v.counters.taps),
                    ("entries", v.counters.entries),
                    ("exits", v.counters.exits),
                    ("rejects", v.counters.rejects),
                    ("tailgating", v.counters.tailgating),
                    ("forced_passage", v.counters.forced_passage),
                    ("outbox_depth", v.outbox_depth),
                    ("outbox_bytes", v.outbox_bytes),
                    ("outbox_capacity_bytes", v.outbox_capacity_bytes),
                ]
                .into_iter()
                .map(|(k, n)| (k.to_owned(), n))
                .collect(),
                last_seen_ms: v.last_heartbeat.map(|t| t.millis()),
                clock_offset_ms: v.clock_offset_ms,
                implausible_time_records: v.implausible_ahead + v.implausible_older,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ack(kind: ParamKind, version: u64, state: ParamState) -> ParamsAck {
        ParamsAck { kind, version, state, reason: None }
    }

    #[test]
    fn a_gate_holding_the_desired_version_pending_or_active_is_not_drifting() {
        let g = Ident::new("g01").unwrap();
        let mut b = Board::default();
        b.set_desired(ParamKind::FareTable, 3);
        b.on_params_ack(&g, &ack(ParamKind::FareTable, 2, ParamState::Active));
        assert!(b.get(&g).unwrap().drift);
        b.on_params_ack(&g, &ack(ParamKind::FareTable, 3, ParamState::Pending));
        assert!(!b.get(&g).unwrap().drift);
        b.on_params_ack(&g, &ack(ParamKind::FareTable, 3, ParamState::Active));
        let v = b.get(&g).unwrap();
        assert!(!v.drift);
        assert_eq!(v.versions_reported[&ParamKind::FareTable].pending, None);
    }

    #[test]
    fn committed_records_far_ahead_or_far_behind_the_controller_clock_are_flagged_once() {
        use super::super::plausible::{AHEAD_MS, OLDER_MS};
        let g = Ident::new("g01").unwrap();
        let mut b = Board::default();
        let now = Timestamp(1_800_000_000_000);
        let at = |ms: i64| Timestamp(now.0 + ms);
        // 5 s ahead, 10 min behind: plausible (clock within tolerance, a late upload).
        assert_eq!(b.on_committed_times(&g, &[(1, at(5_000)), (2, at(-600_000))], now).unwrap().0, 0);
        assert!(!b.get(&g).unwrap().implausible_time);
        let r = b.on_committed_times(&g, &[(3, at(AHEAD_MS + 1)), (4, at(-OLDER_MS - 1)), (5, at(0))], now);
        assert_eq!(r.map(|(a, o, _)| (a, o)), Some((1, 1)));
        let v = b.get(&g).unwrap();
        assert!(v.implausible_time && v.alarms.contains(&AlarmKind::ImplausibleTime));
        assert_eq!((v.implausible_ahead, v.implausible_older), (1, 1));
        // The same batch again (re-sent) counts nothing; the exact bound is still plausible.
        assert_eq!(b.on_committed_times(&g, &[(3, at(AHEAD_MS + 1))], now), None);
        b.on_committed_times(&g, &[(6, at(AHEAD_MS)), (7, at(-OLDER_MS))], now);
        let v = b.get(&g).unwrap();
        assert!(!v.implausible_time && !v.alarms.contains(&AlarmKind::ImplausibleTime), "{v:?}");
        assert_eq!((v.implausible_ahead, v.implausible_older), (1, 1));
    }

    #[test]
    fn a_late_will_of_an_old_session_does_not_mark_the_gate_offline() {
        let g = Ident::new("g01").unwrap();
        let mut b = Board::default();
        b.on_status(&g, GateStatus::Offline { session: "old".into() });
        b.entry(&g).online = true;
        b.entry(&g).session = Some("new".into());
        b.on_status(&g, GateStatus::Offline { session: "old".into() });
        assert!(b.get(&g).unwrap().online);
        b.on_status(&g, GateStatus::Offline { session: "new".into() });
        assert!(!b.get(&g).unwrap().online);
    }

    #[test]
    fn a_leader_that_missed_the_birth_learns_the_versions_from_a_heartbeat() {
        let g = Ident::new("g01").unwrap();
        let mut b = Board::default();
        b.set_desired(ParamKind::FareTable, 1);
        b.set_desired(ParamKind::Blacklist, 2);
        // Only an ack since this node became leader: the fare table looks missing.
        b.on_params_ack(&g, &ack(ParamKind::Blacklist, 2, ParamState::Active));
        assert!(b.get(&g).unwrap().drift);
        let held = |v| KindVersions { active: Some(v), pending: None, pending_effective_from: None };
        let hb = Heartbeat {
            at: Timestamp(0),
            seq: 1,
            counters: GateCounters::default(),
            outbox_depth: 0,
            outbox_bytes: 0,
            outbox_capacity_bytes: 0,
            plc_online: true,
            direction: afc_domain::wire::GateDirection::Bidirectional,
            in_service: true,
            free_passage: false,
            alarms: Vec::new(),
            versions: [(ParamKind::FareTable, held(1)), (ParamKind::Blacklist, held(2))].into(),
        };
        b.on_heartbeat(&g, &hb, Timestamp(0), 1000);
        let v = b.get(&g).unwrap();
        assert!(!v.drift, "{v:?}");
        assert_eq!(v.versions_reported[&ParamKind::FareTable].active, Some(1));
    }

    #[test]
    fn an_alarm_keeps_the_time_it_first_appeared_until_it_clears() {
        let g = Ident::new("g01").unwrap();
        let mut b = Board::default();
        let ev = |kind, cleared| GateEvent { at: Timestamp(1), kind, cleared, detail: None };
        b.on_event(&g, ev(AlarmKind::DoorFault, false), Timestamp(1_000));
        b.on_event(&g, ev(AlarmKind::Tailgating, false), Timestamp(2_000));
        // Raised again (and repeated by heartbeats): the first time stays.
        b.on_event(&g, ev(AlarmKind::DoorFault, false), Timestamp(3_000));
        let v = b.get(&g).unwrap();
        assert_eq!(v.alarms_since[&AlarmKind::DoorFault], Timestamp(1_000));
        assert_eq!(v.alarms_since[&AlarmKind::Tailgating], Timestamp(2_000));
        b.on_event(&g, ev(AlarmKind::DoorFault, true), Timestamp(4_000));
        let v = b.get(&g).unwrap();
        assert!(!v.alarms_since.contains_key(&AlarmKind::DoorFault), "{v:?}");
        b.on_event(&g, ev(AlarmKind::DoorFault, false), Timestamp(5_000));
        assert_eq!(b.get(&g).unwrap().alarms_since[&AlarmKind::DoorFault], Timestamp(5_000));
    }
}
