//! Task `rollout-driver`: the leader runs the staged rollouts kept in the replicated state
//! (SPEC §4) with afc-domain's pure [`Rollout`] state machine.
//!
//! Every [`STEP`] it reads the state, builds the gates' [`Observations`] from the board (birth,
//! `params/ack`, heartbeat counters), starts each ready [`RolloutStart`] request, steps each
//! rollout, and proposes every change as a compare-and-set [`Request::RolloutUpdate`] (a step
//! computed from a view an operator's abort has overtaken is refused, and recomputed next time).
//! The pointer actions (per-gate overrides, station pointer, clearing overrides) are not executed
//! here: the publisher derives every pointer from the stored stage ([`RolloutBook`]), so a new
//! leader publishes the same. The one action with a side effect, republishing the old content
//! under a higher version after a rollback, is done here and then recorded in the rollout; a
//! leader that dies in between leaves `republished_as` empty and the next one republishes.
//!
//! [`RolloutBook`]: crate::state::RolloutBook

use std::sync::Arc;
use std::time::Duration;

use afc_domain::blacklist::{Blacklist, BlacklistDelta};
use afc_domain::model::ParamKind;
use afc_domain::package::{BlacklistBody, Package};
use afc_domain::rollout::{Observations, Rollout, Stage};
use tokio_util::sync::CancellationToken;

use super::Ctx;
use crate::clock::now;
use crate::packages::{self, RolloutRule};
use crate::secrets::StationKey;
use crate::state::{Request, Response, StationState};

/// How often the rollouts are stepped.
pub const STEP: Duration = Duration::from_millis(250);
/// How long a new leader watches the gates before it steps any rollout.
pub const LEADERSHIP_GRACE: Duration = Duration::from_secs(2);
/// How long a request for a version announced before its upload waits for the package.
pub const ANNOUNCED_WAIT_MS: i64 = 10 * 60 * 1000;

/// Why a step could not be done (logged; the next step tries again).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("node: {0}")]
    Node(#[from] crate::node::NodeError),
    #[error("storage: {0}")]
    Store(#[from] crate::storage::StoreError),
    #[error("no signing key configured (api.signing_key_file): cannot republish")]
    NoSigningKey,
    #[error("{kind} version {version} is not stored")]
    Missing { kind: ParamKind, version: u64 },
    #[error("cannot republish {kind}: {detail}")]
    Republish { kind: ParamKind, detail: String },
    #[error("publish: {0}")]
    Publish(#[from] crate::packages::PublishError),
}

pub(crate) async fn driver_task(ctx: Arc<Ctx>, stop: CancellationToken) {
    tracing::info!(task = "rollout-driver", "started");
    let signing = ctx.node.secrets.station_key.clone();
    // A new leader's board starts empty: judge nothing before the gates' retained births (their
    // versions) and a heartbeat or so have arrived, or a canary would look silent.
    tokio::select! {
        () = stop.cancelled() => {
            tracing::info!(task = "rollout-driver", "stopped");
            return;
        }
        () = tokio::time::sleep(LEADERSHIP_GRACE) => {}
    }
    let mut tick = tokio::time::interval(STEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures: u32 = 0;
    // A commit can make a request startable (it arrived, was confirmed, or its package was
    // stored after it): step at once then, not at the next tick (the tick alone cost a 1,000-entry
    // delta up to 250 ms between its upload being answered and its rollout starting).
    let mut applied = ctx.node.raft.metrics();
    let mut seen = ctx.node.sm.rollout_requests();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
            changed = applied.changed() => {
                if changed.is_err() {
                    // Raft is shutting down: the ticks (or the stop) go on alone.
                    applied = ctx.node.raft.metrics();
                    tokio::select! {
                        () = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                } else if ctx.node.sm.rollout_requests() == seen {
                    continue;
                }
            }
        }
        seen = ctx.node.sm.rollout_requests();
        match step_once(&ctx, signing.as_deref()).await {
            Ok(()) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                // Back off (up to 30 s) so a step that cannot succeed (no signing key, a blacklist
                // that cannot be rolled back by a delta) does not spin or flood the log.
                let wait = STEP.saturating_mul(1 << failures.min(7)).min(Duration::from_secs(30));
                tracing::warn!(task = "rollout-driver", error = %e, failures, retry_in = ?wait, "rollout step failed");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    tracing::info!(task = "rollout-driver", "stopped");
}

fn observations(ctx: &Ctx) -> Observations {
    ctx.board.read().map(|b| b.observations()).unwrap_or_default()
}

async fn step_once(ctx: &Ctx, signing: Option<&StationKey>) -> Result<(), DriverError> {
    let state = ctx.node.sm.state()?;
    let book = &state.rollouts;
    if book.requests.is_empty() && book.rollouts.by_kind.values().all(finished) {
        return Ok(());
    }
    let obs = observations(ctx);
    let at = now();
    for (kind, q) in &book.requests {
        let previous = book.rollouts.get(*kind).cloned();
        if !q.ready() || previous.as_ref().is_some_and(Rollout::is_staging) {
            continue;
        }
        let stored = state.packages.get(kind.as_str()).is_some_and(|p| p.versions.contains(&q.to_version));
        if !stored {
            // Announced before its upload: wait for it, unless the upload evidently failed.
            if at.millis().saturating_sub(q.at.millis()) > ANNOUNCED_WAIT_MS {
                tracing::warn!(%kind, version = q.to_version, "announced version never stored: request dropped");
                let abort = Request::RolloutAbort { kind: *kind, by: "rollout-driver".into(), at };
                ctx.node.write(abort, 0).await?;
            }
            continue;
        }
        match Rollout::start(*kind, q.from_version, q.to_version, q.effective_from, &q.policy, at, &obs) {
            Ok((next, actions)) => {
                tracing::info!(%kind, version = q.to_version, canaries = ?next.canaries, ?actions, "rollout started");
                propose(ctx, *kind, previous, next, true).await?;
            }
            Err(e) => {
                tracing::warn!(%kind, error = %e, "rollout request cannot start: dropped");
                let abort = Request::RolloutAbort { kind: *kind, by: "rollout-driver".into(), at };
                ctx.node.write(abort, 0).await?;
            }
        }
    }
    for (kind, r) in &book.rollouts.by_kind {
        if finished(r) {
            continue;
        }
        let mut next = r.clone();
        let actions = next.step(at, &obs);
        if !actions.is_empty() {
            tracing::info!(%kind, version = r.to_version, stage = ?next.stage, ?actions, "rollout moved");
        }
        if matches!(next.stage, Stage::RolledBack { .. }) && next.republished_as.is_none() {
            if let Some(from) = next.from_version {
                if next != *r {
                    // Record the rollback first: the gates stop getting the new version at once.
                    propose(ctx, *kind, Some(r.clone()), next.clone(), false).await?;
                }
                let version = republish(ctx, &state, signing, &next, from).await?;
                let mut recorded = next.clone();
                if let Err(e) = recorded.republished(version) {
                    return Err(DriverError::Republish { kind: *kind, detail: e.to_string() });
                }
                tracing::info!(%kind, content_of = from, version, "old content republished");
                propose(ctx, *kind, Some(next), recorded, false).await?;
                continue;
            }
        }
        if next != *r {
            propose(ctx, *kind, Some(r.clone()), next, false).await?;
        }
    }
    Ok(())
}

/// Nothing left to do for the rollout.
fn finished(r: &Rollout) -> bool {
    match r.stage {
        Stage::Done { .. } => true,
        Stage::RolledBack { .. } => r.republished_as.is_some() || r.from_version.is_none(),
        _ => false,
    }
}

async fn propose(
    ctx: &Ctx,
    kind: ParamKind,
    previous: Option<Rollout>,
    next: Rollout,
    started: bool,
) -> Result<(), DriverError> {
    let req =
        Request::RolloutUpdate { kind, previous: previous.map(Box::new), next: Box::new(next), started };
    match ctx.node.write(req, 0).await? {
        Response::RolloutUpdated { .. } => Ok(()),
        other => {
            // An abort or a request overtook this step: the next step starts from the new state.
            tracing::info!(%kind, ?other, "rollout step not applied");
            Ok(())
        }
    }
}

/// Stores the content of `from` as a new version above every stored one, signed now and
/// effective now (the old content was in force before); returns the version.
async fn republish(
    ctx: &Ctx,
    state: &StationState,
    signing: Option<&StationKey>,
    r: &Rollout,
    from: u64,
) -> Result<u64, DriverError> {
    let key = signing.ok_or(DriverError::NoSigningKey)?;
    let kind = r.kind;
    let version = packages::next_version(state, kind, r.to_version);
    let read = |v: u64| -> Result<Package, DriverError> {
        let bytes = ctx.node.sm.package(kind, v)?.ok_or(DriverError::Missing { kind, version: v })?;
        Package::decode(&bytes).map_err(|e| DriverError::Republish { kind, detail: e.to_string() })
    };
    let old = read(from)?;
    let body = if kind == ParamKind::Blacklist {
        blacklist_back(&read(r.to_version)?, &old, r.to_version, version)
            .map_err(|detail| DriverError::Republish { kind, detail })?
    } else {
        old.body
    };
    // No audit line and no rollout request: the rollback that asks for this is on record, and
    // steers what gates are pointed at.
    let prepared =
        packages::prepare(&ctx.node, key, (kind, version, now()), body, "rollout-driver", RolloutRule::None)?;
    match prepared.commit(&ctx.node, None).await?.stored {
        Response::PackageStored { .. } => Ok(version),
        other => Err(DriverError::Republish { kind, detail: format!("{other:?}") }),
    }
}

/// A blacklist body that brings gates holding `held` (the rolled-out version)
/// back to the content of `old`, as version `version`: the old full list under the new version,
/// or, when the rolled-out package was a delta on the old version, its inverse.
fn blacklist_back(new: &Package, old: &Package, held: u64, version: u64) -> Result<Vec<u8>, String> {
    let old_body = BlacklistBody::decode(&old.body).map_err(|e| e.to_string())?;
    let new_body = BlacklistBody::decode(&new.body).map_err(|e| e.to_string())?;
    match (old_body, new_body) {
        (BlacklistBody::Full(list), _) => {
            Ok(BlacklistBody::Full(Blacklist::from_entries(version, list.entries())).encode())
        }
        (BlacklistBody::Delta(_), BlacklistBody::Delta(d)) if d.to_version == held => {
            let back =
                BlacklistDelta { from_version: held, to_version: version, add: d.remove, remove: d.add };
            Ok(BlacklistBody::Delta(back.normalized()).encode())
        }
        _ => {
            Err("the old version is a delta and the new one is not its direct successor: upload a full list"
                .into())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use afc_domain::blacklist::Entry;
    use afc_domain::model::{Media, Timestamp};
    use ed25519_dalek::SigningKey;

    use super::*;

    fn package(version: u64, body: BlacklistBody) -> Package {
        let key = SigningKey::from_bytes(&[7; 32]);
        Package::sign(ParamKind::Blacklist, version, Timestamp(0), body.encode(), 1, &key)
    }

    fn ids(list: &Blacklist) -> Vec<u64> {
        list.entries().flat_map(|e| e.first..=e.last).collect()
    }

    #[test]
    fn a_blacklist_rollback_republishes_the_old_full_list_or_the_inverse_of_the_delta() {
        let old_list =
            Blacklist::from_entries(3, [Entry::single(Media::Svc, 10), Entry::single(Media::Svc, 20)]);
        let delta = BlacklistDelta {
            from_version: 3,
            to_version: 4,
            add: vec![Entry::single(Media::Svc, 30)],
            remove: vec![Entry::single(Media::Svc, 10)],
        };
        let old = package(3, BlacklistBody::Full(old_list.clone()));
        let new = package(4, BlacklistBody::Delta(delta.clone()));
        // The old list under the new version.
        let back = BlacklistBody::decode(&blacklist_back(&new, &old, 4, 5).unwrap()).unwrap();
        let BlacklistBody::Full(list) = back else { panic!("{back:?}") };
        assert_eq!((list.version(), ids(&list)), (5, ids(&old_list)));
        // Old version a delta too: the inverse delta on top of what gates hold.
        let older = package(
            3,
            BlacklistBody::Delta(BlacklistDelta {
                from_version: 2,
                to_version: 3,
                add: vec![],
                remove: vec![],
            }),
        );
        let back = BlacklistBody::decode(&blacklist_back(&new, &older, 4, 5).unwrap()).unwrap();
        let BlacklistBody::Delta(d) = back else { panic!("{back:?}") };
        assert_eq!((d.from_version, d.to_version), (4, 5));
        assert_eq!((d.add, d.remove), (delta.remove, delta.add));
        // A delta that is not on the held version cannot be undone that way.
        assert!(blacklist_back(&new, &older, 7, 8).is_err());
    }
}
