//! The engine's KeyValueStore conformance suite on the redb store, reopened
//! from disk at random points.

use smartmsg_embedded::{RedbStore, RedbStoreConfig};
use smartmsg_engine::stream::StoreLimits;
use smartmsg_engine::testkit::{
    kv_changelog_retention, kv_store_conformance, KvHarness, SuiteConfig,
};
use tempfile::TempDir;

struct Redb {
    config: RedbStoreConfig,
    dirs: Vec<TempDir>,
}

impl KvHarness for Redb {
    type Store = RedbStore;

    fn create(&mut self) -> RedbStore {
        if self.dirs.len() > 4 {
            self.dirs.remove(0);
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RedbStore::open_with(dir.path().join("state.redb"), self.config).expect("open");
        self.dirs.push(dir);
        store
    }

    fn reopen(&mut self, store: RedbStore) -> RedbStore {
        let path = store.path().to_owned();
        drop(store);
        RedbStore::open_with(path, self.config).expect("reopen")
    }
}

#[test]
fn redb_store_conforms() {
    kv_store_conformance(
        Redb {
            config: RedbStoreConfig::default(),
            dirs: Vec::new(),
        },
        {
            let mut built = SuiteConfig::default();
            built.cases = 32;
            built
        },
    );
}

#[test]
fn redb_store_with_small_limits_conforms() {
    let config = {
        let mut built = RedbStoreConfig::default();
        built.limits = {
            let mut built = StoreLimits::default();
            built.max_key_bytes = 16;
            built.max_value_bytes = 64;
            built.max_batch_ops = 30_000;
            built.max_read = 5_000;
            built
        };
        built.durable = false;
        built
    };
    kv_store_conformance(
        Redb {
            config,
            dirs: Vec::new(),
        },
        {
            let mut built = SuiteConfig::default();
            built.cases = 16;
            built
        },
    );
}

#[test]
fn redb_store_keeps_the_newest_changelog_entries() {
    kv_changelog_retention(Redb {
        config: {
            let mut built = RedbStoreConfig::default();
            built.limits = {
                let mut built = StoreLimits::default();
                built.max_changelog_entries = 500;
                built
            };
            built
        },
        dirs: Vec::new(),
    });
}
