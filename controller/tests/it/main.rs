//! Integration tests of the controller: one binary, one module per subject.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod api;
mod broker_auth;
mod clearing_sync;
mod cluster;
mod commissioning;
mod common;
mod config;
mod console;
mod crash;
mod days;
mod disk;
mod failover;
mod forged;
mod harness;
mod mqtt;
mod openapi;
mod packages;
mod params_feed;
mod peer_flood;
mod prometheus;
mod rollout;
mod scan_limit;
mod state_machine;
mod storage_suite;
mod tls;
