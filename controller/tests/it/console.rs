//! The console in a real headless Chromium, driven through chromedriver's WebDriver HTTP API:
//! log in, see the gates, set emergency release through the guarded dialog, see free passage.
//! In CI (CI=true) a missing Chromium fails the test; elsewhere it says plainly that it skipped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use crate::api::{ApiNode, OPERATOR};
use crate::common::{gate_key, register};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
}

struct Driver {
    child: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start(chromedriver: PathBuf, chromium: PathBuf) -> Driver {
        let port = crate::harness::free_port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let mut d = Driver { child, base, session: String::new(), http };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = d.http.get(format!("{}/status", d.base)).send().await {
                if r.json::<Value>().await.map(|v| v["value"]["ready"] == true).unwrap_or(false) {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"]
        }}}});
        let v = d.cmd("POST", "/session", caps).await;
        d.session = v["sessionId"].as_str().unwrap().to_owned();
        d
    }

    async fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let rb = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let r = rb.send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}: {text}"));
        assert!(status.is_success(), "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    async fn find(&self, css: &str) -> String {
        let v = self.cmd("POST", "/element", json!({"using": "css selector", "value": css})).await;
        v[ELEMENT].as_str().unwrap_or_else(|| panic!("find {css}: {v}")).to_owned()
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd("POST", &format!("/element/{e}/click"), json!({})).await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd("POST", &format!("/element/{e}/value"), json!({"text": text})).await;
    }

    async fn js(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", json!({"script": script, "args": []})).await
    }

    /// Polls a script until it returns true.
    async fn wait_for(&self, what: &str, script: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.js(script).await != Value::Bool(true) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_logs_in_sees_the_gates_and_sets_emergency_release_with_confirmation() {
    let (Some(driver), Some(chromium)) = (on_path("chromedriver"), on_path("chromium")) else {
        assert!(
            std::env::var("CI").map(|v| v != "true").unwrap_or(true),
            "chromium and chromium-driver are required in CI"
        );
        eprintln!("SKIPPED: chromium or chromedriver not on PATH (Debian: apt-get install chromium chromium-driver)");
        return;
    };
    let n = ApiNode::start(true).await;
    for (i, g) in ["g01", "g02", "g03", "g04"].iter().enumerate() {
        n.admin_write(&register(g, &gate_key(i as u8 + 1))).await;
    }
    let d = Driver::start(driver, chromium).await;
    d.cmd("POST", "/url", json!({"url": format!("http://{}/", n.api)})).await;
    d.type_into("#token", OPERATOR).await;
    d.click("#login").await;
    d.wait_for("four gates", "return document.querySelectorAll('#gates .gate').length === 4").await;
    d.wait_for("normal passage", "return document.querySelectorAll('.gate.free').length === 0").await;

    // The dialog refuses without the confirmation box ticked.
    d.click("#er-open").await;
    d.type_into("#er-reason", "fire alarm at exit B").await;
    d.click("#er-submit").await;
    d.wait_for(
        "a refusal",
        "return document.getElementById('er-error').textContent.includes('confirmation')",
    )
    .await;
    assert_eq!(n.get("/api/v1/mode", OPERATOR).await["emergency_release"], false);

    d.click("#er-confirm").await;
    d.click("#er-submit").await;
    d.wait_for("free passage on every gate", "return document.querySelectorAll('.gate.free').length === 4 && !document.getElementById('mode-er').classList.contains('hidden')").await;
    let mode = n.get("/api/v1/mode", OPERATOR).await;
    assert_eq!(mode["emergency_release"], true);
    assert_eq!(mode["history"][0]["actor"], "otto");
    assert_eq!(mode["history"][0]["reason"], "fire alarm at exit B");

    // A parameter upload shows its rollout (this node runs no leader duties: it stays requested).
    let upload = json!({"full": [{"media": "svc", "id": 7}], "reason": "stolen card"});
    let (s, v) = n
        .call(reqwest::Method::POST, "/api/v1/parameters/blacklist", Some(crate::api::ENGINEER), Some(upload))
        .await;
    assert_eq!(s, reqwest::StatusCode::OK, "{v}");
    d.wait_for(
        "the blacklist rollout in the parameters table",
        "return [...document.querySelectorAll('#params td.rollout')].some((td) => td.textContent === 'v1 requested')",
    )
    .await;

    let png = d.cmd("GET", "/screenshot", Value::Null).await;
    let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-emergency-release.png");
    std::fs::write(&path, bytes).unwrap();
    eprintln!("screenshot: {}", path.display());
    d.cmd("DELETE", "", Value::Null).await;
    n.stop().await;
}
