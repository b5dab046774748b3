//! `report.json`: per-tensor metrics, per-layer aggregates (parameter-weighted), per-task
//! timings and workers, totals, and the verdict of the recipe's gates.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use shardpress_core::plan::layer_index;
use shardpress_core::recipe::{Gates, OutputFormat};
use shardpress_proto::v1::TensorResult;

use crate::job::{JobSpec, TaskOutcome, TaskSlot};
use crate::share::shared_tensors;

#[derive(Debug, Serialize)]
pub struct Report {
    pub job_id: String,
    pub model_url: String,
    pub out_url: String,
    pub recipe: RecipeInfo,
    /// The format's name (`--format`).
    pub format: &'static str,
    pub output_format: &'static str,
    pub summary: Summary,
    /// Recipes with a global magnitude prune: the cut the measuring round found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_prune: Option<GlobalPruneReport>,
    pub gates: GateVerdict,
    /// Calibrated or evaluated jobs: what each calibrated Linear gained over the data-free
    /// pass on the calibration inputs, and the compressed model's outputs compared with the
    /// original's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<crate::calibration::CalibrationOutcome>,
    /// Mixed precision to a bit budget: the width each quantized tensor got, and what it
    /// stores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mixed_precision: Option<PrecisionReport>,
    pub layers: Vec<LayerReport>,
    /// Jobs that measure first: that round's tasks (`tasks` lists the compressing round).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub measuring_tasks: Vec<TaskReport>,
    pub tasks: Vec<TaskReport>,
    pub tensors: Vec<TensorReport>,
}

#[derive(Debug, Serialize)]
pub struct RecipeInfo {
    pub name: String,
    pub description: String,
    pub yaml: String,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub tensors: usize,
    pub tensors_compressed: usize,
    /// Tensors stored as a reference to another tensor's compressed form.
    pub tensors_shared: usize,
    pub params: u64,
    pub params_compressed: u64,
    pub input_bytes: u64,
    pub output_bytes: u64,
    /// Size the weights would take at their reported bits per weight (packed storage).
    pub packed_size_bytes: u64,
    pub bits_per_weight: f64,
    pub bits_per_weight_compressed: f64,
    /// Bits per weight the output really takes on disk (shards or archive, all overheads).
    pub stored_bits_per_weight: Option<f64>,
    pub rel_fro_error_weighted: f64,
    pub worst_rel_fro_error: Option<Worst>,
    pub min_cosine: Option<Worst>,
    pub wall_seconds: f64,
    pub input_mb_per_second: f64,
    pub workers_used: usize,
    pub task_retries: u32,
    /// Tasks an earlier run of the job had finished (kept from its journal, not run again;
    /// `input_mb_per_second` counts only what this run read).
    pub tasks_restored: usize,
    /// Jobs that measure first (global prune, near-identical sharing): the wall time of
    /// that round (included in `wall_seconds`; `tasks` shows the compressing round).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measuring_seconds: Option<f64>,
    /// Near-identical sharing: pairs shortlisted from the sketches (each then checked exactly).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_candidates: Option<usize>,
}

/// `mixed_precision` of report.json.
#[derive(Debug, Serialize)]
pub struct PrecisionReport {
    pub target_bpw: f64,
    /// Bits per weight the quantized tensors store, from the compressing round's results.
    pub bits_per_weight: f64,
    /// What the measuring round predicted: bits per weight, and the summed squared relative
    /// error of the choice and of every tensor at the narrowest width.
    pub predicted_bits_per_weight: f64,
    pub predicted_error: f64,
    pub narrowest_error: f64,
    pub narrowest_bits_per_weight: f64,
    /// Width -> how many tensors got it.
    pub widths: BTreeMap<String, usize>,
    /// How many tensors were scored by their output error on the calibration data (the
    /// others by their weight error), and on how many calibration samples.
    pub calibration_weighted_tensors: usize,
    pub calibration_samples: usize,
    pub tensors: Vec<PrecisionTensorReport>,
}

/// One quantized tensor's width, what it stores, and every candidate measured.
#[derive(Debug, Serialize)]
pub struct PrecisionTensorReport {
    pub name: String,
    /// `bits`, and `group_size` when the width changed the pass's granularity.
    #[serde(flatten)]
    pub width: shardpress_core::recipe::Width,
    pub params: u64,
    pub bits_per_weight: f64,
    pub rel_fro_error: Option<f64>,
    /// The candidates' `rel_error_sq` is the relative output error on the calibration
    /// inputs, `tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`, rather than `‖ΔW‖² / ‖W‖²`.
    pub calibration_weighted: bool,
    pub candidates: Vec<shardpress_core::precision::Candidate>,
}

/// The report's `mixed_precision`, from the measuring round's choice and the compressing
/// round's tensors.
fn precision_report(spec: &JobSpec, tensors: &[TensorReport]) -> Option<PrecisionReport> {
    let measured = spec.measured.as_ref()?.precision.as_ref()?;
    let choice = measured.choice.as_ref().ok()?;
    let results: HashMap<&str, &TensorReport> =
        tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut rows = Vec::new();
    let mut widths = BTreeMap::new();
    let (mut bits, mut params) = (0.0, 0u64);
    for candidates in &measured.tensors {
        let Some(&width) = choice.widths.get(&candidates.name) else {
            continue;
        };
        let result = results.get(candidates.name.as_str());
        let stored = result.map_or(0.0, |r| r.bits_per_weight);
        bits += stored * candidates.params as f64;
        params += candidates.params;
        *widths.entry(width.to_string()).or_insert(0) += 1;
        rows.push(PrecisionTensorReport {
            name: candidates.name.clone(),
            width,
            params: candidates.params,
            bits_per_weight: stored,
            rel_fro_error: result.and_then(|r| r.rel_fro_error),
            calibration_weighted: candidates.calibration_weighted,
            candidates: candidates.candidates.clone(),
        });
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Some(PrecisionReport {
        target_bpw: choice.target_bpw,
        bits_per_weight: if params == 0 {
            0.0
        } else {
            bits / params as f64
        },
        predicted_bits_per_weight: choice.bits_per_weight,
        predicted_error: choice.predicted_error,
        narrowest_error: choice.cheapest_error,
        narrowest_bits_per_weight: choice.cheapest_bpw,
        widths,
        calibration_weighted_tensors: rows.iter().filter(|r| r.calibration_weighted).count(),
        calibration_samples: (spec.calibration.as_ref())
            .filter(|c| !c.sensitivity.steps.is_empty())
            .map_or(0, |c| c.calibration_samples),
        tensors: rows,
    })
}

#[derive(Debug, Serialize)]
pub struct GlobalPruneReport {
    pub target_sparsity: f64,
    /// Fraction of the targeted weights below the cut (each tensor then rounds its share).
    pub sparsity: f64,
    /// Weights the global target covers.
    pub params: u64,
    /// Magnitudes below this are dropped everywhere (ties at it shared out evenly).
    pub threshold: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Worst {
    pub tensor: String,
    pub value: f64,
}

#[derive(Debug, Serialize)]
pub struct GateVerdict {
    pub max_rel_error: Option<f64>,
    pub min_cosine: Option<f64>,
    pub min_snr_db: Option<f64>,
    pub passed: bool,
    pub violations: Vec<GateViolation>,
    /// Function-space gates (embedding cosine, top-1 agreement, KL divergence) that failed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub function_space: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GateViolation {
    pub tensor: String,
    pub metric: &'static str,
    pub value: f64,
    pub limit: f64,
}

#[derive(Debug, Serialize)]
pub struct LayerReport {
    pub layer: String,
    pub tensors: usize,
    pub tensors_compressed: usize,
    pub params: u64,
    pub bits_per_weight: f64,
    pub rel_fro_error_weighted: f64,
    pub worst_rel_fro_error: f64,
    pub min_cosine: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    pub index: u32,
    pub output: String,
    pub worker: String,
    pub attempt: u32,
    pub input_bytes: u64,
    pub output_bytes: u64,
    /// When the coordinator leased the task and when it accepted the result, in seconds
    /// since the job started: with `seconds` (the worker's own time), the gaps show
    /// start-up, the round trips between tasks and workers left idle at the end.
    pub leased_at_seconds: f64,
    pub completed_at_seconds: f64,
    pub seconds: f64,
    pub read_seconds: f64,
    pub compute_seconds: f64,
    pub write_seconds: f64,
    /// Finished by an earlier run of the job (a coordinator restart), kept from its journal.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub restored: bool,
}

impl TaskReport {
    /// The report line of a finished task; `worker_names` maps worker ids to names.
    pub fn new(
        slot: &TaskSlot,
        outcome: &TaskOutcome,
        worker_names: &HashMap<String, String>,
    ) -> Self {
        let r = &outcome.report;
        TaskReport {
            index: slot.plan.index,
            output: slot.plan.output_name.clone(),
            worker: worker_names
                .get(&outcome.worker)
                .cloned()
                .unwrap_or_else(|| outcome.worker.clone()),
            attempt: outcome.attempt,
            input_bytes: slot.plan.input_bytes,
            output_bytes: r.output_bytes,
            leased_at_seconds: slot.leased_at_seconds,
            completed_at_seconds: outcome.completed_at_seconds,
            seconds: r.seconds,
            read_seconds: r.read_seconds,
            compute_seconds: r.compute_seconds,
            write_seconds: r.write_seconds,
            restored: outcome.restored,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub params: u64,
    pub pass: String,
    pub bits_per_weight: f64,
    /// `.spz` only: entropy-coded bits per weight of this tensor's record.
    pub stored_bits_per_weight: Option<f64>,
    pub rel_fro_error: Option<f64>,
    pub snr_db: Option<f64>,
    pub cosine: Option<f64>,
    pub max_abs_error: Option<f64>,
    pub note: String,
    pub output: String,
    /// The tensor whose compressed form this one is stored as: near-identical (recipe
    /// `share.cosine`, both formats; its errors are measured against that form) or, in
    /// `.spz`, with an identical record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_with: Option<String>,
}

impl TensorReport {
    fn from_result(result: &TensorResult, output: &str) -> Self {
        let metrics = result.metrics();
        Self {
            name: result.name.clone(),
            dtype: result.dtype.clone(),
            shape: result.shape.clone(),
            params: result.shape.iter().product(),
            pass: result.pass.clone(),
            bits_per_weight: result.bits_per_weight,
            stored_bits_per_weight: (result.record_len > 0)
                .then_some(result.stored_bits_per_weight),
            rel_fro_error: metrics.map(|m| m.rel_fro_error),
            snr_db: metrics.and_then(|m| m.snr_db),
            cosine: metrics.map(|m| m.cosine),
            max_abs_error: metrics.map(|m| m.max_abs_error),
            note: result.note.clone(),
            output: output.to_string(),
            shared_with: (!result.shared_with.is_empty()).then(|| result.shared_with.clone()),
        }
    }
}

/// Builds the report of a job whose tasks are all done.
pub fn build_report(
    job_id: &str,
    spec: &JobSpec,
    tasks: &[TaskSlot],
    wall_seconds: f64,
    retries: u32,
    worker_names: &HashMap<String, String>,
) -> Report {
    let mut tensors = Vec::new();
    let mut task_reports = Vec::new();
    for slot in tasks {
        let Some(outcome) = &slot.result else {
            continue;
        };
        let r = &outcome.report;
        tensors.extend(
            r.tensors
                .iter()
                .map(|t| TensorReport::from_result(t, &slot.plan.output_name)),
        );
        task_reports.push(TaskReport::new(slot, outcome, worker_names));
    }
    // Near-identical tensors share in both formats (their results say so); exact
    // duplicates only inside an archive.
    if spec.format == OutputFormat::Spz {
        let shared = shared_tensors(tasks);
        for t in &mut tensors {
            if let Some(kept) = shared.get(&t.name) {
                t.shared_with = Some(kept.clone());
                t.stored_bits_per_weight = Some(0.0);
            }
        }
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut gates = check_gates(&spec.recipe.gates, &tensors);
    let evaluation = (spec.calibrated.as_ref()).and_then(|c| c.evaluation.as_ref());
    if let Some(evaluation) = evaluation {
        gates.function_space = evaluation.failed_gates(&spec.recipe.gates);
        gates.passed &= gates.function_space.is_empty();
    }
    let mut summary = summarize(&tensors, &task_reports, wall_seconds, retries);
    if let Some(m) = &spec.measured {
        summary.measuring_seconds = Some(m.seconds);
        summary.share_candidates = spec.recipe.share_cosine.map(|_| m.share_candidates.len());
    }
    let assembled: Vec<u64> = tasks
        .iter()
        .filter(|t| t.assemble.is_some())
        .filter_map(|t| t.result.as_ref().map(|r| r.report.output_bytes))
        .collect();
    // What is on disk: the assembled files for `.spz` and GGUF (their parts are deleted),
    // else the shards.
    if !assembled.is_empty() {
        summary.output_bytes = assembled.iter().sum();
    }
    if summary.params > 0 {
        summary.stored_bits_per_weight =
            Some(summary.output_bytes as f64 * 8.0 / summary.params as f64);
    }
    Report {
        job_id: job_id.to_string(),
        model_url: shardpress_store::redact(&spec.model_url),
        out_url: shardpress_store::redact(&spec.out_url),
        recipe: RecipeInfo {
            name: spec.recipe.name.clone(),
            description: spec.recipe.describe(),
            yaml: spec.recipe.source_yaml.clone(),
        },
        format: spec.format.as_str(),
        output_format: spec.format.spec().describe(),
        summary,
        global_prune: spec.measured.as_ref().and_then(|m| {
            Some(GlobalPruneReport {
                target_sparsity: spec.recipe.global_sparsity()?,
                sparsity: m.pruned_fraction,
                params: m.pruned_params,
                threshold: m.cut?.threshold(),
            })
        }),
        gates,
        calibration: spec.calibrated.clone(),
        mixed_precision: precision_report(spec, &tensors),
        layers: layer_reports(&tensors),
        measuring_tasks: spec
            .measured
            .as_ref()
            .map(|m| m.tasks.clone())
            .unwrap_or_default(),
        tasks: task_reports,
        tensors,
    }
}

fn weighted(tensors: &[&TensorReport], value: impl Fn(&TensorReport) -> f64) -> f64 {
    let params: u64 = tensors.iter().map(|t| t.params).sum();
    if params == 0 {
        return 0.0;
    }
    tensors
        .iter()
        .map(|t| value(t) * t.params as f64)
        .sum::<f64>()
        / params as f64
}

pub(crate) fn summarize(
    tensors: &[TensorReport],
    tasks: &[TaskReport],
    wall_seconds: f64,
    retries: u32,
) -> Summary {
    let all: Vec<&TensorReport> = tensors.iter().collect();
    let compressed: Vec<&TensorReport> = tensors
        .iter()
        .filter(|t| t.rel_fro_error.is_some())
        .collect();
    let input_bytes: u64 = tasks.iter().map(|t| t.input_bytes).sum();
    let read_now: u64 = (tasks.iter().filter(|t| !t.restored))
        .map(|t| t.input_bytes)
        .sum();
    let worst = compressed
        .iter()
        .max_by(|a, b| {
            a.rel_fro_error
                .partial_cmp(&b.rel_fro_error)
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .map(|t| Worst {
            tensor: t.name.clone(),
            value: t.rel_fro_error.unwrap_or_default(),
        });
    let min_cos = compressed
        .iter()
        .min_by(|a, b| {
            a.cosine
                .partial_cmp(&b.cosine)
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .map(|t| Worst {
            tensor: t.name.clone(),
            value: t.cosine.unwrap_or_default(),
        });
    let mut workers: Vec<&str> = tasks.iter().map(|t| t.worker.as_str()).collect();
    workers.sort();
    workers.dedup();
    Summary {
        tensors: tensors.len(),
        tensors_compressed: compressed.len(),
        tensors_shared: tensors.iter().filter(|t| t.shared_with.is_some()).count(),
        params: all.iter().map(|t| t.params).sum(),
        params_compressed: compressed.iter().map(|t| t.params).sum(),
        input_bytes,
        output_bytes: tasks.iter().map(|t| t.output_bytes).sum(),
        packed_size_bytes: (all
            .iter()
            .map(|t| t.params as f64 * t.bits_per_weight)
            .sum::<f64>()
            / 8.0)
            .ceil() as u64,
        bits_per_weight: weighted(&all, |t| t.bits_per_weight),
        bits_per_weight_compressed: weighted(&compressed, |t| t.bits_per_weight),
        stored_bits_per_weight: None,
        rel_fro_error_weighted: weighted(&compressed, |t| t.rel_fro_error.unwrap_or_default()),
        worst_rel_fro_error: worst,
        min_cosine: min_cos,
        wall_seconds,
        input_mb_per_second: if wall_seconds > 0.0 {
            read_now as f64 / 1e6 / wall_seconds
        } else {
            0.0
        },
        workers_used: workers.len(),
        task_retries: retries,
        tasks_restored: tasks.iter().filter(|t| t.restored).count(),
        measuring_seconds: None,
        share_candidates: None,
    }
}

pub(crate) fn layer_reports(tensors: &[TensorReport]) -> Vec<LayerReport> {
    let mut groups: BTreeMap<(u64, String), Vec<&TensorReport>> = BTreeMap::new();
    for t in tensors {
        let key = match layer_index(&t.name) {
            Some(i) => (i, format!("layer {i}")),
            None => (u64::MAX, "other".to_string()),
        };
        groups.entry(key).or_default().push(t);
    }
    groups
        .into_iter()
        .map(|((_, layer), members)| {
            let compressed: Vec<&TensorReport> = members
                .iter()
                .copied()
                .filter(|t| t.rel_fro_error.is_some())
                .collect();
            LayerReport {
                layer,
                tensors: members.len(),
                tensors_compressed: compressed.len(),
                params: members.iter().map(|t| t.params).sum(),
                bits_per_weight: weighted(&members, |t| t.bits_per_weight),
                rel_fro_error_weighted: weighted(&compressed, |t| {
                    t.rel_fro_error.unwrap_or_default()
                }),
                worst_rel_fro_error: compressed
                    .iter()
                    .filter_map(|t| t.rel_fro_error)
                    .fold(0.0, f64::max),
                min_cosine: compressed
                    .iter()
                    .filter_map(|t| t.cosine)
                    .fold(1.0, f64::min),
            }
        })
        .collect()
}

/// Checks every transformed tensor against the recipe's gates; violations worst first.
pub fn check_gates(gates: &Gates, tensors: &[TensorReport]) -> GateVerdict {
    let mut violations = Vec::new();
    for t in tensors {
        if let (Some(limit), Some(value)) = (gates.max_rel_error, t.rel_fro_error) {
            if value > limit {
                violations.push(GateViolation {
                    tensor: t.name.clone(),
                    metric: "rel_fro_error",
                    value,
                    limit,
                });
            }
        }
        if let (Some(limit), Some(value)) = (gates.min_cosine, t.cosine) {
            if value < limit {
                violations.push(GateViolation {
                    tensor: t.name.clone(),
                    metric: "cosine",
                    value,
                    limit,
                });
            }
        }
        if let Some(limit) = gates.min_snr_db {
            // A missing SNR with metrics present means zero error: infinitely good.
            if let (Some(value), Some(_)) = (t.snr_db, t.rel_fro_error) {
                if value < limit {
                    violations.push(GateViolation {
                        tensor: t.name.clone(),
                        metric: "snr_db",
                        value,
                        limit,
                    });
                }
            }
        }
    }
    violations.sort_by(|a, b| {
        let badness = |v: &GateViolation| (v.value - v.limit).abs() / v.limit.abs().max(1e-12);
        badness(b)
            .partial_cmp(&badness(a))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    GateVerdict {
        max_rel_error: gates.max_rel_error,
        min_cosine: gates.min_cosine,
        min_snr_db: gates.min_snr_db,
        passed: violations.is_empty(),
        violations,
        function_space: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, err: f64, cos: f64) -> TensorReport {
        TensorReport {
            name: name.into(),
            dtype: "BF16".into(),
            shape: vec![4, 4],
            params: 16,
            pass: "rtn int4".into(),
            bits_per_weight: 4.5,
            stored_bits_per_weight: None,
            rel_fro_error: Some(err),
            snr_db: Some(-20.0 * err.log10()),
            cosine: Some(cos),
            max_abs_error: Some(0.1),
            note: String::new(),
            output: "model-00001-of-00001.safetensors".into(),
            shared_with: None,
        }
    }

    #[test]
    fn gates_name_the_worst_tensor_first() {
        let gates = Gates {
            max_rel_error: Some(0.1),
            min_cosine: None,
            min_snr_db: None,
            ..Gates::default()
        };
        let tensors = [
            tensor("a", 0.05, 0.99),
            tensor("b", 0.3, 0.9),
            tensor("c", 0.15, 0.95),
        ];
        let verdict = check_gates(&gates, &tensors);
        assert!(!verdict.passed);
        let names: Vec<_> = verdict
            .violations
            .iter()
            .map(|v| v.tensor.as_str())
            .collect();
        assert_eq!(names, ["b", "c"]);
    }

    #[test]
    fn gates_pass_when_every_tensor_is_within_limits() {
        let gates = Gates {
            max_rel_error: Some(0.5),
            min_cosine: Some(0.8),
            min_snr_db: Some(1.0),
            ..Gates::default()
        };
        assert!(check_gates(&gates, &[tensor("a", 0.05, 0.99)]).passed);
    }

    #[test]
    fn layers_are_weighted_by_parameters() {
        let mut big = tensor("model.layers.0.a.weight", 0.1, 0.99);
        big.params = 300;
        let small = tensor("model.layers.0.b.weight", 0.5, 0.9);
        let layers = layer_reports(&[big, small]);
        assert_eq!(layers.len(), 1);
        let expected = (0.1 * 300.0 + 0.5 * 16.0) / 316.0;
        assert!((layers[0].rel_fro_error_weighted - expected).abs() < 1e-12);
        assert_eq!(layers[0].worst_rel_fro_error, 0.5);
    }
}
