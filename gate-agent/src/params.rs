//! The parameter sets a gate decides with (SPEC §4): which versions it holds, pending and active,
//! how a received package is checked and stored, and the switch at `effective_from`.
//!
//! A package is accepted only if it decodes, its signature verifies with a trusted key, its body
//! matches the signed hash and length, its version is above every version held of its kind, and
//! its body parses as its kind (a blacklist delta must apply to exactly the version held).
//! Otherwise it is refused with a reason and the gate keeps what it had.
//!
//! An accepted package whose `effective_from` has passed becomes active at once; a future-dated one
//! is stored as pending and switched by [`Params::in_force`] at its time, whether or not anything
//! upstream answers, and across restarts (both slots are in the store).
//!
//! The active slot holds an envelope `version ‖ effective_from ‖ body`, where the body is what the
//! decision needs: the fare-table encoding, the *materialized* blacklist after any deltas, the
//! QR key JSON, the gate_config JSON.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use afc_domain::blacklist::Blacklist;
use afc_domain::ledger::ParamVersions;
use afc_domain::model::{ParamKind, Timestamp};
use afc_domain::network::FareTable;
use afc_domain::package::{decode_json_body, BlacklistBody, Package, TrustedKeys};
use afc_domain::qr::QrKeySet;
use afc_domain::wire::{GateDirection, KindVersions, ParamState, ParamsAck};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::store::{Slot, Store, StoreError};

/// The `gate_config` body (JSON). Defined here until the domain crate carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateConfigBody {
    /// The aisle direction; the agent's configured direction when absent.
    #[serde(default)]
    pub direction: Option<GateDirection>,
    /// Free the passage after this long without the controllers (SPEC §1); never when absent.
    #[serde(default)]
    pub release_on_controller_loss_secs: Option<u64>,
    /// The hardware profile name the gate should run (informational; shown on the console).
    #[serde(default)]
    pub hardware_profile: Option<String>,
    /// How long after a voided passage (`passage_not_made`: the flaps never opened for an
    /// accepted tap) the same medium may re-tap at this gate, in the same direction, and be let
    /// through once without a second charge; [`DEFAULT_RETAP_WINDOW_SECS`] when absent, 0: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retap_window_secs: Option<u64>,
}

/// The re-tap window after a voided passage when gate_config says nothing.
pub const DEFAULT_RETAP_WINDOW_SECS: u64 = 120;

impl GateConfigBody {
    /// The re-tap window after a voided passage ([`GateConfigBody::retap_window_secs`]).
    pub fn retap_window(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.retap_window_secs.unwrap_or(DEFAULT_RETAP_WINDOW_SECS))
    }
}

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

#[derive(Debug, Clone, Copy)]
struct PendingInfo {
    version: u64,
    effective_from: Timestamp,
}

pub struct Params {
    store: Arc<Store>,
    keys: TrustedKeys,
    metrics: Arc<Metrics>,
    in_force: RwLock<Arc<InForce>>,
    /// Versions active per kind (0 = none).
    active: Mutex<BTreeMap<ParamKind, u64>>,
    pending: Mutex<BTreeMap<ParamKind, PendingInfo>>,
    /// The earliest pending `effective_from` (ms), `i64::MAX` when nothing is pending; checked on
    /// every decision without a lock.
    next_switch: AtomicI64,
    /// The last refused version per kind, so a retained pointer is not downloaded again and again.
    rejected: Mutex<BTreeMap<ParamKind, u64>>,
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

/// A verified package made ready to become active (see [`Params::materialize`]).
struct Materialized {
    /// The blacklist version a delta was applied to.
    held_blacklist: u64,
    /// What the active slot stores: a blacklist always as the full list.
    body: Vec<u8>,
    /// The blacklist itself, already built.
    blacklist: Option<Blacklist>,
}

impl Params {
    /// Loads the held sets from the store. `acks` receives every pending/active/rejected report.
    pub fn open(
        store: Arc<Store>,
        keys: TrustedKeys,
        metrics: Arc<Metrics>,
        acks: mpsc::UnboundedSender<ParamsAck>,
    ) -> Result<Params, ParamsError> {
        let mut f = InForce {
            fares: None,
            blacklist: Arc::new(Blacklist::empty()),
            qr_keys: Arc::new(QrKeySet::empty()),
            gate_config: GateConfigBody::default(),
            versions: ParamVersions::default(),
        };
        let mut active = BTreeMap::new();
        for kind in ParamKind::ALL {
            let Some(bytes) = store.param(kind.as_str(), Slot::Active)? else { continue };
            // An unreadable stored set must not keep the gate from starting (a crash loop would
            // also stop every other kind and the outbox): the kind starts as never received, the
            // fault is logged and counted, and the retained pointer brings the package again.
            let installed = open_envelope(&bytes).ok_or_else(|| "short envelope".to_owned()).and_then(
                |(version, _, body)| {
                    Self::install(&mut f, kind, body).map(|()| version).map_err(|r| r.message)
                },
            );
            let version = match installed {
                Ok(v) => v,
                Err(reason) => {
                    tracing::error!(%kind, %reason, "stored active package unreadable; starting without it");
                    metrics.event("stored_package_unreadable");
                    continue;
                }
            };
            set_version(&mut f.versions, kind, version);
            active.insert(kind, version);
            metrics.set_param_version(kind.as_str(), "active", version);
        }
        let p = Params {
            store,
            keys,
            metrics,
            in_force: RwLock::new(Arc::new(f)),
            active: Mutex::new(active),
            pending: Mutex::new(BTreeMap::new()),
            next_switch: AtomicI64::new(i64::MAX),
            rejected: Mutex::new(BTreeMap::new()),
            acks,
        };
        for kind in ParamKind::ALL {
            let Some(bytes) = p.store.param(kind.as_str(), Slot::Pending)? else { continue };
            match Package::decode(&bytes) {
                Ok(pkg) => {
                    p.note_pending(kind, pkg.header.version, pkg.header.effective_from);
                }
                Err(e) => tracing::warn!(%kind, error = %e, "stored pending package unreadable; ignored"),
            }
        }
        Ok(p)
    }

    /// Puts one kind's active body into a set in force.
    fn install(f: &mut InForce, kind: ParamKind, body: &[u8]) -> Result<(), Rejection> {
        match kind {
            ParamKind::FareTable => {
                let t = FareTable::decode(body)
                    .map_err(|e| Rejection::new("fare_table_invalid", e.to_string()))?;
                f.fares = Some(Arc::new(t));
            }
            ParamKind::Blacklist => {
                let b = Blacklist::decode(body).map_err(|e| Rejection::new(e.code(), e.to_string()))?;
                f.blacklist = Arc::new(b);
            }
            ParamKind::QrKeys => {
                let k = QrKeySet::from_json(body)
                    .map_err(|e| Rejection::new("qr_keys_invalid", e.to_string()))?;
                f.qr_keys = Arc::new(k);
            }
            ParamKind::GateConfig => {
                f.gate_config =
                    decode_json_body(body).map_err(|e| Rejection::new(e.code(), e.to_string()))?;
            }
            ParamKind::Mode => {}
        }
        Ok(())
    }

    fn note_pending(&self, kind: ParamKind, version: u64, effective_from: Timestamp) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(kind, PendingInfo { version, effective_from });
        self.metrics.set_param_version(kind.as_str(), "pending", version);
        self.next_switch.fetch_min(effective_from.millis(), Ordering::SeqCst);
    }

    fn report(&self, kind: ParamKind, version: u64, state: ParamState, reason: Option<String>) {
        let _ = self.acks.send(ParamsAck { kind, version, state, reason });
    }

    /// The parameters in force at `now`, switching any pending set that became due first.
    pub fn in_force(&self, now: Timestamp) -> Arc<InForce> {
        if now.millis() >= self.next_switch.load(Ordering::SeqCst) {
            self.activate_due(now);
        }
        self.in_force.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The highest version held of a kind, active or pending.
    pub fn held(&self, kind: ParamKind) -> u64 {
        let a = self.active.lock().unwrap_or_else(|p| p.into_inner()).get(&kind).copied().unwrap_or(0);
        let p = self.pending.lock().unwrap_or_else(|p| p.into_inner()).get(&kind).map_or(0, |p| p.version);
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
        let refused = self.rejected.lock().unwrap_or_else(|p| p.into_inner()).get(&kind) == Some(&version);
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner()).get(&kind).copied();
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner()).get(&kind).map(|p| p.version);
        !refused && active != Some(version) && pending != Some(version)
    }

    /// Per kind, the versions held (for the birth message and heartbeats).
    pub fn versions(&self) -> BTreeMap<ParamKind, KindVersions> {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner()).clone();
        ParamKind::ALL
            .into_iter()
            .map(|k| {
                let p = pending.get(&k);
                (
                    k,
                    KindVersions {
                        active: active.get(&k).copied(),
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
        self.rejected.lock().unwrap_or_else(|p| p.into_inner()).insert(kind, version);
        self.report(kind, version, ParamState::Rejected, Some(format!("{}: {}", r.code, r.message)));
    }

    /// Checks a reassembled package announced as `kind` version `version` and stores it; returns
    /// the state it is now in. A refusal is reported and counted here.
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
        let pkg = Package::decode_verified(bytes, kind, &self.keys, Some(self.held(kind)))
            .map_err(|e| Rejection::new(e.code(), e.to_string()))?;
        let h = pkg.header;
        if h.kind != kind || h.version != version {
            return Err(Rejection::new(
                "pointer_mismatch",
                format!("pointer announced {kind} v{version}, package is {} v{}", h.kind, h.version),
            ));
        }
        // The body must parse now, so a bad body is refused on arrival, not at its switch time.
        let held_blacklist = self.in_force.read().unwrap_or_else(|p| p.into_inner()).blacklist.version();
        let materialized = self.materialize(&pkg, held_blacklist)?;
        let store_err = |e: StoreError| Rejection::new("storage_error", e.to_string());
        if h.effective_from <= now {
            self.activate_materialized(&pkg, materialized)
                .map_err(|e| Rejection::new("activation_failed", e.message))?;
            Ok(ParamState::Active)
        } else {
            self.store.put_param(kind.as_str(), Slot::Pending, bytes).map_err(store_err)?;
            self.note_pending(kind, h.version, h.effective_from);
            tracing::info!(%kind, version, effective_from = h.effective_from.millis(), "package pending");
            self.report(kind, version, ParamState::Pending, None);
            Ok(ParamState::Pending)
        }
    }

    /// The active-slot body of a verified package, given the blacklist version it would apply to;
    /// for a blacklist also the list itself, so activation need not decode it again.
    fn materialize(&self, pkg: &Package, held_blacklist: u64) -> Result<Materialized, Rejection> {
        let kind = pkg.header.kind;
        match kind {
            ParamKind::Blacklist => {
                let list = match BlacklistBody::from_package(pkg)
                    .map_err(|e| Rejection::new(e.code(), e.to_string()))?
                {
                    BlacklistBody::Full(list) => list,
                    BlacklistBody::Delta(delta) => {
                        delta
                            .check_applies_to(held_blacklist)
                            .map_err(|e| Rejection::new(e.code(), e.to_string()))?;
                        let mut list =
                            (*self.in_force.read().unwrap_or_else(|p| p.into_inner()).blacklist).clone();
                        list.apply_delta(&delta).map_err(|e| Rejection::new(e.code(), e.to_string()))?;
                        list
                    }
                };
                Ok(Materialized { held_blacklist, body: list.encode(), blacklist: Some(list) })
            }
            _ => {
                let mut scratch = InForce {
                    fares: None,
                    blacklist: Arc::new(Blacklist::empty()),
                    qr_keys: Arc::new(QrKeySet::empty()),
                    gate_config: GateConfigBody::default(),
                    versions: ParamVersions::default(),
                };
                Self::install(&mut scratch, kind, &pkg.body)?;
                Ok(Materialized { held_blacklist, body: pkg.body.clone(), blacklist: None })
            }
        }
    }

    fn activate(&self, pkg: &Package) -> Result<(), Rejection> {
        let held_blacklist = self.in_force.read().unwrap_or_else(|p| p.into_inner()).blacklist.version();
        let m = self.materialize(pkg, held_blacklist)?;
        self.activate_materialized(pkg, m)
    }

    /// Activates `pkg` with its body already materialized (built again if the blacklist it was
    /// built on has changed meanwhile).
    fn activate_materialized(&self, pkg: &Package, m: Materialized) -> Result<(), Rejection> {
        let h = pkg.header;
        let held_now = self.in_force.read().unwrap_or_else(|p| p.into_inner()).blacklist.version();
        let m = if h.kind == ParamKind::Blacklist && m.held_blacklist != held_now {
            self.materialize(pkg, held_now)?
        } else {
            m
        };
        let body = m.body;
        let env = envelope(h.version, h.effective_from, &body);
        let clear_pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&h.kind)
            .is_some_and(|p| p.version <= h.version);
        self.store
            .set_active(h.kind.as_str(), &env, clear_pending)
            .map_err(|e| Rejection::new("storage_error", e.to_string()))?;
        {
            let mut guard = self.in_force.write().unwrap_or_else(|p| p.into_inner());
            let mut next = (**guard).clone();
            match m.blacklist {
                Some(list) => next.blacklist = Arc::new(list),
                None => Self::install(&mut next, h.kind, &body)?,
            }
            set_version(&mut next.versions, h.kind, h.version);
            *guard = Arc::new(next);
        }
        self.active.lock().unwrap_or_else(|p| p.into_inner()).insert(h.kind, h.version);
        if clear_pending {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&h.kind);
            self.metrics.set_param_version(h.kind.as_str(), "pending", 0);
        }
        self.metrics.set_param_version(h.kind.as_str(), "active", h.version);
        tracing::info!(kind = %h.kind, version = h.version, "parameters active");
        self.report(h.kind, h.version, ParamState::Active, None);
        Ok(())
    }

    /// Switches every pending set whose time has come.
    pub fn activate_due(&self, now: Timestamp) {
        let due: Vec<ParamKind> = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, p)| p.effective_from <= now)
            .map(|(k, _)| *k)
            .collect();
        for kind in due {
            let bytes = match self.store.param(kind.as_str(), Slot::Pending) {
                Ok(Some(b)) => b,
                Ok(None) => {
                    self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&kind);
                    continue;
                }
                Err(e) => {
                    tracing::error!(%kind, error = %e, "cannot read pending package; will retry");
                    continue;
                }
            };
            let result = Package::decode(&bytes)
                .map_err(|e| Rejection::new(e.code(), e.to_string()))
                .and_then(|pkg| self.activate(&pkg).map(|()| pkg.header.version));
            if let Err(r) = result {
                let version = self
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&kind)
                    .map_or(0, |p| p.version);
                let _ = self.store.clear_pending(kind.as_str());
                self.metrics.set_param_version(kind.as_str(), "pending", 0);
                self.reject(kind, version, r);
            }
        }
        let next = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|p| p.effective_from.millis())
            .min();
        self.next_switch.store(next.unwrap_or(i64::MAX), Ordering::SeqCst);
    }

    /// When the next pending set switches, if any.
    pub fn next_switch(&self) -> Option<Timestamp> {
        let v = self.next_switch.load(Ordering::SeqCst);
        (v != i64::MAX).then_some(Timestamp(v))
    }
}
