//! The station state machine as pure logic: what each replicated command does.
//!
//! Nothing here touches sled or a socket. [`StationState`] is the small part of the state (heads,
//! counters, gate keys, per-gate progress, package versions, mode history, the clearing cursor); it
//! lives in memory and is written as one value after every applied batch of log entries. The large
//! parts (ledger entries, audit entries, package bodies) are immutable items under the keys built by
//! [`keys`]; applying a command yields the [`Write`]s to make, and the storage module applies them
//! together with the new `StationState` in one atomic sled batch.
//!
//! Every command is deterministic: the same log gives the same state on every node. Rejections are
//! no-ops with a typed reason, never errors: a forged batch must not stop the log.
//!
//! The parts: [`request`] (the commands and answers, a leaf the Raft types are built from),
//! [`keys`] (the tree's key layout), `ledger` (gate batches, prune, a ledger entry's stored
//! form), `gates`, `packages` (versions and piecewise uploads) and `rollouts`; here, the
//! state itself and the dispatch of each command.

use std::collections::BTreeMap;

use afc_domain::mode::{ModeBits, ModePeriod, ModeState, MODE_HISTORY_DAYS};
use afc_domain::model::{Date, Ident, StationCode, Timestamp};
use openraft::{LogId, StoredMembership};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::chain::{LedgerEntry, GENESIS_HASH};
use crate::types::{Node, NodeId};

mod gates;
pub mod keys;
mod ledger;
mod packages;
pub mod request;
mod rollouts;

pub use gates::GateInfo;
use ledger::BatchRef;
pub use ledger::{
    decode_ledger_entry, encode_ledger_entry, KeyConflict, SequenceGap, LEDGER_ITEM_FORMAT,
    MAX_BATCH_RECORDS, MAX_KEPT_CONFLICTS, MAX_PRUNE_PER_COMMAND,
};
pub use packages::{
    PackageVersions, Upload, MAX_PACKAGE_PIECE_BYTES, MAX_UPLOADS, PACKAGE_PIECE_BYTES,
    PACKAGE_VERSIONS_KEPT, UPLOAD_TTL_MS,
};
pub use request::{b64, FeedBody, Rejection, Request, Response, RolloutStart, TxBatchIn};
pub use rollouts::RolloutBook;

/// Where the leader is in clearing's parameter feed (SPEC §8), replicated so a new leader goes on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedState {
    /// The last feed item taken (the `after` of the next pull).
    pub after: u64,
    pub network: Option<FeedBody>,
    pub fare_rule: Option<FeedBody>,
    /// (network, fare rule) versions the last compiled fare table came from.
    pub compiled: Option<(u64, u64)>,
    pub last_fare_table: Option<u64>,
    /// Feed items refused (bad signature, undecodable, unsupported kind), and the last reason.
    pub refused: u64,
    pub last_refusal: Option<String>,
    /// Verified `deny_list` items not yet published, in version order (at most
    /// [`MAX_PENDING_DENY`]; a newer leader publishes them if this one could not).
    #[serde(default)]
    pub deny: Vec<FeedBody>,
    /// The newest `deny_list` version published into the blacklist, and the blacklist version.
    #[serde(default)]
    pub deny_published: Option<(u64, u64)>,
}

/// Most `deny_list` items waiting to be published (each is published within a poll or two).
pub const MAX_PENDING_DENY: usize = 1_000;

impl FeedState {
    /// The (network, fare rule) pair to compile, when it differs from the last compiled one.
    pub fn to_compile(&self) -> Option<(&FeedBody, &FeedBody)> {
        let (n, r) = (self.network.as_ref()?, self.fare_rule.as_ref()?);
        (self.compiled != Some((n.version, r.version))).then_some((n, r))
    }

    /// The newest `deny_list` version taken (pending or published).
    pub fn deny_version(&self) -> u64 {
        let published = self.deny_published.map_or(0, |(v, _)| v);
        self.deny.last().map_or(published, |d| d.version.max(published))
    }
}

/// A closed business day in the small state (the close itself is an item, [`keys::day`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayMark {
    /// sha256 of the stored close's JSON, hex: a retried proposal of it is told from another close.
    pub sha256: String,
    pub closed_at: Timestamp,
    pub discrepancies: u32,
    /// Clearing stored it ([`Request::DayUploaded`]).
    pub uploaded: bool,
}

/// One recorded mode change (who, why, when), kept at least [`MODE_HISTORY_DAYS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModeChange {
    pub station: StationCode,
    pub bits: ModeBits,
    pub reason: String,
    pub actor: String,
    pub at: Timestamp,
    /// A scheduled change: `bits` are added to the station's mode from `from` until `until`
    /// (decided at `at`); absent for a change made at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<ModeWindow>,
}

/// The span of a scheduled mode change ([`Request::ScheduleMode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModeWindow {
    #[schema(value_type = i64)]
    pub from: Timestamp,
    #[schema(value_type = i64)]
    pub until: Timestamp,
    /// Set when an operator ended the window early ([`Request::EndModeWindow`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<i64>)]
    pub ended_at: Option<Timestamp>,
}

impl ModeWindow {
    /// When the window ends: at `until`, or when it was ended (at its start, if before it began).
    pub fn end(&self) -> Timestamp {
        self.ended_at.map_or(self.until, |e| e.max(self.from).min(self.until))
    }

    pub fn covers(&self, t: Timestamp) -> bool {
        self.from <= t && t < self.end()
    }
}

/// The small, in-memory part of the state machine. Serialised whole after each applied batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StationState {
    /// The last log entry applied; re-applying an entry at or below it is a no-op.
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, Node>,
    /// Index the next ledger entry gets (entries are numbered from 1).
    pub next_index: u64,
    /// Lowest ledger index still stored (entries below were pruned after clearing acknowledged them).
    pub first_retained: u64,
    #[serde(with = "hex::serde")]
    pub last_hash: [u8; 32],
    pub gates: BTreeMap<Ident, GateInfo>,
    /// Keyed by `ParamKind::as_str()`.
    pub packages: BTreeMap<String, PackageVersions>,
    pub modes: ModeState,
    pub mode_changes: Vec<ModeChange>,
    /// Highest ledger index acknowledged by central clearing (0 = none); only moves forward.
    pub clearing_acked_through: u64,
    /// Sequence number the next audit line gets (from 1).
    pub next_audit: u64,
    /// Package uploads in flight, by upload id (at most [`MAX_UPLOADS`]).
    #[serde(default)]
    pub uploads: BTreeMap<u64, Upload>,
    /// Staged rollouts and the requests waiting to start (driven by the leader's
    /// `rollout-driver`, see `crate::leader::rollout`).
    #[serde(default)]
    pub rollouts: RolloutBook,
    #[serde(default)]
    pub feed: FeedState,
    /// Sequence gaps recorded (the id of the last [`SequenceGap`]).
    #[serde(default)]
    pub gaps: u64,
    /// Key conflicts recorded (the id of the last [`KeyConflict`]).
    #[serde(default)]
    pub conflicts: u64,
    /// Per gate, the time of its last counter reading ([`Request::RecordCounters`]).
    #[serde(default)]
    pub last_reading: BTreeMap<Ident, Timestamp>,
    /// Closed business days ([`Request::CloseDay`]).
    #[serde(default)]
    pub days: BTreeMap<Date, DayMark>,
}

impl Default for StationState {
    fn default() -> Self {
        StationState {
            last_applied: None,
            last_membership: StoredMembership::default(),
            next_index: 1,
            first_retained: 1,
            last_hash: GENESIS_HASH,
            gates: BTreeMap::new(),
            packages: BTreeMap::new(),
            modes: ModeState::default(),
            mode_changes: Vec::new(),
            clearing_acked_through: 0,
            next_audit: 1,
            uploads: BTreeMap::new(),
            rollouts: RolloutBook::default(),
            feed: FeedState::default(),
            gaps: 0,
            conflicts: 0,
            last_reading: BTreeMap::new(),
            days: BTreeMap::new(),
        }
    }
}

/// A change to the immutable items of the state machine tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// An audit line as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub seq: u64,
    pub actor: String,
    pub action: String,
    pub detail: String,
    pub at: Timestamp,
}

/// Errors reading stored items while applying (storage failures, not rejections).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("storage: {0}")]
    Storage(String),
    #[error("ledger entry {index} is missing or undecodable: {detail}")]
    Corrupt { index: u64, detail: String },
}

/// Read access to stored items: ledger entries for `Prune` and for comparing a re-sent record
/// with the one stored under its key, package pieces for `CommitPackage`.
pub trait LedgerRead {
    fn ledger_entry(&self, index: u64) -> Result<Option<LedgerEntry>, ReadError>;
    /// The ledger index stored under a record key ([`keys::tx_key`]).
    fn tx_index(&self, key: &[u8]) -> Result<Option<u64>, ReadError>;
    fn package_piece(&self, upload: u64, index: u32) -> Result<Option<Vec<u8>>, ReadError>;
}

impl StationState {
    /// The last change of `station`'s own mode made at once (not a scheduled window), if any.
    pub fn last_mode_set(&self, station: StationCode) -> Option<&ModeChange> {
        self.mode_changes.iter().rev().find(|c| c.station == station && c.window.is_none())
    }

    /// The bits the scheduled windows of `station` add at `t` (from their records, the one
    /// account of them the publisher and the API both read).
    pub fn window_bits(&self, station: StationCode, t: Timestamp) -> ModeBits {
        self.mode_changes
            .iter()
            .filter(|c| c.station == station && c.window.is_some_and(|w| w.covers(t)))
            .fold(ModeBits::NORMAL, |acc, c| acc.with(c.bits))
    }

    /// The instants at which scheduled windows of `station` begin and end, in time order.
    pub fn window_boundaries(&self, station: StationCode) -> Vec<Timestamp> {
        let mut out: Vec<Timestamp> = self
            .mode_changes
            .iter()
            .filter(|c| c.station == station)
            .filter_map(|c| c.window)
            .flat_map(|w| [w.from, w.end()])
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// [`Request::ScheduleMode`]: the window's bits become a period of their own in the mode
    /// history, added to whatever else is in force (the union, as for every period).
    fn schedule_mode(&mut self, change: ModeChange, w: ModeWindow) -> Response {
        if w.from >= w.until || change.bits == ModeBits::NORMAL {
            return Response::Rejected {
                rejection: Rejection::InvalidModeWindow { from: w.from, until: w.until },
            };
        }
        let bits = change.bits;
        self.modes.periods.push(ModePeriod {
            station: change.station,
            bits,
            from: w.from,
            until: Some(w.until),
        });
        self.mode_changes.push(ModeChange { window: Some(w), ..change });
        Response::ModeScheduled { bits, from: w.from, until: w.until }
    }

    /// [`Request::EndModeWindow`]: the station's last window starting at `from` that has not
    /// ended ends at `at`; one that has not begun is removed.
    fn end_mode_window(&mut self, station: StationCode, from: Timestamp, at: Timestamp) -> Response {
        let found = self.mode_changes.iter_mut().rev().filter(|c| c.station == station).find_map(|c| {
            let bits = c.bits;
            c.window
                .as_mut()
                .filter(|w| w.from == from && w.ended_at.is_none() && w.until > at)
                .map(|w| (bits, w))
        });
        let Some((bits, w)) = found else {
            return Response::Rejected { rejection: Rejection::NoModeWindow { from } };
        };
        let scheduled_until = w.until;
        w.ended_at = Some(at);
        let end = w.end();
        for p in self.modes.periods.iter_mut().filter(|p| {
            p.station == station && p.bits == bits && p.from == from && p.until == Some(scheduled_until)
        }) {
            p.until = Some(end);
        }
        self.modes.periods.retain(|p| p.until.is_none_or(|u| u > p.from));
        Response::ModeScheduled { bits, from, until: end }
    }

    /// Index of the last ledger entry (0 when the ledger is empty).
    pub fn last_index(&self) -> u64 {
        self.next_index - 1
    }

    /// Number of ledger entries currently stored.
    pub fn ledger_len(&self) -> u64 {
        self.next_index.saturating_sub(self.first_retained)
    }

    /// Applies one command; returns what happened and pushes the item writes to `out`.
    pub fn apply(
        &mut self,
        req: &Request,
        ledger: &dyn LedgerRead,
        out: &mut Vec<Write>,
    ) -> Result<Response, ReadError> {
        let resp = match req {
            Request::AppendTxBatch { station, gate, records, signature, covers_from } => self.append_batch(
                &BatchRef { station, gate, records, signature, covers_from: *covers_from },
                ledger,
                out,
            )?,
            Request::AppendTxBatches { batches } => {
                let mut results = Vec::with_capacity(batches.len());
                for b in batches {
                    let b = BatchRef {
                        station: &b.station,
                        gate: &b.gate,
                        records: &b.records,
                        signature: &b.signature,
                        covers_from: b.covers_from,
                    };
                    results.push(self.append_batch(&b, ledger, out)?);
                }
                Response::AppendedMany { results }
            }
            Request::RegisterGate { gate, tx_public_key, hardware_profile } => {
                self.register_gate(gate, tx_public_key, hardware_profile)
            }
            Request::DecommissionGate { gate } => match self.gates.get_mut(gate) {
                Some(info) => {
                    info.decommissioned = true;
                    Response::GateDecommissioned { gate: gate.clone() }
                }
                None => Response::Rejected { rejection: Rejection::UnknownGate { gate: gate.clone() } },
            },
            Request::PutPackage { kind, version, package } => self.put_package(*kind, *version, package, out),
            Request::PutPackagePiece { upload, index, at, bytes } => {
                self.put_piece(*upload, *index, *at, bytes, out)
            }
            Request::CommitPackage { upload, kind, version, pieces, size, sha256 } => {
                self.commit_package(*upload, *kind, *version, (*pieces, *size, sha256), ledger, out)?
            }
            Request::SetMode { station, bits, reason, actor, at } => {
                let previous = self.modes.bits_at(*station, *at);
                self.modes.set(*station, *bits, *at);
                let horizon = at.plus_days(-(MODE_HISTORY_DAYS + 1));
                self.modes.prune(horizon);
                // A scheduled window's record is kept while the window may still be ended.
                self.mode_changes.retain(|c| c.at >= horizon || c.window.is_some_and(|w| w.until >= horizon));
                self.mode_changes.push(ModeChange {
                    station: *station,
                    bits: *bits,
                    reason: reason.clone(),
                    actor: actor.clone(),
                    at: *at,
                    window: None,
                });
                Response::ModeSet { bits: *bits, previous }
            }
            Request::ScheduleMode { station, bits, from, until, reason, actor, at } => {
                let change = ModeChange {
                    station: *station,
                    bits: *bits,
                    reason: reason.clone(),
                    actor: actor.clone(),
                    at: *at,
                    window: None,
                };
                self.schedule_mode(change, ModeWindow { from: *from, until: *until, ended_at: None })
            }
            Request::EndModeWindow { station, from, at } => self.end_mode_window(*station, *from, *at),
            Request::ClearingAck { through_index } => {
                if *through_index > self.last_index() {
                    Response::Rejected {
                        rejection: Rejection::AckBeyondLedger {
                            through_index: *through_index,
                            last_index: self.last_index(),
                        },
                    }
                } else if *through_index <= self.clearing_acked_through {
                    Response::ClearingAcked { acked_through: self.clearing_acked_through, moved: false }
                } else {
                    self.clearing_acked_through = *through_index;
                    Response::ClearingAcked { acked_through: *through_index, moved: true }
                }
            }
            Request::Audit { actor, action, detail, at } => {
                let seq = self.next_audit;
                self.next_audit += 1;
                let entry = AuditEntry {
                    seq,
                    actor: actor.clone(),
                    action: action.clone(),
                    detail: detail.clone(),
                    at: *at,
                };
                out.push(Write::Put(keys::audit(seq).to_vec(), encode(&entry)));
                Response::Audited { seq }
            }
            Request::Prune { before } => self.prune(*before, ledger, out)?,
            Request::RolloutRequest { request } => self.rollout_request(request),
            Request::RolloutConfirm { kind, by, at } => self.rollout_confirm(*kind, None, by, *at),
            Request::RolloutConfirmVersion { kind, version, by, at } => {
                self.rollout_confirm(*kind, Some(*version), by, *at)
            }
            Request::RolloutAbort { kind, by, at } => self.rollout_abort(*kind, by, *at),
            Request::RolloutUpdate { kind, previous, next, started } => {
                self.rollout_update(*kind, previous.as_deref(), next, *started)
            }
            Request::FeedAdvance { through, network, fare_rule, refused, deny } => {
                let f = &mut self.feed;
                if *through > f.after {
                    f.after = *through;
                    for d in deny {
                        if d.version <= f.deny_version() {
                            continue;
                        }
                        if f.deny.len() >= MAX_PENDING_DENY {
                            // Never silently: counted and named like any refused item.
                            f.refused += 1;
                            f.last_refusal = Some(format!(
                                "deny_list v{}: {MAX_PENDING_DENY} items already wait",
                                d.version
                            ));
                            continue;
                        }
                        f.deny.push(d.clone());
                    }
                    let newer = |held: &Option<FeedBody>, new: &Option<FeedBody>| {
                        new.as_ref().filter(|n| held.as_ref().is_none_or(|h| n.version > h.version)).cloned()
                    };
                    if let Some(n) = newer(&f.network, network) {
                        f.network = Some(n);
                    }
                    if let Some(r) = newer(&f.fare_rule, fare_rule) {
                        f.fare_rule = Some(r);
                    }
                    f.refused += refused.len() as u64;
                    if let Some(last) = refused.last() {
                        f.last_refusal = Some(last.clone());
                    }
                }
                Response::FeedAdvanced { after: self.feed.after }
            }
            Request::FeedCompiled { network_version, fare_rule_version, fare_table_version } => {
                self.feed.compiled = Some((*network_version, *fare_rule_version));
                // 0: the pair did not compile (it is not tried again).
                if *fare_table_version > 0 {
                    self.feed.last_fare_table = Some(*fare_table_version);
                }
                Response::FeedCompiled
            }
            Request::FeedDenied { through, blacklist_version } => {
                let f = &mut self.feed;
                if f.deny_published.is_none_or(|(v, _)| *through > v) {
                    f.deny_published = Some((*through, *blacklist_version));
                }
                f.deny.retain(|d| d.version > *through);
                Response::FeedDenied
            }
            Request::RecordCounters { reading } => {
                if !self.gates.contains_key(&reading.gate) {
                    return Ok(rejected(Rejection::UnknownGate { gate: reading.gate.clone() }));
                }
                let last = self.last_reading.get(&reading.gate);
                if last.is_some_and(|t| *t >= reading.at) {
                    Response::CountersRecorded { recorded: false }
                } else {
                    self.last_reading.insert(reading.gate.clone(), reading.at);
                    out.push(Write::Put(keys::reading(&reading.gate, reading.at), encode(reading)));
                    Response::CountersRecorded { recorded: true }
                }
            }
            Request::CloseDay { close } => self.close_day(close, out),
            Request::DayUploaded { day } => match self.days.get_mut(day) {
                Some(m) => {
                    m.uploaded = true;
                    Response::DayUploaded { day: *day }
                }
                None => rejected(Rejection::DayNotClosed { day: day.to_string() }),
            },
        };
        Ok(resp)
    }

    fn close_day(&mut self, close: &crate::day::DayClose, out: &mut Vec<Write>) -> Response {
        let day = close.day;
        if close.until > close.closed_at {
            return rejected(Rejection::DayNotOver {
                day: day.to_string(),
                until: close.until,
                closed_at: close.closed_at,
            });
        }
        let bytes = encode(close);
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let discrepancies = u32::try_from(close.discrepancies.len()).unwrap_or(u32::MAX);
        match self.days.get(&day) {
            Some(m) if m.sha256 == sha256 => Response::DayClosed { day, duplicate: true, discrepancies },
            Some(_) => rejected(Rejection::DayAlreadyClosed { day: day.to_string() }),
            None => {
                out.push(Write::Put(keys::day(day).to_vec(), bytes));
                self.days.insert(
                    day,
                    DayMark { sha256, closed_at: close.closed_at, discrepancies, uploaded: false },
                );
                Response::DayClosed { day, duplicate: false, discrepancies }
            }
        }
    }
}

/// The last write of `key` among this apply's writes (not yet in the tree): `Some(Some(value))`
/// put, `Some(None)` deleted, `None` not written. Gate batches read through this overlay, so the
/// tree is never written in the middle of an apply for them (a Prune's deletes made visible, and
/// durable with someone else's sync, before the state that says they happened would make the
/// Prune fail when it is applied again after a crash).
fn pending<'a>(out: &'a [Write], key: &[u8]) -> Option<Option<&'a [u8]>> {
    out.iter().rev().find_map(|w| match w {
        Write::Put(k, v) if k.as_slice() == key => Some(Some(v.as_slice())),
        Write::Delete(k) if k.as_slice() == key => Some(None),
        _ => None,
    })
}

fn rejected(rejection: Rejection) -> Response {
    Response::Rejected { rejection }
}

/// JSON encoding of stored items. Plain data structs with string map keys always serialise.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Cannot fail: every stored type is plain data with string map keys (see the tests).
    serde_json::to_vec(v).unwrap_or_default()
}
