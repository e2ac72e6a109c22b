//! Durable storage of the business days a station closed (`days.jsonl` in the station's
//! directory): one JSON [`DayClose`] per line, appended and `fdatasync`ed before the upload is
//! answered. A day is stored once: the same close sent again (a controller that did not see the
//! answer, a new leader) is a duplicate, a different close of a stored day is refused. On open a
//! torn last line (a cut write that was never answered) is dropped; anything else that does not
//! parse, or a day stored twice, refuses to open.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::protocol::DayClose;
use crate::store::{sync_dir, StoreError};

/// The day file's name inside the station directory.
pub const DAYS_FILE: &str = "days.jsonl";

/// One station's closed days, in the order received.
#[derive(Debug)]
pub struct DayFile {
    path: PathBuf,
    days: Vec<DayClose>,
}

/// What storing a close did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DayStored {
    New,
    /// The same close was already stored.
    Duplicate,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

impl DayFile {
    /// Opens (or starts) `dir/days.jsonl`.
    pub fn open(dir: &Path) -> Result<DayFile, StoreError> {
        let path = dir.join(DAYS_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut days: Vec<DayClose> = Vec::new();
        let mut good = 0usize;
        let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
        for (i, line) in lines.iter().enumerate() {
            let complete = line.ends_with(b"\n");
            match serde_json::from_slice::<DayClose>(line) {
                Ok(d) if complete && !days.iter().any(|s| s.day == d.day) => {
                    days.push(d);
                    good += line.len();
                }
                _ if i + 1 == lines.len() && !complete => {
                    tracing::warn!(file = %path.display(), "day file: dropping a torn last line");
                }
                _ => {
                    return Err(StoreError::Corrupt {
                        path: path.clone(),
                        index: days.len() as u64 + 1,
                        reason: "day line does not parse or repeats a day".into(),
                    })
                }
            }
        }
        if good < text.len() {
            let f = OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
            f.set_len(good as u64).map_err(io(&path))?;
            f.sync_data().map_err(io(&path))?;
        }
        Ok(DayFile { path, days })
    }

    /// Every stored close, in the order received.
    pub fn all(&self) -> &[DayClose] {
        &self.days
    }

    /// Stores `close` unless its day is stored: `Ok(Duplicate)` when stored with the same
    /// content, `Err(None)` when stored with other content (nothing changes).
    pub fn store(&mut self, close: &DayClose) -> Result<DayStored, Option<StoreError>> {
        if let Some(held) = self.days.iter().find(|d| d.day == close.day) {
            return if held == close { Ok(DayStored::Duplicate) } else { Err(None) };
        }
        let created = !self.path.exists();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Some(io(&self.path)(e)))?;
        let mut text = serde_json::to_vec(close).map_err(|e| Some(io(&self.path)(e.into())))?;
        text.push(b'\n');
        f.write_all(&text).map_err(|e| Some(io(&self.path)(e)))?;
        f.sync_data().map_err(|e| Some(io(&self.path)(e)))?;
        if created {
            if let Some(dir) = self.path.parent() {
                sync_dir(dir).map_err(Some)?;
            }
        }
        self.days.push(close.clone());
        Ok(DayStored::New)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(day: &str, passages: u64) -> DayClose {
        DayClose {
            day: afc_domain::model::Date::parse(day).unwrap(),
            record: serde_json::json!({"day": day, "passages": passages}),
        }
    }

    #[test]
    fn a_day_is_stored_once_a_resend_is_a_duplicate_and_another_close_of_it_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = DayFile::open(dir.path()).unwrap();
        assert_eq!(f.store(&close("2026-12-01", 5)).unwrap(), DayStored::New);
        assert_eq!(f.store(&close("2026-12-01", 5)).unwrap(), DayStored::Duplicate);
        assert!(matches!(f.store(&close("2026-12-01", 6)), Err(None)));
        assert_eq!(f.store(&close("2026-12-02", 1)).unwrap(), DayStored::New);
        drop(f);
        let path = dir.path().join(DAYS_FILE);
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"day\":\"2026-12-03\"");
        std::fs::write(&path, &text).unwrap();
        let f = DayFile::open(dir.path()).unwrap();
        assert_eq!(f.all(), &[close("2026-12-01", 5), close("2026-12-02", 1)]);
    }
}
