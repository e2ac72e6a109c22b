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

use std::collections::{BTreeMap, BTreeSet};

use afc_domain::ledger::{Installation, TxRecord};
use afc_domain::mode::{ModeBits, ModeState, MODE_HISTORY_DAYS};
use afc_domain::model::{Ident, ParamKind, StationCode, Timestamp};
use afc_domain::rollout::{Rollout, RolloutError, RolloutPolicy, Rollouts, SecondConfirmation, Stage};
use ed25519_dalek::VerifyingKey;
use openraft::{LogId, StoredMembership};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::chain::{self, GateProgress, LedgerEntry, LedgerError, SeqStatus, GENESIS_HASH};
use crate::types::{Node, NodeId};

/// Most records one batch may carry (a gate uploads far fewer; this bounds one log entry).
pub const MAX_BATCH_RECORDS: usize = 10_000;
/// Most ledger entries one `Prune` removes, so a single apply stays short; the next prune goes on.
pub const MAX_PRUNE_PER_COMMAND: u64 = 200_000;
/// Package versions kept per kind (the current one and the one a rollback returns to).
pub const PACKAGE_VERSIONS_KEPT: usize = 2;
/// Bytes per piece the controller cuts a package into (one Raft entry each, see
/// [`Request::PutPackagePiece`]): small enough that one append RPC stays well within openraft's
/// per-append deadline (one heartbeat).
pub const PACKAGE_PIECE_BYTES: usize = 128 * 1024;
/// Largest piece the state machine takes (the MQTT chunk size, SPEC §5).
pub const MAX_PACKAGE_PIECE_BYTES: usize = 256 * 1024;
/// Uploads in flight at once; starting one more drops the least recently touched.
pub const MAX_UPLOADS: usize = 4;
/// An upload not touched for this long is dropped (with its pieces) when another one starts.
pub const UPLOAD_TTL_MS: i64 = 10 * 60 * 1000;

/// One gate batch inside [`Request::AppendTxBatches`]: the fields of [`Request::AppendTxBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxBatchIn {
    pub station: Ident,
    pub gate: Ident,
    pub records: Vec<TxRecord>,
    /// ed25519 signature by the gate's key, hex.
    pub signature: String,
    /// The first gate_seq the batch covers ([`afc_domain::wire::TxBatch::covers_from`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covers_from: Option<u64>,
}

/// A replicated command: the application data of a Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// A gate's signed batch of transactions (SPEC §5 `gates/{gate}/tx`).
    AppendTxBatch {
        station: Ident,
        gate: Ident,
        records: Vec<TxRecord>,
        /// ed25519 signature by the gate's key, hex.
        signature: String,
        /// The first gate_seq the batch covers ([`afc_domain::wire::TxBatch::covers_from`]):
        /// numbers in that range neither in the batch nor in the ledger are recorded as a gap.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        covers_from: Option<u64>,
    },
    /// Several gates' batches in one entry (group commit, [`crate::group_commit`]): applied one
    /// after another exactly as that many [`Request::AppendTxBatch`]es, answered with
    /// [`Response::AppendedMany`] in the same order.
    AppendTxBatches { batches: Vec<TxBatchIn> },
    /// Registers a gate, or rotates its transaction-signing key.
    RegisterGate {
        gate: Ident,
        /// ed25519 public key, hex (32 bytes).
        tx_public_key: String,
        hardware_profile: String,
    },
    /// Takes a gate out of service for good: its batches are refused from then on
    /// ([`Rejection::GateDecommissioned`]) and its messages no longer verify; its ledger progress
    /// is kept, so a gate registered again under this id (a recommissioning) does not reuse a
    /// gate_seq already in the ledger.
    DecommissionGate { gate: Ident },
    /// Stores a signed parameter package; `version` must exceed the kind's current version.
    /// Only for small packages: a large one goes as [`Request::PutPackagePiece`]s and a
    /// [`Request::CommitPackage`], so that no Raft entry is large.
    PutPackage {
        kind: ParamKind,
        version: u64,
        #[serde(with = "b64")]
        package: Vec<u8>,
    },
    /// Piece `index` (from 0, in order) of upload `upload`, at most [`MAX_PACKAGE_PIECE_BYTES`].
    /// Piece 0 opens the upload; a piece already received is a no-op (a retried proposal).
    PutPackagePiece {
        upload: u64,
        index: u32,
        /// The proposer's clock, for the expiry of abandoned uploads.
        at: Timestamp,
        #[serde(with = "b64")]
        bytes: Vec<u8>,
    },
    /// Assembles upload `upload` (exactly `pieces` pieces, `size` bytes, sha256 `sha256`), checks
    /// it is a package of `kind` and `version`, and stores it as with `PutPackage`. The pieces are
    /// deleted whatever the outcome. Committing an upload already stored as the current version
    /// with the same hash answers `PackageStored` again.
    CommitPackage {
        upload: u64,
        kind: ParamKind,
        version: u64,
        pieces: u32,
        size: u64,
        #[serde(with = "hex::serde")]
        sha256: [u8; 32],
    },
    /// Changes the station's operating mode.
    SetMode { station: StationCode, bits: ModeBits, reason: String, actor: String, at: Timestamp },
    /// Central clearing has acknowledged every ledger entry up to `through_index`.
    ClearingAck { through_index: u64 },
    /// One line of the replicated audit log.
    Audit { actor: String, action: String, detail: String, at: Timestamp },
    /// Drops ledger entries acknowledged by clearing whose `occurred_at` is before `before`.
    Prune { before: Timestamp },
    /// Asks for a staged rollout of a stored version; the leader starts it (it knows which gates
    /// are online), after a second operator's confirmation when the request carries one.
    RolloutRequest { request: RolloutStart },
    /// A second operator confirms a held rollout request (a mass blacklist insertion).
    RolloutConfirm { kind: ParamKind, by: String, at: Timestamp },
    /// The same, for exactly the request of `version` (refused if another request replaced it
    /// since the confirmer looked): the held blacklist upload's confirmation.
    RolloutConfirmVersion { kind: ParamKind, version: u64, by: String, at: Timestamp },
    /// An operator aborts a rollout (or drops a request not started yet): every gate goes back.
    RolloutAbort { kind: ParamKind, by: String, at: Timestamp },
    /// The leader's step of one kind's rollout: replaces `previous` (compare and set, so a step
    /// computed from a stale view loses against an abort) with `next`. With `started`, it is the
    /// start of the waiting request of `kind`, which it removes.
    RolloutUpdate { kind: ParamKind, previous: Option<Box<Rollout>>, next: Box<Rollout>, started: bool },
    /// The leader read clearing's parameter feed through item `through` (only moves forward):
    /// the newest verified network and fare rule it carried, and why items were refused.
    FeedAdvance { through: u64, network: Option<FeedBody>, fare_rule: Option<FeedBody>, refused: Vec<String> },
    /// The fare table compiled from these feed versions is stored and its rollout requested
    /// (`fare_table_version` 0: the pair does not compile and is not tried again).
    FeedCompiled { network_version: u64, fare_rule_version: u64, fare_table_version: u64 },
}

/// One verified feed body (JSON text as clearing signed it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedBody {
    pub version: u64,
    pub effective_from: Timestamp,
    pub json: String,
}

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
}

impl FeedState {
    /// The (network, fare rule) pair to compile, when it differs from the last compiled one.
    pub fn to_compile(&self) -> Option<(&FeedBody, &FeedBody)> {
        let (n, r) = (self.network.as_ref()?, self.fare_rule.as_ref()?);
        (self.compiled != Some((n.version, r.version))).then_some((n, r))
    }
}

/// A rollout asked for and not started yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStart {
    pub kind: ParamKind,
    pub to_version: u64,
    /// The version every gate holds now (the station pointer), `None` for the first package.
    pub from_version: Option<u64>,
    pub effective_from: Timestamp,
    pub policy: RolloutPolicy,
    pub by: String,
    pub at: Timestamp,
    pub reason: String,
    /// Set when the rollout is a mass blacklist insertion: it starts only once confirmed.
    pub confirmation: Option<SecondConfirmation>,
}

impl RolloutStart {
    /// Whether the leader may start it (no confirmation needed, or confirmed).
    pub fn ready(&self) -> bool {
        self.confirmation.as_ref().is_none_or(SecondConfirmation::is_confirmed)
    }
}

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
    fn pinned(&self, kind: ParamKind) -> BTreeSet<u64> {
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

impl From<TxBatchIn> for Request {
    fn from(b: TxBatchIn) -> Request {
        Request::AppendTxBatch {
            station: b.station,
            gate: b.gate,
            records: b.records,
            signature: b.signature,
            covers_from: b.covers_from,
        }
    }
}

impl From<afc_domain::wire::TxBatch> for Request {
    fn from(b: afc_domain::wire::TxBatch) -> Request {
        let afc_domain::wire::TxBatch { station, gate, records, signature, covers_from, .. } = b;
        Request::from(TxBatchIn { station, gate, records, signature, covers_from })
    }
}

impl Request {
    /// Short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Request::AppendTxBatch { .. } => "append_tx_batch",
            Request::AppendTxBatches { .. } => "append_tx_batches",
            Request::RegisterGate { .. } => "register_gate",
            Request::DecommissionGate { .. } => "decommission_gate",
            Request::PutPackage { .. } => "put_package",
            Request::PutPackagePiece { .. } => "put_package_piece",
            Request::CommitPackage { .. } => "commit_package",
            Request::SetMode { .. } => "set_mode",
            Request::ClearingAck { .. } => "clearing_ack",
            Request::Audit { .. } => "audit",
            Request::Prune { .. } => "prune",
            Request::RolloutRequest { .. } => "rollout_request",
            Request::RolloutConfirm { .. } => "rollout_confirm",
            Request::RolloutConfirmVersion { .. } => "rollout_confirm_version",
            Request::RolloutAbort { .. } => "rollout_abort",
            Request::RolloutUpdate { .. } => "rollout_update",
            Request::FeedAdvance { .. } => "feed_advance",
            Request::FeedCompiled { .. } => "feed_compiled",
        }
    }
}

/// Why a command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Rejection {
    #[error("gate {gate} is not registered")]
    UnknownGate { gate: Ident },
    #[error("gate {gate} is decommissioned")]
    GateDecommissioned { gate: Ident },
    #[error("batch signature does not verify against the gate's key")]
    BadSignature,
    #[error("record {gate_seq} names station/gate {station}/{gate}, not the batch's")]
    RecordMismatch { gate_seq: u64, station: Ident, gate: Ident },
    #[error("batch is empty")]
    EmptyBatch,
    #[error("batch has {records} records, more than {max}")]
    BatchTooLarge { records: usize, max: usize },
    #[error("invalid batch: {detail}")]
    InvalidBatch { detail: String },
    #[error("invalid public key: {detail}")]
    BadPublicKey { detail: String },
    #[error("{kind} version {version} is not above the current {current}")]
    StaleVersion { kind: ParamKind, version: u64, current: u64 },
    #[error("acknowledgement through {through_index} is beyond the last ledger index {last_index}")]
    AckBeyondLedger { through_index: u64, last_index: u64 },
    #[error("package piece of {len} bytes is larger than {max}")]
    PieceTooLarge { len: usize, max: usize },
    #[error("upload {upload} is unknown (never opened, expired, or already committed)")]
    UnknownUpload { upload: u64 },
    #[error("upload {upload}: piece {index} arrived, piece {expected} was expected")]
    PieceOutOfOrder { upload: u64, index: u32, expected: u32 },
    #[error("upload {upload} would exceed {max} bytes")]
    UploadTooLarge { upload: u64, max: u64 },
    #[error("upload {upload} holds {pieces} pieces and {size} bytes, the commit names {want_pieces} and {want_size}")]
    UploadIncomplete { upload: u64, pieces: u32, size: u64, want_pieces: u32, want_size: u64 },
    #[error("upload {upload} does not hash to the sha256 its commit names")]
    UploadHashMismatch { upload: u64 },
    #[error("invalid package: {detail}")]
    InvalidPackage { detail: String },
    #[error("{kind} version {version} is not stored")]
    UnknownVersion { kind: ParamKind, version: u64 },
    /// A rollout rule refused the command (`detail` says which); `rollout_code` is stable.
    #[error("{detail}")]
    Rollout { rollout_code: String, detail: String },
    #[error("the {kind} rollout changed since this step was computed")]
    RolloutChanged { kind: ParamKind },
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// A blank or membership entry, or an entry re-applied after a restart.
    None,
    Appended {
        appended: u32,
        duplicates: u32,
        /// Records too far ahead of the gate's high-water mark, not taken (the gate re-sends them).
        deferred: u32,
        /// Sequence gaps recorded ([`SequenceGap`]).
        #[serde(default)]
        gaps: u32,
        /// Records refused: the ledger holds their key with other content ([`KeyConflict`]).
        #[serde(default)]
        conflicts: u32,
        /// Ledger indexes given to the new records (absent when none was new).
        first_index: Option<u64>,
        last_index: Option<u64>,
        /// The gate's contiguous high-water mark, for `tx/ack`.
        through_seq: u64,
    },
    /// The answers to a [`Request::AppendTxBatches`], one per batch, in order.
    AppendedMany {
        results: Vec<Response>,
    },
    GateRegistered {
        gate: Ident,
        key_replaced: bool,
    },
    GateDecommissioned {
        gate: Ident,
    },
    /// A package piece is stored; `received` pieces of the upload are held.
    PieceStored {
        upload: u64,
        received: u32,
    },
    PackageStored {
        kind: ParamKind,
        version: u64,
        #[serde(with = "hex::serde")]
        sha256: [u8; 32],
    },
    ModeSet {
        bits: ModeBits,
        previous: ModeBits,
    },
    ClearingAcked {
        acked_through: u64,
        moved: bool,
    },
    Audited {
        seq: u64,
    },
    Pruned {
        removed: u64,
        first_retained: u64,
    },
    Rejected {
        rejection: Rejection,
    },
    /// A rollout request is stored; `held` when it waits for a second operator.
    RolloutRequested {
        kind: ParamKind,
        version: u64,
        held: bool,
    },
    RolloutConfirmed {
        kind: ParamKind,
        version: u64,
    },
    /// `dropped_request`: a request not started yet was dropped; otherwise the rollout is rolled back.
    RolloutAborted {
        kind: ParamKind,
        dropped_request: bool,
    },
    RolloutUpdated {
        kind: ParamKind,
    },
    FeedAdvanced {
        after: u64,
    },
    FeedCompiled,
}

/// A registered gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateInfo {
    #[serde(with = "hex::serde")]
    pub tx_public_key: [u8; 32],
    pub hardware_profile: String,
    /// Contiguous high-water mark and out-of-order seqs received, for records without an
    /// installation (gates of the first version).
    pub progress: GateProgress,
    /// The same per installation of this gate id: a replaced gate numbers from 1 again under its
    /// new installation, and those records are new.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub installations: BTreeMap<Installation, GateProgress>,
    /// The installation of the last batch taken (the gate as it is now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_installation: Option<Installation>,
    /// Sequence gaps recorded for this gate ([`SequenceGap`]), all installations.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gaps: u64,
    /// Records refused because the ledger holds their key with other content ([`KeyConflict`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub conflicts: u64,
    /// Taken out of service ([`Request::DecommissionGate`]); registering it again clears this.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub decommissioned: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl GateInfo {
    /// The progress of the gate as it is now (its last installation, or the first-version one).
    pub fn current_progress(&self) -> &GateProgress {
        self.progress_of(self.last_installation.as_ref()).unwrap_or(&self.progress)
    }

    /// The progress of one installation of this gate (`None`: first-version records).
    pub fn progress_of(&self, installation: Option<&Installation>) -> Option<&GateProgress> {
        match installation {
            None => Some(&self.progress),
            Some(i) => self.installations.get(i),
        }
    }

    fn progress_mut(&mut self, installation: Option<Installation>) -> &mut GateProgress {
        match installation {
            None => &mut self.progress,
            Some(i) => self.installations.entry(i).or_default(),
        }
    }
}

pub use afc_domain::ledger::SequenceGap;

/// A record refused because the ledger already holds its key `(gate, installation, gate_seq)`
/// with other content: never taken as a duplicate, kept here for the engineers, and alarmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyConflict {
    /// From 1, in the order recorded.
    pub id: u64,
    /// The ledger index of the record already holding the key.
    pub ledger_index: u64,
    /// The record refused.
    pub record: TxRecord,
}

/// Conflicting records kept in full ([`KeyConflict`]); beyond this they are only counted.
pub const MAX_KEPT_CONFLICTS: u64 = 10_000;

/// The versions of one package kind held in the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageVersions {
    /// Stored versions, ascending; the last is current. At most [`PACKAGE_VERSIONS_KEPT`] after a prune.
    pub versions: Vec<u64>,
    #[serde(with = "hex::serde")]
    pub current_sha256: [u8; 32],
}

impl PackageVersions {
    pub fn current(&self) -> u64 {
        self.versions.last().copied().unwrap_or(0)
    }
}

/// A package upload in flight: its pieces are items under [`keys::piece`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    /// Pieces received (`0..pieces`).
    pub pieces: u32,
    pub bytes: u64,
    /// The proposer's time of the last piece, for expiry.
    pub touched: Timestamp,
}

/// One recorded mode change (who, why, when), kept at least [`MODE_HISTORY_DAYS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeChange {
    pub station: StationCode,
    pub bits: ModeBits,
    pub reason: String,
    pub actor: String,
    pub at: Timestamp,
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
        }
    }
}

/// Key layout of the state machine tree. Big-endian numbers keep items in index order.
pub mod keys {
    use afc_domain::model::ParamKind;

    /// The serialised [`super::StationState`].
    pub const STATE: &[u8] = b"s";
    pub const LEDGER_PREFIX: u8 = b'L';
    pub const AUDIT_PREFIX: u8 = b'A';
    pub const PACKAGE_PREFIX: u8 = b'P';
    pub const PIECE_PREFIX: u8 = b'U';
    /// A record's key `(gate, installation, gate_seq)` → its ledger index (u64 big-endian).
    pub const TX_KEY_PREFIX: u8 = b'K';
    pub const GAP_PREFIX: u8 = b'G';
    pub const CONFLICT_PREFIX: u8 = b'C';
    /// Every prefix whose items a snapshot carries whole (the others are copied by range).
    pub const WHOLE_PREFIXES: [u8; 3] = [TX_KEY_PREFIX, GAP_PREFIX, CONFLICT_PREFIX];

    /// `K ‖ len ‖ gate ‖ 0 | 1 ‖ installation (16 bytes, when 1) ‖ gate_seq`.
    pub fn tx_key(
        gate: &afc_domain::model::Ident,
        installation: Option<&afc_domain::ledger::Installation>,
        seq: u64,
    ) -> Vec<u8> {
        let g = gate.as_str().as_bytes();
        let mut k = Vec::with_capacity(2 + g.len() + 17 + 8);
        k.push(TX_KEY_PREFIX);
        k.push(g.len() as u8);
        k.extend_from_slice(g);
        match installation {
            None => k.push(0),
            Some(i) => {
                k.push(1);
                k.extend_from_slice(&i.0);
            }
        }
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    pub fn gap(id: u64) -> [u8; 9] {
        prefixed(GAP_PREFIX, id)
    }

    pub fn conflict(id: u64) -> [u8; 9] {
        prefixed(CONFLICT_PREFIX, id)
    }

    /// Piece `index` of package upload `upload`.
    pub fn piece(upload: u64, index: u32) -> [u8; 13] {
        let mut k = [0u8; 13];
        k[0] = PIECE_PREFIX;
        k[1..9].copy_from_slice(&upload.to_be_bytes());
        k[9..].copy_from_slice(&index.to_be_bytes());
        k
    }

    pub fn ledger(index: u64) -> [u8; 9] {
        prefixed(LEDGER_PREFIX, index)
    }

    pub fn audit(seq: u64) -> [u8; 9] {
        prefixed(AUDIT_PREFIX, seq)
    }

    pub fn package(kind: ParamKind, version: u64) -> [u8; 10] {
        let mut k = [0u8; 10];
        k[0] = PACKAGE_PREFIX;
        k[1] = kind.code();
        k[2..].copy_from_slice(&version.to_be_bytes());
        k
    }

    fn prefixed(p: u8, n: u64) -> [u8; 9] {
        let mut k = [0u8; 9];
        k[0] = p;
        k[1..].copy_from_slice(&n.to_be_bytes());
        k
    }
}

/// A change to the immutable items of the state machine tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// An audit line as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
                self.mode_changes.retain(|c| c.at >= horizon);
                self.mode_changes.push(ModeChange {
                    station: *station,
                    bits: *bits,
                    reason: reason.clone(),
                    actor: actor.clone(),
                    at: *at,
                });
                Response::ModeSet { bits: *bits, previous }
            }
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
            Request::FeedAdvance { through, network, fare_rule, refused } => {
                let f = &mut self.feed;
                if *through > f.after {
                    f.after = *through;
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
        };
        Ok(resp)
    }

    fn append_batch(
        &mut self,
        b: &BatchRef<'_>,
        ledger: &dyn LedgerRead,
        out: &mut Vec<Write>,
    ) -> Result<Response, ReadError> {
        let (station, gate, records) = (b.station, b.gate, b.records);
        let reject = |rejection| Ok(Response::Rejected { rejection });
        if records.is_empty() {
            return reject(Rejection::EmptyBatch);
        }
        if records.len() > MAX_BATCH_RECORDS {
            return reject(Rejection::BatchTooLarge { records: records.len(), max: MAX_BATCH_RECORDS });
        }
        if let Some(r) = records.iter().find(|r| &r.station != station || &r.gate != gate) {
            return reject(Rejection::RecordMismatch {
                gate_seq: r.gate_seq,
                station: r.station.clone(),
                gate: r.gate.clone(),
            });
        }
        let installation = records[0].installation;
        if records.iter().any(|r| r.installation != installation) {
            return reject(Rejection::InvalidBatch {
                detail: "records of more than one installation".into(),
            });
        }
        let Some(info) = self.gates.get_mut(gate) else {
            return reject(Rejection::UnknownGate { gate: gate.clone() });
        };
        if info.decommissioned {
            return reject(Rejection::GateDecommissioned { gate: gate.clone() });
        }
        let (Some(sig), Ok(key)) =
            (decode_signature(b.signature), VerifyingKey::from_bytes(&info.tx_public_key))
        else {
            return reject(Rejection::BadSignature);
        };
        match chain::verify_batch_covering(station, gate, b.covers_from, records, &sig, &key) {
            Ok(()) => {}
            Err(LedgerError::BadSignature) => return reject(Rejection::BadSignature),
            Err(e) => return reject(Rejection::InvalidBatch { detail: e.to_string() }),
        }
        if let Some(inst) = installation {
            info.last_installation = Some(inst);
            // A gate upgraded from a build whose records carried no installation numbers on
            // under its installation: it was acked through covers_from - 1 before (under the
            // first-version key), so a fresh installation starts there. A wiped gate starts
            // with nothing acked (covers_from 1) and numbers from 1.
            let p = info.installations.entry(inst).or_default();
            if let Some(from) = b.covers_from.filter(|f| *f > 1) {
                if p.contiguous_through == 0 && p.pending.is_empty() {
                    p.contiguous_through = from - 1;
                }
            }
        }
        let (mut appended, mut duplicates, mut deferred, mut gaps, mut conflicts) =
            (0u32, 0u32, 0u32, 0u32, 0u32);
        let mut first_index = None;
        // The next gate_seq the batch's claim covers: numbers below a record and from here that
        // are neither in the batch nor in the ledger are gone from the gate.
        let mut covered = b.covers_from;
        for rec in records {
            let progress = info.progress_mut(installation);
            if let Some(from) = covered.filter(|f| *f < rec.gate_seq) {
                for (from_seq, to_seq) in progress.fill(from, rec.gate_seq - 1) {
                    self.gaps += 1;
                    info.gaps += 1;
                    gaps += 1;
                    let gap = SequenceGap {
                        id: self.gaps,
                        gate: gate.clone(),
                        installation,
                        from_seq,
                        to_seq,
                        ledger_index: self.next_index,
                        noticed_at: rec.occurred_at,
                    };
                    tracing::error!(%gate, from_seq, to_seq, "sequence gap recorded: the gate no longer holds these records");
                    out.push(Write::Put(keys::gap(gap.id).to_vec(), encode(&gap)));
                }
            }
            covered = covered.map(|c| c.max(rec.gate_seq.saturating_add(1)));
            let progress = info.progress_mut(installation);
            match progress.classify(rec.gate_seq) {
                SeqStatus::New => {}
                SeqStatus::BeyondWindow => {
                    deferred += 1;
                    continue;
                }
                SeqStatus::Zero => {
                    duplicates += 1;
                    continue;
                }
                SeqStatus::Duplicate => {
                    let key = keys::tx_key(gate, installation.as_ref(), rec.gate_seq);
                    // Written earlier in this apply (not yet in the tree), or stored.
                    let stored = tx_index(out, ledger, &key)?;
                    // No index: pruned (acknowledged by clearing, days old) or stored before
                    // keys were kept; nothing to compare with.
                    let same = match stored {
                        None => true,
                        Some(i) => record_at(out, ledger, i)?.is_none_or(|r| &r == rec),
                    };
                    if same {
                        duplicates += 1;
                    } else {
                        conflicts += 1;
                        info.conflicts += 1;
                        self.conflicts += 1;
                        tracing::error!(%gate, gate_seq = rec.gate_seq, stored = ?stored, "record refused: the ledger holds its key with other content");
                        if self.conflicts <= MAX_KEPT_CONFLICTS {
                            let c = KeyConflict {
                                id: self.conflicts,
                                ledger_index: stored.unwrap_or(0),
                                record: rec.clone(),
                            };
                            out.push(Write::Put(keys::conflict(c.id).to_vec(), encode(&c)));
                        }
                    }
                    continue;
                }
            }
            progress.record(rec.gate_seq);
            let index = self.next_index;
            let entry = LedgerEntry::new(index, &self.last_hash, rec.clone());
            let hash = entry.hash;
            out.push(Write::Put(keys::ledger(index).to_vec(), encode_ledger_entry(&entry)));
            out.push(Write::Put(
                keys::tx_key(gate, installation.as_ref(), rec.gate_seq),
                index.to_be_bytes().to_vec(),
            ));
            self.last_hash = hash;
            self.next_index += 1;
            appended += 1;
            first_index.get_or_insert(index);
        }
        let through_seq = info.progress_mut(installation).contiguous_through;
        Ok(Response::Appended {
            appended,
            duplicates,
            deferred,
            gaps,
            conflicts,
            first_index,
            last_index: first_index.map(|_| self.last_index()),
            through_seq,
        })
    }

    fn register_gate(&mut self, gate: &Ident, key_hex: &str, hardware_profile: &str) -> Response {
        let key = match decode_key(key_hex) {
            Ok(k) => k,
            Err(detail) => return Response::Rejected { rejection: Rejection::BadPublicKey { detail } },
        };
        let key_replaced = match self.gates.get_mut(gate) {
            Some(info) => {
                let replaced = info.tx_public_key != key;
                info.tx_public_key = key;
                info.hardware_profile = hardware_profile.to_owned();
                info.decommissioned = false;
                replaced
            }
            None => {
                self.gates.insert(
                    gate.clone(),
                    GateInfo {
                        tx_public_key: key,
                        hardware_profile: hardware_profile.to_owned(),
                        progress: GateProgress::default(),
                        installations: BTreeMap::new(),
                        last_installation: None,
                        gaps: 0,
                        conflicts: 0,
                        decommissioned: false,
                    },
                );
                false
            }
        };
        Response::GateRegistered { gate: gate.clone(), key_replaced }
    }

    fn put_package(
        &mut self,
        kind: ParamKind,
        version: u64,
        package: &[u8],
        out: &mut Vec<Write>,
    ) -> Response {
        let held = self.packages.entry(kind.as_str().to_owned()).or_default();
        let current = held.current();
        if version <= current {
            return Response::Rejected { rejection: Rejection::StaleVersion { kind, version, current } };
        }
        let sha256: [u8; 32] = Sha256::digest(package).into();
        held.versions.push(version);
        held.current_sha256 = sha256;
        out.push(Write::Put(keys::package(kind, version).to_vec(), package.to_vec()));
        Response::PackageStored { kind, version, sha256 }
    }

    fn put_piece(
        &mut self,
        upload: u64,
        index: u32,
        at: Timestamp,
        bytes: &[u8],
        out: &mut Vec<Write>,
    ) -> Response {
        let reject = |rejection| Response::Rejected { rejection };
        if bytes.len() > MAX_PACKAGE_PIECE_BYTES {
            return reject(Rejection::PieceTooLarge { len: bytes.len(), max: MAX_PACKAGE_PIECE_BYTES });
        }
        if !self.uploads.contains_key(&upload) {
            if index != 0 {
                return reject(Rejection::UnknownUpload { upload });
            }
            // Garbage stays bounded: expired uploads go, and the least recently touched makes room.
            let expired: Vec<u64> = self
                .uploads
                .iter()
                .filter(|(_, u)| u.touched.millis().saturating_add(UPLOAD_TTL_MS) < at.millis())
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                self.drop_upload(id, out);
            }
            while self.uploads.len() >= MAX_UPLOADS {
                let oldest = self.uploads.iter().min_by_key(|(id, u)| (u.touched, **id)).map(|(id, _)| *id);
                let Some(oldest) = oldest else { break };
                self.drop_upload(oldest, out);
            }
            self.uploads.insert(upload, Upload { pieces: 0, bytes: 0, touched: at });
        }
        let Some(u) = self.uploads.get_mut(&upload) else {
            return reject(Rejection::UnknownUpload { upload });
        };
        if index < u.pieces {
            return Response::PieceStored { upload, received: u.pieces };
        }
        if index > u.pieces {
            return reject(Rejection::PieceOutOfOrder { upload, index, expected: u.pieces });
        }
        let max = afc_domain::package::MAX_PACKAGE_BYTES;
        if u.bytes.saturating_add(bytes.len() as u64) > max {
            self.drop_upload(upload, out);
            return reject(Rejection::UploadTooLarge { upload, max });
        }
        out.push(Write::Put(keys::piece(upload, index).to_vec(), bytes.to_vec()));
        u.pieces += 1;
        u.bytes += bytes.len() as u64;
        u.touched = u.touched.max(at);
        Response::PieceStored { upload, received: u.pieces }
    }

    /// Forgets an upload and deletes its pieces.
    fn drop_upload(&mut self, upload: u64, out: &mut Vec<Write>) {
        if let Some(u) = self.uploads.remove(&upload) {
            for i in 0..u.pieces {
                out.push(Write::Delete(keys::piece(upload, i).to_vec()));
            }
        }
    }

    fn commit_package(
        &mut self,
        upload: u64,
        kind: ParamKind,
        version: u64,
        (want_pieces, want_size, sha256): (u32, u64, &[u8; 32]),
        items: &dyn LedgerRead,
        out: &mut Vec<Write>,
    ) -> Result<Response, ReadError> {
        let reject = |rejection| Ok(Response::Rejected { rejection });
        let Some(u) = self.uploads.get(&upload).cloned() else {
            // A commit proposed again after it was applied: the same answer, nothing changes.
            let held = self.packages.get(kind.as_str());
            if held.is_some_and(|h| h.current() == version && &h.current_sha256 == sha256) {
                return Ok(Response::PackageStored { kind, version, sha256: *sha256 });
            }
            return reject(Rejection::UnknownUpload { upload });
        };
        if u.pieces != want_pieces || u.bytes != want_size {
            self.drop_upload(upload, out);
            return reject(Rejection::UploadIncomplete {
                upload,
                pieces: u.pieces,
                size: u.bytes,
                want_pieces,
                want_size,
            });
        }
        let mut package = Vec::with_capacity(usize::try_from(u.bytes).unwrap_or(0));
        for i in 0..u.pieces {
            let key = keys::piece(upload, i);
            let piece = match pending(out, &key) {
                Some(v) => v.map(<[u8]>::to_vec),
                None => items.package_piece(upload, i)?,
            };
            let piece = piece.ok_or_else(|| {
                ReadError::Storage(format!("piece {i} of upload {upload} is missing from the store"))
            })?;
            package.extend_from_slice(&piece);
        }
        self.drop_upload(upload, out);
        let actual: [u8; 32] = Sha256::digest(&package).into();
        if &actual != sha256 {
            return reject(Rejection::UploadHashMismatch { upload });
        }
        match afc_domain::package::Package::decode(&package) {
            Ok(p) if p.header.kind == kind && p.header.version == version => {}
            Ok(p) => {
                return reject(Rejection::InvalidPackage {
                    detail: format!(
                        "it is {} version {}, the commit names {kind} version {version}",
                        p.header.kind, p.header.version
                    ),
                })
            }
            Err(e) => return reject(Rejection::InvalidPackage { detail: e.to_string() }),
        }
        Ok(self.put_package(kind, version, &package, out))
    }

    fn rollout_request(&mut self, q: &RolloutStart) -> Response {
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

    fn rollout_confirm(
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

    fn rollout_abort(&mut self, kind: ParamKind, by: &str, at: Timestamp) -> Response {
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

    fn rollout_update(
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

    fn prune(
        &mut self,
        before: Timestamp,
        ledger: &dyn LedgerRead,
        out: &mut Vec<Write>,
    ) -> Result<Response, ReadError> {
        let mut removed = 0;
        // Ledger entries written earlier in this apply (not yet in the tree), looked up once.
        let fresh: std::collections::HashMap<u64, &[u8]> = out
            .iter()
            .filter_map(|w| match w {
                Write::Put(k, v) if k.len() == 9 && k[0] == keys::LEDGER_PREFIX => {
                    Some((u64::from_be_bytes(k[1..9].try_into().ok()?), v.as_slice()))
                }
                _ => None,
            })
            .collect();
        let mut deletes = Vec::new();
        while self.first_retained <= self.clearing_acked_through && removed < MAX_PRUNE_PER_COMMAND {
            let index = self.first_retained;
            let entry = match fresh.get(&index) {
                Some(v) => decode_ledger_entry(index, v).ok(),
                None => ledger.ledger_entry(index)?,
            };
            let entry = entry.ok_or_else(|| ReadError::Corrupt {
                index,
                detail: "missing below the acknowledged point".into(),
            })?;
            if entry.record.occurred_at >= before {
                break;
            }
            deletes.push(Write::Delete(keys::ledger(index).to_vec()));
            let r = &entry.record;
            deletes.push(Write::Delete(keys::tx_key(&r.gate, r.installation.as_ref(), r.gate_seq)));
            self.first_retained += 1;
            removed += 1;
        }
        drop(fresh);
        out.extend(deletes);
        for (name, held) in self.packages.iter_mut() {
            let Some(kind) = ParamKind::parse(name) else { continue };
            // Versions a rollout points gates at (or may roll back to) stay.
            let pinned = self.rollouts.pinned(kind);
            while held.versions.len() > PACKAGE_VERSIONS_KEPT {
                let Some(i) = held.versions.iter().position(|v| !pinned.contains(v)) else { break };
                if i + 1 == held.versions.len() {
                    break; // never the current one
                }
                let old = held.versions.remove(i);
                out.push(Write::Delete(keys::package(kind, old).to_vec()));
            }
        }
        Ok(Response::Pruned { removed, first_retained: self.first_retained })
    }
}

/// The fields of one gate batch, from [`Request::AppendTxBatch`] or one of
/// [`Request::AppendTxBatches`].
struct BatchRef<'a> {
    station: &'a Ident,
    gate: &'a Ident,
    records: &'a [TxRecord],
    signature: &'a str,
    covers_from: Option<u64>,
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

/// The ledger index stored under record key `key`, this apply's writes first.
fn tx_index(out: &[Write], ledger: &dyn LedgerRead, key: &[u8]) -> Result<Option<u64>, ReadError> {
    match pending(out, key) {
        Some(v) => Ok(v.and_then(|v| <[u8; 8]>::try_from(v).ok()).map(u64::from_be_bytes)),
        None => ledger.tx_index(key),
    }
}

/// The record of ledger entry `index`, this apply's writes first.
fn record_at(out: &[Write], ledger: &dyn LedgerRead, index: u64) -> Result<Option<TxRecord>, ReadError> {
    match pending(out, &keys::ledger(index)) {
        Some(v) => Ok(v.and_then(|v| decode_ledger_entry(index, v).ok()).map(|e| e.record)),
        None => Ok(ledger.ledger_entry(index)?.map(|e| e.record)),
    }
}

fn rejected(rejection: Rejection) -> Response {
    Response::Rejected { rejection }
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

/// Format byte of a stored ledger entry: `LEDGER_ITEM_FORMAT ‖ hash (32 bytes) ‖ canonical record`
/// (the index is the key). Older stores hold JSON, which starts with `{`.
pub const LEDGER_ITEM_FORMAT: u8 = 1;

/// The stored form of a ledger entry: its hash and its record's canonical bytes.
pub fn encode_ledger_entry(entry: &LedgerEntry) -> Vec<u8> {
    let record = entry.record.canonical_bytes();
    let mut out = Vec::with_capacity(33 + record.len());
    out.push(LEDGER_ITEM_FORMAT);
    out.extend_from_slice(&entry.hash);
    out.extend_from_slice(&record);
    out
}

/// Decodes a stored ledger entry at `index` (written by [`encode_ledger_entry`], or JSON).
pub fn decode_ledger_entry(index: u64, bytes: &[u8]) -> Result<LedgerEntry, ReadError> {
    let corrupt = |detail: String| ReadError::Corrupt { index, detail };
    match bytes.split_first() {
        Some((&LEDGER_ITEM_FORMAT, rest)) if rest.len() >= 32 => {
            let (hash, record) = rest.split_at(32);
            let mut h = [0u8; 32];
            h.copy_from_slice(hash);
            let record = TxRecord::from_canonical(record).map_err(|e| corrupt(e.to_string()))?;
            Ok(LedgerEntry { index, hash: h, record })
        }
        Some((b'{', _)) => serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string())),
        _ => Err(corrupt("unknown item format".into())),
    }
}

/// JSON encoding of stored items. Plain data structs with string map keys always serialise.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Cannot fail: every stored type is plain data with string map keys (see the tests).
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode_signature(hex_sig: &str) -> Option<[u8; 64]> {
    let bytes = hex::decode(hex_sig).ok()?;
    bytes.try_into().ok()
}

fn decode_key(hex_key: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(hex_key).map_err(|e| e.to_string())?;
    let key: [u8; 32] = bytes.try_into().map_err(|_| "expected 32 bytes".to_owned())?;
    VerifyingKey::from_bytes(&key).map_err(|e| e.to_string())?;
    Ok(key)
}

/// Serde helper: bytes as a base64 string in JSON.
pub mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}
