//! The stored-value card the decision and gate tests tap: a Mingzhu card with a balance, a
//! transaction counter of [`TX_COUNTER`] and an expiry in 2035, optionally already entered.

use afc_domain::model::{CardType, Date, StationCode, Timestamp};
use afc_domain::wire::{EntryRecord, SvcCard};

/// The card's transaction counter before the tap (the tap writes one more).
pub const TX_COUNTER: u32 = 41;

/// Card `card_id` of `card_type` holding `balance_fen`, entered at `entry` if given.
pub fn svc(
    card_id: u64,
    card_type: CardType,
    balance_fen: u32,
    entry: Option<(StationCode, Timestamp)>,
) -> SvcCard {
    SvcCard {
        card_id,
        card_type,
        balance_fen,
        #[allow(clippy::unwrap_used)]
        expiry: Date::from_ymd(2035, 1, 1).unwrap(),
        tx_counter: TX_COUNTER,
        entry: entry.map(|(station, time)| EntryRecord { station, time }),
    }
}

/// A tap of the bank card (or phone) with payment token `token`: valid through June 2031, its
/// offline data authentication passed, the cryptogram derived from the card's counter `atc`.
pub fn bank_tap(
    direction: afc_domain::model::Direction,
    token: afc_domain::bank::BankToken,
    atc: u16,
) -> afc_domain::wire::TapRequest {
    use afc_domain::wire::{BankCard, TapMedia, TapRequest};
    let bank = BankCard {
        token,
        #[allow(clippy::unwrap_used)]
        expiry: Date::from_ymd(2031, 6, 30).unwrap(),
        oda_passed: true,
        cryptogram: afc_domain::bank::Cryptogram([atc as u8; 8]),
        atc,
    };
    TapRequest { direction, media: TapMedia::Bank { bank } }
}
