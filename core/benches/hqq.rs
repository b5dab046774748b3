//! Single-thread throughput and error of the HQQ quantizer, next to baselines timed in the
//! same run. Throughput is in bytes of *BF16 input* per second of one thread.
//!
//! The matrix is the one of `passes.rs`: 4096 rows x 1024 columns (8 MiB BF16), Gaussian with
//! per-row standard deviation `0.02 * exp(0.3 z)` and one weight in 2000 multiplied by 5. It
//! is decoded to f32 once; every benchmark runs inside a one-thread rayon pool:
//!
//! - `memcpy_bf16`: a copy of the BF16 bytes;
//! - `rtn_g64_asym`: [`rtn_codes`], asymmetric int4 with groups of 64 (HQQ's RTN candidate);
//! - `hqq4_g64` / `hqq4_g64_reference`: [`hqq_codes`] for the `hqq4` preset (4 bits, groups
//!   of 64, real f16 zeros), and the same through [`hqq_codes_unbatched`], the one-group solver
//!   without over-relaxation that `hqq_codes` replaced;
//! - `hqq4_g128_int_zero` / `..._reference`: the same for integer zeros with BF16 scales on
//!   groups of 128 (`w4a16-hqq` in compressed-tensors);
//! - `encode_chunk_hqq4`: the whole `hqq4` pass as a worker runs it ([`encode_chunk`]: BF16
//!   decode, codes, reconstruction).
//!
//! Before timing, it prints each HQQ configuration's relative Frobenius error for both solvers
//! (and RTN's) to stderr. Run:
//! `cargo bench -p shardpress-core --bench hqq -- --noplot` (about a minute).

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use shardpress_core::codec::{encode_chunk, TensorPlan};
use shardpress_core::dtype::{decode_to_f32, DType};
use shardpress_core::hqq::{hqq_codes, hqq_codes_unbatched, HqqConfig};
use shardpress_core::quantize::{rtn_codes, AffineCodes};
use shardpress_core::recipe::{Granularity, QuantizeConfig, Recipe, ScaleDtype};
use std::hint::black_box;
use std::time::Duration;

/// Rows of the benchmark matrix.
const ROWS: usize = 4096;
/// Columns (the row length the groups run along).
const COLS: usize = 1024;

/// SplitMix64 with Box-Muller Gaussians (as in `passes.rs`).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn gaussian(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// `rows x cols` little-endian BF16 weights: per-row std `0.02 exp(0.3 z)`, 1 in 2000 x5.
fn weight_matrix(rows: usize, cols: usize) -> Vec<u8> {
    let mut rng = Rng(7);
    let mut out = Vec::with_capacity(rows * cols * 2);
    for _ in 0..rows {
        let row_std = 0.02 * (0.3 * rng.gaussian()).exp();
        for _ in 0..cols {
            let mut x = rng.gaussian() * row_std;
            if rng.unit() < 0.0005 {
                x *= 5.0;
            }
            out.extend_from_slice(&half::bf16::from_f64(x).to_le_bytes());
        }
    }
    out
}

/// Relative Frobenius error of the codes' reconstruction against `values`.
fn rel_error(values: &[f32], codes: &AffineCodes) -> f64 {
    let mut back = vec![0f32; values.len()];
    codes.dequantize_into(&mut back);
    let (mut err, mut norm) = (0f64, 0f64);
    for (&x, &y) in values.iter().zip(&back) {
        err += (f64::from(x) - f64::from(y)).powi(2);
        norm += f64::from(x).powi(2);
    }
    (err / norm).sqrt()
}

fn configure(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>, bytes: usize) {
    group.throughput(Throughput::Bytes(bytes as u64));
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
}

fn hqq_benches(c: &mut Criterion) {
    let data = weight_matrix(ROWS, COLS);
    let mut values = vec![0f32; ROWS * COLS];
    decode_to_f32(DType::BF16, &data, &mut values).expect("BF16 decodes");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread rayon pool");

    let hqq4 = HqqConfig::new(4, Granularity::Group(64));
    let int_zero = HqqConfig {
        integer_zero: true,
        scale_dtype: ScaleDtype::Bf16,
        ..HqqConfig::new(4, Granularity::Group(128))
    };
    let rtn = QuantizeConfig {
        bits: 4,
        symmetric: false,
        granularity: Granularity::Group(64),
        scale_dtype: ScaleDtype::F16,
    };
    let rtn_error = rel_error(&values, &rtn_codes(&rtn, &values, COLS).expect("codes"));
    eprintln!("rtn int4 g64 asym: rel. Frobenius error {rtn_error:.6}");
    for (name, cfg) in [("hqq4_g64", hqq4), ("hqq4_g128_int_zero", int_zero)] {
        let new = pool.install(|| hqq_codes(&cfg, &values, COLS).expect("codes"));
        let old = pool.install(|| hqq_codes_unbatched(&cfg, &values, COLS).expect("codes"));
        let (e_new, e_old) = (rel_error(&values, &new), rel_error(&values, &old));
        eprintln!(
            "{name}: rel. Frobenius error {e_new:.6} (reference solver {e_old:.6}, {:+.3} %)",
            100.0 * (e_new / e_old - 1.0)
        );
    }

    let mut group = c.benchmark_group("hqq_1t");
    configure(&mut group, data.len());
    let mut buf = Vec::with_capacity(data.len());
    group.bench_function("memcpy_bf16", |b| {
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(black_box(&data));
            black_box(buf.len())
        })
    });
    group.bench_function("rtn_g64_asym", |b| {
        b.iter(|| pool.install(|| rtn_codes(&rtn, black_box(&values), COLS).expect("codes")))
    });
    for (name, cfg) in [("hqq4_g64", hqq4), ("hqq4_g128_int_zero", int_zero)] {
        group.bench_function(name, |b| {
            b.iter(|| pool.install(|| hqq_codes(&cfg, black_box(&values), COLS).expect("codes")))
        });
        group.bench_function(format!("{name}_reference"), |b| {
            b.iter(|| {
                pool.install(|| hqq_codes_unbatched(&cfg, black_box(&values), COLS).expect("codes"))
            })
        });
    }
    let recipe = Recipe::preset("hqq4").expect("the hqq4 preset");
    let plan = TensorPlan::for_tensor(
        &recipe,
        "model.layers.0.mlp.up_proj.weight",
        DType::BF16,
        &[ROWS as u64, COLS as u64],
    )
    .expect("hqq4 plans a projection");
    group.bench_function("encode_chunk_hqq4", |b| {
        b.iter(|| pool.install(|| encode_chunk(&plan, DType::BF16, COLS, black_box(&data))))
    });
    group.finish();
}

criterion_group!(benches, hqq_benches);
criterion_main!(benches);
