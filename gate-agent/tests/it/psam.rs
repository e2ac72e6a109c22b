//! PSAM-signed stored-value debits (the two-phase reader exchange): the TAC the reader's PSAM
//! computes lands in the durable record and verifies under the issuer's key; a PSAM that does not
//! answer in time, answers late or fails refuses the tap with nothing charged; a reader without a
//! PSAM keeps the one-phase exchange.

use afc_domain::ledger::TxRecord;
use afc_domain::model::{Direction, ParamKind, Reason, Timestamp};
use afc_domain::package::GateConfigBody;
use afc_domain::tac::{IssuerKey, Psam, TacInput};
use afc_domain::wire::{DecisionKind, ReaderReply, ReaderResponse};
use gate_agent::plc_sim::SimWrite;
use gate_agent::reader_sim::{PsamBehaviour, ReaderConn, SimPsam};

use afc_test_support::cards::bank_tap;

use crate::harness::*;

const PSAM_ID: u64 = 0x0210_0000_0000_0042;

fn issuer() -> IssuerKey {
    IssuerKey::from_bytes([0x5a; 32])
}

fn response(r: ReaderReply) -> ReaderResponse {
    match r {
        ReaderReply::Response(r) => r,
        ReaderReply::Error(e) => panic!("reader error {e:?}"),
    }
}

fn records(agent: &Agent) -> Vec<TxRecord> {
    let stored = agent.running.gate.store().pending(0, 100, 1 << 20).unwrap();
    stored.iter().map(|(_, b)| gate_agent::gate::decode_record(b).unwrap()).collect()
}

async fn psam_reader(agent: &Agent, behaviour: PsamBehaviour) -> ReaderConn {
    let mut sim = SimPsam::new(Psam::new(issuer().psam_key(PSAM_ID), 1_000));
    sim.behaviour = behaviour;
    ReaderConn::connect_with_psam(agent.reader, sim).await.unwrap()
}

fn opened(plc: &Plc) -> bool {
    plc.sim.snapshot().writes.iter().any(|w| matches!(w, SimWrite::Coil { addr: 0 | 1, value: true }))
}

#[tokio::test]
async fn a_stored_value_debit_from_a_psam_reader_is_recorded_with_a_tac_that_verifies_under_the_issuer_key() {
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    let mut reader = psam_reader(&agent, PsamBehaviour::Sign).await;
    let entered = gate_agent::gate::now().plus_minutes(-30);
    let exit = response(
        reader
            .tap(&svc_tap(Direction::Exit, card(3104_0000_0000_0001, 1000, Some((FAR, entered)))))
            .await
            .unwrap(),
    );
    assert_eq!((exit.decision, exit.reason, exit.fare_fen), (DecisionKind::OpenExit, Reason::Ok, 400));
    let entry = response(
        reader.tap(&svc_tap(Direction::Entry, card(3104_0000_0000_0002, 1000, None))).await.unwrap(),
    );
    assert_eq!(entry.decision, DecisionKind::OpenEntry);
    // A refusal by the engine writes nothing to the card: the PSAM is not asked.
    let refused =
        response(reader.tap(&svc_tap(Direction::Entry, card(BLACKLISTED, 1000, None))).await.unwrap());
    assert_eq!(refused.reason, Reason::Blacklisted);

    let sim = reader.psam.as_ref().unwrap();
    assert_eq!(sim.signed.len(), 2, "{:?}", sim.signed);
    let recs = records(&agent);
    assert_eq!(recs.len(), 3);
    for (rec, (asked, given)) in recs.iter().zip(&sim.signed) {
        let tac = rec.tac.expect("a signed debit carries its TAC");
        assert_eq!(Some(tac), *given);
        assert_eq!((tac.psam, rec.card_tx_counter), (PSAM_ID, Some(asked.tx_counter)));
        // What the gate asked the PSAM to sign is exactly what the record says.
        assert_eq!(TacInput::of_record(rec).as_ref(), Some(asked));
        assert!(issuer().verify(asked, &tac), "the TAC verifies under the issuer key");
    }
    assert_eq!((recs[0].fare_fen, recs[1].fare_fen), (400, 0));
    assert_eq!(recs[0].tac.unwrap().psam_seq + 1, recs[1].tac.unwrap().psam_seq);
    assert!(recs[2].tac.is_none());
    assert_eq!(agent.running.metrics.psam_outcomes("signed"), 2);
}

#[tokio::test]
async fn a_psam_that_does_not_answer_in_time_refuses_the_tap_with_nothing_charged_or_written() {
    let plc = plc().await;
    let agent = Agent::start_with(free_port(), &plc, "psam_timeout_ms = 150").await;
    agent.seed_defaults();
    let id = 3104_0000_0000_0011;
    let entered = gate_agent::gate::now().plus_minutes(-30);
    let exit = || svc_tap(Direction::Exit, card(id, 1000, Some((FAR, entered))));

    let mut silent = psam_reader(&agent, PsamBehaviour::Silent).await;
    let t = std::time::Instant::now();
    let r = response(silent.tap(&exit()).await.unwrap());
    assert!(t.elapsed() >= std::time::Duration::from_millis(150), "{:?}", t.elapsed());
    assert_eq!((r.decision, r.reason, r.card_write), (DecisionKind::Reject, Reason::PsamTimeout, None));
    assert_eq!(r.gate_seq, Some(1));

    // A PSAM slower than the bound: refused the same way, and its late answer is dropped, not
    // taken for a request: the next tap on the connection is decided normally.
    let mut late = psam_reader(&agent, PsamBehaviour::Late(std::time::Duration::ZERO)).await;
    let r = response(late.tap(&exit()).await.unwrap());
    assert_eq!((r.reason, r.card_write), (Reason::PsamTimeout, None));
    late.psam.as_mut().unwrap().behaviour = PsamBehaviour::Sign;
    let r = response(late.tap(&exit()).await.unwrap());
    assert_eq!((r.decision, r.fare_fen), (DecisionKind::OpenExit, 400));
    let m = agent.running.metrics.clone();
    eventually("the late answer to be counted", || (m.psam_outcomes("late") == 1).then_some(())).await;

    // A PSAM answer cut off by the bound mid-line: its rest, arriving later, completes the line
    // the gate kept, which is dropped as late, not answered as a malformed request.
    let other = || svc_tap(Direction::Exit, card(id + 1, 1000, Some((FAR, entered))));
    let mut torn = psam_reader(&agent, PsamBehaviour::Torn).await;
    let r = response(torn.tap(&other()).await.unwrap());
    assert_eq!((r.reason, r.card_write), (Reason::PsamTimeout, None));
    torn.psam.as_mut().unwrap().behaviour = PsamBehaviour::Sign;
    let r = response(torn.tap(&other()).await.unwrap());
    assert_eq!((r.decision, r.fare_fen), (DecisionKind::OpenExit, 400));
    eventually("the torn answer to be counted", || (m.psam_outcomes("late") == 2).then_some(())).await;
    assert!(!m.render().contains("afc_gate_malformed_total{source=\"reader\"}"), "{}", m.render());

    let mut broken = psam_reader(&agent, PsamBehaviour::Error("locked".into())).await;
    let r = response(broken.tap(&exit()).await.unwrap());
    assert_eq!((r.decision, r.reason, r.card_write), (DecisionKind::Reject, Reason::PsamFailed, None));

    let recs = records(&agent);
    let refused: Vec<&TxRecord> = recs.iter().filter(|r| !r.accepted).collect();
    assert_eq!(refused.len(), 4, "{recs:?}");
    for r in refused {
        // Recorded as a refusal: nothing charged from the card, no counter written, no TAC.
        assert!(matches!(r.reason, Reason::PsamTimeout | Reason::PsamFailed));
        assert_eq!(
            (r.balance_before, r.balance_after, r.card_tx_counter, r.tac),
            (Some(1000), None, None, None)
        );
    }
    assert_eq!(recs.iter().filter(|r| r.accepted && r.tac.is_some()).count(), 2);
    assert_eq!((m.psam_outcomes("timeout"), m.psam_outcomes("failed"), m.psam_outcomes("signed")), (3, 1, 2));
    assert_eq!(m.decisions_with_reason("psam_timeout"), 3);
    let (s, _) = plc.sim.wait_for(DEADLINE, |s| s.exits_total >= 2).await;
    let opens = s.writes.iter().filter(|w| matches!(w, SimWrite::Coil { addr: 0 | 1, value: true })).count();
    assert_eq!((s.exits_total, opens), (2, 2), "only the signed taps opened");
}

#[tokio::test]
async fn an_older_one_phase_reader_is_answered_at_once_and_its_records_carry_no_tac() {
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    let mut reader = agent.reader().await;
    assert!(reader.psam.is_none());
    let entered = gate_agent::gate::now().plus_minutes(-30);
    let r = response(
        reader
            .tap(&svc_tap(Direction::Exit, card(3104_0000_0000_0021, 1000, Some((FAR, entered)))))
            .await
            .unwrap(),
    );
    assert_eq!((r.decision, r.fare_fen), (DecisionKind::OpenExit, 400));
    assert_eq!(r.card_write.unwrap().balance_fen, 600);
    let (_, ok) = plc.sim.wait_for(DEADLINE, |s| s.exits_total == 1).await;
    assert!(ok && opened(&plc));
    let recs = records(&agent);
    assert_eq!((recs.len(), recs[0].accepted, recs[0].tac), (1, true, None));
    assert_eq!(
        agent.running.metrics.psam_outcomes("signed") + agent.running.metrics.psam_outcomes("timeout"),
        0
    );
}

#[tokio::test]
async fn with_gate_config_requiring_the_psam_a_reader_without_one_cannot_debit_and_one_with_it_can() {
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    let config = GateConfigBody { require_psam: Some(true), ..GateConfigBody::default() };
    agent.seed(ParamKind::GateConfig, 1, Timestamp(0), serde_json::to_vec(&config).unwrap());
    let entered = gate_agent::gate::now().plus_minutes(-30);
    let exit = |id| svc_tap(Direction::Exit, card(id, 1000, Some((FAR, entered))));

    let mut old = agent.reader().await;
    let r = response(old.tap(&exit(3104_0000_0000_0031)).await.unwrap());
    assert_eq!((r.decision, r.reason, r.card_write), (DecisionKind::Reject, Reason::PsamFailed, None));
    // What needs no debit still works from that reader: a refusal stays a refusal, a bank card
    // (charged by clearing, never written) is let in.
    let r = response(old.tap(&svc_tap(Direction::Entry, card(BLACKLISTED, 1000, None))).await.unwrap());
    assert_eq!(r.reason, Reason::Blacklisted);
    let token = afc_domain::bank::sample_tokens(1, 31)[0];
    let r = response(old.tap(&bank_tap(Direction::Entry, token, 1)).await.unwrap());
    assert_eq!((r.decision, r.reason), (DecisionKind::OpenEntry, Reason::Ok));

    let mut signing = psam_reader(&agent, PsamBehaviour::Sign).await;
    let r = response(signing.tap(&exit(3104_0000_0000_0032)).await.unwrap());
    assert_eq!((r.decision, r.fare_fen), (DecisionKind::OpenExit, 400));

    let m = &agent.running.metrics;
    assert_eq!((m.psam_outcomes("absent"), m.psam_outcomes("signed")), (1, 1));
    let recs = records(&agent);
    assert_eq!(recs.len(), 4, "{recs:?}");
    assert_eq!(
        (recs[0].accepted, recs[0].reason, recs[0].balance_after, recs[0].card_tx_counter, recs[0].tac),
        (false, Reason::PsamFailed, None, None, None),
        "refused: nothing charged or written"
    );
    assert!(recs[3].accepted && recs[3].tac.is_some(), "{:?}", recs[3]);
}
