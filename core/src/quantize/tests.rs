//! Tests for RTN quantization: exact agreement with a straightforward reference, the error
//! bound on heavy-tailed data, code ranges, and the bits-per-weight accounting.

use super::*;
use proptest::prelude::*;

fn cfg(bits: u8, symmetric: bool, granularity: Granularity) -> QuantizeConfig {
    QuantizeConfig {
        bits,
        symmetric,
        granularity,
        scale_dtype: crate::recipe::ScaleDtype::F16,
    }
}

/// Independent reference written straight from the spec, using `f32::round` and `f32::min/max`.
fn reference_group(cfg: &QuantizeConfig, g: &[f32]) -> (f32, Vec<f32>) {
    let up = |scale: f32| {
        let h = f16::from_f32(scale);
        let s = if h.to_f32() < scale {
            f16::from_bits(h.to_bits() + 1).to_f32()
        } else {
            h.to_f32()
        };
        if s == 0.0 {
            f16::from_bits(1).to_f32()
        } else if s.is_infinite() {
            scale
        } else {
            s
        }
    };
    let b = i32::from(cfg.bits);
    if cfg.symmetric {
        let qmax = ((1 << (b - 1)) - 1) as f32;
        let absmax = g.iter().fold(0f32, |m, x| m.max(x.abs()));
        if absmax == 0.0 {
            return (0.0, vec![0.0; g.len()]);
        }
        // compressed-tensors' rule: absmax maps to qmax + 1/2.
        let s = up(absmax / (qmax + 0.5));
        let out = g
            .iter()
            // `+ 0.0`: codes are stored offset by 2^(b-1), so a zero code is +0.0, not -0.0.
            .map(|x| ((x / s).round().clamp(-qmax - 1.0, qmax) + 0.0) * s)
            .collect();
        (s, out)
    } else {
        let qmax = ((1 << b) - 1) as f32;
        let mn = g.iter().fold(0f32, |m, x| m.min(*x));
        let mx = g.iter().fold(0f32, |m, x| m.max(*x));
        if mx - mn == 0.0 {
            return (0.0, vec![0.0; g.len()]);
        }
        let s = up((mx - mn) / qmax);
        let zero = (-mn / s).round().clamp(0.0, qmax);
        let out = g
            .iter()
            .map(|x| (((x / s).round() + zero).clamp(0.0, qmax) - zero) * s)
            .collect();
        (s, out)
    }
}

fn reference_rows(cfg: &QuantizeConfig, rows: &[f32], row_len: usize) -> (Vec<f32>, Vec<f32>) {
    let (row_len, group) = match cfg.granularity {
        Granularity::Channel => (row_len, row_len),
        Granularity::Group(g) => (row_len, g.min(row_len)),
        Granularity::Tensor => (rows.len(), rows.len()),
    };
    let (mut out, mut scales) = (Vec::new(), Vec::new());
    for row in rows.chunks(row_len) {
        for g in row.chunks(group) {
            let (s, q) = reference_group(cfg, g);
            out.extend(q);
            scales.extend(std::iter::repeat_n(s, g.len()));
        }
    }
    (out, scales)
}

#[test]
fn fast_round_matches_std_round() {
    let mut ys = vec![
        0.5f32,
        1.5,
        2.5,
        -0.5,
        -1.5,
        0.49999997,
        -0.49999997,
        127.5,
        -128.5,
        255.49998,
    ];
    for i in 0..200_000u32 {
        let y = (i as f32) * 0.001_3 - 130.0;
        ys.push(y);
        ys.push(f32::from_bits(y.to_bits() + 1));
        ys.push(f32::from_bits(y.to_bits().wrapping_sub(1)));
    }
    for k in -300..300 {
        let half = k as f32 + 0.5;
        ys.extend([
            half,
            f32::from_bits(half.to_bits() + 1),
            f32::from_bits(half.to_bits() - 1),
        ]);
    }
    ys.extend([
        4_194_303.5,
        -4_194_304.5,
        8_388_607.0,
        0.0,
        -0.0,
        1e-40,
        -1e-40,
    ]);
    for y in ys.into_iter().filter(|y| !y.is_nan()) {
        assert_eq!(round_half_away(y).to_bits(), y.round().to_bits(), "{y}");
    }
    assert!(round_half_away(f32::NAN).is_nan());
}

#[test]
fn f16_round_up_never_below() {
    for s in [1e-9f32, 3.3e-5, 0.1, 1.0 / 3.0, 7.0, 65504.0, 65519.0, 1e6] {
        let u = f16_round_up(s);
        assert!(u >= s, "{s} -> {u}");
    }
    assert_eq!(f16_round_up(0.5), 0.5);
    assert_eq!(f16_round_up(1e6), 1e6); // beyond f16: exact f32 kept
}

#[test]
fn zero_groups_give_zeros() {
    for sym in [true, false] {
        let c = cfg(4, sym, Granularity::Group(4));
        let mut v = vec![0.0, -0.0, 0.0, 0.0, 1.0, 2.0];
        quantize_dequantize_rows(&c, &mut v, 6);
        assert_eq!(&v[..4], &[0.0; 4]);
        let (s, _, codes) = quantize_group_codes(&c, &[0.0; 3]);
        assert_eq!(s, 0.0);
        assert_eq!(codes.len(), 3);
    }
}

#[test]
fn extreme_values_do_not_break_the_bound() {
    for sym in [true, false] {
        let c = cfg(8, sym, Granularity::Channel);
        let orig = vec![3.3895e38, -3.3895e38, 1.0, 1e-42, -3e38];
        let mut v = orig.clone();
        quantize_dequantize_rows(&c, &mut v, orig.len());
        assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
        let tiny = vec![1e-44f32, -3e-45, 0.0];
        let mut t = tiny.clone();
        quantize_dequantize_rows(&c, &mut t, 3);
        assert!(t.iter().zip(&tiny).all(|(a, b)| (a - b).abs() < 1e-7));
    }
    // Non-finite input must not panic.
    let mut v = vec![f32::NAN, f32::INFINITY, 1.0, -f32::INFINITY];
    quantize_dequantize_rows(&cfg(4, true, Granularity::Group(2)), &mut v, 4);
    quantize_dequantize_rows(&cfg(4, false, Granularity::Group(3)), &mut v, 4);
}

#[test]
fn bits_per_weight_accounting() {
    let g128 = cfg(4, true, Granularity::Group(128));
    assert_eq!(bits_per_weight(&g128, 4096), 4.125);
    // 130 weights -> 2 groups of scales.
    assert_eq!(bits_per_weight(&g128, 130), 4.0 + 32.0 / 130.0);
    // A group larger than the row is one group per row.
    assert_eq!(bits_per_weight(&g128, 64), 4.25);
    let asym = cfg(4, false, Granularity::Group(128));
    assert_eq!(bits_per_weight(&asym, 4096), 4.0 + 20.0 / 128.0);
    let ch = cfg(8, true, Granularity::Channel);
    assert_eq!(bits_per_weight(&ch, 1024), 8.0 + 16.0 / 1024.0);
    assert_eq!(bits_per_weight(&ch, 0), 8.0);
}

#[test]
fn row_len_of_shapes() {
    assert_eq!(row_len_of(&[]), 1);
    assert_eq!(row_len_of(&[7]), 7);
    assert_eq!(row_len_of(&[3, 4, 5]), 20);
    assert_eq!(row_len_of(&[3, 0]), 0);
    assert_eq!(row_len_of(&[1, u64::MAX, 2]), u64::MAX);
}

#[test]
fn result_is_independent_of_thread_count() {
    let c = cfg(4, false, Granularity::Group(32));
    let orig: Vec<f32> = (0..64 * 1024)
        .map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0)
        .collect();
    let mut a = orig.clone();
    quantize_dequantize_rows(&c, &mut a, 64);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut b = orig;
    pool.install(|| quantize_dequantize_rows(&c, &mut b, 64));
    assert_eq!(a, b);
}

/// Heavy-tailed values: a mantissa times a power of ten spanning many magnitudes.
fn heavy_tailed() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -1.0f32..1.0,
        1 => (-1.0f32..1.0, -30i32..30).prop_map(|(m, e)| m * 10f32.powi(e)),
        1 => Just(0.0f32),
    ]
}

fn arb_case() -> impl Strategy<Value = (QuantizeConfig, usize, Vec<f32>)> {
    let gran = prop_oneof![
        Just(Granularity::Channel),
        Just(Granularity::Tensor),
        (1usize..80).prop_map(Granularity::Group)
    ];
    (2u8..=8, any::<bool>(), gran, 1usize..100, 1usize..5).prop_flat_map(
        |(b, s, g, row_len, rows)| {
            let c = cfg(b, s, g);
            (
                Just(c),
                Just(row_len),
                prop::collection::vec(heavy_tailed(), row_len * rows),
            )
        },
    )
}

proptest! {
    #[test]
    fn matches_reference_and_respects_bound((c, row_len, orig) in arb_case()) {
        let mut got = orig.clone();
        quantize_dequantize_rows(&c, &mut got, row_len);
        let (want, scales) = reference_rows(&c, &orig, row_len);
        for i in 0..orig.len() {
            prop_assert_eq!(got[i].to_bits(), want[i].to_bits(), "element {}", i);
            let tol = scales[i] * 0.5 * (1.0 + 1e-5) + 4.0 * f32::EPSILON * orig[i].abs() + 1e-30;
            prop_assert!((orig[i] - got[i]).abs() <= tol, "x={} y={} s={}", orig[i], got[i], scales[i]);
        }
    }

    #[test]
    fn codes_in_range_and_dequantize_consistently(
        (c, _, g) in arb_case(),
    ) {
        let (scale, zero, codes) = quantize_group_codes(&c, &g);
        let b = u32::from(c.bits);
        let (lo, hi) = if c.symmetric {
            (-(1i32 << (b - 1)), (1i32 << (b - 1)) - 1)
        } else {
            (0, (1i32 << b) - 1)
        };
        prop_assert!((lo.max(0)..=hi).contains(&zero));
        let mut dq = g.clone();
        let len = g.len();
        quantize_dequantize_rows(&QuantizeConfig { granularity: Granularity::Channel, ..c }, &mut dq, len);
        for (i, q) in codes.iter().enumerate() {
            prop_assert!((lo..=hi).contains(q), "code {} out of [{}, {}]", q, lo, hi);
            // `==` rather than bits: a code of 0 may dequantize to -0.0.
            prop_assert!((*q - zero) as f32 * scale == dq[i], "{} vs {}", (*q - zero) as f32 * scale, dq[i]);
        }
    }
}

proptest! {
    /// `rtn_codes` + `dequantize_into` is the in-place quantizer, bit for bit, at every
    /// granularity; codes fit in `bits` and the layout has one (scale, zero) per group.
    #[test]
    fn rtn_codes_dequantize_bit_exactly((c, row_len, orig) in arb_case()) {
        let codes = rtn_codes(&c, &orig, row_len).unwrap();
        let mut want = orig.clone();
        quantize_dequantize_rows(&c, &mut want, row_len);
        let mut got = vec![f32::NAN; orig.len()];
        codes.dequantize_into(&mut got);
        for i in 0..orig.len() {
            prop_assert_eq!(got[i].to_bits(), want[i].to_bits(), "element {}", i);
            prop_assert!(u32::from(codes.codes[i]) < 1u32 << c.bits);
        }
        let rows = orig.len() / codes.row_len;
        prop_assert_eq!(codes.scales.len(), rows * codes.groups_per_row());
        prop_assert_eq!(codes.zeros.len(), codes.scales.len());
        if c.granularity == Granularity::Tensor {
            prop_assert_eq!(codes.scales.len(), 1);
        }
    }
}

/// Heavy-tailed values mixed with NaN (with payloads), infinities, signed zeros, subnormals and
/// values near `f32::MAX`.
fn hostile() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => heavy_tailed(),
        1 => Just(f32::NAN),
        1 => (any::<u32>()).prop_map(|b| f32::from_bits(b | 0x7F80_0001)),
        1 => prop_oneof![Just(f32::INFINITY), Just(f32::NEG_INFINITY), Just(-0.0f32)],
        1 => (any::<u32>()).prop_map(|b| f32::from_bits(b & 0x807F_FFFF)),
        1 => (0.5f32..1.0).prop_map(|m| m * f32::MAX),
    ]
}

proptest! {
    /// The fused `rtn_codes_dequantize` gives exactly `rtn_codes` and what `dequantize_into`
    /// writes from it, on any input (NaN, infinities and overflowing scales included).
    #[test]
    fn fused_codes_and_dequantize_match_the_two_steps(
        (c, row_len, orig) in arb_case().prop_flat_map(|(c, row_len, orig)| {
            let n = orig.len();
            (Just(c), Just(row_len), prop::collection::vec(hostile(), n))
        }),
    ) {
        let want = rtn_codes(&c, &orig, row_len).unwrap();
        let mut want_values = vec![f32::NAN; orig.len()];
        want.dequantize_into(&mut want_values);
        let mut got_values = orig.clone();
        let got = rtn_codes_dequantize(&c, &mut got_values, row_len).unwrap();
        prop_assert_eq!(&got.codes, &want.codes);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got.scales), bits(&want.scales));
        prop_assert_eq!(bits(&got.zeros), bits(&want.zeros));
        prop_assert_eq!(bits(&got_values), bits(&want_values));
    }
}

#[test]
fn nan_gets_code_zero_in_a_scaled_group() {
    // As the saturating `NaN as u8` of the scalar formula did; an all-NaN group has scale 0
    // and gets the zero point's code like an all-zero group.
    for sym in [true, false] {
        let c = cfg(4, sym, Granularity::Channel);
        let x = [f32::NAN, 1.0, -1.0, f32::NAN, f32::NAN, f32::NAN];
        let codes = rtn_codes(&c, &x, 3).unwrap();
        assert_eq!(codes.codes[0], 0, "sym={sym}");
        assert_ne!(codes.scales[0], 0.0);
        assert_eq!(codes.scales[1], 0.0);
        let zero = codes.zeros[1] as u8;
        assert_eq!(&codes.codes[3..], &[zero; 3]);
    }
}

#[test]
fn fused_codes_reject_bad_shapes_and_leave_values_alone() {
    let c = cfg(4, true, Granularity::Channel);
    let mut v = [1.0f32; 5];
    assert_eq!(
        rtn_codes_dequantize(&c, &mut v, 2),
        Err(QuantizeError::RaggedRows { len: 5, row_len: 2 })
    );
    assert_eq!(v, [1.0; 5]);
    let empty = rtn_codes_dequantize(&c, &mut [], 3).unwrap();
    assert!(empty.codes.is_empty() && empty.scales.is_empty());
}

#[test]
fn tensor_granularity_uses_one_scale_for_all_rows() {
    for sym in [true, false] {
        let c = cfg(4, sym, Granularity::Tensor);
        // Row 0 is tiny, row 1 is large: one shared scale must crush row 0 to zero.
        let orig = [0.001f32, -0.002, 0.0015, 0.001, 7.0, -8.0, 3.0, 1.0];
        let mut v = orig;
        quantize_dequantize_rows(&c, &mut v, 4);
        assert_eq!(&v[..4], &[0.0; 4], "sym={sym}");
        let (s, _) = reference_group(&c, &orig);
        for (x, y) in orig.iter().zip(&v) {
            assert!((x - y).abs() <= s / 2.0 * (1.0 + 1e-6), "{x} {y} {s}");
        }
        // Per-channel keeps row 0 accurate instead.
        let mut w = orig;
        quantize_dequantize_rows(&cfg(4, sym, Granularity::Channel), &mut w, 4);
        assert!(w[..4].iter().any(|&y| y != 0.0));
    }
}

#[test]
fn rtn_codes_rejects_bad_shapes_and_handles_odd_input() {
    let c = cfg(4, true, Granularity::Group(2));
    assert_eq!(rtn_codes(&c, &[1.0; 4], 0), Err(QuantizeError::ZeroRowLen));
    assert_eq!(
        rtn_codes(&c, &[1.0; 5], 2),
        Err(QuantizeError::RaggedRows { len: 5, row_len: 2 })
    );
    assert_eq!(
        rtn_codes(&cfg(9, true, Granularity::Channel), &[1.0], 1),
        Err(QuantizeError::Bits(9))
    );
    let empty = rtn_codes(&cfg(4, false, Granularity::Tensor), &[], 3).unwrap();
    assert!(empty.codes.is_empty() && empty.scales.is_empty());
    empty.dequantize_into(&mut []);
    for gran in [
        Granularity::Tensor,
        Granularity::Channel,
        Granularity::Group(3),
    ] {
        for sym in [true, false] {
            let c = cfg(3, sym, gran);
            let odd = [f32::NAN, f32::INFINITY, -f32::INFINITY, 0.0, 1.0, -2.0];
            let codes = rtn_codes(&c, &odd, 3).unwrap();
            codes.dequantize_into(&mut [0.0; 6]);
            let zeros = rtn_codes(&c, &[0.0; 6], 3).unwrap();
            let mut out = vec![1.0; 6];
            zeros.dequantize_into(&mut out);
            assert_eq!(out, vec![0.0; 6]);
        }
    }
}

#[test]
fn dequantize_splits_huge_groups_and_many_rows() {
    // One group far longer than a parallel piece, and many short rows.
    let n = 100_003usize;
    let orig: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 2003) as f32 * 0.01 - 10.0)
        .collect();
    for (gran, row_len) in [
        (Granularity::Tensor, 1),
        (Granularity::Channel, n),
        (Granularity::Group(7), 1),
    ] {
        let c = cfg(5, false, gran);
        let codes = rtn_codes(&c, &orig, row_len).unwrap();
        let mut got = vec![0.0; n];
        codes.dequantize_into(&mut got);
        let mut want = orig.clone();
        quantize_dequantize_rows(&c, &mut want, row_len);
        assert_eq!(got, want, "{gran:?}");
    }
}

/// Deterministic test data shared by the quantizer tests (splitmix64 + Box-Muller).
pub(crate) struct TestRng(u64);

impl TestRng {
    pub(crate) fn new(seed: u64) -> Self {
        TestRng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub(crate) fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub(crate) fn gaussian(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    pub(crate) fn laplace(&mut self) -> f64 {
        let u = self.uniform() - 0.5;
        -u.signum() * (1.0 - 2.0 * u.abs()).ln()
    }

    /// Student-t with `nu` degrees of freedom (heavy-tailed for small `nu`).
    pub(crate) fn student_t(&mut self, nu: u32) -> f64 {
        let chi2: f64 = (0..nu).map(|_| self.gaussian().powi(2)).sum();
        self.gaussian() / (chi2 / f64::from(nu)).sqrt()
    }
}

/// `n` BF16-representable samples of `dist` ("gaussian", "laplace", "student-t3") times `scale`.
pub(crate) fn sample(dist: &str, n: usize, scale: f64, seed: u64) -> Vec<f32> {
    let mut rng = TestRng::new(seed);
    (0..n)
        .map(|_| {
            let v = match dist {
                "gaussian" => rng.gaussian(),
                "laplace" => rng.laplace(),
                "student-t3" => rng.student_t(3),
                other => panic!("unknown distribution {other}"),
            };
            half::bf16::from_f64(v * scale).to_f32()
        })
        .collect()
}

/// Squared error `sum (x - y)^2` in f64.
pub(crate) fn sq_err(x: &[f32], y: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum()
}

/// Relative Frobenius error `||x - y|| / ||x||`.
pub(crate) fn rel_fro(x: &[f32], y: &[f32]) -> f64 {
    let norm: f64 = x.iter().map(|&a| f64::from(a).powi(2)).sum();
    (sq_err(x, y) / norm).sqrt()
}
