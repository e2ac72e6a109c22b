//! The replicated commands and their answers: [`Request`] (what a Raft log entry carries),
//! [`Response`] (what applying it returned) and [`Rejection`] (why it changed nothing), with the
//! payload types they carry. A leaf: it names no Raft type, so [`crate::types`] builds the Raft
//! type configuration from it without importing the state machine.

use afc_domain::ledger::CanonicalRecord;
use afc_domain::mode::ModeBits;
use afc_domain::model::{Date, Ident, ParamKind, StationCode, Timestamp};
use afc_domain::rollout::{Rollout, RolloutPolicy, SecondConfirmation};
use serde::{Deserialize, Serialize};

/// One gate batch inside [`Request::AppendTxBatches`]: the fields of [`Request::AppendTxBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxBatchIn {
    pub station: Ident,
    pub gate: Ident,
    /// The records with the canonical bytes the gate signed (as received in a `raw` batch), which
    /// the Raft entry carries and the ledger hashes and stores as they are. JSON: the records.
    pub records: Vec<CanonicalRecord>,
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
        /// As in [`TxBatchIn::records`].
        records: Vec<CanonicalRecord>,
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
    /// Piece `index` (from 0, in order) of upload `upload`, at most
    /// [`MAX_PACKAGE_PIECE_BYTES`](crate::state::MAX_PACKAGE_PIECE_BYTES).
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
    /// Adds `bits` to the station's mode from `from` until `until` (SPEC §2: a mode change with a
    /// start and end time), decided at `at`.
    ScheduleMode {
        station: StationCode,
        bits: ModeBits,
        from: Timestamp,
        until: Timestamp,
        reason: String,
        actor: String,
        at: Timestamp,
    },
    /// Ends the scheduled window starting at `from` at `at` (removes it if it has not begun).
    EndModeWindow { station: StationCode, from: Timestamp, at: Timestamp },
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
    /// the newest verified network and fare rule it carried, its verified `deny_list` items in
    /// feed order, and why items were refused.
    FeedAdvance {
        through: u64,
        network: Option<FeedBody>,
        fare_rule: Option<FeedBody>,
        refused: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        deny: Vec<FeedBody>,
    },
    /// The leader's reading of a gate's PLC counters ([`crate::day`]): taken at the first
    /// heartbeat it sees from the gate and at the first after each business-day boundary. Only a
    /// reading later than the gate's last one is stored (a retried proposal changes nothing).
    RecordCounters { reading: crate::day::CounterReading },
    /// The close of a business day, computed by the node that took the request ([`crate::day`]):
    /// stored once; the same close again answers `DayClosed` with `duplicate`, another close of
    /// a closed day is refused, and so is a day not over at `closed_at`.
    CloseDay { close: Box<crate::day::DayClose> },
    /// Clearing stored the close of `day` (the uploader sends closed days until this is recorded).
    DayUploaded {
        #[serde(with = "date_serde")]
        day: Date,
    },
    /// The fare table compiled from these feed versions is stored and its rollout requested
    /// (`fare_table_version` 0: the pair does not compile and is not tried again).
    FeedCompiled { network_version: u64, fare_rule_version: u64, fare_table_version: u64 },
    /// The feed's `deny_list` items through version `through` are published as blacklist
    /// `blacklist_version` (their bank tokens added to or taken off the list gates hold).
    FeedDenied { through: u64, blacklist_version: u64 },
}

/// One verified feed body (JSON text as clearing signed it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedBody {
    pub version: u64,
    pub effective_from: Timestamp,
    pub json: String,
}

/// A rollout asked for and not started yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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

impl TryFrom<afc_domain::wire::TxBatch> for TxBatchIn {
    type Error = afc_domain::wire::TxBatchError;

    /// Reads the batch's records once, from either form ([`afc_domain::wire::TxBatch::canonical_records`]).
    fn try_from(b: afc_domain::wire::TxBatch) -> Result<TxBatchIn, Self::Error> {
        let records = b.canonical_records()?;
        let afc_domain::wire::TxBatch { station, gate, signature, covers_from, .. } = b;
        Ok(TxBatchIn { station, gate, records, signature, covers_from })
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
            Request::ScheduleMode { .. } => "schedule_mode",
            Request::EndModeWindow { .. } => "end_mode_window",
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
            Request::FeedDenied { .. } => "feed_denied",
            Request::RecordCounters { .. } => "record_counters",
            Request::CloseDay { .. } => "close_day",
            Request::DayUploaded { .. } => "day_uploaded",
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
    #[error("a scheduled mode window needs bits and from < until (from {from:?}, until {until:?})")]
    InvalidModeWindow { from: Timestamp, until: Timestamp },
    #[error("no scheduled mode window from {from:?} that has not ended")]
    NoModeWindow { from: Timestamp },
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
    #[error("business day {day} is already closed")]
    DayAlreadyClosed { day: String },
    #[error("business day {day} is not over (it ends at {until:?}, the close is at {closed_at:?})")]
    DayNotOver { day: String, until: Timestamp, closed_at: Timestamp },
    #[error("business day {day} is not closed")]
    DayNotClosed { day: String },
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
        /// Sequence gaps recorded ([`SequenceGap`](crate::state::SequenceGap)).
        #[serde(default)]
        gaps: u32,
        /// Records refused: the ledger holds their key with other content ([`KeyConflict`](crate::state::KeyConflict)).
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
    /// A window scheduled or ended: `bits` are added from `from` until `until`.
    ModeScheduled {
        bits: ModeBits,
        from: Timestamp,
        until: Timestamp,
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
    FeedDenied,
    /// `recorded`: false when the gate already has a reading at or after this one's time.
    CountersRecorded {
        recorded: bool,
    },
    DayClosed {
        #[serde(with = "date_serde")]
        day: Date,
        /// The same close was already stored (a retried proposal).
        duplicate: bool,
        discrepancies: u32,
    },
    DayUploaded {
        #[serde(with = "date_serde")]
        day: Date,
    },
}

/// Serde for a [`Date`] field inside the internally tagged enums (the `Date` impls, named so the
/// derive does not need `Date: Deserialize<'de>` bounds spelled out).
mod date_serde {
    use afc_domain::model::Date;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(d: &Date, s: S) -> Result<S::Ok, S::Error> {
        d.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Date, D::Error> {
        Date::deserialize(d)
    }
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
