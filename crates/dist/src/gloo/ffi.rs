//! The cxx bridge to `cpp/gloo_bridge.cc`. C++ exceptions (Gloo's errors, and errors the
//! store callbacks raise) arrive here as `cxx::Exception` carrying their message.

#[cxx::bridge(namespace = "ff_dist")]
pub(crate) mod bridge {
    extern "Rust" {
        /// The Rust store as Gloo's rendezvous sees it (see `store_access.rs`).
        type GlooStoreAccess;

        fn store_set(store: &GlooStoreAccess, key: &str, value: &[u8]) -> Result<()>;
        fn store_get(store: &GlooStoreAccess, key: &str) -> Result<Vec<u8>>;
        fn store_wait(store: &GlooStoreAccess, keys: &[String], timeout_ms: i64) -> Result<()>;
    }

    unsafe extern "C++" {
        include!("ff-dist/cpp/gloo_bridge.h");

        /// A connected Gloo context with the state its collectives keep between calls.
        type GlooContext;

        /// Joins `size` processes into a full mesh of TCP pairs, exchanging addresses
        /// through `store`. The device binds `iface` when not empty, else `hostname`.
        fn connect_full_mesh(
            store: &GlooStoreAccess,
            rank: i32,
            size: i32,
            hostname: &str,
            iface: &str,
            timeout_ms: i64,
        ) -> Result<UniquePtr<GlooContext>>;

        /// For each peer rank, this side's address of the connection to it, as Gloo prints
        /// addresses in its errors ("" at this process's own rank).
        fn local_endpoints(context: &GlooContext) -> Vec<String>;

        fn all_reduce_sum_f32(
            context: Pin<&mut GlooContext>,
            data: &mut [f32],
            timeout_ms: i64,
        ) -> Result<()>;

        fn all_reduce_sum_f64(
            context: Pin<&mut GlooContext>,
            data: &mut [f64],
            timeout_ms: i64,
        ) -> Result<()>;

        fn all_gather_bytes(
            context: Pin<&mut GlooContext>,
            input: &[u8],
            output: &mut [u8],
            timeout_ms: i64,
        ) -> Result<()>;

        fn broadcast_bytes(
            context: Pin<&mut GlooContext>,
            data: &mut [u8],
            root: i32,
            timeout_ms: i64,
        ) -> Result<()>;

        fn barrier(context: Pin<&mut GlooContext>, timeout_ms: i64) -> Result<()>;
    }
}

use super::store_access::{store_get, store_set, store_wait, GlooStoreAccess};

// SAFETY: a Gloo context may be used from any thread, one call at a time; the process group
// that owns it keeps it behind a mutex, so no two threads call into it at once.
unsafe impl Send for bridge::GlooContext {}
