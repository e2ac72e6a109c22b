//! Durable storage of bank charges (`{data_dir}/bank/bank_charges.jsonl`): one JSON
//! [`Charge`] per line, each the acquirer's answer to one submission, appended and `fdatasync`ed
//! before anything depends on it (the deny list, the report, the next pass). `(token,
//! business_day, attempt)` is stored once, so a pass that runs again, or after a restart, finds
//! what was submitted and submits nothing twice. On open a torn last line (a cut write that was
//! never relied on) is dropped; anything else that does not parse, or a key stored twice, refuses
//! to open.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use afc_domain::bank::BankToken;
use afc_domain::model::Date;

use crate::bank::Charge;
use crate::store::{sync_dir, StoreError};

/// The charge file's name inside `{data_dir}/bank/`.
pub const CHARGES_FILE: &str = "bank_charges.jsonl";

/// Every stored charge, in the order submitted.
#[derive(Debug)]
pub struct ChargeFile {
    path: PathBuf,
    charges: Vec<Charge>,
    keys: HashSet<(BankToken, Date, u32)>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

fn key(c: &Charge) -> (BankToken, Date, u32) {
    (c.token, c.business_day, c.attempt)
}

impl ChargeFile {
    /// Opens (or starts) `dir/bank_charges.jsonl`, creating `dir` (synced into its parent).
    pub fn open(dir: &Path) -> Result<ChargeFile, StoreError> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        let path = dir.join(CHARGES_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut file = ChargeFile { path, charges: Vec::new(), keys: HashSet::new() };
        let mut good = 0usize;
        let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
        for (i, line) in lines.iter().enumerate() {
            let complete = line.ends_with(b"\n");
            match serde_json::from_slice::<Charge>(line) {
                Ok(c) if complete && !file.keys.contains(&key(&c)) => {
                    file.keys.insert(key(&c));
                    file.charges.push(c);
                    good += line.len();
                }
                _ if i + 1 == lines.len() && !complete => {
                    tracing::warn!(file = %file.path.display(), "charge file: dropping a torn last line");
                }
                _ => {
                    return Err(StoreError::Corrupt {
                        path: file.path.clone(),
                        index: file.charges.len() as u64 + 1,
                        reason: "charge line does not parse or repeats (token, day, attempt)".into(),
                    })
                }
            }
        }
        if good < text.len() {
            let f = OpenOptions::new().write(true).open(&file.path).map_err(io(&file.path))?;
            f.set_len(good as u64).map_err(io(&file.path))?;
            f.sync_data().map_err(io(&file.path))?;
        }
        Ok(file)
    }

    /// Every stored charge, in the order submitted.
    pub fn all(&self) -> &[Charge] {
        &self.charges
    }

    /// Durably appends `charges` (one write, one `fdatasync`); a key already stored is an error
    /// and nothing is written.
    pub fn append(&mut self, charges: &[Charge]) -> Result<(), StoreError> {
        if charges.is_empty() {
            return Ok(());
        }
        let mut fresh = HashSet::new();
        let mut text = Vec::new();
        for (i, c) in charges.iter().enumerate() {
            if self.keys.contains(&key(c)) || !fresh.insert(key(c)) {
                return Err(StoreError::Corrupt {
                    path: self.path.clone(),
                    index: (self.charges.len() + i) as u64 + 1,
                    reason: format!(
                        "charge {} {} attempt {} is stored already",
                        c.token, c.business_day, c.attempt
                    ),
                });
            }
            serde_json::to_writer(&mut text, c).map_err(|e| io(&self.path)(e.into()))?;
            text.push(b'\n');
        }
        let created = !self.path.exists();
        let mut f = OpenOptions::new().create(true).append(true).open(&self.path).map_err(io(&self.path))?;
        f.write_all(&text).map_err(io(&self.path))?;
        f.sync_data().map_err(io(&self.path))?;
        if created {
            if let Some(dir) = self.path.parent() {
                sync_dir(dir)?;
            }
        }
        self.keys.extend(fresh);
        self.charges.extend_from_slice(charges);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bank::ChargeResult;
    use afc_domain::model::Timestamp;

    fn charge(token: u8, attempt: u32) -> Charge {
        Charge {
            token: BankToken([token; 32]),
            business_day: Date::from_ymd(2026, 12, 2).unwrap(),
            attempt,
            journeys: 2,
            before_cap_fen: 700,
            amount_fen: 700,
            result: ChargeResult::Approved,
            at: Timestamp(1),
        }
    }

    #[test]
    fn a_charge_is_stored_once_and_a_torn_last_line_is_dropped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let bank = dir.path().join("bank");
        let mut f = ChargeFile::open(&bank).unwrap();
        f.append(&[charge(1, 1), charge(2, 1)]).unwrap();
        assert!(f.append(&[charge(3, 1), charge(1, 1)]).is_err());
        assert!(f.append(&[charge(3, 1), charge(3, 1)]).is_err());
        f.append(&[charge(1, 2)]).unwrap();
        drop(f);
        let path = bank.join(CHARGES_FILE);
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"token\":\"01");
        std::fs::write(&path, &text).unwrap();
        let f = ChargeFile::open(&bank).unwrap();
        assert_eq!(f.all(), &[charge(1, 1), charge(2, 1), charge(1, 2)]);
        assert_eq!(std::fs::read(&path).unwrap().last(), Some(&b'\n'));
    }
}
