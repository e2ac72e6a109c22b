//! Integration tests of the controller: one binary, one module per subject.

mod common;
mod storage_suite;
