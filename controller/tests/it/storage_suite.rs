//! openraft's storage conformance suite against the sled store.

use controller::storage::{self, LogStore, StateMachineStore};
use controller::types::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().unwrap();
        let (log, sm) = storage::open(dir.path()).unwrap();
        Ok((dir, log, sm))
    }
}

#[test]
fn the_sled_store_passes_the_openraft_storage_suite() {
    // Its fsyncs would slow the timed cluster tests down: take turns.
    let _serial = crate::harness::CLUSTER_LOCK.blocking_lock();
    Suite::test_all(SledBuilder).unwrap();
}
