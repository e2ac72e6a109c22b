//! The TAC of a stored-value debit: what the reader's PSAM signs, and how clearing checks it.
//!
//! Every accepted Mingzhu stored-value tap that writes the card is signed by the reader's PSAM
//! (secure access module) between the gate's decision and its durable record: the gate sends a
//! [`TacInput`], the PSAM answers its id, its own counter and the TAC ([`TacRef`], carried in the
//! record's canonical bytes as field 21), and clearing recomputes the TAC with the issuer's key.
//!
//! ## The MAC
//!
//! HMAC-SHA256 (RFC 2104 over FIPS 180-4 SHA-256), truncated to its first 8 bytes (RFC 2104 §5
//! allows truncation to at least half the output, and no fewer than 80 bits is the advice; 64
//! bits is what PBOC and JT/T 978 TACs carry and what the record has room for: forging one
//! blindly is a 2⁻⁶⁴ guess per attempt, and every attempt is an observed mismatch at clearing).
//! Each PSAM holds its own key, derived from the issuer's master key:
//!
//! ```text
//! psam_key = HMAC-SHA256(master, "afc/v1/psam-key\0" ‖ psam id as u64 big-endian)
//! ```
//!
//! so a PSAM stolen from one reader forges only under its own id (its TACs can be refused by id),
//! and clearing needs the master key only. HMAC is implemented here over the `sha2` crate already
//! in the tree (the `hmac` crate in `Cargo.lock` is built on `digest` 0.11, the workspace's `sha2`
//! on 0.10) and checked against the RFC 4231 test vectors. Real PBOC / JT/T readers compute the
//! TAC with SM4 (or 3DES) in a certified PSAM; the exchange and the bytes signed stay as they are
//! if [`tac`] is swapped for SM4-MAC (see `docs/security.md`).
//!
//! ## The bytes signed
//!
//! All integers big-endian, strings prefixed with one length byte (identifiers are at most 64
//! bytes):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 15 | domain `"afc/v1/svc-tac\0"` |
//! | 15 | 8 | `card_id` (the record's `id`) |
//! | 23 | 4 | `tx_counter`: the card's counter after the tap (the record's `card_tx_counter`) |
//! | 27 | 4 | `amount_fen`: fen debited (the record's `fare_fen`; 0 at an entry) |
//! | 31 | 1 + n | `station` (terminal id, part 1) |
//! | … | 1 + m | `gate` (terminal id, part 2) |
//! | … | 8 | `time`: ms since the Unix epoch, signed (the record's `occurred_at`) |
//! | … | 8 | `psam`: the PSAM's id |
//! | … | 4 | `psam_seq`: the PSAM's counter for this debit |
//!
//! Every value is one the record carries, so clearing checks a TAC from the record alone.

use sha2::{Digest, Sha256};

use crate::ledger::{TacRef, TxRecord};
use crate::model::{Ident, Media, Reason, Timestamp};

/// The domain prefix of the signed bytes.
pub const TAC_DOMAIN: &[u8] = b"afc/v1/svc-tac\0";
/// The domain prefix of a PSAM key derivation.
pub const PSAM_KEY_DOMAIN: &[u8] = b"afc/v1/psam-key\0";

/// What the gate asks the PSAM to sign: one stored-value debit. JSON on the reader wire (the
/// `sign` line, docs/spec/reader.md).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TacInput {
    /// The card number.
    pub card_id: u64,
    /// The card's transaction counter after this tap (what the reader writes).
    pub tx_counter: u32,
    /// Fen debited from the card by this tap (0 at an entry).
    pub amount_fen: u32,
    /// The terminal: the station's id …
    pub station: Ident,
    /// … and the gate's.
    pub gate: Ident,
    /// The gate's clock at the decision (the record's `occurred_at`).
    pub time: Timestamp,
}

impl TacInput {
    /// The debit a record describes, if it is one a TAC may cover: a stored-value record with a
    /// card counter. Clearing checks a record's TAC over exactly this.
    pub fn of_record(r: &TxRecord) -> Option<TacInput> {
        if r.media != Media::Svc {
            return None;
        }
        Some(TacInput {
            card_id: r.id,
            tx_counter: r.card_tx_counter?,
            amount_fen: r.fare_fen,
            station: r.station.clone(),
            gate: r.gate.clone(),
            time: r.occurred_at,
        })
    }

    /// The exact bytes the MAC covers for this debit signed by PSAM `psam` at its counter `psam_seq`.
    pub fn signed_bytes(&self, psam: u64, psam_seq: u32) -> Vec<u8> {
        let (s, g) = (self.station.as_str().as_bytes(), self.gate.as_str().as_bytes());
        let mut out = Vec::with_capacity(TAC_DOMAIN.len() + 36 + s.len() + g.len());
        out.extend_from_slice(TAC_DOMAIN);
        out.extend_from_slice(&self.card_id.to_be_bytes());
        out.extend_from_slice(&self.tx_counter.to_be_bytes());
        out.extend_from_slice(&self.amount_fen.to_be_bytes());
        for id in [s, g] {
            // An `Ident` is at most 64 bytes, so its length fits one byte.
            out.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(id);
        }
        out.extend_from_slice(&self.time.0.to_be_bytes());
        out.extend_from_slice(&psam.to_be_bytes());
        out.extend_from_slice(&psam_seq.to_be_bytes());
        out
    }
}

/// Whether a record is a stored-value debit that should carry a TAC: an accepted svc tap that
/// wrote the card (it has a card counter), other than a re-tap after a voided passage (which
/// writes nothing and repeats the voided record's counter). A record without one is `missing`
/// at clearing (an older reader, or a gate of an earlier version), never a mismatch.
pub fn expects_tac(r: &TxRecord) -> bool {
    r.media == Media::Svc
        && r.accepted
        && r.card_tx_counter.is_some()
        && r.reason != Reason::OkRetapAfterFailedPassage
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let (mut ipad, mut opad) = ([0x36u8; BLOCK], [0x5cu8; BLOCK]);
    for i in 0..BLOCK {
        ipad[i] ^= k[i];
        opad[i] ^= k[i];
    }
    let inner = Sha256::new().chain_update(ipad).chain_update(message).finalize();
    Sha256::new().chain_update(opad).chain_update(inner).finalize().into()
}

/// The issuer's master key, from which every PSAM's key is derived. Held by the issuer's key
/// management and by clearing, never by a gate.
#[derive(Clone)]
pub struct IssuerKey([u8; 32]);

impl std::fmt::Debug for IssuerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IssuerKey(<redacted>)")
    }
}

impl IssuerKey {
    pub fn from_bytes(bytes: [u8; 32]) -> IssuerKey {
        IssuerKey(bytes)
    }

    /// 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<IssuerKey, hex::FromHexError> {
        let mut k = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut k)?;
        Ok(IssuerKey(k))
    }

    /// The key personalised into PSAM `psam` when it is issued.
    pub fn psam_key(&self, psam: u64) -> PsamKey {
        let mut m = Vec::with_capacity(PSAM_KEY_DOMAIN.len() + 8);
        m.extend_from_slice(PSAM_KEY_DOMAIN);
        m.extend_from_slice(&psam.to_be_bytes());
        PsamKey { psam, key: hmac_sha256(&self.0, &m) }
    }

    /// Whether `t` is the TAC PSAM `t.psam` computes over `input` at its counter `t.psam_seq`
    /// (compared in constant time).
    pub fn verify(&self, input: &TacInput, t: &TacRef) -> bool {
        let expected = self.psam_key(t.psam).tac(input, t.psam_seq);
        let diff = expected.iter().zip(&t.tac).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

/// One PSAM's id and its own key (derived from the issuer's master key).
#[derive(Clone)]
pub struct PsamKey {
    psam: u64,
    key: [u8; 32],
}

impl std::fmt::Debug for PsamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PsamKey({}, <redacted>)", self.psam)
    }
}

impl PsamKey {
    /// The PSAM this key belongs to.
    pub fn psam(&self) -> u64 {
        self.psam
    }

    /// The TAC: the first 8 bytes of HMAC-SHA256 over [`TacInput::signed_bytes`].
    pub fn tac(&self, input: &TacInput, psam_seq: u32) -> [u8; 8] {
        let full = hmac_sha256(&self.key, &input.signed_bytes(self.psam, psam_seq));
        let mut out = [0u8; 8];
        out.copy_from_slice(&full[..8]);
        out
    }
}

/// A PSAM as a reader holds it: its key and its transaction counter, which every signature
/// advances (the reader simulator's; a real one is a smart card in the reader's SAM slot).
#[derive(Debug, Clone)]
pub struct Psam {
    key: PsamKey,
    seq: u32,
}

impl Psam {
    /// A PSAM personalised with `key` whose counter stands at `seq` (the next debit gets `seq + 1`).
    pub fn new(key: PsamKey, seq: u32) -> Psam {
        Psam { key, seq }
    }

    /// The PSAM's id.
    pub fn id(&self) -> u64 {
        self.key.psam
    }

    /// Signs one debit, advancing the counter. `None` once the counter is exhausted (a real
    /// PSAM then refuses every debit and must be replaced).
    pub fn sign(&mut self, input: &TacInput) -> Option<TacRef> {
        self.seq = self.seq.checked_add(1)?;
        Some(TacRef { psam: self.key.psam, psam_seq: self.seq, tac: self.key.tac(input, self.seq) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> TacInput {
        TacInput {
            card_id: 3104_0000_0000_0123,
            tx_counter: 42,
            amount_fen: 160,
            station: Ident::new("s1").unwrap(),
            gate: Ident::new("g01").unwrap(),
            time: Timestamp(1_796_176_800_000),
        }
    }

    fn svc_record() -> TxRecord {
        use crate::ledger::ParamVersions;
        use crate::mode::ModeBits;
        let i = input();
        TxRecord {
            station: i.station,
            gate: i.gate,
            gate_seq: 1,
            media: Media::Svc,
            id: i.card_id,
            direction: crate::model::Direction::Exit,
            accepted: true,
            reason: Reason::Ok,
            fare_fen: i.amount_fen,
            shortfall_fen: 0,
            balance_before: Some(5_000),
            balance_after: Some(4_840),
            card_tx_counter: Some(i.tx_counter),
            entry_station: None,
            entry_time: None,
            occurred_at: i.time,
            modes: ModeBits::NORMAL,
            params: ParamVersions::default(),
            replay_unchecked: false,
            qr: None,
            installation: None,
            voids: None,
            bank: None,
            tac: None,
        }
    }

    #[test]
    fn hmac_sha256_matches_the_rfc_4231_test_vectors() {
        // Test case 1: 20 bytes 0x0b, "Hi There".
        assert_eq!(
            hex::encode(hmac_sha256(&[0x0b; 20], b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        // Test case 2: "Jefe".
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a 131-byte key (hashed first).
        assert_eq!(
            hex::encode(hmac_sha256(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First")),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn the_signed_bytes_are_laid_out_as_documented() {
        let b = input().signed_bytes(0x0102_0304_0506_0708, 7);
        let mut want = b"afc/v1/svc-tac\0".to_vec();
        want.extend_from_slice(&3104_0000_0000_0123u64.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 42, 0, 0, 0, 160]);
        want.extend_from_slice(&[2, b's', b'1', 3, b'g', b'0', b'1']);
        want.extend_from_slice(&1_796_176_800_000i64.to_be_bytes());
        want.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 7]);
        assert_eq!(hex::encode(&b), hex::encode(&want));
        assert_eq!(b.len(), 15 + 8 + 4 + 4 + 3 + 4 + 8 + 8 + 4);
    }

    #[test]
    fn a_tac_is_fixed_by_the_master_key_and_every_signed_field() {
        let master = IssuerKey::from_bytes([7; 32]);
        let t = master.psam_key(9).tac(&input(), 1);
        // Pinned, and recomputed independently with Python's hmac module over the documented
        // bytes, so an accidental change of the layout or the derivation shows here.
        assert_eq!(hex::encode(t), "f8e21d8370a7aa6e");
        let r = TacRef { psam: 9, psam_seq: 1, tac: t };
        assert!(master.verify(&input(), &r));
        // Any field changed, any bit of the TAC flipped, another PSAM or counter, another master.
        let mut edits: Vec<TacInput> = Vec::new();
        for f in 0..6 {
            let mut i = input();
            match f {
                0 => i.card_id += 1,
                1 => i.tx_counter += 1,
                2 => i.amount_fen -= 1,
                3 => i.station = Ident::new("s2").unwrap(),
                4 => i.gate = Ident::new("g02").unwrap(),
                _ => i.time = Timestamp(i.time.0 + 1),
            }
            edits.push(i);
        }
        for i in &edits {
            assert!(!master.verify(i, &r), "{i:?}");
        }
        for bit in 0..64 {
            let mut bad = r;
            bad.tac[bit / 8] ^= 1 << (bit % 8);
            assert!(!master.verify(&input(), &bad), "bit {bit}");
        }
        assert!(!master.verify(&input(), &TacRef { psam: 10, ..r }));
        assert!(!master.verify(&input(), &TacRef { psam_seq: 2, ..r }));
        assert!(!IssuerKey::from_bytes([8; 32]).verify(&input(), &r));
    }

    #[test]
    fn a_psam_counts_its_debits_and_each_tac_verifies_under_the_master_key() {
        let master = IssuerKey::from_hex(&"07".repeat(32)).unwrap();
        let mut p = Psam::new(master.psam_key(9), 41);
        let a = p.sign(&input()).unwrap();
        let b = p.sign(&input()).unwrap();
        assert_eq!((a.psam, a.psam_seq, b.psam_seq), (9, 42, 43));
        assert_ne!(a.tac, b.tac);
        assert!(master.verify(&input(), &a) && master.verify(&input(), &b));
        assert!(Psam::new(master.psam_key(9), u32::MAX).sign(&input()).is_none());
    }

    #[test]
    fn only_accepted_svc_taps_that_wrote_the_card_expect_a_tac() {
        let mut r = svc_record();
        assert!(expects_tac(&r));
        assert_eq!(TacInput::of_record(&r).unwrap().tx_counter, 42);
        r.reason = Reason::OkRetapAfterFailedPassage;
        assert!(!expects_tac(&r));
        r.reason = Reason::Ok;
        r.accepted = false;
        assert!(!expects_tac(&r));
        r.accepted = true;
        r.card_tx_counter = None;
        assert!(!expects_tac(&r) && TacInput::of_record(&r).is_none());
    }
}
