//! Tests for the randomized truncated SVD: on matrices `U diag(s) V^T` with a known
//! spectrum the error matches Eckart-Young and the singular values match `s`; the error
//! always equals the discarded energy (projection identity); rank rules pick the right rank;
//! edge shapes and invalid input; determinism across thread counts; the Jacobi eigensolver.

use super::*;

/// Deterministic standard-ish normals (sum of uniforms is enough for test bases).
fn normals(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            let mut acc = 0.0;
            for _ in 0..4 {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                acc += (mix64(s) >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            }
            acc
        })
        .collect()
}

/// `k` orthonormal vectors of length `len` (rows), by modified Gram-Schmidt twice in f64.
fn orthonormal(k: usize, len: usize, seed: u64) -> Vec<f64> {
    let mut v = normals(k * len, seed);
    for i in 0..k {
        for _ in 0..2 {
            for j in 0..i {
                let d: f64 = (0..len).map(|t| v[i * len + t] * v[j * len + t]).sum();
                for t in 0..len {
                    v[i * len + t] -= d * v[j * len + t];
                }
            }
        }
        let norm: f64 = (0..len).map(|t| v[i * len + t].powi(2)).sum::<f64>().sqrt();
        for t in 0..len {
            v[i * len + t] /= norm;
        }
    }
    v
}

/// `A = U diag(s) V^T` (`m x n`) with random orthonormal U, V.
fn with_spectrum(m: usize, n: usize, s: &[f64], seed: u64) -> Vec<f32> {
    let r = s.len();
    let u = orthonormal(r, m, seed);
    let v = orthonormal(r, n, seed + 1);
    let mut a = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            a[i * n + j] = (0..r)
                .map(|t| u[t * m + i] * s[t] * v[t * n + j])
                .sum::<f64>() as f32;
        }
    }
    a
}

fn sq_err(a: &[f32], lr: &LowRank) -> f64 {
    let mut out = vec![0f32; a.len()];
    lr.reconstruct_into(&mut out);
    a.iter()
        .zip(&out)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum()
}

fn energy(a: &[f32]) -> f64 {
    a.iter().map(|&x| f64::from(x).powi(2)).sum()
}

fn decaying(len: usize, ratio: f64) -> Vec<f64> {
    (0..len).map(|i| 10.0 * ratio.powi(i as i32)).collect()
}

#[test]
fn known_spectrum_error_matches_eckart_young() {
    let (m, n) = (90, 70);
    let s = decaying(60, 0.8);
    let a = with_spectrum(m, n, &s, 7);
    for k in [1, 5, 12] {
        let lr = svd_lowrank(&a, n, RankRule::Rank(k), 3, 42).unwrap();
        assert_eq!((lr.rows, lr.cols, lr.rank), (m, n, k));
        assert_eq!((lr.left.len(), lr.right.len()), (m * k, k * n));
        let optimal: f64 = s[k..].iter().map(|x| x * x).sum();
        let err = sq_err(&a, &lr);
        assert!(
            (err - optimal).abs() <= 1e-3 * optimal + 1e-6,
            "k={k}: {err} vs {optimal}"
        );
        for (got, want) in lr.singular_values.iter().zip(&s) {
            assert!(
                (f64::from(*got) - want).abs() <= 1e-4 * s[0],
                "{got} vs {want}"
            );
        }
        assert!(lr.singular_values.windows(2).all(|w| w[0] >= w[1]));
        // Projection identity: error = total - kept energy, whatever the subspace quality.
        let kept: f64 = lr
            .singular_values
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum();
        assert!((err - (energy(&a) - kept)).abs() <= 1e-5 * energy(&a));
    }
}

#[test]
fn low_rank_plus_noise_recovers_rank() {
    let (m, n) = (64, 100);
    let mut a = with_spectrum(m, n, &[5.0, 4.0, 3.0, 2.0, 1.0], 11);
    let noise = normals(m * n, 99);
    for (x, e) in a.iter_mut().zip(&noise) {
        *x += (1e-4 * e) as f32;
    }
    let lr = svd_lowrank(&a, n, RankRule::Rank(5), 1, 3).unwrap();
    let noise_energy: f64 = energy(&a) - [25.0, 16.0, 9.0, 4.0, 1.0].iter().sum::<f64>();
    // The discarded part is (almost all of) the noise: error^2 is at most the noise energy.
    assert!(sq_err(&a, &lr) <= noise_energy.abs() * 1.01 + 1e-6);
    for (got, want) in lr.singular_values.iter().zip([5.0, 4.0, 3.0, 2.0, 1.0]) {
        assert!((f64::from(*got) - want).abs() < 1e-3);
    }
}

#[test]
fn energy_and_storage_rules_choose_the_right_rank() {
    let (m, n) = (80, 120);
    let s = decaying(80, 0.85);
    let a = with_spectrum(m, n, &s, 5);
    let total: f64 = s.iter().map(|x| x * x).sum();
    let cum = |k: usize| s[..k].iter().map(|x| x * x).sum::<f64>() / total;
    for k in [1usize, 4, 9, 20, 30] {
        let e = 0.5 * (cum(k - 1) + cum(k));
        let lr = svd_lowrank(&a, n, RankRule::Energy(e), 2, 1).unwrap();
        assert_eq!(lr.rank, k, "energy {e}");
        assert!(sq_err(&a, &lr) <= (1.0 - e) * energy(&a) * (1.0 + 1e-4));
    }
    assert_eq!(
        svd_lowrank(&a, n, RankRule::Energy(0.0), 2, 1)
            .unwrap()
            .rank,
        0
    );
    // Energy 1.0 is met up to the documented 1e-6 relative slack.
    let lr = svd_lowrank(&a, n, RankRule::Energy(1.0), 2, 1).unwrap();
    assert!(sq_err(&a, &lr) <= 2e-6 * energy(&a));
    for f in [0.0, 0.1, 0.33, 1.0, 5.0] {
        let lr = svd_lowrank(&a, n, RankRule::StorageFraction(f), 1, 1).unwrap();
        let budget = f * (m * n) as f64;
        assert!((lr.rank * (m + n)) as f64 <= budget);
        assert!(lr.rank == 80 || ((lr.rank + 1) * (m + n)) as f64 > budget);
        assert_eq!(lr.stored_elements(), lr.rank * (m + n));
    }
}

#[test]
fn edge_shapes() {
    // One row, one column: the best rank-1 approximation is exact.
    let row: Vec<f32> = (0..50).map(|i| (i as f32).sin()).collect();
    for (vals, row_len) in [(&row, 50usize), (&row, 1)] {
        let lr = svd_lowrank(vals, row_len, RankRule::Rank(3), 2, 0).unwrap();
        assert_eq!(lr.rank, 1);
        assert!(sq_err(vals, &lr) <= 1e-10 * energy(vals));
    }
    // Zero matrix.
    let zero = vec![0f32; 30];
    let lr = svd_lowrank(&zero, 5, RankRule::Rank(2), 2, 0).unwrap();
    assert_eq!(lr.rank, 2);
    assert_eq!(sq_err(&zero, &lr), 0.0);
    assert_eq!(
        svd_lowrank(&zero, 5, RankRule::Energy(0.9), 2, 0)
            .unwrap()
            .rank,
        0
    );
    // Empty matrix, and exact rank-1 with a larger requested rank.
    assert_eq!(
        svd_lowrank(&[], 4, RankRule::Rank(2), 2, 0).unwrap().rank,
        0
    );
    let outer: Vec<f32> = (0..12 * 9)
        .map(|i| ((i / 9) as f32 - 3.0) * ((i % 9) as f32 + 1.0))
        .collect();
    let lr = svd_lowrank(&outer, 9, RankRule::Rank(4), 0, 0).unwrap();
    assert!(sq_err(&outer, &lr) <= 1e-10 * energy(&outer));
    assert!(lr.singular_values[1] <= 1e-4 * lr.singular_values[0]);
}

#[test]
fn invalid_input_is_rejected() {
    assert_eq!(
        svd_lowrank(&[1.0], 0, RankRule::Rank(1), 0, 0),
        Err(LowRankError::ZeroRowLen)
    );
    assert!(matches!(
        svd_lowrank(&[1.0; 5], 2, RankRule::Rank(1), 0, 0),
        Err(LowRankError::RaggedRows { .. })
    ));
    assert_eq!(
        svd_lowrank(&[1.0, f32::NAN], 2, RankRule::Rank(1), 0, 0),
        Err(LowRankError::NonFinite { index: 1 })
    );
    for rule in [
        RankRule::Energy(1.5),
        RankRule::Energy(f64::NAN),
        RankRule::StorageFraction(-0.1),
        RankRule::StorageFraction(f64::INFINITY),
    ] {
        assert!(matches!(
            svd_lowrank(&[1.0; 4], 2, rule, 0, 0),
            Err(LowRankError::InvalidRule(_))
        ));
    }
    let lr = svd_lowrank(&[1.0; 4], 2, RankRule::Rank(1), 0, 0).unwrap();
    assert!(lr.try_reconstruct_into(&mut [0.0; 3]).is_err());
    let mut broken = lr.clone();
    broken.left.pop();
    let mut out = [0f32; 4];
    broken.reconstruct_into(&mut out);
    assert!(out.iter().all(|x| x.is_nan()));
}

#[test]
fn deterministic_across_thread_counts() {
    let a = with_spectrum(100, 75, &decaying(40, 0.9), 3);
    let run = || svd_lowrank(&a, 75, RankRule::Rank(20), 2, 9).unwrap();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(run);
    let three = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap()
        .install(run);
    assert_eq!(one, three);
    assert_eq!(one, run());
}

#[test]
fn jacobi_eigen_reconstructs() {
    let n = 17;
    let x = normals(n * n, 4);
    let mut g = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            g[i * n + j] = x[i * n + j] + x[j * n + i];
        }
    }
    let original = g.clone();
    let (values, vectors) = symmetric_eigen(&mut g, n);
    assert!(values.windows(2).all(|w| w[0] >= w[1]));
    for i in 0..n {
        for j in 0..n {
            let orth: f64 = (0..n)
                .map(|t| vectors[i * n + t] * vectors[j * n + t])
                .sum();
            assert!((orth - f64::from(u8::from(i == j))).abs() < 1e-12);
            let rebuilt: f64 = (0..n)
                .map(|t| vectors[t * n + i] * values[t] * vectors[t * n + j])
                .sum();
            assert!((rebuilt - original[i * n + j]).abs() < 1e-12);
        }
    }
}

/// Factors of `a` (`m x n`) streamed over blocks of `block` rows, fed `feed` rows at a time.
fn streamed_factors(
    a: &[f32],
    n: usize,
    rule: RankRule,
    iters: usize,
    block: usize,
    feed: usize,
) -> LowRank {
    let m = a.len() / n;
    let mut lr = streamed::StreamedLowRank::new(m, n, rule, iters, 7)
        .unwrap()
        .with_block_rows(block);
    let mut passes = 0;
    while lr.needs_pass() {
        for rows in a.chunks(feed * n) {
            lr.feed(rows).unwrap();
        }
        lr.end_pass().unwrap();
        passes += 1;
        assert!(passes < 100, "a bounded number of passes");
    }
    lr.into_factors().unwrap()
}

#[test]
fn streamed_factors_do_not_depend_on_how_rows_are_fed() {
    let (m, n) = (90, 40);
    let spectrum = decaying(40, 0.8);
    let a = with_spectrum(m, n, &spectrum, 3);
    for (rule, iters) in [
        (RankRule::Rank(6), 0),
        (RankRule::Rank(6), 2),
        (RankRule::Energy(0.9), 1),
        (RankRule::StorageFraction(0.2), 0),
    ] {
        for block in [1, 7, 32] {
            let reference = streamed_factors(&a, n, rule, iters, block, m);
            for feed in [1, 5, 13] {
                let got = streamed_factors(&a, n, rule, iters, block, feed);
                assert!(
                    got == reference,
                    "{rule:?} {iters}: block {block}, feed {feed}"
                );
            }
            let mut rows = vec![0f32; 13 * n];
            reference.reconstruct_rows(20, &mut rows).unwrap();
            let mut all = vec![0f32; m * n];
            reference.try_reconstruct_into(&mut all).unwrap();
            assert!(
                rows == all[20 * n..33 * n],
                "rows reconstruct as in the whole"
            );
        }
    }
}

#[test]
fn streamed_factors_are_as_good_as_the_in_memory_svd() {
    let (m, n) = (120, 60);
    let spectrum = decaying(60, 0.85);
    let a = with_spectrum(m, n, &spectrum, 5);
    for (rule, iters) in [
        (RankRule::Rank(8), 0),
        (RankRule::Rank(8), 2),
        (RankRule::Energy(0.95), 1),
    ] {
        let whole = svd_lowrank(&a, n, rule, iters, 7).unwrap();
        let streamed = streamed_factors(&a, n, rule, iters, 16, 9);
        assert_eq!(streamed.rank, whole.rank, "{rule:?}");
        let (es, ew) = (sq_err(&a, &streamed), sq_err(&a, &whole));
        assert!(
            (es - ew).abs() <= 1e-3 * energy(&a),
            "{rule:?}: {es} vs {ew}"
        );
    }
}

#[test]
fn streamed_rows_must_be_whole_and_complete() {
    let mut lr = streamed::StreamedLowRank::new(4, 3, RankRule::Rank(1), 0, 1).unwrap();
    assert!(lr.feed(&[1.0; 4]).is_err(), "not whole rows");
    lr.feed(&[1.0; 6]).unwrap();
    assert!(lr.end_pass().is_err(), "two rows of four");
    let mut lr = streamed::StreamedLowRank::new(2, 2, RankRule::Rank(1), 0, 1).unwrap();
    assert!(lr.feed(&[1.0, f32::NAN, 0.0, 0.0]).is_err(), "non-finite");
    assert!(streamed::StreamedLowRank::new(2, 2, RankRule::Energy(2.0), 0, 1).is_err());
}
