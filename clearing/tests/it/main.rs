//! Integration tests of the clearing server: the real server on 127.0.0.1:0, in a temp dir,
//! driven through the typed client and raw HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bank;
mod common;
mod feed;
mod journeys;
mod powercut;
mod robustness;
mod tac;
mod upload;
