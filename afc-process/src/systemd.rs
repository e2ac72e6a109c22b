//! systemd service notifications (`sd_notify(3)`): readiness, the watchdog and stopping, for the
//! `Type=notify` units in `deploy/systemd/`. Without `NOTIFY_SOCKET` in the environment (tests,
//! the local station, a shell) every call here does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells the service manager that the service serves (`READY=1`, with `status` as its status
/// line). When the unit sets `WatchdogSec=`, also starts task `systemd-watchdog` on the current
/// tokio runtime: `WATCHDOG=1` every half of `WATCHDOG_USEC`. The task runs on the same runtime
/// as the service's own tasks, so a runtime that no longer schedules them (every worker blocked,
/// a deadlock in the reactor) stops feeding the watchdog and systemd restarts the process; it does
/// not prove that any one task makes progress. Call it inside the runtime, once.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (timeout / 2).max(Duration::from_millis(100));
    tracing::info!(task = "systemd-watchdog", ?timeout, ?every, "feeding the systemd watchdog");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
}

/// Tells the service manager that the service is shutting down (`STOPPING=1`).
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    /// The one test in this crate that touches the environment (no other test runs beside it).
    #[tokio::test]
    async fn ready_then_the_watchdog_at_half_its_interval_and_nothing_without_a_socket() {
        // No socket: nothing sent, nothing fails (cargo test, the local station).
        std::env::remove_var("NOTIFY_SOCKET");
        std::env::remove_var("WATCHDOG_USEC");
        super::ready("no socket");
        super::stopping();

        let path = std::env::temp_dir().join(format!("afc-notify-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "400000");
        std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        super::ready("serving");
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("READY=1");
        assert_eq!(std::str::from_utf8(&buf[..n]).expect("utf-8"), "READY=1\nSTATUS=serving\n");
        let started = std::time::Instant::now();
        for _ in 0..2 {
            let sock = sock.try_clone().expect("clone");
            let n = tokio::task::spawn_blocking(move || sock.recv(&mut buf).map(|n| buf[..n].to_vec()))
                .await
                .expect("join")
                .expect("WATCHDOG=1");
            assert_eq!(n, b"WATCHDOG=1\n");
        }
        // The first tick is immediate, the second after half of WATCHDOG_USEC.
        assert!(started.elapsed() >= Duration::from_millis(150), "{:?}", started.elapsed());
        super::stopping();
        let n = loop {
            let n = sock.recv(&mut buf).expect("STOPPING=1");
            if &buf[..n] != b"WATCHDOG=1\n" {
                break n;
            }
        };
        assert_eq!(&buf[..n], b"STOPPING=1\n");
        std::env::remove_var("NOTIFY_SOCKET");
        std::env::remove_var("WATCHDOG_USEC");
        std::env::remove_var("WATCHDOG_PID");
        let _ = std::fs::remove_file(&path);
    }
}
