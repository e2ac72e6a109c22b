//! Staged rollouts in the state: one per kind and the requests waiting to start, the version
//! gates are pointed at, and the operators' and the leader's rollout commands.

use std::collections::{BTreeMap, BTreeSet};

use afc_domain::model::{Ident, ParamKind, Timestamp};
use afc_domain::rollout::{Rollout, RolloutError, Rollouts, Stage};
use serde::{Deserialize, Serialize};

use super::{rejected, PackageVersions, Rejection, Response, RolloutStart, StationState};

/// The rollouts of the station: one per kind, and the requests waiting to start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutBook {
    pub rollouts: Rollouts,
    pub requests: BTreeMap<ParamKind, RolloutStart>,
    /// Kinds that never had a rollout whose waiting request was dropped: the version gates stay
    /// at (`None`: nothing). Without it the pointer would fall back to the latest stored version,
    /// and an aborted mass blacklist insertion still waiting for its second engineer would reach
    /// every gate. Cleared when the kind's first rollout starts.
    #[serde(default)]
    pub withheld: BTreeMap<ParamKind, Option<u64>>,
}

impl RolloutBook {
    /// The version every gate should be pointed at for `kind` (`params/{kind}/current`), given
    /// the latest stored version `stored`: with no rollout or request of the kind ever, the latest
    /// stored.
    pub fn station_version(&self, kind: ParamKind, stored: Option<u64>) -> Option<u64> {
        let Some(r) = self.rollouts.get(kind) else {
            // A first rollout asked for: gates keep what they had until it starts.
            return match (self.requests.get(&kind), self.withheld.get(&kind)) {
                (Some(q), _) => q.from_version,
                (None, Some(kept)) => *kept,
                (None, None) => stored,
            };
        };
        match &r.stage {
            Stage::Canary { .. } | Stage::Soak { .. } => r.from_version,
            Stage::Full { .. } | Stage::Done { .. } => Some(r.to_version),
            Stage::RolledBack { .. } => r.republished_as.or(r.from_version),
        }
    }

    /// The per-gate pointer overrides of `kind` in force (the canaries while staging).
    pub fn overrides(&self, kind: ParamKind) -> Vec<(Ident, u64)> {
        match self.rollouts.get(kind) {
            Some(r) if r.is_staging() => r.canaries.iter().map(|g| (g.clone(), r.to_version)).collect(),
            _ => Vec::new(),
        }
    }

    /// Versions of `kind` a rollout or request still needs (never pruned).
    pub(super) fn pinned(&self, kind: ParamKind) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        if let Some(r) = self.rollouts.get(kind) {
            out.extend(r.from_version);
            out.insert(r.to_version);
            out.extend(r.republished_as);
        }
        if let Some(q) = self.requests.get(&kind) {
            out.insert(q.to_version);
            out.extend(q.from_version);
        }
        out.extend(self.withheld.get(&kind).copied().flatten());
        out
    }
}

impl StationState {
    pub(super) fn rollout_request(&mut self, q: &RolloutStart) -> Response {
        let kind = q.kind;
        // A stored version, or the next one announced just before it is stored (so no pointer
        // names it before its rollout exists).
        let held = self.packages.get(kind.as_str());
        let current = held.map_or(0, PackageVersions::current);
        if !held.is_some_and(|h| h.versions.contains(&q.to_version)) && q.to_version != current + 1 {
            return rejected(Rejection::UnknownVersion { kind, version: q.to_version });
        }
        if let Some(r) = self.rollouts.rollouts.get(kind).filter(|r| r.is_staging()) {
            return rollout_rejected(&RolloutError::Busy { kind, version: r.to_version });
        }
        if let Some(from) = q.from_version.filter(|from| q.to_version <= *from) {
            return rollout_rejected(&RolloutError::NotForward { kind, from, to: q.to_version });
        }
        self.rollouts.requests.insert(kind, q.clone());
        Response::RolloutRequested { kind, version: q.to_version, held: !q.ready() }
    }

    pub(super) fn rollout_confirm(
        &mut self,
        kind: ParamKind,
        version: Option<u64>,
        by: &str,
        at: Timestamp,
    ) -> Response {
        let Some(q) = self.rollouts.requests.get_mut(&kind) else {
            return rollout_rejected(&RolloutError::NoRollout(kind));
        };
        if let Some(v) = version.filter(|v| *v != q.to_version) {
            return rejected(Rejection::UnknownVersion { kind, version: v });
        }
        let Some(c) = q.confirmation.as_mut() else {
            return rejected(Rejection::Rollout {
                rollout_code: "no_confirmation_needed".into(),
                detail: format!("the {kind} rollout to version {} needs no confirmation", q.to_version),
            });
        };
        match c.confirm(by, at) {
            Ok(()) => Response::RolloutConfirmed { kind, version: q.to_version },
            Err(e) => rollout_rejected(&e),
        }
    }

    pub(super) fn rollout_abort(&mut self, kind: ParamKind, by: &str, at: Timestamp) -> Response {
        if let Some(q) = self.rollouts.requests.remove(&kind) {
            if self.rollouts.rollouts.get(kind).is_none() {
                // Gates stay where the request found them, not at the latest stored version.
                self.rollouts.withheld.insert(kind, q.from_version);
            }
            return Response::RolloutAborted { kind, dropped_request: true };
        }
        match self.rollouts.rollouts.abort(kind, at, by) {
            // The actions (republish, clear overrides) follow from the new stage: the leader's
            // driver republishes, the publisher derives the pointers.
            Ok(_) => Response::RolloutAborted { kind, dropped_request: false },
            Err(e) => rollout_rejected(&e),
        }
    }

    pub(super) fn rollout_update(
        &mut self,
        kind: ParamKind,
        previous: Option<&Rollout>,
        next: &Rollout,
        started: bool,
    ) -> Response {
        if next.kind != kind || self.rollouts.rollouts.get(kind) != previous {
            return rejected(Rejection::RolloutChanged { kind });
        }
        if started {
            let waiting = self.rollouts.requests.get(&kind);
            if !waiting.is_some_and(|q| q.ready() && q.to_version == next.to_version) {
                return rejected(Rejection::RolloutChanged { kind });
            }
            self.rollouts.requests.remove(&kind);
        }
        self.rollouts.rollouts.by_kind.insert(kind, next.clone());
        self.rollouts.withheld.remove(&kind);
        Response::RolloutUpdated { kind }
    }
}

fn rollout_rejected(e: &RolloutError) -> Response {
    let code = match e {
        RolloutError::NotForward { .. } => "not_forward",
        RolloutError::Busy { .. } => "rollout_busy",
        RolloutError::NoRollout(_) => "no_rollout",
        RolloutError::AlreadyRolledBack { .. } => "already_rolled_back",
        RolloutError::NotRolledBack => "not_rolled_back",
        RolloutError::RepublishNotAbove { .. } => "republish_not_above",
        RolloutError::SameOperator(_) => "same_operator",
        RolloutError::AlreadyConfirmed(_) => "already_confirmed",
    };
    rejected(Rejection::Rollout { rollout_code: code.into(), detail: e.to_string() })
}
