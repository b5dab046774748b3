//! Wanda (Sun et al. 2023): prune by `|W_ij| · ‖X_j‖₂`, the weight's magnitude times its
//! input's norm over the calibration rows, compared within each output row; no weight update.
//!
//! [`SparsityTarget::Unstructured`]`(s)` zeroes exactly `round(s·cols)` weights of every row
//! (Wanda's per-output comparison group); [`SparsityTarget::NOfM`] keeps the `n`
//! highest-scoring weights of each run of `m` consecutive inputs. Ties: the lower index is
//! pruned first. Rows are independent and run in parallel.

use super::{
    check_weight, has_statistics, magnitude_baseline, no_statistics_stats, proxy_against,
    prune_smallest, CalibratedError, HessianAccumulator, MethodStats, SparsityTarget,
};
use rayon::prelude::*;

/// Wanda-pruned `weight` (rows of `cols`, f32 row-major): pruned weights are 0, the rest
/// unchanged.
///
/// A Hessian without statistics ([`super::has_statistics`]: every norm 0) gives magnitude
/// pruning with the same target.
///
/// Errors: shapes that disagree, a non-finite weight, or a target out of range (or `cols`
/// not a multiple of N:M's `m`).
pub fn wanda(
    target: SparsityTarget,
    weight: &[f32],
    cols: usize,
    hessian: &HessianAccumulator,
) -> Result<(Vec<f32>, MethodStats), CalibratedError> {
    check_weight(weight, cols, hessian)?;
    target.check(cols)?;
    if !has_statistics(hessian) {
        return Ok((
            magnitude_baseline(target, weight, cols)?,
            no_statistics_stats(),
        ));
    }
    // The baseline first, so that it and the result are never held together.
    let rtn_proxy_loss = {
        let baseline = magnitude_baseline(target, weight, cols)?;
        proxy_against(weight, &baseline, cols, hessian)
    };
    let norms = hessian.column_norms();
    let mut result = weight.to_vec();
    result.par_chunks_mut(cols).for_each(|row| {
        let scores: Vec<f64> = row
            .iter()
            .zip(&norms)
            .map(|(&w, &x)| f64::from(w.abs()) * x)
            .collect();
        let mut pruned = vec![false; cols];
        match target {
            SparsityTarget::Unstructured(_) => {
                prune_smallest(&scores, target.pruned_upto(cols), &mut pruned);
            }
            SparsityTarget::NOfM { n, m } => {
                for (s, p) in scores.chunks(m).zip(pruned.chunks_mut(m)) {
                    prune_smallest(s, m - n, p);
                }
            }
        }
        for (w, p) in row.iter_mut().zip(pruned) {
            if p {
                *w = 0.0;
            }
        }
    });
    let stats = MethodStats {
        proxy_loss: proxy_against(weight, &result, cols, hessian),
        rtn_proxy_loss,
        dead_columns: norms.iter().filter(|&&x| x == 0.0).count(),
    };
    Ok((result, stats))
}
