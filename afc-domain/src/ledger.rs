//! Ledger records (SPEC §8): the transaction a gate writes for every tap, its canonical bytes, the
//! station ledger's hash chain, and the signature a gate puts on a batch it uploads.
//!
//! # Canonical bytes (version 1)
//!
//! [`TxRecord::canonical_bytes`] is the one encoding that is hashed and signed, so it must never
//! change for a given record. Integers are LEB128 varints ([`crate::varint`]), signed ones zigzag;
//! strings are a varint length then UTF-8; an `Option` is a presence byte (0 or 1) then the value;
//! a `bool` is one byte, 0 or 1.
//!
//! | # | field | encoding |
//! |---|---|---|
//! | 1 | format version | byte `1` |
//! | 2 | `station`, `gate` | length-prefixed string each |
//! | 3 | `gate_seq` | varint |
//! | 4 | `media` | byte, [`Media::code`] |
//! | 5 | `id` | varint |
//! | 6 | `direction` | byte, [`Direction::code`] |
//! | 7 | `accepted` | bool byte |
//! | 8 | `reason` | varint, [`Reason::code`] |
//! | 9 | `fare_fen`, `shortfall_fen` | varint each |
//! | 10 | `balance_before`, `balance_after`, `card_tx_counter` | presence byte + varint each |
//! | 11 | `entry_station` | presence byte + varint |
//! | 12 | `entry_time` | presence byte + zigzag varint (ms) |
//! | 13 | `occurred_at` | zigzag varint (ms) |
//! | 14 | `modes` | varint |
//! | 15 | `params` | 5 varints: fare_table, blacklist, qr_keys, gate_config, mode |
//! | 16 | `replay_unchecked` | bool byte |
//! | 17 | `qr` | presence byte + issuer varint + nonce varint |
//! | 18 | `installation` (versions 2 and 3) | presence byte + 16 bytes |
//! | 19 | `voids` (versions 2 and 3) | presence byte + varint |
//! | 20 | `bank` (version 3 only) | presence byte + 32 bytes token + 8 bytes cryptogram + varint atc |
//! | 21 | `tac` (version 3 only) | presence byte + varint PSAM id + varint PSAM counter + 8 bytes TAC |
//!
//! A record with neither `installation` nor `voids` is written as version 1 (fields 1–17, so
//! every record a gate of the first version wrote keeps its bytes and hash); a record with either
//! and neither `bank` nor `tac` as version 2, which appends fields 18 and 19; a bank tap or a
//! PSAM-signed debit as version 3, which appends fields 18 to 21. A version 2 record with neither
//! `installation` nor `voids`, or a version 3 record with neither `bank` nor `tac`, is not
//! canonical.
//!
//! [`TxRecord::from_canonical`] is strict: it refuses unknown codes, invalid identifiers, trailing
//! bytes and any input that is not exactly what `canonical_bytes` would produce (for instance a
//! varint with redundant continuation bytes), so one record has exactly one byte form and one hash.
//!
//! # Hash chain
//!
//! Ledger indices start at 1. Entry `i` has `hash_i = sha256(hash_{i-1} ‖ canonical bytes)`, with
//! `hash_0 = GENESIS_HASH`. [`verify_chain`] re-derives the hashes of a run of entries.
//!
//! # Gate batches
//!
//! A gate signs each upload with its own ed25519 key over [`batch_signing_bytes`]; the controller
//! checks the signature and that every record belongs to the gate that signed it before anything
//! reaches the ledger.

use std::collections::BTreeSet;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::mode::ModeBits;
use crate::model::{Direction, Ident, Media, Reason, StationCode, Timestamp};
use crate::varint::{self, Reader, VarintError};

/// The parameter versions a decision was made with (0 = none held).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct ParamVersions {
    pub fare_table: u64,
    pub blacklist: u64,
    pub qr_keys: u64,
    pub gate_config: u64,
    pub mode: u64,
}

/// One tap as recorded by a gate. `(station, gate, installation, gate_seq)` is the idempotency
/// key: the gate persists `gate_seq` before using it, and the ledger de-duplicates on it (and
/// refuses a record whose key it holds with other content). A replaced gate (new hardware or a
/// wiped disk, same gate id) has a new installation, so its sequence numbers are its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct TxRecord {
    pub station: Ident,
    pub gate: Ident,
    pub gate_seq: u64,
    pub media: Media,
    /// Card number (svc), account id (qr) or token serial (token).
    pub id: u64,
    pub direction: Direction,
    /// Whether the flaps opened.
    pub accepted: bool,
    pub reason: Reason,
    /// Fen charged by this transaction (svc: taken from the card; token: covered by its paid value;
    /// qr: 0, clearing charges the account). On a refused tap (`accepted == false`) nothing is
    /// charged and this is the fare that was due, as shown on the display.
    pub fare_fen: u32,
    /// Fen not collected under fare_free (recorded for clearing).
    pub shortfall_fen: u32,
    pub balance_before: Option<u32>,
    pub balance_after: Option<u32>,
    /// The card's own transaction counter after this tap (svc), for clearing's card-side checks.
    pub card_tx_counter: Option<u32>,
    pub entry_station: Option<StationCode>,
    pub entry_time: Option<Timestamp>,
    pub occurred_at: Timestamp,
    /// The mode bits in force at this station when the tap was decided.
    pub modes: ModeBits,
    pub params: ParamVersions,
    /// Set when the gate could not confirm a QR code's station-wide replay check (it was cut off
    /// from the controllers) and clearing should check for a duplicate use.
    pub replay_unchecked: bool,
    /// For a QR tap: the code's issuer and nonce, so clearing can find a duplicate use of one code
    /// (the account alone is in `id`).
    pub qr: Option<QrRef>,
    /// The gate installation that numbered this record (made once when the gate's store was
    /// created); `None` only in records of gates of the first version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installation: Option<Installation>,
    /// On a compensating record: the gate_seq (same gate and installation) of the accepted tap
    /// whose passage did not happen (the flaps never opened), which this record voids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voids: Option<u64>,
    /// For a bank tap: the payment token, cryptogram and counter clearing charges with (the
    /// ledger id `id` is the token's deny key, its first 8 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bank: Option<crate::bank::BankRef>,
    /// For a stored-value debit signed by the reader's PSAM: its id, counter and the TAC over
    /// the debit, which clearing verifies with the issuer's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tac: Option<TacRef>,
}

/// The PSAM's signature of one stored-value debit (a TAC), as the ledger keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct TacRef {
    /// The PSAM (secure access module) that computed the TAC.
    pub psam: u64,
    /// The PSAM's own transaction counter for this debit.
    pub psam_seq: u32,
    /// The transaction authentication code, 16 hex digits in JSON.
    #[serde(with = "hex_8")]
    #[cfg_attr(feature = "schema", schema(value_type = String, format = "hex"))]
    pub tac: [u8; 8],
}

mod hex_8 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 8], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 8];
        hex::decode_to_slice(text.as_bytes(), &mut out)
            .map_err(|_| serde::de::Error::custom("a TAC is 16 hex digits"))?;
        Ok(out)
    }
}

/// A gate installation's identity: 16 random bytes made when its store is first created, shown
/// and carried as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "schema", schema(value_type = String, format = "hex", example = "00112233445566778899aabbccddeeff"))]
pub struct Installation(pub [u8; 16]);

impl Installation {
    /// Parses 32 hex digits.
    pub fn parse(hex_text: &str) -> Option<Installation> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(hex_text.as_bytes(), &mut out).ok()?;
        Some(Installation(out))
    }
}

impl std::fmt::Display for Installation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl Serialize for Installation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Installation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Installation::parse(&text)
            .ok_or_else(|| serde::de::Error::custom("installation: expected 32 hex digits"))
    }
}

/// A run of a gate's sequence numbers that will never reach the ledger: the gate's signed batch
/// covered them ([`crate::wire::TxBatch::covers_from`]) and held none of them (an outbox frame it
/// could not read). The station ledger records it through Raft so the gate's later records are
/// acked, raises an alarm, and reports it to clearing (`POST /v1/stations/{station}/gaps`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct SequenceGap {
    /// From 1, in the order the station recorded them.
    pub id: u64,
    pub gate: Ident,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installation: Option<Installation>,
    pub from_seq: u64,
    pub to_seq: u64,
    /// The ledger index the gate's next record got (where in the chain the gap shows).
    pub ledger_index: u64,
    /// The gate's time of the record after the gap.
    pub noticed_at: Timestamp,
}

/// Which QR code a transaction used: with the account (`TxRecord::id`) it identifies the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct QrRef {
    pub issuer: u16,
    pub nonce: u64,
}

/// The format version byte of a record without `installation` and `voids` (first-version gates).
pub const CANONICAL_VERSION: u8 = 1;
/// The format version byte of a record with an `installation` or `voids`.
pub const CANONICAL_VERSION_2: u8 = 2;
/// The format version byte of a record with `bank` (a bank tap) or `tac` (a PSAM-signed debit).
pub const CANONICAL_VERSION_3: u8 = 3;

/// The hash before the first ledger entry.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// Prefix of the bytes a gate signs for a batch, so a batch signature can never be confused with a
/// signature the same key makes over anything else.
pub const BATCH_SIGNING_DOMAIN: &[u8] = b"afc/v1/gate-tx-batch\0";

/// How far above its contiguous high-water mark a gate's sequence number may run ahead and still be
/// remembered (bounds [`GateProgress`] memory to about 64 Ki numbers per gate).
pub const GATE_SEQ_WINDOW: u64 = 65_536;

/// Which field of a record a decoding error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Station,
    Gate,
    Accepted,
    Reason,
    BalanceBefore,
    BalanceAfter,
    CardTxCounter,
    EntryStation,
    EntryTime,
    Modes,
    ReplayUnchecked,
    Qr,
    Installation,
    Voids,
    Bank,
    Tac,
}

/// Why canonical bytes or a gate batch were refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LedgerError {
    #[error("record bytes end in the middle of a field")]
    Truncated,
    #[error("record contains a variable-length integer that is too long")]
    OverlongVarint,
    #[error("unknown record format version {0}")]
    UnknownVersion(u8),
    #[error("unknown media code {0}")]
    UnknownMedia(u8),
    #[error("unknown direction code {0}")]
    UnknownDirection(u8),
    #[error("unknown reason code {0}")]
    UnknownReason(u64),
    #[error("field {0:?} holds a value out of its range")]
    OutOfRange(Field),
    #[error("field {field:?} has boolean or presence byte {byte}, expected 0 or 1")]
    BadFlag { field: Field, byte: u8 },
    #[error("field {0:?} is not a valid identifier")]
    InvalidIdent(Field),
    #[error("{0} bytes follow the record")]
    TrailingBytes(usize),
    #[error("record bytes are not in canonical form")]
    NonCanonical,
    #[error("batch record {position} has gate_seq 0; gate sequence numbers start at 1")]
    ZeroGateSeq { position: usize },
    #[error("batch record {position} belongs to another station or gate than the batch")]
    ForeignRecord { position: usize },
    #[error("batch signature does not verify")]
    BadSignature,
}

impl From<VarintError> for LedgerError {
    fn from(e: VarintError) -> Self {
        match e {
            VarintError::Truncated => LedgerError::Truncated,
            VarintError::Overlong => LedgerError::OverlongVarint,
        }
    }
}

impl TxRecord {
    /// The record's canonical bytes (see the module documentation for the layout).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.station.as_str().len() + self.gate.as_str().len());
        self.write_canonical(&mut out);
        out
    }

    fn write_canonical(&self, out: &mut Vec<u8>) {
        let v3 = self.bank.is_some() || self.tac.is_some();
        let v2 = v3 || self.installation.is_some() || self.voids.is_some();
        out.push(if v3 {
            CANONICAL_VERSION_3
        } else if v2 {
            CANONICAL_VERSION_2
        } else {
            CANONICAL_VERSION
        });
        put_str(out, self.station.as_str());
        put_str(out, self.gate.as_str());
        varint::put_u64(out, self.gate_seq);
        out.push(self.media.code());
        varint::put_u64(out, self.id);
        out.push(self.direction.code());
        out.push(u8::from(self.accepted));
        varint::put_u64(out, u64::from(self.reason.code()));
        varint::put_u64(out, u64::from(self.fare_fen));
        varint::put_u64(out, u64::from(self.shortfall_fen));
        put_opt(out, self.balance_before.map(u64::from));
        put_opt(out, self.balance_after.map(u64::from));
        put_opt(out, self.card_tx_counter.map(u64::from));
        put_opt(out, self.entry_station.map(|s| u64::from(s.0)));
        match self.entry_time {
            None => out.push(0),
            Some(t) => {
                out.push(1);
                varint::put_i64(out, t.0);
            }
        }
        varint::put_i64(out, self.occurred_at.0);
        varint::put_u64(out, u64::from(self.modes.0));
        let p = &self.params;
        for v in [p.fare_table, p.blacklist, p.qr_keys, p.gate_config, p.mode] {
            varint::put_u64(out, v);
        }
        out.push(u8::from(self.replay_unchecked));
        match self.qr {
            None => out.push(0),
            Some(q) => {
                out.push(1);
                varint::put_u64(out, u64::from(q.issuer));
                varint::put_u64(out, q.nonce);
            }
        }
        if v2 {
            match self.installation {
                None => out.push(0),
                Some(i) => {
                    out.push(1);
                    out.extend_from_slice(&i.0);
                }
            }
            put_opt(out, self.voids);
        }
        if v3 {
            match &self.bank {
                None => out.push(0),
                Some(b) => {
                    out.push(1);
                    out.extend_from_slice(&b.token.0);
                    out.extend_from_slice(&b.cryptogram.0);
                    varint::put_u64(out, u64::from(b.atc));
                }
            }
            match &self.tac {
                None => out.push(0),
                Some(t) => {
                    out.push(1);
                    varint::put_u64(out, t.psam);
                    varint::put_u64(out, u64::from(t.psam_seq));
                    out.extend_from_slice(&t.tac);
                }
            }
        }
    }

    /// Decodes canonical bytes, refusing anything `canonical_bytes` would not have produced.
    pub fn from_canonical(bytes: &[u8]) -> Result<TxRecord, LedgerError> {
        let mut r = Reader::new(bytes);
        let version = r.byte()?;
        if !(CANONICAL_VERSION..=CANONICAL_VERSION_3).contains(&version) {
            return Err(LedgerError::UnknownVersion(version));
        }
        let station = get_ident(&mut r, Field::Station)?;
        let gate = get_ident(&mut r, Field::Gate)?;
        let gate_seq = r.u64()?;
        let media_code = r.byte()?;
        let media = Media::from_code(media_code).ok_or(LedgerError::UnknownMedia(media_code))?;
        let id = r.u64()?;
        let direction_code = r.byte()?;
        let direction =
            Direction::from_code(direction_code).ok_or(LedgerError::UnknownDirection(direction_code))?;
        let accepted = get_bool(&mut r, Field::Accepted)?;
        let reason_code = r.u64()?;
        let reason = u16::try_from(reason_code)
            .ok()
            .and_then(Reason::from_code)
            .ok_or(LedgerError::UnknownReason(reason_code))?;
        let fare_fen = r.u32()?;
        let shortfall_fen = r.u32()?;
        let balance_before = get_opt_u32(&mut r, Field::BalanceBefore)?;
        let balance_after = get_opt_u32(&mut r, Field::BalanceAfter)?;
        let card_tx_counter = get_opt_u32(&mut r, Field::CardTxCounter)?;
        let entry_station = if get_bool(&mut r, Field::EntryStation)? {
            Some(StationCode(get_u16(&mut r, Field::EntryStation)?))
        } else {
            None
        };
        let entry_time = if get_bool(&mut r, Field::EntryTime)? { Some(Timestamp(r.i64()?)) } else { None };
        let occurred_at = Timestamp(r.i64()?);
        let modes = ModeBits(get_u16(&mut r, Field::Modes)?);
        let params = ParamVersions {
            fare_table: r.u64()?,
            blacklist: r.u64()?,
            qr_keys: r.u64()?,
            gate_config: r.u64()?,
            mode: r.u64()?,
        };
        let replay_unchecked = get_bool(&mut r, Field::ReplayUnchecked)?;
        let qr = if get_bool(&mut r, Field::Qr)? {
            Some(QrRef { issuer: get_u16(&mut r, Field::Qr)?, nonce: r.u64()? })
        } else {
            None
        };
        let (mut installation, mut voids, mut bank, mut tac) = (None, None, None, None);
        if version >= CANONICAL_VERSION_2 {
            if get_bool(&mut r, Field::Installation)? {
                let mut id = [0u8; 16];
                for b in &mut id {
                    *b = r.byte()?;
                }
                installation = Some(Installation(id));
            }
            if get_bool(&mut r, Field::Voids)? {
                voids = Some(r.u64()?);
            }
        }
        if version == CANONICAL_VERSION_3 {
            if get_bool(&mut r, Field::Bank)? {
                let mut token = [0u8; 32];
                for b in &mut token {
                    *b = r.byte()?;
                }
                let mut cryptogram = [0u8; 8];
                for b in &mut cryptogram {
                    *b = r.byte()?;
                }
                let atc = get_u16(&mut r, Field::Bank)?;
                bank = Some(crate::bank::BankRef {
                    token: crate::bank::BankToken(token),
                    cryptogram: crate::bank::Cryptogram(cryptogram),
                    atc,
                });
            }
            if get_bool(&mut r, Field::Tac)? {
                let psam = r.u64()?;
                let psam_seq = r.u32()?;
                let mut code = [0u8; 8];
                for b in &mut code {
                    *b = r.byte()?;
                }
                tac = Some(TacRef { psam, psam_seq, tac: code });
            }
        }
        if !r.is_empty() {
            return Err(LedgerError::TrailingBytes(r.remaining()));
        }
        let record = TxRecord {
            station,
            gate,
            gate_seq,
            media,
            id,
            direction,
            accepted,
            reason,
            fare_fen,
            shortfall_fen,
            balance_before,
            balance_after,
            card_tx_counter,
            entry_station,
            entry_time,
            occurred_at,
            modes,
            params,
            replay_unchecked,
            qr,
            installation,
            voids,
            bank,
            tac,
        };
        // Varints accept redundant continuation bytes; re-encoding catches every such alias.
        if record.canonical_bytes() != bytes {
            return Err(LedgerError::NonCanonical);
        }
        Ok(record)
    }

    /// The record's idempotency key.
    pub fn key(&self) -> (&Ident, &Ident, Option<Installation>, u64) {
        (&self.station, &self.gate, self.installation, self.gate_seq)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    varint::put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            varint::put_u64(out, v);
        }
    }
}

fn get_bool(r: &mut Reader<'_>, field: Field) -> Result<bool, LedgerError> {
    match r.byte()? {
        0 => Ok(false),
        1 => Ok(true),
        byte => Err(LedgerError::BadFlag { field, byte }),
    }
}

fn get_u16(r: &mut Reader<'_>, field: Field) -> Result<u16, LedgerError> {
    u16::try_from(r.u64()?).map_err(|_| LedgerError::OutOfRange(field))
}

fn get_opt_u32(r: &mut Reader<'_>, field: Field) -> Result<Option<u32>, LedgerError> {
    if get_bool(r, field)? {
        Ok(Some(u32::try_from(r.u64()?).map_err(|_| LedgerError::OutOfRange(field))?))
    } else {
        Ok(None)
    }
}

fn get_ident(r: &mut Reader<'_>, field: Field) -> Result<Ident, LedgerError> {
    let len = r.u64()?;
    // An identifier is at most 64 bytes; refusing longer lengths early also bounds the read.
    if len > 64 {
        return Err(LedgerError::InvalidIdent(field));
    }
    let raw = r.bytes(len as usize)?;
    let s = std::str::from_utf8(raw).map_err(|_| LedgerError::InvalidIdent(field))?;
    Ident::new(s).map_err(|_| LedgerError::InvalidIdent(field))
}

/// The chain hash of `record` following `prev`: `sha256(prev ‖ canonical bytes)`.
pub fn chain_hash(prev: &[u8; 32], record: &TxRecord) -> [u8; 32] {
    chain_hash_canonical(prev, &record.canonical_bytes())
}

/// [`chain_hash`] over a record's canonical bytes as they are (a [`CanonicalRecord::bytes`] or
/// bytes read back from a store), without encoding the record again.
pub fn chain_hash_canonical(prev: &[u8; 32], canonical: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical);
    h.finalize().into()
}

/// A record with its canonical bytes, which always agree: made only by a strict decode of the
/// bytes ([`CanonicalRecord::from_canonical`]) or by encoding a record once
/// ([`CanonicalRecord::from_record`]). The bytes a gate wrote to its outbox travel in this form to
/// the ledger, so they are signed, replicated, hashed and stored as they are, never encoded again.
///
/// JSON: the record's own JSON (a [`TxRecord`]), so a type that carries these serializes as one
/// that carried records; deserializing encodes the record once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalRecord {
    /// `record.canonical_bytes()`, held so that nothing on the way encodes the record again.
    bytes: Vec<u8>,
    /// The decoded record, for the checks made on its fields.
    record: TxRecord,
}

impl CanonicalRecord {
    /// Decodes `bytes` strictly ([`TxRecord::from_canonical`]) and keeps them: they are exactly
    /// the canonical bytes of the record, so hashing or signing them is hashing the record.
    pub fn from_canonical(bytes: Vec<u8>) -> Result<CanonicalRecord, LedgerError> {
        let record = TxRecord::from_canonical(&bytes)?;
        Ok(CanonicalRecord { bytes, record })
    }

    /// Encodes `record` once.
    pub fn from_record(record: TxRecord) -> CanonicalRecord {
        CanonicalRecord { bytes: record.canonical_bytes(), record }
    }

    /// The canonical bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The record.
    pub fn record(&self) -> &TxRecord {
        &self.record
    }

    /// The record, dropping its bytes.
    pub fn into_record(self) -> TxRecord {
        self.record
    }

    /// The canonical bytes, dropping the record.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

impl From<TxRecord> for CanonicalRecord {
    fn from(record: TxRecord) -> Self {
        CanonicalRecord::from_record(record)
    }
}

impl std::ops::Deref for CanonicalRecord {
    type Target = TxRecord;

    fn deref(&self) -> &TxRecord {
        &self.record
    }
}

impl Serialize for CanonicalRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.record.serialize(s)
    }
}

impl<'de> Deserialize<'de> for CanonicalRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TxRecord::deserialize(d).map(CanonicalRecord::from_record)
    }
}

/// One record as stored in the station ledger.
///
/// There is no `prev_hash` field: entries are contiguous, so an entry's predecessor hash is the
/// previous entry's `hash` (or the `prev_hash` a batch or query carries for its first entry), and
/// leaving it out saves 32 bytes per stored record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct LedgerEntry {
    /// The contiguous ledger index, from 1; clearing batches are ranges of it.
    pub index: u64,
    /// `sha256(previous hash ‖ canonical bytes of record)`, hex in JSON.
    #[serde(with = "hex_array")]
    #[cfg_attr(feature = "schema", schema(value_type = String, format = "hex"))]
    pub hash: [u8; 32],
    pub record: TxRecord,
}

impl LedgerEntry {
    /// An entry at `index` following `prev_hash`, with its hash computed.
    pub fn new(index: u64, prev_hash: &[u8; 32], record: TxRecord) -> LedgerEntry {
        LedgerEntry { index, hash: chain_hash(prev_hash, &record), record }
    }
}

/// Why a run of ledger entries does not chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ChainError {
    #[error("entry at position {position} has index {found}, expected {expected}")]
    IndexGap { position: usize, expected: u64, found: u64 },
    #[error("entry {index} has a hash that does not follow from its record and predecessor")]
    HashMismatch { index: u64 },
}

/// Checks that `entries` are numbered `first_index, first_index + 1, …` and that each hash follows
/// from its record and its predecessor (the first from `prev_hash`). Returns the last hash
/// (`prev_hash` itself for an empty run), or the first entry that is wrong.
pub fn verify_chain(
    prev_hash: [u8; 32],
    first_index: u64,
    entries: &[LedgerEntry],
) -> Result<[u8; 32], ChainError> {
    verify_chain_keeping(prev_hash, first_index, entries).map(|(last, _)| last)
}

/// [`verify_chain`], also returning the canonical bytes of each entry's record that were hashed
/// (each record encoded once), for a caller that stores what it verified.
pub fn verify_chain_keeping(
    prev_hash: [u8; 32],
    first_index: u64,
    entries: &[LedgerEntry],
) -> Result<([u8; 32], Vec<Vec<u8>>), ChainError> {
    let mut canonical = Vec::with_capacity(entries.len());
    let mut prev = prev_hash;
    let mut expected = Some(first_index);
    for (position, entry) in entries.iter().enumerate() {
        // `expected` is None only past u64::MAX, where no entry can be correctly numbered.
        if expected != Some(entry.index) {
            return Err(ChainError::IndexGap {
                position,
                expected: expected.unwrap_or(u64::MAX),
                found: entry.index,
            });
        }
        let bytes = entry.record.canonical_bytes();
        if chain_hash_canonical(&prev, &bytes) != entry.hash {
            return Err(ChainError::HashMismatch { index: entry.index });
        }
        canonical.push(bytes);
        prev = entry.hash;
        expected = entry.index.checked_add(1);
    }
    Ok((prev, canonical))
}

/// Where the ledger ends: the state the replicated state machine keeps to append the next record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerHead {
    /// The index the next appended record gets (1 for an empty ledger).
    pub next_index: u64,
    /// The hash of the last entry ([`GENESIS_HASH`] for an empty ledger), hex in JSON.
    #[serde(with = "hex_array")]
    pub last_hash: [u8; 32],
}

impl Default for LedgerHead {
    fn default() -> Self {
        LedgerHead::genesis()
    }
}

impl LedgerHead {
    /// The head of an empty ledger.
    pub fn genesis() -> LedgerHead {
        LedgerHead { next_index: 1, last_hash: GENESIS_HASH }
    }

    /// The index of the last entry (0 for an empty ledger).
    pub fn last_index(&self) -> u64 {
        self.next_index.saturating_sub(1)
    }

    /// Appends `record` unconditionally and returns its entry.
    pub fn append(&mut self, record: TxRecord) -> LedgerEntry {
        let entry = LedgerEntry::new(self.next_index, &self.last_hash, record);
        // Saturating: reaching u64::MAX needs 10^6 records a second for 584,000 years.
        self.next_index = self.next_index.saturating_add(1);
        self.last_hash = entry.hash;
        entry
    }

    /// The ledger's de-duplicating append: records `record.gate_seq` in the gate's `progress` and
    /// appends the record if it is new. Returns `None` for a re-sent record (a no-op), a
    /// `gate_seq` of 0, or one too far ahead of the gate's high-water mark (the gate re-sends it).
    pub fn append_new(&mut self, progress: &mut GateProgress, record: TxRecord) -> Option<LedgerEntry> {
        if progress.record(record.gate_seq) {
            Some(self.append(record))
        } else {
            None
        }
    }
}

/// What the ledger would do with a gate sequence number, see [`GateProgress::classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStatus {
    /// Not yet in the ledger: append it.
    New,
    /// Already in the ledger: a re-send, do nothing.
    Duplicate,
    /// 0 is never a valid gate sequence number.
    Zero,
    /// More than [`GATE_SEQ_WINDOW`] above the contiguous mark; not remembered, the gate re-sends.
    BeyondWindow,
}

/// Which sequence numbers of one gate are already in the ledger.
///
/// Gate sequence numbers start at 1. Memory is bounded by the out-of-order window: `pending` only
/// ever holds numbers in `contiguous_through + 2 ..= contiguous_through + GATE_SEQ_WINDOW`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateProgress {
    /// The highest `gate_seq` such that every seq in `1..=it` is in the ledger; this is the
    /// `through_seq` the controller acknowledges to the gate, which may then drop them.
    pub contiguous_through: u64,
    /// Sequence numbers above `contiguous_through + 1` already in the ledger (arrived out of order).
    pub pending: BTreeSet<u64>,
}

impl GateProgress {
    /// Whether `seq` is already in the ledger.
    pub fn contains(&self, seq: u64) -> bool {
        (seq != 0 && seq <= self.contiguous_through) || self.pending.contains(&seq)
    }

    /// What [`record`](Self::record) would do with `seq`.
    pub fn classify(&self, seq: u64) -> SeqStatus {
        if seq == 0 {
            SeqStatus::Zero
        } else if self.contains(seq) {
            SeqStatus::Duplicate
        } else if seq - self.contiguous_through > GATE_SEQ_WINDOW {
            // seq > contiguous_through here, since contains() covers 1..=contiguous_through.
            SeqStatus::BeyondWindow
        } else {
            SeqStatus::New
        }
    }

    /// Marks `seq` as in the ledger. Returns `true` if it was new (append the record), `false` for
    /// a duplicate, a 0, or a seq beyond the window (see [`classify`](Self::classify)).
    pub fn record(&mut self, seq: u64) -> bool {
        if self.classify(seq) != SeqStatus::New {
            return false;
        }
        if seq == self.contiguous_through + 1 {
            self.contiguous_through = seq;
            while self.pending.first() == Some(&(self.contiguous_through + 1)) {
                self.pending.pop_first();
                self.contiguous_through += 1;
            }
        } else {
            self.pending.insert(seq);
        }
        true
    }

    /// Marks `from..=to` as settled because the gate no longer holds them (its signed batch
    /// covers the range and carries none of them): returns the sub-ranges that were not in the
    /// ledger (the sequence gaps to record) and moves the contiguous mark to at least `to`. Only
    /// at the contiguous edge: a range that starts above `contiguous_through + 1` changes nothing
    /// (returns no gap), since nothing says what happened below it.
    pub fn fill(&mut self, from: u64, to: u64) -> Vec<(u64, u64)> {
        let from = from.max(1).max(self.contiguous_through + 1);
        if to < from || from != self.contiguous_through + 1 {
            return Vec::new();
        }
        let mut gaps = Vec::new();
        let mut next = from;
        while let Some(&p) = self.pending.first() {
            if p > to {
                break;
            }
            self.pending.pop_first();
            if p > next {
                gaps.push((next, p - 1));
            }
            next = p + 1;
        }
        if next <= to {
            gaps.push((next, to));
        }
        self.contiguous_through = to;
        while self.pending.first() == Some(&(self.contiguous_through + 1)) {
            self.pending.pop_first();
            self.contiguous_through += 1;
        }
        gaps
    }
}

/// The bytes a gate signs for a batch of its records:
/// `BATCH_SIGNING_DOMAIN ‖ len ‖ station ‖ len ‖ gate ‖ count ‖ (len ‖ canonical bytes)*`,
/// lengths and count as varints. A batch that says which range of sequence numbers it covers
/// ([`covers_from`](crate::wire::TxBatch::covers_from)) is signed under
/// `BATCH_SIGNING_DOMAIN_V2 ‖ len ‖ station ‖ len ‖ gate ‖ covers_from ‖ count ‖ …` instead.
pub fn batch_signing_bytes(station: &Ident, gate: &Ident, records: &[TxRecord]) -> Vec<u8> {
    batch_signing_bytes_covering(station, gate, None, records)
}

/// Prefix of the bytes a gate signs for a batch that names the range it covers.
pub const BATCH_SIGNING_DOMAIN_V2: &[u8] = b"afc/v2/gate-tx-batch\0";

/// [`batch_signing_bytes`], with the first sequence number the batch covers when it names one.
pub fn batch_signing_bytes_covering(
    station: &Ident,
    gate: &Ident,
    covers_from: Option<u64>,
    records: &[TxRecord],
) -> Vec<u8> {
    let mut out = batch_signing_head(station, gate, covers_from, records.len(), records.len() * 100);
    let mut buf = Vec::with_capacity(96);
    for record in records {
        buf.clear();
        record.write_canonical(&mut buf);
        varint::put_u64(&mut out, buf.len() as u64);
        out.extend_from_slice(&buf);
    }
    out
}

/// What a batch signature covers before its records: the domain, station, gate, the covered
/// start (v2 only) and the record count; room reserved for `records_size` more bytes.
fn batch_signing_head(
    station: &Ident,
    gate: &Ident,
    covers_from: Option<u64>,
    count: usize,
    records_size: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(BATCH_SIGNING_DOMAIN_V2.len() + 170 + records_size);
    out.extend_from_slice(if covers_from.is_some() { BATCH_SIGNING_DOMAIN_V2 } else { BATCH_SIGNING_DOMAIN });
    put_str(&mut out, station.as_str());
    put_str(&mut out, gate.as_str());
    if let Some(from) = covers_from {
        varint::put_u64(&mut out, from);
    }
    varint::put_u64(&mut out, count as u64);
    out
}

/// [`batch_signing_bytes_covering`] over records' canonical bytes as they are: the same bytes
/// for the same records, with no record encoded again.
pub fn canonical_batch_signing_bytes(
    station: &Ident,
    gate: &Ident,
    covers_from: Option<u64>,
    records: &[CanonicalRecord],
) -> Vec<u8> {
    let size: usize = records.iter().map(|r| r.bytes.len() + 2).sum();
    let mut out = batch_signing_head(station, gate, covers_from, records.len(), size);
    for record in records {
        varint::put_u64(&mut out, record.bytes.len() as u64);
        out.extend_from_slice(&record.bytes);
    }
    out
}

/// A gate's signature over a batch of its records.
pub fn sign_batch(station: &Ident, gate: &Ident, records: &[TxRecord], key: &SigningKey) -> [u8; 64] {
    sign_batch_covering(station, gate, None, records, key)
}

/// A gate's signature over a batch that covers `covers_from..=` its last record.
pub fn sign_batch_covering(
    station: &Ident,
    gate: &Ident,
    covers_from: Option<u64>,
    records: &[TxRecord],
    key: &SigningKey,
) -> [u8; 64] {
    key.sign(&batch_signing_bytes_covering(station, gate, covers_from, records)).to_bytes()
}

/// [`sign_batch_covering`] over records' canonical bytes as they are (the gate signs what its
/// outbox holds).
pub fn sign_canonical_batch(
    station: &Ident,
    gate: &Ident,
    covers_from: Option<u64>,
    records: &[CanonicalRecord],
    key: &SigningKey,
) -> [u8; 64] {
    key.sign(&canonical_batch_signing_bytes(station, gate, covers_from, records)).to_bytes()
}

/// [`verify_batch_covering`] over records' canonical bytes as received: the same checks, the
/// signature verified over the bytes the gate signed, no record encoded again.
pub fn verify_canonical_batch(
    station: &Ident,
    gate: &Ident,
    covers_from: Option<u64>,
    records: &[CanonicalRecord],
    signature: &[u8; 64],
    key: &VerifyingKey,
) -> Result<(), LedgerError> {
    check_batch_records(station, gate, records.iter().map(CanonicalRecord::record))?;
    let signature = Signature::from_bytes(signature);
    key.verify_strict(&canonical_batch_signing_bytes(station, gate, covers_from, records), &signature)
        .map_err(|_| LedgerError::BadSignature)
}

/// Every record of a batch names its station and gate and has a non-zero `gate_seq`.
fn check_batch_records<'a>(
    station: &Ident,
    gate: &Ident,
    records: impl Iterator<Item = &'a TxRecord>,
) -> Result<(), LedgerError> {
    for (position, record) in records.enumerate() {
        if &record.station != station || &record.gate != gate {
            return Err(LedgerError::ForeignRecord { position });
        }
        if record.gate_seq == 0 {
            return Err(LedgerError::ZeroGateSeq { position });
        }
    }
    Ok(())
}

/// Checks a gate batch: every record names this station and gate with a non-zero `gate_seq`, and
/// the signature verifies under the gate's key (strict ed25519: no malleable signatures).
pub fn verify_batch(
    station: &Ident,
    gate: &Ident,
    records: &[TxRecord],
    signature: &[u8; 64],
    key: &VerifyingKey,
) -> Result<(), LedgerError> {
    verify_batch_covering(station, gate, None, records, signature, key)
}

/// [`verify_batch`] for a batch that may name the first sequence number it covers.
pub fn verify_batch_covering(
    station: &Ident,
    gate: &Ident,
    covers_from: Option<u64>,
    records: &[TxRecord],
    signature: &[u8; 64],
    key: &VerifyingKey,
) -> Result<(), LedgerError> {
    check_batch_records(station, gate, records.iter())?;
    let signature = Signature::from_bytes(signature);
    key.verify_strict(&batch_signing_bytes_covering(station, gate, covers_from, records), &signature)
        .map_err(|_| LedgerError::BadSignature)
}

/// Serde helper: a fixed-size byte array as a lowercase hex string (hashes, public keys).
///
/// Use with `#[serde(with = "hex_array")]`.
pub mod hex_array {
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(bytes: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if text.len() != 2 * N {
            return Err(de::Error::invalid_length(text.len(), &"a hex string of the right length"));
        }
        let mut out = [0u8; N];
        hex::decode_to_slice(text.as_bytes(), &mut out).map_err(de::Error::custom)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(s: &str) -> Ident {
        Ident::new(s).unwrap()
    }

    fn sample(seq: u64) -> TxRecord {
        TxRecord {
            station: ident("xian_rd"),
            gate: ident("g01"),
            gate_seq: seq,
            media: Media::Svc,
            id: 3_100_000_000_123,
            direction: Direction::Exit,
            accepted: true,
            reason: Reason::Ok,
            fare_fen: 320,
            shortfall_fen: 0,
            balance_before: Some(5_000),
            balance_after: Some(4_680),
            card_tx_counter: Some(77),
            entry_station: Some(StationCode(105)),
            entry_time: Some(Timestamp(1_790_000_000_000)),
            occurred_at: Timestamp(1_790_000_900_000),
            modes: ModeBits::NORMAL,
            params: ParamVersions { fare_table: 3, blacklist: 120, qr_keys: 2, gate_config: 1, mode: 9 },
            replay_unchecked: false,
            qr: None,
            installation: None,
            voids: None,
            bank: None,
            tac: None,
        }
    }

    fn bare(seq: u64) -> TxRecord {
        TxRecord {
            media: Media::Qr,
            direction: Direction::Entry,
            balance_before: None,
            balance_after: None,
            card_tx_counter: None,
            entry_station: None,
            entry_time: None,
            replay_unchecked: true,
            qr: Some(QrRef { issuer: 3, nonce: u64::MAX }),
            ..sample(seq)
        }
    }

    #[test]
    fn a_record_round_trips_through_canonical_bytes_with_options_set_and_unset() {
        for r in [sample(1), bare(2)] {
            let bytes = r.canonical_bytes();
            assert_eq!(bytes[0], CANONICAL_VERSION);
            assert_eq!(TxRecord::from_canonical(&bytes).unwrap(), r);
        }
    }

    #[test]
    fn trailing_bytes_and_unknown_codes_are_refused() {
        let mut bytes = sample(1).canonical_bytes();
        bytes.push(0);
        assert_eq!(TxRecord::from_canonical(&bytes), Err(LedgerError::TrailingBytes(1)));
        let mut bytes = sample(1).canonical_bytes();
        bytes[0] = 4;
        assert_eq!(TxRecord::from_canonical(&bytes), Err(LedgerError::UnknownVersion(4)));
        // Version 3 with neither bank nor TAC is the alias of a version 1 or 2 record.
        let mut v3 = sample(1).canonical_bytes();
        v3[0] = CANONICAL_VERSION_3;
        v3.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(TxRecord::from_canonical(&v3), Err(LedgerError::NonCanonical));
        let mut bytes = sample(1).canonical_bytes();
        // Version 2 without its two presence bytes ends early.
        bytes[0] = 2;
        assert_eq!(TxRecord::from_canonical(&bytes), Err(LedgerError::Truncated));
        assert_eq!(TxRecord::from_canonical(&[]), Err(LedgerError::Truncated));
        // version, "a", "b", seq 1, then media code 9.
        let bad_media = [1, 1, b'a', 1, b'b', 1, 9];
        assert_eq!(TxRecord::from_canonical(&bad_media), Err(LedgerError::UnknownMedia(9)));
        let bad_ident = [1, 1, b'/', 1, b'b'];
        assert_eq!(TxRecord::from_canonical(&bad_ident), Err(LedgerError::InvalidIdent(Field::Station)));
    }

    #[test]
    fn a_redundantly_encoded_varint_is_refused() {
        let r = sample(5);
        let bytes = r.canonical_bytes();
        // gate_seq 5 follows version + "xian_rd" + "g01" at offset 1 + 8 + 4 = 13.
        assert_eq!(bytes[13], 5);
        let mut alias = bytes[..13].to_vec();
        alias.extend_from_slice(&[0x85, 0x00]);
        alias.extend_from_slice(&bytes[14..]);
        // The varint reader refuses the padding itself; the re-encoding check stays as a backstop.
        assert_eq!(TxRecord::from_canonical(&alias), Err(LedgerError::OverlongVarint));
    }

    #[test]
    fn a_record_round_trips_through_json() {
        for r in [sample(1), bare(2)] {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<TxRecord>(&json).unwrap(), r);
        }
    }

    #[test]
    fn the_head_appends_contiguous_entries_that_verify() {
        let mut head = LedgerHead::genesis();
        let entries: Vec<_> = (1..=5).map(|s| head.append(sample(s))).collect();
        assert_eq!(head.last_index(), 5);
        assert_eq!(verify_chain(GENESIS_HASH, 1, &entries), Ok(head.last_hash));
        assert_eq!(verify_chain(entries[1].hash, 3, &entries[2..]), Ok(head.last_hash));
        assert_eq!(verify_chain(GENESIS_HASH, 1, &[]), Ok(GENESIS_HASH));
    }

    #[test]
    fn a_resent_record_is_not_appended_twice() {
        let mut head = LedgerHead::genesis();
        let mut progress = GateProgress::default();
        assert!(head.append_new(&mut progress, sample(1)).is_some());
        assert!(head.append_new(&mut progress, sample(1)).is_none());
        assert!(head.append_new(&mut progress, sample(0)).is_none());
        assert_eq!(head.next_index, 2);
    }

    #[test]
    fn gate_progress_advances_over_out_of_order_seqs_and_refuses_duplicates() {
        let mut p = GateProgress::default();
        assert!(p.record(2));
        assert!(p.record(4));
        assert_eq!(p.contiguous_through, 0);
        assert!(!p.record(2));
        assert!(p.record(1));
        assert_eq!(p.contiguous_through, 2);
        assert!(p.record(3));
        assert_eq!(p.contiguous_through, 4);
        assert!(p.pending.is_empty());
        assert!(!p.record(3));
        assert!(p.contains(1) && p.contains(4) && !p.contains(5) && !p.contains(0));
    }

    #[test]
    fn gate_progress_refuses_zero_and_seqs_beyond_its_window() {
        let mut p = GateProgress::default();
        assert_eq!(p.classify(0), SeqStatus::Zero);
        assert!(!p.record(0));
        assert_eq!(p.classify(GATE_SEQ_WINDOW + 1), SeqStatus::BeyondWindow);
        assert!(!p.record(u64::MAX));
        assert!(p.record(GATE_SEQ_WINDOW));
        assert!(p.pending.len() == 1);
    }

    #[test]
    fn a_signed_batch_verifies_and_a_record_from_another_gate_is_refused() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let (st, g) = (ident("xian_rd"), ident("g01"));
        let records = vec![sample(1), sample(2)];
        let sig = sign_batch(&st, &g, &records, &key);
        assert_eq!(verify_batch(&st, &g, &records, &sig, &key.verifying_key()), Ok(()));
        let mut foreign = records.clone();
        foreign[1].gate = ident("g02");
        let sig = sign_batch(&st, &g, &foreign, &key);
        assert_eq!(
            verify_batch(&st, &g, &foreign, &sig, &key.verifying_key()),
            Err(LedgerError::ForeignRecord { position: 1 })
        );
    }

    #[test]
    fn hashes_serialize_as_hex() {
        let head = LedgerHead { next_index: 3, last_hash: [0xab; 32] };
        let json = serde_json::to_string(&head).unwrap();
        assert!(json.contains(&"ab".repeat(32)), "{json}");
        assert_eq!(serde_json::from_str::<LedgerHead>(&json).unwrap(), head);
        assert!(serde_json::from_str::<LedgerHead>(r#"{"next_index":1,"last_hash":"ab"}"#).is_err());
    }
}
