//! Where everything of a local station lives: the data directory's layout and every port.
//!
//! The plan is written to `{data_dir}/station.toml` on the first run and read back on every later
//! run, so a station always comes back with the addresses its Raft membership and its gates were
//! set up with (flags that disagree with it are reported and ignored).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Controller nodes in a station: three voters (two tolerate no failure).
pub const NODES: u16 = 3;

/// The station's shape. Everything else (paths, ports) is derived from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Station id in MQTT topics and the ledger.
    pub station: String,
    /// The station's code in the fare table (Dalian: line × 100 + n).
    pub station_code: u16,
    /// Number of gates (1-99).
    pub gates: u16,
    /// Added to every default port, to run several stations (or tests) side by side.
    pub port_offset: u16,
    /// An external MQTT broker (`host:port`) instead of the station's own.
    #[serde(default)]
    pub external_broker: Option<String>,
    /// Per-client MQTT credentials (user `controller`, and each gate's id) on the external broker,
    /// which checks them (Mosquitto with deploy/mosquitto/acl.conf). The station's own broker
    /// always requires them: see [`Plan::mqtt_credentials`].
    #[serde(default)]
    pub mqtt_auth: bool,
    /// The clearing server another station of the same run serves (`host:port`), when this
    /// station is not the one that runs it (`station --stations N`).
    #[serde(default)]
    pub shared_clearing: Option<String>,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            station: "xian_rd".into(),
            station_code: 113,
            gates: 8,
            port_offset: 0,
            external_broker: None,
            mqtt_auth: false,
            shared_clearing: None,
        }
    }
}

impl Plan {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!((1..=99).contains(&self.gates), "gates must be 1-99, not {}", self.gates);
        anyhow::ensure!(
            self.port_offset <= 50_000,
            "port_offset {} would put ports beyond 65535",
            self.port_offset
        );
        afc_domain::model::Ident::new(&self.station)
            .map_err(|e| anyhow::anyhow!("station {:?}: {e}", self.station))?;
        Ok(())
    }

    fn port(&self, base: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], base + self.port_offset))
    }

    /// Whether every controller and gate logs in to the broker with its own user and password:
    /// always on the station's own broker (so the one-box station is not an open broker), with
    /// `mqtt_auth` on an external one.
    pub fn mqtt_credentials(&self) -> bool {
        self.mqtt_auth || self.external_broker.is_none()
    }

    /// The station's own MQTT broker (when no external one is named).
    pub fn broker_listen(&self) -> SocketAddr {
        self.port(1883)
    }

    /// `host:port` every controller and gate connects to.
    pub fn broker_address(&self) -> String {
        self.external_broker.clone().unwrap_or_else(|| self.broker_listen().to_string())
    }

    /// Node `id`'s Raft and admin listener (id 1-3).
    pub fn raft(&self, id: u16) -> SocketAddr {
        self.port(7100 + id)
    }

    /// Node `id`'s operations API and console.
    pub fn api(&self, id: u16) -> SocketAddr {
        self.port(8080 + id)
    }

    /// The clearing server this station's own run starts (when it does not share another's).
    pub fn clearing(&self) -> SocketAddr {
        self.port(8480)
    }

    /// `host:port` of the clearing server the controllers upload to.
    pub fn clearing_address(&self) -> String {
        self.shared_clearing.clone().unwrap_or_else(|| self.clearing().to_string())
    }

    /// Gate `n`'s id (1-based): `g01` …
    pub fn gate_id(n: u16) -> String {
        format!("g{n:02}")
    }

    pub fn reader(&self, n: u16) -> SocketAddr {
        self.port(7700 + n)
    }

    pub fn gate_metrics(&self, n: u16) -> SocketAddr {
        self.port(9700 + n)
    }

    /// Gate `n`'s PLC simulator (Modbus TCP).
    pub fn plc(&self, n: u16) -> SocketAddr {
        self.port(5020 + n)
    }

    /// Gate `n`'s PLC simulator control socket (`state`, faults).
    pub fn plc_control(&self, n: u16) -> SocketAddr {
        self.port(5120 + n)
    }

    /// Gates 1..=n with their ids.
    pub fn gate_numbers(&self) -> impl Iterator<Item = (u16, String)> {
        (1..=self.gates).map(|n| (n, Plan::gate_id(n)))
    }
}

/// The data directory's layout.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Layout {
        Layout { root: root.to_path_buf() }
    }
    pub fn plan_file(&self) -> PathBuf {
        self.root.join("station.toml")
    }
    pub fn secrets(&self) -> PathBuf {
        self.root.join("secrets")
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config")
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn data(&self, name: &str) -> PathBuf {
        self.root.join("data").join(name)
    }
    /// `{name}: {pid}` lines of the running children, for scripts and tests.
    pub fn pids_file(&self) -> PathBuf {
        self.root.join("run").join("pids")
    }
    /// Held while a station runs from this directory.
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("run").join("lock")
    }

    /// The saved plan, or `fresh` (saved now) on the first run. Fields of `fresh` that differ
    /// from the saved plan are returned as warnings.
    pub fn load_or_create(&self, fresh: &Plan) -> anyhow::Result<(Plan, Vec<String>)> {
        let path = self.plan_file();
        if path.exists() {
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let saved: Plan = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            saved.validate()?;
            let mut warnings = Vec::new();
            if saved != *fresh {
                warnings.push(format!(
                    "{} was set up as {saved:?}; command-line settings {fresh:?} are ignored \
                     (use another --data-dir for another station)",
                    path.display()
                ));
            }
            return Ok((saved, warnings));
        }
        fresh.validate()?;
        std::fs::create_dir_all(&self.root).with_context(|| format!("creating {}", self.root.display()))?;
        std::fs::write(&path, toml::to_string_pretty(fresh)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok((fresh.clone(), Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ports_do_not_collide_for_99_gates() {
        let plan = Plan { gates: 99, port_offset: 100, ..Plan::default() };
        let mut all = vec![plan.broker_listen(), plan.clearing()];
        for id in 1..=NODES {
            all.push(plan.raft(id));
            all.push(plan.api(id));
        }
        for (n, _) in plan.gate_numbers() {
            all.extend([plan.reader(n), plan.gate_metrics(n), plan.plc(n), plan.plc_control(n)]);
        }
        let count = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), count, "two services share a port");
        assert_eq!(plan.api(1).port(), 8181);
    }

    #[test]
    fn a_saved_plan_wins_over_new_flags() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let first = Plan { gates: 4, ..Plan::default() };
        let (p, w) = layout.load_or_create(&first).unwrap();
        assert_eq!((p.gates, w.len()), (4, 0));
        let (p, w) = layout.load_or_create(&Plan { gates: 8, ..Plan::default() }).unwrap();
        assert_eq!(p.gates, 4);
        assert_eq!(w.len(), 1, "{w:?}");
    }

    #[test]
    fn bad_plans_are_refused() {
        assert!(Plan { gates: 0, ..Plan::default() }.validate().is_err());
        assert!(Plan { station: "no spaces".into(), ..Plan::default() }.validate().is_err());
    }
}
