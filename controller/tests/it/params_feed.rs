//! The leader pulls the reference clearing server's signed parameter feed, compiles network + fare
//! rule into a fare table, stores it through Raft and requests its automatic rollout.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use afc_domain::model::Timestamp;
use clearing::protocol::{FeedKind, FeedSubmission};
use clearing::{ClearingClient, ClientConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::api::{dalian_rule, small_network, ENGINEER};
use crate::common::*;
use crate::harness::*;
use crate::packages::api_section;

const TOKEN: &str = "clearing-test-token-0123456789";
const FEED_SEED: [u8; 32] = [9; 32];

fn submission(kind: FeedKind, version: u64, body: &Value) -> FeedSubmission {
    FeedSubmission {
        kind,
        version,
        effective_from: Timestamp::from_secs(1_700_000_000),
        body: serde_json::value::to_raw_value(body).unwrap(),
    }
}

async fn get(c: &Cluster, api: &str, path: &str) -> Value {
    let r = c.http.get(format!("http://{api}{path}")).bearer_auth(ENGINEER).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

async fn wait_for(c: &Cluster, api: &str, path: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = get(c, api, path).await;
        if f(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn fare_table_current(list: &Value) -> u64 {
    list.as_array().unwrap().iter().find(|k| k["kind"] == "fare_table").unwrap()["current"].as_u64().unwrap()
}

/// The reference clearing server in process (feed key from [`FEED_SEED`]) and three controllers
/// trusting the feed key of `trusted_seed`, pulling every 200 ms.
struct Setup {
    c: Cluster,
    api: String,
    client: ClearingClient,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), clearing::ServerError>>,
    _data: tempfile::TempDir,
}

impl Setup {
    async fn start(trusted_seed: [u8; 32]) -> Setup {
        Setup::start_with(trusted_seed, &[]).await
    }

    /// [`Setup::start`] with `items` already in station s1's feed when the controllers start.
    async fn start_with(trusted_seed: [u8; 32], items: &[FeedSubmission]) -> Setup {
        let data = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cfg = clearing::Config::new(data.path(), TOKEN);
        cfg.feed_key = ed25519_dalek::SigningKey::from_bytes(&FEED_SEED);
        let stop = CancellationToken::new();
        let server = tokio::spawn(clearing::run(listener, cfg, stop.clone()));
        let client = ClearingClient::new(&format!("http://{addr}"), TOKEN, ClientConfig::default()).unwrap();
        poll("the clearing server", Duration::from_secs(10), || std::net::TcpStream::connect(addr).ok())
            .await;
        for item in items {
            client.publish(&ident("s1"), item).await.unwrap();
        }

        let mut c = Cluster::unstarted(3, Duration::from_secs(20));
        let apis: BTreeMap<u64, String> =
            (1..=3).map(|id| (id, format!("127.0.0.1:{}", free_port()))).collect();
        let feed_key =
            hex::encode(ed25519_dalek::SigningKey::from_bytes(&trusted_seed).verifying_key().to_bytes());
        for id in 1..=3 {
            let dir = c.node_dir(id);
            std::fs::write(dir.join("clearing.token"), TOKEN).unwrap();
            let extra = format!(
                "[clearing]\nurl = \"http://{addr}\"\ntoken_file = \"{token}\"\nfeed_key = \"{feed_key}\"\nfeed_key_id = 1\n\
                 feed_poll_ms = 200\nbackoff_max_ms = 500\n\n{api}",
                token = dir.join("clearing.token").display(),
                api = api_section(&c, id, &apis[&id], ""),
            );
            let raft = "heartbeat_ms = 100\nelection_timeout_min_ms = 400\nelection_timeout_max_ms = 800\nconnect_timeout_ms = 200\n";
            let a = c.initial[&id].clone();
            c.spawn_with(id, a, id == 1, &NodeSetup { raft, extra: &extra, rust_log: "info,openraft=warn" });
        }
        let leader = c.wait_leader(Duration::from_secs(20), None).await;
        let follower = (1..=3).find(|id| *id != leader).unwrap();
        let api = apis[&follower].clone();
        Setup { c, api, client, stop, server, _data: data }
    }

    async fn finish(self) {
        drop(self.c);
        self.stop.cancel();
        let _ = self.server.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_and_fare_rule_from_the_clearing_feed_become_a_fare_table_with_a_rollout_and_other_items_are_refused(
) {
    let _serial = CLUSTER_LOCK.lock().await;
    let st = Setup::start(FEED_SEED).await;
    let (c, api, client) = (&st.c, st.api.clone(), &st.client);

    // A blacklist item (not taken from the feed), then a network and a fare rule.
    let s1 = ident("s1");
    let bl = json!({"entries": [{"media": "svc", "id": 42}]});
    client.publish(&s1, &submission(FeedKind::BlacklistFull, 1, &bl)).await.unwrap();
    client.publish(&s1, &submission(FeedKind::Network, 1, &small_network())).await.unwrap();
    client.publish(&s1, &submission(FeedKind::FareRule, 1, &dalian_rule())).await.unwrap();

    wait_for(c, &api, "/api/v1/parameters", "fare table v1 from the feed", |v| fare_table_current(v) == 1)
        .await;
    // The pair is recorded as compiled right after the package is stored.
    let clearing = wait_for(c, &api, "/api/v1/clearing", "the pair recorded", |v| {
        v["feed"]["compiled_from"] == json!([1, 1])
    })
    .await;
    assert_eq!(clearing["feed"]["after"], 3, "{clearing}");
    assert_eq!(clearing["feed"]["last_fare_table"], 1, "{clearing}");
    assert_eq!(clearing["feed"]["refused"], 1, "the blacklist item: {clearing}");
    assert!(clearing["feed"]["last_refusal"].as_str().unwrap().contains("blacklist_full"), "{clearing}");
    let rollouts = get(c, &api, "/api/v1/rollouts").await;
    let requested = &rollouts["requests"]["fare_table"];
    assert_eq!(requested["to_version"], 1, "the compiled table's rollout is requested: {rollouts}");
    assert_eq!(requested["by"], "params-feed");
    let audit = get(c, &api, "/api/v1/audit?from=1&limit=100").await;
    assert!(audit.as_array().unwrap().iter().any(|a| a["actor"] == "params-feed"), "{audit}");

    // A new fare rule: a new table, compiled by whichever node leads now.
    let mut rule = dalian_rule();
    rule["name"] = json!("dalian 2027");
    client.publish(&s1, &submission(FeedKind::FareRule, 2, &rule)).await.unwrap();
    wait_for(c, &api, "/api/v1/parameters", "fare table v2 from the feed", |v| fare_table_current(v) == 2)
        .await;
    wait_for(c, &api, "/api/v1/clearing", "the new pair recorded", |v| {
        v["feed"]["compiled_from"] == json!([1, 2])
    })
    .await;
    // Nothing is compiled twice from the same pair.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(fare_table_current(&get(c, &api, "/api/v1/parameters").await), 2);

    st.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_items_not_signed_by_the_trusted_feed_key_are_refused_and_compile_nothing() {
    let _serial = CLUSTER_LOCK.lock().await;
    let st = Setup::start([8; 32]).await;
    let (c, api, client) = (&st.c, st.api.clone(), &st.client);
    let s1 = ident("s1");
    client.publish(&s1, &submission(FeedKind::Network, 1, &small_network())).await.unwrap();
    client.publish(&s1, &submission(FeedKind::FareRule, 1, &dalian_rule())).await.unwrap();
    let clearing =
        wait_for(c, &api, "/api/v1/clearing", "both items refused", |v| v["feed"]["refused"] == 2).await;
    assert!(clearing["feed"]["last_refusal"].as_str().unwrap().contains("bad_signature"), "{clearing}");
    assert_eq!(clearing["feed"]["after"], 2);
    assert!(clearing["feed"]["network_version"].is_null(), "{clearing}");
    assert_eq!(fare_table_current(&get(c, &api, "/api/v1/parameters").await), 0);
    st.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_list_items_from_the_clearing_feed_become_a_blacklist_delta_of_bank_ids() {
    let _serial = CLUSTER_LOCK.lock().await;
    let tokens = afc_domain::bank::sample_tokens(3, 5);
    // Two denials, then one taken back: the list gates get holds the two others. Both items are
    // in the feed before the controllers start, so one pull takes both and one delta folds them.
    let deny = |add: &[usize], remove: &[usize]| {
        json!({
            "add": add.iter().map(|i| tokens[*i].to_string()).collect::<Vec<_>>(),
            "remove": remove.iter().map(|i| tokens[*i].to_string()).collect::<Vec<_>>(),
        })
    };
    let items = [
        submission(FeedKind::DenyList, 1, &deny(&[0, 1], &[])),
        submission(FeedKind::DenyList, 2, &deny(&[2], &[1])),
    ];
    let st = Setup::start_with(FEED_SEED, &items).await;
    let (c, api) = (&st.c, st.api.clone());
    let clearing = wait_for(c, &api, "/api/v1/clearing", "the deny list published", |v| {
        v["feed"]["deny_published"] == 2 && v["feed"]["deny_pending"] == 0
    })
    .await;
    assert_eq!(clearing["feed"]["refused"], 0, "{clearing}");
    let version = clearing["feed"]["deny_blacklist"].as_u64().unwrap();
    // The stored package is a signed delta of exactly these bank ids: its body hash says so.
    use afc_domain::blacklist::{BlacklistDelta, Entry};
    use afc_domain::model::Media;
    let bank = |i: usize| Entry::single(Media::Bank, tokens[i].deny_key());
    let want = BlacklistDelta {
        from_version: version - 1,
        to_version: version,
        add: vec![bank(0), bank(2)],
        remove: vec![bank(1)],
    }
    .normalized();
    let body = afc_domain::package::BlacklistBody::Delta(want).encode();
    let header = get(c, &api, &format!("/api/v1/parameters/blacklist/{version}")).await;
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body));
    assert_eq!(header["body_sha256"], sha, "{header}");
    let rollouts = get(c, &api, "/api/v1/rollouts").await;
    assert_eq!(rollouts["requests"]["blacklist"]["to_version"], version, "{rollouts}");
    // Nothing is published twice.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let clearing = get(c, &api, "/api/v1/clearing").await;
    assert_eq!(clearing["feed"]["deny_blacklist"], version, "{clearing}");
    st.finish().await;
}
