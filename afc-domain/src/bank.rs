//! Bank cards and phones at the gate: UnionPay QuickPass / EMV contactless (medium `bank`).
//!
//! The reader never hands the gate a PAN. It reports a 32-byte **payment token reference**
//! ([`BankToken`]: the card's PAR, or a hash of PAN and expiry when the card has none), the expiry,
//! whether the card's offline data authentication passed, and the application cryptogram with its
//! counter for the record. The gate decides offline ([`crate::decision`]):
//!
//! - refused when the token is on the **deny list**, expired, or failed offline authentication;
//! - otherwise accepted (first-ride risk: the charge is made later by clearing), but at most
//!   [`BankRisk`]'s limit of taps per token per business day at this gate.
//!
//! # The deny list is the blacklist's `bank` medium
//!
//! Denied tokens travel as the blacklist's entries of medium `bank`, keyed by [`BankToken::deny_key`]
//! (the token's first 8 bytes, big-endian): full list plus ordered deltas, signed and versioned,
//! applied in place, under the same mass-insertion guard and the same memory and time figures as
//! card numbers. Tokens are hashes (a PAR or a hash of PAN and expiry), so their first 8 bytes are
//! uniformly spread and a 64-bit key among 1,000,000 denied tokens refuses an unlisted token with a
//! probability of about 1,000,000 / 2^64 ≈ 5 × 10^-14 per tap; full 32-byte tokens (32 MB for a
//! million) would not fit the gate's 16 MB budget for the list. Clearing keeps the full tokens.
//!
//! # The unpaid-tap limit
//!
//! [`BankRisk`] counts accepted bank taps per token and business day at this gate, bounded in
//! memory. An entry beyond the limit is refused with [`Reason::BankUnpaidLimit`]; an exit never is
//! (a passenger inside must be let out) but is counted.
//!
//! [`Reason::BankUnpaidLimit`]: crate::model::Reason::BankUnpaidLimit

use std::collections::{HashMap, VecDeque};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::Date;

/// Taps per token and business day at one gate when `gate_config` says nothing.
pub const DEFAULT_UNPAID_TAPS_PER_DAY: u16 = 8;

/// Tokens [`BankRisk`] remembers at once (about 80 bytes each: 2.6 MB when full).
pub const DEFAULT_RISK_CAPACITY: usize = 32_768;

/// A payment token reference: 32 bytes, shown and carried as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BankToken(pub [u8; 32]);

impl BankToken {
    /// Parses 64 hex digits.
    pub fn parse(text: &str) -> Option<BankToken> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.as_bytes(), &mut out).ok()?;
        Some(BankToken(out))
    }

    /// The key the deny list holds the token under: its first 8 bytes, big-endian.
    pub fn deny_key(&self) -> u64 {
        let mut k = [0u8; 8];
        k.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(k)
    }
}

impl fmt::Display for BankToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for BankToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BankToken({self})")
    }
}

impl Serialize for BankToken {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for BankToken {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<BankToken, D::Error> {
        let text = String::deserialize(d)?;
        BankToken::parse(&text).ok_or_else(|| serde::de::Error::custom("a bank token is 64 hex digits"))
    }
}

/// The application cryptogram (ARQC/TC) of one tap: 8 bytes, carried as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cryptogram(pub [u8; 8]);

impl fmt::Display for Cryptogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Cryptogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cryptogram({self})")
    }
}

impl Serialize for Cryptogram {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Cryptogram {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cryptogram, D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 8];
        hex::decode_to_slice(text.as_bytes(), &mut out)
            .map_err(|_| serde::de::Error::custom("a cryptogram is 16 hex digits"))?;
        Ok(Cryptogram(out))
    }
}

/// What the ledger keeps of a bank tap, for clearing's charge: the token, the cryptogram and the
/// card's application transaction counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
pub struct BankRef {
    #[cfg_attr(feature = "schema", schema(value_type = String, format = "hex"))]
    pub token: BankToken,
    #[cfg_attr(feature = "schema", schema(value_type = String, format = "hex"))]
    pub cryptogram: Cryptogram,
    pub atc: u16,
}

/// Accepted bank taps per token and business day at one gate, bounded: the unpaid-tap limit.
///
/// When full, the token seen first is forgotten (tokens of earlier days are the first seen, so
/// they go first); a forgotten token starts again from zero: the limit errs on the passenger's
/// side. Counting costs O(1): no tap ever scans the table.
#[derive(Debug, Clone)]
pub struct BankRisk {
    capacity: usize,
    by_token: HashMap<u64, (Date, u16)>,
    /// The remembered tokens in the order they were first seen, for forgetting the oldest.
    order: VecDeque<u64>,
}

impl Default for BankRisk {
    fn default() -> Self {
        BankRisk::new(DEFAULT_RISK_CAPACITY)
    }
}

impl BankRisk {
    /// A counter remembering at most `capacity` tokens (at least 1).
    pub fn new(capacity: usize) -> BankRisk {
        BankRisk { capacity: capacity.max(1), by_token: HashMap::new(), order: VecDeque::new() }
    }

    /// The accepted taps `token` made on `day`.
    pub fn taps(&self, token: &BankToken, day: Date) -> u16 {
        match self.by_token.get(&token.deny_key()) {
            Some(&(d, n)) if d == day => n,
            _ => 0,
        }
    }

    /// Counts one accepted tap of `token` on `day`.
    pub fn count(&mut self, token: &BankToken, day: Date) {
        let key = token.deny_key();
        if !self.by_token.contains_key(&key) {
            while self.by_token.len() >= self.capacity {
                let Some(oldest) = self.order.pop_front() else { break };
                self.by_token.remove(&oldest);
            }
            self.order.push_back(key);
        }
        let slot = self.by_token.entry(key).or_insert((day, 0));
        if slot.0 != day {
            *slot = (day, 0);
        }
        slot.1 = slot.1.saturating_add(1);
    }

    /// Tokens remembered.
    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }
}

/// `n` distinct pseudo-random tokens from `seed` (splitmix64): what denied tokens look like, for
/// benchmarks, tests and demos.
pub fn sample_tokens(n: usize, seed: u64) -> Vec<BankToken> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..n)
        .map(|_| {
            let mut t = [0u8; 32];
            for chunk in t.chunks_mut(8) {
                chunk.copy_from_slice(&next().to_be_bytes());
            }
            BankToken(t)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(b: u8) -> BankToken {
        BankToken([b; 32])
    }

    #[test]
    fn a_token_reads_and_prints_as_64_hex_digits_and_its_deny_key_is_its_first_8_bytes() {
        let mut t = [0u8; 32];
        t[0] = 0x12;
        t[7] = 0x9a;
        t[8] = 0xff;
        let t = BankToken(t);
        assert_eq!(BankToken::parse(&t.to_string()), Some(t));
        assert_eq!(t.deny_key(), 0x1200_0000_0000_009a);
        assert_eq!(BankToken::parse("12"), None);
        assert_eq!(BankToken::parse(&"zz".repeat(32)), None);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<BankToken>(&json).unwrap(), t);
    }

    #[test]
    fn taps_are_counted_per_token_and_business_day_and_the_count_is_bounded() {
        let day = Date::from_ymd(2026, 12, 3).unwrap();
        let mut r = BankRisk::new(2);
        r.count(&token(1), day);
        r.count(&token(1), day);
        assert_eq!(r.taps(&token(1), day), 2);
        assert_eq!(r.taps(&token(1), day.plus_days(1)), 0);
        r.count(&token(1), day.plus_days(1));
        assert_eq!(r.taps(&token(1), day.plus_days(1)), 1);
        r.count(&token(2), day);
        // Full: a third token forgets the one seen first.
        r.count(&token(3), day.plus_days(1));
        assert_eq!(r.len(), 2);
        assert_eq!(r.taps(&token(1), day.plus_days(1)), 0);
        assert_eq!((r.taps(&token(2), day), r.taps(&token(3), day.plus_days(1))), (1, 1));
    }
}
