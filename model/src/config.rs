//! config.json → the architecture and its settings, with tensor-name prefixes resolved.
//!
//! The architecture comes from `model_type` (or, when that is absent, from `architectures`).
//! Tensor names differ between checkpoint classes (`embeddings.…` in a `BertModel`,
//! `bert.embeddings.…` in a `BertForMaskedLM`; `model.layers.…` in a `LlamaForCausalLM`), so
//! the prefix is read off the checkpoint's own names, and a missing `lm_head.weight` means the
//! head is tied to the input embedding. Settings we do not implement are refused here, once,
//! with a message naming them, rather than producing wrong activations later.
//!
//! Mixture-of-experts decoders (`mixtral`, `qwen2_moe`, `qwen3_moe`) are Llama-family
//! decoders whose [`LlamaConfig::moe`] describes the router and experts ([`MoeConfig`]);
//! every other MoE family is refused with a message saying so.

use std::collections::HashSet;

use serde_json::Value;

use crate::ModelError;

/// Architectures this crate runs, as named in `model_type`.
pub const SUPPORTED: [&str; 8] = [
    "bert",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
];

/// The mixture-of-experts architectures among [`SUPPORTED`].
pub const SUPPORTED_MOE: [&str; 3] = ["mixtral", "qwen2_moe", "qwen3_moe"];

/// The parsed configuration of a supported model.
#[derive(Debug, Clone, PartialEq)]
pub enum Architecture {
    Bert(BertConfig),
    Llama(LlamaConfig),
}

/// The GELU flavour of a BERT checkpoint (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Gelu {
    /// `gelu`: the exact form with erf.
    Erf,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    Tanh,
}

/// A BERT-family encoder (post-LayerNorm blocks, absolute positions).
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub hidden_size: usize,
    pub heads: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub layer_norm_eps: f64,
    pub vocab_size: usize,
    pub max_positions: usize,
    pub type_vocab_size: usize,
    pub gelu: Gelu,
    /// "" for a `BertModel` checkpoint, "bert." for `BertForMaskedLM` and friends.
    pub prefix: String,
}

/// A Llama-family decoder (pre-RMSNorm blocks, rotary positions, GQA, SwiGLU).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub rms_norm_eps: f64,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Mistral's sliding attention window: token i sees tokens j with i − j < window.
    pub sliding_window: Option<usize>,
    /// Qwen3's per-head RMSNorm of queries and keys.
    pub qk_norm: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// "model." for `*ForCausalLM` checkpoints.
    pub prefix: String,
    /// `lm_head.weight`, or the input embedding when the head is tied.
    pub lm_head: String,
    /// The router and experts of a mixture-of-experts model (`None` for dense models).
    pub moe: Option<MoeConfig>,
}

/// How a mixture-of-experts checkpoint names its router and experts (within a layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeNaming {
    /// Mixtral: `block_sparse_moe.gate` (router), `block_sparse_moe.experts.{e}.w1` (gate),
    /// `.w3` (up), `.w2` (down).
    Mixtral,
    /// Qwen2-MoE / Qwen3-MoE: `mlp.gate` (router), `mlp.experts.{e}.gate_proj`, `.up_proj`,
    /// `.down_proj`; Qwen2-MoE's `mlp.shared_expert.*` and `mlp.shared_expert_gate`.
    Qwen,
}

/// The sparse MLP of a mixture-of-experts decoder, as transformers' MixtralSparseMoeBlock /
/// Qwen2MoeSparseMoeBlock / Qwen3MoeSparseMoeBlock run it: router logits, softmax over all
/// experts, the `top_k` most probable, their probabilities renormalised to sum to 1 when
/// `normalize_top_k`, each chosen expert a SwiGLU MLP weighted by its probability, plus the
/// shared expert gated by a sigmoid when there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub naming: MoeNaming,
    /// `num_local_experts` (Mixtral) / `num_experts` (Qwen).
    pub experts: usize,
    /// `num_experts_per_tok`.
    pub top_k: usize,
    /// Each expert's intermediate size (`intermediate_size` for Mixtral,
    /// `moe_intermediate_size` for Qwen).
    pub expert_intermediate_size: usize,
    /// Renormalise the chosen experts' probabilities (always for Mixtral; Qwen's
    /// `norm_topk_prob`).
    pub normalize_top_k: bool,
    /// Qwen2-MoE's `shared_expert_intermediate_size` (its shared expert); `None`: no shared
    /// expert.
    pub shared_expert_intermediate_size: Option<usize>,
    /// Qwen's `decoder_sparse_step`: layer `l` is sparse when `(l + 1) % step == 0` (1: all).
    pub decoder_sparse_step: usize,
    /// Qwen's `mlp_only_layers`: layers with a dense MLP of `intermediate_size`.
    pub mlp_only_layers: Vec<usize>,
}

impl MoeConfig {
    /// Whether `layer`'s MLP is the sparse mixture of experts (else a dense SwiGLU MLP).
    pub fn is_sparse(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer) && (layer + 1) % self.decoder_sparse_step == 0
    }
}

fn bad(message: impl Into<String>) -> ModelError {
    ModelError::BadConfig(message.into())
}

/// A required positive integer setting.
fn usize_field(config: &Value, key: &str) -> Result<usize, ModelError> {
    match config.get(key) {
        None | Some(Value::Null) => Err(bad(format!("the setting `{key}` is missing"))),
        Some(value) => match value.as_u64() {
            Some(n) if n > 0 => {
                usize::try_from(n).map_err(|_| bad(format!("`{key}` is too large")))
            }
            _ => Err(bad(format!(
                "`{key}` must be a positive integer, found {value}"
            ))),
        },
    }
}

/// An optional positive integer setting (absent or null → None).
fn optional_usize(config: &Value, key: &str) -> Result<Option<usize>, ModelError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => usize_field(config, key).map(Some),
    }
}

/// A positive float setting with a default.
fn float_field(config: &Value, key: &str, default: f64) -> Result<f64, ModelError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => match value.as_f64() {
            Some(x) if x > 0.0 && x.is_finite() => Ok(x),
            _ => Err(bad(format!(
                "`{key}` must be a positive number, found {value}"
            ))),
        },
    }
}

fn bool_field(config: &Value, key: &str) -> bool {
    config.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// Whether config.json describes a mixture-of-experts model.
fn is_moe(model_type: &str, config: &Value) -> bool {
    let moe_type = model_type.contains("moe")
        || [
            "mixtral",
            "deepseek_v2",
            "deepseek_v3",
            "dbrx",
            "jamba",
            "olmoe",
        ]
        .contains(&model_type);
    let moe_class = config
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|names| {
            names.iter().filter_map(Value::as_str).any(|name| {
                let lower = name.to_ascii_lowercase();
                lower.contains("moe") || lower.contains("mixtral")
            })
        });
    let experts = ["num_local_experts", "num_experts", "n_routed_experts"]
        .iter()
        .any(|key| {
            config
                .get(*key)
                .and_then(Value::as_u64)
                .is_some_and(|n| n > 1)
        });
    moe_type || moe_class || experts
}

/// `model_type`, or the architecture implied by the first known class in `architectures`.
fn model_type(config: &Value) -> Result<String, ModelError> {
    if let Some(model_type) = config.get("model_type").and_then(Value::as_str) {
        return Ok(model_type.to_string());
    }
    let classes: Vec<&str> = config
        .get("architectures")
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // MoE classes first: "Qwen2Moe…" also starts with "Qwen2".
    let by_class = [
        ("Bert", "bert"),
        ("Llama", "llama"),
        ("Mixtral", "mixtral"),
        ("Mistral", "mistral"),
        ("Qwen2Moe", "qwen2_moe"),
        ("Qwen3Moe", "qwen3_moe"),
        ("Qwen2", "qwen2"),
        ("Qwen3", "qwen3"),
    ];
    for class in &classes {
        if let Some((_, model_type)) = by_class.iter().find(|(stem, _)| class.starts_with(stem)) {
            return Ok(model_type.to_string());
        }
    }
    match classes.first() {
        Some(class) => Ok(class.to_string()),
        None => Err(bad("neither `model_type` nor `architectures` is set")),
    }
}

/// The prefix before `suffix` of the first tensor name ending with it, if any.
fn prefix_of(names: &HashSet<&str>, suffix: &str) -> Option<String> {
    let mut prefixes: Vec<&str> = names
        .iter()
        .filter_map(|name| name.strip_suffix(suffix))
        .filter(|prefix| prefix.is_empty() || prefix.ends_with('.'))
        .collect();
    prefixes.sort_unstable_by_key(|prefix| (prefix.len(), *prefix));
    prefixes.first().map(|prefix| prefix.to_string())
}

/// Parses config.json against the checkpoint's tensor names.
pub fn parse(config_json: &str, tensor_names: &[&str]) -> Result<Architecture, ModelError> {
    let config: Value = serde_json::from_str(config_json)
        .map_err(|error| bad(format!("not valid JSON: {error}")))?;
    if !config.is_object() {
        return Err(bad("the top level is not a JSON object"));
    }
    let model_type = model_type(&config)?;
    if !SUPPORTED_MOE.contains(&model_type.as_str()) && is_moe(&model_type, &config) {
        return Err(bad(format!(
            "`{model_type}` is a mixture-of-experts model: MoE routing is not supported yet \
             for it (mixture-of-experts models supported: {}; all supported: {})",
            SUPPORTED_MOE.join(", "),
            SUPPORTED.join(", ")
        )));
    }
    let names: HashSet<&str> = tensor_names.iter().copied().collect();
    match model_type.as_str() {
        "bert" => parse_bert(&config, &names).map(Architecture::Bert),
        "llama" | "mistral" | "qwen2" | "qwen3" | "mixtral" | "qwen2_moe" | "qwen3_moe" => {
            parse_llama(&model_type, &config, &names).map(Architecture::Llama)
        }
        _ => Err(ModelError::UnknownArchitecture { found: model_type }),
    }
}

fn parse_bert(config: &Value, names: &HashSet<&str>) -> Result<BertConfig, ModelError> {
    let gelu = match config
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("gelu")
    {
        "gelu" => Gelu::Erf,
        "gelu_new" | "gelu_pytorch_tanh" => Gelu::Tanh,
        other => {
            return Err(bad(format!(
                "hidden_act `{other}` is not supported for bert (gelu, gelu_new, gelu_pytorch_tanh)"
            )))
        }
    };
    let position_type = config
        .get("position_embedding_type")
        .and_then(Value::as_str)
        .unwrap_or("absolute");
    if position_type != "absolute" {
        return Err(bad(format!(
            "position_embedding_type `{position_type}` is not supported (only absolute)"
        )));
    }
    let suffix = "embeddings.word_embeddings.weight";
    let prefix = prefix_of(names, suffix).ok_or_else(|| ModelError::MissingTensor {
        name: suffix.to_string(),
    })?;
    let parsed = BertConfig {
        hidden_size: usize_field(config, "hidden_size")?,
        heads: usize_field(config, "num_attention_heads")?,
        intermediate_size: usize_field(config, "intermediate_size")?,
        layers: usize_field(config, "num_hidden_layers")?,
        layer_norm_eps: float_field(config, "layer_norm_eps", 1e-12)?,
        vocab_size: usize_field(config, "vocab_size")?,
        max_positions: usize_field(config, "max_position_embeddings")?,
        type_vocab_size: usize_field(config, "type_vocab_size")?,
        gelu,
        prefix,
    };
    if parsed.hidden_size % parsed.heads != 0 {
        return Err(bad(format!(
            "hidden_size {} is not a multiple of num_attention_heads {}",
            parsed.hidden_size, parsed.heads
        )));
    }
    Ok(parsed)
}

/// `rope_scaling` of config.json, as far as we implement it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Absent, null or `default`.
    None,
    /// `linear`: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// `llama3` (Llama 3.1+): low frequencies divided by `factor`, high ones kept, a smooth
    /// blend in between, as transformers' `_compute_llama3_parameters`.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: f64,
    },
}

/// Parses `rope_scaling`, refusing types we do not implement, and partial rotary settings.
fn rope_scaling(config: &Value) -> Result<RopeScaling, ModelError> {
    let partial = float_field(config, "partial_rotary_factor", 1.0)?;
    if partial != 1.0 {
        return Err(bad(format!(
            "partial_rotary_factor {partial} is not supported (only 1.0)"
        )));
    }
    let Some(scaling) = config.get("rope_scaling").filter(|value| !value.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("unnamed");
    let field = |key: &str| {
        float_field(scaling, key, f64::NAN)
            .map_err(|_| bad(format!("rope_scaling.{key} must be a positive number")))
            .and_then(|x| {
                if x.is_nan() {
                    Err(bad(format!("rope_scaling of type `{kind}` needs `{key}`")))
                } else {
                    Ok(x)
                }
            })
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: field("factor")?,
        }),
        "llama3" => {
            let scaling = RopeScaling::Llama3 {
                factor: field("factor")?,
                low_freq_factor: field("low_freq_factor")?,
                high_freq_factor: field("high_freq_factor")?,
                original_max_positions: field("original_max_position_embeddings")?,
            };
            match scaling {
                RopeScaling::Llama3 {
                    low_freq_factor,
                    high_freq_factor,
                    ..
                } if high_freq_factor <= low_freq_factor => Err(bad(
                    "rope_scaling: high_freq_factor must exceed low_freq_factor",
                )),
                _ => Ok(scaling),
            }
        }
        _ => Err(bad(format!(
            "rope_scaling of type `{kind}` is not supported (default, linear and llama3 are)"
        ))),
    }
}

impl LlamaConfig {
    /// The rotary inverse frequencies θ^(−2i/d), i < d/2, after `rope_scaling`.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let plain = (0..self.head_dim / 2).map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d));
        match self.rope_scaling {
            RopeScaling::None => plain.collect(),
            RopeScaling::Linear { factor } => plain.map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_positions,
            } => plain
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < original_max_positions / high_freq_factor {
                        f
                    } else if wavelen > original_max_positions / low_freq_factor {
                        f / factor
                    } else {
                        let smooth = (original_max_positions / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect(),
        }
    }
}

/// The sliding window to apply, refusing Qwen's per-layer variant.
fn sliding_window(model_type: &str, config: &Value) -> Result<Option<usize>, ModelError> {
    match model_type {
        "mistral" | "mixtral" => optional_usize(config, "sliding_window"),
        "qwen2" | "qwen3" | "qwen2_moe" | "qwen3_moe"
            if bool_field(config, "use_sliding_window") =>
        {
            Err(bad(format!(
                "{model_type} with use_sliding_window = true is not supported"
            )))
        }
        _ => Ok(None),
    }
}

fn parse_llama(
    model_type: &str,
    config: &Value,
    names: &HashSet<&str>,
) -> Result<LlamaConfig, ModelError> {
    let activation = config
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("silu");
    if activation != "silu" {
        return Err(bad(format!(
            "hidden_act `{activation}` is not supported for {model_type} (silu)"
        )));
    }
    let suffix = "embed_tokens.weight";
    let prefix = prefix_of(names, suffix).ok_or_else(|| ModelError::MissingTensor {
        name: format!("model.{suffix}"),
    })?;
    let hidden_size = usize_field(config, "hidden_size")?;
    let heads = usize_field(config, "num_attention_heads")?;
    let kv_heads = optional_usize(config, "num_key_value_heads")?.unwrap_or(heads);
    let head_dim = match optional_usize(config, "head_dim")? {
        Some(head_dim) => head_dim,
        None if hidden_size % heads == 0 => hidden_size / heads,
        None => {
            return Err(bad(format!(
                "hidden_size {hidden_size} is not a multiple of {heads} heads"
            )))
        }
    };
    if heads % kv_heads != 0 || head_dim % 2 != 0 {
        return Err(bad(format!(
            "{heads} attention heads cannot share {kv_heads} key/value heads of even size \
             (head_dim {head_dim})"
        )));
    }
    let layer0 = format!("{prefix}layers.0.");
    let has = |part: &str| names.contains(format!("{layer0}{part}").as_str());
    let tie = config.get("tie_word_embeddings").and_then(Value::as_bool);
    let lm_head = if names.contains("lm_head.weight") {
        "lm_head.weight".to_string()
    } else if tie == Some(false) {
        return Err(ModelError::MissingTensor {
            name: "lm_head.weight".into(),
        });
    } else {
        format!("{prefix}{suffix}")
    };
    Ok(LlamaConfig {
        model_type: model_type.to_string(),
        hidden_size,
        heads,
        kv_heads,
        head_dim,
        intermediate_size: usize_field(config, "intermediate_size")?,
        layers: usize_field(config, "num_hidden_layers")?,
        rms_norm_eps: float_field(config, "rms_norm_eps", 1e-6)?,
        vocab_size: usize_field(config, "vocab_size")?,
        rope_theta: float_field(config, "rope_theta", 10000.0)?,
        rope_scaling: rope_scaling(config)?,
        sliding_window: sliding_window(model_type, config)?,
        // Qwen3 always normalises q/k and Qwen2 always has q/k/v biases (so do their MoE
        // variants): required for them (a missing one is then reported), detected from the
        // names for the others.
        qk_norm: matches!(model_type, "qwen3" | "qwen3_moe") || has("self_attn.q_norm.weight"),
        qkv_bias: matches!(model_type, "qwen2" | "qwen2_moe") || has("self_attn.q_proj.bias"),
        o_bias: has("self_attn.o_proj.bias"),
        mlp_bias: has("mlp.gate_proj.bias"),
        prefix,
        lm_head,
        moe: parse_moe(model_type, config)?,
    })
}

/// The mixture-of-experts settings of `mixtral`, `qwen2_moe` and `qwen3_moe` (None for the
/// dense types).
fn parse_moe(model_type: &str, config: &Value) -> Result<Option<MoeConfig>, ModelError> {
    let moe = match model_type {
        "mixtral" => MoeConfig {
            naming: MoeNaming::Mixtral,
            experts: usize_field(config, "num_local_experts")?,
            top_k: usize_field(config, "num_experts_per_tok")?,
            expert_intermediate_size: usize_field(config, "intermediate_size")?,
            normalize_top_k: true,
            shared_expert_intermediate_size: None,
            decoder_sparse_step: 1,
            mlp_only_layers: Vec::new(),
        },
        "qwen2_moe" | "qwen3_moe" => MoeConfig {
            naming: MoeNaming::Qwen,
            experts: usize_field(config, "num_experts")?,
            top_k: usize_field(config, "num_experts_per_tok")?,
            expert_intermediate_size: usize_field(config, "moe_intermediate_size")?,
            normalize_top_k: bool_field(config, "norm_topk_prob"),
            shared_expert_intermediate_size: if model_type == "qwen2_moe" {
                Some(usize_field(config, "shared_expert_intermediate_size")?)
            } else {
                None
            },
            decoder_sparse_step: optional_usize(config, "decoder_sparse_step")?.unwrap_or(1),
            mlp_only_layers: layer_list(config, "mlp_only_layers")?,
        },
        _ => return Ok(None),
    };
    if moe.top_k > moe.experts {
        return Err(bad(format!(
            "num_experts_per_tok {} exceeds the {} experts",
            moe.top_k, moe.experts
        )));
    }
    // `router_jitter_noise` and the auxiliary-loss settings act in training only.
    Ok(Some(moe))
}

/// An optional list of layer indices (absent or null → empty).
fn layer_list(config: &Value, key: &str) -> Result<Vec<usize>, ModelError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        bad(format!(
                            "`{key}` must list layer indices (integers >= 0), found {item}"
                        ))
                    })
            })
            .collect(),
        Some(other) => Err(bad(format!(
            "`{key}` must be a list of layer indices, found {other}"
        ))),
    }
}
