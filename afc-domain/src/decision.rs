//! The tap decision (SPEC §2–3): a pure function of (tap, parameters in force, mode state, now).
//!
//! A gate calls [`decide`] for every tap. It reads the parameters, the mode history and the clock it
//! is given, and touches nothing else but the QR replay cache (a QR code is single-use within its
//! validity window, so remembering it is part of deciding). The result says whether the flaps open,
//! why (a [`Reason`] the display and the ledger share), what is charged, and what the reader must
//! write back to the card. Building the ledger record from it is [`Decision::to_record`].
//!
//! Order of checks, as a metro operator expects them:
//! 1. station modes that bypass card processing: emergency_release (open), closed (refuse),
//!    entry_free at entry (open);
//! 2. the medium's validity: QR signature and window; blacklist; card type; expiry; token station
//!    and business day;
//! 3. sequence (anti-passback, entry record), then fare and balance.
//!
//! Interpretations where SPEC §3 is silent, each tested:
//! - The discount applies to every fare, the minimum fare included: the entry balance check, a
//!   same-station exit and an exit without entry under sequence_free all use the card type's
//!   discounted minimum fare.
//! - The overstay surcharge is added after the discount and is not discounted; it is waived under
//!   time_free and when the entry station was under emergency release since the entry. The
//!   ride time (this gate's clock minus the entry gate's) must exceed the limit by more than the
//!   clock tolerance (`qr_skew`) before the surcharge applies.
//! - At an exit with no entry record, every station that had entry_free within the lookback window
//!   (the fare table's `max_ride_minutes`, else one day) is a possible origin; the cheapest applies.
//! - QR codes carry no entry state: the gate opens on a valid, unused code and records the tap;
//!   clearing pairs entries and exits and charges the account, so the gate's fare for QR is 0.
//! - Under hours_24 a token stays valid into the next business day (the night did not roll over).
//! - Bank cards (medium `bank`) carry no entry state either and are never written: the gate checks
//!   the deny list (the blacklist's `bank` ids), the expiry and the offline data authentication,
//!   opens within the unpaid-tap limit ([`BankRisk`]) and records the tap with its cryptogram;
//!   clearing pairs entry and exit and charges the journey, so the gate's fare is 0. An exit is
//!   never refused for the limit (the passenger is inside). An exit cannot show the journey's fare:
//!   the card holds no entry, and the entry may have been at another station.

use crate::bank::{BankRef, BankRisk};
use crate::blacklist::Blacklist;
use crate::fare::FareTable;
use crate::ledger::{ParamVersions, QrRef, TxRecord};
use crate::mode::{ModeBits, ModeState};
use crate::model::{Direction, Ident, Media, Reason, StationCode, Timestamp};
use crate::qr::{self, QrClaims, QrKeySet, QrSkew, ReplayCache};
use crate::wire::{BankCard, CardWrite, DecisionKind, EntryRecord, SvcCard, TapMedia, TapRequest, TokenCard};

/// How far back an entry_free period counts for an exit without entry when the fare table has no
/// ride-time limit.
pub const ENTRY_FREE_LOOKBACK_MINUTES: i64 = 24 * 60;

/// The parameters in force at a gate when it decides.
#[derive(Debug, Clone, Copy)]
pub struct Params<'a> {
    /// The station this gate belongs to: entries are recorded here, exits priced to here.
    pub station: StationCode,
    pub fares: &'a FareTable,
    pub blacklist: &'a Blacklist,
    pub qr_keys: &'a QrKeySet,
    /// Tolerated clock difference between QR issuers and this gate, and between the entry gate
    /// (the card's entry time) and this one for the ride-time limit.
    pub qr_skew: QrSkew,
    /// Accepted taps one bank token may make per business day at this gate before an entry is
    /// refused (`gate_config.bank_unpaid_taps_per_day`).
    pub bank_taps_per_day: u16,
}

/// The outcome of one tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub kind: DecisionKind,
    pub reason: Reason,
    pub media: Media,
    /// Card number, QR account, token serial or bank deny key (0 when a QR code could not be read
    /// at all).
    pub id: u64,
    pub direction: Direction,
    /// Fen taken by this tap (svc: from the card balance; token: the fare the paid value covered;
    /// qr: 0, clearing charges the account).
    pub fare_fen: u32,
    /// Fen the passenger should have paid but did not (fare_free), for clearing.
    pub shortfall_fen: u32,
    pub balance_before: Option<u32>,
    pub balance_after: Option<u32>,
    /// What the reader must write back to the card or token; `None` when nothing changes.
    pub card_write: Option<CardWrite>,
    /// The entry this tap created (entry) or was priced from (exit).
    pub entry: Option<EntryRecord>,
    /// The mode bits in force at this station.
    pub modes: ModeBits,
    /// The verified QR claims, so the gate can share the used code station-wide.
    pub qr: Option<QrClaims>,
    /// The replay cache was full, so single use of this QR code could not be guaranteed here:
    /// the transaction is flagged for clearing's duplicate check.
    pub replay_unchecked: bool,
    /// A bank tap's token, cryptogram and counter, for the record.
    pub bank: Option<BankRef>,
}

impl Decision {
    pub fn accepted(&self) -> bool {
        self.kind != DecisionKind::Reject
    }

    /// The ledger record of this decision, as the gate stores it in its outbox.
    pub fn to_record(
        &self,
        station: &Ident,
        gate: &Ident,
        gate_seq: u64,
        params: ParamVersions,
        occurred_at: Timestamp,
    ) -> TxRecord {
        TxRecord {
            station: station.clone(),
            gate: gate.clone(),
            gate_seq,
            media: self.media,
            id: self.id,
            direction: self.direction,
            accepted: self.accepted(),
            reason: self.reason,
            fare_fen: self.fare_fen,
            shortfall_fen: self.shortfall_fen,
            balance_before: self.balance_before,
            balance_after: self.balance_after,
            // Only stored-value cards keep a transaction counter.
            card_tx_counter: self
                .card_write
                .as_ref()
                .filter(|_| self.media == Media::Svc)
                .map(|w| w.tx_counter),
            entry_station: self.entry.map(|e| e.station),
            entry_time: self.entry.map(|e| e.time),
            occurred_at,
            modes: self.modes,
            params,
            replay_unchecked: self.replay_unchecked,
            qr: self.qr.map(|c| QrRef { issuer: c.issuer, nonce: c.nonce }),
            installation: None,
            voids: None,
            bank: self.bank,
            tac: None,
        }
    }
}

/// Decides one tap. Never panics and never fails: every problem is a reject with its reason.
/// `replay` and `bank` are the gate's memory of used QR codes and of bank taps today.
pub fn decide(
    tap: &TapRequest,
    p: &Params<'_>,
    modes: &ModeState,
    now: Timestamp,
    replay: &mut ReplayCache,
    bank: &mut BankRisk,
) -> Decision {
    let bits = modes.bits_at(p.station, now);
    let (media, id) = media_and_id(&tap.media);
    let base = Decision {
        kind: DecisionKind::Reject,
        reason: Reason::Ok,
        media,
        id,
        direction: tap.direction,
        fare_fen: 0,
        shortfall_fen: 0,
        balance_before: None,
        balance_after: None,
        card_write: None,
        entry: None,
        modes: bits,
        qr: None,
        replay_unchecked: false,
        // Kept whatever the modes decide: clearing pairs a bank card's journey by its token, so
        // an entry under entry_free or an exit under emergency release must still name it.
        bank: match &tap.media {
            TapMedia::Bank { bank } => {
                Some(BankRef { token: bank.token, cryptogram: bank.cryptogram, atc: bank.atc })
            }
            _ => None,
        },
    };
    if bits.has(ModeBits::EMERGENCY_RELEASE) {
        return base.open(Reason::OkEmergencyRelease);
    }
    if bits.has(ModeBits::CLOSED) {
        return base.reject(Reason::StationClosed);
    }
    if tap.direction == Direction::Entry && bits.has(ModeBits::ENTRY_FREE) {
        return base.open(Reason::OkEntryFree);
    }
    let ctx = Ctx { p, modes, now, bits };
    match &tap.media {
        TapMedia::Svc { card } => ctx.svc(card, base),
        TapMedia::Qr { code } => ctx.qr(code, base, replay),
        TapMedia::Token { token } => ctx.token(token, base),
        TapMedia::Bank { bank: card } => ctx.bank(card, base, bank),
    }
}

/// The mode state a gate decides a tap with, given its hard-wired emergency input: while the input
/// holds the flaps open, `modes` plus emergency release at `station` from `now` on, so the tap
/// follows the emergency rules (opens with `ok_emergency_release`, nothing charged, the card left
/// as it is, the record's modes say emergency_release); otherwise `modes` as they are (borrowed:
/// the usual tap costs no copy).
pub fn with_emergency_input(
    modes: &ModeState,
    station: StationCode,
    now: Timestamp,
    emergency_input: bool,
) -> std::borrow::Cow<'_, ModeState> {
    if !emergency_input {
        return std::borrow::Cow::Borrowed(modes);
    }
    let mut m = modes.clone();
    m.periods.push(crate::mode::ModePeriod {
        station,
        bits: ModeBits::EMERGENCY_RELEASE,
        from: now,
        until: None,
    });
    std::borrow::Cow::Owned(m)
}

fn media_and_id(m: &TapMedia) -> (Media, u64) {
    match m {
        TapMedia::Svc { card } => (Media::Svc, card.card_id),
        TapMedia::Qr { .. } => (Media::Qr, 0),
        TapMedia::Token { token } => (Media::Token, token.token_id),
        TapMedia::Bank { bank } => (Media::Bank, bank.token.deny_key()),
    }
}

impl Decision {
    fn open(mut self, reason: Reason) -> Decision {
        self.kind = match self.direction {
            Direction::Entry => DecisionKind::OpenEntry,
            Direction::Exit => DecisionKind::OpenExit,
        };
        self.reason = reason;
        self
    }

    fn reject(mut self, reason: Reason) -> Decision {
        self.kind = DecisionKind::Reject;
        self.reason = reason;
        self
    }
}

/// What one decision reads, gathered once.
struct Ctx<'a, 'p> {
    p: &'a Params<'p>,
    modes: &'a ModeState,
    now: Timestamp,
    bits: ModeBits,
}

impl Ctx<'_, '_> {
    fn svc(&self, card: &SvcCard, mut d: Decision) -> Decision {
        let fares = self.p.fares;
        d.balance_before = Some(card.balance_fen);
        if self.p.blacklist.contains(Media::Svc, card.card_id) {
            return d.reject(Reason::Blacklisted);
        }
        let Some(min_fare) = fares.min_fare_for(card.card_type) else {
            return d.reject(Reason::CardTypeNotAccepted);
        };
        let Some(tx_counter) = card.tx_counter.checked_add(1) else {
            return d.reject(Reason::CardInvalid);
        };
        match d.direction {
            Direction::Entry => {
                // A card is valid through its expiry date's business day (which ends at rollover).
                let today = fares.business_day().business_day(self.now);
                if !self.bits.has(ModeBits::DATE_FREE) && card.expiry < today {
                    return d.reject(Reason::CardExpired);
                }
                let mut reason = Reason::Ok;
                if let Some(open) = card.entry {
                    if self.bits.has(ModeBits::SEQUENCE_FREE) {
                        reason = Reason::OkSequenceFree;
                    } else if self.modes.emergency_grace(open.station, open.time, self.now) {
                        reason = Reason::OkEmergencyGrace;
                    } else {
                        return d.reject(Reason::EntryExists);
                    }
                }
                if card.balance_fen < min_fare && !self.bits.has(ModeBits::FARE_FREE) {
                    d.fare_fen = min_fare;
                    return d.reject(Reason::InsufficientBalance);
                }
                let entry = EntryRecord { station: self.p.station, time: self.now };
                d.entry = Some(entry);
                d.balance_after = Some(card.balance_fen);
                d.card_write = Some(CardWrite {
                    balance_fen: card.balance_fen,
                    tx_counter,
                    entry: Some(entry),
                    retain: false,
                });
                d.open(reason)
            }
            Direction::Exit => {
                let clear_entry =
                    CardWrite { balance_fen: card.balance_fen, tx_counter, entry: None, retain: false };
                if self.bits.has(ModeBits::TRAIN_DISRUPTION) {
                    d.entry = card.entry;
                    d.balance_after = Some(card.balance_fen);
                    d.card_write = Some(clear_entry);
                    return d.open(Reason::OkTrainDisruption);
                }
                let priced = match self
                    .origin(card.entry, None, |from| fares.fare_fen(from, self.p.station, card.card_type))
                {
                    Ok(p) => p,
                    Err(reason) => return d.reject(reason),
                };
                let fare = self.with_overstay(priced.fare.unwrap_or(min_fare), priced.entry);
                d.entry = priced.entry;
                let (charge, shortfall, reason) = if card.balance_fen >= fare {
                    (fare, 0, priced.reason)
                } else if self.bits.has(ModeBits::FARE_FREE) {
                    (card.balance_fen, fare - card.balance_fen, Reason::OkFareShortfall)
                } else {
                    d.fare_fen = fare;
                    return d.reject(Reason::InsufficientBalance);
                };
                let balance_after = card.balance_fen - charge;
                d.fare_fen = charge;
                d.shortfall_fen = shortfall;
                d.balance_after = Some(balance_after);
                d.card_write = Some(CardWrite { balance_fen: balance_after, ..clear_entry });
                d.open(reason)
            }
        }
    }

    fn qr(&self, text: &str, mut d: Decision, replay: &mut ReplayCache) -> Decision {
        let claims = match qr::decode_text(text)
            .and_then(|bytes| qr::verify(&bytes, self.p.qr_keys, self.now, self.p.qr_skew))
        {
            Ok(c) => c,
            Err(e) => return d.reject(e.reason()),
        };
        d.id = claims.account;
        if self.p.blacklist.contains(Media::Qr, claims.account) {
            return d.reject(Reason::Blacklisted);
        }
        match replay.check_and_insert(&claims, self.now) {
            Ok(held) => d.replay_unchecked = !held,
            Err(e) => return d.reject(e.reason()),
        }
        if d.direction == Direction::Entry {
            d.entry = Some(EntryRecord { station: self.p.station, time: self.now });
        }
        d.qr = Some(claims);
        d.open(Reason::Ok)
    }

    fn token(&self, token: &TokenCard, mut d: Decision) -> Decision {
        let fares = self.p.fares;
        if self.p.blacklist.contains(Media::Token, token.token_id) {
            return d.reject(Reason::Blacklisted);
        }
        let date_free = self.bits.has(ModeBits::DATE_FREE);
        match d.direction {
            Direction::Entry => {
                if token.origin != self.p.station {
                    return d.reject(Reason::TokenWrongStation);
                }
                if !date_free && !self.token_valid_at(token, self.now) {
                    return d.reject(Reason::TokenExpired);
                }
                let mut reason = Reason::Ok;
                if token.entry.is_some() {
                    if !self.bits.has(ModeBits::SEQUENCE_FREE) {
                        return d.reject(Reason::TokenAlreadyEntered);
                    }
                    reason = Reason::OkSequenceFree;
                }
                let entry = EntryRecord { station: self.p.station, time: self.now };
                d.entry = Some(entry);
                d.card_write = Some(CardWrite {
                    balance_fen: token.paid_fen,
                    tx_counter: 0,
                    entry: Some(entry),
                    retain: false,
                });
                d.open(reason)
            }
            Direction::Exit => {
                let retained = CardWrite { balance_fen: 0, tx_counter: 0, entry: None, retain: true };
                if self.bits.has(ModeBits::TRAIN_DISRUPTION) {
                    d.entry = token.entry;
                    d.card_write = Some(retained);
                    return d.open(Reason::OkTrainDisruption);
                }
                // Judged at entry: a passenger who entered on the token's day may leave after the
                // rollover.
                let judged_at = token.entry.map_or(self.now, |e| e.time);
                if !date_free && !self.token_valid_at(token, judged_at) {
                    return d.reject(Reason::TokenExpired);
                }
                let Some(min_fare) = fares.token_fare_fen(self.p.station, self.p.station) else {
                    return d.reject(Reason::UnknownStation);
                };
                let priced = match self.origin(token.entry, Some(token.origin), |from| {
                    fares.token_fare_fen(from, self.p.station)
                }) {
                    Ok(p) => p,
                    Err(reason) => return d.reject(reason),
                };
                let fare = self.with_overstay(priced.fare.unwrap_or(min_fare), priced.entry);
                d.entry = priced.entry;
                let (charge, shortfall, reason) = if token.paid_fen >= fare {
                    (fare, 0, priced.reason)
                } else if self.bits.has(ModeBits::FARE_FREE) {
                    (token.paid_fen, fare - token.paid_fen, Reason::OkFareShortfall)
                } else {
                    d.fare_fen = fare;
                    return d.reject(Reason::TokenUnderpaid);
                };
                d.fare_fen = charge;
                d.shortfall_fen = shortfall;
                d.card_write = Some(retained);
                d.open(reason)
            }
        }
    }

    fn bank(&self, card: &BankCard, mut d: Decision, risk: &mut BankRisk) -> Decision {
        if self.p.blacklist.contains(Media::Bank, card.token.deny_key()) {
            return d.reject(Reason::BankDenied);
        }
        let today = self.p.fares.business_day().business_day(self.now);
        if !self.bits.has(ModeBits::DATE_FREE) && card.expiry < today {
            return d.reject(Reason::CardExpired);
        }
        if !card.oda_passed {
            return d.reject(Reason::BankAuthFailed);
        }
        let reason = match d.direction {
            Direction::Entry => {
                if risk.taps(&card.token, today) >= self.p.bank_taps_per_day {
                    return d.reject(Reason::BankUnpaidLimit);
                }
                d.entry = Some(EntryRecord { station: self.p.station, time: self.now });
                Reason::Ok
            }
            Direction::Exit if self.bits.has(ModeBits::TRAIN_DISRUPTION) => Reason::OkTrainDisruption,
            Direction::Exit => Reason::Ok,
        };
        risk.count(&card.token, today);
        d.open(reason)
    }

    /// Whether a token sold on `sold_on` is valid at `t`: on its business day, or on the next one
    /// if hours_24 was in force at its origin when the night's rollover came (the day never ended).
    fn token_valid_at(&self, token: &TokenCard, t: Timestamp) -> bool {
        let rule = self.p.fares.business_day();
        let day = rule.business_day(t);
        if day == token.sold_on {
            return true;
        }
        let next = token.sold_on.plus_days(1);
        let rollover = Timestamp::from_local(next, 0, rule.rollover_minute_of_day, rule.utc_offset_minutes);
        day == next && self.modes.bits_at(token.origin, rollover).has(ModeBits::HOURS_24)
    }

    /// Where an exiting passenger is priced from: the entry record, else an entry_free station
    /// (restricted to `only_from` for tokens, which can only have entered where they were sold),
    /// else under sequence_free the fare from `only_from` or the minimum fare, else `no_entry`.
    fn origin(
        &self,
        entry: Option<EntryRecord>,
        only_from: Option<StationCode>,
        fare_from: impl Fn(StationCode) -> Option<u32>,
    ) -> Result<Priced, Reason> {
        if let Some(e) = entry {
            let fare = fare_from(e.station).ok_or(Reason::UnknownStation)?;
            return Ok(Priced { entry: Some(e), fare: Some(fare), reason: Reason::Ok });
        }
        let lookback = self.p.fares.max_ride_minutes().map_or(ENTRY_FREE_LOOKBACK_MINUTES, i64::from);
        let mut candidates = self.modes.entry_free_stations(self.now, lookback, StationCode(u16::MAX));
        candidates.retain(|s| only_from.is_none_or(|o| o == *s));
        let cheapest = candidates.into_iter().filter_map(|s| fare_from(s).map(|f| (f, s))).min();
        if let Some((fare, station)) = cheapest {
            // The passenger entered without a tap: the time is unknown, so no overstay applies.
            let entry = EntryRecord { station, time: self.now };
            return Ok(Priced { entry: Some(entry), fare: Some(fare), reason: Reason::OkEntryFreeExit });
        }
        if self.bits.has(ModeBits::SEQUENCE_FREE) {
            // A token can only have entered where it was sold, so its fare is known.
            let fare = match only_from {
                Some(origin) => Some(fare_from(origin).ok_or(Reason::UnknownStation)?),
                None => None,
            };
            return Ok(Priced { entry: None, fare, reason: Reason::OkSequenceFree });
        }
        Err(Reason::NoEntry)
    }

    /// Adds the overstay surcharge when the ride took longer than the table allows.
    fn with_overstay(&self, fare: u32, entry: Option<EntryRecord>) -> u32 {
        let fares = self.p.fares;
        let (Some(limit), Some(e)) = (fares.max_ride_minutes(), entry) else {
            return fare;
        };
        // The entry time is the entry gate's clock, `now` this gate's: the ride counts as
        // overstayed only beyond the limit plus the clock tolerance, so two clocks that disagree
        // within it never charge a passenger who rode within the limit.
        let ride_end = Timestamp(self.now.0.saturating_sub(self.p.qr_skew.millis()));
        let overstayed = ride_end.minutes_since(e.time) > i64::from(limit);
        if !overstayed
            || self.bits.has(ModeBits::TIME_FREE)
            || self.modes.emergency_grace(e.station, e.time, self.now)
        {
            return fare;
        }
        fare.saturating_add(fares.overstay_surcharge_fen())
    }
}

/// An exit's origin and base fare; `fare: None` means "no origin, charge the minimum fare".
struct Priced {
    entry: Option<EntryRecord>,
    fare: Option<u32>,
    reason: Reason,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_emergency_input_adds_emergency_release_at_this_station_only_while_it_is_set() {
        let here = StationCode(101);
        let other = StationCode(104);
        let now = Timestamp::from_secs(1_700_000_000);
        let mut modes = ModeState::constant(other, ModeBits::ENTRY_FREE);
        modes.set(here, ModeBits::FARE_FREE, now.plus_minutes(-5));
        let off = with_emergency_input(&modes, here, now, false);
        assert!(matches!(off, std::borrow::Cow::Borrowed(_)));
        assert_eq!(off.bits_at(here, now), ModeBits::FARE_FREE);
        let on = with_emergency_input(&modes, here, now, true);
        assert_eq!(on.bits_at(here, now), ModeBits::FARE_FREE.with(ModeBits::EMERGENCY_RELEASE));
        assert_eq!(on.bits_at(other, now), ModeBits::ENTRY_FREE);
        // Only from now: the history before the input is kept as it was.
        assert!(!on.bits_at(here, now.plus_minutes(-1)).has(ModeBits::EMERGENCY_RELEASE));
    }
}
