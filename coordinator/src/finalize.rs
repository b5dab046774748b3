//! The coordinator's part between the steps of a job ([`advance`], run by the job's driver),
//! and last its reassembly: the shard index, the model's companion files (config,
//! tokenizer), `report.json` and `report.html`, the accuracy gates and, last, `manifest.json` —
//! the commit point (with a signing key, its signature `manifest.json.sig` just before it).
//! [`crate::verify`] checks an output against both.
//! A job whose gates fail keeps its report (the evidence) but gets no manifest.
//! Tensor bytes are never read here: shard checksums come from the workers, sizes from HEAD.
//!
//! A recipe with a global magnitude prune or near-identical sharing first measures: at the
//! end of that step the tasks' magnitude histograms are merged into the global cut, their
//! tensor sketches shortlisted into candidate pairs, and every task runs again to compress
//! with them.
//!
//! An `.spz` or GGUF job has an assembly step: once its tasks have compressed, the archive's
//! index is built from the tasks' reports (record offsets within each part), the source
//! headers and the companion files (a GGUF file's head from the config and tokenizer), and
//! assembly tasks are queued for workers to concatenate head, parts and tail into
//! `model.spz` (leaving out records that [`crate::share`] found identical to an earlier one)
//! or the GGUF files, in slices written at once ([`crate::assembly`]); when those are done,
//! the files are committed, the parts deleted, and the report and manifest written as for
//! safetensors output. An archive on a local
//! filesystem is mostly assembled before that: its slices are queued while the tasks run, as
//! soon as the tasks before them are done ([`crate::archive`]), and only the last slices and
//! the tail are left to queue here.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shardpress_proto::v1::JobState;
use shardpress_store::{StoreError, StoreLocation, INDEX_NAME};

use shardpress_core::codec::TensorPlan;
use shardpress_core::entropy::{self, Layout};
use shardpress_core::format::gguf::{self as gguf_format, GgufAssembly};
use shardpress_core::format::{spz::PARTS_DIR, Assembly, FinishPlan, FinishedTask, TensorDesc};
use shardpress_core::header::header_len_from_prefix;
use shardpress_core::plan::PlannedTask;
use shardpress_core::plan::PlannedTensor;
use shardpress_core::prune::{GlobalCut, MAGNITUDE_BINS};
use shardpress_core::recipe::{OutputFormat, Width};
use shardpress_core::similarity;
use shardpress_core::spz::{self, SpzBlob, SpzFile, SpzIndex, SpzTensor};
use shardpress_proto::v1::{AssembleSlice, CompleteTaskRequest, PartRange, PrecisionCandidates};

use crate::job::{JobSpec, Measured, MeasuredPrecision, Phase, TaskSlot};
use crate::report::{build_report, Report, TaskReport};
use crate::signing::{KeyId, SigningKey, SIGNATURE_NAME};
use crate::state::Snapshot;
use crate::Coordinator;
use shardpress_core::precision::{self, Candidate, PrecisionError, TensorCandidates};

pub use crate::verify::verify;

pub const MANIFEST_NAME: &str = "manifest.json";
pub const REPORT_NAME: &str = "report.json";
pub const MANIFEST_FORMAT: &str = "shardpress-manifest-v1";
/// Object name of the archive of an `.spz` job.
pub const SPZ_NAME: &str = shardpress_core::format::spz::ARCHIVE_NAME;

/// Files next to the weights that a loader needs; copied when present (with every `*.py`,
/// a model's custom code), `config.json` with the format's changes.
const COMPANION_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
];

/// The companion files present in the model's folder, sorted. A store that cannot list (a
/// plain HTTP server) is asked for each known name instead; its `*.py` files are not found.
async fn companion_names(model: &StoreLocation) -> Result<Vec<String>, StoreError> {
    let listed = match model.list_top_level().await {
        Ok(listed) => listed.into_iter().map(|(name, _)| name).collect(),
        Err(e) => {
            tracing::warn!(
                "cannot list {} ({e}); looking for each companion file",
                model.url()
            );
            let mut present = Vec::new();
            for name in COMPANION_FILES {
                if model.exists(name).await? {
                    present.push(name.to_string());
                }
            }
            present
        }
    };
    let mut names: Vec<String> = listed
        .into_iter()
        .filter(|name| COMPANION_FILES.contains(&name.as_str()) || name.ends_with(".py"))
        .collect();
    names.sort();
    Ok(names)
}

/// The job's tensors with their plans as the workers ran them, per task (in task order).
fn task_plans(spec: &JobSpec, tasks: &[&PlannedTask]) -> Result<Vec<Vec<TensorPlan>>, StoreError> {
    tasks
        .iter()
        .map(|t| {
            t.tensors
                .iter()
                .map(|x| {
                    TensorPlan::for_output(
                        &spec.recipe,
                        spec.format,
                        &spec.facts,
                        &x.name,
                        x.dtype,
                        &x.shape,
                    )
                    .map_err(|e| StoreError::Invalid {
                        object: x.name.clone(),
                        reason: e.to_string(),
                    })
                })
                .collect()
        })
        .collect()
}

/// The compressing tasks of a job (not its assembly task), in order.
fn compressing(tasks: &[TaskSlot]) -> Vec<&PlannedTask> {
    tasks
        .iter()
        .filter(|t| t.assemble.is_none())
        .map(|t| &t.plan)
        .collect()
}

/// The format's finishing step for a job of these (compressing) tasks.
pub(crate) fn finish_plan(
    spec: &JobSpec,
    tasks: &[&PlannedTask],
) -> Result<FinishPlan, StoreError> {
    let plans = task_plans(spec, tasks)?;
    let finished: Vec<FinishedTask<'_>> = tasks
        .iter()
        .zip(&plans)
        .map(|(t, plans)| FinishedTask {
            output_name: &t.output_name,
            tensors: t
                .tensors
                .iter()
                .map(|x| TensorDesc {
                    name: &x.name,
                    dtype: x.dtype,
                    shape: &x.shape,
                })
                .zip(plans)
                .collect(),
        })
        .collect();
    Ok(spec.format.spec().finish_plan(&finished))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManifestEntry {
    pub name: String,
    pub size: u64,
    pub blake3: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub created_by: String,
    pub job_id: String,
    pub model_url: String,
    pub recipe: String,
    pub objects: Vec<ManifestEntry>,
}

/// The coordinator's part between two steps of job `job_id`, whose `phase` tasks are all
/// done: concludes a measuring round and starts compressing, queues the assembly of an
/// `.spz` or GGUF job, or writes what is left and ends the job. Called by its driver
/// ([`crate::driver`]); every way out moves the job on (or ends it).
pub async fn advance(coordinator: &Arc<Coordinator>, job_id: &str) {
    let Some(Snapshot {
        spec,
        tasks,
        phase,
        started,
        retries,
    }) = coordinator.snapshot(job_id)
    else {
        return;
    };
    let names = coordinator.worker_names();
    if phase == Phase::Calibrating {
        let Some(calibration) = spec.calibration.as_ref() else {
            return;
        };
        let reports: Vec<&CompleteTaskRequest> = (tasks.iter())
            .filter_map(|t| t.result.as_ref().map(|r| &r.report))
            .collect();
        let outcome =
            crate::calibration::conclude(calibration, &reports, started.elapsed().as_secs_f64());
        tracing::info!(job = %job_id, steps = outcome.steps, solved = outcome.tensors.len(),
            evaluation = ?outcome.evaluation, "calibrated; compressing");
        coordinator.start_compression_calibrated(job_id, outcome);
        return;
    }
    if phase == Phase::Measuring {
        let measured = conclude_measuring(&spec, &tasks, started, &names);
        // Mixed precision: the later rounds run the recipe with the chosen widths.
        let recipe = match measured.precision.as_ref().map(|p| &p.choice) {
            None => Ok(None),
            Some(Ok(choice)) => (spec.recipe.with_chosen_widths(&choice.widths))
                .map(Some)
                .map_err(|e| e.to_string()),
            Some(Err(e)) => Err(e.to_string()),
        };
        let recipe = match recipe {
            Ok(recipe) => recipe,
            Err(e) => {
                let message = format!("mixed precision: {e}");
                tracing::warn!(job = %job_id, "{message}");
                coordinator.set_outcome(job_id, JobState::Failed, message, String::new());
                return;
            }
        };
        tracing::info!(job = %job_id, cut = ?measured.cut, sparsity = measured.pruned_fraction,
            share_candidates = measured.share_candidates.len(),
            precision = ?measured.precision.as_ref().and_then(|p| p.choice.as_ref().ok())
                .map(|c| c.bits_per_weight),
            "measured; compressing");
        coordinator.start_compression(job_id, measured, recipe);
        return;
    }
    let wall = started.elapsed().as_secs_f64();
    let report = build_report(job_id, &spec, &tasks, wall, retries, &names);
    let outcome = match finish_plan(&spec, &compressing(&tasks)) {
        Err(e) => Err(e),
        // A file to assemble (unless a gate failed: then nothing is kept but the report).
        Ok(FinishPlan {
            assembly: Some(assembly),
            ..
        }) if phase == Phase::Compressing && report.gates.passed => {
            match assembly_tasks(&spec, &tasks, &assembly).await {
                Ok(assembly_tasks) => {
                    coordinator.start_assembly(job_id, assembly_tasks);
                    return;
                }
                Err(e) => Err(e),
            }
        }
        Ok(finish) => {
            coordinator.start_finalizing(job_id);
            tokio::time::sleep(coordinator.config().finalize_delay).await;
            let signing_key = coordinator.config().signing_key.as_deref();
            reassemble(&spec, &tasks, &finish, report, job_id, signing_key).await
        }
    };
    let (state, message, report_json) = outcome.unwrap_or_else(|e| {
        (
            JobState::Failed,
            format!("finalizing failed: {e}"),
            String::new(),
        )
    });
    tracing::info!(job = %job_id, state = state.label(), "{message}");
    coordinator.set_outcome(job_id, state, message, report_json);
}

async fn put_json(
    out: &StoreLocation,
    name: &str,
    bytes: Vec<u8>,
) -> Result<ManifestEntry, StoreError> {
    let entry = ManifestEntry {
        name: name.to_string(),
        size: bytes.len() as u64,
        blake3: blake3::hash(&bytes).to_hex().to_string(),
    };
    out.put(name, Bytes::from(bytes)).await?;
    Ok(entry)
}

fn json_bytes(value: &impl Serialize) -> Vec<u8> {
    // Our own plain data types always serialize.
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

async fn reassemble(
    spec: &JobSpec,
    tasks: &[TaskSlot],
    finish: &FinishPlan,
    report: Report,
    job_id: &str,
    signing_key: Option<&SigningKey>,
) -> Result<(JobState, String, String), StoreError> {
    let out = StoreLocation::open(&spec.out_url)?;
    let model = StoreLocation::open(&spec.model_url)?;
    let mut objects = Vec::new();
    if let Some(assembly) = &finish.assembly {
        objects.extend(commit_assembled(&out, tasks).await?);
        // The parts are inside the assembled files now (or, when a gate failed, not needed),
        // as are the heads and tails the coordinator wrote.
        let mut parts: Vec<String> = Vec::new();
        for slot in tasks {
            match &slot.assemble {
                None => parts.push(slot.plan.output_name.clone()),
                Some(assemble) => parts.extend(assemble.parts.iter().cloned()),
            }
        }
        // In-place files whose hashing never ran (a gate failed) are not outputs either, nor
        // is an archive assembled early but not committed.
        let staging = spec.in_place.iter().flat_map(|p| &p.files).map(|f| &f.1);
        parts.extend(staging.cloned());
        let early = spec.early_assembly.iter().map(|e| &e.object.staging);
        parts.extend(early.cloned());
        parts.sort();
        parts.dedup();
        for part in &parts {
            out.delete(part).await?;
        }
        out.remove_empty_dir(parts_dir(assembly));
    } else {
        objects.extend(shard_entries(&out, tasks).await?);
        if let Some(index) = &finish.index {
            let index = ShardIndex {
                metadata: BTreeMap::from([("total_size", index.total_size)]),
                weight_map: &index.weight_map,
            };
            objects.push(put_json(&out, INDEX_NAME, json_bytes(&index)).await?);
        }
        if finish.copy_companions {
            // Weights decoded from FP8 with scales or from packed codes are no longer what the
            // input's own quantization_config (DeepSeek's `fp8`, compressed-tensors') describes.
            let decoded = tasks
                .iter()
                .any(|t| t.plan.tensors.iter().any(|x| x.is_decoded()));
            for name in companion_names(&model).await? {
                let mut bytes = model.get(&name).await?.to_vec();
                let config = finish.quantization_config.as_ref();
                if name == "config.json" && (config.is_some() || decoded) {
                    bytes = with_quantization_config(&model.describe(&name), &bytes, config)?;
                }
                objects.push(put_json(&out, &name, bytes).await?);
            }
        }
    }
    let report_bytes = json_bytes(&report);
    let report_json = String::from_utf8_lossy(&report_bytes).into_owned();
    objects.push(put_json(&out, REPORT_NAME, report_bytes).await?);
    let page = crate::report_html::render(&report).into_bytes();
    objects.push(put_json(&out, crate::report_html::REPORT_HTML_NAME, page).await?);
    if !report.gates.function_space.is_empty() {
        let message = format!(
            "function-space gate failed: {}. No manifest written; see {}",
            report.gates.function_space.join("; "),
            out.describe(REPORT_NAME)
        );
        return Ok((JobState::Failed, message, report_json));
    }
    if !report.gates.passed {
        let worst: Vec<String> = report
            .gates
            .violations
            .iter()
            .take(5)
            .map(|v| {
                format!(
                    "{} {} = {:.5} (limit {})",
                    v.tensor, v.metric, v.value, v.limit
                )
            })
            .collect();
        let message = format!(
            "accuracy gate failed for {} tensor(s); worst: {}. No manifest written; see {}",
            report.gates.violations.len(),
            worst.join("; "),
            out.describe(REPORT_NAME)
        );
        return Ok((JobState::Failed, message, report_json));
    }
    objects.sort_by(|a, b| a.name.cmp(&b.name));
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        created_by: format!("shardpress {}", env!("CARGO_PKG_VERSION")),
        job_id: job_id.to_string(),
        model_url: shardpress_store::redact(&spec.model_url),
        recipe: spec.recipe.describe(),
        objects,
    };
    let manifest_bytes = json_bytes(&manifest);
    let signed = write_signature(&out, &manifest_bytes, signing_key).await?;
    put_json(&out, MANIFEST_NAME, manifest_bytes).await?;
    // The manifest is the commit point: the journal of the job is no longer needed.
    if let Err(e) = crate::journal::Journal::at(out.clone()).remove().await {
        tracing::warn!(job = %job_id, "could not delete the job's journal: {e}");
    }
    let mut message = match spec.format {
        OutputFormat::Safetensors | OutputFormat::CompressedTensors => format!(
            "compressed {} tensors in {} {} shards to {}",
            report.summary.tensors,
            tasks.len(),
            spec.format.as_str(),
            out.url()
        ),
        OutputFormat::Spz | OutputFormat::Gguf => {
            let mut files: Vec<&str> = tasks
                .iter()
                .filter(|t| t.assemble.is_some())
                .map(|t| t.plan.output_name.as_str())
                .collect();
            files.dedup();
            format!(
                "compressed {} tensors from {} parts into {}{}",
                report.summary.tensors,
                compressing(tasks).len(),
                out.describe(files.first().copied().unwrap_or_default()),
                match files.len() {
                    1 => String::new(),
                    n => format!(" and {} more split files", n - 1),
                }
            )
        }
    };
    if let Some(outcome) = &spec.calibrated {
        message.push_str(&crate::calibration::summary_line(outcome));
    }
    if let Some(key_id) = signed {
        message.push_str(&format!("; manifest signed by key {key_id}"));
    }
    message.push_str(&format!(
        "; charts and tables in {}",
        out.describe(crate::report_html::REPORT_HTML_NAME)
    ));
    Ok((JobState::Succeeded, message, report_json))
}

/// Writes the signature of `manifest` (its exact bytes) as [`SIGNATURE_NAME`], before the
/// manifest: a manifest is never committed without its signature. Without a key, a stale
/// signature (of an earlier job in this output) is removed, since it would not match.
async fn write_signature(
    out: &StoreLocation,
    manifest: &[u8],
    key: Option<&SigningKey>,
) -> Result<Option<KeyId>, StoreError> {
    let Some(key) = key else {
        out.delete(SIGNATURE_NAME).await?;
        return Ok(None);
    };
    let signature = key.sign(manifest);
    out.put(SIGNATURE_NAME, Bytes::from(signature.to_text()))
        .await?;
    Ok(Some(signature.key_id))
}

/// The workers' measured widths as the chooser takes them, or the first one that is not
/// among the recipe's `candidates` (a worker's report is not trusted to name only those).
fn precision_candidates(
    measured: &[&PrecisionCandidates],
    candidates: &[Width],
) -> Result<Vec<TensorCandidates>, PrecisionError> {
    (measured.iter())
        .map(|t| {
            let widths = (t.candidates.iter()).map(|c| {
                let text = format!("{}{}", c.bits, c.granularity);
                match Width::parse(&text) {
                    Ok(width) if candidates.contains(&width) => Ok(Candidate {
                        width,
                        bits_per_weight: c.bits_per_weight,
                        rel_error_sq: c.rel_error_sq,
                    }),
                    _ => Err(PrecisionError::UnknownWidth {
                        tensor: t.name.clone(),
                        width: text,
                    }),
                }
            });
            Ok(TensorCandidates {
                name: t.name.clone(),
                params: t.params,
                calibration_weighted: t.calibration_weighted,
                candidates: widths.collect::<Result<_, _>>()?,
            })
        })
        .collect()
}

/// What the measuring round's reports imply: the global cut of the summed magnitude
/// histograms, and the shortlist of near-identical tensor pairs from their sketches.
fn conclude_measuring(
    spec: &JobSpec,
    tasks: &[TaskSlot],
    started: std::time::Instant,
    worker_names: &HashMap<String, String>,
) -> Measured {
    let reports: Vec<&CompleteTaskRequest> = tasks
        .iter()
        .filter_map(|t| t.result.as_ref().map(|r| &r.report))
        .collect();
    let mut measured = Measured {
        seconds: started.elapsed().as_secs_f64(),
        tasks: tasks
            .iter()
            .filter_map(|t| Some(TaskReport::new(t, t.result.as_ref()?, worker_names)))
            .collect(),
        ..Default::default()
    };
    if let Some(target) = spec.recipe.global_sparsity() {
        let mut merged = vec![0u64; MAGNITUDE_BINS];
        for report in &reports {
            for (total, &count) in merged.iter_mut().zip(&report.magnitude_histogram) {
                *total += count;
            }
        }
        // No targeted weights: nothing to cut (bin 0 with no ties dropped drops nothing).
        let cut = GlobalCut::from_histogram(&merged, target).unwrap_or(GlobalCut {
            bin: 0,
            tie_fraction: 0.0,
        });
        let params: u64 = merged.iter().sum();
        let below: u64 = merged[..cut.bin as usize].iter().sum();
        let dropped = below as f64 + cut.tie_fraction * merged[cut.bin as usize] as f64;
        measured.cut = Some(cut);
        measured.pruned_params = params;
        measured.pruned_fraction = if params == 0 {
            0.0
        } else {
            dropped / params as f64
        };
    }
    if let Some(mixed) = spec.recipe.mixed_precision.as_ref() {
        // A tensor scored on the calibration data (a sensitivity step) is chosen by that
        // score, not by its weight error (every quantized tensor has the latter).
        let weighted: std::collections::HashSet<&str> = (reports.iter())
            .flat_map(|r| &r.precision)
            .filter(|t| t.calibration_weighted)
            .map(|t| t.name.as_str())
            .collect();
        let scores: Vec<&PrecisionCandidates> = (reports.iter())
            .flat_map(|r| &r.precision)
            .filter(|t| t.calibration_weighted || !weighted.contains(t.name.as_str()))
            .collect();
        let tensors = precision_candidates(&scores, &mixed.candidates_for(spec.format));
        let (tensors, choice) = match tensors {
            Ok(tensors) => {
                let choice = precision::choose(&tensors, mixed.target_bpw);
                (tensors, choice)
            }
            Err(e) => (Vec::new(), Err(e)),
        };
        measured.precision = Some(MeasuredPrecision { tensors, choice });
    }
    if let Some(threshold) = spec.recipe.share_cosine {
        let planned: HashMap<&str, &PlannedTensor> = tasks
            .iter()
            .flat_map(|t| &t.plan.tensors)
            .map(|t| (t.name.as_str(), t))
            .collect();
        let sketched: Vec<(&PlannedTensor, &Vec<f32>)> = reports
            .iter()
            .flat_map(|r| &r.sketches)
            .filter_map(|s| planned.get(s.name.as_str()).map(|&t| (t, &s.values)))
            .collect();
        let kinds: Vec<_> = sketched.iter().map(|(t, _)| (t.dtype, &t.shape)).collect();
        let sketches: Vec<&[f32]> = sketched.iter().map(|(_, s)| s.as_slice()).collect();
        for (b, a) in similarity::shortlist(&kinds, &sketches, threshold) {
            measured
                .share_candidates
                .insert(sketched[b].0.name.clone(), sketched[a].0.clone());
        }
    }
    measured
}

/// Where a format's parts (and the staging files of sliced assembly) are written.
fn parts_dir(assembly: &Assembly) -> &'static str {
    match assembly {
        Assembly::Spz => PARTS_DIR,
        Assembly::Gguf(_) => gguf_format::PARTS_DIR,
    }
}

/// The assembly tasks of a job whose compressing tasks are done: each output file's layout
/// cut into slices for the workers.
async fn assembly_tasks(
    spec: &JobSpec,
    tasks: &[TaskSlot],
    assembly: &Assembly,
) -> Result<Vec<(PlannedTask, AssembleSlice)>, StoreError> {
    let out = StoreLocation::open(&spec.out_url)?;
    let mut queued = Vec::new();
    let plan = |name: &str, index: usize| PlannedTask {
        index: index as u32,
        group: "assemble".into(),
        tensors: Vec::new(),
        output_name: name.to_string(),
        input_bytes: 0,
    };
    if let Some(in_place) = &spec.in_place {
        let hashing =
            crate::assembly::hash_in_place(&out, in_place, tasks, spec.assembly_slice_bytes)?;
        tracing::info!(
            files = in_place.files.len(),
            slices = hashing.len(),
            "written in place; queueing the hashing of the files"
        );
        for (name, slice) in hashing {
            queued.push((plan(&name, tasks.len() + queued.len()), slice));
        }
        return Ok(queued);
    }
    let files = match assembly {
        Assembly::Spz => vec![spz_layout(spec, tasks).await?],
        Assembly::Gguf(gguf) => gguf_layouts(spec, tasks, gguf).await?,
    };
    for (name, layout) in files {
        let staging = crate::assembly::staging_name(parts_dir(assembly), &name);
        let slices = match (&spec.early_assembly, assembly) {
            (Some(early), Assembly::Spz) => crate::assembly::after_early(layout, early, tasks)?,
            _ => {
                let bytes = spec.assembly_slice_bytes;
                crate::assembly::prepare(&out, &name, &staging, layout, bytes).await?
            }
        };
        tracing::info!(
            parts = slices.iter().map(|s| s.parts.len()).sum::<usize>(),
            slices = slices.len(),
            "queueing the assembly of {name}"
        );
        for slice in slices {
            queued.push((plan(&name, tasks.len() + queued.len()), slice));
        }
    }
    Ok(queued)
}

/// Manifest entries of the assembled files: a file written in slices is completed here
/// (renamed into place, or its upload completed) with the hash merged from its slices'.
async fn commit_assembled(
    out: &StoreLocation,
    tasks: &[TaskSlot],
) -> Result<Vec<ManifestEntry>, StoreError> {
    let mut files: Vec<Vec<&TaskSlot>> = Vec::new();
    for slot in tasks.iter().filter(|t| t.assemble.is_some()) {
        match files.last_mut() {
            Some(file) if file[0].plan.output_name == slot.plan.output_name => file.push(slot),
            _ => files.push(vec![slot]),
        }
    }
    let mut entries = Vec::new();
    for file in &files {
        // One worker wrote the whole file under its name; else it is in a shared object.
        let whole = match file.as_slice() {
            [one]
                if one
                    .assemble
                    .as_ref()
                    .is_some_and(|a| !a.hash_only && a.slices == 1) =>
            {
                Some(*one)
            }
            _ => None,
        };
        match whole {
            Some(slot) => entries.extend(shard_entries(out, [slot]).await?),
            None => {
                let name = &file[0].plan.output_name;
                entries.push(crate::assembly::commit(out, name, file).await?);
            }
        }
    }
    Ok(entries)
}

/// Builds the archive's index from the finished tasks, writes the archive's head (magic) and
/// tail (companion files, index, footer) next to the parts, and returns the archive's layout.
async fn spz_layout(
    spec: &JobSpec,
    tasks: &[TaskSlot],
) -> Result<(String, AssembleSlice), StoreError> {
    let model = StoreLocation::open(&spec.model_url)?;
    let mut file_names: Vec<String> = tasks
        .iter()
        .flat_map(|t| t.plan.tensors.iter().map(|x| x.source_file.clone()))
        .collect();
    file_names.sort();
    file_names.dedup();
    let mut files = Vec::with_capacity(file_names.len());
    for name in &file_names {
        let size = model.size(name).await?;
        let prefix = model.get_range(name, 0..size.min(8)).await?;
        let header_err = |cause| StoreError::Header {
            object: model.describe(name),
            cause,
        };
        let len = header_len_from_prefix(&prefix, size).map_err(header_err)?;
        let header = model.get_range(name, 8..8 + len).await?;
        let header = String::from_utf8(header.to_vec()).map_err(|_| StoreError::Invalid {
            object: model.describe(name),
            reason: "header is not UTF-8".into(),
        })?;
        files.push(SpzFile {
            name: name.clone(),
            header,
            size,
        });
    }
    // Records of tensors identical to an earlier one are left out of the archive, and
    // near-identical tensors have none; their index entries point at the record they share.
    let crate::archive::DataLayout {
        mut layout,
        end: offset,
        located,
        shared,
    } = crate::archive::data_layout(tasks)?;
    let mut tensors = Vec::new();
    for slot in tasks.iter().filter(|t| t.assemble.is_none()) {
        let Some(outcome) = &slot.result else {
            continue;
        };
        for result in &outcome.report.tensors {
            let invalid = |reason: String| StoreError::Invalid {
                object: slot.plan.output_name.clone(),
                reason,
            };
            let planned = slot.plan.tensors.iter().find(|t| t.name == result.name);
            let planned = planned.ok_or_else(|| {
                invalid(format!(
                    "worker reported tensor {} that the task did not hold",
                    result.name
                ))
            })?;
            let same_as = shared.get(&result.name);
            let key = same_as
                .filter(|_| result.record_len == 0)
                .unwrap_or(&result.name);
            let &(at, len, blake3) = located.get(key.as_str()).ok_or_else(|| {
                invalid(format!(
                    "tensor {} has no record to read it from",
                    result.name
                ))
            })?;
            tensors.push(SpzTensor {
                name: result.name.clone(),
                file: file_names
                    .binary_search(&planned.source_file)
                    .unwrap_or_default(),
                dtype: result.dtype.clone(),
                shape: result.shape.clone(),
                data_start: planned.data_start,
                data_end: planned.data_end,
                offset: at,
                len,
                blake3: blake3.to_string(),
                plan: result.pass.clone(),
                same_as: same_as.cloned(),
            });
        }
    }
    let mut suffix = Vec::new();
    let mut companions = Vec::new();
    for name in companion_names(&model).await? {
        let coded = entropy::compress(Layout::Bytes, &model.get(&name).await?);
        companions.push(SpzBlob {
            name,
            offset: offset + suffix.len() as u64,
            len: coded.len() as u64,
            blake3: blake3::hash(&coded).to_hex().to_string(),
        });
        suffix.extend_from_slice(&coded);
    }
    let index_offset = offset + suffix.len() as u64;
    let index = SpzIndex {
        version: spz::VERSION,
        recipe: spec.recipe.describe(),
        files,
        tensors,
        companions,
    }
    .to_json();
    suffix.extend_from_slice(&index);
    suffix.extend_from_slice(&spz::footer(index_offset, &index));
    let out = StoreLocation::open(&spec.out_url)?;
    let tail_name = format!("{PARTS_DIR}/tail.bin");
    if spec.early_assembly.is_none() {
        crate::archive::write_head(&out).await?;
    }
    layout.ranges.push(PartRange {
        part: layout.parts.len() as u32,
        start: 0,
        end: suffix.len() as u64,
    });
    layout.parts.push(tail_name.clone());
    layout.part_sizes.push(suffix.len() as u64);
    out.put(&tail_name, Bytes::from(suffix)).await?;
    Ok((SPZ_NAME.into(), layout))
}

/// Writes each GGUF file's head (header, metadata, tokenizer) next to the parts and returns
/// the files' layouts (head, then parts), after checking that every part has exactly the
/// size the layout gives it.
async fn gguf_layouts(
    spec: &JobSpec,
    tasks: &[TaskSlot],
    assembly: &GgufAssembly,
) -> Result<Vec<(String, AssembleSlice)>, StoreError> {
    let model = StoreLocation::open(&spec.model_url)?;
    let out = StoreLocation::open(&spec.out_url)?;
    let files =
        crate::gguf::build_files(&model, &spec.facts, assembly, spec.max_file_bytes).await?;
    let slots: Vec<&TaskSlot> = tasks.iter().filter(|t| t.assemble.is_none()).collect();
    let laid_out: usize = files.iter().map(|f| f.tasks.len()).sum();
    if slots.len() != laid_out {
        return Err(StoreError::Invalid {
            object: out.url().to_string(),
            reason: format!(
                "{} tasks but the GGUF layout has {laid_out} parts",
                slots.len()
            ),
        });
    }
    let mut layouts = Vec::with_capacity(files.len());
    for (i, file) in files.into_iter().enumerate() {
        let head_name = format!("{}/head-{:05}.bin", gguf_format::PARTS_DIR, i + 1);
        let mut parts = vec![head_name.clone()];
        let mut part_sizes = vec![file.head.len() as u64];
        for (slot, &expected) in slots[file.tasks.clone()].iter().zip(&file.part_sizes) {
            let written = slot.result.as_ref().map_or(0, |r| r.report.output_bytes);
            if written != expected {
                return Err(StoreError::Invalid {
                    object: out.describe(&slot.plan.output_name),
                    reason: format!(
                        "its worker wrote {written} bytes, the GGUF layout gives this part {expected}"
                    ),
                });
            }
            parts.push(slot.plan.output_name.clone());
            part_sizes.push(expected);
        }
        out.put(&head_name, Bytes::from(file.head)).await?;
        let ranges = part_sizes
            .iter()
            .enumerate()
            .filter(|(_, &size)| size > 0)
            .map(|(part, &size)| PartRange {
                part: part as u32,
                start: 0,
                end: size,
            })
            .collect();
        let layout = AssembleSlice {
            parts,
            part_sizes,
            ranges,
            ..Default::default()
        };
        layouts.push((file.name, layout));
    }
    Ok(layouts)
}

/// Manifest entries of the shards, checking each object's size against what its worker said.
async fn shard_entries(
    out: &StoreLocation,
    tasks: impl IntoIterator<Item = &TaskSlot>,
) -> Result<Vec<ManifestEntry>, StoreError> {
    let mut entries = Vec::new();
    for slot in tasks {
        let name = &slot.plan.output_name;
        let reported = slot.result.as_ref().map(|r| &r.report);
        let (expected, blake3) = reported
            .map(|r| (r.output_bytes, r.output_blake3.clone()))
            .unwrap_or_default();
        let size = out.size(name).await?;
        if size != expected {
            return Err(StoreError::Invalid {
                object: out.describe(name),
                reason: format!("size {size} differs from the {expected} bytes its worker wrote"),
            });
        }
        entries.push(ManifestEntry {
            name: name.clone(),
            size,
            blake3,
        });
    }
    Ok(entries)
}

/// `model.safetensors.index.json` as Hugging Face writes it.
#[derive(Serialize)]
struct ShardIndex<'a> {
    metadata: BTreeMap<&'static str, u64>,
    weight_map: &'a BTreeMap<String, String>,
}

/// `config.json` with `quantization_config` set (an existing one is replaced), or removed.
fn with_quantization_config(
    object: &str,
    bytes: &[u8],
    quantization_config: Option<&serde_json::Value>,
) -> Result<Vec<u8>, StoreError> {
    let mut config: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| StoreError::Invalid {
            object: object.to_owned(),
            reason: format!("not valid JSON, so its quantization_config cannot be set: {e}"),
        })?;
    let Some(fields) = config.as_object_mut() else {
        return Err(StoreError::Invalid {
            object: object.to_owned(),
            reason: "not a JSON object, so its quantization_config cannot be set".into(),
        });
    };
    match quantization_config {
        Some(q) => fields.insert("quantization_config".into(), q.clone()),
        None => fields.remove("quantization_config"),
    };
    Ok(json_bytes(&config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardpress_proto::v1::PrecisionCandidate;

    #[test]
    fn measured_widths_are_read_back_and_unknown_ones_refused() {
        let measured = |bits: u32, granularity: &str| PrecisionCandidates {
            name: "w".into(),
            params: 64,
            candidates: vec![PrecisionCandidate {
                bits,
                granularity: granularity.into(),
                bits_per_weight: 4.5,
                rel_error_sq: 0.01,
            }],
            calibration_weighted: false,
        };
        let candidates = [Width::bits(4), Width::parse("4g32").unwrap()];
        let read = precision_candidates(&[&measured(4, "g32")], &candidates).unwrap();
        assert_eq!(read[0].candidates[0].width, candidates[1]);
        let read = precision_candidates(&[&measured(4, "")], &candidates).unwrap();
        assert_eq!(read[0].candidates[0].width, candidates[0]);
        for (bits, granularity) in [(4, "g64"), (8, ""), (4, "x"), (300, "")] {
            let err = precision_candidates(&[&measured(bits, granularity)], &candidates)
                .unwrap_err()
                .to_string();
            assert!(err.contains("not one of the recipe's candidates"), "{err}");
        }
    }
}
