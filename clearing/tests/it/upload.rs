//! Batch upload: acknowledgement, resends, conflicts, verification, restart, volume.

use std::time::Instant;

use afc_domain::ledger::GENESIS_HASH;
use clearing::protocol::UploadBatch;
use clearing::{testdata, ClearingError, UploadOutcome};

use crate::common::{batch, station, TestServer};

#[tokio::test]
async fn contiguous_batches_are_acknowledged_and_the_watermark_follows() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let c = &server.client;
    let chain = testdata::ledger(&station(), 30);
    let w = c.watermark(&station()).await.unwrap();
    assert_eq!((w.acked_through, w.last_hash), (0, Some(GENESIS_HASH)));
    assert_eq!(c.upload(&station(), &batch(&chain, 1, 10)).await.unwrap(), UploadOutcome::Acked(10));
    assert_eq!(c.upload(&station(), &batch(&chain, 11, 30)).await.unwrap(), UploadOutcome::Acked(30));
    let w = c.watermark(&station()).await.unwrap();
    assert_eq!((w.acked_through, w.last_hash), (30, Some(chain[29].hash)));
    let stats = c.stats(&station()).await.unwrap();
    assert_eq!((stats.records, stats.batches_acked, stats.resends, stats.duplicate_keys), (30, 2, 0, 0));
    server.stop().await;
}

#[tokio::test]
async fn a_resent_batch_gets_the_same_200_and_nothing_is_stored_twice() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let c = &server.client;
    let chain = testdata::ledger(&station(), 20);
    assert_eq!(c.upload(&station(), &batch(&chain, 1, 10)).await.unwrap(), UploadOutcome::Acked(10));
    assert_eq!(c.upload(&station(), &batch(&chain, 1, 10)).await.unwrap(), UploadOutcome::Acked(10));
    assert_eq!(c.upload(&station(), &batch(&chain, 11, 20)).await.unwrap(), UploadOutcome::Acked(20));
    // A resend of an older batch answers with the current acknowledged point.
    assert_eq!(c.upload(&station(), &batch(&chain, 1, 10)).await.unwrap(), UploadOutcome::Acked(20));
    assert_eq!(c.upload(&station(), &batch(&chain, 5, 7)).await.unwrap(), UploadOutcome::Acked(20));
    let stats = c.stats(&station()).await.unwrap();
    assert_eq!(stats.records, 20);
    assert_eq!(stats.resends, 3);
    assert_eq!(stats.resent_records, 23);
    assert_eq!(stats.duplicate_keys, 0);
    server.stop().await;
}

#[tokio::test]
async fn a_partly_new_batch_stores_only_its_new_suffix() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let c = &server.client;
    let chain = testdata::ledger(&station(), 20);
    c.upload(&station(), &batch(&chain, 1, 10)).await.unwrap();
    assert_eq!(c.upload(&station(), &batch(&chain, 6, 20)).await.unwrap(), UploadOutcome::Acked(20));
    let stats = c.stats(&station()).await.unwrap();
    assert_eq!((stats.records, stats.resent_records, stats.duplicate_keys), (20, 5, 0));
    assert_eq!(stats.last_hash, chain[19].hash);
    server.stop().await;
}

#[tokio::test]
async fn a_batch_after_a_gap_is_answered_409_with_the_index_to_resume_from() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let c = &server.client;
    let chain = testdata::ledger(&station(), 30);
    c.upload(&station(), &batch(&chain, 1, 10)).await.unwrap();
    assert_eq!(
        c.upload(&station(), &batch(&chain, 15, 30)).await.unwrap(),
        UploadOutcome::Conflict { expected_from: 11 }
    );
    // The raw answer is a JSON error body with the stable code.
    let raw = reqwest::Client::new()
        .post(server.url("/v1/stations/xian_rd/batches"))
        .bearer_auth(crate::common::TOKEN)
        .json(&batch(&chain, 15, 30))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 409);
    let body: serde_json::Value = raw.json().await.unwrap();
    assert_eq!(body["code"], "not_contiguous");
    assert_eq!(body["expected_from"], 11);
    let stats = c.stats(&station()).await.unwrap();
    assert_eq!((stats.records, stats.conflicts), (10, 2));
    server.stop().await;
}

#[tokio::test]
async fn a_batch_with_a_broken_chain_is_refused_422_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let c = &server.client;
    let chain = testdata::ledger(&station(), 10);
    let mut tampered = batch(&chain, 1, 10);
    tampered.records[4].record.fare_fen += 100;
    let err = c.upload(&station(), &tampered).await.unwrap_err();
    assert_eq!(err.code(), Some("chain_mismatch"), "{err}");
    assert!(!err.is_retryable());
    let mut wrong_last = batch(&chain, 1, 10);
    wrong_last.last_hash = [7; 32];
    assert_eq!(c.upload(&station(), &wrong_last).await.unwrap_err().code(), Some("chain_mismatch"));
    let mut renumbered = batch(&chain, 1, 10);
    renumbered.records[3].index = 40;
    assert_eq!(c.upload(&station(), &renumbered).await.unwrap_err().code(), Some("index_gap"));
    let mut shape = batch(&chain, 1, 10);
    shape.last_index = 11;
    assert_eq!(c.upload(&station(), &shape).await.unwrap_err().code(), Some("batch_shape"));
    let stats = c.stats(&station()).await.unwrap();
    assert_eq!((stats.records, stats.rejected), (0, 4));
    // The intact batch is still accepted afterwards.
    assert_eq!(c.upload(&station(), &batch(&chain, 1, 10)).await.unwrap(), UploadOutcome::Acked(10));
    server.stop().await;
}

#[tokio::test]
async fn a_batch_from_a_forked_ledger_is_refused_as_a_history_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let c = &server.client;
    let chain = testdata::ledger(&station(), 20);
    c.upload(&station(), &batch(&chain, 1, 10)).await.unwrap();
    // Same station, different history: another ledger with different gate numbering.
    let mut head = afc_domain::ledger::LedgerHead::genesis();
    let fork: Vec<_> = (1..=20).map(|s| head.append(testdata::record(&station(), "g99", s))).collect();
    for b in [batch(&fork, 1, 10), batch(&fork, 11, 20), batch(&fork, 5, 15)] {
        assert_eq!(c.upload(&station(), &b).await.unwrap_err().code(), Some("history_mismatch"));
    }
    // A prev_hash that is not the stored last hash, on an otherwise consistent batch.
    let mut rebased = batch(&chain, 11, 20);
    rebased.prev_hash = [1; 32];
    let rebuilt = UploadBatch::new(
        rebased.prev_hash,
        rebased
            .records
            .iter()
            .scan(rebased.prev_hash, |prev, e| {
                let entry = afc_domain::ledger::LedgerEntry::new(e.index, prev, e.record.clone());
                *prev = entry.hash;
                Some(entry)
            })
            .collect(),
    )
    .unwrap();
    assert_eq!(c.upload(&station(), &rebuilt).await.unwrap_err().code(), Some("history_mismatch"));
    assert_eq!(c.stats(&station()).await.unwrap().records, 10);
    server.stop().await;
}

#[tokio::test]
async fn a_record_of_another_station_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let chain = testdata::ledger(&afc_domain::model::Ident::new("heishijiao").unwrap(), 5);
    let err = server.client.upload(&station(), &batch(&chain, 1, 5)).await.unwrap_err();
    assert_eq!(err.code(), Some("foreign_record"));
    server.stop().await;
}

#[tokio::test]
async fn a_restarted_server_keeps_its_watermark_and_chain() {
    let dir = tempfile::tempdir().unwrap();
    let chain = testdata::ledger(&station(), 40);
    let server = TestServer::start(dir.path()).await;
    server.client.upload(&station(), &batch(&chain, 1, 25)).await.unwrap();
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let c = &server.client;
    let w = c.watermark(&station()).await.unwrap();
    assert_eq!((w.acked_through, w.last_hash), (25, Some(chain[24].hash)));
    // The stored chain is checked against resends and continued by the next batch.
    assert_eq!(c.upload(&station(), &batch(&chain, 20, 25)).await.unwrap(), UploadOutcome::Acked(25));
    assert_eq!(
        c.upload(&station(), &batch(&chain, 30, 40)).await.unwrap(),
        UploadOutcome::Conflict { expected_from: 26 }
    );
    assert_eq!(c.upload(&station(), &batch(&chain, 26, 40)).await.unwrap(), UploadOutcome::Acked(40));
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let stats = server.client.stats(&station()).await.unwrap();
    assert_eq!((stats.records, stats.last_hash, stats.duplicate_keys), (40, chain[39].hash, 0));
    server.stop().await;
}

#[tokio::test]
async fn a_hundred_thousand_records_uploaded_in_batches_are_stored_exactly_once() {
    const TOTAL: u64 = 100_000;
    const BATCH: u64 = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let c = &server.client;
    let chain = testdata::ledger(&station(), TOTAL);
    let started = Instant::now();
    let mut first = 1;
    while first <= TOTAL {
        let last = (first + BATCH - 1).min(TOTAL);
        assert_eq!(
            c.upload(&station(), &batch(&chain, first, last)).await.unwrap(),
            UploadOutcome::Acked(last)
        );
        // Every third batch is sent twice, as after a lost acknowledgement.
        if (first / BATCH) % 3 == 0 {
            assert_eq!(
                c.upload(&station(), &batch(&chain, first, last)).await.unwrap(),
                UploadOutcome::Acked(last)
            );
        }
        first = last + 1;
    }
    let elapsed = started.elapsed();
    println!("uploaded {TOTAL} records (with resends) in {:.2} s (debug build)", elapsed.as_secs_f64());
    let stats = c.stats(&station()).await.unwrap();
    assert_eq!(stats.records, TOTAL);
    assert_eq!(stats.last_hash, chain[TOTAL as usize - 1].hash);
    assert_eq!(stats.duplicate_keys, 0);
    assert_eq!(stats.resends, 4);
    server.stop().await;
    // And exactly once on disk: a fresh server re-reads and re-verifies the same count.
    let server = TestServer::start(dir.path()).await;
    assert_eq!(server.client.stats(&station()).await.unwrap().records, TOTAL);
    server.stop().await;
}

#[tokio::test]
async fn a_batch_over_the_record_limit_is_refused_413() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), |c| c.max_batch_records = 5).await;
    let chain = testdata::ledger(&station(), 10);
    let err = server.client.upload(&station(), &batch(&chain, 1, 10)).await.unwrap_err();
    assert!(
        matches!(&err, ClearingError::Refused { status: 413, code, .. } if code == "too_many_records"),
        "{err}"
    );
    assert_eq!(server.client.stats(&station()).await.unwrap().records, 0);
    server.stop().await;
}

#[tokio::test]
async fn concurrent_uploads_of_the_same_batches_store_each_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let chain = std::sync::Arc::new(testdata::ledger(&station(), 2_000));
    // Two uploaders (say, an old and a new leader) race over the same backlog; each retries from
    // the server's expected_from on a conflict.
    let uploaders: Vec<_> = (0..2)
        .map(|_| {
            let (c, chain) = (server.client.clone(), chain.clone());
            tokio::spawn(async move {
                let mut next = 1;
                while next <= 2_000 {
                    let last = (next + 99).min(2_000);
                    match c.upload(&station(), &batch(&chain, next, last)).await.unwrap() {
                        UploadOutcome::Acked(acked) => next = acked.max(last) + 1,
                        UploadOutcome::Conflict { expected_from } => next = expected_from,
                    }
                }
            })
        })
        .collect();
    for u in uploaders {
        u.await.unwrap();
    }
    let stats = server.client.stats(&station()).await.unwrap();
    assert_eq!((stats.records, stats.duplicate_keys), (2_000, 0));
    assert_eq!(stats.last_hash, chain[1_999].hash);
    server.stop().await;
}

#[tokio::test]
async fn a_closed_day_is_stored_once_a_resend_is_a_duplicate_another_close_is_409_and_it_survives_a_restart()
{
    use clearing::protocol::DayClose;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let c = &server.client;
    let close = |passages: u64| DayClose {
        day: afc_domain::model::Date::parse("2026-12-01").unwrap(),
        record: serde_json::json!({"gates": [{"gate": "g01", "passages": passages}]}),
    };
    let stored = c.close_day(&station(), &close(7)).await.unwrap().unwrap();
    assert!(!stored.duplicate);
    assert!(c.close_day(&station(), &close(7)).await.unwrap().unwrap().duplicate);
    assert_eq!(c.close_day(&station(), &close(8)).await.unwrap(), Err(()));
    // The raw 409 names its code.
    let r = reqwest::Client::new()
        .post(server.url(&format!("/v1/stations/{}/days", station())))
        .bearer_auth(crate::common::TOKEN)
        .json(&close(9))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["code"], "day_conflict");
    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    assert_eq!(server.client.days(&station()).await.unwrap(), vec![close(7)]);
    server.stop().await;
}
