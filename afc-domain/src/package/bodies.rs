//! Package bodies: the blacklist's compact body (a full base or a delta), the `gate_config`
//! body, and the JSON bodies of the small kinds.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::header::{Package, PackageError};
use crate::blacklist::{Blacklist, BlacklistDelta};
use crate::model::ParamKind;
use crate::wire::GateDirection;

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

/// The `gate_config` body (JSON, one package for every gate of the station). A gate ignores
/// fields it does not know (a newer controller's); the controller's API refuses them
/// ([`GateConfigBody::from_json_strict`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct GateConfigBody {
    /// The aisle direction; the agent's configured direction when absent.
    #[serde(default)]
    pub direction: Option<GateDirection>,
    /// Free the passage after this long without the controllers (SPEC §1); never when absent.
    #[serde(default)]
    pub release_on_controller_loss_secs: Option<u64>,
    /// The hardware profile name the gate should run (informational; shown on the console).
    #[serde(default)]
    pub hardware_profile: Option<String>,
    /// How long after a voided passage (`passage_not_made`: the flaps never opened for an
    /// accepted tap) the same medium may re-tap at this gate, in the same direction, and be let
    /// through once without a second charge; [`DEFAULT_RETAP_WINDOW_SECS`] when absent, 0: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retap_window_secs: Option<u64>,
    /// The unpaid-tap limit: accepted taps one bank token may make per business day at this gate
    /// before an entry is refused; [`crate::bank::DEFAULT_UNPAID_TAPS_PER_DAY`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bank_unpaid_taps_per_day: Option<u16>,
    /// Every stored-value debit must carry its PSAM's TAC: a debit from a reader without a PSAM
    /// (one that does not announce `psam`) is refused with `psam_failed` instead of being recorded
    /// unsigned. Off when absent, so older readers keep working until every reader has its PSAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_psam: Option<bool>,
}

/// The re-tap window after a voided passage when gate_config says nothing.
pub const DEFAULT_RETAP_WINDOW_SECS: u64 = 120;

impl GateConfigBody {
    /// Every field a `gate_config` body may carry.
    pub const FIELDS: [&'static str; 6] = [
        "direction",
        "release_on_controller_loss_secs",
        "hardware_profile",
        "retap_window_secs",
        "bank_unpaid_taps_per_day",
        "require_psam",
    ];

    /// Reads a body an operator wrote: unknown fields (a typo) and values out of range are refused.
    pub fn from_json_strict(v: &serde_json::Value) -> Result<GateConfigBody, String> {
        let obj = v.as_object().ok_or("gate_config must be a JSON object")?;
        if let Some(k) = obj.keys().find(|k| !Self::FIELDS.contains(&k.as_str())) {
            return Err(format!("unknown gate_config field {k:?} (known: {})", Self::FIELDS.join(", ")));
        }
        let body: GateConfigBody = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        body.check()?;
        Ok(body)
    }

    /// Bounds: release after 10 s to 1 day without controllers; a re-tap window of at most an
    /// hour; 1 to 100 unpaid bank taps a day; a profile name of 1 to 64 characters.
    pub fn check(&self) -> Result<(), String> {
        if let Some(s) = self.release_on_controller_loss_secs.filter(|s| !(10..=86_400).contains(s)) {
            return Err(format!("release_on_controller_loss_secs {s} is outside 10..=86400"));
        }
        if let Some(s) = self.retap_window_secs.filter(|s| *s > 3_600) {
            return Err(format!("retap_window_secs {s} is above 3600"));
        }
        if let Some(n) = self.bank_unpaid_taps_per_day.filter(|n| !(1..=100).contains(n)) {
            return Err(format!("bank_unpaid_taps_per_day {n} is outside 1..=100"));
        }
        if let Some(p) = self.hardware_profile.as_ref().filter(|p| p.is_empty() || p.len() > 64) {
            return Err(format!("hardware_profile {p:?} must be 1 to 64 characters"));
        }
        Ok(())
    }

    /// The unpaid-tap limit for bank tokens ([`GateConfigBody::bank_unpaid_taps_per_day`]).
    pub fn bank_taps_per_day(&self) -> u16 {
        self.bank_unpaid_taps_per_day.unwrap_or(crate::bank::DEFAULT_UNPAID_TAPS_PER_DAY)
    }

    /// Whether an unsigned stored-value debit is refused ([`GateConfigBody::require_psam`]).
    pub fn psam_required(&self) -> bool {
        self.require_psam.unwrap_or(false)
    }

    /// The re-tap window after a voided passage ([`GateConfigBody::retap_window_secs`]).
    pub fn retap_window(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.retap_window_secs.unwrap_or(DEFAULT_RETAP_WINDOW_SECS))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blacklist::Entry;
    use crate::model::{Media, Timestamp};
    use ed25519_dalek::SigningKey;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn a_gate_config_an_operator_wrote_is_read_strictly_and_bounded() {
        let ok = serde_json::json!({"release_on_controller_loss_secs": 60, "retap_window_secs": 0});
        let body = GateConfigBody::from_json_strict(&ok).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(body.release_on_controller_loss_secs, Some(60));
        assert_eq!(body.retap_window(), std::time::Duration::ZERO);
        for (bad, why) in [
            (serde_json::json!({"retap_window": 5}), "unknown gate_config field"),
            (serde_json::json!({"release_on_controller_loss_secs": 1}), "outside 10..=86400"),
            (serde_json::json!({"retap_window_secs": 7200}), "above 3600"),
            (serde_json::json!({"hardware_profile": ""}), "1 to 64"),
            (serde_json::json!({"direction": "sideways"}), "unknown variant"),
            (serde_json::json!([]), "JSON object"),
        ] {
            let e = GateConfigBody::from_json_strict(&bad).err().unwrap_or_else(|| panic!("{bad} taken"));
            assert!(e.contains(why), "{bad}: {e}");
        }
        // A gate reads a newer controller's body, ignoring what it does not know.
        let newer: GateConfigBody =
            serde_json::from_str(r#"{"retap_window_secs": 30, "future": true}"#).unwrap_or_default();
        assert_eq!(newer.retap_window_secs, Some(30));
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
}
