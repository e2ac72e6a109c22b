//! The gate's MQTT side (SPEC §5): session, uploads, parameter downloads, modes and commands.
//!
//! Named tasks, each with one job:
//! - `mqtt-eventloop` owns the rumqttc `EventLoop` and only polls it: it never awaits anything that
//!   could stall polling. Incoming publishes go to `mqtt-inbox` over an unbounded channel;
//!   connection changes go out on a watch. On an error it backs off and tries the next broker.
//! - `mqtt-session` reacts to every ConnAck: renews the subscriptions, publishes the retained birth
//!   status (the will says `{online:false}`), and sends heartbeats, alarms and `params/ack`.
//!   About once a second it judges release on controller loss from the earlier of the broker
//!   connection's loss and the controllers' absence (the retained `state` saying offline, the
//!   leader's will, while the broker is up; a former leader's will of an older term is ignored).
//! - `mqtt-inbox` handles each message, persists its effect, and only then acks it (manual acks):
//!   parameter pointers and chunks, modes, commands, tx acks, used QR codes. A malformed message is
//!   counted, logged, acked and skipped.
//!
//! Signatures (`afc_domain::signed`): `mode`, `state`, `cmd`, `tx/ack` and the relayed `qr/used` must be
//! signed by a station key the gate trusts (`[trusted_keys]`, the package keys) for the exact
//! topic they arrive on; one that is not changes nothing, is counted
//! (`afc_gate_unverified_messages_total{topic,reason}`), raises the rate-limited
//! `unverified_message` alarm, and is acked (refused for good). Parameter pointers and chunks stay
//! plain (the package inside is signed). Everything the gate publishes is
//! signed with its own key (the tx batch key, key id `GATE_KEY_ID`) except the will, which is
//! fixed at connect time and says only `offline`.
//! - `mqtt-upload` sends the outbox in gate_seq order as signed batches on `gates/{gate}/tx` and
//!   waits for `tx/ack`; without an ack in time it sends again from the acknowledged point (the
//!   ledger de-duplicates on gate_seq). Records stay in the outbox, never in the client's queue.
//!
//! The rules those tasks follow are plain types with no I/O, tested on their own:
//! [`download`] holds the parameter pointers and reassembles the chunks of each download,
//! [`acks`] cuts and signs the next tx batch and keeps the batch in flight until its ack. The
//! tasks only move bytes between the `EventLoop`, the gate and those types.
//!
//! Sessions are clean: what matters survives in the gate's own storage (the outbox) or is retained
//! on the broker (pointers, chunks, mode) and comes back on re-subscription.

pub mod acks;
pub mod download;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use afc_domain::backoff::Backoff;
use afc_domain::model::{Ident, ParamKind, Timestamp};
use afc_domain::package::MAX_CHUNK_BYTES;
use afc_domain::signed::{open_station, seal, SignedError, GATE_KEY_ID};
use afc_domain::topic::{filters, Topic};
use afc_domain::wire::{
    self, AlarmKind, Command, GateBirth, GateCounters, GateStatus, HardwareInfo, Heartbeat, ModeMessage,
    ParamState, ParamsAck, QrUsedBatch, TxAck, MAX_PAYLOAD,
};
use ed25519_dalek::SigningKey;
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::split_host_port;
use crate::gate::{now, Gate, Outgoing};
use crate::metrics::Metrics;
use crate::plc::PlcEvent;
use crate::tasks::Tasks;
use download::{Downloads, Step};

/// Settings of the MQTT side.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    pub brokers: Vec<String>,
    pub client_id: String,
    pub credentials: Option<(String, String)>,
    pub keep_alive: Duration,
    pub heartbeat: Duration,
    pub batch_records: usize,
    pub ack_timeout: Duration,
    pub backoff_max: Duration,
    pub package_timeout: Duration,
    pub hardware: HardwareInfo,
    /// TLS to the brokers (`[mqtt.tls]`); `None`: plain MQTT.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Largest incoming packet. Whatever a broker delivers must be read and refused by the gate, not
/// end the connection (rumqttc drops a connection on a packet above its limit, and a retained
/// oversized `mode` would then drop it at every reconnect): so this is above what the station's
/// brokers let through (the embedded one: 2 MiB payloads; deploy/mosquitto: 1 MiB + 64 KiB
/// packets), far above the largest real message (a 256 KiB chunk, a 1 MiB payload).
pub const MAX_INCOMING_PACKET: usize = 2 * MAX_PAYLOAD + 64 * 1024;
const _: () = assert!(MAX_INCOMING_PACKET > MAX_CHUNK_BYTES + 64 * 1024);
/// Largest outgoing packet: a transaction batch of at most [`MAX_PAYLOAD`] plus headers.
pub const MAX_OUTGOING_PACKET: usize = MAX_PAYLOAD + 64 * 1024;
/// Most bytes of records per batch: their base64 in `raw` (4/3 of this, plus a few bytes a record)
/// keeps the JSON well under [`MAX_PAYLOAD`].
const BATCH_RECORD_BYTES: usize = 256 * 1024;
/// Alarms kept while the broker is unreachable.
const MAX_QUEUED_OUT: usize = 1000;

fn options(s: &MqttSettings, broker: &str, will: &[u8], will_topic: &str) -> MqttOptions {
    let (host, port) = split_host_port(broker).unwrap_or_else(|_| ("127.0.0.1".into(), 1883));
    let mut o = MqttOptions::new(s.client_id.clone(), host, port);
    o.set_keep_alive(s.keep_alive.max(Duration::from_secs(1)));
    o.set_clean_session(true);
    o.set_manual_acks(true);
    o.set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
    o.set_last_will(LastWill::new(will_topic, will.to_vec(), QoS::AtLeastOnce, true));
    if let Some((u, p)) = &s.credentials {
        o.set_credentials(u.clone(), p.clone());
    }
    if let Some(t) = &s.tls {
        // The broker's certificate is checked against the host part of `broker`.
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(t.clone())));
    }
    o
}

/// Starts every MQTT task (kept in `tasks`). `out` carries the gate's alarms and used QR codes,
/// `acks` the parameter reports.
#[allow(clippy::too_many_arguments)] // each is one independent input of the MQTT side
pub fn spawn(
    settings: MqttSettings,
    gate: Arc<Gate>,
    key: SigningKey,
    metrics: Arc<Metrics>,
    out: mpsc::UnboundedReceiver<Outgoing>,
    acks: mpsc::UnboundedReceiver<ParamsAck>,
    plc_events: tokio::sync::broadcast::Receiver<PlcEvent>,
    cancel: CancellationToken,
    tasks: &mut Tasks,
) {
    let session = hex::encode(rand::random::<[u8; 8]>());
    let status_topic =
        Topic::GateStatus { station: gate.station.clone(), gate: gate.gate.clone() }.to_string();
    let will = wire::encode(&GateStatus::Offline { session: session.clone() });
    let first = settings.brokers.first().cloned().unwrap_or_default();
    let (client, eventloop) = AsyncClient::new(options(&settings, &first, &will, &status_topic), 256);
    let (conn_tx, conn_rx) = watch::channel(0u64);
    let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
    let (subs_tx, subs_rx) = mpsc::unbounded_channel();
    let uploaded = Notify::new();
    let ctx = Arc::new(Ctx {
        settings,
        gate,
        client,
        metrics,
        session,
        conn: conn_rx,
        uploaded,
        leader_changed: Notify::new(),
        leader: std::sync::Mutex::new(None),
        controllers_offline_since: std::sync::Mutex::new(None),
        controllers_changed: Notify::new(),
        key,
    });
    tasks.spawn(
        "mqtt-eventloop",
        eventloop_task(ctx.clone(), eventloop, will, status_topic, conn_tx, inbox_tx, cancel.clone()),
    );
    tasks.spawn("mqtt-session", session_task(ctx.clone(), out, acks, plc_events, subs_rx, cancel.clone()));
    tasks.spawn("mqtt-inbox", inbox_task(ctx.clone(), inbox_rx, subs_tx, cancel.clone()));
    tasks.spawn("mqtt-upload", upload_task(ctx, cancel));
}

struct Ctx {
    settings: MqttSettings,
    gate: Arc<Gate>,
    client: AsyncClient,
    metrics: Arc<Metrics>,
    session: String,
    /// Connection generation: odd while connected (bumped on every ConnAck and every loss).
    conn: watch::Receiver<u64>,
    /// Woken when a tx/ack arrives.
    uploaded: Notify,
    /// Woken when a new leader announces itself on `state`: a batch sent to the old one may
    /// never be acknowledged, so the uploader sends again at once instead of after the timeout.
    leader_changed: Notify,
    /// `(leader_node, term, since)` of the last `state` seen (a leader restarted into the same term
    /// announces a new `since`).
    leader: std::sync::Mutex<Option<(u64, u64, Timestamp)>>,
    /// Since when the retained `state` has said the controllers are offline (the leader's will),
    /// received while connected to the broker; cleared by an online `state`. Release on
    /// controller loss counts from the earlier of this and the broker connection's loss.
    controllers_offline_since: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Woken when `controllers_offline_since` changes, so the loss is re-evaluated at once.
    controllers_changed: Notify,
    /// The gate's key: signs its tx batches and every message it publishes but the will.
    key: SigningKey,
}

impl Ctx {
    fn connected(&self) -> bool {
        *self.conn.borrow() % 2 == 1
    }

    fn topic(&self, f: impl FnOnce(Ident, Ident) -> Topic) -> String {
        f(self.gate.station.clone(), self.gate.gate.clone()).to_string()
    }

    /// `msg` signed by this gate for `topic`.
    fn seal<T: wire::WireMessage>(&self, topic: &str, msg: &T) -> Vec<u8> {
        seal(topic, msg, GATE_KEY_ID, &self.key)
    }

    async fn publish(&self, topic: String, qos: QoS, retain: bool, payload: Vec<u8>) {
        if let Err(e) = self.client.publish(topic.clone(), qos, retain, payload).await {
            tracing::warn!(%topic, error = %e, "publish failed");
        }
    }
}

async fn eventloop_task(
    ctx: Arc<Ctx>,
    mut eventloop: EventLoop,
    will: Vec<u8>,
    will_topic: String,
    conn: watch::Sender<u64>,
    inbox: mpsc::UnboundedSender<Publish>,
    cancel: CancellationToken,
) {
    tracing::info!("mqtt-eventloop task started");
    let mut backoff = Backoff::new(Duration::from_millis(100), ctx.settings.backoff_max);
    let mut broker = 0usize;
    loop {
        let ev = tokio::select! {
            () = cancel.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                tracing::info!(broker = %ctx.settings.brokers[broker], "mqtt connected");
                conn.send_modify(|g| *g = if *g % 2 == 0 { *g + 1 } else { *g + 2 });
                ctx.metrics.mqtt_connected.store(true, Ordering::Relaxed);
                ctx.gate.mqtt_connected.store(true, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = inbox.send(p);
            }
            Ok(_) => {}
            Err(e) => {
                if *conn.borrow() % 2 == 1 {
                    tracing::warn!(error = %e, "mqtt connection lost");
                    conn.send_modify(|g| *g += 1);
                } else {
                    tracing::debug!(error = %e, "mqtt connect failed");
                }
                ctx.metrics.mqtt_connected.store(false, Ordering::Relaxed);
                ctx.gate.mqtt_connected.store(false, Ordering::Relaxed);
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(backoff.next_wait()) => {}
                }
                if ctx.settings.brokers.len() > 1 {
                    broker = (broker + 1) % ctx.settings.brokers.len();
                    eventloop.mqtt_options =
                        options(&ctx.settings, &ctx.settings.brokers[broker], &will, &will_topic);
                }
            }
        }
    }
    tracing::info!("mqtt-eventloop task stopped");
}

/// Subscriptions the inbox adds and drops (chunk filters of downloads in progress).
enum SubChange {
    Add(String),
    Remove(String),
}

async fn session_task(
    ctx: Arc<Ctx>,
    mut out: mpsc::UnboundedReceiver<Outgoing>,
    mut acks: mpsc::UnboundedReceiver<ParamsAck>,
    mut plc_events: tokio::sync::broadcast::Receiver<PlcEvent>,
    mut subs: mpsc::UnboundedReceiver<SubChange>,
    cancel: CancellationToken,
) {
    tracing::info!("mqtt-session task started");
    let mut conn = ctx.conn.clone();
    let mut heartbeat = tokio::time::interval(ctx.settings.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hb_seq = 0u64;
    let mut lost_since: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
    let mut loss_tick = tokio::time::interval(Duration::from_secs(1));
    let mut extra_subs: Vec<String> = Vec::new();
    let mut queued: VecDeque<(String, Vec<u8>)> = VecDeque::new();
    let mut alarms: BTreeMap<AlarmKind, bool> = BTreeMap::new();
    let g = &ctx.gate;
    let events_topic = ctx.topic(|station, gate| Topic::GateEvents { station, gate });
    let qr_topic = ctx.topic(|station, gate| Topic::GateQrUsed { station, gate });
    let ack_topic = ctx.topic(|station, gate| Topic::GateParamsAck { station, gate });
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            changed = conn.changed() => {
                if changed.is_err() { break; }
                if !ctx.connected() { continue; }
                let mut topics = filters::gate_subscriptions(&g.station, &g.gate);
                topics.extend(extra_subs.iter().cloned());
                for t in topics {
                    if let Err(e) = ctx.client.subscribe(t.clone(), QoS::AtLeastOnce).await {
                        tracing::warn!(topic = %t, error = %e, "subscribe failed");
                    }
                }
                let birth = GateStatus::Online(GateBirth {
                    session: ctx.session.clone(),
                    versions: g.params.versions(),
                    hardware: ctx.settings.hardware.clone(),
                });
                let status = ctx.topic(|station, gate| Topic::GateStatus { station, gate });
                let payload = ctx.seal(&status, &birth);
                ctx.publish(status, QoS::AtLeastOnce, true, payload).await;
                while let Some((topic, payload)) = queued.pop_front() {
                    ctx.publish(topic, QoS::AtLeastOnce, false, payload).await;
                }
            }
            Some(change) = subs.recv() => match change {
                SubChange::Add(f) => {
                    if ctx.connected() {
                        let _ = ctx.client.subscribe(f.clone(), QoS::AtLeastOnce).await;
                    }
                    extra_subs.push(f);
                }
                SubChange::Remove(f) => {
                    extra_subs.retain(|x| *x != f);
                    if ctx.connected() {
                        let _ = ctx.client.unsubscribe(f).await;
                    }
                }
            },
            Some(o) = out.recv() => {
                let (topic, payload) = match o {
                    Outgoing::Event(e) => {
                        alarms.insert(e.kind, !e.cleared);
                        (events_topic.clone(), ctx.seal(&events_topic, &e))
                    }
                    Outgoing::QrUsed(u) => (qr_topic.clone(), ctx.seal(&qr_topic, &QrUsedBatch { entries: vec![u] })),
                };
                if ctx.connected() {
                    ctx.publish(topic, QoS::AtLeastOnce, false, payload).await;
                } else if queued.len() < MAX_QUEUED_OUT {
                    queued.push_back((topic, payload));
                }
            }
            Some(a) = acks.recv() => {
                let payload = ctx.seal(&ack_topic, &a);
                if ctx.connected() {
                    ctx.publish(ack_topic.clone(), QoS::AtLeastOnce, false, payload).await;
                } else if queued.len() < MAX_QUEUED_OUT {
                    queued.push_back((ack_topic.clone(), payload));
                }
            }
            ev = plc_events.recv() => {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "plc events lagged");
                        continue;
                    }
                    Err(_) => continue,
                };
                let (kind, cleared, detail) = match ev {
                    PlcEvent::Offline => (AlarmKind::PlcOffline, false, None),
                    PlcEvent::Online => (AlarmKind::PlcOffline, true, None),
                    PlcEvent::Tailgating(n) => (AlarmKind::Tailgating, false, Some(format!("{n} detections"))),
                    PlcEvent::ForcedPassage(a) => (AlarmKind::ForcedPassage, false, Some(a.as_str().to_owned())),
                    PlcEvent::DoorFault(on) => (AlarmKind::DoorFault, !on, None),
                    PlcEvent::EmergencyInput(on) => (AlarmKind::EmergencyInput, !on, None),
                };
                g.event(kind, cleared, detail);
            }
            _ = loss_tick.tick() => {
                if ctx.connected() {
                    lost_since = None;
                } else if lost_since.is_none() {
                    lost_since = Some(tokio::time::Instant::now());
                }
                g.controller_loss(controllers_lost_since(&ctx, lost_since).map(|t| t.elapsed())).await;
            }
            () = ctx.controllers_changed.notified() => {
                g.controller_loss(controllers_lost_since(&ctx, lost_since).map(|t| t.elapsed())).await;
            }
            _ = heartbeat.tick() => {
                if !ctx.connected() { continue; }
                hb_seq += 1;
                let inputs = g.plc().last_inputs();
                let hb = Heartbeat {
                    at: now(),
                    seq: hb_seq,
                    counters: GateCounters {
                        taps: g.taps.load(Ordering::Relaxed),
                        entries: u64::from(inputs.entries_total),
                        exits: u64::from(inputs.exits_total),
                        rejects: g.rejects.load(Ordering::Relaxed),
                        tailgating: u64::from(inputs.tailgating_total),
                        forced_passage: ctx.metrics.events("forced_passage"),
                    },
                    outbox_depth: g.store().depth(),
                    outbox_bytes: g.store().bytes(),
                    outbox_capacity_bytes: g.store().capacity(),
                    plc_online: g.plc().online(),
                    direction: g.direction(),
                    in_service: g.in_service(),
                    free_passage: g.free_passage() || inputs.emergency_input,
                    alarms: alarms.iter().filter(|(_, on)| **on).map(|(k, _)| *k).collect(),
                    versions: g.params.versions(),
                };
                let topic = ctx.topic(|station, gate| Topic::GateHeartbeat { station, gate });
                let payload = ctx.seal(&topic, &hb);
                ctx.publish(topic, QoS::AtMostOnce, false, payload).await;
            }
        }
    }
    tracing::info!("mqtt-session task stopped");
}

/// Since when the gate has had no controller: the earlier of the broker connection's loss and
/// the controllers' announced absence (`state` offline).
fn controllers_lost_since(
    ctx: &Ctx,
    broker_lost: Option<tokio::time::Instant>,
) -> Option<tokio::time::Instant> {
    let offline = *ctx.controllers_offline_since.lock().unwrap_or_else(|p| p.into_inner());
    match (broker_lost, offline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn inbox_task(
    ctx: Arc<Ctx>,
    mut inbox: mpsc::UnboundedReceiver<Publish>,
    subs: mpsc::UnboundedSender<SubChange>,
    cancel: CancellationToken,
) {
    tracing::info!("mqtt-inbox task started");
    let g = ctx.gate.clone();
    let mut downloads = Downloads::new(g.station.clone(), ctx.settings.package_timeout);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut gate_config_seen = g.params.in_force(now()).versions.gate_config;
    loop {
        let p = tokio::select! {
            () = cancel.cancelled() => break,
            p = inbox.recv() => match p { Some(p) => p, None => break },
            _ = tick.tick() => {
                let steps = downloads.expire(tokio::time::Instant::now().into_std());
                download_steps(&g, &subs, steps).await;
                // Switch any pending set whose time came, even with no tap to trigger it; a
                // gate_config switched since the last tick (here, by a tap or by params-persist)
                // is applied.
                g.params.activate_due(now());
                let in_force = g.params.in_force(now()).versions.gate_config;
                if in_force != gate_config_seen {
                    gate_config_seen = in_force;
                    g.apply_gate_config().await;
                }
                continue;
            }
        };
        let topic = match Topic::parse(&p.topic) {
            Ok(t) if t.station() == &g.station => t,
            Ok(_) | Err(_) => {
                ctx.metrics.malformed("mqtt");
                tracing::warn!(topic = %p.topic, "message on an unexpected topic ignored");
                let _ = ctx.client.ack(&p).await;
                continue;
            }
        };
        let payload = &p.payload[..];
        let result: Result<(), String> = match topic {
            Topic::ParamCurrent { kind, .. } | Topic::GateParamCurrent { kind, .. } => {
                let per_gate = matches!(topic, Topic::GateParamCurrent { .. });
                let at = tokio::time::Instant::now().into_std();
                match downloads.on_pointer(per_gate, kind, payload, |k, v| g.params.wants(k, v), at) {
                    Ok(steps) => {
                        download_steps(&g, &subs, steps).await;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Topic::ParamChunk { kind, version, .. } => {
                download_steps(&g, &subs, downloads.on_chunk(kind, version, payload)).await;
                Ok(())
            }
            Topic::Mode { .. } => match verified::<ModeMessage>(&g, "mode", &p.topic, payload) {
                Some(m) => g.apply_mode(m).await.map_err(|e| e.to_string()),
                None => Ok(()),
            },
            Topic::GateCmd { .. } => match verified::<Command>(&g, "cmd", &p.topic, payload) {
                Some(cmd) => {
                    let ack = g.command(&cmd).await;
                    let t = ctx.topic(|station, gate| Topic::GateCmdAck { station, gate });
                    let payload = ctx.seal(&t, &ack);
                    ctx.publish(t, QoS::AtLeastOnce, false, payload).await;
                    Ok(())
                }
                None => Ok(()),
            },
            Topic::GateTxAck { .. } => match verified::<TxAck>(&g, "tx_ack", &p.topic, payload) {
                Some(a) => {
                    let r = g.on_signed_tx_ack(&a).map(|_| ()).map_err(|e| e.to_string());
                    ctx.uploaded.notify_one();
                    r
                }
                None => Ok(()),
            },
            Topic::QrUsed { .. } => {
                if let Some(b) = verified::<QrUsedBatch>(&g, "qr_used", &p.topic, payload) {
                    g.on_qr_used(&b);
                }
                Ok(())
            }
            // Sealed by the station like `mode`: a forged online state naming a high term would
            // make every genuine will look stale (the controller-loss release would never come),
            // a forged offline one would start it.
            Topic::State { .. } => match verified::<wire::StationState>(&g, "state", &p.topic, payload) {
                None => Ok(()),
                Some(wire::StationState::Online(l)) => {
                    let mut seen = ctx.leader.lock().unwrap_or_else(|p| p.into_inner());
                    let newer = seen.is_none_or(|(node, term, since)| {
                        l.term > term || (l.term == term && (l.leader_node != node || l.since != since))
                    });
                    if newer {
                        if seen.is_some() {
                            tracing::info!(leader = l.leader_node, term = l.term, "new station leader");
                            ctx.leader_changed.notify_one();
                        }
                        *seen = Some((l.leader_node, l.term, l.since));
                    }
                    drop(seen);
                    let was = ctx.controllers_offline_since.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if was.is_some() {
                        tracing::info!(leader = l.leader_node, term = l.term, "controllers online again");
                        ctx.controllers_changed.notify_one();
                    }
                    Ok(())
                }
                Some(wire::StationState::Offline(off)) => {
                    // A will naming an older term (or another node in the same term) than the
                    // leader last seen online is a former leader's: it says nothing of the current one.
                    let seen = *ctx.leader.lock().unwrap_or_else(|p| p.into_inner());
                    let stale = match (seen, off.term) {
                        (Some((node, term, _)), Some(t)) => {
                            t < term || (t == term && off.leader_node.is_some_and(|n| n != node))
                        }
                        _ => false,
                    };
                    if stale {
                        tracing::info!(?off, "offline state of a former leader ignored");
                    } else {
                        let mut since =
                            ctx.controllers_offline_since.lock().unwrap_or_else(|p| p.into_inner());
                        if since.is_none() {
                            tracing::warn!(?off, "station state: the controllers are offline");
                            *since = Some(tokio::time::Instant::now());
                            drop(since);
                            ctx.controllers_changed.notify_one();
                        }
                    }
                    Ok(())
                }
            },
            _ => Ok(()),
        };
        if let Err(e) = result {
            ctx.metrics.malformed("mqtt");
            tracing::warn!(topic = %p.topic, error = %e, "message refused");
        }
        // Acked only now, after its effect is persisted (or it was refused for good).
        if let Err(e) = ctx.client.ack(&p).await {
            tracing::debug!(error = %e, "ack failed");
        }
    }
    tracing::info!("mqtt-inbox task stopped");
}

/// Opens a station-signed message received on `topic`. `None`: nothing to do (an empty retained
/// payload, a cleared topic), or refused: counted and alarmed ([`Gate::unverified`]).
fn verified<T: serde::de::DeserializeOwned>(
    g: &Gate,
    kind: &'static str,
    topic: &str,
    payload: &[u8],
) -> Option<T> {
    match open_station::<T>(topic, payload, g.params.trusted_keys()) {
        Ok(m) => Some(m),
        Err(SignedError::Empty) => None,
        Err(e) => {
            g.unverified(kind, e.code(), &format!("{} bytes: {e}", payload.len()));
            None
        }
    }
}

/// Does what the download state answered: (un)subscribes chunk filters, offers a reassembled
/// package (checked off the async threads), records and alarms rejections.
async fn download_steps(g: &Gate, subs: &mpsc::UnboundedSender<SubChange>, steps: Vec<Step>) {
    for step in steps {
        match step {
            Step::Subscribe(f) => {
                let _ = subs.send(SubChange::Add(f));
            }
            Step::Unsubscribe(f) => {
                let _ = subs.send(SubChange::Remove(f));
            }
            Step::Complete { kind, version, bytes } => {
                let params = g.params.clone();
                let r = tokio::task::spawn_blocking(move || params.offer(kind, version, &bytes, now())).await;
                match r {
                    Ok(Ok(state)) => {
                        if state == ParamState::Active && kind == ParamKind::GateConfig {
                            g.apply_gate_config().await;
                        }
                    }
                    Ok(Err(rej)) => g.event(
                        AlarmKind::PackageRejected,
                        false,
                        Some(format!("{kind} v{version}: {}", rej.code)),
                    ),
                    Err(e) => tracing::error!(error = %e, "package check task failed"),
                }
            }
            Step::Reject { kind, version, rejection, alarm } => {
                if alarm {
                    g.event(
                        AlarmKind::PackageRejected,
                        false,
                        Some(format!("{kind} v{version}: {}", rejection.code)),
                    );
                }
                g.params.reject(kind, version, rejection);
            }
        }
    }
}

async fn upload_task(ctx: Arc<Ctx>, cancel: CancellationToken) {
    tracing::info!("mqtt-upload task started");
    let g = ctx.gate.clone();
    let topic = ctx.topic(|station, gate| Topic::GateTx { station, gate });
    let mut conn = ctx.conn.clone();
    let mut in_flight = acks::Acks::new(ctx.settings.ack_timeout);
    loop {
        if cancel.is_cancelled() {
            break;
        }
        if !ctx.connected() {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = conn.changed() => {}
            }
            continue;
        }
        let after = match g.store().acked_through() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let store = g.store().clone();
        let n = ctx.settings.batch_records;
        let pending = tokio::task::spawn_blocking(move || store.pending(after, n, BATCH_RECORD_BYTES)).await;
        let pending = match pending {
            Ok(Ok(p)) => p,
            other => {
                tracing::error!(?other, "cannot read the outbox; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let signer = acks::Signer {
            station: &g.station,
            gate: &g.gate,
            installation: g.store().installation(),
            key: &ctx.key,
        };
        let batch = match acks::prepare(&signer, after, pending) {
            acks::Prepared::Batch(b) => b,
            acks::Prepared::Idle => {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = g.new_records.notified() => {}
                    _ = conn.changed() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            acks::Prepared::Blocked => {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                continue;
            }
        };
        let last = batch.last;
        tracing::debug!(first = batch.first, last, bytes = batch.payload.len(), "uploading batch");
        ctx.publish(topic.clone(), QoS::AtLeastOnce, false, batch.payload).await;
        // Wait for the ledger to acknowledge this batch, or time out and send again.
        in_flight.sent(last, tokio::time::Instant::now().into_std());
        while !in_flight.acked(g.store().acked_through().unwrap_or(0)) {
            let deadline =
                in_flight.deadline().map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std);
            tokio::select! {
                () = cancel.cancelled() => return,
                () = ctx.uploaded.notified() => {}
                () = ctx.leader_changed.notified() => {
                    tracing::info!(last, "new leader; sending the unacknowledged batch again");
                    in_flight.give_up();
                }
                _ = conn.changed() => {
                    in_flight.give_up();
                }
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(last, "no tx/ack in time; sending again");
                    in_flight.give_up();
                }
            }
        }
    }
    tracing::info!("mqtt-upload task stopped");
}
