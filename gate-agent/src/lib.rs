//! The gate agent: one per gate (ticket barrier). It decides every tap locally with the shared
//! decision engine, keeps every transaction in a durable outbox until the station ledger has it,
//! drives the flaps through the gate PLC over Modbus TCP, and talks to the station controllers over
//! MQTT. It keeps deciding whatever is down above it.
//!
//! Code map:
//! - [`config`]: the TOML configuration, read and validated once.
//! - [`clock`]: the one wall clock ([`clock::now`], with a test-only offset).
//! - [`gate`]: one tap from reader to flap; modes, operator commands, tx acks.
//! - [`reader`]: the card reader interface (SPEC §7), JSON lines over local TCP.
//! - [`store`]: the durable outbox (gate_seq, records until acked) and parameter slots (sled).
//! - [`params`]: parameter packages: verification, pending/active, the switch at `effective_from`.
//! - [`mqtt`]: session, birth/will, heartbeats, uploads, downloads, commands (rumqttc); its rules
//!   are plain types: [`mqtt::download`] (pointers, chunk reassembly), [`mqtt::acks`] (tx batches
//!   and their acks).
//! - [`plc`]: the Modbus task that owns the PLC connection; commands, polling; the alarm rules
//!   are the pure function [`plc::alarms::evaluate`].
//! - [`hardware`]: the PLC register map (SPEC §6) and hardware profiles.
//! - [`plc_sim`]: a simulated gate PLC (Modbus TCP server) with fault injection.
//! - [`reader_sim`]: a simulated card reader producing realistic taps.
//! - [`metrics`]: Prometheus series and the `/metrics` + `/healthz` listener.
//! - [`tasks`]: the named background tasks, joined with a deadline at shutdown.
//!
//! [`run`] wires them together; `main.rs` only parses flags, loads the configuration, binds the
//! listeners and turns signals into a cancellation. On a stop, [`Running::stop`] joins every task
//! within [`SHUTDOWN_DEADLINE`], logging any that did not stop, and only then flushes the store.

pub mod cli;
pub mod clock;
pub mod config;
pub mod gate;
pub mod hardware;
pub mod metrics;
pub mod mqtt;
pub mod network_sim;
pub mod params;
pub mod plc;
pub mod plc_sim;
pub mod reader;
pub mod reader_sim;
pub mod store;
pub mod tasks;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use afc_domain::qr::QrSkew;
use afc_domain::wire::{HardwareInfo, PlcEndpoint};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::gate::{Gate, GateParts};
use crate::metrics::Metrics;
use crate::params::{Params, ParamsError};
use crate::store::{Store, StoreError};
use crate::tasks::Tasks;

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Params(#[from] ParamsError),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
}

/// The sockets the agent serves, bound by the caller (tests bind port 0).
pub struct Listeners {
    pub reader: TcpListener,
    pub metrics: Option<TcpListener>,
}

/// How long a stopping agent waits in all for its tasks to end before it flushes the store and
/// exits anyway (systemd's stop timeout is longer: `deploy/systemd/afc-gate-agent.service`).
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

/// What a running agent exposes to its caller (tests look inside).
pub struct Running {
    pub gate: Arc<Gate>,
    pub metrics: Arc<Metrics>,
    /// The agent's tasks, taken by [`Running::stop`].
    tasks: Mutex<Tasks>,
}

impl Running {
    /// The names of the tasks still held (none after [`Running::stop`]).
    pub fn task_names(&self) -> Vec<&'static str> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).names()
    }

    /// Stops the agent once its token is cancelled: joins every task within `within` in all
    /// (those that did not stop are logged and returned), then flushes the store, so what the
    /// tasks wrote on their way out is durable too.
    pub async fn stop(&self, within: Duration) -> Result<Vec<&'static str>, StoreError> {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        tracing::info!("shutdown 1/2: joining the tasks");
        let late = tasks.join(within).await;
        if !late.is_empty() {
            tracing::warn!(?late, ?within, "tasks did not stop in time; flushing the store anyway");
        }
        tracing::info!("shutdown 2/2: flushing the store");
        self.gate.store().flush()?;
        Ok(late)
    }
}

/// Starts every task of the agent; they run until `cancel` fires.
pub async fn start(
    config: &Config,
    listeners: Listeners,
    cancel: CancellationToken,
) -> Result<Running, RunError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| RunError::DataDir { path: config.data_dir.display().to_string(), source })?;
    let metrics = Metrics::new();
    let store = Arc::new(Store::open_with(
        &config.data_dir.join("store"),
        config.outbox.max_bytes,
        config.outbox.segment_bytes,
    )?);
    let (acks_tx, acks_rx) = tokio::sync::mpsc::unbounded_channel();
    let params = Arc::new(Params::open(store.clone(), config.trusted_keys()?, metrics.clone(), acks_tx)?);
    let mut tasks = Tasks::new();
    tasks.spawn("params-persist", params::run_persist(params.clone(), cancel.clone()));
    let plc_config = config.plc_config()?;
    let unit_id = plc_config.map.unit_id;
    // Subscribed before the task runs: its first determination (offline from the start) counts.
    let (plc, plc_events, plc_task) = plc::spawn_with_events(plc_config, metrics.clone(), cancel.clone());
    tasks.push("plc", plc_task);
    let (out_tx, out_rx) = tokio::sync::mpsc::unbounded_channel();
    let gate = Arc::new(Gate::new(GateParts {
        station: config.station.clone(),
        gate: config.gate.clone(),
        station_code: config.station_code,
        store,
        params,
        plc,
        metrics: metrics.clone(),
        qr_skew: QrSkew::from_millis(config.qr.skew_ms),
        replay_capacity: config.qr.replay_capacity,
        replay_sources: config.qr.replay_sources,
        direction: config.direction,
        near_full_percent: config.outbox.near_full_percent,
        out: out_tx,
        psam_timeout: std::time::Duration::from_millis(config.psam_timeout_ms),
    }));
    let settings = mqtt::MqttSettings {
        brokers: config.mqtt.brokers.clone(),
        client_id: config.mqtt.client_id.clone().unwrap_or_else(|| config.gate.to_string()),
        credentials: match (&config.mqtt.username, config.mqtt_password()?) {
            (Some(u), Some(p)) => Some((u.clone(), p)),
            (Some(u), None) => Some((u.clone(), String::new())),
            _ => None,
        },
        keep_alive: std::time::Duration::from_secs(config.mqtt.keep_alive_secs),
        heartbeat: std::time::Duration::from_secs(config.mqtt.heartbeat_secs.max(1)),
        batch_records: config.mqtt.batch_records.max(1),
        ack_timeout: std::time::Duration::from_millis(config.mqtt.ack_timeout_ms),
        backoff_max: std::time::Duration::from_millis(config.mqtt.reconnect_backoff_max_ms),
        package_timeout: std::time::Duration::from_millis(config.mqtt.package_timeout_ms),
        tls: config.mqtt_tls()?,
        hardware: HardwareInfo {
            profile: config
                .plc
                .profile_file
                .as_ref()
                .and_then(|p| p.file_stem())
                .map_or_else(|| "default".to_owned(), |s| s.to_string_lossy().into_owned()),
            plc: PlcEndpoint { address: config.plc.address.to_string(), unit_id },
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        },
    };
    mqtt::spawn(
        settings,
        gate.clone(),
        config.signing_key()?,
        metrics.clone(),
        out_rx,
        acks_rx,
        plc_events,
        cancel.clone(),
        &mut tasks,
    );
    tasks.spawn("reader", reader::serve(listeners.reader, gate.clone(), metrics.clone(), cancel.clone()));
    if let Some(l) = listeners.metrics {
        tasks.spawn("metrics", metrics::serve(l, metrics.clone(), cancel.clone()));
    }
    let g = gate.clone();
    tasks.spawn("sync-outputs", async move { g.sync_outputs().await });
    tasks.spawn("storage-probe", storage_probe(gate.clone(), cancel.clone()));
    if let Ok(path) = std::env::var(gate::TEST_CLOCK_OFFSET_FILE_ENV) {
        tasks.spawn("test-clock", test_clock(path.into(), cancel.clone()));
    }
    tracing::info!(station = %config.station, gate = %config.gate, "gate agent started");
    Ok(Running { gate, metrics, tasks: Mutex::new(tasks) })
}

/// Task `storage-probe`: once a second, while the store is unhealthy (disk full, read-only),
/// probes it and re-opens what failed, writes what waited ([`Gate::storage_tick`]), and raises or
/// clears `storage_unavailable` (state in `afc_gate_storage_available`).
async fn storage_probe(gate: Arc<Gate>, cancel: CancellationToken) {
    tracing::info!("storage-probe task started");
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => gate.storage_tick().await,
        }
    }
    tracing::info!("storage-probe task stopped");
}

/// Tests only (task `test-clock`): re-reads the clock offset from `path` every 100 ms, so a test
/// can jump the gate's clock while it runs ([`gate::TEST_CLOCK_OFFSET_FILE_ENV`]).
async fn test_clock(path: std::path::PathBuf, cancel: CancellationToken) {
    tracing::warn!(path = %path.display(), "test-only clock offset file in use");
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {
                if let Some(ms) = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse().ok()) {
                    gate::set_test_clock_offset_ms(ms);
                }
            }
        }
    }
}

/// Runs the agent until `cancel` fires, then joins its tasks within [`SHUTDOWN_DEADLINE`] and
/// flushes the store ([`Running::stop`]).
pub async fn run(config: &Config, listeners: Listeners, cancel: CancellationToken) -> Result<(), RunError> {
    let running = start(config, listeners, cancel.clone()).await?;
    // Serving the reader port: systemd's `Type=notify` start ends here (a no-op without systemd).
    afc_process::systemd::ready("gate agent serving the reader port");
    cancel.cancelled().await;
    tracing::info!("shutting down");
    running.stop(SHUTDOWN_DEADLINE).await?;
    tracing::info!("gate agent stopped");
    Ok(())
}
