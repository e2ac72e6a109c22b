//! Running the server: open the state, serve HTTP on an already-bound listener, stop on a token.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::{App, HttpServer};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::ServerError;
use crate::http;
use crate::state::ClearingState;

/// Opens the stored stations under `config.data_dir` and serves on `listener` (tests bind port 0)
/// until `shutdown` is cancelled.
///
/// Shutdown order: 1. stop accepting connections and finish requests in flight (5 s at most);
/// 2. drop the state (every acknowledged batch is already fsynced, so there is nothing to flush).
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

    tokio::select! {
        _ = shutdown.cancelled() => {
            tracing::info!("shutdown 1/2: stopping the HTTP listener");
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
            return Err(err);
        }
    }
    tracing::info!("shutdown 2/2: closing station storage");
    drop(state);
    tracing::info!("shutdown complete");
    Ok(())
}
