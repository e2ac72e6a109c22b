//! The station controller node: the replicated station ledger and parameter store.
//!
//! Three controller nodes per station replicate one state machine with Raft (openraft on sled), so
//! any one industrial PC can die without losing a fare. Map of the crate:
//!
//! - [`types`]: the Raft type configuration (entries carry a [`state::Request`]).
//! - [`state`]: the state machine as pure logic: ledger appends with dedup and hash chain, gate
//!   keys, packages, modes, clearing cursor, audit, prune. No I/O.
//! - [`chain`]: the ledger primitives used (hash chain, gate progress, batch signatures) from `afc_domain`.
//! - [`storage`]: the only module that touches sled: Raft log, vote, state machine, snapshot files.
//! - [`network`]: the Raft peer client over HTTP (pooled, authenticated, with timeouts).
//! - [`http`]: the Raft/admin HTTP listener (peer RPCs, membership, writes, reads, health).
//! - [`node`]: one node: store + Raft, one-time bootstrap, writes that reach the leader.
//! - [`leader`]: the leader's MQTT duties: embedded broker, tx ingest and acks, parameter and mode
//!   publishing, gate commands, the in-memory gate board, QR replay relay.
//! - [`config`]: the TOML configuration, validated once.
//! - [`secrets`]: every secret the config names (station signing key, MQTT password and
//!   `[mqtt.tls]`, clearing token), read once when the node starts; every task takes them there.
//! - [`clock`]: the one wall clock (`now`).
//! - [`metrics`]: the Prometheus registry the tasks feed and the API's `/metrics` fills.
//! - [`gate_view`]: the live gate view the API and the admin listener read (the leader fills it).
//! - [`api`]: the public operations HTTP API (`/api/v1`, `/metrics`, `/healthz`, `/readyz`,
//!   OpenAPI): bearer-token roles, audited writes through Raft, one error enum mapped to HTTP
//!   status. The outer layer: it calls inward, and nothing but [`service`] imports it.
//! - [`console`]: the maintenance console page (HTML + script built into the binary), served at `/`
//!   by the API's route table; it imports nothing of the API.
//! - [`clearing_sync`]: task `clearing-sync`: the leader uploads the ledger to central clearing from
//!   the replicated cursor, reconciles with clearing's watermark, and exposes a `ClearingStatus`.
//! - [`params_feed`]: task `params-feed`: the leader pulls clearing's signed parameter feed and
//!   turns a new network or fare rule into a fare table and its automatic rollout.
//! - [`service`]: `run(config, listener, shutdown)`, background tasks, ordered shutdown.

pub mod api;
pub mod chain;
pub mod clearing_lag;
pub mod clearing_sync;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod day;
pub mod gate_view;
pub mod group_commit;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod network;
pub mod node;
pub mod packages;
pub mod params_feed;
pub mod secrets;
pub mod service;
pub mod state;
pub mod storage;
pub mod tls;
pub mod types;
