//! The PLC's alarm rules as a pure function (SPEC §6): from the previous and the current poll of
//! the inputs and counters, which alarms to raise or clear. No I/O: the Modbus task polls, calls
//! [`evaluate`], and raises the events, writes the free-passage coil and keeps the open commands
//! it returns.
//!
//! - `emergency_input` and `door_fault`: raised on a rising edge, cleared on a falling one.
//! - `tailgating`: the PLC's tailgating counter went up (by how much).
//! - `forced_passage`: a passage was counted on an aisle with no open command for it in the last
//!   [`OPEN_WINDOW`], while the passage is not held free.
//!
//! The first poll after a (re)connect compares the inputs against "nothing set" and the counters
//! against themselves: passages while the agent was away are not alarms.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{Aisle, PlcEvent, PlcInputs};

/// How long an open command waits for its passage before it no longer explains a counted one.
pub const OPEN_WINDOW: Duration = Duration::from_secs(15);

/// Most passages of one aisle matched in one poll (a counter that jumped is not looped over).
const MAX_MATCHED: u32 = 1000;

/// Open commands (entry, exit) not yet matched by a counted passage, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenCommands([VecDeque<Instant>; 2]);

impl OpenCommands {
    /// An open command for `aisle` was acknowledged by the PLC at `at`.
    pub fn opened(&mut self, aisle: Aisle, at: Instant) {
        self.0[index(aisle)].push_back(at);
    }

    /// How many open commands of `aisle` wait for their passage.
    pub fn waiting(&self, aisle: Aisle) -> usize {
        self.0[index(aisle)].len()
    }
}

fn index(a: Aisle) -> usize {
    match a {
        Aisle::Entry => 0,
        Aisle::Exit => 1,
    }
}

/// What one poll's readings mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The alarms to raise or clear, in order (an emergency input change first).
    pub events: Vec<PlcEvent>,
    /// The emergency input changed to this: the free-passage coil follows it at once.
    pub emergency: Option<bool>,
    /// The open commands still waiting after this poll.
    pub opens: OpenCommands,
}

/// The alarms of one poll. `prev`: the previous poll since the last (re)connect (`None` on the
/// first); `opens`: the open commands waiting; `free_requested` / `emergency_held`: the
/// free-passage output the agent asked for and the one held on the emergency input until now;
/// `at`: now.
pub fn evaluate(
    prev: Option<&PlcInputs>,
    now: &PlcInputs,
    opens: &OpenCommands,
    free_requested: bool,
    emergency_held: bool,
    at: Instant,
) -> Verdict {
    let prev = prev.copied().unwrap_or(PlcInputs {
        entries_total: now.entries_total,
        exits_total: now.exits_total,
        tailgating_total: now.tailgating_total,
        ..PlcInputs::default()
    });
    let mut events = Vec::new();
    let mut emergency = None;
    let mut held = emergency_held;
    if now.emergency_input != prev.emergency_input {
        events.push(PlcEvent::EmergencyInput(now.emergency_input));
        emergency = Some(now.emergency_input);
        held = now.emergency_input;
    }
    if now.door_fault != prev.door_fault {
        events.push(PlcEvent::DoorFault(now.door_fault));
    }
    let tail = now.tailgating_total.wrapping_sub(prev.tailgating_total);
    if tail > 0 {
        events.push(PlcEvent::Tailgating(tail));
    }
    let free = free_requested || held;
    let expiry = at.checked_sub(OPEN_WINDOW);
    let mut opens = opens.clone();
    for (aisle, delta) in [
        (Aisle::Entry, now.entries_total.wrapping_sub(prev.entries_total)),
        (Aisle::Exit, now.exits_total.wrapping_sub(prev.exits_total)),
    ] {
        let pending = &mut opens.0[index(aisle)];
        while pending.front().is_some_and(|t| expiry.is_some_and(|e| *t < e)) {
            pending.pop_front();
        }
        let mut unexplained = 0;
        for _ in 0..delta.min(MAX_MATCHED) {
            if pending.pop_front().is_none() {
                unexplained += 1;
            }
        }
        if unexplained > 0 && !free {
            events.push(PlcEvent::ForcedPassage(aisle));
        }
    }
    Verdict { events, emergency, opens }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> PlcInputs {
        PlcInputs { entries_total: 100, exits_total: 50, tailgating_total: 3, ..PlcInputs::default() }
    }

    fn quiet(prev: &PlcInputs, now: &PlcInputs) -> Verdict {
        evaluate(Some(prev), now, &OpenCommands::default(), false, false, Instant::now())
    }

    #[test]
    fn nothing_changed_raises_nothing() {
        let i = inputs();
        let v = quiet(&i, &i);
        assert!(v.events.is_empty());
        assert_eq!(v.emergency, None);
    }

    #[test]
    fn the_first_poll_after_a_connect_raises_set_inputs_but_not_the_counters_run_up_meanwhile() {
        let now = PlcInputs { door_fault: true, ..inputs() };
        let v = evaluate(None, &now, &OpenCommands::default(), false, false, Instant::now());
        assert_eq!(v.events, [PlcEvent::DoorFault(true)]);
    }

    #[test]
    fn the_emergency_input_is_raised_and_cleared_on_its_edges_and_the_coil_follows() {
        let off = inputs();
        let on = PlcInputs { emergency_input: true, ..off };
        let v = quiet(&off, &on);
        assert_eq!(v.events, [PlcEvent::EmergencyInput(true)]);
        assert_eq!(v.emergency, Some(true));
        let v = evaluate(Some(&on), &off, &OpenCommands::default(), false, true, Instant::now());
        assert_eq!(v.events, [PlcEvent::EmergencyInput(false)]);
        assert_eq!(v.emergency, Some(false));
    }

    #[test]
    fn a_door_fault_is_raised_and_cleared_on_its_edges() {
        let ok = inputs();
        let fault = PlcInputs { door_fault: true, ..ok };
        assert_eq!(quiet(&ok, &fault).events, [PlcEvent::DoorFault(true)]);
        assert_eq!(quiet(&fault, &ok).events, [PlcEvent::DoorFault(false)]);
    }

    #[test]
    fn tailgating_is_raised_with_how_many_the_counter_went_up_across_its_wrap() {
        let prev = PlcInputs { tailgating_total: u16::MAX, ..inputs() };
        let now = PlcInputs { tailgating_total: 1, ..inputs() };
        assert_eq!(quiet(&prev, &now).events, [PlcEvent::Tailgating(2)]);
    }

    #[test]
    fn a_passage_with_an_open_command_is_explained_and_one_without_is_forced() {
        let t0 = Instant::now();
        let mut opens = OpenCommands::default();
        opens.opened(Aisle::Entry, t0);
        let prev = inputs();
        let now =
            PlcInputs { entries_total: prev.entries_total + 1, exits_total: prev.exits_total + 1, ..prev };
        let v = evaluate(Some(&prev), &now, &opens, false, false, t0);
        assert_eq!(v.events, [PlcEvent::ForcedPassage(Aisle::Exit)]);
        assert_eq!(v.opens.waiting(Aisle::Entry), 0);
        // The caller's commands are untouched until it keeps the verdict.
        assert_eq!(opens.waiting(Aisle::Entry), 1);
    }

    #[test]
    fn an_open_command_older_than_the_window_explains_no_passage() {
        let t0 = Instant::now();
        let mut opens = OpenCommands::default();
        opens.opened(Aisle::Entry, t0);
        let prev = inputs();
        let now = PlcInputs { entries_total: prev.entries_total + 1, ..prev };
        let later = t0 + OPEN_WINDOW + Duration::from_millis(1);
        let v = evaluate(Some(&prev), &now, &opens, false, false, later);
        assert_eq!(v.events, [PlcEvent::ForcedPassage(Aisle::Entry)]);
        assert_eq!(v.opens.waiting(Aisle::Entry), 0);
    }

    #[test]
    fn no_passage_is_forced_while_the_passage_is_held_free() {
        let prev = inputs();
        let now = PlcInputs { entries_total: prev.entries_total + 2, ..prev };
        let t = Instant::now();
        let none = OpenCommands::default();
        assert!(evaluate(Some(&prev), &now, &none, true, false, t).events.is_empty());
        assert!(evaluate(Some(&prev), &now, &none, false, true, t).events.is_empty());
        // The emergency input rising in the same poll frees it too.
        let emergency = PlcInputs { emergency_input: true, ..now };
        let v = evaluate(Some(&prev), &emergency, &none, false, false, t);
        assert_eq!(v.events, [PlcEvent::EmergencyInput(true)]);
    }
}
