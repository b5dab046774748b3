//! Tests for the format layer: each format's writer against the dequantized reconstruction,
//! the compressed-tensors layout, plan checks and `quantization_config`.

use super::compressed_tensors::{dequantize_packed, quantization_config};
use super::*;
use crate::codec::decode_frame;
use crate::dtype::{decode_to_f32, encode_from_f32};
use crate::fp8::e4m3_to_f32;
use crate::recipe::{PassKind, Recipe, Width};

fn bf16_bytes(xs: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; xs.len() * 2];
    encode_from_f32(DType::BF16, xs, &mut out).unwrap();
    out
}

fn sample(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013 + ((i * 7) % 13) as f32 * 1e-3)
        .collect()
}

const UP: &str = "model.layers.0.mlp.up_proj.weight";

fn plan(recipe: &str, format: OutputFormat, name: &str, shape: &[u64]) -> TensorPlan {
    let r = Recipe::preset(recipe).unwrap();
    TensorPlan::for_output(&r, format, &ModelFacts::default(), name, DType::BF16, shape).unwrap()
}

/// Writes one tensor through `format`'s writer in chunks of `chunk_rows` rows.
fn write(
    format: OutputFormat,
    plan: &TensorPlan,
    shape: &[u64],
    input: &[u8],
    chunk_rows: usize,
) -> (Vec<u8>, ErrorAccumulator) {
    let tensor = TensorDesc {
        name: UP,
        dtype: DType::BF16,
        shape,
    };
    let mut writer = format.spec().tensor_writer(tensor, plan);
    let row_bytes = shape[1] as usize * 2;
    let mut acc = ErrorAccumulator::new();
    let mut out = Vec::new();
    for chunk in input.chunks(chunk_rows * row_bytes) {
        let o = writer
            .chunk(plan, DType::BF16, shape[1] as usize, chunk, &mut acc)
            .unwrap();
        out.extend(o.bytes);
    }
    out.extend(writer.finish().unwrap());
    (out, acc)
}

/// Writes one tensor as compressed-tensors: its bytes, the output tensors they hold, the error.
fn write_ct(
    plan: &TensorPlan,
    shape: &[u64],
    input: &[u8],
    chunk_rows: usize,
) -> (Vec<u8>, Vec<OutputTensor>, ErrorAccumulator) {
    let (bytes, acc) = write(
        OutputFormat::CompressedTensors,
        plan,
        shape,
        input,
        chunk_rows,
    );
    let tensor = TensorDesc {
        name: UP,
        dtype: DType::BF16,
        shape,
    };
    let outputs = OutputFormat::CompressedTensors
        .spec()
        .output_tensors(tensor, plan);
    (bytes, outputs, acc)
}

/// Splits a tensor's output bytes into its output tensors (as the header lays them out).
fn split<'a>(outputs: &[OutputTensor], mut bytes: &'a [u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    for o in outputs {
        let len = o.shape.iter().product::<u64>() as usize * o.dtype.size_bytes();
        parts.push(&bytes[..len]);
        bytes = &bytes[len..];
    }
    assert!(bytes.is_empty(), "{} bytes left over", bytes.len());
    parts
}

fn decoded_bf16(bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / 2];
    decode_to_f32(DType::BF16, bytes, &mut out).unwrap();
    out
}

#[test]
fn identity_is_a_byte_copy_except_in_spz() {
    let input = vec![1u8, 2, 3];
    for format in [OutputFormat::Safetensors, OutputFormat::CompressedTensors] {
        let mut acc = ErrorAccumulator::new();
        let tensor = TensorDesc {
            name: "x",
            dtype: DType::I8,
            shape: &[3],
        };
        let plan = TensorPlan::default();
        let mut writer = format.spec().tensor_writer(tensor, &plan);
        let out = writer.chunk(&plan, DType::I8, 3, &input, &mut acc).unwrap();
        assert_eq!(out.bytes, input);
        assert_eq!(acc.count(), 0);
    }
}

#[test]
fn safetensors_and_spz_measure_the_same_reconstruction() {
    let shape = [64u64, 64];
    let input = bf16_bytes(&sample(64 * 64));
    // A BF16 tensor gets the same plan (bf16 scales) in both formats.
    let plan = plan("int4-g128", OutputFormat::Spz, UP, &shape);
    assert_eq!(
        plan,
        self::plan("int4-g128", OutputFormat::Safetensors, UP, &shape)
    );
    let (st, acc_st) = write(OutputFormat::Safetensors, &plan, &shape, &input, 64);
    let (spz, acc_spz) = write(OutputFormat::Spz, &plan, &shape, &input, 64);
    assert_eq!(st.len(), input.len());
    let len = u64::from_le_bytes(spz[..8].try_into().unwrap()) as usize;
    assert_eq!(len + 8, spz.len());
    let mut decoded = Vec::new();
    decode_frame(&spz[8..], DType::BF16, 64 * 64, &mut decoded).unwrap();
    assert_eq!(decoded, st);
    assert_eq!(acc_st.finish(), acc_spz.finish());
    assert!(spz.len() < input.len() / 2, "{} bytes", spz.len());
    let m = acc_st.finish();
    assert!(m.rel_fro_error > 0.0 && m.rel_fro_error < 0.2, "{m:?}");
}

#[test]
fn ragged_input_is_an_error() {
    let mut acc = ErrorAccumulator::new();
    let shape = [4u64, 64];
    let plan = plan("int4-g128", OutputFormat::Safetensors, UP, &shape);
    let mut writer = TensorWriter::Reconstruction;
    for (row_len, len) in [(3, 4), (0, 4), (usize::MAX, 4)] {
        assert!(writer
            .chunk(&plan, DType::BF16, row_len, &vec![0; len], &mut acc)
            .is_err());
    }
    assert!(writer
        .chunk(&plan, DType::I32, 1, &[0; 4], &mut acc)
        .is_err());
}

/// Every integer scheme: the compressed-tensors bytes, unpacked from the specification,
/// equal the dequantized safetensors output of the same plan exactly.
#[test]
fn pack_quantized_dequantizes_to_the_safetensors_output() {
    let shape = [16u64, 256];
    let mut xs = sample(16 * 256);
    xs[5] = 3.0; // an outlier
    xs[300..556].fill(0.0); // an all-zero row part
    let input = bf16_bytes(&xs);
    for (yaml, bits, group, symmetric) in [
        ("w4a16", 4, Some(128), true),
        ("w4a16-asym", 4, Some(128), false),
        ("w8a16", 8, None, true),
        ("int8-g128", 8, Some(128), true),
        ("w4a16-hqq", 4, Some(128), false),
        ("2of4-w4a16", 4, Some(128), true),
    ] {
        let ct = plan(yaml, OutputFormat::CompressedTensors, UP, &shape);
        let st = plan(yaml, OutputFormat::Safetensors, UP, &shape);
        assert_eq!(ct, st, "{yaml}: both formats run the same plan");
        let (reference, _) = write(OutputFormat::Safetensors, &st, &shape, &input, 16);
        let tensor = TensorDesc {
            name: UP,
            dtype: DType::BF16,
            shape: &shape,
        };
        let outputs = OutputFormat::CompressedTensors
            .spec()
            .output_tensors(tensor, &ct);
        let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
        let mut want = vec!["weight_packed", "weight_scale"];
        if !symmetric {
            want.push("weight_zero_point");
        }
        want.push("weight_shape");
        let want: Vec<String> = want
            .iter()
            .map(|w| format!("model.layers.0.mlp.up_proj.{w}"))
            .collect();
        assert_eq!(names, want, "{yaml}");
        for chunk_rows in [16, 3] {
            let (bytes, _) = write(
                OutputFormat::CompressedTensors,
                &ct,
                &shape,
                &input,
                chunk_rows,
            );
            let parts = split(&outputs, &bytes);
            let zeros = (!symmetric).then(|| parts[2]);
            let values = dequantize_packed(
                parts[0],
                parts[1],
                DType::BF16,
                zeros,
                [16, 256],
                bits,
                group,
            )
            .unwrap();
            let mut recon = vec![0u8; values.len() * 2];
            encode_from_f32(DType::BF16, &values, &mut recon).unwrap();
            assert!(recon == reference, "{yaml} chunks of {chunk_rows}");
            if yaml.starts_with("2of4") {
                // Pruned weights are stored as the code of exactly 0.
                let zeros = values.iter().filter(|v| **v == 0.0).count();
                assert!(zeros >= values.len() / 2, "{yaml}: {zeros} zeros");
            }
            let shape_bytes = parts[parts.len() - 1];
            assert_eq!(shape_bytes[..8], 16i64.to_le_bytes());
            assert_eq!(shape_bytes[8..], 256i64.to_le_bytes());
        }
    }
}

#[test]
fn packing_order_is_low_bits_first() {
    // Codes 0..8 in one row of 8 (w4a16 channel-free check through the writer): a row whose
    // values are -8..7 times a power of two quantizes exactly.
    let shape = [8u64, 128];
    let row: Vec<f32> = (0..128).map(|i| ((i % 16) as f32 - 8.0) * 0.25).collect();
    let xs: Vec<f32> = (0..8).flat_map(|_| row.clone()).collect();
    let input = bf16_bytes(&xs);
    let ct = plan("w4a16", OutputFormat::CompressedTensors, UP, &shape);
    let (bytes, acc) = write(OutputFormat::CompressedTensors, &ct, &shape, &input, 8);
    // absmax 2.0 maps to 7.5: scale 2/7.5 rounded up onto bf16; codes round(x/s)+8.
    let first = u32::from_le_bytes(bytes[..4].try_into().unwrap());
    let s = crate::quantize::bf16_round_up(2.0 / 7.5);
    let code = |x: f32| ((x / s).round().clamp(-8.0, 7.0) + 8.0) as u32;
    let want = (0..8).fold(0u32, |w, i| w | code(row[i]) << (4 * i));
    assert_eq!(first, want, "{first:08x} vs {want:08x}");
    assert!(acc.finish().rel_fro_error < 0.1);
}

#[test]
fn float_quantized_stores_e4m3_and_scales_in_the_tensor_dtype() {
    let shape = [8u64, 64];
    let input = bf16_bytes(&sample(8 * 64));
    let ct = plan("fp8", OutputFormat::CompressedTensors, UP, &shape);
    let st = plan("fp8", OutputFormat::Safetensors, UP, &shape);
    let (reference, _) = write(OutputFormat::Safetensors, &st, &shape, &input, 8);
    let (bytes, _) = write(OutputFormat::CompressedTensors, &ct, &shape, &input, 3);
    let tensor = TensorDesc {
        name: UP,
        dtype: DType::BF16,
        shape: &shape,
    };
    let outputs = OutputFormat::CompressedTensors
        .spec()
        .output_tensors(tensor, &ct);
    assert_eq!(outputs[0].dtype, DType::F8_E4M3);
    assert_eq!(outputs[1].dtype, DType::BF16);
    assert_eq!(outputs[1].shape, vec![8, 1]);
    let parts = split(&outputs, &bytes);
    let scales = decoded_bf16(parts[1]);
    let values: Vec<f32> = parts[0]
        .iter()
        .enumerate()
        .map(|(i, &b)| e4m3_to_f32(b) * scales[i / 64])
        .collect();
    assert_eq!(bf16_bytes(&values), reference);
}

/// A per-tensor FP8 scale gathered in a first streamed pass: the tensor's chunks each carry
/// the same scale, and compressed-tensors stores it once, as for the tensor written whole.
#[test]
fn a_streamed_per_tensor_fp8_scale_is_stored_once() {
    let shape = [8u64, 64];
    let input = bf16_bytes(&sample(8 * 64));
    let yaml = "passes:\n  - fp8: { granularity: tensor }\n    targets: ['re:.*']\n";
    let recipe = Recipe::from_yaml(yaml).unwrap();
    let facts = ModelFacts::default();
    let for_format =
        |format| TensorPlan::for_output(&recipe, format, &facts, UP, DType::BF16, &shape).unwrap();
    let (whole, _) = write(
        OutputFormat::CompressedTensors,
        &for_format(OutputFormat::CompressedTensors),
        &shape,
        &input,
        8,
    );
    let mut streamed_plan = for_format(OutputFormat::CompressedTensors);
    let statistic = streamed_plan.pending_statistic().unwrap();
    let mut acc = crate::stream::StatsAccumulator::new(statistic, 64);
    for (c, chunk) in input.chunks(3 * 64 * 2).enumerate() {
        acc.feed(&streamed_plan, DType::BF16, c * 3, chunk).unwrap();
    }
    acc.fix(&mut streamed_plan).unwrap();
    let (streamed, _) = write(
        OutputFormat::CompressedTensors,
        &streamed_plan,
        &shape,
        &input,
        3,
    );
    assert_eq!(streamed, whole, "same E4M3 bytes and one scale");
}

/// HQQ with real zeros is converted to integer zeros (what pack-quantized holds); the
/// other formats keep the recipe's real zeros.
#[test]
fn compressed_tensors_converts_hqq_to_integer_zeros() {
    let shape = [16u64, 256];
    let ct = plan("hqq4", OutputFormat::CompressedTensors, UP, &shape);
    let st = plan("hqq4", OutputFormat::Safetensors, UP, &shape);
    let (Some(PassKind::Hqq(c)), Some(PassKind::Hqq(s))) = (&ct.values, &st.values) else {
        panic!("{ct:?}");
    };
    assert!(c.integer_zero && !s.integer_zero);
    assert_eq!(c.scale_dtype, crate::recipe::ScaleDtype::Bf16);
    let input = bf16_bytes(&sample(16 * 256));
    let (bytes, outputs, acc) = write_ct(&ct, &shape, &input, 5);
    let parts = split(&outputs, &bytes);
    let values = dequantize_packed(
        parts[0],
        parts[1],
        DType::BF16,
        Some(parts[2]),
        [16, 256],
        4,
        Some(64),
    )
    .unwrap();
    let (reference, _) = write(OutputFormat::Safetensors, &ct, &shape, &input, 16);
    assert!(bf16_bytes(&values) == reference);
    assert!(acc.finish().rel_fro_error < 0.1);
}

/// 2:4 pruning before FP8: float-quantized bytes with +0 at the pruned positions.
#[test]
fn two_of_four_fp8_is_float_quantized_with_zeros() {
    let shape = [8u64, 64];
    let input = bf16_bytes(&sample(8 * 64));
    let recipe = Recipe::from_yaml("passes:\n  - prune: { method: nm, n: 2, m: 4 }\n    targets: ['re:.*']\n  - fp8: { granularity: channel }\n    targets: ['re:.*']\n").unwrap();
    let facts = ModelFacts::default();
    let ct = TensorPlan::for_output(
        &recipe,
        OutputFormat::CompressedTensors,
        &facts,
        UP,
        DType::BF16,
        &shape,
    )
    .unwrap();
    let (reference, _) = write(OutputFormat::Safetensors, &ct, &shape, &input, 8);
    let (bytes, _) = write(OutputFormat::CompressedTensors, &ct, &shape, &input, 3);
    let parts = split(
        &[
            OutputTensor {
                name: "w".into(),
                dtype: DType::F8_E4M3,
                shape: vec![8, 64],
            },
            OutputTensor {
                name: "s".into(),
                dtype: DType::BF16,
                shape: vec![8, 1],
            },
        ],
        &bytes,
    );
    let scales = decoded_bf16(parts[1]);
    let values: Vec<f32> = parts[0]
        .iter()
        .enumerate()
        .map(|(i, &b)| e4m3_to_f32(b) * scales[i / 64])
        .collect();
    assert_eq!(bf16_bytes(&values), reference);
    assert_eq!(parts[0].iter().filter(|&&b| b == 0).count(), 8 * 64 / 2);
}

#[test]
fn compressed_tensors_refuses_what_it_cannot_hold() {
    let r = |yaml: &str| Recipe::from_yaml(yaml).unwrap();
    let ct = OutputFormat::CompressedTensors;
    let check = |recipe: &Recipe, name: &str, shape: &[u64]| {
        TensorPlan::for_output(recipe, ct, &ModelFacts::default(), name, DType::BF16, shape)
    };
    let refused = [
        ("2of4", UP, vec![16, 256], "2:4 pruning alone"),
        ("kmeans4", UP, vec![16, 256], "compressed-tensors layout"),
        ("svd50", UP, vec![16, 256], "compressed-tensors layout"),
        ("w4a16", UP, vec![16, 200], "does not divide"),
        ("w4a16-asym", UP, vec![12, 256], "multiple"),
        ("int4-g128", UP, vec![16, 256], ""),
    ];
    for (preset, name, shape, reason) in refused {
        let result = check(&Recipe::preset(preset).unwrap(), name, &shape);
        if reason.is_empty() {
            assert!(result.is_ok(), "{preset}: {result:?}");
            continue;
        }
        let err = result.expect_err(preset).to_string();
        assert!(
            err.contains(reason) && err.contains(name),
            "{preset}: {err}"
        );
    }
    let odd_group = r("passes:\n  - prune: { method: nm, n: 2, m: 4 }\n    targets: ['re:.*']\n  - quantize: { bits: 4, granularity: group, group_size: 63 }\n    targets: ['re:.*']\n");
    let err = check(&odd_group, UP, &[16, 256]).unwrap_err().to_string();
    assert!(err.contains("multiple of 2"), "{err}");
    let magnitude = r("passes:\n  - prune: { method: magnitude, sparsity: 0.5 }\n    targets: ['re:.*']\n  - quantize: { bits: 4, granularity: group, group_size: 64 }\n    targets: ['re:.*']\n");
    let err = check(&magnitude, UP, &[16, 256]).unwrap_err().to_string();
    assert!(err.contains("only N:M pruning"), "{err}");
    let three =
        r("passes:\n  - quantize: { bits: 3, granularity: channel }\n    targets: ['re:.*']\n");
    let err = check(&three, UP, &[16, 256]).unwrap_err().to_string();
    assert!(err.contains("4- or 8-bit"), "{err}");
    let all = r("passes:\n  - quantize: { bits: 4, granularity: group, group_size: 128 }\n    targets: ['re:.*']\n");
    let err = check(&all, "model.embed_tokens.weight", &[32, 256])
        .unwrap_err()
        .to_string();
    assert!(err.contains("Linear"), "{err}");
}

#[test]
fn quantization_config_targets_linear_and_ignores_the_rest() {
    let layers = [
        ("model.embed_tokens.weight", vec![32u64, 256]),
        ("model.layers.0.mlp.up_proj.weight", vec![64, 256]),
        ("model.layers.0.self_attn.q_proj.weight", vec![256, 256]),
        ("model.layers.0.input_layernorm.weight", vec![256]),
        ("lm_head.weight", vec![32, 256]),
    ];
    let recipe = Recipe::preset("w4a16").unwrap();
    let plans: Vec<TensorPlan> = layers
        .iter()
        .map(|(n, s)| {
            TensorPlan::for_output(
                &recipe,
                OutputFormat::CompressedTensors,
                &ModelFacts::default(),
                n,
                DType::BF16,
                s,
            )
            .unwrap()
        })
        .collect();
    let tensors: Vec<(TensorDesc<'_>, &TensorPlan)> = layers
        .iter()
        .zip(&plans)
        .map(|((name, shape), plan)| {
            (
                TensorDesc {
                    name,
                    dtype: DType::BF16,
                    shape,
                },
                plan,
            )
        })
        .collect();
    let q = quantization_config(&tensors);
    assert_eq!(q["quant_method"], "compressed-tensors");
    assert_eq!(q["format"], "pack-quantized");
    assert_eq!(q["quantization_status"], "compressed");
    assert_eq!(q["ignore"], serde_json::json!(["lm_head"]));
    let group = &q["config_groups"]["group_0"];
    assert_eq!(group["targets"], serde_json::json!(["Linear"]));
    assert_eq!(group["weights"]["num_bits"], 4);
    assert_eq!(group["weights"]["group_size"], 128);
    assert_eq!(group["weights"]["strategy"], "group");
    assert_eq!(group["weights"]["symmetric"], true);
    assert_eq!(group["weights"]["type"], "int");
    assert!(q["config_groups"].get("group_1").is_none());
}

#[test]
fn non_finite_weights_are_refused_not_spread_over_their_group() {
    let shape = [2u64, 128];
    let plan = plan("w4a16", OutputFormat::Safetensors, UP, &shape);
    for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
        let mut xs = sample(256);
        xs[130] = bad;
        let input = bf16_bytes(&xs);
        let mut acc = ErrorAccumulator::new();
        let err = TensorWriter::Reconstruction
            .chunk(&plan, DType::BF16, 128, &input, &mut acc)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("1 non-finite") && err.contains("element 130"),
            "{err}"
        );
        assert_eq!(acc.count(), 0);
    }
    // An unchanged tensor is copied as it is, non-finite values included.
    let mut xs = sample(256);
    xs[0] = f32::INFINITY;
    let input = bf16_bytes(&xs);
    let out = TensorWriter::Reconstruction
        .chunk(
            &TensorPlan::default(),
            DType::BF16,
            128,
            &input,
            &mut ErrorAccumulator::new(),
        )
        .unwrap();
    assert_eq!(out.bytes, input);
}

#[test]
fn f16_weights_at_the_edge_of_the_range_reconstruct_finitely() {
    // Groups whose largest magnitude is F16's largest: whatever a quantizer's codes decode
    // to, the stored F16 values stay finite (the encoder saturates) and so do the metrics.
    let shape = [2u64, 128];
    let mut xs: Vec<f32> = sample(256).iter().map(|v| v * 1000.0).collect();
    xs[3] = -65504.0;
    xs[200] = 65504.0;
    xs[201] = -65504.0;
    let mut input = vec![0u8; 512];
    encode_from_f32(DType::F16, &xs, &mut input).unwrap();
    for preset in [
        "w4a16",
        "w4a16-asym",
        "int8",
        "hqq4",
        "nf4",
        "kmeans4",
        "fp8",
    ] {
        let r = Recipe::preset(preset).unwrap();
        let facts = ModelFacts::default();
        let plan = TensorPlan::for_output(
            &r,
            OutputFormat::Safetensors,
            &facts,
            UP,
            DType::F16,
            &shape,
        )
        .unwrap();
        let mut acc = ErrorAccumulator::new();
        let out = TensorWriter::Reconstruction
            .chunk(&plan, DType::F16, 128, &input, &mut acc)
            .unwrap();
        let mut back = vec![0f32; 256];
        decode_to_f32(DType::F16, &out.bytes, &mut back).unwrap();
        assert!(
            back.iter().all(|v| v.is_finite()),
            "{preset}: {:?}",
            &back[..8]
        );
        let m = acc.finish();
        assert!(
            m.rel_fro_error.is_finite() && m.rel_fro_error < 0.5,
            "{preset}: {m:?}"
        );
    }
}

/// `non_finite: keep`: rows holding NaN or infinities are stored bit for bit, every other row
/// exactly as it would be compressed without them, and the error covers only those rows.
#[test]
fn non_finite_rows_are_kept_exactly_when_the_recipe_says_so() {
    let shape = [6u64, 128];
    let mut xs = sample(6 * 128);
    xs[128 + 7] = f32::INFINITY;
    xs[4 * 128] = f32::NAN;
    xs[4 * 128 + 1] = f32::NEG_INFINITY;
    let input = bf16_bytes(&xs);
    let yaml = "passes:\n  - quantize: { bits: 4, granularity: group, group_size: 64 }\n    targets: ['re:.*']\n";
    let refuse = Recipe::from_yaml(yaml).unwrap();
    let keep = Recipe::from_yaml(&format!("non_finite: keep\n{yaml}")).unwrap();
    let facts = ModelFacts::default();
    let plan_of = |r: &Recipe| {
        TensorPlan::for_output(
            r,
            OutputFormat::Safetensors,
            &facts,
            UP,
            DType::BF16,
            &shape,
        )
        .unwrap()
    };
    let mut acc = ErrorAccumulator::new();
    let err = TensorWriter::Reconstruction
        .chunk(&plan_of(&refuse), DType::BF16, 128, &input, &mut acc)
        .unwrap_err();
    assert!(err.to_string().contains("non_finite: keep"), "{err}");
    let plan = plan_of(&keep);
    assert!(plan.keep_non_finite_rows);
    let out = TensorWriter::Reconstruction
        .chunk(&plan, DType::BF16, 128, &input, &mut acc)
        .unwrap();
    assert_eq!(out.kept_rows, 2);
    let row = 128 * 2;
    let finite_rows: Vec<u8> = [0usize, 2, 3, 5]
        .iter()
        .flat_map(|&r| input[r * row..(r + 1) * row].to_vec())
        .collect();
    let mut reference_acc = ErrorAccumulator::new();
    let reference = TensorWriter::Reconstruction
        .chunk(
            &plan_of(&refuse),
            DType::BF16,
            128,
            &finite_rows,
            &mut reference_acc,
        )
        .unwrap();
    for (i, r) in [0usize, 2, 3, 5].into_iter().enumerate() {
        assert!(out.bytes[r * row..(r + 1) * row] == reference.bytes[i * row..(i + 1) * row]);
    }
    for r in [1usize, 4] {
        assert!(
            out.bytes[r * row..(r + 1) * row] == input[r * row..(r + 1) * row],
            "row {r}"
        );
    }
    let (m, want) = (acc.finish(), reference_acc.finish());
    assert_eq!(m, want);
    assert!(m.rel_fro_error.is_finite() && m.rel_fro_error > 0.0);
    // Formats that store codes refuse the option at submit.
    let gguf_keep = Recipe::from_yaml(
        "non_finite: keep\npasses:\n  - gguf: { type: q8_0 }\n    targets: ['re:.*']\n",
    )
    .unwrap();
    for (format, recipe) in [
        (OutputFormat::CompressedTensors, &keep),
        (OutputFormat::Gguf, &gguf_keep),
    ] {
        let err = format.spec().check_recipe(recipe).unwrap_err().to_string();
        assert!(err.contains("non_finite: keep"), "{format:?}: {err}");
    }
    assert!(Recipe::from_yaml(&format!("non_finite: maybe\n{yaml}")).is_err());
    // `.spz` keeps the rows in the chunk's frame, beside a frame of the others: it decodes to
    // exactly the reconstruction, here and when every row is kept.
    let spz =
        TensorPlan::for_output(&keep, OutputFormat::Spz, &facts, UP, DType::BF16, &shape).unwrap();
    let all_kept = bf16_bytes(&[f32::NAN; 2 * 128]);
    for (chunk, want) in [(&input, &out.bytes), (&all_kept, &all_kept)] {
        let framed = TensorWriter::Frames
            .chunk(&spz, DType::BF16, 128, chunk, &mut ErrorAccumulator::new())
            .unwrap();
        let frame_len = u64::from_le_bytes(framed.bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(frame_len, framed.bytes.len() - 8);
        let mut decoded = Vec::new();
        decode_frame(&framed.bytes[8..], DType::BF16, 6 * 128, &mut decoded).unwrap();
        assert!(decoded == *want);
    }
}

/// The row-chunk reader of packed inputs equals the whole-tensor reader, from any first row.
#[test]
fn packed_rows_decode_like_the_whole_tensor() {
    let shape = [16u64, 256];
    let input = bf16_bytes(&sample(16 * 256));
    let ct = plan("w4a16-asym", OutputFormat::CompressedTensors, UP, &shape);
    let (bytes, outputs, _) = write_ct(&ct, &shape, &input, 16);
    let parts = split(&outputs, &bytes);
    let whole = dequantize_packed(
        parts[0],
        parts[1],
        DType::BF16,
        Some(parts[2]),
        [16, 256],
        4,
        Some(128),
    )
    .unwrap();
    let scales = decoded_bf16(parts[1]);
    let row = 256 / 8 * 4;
    for (first, rows) in [(0usize, 16usize), (3, 5), (8, 8), (15, 1)] {
        let mut out = vec![0f32; rows * 256];
        super::compressed_tensors::dequantize_packed_rows(
            &parts[0][first * row..(first + rows) * row],
            first as u64,
            256,
            4,
            128,
            &scales,
            Some(parts[2]),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out,
            whole[first * 256..(first + rows) * 256],
            "rows {first}.."
        );
    }
}

#[test]
fn mixed_widths_get_one_group_each_targeting_their_modules_with_or_without_the_model_prefix() {
    let layers = [
        ("model.layers.0.mlp.down_proj.weight", vec![64u64, 256]),
        ("model.layers.1.mlp.down_proj.weight", vec![64, 256]),
        ("model.layers.10.mlp.down_proj.weight", vec![64, 256]),
    ];
    let base = Recipe::preset("w4a16").unwrap();
    let chosen = [
        (layers[1].0.to_string(), Width::bits(8)),
        (layers[2].0.to_string(), Width::parse("4g32").unwrap()),
    ]
    .into_iter()
    .collect();
    let yaml = Recipe::with_target_bpw(&base.source_yaml, 5.0).unwrap();
    let recipe = Recipe::from_yaml(&yaml)
        .unwrap()
        .with_chosen_widths(&chosen)
        .unwrap();
    let plans: Vec<TensorPlan> = (layers.iter())
        .map(|(n, s)| {
            let facts = ModelFacts::default();
            TensorPlan::for_output(
                &recipe,
                OutputFormat::CompressedTensors,
                &facts,
                n,
                DType::BF16,
                s,
            )
            .unwrap()
        })
        .collect();
    let tensors: Vec<(TensorDesc<'_>, &TensorPlan)> = (layers.iter().zip(&plans))
        .map(|((name, shape), plan)| {
            let desc = TensorDesc {
                name,
                dtype: DType::BF16,
                shape,
            };
            (desc, plan)
        })
        .collect();
    let q = quantization_config(&tensors);
    let groups = q["config_groups"].as_object().unwrap();
    // 4 bits in groups of 128 (the recipe's), 8 bits, and 4 bits in groups of 32.
    assert_eq!(groups.len(), 3, "{q}");
    let narrow = (groups.values())
        .find(|g| g["weights"]["group_size"] == 32)
        .unwrap();
    assert_eq!(narrow["weights"]["num_bits"], 4, "{narrow}");
    let targets = narrow["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 1, "{narrow}");
    assert!(
        targets[0].as_str().unwrap().contains("layers\\.10\\."),
        "{narrow}"
    );
    let eight = (groups.values())
        .find(|g| g["weights"]["num_bits"] == 8)
        .unwrap();
    let targets = eight["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 1, "{eight}");
    let pattern = targets[0].as_str().unwrap().strip_prefix("re:").unwrap();
    let re = regex::Regex::new(pattern).unwrap();
    // The causal-LM class's module name and the bare model's both match; no other layer does.
    assert!(re.is_match("model.layers.1.mlp.down_proj"));
    assert!(re.is_match("layers.1.mlp.down_proj"));
    assert!(!re.is_match("model.layers.10.mlp.down_proj"));
    assert!(!re.is_match("layers.11.mlp.down_proj"));
    assert_eq!(q["format"], "pack-quantized");
}
