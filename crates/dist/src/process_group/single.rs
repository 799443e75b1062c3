//! The group of one process: every collective is the identity (or a copy) and nothing
//! touches the network, so single-process training runs the same code path as many.

use super::{check_len, check_root, subgroup_rank, DistError, ProcessGroup};

/// World size 1, rank 0.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcessGroup;

impl SingleProcessGroup {
    pub fn new() -> Self {
        Self
    }
}

impl ProcessGroup for SingleProcessGroup {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn backend(&self) -> &'static str {
        "single"
    }

    fn all_reduce_sum(&self, _data: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }

    fn all_reduce_sum_f64(&self, _data: &mut [f64]) -> Result<(), DistError> {
        Ok(())
    }

    fn reduce_scatter_sum(&self, input: &[f32], output: &mut [f32]) -> Result<(), DistError> {
        check_len(
            "reduce_scatter",
            "input",
            input.len(),
            output.len(),
            "world size × output length",
        )?;
        output.copy_from_slice(input);
        Ok(())
    }

    fn all_gather_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<(), DistError> {
        check_len(
            "all_gather",
            "output",
            output.len(),
            input.len(),
            "world size × input length",
        )?;
        output.copy_from_slice(input);
        Ok(())
    }

    fn broadcast_bytes(&self, _data: &mut [u8], root: usize) -> Result<(), DistError> {
        check_root("broadcast", root, 1)
    }

    fn barrier(&self) -> Result<(), DistError> {
        Ok(())
    }

    fn subgroup(&self, name: &str, members: &[usize]) -> Result<Box<dyn ProcessGroup>, DistError> {
        subgroup_rank(name, members, 0, 1)?;
        Ok(Box::new(SingleProcessGroup))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_are_identities_and_check_lengths() {
        let pg = SingleProcessGroup::new();
        let mut data = vec![1.5f32, -2.0];
        pg.all_reduce_sum(&mut data).unwrap();
        pg.all_reduce_mean(&mut data).unwrap();
        assert_eq!(data, [1.5, -2.0]);

        let mut out = [0f32; 2];
        pg.reduce_scatter_sum(&data, &mut out).unwrap();
        assert_eq!(out, [1.5, -2.0]);
        pg.all_gather(&data, &mut out).unwrap();
        assert_eq!(out, [1.5, -2.0]);
        let err = pg
            .all_gather(&data, &mut [0f32; 3])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "all_gather's output has 3 elements but must have 2 (world size × input length)"
        );

        assert_eq!(pg.broadcast_blob(b"config", 0).unwrap(), b"config");
        assert!(pg.broadcast(&mut data, 1).is_err());
        pg.barrier().unwrap();
        assert_eq!(pg.subgroup("solo", &[0]).unwrap().world_size(), 1);
        assert!(pg.subgroup("solo", &[0, 1]).is_err());
    }
}
