//! SIGINT and SIGTERM while workers run: the launcher notes them and forwards them to its
//! workers instead of dying and leaving them behind.
//!
//! The handlers are installed once per process and stay; outside a launch they behave as the
//! default action would (terminate), so installing them changes nothing for the rest of the
//! program. Every launch running in the process sees each signal.

use std::io;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::OnceLock;

const WATCHED: [i32; 2] = [libc::SIGINT, libc::SIGTERM];

/// Launches currently watching for signals.
static WATCHERS: AtomicUsize = AtomicUsize::new(0);
/// How many watched signals arrived during launches, and the latest one.
static RECEIVED: AtomicUsize = AtomicUsize::new(0);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

fn install_handlers() -> Result<(), String> {
    for signal in WATCHED {
        let action = move || {
            if WATCHERS.load(Ordering::SeqCst) == 0 {
                let _ = signal_hook::low_level::emulate_default_handler(signal);
            } else {
                LAST_SIGNAL.store(signal, Ordering::SeqCst);
                RECEIVED.fetch_add(1, Ordering::SeqCst);
            }
        };
        // SAFETY: the action only touches atomics and, outside launches, runs signal-hook's
        // default-action emulation, which is meant to be called from a signal handler.
        unsafe { signal_hook::low_level::register(signal, action) }.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Notes signals from its creation until it is dropped.
pub(crate) struct SignalWatch {
    seen: usize,
}

impl SignalWatch {
    pub(crate) fn start() -> io::Result<Self> {
        INSTALLED
            .get_or_init(install_handlers)
            .clone()
            .map_err(io::Error::other)?;
        WATCHERS.fetch_add(1, Ordering::SeqCst);
        Ok(Self {
            seen: RECEIVED.load(Ordering::SeqCst),
        })
    }

    /// The latest signal that arrived since this watch started, if any.
    pub(crate) fn received(&self) -> Option<i32> {
        (RECEIVED.load(Ordering::SeqCst) != self.seen).then(|| LAST_SIGNAL.load(Ordering::SeqCst))
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        WATCHERS.fetch_sub(1, Ordering::SeqCst);
    }
}
