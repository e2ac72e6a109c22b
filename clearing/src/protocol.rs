//! The clearing protocol's wire types (SPEC §8), shared by the server and the client.
//!
//! # Batch upload
//!
//! `POST /v1/stations/{station}/batches`, bearer token, body [`UploadBatch`]. The records are
//! full [`LedgerEntry`]s (index, hash, record) rather than bare records, so the clearing house
//! re-derives every hash itself and can name the first entry that does not chain. Answers:
//!
//! | status | body | when |
//! |---|---|---|
//! | 200 | [`Acked`] | the batch was stored, or was wholly at or below the acknowledged point (a resend) |
//! | 409 | [`ErrorBody`] with `code = "not_contiguous"` and `expected_from` (parses as [`Conflict`]) | the batch starts after `acked_through + 1` |
//! | 422 | [`ErrorBody`], `code` from [`BatchError::code`] | the batch does not verify; nothing is stored |
//! | 400 / 401 / 413 | [`ErrorBody`] | malformed JSON / wrong token / body or record count over the limit |
//!
//! A batch that starts at or below the acknowledged point and ends above it is accepted for its new
//! suffix only, once its overlap is shown to be the stored history (its hash at `acked_through` is
//! the stored last hash). A resend or an overlap that differs from what is stored is not a resend:
//! it is refused with 422 `history_mismatch` (the station's chain forked; an alarm, never a skip).
//!
//! # Watermark
//!
//! `GET /v1/stations/{station}/watermark` → [`Watermark`] `{acked_through, last_hash}`; a station
//! never heard of has `acked_through = 0` and the genesis hash.
//!
//! # Sequence gaps
//!
//! `POST /v1/stations/{station}/gaps`, bearer token, body [`GapReport`] `{gaps: [SequenceGap]}`:
//! the runs of a gate's sequence numbers that the station recorded as lost (the gate no longer
//! held them; see `afc_domain::ledger::SequenceGap`). Ids run from 1 per station without holes; a
//! report may repeat gaps already stored (with the same content). Answers 200 [`GapsStored`]
//! `{stored_through}`; 409 `not_contiguous` with `expected_from` when its ids skip ahead; 422
//! `gap_mismatch` when a stored id is sent with other content (nothing is stored). `GET` on the
//! same path lists the stored gaps.
//!
//! # Closed business days
//!
//! `POST /v1/stations/{station}/days`, bearer token, body [`DayClose`] `{day, record}`: the
//! station's close of one business day (`day` `YYYY-MM-DD`; `record` the station's close record
//! as JSON: totals per gate, medium and direction, rejects by reason, the reconciliation against
//! the gates' own passage counters). Idempotent on (station, day): the first close of a day is
//! stored (fsynced) and answered 200 [`DayStored`] `{day, duplicate: false}`; the same close again
//! → 200 with `duplicate: true`; another close of a stored day → 409 `day_conflict` (nothing
//! changes). `GET` on the same path lists the stored closes.
//!
//! # Parameter feed
//!
//! `GET /v1/stations/{station}/params?after=SEQ[&limit=N]` → [`FeedPage`]: the items with `seq >
//! after`, in order, and `next_after` to ask with next time. Each [`FeedItem`] is signed by the
//! clearing feed key (ed25519) over [`feed_signing_bytes`]:
//!
//! ```text
//! FEED_SIGNING_DOMAIN ‖ u8 len ‖ station ‖ u64 seq ‖ u8 len ‖ kind name ‖ u64 version
//!   ‖ i64 effective_from (ms) ‖ u32 key_id ‖ sha256(body JSON text)
//! ```
//!
//! (integers big-endian). The body is carried as JSON text that is never re-formatted
//! ([`serde_json::value::RawValue`]), so the signature covers exactly the bytes the controller
//! parses. The station is in the signed bytes so an item cannot be replayed to another station.
//! Bodies by kind: `network` [`NetworkDescription`], `fare_rule` [`FareRule`], `blacklist_full`
//! [`BlacklistFullBody`], `blacklist_delta` [`BlacklistDelta`] (its `to_version` is the item's
//! version), `qr_keys` [`QrKeySet`], `deny_list` [`DenyListBody`] (bank payment tokens to refuse
//! from now on, or no longer: a change, applied by the controller on top of the station's own
//! blacklist as its `bank` ids, under the station's numbering). Versions are strictly increasing
//! per family (network, fare_rule, blacklist — full and delta share one —, qr_keys, deny_list).

use afc_domain::blacklist::{BlacklistDelta, Entry};
use afc_domain::ledger::{hex_array, verify_chain_keeping, ChainError, LedgerEntry};
use afc_domain::model::{Ident, Timestamp};
use afc_domain::network::{FareRule, NetworkDescription};
use afc_domain::qr::QrKeySet;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Default largest request body the server reads (64 MiB: a 100,000-record batch is about 55 MB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Default most records in one batch.
pub const DEFAULT_MAX_BATCH_RECORDS: usize = 100_000;
/// Most feed items one `params` answer carries.
pub const MAX_FEED_PAGE: usize = 1_000;
/// Prefix of the bytes the feed key signs, so a feed signature is never valid for anything else.
pub const FEED_SIGNING_DOMAIN: &[u8] = b"afc/v1 clearing feed item\0";

/// One upload: a contiguous run of the station ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadBatch {
    /// Ledger index of the first record (indices start at 1).
    pub first_index: u64,
    /// Ledger index of the last record: `first_index + records.len() - 1`.
    pub last_index: u64,
    /// The hash of entry `first_index - 1` (the genesis hash for index 1), hex.
    #[serde(with = "hex_array")]
    pub prev_hash: [u8; 32],
    /// The hash of entry `last_index`, hex; the server checks it against the chain it re-derives.
    #[serde(with = "hex_array")]
    pub last_hash: [u8; 32],
    /// The entries with their indices and hashes, so the server verifies instead of trusting.
    pub records: Vec<LedgerEntry>,
}

impl UploadBatch {
    /// A batch of `entries` (contiguous, non-empty) following `prev_hash`; `None` if empty.
    pub fn new(prev_hash: [u8; 32], records: Vec<LedgerEntry>) -> Option<UploadBatch> {
        let first = records.first()?;
        let last = records.last()?;
        Some(UploadBatch {
            first_index: first.index,
            last_index: last.index,
            prev_hash,
            last_hash: last.hash,
            records,
        })
    }

    /// The checks that need no stored state: the header agrees with the records, every record is
    /// this station's, the entries chain from `prev_hash` and end at `last_hash`.
    pub fn verify(&self, station: &Ident) -> Result<(), BatchError> {
        self.verify_canonical(station).map(|_| ())
    }

    /// [`verify`](Self::verify), returning the canonical bytes of each record that were hashed
    /// (each record encoded once): the store keeps exactly these, so nothing encodes them again.
    pub fn verify_canonical(&self, station: &Ident) -> Result<Vec<Vec<u8>>, BatchError> {
        let count = self.records.len() as u64;
        if count == 0
            || self.first_index == 0
            || self.last_index.checked_sub(self.first_index).and_then(|d| d.checked_add(1)) != Some(count)
        {
            return Err(BatchError::Shape {
                first_index: self.first_index,
                last_index: self.last_index,
                count,
            });
        }
        if let Some(bad) = self.records.iter().find(|e| &e.record.station != station) {
            return Err(BatchError::ForeignRecord { index: bad.index });
        }
        let (last, canonical) = verify_chain_keeping(self.prev_hash, self.first_index, &self.records)
            .map_err(|e| match e {
                ChainError::IndexGap { expected, found, .. } => BatchError::IndexGap { expected, found },
                ChainError::HashMismatch { index } => BatchError::ChainMismatch { index },
            })?;
        if last != self.last_hash {
            return Err(BatchError::LastHashMismatch);
        }
        Ok(canonical)
    }
}

/// Why a batch was refused (422): it was not stored, and re-sending it unchanged will not help.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BatchError {
    #[error(
        "batch header first_index {first_index}, last_index {last_index} does not describe {count} records"
    )]
    Shape { first_index: u64, last_index: u64, count: u64 },
    #[error("entry {index} belongs to another station")]
    ForeignRecord { index: u64 },
    #[error("entries are not numbered contiguously: expected index {expected}, found {found}")]
    IndexGap { expected: u64, found: u64 },
    #[error("entry {index} has a hash that does not follow from its record and predecessor")]
    ChainMismatch { index: u64 },
    #[error("last_hash is not the hash of the last entry")]
    LastHashMismatch,
    #[error("the batch's chain differs from the stored one at index {index}: the station ledger forked")]
    HistoryMismatch { index: u64 },
}

impl BatchError {
    /// The stable error code in the 422 body.
    pub fn code(&self) -> &'static str {
        match self {
            BatchError::Shape { .. } => "batch_shape",
            BatchError::ForeignRecord { .. } => "foreign_record",
            BatchError::IndexGap { .. } => "index_gap",
            BatchError::ChainMismatch { .. } | BatchError::LastHashMismatch => "chain_mismatch",
            BatchError::HistoryMismatch { .. } => "history_mismatch",
        }
    }
}

/// Body of `POST /v1/stations/{station}/gaps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GapReport {
    pub gaps: Vec<afc_domain::ledger::SequenceGap>,
}

/// 200 answer to a gap report: every gap up to and including `stored_through` is stored durably.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapsStored {
    pub stored_through: u64,
}

/// A station's close of one business day (`POST /v1/stations/{station}/days`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DayClose {
    pub day: afc_domain::model::Date,
    /// The station's close record, stored as sent.
    pub record: serde_json::Value,
}

/// 200 answer to a day close: the day is stored durably (`duplicate`: it already was, the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayStored {
    pub day: afc_domain::model::Date,
    pub duplicate: bool,
}

/// Why a gap report was refused (422): nothing was stored.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GapError {
    #[error("gap ids start at 1")]
    ZeroId,
    #[error("gap {id} is stored with other content")]
    Mismatch { id: u64 },
}

impl GapError {
    /// The stable `code` of the 422 answer.
    pub fn code(&self) -> &'static str {
        match self {
            GapError::ZeroId => "gap_zero_id",
            GapError::Mismatch { .. } => "gap_mismatch",
        }
    }
}

/// 200 answer to an upload: everything up to and including `acked_through` is stored durably.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acked {
    pub acked_through: u64,
}

/// The part of a 409 answer the uploader acts on: send again starting at `expected_from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub expected_from: u64,
}

/// Where the clearing house's copy of a station ledger ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    /// The highest index stored (0 for none); the next batch must start at `acked_through + 1`.
    pub acked_through: u64,
    /// The hash of entry `acked_through` (genesis for 0), hex: the reconciling controller checks
    /// it against its own ledger. An extension of this reference server (SPEC §8 does not define
    /// the watermark's body): a clearing house that leaves it out is still uploaded to, without the
    /// fork check at the watermark.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_array_opt")]
    pub last_hash: Option<[u8; 32]>,
}

/// Serde helper: an optional fixed-size byte array as a hex string (absent or null = `None`).
mod hex_array_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_str(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        let Some(text) = Option::<std::borrow::Cow<'de, str>>::deserialize(d)? else { return Ok(None) };
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.as_bytes(), &mut out).map_err(serde::de::Error::custom)?;
        Ok(Some(out))
    }
}

/// Every error answer: a stable `code`, a human message, and for 409 where to resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    /// Only on 409 `not_contiguous`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_from: Option<u64>,
}

/// Test and operator view of one station (`GET /v1/stations/{station}/stats`). Counters other
/// than `records`, `acked_through` and `duplicate_keys` count since the server started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StationStats {
    pub station: Ident,
    /// Records stored, each exactly once (equal to `acked_through`, as indices start at 1).
    pub records: u64,
    pub acked_through: u64,
    #[serde(with = "hex_array")]
    pub last_hash: [u8; 32],
    /// Batches that stored at least one new record.
    pub batches_acked: u64,
    /// Batches wholly at or below the acknowledged point, answered 200 without storing anything.
    pub resends: u64,
    /// Records received again (in resends and in the overlap of partially new batches).
    pub resent_records: u64,
    /// Batches answered 409.
    pub conflicts: u64,
    /// Batches answered 422 (nothing stored).
    pub rejected: u64,
    /// Stored records whose `(gate, installation, gate_seq)` was already stored at another index: a fare
    /// counted twice by the station. Must stay 0; survives restarts (recomputed on load).
    pub duplicate_keys: u64,
    /// Items in the station's parameter feed.
    pub feed_items: u64,
    /// Sequence gaps the station reported (stored; survives restarts).
    #[serde(default)]
    pub sequence_gaps: u64,
}

/// The kinds of parameter set the feed carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedKind {
    Network,
    FareRule,
    BlacklistFull,
    BlacklistDelta,
    QrKeys,
    DenyList,
}

impl FeedKind {
    /// The name used in JSON and in the signed bytes.
    pub fn as_str(self) -> &'static str {
        match self {
            FeedKind::Network => "network",
            FeedKind::FareRule => "fare_rule",
            FeedKind::BlacklistFull => "blacklist_full",
            FeedKind::BlacklistDelta => "blacklist_delta",
            FeedKind::QrKeys => "qr_keys",
            FeedKind::DenyList => "deny_list",
        }
    }

    /// Kinds whose versions share one sequence (a blacklist delta continues the full list's).
    pub fn family(self) -> &'static str {
        match self {
            FeedKind::BlacklistFull | FeedKind::BlacklistDelta => "blacklist",
            other => other.as_str(),
        }
    }
}

/// The body of a `blacklist_full` item: every entry of the list at the item's version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlacklistFullBody {
    pub entries: Vec<Entry>,
}

/// The body of a `deny_list` item: bank payment tokens to add to the station's deny list (the
/// acquirer declined a charge, or the issuer reported the card) and tokens to take off it (a
/// declined debt was paid). A token in both is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyListBody {
    #[serde(default)]
    pub add: Vec<afc_domain::bank::BankToken>,
    #[serde(default)]
    pub remove: Vec<afc_domain::bank::BankToken>,
}

/// A parameter set to publish, as an operator or test submits it (admin POST or a feed-dir file);
/// the server assigns the `seq` and signs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedSubmission {
    pub kind: FeedKind,
    pub version: u64,
    pub effective_from: Timestamp,
    /// The kind's JSON body, kept as the exact text given.
    pub body: Box<RawValue>,
}

impl FeedSubmission {
    /// Checks that the body parses as the kind's type and agrees with the version.
    pub fn validate(&self) -> Result<(), FeedError> {
        let text = self.body.get();
        let invalid =
            |e: serde_json::Error| FeedError::InvalidBody { kind: self.kind, reason: e.to_string() };
        match self.kind {
            FeedKind::Network => {
                serde_json::from_str::<NetworkDescription>(text).map_err(invalid)?;
            }
            FeedKind::FareRule => {
                let rule = serde_json::from_str::<FareRule>(text).map_err(invalid)?;
                rule.validate()
                    .map_err(|e| FeedError::InvalidBody { kind: self.kind, reason: e.to_string() })?;
            }
            FeedKind::BlacklistFull => {
                serde_json::from_str::<BlacklistFullBody>(text).map_err(invalid)?;
            }
            FeedKind::BlacklistDelta => {
                let delta = serde_json::from_str::<BlacklistDelta>(text).map_err(invalid)?;
                if delta.to_version != self.version {
                    return Err(FeedError::InvalidBody {
                        kind: self.kind,
                        reason: format!(
                            "delta to_version {} is not the item version {}",
                            delta.to_version, self.version
                        ),
                    });
                }
            }
            FeedKind::QrKeys => {
                serde_json::from_str::<QrKeySet>(text).map_err(invalid)?;
            }
            FeedKind::DenyList => {
                let body = serde_json::from_str::<DenyListBody>(text).map_err(invalid)?;
                if body.add.is_empty() && body.remove.is_empty() {
                    return Err(FeedError::InvalidBody {
                        kind: self.kind,
                        reason: "a deny_list item adds or removes at least one token".into(),
                    });
                }
                if let Some(t) = body.add.iter().find(|t| body.remove.contains(t)) {
                    return Err(FeedError::InvalidBody {
                        kind: self.kind,
                        reason: format!("token {t} is both added and removed"),
                    });
                }
            }
        }
        if self.version == 0 {
            return Err(FeedError::InvalidBody { kind: self.kind, reason: "version 0 is reserved".into() });
        }
        Ok(())
    }
}

/// One signed item of a station's parameter feed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeedItem {
    /// Position in the station's feed, from 1, contiguous.
    pub seq: u64,
    pub kind: FeedKind,
    pub version: u64,
    pub effective_from: Timestamp,
    /// The kind's JSON body, byte for byte what was signed.
    pub body: Box<RawValue>,
    /// ed25519 by the feed key over [`feed_signing_bytes`], hex.
    #[serde(with = "hex_array")]
    pub signature: [u8; 64],
    /// Which feed key signed, so the key can rotate.
    pub key_id: u32,
}

/// One page of a station's feed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeedPage {
    pub items: Vec<FeedItem>,
    /// The `after` to ask with next: the last item's seq, or the `after` asked with if none.
    pub next_after: u64,
}

/// The public half of the feed key (`GET /v1/feed-key`), for demos; production pins it in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedKeyInfo {
    pub key_id: u32,
    #[serde(with = "hex_array")]
    pub public_key: [u8; 32],
}

/// Why a feed submission or item was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FeedError {
    #[error("{} body does not parse: {reason}", kind.as_str())]
    InvalidBody { kind: FeedKind, reason: String },
    #[error("{family} version {offered} is not above the latest published version {latest}")]
    VersionOrder { family: &'static str, latest: u64, offered: u64 },
    #[error("feed item key id {found} is not the trusted key id {expected}")]
    UnknownKey { expected: u32, found: u32 },
    #[error("feed item signature does not verify")]
    BadSignature,
}

impl FeedError {
    /// The stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            FeedError::InvalidBody { .. } => "invalid_body",
            FeedError::VersionOrder { .. } => "version_order",
            FeedError::UnknownKey { .. } => "unknown_key",
            FeedError::BadSignature => "bad_signature",
        }
    }
}

/// The bytes the feed key signs for an item (see the module documentation).
#[allow(clippy::too_many_arguments)]
pub fn feed_signing_bytes(
    station: &Ident,
    seq: u64,
    kind: FeedKind,
    version: u64,
    effective_from: Timestamp,
    key_id: u32,
    body: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(FEED_SIGNING_DOMAIN.len() + 160);
    out.extend_from_slice(FEED_SIGNING_DOMAIN);
    // Ident is at most 64 bytes and kind names are short, so both lengths fit a byte.
    out.push(station.as_str().len() as u8);
    out.extend_from_slice(station.as_str().as_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.push(kind.as_str().len() as u8);
    out.extend_from_slice(kind.as_str().as_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&effective_from.0.to_be_bytes());
    out.extend_from_slice(&key_id.to_be_bytes());
    out.extend_from_slice(&Sha256::digest(body.as_bytes()));
    out
}

/// Signs `submission` as item `seq` of `station`'s feed.
pub fn sign_feed_item(
    station: &Ident,
    seq: u64,
    submission: FeedSubmission,
    key: &SigningKey,
    key_id: u32,
) -> FeedItem {
    let FeedSubmission { kind, version, effective_from, body } = submission;
    let bytes = feed_signing_bytes(station, seq, kind, version, effective_from, key_id, body.get());
    let signature = key.sign(&bytes).to_bytes();
    FeedItem { seq, kind, version, effective_from, body, signature, key_id }
}

/// Checks an item of `station`'s feed against the trusted feed key (strict ed25519). The
/// controller calls this before anything in the body feeds a rollout.
pub fn verify_feed_item(
    station: &Ident,
    item: &FeedItem,
    key_id: u32,
    key: &VerifyingKey,
) -> Result<(), FeedError> {
    if item.key_id != key_id {
        return Err(FeedError::UnknownKey { expected: key_id, found: item.key_id });
    }
    let bytes = feed_signing_bytes(
        station,
        item.seq,
        item.kind,
        item.version,
        item.effective_from,
        item.key_id,
        item.body.get(),
    );
    key.verify_strict(&bytes, &Signature::from_bytes(&item.signature)).map_err(|_| FeedError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use afc_domain::ledger::{LedgerHead, GENESIS_HASH};

    fn station() -> Ident {
        Ident::new("xian_rd").unwrap()
    }

    fn record(seq: u64) -> afc_domain::ledger::TxRecord {
        crate::testdata::record(&station(), "g01", seq)
    }

    fn batch(n: u64) -> UploadBatch {
        let mut head = LedgerHead::genesis();
        UploadBatch::new(GENESIS_HASH, (1..=n).map(|s| head.append(record(s))).collect()).unwrap()
    }

    #[test]
    fn a_watermark_without_last_hash_parses_as_the_protocol_defines_it() {
        let w: Watermark = serde_json::from_str(r#"{"acked_through": 7}"#).unwrap();
        assert_eq!((w.acked_through, w.last_hash), (7, None));
        let w = Watermark { acked_through: 3, last_hash: Some([9; 32]) };
        assert_eq!(serde_json::from_str::<Watermark>(&serde_json::to_string(&w).unwrap()).unwrap(), w);
        assert!(serde_json::from_str::<Watermark>(r#"{"acked_through": 1, "last_hash": "zz"}"#).is_err());
    }

    #[test]
    fn a_batch_round_trips_through_json_with_hex_hashes() {
        let b = batch(3);
        let json = serde_json::to_string(&b).unwrap();
        assert!(json.contains(&hex::encode(b.last_hash)));
        assert_eq!(serde_json::from_str::<UploadBatch>(&json).unwrap(), b);
    }

    #[test]
    fn a_well_formed_batch_verifies() {
        assert_eq!(batch(5).verify(&station()), Ok(()));
    }

    #[test]
    fn a_batch_whose_header_disagrees_with_its_records_is_refused_as_shape() {
        let mut b = batch(3);
        b.last_index = 4;
        assert_eq!(b.verify(&station()).unwrap_err().code(), "batch_shape");
        b.records.clear();
        assert_eq!(b.verify(&station()).unwrap_err().code(), "batch_shape");
    }

    #[test]
    fn a_tampered_record_is_named_by_its_index() {
        let mut b = batch(5);
        b.records[2].record.fare_fen += 1;
        assert_eq!(b.verify(&station()), Err(BatchError::ChainMismatch { index: 3 }));
        let mut b = batch(5);
        b.last_hash = [1; 32];
        assert_eq!(b.verify(&station()), Err(BatchError::LastHashMismatch));
    }

    #[test]
    fn a_record_of_another_station_is_refused() {
        let other = Ident::new("heishijiao").unwrap();
        assert_eq!(batch(2).verify(&other), Err(BatchError::ForeignRecord { index: 1 }));
    }

    #[test]
    fn a_signed_feed_item_verifies_and_any_change_breaks_it() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let sub = FeedSubmission {
            kind: FeedKind::BlacklistFull,
            version: 7,
            effective_from: Timestamp(1_800_000_000_000),
            body: RawValue::from_string(r#"{"entries": [{"media":"svc","id":5}]}"#.into()).unwrap(),
        };
        sub.validate().unwrap();
        let item = sign_feed_item(&station(), 1, sub, &key, 3);
        let vk = key.verifying_key();
        assert_eq!(verify_feed_item(&station(), &item, 3, &vk), Ok(()));
        // Through JSON and back, the body text is unchanged and the signature still holds.
        let again: FeedItem = serde_json::from_str(&serde_json::to_string(&item).unwrap()).unwrap();
        assert_eq!(verify_feed_item(&station(), &again, 3, &vk), Ok(()));
        assert_eq!(
            verify_feed_item(&Ident::new("other").unwrap(), &item, 3, &vk),
            Err(FeedError::BadSignature)
        );
        let mut changed = item.clone();
        changed.version = 8;
        assert_eq!(verify_feed_item(&station(), &changed, 3, &vk), Err(FeedError::BadSignature));
        let mut changed = item.clone();
        changed.body = RawValue::from_string(r#"{"entries": []}"#.into()).unwrap();
        assert_eq!(verify_feed_item(&station(), &changed, 3, &vk), Err(FeedError::BadSignature));
        assert_eq!(
            verify_feed_item(&station(), &item, 4, &vk),
            Err(FeedError::UnknownKey { expected: 4, found: 3 })
        );
    }

    #[test]
    fn a_submission_whose_body_is_not_its_kind_is_refused() {
        let sub = FeedSubmission {
            kind: FeedKind::FareRule,
            version: 1,
            effective_from: Timestamp(0),
            body: RawValue::from_string(r#"{"entries": []}"#.into()).unwrap(),
        };
        assert_eq!(sub.validate().unwrap_err().code(), "invalid_body");
        let delta = FeedSubmission {
            kind: FeedKind::BlacklistDelta,
            version: 5,
            effective_from: Timestamp(0),
            body: RawValue::from_string(r#"{"from_version":3,"to_version":4,"add":[],"remove":[]}"#.into())
                .unwrap(),
        };
        assert_eq!(delta.validate().unwrap_err().code(), "invalid_body");
    }
}
