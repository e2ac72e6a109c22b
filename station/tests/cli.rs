//! The `station` executable dispatches to each service's own command line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn station(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_station")).args(args).output().expect("run station")
}

#[test]
fn every_service_answers_its_own_help() {
    for (service, expect) in [
        ("controller", "Station controller node"),
        ("gate-agent", "AFC gate agent"),
        ("plc-sim", "Simulated gate PLC"),
        ("reader-sim", "Simulated card reader"),
        ("clearing-server", "Reference central clearing server"),
        ("broker", "MQTT broker"),
    ] {
        let out = station(&[service, "--help"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{service} --help failed: {out:?}");
        assert!(text.contains(expect), "{service} --help printed {text}");
    }
}

#[test]
fn the_station_itself_explains_what_it_runs() {
    let out = station(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--data-dir") && text.contains("--gates"), "{text}");
    let out = station(&["down"]);
    assert!(!out.status.success(), "an unknown command must fail");
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value"), "{out:?}");
}
