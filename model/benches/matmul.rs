//! Linear-layer products: our matrixmultiply + rayon split (`matmul::linear`) against the
//! `gemm` crate with its own rayon parallelism, on the shapes calibration runs.
//!
//! `cargo bench -p shardpress-model --bench matmul --features bench-gemm` runs both; without
//! the feature only ours runs (gemm is not compiled into normal builds).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shardpress_model::matmul::linear;
use shardpress_model::Matrix;

fn pseudo_random(rows: usize, cols: usize, seed: u64) -> Matrix {
    let mut state = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    let data = (0..rows * cols)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    Matrix { rows, cols, data }
}

/// `x · weightᵀ` through gemm (weight read transposed through its strides, no copy).
#[cfg(feature = "bench-gemm")]
fn gemm_linear(x: &Matrix, weight: &Matrix) -> Matrix {
    let mut out = Matrix::zeros(x.rows, weight.rows);
    // SAFETY: out is x.rows × weight.rows row-major (row stride weight.rows, column stride 1);
    // x is x.rows × k row-major; weightᵀ is k × weight.rows read from the weight.rows × k
    // row-major weight with row stride 1 and column stride k. All three fit their buffers.
    unsafe {
        gemm::gemm(
            x.rows,
            weight.rows,
            x.cols,
            out.data.as_mut_ptr(),
            1,
            weight.rows as isize,
            false,
            x.data.as_ptr(),
            1,
            x.cols as isize,
            weight.data.as_ptr(),
            weight.cols as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
    out
}

fn bench_linear(c: &mut Criterion) {
    // (tokens, in, out): MiniLM's intermediate and output Linears over 64 sentences of 12
    // tokens, and a 4096-wide decoder projection over one short sequence.
    let shapes = [(768, 384, 1536), (768, 1536, 384), (16, 4096, 4096)];
    let mut group = c.benchmark_group("linear");
    for (tokens, inputs, outputs) in shapes {
        let x = pseudo_random(tokens, inputs, 1);
        let weight = pseudo_random(outputs, inputs, 2);
        let label = format!("{tokens}x{inputs}x{outputs}");
        group.throughput(Throughput::Elements((2 * tokens * inputs * outputs) as u64));
        group.bench_with_input(
            BenchmarkId::new("matrixmultiply+rayon", &label),
            &(),
            |b, _| b.iter(|| linear(&x, &weight, None)),
        );
        #[cfg(feature = "bench-gemm")]
        {
            let ours = linear(&x, &weight, None);
            let theirs = gemm_linear(&x, &weight);
            let worst = ours
                .data
                .iter()
                .zip(&theirs.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(worst < 1e-3, "gemm and matrixmultiply disagree by {worst}");
            group.bench_with_input(BenchmarkId::new("gemm", &label), &(), |b, _| {
                b.iter(|| gemm_linear(&x, &weight))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_linear);
criterion_main!(benches);
