//! Signed parameter packages in the store: the versions held per kind, and large packages
//! uploaded as pieces (one Raft entry each) and committed whole.

use afc_domain::model::{ParamKind, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{keys, pending, LedgerRead, ReadError, Rejection, Response, StationState, Write};

/// Package versions kept per kind (the current one and the one a rollback returns to).
pub const PACKAGE_VERSIONS_KEPT: usize = 2;
/// Bytes per piece the controller cuts a package into (one Raft entry each, see
/// [`Request::PutPackagePiece`](super::Request::PutPackagePiece)): small enough that one append RPC stays well within openraft's
/// per-append deadline (one heartbeat).
pub const PACKAGE_PIECE_BYTES: usize = 128 * 1024;
/// Largest piece the state machine takes (the MQTT chunk size, SPEC §5).
pub const MAX_PACKAGE_PIECE_BYTES: usize = 256 * 1024;
/// Uploads in flight at once; starting one more drops the least recently touched.
pub const MAX_UPLOADS: usize = 4;
/// An upload not touched for this long is dropped (with its pieces) when another one starts.
pub const UPLOAD_TTL_MS: i64 = 10 * 60 * 1000;

/// The versions of one package kind held in the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageVersions {
    /// Stored versions, ascending; the last is current. At most [`PACKAGE_VERSIONS_KEPT`] after a prune.
    pub versions: Vec<u64>,
    #[serde(with = "hex::serde")]
    pub current_sha256: [u8; 32],
}

impl PackageVersions {
    pub fn current(&self) -> u64 {
        self.versions.last().copied().unwrap_or(0)
    }
}

/// A package upload in flight: its pieces are items under [`keys::piece`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    /// Pieces received (`0..pieces`).
    pub pieces: u32,
    pub bytes: u64,
    /// The proposer's time of the last piece, for expiry.
    pub touched: Timestamp,
}

impl StationState {
    pub(super) fn put_package(
        &mut self,
        kind: ParamKind,
        version: u64,
        package: &[u8],
        out: &mut Vec<Write>,
    ) -> Response {
        let held = self.packages.entry(kind.as_str().to_owned()).or_default();
        let current = held.current();
        if version <= current {
            return Response::Rejected { rejection: Rejection::StaleVersion { kind, version, current } };
        }
        let sha256: [u8; 32] = Sha256::digest(package).into();
        held.versions.push(version);
        held.current_sha256 = sha256;
        out.push(Write::Put(keys::package(kind, version).to_vec(), package.to_vec()));
        Response::PackageStored { kind, version, sha256 }
    }

    pub(super) fn put_piece(
        &mut self,
        upload: u64,
        index: u32,
        at: Timestamp,
        bytes: &[u8],
        out: &mut Vec<Write>,
    ) -> Response {
        let reject = |rejection| Response::Rejected { rejection };
        if bytes.len() > MAX_PACKAGE_PIECE_BYTES {
            return reject(Rejection::PieceTooLarge { len: bytes.len(), max: MAX_PACKAGE_PIECE_BYTES });
        }
        if !self.uploads.contains_key(&upload) {
            if index != 0 {
                return reject(Rejection::UnknownUpload { upload });
            }
            // Garbage stays bounded: expired uploads go, and the least recently touched makes room.
            let expired: Vec<u64> = self
                .uploads
                .iter()
                .filter(|(_, u)| u.touched.millis().saturating_add(UPLOAD_TTL_MS) < at.millis())
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                self.drop_upload(id, out);
            }
            while self.uploads.len() >= MAX_UPLOADS {
                let oldest = self.uploads.iter().min_by_key(|(id, u)| (u.touched, **id)).map(|(id, _)| *id);
                let Some(oldest) = oldest else { break };
                self.drop_upload(oldest, out);
            }
            self.uploads.insert(upload, Upload { pieces: 0, bytes: 0, touched: at });
        }
        let Some(u) = self.uploads.get_mut(&upload) else {
            return reject(Rejection::UnknownUpload { upload });
        };
        if index < u.pieces {
            return Response::PieceStored { upload, received: u.pieces };
        }
        if index > u.pieces {
            return reject(Rejection::PieceOutOfOrder { upload, index, expected: u.pieces });
        }
        let max = afc_domain::package::MAX_PACKAGE_BYTES;
        if u.bytes.saturating_add(bytes.len() as u64) > max {
            self.drop_upload(upload, out);
            return reject(Rejection::UploadTooLarge { upload, max });
        }
        out.push(Write::Put(keys::piece(upload, index).to_vec(), bytes.to_vec()));
        u.pieces += 1;
        u.bytes += bytes.len() as u64;
        u.touched = u.touched.max(at);
        Response::PieceStored { upload, received: u.pieces }
    }

    /// Forgets an upload and deletes its pieces.
    pub(super) fn drop_upload(&mut self, upload: u64, out: &mut Vec<Write>) {
        if let Some(u) = self.uploads.remove(&upload) {
            for i in 0..u.pieces {
                out.push(Write::Delete(keys::piece(upload, i).to_vec()));
            }
        }
    }

    pub(super) fn commit_package(
        &mut self,
        upload: u64,
        kind: ParamKind,
        version: u64,
        (want_pieces, want_size, sha256): (u32, u64, &[u8; 32]),
        items: &dyn LedgerRead,
        out: &mut Vec<Write>,
    ) -> Result<Response, ReadError> {
        let reject = |rejection| Ok(Response::Rejected { rejection });
        let Some(u) = self.uploads.get(&upload).cloned() else {
            // A commit proposed again after it was applied: the same answer, nothing changes.
            let held = self.packages.get(kind.as_str());
            if held.is_some_and(|h| h.current() == version && &h.current_sha256 == sha256) {
                return Ok(Response::PackageStored { kind, version, sha256: *sha256 });
            }
            return reject(Rejection::UnknownUpload { upload });
        };
        if u.pieces != want_pieces || u.bytes != want_size {
            self.drop_upload(upload, out);
            return reject(Rejection::UploadIncomplete {
                upload,
                pieces: u.pieces,
                size: u.bytes,
                want_pieces,
                want_size,
            });
        }
        let mut package = Vec::with_capacity(usize::try_from(u.bytes).unwrap_or(0));
        for i in 0..u.pieces {
            let key = keys::piece(upload, i);
            let piece = match pending(out, &key) {
                Some(v) => v.map(<[u8]>::to_vec),
                None => items.package_piece(upload, i)?,
            };
            let piece = piece.ok_or_else(|| {
                ReadError::Storage(format!("piece {i} of upload {upload} is missing from the store"))
            })?;
            package.extend_from_slice(&piece);
        }
        self.drop_upload(upload, out);
        let actual: [u8; 32] = Sha256::digest(&package).into();
        if &actual != sha256 {
            return reject(Rejection::UploadHashMismatch { upload });
        }
        match afc_domain::package::Package::decode(&package) {
            Ok(p) if p.header.kind == kind && p.header.version == version => {}
            Ok(p) => {
                return reject(Rejection::InvalidPackage {
                    detail: format!(
                        "it is {} version {}, the commit names {kind} version {version}",
                        p.header.kind, p.header.version
                    ),
                })
            }
            Err(e) => return reject(Rejection::InvalidPackage { detail: e.to_string() }),
        }
        Ok(self.put_package(kind, version, &package, out))
    }
}
