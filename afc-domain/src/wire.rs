//! JSON messages of SPEC §5 (MQTT) and §7 (card reader), and their size-limited codec.
//!
//! The card and tap structures come first: the decision module and the gate agent import them as
//! `crate::wire::{SvcCard, EntryRecord, TokenCard, CardWrite, DecisionKind}`, so their names and
//! JSON shapes are part of the reader interface.
//!
//! Decoding is forward-compatible: unknown fields are ignored, so a newer controller can add a field
//! without breaking older gates. It is also bounded: [`decode`] refuses payloads above
//! [`MAX_PAYLOAD`] before parsing, and never panics on hostile bytes. Package bodies and chunks are
//! binary and live in `package`, not here.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ledger::{CanonicalRecord, LedgerError, TxRecord};
use crate::mode::{ModeBits, ModePeriod};
use crate::model::{CardType, Date, Direction, Ident, Media, ParamKind, Reason, StationCode, Timestamp};

// ---------------------------------------------------------------------------------------------
// Cards and taps (SPEC §3, §7): shared with the decision module.
// ---------------------------------------------------------------------------------------------

/// An entry record as written on a card: where and when the passenger entered. `None` on a card
/// means "not inside the network".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EntryRecord {
    /// The entry station's numeric code (the code the OD table is indexed by).
    pub station: StationCode,
    /// The entry instant, for the ride-time limit and the emergency grace rule.
    pub time: Timestamp,
}

/// The state of a stored-value card as the reader read it. The balance lives on the card, so the
/// gate decides from this and returns the new state in a [`CardWrite`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SvcCard {
    /// The card number, the blacklist key and the ledger id.
    pub card_id: u64,
    /// The concession type, which selects the discount.
    pub card_type: CardType,
    /// The stored value in fen.
    pub balance_fen: u32,
    /// The last day the card is valid (not checked under date_free).
    pub expiry: Date,
    /// The card's own transaction counter, for clearing's card-side consistency checks.
    pub tx_counter: u32,
    /// The open entry, if the card is inside the network.
    pub entry: Option<EntryRecord>,
}

/// A bank card or phone (UnionPay QuickPass / EMV contactless) as the reader read it. The PAN
/// never reaches the gate: the reader reports the payment token reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankCard {
    /// The payment token reference (PAR, or a hash of PAN and expiry): 64 hex digits.
    pub token: crate::bank::BankToken,
    /// The last day the card is valid (the reader turns the card's YYMM into its month's last day).
    pub expiry: Date,
    /// Whether the card's offline data authentication (fDDA/CDA) passed.
    pub oda_passed: bool,
    /// The application cryptogram the card produced for this tap, for clearing's charge.
    pub cryptogram: crate::bank::Cryptogram,
    /// The card's application transaction counter.
    pub atc: u16,
}

/// A single-journey token as the reader read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCard {
    /// The token serial, the blacklist key and the ledger id.
    pub token_id: u64,
    /// The station that sold it: the only station where it may enter.
    pub origin: StationCode,
    /// What the passenger paid; at exit it must cover the OD fare.
    pub paid_fen: u32,
    /// The business day of sale: the only day the token is valid.
    pub sold_on: Date,
    /// Set by the entry gate; a token with an entry cannot enter again.
    pub entry: Option<EntryRecord>,
}

/// What the reader writes back to the card or token after an accepted tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardWrite {
    /// The new balance (svc) or the unchanged paid value (token).
    pub balance_fen: u32,
    /// The new card transaction counter.
    pub tx_counter: u32,
    /// The entry record to store: set at entry, cleared (`None`) at exit.
    pub entry: Option<EntryRecord>,
    /// True when the exit gate keeps the token (the reader routes it to the token bin).
    #[serde(default)]
    pub retain: bool,
}

/// What the gate does with the passenger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    OpenEntry,
    OpenExit,
    Reject,
}

impl DecisionKind {
    /// The snake_case name, as in JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::OpenEntry => "open_entry",
            DecisionKind::OpenExit => "open_exit",
            DecisionKind::Reject => "reject",
        }
    }
}

/// The medium presented, with what the reader read from it. JSON: tagged by `"media"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "media", rename_all = "snake_case")]
pub enum TapMedia {
    /// `{"media":"svc","card":{...}}`
    Svc { card: SvcCard },
    /// `{"media":"qr","code":"<base64url>"}`: the ride code exactly as scanned; `qr` parses it.
    Qr { code: String },
    /// `{"media":"token","token":{...}}`
    Token { token: TokenCard },
    /// `{"media":"bank","bank":{"token":"<64 hex>","expiry":"2028-05-31","oda_passed":true,
    /// "cryptogram":"<16 hex>","atc":17}}`
    Bank { bank: BankCard },
}

impl TapMedia {
    /// Which medium this is.
    pub fn media(&self) -> Media {
        match self {
            TapMedia::Svc { .. } => Media::Svc,
            TapMedia::Qr { .. } => Media::Qr,
            TapMedia::Token { .. } => Media::Token,
            TapMedia::Bank { .. } => Media::Bank,
        }
    }
}

/// One tap: the reader's side of the aisle and the medium.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapRequest {
    /// The direction of the reader that was tapped (a bidirectional gate has one reader per side).
    pub direction: Direction,
    /// The medium, flattened so the JSON is `{"direction":..,"media":..,...}`.
    #[serde(flatten)]
    pub media: TapMedia,
}

// ---------------------------------------------------------------------------------------------
// Card reader protocol (SPEC §7): one JSON line each way.
// ---------------------------------------------------------------------------------------------

/// Longest request or response line on the reader socket, newline included. A tap is well under
/// 1 KiB; a reader sending more is broken or hostile, and the gate answers with a [`ReaderError`].
pub const MAX_READER_LINE: usize = 16 * 1024;

/// A request line from the reader: `{"tap": {...}}`, or `{"tap": {...}, "psam": true}` from a
/// reader with a PSAM, which signs the stored-value debits of its taps (the two-phase exchange:
/// [`PsamSignRequest`], [`PsamReply`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReaderRequest {
    pub tap: TapRequest,
    /// The reader holds a PSAM and will answer a `sign` line before the response. Absent (an
    /// older reader): the one-phase exchange, no TAC recorded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub psam: bool,
}

impl ReaderRequest {
    /// A one-phase request (a reader without a PSAM).
    pub fn new(tap: TapRequest) -> ReaderRequest {
        ReaderRequest { tap, psam: false }
    }
}

/// The gate's line between its decision and its response, to a reader that announced a PSAM:
/// `{"sign": {card_id, tx_counter, amount_fen, station, gate, time}}`, the debit the PSAM is to
/// sign (`afc_domain::tac`). The reader writes nothing to the card until the response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PsamSignRequest {
    pub sign: crate::tac::TacInput,
}

/// The reader's answer to a [`PsamSignRequest`]: `{"signed": {"psam": id, "psam_seq": n, "tac":
/// "<16 hex>"}}`, or `{"psam_error": {"code": "...", "message": "..."}}` when its PSAM cannot
/// sign (missing, locked, counter exhausted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PsamReply {
    Signed(crate::ledger::TacRef),
    PsamError(PsamError),
}

/// Why a reader's PSAM did not sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PsamError {
    /// A short machine code from the reader (free form, logged and counted by the gate).
    pub code: String,
    /// Detail for the log.
    #[serde(default)]
    pub message: String,
}

/// The gate's answer to a tap, sent only once the transaction is durable in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReaderResponse {
    /// Open for entry, open for exit, or reject.
    pub decision: DecisionKind,
    /// Why; shown on the gate display and recorded in the ledger.
    pub reason: Reason,
    /// Fen charged by this tap (0 at entry); on a reject for insufficient balance or an underpaid
    /// token, the fare that was due, for the display (nothing is charged).
    pub fare_fen: u32,
    /// What to write to the card; `None` when nothing changes (rejects, QR codes).
    pub card_write: Option<CardWrite>,
    /// The transaction's gate_seq, for the reader's log and for support; `None` when no
    /// transaction was recorded.
    pub gate_seq: Option<u64>,
}

/// A line the gate sends instead of a [`ReaderResponse`] when it could not decide at all (the
/// request was unreadable, or the gate is not ready). A refused tap is a response, not an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReaderError {
    /// A stable machine code, one of the `ReaderError::*` constants.
    pub error: String,
    /// Human-readable detail for the reader's log.
    pub message: String,
}

impl ReaderError {
    /// The request line is not a valid `{"tap": ...}` JSON object.
    pub const MALFORMED_REQUEST: &'static str = "malformed_request";
    /// The request line is longer than [`MAX_READER_LINE`].
    pub const TOO_LARGE: &'static str = "too_large";
    /// The gate agent cannot decide now (starting, shutting down, storage failed).
    pub const UNAVAILABLE: &'static str = "unavailable";

    pub fn new(error: &str, message: impl Into<String>) -> ReaderError {
        ReaderError { error: error.to_owned(), message: message.into() }
    }
}

/// Any line the gate sends to the reader, for the reader side (and tests) to parse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReaderReply {
    Response(ReaderResponse),
    Error(ReaderError),
}

// ---------------------------------------------------------------------------------------------
// MQTT payloads (SPEC §5), in the order of the table.
// ---------------------------------------------------------------------------------------------

/// `state` while a leader is elected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderState {
    /// The Raft node id of the leader.
    pub leader_node: u64,
    /// Its Raft term; a message with a lower term than one already seen is stale.
    pub term: u64,
    /// When this node became leader.
    pub since: Timestamp,
}

/// `state` as the leader's MQTT will: `{"online": false}`. The optional node and term let a
/// subscriber ignore a late will from a leader already replaced (see the final report / SPEC note).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Offline {
    /// The node whose connection died, when the will names it.
    pub leader_node: Option<u64>,
    /// The term that node led in, when known at connect time.
    pub term: Option<u64>,
}

/// The `state` payload: a leader, or the will of a leader that vanished.
///
/// JSON: `{"online": true, "leader_node", "term", "since"}` (the `online` field may be omitted, as
/// in the SPEC's form) or `{"online": false, ...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StateJson", into = "StateJson")]
pub enum StationState {
    Online(LeaderState),
    Offline(Offline),
}

#[derive(Serialize, Deserialize)]
struct StateJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    online: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    leader_node: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    term: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    since: Option<Timestamp>,
}

/// Why an `online: true` payload (`state` or gate `status`) is incomplete.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("an online message lacks the field `{0}`")]
pub struct MissingField(pub &'static str);

impl TryFrom<StateJson> for StationState {
    type Error = MissingField;
    fn try_from(j: StateJson) -> Result<Self, Self::Error> {
        if j.online == Some(false) {
            return Ok(StationState::Offline(Offline { leader_node: j.leader_node, term: j.term }));
        }
        Ok(StationState::Online(LeaderState {
            leader_node: j.leader_node.ok_or(MissingField("leader_node"))?,
            term: j.term.ok_or(MissingField("term"))?,
            since: j.since.ok_or(MissingField("since"))?,
        }))
    }
}

impl From<StationState> for StateJson {
    fn from(s: StationState) -> Self {
        match s {
            StationState::Online(l) => StateJson {
                online: Some(true),
                leader_node: Some(l.leader_node),
                term: Some(l.term),
                since: Some(l.since),
            },
            StationState::Offline(o) => {
                StateJson { online: Some(false), leader_node: o.leader_node, term: o.term, since: None }
            }
        }
    }
}

/// Why a hex field of a message is unusable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FieldError {
    #[error("field `{field}` is not hexadecimal")]
    NotHex { field: &'static str },
    #[error("field `{field}` has {actual} bytes, expected {expected}")]
    WrongLength { field: &'static str, expected: usize, actual: usize },
}

fn hex_array<const N: usize>(field: &'static str, s: &str) -> Result<[u8; N], FieldError> {
    let bytes = hex::decode(s).map_err(|_| FieldError::NotHex { field })?;
    let actual = bytes.len();
    bytes.try_into().map_err(|_| FieldError::WrongLength { field, expected: N, actual })
}

/// `params/{kind}/current`: which package version gates should hold and how to fetch it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamPointer {
    /// The package version (monotonic per kind); chunks are at `params/{kind}/{version}/{chunk}`.
    pub version: u64,
    /// Lowercase hex sha256 of the whole package, checked after reassembly.
    pub sha256: String,
    /// Package size in bytes, so a gate can refuse an oversized package before downloading it.
    pub size: u64,
    /// Number of chunks (each at most 256 KiB).
    pub chunks: u32,
    /// When gates switch to this version (delivered early, switched also while offline).
    pub effective_from: Timestamp,
}

impl ParamPointer {
    /// The sha256 as bytes, or why the hex is unusable.
    pub fn sha256_bytes(&self) -> Result<[u8; 32], FieldError> {
        hex_array("sha256", &self.sha256)
    }
}

/// `mode`: the station's current bits and the recent history gates need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeMessage {
    /// Mode version, increasing with every change, so a gate ignores a stale retained message
    /// (0 when the publisher does not number them).
    #[serde(default)]
    pub version: u64,
    /// The bits in force at this station now.
    pub bits: ModeBits,
    /// Since when these bits are in force.
    pub since: Timestamp,
    /// When the controllers decided this change, on the same (controller) clock as `since`; only a
    /// scheduled change carries it. A `since` later than it is a future start: the gate applies
    /// the change after `min(since - decided_at, since - its own clock)` by a local timer, so its
    /// own clock being behind never delays a change and a late delivery is not held for the full
    /// lead. Without it (every change so far), a change is in force on receipt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<Timestamp>,
    /// Where the full history can be fetched, if it is too long to carry inline (SPEC §5).
    #[serde(default)]
    pub history_ref: Option<String>,
    /// Mode periods of the last 7 days for any station of the network: the emergency grace rule
    /// and entry_free exit pricing ask about the card's entry station, not only this one.
    #[serde(default)]
    pub history: Vec<ModePeriod>,
}

/// The versions a gate holds of one parameter kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KindVersions {
    /// The version deciding taps now; `None` before the first package of this kind.
    pub active: Option<u64>,
    /// A verified version waiting for its `effective_from`.
    pub pending: Option<u64>,
    /// When the pending version takes effect, for the console's drift view.
    #[serde(default)]
    pub pending_effective_from: Option<Timestamp>,
}

/// How the gate agent reaches its PLC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlcEndpoint {
    /// `host:port` of the Modbus TCP server.
    pub address: String,
    /// The Modbus unit id (default 1).
    pub unit_id: u8,
}

/// What hardware a gate runs on, shown on the console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardwareInfo {
    /// The register-map profile name (`"default"` or a profile file's name).
    pub profile: String,
    pub plc: PlcEndpoint,
    /// The gate agent's version string.
    #[serde(default)]
    pub agent_version: String,
}

/// The birth message of a gate agent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateBirth {
    /// A fresh id per agent start, so the controller tells a restart from a reconnect and matches
    /// a will to the session it ends (a late will of an old session is ignored).
    pub session: String,
    /// Per kind, the versions held.
    pub versions: BTreeMap<ParamKind, KindVersions>,
    pub hardware: HardwareInfo,
}

/// `gates/{gate}/status`: birth `{"online": true, session, versions, hardware}` or will
/// `{"online": false, session}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StatusJson", into = "StatusJson")]
pub enum GateStatus {
    Online(GateBirth),
    Offline {
        /// The session that ended.
        session: String,
    },
}

#[derive(Serialize, Deserialize)]
struct StatusJson {
    online: bool,
    session: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    versions: Option<BTreeMap<ParamKind, KindVersions>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hardware: Option<HardwareInfo>,
}

impl TryFrom<StatusJson> for GateStatus {
    type Error = MissingField;
    fn try_from(j: StatusJson) -> Result<Self, Self::Error> {
        if !j.online {
            return Ok(GateStatus::Offline { session: j.session });
        }
        Ok(GateStatus::Online(GateBirth {
            session: j.session,
            versions: j.versions.unwrap_or_default(),
            hardware: j.hardware.ok_or(MissingField("hardware"))?,
        }))
    }
}

impl From<GateStatus> for StatusJson {
    fn from(s: GateStatus) -> Self {
        match s {
            GateStatus::Online(b) => StatusJson {
                online: true,
                session: b.session,
                versions: Some(b.versions),
                hardware: Some(b.hardware),
            },
            GateStatus::Offline { session } => {
                StatusJson { online: false, session, versions: None, hardware: None }
            }
        }
    }
}

impl GateStatus {
    /// The session this message is about.
    pub fn session(&self) -> &str {
        match self {
            GateStatus::Online(b) => &b.session,
            GateStatus::Offline { session } => session,
        }
    }
}

/// How a gate's aisle is set; the code is the Modbus `direction` holding register (SPEC §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum GateDirection {
    /// No passage either way.
    #[default]
    Closed,
    Entry,
    Exit,
    Bidirectional,
}

impl GateDirection {
    /// The holding-register value: 0 closed, 1 entry, 2 exit, 3 bidirectional.
    pub fn code(self) -> u16 {
        match self {
            GateDirection::Closed => 0,
            GateDirection::Entry => 1,
            GateDirection::Exit => 2,
            GateDirection::Bidirectional => 3,
        }
    }

    pub fn from_code(c: u16) -> Option<GateDirection> {
        match c {
            0 => Some(GateDirection::Closed),
            1 => Some(GateDirection::Entry),
            2 => Some(GateDirection::Exit),
            3 => Some(GateDirection::Bidirectional),
            _ => None,
        }
    }

    /// Whether a passenger may pass this way (otherwise the tap is `wrong_direction`).
    pub fn allows(self, d: Direction) -> bool {
        matches!(
            (self, d),
            (GateDirection::Bidirectional, _)
                | (GateDirection::Entry, Direction::Entry)
                | (GateDirection::Exit, Direction::Exit)
        )
    }
}

/// Monotonic counters since the gate agent started (a decrease means a restart; the controller
/// computes rates from deltas).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct GateCounters {
    /// Taps decided, accepted or not.
    pub taps: u64,
    /// Completed entry passages (from the PLC's counter).
    pub entries: u64,
    /// Completed exit passages (from the PLC's counter).
    pub exits: u64,
    /// Taps refused.
    pub rejects: u64,
    /// Tailgating detections (from the PLC's counter).
    pub tailgating: u64,
    /// Passages without a decision that opened the flaps.
    #[serde(default)]
    pub forced_passage: u64,
}

/// `gates/{gate}/heartbeat`, every 5 s at QoS 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The gate's clock when sent; the controller compares it with its own to detect drift.
    pub at: Timestamp,
    /// Increments per heartbeat, so the controller can count lost ones.
    pub seq: u64,
    pub counters: GateCounters,
    /// Transactions in the outbox not yet acknowledged by the ledger.
    pub outbox_depth: u64,
    /// Bytes the outbox occupies, against its capacity.
    pub outbox_bytes: u64,
    /// The outbox's capacity in bytes (`[outbox] max_bytes`): taps are refused `outbox_full`
    /// when a record no longer fits. 0 from gates that do not send it.
    #[serde(default)]
    pub outbox_capacity_bytes: u64,
    /// Whether the PLC answers; while it does not, the gate refuses taps.
    pub plc_online: bool,
    /// The aisle direction currently set.
    pub direction: GateDirection,
    /// False after an `out_of_service` command.
    pub in_service: bool,
    /// Whether the flaps are held open (emergency release or entry_free).
    pub free_passage: bool,
    /// Alarms active now.
    #[serde(default)]
    pub alarms: Vec<AlarmKind>,
    /// Per kind, the versions held now (as in the birth message). A controller that became leader
    /// after the gate's birth learns them from here within one heartbeat.
    #[serde(default)]
    pub versions: BTreeMap<ParamKind, KindVersions>,
}

/// `gates/{gate}/tx`: transactions from the gate's outbox, in gate_seq order, signed by the gate.
///
/// The records come in one of two forms, exactly one present: `raw`, the canonical bytes of each
/// record as the gate's outbox holds them (what gates send), or `records`, each record as JSON
/// (what gates of earlier versions send). [`TxBatch::canonical_records`] reads either.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxBatch {
    /// Must match the topic's station; the controller refuses a mismatch.
    pub station: Ident,
    /// Must match the topic's gate and every record's gate.
    pub gate: Ident,
    /// The records as JSON: the form of gates of earlier versions, each record encoded again by
    /// whoever checks the signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<Vec<TxRecord>>,
    /// Each record's canonical bytes ([`TxRecord::canonical_bytes`]) in standard base64 with
    /// padding: the bytes the gate's outbox holds and the signature covers, taken as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<Vec<String>>,
    /// Hex of the 64-byte ed25519 signature over the batch (see `ledger`).
    pub signature: String,
    /// The gate's installation id (made once when its store is created; a replaced gate has a new
    /// one). The controller's `tx/ack` names it, so an ack meant for an earlier installation of
    /// the same gate id changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installation: Option<String>,
    /// The first gate_seq this batch covers: the gate holds no record in `covers_from ..` the
    /// last record's gate_seq other than the ones in `records` (it sends from just above its
    /// acknowledged point). A number in that range that is neither here nor in the ledger is lost
    /// (an unreadable outbox frame): the ledger records the gap and acks past it. Signed with the
    /// records (`ledger::batch_signing_bytes_covering`); absent from first-version gates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covers_from: Option<u64>,
}

impl TxBatch {
    /// The signature as bytes, or why the hex is unusable.
    pub fn signature_bytes(&self) -> Result<[u8; 64], FieldError> {
        hex_array("signature", &self.signature)
    }

    /// The `raw` form of `records`: each record's canonical bytes in base64.
    pub fn raw_of(records: &[CanonicalRecord]) -> Vec<String> {
        records.iter().map(|r| BASE64.encode(r.bytes())).collect()
    }

    /// The batch's records with their canonical bytes, from whichever form it carries: `raw`
    /// decoded strictly once each (the bytes kept as received), `records` encoded once each.
    /// Refused when the batch carries both forms or neither, or a raw record that is not base64
    /// or not canonical bytes.
    pub fn canonical_records(&self) -> Result<Vec<CanonicalRecord>, TxBatchError> {
        match (&self.records, &self.raw) {
            (Some(_), Some(_)) => Err(TxBatchError::BothForms),
            (None, None) => Err(TxBatchError::NoRecords),
            (Some(records), None) => Ok(records.iter().cloned().map(CanonicalRecord::from_record).collect()),
            (None, Some(raw)) => raw
                .iter()
                .enumerate()
                .map(|(position, text)| {
                    let bytes = BASE64.decode(text).map_err(|_| TxBatchError::NotBase64 { position })?;
                    CanonicalRecord::from_canonical(bytes)
                        .map_err(|error| TxBatchError::NotCanonical { position, error })
                })
                .collect(),
        }
    }
}

/// Why the records of a [`TxBatch`] cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TxBatchError {
    #[error("tx batch carries both `records` and `raw`; exactly one is allowed")]
    BothForms,
    #[error("tx batch carries neither `records` nor `raw`")]
    NoRecords,
    #[error("tx batch raw record {position} is not standard base64")]
    NotBase64 { position: usize },
    #[error("tx batch raw record {position} is not a record's canonical bytes: {error}")]
    NotCanonical { position: usize, error: LedgerError },
}

/// `gates/{gate}/tx/ack`: every gate_seq up to here is committed; the gate may drop them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxAck {
    /// The highest contiguous gate_seq committed to the ledger.
    pub through_seq: u64,
    /// The installation of the gate whose batch this acks (from [`TxBatch::installation`]); a
    /// gate takes only acks naming its own installation.
    #[serde(default)]
    pub installation: Option<String>,
}

/// Where a gate is with one package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamState {
    /// Verified and stored, waiting for `effective_from`.
    Pending,
    /// Deciding taps.
    Active,
    /// Refused (signature, hash, size or version order); the gate keeps what it had.
    Rejected,
}

/// `gates/{gate}/params/ack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamsAck {
    pub kind: ParamKind,
    pub version: u64,
    pub state: ParamState,
    /// Why a package was rejected.
    #[serde(default)]
    pub reason: Option<String>,
}

/// An operator command and its arguments. JSON: `{"command": "set_direction", "args":
/// {"direction": "entry"}}`; commands without arguments omit `args`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", content = "args", rename_all = "snake_case")]
pub enum CommandKind {
    /// Open once for one entry passage (a passenger the desk let through).
    OpenOnceEntry,
    /// Open once for one exit passage.
    OpenOnceExit,
    /// Set the aisle direction.
    SetDirection { direction: GateDirection },
    /// Show "out of service" and refuse passage.
    OutOfService,
    /// Back in service.
    InService,
}

impl CommandKind {
    /// The snake_case name, as in JSON and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            CommandKind::OpenOnceEntry => "open_once_entry",
            CommandKind::OpenOnceExit => "open_once_exit",
            CommandKind::SetDirection { .. } => "set_direction",
            CommandKind::OutOfService => "out_of_service",
            CommandKind::InService => "in_service",
        }
    }
}

/// `gates/{gate}/cmd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Unique per command; the gate executes an id at most once and acks with it.
    pub id: String,
    /// The gate this command is for; a gate refuses a command naming another gate.
    pub gate: Ident,
    /// What to do (the `command` and `args` fields).
    #[serde(flatten)]
    pub command: CommandKind,
    /// After this instant the gate answers `expired` instead of acting: an "open once" must not
    /// fire minutes later when a delayed message arrives. Mirrors the MQTT message expiry.
    /// Required: a gate remembers executed ids until their expiry, so a redelivered command
    /// (after a restart too) never runs twice.
    pub expires_at: Timestamp,
}

impl Command {
    /// Whether the command has expired at `now`.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        now >= self.expires_at
    }
}

/// The outcome of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CommandResult {
    Ok,
    /// Arrived after `expires_at`; not executed.
    Expired,
    /// Not allowed now (e.g. open_once during emergency release, or an unknown command).
    Rejected,
    /// Tried and failed (e.g. the PLC did not answer).
    Failed,
}

/// `gates/{gate}/cmd/ack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandAck {
    pub id: String,
    pub result: CommandResult,
    #[serde(default)]
    pub detail: Option<String>,
}

/// A gate alarm. Unknown names from a newer gate parse as [`AlarmKind::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlarmKind {
    /// Two passengers passed on one opening.
    Tailgating,
    /// Passage without an opening.
    ForcedPassage,
    /// The PLC reports a mechanism fault.
    DoorFault,
    /// The PLC does not answer; taps are refused.
    PlcOffline,
    /// The hard-wired station emergency / fire-alarm input is active.
    EmergencyInput,
    /// The outbox is close to its capacity (uploads are not acknowledged).
    OutboxNearFull,
    /// The gate's clock differs from the controllers' beyond tolerance.
    ClockDrift,
    /// A package was refused (details in `params/ack`).
    PackageRejected,
    /// The controllers have been unreachable longer than the release-on-loss policy allows.
    ControllerLost,
    /// A `tx/ack` above the last gate_seq this gate ever used was refused (forged, or from
    /// another gate's ledger): acting on it would drop records nobody holds and wrap gate_seq.
    AckBeyondLastSeq,
    /// A message that steers this party failed verification (unsigned, unknown key, bad
    /// signature, or signed for another gate or installation); it changed nothing.
    UnverifiedMessage,
    /// The gate's storage refuses writes (disk full or read-only): taps are refused with
    /// `storage_unavailable` until it takes writes again.
    StorageUnavailable,
    /// Raised by the controller, not the gate: records of this gate committed with an
    /// `occurred_at` implausibly far from the controller's clock (`controller::leader::plausible`).
    ImplausibleTime,
    /// An accepted tap's flaps never opened (the open command to the PLC failed after the reader
    /// was answered): a `passage_not_made` record voids it and the medium may re-tap at this gate
    /// within the re-tap window. Cleared by the next open command the PLC takes.
    PassageNotMade,
    /// A kind this build does not know.
    #[serde(other)]
    Other,
}

impl AlarmKind {
    /// Every kind a gate or the controller raises ([`AlarmKind::Other`] is what an unknown name
    /// from a newer gate reads as, and is listed last): the console names each one.
    pub const ALL: [AlarmKind; 15] = [
        AlarmKind::Tailgating,
        AlarmKind::ForcedPassage,
        AlarmKind::DoorFault,
        AlarmKind::PlcOffline,
        AlarmKind::EmergencyInput,
        AlarmKind::OutboxNearFull,
        AlarmKind::ClockDrift,
        AlarmKind::PackageRejected,
        AlarmKind::ControllerLost,
        AlarmKind::AckBeyondLastSeq,
        AlarmKind::UnverifiedMessage,
        AlarmKind::StorageUnavailable,
        AlarmKind::ImplausibleTime,
        AlarmKind::PassageNotMade,
        AlarmKind::Other,
    ];

    /// Its position in [`AlarmKind::ALL`]: an exhaustive match, so a new kind cannot be added
    /// without listing it there.
    pub fn index(self) -> usize {
        match self {
            AlarmKind::Tailgating => 0,
            AlarmKind::ForcedPassage => 1,
            AlarmKind::DoorFault => 2,
            AlarmKind::PlcOffline => 3,
            AlarmKind::EmergencyInput => 4,
            AlarmKind::OutboxNearFull => 5,
            AlarmKind::ClockDrift => 6,
            AlarmKind::PackageRejected => 7,
            AlarmKind::ControllerLost => 8,
            AlarmKind::AckBeyondLastSeq => 9,
            AlarmKind::UnverifiedMessage => 10,
            AlarmKind::StorageUnavailable => 11,
            AlarmKind::ImplausibleTime => 12,
            AlarmKind::PassageNotMade => 13,
            AlarmKind::Other => 14,
        }
    }
}

/// `gates/{gate}/events`: an alarm raised or cleared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateEvent {
    /// When the gate saw it (gate clock).
    pub at: Timestamp,
    pub kind: AlarmKind,
    /// True when the condition ended (PLC back online, fault cleared); absent means raised.
    #[serde(default)]
    pub cleared: bool,
    #[serde(default)]
    pub detail: Option<String>,
}

/// One QR code use, shared station-wide so a code is refused at every gate once used at one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QrUsed {
    /// The code's issuer (Alipay, WeChat, a bank app ...), as numbered in `qr_keys`.
    pub issuer: u16,
    /// The issuer's account id.
    pub account: u64,
    /// The code's nonce; `(issuer, account, nonce)` identifies a code.
    pub nonce: u64,
    /// When the code expires, so a receiver can drop the entry afterwards.
    pub expires_at: Timestamp,
    /// The gate that accepted it.
    pub gate: Ident,
}

/// `qr/used` and `gates/{gate}/qr/used`: a batch of uses.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QrUsedBatch {
    pub entries: Vec<QrUsed>,
}

// ---------------------------------------------------------------------------------------------
// Codec.
// ---------------------------------------------------------------------------------------------

/// Largest JSON payload [`decode`] accepts. A transaction batch of a few thousand records fits;
/// anything bigger is a bug or an attack, refused before parsing.
pub const MAX_PAYLOAD: usize = 1024 * 1024;

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The payload is empty: on a retained topic, the publisher cleared it.
    #[error("empty payload")]
    Empty,
    #[error("payload of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("payload is not UTF-8 (valid up to byte {valid_up_to})")]
    NotUtf8 { valid_up_to: usize },
    /// Not JSON at all, or truncated.
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// Valid JSON of the wrong shape: a missing field, a wrong type, an unknown enum name.
    #[error("unexpected JSON content: {0}")]
    Invalid(String),
}

/// Every message type of this module: the ones [`encode`] can encode without failing.
///
/// Sealed: each implementor is built from derived impls, string-keyed maps and the infallible
/// `Date`/`Ident` serializers, which is what makes [`encode`] total.
pub trait WireMessage: Serialize + DeserializeOwned + sealed::Sealed {}

mod sealed {
    pub trait Sealed {}
}

macro_rules! wire_messages {
    ($($t:ty),* $(,)?) => {
        $(impl sealed::Sealed for $t {} impl WireMessage for $t {})*
    };
}

wire_messages!(
    ReaderRequest,
    PsamSignRequest,
    PsamReply,
    ReaderResponse,
    ReaderError,
    ReaderReply,
    TapRequest,
    StationState,
    ParamPointer,
    ModeMessage,
    GateStatus,
    Heartbeat,
    TxBatch,
    TxAck,
    ParamsAck,
    Command,
    CommandAck,
    GateEvent,
    QrUsed,
    QrUsedBatch,
);

/// Decodes a payload of at most [`MAX_PAYLOAD`] bytes.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, WireError> {
    decode_with_limit(payload, MAX_PAYLOAD)
}

/// Decodes a payload of at most `limit` bytes (the reader socket uses [`MAX_READER_LINE`]).
/// Surrounding whitespace, such as a line's newline, is allowed.
pub fn decode_with_limit<T: DeserializeOwned>(payload: &[u8], limit: usize) -> Result<T, WireError> {
    if payload.len() > limit {
        return Err(WireError::TooLarge { size: payload.len(), limit });
    }
    if payload.is_empty() {
        return Err(WireError::Empty);
    }
    let text =
        std::str::from_utf8(payload).map_err(|e| WireError::NotUtf8 { valid_up_to: e.valid_up_to() })?;
    serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => WireError::Invalid(e.to_string()),
        _ => WireError::Malformed(e.to_string()),
    })
}

/// Encodes a message as compact JSON.
pub fn encode<T: WireMessage>(msg: &T) -> Vec<u8> {
    // serde_json fails only on an I/O error (a Vec cannot have one), a map key that is not a
    // string (our maps are keyed by ParamKind, a unit-variant enum serialized as a string) or a
    // Serialize impl that returns an error (ours are derived, or collect_str/transparent ones that
    // cannot); WireMessage is sealed to these types, and every one is encoded in the tests.
    #[allow(clippy::expect_used)]
    serde_json::to_vec(msg).expect("wire messages always serialize")
}

/// Encodes a reader line: the JSON followed by `\n`.
pub fn encode_line<T: WireMessage>(msg: &T) -> Vec<u8> {
    let mut out = encode(msg);
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{sign_canonical_batch, verify_canonical_batch, ParamVersions};
    use ed25519_dalek::SigningKey;

    fn tx_record(gate_seq: u64) -> TxRecord {
        TxRecord {
            station: Ident::new("s1").unwrap(),
            gate: Ident::new("g01").unwrap(),
            gate_seq,
            media: Media::Svc,
            id: 42,
            direction: Direction::Entry,
            accepted: true,
            reason: Reason::Ok,
            fare_fen: 0,
            shortfall_fen: 0,
            balance_before: Some(500),
            balance_after: Some(500),
            card_tx_counter: Some(1),
            entry_station: None,
            entry_time: None,
            occurred_at: Timestamp(1_790_000_000_000),
            modes: ModeBits::NORMAL,
            params: ParamVersions::default(),
            replay_unchecked: false,
            qr: None,
            installation: None,
            voids: None,
            bank: None,
            tac: None,
        }
    }

    fn tx_batch(records: Option<Vec<TxRecord>>, raw: Option<Vec<String>>) -> TxBatch {
        TxBatch {
            station: Ident::new("s1").unwrap(),
            gate: Ident::new("g01").unwrap(),
            records,
            raw,
            signature: "00".repeat(64),
            installation: None,
            covers_from: Some(1),
        }
    }

    #[test]
    fn a_raw_batch_and_a_records_batch_of_the_same_records_read_the_same_and_verify_alike() {
        let records: Vec<TxRecord> = (1..=3).map(tx_record).collect();
        let canonical: Vec<CanonicalRecord> = records.iter().cloned().map(CanonicalRecord::from).collect();
        let raw = decode::<TxBatch>(&encode(&tx_batch(None, Some(TxBatch::raw_of(&canonical))))).unwrap();
        let json = decode::<TxBatch>(&encode(&tx_batch(Some(records), None))).unwrap();
        assert_eq!(raw.canonical_records().unwrap(), canonical);
        assert_eq!(json.canonical_records().unwrap(), canonical);
        let key = SigningKey::from_bytes(&[3; 32]);
        let (st, g) = (&raw.station, &raw.gate);
        let sig = sign_canonical_batch(st, g, Some(1), &canonical, &key);
        for b in [&raw, &json] {
            let records = b.canonical_records().unwrap();
            assert_eq!(verify_canonical_batch(st, g, Some(1), &records, &sig, &key.verifying_key()), Ok(()));
        }
        let plain: Vec<TxRecord> = canonical.iter().map(|r| r.record().clone()).collect();
        assert_eq!(
            crate::ledger::verify_batch_covering(st, g, Some(1), &plain, &sig, &key.verifying_key()),
            Ok(()),
            "the same signature as over the records encoded again"
        );
    }

    #[test]
    fn a_tx_batch_with_both_forms_or_neither_is_refused() {
        let canonical = vec![CanonicalRecord::from(tx_record(1))];
        let both = tx_batch(Some(vec![tx_record(1)]), Some(TxBatch::raw_of(&canonical)));
        assert_eq!(both.canonical_records(), Err(TxBatchError::BothForms));
        assert_eq!(tx_batch(None, None).canonical_records(), Err(TxBatchError::NoRecords));
        let neither = br#"{"station":"s1","gate":"g01","signature":"00"}"#;
        assert_eq!(decode::<TxBatch>(neither).unwrap().canonical_records(), Err(TxBatchError::NoRecords));
    }

    #[test]
    fn a_raw_record_that_is_not_canonical_bytes_is_refused() {
        let bytes = tx_record(5).canonical_bytes();
        // gate_seq 5 follows version + "s1" + "g01" at offset 1 + 3 + 4 = 8.
        assert_eq!(bytes[8], 5);
        let mut overlong = bytes[..8].to_vec();
        overlong.extend_from_slice(&[0x85, 0x00]);
        overlong.extend_from_slice(&bytes[9..]);
        let mut trailing = bytes.clone();
        trailing.push(0);
        for (bad, error) in
            [(overlong, LedgerError::OverlongVarint), (trailing, LedgerError::TrailingBytes(1))]
        {
            let raw = vec![BASE64.encode(&bytes), BASE64.encode(bad)];
            assert_eq!(
                tx_batch(None, Some(raw)).canonical_records(),
                Err(TxBatchError::NotCanonical { position: 1, error })
            );
        }
        let raw = vec!["not base64!".to_owned()];
        assert_eq!(
            tx_batch(None, Some(raw)).canonical_records(),
            Err(TxBatchError::NotBase64 { position: 0 })
        );
    }

    #[test]
    fn every_alarm_kind_is_listed_once_in_order() {
        for (i, k) in AlarmKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i, "{k:?}");
        }
        let names: std::collections::BTreeSet<String> =
            AlarmKind::ALL.iter().map(|k| serde_json::to_string(k).unwrap()).collect();
        assert_eq!(names.len(), AlarmKind::ALL.len());
    }

    #[test]
    fn the_spec_examples_parse() {
        assert_eq!(
            decode::<TxAck>(br#"{"through_seq": 42}"#).unwrap(),
            TxAck { through_seq: 42, installation: None }
        );
        assert_eq!(
            decode::<StationState>(br#"{"online":false}"#).unwrap(),
            StationState::Offline(Offline::default())
        );
        assert_eq!(
            decode::<StationState>(br#"{"leader_node":2,"term":7,"since":1700000000000}"#).unwrap(),
            StationState::Online(LeaderState {
                leader_node: 2,
                term: 7,
                since: Timestamp(1_700_000_000_000)
            })
        );
        assert_eq!(
            decode::<GateStatus>(br#"{"online":false,"session":"s-1"}"#).unwrap(),
            GateStatus::Offline { session: "s-1".into() }
        );
    }

    #[test]
    fn an_online_state_without_a_term_is_invalid() {
        let err = decode::<StationState>(br#"{"online":true,"leader_node":1,"since":0}"#).unwrap_err();
        assert!(matches!(err, WireError::Invalid(m) if m.contains("term")));
    }

    #[test]
    fn commands_carry_typed_arguments_and_omit_empty_ones() {
        let cmd = Command {
            id: "c1".into(),
            gate: Ident::new("g01").unwrap(),
            command: CommandKind::SetDirection { direction: GateDirection::Exit },
            expires_at: Timestamp(5),
        };
        let json = String::from_utf8(encode(&cmd)).unwrap();
        assert_eq!(
            json,
            r#"{"id":"c1","gate":"g01","command":"set_direction","args":{"direction":"exit"},"expires_at":5}"#
        );
        let open: Command =
            decode(br#"{"id":"c2","gate":"g01","command":"open_once_entry","expires_at":9}"#).unwrap();
        assert_eq!(open.command, CommandKind::OpenOnceEntry);
        assert!(!open.is_expired(Timestamp(8)));
        assert!(cmd.is_expired(Timestamp(5)));
        assert!(matches!(
            decode::<Command>(br#"{"id":"c3","gate":"g01","command":"self_destruct","expires_at":9}"#),
            Err(WireError::Invalid(_))
        ));
        // A command without its gate or its expiry is refused: neither may be left to chance.
        for missing in [
            &br#"{"id":"c4","command":"open_once_entry","expires_at":9}"#[..],
            br#"{"id":"c5","gate":"g01","command":"open_once_entry"}"#,
        ] {
            assert!(matches!(decode::<Command>(missing), Err(WireError::Invalid(_))));
        }
    }

    #[test]
    fn decode_tells_empty_oversized_non_utf8_malformed_and_invalid_apart() {
        assert_eq!(decode::<TxAck>(b""), Err(WireError::Empty));
        assert_eq!(
            decode_with_limit::<TxAck>(&[b' '; 11], 10),
            Err(WireError::TooLarge { size: 11, limit: 10 })
        );
        assert_eq!(decode::<TxAck>(b"{\"a\xff\":1}"), Err(WireError::NotUtf8 { valid_up_to: 3 }));
        assert!(matches!(decode::<TxAck>(b"{\"through_seq\":"), Err(WireError::Malformed(_))));
        assert!(matches!(decode::<TxAck>(br#"{"through_seq":-1}"#), Err(WireError::Invalid(_))));
    }

    #[test]
    fn unknown_alarm_names_and_extra_fields_are_tolerated() {
        let e: GateEvent = decode(br#"{"at":1,"kind":"smoke","future_field":true}"#).unwrap();
        assert_eq!(e.kind, AlarmKind::Other);
        assert!(!e.cleared);
    }

    #[test]
    fn hex_fields_are_checked_for_digits_and_length() {
        let mut p = ParamPointer {
            version: 1,
            sha256: "ab".repeat(32),
            size: 1,
            chunks: 1,
            effective_from: Timestamp(0),
        };
        assert_eq!(p.sha256_bytes().unwrap(), [0xab; 32]);
        p.sha256 = "ab".into();
        assert_eq!(
            p.sha256_bytes(),
            Err(FieldError::WrongLength { field: "sha256", expected: 32, actual: 1 })
        );
        p.sha256 = "zz".repeat(32);
        assert_eq!(p.sha256_bytes(), Err(FieldError::NotHex { field: "sha256" }));
    }

    #[test]
    fn gate_direction_codes_match_the_modbus_register() {
        for c in 0..4 {
            assert_eq!(GateDirection::from_code(c).unwrap().code(), c);
        }
        assert_eq!(GateDirection::from_code(4), None);
        assert!(GateDirection::Bidirectional.allows(Direction::Exit));
        assert!(!GateDirection::Entry.allows(Direction::Exit));
        assert!(!GateDirection::Closed.allows(Direction::Entry));
    }
}
