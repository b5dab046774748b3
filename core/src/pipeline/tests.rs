//! Tests for the per-chunk pipeline: formats, metrics and chunking.

use super::*;
use crate::codec::decode_frame;
use crate::dtype::encode_from_f32;
use crate::recipe::Recipe;

fn bf16_bytes(xs: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; xs.len() * 2];
    encode_from_f32(DType::BF16, xs, &mut out).unwrap();
    out
}

fn sample(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
        .collect()
}

fn int4() -> TensorPlan {
    let r = Recipe::preset("int4-g128").unwrap();
    TensorPlan::for_tensor(
        &r,
        "model.layers.0.mlp.up_proj.weight",
        DType::BF16,
        &[4, 64],
    )
    .unwrap()
}

#[test]
fn identity_safetensors_is_a_byte_copy() {
    let input = vec![1u8, 2, 3];
    let mut acc = ErrorAccumulator::new();
    let out = process_chunk(
        &TensorPlan::default(),
        DType::I8,
        3,
        &input,
        OutputFormat::Safetensors,
        &mut acc,
    )
    .unwrap();
    assert_eq!(out.bytes, input);
    assert_eq!(acc.count(), 0);
}

#[test]
fn both_formats_measure_the_same_reconstruction() {
    let xs = sample(64 * 64);
    let input = bf16_bytes(&xs);
    let plan = int4();
    let mut acc_st = ErrorAccumulator::new();
    let st = process_chunk(
        &plan,
        DType::BF16,
        64,
        &input,
        OutputFormat::Safetensors,
        &mut acc_st,
    )
    .unwrap();
    assert_eq!(st.bytes.len(), input.len());
    let mut acc_spz = ErrorAccumulator::new();
    let spz = process_chunk(
        &plan,
        DType::BF16,
        64,
        &input,
        OutputFormat::Spz,
        &mut acc_spz,
    )
    .unwrap();
    let mut decoded = Vec::new();
    decode_frame(&spz.bytes, DType::BF16, 64 * 64, &mut decoded).unwrap();
    assert_eq!(decoded, st.bytes);
    assert_eq!(acc_st.finish(), acc_spz.finish());
    // 4-bit codes + one f16 scale per 64-weight row (group 128 clamps to the row).
    assert_eq!(st.repr_bits, (64 * 64 * 4 + 64 * 16) as u64);
    assert!(
        spz.bytes.len() < input.len() / 2,
        "{} bytes",
        spz.bytes.len()
    );
    let m = acc_st.finish();
    assert!(m.rel_fro_error > 0.0 && m.rel_fro_error < 0.2, "{m:?}");
}

#[test]
fn ragged_input_is_an_error() {
    let mut acc = ErrorAccumulator::new();
    let plan = int4();
    for (row_len, len) in [(3, 4), (0, 4), (usize::MAX, 4)] {
        assert!(process_chunk(
            &plan,
            DType::BF16,
            row_len,
            &vec![0; len],
            OutputFormat::Safetensors,
            &mut acc
        )
        .is_err());
    }
    assert!(process_chunk(
        &plan,
        DType::I32,
        1,
        &[0; 4],
        OutputFormat::Safetensors,
        &mut acc
    )
    .is_err());
}
