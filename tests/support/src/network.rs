//! The sample network the fare, decision and gate tests price against: one line
//! A(101) – B(102) – C(103) – D(104), with 3, 4 and 10 km between neighbours.

use afc_domain::model::StationCode;
use afc_domain::network::{Line, NetworkDescription, Station, Stop};

/// Station A, the line's first stop.
pub const A: StationCode = StationCode(101);
/// Station B, 3 km from A.
pub const B: StationCode = StationCode(102);
/// Station C, 7 km from A.
pub const C: StationCode = StationCode(103);
/// Station D, 17 km from A.
pub const D: StationCode = StationCode(104);

/// The test network: one line A(101) – B(102) – C(103) – D(104), 3, 4 and 10 km apart.
pub fn sample() -> NetworkDescription {
    let station = |code: u16, id: &str| Station {
        code: StationCode(code),
        id: id.to_owned(),
        name_zh: id.to_owned(),
        name_en: id.to_owned(),
    };
    let stop = |id: &str, m: Option<u32>| Stop { station: id.to_owned(), m_from_prev: m };
    NetworkDescription {
        name: "test line".into(),
        provenance: vec![],
        stations: vec![station(101, "a"), station(102, "b"), station(103, "c"), station(104, "d")],
        lines: vec![Line {
            id: "1".into(),
            name: "Line 1".into(),
            stops: vec![
                stop("a", None),
                stop("b", Some(3000)),
                stop("c", Some(4000)),
                stop("d", Some(10_000)),
            ],
        }],
        transfers: vec![],
    }
}
