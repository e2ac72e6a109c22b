//! Integration tests of the controller: one binary, one module per subject.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod cluster;
mod common;
mod config;
mod crash;
mod harness;
mod mqtt;
mod state_machine;
mod storage_suite;
