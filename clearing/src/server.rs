//! Running the server: open the state, serve HTTP on an already-bound listener, stop on a token.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::{App, HttpServer};
use afc_domain::backoff::Backoff;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::ServerError;
use crate::http;
use crate::state::ClearingState;

/// Opens the stored stations under `config.data_dir` and serves on `listener` (tests bind port 0)
/// until `shutdown` is cancelled.
///
/// Besides HTTP, one background task runs: `bank-charge`, a bank charge pass every
/// `config.bank.charge_interval` (see [`ClearingState::charge_pass`]; skipped while nothing it
/// depends on changed and nothing waits).
///
/// Shutdown order: 1. stop the charge task (a pass in progress runs to its end: its answers are
/// stored before it returns); 2. stop accepting connections and finish requests in flight (5 s at
/// most); 3. drop the state (every acknowledged batch and every charge is already fsynced, so
/// there is nothing to flush).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let workers = config.workers;
    let state = Arc::new(ClearingState::open(config)?);
    let addr = listener.local_addr()?;
    let routes = http::configure(state.clone());
    let server = HttpServer::new(move || App::new().configure(routes.clone()))
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(5)
        .listen(listener)?
        .run();
    let handle = server.handle();
    let mut server_task = tokio::spawn(server);
    tracing::info!(%addr, data_dir = %state.config().data_dir.display(), "clearing server listening");
    let charge_stop = CancellationToken::new();
    let charger = tokio::spawn(charge_task(state.clone(), charge_stop.clone()));
    let stop_charger = move || async move {
        charge_stop.cancel();
        if let Err(e) = charger.await {
            tracing::warn!(error = %e, "bank-charge task ended abnormally");
        }
    };

    tokio::select! {
        _ = shutdown.cancelled() => {
            tracing::info!("shutdown 1/3: stopping the bank-charge task");
            stop_charger().await;
            tracing::info!("shutdown 2/3: stopping the HTTP listener");
            handle.stop(true).await;
            if let Err(e) = server_task.await {
                tracing::warn!(error = %e, "HTTP server task ended abnormally");
            }
        }
        ended = &mut server_task => {
            // The server only ends by itself on an accept-loop failure.
            let err = match ended {
                Ok(Ok(())) => ServerError::Internal("the HTTP server stopped by itself".into()),
                Ok(Err(e)) => ServerError::Io(e),
                Err(e) => ServerError::Internal(format!("the HTTP server task failed: {e}")),
            };
            tracing::error!(error = %err, "HTTP server ended");
            stop_charger().await;
            return Err(err);
        }
    }
    tracing::info!("shutdown 3/3: closing station storage");
    drop(state);
    tracing::info!("shutdown complete");
    Ok(())
}

/// The `bank-charge` task: a charge pass every charge interval until `stop`. A failed pass is
/// logged and counted (`afc_clearing_bank_charge_passes_total{outcome="failed"}`) by the pass
/// itself, and retried after a backoff from 1 s up to the interval; the task never ends otherwise.
async fn charge_task(state: Arc<ClearingState>, stop: CancellationToken) {
    let interval = state.config().bank.charge_interval;
    let mut backoff = Backoff::new(std::time::Duration::from_secs(1).min(interval), interval);
    let mut wait = interval;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let pass_state = state.clone();
        let pass = tokio::task::spawn_blocking(move || pass_state.charge_pass(crate::state::now(), false));
        wait = match pass.await {
            Ok(Ok(report)) => {
                if report.submitted > 0 || report.deny_items > 0 {
                    tracing::info!(?report, "bank charge pass");
                }
                backoff.reset();
                interval
            }
            // Logged and counted by `charge_pass`.
            Ok(Err(_)) => backoff.next_wait(),
            Err(e) => {
                tracing::error!(error = %e, "bank charge pass panicked or was cancelled");
                backoff.next_wait()
            }
        };
    }
}
