//! The fare rule: distance bands, the increment beyond the last band, discounts per card type,
//! the minimum fare, the ride-time limit and the business-day rule; and its checks on its own.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::FareError;
use crate::model::{BusinessDayRule, CardType};

/// The largest UTC offset a business-day rule may name, in minutes (±18 h, as in ISO 8601 practice).
const MAX_UTC_OFFSET_MINUTES: i32 = 18 * 60;

/// How a distance becomes a fare, and who pays how much of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FareRule {
    /// A human name, shown in the console.
    pub name: String,
    /// Distance bands, strictly increasing in `up_to_m`, fares non-decreasing.
    pub bands: Vec<Band>,
    /// The increment beyond the last band; `None` caps fares at the last band's fare.
    pub beyond: Option<Increment>,
    /// The fare charged for a same-station exit (and an exit without entry under sequence_free); the
    /// balance a card needs to enter. At most the first band's fare.
    pub min_fare_fen: u32,
    /// Percent of the full fare each accepted card type pays (0..=100); a type not listed is refused.
    pub discounts: BTreeMap<CardType, u8>,
    /// Percent of the full fare a single-journey token costs (Dalian: 100).
    pub token_percent: u8,
    /// The ride-time limit, if the operator has one (Dalian publishes none).
    pub max_ride_minutes: Option<u32>,
    /// Added to the fare of a ride longer than `max_ride_minutes`; 0 when there is no limit.
    pub overstay_surcharge_fen: u32,
    /// When the business day rolls over, for tokens and daily statistics.
    pub business_day: BusinessDayRule,
    /// What the staff and the receipts call each card type, for the types whose JSON form is a
    /// bare code (another city's concessions) or whose local name differs. Only accepted types
    /// (listed in `discounts`) may be named.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub card_type_names: BTreeMap<CardType, CardTypeName>,
}

/// A card type's name in the console's two languages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CardTypeName {
    pub en: String,
    pub zh: String,
}

/// The longest card-type name, in characters.
pub const MAX_CARD_TYPE_NAME: usize = 64;

/// One distance band.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Band {
    /// The inclusive upper limit of the band, in metres: exactly this distance is still in the band.
    pub up_to_m: u32,
    /// The full fare for a distance in this band.
    pub fare_fen: u32,
}

/// The increment beyond the last band: `fen` more for every `per_m` metres, or part thereof,
/// started beyond the last band's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Increment {
    /// Fen added per step.
    pub fen: u32,
    /// Metres per step; positive.
    pub per_m: u32,
}

impl FareRule {
    /// The full fare for a distance, or `None` if the rule has no bands or the fare overflows `u32`.
    pub fn fare_for_distance(&self, distance_m: u32) -> Option<u32> {
        if let Some(band) = self.bands.iter().find(|b| distance_m <= b.up_to_m) {
            return Some(band.fare_fen);
        }
        let last = self.bands.last()?;
        let Some(inc) = self.beyond else {
            return Some(last.fare_fen);
        };
        if inc.per_m == 0 {
            return None;
        }
        let excess = u64::from(distance_m - last.up_to_m);
        let steps = excess.div_ceil(u64::from(inc.per_m));
        let fare = u64::from(last.fare_fen).checked_add(steps.checked_mul(u64::from(inc.fen))?)?;
        u32::try_from(fare).ok()
    }

    /// Checks the rule on its own (everything except fares that overflow on a given network).
    pub fn validate(&self) -> Result<(), FareError> {
        let first = self.bands.first().ok_or(FareError::EmptyBands)?;
        let mut previous: Option<Band> = None;
        for (index, band) in self.bands.iter().enumerate() {
            let previous_up_to_m = previous.map_or(0, |p| p.up_to_m);
            // The first band's limit must be above 0: a band of zero length is a typo.
            if band.up_to_m <= previous_up_to_m {
                return Err(FareError::BandsNotIncreasing { index, up_to_m: band.up_to_m, previous_up_to_m });
            }
            if let Some(p) = previous {
                if band.fare_fen < p.fare_fen {
                    return Err(FareError::FareDecreases {
                        index,
                        fare_fen: band.fare_fen,
                        previous_fare_fen: p.fare_fen,
                    });
                }
            }
            previous = Some(*band);
        }
        if self.min_fare_fen > first.fare_fen {
            return Err(FareError::MinFareAboveFirstBand {
                min_fare_fen: self.min_fare_fen,
                first_band_fen: first.fare_fen,
            });
        }
        if let Some(inc) = self.beyond {
            if inc.per_m == 0 {
                return Err(FareError::ZeroIncrementDistance);
            }
        }
        for (&card_type, name) in &self.card_type_names {
            if !self.discounts.contains_key(&card_type) {
                return Err(FareError::NamedTypeNotAccepted { card_type });
            }
            let bad = |n: &str| n.trim().is_empty() || n.chars().count() > MAX_CARD_TYPE_NAME;
            if bad(&name.en) || bad(&name.zh) {
                return Err(FareError::BadCardTypeName { card_type });
            }
        }
        for (&card_type, &percent) in &self.discounts {
            if percent > 100 {
                return Err(FareError::DiscountAbove100 { card_type, percent });
            }
        }
        if self.token_percent > 100 {
            return Err(FareError::TokenPercentAbove100 { percent: self.token_percent });
        }
        match self.max_ride_minutes {
            Some(0) => return Err(FareError::ZeroMaxRideMinutes),
            None if self.overstay_surcharge_fen > 0 => {
                return Err(FareError::SurchargeWithoutLimit { surcharge_fen: self.overstay_surcharge_fen })
            }
            _ => {}
        }
        check_business_day(self.business_day).map_err(|()| FareError::InvalidBusinessDay {
            utc_offset_minutes: self.business_day.utc_offset_minutes,
            rollover_minute_of_day: self.business_day.rollover_minute_of_day,
        })
    }
}

pub(super) fn check_business_day(b: BusinessDayRule) -> Result<(), ()> {
    let offset_ok = (-MAX_UTC_OFFSET_MINUTES..=MAX_UTC_OFFSET_MINUTES).contains(&b.utc_offset_minutes);
    if offset_ok && b.rollover_minute_of_day < 24 * 60 {
        Ok(())
    } else {
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fare::fixtures::*;
    use crate::fare::*;
    use crate::model::{CardType, StationCode};

    #[test]
    fn a_band_limit_is_inclusive() {
        let t = compile(&straight(), &dalian_rule()).unwrap();
        assert_eq!(t.distance_m(A, B), Some(6000));
        assert_eq!(t.full_fare_fen(A, B), Some(200));
        assert_eq!(t.distance_m(A, C), Some(6001));
        assert_eq!(t.full_fare_fen(A, C), Some(300));
        assert_eq!(t.full_fare_fen(C, A), Some(300));
        assert_eq!(t.distance_m(A, D), Some(54_000));
        assert_eq!(t.full_fare_fen(A, D), Some(800));
    }

    #[test]
    fn beyond_the_last_band_every_started_step_costs_one_increment() {
        let r = dalian_rule();
        assert_eq!(r.fare_for_distance(54_000), Some(800));
        assert_eq!(r.fare_for_distance(54_001), Some(900));
        assert_eq!(r.fare_for_distance(69_000), Some(900));
        assert_eq!(r.fare_for_distance(69_001), Some(1000));
        assert_eq!(r.fare_for_distance(84_001), Some(1100));
        // And through the compiler: A–E = 54000 + 15001 m.
        let mut net = straight();
        net.stations.push(station(5, "e"));
        net.lines[0].stops.push(Stop { station: "e".into(), m_from_prev: Some(15_001) });
        let t = compile(&net, &r).unwrap();
        assert_eq!(t.full_fare_fen(A, StationCode(5)), Some(1000));
        assert_eq!(t.full_fare_fen(D, StationCode(5)), Some(400)); // 15001 m
    }

    #[test]
    fn without_an_increment_long_trips_pay_the_last_band() {
        let mut r = dalian_rule();
        r.beyond = None;
        assert_eq!(r.fare_for_distance(54_001), Some(800));
        assert_eq!(r.fare_for_distance(u32::MAX), Some(800));
    }
    #[test]
    fn a_beijing_style_rule_works_too() {
        let net = network(
            vec![station(1, "a"), station(2, "b"), station(3, "c"), station(4, "d")],
            vec![line("1", "a", &[("b", 32_000), ("c", 20_000), ("d", 1)])],
        );
        let t = compile(&net, &beijing_rule()).unwrap();
        assert_eq!(t.full_fare_fen(A, B), Some(600)); // 32 km: last band, inclusive
        assert_eq!(t.full_fare_fen(A, C), Some(700)); // 52 km: one 20 km step
        assert_eq!(t.full_fare_fen(A, D), Some(800)); // 52.001 km: a second step started
        assert_eq!(t.full_fare_fen(B, C), Some(500)); // 20 km
        assert_eq!(t.fare_fen(A, B, CardType::ORDINARY), Some(600));
        assert_eq!(t.fare_fen(A, B, CardType::STUDENT), Some(300));
        assert_eq!(t.fare_fen(A, B, CardType::SENIOR), None);
        assert_eq!(t.max_ride_minutes(), Some(240));
        assert_eq!(t.overstay_surcharge_fen(), 300);
        assert_eq!(t.business_day().rollover_minute_of_day, 180);
        assert_eq!(t.min_fare_fen(), 300);
    }
    #[test]
    fn fare_rule_errors_are_named() {
        let net = straight();
        let check = |edit: &dyn Fn(&mut FareRule), want: FareError| {
            let mut r = dalian_rule();
            edit(&mut r);
            assert_eq!(err(&net, &r), want);
        };
        check(&|r| r.bands.clear(), FareError::EmptyBands);
        check(
            &|r| r.bands[3].up_to_m = 18_000,
            FareError::BandsNotIncreasing { index: 3, up_to_m: 18_000, previous_up_to_m: 18_000 },
        );
        check(
            &|r| r.bands[0].up_to_m = 0,
            FareError::BandsNotIncreasing { index: 0, up_to_m: 0, previous_up_to_m: 0 },
        );
        check(
            &|r| r.bands[2].fare_fen = 250,
            FareError::FareDecreases { index: 2, fare_fen: 250, previous_fare_fen: 300 },
        );
        check(
            &|r| r.min_fare_fen = 201,
            FareError::MinFareAboveFirstBand { min_fare_fen: 201, first_band_fen: 200 },
        );
        check(&|r| r.beyond = Some(Increment { fen: 100, per_m: 0 }), FareError::ZeroIncrementDistance);
        check(
            &|r| {
                r.discounts.insert(CardType::STAFF, 101);
            },
            FareError::DiscountAbove100 { card_type: CardType::STAFF, percent: 101 },
        );
        check(&|r| r.token_percent = 150, FareError::TokenPercentAbove100 { percent: 150 });
        check(&|r| r.max_ride_minutes = Some(0), FareError::ZeroMaxRideMinutes);
        check(&|r| r.overstay_surcharge_fen = 500, FareError::SurchargeWithoutLimit { surcharge_fen: 500 });
        check(
            &|r| r.business_day.rollover_minute_of_day = 1440,
            FareError::InvalidBusinessDay { utc_offset_minutes: 480, rollover_minute_of_day: 1440 },
        );
        check(
            &|r| r.business_day.utc_offset_minutes = 2000,
            FareError::InvalidBusinessDay { utc_offset_minutes: 2000, rollover_minute_of_day: 240 },
        );
    }

    #[test]
    fn a_misspelt_field_in_a_fare_rule_is_refused() {
        let mut v = serde_json::to_value(dalian_rule()).unwrap();
        v["max_ride_minute"] = serde_json::json!(120);
        let e = serde_json::from_value::<FareRule>(v).unwrap_err();
        assert!(e.to_string().contains("max_ride_minute"), "{e}");
    }
    #[test]
    fn the_rules_round_trip_through_json() {
        for r in [dalian_rule(), beijing_rule()] {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<FareRule>(&json).unwrap(), r);
        }
        let net = straight();
        let json = serde_json::to_string(&net).unwrap();
        assert_eq!(serde_json::from_str::<NetworkDescription>(&json).unwrap(), net);
        assert!(serde_json::to_string(&dalian_rule()).unwrap().contains(r#""elderly_free":0"#));
    }
}
