//! `gen-model`: a synthetic Llama-shaped model (safetensors + config.json + a byte-level BPE
//! tokenizer.json/tokenizer_config.json) with realistic weight statistics: per-output-channel
//! scales that vary log-normally, a heavy tail of outliers, and norm weights around 1.
//! Deterministic for a given seed; written tensor by tensor, so memory stays bounded by one
//! tensor.

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
    /// Mixture of experts: this many experts per layer (2 used per token), as Mixtral
    /// (`MixtralForCausalLM`) lays them out; 0 for a dense Llama.
    #[arg(long, default_value_t = 0)]
    pub experts: u64,
    /// Each expert's MLP width (Mixtral's `intermediate_size`): a multiple of 128 for 4-bit
    /// groups of 128, of 256 for GGUF K-quants; small widths give many small tensors, as
    /// fine-grained MoE models (Qwen3-MoE, DeepSeek-V3) have. Default: the dense width.
    #[arg(long, requires = "experts")]
    pub expert_width: Option<u64>,
    /// Hidden width: 256, 768 or 2048 (default: by size, larger models wider); with a
    /// small width a large size becomes many layers.
    #[arg(long, value_parser = clap::builder::TypedValueParser::map(
        clap::builder::PossibleValuesParser::new(["256", "768", "2048"]),
        |s: String| s.parse::<u64>().unwrap_or(256),
    ))]
    pub hidden: Option<u64>,
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
            experts: 0,
            expert_width: None,
            hidden: None,
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

/// `rope_theta` of the generated config (Llama 3's).
const ROPE_THETA: f64 = 500000.0;

struct Shape {
    hidden: u64,
    intermediate: u64,
    vocab: u64,
    heads: u64,
    kv_heads: u64,
    layers: u64,
    /// Experts per layer (0: a dense MLP).
    experts: u64,
}

impl Shape {
    fn for_size(
        bytes: u64,
        dtype_size: u64,
        experts: u64,
        expert_width: Option<u64>,
        hidden: Option<u64>,
    ) -> Self {
        let params = bytes / dtype_size;
        let (hidden, intermediate, vocab, heads, kv_heads) = match (hidden, params) {
            // Every width a multiple of 256, as real models are: 4-bit groups of 128 and
            // llama.cpp's 256-weight K-quant blocks then divide every row.
            (Some(256), _) => (256, 768, 2048, 4, 2),
            (Some(768), _) => (768, 2048, 32000, 12, 4),
            (Some(_), _) => (2048, 5632, 32000, 16, 4),
            (None, p) if p < 25_000_000 => (256, 768, 2048, 4, 2),
            (None, p) if p < 250_000_000 => (768, 2048, 32000, 12, 4),
            (None, _) => (2048, 5632, 32000, 16, 4),
        };
        let intermediate = match experts {
            0 => intermediate,
            _ => expert_width.unwrap_or(intermediate).max(1),
        };
        let mut shape = Shape {
            hidden,
            intermediate,
            vocab,
            heads,
            kv_heads,
            layers: 1,
            experts,
        };
        let fixed = 2 * vocab * hidden + hidden;
        shape.layers = (params.saturating_sub(fixed) / shape.layer_params()).max(1);
        shape
    }

    fn layer_params(&self) -> u64 {
        let kv = self.hidden / self.heads * self.kv_heads;
        let mlp = match self.experts {
            0 => 3 * self.hidden * self.intermediate,
            e => e * 3 * self.hidden * self.intermediate + e * self.hidden,
        };
        2 * self.hidden * self.hidden + 2 * self.hidden * kv + mlp + 2 * self.hidden
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
            if self.experts == 0 {
                out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
                out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
                out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
                continue;
            }
            let moe = format!("{p}.block_sparse_moe");
            out.push((format!("{moe}.gate.weight"), vec![self.experts, h]));
            for e in 0..self.experts {
                out.push((format!("{moe}.experts.{e}.w1.weight"), vec![i, h]));
                out.push((format!("{moe}.experts.{e}.w2.weight"), vec![h, i]));
                out.push((format!("{moe}.experts.{e}.w3.weight"), vec![i, h]));
            }
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        out.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        out
    }

    fn config_json(&self, dtype: DType, tie_embeddings: bool) -> serde_json::Value {
        let mut config = self.dense_config_json(dtype, tie_embeddings);
        if self.experts > 0 {
            config["architectures"] = serde_json::json!(["MixtralForCausalLM"]);
            config["model_type"] = serde_json::json!("mixtral");
            config["num_local_experts"] = serde_json::json!(self.experts);
            config["num_experts_per_tok"] = serde_json::json!(2.min(self.experts));
        }
        config
    }

    fn dense_config_json(&self, dtype: DType, tie_embeddings: bool) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "head_dim": self.hidden / self.heads,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": ROPE_THETA,
            "bos_token_id": self.vocab - 2,
            "eos_token_id": self.vocab - 1,
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
    say!(
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
    let shape = Shape::for_size(
        parse_size(&args.size)?,
        dtype.size_bytes() as u64,
        args.experts,
        args.expert_width,
        args.hidden,
    );
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
    let (tokenizer, tokenizer_config) = bpe_tokenizer(shape.vocab as usize)?;
    std::fs::write(
        args.out.join("tokenizer.json"),
        serde_json::to_vec_pretty(&tokenizer)?,
    )?;
    std::fs::write(
        args.out.join("tokenizer_config.json"),
        serde_json::to_vec_pretty(&tokenizer_config)?,
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

// ----------------------------------------------------------------------------------------
// Tokenizer: a small byte-level BPE in the shape of Llama 3's tokenizer.json.

/// Beginning- and end-of-text special tokens, the last two ids of the vocabulary.
const BOS_TOKEN: &str = "<|begin_of_text|>";
const EOS_TOKEN: &str = "<|end_of_text|>";

/// Llama 3's pre-tokenizer split regex.
const LLAMA3_PRE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Text the BPE merges are learned from.
const BPE_CORPUS: &str = "\
The model is split into layers, and each layer is compressed on its own by a worker. \
A worker reads the tensors of its task from object storage, quantizes them, measures the error \
against the original weights, and writes the finished shard back. The coordinator keeps a \
journal of every task, so a restarted job resumes where it stopped instead of starting again. \
When the last task is done, the coordinator writes the index, the configuration and the report, \
and then the manifest, which is the commit point of the whole output. \
Weights are stored in bfloat16 or float16; the compressed output may use four or eight bits per \
weight, with a scale for every group of thirty-two or one hundred and twenty-eight values. \
The error of each tensor is reported as a signal to noise ratio, a cosine similarity and a \
relative norm, and the accuracy gates of the recipe decide whether the job passes or fails. \
In the beginning there was the word, and the word was with the text, and the text was long. \
She said that they would come back in the morning, when the weather was better and the roads \
were open again. He thought about it for a while and then he wrote a letter to his brother, \
who lived in another country, far away from the sea. There are many ways to tell a story, but \
the best ones are simple: someone wants something, something stands in the way, and in the end \
they either get it or learn why they should not have wanted it at all. \
Numbers such as 1, 2, 3, 10, 42, 100, 256, 1024 and 2048 appear in code and in prose alike. \
for i in range(10): print(i) # a loop in Python; fn main() { say!(\"hello, world\"); } \
";

/// GPT-2's reversible byte-to-unicode table, in GPT-2 id order: (byte, char).
fn byte_level_alphabet() -> Vec<(u8, char)> {
    let mut bytes: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xa1..=0xac)
        .chain(0xae..=0xff)
        .collect();
    let mut chars = bytes.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    bytes
        .into_iter()
        .zip(chars)
        .map(|(b, c)| (b as u8, char::from_u32(c).expect("valid char")))
        .collect()
}

/// A rough Llama 3 pre-tokenization: a letter run with one optional leading non-letter,
/// up to three digits, an optional space plus a punctuation run, or whitespace.
fn pre_tokenize(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut words = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let start = i;
        let c = chars[i];
        let letter_follows = |j: usize| chars.get(j).is_some_and(|c| c.is_alphabetic());
        if c.is_alphabetic() || (!c.is_alphanumeric() && c != '\n' && letter_follows(i + 1)) {
            i += 1;
            while letter_follows(i) {
                i += 1;
            }
        } else if c.is_numeric() {
            while i < chars.len() && chars[i].is_numeric() && i - start < 3 {
                i += 1;
            }
        } else if c.is_whitespace()
            && !chars
                .get(i + 1)
                .is_some_and(|c| !c.is_whitespace() && !c.is_alphanumeric())
        {
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
        } else {
            if c == ' ' {
                i += 1;
            }
            while i < chars.len() && !chars[i].is_whitespace() && !chars[i].is_alphanumeric() {
                i += 1;
            }
            i = i.max(start + 1);
        }
        words.push(chars[start..i].iter().collect());
    }
    words
}

/// A byte-level BPE tokenizer with exactly `vocab` ids: the 256 byte tokens (GPT-2 order),
/// merges learned from [`BPE_CORPUS`] and then extended deterministically, and the two special
/// tokens at the end. Returns (tokenizer.json, tokenizer_config.json).
fn bpe_tokenizer(vocab: usize) -> anyhow::Result<(serde_json::Value, serde_json::Value)> {
    use serde_json::json;
    use std::collections::{BTreeMap, HashSet};
    if vocab < 258 {
        bail!("a byte-level BPE vocabulary needs at least 258 ids, not {vocab}");
    }
    let n_merges = vocab - 258;
    let alphabet = byte_level_alphabet();
    let mut to_char = ['\0'; 256];
    for &(b, c) in &alphabet {
        to_char[b as usize] = c;
    }
    let mut tokens: Vec<String> = alphabet.iter().map(|(_, c)| c.to_string()).collect();
    let mut known: HashSet<String> = tokens.iter().cloned().collect();
    let mut merges: Vec<(String, String)> = Vec::new();

    // Learn merges: most frequent adjacent pair first, ties broken by the pair's text.
    let mut words: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    for word in pre_tokenize(BPE_CORPUS) {
        let symbols: Vec<String> = word
            .bytes()
            .map(|b| to_char[b as usize].to_string())
            .collect();
        *words.entry(symbols).or_default() += 1;
    }
    while merges.len() < n_merges {
        let mut pairs: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for (symbols, count) in &words {
            for w in symbols.windows(2) {
                *pairs.entry((w[0].as_str(), w[1].as_str())).or_default() += count;
            }
        }
        let Some(((a, b), count)) = pairs
            .into_iter()
            .max_by(|x, y| x.1.cmp(&y.1).then_with(|| y.0.cmp(&x.0)))
        else {
            break;
        };
        if count < 2 {
            break;
        }
        let (a, b) = (a.to_string(), b.to_string());
        let merged = format!("{a}{b}");
        words = words
            .into_iter()
            .map(|(symbols, count)| {
                let mut out = Vec::with_capacity(symbols.len());
                let mut i = 0;
                while i < symbols.len() {
                    if i + 1 < symbols.len() && symbols[i] == a && symbols[i + 1] == b {
                        out.push(merged.clone());
                        i += 2;
                    } else {
                        out.push(symbols[i].clone());
                        i += 1;
                    }
                }
                (out, count)
            })
            .fold(BTreeMap::new(), |mut acc, (symbols, count)| {
                *acc.entry(symbols).or_default() += count;
                acc
            });
        if known.insert(merged.clone()) {
            tokens.push(merged);
            merges.push((a, b));
        }
    }
    // Extend to the vocabulary size: learned tokens, then letters and the space, each grown
    // by one common letter at a time.
    let letters: Vec<String> = "etaoinshrdlcumwfgypbvkjxqz"
        .chars()
        .map(|c| c.to_string())
        .collect();
    let space = to_char[b' ' as usize].to_string();
    let mut stems: Vec<String> = tokens[256..].to_vec();
    stems.extend(letters.iter().cloned());
    stems.push(space);
    let mut next = 0;
    while merges.len() < n_merges {
        let stem = stems[next].clone();
        next += 1;
        for letter in &letters {
            if merges.len() == n_merges {
                break;
            }
            let merged = format!("{stem}{letter}");
            if known.insert(merged.clone()) {
                tokens.push(merged.clone());
                stems.push(merged);
                merges.push((stem.clone(), letter.clone()));
            }
        }
    }

    let bos_id = vocab - 2;
    let eos_id = vocab - 1;
    let vocab_map: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), json!(id)))
        .collect();
    let added = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(bos_id, BOS_TOKEN), added(eos_id, EOS_TOKEN)],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PRE_REGEX},
             "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
             "use_regex": false}
        ]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
             "use_regex": true},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}},
                      {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": BOS_TOKEN, "type_id": 1}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {BOS_TOKEN: {"id": BOS_TOKEN, "ids": [bos_id],
                                            "tokens": [BOS_TOKEN]}}}
        ]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
                  "vocab": vocab_map,
                  "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()}
    });
    let decoder_entry = |content: &str| {
        json!({"content": content, "lstrip": false, "normalized": false, "rstrip": false,
               "single_word": false, "special": true})
    };
    let config = json!({
        "added_tokens_decoder": {
            bos_id.to_string(): decoder_entry(BOS_TOKEN),
            eos_id.to_string(): decoder_entry(EOS_TOKEN),
        },
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": false,
        "eos_token": EOS_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast"
    });
    Ok((tokenizer, config))
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
    fn the_tokenizer_has_exactly_the_model_vocab_and_valid_merges() {
        for vocab in [2048usize, 32000] {
            let (tokenizer, config) = bpe_tokenizer(vocab).unwrap();
            let model = &tokenizer["model"];
            let ids = model["vocab"].as_object().unwrap();
            let added = tokenizer["added_tokens"].as_array().unwrap();
            assert_eq!(ids.len() + added.len(), vocab);
            let mut seen: Vec<u64> = ids.values().map(|v| v.as_u64().unwrap()).collect();
            seen.extend(added.iter().map(|t| t["id"].as_u64().unwrap()));
            seen.sort_unstable();
            assert_eq!(seen, (0..vocab as u64).collect::<Vec<_>>());
            // Every merge joins two known tokens into a token with the next id.
            let merges = model["merges"].as_array().unwrap();
            assert_eq!(merges.len(), vocab - 258);
            for (i, m) in merges.iter().enumerate() {
                let (a, b) = (m[0].as_str().unwrap(), m[1].as_str().unwrap());
                assert!(ids[a].as_u64().unwrap() < 256 + i as u64, "{a}");
                assert!(ids[b].as_u64().unwrap() < 256 + i as u64, "{b}");
                assert_eq!(ids[&format!("{a}{b}")].as_u64().unwrap(), 256 + i as u64);
            }
            assert_eq!(ids["!"], 0);
            assert_eq!(ids["Ġ"], 220);
            assert!(ids.contains_key("Ġthe"));
            assert_eq!(config["bos_token"], BOS_TOKEN);
            assert_eq!(added[0]["id"], vocab - 2);
            // Deterministic.
            assert_eq!(bpe_tokenizer(vocab).unwrap().0, tokenizer);
        }
        assert!(bpe_tokenizer(100).is_err());
    }

    #[test]
    fn the_demo_size_gives_a_model_near_200_mb() {
        let shape = Shape::for_size(200_000_000, 2, 0, None, None);
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
