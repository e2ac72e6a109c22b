//! Bank journeys charged by clearing: real server, real uploads from the stations, the Dalian
//! network and fare rule fed to each, the day closes sent as the controllers send them; every
//! token-day checked against an independent recomputation (the QR test's distances and bands),
//! the daily cap, a declined token denied once at every station, and nothing charged or denied
//! twice across a restart.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use afc_domain::bank::{sample_tokens, BankRef, BankToken, Cryptogram};
use afc_domain::ledger::TxRecord;
use afc_domain::model::{Date, Direction, Ident, Media, Reason, Timestamp};
use afc_domain::network::{FareRule, NetworkDescription};
use clearing::charges::CHARGES_FILE;
use clearing::protocol::{verify_feed_item, DayClose, DenyListBody, FeedKind, FeedSubmission};
use clearing::testdata;
use clearing::Config;
use ed25519_dalek::SigningKey;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::common::{TestServer, TOKEN};
use crate::journeys::{distances, expected_fare, publish_tariff, upload_ledgers, NETWORK, RULE};

/// 2026-11-02 10:00 Beijing time: a month before the QR tests' day, long over by the wall clock.
const T1: i64 = 1_793_584_800_000;
const MIN: i64 = 60_000;
const DAY: i64 = 1_440 * MIN;

fn day(n: i64) -> Date {
    Date::from_ymd(2026, 11, 2).unwrap().plus_days(n as i32)
}

/// The Dalian network and rule, and three stations: two far apart and one in between.
struct Dalian {
    net: NetworkDescription,
    rule: FareRule,
    dist: HashMap<(String, String), u64>,
    stations: [Ident; 3],
}

impl Dalian {
    fn new() -> Dalian {
        let net: NetworkDescription = serde_json::from_str(NETWORK).unwrap();
        let rule: FareRule = serde_json::from_str(RULE).unwrap();
        let dist = distances(&net);
        let a = Ident::new(&net.stations[0].id).unwrap();
        let b = Ident::new(&net.lines.last().unwrap().stops.last().unwrap().station).unwrap();
        let mid = Ident::new(&net.lines[0].stops[net.lines[0].stops.len() / 2].station).unwrap();
        Dalian { net, rule, dist, stations: [a, b, mid] }
    }

    /// The fare from `from` to `to`, recomputed here.
    fn fare(&self, from: &Ident, to: &Ident) -> u64 {
        u64::from(expected_fare(&self.rule, self.dist[&(from.to_string(), to.to_string())]))
    }

    /// The highest fare to `to` (an unpaired exit's).
    fn max_fare_to(&self, to: &Ident) -> u64 {
        self.net.stations.iter().map(|s| self.fare(&Ident::new(&s.id).unwrap(), to)).max().unwrap()
    }
}

/// Each station's ledger as its gates recorded it.
#[derive(Default)]
struct Ledgers {
    records: HashMap<Ident, Vec<TxRecord>>,
}

impl Ledgers {
    /// An accepted bank tap as a gate records it: fare 0, the ledger id the token's deny key.
    fn tap(&mut self, station: &Ident, direction: Direction, token: BankToken, at: i64) -> &mut TxRecord {
        let list = self.records.entry(station.clone()).or_default();
        let seq = list.len() as u64 + 1;
        let mut r = testdata::record(station, "g01", seq);
        (r.media, r.id, r.direction, r.fare_fen) = (Media::Bank, token.deny_key(), direction, 0);
        (r.balance_before, r.balance_after, r.card_tx_counter) = (None, None, None);
        (r.entry_station, r.entry_time) = (None, None);
        r.occurred_at = Timestamp(at);
        r.bank = Some(BankRef { token, cryptogram: Cryptogram(seq.to_be_bytes()), atc: seq as u16 });
        list.push(r);
        list.last_mut().unwrap()
    }

    fn journey(&mut self, from: &Ident, to: &Ident, token: BankToken, at: i64) {
        self.tap(from, Direction::Entry, token, at);
        self.tap(to, Direction::Exit, token, at + 35 * MIN);
    }
}

/// Every station closes the business days `days`, as its controller does after the day.
async fn close_days(server: &TestServer, stations: &[&Ident], days: &[Date]) {
    for s in stations {
        for d in days {
            let close = DayClose { day: *d, record: serde_json::json!({"day": d.to_string()}) };
            server.client.close_day(s, &close).await.unwrap().unwrap();
        }
    }
}

async fn get_json(server: &TestServer, path: &str) -> Value {
    let r = reqwest::Client::new().get(server.url(path)).bearer_auth(TOKEN).send().await.unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.unwrap()
}

/// `(token, journeys, before cap, charged, result)` per token of the stored charges of `d`.
async fn charges(server: &TestServer, d: Date) -> Vec<(String, u64, u64, u64, String)> {
    let rows = get_json(server, &format!("/v1/admin/bank/charges?day={d}")).await;
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["token"].as_str().unwrap().to_owned(),
                r["journeys"].as_u64().unwrap(),
                r["before_cap_fen"].as_u64().unwrap(),
                r["charged_fen"].as_u64().unwrap(),
                r["result"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Polls until `done` holds for the charges of `d` (the background pass runs every second).
async fn wait_charges(
    server: &TestServer,
    d: Date,
    done: impl Fn(&[(String, u64, u64, u64, String)]) -> bool,
) -> Vec<(String, u64, u64, u64, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = charges(server, d).await;
        if done(&got) {
            return got;
        }
        assert!(Instant::now() < deadline, "charges of {d} never came: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn charge_pass(server: &TestServer) -> Value {
    let r = reqwest::Client::new()
        .post(server.url("/v1/admin/bank/charge-pass"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// The value of the metric line that starts with `series `.
async fn metric(server: &TestServer, series: &str) -> u64 {
    let text = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    let line =
        text.lines().find(|l| l.starts_with(&format!("{series} "))).unwrap_or_else(|| panic!("{series}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Waits until at least `n` background passes completed since start.
async fn wait_passes(server: &TestServer, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(server, "afc_clearing_bank_charge_passes_total{outcome=\"ok\"}").await < n {
        assert!(Instant::now() < deadline, "fewer than {n} charge passes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stored charges (attempt 1 and later), without the first-tap authorisations (attempt 0).
fn stored_charges(dir: &Path) -> usize {
    stored(dir).iter().filter(|c| c["attempt"] != 0).count()
}

fn stored(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("bank").join(CHARGES_FILE)).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn fast(config: &mut Config) {
    config.bank.charge_interval = Duration::from_secs(1);
}

#[tokio::test]
async fn bank_journeys_across_stations_and_days_are_charged_once_per_token_day_as_recomputed_and_a_restart_charges_nothing_again(
) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), fast).await;
    let d = Dalian::new();
    let [a, b, mid] = d.stations.clone();
    let stations = [&a, &b, &mid];
    publish_tariff(&server.client, &stations).await;
    let tokens = sample_tokens(12, 15);
    let mut ledgers = Ledgers::default();
    // Per (token, day): journeys and fares, recomputed here.
    let mut want: BTreeMap<(Date, String), (u64, u64)> = BTreeMap::new();
    for (i, token) in tokens.iter().enumerate() {
        for n in 0..2 {
            let from = stations[(i + n as usize) % 3];
            let to = stations[(i + n as usize + 1) % 3];
            let start = T1 + n * DAY + i as i64 * 7 * MIN;
            // Out and back, three hours apart.
            ledgers.journey(from, to, *token, start);
            ledgers.journey(to, from, *token, start + 180 * MIN);
            want.insert((day(n), token.to_string()), (2, d.fare(from, to) + d.fare(to, from)));
        }
    }
    // Token 0, day 1: a refused entry is never charged, nor its (refused) exit.
    let t0 = tokens[0];
    for direction in [Direction::Entry, Direction::Exit] {
        let r = ledgers.tap(&a, direction, t0, T1 + DAY + 300 * MIN);
        (r.accepted, r.reason) = (false, Reason::BankDenied);
    }
    // Token 1, day 0: a third journey, let out free under train_disruption: counted, costs nothing.
    let t1 = tokens[1];
    ledgers.tap(&a, Direction::Entry, t1, T1 + 400 * MIN);
    ledgers.tap(&b, Direction::Exit, t1, T1 + 430 * MIN).reason = Reason::OkTrainDisruption;
    want.get_mut(&(day(0), t1.to_string())).unwrap().0 += 1;
    // Token 2, day 1: an exit with no entry pays the highest fare to its station.
    let t2 = tokens[2];
    ledgers.tap(&b, Direction::Exit, t2, T1 + DAY + 500 * MIN);
    let w = want.get_mut(&(day(1), t2.to_string())).unwrap();
    (w.0, w.1) = (w.0 + 1, w.1 + d.max_fare_to(&b));
    upload_ledgers(&server.client, &ledgers.records).await;

    // Nothing is charged before every station closed the day.
    wait_passes(&server, 2).await;
    assert!(charges(&server, day(0)).await.is_empty());
    let journeys = get_json(&server, "/v1/admin/bank/journeys").await;
    assert_eq!(journeys["journeys"].as_array().unwrap().len(), 12 * 4 + 2, "{journeys}");
    assert!(
        journeys["unpriced"].as_array().unwrap().is_empty()
            && journeys["pending"].as_array().unwrap().is_empty()
    );
    let unpaired: Vec<&Value> =
        journeys["journeys"].as_array().unwrap().iter().filter(|j| j["outcome"] != "paired").collect();
    assert_eq!(unpaired.len(), 1);
    assert_eq!(unpaired[0]["token"], t2.to_string());
    // The QR report holds no bank journey.
    let qr = get_json(&server, "/v1/admin/qr/journeys").await;
    assert!(qr["journeys"].as_array().unwrap().is_empty(), "{qr}");

    // Day 0 closed everywhere is charged; day 1, closed at two stations of three, waits.
    close_days(&server, &stations, &[day(0)]).await;
    close_days(&server, &[&a, &b], &[day(1)]).await;
    let mut got = BTreeMap::new();
    for n in 0..2 {
        if n == 1 {
            let passes = metric(&server, "afc_clearing_bank_charge_passes_total{outcome=\"ok\"}").await;
            wait_passes(&server, passes + 2).await;
            assert!(charges(&server, day(1)).await.is_empty());
            close_days(&server, &[&mid], &[day(1)]).await;
        }
        for (token, journeys, before, charged, result) in
            wait_charges(&server, day(n), |c| c.len() == 12).await
        {
            assert_eq!((before, result.as_str()), (charged, "approved"), "no cap, nothing declined");
            got.insert((day(n), token), (journeys, charged));
        }
    }
    assert_eq!(got, want);
    assert!(want.values().any(|w| w.1 >= 1_000), "no long journeys in the sample: {want:?}");
    let csv = reqwest::Client::new()
        .get(server.url(&format!("/v1/admin/bank/charges?day={}&format=csv", day(0))))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let total: u64 = want.iter().filter(|(k, _)| k.0 == day(0)).map(|(_, v)| v.1).sum();
    assert_eq!(csv.lines().count(), 12 + 2, "{csv}");
    assert!(csv.starts_with("business_day,token,journeys,amount_before_cap_fen,amount_charged_fen,result\n"));
    let (journeys, fen) = want[&(day(0), t1.to_string())];
    assert!(csv.contains(&format!("\n{},{t1},{journeys},{fen},{fen},approved\n", day(0))), "{csv}");
    assert!(csv.ends_with(&format!("# total,{},12 token-days,{total} fen charged\n", day(0))), "{csv}");
    assert_eq!(metric(&server, "afc_clearing_bank_charges_total{result=\"approved\"}").await, 24);
    // Without the token: 401.
    let r = reqwest::Client::new().post(server.url("/v1/admin/bank/charge-pass")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // A restart charges nothing again: not the background pass, not one run at once.
    server.stop().await;
    assert_eq!(stored_charges(dir.path()), 24);
    let server = TestServer::start_with(dir.path(), fast).await;
    let report = charge_pass(&server).await;
    assert_eq!((report["submitted"].as_u64(), report["waiting"].as_u64()), (Some(0), Some(0)), "{report}");
    wait_passes(&server, 3).await;
    assert_eq!(stored_charges(dir.path()), 24);
    assert_eq!(metric(&server, "afc_clearing_bank_charges_total{result=\"approved\"}").await, 0);
    let mut again = BTreeMap::new();
    for n in 0..2 {
        for (token, journeys, _, charged, _) in charges(&server, day(n)).await {
            again.insert((day(n), token), (journeys, charged));
        }
    }
    assert_eq!(again, want);
    server.stop().await;
}

#[tokio::test]
async fn the_daily_cap_limits_what_one_token_pays_for_a_business_day_and_a_late_journey_adds_only_up_to_it() {
    const CAP: u32 = 1_000;
    let dir = tempfile::tempdir().unwrap();
    // The background pass waits an hour: the passes here are the admin endpoint's.
    let server = TestServer::start_with(dir.path(), |c| {
        c.bank.daily_cap_fen = Some(CAP);
        c.bank.charge_interval = Duration::from_secs(3_600);
    })
    .await;
    let d = Dalian::new();
    let [a, b, mid] = d.stations.clone();
    publish_tariff(&server.client, &[&a, &b, &mid]).await;
    let [busy, quiet]: [BankToken; 2] = sample_tokens(2, 16).try_into().unwrap();
    let mut ledgers = Ledgers::default();
    // The busy card rides the long way three times; the quiet one once.
    ledgers.journey(&a, &b, busy, T1);
    ledgers.journey(&b, &a, busy, T1 + 120 * MIN);
    ledgers.journey(&a, &b, busy, T1 + 240 * MIN);
    ledgers.journey(&a, &mid, quiet, T1);
    let busy_fares = 2 * d.fare(&a, &b) + d.fare(&b, &a);
    assert!(busy_fares > u64::from(CAP), "the sample does not reach the cap: {busy_fares}");
    assert!(d.fare(&a, &mid) < u64::from(CAP));
    upload_ledgers(&server.client, &ledgers.records).await;
    close_days(&server, &[&a, &b, &mid], &[day(0)]).await;
    let report = charge_pass(&server).await;
    assert_eq!(report["submitted"], 2, "{report}");
    let mut want = vec![
        (busy.to_string(), 3, busy_fares, u64::from(CAP), "approved".to_owned()),
        (quiet.to_string(), 1, d.fare(&a, &mid), d.fare(&a, &mid), "approved".to_owned()),
    ];
    want.sort();
    assert_eq!(charges(&server, day(0)).await, want);

    // A late upload of the same day: the quiet card is charged the difference, under the cap;
    // the busy one nothing more (it is at the cap: not submitted again, its row unchanged).
    ledgers.journey(&mid, &b, quiet, T1 + 300 * MIN);
    ledgers.journey(&mid, &b, busy, T1 + 300 * MIN);
    // Each station's whole chain again: the stored part is a resend, the rest appended.
    upload_ledgers(&server.client, &ledgers.records).await;
    let report = charge_pass(&server).await;
    assert_eq!(report["submitted"], 1, "{report}");
    let quiet_fares = d.fare(&a, &mid) + d.fare(&mid, &b);
    let got = charges(&server, day(0)).await;
    let row = |t: &BankToken| got.iter().find(|r| r.0 == t.to_string()).cloned().unwrap();
    assert_eq!(row(&busy), want.iter().find(|r| r.0 == busy.to_string()).cloned().unwrap());
    assert_eq!(
        row(&quiet),
        (quiet.to_string(), 2, quiet_fares, quiet_fares.min(u64::from(CAP)), "approved".into())
    );
    server.stop().await;
}

/// Every station's feed holds exactly one deny_list item adding `token`, `{add: [token]}`, signed
/// by the feed key, at the family's next version (after station 0's operator-published v4).
async fn check_denied(server: &TestServer, stations: &[Ident], token: BankToken) {
    let key = SigningKey::from_bytes(&[42; 32]).verifying_key();
    for (n, s) in stations.iter().enumerate() {
        let page = server.client.params(s, 0).await.unwrap();
        let denials: Vec<_> = page
            .items
            .iter()
            .filter(|i| i.kind == FeedKind::DenyList)
            .filter(|i| serde_json::from_str::<DenyListBody>(i.body.get()).unwrap().add.contains(&token))
            .collect();
        assert_eq!(denials.len(), 1, "{s}: {denials:?}");
        verify_feed_item(s, denials[0], 7, &key).unwrap();
        let body: DenyListBody = serde_json::from_str(denials[0].body.get()).unwrap();
        assert_eq!(body, DenyListBody { add: vec![token], remove: vec![] });
        assert_eq!(denials[0].version, if n == 0 { 5 } else { 1 }, "{s}");
    }
}

#[tokio::test]
async fn a_declined_token_goes_once_on_every_stations_deny_list_across_passes_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let [declined, good]: [BankToken; 2] = sample_tokens(2, 17).try_into().unwrap();
    let config = move |c: &mut Config| {
        fast(c);
        c.bank.declined_tokens.insert(declined);
    };
    let server = TestServer::start_with(dir.path(), config).await;
    let d = Dalian::new();
    let [a, b, mid] = d.stations.clone();
    publish_tariff(&server.client, &[&a, &b, &mid]).await;
    // Station a's deny list already has a version (an operator's): clearing's follows it.
    let earlier = DenyListBody { add: vec![BankToken([0xee; 32])], remove: vec![] };
    let sub = FeedSubmission {
        kind: FeedKind::DenyList,
        version: 4,
        effective_from: Timestamp(0),
        body: RawValue::from_string(serde_json::to_string(&earlier).unwrap()).unwrap(),
    };
    server.client.publish(&a, &sub).await.unwrap();
    let mut ledgers = Ledgers::default();
    ledgers.journey(&a, &b, declined, T1);
    ledgers.journey(&b, &a, good, T1);
    ledgers.journey(&a, &b, declined, T1 + DAY);
    upload_ledgers(&server.client, &ledgers.records).await;
    close_days(&server, &[&a, &b, &mid], &[day(0), day(1)]).await;

    let got = wait_charges(&server, day(0), |c| c.len() == 2).await;
    let result = |t: &BankToken| got.iter().find(|r| r.0 == t.to_string()).map(|r| (r.3, r.4.clone()));
    assert_eq!(result(&declined), Some((0, "declined".to_owned())));
    assert_eq!(result(&good), Some((d.fare(&b, &a), "approved".to_owned())));
    wait_charges(&server, day(1), |c| c.len() == 1).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&server, "afc_clearing_bank_deny_items_total").await < 3 {
        assert!(Instant::now() < deadline, "the declined token was not denied everywhere");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check_denied(&server, &d.stations, declined).await;
    assert_eq!(metric(&server, "afc_clearing_bank_charges_total{result=\"declined\"}").await, 2);
    // More passes deny nothing more.
    let report = charge_pass(&server).await;
    assert_eq!((report["submitted"].as_u64(), report["deny_items"].as_u64()), (Some(0), Some(0)), "{report}");
    check_denied(&server, &d.stations, declined).await;

    server.stop().await;
    let server = TestServer::start_with(dir.path(), config).await;
    let report = charge_pass(&server).await;
    assert_eq!((report["submitted"].as_u64(), report["deny_items"].as_u64()), (Some(0), Some(0)), "{report}");
    wait_passes(&server, 3).await;
    check_denied(&server, &d.stations, declined).await;
    assert_eq!(metric(&server, "afc_clearing_bank_deny_items_total").await, 0);
    assert_eq!(stored_charges(dir.path()), 3);
    server.stop().await;
}

#[tokio::test]
async fn a_declined_token_is_denied_at_its_first_tap_seen_before_its_day_ends_or_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let [declined, good]: [BankToken; 2] = sample_tokens(2, 19).try_into().unwrap();
    let config = move |c: &mut Config| {
        fast(c);
        c.bank.declined_tokens.insert(declined);
    };
    let server = TestServer::start_with(dir.path(), config).await;
    let d = Dalian::new();
    let [a, b, mid] = d.stations.clone();
    publish_tariff(&server.client, &[&a, &b, &mid]).await;
    // Only entries, in a day that is not over and that no station closed.
    let now = afc_domain::model::Timestamp(i64::try_from(now_unix_ms()).unwrap());
    let mut ledgers = Ledgers::default();
    ledgers.tap(&a, Direction::Entry, declined, now.0 - MIN);
    ledgers.tap(&b, Direction::Entry, good, now.0 - MIN);
    upload_ledgers(&server.client, &ledgers.records).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&server, "afc_clearing_bank_deny_items_total").await < 3 {
        assert!(Instant::now() < deadline, "the declined token was not denied at its first tap");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key = SigningKey::from_bytes(&[42; 32]).verifying_key();
    for s in &d.stations {
        let page = server.client.params(s, 0).await.unwrap();
        let denied: Vec<BankToken> = page
            .items
            .iter()
            .filter(|i| i.kind == FeedKind::DenyList)
            .inspect(|i| verify_feed_item(s, i, 7, &key).unwrap())
            .flat_map(|i| serde_json::from_str::<DenyListBody>(i.body.get()).unwrap().add)
            .collect();
        assert_eq!(denied, vec![declined], "{s}");
    }
    // One authorisation per token, nothing charged yet (the day is open).
    let lines = stored(dir.path());
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().all(|c| c["attempt"] == 0 && c["amount_fen"] == 0), "{lines:?}");
    assert_eq!(metric(&server, "afc_clearing_bank_authorisations_total{result=\"declined\"}").await, 1);
    assert_eq!(metric(&server, "afc_clearing_bank_authorisations_total{result=\"approved\"}").await, 1);
    server.stop().await;
}

fn now_unix_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}
