//! The package itself: its signed header, its byte layout (encode, decode), its signature
//! (sign, verify against the trusted keys) and the version order a gate enforces.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::blacklist::BlacklistError;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
