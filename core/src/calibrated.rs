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
//! **Memory.** A SOLVE of an `n`-wide Linear holds no `n × n` matrix, only the
//! accumulator's packed triangle (`n(n+1)/2` f64, 3.3 GB at n = 28672): GPTQ and SparseGPT
//! take the accumulator by value ([`HessianInput`]) and normalise, permute, damp, factor,
//! invert and reverse that very buffer in place into the inverse factor `U`
//! (`linalg`). So `H` is gone once the sweep runs: the baseline's proxy loss is computed
//! from the triangle before the factor, and the method's own from the sweep's scaled errors
//! (`tr(ΔW (H + λI) ΔWᵀ) = Σ e²`, minus the damping's share; see `obs`). A borrowed
//! accumulator (`&HessianAccumulator`, also accepted) costs one copy of the triangle more.
//! AWQ and Wanda read the triangle directly. The weight-shaped buffers are the caller's f32
//! weight, the result (codes and group parameters, or f32 values) and, never at the same
//! time as a finished result, the baseline's f32 values; the sweep's f64 working rows exist
//! one strip of 32 rows per task. Besides that: `O(n · 64)` scratch and `O(n · 32)` per
//! worker thread. [`solve_memory_bytes`] bounds the total (6.5 GB for 28672 × 8192 on 16
//! threads, where the previous layout with one `n × n` factor needed 16.5 GB). The sum
//! itself is built without a second triangle: each batch's serialized accumulator is added
//! in pieces of [`SERIALIZED_PIECE_BYTES`] ([`HessianAccumulator::add_serialized_values`]).
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
pub use gptq::{gptq_codes, gptq_codes_with, GptqConfig, GptqFactor};
pub use hessian::{HessianAccumulator, SerializedHessian, SERIALIZED_PIECE_BYTES};
pub use sparsegpt::sparsegpt;
pub use wanda::wanda;

/// Bytes per element of a `rows × n` weight that a SOLVE may hold at once, counted
/// generously: the caller's f32 weight (4), then either a baseline's decoded f32 values
/// with its codes or mask (5) or the method's result (f32 values, 4; or codes, 1), group
/// scales and zeros (≤ 2 for groups of ≥ 4 columns; act-order's static kernels ≤ 1.2 for
/// groups of ≥ 32), rounded up.
const WEIGHT_BYTES_PER_ELEMENT: u64 = 12;
/// Per column: three `n × 64` f64 panels (the Cholesky's, the inverse's, the proxy loss's)
/// at 512 bytes each, the sweep layout's padding of the factor (`64` f64 per column), and
/// per-column vectors (the diagonal, the permutation and its bookkeeping, dead flags, `U`'s
/// diagonal: ≤ 96 bytes).
const SCRATCH_BYTES_PER_COLUMN: u64 = 3 * 64 * 8 + 64 * 8 + 96;
/// Per output row: the sweep's per-row state (a row's slices, its group's kernel and values,
/// SparseGPT's block scores and mask for blocks of up to 128 columns).
const ROW_STATE_BYTES: u64 = 2048;
/// Per worker thread: a strip of rows of `n` f64 values twice (the proxy loss's `Δ`, the
/// sweep's errors) is `2 · 32 · 8` bytes per column, plus matrixmultiply's packing buffers
/// (at most `(64 + 1024) · 256` f64 per product) and small per-task vectors.
const THREAD_BYTES_PER_COLUMN: u64 = 2 * 32 * 8;
/// See [`THREAD_BYTES_PER_COLUMN`]: the fixed part per thread.
const THREAD_FIXED_BYTES: u64 = (64 + 1024) * 256 * 8 + (1 << 20);

/// An upper bound on the heap bytes a SOLVE step holds at its peak for an `n`-wide Linear
/// (`in_features = n`) with `rows` output rows, for every method here ([`gptq_codes`] with
/// or without act-order, [`sparsegpt`], [`awq_codes`], [`wanda`]), *including* its inputs:
/// the accumulator's packed triangle and the f32 weight. GPTQ and SparseGPT must get the
/// accumulator by value (a borrowed one adds a copy of the triangle, `4n(n+1)` bytes). It is
/// the sum of
/// - the packed triangle (`4n(n+1)`), which becomes the inverse factor in place;
/// - 12 bytes per weight element (the f32 weight, the result, the data-free baseline before
///   or after it, group parameters, masks);
/// - `O(n)` scratch: three `n × 64` f64 panels, the factor layout's `64` f64 of padding per
///   column and 96 bytes per column of per-column vectors;
/// - 2 KiB per row for the sweep's per-row states;
/// - per thread of rayon's current pool ([`rayon::current_num_threads`], the pool the
///   methods run in): `512 n` bytes of strip scratch and 3 MiB for matrixmultiply's packing.
///
/// For 28672 × 8192 that is 6.5 GB on 16 threads, 6.2 GB on 2 (3.3 GB triangle, 2.8 GB
/// weight-shaped; the previous layout with an `n × n` factor needed 16.5 GB).
/// Measured peaks: core/tests/solve_memory.rs. Not counted: allocator fragmentation.
/// Saturates at `u64::MAX` instead of overflowing.
pub fn solve_memory_bytes(n: usize, rows: usize) -> u64 {
    let (n, rows) = (n as u64, rows as u64);
    let threads = rayon::current_num_threads() as u64;
    let triangle = n.saturating_mul(n.saturating_add(1)).saturating_mul(4);
    let weights = rows
        .saturating_mul(n)
        .saturating_mul(WEIGHT_BYTES_PER_ELEMENT);
    let scratch = n.saturating_mul(SCRATCH_BYTES_PER_COLUMN);
    let per_row = rows.saturating_mul(ROW_STATE_BYTES);
    let per_thread = n
        .saturating_mul(THREAD_BYTES_PER_COLUMN)
        .saturating_add(THREAD_FIXED_BYTES)
        .saturating_mul(threads);
    [weights, scratch, per_row, per_thread]
        .iter()
        .fold(triangle, |total, &part| total.saturating_add(part))
}

/// The Hessian a method reads: borrowed (the caller keeps it; GPTQ and SparseGPT then copy
/// its packed triangle to factor it) or owned (consumed: they factor the triangle in place,
/// which is what keeps a SOLVE within [`solve_memory_bytes`]). Both `&HessianAccumulator`
/// and `HessianAccumulator` convert into it, so either can be passed to [`gptq_codes`],
/// [`sparsegpt`] and [`GptqFactor::new`]; the results are the same bits either way.
#[derive(Debug)]
pub enum HessianInput<'a> {
    /// The caller keeps the accumulator.
    Borrowed(&'a HessianAccumulator),
    /// The method uses the accumulator up.
    Owned(HessianAccumulator),
}

impl HessianInput<'_> {
    /// The accumulator.
    pub fn get(&self) -> &HessianAccumulator {
        match self {
            HessianInput::Borrowed(h) => h,
            HessianInput::Owned(h) => h,
        }
    }

    /// The packed upper triangle to factor: the accumulator's own, or a copy of a borrowed one.
    pub(crate) fn into_packed_upper(self) -> Vec<f64> {
        match self {
            HessianInput::Borrowed(h) => h.packed_upper().to_vec(),
            HessianInput::Owned(h) => h.into_packed_upper(),
        }
    }
}

impl<'a> From<&'a HessianAccumulator> for HessianInput<'a> {
    fn from(h: &'a HessianAccumulator) -> Self {
        HessianInput::Borrowed(h)
    }
}

impl From<HessianAccumulator> for HessianInput<'_> {
    fn from(h: HessianAccumulator) -> Self {
        HessianInput::Owned(h)
    }
}

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
    check_weight_dim(weight, cols, hessian.dim())
}

/// [`check_weight`] against a Hessian of dimension `dim`.
pub(crate) fn check_weight_dim(
    weight: &[f32],
    cols: usize,
    dim: usize,
) -> Result<usize, CalibratedError> {
    if cols == 0 || weight.len() % cols != 0 {
        return Err(CalibratedError::ShapeMismatch(format!(
            "{} weights do not form whole rows of {cols} columns",
            weight.len()
        )));
    }
    if dim != cols {
        return Err(CalibratedError::ShapeMismatch(format!(
            "the Hessian is {dim}x{dim} but the weight has {cols} input columns"
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

/// The proxy loss `tr(ΔW H ΔWᵀ)` of `result` against `weight` (both rows of `n`), with the
/// normalised `H` of `hessian`, read from its packed triangle (no `n × n` copy).
pub(crate) fn proxy_against(
    weight: &[f32],
    result: &[f32],
    n: usize,
    hessian: &HessianAccumulator,
) -> f64 {
    linalg::proxy_loss(
        weight,
        result,
        n,
        hessian.packed_upper(),
        hessian.normalisation(),
    )
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
