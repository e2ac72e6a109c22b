//! QR journeys priced by clearing across stations: real server, real uploads from two stations,
//! the Dalian network and fare rule fed to each station, and every fare checked against an
//! independent recomputation (Floyd–Warshall over the published distances, then the bands).

use std::collections::HashMap;

use afc_domain::ledger::{LedgerHead, QrRef, TxRecord};
use afc_domain::model::{Direction, Ident, Media, Timestamp};
use afc_domain::network::{FareRule, NetworkDescription};
use clearing::protocol::{FeedKind, FeedSubmission, UploadBatch};
use clearing::testdata;
use clearing::{ClearingClient, UploadOutcome};
use serde_json::value::RawValue;

use crate::common::{TestServer, TOKEN};
pub use afc_test_support::fares::{distances, expected_fare};

pub const NETWORK: &str = include_str!("../../../deploy/data/dalian-network.json");
pub const RULE: &str = include_str!("../../../deploy/data/dalian-fare-rule.json");
/// 2026-12-02 10:00 Beijing time.
const T0: i64 = 1_796_176_800_000;
const MIN: i64 = 60_000;

/// Publishes the Dalian network and fare rule (version 1, in force from the epoch) to each of
/// `stations`' feeds.
pub async fn publish_tariff(c: &ClearingClient, stations: &[&Ident]) {
    for s in stations {
        for (kind, body) in [(FeedKind::Network, NETWORK), (FeedKind::FareRule, RULE)] {
            let sub = FeedSubmission {
                kind,
                version: 1,
                effective_from: Timestamp(0),
                body: RawValue::from_string(body.to_owned()).unwrap(),
            };
            c.publish(s, &sub).await.unwrap();
        }
    }
}

/// Uploads each station's records, chained from genesis, as one batch.
pub async fn upload_ledgers(c: &ClearingClient, ledgers: &HashMap<Ident, Vec<TxRecord>>) {
    for (s, records) in ledgers {
        let mut head = LedgerHead::genesis();
        let chain: Vec<_> = records.iter().cloned().map(|r| head.append(r)).collect();
        let batch = UploadBatch::new(afc_domain::ledger::GENESIS_HASH, chain).unwrap();
        assert!(matches!(c.upload(s, &batch).await.unwrap(), UploadOutcome::Acked(_)));
    }
}

fn qr_tap(station: &Ident, seq: u64, direction: Direction, account: u64, at: i64) -> TxRecord {
    let mut r = testdata::record(station, "g01", seq);
    (r.media, r.id, r.direction, r.fare_fen) = (Media::Qr, account, direction, 0);
    (r.balance_before, r.balance_after, r.card_tx_counter, r.entry_station, r.entry_time) =
        (None, None, None, None, None);
    r.occurred_at = Timestamp(at);
    r.qr = Some(QrRef { issuer: 7, nonce: seq });
    r
}

#[tokio::test]
async fn qr_journeys_across_two_stations_are_priced_as_an_independent_recomputation_says_and_settled_per_issuer(
) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let c = &server.client;
    let net: NetworkDescription = serde_json::from_str(NETWORK).unwrap();
    let rule: FareRule = serde_json::from_str(RULE).unwrap();
    let dist = distances(&net);
    // Two stations far apart (Yaojia on line 1, and the last station of the last line) and
    // one in between.
    let a = Ident::new(&net.stations[0].id).unwrap();
    let b = Ident::new(&net.lines.last().unwrap().stops.last().unwrap().station).unwrap();
    let mid = Ident::new(&net.lines[0].stops[net.lines[0].stops.len() / 2].station).unwrap();
    publish_tariff(c, &[&a, &b, &mid]).await;
    // 40 accounts: entry at one station, exit at another, some over midnight; account 99 enters
    // and never leaves (unpaired after 6 h); account 98 leaves without an entry.
    let stations = [&a, &b, &mid];
    let mut ledgers: HashMap<Ident, Vec<TxRecord>> = HashMap::new();
    let mut seq: HashMap<Ident, u64> = HashMap::new();
    let mut tap = |s: &Ident, dir: Direction, account: u64, at: i64| {
        let n = seq.entry(s.clone()).or_insert(0);
        *n += 1;
        ledgers.entry(s.clone()).or_default().push(qr_tap(s, *n, dir, account, at));
    };
    let mut want: Vec<(u64, String, String, u32)> = Vec::new();
    for account in 1..=40u64 {
        let from = stations[(account % 3) as usize];
        let to = stations[((account + 1 + account / 3) % 3) as usize];
        let to = if to == from { stations[((account + 1) % 3) as usize] } else { to };
        let start = T0 + (account as i64) * 17 * MIN;
        tap(from, Direction::Entry, account, start);
        tap(to, Direction::Exit, account, start + 35 * MIN);
        let m = dist[&(from.to_string(), to.to_string())];
        want.push((account, from.to_string(), to.to_string(), expected_fare(&rule, m)));
    }
    tap(&a, Direction::Entry, 99, T0);
    tap(&b, Direction::Exit, 98, T0 + 5 * MIN);
    upload_ledgers(c, &ledgers).await;

    let http = reqwest::Client::new();
    let as_of = T0 + 24 * 60 * MIN;
    let priced: serde_json::Value = http
        .get(server.url(&format!("/v1/admin/qr/journeys?as_of={as_of}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let journeys = priced["journeys"].as_array().unwrap();
    let code_of: HashMap<u64, String> =
        net.stations.iter().map(|s| (u64::from(s.code.0), s.id.clone())).collect();
    let mut got: Vec<(u64, String, String, u32)> = journeys
        .iter()
        .filter(|j| j["outcome"] == "paired")
        .map(|j| {
            (
                j["account"].as_u64().unwrap(),
                code_of[&j["from"].as_u64().unwrap()].clone(),
                code_of[&j["to"].as_u64().unwrap()].clone(),
                u32::try_from(j["fare_fen"].as_u64().unwrap()).unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(got, want);
    assert!(want.iter().any(|w| w.3 >= 500), "no long journey in the sample: {want:?}");
    // The unpaired ones pay the highest fare from / to their station.
    let max_from_a =
        net.stations.iter().map(|s| expected_fare(&rule, dist[&(a.to_string(), s.id.clone())])).max();
    let max_to_b =
        net.stations.iter().map(|s| expected_fare(&rule, dist[&(s.id.clone(), b.to_string())])).max();
    let unpaired: Vec<(u64, &str, u64)> = journeys
        .iter()
        .filter(|j| j["outcome"] != "paired")
        .map(|j| {
            (j["account"].as_u64().unwrap(), j["outcome"].as_str().unwrap(), j["fare_fen"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        unpaired,
        vec![
            (98, "unpaired_exit", u64::from(max_to_b.unwrap())),
            (99, "unpaired_entry", u64::from(max_from_a.unwrap()))
        ]
    );
    assert!(
        priced["pending"].as_array().unwrap().is_empty() && priced["unpriced"].as_array().unwrap().is_empty()
    );

    // The issuer's settlement file for the day: every journey of that business day, and the total.
    let csv = http
        .get(server.url(&format!("/v1/admin/qr/settlements/7/2026-12-02?as_of={as_of}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let day_total: u64 = journeys
        .iter()
        .filter(|j| j["business_day"] == "2026-12-02")
        .map(|j| j["fare_fen"].as_u64().unwrap())
        .sum();
    let day_count = journeys.iter().filter(|j| j["business_day"] == "2026-12-02").count();
    assert_eq!(csv.lines().count(), day_count + 2, "{csv}");
    assert!(csv.ends_with(&format!("# total,7,2026-12-02,{day_count} journeys,{day_total} fen\n")), "{csv}");
    // Without the token: 401.
    let r = http.get(server.url("/v1/admin/qr/journeys")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    server.stop().await;
}
