//! Task `params-feed` (leader only): pulls clearing's signed parameter feed
//! (`GET {clearing}/v1/stations/{station}/params?after=`, SPEC §8), verifies every item against the
//! configured feed key, and turns a new network or fare rule into a fare table: compiled
//! ([`afc_domain::network::compile`]), signed with the station key, stored through Raft, and rolled
//! out automatically (the rollout is requested before the package is stored, as for an API upload).
//!
//! The feed cursor and the newest verified network and fare rule are replicated
//! ([`Request::FeedAdvance`]), so a new leader goes on where the last one stopped; the pair last
//! compiled is recorded after the package is stored ([`Request::FeedCompiled`]) — a leader that dies
//! in between makes the next one compile the same pair again, under a newer version. An item that
//! fails its signature, does not decode, or is of a kind this controller does not take from the
//! feed (blacklists, QR keys: their versions follow clearing's numbering, not the station's) is
//! refused, counted and logged, and the cursor moves past it.
//!
//! A `deny_list` item (bank tokens an acquirer declined, or allowed again) is replicated with the
//! cursor ([`FeedState::deny`](crate::state::FeedState)) and then published as a blacklist delta
//! of `bank` ids under the station's numbering ([`Request::FeedDenied`] records it), so a
//! declined token reaches every gate like any blacklist change; a leader that dies in between
//! leaves it to the next, which publishes it again (the same ids: a delta that changes nothing
//! new).
//!
//! What the feed stores reaches gates only through [`crate::packages::prepare`], the
//! rollout request every path builds with [`crate::packages::rollout_request`]: that is where
//! the one mass-insertion guard sits, so a blacklist taken from the feed one day would be held for
//! a second engineer like an API upload, with nothing to add here.

use std::sync::Arc;
use std::time::Duration;

use afc_domain::backoff::Backoff;
use afc_domain::blacklist::{BlacklistDelta, Entry};
use afc_domain::model::Media;
use afc_domain::model::{Ident, ParamKind, Timestamp};
use afc_domain::network::{compile, FareRule, NetworkDescription};
use afc_domain::package::BlacklistBody;
use clearing::protocol::{verify_feed_item, DenyListBody, FeedKind};
use clearing::{ClearingClient, ClientConfig};
use ed25519_dalek::VerifyingKey;
use openraft::ServerState;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::node::Node;
use crate::packages::{self, RolloutRule};
use crate::secrets::StationKey;
use crate::state::{FeedBody, Request, Response};

const TASK: &str = "params-feed";
/// Most feed items asked for at once.
const PAGE: u64 = 100;

struct Worker {
    node: Arc<Node>,
    client: ClearingClient,
    station: Ident,
    feed_key: (u32, VerifyingKey),
    signing: std::sync::Arc<StationKey>,
    every: Duration,
}

/// Why one pull or compile did not finish (logged; retried on the next poll).
#[derive(Debug, thiserror::Error)]
enum FeedTaskError {
    #[error("clearing: {0}")]
    Clearing(String),
    #[error("node: {0}")]
    Node(#[from] crate::node::NodeError),
    #[error("storage: {0}")]
    Store(#[from] crate::storage::StoreError),
    #[error("refused: {0:?}")]
    Refused(Response),
    #[error("publish: {0}")]
    Publish(#[from] crate::packages::PublishError),
}

/// Starts the task when `[clearing]` has a `url` and a `feed_key` and the API a signing key.
pub fn start(
    node: Arc<Node>,
    stop: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, ConfigError> {
    let cfg = node.config.clearing.clone();
    let (Some(url), Some(key_hex)) = (cfg.url.clone(), cfg.feed_key.clone()) else {
        tracing::info!(task = TASK, "no clearing url or feed_key: the parameter feed is not pulled");
        return Ok(None);
    };
    let key: [u8; 32] = hex::decode(key_hex.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ConfigError::Invalid("clearing.feed_key: expected 64 hex characters".into()))?;
    let key = VerifyingKey::from_bytes(&key)
        .map_err(|e| ConfigError::Invalid(format!("clearing.feed_key: {e}")))?;
    let signing = node.secrets.require_station_key(
        "clearing.feed_key needs api.signing_key_file (compiled fare tables are signed)",
    )?;
    let client_cfg = ClientConfig {
        connect_timeout: node.config.connect_timeout().max(Duration::from_secs(1)),
        request_timeout: Duration::from_millis(cfg.request_timeout_ms),
        upload_timeout: Duration::from_millis(cfg.upload_timeout_ms),
    };
    let client = ClearingClient::new(&url, &node.secrets.clearing_token()?, client_cfg)
        .map_err(|e| ConfigError::Invalid(format!("clearing.url: {e}")))?;
    let worker = Worker {
        station: node.config.station.clone(),
        node,
        client,
        feed_key: (cfg.feed_key_id, key),
        signing,
        every: Duration::from_millis(cfg.feed_poll_ms.max(50)),
    };
    Ok(Some(tokio::spawn(worker.run(stop))))
}

impl Worker {
    async fn run(self, stop: CancellationToken) {
        tracing::info!(task = TASK, "started");
        // The poll interval while pulls succeed; after a failure, a jittered backoff up to 30 s.
        let mut failing = Backoff::new(self.every, Duration::from_secs(30));
        let mut wait = self.every;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
            let leading = {
                let m = self.node.raft.metrics();
                let m = m.borrow();
                m.state == ServerState::Leader && m.current_leader == Some(self.node.id)
            };
            if !leading {
                failing.reset();
                wait = self.every;
                continue;
            }
            match self.poll().await {
                Ok(()) => {
                    failing.reset();
                    wait = self.every;
                }
                Err(e) => {
                    tracing::warn!(task = TASK, error = %e, "feed pull failed; backing off");
                    wait = failing.next_wait();
                }
            }
        }
        tracing::info!(task = TASK, "stopped");
    }

    async fn poll(&self) -> Result<(), FeedTaskError> {
        let after = self.node.sm.state()?.feed.after;
        let page = self
            .client
            .params(&self.station, after)
            .await
            .map_err(|e| FeedTaskError::Clearing(e.to_string()))?;
        let mut items: Vec<_> =
            page.items.into_iter().filter(|i| i.seq > after).take(PAGE as usize).collect();
        // Never move the cursor past a deny_list item there is no room to keep: stop the page
        // before the first one beyond the pending limit (the next poll takes it once the pending
        // ones are published).
        let mut room = crate::state::MAX_PENDING_DENY.saturating_sub(self.node.sm.state()?.feed.deny.len());
        if let Some(cut) = items.iter().position(|i| {
            if i.kind != FeedKind::DenyList {
                return false;
            }
            let full = room == 0;
            room = room.saturating_sub(1);
            full
        }) {
            items.truncate(cut);
        }
        if let Some(last) = items.last().map(|i| i.seq) {
            let (mut network, mut fare_rule, mut refused, mut deny) = (None, None, Vec::new(), Vec::new());
            for item in &items {
                let (key_id, key) = &self.feed_key;
                if let Err(e) = verify_feed_item(&self.station, item, *key_id, key) {
                    refused.push(format!("item {}: {} ({})", item.seq, e, e.code()));
                    continue;
                }
                let body = FeedBody {
                    version: item.version,
                    effective_from: item.effective_from,
                    json: item.body.get().to_owned(),
                };
                match item.kind {
                    FeedKind::Network => match serde_json::from_str::<NetworkDescription>(&body.json) {
                        Ok(_) => network = Some(body),
                        Err(e) => refused.push(format!("item {}: network does not decode: {e}", item.seq)),
                    },
                    FeedKind::FareRule => match serde_json::from_str::<FareRule>(&body.json) {
                        Ok(_) => fare_rule = Some(body),
                        Err(e) => refused.push(format!("item {}: fare rule does not decode: {e}", item.seq)),
                    },
                    FeedKind::DenyList => match serde_json::from_str::<DenyListBody>(&body.json) {
                        Ok(_) => deny.push(body),
                        Err(e) => refused.push(format!("item {}: deny list does not decode: {e}", item.seq)),
                    },
                    other => refused.push(format!(
                        "item {}: {} is not taken from the feed",
                        item.seq,
                        other.as_str()
                    )),
                }
            }
            for r in &refused {
                tracing::warn!(task = TASK, refusal = %r, "feed item refused");
            }
            let req = Request::FeedAdvance { through: last, network, fare_rule, refused, deny };
            match self.node.write(req, 0).await? {
                Response::FeedAdvanced { .. } => {}
                other => return Err(FeedTaskError::Refused(other)),
            }
        }
        self.compile_if_new().await?;
        self.deny_if_new().await
    }

    /// Publishes the pending `deny_list` items as one blacklist delta: their bank tokens, by
    /// deny key, added to or taken off the list gates hold (in feed order: a later item wins),
    /// under the station's own numbering and the one mass-insertion guard.
    async fn deny_if_new(&self) -> Result<(), FeedTaskError> {
        let state = self.node.sm.state()?;
        let Some(through) = state.feed.deny.last().map(|d| d.version) else { return Ok(()) };
        let mut change: std::collections::BTreeMap<u64, bool> = std::collections::BTreeMap::new();
        let mut effective_from = Timestamp(0);
        for d in &state.feed.deny {
            // Verified and decoded before it was replicated; a body that no longer decodes is
            // a bug, not a feed fault: it stops the publication rather than skipping tokens.
            let body: DenyListBody = serde_json::from_str(&d.json)
                .map_err(|e| FeedTaskError::Clearing(format!("deny_list v{}: {e}", d.version)))?;
            for t in &body.add {
                change.insert(t.deny_key(), true);
            }
            for t in &body.remove {
                change.insert(t.deny_key(), false);
            }
            effective_from = Timestamp(effective_from.millis().max(d.effective_from.millis()));
        }
        let kind = ParamKind::Blacklist;
        let version = packages::next_version(&state, kind, 0);
        let (add, remove): (Vec<_>, Vec<_>) = change.into_iter().partition(|(_, add)| *add);
        let entry = |(key, _): (u64, bool)| Entry::single(Media::Bank, key);
        let (added, removed) = (add.len(), remove.len());
        let delta = BlacklistDelta {
            from_version: version - 1,
            to_version: version,
            add: add.into_iter().map(entry).collect(),
            remove: remove.into_iter().map(entry).collect(),
        }
        .normalized();
        let why = format!(
            "clearing feed: deny_list through v{through} ({added} tokens denied, {removed} allowed again)"
        );
        let prepared = packages::prepare(
            &self.node,
            &self.signing,
            (kind, version, effective_from),
            BlacklistBody::Delta(delta).encode(),
            TASK,
            RolloutRule::Guarded { why: &why },
        )?;
        let held = prepared.held();
        let audit = ("parameters.blacklist", format!("blacklist v{version} from {why}"));
        let published = prepared.commit(&self.node, Some(audit)).await?;
        match published.stored {
            Response::PackageStored { .. } => {}
            other => return Err(FeedTaskError::Refused(other)),
        }
        tracing::info!(
            task = TASK,
            version,
            through,
            added,
            removed,
            held,
            "deny list published from the feed"
        );
        self.node.write(Request::FeedDenied { through, blacklist_version: version }, 0).await?;
        Ok(())
    }

    /// Compiles, stores and rolls out a fare table when the feed's pair changed.
    async fn compile_if_new(&self) -> Result<(), FeedTaskError> {
        let state = self.node.sm.state()?;
        let Some((network, rule)) = state.feed.to_compile() else { return Ok(()) };
        let (nv, rv) = (network.version, rule.version);
        let compiled = serde_json::from_str::<NetworkDescription>(&network.json)
            .map_err(|e| e.to_string())
            .and_then(|n| {
                serde_json::from_str::<FareRule>(&rule.json).map(|r| (n, r)).map_err(|e| e.to_string())
            })
            .and_then(|(n, r)| compile(&n, &r).map_err(|e| e.to_string()));
        let table = match compiled {
            Ok(t) => t,
            Err(e) => {
                // Not retried until the feed brings a new network or rule.
                tracing::warn!(task = TASK, network = nv, fare_rule = rv, error = %e, "feed pair does not compile");
                self.node
                    .write(
                        Request::FeedCompiled {
                            network_version: nv,
                            fare_rule_version: rv,
                            fare_table_version: 0,
                        },
                        0,
                    )
                    .await?;
                return Ok(());
            }
        };
        let kind = ParamKind::FareTable;
        let version = packages::next_version(&state, kind, 0);
        let effective_from = Timestamp(network.effective_from.millis().max(rule.effective_from.millis()));
        let why = format!("clearing feed: network v{nv}, fare rule v{rv}");
        let prepared = packages::prepare(
            &self.node,
            &self.signing,
            (kind, version, effective_from),
            table.encode(),
            TASK,
            RolloutRule::Report { why: &why },
        )?;
        let audit = ("parameters.fare_table", format!("fare_table v{version} from {why}"));
        let published = prepared.commit(&self.node, Some(audit)).await?;
        match published.stored {
            Response::PackageStored { .. } => {}
            other => return Err(FeedTaskError::Refused(other)),
        }
        let rollout = published.rollout.map(|r| r.map_err(|e| e.to_string()));
        tracing::info!(
            task = TASK,
            version,
            network = nv,
            fare_rule = rv,
            ?rollout,
            "fare table compiled from the feed"
        );
        self.node
            .write(
                Request::FeedCompiled {
                    network_version: nv,
                    fare_rule_version: rv,
                    fare_table_version: version,
                },
                0,
            )
            .await?;
        Ok(())
    }
}
