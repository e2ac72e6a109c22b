//! Task `leader-publisher`: what the leader keeps retained on the broker for every gate.
//!
//! On every ConnAck (the first connection of a leadership included) it renews the subscriptions
//! and publishes everything afresh: `state` `{leader_node, term, since}`, each kind's current
//! package as chunks and then its pointer (chunks first, pointer last, so a gate that sees the
//! pointer finds every chunk), and `mode`. Afterwards it follows the state machine: every
//! [`POLL`] it checks the last applied log id and, when it moved, publishes what changed, and
//! hands the state's gate keys to the dispatcher (which verifies gate messages with them). Which
//! version each pointer names follows the kind's staged rollout (per-gate overrides for the
//! canaries, the station pointer for all; see [`crate::state::RolloutBook`]), or the latest stored
//! version when the kind has none. Chunks no pointer names any more are cleared (empty retained
//! payloads); on the first pass of a leadership the chunks of stored but unreferenced versions
//! and the overrides of registered gates that should have none are cleared too.
//!
//! The `state` messages (this session's online state, and its will, sealed once at connect in
//! [`super::mqtt::options`]) are sealed with the station key, so a forged retained `state` can
//! neither hide the controllers' loss from the gates nor fake it. The `mode` message is sealed
//! with the station key ([`super::StationKey`]; gates take no other) and carries a `version` that grows with every change (the millisecond time of
//! the change, or one more than the previous version if that is larger), so a gate ignores a
//! stale retained one; an emergency release reaches the broker within one
//! [`POLL`] of being applied here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use afc_domain::mode::ModeBits;
use afc_domain::model::{Ident, ParamKind, StationCode, Timestamp};
use afc_domain::package::{self, Package, MAX_CHUNK_BYTES};
use afc_domain::topic::{filters, Topic};
use afc_domain::wire::{self, LeaderState, ModeMessage, ParamPointer, StationState as StateMsg};
use rumqttc::QoS;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::state::StationState;

use super::{Ctx, StationKey};
use crate::clock::now;

/// How often the publisher looks for newly applied entries.
pub const POLL: Duration = Duration::from_millis(50);

/// What this session has published.
#[derive(Default)]
struct Published {
    /// Per kind: the version whose station pointer is out.
    params: BTreeMap<ParamKind, u64>,
    /// Per-gate pointer overrides out (canaries), by kind and gate.
    overrides: BTreeMap<(ParamKind, Ident), u64>,
    /// Versions whose chunks are out, with the pointer that describes them.
    chunks: BTreeMap<(ParamKind, u64), ParamPointer>,
    /// The mode message last published.
    mode: Option<ModeMessage>,
    /// Superseded versions and stale overrides were cleared in this session.
    swept: bool,
}

/// The retained `mode` payload this session last sealed, and a nudge for the publisher when the
/// broker holds another one (the leader subscribes to `mode` for this).
#[derive(Default)]
pub(crate) struct ModeGuard {
    sealed: std::sync::Mutex<Option<Vec<u8>>>,
    overwritten: tokio::sync::Notify,
}

impl ModeGuard {
    fn published(&self, payload: &[u8]) {
        *self.sealed.lock().unwrap_or_else(|p| p.into_inner()) = Some(payload.to_vec());
    }

    /// Whether `payload`, read back from the retained `mode`, is not what this session published;
    /// if so the publisher is nudged to publish it again. Nothing published yet: nothing to restore.
    pub(crate) fn observe(&self, payload: &[u8]) -> bool {
        let ours = self.sealed.lock().unwrap_or_else(|p| p.into_inner());
        let replaced = ours.as_deref().is_some_and(|ours| ours != payload);
        if replaced {
            self.overwritten.notify_one();
        }
        replaced
    }
}

/// What the retained `state` read back from the broker is, against what this session published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StateSeen {
    /// This session has published no `state` yet.
    Unset,
    Ours,
    /// Another payload naming no newer term (an old leader's will or state, cleared, garbled):
    /// the publisher is nudged to publish ours again.
    Other,
    /// A `state` naming a newer term than this session's: this leadership is confirmed again
    /// before anything is restored.
    NewerTerm(u64),
}

/// The retained `state` payload this session published, and a nudge for the publisher when the
/// broker holds another one (the leader subscribes to `state` for this). The real leader thus
/// puts the truth back within [`RESTORE_EVERY`] of an old leader's will or late `state`.
#[derive(Default)]
pub(crate) struct StateGuard {
    sealed: std::sync::Mutex<Option<Vec<u8>>>,
    overwritten: tokio::sync::Notify,
}

impl StateGuard {
    fn published(&self, payload: &[u8]) {
        *self.sealed.lock().unwrap_or_else(|p| p.into_inner()) = Some(payload.to_vec());
    }

    /// Classifies `payload`, read back from the retained `state` on `topic`, for a session of
    /// `term`. Only a `state` sealed with the station key can name a newer term: anything else
    /// (unsigned, forged, garbled) is simply replaced.
    pub(crate) fn observe(&self, topic: &str, payload: &[u8], term: u64, key: &StationKey) -> StateSeen {
        let ours = self.sealed.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ours) = ours.as_deref() else { return StateSeen::Unset };
        if ours == payload {
            return StateSeen::Ours;
        }
        let vk = key.verifying_key();
        let opened =
            afc_domain::signed::open::<StateMsg>(topic, payload, |id| (id == key.key_id).then_some(vk));
        let named = opened.ok().and_then(|s| match s {
            StateMsg::Online(l) => Some(l.term),
            StateMsg::Offline(o) => o.term,
        });
        match named.filter(|t| *t > term) {
            Some(t) => StateSeen::NewerTerm(t),
            None => {
                self.overwritten.notify_one();
                StateSeen::Other
            }
        }
    }

    /// Publish this session's `state` again (a newer term on the broker turned out not to be a
    /// leader's: the leadership was confirmed after it).
    pub(crate) fn restore(&self) {
        if self.sealed.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            self.overwritten.notify_one();
        }
    }
}

/// Shortest pause between two restorations of the retained mode, so a client that keeps
/// overwriting it costs the leader one publication a second at most.
const RESTORE_EVERY: Duration = Duration::from_secs(1);

pub(crate) async fn publisher_task(ctx: Arc<Ctx>, mut conn: watch::Receiver<u64>, stop: CancellationToken) {
    tracing::info!(task = "leader-publisher", term = ctx.term, "started");
    let since = now();
    let mut published = Published::default();
    let mut seen_applied = None;
    // When a scheduled mode window begins or ends next: the mode is published again then.
    let mut next_boundary: Option<Timestamp> = None;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut restored_at: Option<tokio::time::Instant> = None;
    let mut state_restored_at: Option<tokio::time::Instant> = None;
    let state_topic = Topic::State { station: ctx.station.clone() }.to_string();
    let state = ctx.station_key.seal(
        &state_topic,
        &StateMsg::Online(LeaderState { leader_node: ctx.node.id, term: ctx.term, since }),
    );
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = ctx.state_guard.overwritten.notified() => {
                if let Some(at) = state_restored_at {
                    tokio::time::sleep_until(at + RESTORE_EVERY).await;
                }
                state_restored_at = Some(tokio::time::Instant::now());
                if *conn.borrow() != 0 && !stop.is_cancelled() {
                    super::Stats::inc(&ctx.stats.state_restored, 1);
                    ctx.publish(state_topic.clone(), true, state.clone()).await;
                }
            }
            () = ctx.mode_guard.overwritten.notified() => {
                if let Some(at) = restored_at {
                    tokio::time::sleep_until(at + RESTORE_EVERY).await;
                }
                restored_at = Some(tokio::time::Instant::now());
                published.mode = None;
                seen_applied = None;
            }
            r = conn.changed() => {
                if r.is_err() { break; }
                // (Re)connected: a leader that was frozen or cut off may have been deposed
                // meanwhile; nothing is published before a quorum confirms it still leads.
                if let Err(why) = super::confirm_leadership(&ctx.node, ctx.term).await {
                    super::Stats::inc(&ctx.stats.leadership_unconfirmed, 1);
                    tracing::warn!(task = "leader-publisher", term = ctx.term, %why,
                        "connected, but the leadership is not confirmed: stopping duties");
                    ctx.stop.cancel();
                    break;
                }
                subscribe(&ctx).await;
                ctx.state_guard.published(&state);
                ctx.publish(state_topic.clone(), true, state.clone()).await;
                // The broker may have lost its retained messages (an embedded broker restarts empty).
                published.params.clear();
                published.overrides.clear();
                published.chunks.clear();
                published.mode = None;
                seen_applied = None;
            }
            _ = tick.tick() => {}
        }
        if *conn.borrow() == 0 {
            continue; // not connected yet: everything is published on the ConnAck
        }
        let applied = ctx.node.sm.last_applied();
        let boundary_passed = next_boundary.is_some_and(|b| now() >= b);
        if applied == seen_applied && seen_applied.is_some() && !boundary_passed {
            continue;
        }
        match ctx.node.sm.state() {
            Ok(state) => {
                seen_applied = applied;
                next_boundary = sync(&ctx, &state, &mut published).await;
            }
            Err(e) => tracing::warn!(task = "leader-publisher", error = %e, "cannot read the state machine"),
        }
    }
    tracing::info!(task = "leader-publisher", "stopped");
}

async fn subscribe(ctx: &Ctx) {
    // The retained mode and state too: read back, so an overwritten one is restored
    // (`ModeGuard`, `StateGuard`).
    let mode = Topic::Mode { station: ctx.station.clone() }.to_string();
    let state = Topic::State { station: ctx.station.clone() }.to_string();
    for f in filters::controller_subscriptions(&ctx.station).into_iter().chain([mode, state]) {
        if let Err(e) = ctx.client.subscribe(f.clone(), QoS::AtLeastOnce).await {
            tracing::warn!(filter = %f, error = %e, "subscribe failed");
        }
    }
}

/// Publishes what differs between the state machine and what this session has published;
/// returns when a scheduled mode window begins or ends next.
async fn sync(ctx: &Ctx, state: &StationState, published: &mut Published) -> Option<Timestamp> {
    // The dispatcher verifies gate messages with the keys of the state we just read.
    ctx.gate_keys.refresh(&state.gates);
    // Mode first: an emergency release must not wait behind a large package.
    let api_code = ctx.node.config.api.station_code;
    let code = ctx.cfg.station_code.or((api_code != 0).then_some(api_code)).map(StationCode);
    let at = now();
    let mode = mode_message(state, code, at);
    if published.mode.as_ref() != Some(&mode) {
        tracing::info!(bits = %mode.bits, version = mode.version, "publishing mode");
        let topic = Topic::Mode { station: ctx.station.clone() }.to_string();
        let payload = ctx.station_key.seal(&topic, &mode);
        ctx.mode_guard.published(&payload);
        ctx.publish(topic, true, payload).await;
        published.mode = Some(mode);
    }
    for kind in ParamKind::ALL {
        sync_kind(ctx, state, kind, published).await;
    }
    published.swept = true;
    next_mode_boundary(state, code, at)
}

/// One kind's pointers (SPEC §4, §5): the station pointer and the canaries' overrides follow the
/// kind's rollout stage ([`crate::state::RolloutBook`]), or the latest stored version when the
/// kind has no rollout. Chunks go out before any pointer naming them; overrides are cleared
/// before the station pointer moves (a gate then follows the station pointer); chunks no pointer
/// names any more are cleared last.
async fn sync_kind(ctx: &Ctx, state: &StationState, kind: ParamKind, published: &mut Published) {
    let held = state.packages.get(kind.as_str());
    let stored = held.map(|h| h.current()).filter(|v| *v > 0);
    let station = state.rollouts.station_version(kind, stored);
    let overrides: BTreeMap<Ident, u64> = state.rollouts.overrides(kind).into_iter().collect();
    let referenced: BTreeSet<u64> = station.into_iter().chain(overrides.values().copied()).collect();
    if !published.swept {
        // A previous leader may have left chunks of superseded versions and overrides retained.
        for old in held.iter().flat_map(|h| h.versions.iter()).filter(|v| !referenced.contains(v)) {
            if let Ok(Some(bytes)) = ctx.node.sm.package(kind, *old) {
                let chunks = package::split(&bytes, MAX_CHUNK_BYTES).len() as u32;
                clear_chunks(ctx, kind, *old, chunks).await;
            }
        }
        for gate in state.gates.keys() {
            if !overrides.contains_key(gate) {
                let t = Topic::GateParamCurrent { station: ctx.station.clone(), gate: gate.clone(), kind };
                ctx.publish(t.to_string(), true, Vec::new()).await;
            }
        }
    }
    for v in &referenced {
        if let std::collections::btree_map::Entry::Vacant(slot) = published.chunks.entry((kind, *v)) {
            if let Some(pointer) = publish_chunks(ctx, kind, *v).await {
                slot.insert(pointer);
            }
        }
    }
    // Overrides no longer wanted, then new ones, then the station pointer.
    let stale: Vec<Ident> = published
        .overrides
        .keys()
        .filter(|(k, g)| *k == kind && !overrides.contains_key(g))
        .map(|(_, g)| g.clone())
        .collect();
    for gate in stale {
        let t = Topic::GateParamCurrent { station: ctx.station.clone(), gate: gate.clone(), kind };
        ctx.publish(t.to_string(), true, Vec::new()).await;
        published.overrides.remove(&(kind, gate));
    }
    for (gate, v) in &overrides {
        if published.overrides.get(&(kind, gate.clone())) == Some(v) {
            continue;
        }
        let Some(pointer) = published.chunks.get(&(kind, *v)) else { continue };
        let t = Topic::GateParamCurrent { station: ctx.station.clone(), gate: gate.clone(), kind };
        ctx.publish(t.to_string(), true, wire::encode(pointer)).await;
        tracing::info!(%kind, version = v, %gate, "canary override published");
        published.overrides.insert((kind, gate.clone()), *v);
    }
    if let Some(v) = station {
        if published.params.get(&kind) != Some(&v) {
            if let Some(pointer) = published.chunks.get(&(kind, v)) {
                let t = Topic::ParamCurrent { station: ctx.station.clone(), kind };
                ctx.publish(t.to_string(), true, wire::encode(pointer)).await;
                tracing::info!(%kind, version = v, chunks = pointer.chunks, "station pointer published");
                published.params.insert(kind, v);
            }
        }
    }
    let unreferenced: Vec<(u64, u32)> = published
        .chunks
        .iter()
        .filter(|((k, v), _)| *k == kind && !referenced.contains(v))
        .map(|((_, v), p)| (*v, p.chunks))
        .collect();
    for (v, chunks) in unreferenced {
        clear_chunks(ctx, kind, v, chunks).await;
        published.chunks.remove(&(kind, v));
    }
    if let Ok(mut b) = ctx.board.write() {
        if let Some(v) = station {
            b.set_desired(kind, v);
        }
        b.set_overrides(kind, overrides);
    }
}

/// The chunks of one stored package; returns the pointer that describes them.
async fn publish_chunks(ctx: &Ctx, kind: ParamKind, version: u64) -> Option<ParamPointer> {
    let bytes = match ctx.node.sm.package(kind, version) {
        Ok(Some(b)) => b,
        Ok(None) => {
            tracing::error!(%kind, version, "package to publish is missing from the store");
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
    tracing::info!(%kind, version, chunks = count, size = bytes.len(), "package chunks published");
    Some(ParamPointer {
        version,
        sha256: hex::encode(package::package_sha256(&bytes)),
        size: bytes.len() as u64,
        chunks: count,
        effective_from,
    })
}

/// Empty retained payloads: the broker forgets the chunks of a version no longer referenced.
async fn clear_chunks(ctx: &Ctx, kind: ParamKind, version: u64, chunks: u32) {
    for chunk in 0..chunks {
        let t = Topic::ParamChunk { station: ctx.station.clone(), kind, version, chunk };
        ctx.publish(t.to_string(), true, Vec::new()).await;
    }
}

/// The next instant after `now` at which a scheduled window of `station` begins or ends: the
/// publisher publishes the mode again then.
pub fn next_mode_boundary(
    state: &StationState,
    station: Option<StationCode>,
    now: Timestamp,
) -> Option<Timestamp> {
    let station = station.or_else(|| state.mode_changes.last().map(|c| c.station))?;
    state.window_boundaries(station).into_iter().find(|b| *b > now)
}

/// The `mode` message for `station` (default: the station of the last change) at `now`: the bits
/// in force (the changes made at once and the scheduled windows covering `now`), since the last
/// instant they changed.
pub fn mode_message(state: &StationState, station: Option<StationCode>, now: Timestamp) -> ModeMessage {
    let station = station.or_else(|| state.mode_changes.last().map(|c| c.station));
    let passed: Vec<Timestamp> = station
        .map(|s| state.window_boundaries(s).into_iter().filter(|b| *b <= now).collect())
        .unwrap_or_default();
    let last_change = station.and_then(|s| state.last_mode_set(s));
    // The last change made at once holds whatever its time says (a node's clock a little ahead
    // of this one's must not hold back an emergency release); the windows by this clock.
    let windows = station.map_or(ModeBits::NORMAL, |s| state.window_bits(s, now));
    let bits = last_change.map_or(ModeBits::NORMAL, |c| c.bits).with(windows);
    let since =
        last_change.map(|c| c.at).into_iter().chain(passed.iter().copied()).max().unwrap_or(Timestamp(0));
    // Monotonic even if a later change carries an earlier time (a leader with a slower clock):
    // each change numbers at least one above the one before, and so does each window boundary
    // passed.
    let version = state
        .mode_changes
        .iter()
        .map(|c| c.at)
        .chain(passed)
        .fold(0u64, |v, at| v.saturating_add(1).max(u64::try_from(at.millis()).unwrap_or(0)));
    ModeMessage {
        version,
        bits,
        since,
        decided_at: None,
        history_ref: None,
        history: state.modes.periods.clone(),
    }
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
            window: None,
        }
    }

    #[test]
    fn a_mode_change_stamped_earlier_than_the_last_still_gets_a_higher_version() {
        let mut state = StationState::default();
        state.mode_changes.push(change(ModeBits::EMERGENCY_RELEASE, 1_000));
        let first = mode_message(&state, Some(StationCode(1)), Timestamp(2_000));
        state.mode_changes.push(change(ModeBits::NORMAL, 900));
        let second = mode_message(&state, Some(StationCode(1)), Timestamp(2_000));
        assert_eq!(first.version, 1_000);
        assert!(second.version > first.version);
        assert_eq!(second.bits, ModeBits::NORMAL);
        assert_eq!(second.since, Timestamp(900));
    }

    #[test]
    fn a_scheduled_window_is_published_at_its_start_and_at_its_end_each_time_with_a_higher_version() {
        let s = StationCode(1);
        let mut state = StationState::default();
        state.mode_changes.push(change(ModeBits::FARE_FREE, 1_000));
        let window =
            crate::state::ModeWindow { from: Timestamp(5_000), until: Timestamp(9_000), ended_at: None };
        state.mode_changes.push(ModeChange { window: Some(window), ..change(ModeBits::CLOSED, 2_000) });
        let at = |t| mode_message(&state, Some(s), Timestamp(t));
        let (before, during, after) = (at(4_999), at(5_000), at(9_000));
        assert_eq!((before.bits, before.since), (ModeBits::FARE_FREE, Timestamp(1_000)));
        assert_eq!(
            (during.bits, during.since),
            (ModeBits::FARE_FREE.with(ModeBits::CLOSED), Timestamp(5_000))
        );
        assert_eq!((after.bits, after.since), (ModeBits::FARE_FREE, Timestamp(9_000)));
        assert!(before.version < during.version && during.version < after.version);
        assert_eq!(next_mode_boundary(&state, Some(s), Timestamp(4_999)), Some(Timestamp(5_000)));
        assert_eq!(next_mode_boundary(&state, Some(s), Timestamp(5_000)), Some(Timestamp(9_000)));
        assert_eq!(next_mode_boundary(&state, Some(s), Timestamp(9_000)), None);
        // Ended early at 7,000: published again then, not at 9,000.
        state.mode_changes[1].window =
            Some(crate::state::ModeWindow { ended_at: Some(Timestamp(7_000)), ..window });
        assert_eq!(next_mode_boundary(&state, Some(s), Timestamp(6_000)), Some(Timestamp(7_000)));
        let ended = mode_message(&state, Some(s), Timestamp(7_000));
        assert_eq!((ended.bits, ended.since), (ModeBits::FARE_FREE, Timestamp(7_000)));
    }

    #[test]
    fn only_a_state_sealed_with_the_station_key_can_name_a_newer_term() {
        let key = StationKey::new(3, ed25519_dalek::SigningKey::from_bytes(&[7; 32]));
        let topic = "afc/v1/s1/state";
        let online = |term| StateMsg::Online(LeaderState { leader_node: 2, term, since: Timestamp(5) });
        let guard = StateGuard::default();
        assert!(matches!(guard.observe(topic, &key.seal(topic, &online(9)), 4, &key), StateSeen::Unset));
        let ours = key.seal(topic, &online(4));
        guard.published(&ours);
        assert!(matches!(guard.observe(topic, &ours, 4, &key), StateSeen::Ours));
        assert!(matches!(
            guard.observe(topic, &key.seal(topic, &online(9)), 4, &key),
            StateSeen::NewerTerm(9)
        ));
        // Unsigned, signed by another key, or sealed for another topic: replaced, never a reason
        // to doubt the leadership.
        let other = StationKey::new(3, ed25519_dalek::SigningKey::from_bytes(&[8; 32]));
        for forged in [
            wire::encode(&online(9)),
            other.seal(topic, &online(9)),
            key.seal("afc/v1/s2/state", &online(9)),
            key.seal(topic, &online(3)),
        ] {
            assert!(matches!(guard.observe(topic, &forged, 4, &key), StateSeen::Other));
        }
    }

    #[test]
    fn without_any_change_the_mode_is_normal_and_unnumbered() {
        let m = mode_message(&StationState::default(), None, Timestamp(0));
        assert_eq!((m.bits, m.version), (ModeBits::NORMAL, 0));
    }
}
