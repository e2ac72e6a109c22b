//! Power cuts under the real `clearing-server` binary: its data directory is a power-cut
//! filesystem (`powercut`: whatever no fsync covered is forgotten at a cut), an uploader sends a
//! station's hash-chained ledger in batches continuously, and at seeded random moments the power
//! goes (the filesystem reverts and fails every request, the server is SIGKILLed), the filesystem
//! is mounted again and the server restarted on what the "disk" really held. The uploader resumes
//! from the server's watermark, as the controller's clearing sync does.
//!
//! Checked: everything the server acknowledged is still held after every restart (its watermark
//! never falls below the highest acknowledged index, and its hash there is the chain's), and at
//! the end it holds exactly the uploaded chain: as many records as acknowledged, the chain's hash
//! at the end, no key stored twice.
//!
//! Seed: `POWERCUT_SEED` (printed either way). Without FUSE the test prints SKIPPED, and fails
//! under `CI=true`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::powercut::{CutMode, PowerCutFs};
use afc_domain::ledger::{LedgerEntry, GENESIS_HASH};
use clearing::{testdata, ClearingClient, ClientConfig, UploadOutcome};
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::common::{batch, station, TOKEN};

/// Power cuts per run.
const CUTS: usize = 12;
/// Entries of the chain the uploader works through (it stops at the end).
const CHAIN: u64 = 120_000;
/// How long a restarted server may take to answer `/healthz`.
const START_DEADLINE: Duration = Duration::from_secs(30);

use ::powercut::service::{available_or_skip as available, seed_from_env as seed, Service};

/// Waits until the running server answers `/healthz`; panics with its log if it exited or hangs.
async fn wait_ready(server: &mut Service, base: &str) {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        server.assert_running();
        if let Ok(r) = http.get(format!("{base}/healthz")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the server (start {}) not ready in {START_DEADLINE:?}; log tail:\n{}",
            server.started(),
            server.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the uploader saw.
#[derive(Debug, Default)]
struct Progress {
    /// The highest index the server answered 200 for.
    highest_acked: u64,
    batches_acked: u64,
    /// Times it asked for the watermark to resume (after a failure or a 409).
    reconciles: u64,
    /// Broken promises: a watermark below an earlier acknowledgement, a wrong hash.
    findings: Vec<String>,
}

/// Uploads `chain` in seeded random batches from the server's watermark until `stop` or the end,
/// riding out the server being down: after any failure it asks the watermark again and resumes
/// there, checking it against what was acknowledged and against its own chain.
async fn uploader(
    client: ClearingClient,
    chain: Arc<Vec<LedgerEntry>>,
    progress: Arc<Mutex<Progress>>,
    seed: u64,
    stop: CancellationToken,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let st = station();
    let mut cursor: Option<u64> = None;
    while !stop.is_cancelled() {
        let Some(at) = cursor else {
            match client.watermark(&st).await {
                Ok(w) => {
                    let mut p = progress.lock().unwrap();
                    p.reconciles += 1;
                    if w.acked_through < p.highest_acked {
                        let found = format!(
                            "watermark {} below the acknowledged {}: acknowledged records lost",
                            w.acked_through, p.highest_acked
                        );
                        p.findings.push(found);
                    }
                    let ours = if w.acked_through == 0 {
                        Some(GENESIS_HASH)
                    } else {
                        chain.get(w.acked_through as usize - 1).map(|e| e.hash)
                    };
                    if ours != w.last_hash {
                        p.findings
                            .push(format!("the hash at watermark {} is not the chain's", w.acked_through));
                    }
                    cursor = Some(w.acked_through);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
            continue;
        };
        if at >= CHAIN {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let last = (at + rng.gen_range(1..=40)).min(CHAIN);
        match client.upload(&st, &batch(&chain, at + 1, last)).await {
            Ok(UploadOutcome::Acked(acked)) => {
                let mut p = progress.lock().unwrap();
                if acked < last {
                    p.findings.push(format!("batch {}..={last} acknowledged only through {acked}", at + 1));
                }
                p.highest_acked = p.highest_acked.max(acked);
                p.batches_acked += 1;
                cursor = Some(acked);
            }
            Ok(UploadOutcome::Conflict { .. }) | Err(_) => {
                cursor = None;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clearing_server_cut_off_at_random_moments_keeps_every_acknowledged_batch_and_the_exact_chain() {
    if !available() {
        return;
    }
    let seed = seed();
    println!("POWERCUT_SEED={seed}");
    let began = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let chain = Arc::new(tokio::task::spawn_blocking(|| testdata::ledger(&station(), CHAIN)).await.unwrap());

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut fs = PowerCutFs::mount(&data, CutMode::Torn { seed }).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let base = format!("http://{addr}");
    let args = [
        "--listen",
        &addr.to_string(),
        "--data-dir",
        &data.display().to_string(),
        "--token-file",
        &token_file.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let args = args.into_iter().map(Into::into).collect();
    let mut server = Service::new(
        "the server",
        env!("CARGO_BIN_EXE_clearing-server"),
        args,
        dir.path().join("server.log"),
    );
    let config = ClientConfig {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(5),
        upload_timeout: Duration::from_secs(5),
    };
    let client = ClearingClient::new(&base, TOKEN, config).unwrap();

    server.start().unwrap();
    wait_ready(&mut server, &base).await;
    let progress: Arc<Mutex<Progress>> = Arc::default();
    let stop = CancellationToken::new();
    let uploading =
        tokio::spawn(uploader(client.clone(), chain.clone(), progress.clone(), seed, stop.clone()));
    let acked = || progress.lock().unwrap().highest_acked;

    for n in 1..=CUTS {
        let wait = Duration::from_millis(rng.gen_range(100..1500));
        let until = Instant::now() + wait;
        while Instant::now() < until {
            server.assert_running();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let report = fs.cut().unwrap();
        server.kill();
        fs.restore().unwrap();
        server.start().unwrap();
        let restarted = Instant::now();
        wait_ready(&mut server, &base).await;
        // Acks still in flight at the kill have been read by now or never will be; any later ack
        // is also in the watermark read after it.
        let promised = acked();
        let w = client.watermark(&station()).await.unwrap();
        println!(
            "cut {n} after {wait:?}: {report:?}; acknowledged through {promised}, watermark after restart {} \
             (ready after {:?})",
            w.acked_through,
            restarted.elapsed()
        );
        assert!(
            w.acked_through >= promised,
            "cut {n}: the server acknowledged through {promised} but holds only {} after the restart; log tail:\n{}",
            w.acked_through,
            server.log_tail(20)
        );
        let ours = if w.acked_through == 0 { GENESIS_HASH } else { chain[w.acked_through as usize - 1].hash };
        assert_eq!(w.last_hash, Some(ours), "cut {n}: the hash at the watermark is not the chain's");
        // Progress before the next cut, so each cut has acknowledged batches to lose.
        let deadline = Instant::now() + START_DEADLINE;
        while acked() <= promised.max(w.acked_through) && acked() < CHAIN {
            server.assert_running();
            assert!(Instant::now() < deadline, "cut {n}: the uploader made no progress after the restart");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stop.cancel();
    uploading.await.unwrap();

    let p = std::mem::take(&mut *progress.lock().unwrap());
    assert!(p.findings.is_empty(), "the uploader found: {:?}", p.findings);
    let stats = client.stats(&station()).await.unwrap();
    let held = stats.acked_through;
    assert!(held >= p.highest_acked, "holds {held}, acknowledged {}", p.highest_acked);
    assert_eq!(stats.records, held, "records stored vs the watermark");
    assert_eq!(
        stats.last_hash,
        chain[held as usize - 1].hash,
        "the stored chain ends where the uploaded one does"
    );
    assert_eq!(stats.duplicate_keys, 0, "a record stored twice");
    let fs_stats = fs.stats();
    println!(
        "seed {seed}: {} cuts, {} starts, {} batches acknowledged, {} reconciles, chain held through {held} \
         (acknowledged {}); fs: {} fsyncs, {} dir fsyncs, {} MB written; {:?}",
        fs_stats.cuts,
        server.started(),
        p.batches_acked,
        p.reconciles,
        p.highest_acked,
        fs_stats.fsyncs,
        fs_stats.fsyncdirs,
        fs_stats.bytes_written / 1_000_000,
        began.elapsed()
    );
}
