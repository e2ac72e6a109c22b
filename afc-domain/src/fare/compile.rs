//! Compilation: a network description and a fare rule, validated, become the OD [`FareTable`]
//! (the shortest-path distance between every pair of stations, priced by the rule).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::error::FareError;
use super::network::{NetworkDescription, Station};
use super::rule::FareRule;
use super::table::{discount_array, FareTable, MAX_STATIONS};
use crate::model::Ident;

/// Validates `net` and `rule`, computes the shortest-path distance between every pair of stations and
/// prices it. The result is what gates hold.
pub fn compile(net: &NetworkDescription, rule: &FareRule) -> Result<FareTable, FareError> {
    rule.validate()?;
    let n = net.stations.len();
    if n == 0 {
        return Err(FareError::EmptyNetwork);
    }
    if n > MAX_STATIONS {
        return Err(FareError::TooManyStations { count: n, max: MAX_STATIONS });
    }

    // Stations, in code order: the table's row order.
    let mut order: Vec<&Station> = net.stations.iter().collect();
    order.sort_by_key(|s| s.code);
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(n);
    for (i, s) in order.iter().enumerate() {
        if Ident::new(&s.id).is_err() {
            return Err(FareError::InvalidStationId { id: s.id.clone() });
        }
        if index.insert(s.id.as_str(), i).is_some() {
            return Err(FareError::DuplicateStationId { id: s.id.clone() });
        }
        if let Some(prev) = i.checked_sub(1).and_then(|p| order.get(p)) {
            if prev.code == s.code {
                return Err(FareError::DuplicateStationCode {
                    code: s.code,
                    first: prev.id.clone(),
                    second: s.id.clone(),
                });
            }
        }
    }

    // The graph: undirected edges with metre weights.
    let mut adjacency: Vec<Vec<(usize, u32)>> = vec![Vec::new(); n];
    let mut line_ids = std::collections::BTreeSet::new();
    for line in &net.lines {
        if !line_ids.insert(line.id.as_str()) {
            return Err(FareError::DuplicateLineId { line: line.id.clone() });
        }
        if line.stops.len() < 2 {
            return Err(FareError::LineTooShort { line: line.id.clone(), stops: line.stops.len() });
        }
        let mut previous: Option<usize> = None;
        for stop in &line.stops {
            let Some(&here) = index.get(stop.station.as_str()) else {
                return Err(FareError::UnknownStationInLine {
                    line: line.id.clone(),
                    station: stop.station.clone(),
                });
            };
            match (previous, stop.m_from_prev) {
                (None, None) => {}
                (None, Some(_)) => {
                    return Err(FareError::FirstStopHasDistance {
                        line: line.id.clone(),
                        station: stop.station.clone(),
                    })
                }
                (Some(_), None) => {
                    return Err(FareError::MissingDistance {
                        line: line.id.clone(),
                        station: stop.station.clone(),
                    })
                }
                (Some(_), Some(0)) => {
                    return Err(FareError::ZeroDistance {
                        line: line.id.clone(),
                        station: stop.station.clone(),
                    })
                }
                (Some(prev), Some(m)) => add_edge(&mut adjacency, prev, here, m),
            }
            previous = Some(here);
        }
    }
    for t in &net.transfers {
        let lookup = |id: &String| {
            index.get(id.as_str()).copied().ok_or_else(|| FareError::UnknownStationInTransfer {
                from: t.from.clone(),
                to: t.to.clone(),
                station: id.clone(),
            })
        };
        let (a, b) = (lookup(&t.from)?, lookup(&t.to)?);
        if a == b {
            return Err(FareError::TransferToItself { station: t.from.clone() });
        }
        add_edge(&mut adjacency, a, b, t.m);
    }

    // Connectivity, reported from the first listed station (the one an operator reads first).
    let first_listed = index.get(net.stations[0].id.as_str()).copied().unwrap_or(0);
    let from_first = shortest_distances(&adjacency, first_listed);
    if let Some(unreached) = from_first.iter().position(|d| d.is_none()) {
        return Err(FareError::Disconnected {
            station: order[unreached].id.clone(),
            from: order[first_listed].id.clone(),
        });
    }

    let mut distances = vec![0u32; n * n];
    let mut fares = vec![0u32; n * n];
    for from in 0..n {
        let row =
            if from == first_listed { from_first.clone() } else { shortest_distances(&adjacency, from) };
        for (to, d) in row.into_iter().enumerate() {
            let name = |i: usize| order[i].id.clone();
            // Connectivity was checked above, so every station is reached; 0 is never used.
            let d = d.unwrap_or(0);
            let d = u32::try_from(d)
                .map_err(|_| FareError::DistanceOverflow { from: name(from), to: name(to) })?;
            let fare = if from == to {
                rule.min_fare_fen
            } else {
                rule.fare_for_distance(d).ok_or_else(|| FareError::FareOverflow {
                    from: name(from),
                    to: name(to),
                    distance_m: d,
                })?
            };
            distances[from * n + to] = d;
            fares[from * n + to] = fare;
        }
    }

    let discounts = discount_array(&rule.discounts);
    Ok(FareTable {
        codes: order.iter().map(|s| s.code).collect(),
        fares,
        distances,
        min_fare_fen: rule.min_fare_fen,
        discounts,
        token_percent: rule.token_percent,
        max_ride_minutes: rule.max_ride_minutes,
        overstay_surcharge_fen: rule.overstay_surcharge_fen,
        business_day: rule.business_day,
    })
}

fn add_edge(adjacency: &mut [Vec<(usize, u32)>], a: usize, b: usize, m: u32) {
    if let Some(list) = adjacency.get_mut(a) {
        list.push((b, m));
    }
    if let Some(list) = adjacency.get_mut(b) {
        list.push((a, m));
    }
}

/// Dijkstra from `source`: the shortest distance to every station, `None` where unreachable. Sums in
/// `u64`, so no path of at most 1024 hops of u32 can overflow.
fn shortest_distances(adjacency: &[Vec<(usize, u32)>], source: usize) -> Vec<Option<u64>> {
    let mut dist: Vec<Option<u64>> = vec![None; adjacency.len()];
    let mut heap = BinaryHeap::new();
    if let Some(d) = dist.get_mut(source) {
        *d = Some(0);
        heap.push(Reverse((0u64, source)));
    }
    while let Some(Reverse((d, here))) = heap.pop() {
        if dist.get(here).copied().flatten().is_some_and(|best| d > best) {
            continue;
        }
        for &(next, m) in adjacency.get(here).map(Vec::as_slice).unwrap_or(&[]) {
            let candidate = d + u64::from(m);
            if let Some(slot) = dist.get_mut(next) {
                if !matches!(*slot, Some(best) if best <= candidate) {
                    *slot = Some(candidate);
                    heap.push(Reverse((candidate, next)));
                }
            }
        }
    }
    dist
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fare::fixtures::*;
    use crate::fare::*;
    use crate::model::{CardType, StationCode};
    use proptest::prelude::*;

    #[test]
    fn a_fare_that_would_overflow_is_refused_at_compile_time() {
        let mut r = dalian_rule();
        r.beyond = Some(Increment { fen: u32::MAX, per_m: 1 });
        assert_eq!(r.fare_for_distance(54_002), None);
        let mut net = straight();
        net.stations.push(station(5, "e"));
        net.lines[0].stops.push(Stop { station: "e".into(), m_from_prev: Some(2) });
        let e = err(&net, &r);
        assert!(matches!(e, FareError::FareOverflow { .. }), "{e}");
    }
    #[test]
    fn the_shortest_path_is_chosen_over_a_longer_one() {
        // a–b–c along line 1 is 4000 + 4000 m; line 2 goes a–c directly in 7000 m.
        let net = network(
            vec![station(1, "a"), station(2, "b"), station(3, "c")],
            vec![line("1", "a", &[("b", 4000), ("c", 4000)]), line("2", "a", &[("c", 7000)])],
        );
        let t = compile(&net, &dalian_rule()).unwrap();
        assert_eq!(t.distance_m(A, C), Some(7000));
        assert_eq!(t.full_fare_fen(A, C), Some(300));
        // b–c–a (4000 + 7000) loses to b–a (4000).
        assert_eq!(t.distance_m(B, A), Some(4000));
    }

    #[test]
    fn an_out_of_station_transfer_link_joins_two_lines_and_adds_its_walk() {
        let mut net = network(
            vec![station(1, "a"), station(2, "b"), station(3, "c"), station(4, "d")],
            vec![line("1", "a", &[("b", 5000)]), line("2", "c", &[("d", 900)])],
        );
        assert!(matches!(err(&net, &dalian_rule()), FareError::Disconnected { .. }));
        net.transfers.push(TransferLink { from: "b".into(), to: "c".into(), m: 150 });
        let t = compile(&net, &dalian_rule()).unwrap();
        assert_eq!(t.distance_m(A, D), Some(6050));
        assert_eq!(t.full_fare_fen(A, D), Some(300));
        assert_eq!(t.distance_m(D, A), Some(6050));
        // A link that is not charged adds nothing.
        net.transfers[0].m = 0;
        let t = compile(&net, &dalian_rule()).unwrap();
        assert_eq!(t.distance_m(A, D), Some(5900));
        assert_eq!(t.full_fare_fen(A, D), Some(200));
    }

    #[test]
    fn a_same_station_trip_costs_the_minimum_fare() {
        let t = compile(&straight(), &dalian_rule()).unwrap();
        assert_eq!(t.distance_m(B, B), Some(0));
        assert_eq!(t.full_fare_fen(B, B), Some(200));
        assert_eq!(t.fare_fen(B, B, CardType::ORDINARY), Some(160));
        assert_eq!(t.min_fare_for(CardType::STUDENT), Some(100));
        assert_eq!(t.min_fare_for(CardType::STAFF), None);
    }
    #[test]
    fn stations_are_ordered_by_code_whatever_the_listing_order() {
        let net = network(
            vec![station(30, "c"), station(10, "a"), station(20, "b")],
            vec![line("1", "c", &[("a", 1000), ("b", 7000)])],
        );
        let t = compile(&net, &dalian_rule()).unwrap();
        assert_eq!(t.stations(), &[StationCode(10), StationCode(20), StationCode(30)]);
        assert_eq!(t.distance_m(StationCode(30), StationCode(20)), Some(8000));
    }

    #[test]
    fn an_empty_network_is_refused() {
        assert_eq!(err(&network(vec![], vec![]), &dalian_rule()), FareError::EmptyNetwork);
    }

    #[test]
    fn an_unknown_station_in_a_line_is_named() {
        let net = network(vec![station(1, "a")], vec![line("1", "a", &[("zz", 100)])]);
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::UnknownStationInLine { line: "1".into(), station: "zz".into() }
        );
    }

    #[test]
    fn an_unknown_station_in_a_transfer_is_named() {
        let mut net = straight();
        net.transfers.push(TransferLink { from: "a".into(), to: "nowhere".into(), m: 10 });
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::UnknownStationInTransfer {
                from: "a".into(),
                to: "nowhere".into(),
                station: "nowhere".into()
            }
        );
    }

    #[test]
    fn a_transfer_from_a_station_to_itself_is_refused() {
        let mut net = straight();
        net.transfers.push(TransferLink { from: "b".into(), to: "b".into(), m: 10 });
        assert_eq!(err(&net, &dalian_rule()), FareError::TransferToItself { station: "b".into() });
    }

    #[test]
    fn a_duplicate_station_id_is_named() {
        let mut net = straight();
        net.stations.push(station(9, "b"));
        assert_eq!(err(&net, &dalian_rule()), FareError::DuplicateStationId { id: "b".into() });
    }

    #[test]
    fn a_duplicate_station_code_names_both_stations() {
        let mut net = straight();
        net.stations[3].code = StationCode(2);
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::DuplicateStationCode { code: StationCode(2), first: "b".into(), second: "d".into() }
        );
    }

    #[test]
    fn a_station_id_that_cannot_be_a_topic_level_is_refused() {
        let mut net = straight();
        net.stations[0].id = "a/b".into();
        net.lines[0].stops[0].station = "a/b".into();
        assert_eq!(err(&net, &dalian_rule()), FareError::InvalidStationId { id: "a/b".into() });
    }

    #[test]
    fn a_duplicate_line_id_is_named() {
        let mut net = straight();
        net.lines.push(line("1", "a", &[("d", 100)]));
        assert_eq!(err(&net, &dalian_rule()), FareError::DuplicateLineId { line: "1".into() });
    }

    #[test]
    fn a_line_with_one_stop_is_refused() {
        let mut net = straight();
        net.lines.push(line("2", "a", &[]));
        assert_eq!(err(&net, &dalian_rule()), FareError::LineTooShort { line: "2".into(), stops: 1 });
    }

    #[test]
    fn a_missing_or_zero_distance_is_named() {
        let mut net = straight();
        net.lines[0].stops[2].m_from_prev = None;
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::MissingDistance { line: "1".into(), station: "c".into() }
        );
        net.lines[0].stops[2].m_from_prev = Some(0);
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::ZeroDistance { line: "1".into(), station: "c".into() }
        );
    }

    #[test]
    fn a_first_stop_with_a_distance_is_refused() {
        let mut net = straight();
        net.lines[0].stops[0].m_from_prev = Some(5);
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::FirstStopHasDistance { line: "1".into(), station: "a".into() }
        );
    }

    #[test]
    fn a_disconnected_station_is_named() {
        let mut net = straight();
        net.stations.push(station(7, "island"));
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::Disconnected { station: "island".into(), from: "a".into() }
        );
    }
    #[test]
    fn a_distance_beyond_u32_metres_is_refused() {
        let net = network(
            vec![station(1, "a"), station(2, "b"), station(3, "c")],
            vec![line("1", "a", &[("b", u32::MAX), ("c", 1)])],
        );
        assert_eq!(
            err(&net, &dalian_rule()),
            FareError::DistanceOverflow { from: "a".into(), to: "c".into() }
        );
    }

    #[test]
    fn a_free_network_with_a_zero_minimum_fare_is_allowed() {
        let mut r = dalian_rule();
        r.min_fare_fen = 0;
        let t = compile(&straight(), &r).unwrap();
        assert_eq!(t.full_fare_fen(A, A), Some(0));
        assert_eq!(t.full_fare_fen(A, B), Some(200));
    }

    proptest! {
        #[test]
        fn random_networks_compile_and_round_trip(net in arb_network(), rule in arb_rule()) {
            let t = compile(&net, &rule).unwrap();
            prop_assert_eq!(t.stations().len(), net.stations.len());
            for &a in t.stations() {
                for &b in t.stations() {
                    // Undirected links: distances and fares are symmetric.
                    prop_assert_eq!(t.distance_m(a, b), t.distance_m(b, a));
                    let d = t.distance_m(a, b).unwrap();
                    if a != b {
                        prop_assert_eq!(t.full_fare_fen(a, b), rule.fare_for_distance(d));
                    }
                }
            }
            prop_assert_eq!(FareTable::decode(&t.encode()).unwrap(), t);
        }
    }
}
