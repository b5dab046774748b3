//! SparseGPT (Frantar & Alistarh 2023): prune a Linear's weight column by column and update
//! the remaining weights through the inverse Hessian (the same sweep as GPTQ, see
//! [`super::obs`], with "set to 0" as the target of a pruned weight).
//!
//! Preparation as the reference: dead inputs get `H_jj = 1` and zero weights, damping
//! `dampening · mean(diag H)`, the upper Cholesky factor `U` of `H⁻¹` in f64. A weight's
//! pruning score is the reference's `w² / U_jj²` on its current (updated) value.
//!
//! Masks, per output row (the row-wise variant; the reference picks one threshold per block
//! over all rows, which gives rows unequal counts):
//! - [`SparsityTarget::Unstructured`]`(s)`: at the start of each block of columns
//!   `[i1, i2)`, each row prunes the `round(s·i2) - round(s·i1)` lowest-scoring weights of
//!   the block, so every row ends with exactly `round(s·cols)` zeros chosen block by block.
//!   The choice is local to a block, so tiny blocks constrain it (a block of one column
//!   forces an alternating pattern at 50%); the reference's 128 is the intended size.
//! - [`SparsityTarget::NOfM`]: when the first column of each run of `m` is reached, the
//!   `m - n` lowest-scoring weights of the run are pruned (blocks are whole runs).
//!
//! Ties are broken by position (the lower index is pruned first). Pruned weights are exactly
//! 0 in the result; kept ones carry the OBS updates. A kept weight's target is its current
//! value rounded to f32 (the result's type), so the sweep also spreads that rounding and the
//! loss it reports is exactly that of the f32 result.

use super::obs::{blocks, check_dampening, inverse_factor, sweep, ColumnRule};
use super::{
    check_weight, has_statistics, magnitude_baseline, no_statistics_stats, proxy_against,
    prune_smallest, CalibratedError, HessianInput, MethodStats, SparsityTarget,
};
use std::ops::Range;

/// Per-row state: which columns of the current block (or run) are pruned, and the row of
/// the result it writes when its sweep ends.
struct RowMask<'a> {
    out: &'a mut [f32],
    /// Indexed by column minus `start`.
    pruned: Vec<bool>,
    start: usize,
    scores: Vec<f64>,
}

/// The SparseGPT decision: pruned weights go to 0, the rest keep their current value.
struct SparseRule {
    target: SparsityTarget,
}

/// The value a kept weight takes: its current value on the f32 grid of the result.
fn kept(w: f64) -> f64 {
    f64::from(w as f32)
}

impl RowMask<'_> {
    /// Prunes the `k` lowest-scoring columns of `cols` (scores `w² / U_jj²`).
    fn select(&mut self, cols: Range<usize>, k: usize, w: &[f64], u_diag: &[f64]) {
        self.start = cols.start;
        self.scores.clear();
        self.scores
            .extend(cols.clone().map(|c| (w[c] / u_diag[c]).powi(2)));
        self.pruned.resize(cols.len(), false);
        prune_smallest(&self.scores, k, &mut self.pruned);
    }
}

impl ColumnRule<RowMask<'_>> for SparseRule {
    fn block_start(&self, st: &mut RowMask<'_>, block: Range<usize>, w: &[f64], u_diag: &[f64]) {
        if let SparsityTarget::Unstructured(_) = self.target {
            let k = self.target.pruned_upto(block.end) - self.target.pruned_upto(block.start);
            st.select(block, k, w, u_diag);
        }
    }

    fn target(&self, st: &mut RowMask<'_>, col: usize, w: &[f64]) -> f64 {
        if st.pruned[col - st.start] {
            0.0
        } else {
            kept(w[col])
        }
    }

    fn finish(&self, st: &mut RowMask<'_>, w: &[f64]) {
        finish_row(st, w);
    }
}

/// Writes a row's final values (every one already on the f32 grid) into its result row.
fn finish_row(st: &mut RowMask<'_>, w: &[f64]) {
    for (o, &v) in st.out.iter_mut().zip(w) {
        *o = v as f32;
    }
}

/// [`ColumnRule`] for N:M: the run's mask is chosen at its first column, which needs `U`'s
/// diagonal, so the rule carries it.
struct NmRule<'a> {
    n: usize,
    m: usize,
    u_diag: &'a [f64],
}

impl ColumnRule<RowMask<'_>> for NmRule<'_> {
    fn target(&self, st: &mut RowMask<'_>, col: usize, w: &[f64]) -> f64 {
        if col % self.m == 0 {
            st.select(col..col + self.m, self.m - self.n, w, self.u_diag);
        }
        if st.pruned[col - st.start] {
            0.0
        } else {
            kept(w[col])
        }
    }

    fn finish(&self, st: &mut RowMask<'_>, w: &[f64]) {
        finish_row(st, w);
    }
}

/// SparseGPT-pruned and updated `weight` (rows of `cols`, f32 row-major), with zeros
/// exactly where pruned; see the module doc for the masks.
///
/// A Hessian without statistics ([`super::has_statistics`]) gives magnitude pruning with
/// the same target (the data-free baseline), unchanged kept weights.
///
/// `hessian` as in [`super::gptq_codes`]: borrowed (its triangle copied to be factored) or
/// by value (factored in place). The baseline's proxy loss is computed before the factor,
/// the result's from the sweep (see the `obs` module).
///
/// Errors: shapes that disagree, a non-finite weight, a target out of range (or `cols` not
/// a multiple of N:M's `m`), `block_size == 0`, a negative or non-finite dampening, or a
/// Hessian that stays indefinite after the damping retries.
pub fn sparsegpt<'h>(
    target: SparsityTarget,
    dampening: f64,
    block_size: usize,
    weight: &[f32],
    cols: usize,
    hessian: impl Into<HessianInput<'h>>,
) -> Result<(Vec<f32>, MethodStats), CalibratedError> {
    let hessian = hessian.into();
    let rows = check_weight(weight, cols, hessian.get())?;
    target.check(cols)?;
    if block_size == 0 {
        return Err(CalibratedError::BadConfig(
            "block_size must be at least 1".into(),
        ));
    }
    check_dampening(dampening)?;
    if !has_statistics(hessian.get()) {
        return Ok((
            magnitude_baseline(target, weight, cols)?,
            no_statistics_stats(),
        ));
    }
    // The baseline's loss needs H: before the factor consumes it.
    let rtn_proxy_loss = {
        let baseline = magnitude_baseline(target, weight, cols)?;
        proxy_against(weight, &baseline, cols, hessian.get())
    };
    let factor = inverse_factor(hessian, dampening, false)?;
    let mut result = vec![0.0f32; weight.len()];
    let mut states: Vec<RowMask<'_>> = result
        .chunks_mut(cols)
        .map(|out| RowMask {
            out,
            pruned: Vec::new(),
            start: 0,
            scores: Vec::new(),
        })
        .collect();
    debug_assert_eq!(states.len(), rows);
    let proxy_loss = match target {
        SparsityTarget::Unstructured(_) => {
            let b = blocks(cols, block_size, 1);
            sweep(&SparseRule { target }, &mut states, weight, &factor, &b)
        }
        SparsityTarget::NOfM { n, m } => {
            // Whole runs per block.
            let b = blocks(cols, (block_size / m).max(1) * m, m);
            let u_diag: Vec<f64> = (0..cols).map(|i| factor.u.row(i)[0]).collect();
            let rule = NmRule {
                n,
                m,
                u_diag: &u_diag,
            };
            sweep(&rule, &mut states, weight, &factor, &b)
        }
    };
    drop(states);
    let stats = MethodStats {
        proxy_loss,
        rtn_proxy_loss,
        dead_columns: factor.dead.iter().filter(|&&d| d).count(),
    };
    Ok((result, stats))
}
