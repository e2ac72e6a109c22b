//! Clearing pricing figure (issue 15: clearing pricing of a 1,000,000-record backlog ≤ 60 s).
//! Starts the real server in a temp dir with the Dalian network and fare rule in two stations'
//! feeds, uploads a backlog of bank and QR journeys between them (half the records each, every
//! journey an entry at one station and an exit at the other), then times what clearing does with
//! it: one charge pass (every station's ledger read back, the bank journeys paired and priced,
//! every token authorised at first sight and the authorisations fsynced) and the QR journeys
//! report (read back, paired, priced, answered as JSON).
//!
//! `cargo bench -p clearing --bench pricing` (env `CLEARING_BENCH_RECORDS`, default 1,000,000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use afc_domain::bank::{BankRef, Cryptogram};
use afc_domain::ledger::{LedgerHead, QrRef, TxRecord};
use afc_domain::model::{Direction, Ident, Media, Timestamp};
use clearing::protocol::{FeedKind, FeedSubmission, UploadBatch};
use clearing::{testdata, ClearingClient, ClientConfig, Config, UploadOutcome};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

const NETWORK: &str = include_str!("../../deploy/data/dalian-network.json");
const RULE: &str = include_str!("../../deploy/data/dalian-fare-rule.json");
/// 2026-12-02 06:00 Beijing time: every journey of the backlog on that business day.
const T0: i64 = 1_796_162_400_000;

fn tap(station: &Ident, seq: u64, media: Media, direction: Direction, who: u64) -> TxRecord {
    let mut r = testdata::record(station, &format!("g{:02}", seq % 20 + 1), seq);
    (r.media, r.direction, r.fare_fen) = (media, direction, 0);
    (r.balance_before, r.balance_after, r.card_tx_counter) = (None, None, None);
    (r.entry_station, r.entry_time) = (None, None);
    // Entries in the morning, exits 30 minutes later; who taps in the order of their number.
    let at = T0 + (who % 36_000) as i64 * 1_000 + if direction == Direction::Exit { 1_800_000 } else { 0 };
    r.occurred_at = Timestamp(at);
    match media {
        Media::Bank => {
            let mut token = [0u8; 32];
            token[..8].copy_from_slice(&who.to_be_bytes());
            token[8..16].copy_from_slice(&(who ^ 0x5a5a_5a5a).to_be_bytes());
            let token = afc_domain::bank::BankToken(token);
            r.id = token.deny_key();
            r.bank = Some(BankRef { token, cryptogram: Cryptogram(seq.to_be_bytes()), atc: 1 });
        }
        _ => {
            r.id = 8_000_000 + who;
            r.qr = Some(QrRef { issuer: 1, nonce: seq });
        }
    }
    r
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let total: u64 =
        std::env::var("CLEARING_BENCH_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let token = "bench-token-0123456789";
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let mut config = Config::new(dir.path(), token);
    // Only the timed pass below: no background pass in between.
    config.bank.charge_interval = Duration::from_secs(3_600);
    let server = tokio::spawn(clearing::run(listener, config, shutdown.clone()));
    let client = ClearingClient::new(
        &format!("http://{addr}"),
        token,
        ClientConfig { request_timeout: Duration::from_secs(600), ..ClientConfig::default() },
    )?;
    let (a, b) = (Ident::new("xian_rd")?, Ident::new("huanan_sq")?);
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.watermark(&a).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "server did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for s in [&a, &b] {
        for (kind, body) in [(FeedKind::Network, NETWORK), (FeedKind::FareRule, RULE)] {
            let sub = FeedSubmission {
                kind,
                version: 1,
                effective_from: Timestamp(0),
                body: RawValue::from_string(body.to_owned())?,
            };
            client.publish(s, &sub).await?;
        }
    }

    // Journeys: total / 2 of them, half bank, half QR; the odd ones from b to a.
    let journeys = total / 2;
    let upload = Instant::now();
    for (s, entries_here) in [(&a, true), (&b, false)] {
        let mut head = LedgerHead::genesis();
        let mut seq = 0u64;
        let mut batch = Vec::new();
        let mut prev = head.last_hash;
        for who in 0..journeys {
            let media = if who % 2 == 0 { Media::Bank } else { Media::Qr };
            let forward = (who / 2) % 2 == 0;
            let direction = if forward == entries_here { Direction::Entry } else { Direction::Exit };
            seq += 1;
            batch.push(head.append(tap(s, seq, media, direction, who / 2)));
            if batch.len() == 10_000 || who + 1 == journeys {
                let n = batch.len() as u64;
                let b = UploadBatch::new(prev, std::mem::take(&mut batch)).expect("non-empty");
                anyhow::ensure!(client.upload(s, &b).await? == UploadOutcome::Acked(seq), "upload {n}");
                prev = head.last_hash;
            }
        }
    }
    let upload = upload.elapsed();

    let http = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;
    let t = Instant::now();
    let pass: serde_json::Value = http
        .post(format!("http://{addr}/v1/admin/bank/charge-pass"))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    let charge_pass = t.elapsed();
    let t = Instant::now();
    let qr: serde_json::Value = http
        .get(format!("http://{addr}/v1/admin/qr/journeys"))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    let qr_report = t.elapsed();
    let priced = qr["journeys"].as_array().map_or(0, Vec::len);
    anyhow::ensure!(priced as u64 == journeys / 2, "QR journeys priced: {priced} of {}", journeys / 2);
    anyhow::ensure!(pass["authorised"].as_u64() == Some(journeys.div_ceil(2)), "pass {pass}");
    println!(
        "clearing pricing: {total} records ({journeys} journeys between 2 stations, half bank, half QR); \
         uploaded in {:.1} s; charge pass (read back, pair and price the bank half, authorise {} tokens) {:.2} s; \
         QR report ({priced} journeys priced, JSON) {:.2} s",
        upload.as_secs_f64(),
        pass["authorised"],
        charge_pass.as_secs_f64(),
        qr_report.as_secs_f64(),
    );
    shutdown.cancel();
    server.await??;
    Ok(())
}
