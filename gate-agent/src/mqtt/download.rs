//! Parameter downloads as plain state (SPEC §5): which package each kind points at and the
//! chunks of the downloads in progress. No I/O: the `mqtt-inbox` task hands it the pointers and
//! chunks it receives and does what it answers ([`Step`]): subscribe, unsubscribe, offer a
//! reassembled package, record a rejection.
//!
//! A per-gate pointer (`gates/{gate}/params/{kind}/current`) wins over the station's for its kind.
//! One download per kind at a time: a pointer to another version drops the one in progress. A
//! download that is not complete within the package timeout is rejected with `chunks_missing`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use afc_domain::model::{Ident, ParamKind};
use afc_domain::package::Reassembler;
use afc_domain::topic::filters;
use afc_domain::wire::{self, ParamPointer};

use crate::params::Rejection;

/// What the task does after a pointer, a chunk or a tick.
#[derive(Debug)]
pub enum Step {
    /// Subscribe to this filter (the chunks of a download that starts).
    Subscribe(String),
    /// Drop this subscription (a download that ended).
    Unsubscribe(String),
    /// Every chunk is in and the package has the announced length and sha256: offer it.
    Complete { kind: ParamKind, version: u64, bytes: Vec<u8> },
    /// This version is refused for good; `alarm`: raise `package_rejected` for it as well (a
    /// pointer that cannot be used is only recorded).
    Reject { kind: ParamKind, version: u64, rejection: Rejection, alarm: bool },
}

/// A package being downloaded.
#[derive(Debug)]
struct Download {
    version: u64,
    reassembler: Reassembler,
    /// The chunk subscription, dropped when the download ends.
    filter: String,
    /// When it is given up as `chunks_missing`.
    deadline: Instant,
}

/// The pointers seen and the downloads in progress of one gate.
#[derive(Debug)]
pub struct Downloads {
    station: Ident,
    /// How long a download may take (`mqtt.package_timeout_ms`).
    timeout: Duration,
    /// The station's retained pointers, by kind.
    station_ptr: BTreeMap<ParamKind, ParamPointer>,
    /// This gate's own pointers, by kind; they win over the station's.
    gate_ptr: BTreeMap<ParamKind, ParamPointer>,
    /// At most one download per kind.
    active: BTreeMap<ParamKind, Download>,
}

impl Downloads {
    pub fn new(station: Ident, timeout: Duration) -> Downloads {
        Downloads {
            station,
            timeout,
            station_ptr: BTreeMap::new(),
            gate_ptr: BTreeMap::new(),
            active: BTreeMap::new(),
        }
    }

    /// A pointer received on `params/{kind}/current` (`per_gate`: on the gate's own topic); an
    /// empty payload clears it. `wants(kind, version)`: whether the gate would take that version.
    /// `Err`: the pointer is malformed (nothing changed).
    pub fn on_pointer(
        &mut self,
        per_gate: bool,
        kind: ParamKind,
        payload: &[u8],
        wants: impl FnOnce(ParamKind, u64) -> bool,
        now: Instant,
    ) -> Result<Vec<Step>, String> {
        let map = if per_gate { &mut self.gate_ptr } else { &mut self.station_ptr };
        if payload.is_empty() {
            map.remove(&kind);
            return Ok(Vec::new());
        }
        let ptr = wire::decode::<ParamPointer>(payload).map_err(|e| e.to_string())?;
        map.insert(kind, ptr);
        let ptr = self.gate_ptr.get(&kind).or_else(|| self.station_ptr.get(&kind)).cloned();
        Ok(match ptr {
            Some(ptr) => self.start(kind, &ptr, wants, now),
            None => Vec::new(),
        })
    }

    fn start(
        &mut self,
        kind: ParamKind,
        ptr: &ParamPointer,
        wants: impl FnOnce(ParamKind, u64) -> bool,
        now: Instant,
    ) -> Vec<Step> {
        if self.active.get(&kind).is_some_and(|d| d.version == ptr.version) || !wants(kind, ptr.version) {
            return Vec::new();
        }
        let mut steps = Vec::new();
        if let Some(old) = self.active.remove(&kind) {
            steps.push(Step::Unsubscribe(old.filter));
        }
        let reassembler =
            ptr.sha256_bytes().map_err(|e| Rejection::new("bad_pointer", e.to_string())).and_then(|sha| {
                Reassembler::new(sha, ptr.size, ptr.chunks)
                    .map_err(|e| Rejection::new(e.code(), e.to_string()))
            });
        match reassembler {
            Ok(reassembler) => {
                let filter = filters::param_chunks_filter(&self.station, kind, ptr.version);
                tracing::info!(%kind, version = ptr.version, chunks = ptr.chunks, size = ptr.size, "downloading package");
                steps.push(Step::Subscribe(filter.clone()));
                self.active.insert(
                    kind,
                    Download { version: ptr.version, reassembler, filter, deadline: now + self.timeout },
                );
            }
            Err(rejection) => {
                steps.push(Step::Reject { kind, version: ptr.version, rejection, alarm: false })
            }
        }
        steps
    }

    /// A chunk received on `params/{kind}/{version}/{n}`. One of no download in progress (or of
    /// another version) changes nothing.
    pub fn on_chunk(&mut self, kind: ParamKind, version: u64, payload: &[u8]) -> Vec<Step> {
        let added = match self.active.get_mut(&kind) {
            Some(d) if d.version == version => d.reassembler.add(payload),
            _ => return Vec::new(),
        };
        match added {
            Ok(false) => Vec::new(),
            Ok(true) | Err(_) => {
                let Some(d) = self.active.remove(&kind) else { return Vec::new() };
                let outcome = match added {
                    Err(e) => Err(Rejection::new(e.code(), e.to_string())),
                    Ok(_) => d.reassembler.finish().map_err(|e| Rejection::new(e.code(), e.to_string())),
                };
                let end = match outcome {
                    Ok(bytes) => Step::Complete { kind, version: d.version, bytes },
                    Err(rejection) => Step::Reject { kind, version: d.version, rejection, alarm: true },
                };
                vec![Step::Unsubscribe(d.filter), end]
            }
        }
    }

    /// Gives up the downloads whose time is over at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Step> {
        let expired: Vec<ParamKind> =
            self.active.iter().filter(|(_, d)| d.deadline <= now).map(|(k, _)| *k).collect();
        let mut steps = Vec::new();
        for kind in expired {
            if let Some(d) = self.active.remove(&kind) {
                let missing = d.reassembler.missing();
                steps.push(Step::Unsubscribe(d.filter));
                steps.push(Step::Reject {
                    kind,
                    version: d.version,
                    rejection: Rejection::new(
                        "chunks_missing",
                        format!("{} chunks missing after {:?}", missing.len(), self.timeout),
                    ),
                    alarm: true,
                });
            }
        }
        steps
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use afc_domain::model::Timestamp;
    use afc_domain::package::{package_sha256, split, MIN_CHUNK_BYTES};

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    fn downloads() -> Downloads {
        Downloads::new(Ident::new("s1").unwrap(), TIMEOUT)
    }

    /// A package of `len` bytes cut into chunks, and the pointer that announces it.
    fn package(version: u64, len: usize) -> (Vec<u8>, Vec<Vec<u8>>, Vec<u8>) {
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let chunks = split(&bytes, MIN_CHUNK_BYTES);
        let ptr = ParamPointer {
            version,
            sha256: hex::encode(package_sha256(&bytes)),
            size: bytes.len() as u64,
            chunks: chunks.len() as u32,
            effective_from: Timestamp(0),
        };
        (bytes, chunks, wire::encode(&ptr))
    }

    fn yes(_: ParamKind, _: u64) -> bool {
        true
    }

    #[test]
    fn a_pointer_subscribes_to_its_chunks_and_the_last_chunk_completes_the_package() {
        let mut d = downloads();
        let (bytes, chunks, ptr) = package(7, 3 * MIN_CHUNK_BYTES);
        let now = Instant::now();
        let steps = d.on_pointer(false, ParamKind::Blacklist, &ptr, yes, now).unwrap();
        assert!(
            matches!(&steps[..], [Step::Subscribe(f)] if f.ends_with("/params/blacklist/7/+")),
            "{steps:?}"
        );
        let (last, rest) = chunks.split_last().unwrap();
        for c in rest.iter().rev() {
            assert!(d.on_chunk(ParamKind::Blacklist, 7, c).is_empty());
        }
        let steps = d.on_chunk(ParamKind::Blacklist, 7, last);
        match &steps[..] {
            [Step::Unsubscribe(_), Step::Complete { kind, version, bytes: got }] => {
                assert_eq!((*kind, *version), (ParamKind::Blacklist, 7));
                assert_eq!(got, &bytes);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pointer_to_the_version_in_progress_or_one_not_wanted_starts_nothing() {
        let mut d = downloads();
        let (_, _, ptr) = package(7, 100);
        let now = Instant::now();
        assert_eq!(d.on_pointer(false, ParamKind::FareTable, &ptr, yes, now).unwrap().len(), 1);
        assert!(d.on_pointer(false, ParamKind::FareTable, &ptr, yes, now).unwrap().is_empty());
        let (_, _, ptr8) = package(8, 100);
        assert!(d.on_pointer(false, ParamKind::FareTable, &ptr8, |_, _| false, now).unwrap().is_empty());
    }

    #[test]
    fn a_newer_pointer_drops_the_download_in_progress() {
        let mut d = downloads();
        let now = Instant::now();
        let (_, _, p7) = package(7, 100);
        let (_, _, p8) = package(8, 100);
        d.on_pointer(false, ParamKind::FareTable, &p7, yes, now).unwrap();
        let steps = d.on_pointer(false, ParamKind::FareTable, &p8, yes, now).unwrap();
        assert!(
            matches!(&steps[..], [Step::Unsubscribe(a), Step::Subscribe(b)] if a.contains("/7/") && b.contains("/8/")),
            "{steps:?}"
        );
    }

    #[test]
    fn the_gates_own_pointer_wins_over_the_stations() {
        let mut d = downloads();
        let now = Instant::now();
        let (_, _, gate) = package(9, 100);
        let (_, _, station) = package(3, 100);
        d.on_pointer(true, ParamKind::GateConfig, &gate, yes, now).unwrap();
        // The station's pointer changes, the gate's still names the version in progress.
        assert!(d.on_pointer(false, ParamKind::GateConfig, &station, yes, now).unwrap().is_empty());
        // Once the gate's is cleared, the next station pointer counts.
        assert!(d.on_pointer(true, ParamKind::GateConfig, b"", yes, now).unwrap().is_empty());
        let steps = d.on_pointer(false, ParamKind::GateConfig, &station, yes, now).unwrap();
        assert!(
            matches!(&steps[..], [Step::Unsubscribe(_), Step::Subscribe(f)] if f.contains("/3/")),
            "{steps:?}"
        );
    }

    #[test]
    fn a_malformed_pointer_is_an_error_and_an_unusable_one_is_rejected_without_an_alarm() {
        let mut d = downloads();
        let now = Instant::now();
        assert!(d.on_pointer(false, ParamKind::FareTable, b"{not json", yes, now).is_err());
        let bad = ParamPointer {
            version: 4,
            sha256: "zz".into(),
            size: 10,
            chunks: 1,
            effective_from: Timestamp(0),
        };
        let steps = d.on_pointer(false, ParamKind::FareTable, &wire::encode(&bad), yes, now).unwrap();
        assert!(
            matches!(&steps[..], [Step::Reject { version: 4, rejection, alarm: false, .. }] if rejection.code == "bad_pointer"),
            "{steps:?}"
        );
    }

    #[test]
    fn a_chunk_of_another_package_is_rejected_with_an_alarm() {
        let mut d = downloads();
        let now = Instant::now();
        let (_, _, ptr) = package(7, 3 * MIN_CHUNK_BYTES);
        let (_, other, _) = package(7, 2 * MIN_CHUNK_BYTES + 1);
        d.on_pointer(false, ParamKind::Blacklist, &ptr, yes, now).unwrap();
        let steps = d.on_chunk(ParamKind::Blacklist, 7, &other[0]);
        assert!(
            matches!(&steps[..], [Step::Unsubscribe(_), Step::Reject { version: 7, alarm: true, .. }]),
            "{steps:?}"
        );
        // The download has ended: later chunks change nothing.
        assert!(d.on_chunk(ParamKind::Blacklist, 7, &other[1]).is_empty());
    }

    #[test]
    fn a_chunk_of_no_download_in_progress_changes_nothing() {
        let mut d = downloads();
        let (_, chunks, _) = package(7, 100);
        assert!(d.on_chunk(ParamKind::Blacklist, 7, &chunks[0]).is_empty());
    }

    #[test]
    fn a_download_not_complete_in_time_is_rejected_as_chunks_missing() {
        let mut d = downloads();
        let now = Instant::now();
        let (_, chunks, ptr) = package(7, 3 * MIN_CHUNK_BYTES);
        d.on_pointer(false, ParamKind::Blacklist, &ptr, yes, now).unwrap();
        d.on_chunk(ParamKind::Blacklist, 7, &chunks[0]);
        assert!(d.expire(now + TIMEOUT - Duration::from_millis(1)).is_empty());
        let steps = d.expire(now + TIMEOUT);
        match &steps[..] {
            [Step::Unsubscribe(_), Step::Reject { kind, version: 7, rejection, alarm: true }] => {
                assert_eq!(*kind, ParamKind::Blacklist);
                assert_eq!(rejection.code, "chunks_missing");
                assert!(rejection.message.starts_with(&format!("{} chunks missing", chunks.len() - 1)));
            }
            other => panic!("{other:?}"),
        }
        assert!(d.expire(now + 2 * TIMEOUT).is_empty());
    }
}
