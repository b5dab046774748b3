//! Tests for blockwise DCT top-k: lossless at keep = 1, Parseval (error = dropped energy),
//! error monotone in keep, exact recovery of a single basis vector, the encoding layout,
//! and rejection of invalid or corrupt input.

use super::*;
use proptest::prelude::*;

fn signal(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t = i as f32 + seed as f32 * 0.37;
            (t * 0.11).sin() * 2.0
                + (t * 1.7).cos() * 0.3
                + ((i * 7919 + seed as usize) % 13) as f32 * 0.01
        })
        .collect()
}

fn decode(d: &DctSparse, len: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; len];
    d.reconstruct_into(&mut out).unwrap();
    out
}

fn sq_err(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum()
}

fn energy(a: &[f32]) -> f64 {
    a.iter().map(|&x| f64::from(x).powi(2)).sum()
}

#[test]
fn keep_all_is_lossless() {
    // 5 rows of 100 with block 32: blocks of 32, 32, 32 and a partial block of 4.
    let v = signal(500, 1);
    for block in [1, 7, 32, 100, 256] {
        let d = dct_topk(&v, 100, block, 1.0).unwrap();
        assert_eq!(d.coeffs.len(), v.len());
        let out = decode(&d, v.len());
        assert!(
            sq_err(&v, &out).sqrt() <= 1e-5 * energy(&v).sqrt(),
            "block {block}"
        );
    }
}

#[test]
fn error_is_dropped_energy_and_monotone_in_keep() {
    let v = signal(6 * 200, 2);
    let total = energy(&v);
    let mut previous = f64::INFINITY;
    for step in 0..=20 {
        let keep = f64::from(step) / 20.0;
        let d = dct_topk(&v, 200, 64, keep).unwrap();
        let err = sq_err(&v, &decode(&d, v.len()));
        // Parseval: error^2 = total - kept coefficient energy.
        let kept: f64 = d.coeffs.iter().map(|&c| f64::from(c).powi(2)).sum();
        assert!((err - (total - kept)).abs() <= 1e-5 * total, "keep {keep}");
        assert!(
            err <= previous + 1e-6 * total,
            "keep {keep}: {err} > {previous}"
        );
        previous = err;
    }
}

#[test]
fn single_basis_vector_is_recovered() {
    for (block, freq) in [(16usize, 3usize), (64, 0), (64, 63), (37, 20)] {
        let row: Vec<f32> = (0..block)
            .map(|i| {
                let s = if freq == 0 {
                    (1.0 / block as f64).sqrt()
                } else {
                    (2.0 / block as f64).sqrt()
                };
                (5.0 * s
                    * (std::f64::consts::PI * (2 * i + 1) as f64 * freq as f64
                        / (2.0 * block as f64))
                        .cos()) as f32
            })
            .collect();
        let v = [row.clone(), row.clone()].concat();
        let d = dct_topk(&v, block, block, 1.0 / block as f64).unwrap();
        assert_eq!(d.kept_per_block, vec![1, 1]);
        assert_eq!(d.positions, vec![freq as u16; 2]);
        assert!((d.coeffs[0] - 5.0).abs() < 1e-5);
        let out = decode(&d, v.len());
        for (a, b) in out.iter().zip(&v) {
            assert!((a - b).abs() <= 1e-6 * 5.0, "{a} vs {b}");
        }
    }
}

#[test]
fn layout_counts_and_bytes() {
    let v = signal(3 * 70, 3);
    let d = dct_topk(&v, 70, 32, 0.25).unwrap();
    // Blocks per row: 32 -> 8 kept, 32 -> 8, partial 6 -> round(1.5) = 2.
    assert_eq!(d.kept_per_block, [8, 8, 2].repeat(3));
    assert_eq!(d.positions.len(), 54);
    assert_eq!(d.stored_bytes(), 2 * 9 + 6 * 54);
    // keep = 0 still keeps one per block.
    let d0 = dct_topk(&v, 70, 32, 0.0).unwrap();
    assert_eq!(d0.kept_per_block, vec![1; 9]);
    assert!(dct_topk(&[], 5, 4, 0.5).unwrap().coeffs.is_empty());
}

#[test]
fn invalid_and_corrupt_input() {
    assert_eq!(dct_topk(&[1.0; 4], 0, 2, 0.5), Err(DctError::ZeroRowLen));
    assert!(matches!(
        dct_topk(&[1.0; 5], 2, 2, 0.5),
        Err(DctError::RaggedRows { .. })
    ));
    assert_eq!(
        dct_topk(&[1.0; 4], 2, 0, 0.5),
        Err(DctError::InvalidBlock(0))
    );
    assert_eq!(
        dct_topk(&[1.0; 4], 2, MAX_BLOCK + 1, 0.5),
        Err(DctError::InvalidBlock(MAX_BLOCK + 1))
    );
    assert!(matches!(
        dct_topk(&[1.0; 4], 2, 2, f64::NAN),
        Err(DctError::InvalidKeep(_))
    ));
    assert_eq!(
        dct_topk(&[1.0, f32::INFINITY], 2, 2, 0.5),
        Err(DctError::NonFinite { index: 1 })
    );
    let good = dct_topk(&signal(16, 4), 8, 4, 0.5).unwrap();
    let mut out = vec![0f32; 16];
    assert!(good.reconstruct_into(&mut out[..8]).is_err());
    let mut bad = good.clone();
    bad.positions.swap(0, 1);
    assert!(bad.reconstruct_into(&mut out).is_err());
    let mut bad = good.clone();
    bad.positions[1] = 4;
    assert!(bad.reconstruct_into(&mut out).is_err());
    let mut bad = good.clone();
    bad.coeffs.pop();
    assert!(bad.reconstruct_into(&mut out).is_err());
    let mut bad = good.clone();
    bad.kept_per_block[0] = 5;
    assert!(bad.reconstruct_into(&mut out).is_err());
    assert!(good.reconstruct_into(&mut out).is_ok());
}

proptest! {
    #[test]
    fn parseval_holds(v in proptest::collection::vec(-10.0f32..10.0, 1..120), block in 1usize..40, keep in 0.0f64..=1.0) {
        let row_len = v.len();
        let d = dct_topk(&v, row_len, block, keep).unwrap();
        let err = sq_err(&v, &decode(&d, v.len()));
        let kept: f64 = d.coeffs.iter().map(|&c| f64::from(c).powi(2)).sum();
        prop_assert!((err - (energy(&v) - kept)).abs() <= 1e-4 * energy(&v) + 1e-9);
    }
}
