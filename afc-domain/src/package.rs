//! Signed parameter packages (SPEC §4) and their chunking for MQTT (SPEC §5).
//!
//! A package is one version of one parameter kind: a fixed-size header (kind, version,
//! `effective_from`, body length and sha256, signing key id), an ed25519 signature over a
//! domain-separated encoding of that header, and the body. Because the header holds the body's
//! hash, the signature covers the body too, and a gate can check a package it has reassembled from
//! chunks before parsing a single byte of the body.
//!
//! Byte layout of an encoded package (integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `AFCP` |
//! | 1 | format (1) |
//! | 1 | kind code ([`ParamKind::code`]) |
//! | 8 | version |
//! | 8 | `effective_from`, ms since the epoch, signed |
//! | 8 | body length |
//! | 32 | body sha256 |
//! | 4 | key id |
//! | 64 | ed25519 signature |
//! | n | body |
//!
//! A package travels as retained MQTT messages of at most [`MAX_CHUNK_BYTES`]; [`split`] cuts
//! it into chunks that each carry a small header naming the whole package (its sha256, length and
//! chunk count), and [`Reassembler`] puts them back together in any order.
//!
//! Bodies: the blacklist has its own compact encoding ([`BlacklistBody`]); the fare table is
//! encoded by [`crate::network`]; the small kinds (`qr_keys`, `gate_config`, `mode`) are JSON
//! ([`encode_json_body`], [`decode_json_body`]).

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::blacklist::{Blacklist, BlacklistDelta, BlacklistError};
use crate::model::{ParamKind, Timestamp};
use crate::varint::{Reader, VarintError};

/// The first bytes of an encoded package.
pub const PACKAGE_MAGIC: [u8; 4] = *b"AFCP";
/// The package format, after the magic; bumped on any incompatible change.
pub const PACKAGE_FORMAT: u8 = 1;
/// Bytes of an encoded package before the body: magic, format, header, signature.
pub const PACKAGE_PREFIX_LEN: usize = 4 + 1 + PACKAGE_HEADER_LEN + 64;
/// The largest package accepted (64 MiB): far above a 1,000,000-entry blacklist (about 1.5 MB),
/// far below what would hurt a gate.
pub const MAX_PACKAGE_BYTES: u64 = 64 * 1024 * 1024;
/// Prefix of the signed message, so a package signature can never be replayed as a signature of
/// anything else the same key signs.
const SIGNING_DOMAIN: &[u8] = b"afc/v1 parameter package\0";
/// Bytes of the canonical header: kind, version, effective_from, body_len, body_sha256, key_id.
pub const PACKAGE_HEADER_LEN: usize = 1 + 8 + 8 + 8 + 32 + 4;

/// What a package is and what its signature vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackageHeader {
    /// Which parameter set the body is.
    pub kind: ParamKind,
    /// Monotonic per kind: a gate refuses a version not above the one it holds.
    pub version: u64,
    /// When gates switch to this version (delivered early, switched by each gate, even offline).
    pub effective_from: Timestamp,
    /// The body's length, checked before hashing so a truncated body is named as such.
    pub body_len: u64,
    /// The body's sha256: the signature covers the body through it.
    pub body_sha256: [u8; 32],
    /// Which station signing key signed, so keys can rotate.
    pub key_id: u32,
}

impl PackageHeader {
    /// The canonical fixed-width big-endian bytes of the header.
    pub fn to_bytes(&self) -> [u8; PACKAGE_HEADER_LEN] {
        let mut b = [0u8; PACKAGE_HEADER_LEN];
        b[0] = self.kind.code();
        b[1..9].copy_from_slice(&self.version.to_be_bytes());
        b[9..17].copy_from_slice(&self.effective_from.millis().to_be_bytes());
        b[17..25].copy_from_slice(&self.body_len.to_be_bytes());
        b[25..57].copy_from_slice(&self.body_sha256);
        b[57..61].copy_from_slice(&self.key_id.to_be_bytes());
        b
    }

    /// The message the signature is made over: a domain prefix, the format, the header.
    fn signed_message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(SIGNING_DOMAIN.len() + 1 + PACKAGE_HEADER_LEN);
        m.extend_from_slice(SIGNING_DOMAIN);
        m.push(PACKAGE_FORMAT);
        m.extend_from_slice(&self.to_bytes());
        m
    }
}

/// One signed parameter package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    /// What the package is, including the body's hash.
    pub header: PackageHeader,
    /// ed25519 over the domain-separated header, by the key `header.key_id`.
    pub signature: [u8; 64],
    /// The kind's encoding of the parameter set.
    pub body: Vec<u8>,
}

/// Everything that can be wrong with a package: its bytes, its signature, its place in the
/// version order, or its body.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PackageError {
    #[error("package starts with {found:02x?}, not the magic \"AFCP\"")]
    BadMagic { found: [u8; 4] },
    #[error("package format {found} is not supported (this build reads {PACKAGE_FORMAT})")]
    UnsupportedFormat { found: u8 },
    #[error("package ends in the middle of its {field}")]
    Truncated { field: &'static str },
    #[error("package has {count} bytes after its body")]
    TrailingBytes { count: usize },
    #[error("package kind code {code} is unknown")]
    UnknownKind { code: u8 },
    #[error("package body of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("package is signed by key id {key_id}, which is not trusted")]
    UnknownKey { key_id: u32 },
    #[error("package signature does not verify with key id {key_id}")]
    BadSignature { key_id: u32 },
    #[error("package header says the body has {header} bytes, it has {actual}")]
    LengthMismatch { header: u64, actual: u64 },
    #[error("package body's sha256 is not the one in the signed header")]
    HashMismatch,
    #[error("{kind} version {offered} is not newer than the version {held} held")]
    VersionNotNewer { kind: ParamKind, held: u64, offered: u64 },
    #[error("package is a {found} package, expected {expected}")]
    WrongKind { expected: ParamKind, found: ParamKind },
    #[error("package body tag {tag} is unknown")]
    UnknownBodyTag { tag: u8 },
    #[error("package body is empty")]
    EmptyBody,
    #[error("package header says version {header}, its body is version {body}")]
    BodyVersionMismatch { header: u64, body: u64 },
    #[error("blacklist body is invalid: {0}")]
    Blacklist(#[from] BlacklistError),
    #[error("JSON body ({type_name}) is invalid: {message}")]
    Json { type_name: &'static str, message: String },
}

impl PackageError {
    /// A stable snake_case name, for `params/ack` reasons and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            PackageError::BadMagic { .. } => "bad_magic",
            PackageError::UnsupportedFormat { .. } => "unsupported_format",
            PackageError::Truncated { .. } => "truncated",
            PackageError::TrailingBytes { .. } => "trailing_bytes",
            PackageError::UnknownKind { .. } => "unknown_kind",
            PackageError::TooLarge { .. } => "too_large",
            PackageError::UnknownKey { .. } => "unknown_key",
            PackageError::BadSignature { .. } => "bad_signature",
            PackageError::LengthMismatch { .. } => "length_mismatch",
            PackageError::HashMismatch => "hash_mismatch",
            PackageError::VersionNotNewer { .. } => "version_not_newer",
            PackageError::WrongKind { .. } => "wrong_kind",
            PackageError::UnknownBodyTag { .. } => "unknown_body_tag",
            PackageError::EmptyBody => "empty_body",
            PackageError::BodyVersionMismatch { .. } => "body_version_mismatch",
            PackageError::Blacklist(_) => "blacklist_body_invalid",
            PackageError::Json { .. } => "json_body_invalid",
        }
    }
}

/// The sha256 of some bytes (a whole encoded package, for the `params/{kind}/current` pointer).
pub fn package_sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Package {
    /// Signs a body as one version of one kind.
    pub fn sign(
        kind: ParamKind,
        version: u64,
        effective_from: Timestamp,
        body: Vec<u8>,
        key_id: u32,
        key: &SigningKey,
    ) -> Package {
        let header = PackageHeader {
            kind,
            version,
            effective_from,
            body_len: body.len() as u64,
            body_sha256: package_sha256(&body),
            key_id,
        };
        let signature = key.sign(&header.signed_message()).to_bytes();
        Package { header, signature, body }
    }

    /// The wire bytes (see the module documentation for the layout).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(PACKAGE_PREFIX_LEN + self.body.len());
        out.extend_from_slice(&PACKAGE_MAGIC);
        out.push(PACKAGE_FORMAT);
        out.extend_from_slice(&self.header.to_bytes());
        out.extend_from_slice(&self.signature);
        out.extend_from_slice(&self.body);
        out
    }

    /// Reads a package's structure. Nothing is trusted yet: call [`Package::verify`] next.
    pub fn decode(bytes: &[u8]) -> Result<Package, PackageError> {
        let mut r = Reader::new(bytes);
        let magic: [u8; 4] = r.array().map_err(truncated_in("magic"))?;
        if magic != PACKAGE_MAGIC {
            return Err(PackageError::BadMagic { found: magic });
        }
        let format = r.byte().map_err(truncated_in("format"))?;
        if format != PACKAGE_FORMAT {
            return Err(PackageError::UnsupportedFormat { found: format });
        }
        let code = r.byte().map_err(truncated_in("kind"))?;
        let kind = ParamKind::from_code(code).ok_or(PackageError::UnknownKind { code })?;
        let version = u64::from_be_bytes(r.array().map_err(truncated_in("version"))?);
        let effective_from =
            Timestamp(i64::from_be_bytes(r.array().map_err(truncated_in("effective_from"))?));
        let body_len = u64::from_be_bytes(r.array().map_err(truncated_in("body_len"))?);
        let body_sha256 = r.array().map_err(truncated_in("body_sha256"))?;
        let key_id = u32::from_be_bytes(r.array().map_err(truncated_in("key_id"))?);
        let signature = r.array().map_err(truncated_in("signature"))?;
        if body_len > MAX_PACKAGE_BYTES {
            return Err(PackageError::TooLarge { len: body_len, max: MAX_PACKAGE_BYTES });
        }
        let remaining = r.remaining();
        let len = usize::try_from(body_len)
            .map_err(|_| PackageError::TooLarge { len: body_len, max: MAX_PACKAGE_BYTES })?;
        if remaining < len {
            return Err(PackageError::Truncated { field: "body" });
        }
        if remaining > len {
            return Err(PackageError::TrailingBytes { count: remaining - len });
        }
        let body = r.rest().to_vec();
        let header = PackageHeader { kind, version, effective_from, body_len, body_sha256, key_id };
        Ok(Package { header, signature, body })
    }

    /// Checks the signature against the trusted keys, then the body against the signed header.
    pub fn verify(&self, keys: &TrustedKeys) -> Result<(), PackageError> {
        let key_id = self.header.key_id;
        let key = keys.get(key_id).ok_or(PackageError::UnknownKey { key_id })?;
        let signature = Signature::from_bytes(&self.signature);
        key.verify_strict(&self.header.signed_message(), &signature)
            .map_err(|_| PackageError::BadSignature { key_id })?;
        let actual = self.body.len() as u64;
        if actual != self.header.body_len {
            return Err(PackageError::LengthMismatch { header: self.header.body_len, actual });
        }
        if package_sha256(&self.body) != self.header.body_sha256 {
            return Err(PackageError::HashMismatch);
        }
        Ok(())
    }

    /// [`Package::decode`], [`Package::verify`] and the version order in one step: what a gate
    /// does with a reassembled package before looking at its body.
    pub fn decode_verified(
        bytes: &[u8],
        expected: ParamKind,
        keys: &TrustedKeys,
        held: Option<u64>,
    ) -> Result<Package, PackageError> {
        let p = Package::decode(bytes)?;
        p.verify(keys)?;
        if p.header.kind != expected {
            return Err(PackageError::WrongKind { expected, found: p.header.kind });
        }
        check_version_order(p.header.kind, held, p.header.version)?;
        Ok(p)
    }
}

/// Maps a short read to [`PackageError::Truncated`] naming the field.
fn truncated_in(field: &'static str) -> impl Fn(VarintError) -> PackageError {
    move |_| PackageError::Truncated { field }
}

/// Refuses an offered version that is not above the held one (version 0 is never accepted: it
/// means "none held" in [`crate::ledger::ParamVersions`]).
pub fn check_version_order(kind: ParamKind, held: Option<u64>, offered: u64) -> Result<(), PackageError> {
    let held = held.unwrap_or(0);
    if offered <= held {
        return Err(PackageError::VersionNotNewer { kind, held, offered });
    }
    Ok(())
}

/// The station signing keys a gate trusts, by key id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    /// Several at once while keys rotate.
    keys: BTreeMap<u32, VerifyingKey>,
}

/// Why a configured trusted key was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TrustedKeyError {
    #[error("trusted key {key_id} is not hex")]
    NotHex { key_id: u32 },
    #[error("trusted key {key_id} has {len} bytes, an ed25519 public key has 32")]
    WrongLength { key_id: u32, len: usize },
    #[error("trusted key {key_id} is not a valid ed25519 public key")]
    InvalidKey { key_id: u32 },
    #[error("trusted key id {key_id} is given twice")]
    DuplicateKeyId { key_id: u32 },
}

impl TrustedKeys {
    /// No key trusted: every package is refused.
    pub fn new() -> TrustedKeys {
        TrustedKeys::default()
    }

    /// Trusts `key` under `key_id`, replacing any key of that id.
    pub fn insert(&mut self, key_id: u32, key: VerifyingKey) {
        self.keys.insert(key_id, key);
    }

    /// Reads `(key_id, public key as 64 hex digits)` pairs, as configuration files give them.
    pub fn from_hex_pairs<'a>(
        pairs: impl IntoIterator<Item = (u32, &'a str)>,
    ) -> Result<TrustedKeys, TrustedKeyError> {
        let mut keys = TrustedKeys::new();
        for (key_id, text) in pairs {
            let bytes = hex::decode(text.trim()).map_err(|_| TrustedKeyError::NotHex { key_id })?;
            let bytes: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| TrustedKeyError::WrongLength { key_id, len: bytes.len() })?;
            let key = VerifyingKey::from_bytes(&bytes).map_err(|_| TrustedKeyError::InvalidKey { key_id })?;
            if keys.keys.insert(key_id, key).is_some() {
                return Err(TrustedKeyError::DuplicateKeyId { key_id });
            }
        }
        Ok(keys)
    }

    /// The key trusted under `key_id`.
    pub fn get(&self, key_id: u32) -> Option<&VerifyingKey> {
        self.keys.get(&key_id)
    }

    /// The trusted key ids, in increasing order.
    pub fn key_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.keys().copied()
    }

    /// How many keys are trusted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is trusted (every package would be refused).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The body of a `blacklist` package: a full base or a delta on the previous version.
// A body is a transient value, decoded once per package and then applied, so the size gap between
// the variants (a few hundred bytes of vector headers) costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlacklistBody {
    /// Replaces whatever the gate holds.
    Full(Blacklist),
    /// Applies to exactly `from_version`.
    Delta(BlacklistDelta),
}

impl BlacklistBody {
    const TAG_FULL: u8 = 1;
    const TAG_DELTA: u8 = 2;

    /// A tag byte (1 full, 2 delta), then the blacklist's compact encoding.
    pub fn encode(&self) -> Vec<u8> {
        let inner = match self {
            BlacklistBody::Full(b) => b.encode(),
            BlacklistBody::Delta(d) => d.encode(),
        };
        let mut out = Vec::with_capacity(1 + inner.len());
        out.push(match self {
            BlacklistBody::Full(_) => Self::TAG_FULL,
            BlacklistBody::Delta(_) => Self::TAG_DELTA,
        });
        out.extend_from_slice(&inner);
        out
    }

    /// Reads [`BlacklistBody::encode`]'s bytes; the inner list is validated as canonical.
    pub fn decode(bytes: &[u8]) -> Result<BlacklistBody, PackageError> {
        let (&tag, rest) = bytes.split_first().ok_or(PackageError::EmptyBody)?;
        match tag {
            Self::TAG_FULL => Ok(BlacklistBody::Full(Blacklist::decode(rest)?)),
            Self::TAG_DELTA => Ok(BlacklistBody::Delta(BlacklistDelta::decode(rest)?)),
            tag => Err(PackageError::UnknownBodyTag { tag }),
        }
    }

    /// The version the gate holds once this body is applied.
    pub fn version(&self) -> u64 {
        match self {
            BlacklistBody::Full(b) => b.version(),
            BlacklistBody::Delta(d) => d.to_version,
        }
    }

    /// The body of a verified `blacklist` package, checked to be the version its header says.
    pub fn from_package(p: &Package) -> Result<BlacklistBody, PackageError> {
        if p.header.kind != ParamKind::Blacklist {
            return Err(PackageError::WrongKind { expected: ParamKind::Blacklist, found: p.header.kind });
        }
        let body = BlacklistBody::decode(&p.body)?;
        if body.version() != p.header.version {
            return Err(PackageError::BodyVersionMismatch { header: p.header.version, body: body.version() });
        }
        Ok(body)
    }
}

/// The JSON body of a small kind (`qr_keys`, `gate_config`, `mode`).
pub fn encode_json_body<T: Serialize>(value: &T) -> Result<Vec<u8>, PackageError> {
    serde_json::to_vec(value)
        .map_err(|e| PackageError::Json { type_name: std::any::type_name::<T>(), message: e.to_string() })
}

/// Reads the JSON body of a small kind.
pub fn decode_json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, PackageError> {
    serde_json::from_slice(body)
        .map_err(|e| PackageError::Json { type_name: std::any::type_name::<T>(), message: e.to_string() })
}

/// The largest chunk (header included) published on `params/{kind}/{version}/{chunk}`.
pub const MAX_CHUNK_BYTES: usize = 256 * 1024;
/// The smallest chunk size [`split`] makes (header included), so a package of at most
/// [`MAX_PACKAGE_BYTES`] never needs more than about 70,000 chunks.
pub const MIN_CHUNK_BYTES: usize = 1024;
/// The chunk header: magic `AFCC`, index u32, count u32, total length u64, package sha256.
pub const CHUNK_HEADER_LEN: usize = 4 + 4 + 4 + 8 + 32;
/// The first bytes of a chunk.
pub const CHUNK_MAGIC: [u8; 4] = *b"AFCC";
/// The most package bytes one chunk carries.
pub const MAX_CHUNK_PAYLOAD: usize = MAX_CHUNK_BYTES - CHUNK_HEADER_LEN;
const MIN_CHUNK_PAYLOAD: usize = MIN_CHUNK_BYTES - CHUNK_HEADER_LEN;

/// Cuts an encoded package into chunk payloads of at most `chunk_size` bytes each, header included.
/// `chunk_size` is clamped to [`MIN_CHUNK_BYTES`]..=[`MAX_CHUNK_BYTES`]; every chunk but the last
/// carries the same number of package bytes.
pub fn split(package_bytes: &[u8], chunk_size: usize) -> Vec<Vec<u8>> {
    let payload = chunk_size.clamp(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES) - CHUNK_HEADER_LEN;
    let sha = package_sha256(package_bytes);
    let total_len = package_bytes.len() as u64;
    let pieces: Vec<&[u8]> =
        if package_bytes.is_empty() { vec![package_bytes] } else { package_bytes.chunks(payload).collect() };
    let count = pieces.len() as u32;
    pieces
        .into_iter()
        .enumerate()
        .map(|(index, piece)| {
            let header = ChunkHeader { index: index as u32, count, total_len, package_sha256: sha };
            let mut c = Vec::with_capacity(CHUNK_HEADER_LEN + piece.len());
            c.extend_from_slice(&header.to_bytes());
            c.extend_from_slice(piece);
            c
        })
        .collect()
}

/// What a chunk says about itself and the package it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Position of this chunk, from 0.
    pub index: u32,
    /// How many chunks the package has.
    pub count: u32,
    /// The whole package's length.
    pub total_len: u64,
    /// The whole package's sha256: which package this chunk is part of.
    pub package_sha256: [u8; 32],
}

impl ChunkHeader {
    /// The header's wire bytes (big-endian integers).
    pub fn to_bytes(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        b[0..4].copy_from_slice(&CHUNK_MAGIC);
        b[4..8].copy_from_slice(&self.index.to_be_bytes());
        b[8..12].copy_from_slice(&self.count.to_be_bytes());
        b[12..20].copy_from_slice(&self.total_len.to_be_bytes());
        b[20..52].copy_from_slice(&self.package_sha256);
        b
    }

    /// Splits a chunk into its header and its payload, checking only the framing.
    pub fn parse(chunk: &[u8]) -> Result<(ChunkHeader, &[u8]), ChunkError> {
        let mut r = Reader::new(chunk);
        let truncated = |_| ChunkError::Truncated { len: chunk.len() };
        let magic: [u8; 4] = r.array().map_err(truncated)?;
        if magic != CHUNK_MAGIC {
            return Err(ChunkError::BadMagic { found: magic });
        }
        let index = u32::from_be_bytes(r.array().map_err(truncated)?);
        let count = u32::from_be_bytes(r.array().map_err(truncated)?);
        let total_len = u64::from_be_bytes(r.array().map_err(truncated)?);
        let package_sha256 = r.array().map_err(truncated)?;
        Ok((ChunkHeader { index, count, total_len, package_sha256 }, r.rest()))
    }
}

/// Everything that can be wrong with a chunk or a reassembly.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChunkError {
    #[error("package of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("package is announced with 0 bytes")]
    EmptyPackage,
    #[error("{count} chunks cannot carry a package of {len} bytes")]
    CountInconsistent { len: u64, count: u32 },
    #[error("chunk of {len} bytes is shorter than its header")]
    Truncated { len: usize },
    #[error("chunk starts with {found:02x?}, not the magic \"AFCC\"")]
    BadMagic { found: [u8; 4] },
    #[error("chunk belongs to another package (sha256 {})", hex::encode(found))]
    OtherPackage { found: [u8; 32] },
    #[error("chunk index {index} is out of range for {count} chunks")]
    IndexOutOfRange { index: u32, count: u32 },
    #[error("chunk {index} says the package has {found} chunks, expected {expected}")]
    CountMismatch { index: u32, expected: u32, found: u32 },
    #[error("chunk {index} says the package has {found} bytes, expected {expected}")]
    LengthMismatch { index: u32, expected: u64, found: u64 },
    #[error("chunk {index} carries no package bytes")]
    EmptyPayload { index: u32 },
    #[error("chunk {index} carries {len} package bytes, more than the {max} a chunk may")]
    Oversized { index: u32, len: usize, max: usize },
    #[error("chunk {index} brings the package past its announced {expected} bytes")]
    TooMuchData { index: u32, expected: u64 },
    #[error("chunk {index} arrived twice with different contents")]
    ConflictingDuplicate { index: u32 },
    #[error("{} chunks missing, first {:?}", missing.len(), &missing[..missing.len().min(16)])]
    Missing { missing: Vec<u32> },
    #[error("reassembled package has {found} bytes, expected {expected}")]
    AssembledLengthMismatch { expected: u64, found: u64 },
    #[error("reassembled package's sha256 is not the announced one")]
    HashMismatch,
}

impl ChunkError {
    /// A stable snake_case name, for `params/ack` reasons and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            ChunkError::TooLarge { .. } => "chunk_package_too_large",
            ChunkError::EmptyPackage => "chunk_package_empty",
            ChunkError::CountInconsistent { .. } => "chunk_count_inconsistent",
            ChunkError::Truncated { .. } => "chunk_truncated",
            ChunkError::BadMagic { .. } => "chunk_bad_magic",
            ChunkError::OtherPackage { .. } => "chunk_other_package",
            ChunkError::IndexOutOfRange { .. } => "chunk_index_out_of_range",
            ChunkError::CountMismatch { .. } => "chunk_count_mismatch",
            ChunkError::LengthMismatch { .. } => "chunk_length_mismatch",
            ChunkError::EmptyPayload { .. } => "chunk_empty_payload",
            ChunkError::Oversized { .. } => "chunk_oversized",
            ChunkError::TooMuchData { .. } => "chunk_too_much_data",
            ChunkError::ConflictingDuplicate { .. } => "chunk_conflicting_duplicate",
            ChunkError::Missing { .. } => "chunks_missing",
            ChunkError::AssembledLengthMismatch { .. } => "chunk_assembled_length_mismatch",
            ChunkError::HashMismatch => "chunk_hash_mismatch",
        }
    }
}

/// Collects the chunks of one announced package, in any order, duplicates allowed.
///
/// Memory is bounded by the announced length (itself at most [`MAX_PACKAGE_BYTES`]) and the
/// announced count (at most one chunk per [`MIN_CHUNK_BYTES`] of payload).
#[derive(Debug)]
pub struct Reassembler {
    /// The whole package's sha256, from the `params/{kind}/current` pointer.
    expected_sha256: [u8; 32],
    /// The whole package's length, from the pointer.
    expected_len: u64,
    /// Each chunk's payload once received, by index.
    chunks: Vec<Option<Vec<u8>>>,
    /// Package bytes received so far, so a hostile sender cannot make us hold more than announced.
    received_bytes: u64,
    /// Chunks still missing.
    missing_count: usize,
}

impl Reassembler {
    /// Starts collecting a package announced with this sha256, length and chunk count.
    pub fn new(
        expected_sha256: [u8; 32],
        expected_len: u64,
        expected_chunks: u32,
    ) -> Result<Reassembler, ChunkError> {
        if expected_len > MAX_PACKAGE_BYTES {
            return Err(ChunkError::TooLarge { len: expected_len, max: MAX_PACKAGE_BYTES });
        }
        if expected_len == 0 {
            return Err(ChunkError::EmptyPackage);
        }
        // Chunks carry between MIN_CHUNK_PAYLOAD (but the last) and MAX_CHUNK_PAYLOAD bytes.
        let fewest = expected_len.div_ceil(MAX_CHUNK_PAYLOAD as u64);
        let most = expected_len.div_ceil(MIN_CHUNK_PAYLOAD as u64);
        if u64::from(expected_chunks) < fewest || u64::from(expected_chunks) > most {
            return Err(ChunkError::CountInconsistent { len: expected_len, count: expected_chunks });
        }
        let count = expected_chunks as usize;
        Ok(Reassembler {
            expected_sha256,
            expected_len,
            chunks: vec![None; count],
            received_bytes: 0,
            missing_count: count,
        })
    }

    /// Adds one chunk; `Ok(true)` once every chunk is in. A repeated identical chunk is ignored.
    pub fn add(&mut self, chunk: &[u8]) -> Result<bool, ChunkError> {
        let (h, payload) = ChunkHeader::parse(chunk)?;
        if h.package_sha256 != self.expected_sha256 {
            return Err(ChunkError::OtherPackage { found: h.package_sha256 });
        }
        let expected_count = self.chunks.len() as u32;
        if h.index >= expected_count {
            return Err(ChunkError::IndexOutOfRange { index: h.index, count: expected_count });
        }
        if h.count != expected_count {
            return Err(ChunkError::CountMismatch {
                index: h.index,
                expected: expected_count,
                found: h.count,
            });
        }
        if h.total_len != self.expected_len {
            return Err(ChunkError::LengthMismatch {
                index: h.index,
                expected: self.expected_len,
                found: h.total_len,
            });
        }
        if payload.is_empty() {
            return Err(ChunkError::EmptyPayload { index: h.index });
        }
        if payload.len() > MAX_CHUNK_PAYLOAD {
            return Err(ChunkError::Oversized { index: h.index, len: payload.len(), max: MAX_CHUNK_PAYLOAD });
        }
        let Some(slot) = self.chunks.get_mut(h.index as usize) else {
            return Err(ChunkError::IndexOutOfRange { index: h.index, count: expected_count });
        };
        match slot {
            Some(held) if held.as_slice() == payload => {}
            Some(_) => return Err(ChunkError::ConflictingDuplicate { index: h.index }),
            None => {
                let received = self.received_bytes + payload.len() as u64;
                if received > self.expected_len {
                    return Err(ChunkError::TooMuchData { index: h.index, expected: self.expected_len });
                }
                *slot = Some(payload.to_vec());
                self.received_bytes = received;
                self.missing_count -= 1;
            }
        }
        Ok(self.missing_count == 0)
    }

    /// The indices of the chunks not yet received.
    pub fn missing(&self) -> Vec<u32> {
        (0u32..).zip(&self.chunks).filter(|(_, c)| c.is_none()).map(|(i, _)| i).collect()
    }

    /// Whether every chunk is in.
    pub fn is_complete(&self) -> bool {
        self.missing_count == 0
    }

    /// The whole package, once every chunk is in and its length and sha256 are the announced ones.
    pub fn finish(self) -> Result<Vec<u8>, ChunkError> {
        if self.missing_count > 0 {
            return Err(ChunkError::Missing { missing: self.missing() });
        }
        if self.received_bytes != self.expected_len {
            return Err(ChunkError::AssembledLengthMismatch {
                expected: self.expected_len,
                found: self.received_bytes,
            });
        }
        let mut out = Vec::with_capacity(self.received_bytes as usize);
        for c in self.chunks.into_iter().flatten() {
            out.extend_from_slice(&c);
        }
        if package_sha256(&out) != self.expected_sha256 {
            return Err(ChunkError::HashMismatch);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blacklist::Entry;
    use crate::model::Media;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn keys_with(id: u32, k: &SigningKey) -> TrustedKeys {
        let mut keys = TrustedKeys::new();
        keys.insert(id, k.verifying_key());
        keys
    }

    fn sample() -> Package {
        Package::sign(
            ParamKind::GateConfig,
            3,
            Timestamp(1_780_000_000_000),
            b"{\"x\":1}".to_vec(),
            7,
            &key(1),
        )
    }

    #[test]
    fn a_signed_package_round_trips_and_verifies() {
        let p = sample();
        let bytes = p.encode();
        assert_eq!(bytes.len(), PACKAGE_PREFIX_LEN + p.body.len());
        let back = Package::decode(&bytes).unwrap();
        assert_eq!(back, p);
        back.verify(&keys_with(7, &key(1))).unwrap();
    }

    #[test]
    fn a_package_signed_by_an_unknown_or_wrong_key_is_refused() {
        let p = sample();
        assert_eq!(p.verify(&keys_with(8, &key(1))), Err(PackageError::UnknownKey { key_id: 7 }));
        assert_eq!(p.verify(&keys_with(7, &key(2))), Err(PackageError::BadSignature { key_id: 7 }));
        assert_eq!(p.verify(&TrustedKeys::new()).unwrap_err().code(), "unknown_key");
    }

    #[test]
    fn a_changed_body_is_refused_by_length_or_hash() {
        let keys = keys_with(7, &key(1));
        let mut p = sample();
        p.body.push(b' ');
        assert_eq!(p.verify(&keys), Err(PackageError::LengthMismatch { header: 7, actual: 8 }));
        let mut p = sample();
        p.body[0] = b'[';
        assert_eq!(p.verify(&keys), Err(PackageError::HashMismatch));
    }

    #[test]
    fn framing_errors_are_distinct() {
        let bytes = sample().encode();
        assert_eq!(Package::decode(&bytes[..2]), Err(PackageError::Truncated { field: "magic" }));
        assert_eq!(Package::decode(b"AFCX....."), Err(PackageError::BadMagic { found: *b"AFCX" }));
        let mut v = bytes.clone();
        v[4] = 2;
        assert_eq!(Package::decode(&v), Err(PackageError::UnsupportedFormat { found: 2 }));
        let mut v = bytes.clone();
        v[5] = 99;
        assert_eq!(Package::decode(&v), Err(PackageError::UnknownKind { code: 99 }));
        assert_eq!(Package::decode(&bytes[..100]), Err(PackageError::Truncated { field: "signature" }));
        assert_eq!(
            Package::decode(&bytes[..bytes.len() - 1]),
            Err(PackageError::Truncated { field: "body" })
        );
        let mut v = bytes.clone();
        v.extend_from_slice(b"xx");
        assert_eq!(Package::decode(&v), Err(PackageError::TrailingBytes { count: 2 }));
        let mut v = bytes;
        v[22..30].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(Package::decode(&v), Err(PackageError::TooLarge { .. })));
    }

    #[test]
    fn an_offered_version_not_above_the_held_one_is_refused() {
        let k = ParamKind::FareTable;
        assert!(check_version_order(k, None, 1).is_ok());
        assert!(check_version_order(k, Some(4), 5).is_ok());
        assert_eq!(
            check_version_order(k, Some(5), 5),
            Err(PackageError::VersionNotNewer { kind: k, held: 5, offered: 5 })
        );
        assert_eq!(
            check_version_order(k, Some(5), 4),
            Err(PackageError::VersionNotNewer { kind: k, held: 5, offered: 4 })
        );
        assert_eq!(
            check_version_order(k, None, 0),
            Err(PackageError::VersionNotNewer { kind: k, held: 0, offered: 0 })
        );
    }

    #[test]
    fn blacklist_bodies_round_trip_and_must_match_the_header_version() {
        let full = BlacklistBody::Full(Blacklist::from_entries(4, [Entry::single(Media::Svc, 9)]));
        assert_eq!(BlacklistBody::decode(&full.encode()).unwrap(), full);
        let delta = BlacklistBody::Delta(BlacklistDelta {
            from_version: 4,
            to_version: 5,
            add: vec![Entry::single(Media::Qr, 1)],
            remove: vec![],
        });
        assert_eq!(BlacklistBody::decode(&delta.encode()).unwrap(), delta);
        assert_eq!(BlacklistBody::decode(&[]), Err(PackageError::EmptyBody));
        assert_eq!(BlacklistBody::decode(&[9, 1]), Err(PackageError::UnknownBodyTag { tag: 9 }));
        assert_eq!(BlacklistBody::decode(&[1]).unwrap_err().code(), "blacklist_body_invalid");

        let p = Package::sign(ParamKind::Blacklist, 5, Timestamp(0), delta.encode(), 1, &key(1));
        assert_eq!(BlacklistBody::from_package(&p).unwrap(), delta);
        let p = Package::sign(ParamKind::Blacklist, 6, Timestamp(0), delta.encode(), 1, &key(1));
        assert_eq!(
            BlacklistBody::from_package(&p),
            Err(PackageError::BodyVersionMismatch { header: 6, body: 5 })
        );
        let p = Package::sign(ParamKind::Mode, 5, Timestamp(0), delta.encode(), 1, &key(1));
        assert!(matches!(BlacklistBody::from_package(&p), Err(PackageError::WrongKind { .. })));
    }

    #[test]
    fn json_bodies_round_trip_and_bad_json_is_named() {
        let v = serde_json::json!({"direction": "entry"});
        let body = encode_json_body(&v).unwrap();
        assert_eq!(decode_json_body::<serde_json::Value>(&body).unwrap(), v);
        assert_eq!(decode_json_body::<serde_json::Value>(b"{").unwrap_err().code(), "json_body_invalid");
    }

    #[test]
    fn trusted_keys_are_read_from_hex_and_bad_ones_named() {
        let hex_key = hex::encode(key(1).verifying_key().to_bytes());
        let keys = TrustedKeys::from_hex_pairs([(1, hex_key.as_str())]).unwrap();
        assert_eq!(keys.key_ids().collect::<Vec<_>>(), vec![1]);
        sample().verify(&TrustedKeys::from_hex_pairs([(7, hex_key.as_str())]).unwrap()).unwrap();
        assert_eq!(TrustedKeys::from_hex_pairs([(2, "zz")]), Err(TrustedKeyError::NotHex { key_id: 2 }));
        assert_eq!(
            TrustedKeys::from_hex_pairs([(2, "abcd")]),
            Err(TrustedKeyError::WrongLength { key_id: 2, len: 2 })
        );
        assert_eq!(
            TrustedKeys::from_hex_pairs([(1, hex_key.as_str()), (1, hex_key.as_str())]),
            Err(TrustedKeyError::DuplicateKeyId { key_id: 1 })
        );
    }

    #[test]
    fn chunks_fit_their_size_and_reassemble_in_any_order() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let chunks = split(&bytes, 2000);
        assert_eq!(chunks.len(), 6);
        assert!(chunks.iter().all(|c| c.len() <= 2000));
        let mut r = Reassembler::new(package_sha256(&bytes), bytes.len() as u64, 6).unwrap();
        for i in [5, 0, 3, 3, 1, 4] {
            assert!(!r.add(&chunks[i]).unwrap());
        }
        assert_eq!(r.missing(), vec![2]);
        assert!(r.add(&chunks[2]).unwrap());
        assert!(r.add(&chunks[0]).unwrap());
        assert_eq!(r.finish().unwrap(), bytes);
    }

    #[test]
    fn split_clamps_the_chunk_size() {
        let bytes = vec![1u8; 5000];
        assert!(split(&bytes, 10).iter().all(|c| c.len() <= MIN_CHUNK_BYTES));
        assert_eq!(split(&bytes, 10).len(), 6);
        assert_eq!(split(&bytes, usize::MAX).len(), 1);
    }

    #[test]
    fn an_absurd_announcement_is_refused() {
        let sha = [0u8; 32];
        assert!(matches!(
            Reassembler::new(sha, MAX_PACKAGE_BYTES + 1, 300),
            Err(ChunkError::TooLarge { .. })
        ));
        assert_eq!(Reassembler::new(sha, 0, 0).unwrap_err(), ChunkError::EmptyPackage);
        assert_eq!(
            Reassembler::new(sha, 100, 0).unwrap_err(),
            ChunkError::CountInconsistent { len: 100, count: 0 }
        );
        assert_eq!(
            Reassembler::new(sha, 100, 2).unwrap_err(),
            ChunkError::CountInconsistent { len: 100, count: 2 }
        );
        assert_eq!(
            Reassembler::new(sha, MAX_PACKAGE_BYTES, u32::MAX).unwrap_err(),
            ChunkError::CountInconsistent { len: MAX_PACKAGE_BYTES, count: u32::MAX }
        );
        assert!(Reassembler::new(sha, MAX_PACKAGE_BYTES, 257).is_ok());
    }

    #[test]
    fn wrong_chunks_are_refused_distinctly() {
        let bytes = vec![3u8; 3000];
        let sha = package_sha256(&bytes);
        let chunks = split(&bytes, 1024);
        assert_eq!(chunks.len(), 4);
        let mut r = Reassembler::new(sha, 3000, 4).unwrap();
        let other = split(&[4u8; 3000], 1024);
        assert!(matches!(r.add(&other[0]), Err(ChunkError::OtherPackage { .. })));
        assert_eq!(r.add(&chunks[0][..10]), Err(ChunkError::Truncated { len: 10 }));
        let mut bad = chunks[0].clone();
        bad[0] = b'X';
        assert_eq!(r.add(&bad).unwrap_err().code(), "chunk_bad_magic");
        let with = |index: u32, count: u32, total_len: u64, payload: &[u8]| {
            let mut c = ChunkHeader { index, count, total_len, package_sha256: sha }.to_bytes().to_vec();
            c.extend_from_slice(payload);
            c
        };
        assert_eq!(r.add(&with(4, 4, 3000, b"x")), Err(ChunkError::IndexOutOfRange { index: 4, count: 4 }));
        assert_eq!(
            r.add(&with(1, 5, 3000, b"x")),
            Err(ChunkError::CountMismatch { index: 1, expected: 4, found: 5 })
        );
        assert_eq!(
            r.add(&with(1, 4, 3001, b"x")),
            Err(ChunkError::LengthMismatch { index: 1, expected: 3000, found: 3001 })
        );
        assert_eq!(r.add(&with(1, 4, 3000, b"")), Err(ChunkError::EmptyPayload { index: 1 }));
        let huge = vec![0u8; MAX_CHUNK_PAYLOAD + 1];
        assert!(matches!(r.add(&with(1, 4, 3000, &huge)), Err(ChunkError::Oversized { index: 1, .. })));
        assert!(matches!(
            r.add(&with(1, 4, 3000, &[0u8; 3001])),
            Err(ChunkError::TooMuchData { index: 1, .. })
        ));
        r.add(&chunks[1]).unwrap();
        assert_eq!(r.add(&with(1, 4, 3000, b"y")), Err(ChunkError::ConflictingDuplicate { index: 1 }));
        assert_eq!(r.missing(), vec![0, 2, 3]);
        assert_eq!(r.finish(), Err(ChunkError::Missing { missing: vec![0, 2, 3] }));
    }

    #[test]
    fn chunks_that_add_up_to_other_bytes_fail_the_final_hash() {
        let bytes = vec![3u8; 3000];
        let sha = package_sha256(&bytes);
        let mut r = Reassembler::new(sha, 3000, 2).unwrap();
        for (i, payload) in [(0u32, vec![3u8; 1500]), (1, vec![4u8; 1500])] {
            let mut c =
                ChunkHeader { index: i, count: 2, total_len: 3000, package_sha256: sha }.to_bytes().to_vec();
            c.extend_from_slice(&payload);
            r.add(&c).unwrap();
        }
        assert_eq!(r.finish(), Err(ChunkError::HashMismatch));
        let mut r = Reassembler::new(sha, 3000, 2).unwrap();
        for i in 0..2u32 {
            let mut c =
                ChunkHeader { index: i, count: 2, total_len: 3000, package_sha256: sha }.to_bytes().to_vec();
            c.extend_from_slice(&[3u8; 1000]);
            r.add(&c).unwrap();
        }
        assert_eq!(r.finish(), Err(ChunkError::AssembledLengthMismatch { expected: 3000, found: 2000 }));
    }
}
