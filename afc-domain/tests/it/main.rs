//! Integration tests of the AFC domain library: one test binary, a module per area.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod decisions;
mod fares;
mod guard;
mod ledger;
mod packages;
mod qr;
mod signed;
mod wire;
