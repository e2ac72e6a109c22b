//! The agent's named background tasks, held so that shutdown can join them.
//!
//! Every long-running task [`crate::start`] spawns is kept here under its name. At shutdown the
//! caller cancels the agent's token first; [`Tasks::join`] then waits for every task with one
//! bounded deadline, logs each that did not stop in time (or ended in a panic), and returns the
//! names of those still running, so a task stuck on I/O cannot hold the process up for ever.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;

/// The named tasks of one running agent.
#[derive(Default)]
pub struct Tasks {
    /// `(name, handle)` in the order they were started (and are joined).
    handles: Vec<(&'static str, JoinHandle<()>)>,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Spawns `task` as the task `name`.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.handles.push((name, tokio::spawn(task)));
    }

    /// Keeps a task spawned elsewhere under `name`.
    pub fn push(&mut self, name: &'static str, handle: JoinHandle<()>) {
        self.handles.push((name, handle));
    }

    /// The names of the tasks held, in start order.
    pub fn names(&self) -> Vec<&'static str> {
        self.handles.iter().map(|(n, _)| *n).collect()
    }

    /// Waits at most `within` in all for every task to end (call it once their token is
    /// cancelled). Returns the names of the tasks that did not stop in time, each logged; they
    /// are left running (the process is about to exit).
    pub async fn join(self, within: Duration) -> Vec<&'static str> {
        let deadline = tokio::time::Instant::now() + within;
        let mut late = Vec::new();
        for (name, handle) in self.handles {
            match tokio::time::timeout_at(deadline, handle).await {
                Ok(Ok(())) => tracing::debug!(task = name, "task joined"),
                Ok(Err(e)) => tracing::error!(task = name, error = %e, "task ended abnormally"),
                Err(_) => {
                    tracing::warn!(task = name, ?within, "task did not stop within the shutdown deadline");
                    late.push(name);
                }
            }
        }
        late
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;

    #[tokio::test]
    async fn tasks_that_stop_on_cancel_are_joined_and_one_that_does_not_is_named() {
        let cancel = CancellationToken::new();
        let mut tasks = Tasks::new();
        for name in ["a", "b"] {
            let c = cancel.clone();
            tasks.spawn(name, async move { c.cancelled().await });
        }
        tasks.spawn("stuck", std::future::pending());
        tasks.spawn("panics", async { panic!("boom") });
        assert_eq!(tasks.names(), ["a", "b", "stuck", "panics"]);
        cancel.cancel();
        let started = tokio::time::Instant::now();
        let late = tasks.join(Duration::from_millis(200)).await;
        assert_eq!(late, ["stuck"]);
        assert!(started.elapsed() < Duration::from_secs(5), "the deadline bounds the whole join");
    }
}
