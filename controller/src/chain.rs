//! The ledger primitives the state machine uses, from `afc_domain::ledger`: the hash chain over
//! canonical record bytes, per-gate progress, and gate batch signatures.

pub use afc_domain::ledger::{
    chain_hash, chain_hash_canonical, sign_batch, sign_batch_covering, sign_canonical_batch, verify_batch,
    verify_batch_covering, verify_canonical_batch, verify_chain, CanonicalRecord, GateProgress, LedgerEntry,
    LedgerError, SeqStatus, GENESIS_HASH,
};
