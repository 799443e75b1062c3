//! Gathers of the next unit on a background thread, so that communication overlaps the
//! computation of the current unit.
//!
//! The thread has its own communicator (a second Gloo context over the same ranks): collectives
//! on one context run while the main thread's reduce-scatters use the other. Every rank issues
//! the same prefetches in the same order, so the background collectives always match up.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use ff_dist::{DistError, ProcessGroup};

use crate::error::FsdpResult;
use crate::gathered::{Gathered, Shard};

struct Request {
    unit: usize,
    shard: Shard,
}

pub struct Prefetcher {
    requests: Option<Sender<Request>>,
    results: Receiver<(usize, FsdpResult<Gathered>)>,
    pending: Option<usize>,
    thread: Option<JoinHandle<()>>,
}

impl Prefetcher {
    pub fn new(group: Box<dyn ProcessGroup>) -> Self {
        let (requests, inbox) = channel::<Request>();
        let (outbox, results) = channel();
        let thread = std::thread::Builder::new()
            .name("fsdp-prefetch".into())
            .spawn(move || {
                for Request { unit, shard } in inbox {
                    let result = shard.gather(group.as_ref());
                    if outbox.send((unit, result)).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the prefetch thread");
        Self {
            requests: Some(requests),
            results,
            pending: None,
            thread: Some(thread),
        }
    }

    /// The unit whose gather is in flight, if any.
    pub fn pending(&self) -> Option<usize> {
        self.pending
    }

    /// Starts gathering `unit` from this rank's `shard`; at most one gather is in flight.
    pub fn start(&mut self, unit: usize, shard: Shard) {
        debug_assert!(self.pending.is_none());
        if let Some(tx) = &self.requests {
            if tx.send(Request { unit, shard }).is_ok() {
                self.pending = Some(unit);
            }
        }
    }

    /// Waits for the gather in flight and returns its unit and what was gathered.
    pub fn finish(&mut self) -> FsdpResult<Option<(usize, Gathered)>> {
        let Some(unit) = self.pending.take() else {
            return Ok(None);
        };
        match self.results.recv() {
            Ok((done, gathered)) => {
                debug_assert_eq!(done, unit);
                Ok(Some((done, gathered?)))
            }
            Err(_) => Err(DistError::Broken {
                op: "all_gather",
                group: "fsdp-prefetch".into(),
                failed_op: "all_gather",
                message: "the prefetch thread stopped".into(),
            }
            .into()),
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
