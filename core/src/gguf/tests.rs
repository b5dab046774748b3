//! Tests of the GGUF block quantizers and the file layout.

use super::quants::*;
use super::writer::*;
use super::*;
use half::f16;

/// Deterministic pseudo-random normals (splitmix64 + Box-Muller).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }

    fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

fn roundtrip(ty: GgmlType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    ty.quantize(x, &mut bytes).unwrap();
    assert_eq!(bytes.len(), x.len() / ty.block_size() * ty.type_size());
    let mut y = vec![f32::NAN; x.len()];
    ty.dequantize(&bytes, &mut y).unwrap();
    (bytes, y)
}

fn rel_error(x: &[f32], y: &[f32]) -> f64 {
    let err: f64 = x.iter().zip(y).map(|(a, b)| f64::from(a - b).powi(2)).sum();
    let norm: f64 = x.iter().map(|a| f64::from(*a).powi(2)).sum();
    (err / norm).sqrt()
}

/// FNV-1a, to pin quantizer output bytes.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

const BLOCK_TYPES: [GgmlType; 7] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

#[test]
fn type_table_matches_ggml() {
    let table = [
        (GgmlType::F32, 0, 1, 4, "F32"),
        (GgmlType::F16, 1, 1, 2, "F16"),
        (GgmlType::Q4_0, 2, 32, 18, "Q4_0"),
        (GgmlType::Q5_0, 6, 32, 22, "Q5_0"),
        (GgmlType::Q5_1, 7, 32, 24, "Q5_1"),
        (GgmlType::Q8_0, 8, 32, 34, "Q8_0"),
        (GgmlType::Q4_K, 12, 256, 144, "Q4_K"),
        (GgmlType::Q5_K, 13, 256, 176, "Q5_K"),
        (GgmlType::Q6_K, 14, 256, 210, "Q6_K"),
        (GgmlType::BF16, 30, 1, 2, "BF16"),
    ];
    for (ty, id, block, size, name) in table {
        assert_eq!(ty.id(), id);
        assert_eq!(GgmlType::from_id(id), Some(ty));
        assert_eq!(ty.block_size(), block);
        assert_eq!(ty.type_size(), size);
        assert_eq!(ty.name(), name);
        assert_eq!(ty.to_string(), name);
        assert_eq!(GgmlType::from_name(&name.to_lowercase()), Ok(ty));
    }
    assert_eq!(GgmlType::from_id(3), None);
    assert!(GgmlType::from_name("Q2_K").is_err());
    assert_eq!(GgmlType::Q4_K.row_bytes(4096), Ok(16 * 144));
    assert_eq!(GgmlType::F16.row_bytes(7), Ok(14));
    assert_eq!(
        GgmlType::Q8_0.row_bytes(33),
        Err(GgufError::RaggedRow {
            ty: GgmlType::Q8_0,
            row: 33,
            block: 32
        })
    );
    assert_eq!(
        GgmlType::F32.row_bytes(u64::MAX / 2),
        Err(GgufError::Overflow)
    );
}

#[test]
fn q8_0_error_is_within_half_a_step_per_block() {
    let x = Rng(1).normals(32 * 64, 0.02);
    let (bytes, y) = roundtrip(GgmlType::Q8_0, &x);
    for ((xb, yb), b) in x.chunks(32).zip(y.chunks(32)).zip(bytes.chunks(34)) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Exact scale amax/127 gives |err| <= d/2; storing d as f16 moves each of the <= 127
        // steps by at most d * 2^-11.
        let bound = d * (0.5 + 127.0 / 2048.0) + amax * 1e-6;
        for (a, b) in xb.iter().zip(yb) {
            assert!((a - b).abs() <= bound, "{a} vs {b}, d={d}");
        }
    }
    assert!(rel_error(&x, &y) < 0.01);
}

#[test]
fn q4_0_error_is_within_one_step_per_block() {
    let x = Rng(2).normals(32 * 64, 1.0);
    let (bytes, y) = roundtrip(GgmlType::Q4_0, &x);
    for ((xb, yb), b) in x.chunks(32).zip(y.chunks(32)).zip(bytes.chunks(18)) {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32().abs();
        // Half a step, except the side opposite the largest value clips at +7 steps.
        for (a, b) in xb.iter().zip(yb) {
            assert!((a - b).abs() <= d * 1.01, "{a} vs {b}, d={d}");
        }
        // The value of largest magnitude maps to code 0 (-8 steps) exactly.
        let imax = (0..32)
            .max_by(|&i, &j| xb[i].abs().total_cmp(&xb[j].abs()))
            .unwrap();
        let code = if imax < 16 {
            b[2 + imax] & 0x0f
        } else {
            b[2 + imax - 16] >> 4
        };
        assert_eq!(code, 0);
    }
    let e = rel_error(&x, &y);
    assert!(e > 0.05 && e < 0.15, "{e}");
}

#[test]
fn k_quant_errors_are_in_the_expected_range() {
    let x = Rng(3).normals(256 * 32, 0.05);
    for (ty, lo, hi) in [
        (GgmlType::Q4_K, 0.04, 0.12),
        (GgmlType::Q5_K, 0.02, 0.06),
        (GgmlType::Q6_K, 0.005, 0.03),
    ] {
        let (_, y) = roundtrip(ty, &x);
        let e = rel_error(&x, &y);
        assert!(e > lo && e < hi, "{ty}: relative error {e}");
    }
}

#[test]
fn more_bits_give_smaller_errors_on_heavy_tailed_rows_with_outliers() {
    let mut rng = Rng(4);
    let mut x: Vec<f32> = (0..256 * 16)
        .map(|_| rng.normal() * rng.normal().abs() * 0.03)
        .collect();
    for i in (0..x.len()).step_by(301) {
        x[i] *= 40.0;
    }
    let errors: Vec<f64> = [
        GgmlType::Q4_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
    ]
    .iter()
    .map(|&ty| {
        let (_, y) = roundtrip(ty, &x);
        assert!(y.iter().all(|v| v.is_finite()));
        rel_error(&x, &y)
    })
    .collect();
    assert!(errors[1] < errors[0], "{errors:?}");
    assert!(errors[2] < errors[1], "{errors:?}");
    assert!(errors[3] < errors[2], "{errors:?}");
    assert!(errors[4] < errors[3], "{errors:?}");
}

#[test]
fn zero_blocks_encode_to_zero_scales_and_decode_to_zero() {
    let x = vec![0.0f32; 512];
    for ty in GgmlType::ALL {
        let (bytes, y) = roundtrip(ty, &x);
        assert!(y.iter().all(|&v| v == 0.0), "{ty}");
        match ty {
            // d = 0 / -8 = -0.0; every code is the zero point 8.
            GgmlType::Q4_0 => {
                for b in bytes.chunks(18) {
                    assert_eq!(b[..2], [0x00, 0x80]);
                    assert!(b[2..].iter().all(|&q| q == 0x88));
                }
            }
            // d = -0.0; every code is the zero point 16: low nibbles 0, fifth bits 1.
            GgmlType::Q5_0 => {
                for b in bytes.chunks(22) {
                    assert_eq!(b[..2], [0x00, 0x80]);
                    assert!(b[2..6].iter().all(|&q| q == 0xff));
                    assert!(b[6..].iter().all(|&q| q == 0));
                }
            }
            _ => assert!(bytes.iter().all(|&b| b == 0), "{ty}"),
        }
    }
}

#[test]
fn constant_and_tiny_blocks_stay_close() {
    for c in [0.5f32, -3.0, 1e-3, 7e4] {
        let x = vec![c; 512];
        for ty in BLOCK_TYPES {
            if ty == GgmlType::Q5_1 && c.abs() > 65504.0 {
                // Its minimum is an f16, which cannot hold 7e4 (in ggml neither).
                continue;
            }
            let (_, y) = roundtrip(ty, &x);
            // At 1e-3 the K-quant super-block scale `d` is an f16 subnormal (ggml stores it
            // so), which costs a few percent.
            let tol = match ty {
                _ if c.abs() < 0.01 => 0.05,
                GgmlType::Q4_0 | GgmlType::Q4_K => 0.07,
                _ => 0.02,
            };
            for v in &y {
                assert!((v - c).abs() <= c.abs() * tol, "{ty}: {v} vs {c}");
            }
        }
    }
    // Values far below f16's range: the scales underflow and everything decodes to zero,
    // finitely.
    let x = Rng(5).normals(512, 1e-12);
    for ty in BLOCK_TYPES {
        let (_, y) = roundtrip(ty, &x);
        assert!(y.iter().all(|v| v.is_finite() && v.abs() < 1e-9), "{ty}");
    }
}

#[test]
fn float_passthrough_round_trips() {
    let x = Rng(6).normals(100, 3.0);
    let (bytes, y) = roundtrip(GgmlType::F32, &x);
    assert_eq!(y, x);
    assert_eq!(bytes[..4], x[0].to_le_bytes());
    let (bytes, y) = roundtrip(GgmlType::F16, &x);
    for ((a, b), q) in x.iter().zip(&y).zip(bytes.chunks(2)) {
        assert_eq!(f16::from_f32(*a).to_le_bytes(), [q[0], q[1]]);
        assert_eq!(f16::from_f32(*a).to_f32(), *b);
    }
    let (bytes, y) = roundtrip(GgmlType::BF16, &x);
    for ((a, b), q) in x.iter().zip(&y).zip(bytes.chunks(2)) {
        assert_eq!(half::bf16::from_f32(*a).to_le_bytes(), [q[0], q[1]]);
        assert_eq!(half::bf16::from_f32(*a).to_f32(), *b);
    }
}

#[test]
fn q8_0_and_q4_0_bytes_follow_the_reference_formulas() {
    // One block by hand: x = j - 16 for j in 0..32.
    let x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
    let mut q8 = Vec::new();
    quantize_q8_0(&x, &mut q8).unwrap();
    let d = 16.0f32 / 127.0;
    assert_eq!(q8[..2], f16::from_f32(d).to_le_bytes());
    for (j, &q) in q8[2..].iter().enumerate() {
        assert_eq!(q as i8, ((j as f32 - 16.0) * (1.0 / d)).round() as i8);
    }
    assert_eq!(q8[2] as i8, -127);
    let mut q4 = Vec::new();
    quantize_q4_0(&x, &mut q4).unwrap();
    // max = -16 (first of largest magnitude), d = 2, codes x/2 + 8 truncated from x/2 + 8.5.
    assert_eq!(q4[..2], f16::from_f32(2.0).to_le_bytes());
    for j in 0..16 {
        let lo = ((x[j] / 2.0 + 8.5) as i8).min(15) as u8;
        let hi = ((x[j + 16] / 2.0 + 8.5) as i8).min(15) as u8;
        assert_eq!(q4[2 + j], lo | (hi << 4), "byte {j}");
    }
    // Ties: Q8_0 rounds half away from zero (roundf), x*id = +-2.5 exactly.
    let mut x = vec![0.0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -2.5;
    let mut q8 = Vec::new();
    quantize_q8_0(&x, &mut q8).unwrap();
    assert_eq!([q8[3] as i8, q8[4] as i8], [3, -3]);
}

/// Q8_0 and Q4_0 blocks equal the line-by-line formulas with saturating casts on hostile
/// blocks too: subnormal maxima (whose `1 / d` overflows to infinity, so `0 * id` is NaN),
/// huge values, ties and random bit patterns.
#[test]
fn q8_0_and_q4_0_codes_equal_the_saturating_formulas_on_any_block() {
    fn q8_reference(x: &[f32]) -> Vec<u8> {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut y = f16::from_f32(d).to_le_bytes().to_vec();
        y.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
        y
    }
    fn q4_reference(x: &[f32]) -> Vec<u8> {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let max = x.iter().copied().find(|v| v.abs() == amax && amax > 0.0);
        let d = max.unwrap_or(0.0) / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut y = f16::from_f32(d).to_le_bytes().to_vec();
        y.extend((0..16).map(|j| {
            let lo = ((x[j] * id + 8.5) as i32).min(15) as u8;
            let hi = ((x[j + 16] * id + 8.5) as i32).min(15) as u8;
            lo | (hi << 4)
        }));
        y
    }
    let mut rng = Rng(7);
    let mut blocks: Vec<Vec<f32>> = vec![
        vec![0.0; 32],
        (0..32).map(|j| if j == 5 { 3e-44 } else { 0.0 }).collect(),
        (0..32)
            .map(|j| if j == 9 { -2e-39 } else { 1e-45 })
            .collect(),
        (0..32).map(|j| (j as f32 - 16.0) * 1e37).collect(),
        (0..32)
            .map(|j| [127.0, 2.5, -2.5, -127.5, 0.5][j % 5])
            .collect(),
    ];
    for _ in 0..2000 {
        blocks.push(
            (0..32)
                .map(|_| f32::from_bits(rng.next_u64() as u32))
                .map(|v| if v.is_finite() { v } else { 1.0 })
                .collect(),
        );
    }
    for x in &blocks {
        let (mut q8, mut q4) = (Vec::new(), Vec::new());
        quantize_q8_0(x, &mut q8).unwrap();
        quantize_q4_0(x, &mut q4).unwrap();
        assert_eq!(q8, q8_reference(x), "{x:?}");
        assert_eq!(q4, q4_reference(x), "{x:?}");
    }
}

/// FNV-1a of each type's bytes for a fixed input (zero, all-positive and outlier blocks
/// included). These bytes were checked equal to llama.cpp's own `quantize_row_*_ref` on this
/// input (the `ggml-quants.c` vendored by llama-cpp-python 0.3.36, gcc 12 -O3, x86-64 without
/// FMA, as llama.cpp builds ggml-base); this pins them against regressions.
#[test]
fn quantizer_bytes_are_pinned() {
    let mut rng = Rng(7);
    let mut x = rng.normals(256 * 8, 0.02);
    x[5] = 1.5;
    x[700] = -2.25;
    x[1024..1280].fill(0.0);
    x[1280..1536].iter_mut().for_each(|v| *v = v.abs());
    let hashes = |x: &[f32]| -> Vec<(GgmlType, u64)> {
        BLOCK_TYPES
            .iter()
            .map(|&ty| {
                let mut b = Vec::new();
                ty.quantize(x, &mut b).unwrap();
                (ty, fnv1a(&b))
            })
            .collect()
    };
    let got = hashes(&x);
    let want = PINNED;
    assert_eq!(got, want.to_vec(), "{got:#x?}");
    // The baseline copies of the AVX2-dispatched K-quant blocks give the same bytes.
    assert_eq!(crate::dtype::with_baseline(|| hashes(&x)), got);
}

const PINNED: [(GgmlType, u64); 7] = [
    (GgmlType::Q8_0, 0xfac6_c2e1_5d03_1dfd),
    (GgmlType::Q4_0, 0x36b1_b75f_4b86_079e),
    // Q5_0 and Q5_1 came later: their bytes equal gguf-py's reference quantizers
    // (tests/python/test_gguf_blocks.py), and Q5_0's equal llama-quantize's Q4_K_M fallback
    // tensors (BENCHMARKS.md, GGUF).
    (GgmlType::Q5_0, 0xc7a6_108a_ad08_31b8),
    (GgmlType::Q5_1, 0x91aa_9afa_8409_703a),
    (GgmlType::Q4_K, 0x2e75_d600_46da_e2e7),
    (GgmlType::Q5_K, 0x0f3a_44d9_8e1a_5032),
    (GgmlType::Q6_K, 0xec11_56cf_b5e8_ce07),
];

#[test]
fn parallel_split_matches_block_by_block() {
    let x = Rng(8).normals(256 * 300, 0.1);
    for ty in GgmlType::ALL {
        let mut whole = Vec::new();
        ty.quantize(&x, &mut whole).unwrap();
        let mut pieces = vec![0xAA];
        for row in x.chunks(256) {
            ty.quantize(row, &mut pieces).unwrap();
        }
        assert_eq!(pieces[0], 0xAA, "quantize appends");
        assert_eq!(whole, pieces[1..], "{ty}");
        let mut y_whole = vec![0.0; x.len()];
        ty.dequantize(&whole, &mut y_whole).unwrap();
        let bpr = ty.row_bytes(256).unwrap() as usize;
        for (i, row) in y_whole.chunks(256).enumerate() {
            let mut y = vec![0.0; 256];
            ty.dequantize(&whole[i * bpr..(i + 1) * bpr], &mut y)
                .unwrap();
            assert_eq!(y, row, "{ty}");
        }
    }
}

#[test]
fn bad_lengths_give_errors() {
    for ty in BLOCK_TYPES {
        let bs = ty.block_size();
        let x = vec![0.5f32; bs + 1];
        let mut out = vec![1, 2];
        assert_eq!(
            ty.quantize(&x, &mut out),
            Err(GgufError::RaggedValues {
                ty,
                len: bs + 1,
                block: bs
            })
        );
        assert_eq!(out, [1, 2], "{ty}: nothing appended on error");
        let mut y = vec![0.0; bs];
        let bytes = vec![0u8; ty.type_size() + 1];
        assert_eq!(
            ty.dequantize(&bytes, &mut y),
            Err(GgufError::ByteLength {
                ty,
                values: bs,
                want: ty.type_size(),
                got: ty.type_size() + 1
            })
        );
        let mut y = vec![0.0; bs - 1];
        assert!(matches!(
            ty.dequantize(&bytes[..ty.type_size()], &mut y),
            Err(GgufError::RaggedValues { .. })
        ));
        assert_eq!(ty.dequantize(&[], &mut []), Ok(()));
    }
    let mut y = vec![0.0; 3];
    assert!(matches!(
        GgmlType::F16.dequantize(&[0; 5], &mut y),
        Err(GgufError::ByteLength { .. })
    ));
}

// ----------------------------------------------------------------------------------------
// Layout and header.

fn meta(pairs: Vec<(&str, MetaValue)>) -> Vec<(String, MetaValue)> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn tensor(name: &str, shape: &[u64], ty: GgmlType) -> (String, Vec<u64>, GgmlType) {
    (name.to_string(), shape.to_vec(), ty)
}

#[test]
fn layout_sizes_are_exact() {
    let md = meta(vec![(
        "general.architecture",
        MetaValue::String("llama".into()),
    )]);
    let ts = vec![
        tensor("a", &[3, 256], GgmlType::Q4_K),
        tensor("bb", &[5], GgmlType::F32),
        tensor("c", &[2, 2, 64], GgmlType::Q8_0),
    ];
    let l = layout(&md, &ts, 32).unwrap();
    let kv = 8 + "general.architecture".len() + 4 + 8 + 5;
    let infos = (8 + 1 + 4 + 16 + 4 + 8) + (8 + 2 + 4 + 8 + 4 + 8) + (8 + 1 + 4 + 24 + 4 + 8);
    let header = 4 + 4 + 8 + 8 + kv + infos;
    assert_eq!(header, 193);
    assert_eq!(l.data_start, 224);
    assert_eq!(l.header.len(), 224);
    assert!(l.header[header..].iter().all(|&b| b == 0));
    let got: Vec<(u64, u64, u64, u64)> = l
        .tensors
        .iter()
        .map(|t| (t.offset, t.start, t.len, t.padded_len))
        .collect();
    assert_eq!(
        got,
        [
            (0, 224, 3 * 144, 448),
            (448, 672, 20, 32),
            (480, 704, 4 * 2 * 34, 288)
        ]
    );
    assert_eq!(l.file_size, 224 + 448 + 32 + 288);
    assert_eq!(l.tensor("bb").unwrap().range(), 672..692);
    assert_eq!(l.tensor("c").unwrap().n_elements(), 256);
    assert_eq!(l.alignment, 32);
    // The header bytes, field by field.
    assert_eq!(l.header[..4], *b"GGUF");
    assert_eq!(l.header[4..8], 3u32.to_le_bytes());
    assert_eq!(l.header[8..16], 3u64.to_le_bytes());
    assert_eq!(l.header[16..24], 1u64.to_le_bytes());
    // Tensor "c" stores dims innermost first: 64, 2, 2.
    let c_info = 24 + kv + (8 + 1 + 4 + 16 + 4 + 8) + (8 + 2 + 4 + 8 + 4 + 8);
    let mut want = Vec::new();
    want.extend_from_slice(&1u64.to_le_bytes());
    want.push(b'c');
    want.extend_from_slice(&3u32.to_le_bytes());
    for d in [64u64, 2, 2] {
        want.extend_from_slice(&d.to_le_bytes());
    }
    want.extend_from_slice(&8u32.to_le_bytes());
    want.extend_from_slice(&480u64.to_le_bytes());
    assert_eq!(l.header[c_info..c_info + want.len()], want[..]);
}

#[test]
fn empty_layout_is_just_the_padded_header() {
    let l = layout(&[], &[], 32).unwrap();
    assert_eq!(l.data_start, 32);
    assert_eq!(l.file_size, 32);
    let p = parse_header(&l.header).unwrap();
    assert!(p.metadata.is_empty() && p.tensors.is_empty());
}

fn all_values() -> Vec<(String, MetaValue)> {
    meta(vec![
        ("general.architecture", MetaValue::String("llama".into())),
        ("u8", MetaValue::U8(200)),
        ("i8", MetaValue::I8(-100)),
        ("u16", MetaValue::U16(60000)),
        ("i16", MetaValue::I16(-30000)),
        ("u32", MetaValue::U32(4_000_000_000)),
        ("i32", MetaValue::I32(-2_000_000_000)),
        ("u64", MetaValue::U64(u64::MAX)),
        ("i64", MetaValue::I64(i64::MIN)),
        ("f32", MetaValue::F32(0.25)),
        ("f64", MetaValue::F64(-1e300)),
        ("bool", MetaValue::Bool(true)),
        ("empty", MetaValue::String(String::new())),
        ("unicode", MetaValue::String("γλώσσα 🦙".into())),
        ("a.u8", MetaValue::Array(MetaArray::U8(vec![1, 2, 255]))),
        ("a.i8", MetaValue::Array(MetaArray::I8(vec![-1, 2]))),
        ("a.u16", MetaValue::Array(MetaArray::U16(vec![7]))),
        ("a.i16", MetaValue::Array(MetaArray::I16(vec![-7, 7]))),
        ("a.u32", MetaValue::Array(MetaArray::U32(vec![]))),
        ("a.i32", MetaValue::Array(MetaArray::I32(vec![i32::MIN]))),
        ("a.u64", MetaValue::Array(MetaArray::U64(vec![1 << 40]))),
        ("a.i64", MetaValue::Array(MetaArray::I64(vec![-5, 5]))),
        ("a.f32", MetaValue::Array(MetaArray::F32(vec![1.5, -0.0]))),
        ("a.f64", MetaValue::Array(MetaArray::F64(vec![2.5]))),
        (
            "a.bool",
            MetaValue::Array(MetaArray::Bool(vec![true, false])),
        ),
        (
            "a.str",
            MetaValue::Array(MetaArray::String(vec![
                "<s>".into(),
                String::new(),
                "▁the".into(),
            ])),
        ),
    ])
}

#[test]
fn layout_parse_round_trip_with_every_value_type_and_custom_alignment() {
    let md = all_values();
    let ts = vec![
        tensor("token_embd.weight", &[10, 256], GgmlType::Q6_K),
        tensor("blk.0.attn_q.weight", &[2, 3, 4, 32], GgmlType::Q4_0),
        tensor("output_norm.weight", &[256], GgmlType::F32),
        tensor("x", &[1, 64], GgmlType::BF16),
    ];
    let l = layout(&md, &ts, 64).unwrap();
    assert_eq!(l.data_start % 64, 0);
    let p = parse_header(&l.header).unwrap();
    assert_eq!(p.version, 3);
    assert_eq!(p.alignment, 64);
    assert_eq!(p.data_start, l.data_start);
    // general.alignment was appended as a u32.
    assert_eq!(p.metadata[..md.len()], md[..]);
    assert_eq!(
        p.metadata[md.len()],
        (ALIGNMENT_KEY.to_string(), MetaValue::U32(64))
    );
    assert_eq!(
        p.get("general.architecture").unwrap().as_str(),
        Some("llama")
    );
    for (t, lt) in p.tensors.iter().zip(&l.tensors) {
        assert_eq!(t.name, lt.name);
        assert_eq!(t.shape(), lt.shape);
        assert_eq!(t.dims, lt.shape.iter().rev().copied().collect::<Vec<_>>());
        assert_eq!(t.ggml_type(), Ok(lt.ggml_type));
        assert_eq!(t.offset, lt.offset);
        assert_eq!(t.offset % 64, 0);
        assert_eq!(t.n_bytes(), Ok(lt.len));
    }
    assert_eq!(p.tensor("x").unwrap().dims, [64, 1]);
    // Parsing a whole file (header + data) reads the same header.
    let mut file = l.header.clone();
    file.resize(l.file_size as usize, 0);
    assert_eq!(parse_header(&file).unwrap(), p);
    // An explicit, matching general.alignment is kept as given and not duplicated.
    let mut md2 = md.clone();
    md2.insert(0, (ALIGNMENT_KEY.to_string(), MetaValue::U32(64)));
    let l2 = layout(&md2, &ts, 64).unwrap();
    assert_eq!(parse_header(&l2.header).unwrap().metadata, md2);
}

#[test]
fn concatenating_padded_tensors_reproduces_the_layout() {
    let ts = vec![
        tensor("a", &[2, 256], GgmlType::Q5_K),
        tensor("b", &[3, 32], GgmlType::Q8_0),
        tensor("c", &[7], GgmlType::F16),
    ];
    let l = layout(&[], &ts, 32).unwrap();
    let mut file = l.header.clone();
    let mut rng = Rng(9);
    for t in &l.tensors {
        assert_eq!(file.len() as u64, t.start);
        let x = rng.normals(t.n_elements() as usize, 1.0);
        t.ggml_type.quantize(&x, &mut file).unwrap();
        assert_eq!(file.len() as u64, t.range().end);
        file.resize((t.start + t.padded_len) as usize, 0);
    }
    assert_eq!(file.len() as u64, l.file_size);
}

#[test]
fn layout_rejects_bad_input() {
    let q = GgmlType::Q4_K;
    let err = |md: &[(String, MetaValue)], ts: &[(String, Vec<u64>, GgmlType)], a| {
        layout(md, ts, a).unwrap_err()
    };
    assert!(matches!(
        err(&[], &[tensor("w", &[4, 100], q)], 32),
        GgufError::BadTensor { .. }
    ));
    assert_eq!(
        err(&[], &[tensor("w", &[256], q), tensor("w", &[256], q)], 32),
        GgufError::DuplicateTensor("w".into())
    );
    let dup = meta(vec![("k", MetaValue::U8(1)), ("k", MetaValue::U8(2))]);
    assert_eq!(err(&dup, &[], 32), GgufError::DuplicateKey("k".into()));
    for a in [0, 48, 1 << 40] {
        assert_eq!(err(&[], &[], a), GgufError::BadAlignment(a));
    }
    let wrong = meta(vec![(ALIGNMENT_KEY, MetaValue::U32(32))]);
    assert!(matches!(
        err(&wrong, &[], 64),
        GgufError::AlignmentConflict { expected: 64, .. }
    ));
    let wrong_type = meta(vec![(ALIGNMENT_KEY, MetaValue::U64(32))]);
    assert!(matches!(
        err(&wrong_type, &[], 32),
        GgufError::AlignmentConflict { .. }
    ));
    let long = "n".repeat(64);
    assert!(matches!(
        err(&[], &[tensor(&long, &[256], q)], 32),
        GgufError::BadTensor { .. }
    ));
    assert!(layout(&[], &[tensor(&long[..63], &[256], q)], 32).is_ok());
    for shape in [&[][..], &[1, 1, 1, 1, 256]] {
        assert!(matches!(
            err(&[], &[tensor("w", shape, q)], 32),
            GgufError::BadTensor { .. }
        ));
    }
    assert!(matches!(
        err(&[], &[tensor("w", &[1 << 32, 1 << 32, 256], q)], 32),
        GgufError::BadTensor { .. }
    ));
    // Zero-sized dimensions are allowed (and take no bytes).
    let l = layout(&[], &[tensor("w", &[0, 256], q)], 32).unwrap();
    assert_eq!((l.tensors[0].len, l.tensors[0].padded_len), (0, 0));
}

#[test]
fn parse_header_rejects_every_truncation_and_hostile_counts() {
    let ts = vec![
        tensor("a", &[2, 256], GgmlType::Q4_K),
        tensor("b", &[32], GgmlType::Q8_0),
    ];
    let l = layout(&all_values(), &ts, 32).unwrap();
    // The header proper ends before the padding; every shorter prefix is an error.
    let end = {
        let mut n = l.header.len();
        while parse_header(&l.header[..n - 1]).is_ok() {
            n -= 1;
        }
        n
    };
    assert!(end > l.header.len() - 32);
    for n in 0..end {
        assert!(parse_header(&l.header[..n]).is_err(), "prefix {n}");
    }

    let mut bad = l.header.clone();
    bad[0] = b'X';
    assert!(matches!(parse_header(&bad), Err(GgufError::BadMagic(_))));
    let mut bad = l.header.clone();
    bad[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(parse_header(&bad), Err(GgufError::UnsupportedVersion(1)));
    for field in [8..16, 16..24] {
        let mut bad = l.header.clone();
        bad[field].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(parse_header(&bad), Err(GgufError::Invalid(_))));
    }
    // A string length pointing past the end.
    let mut bad = l.header.clone();
    bad[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    assert!(matches!(
        parse_header(&bad),
        Err(GgufError::Truncated { .. })
    ));
    // An unknown value type on the first KV.
    let key_len = "general.architecture".len();
    let ty_at = 32 + key_len;
    let mut bad = l.header.clone();
    bad[ty_at..ty_at + 4].copy_from_slice(&99u32.to_le_bytes());
    assert!(matches!(parse_header(&bad), Err(GgufError::Invalid(_))));
    // A misaligned tensor offset.
    let p = parse_header(&l.header).unwrap();
    assert_eq!(p.tensors[1].offset, 288);
    let off_at = end - 8;
    let mut bad = l.header.clone();
    bad[off_at..end].copy_from_slice(&289u64.to_le_bytes());
    assert!(matches!(
        parse_header(&bad),
        Err(GgufError::BadTensor { .. })
    ));
}

/// Eight sub-blocks of `n` values, each of a kind chosen by `seed`: normal, constant (the flat
/// case), all zero, tiny (scales near f16's floor), one strong outlier, all positive.
fn mixed_lanes(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(n * quants::LANES);
    for _ in 0..quants::LANES {
        let kind = rng.next_u64() % 6;
        let mut block = rng.normals(n, 0.02);
        match kind {
            1 => {
                let c = block[0];
                block.fill(c)
            }
            2 => block.fill(0.0),
            3 => block.iter_mut().for_each(|v| *v *= 1e-6),
            4 => block[(rng.next_u64() % n as u64) as usize] = 3.0,
            5 => block.iter_mut().for_each(|v| *v = v.abs()),
            _ => {}
        }
        x.extend(block);
    }
    x
}

#[test]
fn lane_parallel_searches_equal_the_scalar_reference_bit_for_bit() {
    use quants::{
        make_qkx2_quants, make_qkx2_quants_x8, make_qx_quants_rmse1, make_qx_quants_rmse1_x8, LANES,
    };
    let mut rng = Rng(11);
    for _ in 0..300 {
        // Q4_K (15 levels, 21 candidate scales) and Q5_K (31, 16) on 32-value sub-blocks.
        let x = mixed_lanes(&mut rng, 32);
        for (nmax, rmin, nstep) in [(15, -1.0f32, 20), (31, -0.5, 15)] {
            let mut weights = [[0f32; LANES]; 32];
            for k in 0..LANES {
                let xs = &x[32 * k..32 * k + 32];
                let av_x = (xs.iter().fold(0f32, |a, v| a + v * v) / 32.0).sqrt();
                for i in 0..32 {
                    weights[i][k] = av_x + xs[i].abs();
                }
            }
            let mut l8 = [0u8; 32 * LANES];
            let (scales, mins) =
                make_qkx2_quants_x8::<false>(nmax, &x, &weights, &mut l8, rmin, nstep);
            if crate::dtype::has_avx2() {
                let mut wide = [0u8; 32 * LANES];
                let found = make_qkx2_quants_x8::<true>(nmax, &x, &weights, &mut wide, rmin, nstep);
                assert_eq!((found, wide), ((scales, mins), l8));
            }
            for k in 0..LANES {
                let w: Vec<f32> = (0..32).map(|i| weights[i][k]).collect();
                let (mut l, mut aux) = ([0u8; 32], [0u8; 32]);
                let (scale, min) = make_qkx2_quants(
                    nmax,
                    &x[32 * k..32 * k + 32],
                    &w,
                    &mut l,
                    &mut aux,
                    rmin,
                    0.1,
                    nstep,
                    false,
                );
                assert_eq!(
                    (scales[k].to_bits(), mins[k].to_bits()),
                    (scale.to_bits(), min.to_bits()),
                    "lane {k}"
                );
                assert_eq!(l8[32 * k..32 * k + 32], l, "lane {k}");
            }
        }
        // Q6_K's search on 16-value sub-blocks.
        let x = mixed_lanes(&mut rng, 16);
        let mut l8 = [0u8; 16 * LANES];
        let scales = make_qx_quants_rmse1_x8::<false>(32, &x, &mut l8);
        if crate::dtype::has_avx2() {
            let mut wide = [0u8; 16 * LANES];
            assert_eq!(
                (make_qx_quants_rmse1_x8::<true>(32, &x, &mut wide), wide),
                (scales, l8)
            );
        }
        for k in 0..LANES {
            let mut l = [0u8; 16];
            let scale = make_qx_quants_rmse1(32, &x[16 * k..16 * k + 16], &mut l);
            assert_eq!(scales[k].to_bits(), scale.to_bits(), "lane {k}");
            assert_eq!(l8[16 * k..16 * k + 16], l, "lane {k}");
        }
    }
}
