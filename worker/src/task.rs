//! One task lease, executed tensor by tensor and chunk by chunk, so memory stays bounded by a
//! few chunks whatever the task's size: a reader task range-reads whole rows ahead into a small
//! queue, the rayon pool runs the passes, and the output shard is streamed to the store as a
//! multipart upload (atomic: the object appears only when complete).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::{ObjectStoreExt, WriteMultipart};
use shardpress_core::codec::TensorPlan;
use shardpress_core::dtype::{decode_to_f32, DType, DTypeError};
use shardpress_core::header::encode_header;
use shardpress_core::metrics::ErrorAccumulator;
use shardpress_core::pipeline::process_chunk;
use shardpress_core::plan::PlannedTensor;
use shardpress_core::prune::{magnitude_histogram, GlobalCut, MAGNITUDE_BINS};
use shardpress_core::quantize::row_len_of;
use shardpress_core::recipe::{OutputFormat, Recipe};
use shardpress_proto::v1::{CompleteTaskRequest, TaskLease, TensorResult};
use shardpress_store::StoreLocation;
use tokio::sync::mpsc;

use crate::{cpu, TaskError};

/// Output parts uploaded concurrently per task.
const UPLOAD_CONCURRENCY: usize = 4;
/// Multipart part size.
const PART_BYTES: usize = 8 * 1024 * 1024;
/// Chunks read ahead of the one being compressed.
const READ_AHEAD: usize = 2;

/// What a running task shares with its heartbeat.
pub struct TaskContext {
    pub progress: Arc<AtomicU64>,
    pub cancelled: Arc<AtomicBool>,
    pub chunk_bytes: usize,
    pub delay_per_chunk: Duration,
}

#[derive(Default)]
struct Timings {
    read: Duration,
    compute: Duration,
    write: Duration,
}

fn check_extent(tensor: &PlannedTensor) -> Result<(), TaskError> {
    let expected = tensor
        .shape
        .iter()
        .try_fold(tensor.dtype.size_bytes() as u64, |acc, &d| {
            acc.checked_mul(d)
        });
    if expected != Some(tensor.data_end - tensor.data_start) {
        return Err(TaskError::BadTensor {
            tensor: tensor.name.clone(),
            reason: format!(
                "shape {:?} of {} does not fill bytes {}..{}",
                tensor.shape,
                tensor.dtype.as_safetensors(),
                tensor.data_start,
                tensor.data_end
            ),
        });
    }
    Ok(())
}

/// Executes a lease and returns the completion report (without its `task` field).
pub async fn execute(
    lease: &TaskLease,
    ctx: &TaskContext,
) -> Result<CompleteTaskRequest, TaskError> {
    let started = Instant::now();
    if let Some(assemble) = &lease.assemble {
        return crate::assemble::assemble(lease, assemble, ctx).await;
    }
    let recipe = Recipe::from_yaml(&lease.recipe_yaml)?;
    let format = match lease.format.as_str() {
        "" => OutputFormat::Safetensors,
        other => OutputFormat::parse(other).ok_or_else(|| {
            TaskError::BadLease(format!(
                "unknown output format {other:?} (this worker writes safetensors or spz)"
            ))
        })?,
    };
    let model = StoreLocation::open(&lease.model_url)?;
    let out = StoreLocation::open(&lease.out_url)?;
    let tensors = lease
        .tensors
        .iter()
        .map(PlannedTensor::try_from)
        .collect::<Result<Vec<_>, _>>()?;
    for tensor in &tensors {
        check_extent(tensor)?;
    }
    let layout: Vec<(String, DType, Vec<u64>)> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let metadata = [("format".to_string(), "pt".to_string())].into();
    let (prefix, _) = encode_header(&layout, &metadata).map_err(|e| TaskError::BadTensor {
        tensor: lease.output_name.clone(),
        reason: e.to_string(),
    })?;
    let mut plans = tensors
        .iter()
        .map(|t| {
            TensorPlan::for_tensor(&recipe, &t.name, t.dtype, &t.shape)
                .map_err(|e| TaskError::BadLease(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if lease.measure_magnitudes {
        return measure_magnitudes(&model, &tensors, &plans, ctx, started).await;
    }
    for plan in plans.iter_mut().filter(|p| p.needs_global_cut()) {
        let cut = lease.global_cut.as_ref().ok_or_else(|| {
            TaskError::BadLease(
                "a global magnitude prune needs the job's cut; the lease has none".into(),
            )
        })?;
        plan.global_cut = Some(GlobalCut {
            bin: cut.bin,
            tie_fraction: cut.tie_fraction,
        });
    }

    let object = out.describe(&lease.output_name);
    let upload_err = |e: object_store::Error| TaskError::Upload {
        object: object.clone(),
        message: e.to_string(),
    };
    let upload = out
        .store()
        .put_multipart(&out.path(&lease.output_name))
        .await
        .map_err(upload_err)?;
    let mut writer = ShardWriter {
        inner: WriteMultipart::new_with_chunk_size(upload, PART_BYTES),
        hasher: blake3::Hasher::new(),
        bytes: 0,
    };
    if format == OutputFormat::Safetensors {
        writer.write(&prefix);
    }

    let mut timings = Timings::default();
    let mut results = Vec::with_capacity(tensors.len());
    for (tensor, plan) in tensors.iter().zip(plans) {
        let job = TensorJob {
            tensor,
            plan: Arc::new(plan),
            format,
        };
        match compress_tensor(&model, job, &mut writer, ctx, &mut timings).await {
            Ok(result) => results.push(result),
            Err(e) => {
                writer.inner.abort().await.ok();
                return Err(e);
            }
        }
    }
    let write_started = Instant::now();
    let output_bytes = writer.bytes;
    let output_blake3 = writer.hasher.finalize().to_hex().to_string();
    writer.inner.finish().await.map_err(upload_err)?;
    timings.write += write_started.elapsed();
    Ok(CompleteTaskRequest {
        task: None,
        output_bytes,
        output_blake3,
        tensors: results,
        seconds: started.elapsed().as_secs_f64(),
        read_seconds: timings.read.as_secs_f64(),
        compute_seconds: timings.compute.as_secs_f64(),
        write_seconds: timings.write.as_secs_f64(),
        magnitude_histogram: Vec::new(),
    })
}

pub(crate) struct ShardWriter {
    pub(crate) inner: WriteMultipart,
    pub(crate) hasher: blake3::Hasher,
    pub(crate) bytes: u64,
}

impl ShardWriter {
    pub(crate) fn write(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.bytes += data.len() as u64;
        self.inner.write(data);
    }
}

/// The first round of a global magnitude prune: the summed magnitude histogram of the task's
/// targeted tensors, read chunk by chunk; nothing is written.
async fn measure_magnitudes(
    model: &StoreLocation,
    tensors: &[PlannedTensor],
    plans: &[TensorPlan],
    ctx: &TaskContext,
    started: Instant,
) -> Result<CompleteTaskRequest, TaskError> {
    let mut timings = Timings::default();
    let mut histogram = vec![0u64; MAGNITUDE_BINS];
    for (tensor, _) in tensors
        .iter()
        .zip(plans)
        .filter(|(_, p)| p.needs_global_cut())
    {
        let ranges = chunk_ranges(tensor, 1, ctx.chunk_bytes);
        let mut chunks = read_ahead(model, tensor, ranges);
        loop {
            if ctx.cancelled.load(Ordering::Relaxed) {
                return Err(TaskError::Cancelled("lease lost".into()));
            }
            let read_started = Instant::now();
            let Some(input) = chunks.recv().await else {
                break;
            };
            timings.read += read_started.elapsed();
            let input = input?;
            let compute_started = Instant::now();
            let (dtype, len) = (tensor.dtype, input.len() as u64);
            let counts = cpu::run(move || -> Result<Vec<u64>, DTypeError> {
                let mut values = vec![0f32; input.len() / dtype.size_bytes().max(1)];
                decode_to_f32(dtype, &input, &mut values)?;
                Ok(magnitude_histogram(&values))
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
            for (total, count) in histogram.iter_mut().zip(counts) {
                *total += count;
            }
            timings.compute += compute_started.elapsed();
            ctx.progress.fetch_add(len, Ordering::Relaxed);
        }
    }
    Ok(CompleteTaskRequest {
        seconds: started.elapsed().as_secs_f64(),
        read_seconds: timings.read.as_secs_f64(),
        compute_seconds: timings.compute.as_secs_f64(),
        magnitude_histogram: histogram,
        ..Default::default()
    })
}

/// Row ranges of one tensor, each at most `chunk_bytes` (but at least one row).
fn chunk_ranges(
    tensor: &PlannedTensor,
    row_len: u64,
    chunk_bytes: usize,
) -> Vec<std::ops::Range<u64>> {
    let total = tensor.data_end - tensor.data_start;
    let row_bytes = (row_len * tensor.dtype.size_bytes() as u64).max(1);
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
    // need whole-tensor statistics get the tensor as one chunk.
    let chunk_row_len = if plan.is_identity() { 1 } else { row_len };
    let chunk_bytes = if plan.needs_whole_tensor() {
        usize::MAX
    } else {
        ctx.chunk_bytes
    };
    let ranges = chunk_ranges(tensor, chunk_row_len as u64, chunk_bytes);
    let mut chunks = read_ahead(model, tensor, ranges);
    let mut acc = ErrorAccumulator::new();
    let record_offset = writer.bytes;
    let mut record_hash = blake3::Hasher::new();
    let mut repr_bits = 0u64;
    loop {
        if ctx.cancelled.load(Ordering::Relaxed) {
            return Err(TaskError::Cancelled("lease lost".into()));
        }
        let read_started = Instant::now();
        let Some(input) = chunks.recv().await else {
            break;
        };
        timings.read += read_started.elapsed();
        let input = input?;
        let compute_started = Instant::now();
        let (plan_c, dtype) = (plan.clone(), tensor.dtype);
        let (output, acc_out) = cpu::run(move || {
            let result = process_chunk(&plan_c, dtype, chunk_row_len, &input, format, &mut acc);
            result.map(|out| (out, acc))
        })
        .await
        .map_err(|message| TaskError::Compute {
            tensor: tensor.name.clone(),
            message,
        })?
        .map_err(|source| TaskError::Pipeline {
            tensor: tensor.name.clone(),
            source,
        })?;
        acc = acc_out;
        repr_bits += output.repr_bits;
        timings.compute += compute_started.elapsed();
        let write_started = Instant::now();
        if format == OutputFormat::Spz {
            let len = (output.bytes.len() as u64).to_le_bytes();
            record_hash.update(&len);
            record_hash.update(&output.bytes);
            writer.write(&len);
        }
        writer.write(&output.bytes);
        writer
            .inner
            .wait_for_capacity(UPLOAD_CONCURRENCY)
            .await
            .map_err(|e| TaskError::Upload {
                object: tensor.name.clone(),
                message: e.to_string(),
            })?;
        timings.write += write_started.elapsed();
        ctx.progress
            .fetch_add(output.bytes.len() as u64, Ordering::Relaxed);
        if !ctx.delay_per_chunk.is_zero() {
            tokio::time::sleep(ctx.delay_per_chunk).await;
        }
    }
    let elems = (tensor.data_end - tensor.data_start) / tensor.dtype.size_bytes().max(1) as u64;
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
    if format == OutputFormat::Spz {
        result.record_offset = record_offset;
        result.record_len = writer.bytes - record_offset;
        result.stored_bits_per_weight = per_weight(result.record_len * 8);
        result.record_blake3 = record_hash.finalize().to_hex().to_string();
    }
    if !plan.is_identity() {
        result.set_metrics(&acc.finish());
    }
    if let Some(cut) = &plan.global_cut {
        result.note = format!("global magnitude cut at |w| ~ {:.4e}", cut.threshold());
    }
    Ok(result)
}

/// Spawns a reader that fetches the chunks in order, a few ahead of the consumer.
fn read_ahead(
    model: &StoreLocation,
    tensor: &PlannedTensor,
    ranges: Vec<std::ops::Range<u64>>,
) -> mpsc::Receiver<Result<Bytes, TaskError>> {
    let (sender, receiver) = mpsc::channel(READ_AHEAD);
    let model = model.clone();
    let file = tensor.source_file.clone();
    tokio::spawn(async move {
        for range in ranges {
            let chunk = model.get_range(&file, range).await.map_err(TaskError::from);
            let failed = chunk.is_err();
            if sender.send(chunk).await.is_err() || failed {
                return;
            }
        }
    });
    receiver
}
