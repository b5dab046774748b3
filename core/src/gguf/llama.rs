//! The model side of converting a Hugging Face llama-family checkpoint to GGUF, as pure
//! functions: what llama.cpp's `convert_hf_to_gguf.py` (classes `LlamaModel`, `Qwen2Model`,
//! `Qwen3Model`, base `TextModel`) and `llama-quantize` (`llama_tensor_get_type` in
//! `src/llama-quant.cpp`) decide, without reading any tensor data.
//!
//! - [`architecture`]: `config.json`'s `architectures[0]` to an [`Arch`] (GGUF
//!   `general.architecture` `llama`, `qwen2` or `qwen3`).
//! - [`metadata`]: the model key/values the converter writes, in its order and with its value
//!   types (`general.*`, `{arch}.*`; the tokenizer keys come from [`super::tokenizer`]).
//! - [`tensor_name`] / [`map_tensor`]: Hugging Face tensor name to GGUF tensor name.
//! - [`row_permutation`] / [`permute_rows`]: the converter's Q/K `permute` (llama arch only) as a
//!   permutation of rows, so a worker can reorder whole rows while reading them.
//! - [`extra_tensors`]: tensors the converter synthesizes (`rope_freqs.weight` for llama3 RoPE).
//! - [`tensor_type`] / [`tensor_type_in`]: each tensor's ggml type for a [`FileType`], i.e. the
//!   converter's choice for F32/F16/BF16/Q8_0 and `llama-quantize`'s mixture (applied to the
//!   converter's F16 output) for Q4_0/Q4_K_M/Q6_K.
//!
//! `config.json` is read raw; the converter reads it through transformers' `AutoConfig`, which
//! fills in class defaults. The defaults that matter here are reproduced per `model_type`
//! (see [`HParams::from_config`]).
//!
//! Mixture-of-experts checkpoints: Mixtral (GGUF arch `llama` with `expert_count`), Qwen2-MoE
//! (`qwen2moe`, with a shared expert) and Qwen3-MoE (`qwen3moe`). llama.cpp stacks the experts `…experts.E.w1` of a layer into one
//! 3-D tensor `blk.N.ffn_gate_exps` (`[E, rows, cols]`, expert 0 first, no padding between
//! experts): [`map_tensor`] names each expert's tensor by the stacked tensor and
//! [`expert_index`] gives its place in it.

use super::quants::GgmlType;
use super::writer::MetaValue;
use super::GgufError;
use serde_json::{Map, Value};

/// GGML quantization version written as `general.quantization_version` (`GGML_QNT_VERSION`).
pub const QUANTIZATION_VERSION: u32 = 2;

/// The Hugging Face architectures [`architecture`] accepts.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
];

/// A GGUF model architecture (llama.cpp's `MODEL_ARCH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Arch {
    /// `llama` (also Mistral): Q/K rows are permuted, `vocab_size` and `rope.dimension_count`
    /// are written.
    Llama,
    /// `qwen2`: q/k/v biases, no permutation.
    Qwen2,
    /// `qwen3`: per-head `attn_q_norm`/`attn_k_norm`, no permutation.
    Qwen3,
    /// `qwen2moe`: qwen2 attention, every layer's MLP a mixture of experts plus a shared
    /// expert with its own sigmoid gate.
    Qwen2Moe,
    /// `qwen3moe`: qwen3 attention, every layer's MLP a mixture of experts.
    Qwen3Moe,
}

impl Arch {
    /// The `general.architecture` string.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen2Moe => "qwen2moe",
            Arch::Qwen3Moe => "qwen3moe",
        }
    }

    /// Qwen2-MoE or Qwen3-MoE: experts under `mlp.experts`, no dense MLP.
    pub fn is_qwen_moe(self) -> bool {
        matches!(self, Arch::Qwen2Moe | Arch::Qwen3Moe)
    }

    /// Whether the converter permutes `q_proj`/`k_proj` (`LlamaModel.undo_permute`).
    pub fn permutes_qk(self) -> bool {
        self == Arch::Llama
    }
}

/// Recognizes `config["architectures"][0]`.
pub fn architecture(config: &Value) -> Result<Arch, GgufError> {
    let found = config
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .ok_or_else(|| {
            GgufError::BadConfig("no \"architectures\" list with a name in config.json".into())
        })?;
    match found {
        "LlamaForCausalLM" | "MistralForCausalLM" | "MixtralForCausalLM" => Ok(Arch::Llama),
        "Qwen2ForCausalLM" => Ok(Arch::Qwen2),
        "Qwen3ForCausalLM" => Ok(Arch::Qwen3),
        "Qwen2MoeForCausalLM" => Ok(Arch::Qwen2Moe),
        "Qwen3MoeForCausalLM" => Ok(Arch::Qwen3Moe),
        other => Err(GgufError::UnsupportedArchitecture {
            found: other.to_string(),
            reason: "not a llama-family architecture this converter knows".into(),
            supported: SUPPORTED_ARCHITECTURES.join(", "),
        }),
    }
}

/// A synthesized tensor: (GGUF name, row-major shape, values).
pub type ExtraTensor = (String, Vec<u64>, Vec<f32>);

// ----------------------------------------------------------------------------------------
// File types.

/// A GGUF file type (llama.cpp's `llama_ftype`): what most tensors are stored as.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_K_M,
    Q6_K,
}

impl FileType {
    /// Every supported file type.
    pub const ALL: [FileType; 7] = [
        FileType::F32,
        FileType::F16,
        FileType::BF16,
        FileType::Q8_0,
        FileType::Q4_0,
        FileType::Q4_K_M,
        FileType::Q6_K,
    ];

    /// The `general.file_type` value (`LLAMA_FTYPE_ALL_F32` = 0, `MOSTLY_F16` = 1,
    /// `MOSTLY_Q4_0` = 2, `MOSTLY_Q8_0` = 7, `MOSTLY_Q4_K_M` = 15, `MOSTLY_Q6_K` = 18,
    /// `MOSTLY_BF16` = 32).
    pub fn llama_ftype(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q8_0 => 7,
            FileType::Q4_K_M => 15,
            FileType::Q6_K => 18,
            FileType::BF16 => 32,
        }
    }

    /// The name as `llama-quantize` spells it (`"Q4_K_M"`).
    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "F32",
            FileType::F16 => "F16",
            FileType::BF16 => "BF16",
            FileType::Q8_0 => "Q8_0",
            FileType::Q4_0 => "Q4_0",
            FileType::Q4_K_M => "Q4_K_M",
            FileType::Q6_K => "Q6_K",
        }
    }

    /// Parses a name, ignoring ASCII case (`"q4_k_m"`).
    pub fn from_name(name: &str) -> Result<FileType, GgufError> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| GgufError::UnknownTypeName(name.to_string()))
    }

    /// Whether llama.cpp makes this file type with `llama-quantize` (from the converter's
    /// output) rather than the converter itself.
    pub fn is_requantized(self) -> bool {
        matches!(self, FileType::Q4_0 | FileType::Q4_K_M | FileType::Q6_K)
    }

    /// The type most 2-D weights get (`llama_ftype_get_default_type`).
    pub fn default_type(self) -> GgmlType {
        match self {
            FileType::F32 => GgmlType::F32,
            FileType::F16 => GgmlType::F16,
            FileType::BF16 => GgmlType::BF16,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q4_0 => GgmlType::Q4_0,
            FileType::Q4_K_M => GgmlType::Q4_K,
            FileType::Q6_K => GgmlType::Q6_K,
        }
    }
}

impl std::fmt::Display for FileType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

// ----------------------------------------------------------------------------------------
// Hyperparameters.

/// The hyperparameters the conversion needs, read from `config.json` with transformers'
/// config-class defaults for missing optional keys.
#[derive(Debug, Clone, PartialEq)]
pub struct HParams {
    pub n_layers: u64,
    pub n_embd: u64,
    pub n_ff: u64,
    pub n_head: u64,
    pub n_head_kv: u64,
    /// Attention head size: `head_dim`, or `hidden_size / num_attention_heads`.
    pub head_dim: u64,
    /// Whether the (AutoConfig) hparams carry `head_dim`, so that the converter writes
    /// `attention.key_length`/`value_length` (always for LlamaConfig/MistralConfig/Qwen3Config).
    pub head_dim_key: bool,
    pub vocab_size: u64,
    pub context_length: u64,
    pub rms_norm_eps: f64,
    /// `layer_norm_eps` and friends, if present (none of the supported configs has one).
    pub layer_norm_eps: Option<f64>,
    /// `config["is_causal"] == false`.
    pub non_causal: bool,
    /// Experts per MoE layer (0 for a dense model) and experts used per token.
    pub n_expert: u64,
    pub n_expert_used: u64,
    /// An expert's hidden size (`moe_intermediate_size`; Qwen-MoE only).
    pub n_ff_exp: Option<u64>,
    /// The shared expert's hidden size (`shared_expert_intermediate_size`; Qwen2-MoE).
    pub n_ff_shexp: Option<u64>,
    /// The config class's `rope_theta` when config.json has none.
    pub default_rope_theta: f64,
    /// The RoPE parameters as the converter normalizes them (`rope_parameters` or
    /// `rope_scaling`, with `rope_theta`, `rope_type`, `original_max_position_embeddings`
    /// mirrored from the top level; `full_attention` selected when present).
    pub rope: Map<String, Value>,
}

/// Defaults of the transformers config class for a `model_type`.
struct ClassDefaults {
    /// `None`: `num_key_value_heads` defaults to `num_attention_heads`.
    n_head_kv: Option<u64>,
    max_position_embeddings: u64,
    /// `Some(None)`: the class always has `head_dim` (defaulting to hidden/heads);
    /// `Some(Some(d))`: defaults to `d`; `None`: only when config.json has it.
    head_dim: Option<Option<u64>>,
    rms_norm_eps: f64,
    rope_theta: f64,
    /// `(num_experts, num_experts_per_tok, moe_intermediate_size)` of a MoE class.
    experts: Option<(u64, u64, Option<u64>)>,
}

fn class_defaults(config: &Value, arch: Arch) -> ClassDefaults {
    let model_type = config.get("model_type").and_then(Value::as_str);
    let key = match (model_type, arch) {
        (
            Some(
                t @ ("llama" | "mistral" | "mixtral" | "qwen2" | "qwen2_moe" | "qwen3"
                | "qwen3_moe"),
            ),
            _,
        ) => t,
        (_, Arch::Llama) => "llama",
        (_, Arch::Qwen2) => "qwen2",
        (_, Arch::Qwen3) => "qwen3",
        (_, Arch::Qwen2Moe) => "qwen2_moe",
        (_, Arch::Qwen3Moe) => "qwen3_moe",
    };
    let dense = |n_head_kv, max_position_embeddings, head_dim| ClassDefaults {
        n_head_kv,
        max_position_embeddings,
        head_dim,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        experts: None,
    };
    match key {
        // LlamaConfig: num_key_value_heads=None -> heads, max_position_embeddings=2048.
        "llama" => dense(None, 2048, Some(None)),
        // MistralConfig: num_key_value_heads=8, max_position_embeddings=4096*32.
        "mistral" => dense(Some(8), 4096 * 32, Some(None)),
        // MixtralConfig: num_key_value_heads=8, max_position_embeddings=4096*32, head_dim
        // only when given, rms_norm_eps=1e-5, rope_theta=1e6, 8 experts, 2 per token.
        "mixtral" => ClassDefaults {
            rms_norm_eps: 1e-5,
            rope_theta: 1e6,
            experts: Some((8, 2, None)),
            ..dense(Some(8), 4096 * 32, None)
        },
        // Qwen2Config: num_key_value_heads=32, max_position_embeddings=32768, no head_dim.
        "qwen2" => dense(Some(32), 32768, None),
        // Qwen2MoeConfig: num_key_value_heads=16, max_position_embeddings=32768, no head_dim,
        // 60 experts, 4 per token, moe_intermediate_size=1408 (shared expert: 5632).
        "qwen2_moe" => ClassDefaults {
            experts: Some((60, 4, Some(1408))),
            ..dense(Some(16), 32768, None)
        },
        // Qwen3MoeConfig: num_key_value_heads=4, max_position_embeddings=32768, head_dim only
        // when given, 128 experts, 8 per token, moe_intermediate_size=768.
        "qwen3_moe" => ClassDefaults {
            experts: Some((128, 8, Some(768))),
            ..dense(Some(4), 32768, None)
        },
        // Qwen3Config: num_key_value_heads=32, head_dim=128, max_position_embeddings=32768.
        _ => dense(Some(32), 32768, Some(Some(128))),
    }
}

/// The first of `keys` present (and not null) in `config` (the converter's `find_hparam`).
fn find<'a>(config: &'a Value, keys: &[&str]) -> Option<(&'a str, &'a Value)> {
    let obj = config.as_object()?;
    keys.iter().find_map(|&k| {
        obj.get_key_value(k)
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.as_str(), v))
    })
}

fn as_count(key: &str, value: &Value) -> Result<u64, GgufError> {
    value
        .as_u64()
        .or_else(|| {
            value
                .as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1e15)
                .map(|f| f as u64)
        })
        .ok_or_else(|| {
            GgufError::BadConfig(format!("{key:?} is {value}, not a non-negative integer"))
        })
}

fn find_count(config: &Value, keys: &[&str]) -> Result<Option<u64>, GgufError> {
    find(config, keys).map(|(k, v)| as_count(k, v)).transpose()
}

fn require_count(config: &Value, keys: &[&str]) -> Result<u64, GgufError> {
    find_count(config, keys)?
        .ok_or_else(|| GgufError::BadConfig(format!("config.json has none of {}", keys.join(", "))))
}

fn find_float(config: &Value, keys: &[&str]) -> Result<Option<f64>, GgufError> {
    find(config, keys)
        .map(|(k, v)| {
            v.as_f64()
                .ok_or_else(|| GgufError::BadConfig(format!("{k:?} is {v}, not a number")))
        })
        .transpose()
}

impl HParams {
    /// Reads the hyperparameters of a supported architecture.
    pub fn from_config(arch: Arch, config: &Value) -> Result<HParams, GgufError> {
        if !config.is_object() {
            return Err(GgufError::BadConfig(
                "config.json is not a JSON object".into(),
            ));
        }
        let defaults = class_defaults(config, arch);
        let n_ff_shexp = match arch {
            Arch::Qwen2Moe => {
                Some(find_count(config, &["shared_expert_intermediate_size"])?.unwrap_or(5632))
            }
            _ => None,
        };
        let (n_expert, n_expert_used, n_ff_exp) = match defaults.experts {
            None => {
                let found = find_count(
                    config,
                    &["num_local_experts", "num_experts", "n_routed_experts"],
                )?;
                if let Some(n) = found.filter(|&n| n > 0) {
                    return Err(GgufError::UnsupportedArchitecture {
                        found: format!("{} with {n} experts", arch.name()),
                        reason: "experts in a dense architecture's config (use MixtralForCausalLM or Qwen3MoeForCausalLM)".into(),
                        supported: SUPPORTED_ARCHITECTURES.join(", "),
                    });
                }
                (0, 0, None)
            }
            Some((experts, used, ff)) => {
                let n = find_count(
                    config,
                    &["num_local_experts", "num_experts", "n_routed_experts"],
                )?
                .unwrap_or(experts);
                let used = find_count(
                    config,
                    &[
                        "num_experts_per_tok",
                        "num_experts_per_token",
                        "top_k_experts",
                    ],
                )?
                .unwrap_or(used);
                let ff = match ff {
                    Some(d) => Some(find_count(config, &["moe_intermediate_size"])?.unwrap_or(d)),
                    None => None,
                };
                if n == 0 || used == 0 || used > n {
                    return Err(GgufError::BadConfig(format!(
                        "{n} experts with {used} used per token"
                    )));
                }
                // The converter maps no dense MLP in a Qwen-MoE model.
                let sparse_step = find_count(config, &["decoder_sparse_step"])?.unwrap_or(1);
                let dense_layers = config
                    .get("mlp_only_layers")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty());
                if arch != Arch::Llama && (sparse_step != 1 || dense_layers) {
                    return Err(GgufError::UnsupportedArchitecture {
                        found: format!("{} with dense MLP layers", arch.name()),
                        reason: "llama.cpp's converter maps no dense MLP in it (decoder_sparse_step must be 1 and mlp_only_layers empty)".into(),
                        supported: SUPPORTED_ARCHITECTURES.join(", "),
                    });
                }
                (n, used, ff)
            }
        };
        let n_layers = require_count(
            config,
            &["n_layers", "num_hidden_layers", "n_layer", "num_layers"],
        )?;
        let n_embd = require_count(config, &["hidden_size", "n_embd", "dim"])?;
        let n_ff = require_count(
            config,
            &[
                "prefix_dense_intermediate_size",
                "dense_intermediate_size",
                "intermediate_size",
                "n_inner",
                "hidden_dim",
            ],
        )?;
        let n_head = require_count(config, &["num_attention_heads", "n_head", "n_heads"])?;
        let n_head_kv = match find_count(config, &["num_key_value_heads", "n_kv_heads"])? {
            Some(n) => n,
            None => defaults.n_head_kv.unwrap_or(n_head),
        };
        if n_head == 0 || n_head_kv == 0 || n_layers == 0 || n_embd == 0 {
            return Err(GgufError::BadConfig(
                "layer, head, key-value head counts and hidden size must be positive".into(),
            ));
        }
        let explicit_head_dim = find_count(config, &["head_dim"])?;
        let head_dim_key = explicit_head_dim.is_some() || defaults.head_dim.is_some();
        let head_dim = match (explicit_head_dim, defaults.head_dim) {
            (Some(d), _) => d,
            (None, Some(Some(d))) => d,
            _ => n_embd / n_head,
        };
        if head_dim == 0 {
            return Err(GgufError::BadConfig("head_dim is 0".into()));
        }
        let vocab_size = require_count(config, &["vocab_size"])?;
        let context_length = find_count(
            config,
            &[
                "max_position_embeddings",
                "n_ctx",
                "n_positions",
                "max_length",
                "max_sequence_length",
                "model_max_length",
            ],
        )?
        .unwrap_or(defaults.max_position_embeddings);
        let rms_norm_eps =
            find_float(config, &["rms_norm_eps", "norm_eps"])?.unwrap_or(defaults.rms_norm_eps);
        let layer_norm_eps = find_float(
            config,
            &["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"],
        )?;
        let non_causal = config.get("is_causal") == Some(&Value::Bool(false));
        let rope = rope_parameters(config)?;
        Ok(HParams {
            n_layers,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            head_dim_key,
            vocab_size,
            context_length,
            rms_norm_eps,
            layer_norm_eps,
            non_causal,
            n_expert,
            n_expert_used,
            n_ff_exp,
            n_ff_shexp,
            default_rope_theta: defaults.rope_theta,
            rope,
        })
    }

    /// `rope_theta` (the config class's default when the config has none).
    pub fn rope_theta(&self) -> f64 {
        self.rope
            .get("rope_theta")
            .and_then(Value::as_f64)
            .unwrap_or(self.default_rope_theta)
    }

    /// The RoPE type (`rope_type`, lower-cased by nobody: as written), if any.
    pub fn rope_type(&self) -> Option<&str> {
        self.rope.get("rope_type").and_then(Value::as_str)
    }
}

/// `TextModel.__init__`'s normalization of `rope_parameters`/`rope_scaling`, then the
/// `full_attention` selection of `set_gguf_parameters`.
fn rope_parameters(config: &Value) -> Result<Map<String, Value>, GgufError> {
    let mut rope =
        match find(config, &["rope_parameters"]).or_else(|| find(config, &["rope_scaling"])) {
            Some((_, Value::Object(m))) => m.clone(),
            Some((k, v)) => {
                return Err(GgufError::BadConfig(format!("{k:?} is {v}, not an object")));
            }
            None => Map::new(),
        };
    if !rope.contains_key("full_attention") && !rope.contains_key("sliding_attention") {
        if !rope.contains_key("rope_theta") {
            if let Some((_, theta)) = find(
                config,
                &[
                    "global_rope_theta",
                    "rope_global_theta",
                    "rope_theta_global",
                    "rope_theta",
                    "rotary_emb_base",
                ],
            ) {
                rope.insert("rope_theta".into(), theta.clone());
            }
        }
        if !rope.contains_key("rope_type") {
            if let Some(t) = rope.get("type").cloned() {
                rope.insert("rope_type".into(), t);
            }
        }
        if !rope.contains_key("original_max_position_embeddings") {
            if let Some((_, v)) = find(config, &["original_max_position_embeddings"]) {
                rope.insert("original_max_position_embeddings".into(), v.clone());
            }
        }
    }
    if let Some(full) = rope.get("full_attention") {
        return match full {
            Value::Object(m) => Ok(m.clone()),
            v => Err(GgufError::BadConfig(format!(
                "rope full_attention is {v}, not an object"
            ))),
        };
    }
    Ok(rope)
}

// ----------------------------------------------------------------------------------------
// Metadata.

fn u32_value(key: &str, v: u64) -> Result<MetaValue, GgufError> {
    u32::try_from(v)
        .map(MetaValue::U32)
        .map_err(|_| GgufError::BadConfig(format!("{key} = {v} does not fit in u32")))
}

fn rope_f32(rope: &Map<String, Value>, key: &str) -> Result<Option<f32>, GgufError> {
    match rope.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|f| Some(f as f32))
            .ok_or_else(|| GgufError::BadConfig(format!("rope {key:?} is {v}, not a number"))),
    }
}

/// The model key/values of a GGUF file, as `convert_hf_to_gguf.py` writes them, in the
/// converter's order:
///
/// 1. `general.architecture`, `general.type` ("model"), `general.name`;
/// 2. `{arch}.block_count`, `.context_length`, `.embedding_length`, `.feed_forward_length`,
///    `.attention.head_count`, `.attention.head_count_kv`, [`.attention.causal`];
/// 3. RoPE scaling: linear: `.rope.scaling.type` and `.rope.scaling.factor`; yarn: type,
///    factor, `.rope.scaling.original_context_length` and the yarn factors present; longrope:
///    type; llama3: nothing (see [`extra_tensors`]);
/// 4. `.rope.freq_base`, `.attention.layer_norm_rms_epsilon`, [`.attention.layer_norm_epsilon`],
///    [`.attention.key_length`, `.attention.value_length` when the hparams carry `head_dim`];
/// 5. `general.file_type`; llama only: `.vocab_size`, `.rope.dimension_count`;
/// 6. `general.quantization_version` (2).
///
/// Counts are u32, floats f32, as gguf-py's writer stores them. The tokenizer keys
/// ([`super::tokenizer`]) follow in the converter's files. `llama-quantize` keeps the keys and
/// values but moves `general.quantization_version` and `general.file_type` to the end of the
/// file's list (order does not matter to readers). The converter also writes cosmetic
/// `general.*` keys derived from the model card and directory name (`size_label`, `basename`,
/// `license`...), which are left out; `name` becomes `general.name`.
pub fn metadata(
    arch: Arch,
    config: &Value,
    file_type: FileType,
    name: &str,
) -> Result<Vec<(String, MetaValue)>, GgufError> {
    let hp = HParams::from_config(arch, config)?;
    let a = arch.name();
    let mut out: Vec<(String, MetaValue)> = Vec::new();
    let mut put = |key: String, value: MetaValue| out.push((key, value));
    put("general.architecture".into(), MetaValue::String(a.into()));
    put("general.type".into(), MetaValue::String("model".into()));
    put("general.name".into(), MetaValue::String(name.into()));
    put(
        format!("{a}.block_count"),
        u32_value("block_count", hp.n_layers)?,
    );
    put(
        format!("{a}.context_length"),
        u32_value("context_length", hp.context_length)?,
    );
    put(
        format!("{a}.embedding_length"),
        u32_value("embedding_length", hp.n_embd)?,
    );
    put(
        format!("{a}.feed_forward_length"),
        u32_value("feed_forward_length", hp.n_ff)?,
    );
    put(
        format!("{a}.attention.head_count"),
        u32_value("head_count", hp.n_head)?,
    );
    put(
        format!("{a}.attention.head_count_kv"),
        u32_value("head_count_kv", hp.n_head_kv)?,
    );
    if hp.non_causal {
        put(format!("{a}.attention.causal"), MetaValue::Bool(false));
    }
    if let Some(rope_type) = hp.rope_type() {
        let factor = rope_f32(&hp.rope, "factor")?;
        match (rope_type, factor) {
            ("linear", Some(f)) => {
                put(
                    format!("{a}.rope.scaling.type"),
                    MetaValue::String("linear".into()),
                );
                put(format!("{a}.rope.scaling.factor"), MetaValue::F32(f));
            }
            ("yarn", Some(f)) => {
                put(
                    format!("{a}.rope.scaling.type"),
                    MetaValue::String("yarn".into()),
                );
                put(format!("{a}.rope.scaling.factor"), MetaValue::F32(f));
                let orig = hp
                    .rope
                    .get("original_max_position_embeddings")
                    .filter(|v| !v.is_null())
                    .ok_or_else(|| {
                        GgufError::BadConfig(
                            "yarn RoPE scaling without original_max_position_embeddings".into(),
                        )
                    })?;
                let orig = as_count("original_max_position_embeddings", orig)?;
                put(
                    format!("{a}.rope.scaling.original_context_length"),
                    u32_value("original_max_position_embeddings", orig)?,
                );
                if let Some(v) = rope_f32(&hp.rope, "extrapolation_factor")? {
                    put(
                        format!("{a}.rope.scaling.yarn_ext_factor"),
                        MetaValue::F32(v),
                    );
                }
                let attn = match rope_f32(&hp.rope, "attention_factor")? {
                    Some(v) => Some(v),
                    None => rope_f32(&hp.rope, "attn_factor")?,
                };
                if let Some(v) = attn {
                    put(
                        format!("{a}.rope.scaling.yarn_attn_factor"),
                        MetaValue::F32(v),
                    );
                }
                if let Some(v) = rope_f32(&hp.rope, "beta_fast")? {
                    put(
                        format!("{a}.rope.scaling.yarn_beta_fast"),
                        MetaValue::F32(v),
                    );
                }
                if let Some(v) = rope_f32(&hp.rope, "beta_slow")? {
                    put(
                        format!("{a}.rope.scaling.yarn_beta_slow"),
                        MetaValue::F32(v),
                    );
                }
            }
            ("su" | "longrope", _) => {
                put(
                    format!("{a}.rope.scaling.type"),
                    MetaValue::String("longrope".into()),
                );
            }
            // "llama3": the rope_freqs.weight tensor (extra_tensors); "dynamic", "default" and
            // unknown types: nothing (the converter only logs them).
            _ => {}
        }
    }
    put(
        format!("{a}.rope.freq_base"),
        MetaValue::F32(hp.rope_theta() as f32),
    );
    put(
        format!("{a}.attention.layer_norm_rms_epsilon"),
        MetaValue::F32(hp.rms_norm_eps as f32),
    );
    if let Some(eps) = hp.layer_norm_eps {
        put(
            format!("{a}.attention.layer_norm_epsilon"),
            MetaValue::F32(eps as f32),
        );
    }
    if hp.n_expert > 0 {
        put(
            format!("{a}.expert_count"),
            u32_value("expert_count", hp.n_expert)?,
        );
        put(
            format!("{a}.expert_used_count"),
            u32_value("expert_used_count", hp.n_expert_used)?,
        );
    }
    if hp.head_dim_key {
        put(
            format!("{a}.attention.key_length"),
            u32_value("head_dim", hp.head_dim)?,
        );
        put(
            format!("{a}.attention.value_length"),
            u32_value("head_dim", hp.head_dim)?,
        );
    }
    put(
        "general.file_type".into(),
        MetaValue::U32(file_type.llama_ftype()),
    );
    if let Some(ff) = hp.n_ff_exp {
        put(
            format!("{a}.expert_feed_forward_length"),
            u32_value("moe_intermediate_size", ff)?,
        );
    }
    if let Some(ff) = hp.n_ff_shexp {
        put(
            format!("{a}.expert_shared_feed_forward_length"),
            u32_value("shared_expert_intermediate_size", ff)?,
        );
    }
    if arch == Arch::Llama {
        put(
            format!("{a}.vocab_size"),
            u32_value("vocab_size", hp.vocab_size)?,
        );
        put(
            format!("{a}.rope.dimension_count"),
            u32_value("head_dim", hp.head_dim)?,
        );
    }
    put(
        "general.quantization_version".into(),
        MetaValue::U32(QUANTIZATION_VERSION),
    );
    Ok(out)
}

/// Tensors the converter synthesizes, as (GGUF name, row-major shape, values), stored F32.
///
/// Only `rope_freqs.weight` for llama-arch models with `rope_type` "llama3" (Llama 3.1+):
/// one factor per pair of rotary dimensions, computed in f32 like the converter's torch code
/// (`LlamaModel.generate_extra_tensors`). The base powers are computed in f64 and rounded, so
/// a factor in the smooth band may differ from torch's by an ulp.
pub fn extra_tensors(arch: Arch, config: &Value) -> Result<Vec<ExtraTensor>, GgufError> {
    if arch != Arch::Llama {
        return Ok(vec![]);
    }
    let hp = HParams::from_config(arch, config)?;
    let is_llama3 = hp
        .rope_type()
        .is_some_and(|t| t.eq_ignore_ascii_case("llama3"));
    if !is_llama3 {
        return Ok(vec![]);
    }
    let get = |key: &str, default: f64| -> Result<f64, GgufError> {
        match hp.rope.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| GgufError::BadConfig(format!("rope {key:?} is {v}, not a number"))),
        }
    };
    let base = get("rope_theta", 10000.0)?;
    let factor = get("factor", 8.0)?;
    let low_freq_factor = get("low_freq_factor", 1.0)?;
    let high_freq_factor = get("high_freq_factor", 4.0)?;
    let old_context_len = get("original_max_position_embeddings", 8192.0)?;
    let factors = llama3_rope_factors(
        hp.head_dim,
        base,
        factor,
        low_freq_factor,
        high_freq_factor,
        old_context_len,
    );
    Ok(vec![(
        "rope_freqs.weight".to_string(),
        vec![factors.len() as u64],
        factors,
    )])
}

/// The llama3 RoPE frequency factors: torch float32 semantics, Python scalars cast to f32 where
/// they meet a tensor.
pub fn llama3_rope_factors(
    dim: u64,
    base: f64,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    old_context_len: f64,
) -> Vec<f32> {
    let low_freq_wavelen = old_context_len / low_freq_factor;
    let high_freq_wavelen = old_context_len / high_freq_factor;
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    (0..dim)
        .step_by(2)
        .map(|i| {
            // torch.arange(0, dim, 2, dtype=float32) / dim, base ** that, 1.0 / that.
            let exponent = i as f32 / dim as f32;
            let power = (base.powf(f64::from(exponent))) as f32;
            let freq = 1.0f32 / power;
            let wavelen = two_pi / freq;
            if wavelen < high_freq_wavelen as f32 {
                1.0
            } else if wavelen > low_freq_wavelen as f32 {
                factor as f32
            } else {
                let smooth = (old_context_len as f32 / wavelen - low_freq_factor as f32)
                    / (high_freq_factor - low_freq_factor) as f32;
                1.0f32 / ((1.0f32 - smooth) / factor as f32 + smooth)
            }
        })
        .collect()
}

// ----------------------------------------------------------------------------------------
// Tensor names.

/// Hugging Face → GGUF tensor name, `Ok(None)` for tensors the converter drops
/// (`….rotary_emb.inv_freq`, `….attention.bias`, `….attention.masked_bias`), an error for a
/// tensor the converter cannot map (it raises "Can not map tensor").
///
/// Mapped: `model.embed_tokens` → `token_embd`, `model.norm` → `output_norm`, `lm_head` →
/// `output`; per layer `model.layers.N.` + `self_attn.{q,k,v,o}_proj` → `blk.N.attn_{q,k,v,output}`,
/// `input_layernorm` → `attn_norm`, `post_attention_layernorm` → `ffn_norm`,
/// `mlp.{gate,up,down}_proj` → `ffn_{gate,up,down}`, and for qwen3 `self_attn.{q,k}_norm` →
/// `attn_{q,k}_norm`; each with its `.weight` or `.bias` suffix. Experts: Mixtral's
/// `block_sparse_moe.gate` → `ffn_gate_inp` and `block_sparse_moe.experts.E.{w1,w2,w3}` →
/// `ffn_{gate,down,up}_exps`; Qwen3-MoE's `mlp.gate` → `ffn_gate_inp` and
/// `mlp.experts.E.{gate,down,up}_proj` → `ffn_{gate,down,up}_exps` (whose dense `mlp.*_proj`
/// the converter cannot map). Every expert of a layer maps to the same stacked tensor.
pub fn map_tensor(arch: Arch, hf_name: &str) -> Result<Option<String>, GgufError> {
    if hf_name.ends_with(".attention.masked_bias")
        || hf_name.ends_with(".attention.bias")
        || hf_name.ends_with(".rotary_emb.inv_freq")
    {
        return Ok(None);
    }
    let unmapped = || GgufError::BadTensor {
        name: hf_name.to_string(),
        reason: format!("can not map tensor for architecture {}", arch.name()),
    };
    let (stem, suffix) = if let Some(s) = hf_name.strip_suffix(".weight") {
        (s, "weight")
    } else if let Some(s) = hf_name.strip_suffix(".bias") {
        (s, "bias")
    } else {
        return Err(unmapped());
    };
    let mapped = match stem {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.norm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => {
            let rest = stem.strip_prefix("model.layers.").ok_or_else(unmapped)?;
            let (layer, module) = rest.split_once('.').ok_or_else(unmapped)?;
            if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
                return Err(unmapped());
            }
            let layer: u64 = layer.parse().map_err(|_| unmapped())?;
            if let Some((_, projection)) = expert_parts(arch, module) {
                return Ok(Some(format!("blk.{layer}.ffn_{projection}_exps.{suffix}")));
            }
            let gguf = match module {
                "block_sparse_moe.gate" if arch == Arch::Llama => "ffn_gate_inp",
                "mlp.gate" if arch.is_qwen_moe() => "ffn_gate_inp",
                "mlp.gate_proj" | "mlp.up_proj" | "mlp.down_proj" if arch.is_qwen_moe() => {
                    return Err(unmapped())
                }
                "mlp.shared_expert.gate_proj" if arch == Arch::Qwen2Moe => "ffn_gate_shexp",
                "mlp.shared_expert.up_proj" if arch == Arch::Qwen2Moe => "ffn_up_shexp",
                "mlp.shared_expert.down_proj" if arch == Arch::Qwen2Moe => "ffn_down_shexp",
                "mlp.shared_expert_gate" if arch == Arch::Qwen2Moe => "ffn_gate_inp_shexp",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                "self_attn.q_norm" if matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe) => "attn_q_norm",
                "self_attn.k_norm" if matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe) => "attn_k_norm",
                _ => return Err(unmapped()),
            };
            format!("blk.{layer}.{gguf}")
        }
    };
    Ok(Some(format!("{mapped}.{suffix}")))
}

/// For an expert's module within a layer (`block_sparse_moe.experts.E.w1`,
/// `mlp.experts.E.gate_proj`), its expert number and the projection (`gate`, `up`, `down`).
fn expert_parts(arch: Arch, module: &str) -> Option<(u64, &'static str)> {
    let (rest, names): (&str, [(&str, &'static str); 3]) = match arch {
        Arch::Llama => (
            module.strip_prefix("block_sparse_moe.experts.")?,
            [("w1", "gate"), ("w2", "down"), ("w3", "up")],
        ),
        Arch::Qwen2Moe | Arch::Qwen3Moe => (
            module.strip_prefix("mlp.experts.")?,
            [
                ("gate_proj", "gate"),
                ("down_proj", "down"),
                ("up_proj", "up"),
            ],
        ),
        Arch::Qwen2 | Arch::Qwen3 => return None,
    };
    let (expert, projection) = rest.split_once('.')?;
    if expert.is_empty() || !expert.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (_, name) = names.iter().find(|(hf, _)| *hf == projection)?;
    Some((expert.parse().ok()?, name))
}

/// The expert number of a Hugging Face expert tensor (its place in the stacked tensor
/// [`map_tensor`] names), `None` for any other tensor.
pub fn expert_index(arch: Arch, hf_name: &str) -> Option<u64> {
    let stem = hf_name
        .strip_suffix(".weight")
        .or_else(|| hf_name.strip_suffix(".bias"))?;
    let (_, module) = stem.strip_prefix("model.layers.")?.split_once('.')?;
    expert_parts(arch, module).map(|(e, _)| e)
}

/// Hugging Face → GGUF tensor name; `None` for a tensor the converter drops or cannot map
/// (see [`map_tensor`], which tells the two apart).
pub fn tensor_name(arch: Arch, hf_name: &str) -> Option<String> {
    map_tensor(arch, hf_name).ok().flatten()
}

// ----------------------------------------------------------------------------------------
// Q/K permutation.

/// The converter's `LlamaModel.permute` on the leading dimension, as a row permutation:
/// `out[r] = in[perm[r]]` for a tensor of `rows` rows and `n_head` heads.
///
/// `permute` reshapes to `(n_head, 2, rows / n_head / 2, …)`, swaps axes 1 and 2 and reshapes
/// back, so within each head the first half of the rows (one rotary half) is interleaved with
/// the second: output row `h·d + 2j + t` comes from input row `h·d + t·d/2 + j` (d = rows/n_head).
pub fn permute_rows(rows: u64, n_head: u64) -> Result<Vec<u32>, GgufError> {
    if n_head == 0 || rows % (2 * n_head) != 0 || rows > u64::from(u32::MAX) {
        return Err(GgufError::BadConfig(format!(
            "cannot permute {rows} rows into {n_head} heads of two rotary halves"
        )));
    }
    let per_head = rows / n_head;
    let half = per_head / 2;
    let mut perm = Vec::with_capacity(rows as usize);
    for h in 0..n_head {
        for j in 0..half {
            for t in 0..2 {
                perm.push((h * per_head + t * half + j) as u32);
            }
        }
    }
    Ok(perm)
}

/// For a tensor the converter permutes (llama arch: `…q_proj.weight`/`.bias` with
/// `num_attention_heads`, `…k_proj.weight`/`.bias` with `num_key_value_heads`), the source row
/// of each output row (see [`permute_rows`]); `None` when the tensor is copied as is (qwen2,
/// qwen3, every other tensor). A bias is permuted element by element the same way.
///
/// The row count is `heads × head_dim` from the config; a caller should check it against the
/// tensor's real first dimension.
pub fn row_permutation(
    arch: Arch,
    hf_name: &str,
    config: &Value,
) -> Result<Option<Vec<u32>>, GgufError> {
    if !arch.permutes_qk() {
        return Ok(None);
    }
    let is = |module: &str| {
        hf_name.ends_with(&format!("{module}.weight"))
            || hf_name.ends_with(&format!("{module}.bias"))
    };
    let hp = HParams::from_config(arch, config)?;
    let heads = if is("q_proj") {
        hp.n_head
    } else if is("k_proj") {
        hp.n_head_kv
    } else {
        return Ok(None);
    };
    permute_rows(heads * hp.head_dim, heads).map(Some)
}

// ----------------------------------------------------------------------------------------
// Tensor types.

/// What the model looks like to `llama-quantize`'s type selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TypeContext {
    /// `block_count`.
    pub n_layers: u64,
    /// No `output.weight` in the file: `token_embd.weight` is quantized like the output.
    pub tied_embeddings: bool,
    /// llama.cpp's `LLM_TYPE_70B` (llama: 80 layers with grouped-query attention and not 8
    /// experts; qwen2: 80 layers): `attn_v` Q4_K becomes Q5_K.
    pub is_70b: bool,
    /// Experts per layer (0: dense). With exactly 8, `llama-quantize` stores `attn_v` and
    /// `attn_k` as Q8_0 and (Q4_K_M) `attn_output` as Q5_K.
    #[serde(default)]
    pub n_expert: u64,
}

impl TypeContext {
    /// The context of a dense model with `n_layers` layers and a separate `output.weight`.
    pub fn new(n_layers: u64) -> TypeContext {
        TypeContext {
            n_layers,
            tied_embeddings: false,
            is_70b: false,
            n_expert: 0,
        }
    }

    /// The context of a model from its config; `has_output_weight`: whether the GGUF file
    /// has `output.weight` (the checkpoint has `lm_head.weight`).
    pub fn from_config(
        arch: Arch,
        config: &Value,
        has_output_weight: bool,
    ) -> Result<TypeContext, GgufError> {
        let hp = HParams::from_config(arch, config)?;
        let is_70b = match arch {
            Arch::Llama => hp.n_layers == 80 && hp.n_head != hp.n_head_kv && hp.n_expert != 8,
            Arch::Qwen2 => hp.n_layers == 80,
            Arch::Qwen3 | Arch::Qwen2Moe | Arch::Qwen3Moe => false,
        };
        Ok(TypeContext {
            n_layers: hp.n_layers,
            tied_embeddings: !has_output_weight,
            is_70b,
            n_expert: hp.n_expert,
        })
    }
}

/// `use_more_bits` of `llama_tensor_get_type_impl`.
fn use_more_bits(i_layer: i64, n_layers: i64) -> bool {
    i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer - n_layers / 8) % 3 == 2
}

/// The layer of `blk.N.…`.
fn layer_of(name: &str) -> Option<i64> {
    let rest = name.strip_prefix("blk.")?;
    let (n, _) = rest.split_once('.')?;
    n.parse().ok()
}

/// The type of a tensor with GGUF name `gguf_name` and row-major `shape` in a file of type
/// `file_type`, exactly as llama.cpp decides it:
///
/// - F32/F16/BF16/Q8_0 (what `convert_hf_to_gguf.py --outtype` writes): 1-D tensors, `*_norm.weight`
///   and tensors not named `*.weight` are F32; every other tensor gets the file type's type,
///   except Q8_0 rows that are not a multiple of 32, which fall back to F16.
/// - Q4_0/Q4_K_M/Q6_K (`llama-quantize` run on the converter's F16 file): 1-D, `*_norm.weight`,
///   non-`weight` tensors stay F32. `output.weight` (and `token_embd.weight` when embeddings are
///   tied) becomes Q6_K, or Q8_0 if its row is not a multiple of the file type's block size.
///   Q4_K_M: `attn_v` and `ffn_down` are Q6_K in layers where
///   `use_more_bits(i, n) = i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2`, else Q4_K (`attn_v`
///   Q5_K in 70B models). Then `tensor_type_fallback`: a row not a multiple of the type's block
///   gives Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0 (32-value types stay), and F16 if the row is
///   not a multiple of 32 either.
pub fn tensor_type_in(
    file_type: FileType,
    gguf_name: &str,
    shape: &[u64],
    ctx: &TypeContext,
) -> GgmlType {
    use GgmlType as G;
    let ncols = shape.last().copied().unwrap_or(0);
    let keeps_f32 = shape.len() < 2
        || gguf_name.contains("_norm.weight")
        || !gguf_name.ends_with("weight")
        || gguf_name.contains("ffn_gate_inp.weight")
        || gguf_name.contains("ffn_gate_inp_shexp.weight");
    if keeps_f32 {
        return G::F32;
    }
    match file_type {
        FileType::F32 => return G::F32,
        FileType::F16 => return G::F16,
        FileType::BF16 => return G::BF16,
        FileType::Q8_0 => {
            return if ncols % 32 == 0 { G::Q8_0 } else { G::F16 };
        }
        FileType::Q4_0 | FileType::Q4_K_M | FileType::Q6_K => {}
    }
    let default = file_type.default_type();
    let mut ty = default;
    let is_output = gguf_name == "output.weight";
    let is_token_embd = gguf_name == "token_embd.weight";
    if is_output || (ctx.tied_embeddings && is_token_embd) {
        if ncols % default.block_size() as u64 != 0 {
            ty = G::Q8_0;
        } else if ty != G::Q8_0 {
            ty = G::Q6_K;
        }
    } else if is_token_embd {
        // No change for these file types.
    } else if gguf_name.contains("attn_v.weight") {
        let i = layer_of(gguf_name).unwrap_or(0);
        if file_type == FileType::Q4_K_M && use_more_bits(i, ctx.n_layers as i64) {
            ty = G::Q6_K;
        }
        if ctx.is_70b && ty == G::Q4_K {
            ty = G::Q5_K;
        }
        if ctx.n_expert == 8 {
            ty = G::Q8_0;
        }
    } else if gguf_name.contains("attn_k.weight") {
        if ctx.n_expert == 8 {
            ty = G::Q8_0;
        }
    } else if gguf_name.contains("attn_output.weight") {
        if ctx.n_expert == 8 && file_type == FileType::Q4_K_M {
            ty = G::Q5_K;
        }
    } else if gguf_name.contains("ffn_down") {
        let i = layer_of(gguf_name).unwrap_or(0);
        if file_type == FileType::Q4_K_M && use_more_bits(i, ctx.n_layers as i64) {
            ty = G::Q6_K;
        }
    }
    type_fallback(ty, ncols)
}

/// `ty`, or what llama.cpp stores instead when rows of `ncols` values are not a whole number
/// of its blocks (`tensor_type_fallback`: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16).
pub fn type_fallback(ty: GgmlType, ncols: u64) -> GgmlType {
    use GgmlType as G;
    if ncols % ty.block_size() as u64 == 0 {
        return ty;
    }
    let out = match ty {
        G::Q4_K => G::Q5_0,
        G::Q5_K => G::Q5_1,
        G::Q6_K => G::Q8_0,
        other => other,
    };
    if ncols % out.block_size() as u64 != 0 {
        G::F16
    } else {
        out
    }
}

/// [`tensor_type_in`] for a model with `n_layers` layers, a separate `output.weight` and not a
/// llama.cpp "70B" (use [`TypeContext::from_config`] for the general case).
pub fn tensor_type(file_type: FileType, gguf_name: &str, shape: &[u64], n_layers: u64) -> GgmlType {
    tensor_type_in(file_type, gguf_name, shape, &TypeContext::new(n_layers))
}
