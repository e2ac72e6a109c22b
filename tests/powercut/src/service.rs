//! What every power-cut test does around the mount: decide whether it can run here, pick its
//! seed, and keep one service process (a real binary) that it starts, SIGKILLs and starts again.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::PowerCutFs;

/// Whether a power-cut test can run: prints `SKIPPED: …` and returns false where FUSE is missing,
/// and panics instead under `CI=true` (CI installs what the tests need).
pub fn available_or_skip() -> bool {
    match PowerCutFs::available() {
        Ok(()) => true,
        Err(why) => {
            assert!(std::env::var("CI").map_or(true, |v| v != "true"), "FUSE is missing under CI: {why}");
            eprintln!("SKIPPED: the power-cut filesystem cannot be mounted here: {why}");
            false
        }
    }
}

/// The seed of a run: `POWERCUT_SEED`, or the clock (print it, so a failure can be repeated).
pub fn seed_from_env() -> u64 {
    std::env::var("POWERCUT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    })
}

/// The last `lines` lines of a log file, for a failure message.
pub fn tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One service process under test, its output appended to one log across restarts; SIGKILLed on
/// drop.
pub struct Service {
    /// What it is called in failure messages ("the agent", "the server").
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    /// Starts so far: the number of the one running (shared with tasks that tag what they see).
    starts: Arc<AtomicUsize>,
}

impl Service {
    pub fn new(name: &str, program: impl Into<PathBuf>, args: Vec<OsString>, log: PathBuf) -> Service {
        Service {
            name: name.to_owned(),
            program: program.into(),
            args,
            env: Vec::new(),
            log,
            child: None,
            starts: Arc::default(),
        }
    }

    /// More environment for every start.
    pub fn env(mut self, vars: &[(&str, &str)]) -> Service {
        self.env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// Starts the process (none may be running).
    pub fn start(&mut self) -> std::io::Result<()> {
        assert!(self.child.is_none(), "{}: one process at a time", self.name);
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        self.starts.fetch_add(1, Ordering::SeqCst);
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().cloned())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Panics with the log's tail if the process exited by itself.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited by itself ({status}) after start {}; log tail:\n{}",
                    self.name,
                    self.started(),
                    self.log_tail(40)
                );
            }
        }
    }

    /// The number of the running start (1 for the first).
    pub fn started(&self) -> usize {
        self.starts.load(Ordering::SeqCst)
    }

    /// The start counter, for a task that tags what it sees with the start that answered.
    pub fn starts(&self) -> Arc<AtomicUsize> {
        self.starts.clone()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// SIGKILL, and wait for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}
