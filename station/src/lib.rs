//! A complete local station in one command (`station up`, the default): the reference clearing
//! server, an MQTT broker, three controller nodes, and per gate a PLC simulator, a gate agent and
//! a card-reader simulator producing passenger traffic; all on loopback, with every file under one
//! data directory. Ctrl-C stops it cleanly; running it again resumes with the same data.
//!
//! Every service runs as a child process of this same executable (`station controller run …`,
//! `station gate-agent …`): the code is the services' own (`controller::cli`, `gate_agent::cli`,
//! `clearing::cli`), so one `cargo run -p station` builds and runs all of it.

pub mod plan;
pub mod provision;
pub mod setup;
pub mod supervise;
pub mod up;

/// The services this executable runs as a child (`station <service> <its arguments>`).
pub const SERVICES: [&str; 7] =
    ["controller", "gate-agent", "plc-sim", "reader-sim", "network-sim", "clearing-server", "broker"];

/// Runs `service` with `args` (the first is the program name) in this process.
pub fn run_service(service: &str, args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    match service {
        "controller" => controller::cli::main(args),
        "gate-agent" => gate_agent::cli::gate_agent(args),
        "plc-sim" => gate_agent::cli::plc_sim(args),
        "reader-sim" => gate_agent::cli::reader_sim(args),
        "network-sim" => gate_agent::cli::network_sim(args),
        "clearing-server" => clearing::cli::main(args),
        "broker" => broker(args),
        other => anyhow::bail!("unknown service {other:?}; one of {SERVICES:?}"),
    }
}

/// `station broker --listen ADDR`: the station's own MQTT broker (rumqttd, as embedded in the
/// controller), in a process of its own so that it outlives any one controller node.
fn broker(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    #[command(about = "The local station's MQTT broker (rumqttd)")]
    struct Args {
        #[arg(long, default_value = "127.0.0.1:1883")]
        listen: std::net::SocketAddr,
        /// Largest MQTT packet (a 256 KiB chunk or a 1 MiB tx batch, plus headers).
        #[arg(long, default_value_t = 1_114_112)]
        max_packet_bytes: usize,
        /// The only clients let in: a file of `user:password` lines.
        #[arg(long, required_unless_present = "allow_anonymous")]
        users_file: Option<std::path::PathBuf>,
        /// Let any client in without credentials (tests only).
        #[arg(long, conflicts_with = "users_file")]
        allow_anonymous: bool,
    }
    let a = Args::parse_from(args);
    let clients = match &a.users_file {
        Some(path) => {
            controller::leader::broker::Clients::Users(controller::leader::broker::BrokerUsers::read(path)?)
        }
        None => controller::leader::broker::Clients::Anyone,
    };
    afc_process::run_service("info", async move {
        controller::leader::broker::start(a.listen, a.max_packet_bytes, &clients)?;
        afc_process::wait_for_signal().await;
        tracing::info!("signal received; broker stops with the process");
        Ok(())
    })
}
