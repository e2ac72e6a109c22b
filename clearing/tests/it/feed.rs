//! The signed parameter feed: admin publication, the feed directory, verification, persistence.

use afc_domain::model::{Ident, Timestamp};
use clearing::protocol::{verify_feed_item, FeedError, FeedKind, FeedSubmission};
use serde_json::value::RawValue;

use crate::common::{station, TestServer};

fn submission(kind: FeedKind, version: u64, body: &str) -> FeedSubmission {
    FeedSubmission {
        kind,
        version,
        effective_from: Timestamp(1_800_000_000_000),
        body: RawValue::from_string(body.to_owned()).unwrap(),
    }
}

const QR_KEYS: &str = r#"{"keys": []}"#;

#[tokio::test]
async fn published_feed_items_are_signed_and_verify_with_the_feed_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let c = &server.client;
    let key = c.feed_key().await.unwrap();
    assert_eq!(key.key_id, 7);
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&key.public_key).unwrap();
    let blacklist = r#"{"entries": [{"media": "svc", "first": 3100000000000, "last": 3100000000999}]}"#;
    let item = c.publish(&station(), &submission(FeedKind::BlacklistFull, 10, blacklist)).await.unwrap();
    assert_eq!((item.seq, item.version), (1, 10));
    let delta = r#"{"from_version": 10, "to_version": 11, "add": [{"media": "qr", "id": 5}], "remove": []}"#;
    c.publish(&station(), &submission(FeedKind::BlacklistDelta, 11, delta)).await.unwrap();
    c.publish(&station(), &submission(FeedKind::QrKeys, 1, QR_KEYS)).await.unwrap();

    let page = c.params(&station(), 0).await.unwrap();
    assert_eq!(page.items.len(), 3);
    assert_eq!(page.next_after, 3);
    for item in &page.items {
        assert_eq!(verify_feed_item(&station(), item, key.key_id, &vk), Ok(()));
    }
    assert_eq!(page.items[0].body.get(), blacklist);
    // Another station cannot be fed this station's items.
    assert_eq!(
        verify_feed_item(&Ident::new("heishijiao").unwrap(), &page.items[0], key.key_id, &vk),
        Err(FeedError::BadSignature)
    );
    let later = c.params(&station(), 2).await.unwrap();
    assert_eq!(later.items.len(), 1);
    assert_eq!(later.items[0].kind, FeedKind::QrKeys);
    let none = c.params(&station(), 3).await.unwrap();
    assert!(none.items.is_empty());
    assert_eq!(none.next_after, 3);
    server.stop().await;

    // The feed survives a restart, signatures intact.
    let server = TestServer::start(dir.path()).await;
    let page = server.client.params(&station(), 0).await.unwrap();
    assert_eq!(page.items.len(), 3);
    assert!(page.items.iter().all(|i| verify_feed_item(&station(), i, 7, &vk).is_ok()));
    server.stop().await;
}

#[tokio::test]
async fn a_submission_with_a_bad_body_or_an_old_version_is_refused_422() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let c = &server.client;
    let err =
        c.publish(&station(), &submission(FeedKind::FareRule, 1, r#"{"name": "x"}"#)).await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_body"));
    c.publish(&station(), &submission(FeedKind::QrKeys, 5, QR_KEYS)).await.unwrap();
    let err = c.publish(&station(), &submission(FeedKind::QrKeys, 5, QR_KEYS)).await.unwrap_err();
    assert_eq!(err.code(), Some("version_order"));
    assert_eq!(c.stats(&station()).await.unwrap().feed_items, 1);
    server.stop().await;
}

#[tokio::test]
async fn files_dropped_in_the_feed_directory_are_published_once_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let feed_dir = tempfile::tempdir().unwrap();
    let station_feed = feed_dir.path().join("xian_rd");
    std::fs::create_dir_all(&station_feed).unwrap();
    let write = |name: &str, s: &FeedSubmission| {
        std::fs::write(station_feed.join(name), serde_json::to_vec_pretty(s).unwrap()).unwrap();
    };
    write("001-keys.json", &submission(FeedKind::QrKeys, 1, QR_KEYS));
    write("002-blacklist.json", &submission(FeedKind::BlacklistFull, 1, r#"{"entries": []}"#));
    std::fs::write(station_feed.join("003-garbage.json"), b"{ not json").unwrap();
    std::fs::write(station_feed.join("004-ignored.tmp"), b"partial").unwrap();
    let feed_path = feed_dir.path().to_owned();
    let server = TestServer::start_with(dir.path(), move |c| c.feed_dir = Some(feed_path)).await;
    let c = &server.client;
    let page = c.params(&station(), 0).await.unwrap();
    let kinds: Vec<_> = page.items.iter().map(|i| i.kind).collect();
    assert_eq!(kinds, [FeedKind::QrKeys, FeedKind::BlacklistFull]);
    // Asking again does not publish the same files twice; a new file is taken.
    write("005-keys.json", &submission(FeedKind::QrKeys, 2, QR_KEYS));
    let page = c.params(&station(), 0).await.unwrap();
    assert_eq!(page.items.len(), 3);
    assert_eq!(page.items[2].version, 2);
    server.stop().await;

    // Nor after a restart.
    let feed_path = feed_dir.path().to_owned();
    let server = TestServer::start_with(dir.path(), move |c| c.feed_dir = Some(feed_path)).await;
    assert_eq!(server.client.params(&station(), 0).await.unwrap().items.len(), 3);
    server.stop().await;
}
