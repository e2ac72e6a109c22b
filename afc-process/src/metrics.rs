//! The services' Prometheus metrics (SPEC §10) on the `prometheus` crate, one way for both the
//! controller and the gate agent:
//!
//! - [`new_registry`]: a registry per service with `process_*` (memory, CPU, open files, from
//!   `/proc`) and `afc_build_info{version, commit}`;
//! - series a task updates (counters, histograms) are the crate's own types, registered there
//!   with [`register`]; latency histograms observe a [`Duration`] through [`observe`];
//! - series whose value lives elsewhere (Raft's state, the replicated state, an outbox's depth)
//!   are read at scrape time by a [`ScrapeCollector`]: a fixed list of [`Family`]s, filled by a
//!   closure on every scrape;
//! - [`encode`]: the text exposition (format 0.0.4), [`CONTENT_TYPE`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

pub use prometheus;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry,
};

/// The commit this build was made from (`git rev-parse --short HEAD`, "unknown" outside git).
pub const COMMIT: &str = env!("AFC_GIT_COMMIT");
/// The product version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A registry with `process_*` and `afc_build_info{version, commit}` (always 1).
pub fn new_registry() -> Registry {
    let r = Registry::new();
    #[cfg(target_os = "linux")]
    register(&r, prometheus::process_collector::ProcessCollector::for_self());
    let info = IntGauge::with_opts(
        Opts::new("afc_build_info", "The running build: version and commit (always 1).")
            .const_label("version", VERSION)
            .const_label("commit", COMMIT),
    );
    if let Ok(info) = info {
        info.set(1);
        register(&r, info);
    }
    r
}

/// Registers `c`; a name taken twice is a programming error, logged (and a panic in tests).
pub fn register<C: Collector + 'static>(r: &Registry, c: C) {
    if let Err(e) = r.register(Box::new(c)) {
        debug_assert!(false, "metrics: {e}");
        tracing::error!(error = %e, "metrics: a collector could not be registered");
    }
}

/// A counter registered in `r` (name and help are the caller's constants).
pub fn int_counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("{name}: {e}"));
    register(r, c.clone());
    c
}

/// A counter family with `labels` registered in `r`.
pub fn int_counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let v = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| unreachable!("{name}: {e}"));
    register(r, v.clone());
    v
}

/// A latency histogram with `buckets` (seconds).
pub fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    // Only a malformed name or bucket list fails, both constants of the caller's.
    Histogram::with_opts(opts).unwrap_or_else(|e| {
        debug_assert!(false, "metrics: {e}");
        Histogram::with_opts(HistogramOpts::new("afc_invalid_histogram", "invalid"))
            .unwrap_or_else(|_| unreachable!("a valid constant histogram"))
    })
}

/// Observes `d` in seconds.
pub fn observe(h: &Histogram, d: Duration) {
    h.observe(d.as_secs_f64());
}

/// The mean of everything `h` observed (zero before the first observation).
pub fn mean(h: &Histogram) -> Duration {
    let n = h.get_sample_count();
    if n == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64((h.get_sample_sum() / n as f64).max(0.0))
}

/// The text exposition of everything `r` holds.
pub fn encode(r: &Registry) -> String {
    let mut buf = Vec::with_capacity(16 * 1024);
    if let Err(e) = prometheus::TextEncoder::new().encode(&r.gather(), &mut buf) {
        tracing::warn!(error = %e, "metrics: encoding failed");
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// Whether a scrape-time family is a gauge or a counter (a counter read from a running total).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

/// One family a [`ScrapeCollector`] reports: name, help, kind and label names.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
}

/// A gauge family read at scrape time.
pub const fn gauge(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Family {
    Family { name, help, kind: Kind::Gauge, labels }
}

/// A counter family read at scrape time (the value is a running total kept elsewhere).
pub const fn counter(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Family {
    Family { name, help, kind: Kind::Counter, labels }
}

enum Vec_ {
    Gauge(GaugeVec),
    Counter(CounterVec),
}

/// The values of one scrape, set by name: [`Samples::set`].
pub struct Samples<'a> {
    vecs: &'a HashMap<&'static str, Vec_>,
}

impl Samples<'_> {
    /// Sets the sample of family `name` with these label values (in the family's label order).
    /// An unknown family or a wrong number of labels is a programming error: logged, skipped.
    pub fn set(&mut self, name: &str, labels: &[&str], value: f64) {
        let done = match self.vecs.get(name) {
            Some(Vec_::Gauge(g)) => g.get_metric_with_label_values(labels).map(|m| m.set(value)),
            // A counter's total never goes down; a negative reading is kept at 0.
            Some(Vec_::Counter(c)) => {
                c.get_metric_with_label_values(labels).map(|m| m.inc_by(value.max(0.0)))
            }
            None => Err(prometheus::Error::Msg(format!("no family {name}"))),
        };
        if let Err(e) = done {
            debug_assert!(false, "metrics: {name} {labels:?}: {e}");
            tracing::warn!(family = name, error = %e, "metrics: sample not set");
        }
    }

    /// [`Samples::set`] of a family without labels.
    pub fn one(&mut self, name: &str, value: f64) {
        self.set(name, &[], value);
    }

    /// A flag as 1 or 0.
    pub fn flag(&mut self, name: &str, labels: &[&str], on: bool) {
        self.set(name, labels, f64::from(u8::from(on)));
    }
}

type Fill = Box<dyn Fn(&mut Samples<'_>) + Send + Sync>;

/// A [`Collector`] of [`Family`]s whose values `fill` reads at every scrape. The families are
/// declared up front, so the registry checks their names and labels when it is registered; a
/// family `fill` leaves empty is not exposed.
pub struct ScrapeCollector {
    vecs: Mutex<HashMap<&'static str, Vec_>>,
    descs: Vec<Desc>,
    fill: Fill,
}

impl ScrapeCollector {
    pub fn new(
        families: &[Family],
        fill: impl Fn(&mut Samples<'_>) + Send + Sync + 'static,
    ) -> Result<ScrapeCollector, prometheus::Error> {
        let mut vecs = HashMap::new();
        let mut descs = Vec::new();
        for f in families {
            let opts = Opts::new(f.name, f.help);
            let v = match f.kind {
                Kind::Gauge => Vec_::Gauge(GaugeVec::new(opts, f.labels)?),
                Kind::Counter => Vec_::Counter(CounterVec::new(opts, f.labels)?),
            };
            descs.extend(match &v {
                Vec_::Gauge(g) => g.desc().into_iter().cloned().collect::<Vec<_>>(),
                Vec_::Counter(c) => c.desc().into_iter().cloned().collect(),
            });
            if vecs.insert(f.name, v).is_some() {
                return Err(prometheus::Error::AlreadyReg);
            }
        }
        Ok(ScrapeCollector { vecs: Mutex::new(vecs), descs, fill: Box::new(fill) })
    }
}

impl Collector for ScrapeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // One scrape at a time: reset, fill and read the same vectors.
        let vecs = self.vecs.lock().unwrap_or_else(|p| p.into_inner());
        for v in vecs.values() {
            match v {
                Vec_::Gauge(g) => g.reset(),
                Vec_::Counter(c) => c.reset(),
            }
        }
        (self.fill)(&mut Samples { vecs: &vecs });
        let mut out = Vec::new();
        for v in vecs.values() {
            out.extend(match v {
                Vec_::Gauge(g) => g.collect(),
                Vec_::Counter(c) => c.collect(),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_exposes_build_info_process_series_and_scrape_time_values() {
        let r = new_registry();
        let c = ScrapeCollector::new(
            &[
                gauge("t_online", "Online.", &["gate"]),
                counter("t_total", "Total.", &[]),
                gauge("t_empty", "Never set.", &[]),
            ],
            |s| {
                s.flag("t_online", &["g1"], true);
                s.one("t_total", 42.0);
            },
        );
        register(&r, c.unwrap_or_else(|e| panic!("{e}")));
        let h = histogram("t_seconds", "Latency.", &[0.001, 0.01]);
        register(&r, h.clone());
        observe(&h, Duration::from_micros(500));
        observe(&h, Duration::from_millis(5));
        let text = encode(&r);
        for want in [
            &format!("afc_build_info{{commit=\"{COMMIT}\",version=\"{VERSION}\"}} 1"),
            "t_online{gate=\"g1\"} 1",
            "# TYPE t_total counter\nt_total 42",
            "t_seconds_bucket{le=\"0.001\"} 1",
            "t_seconds_bucket{le=\"+Inf\"} 2",
            "process_resident_memory_bytes ",
            "process_open_fds ",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        assert!(!text.contains("t_empty"), "an empty family is not exposed");
        assert_eq!(mean(&h), Duration::from_micros(2750));
    }

    #[test]
    fn families_declared_twice_are_refused() {
        let twice = [gauge("t_x", "X.", &[]), counter("t_x", "X.", &[])];
        assert!(ScrapeCollector::new(&twice, |_| {}).is_err());
    }
}
