//! System-test harness: a whole local station (`station up`, the README's first command) started
//! as a real process tree in a temporary directory, and the means to drive it from outside: the
//! operations API of each node, the clearing server, card taps at each gate's reader port, the
//! PLC simulators' control sockets, and signals to any one service process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;
use station::plan::{Layout, Plan, NODES};
use station::provision::Secrets;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The canary soak of a station under test (seconds).
pub const SOAK_SECS: u64 = 8;

/// The `station` executable built next to this test binary (`cargo test --workspace` builds it,
/// because the station crate has integration tests).
pub fn station_exe() -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    // target/debug/deps/e2e-… → target/debug/station
    let dir = me.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let exe = dir.join("station");
    assert!(
        exe.exists(),
        "{} is missing: build it first (`cargo build -p station`; `cargo test --workspace` does)",
        exe.display()
    );
    exe
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `within` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(anyhow::anyhow!("{what}: not within {within:?} (last error: {last_err:?})"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One ledger entry as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub index: u64,
    pub gate: String,
    pub gate_seq: u64,
    pub hash: String,
    /// The gate installation that numbered the record (`None` for first-version records).
    pub installation: Option<String>,
}

/// The rows of one `GET /api/v1/ledger` page.
pub fn ledger_rows(page: &Value) -> anyhow::Result<Vec<LedgerRow>> {
    let entries = page.as_array().context("ledger page is not a list")?;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let gate = e.pointer("/record/gate").and_then(Value::as_str).context("record.gate")?;
        let gate_seq = e.pointer("/record/gate_seq").and_then(Value::as_u64).context("record.gate_seq")?;
        let index = e.get("index").and_then(Value::as_u64).context("index")?;
        let hash = e.get("hash").and_then(Value::as_str).unwrap_or_default().to_owned();
        let installation = e.pointer("/record/installation").and_then(Value::as_str).map(str::to_owned);
        out.push(LedgerRow { index, gate: gate.to_owned(), gate_seq, hash, installation });
    }
    Ok(out)
}

/// A running local station.
pub struct Station {
    pub dir: tempfile::TempDir,
    pub layout: Layout,
    pub plan: Plan,
    pub secrets: Secrets,
    child: Option<Child>,
    http: reqwest::Client,
    /// For `station --stations N`: every station of the run; `layout`, `plan` and `secrets` are
    /// those of the one [`Station::focus`] chose (the first at start).
    pub members: Vec<(Layout, Plan, Secrets)>,
}

impl Station {
    /// Starts `station up --stations n` in a fresh directory (each station `gates` gates, the
    /// first at `port_offset`), with more arguments `args`; focused on the first station.
    pub async fn start_network(
        n: u16,
        gates: u16,
        port_offset: u16,
        args: &[&str],
    ) -> anyhow::Result<Station> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("station");
        let (n_text, gates_text, offset_text) = (n.to_string(), gates.to_string(), port_offset.to_string());
        let mut all = vec!["--stations", &n_text, "--gates", &gates_text, "--port-offset", &offset_text];
        all.extend_from_slice(args);
        let plan = Plan { gates, port_offset, ..Plan::default() };
        let secrets = station::provision::secrets(&Layout::new(&root), &plan)?;
        let mut st = Station::start_with((dir, secrets), plan, &all, &[]).await?;
        let mut members = Vec::new();
        for k in 1..=n {
            let layout = Layout::new(&root.join("stations").join(format!("s{k}")));
            let plan_file = layout.plan_file();
            // The configs are written after the plan and the secrets: once the last is there,
            // both can be read without racing the station that writes them.
            let last = layout.config().join(format!("gate-{}.toml", Plan::gate_id(gates)));
            let deadline = Instant::now() + Duration::from_secs(60);
            while !last.exists() {
                anyhow::ensure!(Instant::now() < deadline, "{} was never written", last.display());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let plan: Plan = toml::from_str(&std::fs::read_to_string(&plan_file)?)?;
            let secrets = station::provision::secrets(&layout, &plan)?;
            members.push((layout, plan, secrets));
        }
        st.members = members;
        st.focus(0);
        Ok(st)
    }

    /// Points `layout`, `plan` and `secrets` (and so every API helper) at station `k` (from 0)
    /// of a [`Station::start_network`] run.
    pub fn focus(&mut self, k: usize) {
        if let Some((layout, plan, secrets)) = self.members.get(k).cloned() {
            (self.layout, self.plan, self.secrets) = (layout, plan, secrets);
        }
    }

    /// Starts `station up` in a fresh directory with `gates` gates, no simulated passengers (the
    /// test makes its own taps), ports shifted by `port_offset`, and optionally an external broker.
    pub async fn start(
        gates: u16,
        port_offset: u16,
        external_broker: Option<String>,
    ) -> anyhow::Result<Station> {
        let plan = Plan { gates, port_offset, external_broker, ..Plan::default() };
        Station::start_planned(Station::prepare(&plan)?, plan).await
    }

    /// A fresh directory with `plan` saved and the station's secrets created, as the station's
    /// first run would; for a test that must set up something (a broker's password file) first.
    pub fn prepare(plan: &Plan) -> anyhow::Result<(tempfile::TempDir, Secrets)> {
        let dir = tempfile::tempdir()?;
        let layout = Layout::new(&dir.path().join("station"));
        layout.load_or_create(plan)?;
        let secrets = station::provision::secrets(&layout, plan)?;
        Ok((dir, secrets))
    }

    /// Starts `station up` in a directory made by [`Station::prepare`] for `plan`.
    pub async fn start_planned(
        prepared: (tempfile::TempDir, Secrets),
        plan: Plan,
    ) -> anyhow::Result<Station> {
        Station::start_with(prepared, plan, &[], &[]).await
    }

    /// [`Station::start_planned`] with more arguments for `station up` and more environment for
    /// it and every service it runs.
    pub async fn start_with(
        (dir, secrets): (tempfile::TempDir, Secrets),
        plan: Plan,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Station> {
        let layout = Layout::new(&dir.path().join("station"));
        let mut cmd = Command::new(station_exe());
        cmd.arg("up")
            .arg("--data-dir")
            .arg(&layout.root)
            .args(["--tap-rate", "0", "--soak-secs", &SOAK_SECS.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        let log = std::fs::File::create(dir.path().join("station.log"))?;
        cmd.stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn().context("starting station")?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build()?;
        Ok(Station { dir, layout, plan, secrets, child: Some(child), http, members: Vec::new() })
    }

    /// The station's own log (stdout and stderr of `station up`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("station.log")).unwrap_or_default()
    }

    /// The last lines of every service log, for a failing test's message.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = format!("--- station.log\n{}\n", tail(&self.log(), lines));
        if let Ok(rd) = std::fs::read_dir(self.layout.logs()) {
            let mut files: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            files.sort();
            for f in files {
                let text = std::fs::read_to_string(&f).unwrap_or_default();
                out += &format!("--- {}\n{}\n", f.display(), tail(&text, lines));
            }
        }
        out
    }

    pub fn token(&self, name: &str) -> String {
        self.secrets.api_token(name).unwrap_or_default().to_owned()
    }

    /// `GET` on node `id`'s API with `token`.
    pub async fn get(&self, id: u16, path: &str, token: &str) -> anyhow::Result<Value> {
        let url = format!("http://{}{path}", self.plan.api(id));
        let r = self.http.get(&url).bearer_auth(token).send().await?;
        let status = r.status();
        let body: Value = r.json().await.with_context(|| format!("GET {url}: {status}"))?;
        anyhow::ensure!(status.is_success(), "GET {url}: {status} {body}");
        Ok(body)
    }

    /// `POST` on node `id`'s API; returns the status and the JSON answer.
    pub async fn post(&self, id: u16, path: &str, token: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let url = format!("http://{}{path}", self.plan.api(id));
        let r = self.http.post(&url).bearer_auth(token).json(body).send().await?;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// The node every reachable node names as leader.
    pub async fn leader(&self) -> anyhow::Result<u16> {
        let viewer = self.token("viewer");
        eventually("a leader", Duration::from_secs(30), || async {
            for id in 1..=NODES {
                if let Ok(c) = self.get(id, "/api/v1/cluster", &viewer).await {
                    if let Some(l) = c.get("leader").and_then(Value::as_u64) {
                        return Ok(Some(l as u16));
                    }
                }
            }
            Ok(None)
        })
        .await
    }

    /// `GET /api/v1/gates` from the leader (only the leader hears the gates over MQTT).
    pub async fn gates(&self) -> anyhow::Result<Vec<Value>> {
        let leader = self.leader().await?;
        match self.get(leader, "/api/v1/gates", &self.token("viewer")).await? {
            Value::Array(g) => Ok(g),
            other => anyhow::bail!("gates: {other}"),
        }
    }

    /// Pids of the station's services by name (`controller-1`, `gate-g01`, …).
    pub fn pids(&self) -> BTreeMap<String, u32> {
        let text = std::fs::read_to_string(self.layout.pids_file()).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split_once(": "))
            .filter_map(|(n, p)| Some((n.to_owned(), p.trim().parse().ok()?)))
            .collect()
    }

    /// Sends `signal` to the `station up` process itself (the supervisor of every service).
    pub fn signal_supervisor(&self, signal: rustix::process::Signal) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("the station is not running")?;
        let p = rustix::process::Pid::from_raw(child.id() as i32).context("bad pid")?;
        rustix::process::kill_process(p, signal).context("signalling the station")?;
        Ok(())
    }

    /// The whole ledger of node `id`, page by page from its API: `(index, gate, gate_seq, hash)`
    /// per entry.
    pub async fn ledger(&self, id: u16) -> anyhow::Result<Vec<LedgerRow>> {
        self.ledger_from(id, 1).await
    }

    /// Node `id`'s ledger from index `from` on.
    pub async fn ledger_from(&self, id: u16, from: u64) -> anyhow::Result<Vec<LedgerRow>> {
        let viewer = self.token("viewer");
        let mut out = Vec::new();
        let mut from = from;
        loop {
            let page = self.get(id, &format!("/api/v1/ledger?from={from}&limit=1000"), &viewer).await?;
            let rows = ledger_rows(&page)?;
            let entries = rows.len();
            if let Some(last) = rows.last() {
                from = last.index + 1;
            }
            out.extend(rows);
            if entries < 1000 {
                return Ok(out);
            }
        }
    }

    /// Sends `signal` to the service `name`.
    pub fn signal(&self, name: &str, signal: rustix::process::Signal) -> anyhow::Result<u32> {
        let pid = *self.pids().get(name).with_context(|| format!("no pid for {name}"))?;
        let p = rustix::process::Pid::from_raw(pid as i32).context("bad pid")?;
        rustix::process::kill_process(p, signal).with_context(|| format!("signalling {name} ({pid})"))?;
        Ok(pid)
    }

    /// `GET` on the clearing server with the station's token.
    pub async fn clearing(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("http://{}/v1/stations/{}/{path}", self.plan.clearing(), self.plan.station);
        let r = self.http.get(&url).bearer_auth(&self.secrets.clearing_token).send().await?;
        let status = r.status();
        let body: Value = r.json().await.with_context(|| format!("GET {url}: {status}"))?;
        anyhow::ensure!(status.is_success(), "GET {url}: {status} {body}");
        Ok(body)
    }

    /// One line to gate `n`'s PLC simulator control socket; its answer.
    pub async fn plc(&self, n: u16, line: &str) -> anyhow::Result<String> {
        let s = tokio::net::TcpStream::connect(self.plan.plc_control(n)).await?;
        let (r, mut w) = s.into_split();
        w.write_all(format!("{line}\n").as_bytes()).await?;
        let mut answer = String::new();
        BufReader::new(r).read_line(&mut answer).await?;
        Ok(answer.trim().to_owned())
    }

    /// Stops the station with SIGTERM (as Ctrl-C does) and waits for it; returns its exit status.
    pub fn stop(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else { anyhow::bail!("not running") };
        let pid = rustix::process::Pid::from_raw(child.id() as i32).context("bad pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                anyhow::bail!("station did not stop within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Station {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop(Duration::from_secs(40));
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
