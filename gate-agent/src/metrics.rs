//! The gate's metrics (SPEC §10) and the small HTTP listener that serves them.
//!
//! A fixed set of series, kept in atomics and small maps, rendered as Prometheus text on
//! `GET /metrics`; `GET /healthz` answers 200 while the agent runs (with the PLC and MQTT state in
//! the body). The listener is hand-written on a tokio `TcpListener` to keep dependencies lean: it
//! reads one request head (bounded), answers, and closes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Upper bounds of the latency histograms, in seconds.
pub const BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0,
];

/// A latency histogram with the fixed [`BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in nanoseconds (integer, so it can be atomic).
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(d.as_nanos().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The mean of everything observed (zero before the first observation).
    pub fn mean(&self) -> Duration {
        let n = self.count().max(1);
        Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed) / n)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// Every series the gate exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Decisions by (result, reason, media, direction).
    decisions: Mutex<BTreeMap<[&'static str; 4], u64>>,
    /// Time to decide a tap (the pure decision, in process).
    pub decision_seconds: Histogram,
    /// Tap received → record durable → flap command acknowledged by the PLC.
    pub tap_to_flap_seconds: Histogram,
    /// Time to make the outbox record durable.
    pub outbox_flush_seconds: Histogram,
    /// Modbus calls by operation.
    modbus_calls: Mutex<BTreeMap<&'static str, Arc<Histogram>>>,
    /// Modbus failures by kind (timeout, io, exception, connect).
    modbus_errors: Mutex<BTreeMap<&'static str, u64>>,
    pub plc_online: AtomicBool,
    pub mqtt_connected: AtomicBool,
    pub outbox_depth: AtomicU64,
    pub outbox_bytes: AtomicU64,
    pub outbox_capacity_bytes: AtomicU64,
    /// Highest gate_seq acknowledged by the controllers.
    pub acked_seq: AtomicU64,
    /// Parameter versions by (kind, state): state is active or pending.
    param_versions: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Parameter packages refused, by kind.
    params_rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// Alarms raised, by kind.
    events: Mutex<BTreeMap<&'static str, u64>>,
    /// Malformed input by source (reader, mqtt).
    malformed: Mutex<BTreeMap<&'static str, u64>>,
    /// Control messages refused by (topic kind, reason): not signed by a trusted key for their
    /// topic (`SignedError::code`), or signed but not for this gate (`other_gate`,
    /// `other_installation`).
    unverified: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Storage writes that failed, by what was written (outbox, ack, mode, command, probe).
    storage_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Set while the gate's storage refuses writes (taps refused with `storage_unavailable`).
    pub storage_unavailable: AtomicBool,
    /// Accepted taps voided by a `passage_not_made` record (their open command failed).
    pub passages_voided: AtomicU64,
}

fn bump<K: Ord>(m: &Mutex<BTreeMap<K, u64>>, k: K) {
    // A poisoned map is plain counters: keep counting.
    *m.lock().unwrap_or_else(|p| p.into_inner()).entry(k).or_default() += 1;
}

fn get<K: Ord + Clone, V: Clone>(m: &Mutex<BTreeMap<K, V>>) -> BTreeMap<K, V> {
    m.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    pub fn decision(
        &self,
        accepted: bool,
        reason: &'static str,
        media: &'static str,
        direction: &'static str,
    ) {
        bump(&self.decisions, [if accepted { "accept" } else { "reject" }, reason, media, direction]);
    }

    /// The number of decisions with this reason so far (for tests and health).
    pub fn decisions_with_reason(&self, reason: &str) -> u64 {
        get(&self.decisions).iter().filter(|(k, _)| k[1] == reason).map(|(_, v)| *v).sum()
    }

    /// The latency histogram of one Modbus operation, if it was called.
    pub fn modbus_histogram(&self, op: &'static str) -> Option<Arc<Histogram>> {
        self.modbus_calls.lock().unwrap_or_else(|p| p.into_inner()).get(op).cloned()
    }

    pub fn modbus_call(&self, op: &'static str, d: Duration) {
        let h = self.modbus_calls.lock().unwrap_or_else(|p| p.into_inner()).entry(op).or_default().clone();
        h.observe(d);
    }

    pub fn modbus_error(&self, kind: &'static str) {
        bump(&self.modbus_errors, kind);
    }

    pub fn modbus_errors(&self) -> u64 {
        get(&self.modbus_errors).values().sum()
    }

    pub fn set_param_version(&self, kind: &'static str, state: &'static str, version: u64) {
        self.param_versions.lock().unwrap_or_else(|p| p.into_inner()).insert((kind, state), version);
    }

    pub fn param_rejected(&self, kind: &'static str) {
        bump(&self.params_rejected, kind);
    }

    pub fn event(&self, kind: &'static str) {
        bump(&self.events, kind);
    }

    pub fn events(&self, kind: &str) -> u64 {
        get(&self.events).get(kind).copied().unwrap_or(0)
    }

    pub fn storage_error(&self, op: &'static str) {
        bump(&self.storage_errors, op);
    }

    /// Failed storage writes of `op` so far.
    pub fn storage_errors(&self, op: &str) -> u64 {
        get(&self.storage_errors).get(op).copied().unwrap_or(0)
    }

    pub fn malformed(&self, source: &'static str) {
        bump(&self.malformed, source);
    }

    pub fn unverified(&self, topic: &'static str, reason: &'static str) {
        bump(&self.unverified, (topic, reason));
    }

    /// Messages on `topic` refused for `reason` so far.
    pub fn unverified_messages(&self, topic: &str, reason: &str) -> u64 {
        get(&self.unverified).iter().filter(|((t, r), _)| *t == topic && *r == reason).map(|(_, v)| *v).sum()
    }

    /// Messages on `topic` refused so far, whatever the reason.
    pub fn unverified_on(&self, topic: &str) -> u64 {
        get(&self.unverified).iter().filter(|((t, _), _)| *t == topic).map(|(_, v)| *v).sum()
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(8 * 1024);
        let _ = writeln!(o, "# HELP afc_build_info The running build: version and commit (always 1).");
        let _ = writeln!(o, "# TYPE afc_build_info gauge");
        let _ = writeln!(
            o,
            "afc_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            env!("AFC_GIT_COMMIT")
        );
        let _ = writeln!(
            o,
            "# HELP afc_gate_decisions_total Tap decisions by result, reason, media and direction."
        );
        let _ = writeln!(o, "# TYPE afc_gate_decisions_total counter");
        for ([result, reason, media, direction], v) in get(&self.decisions) {
            let _ = writeln!(
                o,
                "afc_gate_decisions_total{{result=\"{result}\",reason=\"{reason}\",media=\"{media}\",direction=\"{direction}\"}} {v}"
            );
        }
        let hist = [
            ("afc_gate_decision_seconds", "Time to decide a tap, in process.", &self.decision_seconds),
            (
                "afc_gate_tap_to_flap_seconds",
                "Tap received to flap command acknowledged by the PLC (record durable first).",
                &self.tap_to_flap_seconds,
            ),
            (
                "afc_gate_outbox_flush_seconds",
                "Time to make one outbox record durable.",
                &self.outbox_flush_seconds,
            ),
        ];
        for (name, help, h) in hist {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} histogram");
            h.render(&mut o, name, "");
        }
        let _ = writeln!(o, "# HELP afc_gate_modbus_call_seconds Modbus call latency by operation.");
        let _ = writeln!(o, "# TYPE afc_gate_modbus_call_seconds histogram");
        for (op, h) in get(&self.modbus_calls) {
            h.render(&mut o, "afc_gate_modbus_call_seconds", &format!("op=\"{op}\""));
        }
        let counters = [
            ("afc_gate_modbus_errors_total", "Modbus failures by kind.", "kind", get(&self.modbus_errors)),
            (
                "afc_gate_params_rejected_total",
                "Parameter packages refused, by kind.",
                "kind",
                get(&self.params_rejected),
            ),
            ("afc_gate_events_total", "Alarms raised, by kind.", "kind", get(&self.events)),
            (
                "afc_gate_malformed_total",
                "Malformed input refused, by source.",
                "source",
                get(&self.malformed),
            ),
            (
                "afc_gate_storage_errors_total",
                "Storage writes that failed (disk full, read-only, I/O), by what was written.",
                "op",
                get(&self.storage_errors),
            ),
        ];
        for (name, help, label, map) in counters {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} counter");
            for (k, v) in map {
                let _ = writeln!(o, "{name}{{{label}=\"{k}\"}} {v}");
            }
        }
        let _ = writeln!(
            o,
            "# HELP afc_gate_unverified_messages_total Control messages refused: not signed by a trusted key for their topic, or not for this gate."
        );
        let _ = writeln!(o, "# TYPE afc_gate_unverified_messages_total counter");
        for ((topic, reason), v) in get(&self.unverified) {
            let _ = writeln!(
                o,
                "afc_gate_unverified_messages_total{{topic=\"{topic}\",reason=\"{reason}\"}} {v}"
            );
        }
        let _ = writeln!(
            o,
            "# HELP afc_gate_param_version Parameter version held, by kind and state (active, pending)."
        );
        let _ = writeln!(o, "# TYPE afc_gate_param_version gauge");
        for ((kind, state), v) in get(&self.param_versions) {
            let _ = writeln!(o, "afc_gate_param_version{{kind=\"{kind}\",state=\"{state}\"}} {v}");
        }
        let _ = writeln!(
            o,
            "# HELP afc_gate_passages_voided_total Accepted taps whose flaps never opened (open command failed), voided by a passage_not_made record."
        );
        let _ = writeln!(o, "# TYPE afc_gate_passages_voided_total counter");
        let _ =
            writeln!(o, "afc_gate_passages_voided_total {}", self.passages_voided.load(Ordering::Relaxed));
        let gauges = [
            (
                "afc_gate_outbox_depth",
                "Transactions waiting in the outbox for a controller ack.",
                self.outbox_depth.load(Ordering::Relaxed),
            ),
            ("afc_gate_outbox_bytes", "Bytes held by the outbox.", self.outbox_bytes.load(Ordering::Relaxed)),
            (
                "afc_gate_outbox_capacity_bytes",
                "Outbox capacity in bytes.",
                self.outbox_capacity_bytes.load(Ordering::Relaxed),
            ),
            (
                "afc_gate_acked_seq",
                "Highest gate_seq acknowledged by the station ledger.",
                self.acked_seq.load(Ordering::Relaxed),
            ),
            (
                "afc_gate_plc_online",
                "1 while the gate PLC answers.",
                u64::from(self.plc_online.load(Ordering::Relaxed)),
            ),
            (
                "afc_gate_mqtt_connected",
                "1 while connected to the station broker.",
                u64::from(self.mqtt_connected.load(Ordering::Relaxed)),
            ),
            (
                "afc_gate_storage_available",
                "1 while the gate's storage takes writes (0: taps refused with storage_unavailable).",
                u64::from(!self.storage_unavailable.load(Ordering::Relaxed)),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} gauge");
            let _ = writeln!(o, "{name} {v}");
        }
        o
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `cancel` fires.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (mut stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let head_complete = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    match stream.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return false,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n")
                        || buf[..n].windows(2).any(|w| w == b"\n\n")
                    {
                        return true;
                    }
                }
                false
            })
            .await
            .unwrap_or(false);
            let head = String::from_utf8_lossy(&buf[..n]);
            let mut words = head.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (status, ctype, body) = if !head_complete {
                ("400 Bad Request", "text/plain", "bad request\n".to_owned())
            } else if method != "GET" {
                ("405 Method Not Allowed", "text/plain", "only GET\n".to_owned())
            } else if path == "/metrics" {
                ("200 OK", "text/plain; version=0.0.4", metrics.render())
            } else if path == "/healthz" {
                let plc = metrics.plc_online.load(Ordering::Relaxed);
                let mqtt = metrics.mqtt_connected.load(Ordering::Relaxed);
                (
                    "200 OK",
                    "application/json",
                    format!("{{\"ok\":true,\"plc_online\":{plc},\"mqtt_connected\":{mqtt}}}\n"),
                )
            } else {
                ("404 Not Found", "text/plain", "not found\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_every_required_family_with_cumulative_buckets() {
        let m = Metrics::default();
        m.decision(true, "ok", "svc", "entry");
        m.decision(false, "blacklisted", "svc", "exit");
        m.decision_seconds.observe(Duration::from_micros(7));
        m.decision_seconds.observe(Duration::from_millis(3));
        m.modbus_call("write_coil", Duration::from_micros(80));
        m.modbus_error("timeout");
        m.set_param_version("fare_table", "active", 3);
        m.unverified("mode", "bad_signature");
        m.passages_voided.fetch_add(1, Ordering::Relaxed);
        let text = m.render();
        for family in [
            "afc_gate_decisions_total{result=\"accept\",reason=\"ok\",media=\"svc\",direction=\"entry\"} 1",
            "afc_gate_decision_seconds_bucket{le=\"0.00005\"} 1",
            "afc_gate_decision_seconds_bucket{le=\"+Inf\"} 2",
            "afc_gate_decision_seconds_count 2",
            "afc_gate_modbus_call_seconds_count{op=\"write_coil\"} 1",
            "afc_gate_modbus_errors_total{kind=\"timeout\"} 1",
            "afc_gate_outbox_depth 0",
            "afc_gate_param_version{kind=\"fare_table\",state=\"active\"} 3",
            "afc_gate_unverified_messages_total{topic=\"mode\",reason=\"bad_signature\"} 1",
            "# TYPE afc_gate_passages_voided_total counter\nafc_gate_passages_voided_total 1",
        ] {
            assert!(text.contains(family), "missing {family} in\n{text}");
        }
        assert_eq!(m.decisions_with_reason("blacklisted"), 1);
    }
}
