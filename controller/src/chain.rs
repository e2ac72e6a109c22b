//! The ledger primitives the state machine uses, from `afc_domain::ledger`: the hash chain over
//! canonical record bytes, per-gate progress, and gate batch signatures.

pub use afc_domain::ledger::{
    chain_hash, sign_batch, sign_batch_covering, verify_batch, verify_batch_covering, verify_chain,
    GateProgress, LedgerEntry, LedgerError, SeqStatus, GENESIS_HASH,
};
