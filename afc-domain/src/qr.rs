//! QR ride codes (SPEC §1 `qr`, §12): the byte layout, offline verification (ed25519 or SM2, as
//! each issuer key declares) against the issuer keys of the `qr_keys` parameter set, a replay
//! cache, and a generator for simulators.
//!
//! # Byte layout (version 1, 91 bytes, big-endian)
//!
//! | offset | size | field | meaning |
//! |---|---|---|---|
//! | 0 | 1 | version | [`QR_VERSION`] (1) |
//! | 1 | 2 | issuer | issuer id (Alipay, WeChat, a bank, UnionPay, …) |
//! | 3 | 2 | key_id | which of the issuer's keys signed, so issuers can rotate keys |
//! | 5 | 8 | account | the account clearing charges |
//! | 13 | 4 | issued_at | Unix seconds (u32: good until 2106) |
//! | 17 | 2 | valid_secs | validity from `issued_at`, seconds (at most ~18 h) |
//! | 19 | 8 | nonce | chosen by the issuer, unique per account; the replay key |
//! | 27 | 64 | signature | over [`QR_SIGNING_DOMAIN`] ‖ bytes 0..27, by the algorithm of the key named |
//!
//! # Signature algorithms
//!
//! Each issuer key in the `qr_keys` set declares its algorithm ([`QrAlgorithm`], `ed25519` when
//! absent, as first-version sets were):
//! - `ed25519`: a 32-byte public key; the signature is RFC 8032 ed25519, verified strictly
//!   (`verify_strict`: no malleable or small-order forms).
//! - `sm2`: the Chinese national standard (GM/T 0003-2012, SM3 hash), as transport QR codes under
//!   the Chinese standard are signed; a SEC1 public key (65 bytes uncompressed or 33 compressed);
//!   the signature is `r ‖ s` (32 bytes each, big-endian) over `Z_A ‖ message` with the standard's
//!   default distinguishing identifier [`SM2_DIST_ID`]. Verified with RustCrypto's `sm2` crate,
//!   which has had no independent audit (docs/security.md).
//!
//! The algorithm is the key's, never the code's: a code cannot choose how it is checked.
//!
//! QR codes carry text, so the code travels as unpadded base64url ([`encode_text`], 122
//! characters, fits a version-6 QR code at level M).
//!
//! # Checks and their order
//!
//! [`verify`] checks the layout, then the key (known, and valid now), then the signature, then the
//! validity window with a configurable clock-skew tolerance ([`QrSkew`]). Only a code that passes
//! all of them reaches the [`ReplayCache`], so a forger cannot fill the cache. A code may not
//! claim a longer validity than its issuer's maximum ([`QrKeySet::max_validity_secs`]: set per
//! issuer in the `qr_keys` set, by default the longest the layout can express).
//!
//! # Used codes from other gates
//!
//! The station relays the codes used at every gate (`qr/used`). The cache keeps each source's
//! codes in a bounded share of its own ([`ReplaySource`]; this gate's own codes are a source
//! too), so a source that floods the relay evicts only its own entries, and a relayed entry whose
//! expiry lies further ahead than its issuer's maximum validity is refused
//! ([`QrKeySet::plausible_expiry`]): it cannot be a real code.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::{Ident, Reason, Timestamp};

/// The layout version this module reads and writes.
pub const QR_VERSION: u8 = 1;
/// Bytes covered by the signature (everything before it).
pub const QR_BODY_LEN: usize = 27;
/// Length of the ed25519 signature.
pub const QR_SIGNATURE_LEN: usize = 64;
/// Total length of a code.
pub const QR_CODE_LEN: usize = QR_BODY_LEN + QR_SIGNATURE_LEN;
/// Length of the text form: unpadded base64 of [`QR_CODE_LEN`] bytes.
pub const QR_TEXT_LEN: usize = (QR_CODE_LEN * 4).div_ceil(3);
/// Prefix of the signed message, so an issuer key's ride-code signatures cannot be confused with
/// anything else the same key signs.
pub const QR_SIGNING_DOMAIN: &[u8] = b"afc/v1/qr-ride-code\0";
/// The SM2 distinguishing identifier hashed into `Z_A`: GM/T 0009's default user id, which the
/// issuers' signers use unless agreed otherwise.
pub const SM2_DIST_ID: &str = "1234567812345678";

/// How an issuer key signs its codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum QrAlgorithm {
    /// RFC 8032 ed25519, 32-byte public key.
    #[default]
    Ed25519,
    /// GM/T 0003-2012 SM2 with SM3, SEC1 public key.
    Sm2,
}

impl QrAlgorithm {
    pub fn is_ed25519(&self) -> bool {
        *self == QrAlgorithm::Ed25519
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QrAlgorithm::Ed25519 => "ed25519",
            QrAlgorithm::Sm2 => "sm2",
        }
    }
}

/// An issuer's private key, for the generator (simulators, tests, the reference issuer).
#[derive(Debug, Clone)]
pub enum QrSigner {
    Ed25519(SigningKey),
    Sm2(sm2::dsa::SigningKey),
}

impl QrSigner {
    /// An SM2 signer from a 32-byte secret scalar; `None` if it is zero or not below the order.
    pub fn sm2_from_bytes(secret: &[u8; 32]) -> Option<QrSigner> {
        sm2::dsa::SigningKey::from_slice(SM2_DIST_ID, secret).ok().map(QrSigner::Sm2)
    }

    /// A fresh random SM2 signer.
    pub fn sm2_random() -> QrSigner {
        loop {
            let bytes: [u8; 32] = rand::random();
            if let Some(k) = QrSigner::sm2_from_bytes(&bytes) {
                return k;
            }
        }
    }

    pub fn algorithm(&self) -> QrAlgorithm {
        match self {
            QrSigner::Ed25519(_) => QrAlgorithm::Ed25519,
            QrSigner::Sm2(_) => QrAlgorithm::Sm2,
        }
    }

    /// The public key as the `qr_keys` set lists it (ed25519: 32 bytes; SM2: SEC1 uncompressed).
    pub fn public_key(&self) -> Vec<u8> {
        match self {
            QrSigner::Ed25519(k) => k.verifying_key().to_bytes().to_vec(),
            QrSigner::Sm2(k) => k.verifying_key().to_sec1_bytes().into_vec(),
        }
    }

    fn sign(&self, message: &[u8]) -> [u8; QR_SIGNATURE_LEN] {
        match self {
            QrSigner::Ed25519(k) => k.sign(message).to_bytes(),
            QrSigner::Sm2(k) => {
                let sig: sm2::dsa::Signature = sm2::dsa::signature::Signer::sign(k, message);
                let mut out = [0u8; QR_SIGNATURE_LEN];
                out.copy_from_slice(&sig.to_bytes());
                out
            }
        }
    }
}

/// What an issuer puts in a code (the generator's input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QrIssue {
    pub issuer: u16,
    pub key_id: u16,
    pub account: u64,
    /// Stored in whole seconds: milliseconds are dropped, instants outside 1970..2106 are clamped.
    pub issued_at: Timestamp,
    pub valid_secs: u16,
    pub nonce: u64,
}

/// What a verified code says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QrClaims {
    pub issuer: u16,
    pub key_id: u16,
    /// The account clearing charges; recorded as the transaction's `id`.
    pub account: u64,
    pub issued_at: Timestamp,
    /// `issued_at + valid_secs`.
    pub expires_at: Timestamp,
    /// With `issuer` and `account`, identifies this code for the replay check.
    pub nonce: u64,
}

impl QrClaims {
    /// The code's identity for the replay check.
    pub fn replay_key(&self) -> ReplayKey {
        ReplayKey { issuer: self.issuer, account: self.account, nonce: self.nonce }
    }
}

/// How far the gate's clock and the issuer's clock may disagree: a code is still accepted this long
/// after it expires, and this long before it is issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QrSkew {
    pub tolerance_ms: u32,
}

impl QrSkew {
    /// No tolerance at all.
    pub const NONE: QrSkew = QrSkew { tolerance_ms: 0 };

    pub fn from_millis(tolerance_ms: u32) -> QrSkew {
        QrSkew { tolerance_ms }
    }

    fn ms(self) -> i64 {
        i64::from(self.tolerance_ms)
    }

    /// The tolerance in milliseconds (the decision also allows it on ride times: two gates'
    /// clocks).
    pub fn millis(self) -> i64 {
        self.ms()
    }
}

impl Default for QrSkew {
    /// 30 seconds: phones and gates are NTP-synchronised, but phone clocks drift and codes are
    /// displayed for a while before they are scanned.
    fn default() -> Self {
        QrSkew { tolerance_ms: 30_000 }
    }
}

/// Why a code was refused. [`QrError::reason`] gives the reject reason for the gate and ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum QrError {
    #[error("QR code text is {len} characters, expected {}", QR_TEXT_LEN)]
    TextLength { len: usize },
    #[error("QR code text is not unpadded base64url")]
    TextEncoding,
    #[error("QR code is {len} bytes, expected {}", QR_CODE_LEN)]
    WrongLength { len: usize },
    #[error("QR code has layout version {0}, expected {}", QR_VERSION)]
    UnknownVersion(u8),
    #[error("no key {key_id} of QR issuer {issuer} is known")]
    UnknownKey { issuer: u16, key_id: u16 },
    #[error("key {key_id} of QR issuer {issuer} is not valid at this time")]
    KeyNotValid { issuer: u16, key_id: u16 },
    #[error("QR code signature does not verify")]
    BadSignature,
    #[error("QR code expired at {expires_at:?}")]
    Expired { expires_at: Timestamp },
    #[error("QR code is issued at {issued_at:?}, in the future")]
    NotYetValid { issued_at: Timestamp },
    #[error("QR code was already used")]
    Replayed,
    #[error("QR code claims a validity of {valid_secs} s, its issuer's maximum is {max_secs} s")]
    TooLongValidity { valid_secs: i64, max_secs: u16 },
}

impl QrError {
    /// The reject reason shown at the gate and recorded in the ledger.
    pub fn reason(&self) -> Reason {
        match self {
            QrError::TextLength { .. }
            | QrError::TextEncoding
            | QrError::WrongLength { .. }
            | QrError::UnknownVersion(_)
            | QrError::TooLongValidity { .. } => Reason::QrMalformed,
            QrError::UnknownKey { .. } | QrError::KeyNotValid { .. } => Reason::QrUnknownKey,
            QrError::BadSignature => Reason::QrBadSignature,
            QrError::Expired { .. } => Reason::QrExpired,
            QrError::NotYetValid { .. } => Reason::QrNotYetValid,
            QrError::Replayed => Reason::QrReplayed,
        }
    }
}

/// Builds a code signed with an ed25519 key (for simulators, tests and the reference issuer).
pub fn generate(issue: &QrIssue, key: &SigningKey) -> Vec<u8> {
    generate_with(issue, &QrSigner::Ed25519(key.clone()))
}

/// Builds a code signed by `signer`, whatever its algorithm.
pub fn generate_with(issue: &QrIssue, signer: &QrSigner) -> Vec<u8> {
    let secs = issue.issued_at.secs().clamp(0, i64::from(u32::MAX));
    // Cannot fail: clamped to the u32 range just above.
    let secs = u32::try_from(secs).unwrap_or(u32::MAX);
    let mut body = [0u8; QR_BODY_LEN];
    body[0] = QR_VERSION;
    body[1..3].copy_from_slice(&issue.issuer.to_be_bytes());
    body[3..5].copy_from_slice(&issue.key_id.to_be_bytes());
    body[5..13].copy_from_slice(&issue.account.to_be_bytes());
    body[13..17].copy_from_slice(&secs.to_be_bytes());
    body[17..19].copy_from_slice(&issue.valid_secs.to_be_bytes());
    body[19..27].copy_from_slice(&issue.nonce.to_be_bytes());
    let signature = signer.sign(&signing_message(&body));
    let mut code = Vec::with_capacity(QR_CODE_LEN);
    code.extend_from_slice(&body);
    code.extend_from_slice(&signature);
    code
}

/// The text form of a code: unpadded base64url.
pub fn encode_text(code: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(code)
}

/// Decodes the text form. Only the exact length of a version-1 code is accepted, which also bounds
/// the allocation.
pub fn decode_text(text: &str) -> Result<Vec<u8>, QrError> {
    if text.len() != QR_TEXT_LEN {
        return Err(QrError::TextLength { len: text.len() });
    }
    URL_SAFE_NO_PAD.decode(text).map_err(|_| QrError::TextEncoding)
}

/// A code split into its parts, signature not yet checked.
struct Parsed {
    claims: QrClaims,
    body: [u8; QR_BODY_LEN],
    signature: [u8; QR_SIGNATURE_LEN],
}

fn parse(code: &[u8]) -> Result<Parsed, QrError> {
    let code: &[u8; QR_CODE_LEN] = code.try_into().map_err(|_| QrError::WrongLength { len: code.len() })?;
    let (body_part, sig_part) = code.split_at(QR_BODY_LEN);
    let mut body = [0u8; QR_BODY_LEN];
    body.copy_from_slice(body_part);
    let mut signature = [0u8; QR_SIGNATURE_LEN];
    signature.copy_from_slice(sig_part);
    if body[0] != QR_VERSION {
        return Err(QrError::UnknownVersion(body[0]));
    }
    let issuer = u16::from_be_bytes([body[1], body[2]]);
    let key_id = u16::from_be_bytes([body[3], body[4]]);
    let account = u64::from_be_bytes(array8(&body, 5));
    let issued_secs = u32::from_be_bytes([body[13], body[14], body[15], body[16]]);
    let valid_secs = u16::from_be_bytes([body[17], body[18]]);
    let nonce = u64::from_be_bytes(array8(&body, 19));
    // u32 seconds and u16 seconds: neither the product nor the sum can overflow i64.
    let issued_at = Timestamp(i64::from(issued_secs) * 1000);
    let expires_at = Timestamp(issued_at.0 + i64::from(valid_secs) * 1000);
    Ok(Parsed { claims: QrClaims { issuer, key_id, account, issued_at, expires_at, nonce }, body, signature })
}

/// Eight bytes of the body from `at`; only called with the constant offsets 5 and 19.
fn array8(body: &[u8; QR_BODY_LEN], at: usize) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&body[at..at + 8]);
    a
}

fn signing_message(body: &[u8; QR_BODY_LEN]) -> Vec<u8> {
    let mut m = Vec::with_capacity(QR_SIGNING_DOMAIN.len() + QR_BODY_LEN);
    m.extend_from_slice(QR_SIGNING_DOMAIN);
    m.extend_from_slice(body);
    m
}

/// Reads a code's claims **without checking anything but the layout**: for logs and diagnostics,
/// never for a decision.
pub fn decode_unverified(code: &[u8]) -> Result<QrClaims, QrError> {
    parse(code).map(|p| p.claims)
}

/// Verifies a code offline: layout, key, signature and validity window (not replays: pass the
/// claims to a [`ReplayCache`] next).
pub fn verify(code: &[u8], keys: &QrKeySet, now: Timestamp, skew: QrSkew) -> Result<QrClaims, QrError> {
    let parsed = parse(code)?;
    let QrClaims { issuer, key_id, issued_at, expires_at, .. } = parsed.claims;
    let (entry, verifying) = keys.lookup(issuer, key_id).ok_or(QrError::UnknownKey { issuer, key_id })?;
    if now < entry.valid_from || now > entry.valid_to {
        return Err(QrError::KeyNotValid { issuer, key_id });
    }
    verifying.verify(&signing_message(&parsed.body), &parsed.signature)?;
    let max_secs = keys.max_validity_secs(issuer);
    let valid_secs = (expires_at.0 - issued_at.0) / 1000;
    if valid_secs > i64::from(max_secs) {
        return Err(QrError::TooLongValidity { valid_secs, max_secs });
    }
    if now.0 > expires_at.0.saturating_add(skew.ms()) {
        return Err(QrError::Expired { expires_at });
    }
    if issued_at.0 > now.0.saturating_add(skew.ms()) {
        return Err(QrError::NotYetValid { issued_at });
    }
    Ok(parsed.claims)
}

/// [`decode_text`] then [`verify`].
pub fn verify_text(text: &str, keys: &QrKeySet, now: Timestamp, skew: QrSkew) -> Result<QrClaims, QrError> {
    verify(&decode_text(text)?, keys, now, skew)
}

/// One issuer public key, as listed in the `qr_keys` parameter set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct QrIssuerKey {
    pub issuer: u16,
    pub key_id: u16,
    /// How this key signs (`ed25519` when absent; left out when ed25519, so a set of ed25519
    /// keys has the bytes a first-version gate reads).
    #[serde(default, skip_serializing_if = "QrAlgorithm::is_ed25519")]
    pub algorithm: QrAlgorithm,
    /// The public key in hex: ed25519 32 bytes; SM2 a SEC1 point (65 bytes uncompressed, 33
    /// compressed).
    #[serde(with = "hex_key")]
    #[cfg_attr(feature = "schema", schema(value_type = String, format = "hex"))]
    pub public_key: Vec<u8>,
    /// The key is accepted from this instant (inclusive) …
    pub valid_from: Timestamp,
    /// … until this one (inclusive), so issuers can rotate keys with an overlap.
    pub valid_to: Timestamp,
}

/// Hex of an issuer public key, at most [`MAX_PUBLIC_KEY_LEN`] bytes.
mod hex_key {
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if text.len() > 2 * super::MAX_PUBLIC_KEY_LEN {
            return Err(de::Error::invalid_length(text.len(), &"a public key of at most 65 bytes in hex"));
        }
        hex::decode(text.as_bytes()).map_err(de::Error::custom)
    }
}

/// The longest public key any algorithm has (an uncompressed SEC1 SM2 point).
pub const MAX_PUBLIC_KEY_LEN: usize = 65;

/// Why a `qr_keys` parameter set was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QrKeyError {
    #[error("key {key_id} of issuer {issuer} is not an {} public key", algorithm.as_str())]
    BadPublicKey { issuer: u16, key_id: u16, algorithm: QrAlgorithm },
    #[error("key {key_id} of issuer {issuer} is a weak (small-order) ed25519 key")]
    WeakPublicKey { issuer: u16, key_id: u16 },
    #[error("key {key_id} of issuer {issuer} is listed more than once")]
    Duplicate { issuer: u16, key_id: u16 },
    #[error("key {key_id} of issuer {issuer} has valid_from after valid_to")]
    InvertedValidity { issuer: u16, key_id: u16 },
    #[error("qr_keys body is not valid JSON for a key set: {0}")]
    Json(String),
}

/// The JSON body of a `qr_keys` parameter package: `{"keys": [QrIssuerKey, …]}`, optionally with
/// `"max_valid_secs": {"<issuer>": secs, …}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct QrKeySetBody {
    keys: Vec<QrIssuerKey>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    max_valid_secs: BTreeMap<u16, u16>,
}

/// SM2 verification (GM/T 0003-2012 part 2, §7), on the `sm2` crate's curve arithmetic and SM3.
///
/// The crate's own `VerifyingKey::verify` computes `[s]G + [t]P` in constant time; a signature
/// and a public key are public data, so this path uses a variable-time multi-scalar
/// multiplication (wNAF, window 6) with the tables of `G` (once per process) and of each issuer
/// key (once per key set) precomputed: about a third faster (111 against 171 µs for the point
/// arithmetic on this machine), which is what keeps an SM2 code within the QR decision target.
/// `Z_A` is computed once per key. Its correctness is checked against the
/// crate's signer (every valid code verifies) and by the refusal tests.
mod sm2_verify {
    use primeorder::PrimeCurveParams;
    use sm2::elliptic_curve::group::Group;
    use sm2::elliptic_curve::ops::Reduce;
    use sm2::elliptic_curve::point::AffineCoordinates;
    use sm2::elliptic_curve::sec1::ToSec1Point;
    use sm2::{FieldBytes, ProjectivePoint, PublicKey, Scalar, Sm2};
    use sm3::{Digest, Sm3};
    use wnaf::array::typenum::U6;

    /// The wNAF window: 16 precomputed points per base. Not 7 or 8: wnaf 0.14.1 computes their
    /// digits through an `i8` that overflows (a panic in debug builds, wrapping in release).
    type Window = U6;
    type Table = wnaf::WnafBase<ProjectivePoint, Window>;

    /// `G`'s table, built on first use.
    static GENERATOR: std::sync::LazyLock<Table> =
        std::sync::LazyLock::new(|| Table::new(&ProjectivePoint::generator()));

    /// A public key ready to verify with: its point's table and the signer's `Z_A`.
    #[derive(Clone)]
    pub(super) struct Key {
        table: Box<Table>,
        za: [u8; 32],
    }

    impl std::fmt::Debug for Key {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Key").field("za", &hex::encode(self.za)).finish_non_exhaustive()
        }
    }

    /// Parses a SEC1 key (refusing the identity and points off the curve) and hashes its `Z_A`
    /// with the distinguishing identifier `id`: `SM3(ENTL ‖ ID ‖ a ‖ b ‖ xG ‖ yG ‖ xA ‖ yA)`.
    pub(super) fn key(sec1: &[u8], id: &str) -> Option<Key> {
        let public = PublicKey::from_sec1_bytes(sec1).ok()?;
        let entl = u16::try_from(id.len().checked_mul(8)?).ok()?;
        let mut h = Sm3::new();
        h.update(entl.to_be_bytes());
        h.update(id.as_bytes());
        h.update(Sm2::EQUATION_A.to_bytes());
        h.update(Sm2::EQUATION_B.to_bytes());
        h.update(Sm2::GENERATOR.0.to_bytes());
        h.update(Sm2::GENERATOR.1.to_bytes());
        let encoded = public.as_affine().to_sec1_point(false);
        h.update(encoded.x()?);
        h.update(encoded.y()?);
        let mut za = [0u8; 32];
        za.copy_from_slice(&h.finalize());
        Some(Key { table: Box::new(Table::new(&public.to_projective())), za })
    }

    /// Whether `signature` (`r ‖ s`) is `key`'s over `message`.
    pub(super) fn verify(key: &Key, message: &[u8], signature: &[u8; 64]) -> bool {
        // r and s in [1, n-1]: the signature type refuses anything else.
        let Ok(sig) = sm2::dsa::Signature::from_slice(signature) else { return false };
        let (r, s) = sig.split_scalars();
        let mut h = Sm3::new_with_prefix(key.za);
        h.update(message);
        let e = <Scalar as Reduce<FieldBytes>>::reduce(&h.finalize());
        let t = *r + *s;
        if bool::from(t.is_zero()) {
            return false;
        }
        let (s, t) =
            (wnaf::WnafScalar::<Scalar, Window>::new(&s), wnaf::WnafScalar::<Scalar, Window>::new(&t));
        let point = Table::multiscalar_mul([(&*GENERATOR, &s), (&*key.table, &t)].into_iter());
        if bool::from(point.is_identity()) {
            return false;
        }
        let x = <Scalar as Reduce<FieldBytes>>::reduce(&point.to_affine().x());
        *r == e + x
    }
}

/// A public key parsed once for its algorithm (and, for SM2, with `Z_A` computed once).
#[derive(Debug, Clone)]
enum IssuerVerifier {
    Ed25519(VerifyingKey),
    Sm2(Box<sm2_verify::Key>),
}

impl IssuerVerifier {
    fn parse(k: &QrIssuerKey) -> Result<IssuerVerifier, QrKeyError> {
        let (issuer, key_id, algorithm) = (k.issuer, k.key_id, k.algorithm);
        let bad = QrKeyError::BadPublicKey { issuer, key_id, algorithm };
        match algorithm {
            QrAlgorithm::Ed25519 => {
                let bytes: &[u8; 32] = k.public_key.as_slice().try_into().map_err(|_| bad.clone())?;
                let vk = VerifyingKey::from_bytes(bytes).map_err(|_| bad)?;
                if vk.is_weak() {
                    return Err(QrKeyError::WeakPublicKey { issuer, key_id });
                }
                Ok(IssuerVerifier::Ed25519(vk))
            }
            // `from_sec1_bytes` refuses the identity and any point not on the curve.
            QrAlgorithm::Sm2 => sm2_verify::key(&k.public_key, SM2_DIST_ID)
                .map(|key| IssuerVerifier::Sm2(Box::new(key)))
                .ok_or(bad),
        }
    }

    fn verify(&self, message: &[u8], signature: &[u8; QR_SIGNATURE_LEN]) -> Result<(), QrError> {
        let ok = match self {
            IssuerVerifier::Ed25519(vk) => {
                vk.verify_strict(message, &Signature::from_bytes(signature)).is_ok()
            }
            IssuerVerifier::Sm2(key) => sm2_verify::verify(key, message, signature),
        };
        if ok {
            Ok(())
        } else {
            Err(QrError::BadSignature)
        }
    }
}

/// The issuer keys a gate trusts, checked and indexed once at load: sorted by `(issuer, key_id)`
/// for an O(log n) lookup, with each public key already parsed for its algorithm.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "QrKeySetBody", into = "QrKeySetBody")]
pub struct QrKeySet {
    /// Sorted by `(issuer, key_id)`, no duplicates.
    keys: Vec<QrIssuerKey>,
    /// `verifying[i]` is `keys[i].public_key`, parsed.
    verifying: Vec<IssuerVerifier>,
    /// The longest validity a code of an issuer may claim, for the issuers that set one (the
    /// others: [`QR_MAX_VALID_SECS`]).
    max_valid_secs: BTreeMap<u16, u16>,
}

/// The longest validity a code can claim at all (`valid_secs` is a u16: about 18 h): the maximum
/// of an issuer that sets none.
pub const QR_MAX_VALID_SECS: u16 = u16::MAX;

/// Two sets are equal when they list the same keys and limits (the parsed keys follow from them).
impl PartialEq for QrKeySet {
    fn eq(&self, other: &QrKeySet) -> bool {
        self.keys == other.keys && self.max_valid_secs == other.max_valid_secs
    }
}

impl Eq for QrKeySet {}

impl QrKeySet {
    /// Checks and indexes a key list: refuses bytes that are not a public key of the key's
    /// algorithm, weak keys, duplicates of `(issuer, key_id)` and inverted validity periods.
    pub fn new(mut keys: Vec<QrIssuerKey>) -> Result<QrKeySet, QrKeyError> {
        keys.sort_by_key(|k| (k.issuer, k.key_id));
        let mut verifying = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            let (issuer, key_id) = (k.issuer, k.key_id);
            if i > 0 && keys.get(i - 1).is_some_and(|p| (p.issuer, p.key_id) == (issuer, key_id)) {
                return Err(QrKeyError::Duplicate { issuer, key_id });
            }
            if k.valid_from > k.valid_to {
                return Err(QrKeyError::InvertedValidity { issuer, key_id });
            }
            verifying.push(IssuerVerifier::parse(k)?);
        }
        Ok(QrKeySet { keys, verifying, max_valid_secs: BTreeMap::new() })
    }

    /// An empty set: every code is refused as `qr_unknown_key`.
    pub fn empty() -> QrKeySet {
        QrKeySet { keys: Vec::new(), verifying: Vec::new(), max_valid_secs: BTreeMap::new() }
    }

    /// Parses and checks the JSON body of a `qr_keys` package.
    pub fn from_json(body: &[u8]) -> Result<QrKeySet, QrKeyError> {
        let body: QrKeySetBody = serde_json::from_slice(body).map_err(|e| QrKeyError::Json(e.to_string()))?;
        QrKeySet::try_from(body)
    }

    /// The same set with `issuer`'s codes limited to `secs` of validity.
    pub fn with_max_validity(mut self, issuer: u16, secs: u16) -> QrKeySet {
        self.max_valid_secs.insert(issuer, secs);
        self
    }

    /// The longest validity a code of `issuer` may claim: as set for it, else
    /// [`QR_MAX_VALID_SECS`].
    pub fn max_validity_secs(&self, issuer: u16) -> u16 {
        self.max_valid_secs.get(&issuer).copied().unwrap_or(QR_MAX_VALID_SECS)
    }

    /// Whether a used code of `issuer` reported to expire at `expires_at` can be real at `now`: a
    /// code issued now (or up to `skew` in the issuer's future) with the issuer's maximum validity
    /// expires no later than `now + max + skew`. A relayed entry beyond that is refused: it would
    /// occupy the replay cache far longer than any code needs protecting.
    pub fn plausible_expiry(&self, issuer: u16, expires_at: Timestamp, now: Timestamp, skew: QrSkew) -> bool {
        let max_ms = i64::from(self.max_validity_secs(issuer)) * 1000;
        expires_at.0 <= now.0.saturating_add(max_ms).saturating_add(skew.ms())
    }

    /// The keys, sorted by `(issuer, key_id)`.
    pub fn keys(&self) -> &[QrIssuerKey] {
        &self.keys
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key `key_id` of `issuer`, whatever its validity period.
    pub fn get(&self, issuer: u16, key_id: u16) -> Option<&QrIssuerKey> {
        self.lookup(issuer, key_id).map(|(k, _)| k)
    }

    fn lookup(&self, issuer: u16, key_id: u16) -> Option<(&QrIssuerKey, &IssuerVerifier)> {
        let i = self.keys.binary_search_by_key(&(issuer, key_id), |k| (k.issuer, k.key_id)).ok()?;
        Some((self.keys.get(i)?, self.verifying.get(i)?))
    }
}

impl TryFrom<QrKeySetBody> for QrKeySet {
    type Error = QrKeyError;
    fn try_from(body: QrKeySetBody) -> Result<Self, Self::Error> {
        let mut set = QrKeySet::new(body.keys)?;
        set.max_valid_secs = body.max_valid_secs;
        Ok(set)
    }
}

impl From<QrKeySet> for QrKeySetBody {
    fn from(set: QrKeySet) -> Self {
        QrKeySetBody { keys: set.keys, max_valid_secs: set.max_valid_secs }
    }
}

/// A code's identity for replay detection: the issuer's nonce is unique per account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplayKey {
    pub issuer: u16,
    pub account: u64,
    pub nonce: u64,
}

/// Who reported a used code: this gate (the codes it accepted itself) or another gate of the
/// station (through the relayed `qr/used`). Each source has its own share of a [`ReplayCache`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReplaySource {
    Local,
    Gate(Ident),
}

/// One source's share of the cache: its entries by the instant they can be forgotten.
#[derive(Debug, Clone)]
struct Share {
    source: ReplaySource,
    by_expiry: BTreeSet<(i64, ReplayKey)>,
}

/// What [`ReplayCache::insert`] did with a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inserted {
    /// Held already (its forget instant moved later if the new one is later).
    Known,
    /// Now held; `evicted`: another entry of the same source was dropped to make room.
    New { evicted: bool },
    /// Not kept: its source's share is full of codes expiring later, or no source slot is left.
    Dropped,
}

/// The codes already used, each remembered until it expires (plus the skew tolerance), after which
/// [`verify`] refuses it as expired anyway.
///
/// Bounded per source: the capacity is split into equal shares, one per source
/// ([`ReplaySource`]: this gate's own codes, and each gate whose codes the station relays), at
/// most `sources` of them. A source never holds more than its share; when its share is full, the
/// entry of **that source** that expires soonest is dropped (it is the one whose protection would
/// end first anyway) and [`evictions`](Self::evictions) counts it. So a source that floods the
/// cache (a broken or compromised gate) evicts only its own entries, never another gate's. A
/// source beyond the `sources` slots is not kept (counted too); a slot frees when its source's
/// entries have all expired.
///
/// A dropped code could be replayed for the rest of its validity window, so size each share for
/// one gate's traffic: every code one gate accepts within one validity window (plus skew) must
/// fit. A gate at 60 QR taps a minute with 5-minute codes needs 330 entries; 100,000 entries in 64
/// shares give each 1,562. A non-zero eviction count means a share is too small (or a source
/// floods) and should raise an alarm.
///
/// Memory: each entry is a 24-byte key, an 8-byte instant and its source's slot number, held in a
/// hash map (lookup) and its share's ordered set (expiry order): about 115 bytes of heap per entry
/// with table and node overhead, 11.5 MB at 100,000 entries when full. Size it to the traffic
/// rather than to a round number.
///
/// A gate clock that jumps forward drops entries early; one that jumps back keeps them longer (safe).
#[derive(Debug, Clone)]
pub struct ReplayCache {
    /// The most entries ever held, all shares together.
    capacity: usize,
    /// The most entries one source holds (`capacity / sources`, at least 1).
    share: usize,
    /// The most sources held at once.
    max_sources: usize,
    /// Added to each code's expiry, matching the tolerance [`verify`] applies.
    skew: QrSkew,
    /// Each remembered code, the instant (ms) after which it can be forgotten, and its share.
    by_key: HashMap<ReplayKey, (i64, u64)>,
    /// The slot number of each source holding entries.
    sources: HashMap<ReplaySource, u64>,
    /// The shares by slot number.
    shares: HashMap<u64, Share>,
    /// The next slot number (never reused).
    next_slot: u64,
    /// Entries dropped before their expiry because a share was full (or no slot was left).
    evictions: u64,
}

impl ReplayCache {
    /// A cache holding at most `capacity` codes (at least 1) for a single source: all of it is one
    /// share (what the decision engine's tests and benches use; a gate uses
    /// [`with_sources`](Self::with_sources)).
    pub fn new(capacity: usize, skew: QrSkew) -> ReplayCache {
        ReplayCache::with_sources(capacity, 1, skew)
    }

    /// A cache holding at most `capacity` codes in all (at least 1), split into equal shares for
    /// at most `sources` sources (at least 1; each share at least 1 entry).
    pub fn with_sources(capacity: usize, sources: usize, skew: QrSkew) -> ReplayCache {
        let capacity = capacity.max(1);
        let max_sources = sources.clamp(1, capacity);
        ReplayCache {
            capacity,
            share: (capacity / max_sources).max(1),
            max_sources,
            skew,
            by_key: HashMap::new(),
            sources: HashMap::new(),
            shares: HashMap::new(),
            next_slot: 0,
            evictions: 0,
        }
    }

    /// Refuses a code already used, otherwise remembers it as one of this gate's own
    /// ([`ReplaySource::Local`]). Call after [`verify`] succeeds. A code already past its expiry
    /// (plus skew) is refused as expired, not remembered.
    ///
    /// Returns whether replay protection held: `Ok(false)` means this gate's share was full, so
    /// this code or another one of its own was not kept and could be replayed; the caller accepts
    /// the tap but flags the transaction (`replay_unchecked`) so clearing checks it for a
    /// duplicate.
    pub fn check_and_insert(&mut self, claims: &QrClaims, now: Timestamp) -> Result<bool, QrError> {
        let forget_at = claims.expires_at.0.saturating_add(self.skew.ms());
        if now.0 > forget_at {
            return Err(QrError::Expired { expires_at: claims.expires_at });
        }
        self.purge_expired(now);
        let key = claims.replay_key();
        if self.by_key.contains_key(&key) {
            return Err(QrError::Replayed);
        }
        Ok(matches!(self.insert(&ReplaySource::Local, key, forget_at), Inserted::New { evicted: false }))
    }

    /// Remembers a code `source` used (another gate of the station, through the relay). Returns
    /// whether it was new here. The caller checks first that the expiry is plausible
    /// ([`QrKeySet::plausible_expiry`]).
    pub fn insert_seen(
        &mut self,
        source: &ReplaySource,
        key: ReplayKey,
        expires_at: Timestamp,
        now: Timestamp,
    ) -> bool {
        let forget_at = expires_at.0.saturating_add(self.skew.ms());
        if now.0 > forget_at {
            return false;
        }
        self.purge_expired(now);
        self.insert(source, key, forget_at) != Inserted::Known
    }

    /// Whether the code is remembered as used (and not yet forgettable at `now`).
    pub fn contains(&self, key: &ReplayKey, now: Timestamp) -> bool {
        self.by_key.get(key).is_some_and(|&(forget_at, _)| now.0 <= forget_at)
    }

    /// Forgets every code that has expired (plus skew) at `now`; returns how many. A source left
    /// without entries gives its slot up.
    pub fn purge_expired(&mut self, now: Timestamp) -> usize {
        let mut purged = 0;
        let by_key = &mut self.by_key;
        let sources = &mut self.sources;
        self.shares.retain(|_, share| {
            while let Some(&(forget_at, key)) = share.by_expiry.first() {
                if forget_at >= now.0 {
                    break;
                }
                share.by_expiry.pop_first();
                by_key.remove(&key);
                purged += 1;
            }
            let keep = !share.by_expiry.is_empty();
            if !keep {
                sources.remove(&share.source);
            }
            keep
        });
        purged
    }

    fn insert(&mut self, source: &ReplaySource, key: ReplayKey, forget_at: i64) -> Inserted {
        if let Some((old, slot)) = self.by_key.get_mut(&key) {
            if forget_at > *old {
                if let Some(share) = self.shares.get_mut(slot) {
                    share.by_expiry.remove(&(*old, key));
                    share.by_expiry.insert((forget_at, key));
                }
                *old = forget_at;
            }
            return Inserted::Known;
        }
        let slot = match self.sources.get(source) {
            Some(&slot) => slot,
            None if self.sources.len() >= self.max_sources => {
                self.evictions += 1;
                return Inserted::Dropped;
            }
            None => {
                let slot = self.next_slot;
                self.next_slot += 1;
                self.sources.insert(source.clone(), slot);
                self.shares.insert(slot, Share { source: source.clone(), by_expiry: BTreeSet::new() });
                slot
            }
        };
        let Some(share) = self.shares.get_mut(&slot) else {
            // Every slot in `sources` has its share (both are changed together).
            return Inserted::Dropped;
        };
        let mut evicted = false;
        if share.by_expiry.len() >= self.share {
            self.evictions += 1;
            match share.by_expiry.first() {
                Some(&(soonest, victim)) if soonest <= forget_at => {
                    share.by_expiry.pop_first();
                    self.by_key.remove(&victim);
                    evicted = true;
                }
                // The new code expires before everything its source holds: it is the one not kept.
                _ => return Inserted::Dropped,
            }
        }
        share.by_expiry.insert((forget_at, key));
        self.by_key.insert(key, (forget_at, slot));
        Inserted::New { evicted }
    }

    /// Codes currently remembered.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The most codes held, all sources together.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The most codes one source holds.
    pub fn share(&self) -> usize {
        self.share
    }

    /// Codes `source` holds now.
    pub fn held_by(&self, source: &ReplaySource) -> usize {
        self.sources.get(source).and_then(|s| self.shares.get(s)).map_or(0, |s| s.by_expiry.len())
    }

    /// Codes dropped before their expiry because a share was full or no source slot was left
    /// (for a metric; should stay 0).
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_790_000_000_000;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn issuer_key(issuer: u16, key_id: u16, sk: &SigningKey) -> QrIssuerKey {
        QrIssuerKey {
            issuer,
            key_id,
            algorithm: QrAlgorithm::Ed25519,
            public_key: sk.verifying_key().to_bytes().to_vec(),
            valid_from: Timestamp(T0 - Timestamp::DAY_MS),
            valid_to: Timestamp(T0 + Timestamp::DAY_MS),
        }
    }

    fn issue(nonce: u64) -> QrIssue {
        QrIssue { issuer: 7, key_id: 2, account: 42, issued_at: Timestamp(T0), valid_secs: 60, nonce }
    }

    fn keyset() -> QrKeySet {
        QrKeySet::new(vec![issuer_key(7, 2, &key(1)), issuer_key(9, 1, &key(2))]).unwrap()
    }

    fn gate(name: &str) -> ReplaySource {
        ReplaySource::Gate(Ident::new(name).unwrap())
    }

    #[test]
    fn a_fresh_code_verifies_and_says_what_was_issued() {
        let code = generate(&issue(5), &key(1));
        assert_eq!(code.len(), QR_CODE_LEN);
        let claims = verify(&code, &keyset(), Timestamp(T0 + 1_000), QrSkew::NONE).unwrap();
        assert_eq!(
            claims,
            QrClaims {
                issuer: 7,
                key_id: 2,
                account: 42,
                issued_at: Timestamp(T0),
                expires_at: Timestamp(T0 + 60_000),
                nonce: 5
            }
        );
    }

    #[test]
    fn the_text_form_is_122_url_safe_characters_and_round_trips() {
        let code = generate(&issue(5), &key(1));
        let text = encode_text(&code);
        assert_eq!(text.len(), QR_TEXT_LEN);
        assert_eq!(QR_TEXT_LEN, 122);
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(decode_text(&text).unwrap(), code);
        assert_eq!(decode_text("abc"), Err(QrError::TextLength { len: 3 }));
        assert_eq!(decode_text(&"*".repeat(QR_TEXT_LEN)), Err(QrError::TextEncoding));
    }

    #[test]
    fn each_error_maps_to_its_reject_reason() {
        let ks = keyset();
        let now = Timestamp(T0 + 1_000);
        let good = generate(&issue(5), &key(1));
        let err = |code: &[u8]| verify(code, &ks, now, QrSkew::NONE).unwrap_err();

        assert_eq!(err(&good[..90]), QrError::WrongLength { len: 90 });
        let mut v2 = good.clone();
        v2[0] = 2;
        assert_eq!(err(&v2), QrError::UnknownVersion(2));
        let unknown = generate(&QrIssue { key_id: 3, ..issue(5) }, &key(1));
        assert_eq!(err(&unknown), QrError::UnknownKey { issuer: 7, key_id: 3 });
        let forged = generate(&issue(5), &key(9));
        assert_eq!(err(&forged), QrError::BadSignature);
        let mut altered = good.clone();
        altered[12] ^= 1; // the account's last byte
        assert_eq!(err(&altered), QrError::BadSignature);
        let late = verify(&good, &ks, Timestamp(T0 + 60_001), QrSkew::NONE).unwrap_err();
        assert_eq!(late, QrError::Expired { expires_at: Timestamp(T0 + 60_000) });
        let early = verify(&good, &ks, Timestamp(T0 - 1), QrSkew::NONE).unwrap_err();
        assert_eq!(early, QrError::NotYetValid { issued_at: Timestamp(T0) });
        let stale_key = verify(&good, &ks, Timestamp(T0 + 2 * Timestamp::DAY_MS), QrSkew::NONE);
        assert_eq!(stale_key, Err(QrError::KeyNotValid { issuer: 7, key_id: 2 }));

        let reasons = [
            (QrError::TextEncoding, Reason::QrMalformed),
            (QrError::WrongLength { len: 0 }, Reason::QrMalformed),
            (QrError::UnknownVersion(2), Reason::QrMalformed),
            (QrError::UnknownKey { issuer: 1, key_id: 1 }, Reason::QrUnknownKey),
            (QrError::KeyNotValid { issuer: 1, key_id: 1 }, Reason::QrUnknownKey),
            (QrError::BadSignature, Reason::QrBadSignature),
            (QrError::Expired { expires_at: Timestamp(0) }, Reason::QrExpired),
            (QrError::NotYetValid { issued_at: Timestamp(0) }, Reason::QrNotYetValid),
            (QrError::Replayed, Reason::QrReplayed),
        ];
        for (e, r) in reasons {
            assert_eq!(e.reason(), r, "{e}");
        }
    }

    #[test]
    fn clock_skew_is_tolerated_both_ways_up_to_the_configured_limit() {
        let ks = keyset();
        let code = generate(&issue(5), &key(1));
        let skew = QrSkew::from_millis(5_000);
        assert!(verify(&code, &ks, Timestamp(T0 - 5_000), skew).is_ok());
        assert!(verify(&code, &ks, Timestamp(T0 - 5_001), skew).is_err());
        assert!(verify(&code, &ks, Timestamp(T0 + 65_000), skew).is_ok());
        assert!(verify(&code, &ks, Timestamp(T0 + 65_001), skew).is_err());
    }

    #[test]
    fn a_key_set_refuses_duplicates_bad_keys_and_inverted_periods() {
        let k = issuer_key(7, 2, &key(1));
        assert_eq!(
            QrKeySet::new(vec![k.clone(), k.clone()]),
            Err(QrKeyError::Duplicate { issuer: 7, key_id: 2 })
        );
        // The identity point is a valid encoding but a small-order (weak) key.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(
            QrKeySet::new(vec![QrIssuerKey { public_key: identity.to_vec(), ..k.clone() }]),
            Err(QrKeyError::WeakPublicKey { issuer: 7, key_id: 2 })
        );
        let inverted = QrIssuerKey { valid_from: k.valid_to, valid_to: k.valid_from, ..k.clone() };
        assert_eq!(QrKeySet::new(vec![inverted]), Err(QrKeyError::InvertedValidity { issuer: 7, key_id: 2 }));
        // Not every 32-byte string decompresses to a curve point; find one that does not.
        let bad =
            (0u8..=255).map(|b| [b; 32]).find(|bytes| VerifyingKey::from_bytes(bytes).is_err()).unwrap();
        assert_eq!(
            QrKeySet::new(vec![QrIssuerKey { public_key: bad.to_vec(), ..k.clone() }]),
            Err(QrKeyError::BadPublicKey { issuer: 7, key_id: 2, algorithm: QrAlgorithm::Ed25519 })
        );
        // An ed25519 key of the wrong length, and an SM2 key that is an ed25519 key's bytes.
        let short = QrIssuerKey { public_key: vec![1; 31], ..k.clone() };
        assert!(matches!(QrKeySet::new(vec![short]), Err(QrKeyError::BadPublicKey { .. })));
        let wrong_algorithm = QrIssuerKey { algorithm: QrAlgorithm::Sm2, ..k.clone() };
        assert_eq!(
            QrKeySet::new(vec![wrong_algorithm]),
            Err(QrKeyError::BadPublicKey { issuer: 7, key_id: 2, algorithm: QrAlgorithm::Sm2 })
        );
        // SM2: the identity (a lone 0x00) and a point off the curve.
        let sm2 = QrIssuerKey { algorithm: QrAlgorithm::Sm2, public_key: sm2_key(3).public_key(), ..k };
        assert!(QrKeySet::new(vec![sm2.clone()]).is_ok());
        let identity = QrIssuerKey { public_key: vec![0], ..sm2.clone() };
        assert!(matches!(QrKeySet::new(vec![identity]), Err(QrKeyError::BadPublicKey { .. })));
        let mut off_curve = sm2.public_key.clone();
        off_curve[64] ^= 1;
        let off_curve = QrIssuerKey { public_key: off_curve, ..sm2 };
        assert!(matches!(QrKeySet::new(vec![off_curve]), Err(QrKeyError::BadPublicKey { .. })));
    }

    fn sm2_key(seed: u8) -> QrSigner {
        QrSigner::sm2_from_bytes(&[seed; 32]).unwrap()
    }

    fn sm2_issuer_key(issuer: u16, key_id: u16, signer: &QrSigner) -> QrIssuerKey {
        QrIssuerKey {
            algorithm: QrAlgorithm::Sm2,
            public_key: signer.public_key(),
            ..issuer_key(issuer, key_id, &key(1))
        }
    }

    #[test]
    fn an_sm2_issuer_key_verifies_its_codes_beside_ed25519_keys_and_nothing_else() {
        let sm2 = sm2_key(5);
        let ks = QrKeySet::new(vec![issuer_key(7, 2, &key(1)), sm2_issuer_key(9, 1, &sm2)]).unwrap();
        let now = Timestamp(T0 + 1_000);
        let mut sm2_issue = issue(11);
        (sm2_issue.issuer, sm2_issue.key_id) = (9, 1);
        let code = generate_with(&sm2_issue, &sm2);
        assert_eq!(code.len(), QR_CODE_LEN);
        let claims = verify(&code, &ks, now, QrSkew::NONE).unwrap();
        assert_eq!((claims.issuer, claims.account, claims.nonce), (9, 42, 11));
        // The ed25519 issuer still verifies beside it.
        assert!(verify(&generate(&issue(12), &key(1)), &ks, now, QrSkew::NONE).is_ok());
        // A flipped bit in the body or the signature, another SM2 key, an ed25519 signature
        // under the SM2 key's name, an SM2 signature under the ed25519 key's name.
        for at in [5, QR_BODY_LEN + 3, QR_CODE_LEN - 1] {
            let mut bad = code.clone();
            bad[at] ^= 0x10;
            assert_eq!(verify(&bad, &ks, now, QrSkew::NONE), Err(QrError::BadSignature), "flip at {at}");
        }
        let other = generate_with(&sm2_issue, &sm2_key(6));
        assert_eq!(verify(&other, &ks, now, QrSkew::NONE), Err(QrError::BadSignature));
        let ed_under_sm2 = generate(&sm2_issue, &key(1));
        assert_eq!(verify(&ed_under_sm2, &ks, now, QrSkew::NONE), Err(QrError::BadSignature));
        let sm2_under_ed = generate_with(&issue(13), &sm2);
        assert_eq!(verify(&sm2_under_ed, &ks, now, QrSkew::NONE), Err(QrError::BadSignature));
        // r = 0 or s = 0 does not parse as a signature: refused, not a panic.
        let mut zero = code.clone();
        zero[QR_BODY_LEN..].fill(0);
        assert_eq!(verify(&zero, &ks, now, QrSkew::NONE), Err(QrError::BadSignature));
    }

    /// The variable-time path agrees with the `sm2` crate's own constant-time verifier on genuine
    /// signatures and on every one-bit change of message or signature.
    #[test]
    fn the_sm2_fast_path_agrees_with_the_crates_verifier() {
        use sm2::dsa::signature::{Signer as _, Verifier as _};
        let QrSigner::Sm2(sk) = sm2_key(11) else { unreachable!() };
        let theirs = sk.verifying_key();
        let ours = sm2_verify::key(&theirs.to_sec1_bytes(), SM2_DIST_ID).unwrap();
        let (mut agree_ok, mut agree_bad) = (0, 0);
        for i in 0u32..200 {
            let message = format!("afc/v1/qr-ride-code\0 body {i}").into_bytes();
            let sig: sm2::dsa::Signature = sk.sign(&message);
            let sig_bytes: [u8; 64] = sig.to_bytes().as_slice().try_into().unwrap();
            assert!(theirs.verify(&message, &sig).is_ok());
            assert!(sm2_verify::verify(&ours, &message, &sig_bytes));
            agree_ok += 1;
            let bit = (i as usize * 37) % (8 * (64 + message.len()));
            let (mut m, mut b) = (message.clone(), sig_bytes);
            if bit < 512 {
                b[bit / 8] ^= 1 << (bit % 8);
            } else {
                m[(bit - 512) / 8] ^= 1 << (bit % 8);
            }
            let theirs_ok = sm2::dsa::Signature::from_slice(&b).is_ok_and(|s| theirs.verify(&m, &s).is_ok());
            assert_eq!(sm2_verify::verify(&ours, &m, &b), theirs_ok, "bit {bit}");
            assert!(!theirs_ok);
            agree_bad += 1;
        }
        assert_eq!((agree_ok, agree_bad), (200, 200));
    }

    #[test]
    fn a_key_set_with_algorithms_round_trips_through_json_and_an_old_set_reads_as_ed25519() {
        let sm2 = sm2_key(5);
        let ks = QrKeySet::new(vec![issuer_key(7, 2, &key(1)), sm2_issuer_key(9, 1, &sm2)]).unwrap();
        let json = serde_json::to_vec(&ks).unwrap();
        assert!(String::from_utf8_lossy(&json).contains("\"algorithm\":\"sm2\""));
        assert_eq!(QrKeySet::from_json(&json).unwrap(), ks);
        let old = format!(
            r#"{{"keys":[{{"issuer":7,"key_id":2,"public_key":"{}","valid_from":0,"valid_to":1}}]}}"#,
            hex::encode(key(1).verifying_key().to_bytes())
        );
        let old = QrKeySet::from_json(old.as_bytes()).unwrap();
        assert_eq!(old.keys()[0].algorithm, QrAlgorithm::Ed25519);
        let long = format!(
            r#"{{"keys":[{{"issuer":7,"key_id":2,"public_key":"{}","valid_from":0,"valid_to":1}}]}}"#,
            "ab".repeat(66)
        );
        assert!(matches!(QrKeySet::from_json(long.as_bytes()), Err(QrKeyError::Json(_))));
    }

    #[test]
    fn a_code_is_refused_as_replayed_within_its_window_and_as_expired_after() {
        let ks = keyset();
        let mut cache = ReplayCache::new(10, QrSkew::NONE);
        let code = generate(&issue(5), &key(1));
        let now = Timestamp(T0 + 1_000);
        let claims = verify(&code, &ks, now, QrSkew::NONE).unwrap();
        assert_eq!(cache.check_and_insert(&claims, now), Ok(true));
        assert_eq!(cache.check_and_insert(&claims, Timestamp(T0 + 60_000)), Err(QrError::Replayed));
        let later = Timestamp(T0 + 60_001);
        assert!(matches!(verify(&code, &ks, later, QrSkew::NONE), Err(QrError::Expired { .. })));
        assert!(matches!(cache.check_and_insert(&claims, later), Err(QrError::Expired { .. })));
        // Another nonce of the same account is a different code.
        let other = verify(&generate(&issue(6), &key(1)), &ks, now, QrSkew::NONE).unwrap();
        assert_eq!(cache.check_and_insert(&other, now), Ok(true));
    }

    #[test]
    fn codes_seen_at_other_gates_are_refused_here() {
        let mut cache = ReplayCache::new(10, QrSkew::NONE);
        let claims = decode_unverified(&generate(&issue(5), &key(1))).unwrap();
        let now = Timestamp(T0);
        assert!(cache.insert_seen(&gate("g02"), claims.replay_key(), claims.expires_at, now));
        assert!(!cache.insert_seen(&gate("g02"), claims.replay_key(), claims.expires_at, now));
        assert!(cache.contains(&claims.replay_key(), now));
        assert_eq!(cache.check_and_insert(&claims, now), Err(QrError::Replayed));
    }

    #[test]
    fn a_full_cache_evicts_the_soonest_to_expire_and_counts_it() {
        let mut cache = ReplayCache::new(3, QrSkew::NONE);
        let now = Timestamp(T0);
        let k = |nonce| ReplayKey { issuer: 1, account: 1, nonce };
        for (nonce, exp) in [(1, 50_000), (2, 10_000), (3, 30_000)] {
            assert!(cache.insert_seen(&gate("g02"), k(nonce), Timestamp(T0 + exp), now));
        }
        assert!(cache.insert_seen(&gate("g02"), k(4), Timestamp(T0 + 40_000), now));
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.evictions(), 1);
        assert!(!cache.contains(&k(2), now));
        assert!(cache.contains(&k(4), now));
        // A code expiring before everything held is the one not kept.
        assert!(cache.insert_seen(&gate("g02"), k(5), Timestamp(T0 + 1_000), now));
        assert!(!cache.contains(&k(5), now));
        assert_eq!(cache.evictions(), 2);
        // Expired entries are purged without counting as evictions.
        assert_eq!(cache.purge_expired(Timestamp(T0 + 45_000)), 2);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.evictions(), 2);
    }

    #[test]
    fn a_flooding_source_evicts_only_its_own_entries() {
        // 3 sources of 2 entries each.
        let mut cache = ReplayCache::with_sources(6, 3, QrSkew::NONE);
        let now = Timestamp(T0);
        let k = |account, nonce| ReplayKey { issuer: 1, account, nonce };
        assert!(cache.insert_seen(&gate("g02"), k(2, 1), Timestamp(T0 + 10_000), now));
        let own = decode_unverified(&generate(&issue(5), &key(1))).unwrap();
        assert_eq!(cache.check_and_insert(&own, now), Ok(true));
        // g03 floods with codes expiring later than everything held: only its share turns over.
        for nonce in 0..1_000 {
            cache.insert_seen(&gate("g03"), k(3, nonce), Timestamp(T0 + 3_600_000), now);
        }
        assert!(cache.contains(&k(2, 1), now));
        assert!(cache.contains(&own.replay_key(), now));
        assert_eq!((cache.held_by(&gate("g03")), cache.held_by(&gate("g02"))), (2, 1));
        assert_eq!(cache.evictions(), 998);
        // A fourth source finds no slot: not kept, counted; the others are untouched.
        cache.insert_seen(&gate("g04"), k(4, 1), Timestamp(T0 + 10_000), now);
        assert!(!cache.contains(&k(4, 1), now));
        assert_eq!(cache.evictions(), 999);
        // Once g02's entry expired, its slot is free for another gate.
        cache.purge_expired(Timestamp(T0 + 10_001));
        assert!(cache.insert_seen(&gate("g04"), k(4, 1), Timestamp(T0 + 20_000), Timestamp(T0 + 10_001)));
        assert!(cache.contains(&k(4, 1), Timestamp(T0 + 10_001)));
        // This gate's own share is full now: a code of its own is accepted but flagged.
        let own2 = decode_unverified(&generate(&issue(6), &key(1))).unwrap();
        let own3 = decode_unverified(&generate(&issue(7), &key(1))).unwrap();
        assert_eq!(cache.check_and_insert(&own2, now), Ok(true));
        assert_eq!(cache.check_and_insert(&own3, now), Ok(false));
    }

    #[test]
    fn a_code_may_not_claim_more_than_its_issuers_maximum_validity() {
        let ks = keyset().with_max_validity(7, 59);
        let code = generate(&issue(5), &key(1)); // 60 s
        assert_eq!(
            verify(&code, &ks, Timestamp(T0 + 1_000), QrSkew::NONE),
            Err(QrError::TooLongValidity { valid_secs: 60, max_secs: 59 })
        );
        assert_eq!(QrError::TooLongValidity { valid_secs: 60, max_secs: 59 }.reason(), Reason::QrMalformed);
        assert!(
            verify(&code, &keyset().with_max_validity(7, 60), Timestamp(T0 + 1_000), QrSkew::NONE).is_ok()
        );
        // Issuers without a limit of their own: the longest the layout can express.
        assert_eq!(ks.max_validity_secs(9), QR_MAX_VALID_SECS);
        // A relayed entry may expire at most now + max + skew.
        let skew = QrSkew::from_millis(1_000);
        let now = Timestamp(T0);
        assert!(ks.plausible_expiry(7, Timestamp(T0 + 60_000), now, skew));
        assert!(!ks.plausible_expiry(7, Timestamp(T0 + 60_001), now, skew));
        assert!(ks.plausible_expiry(9, Timestamp(T0 + 65_535_000), now, QrSkew::NONE));
        assert!(!ks.plausible_expiry(9, Timestamp(i64::MAX), now, skew));
        // The limits travel in the key set's JSON body.
        let json = serde_json::to_string(&ks).unwrap();
        assert!(json.contains(r#""max_valid_secs":{"7":59}"#), "{json}");
        assert_eq!(QrKeySet::from_json(json.as_bytes()).unwrap(), ks);
    }
}
