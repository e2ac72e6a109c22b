//! A bank card the acquirer declines, end to end on a real station (issue 15): the card rides once
//! on the gates' first-tap risk decision; its entry reaches clearing, whose charge pass authorises
//! the token at first sight and is declined by the acquirer simulation
//! (`--bank-declined-tokens-file`); clearing's signed feed carries a `deny_list` item; the leader
//! publishes it as a blacklist delta of the token's deny key; both gates refuse the card with
//! `bank_denied`, while another bank card still rides. The figure is the time from the decline
//! (the charge file's `at`) until every gate reports the blacklist version that denies it, against
//! the 5-minute target with the local feed interval (clearing passes every 2 s, controllers pull
//! every 2 s).

use std::time::{Duration, Instant};

use afc_domain::bank::BankToken;
use afc_domain::model::{Direction, Reason};
use afc_domain::wire::{DecisionKind, ReaderReply, TapRequest};
use gate_agent::reader_sim::ReaderConn;
use serde_json::{json, Value};
use station::plan::Plan;
use system_tests::{eventually, Station};

use afc_test_support::cards::bank_tap as tap;

/// One decided tap at reader `n`: (decision, reason).
async fn tap_at(st: &Station, n: u16, t: &TapRequest) -> anyhow::Result<(DecisionKind, Reason)> {
    let mut conn = ReaderConn::connect(st.plan.reader(n)).await?;
    match conn.tap(t).await? {
        ReaderReply::Response(r) => Ok((r.decision, r.reason)),
        ReaderReply::Error(e) => anyhow::bail!("reader {n}: {e:?}"),
    }
}

/// Publishes the Dalian network and fare rule in clearing's feed for the station, so clearing can
/// price its journeys (the controllers compile them into a fare table too).
async fn publish_tariff(st: &Station, http: &reqwest::Client) -> anyhow::Result<()> {
    let url = format!("http://{}/v1/admin/stations/{}/params", st.plan.clearing(), st.plan.station);
    for (kind, body) in
        [("network", station::setup::DALIAN_NETWORK), ("fare_rule", station::setup::DALIAN_FARE_RULE)]
    {
        let body: Value = serde_json::from_str(body)?;
        let sub = json!({"kind": kind, "version": 1, "effective_from": 0, "body": body});
        let r = http.post(&url).bearer_auth(&st.secrets.clearing_token).json(&sub).send().await?;
        anyhow::ensure!(r.status().is_success(), "publishing {kind}: {}", r.status());
    }
    Ok(())
}

async fn run(st: &Station, declined: BankToken, good: BankToken) -> anyhow::Result<()> {
    let viewer = st.token("viewer");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build()?;
    eventually("both gates online with their parameters", Duration::from_secs(120), || async {
        let gates = st.gates().await?;
        let ready = |g: &Value| {
            g["online"] == true && g.pointer("/reported_versions/blacklist").is_some_and(Value::is_u64)
        };
        Ok((gates.len() == 2 && gates.iter().all(ready)).then_some(()))
    })
    .await?;
    publish_tariff(st, &http).await?;

    // First ride: the gate knows nothing against either card.
    assert_eq!(
        tap_at(st, 1, &tap(Direction::Entry, declined, 1)).await?,
        (DecisionKind::OpenEntry, Reason::Ok)
    );
    assert_eq!(tap_at(st, 1, &tap(Direction::Entry, good, 1)).await?, (DecisionKind::OpenEntry, Reason::Ok));

    // The acquirer's decline, as clearing stored it.
    let charges = st.layout.data("clearing").join("bank").join("bank_charges.jsonl");
    let declined_at = eventually("clearing to decline the token", Duration::from_secs(120), || async {
        let text = std::fs::read_to_string(&charges).unwrap_or_default();
        let line = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|c| c["token"] == declined.to_string() && c["result"] == "declined");
        Ok(line.and_then(|c| c["at"].as_i64()))
    })
    .await?;
    let wall_at_decline = Instant::now();

    // The deny list reaches every gate as a blacklist version.
    let leader = st.leader().await?;
    let version = eventually("the deny list published by the leader", Duration::from_secs(300), || async {
        let c = st.get(leader, "/api/v1/clearing", &viewer).await?;
        Ok(c.pointer("/feed/deny_blacklist").and_then(Value::as_u64))
    })
    .await?;
    eventually("every gate to run the blacklist that denies the token", Duration::from_secs(300), || async {
        let gates = st.gates().await?;
        let on = |g: &Value| {
            g.pointer("/reported_versions/blacklist").and_then(Value::as_u64).is_some_and(|v| v >= version)
        };
        Ok(gates.iter().all(on).then_some(()))
    })
    .await?;
    let now = gate_agent::gate::now();
    let decline_to_gates_ms = now.millis() - declined_at;
    let waited = wall_at_decline.elapsed();
    for n in 1..=2 {
        let (kind, reason) = tap_at(st, n, &tap(Direction::Entry, declined, 10 + n)).await?;
        anyhow::ensure!(
            (kind, reason) == (DecisionKind::Reject, Reason::BankDenied),
            "gate {n} let the declined card in: {kind:?} {reason:?}"
        );
        let (kind, reason) = tap_at(st, n, &tap(Direction::Exit, good, 10 + n)).await?;
        anyhow::ensure!(kind == DecisionKind::OpenExit, "gate {n} refused the good card: {reason:?}");
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    eprintln!(
        "[e2e] bank decline → refused at both gates: {decline_to_gates_ms} ms after the decline \
         (blacklist v{version}; {} ms of it watched here)",
        waited.as_millis()
    );
    anyhow::ensure!(
        decline_to_gates_ms <= 300_000,
        "decline → refused took {decline_to_gates_ms} ms (target 5 min)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bank_card_the_acquirer_declines_is_refused_at_every_gate_within_minutes() {
    let _one = super::ONE_STATION_AT_A_TIME.lock().await;
    let plan = Plan { gates: 2, port_offset: 16_000, ..Plan::default() };
    let prepared = Station::prepare(&plan).expect("prepare");
    let [declined, good]: [BankToken; 2] =
        afc_domain::bank::sample_tokens(2, 2026).try_into().expect("two tokens");
    let file = prepared.0.path().join("declined-tokens");
    std::fs::write(&file, format!("# the acquirer simulation declines\n{declined}\n")).expect("tokens file");
    let file = file.to_string_lossy().into_owned();
    let args = ["--bank-declined-tokens-file", &file, "--bank-charge-interval-secs", "2"];
    let mut st = Station::start_with(prepared, plan, &args, &[]).await.expect("station starts");
    if let Err(e) = run(&st, declined, good).await {
        panic!("{e:#}\n\n{}", st.log_tails(40));
    }
    let _ = st.stop(Duration::from_secs(90));
}
