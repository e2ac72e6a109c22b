//! Durable storage of the sequence gaps a station reported (`gaps.jsonl` in the station's
//! directory): one JSON [`SequenceGap`] per line, in id order from 1, appended and `fdatasync`ed
//! before the report is answered. On open a torn last line (a cut write that was never answered)
//! is dropped; anything else that does not parse, or ids out of order, refuses to open.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use afc_domain::ledger::SequenceGap;

use crate::protocol::GapError;
use crate::store::{sync_dir, StoreError};

/// The gap file's name inside the station directory.
pub const GAPS_FILE: &str = "gaps.jsonl";

/// One station's reported gaps.
#[derive(Debug)]
pub struct GapFile {
    path: PathBuf,
    gaps: Vec<SequenceGap>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

impl GapFile {
    /// Opens (or starts) `dir/gaps.jsonl`.
    pub fn open(dir: &Path) -> Result<GapFile, StoreError> {
        let path = dir.join(GAPS_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut gaps: Vec<SequenceGap> = Vec::new();
        let mut good = 0usize;
        let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
        for (i, line) in lines.iter().enumerate() {
            let complete = line.ends_with(b"\n");
            match serde_json::from_slice::<SequenceGap>(line) {
                Ok(g) if complete && g.id == gaps.len() as u64 + 1 => {
                    gaps.push(g);
                    good += line.len();
                }
                _ if i + 1 == lines.len() && !complete => {
                    tracing::warn!(file = %path.display(), "gap file: dropping a torn last line");
                }
                _ => {
                    return Err(StoreError::Corrupt {
                        path: path.clone(),
                        index: gaps.len() as u64 + 1,
                        reason: "gap line does not parse or is out of order".into(),
                    })
                }
            }
        }
        if good < text.len() {
            let f = OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
            f.set_len(good as u64).map_err(io(&path))?;
            f.sync_data().map_err(io(&path))?;
        }
        Ok(GapFile { path, gaps })
    }

    /// The highest id stored (0 for none).
    pub fn stored_through(&self) -> u64 {
        self.gaps.len() as u64
    }

    /// Every stored gap.
    pub fn all(&self) -> &[SequenceGap] {
        &self.gaps
    }

    /// Stores the gaps of a report that are new. Ids must run on from what is stored; a gap
    /// already stored must be sent with the same content (a resend), else nothing is stored.
    pub fn report(&mut self, gaps: &[SequenceGap]) -> Result<u64, GapReportError> {
        let mut new = Vec::new();
        for g in gaps {
            let next = self.stored_through() + new.len() as u64 + 1;
            match g.id {
                0 => return Err(GapError::ZeroId.into()),
                id if id < next && id <= self.stored_through() => {
                    if &self.gaps[(id - 1) as usize] != g {
                        return Err(GapError::Mismatch { id }.into());
                    }
                }
                id if id == next => new.push(g.clone()),
                id if id < next => {
                    if new.get((id - self.stored_through() - 1) as usize) != Some(g) {
                        return Err(GapError::Mismatch { id }.into());
                    }
                }
                _ => return Err(GapReportError::NotContiguous { expected_from: next }),
            }
        }
        if !new.is_empty() {
            let created = !self.path.exists();
            let mut f =
                OpenOptions::new().create(true).append(true).open(&self.path).map_err(io(&self.path))?;
            let mut text = Vec::new();
            for g in &new {
                serde_json::to_writer(&mut text, g).map_err(|e| io(&self.path)(e.into()))?;
                text.push(b'\n');
            }
            f.write_all(&text).map_err(io(&self.path))?;
            f.sync_data().map_err(io(&self.path))?;
            if created {
                if let Some(dir) = self.path.parent() {
                    sync_dir(dir)?;
                }
            }
            drop::<File>(f);
            self.gaps.extend(new);
        }
        Ok(self.stored_through())
    }
}

/// Why a gap report stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum GapReportError {
    #[error(transparent)]
    Gap(#[from] GapError),
    #[error("gap ids must continue from {expected_from}")]
    NotContiguous { expected_from: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use afc_domain::model::{Ident, Timestamp};

    fn gap(id: u64) -> SequenceGap {
        SequenceGap {
            id,
            gate: Ident::new("g01").unwrap(),
            installation: None,
            from_seq: id * 10,
            to_seq: id * 10 + 1,
            ledger_index: id * 100,
            noticed_at: Timestamp(1_800_000_000_000),
        }
    }

    #[test]
    fn gaps_are_stored_once_resends_are_accepted_and_a_changed_or_skipped_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = GapFile::open(dir.path()).unwrap();
        assert_eq!(f.report(&[gap(1), gap(2)]).unwrap(), 2);
        assert_eq!(f.report(&[gap(1), gap(2), gap(3)]).unwrap(), 3);
        let changed = SequenceGap { to_seq: 99, ..gap(2) };
        assert!(matches!(f.report(&[changed]), Err(GapReportError::Gap(GapError::Mismatch { id: 2 }))));
        assert!(matches!(f.report(&[gap(5)]), Err(GapReportError::NotContiguous { expected_from: 4 })));
        drop(f);
        // Reopened: the same three; a torn tail (a cut write) is dropped.
        let path = dir.path().join(GAPS_FILE);
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"id\":4,\"gate\"");
        std::fs::write(&path, &text).unwrap();
        let f = GapFile::open(dir.path()).unwrap();
        assert_eq!(f.all(), &[gap(1), gap(2), gap(3)]);
        // A damaged middle line refuses to open.
        let broken =
            String::from_utf8(std::fs::read(&path).unwrap()).unwrap().replacen("\"id\":2", "\"id\":7", 1);
        std::fs::write(&path, broken).unwrap();
        assert!(GapFile::open(dir.path()).is_err());
    }
}
