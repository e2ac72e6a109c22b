//! The gate's one wall clock: [`now`], the domain timestamp every decision, record and schedule
//! reads, with a test-only offset (zero in service) so a test can run a gate behind or ahead of
//! the controllers, or jump its clock while it runs.

use std::sync::atomic::Ordering;

use afc_domain::model::Timestamp;

/// Tests only: milliseconds added to the wall clock, to run a gate behind or ahead of the
/// controllers. Read once from [`TEST_CLOCK_OFFSET_ENV`]; with [`TEST_CLOCK_OFFSET_FILE_ENV`] the
/// agent re-reads the offset from that file every 100 ms (a clock jump while it runs).
static TEST_CLOCK_OFFSET_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
static TEST_CLOCK_INIT: std::sync::Once = std::sync::Once::new();
pub const TEST_CLOCK_OFFSET_ENV: &str = "AFC_TEST_ONLY_CLOCK_OFFSET_MS";
pub const TEST_CLOCK_OFFSET_FILE_ENV: &str = "AFC_TEST_ONLY_CLOCK_OFFSET_FILE";

/// Sets the test clock offset (see [`TEST_CLOCK_OFFSET_ENV`]).
pub fn set_test_clock_offset_ms(ms: i64) {
    TEST_CLOCK_INIT.call_once(|| {});
    TEST_CLOCK_OFFSET_MS.store(ms, Ordering::Relaxed);
}

/// The wall clock as a domain timestamp (plus the test-only offset, zero in service).
pub fn now() -> Timestamp {
    TEST_CLOCK_INIT.call_once(|| {
        if let Some(ms) = std::env::var(TEST_CLOCK_OFFSET_ENV).ok().and_then(|v| v.trim().parse().ok()) {
            TEST_CLOCK_OFFSET_MS.store(ms, Ordering::Relaxed);
        }
    });
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    Timestamp(ms.saturating_add(TEST_CLOCK_OFFSET_MS.load(Ordering::Relaxed)))
}
