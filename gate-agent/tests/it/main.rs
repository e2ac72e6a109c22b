//! Integration tests of the gate agent: one test binary, a module per area, real sockets on
//! loopback, ports chosen at run time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod plc;
