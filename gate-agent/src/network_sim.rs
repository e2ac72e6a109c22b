//! Simulated passengers of a network of stations (`station --stations N`): each holds one medium
//! (a Mingzhu card, a phone carrying one, a QR account, a bank card, or single-journey tokens it
//! buys), taps in at a gate of one station and, later, out at a gate of another, the medium's
//! state carried between the two stations as the real one is. The passenger model here is pure
//! (no I/O); `cli::network_sim` drives it over the gates' reader ports.

use afc_domain::bank::{BankToken, Cryptogram};
use afc_domain::model::{BusinessDayRule, CardType, Date, Direction, StationCode, Timestamp};
use afc_domain::qr::{self, QrIssue};
use afc_domain::wire::{BankCard, DecisionKind, ReaderResponse, SvcCard, TapMedia, TapRequest, TokenCard};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::reader_sim::{QrIssuer, CARD_BASE};

/// One gate's reader in the network.
#[derive(Debug, Clone)]
pub struct NetworkGate {
    pub station: StationCode,
    pub addr: std::net::SocketAddr,
    /// The id of the simulated PSAM in this reader (`None`: a one-phase reader).
    pub psam_id: Option<u64>,
}

/// What a passenger taps with.
#[derive(Debug, Clone)]
pub enum Holding {
    /// A stored-value card (or a phone carrying one), as the last reader wrote it.
    Card(SvcCard),
    Qr {
        account: u64,
    },
    Bank {
        token: BankToken,
        atc: u16,
    },
    /// A single-journey token while the passenger has one (bought at the entry station).
    Token(Option<TokenCard>),
}

/// One simulated passenger.
#[derive(Debug, Clone)]
pub struct Passenger {
    pub holding: Holding,
    /// The index (in the network's stations) of the station the passenger is inside, if any.
    pub inside: Option<usize>,
}

/// The passengers of a network and where they tap next.
pub struct NetworkSim {
    rng: StdRng,
    pub stations: Vec<StationCode>,
    pub gates: Vec<NetworkGate>,
    pub passengers: Vec<Passenger>,
    qr: Option<QrIssuer>,
    next_nonce: u64,
    next_token: u64,
}

/// What a token costs at the machine: enough for any Dalian journey.
pub const TOKEN_PAID_FEN: u32 = 1_000;

impl NetworkSim {
    /// `passengers` passengers (about 60 % cards and phones, 15 % QR, 15 % bank, 10 % tokens)
    /// over `gates`; QR passengers only with an issuer key.
    pub fn new(seed: u64, gates: Vec<NetworkGate>, passengers: usize, qr: Option<QrIssuer>) -> NetworkSim {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut stations: Vec<StationCode> = gates.iter().map(|g| g.station).collect();
        stations.dedup();
        stations.sort_unstable();
        stations.dedup();
        let passengers = (0..passengers as u64)
            .map(|i| {
                let roll = rng.gen_range(0..100);
                let holding = match roll {
                    _ if roll < 60 || (qr.is_none() && roll < 75) => Holding::Card(SvcCard {
                        // A range of its own, apart from the per-gate readers' cards.
                        card_id: CARD_BASE + 5_000_000 + i,
                        card_type: if roll % 10 == 0 { CardType::STUDENT } else { CardType::ORDINARY },
                        balance_fen: rng.gen_range(2_000..20_000),
                        expiry: Date::from_ymd(2031, 12, 31).unwrap_or_default(),
                        tx_counter: rng.gen_range(0..500),
                        entry: None,
                    }),
                    60..=74 => Holding::Qr { account: 9_900_000 + i },
                    75..=89 => {
                        let mut token = [0u8; 32];
                        rng.fill(&mut token[..]);
                        Holding::Bank { token: BankToken(token), atc: rng.gen_range(1..1000) }
                    }
                    _ => Holding::Token(None),
                };
                Passenger { holding, inside: None }
            })
            .collect();
        NetworkSim { rng, stations, gates, passengers, qr, next_nonce: seed << 32, next_token: 70_000_000 }
    }

    /// The next tap at `now`: which passenger, at which gate (an index in `gates`), and the tap.
    /// A passenger outside taps in at any gate; one inside taps out at a gate of another station
    /// (or of the same one when the network has a single station).
    pub fn next_tap(&mut self, now: Timestamp) -> Option<(usize, usize, TapRequest)> {
        if self.passengers.is_empty() || self.gates.is_empty() {
            return None;
        }
        let p = self.rng.gen_range(0..self.passengers.len());
        let inside = self.passengers[p].inside;
        let choices: Vec<usize> = (0..self.gates.len())
            .filter(|g| match inside {
                Some(s) if self.stations.len() > 1 => self.gates[*g].station != self.stations[s],
                _ => true,
            })
            .collect();
        let gate = choices[self.rng.gen_range(0..choices.len())];
        let station = self.gates[gate].station;
        let direction = if inside.is_some() { Direction::Exit } else { Direction::Entry };
        self.next_nonce += 1;
        let nonce = self.next_nonce;
        let media = match &mut self.passengers[p].holding {
            Holding::Card(card) => TapMedia::Svc { card: card.clone() },
            Holding::Qr { account } => {
                let q = self.qr.as_ref()?;
                let issue = QrIssue {
                    issuer: q.issuer,
                    key_id: q.key_id,
                    account: *account,
                    issued_at: now.plus_minutes(-1),
                    valid_secs: 120,
                    nonce,
                };
                TapMedia::Qr { code: qr::encode_text(&qr::generate(&issue, &q.key)) }
            }
            Holding::Bank { token, atc } => {
                *atc = atc.wrapping_add(1);
                let bank = BankCard {
                    token: *token,
                    expiry: Date::from_ymd(2030, 6, 30).unwrap_or_default(),
                    oda_passed: true,
                    cryptogram: Cryptogram(nonce.to_be_bytes()),
                    atc: *atc,
                };
                TapMedia::Bank { bank }
            }
            Holding::Token(held) => {
                let token = match held {
                    Some(t) => t.clone(),
                    None => {
                        self.next_token += 1;
                        TokenCard {
                            token_id: self.next_token,
                            origin: station,
                            paid_fen: TOKEN_PAID_FEN,
                            sold_on: BusinessDayRule::default().business_day(now),
                            entry: None,
                        }
                    }
                };
                *held = Some(token.clone());
                TapMedia::Token { token }
            }
        };
        Some((p, gate, TapRequest { direction, media }))
    }

    /// Applies the gate's answer to passenger `p`'s medium and whereabouts, as a reader and a
    /// passenger do: a card gets the write; an accepted entry puts the passenger inside that
    /// station, an accepted exit outside (a token is kept by the exit gate); a refused exit sends
    /// the passenger to the service desk, which lets them out and sorts the medium out.
    pub fn apply(&mut self, p: usize, gate: usize, response: &ReaderResponse) {
        let station = self.stations.iter().position(|s| *s == self.gates[gate].station);
        let Some(passenger) = self.passengers.get_mut(p) else { return };
        let accepted = response.decision != DecisionKind::Reject;
        let entering = passenger.inside.is_none();
        match &mut passenger.holding {
            Holding::Card(card) => {
                if let Some(w) = response.card_write {
                    (card.balance_fen, card.tx_counter, card.entry) = (w.balance_fen, w.tx_counter, w.entry);
                } else if !accepted {
                    card.entry = None;
                    card.balance_fen = card.balance_fen.max(5_000);
                }
            }
            Holding::Token(held) => match (accepted, entering, response.card_write) {
                (true, true, Some(w)) => {
                    if let Some(t) = held.as_mut() {
                        t.entry = w.entry;
                    }
                }
                // Kept by the exit gate, or refused: the passenger buys a new one next time.
                _ => *held = None,
            },
            Holding::Qr { .. } | Holding::Bank { .. } => {}
        }
        passenger.inside = match (accepted, entering) {
            (true, true) => station,
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use afc_domain::wire::CardWrite;

    fn gates() -> Vec<NetworkGate> {
        [(113, 7701), (113, 7702), (105, 8701)]
            .into_iter()
            .map(|(c, port)| NetworkGate {
                station: StationCode(c),
                addr: ([127, 0, 0, 1], port).into(),
                psam_id: None,
            })
            .collect()
    }

    fn open(direction: Direction, write: Option<CardWrite>) -> ReaderResponse {
        ReaderResponse {
            decision: if direction == Direction::Entry {
                DecisionKind::OpenEntry
            } else {
                DecisionKind::OpenExit
            },
            reason: afc_domain::model::Reason::Ok,
            fare_fen: 0,
            card_write: write,
            gate_seq: Some(1),
        }
    }

    #[test]
    fn a_passenger_who_entered_at_one_station_leaves_at_another_with_the_medium_as_written() {
        let mut sim = NetworkSim::new(3, gates(), 50, None);
        let now = Timestamp::from_secs(1_796_176_800);
        let mut crossed = 0;
        for _ in 0..2_000 {
            let (p, g, tap) = sim.next_tap(now).unwrap();
            let before = sim.passengers[p].inside;
            match before {
                None => assert_eq!(tap.direction, Direction::Entry),
                Some(s) => {
                    assert_eq!(tap.direction, Direction::Exit);
                    assert_ne!(sim.gates[g].station, sim.stations[s], "an exit at another station");
                    crossed += 1;
                }
            }
            let write = match &tap.media {
                TapMedia::Svc { card } => Some(CardWrite {
                    balance_fen: card.balance_fen.saturating_sub(100),
                    tx_counter: card.tx_counter + 1,
                    entry: None,
                    retain: false,
                }),
                _ => None,
            };
            sim.apply(p, g, &open(tap.direction, write));
            if let (TapMedia::Svc { card }, Holding::Card(now_held)) =
                (&tap.media, &sim.passengers[p].holding)
            {
                assert_eq!(now_held.tx_counter, card.tx_counter + 1, "the reader's write is kept");
            }
        }
        assert!(crossed > 100, "{crossed} journeys crossed stations");
        // No QR issuer: nobody holds a QR account; bank cards and tokens are there.
        assert!(sim.passengers.iter().all(|p| !matches!(p.holding, Holding::Qr { .. })));
        assert!(sim.passengers.iter().any(|p| matches!(p.holding, Holding::Bank { .. })));
    }
}
