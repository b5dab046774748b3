//! Tests for the codebook quantizers: k-means beats uniform RTN on heavy-tailed data, its
//! error does not grow with iterations, codes are nearest levels, few distinct values are
//! exact; NF4 meets its half-gap error bound; odd input never panics.

use super::*;
use crate::quantize::tests::{rel_fro, sample, sq_err, TestRng};
use crate::quantize::{quantize_dequantize_rows, QuantizeError};
use crate::recipe::QuantizeConfig;
use proptest::prelude::*;

fn dequant(c: &CodebookCodes) -> Vec<f32> {
    let mut out = vec![f32::NAN; c.codes.len()];
    c.dequantize_into(&mut out);
    out
}

#[test]
fn kmeans_beats_per_tensor_rtn_on_heavy_tailed_data() {
    for dist in ["laplace", "student-t3"] {
        let x = sample(dist, 1 << 15, 0.02, 2);
        for bits in [2u8, 3, 4, 8] {
            let k = kmeans_codes(bits, &x, 30).unwrap();
            assert_eq!(k.codebook.len(), 1 << bits);
            let e_km = rel_fro(&x, &dequant(&k));
            let mut r = x.clone();
            let cfg = QuantizeConfig {
                bits,
                symmetric: false,
                granularity: Granularity::Tensor,
                scale_dtype: crate::recipe::ScaleDtype::F16,
            };
            quantize_dequantize_rows(&cfg, &mut r, x.len());
            let e_rtn = rel_fro(&x, &r);
            eprintln!("{dist:>10} {bits} bits: k-means {e_km:.5}  rtn per-tensor asym {e_rtn:.5}");
            assert!(e_km < e_rtn, "{dist} {bits}");
        }
    }
}

#[test]
fn kmeans_error_does_not_increase_with_iterations() {
    let x = sample("student-t3", 1 << 14, 1.0, 8);
    for bits in [2u8, 3, 4] {
        let errors: Vec<f64> = (0..12)
            .map(|it| sq_err(&x, &dequant(&kmeans_codes(bits, &x, it).unwrap())))
            .collect();
        eprintln!("{bits} bits: {errors:?}");
        for w in errors.windows(2) {
            // Exact for the binned objective on BF16 data; the final rounding of levels to
            // f16 may move the error by a hair.
            assert!(w[1] <= w[0] * (1.0 + 1e-4), "{bits} bits: {errors:?}");
        }
        assert!(
            errors[11] < errors[0] * 0.999,
            "{bits} bits: Lloyd did nothing"
        );
    }
}

#[test]
fn codes_are_the_nearest_levels() {
    // General f32 data (not BF16), so bins straddle midpoints and use the slow path.
    let mut rng = TestRng::new(12);
    let x: Vec<f32> = (0..20_000).map(|_| rng.laplace() as f32).collect();
    for bits in [2u8, 5] {
        let k = kmeans_codes(bits, &x, 10).unwrap();
        assert!(k.codebook.windows(2).all(|w| w[0] <= w[1]));
        for &l in &k.codebook {
            assert_eq!(f16::from_f32(l).to_f32(), l);
        }
        for (&v, &c) in x.iter().zip(&k.codes) {
            let d = (v - k.codebook[usize::from(c)]).abs();
            for &l in &k.codebook {
                assert!(d <= (v - l).abs(), "{v}: code {c} ({d}) but level {l}");
            }
        }
    }
}

#[test]
fn few_distinct_values_are_exact() {
    let x: Vec<f32> = (0..1000).map(|i| [-1.5f32, 0.25, 2.0][i % 3]).collect();
    let k = kmeans_codes(2, &x, 5).unwrap();
    assert_eq!(dequant(&k), x);
    let one = kmeans_codes(4, &[3.0; 10], 5).unwrap();
    assert_eq!(dequant(&one), vec![3.0; 10]);
}

#[test]
fn kmeans_is_deterministic_across_thread_counts() {
    let x = sample("laplace", 300_001, 1.0, 5);
    let a = kmeans_codes(4, &x, 10).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let b = pool.install(|| kmeans_codes(4, &x, 10).unwrap());
    assert_eq!(a, b);
}

#[test]
fn kmeans_odd_input_does_not_panic() {
    assert_eq!(kmeans_codes(1, &[1.0], 3), Err(QuantizeError::Bits(1)));
    assert_eq!(kmeans_codes(9, &[1.0], 3), Err(QuantizeError::Bits(9)));
    let empty = kmeans_codes(3, &[], 3).unwrap();
    assert_eq!(empty.codebook.len(), 8);
    assert!(empty.codes.is_empty());
    let zeros = kmeans_codes(3, &[0.0; 5], 3).unwrap();
    assert_eq!(dequant(&zeros), vec![0.0; 5]);
    let nan = kmeans_codes(2, &[f32::NAN; 3], 3).unwrap();
    assert_eq!(dequant(&nan), vec![0.0; 3]);
    let mut odd = vec![f32::NAN, f32::INFINITY, -f32::INFINITY, 1e38, -1e-40, 0.0];
    odd.extend((0..100).map(|i| i as f32 * 0.01));
    let k = kmeans_codes(3, &odd, 10).unwrap();
    let d = dequant(&k);
    let (lo, hi) = (k.codebook[0], k.codebook[7]);
    assert_eq!(d[1], hi);
    assert_eq!(d[2], lo);
    assert_eq!(d[3], 65504.0); // beyond f16: the level saturates
    assert!(d[0].abs() <= d.iter().fold(f32::INFINITY, |m, v| m.min(v.abs())));
}

/// Largest distance between adjacent stored NF4 levels.
fn nf4_max_gap() -> f32 {
    nf4_codebook()
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(0.0, f32::max)
}

fn arb_granularity() -> impl Strategy<Value = Granularity> {
    prop_oneof![
        Just(Granularity::Channel),
        Just(Granularity::Tensor),
        (1usize..100).prop_map(Granularity::Group),
    ]
}

proptest! {
    #[test]
    fn nf4_error_is_at_most_half_the_largest_gap(
        gran in arb_granularity(),
        rows in 1usize..4,
        row_len in 1usize..150,
        seed in any::<u64>(),
    ) {
        let mut rng = TestRng::new(seed);
        let x: Vec<f32> = (0..rows * row_len).map(|_| rng.student_t(3) as f32).collect();
        let q = nf4_codes(gran, &x, row_len).unwrap();
        let d = dequant(&q);
        let half_gap = nf4_max_gap() / 2.0;
        let group_len = q.group_len;
        let per_row = q.row_len.div_ceil(group_len);
        for (i, (&v, &y)) in x.iter().zip(&d).enumerate() {
            let g = (i / q.row_len) * per_row + (i % q.row_len) / group_len;
            let s = q.scales[g];
            prop_assert!(s >= v.abs() && f16::from_f32(s).to_f32() == s);
            let tol = s * half_gap * (1.0 + 1e-6) + 2.0 * f32::EPSILON * s;
            prop_assert!((v - y).abs() <= tol, "x={} y={} s={}", v, y, s);
        }
    }
}

#[test]
fn nf4_levels_and_layout() {
    let cb = nf4_codebook();
    assert_eq!(cb.len(), 16);
    assert_eq!((cb[0], cb[7], cb[15]), (-1.0, 0.0, 1.0));
    for (&stored, &exact) in cb.iter().zip(&NF4_LEVELS) {
        assert!((stored - exact).abs() <= exact.abs() * 2f32.powi(-11));
    }
    let x = sample("gaussian", 4 * 130, 1.0, 3);
    let q = nf4_codes(Granularity::Group(64), &x, 130).unwrap();
    assert_eq!((q.row_len, q.group_len, q.scales.len()), (130, 64, 12));
    assert!(q.codes.iter().all(|&c| c < 16));
    // NF4 is tuned for Gaussian data: better than symmetric int4 RTN at the same group size.
    let e = rel_fro(&x, &dequant(&q));
    let mut r = x.clone();
    let cfg = QuantizeConfig {
        bits: 4,
        symmetric: true,
        granularity: Granularity::Group(64),
        scale_dtype: crate::recipe::ScaleDtype::F16,
    };
    quantize_dequantize_rows(&cfg, &mut r, 130);
    let e_rtn = rel_fro(&x, &r);
    eprintln!("gaussian g64: nf4 {e:.5} rtn-sym int4 {e_rtn:.5}");
    assert!(e < e_rtn, "{e} vs {e_rtn}");
}

#[test]
fn nf4_odd_input_does_not_panic() {
    assert_eq!(
        nf4_codes(Granularity::Channel, &[1.0; 3], 0),
        Err(QuantizeError::ZeroRowLen)
    );
    assert_eq!(
        nf4_codes(Granularity::Group(2), &[1.0; 3], 2),
        Err(QuantizeError::RaggedRows { len: 3, row_len: 2 })
    );
    assert!(nf4_codes(Granularity::Tensor, &[], 2)
        .unwrap()
        .codes
        .is_empty());
    for gran in [
        Granularity::Group(3),
        Granularity::Channel,
        Granularity::Tensor,
    ] {
        let zeros = nf4_codes(gran, &[0.0; 6], 3).unwrap();
        assert_eq!(dequant(&zeros), vec![0.0; 6]);
        let odd = [f32::NAN, f32::INFINITY, -2.0, 1e38, -1e38, 1e-44];
        let q = nf4_codes(gran, &odd, 3).unwrap();
        let d = dequant(&q);
        assert_eq!(d[0], 0.0);
        assert!(d[1] > 0.0 && d[1].is_finite());
    }
}
