//! What the services' tests share (issue 10 item 7), each written once:
//! - [`cards`]: the stored-value card the decision and gate tests tap;
//! - [`fares`]: an independent recomputation of OD fares (Floyd–Warshall, then the bands);
//! - [`network`]: the sample one-line network A–B–C–D the fare, decision and gate tests use;
//! - [`net`]: ports for the services a test starts, never the same one twice;
//! - [`keys`]: the fixed station package-signing key, its trust set and a signed blacklist package;
//! - [`pki`]: a test CA generated at run time and the leaf certificates it signs;
//! - [`promtool`]: checks a real scrape with `promtool check metrics` and runs the shipped alert
//!   and recording rules on it.

pub mod cards;
pub mod fares;
pub mod keys;
pub mod net;
pub mod network;
pub mod pki;
pub mod promtool;
