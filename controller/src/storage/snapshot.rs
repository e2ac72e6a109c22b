//! The snapshot file format, written and read as a stream (a snapshot is never held whole in
//! memory).
//!
//! Layout: `AFCSNAP1`, a frame with the JSON [`SnapshotMeta`], a frame with the JSON station state,
//! then items `(key, value)` (each a frame), then an end marker (`u32::MAX`) and the sha256 of every
//! byte before it. A frame is a big-endian `u32` length and that many bytes. A reader rejects a
//! file whose checksum, magic or framing is wrong, so a torn or tampered snapshot is never
//! installed.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::StoreError;
use crate::types::SnapshotMeta;

const MAGIC: &[u8; 8] = b"AFCSNAP1";
const END: u32 = u32::MAX;
/// Largest frame accepted (a package body is the largest item).
const MAX_FRAME: u32 = 256 * 1024 * 1024;

/// One stored item: key and value.
pub type Item = (Vec<u8>, Vec<u8>);

/// Streams a snapshot into a file.
pub struct SnapshotWriter {
    w: BufWriter<File>,
    hasher: Sha256,
}

impl SnapshotWriter {
    pub fn create(path: &Path, meta: &SnapshotMeta, state_json: &[u8]) -> Result<Self, StoreError> {
        let file = File::create(path)?;
        let mut s = SnapshotWriter { w: BufWriter::with_capacity(1 << 20, file), hasher: Sha256::new() };
        s.raw(MAGIC)?;
        s.frame(&serde_json::to_vec(meta)?)?;
        s.frame(state_json)?;
        Ok(s)
    }

    fn raw(&mut self, b: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(b);
        self.w.write_all(b)?;
        Ok(())
    }

    fn frame(&mut self, b: &[u8]) -> Result<(), StoreError> {
        let len = u32::try_from(b.len())
            .ok()
            .filter(|l| *l <= MAX_FRAME)
            .ok_or_else(|| StoreError::Corrupt(format!("snapshot item of {} bytes is too large", b.len())))?;
        self.raw(&len.to_be_bytes())?;
        self.raw(b)
    }

    pub fn item(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.frame(key)?;
        self.frame(value)
    }

    /// Writes the end marker and checksum and syncs the file to disk.
    pub fn finish(mut self) -> Result<(), StoreError> {
        self.raw(&END.to_be_bytes())?;
        let sum = self.hasher.finalize_reset();
        self.w.write_all(&sum)?;
        let file = self.w.into_inner().map_err(|e| StoreError::Io(e.into_error()))?;
        file.sync_all()?;
        Ok(())
    }
}

/// Reads a snapshot file item by item; the checksum is checked when the end is reached.
pub struct SnapshotReader<R: Read> {
    r: BufReader<R>,
    hasher: Sha256,
    pub meta: SnapshotMeta,
    pub state_json: Vec<u8>,
    done: bool,
}

impl<R: Read> SnapshotReader<R> {
    pub fn open(r: R) -> Result<Self, StoreError> {
        let mut s = SnapshotReader {
            r: BufReader::with_capacity(1 << 20, r),
            hasher: Sha256::new(),
            meta: SnapshotMeta::default(),
            state_json: Vec::new(),
            done: false,
        };
        let mut magic = [0u8; 8];
        s.raw(&mut magic)?;
        if &magic != MAGIC {
            return Err(StoreError::Corrupt("not a snapshot file (bad magic)".into()));
        }
        let meta = s.frame()?.ok_or_else(|| StoreError::Corrupt("snapshot has no metadata".into()))?;
        s.meta = serde_json::from_slice(&meta)?;
        s.state_json = s.frame()?.ok_or_else(|| StoreError::Corrupt("snapshot has no state".into()))?;
        Ok(s)
    }

    fn raw(&mut self, buf: &mut [u8]) -> Result<(), StoreError> {
        self.r.read_exact(buf)?;
        self.hasher.update(&*buf);
        Ok(())
    }

    /// The next frame, or None at the end marker.
    fn frame(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        let mut len = [0u8; 4];
        self.raw(&mut len)?;
        let len = u32::from_be_bytes(len);
        if len == END {
            return Ok(None);
        }
        if len > MAX_FRAME {
            return Err(StoreError::Corrupt(format!("snapshot frame of {len} bytes")));
        }
        let mut buf = vec![0u8; len as usize];
        self.raw(&mut buf)?;
        Ok(Some(buf))
    }

    /// The next `(key, value)`, or None after the end marker and a matching checksum.
    pub fn next_item(&mut self) -> Result<Option<Item>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let Some(key) = self.frame()? else {
            self.done = true;
            let expected = self.hasher.finalize_reset();
            let mut sum = [0u8; 32];
            self.r.read_exact(&mut sum)?;
            if sum[..] != expected[..] {
                return Err(StoreError::Corrupt("snapshot checksum mismatch".into()));
            }
            return Ok(None);
        };
        let value =
            self.frame()?.ok_or_else(|| StoreError::Corrupt("snapshot item without a value".into()))?;
        Ok(Some((key, value)))
    }
}
