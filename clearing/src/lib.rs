//! The reference central clearing server (SPEC §8) and its client.
//!
//! The station controller's leader uploads its hash-chained ledger here in resumable, idempotent
//! batches, asks for the watermark after a leader change, and pulls signed parameter sets. The
//! project ships this server for its tests and demo; it holds a real clearing house's
//! obligations: every record stored exactly once, durably before it is acknowledged, and only
//! after its hash chain is verified.
//!
//! Map of the crate:
//!
//! - [`protocol`]: the wire types (batch, ack, conflict, watermark, feed items, error body), the
//!   stateless batch verification and the feed signature (`verify_feed_item` for controllers).
//! - [`accept`]: the exactly-once rules as a pure function: append, resend, conflict or fork.
//! - [`store`]: one station's ledger copy, an append-only file fsynced before every ack.
//! - [`feed`]: one station's signed parameter feed, persisted, fed by the admin endpoint or a
//!   directory of JSON files.
//! - [`journeys`]: QR and bank journeys paired per account or token and priced from each
//!   station's feed; [`bank`]: bank journeys charged once per token and business day (cap,
//!   acquirer simulation, settlement file), pure; [`charges`]: the durable charge file.
//! - [`state`]: the stations and their counters; the operations the HTTP layer calls.
//! - [`http`]: routes, token check, body limits, and the one mapping of [`ServerError`] to HTTP.
//! - [`server`]: [`server::run`] on an already-bound listener until a cancellation token fires.
//! - [`client`]: the typed async client (`upload`, `watermark`, `params`, …).
//! - [`tac`]: the PSAM TACs of stored-value debits verified with the issuer key, per gate and
//!   PSAM (`GET /v1/admin/tac`, `afc_clearing_tac_records`).
//! - [`config`], [`error`]: configuration and the server's error enum.
//! - [`testdata`]: realistic chained ledgers for tests, the benchmark and demos.

pub mod accept;
pub mod bank;
pub mod charges;
pub mod cli;
pub mod client;
pub mod config;
pub mod days;
pub mod error;
pub mod feed;
pub mod gaps;
pub mod http;
pub mod journeys;
pub mod protocol;
pub mod server;
pub mod state;
pub mod store;
pub mod tac;
pub mod testdata;

pub use client::{ClearingClient, ClearingError, ClientConfig, UploadOutcome};
pub use config::Config;
pub use error::ServerError;
pub use server::run;
