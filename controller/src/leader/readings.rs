//! Task `counter-readings`: the leader records each gate's PLC counters through Raft
//! ([`Request::RecordCounters`]) at the first heartbeat it sees from the gate and at the first
//! after each business-day boundary, so a day's passages as the PLC counted them are the
//! difference of two readings ([`crate::day`]).
//!
//! Every [`READING_EVERY`] it looks at the board: a gate whose last heartbeat is in a later
//! business day (under the current fare table's rule) than its last recorded reading, or that
//! has none, gets one with the counters and arrival time of that heartbeat. A gate whose PLC is
//! offline is skipped (its registers are not being read). A proposal that fails is tried again
//! on the next tick; one proposed twice is stored once (only a later reading is taken).

use std::sync::Arc;
use std::time::Duration;

use afc_domain::wire::AlarmKind;
use tokio_util::sync::CancellationToken;

use super::Ctx;
use crate::day::{CounterReading, CounterValues};
use crate::state::{Request, Response};

/// How often the board is looked at (the gates' heartbeat period).
pub const READING_EVERY: Duration = Duration::from_secs(5);

pub(crate) async fn readings_task(ctx: Arc<Ctx>, stop: CancellationToken) {
    tracing::info!(task = "counter-readings", "started");
    let mut tick = tokio::time::interval(READING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = record_due(&ctx).await {
            tracing::warn!(task = "counter-readings", error = %e, "counter readings not recorded (next tick tries again)");
        }
    }
    tracing::info!(task = "counter-readings", "stopped");
}

async fn record_due(ctx: &Ctx) -> Result<(), String> {
    let rule = crate::packages::current_rule(&ctx.node.sm)?;
    let state = ctx.node.sm.state().map_err(|e| e.to_string())?;
    let views = ctx.board.read().map(|b| b.snapshot()).map_err(|_| "board lock poisoned".to_owned())?;
    for v in views {
        let Some(at) = v.last_heartbeat else { continue };
        if !state.gates.contains_key(&v.gate) || v.alarms.contains(&AlarmKind::PlcOffline) {
            continue;
        }
        let due = match state.last_reading.get(&v.gate) {
            None => true,
            Some(last) => at > *last && rule.business_day(at) > rule.business_day(*last),
        };
        if !due {
            continue;
        }
        let c = v.counters;
        let reading = CounterReading {
            gate: v.gate.clone(),
            at,
            business_day: rule.business_day(at),
            counters: CounterValues {
                entries: c.entries,
                exits: c.exits,
                tailgating: c.tailgating,
                forced_passage: c.forced_passage,
            },
        };
        match ctx.node.write(Request::RecordCounters { reading }, 0).await {
            Ok(Response::CountersRecorded { recorded }) => {
                tracing::info!(task = "counter-readings", gate = %v.gate, day = %rule.business_day(at), recorded,
                    entries = c.entries, exits = c.exits, "gate counters read for the business day");
            }
            Ok(other) => {
                tracing::warn!(task = "counter-readings", gate = %v.gate, answer = ?other, "reading refused")
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}
