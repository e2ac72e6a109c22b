//! The gate's metrics (SPEC §10) and the small HTTP listener that serves them.
//!
//! A fixed set of series on the `prometheus` crate ([`afc_process::metrics`]): counters and
//! histograms registered once, the state gauges (outbox, PLC, MQTT, storage) read at scrape time,
//! `process_*` and `afc_build_info`, served as Prometheus text on `GET /metrics`; `GET /healthz`
//! answers 200 while the agent runs (with the PLC and MQTT state in the body). The listener is
//! hand-written on a tokio `TcpListener` to keep dependencies lean: it reads one request head
//! (bounded), answers, and closes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use afc_process::metrics::prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};
use afc_process::metrics::{self as m, Family, Samples, ScrapeCollector};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Upper bounds of the latency histograms, in seconds.
pub const BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0,
];

/// What the scrape reads from the gate's state (set by its tasks).
const STATE: [Family; 7] = [
    m::gauge("afc_gate_outbox_depth", "Transactions waiting in the outbox for a controller ack.", &[]),
    m::gauge("afc_gate_outbox_bytes", "Bytes held by the outbox.", &[]),
    m::gauge("afc_gate_outbox_capacity_bytes", "Outbox capacity in bytes.", &[]),
    m::gauge("afc_gate_acked_seq", "Highest gate_seq acknowledged by the station ledger.", &[]),
    m::gauge("afc_gate_plc_online", "1 while the gate PLC answers.", &[]),
    m::gauge("afc_gate_mqtt_connected", "1 while connected to the station broker.", &[]),
    m::gauge(
        "afc_gate_storage_available",
        "1 while the gate's storage takes writes (0: taps refused with storage_unavailable).",
        &[],
    ),
];

/// Every series the gate exports, in one registry with `process_*` and `afc_build_info`.
pub struct Metrics {
    registry: Registry,
    /// Decisions by (result, reason, media, direction).
    decisions: IntCounterVec,
    /// Time to decide a tap (the pure decision, in process).
    pub decision_seconds: Histogram,
    /// Tap received → record durable → flap command acknowledged by the PLC.
    pub tap_to_flap_seconds: Histogram,
    /// Time to make the outbox record durable.
    pub outbox_flush_seconds: Histogram,
    /// Modbus calls by operation.
    modbus_calls: HistogramVec,
    /// Modbus failures by kind (timeout, io, exception, connect).
    modbus_errors: IntCounterVec,
    pub plc_online: AtomicBool,
    pub mqtt_connected: AtomicBool,
    pub outbox_depth: AtomicU64,
    pub outbox_bytes: AtomicU64,
    pub outbox_capacity_bytes: AtomicU64,
    /// Highest gate_seq acknowledged by the controllers.
    pub acked_seq: AtomicU64,
    /// Parameter versions by (kind, state): state is active or pending.
    param_versions: afc_process::metrics::prometheus::IntGaugeVec,
    /// Parameter packages refused, by kind.
    params_rejected: IntCounterVec,
    /// Alarms raised, by kind.
    events: IntCounterVec,
    /// Malformed input by source (reader, mqtt).
    malformed: IntCounterVec,
    /// Control messages refused by (topic kind, reason): not signed by a trusted key for their
    /// topic (`SignedError::code`), or signed but not for this gate (`other_gate`,
    /// `other_installation`).
    unverified: IntCounterVec,
    /// Storage writes that failed, by what was written (outbox, ack, mode, command, probe).
    storage_errors: IntCounterVec,
    /// Set while the gate's storage refuses writes (taps refused with `storage_unavailable`).
    pub storage_unavailable: AtomicBool,
    /// Accepted taps voided by a `passage_not_made` record (their open command failed).
    pub passages_voided: IntCounter,
    /// Stored-value debits the reader's PSAM was asked to sign, by outcome (signed, timeout,
    /// failed); a timeout or failure refused the tap.
    psam: IntCounterVec,
    /// Time from the `sign` line sent to the PSAM's answer read.
    pub psam_seconds: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn counters(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    m::int_counter_vec(r, name, help, labels)
}

fn histogram(r: &Registry, name: &str, help: &str) -> Histogram {
    let h = m::histogram(name, help, &BUCKETS);
    m::register(r, h.clone());
    h
}

/// The sum of `v`'s counters whose labels include every `(name, value)` of `wanted`.
fn sum_where(v: &IntCounterVec, wanted: &[(&str, &str)]) -> u64 {
    use afc_process::metrics::prometheus::core::Collector;
    v.collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .filter(|s| {
            wanted.iter().all(|(k, want)| s.get_label().iter().any(|l| l.name() == *k && l.value() == *want))
        })
        .map(|s| s.get_counter().get_value() as u64)
        .sum()
}

impl Metrics {
    fn registered() -> Self {
        let r = m::new_registry();
        let param_versions = afc_process::metrics::prometheus::IntGaugeVec::new(
            Opts::new(
                "afc_gate_param_version",
                "Parameter version held, by kind and state (active, pending).",
            ),
            &["kind", "state"],
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        m::register(&r, param_versions.clone());
        let modbus_calls = HistogramVec::new(
            afc_process::metrics::prometheus::HistogramOpts::new(
                "afc_gate_modbus_call_seconds",
                "Modbus call latency by operation.",
            )
            .buckets(BUCKETS.to_vec()),
            &["op"],
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        m::register(&r, modbus_calls.clone());
        let passages_voided = m::int_counter(
            &r,
            "afc_gate_passages_voided_total",
            "Accepted taps whose flaps never opened (open command failed), voided by a passage_not_made record.",
        );
        Metrics {
            decisions: counters(
                &r,
                "afc_gate_decisions_total",
                "Tap decisions by result, reason, media and direction.",
                &["result", "reason", "media", "direction"],
            ),
            decision_seconds: histogram(&r, "afc_gate_decision_seconds", "Time to decide a tap, in process."),
            tap_to_flap_seconds: histogram(
                &r,
                "afc_gate_tap_to_flap_seconds",
                "Tap received to flap command acknowledged by the PLC (record durable first).",
            ),
            outbox_flush_seconds: histogram(
                &r,
                "afc_gate_outbox_flush_seconds",
                "Time to make one outbox record durable.",
            ),
            modbus_calls,
            modbus_errors: counters(&r, "afc_gate_modbus_errors_total", "Modbus failures by kind.", &["kind"]),
            params_rejected: counters(
                &r,
                "afc_gate_params_rejected_total",
                "Parameter packages refused, by kind.",
                &["kind"],
            ),
            events: counters(&r, "afc_gate_events_total", "Alarms raised, by kind.", &["kind"]),
            malformed: counters(&r, "afc_gate_malformed_total", "Malformed input refused, by source.", &["source"]),
            unverified: counters(
                &r,
                "afc_gate_unverified_messages_total",
                "Control messages refused: not signed by a trusted key for their topic, or not for this gate.",
                &["topic", "reason"],
            ),
            storage_errors: counters(
                &r,
                "afc_gate_storage_errors_total",
                "Storage writes that failed (disk full, read-only, I/O), by what was written.",
                &["op"],
            ),
            param_versions,
            passages_voided,
            psam: counters(
                &r,
                "afc_gate_psam_signatures_total",
                "Stored-value debits the reader's PSAM was asked to sign, by outcome (signed; timeout, failed: the tap refused; absent: a reader without a PSAM while gate_config requires one, the tap refused; late: an answer after the gate stopped waiting, dropped).",
                &["outcome"],
            ),
            psam_seconds: histogram(
                &r,
                "afc_gate_psam_sign_seconds",
                "Time for the reader's PSAM to answer a sign request.",
            ),
            plc_online: AtomicBool::new(false),
            mqtt_connected: AtomicBool::new(false),
            outbox_depth: AtomicU64::new(0),
            outbox_bytes: AtomicU64::new(0),
            outbox_capacity_bytes: AtomicU64::new(0),
            acked_seq: AtomicU64::new(0),
            storage_unavailable: AtomicBool::new(false),
            registry: r,
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let metrics = Arc::new(Metrics::registered());
        // The state gauges are read at scrape time; the registry (inside `metrics`) holds only a
        // weak handle back, so dropping the agent's `Arc` frees both.
        let weak: Weak<Metrics> = Arc::downgrade(&metrics);
        let read = move |s: &mut Samples<'_>| {
            let Some(me) = weak.upgrade() else { return };
            let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
            s.one("afc_gate_outbox_depth", load(&me.outbox_depth));
            s.one("afc_gate_outbox_bytes", load(&me.outbox_bytes));
            s.one("afc_gate_outbox_capacity_bytes", load(&me.outbox_capacity_bytes));
            s.one("afc_gate_acked_seq", load(&me.acked_seq));
            s.flag("afc_gate_plc_online", &[], me.plc_online.load(Ordering::Relaxed));
            s.flag("afc_gate_mqtt_connected", &[], me.mqtt_connected.load(Ordering::Relaxed));
            s.flag("afc_gate_storage_available", &[], !me.storage_unavailable.load(Ordering::Relaxed));
        };
        match ScrapeCollector::new(&STATE, read) {
            Ok(c) => m::register(&metrics.registry, c),
            Err(e) => tracing::error!(error = %e, "metrics: the gate's state gauges are not exported"),
        }
        metrics
    }

    pub fn decision(
        &self,
        accepted: bool,
        reason: &'static str,
        media: &'static str,
        direction: &'static str,
    ) {
        self.decisions
            .with_label_values(&[if accepted { "accept" } else { "reject" }, reason, media, direction])
            .inc();
    }

    /// The number of decisions with this reason so far (for tests and health).
    pub fn decisions_with_reason(&self, reason: &str) -> u64 {
        sum_where(&self.decisions, &[("reason", reason)])
    }

    /// The latency histogram of one Modbus operation, if it was called.
    pub fn modbus_histogram(&self, op: &'static str) -> Option<Histogram> {
        self.modbus_calls.get_metric_with_label_values(&[op]).ok().filter(|h| h.get_sample_count() > 0)
    }

    pub fn modbus_call(&self, op: &'static str, d: Duration) {
        m::observe(&self.modbus_calls.with_label_values(&[op]), d);
    }

    pub fn modbus_error(&self, kind: &'static str) {
        self.modbus_errors.with_label_values(&[kind]).inc();
    }

    pub fn modbus_errors(&self) -> u64 {
        sum_where(&self.modbus_errors, &[])
    }

    pub fn set_param_version(&self, kind: &'static str, state: &'static str, version: u64) {
        self.param_versions.with_label_values(&[kind, state]).set(i64::try_from(version).unwrap_or(i64::MAX));
    }

    pub fn param_rejected(&self, kind: &'static str) {
        self.params_rejected.with_label_values(&[kind]).inc();
    }

    /// One PSAM signature request ended with `outcome` (`signed`, `timeout`, `failed`, `absent`, `late`).
    pub fn psam(&self, outcome: &'static str) {
        self.psam.with_label_values(&[outcome]).inc();
    }

    /// PSAM signature requests that ended with `outcome` (tests and health).
    pub fn psam_outcomes(&self, outcome: &str) -> u64 {
        sum_where(&self.psam, &[("outcome", outcome)])
    }

    pub fn event(&self, kind: &'static str) {
        self.events.with_label_values(&[kind]).inc();
    }

    pub fn events(&self, kind: &str) -> u64 {
        sum_where(&self.events, &[("kind", kind)])
    }

    pub fn storage_error(&self, op: &'static str) {
        self.storage_errors.with_label_values(&[op]).inc();
    }

    /// Failed storage writes of `op` so far.
    pub fn storage_errors(&self, op: &str) -> u64 {
        sum_where(&self.storage_errors, &[("op", op)])
    }

    pub fn malformed(&self, source: &'static str) {
        self.malformed.with_label_values(&[source]).inc();
    }

    pub fn unverified(&self, topic: &'static str, reason: &'static str) {
        self.unverified.with_label_values(&[topic, reason]).inc();
    }

    /// Messages on `topic` refused for `reason` so far.
    pub fn unverified_messages(&self, topic: &str, reason: &str) -> u64 {
        sum_where(&self.unverified, &[("topic", topic), ("reason", reason)])
    }

    /// Messages on `topic` refused so far, whatever the reason.
    pub fn unverified_on(&self, topic: &str) -> u64 {
        sum_where(&self.unverified, &[("topic", topic)])
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        m::encode(&self.registry)
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
                ("200 OK", m::CONTENT_TYPE, metrics.render())
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
        let m = Metrics::new();
        m.decision(true, "ok", "svc", "entry");
        m.decision(false, "blacklisted", "svc", "exit");
        afc_process::metrics::observe(&m.decision_seconds, Duration::from_micros(7));
        afc_process::metrics::observe(&m.decision_seconds, Duration::from_millis(3));
        m.modbus_call("write_coil", Duration::from_micros(80));
        m.modbus_error("timeout");
        m.set_param_version("fare_table", "active", 3);
        m.unverified("mode", "bad_signature");
        m.passages_voided.inc();
        let text = m.render();
        for family in [
            "afc_gate_decisions_total{direction=\"entry\",media=\"svc\",reason=\"ok\",result=\"accept\"} 1",
            "afc_gate_decision_seconds_bucket{le=\"0.00005\"} 1",
            "afc_build_info{commit=",
            "process_resident_memory_bytes ",
            "afc_gate_decision_seconds_bucket{le=\"+Inf\"} 2",
            "afc_gate_decision_seconds_count 2",
            "afc_gate_modbus_call_seconds_count{op=\"write_coil\"} 1",
            "afc_gate_modbus_errors_total{kind=\"timeout\"} 1",
            "afc_gate_outbox_depth 0",
            "afc_gate_param_version{kind=\"fare_table\",state=\"active\"} 3",
            "afc_gate_unverified_messages_total{reason=\"bad_signature\",topic=\"mode\"} 1",
            "# TYPE afc_gate_passages_voided_total counter\nafc_gate_passages_voided_total 1",
        ] {
            assert!(text.contains(family), "missing {family} in\n{text}");
        }
        assert_eq!(m.decisions_with_reason("blacklisted"), 1);
        assert_eq!(m.unverified_on("mode"), 1);
        assert_eq!(m.modbus_errors(), 1);
    }
}
