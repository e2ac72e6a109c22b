//! A gate PLC simulator: a Modbus TCP server with the SPEC §6 register map and a simulated aisle.
//!
//! Writing `open_entry` / `open_exit` opens the flaps, a simulated passenger walks through (the
//! passage input is set, then cleared), the counter goes up and the PLC clears the coil, as a real
//! gate PLC does. `free_passage` holds the flaps open, `out_of_service` refuses passages. The
//! hard-wired inputs (emergency, door fault) and the tailgating / forced-passage detectors are
//! driven through the [`PlcSim`] handle.
//!
//! Faults are switchable at run time, for tests (in process, [`PlcSim::set_fault`]) and for the
//! `plc-sim` binary (a line-based control socket, [`PlcSim::control`]): a delay before every
//! answer, silence (requests are read and never answered), exception responses, and dropped
//! connections (every request closes its connection; [`PlcSim::drop_connections`] closes the
//! open ones at once). [`PlcSim::drop_on_next_open`] drops the connection on the next open-coil
//! write only, without applying it: the PLC lost between the gate's pre-check and its open
//! command, deterministically.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_modbus::prelude::{ExceptionCode, Request, Response};
use tokio_modbus::server::tcp::Server;
use tokio_util::sync::CancellationToken;

use crate::hardware::{u32_to_words, words_to_u32, RegisterMap};

/// A fault the simulator applies to every request while it is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "fault", content = "ms")]
pub enum Fault {
    /// Answer normally.
    None,
    /// Answer after this delay.
    Delay(u64),
    /// Read requests and never answer them.
    Silence,
    /// Answer every request with a Modbus exception (server device failure).
    Exception,
    /// Close the connection on every request.
    Disconnect,
}

/// What a simulated write did, in order, for tests to check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SimWrite {
    Coil { addr: u16, value: bool },
    Registers { addr: u16, values: Vec<u16> },
}

/// The simulated PLC's memory and aisle.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SimState {
    pub open_entry: bool,
    pub open_exit: bool,
    pub free_passage: bool,
    pub alarm: bool,
    pub out_of_service: bool,
    pub passage_entry: bool,
    pub passage_exit: bool,
    pub flaps_open: bool,
    pub door_fault: bool,
    pub emergency_input: bool,
    pub entries_total: u32,
    pub exits_total: u32,
    pub tailgating_total: u16,
    pub display_code: u16,
    pub direction: u16,
    pub display_fen: u32,
    /// Requests answered (or swallowed) so far.
    pub requests: u64,
    /// The last writes, oldest first (bounded to [`WRITE_LOG_LEN`]).
    pub writes: Vec<SimWrite>,
}

/// How many writes [`SimState::writes`] keeps.
pub const WRITE_LOG_LEN: usize = 4096;

/// Timing of the simulated aisle.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub map: RegisterMap,
    /// From the open command to the end of the passage (the passage input is set for the second
    /// half of it).
    pub passage: Duration,
    /// Whether an open command is followed by a passenger at all (off: the coil stays set until
    /// the open timeout).
    pub auto_passage: bool,
    /// How long the PLC holds an open coil with no passenger before clearing it.
    pub open_timeout: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            map: RegisterMap::default(),
            passage: Duration::from_millis(800),
            auto_passage: true,
            open_timeout: Duration::from_secs(10),
        }
    }
}

struct Inner {
    config: SimConfig,
    state: Mutex<(SimState, Fault)>,
    /// Clones of the open client sockets, so faults can close them.
    conns: Mutex<Vec<std::net::TcpStream>>,
    /// Bumped on every change, so tests wait for a state instead of sleeping.
    changed: watch::Sender<u64>,
    /// Open-coil writes still to be answered by closing the connection instead.
    drop_opens: std::sync::atomic::AtomicU32,
}

/// A handle on a simulated PLC; clones share the same PLC.
#[derive(Clone)]
pub struct PlcSim {
    inner: Arc<Inner>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aisle {
    Entry,
    Exit,
}

impl PlcSim {
    pub fn new(config: SimConfig) -> PlcSim {
        let (changed, _) = watch::channel(0);
        PlcSim {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new((SimState::default(), Fault::None)),
                conns: Mutex::new(Vec::new()),
                changed,
                drop_opens: std::sync::atomic::AtomicU32::new(0),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (SimState, Fault)> {
        // A poisoned lock means a panic while holding it; the state is plain data, keep using it.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update<R>(&self, f: impl FnOnce(&mut SimState) -> R) -> R {
        let r = {
            let mut g = self.lock();
            let r = f(&mut g.0);
            let free = g.0.free_passage;
            let opening = g.0.open_entry || g.0.open_exit;
            g.0.flaps_open = free || opening;
            r
        };
        self.inner.changed.send_modify(|v| *v += 1);
        r
    }

    /// A copy of the PLC's current state.
    pub fn snapshot(&self) -> SimState {
        self.lock().0.clone()
    }

    pub fn fault(&self) -> Fault {
        self.lock().1
    }

    pub fn set_fault(&self, fault: Fault) {
        self.lock().1 = fault;
        if fault == Fault::Disconnect {
            self.drop_connections();
        }
        self.inner.changed.send_modify(|v| *v += 1);
        tracing::info!(?fault, "plc-sim fault set");
    }

    /// Closes every open client connection now.
    pub fn drop_connections(&self) {
        let conns = std::mem::take(&mut *self.inner.conns.lock().unwrap_or_else(|p| p.into_inner()));
        for c in conns {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The next open-coil write (`open_entry` or `open_exit` set) is not applied: its connection
    /// is closed instead, as when the PLC drops off the network just before the open command.
    /// Requests before and after it are answered normally.
    pub fn drop_on_next_open(&self) {
        self.inner.drop_opens.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Takes one pending [`PlcSim::drop_on_next_open`] if `req` is an open-coil write.
    fn take_dropped_open(&self, req: &Request<'static>) -> bool {
        let c = self.inner.config.map.coils;
        let open =
            matches!(req, Request::WriteSingleCoil(a, true) if *a == c.open_entry || *a == c.open_exit);
        open && self
            .inner
            .drop_opens
            .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |n| {
                n.checked_sub(1)
            })
            .is_ok()
    }

    pub fn set_emergency_input(&self, on: bool) {
        self.update(|s| s.emergency_input = on);
    }

    pub fn set_door_fault(&self, on: bool) {
        self.update(|s| s.door_fault = on);
    }

    /// The tailgating detector fires (a second person followed through the aisle).
    pub fn tailgate(&self) {
        self.update(|s| s.tailgating_total = s.tailgating_total.wrapping_add(1));
    }

    /// Someone pushes through the closed flaps: a passage is counted with no open command.
    pub fn force_passage(&self, entry: bool) {
        self.update(|s| {
            if entry {
                s.entries_total = s.entries_total.wrapping_add(1);
            } else {
                s.exits_total = s.exits_total.wrapping_add(1);
            }
        });
    }

    /// Waits until `pred` holds for the state, or `timeout` passes; returns the last state seen
    /// and whether `pred` held.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&SimState) -> bool) -> (SimState, bool) {
        let mut rx = self.inner.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = self.snapshot();
            if pred(&s) {
                return (s, true);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    let s = self.snapshot();
                    let ok = pred(&s);
                    return (s, ok);
                }
            }
        }
    }

    /// Serves Modbus TCP on `listener` until `cancel` fires.
    pub async fn serve(&self, listener: TcpListener, cancel: CancellationToken) -> io::Result<()> {
        let server = Server::new(listener);
        let sim = self.clone();
        let on_connected = move |stream: TcpStream, addr: SocketAddr| {
            let sim = sim.clone();
            async move {
                let _ = stream.set_nodelay(true);
                let std = stream.into_std()?;
                let mine = std.try_clone()?;
                sim.inner.conns.lock().unwrap_or_else(|p| p.into_inner()).push(std.try_clone()?);
                tracing::debug!(%addr, "plc-sim client connected");
                let stream = TcpStream::from_std(std)?;
                Ok(Some((SimService { sim, conn: mine }, stream)))
            }
        };
        let on_error = |e: io::Error| tracing::debug!(error = %e, "plc-sim connection ended");
        server.serve_until(&on_connected, on_error, cancel.cancelled_owned()).await?;
        Ok(())
    }

    /// Applies one control line of the `plc-sim` binary's control socket and returns the answer:
    /// `fault none|silence|exception|disconnect|delay MS`, `emergency on|off`,
    /// `door_fault on|off`, `tailgate`, `force entry|exit`, `drop`, `drop_next_open`, `state`.
    pub fn control(&self, line: &str) -> Result<String, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let on_off = |w: Option<&&str>| match w.copied() {
            Some("on") => Ok(true),
            Some("off") => Ok(false),
            _ => Err("expected on|off".to_owned()),
        };
        match words.first().copied() {
            Some("fault") => {
                let fault = match (words.get(1).copied(), words.get(2)) {
                    (Some("none"), _) => Fault::None,
                    (Some("silence"), _) => Fault::Silence,
                    (Some("exception"), _) => Fault::Exception,
                    (Some("disconnect"), _) => Fault::Disconnect,
                    (Some("delay"), Some(ms)) => {
                        Fault::Delay(ms.parse().map_err(|_| "bad delay".to_owned())?)
                    }
                    _ => return Err("expected fault none|silence|exception|disconnect|delay MS".into()),
                };
                self.set_fault(fault);
            }
            Some("emergency") => self.set_emergency_input(on_off(words.get(1))?),
            Some("door_fault") => self.set_door_fault(on_off(words.get(1))?),
            Some("tailgate") => self.tailgate(),
            Some("force") => match words.get(1).copied() {
                Some("entry") => self.force_passage(true),
                Some("exit") => self.force_passage(false),
                _ => return Err("expected force entry|exit".into()),
            },
            Some("drop") => self.drop_connections(),
            Some("drop_next_open") => self.drop_on_next_open(),
            Some("state") => {
                let mut s = self.snapshot();
                s.writes.clear();
                return serde_json::to_string(&s).map_err(|e| e.to_string());
            }
            _ => return Err(format!("unknown command {line:?}")),
        }
        Ok("ok".into())
    }

    fn log_write(s: &mut SimState, w: SimWrite) {
        if s.writes.len() >= WRITE_LOG_LEN {
            s.writes.remove(0);
        }
        s.writes.push(w);
    }

    /// Handles one request against the memory, as a PLC would.
    fn handle(&self, req: Request<'static>) -> Result<Response, ExceptionCode> {
        let map = self.inner.config.map;
        let mut opened = None;
        let resp = self.update(|s| {
            s.requests += 1;
            match req {
                Request::ReadCoils(addr, cnt) => {
                    let v = (0..cnt).map(|i| coil(s, &map, addr.wrapping_add(i)).unwrap_or(false)).collect();
                    Ok(Response::ReadCoils(v))
                }
                Request::ReadDiscreteInputs(addr, cnt) => {
                    let v = (0..cnt).map(|i| input(s, &map, addr.wrapping_add(i))).collect();
                    Ok(Response::ReadDiscreteInputs(v))
                }
                Request::ReadInputRegisters(addr, cnt) => {
                    let v = (0..cnt).map(|i| input_register(s, &map, addr.wrapping_add(i))).collect();
                    Ok(Response::ReadInputRegisters(v))
                }
                Request::ReadHoldingRegisters(addr, cnt) => {
                    let v = (0..cnt).map(|i| holding(s, &map, addr.wrapping_add(i)).unwrap_or(0)).collect();
                    Ok(Response::ReadHoldingRegisters(v))
                }
                Request::WriteSingleCoil(addr, value) => {
                    opened = write_coil(s, &map, addr, value)?;
                    Self::log_write(s, SimWrite::Coil { addr, value });
                    Ok(Response::WriteSingleCoil(addr, value))
                }
                Request::WriteMultipleCoils(addr, values) => {
                    for (i, v) in values.iter().enumerate() {
                        let a = addr.wrapping_add(i as u16);
                        if let Some(o) = write_coil(s, &map, a, *v)? {
                            opened = Some(o);
                        }
                        Self::log_write(s, SimWrite::Coil { addr: a, value: *v });
                    }
                    Ok(Response::WriteMultipleCoils(addr, values.len() as u16))
                }
                Request::WriteSingleRegister(addr, value) => {
                    write_holding(s, &map, addr, &[value])?;
                    Self::log_write(s, SimWrite::Registers { addr, values: vec![value] });
                    Ok(Response::WriteSingleRegister(addr, value))
                }
                Request::WriteMultipleRegisters(addr, values) => {
                    write_holding(s, &map, addr, &values)?;
                    Self::log_write(s, SimWrite::Registers { addr, values: values.to_vec() });
                    Ok(Response::WriteMultipleRegisters(addr, values.len() as u16))
                }
                _ => Err(ExceptionCode::IllegalFunction),
            }
        });
        if let Some(aisle) = opened {
            self.spawn_passage(aisle);
        }
        resp
    }

    /// A passenger walks through after an open command, then the PLC clears the coil.
    fn spawn_passage(&self, aisle: Aisle) {
        let sim = self.clone();
        let cfg = self.inner.config;
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        rt.spawn(async move {
            let started = Instant::now();
            if cfg.auto_passage {
                tokio::time::sleep(cfg.passage / 2).await;
                sim.update(|s| match aisle {
                    Aisle::Entry => s.passage_entry = true,
                    Aisle::Exit => s.passage_exit = true,
                });
                tokio::time::sleep(cfg.passage / 2).await;
                sim.update(|s| match aisle {
                    Aisle::Entry => {
                        s.passage_entry = false;
                        s.open_entry = false;
                        s.entries_total = s.entries_total.wrapping_add(1);
                    }
                    Aisle::Exit => {
                        s.passage_exit = false;
                        s.open_exit = false;
                        s.exits_total = s.exits_total.wrapping_add(1);
                    }
                });
            } else {
                tokio::time::sleep(cfg.open_timeout.saturating_sub(started.elapsed())).await;
                sim.update(|s| match aisle {
                    Aisle::Entry => s.open_entry = false,
                    Aisle::Exit => s.open_exit = false,
                });
            }
        });
    }
}

fn coil(s: &SimState, m: &RegisterMap, a: u16) -> Option<bool> {
    let c = &m.coils;
    Some(match a {
        _ if a == c.open_entry => s.open_entry,
        _ if a == c.open_exit => s.open_exit,
        _ if a == c.free_passage => s.free_passage,
        _ if a == c.alarm => s.alarm,
        _ if a == c.out_of_service => s.out_of_service,
        _ => return None,
    })
}

/// Writes a coil; returns the aisle to simulate when it starts a passage.
fn write_coil(s: &mut SimState, m: &RegisterMap, a: u16, v: bool) -> Result<Option<Aisle>, ExceptionCode> {
    let c = &m.coils;
    let mut opened = None;
    if a == c.open_entry {
        if v && !s.open_entry && !s.out_of_service {
            opened = Some(Aisle::Entry);
        }
        s.open_entry = v && !s.out_of_service;
    } else if a == c.open_exit {
        if v && !s.open_exit && !s.out_of_service {
            opened = Some(Aisle::Exit);
        }
        s.open_exit = v && !s.out_of_service;
    } else if a == c.free_passage {
        s.free_passage = v;
    } else if a == c.alarm {
        s.alarm = v;
    } else if a == c.out_of_service {
        s.out_of_service = v;
    } else {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(opened)
}

fn input(s: &SimState, m: &RegisterMap, a: u16) -> bool {
    let i = &m.inputs;
    match a {
        _ if a == i.passage_entry => s.passage_entry,
        _ if a == i.passage_exit => s.passage_exit,
        _ if a == i.flaps_open => s.flaps_open,
        _ if a == i.door_fault => s.door_fault,
        _ if a == i.emergency_input => s.emergency_input,
        _ => false,
    }
}

fn input_register(s: &SimState, m: &RegisterMap, a: u16) -> u16 {
    let r = &m.input_registers;
    let [eh, el] = u32_to_words(s.entries_total);
    let [xh, xl] = u32_to_words(s.exits_total);
    match a {
        _ if a == r.entries_total => eh,
        _ if a == r.entries_total.wrapping_add(1) => el,
        _ if a == r.exits_total => xh,
        _ if a == r.exits_total.wrapping_add(1) => xl,
        _ if a == r.tailgating_total => s.tailgating_total,
        _ => 0,
    }
}

fn holding(s: &SimState, m: &RegisterMap, a: u16) -> Option<u16> {
    let h = &m.holding_registers;
    let [fh, fl] = u32_to_words(s.display_fen);
    Some(match a {
        _ if a == h.display_code => s.display_code,
        _ if a == h.direction => s.direction,
        _ if a == h.display_fen => fh,
        _ if a == h.display_fen.wrapping_add(1) => fl,
        _ => return None,
    })
}

fn write_holding(s: &mut SimState, m: &RegisterMap, addr: u16, values: &[u16]) -> Result<(), ExceptionCode> {
    let h = &m.holding_registers;
    let [mut fh, mut fl] = u32_to_words(s.display_fen);
    for (i, v) in values.iter().enumerate() {
        let a = addr.wrapping_add(i as u16);
        match a {
            _ if a == h.display_code => s.display_code = *v,
            _ if a == h.direction => {
                if *v > 3 {
                    return Err(ExceptionCode::IllegalDataValue);
                }
                s.direction = *v
            }
            _ if a == h.display_fen => fh = *v,
            _ if a == h.display_fen.wrapping_add(1) => fl = *v,
            _ => return Err(ExceptionCode::IllegalDataAddress),
        }
    }
    s.display_fen = words_to_u32(fh, fl);
    Ok(())
}

type SimFuture = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

/// The Modbus service of one client connection.
struct SimService {
    sim: PlcSim,
    /// This connection's socket, so a `Disconnect` fault can close it.
    conn: std::net::TcpStream,
}

impl tokio_modbus::server::Service for SimService {
    type Request = Request<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = SimFuture;

    fn call(&self, req: Self::Request) -> Self::Future {
        if self.sim.take_dropped_open(&req) {
            tracing::info!("plc-sim: open command dropped with its connection");
            self.sim.update(|s| s.requests += 1);
            let _ = self.conn.shutdown(std::net::Shutdown::Both);
            return Box::pin(std::future::ready(Ok(None)));
        }
        match self.sim.fault() {
            Fault::None => {
                let r = self.sim.handle(req).map(Some);
                Box::pin(std::future::ready(r))
            }
            Fault::Delay(ms) => {
                let sim = self.sim.clone();
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    sim.handle(req).map(Some)
                })
            }
            Fault::Silence => {
                self.sim.update(|s| s.requests += 1);
                Box::pin(std::future::ready(Ok(None)))
            }
            Fault::Exception => {
                self.sim.update(|s| s.requests += 1);
                Box::pin(std::future::ready(Err(ExceptionCode::ServerDeviceFailure)))
            }
            Fault::Disconnect => {
                let _ = self.conn.shutdown(std::net::Shutdown::Both);
                Box::pin(std::future::ready(Ok(None)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_lines_switch_faults_and_drive_inputs() {
        let sim = PlcSim::new(SimConfig::default());
        assert_eq!(sim.control("fault delay 25"), Ok("ok".into()));
        assert_eq!(sim.fault(), Fault::Delay(25));
        sim.control("fault silence").unwrap();
        assert_eq!(sim.fault(), Fault::Silence);
        sim.control("emergency on").unwrap();
        sim.control("tailgate").unwrap();
        sim.control("force exit").unwrap();
        let s = sim.snapshot();
        assert!(s.emergency_input);
        assert_eq!((s.tailgating_total, s.exits_total), (1, 1));
        assert!(sim.control("fault sometimes").is_err());
        assert!(sim.control("emergency maybe").is_err());
        assert!(sim.control("state").unwrap().contains("\"emergency_input\":true"));
    }

    #[test]
    fn writes_to_unknown_addresses_are_exceptions_and_the_display_holds_a_u32() {
        let sim = PlcSim::new(SimConfig::default());
        assert_eq!(sim.handle(Request::WriteSingleCoil(99, true)), Err(ExceptionCode::IllegalDataAddress));
        sim.handle(Request::WriteMultipleRegisters(0, vec![24, 1, 1, 2].into())).unwrap();
        let s = sim.snapshot();
        assert_eq!((s.display_code, s.direction, s.display_fen), (24, 1, 65_538));
        assert_eq!(sim.handle(Request::WriteSingleRegister(1, 9)), Err(ExceptionCode::IllegalDataValue));
    }
}
