//! Dense f64 linear algebra for the calibrated methods: a checked wrapper of matrixmultiply's
//! dgemm, a blocked Cholesky factorisation and triangular inverse in *packed* storage, the
//! upper Cholesky factor of a damped Hessian's inverse (with damping retries), and the proxy
//! loss `tr(ΔW H ΔWᵀ)`.
//!
//! **The inverse factor.** GPTQ and SparseGPT need the upper triangular `U` with
//! `H⁻¹ = Uᵀ U`. The reference computes it as Cholesky(H), then H⁻¹ from that factor, then
//! Cholesky(H⁻¹) again (about `4n³/3` flops). We compute the same `U` (the Cholesky factor
//! with positive diagonal is unique) in half of that: with `P` the index reversal, factor
//! `P H P = L Lᵀ`; then `H = (P L P)(P L P)ᵀ` with `P L P` upper triangular, so
//! `H⁻¹ = (P L P)⁻ᵀ (P L P)⁻¹` and `U = (P L P)⁻¹ = P L⁻¹ P`: one Cholesky and one
//! triangular inverse.
//!
//! **Packed, in place.** The accumulator keeps `H`'s upper triangle packed row by row
//! ([`super::hessian`]'s layout). Read backwards, that buffer *is* the packed lower
//! triangle (row by row) of `P H P`: so reversing it in place gives the input of a lower
//! Cholesky, and reversing the inverse `L⁻¹` again gives `U` packed upper row by row. All
//! of it (Cholesky, inverse, both reversals) runs in the one packed buffer, with
//! `O(n · PANEL)` scratch and `O(n · STRIP)` per task; no `n × n` matrix is made. Rows of
//! a packed triangle have varying strides, which dgemm cannot take: each blocked step
//! copies its panel out once into a contiguous scratch and each strip of rows forms its
//! product in a strip-sized scratch before adding it into its packed rows. Finally the
//! factor is laid out in row panels of [`FACTOR_PANEL`] rows, each a rectangle with one
//! row stride ([`UpperFactor`]), so that the sweep's block products are plain dgemm calls
//! (an in-place move that adds `n · FACTOR_PANEL / 2` values).
//!
//! **Retries.** A factorisation that fails (a pivot not positive) is undone in place (the
//! mirror image of each blocked step, so the damped matrix is restored up to rounding)
//! before the damping is raised: the input is consumed, never copied.
//!
//! Every parallel loop writes disjoint rows with a fixed split (strips of [`STRIP`] rows)
//! and reductions are summed in a fixed order, so results do not depend on the thread count.

use super::hessian::row_offset;
use super::CalibratedError;
use rayon::prelude::*;

/// Rows per parallel task in the blocked loops.
pub(crate) const STRIP: usize = 32;
/// Columns per panel of the blocked Cholesky and inverse.
const PANEL: usize = 64;
/// Rows per panel of the sweep's layout of the inverse factor ([`UpperFactor`]): the
/// reference's block size, so that its blocks are single dgemm calls.
pub(crate) const FACTOR_PANEL: usize = 128;
/// How many times a failed factorisation is retried with 10× the damping.
const DAMPING_RETRIES: usize = 4;
/// Elements per parallel task when reversing a buffer.
const REVERSE_CHUNK: usize = 1 << 16;

/// A strided read-only matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View<'a> {
    data: &'a [f64],
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    pub(crate) fn new(data: &'a [f64], rs: usize, cs: usize) -> Self {
        View { data, rs, cs }
    }
}

/// Number of elements a `rows × cols` view with strides `rs`, `cs` spans.
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1)
            .saturating_mul(rs)
            .saturating_add((cols - 1).saturating_mul(cs))
            .saturating_add(1)
    }
}

/// `C = alpha A B + beta C` for `A` `m × k`, `B` `k × n` and row-major `C` (`m × n`, row
/// stride `rsc`), every access bounds-checked up front (a failed check is a bug here, not
/// bad input: callers derive all sizes from validated shapes).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f64,
    a: View<'_>,
    b: View<'_>,
    beta: f64,
    c: &mut [f64],
    rsc: usize,
) {
    assert!(
        span(m, k, a.rs, a.cs) <= a.data.len(),
        "dgemm: A out of bounds"
    );
    assert!(
        span(k, n, b.rs, b.cs) <= b.data.len(),
        "dgemm: B out of bounds"
    );
    assert!(span(m, n, rsc, 1) <= c.len(), "dgemm: C out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for x in &mut c[i * rsc..i * rsc + n] {
                *x = if beta == 0.0 { 0.0 } else { beta * *x };
            }
        }
        return;
    }
    let stride = |s: usize| isize::try_from(s).expect("stride fits isize");
    // SAFETY: matrixmultiply reads A at `i*rsa + j*csa` for i < m, j < k, B at
    // `i*rsb + j*csb` for i < k, j < n, and reads/writes C at `i*rsc + j` for i < m, j < n.
    // The asserts above prove the largest such offset of each lies inside its slice (all
    // strides are non-negative), so every access is in bounds; `c` is a unique borrow, so C
    // aliases neither A nor B.
    unsafe {
        matrixmultiply::dgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            stride(a.rs),
            stride(a.cs),
            b.data.as_ptr(),
            stride(b.rs),
            stride(b.cs),
            beta,
            c.as_mut_ptr(),
            stride(rsc),
            1,
        );
    }
}

/// `Σ a_i b_i` over the common length, in four interleaved partial sums (a fixed order, so
/// deterministic, and it vectorizes).
#[inline]
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let mut acc = [0.0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Offset of row `i` (its first entry `L_i0`) in a packed lower triangle stored row by row.
fn lower_offset(i: usize) -> usize {
    i * (i + 1) / 2
}

/// Splits `rows`, the packed lower rows `first..end` (starting with row `first`), into
/// strips of [`STRIP`] rows counted from `first`: `(r0, r1, rows r0..r1)`. The split is
/// fixed, so the results of parallel loops over it do not depend on the thread count.
fn lower_strips(rows: &mut [f64], first: usize, end: usize) -> Vec<(usize, usize, &mut [f64])> {
    let mut out = Vec::with_capacity((end - first).div_ceil(STRIP));
    let mut rest = rows;
    let mut r0 = first;
    while r0 < end {
        let r1 = (r0 + STRIP).min(end);
        let len = lower_offset(r1) - lower_offset(r0);
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
        out.push((r0, r1, head));
        rest = tail;
        r0 = r1;
    }
    out
}

/// Reverses `a` in place, in parallel (chunks of the first half swapped with the mirrored
/// chunks of the second half).
fn reverse_in_place(a: &mut [f64]) {
    let half = a.len() / 2;
    let (left, rest) = a.split_at_mut(half);
    let right_start = rest.len() - half;
    let right = &mut rest[right_start..];
    left.par_chunks_mut(REVERSE_CHUNK)
        .zip(right.par_rchunks_mut(REVERSE_CHUNK))
        .for_each(|(l, r)| {
            for (x, y) in l.iter_mut().zip(r.iter_mut().rev()) {
                std::mem::swap(x, y);
            }
        });
}

/// Where and why a packed Cholesky stopped: the first column of the panel being factored
/// and the row (= column) whose pivot was not positive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct CholeskyFailure {
    panel: usize,
    row: usize,
}

/// Overwrites the packed lower triangle `a` (row by row, `n(n+1)/2` values) with its
/// Cholesky factor `L` (`a = L Lᵀ`). On failure (a pivot not positive or not finite) `a`
/// is left part-factored; [`undo_cholesky_packed`] restores it.
///
/// Right-looking and blocked: each panel of [`PANEL`] columns is factored (the diagonal
/// block sequentially, the rows below it in parallel strips), then the trailing lower
/// triangle is updated with dgemm in strips of rows ([`trailing_update`]).
pub(crate) fn cholesky_packed(a: &mut [f64], n: usize) -> Result<(), CholeskyFailure> {
    for k0 in (0..n).step_by(PANEL) {
        let k1 = (k0 + PANEL).min(n);
        factor_diagonal_block(a, k0, k1).map_err(|row| CholeskyFailure { panel: k0, row })?;
        let (top, bottom) = a.split_at_mut(lower_offset(k1));
        let top: &[f64] = top;
        lower_strips(bottom, k1, n)
            .into_par_iter()
            .for_each(|(r0, r1, strip)| {
                for r in r0..r1 {
                    let o = lower_offset(r) - lower_offset(r0);
                    let row = &mut strip[o..o + r + 1];
                    for j in k0..k1 {
                        let lj = &top[lower_offset(j)..lower_offset(j) + j + 1];
                        let s = row[j] - dot(&row[k0..j], &lj[k0..j]);
                        row[j] = s / lj[j];
                    }
                }
            });
        trailing_update(bottom, n, k0, k1, -1.0);
    }
    Ok(())
}

/// Factors the diagonal block `[k0, k1)²` of the packed lower `a` (its trailing update by
/// the earlier panels done), row by row. Errors with the row whose pivot is not positive;
/// that row's entries left of the diagonal are then factored, its diagonal is untouched.
fn factor_diagonal_block(a: &mut [f64], k0: usize, k1: usize) -> Result<(), usize> {
    for i in k0..k1 {
        let oi = lower_offset(i);
        for j in k0..=i {
            let oj = lower_offset(j);
            let s = a[oi + j] - dot(&a[oi + k0..oi + j], &a[oj + k0..oj + j]);
            if i == j {
                if !(s > 0.0 && s.is_finite()) {
                    return Err(i);
                }
                a[oi + i] = s.sqrt();
            } else {
                a[oi + j] = s / a[oj + j];
            }
        }
    }
    Ok(())
}

/// `A[r][c] += sign · Σ_{k in k0..k1} A[r][k] A[c][k]` for `k1 <= c <= r < n`, with
/// `bottom` the packed lower rows `k1..n`: the trailing update of a Cholesky panel
/// (`sign = -1`) or its undoing (`+1`). The panel `A[k1.., k0..k1]` is copied out once;
/// each strip of rows forms its product in a scratch (dgemm) and adds it into its rows.
fn trailing_update(bottom: &mut [f64], n: usize, k0: usize, k1: usize, sign: f64) {
    if k1 >= n {
        return;
    }
    let w = k1 - k0;
    let mut panel = vec![0.0; (n - k1) * w];
    {
        let rows: &[f64] = bottom;
        panel.par_chunks_mut(w).enumerate().for_each(|(t, p)| {
            let o = lower_offset(k1 + t) - lower_offset(k1);
            p.copy_from_slice(&rows[o + k0..o + k1]);
        });
    }
    let panel: &[f64] = &panel;
    lower_strips(bottom, k1, n)
        .into_par_iter()
        .for_each(|(r0, r1, strip)| {
            let (m, cols) = (r1 - r0, r1 - k1);
            let mut tmp = vec![0.0; m * cols];
            dgemm(
                m,
                w,
                cols,
                1.0,
                View::new(&panel[(r0 - k1) * w..], w, 1),
                View::new(panel, 1, w),
                0.0,
                &mut tmp,
                cols,
            );
            for r in r0..r1 {
                let o = lower_offset(r) - lower_offset(r0);
                let t = &tmp[(r - r0) * cols..(r - r0) * cols + (r + 1 - k1)];
                for (x, tv) in strip[o + k1..o + r + 1].iter_mut().zip(t) {
                    *x += sign * tv;
                }
            }
        });
}

/// Restores the matrix a failed [`cholesky_packed`] started from (up to rounding): each
/// step undone in reverse order, the mirror image of the forward step.
pub(crate) fn undo_cholesky_packed(a: &mut [f64], n: usize, failure: CholeskyFailure) {
    unfactor_diagonal_block(a, failure.panel, failure.row + 1, Some(failure.row));
    let mut k0 = failure.panel;
    while k0 > 0 {
        k0 -= PANEL;
        let k1 = k0 + PANEL;
        let (top, bottom) = a.split_at_mut(lower_offset(k1));
        trailing_update(bottom, n, k0, k1, 1.0);
        let top_ro: &[f64] = top;
        lower_strips(bottom, k1, n)
            .into_par_iter()
            .for_each(|(r0, r1, strip)| {
                for r in r0..r1 {
                    let o = lower_offset(r) - lower_offset(r0);
                    let row = &mut strip[o..o + r + 1];
                    for j in (k0..k1).rev() {
                        let lj = &top_ro[lower_offset(j)..lower_offset(j) + j + 1];
                        row[j] = row[j] * lj[j] + dot(&row[k0..j], &lj[k0..j]);
                    }
                }
            });
        unfactor_diagonal_block(a, k0, k1, None);
    }
}

/// Undoes [`factor_diagonal_block`] for rows `k0..end` (`partial`: the failed row, whose
/// diagonal was not written): `A[r][j] = Σ_{k0 <= k <= j} L[r][k] L[j][k]`, rows from the
/// last and each row from its diagonal leftwards, so every `L` read is still `L`.
fn unfactor_diagonal_block(a: &mut [f64], k0: usize, end: usize, partial: Option<usize>) {
    for r in (k0..end).rev() {
        let or = lower_offset(r);
        let last = if partial == Some(r) { r } else { r + 1 };
        for j in (k0..last).rev() {
            let oj = lower_offset(j);
            a[or + j] = dot(&a[or + k0..or + j + 1], &a[oj + k0..oj + j + 1]);
        }
    }
}

/// Inverts in place the lower triangular `L` in the packed lower `a` (positive diagonal):
/// afterwards `a` holds `X = L⁻¹`, packed the same way.
///
/// LAPACK dtrtri's blocked right-to-left order: for each block column `J` of [`PANEL`]
/// columns, from the last, the trailing `X[J+1:, J+1:]` is already inverted and
/// `X[J+1:, J] = -(X[J+1:, J+1:] · L[J+1:, J]) · X_JJ` (from `X L = I`). The product needs
/// all of `L[J+1:, J]` before any of it is overwritten, so that panel is copied out first;
/// each strip of [`STRIP`] rows then copies its rows of `X` into a scratch and forms its
/// two products with dgemm. The diagonal block is inverted in place first, sequentially.
pub(crate) fn invert_lower_packed(a: &mut [f64], n: usize) {
    if n == 0 {
        return;
    }
    let mut j0 = (n - 1) / PANEL * PANEL;
    loop {
        let j1 = (j0 + PANEL).min(n);
        let w = j1 - j0;
        invert_diagonal_block(a, j0, j1);
        if j1 < n {
            let (top, bottom) = a.split_at_mut(lower_offset(j1));
            let mut xjj = vec![0.0; w * w];
            for r in 0..w {
                let o = lower_offset(j0 + r) + j0;
                xjj[r * w..r * w + r + 1].copy_from_slice(&top[o..o + r + 1]);
            }
            let mut lp = vec![0.0; (n - j1) * w];
            {
                let rows: &[f64] = bottom;
                lp.par_chunks_mut(w).enumerate().for_each(|(t, p)| {
                    let o = lower_offset(j1 + t) - lower_offset(j1);
                    p.copy_from_slice(&rows[o + j0..o + j1]);
                });
            }
            let (xjj, lp): (&[f64], &[f64]) = (&xjj, &lp);
            lower_strips(bottom, j1, n)
                .into_par_iter()
                .for_each(|(r0, r1, strip)| {
                    let (m, k) = (r1 - r0, r1 - j1);
                    // The strip's rows of X, columns j1..r1 (zeros right of the diagonal).
                    let mut xs = vec![0.0; m * k];
                    for r in r0..r1 {
                        let o = lower_offset(r) - lower_offset(r0);
                        xs[(r - r0) * k..(r - r0) * k + (r + 1 - j1)]
                            .copy_from_slice(&strip[o + j1..o + r + 1]);
                    }
                    let mut t = vec![0.0; m * w];
                    dgemm(
                        m,
                        k,
                        w,
                        1.0,
                        View::new(&xs, k, 1),
                        View::new(lp, w, 1),
                        0.0,
                        &mut t,
                        w,
                    );
                    let mut out = vec![0.0; m * w];
                    dgemm(
                        m,
                        w,
                        w,
                        -1.0,
                        View::new(&t, w, 1),
                        View::new(xjj, w, 1),
                        0.0,
                        &mut out,
                        w,
                    );
                    for r in r0..r1 {
                        let o = lower_offset(r) - lower_offset(r0);
                        strip[o + j0..o + j1].copy_from_slice(&out[(r - r0) * w..(r - r0 + 1) * w]);
                    }
                });
        }
        if j0 == 0 {
            break;
        }
        j0 -= PANEL;
    }
}

/// Inverts in place the diagonal block `[j0, j1)²` of the packed lower triangular `a`
/// (LAPACK dtrti2, right to left): column `j` of the inverse is `-X_jj · X[j+1:, j+1:] ·
/// L[j+1:, j]`, rows updated from the bottom so that every `L` entry is read before it is
/// overwritten.
fn invert_diagonal_block(a: &mut [f64], j0: usize, j1: usize) {
    for j in (j0..j1).rev() {
        let oj = lower_offset(j);
        let xjj = 1.0 / a[oj + j];
        a[oj + j] = xjj;
        for r in (j + 1..j1).rev() {
            let or = lower_offset(r);
            let mut s = 0.0;
            for k in j + 1..=r {
                s += a[or + k] * a[lower_offset(k) + j];
            }
            a[or + j] = -xjj * s;
        }
    }
}

/// Permutes the symmetric matrix held as its packed upper triangle (the accumulator's
/// layout) in place: afterwards entry `(i, j)` holds the former `(order[i], order[j])`.
/// One symmetric swap of two indices per misplaced position (`O(n)` moves each), no copy.
/// `order` must be a permutation of `0..n`.
pub(crate) fn permute_packed_upper(a: &mut [f64], n: usize, order: &[usize]) {
    let at = |r: usize, c: usize| {
        let (r, c) = if r <= c { (r, c) } else { (c, r) };
        row_offset(n, r) + (c - r)
    };
    // held[p]: the original index now at position p; place[o]: where original o is.
    let mut held: Vec<usize> = (0..n).collect();
    let mut place: Vec<usize> = (0..n).collect();
    for i in 0..n {
        let k = place[order[i]];
        if k == i {
            continue;
        }
        // Swap indices i < k: rows and columns both.
        a.swap(at(i, i), at(k, k));
        for j in 0..n {
            if j != i && j != k {
                a.swap(at(i, j), at(k, j));
            }
        }
        let moved = held[i];
        held[i] = order[i];
        held[k] = moved;
        place[order[i]] = i;
        place[moved] = k;
    }
}

/// The upper triangular inverse factor `U` laid out for the sweep: row panels of
/// [`FACTOR_PANEL`] rows, panel `p` (rows `p0..p1`) a rectangle of its rows' columns
/// `p0..n` with row stride `n - p0` (zeros left of the diagonal), so any run of rows inside
/// one panel, from any column on, is a dgemm operand with one stride.
pub(crate) struct UpperFactor {
    n: usize,
    /// Offset of each panel's first row (its column `p0`).
    bases: Vec<usize>,
    data: Vec<f64>,
}

impl UpperFactor {
    /// Re-lays the packed upper `data` (row `i` from [`row_offset`]`(n, i)`) in place:
    /// every row moves to a later offset, so rows are moved from the last one.
    fn from_packed_upper(mut data: Vec<f64>, n: usize) -> Self {
        let mut bases = Vec::with_capacity(n.div_ceil(FACTOR_PANEL));
        let mut total = 0;
        for p0 in (0..n).step_by(FACTOR_PANEL) {
            bases.push(total);
            total += ((p0 + FACTOR_PANEL).min(n) - p0) * (n - p0);
        }
        // Exactly: a plain resize may double the capacity (a second triangle).
        data.reserve_exact(total - data.len());
        data.resize(total, 0.0);
        let mut factor = UpperFactor { n, bases, data };
        for i in (0..n).rev() {
            let src = row_offset(n, i);
            let dst = factor.index(i, i);
            factor.data.copy_within(src..src + (n - i), dst);
        }
        for i in 0..n {
            let p0 = i / FACTOR_PANEL * FACTOR_PANEL;
            let start = factor.index(i, p0);
            factor.data[start..start + (i - p0)].fill(0.0);
        }
        factor
    }

    /// Where `U[i][j]` (`j >= i`, or `j` at least the row's panel start) is held.
    fn index(&self, i: usize, j: usize) -> usize {
        let p = i / FACTOR_PANEL;
        let p0 = p * FACTOR_PANEL;
        self.bases[p] + (i - p0) * (self.n - p0) + (j - p0)
    }

    /// The dimension `n`.
    pub(crate) fn dim(&self) -> usize {
        self.n
    }

    /// `U[i][i..n]`.
    pub(crate) fn row(&self, i: usize) -> &[f64] {
        let at = self.index(i, i);
        &self.data[at..at + (self.n - i)]
    }

    /// `U`'s rows `rows` from column `col` on as a dgemm operand (`rows` inside one panel,
    /// `col` at least the panel's first row).
    pub(crate) fn rows_from(&self, rows: std::ops::Range<usize>, col: usize) -> View<'_> {
        let p0 = rows.start / FACTOR_PANEL * FACTOR_PANEL;
        debug_assert!(rows.end <= p0 + FACTOR_PANEL && col >= p0);
        View::new(&self.data[self.index(rows.start, col)..], self.n - p0, 1)
    }
}

/// Adds `delta` to every diagonal entry of the packed lower `a`.
fn add_to_lower_diagonal(a: &mut [f64], n: usize, delta: f64) {
    for i in 0..n {
        a[lower_offset(i) + i] += delta;
    }
}

/// The inverse factor `U` of `M + λI`, consuming `m`, the packed upper triangle (the
/// accumulator's layout) of the symmetric `M`; returns it with the damping `λ` it used.
/// `λ` starts at `dampening · mean_diagonal` and on failure is raised 10× (from
/// `0.01 · mean` when the configured damping is 0) up to [`DAMPING_RETRIES`] times, the
/// failed factorisation undone in place each time. Errors with the failing pivot (in `M`'s
/// indexing) when `M + λI` stays not numerically positive definite.
pub(crate) fn damped_inverse_factor(
    mut m: Vec<f64>,
    n: usize,
    dampening: f64,
    mean_diagonal: f64,
) -> Result<(UpperFactor, f64), CalibratedError> {
    let mean = mean_diagonal;
    let first = dampening * mean;
    let mut damping = first;
    let mut applied = 0.0;
    let mut pivot = 0;
    // The packed upper triangle read backwards is the packed lower triangle of P M P.
    reverse_in_place(&mut m);
    for _ in 0..=DAMPING_RETRIES {
        add_to_lower_diagonal(&mut m, n, damping - applied);
        applied = damping;
        match cholesky_packed(&mut m, n) {
            Ok(()) => {
                invert_lower_packed(&mut m, n);
                // P L⁻¹ P = U, packed upper.
                reverse_in_place(&mut m);
                return Ok((UpperFactor::from_packed_upper(m, n), damping));
            }
            Err(failure) => {
                pivot = n - 1 - failure.row;
                undo_cholesky_packed(&mut m, n, failure);
            }
        }
        damping = if damping > 0.0 {
            damping * 10.0
        } else {
            0.01 * mean
        };
    }
    Err(CalibratedError::NotPositiveDefinite(format!(
        "Cholesky failed at column {pivot} with damping {first:e} (dampening {dampening} of the \
         mean diagonal {mean:e}) and after {DAMPING_RETRIES} retries with 10x more damping each"
    )))
}

/// `tr(Δ H Δᵀ) = Σ_r Δ_r H Δ_rᵀ` for `Δ = result - weight` (both `rows × n`, f32
/// row-major; `Δ` formed in f64) and the symmetric `H = factor · S`, `S` given by its packed
/// upper triangle `upper` (the layout of [`super::hessian`]): `Δ H Δᵀ = Σ H_jj Δ_j² +
/// 2 Δ S' Δᵀ` with `S'` the strict upper triangle, half the flops of `Δ H`.
///
/// Per block `J` of [`PANEL`] columns, `H[..J_end, J]` strictly above the diagonal is copied
/// out of the packed triangle once into an `n × PANEL` scratch (zeros on and below the
/// diagonal); then each strip of [`STRIP`] rows forms its `Δ[:, ..J_end]` and computes
/// `T = Δ[:, ..J_end] · panel` (dgemm) and its share of the sum. Each strip's sum is kept
/// apart across blocks and the strips' sums are added in order, so the result does not
/// depend on the thread count. No `n × n` matrix and no `rows × n` copy is made.
pub(crate) fn proxy_loss(
    weight: &[f32],
    result: &[f32],
    n: usize,
    upper: &[f64],
    factor: f64,
) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let strips = weight.len().div_ceil(STRIP * n);
    let mut partial = vec![0.0; strips];
    let mut panel = vec![0.0; n * PANEL.min(n)];
    for j0 in (0..n).step_by(PANEL) {
        let j1 = (j0 + PANEL).min(n);
        let w = j1 - j0;
        let panel = &mut panel[..j1 * w];
        panel.par_chunks_mut(w).enumerate().for_each(|(k, row)| {
            let off = super::hessian::row_offset(n, k);
            for (c, v) in row.iter_mut().enumerate() {
                let j = j0 + c;
                *v = if k < j {
                    factor * upper[off + (j - k)]
                } else {
                    0.0
                };
            }
        });
        let panel: &[f64] = panel;
        let diag: Vec<f64> = (j0..j1)
            .map(|j| factor * upper[super::hessian::row_offset(n, j)])
            .collect();
        let sums: Vec<f64> = weight
            .par_chunks(STRIP * n)
            .zip(result.par_chunks(STRIP * n))
            .map(|(ws, rs)| {
                let m = ws.len() / n;
                let mut d = vec![0.0; m * j1];
                for (r, drow) in d.chunks_mut(j1).enumerate() {
                    let (wr, rr) = (&ws[r * n..r * n + j1], &rs[r * n..r * n + j1]);
                    for ((dv, &wv), &rv) in drow.iter_mut().zip(wr).zip(rr) {
                        *dv = f64::from(rv) - f64::from(wv);
                    }
                }
                let mut t = vec![0.0; m * w];
                dgemm(
                    m,
                    j1,
                    w,
                    1.0,
                    View::new(&d, j1, 1),
                    View::new(panel, w, 1),
                    0.0,
                    &mut t,
                    w,
                );
                let mut sum = 0.0;
                for (drow, trow) in d.chunks(j1).zip(t.chunks(w)) {
                    for ((&x, &tv), &hjj) in drow[j0..].iter().zip(trow).zip(&diag) {
                        sum += x * (2.0 * tv + hjj * x);
                    }
                }
                sum
            })
            .collect();
        for (p, s) in partial.iter_mut().zip(sums) {
            *p += s;
        }
    }
    partial.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A symmetric positive definite `n × n`: `B Bᵀ + n I` for a pseudo-random `B`.
    fn spd(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed | 1;
        let mut b = vec![0.0; n * n];
        for v in &mut b {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *v = (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        }
        let mut h = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                h[i * n + j] = dot(&b[i * n..(i + 1) * n], &b[j * n..(j + 1) * n]);
            }
            h[i * n + i] += n as f64 * 0.1;
        }
        h
    }

    /// The packed upper triangle of the dense symmetric `h` (the accumulator's layout).
    fn packed(h: &[f64], n: usize) -> Vec<f64> {
        (0..n)
            .flat_map(|i| h[i * n + i..(i + 1) * n].iter().copied())
            .collect()
    }

    /// The packed lower triangle of the dense `h`, row by row.
    fn packed_lower(h: &[f64], n: usize) -> Vec<f64> {
        (0..n)
            .flat_map(|i| h[i * n..i * n + i + 1].iter().copied())
            .collect()
    }

    /// The dense lower triangular matrix of a packed lower triangle.
    fn dense_lower(a: &[f64], n: usize) -> Vec<f64> {
        let mut l = vec![0.0; n * n];
        for i in 0..n {
            l[i * n..i * n + i + 1].copy_from_slice(&a[lower_offset(i)..lower_offset(i) + i + 1]);
        }
        l
    }

    /// The dense `U` of an [`UpperFactor`].
    fn dense_upper(u: &UpperFactor) -> Vec<f64> {
        let n = u.dim();
        let mut d = vec![0.0; n * n];
        for i in 0..n {
            d[i * n + i..(i + 1) * n].copy_from_slice(u.row(i));
        }
        d
    }

    /// [`damped_inverse_factor`] of the dense `h`.
    fn damped_dense(
        h: &[f64],
        n: usize,
        dampening: f64,
    ) -> Result<(UpperFactor, f64), CalibratedError> {
        let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n.max(1) as f64;
        damped_inverse_factor(packed(h, n), n, dampening, mean)
    }

    #[test]
    fn lower_inverse_in_place_matches_the_definition() {
        // Sizes around the panel (64) and strip (32) boundaries, several panels.
        for n in [1, 2, 31, 63, 64, 65, 150, 200] {
            let h = spd(n, 5 + n as u64);
            let mut a = packed_lower(&h, n);
            cholesky_packed(&mut a, n).unwrap();
            let l = dense_lower(&a, n);
            invert_lower_packed(&mut a, n);
            let x = dense_lower(&a, n);
            for i in 0..n {
                for j in 0..=i {
                    // (X L)[i][j] = Σ_{k=j..=i} X[i][k] L[k][j]
                    let v: f64 = (j..=i).map(|k| x[i * n + k] * l[k * n + j]).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((v - want).abs() < 1e-10, "n {n}: ({i},{j}) = {v}");
                }
            }
        }
    }

    #[test]
    fn cholesky_reproduces_the_matrix_across_panels() {
        let n = 150; // three panels, the last partial
        let h = spd(n, 7);
        let mut a = packed_lower(&h, n);
        cholesky_packed(&mut a, n).unwrap();
        let l = dense_lower(&a, n);
        for i in 0..n {
            for j in 0..=i {
                let v = dot(&l[i * n..i * n + j + 1], &l[j * n..j * n + j + 1]);
                assert!(
                    (v - h[i * n + j]).abs() < 1e-9 * h[i * n + i].abs(),
                    "{i},{j}"
                );
            }
        }
    }

    #[test]
    fn a_failed_cholesky_is_undone_up_to_rounding() {
        let n = 150;
        // A failing pivot in the first, second and last (partial) panel, first row of a
        // panel and inside one.
        for bad in [5, 64, 70, 140, 149] {
            let mut h = spd(n, 9);
            h[bad * n + bad] = -1.0;
            let original = packed_lower(&h, n);
            let mut a = original.clone();
            let failure = cholesky_packed(&mut a, n).unwrap_err();
            assert_eq!(failure.row, bad);
            assert_ne!(a, original, "{bad}: something was factored");
            undo_cholesky_packed(&mut a, n, failure);
            for i in 0..n {
                for j in 0..=i {
                    let (got, want) = (a[lower_offset(i) + j], h[i * n + j]);
                    let scale = (h[i * n + i].abs() * h[j * n + j].abs()).sqrt();
                    assert!(
                        (got - want).abs() <= 1e-12 * scale,
                        "{bad}: ({i},{j}) {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn inverse_factor_times_hessian_is_identity() {
        // Several Cholesky panels and factor panels (128 rows), the last partial.
        for n in [150, 300] {
            let h = spd(n, 3);
            let (factor, damping) = damped_dense(&h, n, 0.0).unwrap();
            assert_eq!(damping, 0.0);
            let u = dense_upper(&factor);
            // (Uᵀ U) H = I
            let mut inv = vec![0.0; n * n];
            for i in 0..n {
                for j in 0..n {
                    inv[i * n + j] = (0..n).map(|k| u[k * n + i] * u[k * n + j]).sum();
                }
            }
            for i in 0..n {
                assert!(u[i * n + i] > 0.0);
                for j in 0..n {
                    let v: f64 = (0..n).map(|k| inv[i * n + k] * h[k * n + j]).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((v - want).abs() < 1e-9, "n {n}: ({i},{j}) = {v}");
                }
            }
            // A block of rows inside one panel, as the sweep reads it.
            let view = factor.rows_from(130..140, 140);
            for r in 0..10 {
                for c in 0..(n - 140) {
                    assert_eq!(
                        view.data[r * view.rs + c * view.cs],
                        u[(130 + r) * n + 140 + c]
                    );
                }
            }
        }
    }

    #[test]
    fn indefinite_matrix_is_refused_after_retries() {
        let n = 4;
        let mut h = vec![0.0; n * n];
        for i in 0..n {
            h[i * n + i] = 1.0;
        }
        h[0] = -1000.0; // mean diagonal -997/4 < 0: more damping only makes it worse
        let err = damped_dense(&h, n, 0.01).err().expect("refused");
        assert!(
            matches!(err, CalibratedError::NotPositiveDefinite(ref m) if m.contains("retries"))
        );
    }

    #[test]
    fn damping_retry_rescues_a_singular_matrix() {
        // Rank one: x xᵀ with x = (1, 1, 1); without damping the second pivot is 0.
        let n = 3;
        let h = vec![1.0; n * n];
        let mut a = packed_lower(&h, n);
        assert!(cholesky_packed(&mut a, n).is_err());
        let (factor, damping) = damped_dense(&h, n, 0.0).unwrap();
        assert_eq!(damping, 0.01);
        // U is the inverse factor of H + 0.01 I, after the failed try was undone.
        let u = dense_upper(&factor);
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..n)
                    .map(|k| {
                        let inv_ik: f64 = (0..n).map(|t| u[t * n + i] * u[t * n + k]).sum();
                        inv_ik * (h[k * n + j] + if k == j { 0.01 } else { 0.0 })
                    })
                    .sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-9, "({i},{j}) = {v}");
            }
        }
    }

    #[test]
    fn packed_permutation_matches_the_definition() {
        let n = 37;
        let h: Vec<f64> = (0..n * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                (i.min(j) * 1000 + i.max(j)) as f64
            })
            .collect();
        let order: Vec<usize> = (0..n).map(|i| (i * 11 + 5) % n).collect();
        let mut a = packed(&h, n);
        permute_packed_upper(&mut a, n, &order);
        for i in 0..n {
            for j in i..n {
                assert_eq!(
                    a[row_offset(n, i) + (j - i)],
                    h[order[i] * n + order[j]],
                    "({i},{j})"
                );
            }
        }
        // Reversal across several parallel chunks, odd and even lengths.
        for len in [0, 1, 2, 3 * REVERSE_CHUNK + 5, 4 * REVERSE_CHUNK] {
            let original: Vec<f64> = (0..len).map(|i| i as f64).collect();
            let mut reversed = original.clone();
            reverse_in_place(&mut reversed);
            assert!(reversed.iter().rev().eq(original.iter()), "{len}");
        }
    }

    #[test]
    fn proxy_loss_matches_the_definition() {
        // Several column panels (the last partial) and strips of rows (the last partial).
        for (n, rows) in [(40, 70), (150, 45)] {
            let h = spd(n, 11);
            let factor = 0.37;
            let weight: Vec<f32> = (0..rows * n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let result: Vec<f32> = (0..rows * n)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 40.0)
                .collect();
            let mut want = 0.0;
            for r in 0..rows {
                let d = |i: usize| f64::from(result[r * n + i]) - f64::from(weight[r * n + i]);
                for i in 0..n {
                    for j in 0..n {
                        want += d(i) * factor * h[i * n + j] * d(j);
                    }
                }
            }
            let got = proxy_loss(&weight, &result, n, &packed(&h, n), factor);
            assert!((got - want).abs() < 1e-9 * want.abs(), "{got} vs {want}");
        }
    }
}
