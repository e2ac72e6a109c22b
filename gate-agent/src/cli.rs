//! The command lines of the gate agent and its simulators (`gate-agent`, `plc-sim`, `reader-sim`,
//! `network-sim`). Library functions so the local station (`station`) runs the same code.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use afc_domain::model::StationCode;
use afc_domain::wire::ReaderReply;
use anyhow::Context as _;
use clap::Parser;
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::gate::now;
use crate::hardware::RegisterMap;
use crate::plc_sim::{PlcSim, SimConfig};
use crate::reader_sim::{QrIssuer, ReaderConn, ReaderSim};
use crate::Listeners;

#[derive(Parser)]
#[command(about = "AFC gate agent: decides taps, drives the gate PLC, talks to the station over MQTT")]
struct GateArgs {
    /// Configuration file (see deploy/gate-agent.example.toml).
    #[arg(long, short, env = "GATE_AGENT_CONFIG")]
    config: PathBuf,
}

/// `gate-agent --config FILE`: load the configuration, bind the listeners, run until a signal.
pub fn gate_agent<I: IntoIterator<Item = OsString>>(args: I) -> anyhow::Result<()> {
    let args = GateArgs::parse_from(args);
    afc_process::run_service("info", async move {
        let config = Config::load(&args.config)?;
        let reader = TcpListener::bind(config.reader_listen)
            .await
            .with_context(|| format!("bind reader {}", config.reader_listen))?;
        let metrics = match config.metrics_listen {
            Some(a) => Some(TcpListener::bind(a).await.with_context(|| format!("bind metrics {a}"))?),
            None => None,
        };
        let cancel = afc_process::shutdown_on_signal();
        crate::run(&config, Listeners { reader, metrics }, cancel).await?;
        Ok(())
    })
}

#[derive(Parser)]
#[command(about = "Simulated gate PLC (Modbus TCP, SPEC §6 register map)")]
struct PlcArgs {
    /// Modbus TCP listen address.
    #[arg(long, env = "PLC_SIM_LISTEN", default_value = "127.0.0.1:5020")]
    listen: SocketAddr,
    /// Control socket listen address (one command per line).
    #[arg(long, env = "PLC_SIM_CONTROL")]
    control: Option<SocketAddr>,
    /// Milliseconds from an open command to the end of the simulated passage.
    #[arg(long, env = "PLC_SIM_PASSAGE_MS", default_value_t = 800)]
    passage_ms: u64,
    /// Hardware profile (TOML register map); the SPEC default when absent.
    #[arg(long, env = "PLC_SIM_PROFILE")]
    profile: Option<PathBuf>,
}

/// `plc-sim`: a simulated gate PLC on Modbus TCP, with a line-based control socket for faults and
/// for reading its state (`echo 'state' | nc 127.0.0.1 5021`; see [`PlcSim::control`]).
pub fn plc_sim<I: IntoIterator<Item = OsString>>(args: I) -> anyhow::Result<()> {
    let args = PlcArgs::parse_from(args);
    afc_process::run_service("info", async move {
        let map = match &args.profile {
            Some(p) => RegisterMap::load(p)?,
            None => RegisterMap::default(),
        };
        let sim = PlcSim::new(SimConfig {
            map,
            passage: Duration::from_millis(args.passage_ms),
            ..SimConfig::default()
        });
        let listener =
            TcpListener::bind(args.listen).await.with_context(|| format!("bind {}", args.listen))?;
        tracing::info!(listen = %listener.local_addr()?, "plc-sim serving Modbus TCP");
        if let Some(addr) = args.control {
            let control = TcpListener::bind(addr).await.with_context(|| format!("bind {addr}"))?;
            tokio::spawn(control_loop(control, sim.clone()));
        }
        sim.serve(listener, afc_process::shutdown_on_signal()).await?;
        Ok(())
    })
}

async fn control_loop(listener: TcpListener, sim: PlcSim) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let sim = sim.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let answer = match sim.control(&line) {
                    Ok(a) => a,
                    Err(e) => format!("error: {e}"),
                };
                if w.write_all(format!("{answer}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

#[derive(Parser)]
#[command(about = "Simulated card reader: realistic taps against a gate agent's reader port")]
struct ReaderArgs {
    /// The gate agent's reader address.
    #[arg(long, env = "READER_SIM_ADDR", default_value = "127.0.0.1:7700")]
    addr: SocketAddr,
    /// This station's code.
    #[arg(long, env = "READER_SIM_STATION", default_value_t = 101)]
    station: u16,
    /// Station codes passengers come from (comma-separated).
    #[arg(long, env = "READER_SIM_ORIGINS", value_delimiter = ',', default_value = "102,103,104")]
    origins: Vec<u16>,
    /// Number of taps; 0 taps until stopped, reconnecting whenever the gate agent goes away, and
    /// logs a summary every minute.
    #[arg(long, env = "READER_SIM_TAPS", default_value_t = 100)]
    taps: u64,
    /// Taps per second (0: as fast as the gate answers).
    #[arg(long, env = "READER_SIM_RATE", default_value_t = 2.0)]
    rate: f64,
    /// Hex seed of a QR issuer key the gate trusts (issuer 1, key 1); no QR codes without it.
    #[arg(long, env = "READER_SIM_QR_KEY", hide_env_values = true)]
    qr_key: Option<String>,
    /// Number of simulated cards in the passenger population.
    #[arg(long, env = "READER_SIM_CARDS", default_value_t = 10_000)]
    cards: usize,
    /// Seed of the passenger population and of the tap sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Hex issuer master key (64 digits) of a simulated PSAM: the reader becomes two-phase and
    /// signs every stored-value debit (docs/spec/reader.md). Without it: a one-phase reader.
    #[arg(long, env = "READER_SIM_PSAM_ISSUER_KEY", hide_env_values = true)]
    psam_issuer_key: Option<String>,
    /// The simulated PSAM's id.
    #[arg(long, env = "READER_SIM_PSAM_ID", default_value_t = 1)]
    psam_id: u64,
}

impl ReaderArgs {
    /// The simulated PSAM, when one is configured (its counter starts at 0 for this run).
    fn psam(&self) -> anyhow::Result<Option<crate::reader_sim::SimPsam>> {
        let Some(hex) = &self.psam_issuer_key else { return Ok(None) };
        let master = afc_domain::tac::IssuerKey::from_hex(hex)
            .map_err(|e| anyhow::anyhow!("PSAM issuer key: expected 64 hex digits: {e}"))?;
        let psam = afc_domain::tac::Psam::new(master.psam_key(self.psam_id), 0);
        Ok(Some(crate::reader_sim::SimPsam::new(psam)))
    }
}

/// The simulated QR issuer (issuer 1, key 1) from the hex seed of its key, if one is given.
fn qr_issuer(seed_hex: Option<&str>) -> anyhow::Result<Option<QrIssuer>> {
    let Some(h) = seed_hex else { return Ok(None) };
    let seed: [u8; 32] =
        hex::decode(h.trim())?.try_into().map_err(|_| anyhow::anyhow!("QR key must be 32 bytes of hex"))?;
    Ok(Some(QrIssuer { issuer: 1, key_id: 1, key: SigningKey::from_bytes(&seed) }))
}

/// `reader-sim`: taps a running gate agent with realistic passengers and reports the outcomes.
pub fn reader_sim<I: IntoIterator<Item = OsString>>(args: I) -> anyhow::Result<()> {
    let args = ReaderArgs::parse_from(args);
    afc_process::run_service("info", async move {
        let qr = qr_issuer(args.qr_key.as_deref())?;
        let origins = args.origins.iter().map(|c| StationCode(*c)).collect();
        let sim = ReaderSim::new(args.seed, StationCode(args.station), origins, args.cards, qr);
        if args.taps == 0 {
            tap_forever(sim, &args).await
        } else {
            tap_counted(sim, &args).await
        }
    })
}

async fn tap_counted(mut sim: ReaderSim, args: &ReaderArgs) -> anyhow::Result<()> {
    let mut conn = ReaderConn::connect(args.addr).await?;
    conn.psam = args.psam()?;
    let mut latencies = Vec::with_capacity(args.taps as usize);
    let mut reasons = BTreeMap::<String, u64>::new();
    for _ in 0..args.taps {
        let (presented, tap) = sim.next_tap(now());
        let t = Instant::now();
        let reply = conn.tap(&tap).await?;
        latencies.push(t.elapsed());
        count(&mut sim, presented, reply, &mut reasons);
        pace(args.rate).await;
    }
    latencies.sort();
    let pct =
        |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p) as usize).copied().unwrap_or_default();
    println!("taps: {}  p50 {:?}  p99 {:?}  max {:?}", latencies.len(), pct(0.5), pct(0.99), pct(1.0));
    for (k, v) in reasons {
        println!("  {k}: {v}");
    }
    Ok(())
}

async fn tap_forever(mut sim: ReaderSim, args: &ReaderArgs) -> anyhow::Result<()> {
    let stop = afc_process::shutdown_on_signal();
    let mut reasons = BTreeMap::<String, u64>::new();
    let mut last_summary = Instant::now();
    let mut taps = 0u64;
    // One PSAM across reconnects: its counter never goes back.
    let mut psam = args.psam()?;
    while !stop.is_cancelled() {
        let mut conn = match ReaderConn::connect(args.addr).await {
            Ok(mut c) => {
                c.psam = psam.take();
                c
            }
            Err(e) => {
                tracing::debug!(addr = %args.addr, error = %e, "gate agent not reachable; retrying");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        while !stop.is_cancelled() {
            let (presented, tap) = sim.next_tap(now());
            let reply = tokio::select! {
                _ = stop.cancelled() => break,
                r = conn.tap(&tap) => r,
            };
            match reply {
                Ok(reply) => count(&mut sim, presented, reply, &mut reasons),
                Err(e) => {
                    tracing::info!(addr = %args.addr, error = %e, "reader connection lost; reconnecting");
                    break;
                }
            }
            taps += 1;
            if last_summary.elapsed() >= Duration::from_secs(60) {
                tracing::info!(taps, outcomes = ?reasons, "reader-sim summary");
                last_summary = Instant::now();
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = pace(args.rate) => {}
            }
        }
        psam = conn.psam.take();
    }
    tracing::info!(taps, outcomes = ?reasons, "reader-sim stopped");
    Ok(())
}

fn count(
    sim: &mut ReaderSim,
    presented: crate::reader_sim::Presented,
    reply: ReaderReply,
    reasons: &mut BTreeMap<String, u64>,
) {
    match reply {
        ReaderReply::Response(r) => {
            *reasons.entry(format!("{:?}/{}", r.decision, r.reason)).or_default() += 1;
            sim.apply(presented, &r);
        }
        ReaderReply::Error(e) => *reasons.entry(format!("error/{}", e.error)).or_default() += 1,
    }
}

async fn pace(rate: f64) {
    if rate > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(1.0 / rate)).await;
    }
}

#[derive(Parser)]
#[command(about = "Simulated passengers of a network of stations: in at one station, out at another")]
struct NetworkArgs {
    /// A gate's reader: `STATION_CODE@HOST:PORT`, or `STATION_CODE@HOST:PORT#PSAM_ID` for a
    /// two-phase reader with a simulated PSAM (comma-separated or repeated).
    #[arg(long = "reader", value_delimiter = ',', required = true)]
    readers: Vec<String>,
    /// Taps per second over the whole network.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Passengers in the population.
    #[arg(long, default_value_t = 2_000)]
    passengers: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Hex seed of a QR issuer key the gates trust (issuer 1, key 1); no QR passengers without it.
    #[arg(long, env = "NETWORK_SIM_QR_KEY", hide_env_values = true)]
    qr_key: Option<String>,
    /// Hex issuer master key (64 digits) of the readers' simulated PSAMs.
    #[arg(long, env = "NETWORK_SIM_PSAM_ISSUER_KEY", hide_env_values = true)]
    psam_issuer_key: Option<String>,
}

fn network_gate(text: &str) -> anyhow::Result<crate::network_sim::NetworkGate> {
    let (code, rest) = text.split_once('@').context("a reader is CODE@HOST:PORT[#PSAM_ID]")?;
    let (addr, psam) = match rest.split_once('#') {
        Some((a, p)) => (a, Some(p.parse::<u64>().context("PSAM id")?)),
        None => (rest, None),
    };
    Ok(crate::network_sim::NetworkGate {
        station: StationCode(code.parse().context("station code")?),
        addr: addr.parse().with_context(|| format!("reader address {addr:?}"))?,
        psam_id: psam,
    })
}

/// `network-sim`: passengers who enter at one station's gate and leave at another's, over the
/// readers of every station of a network (the local station's `--stations N`).
pub fn network_sim<I: IntoIterator<Item = OsString>>(args: I) -> anyhow::Result<()> {
    let args = NetworkArgs::parse_from(args);
    afc_process::run_service("info", async move {
        let gates = args.readers.iter().map(|r| network_gate(r)).collect::<anyhow::Result<Vec<_>>>()?;
        let qr = qr_issuer(args.qr_key.as_deref())?;
        let master = match &args.psam_issuer_key {
            Some(h) => Some(
                afc_domain::tac::IssuerKey::from_hex(h)
                    .map_err(|e| anyhow::anyhow!("PSAM issuer key: expected 64 hex digits: {e}"))?,
            ),
            None => None,
        };
        let mut sim = crate::network_sim::NetworkSim::new(args.seed, gates, args.passengers, qr);
        // One connection per reader, kept (with its PSAM, whose counter never goes back).
        let mut conns: BTreeMap<usize, ReaderConn> = BTreeMap::new();
        let mut psams: BTreeMap<usize, crate::reader_sim::SimPsam> = BTreeMap::new();
        let stop = afc_process::shutdown_on_signal();
        let mut reasons = BTreeMap::<String, u64>::new();
        let (mut taps, mut last_summary) = (0u64, Instant::now());
        while !stop.is_cancelled() {
            let Some((p, g, tap)) = sim.next_tap(now()) else { break };
            if let std::collections::btree_map::Entry::Vacant(slot) = conns.entry(g) {
                let gate = &sim.gates[g];
                match ReaderConn::connect(gate.addr).await {
                    Ok(mut c) => {
                        c.psam = psams.remove(&g).or_else(|| {
                            let (m, id) = (master.as_ref()?, gate.psam_id?);
                            Some(crate::reader_sim::SimPsam::new(afc_domain::tac::Psam::new(
                                m.psam_key(id),
                                0,
                            )))
                        });
                        slot.insert(c);
                    }
                    Err(e) => {
                        tracing::debug!(addr = %gate.addr, error = %e, "gate agent not reachable");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = pace(args.rate) => continue,
                        }
                    }
                }
            }
            let Some(conn) = conns.get_mut(&g) else { continue };
            let reply = tokio::select! {
                _ = stop.cancelled() => break,
                r = conn.tap(&tap) => r,
            };
            match reply {
                Ok(ReaderReply::Response(r)) => {
                    *reasons.entry(format!("{:?}/{}", r.decision, r.reason)).or_default() += 1;
                    sim.apply(p, g, &r);
                }
                Ok(ReaderReply::Error(e)) => *reasons.entry(format!("error/{}", e.error)).or_default() += 1,
                Err(e) => {
                    tracing::info!(addr = %sim.gates[g].addr, error = %e, "reader connection lost; reconnecting");
                    if let Some(mut c) = conns.remove(&g) {
                        if let Some(psam) = c.psam.take() {
                            psams.insert(g, psam);
                        }
                    }
                }
            }
            taps += 1;
            if last_summary.elapsed() >= Duration::from_secs(60) {
                let inside = sim.passengers.iter().filter(|p| p.inside.is_some()).count();
                tracing::info!(taps, inside, outcomes = ?reasons, "network-sim summary");
                last_summary = Instant::now();
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = pace(args.rate) => {}
            }
        }
        tracing::info!(taps, outcomes = ?reasons, "network-sim stopped");
        Ok(())
    })
}
