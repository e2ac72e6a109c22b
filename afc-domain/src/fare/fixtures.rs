//! Test fixtures shared by the fare module's tests: small networks, the Dalian and a
//! Beijing-style rule, and proptest strategies for random networks and rules.

use proptest::prelude::*;

use super::*;
use crate::model::{BusinessDayRule, CardType, StationCode};

pub(super) fn station(code: u16, id: &str) -> Station {
    Station { code: StationCode(code), id: id.into(), name_zh: String::new(), name_en: id.into() }
}

/// A line through `stops`, the first with no distance, each later one `(id, metres)`.
pub(super) fn line(id: &str, first: &str, rest: &[(&str, u32)]) -> Line {
    let mut stops = vec![Stop { station: first.into(), m_from_prev: None }];
    stops.extend(rest.iter().map(|&(s, m)| Stop { station: s.into(), m_from_prev: Some(m) }));
    Line { id: id.into(), name: format!("Line {id}"), stops }
}

pub(super) fn network(stations: Vec<Station>, lines: Vec<Line>) -> NetworkDescription {
    NetworkDescription { name: "test".into(), provenance: vec![], stations, lines, transfers: vec![] }
}

/// A, B, C, D on one line: A–B 6000 m, B–C 1 m, C–D 47999 m (A–D = 54000 m).
pub(super) fn straight() -> NetworkDescription {
    network(
        vec![station(1, "a"), station(2, "b"), station(3, "c"), station(4, "d")],
        vec![line("1", "a", &[("b", 6000), ("c", 1), ("d", 47_999)])],
    )
}

pub(super) fn dalian_rule() -> FareRule {
    let bands = [(6, 200), (12, 300), (18, 400), (26, 500), (34, 600), (44, 700), (54, 800)];
    FareRule {
        name: "Dalian".into(),
        bands: bands.iter().map(|&(km, fen)| Band { up_to_m: km * 1000, fare_fen: fen }).collect(),
        beyond: Some(Increment { fen: 100, per_m: 15_000 }),
        min_fare_fen: 200,
        discounts: [(CardType::ORDINARY, 80), (CardType::STUDENT, 50), (CardType::ELDERLY_FREE, 0)]
            .into_iter()
            .collect(),
        token_percent: 100,
        max_ride_minutes: None,
        overstay_surcharge_fen: 0,
        business_day: BusinessDayRule::default(),
        card_type_names: Default::default(),
    }
}

pub(super) fn beijing_rule() -> FareRule {
    let bands = [(6, 300), (12, 400), (22, 500), (32, 600)];
    FareRule {
        name: "Beijing-style".into(),
        bands: bands.iter().map(|&(km, fen)| Band { up_to_m: km * 1000, fare_fen: fen }).collect(),
        beyond: Some(Increment { fen: 100, per_m: 20_000 }),
        min_fare_fen: 300,
        discounts: [(CardType::ORDINARY, 100), (CardType::STUDENT, 50)].into_iter().collect(),
        token_percent: 100,
        max_ride_minutes: Some(240),
        overstay_surcharge_fen: 300,
        business_day: BusinessDayRule { utc_offset_minutes: 480, rollover_minute_of_day: 180 },
        card_type_names: Default::default(),
    }
}

pub(super) fn err(net: &NetworkDescription, rule: &FareRule) -> FareError {
    compile(net, rule).unwrap_err()
}

pub(super) const A: StationCode = StationCode(1);
pub(super) const B: StationCode = StationCode(2);
pub(super) const C: StationCode = StationCode(3);
pub(super) const D: StationCode = StationCode(4);

/// A random connected network: station i > 0 hangs off a random earlier station (a tree), plus a
/// few extra edges and transfer links; codes are distinct random u16.
pub(super) fn arb_network() -> impl Strategy<Value = NetworkDescription> {
    (2usize..12)
        .prop_flat_map(|n| {
            (
                Just(n),
                proptest::collection::btree_set(any::<u16>(), n),
                proptest::collection::vec((any::<prop::sample::Index>(), 1u32..40_000), n - 1),
                proptest::collection::vec((0..n, 0..n, 0u32..40_000), 0..4),
            )
        })
        .prop_map(|(n, codes, parents, extra)| {
            let mut codes: Vec<u16> = codes.into_iter().collect();
            codes.reverse(); // listing order differs from code order
            let stations: Vec<Station> =
                codes.iter().enumerate().map(|(i, &c)| station(c, &format!("s{i}"))).collect();
            let mut lines = Vec::new();
            for (i, (parent, m)) in parents.into_iter().enumerate() {
                let child = i + 1;
                let p = parent.index(child);
                lines.push(line(&format!("l{child}"), &format!("s{p}"), &[(&format!("s{child}"), m)]));
            }
            let mut transfers = Vec::new();
            for (a, b, m) in extra {
                if a != b {
                    transfers.push(TransferLink { from: format!("s{a}"), to: format!("s{b}"), m });
                }
            }
            let _ = n;
            NetworkDescription { name: "random".into(), provenance: vec![], stations, lines, transfers }
        })
}

pub(super) fn arb_rule() -> impl Strategy<Value = FareRule> {
    (
        proptest::collection::vec((1u32..20_000, 0u32..300), 1..6),
        proptest::option::of((0u32..500, 1u32..30_000)),
        proptest::collection::btree_map(prop::sample::select(CardType::NAMED.to_vec()), 0u8..=100, 0..6),
        0u8..=100,
        proptest::option::of((1u32..600, 0u32..1000)),
        (-1080i32..=1080, 0u32..1440),
    )
        .prop_map(|(steps, beyond, discounts, token_percent, limit, (off, roll))| {
            let (mut up, mut fare) = (0u32, 100u32);
            let bands = steps
                .into_iter()
                .map(|(dm, df)| {
                    up += dm;
                    fare += df;
                    Band { up_to_m: up, fare_fen: fare }
                })
                .collect();
            FareRule {
                name: "random".into(),
                bands,
                beyond: beyond.map(|(fen, per_m)| Increment { fen, per_m }),
                min_fare_fen: 100,
                discounts,
                token_percent,
                max_ride_minutes: limit.map(|l| l.0),
                overstay_surcharge_fen: limit.map_or(0, |l| l.1),
                business_day: BusinessDayRule { utc_offset_minutes: off, rollover_minute_of_day: roll },
                card_type_names: Default::default(),
            }
        })
}
