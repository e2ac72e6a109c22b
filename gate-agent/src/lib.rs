//! The gate agent: one per gate (ticket barrier).
//!
//! - [`hardware`]: the PLC register map (SPEC §6) and hardware profiles.
//! - [`plc`]: the Modbus task that owns the PLC connection; commands, polling, alarms.
//! - [`plc_sim`]: a simulated gate PLC (Modbus TCP server) with fault injection.
//! - [`store`]: the durable outbox (gate_seq, records until acked) and parameter packages (sled).
//! - [`metrics`]: Prometheus series and the `/metrics` + `/healthz` listener.

pub mod hardware;
pub mod metrics;
pub mod plc;
pub mod plc_sim;
pub mod store;
