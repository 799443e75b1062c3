//! A process group that notes the collectives the engine runs on it and on the groups it makes
//! from it: the engine's own shard group and its communication thread's group are both
//! sub-groups of the one it is given, so the test sees every gather and reduce-scatter, which
//! thread issued it (by the sub-group's name), and what travelled.

use std::sync::{Arc, Mutex};

use ff_dist::{DistError, ProcessGroup};

/// One collective, as it completed.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// The name the group was made with ("fsdp-shard", "fsdp-comm", ...).
    pub group: String,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A float32 all-gather and what it gathered.
    AllGather(Vec<f32>),
    /// A reduce-scatter and what this rank put in.
    ReduceScatter(Vec<f32>),
    /// Anything else.
    Other(&'static str),
}

pub type Log = Arc<Mutex<Vec<Call>>>;

pub struct Recording {
    inner: Box<dyn ProcessGroup>,
    name: String,
    log: Log,
}

impl Recording {
    pub fn new(inner: Box<dyn ProcessGroup>, name: &str, log: Log) -> Self {
        Self {
            inner,
            name: name.to_string(),
            log,
        }
    }

    fn note(&self, op: Op) {
        self.log.lock().expect("the log's lock").push(Call {
            group: self.name.clone(),
            op,
        });
    }
}

impl ProcessGroup for Recording {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), DistError> {
        self.inner.all_reduce_sum(data)?;
        self.note(Op::Other("all_reduce_sum"));
        Ok(())
    }

    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<(), DistError> {
        self.inner.all_reduce_sum_f64(data)?;
        self.note(Op::Other("all_reduce_sum_f64"));
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &[f32], output: &mut [f32]) -> Result<(), DistError> {
        self.inner.reduce_scatter_sum(input, output)?;
        self.note(Op::ReduceScatter(input.to_vec()));
        Ok(())
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), DistError> {
        self.inner.all_gather(input, output)?;
        self.note(Op::AllGather(output.to_vec()));
        Ok(())
    }

    fn all_gather_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<(), DistError> {
        self.inner.all_gather_bytes(input, output)?;
        self.note(Op::Other("all_gather_bytes"));
        Ok(())
    }

    fn broadcast_bytes(&self, data: &mut [u8], root: usize) -> Result<(), DistError> {
        self.inner.broadcast_bytes(data, root)?;
        self.note(Op::Other("broadcast_bytes"));
        Ok(())
    }

    fn barrier(&self) -> Result<(), DistError> {
        self.inner.barrier()?;
        self.note(Op::Other("barrier"));
        Ok(())
    }

    fn subgroup(&self, name: &str, members: &[usize]) -> Result<Box<dyn ProcessGroup>, DistError> {
        let inner = self.inner.subgroup(name, members)?;
        Ok(Box::new(Recording::new(inner, name, Arc::clone(&self.log))))
    }
}
