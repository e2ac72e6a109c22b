//! One station's parameter feed: signed items, persisted one file per item, appended from the
//! admin endpoint or from JSON files dropped into the feed directory.
//!
//! Storage: `{station dir}/feed/{seq:012}.json`, each `{"source": …, "item": FeedItem}`, written to
//! a temporary name, fsynced and renamed, so an item is either wholly there or absent.
//!
//! Feed directory: `{feed_dir}/{station}/*.json`, each a [`FeedSubmission`], taken in file-name
//! order the next time the station's feed is read. A file is taken once (its name is recorded as
//! the item's source); a file that does not validate is logged and skipped until it changes.
//! Writers should write under another name and rename to `*.json`.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use afc_domain::bank::BankToken;
use afc_domain::model::Ident;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::protocol::{sign_feed_item, DenyListBody, FeedError, FeedItem, FeedKind, FeedSubmission};
use crate::store::{sync_dir, StoreError};

/// An item as stored, with where it came from.
#[derive(Serialize, Deserialize)]
struct StoredItem {
    /// `"file:NAME"` for a feed-directory file, `"admin"` for the admin endpoint.
    source: String,
    item: FeedItem,
}

/// Why a feed operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FeedStoreError {
    #[error(transparent)]
    Feed(#[from] FeedError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The signed feed of one station.
pub struct FeedStore {
    station: Ident,
    dir: PathBuf,
    /// Every item, `items[i].seq == i + 1`.
    items: Vec<FeedItem>,
    /// Feed-directory file names already taken.
    taken: HashSet<String>,
    /// Feed-directory files that failed, with the modification time they failed at.
    failed: HashMap<String, Option<SystemTime>>,
    /// Latest version per kind family, for the strictly-increasing rule.
    latest: HashMap<&'static str, u64>,
    /// Per token, the last `deny_list` item naming it: added (`true`) or removed, and when.
    deny_last: HashMap<BankToken, (bool, afc_domain::model::Timestamp)>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

impl FeedStore {
    /// Opens the feed stored under `station_dir`, checking that the items are numbered 1, 2, ….
    pub fn open(station: Ident, station_dir: &Path) -> Result<FeedStore, StoreError> {
        let dir = station_dir.join("feed");
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            // The items are synced in `feed/`; its own entry must survive a power cut too.
            sync_dir(station_dir)?;
        }
        let mut stored = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = entry.map_err(io_err(&dir))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read(&path).map_err(io_err(&path))?;
            let item: StoredItem = serde_json::from_slice(&text).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                index: 0,
                reason: e.to_string(),
            })?;
            stored.push(item);
        }
        stored.sort_by_key(|s| s.item.seq);
        let mut feed = FeedStore {
            station,
            dir,
            items: Vec::with_capacity(stored.len()),
            taken: HashSet::new(),
            failed: HashMap::new(),
            latest: HashMap::new(),
            deny_last: HashMap::new(),
        };
        for (i, s) in stored.into_iter().enumerate() {
            if s.item.seq != i as u64 + 1 {
                return Err(StoreError::Corrupt {
                    path: feed.dir.clone(),
                    index: s.item.seq,
                    reason: format!("feed item {} is missing", i + 1),
                });
            }
            if let Some(name) = s.source.strip_prefix("file:") {
                feed.taken.insert(name.to_owned());
            }
            feed.note_item(&s.item);
            feed.items.push(s.item);
        }
        Ok(feed)
    }

    fn note_item(&mut self, item: &FeedItem) {
        let latest = self.latest.entry(item.kind.family()).or_default();
        *latest = (*latest).max(item.version);
        if item.kind == FeedKind::DenyList {
            // Validated before it was signed, so it parses; an item that did not is no denial.
            if let Ok(body) = serde_json::from_str::<DenyListBody>(item.body.get()) {
                for t in &body.remove {
                    self.deny_last.insert(*t, (false, item.effective_from));
                }
                for t in &body.add {
                    self.deny_last.insert(*t, (true, item.effective_from));
                }
            }
        }
    }

    /// The latest version published in `kind`'s family (0: none).
    pub fn latest_version(&self, kind: FeedKind) -> u64 {
        self.latest.get(kind.family()).copied().unwrap_or(0)
    }

    /// Whether `token`, declined last at `declined_at`, must be added to this feed's deny list:
    /// no item ever named it, or the last one took it off (a paid debt) before that decline.
    pub fn deny_needed(&self, token: &BankToken, declined_at: afc_domain::model::Timestamp) -> bool {
        match self.deny_last.get(token) {
            None => true,
            Some((true, _)) => false,
            Some((false, removed_at)) => declined_at > *removed_at,
        }
    }

    /// How many items the feed holds.
    pub fn len(&self) -> u64 {
        self.items.len() as u64
    }

    /// Whether the feed is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Up to `limit` items with `seq > after`.
    pub fn page(&self, after: u64, limit: usize) -> &[FeedItem] {
        let start = usize::try_from(after).unwrap_or(usize::MAX).min(self.items.len());
        let end = start.saturating_add(limit).min(self.items.len());
        &self.items[start..end]
    }

    /// Validates, signs and durably appends `submission`; returns the new item.
    pub fn publish(
        &mut self,
        submission: FeedSubmission,
        source: String,
        key: &SigningKey,
        key_id: u32,
    ) -> Result<FeedItem, FeedStoreError> {
        submission.validate()?;
        let family = submission.kind.family();
        let latest = self.latest.get(family).copied().unwrap_or(0);
        if submission.version <= latest {
            return Err(FeedError::VersionOrder { family, latest, offered: submission.version }.into());
        }
        let seq = self.len() + 1;
        let item = sign_feed_item(&self.station, seq, submission, key, key_id);
        let stored = StoredItem { source, item };
        let name = format!("{seq:012}.json");
        let tmp = self.dir.join(format!("{name}.tmp"));
        let path = self.dir.join(&name);
        let json = serde_json::to_vec(&stored).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            index: seq,
            reason: e.to_string(),
        })?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        if let Some(name) = stored.source.strip_prefix("file:") {
            self.taken.insert(name.to_owned());
        }
        self.note_item(&stored.item);
        let item = stored.item.clone();
        self.items.push(stored.item);
        Ok(item)
    }

    /// Takes the new `*.json` files of `dir` (the station's feed directory) in name order.
    /// Returns how many were published; failures are logged and remembered until the file changes.
    pub fn ingest_dir(&mut self, dir: &Path, key: &SigningKey, key_id: u32) -> usize {
        let Ok(listing) = std::fs::read_dir(dir) else { return 0 };
        let mut names: Vec<(String, Option<SystemTime>)> = listing
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let modified = e.metadata().ok().and_then(|m| m.modified().ok());
                name.ends_with(".json").then_some((name, modified))
            })
            .filter(|(name, modified)| !self.taken.contains(name) && self.failed.get(name) != Some(modified))
            .collect();
        names.sort();
        let mut published = 0;
        for (name, modified) in names {
            let path = dir.join(&name);
            let result = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice::<FeedSubmission>(&bytes).map_err(|e| e.to_string()))
                .and_then(|sub| {
                    self.publish(sub, format!("file:{name}"), key, key_id)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                });
            match result {
                Ok(()) => {
                    published += 1;
                    self.failed.remove(&name);
                    tracing::info!(station = %self.station, file = %name, seq = self.len(), "feed item published from the feed directory");
                }
                Err(error) => {
                    tracing::warn!(station = %self.station, file = %name, %error, "feed-directory file refused");
                    self.failed.insert(name, modified);
                }
            }
        }
        published
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use afc_domain::model::Timestamp;

    fn deny(feed: &mut FeedStore, version: u64, at: i64, add: &[BankToken], remove: &[BankToken]) {
        let body = crate::protocol::DenyListBody { add: add.to_vec(), remove: remove.to_vec() };
        let sub = FeedSubmission {
            kind: crate::protocol::FeedKind::DenyList,
            version,
            effective_from: Timestamp(at),
            body: serde_json::value::RawValue::from_string(serde_json::to_string(&body).unwrap()).unwrap(),
        };
        feed.publish(sub, "test".into(), &SigningKey::from_bytes(&[1; 32]), 1).unwrap();
    }

    #[test]
    fn a_token_taken_off_the_deny_list_is_denied_again_by_a_later_decline_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut feed = FeedStore::open(Ident::new("s1").unwrap(), dir.path()).unwrap();
        let t = BankToken([7; 32]);
        assert!(feed.deny_needed(&t, Timestamp(10)), "never named: deny");
        deny(&mut feed, 1, 100, &[t], &[]);
        assert!(!feed.deny_needed(&t, Timestamp(500)), "denied already");
        // The debt is paid: an operator takes it off at 1,000.
        deny(&mut feed, 2, 1_000, &[], &[t]);
        assert!(!feed.deny_needed(&t, Timestamp(500)), "the decline before the removal is settled");
        assert!(feed.deny_needed(&t, Timestamp(2_000)), "a decline after the removal denies again");
        // The state survives a reopen (it is rebuilt from the stored items).
        drop(feed);
        let feed = FeedStore::open(Ident::new("s1").unwrap(), dir.path()).unwrap();
        assert!(feed.deny_needed(&t, Timestamp(2_000)));
    }
}
