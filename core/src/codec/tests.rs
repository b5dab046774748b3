//! Tests for tensor plans, chunk encoding and frame decoding.

use super::*;
use crate::dtype::encode_from_f32;
use crate::recipe::Recipe;

/// Deterministic heavy-ish tailed weights (sum of uniforms with occasional outliers).
fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n)
        .map(|i| {
            let g = (0..4).map(|_| next()).sum::<f32>() - 2.0;
            if i % 97 == 0 {
                g * 6.0 * 0.02
            } else {
                g * 0.02
            }
        })
        .collect()
}

fn bytes_of(dtype: DType, xs: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; xs.len() * dtype.size_bytes()];
    encode_from_f32(dtype, xs, &mut out).unwrap();
    out
}

fn recipe(pass_yaml: &str) -> Recipe {
    let yaml = format!("passes:\n{pass_yaml}");
    Recipe::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

fn one(kind: &str) -> Recipe {
    recipe(&format!("  - {kind}\n    targets: ['re:.*']\n"))
}

fn plan(r: &Recipe, shape: &[u64]) -> TensorPlan {
    TensorPlan::for_tensor(r, "w", DType::BF16, shape).unwrap()
}

fn rel_error(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
    (num / den).sqrt()
}

/// Every kind of pass, as recipes, with an upper bound on its relative error on `weights`.
fn all_kinds() -> Vec<(&'static str, f64)> {
    vec![
        ("quantize: { bits: 8, granularity: channel }", 0.02),
        (
            "quantize: { bits: 4, granularity: group, group_size: 32 }",
            0.2,
        ),
        (
            "quantize: { bits: 4, symmetric: false, granularity: tensor }",
            0.4,
        ),
        (
            "quantize: { method: hqq, bits: 4, granularity: group, group_size: 32 }",
            0.2,
        ),
        ("codebook: { method: kmeans, bits: 4 }", 0.2),
        (
            "codebook: { method: nf4, granularity: group, group_size: 32 }",
            0.2,
        ),
        ("fp8: { granularity: channel }", 0.1),
        ("fp8: { granularity: tensor }", 0.1),
        ("prune: { method: magnitude, sparsity: 0.5 }", 0.5),
        ("prune: { method: nm, n: 2, m: 4 }", 0.6),
        ("prune: { method: rows, fraction: 0.25 }", 0.9),
        ("prune: { method: columns, fraction: 0.25, norm: l1 }", 0.9),
        ("lowrank: { rank: 8 }", 1.0),
        ("dct: { block: 16, keep: 0.5 }", 0.8),
        ("hashed: { fraction: 0.5 }", 1.0),
    ]
}

#[test]
fn every_pass_round_trips_through_a_frame_exactly() {
    let (rows, cols) = (16, 64);
    let xs = weights(rows * cols, 1);
    let input = bytes_of(DType::BF16, &xs);
    let mut original = vec![0f32; xs.len()];
    decode_to_f32(DType::BF16, &input, &mut original).unwrap();
    for (kind, max_err) in all_kinds() {
        let r = one(kind);
        let p = plan(&r, &[rows as u64, cols as u64]);
        assert!(!p.is_identity(), "{kind}");
        let enc = encode_chunk(&p, DType::BF16, cols, &input).unwrap();
        assert_eq!(enc.reconstruction.len(), input.len(), "{kind}");
        let frame = enc.frame();
        let mut decoded = Vec::new();
        decode_frame(&frame, DType::BF16, rows * cols, &mut decoded).unwrap();
        assert_eq!(
            decoded, enc.reconstruction,
            "{kind}: frame decodes to the reconstruction"
        );
        let mut seen = vec![0f32; xs.len()];
        decode_to_f32(DType::BF16, &decoded, &mut seen).unwrap();
        let err = rel_error(&original, &seen);
        assert!(err > 0.0 && err < max_err, "{kind}: error {err}");
        // The representation is smaller than the dense BF16 tensor (except 8-bit with scales).
        let dense_bits = (xs.len() * 16) as u64;
        assert!(enc.repr_bits < dense_bits, "{kind}: {} bits", enc.repr_bits);
    }
}

#[test]
fn pruning_really_zeroes_and_stores_less() {
    let (rows, cols) = (8, 64);
    let xs = weights(rows * cols, 2);
    let input = bytes_of(DType::F32, &xs);
    let r = one("prune: { method: nm, n: 2, m: 4 }");
    let p = TensorPlan::for_tensor(&r, "w", DType::F32, &[8, 64]).unwrap();
    let enc = encode_chunk(&p, DType::F32, cols, &input).unwrap();
    let mut seen = vec![0f32; xs.len()];
    decode_to_f32(DType::F32, &enc.reconstruction, &mut seen).unwrap();
    for block in seen.chunks(4) {
        assert_eq!(block.iter().filter(|v| **v != 0.0).count(), 2);
    }
    // Kept values are exact (F32 stays F32), so 2:4 costs half the values plus 2-bit positions.
    assert_eq!(enc.repr_bits, (xs.len() / 2 * 32 + xs.len() / 2 * 2) as u64);

    let r = one("prune: { method: rows, fraction: 0.25 }");
    let p = TensorPlan::for_tensor(&r, "w", DType::F32, &[8, 64]).unwrap();
    let enc = encode_chunk(&p, DType::F32, cols, &input).unwrap();
    decode_to_f32(DType::F32, &enc.reconstruction, &mut seen).unwrap();
    let zero_rows = seen
        .chunks(cols)
        .filter(|r| r.iter().all(|v| *v == 0.0))
        .count();
    assert_eq!(zero_rows, 2);
}

#[test]
fn identity_is_lossless_for_any_dtype() {
    let input: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    for dtype in [DType::BF16, DType::F32, DType::I64, DType::U8] {
        let enc = encode_chunk(&TensorPlan::default(), dtype, 1, &input).unwrap();
        let mut out = Vec::new();
        decode_frame(&enc.frame(), dtype, input.len(), &mut out).unwrap();
        assert_eq!(out, input, "{dtype:?}");
    }
}

#[test]
fn plans_reject_bad_combinations_by_name() {
    let two_values = recipe(
        "  - quantize: { bits: 4, granularity: channel }\n    targets: ['re:.*']\n  - fp8: { granularity: channel }\n    targets: ['re:.*']\n",
    );
    let err = TensorPlan::for_tensor(&two_values, "w", DType::BF16, &[4, 8]).unwrap_err();
    assert!(
        matches!(
            err,
            PlanError::TwoOfAStage {
                earlier: 0,
                later: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("tensor w"), "{err}");

    let prune_late = recipe(
        "  - quantize: { bits: 4, granularity: channel }\n    targets: ['re:.*']\n  - prune: { method: nm, n: 2, m: 4 }\n    targets: ['re:.*']\n",
    );
    assert!(matches!(
        TensorPlan::for_tensor(&prune_late, "w", DType::BF16, &[4, 8]),
        Err(PlanError::PruneAfterValues {
            prune: 1,
            values: 0,
            ..
        })
    ));

    let sparse_lowrank = recipe(
        "  - prune: { method: magnitude, sparsity: 0.5 }\n    targets: ['re:.*']\n  - lowrank: { rank: 2 }\n    targets: ['re:.*']\n",
    );
    let err = TensorPlan::for_tensor(&sparse_lowrank, "w", DType::BF16, &[4, 8]).unwrap_err();
    assert!(err.to_string().contains("dense matrix"), "{err}");

    let nm = one("prune: { method: nm, n: 2, m: 4 }");
    let err = TensorPlan::for_tensor(&nm, "w", DType::BF16, &[4, 6]).unwrap_err();
    assert!(err.to_string().contains("multiple of 4"), "{err}");

    // Two passes on disjoint tensors are fine; structured pruning then quantization is fine.
    let ok = recipe(
        "  - prune: { method: rows, fraction: 0.5 }\n    targets: ['re:.*']\n  - quantize: { bits: 4, granularity: channel }\n    targets: ['re:.*']\n",
    );
    let p = TensorPlan::for_tensor(&ok, "w", DType::BF16, &[4, 8]).unwrap();
    assert_eq!(p.describe(), "prune rows 0.5 L2 + rtn int4 sym per-channel");
    assert!(!p.needs_whole_tensor());
    assert_eq!(
        p.pending_statistic(),
        Some(crate::stream::TensorStatistic::RowScores)
    );

    // Non-float and 1-D tensors are left alone with a note.
    let q = one("quantize: { bits: 4, granularity: channel }");
    let p = TensorPlan::for_tensor(&q, "w", DType::I32, &[4, 8]).unwrap();
    assert!(p.is_identity() && p.note.contains("I32"));
    let p = TensorPlan::for_tensor(&q, "w", DType::BF16, &[8]).unwrap();
    assert!(p.is_identity() && p.note.contains("1-D"));
}

#[test]
fn streaming_passes_do_not_need_the_whole_tensor() {
    let shape = [4u64, 8];
    assert!(!plan(
        &one("quantize: { bits: 4, granularity: group, group_size: 4 }"),
        &shape
    )
    .needs_whole_tensor());
    assert!(!plan(&one("prune: { method: nm, n: 2, m: 4 }"), &shape).needs_whole_tensor());
    // Whole-tensor statistics stream in two passes (crate::stream) ...
    assert!(!plan(&one("codebook: { method: kmeans, bits: 3 }"), &shape).needs_whole_tensor());
    assert!(!plan(&one("fp8: { granularity: tensor }"), &shape).needs_whole_tensor());
    // ... and the low-rank factorization over several (crate::stream::solver).
    assert!(!plan(&one("lowrank: { energy: 0.9 }"), &shape).needs_whole_tensor());
}

#[test]
fn row_local_plans_give_the_same_frames_in_chunks() {
    let (rows, cols) = (8, 32);
    let input = bytes_of(DType::BF16, &weights(rows * cols, 3));
    let p = plan(&one("prune: { method: nm, n: 2, m: 4 }"), &[8, 32]);
    let whole = encode_chunk(&p, DType::BF16, cols, &input).unwrap();
    let half = input.len() / 2;
    let a = encode_chunk(&p, DType::BF16, cols, &input[..half]).unwrap();
    let b = encode_chunk(&p, DType::BF16, cols, &input[half..]).unwrap();
    assert_eq!(
        [a.reconstruction, b.reconstruction].concat(),
        whole.reconstruction
    );
}

#[test]
fn hostile_frames_are_errors_not_panics() {
    let (rows, cols) = (4, 16);
    let input = bytes_of(DType::BF16, &weights(rows * cols, 4));
    for (kind, _) in all_kinds() {
        let p = plan(&one(kind), &[4, 16]);
        let frame = encode_chunk(&p, DType::BF16, cols, &input).unwrap().frame();
        let mut out = Vec::new();
        // Too small a tensor for the frame's claim.
        assert!(
            decode_frame(&frame, DType::BF16, rows * cols - 1, &mut out).is_err(),
            "{kind}"
        );
        for cut in [0, 3, 4, frame.len() / 2, frame.len() - 1] {
            assert!(decode_frame(&frame[..cut], DType::BF16, rows * cols, &mut out).is_err());
        }
        for i in (0..frame.len()).step_by(7) {
            let mut bad = frame.clone();
            bad[i] ^= 0x5a;
            let _ = decode_frame(&bad, DType::BF16, rows * cols, &mut out);
        }
    }
}

#[test]
fn kept_row_frames_decode_in_place_and_refuse_nesting_and_bad_lengths() {
    let (rows, cols) = (4, 16);
    let input = bytes_of(DType::BF16, &weights(rows * cols, 5));
    let row = cols * 2;
    let keep = [false, true, false, true];
    let kept = [&input[row..2 * row], &input[3 * row..]].concat();
    let others = [&input[..row], &input[2 * row..3 * row]].concat();
    let int8 = plan(
        &one("quantize: { bits: 8, granularity: channel }"),
        &[2, 16],
    );
    let inner = encode_chunk(&int8, DType::BF16, cols, &others)
        .unwrap()
        .frame();
    let frame = kept_rows_frame(rows, cols, &keep, &kept, Some(&inner));
    let mut out = Vec::new();
    decode_frame(&frame, DType::BF16, rows * cols, &mut out).unwrap();
    let mut others_decoded = Vec::new();
    decode_frame(&inner, DType::BF16, 2 * cols, &mut others_decoded).unwrap();
    let (o, k) = (&others_decoded, &input);
    assert_eq!(
        out,
        [&o[..row], &k[row..2 * row], &o[row..], &k[3 * row..]].concat()
    );
    // A kept-rows frame inside another would let a hostile archive recurse without end.
    let nested = kept_rows_frame(rows, cols, &keep, &kept, Some(&frame));
    let err = decode_frame(&nested, DType::BF16, rows * cols, &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("nested"), "{err}");
    // Kept bytes that do not match the flags, and a missing inner frame, are refused.
    let short = kept_rows_frame(rows, cols, &keep, &kept[1..], Some(&inner));
    assert!(decode_frame(&short, DType::BF16, rows * cols, &mut Vec::new()).is_err());
    let no_inner = kept_rows_frame(rows, cols, &keep, &kept, None);
    assert!(decode_frame(&no_inner, DType::BF16, rows * cols, &mut Vec::new()).is_err());
    for i in (0..frame.len()).step_by(5) {
        let mut bad = frame.clone();
        bad[i] ^= 0x5a;
        let _ = decode_frame(&bad, DType::BF16, rows * cols, &mut Vec::new());
    }
}
