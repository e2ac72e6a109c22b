//! LEB128 variable-length integers and a bounds-checked byte reader, shared by the compact binary
//! encodings (blacklist bodies, fare tables, QR codes, canonical ledger bytes).
//!
//! The reader never panics on short or hostile input: every read returns [`Truncated`] or
//! [`Overlong`] instead.

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum VarintError {
    #[error("input ends in the middle of a field")]
    Truncated,
    #[error("variable-length integer longer than 10 bytes or above u64::MAX")]
    Overlong,
}

pub use VarintError::{Overlong, Truncated};

/// Appends `v` as unsigned LEB128 (1 byte for values below 128, at most 10).
pub fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends `v` zigzag-encoded, so small negative numbers stay short.
pub fn put_i64(out: &mut Vec<u8>, v: i64) {
    put_u64(out, ((v << 1) ^ (v >> 63)) as u64);
}

/// A cursor over a byte slice with checked reads.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    pub fn u64(&mut self) -> Result<u64, VarintError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = *self.buf.get(self.pos).ok_or(Truncated)?;
            self.pos += 1;
            let part = u64::from(b & 0x7f);
            if i == 9 && part > 1 {
                return Err(Overlong);
            }
            v |= part << (7 * i);
            if b & 0x80 == 0 {
                // A zero final byte after the first is padding: `put_u64` never writes it, so
                // refusing it keeps exactly one byte form per value.
                if b == 0 && i > 0 {
                    return Err(Overlong);
                }
                return Ok(v);
            }
        }
        Err(Overlong)
    }

    pub fn i64(&mut self) -> Result<i64, VarintError> {
        let z = self.u64()?;
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    /// A varint that must fit in `u32`.
    pub fn u32(&mut self) -> Result<u32, VarintError> {
        u32::try_from(self.u64()?).map_err(|_| Overlong)
    }

    pub fn byte(&mut self) -> Result<u8, VarintError> {
        let b = *self.buf.get(self.pos).ok_or(Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], VarintError> {
        let end = self.pos.checked_add(n).ok_or(Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(Truncated)?;
        self.pos = end;
        Ok(s)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], VarintError> {
        let s = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// The rest of the input.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_round_trip_at_their_edges() {
        let values = [0u64, 1, 127, 128, 16_383, 16_384, u64::from(u32::MAX), u64::MAX];
        let mut buf = Vec::new();
        for v in values {
            put_u64(&mut buf, v);
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            put_i64(&mut buf, v);
        }
        let mut r = Reader::new(&buf);
        for v in values {
            assert_eq!(r.u64().unwrap(), v);
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(r.i64().unwrap(), v);
        }
        assert!(r.is_empty());
        assert_eq!(r.u64(), Err(Truncated));
    }

    #[test]
    fn a_padded_varint_is_refused_so_each_value_has_one_byte_form() {
        assert_eq!(Reader::new(&[0x80, 0x00]).u64(), Err(Overlong));
        assert_eq!(Reader::new(&[0x81, 0x80, 0x00]).u64(), Err(Overlong));
        assert_eq!(Reader::new(&[0x00]).u64(), Ok(0));
    }

    #[test]
    fn an_eleven_byte_varint_is_refused() {
        let buf = [0xffu8; 11];
        assert_eq!(Reader::new(&buf).u64(), Err(Overlong));
        let mut max_plus = vec![0xffu8; 9];
        max_plus.push(0x02);
        assert_eq!(Reader::new(&max_plus).u64(), Err(Overlong));
    }
}
