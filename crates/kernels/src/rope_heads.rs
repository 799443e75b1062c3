//! Rotary position embedding fused with the move of heads before positions, as one op with its
//! own backward.
//!
//! From candle's ops a projection's heads took a transpose copy, two slices, a negation, a
//! concatenation, two broadcast products and a sum, each with a backward; here it is one pass
//! forward and one backward.

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cast::{to_dtype, to_f32};
use crate::values::{contiguous, written};

/// `x` is `[batch, seq, heads, head_dim]`, or `[batch, seq, heads · head_dim]` as a projection
/// leaves it (no reshape in the graph), `cos` and `sin` are `[positions, head_dim]` for at least
/// `seq` positions (each row's two halves the same angles, as the model's rotary tables are);
/// returns the rotated `[batch, heads, seq, head_dim]`, contiguous, in `x`'s dtype, computed in
/// float32.
/// `None` off the CPU, where the op has no kernel and the caller uses candle's ops.
pub fn rope_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() {
        return Ok(None);
    }
    let head_dim = cos.dim(1)?;
    let fits = match x.dims() {
        [_, seq, _, d] => *d == head_dim && *seq <= cos.dim(0)?,
        [_, seq, width] => head_dim > 0 && width % head_dim == 0 && *seq <= cos.dim(0)?,
        _ => false,
    };
    if !fits || sin.shape() != cos.shape() {
        return Err(Error::Msg(format!(
            "rotary embedding of heads {:?} with tables {:?}",
            x.shape(),
            cos.shape()
        )));
    }
    let op = RopeHeads {
        inverse: false,
        x_shape: x.shape().clone(),
    };
    let op = Arc::new(Box::new(op) as Box<dyn CustomOp3 + Send + Sync>);
    let f32 = |t: &Tensor| to_f32(t)?.contiguous();
    let rotated = f32(x)?.apply_op3_arc(&f32(cos)?, &f32(sin)?, op)?;
    Ok(Some(to_dtype(&rotated, x.dtype())?))
}

/// Forward: `[b, s, h, d]` (or `[b, s, h · d]`) in, rotated by +angle, `[b, h, s, d]` out.
/// Inverse (the backward): `[b, h, s, d]` in, rotated by −angle, out in the forward input's
/// shape `x_shape`.
struct RopeHeads {
    inverse: bool,
    x_shape: Shape,
}

impl CustomOp3 for RopeHeads {
    fn name(&self) -> &'static str {
        "rope-heads"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        cos: &CpuStorage,
        cos_layout: &Layout,
        sin: &CpuStorage,
        sin_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = cos_layout.dims()[1];
        let (b, d1) = (x_layout.dims()[0], x_layout.dims()[1]);
        let d2 = x_layout.shape().elem_count() / (b * d1 * d).max(1);
        // Input axes 1 and 2 are (seq, heads) forward and (heads, seq) inverse.
        let (seq, heads) = if self.inverse { (d2, d1) } else { (d1, d2) };
        let x = contiguous(x.as_slice::<f32>()?, x_layout)?;
        let cos = contiguous(cos.as_slice::<f32>()?, cos_layout)?;
        let sin = contiguous(sin.as_slice::<f32>()?, sin_layout)?;
        if d == 0 || !d.is_multiple_of(2) || x.len() != b * d1 * d2 * d {
            return Err(Error::Msg(format!(
                "rotary embedding of {:?} by angles of {d}",
                x_layout.shape()
            )));
        }
        let half = d / 2;
        // The angle's sign: y1 = x1·c − x2·s, y2 = x2·c + x1·s; the inverse negates s.
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        // One output row (batch, axis 1, axis 2) of `d` values at a time.
        let rotate_row = |(row, y): (usize, &mut [MaybeUninit<f32>])| {
            // The output swaps input axes 1 and 2.
            let (bi, a1, a2) = (row / (d1 * d2), (row / d1) % d2, row % d1);
            // Output axes are (heads, seq) forward and (seq, heads) inverse.
            let (h, s) = if self.inverse { (a2, a1) } else { (a1, a2) };
            let src = if self.inverse {
                ((bi * heads + h) * seq + s) * d
            } else {
                ((bi * seq + s) * heads + h) * d
            };
            let xr = &x[src..src + d];
            let (c, sn) = (&cos[s * d..(s + 1) * d], &sin[s * d..(s + 1) * d]);
            for i in 0..half {
                let (x1, x2) = (xr[i], xr[i + half]);
                y[i].write(x1 * c[i] - sign * x2 * sn[i]);
                y[i + half].write(x2 * c[i + half] + sign * x1 * sn[i + half]);
            }
        };
        // SAFETY: the rows of d values cover out, and each row's loop writes its d = 2 · half
        // values.
        let out = unsafe {
            written(x.len(), |out| {
                out.par_chunks_mut(d).enumerate().for_each(rotate_row)
            })
        };
        let shape = if self.inverse {
            self.x_shape.clone()
        } else {
            Shape::from((b, heads, seq, d))
        };
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = RopeHeads {
            inverse: true,
            x_shape: x.shape().clone(),
        };
        let grad_x = grad_y.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(grad_x), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::normal;
    use candle_core::{Var, D};

    #[test]
    fn equals_rotate_half_of_transposed_heads_forward_and_backward() {
        let (b, s, h, d) = (2, 5, 3, 8);
        let x = Var::from_tensor(&normal((b, s, h, d), 0.0, 1.0, 1)).unwrap();
        let half_angles = normal((s, d / 2), 0.0, 1.0, 2);
        let angles = Tensor::cat(&[&half_angles, &half_angles], 1).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let upstream = normal((b, h, s, d), 0.0, 1.0, 3);

        let ours = rope_heads(x.as_tensor(), &cos, &sin).unwrap().unwrap();
        let t = x.as_tensor().transpose(1, 2).unwrap().contiguous().unwrap();
        let x1 = t.narrow(D::Minus1, 0, d / 2).unwrap();
        let x2 = t.narrow(D::Minus1, d / 2, d / 2).unwrap();
        let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        let reference =
            (t.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap();
        let diff = crate::test_util::max_abs_diff;
        assert!(diff(&ours, &reference) < 1e-6);
        let g_ours = crate::test_util::grads_of(ours.clone(), &upstream);
        let g_ref = crate::test_util::grads_of(reference, &upstream);
        assert!(diff(g_ours.get(&x).unwrap(), g_ref.get(&x).unwrap()) < 1e-6);

        // Heads side by side in the last dimension, as a projection leaves them: the same
        // rotation, and the gradient in that shape.
        let flat = Var::from_tensor(&x.as_tensor().reshape((b, s, h * d)).unwrap()).unwrap();
        let from_flat = rope_heads(flat.as_tensor(), &cos, &sin).unwrap().unwrap();
        assert_eq!(diff(&from_flat, &ours), 0.0);
        let g_flat = crate::test_util::grads_of(from_flat, &upstream);
        let g_flat = g_flat.get(&flat).unwrap();
        assert_eq!(g_flat.dims(), &[b, s, h * d]);
        let g_x = g_ours.get(&x).unwrap().reshape((b, s, h * d)).unwrap();
        assert_eq!(diff(g_flat, &g_x), 0.0);
        assert!(rope_heads(&normal((b, s, 7), 0.0, 1.0, 4), &cos, &sin).is_err());
    }
}
