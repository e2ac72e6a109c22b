//! The shipped Dalian sample data (deploy/data) compiled into the OD fare table, checked against fares
//! worked out by hand for real journeys.
//!
//! Each journey's comment gives the route and the intervals summed from dalian-metro.json (km, as in
//! the source); the expected figures follow from Dalian's published rule: 2 yuan up to 6 km, 3 up to
//! 12, 4 up to 18, 5 up to 26, 6 up to 34, 7 up to 44, 8 up to 54 (limits inclusive), then +1 yuan per
//! 15 km started; the ordinary Mingzhu card pays 80 %, students 50 %, rounded down to the fen.

// Test code: a helper that cannot load the shipped data should fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use afc_domain::model::{BusinessDayRule, CardType, StationCode};
use afc_domain::network::{compile, FareRule, FareTable, NetworkDescription};

fn data(file: &str) -> String {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "deploy", "data", file].iter().collect();
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dalian() -> (NetworkDescription, FareRule, FareTable) {
    let net: NetworkDescription = serde_json::from_str(&data("dalian-network.json")).unwrap();
    let rule: FareRule = serde_json::from_str(&data("dalian-fare-rule.json")).unwrap();
    let table = compile(&net, &rule).unwrap();
    (net, rule, table)
}

/// Asserts one journey, in both directions: the distance, the full fare, and the ordinary-card and
/// student fares. Tokens pay the full fare and free riders nothing.
fn journey(from: &str, to: &str, metres: u32, full: u32, ordinary: u32, student: u32) {
    let (net, _, t) = dalian();
    let code = |id: &str| net.station(id).unwrap_or_else(|| panic!("no station {id}")).code;
    for (a, b) in [(code(from), code(to)), (code(to), code(from))] {
        assert_eq!(t.distance_m(a, b), Some(metres), "{from} - {to}: distance");
        assert_eq!(t.full_fare_fen(a, b), Some(full), "{from} - {to}: full fare");
        assert_eq!(t.fare_fen(a, b, CardType::ORDINARY), Some(ordinary), "{from} - {to}: ordinary");
        assert_eq!(t.fare_fen(a, b, CardType::STUDENT), Some(student), "{from} - {to}: student");
        assert_eq!(t.fare_fen(a, b, CardType::SENIOR), Some(student), "{from} - {to}: senior");
        assert_eq!(t.fare_fen(a, b, CardType::ELDERLY_FREE), Some(0), "{from} - {to}: free");
        assert_eq!(t.token_fare_fen(a, b), Some(full), "{from} - {to}: token");
    }
}

#[test]
fn all_one_hundred_dalian_stations_are_reachable_from_each_other() {
    let (net, _, t) = dalian();
    assert_eq!(net.stations.len(), 100);
    assert_eq!(t.stations().len(), 100);
    for &a in t.stations() {
        for &b in t.stations() {
            assert!(t.full_fare_fen(a, b).is_some(), "{a} -> {b}");
        }
    }
}

#[test]
fn dalian_station_codes_follow_line_and_position() {
    let (net, _, _) = dalian();
    let code = |id: &str| net.station(id).unwrap().code;
    assert_eq!(code("yaojia"), StationCode(101));
    assert_eq!(code("dalian_north"), StationCode(102)); // first seen on line 1
    assert_eq!(code("nanguanling"), StationCode(202));
    assert_eq!(code("dalian_rs"), StationCode(301)); // line 3 comes before line 5
    assert_eq!(code("tostem"), StationCode(3902)); // the Jiuli branch 3B is "39"
    assert_eq!(code("jiuli"), StationCode(3907));
    assert_eq!(code("pulandian_zhenxing_st"), StationCode(1312));
    // Eight transfer stations, each one station id on two lines; no out-of-station links.
    let on_two_lines = net
        .stations
        .iter()
        .filter(|s| net.lines.iter().filter(|l| l.stops.iter().any(|p| p.station == s.id)).count() == 2)
        .count();
    assert_eq!(on_two_lines, 8);
    assert!(net.transfers.is_empty());
}

#[test]
fn the_dalian_rule_has_no_ride_limit_and_rolls_over_at_four() {
    let (_, rule, t) = dalian();
    assert_eq!(t.max_ride_minutes(), None);
    assert_eq!(t.overstay_surcharge_fen(), 0);
    assert_eq!(t.min_fare_fen(), 200);
    assert_eq!(t.min_fare_for(CardType::ORDINARY), Some(160));
    assert_eq!(t.business_day(), BusinessDayRule { utc_offset_minutes: 480, rollover_minute_of_day: 240 });
    assert_eq!(t.discount_percent(CardType::STAFF), Some(0));
    assert_eq!(rule.token_percent, 100);
}

#[test]
fn a_same_station_exit_pays_the_minimum_fare() {
    // 西安路 Xi'an Road in and out: 0 km → minimum fare 2 yuan.
    journey("xian_rd", "xian_rd", 0, 200, 160, 100);
}

#[test]
fn a_short_trip_on_line_1_costs_two_yuan() {
    // Line 1 西安路 → 富国街 → 会展中心 → 星海广场: 1.341 + 0.921 + 0.909 = 3.171 km → 2 yuan.
    journey("xian_rd", "xinghai_sq", 3171, 200, 160, 100);
}

#[test]
fn a_trip_two_metres_under_six_km_costs_two_yuan() {
    // Line 13 九里 → 十三里 → 二十里堡: 3.216 + 2.782 = 5.998 km → 2 yuan.
    journey("jiuli", "ershilipu", 5998, 200, 160, 100);
}

#[test]
fn a_trip_one_metre_over_six_km_costs_three_yuan() {
    // Line 1 香工街 → 中长街 → 兴工街 → 西安路 → 富国街 → 会展中心 → 星海广场:
    // 0.954 + 0.934 + 0.942 + 1.341 + 0.921 + 0.909 = 6.001 km → 3 yuan.
    journey("xianggong_st", "xinghai_sq", 6001, 300, 240, 150);
}

#[test]
fn the_shorter_of_two_routes_sets_the_fare() {
    // 大连站 → 后盐 along Line 3 (香炉礁, 金家街, 泉水): 2.03 + 3.626 + 3.412 + 2.531 = 11.599 km
    // → 3 yuan. Along Line 5 it would be 3.58 + 1.09 + 1.6 + 0.72 + 1.79 + 1.14 + 1.18 + 0.94
    // = 12.04 km, in the 4-yuan band.
    journey("dalian_rs", "houyan", 11_599, 300, 240, 150);
}

#[test]
fn a_trip_just_over_twelve_km_costs_four_yuan() {
    // Line 3 金马路 → 开发区 → 保税区 → 双D港: 2.837 + 2.64 + 6.527 = 12.004 km → 4 yuan.
    journey("jinma_rd", "dd_port", 12_004, 400, 320, 200);
}

#[test]
fn a_trip_across_the_line_1_and_2_transfer_just_under_eighteen_km() {
    // 河口 → Line 1 → 西安路: 2.161 + 1.324 + 1.536 + 1.162 + 1.524 + 1.232 + 0.909 + 0.921 + 1.341
    // = 12.11 km; change to Line 2 → 中山广场: 1.063 + 1.376 + 1.189 + 0.948 + 0.675 + 0.633
    // = 5.884 km; total 17.994 km → 4 yuan.
    journey("hekou", "zhongshan_sq", 17_994, 400, 320, 200);
}

#[test]
fn the_whole_of_line_1_costs_six_yuan() {
    // Line 1 姚家 → 河口, all 21 intervals: 1.546 + 1.55 + 1.273 + 1.336 + 1.377 + 1.327 + 1.583
    // + 2.54 + 0.87 + 0.954 + 0.934 + 0.942 + 1.341 + 0.921 + 0.909 + 1.232 + 1.524 + 1.162 + 1.536
    // + 1.324 + 2.161 = 28.342 km → 6 yuan.
    journey("yaojia", "hekou", 28_342, 600, 480, 300);
}

#[test]
fn a_trip_from_line_1_onto_line_2_costs_six_yuan() {
    // 姚家 → Line 1 → 西安路: 16.232 km (the first 12 intervals above); change to Line 2 → 海之韵:
    // 1.063 + 1.376 + 1.189 + 0.948 + 0.675 + 0.633 + 1.65 + 1.466 + 1.431 + 1.385 + 1.284
    // = 13.1 km; total 29.332 km → 6 yuan.
    journey("yaojia", "haizhiyun", 29_332, 600, 480, 300);
}

#[test]
fn a_trip_from_line_1_to_the_end_of_line_12_costs_eight_yuan() {
    // 星海广场 → Line 1 → 河口: 1.232 + 1.524 + 1.162 + 1.536 + 1.324 + 2.161 = 8.939 km; change to
    // Line 12 → 旅顺新港: 2.05 + 4.584 + 5.19 + 6.415 + 9.312 + 9.302 + 3.34 = 40.193 km;
    // total 49.132 km → 8 yuan.
    journey("xinghai_sq", "lushun_new_port", 49_132, 800, 640, 400);
}

#[test]
fn a_trip_nine_metres_under_fifty_four_km_costs_eight_yuan() {
    // 龙华路 → Line 5 → 后盐: 0.94; Line 3 → 开发区: 5.798 + 3.454 + 2.837 = 12.089; branch 3B → 九里:
    // 2.018 + 2.426 + 1.919 + 2.349 + 2.867 + 2.722 = 14.301; Line 13 → 普湾体育场:
    // 3.216 + 2.782 + 8.525 + 8.11 + 4.028 = 26.661; total 53.991 km → 8 yuan.
    journey("longhua_rd", "puwan_stadium", 53_991, 800, 640, 400);
}

#[test]
fn a_trip_fifteen_metres_over_fifty_four_km_starts_a_new_fifteen_km_step() {
    // 开发区 → branch 3B → 九里: 14.301 km; Line 13 → 普兰店开发区: 3.216 + 2.782 + 8.525 + 8.11
    // + 4.028 + 2.12 + 3.963 + 3.493 + 1.88 + 1.597 = 39.714 km; total 54.015 km → 8 + 1 = 9 yuan.
    journey("dev_zone", "pulandian_dev_zone", 54_015, 900, 720, 450);
}

#[test]
fn a_trip_into_the_second_fifteen_km_step_costs_ten_yuan() {
    // 后盐 → Line 3 → 大连站: 11.599; Line 5 → 青泥洼桥: 0.56; Line 2 → 西安路: 0.948 + 1.189
    // + 1.376 + 1.063 = 4.576; Line 1 → 河口: 12.11; Line 12 → 旅顺新港: 40.193; total 69.038 km,
    // 15.038 km beyond 54 → two steps started → 8 + 2 = 10 yuan.
    journey("houyan", "lushun_new_port", 69_038, 1000, 800, 500);
}

#[test]
fn the_longest_trip_on_the_network_costs_fourteen_yuan() {
    // 旅顺新港 → Line 12 → 河口: 40.193; Line 1 → 西安路: 12.11; Line 2 → 青泥洼桥: 4.576; Line 5 →
    // 大连站: 0.56; Line 3 → 开发区: 2.03 + 3.626 + 3.412 + 2.531 + 5.798 + 3.454 + 2.837 = 23.688;
    // branch 3B → 九里: 14.301; Line 13 → 普兰店振兴街: 43.007 (all 11 intervals); total 138.435 km,
    // 84.435 km beyond 54 → 6 steps of 15 km started → 8 + 6 = 14 yuan.
    journey("lushun_new_port", "pulandian_zhenxing_st", 138_435, 1400, 1120, 700);
    let (_, _, t) = dalian();
    let longest = t.stations().iter().flat_map(|&a| t.stations().iter().map(move |&b| (a, b)));
    let max = longest.filter_map(|(a, b)| t.distance_m(a, b)).max();
    assert_eq!(max, Some(138_435));
}

#[test]
fn the_dalian_table_survives_its_binary_body() {
    let (_, _, t) = dalian();
    let bytes = t.encode();
    assert_eq!(FareTable::decode(&bytes).unwrap(), t);
    // 100 stations: 10,000 fares of 2 bytes and 10,000 distances of 2-3 bytes.
    assert!(bytes.len() < 60_000, "{} bytes", bytes.len());
}
