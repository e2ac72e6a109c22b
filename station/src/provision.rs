//! First-run provisioning of a local station: secrets and keys (created once, kept), and every
//! service's configuration file (rewritten from the plan on every run).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ed25519_dalek::SigningKey;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use crate::plan::{Layout, Plan, NODES};

/// The operator-facing API tokens of the local station, one per role, plus a second engineer for
/// the two-person confirmation of mass blacklist insertions.
pub const TOKEN_NAMES: [(&str, &str); 4] =
    [("viewer", "viewer"), ("operator", "operator"), ("engineer", "engineer"), ("engineer2", "engineer")];

/// The station's secrets, read from (or created in) `{data_dir}/secrets`.
#[derive(Debug, Clone)]
pub struct Secrets {
    pub cluster_secret_file: PathBuf,
    pub package_key_file: PathBuf,
    pub package_key: SigningKey,
    pub clearing_token_file: PathBuf,
    pub clearing_token: String,
    pub feed_key_file: PathBuf,
    /// The clearing server's feed key (its public half is pinned in every controller's config).
    pub feed_key: SigningKey,
    pub qr_issuer_key: SigningKey,
    /// The stored-value issuer's TAC master key (64 hex digits): clearing verifies every PSAM TAC
    /// with it, and each gate's simulated reader PSAM holds a key derived from it.
    pub tac_issuer_key_file: PathBuf,
    pub tac_issuer_key: String,
    /// `(name, role, token)` per [`TOKEN_NAMES`].
    pub api_tokens: Vec<(String, String, String)>,
    /// `(gate id, key file, key)`.
    pub gate_keys: Vec<(String, PathBuf, SigningKey)>,
    /// With [`Plan::mqtt_credentials`]: `(user, password file, password)` for `controller` and
    /// every gate.
    pub mqtt_users: Vec<(String, PathBuf, String)>,
    /// On the station's own broker: the `user:password` file of [`Secrets::mqtt_users`] it lets in
    /// (rewritten from the password files on every run).
    pub broker_users_file: Option<PathBuf>,
}

impl Secrets {
    pub fn api_token(&self, name: &str) -> Option<&str> {
        self.api_tokens.iter().find(|(n, _, _)| n == name).map(|(_, _, t)| t.as_str())
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Writes `content` to `path` readable by the owner only, unless the file exists.
fn create_secret(path: &Path, content: &str) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(format!("{content}\n").as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn read_secret(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().next().unwrap_or_default().trim().to_owned())
}

fn secret(path: PathBuf, bytes: usize) -> anyhow::Result<(PathBuf, String)> {
    create_secret(&path, &random_hex(bytes))?;
    let value = read_secret(&path)?;
    Ok((path, value))
}

fn signing_key(path: PathBuf) -> anyhow::Result<(PathBuf, SigningKey)> {
    let (path, hex_seed) = secret(path, 32)?;
    let seed: [u8; 32] = hex::decode(&hex_seed)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| anyhow::anyhow!("{}: not 64 hex digits", path.display()))?;
    Ok((path, SigningKey::from_bytes(&seed)))
}

/// Reads the station's secrets, creating the missing ones.
pub fn secrets(layout: &Layout, plan: &Plan) -> anyhow::Result<Secrets> {
    let dir = layout.secrets();
    let (cluster_secret_file, _) = secret(dir.join("cluster-secret"), 24)?;
    let (package_key_file, package_key) = signing_key(dir.join("package-signing.key"))?;
    let (clearing_token_file, clearing_token) = secret(dir.join("clearing-token"), 24)?;
    let (feed_key_file, feed_key) = signing_key(dir.join("clearing-feed.key"))?;
    let (_, qr_issuer_key) = signing_key(dir.join("qr-issuer.key"))?;
    let (tac_issuer_key_file, tac_issuer_key) = secret(dir.join("tac-issuer.key"), 32)?;
    let mut api_tokens = Vec::new();
    for (name, role) in TOKEN_NAMES {
        let (_, token) = secret(dir.join(format!("api-token-{name}")), 24)?;
        api_tokens.push((name.to_owned(), role.to_owned(), token));
    }
    let mut gate_keys = Vec::new();
    for (_, gate) in plan.gate_numbers() {
        let (path, key) = signing_key(dir.join("gates").join(format!("{gate}.key")))?;
        gate_keys.push((gate, path, key));
    }
    let mut mqtt_users = Vec::new();
    if plan.mqtt_credentials() {
        let users = std::iter::once("controller".to_owned()).chain(plan.gate_numbers().map(|(_, g)| g));
        for user in users {
            let (path, password) = secret(dir.join("mqtt").join(format!("{user}.password")), 18)?;
            mqtt_users.push((user, path, password));
        }
    }
    let broker_users_file = match plan.external_broker {
        None => Some(write_broker_users(&dir.join("mqtt").join("broker-users"), &mqtt_users)?),
        Some(_) => None,
    };
    Ok(Secrets {
        cluster_secret_file,
        package_key_file,
        package_key,
        clearing_token_file,
        clearing_token,
        feed_key_file,
        feed_key,
        qr_issuer_key,
        tac_issuer_key_file,
        tac_issuer_key,
        api_tokens,
        gate_keys,
        mqtt_users,
        broker_users_file,
    })
}

/// Writes the station broker's users file (owner-only, replaced atomically) from `users`.
fn write_broker_users(path: &Path, users: &[(String, PathBuf, String)]) -> anyhow::Result<PathBuf> {
    let mut list = controller::leader::broker::BrokerUsers::default();
    for (user, _, password) in users {
        list.insert(user, password).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    create_secret(&tmp, list.to_file_text().trim_end())?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path.to_owned())
}

/// `username = …` and `password_file = …` lines for `user`, when the station uses MQTT credentials.
fn mqtt_login(s: &Secrets, user: &str) -> String {
    s.mqtt_users
        .iter()
        .find(|(u, _, _)| u == user)
        .map(|(u, path, _)| format!("username = {}\npassword_file = {}\n", q(u), p(path)))
        .unwrap_or_default()
}

/// TOML string literal (paths and ids may hold anything).
fn q(s: impl AsRef<str>) -> String {
    toml::Value::String(s.as_ref().to_owned()).to_string()
}

fn p(path: &Path) -> String {
    q(path.to_string_lossy())
}

/// The configuration of controller node `id`.
pub fn controller_config(layout: &Layout, plan: &Plan, s: &Secrets, id: u16, soak_secs: u64) -> String {
    let mut t = format!(
        "# Written by `station` from {plan_file}; edits are overwritten at the next start.\n\
         node_id = {id}\nstation = {station}\ndata_dir = {data}\nlisten = {listen}\n\
         cluster_secret_file = {secret}\n",
        plan_file = layout.plan_file().display(),
        station = q(&plan.station),
        data = p(&layout.data(&format!("controller-{id}"))),
        listen = q(plan.raft(id).to_string()),
        secret = p(&s.cluster_secret_file),
    );
    for m in 1..=NODES {
        t += &format!("\n[[initial_members]]\nid = {m}\naddr = {}\n", q(plan.raft(m).to_string()));
    }
    t += &format!(
        "\n[mqtt]\nbroker = \"external\"\naddress = {}\nstation_code = {}\n{}",
        q(plan.broker_address()),
        plan.station_code,
        mqtt_login(s, "controller")
    );
    for (gate, _, key) in &s.gate_keys {
        t += &format!(
            "\n[[mqtt.gates]]\ngate = {}\ntx_public_key = {}\nhardware_profile = \"default\"\n",
            q(gate),
            q(hex::encode(key.verifying_key().to_bytes()))
        );
    }
    t += &format!(
        "\n[api]\nlisten = {}\nstation_code = {}\nsigning_key_file = {}\nsigning_key_id = 1\n\
         # A full 1,000,000-card blacklist is about 40 MB of JSON.\nmax_body_bytes = 67108864\n",
        q(plan.api(id).to_string()),
        plan.station_code,
        p(&s.package_key_file)
    );
    for (name, role, token) in &s.api_tokens {
        t += &format!(
            "\n[[api.tokens]]\nname = {}\nrole = {}\nsha256 = {}\n",
            q(name),
            q(role),
            q(hex::encode(Sha256::digest(token.as_bytes())))
        );
    }
    t += &format!(
        "\n[clearing]\nurl = {}\ntoken_file = {}\n\
         # Clearing's signed parameter feed: fare data and the deny list of declined bank tokens.\n\
         feed_key = {}\nfeed_key_id = 1\nfeed_poll_ms = 2000\n",
        q(format!("http://{}", plan.clearing_address())),
        p(&s.clearing_token_file),
        q(hex::encode(s.feed_key.verifying_key().to_bytes())),
    );
    t += &format!(
        "\n[rollout]\n# New fare tables and QR keys go to the canary gate first, then to all.\n\
         canary_gates = [{}]\nsoak_ms = {}\n",
        q(Plan::gate_id(1)),
        soak_secs * 1000
    );
    t
}

/// The configuration of gate `n`.
pub fn gate_config(layout: &Layout, plan: &Plan, s: &Secrets, n: u16) -> anyhow::Result<String> {
    let gate = Plan::gate_id(n);
    let (_, key_file, _) = s
        .gate_keys
        .iter()
        .find(|(g, _, _)| *g == gate)
        .ok_or_else(|| anyhow::anyhow!("no key for gate {gate}"))?;
    Ok(format!(
        "# Written by `station` from {plan_file}; edits are overwritten at the next start.\n\
         station = {station}\ngate = {g}\nstation_code = {code}\ndata_dir = {data}\n\
         reader_listen = {reader}\nmetrics_listen = {metrics}\nsigning_key_file = {key}\n\
         direction = \"bidirectional\"\n\n[trusted_keys]\n1 = {trusted}\n\n\
         [mqtt]\nbrokers = [{broker}]\n{login}# Every 2 s (a real gate: 5 s), so the console and the canary checks follow closely.\n\
         heartbeat_secs = 2\n\n[plc]\naddress = {plc}\n",
        plan_file = layout.plan_file().display(),
        station = q(&plan.station),
        g = q(&gate),
        code = plan.station_code,
        data = p(&layout.data(&format!("gate-{gate}"))),
        reader = q(plan.reader(n).to_string()),
        metrics = q(plan.gate_metrics(n).to_string()),
        key = p(key_file),
        trusted = q(hex::encode(s.package_key.verifying_key().to_bytes())),
        broker = q(plan.broker_address()),
        plc = q(plan.plc(n).to_string()),
        login = mqtt_login(s, &gate),
    ))
}

/// Writes every configuration file; returns `(controller configs, gate configs)`.
pub fn write_configs(
    layout: &Layout,
    plan: &Plan,
    s: &Secrets,
    soak_secs: u64,
) -> anyhow::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let dir = layout.config();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut controllers = Vec::new();
    for id in 1..=NODES {
        let path = dir.join(format!("controller-{id}.toml"));
        std::fs::write(&path, controller_config(layout, plan, s, id, soak_secs))?;
        // The file must parse and validate exactly as the node will load it.
        controller::config::Config::load(&path).with_context(|| format!("generated {}", path.display()))?;
        controllers.push(path);
    }
    let mut gates = Vec::new();
    for (n, gate) in plan.gate_numbers() {
        let path = dir.join(format!("gate-{gate}.toml"));
        std::fs::write(&path, gate_config(layout, plan, s, n)?)?;
        gate_agent::config::Config::load(&path).with_context(|| format!("generated {}", path.display()))?;
        gates.push(path);
    }
    Ok((controllers, gates))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn secrets_are_created_once_and_configs_load() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let plan = Plan { gates: 2, ..Plan::default() };
        let a = secrets(&layout, &plan).unwrap();
        let b = secrets(&layout, &plan).unwrap();
        assert_eq!(a.clearing_token, b.clearing_token, "a second run must keep the secrets");
        assert_eq!(a.package_key.to_bytes(), b.package_key.to_bytes());
        assert_ne!(a.api_token("viewer"), a.api_token("engineer"));
        let (c, g) = write_configs(&layout, &plan, &a, 60).unwrap();
        assert_eq!((c.len(), g.len()), (3, 2));
        let cfg = controller::config::Config::load(&c[1]).unwrap();
        assert_eq!(cfg.node_id, 2);
        assert_eq!(cfg.api.tokens.len(), 4);
    }

    #[test]
    fn the_stations_own_broker_lets_in_only_the_controllers_and_each_gate_with_its_password() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let plan = Plan { gates: 2, ..Plan::default() };
        let s = secrets(&layout, &plan).unwrap();
        let users =
            controller::leader::broker::BrokerUsers::read(s.broker_users_file.as_ref().unwrap()).unwrap();
        assert_eq!(users.names().collect::<Vec<_>>(), ["controller", "g01", "g02"]);
        let (c, g) = write_configs(&layout, &plan, &s, 60).unwrap();
        let mqtt = controller::config::Config::load(&c[0]).unwrap().mqtt.unwrap();
        assert_eq!(mqtt.username.as_deref(), Some("controller"));
        assert_eq!(mqtt.password().unwrap().as_deref(), users.password("controller"));
        let gate = gate_agent::config::Config::load(&g[1]).unwrap();
        assert_eq!(gate.mqtt.username.as_deref(), Some("g02"));
        assert_eq!(gate.mqtt_password().unwrap().as_deref(), users.password("g02"));
        // Another run keeps the passwords, so the users file stays the same.
        let again = secrets(&layout, &plan).unwrap();
        let users2 =
            controller::leader::broker::BrokerUsers::read(again.broker_users_file.as_ref().unwrap()).unwrap();
        assert_eq!(users, users2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(s.broker_users_file.as_ref().unwrap()).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the users file is readable by its owner only");
        }
        // On an external broker without --mqtt-auth there are no credentials and no users file.
        let ext = Plan { external_broker: Some("127.0.0.1:1".into()), ..plan };
        let s = secrets(&Layout::new(&dir.path().join("ext")), &ext).unwrap();
        assert!(s.mqtt_users.is_empty() && s.broker_users_file.is_none());
    }
}
