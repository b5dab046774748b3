//! Tests for FP8 E4M3FN: exhaustive decode/encode round trip, agreement with a brute-force
//! nearest-even reference, ties, saturation, the `2^-4` relative error bound after scaling,
//! and odd input.

use super::*;
use crate::quantize::tests::TestRng;
use proptest::prelude::*;

/// Brute force: the finite code nearest to `x`, ties to the even code, beyond 448 saturating.
fn reference_encode(x: f32) -> u8 {
    if x.is_nan() {
        return E4M3_NAN;
    }
    let x = f64::from(x);
    let mut best = 0u8;
    let mut best_d = f64::INFINITY;
    for b in 0u8..=0x7E {
        let v = f64::from(e4m3_to_f32(b));
        let d = (x.abs() - v).abs();
        if d < best_d || (d == best_d && b % 2 == 0) {
            best = b;
            best_d = d;
        }
    }
    if x.is_sign_negative() {
        best | 0x80
    } else {
        best
    }
}

#[test]
fn exhaustive_round_trip_of_all_codes() {
    for b in 0..=255u8 {
        let v = e4m3_to_f32(b);
        if b & 0x7F == 0x7F {
            assert!(v.is_nan(), "{b:#x}");
            assert_eq!(e4m3_from_f32(v), E4M3_NAN);
        } else {
            assert!(v.is_finite() && v.abs() <= 448.0, "{b:#x}");
            assert_eq!(e4m3_from_f32(v), b, "{b:#x} -> {v}");
            assert_eq!(E4M3_TABLE[usize::from(b)].to_bits(), v.to_bits());
        }
    }
    assert_eq!(e4m3_to_f32(0x7E), 448.0);
    assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
    assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
    assert_eq!(e4m3_to_f32(0x38), 1.0);
}

#[test]
fn ties_round_to_even_and_large_values_saturate() {
    // Normal range: 1 + 1/16 is halfway between 1.0 (m=0) and 1.125 (m=1).
    assert_eq!(e4m3_to_f32(e4m3_from_f32(1.0625)), 1.0);
    assert_eq!(e4m3_to_f32(e4m3_from_f32(1.1875)), 1.25);
    assert_eq!(e4m3_to_f32(e4m3_from_f32(-1.1875)), -1.25);
    // Just off the tie goes to the nearer side.
    assert_eq!(e4m3_to_f32(e4m3_from_f32(1.062_500_1)), 1.125);
    // Subnormal ties: 0.5 and 2.5 units of 2^-9.
    let unit = 2f32.powi(-9);
    assert_eq!(e4m3_from_f32(0.5 * unit), 0);
    assert_eq!(e4m3_from_f32(1.5 * unit), 2);
    assert_eq!(e4m3_from_f32(2.5 * unit), 2);
    // Rounding up out of the subnormals into the first normal, and across a binade.
    assert_eq!(e4m3_from_f32(7.5 * unit), 0x08);
    assert_eq!(e4m3_to_f32(e4m3_from_f32(1.9375)), 2.0);
    // 464 is halfway between 448 and the (NaN) 480 slot: saturate.
    for x in [448.0f32, 449.0, 464.0, 470.0, 1e6, f32::MAX, f32::INFINITY] {
        assert_eq!(e4m3_from_f32(x), 0x7E, "{x}");
        assert_eq!(e4m3_from_f32(-x), 0xFE, "{x}");
    }
    assert_eq!(e4m3_from_f32(f32::NAN), 0x7F);
    assert_eq!(e4m3_from_f32(-f32::NAN), 0x7F);
    assert_eq!(e4m3_from_f32(-0.0), 0x80);
    assert_eq!(e4m3_from_f32(1e-30), 0);
}

#[test]
fn encoder_matches_brute_force_nearest_even() {
    let mut rng = TestRng::new(1);
    let mut xs: Vec<f32> = (0..20_000)
        .map(|_| {
            let mag = 2f64.powf(rng.uniform() * 22.0 - 12.0);
            let sign = if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
            (sign * mag) as f32
        })
        .collect();
    // Every midpoint between adjacent codes, and its neighbouring floats.
    for b in 0u8..0x7E {
        let mid = 0.5 * (e4m3_to_f32(b) + e4m3_to_f32(b + 1));
        xs.extend([
            mid,
            f32::from_bits(mid.to_bits() + 1),
            f32::from_bits(mid.to_bits() - 1),
        ]);
    }
    for x in xs {
        assert_eq!(e4m3_from_f32(x), reference_encode(x), "{x}");
    }
}

proptest! {
    #[test]
    fn relative_error_bound_after_scaling(
        rows in 1usize..4,
        row_len in 1usize..64,
        per_channel in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = TestRng::new(seed);
        let values: Vec<f32> = (0..rows * row_len)
            .map(|_| (rng.gaussian() * 2f64.powf(rng.uniform() * 8.0 - 4.0)) as f32)
            .collect();
        let q = fp8_e4m3_codes(per_channel, &values, row_len).unwrap();
        let mut out = vec![0.0; values.len()];
        q.dequantize_into(&mut out);
        prop_assert_eq!(q.scales.len(), if per_channel { rows } else { 1 });
        for (i, (&x, &y)) in values.iter().zip(&out).enumerate() {
            let scale = q.scales[if per_channel { i / row_len } else { 0 }];
            let scaled = (x / scale).abs();
            if scaled >= 2f32.powi(-6) {
                // Half an ulp of a 4-bit significand, plus f32 rounding of x/s and q*s.
                let tol = x.abs() * (2f32.powi(-4) + 4.0 * f32::EPSILON);
                prop_assert!((x - y).abs() <= tol, "x={} y={} s={}", x, y, scale);
            } else {
                let tol = scale * 2f32.powi(-10) * (1.0 + 1e-6) + 4.0 * f32::EPSILON * x.abs();
                prop_assert!((x - y).abs() <= tol, "x={} y={} s={}", x, y, scale);
            }
            prop_assert!(scaled <= 448.0 * (1.0 + 1e-6));
        }
    }
}

#[test]
fn odd_input_does_not_panic() {
    assert_eq!(
        fp8_e4m3_codes(true, &[1.0], 0),
        Err(QuantizeError::ZeroRowLen)
    );
    assert_eq!(
        fp8_e4m3_codes(false, &[1.0; 3], 2),
        Err(QuantizeError::RaggedRows { len: 3, row_len: 2 })
    );
    let empty = fp8_e4m3_codes(false, &[], 4).unwrap();
    assert!(empty.bytes.is_empty() && empty.scales.is_empty());
    empty.dequantize_into(&mut []);
    for per_channel in [true, false] {
        let zeros = fp8_e4m3_codes(per_channel, &[0.0; 6], 3).unwrap();
        let mut out = vec![1.0; 6];
        zeros.dequantize_into(&mut out);
        assert_eq!(out, vec![0.0; 6]);
        let odd = [f32::NAN, f32::INFINITY, 2.0, -f32::INFINITY, 1e-44, -3.0];
        let q = fp8_e4m3_codes(per_channel, &odd, 3).unwrap();
        let mut out = vec![0.0; 6];
        q.dequantize_into(&mut out);
        assert!(out[0].is_nan());
        // Infinities are ignored by the absmax and saturate to the row's +-448 * scale.
        assert_eq!(out[1], 448.0 * q.scales[0]);
        assert_eq!(out[3], -448.0 * q.scales[q.scales.len() - 1]);
        assert!((out[2] - 2.0).abs() <= 2.0 / 16.0, "{out:?}");
        assert!((out[5] + 3.0).abs() <= 3.0 / 16.0, "{out:?}");
        // A row of nothing but non-finite values gets scale 0.
        let q = fp8_e4m3_codes(per_channel, &[f32::INFINITY, f32::NAN], 2).unwrap();
        assert_eq!(q.scales, vec![0.0]);
        // A row holding only a subnormal still round-trips closely.
        let tiny = fp8_e4m3_codes(per_channel, &[1e-44, 0.0], 2).unwrap();
        let mut t = vec![0.0; 2];
        tiny.dequantize_into(&mut t);
        assert!((t[0] - 1e-44).abs() <= 1e-44 * 0.07, "{t:?}");
    }
}

#[test]
fn long_rows_match_sequential_encoding() {
    let mut rng = TestRng::new(4);
    let values: Vec<f32> = (0..70_001).map(|_| rng.laplace() as f32).collect();
    let q = fp8_e4m3_codes(false, &values, 70_001).unwrap();
    let scale = q.scales[0];
    for (x, &b) in values.iter().zip(&q.bytes) {
        assert_eq!(b, e4m3_from_f32(x / scale));
    }
    let mut out = vec![0.0; values.len()];
    q.dequantize_into(&mut out);
    for (&y, &b) in out.iter().zip(&q.bytes) {
        assert_eq!(y, e4m3_to_f32(b) * scale);
    }
}

#[test]
fn scaled_rows_decode_block_by_block() {
    // 5 rows x 7 columns in 2x3 blocks (a ragged last block both ways), from row 3 on.
    let (rows, cols, block) = (5usize, 7usize, [2u64, 3]);
    let first_row = 3u64;
    let grid_cols = cols.div_ceil(3);
    let grid_rows = (first_row as usize + rows).div_ceil(2);
    let scales: Vec<f32> = (0..grid_rows * grid_cols).map(|i| 0.5 + i as f32).collect();
    let raw: Vec<u8> = (0..rows * cols).map(|i| (i * 37 % 126) as u8).collect();
    let mut out = vec![0f32; raw.len()];
    decode_scaled_rows(&raw, first_row, cols, &scales, grid_cols, block, &mut out).unwrap();
    for (i, (&b, &v)) in raw.iter().zip(&out).enumerate() {
        let (r, c) = (first_row as usize + i / cols, i % cols);
        assert_eq!(
            v,
            e4m3_to_f32(b) * scales[(r / 2) * grid_cols + c / 3],
            "{i}"
        );
    }
    // Too few scales or ragged rows are errors, not panics.
    assert!(decode_scaled_rows(
        &raw,
        first_row,
        cols,
        &scales[..4],
        grid_cols,
        block,
        &mut out
    )
    .is_err());
    assert!(
        decode_scaled_rows(&raw[..6], 0, cols, &scales, grid_cols, block, &mut out[..6]).is_err()
    );
}
