//! Pass 1 of a streamed tensor: the whole-tensor statistics its plan needs (a per-tensor
//! scale, a magnitude cut, row or column norms, a k-means codebook), gathered chunk by
//! chunk by [`shardpress_core::stream::StatsAccumulator`], and the passes solved over
//! several reads (low-rank factors, a per-tensor HQQ group, hashed buckets) by
//! [`shardpress_core::stream::solver::TensorSolver`], fixed into the plan before pass 2
//! re-reads the chunks and encodes each one; and the near-duplicate check's cosine,
//! streamed over both tensors' chunks side by side. Either way at most a few chunks are in
//! memory, never a whole tensor.

use std::time::Instant;

use shardpress_core::codec::TensorPlan;
use shardpress_core::dtype::decode_to_f32;
use shardpress_core::plan::PlannedTensor;
use shardpress_core::quantize::row_len_of;
use shardpress_core::similarity::CosineAccumulator;
use shardpress_core::stream::solver::TensorSolver;
use shardpress_core::stream::StatsAccumulator;
use shardpress_store::StoreLocation;

use super::{chunk_ranges, next_chunk, read_ahead, Chunk, TaskContext, Timings};
use crate::{cpu, TaskError};

/// Fixes the plan's whole-tensor statistics (pass 1) and returns it with the chunk size
/// pass 2 reads, refusing a tensor that cannot fit under the worker's memory budget: a pass
/// that needs the whole tensor at once, or a single row too large.
pub(super) async fn prepare_plan(
    model: &StoreLocation,
    tensor: &PlannedTensor,
    mut plan: TensorPlan,
    ctx: &TaskContext,
    timings: &mut Timings,
) -> Result<(TensorPlan, usize), TaskError> {
    if let Some(pass) = plan.whole_tensor_pass() {
        ctx.budget.check_whole_tensor(tensor, &pass)?;
        return Ok((plan, usize::MAX));
    }
    let row_len = row_len_of(&tensor.shape).max(1);
    let chunk_row_len = if plan.is_identity() { 1 } else { row_len };
    let row_bytes = tensor.stored_row_bytes(chunk_row_len);
    ctx.budget
        .check_chunk(tensor, row_bytes, ctx.chunk_bytes as u64)?;
    // A magnitude prune's chunks are fixed blocks (in both passes: what a values statistic
    // sees after it depends on them), so its output is the same for any chunk size and limit.
    let fixed_chunk = plan.fixed_chunk_rows(row_len).map(|rows| {
        usize::try_from(rows.saturating_mul(tensor.stored_row_bytes(row_len))).unwrap_or(usize::MAX)
    });
    if let Some(bytes) = fixed_chunk {
        ctx.budget.check_chunk(tensor, row_bytes, bytes as u64)?;
    }
    let stats_chunk_bytes = fixed_chunk.unwrap_or(ctx.chunk_bytes);
    while let Some(statistic) = plan.pending_statistic() {
        let started = Instant::now();
        let mut acc = StatsAccumulator::new(statistic, row_len as usize);
        let ranges = chunk_ranges(tensor, row_len, stats_chunk_bytes);
        let mut chunks = read_ahead(model, tensor, ranges);
        let (dtype, mut first_row) = (tensor.dtype, 0usize);
        let shared_plan = std::sync::Arc::new(plan.clone());
        while let Some(Chunk { values, .. }) = next_chunk(&mut chunks, ctx, timings).await? {
            let compute_started = Instant::now();
            let rows = values.len() / (row_len as usize * dtype.size_bytes()).max(1);
            let chunk_plan = shared_plan.clone();
            acc = cpu::run_codec(&tensor.name, move || {
                acc.feed(&chunk_plan, dtype, first_row, &values)
                    .map(|()| acc)
            })
            .await?;
            first_row += rows;
            timings.compute += compute_started.elapsed();
        }
        acc.fix(&mut plan).map_err(|source| TaskError::Pipeline {
            tensor: tensor.name.clone(),
            source,
        })?;
        tracing::debug!(tensor = %tensor.name, ?statistic, seconds = started.elapsed().as_secs_f64(),
            "whole-tensor statistic gathered in a streamed pass");
    }
    let chunk_bytes = solve(model, tensor, &mut plan, ctx, timings).await?;
    Ok((plan, fixed_chunk.unwrap_or(chunk_bytes)))
}

/// Solves the plan's low-rank factors, per-tensor HQQ group or hashed buckets, if it has
/// one, over as many streamed passes as the solver asks for, and fixes the result into the
/// plan; refuses a tensor whose solver state cannot fit under the worker's memory budget.
/// Returns the chunk size that fits beside that state.
async fn solve(
    model: &StoreLocation,
    tensor: &PlannedTensor,
    plan: &mut TensorPlan,
    ctx: &TaskContext,
    timings: &mut Timings,
) -> Result<usize, TaskError> {
    let pipeline = |source| TaskError::Pipeline {
        tensor: tensor.name.clone(),
        source,
    };
    let Some(mut solver) = TensorSolver::for_plan(plan, &tensor.shape).map_err(pipeline)? else {
        return Ok(ctx.chunk_bytes);
    };
    let chunk_bytes = ctx
        .budget
        .solver_chunk_bytes(tensor, plan, ctx.chunk_bytes)?;
    let started = Instant::now();
    let row_len = row_len_of(&tensor.shape).max(1);
    let (dtype, mut passes) = (tensor.dtype, 0usize);
    let shared_plan = std::sync::Arc::new(plan.clone());
    while solver.needs_pass() {
        let ranges = chunk_ranges(tensor, row_len, chunk_bytes);
        let mut chunks = read_ahead(model, tensor, ranges);
        let mut first_row = 0usize;
        while let Some(Chunk { values, .. }) = next_chunk(&mut chunks, ctx, timings).await? {
            let compute_started = Instant::now();
            let rows = values.len() / (row_len as usize * dtype.size_bytes()).max(1);
            let chunk_plan = shared_plan.clone();
            solver = cpu::run_codec(&tensor.name, move || {
                solver
                    .feed(&chunk_plan, dtype, first_row, row_len as usize, &values)
                    .map(|()| solver)
            })
            .await?;
            first_row += rows;
            timings.compute += compute_started.elapsed();
        }
        solver = cpu::run_codec(&tensor.name, move || solver.end_pass().map(|()| solver)).await?;
        passes += 1;
    }
    solver.fix(plan, dtype).map_err(pipeline)?;
    tracing::info!(tensor = %tensor.name, pass = %plan.describe(), passes,
        seconds = started.elapsed().as_secs_f64(), "whole-tensor pass solved over streamed passes");
    Ok(chunk_bytes)
}

/// The exact cosine of two tensors of one dtype and shape, read side by side in chunks.
pub(super) async fn streamed_cosine(
    model: &StoreLocation,
    own: &PlannedTensor,
    other: &PlannedTensor,
    ctx: &TaskContext,
    timings: &mut Timings,
) -> Result<f64, TaskError> {
    let mut ours = read_ahead(model, own, chunk_ranges(own, 1, ctx.chunk_bytes));
    let mut theirs = read_ahead(model, other, chunk_ranges(other, 1, ctx.chunk_bytes));
    let mut acc = CosineAccumulator::default();
    let dtype = own.dtype;
    loop {
        let a = next_chunk(&mut ours, ctx, timings).await?;
        let b = next_chunk(&mut theirs, ctx, timings).await?;
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a.values, b.values),
            (None, None) => return Ok(acc.finish()),
            _ => {
                return Err(TaskError::BadLease(format!(
                    "{} and {} have different lengths; they cannot share",
                    own.name, other.name
                )))
            }
        };
        let compute_started = Instant::now();
        acc = cpu::run(move || -> Result<_, String> {
            let decode = |bytes: &[u8]| -> Result<Vec<f32>, String> {
                let mut values = vec![0f32; bytes.len() / dtype.size_bytes().max(1)];
                decode_to_f32(dtype, bytes, &mut values).map_err(|e| e.to_string())?;
                Ok(values)
            };
            acc.feed(&decode(&a)?, &decode(&b)?);
            Ok(acc)
        })
        .await
        .and_then(|r| r)
        .map_err(|message| TaskError::Compute {
            tensor: own.name.clone(),
            message,
        })?;
        timings.compute += compute_started.elapsed();
    }
}
