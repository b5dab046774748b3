//! Turning a submission into a planned job: the recipe is validated, the model's files are
//! found, each header is read with two range reads and validated, and the pure planner in core
//! splits the tensors into tasks. Every problem is reported here, before any work starts.

use futures::{StreamExt, TryStreamExt};
use shardpress_core::codec::{PlanError, TensorPlan};
use shardpress_core::dtype::DType;
use shardpress_core::format::gguf as gguf_format;
use shardpress_core::format::spz as spz_format;
use shardpress_core::format::{Assembly, ModelFacts};
use shardpress_core::plan::{plan_tasks_with, PlannedTask, SourceFile};
use shardpress_core::recipe::{OutputFormat, PassKind, Recipe};
use shardpress_proto::v1::SubmitJobRequest;
use shardpress_store::shared::SharedWrites;
use shardpress_store::{read_source_file, resolve_model, ModelFiles, StoreLocation};

use crate::finalize::MANIFEST_NAME;
use crate::job::JobSpec;
use crate::journal::{Journal, JournalHead, Recorded, Round, JOURNAL_DIR};
use crate::{Coordinator, CoordinatorError};

/// Headers read concurrently while planning.
const HEADER_READ_CONCURRENCY: usize = 8;

/// What a successful submission returns.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub job_id: String,
    pub task_count: u32,
    pub total_bytes: u64,
    pub warnings: Vec<String>,
    /// Tasks an earlier run of this job finished (see [`crate::journal`]).
    pub resumed_tasks: u32,
}

/// A job planned from its model's headers (recipe, format and every tensor checked), before
/// any output is touched: what `submit` goes on with, and what `shardpress plan` shows.
pub struct Planned {
    pub model: ModelFiles,
    pub files: Vec<SourceFile>,
    pub recipe: Recipe,
    pub format: OutputFormat,
    pub facts: ModelFacts,
    pub budget: u64,
    pub assembly_slice_bytes: u64,
    pub plan: Vec<PlannedTask>,
    pub warnings: Vec<String>,
}

/// Plans the job `request` asks for (its output location is not looked at); a request
/// without a task budget gets `default_budget`.
pub async fn plan_job(
    request: &SubmitJobRequest,
    default_budget: u64,
) -> Result<Planned, CoordinatorError> {
    let recipe = Recipe::from_yaml(&request.recipe_yaml)?;
    let format = match request.format.as_str() {
        "" => recipe.format,
        other => OutputFormat::parse(other).ok_or_else(|| {
            CoordinatorError::InvalidRequest(format!(
                "unknown output format {other:?}: use one of {}",
                OutputFormat::names()
            ))
        })?,
    };
    format
        .spec()
        .check_recipe(&recipe)
        .map_err(|e| CoordinatorError::InvalidRequest(e.to_string()))?;
    let model = resolve_model(&request.model_url).await?;
    let files: Vec<_> = futures::stream::iter(model.files.clone())
        .map(|name| {
            let root = model.root.clone();
            async move { read_source_file(&root, &name).await }
        })
        .buffered(HEADER_READ_CONCURRENCY)
        .try_collect()
        .await?;
    let budget = match request.task_budget_bytes {
        0 => default_budget,
        budget => budget,
    };
    // A GGUF file or a gguf pass depends on the whole model (architecture, layer count).
    let needs_model = format == OutputFormat::Gguf
        || recipe
            .passes
            .iter()
            .any(|p| matches!(p.kind, PassKind::Ggml { .. }));
    let facts = if needs_model {
        let has_lm_head = files
            .iter()
            .any(|f| f.header.tensors.iter().any(|t| t.name == "lm_head.weight"));
        crate::gguf::model_facts(&model.root, has_lm_head)
            .await
            .map_err(|e| CoordinatorError::InvalidRequest(e.to_string()))?
    } else {
        ModelFacts::default()
    };
    let warnings = unmatched_entries(&recipe, &files, request.allow_unmatched)?;
    let weight_shapes = read_weight_shapes(&model.root, &files).await?;
    let mut plan = plan_tasks_with(&files, budget, &weight_shapes)?;
    // Every tensor's pass combination, and whether the format can store it, is checked
    // now, not mid-job (FP8 weights with scales as the BF16 tensors they are decoded to).
    // So is every width a mixed-precision job may choose.
    let widths = (recipe.mixed_precision.as_ref()).map(|m| m.candidates_for(format));
    for t in plan.iter().flat_map(|task| &task.tensors) {
        let refused =
            |e: PlanError| CoordinatorError::InvalidRequest(format!("{}: {e}", t.source_file));
        let planned = TensorPlan::for_output(&recipe, format, &facts, &t.name, t.dtype, &t.shape)
            .map_err(refused)?;
        for &width in widths.iter().flatten().filter(|_| planned.has_width()) {
            let described = (t.name.as_str(), t.dtype, &t.shape[..]);
            TensorPlan::for_output_at(&recipe, format, &facts, described, Some(width)).map_err(
                |e| {
                    CoordinatorError::InvalidRequest(format!(
                        "{}: mixed_precision candidate {width} ({}): {e}",
                        t.source_file,
                        width.describe()
                    ))
                },
            )?;
        }
        if format == OutputFormat::Spz && t.is_decoded() {
            let stored = match &t.scales {
                Some(scales) => format!("FP8 with scales ({})", scales.name),
                None => "compressed-tensors packed codes".to_owned(),
            };
            return Err(CoordinatorError::InvalidRequest(format!(
                "{}: {} is {stored}, which this job decodes, and .spz restores the original files; use --format safetensors, compressed-tensors or gguf",
                t.source_file, t.name
            )));
        }
    }
    let assembly_slice_bytes = match request.assembly_slice_bytes {
        0 => crate::assembly::DEFAULT_SLICE_BYTES,
        bytes => bytes,
    };
    crate::assembly::check_slice_bytes(assembly_slice_bytes)
        .map_err(CoordinatorError::InvalidRequest)?;
    let total = plan.len();
    for task in &mut plan {
        task.output_name = format.spec().task_output_name(task.index as usize, total);
    }
    Ok(Planned {
        model,
        files,
        recipe,
        format,
        facts,
        budget,
        assembly_slice_bytes,
        plan,
        warnings,
    })
}

/// The bytes a planned job's output takes, where the plan alone gives them: the tensor data
/// of safetensors and compressed-tensors shards (headers and companion files not counted),
/// GGUF files exactly; `None` for `.spz`, whose entropy-coded size depends on the values, and
/// for a bit budget's compressed-tensors or GGUF output, whose size depends on the widths the
/// measuring round chooses.
pub async fn output_size(planned: &Planned) -> Result<Option<u64>, CoordinatorError> {
    if planned.recipe.needs_precision_choice() && planned.format != OutputFormat::Safetensors {
        return Ok(None);
    }
    let spec = JobSpec {
        model_url: planned.model.root.url().to_string(),
        out_url: String::new(),
        out_identity: String::new(),
        recipe: planned.recipe.clone(),
        task_budget: planned.budget,
        format: planned.format,
        facts: planned.facts.clone(),
        max_file_bytes: None,
        assembly_slice_bytes: planned.assembly_slice_bytes,
        in_place: None,
        early_assembly: None,
        measured: None,
        calibration: None,
        calibrated: None,
    };
    let tasks: Vec<&PlannedTask> = planned.plan.iter().collect();
    let finish = crate::finalize::finish_plan(&spec, &tasks)
        .map_err(|e| CoordinatorError::InvalidRequest(e.to_string()))?;
    Ok(match (&finish.index, &finish.assembly) {
        (Some(index), _) => Some(index.total_size),
        (None, Some(Assembly::Gguf(gguf))) => {
            let files = crate::gguf::build_files(&planned.model.root, &spec.facts, gguf, None)
                .await
                .map_err(|e| CoordinatorError::InvalidRequest(e.to_string()))?;
            Some(files.iter().map(|f| f.file_size).sum())
        }
        _ => None,
    })
}

/// Plans and starts the job `request` asks for (or resumes it from its journal), owned by
/// the client `owner` (`None`: an admin).
pub async fn submit(
    coordinator: &std::sync::Arc<Coordinator>,
    request: SubmitJobRequest,
    owner: Option<String>,
) -> Result<Submitted, CoordinatorError> {
    let started = std::time::Instant::now();
    if request.model_url.is_empty() || request.out_url.is_empty() {
        return Err(CoordinatorError::InvalidRequest(
            "model_url and out_url are required".into(),
        ));
    }
    let Planned {
        model,
        files,
        recipe,
        format,
        facts,
        budget,
        assembly_slice_bytes,
        plan,
        mut warnings,
    } = plan_job(&request, coordinator.config().default_task_budget).await?;
    let out = StoreLocation::open(&request.out_url)?;
    // Compared where they really are: a symlink or a percent-encoded name of the model's
    // folder is the model's folder, whose shards the output's names would overwrite.
    if out.identity() == model.root.identity() {
        return Err(CoordinatorError::InvalidRequest(format!(
            "the output {} is the model's own directory ({}): choose another so the input is not overwritten",
            out.url(),
            model.root.identity()
        )));
    }
    // A calibrated or evaluated job's first round: its samples read and tokenized, and
    // its steps planned, before anything is written.
    let calibration = crate::calibration::prepare(
        &request,
        &model.root,
        &files,
        &recipe,
        format,
        &facts,
        &plan,
    )
    .await?;
    let _reserved = coordinator.reserve_output(&out.identity())?;
    let task_count = plan.len() as u32
        + (calibration.as_ref()).map_or(0, |c| {
            (c.plan.steps.len() + c.sensitivity.steps.len()) as u32
        });
    let total_bytes = plan.iter().map(|t| t.input_bytes).sum();
    let mut spec = JobSpec {
        model_url: model.root.url().to_string(),
        out_url: out.url().to_string(),
        out_identity: out.identity(),
        recipe,
        task_budget: budget,
        format,
        facts,
        max_file_bytes: (request.max_file_bytes > 0).then_some(request.max_file_bytes),
        assembly_slice_bytes,
        in_place: None,
        early_assembly: None,
        measured: None,
        calibration: calibration.map(std::sync::Arc::new),
        calibrated: None,
    };
    let journal = Journal::at(out.clone());
    let head = JournalHead::new(&coordinator.new_job_id(), &request, &spec, &plan);
    let config = coordinator.config();
    journal
        .check_claim(&config.claimant, config.claim_ttl)
        .await?;
    let mut earlier = check_output(&out, request.overwrite, &journal, &head).await?;
    // The finishing step is planned once now, so that what it reads (a GGUF file's tokenizer)
    // is refused before any work starts.
    let planned: Vec<&PlannedTask> = plan.iter().collect();
    let finish = crate::finalize::finish_plan(&spec, &planned)
        .map_err(|e| CoordinatorError::InvalidRequest(e.to_string()))?;
    let gguf_files = match &finish.assembly {
        Some(Assembly::Gguf(gguf)) => Some(
            crate::gguf::build_files(&model.root, &spec.facts, gguf, spec.max_file_bytes)
                .await
                .map_err(|e| CoordinatorError::InvalidRequest(e.to_string()))?,
        ),
        _ => None,
    };
    // Everything is checked: only now is an earlier output replaced (or an earlier run of
    // this job resumed), and the new one begun.
    let journal_read = std::time::Instant::now();
    // Attempts of an earlier run (a coordinator stopped meanwhile) will never be committed:
    // the uploads begun for them go, whether this job resumes or replaces that one.
    let aborted = journal.abort_recorded_uploads().await?;
    if aborted > 0 {
        tracing::info!(
            aborted,
            "aborted the uploads of an earlier run's unfinished attempts"
        );
    }
    let (job_id, mut restored) = match earlier.resume.take() {
        Some(resumed) => (resumed.job_id, journal.results().await?),
        None => {
            warnings.extend(clear_output(&out, earlier).await?);
            journal.begin(&head).await?;
            (head.job_id.clone(), Vec::new())
        }
    };
    // Written in place at offsets the layout fixes now, unless mixed precision will change
    // the tensors' types (and so their sizes) after measuring: such a job's parts are
    // assembled at the end, from the layout of the widths chosen.
    let gguf_files = gguf_files.filter(|_| !spec.recipe.needs_precision_choice());
    if let Some(files) = gguf_files {
        if out.shared_writes() == Some(SharedWrites::PositionedFile) {
            let staging = |name: &str| crate::assembly::staging_name(gguf_format::PARTS_DIR, name);
            // Resuming, the files hold the parts that finished tasks wrote in place.
            let mut kept = true;
            for file in &files {
                kept &= out.exists(&staging(&file.name)).await?;
            }
            if !kept {
                restored.retain(|r| r.round == Round::Measure);
            }
            let in_place =
                crate::assembly::in_place(&out, files, plan.len(), staging, kept).await?;
            spec.in_place = Some(in_place);
        }
    }
    if let (Some(Assembly::Spz), Some(SharedWrites::PositionedFile)) =
        (&finish.assembly, out.shared_writes())
    {
        let name = crate::finalize::SPZ_NAME;
        let staging = crate::assembly::staging_name(spz_format::PARTS_DIR, name);
        let early =
            crate::assembly::early_assembly(&out, name, &staging, assembly_slice_bytes).await?;
        spec.early_assembly = Some(early);
    }
    journal.claim(&config.claimant, &job_id).await?;
    let steps = spec.calibration.as_ref().map(|c| c.plan.steps.as_slice());
    let rounds = Rounds {
        plan: &plan,
        steps,
        sensitivity: spec.sensitivity_steps(),
    };
    let restored = still_there(&out, &rounds, spec.in_place.is_some(), restored).await?;
    let journal_seconds = journal_read.elapsed().as_secs_f64();
    // A measuring task's result is not kept work (it writes nothing); a sensitivity step's is.
    let resumed_tasks = restored
        .iter()
        .filter(|r| r.round != Round::Measure || r.task as usize >= plan.len())
        .count() as u32;
    tracing::info!(model = %spec.model_url, out = %spec.out_url, tasks = task_count,
        bytes = total_bytes, recipe = %spec.recipe.describe(), resumed_tasks, journal_seconds,
        seconds = started.elapsed().as_secs_f64(), "job planned");
    coordinator.insert_job(&job_id, spec, plan, journal, restored, owner);
    crate::driver::spawn(coordinator.clone(), job_id.clone());
    Ok(Submitted {
        job_id,
        task_count,
        total_bytes,
        warnings,
        resumed_tasks,
    })
}

/// A job's tasks by round, as [`still_there`] checks them.
#[derive(Clone, Copy)]
struct Rounds<'a> {
    plan: &'a [PlannedTask],
    steps: Option<&'a [crate::calibration::CalibStep]>,
    sensitivity: &'a [crate::calibration::CalibStep],
}

/// The journaled results whose output is still where the task wrote it, with the size it
/// reported (a part that an early assembly slice consumed is gone: its task runs again).
async fn still_there(
    out: &StoreLocation,
    rounds: &Rounds<'_>,
    in_place: bool,
    restored: Vec<Recorded>,
) -> Result<Vec<Recorded>, CoordinatorError> {
    let Rounds {
        plan,
        steps,
        sensitivity,
    } = *rounds;
    let checks = restored.into_iter().map(|recorded| async move {
        let task = recorded.task as usize;
        let output = match recorded.round {
            Round::Calibrate => match steps.and_then(|s| s.get(task)) {
                Some(step) => step.output.as_str(),
                None => return Ok(None),
            },
            // The measuring tasks write nothing; its sensitivity steps (after them) write
            // what later steps read.
            Round::Measure if task < plan.len() => return Ok(Some(recorded)),
            Round::Measure => match sensitivity.get(task - plan.len()) {
                Some(step) => step.output.as_str(),
                None => return Ok(None),
            },
            _ => match plan.get(task) {
                Some(task) => task.output_name.as_str(),
                None => return Ok(None),
            },
        };
        let in_place = in_place && recorded.round == Round::Compress;
        if in_place || output.is_empty() {
            return Ok(Some(recorded));
        }
        let size = match out.size(output).await {
            Ok(size) => Some(size),
            Err(shardpress_store::StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok((size == Some(recorded.report.output_bytes)).then_some(recorded))
    });
    let kept: Vec<Option<Recorded>> = futures::stream::iter(checks)
        .buffered(HEADER_READ_CONCURRENCY * 4)
        .try_collect()
        .await?;
    Ok(kept.into_iter().flatten().collect())
}

/// Folders where jobs keep their parts and staging files until they finish.
const PARTS_DIRS: [&str; 2] = [spz_format::PARTS_DIR, gguf_format::PARTS_DIR];

/// What an output location held before the job: every object, the objects of an earlier
/// output that `--overwrite` replaces, and the journal of an earlier run of this same job,
/// which resumes.
struct Earlier {
    present: Vec<String>,
    manifest_lists: Option<Vec<String>>,
    resume: Option<JournalHead>,
}

/// An output location must not hold anything a reader could take for this job's output: an
/// earlier output or any other object is refused, unless `overwrite` (see [`clear_output`]).
/// The journal of an unfinished run of the same job (`head`) is not in the way: the job
/// resumes from it. Only reads.
async fn check_output(
    out: &StoreLocation,
    overwrite: bool,
    journal: &Journal,
    head: &JournalHead,
) -> Result<Earlier, CoordinatorError> {
    let present = out.list_all().await?;
    let finished = present.iter().any(|name| name == MANIFEST_NAME);
    let mut earlier = Earlier {
        present,
        manifest_lists: None,
        resume: None,
    };
    let present = &earlier.present;
    if present.is_empty() {
        return Ok(earlier);
    }
    let unfinished = match finished {
        true => None,
        false => journal.head().await?,
    };
    if let Some(unfinished) = unfinished {
        if overwrite {
            earlier.manifest_lists = Some(unfinished_outputs(&unfinished));
            return Ok(earlier);
        }
        if unfinished.same_job(head) {
            earlier.resume = Some(unfinished);
            return Ok(earlier);
        }
        return Err(CoordinatorError::InvalidRequest(format!(
            "the output {} holds the unfinished job {} (model {}, {} tasks) begun with another model, recipe, format or task budget: submit that job again to resume it, or pass --overwrite to discard it",
            out.url(),
            unfinished.job_id,
            unfinished.model_url,
            unfinished.tasks
        )));
    }
    if !overwrite {
        let examples: Vec<&str> = present.iter().take(3).map(String::as_str).collect();
        let what = match finished {
            true => "a finished output (manifest.json)",
            false => "objects",
        };
        return Err(CoordinatorError::InvalidRequest(format!(
            "the output {} already holds {what}: {} objects, such as {}; choose an empty location, or pass --overwrite to replace an earlier output (only what its manifest lists is removed)",
            out.url(),
            present.len(),
            examples.join(", ")
        )));
    }
    if finished {
        let bytes = out.get(MANIFEST_NAME).await?;
        let manifest: crate::finalize::Manifest =
            serde_json::from_slice(&bytes).map_err(|e| {
                CoordinatorError::InvalidRequest(format!(
                    "cannot overwrite {}: it is not a shardpress manifest ({e}), so what it lists is unknown",
                    out.describe(MANIFEST_NAME)
                ))
            })?;
        let listed = manifest.objects.into_iter().map(|entry| entry.name);
        earlier.manifest_lists = Some(listed.collect());
    }
    Ok(earlier)
}

/// What an unfinished job writes: its tasks' output files, named by its format (the parts
/// folders are removed whole).
fn unfinished_outputs(head: &JournalHead) -> Vec<String> {
    let format = OutputFormat::parse(&head.output_format);
    let names = format.map(|format| {
        (0..head.tasks as usize)
            .map(move |i| format.spec().task_output_name(i, head.tasks as usize))
    });
    names.into_iter().flatten().collect()
}

/// `--overwrite`: removes what the earlier manifest lists (the manifest first: it is the
/// commit point) and the parts folders of an unfinished job, and nothing else; what is left
/// is returned as a warning.
async fn clear_output(
    out: &StoreLocation,
    earlier: Earlier,
) -> Result<Vec<String>, CoordinatorError> {
    let Earlier {
        present,
        manifest_lists,
        resume: _,
    } = earlier;
    let mut remove: Vec<String> = Vec::new();
    if let Some(listed) = manifest_lists {
        out.delete(MANIFEST_NAME).await?;
        out.delete(crate::signing::SIGNATURE_NAME).await?;
        remove.extend(listed.into_iter().filter(|name| present.contains(name)));
    }
    let ours = |name: &str| {
        (PARTS_DIRS.iter().chain([&JOURNAL_DIR])).any(|dir| name.starts_with(&format!("{dir}/")))
    };
    remove.extend(present.iter().filter(|name| ours(name)).cloned());
    for name in &remove {
        out.delete(name).await?;
    }
    for dir in PARTS_DIRS {
        out.remove_empty_dir(dir);
    }
    let kept: Vec<&String> = (present.iter())
        .filter(|name| *name != MANIFEST_NAME && *name != crate::signing::SIGNATURE_NAME)
        .filter(|name| !remove.contains(name))
        .collect();
    Ok(match kept.first() {
        None => Vec::new(),
        Some(first) => vec![format!(
            "--overwrite left {} objects in {} that no manifest lists, such as {first} (verify will report them)",
            kept.len(),
            out.url()
        )],
    })
}

/// A recipe entry (`targets` / `ignore`) that selects no tensor of the model is a mistake
/// (a typo, a class name such as `Linear`, a module this model does not have) that would
/// otherwise compress nothing, or everything, silently: refused, or with `allow` returned as
/// warnings. Built-in recipes are written for many models and are not checked.
fn unmatched_entries(
    recipe: &Recipe,
    files: &[SourceFile],
    allow: bool,
) -> Result<Vec<String>, CoordinatorError> {
    if recipe.is_builtin() {
        return Ok(Vec::new());
    }
    let names = || {
        files
            .iter()
            .flat_map(|f| &f.header.tensors)
            .map(|t| t.name.as_str())
    };
    let unmatched: Vec<String> = (recipe.unmatched(names()).iter())
        .map(|u| u.to_string())
        .collect();
    if unmatched.is_empty() || allow {
        return Ok(unmatched);
    }
    let example = names()
        .find(|n| n.ends_with("proj.weight"))
        .or_else(|| names().next())
        .unwrap_or_default();
    Err(CoordinatorError::InvalidRequest(format!(
        "recipe {}: {} (entries are tensor names such as {example:?}, module names whose `.weight` they select, or `re:` regexes matching a whole name; --allow-unmatched runs anyway)",
        recipe.name,
        unmatched.join("; ")
    )))
}

/// The two numbers each compressed-tensors `….weight_shape` tensor (I64 `[2]`) holds: a
/// packed weight's real shape, which its header does not give.
async fn read_weight_shapes(
    model: &StoreLocation,
    files: &[SourceFile],
) -> Result<std::collections::HashMap<String, [u64; 2]>, CoordinatorError> {
    let mut shapes = std::collections::HashMap::new();
    for file in files {
        let base = file.header.data_start();
        for t in &file.header.tensors {
            if !t.name.ends_with(".weight_shape") || t.dtype != DType::I64 || t.shape != [2] {
                continue;
            }
            let bytes = model
                .get_range(&file.name, base + t.data_offsets.0..base + t.data_offsets.1)
                .await?;
            let dims: Vec<i64> = bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8-byte chunks")))
                .collect();
            match dims[..] {
                [rows, cols] if rows > 0 && cols > 0 => {
                    shapes.insert(t.name.clone(), [rows as u64, cols as u64]);
                }
                _ => {
                    return Err(CoordinatorError::InvalidRequest(format!(
                        "{}: {} holds {dims:?}, not a 2-D shape",
                        file.name, t.name
                    )))
                }
            }
        }
    }
    Ok(shapes)
}

/// `coordinator --resume OUT`: submits again the unfinished job whose journal `out_url` holds
/// (see [`crate::journal`]), keeping what it finished.
pub async fn resume(
    coordinator: &std::sync::Arc<Coordinator>,
    out_url: &str,
) -> Result<Submitted, CoordinatorError> {
    let out = StoreLocation::open(out_url)?;
    let head = Journal::at(out.clone()).head().await?.ok_or_else(|| {
        CoordinatorError::InvalidRequest(format!(
            "{} holds no job journal: nothing to resume there (a finished job deletes it)",
            out.url()
        ))
    })?;
    submit(coordinator, head.request(), None).await
}
