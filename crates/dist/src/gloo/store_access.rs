//! The Rust end of the C++ `RustBackedStore`: Gloo's rendezvous calls land here and go to the
//! store client under the process group's key prefix, bounded by the group's timeout.

use std::sync::Arc;
use std::time::Duration;

use crate::store::{StoreClient, StoreError};

pub(crate) struct GlooStoreAccess {
    store: Arc<StoreClient>,
    prefix: String,
    timeout: Duration,
}

impl GlooStoreAccess {
    pub(crate) fn new(store: Arc<StoreClient>, prefix: String, timeout: Duration) -> Self {
        Self {
            store,
            prefix,
            timeout,
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }
}

pub(crate) fn store_set(
    access: &GlooStoreAccess,
    key: &str,
    value: &[u8],
) -> Result<(), StoreError> {
    access.store.set(&access.key(key), value)
}

/// Gloo expects `get` to block until the key exists, as PyTorch's stores do.
pub(crate) fn store_get(access: &GlooStoreAccess, key: &str) -> Result<Vec<u8>, StoreError> {
    access.store.get(&access.key(key), access.timeout)
}

/// A negative timeout asks for the group's own (see `kGroupTimeout` in the C++ bridge).
pub(crate) fn store_wait(
    access: &GlooStoreAccess,
    keys: &[String],
    timeout_ms: i64,
) -> Result<(), StoreError> {
    let timeout = u64::try_from(timeout_ms)
        .map(Duration::from_millis)
        .unwrap_or(access.timeout);
    let keys: Vec<String> = keys.iter().map(|k| access.key(k)).collect();
    access.store.wait(&keys, timeout)
}
