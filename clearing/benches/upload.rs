//! Clearing upload figure (SPEC §11: a 1,000,000-transaction backlog uploaded ≤ 60 s to the local
//! reference server). Starts the real server on 127.0.0.1:0 in a temp dir, uploads the backlog in
//! batches through the typed client, and checks every record was stored exactly once.
//!
//! `cargo bench -p clearing --bench upload` (env: `CLEARING_BENCH_RECORDS`, default 1,000,000;
//! `CLEARING_BENCH_BATCH`, default 10,000). The records are generated batch by batch outside the
//! timed section (they already exist in the station ledger); the timed section is the client's
//! serialization, the HTTP transfer, the server's parsing, hash-chain verification and fsync.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use afc_domain::ledger::LedgerHead;
use afc_domain::model::Ident;
use clearing::protocol::UploadBatch;
use clearing::{testdata, ClearingClient, ClientConfig, Config, UploadOutcome};
use tokio_util::sync::CancellationToken;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; nothing else is understood.
    let total = env_u64("CLEARING_BENCH_RECORDS", 1_000_000);
    let batch_size = env_u64("CLEARING_BENCH_BATCH", 10_000);
    let dir = tempfile::tempdir()?;
    let token = "bench-token-0123456789";
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(clearing::run(listener, Config::new(dir.path(), token), shutdown.clone()));
    let client = ClearingClient::new(&format!("http://{addr}"), token, ClientConfig::default())?;
    let station = Ident::new("xian_rd")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.watermark(&station).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "server did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let gates: Vec<String> = (1..=20).map(|g| format!("g{g:02}")).collect();
    let mut head = LedgerHead::genesis();
    let mut uploading = Duration::ZERO;
    let mut sent = 0u64;
    let wall = Instant::now();
    while sent < total {
        let n = batch_size.min(total - sent);
        let prev = head.last_hash;
        let entries = (sent..sent + n)
            .map(|i| head.append(testdata::record(&station, &gates[(i % 20) as usize], i / 20 + 1)))
            .collect();
        let batch = UploadBatch::new(prev, entries).expect("non-empty batch");
        let t = Instant::now();
        let outcome = client.upload(&station, &batch).await?;
        uploading += t.elapsed();
        anyhow::ensure!(outcome == UploadOutcome::Acked(sent + n), "unexpected outcome {outcome:?}");
        sent += n;
    }
    let wall = wall.elapsed();
    let stats = client.stats(&station).await?;
    anyhow::ensure!(stats.records == total && stats.duplicate_keys == 0, "stored {stats:?}");
    let data = std::fs::metadata(dir.path().join("stations/xian_rd/ledger.afcl"))?.len();
    println!(
        "clearing upload: {total} records in batches of {batch_size}: {:.2} s uploading ({:.0} records/s), \
         {:.2} s wall with record generation; {} records stored exactly once, ledger file {:.1} MB",
        uploading.as_secs_f64(),
        total as f64 / uploading.as_secs_f64(),
        wall.as_secs_f64(),
        stats.records,
        data as f64 / 1e6,
    );
    shutdown.cancel();
    server.await??;
    Ok(())
}
