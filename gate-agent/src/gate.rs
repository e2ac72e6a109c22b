//! The gate: one tap from reader to flap, the station modes, operator commands and tx acks.
//!
//! A tap goes: pre-checks (outbox room, PLC reachable, in service, direction, parameters held) →
//! [`decide`] with the parameters in force → the record is numbered and made durable in the outbox
//! (the display is written to the PLC meanwhile: it opens nothing) → then, together, the answer to
//! the reader and the open coil. Nothing opens and nothing is promised to the reader before the
//! record is on disk.
//!
//! A refusal by a pre-check (the gate cannot decide: PLC offline, outbox full, out of service,
//! wrong direction, no fare table) touches no card and writes no record; every decision of the
//! shared engine, accepted or refused, is recorded.
//!
//! A passage that did not happen: the reader is answered (and writes the card) together with the
//! open command, so the open command can fail after the card was written (the PLC dropped between
//! the pre-check and the coil write). Then [`Gate::run_flap`] appends a compensating record
//! (`passage_not_made`, `voids` = the accepted record's gate_seq, nothing charged, the balances
//! and entry as the card now carries them), counts it (`afc_gate_passages_voided_total`) and
//! raises `passage_not_made`. The same medium re-tapping at this gate in the same direction
//! within gate_config's re-tap window (default 120 s), with the card still as the voided tap
//! left it, is let through once without deciding again (`ok_retap_after_failed_passage`, fare 0,
//! no card write). The window is held in memory only: after a restart the re-tap is decided
//! normally (anti-passback refuses it and the station desk clears it, the compensating record
//! being in the ledger), which errs on the side of no free passage.
//!
//! A stored-value debit signed by the reader's PSAM (the two-phase exchange, docs/spec/reader.md):
//! with a reader that announced a PSAM, an accepted svc tap that writes the card is signed
//! between the decision and the record: [`Gate::tap_with`] hands the debit
//! ([`afc_domain::tac::TacInput`]) to the reader's [`Psam`], waits at most `psam_timeout_ms`, and
//! records the PSAM's id, counter and TAC in the record (`TxRecord::tac`) before it is made
//! durable and the reader answered. A timeout or a PSAM error turns the decision into a refusal
//! (`psam_timeout`, `psam_failed`): recorded, counted (`afc_gate_psam_signatures_total`),
//! nothing charged, nothing written to the card. A reader without a PSAM is never asked; its
//! debits are recorded without a TAC, or refused with `psam_failed` when `gate_config.require_psam`
//! is set.
//!
//! Control messages reach this module only after the MQTT side verified their station signature
//! (`afc_domain::signed`); what fails verification is counted and alarmed here
//! ([`Gate::unverified`]) and changes nothing. Signed messages are still checked against
//! replays on their own topic: mode versions never go back, a command id runs at most once
//! (remembered durably until well after its expiry), an ack must name this installation and
//! stay within the gate_seqs used.
//!
//! Commands and the gate's clock: a command is executed only while `now < expires_at` by the
//! gate's clock, and its id is remembered until `expires_at + COMMAND_KEPT_AFTER_EXPIRY` by the
//! same clock, so by the time an id is forgotten a redelivery is refused as expired anyway. A
//! gate clock that is behind runs a delayed command up to that much later than the controller
//! meant (never twice); one that is ahead answers `expired` early (fail-safe). Only a clock set
//! back by more than `COMMAND_KEPT_AFTER_EXPIRY` after an id was forgotten could run it again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use afc_domain::decision::{decide, with_emergency_input, Decision, Params as DecisionParams};
use afc_domain::ledger::{TacRef, TxRecord};
use afc_domain::mode::{ModeBits, ModeState};
use afc_domain::model::{Direction, Ident, Media, Reason, StationCode, Timestamp};
use afc_domain::qr::{QrSkew, ReplayCache, ReplayKey, ReplaySource};
use afc_domain::tac::TacInput;
use afc_domain::wire::{
    self, AlarmKind, CardWrite, Command, CommandAck, CommandKind, CommandResult, DecisionKind, EntryRecord,
    GateDirection, GateEvent, ModeMessage, QrUsed, QrUsedBatch, ReaderResponse, TapMedia, TapRequest, TxAck,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};

use crate::metrics::Metrics;
use crate::params::Params;
use crate::plc::{PlcError, PlcHandle};
use crate::store::{Store, StoreError};

pub use crate::clock::{now, set_test_clock_offset_ms, TEST_CLOCK_OFFSET_ENV, TEST_CLOCK_OFFSET_FILE_ENV};

/// The reader's PSAM, as the gate sees it: asked to sign one stored-value debit between the
/// decision and the record ([`Gate::tap_with`]; the reader socket implements it in
/// `reader.rs`). The gate bounds the wait; an implementation only does the exchange.
pub trait Psam: Send {
    /// Signs `input`: the PSAM's id, its counter and the TAC, or why it did not.
    fn sign(
        &mut self,
        input: &TacInput,
    ) -> impl std::future::Future<Output = Result<TacRef, PsamFault>> + Send;
}

/// Why a PSAM did not sign: the refusal's detail, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsamFault(pub String);

/// No PSAM (a one-phase reader): never asked, since [`Gate::tap`] passes none.
pub struct NoPsam;

impl Psam for NoPsam {
    async fn sign(&mut self, _: &TacInput) -> Result<TacRef, PsamFault> {
        Err(PsamFault("no PSAM".into()))
    }
}

/// What the flaps must do after the reader is answered.
#[derive(Debug, Clone, Copy)]
pub enum Flap {
    /// Open for one passage (the display was written while the record was being flushed).
    Open { aisle: Direction },
    /// Show a refusal that no record was written for.
    Show { display_code: u16, display_fen: u32 },
}

/// The result of one tap: the answer for the reader and the flap command to run with it.
#[derive(Debug, Clone)]
pub struct TapOutcome {
    pub response: ReaderResponse,
    pub flap: Option<Flap>,
    /// When the tap arrived, for the tap → flap latency.
    pub started: Instant,
    /// For an accepted tap: its durable record and the card as the reader leaves it, for the
    /// compensating record should the open command fail.
    pub accepted: Option<AcceptedTap>,
}

/// An accepted tap whose flaps are about to open.
#[derive(Debug, Clone)]
pub struct AcceptedTap {
    pub record: TxRecord,
    pub card: CardState,
}

/// What a medium carries after an accepted tap (the reader's write applied): a re-tap after a
/// voided passage is let through only if the card still shows exactly this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CardState {
    Svc {
        balance_fen: u32,
        tx_counter: u32,
        entry: Option<EntryRecord>,
    },
    Token {
        entry: Option<EntryRecord>,
    },
    /// A QR code carries no state.
    Qr,
    /// Nor does a bank card: the gate never writes it.
    Bank,
}

impl CardState {
    /// The medium of `tap` with `write` applied (as tapped when `None`).
    pub fn after(tap: &TapMedia, write: Option<&CardWrite>) -> CardState {
        match (tap, write) {
            (TapMedia::Svc { .. }, Some(w)) => {
                CardState::Svc { balance_fen: w.balance_fen, tx_counter: w.tx_counter, entry: w.entry }
            }
            (TapMedia::Svc { card }, None) => CardState::Svc {
                balance_fen: card.balance_fen,
                tx_counter: card.tx_counter,
                entry: card.entry,
            },
            (TapMedia::Token { .. }, Some(w)) => CardState::Token { entry: w.entry },
            (TapMedia::Token { token }, None) => CardState::Token { entry: token.entry },
            (TapMedia::Qr { .. }, _) => CardState::Qr,
            (TapMedia::Bank { .. }, _) => CardState::Bank,
        }
    }
}

/// A voided passage waiting for its re-tap, keyed by (media, id, direction).
#[derive(Debug, Clone)]
struct Voided {
    /// The voided record (the re-tap's record copies its entry, balances and counter).
    record: TxRecord,
    card: CardState,
    until: Instant,
}

/// At most this many voided passages wait for a re-tap (the oldest window is closed first).
pub const RETAP_MEMORY: usize = 1024;

/// Operator settings of the aisle.
#[derive(Debug, Clone, Copy)]
struct Settings {
    direction: GateDirection,
    in_service: bool,
}

/// Alarms and messages the gate hands to the MQTT task.
#[derive(Debug)]
pub enum Outgoing {
    Event(GateEvent),
    QrUsed(QrUsed),
}

/// How many command ids are remembered at most, so a redelivered command runs once. When this
/// many unexpired ids are held, a new command is refused (`rejected`) rather than an id forgotten.
pub const COMMAND_MEMORY: usize = 1024;
/// How long after its expiry (by the gate's clock) a command id is still remembered.
pub const COMMAND_KEPT_AFTER_EXPIRY_MS: i64 = 3_600_000;
/// At most one `unverified_message` alarm per this interval (the metric counts every message).
pub const UNVERIFIED_ALARM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// What the gate remembers of a command it took (in the store, by id).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Remembered {
    expires_at: Timestamp,
    /// The result once known; `None`: the gate stopped while executing it.
    result: Option<CommandResult>,
}

pub struct Gate {
    pub station: Ident,
    pub gate: Ident,
    pub station_code: StationCode,
    store: Arc<Store>,
    pub params: Arc<Params>,
    plc: PlcHandle,
    metrics: Arc<Metrics>,
    /// The version of the last mode message applied, the mode history it gave, and the bits it
    /// put in force at this station. The outputs (free passage) follow those bits, never the
    /// gate's clock: a release reaches the PLC on receipt whatever the clock says.
    modes: RwLock<(u64, Arc<ModeState>, ModeBits)>,
    replay: Mutex<ReplayCache>,
    /// Accepted bank taps per token today at this gate: the unpaid-tap limit.
    bank_risk: Mutex<afc_domain::bank::BankRisk>,
    qr_skew: QrSkew,
    settings: Mutex<Settings>,
    /// Whether the MQTT session is up (a QR accepted while cut off is marked replay_unchecked).
    pub mqtt_connected: AtomicBool,
    /// Set while the controllers have been unreachable longer than gate_config allows: the
    /// passage is freed (SPEC §1, release on controller loss).
    controller_lost: AtomicBool,
    /// Whether the agent last asked the PLC to hold the flaps open.
    free_passage: AtomicBool,
    /// Woken after every append, so the uploader sends at once.
    pub new_records: Notify,
    near_full_percent: u64,
    near_full_raised: AtomicBool,
    /// Whether the `storage_unavailable` alarm is raised (the store is not [`Store::healthy`]).
    storage_down: AtomicBool,
    /// A mode message applied but not yet persisted (the disk refused it): written again by
    /// [`Gate::storage_tick`]. Free passage never waits for storage.
    unpersisted_mode: Mutex<Option<ModeMessage>>,
    /// A scheduled mode change waiting for its start ([`mode_start_delay`]): applied by a local
    /// timer, or superseded by any newer message. Not persisted: the retained message brings it
    /// again after a restart.
    scheduled_mode: Mutex<Option<ModeMessage>>,
    /// Command ids taken (mirror of the store's), with their expiry and result.
    commands: Mutex<BTreeMap<String, Remembered>>,
    /// When the last `unverified_message` alarm went out, and how many refusals since.
    unverified_alarm: Mutex<(Option<Instant>, u64)>,
    out: mpsc::UnboundedSender<Outgoing>,
    pub taps: AtomicU64,
    pub rejects: AtomicU64,
    /// Voided passages whose medium may re-tap once without a second charge, until their
    /// window closes. In memory only (see the module doc).
    retaps: Mutex<HashMap<(Media, u64, Direction), Voided>>,
    /// Whether `passage_not_made` is raised (cleared by the next open command the PLC takes).
    passage_alarm: AtomicBool,
    /// Longest wait for a reader's PSAM to sign a debit (`psam_timeout_ms`).
    psam_timeout: std::time::Duration,
}

pub struct GateParts {
    pub station: Ident,
    pub gate: Ident,
    pub station_code: StationCode,
    pub store: Arc<Store>,
    pub params: Arc<Params>,
    pub plc: PlcHandle,
    pub metrics: Arc<Metrics>,
    pub qr_skew: QrSkew,
    pub replay_capacity: usize,
    pub replay_sources: usize,
    pub direction: GateDirection,
    pub near_full_percent: u64,
    pub out: mpsc::UnboundedSender<Outgoing>,
    pub psam_timeout: std::time::Duration,
}

impl Gate {
    pub fn new(p: GateParts) -> Gate {
        let modes = match p.store.state("mode").ok().flatten().map(|b| wire::decode::<ModeMessage>(&b)) {
            Some(Ok(m)) => (m.version, Arc::new(mode_state_received(p.station_code, &m, now())), m.bits),
            _ => (0, Arc::new(ModeState::default()), ModeBits::NORMAL),
        };
        let direction = p.params.in_force(now()).gate_config.direction.unwrap_or(p.direction);
        let mut commands = BTreeMap::new();
        match p.store.commands() {
            Ok(list) => {
                for (id, bytes) in list {
                    match serde_json::from_slice::<Remembered>(&bytes) {
                        Ok(r) => {
                            commands.insert(id, r);
                        }
                        // Unreadable: remember the id as taken, with no result, until an hour
                        // from now (it may never run twice).
                        Err(_) => {
                            let r = Remembered { expires_at: now(), result: None };
                            commands.insert(id, r);
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the remembered commands"),
        }
        let g = Gate {
            station: p.station,
            gate: p.gate,
            station_code: p.station_code,
            store: p.store,
            params: p.params,
            plc: p.plc,
            metrics: p.metrics,
            modes: RwLock::new(modes),
            replay: Mutex::new(ReplayCache::with_sources(p.replay_capacity, p.replay_sources, p.qr_skew)),
            bank_risk: Mutex::new(afc_domain::bank::BankRisk::default()),
            qr_skew: p.qr_skew,
            settings: Mutex::new(Settings { direction, in_service: true }),
            mqtt_connected: AtomicBool::new(false),
            controller_lost: AtomicBool::new(false),
            free_passage: AtomicBool::new(false),
            new_records: Notify::new(),
            near_full_percent: p.near_full_percent,
            near_full_raised: AtomicBool::new(false),
            storage_down: AtomicBool::new(false),
            unpersisted_mode: Mutex::new(None),
            scheduled_mode: Mutex::new(None),
            commands: Mutex::new(commands),
            unverified_alarm: Mutex::new((None, 0)),
            out: p.out,
            taps: AtomicU64::new(0),
            rejects: AtomicU64::new(0),
            retaps: Mutex::new(HashMap::new()),
            passage_alarm: AtomicBool::new(false),
            psam_timeout: p.psam_timeout,
        };
        g.update_outbox_metrics();
        g
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn plc(&self) -> &PlcHandle {
        &self.plc
    }

    pub fn direction(&self) -> GateDirection {
        self.settings.lock().unwrap_or_else(|p| p.into_inner()).direction
    }

    pub fn in_service(&self) -> bool {
        self.settings.lock().unwrap_or_else(|p| p.into_inner()).in_service
    }

    pub fn modes(&self) -> Arc<ModeState> {
        self.modes.read().unwrap_or_else(|p| p.into_inner()).1.clone()
    }

    /// The bits the last mode message put in force at this station.
    pub fn mode_bits(&self) -> ModeBits {
        self.modes.read().unwrap_or_else(|p| p.into_inner()).2
    }

    /// Applies the outputs the current settings and modes ask of the PLC (after start and after
    /// every change).
    pub async fn sync_outputs(&self) {
        let bits = self.mode_bits();
        let s = *self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let free = bits.has(ModeBits::EMERGENCY_RELEASE)
            || (bits.has(ModeBits::ENTRY_FREE) && s.direction.allows(Direction::Entry))
            || self.controller_lost.load(Ordering::Relaxed);
        self.free_passage.store(free, Ordering::Relaxed);
        for r in [
            self.plc.set_free_passage(free).await,
            self.plc.set_direction(s.direction).await,
            self.plc.set_out_of_service(!s.in_service).await,
        ] {
            if let Err(e) = r {
                tracing::warn!(error = %e, "could not apply gate outputs now; the PLC task re-applies them");
            }
        }
    }

    fn refuse(&self, tap: &TapRequest, reason: Reason) -> TapOutcome {
        self.rejects.fetch_add(1, Ordering::Relaxed);
        self.metrics.decision(false, reason.as_str(), tap.media.media().as_str(), tap.direction.as_str());
        TapOutcome {
            response: ReaderResponse {
                decision: DecisionKind::Reject,
                reason,
                fare_fen: 0,
                card_write: None,
                gate_seq: None,
            },
            flap: Some(Flap::Show { display_code: reason.code(), display_fen: 0 }),
            started: Instant::now(),
            accepted: None,
        }
    }

    /// Decides one tap and makes its record durable; the caller then answers the reader and runs
    /// the flap command ([`Gate::run_flap`]) together. A one-phase reader: no TAC.
    pub async fn tap(self: &Arc<Self>, tap: TapRequest) -> Result<TapOutcome, StoreError> {
        self.tap_with(tap, None::<&mut NoPsam>).await
    }

    /// [`Gate::tap`], with the reader's PSAM when it announced one: an accepted stored-value tap
    /// that writes the card is signed by it before its record is written (see the module doc).
    pub async fn tap_with<P: Psam>(
        self: &Arc<Self>,
        tap: TapRequest,
        psam: Option<&mut P>,
    ) -> Result<TapOutcome, StoreError> {
        let started = Instant::now();
        self.taps.fetch_add(1, Ordering::Relaxed);
        // The outbox refused its last write: nothing can be promised (the storage probe clears it).
        if self.store.outbox_failed() {
            return Ok(self.refuse(&tap, Reason::StorageUnavailable));
        }
        // A record is a few hundred bytes; refuse before deciding if even that will not fit.
        if !self.store.has_room(512) {
            return Ok(self.refuse(&tap, Reason::OutboxFull));
        }
        if !self.plc.online() {
            return Ok(self.refuse(&tap, Reason::PlcOffline));
        }
        let s = *self.settings.lock().unwrap_or_else(|p| p.into_inner());
        if !s.in_service {
            return Ok(self.refuse(&tap, Reason::OutOfService));
        }
        if !s.direction.allows(tap.direction) {
            return Ok(self.refuse(&tap, Reason::WrongDirection));
        }
        let at = now();
        let params = self.params.in_force(at);
        let Some(fares) = params.fares.clone() else {
            return Ok(self.refuse(&tap, Reason::NoParameters));
        };
        let modes = self.modes();
        // While the hard-wired emergency input holds the flaps open, taps follow the emergency
        // rules as under the station's emergency release (no copy otherwise).
        let modes =
            with_emergency_input(&modes, self.station_code, at, self.plc.last_inputs().emergency_input);
        let dp = DecisionParams {
            station: self.station_code,
            fares: &fares,
            blacklist: &params.blacklist,
            qr_keys: &params.qr_keys,
            qr_skew: self.qr_skew,
            bank_taps_per_day: params.gate_config.bank_taps_per_day(),
        };
        let bits = modes.bits_at(self.station_code, at);
        let t = Instant::now();
        // A card re-tapping after its voided passage is let through without deciding again.
        let mut granted = self.retap_grant(&tap, &params.blacklist, bits);
        let d = match &granted {
            Some(v) => retap_decision(&tap, v, bits),
            None => {
                let d = {
                    let mut replay = self.replay.lock().unwrap_or_else(|p| p.into_inner());
                    let mut bank = self.bank_risk.lock().unwrap_or_else(|p| p.into_inner());
                    decide(&tap, &dp, &modes, at, &mut replay, &mut bank)
                };
                // A QR code is single-use: the code of the voided passage shown again is refused
                // as replayed (its signature verified, not blacklisted); within the window it is
                // the re-tap.
                match (d.reason, d.media) {
                    (Reason::QrReplayed, Media::Qr) => {
                        granted = self.take_retap((Media::Qr, d.id, tap.direction), &CardState::Qr, bits);
                        match &granted {
                            Some(v) => retap_decision(&tap, v, bits),
                            None => d,
                        }
                    }
                    _ => d,
                }
            }
        };
        afc_process::metrics::observe(&self.metrics.decision_seconds, t.elapsed());
        // A debit that writes the card is signed by the reader's PSAM before anything is recorded;
        // without its TAC the tap is refused (nothing charged, nothing written). A reader without
        // a PSAM debits unsigned unless gate_config requires the PSAM.
        let debit = d.accepted() && d.media == Media::Svc && granted.is_none();
        let (d, tac) = match (psam, &d.card_write) {
            (None, Some(_)) if debit && params.gate_config.psam_required() => {
                self.metrics.psam("absent");
                tracing::warn!(card = d.id, "a stored-value debit from a reader without a PSAM while gate_config requires one: tap refused");
                (psam_refusal(d, Reason::PsamFailed), None)
            }
            (Some(p), Some(w)) if debit => {
                let input = TacInput {
                    card_id: d.id,
                    tx_counter: w.tx_counter,
                    amount_fen: d.fare_fen,
                    station: self.station.clone(),
                    gate: self.gate.clone(),
                    time: at,
                };
                match self.psam_sign(p, &input).await {
                    Ok(t) => (d, Some(t)),
                    Err(reason) => (psam_refusal(d, reason), None),
                }
            }
            _ => (d, None),
        };
        if d.accepted() && granted.is_none() {
            // Decided and let through normally: no free re-tap remains for this medium here.
            self.retaps_lock().remove(&(d.media, d.id, d.direction));
        }
        let offline = !self.mqtt_connected.load(Ordering::Relaxed);
        let mut record_template: TxRecord = d.to_record(&self.station, &self.gate, 0, params.versions, at);
        // Also when the decision could not check the replay cache (it was full): never cleared here.
        record_template.replay_unchecked |= d.qr.is_some() && offline;
        record_template.installation = Some(self.store.installation_id());
        record_template.tac = tac;
        if let Some(v) = &granted {
            // The card keeps its counter (nothing written); a QR re-tap names the voided code.
            record_template.card_tx_counter = v.record.card_tx_counter;
            record_template.qr = v.record.qr;
        }
        let card = CardState::after(&tap.media, d.card_write.as_ref());
        let shown_fen = match (d.kind, d.direction) {
            (DecisionKind::Reject, _) => d.fare_fen,
            (_, Direction::Exit) => d.fare_fen,
            (_, Direction::Entry) => d.balance_after.or(d.balance_before).unwrap_or(0),
        };
        let store = self.store.clone();
        let t = Instant::now();
        // The display is written while the record is flushed (it opens nothing); the coil only
        // after the record is durable.
        let (appended, shown) = tokio::join!(
            tokio::task::spawn_blocking(move || {
                store
                    .append(|seq| {
                        record_template.gate_seq = seq;
                        record_template.canonical_bytes()
                    })
                    .map(|seq| (seq, record_template))
            }),
            self.plc.show(d.reason.code(), shown_fen)
        );
        afc_process::metrics::observe(&self.metrics.outbox_flush_seconds, t.elapsed());
        if let Err(e) = shown {
            tracing::warn!(error = %e, "display write failed");
        }
        let appended =
            appended.map_err(|e| StoreError::Batch(format!("append task failed: {e}"))).and_then(|r| r);
        let (seq, record) = match appended {
            Ok(r) => r,
            Err(e) => {
                // Not let through: the re-tap stays owed.
                if let Some(v) = granted {
                    self.retaps_lock().insert((d.media, d.id, d.direction), v);
                }
                return match e {
                    StoreError::Full { .. } => Ok(self.refuse(&tap, Reason::OutboxFull)),
                    e if e.is_fault() => {
                        self.storage_fault("outbox", &e);
                        Ok(self.refuse(&tap, Reason::StorageUnavailable))
                    }
                    e => Err(e),
                };
            }
        };
        if let Some(v) = &granted {
            tracing::info!(
                seq,
                voided = v.record.gate_seq,
                media = d.media.as_str(),
                "re-tap after a voided passage let through without a second charge"
            );
        }
        self.update_outbox_metrics();
        self.new_records.notify_one();
        let accepted = d.accepted();
        if !accepted {
            self.rejects.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics.decision(accepted, d.reason.as_str(), d.media.as_str(), d.direction.as_str());
        if let (Some(claims), true) = (d.qr, accepted) {
            let _ = self.out.send(Outgoing::QrUsed(QrUsed {
                issuer: claims.issuer,
                account: claims.account,
                nonce: claims.nonce,
                expires_at: claims.expires_at,
                gate: self.gate.clone(),
            }));
        }
        let flap = match d.kind {
            DecisionKind::OpenEntry => Some(Flap::Open { aisle: Direction::Entry }),
            DecisionKind::OpenExit => Some(Flap::Open { aisle: Direction::Exit }),
            DecisionKind::Reject => None,
        };
        Ok(TapOutcome {
            response: ReaderResponse {
                decision: d.kind,
                reason: d.reason,
                fare_fen: d.fare_fen,
                card_write: d.card_write,
                gate_seq: Some(seq),
            },
            accepted: flap.is_some().then_some(AcceptedTap { record, card }),
            flap,
            started,
        })
    }

    /// Asks the reader's PSAM to sign `input`, waiting at most `psam_timeout`; the reason of the
    /// refusal when it does not answer in time or cannot sign.
    async fn psam_sign<P: Psam>(&self, psam: &mut P, input: &TacInput) -> Result<TacRef, Reason> {
        let t = Instant::now();
        let answer = tokio::time::timeout(self.psam_timeout, psam.sign(input)).await;
        afc_process::metrics::observe(&self.metrics.psam_seconds, t.elapsed());
        match answer {
            Ok(Ok(tac)) => {
                self.metrics.psam("signed");
                Ok(tac)
            }
            Ok(Err(PsamFault(why))) => {
                self.metrics.psam("failed");
                tracing::warn!(card = input.card_id, why, "the reader's PSAM did not sign: tap refused");
                Err(Reason::PsamFailed)
            }
            Err(_) => {
                self.metrics.psam("timeout");
                tracing::warn!(card = input.card_id, timeout = ?self.psam_timeout, "the reader's PSAM did not answer in time: tap refused");
                Err(Reason::PsamTimeout)
            }
        }
    }

    fn retaps_lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Media, u64, Direction), Voided>> {
        self.retaps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A card or token re-tapping after its voided passage: the window it may take (removed, so
    /// it is taken once), if the station is neither closed nor under emergency release (then the
    /// tap is decided as any other), the medium is not blacklisted meanwhile, and it still
    /// carries what the voided tap wrote (a card the reader never wrote is decided normally: it
    /// pays as if for the first time, its earlier record being voided).
    fn retap_grant(
        &self,
        tap: &TapRequest,
        blacklist: &afc_domain::blacklist::Blacklist,
        bits: ModeBits,
    ) -> Option<Voided> {
        let (media, id) = match &tap.media {
            TapMedia::Svc { card } => (Media::Svc, card.card_id),
            TapMedia::Token { token } => (Media::Token, token.token_id),
            TapMedia::Bank { bank } => (Media::Bank, bank.token.deny_key()),
            TapMedia::Qr { .. } => return None,
        };
        if blacklist.contains(media, id) {
            return None;
        }
        self.take_retap((media, id, tap.direction), &CardState::after(&tap.media, None), bits)
    }

    /// Takes the open re-tap window of `key` if the medium shows `card` as the voided tap left it.
    fn take_retap(&self, key: (Media, u64, Direction), card: &CardState, bits: ModeBits) -> Option<Voided> {
        if bits.has(ModeBits::EMERGENCY_RELEASE) || bits.has(ModeBits::CLOSED) {
            return None;
        }
        let mut retaps = self.retaps_lock();
        let now = Instant::now();
        retaps.retain(|_, v| v.until > now);
        if retaps.get(&key).is_some_and(|v| v.card == *card) {
            retaps.remove(&key)
        } else {
            None
        }
    }

    /// The open command of an accepted tap failed: the passenger never passed, though the reader
    /// was answered (and wrote the card). Appends the compensating record, counts and alarms it,
    /// and opens the re-tap window. Nothing is voided while the flaps are held open (free
    /// passage, the emergency input): the passenger could pass anyway.
    ///
    /// Which failures count as "not opened": every one. `Offline`, `Stopped` and an exception
    /// answer mean the coil was not written; a dropped connection or a timeout after the request
    /// was sent could in rare cases hide a write the PLC did apply, and then the passenger passed
    /// on a voided record and gets one more free passage at most, within the window, at this
    /// gate, in this direction, with this card.
    async fn void_passage(&self, acc: &AcceptedTap, err: &PlcError) {
        if self.free_passage() || self.plc.last_inputs().emergency_input {
            tracing::warn!(seq = acc.record.gate_seq, error = %err, "open command failed while the flaps are held open: not voided");
            return;
        }
        let voided = acc.record.gate_seq;
        // Same medium, id, direction, entry, modes and parameter versions as the voided record:
        // it takes that tap back. Nothing charged; the balances are the card's as the voided
        // tap left it (the reader wrote the card before the open command failed, and the
        // compensating record changes nothing on it).
        let mut rec = acc.record.clone();
        rec.accepted = false;
        rec.reason = Reason::PassageNotMade;
        rec.fare_fen = 0;
        rec.shortfall_fen = 0;
        rec.balance_before = acc.record.balance_after;
        rec.balance_after = acc.record.balance_after;
        rec.occurred_at = now();
        rec.replay_unchecked = false;
        rec.voids = Some(voided);
        // Not a debit: the voided record's TAC stays with it.
        rec.tac = None;
        let store = self.store.clone();
        let appended = tokio::task::spawn_blocking(move || {
            store.append(|seq| {
                rec.gate_seq = seq;
                rec.canonical_bytes()
            })
        })
        .await
        .map_err(|e| StoreError::Batch(format!("append task failed: {e}")))
        .and_then(|r| r);
        self.metrics.event("passage_not_made");
        self.passage_alarm.store(true, Ordering::Relaxed);
        let seq = match appended {
            Ok(seq) => seq,
            Err(e) => {
                if e.is_fault() {
                    self.storage_fault("outbox", &e);
                }
                tracing::error!(voided, error = %e, plc_error = %err, "passage not made and its compensating record could not be written");
                self.event(
                    AlarmKind::PassageNotMade,
                    false,
                    Some(format!(
                        "gate_seq {voided} not voided (record not written: {e}); open command: {err}"
                    )),
                );
                return;
            }
        };
        self.metrics.passages_voided.inc();
        self.update_outbox_metrics();
        self.new_records.notify_one();
        let window = self.params.in_force(now()).gate_config.retap_window();
        let r = &acc.record;
        tracing::warn!(voided, seq, error = %err, ?window, media = r.media.as_str(), "passage not made: tap voided");
        self.event(
            AlarmKind::PassageNotMade,
            false,
            Some(format!("gate_seq {voided} voided by {seq}; open command: {err}")),
        );
        if window.is_zero() {
            return;
        }
        let mut retaps = self.retaps_lock();
        let now = Instant::now();
        retaps.retain(|_, v| v.until > now);
        while retaps.len() >= RETAP_MEMORY {
            let Some(oldest) = retaps.iter().min_by_key(|(_, v)| v.until).map(|(k, _)| *k) else { break };
            retaps.remove(&oldest);
        }
        let v = Voided { record: acc.record.clone(), card: acc.card.clone(), until: now + window };
        retaps.insert((r.media, r.id, r.direction), v);
    }

    /// Whether a re-tap window is open for this medium (tests and diagnostics).
    pub fn retap_open(&self, media: Media, id: u64, direction: Direction) -> bool {
        let now = Instant::now();
        self.retaps_lock().get(&(media, id, direction)).is_some_and(|v| v.until > now)
    }

    /// Runs the flap command of a tap (after its record is durable).
    pub async fn run_flap(&self, outcome: &TapOutcome) {
        let Some(flap) = outcome.flap else { return };
        let r = match flap {
            Flap::Open { aisle } => {
                let r = self.plc.open_coil(aisle).await;
                if r.is_ok() {
                    afc_process::metrics::observe(
                        &self.metrics.tap_to_flap_seconds,
                        outcome.started.elapsed(),
                    );
                    if self.passage_alarm.swap(false, Ordering::Relaxed) {
                        self.event(AlarmKind::PassageNotMade, true, None);
                    }
                }
                r
            }
            Flap::Show { display_code, display_fen } => self.plc.show(display_code, display_fen).await,
        };
        if let Err(e) = r {
            if !matches!(e, PlcError::Offline) || matches!(flap, Flap::Open { .. }) {
                tracing::error!(error = %e, ?flap, seq = ?outcome.response.gate_seq, "flap command failed");
            }
            if let (Flap::Open { .. }, Some(acc)) = (flap, &outcome.accepted) {
                self.void_passage(acc, &e).await;
            }
        }
    }

    fn update_outbox_metrics(&self) {
        self.metrics.outbox_depth.store(self.store.depth(), Ordering::Relaxed);
        self.metrics.outbox_bytes.store(self.store.bytes(), Ordering::Relaxed);
        self.metrics.outbox_capacity_bytes.store(self.store.capacity(), Ordering::Relaxed);
        let near = self.store.above(self.near_full_percent);
        if near != self.near_full_raised.swap(near, Ordering::Relaxed) {
            if near {
                tracing::warn!(bytes = self.store.bytes(), "outbox near full");
                self.metrics.event("outbox_near_full");
            }
            self.event(AlarmKind::OutboxNearFull, !near, Some(format!("{} bytes", self.store.bytes())));
        }
    }

    /// A storage write failed: counted, and the `storage_unavailable` alarm raised if the store
    /// is now unhealthy.
    pub fn storage_fault(&self, op: &'static str, e: &StoreError) {
        tracing::warn!(op, error = %e, "storage write failed");
        self.metrics.storage_error(op);
        self.update_storage_alarm();
    }

    /// Raises or clears `storage_unavailable` as the store's health says.
    fn update_storage_alarm(&self) {
        let down = !self.store.healthy();
        self.metrics.storage_unavailable.store(down, Ordering::Relaxed);
        if down != self.storage_down.swap(down, Ordering::Relaxed) {
            if down {
                tracing::error!("storage unavailable: taps are refused, free passage still works");
                self.metrics.event("storage_unavailable");
            } else {
                tracing::info!("storage takes writes again");
            }
            self.event(AlarmKind::StorageUnavailable, !down, None);
        }
    }

    /// Called about once a second (task `storage-probe`): while the store is unhealthy, probes
    /// the outbox and re-opens sled; then writes what is waiting (a mode applied but not
    /// persisted) and raises or clears the alarm.
    pub async fn storage_tick(&self) {
        let pending_mode = self.unpersisted_mode.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if self.store.healthy() && pending_mode.is_none() {
            return;
        }
        let store = self.store.clone();
        let pending_version = pending_mode.as_ref().map(|m| m.version);
        let r = tokio::task::spawn_blocking(move || {
            let mut failed: Vec<(&'static str, StoreError)> = Vec::new();
            if store.outbox_failed() {
                if let Err(e) = store.probe_outbox() {
                    failed.push(("probe", e));
                }
            }
            if let Err(e) = store.recover() {
                failed.push(("probe", e));
            }
            if let Some(m) = &pending_mode {
                match store.put_state("mode", &wire::encode(m)) {
                    Ok(()) => return (failed, true),
                    Err(e) => failed.push(("mode", e)),
                }
            }
            (failed, false)
        })
        .await;
        match r {
            Ok((failed, mode_written)) => {
                for (op, e) in failed {
                    tracing::debug!(op, error = %e, "storage still failing");
                    self.metrics.storage_error(op);
                }
                if mode_written {
                    let mut m = self.unpersisted_mode.lock().unwrap_or_else(|p| p.into_inner());
                    // Only if no newer mode arrived meanwhile (that one is persisted by its own turn).
                    if m.as_ref().map(|x| x.version) == pending_version {
                        *m = None;
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "storage probe task failed"),
        }
        self.update_storage_alarm();
    }

    /// Hands an alarm to the MQTT task.
    pub fn event(&self, kind: AlarmKind, cleared: bool, detail: Option<String>) {
        let _ = self.out.send(Outgoing::Event(GateEvent { at: now(), kind, cleared, detail }));
    }

    /// A control message that failed verification (`reason`: `SignedError::code`) or was signed
    /// but not for this gate: counted, logged, and alarmed at most once per
    /// [`UNVERIFIED_ALARM_INTERVAL`] (a flood must not become an event flood).
    pub fn unverified(&self, topic: &'static str, reason: &'static str, detail: &str) {
        self.metrics.unverified(topic, reason);
        let since = {
            let mut a = self.unverified_alarm.lock().unwrap_or_else(|p| p.into_inner());
            a.1 += 1;
            if a.0.is_some_and(|t| t.elapsed() < UNVERIFIED_ALARM_INTERVAL) {
                tracing::debug!(topic, reason, detail, "control message refused");
                return;
            }
            let n = a.1;
            *a = (Some(Instant::now()), 0);
            n
        };
        tracing::warn!(topic, reason, detail, refused_since_last_alarm = since, "control message refused");
        self.metrics.event("unverified_message");
        self.event(
            AlarmKind::UnverifiedMessage,
            false,
            Some(format!("{topic}: {reason} ({since} refused since the last alarm): {detail}")),
        );
    }

    /// A signed `tx/ack`: taken only if it names this installation (then [`Gate::on_tx_ack`]).
    pub fn on_signed_tx_ack(&self, ack: &TxAck) -> Result<usize, StoreError> {
        let own = self.store.installation();
        if ack.installation.as_deref() != Some(own) {
            let theirs = ack.installation.as_deref().unwrap_or("none");
            self.unverified(
                "tx_ack",
                "other_installation",
                &format!("for installation {theirs}, this is {own}"),
            );
            return Ok(0);
        }
        self.on_tx_ack(ack.through_seq)
    }

    /// The controllers committed every gate_seq up to `through`: drop them from the outbox.
    pub fn on_tx_ack(&self, through: u64) -> Result<usize, StoreError> {
        let n = match self.store.ack(through) {
            Err(StoreError::AckBeyondLastSeq { through, last }) => {
                tracing::warn!(through, last, "tx/ack above the last gate_seq used: refused");
                self.metrics.malformed("tx_ack_beyond_last_seq");
                self.event(
                    AlarmKind::AckBeyondLastSeq,
                    false,
                    Some(format!("through {through}, last {last}")),
                );
                return Ok(0);
            }
            Err(e) => {
                if e.is_fault() {
                    self.storage_fault("ack", &e);
                }
                return Err(e);
            }
            Ok(n) => n,
        };
        self.metrics.acked_seq.fetch_max(through, Ordering::Relaxed);
        self.update_outbox_metrics();
        Ok(n)
    }

    /// A new mode message: ignore a stale one; a scheduled future start
    /// ([`mode_start_delay`]) waits for a local timer (the current modes stay in force until it
    /// fires, a newer message supersedes it); anything else is in force on receipt.
    pub async fn apply_mode(self: &Arc<Self>, msg: ModeMessage) -> Result<(), StoreError> {
        let held = self.modes.read().unwrap_or_else(|p| p.into_inner()).0;
        {
            let mut scheduled = self.scheduled_mode.lock().unwrap_or_else(|p| p.into_inner());
            let waiting = scheduled.as_ref().map_or(0, |m| m.version);
            if msg.version < held.max(waiting) {
                tracing::debug!(version = msg.version, held, waiting, "stale mode message ignored");
                return Ok(());
            }
            match mode_start_delay(&msg, now()) {
                Some(delay) if msg.version > held => {
                    tracing::info!(bits = %msg.bits, version = msg.version, ?delay, "station mode scheduled");
                    *scheduled = Some(msg.clone());
                    let gate = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let due = {
                            let mut s = gate.scheduled_mode.lock().unwrap_or_else(|p| p.into_inner());
                            if s.as_ref().is_some_and(|m| m.version == msg.version) {
                                s.take()
                            } else {
                                None
                            }
                        };
                        if let Some(m) = due {
                            if let Err(e) = gate.apply_mode_now(m).await {
                                tracing::warn!(error = %e, "scheduled mode not applied");
                            }
                        }
                    });
                    return Ok(());
                }
                _ => *scheduled = None,
            }
        }
        self.apply_mode_now(msg).await
    }

    /// Puts a mode message in force now: swap the mode state, drive the outputs, then persist it.
    /// Free passage never waits on storage: a write that fails is retried by
    /// [`Gate::storage_tick`] (the mode is in force meanwhile; only a restart before the retry
    /// would start from the older stored mode until the retained one arrives again).
    async fn apply_mode_now(&self, msg: ModeMessage) -> Result<(), StoreError> {
        {
            let held = self.modes.read().unwrap_or_else(|p| p.into_inner()).0;
            // Version 0 (no mode change numbered yet) is stale once any numbered one was taken: a
            // replayed genuine message from before the first change must not undo a release.
            if msg.version < held {
                tracing::debug!(version = msg.version, held, "stale mode message ignored");
                return Ok(());
            }
        }
        let state = mode_state_received(self.station_code, &msg, now());
        tracing::info!(bits = %msg.bits, version = msg.version, "station mode");
        *self.modes.write().unwrap_or_else(|p| p.into_inner()) = (msg.version, Arc::new(state), msg.bits);
        self.sync_outputs().await;
        let store = self.store.clone();
        let bytes = wire::encode(&msg);
        let written = tokio::task::spawn_blocking(move || store.put_state("mode", &bytes))
            .await
            .map_err(|e| StoreError::Batch(format!("mode write task failed: {e}")))
            .and_then(|r| r);
        let mut pending = self.unpersisted_mode.lock().unwrap_or_else(|p| p.into_inner());
        match written {
            Ok(()) => {
                *pending = None;
                Ok(())
            }
            Err(e) => {
                *pending = Some(msg);
                drop(pending);
                self.storage_fault("mode", &e);
                Ok(())
            }
        }
    }

    /// Whether the agent holds the flaps open (modes, controller loss; the hard-wired emergency
    /// input is handled by the PLC task on its own).
    pub fn free_passage(&self) -> bool {
        self.free_passage.load(Ordering::Relaxed)
    }

    /// Called about once a second with how long the controllers have been unreachable (`None`
    /// while connected): frees the passage past the gate_config limit, restores it on return.
    pub async fn controller_loss(&self, for_how_long: Option<std::time::Duration>) {
        let limit = self.params.in_force(now()).gate_config.release_on_controller_loss_secs;
        let lost = match (limit, for_how_long) {
            (Some(l), Some(d)) => d.as_secs() >= l,
            _ => false,
        };
        if lost != self.controller_lost.swap(lost, Ordering::Relaxed) {
            if lost {
                tracing::warn!(?for_how_long, "controllers lost too long: freeing the passage");
            } else {
                tracing::info!("controllers back: passage restored");
            }
            self.event(AlarmKind::ControllerLost, !lost, None);
            self.sync_outputs().await;
        }
    }

    /// Applies the gate_config in force (direction) to the settings and the PLC.
    pub async fn apply_gate_config(&self) {
        let cfg = self.params.in_force(now()).gate_config.clone();
        if let Some(d) = cfg.direction {
            self.settings.lock().unwrap_or_else(|p| p.into_inner()).direction = d;
        }
        self.sync_outputs().await;
    }

    /// QR codes used at other gates of the station (the station's signed relay): remember each in
    /// its gate's share of the replay cache. An entry expiring later than its issuer's longest
    /// validity allows is refused (counted): no real code lives that long. Returns how many
    /// entries were refused.
    pub fn on_qr_used(&self, batch: &QrUsedBatch) -> usize {
        let at = now();
        let keys = self.params.in_force(at).qr_keys.clone();
        let mut refused = 0;
        let mut replay = self.replay.lock().unwrap_or_else(|p| p.into_inner());
        for u in batch.entries.iter().filter(|u| u.gate != self.gate) {
            if !keys.plausible_expiry(u.issuer, u.expires_at, at, self.qr_skew) {
                refused += 1;
                continue;
            }
            replay.insert_seen(
                &ReplaySource::Gate(u.gate.clone()),
                ReplayKey { issuer: u.issuer, account: u.account, nonce: u.nonce },
                u.expires_at,
                at,
            );
        }
        drop(replay);
        if refused > 0 {
            self.metrics.malformed("qr_used_expiry");
            tracing::warn!(
                refused,
                "relayed used QR codes expiring beyond their issuer's maximum validity refused"
            );
        }
        refused
    }

    /// Whether a QR code is remembered as used (tests and diagnostics).
    pub fn qr_used_known(&self, key: &ReplayKey) -> bool {
        self.replay.lock().unwrap_or_else(|p| p.into_inner()).contains(key, now())
    }

    /// Codes held in the replay cache for `source`, and the evictions so far.
    pub fn replay_stats(&self, source: &ReplaySource) -> (usize, u64) {
        let r = self.replay.lock().unwrap_or_else(|p| p.into_inner());
        (r.held_by(source), r.evictions())
    }

    /// Takes a command for execution at most once: `Err(answer)` when it must not run (another
    /// gate's, already taken, expired, memory full, or it could not be recorded durably).
    fn take_command(&self, cmd: &Command) -> Result<(), CommandAck> {
        let ack = |result, detail: String| CommandAck { id: cmd.id.clone(), result, detail: Some(detail) };
        if cmd.gate != self.gate {
            self.unverified("cmd", "other_gate", &format!("command {} for gate {}", cmd.id, cmd.gate));
            return Err(ack(
                CommandResult::Rejected,
                format!("command for gate {}, this is {}", cmd.gate, self.gate),
            ));
        }
        let at = now();
        let mut commands = self.commands.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = commands.get(&cmd.id) {
            return Err(match r.result {
                Some(result) => ack(result, "already executed".into()),
                None => {
                    ack(CommandResult::Rejected, "already received before a restart; not run again".into())
                }
            });
        }
        if cmd.is_expired(at) {
            return Err(CommandAck { id: cmd.id.clone(), result: CommandResult::Expired, detail: None });
        }
        let forget: Vec<String> = commands
            .iter()
            .filter(|(_, r)| r.expires_at.0.saturating_add(COMMAND_KEPT_AFTER_EXPIRY_MS) < at.0)
            .map(|(id, _)| id.clone())
            .collect();
        if !forget.is_empty() {
            match self.store.remove_commands(forget.iter().map(String::as_str)) {
                Ok(()) => commands.retain(|id, _| !forget.contains(id)),
                Err(e) => tracing::warn!(error = %e, "cannot forget old commands now"),
            }
        }
        if commands.len() >= COMMAND_MEMORY {
            return Err(ack(
                CommandResult::Rejected,
                format!("{COMMAND_MEMORY} unexpired commands remembered already"),
            ));
        }
        let r = Remembered { expires_at: cmd.expires_at, result: None };
        // Durable before it runs: after a crash it is known as taken and never runs again.
        if let Err(e) = self.store.put_command(&cmd.id, &serde_json::to_vec(&r).unwrap_or_default()) {
            if e.is_fault() {
                self.storage_fault("command", &e);
            }
            return Err(ack(CommandResult::Failed, format!("cannot record the command: {e}")));
        }
        commands.insert(cmd.id.clone(), r);
        Ok(())
    }

    /// Records how a taken command went (best effort: without it a redelivery is refused, never run).
    fn command_done(&self, cmd: &Command, result: CommandResult) {
        let r = Remembered { expires_at: cmd.expires_at, result: Some(result) };
        if let Err(e) = self.store.put_command(&cmd.id, &serde_json::to_vec(&r).unwrap_or_default()) {
            tracing::warn!(id = %cmd.id, error = %e, "cannot record a command's result");
        }
        self.commands.lock().unwrap_or_else(|p| p.into_inner()).insert(cmd.id.clone(), r);
    }

    /// Executes an operator command (already verified as the station's) at most once per id, across
    /// restarts, and says how it went. A redelivered id is answered with its first result and the
    /// detail `already executed`; a command naming another gate is `rejected`.
    pub async fn command(&self, cmd: &Command) -> CommandAck {
        if let Err(answer) = self.take_command(cmd) {
            return answer;
        }
        let ack = self.execute(cmd).await;
        self.command_done(cmd, ack.result);
        ack
    }

    async fn execute(&self, cmd: &Command) -> CommandAck {
        let ack = |result, detail: Option<String>| CommandAck { id: cmd.id.clone(), result, detail };
        tracing::info!(id = %cmd.id, command = cmd.command.as_str(), "operator command");
        let result = match cmd.command {
            CommandKind::OpenOnceEntry | CommandKind::OpenOnceExit => {
                let aisle = if cmd.command == CommandKind::OpenOnceEntry {
                    Direction::Entry
                } else {
                    Direction::Exit
                };
                if self.mode_bits().has(ModeBits::EMERGENCY_RELEASE) {
                    return ack(
                        CommandResult::Rejected,
                        Some("flaps are held open by emergency release".into()),
                    );
                }
                self.plc.open(aisle, Reason::Ok.code(), 0).await
            }
            CommandKind::SetDirection { direction } => {
                self.settings.lock().unwrap_or_else(|p| p.into_inner()).direction = direction;
                self.plc.set_direction(direction).await
            }
            CommandKind::OutOfService | CommandKind::InService => {
                let on = cmd.command == CommandKind::OutOfService;
                self.settings.lock().unwrap_or_else(|p| p.into_inner()).in_service = !on;
                self.plc.set_out_of_service(on).await
            }
        };
        match result {
            Ok(()) => ack(CommandResult::Ok, None),
            Err(e) => ack(CommandResult::Failed, Some(e.to_string())),
        }
    }
}

/// The mode state a message received at `received` (gate clock) describes, for deciding taps:
/// a change takes effect on receipt at the latest. The message's times are the API node's
/// clock; for this station every period of its history is ended by `min(since, received)` and
/// the current bits start there, so a gate whose clock is behind does not wait for its clock to
/// reach `since` (and one ahead already has it). Other stations' periods are kept as sent.
pub fn mode_state_received(station: StationCode, m: &ModeMessage, received: Timestamp) -> ModeState {
    let from = m.since.min(received);
    let mut s = ModeState { periods: m.history.clone() };
    for p in s.periods.iter_mut().filter(|p| p.station == station) {
        let until = p.until.map_or(from, |u| u.min(from));
        p.from = p.from.min(until);
        p.until = Some(until);
    }
    s.set(station, m.bits, from);
    s
}

/// How long after its receipt at `received` (gate clock) a mode message is to take effect;
/// `None`: at once. Only a scheduled change waits: one whose `since` lies after its `decided_at`
/// (both the controllers' clock). It waits `min(since - decided_at, since - received)`: the lead
/// the controllers meant, never more because the gate's clock is behind, less when the message
/// arrives late (a retained one after a reconnect) or the gate's clock is ahead. A change that
/// sets emergency release is never held back (free passage early is the safe side). The wait runs
/// on the monotonic clock, so a clock jump meanwhile does not move it.
pub fn mode_start_delay(m: &ModeMessage, received: Timestamp) -> Option<std::time::Duration> {
    let decided = m.decided_at?;
    if m.bits.has(ModeBits::EMERGENCY_RELEASE) {
        return None;
    }
    let lead = m.since.0.saturating_sub(decided.0);
    let by_gate_clock = m.since.0.saturating_sub(received.0);
    let ms = lead.min(by_gate_clock);
    (ms > 0).then(|| std::time::Duration::from_millis(ms.unsigned_abs()))
}

/// The mode state a message describes: its history, then the current bits of this station.
pub fn mode_state(station: StationCode, m: &ModeMessage) -> ModeState {
    let mut s = ModeState { periods: m.history.clone() };
    s.set(station, m.bits, m.since);
    s
}

/// The decision of a re-tap let through after its voided passage `v`: open, nothing charged,
/// nothing written, the balances and the entry as the card carries them since the voided tap.
fn retap_decision(tap: &TapRequest, v: &Voided, bits: ModeBits) -> Decision {
    let r = &v.record;
    let entry = match (r.entry_station, r.entry_time) {
        (Some(station), Some(time)) => Some(EntryRecord { station, time }),
        _ => None,
    };
    Decision {
        kind: match tap.direction {
            Direction::Entry => DecisionKind::OpenEntry,
            Direction::Exit => DecisionKind::OpenExit,
        },
        reason: Reason::OkRetapAfterFailedPassage,
        media: r.media,
        id: r.id,
        direction: tap.direction,
        fare_fen: 0,
        shortfall_fen: 0,
        balance_before: r.balance_after,
        balance_after: r.balance_after,
        card_write: None,
        entry,
        modes: bits,
        qr: None,
        replay_unchecked: false,
        bank: r.bank,
    }
}

/// An accepted stored-value decision its PSAM did not sign, refused for `reason` as the engine
/// refuses: nothing charged (`fare_fen` is the fare that was due, as shown), nothing written to
/// the card (no balance after, no counter), no shortfall.
fn psam_refusal(d: Decision, reason: Reason) -> Decision {
    Decision {
        kind: DecisionKind::Reject,
        reason,
        shortfall_fen: 0,
        balance_after: None,
        card_write: None,
        // An entry's record names the entry it would have written; a refused one writes none.
        entry: if d.direction == Direction::Entry { None } else { d.entry },
        ..d
    }
}

/// The record a tap would produce, for tests that check what was stored.
pub fn decode_record(bytes: &[u8]) -> Option<TxRecord> {
    TxRecord::from_canonical(bytes).ok()
}
