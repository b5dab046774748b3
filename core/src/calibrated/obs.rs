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
//! [`STRIP`] rows: the split is fixed, so results do not depend on the thread count. Each
//! strip makes its own f64 working copy of its rows (in processing order, dead columns
//! zeroed) from the caller's f32 weight, so no weight-sized f64 copy exists.
//!
//! **The proxy loss from the sweep.** The row's total change is `Δ = q - w = -e U` (every
//! column's update is `e_i` times row `i` of `U`), so with `(H + λI)⁻¹ = Uᵀ U`,
//! `Δ (H + λI) Δᵀ = e U (Uᵀ U)⁻¹ Uᵀ eᵀ = ‖e‖²`: the damped loss is the sum of the squared
//! scaled errors, known during the sweep at no cost. [`sweep`] returns the *undamped*
//! `tr(ΔW H ΔWᵀ)` as `Σ_rows ‖e‖² - λ ‖Δ‖² - Σ_dead Δ_j²` (a dead column's diagonal is 1 in
//! the factored matrix and its row and column of `H` are exactly 0), so the methods need
//! no copy of `H` after the factor has consumed it.

use super::hessian::row_offset;
use super::linalg::{
    damped_inverse_factor, dgemm, permute_packed_upper, UpperFactor, View, FACTOR_PANEL, STRIP,
};
use super::{CalibratedError, HessianInput};
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

    /// Called once per row after its last column, with the row's final values (the targets,
    /// in processing order).
    fn finish(&self, _row: &mut S, _w: &[f64]) {}
}

/// Runs the sweep over `weight` (`states.len()` rows of `n`, f32 row-major, original column
/// order) with `factor` and the given column blocks (which must tile `0..n` in order), and
/// returns the proxy loss `tr(ΔW H ΔWᵀ)` of the targets against `weight` (see the module
/// doc), summed per row, per strip and over strips in a fixed order.
pub(crate) fn sweep<S: Send, R: ColumnRule<S>>(
    rule: &R,
    states: &mut [S],
    weight: &[f32],
    factor: &InverseFactor,
    blocks: &[Range<usize>],
) -> f64 {
    let u = &factor.u;
    let n = u.dim();
    if n == 0 {
        return 0.0;
    }
    let u_diag: Vec<f64> = (0..n).map(|i| u.row(i)[0]).collect();
    let widest = blocks.iter().map(|b| b.len()).max().unwrap_or(0);
    let damping = factor.damping;
    let sums: Vec<f64> = weight
        .par_chunks(STRIP * n)
        .zip(states.par_chunks_mut(STRIP))
        .map(|(original, ss)| {
            let m = ss.len();
            let mut ws = vec![0.0; m * n];
            factor.order_rows(original, &mut ws, n);
            let mut err = vec![0.0; m * widest];
            // Per row: Σ e², Σ Δ² over live columns, Σ Δ² over dead ones.
            let mut terms = vec![[0.0f64; 3]; m];
            for b in blocks {
                let (i1, i2) = (b.start, b.end);
                let count = i2 - i1;
                for (r, st) in ss.iter_mut().enumerate() {
                    let row = &mut ws[r * n..(r + 1) * n];
                    let orig = &original[r * n..(r + 1) * n];
                    rule.block_start(st, b.clone(), row, &u_diag);
                    for i in i1..i2 {
                        let q = rule.target(st, i, row);
                        let e = (row[i] - q) / u_diag[i];
                        let col = factor.column(i);
                        let dead = factor.dead[col];
                        let d = q - if dead { 0.0 } else { f64::from(orig[col]) };
                        terms[r][0] += e * e;
                        terms[r][1 + usize::from(dead)] += d * d;
                        row[i] = q;
                        err[r * count + (i - i1)] = e;
                        let urow = &u.row(i)[1..i2 - i];
                        for (x, uv) in row[i + 1..i2].iter_mut().zip(urow) {
                            *x -= e * uv;
                        }
                    }
                }
                if i2 < n {
                    // Rows of U inside one factor panel share a stride: one dgemm each.
                    let mut a = i1;
                    while a < i2 {
                        let b_end = ((a / FACTOR_PANEL + 1) * FACTOR_PANEL).min(i2);
                        dgemm(
                            m,
                            b_end - a,
                            n - i2,
                            -1.0,
                            View::new(&err[a - i1..], count, 1),
                            u.rows_from(a..b_end, i2),
                            1.0,
                            &mut ws[i2..],
                            n,
                        );
                        a = b_end;
                    }
                }
            }
            for (r, st) in ss.iter_mut().enumerate() {
                rule.finish(st, &ws[r * n..(r + 1) * n]);
            }
            terms
                .iter()
                .map(|[e2, live, dead]| e2 - damping * live - (1.0 + damping) * dead)
                .sum::<f64>()
        })
        .collect();
    sums.iter().sum()
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
    pub(crate) u: UpperFactor,
    /// Processing position → original column (`None`: the identity).
    pub(crate) perm: Option<Vec<usize>>,
    /// Per original column: `H_jj == 0` (never active in calibration).
    pub(crate) dead: Vec<bool>,
    /// The damping `λ` in the factored `H + λI` (after any retries).
    pub(crate) damping: f64,
}

impl InverseFactor {
    /// The original column visited at processing position `i`.
    pub(crate) fn column(&self, i: usize) -> usize {
        self.perm.as_ref().map_or(i, |p| p[i])
    }

    /// Writes `rows` (rows of `n`, f32, original order) into `out` as a sweep reads them:
    /// f64, dead columns zeroed, columns in processing order.
    pub(crate) fn order_rows(&self, rows: &[f32], out: &mut [f64], n: usize) {
        for (o, row) in out.chunks_mut(n).zip(rows.chunks(n)) {
            for (j, v) in o.iter_mut().enumerate() {
                let c = self.column(j);
                *v = if self.dead[c] { 0.0 } else { f64::from(row[c]) };
            }
        }
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
/// Memory: the accumulator's packed triangle itself (or, for a borrowed accumulator, one
/// copy of it) is normalised, permuted, damped, factored and inverted in place
/// ([`damped_inverse_factor`]); nothing else of size `n²` is made.
pub(crate) fn inverse_factor(
    hessian: HessianInput<'_>,
    dampening: f64,
    act_order: bool,
) -> Result<InverseFactor, CalibratedError> {
    check_dampening(dampening)?;
    let h = hessian.get();
    let n = h.dim();
    let factor = h.normalisation();
    let raw = h.raw_diagonal();
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
    drop(diag);
    let mut m = hessian.into_packed_upper();
    m.par_iter_mut().for_each(|v| *v *= factor);
    for (j, _) in dead.iter().enumerate().filter(|(_, &d)| d) {
        m[row_offset(n, j)] = 1.0;
    }
    if let Some(p) = &perm {
        permute_packed_upper(&mut m, n, p);
    }
    let (u, damping) = damped_inverse_factor(m, n, dampening, mean)?;
    Ok(InverseFactor {
        u,
        perm,
        dead,
        damping,
    })
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
