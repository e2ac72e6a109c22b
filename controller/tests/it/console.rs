//! The console: its string table and page checked without a browser (every key in both languages,
//! every name the backend emits, no inline script or style, a policy without `unsafe-inline`), then
//! in a real headless Chromium driven through chromedriver's WebDriver HTTP API: log in, see the
//! gates, set emergency release through the guarded dialog; the console in Chinese and in English
//! (screenshots checked for missing glyphs), a mode bit set and cleared, a command answered by a
//! stand-in gate on the embedded broker, the flow chart moving with records written to the ledger.
//! In CI (CI=true) a missing Chromium fails the test; elsewhere it says plainly that it skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use afc_domain::ledger::TxRecord;
use afc_domain::mode::ModeBits;
use afc_domain::model::{Direction, ParamKind, Reason, Timestamp};
use afc_domain::wire::{
    AlarmKind, Command as WireCommand, CommandAck, CommandResult, GateBirth, GateCounters, GateDirection,
    GateEvent, GateStatus, HardwareInfo, Heartbeat, PlcEndpoint,
};
use base64::Engine;
use controller::state::Request;
use ed25519_dalek::SigningKey;
use serde_json::{json, Value};

use crate::api::{ApiNode, OPERATOR};
use crate::common::{gate_key, ident, open_from_station, record, register};
use crate::mqtt::FakeGate;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// chromedriver and chromium, or None when the test skips (never under `CI=true`).
fn browser() -> Option<(PathBuf, PathBuf)> {
    let (Some(driver), Some(chromium)) = (on_path("chromedriver"), on_path("chromium")) else {
        assert!(
            std::env::var("CI").map(|v| v != "true").unwrap_or(true),
            "chromium and chromium-driver are required in CI"
        );
        eprintln!("SKIPPED: chromium or chromedriver not on PATH (Debian: apt-get install chromium chromium-driver)");
        return None;
    };
    Some((driver, chromium))
}

/// The console's string table: language → key → text.
fn strings() -> BTreeMap<String, BTreeMap<String, String>> {
    let s = controller::console::STRINGS;
    let json = s
        .split_once("\nwindow.I18N = ")
        .map(|(_, j)| j.trim_end().trim_end_matches(';'))
        .expect("i18n.js assigns window.I18N");
    serde_json::from_str(json).expect("the table after `window.I18N = ` is JSON")
}

/// Every `attr="value"` value in `text`.
fn attr_values<'a>(text: &'a str, attr: &str) -> Vec<&'a str> {
    let pat = format!("{attr}=\"");
    text.match_indices(&pat).filter_map(|(i, _)| text[i + pat.len()..].split('"').next()).collect()
}

/// The keys the script looks up literally: `t("key"` and `t("key", ...)`.
fn script_keys(script: &str) -> Vec<&str> {
    script
        .match_indices("t(\"")
        .filter(|(i, _)| !script[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
        .filter_map(|(i, _)| script[i + 3..].split('"').next())
        .collect()
}

fn has_cjk(s: &str) -> bool {
    s.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c))
}

#[test]
fn every_console_string_exists_in_chinese_and_english_and_names_every_code_the_backend_emits() {
    let table = strings();
    assert_eq!(table.keys().collect::<Vec<_>>(), ["en", "zh-CN"], "the languages");
    let (en, zh) = (&table["en"], &table["zh-CN"]);
    let only_en: Vec<_> = en.keys().filter(|k| !zh.contains_key(*k)).collect();
    let only_zh: Vec<_> = zh.keys().filter(|k| !en.contains_key(*k)).collect();
    assert!(
        only_en.is_empty() && only_zh.is_empty(),
        "missing in zh-CN: {only_en:?}; missing in en: {only_zh:?}"
    );
    let empty: Vec<_> = en.iter().chain(zh.iter()).filter(|(_, v)| v.trim().is_empty()).collect();
    assert!(empty.is_empty(), "empty strings: {empty:?}");

    // Every name the backend can put in front of staff.
    let json_name = |v: Value| v.as_str().unwrap().to_owned();
    let mut needed: Vec<String> = Vec::new();
    needed.extend(Reason::ALL.iter().map(|r| format!("reason.{}", r.as_str())));
    needed.extend(AlarmKind::ALL.iter().map(|a| format!("alarm.{}", json_name(json!(a)))));
    needed.extend(ModeBits::NAMED.iter().map(|(_, n)| format!("mode.{n}")));
    needed.extend(ModeBits::NORMAL.names().iter().map(|n| format!("mode.{n}")));
    needed.extend(
        ["open_once_entry", "open_once_exit", "set_direction", "out_of_service", "in_service"]
            .iter()
            .map(|c| format!("cmd.{c}")),
    );
    for d in [GateDirection::Closed, GateDirection::Entry, GateDirection::Exit, GateDirection::Bidirectional]
    {
        needed.push(format!("dir.{}", json_name(json!(d))));
    }
    for d in [Direction::Entry, Direction::Exit] {
        needed.push(format!("dir.{}", json_name(json!(d))));
    }
    for r in [CommandResult::Ok, CommandResult::Expired, CommandResult::Rejected, CommandResult::Failed] {
        needed.push(format!("result.{}", json_name(json!(r))));
    }
    needed.extend(ParamKind::ALL.iter().map(|k| format!("kind.{k}")));
    needed.extend(
        ["leader", "follower", "candidate", "learner", "shutdown"].iter().map(|r| format!("role.{r}")),
    );
    // Every key the page and the script look up.
    let page = controller::console::PAGE;
    let script = controller::console::SCRIPT;
    needed.extend(attr_values(page, "data-i18n").into_iter().map(str::to_owned));
    needed.extend(script_keys(script).into_iter().map(str::to_owned));
    let missing: BTreeSet<&String> = needed.iter().filter(|k| !zh.contains_key(*k)).collect();
    assert!(missing.is_empty(), "keys the console needs that i18n.js lacks: {missing:?}");
    // Names in Chinese are Chinese (not an English text copied over).
    let untranslated: Vec<&String> = zh
        .iter()
        .filter(|(k, v)| {
            ["reason.", "alarm.", "mode.", "cmd.", "title"].iter().any(|p| k.starts_with(p)) && !has_cjk(v)
        })
        .map(|(k, _)| k)
        .collect();
    assert!(untranslated.is_empty(), "not in Chinese: {untranslated:?}");
    // The script's mode bits are the domain's, in bit order.
    let listed = ModeBits::NAMED.iter().map(|(_, n)| format!("\"{n}\"")).collect::<Vec<_>>().join(", ");
    let bits_in_script: String = script.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(bits_in_script.contains(&listed), "console.js MODE_BITS is not [{listed}]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_page_has_no_inline_script_or_style_and_its_policy_allows_none() {
    let page = controller::console::PAGE;
    let lower = page.to_ascii_lowercase();
    for (i, _) in lower.match_indices("<script") {
        let tag = &lower[i..i + lower[i..].find('>').unwrap()];
        assert!(tag.contains(" src="), "an inline script: {tag}>");
        assert!(lower[i..].split_once('>').unwrap().1.starts_with("</script>"), "a script with a body");
    }
    assert!(!lower.contains("<style"), "an inline style element");
    assert!(!lower.contains(" style="), "a style attribute");
    assert!(!lower.contains("javascript:"), "a javascript: URL");
    let handlers: Vec<String> = lower
        .match_indices(" on")
        .filter_map(|(i, _)| {
            let rest = &lower[i + 1..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_lowercase()).collect();
            (name.len() > 2 && rest[name.len()..].starts_with('=')).then_some(name)
        })
        .collect();
    assert!(handlers.is_empty(), "inline handlers: {handlers:?}");

    let n = ApiNode::start(true).await;
    for (path, ctype, body) in [
        ("/", "text/html; charset=utf-8", page),
        ("/console.js", "text/javascript; charset=utf-8", controller::console::SCRIPT),
        ("/i18n.js", "text/javascript; charset=utf-8", controller::console::STRINGS),
        ("/console.css", "text/css; charset=utf-8", controller::console::STYLE),
    ] {
        let r = n.http.get(format!("http://{}{path}", n.api)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        assert_eq!(h("content-type"), ctype, "{path}");
        let csp = h("content-security-policy");
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{path}: {csp}");
        for d in ["default-src 'self'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"] {
            assert!(csp.split(';').any(|x| x.trim() == d), "{path}: {d} not in {csp}");
        }
        assert_eq!(h("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(r.text().await.unwrap(), body, "{path}");
    }
    n.stop().await;
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
    /// chromedriver and one headless Chromium session whose browser asks for `lang` first.
    async fn start(chromedriver: PathBuf, chromium: PathBuf, lang: &str) -> Driver {
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
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", format!("--lang={lang}"), "--hide-scrollbars"],
            "prefs": {"intl.accept_languages": lang}
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
        self.on_element(css, "click", json!({})).await;
    }

    /// Finds `css` and sends it `action`. The console redraws its tables as it polls, so an element
    /// found just before a redraw is stale by the time it is acted on: found again, up to 10 times.
    async fn on_element(&self, css: &str, action: &str, body: Value) {
        for attempt in 1..=10 {
            let e = self.find(css).await;
            let url = format!("{}/session/{}/element/{e}/{action}", self.base, self.session);
            let r = self.http.post(url).json(&body).send().await.unwrap();
            let status = r.status();
            let text = r.text().await.unwrap();
            if status.is_success() {
                return;
            }
            assert!(
                text.contains("stale element reference") && attempt < 10,
                "WebDriver {action} on {css}: {status} {text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.on_element(css, "value", json!({"text": text})).await;
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

    /// A screenshot of the page, saved as `path`, checked to be a PNG of the window's size whose
    /// pixels are not all one colour (decoded by the browser itself: `img-src data:` allows it).
    async fn screenshot(&self, path: &Path) {
        let png = self.cmd("GET", "/screenshot", Value::Null).await;
        let b64 = png.as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR");
        let (w, h) = (
            u32::from_be_bytes(bytes[16..20].try_into().unwrap()),
            u32::from_be_bytes(bytes[20..24].try_into().unwrap()),
        );
        assert!(w >= 800 && h >= 600, "{w}×{h}");
        std::fs::write(path, &bytes).unwrap();
        let colours = self
            .cmd(
                "POST",
                "/execute/async",
                json!({"script": r#"
                    const done = arguments[arguments.length - 1];
                    const img = new Image();
                    img.onload = () => {
                      const c = document.createElement("canvas");
                      c.width = img.width; c.height = img.height;
                      const g = c.getContext("2d");
                      g.drawImage(img, 0, 0);
                      const px = g.getImageData(0, 0, c.width, c.height).data;
                      const seen = new Set();
                      for (let i = 0; i < px.length && seen.size < 1000; i += 4 * 97) seen.add((px[i] << 16) | (px[i + 1] << 8) | px[i + 2]);
                      done(seen.size);
                    };
                    img.onerror = () => done(-1);
                    img.src = "data:image/png;base64," + arguments[0];
                "#, "args": [b64]}),
            )
            .await;
        assert!(colours.as_i64().unwrap_or(0) > 10, "{}: {colours} colours", path.display());
        eprintln!("screenshot: {} ({w}×{h}, {} bytes, {colours}+ colours)", path.display(), bytes.len());
    }

    /// Missing glyphs on the page: every distinct CJK character of the page's visible text drawn
    /// alone on a canvas in the page's own font, compared with what the same font draws for
    /// code points no font has (unassigned: U+0378, U+0379, U+0380; what a missing glyph looks
    /// like with this font stack, the .notdef box or nothing). A character whose bitmap is blank
    /// or equals that bitmap, or whose bitmap is shared by more than a few others (every missing
    /// glyph draws the same box), is tofu. Returns (characters checked, tofu characters).
    async fn missing_glyphs(&self, extra: &str) -> (u64, String) {
        let v = self
            .cmd(
                "POST",
                "/execute/sync",
                json!({"script": r##"
                    const font = "32px " + getComputedStyle(document.body).fontFamily;
                    const c = document.createElement("canvas");
                    c.width = 48; c.height = 48;
                    const g = c.getContext("2d", { willReadFrequently: true });
                    const draw = (ch) => {
                      g.clearRect(0, 0, 48, 48);
                      g.font = font; g.fillStyle = "#000"; g.textBaseline = "top";
                      g.fillText(ch, 4, 4);
                      const px = g.getImageData(0, 0, 48, 48).data;
                      let s = "", ink = 0;
                      for (let i = 3; i < px.length; i += 4) { s += px[i] > 127 ? "1" : "0"; if (px[i] > 127) ink++; }
                      return ink ? s : "blank";
                    };
                    const missing = new Set(["\u0378", "\u0379", "\u0380"].map(draw));
                    const text = document.body.innerText + arguments[0];
                    const chars = [...new Set([...text].filter((ch) => /[\u3400-\u9fff\uff00-\uffef]/.test(ch) || ch === "\u0378"))];
                    const byBitmap = new Map();
                    for (const ch of chars) { const b = draw(ch); byBitmap.set(b, (byBitmap.get(b) || []).concat([ch])); }
                    const tofu = [];
                    for (const [b, cs] of byBitmap) if (b === "blank" || missing.has(b) || cs.length > 3) tofu.push(...cs);
                    return [chars.length, tofu.join("")];
                "##, "args": [extra]}),
            )
            .await;
        (v[0].as_u64().unwrap(), v[1].as_str().unwrap().to_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_logs_in_sees_the_gates_and_sets_emergency_release_with_confirmation() {
    let Some((driver, chromium)) = browser() else { return };
    let n = ApiNode::start(true).await;
    for (i, g) in ["g01", "g02", "g03", "g04"].iter().enumerate() {
        n.admin_write(&register(g, &gate_key(i as u8 + 1))).await;
    }
    let d = Driver::start(driver, chromium, "en-US").await;
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

    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-emergency-release.png");
    d.screenshot(&path).await;
    d.cmd("DELETE", "", Value::Null).await;
    n.stop().await;
}

/// `[api]` lines (and the `[mqtt]` section after them) for an ApiNode running the embedded broker
/// on `port` with the leader's duties, gate g01 seeded with key 1.
fn mqtt_section(port: u16) -> String {
    format!(
        r#"
[mqtt]
broker = "embedded"
embedded_allow_anonymous = true
embedded_listen = "127.0.0.1:{port}"
address = "127.0.0.1:{port}"
client_id_prefix = "ctl"
station_code = 101
backoff_max_ms = 500
command_timeout_ms = 5000

[[mqtt.gates]]
gate = "g01"
tx_public_key = "{key}"
"#,
        key = hex::encode(gate_key(1).verifying_key().to_bytes()),
    )
}

fn topic(t: &str) -> String {
    format!("afc/v1/s1/{t}")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A signed batch from `gate` of `seqs`, happening now: entries, then `exits` exits, one refusal
/// (no entry record) last.
fn live_batch(gate: &str, key: &SigningKey, seqs: std::ops::RangeInclusive<u64>, exits: u64) -> Request {
    let last = *seqs.end();
    let first_exit = last - exits;
    let records: Vec<TxRecord> = seqs
        .map(|seq| {
            let mut r = record("s1", gate, seq);
            r.occurred_at = Timestamp(now_ms());
            if seq >= first_exit {
                r.direction = Direction::Exit;
            }
            if seq == last {
                r.accepted = false;
                r.reason = Reason::NoEntry;
            }
            r
        })
        .collect();
    let sig = controller::chain::sign_batch(&ident("s1"), &ident(gate), &records, key);
    Request::AppendTxBatch {
        station: ident("s1"),
        gate: ident(gate),
        records: records.into_iter().map(afc_domain::ledger::CanonicalRecord::from).collect(),
        signature: hex::encode(sig),
        covers_from: None,
    }
}

fn heartbeat(seq: u64) -> Heartbeat {
    Heartbeat {
        at: Timestamp(now_ms()),
        seq,
        counters: GateCounters { taps: 12, entries: 7, exits: 4, rejects: 1, ..GateCounters::default() },
        outbox_depth: 0,
        outbox_bytes: 0,
        outbox_capacity_bytes: 1000,
        plc_online: true,
        direction: GateDirection::Bidirectional,
        in_service: true,
        free_passage: false,
        alarms: vec![],
        versions: Default::default(),
    }
}

/// The console's whole working day in one browser: Chinese by default for a Chinese browser,
/// switched to English and remembered, a mode bit set and cleared with a reason, a gate's detail
/// (counters, alarm with its time, refusals by reason) and a command it answers, the flow chart
/// moving with traffic; a screenshot per language with no missing glyph.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_chinese_and_english_sets_a_mode_bit_commands_a_gate_and_charts_the_flow() {
    let Some((driver, chromium)) = browser() else { return };
    let port = crate::harness::free_port();
    let n = ApiNode::start_with(true, &mqtt_section(port)).await;
    let shots =
        tempfile::Builder::new().prefix("console-shots").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let g2 = gate_key(2);
    n.admin_write(&register("g02", &g2)).await;

    // The stand-in gate g01: birth and a heartbeat, signed with its key; it answers commands.
    crate::common::poll("the embedded broker", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .await;
    let mut g = FakeGate::connect(port, "fake-g01", &[topic("state"), topic("gates/g01/cmd")]).await;
    let birth = GateStatus::Online(GateBirth {
        session: "sess-1".into(),
        versions: BTreeMap::new(),
        hardware: HardwareInfo {
            profile: "default".into(),
            plc: PlcEndpoint { address: "127.0.0.1:502".into(), unit_id: 1 },
            agent_version: "test".into(),
        },
    });
    // The leader's session may not be up yet: repeat until the board shows g01 online.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seq = 0;
    loop {
        seq += 1;
        g.publish_signed(&topic("gates/g01/status"), &birth, 1).await;
        g.publish_signed(&topic("gates/g01/heartbeat"), &heartbeat(seq), 1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let gate = n.get("/api/v1/gates/g01", OPERATOR).await;
        if gate["online"] == true && gate["counters"]["entries"] == 7 {
            break;
        }
        assert!(Instant::now() < deadline, "g01 never showed online: {gate}");
    }
    let raised = now_ms();
    let ev = GateEvent { at: Timestamp(raised), kind: AlarmKind::DoorFault, cleared: false, detail: None };
    g.publish_signed(&topic("gates/g01/events"), &ev, 1).await;

    // (a) Chinese first: the browser asks for zh-CN.
    let d = Driver::start(driver, chromium, "zh-CN").await;
    d.cmd("POST", "/url", json!({"url": format!("http://{}/", n.api)})).await;
    d.wait_for("the page in Chinese", "return document.documentElement.lang === 'zh-CN' && document.getElementById('login').textContent === '登录'").await;
    d.type_into("#token", OPERATOR).await;
    d.click("#login").await;
    d.wait_for("two gates", "return document.querySelectorAll('#gates .gate').length === 2").await;
    d.wait_for(
        "the mode panel in Chinese",
        "return document.getElementById('mode-title').textContent === '车站运营模式' && document.getElementById('mode-names').textContent === '正常模式'",
    )
    .await;
    let (checked, tofu) = d.missing_glyphs("").await;
    assert!(checked > 50, "only {checked} Chinese characters on the page");
    assert!(tofu.is_empty(), "characters drawn as missing glyphs: {tofu:?}");
    // The check sees tofu where there is some: unassigned code points are reported.
    let (_, control) = d.missing_glyphs("\u{0378}").await;
    assert!(control.contains('\u{0378}'), "the glyph check does not see a missing glyph: {control:?}");
    d.screenshot(&shots.path().join("console-zh-CN.png")).await;

    // Switch to English: the strings follow, and the choice survives a reload.
    d.js("const s = document.getElementById('lang'); s.value = 'en'; s.dispatchEvent(new Event('change'));")
        .await;
    d.wait_for("the mode panel in English", "return document.documentElement.lang === 'en' && document.getElementById('mode-title').textContent === 'Station mode' && document.getElementById('mode-names').textContent === 'normal'").await;
    d.cmd("POST", "/refresh", json!({})).await;
    d.wait_for("English after a reload", "return document.documentElement.lang === 'en' && document.getElementById('mode-title').textContent === 'Station mode' && document.querySelectorAll('#gates .gate').length === 2").await;
    let (_, tofu) = d.missing_glyphs("").await;
    assert!(tofu.is_empty(), "{tofu:?}");
    d.screenshot(&shots.path().join("console-en.png")).await;

    // (b) fare free set with a reason, then cleared; a toggle without a reason is refused.
    d.click("button.mode-toggle[data-bit='fare_free']").await;
    d.wait_for(
        "a refusal without a reason",
        "return document.getElementById('mode-error').textContent === 'a reason is required'",
    )
    .await;
    d.type_into("#mode-reason", "ticket machines down").await;
    d.click("button.mode-toggle[data-bit='fare_free']").await;
    d.wait_for("fare free shown set", "return document.querySelector(\"#mode-bits tr[data-bit='fare_free']\").classList.contains('bit-set') && document.getElementById('mode-names').textContent === 'fare free'").await;
    let mode = n.get("/api/v1/mode", OPERATOR).await;
    assert_eq!(mode["names"], json!(["fare_free"]), "{mode}");
    assert_eq!(mode["history"].as_array().unwrap().last().unwrap()["reason"], "ticket machines down");
    d.type_into("#mode-reason", "machines repaired").await;
    d.click("button.mode-toggle[data-bit='fare_free']").await;
    d.wait_for("fare free cleared", "return !document.querySelector(\"#mode-bits tr[data-bit='fare_free']\").classList.contains('bit-set') && document.getElementById('mode-names').textContent === 'normal'").await;
    assert_eq!(n.get("/api/v1/mode", OPERATOR).await["names"], json!(["normal"]));

    // (c) g01's detail, then a command it answers.
    d.click("#gates .gate[data-gate='g01']").await;
    d.wait_for("g01's counters and its alarm with a time", "return document.querySelector(\"#gd-counters tr[data-counter='entries'] td\").textContent === '7' && document.querySelector(\"#gd-alarms tr[data-alarm='door_fault']\") !== null && document.querySelector(\"#gd-alarms tr[data-alarm='door_fault'] th\").textContent === 'door fault' && document.querySelector(\"#gd-alarms tr[data-alarm='door_fault'] td\").textContent.startsWith('since ')").await;
    let since = n.get("/api/v1/gates/g01", OPERATOR).await["alarms_since_ms"]["door_fault"].as_i64().unwrap();
    assert!((since - raised).abs() < 10_000, "door_fault since {since}, raised at {raised}");
    d.type_into("#cmd-reason", "passenger with a pram").await;
    d.click("#cmd-send").await;
    let cmd_topic = topic("gates/g01/cmd");
    let cmd: WireCommand = g
        .wait_for("the command", Duration::from_secs(10), |p| {
            (p.topic == cmd_topic)
                .then(|| open_from_station::<WireCommand>(&p.topic, &p.payload).ok())
                .flatten()
        })
        .await;
    assert_eq!(cmd.command.as_str(), "open_once_entry");
    let answer = CommandAck { id: cmd.id.clone(), result: CommandResult::Ok, detail: None };
    g.publish_signed(&topic("gates/g01/cmd/ack"), &answer, 1).await;
    d.wait_for(
        "the gate's answer",
        &format!("const r = document.getElementById('cmd-result'); return r.dataset.result === 'ok' && r.textContent === 'open once (entry): the gate answered ok (command {})'", cmd.id),
    )
    .await;
    let audit = n.get("/api/v1/audit?limit=5", OPERATOR).await;
    assert!(audit.as_array().unwrap().iter().any(|a| a["action"] == "gate.command"), "{audit}");
    // The audit filter (the server's, over the whole log) narrows to the command by otto.
    d.type_into("#audit-action", "gate.COMMAND").await;
    d.type_into("#audit-actor", "ott").await;
    d.wait_for("only the command in the audit table", "const rows = [...document.querySelectorAll('#audit tr.audit-line')]; return rows.length === 1 && rows[0].textContent.includes('passenger with a pram')").await;

    // (d) The flow chart moves: 6 entries, 3 exits and a refusal at g02 now.
    let values = "return [document.getElementById('flow-chart').dataset.entries, document.getElementById('flow-chart').dataset.exits, document.getElementById('flow-entries').getAttribute('data-values').split(',').length]";
    d.wait_for("an empty chart", "return document.getElementById('flow-chart').dataset.entries === '0'")
        .await;
    assert_eq!(d.js(values).await, json!(["0", "0", 60]));
    let before = d.js("return document.getElementById('flow-entries').getAttribute('points')").await;
    n.admin_write(&live_batch("g02", &g2, 1..=10, 3)).await;
    d.wait_for("the chart to show the taps", "return document.getElementById('flow-chart').dataset.entries === '6' && document.getElementById('flow-chart').dataset.exits === '3'").await;
    let after = d.js("return document.getElementById('flow-entries').getAttribute('points')").await;
    assert_ne!(before, after, "the entries line moved");
    let last = d.js("const v = document.getElementById('flow-entries').getAttribute('data-values').split(','); return v.slice(-2).map(Number).reduce((a, b) => a + b)").await;
    assert_eq!(last, json!(6), "the taps are in the latest minutes");
    n.admin_write(&live_batch("g02", &g2, 11..=15, 0)).await;
    d.wait_for("more taps", "return document.getElementById('flow-chart').dataset.entries === '10'").await;
    // g02's refusals by reason, from the ledger.
    d.click("#gates .gate[data-gate='g02']").await;
    d.wait_for("g02's refusals", "const r = document.querySelector(\"#gd-rejects tr[data-reason='no_entry']\"); return r !== null && r.textContent === 'no entry record2'").await;

    // Ledger search by card and gate.
    d.type_into("#ls-card", "31000012").await;
    d.type_into("#ls-gate", "g02").await;
    d.click("#ls-go").await;
    d.wait_for("one record found", "const rows = document.querySelectorAll('#ls-results tr'); return rows.length === 1 && rows[0].textContent.includes('31000012')").await;
    // (e) The business day's reports: today's (a preview, not closed) by hour, with g02's
    // reconciliation rows (no PLC reading from the stand-in gate: its taps are a discrepancy).
    let today = afc_domain::model::BusinessDayRule::default().business_day(Timestamp(now_ms()));
    d.js(&format!("document.getElementById('rep-from').value = '{today}'; return true")).await;
    d.click("#rep-go").await;
    d.wait_for("the hourly flow of the day", "const c = document.getElementById('rep-flow-chart'); return c.dataset.entries !== undefined && c.dataset.entries.split(',').map(Number).reduce((a, b) => a + b) === 10 && c.dataset.exits.split(',').map(Number).reduce((a, b) => a + b) === 3").await;
    d.wait_for("the day's status and g02's rows", &format!("const s = document.getElementById('rep-day-status').textContent; return s.startsWith('Business day {today} not closed') && [...document.querySelectorAll('#rep-recon tr')].some((r) => r.textContent.startsWith('g02'))")).await;
    d.wait_for("the refusals of the day", "return [...document.querySelectorAll('#rep-rejects tr')].some((r) => r.textContent.includes('no entry record'))").await;
    let bars = d.js("return document.querySelectorAll('#rep-flow-chart rect').length").await;
    assert_eq!(bars, json!(48), "an entries and an exits bar per hour");

    // The whole page in Chinese again, after all that: still no missing glyph.
    d.js(
        "const s = document.getElementById('lang'); s.value = 'zh-CN'; s.dispatchEvent(new Event('change'));",
    )
    .await;
    d.wait_for("Chinese again", "return document.querySelector(\"#gd-rejects tr[data-reason='no_entry'] th\").textContent === '无进站记录'").await;
    let (_, tofu) = d.missing_glyphs("").await;
    assert!(tofu.is_empty(), "{tofu:?}");
    d.screenshot(&shots.path().join("console-zh-CN-detail.png")).await;
    let kept = shots.keep();
    eprintln!("screenshots in {}", kept.display());
    d.cmd("DELETE", "", Value::Null).await;
    drop(g);
    n.stop().await;
}

/// A signed batch from `gate`: per record (seq, minutes before now, direction, refused with).
fn timed_batch(gate: &str, key: &SigningKey, rows: &[(u64, i64, Direction, Option<Reason>)]) -> Request {
    let now = now_ms();
    let records: Vec<TxRecord> = rows
        .iter()
        .map(|&(seq, minutes_ago, direction, refused)| {
            let mut r = record("s1", gate, seq);
            r.occurred_at = Timestamp(now - minutes_ago * 60_000);
            r.direction = direction;
            if let Some(reason) = refused {
                r.accepted = false;
                r.reason = reason;
            }
            r
        })
        .collect();
    let sig = controller::chain::sign_batch(&ident("s1"), &ident(gate), &records, key);
    Request::AppendTxBatch {
        station: ident("s1"),
        gate: ident(gate),
        records: records.into_iter().map(afc_domain::ledger::CanonicalRecord::from).collect(),
        signature: hex::encode(sig),
        covers_from: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flow_counts_accepted_taps_per_minute_by_direction_and_refusals_per_gate_by_reason() {
    use Direction::{Entry, Exit};
    let n = ApiNode::start(true).await;
    let (k2, k3) = (gate_key(2), gate_key(3));
    n.admin_write(&register("g02", &k2)).await;
    n.admin_write(&register("g03", &k3)).await;
    n.admin_write(&timed_batch(
        "g02",
        &k2,
        &[
            (1, 0, Entry, None),
            (2, 0, Entry, None),
            (3, 0, Exit, None),
            (4, 5, Entry, None),
            (5, 5, Exit, Some(Reason::NoEntry)),
            (6, 90, Entry, None),                       // outside the hour
            (7, 0, Exit, Some(Reason::PassageNotMade)), // not a decision
            (8, 1, Entry, Some(Reason::InsufficientBalance)),
        ],
    ))
    .await;
    n.admin_write(&timed_batch("g03", &k3, &[(1, 0, Exit, None), (2, 2, Entry, Some(Reason::Blacklisted))]))
        .await;

    let f = n.get("/api/v1/flow", crate::api::VIEWER).await;
    assert_eq!(f["minutes"], 60);
    let points = f["points"].as_array().unwrap();
    assert_eq!(points.len(), 60);
    assert_eq!(
        points[59]["minute_ms"].as_i64().unwrap() - points[0]["minute_ms"].as_i64().unwrap(),
        59 * 60_000
    );
    assert_eq!(points[0]["minute_ms"], f["from_ms"]);
    let now = f["now_ms"].as_i64().unwrap();
    assert!(
        points[59]["minute_ms"].as_i64().unwrap() <= now
            && now - points[59]["minute_ms"].as_i64().unwrap() < 60_000
    );
    // The minute each record fell in (a record made just before a minute boundary may land one
    // earlier than "now": sum over neighbours).
    let at = |minutes_ago: usize, k: &str| -> u64 {
        let i = 59 - minutes_ago;
        (i.saturating_sub(1)..=i).map(|j| points[j][k].as_u64().unwrap()).sum()
    };
    let total = |k: &str| points.iter().map(|p| p[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!((total("entries"), total("exits")), (3, 2), "{f}");
    assert_eq!((at(0, "entries"), at(0, "exits")), (2, 2), "{f}");
    assert_eq!(at(5, "entries"), 1, "{f}");
    assert_eq!(
        f["rejects"],
        json!([
            {"gate": "g02", "by_reason": {"insufficient_balance": 1, "no_entry": 1}},
            {"gate": "g03", "by_reason": {"blacklisted": 1}}
        ])
    );
    assert_eq!(f["complete"], true);
    assert_eq!(f["scanned"], 10);
    // Three hours: the record of 90 minutes ago counts too.
    let f = n.get("/api/v1/flow?minutes=180", crate::api::VIEWER).await;
    assert_eq!(f["points"].as_array().unwrap().len(), 180);
    assert_eq!(
        f["points"].as_array().unwrap().iter().map(|p| p["entries"].as_u64().unwrap()).sum::<u64>(),
        4
    );
    n.stop().await;
}
