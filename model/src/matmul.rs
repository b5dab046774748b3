//! Matrix products through matrixmultiply's sgemm, split over rayon.
//!
//! matrixmultiply's own threading feature is not enabled in the workspace, so parallelism is
//! ours: a Linear over many tokens is split into blocks of rows, one over few tokens into
//! blocks of output columns (each computed into its own buffer, then copied into place).
//! Each output element is one dot product whose summation order matrixmultiply fixes by its
//! depth blocking alone, so results do not depend on how the work was split or on the
//! number of threads (tested below).

use rayon::prelude::*;

use crate::Matrix;

/// Fewest rows a row block gets; below this, splitting the columns gives more parallel work.
const MIN_ROWS_PER_BLOCK: usize = 16;
/// Output columns per block when splitting by columns.
const COLUMNS_PER_BLOCK: usize = 64;

/// A strided read-only view of a row-major (or transposed) matrix.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A whole row-major matrix.
    pub fn of(matrix: &'a Matrix) -> View<'a> {
        View {
            data: &matrix.data,
            rows: matrix.rows,
            cols: matrix.cols,
            row_stride: matrix.cols,
            col_stride: 1,
        }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> View<'a> {
        View {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Index one past the last element this view touches (0 for an empty view).
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return 0;
        }
        (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
    }
}

/// `out = a · b` for a row-major `out` with `out_stride` floats per row (single-threaded).
///
/// Panics only on a caller bug (inconsistent shapes or views reaching past their slices),
/// never on user input: every caller sizes its views from checked shapes.
pub fn gemm_into(a: View, b: View, out: &mut [f32], out_stride: usize) {
    assert_eq!(a.cols, b.rows, "inner dimensions of a matrix product");
    assert!(a.extent() <= a.data.len() && b.extent() <= b.data.len());
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * out_stride + n <= out.len() && n <= out_stride);
    if k == 0 {
        for row in out.chunks_mut(out_stride).take(m) {
            row[..n].fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above establish that every element sgemm reads through a (m × k with
    // strides row_stride/col_stride) and b (k × n) lies inside their slices, and that every
    // element it writes (m × n with row stride out_stride, column stride 1) lies inside `out`,
    // which we borrow mutably, so nothing else aliases it. beta = 0 means `out` is not read.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.data.as_ptr(),
            a.row_stride as isize,
            a.col_stride as isize,
            b.data.as_ptr(),
            b.row_stride as isize,
            b.col_stride as isize,
            0.0,
            out.as_mut_ptr(),
            out_stride as isize,
            1,
        );
    }
}

/// A Linear layer: `x · weightᵀ + bias` for `x` (tokens × in) and `weight` (out × in),
/// parallel over rayon. The caller has checked `x.cols == weight.cols` and the bias length.
pub fn linear(x: &Matrix, weight: &Matrix, bias: Option<&[f32]>) -> Matrix {
    let (tokens, outputs) = (x.rows, weight.rows);
    let mut out = Matrix::zeros(tokens, outputs);
    let threads = rayon::current_num_threads().max(1);
    if tokens >= MIN_ROWS_PER_BLOCK * threads || outputs <= COLUMNS_PER_BLOCK {
        let rows_per_block = tokens.div_ceil(threads).max(MIN_ROWS_PER_BLOCK);
        let block_len = rows_per_block * outputs.max(1);
        out.data
            .par_chunks_mut(block_len)
            .enumerate()
            .for_each(|(block, out_rows)| {
                let start = block * rows_per_block;
                let rows = out_rows.len() / outputs;
                let x_rows = View {
                    data: &x.data[start * x.cols..(start + rows) * x.cols],
                    rows,
                    ..View::of(x)
                };
                gemm_into(x_rows, View::of(weight).t(), out_rows, outputs);
            });
    } else {
        let blocks: Vec<(usize, Vec<f32>)> = (0..outputs.div_ceil(COLUMNS_PER_BLOCK))
            .into_par_iter()
            .map(|block| {
                let first = block * COLUMNS_PER_BLOCK;
                let width = COLUMNS_PER_BLOCK.min(outputs - first);
                let weight_rows = View {
                    data: &weight.data[first * weight.cols..(first + width) * weight.cols],
                    rows: width,
                    ..View::of(weight)
                };
                let mut part = vec![0.0; tokens * width];
                gemm_into(View::of(x), weight_rows.t(), &mut part, width);
                (first, part)
            })
            .collect();
        for (first, part) in blocks {
            let width = part.len() / tokens.max(1);
            for (row, values) in part.chunks(width.max(1)).enumerate() {
                out.data[row * outputs + first..row * outputs + first + width]
                    .copy_from_slice(values);
            }
        }
    }
    if let Some(bias) = bias {
        out.data
            .par_chunks_mut(outputs.max(1))
            .for_each(|row| row.iter_mut().zip(bias).for_each(|(value, b)| *value += b));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(rows: usize, cols: usize, seed: u32) -> Matrix {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let data = (0..rows * cols)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        Matrix { rows, cols, data }
    }

    fn naive_linear(x: &Matrix, w: &Matrix, bias: &[f32]) -> Vec<f64> {
        let mut out = Vec::new();
        for t in 0..x.rows {
            for (o, b) in bias.iter().enumerate().take(w.rows) {
                let dot: f64 = (0..x.cols)
                    .map(|i| x.data[t * x.cols + i] as f64 * w.data[o * w.cols + i] as f64)
                    .sum();
                out.push(dot + *b as f64);
            }
        }
        out
    }

    #[test]
    fn linear_matches_a_naive_product_for_row_and_column_splits() {
        for (tokens, inputs, outputs) in [(3, 37, 200), (70, 33, 65), (1, 5, 1), (130, 64, 96)] {
            let x = pseudo_random(tokens, inputs, 1);
            let w = pseudo_random(outputs, inputs, 2);
            let bias = pseudo_random(1, outputs, 3).data;
            let ours = linear(&x, &w, Some(&bias));
            assert_eq!((ours.rows, ours.cols), (tokens, outputs));
            let reference = naive_linear(&x, &w, &bias);
            for (a, b) in ours.data.iter().zip(&reference) {
                assert!(
                    (*a as f64 - b).abs() < 1e-4,
                    "{a} vs {b} at {tokens}x{inputs}x{outputs}"
                );
            }
        }
    }

    #[test]
    fn results_are_bit_identical_whatever_the_thread_count() {
        let x = pseudo_random(40, 300, 4);
        let w = pseudo_random(500, 300, 5);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| linear(&x, &w, None))
        };
        let one = run(1);
        for threads in [2, 3, 8] {
            assert_eq!(run(threads).data, one.data, "{threads} threads");
        }
    }

    #[test]
    fn gemm_into_reads_transposed_and_strided_views() {
        let a = pseudo_random(4, 6, 6);
        let b = pseudo_random(5, 6, 7);
        let mut out = vec![0.0; 4 * 5];
        gemm_into(View::of(&a), View::of(&b).t(), &mut out, 5);
        let reference = naive_linear(&a, &b, &[0.0; 5]);
        for (x, y) in out.iter().zip(&reference) {
            assert!((*x as f64 - y).abs() < 1e-5);
        }
    }
}
