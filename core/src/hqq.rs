//! Half-Quadratic Quantization (HQQ, Badri & Shaji 2023): data-free optimized zero points,
//! followed by a least-squares refit of `(scale, zero)` and a per-group choice against RTN.
//!
//! Each group `x` (see [`Granularity`]; the layout is the one of [`AffineCodes`]) gets
//! `b`-bit codes `q in [0, qmax]`, `qmax = 2^b - 1`, and a real `(s, z)`, dequantized as
//! `(q - z) * s`. With `y = x / s` (the group in code units), the steps are:
//!
//! 1. **Init (min-max):** `s = (max - min) / qmax`, `z = -min / s`.
//! 2. **HQQ (half-quadratic splitting):** HQQ minimizes `||x - dq(q(x))||_p^p` with `p < 1`
//!    (robust to outliers) by introducing an auxiliary error `E ~ y - (q - z)` and alternating,
//!    for `iterations` steps (default 20):
//!    - `q = clamp(round(y + z), 0, qmax)`, `e = y - (q - z)`;
//!    - `E = shrink_p(e, beta) = sign(e) * max(|e| - |e|^(p-1) / beta, 0)` (the proximal
//!      operator of the `l_p` norm, generalized soft-thresholding);
//!    - `z = mean(q - y + E)` (the closed-form minimizer of the quadratic half);
//!    - `beta *= kappa`,
//!
//!    with `beta = 10`, `kappa = 1.01` as in the reference implementation and `p = 1/2`
//!    (the reference uses 0.7; after the refit below 1/2 measured as good or slightly better,
//!    and it turns `|e|^(p-1)` into `1 / sqrt|e|`, which vectorizes; other `p` use a
//!    polynomial `exp2(log2)` approximation), with an early stop once `mean |e|` stops
//!    decreasing (keeping the best `z`). Unlike the reference, the shrinkage works in code
//!    units (`e` is measured in steps of `s`), which makes the result independent of the
//!    magnitude of the weights. As in HQQ, `s` stays fixed here and `z` is a real number.
//!
//!    The zero update is over-relaxed ([`Solver::relax`], 5): `z += 5 * (mean(q - y + E) - z)`
//!    with `beta *= kappa^5`, one step standing for five reference iterations, so
//!    `iterations` (20) runs `ceil(20 / 5) = 4` passes. The plain iteration creeps towards its
//!    fixed point by a fraction of the remaining distance each time; measured on Gaussian and
//!    Student-t weights (the `hqq` bench, `batched_solver_error_matches_the_reference`), 4
//!    relaxed steps end with a lower error than 20 plain ones for real zeros and within
//!    0.05 % for integer zeros.
//! 3. **Least-squares refit:** for the chosen codes, `x ~ a*q + c` is fitted in closed form
//!    (`a = cov(q, x) / var(q)`, `c = mean(x) - a*mean(q)`), giving `s = a`, `z = -c / a`.
//!    `s` and `z` are then rounded to f16 (their storage type) *before* the codes are chosen
//!    again for exactly those values; this refit/round/re-code step (an alternating
//!    minimization of the L2 error, like Lloyd's algorithm for an affine grid) repeats up to
//!    5 times or until it reaches a fixed point.
//! 4. **Per-group choice:** every candidate (the rounded HQQ result and each refit) and the
//!    plain asymmetric min-max RTN of [`crate::quantize`] are scored by their exact squared
//!    error `sum (x - (q - z) * s)^2` with the stored values; the best is kept. So the result
//!    is never worse than asymmetric RTN in any group (L2, up to f32 summation rounding).
//!
//! Groups containing NaN or infinities, constant groups and groups whose `(s, z)` do not fit
//! f16 use the RTN result (whose scale may then be an f32, as in [`crate::quantize`]).
//!
//! **Integer zero points** ([`HqqConfig::integer_zero`], what compressed-tensors and vLLM's
//! kernels store): step 3 then rounds the zero to an integer in `[0, qmax]` and refits the
//! scale alone for it (`s = sum (q - z) x / sum (q - z)^2`), rounding it to nearest on the
//! tensor's scale grid ([`HqqConfig::scale_dtype`]); the RTN candidate of step 4 is the
//! asymmetric RTN of that grid. The half-quadratic zero of step 2 is the starting point.
//! **Speed.** Groups of up to [`MAX_BATCHED_LEN`] weights (group and channel granularity) are
//! solved [`batched`]: 16 groups at once in a struct-of-arrays layout, so every pass over the
//! groups is one vectorized sweep without horizontal sums (AVX2 where the CPU has it, picked
//! at run time, bit-identical to the baseline x86-64 copy); it scores squared errors in
//! code units by the reciprocal of the scale (the exact error up to f32 rounding; see
//! `batched`). The batched solver also takes
//! measured shortcuts ([`Solver`]): one half-quadratic step stands for 10 reference
//! iterations ([`Solver::batched_relax`]; 20 iterations are 2 steps) and the last step's zero
//! is kept without a pass to measure it (the least-squares rounds score it), so 20 iterations
//! take one pass, which also measures the RTN candidate; the least-squares refit of real f16
//! pairs is over-relaxed (`(a, c)` moved 1.8 times as far from the scored pair), 3 rounds;
//! integer zeros skip the half-quadratic steps (the min-max start refitted ended lower than
//! the half-quadratic start on the bench matrix and on MiniLM) and over-relax their refit
//! (real zero and scale moved 2.5 times as far before rounding), 2 rounds. On the bench
//! matrix and on MiniLM each of these ends below the reference solver's error (the ignored
//! test `speed_variants` compares the settings). Longer groups use
//! [`hqq_group`],
//! whose loops are branch-free with 8 independent f32 accumulator lanes, and (for one huge
//! group) fixed 16Ki-element blocks summed in parallel in a fixed order. Either way results do
//! not depend on the thread count or on how groups are batched. [`streamed`] solves a
//! tensor-wide group over passes of a tensor read in pieces, with the same sums as
//! [`hqq_group`], hence the same result.

use crate::quantize::{check_bits, check_rows, layout, AffineCodes, QuantizeError};
use crate::recipe::{Granularity, ScaleDtype};
use half::f16;
use rayon::prelude::*;

/// HQQ settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HqqConfig {
    /// Bits per code, 2..=8.
    pub bits: u8,
    /// How many weights share one `(scale, zero)`.
    pub granularity: Granularity,
    /// Half-quadratic iterations (the reference default is 20; 0 skips to the refit).
    pub iterations: usize,
    /// Store integer zero points in `[0, 2^bits)` with scales on [`Self::scale_dtype`]'s grid
    /// (compressed-tensors' layout) instead of real f16 zeros and f16 scales.
    #[serde(default)]
    pub integer_zero: bool,
    /// The grid integer-zero scales are rounded to (set per tensor by the output format).
    #[serde(default)]
    pub scale_dtype: ScaleDtype,
}

impl HqqConfig {
    /// The reference implementation's iteration count.
    pub const DEFAULT_ITERATIONS: usize = 20;

    /// `bits` and `granularity` with [`HqqConfig::DEFAULT_ITERATIONS`].
    pub fn new(bits: u8, granularity: Granularity) -> Self {
        HqqConfig {
            bits,
            granularity,
            iterations: Self::DEFAULT_ITERATIONS,
            integer_zero: false,
            scale_dtype: ScaleDtype::F16,
        }
    }
}

/// Tuning constants of the solver (fixed; a struct so a test can compare settings).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Solver {
    /// `p` of the `l_p` loss.
    pub lp_norm: f32,
    /// Initial `beta` (shrinkage strength `1/beta`, in code units).
    pub beta: f32,
    /// Growth of `beta` per iteration.
    pub kappa: f32,
    /// Least-squares refit rounds.
    pub refit_rounds: usize,
    /// Over-relaxation of the zero update, `z += relax * (z_hqq - z)`: each step stands for
    /// `relax` reference iterations (see [`Solver::steps`]).
    pub relax: f64,
    /// [`Solver::relax`] of the batched solver (one step standing for more reference
    /// iterations than in the one-group solver: fewer passes).
    pub batched_relax: f64,
    /// Over-relaxation of the batched least-squares refit of real f16 pairs: the refitted
    /// `(a, c)` of `x ~ a q + c` is moved `refit_relax` times as far from the scored pair.
    pub refit_relax: f64,
    /// Least-squares rounds of the batched solver for real f16 pairs (over-relaxed).
    pub relaxed_refit_rounds: usize,
    /// Whether the batched solver runs the half-quadratic steps for integer zeros.
    pub integer_zero_hqq: bool,
    /// Over-relaxation of the batched least-squares refit of integer zeros: the fitted real
    /// zero and the refitted scale are moved `int_refit_relax` times as far from the scored
    /// pair before they are rounded.
    pub int_refit_relax: f64,
    /// Least-squares rounds of the batched solver for integer zeros (over-relaxed).
    pub int_refit_rounds: usize,
}

impl Solver {
    /// Over-relaxed steps run for `iterations` reference iterations: `ceil(iterations / relax)`.
    pub(crate) fn steps(&self, iterations: usize) -> usize {
        (iterations as f64 / self.relax).ceil() as usize
    }

    /// Growth of `beta` per step: `kappa^relax`, as over `relax` reference iterations.
    pub(crate) fn growth(&self) -> f32 {
        f64::from(self.kappa).powf(self.relax) as f32
    }

    /// The next zero from `z` and the half-quadratic minimizer `target` (`mean(q - y + E)`).
    pub(crate) fn next_zero(&self, z: f32, target: f64) -> f32 {
        (f64::from(z) + self.relax * (target - f64::from(z))) as f32
    }
}

pub(crate) const SOLVER: Solver = Solver {
    lp_norm: 0.5,
    beta: 10.0,
    kappa: 1.01,
    refit_rounds: 5,
    relax: 5.0,
    batched_relax: 10.0,
    refit_relax: 1.8,
    relaxed_refit_rounds: 3,
    integer_zero_hqq: false,
    int_refit_relax: 2.5,
    int_refit_rounds: 2,
};

/// The solver before over-relaxation (one reference iteration per step), which
/// [`hqq_codes_unbatched`] runs for comparison.
pub(crate) const REFERENCE_SOLVER: Solver = Solver {
    relax: 1.0,
    refit_relax: 1.0,
    batched_relax: 1.0,
    relaxed_refit_rounds: 5,
    integer_zero_hqq: true,
    int_refit_relax: 1.0,
    int_refit_rounds: 5,
    ..SOLVER
};

/// Independent accumulator lanes in every reduction.
const LANES: usize = 8;
/// Elements summed by one task when a single group is large.
const BLOCK: usize = 1 << 14;
/// Minimum elements per rayon task over rows.
const MIN_PAR_ELEMS: usize = 1 << 14;
/// `2^23`: `(v + M) - M` rounds `0 <= v < 2^23` to the nearest integer, ties to even.
const ROUND_MAGIC: f32 = 8_388_608.0;
/// `1.5 * 2^23`: the low mantissa bits of `t + M` hold `round(t)` for `|t| < 2^22`.
const INT_MAGIC: f32 = 12_582_912.0;

/// Sums `f(x[i], c[i])` (K outputs) over the common prefix, in `LANES` f32 lanes then f64.
#[inline(always)]
fn lane_sums<T: Copy, const K: usize>(
    x: &[f32],
    c: &[T],
    f: &impl Fn(f32, T) -> [f32; K],
) -> [f64; K] {
    let n = x.len().min(c.len());
    let (x, c) = (&x[..n], &c[..n]);
    let mut acc = [[0f32; LANES]; K];
    let xs = x.chunks_exact(LANES);
    let cs = c.chunks_exact(LANES);
    let (xr, cr) = (xs.remainder(), cs.remainder());
    for (xc, cc) in xs.zip(cs) {
        for l in 0..LANES {
            let v = f(xc[l], cc[l]);
            for k in 0..K {
                acc[k][l] += v[k];
            }
        }
    }
    for (l, (&xv, &cv)) in xr.iter().zip(cr).enumerate() {
        let v = f(xv, cv);
        for k in 0..K {
            acc[k][l] += v[k];
        }
    }
    let mut out = [0f64; K];
    for k in 0..K {
        for lane in acc[k] {
            out[k] += f64::from(lane);
        }
    }
    out
}

/// [`lane_sums`] over a group of any size: one sequential pass for a short group, fixed
/// blocks summed in parallel and combined in block order for a long one (deterministic).
fn sums<T: Copy + Sync, const K: usize>(
    x: &[f32],
    c: &[T],
    f: impl Fn(f32, T) -> [f32; K] + Sync,
) -> [f64; K] {
    if x.len() <= BLOCK {
        return lane_sums(x, c, &f);
    }
    let parts: Vec<[f64; K]> = x
        .par_chunks(BLOCK)
        .zip(c.par_chunks(BLOCK))
        .map(|(a, b)| lane_sums(a, b, &f))
        .collect();
    parts.iter().fold([0.0; K], |mut acc, p| {
        for k in 0..K {
            acc[k] += p[k];
        }
        acc
    })
}

/// `|a|^p` for finite `a >= 0` via `exp2(p * log2 a)` with polynomial approximations
/// (relative error about 1e-4; plenty for a shrinkage threshold). Branch-free, so it
/// vectorizes. `a = 0` gives a huge (not infinite) value for negative `p`.
#[inline(always)]
fn fast_pow(a: f32, p: f32) -> f32 {
    let bits = a.to_bits();
    let exponent = ((bits >> 23) as i32 - 127) as f32;
    let t = f32::from_bits((bits & 0x007F_FFFF) | 0x3F80_0000) - 1.0;
    let log2_m = t * (1.438_545_4 + t * (-0.678_071_5 + t * (0.323_610_5 - t * 0.084_273_16)));
    let e = (p * (exponent + log2_m)).clamp(-126.0, 126.0);
    let shifted = e + INT_MAGIC;
    let whole = shifted - INT_MAGIC;
    let int = (shifted.to_bits() as i32).wrapping_sub(INT_MAGIC.to_bits() as i32);
    let f = e - whole;
    let exp2_f = 1.000_000_1
        + f * (0.693_127_2 + f * (0.240_222_1 + f * (0.055_875_87 + f * 0.009_670_815)));
    f32::from_bits(((int + 127) as u32) << 23) * exp2_f
}

/// `round(clamp(v, 0, qmax))`, ties to even (`qmax < 2^23`).
#[inline(always)]
fn code(v: f32, qmax: f32) -> f32 {
    (v.clamp(0.0, qmax) + ROUND_MAGIC) - ROUND_MAGIC
}

/// One HQQ pass at zero `z`: returns `[sum (q - y + shrink(e)), sum |e|]`, where
/// `threshold(|e|)` is the shrinkage `|e|^(p-1) / beta`.
#[inline(always)]
fn hqq_pass(
    x: &[f32],
    inv: f32,
    z: f32,
    qmax: f32,
    threshold: impl Fn(f32) -> f32 + Sync,
) -> [f64; 2] {
    sums(x, x, |xv, _| {
        let y = xv * inv;
        let q = code(y + z, qmax);
        let e = y + z - q;
        let ae = e.abs();
        let shrunk = (ae - threshold(ae)).max(0.0).copysign(e);
        [q - y + shrunk, ae]
    })
}

/// Step 2: the HQQ zero-point iterations with scale `1 / inv` fixed, from zero `z`.
/// Returns the zero with the lowest mean absolute error seen.
fn optimize_zero(x: &[f32], inv: f32, mut z: f32, qmax: f32, iterations: usize, s: &Solver) -> f32 {
    let n = x.len() as f64;
    let p1 = s.lp_norm - 1.0;
    let mut beta = s.beta;
    let (mut best_err, mut best_z) = (f64::INFINITY, z);
    let growth = s.growth();
    for _ in 0..s.steps(iterations) {
        let inv_beta = 1.0 / beta;
        // For p = 1/2 the threshold is 1 / (beta sqrt|e|): a square root, not a power.
        let [update, abs_err] = if s.lp_norm == 0.5 {
            hqq_pass(x, inv, z, qmax, |ae| inv_beta / ae.sqrt())
        } else {
            hqq_pass(x, inv, z, qmax, |ae| fast_pow(ae, p1) * inv_beta)
        };
        let err = abs_err / n;
        if err.is_nan() || err >= best_err {
            break;
        }
        (best_err, best_z) = (err, z);
        z = s.next_zero(z, update / n);
        beta *= growth;
    }
    best_z
}

/// Squared error of the codes for `(scale, zero)`, and the sums `[q, q^2, x, q*x]` the
/// least-squares refit needs, in one pass.
fn score(x: &[f32], scale: f32, zero: f32, qmax: f32) -> (f64, [f64; 4]) {
    let f = score_fn(scale, zero, qmax);
    let [sse, sq, sqq, sx, sqx] = sums(x, x, |xv, _| f(xv));
    (sse, [sq, sqq, sx, sqx])
}

/// The terms [`score`] sums for one weight: `[(x - dq)^2, q, q^2, x, q*x]`.
#[inline(always)]
fn score_fn(scale: f32, zero: f32, qmax: f32) -> impl Fn(f32) -> [f32; 5] + Sync + Copy {
    let inv = 1.0 / scale;
    move |xv| {
        let q = code(xv * inv + zero, qmax);
        let d = xv - (q - zero) * scale;
        [d * d, q, q * q, xv, q * xv]
    }
}

/// Least-squares `(scale, zero)` for fixed codes with the given sums, or `None` when the codes
/// are all equal or the fitted scale is not positive.
fn refit(n: f64, [sq, sqq, sx, sqx]: [f64; 4]) -> Option<(f64, f64)> {
    let den = n * sqq - sq * sq;
    if den.is_nan() || den <= 0.0 {
        return None;
    }
    let a = (n * sqx - sq * sx) / den;
    let c = (sx - a * sq) / n;
    (a > 0.0 && a.is_finite()).then(|| (a, -c / a))
}

/// `(scale, zero)` rounded to f16, or `None` if the scale rounds to 0 or either overflows.
fn to_f16_pair(scale: f64, zero: f64) -> Option<(f32, f32)> {
    let s = f16::from_f64(scale).to_f32();
    let z = f16::from_f64(zero).to_f32();
    (s > 0.0 && s.is_finite() && z.is_finite()).then_some((s, z))
}

/// How a group's `(scale, zero)` are stored: real f16 pairs, or integer zeros with scales on
/// a grid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Storage {
    F16Pair,
    IntegerZero(ScaleDtype),
}

impl Storage {
    pub(crate) fn of(cfg: &HqqConfig) -> Storage {
        if cfg.integer_zero {
            Storage::IntegerZero(cfg.scale_dtype)
        } else {
            Storage::F16Pair
        }
    }

    /// The stored pair nearest the real `(scale, zero)` (for integer zeros: the zero rounded
    /// into `[0, qmax]`), or `None` if the scale rounds to 0 or either overflows.
    fn store(self, scale: f64, zero: f64, qmax: f32) -> Option<(f32, f32)> {
        match self {
            Storage::F16Pair => to_f16_pair(scale, zero),
            Storage::IntegerZero(grid) => {
                let s = grid.round_nearest(scale as f32);
                let z = (zero as f32).round().clamp(0.0, qmax);
                (s > 0.0 && s.is_finite() && z.is_finite()).then_some((s, z))
            }
        }
    }

    /// The least-squares pair for fixed codes with sums `ls` (see [`refit`]), stored; for
    /// integer zeros the fitted zero is rounded and the scale refitted for it alone.
    fn refit(self, n: f64, ls: [f64; 4], qmax: f32) -> Option<(f32, f32)> {
        self.refit_relaxed(n, ls, qmax, None)
    }

    /// [`Storage::refit`]; for integer zeros with `from = Some((pair, w))`, the fitted real
    /// zero and the refitted scale are first moved `w` times as far from the scored `pair`
    /// (over-relaxation).
    fn refit_relaxed(
        self,
        n: f64,
        ls: [f64; 4],
        qmax: f32,
        from: Option<((f32, f32), f64)>,
    ) -> Option<(f32, f32)> {
        let (a, zero) = refit(n, ls)?;
        let relax = |old: f32, new: f64| match from {
            Some((_, w)) => f64::from(old) + w * (new - f64::from(old)),
            None => new,
        };
        let zero = from.map_or(zero, |((_, z0), _)| relax(z0, zero));
        match self {
            Storage::F16Pair => to_f16_pair(a, zero),
            Storage::IntegerZero(_) => {
                // For fixed codes and zero z the best scale is s = sum (q-z) x / sum (q-z)^2,
                // which lowers the squared error by (sum (q-z) x)^2 / sum (q-z)^2: of the two
                // integers around the fitted zero, keep the one that lowers it most.
                let [sq, sqq, sx, sqx] = ls;
                let fit = |z: f64| {
                    let den = sqq - 2.0 * z * sq + n * z * z;
                    let num = sqx - z * sx;
                    let scale = num / den;
                    (den > 0.0 && scale > 0.0 && scale.is_finite())
                        .then(|| (num * num / den, scale, z))
                };
                let lo = zero.floor().clamp(0.0, f64::from(qmax));
                let hi = zero.ceil().clamp(0.0, f64::from(qmax));
                let best = match (fit(lo), fit(hi)) {
                    (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
                    (a, b) => a.or(b),
                };
                let best = best.map(|(gain, scale, z)| match from {
                    Some(((s0, _), _)) => (gain, relax(s0, scale), z),
                    None => (gain, scale, z),
                });
                best.and_then(|(_, scale, z)| self.store(scale, z, qmax))
            }
        }
    }

    /// The grid of the RTN candidate's scale.
    fn rtn_grid(self) -> ScaleDtype {
        match self {
            Storage::F16Pair => ScaleDtype::F16,
            Storage::IntegerZero(grid) => grid,
        }
    }
}

/// Min and max of `x` (NaN ignored), and whether `x` holds a NaN.
fn scan(x: &[f32]) -> (f32, f32, bool) {
    let part = |x: &[f32]| {
        let mut lo = [f32::INFINITY; LANES];
        let mut hi = [f32::NEG_INFINITY; LANES];
        let mut nan = [false; LANES];
        let chunks = x.chunks_exact(LANES);
        let rem = chunks.remainder();
        for c in chunks {
            for l in 0..LANES {
                let v = c[l];
                lo[l] = if v < lo[l] { v } else { lo[l] };
                hi[l] = if v > hi[l] { v } else { hi[l] };
                nan[l] |= v.is_nan();
            }
        }
        for &v in rem {
            lo[0] = if v < lo[0] { v } else { lo[0] };
            hi[0] = if v > hi[0] { v } else { hi[0] };
            nan[0] |= v.is_nan();
        }
        let lo = lo.iter().fold(f32::INFINITY, |a, &b| a.min(b));
        let hi = hi.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        (lo, hi, nan.iter().any(|&b| b))
    };
    if x.len() <= BLOCK {
        return part(x);
    }
    x.par_chunks(BLOCK).map(part).reduce(
        || (f32::INFINITY, f32::NEG_INFINITY, false),
        |a, b| (a.0.min(b.0), a.1.max(b.1), a.2 || b.2),
    )
}

/// Writes `code_of(x)` for every element, in parallel for a long group.
fn write_codes(x: &[f32], codes: &mut [u8], code_of: impl Fn(f32) -> u8 + Sync) {
    let write = |xs: &[f32], cs: &mut [u8]| {
        for (c, &xv) in cs.iter_mut().zip(xs) {
            *c = code_of(xv);
        }
    };
    if x.len() <= BLOCK {
        write(x, codes);
    } else {
        x.par_chunks(BLOCK)
            .zip(codes.par_chunks_mut(BLOCK))
            .for_each(|(xs, cs)| write(xs, cs));
    }
}

/// Quantizes one group into `codes`, returning its stored `(scale, zero)`.
pub(crate) fn hqq_group(
    bits: u8,
    iterations: usize,
    solver: &Solver,
    storage: Storage,
    x: &[f32],
    codes: &mut [u8],
) -> (f32, f32) {
    let (lo, hi, has_nan) = scan(x);
    let range = hi - lo;
    if has_nan || !(range.is_finite() && lo.is_finite() && hi.is_finite()) {
        // NaN, infinities or a range beyond f32: plain RTN (which copes with all of them).
        return crate::quantize::rtn_asym_group_codes(bits, storage.rtn_grid(), x, codes);
    }
    // The RTN candidate: exactly the asymmetric path of `quantize` (its range includes 0).
    let rtn = crate::quantize::RtnAsym::new(bits, storage.rtn_grid(), lo.min(0.0), hi.max(0.0));
    let [rtn_sse] = sums(x, x, |xv, _| {
        let d = xv - rtn.dequantize(rtn.code(xv));
        [d * d]
    });
    let qmax = ((1u32 << bits) - 1) as f32;
    let mut best: Option<(f64, f32, f32)> = None;
    if rtn_sse.is_finite() && range > 0.0 && x.len() >= 2 {
        let scale = range / qmax;
        let inv = qmax / range;
        let zero = optimize_zero(x, inv, -lo * inv, qmax, iterations, solver);
        let n = x.len() as f64;
        let mut current = storage.store(f64::from(scale), f64::from(zero), qmax);
        for _ in 0..=solver.refit_rounds {
            let Some((s, z)) = current else { break };
            let (sse, ls) = score(x, s, z, qmax);
            if sse < best.map_or(rtn_sse, |b| b.0) {
                best = Some((sse, s, z));
            }
            current = storage.refit(n, ls, qmax);
            if current == Some((s, z)) {
                break;
            }
        }
    }
    match best {
        Some((_, s, z)) => {
            // The same code formula as `score`, so the stored codes have the scored error.
            let inv = 1.0 / s;
            write_codes(x, codes, |xv| code(xv * inv + z, qmax) as u8);
            (s, z)
        }
        None => {
            write_codes(x, codes, |xv| rtn.code(xv) as u8);
            (rtn.scale, rtn.zero)
        }
    }
}

/// HQQ codes of `values` (rows of `row_len`) with the solver constants `solver`.
pub(crate) fn hqq_codes_with(
    cfg: &HqqConfig,
    solver: &Solver,
    values: &[f32],
    row_len: usize,
) -> Result<AffineCodes, QuantizeError> {
    encode(cfg, solver, values, row_len, true)
}

/// Groups up to this long are solved [`batched`]; longer ones (and tensor-wide groups, which
/// [`streamed`] must reproduce) one at a time with sums in parallel blocks.
const MAX_BATCHED_LEN: usize = 4096;

/// [`hqq_codes`], `batched` or with every group solved alone by `hqq_group`.
fn encode(
    cfg: &HqqConfig,
    solver: &Solver,
    values: &[f32],
    row_len: usize,
    batched: bool,
) -> Result<AffineCodes, QuantizeError> {
    check_bits(cfg.bits)?;
    check_rows(values.len(), row_len)?;
    let (row_len, group_len) = layout(cfg.granularity, values.len(), row_len);
    let mut out = AffineCodes {
        bits: cfg.bits,
        row_len,
        group_len,
        codes: vec![0; values.len()],
        scales: Vec::new(),
        zeros: Vec::new(),
    };
    if values.is_empty() {
        return Ok(out);
    }
    let groups_per_row = out.groups_per_row();
    let groups = values.len() / row_len * groups_per_row;
    out.scales = vec![0.0; groups];
    out.zeros = vec![0.0; groups];
    let min_rows = (MIN_PAR_ELEMS / row_len).max(1);
    let storage = Storage::of(cfg);
    let (bits, iterations) = (cfg.bits, cfg.iterations);
    if batched && cfg.granularity != Granularity::Tensor && group_len <= MAX_BATCHED_LEN {
        values
            .par_chunks(row_len * min_rows)
            .zip(out.codes.par_chunks_mut(row_len * min_rows))
            .zip(out.scales.par_chunks_mut(groups_per_row * min_rows))
            .zip(out.zeros.par_chunks_mut(groups_per_row * min_rows))
            .for_each_init(
                batched::Scratch::default,
                |scratch, (((rows, codes), scales), zeros)| {
                    // Whole groups, then the shorter last group of each row: each batch holds
                    // groups of one length.
                    let mut whole = Vec::new();
                    let mut last = Vec::new();
                    let rows = rows.chunks(row_len).zip(codes.chunks_mut(row_len));
                    for (row, codes) in rows {
                        for pair in row.chunks(group_len).zip(codes.chunks_mut(group_len)) {
                            match pair.0.len() == group_len {
                                true => whole.push(pair),
                                false => last.push(pair),
                            }
                        }
                    }
                    let mut results = Vec::with_capacity(scales.len());
                    for list in [&mut whole, &mut last] {
                        for start in (0..list.len()).step_by(batched::WIDTH) {
                            let end = (start + batched::WIDTH).min(list.len());
                            // The next batch's weights come into cache while this one is
                            // solved.
                            let (head, tail) = list.split_at_mut(end);
                            let next = &tail[..batched::WIDTH.min(tail.len())];
                            let batch = &mut head[start..];
                            let mut pairs = [(0f32, 0f32); batched::WIDTH];
                            batched::hqq_batch(
                                bits, iterations, solver, storage, batch, next, &mut pairs, scratch,
                            );
                            results.extend_from_slice(&pairs[..batch.len()]);
                        }
                    }
                    // Back to row-major group order (whole groups first in each row).
                    let whole_per_row = row_len / group_len;
                    let n_whole = whole.len();
                    for (i, (s, z)) in scales.iter_mut().zip(zeros.iter_mut()).enumerate() {
                        let (row, col) = (i / groups_per_row, i % groups_per_row);
                        let at = match col < whole_per_row {
                            true => row * whole_per_row + col,
                            false => n_whole + row,
                        };
                        (*s, *z) = results[at];
                    }
                },
            );
    } else {
        values
            .par_chunks(row_len)
            .zip(out.codes.par_chunks_mut(row_len))
            .zip(out.scales.par_chunks_mut(groups_per_row))
            .zip(out.zeros.par_chunks_mut(groups_per_row))
            .with_min_len(min_rows)
            .for_each(|(((row, codes), scales), zeros)| {
                let groups = row.chunks(group_len).zip(codes.chunks_mut(group_len));
                for (i, (g, c)) in groups.enumerate() {
                    (scales[i], zeros[i]) = hqq_group(bits, iterations, solver, storage, g, c);
                }
            });
    }
    Ok(out)
}

/// [`hqq_codes`] with every group solved on its own by the one-group solver (the
/// implementation before groups were [`batched`]), kept to compare speed and error with
/// (benches and tests); the results differ only by the order of the sums.
#[doc(hidden)]
pub fn hqq_codes_unbatched(
    cfg: &HqqConfig,
    values: &[f32],
    row_len: usize,
) -> Result<AffineCodes, QuantizeError> {
    encode(cfg, &REFERENCE_SOLVER, values, row_len, false)
}

/// HQQ-optimized affine codes of `values`, a row-major matrix of rows of `row_len` (see the
/// module docs). Scales and zeros are f16 values (except RTN-fallback groups beyond f16's
/// range); dequantize with [`AffineCodes::dequantize_into`].
///
/// Errors: `row_len == 0`, `values.len()` not a multiple of `row_len`, bits outside 2..=8.
pub fn hqq_codes(
    cfg: &HqqConfig,
    values: &[f32],
    row_len: usize,
) -> Result<AffineCodes, QuantizeError> {
    hqq_codes_with(cfg, &SOLVER, values, row_len)
}

mod batched;
pub mod streamed;

#[cfg(test)]
mod tests;
