//! Integration tests of the gate agent: one test binary, a module per area, real sockets on
//! loopback, ports chosen at run time, an embedded broker, the PLC simulator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod alerts;
mod bank;
mod clock;
mod disk;
mod faults;
mod forged;
mod harness;
mod packages;
mod passage;
mod plc;
mod powercut;
mod process;
mod psam;
mod reconnect;
mod taps;
mod tls;
mod upload;
