//! Staged parameter rollout (SPEC §4) as a deterministic state machine: no I/O, time passed in.
//!
//! A new package version goes to the canary gates first (per-gate override pointers), is watched
//! while those gates run it (the soak: their reject rate against the other gates' baseline, and
//! any `rejected` ack), then is published as the station's current version for every gate. A
//! failed health check or an operator abort rolls every gate back. Gates refuse any version not
//! strictly above the one they hold, so a rollback never re-points gates at the old version: it
//! asks the controller to republish the old *content* under a new, higher version
//! ([`RolloutAction::Republish`]).
//!
//! Kinds are independent ([`Rollouts`] holds one rollout per kind): a fare-table soak never holds
//! back a blacklist delta, and by default blacklist and mode packages skip the canary stage. A
//! future-dated package is by default delivered to every gate at once (each gate switches at its
//! `effective_from`, also while offline), because a canary cannot be judged before it switches.
//!
//! The controller drives it: it calls [`Rollout::step`] with what the gates report (their
//! versions, `rejected` acks, heartbeat counters), performs the returned [`RolloutAction`]s, and
//! stores the serialized [`Rollout`] in its replicated state, so a new leader carries on.
//!
//! The mass-insertion guard ([`MassInsertionGuard`], [`SecondConfirmation`]) makes a blacklist
//! change that adds many ids to what gates hold wait for a second, different operator (a real
//! metro once blocked 250,000 good cards after a clearing fault). It counts ids added by set
//! difference ([`blacklist_ids_added`]), never entry counts.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::blacklist::{Blacklist, BlacklistError};
use crate::model::{Ident, ParamKind, Timestamp};
use crate::package::BlacklistBody;
use crate::wire::{GateCounters, KindVersions};

/// Parts per million: reject rates are integers so the state machine is exact and replayable.
pub const PPM: u64 = 1_000_000;

/// How a rollout is staged and judged. Copied into each [`Rollout`] when it starts, so a config
/// change never alters a rollout already under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct RolloutPolicy {
    /// Gates that receive a new version first. When empty, the first `canary_count` gates online
    /// at the start (by id) are chosen. A listed canary that is offline counts as a missing ack.
    pub canary_gates: Vec<Ident>,
    /// How many canaries to choose when `canary_gates` is empty.
    pub canary_count: usize,
    /// How long the canaries run the new version, under watch, before every gate gets it.
    pub soak_ms: i64,
    /// Without a baseline: the canaries' reject rate (ppm) above which the rollout fails.
    pub max_canary_reject_ppm: u64,
    /// With a baseline (the other gates' reject rate over the same period): how far above it the
    /// canaries may go. A station-wide spike is then not blamed on the package.
    pub max_reject_excess_ppm: u64,
    /// A group of gates with fewer taps than this has no rate yet (no verdict from noise).
    pub min_taps_for_rate: u64,
    /// How long canaries have to acknowledge the package (pending or active) after it is sent,
    /// and to activate it after its `effective_from`, before the rollout is rolled back.
    pub ack_deadline_ms: i64,
    /// Kinds that go through canary and soak; the others go to every gate at once.
    pub staged_kinds: BTreeSet<ParamKind>,
    /// Whether a future-dated package is canaried too (delivered late to the other gates) rather
    /// than delivered early to every gate.
    pub canary_future_dated: bool,
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        RolloutPolicy {
            canary_gates: Vec::new(),
            canary_count: 1,
            soak_ms: 30 * Timestamp::MINUTE_MS,
            max_canary_reject_ppm: 200_000,
            max_reject_excess_ppm: 50_000,
            min_taps_for_rate: 20,
            ack_deadline_ms: 2 * Timestamp::MINUTE_MS,
            staged_kinds: [ParamKind::FareTable, ParamKind::QrKeys, ParamKind::GateConfig].into(),
            canary_future_dated: false,
        }
    }
}

/// What one gate reports, as the controller last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GateObservation {
    /// Whether the gate's retained status says it is online.
    pub online: bool,
    /// Versions held per kind (active and pending), from its birth message and params acks.
    #[serde(default)]
    pub versions: BTreeMap<ParamKind, KindVersions>,
    /// The last version of each kind the gate acked as `rejected`.
    #[serde(default)]
    pub rejected: BTreeMap<ParamKind, u64>,
    /// The counters of its last heartbeat (cumulative since the agent started).
    #[serde(default)]
    pub counters: Option<GateCounters>,
}

impl GateObservation {
    fn received(&self, kind: ParamKind, version: u64) -> bool {
        let v = self.versions.get(&kind).copied().unwrap_or_default();
        v.active.is_some_and(|a| a >= version) || v.pending.is_some_and(|p| p >= version)
    }

    fn activated(&self, kind: ParamKind, version: u64) -> bool {
        self.versions.get(&kind).and_then(|v| v.active).is_some_and(|a| a >= version)
    }
}

/// Every gate the controller knows, by id.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Observations {
    pub gates: BTreeMap<Ident, GateObservation>,
}

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// Override pointers sent to the canaries; waiting for them to acknowledge and activate.
    Canary { since: Timestamp },
    /// Every canary runs the new version; watching them until `until`.
    Soak { since: Timestamp, until: Timestamp },
    /// Published as current for every gate; waiting for the online gates to acknowledge.
    Full { since: Timestamp },
    /// Every online gate acknowledged the new version.
    Done { at: Timestamp },
    /// Rolled back; the old content is (or is being) republished under a higher version.
    RolledBack { at: Timestamp, reason: RollbackReason },
}

/// Why a rollout was rolled back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum RollbackReason {
    /// The canaries rejected taps too often, against the baseline when there was one.
    RejectRate { canary_ppm: u64, limit_ppm: u64, baseline_ppm: Option<u64> },
    /// A canary refused the package (signature, hash, size or version order).
    CanaryRejected { gate: Ident, version: u64 },
    /// These canaries did not acknowledge or activate the package in time.
    MissingAcks { gates: Vec<Ident> },
    /// An operator aborted (or rolled back) the rollout.
    OperatorAbort { by: String },
}

/// What the controller must do; returned by the state machine, performed by the I/O shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum RolloutAction {
    /// Point one gate at `version` (`gates/{gate}/params/{kind}/current`).
    PublishOverride { gate: Ident, kind: ParamKind, version: u64 },
    /// Point every gate at `version` (`params/{kind}/current`).
    PublishCurrent { kind: ParamKind, version: u64 },
    /// Remove every per-gate override of `kind`, so all gates follow the station pointer.
    ClearOverrides { kind: ParamKind },
    /// Store the content of version `content_of` as a new package with a version of at least
    /// `min_version` (gates refuse anything not above what they hold), publish it as current for
    /// every gate, and report the version with [`Rollout::republished`].
    Republish { kind: ParamKind, content_of: u64, min_version: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RolloutError {
    #[error("{kind} version {to} is not above the current version {from}")]
    NotForward { kind: ParamKind, from: u64, to: u64 },
    #[error("a {kind} rollout to version {version} is still in its canary or soak stage")]
    Busy { kind: ParamKind, version: u64 },
    #[error("no {0} rollout")]
    NoRollout(ParamKind),
    #[error("the {kind} rollout to version {version} is already rolled back")]
    AlreadyRolledBack { kind: ParamKind, version: u64 },
    #[error("the rollout is not rolled back, nothing was to be republished")]
    NotRolledBack,
    #[error("a republished version must be above {min}, got {got}")]
    RepublishNotAbove { min: u64, got: u64 },
    #[error("the second confirmation must come from another operator than {0}")]
    SameOperator(String),
    #[error("already confirmed by {0}")]
    AlreadyConfirmed(String),
}

/// One rollout of one kind, from `from_version` to `to_version`. Serializable: the controller
/// keeps it in the replicated state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct Rollout {
    pub kind: ParamKind,
    /// The version every gate held before; its content is what a rollback republishes. `None`
    /// for the first package of a kind (then a rollback can only stop the spread).
    pub from_version: Option<u64>,
    pub to_version: u64,
    /// When gates switch to `to_version`.
    pub effective_from: Timestamp,
    pub started_at: Timestamp,
    pub policy: RolloutPolicy,
    /// The gates that got the version first (empty when the canary stage was skipped).
    pub canaries: Vec<Ident>,
    pub stage: Stage,
    /// Each gate's counters when the soak began (rates are computed from deltas, because
    /// heartbeats carry cumulative counters).
    #[serde(default)]
    pub soak_start_counters: BTreeMap<Ident, GateCounters>,
    /// Gates that rejected `to_version` after it went to every gate (shown, not rolled back:
    /// the canaries accepted the same bytes, so the fault is the gate's).
    #[serde(default)]
    pub rejected_by: BTreeSet<Ident>,
    /// After a rollback: the version under which the old content was republished.
    #[serde(default)]
    pub republished_as: Option<u64>,
}

impl Rollout {
    /// Starts a rollout and returns the first actions: overrides for the canaries, or the
    /// station pointer when the kind is not staged, the package is future-dated (and the policy
    /// does not canary those), it is the kind's first version (there is nothing to roll back to,
    /// and gates without one cannot decide taps at all), or there is no canary to choose.
    pub fn start(
        kind: ParamKind,
        from_version: Option<u64>,
        to_version: u64,
        effective_from: Timestamp,
        policy: &RolloutPolicy,
        now: Timestamp,
        obs: &Observations,
    ) -> Result<(Rollout, Vec<RolloutAction>), RolloutError> {
        if let Some(from) = from_version {
            if to_version <= from {
                return Err(RolloutError::NotForward { kind, from, to: to_version });
            }
        }
        let future_dated = effective_from > now;
        let staged = policy.staged_kinds.contains(&kind)
            && (!future_dated || policy.canary_future_dated)
            && from_version.is_some();
        let canaries: Vec<Ident> = if !staged {
            Vec::new()
        } else if !policy.canary_gates.is_empty() {
            policy.canary_gates.clone()
        } else {
            obs.gates
                .iter()
                .filter(|(_, g)| g.online)
                .map(|(id, _)| id.clone())
                .take(policy.canary_count)
                .collect()
        };
        let mut rollout = Rollout {
            kind,
            from_version,
            to_version,
            effective_from,
            started_at: now,
            policy: policy.clone(),
            canaries,
            stage: Stage::Canary { since: now },
            soak_start_counters: BTreeMap::new(),
            rejected_by: BTreeSet::new(),
            republished_as: None,
        };
        let actions = if rollout.canaries.is_empty() {
            rollout.go_full(now)
        } else {
            rollout
                .canaries
                .iter()
                .map(|gate| RolloutAction::PublishOverride { gate: gate.clone(), kind, version: to_version })
                .collect()
        };
        Ok((rollout, actions))
    }

    /// Whether the rollout is still in its canary or soak stage (a new rollout of the same kind
    /// must wait or abort it).
    pub fn is_staging(&self) -> bool {
        matches!(self.stage, Stage::Canary { .. } | Stage::Soak { .. })
    }

    /// Advances the rollout with what the gates report now; returns what to publish.
    pub fn step(&mut self, now: Timestamp, obs: &Observations) -> Vec<RolloutAction> {
        match self.stage.clone() {
            Stage::Canary { since } => self.step_canary(now, since, obs),
            Stage::Soak { until, .. } => self.step_soak(now, until, obs),
            Stage::Full { .. } => {
                self.step_full(now, obs);
                Vec::new()
            }
            Stage::Done { .. } | Stage::RolledBack { .. } => Vec::new(),
        }
    }

    /// An operator abort or rollback: every gate goes back to the previous content. Allowed in
    /// every stage but a rollback (also after `Done`, as the console's "roll back").
    pub fn abort(&mut self, now: Timestamp, by: &str) -> Result<Vec<RolloutAction>, RolloutError> {
        if let Stage::RolledBack { .. } = self.stage {
            return Err(RolloutError::AlreadyRolledBack { kind: self.kind, version: self.to_version });
        }
        Ok(self.roll_back(now, RollbackReason::OperatorAbort { by: by.to_owned() }))
    }

    /// Records the version under which the controller republished the old content.
    pub fn republished(&mut self, version: u64) -> Result<(), RolloutError> {
        if !matches!(self.stage, Stage::RolledBack { .. }) {
            return Err(RolloutError::NotRolledBack);
        }
        if version <= self.to_version {
            return Err(RolloutError::RepublishNotAbove { min: self.to_version, got: version });
        }
        self.republished_as = Some(version);
        Ok(())
    }

    /// The version `gate` should hold now, for the desired-vs-reported (drift) view. During a
    /// rollback before the republish is recorded it is the old version (the content gates should
    /// run), which canaries cannot take back: they show drift until the republish lands.
    pub fn desired_version(&self, gate: &Ident) -> Option<u64> {
        match &self.stage {
            Stage::Canary { .. } | Stage::Soak { .. } => {
                if self.canaries.contains(gate) {
                    Some(self.to_version)
                } else {
                    self.from_version
                }
            }
            Stage::Full { .. } | Stage::Done { .. } => Some(self.to_version),
            Stage::RolledBack { .. } => self.republished_as.or(self.from_version),
        }
    }

    fn step_canary(&mut self, now: Timestamp, since: Timestamp, obs: &Observations) -> Vec<RolloutAction> {
        if let Some(reason) = self.canary_rejection(obs) {
            return self.roll_back(now, reason);
        }
        let receive_deadline = since.millis().saturating_add(self.policy.ack_deadline_ms);
        let activate_deadline =
            since.max(self.effective_from).millis().saturating_add(self.policy.ack_deadline_ms);
        let (kind, version) = (self.kind, self.to_version);
        let late: Vec<Ident> = self
            .canaries
            .iter()
            .filter(|gate| {
                let g = obs.gates.get(*gate);
                let received = g.is_some_and(|g| g.received(kind, version));
                let active = g.is_some_and(|g| g.activated(kind, version));
                (!received && now.millis() >= receive_deadline)
                    || (!active && now.millis() >= activate_deadline)
            })
            .cloned()
            .collect();
        if !late.is_empty() {
            return self.roll_back(now, RollbackReason::MissingAcks { gates: late });
        }
        let all_active =
            self.canaries.iter().all(|gate| obs.gates.get(gate).is_some_and(|g| g.activated(kind, version)));
        if all_active {
            self.soak_start_counters =
                obs.gates.iter().filter_map(|(id, g)| g.counters.map(|c| (id.clone(), c))).collect();
            let until = Timestamp::from_millis(now.millis().saturating_add(self.policy.soak_ms));
            self.stage = Stage::Soak { since: now, until };
            // A zero-length soak still takes one look at the canaries, on the next step.
        }
        Vec::new()
    }

    fn step_soak(&mut self, now: Timestamp, until: Timestamp, obs: &Observations) -> Vec<RolloutAction> {
        if let Some(reason) = self.canary_rejection(obs) {
            return self.roll_back(now, reason);
        }
        if let Some(reason) = self.reject_rate_failure(obs) {
            return self.roll_back(now, reason);
        }
        if now >= until {
            return self.go_full(now);
        }
        Vec::new()
    }

    fn step_full(&mut self, now: Timestamp, obs: &Observations) {
        let (kind, version) = (self.kind, self.to_version);
        for (id, g) in &obs.gates {
            if g.rejected.get(&kind) == Some(&version) {
                self.rejected_by.insert(id.clone());
            }
        }
        let all_online_have_it = obs
            .gates
            .iter()
            .filter(|(id, g)| g.online && !self.rejected_by.contains(*id))
            .all(|(_, g)| g.received(kind, version));
        if all_online_have_it {
            self.stage = Stage::Done { at: now };
        }
    }

    fn go_full(&mut self, now: Timestamp) -> Vec<RolloutAction> {
        self.stage = Stage::Full { since: now };
        let mut actions = vec![RolloutAction::PublishCurrent { kind: self.kind, version: self.to_version }];
        if !self.canaries.is_empty() {
            actions.push(RolloutAction::ClearOverrides { kind: self.kind });
        }
        actions
    }

    fn roll_back(&mut self, now: Timestamp, reason: RollbackReason) -> Vec<RolloutAction> {
        self.stage = Stage::RolledBack { at: now, reason };
        let mut actions = Vec::new();
        if let Some(previous) = self.from_version {
            actions.push(RolloutAction::Republish {
                kind: self.kind,
                content_of: previous,
                min_version: self.to_version.saturating_add(1),
            });
        }
        actions.push(RolloutAction::ClearOverrides { kind: self.kind });
        actions
    }

    fn canary_rejection(&self, obs: &Observations) -> Option<RollbackReason> {
        self.canaries.iter().find_map(|gate| {
            let rejected = obs.gates.get(gate)?.rejected.get(&self.kind).copied()?;
            (rejected == self.to_version)
                .then(|| RollbackReason::CanaryRejected { gate: gate.clone(), version: rejected })
        })
    }

    /// Taps and rejects since the soak began, summed over the canaries and over the others.
    fn soak_totals(&self, obs: &Observations) -> ((u64, u64), (u64, u64)) {
        let mut canary = (0u64, 0u64);
        let mut others = (0u64, 0u64);
        for (id, g) in &obs.gates {
            let Some(now) = g.counters else { continue };
            let start = self.soak_start_counters.get(id).copied().unwrap_or(now);
            // A decrease means the agent restarted: everything it counted since is new.
            let (taps, rejects) = if now.taps < start.taps || now.rejects < start.rejects {
                (now.taps, now.rejects)
            } else {
                (now.taps - start.taps, now.rejects - start.rejects)
            };
            let sum = if self.canaries.contains(id) { &mut canary } else { &mut others };
            sum.0 = sum.0.saturating_add(taps);
            sum.1 = sum.1.saturating_add(rejects);
        }
        (canary, others)
    }

    fn reject_rate_failure(&self, obs: &Observations) -> Option<RollbackReason> {
        let min = self.policy.min_taps_for_rate.max(1);
        let ((taps, rejects), (base_taps, base_rejects)) = self.soak_totals(obs);
        if taps < min {
            return None;
        }
        let canary_ppm = ppm(rejects, taps);
        let baseline_ppm = (base_taps >= min).then(|| ppm(base_rejects, base_taps));
        let limit_ppm = match baseline_ppm {
            Some(b) => b.saturating_add(self.policy.max_reject_excess_ppm),
            None => self.policy.max_canary_reject_ppm,
        };
        (canary_ppm > limit_ppm).then_some(RollbackReason::RejectRate { canary_ppm, limit_ppm, baseline_ppm })
    }
}

fn ppm(part: u64, whole: u64) -> u64 {
    // u128 cannot overflow: both factors are below 2^64 and 2^20.
    let r = u128::from(part.min(whole)) * u128::from(PPM) / u128::from(whole.max(1));
    u64::try_from(r).unwrap_or(PPM)
}

/// One rollout per kind, so kinds never wait for each other.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct Rollouts {
    pub by_kind: BTreeMap<ParamKind, Rollout>,
}

impl Rollouts {
    /// Starts a rollout of `kind`, replacing a finished (or fully published) one of the same
    /// kind; refused while one of the same kind is in its canary or soak stage.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        &mut self,
        kind: ParamKind,
        from_version: Option<u64>,
        to_version: u64,
        effective_from: Timestamp,
        policy: &RolloutPolicy,
        now: Timestamp,
        obs: &Observations,
    ) -> Result<Vec<RolloutAction>, RolloutError> {
        if let Some(running) = self.by_kind.get(&kind).filter(|r| r.is_staging()) {
            return Err(RolloutError::Busy { kind, version: running.to_version });
        }
        let (rollout, actions) =
            Rollout::start(kind, from_version, to_version, effective_from, policy, now, obs)?;
        self.by_kind.insert(kind, rollout);
        Ok(actions)
    }

    /// Steps every kind's rollout.
    pub fn step(&mut self, now: Timestamp, obs: &Observations) -> Vec<RolloutAction> {
        self.by_kind.values_mut().flat_map(|r| r.step(now, obs)).collect()
    }

    pub fn get(&self, kind: ParamKind) -> Option<&Rollout> {
        self.by_kind.get(&kind)
    }

    pub fn abort(
        &mut self,
        kind: ParamKind,
        now: Timestamp,
        by: &str,
    ) -> Result<Vec<RolloutAction>, RolloutError> {
        self.by_kind.get_mut(&kind).ok_or(RolloutError::NoRollout(kind))?.abort(now, by)
    }

    pub fn desired_version(&self, kind: ParamKind, gate: &Ident) -> Option<u64> {
        self.by_kind.get(&kind)?.desired_version(gate)
    }
}

/// How many ids a blacklist package adds to the list gates hold (`held`): for a delta, its
/// additions `held` does not already list; for a full list, `|new \ held|` by set difference over
/// `(media, id)`, ranges included. Entry counts play no part: a full list swapping 250,000 ids for
/// 250,000 others adds 250,000. A delta must apply to exactly `held`'s version (else the error: the
/// caller then compares the list the delta makes, as a full list).
pub fn blacklist_ids_added(held: &Blacklist, new: &BlacklistBody) -> Result<u64, BlacklistError> {
    match new {
        BlacklistBody::Full(list) => Ok(held.ids_added_by(list)),
        BlacklistBody::Delta(d) => {
            d.check_applies_to(held.version())?;
            Ok(d.ids_added_to(held))
        }
    }
}

/// The one mass-insertion guard (SPEC §4): a blacklist change that adds more than `threshold` ids
/// to what gates hold waits for a second, different engineer. The controller asks it at the one
/// step every path to the gates goes through (the rollout request: API upload, rollout start,
/// parameter feed), so no path has a guard of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MassInsertionGuard {
    /// Most ids a change may add without a second engineer.
    pub threshold: u64,
}

impl MassInsertionGuard {
    pub fn new(threshold: u64) -> MassInsertionGuard {
        MassInsertionGuard { threshold }
    }

    /// Whether a change adding `added` ids needs a second engineer.
    pub fn holds(&self, added: u64) -> bool {
        added > self.threshold
    }

    /// The confirmation `new` needs before its rollout may start (requested by `by`), or `None`
    /// when it adds no more than the threshold to `held` (see [`blacklist_ids_added`]).
    pub fn check(
        &self,
        held: &Blacklist,
        new: &BlacklistBody,
        by: &str,
        now: Timestamp,
    ) -> Result<Option<SecondConfirmation>, BlacklistError> {
        let added = blacklist_ids_added(held, new)?;
        Ok(self.confirmation(added, new.version(), by, now))
    }

    /// The confirmation a change to `to_version` adding `added` ids needs, or `None` within the
    /// threshold (for a caller that counted the ids itself, see [`Blacklist::ids_added_by`]).
    pub fn confirmation(
        &self,
        added: u64,
        to_version: u64,
        by: &str,
        now: Timestamp,
    ) -> Option<SecondConfirmation> {
        self.holds(added).then(|| SecondConfirmation {
            to_version,
            added,
            requested_by: by.to_owned(),
            requested_at: now,
            confirmed_by: None,
            confirmed_at: None,
        })
    }
}

/// A mass blacklist insertion waiting for (or holding) its second operator's confirmation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct SecondConfirmation {
    /// The blacklist version the delta produces.
    pub to_version: u64,
    /// How many ids it adds to what gates held when it was asked (shown to the second operator).
    pub added: u64,
    pub requested_by: String,
    pub requested_at: Timestamp,
    pub confirmed_by: Option<String>,
    pub confirmed_at: Option<Timestamp>,
}

impl SecondConfirmation {
    /// The second operator confirms; the one who asked cannot.
    pub fn confirm(&mut self, by: &str, now: Timestamp) -> Result<(), RolloutError> {
        if let Some(already) = &self.confirmed_by {
            return Err(RolloutError::AlreadyConfirmed(already.clone()));
        }
        if by == self.requested_by {
            return Err(RolloutError::SameOperator(by.to_owned()));
        }
        self.confirmed_by = Some(by.to_owned());
        self.confirmed_at = Some(now);
        Ok(())
    }

    pub fn is_confirmed(&self) -> bool {
        self.confirmed_by.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blacklist::{BlacklistDelta, Entry};
    use crate::model::Media;

    const FT: ParamKind = ParamKind::FareTable;
    const T0: i64 = 1_800_000_000_000;
    const MIN: i64 = Timestamp::MINUTE_MS;

    fn at(minutes: i64) -> Timestamp {
        Timestamp::from_millis(T0 + minutes * MIN)
    }

    fn id(s: &str) -> Ident {
        Ident::new(s).unwrap()
    }

    fn policy() -> RolloutPolicy {
        RolloutPolicy {
            canary_gates: vec![id("g01")],
            soak_ms: 30 * MIN,
            ack_deadline_ms: 2 * MIN,
            ..RolloutPolicy::default()
        }
    }

    /// Four online gates holding fare table 7 and blacklist 40, with zeroed counters.
    fn station() -> Observations {
        let mut gates = BTreeMap::new();
        for g in ["g01", "g02", "g03", "g04"] {
            let versions = [
                (FT, KindVersions { active: Some(7), ..KindVersions::default() }),
                (ParamKind::Blacklist, KindVersions { active: Some(40), ..KindVersions::default() }),
            ]
            .into();
            let obs = GateObservation {
                online: true,
                versions,
                rejected: BTreeMap::new(),
                counters: Some(GateCounters::default()),
            };
            gates.insert(id(g), obs);
        }
        Observations { gates }
    }

    fn set_active(obs: &mut Observations, gate: &str, kind: ParamKind, v: u64) {
        let g = obs.gates.get_mut(&id(gate)).unwrap();
        g.versions.insert(kind, KindVersions { active: Some(v), ..KindVersions::default() });
    }

    fn set_pending(obs: &mut Observations, gate: &str, kind: ParamKind, v: u64, from: Timestamp) {
        let g = obs.gates.get_mut(&id(gate)).unwrap();
        let held = g.versions.entry(kind).or_default();
        held.pending = Some(v);
        held.pending_effective_from = Some(from);
    }

    fn add_taps(obs: &mut Observations, gate: &str, taps: u64, rejects: u64) {
        let c = obs.gates.get_mut(&id(gate)).unwrap().counters.get_or_insert_with(GateCounters::default);
        c.taps += taps;
        c.rejects += rejects;
    }

    /// Starts fare table 7 → 8 (effective now) with g01 as canary, and brings it into the soak.
    fn soaking() -> (Rollout, Observations) {
        let mut obs = station();
        let (mut r, actions) = Rollout::start(FT, Some(7), 8, at(0), &policy(), at(0), &obs).unwrap();
        assert_eq!(actions, vec![RolloutAction::PublishOverride { gate: id("g01"), kind: FT, version: 8 }]);
        set_active(&mut obs, "g01", FT, 8);
        assert_eq!(r.step(at(1), &obs), vec![]);
        assert!(matches!(r.stage, Stage::Soak { .. }), "{:?}", r.stage);
        (r, obs)
    }

    fn rollback_actions() -> Vec<RolloutAction> {
        vec![
            RolloutAction::Republish { kind: FT, content_of: 7, min_version: 9 },
            RolloutAction::ClearOverrides { kind: FT },
        ]
    }

    #[test]
    fn a_healthy_canary_soaks_then_goes_to_every_gate() {
        let (mut r, mut obs) = soaking();
        assert_eq!(r.desired_version(&id("g01")), Some(8));
        assert_eq!(r.desired_version(&id("g02")), Some(7));
        for gate in ["g01", "g02", "g03", "g04"] {
            add_taps(&mut obs, gate, 100, 2);
        }
        assert_eq!(r.step(at(20), &obs), vec![], "still soaking");
        assert_eq!(
            r.step(at(31), &obs),
            vec![
                RolloutAction::PublishCurrent { kind: FT, version: 8 },
                RolloutAction::ClearOverrides { kind: FT }
            ]
        );
        assert_eq!(r.desired_version(&id("g02")), Some(8));
        for gate in ["g02", "g03"] {
            set_active(&mut obs, gate, FT, 8);
        }
        obs.gates.get_mut(&id("g04")).unwrap().online = false;
        assert_eq!(r.step(at(32), &obs), vec![]);
        assert_eq!(r.stage, Stage::Done { at: at(32) }, "offline gates catch up from the retained pointer");
    }

    /// Each rollback trigger, applied while the canary g01 soaks (or waits) on version 8.
    #[test]
    fn every_failed_health_check_rolls_every_gate_back_with_a_republish_above_the_new_version() {
        type Trigger = fn(&mut Rollout, &mut Observations) -> Vec<RolloutAction>;
        type Expected = fn(&RollbackReason) -> bool;
        let cases: Vec<(&str, Trigger, Expected)> = vec![
            (
                "a canary reject-rate spike against a calm baseline",
                |r, obs| {
                    add_taps(obs, "g01", 100, 30);
                    for g in ["g02", "g03", "g04"] {
                        add_taps(obs, g, 100, 1);
                    }
                    r.step(at(5), obs)
                },
                |why| {
                    matches!(
                        why,
                        RollbackReason::RejectRate {
                            canary_ppm: 300_000,
                            baseline_ppm: Some(10_000),
                            limit_ppm: 60_000
                        }
                    )
                },
            ),
            (
                "a canary reject-rate spike with no baseline above the absolute limit",
                |r, obs| {
                    add_taps(obs, "g01", 100, 25);
                    r.step(at(5), obs)
                },
                |why| {
                    matches!(why, RollbackReason::RejectRate { baseline_ppm: None, limit_ppm: 200_000, .. })
                },
            ),
            (
                "a canary rejecting the package",
                |r, obs| {
                    obs.gates.get_mut(&id("g01")).unwrap().rejected.insert(FT, 8);
                    r.step(at(5), obs)
                },
                |why| matches!(why, RollbackReason::CanaryRejected { version: 8, .. }),
            ),
            (
                "an operator abort",
                |r, _| r.abort(at(5), "engineer-li").unwrap(),
                |why| matches!(why, RollbackReason::OperatorAbort { by } if by == "engineer-li"),
            ),
        ];
        for (name, trigger, expected) in cases {
            let (mut r, mut obs) = soaking();
            assert_eq!(trigger(&mut r, &mut obs), rollback_actions(), "{name}");
            let Stage::RolledBack { reason, .. } = &r.stage else { panic!("{name}: {:?}", r.stage) };
            assert!(expected(reason), "{name}: {reason:?}");
            assert_eq!(r.step(at(6), &obs), vec![], "{name}: a rolled back rollout stays put");
            assert_eq!(r.desired_version(&id("g01")), Some(7), "{name}");
            assert_eq!(r.republished(8), Err(RolloutError::RepublishNotAbove { min: 8, got: 8 }), "{name}");
            r.republished(9).unwrap();
            for g in ["g01", "g02", "g03", "g04"] {
                assert_eq!(r.desired_version(&id(g)), Some(9), "{name}");
            }
        }
    }

    #[test]
    fn a_station_wide_reject_spike_is_not_blamed_on_the_canary() {
        let (mut r, mut obs) = soaking();
        for g in ["g01", "g02", "g03", "g04"] {
            add_taps(&mut obs, g, 100, 40);
        }
        assert_eq!(r.step(at(5), &obs), vec![]);
        assert!(matches!(r.stage, Stage::Soak { .. }));
    }

    #[test]
    fn too_few_canary_taps_give_no_verdict_and_a_gate_restart_does_not_fake_a_rate() {
        let (mut r, mut obs) = soaking();
        add_taps(&mut obs, "g01", 5, 5);
        assert_eq!(r.step(at(5), &obs), vec![], "5 taps are below min_taps_for_rate");
        // g01 restarts: its counters drop to a low value, which counts as new activity only.
        obs.gates.get_mut(&id("g01")).unwrap().counters =
            Some(GateCounters { taps: 50, rejects: 1, ..Default::default() });
        assert_eq!(r.step(at(6), &obs), vec![]);
        assert!(matches!(r.stage, Stage::Soak { .. }));
    }

    #[test]
    fn canary_acks_missing_after_the_deadline_roll_every_gate_back() {
        let obs = station();
        let (mut r, _) = Rollout::start(FT, Some(7), 8, at(0), &policy(), at(0), &obs).unwrap();
        assert_eq!(r.step(at(1), &obs), vec![], "within the ack deadline");
        assert_eq!(r.step(at(2), &obs), rollback_actions());
        assert_eq!(
            r.stage,
            Stage::RolledBack { at: at(2), reason: RollbackReason::MissingAcks { gates: vec![id("g01")] } }
        );
    }

    #[test]
    fn a_blacklist_delta_reaches_every_gate_during_a_fare_table_soak() {
        let mut obs = station();
        let mut all = Rollouts::default();
        all.start(FT, Some(7), 8, at(0), &policy(), at(0), &obs).unwrap();
        set_active(&mut obs, "g01", FT, 8);
        all.step(at(1), &obs);
        assert!(all.get(FT).unwrap().is_staging());
        assert_eq!(
            all.start(FT, Some(8), 9, at(2), &policy(), at(2), &obs),
            Err(RolloutError::Busy { kind: FT, version: 8 }),
            "a second fare table waits for the soak"
        );
        let bl = ParamKind::Blacklist;
        let actions = all.start(bl, Some(40), 41, at(2), &policy(), at(2), &obs).unwrap();
        assert_eq!(actions, vec![RolloutAction::PublishCurrent { kind: bl, version: 41 }]);
        for g in ["g01", "g02", "g03", "g04"] {
            set_active(&mut obs, g, bl, 41);
        }
        assert_eq!(all.step(at(3), &obs), vec![]);
        assert_eq!(all.get(bl).unwrap().stage, Stage::Done { at: at(3) });
        assert!(matches!(all.get(FT).unwrap().stage, Stage::Soak { .. }), "the soak is unaffected");
        let next = all.start(bl, Some(41), 42, at(4), &policy(), at(4), &obs).unwrap();
        assert_eq!(
            next,
            vec![RolloutAction::PublishCurrent { kind: bl, version: 42 }],
            "the next delta follows at once"
        );
        assert_eq!(all.desired_version(bl, &id("g03")), Some(42));
        assert_eq!(all.desired_version(FT, &id("g03")), Some(7));
    }

    #[test]
    fn a_future_dated_package_is_delivered_early_to_every_gate() {
        let mut obs = station();
        let (mut r, actions) = Rollout::start(FT, Some(7), 8, at(24 * 60), &policy(), at(0), &obs).unwrap();
        assert_eq!(actions, vec![RolloutAction::PublishCurrent { kind: FT, version: 8 }]);
        assert!(r.canaries.is_empty());
        for g in ["g01", "g02", "g03", "g04"] {
            set_pending(&mut obs, g, FT, 8, at(24 * 60));
        }
        r.step(at(1), &obs);
        assert_eq!(r.stage, Stage::Done { at: at(1) }, "pending counts as delivered");
    }

    #[test]
    fn a_canaried_future_dated_package_waits_for_its_effective_time_without_a_rollback() {
        let mut obs = station();
        let policy = RolloutPolicy { canary_future_dated: true, ..policy() };
        let eff = at(60);
        let (mut r, _) = Rollout::start(FT, Some(7), 8, eff, &policy, at(0), &obs).unwrap();
        set_pending(&mut obs, "g01", FT, 8, eff);
        assert_eq!(r.step(at(30), &obs), vec![], "pending before effective_from is on time");
        assert_eq!(r.step(at(61), &obs), vec![], "the gate has until the deadline to switch");
        set_active(&mut obs, "g01", FT, 8);
        r.step(at(61), &obs);
        assert_eq!(r.stage, Stage::Soak { since: at(61), until: at(91) });
        let (mut late, _) = Rollout::start(FT, Some(7), 8, eff, &policy, at(0), &station()).unwrap();
        let mut pending_only = station();
        set_pending(&mut pending_only, "g01", FT, 8, eff);
        assert_eq!(
            late.step(at(62), &pending_only),
            rollback_actions(),
            "not switched 2 minutes after effective_from"
        );
    }

    #[test]
    fn canaries_are_chosen_among_online_gates_when_none_are_configured() {
        let mut obs = station();
        obs.gates.get_mut(&id("g01")).unwrap().online = false;
        let policy = RolloutPolicy { canary_gates: vec![], canary_count: 2, ..policy() };
        let (r, actions) = Rollout::start(FT, Some(7), 8, at(0), &policy, at(0), &obs).unwrap();
        assert_eq!(r.canaries, vec![id("g02"), id("g03")]);
        assert_eq!(actions.len(), 2);
        assert_eq!(
            Rollout::start(FT, Some(8), 8, at(0), &policy, at(0), &obs).unwrap_err(),
            RolloutError::NotForward { kind: FT, from: 8, to: 8 }
        );
    }

    #[test]
    fn a_kinds_first_version_goes_to_every_gate_at_once() {
        let obs = station();
        let (r, actions) = Rollout::start(FT, None, 1, at(0), &policy(), at(0), &obs).unwrap();
        assert!(r.canaries.is_empty(), "{r:?}");
        assert!(actions.contains(&RolloutAction::PublishCurrent { kind: FT, version: 1 }), "{actions:?}");
        let (r, _) = Rollout::start(FT, Some(1), 2, at(0), &policy(), at(0), &obs).unwrap();
        assert!(!r.canaries.is_empty(), "the second version is canaried again");
    }

    #[test]
    fn the_rollout_state_round_trips_through_json() {
        let (mut r, mut obs) = soaking();
        add_taps(&mut obs, "g01", 100, 90);
        r.step(at(5), &obs);
        let mut all = Rollouts::default();
        all.by_kind.insert(FT, r);
        let json = serde_json::to_string(&all).unwrap();
        assert_eq!(serde_json::from_str::<Rollouts>(&json).unwrap(), all);
        let action = RolloutAction::Republish { kind: FT, content_of: 7, min_version: 9 };
        let json = serde_json::to_value(&action).unwrap();
        assert_eq!(json["action"], "republish");
        assert_eq!(serde_json::from_value::<RolloutAction>(json).unwrap(), action);
    }

    #[test]
    fn mass_insertions_above_the_threshold_need_a_second_confirmation_from_another_operator() {
        let held = Blacklist::from_entries(40, [Entry::range(Media::Svc, 1, 1000).unwrap()]);
        let delta = |first: u64, last: u64| {
            BlacklistBody::Delta(BlacklistDelta {
                from_version: 40,
                to_version: 41,
                add: vec![Entry::range(Media::Svc, first, last).unwrap()],
                remove: vec![],
            })
        };
        let guard = MassInsertionGuard::new(10_000);
        for (size, needed) in [(1u64, false), (10_000, false), (10_001, true), (250_000, true)] {
            let d = delta(5_000_000, 5_000_000 + size - 1);
            assert_eq!(blacklist_ids_added(&held, &d), Ok(size), "{size} ids");
            assert_eq!(guard.check(&held, &d, "op-wang", at(0)).unwrap().is_some(), needed, "{size} ids");
        }
        // Ids the gates already hold are not added again.
        assert_eq!(blacklist_ids_added(&held, &delta(1, 10_500)), Ok(9_500));
        assert_eq!(guard.check(&held, &delta(1, 10_500), "op-wang", at(0)), Ok(None));
        // A delta for another version than the one held is not counted against it.
        let stale = BlacklistBody::Delta(BlacklistDelta {
            from_version: 39,
            to_version: 41,
            add: vec![],
            remove: vec![],
        });
        assert!(guard.check(&held, &stale, "op-wang", at(0)).is_err());

        let mut c = guard.check(&held, &delta(2_000, 251_999), "op-wang", at(0)).unwrap().unwrap();
        assert_eq!((c.added, c.to_version), (250_000, 41));
        assert_eq!(c.confirm("op-wang", at(1)), Err(RolloutError::SameOperator("op-wang".into())));
        assert!(!c.is_confirmed());
        c.confirm("op-zhao", at(2)).unwrap();
        assert!(c.is_confirmed());
        assert_eq!(c.confirm("op-sun", at(3)), Err(RolloutError::AlreadyConfirmed("op-zhao".into())));
    }

    #[test]
    fn a_full_list_swapping_its_ids_for_as_many_others_is_held_and_a_resend_with_a_few_more_is_not() {
        let svc = |id| Entry::single(Media::Svc, id);
        let held = Blacklist::from_entries(7, (0..10_000u64).map(|i| svc(1_000_000 + 3 * i)));
        let swapped = Blacklist::from_entries(8, (0..10_000u64).map(|i| svc(9_000_000 + 3 * i)));
        assert_eq!(held.entry_count(), swapped.entry_count(), "the same entry count");
        let guard = MassInsertionGuard::new(1_000);
        let c = guard.check(&held, &BlacklistBody::Full(swapped), "op-wang", at(0)).unwrap();
        assert_eq!(c.map(|c| c.added), Some(10_000));
        let resent = Blacklist::from_entries(8, held.entries().chain((0..5).map(|i| svc(50 + 3 * i))));
        assert_eq!(guard.check(&held, &BlacklistBody::Full(resent), "op-wang", at(0)), Ok(None));
    }
}
