//! Stored-value TACs verified by clearing: the real server given the issuer key, a station's
//! ledger uploaded with debits signed by two PSAMs at two gates, one forged, one from an older
//! reader; `GET /v1/admin/tac` and `/metrics` report each per gate and PSAM.

use afc_domain::ledger::{LedgerHead, TxRecord};
use afc_domain::tac::{IssuerKey, Psam, TacInput};
use clearing::protocol::UploadBatch;
use clearing::{testdata, UploadOutcome};

use crate::common::{station, TestServer, TOKEN};

fn master() -> IssuerKey {
    IssuerKey::from_bytes([0x5a; 32])
}

fn signed(gate: &str, seq: u64, psam: &mut Psam) -> TxRecord {
    let mut r = testdata::record(&station(), gate, seq);
    r.tac = psam.sign(&TacInput::of_record(&r).unwrap());
    r
}

#[tokio::test]
async fn a_debit_with_a_forged_tac_is_reported_as_a_mismatch_for_its_gate_and_psam_and_an_older_readers_as_missing(
) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), |c| c.tac_issuer_key = Some(master())).await;
    let (mut p7, mut p8) = (Psam::new(master().psam_key(7), 0), Psam::new(master().psam_key(8), 0));
    let mut records = [
        signed("g01", 1, &mut p7),
        signed("g01", 2, &mut p7),
        signed("g02", 1, &mut p8),
        signed("g02", 2, &mut p8),
        // An older one-phase reader: no TAC.
        testdata::record(&station(), "g02", 3),
    ];
    // A forged debit: the fare changed after signing, and the TAC re-made by a PSAM under
    // another issuer's key (what an attacker without the issuer key can do at best).
    records[1].fare_fen += 300;
    let mut forger = Psam::new(IssuerKey::from_bytes([1; 32]).psam_key(7), 1);
    records[1].tac = forger.sign(&TacInput::of_record(&records[1]).unwrap());
    // One bit of a genuine TAC flipped.
    records[3].tac.as_mut().unwrap().tac[0] ^= 0x01;
    let mut head = LedgerHead::genesis();
    let chain: Vec<_> = records.iter().cloned().map(|r| head.append(r)).collect();
    let prev = chain.last().unwrap().hash;
    let batch = UploadBatch::new(afc_domain::ledger::GENESIS_HASH, chain).unwrap();
    assert!(matches!(server.client.upload(&station(), &batch).await.unwrap(), UploadOutcome::Acked(_)));

    let http = reqwest::Client::new();
    let r = http.get(server.url("/v1/admin/tac")).send().await.unwrap();
    assert_eq!(r.status(), 401, "admin auth like the other admin routes");
    let rep: serde_json::Value =
        http.get(server.url("/v1/admin/tac")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    assert_eq!(rep["issuer_key"], true);
    assert_eq!(
        rep["totals"],
        serde_json::json!({"verified": 2, "mismatched": 2, "missing": 1, "unchecked": 0}),
        "{rep:#}"
    );
    let gate = |g: &str| rep["gates"].as_array().unwrap().iter().find(|x| x["gate"] == g).unwrap().clone();
    assert_eq!((gate("g01")["verified"].as_u64(), gate("g01")["mismatched"].as_u64()), (Some(1), Some(1)));
    assert_eq!(
        (
            gate("g02")["verified"].as_u64(),
            gate("g02")["mismatched"].as_u64(),
            gate("g02")["missing"].as_u64()
        ),
        (Some(1), Some(1), Some(1))
    );
    let psam = |p: u64| rep["psams"].as_array().unwrap().iter().find(|x| x["psam"] == p).unwrap().clone();
    assert_eq!((psam(7)["verified"].as_u64(), psam(7)["mismatched"].as_u64()), (Some(1), Some(1)));
    assert_eq!(psam(7)["gates"], serde_json::json!(["xian_rd/g01"]));
    assert_eq!((psam(8)["verified"].as_u64(), psam(8)["mismatched"].as_u64()), (Some(1), Some(1)));
    let listed: Vec<(String, u64, u64)> = rep["mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["gate"].as_str().unwrap().to_owned(),
                m["gate_seq"].as_u64().unwrap(),
                m["psam"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed, vec![("g01".into(), 2, 7), ("g02".into(), 2, 8)]);

    let scrape_has = |counts: [(&'static str, u64); 3]| {
        let http = http.clone();
        let url = server.url("/metrics");
        async move {
            let metrics = http.get(url).send().await.unwrap().text().await.unwrap();
            for (outcome, v) in counts {
                let line =
                    format!("afc_clearing_tac_records{{station=\"xian_rd\",outcome=\"{outcome}\"}} {v}");
                assert!(metrics.contains(&line), "{line} not in\n{metrics}");
            }
        }
    };
    scrape_has([("verified", 2), ("mismatched", 2), ("missing", 1)]).await;
    scrape_has([("verified", 2), ("mismatched", 2), ("missing", 1)]).await;

    // Records stored after a scrape: the next one counts them on top of the tally (it checks
    // only the new records), and equals what a full report counts.
    let mut more =
        [signed("g01", 3, &mut p7), signed("g01", 4, &mut p7), testdata::record(&station(), "g01", 5)];
    more[1].fare_fen += 50;
    let chain: Vec<_> = more.iter().cloned().map(|r| head.append(r)).collect();
    let batch = UploadBatch::new(prev, chain).unwrap();
    assert!(matches!(server.client.upload(&station(), &batch).await.unwrap(), UploadOutcome::Acked(_)));
    scrape_has([("verified", 3), ("mismatched", 3), ("missing", 2)]).await;
    let rep: serde_json::Value =
        http.get(server.url("/v1/admin/tac")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        rep["totals"],
        serde_json::json!({"verified": 3, "mismatched": 3, "missing": 2, "unchecked": 0})
    );
}
