//! The network as the operator describes it (the project's own JSON format): stations, lines
//! with the distance between adjacent stops, and out-of-station transfer links.

use serde::{Deserialize, Serialize};

use crate::model::StationCode;

/// A metro network as the operator describes it: the project's own JSON format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NetworkDescription {
    /// A human name, shown in the console next to the parameter version.
    pub name: String,
    /// Where the data came from and how sure it is (published, reconstructed, estimated), so that a
    /// fare dispute can be traced to its source.
    #[serde(default)]
    pub provenance: Vec<String>,
    /// Every station once, however many lines stop there.
    pub stations: Vec<Station>,
    /// The lines, each an ordered list of stops with distances between neighbours.
    pub lines: Vec<Line>,
    /// Out-of-station transfers between two different stations (a walk through the street).
    #[serde(default)]
    pub transfers: Vec<TransferLink>,
}

/// A station of the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Station {
    /// The numeric code written on cards and used in the OD table.
    pub code: StationCode,
    /// The text id lines and transfers refer to; also the station's MQTT/topic identifier, so it
    /// must be a valid [`Ident`](crate::model::Ident).
    pub id: String,
    /// The Chinese name, as on signs and receipts.
    pub name_zh: String,
    /// The English name, for the console.
    pub name_en: String,
}

/// A line: stops in running order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Line {
    /// A short unique id (`"1"`, `"3B"`), used in error messages.
    pub id: String,
    /// A human name.
    pub name: String,
    /// The stops in running order; at least two.
    pub stops: Vec<Stop>,
}

/// One stop of a line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Stop {
    /// The station id (not the code), as in [`Station::id`].
    pub station: String,
    /// Metres from the previous stop of this line: `None` only for the first stop, positive for all
    /// others. This is the distance fares are computed from.
    pub m_from_prev: Option<u32>,
}

/// An out-of-station transfer: passengers may leave at `from` and re-enter at `to` (or back) as one
/// journey. Usable in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TransferLink {
    /// One station id.
    pub from: String,
    /// The other station id; must differ from `from`.
    pub to: String,
    /// Metres the link adds to the fare distance; 0 if the walk is not charged.
    pub m: u32,
}

impl NetworkDescription {
    /// The station with this id, if any.
    pub fn station(&self, id: &str) -> Option<&Station> {
        self.stations.iter().find(|s| s.id == id)
    }
}
