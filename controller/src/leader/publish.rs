//! Task `leader-publisher`: what the leader keeps retained on the broker for every gate.
//!
//! On every ConnAck (the first connection of a leadership included) it renews the subscriptions
//! and publishes everything afresh: `state` `{leader_node, term, since}`, each kind's current
//! package as chunks and then its pointer (chunks first, pointer last, so a gate that sees the
//! pointer finds every chunk), and `mode`. Afterwards it follows the state machine: every
//! [`POLL`] it checks the last applied log id and, when it moved, publishes what changed. When a
//! kind's version moves on, the old version's chunks are cleared (empty retained payloads); on
//! the first pass of a leadership the chunks of stored but superseded versions are cleared too.
//!
//! The `mode` message carries a `version` that grows with every change (the millisecond time of
//! the change, or one more than the previous version if that is larger), so a gate ignores a
//! stale retained one; an emergency release reaches the broker within one
//! [`POLL`] of being applied here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use afc_domain::mode::ModeBits;
use afc_domain::model::{ParamKind, StationCode, Timestamp};
use afc_domain::package::{self, Package, MAX_CHUNK_BYTES};
use afc_domain::topic::{filters, Topic};
use afc_domain::wire::{self, LeaderState, ModeMessage, ParamPointer, StationState as StateMsg};
use rumqttc::QoS;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::state::StationState;

use super::{now, Ctx};

/// How often the publisher looks for newly applied entries.
pub const POLL: Duration = Duration::from_millis(50);

/// What this session has published.
#[derive(Default)]
struct Published {
    /// Per kind: the version whose pointer is out, and its chunk count.
    params: BTreeMap<ParamKind, (u64, u32)>,
    /// The mode message last published.
    mode: Option<ModeMessage>,
    /// Superseded versions were cleared in this session.
    swept: bool,
}

pub(crate) async fn publisher_task(ctx: Arc<Ctx>, mut conn: watch::Receiver<u64>, stop: CancellationToken) {
    tracing::info!(task = "leader-publisher", term = ctx.term, "started");
    let since = now();
    let mut published = Published::default();
    let mut seen_applied = None;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            r = conn.changed() => {
                if r.is_err() { break; }
                subscribe(&ctx).await;
                let state = StateMsg::Online(LeaderState { leader_node: ctx.node.id, term: ctx.term, since });
                ctx.publish(Topic::State { station: ctx.station.clone() }.to_string(), true, wire::encode(&state)).await;
                // The broker may have lost its retained messages (an embedded broker restarts empty).
                published.params.clear();
                published.mode = None;
                seen_applied = None;
            }
            _ = tick.tick() => {}
        }
        if *conn.borrow() == 0 {
            continue; // not connected yet: everything is published on the ConnAck
        }
        let applied = ctx.node.sm.last_applied();
        if applied == seen_applied && seen_applied.is_some() {
            continue;
        }
        match ctx.node.sm.state() {
            Ok(state) => {
                seen_applied = applied;
                sync(&ctx, &state, &mut published).await;
            }
            Err(e) => tracing::warn!(task = "leader-publisher", error = %e, "cannot read the state machine"),
        }
    }
    tracing::info!(task = "leader-publisher", "stopped");
}

async fn subscribe(ctx: &Ctx) {
    for f in filters::controller_subscriptions(&ctx.station) {
        if let Err(e) = ctx.client.subscribe(f.clone(), QoS::AtLeastOnce).await {
            tracing::warn!(filter = %f, error = %e, "subscribe failed");
        }
    }
}

/// Publishes what differs between the state machine and what this session has published.
async fn sync(ctx: &Ctx, state: &StationState, published: &mut Published) {
    // Mode first: an emergency release must not wait behind a large package.
    let api_code = ctx.node.config.api.station_code;
    let code = ctx.cfg.station_code.or((api_code != 0).then_some(api_code)).map(StationCode);
    let mode = mode_message(state, code);
    if published.mode.as_ref() != Some(&mode) {
        tracing::info!(bits = %mode.bits, version = mode.version, "publishing mode");
        ctx.publish(Topic::Mode { station: ctx.station.clone() }.to_string(), true, wire::encode(&mode))
            .await;
        published.mode = Some(mode);
    }
    for (name, held) in &state.packages {
        let Some(kind) = ParamKind::parse(name) else { continue };
        let current = held.current();
        if current == 0 {
            continue;
        }
        if !published.swept {
            for old in held.versions.iter().filter(|v| **v != current) {
                if let Ok(Some(bytes)) = ctx.node.sm.package(kind, *old) {
                    let chunks = package::split(&bytes, MAX_CHUNK_BYTES).len() as u32;
                    clear_chunks(ctx, kind, *old, chunks).await;
                }
            }
        }
        if published.params.get(&kind).map(|(v, _)| *v) == Some(current) {
            continue;
        }
        let Some(chunks) = publish_package(ctx, kind, current).await else { continue };
        if let Some((old, old_chunks)) = published.params.insert(kind, (current, chunks)) {
            if old != current {
                clear_chunks(ctx, kind, old, old_chunks).await;
            }
        }
        if let Ok(mut b) = ctx.board.write() {
            b.set_desired(kind, current);
        }
    }
    published.swept = true;
}

/// Chunks, then the pointer, of one stored package. Returns the chunk count.
async fn publish_package(ctx: &Ctx, kind: ParamKind, version: u64) -> Option<u32> {
    let bytes = match ctx.node.sm.package(kind, version) {
        Ok(Some(b)) => b,
        Ok(None) => {
            tracing::error!(%kind, version, "current package missing from the store");
            return None;
        }
        Err(e) => {
            tracing::warn!(%kind, version, error = %e, "cannot read package");
            return None;
        }
    };
    let effective_from = match Package::decode(&bytes) {
        Ok(p) => p.header.effective_from,
        Err(e) => {
            tracing::error!(%kind, version, error = %e, "stored package does not decode: not published");
            return None;
        }
    };
    let chunks = package::split(&bytes, MAX_CHUNK_BYTES);
    let count = chunks.len() as u32;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let t = Topic::ParamChunk { station: ctx.station.clone(), kind, version, chunk: i as u32 };
        ctx.publish(t.to_string(), true, chunk).await;
    }
    let pointer = ParamPointer {
        version,
        sha256: hex::encode(package::package_sha256(&bytes)),
        size: bytes.len() as u64,
        chunks: count,
        effective_from,
    };
    let t = Topic::ParamCurrent { station: ctx.station.clone(), kind };
    ctx.publish(t.to_string(), true, wire::encode(&pointer)).await;
    tracing::info!(%kind, version, chunks = count, size = bytes.len(), "package published");
    Some(count)
}

/// Empty retained payloads: the broker forgets the chunks of a version no longer referenced.
async fn clear_chunks(ctx: &Ctx, kind: ParamKind, version: u64, chunks: u32) {
    for chunk in 0..chunks {
        let t = Topic::ParamChunk { station: ctx.station.clone(), kind, version, chunk };
        ctx.publish(t.to_string(), true, Vec::new()).await;
    }
}

/// The `mode` message for `station` (default: the station of the last change) from the state.
pub fn mode_message(state: &StationState, station: Option<StationCode>) -> ModeMessage {
    let station = station.or_else(|| state.mode_changes.last().map(|c| c.station));
    let last = state.mode_changes.iter().rev().find(|c| Some(c.station) == station);
    let (bits, since) = last.map_or((ModeBits::NORMAL, Timestamp(0)), |c| (c.bits, c.at));
    // Monotonic even if a later change carries an earlier time (a leader with a slower clock):
    // each change numbers at least one above the one before.
    let version = state
        .mode_changes
        .iter()
        .fold(0u64, |v, c| v.saturating_add(1).max(u64::try_from(c.at.millis()).unwrap_or(0)));
    ModeMessage { version, bits, since, history_ref: None, history: state.modes.periods.clone() }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::state::ModeChange;

    fn change(bits: ModeBits, at: i64) -> ModeChange {
        ModeChange {
            station: StationCode(1),
            bits,
            reason: String::new(),
            actor: String::new(),
            at: Timestamp(at),
        }
    }

    #[test]
    fn a_mode_change_stamped_earlier_than_the_last_still_gets_a_higher_version() {
        let mut state = StationState::default();
        state.mode_changes.push(change(ModeBits::EMERGENCY_RELEASE, 1_000));
        let first = mode_message(&state, Some(StationCode(1)));
        state.mode_changes.push(change(ModeBits::NORMAL, 900));
        let second = mode_message(&state, Some(StationCode(1)));
        assert_eq!(first.version, 1_000);
        assert!(second.version > first.version);
        assert_eq!(second.bits, ModeBits::NORMAL);
        assert_eq!(second.since, Timestamp(900));
    }

    #[test]
    fn without_any_change_the_mode_is_normal_and_unnumbered() {
        let m = mode_message(&StationState::default(), None);
        assert_eq!((m.bits, m.version), (ModeBits::NORMAL, 0));
    }
}
