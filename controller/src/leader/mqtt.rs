//! The leader's MQTT connection: options, and the one task that owns and polls the event loop.
//!
//! Task `mqtt-eventloop` only polls: incoming publishes go to the dispatcher over an unbounded
//! channel, each ConnAck bumps a connection generation on a watch (the publisher re-subscribes and
//! re-publishes on it), and an error backs off exponentially up to `mqtt.backoff_max_ms` before
//! the next poll reconnects. Nothing it awaits can stall on other tasks.

use std::time::Duration;

use afc_domain::backoff::Backoff;
use afc_domain::topic::Topic;
use afc_domain::wire::{Offline, StationState};
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;

use super::{split_host_port, Stats};

/// Requests queued between publishers and the event loop (a full package's chunks fit).
pub const REQUEST_CAPACITY: usize = 1024;

/// Options for the leader's connection in `term`: a client id unique to this leadership, a clean
/// session, packets up to `max_packet_bytes` out and above any broker's cap in, the `state` will
/// `{online:false, leader_node, term}` sealed with the station key,
/// and TLS when `tls` is given (`[mqtt.tls]`).
pub fn options(
    cfg: &MqttConfig,
    station: &afc_domain::model::Ident,
    node_id: u64,
    term: u64,
    password: Option<String>,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    station_key: &crate::secrets::StationKey,
) -> MqttOptions {
    let (host, port) = split_host_port(&cfg.address);
    let id = format!("{}-{node_id}-{term}", cfg.client_id_prefix);
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(cfg.keep_alive_secs.max(1)));
    o.set_clean_session(true);
    // Incoming above anything a broker lets through (the embedded one: MIN_BROKER_PAYLOAD; the
    // deploy/mosquitto one: max_packet_size 1114112): an oversized message must reach the
    // handler and be refused there. Above the limit rumqttc drops the connection instead, and a
    // retained one would drop it at every reconnect, for good.
    let incoming = cfg.max_packet_bytes.max(super::broker::MIN_BROKER_PAYLOAD + 64 * 1024);
    o.set_max_packet_size(incoming, cfg.max_packet_bytes);
    o.set_request_channel_capacity(REQUEST_CAPACITY);
    // Sealed once here, like every `state` this session publishes: a gate takes no unsigned one.
    let will = StationState::Offline(Offline { leader_node: Some(node_id), term: Some(term) });
    let topic = Topic::State { station: station.clone() }.to_string();
    let will = station_key.seal(&topic, &will);
    o.set_last_will(LastWill::new(topic, will, QoS::AtLeastOnce, true));
    if let Some(user) = &cfg.username {
        o.set_credentials(user.clone(), password.unwrap_or_default());
    }
    if let Some(t) = tls {
        // The broker's certificate is checked against the host part of `mqtt.address`.
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(t)));
    }
    o
}

/// Task `mqtt-eventloop`: polls until `stop`, forwarding publishes and connection changes.
pub async fn eventloop_task(
    mut eventloop: EventLoop,
    client: AsyncClient,
    conn: watch::Sender<u64>,
    inbox: mpsc::UnboundedSender<Publish>,
    backoff_max: Duration,
    stats: std::sync::Arc<Stats>,
    stop: CancellationToken,
) {
    tracing::info!(task = "mqtt-eventloop", "started");
    let mut backoff = Backoff::new(Duration::from_millis(50), backoff_max);
    loop {
        let ev = tokio::select! {
            () = stop.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                tracing::info!(task = "mqtt-eventloop", "connected to the broker");
                stats.set_connected(true);
                conn.send_modify(|g| *g += 1);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if inbox.send(p).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if stats.connected() {
                    tracing::warn!(task = "mqtt-eventloop", error = %e, "broker connection lost");
                } else {
                    tracing::debug!(task = "mqtt-eventloop", error = %e, step = ?backoff.step(), "cannot connect");
                }
                stats.set_connected(false);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff.next_wait()) => {}
                }
            }
        }
    }
    // A clean disconnect on stepping down: the will is not sent (the next leader's state replaces ours).
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    stats.set_connected(false);
    tracing::info!(task = "mqtt-eventloop", "stopped");
}
