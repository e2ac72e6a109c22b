//! The station's package-signing key as the package and blacklist tests and benchmarks use it:
//! a fixed key under key id [`KEY_ID`], the trust set holding it, and a blacklist package it signs.

use afc_domain::model::{ParamKind, Timestamp};
use afc_domain::package::{BlacklistBody, Package, TrustedKeys};
use ed25519_dalek::SigningKey;

/// The key id packages are signed under.
pub const KEY_ID: u32 = 2026;

/// A fixed station signing key (the same bytes every run, so failures reproduce).
pub fn station_key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

/// A trust set holding only [`station_key`] under [`KEY_ID`].
pub fn trusted() -> TrustedKeys {
    let mut keys = TrustedKeys::new();
    keys.insert(KEY_ID, station_key().verifying_key());
    keys
}

/// `body` as blacklist package `version`, signed by [`station_key`].
pub fn blacklist_package(version: u64, body: &BlacklistBody) -> Package {
    Package::sign(
        ParamKind::Blacklist,
        version,
        Timestamp(1_780_000_000_000),
        body.encode(),
        KEY_ID,
        &station_key(),
    )
}
