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
        let sent = now().0;
        let r = reader.tap(&svc_tap(Direction::Exit, card(id, 5000, Some((FAR, entered))))).await.unwrap();
        let ReaderReply::Response(r) = r else { panic!("{r:?}") };
        let t = now().0;
        fares.push((sent, t, r.fare_fen));
        if r.fare_fen == 600 {
            break;
        }
        assert_eq!(r.fare_fen, 400);
        assert!(t < switch_at + 5_000, "no switch: {fares:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Every tap decided before the switch time paid the old fare, every one after it the new.
    assert!(fares.iter().all(|(sent, _, f)| *f == 600 || *sent < switch_at), "switched late: {fares:?}");
    assert!(
        fares.iter().all(|(_, answered, f)| *f == 400 || *answered >= switch_at),
        "switched early: {fares:?}"
    );
    assert_eq!(agent.running.gate.params.versions()[&ParamKind::FareTable].active, Some(2));
}

#[tokio::test]
async fn a_pending_fare_table_survives_a_restart_and_switches_on_time_with_no_broker() {
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    let switch_at = now().0 + 2_000;
    agent.seed(ParamKind::FareTable, 2, Timestamp(switch_at), fare_body(150));
    let agent = agent.restart().await;
    let v = agent.running.gate.params.versions();
    assert_eq!((v[&ParamKind::FareTable].active, v[&ParamKind::FareTable].pending), (Some(1), Some(2)));
    assert_eq!(v[&ParamKind::Blacklist].active, Some(1));
    let g = agent.running.gate.clone();
    let t = eventually("the switch after the restart", || {
        (g.params.versions()[&ParamKind::FareTable].active == Some(2)).then(now)
    })
    .await;
    assert!(t.0 >= switch_at);
    let mut reader = agent.reader().await;
    let entered = now().plus_minutes(-30);
    let r = reader
        .tap(&svc_tap(Direction::Exit, card(3104_0000_0000_4001, 5000, Some((FAR, entered)))))
        .await
        .unwrap();
    assert!(matches!(r, ReaderReply::Response(ref r) if r.fare_fen == 600), "{r:?}");
}

#[tokio::test]
async fn a_blacklist_delta_applies_on_the_version_held_and_a_delta_for_another_version_is_refused() {
    use afc_domain::blacklist::{Blacklist, Entry};
    use afc_domain::model::Media;
    use afc_domain::package::BlacklistBody;
    let (_plc, agent, c) = rig().await;
    let fares = package(ParamKind::FareTable, 1, Timestamp(0), fare_body(100), &package_key());
    c.publish_package(ParamKind::FareTable, &fares, 1, Timestamp(0)).await;
    let v1 = Blacklist::from_entries(1, [Entry::single(Media::Svc, BLACKLISTED)]);
    let full = package(
        ParamKind::Blacklist,
        1,
        Timestamp(0),
        BlacklistBody::Full(v1.clone()).encode(),
        &package_key(),
    );
    c.publish_package(ParamKind::Blacklist, &full, 1, Timestamp(0)).await;
    let g = agent.running.gate.clone();
    eventually("v1 active", || (g.params.in_force(now()).versions.blacklist == 1).then_some(())).await;
    let newly = 3104_0000_0000_0777u64;
    let v2 = Blacklist::from_entries(
        2,
        [Entry::single(Media::Svc, BLACKLISTED), Entry::single(Media::Svc, newly)],
    );
    let delta = v1.delta_to(&v2);
    let pkg =
        package(ParamKind::Blacklist, 2, Timestamp(0), BlacklistBody::Delta(delta).encode(), &package_key());
    c.publish_package(ParamKind::Blacklist, &pkg, 2, Timestamp(0)).await;
    eventually("the delta active", || (g.params.in_force(now()).versions.blacklist == 2).then_some(())).await;
    eventually("fares active", || g.params.in_force(now()).fares.clone().map(|_| ())).await;
    let mut reader = agent.reader().await;
    let r = reader.tap(&svc_tap(Direction::Entry, card(newly, 1000, None))).await.unwrap();
    assert!(matches!(r, ReaderReply::Response(ref r) if r.reason == Reason::Blacklisted), "{r:?}");
    // A delta made for version 5 does not apply to version 2.
    let v5 = Blacklist::from_entries(5, []);
    let v6 = Blacklist::from_entries(6, [Entry::single(Media::Svc, 1)]);
    let stray = package(
        ParamKind::Blacklist,
        6,
        Timestamp(0),
        BlacklistBody::Delta(v5.delta_to(&v6)).encode(),
        &package_key(),
    );
    c.publish_package(ParamKind::Blacklist, &stray, 6, Timestamp(0)).await;
    let r = eventually("the stray delta's refusal", || rejected_reason(&c, ParamKind::Blacklist, 6)).await;
    assert!(r.contains("delta"), "{r}");
    assert_eq!(g.params.in_force(now()).versions.blacklist, 2);
}

#[tokio::test]
async fn a_gate_config_may_free_the_passage_when_the_controllers_are_lost_too_long() {
    use gate_agent::params::GateConfigBody;
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    let body = GateConfigBody { release_on_controller_loss_secs: Some(1), ..GateConfigBody::default() };
    agent.seed(ParamKind::GateConfig, 1, Timestamp(0), serde_json::to_vec(&body).unwrap());
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.free_passage).await;
    assert!(ok, "{s:?}");
    assert!(agent.running.gate.free_passage());
}

#[tokio::test]
async fn a_future_dated_gate_config_is_applied_at_its_time_with_no_tap_and_no_broker() {
    use afc_domain::wire::GateDirection;
    use gate_agent::params::GateConfigBody;
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    let g = agent.running.gate.clone();
    let before = g.direction();
    let want = if before == GateDirection::Exit { GateDirection::Entry } else { GateDirection::Exit };
    let body = GateConfigBody { direction: Some(want), ..GateConfigBody::default() };
    let at = now().0 + 1_000;
    agent.seed(ParamKind::GateConfig, 1, Timestamp(at), serde_json::to_vec(&body).unwrap());
    assert_eq!(g.direction(), before);
    let t = eventually("the new direction applied", || (g.direction() == want).then(now)).await;
    assert!(t.0 >= at, "applied {} ms early", at - t.0);
}
