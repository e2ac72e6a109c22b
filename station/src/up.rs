//! `station [up]`: provision (first run), start every service, set the first parameters, print
//! where to look, and run until Ctrl-C or SIGTERM.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

use crate::plan::{Layout, Plan, NODES};
use crate::provision::{secrets, write_configs, Secrets};
use crate::setup::{first_parameters, Api};
use crate::supervise::{reap_leftovers, Service, Supervisor};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A complete local station: 3 controller nodes, an MQTT broker, gate agents with PLC and \
             card-reader simulators, and the reference clearing server, all on loopback.",
    after_help = "Services run as `station <service> …` children: controller, gate-agent, plc-sim, \
                  reader-sim, clearing-server, broker. Logs are in DATA_DIR/logs, pids in DATA_DIR/run/pids."
)]
struct Args {
    /// `up` (the default) runs the station.
    #[arg(value_parser = ["up"], default_value = "up")]
    command: String,
    /// Everything the station keeps: configuration, secrets, data, logs.
    #[arg(long, env = "AFC_STATION_DIR", default_value = "station-data")]
    data_dir: PathBuf,
    /// Number of gates [default: 8] (first run only; later runs keep the saved plan).
    #[arg(long)]
    gates: Option<u16>,
    /// Stations to run (1-5), each with its own 3-node cluster, broker and gates, all sharing one
    /// clearing server: the first is Xi'an Road (113), the others further Dalian stations, each
    /// in DATA_DIR/stations/sN with ports 10,000 apart (first run only).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=5))]
    stations: u16,
    /// Added to every port [default: 0] (first run only), to run stations side by side.
    #[arg(long)]
    port_offset: Option<u16>,
    /// Use this MQTT broker (host:port, e.g. a Mosquitto) instead of the station's own (first run only).
    #[arg(long)]
    external_broker: Option<String>,
    /// Give the controllers (user `controller`) and every gate (user = gate id) their own MQTT
    /// password, in DATA_DIR/secrets/mqtt/, for a broker with deploy/mosquitto's ACL (first run only).
    /// The station's own broker always requires them.
    #[arg(long, requires = "external_broker")]
    mqtt_auth: bool,
    /// Taps per second per gate from the card-reader simulators; 0 runs no simulated passengers.
    #[arg(long, default_value_t = 1.0)]
    tap_rate: f64,
    /// How long canary gates run a new fare table or QR key set before every gate gets it (a real
    /// station soaks for 30 minutes; the local one for a minute, so a rollout can be watched).
    #[arg(long, default_value_t = 60)]
    soak_secs: u64,
    /// The longest wait before restarting a service that keeps dying (backoff doubles from 0.5 s);
    /// fault-injection tests that cut power every few seconds set it low.
    #[arg(long, default_value_t = crate::supervise::BACKOFF_MAX.as_millis() as u64)]
    restart_backoff_max_ms: u64,
    /// Bank payment tokens (64 hex digits a line) the clearing server's acquirer simulation
    /// declines: each is authorised and declined at its first tap seen, and every station's deny
    /// list gets it through clearing's feed.
    #[arg(long)]
    bank_declined_tokens_file: Option<PathBuf>,
    /// Seconds between clearing's bank charge passes (first-tap authorisations and the daily
    /// charges); the local station runs them often so a decline shows within seconds.
    #[arg(long, default_value_t = 5)]
    bank_charge_interval_secs: u64,
}

/// The port offset between two stations of one run: every port range of a station (99 gates) stays
/// clear of the next one's.
pub const STATION_PORT_STEP: u16 = 10_000;

/// The stations of a multi-station run after the first (Xi'an Road), by fare-table code.
pub const MORE_STATIONS: [u16; 4] = [105, 120, 101, 110];

/// One station of the run: where it lives, its shape, secrets and configuration files.
pub struct Planned {
    pub layout: Layout,
    pub plan: Plan,
    pub secrets: Secrets,
    pub controllers: Vec<PathBuf>,
    pub gates: Vec<PathBuf>,
    /// Prefix of its services' names (`""` for a single station, `"s2-"` …).
    pub prefix: String,
}

/// The id of the Dalian station with fare-table `code`.
fn station_id(code: u16) -> anyhow::Result<String> {
    let net: serde_json::Value = serde_json::from_str(crate::setup::DALIAN_NETWORK)?;
    net["stations"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["code"] == code))
        .and_then(|s| s["id"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no Dalian station with code {code}"))
}

/// Copies the secrets every station of a run shares (clearing's token and feed key, the QR
/// issuer, the stored-value issuer's TAC key) from the first station's secrets into `to`, where missing.
fn share_secrets(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for name in ["clearing-token", "clearing-feed.key", "qr-issuer.key", "tac-issuer.key"] {
        let target = to.join(name);
        if !target.exists() {
            std::fs::copy(from.join(name), &target).with_context(|| format!("sharing {name}"))?;
        }
    }
    Ok(())
}

/// Entry point of `station [up]`.
pub fn main(args: Vec<OsString>) -> anyhow::Result<()> {
    let args = Args::parse_from(args);
    afc_process::init_logging("info");
    let root = Layout::new(&args.data_dir);
    let defaults = Plan::default();
    let first = Plan {
        gates: args.gates.unwrap_or(defaults.gates),
        port_offset: args.port_offset.unwrap_or(defaults.port_offset),
        external_broker: args.external_broker.clone(),
        mqtt_auth: args.mqtt_auth,
        ..defaults
    };
    let given = args.gates.is_some()
        || args.port_offset.is_some()
        || args.external_broker.is_some()
        || args.mqtt_auth;
    let _lock = Lock::take(&root.lock_file())?;
    let exe = std::env::current_exe().context("locating this executable")?;
    reap_leftovers(&root.pids_file(), &exe);
    let mut stations = Vec::new();
    for k in 1..=args.stations {
        let (layout, fresh, prefix) = if args.stations == 1 {
            (root.clone(), first.clone(), String::new())
        } else {
            let code = if k == 1 { first.station_code } else { MORE_STATIONS[usize::from(k) - 2] };
            let fresh = Plan {
                station: if k == 1 { first.station.clone() } else { station_id(code)? },
                station_code: code,
                port_offset: (k - 1)
                    .checked_mul(STATION_PORT_STEP)
                    .and_then(|d| first.port_offset.checked_add(d))
                    .filter(|o| *o <= 50_000)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "--port-offset {} leaves no room for {} stations {STATION_PORT_STEP} ports apart",
                            first.port_offset,
                            args.stations
                        )
                    })?,
                // Every station but the first uploads to the first one's clearing server.
                shared_clearing: (k > 1).then(|| first.clearing().to_string()),
                ..first.clone()
            };
            (Layout::new(&args.data_dir.join("stations").join(format!("s{k}"))), fresh, format!("s{k}-"))
        };
        let (plan, mut warnings) = layout.load_or_create(&fresh)?;
        if !given {
            warnings.clear();
        }
        for w in warnings {
            tracing::warn!("{w}");
        }
        if let Some(s1) = stations.first().map(|s: &Planned| s.layout.secrets()) {
            share_secrets(&s1, &layout.secrets())?;
        }
        let secrets = secrets(&layout, &plan)?;
        let (controllers, gates) = write_configs(&layout, &plan, &secrets, args.soak_secs)?;
        stations.push(Planned { layout, plan, secrets, controllers, gates, prefix });
    }
    let mut clearing_args = os(&["--bank-charge-interval-secs", &args.bank_charge_interval_secs.to_string()]);
    if let Some(path) = &args.bank_declined_tokens_file {
        clearing_args.push("--bank-declined-tokens-file".into());
        clearing_args.push(path.clone().into());
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(
        exe,
        root,
        stations,
        clearing_args,
        args.tap_rate,
        Duration::from_millis(args.restart_backoff_max_ms),
    ))
}

fn os(items: &[&str]) -> Vec<OsString> {
    items.iter().map(OsString::from).collect()
}

fn svc(name: String, stage: u8, args: Vec<OsString>) -> Service {
    Service { name, args, stage, env: Vec::new() }
}

async fn run(
    exe: PathBuf,
    root: Layout,
    stations: Vec<Planned>,
    clearing_args: Vec<OsString>,
    tap_rate: f64,
    restart_backoff_max: Duration,
) -> anyhow::Result<()> {
    let mut sup = Supervisor::new(exe, root.logs(), root.pids_file(), restart_backoff_max)?;
    for st in &stations {
        start_station(&mut sup, st, &clearing_args);
    }
    let stop = tokio::spawn(afc_process::wait_for_signal());
    for st in &stations {
        let engineer = st.secrets.api_token("engineer").unwrap_or_default();
        let api = Api::new(&st.plan, engineer)?;
        let setup = tokio::select! {
            r = async {
                api.wait_ready(Duration::from_secs(120)).await?;
                first_parameters(&api, &st.secrets.qr_issuer_key).await
            } => Some(r),
            _ = tokio::time::sleep(Duration::from_secs(180)) => None,
        };
        let station = &st.plan.station;
        match setup {
            Some(Ok(done)) if done.is_empty() => tracing::info!(%station, "parameters already in place"),
            Some(Ok(done)) => tracing::info!(%station, uploaded = ?done, "first parameters set"),
            Some(Err(e)) => {
                tracing::error!(%station, error = format!("{e:#}"), "could not set the first parameters")
            }
            None => tracing::error!(%station, "the cluster did not come up within 180 s; see the logs"),
        }
    }
    if tap_rate > 0.0 && stations.len() == 1 {
        for st in &stations {
            start_readers(&mut sup, st, tap_rate);
        }
    } else if tap_rate > 0.0 {
        // A network: passengers who enter at one station and leave at another, on every medium.
        start_network_passengers(&mut sup, &stations, tap_rate);
    }
    for st in &stations {
        println!("{}", summary(&st.layout, &st.plan, &st.secrets, tap_rate));
    }
    let _ = stop.await;
    tracing::info!("stopping the station (readers, gates, PLCs, controllers, broker, clearing)");
    sup.stop().await;
    tracing::info!(data = %root.root.display(), "station stopped; run the same command to resume");
    Ok(())
}

/// Starts one station's services: the clearing server (unless it shares another's), its broker,
/// its three controllers, and per gate a PLC simulator and the gate agent.
fn start_station(sup: &mut Supervisor, st: &Planned, clearing_args: &[OsString]) {
    let (plan, secrets, p) = (&st.plan, &st.secrets, &st.prefix);
    if plan.shared_clearing.is_none() {
        let clearing_dir = st.layout.data("clearing");
        let mut args = os(&["clearing-server", "--listen", &plan.clearing().to_string(), "--data-dir"]);
        args.push(clearing_dir.into());
        args.extend([OsString::from("--token-file"), secrets.clearing_token_file.clone().into()]);
        args.extend([OsString::from("--feed-key-file"), secrets.feed_key_file.clone().into()]);
        args.extend([OsString::from("--tac-issuer-key-file"), secrets.tac_issuer_key_file.clone().into()]);
        args.extend(clearing_args.iter().cloned());
        sup.start(svc("clearing".into(), 0, args));
    }
    if let Some(users) = &secrets.broker_users_file {
        let mut args = os(&["broker", "--listen", &plan.broker_listen().to_string(), "--users-file"]);
        args.push(users.clone().into());
        sup.start(svc(format!("{p}broker"), 1, args));
    }
    for (i, config) in st.controllers.iter().enumerate() {
        let mut args = os(&["controller", "run", "--config"]);
        args.push(config.clone().into());
        // Bootstrap only ever acts on an empty store, so it is safe on every start.
        if i == 0 {
            args.push("--bootstrap".into());
        }
        sup.start(svc(format!("{p}controller-{}", i + 1), 2, args));
    }
    for (n, gate) in plan.gate_numbers() {
        let a =
            ["plc-sim", "--listen", &plan.plc(n).to_string(), "--control", &plan.plc_control(n).to_string()];
        sup.start(svc(format!("{p}plc-{gate}"), 3, os(&a)));
    }
    for ((_, gate), config) in plan.gate_numbers().zip(&st.gates) {
        let mut args = os(&["gate-agent", "--config"]);
        args.push(config.clone().into());
        sup.start(svc(format!("{p}gate-{gate}"), 4, args));
    }
}

/// Starts `network-sim` over every gate of every station: `tap_rate` per gate in all.
fn start_network_passengers(sup: &mut Supervisor, stations: &[Planned], tap_rate: f64) {
    let Some(first) = stations.first() else { return };
    let readers: Vec<String> = stations
        .iter()
        .flat_map(|st| {
            st.plan.gate_numbers().map(move |(n, _)| {
                format!("{}@{}#{}", st.plan.station_code, st.plan.reader(n), psam_id(&st.plan, n))
            })
        })
        .collect();
    let rate = tap_rate * readers.len() as f64;
    let args = os(&["network-sim", "--rate", &rate.to_string(), "--reader", &readers.join(",")]);
    let mut passengers = svc("passengers".into(), 5, args);
    // The keys go in the environment, not on the command line `ps` shows.
    passengers.env.push(("NETWORK_SIM_QR_KEY".into(), hex::encode(first.secrets.qr_issuer_key.to_bytes())));
    passengers.env.push(("NETWORK_SIM_PSAM_ISSUER_KEY".into(), first.secrets.tac_issuer_key.clone()));
    sup.start(passengers);
}

/// The simulated PSAM in gate `n`'s reader: unique in the network (station code × 100 + gate).
pub fn psam_id(plan: &Plan, n: u16) -> u64 {
    u64::from(plan.station_code) * 100 + u64::from(n)
}

/// Starts one card-reader simulator per gate of `st`.
fn start_readers(sup: &mut Supervisor, st: &Planned, tap_rate: f64) {
    let origins = "101,105,110,116,120,220,224,305,501";
    for (n, gate) in st.plan.gate_numbers() {
        let a = [
            "reader-sim",
            "--addr",
            &st.plan.reader(n).to_string(),
            "--station",
            &st.plan.station_code.to_string(),
            "--origins",
            origins,
            "--taps",
            "0",
            "--rate",
            &tap_rate.to_string(),
            "--seed",
            &n.to_string(),
            // A two-phase reader: its simulated PSAM signs every stored-value debit.
            "--psam-id",
            &psam_id(&st.plan, n).to_string(),
        ];
        let mut reader = svc(format!("{}reader-{gate}", st.prefix), 5, os(&a));
        // The keys (QR issuer seed, PSAM issuer key) go in the environment, not on the command
        // line `ps` shows.
        reader.env.push(("READER_SIM_QR_KEY".into(), hex::encode(st.secrets.qr_issuer_key.to_bytes())));
        reader.env.push(("READER_SIM_PSAM_ISSUER_KEY".into(), st.secrets.tac_issuer_key.clone()));
        sup.start(reader);
    }
}

fn summary(layout: &Layout, plan: &Plan, s: &Secrets, tap_rate: f64) -> String {
    let token = |n: &str| s.api_token(n).unwrap_or_default().to_owned();
    let mut t = format!(
        "\nStation {} (code {}) is running from {}\n\n",
        plan.station,
        plan.station_code,
        layout.root.display()
    );
    t += &format!("  console      http://{}/  (any node: ", plan.api(1));
    t += &(1..=NODES).map(|id| plan.api(id).port().to_string()).collect::<Vec<_>>().join(", ");
    t += ")\n";
    t += &format!(
        "  tokens       viewer {}\n               operator {}\n               engineer {}\n",
        token("viewer"),
        token("operator"),
        token("engineer")
    );
    t += &format!(
        "  API          curl -H 'Authorization: Bearer {}' http://{}/api/v1/gates\n",
        token("viewer"),
        plan.api(1)
    );
    t += &format!(
        "  metrics      http://{}/metrics (controllers), http://{}/metrics … (gates)\n",
        plan.api(1),
        plan.gate_metrics(1)
    );
    t += &format!("  MQTT         {}\n", plan.broker_address());
    t += &format!("  clearing     http://{}/\n", plan.clearing_address());
    t += &format!(
        "  gates        {} (PLC control: echo state | nc {} {})\n",
        plan.gates,
        plan.plc_control(1).ip(),
        plan.plc_control(1).port()
    );
    t += &format!("  traffic      {tap_rate} taps/s per gate\n");
    t += &format!(
        "  logs         {}\n  pids         {}\n",
        layout.logs().display(),
        layout.pids_file().display()
    );
    t += "\nCtrl-C stops everything cleanly; the same command resumes with the same data.\n";
    t
}

/// `run/lock`: one station per data directory.
struct Lock {
    path: PathBuf,
}

impl Lock {
    fn take(path: &Path) -> anyhow::Result<Lock> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse::<u32>() {
                if pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists() {
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    if String::from_utf8_lossy(&cmd).contains("station") {
                        anyhow::bail!(
                            "a station already runs from this directory (pid {pid}, {})",
                            path.display()
                        );
                    }
                }
            }
        }
        std::fs::write(path, std::process::id().to_string())?;
        Ok(Lock { path: path.to_owned() })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
