#!/usr/bin/env python3
"""Convert the Dalian Metro sample data into the project's network description and fare rule.

Input:  the research file `dalian-metro.json` (default: /work/shared/data/dalian-metro.json; pass
        another path as the first argument).
Output: `dalian-network.json` and `dalian-fare-rule.json` beside this script.

Standard library only. The output is deterministic, so re-running it on the same input gives
byte-identical files (check with `git diff`).

Rules applied (see PROVENANCE.md):
- Station codes: line_number * 100 + position (1-based) on the first line, in the order
  1, 2, 3, 3B, 5, 12, 13, on which the station appears. The Jiuli branch 3B uses 39 as its
  "line number" (39xx), because line 4 is under construction and will need 4xx.
- km_from_prev -> metres, rounded to the nearest metre.
- A transfer entry naming one station id is an in-station transfer: the same id on two lines,
  nothing to emit. One naming two ids would be an out-of-station link and needs a distance.
- The fare bands are taken from the source's band list (km -> m, yuan -> fen) and checked against
  the published rule literally written below.
"""

import json
import os
import sys

LINE_ORDER = ["1", "2", "3", "3B", "5", "12", "13"]
LINE_NUMBER = {"1": 1, "2": 2, "3": 3, "3B": 39, "5": 5, "12": 12, "13": 13}

# The published rule, literally (SPEC §3 and source 16 of dalian-metro-sources.md).
EXPECTED_BANDS = [(6000, 200), (12000, 300), (18000, 400), (26000, 500), (34000, 600), (44000, 700),
                  (54000, 800)]
EXPECTED_BEYOND = {"fen": 100, "per_m": 15000}

# Percent of the full fare each card type pays. The source lists groups in prose; this is the
# mapping onto the project's card types. `staff` is an ASSUMPTION (see PROVENANCE.md).
DISCOUNTS = {
    "ordinary": 80,      # ordinary Mingzhu card, 8折
    "student": 50,       # Mingzhu student card, 5折
    "senior": 50,        # Mingzhu senior card, ages 60-69, 5折
    "elderly_free": 0,   # ages 70+ and the listed groups: free
    "disabled": 0,       # disabled persons: free
    "staff": 0,          # metro staff pass: ASSUMPTION, not published
}


def metres(km):
    return int(round(km * 1000))


def convert(src):
    stations = {}  # id -> station dict, in order of first appearance
    lines = []
    for line_id in LINE_ORDER:
        matches = [line for line in src["lines"] if line["id"] == line_id]
        if len(matches) != 1:
            sys.exit(f"line {line_id}: expected exactly one entry in the source, found {len(matches)}")
        line = matches[0]
        stops = []
        for pos, st in enumerate(line["stations"], start=1):
            sid = st["id"]
            if sid not in stations:
                stations[sid] = {
                    "code": LINE_NUMBER[line_id] * 100 + pos,
                    "id": sid,
                    "name_zh": st["name_zh"],
                    "name_en": st["name_en"],
                }
            else:
                known = stations[sid]
                if (known["name_zh"], known["name_en"]) != (st["name_zh"], st["name_en"]):
                    print(f"note: {sid} is named differently on line {line_id}; keeping the first names",
                          file=sys.stderr)
            km = st["km_from_prev"]
            if pos == 1:
                if km is not None:
                    sys.exit(f"line {line_id}: first stop {sid} has a distance from a previous stop")
                stops.append({"station": sid, "m_from_prev": None})
            else:
                if km is None or km <= 0:
                    sys.exit(f"line {line_id}: stop {sid} has no positive km_from_prev")
                stops.append({"station": sid, "m_from_prev": metres(km)})
        lines.append({"id": line_id, "name": line["name"], "stops": stops})

    transfers = []
    for t in src["transfers"]:
        ids = t["station_ids"]
        for sid in ids:
            if sid not in stations:
                sys.exit(f"transfer {t['name_zh']}: unknown station {sid}")
        if len(ids) == 1:
            on = [line["id"] for line in lines if any(s["station"] == ids[0] for s in line["stops"])]
            if sorted(on) != sorted(t["lines"]):
                sys.exit(f"transfer {ids[0]}: source says lines {t['lines']}, stops are on {on}")
        elif len(ids) == 2:
            if "m" not in t:
                sys.exit(f"transfer {ids}: an out-of-station link needs a walking distance in metres")
            transfers.append({"from": ids[0], "to": ids[1], "m": int(t["m"])})
        else:
            sys.exit(f"transfer {ids}: expected one or two station ids")

    codes = [s["code"] for s in stations.values()]
    if len(set(codes)) != len(codes):
        sys.exit("duplicate station codes")

    network = {
        "name": "Dalian Metro: lines 1, 2, 3 (with the Jiuli branch 3B), 5, 12, 13",
        "provenance": [
            "Converted by deploy/data/convert_dalian.py from dalian-metro.json; see deploy/data/PROVENANCE.md.",
            "Station order and names: official dltransgrp.com network-map data (2024-05-13) via "
            "CGo-Project/CGo-OpenMap, cross-checked against two independent station lists.",
            "Distances: Line 5 intervals and Line 12 Hekou-Caidaling are published (Wikipedia station "
            "tables); Lines 3, 3B, 12 (rest) and 13 are RECONSTRUCTED from official fare bands by "
            "CGo-OpenMap, not published; Lines 1 and 2 are ESTIMATED (great-circle distance between "
            "stations scaled to the official line length).",
            "Station codes: line x 100 + position on the first line (order 1, 2, 3, 3B=39, 5, 12, 13); "
            "project convention, not Dalian's card codes.",
            "All 8 transfer stations are in-station (one station id on two lines); no out-of-station "
            "fare transfers.",
        ],
        "stations": list(stations.values()),
        "lines": lines,
        "transfers": transfers,
    }

    rule_src = src["fare_rule"]
    if not rule_src.get("band_boundaries_inclusive_upper"):
        sys.exit("fare rule: expected inclusive band upper limits")
    bands = []
    for b in rule_src["bands"]:
        if b["to_km"] is None:
            continue
        bands.append({"up_to_m": metres(b["to_km"]), "fare_fen": int(round(b["fare"] * 100))})
    if [(b["up_to_m"], b["fare_fen"]) for b in bands] != EXPECTED_BANDS:
        sys.exit(f"fare rule: bands {bands} differ from the published rule {EXPECTED_BANDS}")
    beyond = {"fen": int(round(rule_src["step_fare"] * 100)),
              "per_m": metres(rule_src["step_distance_after_54km"])}
    if beyond != EXPECTED_BEYOND:
        sys.exit(f"fare rule: beyond {beyond} differs from the published rule {EXPECTED_BEYOND}")
    if rule_src.get("time_limit_or_overstay_rule") is not None:
        sys.exit("fare rule: the source now has a time limit; convert it")

    rule = {
        "name": "Dalian Metro distance fare: 2 yuan up to 6 km, +1 yuan at 12, 18, 26, 34, 44, 54 km, "
                "then +1 yuan per 15 km started",
        "bands": bands,
        "beyond": beyond,
        "min_fare_fen": bands[0]["fare_fen"],
        "discounts": DISCOUNTS,
        "token_percent": 100,
        "max_ride_minutes": None,
        "overstay_surcharge_fen": 0,
        "business_day": {"utc_offset_minutes": 480, "rollover_minute_of_day": 240},
    }
    return network, rule


def main():
    src_path = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/dalian-metro.json"
    with open(src_path, encoding="utf-8") as f:
        src = json.load(f)
    network, rule = convert(src)
    here = os.path.dirname(os.path.abspath(__file__))
    for name, doc in [("dalian-network.json", network), ("dalian-fare-rule.json", rule)]:
        with open(os.path.join(here, name), "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=2)
            f.write("\n")
    n_stops = sum(len(line["stops"]) for line in network["lines"])
    print(f"{len(network['stations'])} stations, {len(network['lines'])} lines, {n_stops} stops, "
          f"{len(network['transfers'])} out-of-station links")


if __name__ == "__main__":
    main()
