//! Ports for services a test starts.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU16, Ordering};

/// Ports are handed out from here, below Linux's ephemeral range (32768–60999 by default), so a
/// client connection's local port never takes one between the test choosing it and the service
/// binding it.
const FIRST: u16 = 20_000;
const END: u16 = 32_700;

/// A TCP port on 127.0.0.1 that is free now and that this process has not handed out before (until
/// it has handed out the whole range, 12,700 ports).
///
/// `bind(127.0.0.1:0)` and closing again is not enough: the kernel may give the same port to the
/// next `bind(:0)` once the first socket is closed, and two services of one test (a node's Raft
/// port and another node's API port) or of two tests running in parallel then collide at start-up
/// (seen in CI: a node could not bind its Raft port and its peers reached another node's API). Each
/// process starts at its own point of the range (by pid) and walks it, skipping ports in use.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let span = u32::from(END - FIRST);
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + ((start + u32::from(n)) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{END}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_never_handed_out_twice_and_are_free() {
        let ports: Vec<u16> = (0..500).map(|_| free_port()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        for p in ports {
            assert!((FIRST..END).contains(&p));
        }
        // A port in use is skipped.
        let next = free_port();
        let held = TcpListener::bind(("127.0.0.1", next + 1)).ok();
        let after = free_port();
        assert!(held.is_none() || after != next + 1);
    }
}
