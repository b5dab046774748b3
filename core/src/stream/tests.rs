//! Streamed whole-tensor statistics against the whole-tensor path: a tensor encoded in
//! chunks with its statistics gathered first gives the same reconstruction as the tensor
//! encoded at once (magnitude pruning: the same sparsity up to one weight per chunk).

use super::*;
use crate::codec::encode_chunk;
use crate::dtype::encode_from_f32;
use crate::recipe::Recipe;

/// Deterministic weights with a heavy-ish tail (a sum of uniforms, occasional outliers).
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
            let scale = if i % 89 == 0 { 0.15 } else { 0.02 };
            // Rows of different energy, so that row and column pruning have a clear choice.
            g * scale * (1.0 + (i / 96 % 7) as f32 * 0.1 + (i % 96 % 5) as f32 * 0.05)
        })
        .collect()
}

fn bytes_of(dtype: DType, xs: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; xs.len() * dtype.size_bytes()];
    encode_from_f32(dtype, xs, &mut out).unwrap();
    out
}

fn plan_of(pass_yaml: &str, dtype: DType, shape: &[u64]) -> TensorPlan {
    let yaml = format!("passes:\n{pass_yaml}");
    let recipe = Recipe::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    TensorPlan::for_tensor(&recipe, "w", dtype, shape).unwrap()
}

fn one(kind: &str) -> String {
    format!("  - {kind}\n    targets: ['re:.*']\n")
}

/// The plan with every pending statistic gathered over `input` in chunks of `chunk_rows`.
fn fix_streamed(
    mut plan: TensorPlan,
    dtype: DType,
    row_len: usize,
    input: &[u8],
    chunk_rows: usize,
) -> TensorPlan {
    let row_bytes = row_len * dtype.size_bytes();
    let mut passes = 0;
    while let Some(statistic) = plan.pending_statistic() {
        let mut acc = StatsAccumulator::new(statistic, row_len);
        for (c, chunk) in input.chunks(chunk_rows * row_bytes).enumerate() {
            acc.feed(&plan, dtype, c * chunk_rows, chunk).unwrap();
        }
        acc.fix(&mut plan).unwrap();
        passes += 1;
        assert!(passes <= 2, "a plan has at most two statistics");
    }
    let shape = [(input.len() / row_bytes) as u64, row_len as u64];
    if let Some(mut solver) = solver::TensorSolver::for_plan(&plan, &shape).unwrap() {
        while solver.needs_pass() {
            for (c, chunk) in input.chunks(chunk_rows * row_bytes).enumerate() {
                solver
                    .feed(&plan, dtype, c * chunk_rows, row_len, chunk)
                    .unwrap();
            }
            solver.end_pass().unwrap();
        }
        solver.fix(&mut plan, dtype).unwrap();
    }
    plan
}

/// The reconstruction of `input` encoded chunk by chunk under the streamed plan.
fn streamed(
    plan: &TensorPlan,
    dtype: DType,
    row_len: usize,
    input: &[u8],
    chunk_rows: usize,
) -> Vec<u8> {
    let plan = fix_streamed(plan.clone(), dtype, row_len, input, chunk_rows);
    let row_bytes = row_len * dtype.size_bytes();
    input
        .chunks(chunk_rows * row_bytes)
        .enumerate()
        .flat_map(|(c, chunk)| {
            let chunk_plan = plan.for_chunk(c * chunk_rows);
            encode_chunk(&chunk_plan, dtype, row_len, chunk)
                .unwrap()
                .reconstruction
        })
        .collect()
}

const ROWS: usize = 48;
const COLS: usize = 96;

/// Passes whose streamed result equals the whole-tensor one exactly.
const EXACT: &[&str] = &[
    "quantize: { bits: 4, symmetric: true, granularity: tensor }",
    "quantize: { bits: 4, symmetric: false, granularity: tensor }",
    "quantize: { bits: 8, granularity: tensor }",
    "codebook: { method: nf4, granularity: tensor }",
    "fp8: { granularity: tensor }",
    "codebook: { method: kmeans, bits: 4 }",
    "codebook: { method: kmeans, bits: 3, iterations: 50 }",
    "prune: { method: rows, fraction: 0.25 }",
    "prune: { method: columns, fraction: 0.25, norm: l1 }",
];

#[test]
fn streamed_statistics_reproduce_the_whole_tensor_bit_for_bit() {
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let input = bytes_of(dtype, &weights(ROWS * COLS, 7));
        for kind in EXACT {
            let plan = plan_of(&one(kind), dtype, &[ROWS as u64, COLS as u64]);
            assert!(plan.pending_statistic().is_some(), "{kind}: streams");
            assert!(!plan.needs_whole_tensor(), "{kind}");
            let whole = encode_chunk(&plan, dtype, COLS, &input)
                .unwrap()
                .reconstruction;
            for chunk_rows in [1, 5, 16, ROWS] {
                let got = streamed(&plan, dtype, COLS, &input, chunk_rows);
                assert!(
                    got == whole,
                    "{kind} {dtype:?}: {chunk_rows}-row chunks differ"
                );
            }
        }
    }
}

#[test]
fn a_structure_and_a_values_statistic_are_gathered_in_turn() {
    // Row pruning, then per-tensor RTN over the kept rows only: two statistic passes.
    let yaml = one("prune: { method: rows, fraction: 0.5 }")
        + &one("quantize: { bits: 4, symmetric: false, granularity: tensor }");
    let input = bytes_of(DType::BF16, &weights(ROWS * COLS, 3));
    let plan = plan_of(&yaml, DType::BF16, &[ROWS as u64, COLS as u64]);
    assert_eq!(plan.pending_statistic(), Some(TensorStatistic::RowScores));
    let fixed = fix_streamed(plan.clone(), DType::BF16, COLS, &input, 7);
    assert!(matches!(
        fixed.fixed_structure,
        Some(FixedStructure::Rows { .. })
    ));
    assert!(matches!(
        fixed.fixed_values,
        Some(FixedValues::Range { .. })
    ));
    let whole = encode_chunk(&plan, DType::BF16, COLS, &input)
        .unwrap()
        .reconstruction;
    assert!(streamed(&plan, DType::BF16, COLS, &input, 7) == whole);
}

#[test]
fn a_streamed_magnitude_prune_reaches_its_sparsity_within_one_weight_per_chunk() {
    for dtype in [DType::BF16, DType::F32] {
        let input = bytes_of(dtype, &weights(ROWS * COLS, 11));
        for sparsity in [0.1, 0.5, 0.9] {
            let kind = format!("prune: {{ method: magnitude, sparsity: {sparsity} }}");
            let plan = plan_of(&one(&kind), dtype, &[ROWS as u64, COLS as u64]);
            assert_eq!(
                plan.pending_statistic(),
                Some(TensorStatistic::MagnitudeHistogram)
            );
            let chunk_rows = 5;
            let chunks = ROWS.div_ceil(chunk_rows);
            let got = streamed(&plan, dtype, COLS, &input, chunk_rows);
            let mut values = vec![0f32; ROWS * COLS];
            decode_to_f32(dtype, &got, &mut values).unwrap();
            let zeros = values.iter().filter(|v| **v == 0.0).count();
            let target = (sparsity * (ROWS * COLS) as f64).round() as usize;
            assert!(
                zeros.abs_diff(target) <= chunks,
                "{dtype:?} sparsity {sparsity}: {zeros} zeros, target {target} (+-{chunks})"
            );
            // Every kept weight is at least as large as every dropped one, across chunks.
            let mut original = vec![0f32; ROWS * COLS];
            decode_to_f32(dtype, &input, &mut original).unwrap();
            let kept_min = original
                .iter()
                .zip(&values)
                .filter(|(_, v)| **v != 0.0)
                .map(|(x, _)| x.abs())
                .fold(f32::INFINITY, f32::min);
            let dropped_max = original
                .iter()
                .zip(&values)
                .filter(|(_, v)| **v == 0.0)
                .map(|(x, _)| x.abs())
                .fold(0f32, f32::max);
            // Within one BF16 magnitude bin (the cut's bin is shared by its ties).
            assert!(
                dropped_max.to_bits() >> 16 <= kept_min.to_bits() >> 16,
                "{dtype:?} {sparsity}: dropped {dropped_max} above kept {kept_min}"
            );
        }
    }
}

#[test]
fn passes_that_cannot_stream_say_so() {
    let shape = [ROWS as u64, COLS as u64];
    for kind in [
        "quantize: { method: hqq, bits: 4, granularity: tensor }",
        "lowrank: { rank: 8 }",
        "hashed: { fraction: 0.5 }",
    ] {
        // Solved over streamed passes, not a statistic and not the whole tensor at once.
        let plan = plan_of(&one(kind), DType::BF16, &shape);
        assert!(!plan.needs_whole_tensor(), "{kind}");
        assert_eq!(plan.pending_statistic(), None, "{kind}");
        assert!(
            solver::TensorSolver::for_plan(&plan, &shape)
                .unwrap()
                .is_some(),
            "{kind}"
        );
    }
    // After row pruning the factored matrix is the kept rows: still whole-tensor.
    for kind in ["lowrank: { rank: 8 }", "hashed: { fraction: 0.5 }"] {
        let yaml = one("prune: { method: rows, fraction: 0.25 }") + &one(kind);
        let plan = plan_of(&yaml, DType::BF16, &shape);
        assert!(plan.needs_whole_tensor(), "rows + {kind}");
        assert!(plan.whole_tensor_pass().is_some(), "rows + {kind}");
        assert!(
            solver::TensorSolver::for_plan(&plan, &shape)
                .unwrap()
                .is_none(),
            "rows + {kind}"
        );
    }
    for kind in [
        "quantize: { bits: 4, granularity: group, group_size: 32 }",
        "prune: { method: nm, n: 2, m: 4 }",
        "dct: { block: 16, keep: 0.5 }",
    ] {
        let plan = plan_of(&one(kind), DType::BF16, &[ROWS as u64, COLS as u64]);
        assert!(!plan.needs_whole_tensor(), "{kind}");
        assert_eq!(
            plan.pending_statistic(),
            None,
            "{kind}: chunk-local already"
        );
    }
}

#[test]
fn a_statistic_fixed_into_the_wrong_plan_is_refused() {
    let plan = plan_of(&one("fp8: { granularity: tensor }"), DType::BF16, &[4, 8]);
    let mut other = plan.clone();
    let acc = StatsAccumulator::new(TensorStatistic::ValueHistogram, 8);
    assert!(acc.fix(&mut other).is_err());
}

/// Rows and columns large enough that the HQQ sums span several of their blocks and the
/// chunks cut them anywhere.
const BIG_ROWS: usize = 200;
const BIG_COLS: usize = 256;

#[test]
fn per_tensor_hqq_streamed_is_the_whole_tensor_result_bit_for_bit() {
    for dtype in [DType::BF16, DType::F32] {
        let input = bytes_of(dtype, &weights(BIG_ROWS * BIG_COLS, 11));
        for kind in [
            "quantize: { method: hqq, bits: 4, granularity: tensor }",
            "quantize: { method: hqq, bits: 3, granularity: tensor, iterations: 5 }",
        ] {
            let plan = plan_of(&one(kind), dtype, &[BIG_ROWS as u64, BIG_COLS as u64]);
            let whole = encode_chunk(&plan, dtype, BIG_COLS, &input)
                .unwrap()
                .reconstruction;
            for chunk_rows in [1, 7, 64, BIG_ROWS] {
                let fixed = fix_streamed(plan.clone(), dtype, BIG_COLS, &input, chunk_rows);
                assert!(
                    matches!(fixed.fixed_values, Some(FixedValues::HqqTensor(_))),
                    "{kind}"
                );
                let got = streamed(&plan, dtype, BIG_COLS, &input, chunk_rows);
                assert!(
                    got == whole,
                    "{kind} {dtype:?}: {chunk_rows}-row chunks differ from the whole tensor"
                );
            }
        }
    }
}

#[test]
fn hashed_sharing_streamed_is_the_whole_tensor_result_bit_for_bit() {
    let dtype = DType::BF16;
    let input = bytes_of(dtype, &weights(BIG_ROWS * BIG_COLS, 5));
    let plan = plan_of(
        &one("hashed: { fraction: 0.1 }"),
        dtype,
        &[BIG_ROWS as u64, BIG_COLS as u64],
    );
    let whole = encode_chunk(&plan, dtype, BIG_COLS, &input)
        .unwrap()
        .reconstruction;
    for chunk_rows in [1, 7, 64, BIG_ROWS] {
        let got = streamed(&plan, dtype, BIG_COLS, &input, chunk_rows);
        assert!(got == whole, "{chunk_rows}-row chunks differ");
    }
}

#[test]
fn streamed_low_rank_does_not_depend_on_the_chunk_size_and_matches_the_whole_tensor_error() {
    let dtype = DType::BF16;
    let input = bytes_of(dtype, &weights(BIG_ROWS * BIG_COLS, 9));
    let original = {
        let mut v = vec![0f32; BIG_ROWS * BIG_COLS];
        decode_to_f32(dtype, &input, &mut v).unwrap();
        v
    };
    let sse = |recon: &[u8]| {
        let mut v = vec![0f32; original.len()];
        decode_to_f32(dtype, recon, &mut v).unwrap();
        v.iter()
            .zip(&original)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
    };
    for kind in [
        "lowrank: { rank: 16 }",
        "lowrank: { rank: 8, power_iters: 2 }",
        "lowrank: { energy: 0.5 }",
    ] {
        let plan = plan_of(&one(kind), dtype, &[BIG_ROWS as u64, BIG_COLS as u64]);
        let whole = encode_chunk(&plan, dtype, BIG_COLS, &input)
            .unwrap()
            .reconstruction;
        let reference = streamed(&plan, dtype, BIG_COLS, &input, BIG_ROWS);
        for chunk_rows in [1, 7, 64] {
            let got = streamed(&plan, dtype, BIG_COLS, &input, chunk_rows);
            assert!(got == reference, "{kind}: {chunk_rows}-row chunks differ");
        }
        // Not the same summation order as the in-memory SVD, but as good a factorization.
        let (streamed_sse, whole_sse) = (sse(&reference), sse(&whole));
        assert!(
            (streamed_sse - whole_sse).abs() <= 1e-3 * whole_sse,
            "{kind}: streamed error {streamed_sse} vs whole-tensor {whole_sse}"
        );
    }
}

#[test]
fn fixed_factors_and_buckets_write_one_frame_for_the_tensor() {
    let dtype = DType::BF16;
    let input = bytes_of(dtype, &weights(BIG_ROWS * BIG_COLS, 9));
    for kind in ["lowrank: { rank: 4 }", "hashed: { fraction: 0.05 }"] {
        let plan = plan_of(&one(kind), dtype, &[BIG_ROWS as u64, BIG_COLS as u64]);
        let fixed = fix_streamed(plan, dtype, BIG_COLS, &input, 64);
        assert!(fixed.for_chunk(0).writes_frame(), "{kind}");
        assert!(!fixed.for_chunk(64).writes_frame(), "{kind}");
        let row_bytes = BIG_COLS * dtype.size_bytes();
        let first = encode_chunk(
            &fixed.for_chunk(0),
            dtype,
            BIG_COLS,
            &input[..64 * row_bytes],
        )
        .unwrap();
        // The frame decodes to the whole tensor, the chunk's reconstruction is its rows.
        let mut decoded = Vec::new();
        crate::codec::decode_frame(&first.frame(), dtype, input.len(), &mut decoded).unwrap();
        assert_eq!(decoded.len(), input.len(), "{kind}");
        let all = streamed(&fixed, dtype, BIG_COLS, &input, 64);
        assert!(
            decoded == all,
            "{kind}: the frame decodes to the streamed reconstruction"
        );
    }
}
