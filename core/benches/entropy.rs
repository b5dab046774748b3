//! Single-thread throughput of the entropy coder against memcpy and zstd level 3, on ~16 MiB
//! of generated Gaussian weights whose standard deviation changes every 1 MiB "tensor"
//! (BF16 and F32), and on ~16 MiB of int4 codes stored one per byte (symmetric round-to-nearest
//! quantization of Gaussian weights, groups of 128 with their own absmax scale). Throughput is
//! in bytes of *input* (uncompressed) per second. Every codec writes into an output buffer
//! reused across iterations (no page faults on fresh memory). The compression ratio of each
//! codec is printed once to stderr.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shardpress_core::entropy::{
    compress, compress_into, decompress, decompress_into, order0_bound, Layout,
};
use std::hint::black_box;
use std::time::Duration;

/// Bytes of generated data per codec input.
const TOTAL_BYTES: usize = 16 << 20;
/// Bytes per simulated tensor (each gets its own standard deviation).
const TENSOR_BYTES: usize = 1 << 20;

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

    fn gaussian(&mut self) -> f64 {
        let unit = |x: u64| ((x >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let (u, v) = (unit(self.next_u64()), unit(self.next_u64()));
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Gaussian weights in `layout` (Bf16 or F32), std between ~0.003 and ~0.1 per tensor.
fn weights(layout: Layout) -> Vec<u8> {
    let mut rng = Rng(42);
    let elem = layout.element_size();
    let mut out = Vec::with_capacity(TOTAL_BYTES);
    for tensor in 0..TOTAL_BYTES / TENSOR_BYTES {
        let std = 0.003 * 1.25f64.powi(tensor as i32);
        for _ in 0..TENSOR_BYTES / elem {
            let x = rng.gaussian() * std;
            match layout {
                Layout::Bf16 => out.extend_from_slice(&half::bf16::from_f64(x).to_le_bytes()),
                _ => out.extend_from_slice(&(x as f32).to_le_bytes()),
            }
        }
    }
    out
}

/// Symmetric round-to-nearest int4 codes (0..=15, zero point 8) of Gaussian weights, one
/// code per byte, with one absmax scale per group of 128 weights.
fn int4_codes() -> Vec<u8> {
    const GROUP: usize = 128;
    let mut rng = Rng(7);
    let mut out = Vec::with_capacity(TOTAL_BYTES);
    let mut group = [0f64; GROUP];
    for _ in 0..TOTAL_BYTES / GROUP {
        for w in &mut group {
            *w = rng.gaussian();
        }
        let absmax = group.iter().fold(0f64, |m, w| m.max(w.abs()));
        let scale = absmax / 7.0;
        out.extend(
            group
                .iter()
                .map(|w| ((w / scale).round().clamp(-8.0, 7.0) + 8.0) as u8),
        );
    }
    out
}

fn bench_layout(c: &mut Criterion, name: &str, layout: Layout) {
    let data = match layout {
        Layout::Bytes => int4_codes(),
        _ => weights(layout),
    };
    let ours = compress(layout, &data);
    assert_eq!(decompress(&ours).unwrap(), data);
    let zstd3 = zstd::bulk::compress(&data, 3).unwrap();
    eprintln!(
        "{name}: {} bytes; shardpress ratio {:.4}, zstd-3 ratio {:.4}, order-0 bound {:.4}",
        data.len(),
        ours.len() as f64 / data.len() as f64,
        zstd3.len() as f64 / data.len() as f64,
        order0_bound(layout, &data),
    );

    // Per-thread numbers: run everything inside a one-thread rayon pool.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut group = c.benchmark_group(format!("entropy/{name}"));
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));

    let mut buf = Vec::with_capacity(data.len());
    group.bench_function("memcpy", |b| {
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(black_box(&data));
            black_box(buf.len())
        })
    });
    let mut enc = Vec::with_capacity(data.len());
    group.bench_function("compress", |b| {
        b.iter(|| {
            enc.clear();
            pool.install(|| compress_into(layout, black_box(&data), &mut enc));
            black_box(enc.len())
        })
    });
    let mut out = Vec::with_capacity(data.len());
    group.bench_function("decompress", |b| {
        b.iter(|| {
            out.clear();
            pool.install(|| decompress_into(black_box(&ours), &mut out))
                .unwrap();
            black_box(out.len())
        })
    });
    let mut zbuf = vec![0u8; zstd::zstd_safe::compress_bound(data.len())];
    group.bench_function("zstd3_compress", |b| {
        b.iter(|| zstd::bulk::compress_to_buffer(black_box(&data), &mut zbuf, 3).unwrap())
    });
    let mut zout = vec![0u8; data.len()];
    group.bench_function("zstd3_decompress", |b| {
        b.iter(|| zstd::bulk::decompress_to_buffer(black_box(&zstd3), &mut zout).unwrap())
    });
    group.finish();
}

fn entropy_benches(c: &mut Criterion) {
    bench_layout(c, "bf16", Layout::Bf16);
    bench_layout(c, "f32", Layout::F32);
    bench_layout(c, "codes", Layout::Bytes);
}

criterion_group!(benches, entropy_benches);
criterion_main!(benches);
