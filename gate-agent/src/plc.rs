//! The gate PLC over Modbus TCP: one task owns the connection (SPEC §6).
//!
//! Everything else talks to the PLC through a [`PlcHandle`]: commands go over an mpsc channel and
//! are answered on a oneshot, so there is only ever one request in flight on the connection.
//! Every call is wrapped in a timeout; after a timeout or an error the connection is dropped (a
//! late reply would otherwise be taken as the answer to the next request) and re-opened with
//! backoff. While there is no working connection, commands fail at once with
//! [`PlcError::Offline`] and `plc_online` (a watch channel) is false, so the tap path refuses with
//! `plc_offline` instead of waiting.
//!
//! Between commands the task polls the discrete inputs and counters. It raises alarms (tailgating,
//! forced passage, door fault, emergency input) as [`PlcEvent`]s by the rules of [`alarms`] (a
//! pure function of the previous and the current reading), and on the hard-wired emergency
//! input it sets `free_passage` at once, without asking anybody. The outputs the agent wants
//! (free passage, out of service, direction, alarm) are kept here and written again after every
//! reconnect, since a PLC that restarted has forgotten them.

pub mod alarms;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use afc_domain::backoff::Backoff;
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_modbus::client::Context;
use tokio_modbus::prelude::{Reader, Slave, Writer};
use tokio_util::sync::CancellationToken;

use crate::hardware::{u32_to_words, words_to_u32, RegisterMap};
use crate::metrics::Metrics;

/// Which way the flaps open for one passage (the domain's entry / exit).
pub use afc_domain::model::Direction as Aisle;
pub use afc_domain::wire::GateDirection;

/// An alarm or state change seen on the PLC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlcEvent {
    /// The PLC stopped answering (or could not be reached).
    Offline,
    /// The PLC answers again.
    Online,
    /// The PLC's tailgating counter went up by this much.
    Tailgating(u16),
    /// A passage was counted with no open command for it.
    ForcedPassage(Aisle),
    DoorFault(bool),
    EmergencyInput(bool),
}

impl PlcEvent {
    /// The event name on `gates/{gate}/events` (SPEC §5).
    pub fn kind(self) -> &'static str {
        match self {
            PlcEvent::Offline => "plc_offline",
            PlcEvent::Online => "plc_online",
            PlcEvent::Tailgating(_) => "tailgating",
            PlcEvent::ForcedPassage(_) => "forced_passage",
            PlcEvent::DoorFault(_) => "door_fault",
            PlcEvent::EmergencyInput(_) => "emergency_input",
        }
    }
}

/// What the PLC reported on the last poll.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlcInputs {
    pub passage_entry: bool,
    pub passage_exit: bool,
    pub flaps_open: bool,
    pub door_fault: bool,
    pub emergency_input: bool,
    pub entries_total: u32,
    pub exits_total: u32,
    pub tailgating_total: u16,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PlcError {
    #[error("the PLC is offline")]
    Offline,
    #[error("the PLC did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Modbus transport error: {0}")]
    Io(String),
    #[error("the PLC answered with exception {0}")]
    Exception(String),
    #[error("the PLC task has stopped")]
    Stopped,
}

/// Settings of the Modbus task.
#[derive(Debug, Clone)]
pub struct PlcConfig {
    pub address: SocketAddr,
    pub map: RegisterMap,
    /// Timeout of one Modbus call (connect included).
    pub call_timeout: Duration,
    /// How often inputs and counters are polled.
    pub poll_interval: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl PlcConfig {
    pub fn new(address: SocketAddr) -> PlcConfig {
        PlcConfig {
            address,
            map: RegisterMap::default(),
            call_timeout: Duration::from_millis(250),
            poll_interval: Duration::from_millis(100),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

enum Command {
    Open {
        aisle: Aisle,
        display_code: u16,
        display_fen: u32,
    },
    /// The open coil alone (the display was written already).
    Coil {
        aisle: Aisle,
    },
    Show {
        display_code: u16,
        display_fen: u32,
    },
    FreePassage(bool),
    OutOfService(bool),
    Direction(GateDirection),
    Alarm(bool),
    ReadInputs,
}

enum Reply {
    Done,
    Inputs(PlcInputs),
}

struct Request {
    cmd: Command,
    reply: oneshot::Sender<Result<Reply, PlcError>>,
}

/// The way to the PLC task; cheap to clone.
#[derive(Clone)]
pub struct PlcHandle {
    tx: mpsc::Sender<Request>,
    online: watch::Receiver<bool>,
    events: broadcast::Sender<PlcEvent>,
    inputs: watch::Receiver<PlcInputs>,
}

impl PlcHandle {
    /// What the last poll read (counters for heartbeats).
    pub fn last_inputs(&self) -> PlcInputs {
        *self.inputs.borrow()
    }

    /// Whether the PLC can be commanded right now.
    pub fn online(&self) -> bool {
        *self.online.borrow()
    }

    pub fn online_watch(&self) -> watch::Receiver<bool> {
        self.online.clone()
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<PlcEvent> {
        self.events.subscribe()
    }

    async fn call(&self, cmd: Command) -> Result<Reply, PlcError> {
        if !self.online() {
            return Err(PlcError::Offline);
        }
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request { cmd, reply }).await.map_err(|_| PlcError::Stopped)?;
        rx.await.map_err(|_| PlcError::Stopped)?
    }

    /// Shows the decision and opens the flaps for one passage; returns once the PLC acknowledged.
    pub async fn open(&self, aisle: Aisle, display_code: u16, display_fen: u32) -> Result<(), PlcError> {
        self.call(Command::Open { aisle, display_code, display_fen }).await.map(|_| ())
    }

    /// Opens the flaps for one passage without touching the display (written just before).
    pub async fn open_coil(&self, aisle: Aisle) -> Result<(), PlcError> {
        self.call(Command::Coil { aisle }).await.map(|_| ())
    }

    /// Shows a message (a reject reason) without opening.
    pub async fn show(&self, display_code: u16, display_fen: u32) -> Result<(), PlcError> {
        self.call(Command::Show { display_code, display_fen }).await.map(|_| ())
    }

    /// Asks for the flaps to be held open (or released). Kept and re-applied after reconnects,
    /// so it is accepted while offline too.
    pub async fn set_free_passage(&self, on: bool) -> Result<(), PlcError> {
        self.setting(Command::FreePassage(on)).await
    }

    pub async fn set_out_of_service(&self, on: bool) -> Result<(), PlcError> {
        self.setting(Command::OutOfService(on)).await
    }

    pub async fn set_direction(&self, d: GateDirection) -> Result<(), PlcError> {
        self.setting(Command::Direction(d)).await
    }

    pub async fn set_alarm(&self, on: bool) -> Result<(), PlcError> {
        self.setting(Command::Alarm(on)).await
    }

    /// Settings always reach the task (which stores them) even while the PLC is offline.
    async fn setting(&self, cmd: Command) -> Result<(), PlcError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Request { cmd, reply }).await.map_err(|_| PlcError::Stopped)?;
        rx.await.map_err(|_| PlcError::Stopped)?.map(|_| ())
    }

    pub async fn read_inputs(&self) -> Result<PlcInputs, PlcError> {
        match self.call(Command::ReadInputs).await? {
            Reply::Inputs(i) => Ok(i),
            Reply::Done => Err(PlcError::Io("unexpected reply".into())),
        }
    }
}

/// The outputs the agent wants the PLC to hold.
#[derive(Debug, Clone, Copy)]
struct Desired {
    /// Requested by the agent (emergency_release, entry_free).
    free_passage: bool,
    /// Set by the task itself on the hard-wired emergency input.
    emergency: bool,
    out_of_service: bool,
    direction: GateDirection,
    alarm: bool,
}

impl Desired {
    fn free(&self) -> bool {
        self.free_passage || self.emergency
    }
}

/// Starts the Modbus task; it runs until `cancel` fires.
pub fn spawn(config: PlcConfig, metrics: Arc<Metrics>, cancel: CancellationToken) -> PlcHandle {
    spawn_with_events(config, metrics, cancel).0
}

/// Starts the Modbus task with a receiver of its events subscribed before the task runs, so the
/// first determination (`Offline` for a PLC unreachable from the start) is not lost; with the
/// task's handle, for joining it at shutdown.
pub fn spawn_with_events(
    config: PlcConfig,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> (PlcHandle, broadcast::Receiver<PlcEvent>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let (online_tx, online) = watch::channel(false);
    let (events, first_rx) = broadcast::channel(256);
    let (inputs_tx, inputs) = watch::channel(PlcInputs::default());
    let task = PlcTask {
        inputs: inputs_tx,
        config,
        metrics,
        online: online_tx,
        announced: None,
        events: events.clone(),
        ctx: None,
        desired: Desired {
            free_passage: false,
            emergency: false,
            out_of_service: false,
            direction: GateDirection::Bidirectional,
            alarm: false,
        },
        last: None,
        opens: alarms::OpenCommands::default(),
    };
    let handle = tokio::spawn(task.run(rx, cancel));
    (PlcHandle { tx, online, events, inputs }, first_rx, handle)
}

struct PlcTask {
    /// The last inputs read, for heartbeats.
    inputs: watch::Sender<PlcInputs>,
    config: PlcConfig,
    metrics: Arc<Metrics>,
    online: watch::Sender<bool>,
    /// What was last announced (event, metric, log): `None` until the first connect attempt
    /// decided, so a PLC unreachable from the start raises `plc_offline` at once.
    announced: Option<bool>,
    events: broadcast::Sender<PlcEvent>,
    ctx: Option<Context>,
    desired: Desired,
    /// Inputs of the previous poll since the last (re)connect, for edge detection.
    last: Option<PlcInputs>,
    /// Open commands not yet matched by a counted passage.
    opens: alarms::OpenCommands,
}

type Step<T> = Result<T, PlcError>;

impl PlcTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>, cancel: CancellationToken) {
        tracing::info!(plc = %self.config.address, "plc task started");
        let mut backoff = Backoff::new(self.config.backoff_min, self.config.backoff_max);
        let mut next_connect = tokio::time::Instant::now();
        let mut poll = tokio::time::interval(self.config.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.ctx.is_none() && tokio::time::Instant::now() >= next_connect {
                match self.connect().await {
                    Ok(()) => {
                        backoff.reset();
                        self.set_online(true);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "plc connect failed");
                        self.set_online(false);
                        next_connect = tokio::time::Instant::now() + backoff.next_wait();
                    }
                }
            }
            let reconnect_at = next_connect;
            tokio::select! {
                () = cancel.cancelled() => break,
                req = rx.recv() => {
                    let Some(req) = req else { break };
                    let r = self.execute(req.cmd).await;
                    let _ = req.reply.send(r);
                }
                _ = poll.tick(), if self.ctx.is_some() => {
                    if let Err(e) = self.poll().await {
                        tracing::debug!(error = %e, "plc poll failed");
                    }
                }
                () = tokio::time::sleep_until(reconnect_at), if self.ctx.is_none() => {}
            }
            if self.ctx.is_none() && *self.online.borrow() {
                self.set_online(false);
                next_connect = tokio::time::Instant::now() + backoff.next_wait();
            }
        }
        if let Some(mut ctx) = self.ctx.take() {
            let _ = tokio::time::timeout(
                self.config.call_timeout,
                tokio_modbus::client::Client::disconnect(&mut ctx),
            )
            .await;
        }
        tracing::info!("plc task stopped");
    }

    fn set_online(&mut self, on: bool) {
        if self.announced != Some(on) {
            self.announced = Some(on);
            self.online.send_replace(on);
            self.metrics.plc_online.store(on, std::sync::atomic::Ordering::Relaxed);
            let ev = if on { PlcEvent::Online } else { PlcEvent::Offline };
            if on {
                tracing::info!("plc online");
            } else {
                tracing::warn!("plc offline");
                self.metrics.event("plc_offline");
            }
            let _ = self.events.send(ev);
        }
    }

    async fn connect(&mut self) -> Step<()> {
        let addr = self.config.address;
        let t = self.config.call_timeout;
        let stream = match tokio::time::timeout(t, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics.modbus_error("connect");
                return Err(PlcError::Io(e.to_string()));
            }
            Err(_) => {
                self.metrics.modbus_error("connect");
                return Err(PlcError::Timeout(t));
            }
        };
        let _ = stream.set_nodelay(true);
        self.ctx = Some(tokio_modbus::client::tcp::attach_slave(stream, Slave(self.config.map.unit_id)));
        self.last = None;
        // Re-apply every output the agent wants; a restarted PLC has forgotten them. The first
        // read also proves the PLC answers before we call it online.
        self.poll().await?;
        self.apply_desired().await?;
        tracing::info!(plc = %addr, "plc connected");
        Ok(())
    }

    /// Runs one Modbus call with the timeout; on any failure drops the connection.
    async fn io<T, F>(&mut self, op: &'static str, f: F) -> Step<T>
    where
        F: for<'a> FnOnce(
            &'a mut Context,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = tokio_modbus::Result<T>> + Send + 'a>,
        >,
    {
        let t = self.config.call_timeout;
        let Some(ctx) = self.ctx.as_mut() else { return Err(PlcError::Offline) };
        let started = Instant::now();
        let r = tokio::time::timeout(t, f(ctx)).await;
        self.metrics.modbus_call(op, started.elapsed());
        let err = match r {
            Ok(Ok(Ok(v))) => return Ok(v),
            Ok(Ok(Err(code))) => {
                self.metrics.modbus_error("exception");
                PlcError::Exception(format!("{code:?}"))
            }
            Ok(Err(e)) => {
                self.metrics.modbus_error("io");
                PlcError::Io(e.to_string())
            }
            Err(_) => {
                self.metrics.modbus_error("timeout");
                PlcError::Timeout(t)
            }
        };
        tracing::warn!(op, error = %err, "plc call failed; dropping the connection");
        self.ctx = None;
        Err(err)
    }

    async fn write_coil(&mut self, addr: u16, v: bool) -> Step<()> {
        self.io("write_coil", move |c| Box::pin(c.write_single_coil(addr, v))).await
    }

    async fn write_registers(&mut self, addr: u16, words: Vec<u16>) -> Step<()> {
        self.io("write_registers", move |c| {
            Box::pin(async move { c.write_multiple_registers(addr, &words).await })
        })
        .await
    }

    async fn apply_desired(&mut self) -> Step<()> {
        let d = self.desired;
        let c = self.config.map.coils;
        self.write_coil(c.free_passage, d.free()).await?;
        self.write_coil(c.out_of_service, d.out_of_service).await?;
        self.write_coil(c.alarm, d.alarm).await?;
        let dir = self.config.map.holding_registers.direction;
        self.write_registers(dir, vec![d.direction.code()]).await
    }

    async fn show(&mut self, display_code: u16, display_fen: u32) -> Step<()> {
        let h = self.config.map.holding_registers;
        let [hi, lo] = u32_to_words(display_fen);
        if h.direction == h.display_code.wrapping_add(1) && h.display_fen == h.display_code.wrapping_add(2) {
            // The default layout: code, direction and fare are contiguous, one call.
            let words = vec![display_code, self.desired.direction.code(), hi, lo];
            self.write_registers(h.display_code, words).await
        } else {
            self.write_registers(h.display_code, vec![display_code]).await?;
            self.write_registers(h.display_fen, vec![hi, lo]).await
        }
    }

    async fn execute(&mut self, cmd: Command) -> Step<Reply> {
        let c = self.config.map.coils;
        let needs_link = matches!(
            cmd,
            Command::Open { .. } | Command::Coil { .. } | Command::Show { .. } | Command::ReadInputs
        );
        if needs_link && self.ctx.is_none() {
            return Err(PlcError::Offline);
        }
        match cmd {
            Command::Open { aisle, display_code, display_fen } => {
                self.show(display_code, display_fen).await?;
                let coil = match aisle {
                    Aisle::Entry => c.open_entry,
                    Aisle::Exit => c.open_exit,
                };
                self.write_coil(coil, true).await?;
                self.opens.opened(aisle, Instant::now());
            }
            Command::Coil { aisle } => {
                let coil = match aisle {
                    Aisle::Entry => c.open_entry,
                    Aisle::Exit => c.open_exit,
                };
                self.write_coil(coil, true).await?;
                self.opens.opened(aisle, Instant::now());
            }
            Command::Show { display_code, display_fen } => self.show(display_code, display_fen).await?,
            Command::FreePassage(on) => {
                self.desired.free_passage = on;
                let v = self.desired.free();
                if self.ctx.is_some() {
                    self.write_coil(c.free_passage, v).await?;
                }
            }
            Command::OutOfService(on) => {
                self.desired.out_of_service = on;
                if self.ctx.is_some() {
                    self.write_coil(c.out_of_service, on).await?;
                }
            }
            Command::Alarm(on) => {
                self.desired.alarm = on;
                if self.ctx.is_some() {
                    self.write_coil(c.alarm, on).await?;
                }
            }
            Command::Direction(d) => {
                self.desired.direction = d;
                if self.ctx.is_some() {
                    let addr = self.config.map.holding_registers.direction;
                    self.write_registers(addr, vec![d.code()]).await?;
                }
            }
            Command::ReadInputs => return self.read_inputs().await.map(Reply::Inputs),
        }
        Ok(Reply::Done)
    }

    async fn read_inputs(&mut self) -> Step<PlcInputs> {
        let map = self.config.map;
        let (ia, ic) = map.input_span();
        let bits = self.io("read_inputs", move |c| Box::pin(c.read_discrete_inputs(ia, ic))).await?;
        let (ra, rc) = map.counter_span();
        let regs = self.io("read_counters", move |c| Box::pin(c.read_input_registers(ra, rc))).await?;
        let bit = |a: u16| bits.get(usize::from(a.wrapping_sub(ia))).copied().unwrap_or(false);
        let reg = |a: u16| regs.get(usize::from(a.wrapping_sub(ra))).copied().unwrap_or(0);
        let i = map.inputs;
        let r = map.input_registers;
        Ok(PlcInputs {
            passage_entry: bit(i.passage_entry),
            passage_exit: bit(i.passage_exit),
            flaps_open: bit(i.flaps_open),
            door_fault: bit(i.door_fault),
            emergency_input: bit(i.emergency_input),
            entries_total: words_to_u32(reg(r.entries_total), reg(r.entries_total.wrapping_add(1))),
            exits_total: words_to_u32(reg(r.exits_total), reg(r.exits_total.wrapping_add(1))),
            tailgating_total: reg(r.tailgating_total),
        })
    }

    fn raise(&self, ev: PlcEvent) {
        tracing::warn!(event = ev.kind(), ?ev, "gate alarm");
        self.metrics.event(ev.kind());
        let _ = self.events.send(ev);
    }

    /// Reads inputs and counters, raises alarms on edges ([`alarms::evaluate`]), and frees the
    /// passage on the emergency input.
    async fn poll(&mut self) -> Step<()> {
        let now = self.read_inputs().await?;
        let prev = self.last.replace(now);
        self.inputs.send_replace(now);
        let verdict = alarms::evaluate(
            prev.as_ref(),
            &now,
            &self.opens,
            self.desired.free_passage,
            self.desired.emergency,
            Instant::now(),
        );
        for ev in verdict.events {
            self.raise(ev);
            if let (PlcEvent::EmergencyInput(_), Some(on)) = (ev, verdict.emergency) {
                self.desired.emergency = on;
                let v = self.desired.free();
                let coil = self.config.map.coils.free_passage;
                self.write_coil(coil, v).await?;
            }
        }
        self.opens = verdict.opens;
        Ok(())
    }
}
