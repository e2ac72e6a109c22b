//! A simulated card reader: a population of cards, phones and tokens that tap like passengers do.
//!
//! Stored-value cards come from a dense serial range (as issuers number them), with realistic
//! balances and concession types; a card outside the network taps in, a card inside taps out
//! (having entered at another station some minutes ago), and the reader writes back what the gate
//! returns, so the next tap of the same card sees its new state. QR codes are signed with an
//! issuer key the gate trusts; tokens are sold at this station and used the same day.
//!
//! A [`ReaderConn`] given a [`SimPsam`] is a two-phase reader: it announces its PSAM on every
//! tap (`"psam": true`) and answers the gate's `sign` line with a TAC from its simulated PSAM
//! (`afc_domain::tac::Psam`), or, for tests, stays silent, answers late or reports an error.

use afc_domain::ledger::TacRef;
use afc_domain::model::{CardType, Date, Direction, StationCode, Timestamp};
use afc_domain::qr::{self, QrIssue};
use afc_domain::tac::{Psam, TacInput};
use afc_domain::wire::{
    self, DecisionKind, EntryRecord, PsamError, PsamReply, PsamSignRequest, ReaderReply, ReaderRequest,
    ReaderResponse, SvcCard, TapMedia, TapRequest, TokenCard,
};
use ed25519_dalek::SigningKey;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The first card number of the simulated issuer's serial range.
pub const CARD_BASE: u64 = 3104_0000_0000_0000;

/// A QR issuer the simulator signs codes for.
pub struct QrIssuer {
    pub issuer: u16,
    pub key_id: u16,
    pub key: SigningKey,
}

/// What a tap was, so the response can be applied to the right medium.
#[derive(Debug, Clone, Copy)]
pub enum Presented {
    Card(usize),
    Qr,
    Token,
}

pub struct ReaderSim {
    rng: StdRng,
    station: StationCode,
    /// Other stations passengers come from.
    origins: Vec<StationCode>,
    cards: Vec<SvcCard>,
    qr: Option<QrIssuer>,
    next_token: u64,
    next_nonce: u64,
    /// Share of taps by medium, in percent: stored-value cards, QR codes; the rest are tokens.
    pub svc_percent: u32,
    pub qr_percent: u32,
}

impl ReaderSim {
    pub fn new(
        seed: u64,
        station: StationCode,
        origins: Vec<StationCode>,
        cards: usize,
        qr: Option<QrIssuer>,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let cards = (0..cards as u64)
            .map(|i| SvcCard {
                card_id: CARD_BASE + i * 7 + 1,
                card_type: match rng.gen_range(0..100) {
                    0..=79 => CardType::ORDINARY,
                    80..=89 => CardType::STUDENT,
                    90..=95 => CardType::SENIOR,
                    _ => CardType::ELDERLY_FREE,
                },
                balance_fen: rng.gen_range(0..20_000),
                expiry: Date::from_ymd(2030, 12, 31).unwrap_or_default(),
                tx_counter: rng.gen_range(0..500),
                entry: None,
            })
            .collect();
        ReaderSim {
            rng,
            station,
            origins,
            cards,
            qr,
            next_token: 9_000_000,
            next_nonce: seed.wrapping_mul(1_000_003),
            svc_percent: 70,
            qr_percent: 20,
        }
    }

    /// The card of a simulated passenger (for tests that pick a specific card).
    pub fn card(&self, i: usize) -> Option<&SvcCard> {
        self.cards.get(i)
    }

    /// The next tap at `now`.
    pub fn next_tap(&mut self, now: Timestamp) -> (Presented, TapRequest) {
        let roll = self.rng.gen_range(0..100);
        if roll < self.svc_percent || (self.qr.is_none() && roll < self.svc_percent + self.qr_percent) {
            let i = self.rng.gen_range(0..self.cards.len().max(1)).min(self.cards.len().saturating_sub(1));
            let origin = self.origins.get(self.rng.gen_range(0..self.origins.len().max(1))).copied();
            let minutes = self.rng.gen_range(5..90);
            let Some(card) = self.cards.get_mut(i) else {
                return self.token_tap(now);
            };
            // A passenger outside taps in; one inside (or, for the simulation, one we send in from
            // another station) taps out.
            let direction = if card.entry.is_some() {
                Direction::Exit
            } else if let (Some(o), true) = (origin, roll % 2 == 0) {
                card.entry = Some(EntryRecord { station: o, time: now.plus_minutes(-minutes) });
                Direction::Exit
            } else {
                Direction::Entry
            };
            let tap = TapRequest { direction, media: TapMedia::Svc { card: card.clone() } };
            (Presented::Card(i), tap)
        } else if roll < self.svc_percent + self.qr_percent {
            let Some(q) = &self.qr else { return self.token_tap(now) };
            self.next_nonce = self.next_nonce.wrapping_add(1);
            let issue = QrIssue {
                issuer: q.issuer,
                key_id: q.key_id,
                account: 8_800_000 + self.rng.gen_range(0..100_000),
                issued_at: now.plus_minutes(-1),
                valid_secs: 120,
                nonce: self.next_nonce,
            };
            let code = qr::encode_text(&qr::generate(&issue, &q.key));
            let direction = if self.rng.gen_bool(0.5) { Direction::Entry } else { Direction::Exit };
            (Presented::Qr, TapRequest { direction, media: TapMedia::Qr { code } })
        } else {
            self.token_tap(now)
        }
    }

    fn token_tap(&mut self, now: Timestamp) -> (Presented, TapRequest) {
        self.next_token += 1;
        let token = TokenCard {
            token_id: self.next_token,
            origin: self.station,
            paid_fen: 200 + 100 * self.rng.gen_range(0..4),
            sold_on: afc_domain::model::BusinessDayRule::default().business_day(now),
            entry: None,
        };
        (Presented::Token, TapRequest { direction: Direction::Entry, media: TapMedia::Token { token } })
    }

    /// Writes the gate's answer back to the medium, as a real reader does.
    pub fn apply(&mut self, presented: Presented, response: &ReaderResponse) {
        if let (Presented::Card(i), Some(w)) = (presented, response.card_write) {
            if let Some(card) = self.cards.get_mut(i) {
                card.balance_fen = w.balance_fen;
                card.tx_counter = w.tx_counter;
                card.entry = w.entry;
            }
        } else if let (Presented::Card(i), DecisionKind::Reject) = (presented, response.decision) {
            // A refused passenger goes to the service desk, which sorts the card out.
            if let Some(card) = self.cards.get_mut(i) {
                card.entry = None;
                card.balance_fen = card.balance_fen.max(5_000);
            }
        }
    }
}

/// How a simulated PSAM answers the gate's `sign` line (tests inject the faults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PsamBehaviour {
    /// Signs at once.
    Sign,
    /// Answers only once the gate has answered the tap (a PSAM slower than the gate's bound: the
    /// gate refuses first), and this much later again.
    Late(std::time::Duration),
    /// Sends the first half of its `signed` line at once and the rest only once the gate has
    /// answered the tap (an answer cut off by the gate's bound mid-line).
    Torn,
    /// Never answers.
    Silent,
    /// Answers `psam_error` with this code.
    Error(String),
}

/// The PSAM in a simulated reader's SAM slot, and what it signed.
#[derive(Debug, Clone)]
pub struct SimPsam {
    pub psam: Psam,
    pub behaviour: PsamBehaviour,
    /// Every sign request the gate sent, and the TAC given for it (`None`: not signed).
    pub signed: Vec<(TacInput, Option<TacRef>)>,
}

impl SimPsam {
    pub fn new(psam: Psam) -> SimPsam {
        SimPsam { psam, behaviour: PsamBehaviour::Sign, signed: Vec::new() }
    }
}

/// A reader's connection to the gate agent.
pub struct ReaderConn {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    line: String,
    /// A two-phase reader's PSAM; `None`: a one-phase (older) reader.
    pub psam: Option<SimPsam>,
}

impl ReaderConn {
    pub async fn connect(addr: std::net::SocketAddr) -> std::io::Result<ReaderConn> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(ReaderConn { reader: BufReader::new(r), writer: w, line: String::new(), psam: None })
    }

    /// A two-phase reader holding `psam`.
    pub async fn connect_with_psam(addr: std::net::SocketAddr, psam: SimPsam) -> std::io::Result<ReaderConn> {
        let mut c = ReaderConn::connect(addr).await?;
        c.psam = Some(psam);
        Ok(c)
    }

    async fn read_answer(&mut self) -> std::io::Result<String> {
        self.line.clear();
        let n = self.reader.read_line(&mut self.line).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "gate closed the connection"));
        }
        Ok(self.line.clone())
    }

    /// Sends a raw line (for tests of malformed input) and reads the answer line.
    pub async fn raw(&mut self, line: &[u8]) -> std::io::Result<String> {
        self.writer.write_all(line).await?;
        self.read_answer().await
    }

    /// Sends one tap and reads the gate's reply; with a PSAM, answers the gate's `sign` line
    /// first.
    pub async fn tap(&mut self, tap: &TapRequest) -> std::io::Result<ReaderReply> {
        let invalid =
            |e: wire::WireError| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
        let line = wire::encode_line(&ReaderRequest { tap: tap.clone(), psam: self.psam.is_some() });
        let mut answer = self.raw(&line).await?;
        if let Some(mut sim) = self.psam.take() {
            if let Ok(PsamSignRequest { sign }) = wire::decode::<PsamSignRequest>(answer.as_bytes()) {
                let reply = match &sim.behaviour {
                    PsamBehaviour::Error(code) => Some(PsamReply::PsamError(PsamError {
                        code: code.clone(),
                        message: "simulated".into(),
                    })),
                    PsamBehaviour::Silent => None,
                    PsamBehaviour::Sign | PsamBehaviour::Late(_) | PsamBehaviour::Torn => {
                        match sim.psam.sign(&sign) {
                            Some(t) => Some(PsamReply::Signed(t)),
                            None => Some(PsamReply::PsamError(PsamError {
                                code: "counter_exhausted".into(),
                                message: String::new(),
                            })),
                        }
                    }
                };
                let tac = match &reply {
                    Some(PsamReply::Signed(t)) => Some(*t),
                    _ => None,
                };
                sim.signed.push((sign, tac));
                let late = match sim.behaviour {
                    PsamBehaviour::Late(d) => Some(d),
                    _ => None,
                };
                let torn = sim.behaviour == PsamBehaviour::Torn;
                self.psam = Some(sim);
                if let (true, Some(r)) = (torn, &reply) {
                    let line = wire::encode_line(r);
                    let (first, rest) = line.split_at(line.len() / 2);
                    self.writer.write_all(first).await?;
                    answer = self.read_answer().await?;
                    self.writer.write_all(rest).await?;
                    return wire::decode(answer.as_bytes()).map_err(invalid);
                }
                if let Some(d) = late {
                    // The gate gives up first and answers; the late PSAM answer follows it.
                    answer = self.read_answer().await?;
                    tokio::time::sleep(d).await;
                    if let Some(r) = reply {
                        self.writer.write_all(&wire::encode_line(&r)).await?;
                    }
                    return wire::decode(answer.as_bytes()).map_err(invalid);
                }
                if let Some(r) = reply {
                    self.writer.write_all(&wire::encode_line(&r)).await?;
                }
                answer = self.read_answer().await?;
            } else {
                self.psam = Some(sim);
            }
        }
        wire::decode(answer.as_bytes()).map_err(invalid)
    }
}
