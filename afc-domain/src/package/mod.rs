//! Signed parameter packages (SPEC §4) and their chunking for MQTT (SPEC §5).
//!
//! A package is one version of one parameter kind: a fixed-size header (kind, version,
//! `effective_from`, body length and sha256, signing key id), an ed25519 signature over a
//! domain-separated encoding of that header, and the body. Because the header holds the body's
//! hash, the signature covers the body too, and a gate can check a package it has reassembled from
//! chunks before parsing a single byte of the body.
//!
//! Byte layout of an encoded package (integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `AFCP` |
//! | 1 | format (1) |
//! | 1 | kind code ([`ParamKind::code`](crate::model::ParamKind::code)) |
//! | 8 | version |
//! | 8 | `effective_from`, ms since the epoch, signed |
//! | 8 | body length |
//! | 32 | body sha256 |
//! | 4 | key id |
//! | 64 | ed25519 signature |
//! | n | body |
//!
//! A package travels as retained MQTT messages of at most [`MAX_CHUNK_BYTES`]; [`split`] cuts
//! it into chunks that each carry a small header naming the whole package (its sha256, length and
//! chunk count), and [`Reassembler`] puts them back together in any order.
//!
//! Bodies: the blacklist has its own compact encoding ([`BlacklistBody`]); the fare table is
//! encoded by [`crate::fare`]; the small kinds (`qr_keys`, `gate_config`, `mode`) are JSON
//! ([`encode_json_body`], [`decode_json_body`]).
//!
//! The parts: `header` (the signed header, encoding, verification, trusted keys, version order),
//! `bodies` (the blacklist, `gate_config` and JSON bodies) and `chunks` (splitting and
//! reassembly).

mod bodies;
mod chunks;
mod header;

pub use bodies::{
    decode_json_body, encode_json_body, BlacklistBody, GateConfigBody, DEFAULT_RETAP_WINDOW_SECS,
};
pub use chunks::{
    split, ChunkError, ChunkHeader, Reassembler, CHUNK_HEADER_LEN, CHUNK_MAGIC, MAX_CHUNK_BYTES,
    MAX_CHUNK_PAYLOAD, MIN_CHUNK_BYTES,
};
pub use header::{
    check_version_order, package_sha256, Package, PackageError, PackageHeader, TrustedKeyError, TrustedKeys,
    MAX_PACKAGE_BYTES, PACKAGE_FORMAT, PACKAGE_HEADER_LEN, PACKAGE_MAGIC, PACKAGE_PREFIX_LEN,
};
