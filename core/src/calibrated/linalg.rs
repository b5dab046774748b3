//! Dense f64 linear algebra for the calibrated methods: a checked wrapper of matrixmultiply's
//! dgemm, a blocked Cholesky factorisation, the upper Cholesky factor of a damped Hessian's
//! inverse (with damping retries), and the proxy loss `tr(ΔW H ΔWᵀ)`.
//!
//! **The inverse factor.** GPTQ and SparseGPT need the upper triangular `U` with
//! `H⁻¹ = Uᵀ U`. The reference computes it as Cholesky(H), then H⁻¹ from that factor, then
//! Cholesky(H⁻¹) again (about `4n³/3` flops). We compute the same `U` (the Cholesky factor
//! with positive diagonal is unique) in half of that: with `P` the index reversal, factor
//! `P H P = L Lᵀ`; then `H = (P L P)(P L P)ᵀ` with `P L P` upper triangular, so
//! `H⁻¹ = (P L P)⁻ᵀ (P L P)⁻¹` and `U = (P L P)⁻¹ = P L⁻¹ P`: one Cholesky and one
//! triangular inverse. All three steps (Cholesky, the inverse of `L`, and the rotation
//! `U[i][j] = L⁻¹[n-1-i][n-1-j]`) run in place in one `n × n` buffer, with `O(n · PANEL)`
//! scratch; the proxy loss reads the accumulator's packed triangle, so a SOLVE holds one
//! `n × n` matrix at most.
//!
//! Every parallel loop writes disjoint rows with a fixed split (strips of [`STRIP`] rows)
//! and reductions are summed in a fixed order, so results do not depend on the thread count.

use super::CalibratedError;
use rayon::prelude::*;

/// Rows per parallel task in the blocked loops.
pub(crate) const STRIP: usize = 32;
/// Columns per panel of the blocked Cholesky.
const PANEL: usize = 64;
/// How many times a failed factorisation is retried with 10× the damping.
const DAMPING_RETRIES: usize = 4;

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

/// Overwrites the lower triangle of the row-major `n × n` matrix `a` with its Cholesky factor
/// `L` (`a = L Lᵀ`); the strict upper triangle is left as scratch. Errors with the index of
/// the first pivot that is not positive (or not finite).
///
/// Right-looking and blocked: each panel of [`PANEL`] columns is factored (the diagonal
/// block sequentially, the rows below it in parallel), then the trailing lower triangle is
/// updated with dgemm in strips of rows.
pub(crate) fn cholesky_in_place(a: &mut [f64], n: usize) -> Result<(), usize> {
    for k0 in (0..n).step_by(PANEL) {
        let k1 = (k0 + PANEL).min(n);
        let (top, bottom) = a.split_at_mut(k1 * n);
        // The diagonal block.
        for i in k0..k1 {
            for j in k0..=i {
                let s =
                    top[i * n + j] - dot(&top[i * n + k0..i * n + j], &top[j * n + k0..j * n + j]);
                if i == j {
                    if !(s > 0.0 && s.is_finite()) {
                        return Err(i);
                    }
                    top[i * n + i] = s.sqrt();
                } else {
                    top[i * n + j] = s / top[j * n + j];
                }
            }
        }
        // The rows below it: a forward substitution each.
        let diag = &top[k0 * n..];
        bottom.par_chunks_mut(n).for_each(|row| {
            for j in k0..k1 {
                let lj = &diag[(j - k0) * n..];
                let s = row[j] - dot(&row[k0..j], &lj[k0..j]);
                row[j] = s / lj[j];
            }
        });
        // Trailing update of the lower triangle: A[r][c] -= Σ_k P[r][k] P[c][k], c <= r.
        let w = k1 - k0;
        let panel: Vec<f64> = bottom
            .chunks(n)
            .flat_map(|row| row[k0..k1].iter().copied())
            .collect();
        bottom
            .par_chunks_mut(STRIP * n)
            .enumerate()
            .for_each(|(s, strip)| {
                let r0 = s * STRIP;
                let m = strip.len() / n;
                // Columns k1 .. k1 + r0 + m of these rows (the lower part and the diagonal block).
                let cols = r0 + m;
                dgemm(
                    m,
                    w,
                    cols,
                    -1.0,
                    View::new(&panel[r0 * w..], w, 1),
                    View::new(&panel, 1, w),
                    1.0,
                    &mut strip[k1..],
                    n,
                );
            });
    }
    Ok(())
}

/// Inverts in place the lower triangular `L` held in the lower triangle of the row-major
/// `n × n` matrix `a` (positive diagonal): afterwards the lower triangle holds `X = L⁻¹`;
/// the strict upper triangle is not read and is left as it was.
///
/// LAPACK dtrtri's blocked right-to-left order: for each block column `J` of [`PANEL`]
/// columns, from the last, the trailing `X[J+1:, J+1:]` is already inverted and
/// `X[J+1:, J] = -(X[J+1:, J+1:] · L[J+1:, J]) · X_JJ` (from `X L = I`). The lower
/// triangular times panel product needs all of `L[J+1:, J]` before any of it is
/// overwritten, so it goes to an `(n - J_end) × PANEL` scratch, computed in parallel over
/// strips of [`STRIP`] rows (dgemm for the part left of the strip, row updates inside it);
/// the diagonal block is inverted in place first, sequentially. Memory: the scratch and one
/// `PANEL × PANEL` block besides `a`.
pub(crate) fn invert_lower_in_place(a: &mut [f64], n: usize) {
    if n == 0 {
        return;
    }
    let mut scratch = vec![0.0; n.saturating_sub(1) * PANEL];
    let mut diag_block = vec![0.0; PANEL * PANEL];
    let last = (n - 1) / PANEL * PANEL;
    for j0 in (0..=last).rev().step_by(PANEL) {
        let j1 = (j0 + PANEL).min(n);
        let w = j1 - j0;
        invert_diagonal_block(a, n, j0, j1);
        if j1 == n {
            continue;
        }
        let below = n - j1;
        {
            let x: &[f64] = a;
            scratch[..below * w]
                .par_chunks_mut(STRIP * w)
                .enumerate()
                .for_each(|(s, t)| {
                    let r0 = j1 + s * STRIP;
                    let m = t.len() / w;
                    // t[rr][c] = Σ_{k in j1..r0} X[r0+rr][k] · L[k][j0+c] (X is 0 right of r).
                    dgemm(
                        m,
                        r0 - j1,
                        w,
                        1.0,
                        View::new(&x[r0 * n + j1..], n, 1),
                        View::new(&x[j1 * n + j0..], n, 1),
                        0.0,
                        t,
                        w,
                    );
                    // ... plus the strip's own rows of X: k in r0..=r.
                    for (rr, trow) in t.chunks_mut(w).enumerate() {
                        let r = r0 + rr;
                        for k in r0..=r {
                            let xv = x[r * n + k];
                            for (tv, lv) in trow.iter_mut().zip(&x[k * n + j0..k * n + j1]) {
                                *tv += xv * lv;
                            }
                        }
                    }
                });
        }
        // X_JJ with zeros above its diagonal (the strict upper part of `a` is scratch).
        for r in 0..w {
            for c in 0..w {
                diag_block[r * w + c] = if c <= r {
                    a[(j0 + r) * n + j0 + c]
                } else {
                    0.0
                };
            }
        }
        let t: &[f64] = &scratch[..below * w];
        let xjj: &[f64] = &diag_block[..w * w];
        a[j1 * n..]
            .par_chunks_mut(STRIP * n)
            .enumerate()
            .for_each(|(s, rows)| {
                let m = rows.len() / n;
                dgemm(
                    m,
                    w,
                    w,
                    -1.0,
                    View::new(&t[s * STRIP * w..], w, 1),
                    View::new(xjj, w, 1),
                    0.0,
                    &mut rows[j0..],
                    n,
                );
            });
    }
}

/// Inverts in place the diagonal block `[j0, j1)²` of the lower triangular matrix in `a`
/// (LAPACK dtrti2, right to left): column `j` of the inverse is `-X_jj · X[j+1:, j+1:] ·
/// L[j+1:, j]`, rows updated from the bottom so that every `L` entry is read before it is
/// overwritten.
fn invert_diagonal_block(a: &mut [f64], n: usize, j0: usize, j1: usize) {
    for j in (j0..j1).rev() {
        let xjj = 1.0 / a[j * n + j];
        a[j * n + j] = xjj;
        for r in (j + 1..j1).rev() {
            let mut s = 0.0;
            for k in j + 1..=r {
                s += a[r * n + k] * a[k * n + j];
            }
            a[r * n + j] = -xjj * s;
        }
    }
}

/// Turns the lower triangular `X` in the lower triangle of `a` into the upper triangular
/// `U[i][j] = X[n-1-i][n-1-j]` in place, zeros below the diagonal: a 180° rotation, so row
/// `i` of `U` is row `n-1-i` of `a` reversed (rows swapped in pairs, in parallel).
fn rotate_lower_to_upper(a: &mut [f64], n: usize) {
    if n == 0 {
        return;
    }
    let half = n / 2;
    let (top, rest) = a.split_at_mut(half * n);
    let (middle, bottom) = rest.split_at_mut((n - 2 * half) * n);
    top.par_chunks_mut(n)
        .zip(bottom.par_chunks_mut(n).rev())
        .enumerate()
        .for_each(|(i, (upper_row, lower_row))| {
            upper_row.swap_with_slice(lower_row);
            upper_row.reverse();
            lower_row.reverse();
            upper_row[..i].fill(0.0);
            lower_row[..n - 1 - i].fill(0.0);
        });
    if !middle.is_empty() {
        middle.reverse();
        middle[..half].fill(0.0);
    }
}

/// Overwrites `a`, whose lower triangle holds `P (H + λI) P` (`P` the index reversal; the
/// strict upper triangle is not read), with the upper triangular `U` (row-major, zeros below
/// the diagonal) with `(H + λI)⁻¹ = Uᵀ U`: Cholesky, triangular inverse and rotation, all in
/// place (see the module doc). Errors with the failing pivot (in `H`'s indexing) when
/// `H + λI` is not numerically positive definite.
fn inverse_upper_factor_in_place(a: &mut [f64], n: usize) -> Result<(), usize> {
    cholesky_in_place(a, n).map_err(|i| n - 1 - i)?;
    invert_lower_in_place(a, n);
    rotate_lower_to_upper(a, n);
    Ok(())
}

/// The inverse factor `U` of `H` damped by `dampening · mean_diagonal`, in one `n × n`
/// buffer: `fill(a, λ)` must write the lower triangle (diagonal included) of
/// `P (H + λI) P` into `a` (`P` the index reversal; the rest of `a` is scratch), and is
/// called again for each retry, with 10× the damping (starting from `0.01 · mean` when the
/// configured damping is 0), up to [`DAMPING_RETRIES`] times before giving up.
pub(crate) fn damped_inverse_factor(
    n: usize,
    dampening: f64,
    mean_diagonal: f64,
    fill: impl Fn(&mut [f64], f64),
) -> Result<Vec<f64>, CalibratedError> {
    let mean = mean_diagonal;
    let first = dampening * mean;
    let mut damping = first;
    let mut pivot = 0;
    let mut a = vec![0.0; n * n];
    for _ in 0..=DAMPING_RETRIES {
        fill(&mut a, damping);
        match inverse_upper_factor_in_place(&mut a, n) {
            Ok(()) => return Ok(a),
            Err(p) => pivot = p,
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

    /// Writes `P (H + λI) P`'s lower triangle from the dense symmetric `h`, with garbage
    /// in the strict upper triangle (which must not be read).
    fn fill_reversed(h: &[f64], n: usize) -> impl Fn(&mut [f64], f64) + '_ {
        move |a: &mut [f64], damping: f64| {
            for i in 0..n {
                for j in 0..n {
                    a[i * n + j] = if j <= i {
                        h[(n - 1 - i) * n + (n - 1 - j)]
                    } else {
                        f64::NAN
                    };
                }
                a[i * n + i] += damping;
            }
        }
    }

    /// The inverse factor of the dense `h + damping·I`.
    fn inverse_upper_factor(h: &[f64], n: usize, damping: f64) -> Result<Vec<f64>, usize> {
        let mut a = vec![0.0; n * n];
        fill_reversed(h, n)(&mut a, damping);
        inverse_upper_factor_in_place(&mut a, n)?;
        Ok(a)
    }

    /// [`damped_inverse_factor`] of the dense `h`.
    fn damped_dense(h: &[f64], n: usize, dampening: f64) -> Result<Vec<f64>, CalibratedError> {
        let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n.max(1) as f64;
        damped_inverse_factor(n, dampening, mean, fill_reversed(h, n))
    }

    /// The packed upper triangle of the dense symmetric `h`.
    fn packed(h: &[f64], n: usize) -> Vec<f64> {
        (0..n)
            .flat_map(|i| h[i * n + i..(i + 1) * n].iter().copied())
            .collect()
    }

    #[test]
    fn lower_inverse_in_place_matches_the_definition() {
        // Sizes around the panel (64) and strip (32) boundaries, several panels.
        for n in [1, 2, 31, 63, 64, 65, 150, 200] {
            let h = spd(n, 5 + n as u64);
            let mut a = h.clone();
            cholesky_in_place(&mut a, n).unwrap();
            let l: Vec<f64> = (0..n * n)
                .map(|e| if e % n <= e / n { a[e] } else { 0.0 })
                .collect();
            for (e, v) in a.iter_mut().enumerate() {
                if e % n > e / n {
                    *v = 12345.0; // scratch above the diagonal: must be left alone
                }
            }
            invert_lower_in_place(&mut a, n);
            for i in 0..n {
                for j in 0..n {
                    if j > i {
                        assert_eq!(a[i * n + j], 12345.0, "n {n}: upper ({i},{j}) touched");
                        continue;
                    }
                    // (X L)[i][j] = Σ_{k=j..=i} X[i][k] L[k][j]
                    let v: f64 = (j..=i).map(|k| a[i * n + k] * l[k * n + j]).sum();
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
        let mut a = h.clone();
        cholesky_in_place(&mut a, n).unwrap();
        for i in 0..n {
            for j in 0..=i {
                let v = dot(&a[i * n..i * n + j + 1], &a[j * n..j * n + j + 1]);
                assert!(
                    (v - h[i * n + j]).abs() < 1e-9 * h[i * n + i].abs(),
                    "{i},{j}"
                );
            }
        }
    }

    #[test]
    fn inverse_factor_times_hessian_is_identity() {
        let n = 150; // three blocks of the inverse, the last partial
        let h = spd(n, 3);
        let u = inverse_upper_factor(&h, n, 0.0).unwrap();
        // (Uᵀ U) H = I
        let mut inv = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                inv[i * n + j] = (0..n).map(|k| u[k * n + i] * u[k * n + j]).sum();
            }
        }
        for i in 0..n {
            assert!(u[i * n + i] > 0.0);
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0, "U is upper triangular");
            }
            for j in 0..n {
                let v: f64 = (0..n).map(|k| inv[i * n + k] * h[k * n + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-9, "({i},{j}) = {v}");
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
        let err = damped_dense(&h, n, 0.01).unwrap_err();
        assert!(
            matches!(err, CalibratedError::NotPositiveDefinite(ref m) if m.contains("retries"))
        );
    }

    #[test]
    fn damping_retry_rescues_a_singular_matrix() {
        // Rank one: x xᵀ with x = (1, 1, 1); without damping the second pivot is 0.
        let n = 3;
        let h = vec![1.0; n * n];
        assert!(inverse_upper_factor(&h, n, 0.0).is_err());
        assert!(damped_dense(&h, n, 0.0).is_ok());
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
