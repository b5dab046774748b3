//! One step of a calibrated job's calibration round (see the coordinator's `calibration`
//! module): embed a token batch, gather a layer's input Hessians, solve a Linear with its
//! calibrated method, forward a batch through a layer (original, or as compressed), or
//! compare the original and compressed model's outputs; or, in a mixed-precision job's
//! measuring round, score a Linear's candidate widths by its layer's output. A step reads
//! one layer's weights and one batch's hidden states (a SOLVE: its Linear's statistics of
//! every batch, added to one sum piece by piece), and writes one object (the lease's staged
//! output).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use shardpress_core::calibrated::{
    awq_codes, gptq_codes, gptq_codes_with, has_statistics, sparsegpt, wanda, GptqConfig,
    GptqFactor, HessianAccumulator, HessianInput, SerializedHessian, SparsityTarget,
    SERIALIZED_PIECE_BYTES,
};
use shardpress_core::codec::{encode_chunk, TensorPlan};
use shardpress_core::dtype::decode_to_f32;
use shardpress_core::format::ModelFacts;
use shardpress_core::plan::PlannedTensor;
use shardpress_core::quantize::row_len_of;
use shardpress_core::recipe::{Calibrated, OutputFormat, PassKind, PruneConfig, Recipe};
use shardpress_core::solved::Solved;
use shardpress_model::{eval, Finished, Hidden, Matrix, Model, Weights};
use shardpress_proto::v1::calibrate_task::Step;
use shardpress_proto::v1::{
    CalibrateTask, CalibratedTensor, CompleteTaskRequest, EvalResult, PrecisionCandidate,
    PrecisionCandidates, TaskLease, TensorSlice,
};
use shardpress_store::StoreLocation;

use crate::task::{ShardWriter, TaskContext};
use crate::{cpu, TaskError};

/// Columns per GPTQ / SparseGPT block (the reference implementations' default).
const BLOCK_SIZE: usize = 128;
/// The statistics object's magic.
const STATS_MAGIC: &[u8; 8] = b"SPSTATS1";

/// What every step needs: the model's architecture and the lease's tensors.
struct StepContext {
    model: Arc<Model>,
    recipe: Recipe,
    format: OutputFormat,
    facts: ModelFacts,
    store: StoreLocation,
    out: StoreLocation,
    tensors: Vec<PlannedTensor>,
}

fn bad_lease(message: impl Into<String>) -> TaskError {
    TaskError::BadLease(message.into())
}

fn compute_error(what: &str) -> impl Fn(String) -> TaskError + '_ {
    move |message| TaskError::Compute {
        tensor: what.to_string(),
        message,
    }
}

/// Runs `work` on the compute pool; a panic or an error names `what`.
async fn compute<T, F>(what: &str, work: F) -> Result<T, TaskError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, String> + Send + 'static,
{
    cpu::run(work)
        .await
        .map_err(compute_error(what))?
        .map_err(compute_error(what))
}

/// Executes a calibration step and returns its completion report.
pub async fn calibrate(
    lease: &TaskLease,
    task: &CalibrateTask,
    ctx: &TaskContext,
) -> Result<CompleteTaskRequest, TaskError> {
    let started = Instant::now();
    let work = task
        .work
        .as_ref()
        .ok_or_else(|| bad_lease("the calibration step lists no tensors"))?;
    let names: Vec<&str> = task.model_tensors.iter().map(String::as_str).collect();
    let model = Model::from_config(&task.config_json, &names)
        .map_err(|e| bad_lease(format!("the model's config.json: {e}")))?;
    let format = match work.format.as_str() {
        "" => OutputFormat::Safetensors,
        other => OutputFormat::parse(other)
            .ok_or_else(|| bad_lease(format!("unknown output format {other:?}")))?,
    };
    let step_ctx = StepContext {
        model: Arc::new(model),
        recipe: Recipe::from_yaml(&work.recipe_yaml)?,
        format,
        facts: ModelFacts::from_json(&work.model_facts).map_err(TaskError::BadLease)?,
        store: StoreLocation::open(&lease.model_url)?,
        out: StoreLocation::open(&lease.out_url)?,
        tensors: (work.tensors.iter())
            .map(PlannedTensor::try_from)
            .collect::<Result<Vec<_>, _>>()?,
    };
    let step = Step::try_from(task.step).unwrap_or(Step::Unspecified);
    let mut report = CompleteTaskRequest::default();
    let output = match step {
        Step::Embed => Some(embed(&step_ctx, task, ctx).await?),
        Step::Stats => Some(stats(&step_ctx, task, ctx).await?),
        Step::Solve => {
            let (bytes, solved) = solve(&step_ctx, task, ctx).await?;
            report.calibrated.push(solved);
            Some(bytes)
        }
        Step::Forward => Some(forward(&step_ctx, task, ctx).await?),
        Step::Sensitivity => {
            report
                .precision
                .extend(sensitivity(&step_ctx, task, ctx).await?);
            None
        }
        Step::Eval => {
            report.eval = Some(evaluate(&step_ctx, task, ctx).await?);
            None
        }
        Step::Unspecified => {
            return Err(bad_lease(
                "the calibration step names no kind (a coordinator of another version?)",
            ))
        }
    };
    if ctx.cancelled.load(Ordering::Relaxed) {
        return Err(TaskError::Cancelled("lease lost".into()));
    }
    if let Some(bytes) = output {
        let write_started = Instant::now();
        let mut writer = ShardWriter::open(lease, None, &step_ctx.out, true).await?;
        writer.write(&bytes);
        let written = writer.finish().await?;
        report.output_bytes = written.bytes;
        report.output_blake3 = written.blake3;
        report.upload_parts = written.upload_parts;
        report.write_seconds = write_started.elapsed().as_secs_f64();
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Reads `tensor`'s values as f32 (a 2-D tensor as rows × columns, others as one row).
async fn read_matrix(
    store: &StoreLocation,
    tensor: &PlannedTensor,
    ctx: &TaskContext,
) -> Result<Matrix, TaskError> {
    let bytes = read_bytes(store, tensor, ctx).await?;
    to_matrix(tensor, bytes).await
}

/// Reads `tensor` (FP8 with scales and packed codes decoded) as f32: rows × columns for a
/// 2-D tensor, one row for others.
pub async fn read_f32(store: &StoreLocation, tensor: &PlannedTensor) -> Result<Matrix, TaskError> {
    let bytes = crate::task::read_tensor(store, tensor).await?;
    to_matrix(tensor, bytes).await
}

async fn to_matrix(tensor: &PlannedTensor, bytes: bytes::Bytes) -> Result<Matrix, TaskError> {
    let dtype = tensor.dtype;
    let name = tensor.name.clone();
    let (rows, cols) = matrix_shape(&tensor.shape);
    cpu::run(move || {
        let mut values = vec![0f32; bytes.len() / dtype.size_bytes().max(1)];
        decode_to_f32(dtype, &bytes, &mut values).map_err(|e| e.to_string())?;
        Ok::<_, String>(Matrix {
            rows,
            cols,
            data: values,
        })
    })
    .await
    .map_err(compute_error(&name))?
    .map_err(|reason| TaskError::BadTensor {
        tensor: tensor.name.clone(),
        reason,
    })
}

async fn read_bytes(
    store: &StoreLocation,
    tensor: &PlannedTensor,
    ctx: &TaskContext,
) -> Result<bytes::Bytes, TaskError> {
    if !tensor.dtype.is_decodable_float() {
        return Err(TaskError::BadTensor {
            tensor: tensor.name.clone(),
            reason: format!(
                "calibration reads BF16, F16 or F32 weights (or FP8 and packed codes decoded \
                 to them), not {}",
                tensor.dtype.as_safetensors()
            ),
        });
    }
    let bytes = crate::task::read_tensor(store, tensor).await?;
    ctx.progress
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    // Fault injection for tests (`--debug-delay-per-chunk-ms`): a slow worker.
    tokio::time::sleep(ctx.delay_per_chunk).await;
    Ok(bytes)
}

fn matrix_shape(shape: &[u64]) -> (usize, usize) {
    let cols = row_len_of(shape).max(1) as usize;
    let elements: u64 = shape.iter().product();
    ((elements as usize) / cols, cols)
}

/// The lease's tensors, read as f32.
async fn read_weights(step: &StepContext, ctx: &TaskContext) -> Result<Weights, TaskError> {
    let mut weights = Weights::new();
    for tensor in &step.tensors {
        let matrix = read_matrix(&step.store, tensor, ctx).await?;
        weights.insert(tensor.name.clone(), matrix);
    }
    Ok(weights)
}

async fn read_hidden(step: &StepContext, name: &str) -> Result<Hidden, TaskError> {
    let bytes = step.out.get(name).await?;
    Hidden::from_bytes(&bytes).map_err(|e| TaskError::BadTensor {
        tensor: step.out.describe(name),
        reason: e.to_string(),
    })
}

fn first_input(task: &CalibrateTask) -> Result<&str, TaskError> {
    task.inputs
        .first()
        .map(String::as_str)
        .ok_or_else(|| bad_lease("the step names no input"))
}

async fn embed(
    step: &StepContext,
    task: &CalibrateTask,
    ctx: &TaskContext,
) -> Result<Vec<u8>, TaskError> {
    let weights = match task.compressed {
        true => compressed_weights(step, task, ctx).await?,
        false => read_weights(step, ctx).await?,
    };
    let sequences: Vec<Vec<u32>> = task.sequences.iter().map(|s| s.ids.clone()).collect();
    let model = step.model.clone();
    compute("embeddings", move || {
        model
            .embed(&weights, &sequences)
            .map(|h| h.to_bytes())
            .map_err(|e| e.to_string())
    })
    .await
}

/// The layer's statistics: one Hessian accumulator per Linear group, in group order, after
/// a header (magic, count, each accumulator's length) so a SOLVE step reads only its own.
async fn stats(
    step: &StepContext,
    task: &CalibrateTask,
    ctx: &TaskContext,
) -> Result<Vec<u8>, TaskError> {
    let weights = read_weights(step, ctx).await?;
    let mut hidden = read_hidden(step, first_input(task)?).await?;
    let model = step.model.clone();
    let layer = task.layer as usize;
    let what = format!("layer {layer} statistics");
    compute(&what, move || {
        let groups = model.linear_groups(layer);
        let mut accumulators: Vec<HessianAccumulator> = (groups.iter())
            .map(|g| HessianAccumulator::new(g.in_features))
            .collect();
        let mut failure = None;
        model
            .forward_layer(layer, &weights, &mut hidden, &mut |group, input| {
                let added = match accumulators.get_mut(group) {
                    Some(acc) => acc
                        .add_rows(&input.data, input.cols)
                        .map_err(|e| format!("group {group}: {e}")),
                    None => Err(format!("no Linear group {group} in the layer")),
                };
                if let Err(e) = added {
                    failure.get_or_insert(e);
                }
            })
            .map_err(|e| e.to_string())?;
        if let Some(failure) = failure {
            return Err(failure);
        }
        let parts: Vec<Vec<u8>> = accumulators.iter().map(|a| a.to_bytes()).collect();
        let mut out = Vec::new();
        out.extend_from_slice(STATS_MAGIC);
        out.extend_from_slice(&(parts.len() as u32).to_le_bytes());
        for part in &parts {
            out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        }
        for part in parts {
            out.extend_from_slice(&part);
        }
        Ok(out)
    })
    .await
}

/// Adds accumulator `group` of the statistics object `name` to `sum` (the first one read
/// starts it): two small range reads for the object's and the accumulator's headers, then
/// its values in pieces of [`SERIALIZED_PIECE_BYTES`], each checked as it is added (so the
/// step holds the sum and one piece, never a second triangle).
async fn add_accumulator(
    out: &StoreLocation,
    name: &str,
    group: usize,
    sum: &mut Option<HessianAccumulator>,
) -> Result<(), TaskError> {
    let corrupt = |reason: String| TaskError::BadTensor {
        tensor: out.describe(name),
        reason,
    };
    let head = out.get_range(name, 0..12).await?;
    if &head[..8] != STATS_MAGIC {
        return Err(corrupt("not a statistics object".into()));
    }
    let count = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
    if group >= count {
        return Err(corrupt(format!("{count} groups, group {group} wanted")));
    }
    let lengths = out.get_range(name, 12..12 + 8 * count as u64).await?;
    let lengths: Vec<u64> = lengths
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .collect();
    let overflow = || corrupt("its group lengths overflow".into());
    let start = (lengths[..group].iter())
        .try_fold(12 + 8 * count as u64, |at, &len| at.checked_add(len))
        .ok_or_else(overflow)?;
    let end = start.checked_add(lengths[group]).ok_or_else(overflow)?;
    let size = out.size(name).await?;
    if end > size {
        return Err(corrupt(format!(
            "group {group} ends at byte {end}, the object has {size}"
        )));
    }
    let header_end = (start + SerializedHessian::HEADER_LEN as u64).min(end);
    let header = out.get_range(name, start..header_end).await?;
    let from =
        SerializedHessian::parse(&header, lengths[group]).map_err(|e| corrupt(e.to_string()))?;
    let mut accumulator = match sum.take() {
        Some(accumulator) => accumulator,
        None => HessianAccumulator::new(from.n),
    };
    let (mut at, mut first) = (header_end, 0usize);
    while at < end {
        let piece_end = (at + SERIALIZED_PIECE_BYTES).min(end);
        let bytes = out.get_range(name, at..piece_end).await?;
        let values = bytes.len() / 8;
        let (back, added) = cpu::run(move || {
            let added = accumulator.add_serialized_values(&from, first, &bytes);
            (accumulator, added)
        })
        .await
        .map_err(compute_error(name))?;
        added.map_err(|e| corrupt(e.to_string()))?;
        accumulator = back;
        first += values;
        at = piece_end;
    }
    accumulator
        .add_serialized_rows(&from)
        .map_err(|e| corrupt(e.to_string()))?;
    *sum = Some(accumulator);
    Ok(())
}

async fn solve(
    step: &StepContext,
    task: &CalibrateTask,
    ctx: &TaskContext,
) -> Result<(Vec<u8>, CalibratedTensor), TaskError> {
    let started = Instant::now();
    let tensor = step
        .tensors
        .first()
        .ok_or_else(|| bad_lease("a solve step names no weight"))?;
    let hessian = summed_hessian(step, task, |_| true).await?;
    let plan = TensorPlan::for_output(
        &step.recipe,
        step.format,
        &step.facts,
        &tensor.name,
        tensor.dtype,
        &tensor.shape,
    )
    .map_err(|e| bad_lease(e.to_string()))?;
    let method = plan
        .calibrated
        .ok_or_else(|| bad_lease(format!("the recipe calibrates no pass of {}", tensor.name)))?;
    let weight = read_matrix(&step.store, tensor, ctx).await?;
    let described_plan = plan.clone();
    let name = tensor.name.clone();
    let rows_seen = hessian.rows_seen();
    // By value: GPTQ and SparseGPT factor the accumulator's triangle in place.
    let (solved, stats) = cpu::run(move || solve_matrix(&plan, method, &weight, hessian.into()))
        .await
        .map_err(compute_error(&name))?
        .map_err(|message| TaskError::Compute {
            tensor: name.clone(),
            message,
        })?;
    let described = {
        let mut plan = described_plan;
        plan.fixed_values = Some(shardpress_core::stream::FixedValues::Solved {
            solved: Arc::new(solved.clone()),
            first_row: 0,
        });
        plan.describe()
    };
    Ok((
        solved.to_bytes(),
        CalibratedTensor {
            name: tensor.name.clone(),
            method: described,
            proxy_loss: stats.proxy_loss,
            baseline_proxy_loss: stats.rtn_proxy_loss,
            rows_seen,
            dead_columns: stats.dead_columns as u32,
            seconds: started.elapsed().as_secs_f64(),
        },
    ))
}

/// The Hessian of the step's Linear group: the statistics of the batches `batches` keeps,
/// summed in batch order.
async fn summed_hessian(
    step: &StepContext,
    task: &CalibrateTask,
    batches: impl Fn(usize) -> bool,
) -> Result<HessianAccumulator, TaskError> {
    let mut hessian: Option<HessianAccumulator> = None;
    for (_, name) in task.inputs.iter().enumerate().filter(|(b, _)| batches(*b)) {
        add_accumulator(&step.out, name, task.group as usize, &mut hessian).await?;
    }
    hessian.ok_or_else(|| bad_lease("the step names no statistics"))
}

/// Scores each candidate width of one Linear (a SENSITIVITY step of mixed precision): per
/// width, the tensor as the output would store it (the recipe's calibrated method fitted at
/// that width on the step's statistics, or its data-free pass), its stored bits per weight,
/// and the relative squared error `‖Y_w − Y‖² / ‖Y‖²` it causes in the output `Y` of its
/// layer on a held-out batch of the layer's inputs, the rest of the layer as the original.
/// The layer's output, not the Linear's: an error in a query or key is damped by the
/// softmax, one in the MLP's input goes through its activation, and the layer's output is
/// what the next layer reads. `None` when no calibration input reached the Linear (an
/// expert no token was routed to): its weight error, from the measuring tasks, then decides.
async fn sensitivity(
    step: &StepContext,
    task: &CalibrateTask,
    ctx: &TaskContext,
) -> Result<Option<PrecisionCandidates>, TaskError> {
    let tensor = step
        .tensors
        .first()
        .ok_or_else(|| bad_lease("a sensitivity step names no weight"))?;
    let widths = (step.recipe.mixed_precision.as_ref())
        .map(|m| m.candidates_for(step.format))
        .ok_or_else(|| bad_lease("a sensitivity step for a recipe with no mixed_precision"))?;
    if task.scored_on.is_empty() {
        return Err(bad_lease("a sensitivity step names no held-out batch"));
    }
    // Fitted on every batch but the held-out one (batch 0), unless it is the only one.
    let hessian = summed_hessian(step, task, |b| b > 0 || task.inputs.len() == 1).await?;
    if !has_statistics(&hessian) {
        return Ok(None);
    }
    let described = (tensor.name.as_str(), tensor.dtype, &tensor.shape[..]);
    let plans = (widths.iter())
        .map(|&width| {
            TensorPlan::for_output_at(
                &step.recipe,
                step.format,
                &step.facts,
                described,
                Some(width),
            )
            .map(|plan| (width, plan))
            .map_err(|e| bad_lease(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = read_bytes(&step.store, tensor, ctx).await?;
    let weight = to_matrix(tensor, bytes.clone()).await?;
    let mut weights = Weights::new();
    for other in &step.tensors[1..] {
        let matrix = read_matrix(&step.store, other, ctx).await?;
        weights.insert(other.name.clone(), matrix);
    }
    let hidden = read_hidden(step, &task.scored_on).await?;
    let (dtype, name, params) = (tensor.dtype, tensor.name.clone(), weight.data.len());
    let (model, layer) = (step.model.clone(), task.layer as usize);
    compute(&tensor.name, move || {
        let (rows, cols) = (weight.rows, weight.cols);
        let forward = |weights: &Weights| {
            let mut out = hidden.clone();
            (model.forward_layer(layer, weights, &mut out, &mut |_, _| {}))
                .map(|()| out.sequences)
                .map_err(|e| e.to_string())
        };
        weights.insert(name.clone(), weight.clone());
        let original = forward(&weights)?;
        let energy: f64 = (original.iter().flat_map(|m| &m.data))
            .map(|&v| f64::from(v) * f64::from(v))
            .sum();
        if energy == 0.0 {
            return Ok(None);
        }
        let mut candidates = Vec::with_capacity(plans.len());
        // GPTQ's inverse-Hessian factor does not depend on the width: computed once, in
        // place of the accumulator (which only the other methods read afterwards).
        let mut gptq_factor: Option<GptqFactor> = None;
        let mut hessian = Some(hessian);
        let consumed = || "the Hessian went into GPTQ's factor".to_string();
        for (width, mut plan) in plans {
            if let Some(method) = plan.calibrated {
                let solved = match (method, &plan.values) {
                    (
                        Calibrated::Gptq {
                            dampening,
                            act_order,
                        },
                        Some(PassKind::Quantize(quant)),
                    ) => {
                        let factor = match gptq_factor.take() {
                            Some(factor) => factor,
                            None => GptqFactor::new(
                                hessian.take().ok_or_else(consumed)?,
                                dampening,
                                act_order,
                            )
                            .map_err(|e| e.to_string())?,
                        };
                        let cfg = GptqConfig {
                            quant: *quant,
                            dampening,
                            act_order,
                            block_size: BLOCK_SIZE,
                        };
                        let codes = gptq_codes_with(&cfg, &factor, &weight.data, cols)
                            .map_err(|e| e.to_string())?;
                        gptq_factor = Some(factor);
                        Solved::Codes(codes)
                    }
                    _ => {
                        let borrowed = hessian.as_ref().ok_or_else(consumed)?;
                        solve_matrix(&plan, method, &weight, borrowed.into())?.0
                    }
                };
                plan.fixed_values = Some(shardpress_core::stream::FixedValues::Solved {
                    solved: Arc::new(solved),
                    first_row: 0,
                });
            }
            let chunk = encode_chunk(&plan, dtype, cols, &bytes).map_err(|e| e.to_string())?;
            let mut stored = vec![0f32; params];
            decode_to_f32(dtype, &chunk.reconstruction, &mut stored).map_err(|e| e.to_string())?;
            let data = stored;
            weights.insert(name.clone(), Matrix { rows, cols, data });
            let output = forward(&weights)?;
            let error: f64 = (output.iter().zip(&original))
                .flat_map(|(a, b)| a.data.iter().zip(&b.data))
                .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                .sum();
            candidates.push(PrecisionCandidate {
                bits: u32::from(width.bits),
                granularity: width.granularity_suffix(),
                bits_per_weight: chunk.repr_bits as f64 / params.max(1) as f64,
                rel_error_sq: error / energy,
            });
        }
        Ok(Some(PrecisionCandidates {
            name,
            params: params as u64,
            candidates,
            calibration_weighted: true,
        }))
    })
    .await
}

/// Runs `method` on one Linear's weight.
fn solve_matrix(
    plan: &TensorPlan,
    method: Calibrated,
    weight: &Matrix,
    hessian: HessianInput<'_>,
) -> Result<(Solved, shardpress_core::calibrated::MethodStats), String> {
    let cols = weight.cols;
    let target = || match plan.structure {
        Some(PruneConfig::NOfM { n, m }) => Ok(SparsityTarget::NOfM { n, m }),
        Some(PruneConfig::Magnitude { sparsity, .. }) => Ok(SparsityTarget::Unstructured(sparsity)),
        other => Err(format!("{} cannot prune {other:?}", method.name())),
    };
    let dense = |(values, stats)| {
        (
            Solved::Dense {
                rows: weight.rows,
                row_len: cols,
                values,
            },
            stats,
        )
    };
    match (method, &plan.values) {
        (
            Calibrated::Gptq {
                dampening,
                act_order,
            },
            Some(PassKind::Quantize(quant)),
        ) => {
            let cfg = GptqConfig {
                quant: *quant,
                dampening,
                act_order,
                block_size: BLOCK_SIZE,
            };
            gptq_codes(&cfg, &weight.data, cols, hessian)
                .map(|(codes, stats)| (Solved::Codes(codes), stats))
                .map_err(|e| e.to_string())
        }
        (Calibrated::Awq, Some(PassKind::Quantize(quant))) => {
            awq_codes(quant, &weight.data, cols, hessian.get())
                .map(|(codes, stats)| (Solved::Codes(codes), stats))
                .map_err(|e| e.to_string())
        }
        (Calibrated::SparseGpt { dampening }, _) => sparsegpt(
            target()?,
            dampening,
            BLOCK_SIZE,
            &weight.data,
            cols,
            hessian,
        )
        .map(dense)
        .map_err(|e| e.to_string()),
        (Calibrated::Wanda, _) => wanda(target()?, &weight.data, cols, hessian.get())
            .map(dense)
            .map_err(|e| e.to_string()),
        (method, values) => Err(format!(
            "{} cannot store its result in {:?}",
            method.name(),
            values.as_ref().map(PassKind::describe)
        )),
    }
}

/// The layer's weights as the compressed output holds them: each calibrated tensor's
/// result, and each other targeted tensor through its data-free pass.
async fn compressed_weights(
    step: &StepContext,
    task: &CalibrateTask,
    ctx: &TaskContext,
) -> Result<Weights, TaskError> {
    let mut weights = Weights::new();
    for tensor in &step.tensors {
        let (rows, cols) = matrix_shape(&tensor.shape);
        if let Some(object) = task.solved.get(&tensor.name) {
            let bytes = step.out.get(object).await?;
            let solved = Solved::from_bytes(&bytes).map_err(|e| TaskError::BadTensor {
                tensor: step.out.describe(object),
                reason: e.to_string(),
            })?;
            // As the output holds them: in the tensor's dtype (a BF16 model's dequantized
            // weights are BF16 on disk, and BF16 where it is served).
            let mut data = solved.weights();
            let mut bytes = vec![0u8; data.len() * tensor.dtype.size_bytes()];
            shardpress_core::dtype::encode_from_f32(tensor.dtype, &data, &mut bytes)
                .and_then(|()| decode_to_f32(tensor.dtype, &bytes, &mut data))
                .map_err(|e| TaskError::BadTensor {
                    tensor: tensor.name.clone(),
                    reason: e.to_string(),
                })?;
            if data.len() != rows * cols {
                return Err(TaskError::BadTensor {
                    tensor: step.out.describe(object),
                    reason: format!("{} values for {rows} x {cols}", data.len()),
                });
            }
            weights.insert(tensor.name.clone(), Matrix { rows, cols, data });
            continue;
        }
        let plan = TensorPlan::for_output(
            &step.recipe,
            step.format,
            &step.facts,
            &tensor.name,
            tensor.dtype,
            &tensor.shape,
        )
        .map_err(|e| bad_lease(e.to_string()))?;
        if plan.is_identity() {
            weights.insert(
                tensor.name.clone(),
                read_matrix(&step.store, tensor, ctx).await?,
            );
            continue;
        }
        let bytes = read_bytes(&step.store, tensor, ctx).await?;
        let (dtype, name) = (tensor.dtype, tensor.name.clone());
        let data = cpu::run_codec(&tensor.name, move || {
            let chunk = encode_chunk(&plan, dtype, cols, &bytes)?;
            let mut values = vec![0f32; chunk.reconstruction.len() / dtype.size_bytes()];
            decode_to_f32(dtype, &chunk.reconstruction, &mut values)?;
            Ok(values)
        })
        .await?;
        weights.insert(name, Matrix { rows, cols, data });
    }
    Ok(weights)
}

async fn forward(
    step: &StepContext,
    task: &CalibrateTask,
    ctx: &TaskContext,
) -> Result<Vec<u8>, TaskError> {
    let weights = match task.compressed {
        true => compressed_weights(step, task, ctx).await?,
        false => read_weights(step, ctx).await?,
    };
    let mut hidden = read_hidden(step, first_input(task)?).await?;
    let model = step.model.clone();
    let layer = task.layer as usize;
    let what = format!("layer {layer} forward");
    compute(&what, move || {
        model
            .forward_layer(layer, &weights, &mut hidden, &mut |_, _| {})
            .map(|()| hidden.to_bytes())
            .map_err(|e| e.to_string())
    })
    .await
}

/// Compares the final states of the original and of the compressed model.
async fn evaluate(
    step: &StepContext,
    task: &CalibrateTask,
    ctx: &TaskContext,
) -> Result<EvalResult, TaskError> {
    let [original, compressed] = &task.inputs[..] else {
        return Err(bad_lease("an eval step reads two final states"));
    };
    let weights = read_weights(step, ctx).await?;
    // The compressed model's head as the output stores it.
    let stored = match task.compressed {
        true => Some(compressed_weights(step, task, ctx).await?),
        false => None,
    };
    let original = read_hidden(step, original).await?;
    let compressed = read_hidden(step, compressed).await?;
    let model = step.model.clone();
    let sequences: Vec<Vec<u32>> = task.sequences.iter().map(|s| s.ids.clone()).collect();
    compute("evaluation", move || {
        let a = model
            .finish(&weights, &original)
            .map_err(|e| e.to_string())?;
        let b = model
            .finish(stored.as_ref().unwrap_or(&weights), &compressed)
            .map_err(|e| e.to_string())?;
        compare(a, b, &sequences)
    })
    .await
}

/// The comparison of two models' outputs on the same sequences.
pub fn compare(
    original: Finished,
    compressed: Finished,
    sequences: &[Vec<u32>],
) -> Result<EvalResult, String> {
    let mut result = EvalResult::default();
    match (original, compressed) {
        (Finished::Embeddings(a), Finished::Embeddings(b)) if a.len() == b.len() => {
            result.cosines = a.iter().zip(&b).map(|(x, y)| eval::cosine(x, y)).collect();
        }
        (Finished::Logits(a), Finished::Logits(b))
            if a.len() == b.len() && a.len() == sequences.len() =>
        {
            for ((p, q), ids) in a.iter().zip(&b).zip(sequences) {
                if p.rows != q.rows || p.cols != q.cols || p.rows != ids.len() {
                    return Err(format!(
                        "logits of {} x {} and {} x {} for {} tokens",
                        p.rows,
                        p.cols,
                        q.rows,
                        q.cols,
                        ids.len()
                    ));
                }
                // Position t predicts token t + 1.
                for t in 0..p.rows.saturating_sub(1) {
                    let (row_p, row_q) = (
                        &p.data[t * p.cols..(t + 1) * p.cols],
                        &q.data[t * q.cols..(t + 1) * q.cols],
                    );
                    let next = ids[t + 1] as usize;
                    result.tokens += 1;
                    result.kld_sum += eval::kl_divergence(row_p, row_q);
                    result.top1_agree += u64::from(eval::argmax(row_p) == eval::argmax(row_q));
                    result.nll_original -= eval::log_prob(row_p, next);
                    result.nll_compressed -= eval::log_prob(row_q, next);
                }
            }
        }
        _ => return Err("the two models' outputs differ in kind or count".into()),
    }
    Ok(result)
}

/// Puts each tensor's calibrated result (named by its lease slice) in its plan, checked
/// against the tensor and its pass.
pub(crate) async fn attach_solved(
    out: &StoreLocation,
    slices: &[TensorSlice],
    tensors: &[PlannedTensor],
    plans: &mut [TensorPlan],
) -> Result<(), TaskError> {
    let mut cache: HashMap<&str, Arc<Solved>> = HashMap::new();
    for ((slice, tensor), plan) in slices.iter().zip(tensors).zip(plans.iter_mut()) {
        if slice.solved.is_empty() {
            continue;
        }
        let solved = match cache.get(slice.solved.as_str()) {
            Some(solved) => solved.clone(),
            None => {
                let bytes = out.get(&slice.solved).await?;
                let solved = Solved::from_bytes(&bytes).map_err(|e| TaskError::BadTensor {
                    tensor: out.describe(&slice.solved),
                    reason: e.to_string(),
                })?;
                let solved = Arc::new(solved);
                cache.insert(&slice.solved, solved.clone());
                solved
            }
        };
        let quant = match &plan.values {
            Some(PassKind::Quantize(q)) if !plan.calibrated.is_some_and(|c| c.prunes()) => Some(q),
            _ => None,
        };
        solved
            .check_fits(&tensor.shape, quant)
            .map_err(|e| TaskError::BadTensor {
                tensor: tensor.name.clone(),
                reason: e.to_string(),
            })?;
        plan.fixed_values = Some(shardpress_core::stream::FixedValues::Solved {
            solved,
            first_row: 0,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statistics object of `parts` as `stats` writes it.
    fn stats_object(parts: &[Vec<u8>]) -> Vec<u8> {
        let mut out = STATS_MAGIC.to_vec();
        out.extend_from_slice(&(parts.len() as u32).to_le_bytes());
        for part in parts {
            out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        }
        for part in parts {
            out.extend_from_slice(part);
        }
        out
    }

    #[tokio::test]
    async fn a_corrupt_statistics_object_is_refused_naming_it() {
        let out = StoreLocation::open("memory:///stats-test").unwrap();
        let mut accumulator = HessianAccumulator::new(4);
        accumulator
            .add_rows(&[1.0, 2.0, 3.0, 4.0, 0.5, 0.25, 0.0, 1.0], 4)
            .unwrap();
        let good = accumulator.to_bytes();
        out.put("good", stats_object(std::slice::from_ref(&good)).into())
            .await
            .unwrap();
        // Read twice into one sum: the accumulator added to itself.
        let mut sum = None;
        add_accumulator(&out, "good", 0, &mut sum).await.unwrap();
        assert_eq!(sum.as_ref().unwrap().to_bytes(), good);
        add_accumulator(&out, "good", 0, &mut sum).await.unwrap();
        let mut twice = accumulator.clone();
        twice.merge(&accumulator).unwrap();
        assert_eq!(sum.unwrap(), twice);

        let mut huge = stats_object(&[good.clone(), good.clone()]);
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut long = stats_object(std::slice::from_ref(&good));
        long[12..20].copy_from_slice(&(good.len() as u64 + 1).to_le_bytes());
        let cases: [(&str, Vec<u8>, usize, &str); 5] = [
            (
                "magic",
                b"NOTSTATSxxxx".to_vec(),
                0,
                "not a statistics object",
            ),
            (
                "group",
                stats_object(std::slice::from_ref(&good)),
                1,
                "1 groups, group 1 wanted",
            ),
            ("overflow", huge, 1, "overflow"),
            ("long", long, 0, "the object has"),
            (
                "garbage",
                stats_object(&[vec![7u8; 40]]),
                0,
                "bad Hessian bytes",
            ),
        ];
        for (name, bytes, group, reason) in cases {
            out.put(name, bytes.into()).await.unwrap();
            let err = add_accumulator(&out, name, group, &mut None)
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains(name) && err.contains(reason), "{name}: {err}");
        }
    }
}
