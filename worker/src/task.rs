//! One task lease, executed tensor by tensor and chunk by chunk, so memory stays bounded by a
//! few chunks whatever the task's size: a reader task range-reads whole rows ahead into a small
//! queue, the rayon pool runs the passes, and the output shard is streamed to the store as a
//! multipart upload (atomic: the object appears only when complete).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shardpress_core::codec::TensorPlan;
use shardpress_core::dtype::{decode_to_f32, DTypeError};
use shardpress_core::format::{task_prefix, ModelFacts, TensorDesc, TensorWriter};
use shardpress_core::metrics::ErrorAccumulator;
use shardpress_core::plan::PlannedTensor;
use shardpress_core::prune::{magnitude_histogram, GlobalCut, MAGNITUDE_BINS};
use shardpress_core::quantize::row_len_of;
use shardpress_core::recipe::{OutputFormat, Recipe, Width};
use shardpress_core::similarity::Sketcher;
use shardpress_proto::v1::task_lease::Kind;
use shardpress_proto::v1::{
    CompleteTaskRequest, CompressTask, MeasureTask, PrecisionCandidate, PrecisionCandidates,
    TaskLease, TensorResult, TensorSketch, TensorSlice, TensorWork,
};
use shardpress_store::StoreLocation;
use tokio::sync::mpsc;

use crate::memory::MemoryBudget;
use crate::{cpu, TaskError};

mod statistics;
mod writer;

pub(crate) use writer::ShardWriter;

/// Chunks read ahead of the one being compressed.
const READ_AHEAD: usize = 2;

/// What a running task shares with its heartbeat.
pub struct TaskContext {
    pub progress: Arc<AtomicU64>,
    pub cancelled: Arc<AtomicBool>,
    /// Chunk size, already capped by the memory budget.
    pub chunk_bytes: usize,
    pub budget: MemoryBudget,
    pub delay_per_chunk: Duration,
    /// Fault injection for tests: a pause between the last check of the lease and writing
    /// the output's end, as of a process stopped there.
    pub stall_before_finish: Duration,
}

#[derive(Default)]
struct Timings {
    read: Duration,
    compute: Duration,
    write: Duration,
}

fn check_extent(tensor: &PlannedTensor) -> Result<(), TaskError> {
    let stored = tensor.stored_dtype();
    let expected = match tensor.is_decoded() {
        true => tensor
            .shape
            .first()
            .and_then(|rows| rows.checked_mul(tensor.stored_row_bytes(1))),
        false => tensor
            .shape
            .iter()
            .try_fold(stored.size_bytes() as u64, |acc, &d| acc.checked_mul(d)),
    };
    if expected != Some(tensor.data_end - tensor.data_start) {
        return Err(TaskError::BadTensor {
            tensor: tensor.name.clone(),
            reason: format!(
                "shape {:?} of {} does not fill bytes {}..{}",
                tensor.shape,
                stored.as_safetensors(),
                tensor.data_start,
                tensor.data_end
            ),
        });
    }
    Ok(())
}

/// Executes a lease and returns the completion report (without its `task` field). The
/// lease's kind is read here, once: each kind of task has its own function.
pub async fn execute(
    lease: &TaskLease,
    ctx: &TaskContext,
) -> Result<CompleteTaskRequest, TaskError> {
    match &lease.kind {
        Some(Kind::Compress(task)) => compress(lease, task, ctx).await,
        Some(Kind::Measure(task)) => measure(lease, task, ctx).await,
        Some(Kind::Assemble(slice)) => crate::assemble::assemble(lease, slice, ctx).await,
        Some(Kind::Calibrate(step)) => crate::calibrate::calibrate(lease, step, ctx).await,
        None => Err(TaskError::BadLease(
            "the lease names no kind of task (a coordinator of another version?)".into(),
        )),
    }
}

/// A task's tensors, each with its plan, as its lease's [`TensorWork`] gives them.
struct Work {
    recipe: Recipe,
    format: OutputFormat,
    facts: ModelFacts,
    model: StoreLocation,
    tensors: Vec<PlannedTensor>,
    plans: Vec<TensorPlan>,
}

impl Work {
    fn of(lease: &TaskLease, work: Option<&TensorWork>) -> Result<Self, TaskError> {
        let work = work.ok_or_else(|| TaskError::BadLease("the task lists no tensors".into()))?;
        let recipe = Recipe::from_yaml(&work.recipe_yaml)?;
        let format = match work.format.as_str() {
            "" => OutputFormat::Safetensors,
            other => OutputFormat::parse(other).ok_or_else(|| {
                TaskError::BadLease(format!(
                    "unknown output format {other:?} (this worker writes {})",
                    OutputFormat::names()
                ))
            })?,
        };
        let facts = ModelFacts::from_json(&work.model_facts).map_err(TaskError::BadLease)?;
        let model = StoreLocation::open(&lease.model_url)?;
        let tensors = (work.tensors.iter())
            .map(PlannedTensor::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        for tensor in &tensors {
            check_extent(tensor)?;
        }
        let plans = tensors
            .iter()
            .map(|t| {
                TensorPlan::for_output(&recipe, format, &facts, &t.name, t.dtype, &t.shape)
                    .map_err(|e| TaskError::BadLease(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            recipe,
            format,
            facts,
            model,
            tensors,
            plans,
        })
    }
}

/// A compressing task: every tensor through its plan into the task's output.
async fn compress(
    lease: &TaskLease,
    task: &CompressTask,
    ctx: &TaskContext,
) -> Result<CompleteTaskRequest, TaskError> {
    let started = Instant::now();
    let Work {
        recipe,
        format,
        facts,
        model,
        tensors,
        mut plans,
    } = Work::of(lease, task.work.as_ref())?;
    let slices = task.work.as_ref().map_or(&[][..], |w| &w.tensors[..]);
    let out = StoreLocation::open(&lease.out_url)?;
    for plan in &mut plans {
        set_global_cut(plan, task.global_cut.as_ref())?;
    }
    crate::calibrate::attach_solved(&out, slices, &tensors, &mut plans).await?;
    let described: Vec<(TensorDesc<'_>, &TensorPlan)> =
        tensors.iter().map(describe).zip(&plans).collect();
    let prefix = task_prefix(format.spec(), &described).map_err(|e| TaskError::BadTensor {
        tensor: lease.output_name.clone(),
        reason: e.to_string(),
    })?;

    // Parts are hashed as the files they are assembled into.
    let hashed = !format.spec().assembles_parts();
    let mut writer = ShardWriter::open(lease, task.write_at.as_ref(), &out, hashed).await?;
    writer.write(&prefix);

    let mut timings = Timings::default();
    let mut results = Vec::with_capacity(tensors.len());
    for ((tensor, plan), slice) in tensors.iter().zip(plans).zip(slices) {
        let shared = match slice.share_candidate.as_deref() {
            Some(candidate) => {
                let near = NearIdentical {
                    recipe: &recipe,
                    tensor,
                    candidate,
                    global_cut: task.global_cut.as_ref(),
                    threshold: task.share_cosine,
                    format,
                    facts: &facts,
                };
                share_tensor(&model, near, &mut writer, ctx, &mut timings).await
            }
            None => Ok(None),
        };
        let result = match shared {
            Ok(Some(result)) => Ok(result),
            Ok(None) => {
                let job = TensorJob {
                    tensor,
                    plan: Arc::new(plan),
                    format,
                };
                compress_tensor(&model, job, &mut writer, ctx, &mut timings).await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(result) => results.push(result),
            Err(e) => {
                writer.abort().await;
                return Err(e);
            }
        }
    }
    // A lease lost meanwhile (see `heartbeat_loop`) commits nothing.
    if ctx.cancelled.load(Ordering::Relaxed) {
        writer.abort().await;
        return Err(TaskError::Cancelled("lease lost".into()));
    }
    // A process paused right here (the check above passed) is what storage fencing is for.
    tokio::time::sleep(ctx.stall_before_finish).await;
    let write_started = Instant::now();
    let written = writer.finish().await?;
    timings.write += write_started.elapsed();
    Ok(CompleteTaskRequest {
        task: None,
        output_bytes: written.bytes,
        output_blake3: written.blake3,
        upload_parts: written.upload_parts,
        tensors: results,
        seconds: started.elapsed().as_secs_f64(),
        read_seconds: timings.read.as_secs_f64(),
        compute_seconds: timings.compute.as_secs_f64(),
        write_seconds: timings.write.as_secs_f64(),
        ..Default::default()
    })
}

fn describe(tensor: &PlannedTensor) -> TensorDesc<'_> {
    TensorDesc {
        name: &tensor.name,
        dtype: tensor.dtype,
        shape: &tensor.shape,
    }
}

/// The measuring round (global magnitude prune, near-identical sharing): the summed
/// magnitude histogram of the task's tensors under a global prune, and a sketch of each 2-D
/// float tensor; read chunk by chunk, nothing written.
async fn measure(
    lease: &TaskLease,
    task: &MeasureTask,
    ctx: &TaskContext,
) -> Result<CompleteTaskRequest, TaskError> {
    let started = Instant::now();
    let Work {
        recipe,
        format,
        facts,
        model,
        tensors,
        plans,
    } = Work::of(lease, task.work.as_ref())?;
    let mut timings = Timings::default();
    let mut histogram = vec![0u64; MAGNITUDE_BINS];
    let mut sketches = Vec::new();
    let mut precision = Vec::new();
    let widths = (recipe.mixed_precision.as_ref())
        .filter(|_| task.precision)
        .map(|m| m.candidates_for(format));
    for (tensor, plan) in tensors.iter().zip(&plans) {
        if let Some(widths) = widths.as_ref().filter(|_| plan.has_width()) {
            let candidates = (widths.iter())
                .map(|&width| {
                    let described = (tensor.name.as_str(), tensor.dtype, &tensor.shape[..]);
                    TensorPlan::for_output_at(&recipe, format, &facts, described, Some(width))
                        .map(|plan| (width, plan))
                        .map_err(|e| TaskError::BadLease(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let measured = measure_widths(&model, tensor, candidates, ctx, &mut timings).await?;
            precision.push(measured);
        }
        let with_histogram = task.magnitudes && plan.needs_global_cut();
        let with_sketch =
            task.sketches && tensor.shape.len() >= 2 && tensor.dtype.is_decodable_float();
        if !with_histogram && !with_sketch {
            continue;
        }
        let mut sketcher = Some(Sketcher::new(elements(tensor) as usize));
        let ranges = chunk_ranges(tensor, 1, ctx.chunk_bytes);
        let mut chunks = read_ahead(&model, tensor, ranges);
        while let Some(Chunk {
            values: input,
            stored_len: len,
        }) = next_chunk(&mut chunks, ctx, &mut timings).await?
        {
            let compute_started = Instant::now();
            let dtype = tensor.dtype;
            let mut s = sketcher.take();
            let (counts, s) = cpu::run(move || {
                let mut values = vec![0f32; input.len() / dtype.size_bytes().max(1)];
                decode_to_f32(dtype, &input, &mut values)?;
                if let Some(s) = s.as_mut().filter(|_| with_sketch) {
                    s.feed(&values);
                }
                let counts = with_histogram.then(|| magnitude_histogram(&values));
                Ok::<_, DTypeError>((counts, s))
            })
            .await
            .map_err(|message| TaskError::Compute {
                tensor: tensor.name.clone(),
                message,
            })?
            .map_err(|e| TaskError::BadTensor {
                tensor: tensor.name.clone(),
                reason: e.to_string(),
            })?;
            sketcher = s;
            for (total, count) in histogram.iter_mut().zip(counts.unwrap_or_default()) {
                *total += count;
            }
            timings.compute += compute_started.elapsed();
            ctx.progress.fetch_add(len, Ordering::Relaxed);
        }
        if let Some(s) = sketcher.filter(|_| with_sketch) {
            sketches.push(TensorSketch {
                name: tensor.name.clone(),
                values: s.finish(),
            });
        }
    }
    Ok(CompleteTaskRequest {
        seconds: started.elapsed().as_secs_f64(),
        read_seconds: timings.read.as_secs_f64(),
        compute_seconds: timings.compute.as_secs_f64(),
        magnitude_histogram: if task.magnitudes {
            histogram
        } else {
            Vec::new()
        },
        sketches,
        precision,
        ..Default::default()
    })
}

/// Mixed precision's measurement of one tensor: its chunks, read once, encoded under each
/// candidate width's plan, with the stored bits and the error of each (see
/// `shardpress_core::precision`).
async fn measure_widths(
    model: &StoreLocation,
    tensor: &PlannedTensor,
    candidates: Vec<(Width, TensorPlan)>,
    ctx: &TaskContext,
    timings: &mut Timings,
) -> Result<PrecisionCandidates, TaskError> {
    let mut prepared = Vec::with_capacity(candidates.len());
    let mut chunk_bytes = ctx.chunk_bytes;
    for (width, plan) in candidates {
        let (plan, bytes) = statistics::prepare_plan(model, tensor, plan, ctx, timings).await?;
        // The candidates share their structure stage, which alone fixes chunk sizes.
        chunk_bytes = chunk_bytes.min(bytes);
        prepared.push((width, Arc::new(plan), ErrorAccumulator::new(), 0u64));
    }
    let row_len = row_len_of(&tensor.shape).max(1) as usize;
    let mut chunks = read_ahead(
        model,
        tensor,
        chunk_ranges(tensor, row_len as u64, chunk_bytes),
    );
    let (dtype, mut first_row) = (tensor.dtype, 0usize);
    while let Some(Chunk {
        values: input,
        stored_len,
    }) = next_chunk(&mut chunks, ctx, timings).await?
    {
        let compute_started = Instant::now();
        let chunk_first_row = first_row;
        first_row += input.len() / (row_len * dtype.size_bytes()).max(1);
        prepared = cpu::run_codec(&tensor.name, move || {
            for (_, plan, acc, repr_bits) in &mut prepared {
                let plan = plan.for_chunk(chunk_first_row);
                let output =
                    TensorWriter::Reconstruction.chunk(&plan, dtype, row_len, &input, acc)?;
                *repr_bits += output.repr_bits;
            }
            Ok(prepared)
        })
        .await?;
        timings.compute += compute_started.elapsed();
        ctx.progress.fetch_add(stored_len, Ordering::Relaxed);
    }
    let params = elements(tensor);
    let candidates = (prepared.into_iter())
        .map(|(width, _, acc, repr_bits)| {
            let rel = acc.finish().rel_fro_error;
            PrecisionCandidate {
                bits: u32::from(width.bits),
                granularity: width.granularity_suffix(),
                bits_per_weight: repr_bits as f64 / params.max(1) as f64,
                rel_error_sq: rel * rel,
            }
        })
        .collect();
    Ok(PrecisionCandidates {
        name: tensor.name.clone(),
        params,
        candidates,
        calibration_weighted: false,
    })
}

/// Gives a plan with a global magnitude prune the job's cut from the lease.
fn set_global_cut(
    plan: &mut TensorPlan,
    cut: Option<&shardpress_proto::v1::GlobalCut>,
) -> Result<(), TaskError> {
    if !plan.needs_global_cut() {
        return Ok(());
    }
    let cut = cut.ok_or_else(|| {
        TaskError::BadLease(
            "a global magnitude prune needs the job's cut; the lease has none".into(),
        )
    })?;
    plan.global_cut = Some(GlobalCut {
        bin: cut.bin,
        tie_fraction: cut.tie_fraction,
    });
    Ok(())
}

/// A tensor with a near-identical candidate from the measuring round (recipe `share.cosine`).
struct NearIdentical<'a> {
    recipe: &'a Recipe,
    tensor: &'a PlannedTensor,
    candidate: &'a TensorSlice,
    global_cut: Option<&'a shardpress_proto::v1::GlobalCut>,
    threshold: f64,
    format: OutputFormat,
    facts: &'a ModelFacts,
}

/// When the exact cosine between the tensor and its candidate reaches the threshold, the
/// tensor is stored as the candidate's compressed form: in safetensors its bytes are the
/// candidate's reconstruction, in `.spz` it has no record of its own (the index points at
/// the candidate's). Its errors are measured against that reconstruction. `None` (compress
/// it normally) below the threshold.
async fn share_tensor(
    model: &StoreLocation,
    near: NearIdentical<'_>,
    writer: &mut ShardWriter,
    ctx: &TaskContext,
    timings: &mut Timings,
) -> Result<Option<TensorResult>, TaskError> {
    let tensor = near.tensor;
    let candidate = PlannedTensor::try_from(near.candidate)?;
    check_extent(&candidate)?;
    if candidate.dtype != tensor.dtype || candidate.shape != tensor.shape {
        return Err(TaskError::BadLease(format!(
            "share candidate {} ({} {:?}) does not match {} ({} {:?})",
            candidate.name,
            candidate.dtype.as_safetensors(),
            candidate.shape,
            tensor.name,
            tensor.dtype.as_safetensors(),
            tensor.shape
        )));
    }
    let mut plan = TensorPlan::for_output(
        near.recipe,
        near.format,
        near.facts,
        &candidate.name,
        candidate.dtype,
        &candidate.shape,
    )
    .map_err(|e| TaskError::BadLease(e.to_string()))?;
    set_global_cut(&mut plan, near.global_cut)?;
    let threshold = near.threshold;
    let cosine = statistics::streamed_cosine(model, tensor, &candidate, ctx, timings).await?;
    if cosine < threshold {
        tracing::info!(tensor = %tensor.name, candidate = %candidate.name, cosine,
            "near-identical candidate below the threshold; compressing it on its own");
        return Ok(None);
    }
    let pass = plan.describe();
    let record_offset = writer.bytes;
    let write = match near.format {
        OutputFormat::Safetensors => true,
        // The index points at the candidate's record.
        OutputFormat::Spz => false,
        OutputFormat::CompressedTensors | OutputFormat::Gguf => {
            return Err(TaskError::BadLease(format!(
                "{} output cannot share tensors (refused at submit)",
                near.format.as_str()
            )))
        }
    };
    let metrics = shared_form(
        model,
        (tensor, &candidate),
        plan,
        write,
        writer,
        ctx,
        timings,
    )
    .await?;
    ctx.progress.fetch_add(tensor.byte_len(), Ordering::Relaxed);
    let mut result = TensorResult {
        name: tensor.name.clone(),
        dtype: tensor.dtype.as_safetensors().to_string(),
        shape: tensor.shape.clone(),
        pass: if pass.is_empty() { "shared".into() } else { format!("shared ({pass})") },
        note: format!(
            "near-identical to {}: cosine {cosine:.6} >= {threshold}; stored as its compressed form",
            candidate.name
        ),
        shared_with: candidate.name.clone(),
        record_offset,
        ..Default::default()
    };
    result.set_metrics(&metrics);
    Ok(Some(result))
}

/// Streams the candidate's compressed form (its reconstruction under `plan`, statistics
/// gathered first as when it is compressed itself), writing it as the tensor's bytes when
/// `write`, and measures it against the tensor's own chunks, read alongside.
async fn shared_form(
    model: &StoreLocation,
    (tensor, candidate): (&PlannedTensor, &PlannedTensor),
    plan: TensorPlan,
    write: bool,
    writer: &mut ShardWriter,
    ctx: &TaskContext,
    timings: &mut Timings,
) -> Result<shardpress_core::metrics::TensorMetrics, TaskError> {
    let (plan, chunk_bytes) =
        statistics::prepare_plan(model, candidate, plan, ctx, timings).await?;
    let row_len = row_len_of(&tensor.shape).max(1) as usize;
    let chunk_row_len = if plan.is_identity() { 1 } else { row_len };
    let ranges = |t: &PlannedTensor| chunk_ranges(t, chunk_row_len as u64, chunk_bytes);
    let mut theirs = read_ahead(model, candidate, ranges(candidate));
    let mut ours = read_ahead(model, tensor, ranges(tensor));
    let (plan, dtype) = (Arc::new(plan), tensor.dtype);
    let mut acc = ErrorAccumulator::new();
    let mut first_row = 0usize;
    loop {
        let other = next_chunk(&mut theirs, ctx, timings).await?;
        let own = next_chunk(&mut ours, ctx, timings).await?;
        let (other, own) = match (other, own) {
            (Some(other), Some(own)) => (other.values, own.values),
            (None, None) => return Ok(acc.finish()),
            _ => {
                return Err(TaskError::BadLease(format!(
                    "share candidate {} has a different length from {}",
                    candidate.name, tensor.name
                )))
            }
        };
        let compute_started = Instant::now();
        let chunk_plan = plan.for_chunk(first_row);
        first_row += other.len() / (chunk_row_len * dtype.size_bytes()).max(1);
        let (stored, acc_out) = cpu::run(move || -> Result<_, String> {
            let decode = |bytes: &[u8]| -> Result<Vec<f32>, String> {
                let mut values = vec![0f32; bytes.len() / dtype.size_bytes().max(1)];
                decode_to_f32(dtype, bytes, &mut values).map_err(|e| e.to_string())?;
                Ok(values)
            };
            let mut unused = ErrorAccumulator::new();
            let stored = TensorWriter::Reconstruction
                .chunk(&chunk_plan, dtype, chunk_row_len, &other, &mut unused)
                .map_err(|e| e.to_string())?;
            acc.add(&decode(&own)?, &decode(&stored.bytes)?);
            Ok((stored.bytes, acc))
        })
        .await
        .and_then(|r| r)
        .map_err(|message| TaskError::Compute {
            tensor: tensor.name.clone(),
            message,
        })?;
        acc = acc_out;
        timings.compute += compute_started.elapsed();
        if write {
            let write_started = Instant::now();
            writer.write(&stored);
            writer.flush().await?;
            timings.write += write_started.elapsed();
        }
    }
}

/// The tensor's element count.
fn elements(tensor: &PlannedTensor) -> u64 {
    tensor.shape.iter().product()
}

/// Byte ranges of one stored tensor, each of whole rows of `row_len` elements (of the
/// weight's rows for FP8 decoded with scales), at most `chunk_bytes` (but at least one row).
fn chunk_ranges(
    tensor: &PlannedTensor,
    row_len: u64,
    chunk_bytes: usize,
) -> Vec<std::ops::Range<u64>> {
    let total = tensor.data_end - tensor.data_start;
    let row_bytes = tensor.stored_row_bytes(row_len).max(1);
    let rows_per_chunk = (chunk_bytes as u64 / row_bytes).max(1);
    let step = rows_per_chunk * row_bytes;
    (0..total)
        .step_by(step as usize)
        .map(|start| tensor.data_start + start..tensor.data_start + (start + step).min(total))
        .collect()
}

/// One tensor and what to do with it.
struct TensorJob<'a> {
    tensor: &'a PlannedTensor,
    plan: Arc<TensorPlan>,
    format: OutputFormat,
}

async fn compress_tensor(
    model: &StoreLocation,
    job: TensorJob<'_>,
    writer: &mut ShardWriter,
    ctx: &TaskContext,
    timings: &mut Timings,
) -> Result<TensorResult, TaskError> {
    let TensorJob {
        tensor,
        plan,
        format,
    } = job;
    let row_len = row_len_of(&tensor.shape).max(1) as usize;
    // Copied tensors have no row structure to respect: chunk them by bytes alone. Passes that
    // need whole-tensor statistics get them from a first streamed pass; those that need the
    // whole tensor at once get it as one chunk, if it fits the memory budget.
    let chunk_row_len = if plan.is_identity() { 1 } else { row_len };
    let (fixed, chunk_bytes) =
        statistics::prepare_plan(model, tensor, (*plan).clone(), ctx, timings).await?;
    let plan = Arc::new(fixed);
    let mut first_row = 0usize;
    let ranges = chunk_ranges(tensor, chunk_row_len as u64, chunk_bytes);
    let mut chunks = read_ahead(model, tensor, ranges);
    let mut acc = ErrorAccumulator::new();
    let record_offset = writer.bytes;
    let mut record_hash = blake3::Hasher::new();
    let mut repr_bits = 0u64;
    let mut kept_rows = 0u64;
    let mut tensor_writer = format.spec().tensor_writer(describe(tensor), &plan);
    // `.spz` parts hold records that the archive's index points at, checksum included.
    let records = match format {
        OutputFormat::Spz => true,
        OutputFormat::Safetensors | OutputFormat::CompressedTensors | OutputFormat::Gguf => false,
    };
    while let Some(Chunk {
        values: input,
        stored_len: input_len,
    }) = next_chunk(&mut chunks, ctx, timings).await?
    {
        let compute_started = Instant::now();
        let dtype = tensor.dtype;
        // Row flags, factors and buckets fixed for the tensor start at this chunk's first row.
        let plan_c = Arc::new(plan.for_chunk(first_row));
        first_row += input.len() / (chunk_row_len * dtype.size_bytes()).max(1);
        let (output, acc_out, writer_out) = cpu::run_codec(&tensor.name, move || {
            let result = tensor_writer.chunk(&plan_c, dtype, chunk_row_len, &input, &mut acc);
            result.map(|out| (out, acc, tensor_writer))
        })
        .await?;
        acc = acc_out;
        tensor_writer = writer_out;
        repr_bits += output.repr_bits;
        kept_rows += output.kept_rows;
        timings.compute += compute_started.elapsed();
        let write_started = Instant::now();
        if records {
            record_hash.update(&output.bytes);
        }
        writer.write(&output.bytes);
        writer.flush().await?;
        timings.write += write_started.elapsed();
        // Progress counts input bytes, whatever the format writes.
        ctx.progress.fetch_add(input_len, Ordering::Relaxed);
        if !ctx.delay_per_chunk.is_zero() {
            tokio::time::sleep(ctx.delay_per_chunk).await;
        }
    }
    let tail = tensor_writer
        .finish()
        .map_err(|source| TaskError::Pipeline {
            tensor: tensor.name.clone(),
            source,
        })?;
    writer.write(&tail);
    let elems = elements(tensor);
    let per_weight = |bits: u64| {
        if elems == 0 {
            0.0
        } else {
            bits as f64 / elems as f64
        }
    };
    let mut result = TensorResult {
        name: tensor.name.clone(),
        dtype: tensor.dtype.as_safetensors().to_string(),
        shape: tensor.shape.clone(),
        pass: plan.describe(),
        bits_per_weight: per_weight(repr_bits),
        note: plan.note.clone(),
        ..Default::default()
    };
    if records {
        result.record_offset = record_offset;
        result.record_len = writer.bytes - record_offset;
        result.stored_bits_per_weight = per_weight(result.record_len * 8);
        result.record_blake3 = record_hash.finalize().to_hex().to_string();
    }
    if !plan.is_identity() {
        result.set_metrics(&acc.finish());
    }
    if let Some(cut) = &plan.global_cut {
        let scope = if plan.needs_global_cut() {
            "global"
        } else {
            "tensor's"
        };
        result.note = format!("{scope} magnitude cut at |w| ~ {:.4e}", cut.threshold());
    }
    if kept_rows > 0 {
        result.note = format!(
            "{kept_rows} row(s) holding NaN or infinities stored unchanged (non_finite: keep); the metrics cover the other rows"
        );
    }
    Ok(result)
}

/// A chunk of whole rows as passes see it (FP8 with scales decoded to BF16), and how many
/// stored bytes it was read from (what progress counts).
pub(crate) struct Chunk {
    pub(crate) values: Bytes,
    pub(crate) stored_len: u64,
}

/// The next chunk from [`read_ahead`], timing the wait; stops when the lease is lost.
async fn next_chunk(
    chunks: &mut mpsc::Receiver<Result<Chunk, TaskError>>,
    ctx: &TaskContext,
    timings: &mut Timings,
) -> Result<Option<Chunk>, TaskError> {
    if ctx.cancelled.load(Ordering::Relaxed) {
        return Err(TaskError::Cancelled("lease lost".into()));
    }
    let read_started = Instant::now();
    let chunk = chunks.recv().await.transpose();
    timings.read += read_started.elapsed();
    chunk
}

/// Spawns a reader that fetches the chunks in order, a few ahead of the consumer, decoding
/// FP8 stored with scales (read first) to BF16.
pub(crate) fn read_ahead(
    model: &StoreLocation,
    tensor: &PlannedTensor,
    ranges: Vec<std::ops::Range<u64>>,
) -> mpsc::Receiver<Result<Chunk, TaskError>> {
    let (sender, receiver) = mpsc::channel(READ_AHEAD);
    let model = model.clone();
    let tensor = tensor.clone();
    tokio::spawn(async move {
        let side = match read_side(&model, &tensor).await {
            Ok(side) => side,
            Err(e) => {
                let _ = sender.send(Err(e)).await;
                return;
            }
        };
        for range in ranges {
            let chunk = match model.get_range(&tensor.source_file, range.clone()).await {
                Ok(raw) => decode_chunk(&tensor, side.clone(), range.start, raw).await,
                Err(e) => Err(TaskError::from(e)),
            };
            let failed = chunk.is_err();
            if sender.send(chunk).await.is_err() || failed {
                return;
            }
        }
    });
    receiver
}

/// What a decoded tensor's chunks need besides their own bytes: its scales as f32 and, for
/// asymmetric packed codes, the raw zero points.
#[derive(Clone)]
struct SideData {
    scales: Arc<Vec<f32>>,
    zero_points: Option<Bytes>,
}

/// The side data of a tensor decoded on reading (`None` for other tensors).
async fn read_side(
    model: &StoreLocation,
    tensor: &PlannedTensor,
) -> Result<Option<SideData>, TaskError> {
    let (scales, zero_points) = match (&tensor.scales, &tensor.packed) {
        (Some(scales), _) => (scales, None),
        (_, Some(packed)) => (&packed.scales, packed.zero_points.as_ref()),
        _ => return Ok(None),
    };
    let raw = model
        .get_range(&scales.source_file, scales.data_start..scales.data_end)
        .await?;
    let mut values = vec![0f32; raw.len() / scales.dtype.size_bytes().max(1)];
    decode_to_f32(scales.dtype, &raw, &mut values).map_err(|e| TaskError::BadTensor {
        tensor: scales.name.clone(),
        reason: e.to_string(),
    })?;
    let zero_points = match zero_points {
        Some(z) => Some(
            model
                .get_range(&z.source_file, z.data_start..z.data_end)
                .await?,
        ),
        None => None,
    };
    Ok(Some(SideData {
        scales: Arc::new(values),
        zero_points,
    }))
}

/// The chunk of `raw` bytes read from `start` as passes see it.
async fn decode_chunk(
    tensor: &PlannedTensor,
    side: Option<SideData>,
    start: u64,
    raw: Bytes,
) -> Result<Chunk, TaskError> {
    let stored_len = raw.len() as u64;
    let Some(side) = side else {
        return Ok(Chunk {
            values: raw,
            stored_len,
        });
    };
    let cols = row_len_of(&tensor.shape).max(1);
    let row_bytes = tensor.stored_row_bytes(cols).max(1);
    let first_row = (start - tensor.data_start) / row_bytes;
    let (fp8, packed, dtype) = (tensor.scales.clone(), tensor.packed.clone(), tensor.dtype);
    let values = cpu::run(move || -> Result<Vec<u8>, String> {
        let mut values = vec![0f32; (raw.len() as u64 / row_bytes * cols) as usize];
        if let Some(meta) = fp8 {
            shardpress_core::fp8::decode_scaled_rows(
                &raw,
                first_row,
                cols as usize,
                &side.scales,
                meta.cols() as usize,
                meta.block,
                &mut values,
            )?;
        } else if let Some(p) = packed {
            shardpress_core::format::compressed_tensors::dequantize_packed_rows(
                &raw,
                first_row,
                cols as usize,
                p.bits,
                p.scales.block[1] as usize,
                &side.scales,
                side.zero_points.as_deref(),
                &mut values,
            )?;
        }
        let mut out = vec![0u8; values.len() * dtype.size_bytes()];
        shardpress_core::dtype::encode_from_f32(dtype, &values, &mut out)
            .map_err(|e| e.to_string())?;
        Ok(out)
    })
    .await
    .and_then(|r| r)
    .map_err(|reason| TaskError::BadTensor {
        tensor: tensor.name.clone(),
        reason: format!("decoding its stored form: {reason}"),
    })?;
    Ok(Chunk {
        values: Bytes::from(values),
        stored_len,
    })
}

/// A whole tensor's bytes as passes see them (FP8 with scales and packed codes decoded to
/// BF16), read in one range.
pub async fn read_tensor(
    model: &StoreLocation,
    tensor: &PlannedTensor,
) -> Result<Bytes, TaskError> {
    let whole = std::iter::once(tensor.data_start..tensor.data_end).collect();
    let mut chunks = read_ahead(model, tensor, whole);
    match chunks.recv().await {
        Some(chunk) => Ok(chunk?.values),
        None => Err(TaskError::BadTensor {
            tensor: tensor.name.clone(),
            reason: "nothing was read".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> TaskContext {
        TaskContext {
            progress: Default::default(),
            cancelled: Default::default(),
            chunk_bytes: 1 << 20,
            budget: MemoryBudget::default(),
            delay_per_chunk: std::time::Duration::ZERO,
            stall_before_finish: std::time::Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn a_lease_without_a_kind_or_without_tensors_is_refused_before_any_io() {
        let lease = TaskLease {
            model_url: "memory:///nothing-here".into(),
            out_url: "memory:///out".into(),
            output_name: "shard.safetensors".into(),
            ..Default::default()
        };
        let none = execute(&lease, &context()).await.unwrap_err();
        assert!(none.to_string().contains("names no kind of task"), "{none}");
        let empty = TaskLease {
            kind: Some(Kind::Compress(CompressTask::default())),
            ..lease
        };
        let no_work = execute(&empty, &context()).await.unwrap_err();
        assert!(
            no_work.to_string().contains("lists no tensors"),
            "{no_work}"
        );
        assert!(!no_work.is_retryable());
    }
}
