//! `shardpress eval`: compares a compressed model's outputs with the original's on samples of
//! text, in this process, layer by layer: each layer's weights of both models are read (and
//! decoded: FP8 with scales, compressed-tensors packed codes), the samples' hidden states go
//! through them, and the final states are compared as a job's evaluation compares them
//! (embedding cosine for encoders; KL divergence, top-1 agreement and perplexity for
//! decoders). A job run with `--eval` does the same across its workers.

use std::collections::HashMap;

use anyhow::{bail, Context};
use clap::Args;
use shardpress_coordinator::calibration::{read_object, Evaluation};
use shardpress_core::plan::PlannedTensor;
use shardpress_model::{Hidden, Model, Tokenizer, Weights};
use shardpress_proto::v1::{EvalResult, SubmitJobRequest};
use shardpress_store::StoreLocation;

#[derive(Args)]
pub struct EvalArgs {
    /// The original model: a directory (path, file://, s3://) with config.json and
    /// tokenizer.json, or its .safetensors file.
    #[arg(long)]
    pub model: String,
    /// The compressed model: an output of shardpress (safetensors or compressed-tensors
    /// shards) or any checkpoint with the same tensor names and shapes.
    #[arg(long)]
    pub compressed: String,
    /// Samples: a text file with one sample a line, or JSONL with a "text" field.
    #[arg(long)]
    pub data: String,
    /// How many samples to use (the first N).
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
    /// Tokens per sample at most.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// A model's tensors, planned from its headers (what a job would read), and its root.
struct Checkpoint {
    root: StoreLocation,
    tensors: HashMap<String, PlannedTensor>,
}

async fn checkpoint(url: &str) -> anyhow::Result<Checkpoint> {
    // Planned as a job that compresses nothing: the headers are read and validated, and
    // packed or FP8 weights get what decodes them.
    let request = SubmitJobRequest {
        model_url: url.to_string(),
        recipe_yaml: "name: read\npasses:\n  - quantize: { bits: 8, granularity: channel }\n    targets: ['-']\n".into(),
        allow_unmatched: true,
        ..Default::default()
    };
    let planned = shardpress_coordinator::submit::plan_job(&request, u64::MAX / 4)
        .await
        .map_err(|e| anyhow::Error::new(crate::BadRequest(format!("{url}: {e}"))))?;
    let tensors = (planned.plan.into_iter())
        .flat_map(|t| t.tensors)
        .map(|t| (t.name.clone(), t))
        .collect();
    Ok(Checkpoint {
        root: planned.model.root,
        tensors,
    })
}

async fn weights(checkpoint: &Checkpoint, names: &[String], what: &str) -> anyhow::Result<Weights> {
    let mut weights = Weights::new();
    for name in names {
        let tensor = checkpoint.tensors.get(name).ok_or_else(|| {
            crate::BadRequest(format!(
                "{what} {} has no tensor {name}",
                checkpoint.root.url()
            ))
        })?;
        let matrix = shardpress_worker::calibrate::read_f32(&checkpoint.root, tensor)
            .await
            .with_context(|| format!("reading {name} of {what}"))?;
        weights.insert(name.clone(), matrix);
    }
    Ok(weights)
}

async fn text(root: &StoreLocation, name: &str) -> anyhow::Result<String> {
    let bytes = root.get(name).await.map_err(|e| {
        crate::BadRequest(format!(
            "{}: {e} (eval needs the original model's {name})",
            root.describe(name)
        ))
    })?;
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        anyhow::Error::new(crate::BadRequest(format!(
            "{} is not UTF-8",
            root.describe(name)
        )))
    })
}

pub async fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let original = checkpoint(&args.model).await?;
    let compressed = checkpoint(&args.compressed).await?;
    let config = text(&original.root, "config.json").await?;
    let names: Vec<&str> = original.tensors.keys().map(String::as_str).collect();
    let model = Model::from_config(&config, &names).map_err(|e| {
        crate::BadRequest(format!("{}: {e}", original.root.describe("config.json")))
    })?;
    let tokenizer = Tokenizer::from_bytes(text(&original.root, "tokenizer.json").await?.as_bytes())
        .map_err(|e| {
            crate::BadRequest(format!("{}: {e}", original.root.describe("tokenizer.json")))
        })?;
    let (location, name, data) = read_object(&args.data)
        .await
        .map_err(|e| crate::BadRequest(format!("--data: {e}")))?;
    let texts = shardpress_model::parse_samples(&data, &location.describe(&name))
        .map_err(|e| crate::BadRequest(e.to_string()))?;
    let sequences: Vec<Vec<u32>> = texts
        .iter()
        .take(args.samples)
        .map(|t| tokenizer.encode(t, args.seq_len))
        .collect::<Result<_, _>>()
        .map_err(|e| crate::BadRequest(format!("{}: {e}", location.describe(&name))))?;
    if sequences.iter().all(Vec::is_empty) {
        bail!(crate::BadRequest(format!(
            "{}: no sample gives any token",
            location.describe(&name)
        )));
    }
    let tokens: u64 = sequences.iter().map(|s| s.len() as u64).sum();
    eprintln!(
        "evaluating {} ({}, {} layers) against {} on {} samples ({tokens} tokens)",
        args.compressed,
        model.architecture(),
        model.layers(),
        args.model,
        sequences.len()
    );
    let embed = model.embedding_tensors();
    let mut states: Vec<Hidden> = Vec::new();
    for checkpoint in [&original, &compressed] {
        let w = weights(checkpoint, &embed, "model").await?;
        states.push(model.embed(&w, &sequences)?);
    }
    for layer in 0..model.layers() {
        let names = model.layer_tensors(layer);
        for (checkpoint, hidden) in [&original, &compressed].into_iter().zip(states.iter_mut()) {
            let w = weights(checkpoint, &names, "model").await?;
            model.forward_layer(layer, &w, hidden, &mut |_, _| {})?;
        }
        eprint!("\rlayer {}/{}", layer + 1, model.layers());
    }
    eprintln!();
    let head = model.head_tensors();
    let finished_original = model.finish(&weights(&original, &head, "model").await?, &states[0])?;
    let finished_compressed =
        model.finish(&weights(&compressed, &head, "model").await?, &states[1])?;
    let result: EvalResult =
        shardpress_worker::calibrate::compare(finished_original, finished_compressed, &sequences)
            .map_err(|e| anyhow::anyhow!(e))?;
    let evaluation = Evaluation::of(&[&result], sequences.len(), tokens, model.kind());
    if let Some(mean) = evaluation.mean_embedding_cosine {
        say!(
            "embedding cosine to the original {mean:.5} (mean), {:.5} (worst) over {} samples",
            evaluation.min_embedding_cosine.unwrap_or_default(),
            evaluation.samples
        );
    }
    if let (Some(top1), Some(kld)) = (evaluation.top1_agreement, evaluation.mean_kld) {
        say!(
            "top-1 agreement {top1:.5}, KL divergence {kld:.5} nats/token over {} tokens; perplexity {:.3} -> {:.3}",
            result.tokens,
            evaluation.perplexity_original.unwrap_or_default(),
            evaluation.perplexity_compressed.unwrap_or_default()
        );
    }
    eprintln!("done in {:.1}s", started.elapsed().as_secs_f64());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&evaluation)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
