//! Tests for pruning masks: exact drop counts and the magnitude order, global/concatenation
//! consistency, N:M validity and optimality, and structured row/column selection.

use super::*;
use proptest::prelude::*;

/// Deterministic pseudo-random values in [-1, 1) (splitmix64).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Asserts the mask drops exactly `drop` values and every dropped |w| <= every kept |w|.
fn check_magnitude(values: &[f32], mask: &[bool], drop: usize) {
    assert_eq!(mask.len(), values.len());
    assert_eq!(mask.iter().filter(|&&k| !k).count(), drop);
    let max_dropped = values
        .iter()
        .zip(mask)
        .filter(|(_, &k)| !k)
        .map(|(x, _)| x.abs())
        .fold(f32::NEG_INFINITY, f32::max);
    let min_kept = values
        .iter()
        .zip(mask)
        .filter(|(_, &k)| k)
        .map(|(x, _)| x.abs())
        .fold(f32::INFINITY, f32::min);
    assert!(max_dropped <= min_kept, "{max_dropped} > {min_kept}");
}

#[test]
fn magnitude_drops_exact_count_and_smallest() {
    let v = noise(200_003, 1);
    for s in [0.0, 0.1, 0.5, 0.73, 0.999, 1.0] {
        let mask = magnitude_mask(&v, s);
        check_magnitude(&v, &mask, (s * v.len() as f64).round() as usize);
    }
}

#[test]
fn magnitude_ties_are_dropped_by_index() {
    // Heavy ties: many equal magnitudes of both signs, spread over several chunks.
    let v: Vec<f32> = (0..300_000)
        .map(|i| if i % 3 == 0 { -0.5 } else { 0.5 })
        .collect();
    let mask = magnitude_mask(&v, 0.4);
    let drop = 120_000;
    check_magnitude(&v, &mask, drop);
    assert!(mask[..drop].iter().all(|&k| !k));
    assert!(mask[drop..].iter().all(|&k| k));
}

#[test]
fn magnitude_handles_edge_inputs() {
    assert!(magnitude_mask(&[], 0.5).is_empty());
    assert_eq!(magnitude_mask(&[1.0, -2.0], f64::NAN), vec![true, true]);
    assert_eq!(magnitude_mask(&[1.0, -2.0], 7.0), vec![false, false]);
    // NaN counts as the largest magnitude, infinity next.
    let v = [f32::NAN, 1.0, f32::NEG_INFINITY, -0.0, 3.0];
    assert_eq!(
        magnitude_mask(&v, 0.6),
        vec![true, false, true, false, false]
    );
}

#[test]
fn global_threshold_matches_concatenation() {
    let a = noise(70_000, 2);
    let b: Vec<f32> = noise(30_001, 3).iter().map(|x| x * 3.0).collect();
    let c = vec![0.25f32; 5_000];
    let tensors: [&[f32]; 3] = [&a, &b, &c];
    let concat: Vec<f32> = [a.clone(), b.clone(), c.clone()].concat();
    for s in [0.0, 0.2, 0.5, 0.9] {
        let masks = global_masks(&tensors, s);
        let flat: Vec<bool> = masks.concat();
        assert_eq!(flat, magnitude_mask(&concat, s));
        let t = global_threshold(&tensors, s);
        for (x, &k) in concat.iter().zip(&flat) {
            if k {
                assert!(x.abs() >= t);
            } else {
                assert!(x.abs() <= t);
            }
        }
    }
}

#[test]
fn a_cut_from_merged_histograms_prunes_like_one_concatenated_tensor() {
    // Three "workers" each histogram their own tensor; the merged cut, applied per tensor,
    // drops the global target (up to one rounding per tensor) and never keeps a smaller |w|
    // than one it drops, across tensors.
    let bf16 = |v: Vec<f32>| -> Vec<f32> {
        v.iter()
            .map(|x| f32::from_bits(x.to_bits() & 0xffff_0000))
            .collect()
    };
    let a = bf16(noise(70_000, 2));
    let b = bf16(noise(30_001, 3).iter().map(|x| x * 3.0).collect());
    let c = noise(20_000, 4)
        .iter()
        .map(|x| x * 0.1)
        .collect::<Vec<f32>>(); // f32 precision
    let tensors: [&[f32]; 3] = [&a, &b, &c];
    let total: usize = tensors.iter().map(|t| t.len()).sum();
    let mut merged = vec![0u64; MAGNITUDE_BINS];
    for t in tensors {
        for (m, h) in merged.iter_mut().zip(magnitude_histogram(t)) {
            *m += h;
        }
    }
    for s in [0.0, 0.3, 0.5, 0.97, 1.0] {
        let cut = GlobalCut::from_histogram(&merged, s).unwrap();
        let masks: Vec<Vec<bool>> = tensors
            .iter()
            .map(|t| magnitude_mask(t, cut.local_sparsity(t)))
            .collect();
        let dropped = masks.iter().flatten().filter(|&&k| !k).count();
        let target = (s * total as f64).round() as usize;
        assert!(
            dropped.abs_diff(target) <= tensors.len(),
            "{s}: {dropped} vs {target}"
        );
        let t = cut.threshold();
        for (v, m) in tensors.iter().zip(&masks) {
            for (x, &keep) in v.iter().zip(m) {
                let bin = x.to_bits() & 0x7fff_0000;
                if keep {
                    assert!(bin >= t.to_bits(), "{s}: kept {x} below the cut's bin");
                } else {
                    assert!(bin <= t.to_bits(), "{s}: dropped {x} above the cut's bin");
                }
            }
        }
    }
    // Per-tensor sparsities differ (b is 3x larger), which is the point of a global target.
    let cut = GlobalCut::from_histogram(&merged, 0.5).unwrap();
    assert!(cut.local_sparsity(&b) < 0.3 && cut.local_sparsity(&c) > 0.9);
    assert_eq!(GlobalCut::from_histogram(&[0; MAGNITUDE_BINS], 0.5), None);
    assert_eq!(GlobalCut::from_histogram(&[1, 2, 3], 0.5), None);
}

/// Asserts every m-block keeps exactly n, and no dropped |w| exceeds a kept one in its block.
fn check_nm(v: &[f32], mask: &[bool], n: usize, m: usize) {
    for (b, k) in v.chunks(m).zip(mask.chunks(m)) {
        assert_eq!(k.iter().filter(|&&x| x).count(), n);
        let max_dropped = b
            .iter()
            .zip(k)
            .filter(|(_, &k)| !k)
            .map(|(x, _)| x.abs())
            .fold(0f32, f32::max);
        let min_kept = b
            .iter()
            .zip(k)
            .filter(|(_, &k)| k)
            .map(|(x, _)| x.abs())
            .fold(f32::INFINITY, f32::min);
        assert!(max_dropped <= min_kept);
    }
}

#[test]
fn nm_masks_are_valid_and_keep_largest() {
    let v = noise(64 * 48, 4);
    for (n, m) in [(2, 4), (4, 8), (1, 2), (3, 16), (5, 12), (0, 4), (4, 4)] {
        let row_len = if m == 12 { 48 } else { 64 };
        let mask = nm_mask(&v, row_len, n, m).unwrap();
        check_nm(&v, &mask, n, m);
    }
    // Ties: the lower index is kept.
    assert_eq!(
        nm_mask(&[1.0, -1.0, 1.0, 0.0], 4, 2, 4).unwrap(),
        vec![true, true, false, false]
    );
}

#[test]
fn nm_rejects_bad_shapes() {
    let v = [0f32; 12];
    assert_eq!(
        nm_mask(&v, 6, 2, 4),
        Err(PruneError::RowLenNotMultiple { row_len: 6, m: 4 })
    );
    assert_eq!(
        nm_mask(&v, 5, 1, 1),
        Err(PruneError::RaggedRows {
            len: 12,
            row_len: 5
        })
    );
    assert_eq!(
        nm_mask(&v, 4, 5, 4),
        Err(PruneError::InvalidPattern { n: 5, m: 4 })
    );
    assert_eq!(
        nm_mask(&v, 4, 0, 0),
        Err(PruneError::InvalidPattern { n: 0, m: 0 })
    );
    assert_eq!(nm_mask(&v, 0, 2, 4), Err(PruneError::ZeroRowLen));
}

#[test]
fn structured_drops_smallest_norm_rows_and_cols() {
    // Row 0: [3,0,0,0] has L1 3, L2 3; row 1: [1,1,1,1] has L1 4, L2 2; row 2 is large.
    let v = [3.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 5.0, 5.0, 5.0, 5.0];
    assert_eq!(
        row_keep(&v, 4, 0.34, Norm::L1).unwrap(),
        vec![false, true, true]
    );
    assert_eq!(
        row_keep(&v, 4, 0.34, Norm::L2).unwrap(),
        vec![true, false, true]
    );
    // Transposed: columns differ the same way.
    let t = [3.0, 1.0, 5.0, 0.0, 1.0, 5.0, 0.0, 1.0, 5.0, 0.0, -1.0, 5.0];
    assert_eq!(
        col_keep(&t, 3, 0.34, Norm::L1).unwrap(),
        vec![false, true, true]
    );
    assert_eq!(
        col_keep(&t, 3, 0.34, Norm::L2).unwrap(),
        vec![true, false, true]
    );
    assert_eq!(
        row_keep(&v, 4, 1.5, Norm::L1),
        Err(PruneError::InvalidFraction(1.5))
    );
    assert!(col_keep(&v, 5, 0.5, Norm::L1).is_err());
}

#[test]
fn structured_ranking_matches_sorted_norms() {
    let rows = 37;
    let row_len = 23;
    let v: Vec<f32> = noise(rows * row_len, 5)
        .iter()
        .enumerate()
        .map(|(i, x)| x * (1 + i / row_len) as f32 * (1 + i % row_len) as f32)
        .collect();
    for norm in [Norm::L1, Norm::L2] {
        let keep = row_keep(&v, row_len, 0.3, norm).unwrap();
        let scores = row_scores(&v, row_len, norm).unwrap();
        assert_eq!(keep.iter().filter(|&&k| !k).count(), 11);
        let max_dropped = scores
            .iter()
            .zip(&keep)
            .filter(|(_, &k)| !k)
            .map(|(s, _)| *s)
            .fold(0.0, f64::max);
        let min_kept = scores
            .iter()
            .zip(&keep)
            .filter(|(_, &k)| k)
            .map(|(s, _)| *s)
            .fold(f64::INFINITY, f64::min);
        assert!(max_dropped <= min_kept);
        let ckeep = col_keep(&v, row_len, 0.5, norm).unwrap();
        let cs = col_scores(&v, row_len, norm).unwrap();
        assert_eq!(ckeep.iter().filter(|&&k| !k).count(), 12);
        let max_dropped = cs
            .iter()
            .zip(&ckeep)
            .filter(|(_, &k)| !k)
            .map(|(s, _)| *s)
            .fold(0.0, f64::max);
        let min_kept = cs
            .iter()
            .zip(&ckeep)
            .filter(|(_, &k)| k)
            .map(|(s, _)| *s)
            .fold(f64::INFINITY, f64::min);
        assert!(max_dropped <= min_kept);
    }
}

proptest! {
    #[test]
    fn magnitude_invariants(v in proptest::collection::vec(-4.0f32..4.0, 0..400), s in 0.0f64..=1.0) {
        let mask = magnitude_mask(&v, s);
        check_magnitude(&v, &mask, (s * v.len() as f64).round() as usize);
    }

    #[test]
    fn nm_invariants(v in proptest::collection::vec(prop_oneof![Just(0.0f32), Just(1.0), -2.0f32..2.0], 0..20)
            .prop_map(|mut v| { v.truncate(v.len() / 8 * 8); v }), n in 0usize..=4) {
        let row_len = 8;
        let mask = nm_mask(&v, row_len, n, 4).unwrap();
        check_nm(&v, &mask, n, 4);
        let mask = nm_mask(&v, row_len, n, 8).unwrap();
        check_nm(&v, &mask, n, 8);
    }
}
