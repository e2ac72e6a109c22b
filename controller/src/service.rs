//! Running a node: the HTTP listener, the background tasks, and shutdown in a fixed, logged order.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer};
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::clearing_sync;
use crate::clock::now;
use crate::config::Config;
use crate::gate_view::{GateView, NoGateView};
use crate::http;
use crate::leader;
use crate::metrics::ControllerMetrics;
use crate::node::{Node, NodeError};
use crate::state::{Request, Response};

/// Starts the node on an already-bound listener (tests bind port 0) and runs until `shutdown`.
/// The API listener, if `api.listen` is set, is bound here.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let api = match config.api.listen {
        Some(addr) => Some(TcpListener::bind(addr)?),
        None => None,
    };
    run_with_api(config, listener, api, shutdown).await
}

/// [`run`] with the operations API on an already-bound listener (or none).
///
/// Shutdown order: 1. stop accepting HTTP (API, then Raft/admin) and finish requests in flight;
/// 2. stop background tasks; 3. stop Raft (no more appends or applies); 4. flush storage.
pub async fn run_with_api(
    config: Config,
    listener: TcpListener,
    api_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let config = Arc::new(config);
    let node = Node::start(config.clone()).await?;
    tracing::info!(node_id = node.id, addr = %listener.local_addr()?, station = %config.station, "controller node started");

    // TLS material is read once here (the config check already parsed it).
    let tls = |on: bool| -> Result<Option<rustls::ServerConfig>, NodeError> {
        match &config.tls {
            Some(t) if on => crate::tls::server_config(&t.cert_file, &t.key_file)
                .map(Some)
                .map_err(|e| NodeError::Config(crate::config::ConfigError::Invalid(format!("tls: {e}")))),
            _ => Ok(None),
        }
    };
    // The Raft/admin listener: with `tls.require_client_cert`, mutual TLS (station CA).
    let peer_tls = match config.tls.as_ref().filter(|t| t.peers) {
        Some(t) => Some(
            t.peer_server_config()
                .map_err(|e| NodeError::Config(crate::config::ConfigError::Invalid(format!("tls: {e}"))))?,
        ),
        None => None,
    };
    let api_tls = tls(config.tls.as_ref().is_some_and(|t| t.api))?;

    // One registry for the values only running tasks know (ledger append latency, tx ingested).
    let metrics = Arc::new(ControllerMetrics::default());
    // The leader's MQTT duties: the API reads gates (and sends commands) through this handle.
    // They take the station key from the node's secrets (read in `Node::start`): a node that
    // cannot sign does not start.
    let duties = config
        .mqtt
        .as_ref()
        .map(|m| leader::Duties::new(node.clone(), m.clone(), metrics.clone()))
        .transpose()?;

    let routes = http::configure(node.clone(), duties.clone());
    let server = HttpServer::new(move || App::new().configure(routes.clone()))
        .on_connect(http::on_connect)
        .workers(2)
        .disable_signals()
        .shutdown_timeout(5);
    let server = match peer_tls {
        Some(t) => server.listen_rustls_0_23(listener, t)?,
        None => server.listen(listener)?,
    }
    .run();
    let server_handle = server.handle();
    let server_task = tokio::spawn(server);

    let gate_view: Arc<dyn GateView> = match &duties {
        Some(d) => d.clone(),
        None => Arc::new(NoGateView),
    };

    let tasks = CancellationToken::new();
    // `clearing.status` is what the HTTP API's clearing view and /metrics read.
    let clearing = match clearing_sync::start(node.clone(), tasks.clone()) {
        Ok(c) => c,
        Err(e) => {
            tasks.cancel();
            server_handle.stop(true).await;
            return Err(e.into());
        }
    };
    let pruner = tokio::spawn(prune_task(node.clone(), tasks.clone()));

    let api_server = match api_listener {
        Some(l) => {
            let state = ApiState::new(node.clone(), gate_view.clone(), metrics.clone())?
                .with_duties(duties.clone())
                .with_clearing(clearing.status.clone());
            tracing::info!(addr = %l.local_addr()?, tls = api_tls.is_some(), "operations API listening");
            let routes = api::configure(Arc::new(state));
            let server = HttpServer::new(move || App::new().configure(routes.clone()))
                .workers(2)
                .disable_signals()
                .shutdown_timeout(5);
            let server = match api_tls {
                Some(t) => server.listen_rustls_0_23(l, t)?,
                None => server.listen(l)?,
            }
            .run();
            Some((server.handle(), tokio::spawn(server)))
        }
        None => None,
    };

    let feed = match crate::params_feed::start(node.clone(), tasks.clone()) {
        Ok(f) => f,
        Err(e) => {
            tasks.cancel();
            server_handle.stop(true).await;
            return Err(e.into());
        }
    };

    let leader_duties = match (&config.mqtt, duties) {
        (Some(mqtt), Some(duties)) => {
            if mqtt.broker == crate::config::BrokerMode::Embedded {
                leader::broker::start(mqtt.embedded_listen, mqtt.max_packet_bytes, &mqtt.embedded_clients())
                    .map_err(|e| NodeError::Io(std::io::Error::other(e.to_string())))?;
            }
            Some((duties.clone(), leader::spawn(duties, tasks.clone())))
        }
        _ => None,
    };

    // Raft is up and every listener serves: systemd's `Type=notify` start ends here (a no-op
    // without systemd). Not gated on a leader: a node waiting for its peers is running.
    afc_process::systemd::ready("controller node serving: raft, peer and API listeners up");

    // Runs until asked to stop, or until Raft stops on a fatal error (a storage write failed: disk
    // full, filesystem read-only). Such a node can take part in nothing any more, so it stays up
    // `raft.fatal_exit_delay_ms` answering /readyz 503 and /metrics with the reason, then shuts
    // down and exits non-zero for its supervisor to restart it from what its disk holds.
    let fatal = tokio::select! {
        _ = shutdown.cancelled() => None,
        f = raft_fatal(&node) => Some(f),
    };
    if let Some(f) = &fatal {
        let delay = Duration::from_millis(config.raft.fatal_exit_delay_ms);
        tracing::error!(reason = f.reason, error = %f.error, exit_in = ?delay,
            "raft stopped on a fatal error: not ready; exiting for the supervisor to restart this node");
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
    tracing::info!("shutdown 1/4: stopping the HTTP listeners");
    if let Some((handle, task)) = api_server {
        handle.stop(true).await;
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "API server task ended abnormally");
        }
    }
    server_handle.stop(true).await;
    if let Err(e) = server_task.await {
        tracing::warn!(error = %e, "HTTP server task ended abnormally");
    }
    tracing::info!("shutdown 2/4: stopping background tasks");
    tasks.cancel();
    if let Err(e) = pruner.await {
        tracing::warn!(error = %e, "pruner task ended abnormally");
    }
    if let Some(task) = feed {
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "params-feed task ended abnormally");
        }
    }
    if let Some(task) = clearing.task {
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "clearing-sync task ended abnormally");
        }
    }
    if let Some((_, handle)) = leader_duties {
        if let Err(e) = handle.await {
            tracing::warn!(error = %e, "leader duties ended abnormally");
        }
    }
    tracing::info!("shutdown 3/4: stopping raft");
    if let Err(e) = node.raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown reported an error");
    }
    tracing::info!("shutdown 4/4: flushing storage");
    let flushed = node.sm.flush().await;
    if let Some(f) = fatal {
        if let Err(e) = flushed {
            tracing::warn!(error = %e, "storage flush after the fatal error failed too");
        }
        tracing::info!("shutdown complete; exiting with an error");
        // Not dropped: the last handle on sled's database would run its `Drop`, which syncs the
        // data file and unwraps the result; on a disk that failed (an ext4 gone read-only
        // answers EROFS) that panics, and the panic hook aborts (SIGABRT, a backtrace in the
        // log) instead of this exit 1. sled itself skips that sync after an I/O error it saw;
        // this one it did not see (a sync of ours failed). Nothing more can reach the disk.
        std::mem::forget(node);
        return Err(NodeError::Raft(format!("raft stopped ({}): {}", f.reason, f.error)));
    }
    flushed?;
    tracing::info!("shutdown complete");
    Ok(())
}

/// Resolves once Raft has stopped on a fatal error ([`Node::fatal`]); never on a healthy node.
async fn raft_fatal(node: &Node) -> crate::node::RaftFatal {
    let mut metrics = node.raft.metrics();
    loop {
        if let Some(f) = node.fatal() {
            return f;
        }
        if metrics.changed().await.is_err() {
            // The core is gone without a last word: report what it left, or wait for shutdown.
            if let Some(f) = node.fatal() {
                return f;
            }
            std::future::pending::<()>().await;
        }
    }
}

/// Task `ledger-pruner`: on the leader, every `prune_interval_secs`, proposes dropping records that
/// clearing acknowledged and that are older than the retention. Retries with backoff on failure.
async fn prune_task(node: Arc<Node>, stop: CancellationToken) {
    let every = Duration::from_secs(node.config.ledger.prune_interval_secs.max(1));
    let retention_days = i64::from(node.config.ledger.retention_days);
    let mut wait = every;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                tracing::info!(task = "ledger-pruner", "stopped");
                return;
            }
            _ = tokio::time::sleep(wait) => {}
        }
        if node.raft.current_leader().await != Some(node.id) {
            wait = every;
            continue;
        }
        let before = now().plus_days(-retention_days);
        match node.write(Request::Prune { before }, 0).await {
            Ok(Response::Pruned { removed, first_retained }) => {
                tracing::info!(task = "ledger-pruner", removed, first_retained, "pruned ledger");
                // A capped prune left more to do: go again soon.
                wait = if removed > 0 { Duration::from_secs(1) } else { every };
            }
            Ok(other) => {
                tracing::warn!(task = "ledger-pruner", ?other, "unexpected prune response");
                wait = every;
            }
            Err(e) => {
                wait = (wait / 2).max(Duration::from_secs(5));
                tracing::warn!(task = "ledger-pruner", error = %e, retry_in = ?wait, "prune failed");
            }
        }
    }
}
