//! Throughput of every preset's compression pass on a generated BF16 weight matrix, against a
//! memcpy of the same bytes. Throughput is always in bytes of *BF16 input* per second.
//!
//! The matrix is 4096 rows x 1024 columns (8 MiB BF16), Gaussian with a per-row standard
//! deviation `0.02 * exp(0.3 z)` (log-normal channel scales, as in trained weights) and one
//! weight in 2000 multiplied by 5 (a thin heavy tail). `svd50` runs on the first 1024 rows only
//! (1024 x 1024, 2 MiB): a randomized SVD is orders of magnitude slower per byte.
//!
//! For each preset with a values or structure pass there are three benchmarks:
//! - `encode_1t`: [`encode_chunk`] (the whole pass: decode, structure, values, reconstruction)
//!   inside a one-thread rayon pool, i.e. the speed of one core;
//! - `encode_all`: the same on the global rayon pool (all cores);
//! - `frame_1t`: [`EncodedChunk::frame`] alone (the entropy stage over the representation's
//!   sections) on one thread.
//!
//! `rtn/*` times [`rtn_codes`] alone on one thread, for int4 group 128 and int8 per channel,
//! once on pre-decoded f32 values and once including the BF16 -> f32 decode.
//!
//! `rtn_chunk/*` times the whole RTN encode of a chunk on one thread for the same two
//! configs, fused (what [`encode_chunk`] runs) against the general path it replaces
//! ([`encode_chunk_general`]: decode all, quantize, encode all), each also with the error
//! metrics as the pipeline computes them (`_measured`: [`encode_chunk_measured`], or the
//! general path followed by [`ErrorAccumulator::add_encoded`]).
//!
//! The stored size of each preset (frame bytes / BF16 bytes) is printed once to stderr.
//! Run: `cargo bench -p shardpress-core --bench passes` (about 3 minutes on 2 cores).

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use shardpress_core::codec::{
    encode_chunk, encode_chunk_general, encode_chunk_measured, EncodedChunk, TensorPlan,
};
use shardpress_core::dtype::{decode_to_f32, DType};
use shardpress_core::metrics::ErrorAccumulator;
use shardpress_core::quantize::rtn_codes;
use shardpress_core::recipe::PassKind;
use shardpress_core::recipe::{Granularity, QuantizeConfig, Recipe};
use std::hint::black_box;
use std::time::Duration;

/// Rows of the benchmark matrix.
const ROWS: usize = 4096;
/// Columns (the row length every pass groups along).
const COLS: usize = 1024;
/// Rows used for `svd50`.
const SVD_ROWS: usize = 1024;
/// The tensor name the presets are matched against (a projection matrix they all target).
const TENSOR_NAME: &str = "model.layers.0.mlp.up_proj.weight";
/// Presets with a values or structure pass, benchmarked in this order.
const PRESETS: [&str; 10] = [
    "int8",
    "int4-g128",
    "hqq4",
    "nf4",
    "kmeans4",
    "fp8",
    "2of4",
    "2of4-int4",
    "svd50",
    "dct25",
];

/// SplitMix64 with Box-Muller Gaussians: deterministic data without extra dependencies.
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

fn one_thread_pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a one-thread rayon pool")
}

fn configure(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>, bytes: usize) {
    group.throughput(Throughput::Bytes(bytes as u64));
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
}

fn plan_for(preset: &str, rows: usize) -> TensorPlan {
    let recipe = Recipe::preset(preset).unwrap_or_else(|| panic!("preset {preset} exists"));
    let plan = TensorPlan::for_tensor(
        &recipe,
        TENSOR_NAME,
        DType::BF16,
        &[rows as u64, COLS as u64],
    )
    .unwrap_or_else(|e| panic!("preset {preset}: {e}"));
    assert!(!plan.is_identity(), "preset {preset} targets {TENSOR_NAME}");
    plan
}

fn bench_memcpy(c: &mut Criterion, data: &[u8]) {
    let mut group = c.benchmark_group("passes/memcpy");
    configure(&mut group, data.len());
    let mut buf = Vec::with_capacity(data.len());
    group.bench_function("bf16_4096x1024", |b| {
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(black_box(data));
            black_box(buf.len())
        })
    });
    group.finish();
}

fn bench_preset(c: &mut Criterion, pool: &rayon::ThreadPool, preset: &str, full: &[u8]) {
    let rows = if preset == "svd50" { SVD_ROWS } else { ROWS };
    let data = &full[..rows * COLS * 2];
    let plan = plan_for(preset, rows);
    let encode = || encode_chunk(&plan, DType::BF16, COLS, black_box(data)).expect("encodes");
    let encoded: EncodedChunk = pool.install(encode);
    let frame_len = pool.install(|| encoded.frame().len());
    eprintln!(
        "{preset} ({rows}x{COLS}, {}): stored {:.4} of BF16 ({:.3} bits/weight), {:.3} bits/weight before entropy coding",
        plan.describe(),
        frame_len as f64 / data.len() as f64,
        frame_len as f64 * 8.0 / (rows * COLS) as f64,
        encoded.repr_bits as f64 / (rows * COLS) as f64,
    );

    let mut group = c.benchmark_group(format!("passes/{preset}"));
    configure(&mut group, data.len());
    group.bench_function("encode_1t", |b| b.iter(|| pool.install(encode)));
    group.bench_function("encode_all", |b| b.iter(encode));
    group.bench_function("frame_1t", |b| {
        b.iter(|| pool.install(|| black_box(&encoded).frame()))
    });
    group.finish();
}

fn bench_rtn(c: &mut Criterion, pool: &rayon::ThreadPool, data: &[u8]) {
    let mut values = vec![0f32; data.len() / 2];
    decode_to_f32(DType::BF16, data, &mut values).expect("BF16 decodes");
    let configs = [
        (
            "int4_g128",
            QuantizeConfig {
                bits: 4,
                symmetric: true,
                granularity: Granularity::Group(128),
                scale_dtype: shardpress_core::recipe::ScaleDtype::F16,
            },
        ),
        (
            "int8_channel",
            QuantizeConfig {
                bits: 8,
                symmetric: true,
                granularity: Granularity::Channel,
                scale_dtype: shardpress_core::recipe::ScaleDtype::F16,
            },
        ),
    ];
    let mut group = c.benchmark_group("rtn");
    configure(&mut group, data.len());
    for (name, cfg) in configs {
        group.bench_function(format!("{name}_1t"), |b| {
            b.iter(|| pool.install(|| rtn_codes(&cfg, black_box(&values), COLS).expect("codes")))
        });
        let mut scratch = vec![0f32; values.len()];
        group.bench_function(format!("{name}_with_bf16_decode_1t"), |b| {
            b.iter(|| {
                pool.install(|| {
                    decode_to_f32(DType::BF16, black_box(data), &mut scratch).expect("decodes");
                    rtn_codes(&cfg, &scratch, COLS).expect("codes")
                })
            })
        });
    }
    group.finish();
}

fn bench_rtn_chunk(c: &mut Criterion, pool: &rayon::ThreadPool, data: &[u8]) {
    let configs = [
        ("int4_g128", 4, Granularity::Group(128)),
        ("int8_channel", 8, Granularity::Channel),
    ];
    let mut group = c.benchmark_group("rtn_chunk");
    configure(&mut group, data.len());
    for (name, bits, granularity) in configs {
        let plan = TensorPlan {
            values: Some(PassKind::Quantize(QuantizeConfig {
                bits,
                symmetric: true,
                granularity,
                scale_dtype: shardpress_core::recipe::ScaleDtype::F16,
            })),
            ..TensorPlan::default()
        };
        let data = black_box(data);
        group.bench_function(format!("{name}_general_1t"), |b| {
            b.iter(|| pool.install(|| encode_chunk_general(&plan, DType::BF16, COLS, data)))
        });
        group.bench_function(format!("{name}_fused_1t"), |b| {
            b.iter(|| pool.install(|| encode_chunk(&plan, DType::BF16, COLS, data)))
        });
        group.bench_function(format!("{name}_general_measured_1t"), |b| {
            b.iter(|| {
                pool.install(|| {
                    let mut acc = ErrorAccumulator::new();
                    let chunk =
                        encode_chunk_general(&plan, DType::BF16, COLS, data).expect("encodes");
                    acc.add_encoded(DType::BF16, data, &chunk.reconstruction)
                        .expect("measures");
                    (chunk, acc)
                })
            })
        });
        group.bench_function(format!("{name}_fused_measured_1t"), |b| {
            b.iter(|| {
                pool.install(|| {
                    let mut acc = ErrorAccumulator::new();
                    let chunk = encode_chunk_measured(&plan, DType::BF16, COLS, data, &mut acc);
                    (chunk, acc)
                })
            })
        });
    }
    group.finish();
}

fn passes_benches(c: &mut Criterion) {
    let data = weight_matrix(ROWS, COLS);
    let pool = one_thread_pool();
    bench_memcpy(c, &data);
    bench_rtn(c, &pool, &data);
    bench_rtn_chunk(c, &pool, &data);
    for preset in PRESETS {
        bench_preset(c, &pool, preset, &data);
    }
}

criterion_group!(benches, passes_benches);
criterion_main!(benches);
