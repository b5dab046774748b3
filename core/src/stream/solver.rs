//! Passes whose result depends on the whole tensor in a way one statistic cannot capture
//! (low-rank factors, a tensor-wide HQQ group, hashed buckets), solved over one or more
//! streamed passes over the tensor's chunks before it is encoded chunk by chunk, so a
//! worker holds their state (factors, one zero point, buckets) but never the tensor.
//!
//! [`TensorSolver::for_plan`] says whether a plan needs one; the worker then reads the
//! tensor while [`TensorSolver::needs_pass`]: [`TensorSolver::feed`] every chunk of whole
//! rows in order, then [`TensorSolver::end_pass`]; finally [`TensorSolver::fix`] stores the
//! result in the plan ([`FixedValues::LowRank`], [`FixedValues::HqqTensor`],
//! [`FixedValues::Hashed`]), which then encodes any chunk on its own.
//!
//! Each solver groups what it is fed into fixed blocks counted from the tensor's first weight
//! or row, so the result does not depend on the chunk size: the low-rank factors and the
//! hashed buckets are a function of the tensor alone, and the HQQ group is bit for bit the
//! one the whole-tensor path computes.

use std::sync::Arc;

use super::FixedValues;
use crate::codec::{self, CodecError, TensorPlan};
use crate::dtype::{decode_to_f32, encode_from_f32, DType};
use crate::hashnet::BucketSums;
use crate::hqq::streamed::StreamedHqq;
use crate::lowrank::streamed::StreamedLowRank;
use crate::recipe::{Granularity, PassKind, RankRule};

/// The seed of the low-rank sketch and the hashed buckets (the codec's).
const SEED: u64 = codec::PASS_SEED;

/// A whole-tensor pass being solved over streamed passes.
#[derive(Debug)]
pub enum TensorSolver {
    LowRank(Box<StreamedLowRank>),
    Hqq(Box<StreamedHqq>),
    /// The sums, and whether their one pass is over.
    Hashed {
        sums: BucketSums,
        done: bool,
    },
}

/// `(rows, row_len, elements)` of a tensor of `shape` as the codec sees it.
fn dims(shape: &[u64]) -> (usize, usize, usize) {
    let row_len = crate::quantize::row_len_of(shape).max(1) as usize;
    let elements = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .unwrap_or(u64::MAX) as usize;
    (elements / row_len, row_len, elements)
}

/// The buckets a hashed pass of `fraction` uses for `elements` weights (as the codec does).
pub fn hashed_buckets(elements: usize, fraction: f64) -> usize {
    ((elements as f64 * fraction).ceil() as usize).max(1)
}

impl TensorSolver {
    /// The solver `plan` needs before its chunks can be encoded (its structure statistic, if
    /// any, already fixed), or `None` when it needs none or it is already solved.
    pub fn for_plan(plan: &TensorPlan, shape: &[u64]) -> Result<Option<TensorSolver>, CodecError> {
        if plan.fixed_values.is_some()
            || plan.whole_tensor_pass().is_some()
            || plan.pending_statistic().is_some()
        {
            return Ok(None);
        }
        let (rows, row_len, elements) = dims(shape);
        let pass_err = |pass: &'static str| move |e: String| CodecError::Pass { pass, message: e };
        Ok(match &plan.values {
            Some(PassKind::LowRank { rule, power_iters }) => {
                let rule = match *rule {
                    RankRule::Rank(r) => crate::lowrank::RankRule::Rank(r),
                    RankRule::Energy(e) => crate::lowrank::RankRule::Energy(e),
                    RankRule::StorageFraction(f) => crate::lowrank::RankRule::StorageFraction(f),
                };
                let lr = StreamedLowRank::new(rows, row_len, rule, *power_iters, SEED)
                    .map_err(|e| pass_err("lowrank")(e.to_string()))?;
                Some(TensorSolver::LowRank(Box::new(lr)))
            }
            Some(PassKind::Hqq(cfg)) if cfg.granularity == Granularity::Tensor => {
                let solver =
                    StreamedHqq::new(*cfg).map_err(|e| pass_err("quantize")(e.to_string()))?;
                Some(TensorSolver::Hqq(Box::new(solver)))
            }
            Some(PassKind::Hashed { fraction }) => {
                let sums = BucketSums::new(hashed_buckets(elements, *fraction), SEED)
                    .map_err(|e| pass_err("hashed")(e.to_string()))?;
                Some(TensorSolver::Hashed { sums, done: false })
            }
            _ => None,
        })
    }

    /// True while another pass over the tensor is needed.
    pub fn needs_pass(&self) -> bool {
        match self {
            TensorSolver::LowRank(lr) => lr.needs_pass(),
            TensorSolver::Hqq(solver) => solver.needs_pass(),
            TensorSolver::Hashed { done, .. } => !done,
        }
    }

    /// Adds a chunk of whole rows of `dtype` (as read) starting at tensor row `first_row`;
    /// chunks come in order. Under `non_finite: keep` rows holding NaN or infinities are
    /// left out (they are stored unchanged); otherwise the solver refuses them.
    pub fn feed(
        &mut self,
        plan: &TensorPlan,
        dtype: DType,
        first_row: usize,
        row_len: usize,
        input: &[u8],
    ) -> Result<(), CodecError> {
        let row_len = row_len.max(1);
        let values = super::decode_rows(plan, dtype, row_len, input)?;
        match self {
            TensorSolver::LowRank(lr) => lr
                .feed(&values)
                .map_err(|e| pass_error("lowrank", e.to_string())),
            TensorSolver::Hqq(solver) => {
                let rows = values.len() / row_len;
                let kept =
                    codec::structure_kept(&plan.for_chunk(first_row), &values, row_len, rows)?;
                if let Some(i) = kept.iter().position(|v| !v.is_finite()) {
                    return Err(pass_error(
                        "quantize",
                        format!("value {} of rows from {first_row} is not finite", kept[i]),
                    ));
                }
                solver.feed(&kept);
                Ok(())
            }
            TensorSolver::Hashed { sums, .. } => sums
                .feed(&values)
                .map_err(|e| pass_error("hashed", e.to_string())),
        }
    }

    /// Ends a pass over the tensor.
    pub fn end_pass(&mut self) -> Result<(), CodecError> {
        match self {
            TensorSolver::LowRank(lr) => lr
                .end_pass()
                .map_err(|e| pass_error("lowrank", e.to_string())),
            TensorSolver::Hqq(solver) => {
                solver.end_pass();
                Ok(())
            }
            TensorSolver::Hashed { done, .. } => {
                *done = true;
                Ok(())
            }
        }
    }

    /// Stores the result in `plan`, rounded to `dtype` where it is stored in it (factors,
    /// buckets), so that every chunk reconstructs from exactly what is written.
    pub fn fix(self, plan: &mut TensorPlan, dtype: DType) -> Result<(), CodecError> {
        let unfinished =
            || pass_error("stream", "the solver was fixed before its last pass".into());
        let fixed = match self {
            TensorSolver::LowRank(lr) => {
                let mut factors = lr.into_factors().ok_or_else(unfinished)?;
                round_in_place(dtype, &mut factors.left)?;
                round_in_place(dtype, &mut factors.right)?;
                FixedValues::LowRank {
                    factors: Arc::new(factors),
                    first_row: 0,
                }
            }
            TensorSolver::Hqq(solver) => {
                FixedValues::HqqTensor(solver.result().ok_or_else(unfinished)?)
            }
            TensorSolver::Hashed { sums, done } => {
                if !done {
                    return Err(unfinished());
                }
                let mut weights = sums.finish();
                round_in_place(dtype, &mut weights.buckets)?;
                FixedValues::Hashed {
                    weights: Arc::new(weights),
                    first_row: 0,
                }
            }
        };
        plan.fixed_values = Some(fixed);
        Ok(())
    }
}

/// The most bytes the solver for `plan` on a tensor of `shape` holds at once (its state
/// and its result), 0 for a plan that needs none.
pub fn solver_bytes(plan: &TensorPlan, shape: &[u64]) -> u64 {
    let (rows, row_len, elements) = dims(shape);
    match &plan.values {
        Some(PassKind::LowRank { rule, .. }) => {
            let rule = match *rule {
                RankRule::Rank(r) => crate::lowrank::RankRule::Rank(r),
                RankRule::Energy(e) => crate::lowrank::RankRule::Energy(e),
                RankRule::StorageFraction(f) => crate::lowrank::RankRule::StorageFraction(f),
            };
            let width = StreamedLowRank::max_width(rows, row_len, rule);
            StreamedLowRank::held_bytes(rows, row_len, width)
        }
        // The sums (16 bytes a bucket), then the buckets in f32 and their rounding.
        Some(PassKind::Hashed { fraction }) => {
            let buckets = hashed_buckets(elements, *fraction) as u64;
            BucketSums::held_bytes(buckets as usize) + buckets * 8
        }
        _ => 0,
    }
}

fn pass_error(pass: &'static str, message: String) -> CodecError {
    CodecError::Pass { pass, message }
}

/// Rounds `values` to `dtype` in place (what storing them in it keeps).
fn round_in_place(dtype: DType, values: &mut [f32]) -> Result<(), CodecError> {
    let mut bytes = vec![0u8; values.len() * dtype.size_bytes()];
    encode_from_f32(dtype, values, &mut bytes)?;
    decode_to_f32(dtype, &bytes, values)?;
    Ok(())
}
