//! The KeyValueStore conformance suite on the in-memory store.

use smartmsg_engine::stream::{InMemoryStore, StoreLimits};
use smartmsg_engine::testkit::{
    kv_changelog_retention, kv_store_conformance, KvHarness, SuiteConfig,
};

struct Memory(StoreLimits);

impl KvHarness for Memory {
    type Store = InMemoryStore;
    fn create(&mut self) -> InMemoryStore {
        InMemoryStore::with_limits(self.0)
    }
}

#[test]
fn in_memory_store_conforms() {
    kv_store_conformance(Memory(StoreLimits::default()), SuiteConfig::default());
}

#[test]
fn in_memory_store_with_small_limits_conforms() {
    let limits = {
        let mut built = StoreLimits::default();
        built.max_key_bytes = 16;
        built.max_value_bytes = 64;
        built.max_batch_ops = 30_000;
        built.max_read = 5_000;
        built
    };
    kv_store_conformance(Memory(limits), SuiteConfig::default());
}

#[test]
fn in_memory_store_keeps_the_newest_changelog_entries() {
    kv_changelog_retention(Memory({
        let mut built = StoreLimits::default();
        built.max_changelog_entries = 500;
        built
    }));
}
