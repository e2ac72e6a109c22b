//! MQTT topic names of SPEC §5, built and parsed in one place.
//!
//! Every topic lives under `afc/v1/{station}`. [`Topic`] has one variant per row of the SPEC table
//! (plus the station-wide QR replay topics), carrying the levels that vary. [`Topic::parse`] is strict:
//! it accepts exactly the strings [`Topic`]'s `Display` produces, so a consumer can route a message
//! by matching on the parsed variant and never by string prefixes. The [`filters`] module holds the
//! subscription filters a gate agent and a controller use, and [`filters::matches`] the MQTT matching
//! rule, so tests can prove that every topic one side publishes reaches the other side.

use std::fmt;

use thiserror::Error;

use crate::model::{Ident, IdentError, ParamKind};

/// The first two levels of every topic: the product and the protocol version. A breaking change to
/// topics or payloads moves to `afc/v2`, so old and new gates can share a broker during a migration.
pub const ROOT_PREFIX: &str = "afc/v1";

/// Who publishes on a topic; the Mosquitto ACLs and the tests are derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Publisher {
    /// Only the Raft leader among the station's controllers.
    Leader,
    /// A controller (in practice the leader, but followers may republish retained state).
    Controller,
    /// The gate named in the topic, and no one else.
    Gate,
}

/// One concrete MQTT topic (no wildcards).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// `state`: who leads the station cluster; retained, with an offline will.
    State { station: Ident },
    /// `params/{kind}/current`: the pointer to the version of `kind` all gates should hold.
    ParamCurrent { station: Ident, kind: ParamKind },
    /// `params/{kind}/{version}/{chunk}`: one chunk of a package body (binary, not JSON).
    ParamChunk { station: Ident, kind: ParamKind, version: u64, chunk: u32 },
    /// `mode`: the station's operating modes and recent history.
    Mode { station: Ident },
    /// `qr/used`: QR codes used at any gate of the station, fanned out by the controller so every
    /// gate refuses a replay of a code first used at a neighbour.
    QrUsed { station: Ident },
    /// `gates/{gate}/status`: birth and will of a gate agent's MQTT session.
    GateStatus { station: Ident, gate: Ident },
    /// `gates/{gate}/heartbeat`: counters, outbox depth and clock, every 5 s.
    GateHeartbeat { station: Ident, gate: Ident },
    /// `gates/{gate}/tx`: a signed batch of transactions from the gate's outbox.
    GateTx { station: Ident, gate: Ident },
    /// `gates/{gate}/tx/ack`: the highest contiguous gate_seq committed to the ledger.
    GateTxAck { station: Ident, gate: Ident },
    /// `gates/{gate}/params/{kind}/current`: a per-gate pointer override (canary rollout).
    GateParamCurrent { station: Ident, gate: Ident, kind: ParamKind },
    /// `gates/{gate}/params/ack`: the gate reports a package pending, active or rejected.
    GateParamsAck { station: Ident, gate: Ident },
    /// `gates/{gate}/cmd`: an operator command for one gate.
    GateCmd { station: Ident, gate: Ident },
    /// `gates/{gate}/cmd/ack`: the outcome of a command.
    GateCmdAck { station: Ident, gate: Ident },
    /// `gates/{gate}/events`: alarms raised and cleared by the gate.
    GateEvents { station: Ident, gate: Ident },
    /// `gates/{gate}/qr/used`: QR codes this gate accepted, for the station-wide replay check.
    GateQrUsed { station: Ident, gate: Ident },
}

/// Why a string is not one of our topics. Each way a topic can be wrong has its own variant, so a
/// consumer's log says exactly what a misbehaving publisher sent.
#[derive(Debug, PartialEq, Eq, Error)]
pub enum TopicError {
    /// The topic does not start with `afc/v1/`: another product or another protocol version.
    #[error("topic {0:?} is not under {ROOT_PREFIX}/")]
    WrongRoot(String),
    /// `+` or `#` appear: a filter was passed where a topic was expected.
    #[error("topic contains an MQTT wildcard (+ or #)")]
    Wildcard,
    /// Two slashes in a row, or a leading or trailing slash.
    #[error("topic has an empty level")]
    EmptyLevel,
    /// The station or gate level is not a valid identifier.
    #[error("bad {level} level: {source}")]
    BadIdent {
        /// `"station"` or `"gate"`.
        level: &'static str,
        source: IdentError,
    },
    /// The `{kind}` level names no parameter kind.
    #[error("unknown parameter kind {0:?}")]
    UnknownKind(String),
    /// The `{version}` or `{chunk}` level is not a canonical decimal number in range.
    #[error("bad {level} level {value:?}: expected a decimal number without sign or leading zeros")]
    BadNumber {
        /// `"version"` or `"chunk"`.
        level: &'static str,
        value: String,
    },
    /// A level names nothing we publish (a typo, or a topic from a newer protocol).
    #[error("unknown topic level {0:?}")]
    UnknownLevel(String),
    /// The topic stops before it names a message (e.g. `afc/v1/s1/gates/g01`).
    #[error("topic ends too early")]
    MissingLevel,
    /// Levels follow a complete topic (e.g. `afc/v1/s1/state/x`).
    #[error("topic has extra levels after a complete topic")]
    ExtraLevels,
}

fn truncated(s: &str) -> String {
    s.chars().take(80).collect()
}

fn ident(level: &'static str, s: Option<&&str>) -> Result<Ident, TopicError> {
    let s = s.ok_or(TopicError::MissingLevel)?;
    Ident::new(s).map_err(|source| TopicError::BadIdent { level, source })
}

fn kind(s: Option<&&str>) -> Result<ParamKind, TopicError> {
    let s = s.ok_or(TopicError::MissingLevel)?;
    ParamKind::parse(s).ok_or_else(|| TopicError::UnknownKind(truncated(s)))
}

/// A canonical decimal: digits only, no sign, no leading zero (so each number has one topic).
fn number<T: std::str::FromStr>(level: &'static str, s: Option<&&str>) -> Result<T, TopicError> {
    let s = s.ok_or(TopicError::MissingLevel)?;
    let bad = || TopicError::BadNumber { level, value: truncated(s) };
    let canonical = s.bytes().all(|b| b.is_ascii_digit()) && (s.len() == 1 || !s.starts_with('0'));
    if !canonical {
        return Err(bad());
    }
    s.parse().map_err(|_| bad())
}

/// `Ok(t)` if `levels` has exactly `n` levels, else the right error.
fn exact(levels: &[&str], n: usize, t: Topic) -> Result<Topic, TopicError> {
    match levels.len().cmp(&n) {
        std::cmp::Ordering::Equal => Ok(t),
        std::cmp::Ordering::Less => Err(TopicError::MissingLevel),
        std::cmp::Ordering::Greater => Err(TopicError::ExtraLevels),
    }
}

/// Expects `levels[i] == word`.
fn literal(levels: &[&str], i: usize, word: &str) -> Result<(), TopicError> {
    match levels.get(i) {
        None => Err(TopicError::MissingLevel),
        Some(l) if *l == word => Ok(()),
        Some(l) => Err(TopicError::UnknownLevel(truncated(l))),
    }
}

impl Topic {
    /// Parses a concrete topic; see [`TopicError`] for what is refused.
    pub fn parse(topic: &str) -> Result<Topic, TopicError> {
        if topic.contains(['+', '#']) {
            return Err(TopicError::Wildcard);
        }
        let levels: Vec<&str> = topic.split('/').collect();
        if levels.iter().any(|l| l.is_empty()) {
            return Err(TopicError::EmptyLevel);
        }
        let root: Vec<&str> = ROOT_PREFIX.split('/').collect();
        if levels.len() <= root.len() || levels[..root.len()] != root[..] {
            if levels.len() == root.len() && levels[..] == root[..] {
                return Err(TopicError::MissingLevel);
            }
            return Err(TopicError::WrongRoot(truncated(topic)));
        }
        let station = ident("station", levels.get(root.len()))?;
        let rest = &levels[root.len() + 1..];
        match rest.first() {
            None => Err(TopicError::MissingLevel),
            Some(&"state") => exact(rest, 1, Topic::State { station }),
            Some(&"mode") => exact(rest, 1, Topic::Mode { station }),
            Some(&"qr") => {
                literal(rest, 1, "used")?;
                exact(rest, 2, Topic::QrUsed { station })
            }
            Some(&"params") => {
                let kind = kind(rest.get(1))?;
                match rest.get(2) {
                    None => Err(TopicError::MissingLevel),
                    Some(&"current") => exact(rest, 3, Topic::ParamCurrent { station, kind }),
                    Some(_) => {
                        let version = number("version", rest.get(2))?;
                        let chunk = number("chunk", rest.get(3))?;
                        exact(rest, 4, Topic::ParamChunk { station, kind, version, chunk })
                    }
                }
            }
            Some(&"gates") => {
                let gate = ident("gate", rest.get(1))?;
                Self::parse_gate(station, gate, &rest[2..])
            }
            Some(other) => Err(TopicError::UnknownLevel(truncated(other))),
        }
    }

    /// The levels after `gates/{gate}`.
    fn parse_gate(station: Ident, gate: Ident, rest: &[&str]) -> Result<Topic, TopicError> {
        match rest.first() {
            None => Err(TopicError::MissingLevel),
            Some(&"status") => exact(rest, 1, Topic::GateStatus { station, gate }),
            Some(&"heartbeat") => exact(rest, 1, Topic::GateHeartbeat { station, gate }),
            Some(&"events") => exact(rest, 1, Topic::GateEvents { station, gate }),
            Some(&"tx") if rest.len() == 1 => Ok(Topic::GateTx { station, gate }),
            Some(&"tx") => {
                literal(rest, 1, "ack")?;
                exact(rest, 2, Topic::GateTxAck { station, gate })
            }
            Some(&"cmd") if rest.len() == 1 => Ok(Topic::GateCmd { station, gate }),
            Some(&"cmd") => {
                literal(rest, 1, "ack")?;
                exact(rest, 2, Topic::GateCmdAck { station, gate })
            }
            Some(&"qr") => {
                literal(rest, 1, "used")?;
                exact(rest, 2, Topic::GateQrUsed { station, gate })
            }
            Some(&"params") => match rest.get(1) {
                None => Err(TopicError::MissingLevel),
                Some(&"ack") => exact(rest, 2, Topic::GateParamsAck { station, gate }),
                Some(_) => {
                    let kind = kind(rest.get(1))?;
                    literal(rest, 2, "current")?;
                    exact(rest, 3, Topic::GateParamCurrent { station, gate, kind })
                }
            },
            Some(other) => Err(TopicError::UnknownLevel(truncated(other))),
        }
    }

    /// The station the topic belongs to.
    pub fn station(&self) -> &Ident {
        match self {
            Topic::State { station }
            | Topic::ParamCurrent { station, .. }
            | Topic::ParamChunk { station, .. }
            | Topic::Mode { station }
            | Topic::QrUsed { station }
            | Topic::GateStatus { station, .. }
            | Topic::GateHeartbeat { station, .. }
            | Topic::GateTx { station, .. }
            | Topic::GateTxAck { station, .. }
            | Topic::GateParamCurrent { station, .. }
            | Topic::GateParamsAck { station, .. }
            | Topic::GateCmd { station, .. }
            | Topic::GateCmdAck { station, .. }
            | Topic::GateEvents { station, .. }
            | Topic::GateQrUsed { station, .. } => station,
        }
    }

    /// The gate a `gates/{gate}/...` topic belongs to; `None` for station-wide topics.
    pub fn gate(&self) -> Option<&Ident> {
        match self {
            Topic::State { .. }
            | Topic::ParamCurrent { .. }
            | Topic::ParamChunk { .. }
            | Topic::Mode { .. }
            | Topic::QrUsed { .. } => None,
            Topic::GateStatus { gate, .. }
            | Topic::GateHeartbeat { gate, .. }
            | Topic::GateTx { gate, .. }
            | Topic::GateTxAck { gate, .. }
            | Topic::GateParamCurrent { gate, .. }
            | Topic::GateParamsAck { gate, .. }
            | Topic::GateCmd { gate, .. }
            | Topic::GateCmdAck { gate, .. }
            | Topic::GateEvents { gate, .. }
            | Topic::GateQrUsed { gate, .. } => Some(gate),
        }
    }

    /// The MQTT QoS to publish with (SPEC §5): 0 for heartbeats (the next one follows in 5 s),
    /// 1 for everything else (consumers de-duplicate: by gate_seq, command id, version).
    pub fn qos(&self) -> u8 {
        match self {
            Topic::GateHeartbeat { .. } => 0,
            _ => 1,
        }
    }

    /// Whether to publish retained (SPEC §5): state that a (re)connecting subscriber needs at once.
    /// Chunks are retained while a pointer references their version; the controller clears them
    /// (an empty retained message) afterwards.
    pub fn retained(&self) -> bool {
        matches!(
            self,
            Topic::State { .. }
                | Topic::ParamCurrent { .. }
                | Topic::ParamChunk { .. }
                | Topic::Mode { .. }
                | Topic::GateStatus { .. }
                | Topic::GateParamCurrent { .. }
        )
    }

    /// Who may publish on this topic.
    pub fn publisher(&self) -> Publisher {
        match self {
            Topic::State { .. } => Publisher::Leader,
            Topic::ParamCurrent { .. }
            | Topic::ParamChunk { .. }
            | Topic::Mode { .. }
            | Topic::QrUsed { .. }
            | Topic::GateTxAck { .. }
            | Topic::GateParamCurrent { .. }
            | Topic::GateCmd { .. } => Publisher::Controller,
            Topic::GateStatus { .. }
            | Topic::GateHeartbeat { .. }
            | Topic::GateTx { .. }
            | Topic::GateParamsAck { .. }
            | Topic::GateCmdAck { .. }
            | Topic::GateEvents { .. }
            | Topic::GateQrUsed { .. } => Publisher::Gate,
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ROOT_PREFIX}/{}/", self.station())?;
        if let Some(gate) = self.gate() {
            write!(f, "gates/{gate}/")?;
        }
        match self {
            Topic::State { .. } => f.write_str("state"),
            Topic::ParamCurrent { kind, .. } | Topic::GateParamCurrent { kind, .. } => {
                write!(f, "params/{kind}/current")
            }
            Topic::ParamChunk { kind, version, chunk, .. } => write!(f, "params/{kind}/{version}/{chunk}"),
            Topic::Mode { .. } => f.write_str("mode"),
            Topic::QrUsed { .. } | Topic::GateQrUsed { .. } => f.write_str("qr/used"),
            Topic::GateStatus { .. } => f.write_str("status"),
            Topic::GateHeartbeat { .. } => f.write_str("heartbeat"),
            Topic::GateTx { .. } => f.write_str("tx"),
            Topic::GateTxAck { .. } => f.write_str("tx/ack"),
            Topic::GateParamsAck { .. } => f.write_str("params/ack"),
            Topic::GateCmd { .. } => f.write_str("cmd"),
            Topic::GateCmdAck { .. } => f.write_str("cmd/ack"),
            Topic::GateEvents { .. } => f.write_str("events"),
        }
    }
}

impl std::str::FromStr for Topic {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Topic::parse(s)
    }
}

/// Subscription filters (with MQTT wildcards) and the matching rule.
pub mod filters {
    use crate::model::{Ident, ParamKind};

    use super::ROOT_PREFIX;

    /// What a gate agent subscribes to (re-subscribed on every reconnect): the leader state, the
    /// modes, every station-wide and per-gate parameter pointer, its commands and tx acks, and the
    /// station's used QR codes. Chunks are subscribed per needed version with
    /// [`param_chunks_filter`], so a gate never receives bodies it does not need.
    pub fn gate_subscriptions(station: &Ident, gate: &Ident) -> Vec<String> {
        let root = format!("{ROOT_PREFIX}/{station}");
        vec![
            format!("{root}/state"),
            format!("{root}/mode"),
            format!("{root}/params/+/current"),
            format!("{root}/qr/used"),
            format!("{root}/gates/{gate}/params/+/current"),
            format!("{root}/gates/{gate}/cmd"),
            format!("{root}/gates/{gate}/tx/ack"),
        ]
    }

    /// The chunks of one package version, subscribed while the gate downloads it.
    pub fn param_chunks_filter(station: &Ident, kind: ParamKind, version: u64) -> String {
        format!("{ROOT_PREFIX}/{station}/params/{kind}/{version}/+")
    }

    /// What a controller subscribes to: everything every gate of the station publishes.
    pub fn controller_subscriptions(station: &Ident) -> Vec<String> {
        let gates = format!("{ROOT_PREFIX}/{station}/gates/+");
        vec![
            format!("{gates}/status"),
            format!("{gates}/heartbeat"),
            format!("{gates}/tx"),
            format!("{gates}/params/ack"),
            format!("{gates}/cmd/ack"),
            format!("{gates}/events"),
            format!("{gates}/qr/used"),
        ]
    }

    /// The MQTT 3.1.1/5 matching rule: `+` matches one level, a final `#` matches the parent and any
    /// number of levels below, and wildcards at the first level never match `$`-topics.
    pub fn matches(filter: &str, topic: &str) -> bool {
        if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
            return false;
        }
        let mut f = filter.split('/');
        let mut t = topic.split('/');
        loop {
            match (f.next(), t.next()) {
                (Some("#"), _) => return f.next().is_none(),
                (Some("+"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Ident {
        Ident::new(s).unwrap()
    }

    #[test]
    fn the_spec_table_topics_are_built_as_written() {
        let (s, g) = (id("xinghai_sq"), id("g01"));
        let cases = [
            (Topic::State { station: s.clone() }, "afc/v1/xinghai_sq/state"),
            (
                Topic::ParamCurrent { station: s.clone(), kind: ParamKind::FareTable },
                "afc/v1/xinghai_sq/params/fare_table/current",
            ),
            (
                Topic::ParamChunk { station: s.clone(), kind: ParamKind::Blacklist, version: 7, chunk: 0 },
                "afc/v1/xinghai_sq/params/blacklist/7/0",
            ),
            (
                Topic::GateParamCurrent { station: s.clone(), gate: g.clone(), kind: ParamKind::QrKeys },
                "afc/v1/xinghai_sq/gates/g01/params/qr_keys/current",
            ),
            (Topic::GateTxAck { station: s.clone(), gate: g.clone() }, "afc/v1/xinghai_sq/gates/g01/tx/ack"),
            (
                Topic::GateQrUsed { station: s.clone(), gate: g.clone() },
                "afc/v1/xinghai_sq/gates/g01/qr/used",
            ),
            (Topic::QrUsed { station: s.clone() }, "afc/v1/xinghai_sq/qr/used"),
        ];
        for (topic, text) in cases {
            assert_eq!(topic.to_string(), text);
            assert_eq!(Topic::parse(text).unwrap(), topic);
        }
    }

    #[test]
    fn each_way_a_topic_can_be_wrong_has_its_own_error() {
        use TopicError::*;
        let cases: [(&str, TopicError); 14] = [
            ("afc/v2/s/state", WrongRoot("afc/v2/s/state".into())),
            ("$SYS/broker/uptime", WrongRoot("$SYS/broker/uptime".into())),
            ("afc/v1/+/state", Wildcard),
            ("afc/v1/s/gates/#", Wildcard),
            ("afc/v1//state", EmptyLevel),
            ("afc/v1/s/state/", EmptyLevel),
            ("afc/v1", MissingLevel),
            ("afc/v1/s/gates/g01", MissingLevel),
            ("afc/v1/s/state/x", ExtraLevels),
            ("afc/v1/s/params/fares/current", UnknownKind("fares".into())),
            ("afc/v1/s/params/blacklist/07/0", BadNumber { level: "version", value: "07".into() }),
            (
                "afc/v1/s/params/blacklist/7/4294967296",
                BadNumber { level: "chunk", value: "4294967296".into() },
            ),
            ("afc/v1/s/gates/g01/tx/nack", UnknownLevel("nack".into())),
            ("afc/v1/s/stats", UnknownLevel("stats".into())),
        ];
        for (text, err) in cases {
            assert_eq!(Topic::parse(text), Err(err), "{text}");
        }
        assert!(matches!(Topic::parse("afc/v1/s.1/state"), Err(BadIdent { level: "station", .. })));
        assert!(matches!(Topic::parse("afc/v1/s/gates/g 1/tx"), Err(BadIdent { level: "gate", .. })));
    }

    #[test]
    fn only_heartbeats_are_qos_zero_and_only_state_like_topics_are_retained() {
        let (s, g) = (id("s"), id("g"));
        assert_eq!(Topic::GateHeartbeat { station: s.clone(), gate: g.clone() }.qos(), 0);
        assert_eq!(Topic::GateTx { station: s.clone(), gate: g.clone() }.qos(), 1);
        assert!(Topic::State { station: s.clone() }.retained());
        assert!(Topic::GateStatus { station: s.clone(), gate: g.clone() }.retained());
        assert!(!Topic::GateCmd { station: s.clone(), gate: g.clone() }.retained());
        assert!(!Topic::QrUsed { station: s }.retained());
    }

    #[test]
    fn filters_match_by_the_mqtt_rules() {
        use filters::matches;
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+/c", "a/b/d/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
    }
}
