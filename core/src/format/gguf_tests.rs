//! Tests for GGUF output: per-tensor types from the model, refusals, the writer's bytes
//! (quantized rows, Q/K permutation, padding) and the head laid out from the plan alone.

use super::gguf::{files, GgufModel, GgufTensor, HeadSources, ALIGNMENT};
use super::*;
use crate::codec::TensorPlan;
use crate::dtype::{decode_to_f32, encode_from_f32};
use crate::gguf::llama_tests::{llama3_tokenizer, llama3_tokenizer_config};
use crate::gguf::{parse_header, permute_rows, GgmlType, TokenizerFiles};
use crate::recipe::Recipe;
use serde_json::{json, Value};

/// A 4-layer llama: hidden 256, 4 heads of 64, 2 KV heads, vocab 320.
fn config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": 320,
        "bos_token_id": 300,
        "eos_token_id": 301,
        "torch_dtype": "bfloat16"
    })
}

fn facts() -> ModelFacts {
    ModelFacts {
        gguf: Some(GgufModel::from_config(&config(), true).unwrap()),
    }
}

fn plan_for(recipe: &str, format: OutputFormat, name: &str, shape: &[u64]) -> TensorPlan {
    let recipe = Recipe::preset(recipe).unwrap();
    TensorPlan::for_output(&recipe, format, &facts(), name, DType::BF16, shape).unwrap()
}

fn bf16_bytes(xs: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; xs.len() * 2];
    encode_from_f32(DType::BF16, xs, &mut out).unwrap();
    out
}

fn sample(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i * 37 + seed * 11) % 101) as f32 - 50.0) * 0.013 + ((i * 7) % 13) as f32 * 1e-3
        })
        .collect()
}

/// Streams a BF16 tensor through `format`'s writer, `chunk_rows` rows at a time.
fn write(
    format: OutputFormat,
    plan: &TensorPlan,
    name: &str,
    shape: &[u64],
    input: &[u8],
    chunk_rows: usize,
) -> Vec<u8> {
    let tensor = TensorDesc {
        name,
        dtype: DType::BF16,
        shape,
    };
    let mut writer = format.spec().tensor_writer(tensor, plan);
    let row_len = *shape.last().unwrap() as usize;
    let chunk_row_len = if plan.is_identity() { 1 } else { row_len };
    let mut acc = crate::metrics::ErrorAccumulator::new();
    let mut out = Vec::new();
    for chunk in input.chunks(chunk_rows * row_len * 2) {
        out.extend(
            writer
                .chunk(plan, DType::BF16, chunk_row_len, chunk, &mut acc)
                .unwrap()
                .bytes,
        );
    }
    out.extend(writer.finish().unwrap());
    out
}

#[test]
fn a_gguf_pass_gives_each_tensor_llama_quantizes_type() {
    let ty = |recipe: &str, name: &str, shape: &[u64]| {
        plan_for(recipe, OutputFormat::Gguf, name, shape)
            .gguf
            .unwrap()
            .ty
    };
    // Q4_K_M promotes the output and, in layers 2 and 3 of 4 (use_more_bits), attn_v and
    // ffn_down to Q6_K.
    assert_eq!(ty("q4_k_m", "lm_head.weight", &[320, 256]), GgmlType::Q6_K);
    assert_eq!(
        ty("q4_k_m", "model.embed_tokens.weight", &[320, 256]),
        GgmlType::Q4_K
    );
    assert_eq!(
        ty("q4_k_m", "model.layers.0.mlp.down_proj.weight", &[256, 512]),
        GgmlType::Q4_K
    );
    assert_eq!(
        ty("q4_k_m", "model.layers.3.mlp.down_proj.weight", &[256, 512]),
        GgmlType::Q6_K
    );
    assert_eq!(
        ty(
            "q4_k_m",
            "model.layers.2.self_attn.v_proj.weight",
            &[128, 256]
        ),
        GgmlType::Q6_K
    );
    assert_eq!(
        ty("q8_0", "model.layers.0.mlp.up_proj.weight", &[512, 256]),
        GgmlType::Q8_0
    );
    // Norms are left alone by the pass and stored F32.
    assert_eq!(ty("q4_k_m", "model.norm.weight", &[256]), GgmlType::F32);
    // The dequantized output of the same recipe uses the same per-tensor types.
    let st = plan_for(
        "q4_k_m",
        OutputFormat::Safetensors,
        "lm_head.weight",
        &[320, 256],
    );
    assert_eq!(st.describe(), "gguf Q6_K");
    // Without the model's config the type cannot be chosen: refused, saying why.
    let recipe = Recipe::preset("q4_k_m").unwrap();
    let err = TensorPlan::for_output(
        &recipe,
        OutputFormat::Safetensors,
        &ModelFacts::default(),
        "lm_head.weight",
        DType::BF16,
        &[320, 256],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn gguf_refuses_what_it_cannot_hold() {
    let gguf = OutputFormat::Gguf.spec();
    for preset in ["w4a16", "int8", "nf4", "2of4", "lossless"] {
        let err = gguf
            .check_recipe(&Recipe::preset(preset).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--format gguf"), "{preset}: {err}");
    }
    let ct = OutputFormat::CompressedTensors.spec();
    let err = ct
        .check_recipe(&Recipe::preset("q4_k_m").unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--format gguf"), "{err}");
    let recipe = Recipe::preset("q8_0").unwrap();
    let refused = |name: &str, dtype: DType, shape: &[u64]| {
        TensorPlan::for_output(&recipe, OutputFormat::Gguf, &facts(), name, dtype, shape)
            .unwrap_err()
            .to_string()
    };
    let err = refused("model.vision_tower.proj.weight", DType::BF16, &[256, 256]);
    assert!(
        err.contains("model.vision_tower.proj.weight") && err.contains("map"),
        "{err}"
    );
    let err = refused("model.layers.0.mlp.up_proj.scales", DType::I8, &[4, 4]);
    assert!(err.contains("up_proj.scales"), "{err}");
    // A Q projection whose rows do not match the config's heads cannot be permuted.
    let err = refused(
        "model.layers.0.self_attn.q_proj.weight",
        DType::BF16,
        &[192, 256],
    );
    assert!(err.contains("heads"), "{err}");
    let err = TensorPlan::for_output(
        &Recipe::preset("q8_0").unwrap(),
        OutputFormat::Gguf,
        &ModelFacts::default(),
        "lm_head.weight",
        DType::BF16,
        &[320, 256],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn the_writer_quantizes_rows_permutes_q_and_pads_to_the_alignment() {
    let name = "model.layers.0.self_attn.q_proj.weight";
    let shape = [256u64, 256];
    let values = sample(256 * 256, 1);
    let input = bf16_bytes(&values);
    for recipe in ["q8_0", "q4_k_m", "q6_k"] {
        let plan = plan_for(recipe, OutputFormat::Gguf, name, &shape);
        let GgufTensor {
            ty, permute_heads, ..
        } = plan.gguf.clone().unwrap();
        assert_eq!(permute_heads, Some(4));
        let out = write(OutputFormat::Gguf, &plan, name, &shape, &input, 48);
        // Expected: every row quantized on its own from the BF16 values, rows permuted.
        let mut decoded = vec![0f32; values.len()];
        decode_to_f32(DType::BF16, &input, &mut decoded).unwrap();
        let row_bytes = ty.row_bytes(256).unwrap() as usize;
        let mut expected = Vec::new();
        for &source in &permute_rows(256, 4).unwrap() {
            let row = &decoded[source as usize * 256..][..256];
            ty.quantize(row, &mut expected).unwrap();
        }
        assert_eq!(expected.len(), 256 * row_bytes);
        assert_eq!(
            out.len() as u64,
            expected.len().div_ceil(ALIGNMENT as usize) as u64 * ALIGNMENT
        );
        assert_eq!(&out[..expected.len()], &expected[..], "{recipe}");
        assert!(out[expected.len()..].iter().all(|&b| b == 0));
        // The dequantized output of the same plan holds what a GGUF reader computes, in BF16.
        let st_plan = plan_for(recipe, OutputFormat::Safetensors, name, &shape);
        let st = write(
            OutputFormat::Safetensors,
            &st_plan,
            name,
            &shape,
            &input,
            48,
        );
        let mut gguf_values = vec![0f32; values.len()];
        ty.dequantize(&expected, &mut gguf_values).unwrap();
        let mut unpermuted = vec![0f32; values.len()];
        for (r, &source) in permute_rows(256, 4).unwrap().iter().enumerate() {
            unpermuted[source as usize * 256..][..256]
                .copy_from_slice(&gguf_values[r * 256..][..256]);
        }
        assert_eq!(st, bf16_bytes(&unpermuted), "{recipe}");
    }
}

#[test]
fn norms_become_f32_and_dropped_tensors_write_nothing() {
    let norm = sample(256, 2);
    let input = bf16_bytes(&norm);
    let plan = plan_for("q4_k_m", OutputFormat::Gguf, "model.norm.weight", &[256]);
    assert!(plan.is_identity());
    let out = write(
        OutputFormat::Gguf,
        &plan,
        "model.norm.weight",
        &[256],
        &input,
        256,
    );
    let mut expected = vec![0f32; 256];
    decode_to_f32(DType::BF16, &input, &mut expected).unwrap();
    let floats: Vec<f32> = out
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(floats, expected);
    let name = "model.layers.0.self_attn.rotary_emb.inv_freq";
    let plan = plan_for("q4_k_m", OutputFormat::Gguf, name, &[32]);
    assert_eq!(plan.gguf.as_ref().unwrap().name, None);
    assert!(write(
        OutputFormat::Gguf,
        &plan,
        name,
        &[32],
        &bf16_bytes(&sample(32, 3)),
        32
    )
    .is_empty());
}

#[test]
fn the_head_lays_out_every_part_where_the_header_places_its_tensors() {
    let recipe = Recipe::preset("q4_k_m").unwrap();
    let config = config();
    let tensors: Vec<(String, Vec<u64>)> = vec![
        ("model.embed_tokens.weight".into(), vec![320, 256]),
        ("model.layers.0.input_layernorm.weight".into(), vec![256]),
        (
            "model.layers.0.self_attn.q_proj.weight".into(),
            vec![256, 256],
        ),
        (
            "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
            vec![32],
        ),
        ("model.norm.weight".into(), vec![256]),
        ("lm_head.weight".into(), vec![320, 256]),
    ];
    let plans: Vec<TensorPlan> = tensors
        .iter()
        .map(|(n, s)| {
            TensorPlan::for_output(&recipe, OutputFormat::Gguf, &facts(), n, DType::BF16, s)
                .unwrap()
        })
        .collect();
    let descs: Vec<TensorDesc<'_>> = tensors
        .iter()
        .map(|(n, s)| TensorDesc {
            name: n,
            dtype: DType::BF16,
            shape: s,
        })
        .collect();
    let tasks = [
        FinishedTask {
            output_name: "p1",
            tensors: descs[..3].iter().copied().zip(&plans[..3]).collect(),
        },
        FinishedTask {
            output_name: "p2",
            tensors: descs[3..].iter().copied().zip(&plans[3..]).collect(),
        },
    ];
    let finish = OutputFormat::Gguf.spec().finish_plan(&tasks);
    let Some(Assembly::Gguf(assembly)) = &finish.assembly else {
        panic!("no gguf assembly: {finish:?}");
    };
    let (tj, tc) = (llama3_tokenizer(false), llama3_tokenizer_config());
    let sources = HeadSources {
        config: &config,
        tokenizer: TokenizerFiles {
            tokenizer_json: Some(&tj),
            tokenizer_config: Some(&tc),
            config: Some(&config),
            ..Default::default()
        },
        name: "tiny",
    };
    let one = files(facts().gguf.as_ref().unwrap(), assembly, sources, None).unwrap();
    assert_eq!(one.len(), 1);
    let head = &one[0];
    assert_eq!(
        (head.name.as_str(), head.tasks.clone()),
        ("model.gguf", 0..2)
    );
    // Each part holds its tensors padded, in order; the file is head ++ parts.
    let written: Vec<u64> = tasks
        .iter()
        .map(|task| {
            task.tensors
                .iter()
                .map(|(t, plan)| {
                    let n: u64 = t.shape.iter().product();
                    let bytes = write(
                        OutputFormat::Gguf,
                        plan,
                        t.name,
                        t.shape,
                        &bf16_bytes(&sample(n as usize, 4)),
                        64,
                    );
                    bytes.len() as u64
                })
                .sum()
        })
        .collect();
    assert_eq!(head.part_sizes, written);
    assert_eq!(
        head.head.len() as u64 + written.iter().sum::<u64>(),
        head.file_size
    );
    let parsed = parse_header(&head.head).unwrap();
    let names: Vec<&str> = parsed.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "token_embd.weight",
            "blk.0.attn_norm.weight",
            "blk.0.attn_q.weight",
            "output_norm.weight",
            "output.weight"
        ]
    );
    assert_eq!(head.tensors, 5);
    assert_eq!(
        parsed.get("general.file_type"),
        Some(&crate::gguf::MetaValue::U32(15))
    );
    assert_eq!(
        parsed.get("general.name").and_then(|v| v.as_str()),
        Some("tiny")
    );
    // A gguf pass that matched nothing leaves the file type unknown: an error, not a guess.
    let empty = super::gguf::GgufAssembly {
        file_type: None,
        parts: assembly.parts.clone(),
    };
    assert!(head_err(&empty, sources).contains("file type"));
    // No tokenizer.json: a clear error.
    let untokenized = HeadSources {
        tokenizer: TokenizerFiles {
            config: Some(&config),
            ..Default::default()
        },
        ..sources
    };
    assert!(
        head_err(assembly, untokenized).contains("tokenizer"),
        "{}",
        head_err(assembly, untokenized)
    );
    // Split files, as llama.cpp's gguf-split writes them: a part never spans two files, the
    // first file has every key, each has the split keys and only its own tensors.
    let split = files(facts().gguf.as_ref().unwrap(), assembly, sources, Some(1)).unwrap();
    let names: Vec<&str> = split.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["model-00001-of-00002.gguf", "model-00002-of-00002.gguf"]
    );
    assert_eq!(
        (split[0].tasks.clone(), split[1].tasks.clone()),
        (0..1, 1..2)
    );
    assert_eq!(split[0].part_sizes, written[..1]);
    assert_eq!(split[1].part_sizes, written[1..]);
    let (a, b) = (
        parse_header(&split[0].head).unwrap(),
        parse_header(&split[1].head).unwrap(),
    );
    let tensor_names = |p: &crate::gguf::ParsedGguf| -> Vec<String> {
        p.tensors.iter().map(|t| t.name.clone()).collect()
    };
    assert_eq!(
        tensor_names(&a),
        [
            "token_embd.weight",
            "blk.0.attn_norm.weight",
            "blk.0.attn_q.weight"
        ]
    );
    assert_eq!(tensor_names(&b), ["output_norm.weight", "output.weight"]);
    use crate::gguf::MetaValue::{I32, U16};
    for (no, p) in [&a, &b].into_iter().enumerate() {
        assert_eq!(p.get("split.no"), Some(&U16(no as u16)));
        assert_eq!(p.get("split.count"), Some(&U16(2)));
        assert_eq!(p.get("split.tensors.count"), Some(&I32(5)));
        assert_eq!(
            p.tensors[0].offset, 0,
            "each file's data starts at its own offset 0"
        );
    }
    assert!(a.get("general.architecture").is_some() && a.get("tokenizer.ggml.tokens").is_some());
    assert_eq!(b.metadata.len(), 3, "later files carry only the split keys");
    assert_eq!(
        split
            .iter()
            .map(|f| f.head.len() as u64 + f.part_sizes.iter().sum::<u64>())
            .collect::<Vec<_>>(),
        split.iter().map(|f| f.file_size).collect::<Vec<_>>()
    );
}

fn head_err(assembly: &super::gguf::GgufAssembly, sources: HeadSources<'_>) -> String {
    files(facts().gguf.as_ref().unwrap(), assembly, sources, None)
        .unwrap_err()
        .to_string()
}

/// A mixture-of-experts layer: each expert's slice follows the previous one directly (here
/// across two parts), the stacked tensor is one header entry `[experts, rows, cols]`, the
/// padding follows its last slice only, and no split file boundary falls inside it.
#[test]
fn expert_slices_form_one_stacked_tensor_padded_after_the_last() {
    use super::gguf::{GgufAssembly, PartTensor};
    let (config, tj, tc) = (config(), llama3_tokenizer(false), llama3_tokenizer_config());
    let sources = head_sources(&config, &tj, &tc, "moe");
    let whole = |name: &str, shape: Vec<u64>| PartTensor {
        name: name.into(),
        shape,
        ty: GgmlType::F32,
        expert: None,
    };
    // A Q8_0 slice of 3 rows of 32 is 102 bytes: 4 of them pad from 408 to 416.
    let expert = |e: u64| PartTensor {
        name: "blk.0.ffn_gate_exps.weight".into(),
        shape: vec![3, 32],
        ty: GgmlType::Q8_0,
        expert: Some((e, 4)),
    };
    let assembly = GgufAssembly {
        file_type: Some(crate::gguf::FileType::Q8_0),
        parts: vec![
            vec![
                whole("blk.0.attn_norm.weight", vec![3]),
                expert(0),
                expert(1),
            ],
            vec![expert(2), expert(3)],
            vec![whole("output_norm.weight", vec![5])],
        ],
    };
    let model = facts().gguf.unwrap();
    let one = files(&model, &assembly, sources, None).unwrap();
    assert_eq!(one[0].part_sizes, [32 + 2 * 102, 2 * 102 + 8, 32]);
    let parsed = parse_header(&one[0].head).unwrap();
    let stacked = parsed
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.ffn_gate_exps.weight")
        .unwrap();
    assert_eq!(stacked.dims, [32, 3, 4]);
    assert_eq!(one[0].tensors, 3);
    // Split as small as possible: a new file may start before part 2, never before part 1.
    let split = files(&model, &assembly, sources, Some(1)).unwrap();
    let tasks: Vec<_> = split.iter().map(|f| f.tasks.clone()).collect();
    assert_eq!(tasks, [0..2, 2..3]);
    // Slices out of order, missing or interrupted are refused, naming the tensor.
    for parts in [
        vec![vec![expert(1), expert(0), expert(2), expert(3)]],
        vec![vec![expert(0), expert(1), expert(2)]],
        vec![vec![
            expert(0),
            whole("x.weight", vec![4]),
            expert(1),
            expert(2),
            expert(3),
        ]],
    ] {
        let broken = GgufAssembly {
            parts,
            ..assembly.clone()
        };
        let err = files(&model, &broken, sources, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ffn_gate_exps") && err.contains("expert order"),
            "{err}"
        );
    }
}

/// llama-quantize writes `ggml_n_dims` dimensions: Qwen2-MoE's `[1, n_embd]` shared-expert
/// gate is 1-D in a Q4_K_M file and stays 2-D in the converter's own Q8_0 file.
#[test]
fn requantized_files_drop_leading_unit_dimensions() {
    use super::gguf::{GgufAssembly, PartTensor};
    let (config, tj, tc) = (config(), llama3_tokenizer(false), llama3_tokenizer_config());
    let sources = head_sources(&config, &tj, &tc, "m");
    let model = facts().gguf.unwrap();
    for (file_type, dims) in [
        (crate::gguf::FileType::Q8_0, vec![5u64, 1]),
        (crate::gguf::FileType::Q4_K_M, vec![5]),
    ] {
        let assembly = GgufAssembly {
            file_type: Some(file_type),
            parts: vec![vec![PartTensor {
                name: "blk.0.ffn_gate_inp_shexp.weight".into(),
                shape: vec![1, 5],
                ty: GgmlType::F32,
                expert: None,
            }]],
        };
        let file = &files(&model, &assembly, sources, None).unwrap()[0];
        let parsed = parse_header(&file.head).unwrap();
        assert_eq!(parsed.tensors[0].dims, dims, "{file_type}");
    }
}

/// The head sources of `config` with a llama3 tokenizer, named `name`.
fn head_sources<'a>(
    config: &'a Value,
    tokenizer_json: &'a Value,
    tokenizer_config: &'a Value,
    name: &'a str,
) -> HeadSources<'a> {
    HeadSources {
        config,
        tokenizer: TokenizerFiles {
            tokenizer_json: Some(tokenizer_json),
            tokenizer_config: Some(tokenizer_config),
            config: Some(config),
            ..Default::default()
        },
        name,
    }
}
