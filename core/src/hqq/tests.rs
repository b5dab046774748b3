//! Tests for HQQ: it beats symmetric and asymmetric RTN in relative Frobenius error on
//! Gaussian and heavy-tailed data, is never worse than asymmetric RTN in any group, stores
//! f16 scales and zeros, is deterministic, and survives odd input.

use super::*;
use crate::quantize::tests::{rel_fro, sample, sq_err};
use crate::quantize::{quantize_dequantize_rows, rtn_codes, RtnAsym};
use crate::recipe::QuantizeConfig;

fn dequant(c: &AffineCodes) -> Vec<f32> {
    let mut out = vec![f32::NAN; c.codes.len()];
    c.dequantize_into(&mut out);
    out
}

fn rtn(bits: u8, symmetric: bool, granularity: Granularity, x: &[f32], row_len: usize) -> Vec<f32> {
    let mut y = x.to_vec();
    let cfg = QuantizeConfig {
        bits,
        symmetric,
        granularity,
        scale_dtype: crate::recipe::ScaleDtype::F16,
    };
    quantize_dequantize_rows(&cfg, &mut y, row_len);
    y
}

const ROW_LEN: usize = 512;

#[test]
fn beats_rtn_on_gaussian_and_heavy_tailed_data() {
    for dist in ["gaussian", "laplace", "student-t3"] {
        let x = sample(dist, 64 * ROW_LEN, 0.02, 7);
        for bits in [4u8, 3] {
            for group in [64usize, 128] {
                let gran = Granularity::Group(group);
                let codes = hqq_codes(&HqqConfig::new(bits, gran), &x, ROW_LEN).unwrap();
                let e_hqq = rel_fro(&x, &dequant(&codes));
                let e_asym = rel_fro(&x, &rtn(bits, false, gran, &x, ROW_LEN));
                let e_sym = rel_fro(&x, &rtn(bits, true, gran, &x, ROW_LEN));
                eprintln!(
                    "{dist:>10} int{bits} g{group}: hqq {e_hqq:.5}  rtn-asym {e_asym:.5}  \
                     rtn-sym {e_sym:.5}  ({:.1}% below asym)",
                    100.0 * (1.0 - e_hqq / e_asym)
                );
                assert!(e_hqq < e_asym, "{dist} int{bits} g{group}");
                assert!(e_hqq < e_sym, "{dist} int{bits} g{group}");
            }
        }
    }
}

#[test]
fn never_worse_than_asymmetric_rtn_in_any_group() {
    let x = sample("student-t3", 32 * 256, 1.0, 11);
    for bits in [2u8, 3, 4, 8] {
        let gran = Granularity::Group(32);
        let h = hqq_codes(&HqqConfig::new(bits, gran), &x, 256).unwrap();
        let rtn_cfg = QuantizeConfig {
            bits,
            symmetric: false,
            granularity: gran,
            scale_dtype: crate::recipe::ScaleDtype::F16,
        };
        let r = rtn_codes(&rtn_cfg, &x, 256).unwrap();
        let (dh, dr) = (dequant(&h), dequant(&r));
        let mut strictly_better = 0;
        for ((g, gh), gr) in x.chunks(32).zip(dh.chunks(32)).zip(dr.chunks(32)) {
            let (eh, er) = (sq_err(g, gh), sq_err(g, gr));
            assert!(eh <= er * (1.0 + 1e-5), "int{bits}: {eh} > {er}");
            strictly_better += usize::from(eh < er * (1.0 - 1e-5));
        }
        eprintln!("int{bits}: HQQ strictly better in {strictly_better} of 256 groups");
        assert!(strictly_better > 0, "int{bits}");
    }
}

#[test]
fn scales_and_zeros_are_f16_and_codes_fit() {
    let x = sample("laplace", 16 * 200, 0.05, 3);
    for bits in [2u8, 3, 4, 5, 8] {
        let h = hqq_codes(&HqqConfig::new(bits, Granularity::Group(64)), &x, 200).unwrap();
        assert_eq!(h.groups_per_row(), 4); // 64 + 64 + 64 + 8
        assert_eq!(h.scales.len(), 16 * 4);
        for (&s, &z) in h.scales.iter().zip(&h.zeros) {
            assert_eq!(f16::from_f32(s).to_f32(), s);
            assert_eq!(f16::from_f32(z).to_f32(), z);
            assert!(s > 0.0);
        }
        assert!(h.codes.iter().all(|&c| u32::from(c) < 1 << bits));
        // Reconstruction uses exactly the stored values.
        let d = dequant(&h);
        for (i, &y) in d.iter().enumerate() {
            let g = (i / 200) * 4 + (i % 200) / 64;
            assert_eq!(y, (f32::from(h.codes[i]) - h.zeros[g]) * h.scales[g]);
        }
    }
}

#[test]
fn per_channel_and_per_tensor_work_and_beat_rtn() {
    let x = sample("gaussian", 8 * 1024, 1.0, 5);
    for gran in [Granularity::Channel, Granularity::Tensor] {
        let h = hqq_codes(&HqqConfig::new(4, gran), &x, 1024).unwrap();
        let e_hqq = rel_fro(&x, &dequant(&h));
        let e_rtn = rel_fro(&x, &rtn(4, false, gran, &x, 1024));
        eprintln!("{gran:?}: hqq {e_hqq:.5} rtn-asym {e_rtn:.5}");
        assert!(e_hqq < e_rtn, "{gran:?}");
        let expected_groups = if gran == Granularity::Tensor { 1 } else { 8 };
        assert_eq!(h.scales.len(), expected_groups);
    }
}

#[test]
fn deterministic_across_thread_counts() {
    // A per-tensor group longer than one reduction block exercises the parallel sums.
    let x = sample("laplace", 3 * BLOCK + 17, 1.0, 9);
    for gran in [Granularity::Tensor, Granularity::Group(128)] {
        let cfg = HqqConfig::new(3, gran);
        let a = hqq_codes(&cfg, &x, x.len()).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = pool.install(|| hqq_codes(&cfg, &x, x.len()).unwrap());
        assert_eq!(a, b, "{gran:?}");
    }
}

#[test]
fn more_iterations_or_none_still_never_lose_to_rtn() {
    let x = sample("gaussian", 4 * 256, 1.0, 21);
    let gran = Granularity::Group(64);
    let e_rtn = rel_fro(&x, &rtn(4, false, gran, &x, 256));
    for iterations in [0, 1, 5, 50] {
        let cfg = HqqConfig {
            iterations,
            ..HqqConfig::new(4, gran)
        };
        let e = rel_fro(&x, &dequant(&hqq_codes(&cfg, &x, 256).unwrap()));
        assert!(e <= e_rtn, "{iterations}: {e} > {e_rtn}");
    }
}

#[test]
fn odd_input_does_not_panic() {
    let cfg = HqqConfig::new(4, Granularity::Group(4));
    assert_eq!(
        hqq_codes(&cfg, &[1.0; 4], 0),
        Err(QuantizeError::ZeroRowLen)
    );
    assert_eq!(
        hqq_codes(&cfg, &[1.0; 5], 4),
        Err(QuantizeError::RaggedRows { len: 5, row_len: 4 })
    );
    let bad_bits = HqqConfig::new(1, Granularity::Channel);
    assert_eq!(hqq_codes(&bad_bits, &[1.0], 1), Err(QuantizeError::Bits(1)));
    assert!(hqq_codes(&cfg, &[], 4).unwrap().codes.is_empty());
    let odd = [
        f32::NAN,
        1.0,
        -2.0,
        0.5,
        f32::INFINITY,
        -f32::INFINITY,
        3.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
        1e38,
        -1e38,
        1e-40,
        2.0,
        5.0,
        5.0,
        5.0,
        5.0,
    ];
    for gran in [
        Granularity::Group(4),
        Granularity::Channel,
        Granularity::Tensor,
    ] {
        let h = hqq_codes(&HqqConfig::new(3, gran), &odd, 4).unwrap();
        let d = dequant(&h);
        // All-zero and constant groups are exact; finite groups stay finite.
        if gran == Granularity::Group(4) {
            assert_eq!(&d[8..12], &[0.0; 4]);
            assert!(d[16..20].iter().all(|&v| (v - 5.0).abs() < 0.1), "{d:?}");
            assert!(d[12..16].iter().all(|v| v.is_finite()));
        }
    }
}

/// Compares solver settings (how the constants in `SOLVER` were chosen): `cargo test
/// --release -p shardpress-core --lib hqq::tests::solver_variants -- --ignored --nocapture`.
#[test]
#[ignore]
fn solver_variants() {
    let variants = [
        ("p0.5 r3", SOLVER),
        (
            "p0.7 r3",
            Solver {
                lp_norm: 0.7,
                ..SOLVER
            },
        ),
        (
            "p0.5 r5",
            Solver {
                refit_rounds: 5,
                ..SOLVER
            },
        ),
        (
            "p0.5 r8",
            Solver {
                refit_rounds: 8,
                ..SOLVER
            },
        ),
    ];
    for dist in ["gaussian", "student-t3"] {
        let x = sample(dist, 256 * ROW_LEN, 0.02, 7);
        for (bits, group) in [(4u8, 64usize), (4, 128), (3, 64)] {
            let gran = Granularity::Group(group);
            let e_rtn = rel_fro(&x, &rtn(bits, false, gran, &x, ROW_LEN));
            let mut line = format!("{dist} int{bits} g{group} rtn {e_rtn:.5}:");
            for (name, s) in &variants {
                let c = hqq_codes_with(&HqqConfig::new(bits, gran), s, &x, ROW_LEN).unwrap();
                line += &format!(" [{name}] {:.5}", rel_fro(&x, &dequant(&c)));
            }
            eprintln!("{line}");
        }
    }
}

/// Integer zero points (compressed-tensors' layout): every zero is an integer code, every
/// scale sits on the requested grid, each group is at least as good as asymmetric RTN on that
/// grid, and over a tensor the result beats it clearly (HQQ-optimised scales).
#[test]
fn integer_zeros_on_a_grid_never_lose_to_rtn_on_that_grid() {
    for (grid, dist) in [
        (ScaleDtype::Bf16, "gaussian"),
        (ScaleDtype::F16, "student-t3"),
    ] {
        let x = sample(dist, 32 * 256, 0.02, 5);
        let gran = Granularity::Group(128);
        let cfg = HqqConfig {
            integer_zero: true,
            scale_dtype: grid,
            ..HqqConfig::new(4, gran)
        };
        let h = hqq_codes(&cfg, &x, 256).unwrap();
        for (&s, &z) in h.scales.iter().zip(&h.zeros) {
            assert_eq!(
                grid.round_nearest(s),
                s,
                "{grid:?}: scale {s} is off the grid"
            );
            assert!(s > 0.0);
            assert!(z == z.round() && (0.0..=15.0).contains(&z), "zero {z}");
        }
        let r = rtn_codes(
            &QuantizeConfig {
                bits: 4,
                symmetric: false,
                granularity: gran,
                scale_dtype: grid,
            },
            &x,
            256,
        )
        .unwrap();
        let (dh, dr) = (dequant(&h), dequant(&r));
        for ((g, gh), gr) in x.chunks(128).zip(dh.chunks(128)).zip(dr.chunks(128)) {
            let (eh, er) = (sq_err(g, gh), sq_err(g, gr));
            assert!(eh <= er * (1.0 + 1e-5), "{grid:?}: {eh} > {er}");
        }
        let (e_int, e_rtn) = (rel_fro(&x, &dh), rel_fro(&x, &dr));
        let e_real = rel_fro(
            &x,
            &dequant(&hqq_codes(&HqqConfig::new(4, gran), &x, 256).unwrap()),
        );
        eprintln!(
            "{dist} {grid:?}: hqq int-zero {e_int:.5}, real zero {e_real:.5}, rtn {e_rtn:.5}"
        );
        assert!(e_int < e_rtn * 0.975, "{e_int} vs rtn {e_rtn}");
    }
}

/// Groups are solved in batches: a group's result must not depend on its batch (a row alone
/// or inside the matrix, at any offset), nor on the vector width (baseline or AVX2 copy).
#[test]
fn batched_groups_do_not_depend_on_their_batch_or_the_cpu() {
    let x = sample("student-t3", 24 * 200, 0.05, 13);
    for cfg in [
        HqqConfig::new(4, Granularity::Group(64)),
        HqqConfig {
            integer_zero: true,
            scale_dtype: ScaleDtype::Bf16,
            ..HqqConfig::new(3, Granularity::Group(32))
        },
        HqqConfig::new(4, Granularity::Channel),
        // 20 is not a multiple of the 8 x 8 transposition blocks.
        HqqConfig::new(4, Granularity::Group(20)),
    ] {
        let whole = hqq_codes(&cfg, &x, 200).unwrap();
        let per_row = whole.groups_per_row();
        for (r, row) in x.chunks(200).enumerate().step_by(5) {
            let alone = hqq_codes(&cfg, row, 200).unwrap();
            assert_eq!(
                alone.codes,
                whole.codes[r * 200..(r + 1) * 200],
                "{cfg:?} row {r}"
            );
            assert_eq!(alone.scales, whole.scales[r * per_row..(r + 1) * per_row]);
            assert_eq!(alone.zeros, whole.zeros[r * per_row..(r + 1) * per_row]);
        }
        let baseline = crate::dtype::with_baseline(|| hqq_codes(&cfg, &x, 200).unwrap());
        assert_eq!(
            baseline, whole,
            "{cfg:?}: baseline and dispatched copies differ"
        );
    }
}

/// The batched, over-relaxed solver is at least as accurate as the reference solver (one
/// group at a time, one reference iteration per step), up to 0.5 %.
#[test]
fn batched_solver_error_matches_the_reference() {
    for dist in ["gaussian", "student-t3"] {
        let x = sample(dist, 64 * ROW_LEN, 0.02, 17);
        for cfg in [
            HqqConfig::new(4, Granularity::Group(64)),
            HqqConfig::new(3, Granularity::Group(128)),
            HqqConfig {
                integer_zero: true,
                scale_dtype: ScaleDtype::Bf16,
                ..HqqConfig::new(4, Granularity::Group(128))
            },
        ] {
            let e_new = rel_fro(&x, &dequant(&hqq_codes(&cfg, &x, ROW_LEN).unwrap()));
            let reference = hqq_codes_unbatched(&cfg, &x, ROW_LEN).unwrap();
            let e_ref = rel_fro(&x, &dequant(&reference));
            eprintln!("{dist} {cfg:?}: batched {e_new:.6} reference {e_ref:.6}");
            assert!(e_new <= e_ref * 1.005, "{dist} {cfg:?}: {e_new} vs {e_ref}");
        }
    }
}

/// MiniLM's 36 Linear weights (`MINILM=path/to/model.safetensors`): hqq4 and integer-zero
/// error of the batched solver against the reference solver and asymmetric RTN, weighted by
/// tensor norm as report.json weights them: `MINILM=... cargo test --release -p
/// shardpress-core --lib hqq::tests::minilm_error -- --ignored --nocapture`.
#[test]
#[ignore]
fn minilm_error() {
    let path = std::env::var("MINILM").expect("MINILM names model.safetensors");
    let bytes = std::fs::read(path).expect("reads the model");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
    let hqq4 = HqqConfig::new(4, Granularity::Group(64));
    let int_zero = HqqConfig {
        integer_zero: true,
        scale_dtype: ScaleDtype::Bf16,
        ..HqqConfig::new(4, Granularity::Group(128))
    };
    // [err^2 new, err^2 reference, err^2 rtn] per config, and the squared norm.
    let mut sums = [[0f64; 3]; 2];
    let mut norm = 0f64;
    let mut count = 0;
    for (name, view) in st.tensors() {
        let linear = name.contains("encoder.layer") && name.ends_with(".weight");
        if !linear || view.shape().len() != 2 || view.dtype() != safetensors::Dtype::F32 {
            continue;
        }
        count += 1;
        let x: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let row_len = view.shape()[1];
        let n2: f64 = x.iter().map(|&v| f64::from(v).powi(2)).sum();
        norm += n2;
        for (i, cfg) in [hqq4, int_zero].iter().enumerate() {
            let new = dequant(&hqq_codes(cfg, &x, row_len).unwrap());
            let reference = dequant(&hqq_codes_unbatched(cfg, &x, row_len).unwrap());
            let g = cfg.granularity;
            let r = rtn(4, false, g, &x, row_len);
            sums[i][0] += sq_err(&x, &new);
            sums[i][1] += sq_err(&x, &reference);
            sums[i][2] += sq_err(&x, &r);
        }
    }
    assert_eq!(count, 36, "MiniLM has 6 layers x 6 Linear weights");
    for (name, s) in ["hqq4 g64", "hqq4 g128 integer zero"].iter().zip(sums) {
        let [new, reference, rtn] = s.map(|e| (e / norm).sqrt());
        eprintln!(
            "MiniLM {name}: batched {new:.6}, reference {reference:.6} ({:+.3} %), rtn asym \
             {rtn:.6}",
            100.0 * (new / reference - 1.0)
        );
        assert!(new <= reference * 1.005 && new < rtn, "{name}");
    }
}

/// The `hqq` bench's matrix (rows of per-row std `0.02 exp(0.3 z)`, 1 weight in 2000 x5),
/// `rows x 1024`, as BF16 values.
fn bench_like_matrix(rows: usize, seed: u64) -> Vec<f32> {
    let g = sample("gaussian", rows * 1025 + rows, 1.0, seed);
    let u = sample("laplace", rows * 1024, 1.0, seed + 1);
    let mut out = Vec::with_capacity(rows * 1024);
    for r in 0..rows {
        let std = 0.02 * (0.3 * f64::from(g[rows * 1024 + r])).exp();
        for c in 0..1024 {
            let mut v = f64::from(g[r * 1024 + c]) * std;
            if u[r * 1024 + c].abs() > 7.6 {
                v *= 5.0;
            }
            out.push(half::bf16::from_f64(v).to_f32());
        }
    }
    out
}

/// The batched solver's RTN setup (all lanes at once) gives [`RtnAsym::new`]'s scale and
/// zero bit for bit wherever it applies, on every grid: ranges from wide to tiny, one-sided,
/// around the grids' edges.
#[test]
fn batched_rtn_setup_matches_rtn_asym() {
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut applied = 0;
    for round in 0..4000 {
        let mut lo = [0f32; batched::WIDTH];
        let mut hi = [0f32; batched::WIDTH];
        for l in 0..batched::WIDTH {
            // Magnitudes from 1e-12 to 1e12 (and the grids' edges), of either sign.
            let magnitude = |r: u64| 10f32.powf((r % 2400) as f32 / 100.0 - 12.0);
            let (a, b) = (magnitude(next()), magnitude(next()));
            (lo[l], hi[l]) = match (round + l) % 7 {
                0 => (-a, b),
                1 => (a.min(b), a.max(b)),
                2 => (-a.max(b), -a.min(b)),
                3 => (-a, 0.0),
                4 => (0.0, b),
                5 => (-0.0, 65_504.0 * 15.0 * (1.0 + (next() % 3) as f32 * 1e-3)),
                _ => (
                    -6.103_515_6e-5 * 15.0 * (1.0 - (next() % 3) as f32 * 1e-3),
                    0.0,
                ),
            };
        }
        for grid in [ScaleDtype::F16, ScaleDtype::Bf16, ScaleDtype::F32] {
            for bits in [2u8, 3, 4, 8] {
                let qmax = ((1u32 << bits) - 1) as f32;
                let (scale, zero, ok) = batched::rtn_setup(&lo, &hi, grid, qmax);
                for l in 0..batched::WIDTH {
                    if !ok[l] {
                        continue;
                    }
                    applied += 1;
                    let r = RtnAsym::new(bits, grid, lo[l].min(0.0), hi[l].max(0.0));
                    assert_eq!(
                        (scale[l].to_bits(), zero[l].to_bits()),
                        (r.scale.to_bits(), r.zero.to_bits()),
                        "{grid:?} {bits} bits [{:e}, {:e}]",
                        lo[l],
                        hi[l]
                    );
                }
            }
        }
    }
    assert!(applied > 500_000, "{applied}");
}

/// The batched refit's f16 rounding agrees with `half` on every f16 value, the midpoints
/// between neighbours (ties to even) and points near them, normal or not.
#[test]
fn batched_f16_rounding_matches_half() {
    let mut checked = 0;
    for bits in 0..=0x7BFFu16 {
        let v = f16::from_bits(bits).to_f32();
        let next = f16::from_bits(bits + 1).to_f32();
        let mid = 0.5 * (v + next);
        for x in [
            v,
            mid,
            f32::from_bits(mid.to_bits() - 1),
            f32::from_bits(mid.to_bits() + 1),
        ] {
            for x in [x, -x] {
                let expected = f16::from_f32(x).to_f32();
                assert_eq!(batched::round_f16(x).to_bits(), expected.to_bits(), "{x:e}");
                checked += 1;
            }
        }
    }
    assert!(checked > 200_000);
    assert_eq!(batched::round_f16(1e6), f32::INFINITY);
}

/// Error of solver settings on a matrix like the `hqq` bench's, against the reference solver
/// (how the batched shortcuts were chosen): `cargo test --release -p shardpress-core --lib
/// hqq::tests::speed_variants -- --ignored --nocapture`.
#[test]
#[ignore]
fn speed_variants() {
    let x = bench_like_matrix(512, 3);
    let hqq4 = HqqConfig::new(4, Granularity::Group(64));
    let int_zero = HqqConfig {
        integer_zero: true,
        scale_dtype: ScaleDtype::Bf16,
        ..HqqConfig::new(4, Granularity::Group(128))
    };
    for cfg in [hqq4, int_zero] {
        let e_ref = rel_fro(&x, &dequant(&hqq_codes_unbatched(&cfg, &x, 1024).unwrap()));
        let mut line = format!(
            "{:?} g{:?} ref {e_ref:.6}:",
            cfg.integer_zero, cfg.granularity
        );
        for (relax, refit_rounds, refit_relax, int_refit_relax) in [
            (5.0, 3usize, 1.5, 1.0),
            (7.0, 3, 1.5, 1.0),
            (8.0, 3, 1.5, 1.0),
            (10.0, 3, 1.5, 1.0),
            (10.0, 3, 1.8, 1.0),
            (10.0, 2, 1.8, 1.0),
            (10.0, 2, 2.0, 1.0),
            (10.0, 2, 2.2, 1.0),
            (10.0, 2, 2.5, 1.0),
            (10.0, 2, 1.6, 1.0),
            (5.0, 5, 1.5, 1.0),
            (5.0, 3, 1.5, 2.0),
            (5.0, 2, 1.5, 2.0),
            (5.0, 2, 1.5, 2.5),
            (5.0, 3, 1.5, 2.5),
        ] {
            let s = Solver {
                batched_relax: relax,
                int_refit_rounds: refit_rounds,
                relaxed_refit_rounds: refit_rounds,
                refit_relax,
                int_refit_relax,
                ..SOLVER
            };
            let e = rel_fro(&x, &dequant(&hqq_codes_with(&cfg, &s, &x, 1024).unwrap()));
            line += &format!(
                "\n  relax {relax} rounds {refit_rounds} refit-relax {refit_relax} int-relax {int_refit_relax}: {e:.6} ({:+.3} %)",
                100.0 * (e / e_ref - 1.0),
            );
        }
        eprintln!("{line}");
    }
}

/// Runs one configuration 10 times on one thread (`PROBE=rtn|hqq4|int|none`), for
/// `perf stat -e cycles` comparisons on a loaded machine.
#[test]
#[ignore]
fn speed_probe() {
    let x = bench_like_matrix(1024, 3);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let hqq4 = HqqConfig::new(4, Granularity::Group(64));
    let int_zero = HqqConfig {
        integer_zero: true,
        scale_dtype: ScaleDtype::Bf16,
        ..HqqConfig::new(4, Granularity::Group(128))
    };
    let rtn_cfg = QuantizeConfig {
        bits: 4,
        symmetric: false,
        granularity: Granularity::Group(64),
        scale_dtype: ScaleDtype::F16,
    };
    let probe = std::env::var("PROBE").unwrap_or_default();
    pool.install(|| {
        for _ in 0..10 {
            match probe.as_str() {
                "rtn" => assert!(!rtn_codes(&rtn_cfg, &x, 1024).unwrap().codes.is_empty()),
                "hqq4" => assert!(!hqq_codes(&hqq4, &x, 1024).unwrap().codes.is_empty()),
                "int" => assert!(!hqq_codes(&int_zero, &x, 1024).unwrap().codes.is_empty()),
                _ => {}
            }
        }
    });
}
