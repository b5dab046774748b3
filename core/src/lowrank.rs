//! Truncated SVD `A ~ U_k diag(s_k) V_k^T` by the randomized range finder of Halko,
//! Martinsson and Tropp (2011, "Finding structure with randomness", Alg. 4.4 + 5.1).
//!
//! For `A` (`m x n`, row-major f32), target rank `k` and sketch width `l = min(k + 10, min(m, n))`:
//!
//! 1. `Y = A Omega` with `Omega` an `n x l` standard Gaussian matrix drawn from `seed`
//!    (row `j` of `Omega^T` from its own splitmix64 stream, Box-Muller), `Q = orth(Y)`.
//! 2. `power_iters` times (capped at [`MAX_POWER_ITERS`]): `Q = orth(A^T Q)`, `Q = orth(A Q)`
//!    (subspace iteration, re-orthonormalized every half step so small singular directions
//!    are not lost to rounding). This sharpens the subspace when the spectrum decays slowly.
//! 3. `B = Q^T A` (`l x n`), `G = B B^T` (`l x l`, f64), and the eigendecomposition
//!    `G = W diag(lambda) W^T` by cyclic Jacobi rotations in f64, sorted descending.
//! 4. With `W_k` the top `k` eigenvectors: `right = W_k^T B` row-normalised (these rows are
//!    `V_k^T`; the norms `s_i = ||w_i^T B||` are the singular values, sorted descending) and
//!    `left = Q W_k diag(s)` (`U_k diag(s_k)`). Then `left * right = Q W_k W_k^T Q^T A = P A`
//!    with `P` an orthogonal projector of rank `k`, so exactly (up to rounding)
//!    `||A - left*right||_F^2 = ||A||_F^2 - sum_{i<k} s_i^2`; when `Q` spans the top
//!    singular subspace this equals the optimal `sum_{i>=k} sigma_i^2` (Eckart-Young).
//!
//! `orth` is block classical Gram-Schmidt with re-orthogonalisation ("twice is enough") in
//! f64, on panels of 32 vectors using `dgemm`; a vector that cancels below `1e-12` of its
//! norm is numerically dependent and is zeroed (it then contributes nothing), one that
//! cancels below 1% gets a third pass. The big products use `matrixmultiply::sgemm`,
//! split across rayon tasks by fixed row blocks of the output (so results do not depend on
//! the thread count); the small ones use `dgemm`.
//!
//! Rank rules ([`RankRule`]): `Rank(r)` uses `min(r, min(m, n))`. `StorageFraction(f)` uses
//! the largest `k` with `k (m + n) <= f m n` (factors stored at the same element size).
//! `Energy(e)` uses the smallest `k` whose captured energy `sum_{i<k} lambda_i` reaches
//! `e ||A||_F^2` (the total is known exactly; a relative slack of `1e-6 ||A||_F^2` absorbs
//! f32 rounding); the sketch starts at width 32 and doubles until the target is reached
//! with 10 columns of oversampling to spare, or the sketch is full (`l = min(m, n)`, where
//! `Q` spans the whole range and the captured energy is exact). Because captured energy
//! of a projection is exactly the energy kept, the chosen rank always meets the target.
//!
//! An all-zero matrix gives zero factors (and rank 0 under `Energy`); `m = 0` gives rank 0.
//!
//! [`streamed`] runs the same steps over a matrix read in row blocks, for tensors larger
//! than memory.

use rayon::prelude::*;

/// Extra sketch columns beyond the target rank.
const OVERSAMPLE: usize = 10;
/// Initial sketch width for the energy rule.
const ENERGY_START_WIDTH: usize = 32;
/// Vectors per Gram-Schmidt panel and output rows per rayon task in the products.
const PANEL: usize = 32;
/// Upper bound on power iterations (each costs two passes over `A`).
pub const MAX_POWER_ITERS: usize = 32;
/// Relative slack when comparing captured energy with an energy target.
const ENERGY_SLACK: f64 = 1e-6;
/// Jacobi sweeps before giving up on further convergence.
const MAX_SWEEPS: usize = 40;

/// How the rank of the factorization is chosen.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RankRule {
    /// A fixed rank (capped at `min(rows, cols)`).
    Rank(usize),
    /// The smallest rank capturing this fraction (in `[0, 1]`) of `||A||_F^2`.
    Energy(f64),
    /// The largest rank with `rank * (rows + cols) <= fraction * rows * cols`.
    StorageFraction(f64),
}

/// Invalid low-rank input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LowRankError {
    #[error("row length must be positive")]
    ZeroRowLen,
    #[error("tensor of {len} values is not a whole number of rows of {row_len}")]
    RaggedRows { len: usize, row_len: usize },
    #[error("value at index {index} is not finite")]
    NonFinite { index: usize },
    #[error("invalid rank rule {0:?}")]
    InvalidRule(RankRule),
    #[error("factor sizes do not match rows {rows}, cols {cols}, rank {rank}")]
    Inconsistent {
        rows: usize,
        cols: usize,
        rank: usize,
    },
}

/// A rank-`rank` factorization `left * right` of a `rows x cols` matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    pub rows: usize,
    pub cols: usize,
    pub rank: usize,
    /// `rows x rank`, row-major: `U_k diag(s_k)` (singular values folded in).
    pub left: Vec<f32>,
    /// `rank x cols`, row-major: `V_k^T` (orthonormal rows, or zero rows for zero `s`).
    pub right: Vec<f32>,
    /// The `rank` singular values, descending.
    pub singular_values: Vec<f32>,
}

// ---------------------------------------------------------------------------------------
// Checked matrix products.

/// A strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct View<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

/// Number of elements a `rows x cols` view with strides `rs`, `cs` spans.
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

macro_rules! checked_gemm {
    ($name:ident, $t:ty, $kernel:path) => {
        /// `C = alpha A B + beta C` for `A` `m x k`, `B` `k x n`, `C` `m x n` (strides `rsc`,
        /// `csc`), with every access bounds-checked up front.
        #[allow(clippy::too_many_arguments)]
        fn $name(
            m: usize,
            k: usize,
            n: usize,
            alpha: $t,
            a: View<'_, $t>,
            b: View<'_, $t>,
            beta: $t,
            c: &mut [$t],
            rsc: usize,
            csc: usize,
        ) {
            assert!(
                span(m, k, a.rs, a.cs) <= a.data.len(),
                "gemm: A out of bounds"
            );
            assert!(
                span(k, n, b.rs, b.cs) <= b.data.len(),
                "gemm: B out of bounds"
            );
            assert!(span(m, n, rsc, csc) <= c.len(), "gemm: C out of bounds");
            if m == 0 || n == 0 {
                return;
            }
            if k == 0 {
                for i in 0..m {
                    for j in 0..n {
                        let x = &mut c[i * rsc + j * csc];
                        *x = if beta == 0.0 { 0.0 } else { beta * *x };
                    }
                }
                return;
            }
            let stride = |s: usize| isize::try_from(s).expect("stride fits isize");
            // SAFETY: matrixmultiply reads A at `i*rsa + j*csa` for i < m, j < k, B at
            // `i*rsb + j*csb` for i < k, j < n, and reads/writes C at `i*rsc + j*csc` for
            // i < m, j < n. The asserts above prove the largest such offset of each lies
            // inside its slice (all strides are non-negative), so every access is in
            // bounds; `c` is a unique borrow, so C aliases neither A nor B.
            unsafe {
                $kernel(
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
                    stride(csc),
                )
            }
        }
    };
}

checked_gemm!(sgemm, f32, matrixmultiply::sgemm);
checked_gemm!(dgemm, f64, matrixmultiply::dgemm);

/// `X A` for `X` (`l x m`) and `A` (`m x n`), both row-major: an `l x n` row-major result,
/// computed in parallel over fixed blocks of output rows.
fn times_a(x: &[f32], l: usize, a: &[f32], m: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; l * n];
    out.par_chunks_mut(PANEL * n)
        .zip(x.par_chunks(PANEL * m))
        .for_each(|(o, xb)| {
            let rows = xb.len() / m;
            let xv = View {
                data: xb,
                rs: m,
                cs: 1,
            };
            let av = View {
                data: a,
                rs: n,
                cs: 1,
            };
            sgemm(rows, m, n, 1.0, xv, av, 0.0, o, n, 1);
        });
    out
}

/// `X A^T` for `X` (`l x n`) and `A` (`m x n`): an `l x m` row-major result.
fn times_at(x: &[f32], l: usize, a: &[f32], m: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; l * m];
    out.par_chunks_mut(PANEL * m)
        .zip(x.par_chunks(PANEL * n))
        .for_each(|(o, xb)| {
            let rows = xb.len() / n;
            let xv = View {
                data: xb,
                rs: n,
                cs: 1,
            };
            let atv = View {
                data: a,
                rs: 1,
                cs: n,
            };
            sgemm(rows, n, m, 1.0, xv, atv, 0.0, o, m, 1);
        });
    out
}

// ---------------------------------------------------------------------------------------
// Random sketch, orthonormalization and the small eigenproblem.

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `rows x cols` standard Gaussians; row `r` comes from its own stream seeded by
/// `(seed, r)`, so the result is independent of how rows are spread over threads.
fn gaussian_rows(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    if cols == 0 {
        return out;
    }
    out.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        let mut state = mix64(seed ^ mix64(r as u64 ^ 0x005E_ED0F_1A2B));
        let mut unit = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            // 53 random bits in (0, 1].
            ((mix64(state) >> 11) + 1) as f64 / (1u64 << 53) as f64
        };
        for pair in row.chunks_mut(2) {
            let (u1, u2) = (unit(), unit());
            let radius = (-2.0 * u1.ln()).sqrt();
            let angle = std::f64::consts::TAU * u2;
            pair[0] = (radius * angle.cos()) as f32;
            if pair.len() > 1 {
                pair[1] = (radius * angle.sin()) as f32;
            }
        }
    });
    out
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    // Eight independent lanes so the loop vectorizes; fixed order, so deterministic.
    let mut lanes = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f64>() + tail
}

fn axpy(alpha: f64, x: &[f64], y: &mut [f64]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// Orthonormalizes the `rows` rows (each of `len`) of `x` in place (see module docs):
/// afterwards the non-zero rows are orthonormal and span the numerical row space.
fn orthonormalize_rows(x: &mut [f32], rows: usize, len: usize) {
    let mut q: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    for p0 in (0..rows).step_by(PANEL) {
        let p1 = (p0 + PANEL).min(rows);
        let b = p1 - p0;
        let (done, rest) = q.split_at_mut(p0 * len);
        let panel = &mut rest[..b * len];
        let original: Vec<f64> = panel.chunks(len).map(|r| dot(r, r).sqrt()).collect();
        if p0 > 0 {
            let mut coef = vec![0f64; b * p0];
            for _ in 0..2 {
                // coef = panel done^T; panel -= coef done.
                let pv = View {
                    data: &*panel,
                    rs: len,
                    cs: 1,
                };
                let dt = View {
                    data: &*done,
                    rs: 1,
                    cs: len,
                };
                dgemm(b, len, p0, 1.0, pv, dt, 0.0, &mut coef, p0, 1);
                let cv = View {
                    data: &coef,
                    rs: p0,
                    cs: 1,
                };
                let dv = View {
                    data: &*done,
                    rs: len,
                    cs: 1,
                };
                dgemm(b, p0, len, -1.0, cv, dv, 1.0, panel, len, 1);
            }
        }
        for (i, &orig) in original.iter().enumerate() {
            let (before, cur) = panel.split_at_mut(i * len);
            let v = &mut cur[..len];
            for _ in 0..2 {
                for prev in before.chunks(len) {
                    axpy(-dot(v, prev), prev, v);
                }
            }
            let norm = dot(v, v).sqrt();
            if norm == 0.0 || norm <= 1e-12 * orig {
                v.fill(0.0);
                continue;
            }
            v.iter_mut().for_each(|e| *e /= norm);
            if norm < 0.01 * orig {
                // Heavy cancellation: one more full pass against everything before.
                for prev in done.chunks(len).chain(before.chunks(len)) {
                    axpy(-dot(v, prev), prev, v);
                }
                let again = dot(v, v).sqrt();
                if again < 0.5 {
                    v.fill(0.0);
                } else {
                    v.iter_mut().for_each(|e| *e /= again);
                }
            }
        }
    }
    for (o, &v) in x.iter_mut().zip(&q) {
        *o = v as f32;
    }
}

/// Eigendecomposition of the symmetric `n x n` matrix `g` (row-major, destroyed) by cyclic
/// Jacobi rotations: returns eigenvalues descending and the matching eigenvectors as rows.
fn symmetric_eigen(g: &mut [f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut vt = vec![0f64; n * n];
    for i in 0..n {
        vt[i * n + i] = 1.0;
    }
    let fro = dot(g, g).sqrt();
    let tiny = fro * 1e-18;
    for _ in 0..MAX_SWEEPS {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let apq = g[p * n + q];
                let (app, aqq) = (g[p * n + p], g[q * n + q]);
                if apq.abs() <= tiny || apq.abs() <= 1e-16 * (app.abs() * aqq.abs()).sqrt() {
                    continue;
                }
                rotated = true;
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                rotate_rows(g, n, p, q, c, s);
                for k in 0..n {
                    let (gkp, gkq) = (g[k * n + p], g[k * n + q]);
                    g[k * n + p] = c * gkp - s * gkq;
                    g[k * n + q] = s * gkp + c * gkq;
                }
                g[p * n + q] = 0.0;
                g[q * n + p] = 0.0;
                rotate_rows(&mut vt, n, p, q, c, s);
            }
        }
        if !rotated {
            break;
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| g[j * n + j].total_cmp(&g[i * n + i]).then(i.cmp(&j)));
    let values = order.iter().map(|&i| g[i * n + i]).collect();
    let vectors = order
        .iter()
        .flat_map(|&i| vt[i * n..(i + 1) * n].iter().copied())
        .collect();
    (values, vectors)
}

/// Rows `p < q` of a row-major matrix with `n` columns: `(r_p, r_q) <- (c r_p - s r_q, s r_p + c r_q)`.
fn rotate_rows(m: &mut [f64], n: usize, p: usize, q: usize, c: f64, s: f64) {
    let (head, tail) = m.split_at_mut(q * n);
    let rp = &mut head[p * n..(p + 1) * n];
    let rq = &mut tail[..n];
    for (a, b) in rp.iter_mut().zip(rq.iter_mut()) {
        let (x, y) = (*a, *b);
        *a = c * x - s * y;
        *b = s * x + c * y;
    }
}

/// The result of one sketch: `Q^T` (`l x m`), `B = Q^T A` in f64 (`l x n`), and the
/// eigenpairs of `B B^T` (values descending, vectors as rows).
struct Sketch {
    width: usize,
    qt: Vec<f32>,
    b: Vec<f64>,
    lambda: Vec<f64>,
    wt: Vec<f64>,
}

/// B·Bᵀ of the `l`×`n` row-major `b`, made exactly symmetric (the eigen solver expects it).
pub(crate) fn symmetric_gram(b: &[f64], l: usize, n: usize) -> Vec<f64> {
    let mut g = vec![0f64; l * l];
    let bv = View {
        data: b,
        rs: n,
        cs: 1,
    };
    let btv = View {
        data: b,
        rs: 1,
        cs: n,
    };
    dgemm(l, n, l, 1.0, bv, btv, 0.0, &mut g, l, 1);
    for i in 0..l {
        for j in 0..i {
            let avg = 0.5 * (g[i * l + j] + g[j * l + i]);
            g[i * l + j] = avg;
            g[j * l + i] = avg;
        }
    }
    g
}

fn sketch(a: &[f32], m: usize, n: usize, width: usize, power_iters: usize, seed: u64) -> Sketch {
    let omega_t = gaussian_rows(width, n, seed);
    let mut qt = times_at(&omega_t, width, a, m, n);
    orthonormalize_rows(&mut qt, width, m);
    for _ in 0..power_iters.min(MAX_POWER_ITERS) {
        let mut zt = times_a(&qt, width, a, m, n);
        orthonormalize_rows(&mut zt, width, n);
        qt = times_at(&zt, width, a, m, n);
        orthonormalize_rows(&mut qt, width, m);
    }
    let b: Vec<f64> = times_a(&qt, width, a, m, n)
        .into_iter()
        .map(f64::from)
        .collect();
    let mut g = symmetric_gram(&b, width, n);
    let (lambda, wt) = symmetric_eigen(&mut g, width);
    Sketch {
        width,
        qt,
        b,
        lambda,
        wt,
    }
}

/// Builds the rank-`k` factors from a sketch (step 4 of the module docs).
fn assemble(sk: &Sketch, m: usize, n: usize, k: usize) -> LowRank {
    let l = sk.width;
    let mut right64 = vec![0f64; k * n];
    let wv = View {
        data: &sk.wt,
        rs: l,
        cs: 1,
    };
    let bv = View {
        data: &sk.b,
        rs: n,
        cs: 1,
    };
    dgemm(k, l, n, 1.0, wv, bv, 0.0, &mut right64, n, 1);
    let norms: Vec<f64> = right64.chunks(n).map(|r| dot(r, r).sqrt()).collect();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&i, &j| norms[j].total_cmp(&norms[i]).then(i.cmp(&j)));
    let mut right = vec![0f32; k * n];
    let mut scaled_w = vec![0f32; l * k]; // l x k: column c = w_{order[c]} * s
    for (c, &i) in order.iter().enumerate() {
        let s = norms[i];
        if s > 0.0 {
            for (o, &v) in right[c * n..(c + 1) * n]
                .iter_mut()
                .zip(&right64[i * n..(i + 1) * n])
            {
                *o = (v / s) as f32;
            }
        }
        for j in 0..l {
            scaled_w[j * k + c] = (sk.wt[i * l + j] * s) as f32;
        }
    }
    let mut left = vec![0f32; m * k];
    if k > 0 {
        left.par_chunks_mut(PANEL * k)
            .enumerate()
            .for_each(|(blk, o)| {
                let r0 = blk * PANEL;
                let rows = o.len() / k;
                let qv = View {
                    data: &sk.qt[r0..],
                    rs: 1,
                    cs: m,
                };
                let sv = View {
                    data: &scaled_w,
                    rs: k,
                    cs: 1,
                };
                sgemm(rows, l, k, 1.0, qv, sv, 0.0, o, k, 1);
            });
    }
    LowRank {
        rows: m,
        cols: n,
        rank: k,
        left,
        right,
        singular_values: order.iter().map(|&i| norms[i] as f32).collect(),
    }
}

/// The largest rank `k <= full` with `k (m + n) <= f m n`.
fn storage_rank(m: usize, n: usize, f: f64, full: usize) -> usize {
    let budget = f * m as f64 * n as f64;
    let per = (m + n) as f64;
    let mut k = ((budget / per).floor().max(0.0) as usize).min(full);
    while k < full && (k + 1) as f64 * per <= budget {
        k += 1;
    }
    while k > 0 && k as f64 * per > budget {
        k -= 1;
    }
    k
}

/// Smallest `k` whose cumulative eigenvalues reach `target` (with slack); `None` if the
/// sketch does not reach it.
fn energy_rank(lambda: &[f64], target: f64, slack: f64) -> Option<usize> {
    if target <= slack {
        return Some(0);
    }
    let mut cum = 0.0;
    for (i, &x) in lambda.iter().enumerate() {
        cum += x.max(0.0);
        if cum >= target - slack {
            return Some(i + 1);
        }
    }
    None
}

/// Zero factors of rank `k` (for an all-zero or empty matrix).
fn zero_factors(m: usize, n: usize, k: usize) -> LowRank {
    LowRank {
        rows: m,
        cols: n,
        rank: k,
        left: vec![0.0; m * k],
        right: vec![0.0; k * n],
        singular_values: vec![0.0; k],
    }
}

/// Refuses fractions that are NaN, negative, or (for `Energy`) above 1.
fn check_rule(rule: RankRule) -> Result<(), LowRankError> {
    match rule {
        RankRule::Energy(e) if !(0.0..=1.0).contains(&e) => Err(LowRankError::InvalidRule(rule)),
        RankRule::StorageFraction(f) if !(f >= 0.0 && f.is_finite()) => {
            Err(LowRankError::InvalidRule(rule))
        }
        _ => Ok(()),
    }
}

/// Truncated SVD of the row-major `values` (`row_len` columns) with the rank chosen by
/// `rule` (see the module docs). Deterministic in `(values, row_len, rule, power_iters,
/// seed)`. Errors on `row_len == 0`, ragged input, non-finite values, and rules with
/// fractions that are NaN, negative, or (for `Energy`) above 1.
pub fn svd_lowrank(
    values: &[f32],
    row_len: usize,
    rule: RankRule,
    power_iters: usize,
    seed: u64,
) -> Result<LowRank, LowRankError> {
    if row_len == 0 {
        return Err(LowRankError::ZeroRowLen);
    }
    if values.len() % row_len != 0 {
        return Err(LowRankError::RaggedRows {
            len: values.len(),
            row_len,
        });
    }
    check_rule(rule)?;
    let (m, n) = (values.len() / row_len, row_len);
    let full = m.min(n);
    const CHUNK: usize = 1 << 16;
    let partials: Vec<(f64, Option<usize>)> = values
        .par_chunks(CHUNK)
        .enumerate()
        .map(|(c, chunk)| {
            let bad = chunk
                .iter()
                .position(|x| !x.is_finite())
                .map(|i| c * CHUNK + i);
            (
                chunk.iter().map(|&x| f64::from(x) * f64::from(x)).sum(),
                bad,
            )
        })
        .collect();
    if let Some(index) = partials.iter().find_map(|p| p.1) {
        return Err(LowRankError::NonFinite { index });
    }
    let total: f64 = partials.iter().map(|p| p.0).sum();
    let fixed = match rule {
        RankRule::Rank(r) => Some(r.min(full)),
        RankRule::StorageFraction(f) => Some(storage_rank(m, n, f, full)),
        RankRule::Energy(_) => None,
    };
    if full == 0 || total == 0.0 || fixed == Some(0) {
        return Ok(zero_factors(m, n, fixed.unwrap_or(0)));
    }
    let mut width = match fixed {
        Some(k) => (k + OVERSAMPLE).min(full),
        None => ENERGY_START_WIDTH.min(full),
    };
    loop {
        let sk = sketch(values, m, n, width, power_iters, seed);
        let k = match (rule, fixed) {
            (_, Some(k)) => k,
            (RankRule::Energy(e), None) => {
                let found = energy_rank(&sk.lambda, e * total, ENERGY_SLACK * total);
                match found {
                    Some(k) if k + OVERSAMPLE <= width || width == full => k,
                    None if width == full => width,
                    _ => {
                        width = (width * 2).min(full);
                        continue;
                    }
                }
            }
            _ => unreachable!("non-energy rules have a fixed rank"),
        };
        return Ok(assemble(&sk, m, n, k));
    }
}

impl LowRank {
    /// Elements stored by the two factors: `rank * (rows + cols)`.
    pub fn stored_elements(&self) -> usize {
        self.rank * (self.rows + self.cols)
    }

    /// Writes `left * right` (row-major `rows x cols`) into `out`, which must hold exactly
    /// `rows * cols` values, or fails if the factor fields are inconsistent.
    pub fn try_reconstruct_into(&self, out: &mut [f32]) -> Result<(), LowRankError> {
        let (m, n, k) = (self.rows, self.cols, self.rank);
        let consistent = Some(self.left.len()) == m.checked_mul(k)
            && Some(self.right.len()) == k.checked_mul(n)
            && Some(out.len()) == m.checked_mul(n);
        if !consistent {
            return Err(LowRankError::Inconsistent {
                rows: m,
                cols: n,
                rank: k,
            });
        }
        if n == 0 {
            return Ok(());
        }
        out.par_chunks_mut(PANEL * n)
            .zip(self.left.par_chunks((PANEL * k).max(1)))
            .for_each(|(o, lb)| {
                let rows = o.len() / n;
                let lv = View {
                    data: lb,
                    rs: k,
                    cs: 1,
                };
                let rv = View {
                    data: &self.right,
                    rs: n,
                    cs: 1,
                };
                sgemm(rows, k, n, 1.0, lv, rv, 0.0, o, n, 1);
            });
        if k == 0 {
            out.fill(0.0);
        }
        Ok(())
    }

    /// Writes `left * right` into `out`. If `out` is not exactly `rows * cols` long only the
    /// common prefix is written; if the factors are inconsistent `out` is filled with NaN
    /// (so the error surfaces in any metric). Use [`Self::try_reconstruct_into`] to get an error.
    pub fn reconstruct_into(&self, out: &mut [f32]) {
        if self.try_reconstruct_into(out).is_ok() {
            return;
        }
        let full = self.rows.checked_mul(self.cols);
        if full.is_some_and(|len| len != out.len()) {
            let mut tmp = vec![0f32; full.unwrap_or(0)];
            if self.try_reconstruct_into(&mut tmp).is_ok() {
                let common = tmp.len().min(out.len());
                out[..common].copy_from_slice(&tmp[..common]);
                return;
            }
        }
        out.fill(f32::NAN);
    }
}

pub mod streamed;

#[cfg(test)]
mod tests;
