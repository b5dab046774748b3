//! Calibrated compression: methods that use the inputs a Linear layer sees, through the
//! (normalised) Hessian of its layer-wise squared error, `H = 2/N · Σ x xᵀ` over the `N`
//! calibration input rows `x` (length `in_features`).
//!
//! The distributed pipeline accumulates partial Hessians per Linear input on the workers
//! ([`HessianAccumulator::add_rows`]), ships them as bytes ([`HessianAccumulator::to_bytes`]),
//! sums them in a fixed order ([`HessianAccumulator::merge`]) and then runs one method per
//! Linear on the original weight (f32, `[rows = out_features, cols = in_features]` row-major):
//! - [`gptq_codes`]: GPTQ (Frantar et al. 2022) with lazy block updates, group / channel,
//!   symmetric / asymmetric, act-order with static groups; output in RTN's exact format.
//! - [`awq_codes`]: an activation-aware search of each group's quantization range.
//! - [`sparsegpt`]: SparseGPT pruning (unstructured per row, or N:M) with OBS updates.
//! - [`wanda`]: Wanda pruning, score `|W_ij| · ‖X_j‖₂`, per output row.
//!
//! Every method reports [`MethodStats`]: the proxy loss `tr(ΔW H ΔWᵀ)` of its result and of
//! the data-free baseline (RTN codes for quantizers, magnitude pruning with the same target
//! for sparsifiers), both against the undamped Hessian, so a caller can check the method paid
//! off.
//!
//! **No statistics.** A Linear whose Hessian carries no information — no calibration row
//! reached it (an expert of a mixture-of-experts layer no calibration token was routed to)
//! or every input it saw was zero — gets its method's data-free equivalent instead of an
//! error: RTN codes for GPTQ (GPTQ with `H = I` gives exactly those) and AWQ, magnitude
//! pruning with the same target for SparseGPT and Wanda ([`has_statistics`]). Its stats are
//! then zero losses and no dead columns. Results are deterministic: rows are processed in strips of a fixed size in parallel,
//! and every reduction runs in a fixed order, so the bits do not depend on rayon's thread
//! count. (Matrix products run in matrixmultiply's kernels, which it picks per CPU at run
//! time: an FMA and a non-FMA machine may differ in the last bits.)
//!
//! Memory: the factorisations run in f64 on full `cols × cols` matrices: a 28672-wide
//! Hessian (a large down_proj) is 6.5 GB in f64, and GPTQ/SparseGPT hold about three such
//! matrices at their peak (the Hessian, the factor, the inverse factor). A blocked,
//! out-of-core variant is left for later; the accumulator itself keeps only the upper
//! triangle (3.3 GB for that width).
//!
//! Layout: [`hessian`] (the accumulator and its bytes), [`linalg`] (Cholesky, the inverse
//! factor, checked dgemm, the proxy loss), [`obs`] (the column sweep with lazy block updates
//! shared by GPTQ and SparseGPT), then one module per method.

mod awq;
mod gptq;
mod hessian;
mod linalg;
mod obs;
mod sparsegpt;
mod wanda;

use rayon::prelude::*;

pub use awq::awq_codes;
pub use gptq::{gptq_codes, GptqConfig};
pub use hessian::HessianAccumulator;
pub use sparsegpt::sparsegpt;
pub use wanda::wanda;

/// Why a calibrated method (or the accumulator) refused its input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalibratedError {
    /// The weight, its column count and the Hessian's dimension do not agree.
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// The damped Hessian could not be factorised even after raising the damping.
    #[error("Hessian not positive definite: {0}")]
    NotPositiveDefinite(String),
    /// Serialized accumulator bytes are malformed.
    #[error("bad Hessian bytes: {0}")]
    BadBytes(String),
    /// A configuration value (bits, damping, block size, sparsity target) is out of range.
    #[error("bad configuration: {0}")]
    BadConfig(String),
    /// A weight or activation is NaN or infinite.
    #[error("non-finite input: {0}")]
    NonFinite(String),
}

/// What a calibrated method achieved, on the proxy objective `tr(ΔW H ΔWᵀ)` (`ΔW` = result
/// minus original weight, `H` the undamped normalised Hessian of [`HessianAccumulator::hessian`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MethodStats {
    /// The proxy loss of the method's result.
    pub proxy_loss: f64,
    /// The same for the data-free baseline: RTN codes with the same config for quantizers,
    /// magnitude pruning with the same target (per row, or N:M) for sparsifiers.
    pub rtn_proxy_loss: f64,
    /// Inputs that were always zero in calibration (`H_jj == 0`): their weights are set to 0.
    pub dead_columns: usize,
}

/// How much of each row a sparsifier removes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SparsityTarget {
    /// Exactly `round(fraction · cols)` weights of *every row* are zeroed (the row-wise
    /// variant of Wanda and SparseGPT); `fraction` in `[0, 1]`.
    Unstructured(f64),
    /// In every run of `m` consecutive inputs of a row, `n` weights are kept and `m - n`
    /// zeroed (2:4 keeps 2 of 4); `cols` must be a multiple of `m`.
    NOfM { n: usize, m: usize },
}

impl SparsityTarget {
    /// Checks the target against rows of `cols` inputs.
    pub(crate) fn check(self, cols: usize) -> Result<(), CalibratedError> {
        match self {
            SparsityTarget::Unstructured(f) if (0.0..=1.0).contains(&f) => Ok(()),
            SparsityTarget::Unstructured(f) => Err(CalibratedError::BadConfig(format!(
                "unstructured sparsity {f} is outside [0, 1]"
            ))),
            SparsityTarget::NOfM { n, m } if m == 0 || n > m => Err(CalibratedError::BadConfig(
                format!("{n}:{m} sparsity needs 0 < m and n <= m"),
            )),
            SparsityTarget::NOfM { m, .. } if cols % m != 0 => Err(CalibratedError::ShapeMismatch(
                format!("{cols} input columns are not a multiple of the N:M run length {m}"),
            )),
            SparsityTarget::NOfM { .. } => Ok(()),
        }
    }

    /// Weights pruned among the first `upto` inputs of a row (a prefix ending on a run
    /// boundary for N:M): differences of this give each block's exact share.
    pub(crate) fn pruned_upto(self, upto: usize) -> usize {
        match self {
            SparsityTarget::Unstructured(f) => (f * upto as f64).round() as usize,
            SparsityTarget::NOfM { n, m } => upto / m * (m - n),
        }
    }
}

/// Checks a weight of `weight.len()` values in rows of `cols` against a Hessian of
/// dimension `dim`, and that every weight is finite; returns the number of rows. (A Hessian
/// of no rows passes: see [`has_statistics`].)
pub(crate) fn check_weight(
    weight: &[f32],
    cols: usize,
    hessian: &HessianAccumulator,
) -> Result<usize, CalibratedError> {
    if cols == 0 || weight.len() % cols != 0 {
        return Err(CalibratedError::ShapeMismatch(format!(
            "{} weights do not form whole rows of {cols} columns",
            weight.len()
        )));
    }
    if hessian.dim() != cols {
        return Err(CalibratedError::ShapeMismatch(format!(
            "the Hessian is {0}x{0} but the weight has {cols} input columns",
            hessian.dim()
        )));
    }
    if let Some(i) = weight.iter().position(|w| !w.is_finite()) {
        return Err(CalibratedError::NonFinite(format!(
            "weight at row {} column {} is {}",
            i / cols,
            i % cols,
            weight[i]
        )));
    }
    Ok(weight.len() / cols)
}

/// Whether `hessian` carries calibration statistics: some rows were seen and some input was
/// not always zero. Without them the methods return their data-free equivalents (see the
/// module doc).
pub fn has_statistics(hessian: &HessianAccumulator) -> bool {
    hessian.rows_seen() > 0 && hessian.raw_diagonal().iter().any(|&d| d > 0.0)
}

/// The stats of a data-free fallback: `H = 0`, so both proxy losses are 0; no column is
/// treated as dead (its weights are kept).
pub(crate) fn no_statistics_stats() -> MethodStats {
    MethodStats {
        proxy_loss: 0.0,
        rtn_proxy_loss: 0.0,
        dead_columns: 0,
    }
}

/// The proxy loss `tr(ΔW H ΔWᵀ)` of `result` against `weight` (both rows of `n`).
pub(crate) fn proxy_against(weight: &[f32], result: &[f32], n: usize, h: &[f64]) -> f64 {
    let delta: Vec<f64> = weight
        .par_iter()
        .zip(result)
        .map(|(&w, &r)| f64::from(r) - f64::from(w))
        .collect();
    linalg::proxy_loss(&delta, h, n)
}

/// The magnitude-pruning baseline of a sparsifier: per row, the same exact count for
/// [`SparsityTarget::Unstructured`] ([`crate::prune::magnitude_mask`] of each row), or
/// [`crate::prune::nm_mask`]; pruned weights become 0. `target` must have been checked.
pub(crate) fn magnitude_baseline(
    target: SparsityTarget,
    weight: &[f32],
    cols: usize,
) -> Result<Vec<f32>, CalibratedError> {
    let keep: Vec<bool> = match target {
        SparsityTarget::Unstructured(f) => weight
            .par_chunks(cols)
            .flat_map_iter(|row| crate::prune::magnitude_mask(row, f))
            .collect(),
        SparsityTarget::NOfM { n, m } => crate::prune::nm_mask(weight, cols, n, m)
            .map_err(|e| CalibratedError::BadConfig(e.to_string()))?,
    };
    Ok(weight
        .iter()
        .zip(keep)
        .map(|(&w, k)| if k { w } else { 0.0 })
        .collect())
}

/// Marks in `pruned` (same length as `scores`) the `k` smallest scores, ties broken by
/// position (the lower index is pruned first), NaN counted as the largest.
pub(crate) fn prune_smallest(scores: &[f64], k: usize, pruned: &mut [bool]) {
    pruned.fill(false);
    let k = k.min(scores.len());
    if k == 0 {
        return;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    let key = |i: usize| (scores[i].is_nan(), scores[i]);
    let by_key = |a: &usize, b: &usize| {
        let (ka, kb) = (key(*a), key(*b));
        ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1)).then(a.cmp(b))
    };
    if k < scores.len() {
        order.select_nth_unstable_by(k - 1, by_key);
    }
    for &i in &order[..k] {
        pruned[i] = true;
    }
}

#[cfg(test)]
mod tests;
