//! Parameter packages through the broker: accepted, refused and reported, switched on time.

use afc_domain::model::{Direction, ParamKind, Reason, Timestamp};
use afc_domain::package::split;
use afc_domain::wire::{self, ParamState, ReaderReply};
use ed25519_dalek::SigningKey;
use gate_agent::gate::now;

use crate::harness::*;

async fn rig() -> (Plc, Agent, Controller) {
    let plc = plc().await;
    let port = free_port();
    start_broker(port).await;
    let controller = Controller::connect(port).await;
    let agent = Agent::start(port, &plc).await;
    eventually("the gate's birth", || (!controller.status.lock().unwrap().is_empty()).then_some(())).await;
    (plc, agent, controller)
}

fn rejected_reason(c: &Controller, kind: ParamKind, version: u64) -> Option<String> {
    c.acks_for(kind, version)
        .into_iter()
        .find(|a| a.state == ParamState::Rejected)
        .map(|a| a.reason.unwrap_or_default())
}

#[tokio::test]
async fn a_signed_fare_table_is_downloaded_verified_activated_and_reported() {
    let (_plc, agent, c) = rig().await;
    let bytes = package(ParamKind::FareTable, 3, Timestamp(0), fare_body(100), &package_key());
    c.publish_package(ParamKind::FareTable, &bytes, 3, Timestamp(0)).await;
    eventually("the active ack", || {
        c.acks_for(ParamKind::FareTable, 3).iter().any(|a| a.state == ParamState::Active).then_some(())
    })
    .await;
    assert_eq!(agent.running.gate.params.in_force(now()).versions.fare_table, 3);
}

#[tokio::test]
async fn packages_with_a_bad_signature_a_wrong_hash_a_missing_chunk_or_an_older_version_are_refused_and_reported(
) {
    let (_plc, agent, c) = rig().await;
    let g = agent.running.gate.clone();
    let good = package(ParamKind::FareTable, 5, Timestamp(0), fare_body(100), &package_key());
    c.publish_package(ParamKind::FareTable, &good, 5, Timestamp(0)).await;
    eventually("v5 active", || (g.params.in_force(now()).versions.fare_table == 5).then_some(())).await;

    // Signed by a key the gate does not trust, under the trusted key id.
    let forged =
        package(ParamKind::FareTable, 6, Timestamp(0), fare_body(50), &SigningKey::from_bytes(&[1; 32]));
    c.publish_package(ParamKind::FareTable, &forged, 6, Timestamp(0)).await;
    let r = eventually("the forged package's refusal", || rejected_reason(&c, ParamKind::FareTable, 6)).await;
    assert!(r.contains("bad_signature"), "{r}");

    // One byte of the body changed after signing: the chunks and pointer are consistent with the
    // tampered bytes, the signed hash is not.
    let mut tampered = package(ParamKind::FareTable, 7, Timestamp(0), fare_body(100), &package_key());
    let last = tampered.len() - 1;
    tampered[last] ^= 0x55;
    c.publish_package(ParamKind::FareTable, &tampered, 7, Timestamp(0)).await;
    let r =
        eventually("the tampered package's refusal", || rejected_reason(&c, ParamKind::FareTable, 7)).await;
    assert!(r.contains("hash_mismatch"), "{r}");

    // A chunk that is not the announced package (wrong hash against the pointer).
    let v8 = package(ParamKind::FareTable, 8, Timestamp(0), fare_body(100), &package_key());
    let other = package(ParamKind::FareTable, 8, Timestamp(0), fare_body(120), &package_key());
    let chunk = split(&other, 64 * 1024).remove(0);
    c.publish(format!("afc/v1/{STATION}/params/fare_table/8/0"), true, chunk).await;
    let ptr = pointer_for(&v8, 8, 1, Timestamp(0));
    c.publish(format!("afc/v1/{STATION}/params/fare_table/current"), true, wire::encode(&ptr)).await;
    let r =
        eventually("the wrong-hash package's refusal", || rejected_reason(&c, ParamKind::FareTable, 8)).await;
    assert!(r.contains("chunk_other_package"), "{r}");

    // Two chunks announced, one published: refused after the download timeout.
    let big = package(ParamKind::Blacklist, 2, Timestamp(0), blacklist_body(2), &package_key());
    let chunks = split(&big, 1024);
    assert!(!chunks.is_empty());
    let ptr = pointer_for(&big, 2, chunks.len() as u32 + 1, Timestamp(0));
    c.publish(format!("afc/v1/{STATION}/params/blacklist/2/0"), true, chunks[0].clone()).await;
    c.publish(format!("afc/v1/{STATION}/params/blacklist/current"), true, wire::encode(&ptr)).await;
    let r =
        eventually("the incomplete package's refusal", || rejected_reason(&c, ParamKind::Blacklist, 2)).await;
    assert!(r.contains("chunks_missing") || r.contains("count_inconsistent"), "{r}");

    // An older version than the one held.
    let old = package(ParamKind::FareTable, 4, Timestamp(0), fare_body(100), &package_key());
    c.publish_package(ParamKind::FareTable, &old, 4, Timestamp(0)).await;
    let r = eventually("the older package's refusal", || rejected_reason(&c, ParamKind::FareTable, 4)).await;
    assert!(r.contains("version_not_newer"), "{r}");

    // Through all of it the gate kept v5 and kept deciding.
    assert_eq!(g.params.in_force(now()).versions.fare_table, 5);
    assert!(agent.running.metrics.render().contains("afc_gate_params_rejected_total{kind=\"fare_table\"} 4"));
    let mut reader = agent.reader().await;
    let r = reader.tap(&svc_tap(Direction::Entry, card(3104_0000_0000_0007, 1000, None))).await.unwrap();
    assert!(matches!(r, ReaderReply::Response(ref r) if r.reason == Reason::Ok), "{r:?}");
}

#[tokio::test]
async fn a_future_dated_fare_table_switches_at_its_time_while_the_broker_is_down() {
    let plc = plc().await;
    // No broker listens on this port: the gate is cut off from the station.
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    let switch_at = now().plus_minutes(0).0 + 1500;
    agent.seed(ParamKind::FareTable, 2, Timestamp(switch_at), fare_body(150));
    let versions = agent.running.gate.params.versions();
    assert_eq!(versions[&ParamKind::FareTable].pending, Some(2));
    let mut reader = agent.reader().await;
    let entered = now().plus_minutes(-30);
    let mut id = 3104_0000_0000_3000u64;
    let mut fares = vec![];
    loop {
        id += 1;
        let r = reader.tap(&svc_tap(Direction::Exit, card(id, 5000, Some((FAR, entered))))).await.unwrap();
        let ReaderReply::Response(r) = r else { panic!("{r:?}") };
        let t = now().0;
        fares.push((t, r.fare_fen));
        if r.fare_fen == 600 {
            break;
        }
        assert_eq!(r.fare_fen, 400);
        assert!(t < switch_at + 5_000, "no switch: {fares:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (t, _) = fares.last().copied().unwrap();
    assert!(t >= switch_at, "switched early: {fares:?}");
    assert!(fares.iter().all(|(t, f)| (*t < switch_at) == (*f == 400)), "{fares:?}");
    assert_eq!(agent.running.gate.params.versions()[&ParamKind::FareTable].active, Some(2));
}
