//! Records whose time is implausible (issue 11 item 2): the ledger keeps `occurred_at` as the gate
//! saw it, but after a gate batch commits the leader compares each new record's time with its own
//! clock. A record more than [`AHEAD_MS`] ahead of the controller (the gate's clock runs fast), or
//! more than [`OLDER_MS`] behind it (older than any outbox holds a record), is counted in
//! `afc_ledger_implausible_time_total{gate,when}`, logged as a warning, and flags the gate on the
//! board (`implausible_time` in `/api/v1/gates`, alarm `implausible_time`) until a committed batch
//! of that gate has none. Only committed batches are looked at (their gate signature checked by the
//! state machine), and each gate_seq once per leadership.

use afc_domain::ledger::CanonicalRecord;
use afc_domain::model::{Ident, Timestamp};

use super::Ctx;

/// A record this far ahead of the controller's clock is implausible.
pub const AHEAD_MS: i64 = 5 * 60_000;
/// A record this far behind the controller's clock is implausible.
pub const OLDER_MS: i64 = 7 * Timestamp::DAY_MS;

/// What [`check`] needs of a batch's records, taken before the batch goes to Raft.
pub(crate) fn record_times(records: &[CanonicalRecord]) -> Vec<(u64, Timestamp)> {
    records.iter().map(|r| (r.gate_seq, r.occurred_at)).collect()
}

/// How many of `times` are implausible at `now`: (ahead, older).
pub fn classify(times: &[(u64, Timestamp)], now: Timestamp) -> (u64, u64) {
    times.iter().fold((0, 0), |(ahead, older), (_, t)| {
        if t.0 > now.0.saturating_add(AHEAD_MS) {
            (ahead + 1, older)
        } else if t.0 < now.0.saturating_sub(OLDER_MS) {
            (ahead, older + 1)
        } else {
            (ahead, older)
        }
    })
}

/// After `gate`'s batch committed: counts, flags and logs its implausible records.
pub(crate) fn check(ctx: &Ctx, gate: &Ident, times: &[(u64, Timestamp)]) {
    let now = crate::clock::now();
    let fresh = {
        let mut board = ctx.board.write().unwrap_or_else(|p| p.into_inner());
        board.on_committed_times(gate, times, now)
    };
    let Some((ahead, older, example)) = fresh else { return };
    if ahead + older == 0 {
        return;
    }
    ctx.metrics.implausible_time(gate.as_str(), ahead, older);
    tracing::warn!(
        %gate,
        ahead,
        older,
        occurred_at = example.0,
        controller_now = now.0,
        "records with an implausible time (the gate's clock?): kept as the gate saw them, flagged"
    );
}
