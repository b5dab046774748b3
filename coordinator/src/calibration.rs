//! The calibration round of a calibrated job (GPTQ, AWQ, SparseGPT, Wanda) and the
//! function-space evaluation of any job: a graph of steps, leased to workers like any task,
//! whose data (hidden states, Hessians, calibrated weights) goes through the object store
//! under `OUT/.shardpress/calib/`, never through the coordinator.
//!
//! Calibration samples are tokenized here, at submission, and cut into batches of
//! [`BATCH_SEQUENCES`] (a fixed size, so the result does not depend on how many workers
//! run it). Per layer `k` that holds a calibrated Linear:
//!
//! - **STATS(k, b)**: batch `b`'s hidden states through layer `k`; each group of Linears
//!   reading the same input (q/k/v, gate/up) gets the Hessian `XᵀX` of that input;
//! - **SOLVE(k, t)**: for each calibrated Linear `t`, the batches' Hessians of its group
//!   summed in batch order, then the recipe's method on its weight;
//! - **FORWARD(k, b)**: batch `b` through layer `k` *as compressed* (its solved weights, and
//!   the data-free passes' reconstruction of the rest), giving layer `k+1`'s inputs.
//!
//! Each step depends only on the steps whose objects it reads, so the batches of layer
//! `k+1` start as soon as their own inputs exist. With an evaluation set, its batches go
//! through the model twice, the original and as the output stores it (embeddings, every layer
//! and the head as compressed), and EVAL compares the two outputs.
//!
//! Mixed precision with calibration data adds steps to the job's *measuring* round
//! ([`plan_sensitivity`]): the calibration batches through the original layers (EMBED, STATS,
//! FORWARD), and per Linear a SENSITIVITY step that scores each candidate width by the error
//! it causes in its layer's output on a held-out batch, so the widths are chosen before the
//! calibration round fits anything. The compressing round then stores each calibrated tensor's result exactly.

use std::collections::HashMap;

use serde::Serialize;
use shardpress_core::calibrated::{solve_memory_bytes, SERIALIZED_PIECE_BYTES};
use shardpress_core::codec::TensorPlan;
use shardpress_core::format::ModelFacts;
use shardpress_core::plan::{PlannedTask, PlannedTensor, SourceFile};
use shardpress_core::recipe::{OutputFormat, PrecisionScore, Recipe};
use shardpress_model::{Model, ModelKind, Tokenizer};
use shardpress_proto::v1::{CalibratedTensor, CompleteTaskRequest, SubmitJobRequest};
use shardpress_store::StoreLocation;

use crate::CoordinatorError;

/// Where the round's objects live in the output location (removed when the job ends).
pub const CALIB_DIR: &str = ".shardpress/calib";
/// Calibration samples used when the submission does not say.
pub const DEFAULT_SAMPLES: u32 = 128;
/// Tokens per sample at most, when the submission does not say.
pub const DEFAULT_SEQ_LEN: u32 = 512;
/// Evaluation samples used when the submission does not say.
pub const DEFAULT_EVAL_SAMPLES: u32 = 256;
/// Sequences per batch: each step holds one batch's hidden states.
pub const BATCH_SEQUENCES: usize = 16;

/// What a step does (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    Embed,
    Stats,
    Solve,
    Forward,
    Eval,
    Sensitivity,
}

/// One step of the round: a task of the job.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibStep {
    pub kind: StepKind,
    pub layer: u32,
    /// SOLVE: the Linear group whose Hessian it sums.
    pub group: u32,
    /// Objects under the output location the step reads.
    pub inputs: Vec<String>,
    /// The object it writes (empty for EVAL).
    pub output: String,
    /// Model tensors it reads.
    pub tensors: Vec<String>,
    /// EMBED: the batch's token ids.
    pub sequences: Vec<Vec<u32>>,
    /// FORWARD: through the layer as compressed.
    pub compressed: bool,
    /// FORWARD (compressed): the layer's calibrated tensors and their results' objects.
    pub solved: Vec<(String, String)>,
    /// SENSITIVITY: the held-out hidden states its widths are scored on.
    pub scored_on: String,
    /// Steps (indexes) whose output this one reads.
    pub deps: Vec<u32>,
}

impl CalibStep {
    /// How the status page and report name the step, e.g. `"stats layer 3 batch 2"`.
    pub fn label(&self) -> String {
        match self.kind {
            StepKind::Embed => format!("embed {}", self.output_tail()),
            StepKind::Stats => format!("stats layer {} {}", self.layer, self.input_tail()),
            StepKind::Solve => format!("solve {}", self.tensors.join(", ")),
            StepKind::Forward => format!(
                "forward layer {} {}{}",
                self.layer,
                self.input_tail(),
                if self.compressed { " (compressed)" } else { "" }
            ),
            StepKind::Eval => format!("eval {}", self.input_tail()),
            StepKind::Sensitivity => {
                format!(
                    "sensitivity {}",
                    self.tensors.first().map_or("", String::as_str)
                )
            }
        }
    }

    fn output_tail(&self) -> &str {
        self.output.rsplit('-').next().unwrap_or_default()
    }

    fn input_tail(&self) -> &str {
        let first = self.inputs.first().map(String::as_str).unwrap_or_default();
        first.rsplit('-').next().unwrap_or_default()
    }
}

/// The forward-relevant tensors of a model, per layer (from the model crate).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelLayout {
    pub embedding: Vec<String>,
    pub layers: Vec<LayerLayout>,
    pub head: Vec<String>,
}

/// One transformer block.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerLayout {
    /// Every tensor the block's forward reads.
    pub tensors: Vec<String>,
    /// Its Linears, grouped by the input they read, in forward order.
    pub groups: Vec<Vec<String>>,
}

impl ModelLayout {
    pub fn of(model: &Model) -> ModelLayout {
        ModelLayout {
            embedding: model.embedding_tensors(),
            layers: (0..model.layers())
                .map(|k| LayerLayout {
                    tensors: model.layer_tensors(k),
                    groups: (model.linear_groups(k).into_iter())
                        .map(|g| g.weights)
                        .collect(),
                })
                .collect(),
            head: model.head_tensors(),
        }
    }

    fn all_tensors(&self) -> Vec<String> {
        let layers = self.layers.iter().flat_map(|l| l.tensors.iter());
        let mut names: Vec<String> = (self.embedding.iter().chain(layers))
            .chain(&self.head)
            .cloned()
            .collect();
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(n.clone()));
        names
    }
}

/// The round's plan: its steps, and where each calibrated tensor's result is written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    pub steps: Vec<CalibStep>,
    /// Calibrated tensor -> the object holding its result.
    pub solved: HashMap<String, String>,
}

fn hidden_name(stream: char, layer: usize, batch: usize) -> String {
    format!("{CALIB_DIR}/h/{stream}{layer:03}-b{batch:04}")
}

/// How [`plan_layers`] passes the calibration batches through the layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayerPass {
    /// The calibration round: SOLVE each Linear, forward through the layer as compressed.
    Calibrate,
    /// The measuring round of mixed precision: score each Linear's candidate widths
    /// (SENSITIVITY), forward through the original layer.
    Sensitivity,
}

/// Plans the round (pure). `calibrated` says which Linears the recipe calibrates; with no
/// calibration batches only the evaluation runs (a data-free recipe evaluated), with no
/// evaluation batches only the calibration.
pub fn plan_steps(
    layout: &ModelLayout,
    calibrated: &dyn Fn(&str) -> bool,
    calibration: &[Vec<Vec<u32>>],
    evaluation: &[Vec<Vec<u32>>],
) -> StepPlan {
    let mut plan = StepPlan::default();
    let (solves, solved_of) = plan_layers(
        &mut plan,
        layout,
        calibrated,
        calibration,
        LayerPass::Calibrate,
    );
    let push = |plan: &mut StepPlan, step: CalibStep| -> u32 {
        plan.steps.push(step);
        plan.steps.len() as u32 - 1
    };
    let base = base_step;
    for (e, batch) in evaluation.iter().enumerate() {
        let mut finals = Vec::new();
        let mut deps = Vec::new();
        // The original model, and the model as the output stores it (its embeddings, every
        // layer and its head as compressed).
        for (stream, compressed) in [('o', false), ('q', true)] {
            let output = hidden_name(stream, 0, e);
            let step = CalibStep {
                output: output.clone(),
                tensors: layout.embedding.clone(),
                sequences: batch.clone(),
                compressed,
                ..base(StepKind::Embed, 0)
            };
            let (mut producer, mut input) = (push(&mut plan, step), output);
            for (k, layer) in layout.layers.iter().enumerate() {
                let next = hidden_name(stream, k + 1, e);
                let solved = compressed.then(|| (&solves[k][..], &solved_of[k][..]));
                let step = forward_step(k, layer, (producer, &input), &next, solved);
                producer = push(&mut plan, step);
                input = next;
            }
            finals.push(input);
            deps.push(producer);
        }
        let step = CalibStep {
            inputs: finals,
            tensors: layout.head.clone(),
            sequences: batch.clone(),
            compressed: true,
            deps,
            ..base(StepKind::Eval, layout.layers.len())
        };
        push(&mut plan, step);
    }
    plan
}

/// A layer's SOLVE steps and their results' objects (tensor, object).
type LayerSolved<'a> = (&'a [u32], &'a [(String, String)]);

/// FORWARD of layer `k` from `input` (written by step `producer`) to `output`: through the
/// original layer, or, given the layer's SOLVE steps and their results' objects, as
/// compressed (after those steps).
fn forward_step(
    k: usize,
    layer: &LayerLayout,
    (producer, input): (u32, &str),
    output: &str,
    solved: Option<LayerSolved<'_>>,
) -> CalibStep {
    let step = CalibStep {
        inputs: vec![input.to_string()],
        output: output.to_string(),
        tensors: layer.tensors.clone(),
        deps: vec![producer],
        ..base_step(StepKind::Forward, k)
    };
    match solved {
        None => step,
        Some((solves, solved)) => CalibStep {
            compressed: true,
            solved: solved.to_vec(),
            deps: [&step.deps[..], solves].concat(),
            ..step
        },
    }
}

/// Plans the sensitivity steps of mixed precision with calibration data (pure): the
/// calibration batches through the *original* layers, and per Linear that `measured` names
/// one SENSITIVITY step reading its layer's statistics. They run in the measuring round, so
/// the widths are chosen on what the Linears' inputs really are before anything is solved.
pub fn plan_sensitivity(
    layout: &ModelLayout,
    measured: &dyn Fn(&str) -> bool,
    calibration: &[Vec<Vec<u32>>],
) -> StepPlan {
    let mut plan = StepPlan::default();
    plan_layers(
        &mut plan,
        layout,
        measured,
        calibration,
        LayerPass::Sensitivity,
    );
    plan
}

fn base_step(kind: StepKind, layer: usize) -> CalibStep {
    CalibStep {
        kind,
        layer: layer as u32,
        group: 0,
        inputs: Vec::new(),
        output: String::new(),
        tensors: Vec::new(),
        sequences: Vec::new(),
        compressed: false,
        solved: Vec::new(),
        scored_on: String::new(),
        deps: Vec::new(),
    }
}

/// Per layer: the SOLVE steps a compressed forward of it waits for, and its calibrated
/// tensors with their results' objects.
type LayerSolves = (Vec<Vec<u32>>, Vec<Vec<(String, String)>>);

/// Appends to `plan` the calibration batches' way through the layers up to the last one
/// holding a Linear that `picked` names: EMBED, then per layer STATS, one step per picked
/// Linear, and FORWARD to the next layer (see [`LayerPass`]).
fn plan_layers(
    plan: &mut StepPlan,
    layout: &ModelLayout,
    picked: &dyn Fn(&str) -> bool,
    calibration: &[Vec<Vec<u32>>],
    pass: LayerPass,
) -> LayerSolves {
    let push = |plan: &mut StepPlan, step: CalibStep| -> u32 {
        plan.steps.push(step);
        plan.steps.len() as u32 - 1
    };
    let base = base_step;
    let (stream, stats_dir) = match pass {
        LayerPass::Calibrate => ('c', "s"),
        LayerPass::Sensitivity => ('m', "ms"),
    };
    let picked_groups = |layer: &LayerLayout| -> Vec<(usize, Vec<String>)> {
        (layer.groups.iter().enumerate())
            .map(|(i, g)| (i, g.iter().filter(|t| picked(t)).cloned().collect()))
            .filter(|(_, g): &(usize, Vec<String>)| !g.is_empty())
            .collect()
    };
    let last = (layout.layers.iter()).rposition(|l| !picked_groups(l).is_empty());
    let mut solves: Vec<Vec<u32>> = vec![Vec::new(); layout.layers.len()];
    let mut solved_of: Vec<Vec<(String, String)>> = vec![Vec::new(); layout.layers.len()];
    let (Some(last), false) = (last, calibration.is_empty()) else {
        return (solves, solved_of);
    };
    let mut producers: Vec<(u32, String)> = Vec::new();
    for (b, batch) in calibration.iter().enumerate() {
        let output = hidden_name(stream, 0, b);
        let step = CalibStep {
            output: output.clone(),
            tensors: layout.embedding.clone(),
            sequences: batch.clone(),
            ..base(StepKind::Embed, 0)
        };
        producers.push((push(plan, step), output));
    }
    for (k, layer) in layout.layers.iter().enumerate().take(last + 1) {
        let groups = picked_groups(layer);
        if !groups.is_empty() {
            let mut stats = Vec::new();
            for (b, (producer, input)) in producers.iter().enumerate() {
                let step = CalibStep {
                    inputs: vec![input.clone()],
                    output: format!("{CALIB_DIR}/{stats_dir}/{k:03}-b{b:04}"),
                    tensors: layer.tensors.clone(),
                    deps: vec![*producer],
                    ..base(StepKind::Stats, k)
                };
                stats.push(push(plan, step));
            }
            let stats_objects: Vec<String> = (stats.iter())
                .map(|&s| plan.steps[s as usize].output.clone())
                .collect();
            for (group, tensors) in groups {
                for tensor in tensors {
                    let step = CalibStep {
                        group: group as u32,
                        inputs: stats_objects.clone(),
                        tensors: vec![tensor.clone()],
                        deps: stats.clone(),
                        ..base(StepKind::Solve, k)
                    };
                    if pass == LayerPass::Sensitivity {
                        // Scored on batch 0's inputs to the layer, fitted on the others.
                        let (producer, held_out) = &producers[0];
                        let rest = layer.tensors.iter().filter(|t| **t != tensor);
                        let step = CalibStep {
                            kind: StepKind::Sensitivity,
                            tensors: [vec![tensor.clone()], rest.cloned().collect()].concat(),
                            scored_on: held_out.clone(),
                            deps: [stats.clone(), vec![*producer]].concat(),
                            ..step
                        };
                        push(plan, step);
                        continue;
                    }
                    let output = format!("{CALIB_DIR}/w/{tensor}");
                    let step = CalibStep {
                        output: output.clone(),
                        ..step
                    };
                    solves[k].push(push(plan, step));
                    solved_of[k].push((tensor.clone(), output.clone()));
                    plan.solved.insert(tensor, output);
                }
            }
        }
        if k == last {
            break;
        }
        for (b, (producer, input)) in producers.iter_mut().enumerate() {
            let output = hidden_name(stream, k + 1, b);
            let solved =
                (pass == LayerPass::Calibrate).then(|| (&solves[k][..], &solved_of[k][..]));
            let step = forward_step(k, layer, (*producer, input), &output, solved);
            *producer = push(plan, step);
            *input = output;
        }
    }
    (solves, solved_of)
}

/// What the submission asked for, as the journal records it (so a resumed job reads the
/// same data).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct CalibrationRequest {
    pub calibration_url: String,
    pub calibration_samples: u32,
    pub calibration_seq_len: u32,
    pub eval_url: String,
    pub eval_samples: u32,
}

impl CalibrationRequest {
    pub fn of(request: &SubmitJobRequest) -> Self {
        CalibrationRequest {
            calibration_url: request.calibration_url.clone(),
            calibration_samples: request.calibration_samples,
            calibration_seq_len: request.calibration_seq_len,
            eval_url: request.eval_url.clone(),
            eval_samples: request.eval_samples,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.calibration_url.is_empty() && self.eval_url.is_empty()
    }
}

/// A calibrated (or evaluated) job's round, kept in its spec.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub request: CalibrationRequest,
    pub config_json: String,
    /// The forward tensors of the model (sent with each step to resolve their naming).
    pub model_tensors: Vec<String>,
    pub kind: ModelKind,
    pub plan: StepPlan,
    /// Mixed precision with calibration data: the measuring round's steps that score each
    /// Linear's candidate widths on its calibration inputs (run after the data-free
    /// measuring tasks, numbered on from them).
    pub sensitivity: StepPlan,
    /// Every model tensor the steps read, by name.
    pub tensors: HashMap<String, PlannedTensor>,
    /// The compressing round's tasks, run once the round is over.
    pub compress_plan: Vec<PlannedTask>,
    pub calibration_samples: usize,
    pub calibration_tokens: u64,
    pub eval_samples: usize,
    pub eval_tokens: u64,
    /// Targeted by a calibrated method but compressed data-free, and why.
    pub not_calibrated: Vec<(String, String)>,
    /// BLAKE3 of the token batches: another calibration set is another job.
    pub digest: String,
}

impl Calibration {
    /// The round's steps as the job's tasks: each with the model tensors it reads and the
    /// object it writes.
    pub fn step_tasks(&self) -> Vec<PlannedTask> {
        self.tasks_of(&self.plan.steps, 0, "calibrate")
    }

    /// The sensitivity steps as tasks numbered from `first` (see [`Calibration::sensitivity`]).
    pub fn sensitivity_tasks(&self, first: u32) -> Vec<PlannedTask> {
        self.tasks_of(&self.sensitivity.steps, first, "sensitivity")
    }

    fn tasks_of(&self, steps: &[CalibStep], first: u32, group: &str) -> Vec<PlannedTask> {
        (steps.iter().enumerate())
            .map(|(index, step)| {
                let tensors: Vec<PlannedTensor> = (step.tensors.iter())
                    .filter_map(|t| self.tensors.get(t).cloned())
                    .collect();
                let input_bytes = tensors.iter().map(PlannedTensor::byte_len).sum();
                PlannedTask {
                    index: first + index as u32,
                    group: group.into(),
                    tensors,
                    output_name: step.output.clone(),
                    input_bytes,
                }
            })
            .collect()
    }
}

impl Calibration {
    /// What step `index` holds in memory beyond its reads, for `--memory-limit` routing
    /// ([`crate::routing`]): every step its model tensors in f32; STATS also the Hessian of
    /// each Linear group of its layer; SOLVE its Linear's summed Hessian, a piece of the one
    /// being added and the method's factors ([`solve_memory_bytes`], whose thread-dependent
    /// scratch is counted for this process's threads). `None` for a step without tensors.
    pub fn step_need(&self, steps: &[CalibStep], index: usize) -> Option<crate::routing::TaskNeed> {
        let step = steps.get(index)?;
        let tensors: Vec<&PlannedTensor> = (step.tensors.iter())
            .filter_map(|t| self.tensors.get(t))
            .collect();
        let width = |t: &PlannedTensor| t.shape.get(1).copied().unwrap_or(1);
        let triangle = |n: u64| n.saturating_mul(n + 1) / 2 * 8;
        let weights: u64 = (tensors.iter())
            .map(|t| t.shape.iter().product::<u64>().saturating_mul(4))
            .sum();
        let (bytes, pass) = match step.kind {
            StepKind::Solve | StepKind::Sensitivity => {
                // The bound counts the summed Hessian and the weight in f32; add the piece of
                // a batch's Hessian being summed. A sensitivity step solves one width at a
                // time, and holds its layer's weights in f32 for the forward that scores it.
                let t = tensors.first()?;
                let (rows, n) = (t.shape.first().copied().unwrap_or(1), width(t));
                let solve = solve_memory_bytes(n as usize, rows as usize);
                let bytes = solve.saturating_add(triangle(n).min(SERIALIZED_PIECE_BYTES));
                match step.kind {
                    StepKind::Solve => (bytes, "calibration solve (Hessian and factors)"),
                    _ => (
                        bytes.saturating_add(weights),
                        "sensitivity (Hessian, factors and the layer's weights)",
                    ),
                }
            }
            StepKind::Stats => {
                // One Hessian per Linear group of the layer: the widths its SOLVE steps read.
                let per_linear = [StepKind::Solve, StepKind::Sensitivity];
                let mut groups: Vec<(u32, u64)> = (steps.iter())
                    .filter(|s| per_linear.contains(&s.kind) && s.layer == step.layer)
                    .filter_map(|s| {
                        let t = self.tensors.get(s.tensors.first()?)?;
                        Some((s.group, width(t)))
                    })
                    .collect();
                groups.sort_unstable();
                groups.dedup_by_key(|g| g.0);
                let hessians = groups.iter().map(|&(_, n)| triangle(n)).sum::<u64>();
                let bytes = weights.saturating_add(hessians);
                (bytes, "calibration statistics (a Hessian per Linear group)")
            }
            // The head twice: as the original has it and as the output stores it.
            StepKind::Eval => (
                weights.saturating_mul(2),
                "evaluation (the original and compressed head in f32)",
            ),
            _ => (weights, "calibration forward (the layer's weights in f32)"),
        };
        let tensor = (tensors.iter())
            .max_by_key(|t| t.shape.iter().product::<u64>())?
            .name
            .clone();
        Some(crate::routing::TaskNeed {
            bytes,
            tensor,
            pass: pass.to_string(),
        })
    }
}

/// Reads an object given by URL (or path): a text file of samples.
pub async fn read_object(
    url: &str,
) -> Result<(StoreLocation, String, bytes::Bytes), CoordinatorError> {
    let trimmed = url.trim_end_matches('/');
    let (parent, name) = match trimmed.rsplit_once('/') {
        Some(("", name)) => ("/", name),
        Some((parent, name)) => (parent, name),
        None => (".", trimmed),
    };
    let location = StoreLocation::open(parent)?;
    let bytes = location.get(name).await?;
    Ok((location, name.to_string(), bytes))
}

/// Samples of `url`, tokenized: at most `samples` of them, `seq_len` tokens each at most, in
/// batches of [`BATCH_SEQUENCES`].
async fn token_batches(
    tokenizer: &Tokenizer,
    url: &str,
    samples: usize,
    seq_len: usize,
) -> Result<(Vec<Vec<Vec<u32>>>, usize, u64), CoordinatorError> {
    let (location, name, bytes) = read_object(url).await?;
    let described = location.describe(&name);
    let texts = shardpress_model::parse_samples(&bytes, &described)
        .map_err(|e| CoordinatorError::InvalidRequest(e.to_string()))?;
    let mut sequences = Vec::new();
    for (i, text) in texts.iter().take(samples).enumerate() {
        let ids = tokenizer.encode(text, seq_len).map_err(|e| {
            CoordinatorError::InvalidRequest(format!("{described}: sample {}: {e}", i + 1))
        })?;
        if !ids.is_empty() {
            sequences.push(ids);
        }
    }
    if sequences.is_empty() {
        return Err(CoordinatorError::InvalidRequest(format!(
            "{described}: no sample gives any token"
        )));
    }
    let tokens = sequences.iter().map(|s| s.len() as u64).sum();
    let count = sequences.len();
    let batches = sequences
        .chunks(BATCH_SEQUENCES)
        .map(<[Vec<u32>]>::to_vec)
        .collect();
    Ok((batches, count, tokens))
}

/// Prepares the round of the job `request` asks for, if it has one: reads the model's
/// config.json and tokenizer.json and the samples, and plans the steps. Everything a step
/// needs is checked here (architecture, tensors and their dtypes, non-empty samples), so a
/// bad submission is refused before any output is touched.
#[allow(clippy::too_many_arguments)]
pub async fn prepare(
    request: &SubmitJobRequest,
    root: &StoreLocation,
    files: &[SourceFile],
    recipe: &Recipe,
    format: OutputFormat,
    facts: &ModelFacts,
    plan: &[PlannedTask],
) -> Result<Option<Calibration>, CoordinatorError> {
    let asked = CalibrationRequest::of(request);
    let invalid = CoordinatorError::InvalidRequest;
    let methods: Vec<&str> = (recipe.calibrated_methods().iter())
        .map(|m| m.name())
        .collect();
    if !methods.is_empty() && asked.calibration_url.is_empty() {
        return Err(invalid(format!(
            "recipe {} uses {}, which needs calibration data: pass --calibration FILE (a text file, one sample a line, or JSONL with a \"text\" field)",
            recipe.name,
            methods.join(" and ")
        )));
    }
    // Mixed precision uses calibration data to score the widths, whatever the method
    // (unless the recipe asks for weight error).
    let choosing_widths = recipe.needs_precision_choice()
        && (recipe.mixed_precision.as_ref()).is_some_and(|m| m.score == PrecisionScore::Outputs);
    if methods.is_empty() && !asked.calibration_url.is_empty() && !choosing_widths {
        return Err(invalid(format!(
            "--calibration was given, but recipe {} has no calibrated method (quantize method gptq or awq, prune method sparsegpt or wanda) and no bit budget (--target-bpw, or mixed_precision with its default score: outputs) whose widths it would score; leave it out, or use --eval to measure the model's outputs",
            recipe.name
        )));
    }
    if recipe.has_function_gates() && asked.eval_url.is_empty() {
        return Err(invalid(format!(
            "recipe {} gates the model's outputs ({}), which needs --eval FILE (samples to compare the original and compressed model on)",
            recipe.name,
            recipe.gates.describe()
        )));
    }
    if asked.is_empty() {
        return Ok(None);
    }
    if !methods.is_empty() && (recipe.global_sparsity().is_some() || recipe.share_cosine.is_some())
    {
        return Err(invalid(format!(
            "recipe {}: calibrated methods cannot be combined with a global magnitude prune or near-identical sharing yet",
            recipe.name
        )));
    }
    let config_json = read_text(root, "config.json", "the model's architecture").await?;
    let names: Vec<&str> = (files.iter())
        .flat_map(|f| &f.header.tensors)
        .map(|t| t.name.as_str())
        .collect();
    let model = Model::from_config(&config_json, &names)
        .map_err(|e| invalid(format!("{}: {e}", root.describe("config.json"))))?;
    let tokenizer_json = read_text(root, "tokenizer.json", "how the samples are tokenized").await?;
    let tokenizer = Tokenizer::from_bytes(tokenizer_json.as_bytes())
        .map_err(|e| invalid(format!("{}: {e}", root.describe("tokenizer.json"))))?;
    let layout = ModelLayout::of(&model);
    let planned: HashMap<String, PlannedTensor> = (plan.iter())
        .flat_map(|t| &t.tensors)
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    let model_tensors = layout.all_tensors();
    for name in &model_tensors {
        let tensor = planned.get(name).ok_or_else(|| {
            invalid(format!(
                "{}: the {} model needs tensor {name}, which the checkpoint does not have",
                root.url(),
                model.architecture()
            ))
        })?;
        if !tensor.dtype.is_decodable_float() {
            return Err(invalid(format!(
                "{}: {name} is {}; calibration and evaluation read BF16, F16 or F32 weights (or FP8 and packed codes, decoded)",
                tensor.source_file,
                tensor.dtype.as_safetensors(),
            )));
        }
    }
    let in_groups: std::collections::HashSet<&str> = (layout.layers.iter())
        .flat_map(|l| l.groups.iter().flatten())
        .map(String::as_str)
        .collect();
    let mut not_calibrated = Vec::new();
    let mut calibrated = std::collections::HashSet::new();
    // Mixed precision: the Linears whose width is chosen, scored on their inputs.
    let mut measured = std::collections::HashSet::new();
    for t in plan.iter().flat_map(|t| &t.tensors) {
        let in_group = in_groups.contains(t.name.as_str());
        let scored = choosing_widths && in_group;
        if !scored && recipe.calibrated_for(&t.name).is_none() {
            continue;
        }
        // Planned once: whether its width is chosen, and whether it is calibrated.
        let tensor_plan = TensorPlan::for_output(recipe, format, facts, &t.name, t.dtype, &t.shape)
            .map_err(|e| invalid(format!("{}: {e}", t.source_file)))?;
        if scored && tensor_plan.has_width() {
            measured.insert(t.name.clone());
        }
        if tensor_plan.calibrated.is_none() {
            continue;
        }
        if !in_group {
            not_calibrated.push((
                t.name.clone(),
                "not a Linear of a transformer block: stored data-free".to_string(),
            ));
        } else {
            calibrated.insert(t.name.clone());
        }
    }
    let seq_len = match asked.calibration_seq_len {
        0 => DEFAULT_SEQ_LEN,
        n => n,
    } as usize;
    let (calibration, calibration_samples, calibration_tokens) =
        match asked.calibration_url.as_str() {
            "" => (Vec::new(), 0, 0),
            url => {
                let samples = match asked.calibration_samples {
                    0 => DEFAULT_SAMPLES,
                    n => n,
                };
                token_batches(&tokenizer, url, samples as usize, seq_len).await?
            }
        };
    let (evaluation, eval_samples, eval_tokens) = match asked.eval_url.as_str() {
        "" => (Vec::new(), 0, 0),
        url => {
            let samples = match asked.eval_samples {
                0 => DEFAULT_EVAL_SAMPLES,
                n => n,
            };
            token_batches(&tokenizer, url, samples as usize, seq_len).await?
        }
    };
    let steps = plan_steps(
        &layout,
        &|t| calibrated.contains(t),
        &calibration,
        &evaluation,
    );
    let sensitivity = plan_sensitivity(&layout, &|t| measured.contains(t), &calibration);
    let mut hasher = blake3::Hasher::new();
    for batch in calibration.iter().chain(&evaluation) {
        for sequence in batch {
            hasher.update(&(sequence.len() as u64).to_le_bytes());
            for id in sequence {
                hasher.update(&id.to_le_bytes());
            }
        }
        hasher.update(b"|");
    }
    let tensors = (model_tensors.iter())
        .filter_map(|n| planned.get(n).map(|t| (n.clone(), t.clone())))
        .collect();
    Ok(Some(Calibration {
        request: asked,
        config_json,
        model_tensors,
        kind: model.kind(),
        plan: steps,
        sensitivity,
        tensors,
        compress_plan: plan.to_vec(),
        calibration_samples,
        calibration_tokens,
        eval_samples,
        eval_tokens,
        not_calibrated,
        digest: hasher.finalize().to_hex().to_string(),
    }))
}

async fn read_text(
    root: &StoreLocation,
    name: &str,
    what: &str,
) -> Result<String, CoordinatorError> {
    let bytes = root.get(name).await.map_err(|e| match e {
        shardpress_store::StoreError::NotFound { .. } => CoordinatorError::InvalidRequest(format!(
            "{} is missing: calibration and evaluation need it for {what}",
            root.describe(name)
        )),
        other => other.into(),
    })?;
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        CoordinatorError::InvalidRequest(format!("{} is not UTF-8 text", root.describe(name)))
    })
}

/// What the round found, for report.json and the gates.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CalibrationOutcome {
    /// Wall time of the round.
    pub seconds: f64,
    pub steps: usize,
    pub calibration_samples: usize,
    pub calibration_tokens: u64,
    /// Each calibrated Linear: the method's output error against the data-free pass's.
    pub tensors: Vec<SolvedReport>,
    /// Targeted by a calibrated method but stored data-free, and why.
    pub not_calibrated: Vec<NotCalibrated>,
    pub evaluation: Option<Evaluation>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SolvedReport {
    pub name: String,
    pub method: String,
    pub proxy_loss: f64,
    pub baseline_proxy_loss: f64,
    /// proxy_loss / baseline_proxy_loss (below 1: the calibration helped on its inputs).
    pub loss_ratio: f64,
    pub rows_seen: u64,
    pub dead_columns: u32,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NotCalibrated {
    pub name: String,
    pub reason: String,
}

/// The function-space comparison of the compressed model with the original.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Evaluation {
    pub samples: usize,
    pub tokens: u64,
    /// Encoders: cosine of each sample's embedding to the original's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_embedding_cosine: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_embedding_cosine: Option<f64>,
    /// Decoders: over every predicted token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_kld: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity_original: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity_compressed: Option<f64>,
}

impl Evaluation {
    /// The evaluation of `samples` samples (`tokens` tokens) from the comparisons of their
    /// batches (`EvalResult`s, in any order): means over samples or tokens; next-token figures
    /// only for a decoder.
    pub fn of(
        evals: &[&shardpress_proto::v1::EvalResult],
        samples: usize,
        tokens: u64,
        kind: ModelKind,
    ) -> Evaluation {
        let cosines: Vec<f64> = (evals.iter())
            .flat_map(|e| e.cosines.iter().copied())
            .collect();
        let compared: u64 = evals.iter().map(|e| e.tokens).sum();
        let decoder = kind == ModelKind::Decoder;
        let per_token = |sum: f64| (decoder && compared > 0).then(|| sum / compared as f64);
        let sum = |f: fn(&shardpress_proto::v1::EvalResult) -> f64| {
            evals.iter().map(|e| f(e)).sum::<f64>()
        };
        Evaluation {
            samples,
            tokens,
            mean_embedding_cosine: (!cosines.is_empty())
                .then(|| cosines.iter().sum::<f64>() / cosines.len() as f64),
            min_embedding_cosine: cosines.iter().copied().reduce(f64::min),
            mean_kld: per_token(sum(|e| e.kld_sum)),
            top1_agreement: per_token(evals.iter().map(|e| e.top1_agree as f64).sum()),
            perplexity_original: per_token(sum(|e| e.nll_original)).map(f64::exp),
            perplexity_compressed: per_token(sum(|e| e.nll_compressed)).map(f64::exp),
        }
    }

    /// The evaluation's failed gates, described.
    pub fn failed_gates(&self, gates: &shardpress_core::recipe::Gates) -> Vec<String> {
        let mut failed = Vec::new();
        if let Some(min) = gates.min_embedding_cosine {
            match self.mean_embedding_cosine {
                Some(v) if v >= min => {}
                Some(v) => failed.push(format!("mean embedding cosine {v:.5} < {min}")),
                None => failed.push("min_embedding_cosine: the model gives no embeddings (a decoder; gate min_top1 or max_kld instead)".into()),
            }
        }
        if let Some(min) = gates.min_top1 {
            match self.top1_agreement {
                Some(v) if v >= min => {}
                Some(v) => failed.push(format!("top-1 agreement {v:.5} < {min}")),
                None => failed.push("min_top1: the model predicts no tokens (an encoder; gate min_embedding_cosine instead)".into()),
            }
        }
        if let Some(max) = gates.max_kld {
            match self.mean_kld {
                Some(v) if v <= max => {}
                Some(v) => failed.push(format!("mean KL divergence {v:.5} > {max}")),
                None => failed.push("max_kld: the model predicts no tokens (an encoder; gate min_embedding_cosine instead)".into()),
            }
        }
        failed
    }
}

/// What a finished job's message says of the round: `"; 36 Linears calibrated (gptq:
/// output error 0.41x the data-free pass's); embedding cosine 0.9812 (min 0.9533) on 64
/// samples"`.
pub fn summary_line(outcome: &CalibrationOutcome) -> String {
    let mut line = String::new();
    if !outcome.tensors.is_empty() {
        let (loss, baseline) = (outcome.tensors.iter()).fold((0.0, 0.0), |(l, b), t| {
            (l + t.proxy_loss, b + t.baseline_proxy_loss)
        });
        let method = (outcome.tensors.first())
            .and_then(|t| t.method.split_whitespace().next())
            .unwrap_or_default();
        line.push_str(&format!(
            "; {} Linears calibrated ({method}: output error {:.2}x the data-free pass's)",
            outcome.tensors.len(),
            if baseline > 0.0 { loss / baseline } else { 1.0 }
        ));
    }
    if let Some(e) = &outcome.evaluation {
        if let (Some(mean), Some(min)) = (e.mean_embedding_cosine, e.min_embedding_cosine) {
            line.push_str(&format!(
                "; embedding cosine {mean:.4} (min {min:.4}) on {} samples",
                e.samples
            ));
        }
        if let (Some(top1), Some(kld)) = (e.top1_agreement, e.mean_kld) {
            line.push_str(&format!(
                "; top-1 agreement {top1:.4}, KL divergence {kld:.5} over {} tokens",
                e.tokens
            ));
        }
    }
    line
}

/// Concludes the round from its steps' reports (in step order).
pub fn conclude(
    calibration: &Calibration,
    reports: &[&CompleteTaskRequest],
    seconds: f64,
) -> CalibrationOutcome {
    let tensors = (reports.iter())
        .flat_map(|r| &r.calibrated)
        .map(|c: &CalibratedTensor| SolvedReport {
            name: c.name.clone(),
            method: c.method.clone(),
            proxy_loss: c.proxy_loss,
            baseline_proxy_loss: c.baseline_proxy_loss,
            loss_ratio: match c.baseline_proxy_loss {
                b if b > 0.0 => c.proxy_loss / b,
                _ => 1.0,
            },
            rows_seen: c.rows_seen,
            dead_columns: c.dead_columns,
            seconds: c.seconds,
        })
        .collect();
    let evals: Vec<_> = reports.iter().filter_map(|r| r.eval.as_ref()).collect();
    let evaluation = (!evals.is_empty()).then(|| {
        Evaluation::of(
            &evals,
            calibration.eval_samples,
            calibration.eval_tokens,
            calibration.kind,
        )
    });
    CalibrationOutcome {
        seconds,
        steps: calibration.plan.steps.len(),
        calibration_samples: calibration.calibration_samples,
        calibration_tokens: calibration.calibration_tokens,
        tensors,
        not_calibrated: (calibration.not_calibrated.iter())
            .map(|(name, reason)| NotCalibrated {
                name: name.clone(),
                reason: reason.clone(),
            })
            .collect(),
        evaluation,
    }
}

#[cfg(test)]
mod tests;
