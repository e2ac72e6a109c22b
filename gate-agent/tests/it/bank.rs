//! Bank cards and phones (medium `bank`) at a real gate agent: decided offline through the reader
//! port, recorded with their token and cryptogram (canonical version 3), refused once the deny
//! list (the blacklist's bank ids, here as a delta on the list in force) names the token, and
//! held to the unpaid-tap limit of `gate_config`.

use afc_domain::blacklist::{BlacklistDelta, Entry};
use afc_domain::ledger::CANONICAL_VERSION_3;
use afc_domain::model::{Direction, Media, ParamKind, Reason, Timestamp};
use afc_domain::package::{BlacklistBody, GateConfigBody};
use afc_domain::wire::{DecisionKind, ReaderReply, ReaderResponse};

use afc_test_support::cards::bank_tap;

use crate::harness::*;

fn response(r: ReaderReply) -> ReaderResponse {
    match r {
        ReaderReply::Response(r) => r,
        ReaderReply::Error(e) => panic!("reader error {e:?}"),
    }
}

#[tokio::test]
async fn a_bank_card_is_recorded_with_its_token_refused_once_denied_and_held_to_the_unpaid_limit() {
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    let config = GateConfigBody { bank_unpaid_taps_per_day: Some(3), ..GateConfigBody::default() };
    agent.seed(ParamKind::GateConfig, 1, Timestamp(0), serde_json::to_vec(&config).unwrap());
    let mut reader = agent.reader().await;
    let tokens = afc_domain::bank::sample_tokens(2, 77);

    let r = response(reader.tap(&bank_tap(Direction::Entry, tokens[0], 1)).await.unwrap());
    assert_eq!((r.decision, r.reason, r.fare_fen), (DecisionKind::OpenEntry, Reason::Ok, 0));
    assert!(r.card_write.is_none(), "a bank card is never written");
    let stored = agent.running.gate.store().pending(0, 10, 1 << 20).unwrap();
    assert_eq!(stored[0].1[0], CANONICAL_VERSION_3, "a bank tap's record is version 3");
    let rec = gate_agent::gate::decode_record(&stored[0].1).unwrap();
    let bank = rec.bank.expect("the record carries the token");
    assert_eq!((rec.media, rec.id, bank.token, bank.atc), (Media::Bank, tokens[0].deny_key(), tokens[0], 1));

    // The limit: 3 accepted taps a day at this gate; the 4th entry is refused, an exit is not.
    for (dir, atc) in [(Direction::Exit, 2), (Direction::Entry, 3)] {
        let r = response(reader.tap(&bank_tap(dir, tokens[0], atc)).await.unwrap());
        assert_ne!(r.decision, DecisionKind::Reject, "{r:?}");
        tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    }
    let r = response(reader.tap(&bank_tap(Direction::Entry, tokens[0], 4)).await.unwrap());
    assert_eq!((r.decision, r.reason), (DecisionKind::Reject, Reason::BankUnpaidLimit));
    assert_eq!(agent.running.metrics.decisions_with_reason("bank_unpaid_limit"), 1);

    // The deny list: a delta adding the second token's bank id to the list in force.
    let delta = BlacklistDelta {
        from_version: 1,
        to_version: 2,
        add: vec![Entry::single(Media::Bank, tokens[1].deny_key())],
        remove: vec![],
    };
    let before = response(reader.tap(&bank_tap(Direction::Exit, tokens[1], 9)).await.unwrap());
    assert_eq!(before.reason, Reason::Ok, "not denied yet: {before:?}");
    tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    agent.seed(ParamKind::Blacklist, 2, Timestamp(0), BlacklistBody::Delta(delta).encode());
    let r = response(reader.tap(&bank_tap(Direction::Entry, tokens[1], 10)).await.unwrap());
    assert_eq!((r.decision, r.reason), (DecisionKind::Reject, Reason::BankDenied));
    assert_eq!(agent.running.metrics.decisions_with_reason("bank_denied"), 1);
}
