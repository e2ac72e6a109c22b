//! What to do with a verified batch, given what is stored: the exactly-once rules, as a pure
//! function of the batch, the acknowledged point and the stored hashes.

use crate::protocol::{BatchError, UploadBatch};

/// The decision for one batch that passed [`UploadBatch::verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Wholly at or below the acknowledged point and identical to what is stored: answer 200 with
    /// the current `acked_through`, store nothing.
    Resend,
    /// Store the records after the first `skip` (those are already stored, and identical).
    Append { skip: usize },
    /// Starts after `acked_through + 1`: answer 409, resend from `expected_from`.
    Conflict { expected_from: u64 },
}

/// Decides a verified batch against a ledger holding `1..=acked_through`, whose entry hashes
/// `hash_at` returns (genesis for 0). A batch that overlaps the stored range must agree with it
/// there, or it is a fork: [`BatchError::HistoryMismatch`].
pub fn plan(
    batch: &UploadBatch,
    acked_through: u64,
    hash_at: impl Fn(u64) -> Option<[u8; 32]>,
) -> Result<Plan, BatchError> {
    let expected_from = acked_through.saturating_add(1);
    if batch.first_index > expected_from {
        return Ok(Plan::Conflict { expected_from });
    }
    // first_index >= 1 (verified), so first_index - 1 <= acked_through is stored.
    let before = batch.first_index - 1;
    if hash_at(before) != Some(batch.prev_hash) {
        return Err(BatchError::HistoryMismatch { index: before });
    }
    if batch.last_index <= acked_through {
        return if hash_at(batch.last_index) == Some(batch.last_hash) {
            Ok(Plan::Resend)
        } else {
            Err(BatchError::HistoryMismatch { index: batch.last_index })
        };
    }
    // Overlap: entries first_index..=acked_through are already stored. The batch chains from the
    // stored prev hash, so it agrees with the store iff its hash at acked_through does.
    let skip = usize::try_from(acked_through - before).unwrap_or(usize::MAX);
    if skip > 0 {
        let ours = batch.records.get(skip - 1).map(|e| e.hash);
        if ours.is_none() || ours != hash_at(acked_through) {
            return Err(BatchError::HistoryMismatch { index: acked_through });
        }
    }
    Ok(Plan::Append { skip })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;
    use afc_domain::ledger::{LedgerEntry, GENESIS_HASH};
    use afc_domain::model::Ident;

    fn chain(n: u64) -> Vec<LedgerEntry> {
        testdata::ledger(&Ident::new("xian_rd").unwrap(), n)
    }

    fn batch(chain: &[LedgerEntry], first: u64, last: u64) -> UploadBatch {
        let prev = if first == 1 { GENESIS_HASH } else { chain[first as usize - 2].hash };
        UploadBatch::new(prev, chain[first as usize - 1..last as usize].to_vec()).unwrap()
    }

    fn stored(chain: &[LedgerEntry], acked: u64) -> impl Fn(u64) -> Option<[u8; 32]> + '_ {
        move |i| match i {
            0 => Some(GENESIS_HASH),
            i if i <= acked => Some(chain[i as usize - 1].hash),
            _ => None,
        }
    }

    #[test]
    fn the_next_batch_is_appended_whole() {
        let c = chain(20);
        assert_eq!(plan(&batch(&c, 1, 10), 0, stored(&c, 0)), Ok(Plan::Append { skip: 0 }));
        assert_eq!(plan(&batch(&c, 11, 20), 10, stored(&c, 10)), Ok(Plan::Append { skip: 0 }));
    }

    #[test]
    fn a_batch_at_or_below_the_acknowledged_point_is_a_resend() {
        let c = chain(20);
        assert_eq!(plan(&batch(&c, 1, 10), 10, stored(&c, 10)), Ok(Plan::Resend));
        assert_eq!(plan(&batch(&c, 3, 5), 20, stored(&c, 20)), Ok(Plan::Resend));
    }

    #[test]
    fn a_batch_after_a_gap_is_a_conflict_naming_where_to_resume() {
        let c = chain(20);
        assert_eq!(plan(&batch(&c, 12, 20), 10, stored(&c, 10)), Ok(Plan::Conflict { expected_from: 11 }));
    }

    #[test]
    fn a_partly_new_batch_appends_only_its_new_suffix() {
        let c = chain(20);
        assert_eq!(plan(&batch(&c, 6, 15), 10, stored(&c, 10)), Ok(Plan::Append { skip: 5 }));
    }

    #[test]
    fn a_batch_from_a_forked_chain_is_a_history_mismatch() {
        let c = chain(20);
        let other = testdata::ledger(&Ident::new("other").unwrap(), 20);
        // Same indices, different records: the prev hash differs from what is stored.
        assert_eq!(
            plan(&batch(&other, 11, 20), 10, stored(&c, 10)),
            Err(BatchError::HistoryMismatch { index: 10 })
        );
        // A "resend" of different records from genesis.
        assert_eq!(
            plan(&batch(&other, 1, 5), 10, stored(&c, 10)),
            Err(BatchError::HistoryMismatch { index: 5 })
        );
        assert_eq!(
            plan(&batch(&other, 1, 15), 10, stored(&c, 10)),
            Err(BatchError::HistoryMismatch { index: 10 })
        );
    }
}
