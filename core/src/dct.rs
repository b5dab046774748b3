//! Experimental transform coding: blockwise DCT-II with top-k coefficient selection
//! ("compressed sensing" style sparsification in a fixed basis).
//!
//! Each row of `row_len` values is cut into blocks of `block` elements (the last block of a
//! row has its own length `L = row_len % block` when that is non-zero). A block `x` of
//! length `L` is transformed by the orthonormal DCT-II
//!
//! `X_k = s_k sum_{i<L} x_i cos(pi (2i + 1) k / (2L))`, `s_0 = sqrt(1/L)`, `s_k = sqrt(2/L)`,
//!
//! whose inverse is the transpose (DCT-III): `x_i = sum_k s_k X_k cos(pi (2i + 1) k / (2L))`.
//! In every block the `c = clamp(round(keep * L), 1, L)` coefficients of largest `|X_k|`
//! are kept (ties: lower frequency first), stored as their count, their positions (in
//! increasing order) and values. Because the transform is orthonormal (Parseval), the
//! squared reconstruction error of a block is exactly the energy of its dropped
//! coefficients; the kept sets are nested in `keep`, so the error never increases with
//! `keep`, and `keep = 1` is lossless up to f32 rounding.
//!
//! The cosine matrix is computed in f64 once per distinct block length and stored as f32;
//! the transforms are O(L^2) per block written as axpy loops (vectorizable), and the
//! inverse touches only kept coefficients (O(c L)). Rows are processed in parallel and
//! concatenated in order, so the output does not depend on the thread count.

use rayon::prelude::*;

/// Largest supported block length (positions are stored as u16; cost is O(block^2)).
pub const MAX_BLOCK: usize = 1024;

/// Invalid DCT input or a corrupt [`DctSparse`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DctError {
    #[error("row length must be positive")]
    ZeroRowLen,
    #[error("tensor of {len} values is not a whole number of rows of {row_len}")]
    RaggedRows { len: usize, row_len: usize },
    #[error("block length {0} is not in 1..={MAX_BLOCK}")]
    InvalidBlock(usize),
    #[error("keep fraction {0} is not in [0, 1]")]
    InvalidKeep(f64),
    #[error("value at index {index} is not finite")]
    NonFinite { index: usize },
    #[error("corrupt DCT data: {0}")]
    Corrupt(&'static str),
}

/// A blockwise-DCT sparse encoding of a row-major tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct DctSparse {
    pub row_len: usize,
    pub block: usize,
    /// Number of kept coefficients of each block, blocks in row-major order.
    pub kept_per_block: Vec<u16>,
    /// Frequency index of each kept coefficient within its block, increasing per block.
    pub positions: Vec<u16>,
    /// Kept coefficient values, aligned with `positions`.
    pub coeffs: Vec<f32>,
}

/// The orthonormal DCT-II matrix of one block length: `c[k * len + i]`.
struct Basis {
    len: usize,
    /// Row `k` is the `k`-th basis vector.
    c: Vec<f32>,
    /// Transpose: row `i` holds `c[k][i]` for all `k`.
    ct: Vec<f32>,
}

impl Basis {
    fn new(len: usize) -> Self {
        let mut c = vec![0f32; len * len];
        let mut ct = vec![0f32; len * len];
        let l = len as f64;
        for k in 0..len {
            let s = if k == 0 {
                (1.0 / l).sqrt()
            } else {
                (2.0 / l).sqrt()
            };
            for i in 0..len {
                let v =
                    s * (std::f64::consts::PI * (2 * i + 1) as f64 * k as f64 / (2.0 * l)).cos();
                c[k * len + i] = v as f32;
                ct[i * len + k] = v as f32;
            }
        }
        Basis { len, c, ct }
    }

    /// Forward transform of `x` (length `len`) into `out`.
    fn forward(&self, x: &[f32], out: &mut [f32]) {
        out.fill(0.0);
        for (&xi, col) in x.iter().zip(self.ct.chunks_exact(self.len)) {
            for (o, &b) in out.iter_mut().zip(col) {
                *o += xi * b;
            }
        }
    }
}

/// The bases for full blocks and for the trailing partial block of a row (if any).
fn bases(row_len: usize, block: usize) -> (Basis, Option<Basis>) {
    let full = Basis::new(block.min(row_len));
    let rem = row_len % block;
    let partial = (rem != 0 && row_len > block).then(|| Basis::new(rem));
    (full, partial)
}

/// Basis for the block starting at `start` of a row.
fn basis_at<'a>(
    full: &'a Basis,
    partial: &'a Option<Basis>,
    start: usize,
    row_len: usize,
) -> &'a Basis {
    match partial {
        Some(p) if row_len - start < full.len => p,
        _ => full,
    }
}

/// Kept coefficients for a block of `len`: `clamp(round(keep * len), 1, len)`.
fn kept_count(len: usize, keep: f64) -> usize {
    ((keep * len as f64).round() as usize).clamp(1, len)
}

fn check_shape(len: usize, row_len: usize, block: usize) -> Result<usize, DctError> {
    if row_len == 0 {
        return Err(DctError::ZeroRowLen);
    }
    if len % row_len != 0 {
        return Err(DctError::RaggedRows { len, row_len });
    }
    if block == 0 || block > MAX_BLOCK {
        return Err(DctError::InvalidBlock(block));
    }
    Ok(len / row_len)
}

/// Encodes `values` (rows of `row_len`) by blockwise DCT-II keeping the `keep` fraction of
/// largest-magnitude coefficients per block (at least one). See the module docs.
pub fn dct_topk(
    values: &[f32],
    row_len: usize,
    block: usize,
    keep: f64,
) -> Result<DctSparse, DctError> {
    check_shape(values.len(), row_len, block)?;
    if !(0.0..=1.0).contains(&keep) {
        return Err(DctError::InvalidKeep(keep));
    }
    if let Some(index) = values.iter().position(|x| !x.is_finite()) {
        return Err(DctError::NonFinite { index });
    }
    let (full, partial) = bases(row_len, block);
    let per_row: Vec<(Vec<u16>, Vec<u16>, Vec<f32>)> = values
        .par_chunks(row_len)
        .with_min_len((4096 / row_len).max(1))
        .map(|row| {
            let mut kept = Vec::new();
            let mut positions = Vec::new();
            let mut coeffs = Vec::new();
            let mut buf = vec![0f32; full.len];
            let mut order: Vec<usize> = Vec::with_capacity(full.len);
            for (b, x) in row.chunks(block).enumerate() {
                let basis = basis_at(&full, &partial, b * block, row_len);
                let len = basis.len;
                let coef = &mut buf[..len];
                basis.forward(x, coef);
                let c = kept_count(len, keep);
                order.clear();
                order.extend(0..len);
                if c < len {
                    order.select_nth_unstable_by(c - 1, |&i, &j| {
                        coef[j].abs().total_cmp(&coef[i].abs()).then(i.cmp(&j))
                    });
                }
                let top = &mut order[..c];
                top.sort_unstable();
                kept.push(c as u16);
                positions.extend(top.iter().map(|&i| i as u16));
                coeffs.extend(top.iter().map(|&i| coef[i]));
            }
            (kept, positions, coeffs)
        })
        .collect();
    let mut out = DctSparse {
        row_len,
        block,
        kept_per_block: Vec::new(),
        positions: Vec::new(),
        coeffs: Vec::new(),
    };
    for (k, p, c) in per_row {
        out.kept_per_block.extend(k);
        out.positions.extend(p);
        out.coeffs.extend(c);
    }
    Ok(out)
}

impl DctSparse {
    /// Bytes of the encoding: 2 per block count, 2 per position, 4 per coefficient.
    pub fn stored_bytes(&self) -> usize {
        2 * self.kept_per_block.len() + 2 * self.positions.len() + 4 * self.coeffs.len()
    }

    /// Inverse DCT of the kept coefficients into `out` (rows of `row_len`). Validates the
    /// whole encoding first (block counts, positions in range and increasing, lengths).
    pub fn reconstruct_into(&self, out: &mut [f32]) -> Result<(), DctError> {
        let (row_len, block) = (self.row_len, self.block);
        let rows = check_shape(out.len(), row_len, block)?;
        let blocks_per_row = row_len.div_ceil(block);
        if Some(self.kept_per_block.len()) != rows.checked_mul(blocks_per_row) {
            return Err(DctError::Corrupt(
                "block count does not match the output shape",
            ));
        }
        if self.positions.len() != self.coeffs.len() {
            return Err(DctError::Corrupt(
                "positions and coefficients differ in length",
            ));
        }
        // Per-row offsets into positions/coeffs, validating every block on the way.
        let mut row_offsets = Vec::with_capacity(rows + 1);
        let mut offset = 0usize;
        for (b, &count) in self.kept_per_block.iter().enumerate() {
            if b % blocks_per_row.max(1) == 0 {
                row_offsets.push(offset);
            }
            let start = (b % blocks_per_row) * block;
            let len = block.min(row_len - start);
            let end = offset + usize::from(count);
            if usize::from(count) > len || end > self.positions.len() {
                return Err(DctError::Corrupt("too many kept coefficients"));
            }
            let pos = &self.positions[offset..end];
            if pos.windows(2).any(|w| w[0] >= w[1])
                || pos.last().is_some_and(|&p| usize::from(p) >= len)
            {
                return Err(DctError::Corrupt(
                    "positions out of range or not increasing",
                ));
            }
            offset = end;
        }
        if offset != self.positions.len() {
            return Err(DctError::Corrupt("trailing coefficients"));
        }
        row_offsets.push(offset);
        if rows == 0 {
            return Ok(());
        }
        let (full, partial) = bases(row_len, block);
        out.par_chunks_mut(row_len)
            .with_min_len((4096 / row_len).max(1))
            .enumerate()
            .for_each(|(r, row)| {
                row.fill(0.0);
                let mut at = row_offsets[r];
                let counts = &self.kept_per_block[r * blocks_per_row..(r + 1) * blocks_per_row];
                for ((b, x), &count) in row.chunks_mut(block).enumerate().zip(counts) {
                    let basis = basis_at(&full, &partial, b * block, row_len);
                    let end = at + usize::from(count);
                    for (&p, &c) in self.positions[at..end].iter().zip(&self.coeffs[at..end]) {
                        let p = usize::from(p);
                        let v = &basis.c[p * basis.len..(p + 1) * basis.len];
                        for (o, &bv) in x.iter_mut().zip(v) {
                            *o += c * bv;
                        }
                    }
                    at = end;
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests;
