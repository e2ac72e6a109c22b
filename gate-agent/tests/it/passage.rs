//! A passage that did not happen (issue 11 item 8a): the PLC drops between the gate's pre-check
//! and the open-coil write of an accepted tap. The tap is voided by a compensating record through
//! the ledger, and the same card re-tapping within the window is let through once, uncharged.

use std::time::Duration;

use afc_domain::model::{Direction, Media, ParamKind, Reason, Timestamp};
use afc_domain::wire::{AlarmKind, CardWrite, DecisionKind, ReaderReply, ReaderResponse, SvcCard};
use gate_agent::params::GateConfigBody;
use gate_agent::plc_sim::SimWrite;

use crate::harness::*;

const WINDOW_SECS: u64 = 2;
const OPEN_ENTRY: SimWrite = SimWrite::Coil { addr: 0, value: true };
const OPEN_EXIT: SimWrite = SimWrite::Coil { addr: 1, value: true };

fn response(r: ReaderReply) -> ReaderResponse {
    match r {
        ReaderReply::Response(r) => r,
        ReaderReply::Error(e) => panic!("reader error {e:?}"),
    }
}

/// The card as the reader left it after `w`.
fn written(card: &SvcCard, w: &CardWrite) -> SvcCard {
    SvcCard { balance_fen: w.balance_fen, tx_counter: w.tx_counter, entry: w.entry, ..card.clone() }
}

fn coil_writes(plc: &Plc, coil: &SimWrite) -> usize {
    plc.sim.snapshot().writes.iter().filter(|w| *w == coil).count()
}

#[tokio::test]
async fn an_open_command_lost_with_the_plc_is_voided_through_the_ledger_and_one_re_tap_passes_free() {
    let plc = plc().await;
    let port = free_port();
    start_broker(port).await;
    let controller = Controller::connect(port).await;
    let agent = Agent::start(port, &plc).await;
    agent.seed_defaults();
    let body = GateConfigBody { retap_window_secs: Some(WINDOW_SECS), ..GateConfigBody::default() };
    agent.seed(ParamKind::GateConfig, 1, Timestamp(0), serde_json::to_vec(&body).unwrap());
    let g = agent.running.gate.clone();
    let mut reader = agent.reader().await;
    let online = || async {
        let g = g.clone();
        eventually("the PLC to be online", move || g.plc().online().then_some(())).await;
    };

    // 1. An accepted entry whose open command is lost with the PLC connection.
    let a = card(3104_0000_0000_8001, 1000, None);
    plc.sim.drop_on_next_open();
    let r = response(reader.tap(&svc_tap(Direction::Entry, a.clone())).await.unwrap());
    assert_eq!((r.decision, r.reason, r.gate_seq), (DecisionKind::OpenEntry, Reason::Ok, Some(1)));
    let a_written = written(&a, &r.card_write.unwrap());
    assert!(a_written.entry.is_some());
    let compensating = eventually("the compensating record in the ledger", || {
        controller.ledger.lock().unwrap().get(&2).cloned()
    })
    .await;
    let original = controller.ledger.lock().unwrap()[&1].clone();
    assert_eq!((original.accepted, original.reason, original.voids), (true, Reason::Ok, None));
    assert_eq!(
        (compensating.accepted, compensating.reason, compensating.voids, compensating.fare_fen),
        (false, Reason::PassageNotMade, Some(1), 0)
    );
    assert_eq!(
        (compensating.media, compensating.id, compensating.direction),
        (Media::Svc, a.card_id, Direction::Entry)
    );
    assert_eq!((compensating.balance_before, compensating.balance_after), (Some(1000), Some(1000)));
    assert_eq!(compensating.card_tx_counter, Some(a_written.tx_counter));
    assert_eq!(
        (compensating.entry_station, compensating.entry_time),
        (original.entry_station, original.entry_time)
    );
    assert_eq!(compensating.installation, original.installation);
    assert_eq!(coil_writes(&plc, &OPEN_ENTRY), 0, "the open command never reached the PLC");
    assert_eq!(plc.sim.snapshot().entries_total, 0);
    assert_eq!(agent.running.metrics.passages_voided.get(), 1);
    assert!(g.retap_open(Media::Svc, a.card_id, Direction::Entry));
    eventually("the passage_not_made alarm", || {
        let events = controller.events.lock().unwrap();
        events.iter().any(|e| e.kind == AlarmKind::PassageNotMade && !e.cleared).then_some(())
    })
    .await;

    // 2. The same card, as the reader wrote it, re-taps within the window: open, free, unwritten.
    online().await;
    let r = response(reader.tap(&svc_tap(Direction::Entry, a_written.clone())).await.unwrap());
    assert_eq!(
        (r.decision, r.reason, r.fare_fen, r.card_write, r.gate_seq),
        (DecisionKind::OpenEntry, Reason::OkRetapAfterFailedPassage, 0, None, Some(3))
    );
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.entries_total == 1).await;
    assert!(ok, "the re-tap never opened: {s:?}");
    assert_eq!(coil_writes(&plc, &OPEN_ENTRY), 1);
    assert!(!g.retap_open(Media::Svc, a.card_id, Direction::Entry), "one free re-tap per voided passage");

    // 3. A third tap is decided again: the card carries its entry, anti-passback refuses it.
    let r = response(reader.tap(&svc_tap(Direction::Entry, a_written.clone())).await.unwrap());
    assert_eq!((r.decision, r.reason, r.gate_seq), (DecisionKind::Reject, Reason::EntryExists, Some(4)));
    eventually("the passage_not_made alarm cleared by the next opening", || {
        let events = controller.events.lock().unwrap();
        events.iter().any(|e| e.kind == AlarmKind::PassageNotMade && e.cleared).then_some(())
    })
    .await;

    // 4. An exit charged 4 yuan whose open command is lost: voided; a card the reader never
    // wrote (still showing its entry) is decided normally and charged once, taking the window.
    let entered = gate_agent::gate::now().plus_minutes(-30);
    let b = card(3104_0000_0000_8002, 1000, Some((FAR, entered)));
    plc.sim.drop_on_next_open();
    let r = response(reader.tap(&svc_tap(Direction::Exit, b.clone())).await.unwrap());
    assert_eq!((r.decision, r.fare_fen, r.gate_seq), (DecisionKind::OpenExit, 400, Some(5)));
    let b_written = written(&b, &r.card_write.unwrap());
    // The reader hears the answer before the open command fails: wait for the voiding.
    eventually("the exit voided", || g.retap_open(Media::Svc, b.card_id, Direction::Exit).then_some(()))
        .await;
    online().await;
    let r = response(reader.tap(&svc_tap(Direction::Exit, b.clone())).await.unwrap());
    assert_eq!(
        (r.decision, r.reason, r.fare_fen, r.gate_seq),
        (DecisionKind::OpenExit, Reason::Ok, 400, Some(7)),
        "the unwritten card pays (its first charge stands voided)"
    );
    assert!(!g.retap_open(Media::Svc, b.card_id, Direction::Exit));
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.exits_total == 1).await;
    assert!(ok, "{s:?}");

    // 5. A voided exit re-tapped after the window: decided normally (no entry on the card).
    let c = card(3104_0000_0000_8003, 1000, Some((FAR, entered)));
    plc.sim.drop_on_next_open();
    let r = response(reader.tap(&svc_tap(Direction::Exit, c.clone())).await.unwrap());
    assert_eq!((r.decision, r.fare_fen, r.gate_seq), (DecisionKind::OpenExit, 400, Some(8)));
    let c_written = written(&c, &r.card_write.unwrap());
    eventually("the exit voided", || g.retap_open(Media::Svc, c.card_id, Direction::Exit).then_some(()))
        .await;
    tokio::time::sleep(Duration::from_millis(WINDOW_SECS * 1000 + 300)).await;
    online().await;
    let r = response(reader.tap(&svc_tap(Direction::Exit, c_written)).await.unwrap());
    assert_eq!((r.decision, r.reason, r.gate_seq), (DecisionKind::Reject, Reason::NoEntry, Some(10)));
    assert_eq!(coil_writes(&plc, &OPEN_EXIT), 1, "only the unwritten card's exit opened");

    // Everything reached the ledger once, in order, and the outbox drains.
    eventually("the outbox to drain", || (g.store().depth() == 0).then_some(())).await;
    let ledger = controller.ledger.lock().unwrap().clone();
    let got: Vec<(u64, bool, Reason, Option<u64>, u32)> =
        ledger.values().map(|r| (r.gate_seq, r.accepted, r.reason, r.voids, r.fare_fen)).collect();
    assert_eq!(
        got,
        vec![
            (1, true, Reason::Ok, None, 0),
            (2, false, Reason::PassageNotMade, Some(1), 0),
            (3, true, Reason::OkRetapAfterFailedPassage, None, 0),
            (4, false, Reason::EntryExists, None, 0),
            (5, true, Reason::Ok, None, 400),
            (6, false, Reason::PassageNotMade, Some(5), 0),
            (7, true, Reason::Ok, None, 400),
            (8, true, Reason::Ok, None, 400),
            (9, false, Reason::PassageNotMade, Some(8), 0),
            (10, false, Reason::NoEntry, None, 0),
        ]
    );
    let retap = &ledger[&3];
    assert_eq!((retap.balance_before, retap.balance_after), (Some(1000), Some(1000)));
    assert_eq!(retap.card_tx_counter, Some(a_written.tx_counter));
    assert_eq!((retap.entry_station, retap.entry_time), (original.entry_station, original.entry_time));
    assert_eq!((ledger[&6].balance_before, ledger[&6].balance_after), (Some(600), Some(600)));
    assert_eq!(ledger[&6].balance_after, Some(b_written.balance_fen));
    assert_eq!(agent.running.metrics.passages_voided.get(), 3);
    assert_eq!(agent.running.metrics.decisions_with_reason("ok_retap_after_failed_passage"), 1);
    assert_eq!(*controller.forged_batches.lock().unwrap(), 0);
}

#[tokio::test]
async fn the_qr_code_of_a_voided_entry_shown_again_passes_once_and_then_is_a_replay() {
    use afc_domain::qr::{self, QrIssue};
    use afc_domain::wire::{TapMedia, TapRequest};
    let plc = plc().await;
    let agent = Agent::start(free_port(), &plc).await;
    agent.seed_defaults();
    let issuer_key = agent.seed_qr_issuer();
    let g = agent.running.gate.clone();
    let issue = QrIssue {
        issuer: 1,
        key_id: 1,
        account: 8_800_042,
        issued_at: gate_agent::gate::now().plus_minutes(-1),
        valid_secs: 300,
        nonce: 77,
    };
    let tap = TapRequest {
        direction: Direction::Entry,
        media: TapMedia::Qr { code: qr::encode_text(&qr::generate(&issue, &issuer_key)) },
    };
    let mut reader = agent.reader().await;
    plc.sim.drop_on_next_open();
    let r = response(reader.tap(&tap).await.unwrap());
    assert_eq!((r.decision, r.reason, r.gate_seq), (DecisionKind::OpenEntry, Reason::Ok, Some(1)));
    eventually("the entry voided", || g.retap_open(Media::Qr, issue.account, Direction::Entry).then_some(()))
        .await;
    eventually("the PLC to be online", || g.plc().online().then_some(())).await;
    let r = response(reader.tap(&tap).await.unwrap());
    assert_eq!(
        (r.decision, r.reason, r.fare_fen, r.gate_seq),
        (DecisionKind::OpenEntry, Reason::OkRetapAfterFailedPassage, 0, Some(3))
    );
    let (s, ok) = plc.sim.wait_for(DEADLINE, |s| s.entries_total == 1).await;
    assert!(ok, "{s:?}");
    let r = response(reader.tap(&tap).await.unwrap());
    assert_eq!((r.decision, r.reason, r.gate_seq), (DecisionKind::Reject, Reason::QrReplayed, Some(4)));
    let records: Vec<_> = g
        .store()
        .pending(0, 10, 1 << 20)
        .unwrap()
        .iter()
        .map(|(_, b)| gate_agent::gate::decode_record(b).unwrap())
        .collect();
    let got: Vec<_> = records.iter().map(|r| (r.gate_seq, r.reason, r.voids, r.qr)).collect();
    let code = records[0].qr;
    assert!(code.is_some());
    assert_eq!(
        got,
        vec![
            (1, Reason::Ok, None, code),
            (2, Reason::PassageNotMade, Some(1), code),
            (3, Reason::OkRetapAfterFailedPassage, None, code),
            (4, Reason::QrReplayed, None, None),
        ]
    );
}
