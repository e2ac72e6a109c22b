//! The embedded MQTT broker (rumqttd) for a one-box station and for tests.
//!
//! rumqttd's `Broker::start` blocks and runs its own threads, so it gets a dedicated OS thread named
//! `mqtt-broker`. It cannot be stopped: it ends with the process. rumqttd cannot listen on port 0,
//! so the address is fixed by the configuration (tests pick a free port first).
//!
//! Every client logs in with a user name and password from a [`BrokerUsers`] list ([`Clients::Users`]);
//! rumqttd drops a connection whose CONNECT has no login or a wrong one, before any ConnAck. Only
//! tests that need an open broker start it with [`Clients::Anyone`]. rumqttd has no ACLs: a client
//! with valid credentials may publish and subscribe under any topic (the signatures on what gates
//! and controllers consume are the defence there; Mosquitto with deploy/mosquitto/acl.conf adds
//! per-gate topic limits).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;

/// Why the embedded broker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid broker configuration: {0}")]
    Config(String),
    #[error("cannot start the broker thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("cannot read the broker users file {path}: {source}")]
    ReadUsers { path: std::path::PathBuf, source: std::io::Error },
    /// A line of a users file is malformed; the message names the line, never its password.
    #[error("broker users: {0}")]
    Users(String),
}

/// The clients the embedded broker lets in: user name → password.
///
/// As a file (`[mqtt] embedded_users_file`, `station broker --users-file`): one `user:password`
/// per line; the user ends at the first `:`, so a password may contain `:`; blank lines and lines
/// starting with `#` are skipped; leading and trailing white space of a line is ignored. `Debug`
/// shows the user names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BrokerUsers(BTreeMap<String, String>);

impl std::fmt::Debug for BrokerUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl BrokerUsers {
    /// Parses the users file format (see the type's documentation).
    pub fn parse(text: &str) -> Result<BrokerUsers, BrokerError> {
        let mut users = BrokerUsers::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, password)) = line.split_once(':') else {
                return Err(BrokerError::Users(format!("line {}: expected user:password", n + 1)));
            };
            users.insert(user, password).map_err(|e| BrokerError::Users(format!("line {}: {e}", n + 1)))?;
        }
        Ok(users)
    }

    /// Reads and parses a users file.
    pub fn read(path: &Path) -> Result<BrokerUsers, BrokerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| BrokerError::ReadUsers { path: path.to_owned(), source })?;
        BrokerUsers::parse(&text)
    }

    /// Adds `user` with `password`. A user name is 1-256 characters without `:`, white space or
    /// control characters; a password is 1-256 characters without line breaks; a user appears once.
    pub fn insert(&mut self, user: &str, password: &str) -> Result<(), String> {
        let bad_user = |c: char| c == ':' || c.is_whitespace() || c.is_control();
        if user.is_empty() || user.len() > 256 || user.chars().any(bad_user) {
            return Err(format!(
                "user name {user:?} must be 1-256 characters without ':', white space or control characters"
            ));
        }
        if password.is_empty() || password.len() > 256 || password.contains(['\n', '\r']) {
            return Err(format!("the password of {user:?} must be 1-256 characters on one line"));
        }
        if self.0.insert(user.to_owned(), password.to_owned()).is_some() {
            return Err(format!("user {user:?} appears twice"));
        }
        Ok(())
    }

    /// The users file text of this list (parses back to it).
    pub fn to_file_text(&self) -> String {
        self.0.iter().map(|(u, p)| format!("{u}:{p}\n")).collect()
    }

    pub fn password(&self, user: &str) -> Option<&str> {
        self.0.get(user).map(String::as_str)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Who may connect to the embedded broker.
#[derive(Debug, Clone)]
pub enum Clients {
    /// Only these users, each with its password (at least one).
    Users(BrokerUsers),
    /// Anyone, without credentials: only for tests that need an open broker.
    Anyone,
}

/// rumqttd's configuration for one MQTT 3.1.1 listener on `listen` accepting packets up to
/// `max_payload` bytes (a 256 KiB chunk or a 1 MiB tx batch, plus headers), letting in `clients`.
pub fn config(
    listen: SocketAddr,
    max_payload: usize,
    clients: &Clients,
) -> Result<rumqttd::Config, BrokerError> {
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 1000
max_outgoing_packet_count = 1000
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "{listen}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {max_payload}
    max_inflight_count = 500
    dynamic_filters = true
"#
    );
    let mut config: rumqttd::Config =
        toml::from_str(&text).map_err(|e| BrokerError::Config(e.to_string()))?;
    // The credentials are set on the parsed value, not written into the TOML text: no quoting of
    // passwords, and the text above never holds a secret.
    let auth = match clients {
        Clients::Users(users) if users.is_empty() => {
            return Err(BrokerError::Config(
                "no broker users: name at least one, or allow anonymous clients explicitly".into(),
            ))
        }
        Clients::Users(users) => {
            Some(users.0.iter().map(|(u, p)| (u.clone(), p.clone())).collect::<HashMap<_, _>>())
        }
        Clients::Anyone => None,
    };
    for server in config.v4.iter_mut().flat_map(|v4| v4.values_mut()) {
        server.connections.auth = auth.clone();
    }
    Ok(config)
}

/// The least the embedded broker lets through (bytes of payload), whatever `max_packet_bytes`
/// says: the leader's own incoming limit stays above it (see `leader::mqtt::options`).
pub const MIN_BROKER_PAYLOAD: usize = 2 * 1024 * 1024;

/// Starts the broker on its own thread. Returns once the thread runs; the caller polls the
/// listener for readiness if it needs to (clients reconnect with backoff anyway).
pub fn start(listen: SocketAddr, max_payload: usize, clients: &Clients) -> Result<(), BrokerError> {
    let config = config(listen, max_payload.max(MIN_BROKER_PAYLOAD), clients)?;
    let users = match clients {
        Clients::Users(u) => u.len(),
        Clients::Anyone => 0,
    };
    std::thread::Builder::new().name("mqtt-broker".into()).spawn(move || {
        if users == 0 {
            tracing::warn!(%listen, "embedded MQTT broker starting WITHOUT authentication: any client may connect");
        } else {
            tracing::info!(%listen, users, "embedded MQTT broker starting (user name and password required)");
        }
        let mut broker = rumqttd::Broker::new(config);
        if let Err(e) = broker.start() {
            tracing::error!(%listen, error = %e, "embedded MQTT broker stopped");
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_users_file_parses_and_round_trips() {
        let u = BrokerUsers::parse("# station users\n\ncontroller:s3cr:et\n  g01:abc  \n").unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u.password("controller"), Some("s3cr:et"), "the user ends at the first ':'");
        assert_eq!(u.password("g01"), Some("abc"));
        assert_eq!(BrokerUsers::parse(&u.to_file_text()).unwrap(), u);
        assert_eq!(format!("{u:?}"), r#"{"controller", "g01"}"#, "Debug shows no password");
    }

    #[test]
    fn bad_users_files_are_refused_without_showing_passwords() {
        for bad in ["nocolon", ":pw", "g01:", "g 01:pw", "g01:a\ng01:b"] {
            let e = BrokerUsers::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("broker users: line "), "{bad:?}: {e}");
        }
        let e = BrokerUsers::parse("g01:hunter2\ng01:hunter3").unwrap_err().to_string();
        assert!(!e.contains("hunter"), "{e}");
    }

    #[test]
    fn the_config_carries_the_users_and_refuses_an_empty_list() {
        let listen: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let users = BrokerUsers::parse("g01:pw").unwrap();
        let c = config(listen, 1024, &Clients::Users(users)).unwrap();
        let auth = c.v4.unwrap().into_values().next().unwrap().connections.auth.unwrap();
        assert_eq!(auth.get("g01").map(String::as_str), Some("pw"));
        let open = config(listen, 1024, &Clients::Anyone).unwrap();
        assert!(open.v4.unwrap().into_values().all(|s| s.connections.auth.is_none()));
        assert!(config(listen, 1024, &Clients::Users(BrokerUsers::default())).is_err());
    }
}
