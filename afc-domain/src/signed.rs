//! Signed MQTT messages (SPEC §5): every message that steers a gate (`mode`, `cmd`, `tx/ack`, the
//! relayed `qr/used`) is signed by the station, and every gate message that steers the
//! controllers (`cmd/ack`, `events`, `params/ack`, heartbeats, the birth, the gate's `qr/used`) is
//! signed by the gate's key.
//!
//! The payload stays readable JSON (`mosquitto_sub` shows it):
//!
//! ```json
//! {"key_id":1,"signature":"<128 hex>","message":{"version":7,"bits":...}}
//! ```
//!
//! The signature is ed25519 over [`signing_bytes`]: a domain-separation prefix, the topic the
//! message is published on, the key id and the exact bytes of `message` as they stand in the
//! payload (never a re-serialization, so the verifier checks what it then decodes). Binding the
//! topic means a genuine message cannot be replayed on another topic: a command for gate 1 is not
//! a command for gate 2, a `tx/ack` for gate 1 acks nothing at gate 2. Replays on the same topic
//! are the receiver's business (mode versions only increase, command ids execute once, acks only
//! move forward).
//!
//! The station signs with its package-signing key, so control keys rotate exactly as package
//! keys do (gates trust a set of key ids); a gate signs with the key that signs its tx batches
//! and that the controllers hold for it. Gate keys have no id: they sign with key id 0.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;

use crate::package::TrustedKeys;
use crate::wire::{self, WireError, WireMessage, MAX_PAYLOAD};

/// Domain separation: no other signature in the system (packages, gate batches, QR codes) is
/// made over bytes that start like this.
pub const SIGNED_MESSAGE_DOMAIN: &[u8] = b"afc/v1 signed message\0";

/// The key id gates sign with (a gate has exactly one key, registered with the controllers).
pub const GATE_KEY_ID: u32 = 0;

/// Why a signed message was refused. Each variant has a stable [`SignedError::code`] for metric
/// labels and logs.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignedError {
    /// The payload is empty: on a retained topic, the publisher cleared it. Not an attack.
    #[error("empty payload")]
    Empty,
    /// Not a signed envelope at all: too large, not UTF-8, not JSON, or a plain unsigned message.
    #[error("not a signed message: {0}")]
    Malformed(WireError),
    /// The envelope names a key id the receiver does not trust.
    #[error("signed with key id {key_id}, which is not trusted here")]
    UnknownKey { key_id: u32 },
    /// The signature does not verify for this topic, key and message.
    #[error("bad signature")]
    BadSignature,
    /// The signature verifies but the message inside is not of the expected shape.
    #[error("signed message has unexpected content: {0}")]
    Message(WireError),
}

impl SignedError {
    /// Stable label: `empty`, `malformed`, `unknown_key`, `bad_signature`, `invalid_message`.
    pub fn code(&self) -> &'static str {
        match self {
            SignedError::Empty => "empty",
            SignedError::Malformed(_) => "malformed",
            SignedError::UnknownKey { .. } => "unknown_key",
            SignedError::BadSignature => "bad_signature",
            SignedError::Message(_) => "invalid_message",
        }
    }

    /// Whether the sender failed to prove who it is (as opposed to an empty, cleared payload):
    /// what a receiver counts and alarms on.
    pub fn is_unverified(&self) -> bool {
        !matches!(self, SignedError::Empty)
    }
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    key_id: u32,
    signature: String,
    message: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvelopeIn<'a> {
    key_id: u32,
    signature: String,
    #[serde(borrow)]
    message: &'a RawValue,
}

/// The bytes a signature covers:
/// `SIGNED_MESSAGE_DOMAIN ‖ u32 BE topic length ‖ topic ‖ u32 BE key id ‖ message bytes`.
pub fn signing_bytes(topic: &str, key_id: u32, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNED_MESSAGE_DOMAIN.len() + 8 + topic.len() + message.len());
    out.extend_from_slice(SIGNED_MESSAGE_DOMAIN);
    // A topic longer than 4 GiB cannot be published (MQTT topics are at most 65,535 bytes).
    out.extend_from_slice(&u32::try_from(topic.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&key_id.to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Signs `msg` for publication on `topic`: the payload to publish.
pub fn seal<T: WireMessage>(topic: &str, msg: &T, key_id: u32, key: &SigningKey) -> Vec<u8> {
    let json = wire::encode(msg);
    let signature = key.sign(&signing_bytes(topic, key_id, &json)).to_bytes();
    // `wire::encode` produced valid JSON, which is all `RawValue` asks for, and the envelope is a
    // struct of a number, a string and that raw value: both steps cannot fail.
    #[allow(clippy::expect_used)]
    let raw = RawValue::from_string(String::from_utf8(json).expect("serde_json writes UTF-8"))
        .expect("wire::encode writes valid JSON");
    #[allow(clippy::expect_used)]
    serde_json::to_vec(&EnvelopeOut { key_id, signature: hex::encode(signature), message: &raw })
        .expect("the envelope always serializes")
}

/// Checks a signed payload received on `topic` and decodes its message. `key` maps the
/// envelope's key id to the key that must have signed it (`None`: not trusted).
pub fn open<T: DeserializeOwned>(
    topic: &str,
    payload: &[u8],
    key: impl FnOnce(u32) -> Option<VerifyingKey>,
) -> Result<T, SignedError> {
    if payload.is_empty() {
        return Err(SignedError::Empty);
    }
    if payload.len() > MAX_PAYLOAD {
        return Err(SignedError::Malformed(WireError::TooLarge { size: payload.len(), limit: MAX_PAYLOAD }));
    }
    let text = std::str::from_utf8(payload)
        .map_err(|e| SignedError::Malformed(WireError::NotUtf8 { valid_up_to: e.valid_up_to() }))?;
    let envelope: EnvelopeIn<'_> = serde_json::from_str(text).map_err(|e| {
        SignedError::Malformed(match e.classify() {
            serde_json::error::Category::Data => WireError::Invalid(e.to_string()),
            _ => WireError::Malformed(e.to_string()),
        })
    })?;
    let verifying = key(envelope.key_id).ok_or(SignedError::UnknownKey { key_id: envelope.key_id })?;
    let signature: [u8; 64] = hex::decode(&envelope.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(SignedError::BadSignature)?;
    let message = envelope.message.get().as_bytes();
    verifying
        .verify_strict(&signing_bytes(topic, envelope.key_id, message), &Signature::from_bytes(&signature))
        .map_err(|_| SignedError::BadSignature)?;
    wire::decode(message).map_err(SignedError::Message)
}

/// [`open`] against the station keys a gate trusts (the package-signing keys).
pub fn open_station<T: DeserializeOwned>(
    topic: &str,
    payload: &[u8],
    keys: &TrustedKeys,
) -> Result<T, SignedError> {
    open(topic, payload, |id| keys.get(id).copied())
}

/// [`open`] against one gate's registered key (key id [`GATE_KEY_ID`]).
pub fn open_gate<T: DeserializeOwned>(
    topic: &str,
    payload: &[u8],
    key: &VerifyingKey,
) -> Result<T, SignedError> {
    open(topic, payload, |id| (id == GATE_KEY_ID).then_some(*key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::TxAck;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn ack(through_seq: u64) -> TxAck {
        TxAck { through_seq, installation: Some("inst-1".into()) }
    }

    const TOPIC: &str = "afc/v1/s1/gates/g01/tx/ack";

    #[test]
    fn a_sealed_message_opens_with_the_right_key_on_the_same_topic() {
        let payload = seal(TOPIC, &ack(42), 3, &key(1));
        let back: TxAck = open(TOPIC, &payload, |id| (id == 3).then(|| key(1).verifying_key())).unwrap();
        assert_eq!(back, ack(42));
        // It is readable JSON with the message inside as it is.
        let text = std::str::from_utf8(&payload).unwrap();
        assert!(text.contains(r#""message":{"through_seq":42"#), "{text}");
    }

    #[test]
    fn every_forgery_is_refused_with_its_own_code() {
        let payload = seal(TOPIC, &ack(42), 3, &key(1));
        let right = |id: u32| (id == 3).then(|| key(1).verifying_key());
        let wrong_key = |_| Some(key(2).verifying_key());
        let code = |r: Result<TxAck, SignedError>| r.unwrap_err().code();
        assert_eq!(code(open(TOPIC, &payload, wrong_key)), "bad_signature");
        assert_eq!(code(open("afc/v1/s1/gates/g02/tx/ack", &payload, right)), "bad_signature");
        assert_eq!(code(open(TOPIC, &payload, |_| None)), "unknown_key");
        assert_eq!(code(open(TOPIC, br#"{"through_seq":42}"#, right)), "malformed");
        assert_eq!(code(open(TOPIC, &payload[..payload.len() - 3], right)), "malformed");
        assert_eq!(code(open(TOPIC, b"", right)), "empty");
        // The message changed after signing (a digit of through_seq): refused.
        let tampered = String::from_utf8(payload.clone()).unwrap().replace("42", "43");
        assert_eq!(code(open(TOPIC, tampered.as_bytes(), right)), "bad_signature");
        // The key id changed: the signature covers it.
        let relabelled = String::from_utf8(payload).unwrap().replace(r#""key_id":3"#, r#""key_id":4"#);
        let any = |_| Some(key(1).verifying_key());
        assert_eq!(code(open(TOPIC, relabelled.as_bytes(), any)), "bad_signature");
        // Correctly signed, but not a TxAck.
        let other = seal(TOPIC, &wire::QrUsedBatch::default(), 3, &key(1));
        assert_eq!(code(open::<TxAck>(TOPIC, &other, right)), "invalid_message");
        // Oversized before parsing.
        let big = vec![b' '; MAX_PAYLOAD + 1];
        assert_eq!(code(open(TOPIC, &big, right)), "malformed");
    }

    #[test]
    fn gate_messages_use_key_id_zero() {
        let payload = seal(TOPIC, &ack(1), GATE_KEY_ID, &key(5));
        assert!(open_gate::<TxAck>(TOPIC, &payload, &key(5).verifying_key()).is_ok());
        let other_id = seal(TOPIC, &ack(1), 1, &key(5));
        assert_eq!(
            open_gate::<TxAck>(TOPIC, &other_id, &key(5).verifying_key()).unwrap_err().code(),
            "unknown_key"
        );
    }
}
