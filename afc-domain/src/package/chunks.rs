//! Chunking for MQTT: a package cut into retained messages of at most [`MAX_CHUNK_BYTES`], each
//! naming the whole package, and put back together in any order.

use thiserror::Error;

use super::header::{package_sha256, MAX_PACKAGE_BYTES};
use crate::varint::Reader;

/// The largest chunk (header included) published on `params/{kind}/{version}/{chunk}`.
pub const MAX_CHUNK_BYTES: usize = 256 * 1024;
/// The smallest chunk size [`split`] makes (header included), so a package of at most
/// [`MAX_PACKAGE_BYTES`] never needs more than about 70,000 chunks.
pub const MIN_CHUNK_BYTES: usize = 1024;
/// The chunk header: magic `AFCC`, index u32, count u32, total length u64, package sha256.
pub const CHUNK_HEADER_LEN: usize = 4 + 4 + 4 + 8 + 32;
/// The first bytes of a chunk.
pub const CHUNK_MAGIC: [u8; 4] = *b"AFCC";
/// The most package bytes one chunk carries.
pub const MAX_CHUNK_PAYLOAD: usize = MAX_CHUNK_BYTES - CHUNK_HEADER_LEN;
const MIN_CHUNK_PAYLOAD: usize = MIN_CHUNK_BYTES - CHUNK_HEADER_LEN;

/// Cuts an encoded package into chunk payloads of at most `chunk_size` bytes each, header included.
/// `chunk_size` is clamped to [`MIN_CHUNK_BYTES`]..=[`MAX_CHUNK_BYTES`]; every chunk but the last
/// carries the same number of package bytes.
pub fn split(package_bytes: &[u8], chunk_size: usize) -> Vec<Vec<u8>> {
    let payload = chunk_size.clamp(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES) - CHUNK_HEADER_LEN;
    let sha = package_sha256(package_bytes);
    let total_len = package_bytes.len() as u64;
    let pieces: Vec<&[u8]> =
        if package_bytes.is_empty() { vec![package_bytes] } else { package_bytes.chunks(payload).collect() };
    let count = pieces.len() as u32;
    pieces
        .into_iter()
        .enumerate()
        .map(|(index, piece)| {
            let header = ChunkHeader { index: index as u32, count, total_len, package_sha256: sha };
            let mut c = Vec::with_capacity(CHUNK_HEADER_LEN + piece.len());
            c.extend_from_slice(&header.to_bytes());
            c.extend_from_slice(piece);
            c
        })
        .collect()
}

/// What a chunk says about itself and the package it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Position of this chunk, from 0.
    pub index: u32,
    /// How many chunks the package has.
    pub count: u32,
    /// The whole package's length.
    pub total_len: u64,
    /// The whole package's sha256: which package this chunk is part of.
    pub package_sha256: [u8; 32],
}

impl ChunkHeader {
    /// The header's wire bytes (big-endian integers).
    pub fn to_bytes(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        b[0..4].copy_from_slice(&CHUNK_MAGIC);
        b[4..8].copy_from_slice(&self.index.to_be_bytes());
        b[8..12].copy_from_slice(&self.count.to_be_bytes());
        b[12..20].copy_from_slice(&self.total_len.to_be_bytes());
        b[20..52].copy_from_slice(&self.package_sha256);
        b
    }

    /// Splits a chunk into its header and its payload, checking only the framing.
    pub fn parse(chunk: &[u8]) -> Result<(ChunkHeader, &[u8]), ChunkError> {
        let mut r = Reader::new(chunk);
        let truncated = |_| ChunkError::Truncated { len: chunk.len() };
        let magic: [u8; 4] = r.array().map_err(truncated)?;
        if magic != CHUNK_MAGIC {
            return Err(ChunkError::BadMagic { found: magic });
        }
        let index = u32::from_be_bytes(r.array().map_err(truncated)?);
        let count = u32::from_be_bytes(r.array().map_err(truncated)?);
        let total_len = u64::from_be_bytes(r.array().map_err(truncated)?);
        let package_sha256 = r.array().map_err(truncated)?;
        Ok((ChunkHeader { index, count, total_len, package_sha256 }, r.rest()))
    }
}

/// Everything that can be wrong with a chunk or a reassembly.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChunkError {
    #[error("package of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("package is announced with 0 bytes")]
    EmptyPackage,
    #[error("{count} chunks cannot carry a package of {len} bytes")]
    CountInconsistent { len: u64, count: u32 },
    #[error("chunk of {len} bytes is shorter than its header")]
    Truncated { len: usize },
    #[error("chunk starts with {found:02x?}, not the magic \"AFCC\"")]
    BadMagic { found: [u8; 4] },
    #[error("chunk belongs to another package (sha256 {})", hex::encode(found))]
    OtherPackage { found: [u8; 32] },
    #[error("chunk index {index} is out of range for {count} chunks")]
    IndexOutOfRange { index: u32, count: u32 },
    #[error("chunk {index} says the package has {found} chunks, expected {expected}")]
    CountMismatch { index: u32, expected: u32, found: u32 },
    #[error("chunk {index} says the package has {found} bytes, expected {expected}")]
    LengthMismatch { index: u32, expected: u64, found: u64 },
    #[error("chunk {index} carries no package bytes")]
    EmptyPayload { index: u32 },
    #[error("chunk {index} carries {len} package bytes, more than the {max} a chunk may")]
    Oversized { index: u32, len: usize, max: usize },
    #[error("chunk {index} brings the package past its announced {expected} bytes")]
    TooMuchData { index: u32, expected: u64 },
    #[error("chunk {index} arrived twice with different contents")]
    ConflictingDuplicate { index: u32 },
    #[error("{} chunks missing, first {:?}", missing.len(), &missing[..missing.len().min(16)])]
    Missing { missing: Vec<u32> },
    #[error("reassembled package has {found} bytes, expected {expected}")]
    AssembledLengthMismatch { expected: u64, found: u64 },
    #[error("reassembled package's sha256 is not the announced one")]
    HashMismatch,
}

impl ChunkError {
    /// A stable snake_case name, for `params/ack` reasons and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            ChunkError::TooLarge { .. } => "chunk_package_too_large",
            ChunkError::EmptyPackage => "chunk_package_empty",
            ChunkError::CountInconsistent { .. } => "chunk_count_inconsistent",
            ChunkError::Truncated { .. } => "chunk_truncated",
            ChunkError::BadMagic { .. } => "chunk_bad_magic",
            ChunkError::OtherPackage { .. } => "chunk_other_package",
            ChunkError::IndexOutOfRange { .. } => "chunk_index_out_of_range",
            ChunkError::CountMismatch { .. } => "chunk_count_mismatch",
            ChunkError::LengthMismatch { .. } => "chunk_length_mismatch",
            ChunkError::EmptyPayload { .. } => "chunk_empty_payload",
            ChunkError::Oversized { .. } => "chunk_oversized",
            ChunkError::TooMuchData { .. } => "chunk_too_much_data",
            ChunkError::ConflictingDuplicate { .. } => "chunk_conflicting_duplicate",
            ChunkError::Missing { .. } => "chunks_missing",
            ChunkError::AssembledLengthMismatch { .. } => "chunk_assembled_length_mismatch",
            ChunkError::HashMismatch => "chunk_hash_mismatch",
        }
    }
}

/// Collects the chunks of one announced package, in any order, duplicates allowed.
///
/// Memory is bounded by the announced length (itself at most [`MAX_PACKAGE_BYTES`]) and the
/// announced count (at most one chunk per [`MIN_CHUNK_BYTES`] of payload).
#[derive(Debug)]
pub struct Reassembler {
    /// The whole package's sha256, from the `params/{kind}/current` pointer.
    expected_sha256: [u8; 32],
    /// The whole package's length, from the pointer.
    expected_len: u64,
    /// Each chunk's payload once received, by index.
    chunks: Vec<Option<Vec<u8>>>,
    /// Package bytes received so far, so a hostile sender cannot make us hold more than announced.
    received_bytes: u64,
    /// Chunks still missing.
    missing_count: usize,
}

impl Reassembler {
    /// Starts collecting a package announced with this sha256, length and chunk count.
    pub fn new(
        expected_sha256: [u8; 32],
        expected_len: u64,
        expected_chunks: u32,
    ) -> Result<Reassembler, ChunkError> {
        if expected_len > MAX_PACKAGE_BYTES {
            return Err(ChunkError::TooLarge { len: expected_len, max: MAX_PACKAGE_BYTES });
        }
        if expected_len == 0 {
            return Err(ChunkError::EmptyPackage);
        }
        // Chunks carry between MIN_CHUNK_PAYLOAD (but the last) and MAX_CHUNK_PAYLOAD bytes.
        let fewest = expected_len.div_ceil(MAX_CHUNK_PAYLOAD as u64);
        let most = expected_len.div_ceil(MIN_CHUNK_PAYLOAD as u64);
        if u64::from(expected_chunks) < fewest || u64::from(expected_chunks) > most {
            return Err(ChunkError::CountInconsistent { len: expected_len, count: expected_chunks });
        }
        let count = expected_chunks as usize;
        Ok(Reassembler {
            expected_sha256,
            expected_len,
            chunks: vec![None; count],
            received_bytes: 0,
            missing_count: count,
        })
    }

    /// Adds one chunk; `Ok(true)` once every chunk is in. A repeated identical chunk is ignored.
    pub fn add(&mut self, chunk: &[u8]) -> Result<bool, ChunkError> {
        let (h, payload) = ChunkHeader::parse(chunk)?;
        if h.package_sha256 != self.expected_sha256 {
            return Err(ChunkError::OtherPackage { found: h.package_sha256 });
        }
        let expected_count = self.chunks.len() as u32;
        if h.index >= expected_count {
            return Err(ChunkError::IndexOutOfRange { index: h.index, count: expected_count });
        }
        if h.count != expected_count {
            return Err(ChunkError::CountMismatch {
                index: h.index,
                expected: expected_count,
                found: h.count,
            });
        }
        if h.total_len != self.expected_len {
            return Err(ChunkError::LengthMismatch {
                index: h.index,
                expected: self.expected_len,
                found: h.total_len,
            });
        }
        if payload.is_empty() {
            return Err(ChunkError::EmptyPayload { index: h.index });
        }
        if payload.len() > MAX_CHUNK_PAYLOAD {
            return Err(ChunkError::Oversized { index: h.index, len: payload.len(), max: MAX_CHUNK_PAYLOAD });
        }
        let Some(slot) = self.chunks.get_mut(h.index as usize) else {
            return Err(ChunkError::IndexOutOfRange { index: h.index, count: expected_count });
        };
        match slot {
            Some(held) if held.as_slice() == payload => {}
            Some(_) => return Err(ChunkError::ConflictingDuplicate { index: h.index }),
            None => {
                let received = self.received_bytes + payload.len() as u64;
                if received > self.expected_len {
                    return Err(ChunkError::TooMuchData { index: h.index, expected: self.expected_len });
                }
                *slot = Some(payload.to_vec());
                self.received_bytes = received;
                self.missing_count -= 1;
            }
        }
        Ok(self.missing_count == 0)
    }

    /// The indices of the chunks not yet received.
    pub fn missing(&self) -> Vec<u32> {
        (0u32..).zip(&self.chunks).filter(|(_, c)| c.is_none()).map(|(i, _)| i).collect()
    }

    /// Whether every chunk is in.
    pub fn is_complete(&self) -> bool {
        self.missing_count == 0
    }

    /// The whole package, once every chunk is in and its length and sha256 are the announced ones.
    pub fn finish(self) -> Result<Vec<u8>, ChunkError> {
        if self.missing_count > 0 {
            return Err(ChunkError::Missing { missing: self.missing() });
        }
        if self.received_bytes != self.expected_len {
            return Err(ChunkError::AssembledLengthMismatch {
                expected: self.expected_len,
                found: self.received_bytes,
            });
        }
        let mut out = Vec::with_capacity(self.received_bytes as usize);
        for c in self.chunks.into_iter().flatten() {
            out.extend_from_slice(&c);
        }
        if package_sha256(&out) != self.expected_sha256 {
            return Err(ChunkError::HashMismatch);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_fit_their_size_and_reassemble_in_any_order() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let chunks = split(&bytes, 2000);
        assert_eq!(chunks.len(), 6);
        assert!(chunks.iter().all(|c| c.len() <= 2000));
        let mut r = Reassembler::new(package_sha256(&bytes), bytes.len() as u64, 6).unwrap();
        for i in [5, 0, 3, 3, 1, 4] {
            assert!(!r.add(&chunks[i]).unwrap());
        }
        assert_eq!(r.missing(), vec![2]);
        assert!(r.add(&chunks[2]).unwrap());
        assert!(r.add(&chunks[0]).unwrap());
        assert_eq!(r.finish().unwrap(), bytes);
    }

    #[test]
    fn split_clamps_the_chunk_size() {
        let bytes = vec![1u8; 5000];
        assert!(split(&bytes, 10).iter().all(|c| c.len() <= MIN_CHUNK_BYTES));
        assert_eq!(split(&bytes, 10).len(), 6);
        assert_eq!(split(&bytes, usize::MAX).len(), 1);
    }

    #[test]
    fn an_absurd_announcement_is_refused() {
        let sha = [0u8; 32];
        assert!(matches!(
            Reassembler::new(sha, MAX_PACKAGE_BYTES + 1, 300),
            Err(ChunkError::TooLarge { .. })
        ));
        assert_eq!(Reassembler::new(sha, 0, 0).unwrap_err(), ChunkError::EmptyPackage);
        assert_eq!(
            Reassembler::new(sha, 100, 0).unwrap_err(),
            ChunkError::CountInconsistent { len: 100, count: 0 }
        );
        assert_eq!(
            Reassembler::new(sha, 100, 2).unwrap_err(),
            ChunkError::CountInconsistent { len: 100, count: 2 }
        );
        assert_eq!(
            Reassembler::new(sha, MAX_PACKAGE_BYTES, u32::MAX).unwrap_err(),
            ChunkError::CountInconsistent { len: MAX_PACKAGE_BYTES, count: u32::MAX }
        );
        assert!(Reassembler::new(sha, MAX_PACKAGE_BYTES, 257).is_ok());
    }

    #[test]
    fn wrong_chunks_are_refused_distinctly() {
        let bytes = vec![3u8; 3000];
        let sha = package_sha256(&bytes);
        let chunks = split(&bytes, 1024);
        assert_eq!(chunks.len(), 4);
        let mut r = Reassembler::new(sha, 3000, 4).unwrap();
        let other = split(&[4u8; 3000], 1024);
        assert!(matches!(r.add(&other[0]), Err(ChunkError::OtherPackage { .. })));
        assert_eq!(r.add(&chunks[0][..10]), Err(ChunkError::Truncated { len: 10 }));
        let mut bad = chunks[0].clone();
        bad[0] = b'X';
        assert_eq!(r.add(&bad).unwrap_err().code(), "chunk_bad_magic");
        let with = |index: u32, count: u32, total_len: u64, payload: &[u8]| {
            let mut c = ChunkHeader { index, count, total_len, package_sha256: sha }.to_bytes().to_vec();
            c.extend_from_slice(payload);
            c
        };
        assert_eq!(r.add(&with(4, 4, 3000, b"x")), Err(ChunkError::IndexOutOfRange { index: 4, count: 4 }));
        assert_eq!(
            r.add(&with(1, 5, 3000, b"x")),
            Err(ChunkError::CountMismatch { index: 1, expected: 4, found: 5 })
        );
        assert_eq!(
            r.add(&with(1, 4, 3001, b"x")),
            Err(ChunkError::LengthMismatch { index: 1, expected: 3000, found: 3001 })
        );
        assert_eq!(r.add(&with(1, 4, 3000, b"")), Err(ChunkError::EmptyPayload { index: 1 }));
        let huge = vec![0u8; MAX_CHUNK_PAYLOAD + 1];
        assert!(matches!(r.add(&with(1, 4, 3000, &huge)), Err(ChunkError::Oversized { index: 1, .. })));
        assert!(matches!(
            r.add(&with(1, 4, 3000, &[0u8; 3001])),
            Err(ChunkError::TooMuchData { index: 1, .. })
        ));
        r.add(&chunks[1]).unwrap();
        assert_eq!(r.add(&with(1, 4, 3000, b"y")), Err(ChunkError::ConflictingDuplicate { index: 1 }));
        assert_eq!(r.missing(), vec![0, 2, 3]);
        assert_eq!(r.finish(), Err(ChunkError::Missing { missing: vec![0, 2, 3] }));
    }

    #[test]
    fn chunks_that_add_up_to_other_bytes_fail_the_final_hash() {
        let bytes = vec![3u8; 3000];
        let sha = package_sha256(&bytes);
        let mut r = Reassembler::new(sha, 3000, 2).unwrap();
        for (i, payload) in [(0u32, vec![3u8; 1500]), (1, vec![4u8; 1500])] {
            let mut c =
                ChunkHeader { index: i, count: 2, total_len: 3000, package_sha256: sha }.to_bytes().to_vec();
            c.extend_from_slice(&payload);
            r.add(&c).unwrap();
        }
        assert_eq!(r.finish(), Err(ChunkError::HashMismatch));
        let mut r = Reassembler::new(sha, 3000, 2).unwrap();
        for i in 0..2u32 {
            let mut c =
                ChunkHeader { index: i, count: 2, total_len: 3000, package_sha256: sha }.to_bytes().to_vec();
            c.extend_from_slice(&[3u8; 1000]);
            r.add(&c).unwrap();
        }
        assert_eq!(r.finish(), Err(ChunkError::AssembledLengthMismatch { expected: 3000, found: 2000 }));
    }
}
