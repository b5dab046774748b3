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
//! triangular inverse.
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

/// `L⁻¹` of a lower triangular `L` (row-major lower triangle of `l`, positive diagonal),
/// returned transposed: row `j` of the result holds column `j` of `L⁻¹` (zero before `j`).
///
/// Blocked forward substitution: rows of the result are split into blocks of [`PANEL`]
/// (columns of `L⁻¹`), each an independent task; within one, every later block of
/// [`PANEL`] entries is the dgemm of the entries already solved with the matching part of
/// `L`, then a small triangular solve. (Column-by-column substitution streams all of `L`
/// once per column: memory-bound and an order of magnitude slower at n = 4096.)
fn lower_inverse_transposed(l: &[f64], n: usize) -> Vec<f64> {
    let mut xt = vec![0.0; n * n];
    xt.par_chunks_mut(PANEL * n.max(1))
        .enumerate()
        .for_each(|(b, rows)| {
            let j0 = b * PANEL;
            let nb = rows.len() / n;
            let j1 = j0 + nb;
            for jj in 0..nb {
                let j = j0 + jj;
                let xj = &mut rows[jj * n..(jj + 1) * n];
                xj[j] = 1.0 / l[j * n + j];
                for i in j + 1..j1 {
                    xj[i] = -dot(&l[i * n + j..i * n + i], &xj[j..i]) / l[i * n + i];
                }
            }
            let mut tmp = vec![0.0; nb * PANEL];
            for i0 in (j1..n).step_by(PANEL) {
                let i1 = (i0 + PANEL).min(n);
                let w = i1 - i0;
                // tmp[jj][ii] = Σ_{k in j0..i0} Xt[j0+jj][k] · L[i0+ii][k] (Xt is 0 for k < j).
                dgemm(
                    nb,
                    i0 - j0,
                    w,
                    1.0,
                    View::new(&rows[j0..], n, 1),
                    View::new(&l[i0 * n + j0..], 1, n),
                    0.0,
                    &mut tmp,
                    w,
                );
                for jj in 0..nb {
                    let xj = &mut rows[jj * n..(jj + 1) * n];
                    for i in i0..i1 {
                        let s = tmp[jj * w + (i - i0)] + dot(&l[i * n + i0..i * n + i], &xj[i0..i]);
                        xj[i] = -s / l[i * n + i];
                    }
                }
            }
        });
    xt
}

/// The upper triangular `U` (row-major, zeros below the diagonal) with `(H + λI)⁻¹ = Uᵀ U`,
/// for the symmetric `h` (`n × n`), `λ = damping`. Errors with the failing pivot (in `h`'s
/// indexing) when `H + λI` is not numerically positive definite.
fn inverse_upper_factor(h: &[f64], n: usize, damping: f64) -> Result<Vec<f64>, usize> {
    // P (H + λI) P: reverse rows and columns.
    let mut a = vec![0.0; n * n];
    a.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
        let src = &h[(n - 1 - i) * n..(n - i) * n];
        for (j, v) in row.iter_mut().enumerate().take(i + 1) {
            *v = src[n - 1 - j];
        }
        row[i] += damping;
    });
    cholesky_in_place(&mut a, n).map_err(|i| n - 1 - i)?;
    let xt = lower_inverse_transposed(&a, n);
    drop(a);
    // U[i][j] = (L⁻¹)[n-1-i][n-1-j] = xt[n-1-j][n-1-i] for j >= i: a transpose, done in
    // tiles so both sides stay in cache.
    let mut u = vec![0.0; n * n];
    u.par_chunks_mut(PANEL * n.max(1))
        .enumerate()
        .for_each(|(b, strip)| {
            let i0 = b * PANEL;
            let m = strip.len() / n;
            for j0 in (i0..n).step_by(PANEL) {
                for j in j0..(j0 + PANEL).min(n) {
                    let src = &xt[(n - 1 - j) * n..(n - j) * n];
                    for r in 0..m.min(j + 1 - i0) {
                        strip[r * n + j] = src[n - 1 - (i0 + r)];
                    }
                }
            }
        });
    Ok(u)
}

/// [`inverse_upper_factor`] of `h` damped by `dampening · mean(diag h)`, retried up to
/// [`DAMPING_RETRIES`] times with 10× the damping (starting from `0.01 · mean` when the
/// configured damping is 0) before giving up.
pub(crate) fn damped_inverse_factor(
    h: &[f64],
    n: usize,
    dampening: f64,
) -> Result<Vec<f64>, CalibratedError> {
    let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n.max(1) as f64;
    let first = dampening * mean;
    let mut damping = first;
    let mut pivot = 0;
    for _ in 0..=DAMPING_RETRIES {
        match inverse_upper_factor(h, n, damping) {
            Ok(u) => return Ok(u),
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

/// `tr(Δ H Δᵀ) = Σ_r Δ_r H Δ_rᵀ` for `delta` (`rows × n`, row-major) and a symmetric `h`
/// (`n × n`), reading only `h`'s upper triangle: `Δ H Δᵀ = Σ H_jj Δ_j² + 2 Δ S Δᵀ` with `S`
/// the strict upper triangle, so half the flops of `Δ H`. `T = Δ S` is built per block of
/// [`PANEL`] columns (dgemm for the rows above the block, short dot products inside it), in
/// strips of rows; each strip's sum is kept apart and the sums are added in order.
pub(crate) fn proxy_loss(delta: &[f64], h: &[f64], n: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let partial: Vec<f64> = delta
        .par_chunks(STRIP * n)
        .map(|strip| {
            let m = strip.len() / n;
            let mut t = vec![0.0; m * n];
            for j0 in (0..n).step_by(PANEL) {
                let j1 = (j0 + PANEL).min(n);
                dgemm(
                    m,
                    j0,
                    j1 - j0,
                    1.0,
                    View::new(strip, n, 1),
                    View::new(&h[j0..], n, 1),
                    0.0,
                    &mut t[j0..],
                    n,
                );
                for r in 0..m {
                    let d = &strip[r * n..(r + 1) * n];
                    for j in j0..j1 {
                        t[r * n + j] += dot(&d[j0..j], &h[j * n + j0..j * n + j]);
                    }
                }
            }
            let mut sum = 0.0;
            for (r, d) in strip.chunks(n).enumerate() {
                for (j, &x) in d.iter().enumerate() {
                    sum += x * (2.0 * t[r * n + j] + h[j * n + j] * x);
                }
            }
            sum
        })
        .collect();
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
        let err = damped_inverse_factor(&h, n, 0.01).unwrap_err();
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
        assert!(damped_inverse_factor(&h, n, 0.0).is_ok());
    }

    #[test]
    fn proxy_loss_matches_the_definition() {
        let n = 40;
        let h = spd(n, 11);
        let rows = 70;
        let delta: Vec<f64> = (0..rows * n)
            .map(|i| ((i * 37 % 101) as f64 - 50.0) / 50.0)
            .collect();
        let mut want = 0.0;
        for r in 0..rows {
            for i in 0..n {
                for j in 0..n {
                    want += delta[r * n + i] * h[i * n + j] * delta[r * n + j];
                }
            }
        }
        let got = proxy_loss(&delta, &h, n);
        assert!((got - want).abs() < 1e-9 * want.abs(), "{got} vs {want}");
    }
}
