//! The engine's KeyValueStore conformance suite on the sled store, reopened
//! from disk at random points.

use smartmsg_engine::stream::StoreLimits;
use smartmsg_engine::testkit::{
    kv_changelog_retention, kv_store_conformance, KvHarness, SuiteConfig,
};
use smartmsg_sled::{SledStore, SledStoreConfig};
use tempfile::TempDir;

struct Sled {
    config: SledStoreConfig,
    dirs: Vec<TempDir>,
}

impl KvHarness for Sled {
    type Store = SledStore;

    fn create(&mut self) -> SledStore {
        if self.dirs.len() > 4 {
            self.dirs.remove(0);
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SledStore::open_with(dir.path().join("state"), self.config).expect("open");
        self.dirs.push(dir);
        store
    }

    fn reopen(&mut self, store: SledStore) -> SledStore {
        // sled frees a closed database (and its file lock) lazily, from
        // whichever thread next collects its epoch garbage, so a reopen in
        // the same process can find the lock still held. Open a copy of the
        // files instead: what a new process would find on disk.
        let path = store.path().to_owned();
        drop(store);
        let dir = tempfile::tempdir().expect("temp dir");
        let copy = dir.path().join("state");
        copy_dir(&path, &copy);
        if self.dirs.len() > 4 {
            self.dirs.remove(0);
        }
        self.dirs.push(dir);
        SledStore::open_with(copy, self.config).expect("reopen")
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("create copy");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

#[test]
fn sled_store_conforms() {
    kv_store_conformance(
        Sled {
            // Each case reopens a fresh database; fsync per batch would only
            // slow the suite (durability across a clean reopen is what it
            // checks, and drop flushes).
            config: {
                let mut built = SledStoreConfig::default();
                built.durable = false;
                built
            },
            dirs: Vec::new(),
        },
        {
            let mut built = SuiteConfig::default();
            built.cases = 24;
            built
        },
    );
}

#[test]
fn sled_store_durable_with_small_limits_conforms() {
    let config = {
        let mut built = SledStoreConfig::default();
        built.limits = {
            let mut built = StoreLimits::default();
            built.max_key_bytes = 16;
            built.max_value_bytes = 64;
            built.max_batch_ops = 30_000;
            built.max_read = 5_000;
            built
        };
        built.durable = true;
        built
    };
    kv_store_conformance(
        Sled {
            config,
            dirs: Vec::new(),
        },
        {
            let mut built = SuiteConfig::default();
            built.cases = 8;
            built.max_ops = 32;
            built
        },
    );
}

#[test]
fn sled_store_keeps_the_newest_changelog_entries() {
    kv_changelog_retention(Sled {
        config: {
            let mut built = SledStoreConfig::default();
            built.limits = {
                let mut built = StoreLimits::default();
                built.max_changelog_entries = 500;
                built
            };
            built.durable = false;
            built
        },
        dirs: Vec::new(),
    });
}
