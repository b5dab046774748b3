//! Time of the calibrated methods on a 4096 × 4096 Linear (a 7B-class projection), against
//! RTN of the same matrix with the same config, measured in the same run.
//!
//! The weight is Gaussian (0.02); the Hessian comes from 4096 input rows with a low-rank
//! correlated part and log-normal per-input scales (as real activations), accumulated with
//! [`HessianAccumulator::add_rows`] once in setup. Benchmarks (global rayon pool):
//! - `rtn/int4-g128-asym`: [`rtn_codes`], the data-free baseline;
//! - `gptq/int4-g128-asym`: [`gptq_codes`] with the reference defaults (damping 0.01, blocks
//!   of 128), including both proxy losses it reports, with the accumulator borrowed (its
//!   packed triangle copied to be factored);
//! - `gptq/int4-g128-asym/owned`: the same with the accumulator given by value (factored in
//!   place, as a SOLVE step does; the clone it consumes is made outside the timing);
//! - `hessian/add_rows_512`: adding one batch of 512 input rows to a 4096-wide accumulator.
//!
//! Run: `cargo bench -p shardpress-core --bench gptq` (a few minutes on 2 cores).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use shardpress_core::calibrated::{gptq_codes, GptqConfig, HessianAccumulator};
use shardpress_core::quantize::rtn_codes;
use shardpress_core::recipe::{Granularity, QuantizeConfig, ScaleDtype};
use std::hint::black_box;
use std::time::Duration;

/// Rows (out_features) and columns (in_features) of the benchmark weight.
const N: usize = 4096;
/// Rank of the correlated part of the inputs.
const RANK: usize = 32;

/// xorshift64* standard normals (Box-Muller).
fn normals(seed: u64, count: usize) -> Vec<f32> {
    let mut s = seed | 1;
    let mut uniform = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..count)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

/// Input rows `x_i = s_i (Σ_k B_ik z_k + ε_i)`, `count × N`.
fn inputs(count: usize, seed: u64) -> Vec<f32> {
    let scales: Vec<f32> = normals(seed, N).iter().map(|z| (1.5 * z).exp()).collect();
    let b = normals(seed + 1, N * RANK);
    let z = normals(seed + 2, count * RANK);
    let noise = normals(seed + 3, count * N);
    let mut x = vec![0.0f32; count * N];
    for (r, row) in x.chunks_mut(N).enumerate() {
        let zr = &z[r * RANK..(r + 1) * RANK];
        for (i, v) in row.iter_mut().enumerate() {
            let mixed: f32 = b[i * RANK..(i + 1) * RANK]
                .iter()
                .zip(zr)
                .map(|(a, b)| a * b)
                .sum();
            *v = scales[i] * (mixed / (RANK as f32).sqrt() + 0.5 * noise[r * N + i]);
        }
    }
    x
}

fn bench(c: &mut Criterion) {
    let weight: Vec<f32> = normals(1, N * N).iter().map(|w| 0.02 * w).collect();
    let x = inputs(N, 7);
    let mut hessian = HessianAccumulator::new(N);
    hessian.add_rows(&x, N).expect("inputs are whole rows");
    let quant = QuantizeConfig {
        bits: 4,
        symmetric: false,
        granularity: Granularity::Group(128),
        scale_dtype: ScaleDtype::F16,
    };
    let cfg = GptqConfig::new(quant);
    let (_, stats) = gptq_codes(&cfg, &weight, N, &hessian).expect("valid inputs");
    eprintln!(
        "gptq 4096x4096 int4-g128-asym: proxy loss {:.4e}, RTN {:.4e} (ratio {:.3})",
        stats.proxy_loss,
        stats.rtn_proxy_loss,
        stats.proxy_loss / stats.rtn_proxy_loss
    );
    let mut g = c.benchmark_group("calibrated");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20));
    g.bench_function("rtn/int4-g128-asym", |b| {
        b.iter(|| rtn_codes(&quant, black_box(&weight), N).expect("valid"))
    });
    g.bench_function("gptq/int4-g128-asym", |b| {
        b.iter(|| gptq_codes(&cfg, black_box(&weight), N, &hessian).expect("valid"))
    });
    g.bench_function("gptq/int4-g128-asym/owned", |b| {
        b.iter_batched(
            || hessian.clone(),
            |owned| gptq_codes(&cfg, black_box(&weight), N, owned).expect("valid"),
            BatchSize::LargeInput,
        )
    });
    let batch = &x[..512 * N];
    g.bench_function("hessian/add_rows_512", |b| {
        b.iter(|| {
            let mut h = HessianAccumulator::new(N);
            h.add_rows(black_box(batch), N).expect("valid");
            h
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
