//! The embedded MQTT broker (rumqttd) for a one-box station and for tests.
//!
//! rumqttd's `Broker::start` blocks and runs its own threads, so it gets a dedicated OS thread named
//! `mqtt-broker`. It cannot be stopped: it ends with the process. rumqttd cannot listen on port 0,
//! so the address is fixed by the configuration (tests pick a free port first).

use std::net::SocketAddr;

/// Why the embedded broker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid broker configuration: {0}")]
    Config(String),
    #[error("cannot start the broker thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// rumqttd's configuration for one MQTT 3.1.1 listener on `listen` accepting packets up to
/// `max_payload` bytes (a 256 KiB chunk or a 1 MiB tx batch, plus headers).
pub fn config(listen: SocketAddr, max_payload: usize) -> Result<rumqttd::Config, BrokerError> {
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 1000
max_outgoing_packet_count = 1000
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "{listen}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {max_payload}
    max_inflight_count = 500
    dynamic_filters = true
"#
    );
    toml::from_str(&text).map_err(|e| BrokerError::Config(e.to_string()))
}

/// Starts the broker on its own thread. Returns once the thread runs; the caller polls the
/// listener for readiness if it needs to (clients reconnect with backoff anyway).
pub fn start(listen: SocketAddr, max_payload: usize) -> Result<(), BrokerError> {
    let config = config(listen, max_payload.max(2 * 1024 * 1024))?;
    std::thread::Builder::new().name("mqtt-broker".into()).spawn(move || {
        tracing::info!(%listen, "embedded MQTT broker starting");
        let mut broker = rumqttd::Broker::new(config);
        if let Err(e) = broker.start() {
            tracing::error!(%listen, error = %e, "embedded MQTT broker stopped");
        }
    })?;
    Ok(())
}
