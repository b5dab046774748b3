//! Tests of the llama-family conversion rules ([`super::llama`]) and the BPE tokenizer
//! metadata ([`super::tokenizer`]).

use super::llama::*;
use super::tokenizer::*;
use super::writer::{MetaArray, MetaValue};
use super::{GgmlType, GgufError};
use serde_json::{json, Value};

fn get<'a>(meta: &'a [(String, MetaValue)], key: &str) -> Option<&'a MetaValue> {
    meta.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn keys(meta: &[(String, MetaValue)]) -> Vec<&str> {
    meta.iter().map(|(k, _)| k.as_str()).collect()
}

/// Meta-Llama-3.1-8B's config.json.
fn llama31_config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3"
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16",
        "vocab_size": 128256
    })
}

/// Qwen2.5-0.5B's config.json.
fn qwen25_config() -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": true,
        "torch_dtype": "bfloat16",
        "use_sliding_window": false,
        "vocab_size": 151936
    })
}

/// Qwen3-0.6B's config.json.
fn qwen3_config() -> Value {
    json!({
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": false,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
        "model_type": "qwen3",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": null,
        "rope_theta": 1000000,
        "tie_word_embeddings": true,
        "vocab_size": 151936
    })
}

// ----------------------------------------------------------------------------------------
// Architecture.

#[test]
fn architectures_are_recognized() {
    for (name, arch) in [
        ("LlamaForCausalLM", Arch::Llama),
        ("MistralForCausalLM", Arch::Llama),
        ("Qwen2ForCausalLM", Arch::Qwen2),
        ("Qwen3ForCausalLM", Arch::Qwen3),
    ] {
        assert_eq!(
            architecture(&json!({ "architectures": [name] })).unwrap(),
            arch
        );
    }
    assert_eq!(Arch::Llama.name(), "llama");
    assert_eq!(Arch::Qwen2.name(), "qwen2");
    assert_eq!(Arch::Qwen3.name(), "qwen3");
}

#[test]
fn unknown_architectures_are_refused_by_name_and_moe_ones_recognized() {
    let err = architecture(&json!({ "architectures": ["GPT2LMHeadModel"] })).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, GgufError::UnsupportedArchitecture { .. }));
    assert!(msg.contains("GPT2LMHeadModel"), "{msg}");
    for supported in SUPPORTED_ARCHITECTURES {
        assert!(msg.contains(supported), "{msg}");
    }
    for (name, arch) in [
        ("MixtralForCausalLM", Arch::Llama),
        ("Qwen2MoeForCausalLM", Arch::Qwen2Moe),
        ("Qwen3MoeForCausalLM", Arch::Qwen3Moe),
    ] {
        assert_eq!(
            architecture(&json!({ "architectures": [name] })).unwrap(),
            arch
        );
    }
    assert!(matches!(
        architecture(&json!({ "model_type": "llama" })),
        Err(GgufError::BadConfig(_))
    ));
    // A dense architecture name with experts in its config is refused too.
    let mut config = llama31_config();
    config["num_local_experts"] = json!(8);
    assert!(matches!(
        metadata(Arch::Llama, &config, FileType::F16, "m"),
        Err(GgufError::UnsupportedArchitecture { .. })
    ));
}

// ----------------------------------------------------------------------------------------
// Metadata.

#[test]
fn llama31_metadata_matches_the_converter() {
    let meta = metadata(
        Arch::Llama,
        &llama31_config(),
        FileType::Q4_K_M,
        "Llama-3.1-8B",
    )
    .unwrap();
    assert_eq!(
        keys(&meta),
        [
            "general.architecture",
            "general.type",
            "general.name",
            "llama.block_count",
            "llama.context_length",
            "llama.embedding_length",
            "llama.feed_forward_length",
            "llama.attention.head_count",
            "llama.attention.head_count_kv",
            "llama.rope.freq_base",
            "llama.attention.layer_norm_rms_epsilon",
            "llama.attention.key_length",
            "llama.attention.value_length",
            "general.file_type",
            "llama.vocab_size",
            "llama.rope.dimension_count",
            "general.quantization_version",
        ]
    );
    let s = |v: &str| MetaValue::String(v.into());
    assert_eq!(get(&meta, "general.architecture"), Some(&s("llama")));
    assert_eq!(get(&meta, "general.type"), Some(&s("model")));
    assert_eq!(get(&meta, "general.name"), Some(&s("Llama-3.1-8B")));
    assert_eq!(get(&meta, "llama.block_count"), Some(&MetaValue::U32(32)));
    assert_eq!(
        get(&meta, "llama.context_length"),
        Some(&MetaValue::U32(131072))
    );
    assert_eq!(
        get(&meta, "llama.embedding_length"),
        Some(&MetaValue::U32(4096))
    );
    assert_eq!(
        get(&meta, "llama.feed_forward_length"),
        Some(&MetaValue::U32(14336))
    );
    assert_eq!(
        get(&meta, "llama.attention.head_count"),
        Some(&MetaValue::U32(32))
    );
    assert_eq!(
        get(&meta, "llama.attention.head_count_kv"),
        Some(&MetaValue::U32(8))
    );
    assert_eq!(
        get(&meta, "llama.rope.freq_base"),
        Some(&MetaValue::F32(500000.0))
    );
    assert_eq!(
        get(&meta, "llama.attention.layer_norm_rms_epsilon"),
        Some(&MetaValue::F32(1e-5))
    );
    assert_eq!(
        get(&meta, "llama.attention.key_length"),
        Some(&MetaValue::U32(128))
    );
    assert_eq!(get(&meta, "general.file_type"), Some(&MetaValue::U32(15)));
    assert_eq!(
        get(&meta, "llama.vocab_size"),
        Some(&MetaValue::U32(128256))
    );
    assert_eq!(
        get(&meta, "llama.rope.dimension_count"),
        Some(&MetaValue::U32(128))
    );
    assert_eq!(
        get(&meta, "general.quantization_version"),
        Some(&MetaValue::U32(2))
    );
}

#[test]
fn file_type_numbers_are_llama_cpps() {
    let numbers: Vec<(FileType, u32)> = FileType::ALL
        .iter()
        .map(|f| (*f, f.llama_ftype()))
        .collect();
    assert_eq!(
        numbers,
        [
            (FileType::F32, 0),
            (FileType::F16, 1),
            (FileType::BF16, 32),
            (FileType::Q8_0, 7),
            (FileType::Q4_0, 2),
            (FileType::Q4_K_M, 15),
            (FileType::Q6_K, 18),
        ]
    );
    assert_eq!(FileType::from_name("q4_k_m").unwrap(), FileType::Q4_K_M);
    assert!(FileType::from_name("q3_k_s").is_err());
    assert_eq!(FileType::Q4_K_M.default_type(), GgmlType::Q4_K);
}

#[test]
fn qwen_metadata_has_no_llama_only_keys() {
    let meta = metadata(Arch::Qwen2, &qwen25_config(), FileType::F16, "q").unwrap();
    assert_eq!(
        keys(&meta),
        [
            "general.architecture",
            "general.type",
            "general.name",
            "qwen2.block_count",
            "qwen2.context_length",
            "qwen2.embedding_length",
            "qwen2.feed_forward_length",
            "qwen2.attention.head_count",
            "qwen2.attention.head_count_kv",
            "qwen2.rope.freq_base",
            "qwen2.attention.layer_norm_rms_epsilon",
            "general.file_type",
            "general.quantization_version",
        ]
    );
    assert_eq!(
        get(&meta, "qwen2.rope.freq_base"),
        Some(&MetaValue::F32(1e6))
    );
    assert_eq!(
        get(&meta, "qwen2.attention.head_count_kv"),
        Some(&MetaValue::U32(2))
    );
    assert_eq!(get(&meta, "general.file_type"), Some(&MetaValue::U32(1)));

    let meta = metadata(Arch::Qwen3, &qwen3_config(), FileType::BF16, "q3").unwrap();
    assert_eq!(
        get(&meta, "general.architecture"),
        Some(&MetaValue::String("qwen3".into()))
    );
    assert_eq!(
        get(&meta, "qwen3.attention.key_length"),
        Some(&MetaValue::U32(128))
    );
    assert_eq!(
        get(&meta, "qwen3.attention.value_length"),
        Some(&MetaValue::U32(128))
    );
    assert_eq!(
        get(&meta, "qwen3.rope.freq_base"),
        Some(&MetaValue::F32(1e6))
    );
    assert_eq!(
        get(&meta, "qwen3.context_length"),
        Some(&MetaValue::U32(40960))
    );
    assert_eq!(get(&meta, "general.file_type"), Some(&MetaValue::U32(32)));
    assert!(get(&meta, "qwen3.vocab_size").is_none());
    assert!(get(&meta, "qwen3.rope.dimension_count").is_none());
}

#[test]
fn missing_optional_keys_take_the_transformers_class_defaults() {
    let minimal = |arch: &str, model_type: &str| {
        json!({
            "architectures": [arch], "model_type": model_type, "hidden_size": 256,
            "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 1000
        })
    };
    let meta = metadata(
        Arch::Llama,
        &minimal("LlamaForCausalLM", "llama"),
        FileType::F16,
        "m",
    )
    .unwrap();
    assert_eq!(
        get(&meta, "llama.context_length"),
        Some(&MetaValue::U32(2048))
    );
    assert_eq!(
        get(&meta, "llama.attention.head_count_kv"),
        Some(&MetaValue::U32(4))
    );
    assert_eq!(
        get(&meta, "llama.rope.freq_base"),
        Some(&MetaValue::F32(10000.0))
    );
    assert_eq!(
        get(&meta, "llama.attention.layer_norm_rms_epsilon"),
        Some(&MetaValue::F32(1e-6))
    );
    assert_eq!(
        get(&meta, "llama.attention.key_length"),
        Some(&MetaValue::U32(64))
    );
    assert_eq!(
        get(&meta, "llama.rope.dimension_count"),
        Some(&MetaValue::U32(64))
    );

    let meta = metadata(
        Arch::Llama,
        &minimal("MistralForCausalLM", "mistral"),
        FileType::F16,
        "m",
    )
    .unwrap();
    assert_eq!(
        get(&meta, "llama.context_length"),
        Some(&MetaValue::U32(131072))
    );
    assert_eq!(
        get(&meta, "llama.attention.head_count_kv"),
        Some(&MetaValue::U32(8))
    );

    let meta = metadata(
        Arch::Qwen3,
        &minimal("Qwen3ForCausalLM", "qwen3"),
        FileType::F16,
        "m",
    )
    .unwrap();
    assert_eq!(
        get(&meta, "qwen3.attention.key_length"),
        Some(&MetaValue::U32(128))
    );
    assert_eq!(
        get(&meta, "qwen3.context_length"),
        Some(&MetaValue::U32(32768))
    );

    let mut no_vocab = minimal("LlamaForCausalLM", "llama");
    no_vocab.as_object_mut().unwrap().remove("vocab_size");
    let err = metadata(Arch::Llama, &no_vocab, FileType::F16, "m").unwrap_err();
    assert!(matches!(err, GgufError::BadConfig(_)) && err.to_string().contains("vocab_size"));
}

#[test]
fn rope_scaling_keys_follow_the_converter() {
    let mut config = qwen25_config();
    config["rope_scaling"] =
        json!({"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"});
    let meta = metadata(Arch::Qwen2, &config, FileType::F16, "q").unwrap();
    assert_eq!(
        get(&meta, "qwen2.rope.scaling.type"),
        Some(&MetaValue::String("yarn".into()))
    );
    assert_eq!(
        get(&meta, "qwen2.rope.scaling.factor"),
        Some(&MetaValue::F32(4.0))
    );
    assert_eq!(
        get(&meta, "qwen2.rope.scaling.original_context_length"),
        Some(&MetaValue::U32(32768))
    );
    let k = keys(&meta);
    let pos = |key: &str| k.iter().position(|x| *x == key).unwrap();
    assert!(pos("qwen2.attention.head_count_kv") < pos("qwen2.rope.scaling.type"));
    assert!(pos("qwen2.rope.scaling.original_context_length") < pos("qwen2.rope.freq_base"));

    config["rope_scaling"] = json!({"factor": 4.0, "type": "yarn"});
    assert!(matches!(
        metadata(Arch::Qwen2, &config, FileType::F16, "q"),
        Err(GgufError::BadConfig(_))
    ));

    let mut config = llama31_config();
    config["rope_scaling"] = json!({"factor": 2.0, "rope_type": "linear"});
    let meta = metadata(Arch::Llama, &config, FileType::F16, "l").unwrap();
    assert_eq!(
        get(&meta, "llama.rope.scaling.type"),
        Some(&MetaValue::String("linear".into()))
    );
    assert_eq!(
        get(&meta, "llama.rope.scaling.factor"),
        Some(&MetaValue::F32(2.0))
    );
    // llama3 scaling writes no keys, only the rope_freqs tensor.
    let meta = metadata(Arch::Llama, &llama31_config(), FileType::F16, "l").unwrap();
    assert!(!keys(&meta).iter().any(|k| k.contains("scaling")));
    // transformers 5 "rope_parameters" with a nested theta.
    let mut config = llama31_config();
    config.as_object_mut().unwrap().remove("rope_theta");
    config.as_object_mut().unwrap().remove("rope_scaling");
    config["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 250000.0});
    let meta = metadata(Arch::Llama, &config, FileType::F16, "l").unwrap();
    assert_eq!(
        get(&meta, "llama.rope.freq_base"),
        Some(&MetaValue::F32(250000.0))
    );
}

#[test]
fn llama3_rope_freqs_match_torch_bit_for_bit() {
    // convert_hf_to_gguf.py's torch code run on Llama 3.1's rope parameters (dim 128, theta
    // 500000, factor 8, low 1, high 4, original context 8192), as f32 bit patterns.
    let mut expected = vec![0x3f80_0000u32; 29];
    expected.extend([
        0x3f9a8ed5, 0x3fc6d64a, 0x4001af1d, 0x402c732e, 0x406bcace, 0x40a83c06,
    ]);
    expected.extend([0x4100_0000u32; 29]);
    let tensors = extra_tensors(Arch::Llama, &llama31_config()).unwrap();
    assert_eq!(tensors.len(), 1);
    let (name, shape, values) = &tensors[0];
    assert_eq!(name, "rope_freqs.weight");
    assert_eq!(shape, &vec![64]);
    let bits: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
    assert_eq!(bits, expected);

    // dim 64, factor 32 (as in Llama 3.2 1B's head size with a larger factor).
    let mut expected = vec![0x3f80_0000u32; 15];
    expected.extend([0x3fd35ec2, 0x4052b46f, 0x411aaaee]);
    expected.extend([0x4200_0000u32; 14]);
    let bits: Vec<u32> = llama3_rope_factors(64, 500000.0, 32.0, 1.0, 4.0, 8192.0)
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(bits, expected);

    // No rope_freqs for other RoPE types or other architectures.
    let mut config = llama31_config();
    config.as_object_mut().unwrap().remove("rope_scaling");
    assert!(extra_tensors(Arch::Llama, &config).unwrap().is_empty());
    assert!(extra_tensors(Arch::Qwen2, &qwen25_config())
        .unwrap()
        .is_empty());
}

// ----------------------------------------------------------------------------------------
// Tensor names.

#[test]
fn tensor_names_map_like_the_converter() {
    let cases = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        (
            "model.layers.0.self_attn.q_proj.weight",
            "blk.0.attn_q.weight",
        ),
        (
            "model.layers.3.self_attn.k_proj.weight",
            "blk.3.attn_k.weight",
        ),
        ("model.layers.3.self_attn.v_proj.bias", "blk.3.attn_v.bias"),
        (
            "model.layers.12.self_attn.o_proj.weight",
            "blk.12.attn_output.weight",
        ),
        (
            "model.layers.12.input_layernorm.weight",
            "blk.12.attn_norm.weight",
        ),
        (
            "model.layers.12.post_attention_layernorm.weight",
            "blk.12.ffn_norm.weight",
        ),
        (
            "model.layers.7.mlp.gate_proj.weight",
            "blk.7.ffn_gate.weight",
        ),
        ("model.layers.7.mlp.up_proj.weight", "blk.7.ffn_up.weight"),
        (
            "model.layers.7.mlp.down_proj.weight",
            "blk.7.ffn_down.weight",
        ),
    ];
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3] {
        for (hf, gguf) in cases {
            assert_eq!(
                tensor_name(arch, hf).as_deref(),
                Some(gguf),
                "{arch:?} {hf}"
            );
        }
        assert_eq!(
            map_tensor(arch, "model.layers.0.self_attn.rotary_emb.inv_freq").unwrap(),
            None
        );
        if arch != Arch::Llama {
            assert!(map_tensor(arch, "model.layers.0.block_sparse_moe.gate.weight").is_err());
        }
        assert!(map_tensor(arch, "model.layers.x.mlp.up_proj.weight").is_err());
        assert!(map_tensor(arch, "model.layers.0.mlp.up_proj.scales").is_err());
        assert_eq!(tensor_name(arch, "vision_tower.blocks.0.weight"), None);
    }
    assert_eq!(
        tensor_name(Arch::Qwen3, "model.layers.5.self_attn.q_norm.weight").as_deref(),
        Some("blk.5.attn_q_norm.weight")
    );
    assert_eq!(
        tensor_name(Arch::Qwen3, "model.layers.5.self_attn.k_norm.weight").as_deref(),
        Some("blk.5.attn_k_norm.weight")
    );
    assert!(map_tensor(Arch::Llama, "model.layers.5.self_attn.q_norm.weight").is_err());
    assert!(map_tensor(Arch::Qwen2, "model.layers.5.self_attn.k_norm.weight").is_err());
}

// ----------------------------------------------------------------------------------------
// Q/K permutation.

/// numpy's `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`
/// on a row-major array, by explicit index arithmetic over the 4-D views.
fn numpy_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    // Source view: (n_head, 2, half, cols), strides (2*half*cols, half*cols, cols, 1).
    // After swapaxes(1, 2) the view is (n_head, half, 2, cols) with strides
    // (2*half*cols, cols, half*cols, 1); reshape copies it out in C order.
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for j in 0..half {
            for t in 0..2 {
                for c in 0..cols {
                    out.push(w[h * 2 * half * cols + j * cols + t * half * cols + c]);
                }
            }
        }
    }
    out
}

fn apply_rows(w: &[f32], cols: usize, perm: &[u32]) -> Vec<f32> {
    perm.iter()
        .flat_map(|&r| {
            w[r as usize * cols..(r as usize + 1) * cols]
                .iter()
                .copied()
        })
        .collect()
}

#[test]
fn row_permutation_equals_the_converters_reshape_swapaxes() {
    // hidden 48, 4 heads of 12, 2 key-value heads: q is 48 x 48, k is 24 x 48.
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 48,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 10
    });
    let cols = 48;
    for (name, rows, heads) in [
        ("model.layers.0.self_attn.q_proj.weight", 48, 4),
        ("model.layers.0.self_attn.k_proj.weight", 24, 2),
    ] {
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let perm = row_permutation(Arch::Llama, name, &config)
            .unwrap()
            .unwrap();
        assert_eq!(perm.len(), rows);
        assert_eq!(
            apply_rows(&w, cols, &perm),
            numpy_permute(&w, rows, cols, heads),
            "{name}"
        );
        // A bias is the 1-column case.
        let bias_name = name.replace(".weight", ".bias");
        let b: Vec<f32> = (0..rows).map(|i| i as f32).collect();
        let perm_b = row_permutation(Arch::Llama, &bias_name, &config)
            .unwrap()
            .unwrap();
        assert_eq!(
            apply_rows(&b, 1, &perm_b),
            numpy_permute(&b, rows, 1, heads)
        );
        // It is a permutation.
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..rows as u32).collect::<Vec<_>>());
    }
    // A small case spelled out: 1 head of 4 rows -> rows 0, 2, 1, 3.
    assert_eq!(permute_rows(4, 1).unwrap(), [0, 2, 1, 3]);
    assert_eq!(permute_rows(8, 2).unwrap(), [0, 2, 1, 3, 4, 6, 5, 7]);
    assert!(permute_rows(6, 2).is_err());
    // Nothing else is permuted, and qwen never is.
    assert_eq!(
        row_permutation(
            Arch::Llama,
            "model.layers.0.self_attn.v_proj.weight",
            &config
        )
        .unwrap(),
        None
    );
    assert_eq!(
        row_permutation(
            Arch::Qwen2,
            "model.layers.0.self_attn.q_proj.weight",
            &qwen25_config()
        )
        .unwrap(),
        None
    );
    assert_eq!(
        row_permutation(
            Arch::Qwen3,
            "model.layers.0.self_attn.k_proj.weight",
            &qwen3_config()
        )
        .unwrap(),
        None
    );
    // An explicit head_dim (Mistral-Nemo style: 32 heads x 128 != hidden 5120).
    let nemo = json!({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 5120,
        "head_dim": 128, "intermediate_size": 14336, "num_hidden_layers": 40,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 131072
    });
    let q = row_permutation(Arch::Llama, "model.layers.0.self_attn.q_proj.weight", &nemo).unwrap();
    assert_eq!(q.unwrap().len(), 4096);
    let k = row_permutation(Arch::Llama, "model.layers.0.self_attn.k_proj.weight", &nemo).unwrap();
    assert_eq!(k.unwrap().len(), 1024);
}

// ----------------------------------------------------------------------------------------
// Tensor types.

#[test]
fn float_and_q8_0_types_follow_the_converter() {
    let ctx = TypeContext::new(2);
    let w = [64u64, 256];
    for (ft, ty) in [
        (FileType::F32, GgmlType::F32),
        (FileType::F16, GgmlType::F16),
        (FileType::BF16, GgmlType::BF16),
        (FileType::Q8_0, GgmlType::Q8_0),
    ] {
        assert_eq!(tensor_type_in(ft, "blk.0.attn_q.weight", &w, &ctx), ty);
        assert_eq!(tensor_type_in(ft, "output.weight", &w, &ctx), ty);
        assert_eq!(tensor_type_in(ft, "token_embd.weight", &w, &ctx), ty);
        assert_eq!(
            tensor_type_in(ft, "blk.0.attn_norm.weight", &[256], &ctx),
            GgmlType::F32
        );
        assert_eq!(
            tensor_type_in(ft, "blk.0.attn_q.bias", &[256], &ctx),
            GgmlType::F32
        );
        assert_eq!(
            tensor_type_in(ft, "rope_freqs.weight", &[64], &ctx),
            GgmlType::F32
        );
        assert_eq!(
            tensor_type_in(ft, "blk.0.attn_q_norm.weight", &[128], &ctx),
            GgmlType::F32
        );
    }
    // gguf-py cannot Q8_0 a row of 688 (not a multiple of 32): F16.
    assert_eq!(
        tensor_type_in(FileType::Q8_0, "blk.0.ffn_down.weight", &[256, 688], &ctx),
        GgmlType::F16
    );
}

#[test]
fn q4_k_m_mixture_is_llama_quantizes() {
    // 32 layers: use_more_bits is true for layers 0..4, 28..32 and (i - 4) % 3 == 2.
    let more: Vec<u64> = (0..32)
        .filter(|&i| !(4..28).contains(&i) || (i as i64 - 4) % 3 == 2)
        .collect();
    assert_eq!(
        more,
        [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    );
    let ctx = TypeContext::new(32);
    let ft = FileType::Q4_K_M;
    for i in 0..32u64 {
        let expect = if more.contains(&i) {
            GgmlType::Q6_K
        } else {
            GgmlType::Q4_K
        };
        let v = format!("blk.{i}.attn_v.weight");
        let down = format!("blk.{i}.ffn_down.weight");
        assert_eq!(tensor_type_in(ft, &v, &[1024, 4096], &ctx), expect, "{v}");
        assert_eq!(
            tensor_type_in(ft, &down, &[4096, 14336], &ctx),
            expect,
            "{down}"
        );
        for other in ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"] {
            let name = format!("blk.{i}.{other}.weight");
            assert_eq!(
                tensor_type_in(ft, &name, &[4096, 4096], &ctx),
                GgmlType::Q4_K,
                "{name}"
            );
        }
    }
    assert_eq!(
        tensor_type_in(ft, "output.weight", &[128256, 4096], &ctx),
        GgmlType::Q6_K
    );
    assert_eq!(
        tensor_type_in(ft, "token_embd.weight", &[128256, 4096], &ctx),
        GgmlType::Q4_K
    );
    assert_eq!(
        tensor_type_in(ft, "output_norm.weight", &[4096], &ctx),
        GgmlType::F32
    );
    assert_eq!(
        tensor_type(ft, "blk.0.attn_v.weight", &[1024, 4096], 32),
        GgmlType::Q6_K
    );

    // Tied embeddings: token_embd is quantized like the output.
    let tied = TypeContext::from_config(Arch::Qwen2, &qwen25_config(), false).unwrap();
    assert!(tied.tied_embeddings && !tied.is_70b && tied.n_layers == 24);
    // Qwen2.5-0.5B: rows of 896 are not a multiple of 256.
    assert_eq!(
        tensor_type_in(ft, "token_embd.weight", &[151936, 896], &tied),
        GgmlType::Q8_0
    );
    assert_eq!(
        tensor_type_in(ft, "blk.1.attn_q.weight", &[896, 896], &tied),
        GgmlType::Q5_0
    );
    assert_eq!(
        tensor_type_in(ft, "blk.0.attn_v.weight", &[128, 896], &tied),
        GgmlType::Q8_0
    );
    // ffn_down's row is 4864 = 19 x 256: no fallback.
    assert_eq!(
        tensor_type_in(ft, "blk.0.ffn_down.weight", &[896, 4864], &tied),
        GgmlType::Q6_K
    );
    // Rows that are not even a multiple of 32 fall back to F16.
    assert_eq!(
        tensor_type_in(ft, "blk.1.ffn_down.weight", &[256, 688], &tied),
        GgmlType::F16
    );
    assert_eq!(
        tensor_type_in(ft, "blk.1.ffn_up.weight", &[688, 256], &tied),
        GgmlType::Q4_K
    );

    // A llama 70B (80 layers, GQA): attn_v Q4_K becomes Q5_K.
    let mut config = llama31_config();
    config["num_hidden_layers"] = json!(80);
    let big = TypeContext::from_config(Arch::Llama, &config, true).unwrap();
    assert!(big.is_70b && !big.tied_embeddings);
    assert_eq!(
        tensor_type_in(ft, "blk.40.attn_v.weight", &[1024, 8192], &big),
        GgmlType::Q5_K
    );
    assert_eq!(
        tensor_type_in(ft, "blk.0.attn_v.weight", &[1024, 8192], &big),
        GgmlType::Q6_K
    );
    assert_eq!(
        tensor_type_in(ft, "blk.40.attn_v.weight", &[1024, 8000], &big),
        GgmlType::Q5_1
    );
}

#[test]
fn q4_0_and_q6_k_quantize_the_output_to_q6_k_or_q8_0() {
    let ctx = TypeContext::new(4);
    assert_eq!(
        tensor_type_in(FileType::Q4_0, "output.weight", &[1000, 4096], &ctx),
        GgmlType::Q6_K
    );
    // Q4_0's block is 32, so a 96-value row passes the first test and Q6_K falls back to Q8_0.
    assert_eq!(
        tensor_type_in(FileType::Q4_0, "output.weight", &[1000, 96], &ctx),
        GgmlType::Q8_0
    );
    assert_eq!(
        tensor_type_in(FileType::Q4_0, "output.weight", &[1000, 100], &ctx),
        GgmlType::F16
    );
    for name in [
        "blk.0.attn_v.weight",
        "blk.1.ffn_down.weight",
        "token_embd.weight",
    ] {
        assert_eq!(
            tensor_type_in(FileType::Q4_0, name, &[64, 4096], &ctx),
            GgmlType::Q4_0
        );
        assert_eq!(
            tensor_type_in(FileType::Q6_K, name, &[64, 4096], &ctx),
            GgmlType::Q6_K
        );
        assert_eq!(
            tensor_type_in(FileType::Q6_K, name, &[64, 96], &ctx),
            GgmlType::Q8_0
        );
        assert_eq!(
            tensor_type_in(FileType::Q4_0, name, &[64, 100], &ctx),
            GgmlType::F16
        );
    }
    assert_eq!(
        tensor_type_in(FileType::Q6_K, "output.weight", &[1000, 4096], &ctx),
        GgmlType::Q6_K
    );
    assert_eq!(
        tensor_type_in(FileType::Q6_K, "output.weight", &[1000, 96], &ctx),
        GgmlType::Q8_0
    );
    let tied = TypeContext {
        tied_embeddings: true,
        ..ctx
    };
    assert_eq!(
        tensor_type_in(FileType::Q4_0, "token_embd.weight", &[1000, 4096], &tied),
        GgmlType::Q6_K
    );
}

// ----------------------------------------------------------------------------------------
// Tokenizer.

/// GPT-2's byte-to-unicode table.
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xa1..=0xac)
        .chain(0xae..=0xff)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// A Llama-3-shaped tokenizer.json: 256 byte tokens, merges, two special tokens at 300, 301.
pub(crate) fn llama3_tokenizer(string_merges: bool) -> Value {
    let chars = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (b, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    let merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")];
    for (i, (a, b)) in merges.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), json!(256 + i));
    }
    let merges: Vec<Value> = merges
        .iter()
        .map(|(a, b)| {
            if string_merges {
                json!(format!("{a} {b}"))
            } else {
                json!([a, b])
            }
        })
        .collect();
    json!({
        "version": "1.0",
        "added_tokens": [
            {"id": 300, "content": "<|begin_of_text|>", "special": true, "normalized": false,
             "lstrip": false, "rstrip": false, "single_word": false},
            {"id": 301, "content": "<|end_of_text|>", "special": true, "normalized": false,
             "lstrip": false, "rstrip": false, "single_word": false},
            {"id": 302, "content": "<think>", "special": false, "normalized": false,
             "lstrip": false, "rstrip": false, "single_word": false},
            {"id": 303, "content": "<|user_thing|>", "special": false, "normalized": false,
             "lstrip": false, "rstrip": false, "single_word": false}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PRE_REGEX}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                      {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [300], "tokens": ["<|begin_of_text|>"]}}}
        ]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": true, "vocab": vocab, "merges": merges}
    })
}

pub(crate) fn llama3_tokenizer_config() -> Value {
    json!({
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "clean_up_tokenization_spaces": true,
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast"
    })
}

fn strings(v: Option<&MetaValue>) -> &[String] {
    match v {
        Some(MetaValue::Array(MetaArray::String(s))) => s,
        other => panic!("not a string array: {other:?}"),
    }
}

#[test]
fn bpe_tokenizer_metadata_matches_the_converter() {
    let tj = llama3_tokenizer(false);
    let tc = llama3_tokenizer_config();
    let config = json!({"bos_token_id": 300, "eos_token_id": 301, "pad_token_id": 7});
    let files = TokenizerFiles {
        tokenizer_json: Some(&tj),
        tokenizer_config: Some(&tc),
        config: Some(&config),
        ..Default::default()
    };
    let meta = tokenizer_metadata(&files, Arch::Llama, 310).unwrap();
    assert_eq!(
        keys(&meta),
        [
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.padding_token_id",
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_eos_token",
            "tokenizer.ggml.add_sep_token",
            "tokenizer.chat_template",
        ]
    );
    assert_eq!(
        get(&meta, "tokenizer.ggml.model"),
        Some(&MetaValue::String("gpt2".into()))
    );
    assert_eq!(
        get(&meta, "tokenizer.ggml.pre"),
        Some(&MetaValue::String("llama-bpe".into()))
    );
    let tokens = strings(get(&meta, "tokenizer.ggml.tokens"));
    assert_eq!(tokens.len(), 310);
    assert_eq!(tokens[0], "Ā"); // byte 0 (ids are byte values here)
    assert_eq!(tokens[33], "!");
    assert_eq!(tokens[256], "Ġt");
    assert_eq!(tokens[258], "Ġthe");
    assert_eq!(tokens[260], "[PAD260]");
    assert_eq!(tokens[300], "<|begin_of_text|>");
    assert_eq!(tokens[302], "<think>");
    assert_eq!(tokens[309], "[PAD309]");
    let Some(MetaValue::Array(MetaArray::I32(types))) = get(&meta, "tokenizer.ggml.token_type")
    else {
        panic!("token_type is not an i32 array");
    };
    assert_eq!(types.len(), 310);
    assert!(types[..260].iter().all(|&t| t == TOKEN_TYPE_NORMAL));
    assert!(types[260..300].iter().all(|&t| t == TOKEN_TYPE_UNUSED));
    assert_eq!(&types[300..304], &[3, 3, 4, 3]); // <|user_thing|> looks special
    assert_eq!(
        strings(get(&meta, "tokenizer.ggml.merges")),
        ["Ġ t", "h e", "Ġt he", "i n"]
    );
    assert_eq!(
        get(&meta, "tokenizer.ggml.bos_token_id"),
        Some(&MetaValue::U32(300))
    );
    assert_eq!(
        get(&meta, "tokenizer.ggml.eos_token_id"),
        Some(&MetaValue::U32(301))
    );
    assert_eq!(
        get(&meta, "tokenizer.ggml.padding_token_id"),
        Some(&MetaValue::U32(7))
    );
    // The TemplateProcessing adds <|begin_of_text|>, nothing at the end.
    assert_eq!(
        get(&meta, "tokenizer.ggml.add_bos_token"),
        Some(&MetaValue::Bool(true))
    );
    assert_eq!(
        get(&meta, "tokenizer.ggml.add_eos_token"),
        Some(&MetaValue::Bool(false))
    );
    assert_eq!(
        get(&meta, "tokenizer.chat_template"),
        Some(&MetaValue::String(
            tc["chat_template"].as_str().unwrap().into()
        ))
    );

    // String merges give the same list; a space inside a pair part is encoded as U+0120.
    let tj2 = llama3_tokenizer(true);
    let files2 = TokenizerFiles {
        tokenizer_json: Some(&tj2),
        ..files
    };
    assert_eq!(
        get(
            &tokenizer_metadata(&files2, Arch::Llama, 310).unwrap(),
            "tokenizer.ggml.merges"
        ),
        get(&meta, "tokenizer.ggml.merges")
    );
    let mut tj3 = llama3_tokenizer(false);
    tj3["model"]["merges"] = json!([["a b", "c"]]);
    let files3 = TokenizerFiles {
        tokenizer_json: Some(&tj3),
        ..files
    };
    assert_eq!(
        strings(get(
            &tokenizer_metadata(&files3, Arch::Llama, 310).unwrap(),
            "tokenizer.ggml.merges"
        )),
        ["a\u{120}b c"]
    );
}

#[test]
fn special_tokens_without_a_tokenizer_config_come_from_config_json() {
    let tj = llama3_tokenizer(false);
    let config = json!({"bos_token_id": 300, "eos_token_id": [301, 5]});
    let files = TokenizerFiles {
        tokenizer_json: Some(&tj),
        config: Some(&config),
        ..Default::default()
    };
    let meta = tokenizer_metadata(&files, Arch::Qwen2, 304).unwrap();
    assert_eq!(
        get(&meta, "tokenizer.ggml.bos_token_id"),
        Some(&MetaValue::U32(300))
    );
    // A list is not an int: skipped, like gguf-py does.
    assert_eq!(get(&meta, "tokenizer.ggml.eos_token_id"), None);
    assert_eq!(
        get(&meta, "tokenizer.ggml.add_bos_token"),
        Some(&MetaValue::Bool(true))
    );
    assert_eq!(get(&meta, "tokenizer.chat_template"), None);
    // add_prefix_space is a llama-arch key only, and the tokenizer_config's add_bos_token
    // yields to the post-processor.
    let tc = json!({"bos_token": "<|begin_of_text|>", "add_prefix_space": false, "add_bos_token": false, "add_eos_token": true});
    let files = TokenizerFiles {
        tokenizer_config: Some(&tc),
        ..files
    };
    let meta = tokenizer_metadata(&files, Arch::Llama, 304).unwrap();
    assert_eq!(keys(&meta)[0], "tokenizer.ggml.add_space_prefix");
    assert_eq!(
        get(&meta, "tokenizer.ggml.add_bos_token"),
        Some(&MetaValue::Bool(true))
    );
    assert_eq!(
        get(&meta, "tokenizer.ggml.add_eos_token"),
        Some(&MetaValue::Bool(false))
    );
    let meta = tokenizer_metadata(&files, Arch::Qwen3, 304).unwrap();
    assert_eq!(keys(&meta)[0], "tokenizer.ggml.model");
    // A chat_template.jinja is used when tokenizer_config.json has none.
    let files = TokenizerFiles {
        chat_template_jinja: Some("{{x}}"),
        ..files
    };
    let meta = tokenizer_metadata(&files, Arch::Qwen3, 304).unwrap();
    assert_eq!(
        get(&meta, "tokenizer.chat_template"),
        Some(&MetaValue::String("{{x}}".into()))
    );
}

#[test]
fn pre_tokenizers_are_identified_by_their_regex() {
    let mut tj = llama3_tokenizer(false);
    assert_eq!(detect_pre_tokenizer(&tj), "llama-bpe");
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = json!(QWEN2_PRE_REGEX);
    assert_eq!(detect_pre_tokenizer(&tj), "qwen2");
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = json!("\\s+");
    assert_eq!(detect_pre_tokenizer(&tj), "default");
    tj["pre_tokenizer"] = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    assert_eq!(detect_pre_tokenizer(&tj), "gpt-2");
    tj["pre_tokenizer"] = Value::Null;
    assert_eq!(detect_pre_tokenizer(&tj), "default");
    let files = TokenizerFiles {
        tokenizer_json: Some(&tj),
        ..Default::default()
    };
    let meta = tokenizer_metadata_with_pre(&files, Arch::Llama, 304, Some("smollm")).unwrap();
    assert_eq!(
        get(&meta, "tokenizer.ggml.pre"),
        Some(&MetaValue::String("smollm".into()))
    );
}

#[test]
fn unsupported_or_missing_tokenizers_are_typed_errors() {
    let files = TokenizerFiles::default();
    assert!(matches!(
        tokenizer_metadata(&files, Arch::Llama, 10),
        Err(GgufError::MissingTokenizer(_))
    ));
    let tj = llama3_tokenizer(false);
    let files = TokenizerFiles {
        tokenizer_json: Some(&tj),
        has_tokenizer_model: true,
        ..Default::default()
    };
    let err = tokenizer_metadata(&files, Arch::Llama, 304).unwrap_err();
    assert!(
        matches!(err, GgufError::UnsupportedTokenizer(_))
            && err.to_string().contains("tokenizer.model")
    );

    let unigram = json!({"model": {"type": "Unigram", "vocab": [["<unk>", 0.0]]}});
    let files = TokenizerFiles {
        tokenizer_json: Some(&unigram),
        ..Default::default()
    };
    let err = tokenizer_metadata(&files, Arch::Llama, 304).unwrap_err();
    assert!(
        matches!(err, GgufError::UnsupportedTokenizer(_)) && err.to_string().contains("Unigram")
    );

    // Llama 2 / Mistral tokenizer.json: BPE with byte fallback and a Sequence decoder.
    let mut spm_bpe = llama3_tokenizer(false);
    spm_bpe["model"]["byte_fallback"] = json!(true);
    spm_bpe["model"]["ignore_merges"] = json!(false);
    spm_bpe["decoder"] = json!({"type": "Sequence", "decoders": []});
    let files = TokenizerFiles {
        tokenizer_json: Some(&spm_bpe),
        ..Default::default()
    };
    assert!(matches!(
        tokenizer_metadata(&files, Arch::Llama, 304),
        Err(GgufError::UnsupportedTokenizer(_))
    ));

    // A token id past the model's vocab_size.
    let files = TokenizerFiles {
        tokenizer_json: Some(&tj),
        ..Default::default()
    };
    let err = tokenizer_metadata(&files, Arch::Llama, 300).unwrap_err();
    assert!(matches!(err, GgufError::BadTokenizer(_)) && err.to_string().contains("303"));
    let no_vocab = json!({"model": {"type": "BPE"}});
    let files = TokenizerFiles {
        tokenizer_json: Some(&no_vocab),
        ..Default::default()
    };
    assert!(matches!(
        tokenizer_metadata(&files, Arch::Llama, 10),
        Err(GgufError::BadTokenizer(_))
    ));
}

// ----------------------------------------------------------------------------------------
// Against llama.cpp itself (run by hand; see the test's doc).

/// Compares [`metadata`], [`tokenizer_metadata`], [`map_tensor`], [`extra_tensors`],
/// [`tensor_type_in`] and [`row_permutation`] with GGUF files written by llama.cpp's own
/// `convert_hf_to_gguf.py` (`--outtype f32/f16/bf16/q8_0`) and `llama-quantize`
/// (Q4_0/Q4_K_M/Q6_K from the f16 file).
///
/// Ignored by default (the reference files come from llama.cpp's Python converter, run by hand);
/// run it with `--ignored` and `SHARDPRESS_GGUF_REFERENCE` naming a folder holding, per case `C`, a model
/// folder `C/` (config.json, tokenizer files, model.safetensors) and any of
/// `C-{F32,F16,BF16,Q8_0,Q4_0,Q4_K_M,Q6_K}.gguf`; `pre.txt` in `C/` gives the
/// `tokenizer.ggml.pre` the converter was told to use.
#[test]
#[ignore = "needs llama.cpp reference files: set SHARDPRESS_GGUF_REFERENCE, run with --ignored"]
fn matches_llama_cpp_reference_files() {
    let root = std::env::var_os("SHARDPRESS_GGUF_REFERENCE")
        .expect("SHARDPRESS_GGUF_REFERENCE must name the folder of reference files");
    let root = std::path::PathBuf::from(root);
    let read_json = |p: &std::path::Path| -> Option<Value> {
        std::fs::read(p)
            .ok()
            .map(|b| serde_json::from_slice(&b).unwrap())
    };
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("config.json").is_file() {
            continue;
        }
        let case = dir.file_name().unwrap().to_str().unwrap().to_string();
        let config = read_json(&dir.join("config.json")).unwrap();
        let tj = read_json(&dir.join("tokenizer.json"));
        let tc = read_json(&dir.join("tokenizer_config.json"));
        let pre = std::fs::read_to_string(dir.join("pre.txt")).ok();
        let arch = architecture(&config).unwrap();
        let st_bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
        let hp = HParams::from_config(arch, &config).unwrap();
        for ft in FileType::ALL {
            let path = root.join(format!("{case}-{}.gguf", ft.name()));
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let reference = super::parse_header(&bytes).unwrap();
            let name = reference
                .get("general.name")
                .unwrap()
                .as_str()
                .unwrap()
                .to_string();
            let mut ours = metadata(arch, &config, ft, &name).unwrap();
            let files = TokenizerFiles {
                tokenizer_json: tj.as_ref(),
                tokenizer_config: tc.as_ref(),
                config: Some(&config),
                ..Default::default()
            };
            ours.extend(
                tokenizer_metadata_with_pre(
                    &files,
                    arch,
                    hp.vocab_size,
                    pre.as_deref().map(str::trim),
                )
                .unwrap(),
            );
            // Every key we write has the reference's value and type.
            for (k, v) in &ours {
                assert_eq!(reference.get(k), Some(v), "{case} {ft}: key {k}");
            }
            // The reference's other keys are cosmetic general.* ones.
            for (k, _) in &reference.metadata {
                if !ours.iter().any(|(o, _)| o == k) {
                    assert!(
                        matches!(
                            k.as_str(),
                            "general.basename"
                                | "general.size_label"
                                | "general.finetune"
                                | "general.version"
                                | "general.license"
                        ),
                        "{case} {ft}: reference key {k} not written"
                    );
                }
            }
            // Same relative order for the common keys, except that llama-quantize (Q4_0,
            // Q4_K_M, Q6_K files) re-adds the quantization version and file type at the end.
            let quantized = matches!(ft, FileType::Q4_0 | FileType::Q4_K_M | FileType::Q6_K);
            let moved = |k: &str| {
                quantized && matches!(k, "general.quantization_version" | "general.file_type")
            };
            let order: Vec<&str> = reference
                .metadata
                .iter()
                .map(|(k, _)| k.as_str())
                .filter(|k| ours.iter().any(|(o, _)| o == k) && !moved(k))
                .collect();
            let our_order: Vec<&str> = keys(&ours).into_iter().filter(|k| !moved(k)).collect();
            assert_eq!(order, our_order, "{case} {ft}: key order");

            // Tensors: names, shapes, types.
            let has_output = st.names().contains(&"lm_head.weight");
            let ctx = TypeContext::from_config(arch, &config, has_output).unwrap();
            let mut expected: Vec<(String, Vec<u64>, u32)> = Vec::new();
            for (n, shape, _) in extra_tensors(arch, &config).unwrap() {
                expected.push((n, shape, GgmlType::F32.id()));
            }
            for (hf, view) in st.tensors() {
                let Some(g) = map_tensor(arch, &hf).unwrap() else {
                    continue;
                };
                let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
                let ty = tensor_type_in(ft, &g, &shape, &ctx).id();
                expected.push((g, shape, ty));
            }
            let mut actual: Vec<(String, Vec<u64>, u32)> = reference
                .tensors
                .iter()
                .map(|t| (t.name.clone(), t.shape(), t.type_id))
                .collect();
            expected.sort();
            actual.sort();
            assert_eq!(actual, expected, "{case} {ft}: tensors");

            // Every file: synthesized tensors (rope_freqs) equal the converter's bit for bit.
            for (n, _, values) in extra_tensors(arch, &config).unwrap() {
                let t = reference.tensor(&n).unwrap();
                let start = (reference.data_start + t.offset) as usize;
                let got: Vec<u32> = bytes[start..start + values.len() * 4]
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let want: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "{case} {ft}: {n}");
            }
            // F32 files: every tensor's data equals its source, Q/K rows permuted.
            if ft == FileType::F32 {
                for t in &reference.tensors {
                    if t.name == "rope_freqs.weight" {
                        continue;
                    }
                    let hf = st
                        .names()
                        .into_iter()
                        .find(|n| map_tensor(arch, n).unwrap().as_deref() == Some(t.name.as_str()))
                        .unwrap()
                        .to_string();
                    let view = st.tensor(&hf).unwrap();
                    let src: Vec<f32> = match view.dtype() {
                        safetensors::Dtype::BF16 => view
                            .data()
                            .chunks_exact(2)
                            .map(|b| {
                                f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
                            })
                            .collect(),
                        safetensors::Dtype::F32 => view
                            .data()
                            .chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                            .collect(),
                        other => panic!("{hf}: dtype {other:?}"),
                    };
                    let start = (reference.data_start + t.offset) as usize;
                    let got: Vec<f32> = bytes[start..start + src.len() * 4]
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    let cols = *view.shape().last().unwrap();
                    let want = match row_permutation(arch, &hf, &config).unwrap() {
                        Some(perm) => {
                            assert_eq!(perm.len(), view.shape()[0], "{hf}");
                            apply_rows(&src, cols, &perm)
                        }
                        None => src,
                    };
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{case}: data of {} differs",
                        t.name
                    );
                }
            }
            eprintln!(
                "{case} {ft}: {} keys, {} tensors match",
                ours.len(),
                actual.len()
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "no reference files under {}", root.display());
}

// ----------------------------------------------------------------------------------------
// Mixture of experts.

fn mixtral_config(experts: u64) -> Value {
    json!({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "num_local_experts": experts, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "max_position_embeddings": 32768
    })
}

fn qwen3_moe_config() -> Value {
    json!({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "vocab_size": 151936, "num_experts": 128, "num_experts_per_tok": 8,
        "moe_intermediate_size": 768, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 40960
    })
}

#[test]
fn experts_map_to_stacked_tensors_in_expert_order() {
    let cases = [
        (
            Arch::Llama,
            "model.layers.3.block_sparse_moe.experts.7.w1.weight",
            "blk.3.ffn_gate_exps.weight",
            7,
        ),
        (
            Arch::Llama,
            "model.layers.3.block_sparse_moe.experts.0.w2.weight",
            "blk.3.ffn_down_exps.weight",
            0,
        ),
        (
            Arch::Llama,
            "model.layers.3.block_sparse_moe.experts.12.w3.weight",
            "blk.3.ffn_up_exps.weight",
            12,
        ),
        (
            Arch::Qwen3Moe,
            "model.layers.9.mlp.experts.127.gate_proj.weight",
            "blk.9.ffn_gate_exps.weight",
            127,
        ),
        (
            Arch::Qwen3Moe,
            "model.layers.9.mlp.experts.5.down_proj.weight",
            "blk.9.ffn_down_exps.weight",
            5,
        ),
        (
            Arch::Qwen3Moe,
            "model.layers.9.mlp.experts.5.up_proj.weight",
            "blk.9.ffn_up_exps.weight",
            5,
        ),
    ];
    for (arch, hf, gguf, expert) in cases {
        assert_eq!(tensor_name(arch, hf).as_deref(), Some(gguf), "{hf}");
        assert_eq!(expert_index(arch, hf), Some(expert), "{hf}");
    }
    assert_eq!(
        tensor_name(Arch::Llama, "model.layers.1.block_sparse_moe.gate.weight").as_deref(),
        Some("blk.1.ffn_gate_inp.weight")
    );
    assert_eq!(
        tensor_name(Arch::Qwen3Moe, "model.layers.1.mlp.gate.weight").as_deref(),
        Some("blk.1.ffn_gate_inp.weight")
    );
    assert_eq!(
        tensor_name(Arch::Qwen3Moe, "model.layers.1.self_attn.k_norm.weight").as_deref(),
        Some("blk.1.attn_k_norm.weight")
    );
    // The converter maps no dense MLP in qwen3moe, and nothing else is an expert.
    assert!(map_tensor(Arch::Qwen3Moe, "model.layers.1.mlp.up_proj.weight").is_err());
    assert!(map_tensor(
        Arch::Llama,
        "model.layers.1.block_sparse_moe.experts.x.w1.weight"
    )
    .is_err());
    assert!(map_tensor(
        Arch::Llama,
        "model.layers.1.block_sparse_moe.experts.1.w4.weight"
    )
    .is_err());
    assert_eq!(
        expert_index(Arch::Llama, "model.layers.1.mlp.up_proj.weight"),
        None
    );
    assert_eq!(
        expert_index(Arch::Qwen3, "model.layers.1.mlp.experts.1.up_proj.weight"),
        None
    );
}

#[test]
fn moe_metadata_has_the_converters_expert_keys() {
    let meta = metadata(Arch::Llama, &mixtral_config(8), FileType::Q8_0, "m").unwrap();
    let k = keys(&meta);
    let pos = |key: &str| {
        k.iter()
            .position(|x| *x == key)
            .unwrap_or_else(|| panic!("{key}"))
    };
    assert_eq!(get(&meta, "llama.expert_count"), Some(&MetaValue::U32(8)));
    assert_eq!(
        get(&meta, "llama.expert_used_count"),
        Some(&MetaValue::U32(2))
    );
    assert!(pos("llama.attention.layer_norm_rms_epsilon") < pos("llama.expert_count"));
    assert!(pos("llama.expert_used_count") < pos("general.file_type"));
    // MixtralConfig has no head_dim unless config.json gives one.
    assert!(!k.contains(&"llama.attention.key_length"));
    assert_eq!(
        get(&meta, "llama.rope.freq_base"),
        Some(&MetaValue::F32(1e6))
    );

    let meta = metadata(Arch::Qwen3Moe, &qwen3_moe_config(), FileType::Q8_0, "m").unwrap();
    assert_eq!(
        get(&meta, "general.architecture"),
        Some(&MetaValue::String("qwen3moe".into()))
    );
    assert_eq!(
        get(&meta, "qwen3moe.expert_count"),
        Some(&MetaValue::U32(128))
    );
    assert_eq!(
        get(&meta, "qwen3moe.expert_used_count"),
        Some(&MetaValue::U32(8))
    );
    assert_eq!(
        get(&meta, "qwen3moe.expert_feed_forward_length"),
        Some(&MetaValue::U32(768))
    );
    assert_eq!(
        get(&meta, "qwen3moe.attention.key_length"),
        Some(&MetaValue::U32(128))
    );
    let k = keys(&meta);
    assert!(
        k.iter().position(|x| *x == "general.file_type")
            < k.iter()
                .position(|x| *x == "qwen3moe.expert_feed_forward_length")
    );

    // Dense MLP layers in a Qwen3-MoE config cannot be converted.
    let mut config = qwen3_moe_config();
    config["mlp_only_layers"] = json!([0]);
    assert!(matches!(
        metadata(Arch::Qwen3Moe, &config, FileType::Q8_0, "m"),
        Err(GgufError::UnsupportedArchitecture { .. })
    ));
    let mut config = mixtral_config(8);
    config["num_experts_per_tok"] = json!(9);
    assert!(matches!(
        metadata(Arch::Llama, &config, FileType::Q8_0, "m"),
        Err(GgufError::BadConfig(_))
    ));
}

#[test]
fn eight_experts_get_llama_quantizes_attention_bumps() {
    let eight = TypeContext::from_config(Arch::Llama, &mixtral_config(8), true).unwrap();
    let four = TypeContext::from_config(Arch::Llama, &mixtral_config(4), true).unwrap();
    assert_eq!((eight.n_expert, four.n_expert), (8, 4));
    let ty =
        |ctx: &TypeContext, ft, name: &str, shape: &[u64]| tensor_type_in(ft, name, shape, ctx);
    let row = [1024u64, 4096];
    for ft in [FileType::Q4_0, FileType::Q4_K_M, FileType::Q6_K] {
        assert_eq!(
            ty(&eight, ft, "blk.1.attn_v.weight", &row),
            GgmlType::Q8_0,
            "{ft}"
        );
        assert_eq!(
            ty(&eight, ft, "blk.1.attn_k.weight", &row),
            GgmlType::Q8_0,
            "{ft}"
        );
        assert_ne!(
            ty(&four, ft, "blk.1.attn_k.weight", &row),
            GgmlType::Q8_0,
            "{ft}"
        );
    }
    assert_eq!(
        ty(&eight, FileType::Q4_K_M, "blk.1.attn_output.weight", &row),
        GgmlType::Q5_K
    );
    assert_eq!(
        ty(&four, FileType::Q4_K_M, "blk.1.attn_output.weight", &row),
        GgmlType::Q4_K
    );
    assert_eq!(
        ty(&eight, FileType::Q4_0, "blk.1.attn_output.weight", &row),
        GgmlType::Q4_0
    );
    // ffn_down_exps follows ffn_down's layer rule; the router stays F32.
    let down = [4096u64, 14336];
    assert_eq!(
        ty(
            &eight,
            FileType::Q4_K_M,
            "blk.0.ffn_down_exps.weight",
            &down
        ),
        GgmlType::Q6_K
    );
    assert_eq!(
        ty(
            &eight,
            FileType::Q4_K_M,
            "blk.5.ffn_down_exps.weight",
            &down
        ),
        GgmlType::Q4_K
    );
    assert_eq!(
        ty(
            &eight,
            FileType::Q4_K_M,
            "blk.5.ffn_gate_inp.weight",
            &[8, 4096]
        ),
        GgmlType::F32
    );
}

#[test]
fn qwen2_moe_shared_expert_maps_and_stays_f32() {
    let a = Arch::Qwen2Moe;
    for (hf, gguf) in [
        (
            "model.layers.2.mlp.shared_expert.gate_proj.weight",
            "blk.2.ffn_gate_shexp.weight",
        ),
        (
            "model.layers.2.mlp.shared_expert.up_proj.weight",
            "blk.2.ffn_up_shexp.weight",
        ),
        (
            "model.layers.2.mlp.shared_expert.down_proj.weight",
            "blk.2.ffn_down_shexp.weight",
        ),
        (
            "model.layers.2.mlp.shared_expert_gate.weight",
            "blk.2.ffn_gate_inp_shexp.weight",
        ),
        (
            "model.layers.2.mlp.gate.weight",
            "blk.2.ffn_gate_inp.weight",
        ),
        (
            "model.layers.2.mlp.experts.59.up_proj.weight",
            "blk.2.ffn_up_exps.weight",
        ),
        ("model.layers.2.self_attn.q_proj.bias", "blk.2.attn_q.bias"),
    ] {
        assert_eq!(tensor_name(a, hf).as_deref(), Some(gguf), "{hf}");
    }
    assert!(map_tensor(a, "model.layers.2.mlp.up_proj.weight").is_err());
    let config = json!({
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936,
        "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "rope_theta": 1e6
    });
    let meta = metadata(a, &config, FileType::Q4_K_M, "m").unwrap();
    assert_eq!(
        get(&meta, "qwen2moe.expert_count"),
        Some(&MetaValue::U32(60))
    );
    assert_eq!(
        get(&meta, "qwen2moe.expert_feed_forward_length"),
        Some(&MetaValue::U32(1408))
    );
    assert_eq!(
        get(&meta, "qwen2moe.expert_shared_feed_forward_length"),
        Some(&MetaValue::U32(5632))
    );
    let ctx = TypeContext::from_config(a, &config, true).unwrap();
    for ft in [FileType::Q8_0, FileType::Q4_K_M, FileType::F16] {
        assert_eq!(
            tensor_type_in(ft, "blk.0.ffn_gate_inp_shexp.weight", &[1, 2048], &ctx),
            GgmlType::F32
        );
    }
    // ffn_down_shexp takes ffn_down's more-bits rule (layer 0 of 24).
    assert_eq!(
        tensor_type_in(
            FileType::Q4_K_M,
            "blk.0.ffn_down_shexp.weight",
            &[2048, 5632],
            &ctx
        ),
        GgmlType::Q6_K
    );
}
