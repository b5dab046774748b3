//! `gen-model`: a synthetic Llama-shaped model (safetensors + config.json) with realistic weight
//! statistics: per-output-channel scales that vary log-normally, a heavy tail of outliers, and
//! norm weights around 1. Deterministic for a given seed; written tensor by tensor, so memory
//! stays bounded by one tensor.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use shardpress_core::dtype::{encode_from_f32, DType};
use shardpress_core::header::encode_header;

#[derive(Args, Clone)]
pub struct GenModelArgs {
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Approximate size, e.g. 8MB, 200MB, 1GB.
    #[arg(long, default_value = "200MB")]
    pub size: String,
    /// Storage dtype.
    #[arg(long, value_enum, default_value_t = GenDtype::Bf16)]
    pub dtype: GenDtype,
    /// Split into files of at most this many MB (with model.safetensors.index.json).
    #[arg(long, default_value_t = 5000)]
    pub max_shard_mb: u64,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Store lm_head.weight as an exact copy of model.embed_tokens.weight (tied embeddings
    /// saved twice, as some checkpoints do).
    #[arg(long)]
    pub tie_embeddings: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum GenDtype {
    Bf16,
    F16,
    F32,
}

impl GenDtype {
    fn dtype(self) -> DType {
        match self {
            GenDtype::Bf16 => DType::BF16,
            GenDtype::F16 => DType::F16,
            GenDtype::F32 => DType::F32,
        }
    }
}

impl GenModelArgs {
    pub fn for_demo(out: &Path, size: &str) -> Self {
        Self {
            out: out.to_path_buf(),
            size: size.into(),
            dtype: GenDtype::Bf16,
            max_shard_mb: 5000,
            seed: 0,
            tie_embeddings: false,
        }
    }
}

/// What was written.
pub struct Generated {
    pub tensors: usize,
    pub bytes: u64,
}

/// Parses "200MB", "1GB", "512KB", "1000000" (bytes; decimal units).
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let t = text.trim().to_ascii_uppercase();
    let (digits, unit) = t.split_at(
        t.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len()),
    );
    let value: f64 = digits
        .parse()
        .with_context(|| format!("invalid size {text:?}"))?;
    let scale = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "K" => 1e3,
        "MB" | "M" => 1e6,
        "GB" | "G" => 1e9,
        other => bail!("invalid size unit {other:?} in {text:?} (use KB, MB or GB)"),
    };
    Ok((value * scale) as u64)
}

struct Shape {
    hidden: u64,
    intermediate: u64,
    vocab: u64,
    heads: u64,
    kv_heads: u64,
    layers: u64,
}

impl Shape {
    fn for_size(bytes: u64, dtype_size: u64) -> Self {
        let params = bytes / dtype_size;
        let (hidden, intermediate, vocab, heads, kv_heads) = match params {
            // Every width a multiple of 256, as real models are: 4-bit groups of 128 and
            // llama.cpp's 256-weight K-quant blocks then divide every row.
            p if p < 25_000_000 => (256, 768, 2048, 4, 2),
            p if p < 250_000_000 => (768, 2048, 32000, 12, 4),
            _ => (2048, 5632, 32000, 16, 4),
        };
        let mut shape = Shape {
            hidden,
            intermediate,
            vocab,
            heads,
            kv_heads,
            layers: 1,
        };
        let fixed = 2 * vocab * hidden + hidden;
        shape.layers = (params.saturating_sub(fixed) / shape.layer_params()).max(1);
        shape
    }

    fn layer_params(&self) -> u64 {
        let kv = self.hidden / self.heads * self.kv_heads;
        2 * self.hidden * self.hidden
            + 2 * self.hidden * kv
            + 3 * self.hidden * self.intermediate
            + 2 * self.hidden
    }

    /// (name, shape) in the usual Hugging Face order.
    fn tensors(&self) -> Vec<(String, Vec<u64>)> {
        let (h, i) = (self.hidden, self.intermediate);
        let kv = h / self.heads * self.kv_heads;
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        out.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        out
    }

    fn config_json(&self, dtype: DType, tie_embeddings: bool) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": tie_embeddings,
            "torch_dtype": match dtype { DType::F16 => "float16", DType::F32 => "float32", _ => "bfloat16" },
        })
    }
}

/// Values of one tensor, generated from a seed derived from the model seed and tensor index.
fn tensor_values(name: &str, shape: &[u64], seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let count: u64 = shape.iter().product();
    if shape.len() == 1 {
        return (0..count)
            .map(|_| 1.0 + 0.05 * rng.sample::<f32, _>(StandardNormal))
            .collect();
    }
    let cols = shape[1..].iter().product::<u64>() as usize;
    let base = if name.contains("embed") || name.contains("lm_head") {
        0.02
    } else {
        1.0 / (cols as f32).sqrt()
    };
    let mut values = Vec::with_capacity(count as usize);
    for _ in 0..shape[0] {
        let row_scale = base * (0.3 * rng.sample::<f32, _>(StandardNormal)).exp();
        for _ in 0..cols {
            let mut v = rng.sample::<f32, _>(StandardNormal);
            // A thin heavy tail, as in trained transformer weights.
            if rng.random::<f32>() < 0.0005 {
                v *= 5.0;
            }
            values.push(v * row_scale);
        }
    }
    values
}

pub fn gen_model(args: GenModelArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let generated = generate(&args)?;
    println!(
        "wrote {} ({} tensors, {:.1} MB) in {:.1}s",
        args.out.display(),
        generated.tensors,
        generated.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn generate(args: &GenModelArgs) -> anyhow::Result<Generated> {
    let dtype = args.dtype.dtype();
    let shape = Shape::for_size(parse_size(&args.size)?, dtype.size_bytes() as u64);
    let tensors = shape.tensors();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let shards = split_into_shards(&tensors, dtype, args.max_shard_mb.max(1) * 1_000_000);
    let mut weight_map = BTreeMap::new();
    let mut total = 0;
    for (k, shard) in shards.iter().enumerate() {
        let file = if shards.len() == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, shards.len())
        };
        for &index in shard {
            weight_map.insert(tensors[index].0.clone(), file.clone());
        }
        total += write_shard(&args.out.join(&file), &tensors, shard, dtype, args)?;
    }
    if shards.len() > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(
            args.out.join("model.safetensors.index.json"),
            serde_json::to_vec_pretty(&index)?,
        )?;
    }
    std::fs::write(
        args.out.join("config.json"),
        serde_json::to_vec_pretty(&shape.config_json(dtype, args.tie_embeddings))?,
    )?;
    Ok(Generated {
        tensors: tensors.len(),
        bytes: total,
    })
}

fn split_into_shards(
    tensors: &[(String, Vec<u64>)],
    dtype: DType,
    max_bytes: u64,
) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut current = 0;
    for (i, (_, shape)) in tensors.iter().enumerate() {
        let bytes = shape.iter().product::<u64>() * dtype.size_bytes() as u64;
        if current > 0 && current + bytes > max_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += bytes;
        if let Some(last) = shards.last_mut() {
            last.push(i);
        }
    }
    shards
}

fn write_shard(
    path: &Path,
    tensors: &[(String, Vec<u64>)],
    members: &[usize],
    dtype: DType,
    args: &GenModelArgs,
) -> anyhow::Result<u64> {
    let layout: Vec<(String, DType, Vec<u64>)> = members
        .iter()
        .map(|&i| (tensors[i].0.clone(), dtype, tensors[i].1.clone()))
        .collect();
    let metadata = [("format".to_string(), "pt".to_string())].into();
    let (prefix, _) = encode_header(&layout, &metadata)?;
    let mut file = BufWriter::new(
        File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    file.write_all(&prefix)?;
    let mut data_bytes = 0;
    for &i in members {
        let (name, shape) = &tensors[i];
        // With tied embeddings lm_head draws the embedding's values (index 0, same shape).
        let source = if args.tie_embeddings && name == "lm_head.weight" {
            0
        } else {
            i
        };
        let values = tensor_values(
            &tensors[source].0,
            shape,
            args.seed
                .wrapping_mul(1_000_003)
                .wrapping_add(source as u64),
        );
        let mut bytes = vec![0u8; values.len() * dtype.size_bytes()];
        encode_from_f32(dtype, &values, &mut bytes)?;
        file.write_all(&bytes)?;
        data_bytes += bytes.len() as u64;
    }
    file.flush()?;
    Ok(data_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_decimal_units() {
        assert_eq!(parse_size("200MB").unwrap(), 200_000_000);
        assert_eq!(parse_size("1.5gb").unwrap(), 1_500_000_000);
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn the_demo_size_gives_a_model_near_200_mb() {
        let shape = Shape::for_size(200_000_000, 2);
        let params: u64 = shape
            .tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<u64>())
            .sum();
        let bytes = params * 2;
        assert!((150_000_000..=250_000_000).contains(&bytes), "{bytes}");
        assert!(shape.layers >= 4);
    }
}
