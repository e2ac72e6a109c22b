//! Registered gates: their keys and per-installation ledger progress, registration and key rotation.

use std::collections::BTreeMap;

use afc_domain::ledger::Installation;
use afc_domain::model::Ident;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use super::{Rejection, Response, StationState};
use crate::chain::GateProgress;

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
    /// Sequence gaps recorded for this gate ([`SequenceGap`](super::SequenceGap)), all installations.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gaps: u64,
    /// Records refused because the ledger holds their key with other content ([`KeyConflict`](super::KeyConflict)).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub conflicts: u64,
    /// Taken out of service ([`Request::DecommissionGate`](super::Request::DecommissionGate)); registering it again clears this.
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

    pub(super) fn progress_mut(&mut self, installation: Option<Installation>) -> &mut GateProgress {
        match installation {
            None => &mut self.progress,
            Some(i) => self.installations.entry(i).or_default(),
        }
    }
}

impl StationState {
    pub(super) fn register_gate(&mut self, gate: &Ident, key_hex: &str, hardware_profile: &str) -> Response {
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
}

fn decode_key(hex_key: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(hex_key).map_err(|e| e.to_string())?;
    let key: [u8; 32] = bytes.try_into().map_err(|_| "expected 32 bytes".to_owned())?;
    VerifyingKey::from_bytes(&key).map_err(|e| e.to_string())?;
    Ok(key)
}
