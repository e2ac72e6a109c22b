//! Forged control messages published straight to the station's broker, on both brokers, by a
//! client holding the strongest credentials a broker knows (the controllers' shared MQTT login,
//! as an intruder who read it off a node's disk would): nothing they say changes a gate. Every
//! message that steers a gate is checked against the station's signature (SPEC §5), so the
//! broker's passwords and ACLs are the second line, not the only one (and a client without a
//! login gets no session at all).

use std::time::Duration;

use afc_domain::mode::ModeBits;
use afc_domain::model::{Ident, Timestamp};
use afc_domain::signed;
use afc_domain::wire::{self, Command, CommandKind, ModeMessage, QrUsed, QrUsedBatch, TxAck};
use anyhow::Context as _;
use ed25519_dalek::SigningKey;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::Value;
use station::plan::Plan;
use system_tests::{eventually, Station};

/// Forged `qr/used` messages in the flood.
const FLOOD: u64 = 2_000;

/// The intruder's MQTT client: the controllers' login when the station uses credentials.
async fn intruder(st: &Station) -> anyhow::Result<(AsyncClient, tokio::task::JoinHandle<()>)> {
    let addr = st.plan.broker_address();
    let (host, port) = addr.rsplit_once(':').context("broker address")?;
    let mut o = MqttOptions::new("intruder", host, port.parse()?);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
    if let Some((user, _, password)) = st.secrets.mqtt_users.iter().find(|(u, _, _)| u == "controller") {
        o.set_credentials(user.clone(), password.clone());
    }
    let (client, mut eventloop) = AsyncClient::new(o, 10_000);
    let poll = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    Ok((client, poll))
}

/// Whether a client without credentials gets a successful ConnAck from the station's broker
/// within 5 s (it must not: the station's own broker and Mosquitto both require a login).
async fn anonymous_gets_in(st: &Station) -> anyhow::Result<bool> {
    let addr = st.plan.broker_address();
    let (host, port) = addr.rsplit_once(':').context("broker address")?;
    let (_client, mut eventloop) = AsyncClient::new(MqttOptions::new("anonymous", host, port.parse()?), 10);
    let attempt = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                    return a.code == rumqttc::ConnectReturnCode::Success
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    });
    Ok(attempt.await.unwrap_or(false))
}

/// The sum of gate `n`'s `afc_gate_unverified_messages_total` series.
async fn unverified(st: &Station, n: u16) -> anyhow::Result<f64> {
    let url = format!("http://{}/metrics", st.plan.gate_metrics(n));
    let text = reqwest::get(&url).await?.text().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("afc_gate_unverified_messages_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Coil writes of `true` the PLC simulator of gate `n` has seen (an opening is one).
async fn coil_sets(st: &Station, n: u16) -> anyhow::Result<usize> {
    let state: Value = serde_json::from_str(&st.plc(n, "state").await?)?;
    let writes = state.get("writes").and_then(Value::as_array).context("writes")?;
    Ok(writes.iter().filter(|w| w.pointer("/Coil/value").and_then(Value::as_bool) == Some(true)).count())
}

/// Forged emergency release, open commands, acks and a flood of used QR codes: no flap moves, no
/// record is dropped, the genuine used code is still refused, taps go on, each gate counts what it
/// refused. `used_code` is a QR code already used at g01.
pub async fn forged_control_messages_change_nothing(st: &Station, used_code: &str) -> anyhow::Result<()> {
    anyhow::ensure!(!anonymous_gets_in(st).await?, "the station's broker let a client in without a login");
    let (client, poll) = intruder(st).await?;
    let root = format!("afc/v1/{}", st.plan.station);
    let g1 = Plan::gate_id(1);
    let g2 = Plan::gate_id(2);
    let before = (coil_sets(st, 1).await?, coil_sets(st, 2).await?);
    let counted_before = (unverified(st, 1).await?, unverified(st, 2).await?);
    let ledger_before = st.ledger(1).await?.len();

    // 1. A plain, unsigned emergency release with the highest version there is (retained, as the
    //    genuine one is): before signatures it freed every gate and blocked every later change.
    let mode = ModeMessage {
        version: u64::MAX,
        bits: ModeBits::EMERGENCY_RELEASE,
        since: Timestamp(0),
        decided_at: None,
        history_ref: None,
        history: Vec::new(),
    };
    client.publish(format!("{root}/mode"), QoS::AtLeastOnce, false, wire::encode(&mode)).await?;
    // 2. The same, signed with a key no gate trusts, under the station's key id.
    let stranger = SigningKey::from_bytes(&rand::random());
    let topic = format!("{root}/mode");
    client.publish(topic.clone(), QoS::AtLeastOnce, false, signed::seal(&topic, &mode, 1, &stranger)).await?;
    // 3. Open commands for g01: unsigned, and signed by the stranger.
    let cmd = Command {
        id: "intruder-1".into(),
        gate: Ident::new(&g1)?,
        command: CommandKind::OpenOnceEntry,
        expires_at: Timestamp(i64::MAX),
    };
    let cmd_topic = format!("{root}/gates/{g1}/cmd");
    client.publish(cmd_topic.clone(), QoS::AtLeastOnce, false, wire::encode(&cmd)).await?;
    let forged_cmd = signed::seal(&cmd_topic, &cmd, 1, &stranger);
    client.publish(cmd_topic, QoS::AtLeastOnce, false, forged_cmd).await?;
    // 4. An ack of everything g02 will ever record (it emptied the outbox and wrapped gate_seq).
    let ack = TxAck { through_seq: u64::MAX, installation: None };
    client.publish(format!("{root}/gates/{g2}/tx/ack"), QoS::AtLeastOnce, false, wire::encode(&ack)).await?;
    // 5. A flood of used QR codes, made to outlive the real ones in every replay cache.
    for i in 0..FLOOD {
        let entries = (0..50)
            .map(|j| QrUsed {
                issuer: 1,
                account: 9_000_000 + i,
                nonce: j,
                expires_at: Timestamp(i64::MAX / 2),
                gate: Ident::new(&g2).unwrap_or_else(|_| unreachable!("a plan's gate id is an ident")),
            })
            .collect();
        let batch = wire::encode(&QrUsedBatch { entries });
        client.publish(format!("{root}/qr/used"), QoS::AtMostOnce, false, batch).await?;
    }

    // Wait until both gates counted what they must refuse (or 15 s): the effects are checked
    // first, so a gate that took a forgery fails on what it did, then the counts.
    let counted_enough =
        eventually("both gates count the forged messages", Duration::from_secs(15), || async {
            let now = (unverified(st, 1).await?, unverified(st, 2).await?);
            Ok((now.0 >= counted_before.0 + 3.0 && now.1 >= counted_before.1 + 2.0).then_some(()))
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Nothing moved: no free passage, no opening.
    for n in 1..=st.plan.gates {
        let state: Value = serde_json::from_str(&st.plc(n, "state").await?)?;
        anyhow::ensure!(
            state.get("free_passage").and_then(Value::as_bool) == Some(false),
            "a forged emergency release freed {}",
            Plan::gate_id(n)
        );
    }
    let after = (coil_sets(st, 1).await?, coil_sets(st, 2).await?);
    anyhow::ensure!(after == before, "a forged command opened a flap: coil sets {before:?} → {after:?}");
    // The genuine used code is still refused: the flood evicted nothing.
    let again = crate::scenario::tap_qr(st, 3, used_code).await?;
    anyhow::ensure!(
        again.1 == afc_domain::model::Reason::QrReplayed,
        "after the flood the used code is no longer refused at g03: {again:?}"
    );
    // Taps go on at g02 and reach the ledger: its outbox and numbering are intact.
    let mut conn = gate_agent::reader_sim::ReaderConn::connect(st.plan.reader(2)).await?;
    let code = afc_domain::model::StationCode(st.plan.station_code);
    let mut sim = gate_agent::reader_sim::ReaderSim::new(2, code, vec![code], 2_000, None);
    let mut promised = 0;
    for _ in 0..5 {
        let (presented, tap) = sim.next_tap(gate_agent::gate::now());
        if let wire::ReaderReply::Response(r) = conn.tap(&tap).await? {
            promised += usize::from(r.gate_seq.is_some());
            sim.apply(presented, &r);
        }
    }
    anyhow::ensure!(promised == 5, "g02 recorded {promised} of 5 taps after the forged ack");
    eventually("g02's taps in the ledger", Duration::from_secs(15), || async {
        Ok((st.ledger(1).await?.len() >= ledger_before + 5).then_some(()))
    })
    .await?;
    counted_enough?;
    let counted = (unverified(st, 1).await?, unverified(st, 2).await?);
    eprintln!(
        "[e2e] forged mode, commands, ack and {FLOOD} qr/used batches changed nothing; gates counted {counted:?} unverified messages"
    );
    poll.abort();
    Ok(())
}
