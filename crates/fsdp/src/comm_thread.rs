//! Collectives on a background thread, so that communication overlaps computation: gathers of
//! the next unit (prefetch) and the reduce-scatters of the gradients of units whose backward is
//! done, which the walk no longer waits for.
//!
//! The thread has its own communicator (a second Gloo context over the same ranks), so its
//! collectives run while the main thread's use the other. It runs its requests one at a time in
//! the order they came, and every rank makes the same requests in the same order (the walk's),
//! so the background collectives always match up.
//!
//! Waiting for every reduce-scatter at each unit's end had made each layer's backward a
//! barrier: a rank a little ahead in one layer waited there for the other, however the ranks'
//! times evened out over the step.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use ff_dist::{DistError, ProcessGroup};

use crate::error::{FsdpError, FsdpResult};
use crate::gathered::{Gathered, Shard};

enum Request {
    Gather(usize, Shard),
    /// A unit's summed gradient, to be reduce-scattered into a shard of `.2` values.
    ReduceScatter(usize, Vec<f32>, usize),
}

enum Reply {
    Gathered(usize, FsdpResult<Gathered>),
    Reduced(usize, FsdpResult<Vec<f32>>),
}

pub struct CommThread {
    requests: Option<Sender<Request>>,
    replies: Receiver<Reply>,
    /// The unit whose gather is in flight, if any.
    pending_gather: Option<usize>,
    /// A gather that arrived while reduce-scatters were waited for.
    early_gather: Option<(usize, FsdpResult<Gathered>)>,
    /// How many reduce-scatters are in flight.
    pending_reductions: usize,
    /// Reduce-scatters done, in the order requested.
    reduced: Vec<(usize, Vec<f32>)>,
    thread: Option<JoinHandle<()>>,
}

impl CommThread {
    pub fn new(group: Box<dyn ProcessGroup>) -> Self {
        let (requests, inbox) = channel::<Request>();
        let (outbox, replies) = channel();
        let thread = std::thread::Builder::new()
            .name("fsdp-comm".into())
            .spawn(move || {
                for request in inbox {
                    let reply = match request {
                        Request::Gather(unit, shard) => {
                            Reply::Gathered(unit, shard.gather(group.as_ref()))
                        }
                        Request::ReduceScatter(unit, sum, shard_len) => {
                            let mut shard = vec![0f32; shard_len];
                            let result = group.reduce_scatter_sum(&sum, &mut shard);
                            Reply::Reduced(unit, result.map(|()| shard).map_err(Into::into))
                        }
                    };
                    if outbox.send(reply).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the FSDP communication thread");
        Self {
            requests: Some(requests),
            replies,
            pending_gather: None,
            early_gather: None,
            pending_reductions: 0,
            reduced: Vec::new(),
            thread: Some(thread),
        }
    }

    /// The unit whose gather is in flight, if any.
    pub fn pending_gather(&self) -> Option<usize> {
        self.pending_gather
    }

    /// Starts gathering `unit` from this rank's `shard`; at most one gather is in flight.
    pub fn start_gather(&mut self, unit: usize, shard: Shard) -> FsdpResult<()> {
        debug_assert!(self.pending_gather.is_none());
        self.send(Request::Gather(unit, shard), "all_gather")?;
        self.pending_gather = Some(unit);
        Ok(())
    }

    /// Waits for the gather in flight and returns its unit and what was gathered.
    pub fn finish_gather(&mut self) -> FsdpResult<Option<(usize, Gathered)>> {
        if self.pending_gather.take().is_none() {
            return Ok(None);
        }
        if let Some((unit, gathered)) = self.early_gather.take() {
            return Ok(Some((unit, gathered?)));
        }
        loop {
            match self.replies.recv().map_err(|_| stopped("all_gather"))? {
                Reply::Gathered(unit, gathered) => return Ok(Some((unit, gathered?))),
                Reply::Reduced(unit, shard) => self.reduced_one(unit, shard)?,
            }
        }
    }

    /// Starts reduce-scattering unit `unit`'s summed gradient `sum` into a shard of
    /// `shard_len` values.
    pub fn start_reduce_scatter(
        &mut self,
        unit: usize,
        sum: Vec<f32>,
        shard_len: usize,
    ) -> FsdpResult<()> {
        self.send(
            Request::ReduceScatter(unit, sum, shard_len),
            "reduce_scatter",
        )?;
        self.pending_reductions += 1;
        Ok(())
    }

    /// Waits for every reduce-scatter requested and returns each unit's shard of the summed
    /// gradient, in the order requested.
    pub fn finish_reductions(&mut self) -> FsdpResult<Vec<(usize, Vec<f32>)>> {
        while self.pending_reductions > 0 {
            match self.replies.recv().map_err(|_| stopped("reduce_scatter"))? {
                Reply::Reduced(unit, shard) => self.reduced_one(unit, shard)?,
                Reply::Gathered(unit, gathered) => self.early_gather = Some((unit, gathered)),
            }
        }
        Ok(std::mem::take(&mut self.reduced))
    }

    /// Keeps a finished reduce-scatter's shard; a failed one fails whatever was waited for.
    fn reduced_one(&mut self, unit: usize, shard: FsdpResult<Vec<f32>>) -> FsdpResult<()> {
        self.pending_reductions -= 1;
        self.reduced.push((unit, shard?));
        Ok(())
    }

    fn send(&self, request: Request, op: &'static str) -> FsdpResult<()> {
        match &self.requests {
            Some(tx) if tx.send(request).is_ok() => Ok(()),
            _ => Err(stopped(op)),
        }
    }
}

fn stopped(op: &'static str) -> FsdpError {
    DistError::Broken {
        op,
        group: "fsdp-comm".into(),
        failed_op: op,
        message: "the FSDP communication thread stopped".into(),
    }
    .into()
}

impl Drop for CommThread {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ff_dist::SingleProcessGroup;

    fn shard(values: &[f32]) -> Shard {
        Shard {
            trained: values.to_vec(),
            frozen: None,
        }
    }

    /// Replies come in the order requested, whichever kind is waited for: a gather behind a
    /// reduce-scatter, and a gather between two reduce-scatters.
    #[test]
    fn each_wait_takes_its_replies_and_keeps_the_others() {
        let mut comm = CommThread::new(Box::new(SingleProcessGroup));
        comm.start_reduce_scatter(1, vec![1.0, 2.0], 2).unwrap();
        comm.start_gather(2, shard(&[3.0])).unwrap();
        let (unit, gathered) = comm.finish_gather().unwrap().unwrap();
        assert_eq!((unit, gathered.trained), (2, vec![3.0]));
        comm.start_reduce_scatter(3, vec![4.0], 1).unwrap();
        comm.start_gather(4, shard(&[5.0])).unwrap();
        comm.start_reduce_scatter(5, vec![6.0], 1).unwrap();
        let reduced = comm.finish_reductions().unwrap();
        assert_eq!(
            reduced,
            [(1, vec![1.0, 2.0]), (3, vec![4.0]), (5, vec![6.0])]
        );
        assert_eq!(comm.pending_gather(), Some(4));
        let (unit, gathered) = comm.finish_gather().unwrap().unwrap();
        assert_eq!((unit, gathered.trained), (4, vec![5.0]));
        assert!(comm.finish_gather().unwrap().is_none());
        assert!(comm.finish_reductions().unwrap().is_empty());
    }

    #[test]
    fn a_failed_reduce_scatter_fails_the_gather_waited_for_behind_it() {
        let mut comm = CommThread::new(Box::new(SingleProcessGroup));
        // Three values do not reduce-scatter into a shard of two on a world of one.
        comm.start_reduce_scatter(1, vec![1.0, 2.0, 3.0], 2)
            .unwrap();
        comm.start_gather(2, shard(&[3.0])).unwrap();
        let err = comm
            .finish_gather()
            .err()
            .expect("the reduce-scatter failed");
        assert!(err.to_string().contains("reduce_scatter"), "{err}");
    }
}
