//! The parameter sets a gate decides with (SPEC §4): which versions it holds, pending and active,
//! how a received package is checked and stored, and the switch at `effective_from`.
//!
//! A package is accepted only if it decodes, its signature verifies with a trusted key, its body
//! matches the signed hash and length, its version is above every version held of its kind, and
//! its body parses as its kind (a blacklist delta must apply to exactly the version held).
//! Otherwise it is refused with a reason and the gate keeps what it had.
//!
//! An accepted package whose `effective_from` has passed becomes active at once (durably, then in
//! memory); a future-dated one is stored as pending, durably, and *staged*: decoded, and for a
//! blacklist delta applied, when it arrives. The switch at its time is then a swap in memory that
//! [`Params::in_force`] (the tap path) or the `params-persist` task makes, whichever comes first:
//! no decode and no storage on the tap path. The task then makes the activation durable
//! ([`Params::persist`]); until it has, the pending slot is still on disk, so a restart stages
//! the same set again and switches it at once (its time has passed). Whether or not anything
//! upstream answers, and across restarts, the set in force at `now` is the newest one due.
//!
//! Every store write of this module is made under one lock (`io`), in order: an activation
//! switched in memory is made durable before any later package of any kind is stored.
//!
//! The active slot holds an envelope `version ‖ effective_from ‖ body`, where the body is what the
//! decision needs: the fare-table encoding, the QR key JSON, the gate_config JSON, and for the
//! blacklist its *base*: the last full list received (or compacted). Each blacklist delta
//! accepted after it is stored beside it as it came (`version ‖ effective_from ‖ delta`), not
//! merged into a re-encoded list: accepting a 1,000-entry delta writes a few kilobytes. In memory
//! the delta is applied once, when it is staged ([`Blacklist::with_delta`]). At start-up the
//! stored deltas are checked as a chain from the base's version and folded into one
//! ([`BlacklistDelta::then`]), so the base is merged once however many there are. When the
//! deltas pass [`COMPACT_DELTAS`] or [`COMPACT_DELTA_BYTES`], the `params-persist` task writes
//! the list in force as the new base and drops them, in one batch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use afc_domain::backoff::Backoff;
use afc_domain::blacklist::{Blacklist, BlacklistDelta};
use afc_domain::ledger::ParamVersions;
use afc_domain::model::{ParamKind, Timestamp};
use afc_domain::network::FareTable;
use afc_domain::package::{check_version_order, decode_json_body, BlacklistBody, Package, TrustedKeys};
use afc_domain::qr::QrKeySet;
use afc_domain::wire::{KindVersions, ParamState, ParamsAck};
use thiserror::Error;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{Slot, Store, StoreError};

/// The `gate_config` body, defined in the domain crate (the controller's API builds it).
pub use afc_domain::package::{GateConfigBody, DEFAULT_RETAP_WINDOW_SECS};

/// Everything a decision reads from the parameters, swapped whole on a switch.
#[derive(Debug, Clone)]
pub struct InForce {
    /// `None` until the first fare table: taps are refused with `no_parameters`.
    pub fares: Option<Arc<FareTable>>,
    pub blacklist: Arc<Blacklist>,
    pub qr_keys: Arc<QrKeySet>,
    pub gate_config: GateConfigBody,
    pub versions: ParamVersions,
}

impl InForce {
    fn empty() -> InForce {
        InForce {
            fares: None,
            blacklist: Arc::new(Blacklist::empty()),
            qr_keys: Arc::new(QrKeySet::empty()),
            gate_config: GateConfigBody::default(),
            versions: ParamVersions::default(),
        }
    }

    /// Puts one kind's decoded set in force (no decode: the value is ready).
    fn put(&mut self, kind: ParamKind, version: u64, value: &Value) {
        match value {
            Value::Fares(t) => self.fares = Some(t.clone()),
            Value::Blacklist(b) => self.blacklist = b.clone(),
            Value::QrKeys(k) => self.qr_keys = k.clone(),
            Value::GateConfig(c) => self.gate_config = c.clone(),
            Value::Mode => {}
        }
        set_version(&mut self.versions, kind, version);
    }
}

#[derive(Debug, Error)]
pub enum ParamsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored {kind} set is unreadable: {reason}")]
    Corrupt { kind: ParamKind, reason: String },
}

/// Why a package was refused: the stable code for `params/ack` and a message for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: String,
    pub message: String,
}

impl Rejection {
    pub fn new(code: &str, message: impl Into<String>) -> Rejection {
        Rejection { code: code.to_owned(), message: message.into() }
    }
}

/// One kind's set, decoded: what a switch puts in force.
#[derive(Debug, Clone)]
enum Value {
    Fares(Arc<FareTable>),
    /// For a delta, the list it makes (applied to the list it was staged on).
    Blacklist(Arc<Blacklist>),
    QrKeys(Arc<QrKeySet>),
    GateConfig(GateConfigBody),
    /// Mode packages carry nothing the decision reads here.
    Mode,
}

/// A verified package made ready to be put in force without decoding anything again.
#[derive(Debug, Clone)]
struct Staged {
    version: u64,
    effective_from: Timestamp,
    value: Value,
    /// For a blacklist, the version of the list the value was built on (a delta's base).
    blacklist_base: u64,
    /// The package body (every kind but the blacklist stores it as its active body).
    body: Arc<[u8]>,
    /// A blacklist delta (stored beside the base), not a full list (stored as the base).
    delta: bool,
}

/// Compact the blacklist (its list in force written as the new base) past this many deltas ...
pub const COMPACT_DELTAS: usize = 32;
/// ... or past this many bytes of stored deltas.
pub const COMPACT_DELTA_BYTES: usize = 512 * 1024;

/// A blacklist package body is one tag byte, then the list's or the delta's own encoding
/// ([`BlacklistBody::encode`]): what the store keeps.
fn blacklist_encoding(body: &[u8]) -> &[u8] {
    body.get(1..).unwrap_or_default()
}

/// What this module knows of each kind, in memory and on disk. Never held across I/O.
#[derive(Default)]
struct Slots {
    /// Versions in force per kind (0 = none).
    active: BTreeMap<ParamKind, u64>,
    /// Future-dated sets, staged, waiting for their time.
    pending: BTreeMap<ParamKind, Staged>,
    /// Sets switched in memory whose activation is not durable yet: [`Params::persist`]'s work.
    switched: BTreeMap<ParamKind, Staged>,
    /// The version in each kind's durable active slot.
    durable_active: BTreeMap<ParamKind, u64>,
    /// The version in each kind's durable pending slot.
    durable_pending: BTreeMap<ParamKind, u64>,
    /// The last refused version per kind, so a retained pointer is not downloaded again and again.
    rejected: BTreeMap<ParamKind, u64>,
    /// Blacklist deltas stored on the durable base, and their bytes (compaction's measure).
    stored_deltas: usize,
    stored_delta_bytes: usize,
    /// The `effective_from` of the durable blacklist's newest version (kept in a compacted base).
    blacklist_effective_from: Timestamp,
}

pub struct Params {
    store: Arc<Store>,
    keys: TrustedKeys,
    metrics: Arc<Metrics>,
    /// What taps decide with; replaced whole (an `Arc` swap) on every switch.
    in_force: RwLock<Arc<InForce>>,
    slots: Mutex<Slots>,
    /// Held across every store write of this module, so they happen in one order.
    io: Mutex<()>,
    /// The earliest pending `effective_from` (ms), `i64::MAX` when nothing is pending; checked on
    /// every decision without a lock.
    next_switch: AtomicI64,
    /// Wakes the `params-persist` task: a switch in memory waits to be made durable, or the
    /// blacklist's stored deltas are due for compaction.
    wake: Notify,
    /// `params/ack` reports for the MQTT task to publish.
    acks: mpsc::UnboundedSender<ParamsAck>,
}

fn envelope(version: u64, effective_from: Timestamp, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&effective_from.millis().to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn open_envelope(bytes: &[u8]) -> Option<(u64, Timestamp, &[u8])> {
    let version = u64::from_be_bytes(bytes.get(0..8)?.try_into().ok()?);
    let eff = i64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
    Some((version, Timestamp(eff), bytes.get(16..)?))
}

fn set_version(v: &mut ParamVersions, kind: ParamKind, version: u64) {
    match kind {
        ParamKind::FareTable => v.fare_table = version,
        ParamKind::Blacklist => v.blacklist = version,
        ParamKind::QrKeys => v.qr_keys = version,
        ParamKind::GateConfig => v.gate_config = version,
        ParamKind::Mode => v.mode = version,
    }
}

/// Decodes one kind's active body (every kind but the blacklist, whose body is its own).
fn decode_value(kind: ParamKind, body: &[u8]) -> Result<Value, Rejection> {
    Ok(match kind {
        ParamKind::FareTable => Value::Fares(Arc::new(
            FareTable::decode(body).map_err(|e| Rejection::new("fare_table_invalid", e.to_string()))?,
        )),
        ParamKind::Blacklist => Value::Blacklist(Arc::new(
            Blacklist::decode(body).map_err(|e| Rejection::new(e.code(), e.to_string()))?,
        )),
        ParamKind::QrKeys => Value::QrKeys(Arc::new(
            QrKeySet::from_json(body).map_err(|e| Rejection::new("qr_keys_invalid", e.to_string()))?,
        )),
        ParamKind::GateConfig => {
            Value::GateConfig(decode_json_body(body).map_err(|e| Rejection::new(e.code(), e.to_string()))?)
        }
        ParamKind::Mode => Value::Mode,
    })
}

impl Params {
    /// Loads the held sets from the store: the active ones in force, the pending ones staged.
    /// `acks` receives every pending/active/rejected report.
    pub fn open(
        store: Arc<Store>,
        keys: TrustedKeys,
        metrics: Arc<Metrics>,
        acks: mpsc::UnboundedSender<ParamsAck>,
    ) -> Result<Params, ParamsError> {
        let mut f = InForce::empty();
        let mut slots = Slots::default();
        for kind in ParamKind::ALL {
            let Some(bytes) = store.param(kind.as_str(), Slot::Active)? else { continue };
            // An unreadable stored set must not keep the gate from starting (a crash loop would
            // also stop every other kind and the outbox): the kind starts as never received, the
            // fault is logged and counted, and the retained pointer brings the package again.
            let installed = open_envelope(&bytes).ok_or_else(|| "short envelope".to_owned()).and_then(
                |(version, _, body)| decode_value(kind, body).map(|v| (version, v)).map_err(|r| r.message),
            );
            let (version, value) = match installed {
                Ok(v) => v,
                Err(reason) => {
                    tracing::error!(%kind, %reason, "stored active package unreadable; starting without it");
                    metrics.event("stored_package_unreadable");
                    continue;
                }
            };
            let (version, value) = match value {
                Value::Blacklist(base) => {
                    let list = Self::with_stored_deltas(&store, &metrics, &mut slots, base)?;
                    (list.version(), Value::Blacklist(list))
                }
                other => (version, other),
            };
            f.put(kind, version, &value);
            slots.active.insert(kind, version);
            slots.durable_active.insert(kind, version);
            metrics.set_param_version(kind.as_str(), "active", version);
        }
        let p = Params {
            store,
            keys,
            metrics,
            in_force: RwLock::new(Arc::new(f)),
            slots: Mutex::new(slots),
            io: Mutex::new(()),
            next_switch: AtomicI64::new(i64::MAX),
            wake: Notify::new(),
            acks,
        };
        for kind in ParamKind::ALL {
            let Some(bytes) = p.store.param(kind.as_str(), Slot::Pending)? else { continue };
            let active = p.slots().active.get(&kind).copied().unwrap_or(0);
            let staged = Package::decode(&bytes)
                .map_err(|e| Rejection::new(e.code(), e.to_string()))
                .and_then(|pkg| {
                    if pkg.header.version <= active {
                        return Err(Rejection::new("superseded", format!("v{} is active", active)));
                    }
                    p.stage(&pkg)
                });
            match staged {
                Ok(st) => {
                    p.slots().durable_pending.insert(kind, st.version);
                    p.note_pending(kind, st);
                }
                Err(r) => {
                    // Activated already (a crash after the switch was made durable but before
                    // the slot was cleared cannot happen: one batch), superseded, or unreadable.
                    tracing::warn!(%kind, code = %r.code, message = %r.message, "stored pending package dropped");
                    p.store.clear_pending(kind.as_str())?;
                }
            }
        }
        Ok(p)
    }

    /// The stored blacklist: its base with the deltas stored beside it, checked as a chain from
    /// the base's version and folded into one delta, applied once. A delta that is unreadable or
    /// breaks the chain ends it there (logged and counted); the list starts at the last version
    /// it reaches, and the next compaction drops what lies beyond.
    fn with_stored_deltas(
        store: &Store,
        metrics: &Metrics,
        slots: &mut Slots,
        base: Arc<Blacklist>,
    ) -> Result<Arc<Blacklist>, ParamsError> {
        let stored = store.param_deltas(ParamKind::Blacklist.as_str())?;
        let mut folded: Option<BlacklistDelta> = None;
        for bytes in &stored {
            let step =
                open_envelope(bytes).ok_or_else(|| "short envelope".to_owned()).and_then(|(_, eff, body)| {
                    let d = BlacklistDelta::decode(body).map_err(|e| e.to_string())?;
                    let next = match &folded {
                        None => d.check_applies_to(base.version()).map(|()| d),
                        Some(f) => f.then(&d),
                    };
                    next.map(|n| (n, eff)).map_err(|e| e.to_string())
                });
            match step {
                Ok((next, eff)) => {
                    folded = Some(next);
                    slots.blacklist_effective_from = eff;
                    slots.stored_deltas += 1;
                    slots.stored_delta_bytes += bytes.len();
                }
                Err(reason) => {
                    tracing::error!(%reason, "stored blacklist delta unreadable or out of order; the list starts before it");
                    metrics.event("stored_package_unreadable");
                    // Compacted at the first chance, which drops the deltas from here on.
                    slots.stored_deltas = slots.stored_deltas.max(COMPACT_DELTAS);
                    break;
                }
            }
        }
        let Some(d) = folded else { return Ok(base) };
        // The chain was checked from the base's version, so this cannot fail; if it did, the
        // gate starts on the base (an unreadable stored set must not keep it from starting).
        match base.with_delta(&d) {
            Ok(list) => Ok(Arc::new(list)),
            Err(e) => {
                tracing::error!(error = %e, "stored blacklist deltas do not apply; starting on the base");
                metrics.event("stored_package_unreadable");
                slots.stored_deltas = slots.stored_deltas.max(COMPACT_DELTAS);
                Ok(base)
            }
        }
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        // Every change under this lock is a single map operation: a panic cannot leave it half-done.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn in_force_now(&self) -> Arc<InForce> {
        self.in_force.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Decodes a verified package's body into what a switch puts in force; a blacklist delta is
    /// applied to the list in force now (it must start from exactly its version).
    fn stage(&self, pkg: &Package) -> Result<Staged, Rejection> {
        let h = pkg.header;
        let held = self.in_force_now().blacklist.clone();
        let mut delta = false;
        let value = match h.kind {
            ParamKind::Blacklist => {
                let list = match BlacklistBody::from_package(pkg)
                    .map_err(|e| Rejection::new(e.code(), e.to_string()))?
                {
                    BlacklistBody::Full(list) => list,
                    BlacklistBody::Delta(d) => {
                        delta = true;
                        // Checks that it starts from exactly the version in force.
                        held.with_delta(&d).map_err(|e| Rejection::new(e.code(), e.to_string()))?
                    }
                };
                Value::Blacklist(Arc::new(list))
            }
            kind => decode_value(kind, &pkg.body)?,
        };
        Ok(Staged {
            version: h.version,
            effective_from: h.effective_from,
            value,
            blacklist_base: held.version(),
            body: pkg.body.as_slice().into(),
            delta,
        })
    }

    fn note_pending(&self, kind: ParamKind, staged: Staged) {
        let (version, eff) = (staged.version, staged.effective_from);
        self.slots().pending.insert(kind, staged);
        self.metrics.set_param_version(kind.as_str(), "pending", version);
        self.next_switch.fetch_min(eff.millis(), Ordering::SeqCst);
    }

    fn report(&self, kind: ParamKind, version: u64, state: ParamState, reason: Option<String>) {
        let _ = self.acks.send(ParamsAck { kind, version, state, reason });
    }

    /// The parameters in force at `now`. When a pending set's time has come, it is switched in
    /// memory first (a swap of staged values: no decode, no storage; the `params-persist` task
    /// makes it durable).
    pub fn in_force(&self, now: Timestamp) -> Arc<InForce> {
        if now.millis() >= self.next_switch.load(Ordering::SeqCst) {
            self.switch_due(now);
        }
        self.in_force_now()
    }

    /// Puts every pending set whose time has come in force, in memory, and wakes the
    /// `params-persist` task. Cheap: called on the tap path.
    fn switch_due(&self, now: Timestamp) {
        let mut slots = self.slots();
        let due: Vec<ParamKind> =
            slots.pending.iter().filter(|(_, p)| p.effective_from <= now).map(|(k, _)| *k).collect();
        if !due.is_empty() {
            let mut guard = self.in_force.write().unwrap_or_else(|p| p.into_inner());
            let mut next = (**guard).clone();
            for kind in due {
                let Some(st) = slots.pending.remove(&kind) else { continue };
                self.metrics.set_param_version(kind.as_str(), "pending", 0);
                if st.version <= slots.active.get(&kind).copied().unwrap_or(0) {
                    // Superseded by a newer set activated meanwhile; its slot is cleared then.
                    continue;
                }
                if kind == ParamKind::Blacklist && st.blacklist_base != next.blacklist.version() {
                    // Cannot happen: the list in force changes only by a newer version, which
                    // supersedes this one. Kept off the tap path: dropped, and the pending slot
                    // is refused again when the gate next starts.
                    self.metrics.event("pending_blacklist_base_changed");
                    continue;
                }
                next.put(kind, st.version, &st.value);
                slots.active.insert(kind, st.version);
                self.metrics.set_param_version(kind.as_str(), "active", st.version);
                slots.switched.insert(kind, st);
            }
            *guard = Arc::new(next);
            self.wake.notify_one();
        }
        let next = slots.pending.values().map(|p| p.effective_from.millis()).min();
        self.next_switch.store(next.unwrap_or(i64::MAX), Ordering::SeqCst);
    }

    /// Switches every pending set whose time has come (in memory; see [`Params::in_force`]).
    pub fn activate_due(&self, now: Timestamp) {
        self.switch_due(now);
    }

    /// Makes every switch made in memory durable: the kind's active slot written and its pending
    /// slot cleared in one batch, then the `active` report. Blocking (storage). Returns how many
    /// activations it made durable. Run by the `params-persist` task ([`run_persist`]) and before
    /// any package is stored.
    pub fn persist(&self) -> Result<usize, StoreError> {
        let _io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        self.persist_locked()
    }

    fn persist_locked(&self) -> Result<usize, StoreError> {
        let mut done = 0;
        loop {
            let next = self.slots().switched.iter().next().map(|(k, st)| (*k, st.clone()));
            let Some((kind, st)) = next else { return Ok(done) };
            let durable = self.slots().durable_active.get(&kind).copied().unwrap_or(0);
            if st.version > durable {
                self.write_active(kind, &st)?;
                tracing::info!(%kind, version = st.version, "parameters active (switched at their time)");
                self.report(kind, st.version, ParamState::Active, None);
                done += 1;
            }
            let mut slots = self.slots();
            if slots.switched.get(&kind).is_some_and(|s| s.version == st.version) {
                slots.switched.remove(&kind);
            }
        }
    }

    /// Writes a staged set as its kind's active slot, clearing a pending slot it covers, in one
    /// batch, durably. Called under `io`.
    fn write_active(&self, kind: ParamKind, st: &Staged) -> Result<(), StoreError> {
        let clear_pending = self.slots().durable_pending.get(&kind).is_some_and(|v| *v <= st.version);
        if kind == ParamKind::Blacklist {
            let env = envelope(st.version, st.effective_from, blacklist_encoding(&st.body));
            if st.delta {
                self.store.put_param_delta(kind.as_str(), st.version, &env, clear_pending)?;
            } else {
                self.store.set_active_base(kind.as_str(), &env, clear_pending)?;
            }
            let mut slots = self.slots();
            if st.delta {
                slots.stored_deltas += 1;
                slots.stored_delta_bytes += env.len();
            } else {
                slots.stored_deltas = 0;
                slots.stored_delta_bytes = 0;
            }
            slots.blacklist_effective_from = st.effective_from;
            drop(slots);
            if self.compaction_due() {
                self.wake.notify_one();
            }
        } else {
            let env = envelope(st.version, st.effective_from, &st.body);
            self.store.set_active(kind.as_str(), &env, clear_pending)?;
        }
        let mut slots = self.slots();
        slots.durable_active.insert(kind, st.version);
        if clear_pending {
            slots.durable_pending.remove(&kind);
        }
        Ok(())
    }

    /// Past [`COMPACT_DELTAS`] or [`COMPACT_DELTA_BYTES`], writes the blacklist in force as the
    /// new durable base and drops the stored deltas, in one batch ([`Params::compact_blacklist`]).
    /// Blocking (encodes the list, stores it): run by the `params-persist` task.
    pub fn compact_if_due(&self) -> Result<bool, StoreError> {
        if self.compaction_due() {
            self.compact_blacklist()
        } else {
            Ok(false)
        }
    }

    fn compaction_due(&self) -> bool {
        let s = self.slots();
        s.stored_deltas >= COMPACT_DELTAS || s.stored_delta_bytes >= COMPACT_DELTA_BYTES
    }

    /// Writes the blacklist in force as the new durable base, dropping the stored deltas; `false`
    /// when there is nothing to compact or the list in force is not the durable one yet.
    pub fn compact_blacklist(&self) -> Result<bool, StoreError> {
        let _io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        let list = self.in_force_now().blacklist.clone();
        let eff = {
            let s = self.slots();
            let durable = s.durable_active.get(&ParamKind::Blacklist).copied().unwrap_or(0);
            if s.stored_deltas == 0 || durable != list.version() {
                return Ok(false);
            }
            s.blacklist_effective_from
        };
        let env = envelope(list.version(), eff, &list.encode());
        self.store.set_active_base(ParamKind::Blacklist.as_str(), &env, false)?;
        let mut s = self.slots();
        tracing::info!(
            version = list.version(),
            deltas = s.stored_deltas,
            "blacklist deltas compacted into the base"
        );
        s.stored_deltas = 0;
        s.stored_delta_bytes = 0;
        Ok(true)
    }

    /// The highest version held of a kind, active or pending.
    pub fn held(&self, kind: ParamKind) -> u64 {
        let s = self.slots();
        let a = s.active.get(&kind).copied().unwrap_or(0);
        let p = s.pending.get(&kind).map_or(0, |p| p.version);
        a.max(p)
    }

    /// The station keys this gate trusts (`[trusted_keys]`): they sign packages and every control
    /// message (`mode`, `cmd`, `tx/ack`, `qr/used`).
    pub fn trusted_keys(&self) -> &TrustedKeys {
        &self.keys
    }

    /// Whether a pointer to this version is worth downloading: any version not held and not
    /// refused already. An older one is downloaded too, so its refusal (version order) is
    /// reported once instead of being ignored silently.
    pub fn wants(&self, kind: ParamKind, version: u64) -> bool {
        let s = self.slots();
        let refused = s.rejected.get(&kind) == Some(&version);
        let active = s.active.get(&kind).copied();
        let pending = s.pending.get(&kind).map(|p| p.version);
        !refused && active != Some(version) && pending != Some(version)
    }

    /// Per kind, the versions held (for the birth message and heartbeats).
    pub fn versions(&self) -> BTreeMap<ParamKind, KindVersions> {
        let s = self.slots();
        ParamKind::ALL
            .into_iter()
            .map(|k| {
                let p = s.pending.get(&k);
                (
                    k,
                    KindVersions {
                        active: s.active.get(&k).copied(),
                        pending: p.map(|p| p.version),
                        pending_effective_from: p.map(|p| p.effective_from),
                    },
                )
            })
            .collect()
    }

    /// Records a refusal: metric, log, report.
    pub fn reject(&self, kind: ParamKind, version: u64, r: Rejection) {
        tracing::warn!(%kind, version, code = %r.code, message = %r.message, "package refused");
        self.metrics.param_rejected(kind.as_str());
        self.slots().rejected.insert(kind, version);
        self.report(kind, version, ParamState::Rejected, Some(format!("{}: {}", r.code, r.message)));
    }

    /// Checks a reassembled package announced as `kind` version `version` and stores it; returns
    /// the state it is now in. A refusal is reported and counted here. Blocking (storage).
    pub fn offer(
        &self,
        kind: ParamKind,
        version: u64,
        bytes: &[u8],
        now: Timestamp,
    ) -> Result<ParamState, Rejection> {
        let r = self.check_and_store(kind, version, bytes, now);
        if let Err(rej) = &r {
            self.reject(kind, version, rej.clone());
        }
        r
    }

    fn check_and_store(
        &self,
        kind: ParamKind,
        version: u64,
        bytes: &[u8],
        now: Timestamp,
    ) -> Result<ParamState, Rejection> {
        let store_err = |e: StoreError| Rejection::new("storage_error", e.to_string());
        let pkg = Package::decode_verified(bytes, kind, &self.keys, Some(self.held(kind)))
            .map_err(|e| Rejection::new(e.code(), e.to_string()))?;
        let h = pkg.header;
        if h.kind != kind || h.version != version {
            return Err(Rejection::new(
                "pointer_mismatch",
                format!("pointer announced {kind} v{version}, package is {} v{}", h.kind, h.version),
            ));
        }
        let _io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        // What is due is switched and made durable first, so the store keeps the order of events
        // and the checks below see the sets in force now.
        self.switch_due(now);
        self.persist_locked().map_err(store_err)?;
        check_version_order(kind, Some(self.held(kind)), h.version)
            .map_err(|e| Rejection::new(e.code(), e.to_string()))?;
        // The body must parse now, so a bad body is refused on arrival, not at its switch time.
        let staged = self.stage(&pkg)?;
        if h.effective_from <= now {
            self.write_active(kind, &staged).map_err(store_err)?;
            {
                let mut slots = self.slots();
                let mut guard = self.in_force.write().unwrap_or_else(|p| p.into_inner());
                let mut next = (**guard).clone();
                next.put(kind, h.version, &staged.value);
                *guard = Arc::new(next);
                slots.active.insert(kind, h.version);
                if slots.pending.get(&kind).is_some_and(|p| p.version <= h.version) {
                    slots.pending.remove(&kind);
                    self.metrics.set_param_version(kind.as_str(), "pending", 0);
                }
            }
            self.metrics.set_param_version(kind.as_str(), "active", h.version);
            tracing::info!(%kind, version = h.version, "parameters active");
            self.report(kind, h.version, ParamState::Active, None);
            Ok(ParamState::Active)
        } else {
            self.store.put_param(kind.as_str(), Slot::Pending, bytes).map_err(store_err)?;
            self.slots().durable_pending.insert(kind, h.version);
            self.note_pending(kind, staged);
            tracing::info!(%kind, version, effective_from = h.effective_from.millis(), "package pending");
            self.report(kind, version, ParamState::Pending, None);
            Ok(ParamState::Pending)
        }
    }

    /// When the next pending set switches, if any.
    pub fn next_switch(&self) -> Option<Timestamp> {
        let v = self.next_switch.load(Ordering::SeqCst);
        (v != i64::MAX).then_some(Timestamp(v))
    }
}

/// How often the `params-persist` task looks for a pending set whose time has come when no tap
/// has switched it.
const SWITCH_TICK: Duration = Duration::from_millis(100);

/// Task `params-persist`: switches pending sets at their time when no tap does, makes every
/// switch made in memory durable ([`Params::persist`], on a blocking thread) and compacts the
/// blacklist's stored deltas when due ([`Params::compact_if_due`]), retrying with
/// backoff while the store fails (counted in `afc_gate_events_total{kind="params_persist_failed"}`).
pub async fn run_persist(params: Arc<Params>, cancel: CancellationToken) {
    tracing::info!("params-persist task started");
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut tick = tokio::time::interval(SWITCH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = params.wake.notified() => {}
            _ = tick.tick() => params.switch_due(crate::clock::now()),
        }
        if params.slots().switched.is_empty() && !params.compaction_due() {
            continue;
        }
        let p = params.clone();
        match tokio::task::spawn_blocking(move || p.persist().and_then(|_| p.compact_if_due())).await {
            Ok(Ok(_)) => backoff.reset(),
            Ok(Err(e)) => {
                params.metrics.event("params_persist_failed");
                let wait = backoff.next_wait();
                tracing::error!(error = %e, retry_in = ?wait, "cannot make a parameter switch durable; will retry");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => tracing::error!(error = %e, "params-persist step panicked; will retry"),
        }
    }
    tracing::info!("params-persist task stopped");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use afc_domain::blacklist::Entry;
    use afc_domain::model::Media;
    use ed25519_dalek::SigningKey;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn open(dir: &std::path::Path) -> (Arc<Store>, Params) {
        let store = Arc::new(Store::open(dir, 1 << 20).unwrap());
        let mut keys = TrustedKeys::new();
        keys.insert(1, key().verifying_key());
        let (tx, rx) = mpsc::unbounded_channel();
        std::mem::forget(rx);
        let p = Params::open(store.clone(), keys, Metrics::new(), tx).unwrap();
        (store, p)
    }

    fn package(kind: ParamKind, version: u64, at: Timestamp, body: Vec<u8>) -> Vec<u8> {
        Package::sign(kind, version, at, body, 1, &key()).encode()
    }

    fn gate_config(retap_window_secs: u64) -> Vec<u8> {
        let c = GateConfigBody { retap_window_secs: Some(retap_window_secs), ..GateConfigBody::default() };
        afc_domain::package::encode_json_body(&c).unwrap()
    }

    fn blacklist(version: u64, ids: &[u64]) -> Vec<u8> {
        let list = Blacklist::from_entries(version, ids.iter().map(|&id| Entry::single(Media::Svc, id)));
        BlacklistBody::Full(list).encode()
    }

    #[test]
    fn a_pending_set_switches_on_time_with_no_store_access_on_the_tap_path_and_is_made_durable_after() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Timestamp(1_800_000_000_000);
        let at = Timestamp(t0.0 + 1_000);
        {
            let (store, p) = open(dir.path());
            p.offer(ParamKind::GateConfig, 1, &package(ParamKind::GateConfig, 1, t0, gate_config(5)), t0)
                .unwrap();
            p.offer(ParamKind::Blacklist, 1, &package(ParamKind::Blacklist, 1, t0, blacklist(1, &[10])), t0)
                .unwrap();
            let later = [
                (ParamKind::GateConfig, package(ParamKind::GateConfig, 2, at, gate_config(9))),
                (ParamKind::Blacklist, package(ParamKind::Blacklist, 2, at, blacklist(2, &[10, 20]))),
            ];
            for (kind, bytes) in later {
                assert_eq!(p.offer(kind, 2, &bytes, t0).unwrap(), ParamState::Pending);
            }
            // From here on every store call fails: the tap path must not make any.
            store.fail_for_test();
            let before = p.in_force(Timestamp(at.0 - 1));
            assert_eq!((before.versions.gate_config, before.versions.blacklist), (1, 1));
            assert!(!before.blacklist.contains(Media::Svc, 20));
            let after = p.in_force(at);
            assert_eq!((after.versions.gate_config, after.versions.blacklist), (2, 2));
            assert_eq!(after.gate_config.retap_window_secs, Some(9));
            assert!(after.blacklist.contains(Media::Svc, 20));
            assert_eq!(p.versions()[&ParamKind::Blacklist].active, Some(2));
            // Making it durable needs the store: it fails while the store does, and is kept.
            assert!(p.persist().is_err());
            assert!(store.recover().unwrap());
            assert_eq!(p.persist().unwrap(), 2);
            assert_eq!(p.persist().unwrap(), 0, "nothing left to make durable");
        }
        // After a restart the switched sets are the active ones, with nothing pending.
        let (_store, p) = open(dir.path());
        let f = p.in_force(t0);
        assert_eq!((f.versions.gate_config, f.versions.blacklist), (2, 2));
        assert!(f.blacklist.contains(Media::Svc, 20));
        assert_eq!(p.versions()[&ParamKind::GateConfig].pending, None);
        assert_eq!(p.next_switch(), None);
    }

    fn delta(from: u64, to: u64, add: &[u64], remove: &[u64]) -> Vec<u8> {
        let e = |ids: &[u64]| ids.iter().map(|&id| Entry::single(Media::Svc, id)).collect();
        BlacklistBody::Delta(BlacklistDelta {
            from_version: from,
            to_version: to,
            add: e(add),
            remove: e(remove),
        })
        .encode()
    }

    fn stored_base_version(store: &Store) -> u64 {
        let bytes = store.param("blacklist", Slot::Active).unwrap().unwrap();
        open_envelope(&bytes).unwrap().0
    }

    #[test]
    fn blacklist_deltas_are_stored_beside_the_base_rebuilt_on_restart_and_compacted_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Timestamp(1_800_000_000_000);
        let offer = |p: &Params, v: u64, body: Vec<u8>| {
            p.offer(ParamKind::Blacklist, v, &package(ParamKind::Blacklist, v, t0, body), t0)
        };
        {
            let (store, p) = open(dir.path());
            offer(&p, 1, blacklist(1, &[10, 30])).unwrap();
            offer(&p, 2, delta(1, 2, &[20], &[])).unwrap();
            offer(&p, 3, delta(2, 3, &[40], &[10])).unwrap();
            // The gate's checks stay: a delta on another version is refused and changes nothing.
            assert!(offer(&p, 5, delta(4, 5, &[50], &[])).unwrap_err().code.contains("delta_gap"));
            let f = p.in_force(t0);
            assert_eq!(f.versions.blacklist, 3);
            assert!(f.blacklist.contains(Media::Svc, 20) && !f.blacklist.contains(Media::Svc, 10));
            // The base was not rewritten: the deltas sit beside it.
            assert_eq!(stored_base_version(&store), 1);
            assert_eq!(store.param_deltas("blacklist").unwrap().len(), 2);
        }
        let (store, p) = open(dir.path());
        let f = p.in_force(t0);
        assert_eq!(f.versions.blacklist, 3);
        let ids = |f: &InForce| [10, 20, 30, 40, 50].map(|id| f.blacklist.contains(Media::Svc, id));
        assert_eq!(ids(&f), [false, true, true, true, false]);
        assert!(p.compact_blacklist().unwrap());
        assert_eq!((stored_base_version(&store), store.param_deltas("blacklist").unwrap().len()), (3, 0));
        // A delta after the compaction applies on the compacted base, across a restart too.
        offer(&p, 4, delta(3, 4, &[50], &[])).unwrap();
        drop((store, p));
        let (store, p) = open(dir.path());
        assert_eq!(ids(&p.in_force(t0)), [false, true, true, true, true]);
        assert_eq!(store.param_deltas("blacklist").unwrap().len(), 1);
        // A full list replaces the base and drops the deltas.
        offer(&p, 5, blacklist(5, &[60])).unwrap();
        assert_eq!((stored_base_version(&store), store.param_deltas("blacklist").unwrap().len()), (5, 0));
    }

    /// gate_config v1 active at `t0`, v2 pending for `at` and switched in memory at `at`, not
    /// made durable yet.
    fn switched_in_memory(dir: &std::path::Path, t0: Timestamp, at: Timestamp) -> (Arc<Store>, Params) {
        let (store, p) = open(dir);
        p.offer(ParamKind::GateConfig, 1, &package(ParamKind::GateConfig, 1, t0, gate_config(5)), t0)
            .unwrap();
        p.offer(ParamKind::GateConfig, 2, &package(ParamKind::GateConfig, 2, at, gate_config(9)), t0)
            .unwrap();
        assert_eq!(p.in_force(at).versions.gate_config, 2);
        (store, p)
    }

    #[test]
    fn a_switch_not_yet_durable_happens_again_at_once_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (t0, at) = (Timestamp(1_800_000_000_000), Timestamp(1_800_000_001_000));
        // The process ends before params-persist ran.
        drop(switched_in_memory(dir.path(), t0, at));
        let (_store, p) = open(dir.path());
        assert_eq!(p.versions()[&ParamKind::GateConfig].pending, Some(2));
        assert_eq!(p.in_force(at).versions.gate_config, 2);
        assert_eq!(p.persist().unwrap(), 1);
    }

    #[test]
    fn a_package_stored_after_a_switch_in_memory_finds_the_switch_durable_first() {
        let dir = tempfile::tempdir().unwrap();
        let (t0, at) = (Timestamp(1_800_000_000_000), Timestamp(1_800_000_001_000));
        {
            let (_store, p) = switched_in_memory(dir.path(), t0, at);
            let v3 = package(ParamKind::GateConfig, 3, Timestamp(at.0 + 60_000), gate_config(11));
            assert_eq!(p.offer(ParamKind::GateConfig, 3, &v3, at).unwrap(), ParamState::Pending);
        }
        let (_store, p) = open(dir.path());
        let v = p.versions()[&ParamKind::GateConfig];
        assert_eq!((v.active, v.pending), (Some(2), Some(3)));
    }
}
