//! PSAM TACs of stored-value debits, verified by clearing with the issuer's key (issue 15 item 3).
//!
//! Every stored record that carries a TAC (`TxRecord::tac`) is checked with
//! [`afc_domain::tac::IssuerKey::verify`] over the debit the record itself describes
//! ([`TacInput::of_record`]: card, counter after the tap, amount, station and gate, time) and
//! counted per gate and per PSAM:
//!
//! - `verified`: the TAC is the one the PSAM named computes over those fields;
//! - `mismatched`: it is not (a forged or altered debit, a PSAM with another key), or a TAC sits
//!   on a record that is no stored-value debit. Each one is listed ([`Mismatch`]) for
//!   investigation and counted in `afc_clearing_tac_records{outcome="mismatched"}`; clearing has
//!   no stored-value settlement step, so nothing settles it silently: a settlement run must
//!   exclude the listed records (`(station, gate, installation, gate_seq)`);
//! - `missing`: an accepted stored-value tap that wrote the card ([`expects_tac`]) without a TAC:
//!   a one-phase (older) reader or a gate of an earlier version. Never a mismatch;
//! - `unchecked`: a TAC present while clearing has no issuer key configured.
//!
//! The report is computed from the stored ledgers on each request: one HMAC per signed record, a
//! few microseconds each. `/metrics` keeps a running tally per station ([`TacTally`]) and checks
//! only the records stored since the previous scrape.

use std::collections::BTreeMap;

use afc_domain::ledger::{Installation, TxRecord};
use afc_domain::model::Ident;
use afc_domain::tac::{expects_tac, IssuerKey, TacInput};
use serde::Serialize;

/// At most this many mismatches are listed in full (all are counted).
pub const MAX_LISTED: usize = 10_000;

/// Counts of one gate, one PSAM, or all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TacCounts {
    pub verified: u64,
    pub mismatched: u64,
    pub missing: u64,
    pub unchecked: u64,
}

/// One gate's counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GateTacs {
    pub station: Ident,
    pub gate: Ident,
    #[serde(flatten)]
    pub counts: TacCounts,
}

/// One PSAM's counts (`missing` is always 0: a record without a TAC names no PSAM) and the gates
/// its TACs came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PsamTacs {
    pub psam: u64,
    #[serde(flatten)]
    pub counts: TacCounts,
    /// `station/gate` of every gate that recorded a TAC under this PSAM.
    pub gates: Vec<String>,
}

/// A record whose TAC does not verify: flagged for investigation, never settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub station: Ident,
    pub gate: Ident,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub installation: Option<Installation>,
    pub gate_seq: u64,
    /// The record's index in its station's ledger (from 1).
    pub ledger_index: u64,
    pub card_id: u64,
    pub amount_fen: u32,
    pub card_tx_counter: Option<u32>,
    pub occurred_at: afc_domain::model::Timestamp,
    pub psam: u64,
    pub psam_seq: u32,
    /// The TAC as recorded, 16 hex digits.
    pub tac: String,
}

/// `GET /v1/admin/tac`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TacReport {
    /// Whether clearing holds the issuer key (without it every TAC is `unchecked`).
    pub issuer_key: bool,
    pub totals: TacCounts,
    pub gates: Vec<GateTacs>,
    pub psams: Vec<PsamTacs>,
    pub mismatches: Vec<Mismatch>,
    /// Mismatches counted but not listed (beyond [`MAX_LISTED`]).
    pub mismatches_not_listed: u64,
}

/// How one record's TAC came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Verified,
    Mismatched,
    Missing,
    Unchecked,
    /// No TAC, none expected (not a stored-value debit).
    NotApplicable,
}

/// Checks one record's TAC.
pub fn check(key: Option<&IssuerKey>, r: &TxRecord) -> Outcome {
    match (&r.tac, key) {
        (None, _) if expects_tac(r) => Outcome::Missing,
        (None, _) => Outcome::NotApplicable,
        (Some(_), None) => Outcome::Unchecked,
        (Some(t), Some(k)) => match TacInput::of_record(r) {
            Some(input) if k.verify(&input, t) => Outcome::Verified,
            _ => Outcome::Mismatched,
        },
    }
}

fn add(c: &mut TacCounts, o: Outcome) {
    match o {
        Outcome::Verified => c.verified += 1,
        Outcome::Mismatched => c.mismatched += 1,
        Outcome::Missing => c.missing += 1,
        Outcome::Unchecked => c.unchecked += 1,
        Outcome::NotApplicable => {}
    }
}

impl TacCounts {
    /// Adds the outcome of every record in `records`.
    pub fn add_records(&mut self, key: Option<&IssuerKey>, records: &[TxRecord]) {
        for r in records {
            add(self, check(key, r));
        }
    }
}

/// One station's counts for `/metrics` and how far into its ledger they reach.
#[derive(Debug, Clone, Copy, Default)]
pub struct TacTally {
    pub through: crate::store::RecordCursor,
    pub counts: TacCounts,
}

impl TacTally {
    /// Adds `new`, the counts of the records from `from` to `to`, unless another caller already
    /// moved the tally past `from`.
    pub fn advance(
        &mut self,
        from: crate::store::RecordCursor,
        to: crate::store::RecordCursor,
        new: TacCounts,
    ) {
        if self.through != from {
            return;
        }
        self.through = to;
        let c = &mut self.counts;
        c.verified += new.verified;
        c.mismatched += new.mismatched;
        c.missing += new.missing;
        c.unchecked += new.unchecked;
    }
}

/// The report over every station's stored records (each in ledger order).
pub fn report<'a>(
    key: Option<&IssuerKey>,
    stations: impl IntoIterator<Item = (&'a Ident, &'a [TxRecord])>,
) -> TacReport {
    let mut totals = TacCounts::default();
    let mut gates: BTreeMap<(Ident, Ident), TacCounts> = BTreeMap::new();
    let mut psams: BTreeMap<u64, (TacCounts, std::collections::BTreeSet<String>)> = BTreeMap::new();
    let mut mismatches = Vec::new();
    let mut not_listed = 0;
    for (_, records) in stations {
        for (i, r) in records.iter().enumerate() {
            let o = check(key, r);
            if o == Outcome::NotApplicable {
                continue;
            }
            add(&mut totals, o);
            add(gates.entry((r.station.clone(), r.gate.clone())).or_default(), o);
            let Some(t) = r.tac else { continue };
            let p = psams.entry(t.psam).or_default();
            add(&mut p.0, o);
            p.1.insert(format!("{}/{}", r.station, r.gate));
            if o == Outcome::Mismatched {
                tracing::warn!(station = %r.station, gate = %r.gate, gate_seq = r.gate_seq, psam = t.psam, "a stored-value debit's TAC does not verify: flagged");
                if mismatches.len() < MAX_LISTED {
                    mismatches.push(Mismatch {
                        station: r.station.clone(),
                        gate: r.gate.clone(),
                        installation: r.installation,
                        gate_seq: r.gate_seq,
                        ledger_index: i as u64 + 1,
                        card_id: r.id,
                        amount_fen: r.fare_fen,
                        card_tx_counter: r.card_tx_counter,
                        occurred_at: r.occurred_at,
                        psam: t.psam,
                        psam_seq: t.psam_seq,
                        tac: hex::encode(t.tac),
                    });
                } else {
                    not_listed += 1;
                }
            }
        }
    }
    TacReport {
        issuer_key: key.is_some(),
        totals,
        gates: gates
            .into_iter()
            .map(|((station, gate), counts)| GateTacs { station, gate, counts })
            .collect(),
        psams: psams
            .into_iter()
            .map(|(psam, (counts, gates))| PsamTacs { psam, counts, gates: gates.into_iter().collect() })
            .collect(),
        mismatches,
        mismatches_not_listed: not_listed,
    }
}

/// Appends `afc_clearing_tac_records{station,outcome}` (Prometheus text) for `stations`.
pub fn metrics_text<'a>(out: &mut String, stations: impl IntoIterator<Item = (&'a Ident, TacCounts)>) {
    use std::fmt::Write as _;
    let name = "afc_clearing_tac_records";
    let _ = writeln!(
        out,
        "# HELP {name} Stored stored-value debits by TAC outcome (verified, mismatched: flagged, never settled; missing: no TAC, an older reader; unchecked: no issuer key).\n# TYPE {name} gauge"
    );
    for (station, c) in stations {
        for (outcome, v) in [
            ("verified", c.verified),
            ("mismatched", c.mismatched),
            ("missing", c.missing),
            ("unchecked", c.unchecked),
        ] {
            let _ = writeln!(out, "{name}{{station=\"{station}\",outcome=\"{outcome}\"}} {v}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use afc_domain::ledger::TacRef;
    use afc_domain::tac::Psam;

    fn signed(gate: &str, seq: u64, psam: &mut Psam) -> TxRecord {
        let station = Ident::new("xian_rd").unwrap();
        let mut r = crate::testdata::record(&station, gate, seq);
        r.tac = psam.sign(&TacInput::of_record(&r).unwrap());
        r
    }

    #[test]
    fn verified_missing_and_mismatched_are_counted_per_gate_and_psam() {
        let key = IssuerKey::from_bytes([3; 32]);
        let mut p1 = Psam::new(key.psam_key(1), 0);
        let mut p2 = Psam::new(key.psam_key(2), 0);
        let mut records =
            vec![signed("g01", 1, &mut p1), signed("g01", 2, &mut p1), signed("g02", 1, &mut p2)];
        // An older reader: no TAC.
        records.push(crate::testdata::record(&Ident::new("xian_rd").unwrap(), "g02", 2));
        // The fare raised after signing.
        records[1].fare_fen += 100;
        // A QR record: no TAC expected, not counted.
        let mut qr = crate::testdata::record(&Ident::new("xian_rd").unwrap(), "g03", 1);
        qr.media = afc_domain::model::Media::Qr;
        qr.card_tx_counter = None;
        records.push(qr);
        let station = Ident::new("xian_rd").unwrap();
        let rep = report(Some(&key), [(&station, records.as_slice())]);
        assert_eq!(rep.totals, TacCounts { verified: 2, mismatched: 1, missing: 1, unchecked: 0 });
        assert_eq!(rep.gates.len(), 2);
        assert_eq!(rep.gates[0].counts, TacCounts { verified: 1, mismatched: 1, ..TacCounts::default() });
        assert_eq!(rep.gates[1].counts, TacCounts { verified: 1, missing: 1, ..TacCounts::default() });
        assert_eq!((rep.psams[0].psam, rep.psams[0].counts.mismatched), (1, 1));
        assert_eq!(rep.mismatches.len(), 1);
        assert_eq!((rep.mismatches[0].gate_seq, rep.mismatches[0].ledger_index), (2, 2));
        // Without the key every present TAC is unchecked, none verified.
        let rep = report(None, [(&station, records.as_slice())]);
        assert_eq!(rep.totals, TacCounts { verified: 0, mismatched: 0, missing: 1, unchecked: 3 });
        // A TAC on a record that is no debit is a mismatch.
        let mut odd = records[4].clone();
        odd.tac = Some(TacRef { psam: 1, psam_seq: 9, tac: [0; 8] });
        assert_eq!(check(Some(&key), &odd), Outcome::Mismatched);
    }
}
