//! Gloo, bound through a small C++ bridge (`cpp/gloo_bridge.cc`, built by `build.rs` against
//! Debian's libgloo): a full-mesh TCP context whose rendezvous runs over the Rust store, and
//! its collectives on contiguous host buffers. Gloo's C++ exceptions come back as
//! [`GlooFailure`] values carrying Gloo's own message.

mod ffi;
mod store_access;

use std::time::Duration;

use cxx::UniquePtr;

use ffi::bridge;
pub(crate) use store_access::GlooStoreAccess;

/// A Gloo call failed; the text is Gloo's (or the store's) message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct GlooFailure(pub(crate) String);

impl From<cxx::Exception> for GlooFailure {
    fn from(e: cxx::Exception) -> Self {
        GlooFailure(e.what().to_string())
    }
}

/// Where the TCP transport listens: a named network interface, or the address a host name
/// resolves to.
pub(crate) enum Bind<'a> {
    Interface(&'a str),
    Hostname(&'a str),
}

/// A connected Gloo context. Calls need `&mut self`: Gloo runs one collective at a time
/// on a context.
pub(crate) struct GlooConnection {
    context: UniquePtr<bridge::GlooContext>,
}

fn millis(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)
}

impl GlooConnection {
    pub(crate) fn connect(
        store: &GlooStoreAccess,
        rank: usize,
        size: usize,
        bind: Bind<'_>,
        timeout: Duration,
    ) -> Result<Self, GlooFailure> {
        let (hostname, iface) = match bind {
            Bind::Interface(name) => ("", name),
            Bind::Hostname(name) => (name, ""),
        };
        let rank =
            i32::try_from(rank).map_err(|_| GlooFailure(format!("rank {rank} is too large")))?;
        let size = i32::try_from(size)
            .map_err(|_| GlooFailure(format!("world size {size} is too large")))?;
        let context =
            bridge::connect_full_mesh(store, rank, size, hostname, iface, millis(timeout))?;
        if context.is_null() {
            return Err(GlooFailure("Gloo returned no context".into()));
        }
        Ok(Self { context })
    }

    /// For each peer rank, this side's address of the connection to that peer.
    pub(crate) fn local_endpoints(&self) -> Vec<String> {
        match self.context.as_ref() {
            Some(context) => bridge::local_endpoints(context),
            None => Vec::new(),
        }
    }

    pub(crate) fn all_reduce_sum_f32(
        &mut self,
        data: &mut [f32],
        timeout: Duration,
    ) -> Result<(), GlooFailure> {
        Ok(bridge::all_reduce_sum_f32(
            self.context.pin_mut(),
            data,
            millis(timeout),
        )?)
    }

    pub(crate) fn all_reduce_sum_f64(
        &mut self,
        data: &mut [f64],
        timeout: Duration,
    ) -> Result<(), GlooFailure> {
        Ok(bridge::all_reduce_sum_f64(
            self.context.pin_mut(),
            data,
            millis(timeout),
        )?)
    }

    pub(crate) fn all_gather_bytes(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        timeout: Duration,
    ) -> Result<(), GlooFailure> {
        Ok(bridge::all_gather_bytes(
            self.context.pin_mut(),
            input,
            output,
            millis(timeout),
        )?)
    }

    pub(crate) fn broadcast_bytes(
        &mut self,
        data: &mut [u8],
        root: usize,
        timeout: Duration,
    ) -> Result<(), GlooFailure> {
        let root =
            i32::try_from(root).map_err(|_| GlooFailure(format!("root {root} is too large")))?;
        Ok(bridge::broadcast_bytes(
            self.context.pin_mut(),
            data,
            root,
            millis(timeout),
        )?)
    }

    pub(crate) fn barrier(&mut self, timeout: Duration) -> Result<(), GlooFailure> {
        Ok(bridge::barrier(self.context.pin_mut(), millis(timeout))?)
    }
}
