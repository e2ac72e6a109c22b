//! Bad input: wrong tokens, garbage bodies, oversized bodies, unknown paths. Each gets a JSON
//! error with the right status, and the server goes on.

use clearing::{testdata, ClearingClient, ClearingError, ClientConfig};

use crate::common::{batch, station, TestServer, TOKEN};

#[tokio::test]
async fn requests_without_the_right_token_are_refused_401() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let chain = testdata::ledger(&station(), 3);
    let wrong = ClearingClient::new(&server.base, "not-the-token-at-all", ClientConfig::default()).unwrap();
    assert!(matches!(wrong.upload(&station(), &batch(&chain, 1, 3)).await, Err(ClearingError::Unauthorized)));
    assert!(matches!(wrong.watermark(&station()).await, Err(ClearingError::Unauthorized)));
    let http = reqwest::Client::new();
    let none = http.get(server.url("/v1/stations/xian_rd/watermark")).send().await.unwrap();
    assert_eq!(none.status(), 401);
    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    let body: serde_json::Value = none.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized");
    let basic = http
        .get(server.url("/v1/stations/xian_rd/params"))
        .header("authorization", format!("Basic {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);
    let sub = serde_json::json!({"kind": "qr_keys", "version": 1, "effective_from": 0, "body": {"keys": []}});
    let admin = http.post(server.url("/v1/admin/stations/xian_rd/params")).json(&sub).send().await.unwrap();
    assert_eq!(admin.status(), 401);
    assert_eq!(server.client.stats(&station()).await.unwrap().feed_items, 0);
    assert_eq!(server.client.stats(&station()).await.unwrap().records, 0);
    server.stop().await;
}

#[tokio::test]
async fn garbage_bodies_get_a_json_400_and_the_server_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let http = reqwest::Client::new();
    let bodies: [&[u8]; 6] = [
        b"",
        b"{",
        b"\xff\xfe\x00garbage",
        br#"{"first_index": 1}"#,
        br#"{"first_index": 1, "last_index": 1, "prev_hash": "zz", "last_hash": "00", "records": []}"#,
        br#"[1, 2, 3]"#,
    ];
    for body in bodies {
        let resp = http
            .post(server.url("/v1/stations/xian_rd/batches"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "body {body:?}");
        let err: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(err["code"], "bad_json");
    }
    let resp = http
        .post(server.url("/v1/admin/stations/xian_rd/params"))
        .bearer_auth(TOKEN)
        .body("{\"kind\": \"volcano\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let bad_station =
        http.get(server.url("/v1/stations/no%20such/watermark")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(bad_station.status(), 400);
    let bad_query = http
        .get(server.url("/v1/stations/xian_rd/params?after=minus-one"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_query.status(), 400);
    assert_eq!(bad_query.json::<serde_json::Value>().await.unwrap()["code"], "bad_query");
    let missing = http.get(server.url("/v2/nothing")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<serde_json::Value>().await.unwrap()["code"], "not_found");
    // Still serving, state intact.
    let chain = testdata::ledger(&station(), 3);
    assert_eq!(
        server.client.upload(&station(), &batch(&chain, 1, 3)).await.unwrap(),
        clearing::UploadOutcome::Acked(3)
    );
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_body_is_refused_413_without_being_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), |c| c.max_body_bytes = 4096).await;
    let chain = testdata::ledger(&station(), 40);
    let err = server.client.upload(&station(), &batch(&chain, 1, 40)).await.unwrap_err();
    assert!(
        matches!(&err, ClearingError::Refused { status: 413, code, .. } if code == "body_too_large"),
        "{err}"
    );
    assert_eq!(server.client.stats(&station()).await.unwrap().records, 0);
    server.stop().await;
}

#[tokio::test]
async fn metrics_expose_the_afc_clearing_figures() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let chain = testdata::ledger(&station(), 10);
    server.client.upload(&station(), &batch(&chain, 1, 10)).await.unwrap();
    server.client.upload(&station(), &batch(&chain, 1, 10)).await.unwrap();
    let text = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    for line in [
        "afc_clearing_records{station=\"xian_rd\"} 10",
        "afc_clearing_acked_through{station=\"xian_rd\"} 10",
        "afc_clearing_batches_total{station=\"xian_rd\",outcome=\"acked\"} 1",
        "afc_clearing_batches_total{station=\"xian_rd\",outcome=\"resend\"} 1",
        "afc_clearing_duplicate_keys{station=\"xian_rd\"} 0",
        "# TYPE afc_clearing_unauthorized_total counter",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    server.stop().await;
}

#[tokio::test]
async fn the_binary_serves_with_a_token_file_and_stops_cleanly_on_sigterm() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let key_file = dir.path().join("feed.key");
    std::fs::write(&key_file, hex::encode([5u8; 32])).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_clearing-server"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--token-file")
        .arg(&token_file)
        .arg("--feed-key-file")
        .arg(&key_file)
        .env_remove("AFC_CLEARING_TOKEN")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id();
    let guard = KillOnDrop(child);
    let base = format!("http://127.0.0.1:{port}");
    let client = ClearingClient::new(&base, TOKEN, ClientConfig::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.watermark(&station()).await.is_err() {
        assert!(Instant::now() < deadline, "binary not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let key = client.feed_key().await.unwrap();
    let expected = ed25519_dalek::SigningKey::from_bytes(&[5; 32]).verifying_key().to_bytes();
    assert_eq!(key.public_key, expected);
    let chain = testdata::ledger(&station(), 5);
    assert_eq!(
        client.upload(&station(), &batch(&chain, 1, 5)).await.unwrap(),
        clearing::UploadOutcome::Acked(5)
    );
    let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    let mut guard = guard;
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = guard.0.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "binary did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "exit status {exit}");
}
