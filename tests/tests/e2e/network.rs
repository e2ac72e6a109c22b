//! A network of two stations in one command (`station --stations 2`, issue 15 item 6): each with
//! its own 3-node cluster, broker and gates, sharing one clearing server. Passengers enter at one
//! station and leave at the other on every medium: a stored-value card, a phone carrying the
//! card, a QR ride code, bank cards and a single-journey token. Checked:
//! - every fare the gates charged (cards, the token) and every journey clearing priced (QR,
//!   bank) equals an independent recomputation from the Dalian network and fare rule
//!   (`afc_test_support::fares`: Floyd–Warshall, then the bands);
//! - the cards' balances and counters stay consistent across the two stations, and every
//!   stored-value debit, signed by the gate reader's simulated PSAM, verifies at clearing;
//! - a bank card the acquirer declines is let in once (the first-ride risk), then is refused at both stations once
//!   clearing's feed delivered the denial to each.

use std::collections::HashMap;
use std::time::Duration;

use afc_domain::bank::BankToken;
use afc_domain::model::{CardType, Date, Direction, Reason, StationCode};
use afc_domain::network::{FareRule, NetworkDescription};
use afc_domain::qr::{self, QrIssue};
use afc_domain::wire::{DecisionKind, ReaderReply, ReaderResponse, SvcCard, TapMedia, TapRequest, TokenCard};
use anyhow::Context as _;
use gate_agent::reader_sim::{ReaderConn, SimPsam};
use serde_json::{json, Value};
use system_tests::{eventually, Station};

/// One decided tap at gate `n` of the focused station.
async fn tap(st: &Station, n: u16, t: &TapRequest) -> anyhow::Result<ReaderResponse> {
    let mut conn = ReaderConn::connect(st.plan.reader(n)).await?;
    let r = match conn.tap(t).await? {
        ReaderReply::Response(r) => r,
        ReaderReply::Error(e) => anyhow::bail!("{} reader {n}: {e:?}", st.plan.station),
    };
    // Let the passenger through before the next tap at this gate.
    tokio::time::sleep(Duration::from_millis(900)).await;
    Ok(r)
}

use afc_test_support::cards::bank_tap as bank;

/// A stored-value card (or the phone carrying it) tapping with its state as the reader read it, at
/// a two-phase reader whose simulated PSAM (gate `n`'s, as the station provisions it) signs the
/// debit; the gate's write is applied back, as a reader does. Returns the response and the TAC.
async fn svc(
    st: &Station,
    n: u16,
    dir: Direction,
    card: &mut SvcCard,
    psam_seq: u32,
) -> anyhow::Result<(ReaderResponse, Option<afc_domain::ledger::TacRef>)> {
    let master = afc_domain::tac::IssuerKey::from_hex(&st.secrets.tac_issuer_key)?;
    let id = station::up::psam_id(&st.plan, n);
    let psam = SimPsam::new(afc_domain::tac::Psam::new(master.psam_key(id), psam_seq));
    let mut conn = ReaderConn::connect_with_psam(st.plan.reader(n), psam).await?;
    let t = TapRequest { direction: dir, media: TapMedia::Svc { card: card.clone() } };
    let r = match conn.tap(&t).await? {
        ReaderReply::Response(r) => r,
        ReaderReply::Error(e) => anyhow::bail!("{} reader {n}: {e:?}", st.plan.station),
    };
    tokio::time::sleep(Duration::from_millis(900)).await;
    let tac = conn.psam.as_ref().and_then(|p| p.signed.last()).and_then(|(_, t)| *t);
    if let Some(w) = r.card_write {
        (card.balance_fen, card.tx_counter, card.entry) = (w.balance_fen, w.tx_counter, w.entry);
    }
    Ok((r, tac))
}

async fn clearing_get(st: &Station, http: &reqwest::Client, path: &str) -> anyhow::Result<Value> {
    let url = format!("http://{}{path}", st.plan.clearing_address());
    let r = http.get(&url).bearer_auth(&st.secrets.clearing_token).send().await?;
    anyhow::ensure!(r.status().is_success(), "GET {url}: {}", r.status());
    Ok(r.json().await?)
}

async fn run(st: &mut Station, declined: BankToken) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let net: NetworkDescription = serde_json::from_str(station::setup::DALIAN_NETWORK)?;
    let rule: FareRule = serde_json::from_str(station::setup::DALIAN_FARE_RULE)?;
    let dist = afc_test_support::fares::distances(&net);
    let ids: HashMap<u16, String> = net.stations.iter().map(|s| (s.code.0, s.id.clone())).collect();
    let fare = |a: StationCode, b: StationCode| {
        afc_test_support::fares::expected_fare(&rule, dist[&(ids[&a.0].clone(), ids[&b.0].clone())])
    };
    let codes: Vec<StationCode> = st.members.iter().map(|(_, p, _)| StationCode(p.station_code)).collect();
    let (s1, s2) = (codes[0], codes[1]);
    anyhow::ensure!(fare(s1, s2) > rule.min_fare_fen, "pick stations further apart");

    for k in 0..2 {
        st.focus(k);
        eventually("the station's gates online with their parameters", Duration::from_secs(180), || async {
            let gates = st.gates().await?;
            let ready = |g: &Value| {
                g["online"] == true
                    && ["fare_table", "blacklist", "qr_keys"]
                        .iter()
                        .all(|k| g.pointer(&format!("/reported_versions/{k}")).is_some_and(Value::is_u64))
            };
            Ok((gates.len() == 2 && gates.iter().all(ready)).then_some(()))
        })
        .await?;
        // Clearing prices from each station's feed (the controllers compile it too).
        let url =
            format!("http://{}/v1/admin/stations/{}/params", st.plan.clearing_address(), st.plan.station);
        for (kind, body) in
            [("network", station::setup::DALIAN_NETWORK), ("fare_rule", station::setup::DALIAN_FARE_RULE)]
        {
            let sub = json!({"kind": kind, "version": 1, "effective_from": 0, "body": serde_json::from_str::<Value>(body)?});
            let r = http.post(&url).bearer_auth(&st.secrets.clearing_token).json(&sub).send().await?;
            anyhow::ensure!(r.status().is_success(), "publishing {kind}: {}", r.status());
        }
    }

    let today = afc_domain::model::BusinessDayRule::default().business_day(gate_agent::gate::now());
    let new_card = |id: u64| SvcCard {
        card_id: id,
        card_type: CardType::ORDINARY,
        balance_fen: 5_000,
        expiry: Date::from_ymd(2031, 12, 31).unwrap_or_default(),
        tx_counter: 40,
        entry: None,
    };
    // A Mingzhu card s1 → s2, and a phone carrying another card s2 → s1.
    let mut card = new_card(3104_0000_0055_0001);
    let mut phone = new_card(3104_0000_0055_0002);
    let trips: [(&mut SvcCard, usize, usize); 2] = [(&mut card, 0, 1), (&mut phone, 1, 0)];
    let mut tacs = 0;
    for (i, (c, from, to)) in trips.into_iter().enumerate() {
        st.focus(from);
        let (r, tac) = svc(st, 1, Direction::Entry, c, 10 * i as u32).await?;
        anyhow::ensure!(r.decision == DecisionKind::OpenEntry, "entry refused: {r:?}");
        anyhow::ensure!(tac.is_some(), "the entry was not signed by the PSAM");
        st.focus(to);
        let (r, tac) = svc(st, 2, Direction::Exit, c, 10 * i as u32 + 1).await?;
        anyhow::ensure!(tac.is_some(), "the exit was not signed by the PSAM");
        tacs += 2;
        // Mingzhu cards pay the rule's ordinary percentage of the full fare, rounded down.
        let percent = u32::from(rule.discounts[&CardType::ORDINARY]);
        let due = fare(codes[from], codes[to]) * percent / 100;
        anyhow::ensure!(
            (r.decision, r.fare_fen) == (DecisionKind::OpenExit, due),
            "exit {r:?}, expected {due}"
        );
        anyhow::ensure!(
            (c.balance_fen, c.tx_counter, c.entry) == (5_000 - due, 42, None),
            "card after its journey: {c:?}"
        );
    }

    // A single-journey token sold at s1, leaving at s2.
    st.focus(0);
    let paid = fare(s1, s2) * u32::from(rule.token_percent) / 100;
    let mut token = TokenCard { token_id: 77_001, origin: s1, paid_fen: paid, sold_on: today, entry: None };
    let r = tap(
        st,
        1,
        &TapRequest { direction: Direction::Entry, media: TapMedia::Token { token: token.clone() } },
    )
    .await?;
    token.entry = r.card_write.and_then(|w| w.entry);
    anyhow::ensure!(token.entry.is_some(), "token entry: {r:?}");
    st.focus(1);
    let r = tap(st, 1, &TapRequest { direction: Direction::Exit, media: TapMedia::Token { token } }).await?;
    anyhow::ensure!((r.decision, r.fare_fen) == (DecisionKind::OpenExit, paid), "token exit {r:?}");

    // A QR ride code s2 → s1 (clearing charges the account).
    let key = st.secrets.qr_issuer_key.clone();
    let code = |nonce: u64| {
        let issue = QrIssue {
            issuer: 1,
            key_id: 1,
            account: 8_800_123,
            issued_at: gate_agent::gate::now().plus_minutes(-1),
            valid_secs: 120,
            nonce,
        };
        qr::encode_text(&qr::generate(&issue, &key))
    };
    st.focus(1);
    let r = tap(st, 2, &TapRequest { direction: Direction::Entry, media: TapMedia::Qr { code: code(1) } })
        .await?;
    anyhow::ensure!(r.decision == DecisionKind::OpenEntry, "QR entry {r:?}");
    st.focus(0);
    let r =
        tap(st, 2, &TapRequest { direction: Direction::Exit, media: TapMedia::Qr { code: code(2) } }).await?;
    anyhow::ensure!(r.decision == DecisionKind::OpenExit, "QR exit {r:?}");

    // Bank cards: a good one s2 → s1; the declined one enters at s1 (its first tap is let
    // through on the gate's first-ride risk; clearing declines it at first sight, within seconds).
    let good = BankToken([0x5a; 32]);
    st.focus(1);
    let r = tap(st, 1, &bank(Direction::Entry, good, 1)).await?;
    anyhow::ensure!(r.decision == DecisionKind::OpenEntry, "bank entry {r:?}");
    st.focus(0);
    let r = tap(st, 1, &bank(Direction::Exit, good, 2)).await?;
    anyhow::ensure!(r.decision == DecisionKind::OpenExit, "bank exit {r:?}");
    let r = tap(st, 2, &bank(Direction::Entry, declined, 1)).await?;
    anyhow::ensure!(r.decision == DecisionKind::OpenEntry, "the declined card's first tap {r:?}");

    // Clearing pairs the QR and bank journeys across the two stations and prices them at entry.
    let expect = [("qr", "8800123", 1usize, 0usize), ("bank", &*good.to_string(), 1, 0)];
    for (media, who, from, to) in expect {
        let want = fare(codes[from], codes[to]);
        let path = format!("/v1/admin/{media}/journeys");
        let got = eventually("clearing to price the journey", Duration::from_secs(120), || async {
            let v = clearing_get(st, &http, &path).await?;
            let found = v["journeys"].as_array().context("journeys")?.iter().find(|j| {
                (j["account"].as_u64().map(|a| a.to_string()).as_deref() == Some(who) || j["token"] == who)
                    && j["from"] == codes[from].0
                    && j["to"] == codes[to].0
            });
            Ok(found.cloned())
        })
        .await?;
        anyhow::ensure!(got["fare_fen"] == want, "{media} {who}: clearing priced {got}, expected {want}");
    }

    // Every PSAM-signed debit verifies at clearing with the issuer's key, none mismatched.
    let report = eventually("clearing to verify every TAC", Duration::from_secs(120), || async {
        let v = clearing_get(st, &http, "/v1/admin/tac").await?;
        Ok((v.pointer("/totals/verified") == Some(&json!(tacs))).then_some(v))
    })
    .await?;
    anyhow::ensure!(
        report["issuer_key"] == true && report.pointer("/totals/mismatched") == Some(&json!(0)),
        "TAC report {report}"
    );

    // The declined card: refused at both stations once each one's feed delivered the denial.
    for k in 0..2 {
        st.focus(k);
        let viewer = st.token("viewer");
        let leader = st.leader().await?;
        let version = eventually("the deny list published", Duration::from_secs(300), || async {
            let c = st.get(leader, "/api/v1/clearing", &viewer).await?;
            Ok(c.pointer("/feed/deny_blacklist").and_then(Value::as_u64))
        })
        .await?;
        eventually("both gates on the blacklist that denies it", Duration::from_secs(300), || async {
            let gates = st.gates().await?;
            let on = |g: &Value| {
                g.pointer("/reported_versions/blacklist")
                    .and_then(Value::as_u64)
                    .is_some_and(|v| v >= version)
            };
            Ok(gates.iter().all(on).then_some(()))
        })
        .await?;
        let r = tap(st, 2, &bank(Direction::Entry, declined, 3 + k as u16)).await?;
        anyhow::ensure!(
            (r.decision, r.reason) == (DecisionKind::Reject, Reason::BankDenied),
            "{}: the declined card was let in: {r:?}",
            st.plan.station
        );
    }
    eprintln!("[e2e] network of 2 stations: cards, phone, token, QR and bank journeys priced as recomputed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stations_share_clearing_and_every_journey_across_them_is_priced_as_recomputed() {
    let _one = super::ONE_STATION_AT_A_TIME.lock().await;
    let declined = BankToken([0xd1; 32]);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("declined-tokens");
    std::fs::write(&file, format!("{declined}\n")).expect("tokens file");
    let file = file.to_string_lossy().into_owned();
    let args = ["--bank-declined-tokens-file", &file, "--bank-charge-interval-secs", "2"];
    let mut st = Station::start_network(2, 2, 17_000, &args).await.expect("stations start");
    if let Err(e) = run(&mut st, declined).await {
        panic!("{e:#}\n\n{}", st.log_tails(30));
    }
    let _ = st.stop(Duration::from_secs(120));
}
