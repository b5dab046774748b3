//! The kernels both architectures share: norms, activations, rotary embeddings, attention,
//! and the stacking of sequences into one token matrix.
//!
//! Linears are token-wise, so a layer stacks every sequence's rows into one matrix for them
//! (large, well-parallelised products); attention then runs per (sequence, head), each
//! sequence alone, so no padding or attention mask between sequences is needed. Reductions
//! (norm statistics, softmax sums) accumulate in f64 so the f32 engine stays within ~1e-6 of
//! a float64 reference.

use rayon::prelude::*;

use crate::matmul::{gemm_into, View};
use crate::{Matrix, ModelError};

/// Every sequence's rows stacked into one matrix, and where each sequence starts.
pub fn stack(sequences: &[Matrix]) -> (Matrix, Vec<std::ops::Range<usize>>) {
    let cols = sequences.first().map_or(0, |first| first.cols);
    let mut ranges = Vec::with_capacity(sequences.len());
    let mut data = Vec::with_capacity(sequences.iter().map(|s| s.data.len()).sum());
    for sequence in sequences {
        let start = data.len() / cols.max(1);
        data.extend_from_slice(&sequence.data);
        ranges.push(start..start + sequence.rows);
    }
    let rows = ranges.last().map_or(0, |range| range.end);
    (Matrix { rows, cols, data }, ranges)
}

/// Splits a stacked matrix back into its sequences.
pub fn unstack(stacked: &Matrix, ranges: &[std::ops::Range<usize>]) -> Vec<Matrix> {
    ranges
        .iter()
        .map(|range| Matrix {
            rows: range.len(),
            cols: stacked.cols,
            data: stacked.data[range.start * stacked.cols..range.end * stacked.cols].to_vec(),
        })
        .collect()
}

/// LayerNorm over each row: `(x − mean) / sqrt(var + eps) · weight + bias`.
pub fn layer_norm(x: &mut Matrix, weight: &[f32], bias: &[f32], eps: f64) {
    x.data.par_chunks_mut(x.cols.max(1)).for_each(|row| {
        let n = row.len() as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((value, w), b) in row.iter_mut().zip(weight).zip(bias) {
            *value = ((*value as f64 - mean) * inv * *w as f64 + *b as f64) as f32;
        }
    });
}

/// RMSNorm over each `width`-wide chunk of every row: `x / sqrt(mean(x²) + eps) · weight`
/// (width = the row for the block norms, = head_dim for Qwen3's per-head q/k norms).
pub fn rms_norm(x: &mut Matrix, width: usize, weight: &[f32], eps: f64) {
    x.data.par_chunks_mut(width.max(1)).for_each(|chunk| {
        let mean_square =
            chunk.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / chunk.len() as f64;
        let inv = 1.0 / (mean_square + eps).sqrt();
        for (value, w) in chunk.iter_mut().zip(weight) {
            *value = (*value as f64 * inv * *w as f64) as f32;
        }
    });
}

/// Exact GELU: `x/2 · (1 + erf(x/√2))`.
pub fn gelu_erf(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))) as f32
}

/// GELU's tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
pub fn gelu_tanh(x: f32) -> f32 {
    let x = x as f64;
    let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
    (0.5 * x * (1.0 + inner.tanh())) as f32
}

/// SiLU: `x · sigmoid(x)`.
pub fn silu(x: f32) -> f32 {
    let x = x as f64;
    (x / (1.0 + (-x).exp())) as f32
}

/// Applies `f` to every element, in parallel.
pub fn map_in_place(x: &mut Matrix, f: impl Fn(f32) -> f32 + Sync) {
    x.data.par_iter_mut().for_each(|value| *value = f(*value));
}

/// Hugging Face's rotary embedding (the rotate_half convention) on every head of `x`
/// (tokens × heads·head_dim, head_dim = 2·inv_freq.len()); positions restart at 0 for each
/// sequence.
pub fn rope(x: &mut Matrix, ranges: &[std::ops::Range<usize>], inv_freq: &[f64]) {
    let half = inv_freq.len();
    let head_dim = 2 * half;
    let mut positions = vec![0usize; x.rows];
    for range in ranges {
        for (position, row) in range.clone().enumerate() {
            positions[row] = position;
        }
    }
    x.data
        .par_chunks_mut(x.cols.max(1))
        .zip(positions.par_iter())
        .for_each(|(row, &position)| {
            let angles: Vec<(f64, f64)> = inv_freq
                .iter()
                .map(|f| (position as f64 * f).sin_cos())
                .collect();
            for head in row.chunks_mut(head_dim) {
                for (i, &(sin, cos)) in angles.iter().enumerate() {
                    let (a, b) = (head[i] as f64, head[i + half] as f64);
                    head[i] = (a * cos - b * sin) as f32;
                    head[i + half] = (b * cos + a * sin) as f32;
                }
            }
        });
}

/// Shapes and masking of one attention computation.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Decoders: token i sees tokens j ≤ i only.
    pub causal: bool,
    /// Mistral: token i sees tokens j with i − j < window only.
    pub window: Option<usize>,
}

/// Scaled dot-product attention per (sequence, head) over stacked q (tokens × heads·d) and
/// k, v (tokens × kv_heads·d); query head h reads key/value head h / (heads / kv_heads).
pub fn attention(
    q: &Matrix,
    k: &Matrix,
    v: &Matrix,
    ranges: &[std::ops::Range<usize>],
    shape: AttentionShape,
) -> Matrix {
    let d = shape.head_dim;
    let group = shape.heads / shape.kv_heads;
    let work: Vec<(usize, usize)> = (0..ranges.len())
        .flat_map(|s| (0..shape.heads).map(move |h| (s, h)))
        .collect();
    let parts: Vec<Vec<f32>> = work
        .par_iter()
        .map(|&(s, h)| {
            let range = &ranges[s];
            let kv_head = h / group;
            let n = range.len();
            let mut scores = vec![0.0f32; n * n];
            gemm_into(
                head_of(q, range, h, d),
                head_of(k, range, kv_head, d).t(),
                &mut scores,
                n,
            );
            softmax_rows(&mut scores, n, 1.0 / (d as f64).sqrt(), shape);
            let mut out = vec![0.0f32; n * d];
            let probabilities = View {
                data: &scores,
                rows: n,
                cols: n,
                row_stride: n,
                col_stride: 1,
            };
            gemm_into(probabilities, head_of(v, range, kv_head, d), &mut out, d);
            out
        })
        .collect();
    let mut context = Matrix::zeros(q.rows, shape.heads * d);
    for (&(s, h), part) in work.iter().zip(&parts) {
        for (i, values) in part.chunks(d).enumerate() {
            let row = ranges[s].start + i;
            let start = row * context.cols + h * d;
            context.data[start..start + d].copy_from_slice(values);
        }
    }
    context
}

/// Head `head` (columns head·d .. (head+1)·d) of the rows `range` of `m`, as a view.
fn head_of<'m>(m: &'m Matrix, range: &std::ops::Range<usize>, head: usize, d: usize) -> View<'m> {
    View {
        data: &m.data[range.start * m.cols + head * d..],
        rows: range.len(),
        cols: d,
        row_stride: m.cols,
        col_stride: 1,
    }
}

/// Row-wise softmax of `scale · scores` with the causal / sliding-window mask applied.
fn softmax_rows(scores: &mut [f32], n: usize, scale: f64, shape: AttentionShape) {
    for (i, row) in scores.chunks_mut(n).enumerate() {
        let visible = |j: usize| {
            (!shape.causal || j <= i) && shape.window.is_none_or(|window| i < j + window)
        };
        let max = (0..n)
            .filter(|&j| visible(j))
            .map(|j| row[j] as f64 * scale)
            .fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0f64;
        let mut exps = vec![0.0f64; n];
        for (j, e) in exps.iter_mut().enumerate() {
            if visible(j) {
                *e = (row[j] as f64 * scale - max).exp();
                sum += *e;
            }
        }
        for (value, e) in row.iter_mut().zip(&exps) {
            *value = (e / sum) as f32;
        }
    }
}

/// Checks that a weight has the shape the configuration implies and returns it.
pub fn fetch<'w>(
    weights: &'w crate::Weights,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<&'w Matrix, ModelError> {
    let matrix = weights.get(name).ok_or_else(|| ModelError::MissingTensor {
        name: name.to_string(),
    })?;
    if matrix.rows != rows || matrix.cols != cols || matrix.data.len() != rows * cols {
        let shape = |r: usize, c: usize| {
            if r == 1 {
                format!("[{c}]")
            } else {
                format!("[{r}, {c}]")
            }
        };
        return Err(ModelError::BadShape {
            name: name.to_string(),
            expected: shape(rows, cols),
            found: format!(
                "{} ({} values)",
                shape(matrix.rows, matrix.cols),
                matrix.data.len()
            ),
        });
    }
    Ok(matrix)
}

/// A 1-D weight (bias or norm) of `len` values.
pub fn fetch_vector<'w>(
    weights: &'w crate::Weights,
    name: &str,
    len: usize,
) -> Result<&'w [f32], ModelError> {
    fetch(weights, name, 1, len).map(|matrix| matrix.data.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_and_silu_match_known_values() {
        assert!((gelu_erf(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu_erf(-2.0) + 0.045_500_26).abs() < 1e-6);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        assert!((silu(2.0) - 1.761_594_2).abs() < 1e-6);
    }

    #[test]
    fn causal_attention_of_the_first_token_returns_its_own_value() {
        let q = Matrix::from_vec(2, 2, vec![1.0, 0.0, 0.0, 1.0]).unwrap();
        let k = q.clone();
        let v = Matrix::from_vec(2, 2, vec![3.0, 4.0, 5.0, 6.0]).unwrap();
        let shape = AttentionShape {
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
            causal: true,
            window: None,
        };
        let one_sequence = [std::ops::Range { start: 0, end: 2 }];
        let out = attention(&q, &k, &v, &one_sequence, shape);
        assert_eq!(&out.data[..2], &[3.0, 4.0]);
        // The second token mixes both values, weighted toward its own key.
        assert!(out.data[2] > 4.0 && out.data[2] < 5.0);
    }

    #[test]
    fn rope_at_position_zero_is_the_identity_and_preserves_norms_later() {
        let mut x = Matrix::from_vec(2, 4, vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]).unwrap();
        let one_sequence = [std::ops::Range { start: 0, end: 2 }];
        let inv_freq = [1.0, 0.01];
        rope(&mut x, &one_sequence, &inv_freq);
        assert_eq!(&x.data[..4], &[1.0, 2.0, 3.0, 4.0]);
        let norm: f32 = x.data[4..].iter().map(|v| v * v).sum();
        assert!((norm - 30.0).abs() < 1e-4);
        assert_ne!(&x.data[4..], &[1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn fetch_names_the_tensor_and_both_shapes() {
        let mut weights = crate::Weights::new();
        weights.insert("w".into(), Matrix::zeros(2, 3));
        let error = fetch(&weights, "w", 3, 2).unwrap_err();
        assert_eq!(
            error,
            ModelError::BadShape {
                name: "w".into(),
                expected: "[3, 2]".into(),
                found: "[2, 3] (6 values)".into()
            }
        );
        assert!(matches!(
            fetch(&weights, "x", 1, 1),
            Err(ModelError::MissingTensor { .. })
        ));
    }
}
