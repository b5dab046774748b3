//! `shardpress plan`: what a job would do, without running it — the tasks, the tensors each
//! pass of the recipe touches and those left as they are, and the output's size in each
//! format (or why a format refuses the recipe). Reads headers only, as the coordinator does
//! when a job is submitted, with the same checks.

use anyhow::Context;
use clap::Args;
use serde_json::json;
use shardpress_coordinator::submit::{output_size, plan_job, Planned};
use shardpress_core::codec::TensorPlan;
use shardpress_core::recipe::OutputFormat;
use shardpress_proto::v1::SubmitJobRequest;

use crate::cli::load_recipe;

#[derive(Args)]
pub struct PlanArgs {
    /// Model: a .safetensors file or a model directory (path, file://, s3://).
    #[arg(long)]
    pub model: String,
    /// Recipe: a built-in name (see `shardpress recipes`) or a YAML file.
    #[arg(long, default_value = "int4-g128")]
    pub recipe: String,
    /// Task size budget in MB of input, as `compress --task-budget-mb`.
    #[arg(long, default_value_t = 64)]
    pub task_budget_mb: u64,
    /// Plan even if a recipe entry selects no tensor (listed as warnings).
    #[arg(long)]
    pub allow_unmatched: bool,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// How many example tensor names are shown per line.
const EXAMPLES: usize = 3;

/// The tensors one pass (or none) touches.
#[derive(Default)]
struct Touched {
    tensors: usize,
    params: u64,
    bytes: u64,
    examples: Vec<String>,
}

impl Touched {
    fn add(&mut self, name: &str, params: u64, bytes: u64) {
        self.tensors += 1;
        self.params += params;
        self.bytes += bytes;
        if self.examples.len() < EXAMPLES {
            self.examples.push(name.to_string());
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({"tensors": self.tensors, "params": self.params, "input_bytes": self.bytes, "examples": self.examples})
    }
}

pub async fn plan(args: PlanArgs) -> anyhow::Result<()> {
    let model = if args.model.contains("://") {
        args.model.clone()
    } else {
        std::path::absolute(&args.model)
            .with_context(|| format!("cannot resolve the path {:?}", args.model))?
            .display()
            .to_string()
    };
    let request = |format: &str| SubmitJobRequest {
        model_url: model.clone(),
        recipe_yaml: String::new(),
        format: format.to_string(),
        task_budget_bytes: args.task_budget_mb.max(1) * 1024 * 1024,
        allow_unmatched: args.allow_unmatched,
        ..Default::default()
    };
    let recipe_yaml = load_recipe(&args.recipe)?;
    let bad = |e: shardpress_coordinator::CoordinatorError| {
        anyhow::Error::new(crate::BadRequest(e.to_string()))
    };
    // The recipe's own format first: its plan is the one shown.
    let mut first = request("");
    first.recipe_yaml.clone_from(&recipe_yaml);
    let planned = plan_job(&first, 0).await.map_err(bad)?;
    let passes = touched(&planned);
    let mut sizes = Vec::new();
    for format in [
        OutputFormat::Safetensors,
        OutputFormat::CompressedTensors,
        OutputFormat::Gguf,
        OutputFormat::Spz,
    ] {
        let mut asked = request(format.as_str());
        asked.recipe_yaml.clone_from(&recipe_yaml);
        let size = match plan_job(&asked, 0).await {
            Ok(planned) => output_size(&planned).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        sizes.push((format, size));
    }
    let input: u64 = planned.plan.iter().map(|t| t.input_bytes).sum();
    let tensors: usize = planned.plan.iter().map(|t| t.tensors.len()).sum();
    if args.json {
        let pass_json: Vec<serde_json::Value> = (planned.recipe.passes.iter())
            .zip(&passes.0)
            .map(|(pass, t)| json!({"pass": pass.kind.describe(), "touches": t.json()}))
            .collect();
        let size_json: serde_json::Map<String, serde_json::Value> = (sizes.iter())
            .map(|(format, size)| {
                let value = match size {
                    Ok(Some(bytes)) => json!({"bytes": bytes}),
                    Ok(None) => json!({"bytes": null, "why": unknown_size(*format)}),
                    Err(e) => json!({"refused": e}),
                };
                (format.as_str().to_string(), value)
            })
            .collect();
        say!(
            "{}",
            json!({
                "model": planned.model.root.url(),
                "recipe": planned.recipe.describe(),
                "tensors": tensors,
                "input_bytes": input,
                "tasks": planned.plan.len(),
                "passes": pass_json,
                "unchanged": passes.1.json(),
                "output_bytes": size_json,
                "warnings": planned.warnings,
            })
        );
        return Ok(());
    }
    say!(
        "model      {} ({} files, {tensors} tensors, {})",
        planned.model.root.url(),
        planned.files.len(),
        human(input)
    );
    say!("recipe     {}", planned.recipe.describe());
    say!(
        "tasks      {} at a {} MB budget (--task-budget-mb)",
        planned.plan.len(),
        args.task_budget_mb
    );
    for (i, (pass, t)) in planned.recipe.passes.iter().zip(&passes.0).enumerate() {
        say!(
            "pass {}     {}: {} tensors, {:.2}M params, {}{}",
            i + 1,
            pass.kind.describe(),
            t.tensors,
            t.params as f64 / 1e6,
            human(t.bytes),
            examples(&t.examples)
        );
    }
    let kept = &passes.1;
    say!(
        "unchanged  {} tensors, {:.2}M params, {}{}",
        kept.tensors,
        kept.params as f64 / 1e6,
        human(kept.bytes),
        examples(&kept.examples)
    );
    for (format, size) in &sizes {
        let line = match size {
            Ok(Some(bytes)) => format!(
                "{}, {:.3}x the input",
                human(*bytes),
                *bytes as f64 / input.max(1) as f64
            ),
            Ok(None) => format!("{}: run it to know", unknown_size(*format)),
            Err(e) => format!("refused: {e}"),
        };
        say!("{:<10} {:<19}{line}", "output", format.as_str());
    }
    for warning in &planned.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1_000_000_000 => format!("{:.2} GB", b as f64 / 1e9),
        b => format!("{:.2} MB", b as f64 / 1e6),
    }
}

fn examples(names: &[String]) -> String {
    match names.is_empty() {
        true => String::new(),
        false => format!("; e.g. {}", names.join(", ")),
    }
}

/// Per pass, the tensors it touches; and the tensors no pass touches.
fn touched(planned: &Planned) -> (Vec<Touched>, Touched) {
    let passes = &planned.recipe.passes;
    let mut per_pass: Vec<Touched> = passes.iter().map(|_| Touched::default()).collect();
    let mut unchanged = Touched::default();
    for tensor in planned.plan.iter().flat_map(|t| &t.tensors) {
        let params: u64 = tensor.shape.iter().product();
        let bytes = tensor.data_end - tensor.data_start;
        let plan = TensorPlan::for_output(
            &planned.recipe,
            planned.format,
            &planned.facts,
            &tensor.name,
            tensor.dtype,
            &tensor.shape,
        );
        // 1-D tensors, among others, are stored unchanged whatever the recipe selects.
        let applied = match plan {
            Ok(plan) if !plan.is_identity() => planned.recipe.passes_for(&tensor.name),
            _ => Vec::new(),
        };
        if applied.is_empty() {
            unchanged.add(&tensor.name, params, bytes);
        }
        for (pass, counts) in passes.iter().zip(&mut per_pass) {
            if applied.iter().any(|kind| std::ptr::eq(*kind, &pass.kind)) {
                counts.add(&tensor.name, params, bytes);
            }
        }
    }
    (per_pass, unchanged)
}

/// Why the plan alone does not give `format`'s output size.
fn unknown_size(format: OutputFormat) -> &'static str {
    match format {
        OutputFormat::Spz => "depends on the values (entropy-coded)",
        _ => "depends on the widths the measuring round chooses for the bit budget",
    }
}
