//! Whole-tensor statistics gathered chunk by chunk, so that passes which need a property of
//! the whole tensor (a per-tensor scale, a magnitude threshold, row or column norms, a
//! k-means codebook) still process it in bounded memory.
//!
//! A worker streams such a tensor twice. Pass 1 feeds every chunk of rows to a
//! [`StatsAccumulator`] for the plan's [`TensorPlan::pending_statistic`] and fixes the
//! result into the plan ([`StatsAccumulator::fix`]); a plan with both a structure and a
//! values statistic (row pruning, then per-tensor RTN) takes one such pass per statistic, the
//! values one over the weights the fixed structure keeps. Pass 2 encodes each chunk with the
//! statistics fixed ([`TensorPlan::for_chunk`] hands row flags their chunk's offset).
//!
//! Passes that need more than one statistic of the whole tensor (low-rank factors, per-tensor
//! HQQ, hashed buckets) are solved over one or more such passes by [`solver`] instead.
//!
//! What each statistic is, and how it compares with the whole-tensor path:
//! - [`TensorStatistic::Range`] (RTN, `granularity: tensor`): min and max (from 0, NaN
//!   ignored) are exact and associative, so codes and reconstruction are bit for bit those
//!   of the whole tensor.
//! - [`TensorStatistic::Absmax`] (NF4 and FP8 per tensor): the finite absmax, exact too.
//! - [`TensorStatistic::ValueHistogram`] (k-means): the codebook's histogram (count and the
//!   integer sum of the low 16 bits per top-16-bit key) is exact and order-free, so the
//!   levels, and hence the codes, are those of the whole tensor.
//! - [`TensorStatistic::RowScores`] / [`TensorStatistic::ColumnScores`] (row/column pruning):
//!   a row's norm lies in one chunk, so row flags are identical; column norms are summed
//!   in f64 chunk by chunk instead of in the whole-tensor blocking, which can only change
//!   the ranking of columns whose norms agree to ~1e-15 relative.
//! - [`TensorStatistic::MagnitudeHistogram`] (magnitude pruning per tensor): the tensor's
//!   histogram of `|w|` by BF16 magnitude ([`crate::prune::magnitude_histogram`]) gives a
//!   [`GlobalCut`] for the tensor alone, applied per chunk exactly as a global target's cut
//!   is: every weight below the cut's bin is dropped and, in each chunk, the rounded
//!   `tie_fraction` of the weights inside it (the smallest first). The count dropped thus
//!   differs from `round(sparsity * n)` by at most half a weight per chunk, and for F16/F32
//!   weights the ties inside the bin are the smallest per chunk, not over the tensor.
//!   The values stage after it sees each chunk's kept weights as one row (as the
//!   whole-tensor path sees the tensor's), so per-channel scales become per chunk. Both
//!   depend on where chunks end, so a magnitude-pruned tensor is always cut into the same
//!   blocks of whole rows ([`TensorPlan::fixed_chunk_rows`]), whatever the configured chunk
//!   size or memory limit: its output does not depend on them.

use std::sync::Arc;

use crate::codebook::{self, Histogram};
use crate::codec::{self, CodecError, TensorPlan};
use crate::dtype::{decode_to_f32, DType};
use crate::prune::{self, GlobalCut, Norm, MAGNITUDE_BINS};
use crate::quantize::{finite_absmax, min_max_par};
use crate::recipe::{PassKind, PruneConfig};

/// A statistic of a whole tensor that one stage of a plan needs before any of its chunks
/// can be encoded on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorStatistic {
    /// `|w|` histogram for a per-tensor magnitude prune.
    MagnitudeHistogram,
    /// One norm per row for row pruning.
    RowScores,
    /// One norm per column for column pruning.
    ColumnScores,
    /// Min and max for per-tensor RTN.
    Range,
    /// Finite absmax for per-tensor NF4 and FP8.
    Absmax,
    /// Value histogram for a k-means codebook.
    ValueHistogram,
}

impl TensorStatistic {
    /// True for the structure stage's statistics (gathered over every weight); the values
    /// stage's are gathered over the weights the structure keeps.
    pub fn is_structure(self) -> bool {
        matches!(
            self,
            TensorStatistic::MagnitudeHistogram
                | TensorStatistic::RowScores
                | TensorStatistic::ColumnScores
        )
    }
}

/// Statistics of the whole tensor that the values stage uses instead of its chunk's own.
#[derive(Debug, Clone, PartialEq)]
pub enum FixedValues {
    /// RTN `granularity: tensor`: the tensor's `(min, max)`, both from 0.
    Range { lo: f32, hi: f32 },
    /// NF4/FP8 per tensor: the tensor's finite absmax.
    Absmax(f32),
    /// k-means: the tensor's codebook (sorted levels).
    Codebook(Vec<f32>),
    /// Low-rank: the tensor's factors (rounded to its dtype); `first_row` is the tensor row
    /// the chunk being encoded starts at (set by [`TensorPlan::for_chunk`]).
    LowRank {
        factors: Arc<crate::lowrank::LowRank>,
        first_row: usize,
    },
    /// Per-tensor HQQ: the tensor's one group.
    HqqTensor(crate::hqq::streamed::TensorGroup),
    /// Hashed sharing: the tensor's buckets (rounded to its dtype); `first_row` as above.
    Hashed {
        weights: Arc<crate::hashnet::HashedWeights>,
        first_row: usize,
    },
    /// A calibrated method's result for the whole tensor (GPTQ's codes, SparseGPT's kept
    /// weights), computed by the calibration round; `first_row` as above.
    Solved {
        solved: Arc<crate::solved::Solved>,
        first_row: usize,
    },
}

/// The structure stage's decision for the whole tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum FixedStructure {
    /// Keep flags of every row; `first_row` is the tensor row the chunk being encoded
    /// starts at (set by [`TensorPlan::for_chunk`]).
    Rows {
        keep: Arc<Vec<bool>>,
        first_row: usize,
    },
    /// Keep flags of the columns.
    Columns { keep: Arc<Vec<bool>> },
}

/// What a statistic has gathered so far.
#[derive(Debug)]
enum Gathered {
    Magnitudes(Vec<u64>),
    Rows(Vec<f64>),
    Columns(Vec<f64>),
    Range(f32, f32),
    Absmax(f32),
    Values(Histogram),
}

/// Gathers one [`TensorStatistic`] over a tensor's chunks (pass 1), then fixes it into the
/// plan.
#[derive(Debug)]
pub struct StatsAccumulator {
    statistic: TensorStatistic,
    row_len: usize,
    gathered: Gathered,
}

impl StatsAccumulator {
    /// An empty accumulator for `statistic` over rows of `row_len` weights.
    pub fn new(statistic: TensorStatistic, row_len: usize) -> StatsAccumulator {
        let gathered = match statistic {
            TensorStatistic::MagnitudeHistogram => Gathered::Magnitudes(vec![0; MAGNITUDE_BINS]),
            TensorStatistic::RowScores => Gathered::Rows(Vec::new()),
            TensorStatistic::ColumnScores => Gathered::Columns(vec![0.0; row_len]),
            TensorStatistic::Range => Gathered::Range(0.0, 0.0),
            TensorStatistic::Absmax => Gathered::Absmax(0.0),
            TensorStatistic::ValueHistogram => Gathered::Values(codebook::histogram(&[])),
        };
        StatsAccumulator {
            statistic,
            row_len,
            gathered,
        }
    }

    /// The statistic being gathered.
    pub fn statistic(&self) -> TensorStatistic {
        self.statistic
    }

    /// Bytes the accumulator holds (row scores grow with the tensor's rows: 8 per row).
    pub fn held_bytes(&self) -> usize {
        match &self.gathered {
            Gathered::Magnitudes(h) => h.len() * 8,
            Gathered::Rows(s) | Gathered::Columns(s) => s.capacity() * 8,
            Gathered::Values(h) => h.len() * 16,
            Gathered::Range(..) | Gathered::Absmax(_) => 0,
        }
    }

    /// Adds a chunk of whole rows of `dtype` (as read) starting at tensor row `first_row`,
    /// under `plan` (whose structure statistic, if any, is already fixed when this is a
    /// values statistic). Rows holding NaN or infinities are left out under
    /// `non_finite: keep` (they are stored unchanged); otherwise encoding refuses them.
    pub fn feed(
        &mut self,
        plan: &TensorPlan,
        dtype: DType,
        first_row: usize,
        input: &[u8],
    ) -> Result<(), CodecError> {
        let row_len = self.row_len.max(1);
        let mut values = decode_rows(plan, dtype, row_len, input)?;
        let rows = values.len() / row_len;
        if !self.statistic.is_structure() {
            values = codec::structure_kept(&plan.for_chunk(first_row), &values, row_len, rows)?;
        }
        let norm = prune_norm(plan);
        let stage_err = |e: prune::PruneError| CodecError::Pass {
            pass: "prune",
            message: e.to_string(),
        };
        match &mut self.gathered {
            Gathered::Magnitudes(h) => {
                for (total, count) in h.iter_mut().zip(prune::magnitude_histogram(&values)) {
                    *total += count;
                }
            }
            Gathered::Rows(scores) => {
                scores.extend(prune::row_scores(&values, row_len, norm).map_err(stage_err)?)
            }
            Gathered::Columns(scores) => {
                let chunk = prune::col_scores(&values, row_len, norm).map_err(stage_err)?;
                for (total, s) in scores.iter_mut().zip(chunk) {
                    *total += s;
                }
            }
            Gathered::Range(lo, hi) => {
                let (l, h) = min_max_par(&values);
                *lo = lo.min(l);
                *hi = hi.max(h);
            }
            Gathered::Absmax(m) => *m = m.max(finite_absmax(&values)),
            Gathered::Values(h) => codebook::merge_histogram(h, &codebook::histogram(&values)),
        }
        Ok(())
    }

    /// Fixes the gathered statistic into `plan`, after which [`TensorPlan::pending_statistic`]
    /// moves on to the next one (or `None`).
    pub fn fix(self, plan: &mut TensorPlan) -> Result<(), CodecError> {
        let structure = plan.structure;
        let fraction = match structure {
            Some(PruneConfig::Rows { fraction, .. } | PruneConfig::Columns { fraction, .. }) => {
                fraction
            }
            _ => 0.0,
        };
        match self.gathered {
            Gathered::Magnitudes(h) => {
                let Some(PruneConfig::Magnitude { sparsity, .. }) = structure else {
                    return Err(mismatch(self.statistic, plan));
                };
                // An empty tensor has no cut; it drops nothing.
                plan.global_cut = Some(GlobalCut::from_histogram(&h, sparsity).unwrap_or(
                    GlobalCut {
                        bin: 0,
                        tie_fraction: 0.0,
                    },
                ));
            }
            Gathered::Rows(scores) => {
                plan.fixed_structure = Some(FixedStructure::Rows {
                    keep: Arc::new(prune::keep_by_score(&scores, fraction)),
                    first_row: 0,
                })
            }
            Gathered::Columns(scores) => {
                plan.fixed_structure = Some(FixedStructure::Columns {
                    keep: Arc::new(prune::keep_by_score(&scores, fraction)),
                })
            }
            Gathered::Range(lo, hi) => plan.fixed_values = Some(FixedValues::Range { lo, hi }),
            Gathered::Absmax(m) => plan.fixed_values = Some(FixedValues::Absmax(m)),
            Gathered::Values(h) => {
                let Some(PassKind::Kmeans { bits, iterations }) = plan.values else {
                    return Err(mismatch(self.statistic, plan));
                };
                let levels = codebook::kmeans_levels(bits, &h, iterations).map_err(|e| {
                    CodecError::Pass {
                        pass: "codebook",
                        message: e.to_string(),
                    }
                })?;
                plan.fixed_values = Some(FixedValues::Codebook(levels));
            }
        }
        Ok(())
    }
}

/// The norm of the plan's row/column prune (L2 for any other plan: unused there).
fn prune_norm(plan: &TensorPlan) -> Norm {
    match plan.structure {
        Some(PruneConfig::Rows { norm, .. } | PruneConfig::Columns { norm, .. }) => norm,
        _ => Norm::L2,
    }
}

fn mismatch(statistic: TensorStatistic, plan: &TensorPlan) -> CodecError {
    CodecError::Pass {
        pass: "stream",
        message: format!(
            "statistic {statistic:?} does not belong to plan {}",
            plan.describe()
        ),
    }
}

/// A chunk of whole rows decoded to f32 (rows with a non-finite weight dropped where the
/// plan keeps them unchanged); a chunk that is not whole rows is refused.
fn decode_rows(
    plan: &TensorPlan,
    dtype: DType,
    row_len: usize,
    input: &[u8],
) -> Result<Vec<f32>, CodecError> {
    let mut values = vec![0f32; input.len() / dtype.size_bytes().max(1)];
    decode_to_f32(dtype, input, &mut values)?;
    if values.len() % row_len != 0 {
        return Err(CodecError::RaggedInput {
            len: input.len(),
            row_len,
            elem_size: dtype.size_bytes(),
        });
    }
    if plan.keep_non_finite_rows {
        values = finite_rows(values, row_len);
    }
    Ok(values)
}

/// The rows of `values` whose weights are all finite.
fn finite_rows(values: Vec<f32>, row_len: usize) -> Vec<f32> {
    if values.iter().all(|v| v.is_finite()) {
        return values;
    }
    values
        .chunks_exact(row_len)
        .filter(|row| row.iter().all(|v| v.is_finite()))
        .flatten()
        .copied()
        .collect()
}

pub mod solver;

#[cfg(test)]
mod tests;
