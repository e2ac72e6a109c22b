//! The configuration file: the documented example parses, secrets come from a file or env.

use std::path::Path;

use controller::config::Config;

fn example() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/controller.example.toml")
}

#[test]
fn the_documented_example_config_loads_with_a_secret_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(example()).unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef-secret\n").unwrap();
    let text = text.replace("/etc/afc/cluster-secret", secret.to_str().unwrap());
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = Config::load(&path).unwrap();
    assert_eq!(cfg.node_id, 1);
    assert_eq!(cfg.cluster_secret, "0123456789abcdef-secret");
    assert_eq!(cfg.initial_members.len(), 3);
    assert_eq!(cfg.raft.heartbeat_ms, 100);
    cfg.openraft().unwrap();
}

#[test]
fn a_config_without_a_secret_or_with_an_unknown_field_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(example()).unwrap();
    let missing = text.replace("/etc/afc/cluster-secret", "/nonexistent/secret");
    std::fs::write(dir.path().join("a.toml"), missing).unwrap();
    assert!(Config::load(&dir.path().join("a.toml")).is_err());
    std::fs::write(dir.path().join("b.toml"), format!("typo_field = 1\n{text}")).unwrap();
    assert!(Config::load(&dir.path().join("b.toml")).is_err());
}

#[test]
fn the_rollout_policy_is_read_from_the_config_and_nonsense_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef-secret\n").unwrap();
    let text = std::fs::read_to_string(example())
        .unwrap()
        .replace("/etc/afc/cluster-secret", secret.to_str().unwrap());
    let load = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    };
    let cfg = load("ok.toml", &text).unwrap();
    assert_eq!(cfg.rollout.canary_gates.len(), 1);
    assert_eq!(cfg.rollout.soak_ms, 1_800_000);
    for (name, from, to) in [
        ("soak.toml", "soak_ms = 1800000", "soak_ms = -5"),
        ("ppm.toml", "max_canary_reject_ppm = 200000", "max_canary_reject_ppm = 2000000"),
        ("canary.toml", "canary_gates = [\"g01\"]\ncanary_count = 1", "canary_gates = []\ncanary_count = 0"),
        (
            "feedkey.toml",
            "# feed_key = \"<64 hex characters: clearing's feed public key>\"",
            "feed_key = \"abc\"",
        ),
    ] {
        assert!(text.contains(from), "{name}: the example has {from:?}");
        let err = load(name, &text.replace(from, to)).unwrap_err().to_string();
        assert!(err.contains("rollout") || err.contains("feed_key"), "{name}: {err}");
    }
}

#[test]
fn mqtt_duties_without_the_station_signing_key_are_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef-secret\n").unwrap();
    let text = std::fs::read_to_string(example())
        .unwrap()
        .replace("/etc/afc/cluster-secret", secret.to_str().unwrap());
    let line = "signing_key_file = \"/etc/afc/package-signing.key\"\n";
    assert!(text.contains(line) && text.contains("\n[mqtt]\n"), "the example has [mqtt] and the key");
    let path = dir.path().join("nokey.toml");
    std::fs::write(&path, text.replace(line, "")).unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(err.contains("[mqtt] needs api.signing_key_file"), "{err}");
}
