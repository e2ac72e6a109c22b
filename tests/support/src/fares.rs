//! An independent recomputation of OD fares for tests that check what the product priced: shortest
//! distances by Floyd–Warshall over the published stop distances and transfer links (not the
//! product's Dijkstra in `fare/compile.rs`), then the fare rule's bands.
//!
//! A network or rule these cannot price is a broken test fixture: they panic, naming it.

use std::collections::HashMap;

use afc_domain::network::{FareRule, NetworkDescription};

/// Shortest distances between every pair of station ids, computed here from the stop distances
/// and transfer links, not by the product's compiler.
pub fn distances(net: &NetworkDescription) -> HashMap<(String, String), u64> {
    let ids: Vec<&str> = net.stations.iter().map(|s| s.id.as_str()).collect();
    let at: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let n = ids.len();
    let mut d = vec![vec![u64::MAX / 4; n]; n];
    for (i, row) in d.iter_mut().enumerate() {
        row[i] = 0;
    }
    let mut edge = |a: &str, b: &str, m: u64| {
        let (a, b) = (at[a], at[b]);
        d[a][b] = d[a][b].min(m);
        d[b][a] = d[b][a].min(m);
    };
    for line in &net.lines {
        for w in line.stops.windows(2) {
            edge(
                &w[0].station,
                &w[1].station,
                u64::from(
                    w[1].m_from_prev.unwrap_or_else(|| panic!("stop {} has no distance", w[1].station)),
                ),
            );
        }
    }
    for t in &net.transfers {
        edge(&t.from, &t.to, u64::from(t.m));
    }
    for k in 0..n {
        for i in 0..n {
            for j in 0..n {
                d[i][j] = d[i][j].min(d[i][k] + d[k][j]);
            }
        }
    }
    let mut out = HashMap::new();
    for i in 0..n {
        for j in 0..n {
            out.insert((ids[i].to_owned(), ids[j].to_owned()), d[i][j]);
        }
    }
    out
}

/// The full fare over `m` metres: the band, at least the minimum fare.
pub fn expected_fare(rule: &FareRule, m: u64) -> u32 {
    let m = u32::try_from(m).unwrap_or_else(|_| panic!("{m} m is no distance"));
    rule.fare_for_distance(m)
        .unwrap_or_else(|| panic!("the rule prices no fare for {m} m"))
        .max(rule.min_fare_fen)
}
