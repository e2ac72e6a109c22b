//! Sample ledger data for tests, the benchmark and demos: realistic records and chained entries.

use afc_domain::ledger::{LedgerEntry, LedgerHead, ParamVersions, TxRecord};
use afc_domain::mode::ModeBits;
use afc_domain::model::{Direction, Ident, Media, Reason, StationCode, Timestamp};

/// An accepted stored-value exit at `station` through `gate` with sequence number `seq`. An
/// invalid `gate` name falls back to `"g01"`.
pub fn record(station: &Ident, gate: &str, seq: u64) -> TxRecord {
    let gate = Ident::new(gate).unwrap_or_else(|_| fallback_gate());
    let t = 1_790_000_000_000 + (seq as i64 % 1_000_000_000) * 1_000;
    TxRecord {
        station: station.clone(),
        gate,
        gate_seq: seq,
        media: Media::Svc,
        id: 3_100_000_000_000 + seq % 5_000_000,
        direction: Direction::Exit,
        accepted: true,
        reason: Reason::Ok,
        fare_fen: 160 + (seq % 7) as u32 * 80,
        shortfall_fen: 0,
        balance_before: Some(5_000),
        balance_after: Some(4_680),
        card_tx_counter: Some((seq % 60_000) as u32),
        entry_station: Some(StationCode(105)),
        entry_time: Some(Timestamp(t - 1_500_000)),
        occurred_at: Timestamp(t),
        modes: ModeBits::NORMAL,
        params: ParamVersions { fare_table: 3, blacklist: 120, qr_keys: 2, gate_config: 1, mode: 9 },
        replay_unchecked: false,
        qr: None,
        installation: None,
        voids: None,
        bank: None,
        tac: None,
    }
}

fn fallback_gate() -> Ident {
    // "g01" is 3 characters of [a-z0-9], a valid identifier.
    #[allow(clippy::expect_used)]
    Ident::new("g01").expect("g01 is a valid identifier")
}

/// A ledger of `count` entries for `station`, spread over 20 gates with per-gate sequence numbers,
/// chained from genesis: what a station's controller would upload.
pub fn ledger(station: &Ident, count: u64) -> Vec<LedgerEntry> {
    let gates: Vec<String> = (1..=20).map(|g| format!("g{g:02}")).collect();
    let mut head = LedgerHead::genesis();
    (0..count)
        .map(|i| {
            let gate = &gates[(i % 20) as usize];
            head.append(record(station, gate, i / 20 + 1))
        })
        .collect()
}
