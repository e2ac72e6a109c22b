//! Runs the station's processes: one child process per service (this same executable with the
//! service's subcommand), each in its own process group with its output in `logs/{name}.log`;
//! restarted with backoff when it dies; stopped in order (readers, gates, PLCs, controllers,
//! broker, clearing) with SIGTERM, then SIGKILL after a grace period.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long a child gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(15);
/// A child that ran this long before dying restarts at once (its backoff resets).
const HEALTHY_RUN: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// The longest wait before a restart, unless `station up --restart-backoff-max-ms` says otherwise.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// One service process.
#[derive(Debug, Clone)]
pub struct Service {
    /// The instance name (`controller-1`, `gate-g01`), also its log file's name.
    pub name: String,
    /// The subcommand and its arguments, after the program name.
    pub args: Vec<OsString>,
    /// Stop order: the highest stage stops first; start order is the reverse.
    pub stage: u8,
    /// Environment for the child beyond the station's own (secrets that must not show in `ps`).
    pub env: Vec<(String, String)>,
}

type Pids = Arc<Mutex<BTreeMap<String, u32>>>;

/// The running children, by stage.
pub struct Supervisor {
    exe: PathBuf,
    logs: PathBuf,
    pids_file: PathBuf,
    pids: Pids,
    stages: BTreeMap<u8, (CancellationToken, JoinSet<()>)>,
    /// The longest wait before restarting a child that keeps dying.
    backoff_max: Duration,
}

impl Supervisor {
    pub fn new(
        exe: PathBuf,
        logs: PathBuf,
        pids_file: PathBuf,
        backoff_max: Duration,
    ) -> anyhow::Result<Supervisor> {
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        if let Some(dir) = pids_file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let backoff_max = backoff_max.max(BACKOFF_MIN);
        Ok(Supervisor { exe, logs, pids_file, pids: Pids::default(), stages: BTreeMap::new(), backoff_max })
    }

    /// Starts `service` and keeps it running until [`Supervisor::stop`].
    pub fn start(&mut self, service: Service) {
        let (token, set) =
            self.stages.entry(service.stage).or_insert_with(|| (CancellationToken::new(), JoinSet::new()));
        let ctx = ChildCtx {
            exe: self.exe.clone(),
            log: self.logs.join(format!("{}.log", service.name)),
            pids_file: self.pids_file.clone(),
            pids: self.pids.clone(),
            stop: token.clone(),
            backoff_max: self.backoff_max,
        };
        set.spawn(keep_running(service, ctx));
    }

    /// The pid of a running service.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.pids.lock().ok()?.get(name).copied()
    }

    /// Stops every stage, highest first, each child with SIGTERM then SIGKILL after [`STOP_GRACE`].
    pub async fn stop(mut self) {
        while let Some((stage, (token, mut set))) = self.stages.pop_last() {
            tracing::info!(stage, services = set.len(), "stopping");
            token.cancel();
            while set.join_next().await.is_some() {}
        }
        let _ = std::fs::remove_file(&self.pids_file);
    }
}

struct ChildCtx {
    exe: PathBuf,
    log: PathBuf,
    pids_file: PathBuf,
    pids: Pids,
    stop: CancellationToken,
    backoff_max: Duration,
}

impl ChildCtx {
    fn set_pid(&self, name: &str, pid: Option<u32>) {
        let Ok(mut pids) = self.pids.lock() else { return };
        match pid {
            Some(p) => pids.insert(name.to_owned(), p),
            None => pids.remove(name),
        };
        let text: String = pids.iter().map(|(n, p)| format!("{n}: {p}\n")).collect();
        if let Err(e) = std::fs::write(&self.pids_file, text) {
            tracing::warn!(file = %self.pids_file.display(), error = %e, "cannot write the pid file");
        }
    }
}

fn spawn(service: &Service, ctx: &ChildCtx) -> anyhow::Result<tokio::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&ctx.log)
        .with_context(|| format!("opening {}", ctx.log.display()))?;
    let err = log.try_clone()?;
    let mut cmd = tokio::process::Command::new(&ctx.exe);
    cmd.args(&service.args)
        .envs(service.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    // Its own process group: Ctrl-C in the terminal reaches only the station, which then stops
    // the services in order.
    #[cfg(unix)]
    cmd.process_group(0);
    cmd.spawn().with_context(|| format!("starting {}", service.name))
}

/// Sends SIGTERM to `pid`.
pub fn terminate(pid: u32) -> std::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::other(format!("bad pid {pid}")))?;
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).map_err(std::io::Error::from)
}

async fn keep_running(service: Service, ctx: ChildCtx) {
    let mut backoff = BACKOFF_MIN;
    while !ctx.stop.is_cancelled() {
        let started = Instant::now();
        let mut child = match spawn(&service, &ctx) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(service = %service.name, error = format!("{e:#}"), "cannot start");
                tokio::select! {
                    _ = ctx.stop.cancelled() => return,
                    _ = tokio::time::sleep(ctx.backoff_max) => continue,
                }
            }
        };
        ctx.set_pid(&service.name, child.id());
        tokio::select! {
            status = child.wait() => {
                ctx.set_pid(&service.name, None);
                if ctx.stop.is_cancelled() {
                    return;
                }
                if started.elapsed() >= HEALTHY_RUN {
                    backoff = BACKOFF_MIN;
                }
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                tracing::warn!(
                    service = %service.name, %status, restart_in = ?backoff, log = %ctx.log.display(),
                    "service exited; restarting"
                );
                tokio::select! {
                    _ = ctx.stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ctx.backoff_max);
            }
            _ = ctx.stop.cancelled() => {
                stop_child(&service.name, &mut child).await;
                ctx.set_pid(&service.name, None);
                return;
            }
        }
    }
}

async fn stop_child(name: &str, child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        if let Err(e) = terminate(pid) {
            tracing::warn!(service = name, error = %e, "SIGTERM failed");
        }
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(Ok(status)) if status.success() => tracing::debug!(service = name, "stopped"),
        Ok(Ok(status)) => tracing::warn!(service = name, %status, "stopped with an error status"),
        Ok(Err(e)) => tracing::warn!(service = name, error = %e, "waiting for it failed"),
        Err(_) => {
            tracing::warn!(service = name, grace = ?STOP_GRACE, "did not stop in time; killing it");
            let _ = child.kill().await;
        }
    }
}

/// Stops processes a previous run left behind (the station itself was killed): every pid in
/// `pids_file` that still runs `exe`.
pub fn reap_leftovers(pids_file: &Path, exe: &Path) -> usize {
    let Ok(text) = std::fs::read_to_string(pids_file) else { return 0 };
    let exe_name = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut reaped = 0;
    for line in text.lines() {
        let Some((name, pid)) = line.split_once(": ") else { continue };
        let Ok(pid) = pid.trim().parse::<u32>() else { continue };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let first = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        if !exe_name.is_empty()
            && String::from_utf8_lossy(first).ends_with(&exe_name)
            && terminate(pid).is_ok()
        {
            tracing::warn!(service = name, pid, "stopping a process left by a previous run");
            reaped += 1;
        }
    }
    if reaped > 0 {
        std::thread::sleep(Duration::from_secs(2));
    }
    reaped
}
