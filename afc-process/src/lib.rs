//! Process start-up shared by every service binary (controller, gate agent, simulators, clearing
//! server, the local station): logging from `RUST_LOG`, the panic policy, termination signals and
//! the tokio runtime, systemd notifications ([`systemd`]), the Prometheus registry and exposition
//! ([`metrics`]). The domain crate stays free of all of it.

pub mod metrics;
pub mod systemd;

use std::future::Future;

/// Log to stdout, filtered by `RUST_LOG` (default `default_filter`), coloured only on a terminal.
pub fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // A second call (tests running several services in one process) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .try_init();
}

/// A panic in any task leaves a half-alive service: print it, then abort, and let the supervisor
/// (systemd, the local station) restart the process from its durable state.
pub fn abort_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A token cancelled on the first SIGTERM or Ctrl-C (a service's shutdown signal). Call it
/// inside the runtime.
pub fn shutdown_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let signal = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("termination signal received");
        systemd::stopping();
        signal.cancel();
    });
    token
}

/// A service process: logging, the panic policy, then `service` on a multi-threaded runtime.
pub fn run_service<F>(default_filter: &str, service: F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    init_logging(default_filter);
    abort_on_panic();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(service)
}
