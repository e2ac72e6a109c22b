//! A server per test: temp data dir, port chosen at run time, readiness polled, stopped on drop.

use std::path::Path;
use std::time::{Duration, Instant};

use afc_domain::ledger::{LedgerEntry, GENESIS_HASH};
use afc_domain::model::Ident;
use clearing::protocol::UploadBatch;
use clearing::{ClearingClient, ClientConfig, Config};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub fn station() -> Ident {
    Ident::new("xian_rd").unwrap()
}

/// The batch of entries `first..=last` (1-based) of `chain`.
pub fn batch(chain: &[LedgerEntry], first: u64, last: u64) -> UploadBatch {
    let prev = if first == 1 { GENESIS_HASH } else { chain[first as usize - 2].hash };
    UploadBatch::new(prev, chain[first as usize - 1..last as usize].to_vec()).unwrap()
}

pub struct TestServer {
    pub base: String,
    pub client: ClearingClient,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), clearing::ServerError>>>,
}

impl TestServer {
    /// Starts a server on `data_dir` with `adjust` applied to the default test configuration.
    pub async fn start_with(data_dir: &Path, adjust: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config::new(data_dir, TOKEN);
        config.feed_key = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
        config.feed_key_id = 7;
        adjust(&mut config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(clearing::run(listener, config, shutdown.clone()));
        let client = ClearingClient::new(&base, TOKEN, ClientConfig::default()).unwrap();
        let server = TestServer { base, client, shutdown, task: Some(task) };
        server.wait_ready().await;
        server
    }

    pub async fn start(data_dir: &Path) -> TestServer {
        TestServer::start_with(data_dir, |_| {}).await
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", self.base)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "server at {} not ready", self.base);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the server and waits until it has finished.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
