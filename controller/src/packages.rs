//! The station's parameter packages as the node's tasks use them: what is in force now (the
//! current fare table's business-day rule), and publishing a new version, the one way every path
//! does it: the API's uploads (`api/params.rs`), the clearing feed (`params_feed.rs`) and the
//! rollout driver's republish after a rollback (`leader/rollout.rs`).
//!
//! Publishing is [`prepare`] (next version, sign, and the rollout request with the one
//! mass-insertion guard, [`rollout_request`]) then [`Prepared::commit`] (audit, record the
//! request, store). What differs between the paths is a parameter, never a copy:
//! - the version floor of [`next_version`] (the driver republishes above the rolled-out version);
//! - [`RolloutRule`]: no request (the driver's republish), a request whose outcome is only reported
//!   (fare table, QR keys, gate config, the feed), or a guarded one (the blacklist upload: a
//!   request that cannot be built stops the upload, and one held for a second engineer is on
//!   record before the package is stored, or nothing is stored);
//! - the audit line (who, action, detail), or none (the republish: the rollback is on record).
//!
//! The request is recorded before the package is stored, so no pointer names the new version
//! before its rollout exists (SPEC §4: rollout is automatic).

use afc_domain::blacklist::Blacklist;
use afc_domain::model::{BusinessDayRule, ParamKind, Timestamp};
use afc_domain::network::FareTable;
use afc_domain::package::{BlacklistBody, Package};
use afc_domain::rollout::{blacklist_ids_added, MassInsertionGuard, SecondConfirmation};

use crate::clock::now;
use crate::node::{Node, NodeError};
use crate::secrets::StationKey;
use crate::state::{Request, Response, RolloutStart, StationState};
use crate::storage::{StateMachineStore, StoreError};

/// Why a package was not published. The API maps it to its errors (`api/error.rs`); the tasks log it.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("node: {0}")]
    Node(#[from] NodeError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// The state machine refused the rollout request (the response holds its rejection).
    #[error("refused: {0:?}")]
    Rejected(Response),
    #[error("invalid parameters: {0}")]
    InvalidParameters(String),
    #[error("{0}")]
    Conflict(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The version after what `state` holds of `kind`, and above `floor`.
pub fn next_version(state: &StationState, kind: ParamKind, floor: u64) -> u64 {
    state.packages.get(kind.as_str()).map_or(0, |p| p.current()).max(floor) + 1
}

/// Whether and how a publication requests the rollout of what it stores.
#[derive(Debug, Clone, Copy)]
pub enum RolloutRule<'a> {
    /// No request: the rollout driver's republish, which its rollback steers.
    None,
    /// Request a rollout (`why`: its reason); the outcome is reported and never stops the store.
    Report { why: &'a str },
    /// Request a rollout through the guard: a request that cannot be built stops the publication,
    /// and one held for a second engineer must be recorded (held) before the package is stored.
    Guarded { why: &'a str },
}

/// A package signed, with its rollout request built, not yet audited, recorded or stored.
#[derive(Debug)]
pub struct Prepared<'a> {
    pub package: Package,
    /// The encoded package (what is stored), and its size is what the API reports.
    pub bytes: Vec<u8>,
    /// For a blacklist with a request: the ids it adds to what gates hold.
    pub added: Option<u64>,
    by: &'a str,
    rule: RolloutRule<'a>,
    request: Option<Result<RolloutStart, PublishError>>,
}

/// What [`Prepared::commit`] did.
#[derive(Debug)]
pub struct Published {
    /// The answer to storing the package (each path checks it its own way).
    pub stored: Response,
    /// The rollout request's outcome (`None`: no request, by [`RolloutRule::None`]).
    pub rollout: Option<Result<Response, PublishError>>,
}

/// Signs `body` as `version` of `kind` (in force from `effective_from`) with the station `key`
/// and builds its rollout request by `rule`, from what the state holds now; `by` is who publishes
/// (the request's and the audit line's actor).
pub fn prepare<'a>(
    node: &Node,
    key: &StationKey,
    (kind, version, effective_from): (ParamKind, u64, Timestamp),
    body: Vec<u8>,
    by: &'a str,
    rule: RolloutRule<'a>,
) -> Result<Prepared<'a>, PublishError> {
    let package = key.sign_package(kind, version, effective_from, body);
    let bytes = package.encode();
    let built = match rule {
        RolloutRule::None => None,
        RolloutRule::Report { why } | RolloutRule::Guarded { why } => Some(
            node.sm
                .state()
                .map_err(PublishError::from)
                .and_then(|s| rollout_request(node, &s, &package, by, why)),
        ),
    };
    let (request, added) = match (built, rule) {
        (Some(Err(e)), RolloutRule::Guarded { .. }) => return Err(e),
        (Some(Ok((request, added))), _) => (Some(Ok(request)), added),
        (Some(Err(e)), _) => (Some(Err(e)), None),
        (None, _) => (None, None),
    };
    Ok(Prepared { package, bytes, added, by, rule, request })
}

impl Prepared<'_> {
    /// Whether its rollout request waits for a second engineer (a mass blacklist insertion).
    pub fn held(&self) -> bool {
        matches!(&self.request, Some(Ok(r)) if r.confirmation.is_some())
    }

    /// Writes the audit line (`action`, `detail`; none for `None`), records the rollout request,
    /// then stores the package.
    pub async fn commit(self, node: &Node, audit: Option<(&str, String)>) -> Result<Published, PublishError> {
        if let Some((action, detail)) = audit {
            let line =
                Request::Audit { actor: self.by.to_owned(), action: action.to_owned(), detail, at: now() };
            node.write(line, 0).await?;
        }
        let held = self.held();
        let rollout = match self.request {
            None => None,
            Some(Err(e)) => Some(Err(e)),
            Some(Ok(request)) => {
                let r = record(node, request).await;
                if held && matches!(self.rule, RolloutRule::Guarded { .. }) {
                    // The held request is on record before the package is stored, or nothing is
                    // stored: a stored version that no request holds back could reach gates as it is.
                    let r = r?;
                    if !matches!(r, Response::RolloutRequested { held: true, .. }) {
                        return Err(PublishError::Internal(format!(
                            "held rollout request not recorded: {r:?}"
                        )));
                    }
                    Some(Ok(r))
                } else {
                    Some(r)
                }
            }
        };
        let (kind, version) = (self.package.header.kind, self.package.header.version);
        let stored = node.put_package(kind, version, &self.bytes).await?;
        Ok(Published { stored, rollout })
    }
}

/// Records a rollout request built by [`rollout_request`] (not audited: the publication it
/// belongs to is).
pub async fn record(node: &Node, request: RolloutStart) -> Result<Response, PublishError> {
    match node.write(Request::RolloutRequest { request }, 0).await? {
        r @ Response::Rejected { .. } => Err(PublishError::Rejected(r)),
        r => Ok(r),
    }
}

/// The business-day rule of the current fare table (the Dalian default before the first one), as
/// stored in `sm`: shared by the API's reports and closes and the leader's `counter-readings`
/// task. The error says what is wrong.
pub fn current_rule(sm: &StateMachineStore) -> Result<BusinessDayRule, String> {
    let s = sm.state().map_err(|e| e.to_string())?;
    let Some(v) = s.packages.get(ParamKind::FareTable.as_str()).map(|p| p.current()).filter(|v| *v > 0)
    else {
        return Ok(BusinessDayRule::default());
    };
    let bytes = sm
        .package(ParamKind::FareTable, v)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("fare_table version {v} is not stored"))?;
    let p = Package::decode(&bytes).map_err(|e| format!("fare_table {v}: {e}"))?;
    let t = FareTable::decode(&p.body).map_err(|e| format!("fare_table {v}: {e}"))?;
    Ok(t.business_day())
}

/// The rollout request for `package` (stored, or about to be stored as the next version), from
/// what the state holds now, and for a blacklist the ids it adds to what gates hold.
///
/// Every path that can change what gates hold builds its request here (an API upload, a rollout
/// started by hand, the parameter feed: [`Prepared`] and `api::rollouts::start`), and the leader starts
/// only ready requests: so this is the one place the mass-insertion guard is asked
/// ([`blacklist_guard`]). A blacklist adding more ids than the threshold carries a confirmation
/// that an engineer other than `by` must give before the rollout starts.
pub fn rollout_request(
    node: &Node,
    s: &StationState,
    package: &Package,
    by: &str,
    why: &str,
) -> Result<(RolloutStart, Option<u64>), PublishError> {
    let (kind, version) = (package.header.kind, package.header.version);
    let stored_before =
        s.packages.get(kind.as_str()).and_then(|p| p.versions.iter().rev().find(|v| **v < version).copied());
    // What gates hold now: the rollout's station version; with a request still waiting (held for
    // a second engineer, say), what that request started from, never the version it would bring.
    let from_version = s.rollouts.station_version(kind, stored_before);
    let at = now();
    let (added, confirmation) = if kind == ParamKind::Blacklist {
        let (added, c) = blacklist_guard(node, package, from_version, by, at)?;
        (Some(added), c)
    } else {
        (None, None)
    };
    let request = RolloutStart {
        kind,
        to_version: version,
        from_version,
        effective_from: package.header.effective_from,
        policy: node.config.rollout.clone(),
        by: by.to_owned(),
        at,
        reason: why.to_owned(),
        confirmation,
    };
    Ok((request, added))
}

/// The controller's side of the one mass-insertion guard (SPEC §4,
/// [`MassInsertionGuard`]): how many ids the blacklist `package` adds to the list gates hold at
/// `from` (by set difference, never entry counts), and the confirmation it needs when that is
/// above `api.blacklist_confirm_threshold`. A delta written on another version than the gates
/// hold is judged by the list it makes. When the list at `from` cannot be rebuilt (a package on
/// the way missing), the guard counts against an empty list: it holds rather than waves through.
pub fn blacklist_guard(
    node: &Node,
    package: &Package,
    from: Option<u64>,
    by: &str,
    at: Timestamp,
) -> Result<(u64, Option<SecondConfirmation>), PublishError> {
    let new = BlacklistBody::decode(&package.body)
        .map_err(|e| PublishError::InvalidParameters(format!("blacklist body: {e}")))?;
    let held = match from {
        Some(v) => list_at(node, v)?.unwrap_or_else(|| {
            tracing::warn!(
                version = v,
                "blacklist held by gates cannot be rebuilt: counting every id as added"
            );
            Blacklist::empty()
        }),
        None => Blacklist::empty(),
    };
    let added = match blacklist_ids_added(&held, &new) {
        Ok(added) => added,
        Err(_) => {
            // A delta on another version (one stored after what gates hold): the list it makes.
            let BlacklistBody::Delta(d) = &new else {
                return Err(PublishError::Internal("a full blacklist is always comparable".into()));
            };
            let made = list_at(node, d.from_version)?
                .and_then(|mut base| base.apply_delta(d).ok().map(|()| base))
                .ok_or_else(|| {
                    PublishError::Conflict(format!(
                        "blacklist v{} is a delta on v{}, which cannot be rebuilt: upload a full list",
                        d.to_version, d.from_version
                    ))
                })?;
            held.ids_added_by(&made)
        }
    };
    let guard = MassInsertionGuard::new(node.config.api.blacklist_confirm_threshold);
    Ok((added, guard.confirmation(added, package.header.version, by, at)))
}

/// The blacklist gates hold at `version`: its full list, or the deltas since the last full list
/// applied in order (version 0: the empty list). `None` when a package on the way is missing,
/// does not decode or does not apply.
fn list_at(node: &Node, version: u64) -> Result<Option<Blacklist>, PublishError> {
    let mut deltas = Vec::new();
    let mut v = version;
    let mut list = loop {
        if v == 0 {
            break Blacklist::empty();
        }
        let body = node
            .sm
            .package(ParamKind::Blacklist, v)?
            .and_then(|b| Package::decode(&b).ok())
            .and_then(|p| BlacklistBody::decode(&p.body).ok());
        match body {
            Some(BlacklistBody::Full(list)) => break list,
            // Each step goes to a lower version, so the walk ends.
            Some(BlacklistBody::Delta(d)) if d.from_version < v => {
                v = d.from_version;
                deltas.push(d);
            }
            _ => return Ok(None),
        }
    };
    for d in deltas.iter().rev() {
        if list.apply_delta(d).is_err() {
            return Ok(None);
        }
    }
    Ok(Some(list))
}
