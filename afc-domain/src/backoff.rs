//! Exponential backoff with jitter, the one retry schedule of every reconnect and retry loop.
//!
//! Each wait doubles from `min` up to `max`, and is drawn uniformly from the upper half of the
//! current step ("equal jitter": `step/2 + rand(0..=step/2)`), so after a broker or clearing
//! restart the gates and nodes that lost it at the same instant do not all come back at the same
//! instant, while no wait is shorter than half its step.

use std::time::Duration;

use rand::Rng;

/// A retry schedule: [`Backoff::next_wait`] after each failure, [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// Steps from `min` (at least 1 ms) doubling to `max` (at least `min`).
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        Backoff { min, max: max.max(min), step: min }
    }

    /// The wait before the next attempt (jittered), and the step doubled for the one after.
    pub fn next_wait(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        jitter(step, &mut rand::thread_rng())
    }

    /// The step the next wait is drawn from (before jitter).
    pub fn step(&self) -> Duration {
        self.step
    }

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

/// `step/2 + rand(0..=step/2)`.
pub fn jitter(step: Duration, rng: &mut impl Rng) -> Duration {
    let half = step / 2;
    let span = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
    half + Duration::from_micros(rng.gen_range(0..=span))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_to_the_cap_every_wait_is_in_the_upper_half_and_waits_spread() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut steps = Vec::new();
        for _ in 0..6 {
            let step = b.step();
            let wait = b.next_wait();
            assert!(wait >= step / 2 && wait <= step, "{wait:?} outside [{:?}, {step:?}]", step / 2);
            steps.push(step.as_millis());
        }
        assert_eq!(steps, vec![100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(100));
        // 1,000 gates losing the broker at once: their first waits are not one instant.
        let waits: std::collections::BTreeSet<u128> = (0..1000)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(30)).next_wait().as_millis())
            .collect();
        assert!(waits.len() > 300, "only {} distinct waits of 1,000", waits.len());
        assert!(*waits.first().unwrap() >= 500 && *waits.last().unwrap() <= 1000);
    }
}
