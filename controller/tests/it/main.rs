//! Integration tests of the controller: one binary, one module per subject.

mod common;
mod state_machine;
mod storage_suite;
