//! The leader's duties over MQTT (SPEC §5): every node may run them, only the Raft leader does.
//!
//! Task `leader-supervisor` watches the Raft metrics. When this node becomes leader (or its term
//! changes while leading) it has a quorum confirm the leadership (`ensure_linearizable`: a
//! restarted former leader comes back as leader of its old term, and a frozen or cut-off one
//! still thinks it leads) and only then starts a session; when it stops leading it cancels the
//! session and waits for its tasks. Task `leader-lease` confirms the leadership again every
//! 500 ms (and the publisher on every ConnAck) and ends the session when a quorum does not, so a
//! node that is not the leader publishes nothing retained. A session is one MQTT connection with a client id and a `state` will of
//! its own (`{online:false, leader_node, term}`, sealed with the station key like every `state`), and these tasks:
//! - `mqtt-eventloop` ([`mqtt`]): owns and polls the rumqttc event loop, nothing else;
//! - `leader-dispatch` (here): routes what gates publish: tx batches to ingest, status,
//!   heartbeats, `params/ack` and events to the gate board ([`view`]), command acks to their
//!   waiters, used QR codes to the relay. Everything but a tx batch (which carries its own
//!   signature, checked by the ledger) must be signed by the gate's registered key
//!   ([`afc_domain::signed`]; the plain will `{online:false}` on `status` is the one unsigned
//!   message taken): a message that does not verify changes nothing and is counted per topic and
//!   reason (`afc_controller_unverified_messages_total`). A malformed message is counted, logged
//!   and skipped;
//! - `tx-ingest` ([`ingest`]): proposes gate batches through Raft, acks after commit;
//! - `leader-publisher` ([`publish`]): re-subscribes and publishes `state`, parameter packages
//!   (chunks first, pointer last) and `mode` on every ConnAck, then follows the state machine;
//!   it reads the retained `mode` and `state` back and publishes its own again when the broker
//!   holds another (an old leader's late will or `state`, or an unsigned one); a `state` sealed
//!   with the station key naming a newer term has the leadership confirmed first;
//! - `qr-relay`: batches `gates/+/qr/used` onto `qr/used`;
//! - `rollout-driver` ([`rollout`]): starts and steps the replicated staged rollouts with what
//!   the board shows, and republishes the old content after a rollback;
//! - `counter-readings` ([`readings`]): records each gate's PLC counters through Raft at the
//!   first heartbeat after each business-day boundary, for the day close.
//!
//! What the leader publishes that steers a gate (`mode`, `cmd`, `tx/ack`, the relayed `qr/used`)
//! is sealed with the station key ([`StationKey`], `api.signing_key_file`, read once with the
//! node's other secrets in [`crate::secrets`]: `[mqtt]` without it is refused by the config
//! check). The MQTT password and `[mqtt.tls]` are read there too, not at each leadership.
//!
//! [`Duties`] is the long-lived handle shared with the HTTP API: the gate board, counters, and
//! [`Duties::send_command`].

pub mod broker;
pub mod ingest;
pub mod mqtt;
pub mod plausible;
pub mod publish;
pub mod readings;
pub mod rollout;
pub mod view;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use afc_domain::model::{Ident, Timestamp};
use afc_domain::signed::{self, SignedError};
use afc_domain::topic::{Topic, TopicError};
use afc_domain::wire::{
    self, Command, CommandAck, CommandKind, GateEvent, GateStatus, Heartbeat, ParamsAck, QrUsed, QrUsedBatch,
};
use ed25519_dalek::VerifyingKey;
use openraft::ServerState;
use rumqttc::{AsyncClient, Publish, QoS};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::now;
use crate::config::{ConfigError, MqttConfig};
use crate::metrics::ControllerMetrics;
use crate::node::Node;
pub use crate::secrets::StationKey;
use crate::state::{GateInfo, Request, Response};

use self::view::{Board, GateView};

/// Counters of the leader's MQTT side, for logs, metrics and the API.
#[derive(Debug, Default)]
pub struct Stats {
    connected: AtomicBool,
    /// Payloads that could not be parsed or named the wrong station or gate.
    pub malformed: AtomicU64,
    /// Tx batches committed and acked.
    pub tx_batches_acked: AtomicU64,
    /// Tx records newly appended to the ledger.
    pub tx_records_appended: AtomicU64,
    /// Batches refused by the state machine (unknown gate, bad signature, ...): not acked.
    pub tx_batches_rejected: AtomicU64,
    /// Batches dropped because ingest was saturated (the gate re-sends on its ack timeout).
    pub tx_batches_dropped: AtomicU64,
    /// Proposals that failed (leadership lost, storage error): not acked.
    pub tx_propose_errors: AtomicU64,
    pub qr_relayed: AtomicU64,
    /// Times the retained `mode` on the broker was not the one this leader published (cleared,
    /// forged, or an old genuine one replayed) and was published again.
    pub mode_restored: AtomicU64,
    /// Times the retained `state` on the broker was not this leader's (an old leader's will or
    /// `state`, cleared, forged) and, leadership confirmed, was published again.
    pub state_restored: AtomicU64,
    /// Times this node's duties stopped, or did not start, because a quorum did not confirm its
    /// leadership (a restarted former leader, a leader cut off from its followers).
    pub leadership_unconfirmed: AtomicU64,
    /// Gate messages refused because they did not verify, per [`GATE_SIGNED_TOPICS`] and
    /// [`UNVERIFIED_REASONS`].
    unverified: [[AtomicU64; UNVERIFIED_REASONS.len()]; GATE_SIGNED_TOPICS.len()],
}

/// The gate topics whose messages must be signed by the gate, as the `topic` label of
/// `afc_controller_unverified_messages_total` names them.
pub const GATE_SIGNED_TOPICS: [&str; 6] =
    ["status", "heartbeat", "params_ack", "cmd_ack", "events", "qr_used"];

/// Why a gate message did not verify: the [`SignedError::code`] of every unverified refusal (a
/// gate without a registered key gets `unknown_key`, or `malformed` if it is not even an envelope).
pub const UNVERIFIED_REASONS: [&str; 4] = ["malformed", "unknown_key", "bad_signature", "invalid_message"];

/// A gate topic whose messages the gate signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateSigned {
    Status = 0,
    Heartbeat = 1,
    ParamsAck = 2,
    CmdAck = 3,
    Events = 4,
    QrUsed = 5,
}

impl GateSigned {
    fn label(self) -> &'static str {
        GATE_SIGNED_TOPICS[self as usize]
    }
}

impl Stats {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// `(topic, reason, count)` for every topic and reason, zeros included.
    pub fn unverified(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::with_capacity(GATE_SIGNED_TOPICS.len() * UNVERIFIED_REASONS.len());
        for (t, topic) in GATE_SIGNED_TOPICS.iter().enumerate() {
            for (r, reason) in UNVERIFIED_REASONS.iter().enumerate() {
                out.push((*topic, *reason, self.unverified[t][r].load(Ordering::Relaxed)));
            }
        }
        out
    }

    fn count_unverified(&self, topic: GateSigned, error: &SignedError) {
        if let Some(r) = UNVERIFIED_REASONS.iter().position(|c| *c == error.code()) {
            Stats::inc(&self.unverified[topic as usize][r], 1);
        }
    }

    fn set_connected(&self, v: bool) {
        self.connected.store(v, Ordering::Relaxed);
    }

    fn inc(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Why a command did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("this node does not lead the station (or is not connected to the broker)")]
    NotLeader,
    #[error("the gate did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot publish the command: {0}")]
    Publish(String),
}

/// Body of `POST /admin/gate-command`: a command a follower's API hands to the leader.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct GateCommand {
    pub gate: Ident,
    pub command: afc_domain::wire::CommandKind,
}

/// What became of a command, in a form that travels between nodes (a follower's API forwards a
/// command to the leader's `/admin/gate-command` and maps the outcome exactly as the leader would).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CommandOutcome {
    /// The gate answered (its result may still be `rejected`, `expired` or `failed`).
    Acked { ack: CommandAck },
    /// No `cmd/ack` within the timeout (the command also expired at the gate then).
    Timeout { after_ms: u64 },
    /// This node does not lead (any more) or has no broker session.
    NotLeader,
    /// The MQTT client refused the publish.
    Publish { error: String },
}

/// Commands waiting for their `cmd/ack`: command id → (the gate it went to, the waiter).
type Waiters = Arc<Mutex<HashMap<String, (Ident, oneshot::Sender<CommandAck>)>>>;

/// The registered gates' keys, as the dispatcher checks gate messages with them: built from the
/// replicated state at the start of a session and refreshed by the publisher whenever it reads
/// a newer state (so a gate registered or re-keyed is known within one publisher poll). A lookup
/// is one read lock and a hash lookup; the keys are decompressed once, when they change.
#[derive(Default)]
pub(crate) struct GateKeys {
    keys: RwLock<KeyMap>,
}

/// Gate → its registered key bytes and the key they decode to (`None`: not a valid point).
type KeyMap = HashMap<Ident, ([u8; 32], Option<VerifyingKey>)>;

impl GateKeys {
    /// Takes the state's gate keys, unless they are the ones held already.
    /// A decommissioned gate has no key: nothing it sends verifies.
    pub(crate) fn refresh(&self, gates: &std::collections::BTreeMap<Ident, GateInfo>) {
        let active = || gates.iter().filter(|(_, i)| !i.decommissioned);
        let same = |held: &KeyMap| {
            held.len() == active().count()
                && active().all(|(g, i)| held.get(g).is_some_and(|(b, _)| *b == i.tx_public_key))
        };
        if self.keys.read().is_ok_and(|held| same(&held)) {
            return;
        }
        let fresh = active()
            .map(|(g, i)| (g.clone(), (i.tx_public_key, VerifyingKey::from_bytes(&i.tx_public_key).ok())))
            .collect();
        let mut held = self.keys.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        *held = fresh;
    }

    /// The registered key of `gate` (`None`: not registered, or its key is not a valid point).
    pub(crate) fn get(&self, gate: &Ident) -> Option<VerifyingKey> {
        self.keys.read().ok().and_then(|k| k.get(gate).and_then(|(_, v)| *v))
    }
}

/// The current session's handles, for commands.
struct Live {
    client: AsyncClient,
    waiters: Waiters,
}

/// The long-lived handle of the leader duties, shared with the HTTP API.
pub struct Duties {
    node: Arc<Node>,
    cfg: MqttConfig,
    /// Where ingest reports ledger append latency and transactions ingested.
    metrics: Arc<ControllerMetrics>,
    board: Arc<RwLock<Board>>,
    pub stats: Arc<Stats>,
    live: RwLock<Option<Live>>,
    next_command: AtomicU64,
    /// Seals `mode`, `cmd`, `tx/ack` and the relayed `qr/used`.
    station_key: Arc<StationKey>,
}

/// What the API shows about the duties.
#[derive(Debug, Clone, Serialize)]
pub struct DutiesStatus {
    pub leading: bool,
    pub mqtt_connected: bool,
}

impl Duties {
    /// The duties of `node`, with the station key its [`crate::secrets::Secrets`] hold
    /// (`api.signing_key_file`): without it the node does not start.
    pub fn new(
        node: Arc<Node>,
        cfg: MqttConfig,
        metrics: Arc<ControllerMetrics>,
    ) -> Result<Arc<Duties>, ConfigError> {
        let station_key = node.secrets.require_station_key(
            "[mqtt] needs api.signing_key_file: gates take mode, commands and tx acks only signed by the station key",
        )?;
        Ok(Arc::new(Duties {
            node,
            cfg,
            metrics,
            board: Arc::default(),
            stats: Arc::default(),
            live: RwLock::new(None),
            next_command: AtomicU64::new(1),
            station_key,
        }))
    }

    /// Every gate heard from during this leadership (empty on followers).
    pub fn gates(&self) -> Vec<GateView> {
        self.board.read().map(|b| b.snapshot()).unwrap_or_default()
    }

    pub fn gate(&self, gate: &Ident) -> Option<GateView> {
        self.board.read().ok().and_then(|b| b.get(gate))
    }

    pub fn status(&self) -> DutiesStatus {
        let leading = self.live.read().map(|l| l.is_some()).unwrap_or(false);
        DutiesStatus { leading, mqtt_connected: self.stats.connected() }
    }

    /// Publishes `command` on `gates/{gate}/cmd` (QoS 1, expiring after the timeout) and waits
    /// for the gate's `cmd/ack`. Only on the leader.
    pub async fn send_command(&self, gate: &Ident, command: CommandKind) -> Result<CommandAck, CommandError> {
        let timeout = Duration::from_millis(self.cfg.command_timeout_ms);
        let id = format!(
            "{}-{}-{}",
            self.node.id,
            now().millis(),
            self.next_command.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = oneshot::channel();
        let (client, waiters) = {
            let live = self.live.read().map_err(|_| CommandError::NotLeader)?;
            let live = live.as_ref().ok_or(CommandError::NotLeader)?;
            (live.client.clone(), live.waiters.clone())
        };
        if let Ok(mut w) = waiters.lock() {
            w.insert(id.clone(), (gate.clone(), tx));
        }
        let expires_at = Timestamp(now().millis() + i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX));
        let cmd = Command { id: id.clone(), gate: gate.clone(), command, expires_at };
        let topic =
            Topic::GateCmd { station: self.node.config.station.clone(), gate: gate.clone() }.to_string();
        let payload = self.station_key.seal(&topic, &cmd);
        let sent = client.publish(topic, QoS::AtLeastOnce, false, payload).await;
        let result = match sent {
            Err(e) => Err(CommandError::Publish(e.to_string())),
            Ok(()) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(ack)) => Ok(ack),
                Ok(Err(_)) => Err(CommandError::NotLeader),
                Err(_) => Err(CommandError::Timeout(timeout)),
            },
        };
        if let Ok(mut w) = waiters.lock() {
            w.remove(&id);
        }
        result
    }
}

impl Duties {
    /// [`Duties::send_command`], as a [`CommandOutcome`].
    pub async fn deliver(&self, gate: &Ident, command: CommandKind) -> CommandOutcome {
        match self.send_command(gate, command).await {
            Ok(ack) => CommandOutcome::Acked { ack },
            Err(CommandError::Timeout(t)) => {
                CommandOutcome::Timeout { after_ms: u64::try_from(t.as_millis()).unwrap_or(u64::MAX) }
            }
            Err(CommandError::NotLeader) => CommandOutcome::NotLeader,
            Err(CommandError::Publish(error)) => CommandOutcome::Publish { error },
        }
    }
}

/// Spawns task `leader-supervisor`; it ends after `stop`, once the session's tasks have ended.
pub fn spawn(duties: Arc<Duties>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(supervisor(duties, stop))
}

/// How long a quorum has to confirm this node's leadership ([`confirm_leadership`]).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a running session has its leadership confirmed again (task `leader-lease`).
const LEASE_EVERY: Duration = Duration::from_millis(500);
/// Pause before trying again to confirm a leadership that a quorum did not confirm.
const CONFIRM_RETRY: Duration = Duration::from_millis(250);

/// Whether a quorum confirms, now, that this node leads in `term` (a round of heartbeats:
/// openraft's `ensure_linearizable`, which also waits until the state machine has applied
/// everything committed). Raft metrics saying `Leader` is not enough: a former leader restarts as
/// leader of its old term and only learns of the newer one from the next message it gets; a
/// leader cut off from its followers stays leader in its own eyes.
pub(crate) async fn confirm_leadership(node: &Node, term: u64) -> Result<(), String> {
    match tokio::time::timeout(CONFIRM_TIMEOUT, node.raft.ensure_linearizable()).await {
        Err(_) => Err(format!("no quorum answered within {CONFIRM_TIMEOUT:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(_)) => {
            let m = node.raft.metrics().borrow().clone();
            if m.state == ServerState::Leader && m.current_term == term {
                Ok(())
            } else {
                Err(format!("now {:?} in term {}", m.state, m.current_term))
            }
        }
    }
}

async fn supervisor(duties: Arc<Duties>, stop: CancellationToken) {
    tracing::info!(task = "leader-supervisor", "started");
    let mut metrics = duties.node.raft.metrics();
    let mut session: Option<(u64, CancellationToken, tokio::task::JoinHandle<()>)> = None;
    loop {
        let (leading, term) = {
            let m = metrics.borrow_and_update();
            (m.state == ServerState::Leader, m.current_term)
        };
        let keep = matches!(&session, Some((t, _, _)) if leading && *t == term);
        let mut retry = false;
        if !keep {
            if let Some((t, cancel, handle)) = session.take() {
                tracing::info!(task = "leader-supervisor", term = t, "no longer leading: stopping duties");
                end_session(&duties, cancel, handle).await;
            }
            if leading {
                // Nothing goes to the broker before a quorum has confirmed this leadership.
                match confirm_leadership(&duties.node, term).await {
                    Ok(()) => {
                        tracing::info!(
                            task = "leader-supervisor",
                            term,
                            "leading (confirmed by a quorum): starting duties"
                        );
                        let cancel = stop.child_token();
                        let handle = tokio::spawn(run_session(duties.clone(), term, cancel.clone()));
                        session = Some((term, cancel, handle));
                    }
                    Err(why) => {
                        Stats::inc(&duties.stats.leadership_unconfirmed, 1);
                        tracing::info!(task = "leader-supervisor", term, %why,
                            "leader in its own eyes, not confirmed by a quorum: duties not started");
                        retry = true;
                    }
                }
            }
        }
        // A session ends on its own when its lease is not confirmed any more.
        let ended = async {
            match session.as_mut() {
                Some((_, _, handle)) => {
                    let _ = handle.await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => break,
            r = metrics.changed() => if r.is_err() { break },
            () = ended => {
                // The handle has completed: it must not be awaited again.
                if let Some((t, cancel, _)) = session.take() {
                    tracing::info!(task = "leader-supervisor", term = t, "duties ended: leadership not confirmed");
                    cancel.cancel();
                    clear_session(&duties);
                }
            }
            () = tokio::time::sleep(CONFIRM_RETRY), if retry => {}
        }
    }
    if let Some((_, cancel, handle)) = session.take() {
        end_session(&duties, cancel, handle).await;
    }
    tracing::info!(task = "leader-supervisor", "stopped");
}

async fn end_session(duties: &Duties, cancel: CancellationToken, handle: tokio::task::JoinHandle<()>) {
    cancel.cancel();
    if let Ok(mut live) = duties.live.write() {
        *live = None;
    }
    if tokio::time::timeout(Duration::from_secs(5), handle).await.is_err() {
        tracing::warn!(task = "leader-supervisor", "session tasks did not stop within 5 s");
    }
    // Again: a session cancelled before it ran installs its handles on its way out.
    clear_session(duties);
}

/// Forgets a session that has ended: no live client for commands, an empty board.
fn clear_session(duties: &Duties) {
    if let Ok(mut live) = duties.live.write() {
        *live = None;
    }
    if let Ok(mut b) = duties.board.write() {
        b.clear();
    }
}

/// What the session's tasks share.
pub(crate) struct Ctx {
    pub node: Arc<Node>,
    pub cfg: MqttConfig,
    pub station: Ident,
    pub term: u64,
    pub client: AsyncClient,
    pub stats: Arc<Stats>,
    pub board: Arc<RwLock<Board>>,
    pub metrics: Arc<ControllerMetrics>,
    /// Seals what the session publishes to gates.
    pub station_key: Arc<StationKey>,
    /// What gate messages are verified with.
    pub gate_keys: GateKeys,
    /// The retained `mode` this session published, restored when the broker holds another.
    pub mode_guard: publish::ModeGuard,
    /// The retained `state` this session published, restored when the broker holds another.
    pub state_guard: publish::StateGuard,
    /// Nudges task `leader-lease` to confirm the leadership now (the broker holds a `state` of a
    /// newer term: either this node is deposed, or the message is forged).
    pub lease_check: tokio::sync::Notify,
    /// The session's own token: cancelled to end the session when the lease is lost.
    pub stop: CancellationToken,
}

impl Ctx {
    /// Publishes, logging (not failing) when the client's queue is closed.
    pub async fn publish(&self, topic: String, retain: bool, payload: Vec<u8>) {
        if let Err(e) = self.client.publish(topic.clone(), QoS::AtLeastOnce, retain, payload).await {
            tracing::warn!(%topic, error = %e, "publish failed");
        }
    }
}

async fn run_session(duties: Arc<Duties>, term: u64, stop: CancellationToken) {
    let node = duties.node.clone();
    // Read once when the node started (`crate::secrets`), never again per leadership.
    let password = node.secrets.mqtt_password.clone();
    let tls = node.secrets.mqtt_tls.clone();
    let options =
        mqtt::options(&duties.cfg, &node.config.station, node.id, term, password, tls, &duties.station_key);
    let (client, eventloop) = AsyncClient::new(options, mqtt::REQUEST_CAPACITY);
    let (conn_tx, conn_rx) = watch::channel(0u64);
    let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
    let (tx_in, tx_rx) = mpsc::channel(ingest::QUEUE);
    let (qr_in, qr_rx) = mpsc::unbounded_channel();
    let waiters: Waiters = Arc::default();
    let gate_keys = GateKeys::default();
    match node.sm.state() {
        Ok(state) => gate_keys.refresh(&state.gates),
        // The publisher refreshes them on its first pass; until then gate messages are refused.
        Err(e) => tracing::warn!(error = %e, "cannot read the gate keys from the state machine"),
    }
    let ctx = Arc::new(Ctx {
        node: node.clone(),
        cfg: duties.cfg.clone(),
        station: node.config.station.clone(),
        term,
        client: client.clone(),
        stats: duties.stats.clone(),
        board: duties.board.clone(),
        metrics: duties.metrics.clone(),
        station_key: duties.station_key.clone(),
        gate_keys,
        mode_guard: publish::ModeGuard::default(),
        state_guard: publish::StateGuard::default(),
        lease_check: tokio::sync::Notify::new(),
        stop: stop.clone(),
    });
    if let Ok(mut live) = duties.live.write() {
        *live = Some(Live { client: client.clone(), waiters: waiters.clone() });
    }
    let backoff_max = Duration::from_millis(duties.cfg.backoff_max_ms.max(50));
    let mut tasks = JoinSet::new();
    tasks.spawn(mqtt::eventloop_task(
        eventloop,
        client,
        conn_tx,
        inbox_tx,
        backoff_max,
        duties.stats.clone(),
        stop.clone(),
    ));
    tasks.spawn(dispatch_task(ctx.clone(), inbox_rx, tx_in, qr_in, waiters, stop.clone()));
    tasks.spawn(ingest::ingest_task(ctx.clone(), tx_rx, stop.clone()));
    tasks.spawn(publish::publisher_task(ctx.clone(), conn_rx, stop.clone()));
    tasks.spawn(qr_relay_task(ctx.clone(), qr_rx, stop.clone()));
    tasks.spawn(rollout::driver_task(ctx.clone(), stop.clone()));
    tasks.spawn(lease_task(ctx.clone(), stop.clone()));
    tasks.spawn(readings::readings_task(ctx.clone(), stop.clone()));
    tasks.spawn(register_seeds(ctx, stop.clone()));
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            tracing::error!(error = %e, "a leader duty task panicked");
        }
    }
}

/// Task `leader-lease`: every [`LEASE_EVERY`] (and at once when the broker shows a newer term)
/// has a quorum confirm this leadership; when it does not, ends the session, so a deposed or cut
/// off leader stops publishing within about a second. After a confirmation prompted by a newer
/// term on the broker (forged, then), the publisher puts this leader's `state` back.
async fn lease_task(ctx: Arc<Ctx>, stop: CancellationToken) {
    tracing::info!(task = "leader-lease", term = ctx.term, "started");
    let mut tick = tokio::time::interval(LEASE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let prompted = tokio::select! {
            () = stop.cancelled() => break,
            () = ctx.lease_check.notified() => true,
            _ = tick.tick() => false,
        };
        let confirmed = tokio::select! {
            () = stop.cancelled() => break,
            r = confirm_leadership(&ctx.node, ctx.term) => r,
        };
        match confirmed {
            Ok(()) if prompted => ctx.state_guard.restore(),
            Ok(()) => {}
            Err(why) => {
                Stats::inc(&ctx.stats.leadership_unconfirmed, 1);
                tracing::warn!(task = "leader-lease", term = ctx.term, %why,
                    "leadership not confirmed by a quorum: stopping duties");
                ctx.stop.cancel();
                break;
            }
        }
    }
    tracing::info!(task = "leader-lease", "stopped");
}

/// Registers the gates listed in `mqtt.gates` that are missing or hold another key.
async fn register_seeds(ctx: Arc<Ctx>, stop: CancellationToken) {
    let state = match ctx.node.sm.state() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the state machine; gate seeds not registered");
            return;
        }
    };
    for seed in &ctx.cfg.gates {
        let known = state.gates.get(&seed.gate).map(|g| hex::encode(g.tx_public_key));
        if known.as_deref() == Some(seed.tx_public_key.to_ascii_lowercase().as_str()) {
            continue;
        }
        let req = Request::RegisterGate {
            gate: seed.gate.clone(),
            tx_public_key: seed.tx_public_key.clone(),
            hardware_profile: seed.hardware_profile.clone(),
        };
        let r = tokio::select! {
            () = stop.cancelled() => return,
            r = ctx.node.raft.client_write(req) => r,
        };
        match r {
            Ok(w) => match w.data {
                Response::GateRegistered { .. } => {
                    tracing::info!(gate = %seed.gate, "gate registered from config")
                }
                other => tracing::warn!(gate = %seed.gate, ?other, "gate from config not registered"),
            },
            Err(e) => tracing::warn!(gate = %seed.gate, error = %e, "cannot register gate from config"),
        }
    }
}

/// Task `leader-dispatch`: routes each incoming message by its parsed topic.
async fn dispatch_task(
    ctx: Arc<Ctx>,
    mut inbox: mpsc::UnboundedReceiver<Publish>,
    tx: mpsc::Sender<(Ident, ingest::Incoming)>,
    qr: mpsc::UnboundedSender<QrUsed>,
    waiters: Waiters,
    stop: CancellationToken,
) {
    tracing::info!(task = "leader-dispatch", "started");
    // A flood of forged messages must not become a flood of warnings: one every 10 s, the rest
    // at debug level (the metric counts every one).
    let mut last_unverified_warning: Option<std::time::Instant> = None;
    loop {
        let p = tokio::select! {
            () = stop.cancelled() => break,
            p = inbox.recv() => match p { Some(p) => p, None => break },
        };
        match dispatch(&ctx, &p, &tx, &qr, &waiters) {
            Ok(()) => {}
            Err(Refused::Unverified { topic, error }) => {
                ctx.stats.count_unverified(topic, &error);
                if last_unverified_warning.is_none_or(|t| t.elapsed() >= UNVERIFIED_WARNING_EVERY) {
                    last_unverified_warning = Some(std::time::Instant::now());
                    tracing::warn!(task = "leader-dispatch", topic = %p.topic, reason = error.code(), %error,
                        "gate message does not verify: ignored (further ones within 10 s at debug level)");
                } else {
                    tracing::debug!(task = "leader-dispatch", topic = %p.topic, reason = error.code(), %error,
                        "gate message does not verify: ignored");
                }
            }
            Err(e) => {
                Stats::inc(&ctx.stats.malformed, 1);
                tracing::warn!(task = "leader-dispatch", topic = %p.topic, error = %e, "message refused");
            }
        }
    }
    tracing::info!(task = "leader-dispatch", "stopped");
}

/// At most one warning per this period about gate messages that do not verify.
const UNVERIFIED_WARNING_EVERY: Duration = Duration::from_secs(10);

/// Why an incoming message was refused.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error("topic of station {0}, not ours")]
    OtherStation(Ident),
    #[error(transparent)]
    Payload(#[from] wire::WireError),
    #[error("batch names station/gate {station}/{gate}, not its topic's")]
    Mismatch { station: Ident, gate: Ident },
    #[error(transparent)]
    Records(#[from] wire::TxBatchError),
    #[error("used QR code attributed to gate {0}, not to the gate that reports it")]
    QrOfAnotherGate(Ident),
    #[error("{} message does not verify: {error}", topic.label())]
    Unverified { topic: GateSigned, error: SignedError },
}

/// Opens a message `gate` signed on `topic` with its registered key. A gate without one gets
/// `unknown_key` (or `malformed`, if the payload is not even an envelope): nothing it sends but
/// its tx batches is taken.
fn open_from_gate<T: DeserializeOwned>(
    ctx: &Ctx,
    kind: GateSigned,
    gate: &Ident,
    topic: &str,
    payload: &[u8],
) -> Result<T, Refused> {
    let opened = match ctx.gate_keys.get(gate) {
        Some(key) => signed::open_gate(topic, payload, &key),
        None => signed::open(topic, payload, |_| None),
    };
    opened.map_err(|error| Refused::Unverified { topic: kind, error })
}

fn dispatch(
    ctx: &Ctx,
    p: &Publish,
    tx: &mpsc::Sender<(Ident, ingest::Incoming)>,
    qr: &mpsc::UnboundedSender<QrUsed>,
    waiters: &Waiters,
) -> Result<(), Refused> {
    let topic = Topic::parse(&p.topic)?;
    if topic.station() != &ctx.station {
        return Err(Refused::OtherStation(topic.station().clone()));
    }
    let payload = &p.payload[..];
    let name = &p.topic;
    let board = || ctx.board.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    match topic {
        Topic::GateTx { gate, .. } => {
            // The batch carries the gate's signature over its records: the ledger checks it.
            let batch: wire::TxBatch = wire::decode(payload)?;
            if batch.gate != gate || batch.station != ctx.station {
                return Err(Refused::Mismatch { station: batch.station, gate: batch.gate });
            }
            // Its records read once here (`raw` decoded strictly, `records` encoded), kept with
            // their canonical bytes from here to the ledger's store.
            let incoming = ingest::Incoming::read(batch)?;
            if tx.try_send((gate, incoming)).is_err() {
                Stats::inc(&ctx.stats.tx_batches_dropped, 1);
                tracing::warn!("tx ingest saturated: batch dropped (the gate re-sends it)");
            }
        }
        Topic::GateStatus { gate, .. } => {
            if payload.is_empty() {
                return Ok(()); // a cleared retained status
            }
            let s: GateStatus = match open_from_gate(ctx, GateSigned::Status, &gate, name, payload) {
                Ok(s) => s,
                // The will is fixed when the gate connects, so it is plain JSON: an unsigned
                // status is taken only if it is that `{online:false}`, and only for a registered gate.
                Err(Refused::Unverified { error: SignedError::Malformed(_), .. })
                    if ctx.gate_keys.get(&gate).is_some()
                        && matches!(wire::decode(payload), Ok(GateStatus::Offline { .. })) =>
                {
                    wire::decode(payload)?
                }
                Err(e) => return Err(e),
            };
            board().on_status(&gate, s);
        }
        Topic::GateHeartbeat { gate, .. } => {
            let hb: Heartbeat = open_from_gate(ctx, GateSigned::Heartbeat, &gate, name, payload)?;
            board().on_heartbeat(&gate, &hb, now(), ctx.cfg.clock_drift_alarm_ms);
        }
        Topic::GateParamsAck { gate, .. } => {
            let a: ParamsAck = open_from_gate(ctx, GateSigned::ParamsAck, &gate, name, payload)?;
            board().on_params_ack(&gate, &a);
        }
        Topic::GateEvents { gate, .. } => {
            let ev: GateEvent = open_from_gate(ctx, GateSigned::Events, &gate, name, payload)?;
            tracing::info!(%gate, kind = ?ev.kind, cleared = ev.cleared, "gate event");
            board().on_event(&gate, ev, now());
        }
        Topic::GateCmdAck { gate, .. } => {
            let ack: CommandAck = open_from_gate(ctx, GateSigned::CmdAck, &gate, name, payload)?;
            // Only the gate the command went to answers it.
            let waiter = waiters.lock().ok().and_then(|mut w| match w.get(&ack.id) {
                Some((to, _)) if *to == gate => w.remove(&ack.id).map(|(_, s)| s),
                _ => None,
            });
            match waiter {
                Some(w) => {
                    let _ = w.send(ack);
                }
                None => {
                    tracing::debug!(id = %ack.id, %gate, "command ack without a waiter (late, another leader's, or not this gate's command)")
                }
            }
        }
        Topic::GateQrUsed { gate, .. } => {
            let b: QrUsedBatch = open_from_gate(ctx, GateSigned::QrUsed, &gate, name, payload)?;
            // A gate reports the codes used at itself: an entry naming another gate would let one
            // gate use up another's share of the replay caches.
            if let Some(other) = b.entries.iter().find(|u| u.gate != gate) {
                return Err(Refused::QrOfAnotherGate(other.gate.clone()));
            }
            for u in b.entries {
                let _ = qr.send(u);
            }
        }
        // The leader reads back the retained mode: anyone who may publish on the broker can
        // replace it (gates refuse what does not verify, but a gate connecting later would then
        // find no valid mode there), so another payload than ours is published over at once.
        Topic::Mode { .. } if ctx.mode_guard.observe(payload) => {
            Stats::inc(&ctx.stats.mode_restored, 1);
            tracing::warn!(
                "the retained mode on the broker is not the one this leader published; publishing it again"
            );
        }
        // The retained state too: an old leader's will or `state` (or a forged one) is replaced
        // by ours; one naming a newer term first has this leadership confirmed again.
        Topic::State { .. } => match ctx.state_guard.observe(name, payload, ctx.term, &ctx.station_key) {
            publish::StateSeen::Ours | publish::StateSeen::Unset => {}
            publish::StateSeen::Other => {
                tracing::warn!("the retained state on the broker is not this leader's; publishing it again");
            }
            publish::StateSeen::NewerTerm(t) => {
                tracing::warn!(
                    term = ctx.term,
                    broker_term = t,
                    "the retained state names a newer term: confirming the leadership before anything else"
                );
                ctx.lease_check.notify_one();
            }
        },
        // Our own publications echo back only if subscribed; nothing else is routed.
        _ => {}
    }
    Ok(())
}

/// Task `qr-relay`: gathers used QR codes and publishes them as one batch every `qr_relay_ms`.
async fn qr_relay_task(ctx: Arc<Ctx>, mut rx: mpsc::UnboundedReceiver<QrUsed>, stop: CancellationToken) {
    tracing::info!(task = "qr-relay", "started");
    let topic = Topic::QrUsed { station: ctx.station.clone() }.to_string();
    let every = Duration::from_millis(ctx.cfg.qr_relay_ms.max(5));
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => break,
            u = rx.recv() => match u { Some(u) => u, None => break },
        };
        // Wait a moment so codes used at the same time travel together.
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
        let mut entries = vec![first];
        while let Ok(u) = rx.try_recv() {
            entries.push(u);
            if entries.len() >= 2000 {
                break;
            }
        }
        Stats::inc(&ctx.stats.qr_relayed, entries.len() as u64);
        let payload = ctx.station_key.seal(&topic, &QrUsedBatch { entries });
        ctx.publish(topic.clone(), false, payload).await;
    }
    tracing::info!(task = "qr-relay", "stopped");
}

/// `host:port`, with the MQTT port 1883 when the port is missing or unreadable.
pub(crate) fn split_host_port(addr: &str) -> (String, u16) {
    match addr.rsplit_once(':') {
        Some((h, p)) => (h.trim_matches(['[', ']']).to_owned(), p.parse().unwrap_or(1883)),
        None => (addr.to_owned(), 1883),
    }
}
