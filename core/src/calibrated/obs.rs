//! The optimal-brain-surgeon column sweep shared by GPTQ and SparseGPT, with the reference
//! implementation's lazy block updates.
//!
//! Columns are visited in order; each column `i` of a row takes a target value `q` chosen by
//! the method (a quantized value, or 0 when pruned), and the error is spread over the
//! columns not yet visited: with `U` the upper Cholesky factor of `H⁻¹` and
//! `e = (w_i - q) / U_ii`, `w_j -= e · U_ij` for `j > i`. Inside a block the update is applied
//! column by column to the block's columns; the rest of the row receives the block's errors
//! at once, as one matrix product `W[:, end..] -= E · U[block, end..]` (dgemm). At the start
//! of a block every column at or after it is therefore fully up to date.
//!
//! A row's sweep depends only on that row (and `U`), so rows run in parallel in strips of
//! [`STRIP`] rows: the split is fixed, so results do not depend on the thread count.

use super::hessian::row_offset;
use super::linalg::{damped_inverse_factor, dgemm, View, STRIP};
use super::{CalibratedError, HessianAccumulator};
use rayon::prelude::*;
use std::ops::Range;

/// What a method decides during the sweep, per row; `S` is the per-row state (e.g. the
/// row's output slices and its current group parameters).
pub(crate) trait ColumnRule<S>: Sync {
    /// Called before the first column of each block with the row's current values (every
    /// column from `block.start` on is up to date) and the diagonal of `U`.
    fn block_start(&self, _row: &mut S, _block: Range<usize>, _w: &[f64], _u_diag: &[f64]) {}

    /// The value column `col` takes, given the row's current values `w` (columns from `col`
    /// to the block's end are up to date).
    fn target(&self, row: &mut S, col: usize, w: &[f64]) -> f64;
}

/// Runs the sweep over `w` (`states.len()` rows of `n`, row-major, overwritten with the
/// targets) with the inverse factor `u` (`n × n`, upper) and the given column blocks (which
/// must tile `0..n` in order).
pub(crate) fn sweep<S: Send, R: ColumnRule<S>>(
    rule: &R,
    states: &mut [S],
    w: &mut [f64],
    n: usize,
    u: &[f64],
    blocks: &[Range<usize>],
) {
    let u_diag: Vec<f64> = (0..n).map(|i| u[i * n + i]).collect();
    let widest = blocks.iter().map(|b| b.len()).max().unwrap_or(0);
    w.par_chunks_mut(STRIP * n)
        .zip(states.par_chunks_mut(STRIP))
        .for_each(|(ws, ss)| {
            let m = ss.len();
            let mut err = vec![0.0; m * widest];
            for b in blocks {
                let (i1, i2) = (b.start, b.end);
                let count = i2 - i1;
                for (r, st) in ss.iter_mut().enumerate() {
                    let row = &mut ws[r * n..(r + 1) * n];
                    rule.block_start(st, b.clone(), row, &u_diag);
                    for i in i1..i2 {
                        let q = rule.target(st, i, row);
                        let e = (row[i] - q) / u_diag[i];
                        row[i] = q;
                        err[r * count + (i - i1)] = e;
                        let urow = &u[i * n + i + 1..i * n + i2];
                        for (x, uv) in row[i + 1..i2].iter_mut().zip(urow) {
                            *x -= e * uv;
                        }
                    }
                }
                if i2 < n {
                    dgemm(
                        m,
                        count,
                        n - i2,
                        -1.0,
                        View::new(&err, count, 1),
                        View::new(&u[i1 * n + i2..], n, 1),
                        1.0,
                        &mut ws[i2..],
                        n,
                    );
                }
            }
        });
}

/// Consecutive blocks of at most `block_size` columns tiling `0..n`, cut so that every
/// aligned run of `align` columns (a quantization group, an N:M run) either lies inside one
/// block or starts a block: then when the run's first column is reached, all of its columns
/// hold their current values. `align` of 0 or 1 means no constraint.
pub(crate) fn blocks(n: usize, block_size: usize, align: usize) -> Vec<Range<usize>> {
    let block_size = block_size.max(1);
    let align = align.max(1);
    let mut out = Vec::new();
    let mut i1 = 0;
    while i1 < n {
        let mut i2 = (i1 + block_size).min(n);
        // The last run starting strictly inside the block; if it crosses the block's end,
        // end the block where it starts.
        let last = (i2 - 1) / align * align;
        if last > i1 && (last + align).min(n) > i2 {
            i2 = last;
        }
        out.push(i1..i2);
        i1 = i2;
    }
    out
}

/// The inverse factor of a Linear's damped Hessian, in the order a sweep visits its
/// columns: it depends on the Hessian only, so every weight (or quantizer) swept with the
/// same Hessian can share it.
pub(crate) struct InverseFactor {
    /// Upper `U` with `(H + λI)⁻¹ = Uᵀ U`, in processing order.
    pub(crate) u: Vec<f64>,
    /// Processing position → original column (`None`: the identity).
    pub(crate) perm: Option<Vec<usize>>,
    /// Per original column: `H_jj == 0` (never active in calibration).
    pub(crate) dead: Vec<bool>,
}

impl InverseFactor {
    /// `weight` (rows of `n`) as a sweep reads it: f64, dead columns zeroed, columns in
    /// processing order.
    pub(crate) fn ordered_weight(&self, weight: &[f32], n: usize) -> Vec<f64> {
        let mut w = vec![0.0; weight.len()];
        w.par_chunks_mut(n.max(1))
            .zip(weight.par_chunks(n.max(1)))
            .for_each(|(out, row)| {
                for (j, o) in out.iter_mut().enumerate() {
                    let c = self.perm.as_ref().map_or(j, |p| p[j]);
                    *o = if self.dead[c] { 0.0 } else { f64::from(row[c]) };
                }
            });
        w
    }
}

/// Refuses a dampening that is negative, NaN or infinite.
pub(crate) fn check_dampening(dampening: f64) -> Result<(), CalibratedError> {
    if !(dampening >= 0.0 && dampening.is_finite()) {
        return Err(CalibratedError::BadConfig(format!(
            "dampening {dampening} is not a finite fraction >= 0"
        )));
    }
    Ok(())
}

/// The [`InverseFactor`] as the GPTQ/SparseGPT reference builds it: dead columns
/// (`H_jj == 0`) get `H_jj = 1` (and zero weights); with `act_order` columns are visited in
/// descending `diag(H)` order (ties: lower index first); damping `dampening · mean(diag H)`.
///
/// Memory: the damped, permuted and reversed matrix is written straight from the
/// accumulator's packed triangle into the one `n × n` buffer that becomes `U` (no dense
/// copy of `H`, no permuted copy).
pub(crate) fn inverse_factor(
    n: usize,
    hessian: &HessianAccumulator,
    dampening: f64,
    act_order: bool,
) -> Result<InverseFactor, CalibratedError> {
    check_dampening(dampening)?;
    let factor = hessian.normalisation();
    let upper = hessian.packed_upper();
    let raw = hessian.raw_diagonal();
    let dead: Vec<bool> = raw.iter().map(|&s| factor * s == 0.0).collect();
    let diag: Vec<f64> = raw
        .iter()
        .zip(&dead)
        .map(|(&s, &d)| if d { 1.0 } else { factor * s })
        .collect();
    drop(raw);
    let perm = act_order.then(|| {
        let mut p: Vec<usize> = (0..n).collect();
        p.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]).then(a.cmp(&b)));
        p
    });
    let mean = diag.iter().sum::<f64>() / n.max(1) as f64;
    // H_xy in original indexing (dead diagonals 1).
    let entry = |x: usize, y: usize| -> f64 {
        if x == y {
            diag[x]
        } else {
            let (lo, hi) = if x < y { (x, y) } else { (y, x) };
            factor * upper[row_offset(n, lo) + (hi - lo)]
        }
    };
    // Lower triangle of P (H_perm + λI) P: a[i][j] = H[q(n-1-i)][q(n-1-j)], q the order.
    let fill = |a: &mut [f64], damping: f64| {
        a.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
            let r = n - 1 - i;
            match &perm {
                None => {
                    // H[r][n-1-j] for j <= i: packed row r read backwards.
                    let src = &upper[row_offset(n, r)..row_offset(n, r) + i + 1];
                    for (v, s) in row[..i].iter_mut().zip(src.iter().rev()) {
                        *v = factor * s;
                    }
                    row[i] = diag[r];
                }
                Some(p) => {
                    let x = p[r];
                    for (j, v) in row[..=i].iter_mut().enumerate() {
                        *v = entry(x, p[n - 1 - j]);
                    }
                }
            }
            row[i] += damping;
        });
    };
    let u = damped_inverse_factor(n, dampening, mean, fill)?;
    Ok(InverseFactor { u, perm, dead })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_tile_and_keep_runs_whole() {
        for n in [1, 7, 100, 128, 300, 1000] {
            for block in [1, 16, 100, 128] {
                for align in [0, 1, 4, 32, 64, 100, 128, 256, 1000] {
                    let b = blocks(n, block, align);
                    assert_eq!(b.first().map(|r| r.start), Some(0));
                    assert_eq!(b.last().map(|r| r.end), Some(n));
                    for w in b.windows(2) {
                        assert_eq!(w[0].end, w[1].start);
                    }
                    let a = align.max(1);
                    for r in &b {
                        assert!(!r.is_empty() && r.len() <= block.max(1));
                        for g in (0..n).step_by(a).filter(|g| r.contains(g)) {
                            assert!(
                                g == r.start || (g + a).min(n) <= r.end,
                                "{n} {block} {align} {r:?}"
                            );
                        }
                    }
                }
            }
        }
    }
}
