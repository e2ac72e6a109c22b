//! Gate benchmarks (SPEC §11), one command: `cargo bench -p gate-agent --bench tap`.
//!
//! 1. Tap → flap command acknowledged by the PLC simulator, in process: decide with a 1,000,000
//!    entry blacklist, number the record and fdatasync it in the outbox, write display + coil over Modbus
//!    TCP; p50 / p99 over many taps. The same taps are also timed from a reader socket (JSON line
//!    out, response line back).
//! 2. The floor, in the same run: one `fdatasync` of a small record on the same file system, and
//!    one bare tokio-modbus coil write to the same simulator.
//! 3. The real `gate-agent` binary started on a data directory holding the 1M blacklist: time from
//!    spawn to the first accepted tap, and its RSS.
//! 4. The same again after 20 deltas (1,000 additions, 100 removals each) were accepted, so they
//!    are stored beside the 1M base and folded in at start-up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::time::{Duration, Instant};

use afc_domain::blacklist::{realistic_sample, Blacklist, BlacklistDelta};
use afc_domain::model::{
    BusinessDayRule, CardType, Date, Direction, ParamKind, Reason, StationCode, Timestamp,
};
use afc_domain::network::{compile, Band, FareRule, Increment};
use afc_domain::package::{BlacklistBody, Package};
use afc_domain::wire::{EntryRecord, ReaderReply, SvcCard, TapMedia, TapRequest};
use ed25519_dalek::SigningKey;
use gate_agent::config::Config;
use gate_agent::plc_sim::{PlcSim, SimConfig};
use gate_agent::reader_sim::{ReaderConn, SimPsam};
use tokio::net::TcpListener;
use tokio_modbus::prelude::Writer;
use tokio_util::sync::CancellationToken;

const TAPS: usize = 3000;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn fmt(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn fares() -> Vec<u8> {
    let net = afc_test_support::network::sample();
    let rule = FareRule {
        name: "bench".into(),
        bands: vec![Band { up_to_m: 6000, fare_fen: 200 }, Band { up_to_m: 12_000, fare_fen: 300 }],
        beyond: Some(Increment { fen: 100, per_m: 10_000 }),
        min_fare_fen: 200,
        discounts: [(CardType::ORDINARY, 80u8)].into_iter().collect(),
        token_percent: 100,
        max_ride_minutes: None,
        overstay_surcharge_fen: 0,
        business_day: BusinessDayRule::default(),
        card_type_names: Default::default(),
    };
    compile(&net, &rule).unwrap().encode()
}

fn tap(i: usize) -> TapRequest {
    let now = gate_agent::gate::now();
    let card = SvcCard {
        card_id: 5104_0000_0000_0000 + i as u64,
        card_type: CardType::ORDINARY,
        balance_fen: 10_000,
        expiry: Date::from_ymd(2035, 1, 1).unwrap(),
        tx_counter: 1,
        entry: Some(EntryRecord { station: StationCode(104), time: now.plus_minutes(-20) }),
    };
    TapRequest { direction: Direction::Exit, media: TapMedia::Svc { card } }
}

fn write_config(
    dir: &std::path::Path,
    plc: std::net::SocketAddr,
    reader: std::net::SocketAddr,
    key: &SigningKey,
) {
    std::fs::write(dir.join("gate.key"), hex::encode([9u8; 32])).unwrap();
    let text = format!(
        "station = \"s1\"\ngate = \"g01\"\nstation_code = 101\ndata_dir = \"{}\"\nreader_listen = \"{reader}\"\n\
         signing_key_file = \"{}\"\n[trusted_keys]\n1 = \"{}\"\n[mqtt]\nbrokers = [\"127.0.0.1:9\"]\n\
         [plc]\naddress = \"{plc}\"\n",
        dir.join("data").display(),
        dir.join("gate.key").display(),
        hex::encode(key.verifying_key().to_bytes()),
    );
    std::fs::write(dir.join("gate-agent.toml"), text).unwrap();
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Starts the real binary on the bench's configuration: time to its first accepted tap, and its
/// RSS 2 s later (then it is killed).
async fn start_binary(dir: &std::path::Path, reader_addr: std::net::SocketAddr) -> (Duration, u64) {
    let t = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gate-agent"))
        .arg("--config")
        .arg(dir.join("gate-agent.toml"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = loop {
        if let Ok(mut c) = ReaderConn::connect(reader_addr).await {
            if let Ok(ReaderReply::Response(r)) = c.tap(&tap(3 * TAPS)).await {
                if r.reason == Reason::Ok {
                    break t.elapsed();
                }
            }
        }
        assert!(t.elapsed() < Duration::from_secs(30), "binary never decided");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    (first, rss)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let key = SigningKey::from_bytes(&[1u8; 32]);
    let sim = PlcSim::new(SimConfig { passage: Duration::from_millis(2), ..SimConfig::default() });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plc_addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    {
        let (s, c) = (sim.clone(), cancel.clone());
        tokio::spawn(async move { s.serve(listener, c).await });
    }
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/tmp".into())).unwrap();
    let reader = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reader_addr = reader.local_addr().unwrap();
    write_config(dir.path(), plc_addr, reader_addr, &key);
    let config = Config::load(&dir.path().join("gate-agent.toml")).unwrap();
    let running = gate_agent::start(&config, gate_agent::Listeners { reader, metrics: None }, cancel.clone())
        .await
        .unwrap();
    let gate = running.gate.clone();
    let t = Instant::now();
    let list = Blacklist::from_entries(1, realistic_sample(1_000_000, 42));
    let bl =
        Package::sign(ParamKind::Blacklist, 1, Timestamp(0), BlacklistBody::Full(list).encode(), 1, &key)
            .encode();
    let ft = Package::sign(ParamKind::FareTable, 1, Timestamp(0), fares(), 1, &key).encode();
    gate.params.offer(ParamKind::FareTable, 1, &ft, gate_agent::gate::now()).unwrap();
    gate.params.offer(ParamKind::Blacklist, 1, &bl, gate_agent::gate::now()).unwrap();
    println!("seeded 1M blacklist ({} B package) in {}", bl.len(), fmt(t.elapsed()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gate.plc().online() {
        assert!(Instant::now() < deadline, "PLC never online");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // 1 and 2 in the same run: taps (decide, durable record, display and coil acknowledged), and the
    // floor's two parts — an fdatasync of a small record written in place in a preallocated file (as
    // the outbox log does), and a bare coil write to the same simulator on a connection of its own.
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::create(dir.path().join("floor")).unwrap();
    f.write_all_at(&vec![0u8; 200 * TAPS], 0).unwrap();
    f.sync_all().unwrap();
    let stream = tokio::net::TcpStream::connect(plc_addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut ctx = tokio_modbus::client::tcp::attach_slave(stream, tokio_modbus::Slave(1));
    let mut in_process = Vec::with_capacity(TAPS);
    let mut fsync = Vec::with_capacity(TAPS);
    let mut coil = Vec::with_capacity(TAPS);
    // Blocks of 100 of each, alternating, so that each kind is measured under the same conditions
    // but no sync rides on a journal commit the previous, different operation paid for.
    for block in 0..TAPS / 100 {
        for i in block * 100..(block + 1) * 100 {
            let t = Instant::now();
            let outcome = gate.tap(tap(i)).await.unwrap();
            assert_eq!(outcome.response.reason, Reason::Ok);
            gate.run_flap(&outcome).await;
            in_process.push(t.elapsed());
        }
        for i in block * 100..(block + 1) * 100 {
            let t = Instant::now();
            f.write_all_at(&[7u8; 200], (i * 200) as u64).unwrap();
            f.sync_data().unwrap();
            fsync.push(t.elapsed());
        }
        for _ in 0..100 {
            let t = Instant::now();
            ctx.write_single_coil(3, false).await.unwrap().unwrap();
            coil.push(t.elapsed());
        }
    }
    // The same taps through the reader socket (response line back; the coil runs alongside).
    let mut conn = ReaderConn::connect(reader_addr).await.unwrap();
    let mut socket = Vec::with_capacity(TAPS);
    for i in 0..TAPS {
        let t = Instant::now();
        let r = conn.tap(&tap(TAPS + i)).await.unwrap();
        socket.push(t.elapsed());
        assert!(matches!(r, ReaderReply::Response(ref r) if r.reason == Reason::Ok));
    }
    // The same again from a two-phase reader: every debit signed by its simulated PSAM (the sign
    // line out, the TAC back, then the record and the response).
    let psam = afc_domain::tac::Psam::new(afc_domain::tac::IssuerKey::from_bytes([1; 32]).psam_key(1), 0);
    let mut conn = ReaderConn::connect_with_psam(reader_addr, SimPsam::new(psam)).await.unwrap();
    let mut signed = Vec::with_capacity(TAPS);
    for i in 0..TAPS {
        let t = Instant::now();
        let r = conn.tap(&tap(4 * TAPS + i)).await.unwrap();
        signed.push(t.elapsed());
        assert!(matches!(r, ReaderReply::Response(ref r) if r.reason == Reason::Ok));
    }
    assert_eq!(running.metrics.psam_outcomes("signed"), TAPS as u64);
    assert!(running.metrics.modbus_errors() == 0, "Modbus errors during the run");
    // For comparison: fdatasync after an append that grows the file (commits the size too).
    let mut g = std::fs::File::create(dir.path().join("floor-append")).unwrap();
    let mut append = Vec::with_capacity(TAPS);
    for _ in 0..TAPS {
        let t = Instant::now();
        g.write_all(&[7u8; 200]).unwrap();
        g.sync_data().unwrap();
        append.push(t.elapsed());
    }
    // The outbox append alone, on a store of its own.
    let store = gate_agent::store::Store::open(&dir.path().join("store-alone"), 1 << 30).unwrap();
    let mut appends = Vec::with_capacity(TAPS);
    for _ in 0..TAPS {
        let t = Instant::now();
        store.append(|_| vec![7u8; 200]).unwrap();
        appends.push(t.elapsed());
    }
    drop(store);
    let floor = pct(&mut fsync, 0.5) + pct(&mut coil, 0.5);
    println!("\n== tap → flap command acknowledged by the PLC simulator ({TAPS} taps, 1M blacklist)");
    println!(
        "in process (decide + durable record + display/coil write): p50 {}  p99 {}  max {}",
        fmt(pct(&mut in_process, 0.5)),
        fmt(pct(&mut in_process, 0.99)),
        fmt(pct(&mut in_process, 1.0))
    );
    println!(
        "reader socket round trip (JSON line → response line):     p50 {}  p99 {}  max {}",
        fmt(pct(&mut socket, 0.5)),
        fmt(pct(&mut socket, 0.99)),
        fmt(pct(&mut socket, 1.0))
    );
    println!(
        "reader socket, two-phase (tap → sign → signed → response):  p50 {}  p99 {}  max {}",
        fmt(pct(&mut signed, 0.5)),
        fmt(pct(&mut signed, 0.99)),
        fmt(pct(&mut signed, 1.0))
    );
    println!(
        "floor: fdatasync p50 {} (p99 {}) + bare coil write p50 {} (p99 {}) = {}",
        fmt(pct(&mut fsync, 0.5)),
        fmt(pct(&mut fsync, 0.99)),
        fmt(pct(&mut coil, 0.5)),
        fmt(pct(&mut coil, 0.99)),
        fmt(floor)
    );
    let m = &running.metrics;
    use afc_process::metrics::mean;
    println!(
        "means inside the agent: decision {:?}, record flush (log frame + fdatasync, display write alongside) {:?}, \
         coil write {:?}, register write {:?}",
        mean(&m.decision_seconds),
        mean(&m.outbox_flush_seconds),
        m.modbus_histogram("write_coil").map(|h| mean(&h)).unwrap_or_default(),
        m.modbus_histogram("write_registers").map(|h| mean(&h)).unwrap_or_default(),
    );
    println!(
        "outbox append alone (log frame + fdatasync): p50 {}  p99 {}",
        fmt(pct(&mut appends, 0.5)),
        fmt(pct(&mut appends, 0.99))
    );
    println!("median / floor = {:.2}", pct(&mut in_process, 0.5).as_secs_f64() / floor.as_secs_f64());
    println!(
        "(for comparison: appending fdatasync, which also commits the file size: p50 {}  p99 {})",
        fmt(pct(&mut append, 0.5)),
        fmt(pct(&mut append, 0.99))
    );
    cancel.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(running);
    drop(gate);

    // 3. The real binary on the data directory that now holds the 1M blacklist.
    let cancel = CancellationToken::new();
    let sim2 = PlcSim::new(SimConfig::default());
    let listener = TcpListener::bind(plc_addr).await.unwrap();
    {
        let c = cancel.clone();
        tokio::spawn(async move { sim2.serve(listener, c).await });
    }
    let (first, rss) = start_binary(dir.path(), reader_addr).await;
    println!("\n== gate-agent binary with the 1M blacklist on disk");
    println!("start-up to first accepted tap: {}", fmt(first));
    println!("RSS after start-up: {:.1} MiB", rss as f64 / 1024.0);

    // 4. The same with 20 deltas of 1,000 additions and 100 removals stored beside the 1M base,
    // offered through the gate's parameters as the MQTT task does.
    {
        let store = std::sync::Arc::new(
            gate_agent::store::Store::open(&config.data_dir.join("store"), config.outbox.max_bytes).unwrap(),
        );
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let params = gate_agent::params::Params::open(
            store,
            config.trusted_keys().unwrap(),
            gate_agent::metrics::Metrics::new(),
            tx,
        )
        .unwrap();
        let entries = realistic_sample(1_000_000, 42);
        for v in 2..22u64 {
            let delta = BlacklistDelta {
                from_version: v - 1,
                to_version: v,
                add: realistic_sample(1000, 100 + v),
                remove: entries.iter().skip(100 * v as usize).take(100).copied().collect(),
            };
            let body = BlacklistBody::Delta(delta).encode();
            let pkg = Package::sign(ParamKind::Blacklist, v, Timestamp(0), body, 1, &key).encode();
            params.offer(ParamKind::Blacklist, v, &pkg, gate_agent::gate::now()).unwrap();
        }
    }
    let (first, rss) = start_binary(dir.path(), reader_addr).await;
    println!("\n== gate-agent binary with the 1M blacklist and 20 deltas on disk");
    println!("start-up to first accepted tap: {}", fmt(first));
    println!("RSS after start-up: {:.1} MiB", rss as f64 / 1024.0);
    cancel.cancel();
}
