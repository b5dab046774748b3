//! HQQ on [`WIDTH`] groups of equal length at once, in a struct-of-arrays layout.
//!
//! [`super::hqq_group`] solves one group with reductions over its elements: for a group of
//! 64 every pass is eight vector steps followed by a horizontal sum, and the passes of a group
//! (scan, RTN error, the half-quadratic steps, up to 6 least-squares rounds, codes) spend as
//! much time reducing as computing. Here [`WIDTH`] groups are transposed so that element `i`
//! of every group sits in one row `[f32; WIDTH]`: each pass is then one sweep over the rows
//! whose inner loop over the lanes vectorizes (four SSE registers on baseline x86-64, two AVX2
//! ones in the copies [`crate::dtype::avx2_dispatch!`] picks at run time; the same IEEE
//! operations per lane, so the same bits), every lane keeps its own sums, and nothing is
//! reduced across lanes.
//!
//! Every lane runs the steps of [`super::hqq_group`] (see the module docs of [`super`]) on its
//! own group, with the batched shortcuts described there: the same min-max start,
//! half-quadratic steps with the same early stop (lanes that stop are frozen while the others
//! go on) but without the pass that would only measure the last step's zero (integer zeros
//! skip these steps), least-squares rounds with the same fixed-point stop (over-relaxed, and 3
//! of them, for real f16 pairs; their f16 rounding goes by way of f32, as an F16C conversion
//! does, whatever the CPU), and the same per-group choice against the same asymmetric RTN
//! candidate, scored by its squared error, so a group is never worse than RTN. The sums are
//! per lane, in f32 over runs of [`FLUSH`] elements, added in f64. A lane's result depends
//! only on its own group, never on the other lanes, so it does not depend on how groups are
//! batched or on the thread count.
//!
//! Groups that hold NaN or infinities, all-zero groups and lanes without a group are handed
//! to [`super::hqq_group`] (which falls back to RTN for them).

use super::{hqq_group, Solver, Storage};
use crate::quantize::{round_half_away, RtnAsym};

/// Groups solved together.
pub(crate) const WIDTH: usize = 16;
/// Elements summed in f32 before a lane's sum is added to its f64 total.
const FLUSH: usize = 16;
/// `2^23`: `(v + M) - M` rounds `0 <= v < 2^23` to the nearest integer, ties to even.
const ROUND_MAGIC: f32 = 8_388_608.0;

type Lanes = [f32; WIDTH];

/// Buffers reused across batches (one per rayon task).
#[derive(Default)]
pub(crate) struct Scratch {
    /// The groups, transposed: `x[i][lane]`.
    x: Vec<Lanes>,
    /// The HQQ codes, transposed.
    codes: Vec<[u32; WIDTH]>,
}

/// `v` clamped to `[lo, hi]` with plain compares (`minps`/`maxps`; `v` is never NaN here).
#[inline(always)]
fn clamp(v: f32, lo: f32, hi: f32) -> f32 {
    let v = if v < lo { lo } else { v };
    if v > hi {
        hi
    } else {
        v
    }
}

/// `round(clamp(v, 0, qmax))`, ties to even: [`super::code`] with plain compares.
#[inline(always)]
fn code(v: f32, qmax: f32) -> f32 {
    (clamp(v, 0.0, qmax) + ROUND_MAGIC) - ROUND_MAGIC
}

/// Per-lane sums of `f(lane, row)` (K of them) over `rows`, in f32 over runs of [`FLUSH`]
/// rows, each run added in f64.
#[inline(always)]
fn lane_sums<const K: usize>(
    rows: &[Lanes],
    f: impl Fn(usize, &Lanes) -> [f32; K],
) -> [[f64; WIDTH]; K] {
    let mut total = [[0f64; WIDTH]; K];
    for run in rows.chunks(FLUSH) {
        let mut part = [[0f32; WIDTH]; K];
        for row in run {
            for l in 0..WIDTH {
                let v = f(l, row);
                for (p, vk) in part.iter_mut().zip(v) {
                    p[l] += vk;
                }
            }
        }
        for k in 0..K {
            for l in 0..WIDTH {
                total[k][l] += f64::from(part[k][l]);
            }
        }
    }
    total
}

/// The RTN candidate of one lane in the arithmetic of [`RtnAsym::code`] (asymmetric, codes
/// `[0, qmax]`, non-zero scale), as per-lane constants.
#[derive(Clone, Copy, Default)]
struct RtnLanes {
    scale: Lanes,
    zero: Lanes,
    /// `qmax - zero`.
    top: Lanes,
}

impl RtnLanes {
    #[inline(always)]
    fn code(&self, l: usize, x: f32) -> f32 {
        let y = clamp(x / self.scale[l], -self.zero[l], self.top[l]);
        round_half_away(y) + self.zero[l]
    }
}

/// What a lane ends with.
#[derive(Clone, Copy, PartialEq)]
enum Choice {
    /// Not solved here (no group, or one [`hqq_group`] must handle).
    Scalar,
    /// The RTN candidate scored best.
    Rtn,
    /// This stored `(scale, zero)` scored best.
    Hqq(f32, f32),
}

/// Quantizes the groups of `batch` (at most [`WIDTH`] pairs of a group and its codes, all of
/// one length) into their codes, returning each group's stored `(scale, zero)` in `out`.
pub(crate) fn hqq_batch(
    bits: u8,
    iterations: usize,
    solver: &Solver,
    storage: Storage,
    batch: &mut [(&[f32], &mut [u8])],
    out: &mut [(f32, f32)],
    scratch: &mut Scratch,
) {
    let count = batch.len().min(WIDTH);
    let len = batch.first().map_or(0, |g| g.0.len());
    let qmax = ((1u32 << bits) - 1) as f32;
    let n = len as f64;

    // Transpose (missing lanes are all-zero groups, handed to the scalar path below).
    scratch.x.clear();
    scratch.x.resize(len, [0.0; WIDTH]);
    if count == WIDTH {
        // Four lanes at a time: four loads and one 16-byte store per row (four group
        // pointers stay in registers, sixteen would not).
        for (quad, groups) in batch.chunks_exact(4).enumerate() {
            let [g0, g1, g2, g3] = [0, 1, 2, 3].map(|k| &groups[k].0[..len]);
            for (i, row) in scratch.x.iter_mut().enumerate() {
                row[4 * quad..4 * quad + 4].copy_from_slice(&[g0[i], g1[i], g2[i], g3[i]]);
            }
        }
    } else {
        for (l, (g, _)) in batch.iter().take(count).enumerate() {
            for (row, &v) in scratch.x.iter_mut().zip(g.iter()) {
                row[l] = v;
            }
        }
    }
    let x = &scratch.x[..];

    // Scan: min and max (plain compares skip NaN), and `sum x * 0`, which is NaN exactly
    // when the lane holds a NaN or an infinity.
    let mut lo = [f32::INFINITY; WIDTH];
    let mut hi = [f32::NEG_INFINITY; WIDTH];
    let mut poison = [0f32; WIDTH];
    for row in x {
        for l in 0..WIDTH {
            let v = row[l];
            lo[l] = if v < lo[l] { v } else { lo[l] };
            hi[l] = if v > hi[l] { v } else { hi[l] };
            poison[l] += v * 0.0;
        }
    }

    let mut choice = [Choice::Scalar; WIDTH];
    let mut rtn = RtnLanes::default();
    let mut rtn_params = [(0f32, 0f32); WIDTH];
    let mut inv = [1f32; WIDTH];
    let mut scale = [1f32; WIDTH];
    let mut zero = [0f32; WIDTH];
    for l in 0..count {
        let range = hi[l] - lo[l];
        let finite = range.is_finite() && lo[l].is_finite() && hi[l].is_finite();
        if poison[l] != 0.0 || !finite {
            continue;
        }
        let r = RtnAsym::new(bits, storage.rtn_grid(), lo[l].min(0.0), hi[l].max(0.0));
        if r.scale == 0.0 {
            continue;
        }
        rtn_params[l] = (r.scale, r.zero);
        (rtn.scale[l], rtn.zero[l], rtn.top[l]) = (r.scale, r.zero, qmax - r.zero);
        choice[l] = Choice::Rtn;
    }
    for (l, c) in choice.iter().enumerate() {
        if *c == Choice::Scalar {
            // Neutral constants, so the unused lane computes finite numbers.
            (rtn.scale[l], rtn.zero[l], rtn.top[l]) = (1.0, 0.0, qmax);
        }
    }

    // The RTN candidate's squared error, and the sum of x (the same for every refit).
    let [rtn_sse, sum_x] = rtn_pass(x, &rtn);

    // Lanes HQQ runs on, their min-max scale and start zero.
    let mut hqq = [false; WIDTH];
    for l in 0..count {
        let range = hi[l] - lo[l];
        if choice[l] == Choice::Rtn && rtn_sse[l].is_finite() && range > 0.0 && len >= 2 {
            hqq[l] = true;
            scale[l] = range / qmax;
            inv[l] = qmax / range;
            zero[l] = -lo[l] * inv[l];
        }
    }

    if hqq.iter().any(|&h| h) {
        let x = &scratch.x[..];
        let iterations = match storage {
            Storage::IntegerZero(_) if !solver.integer_zero_hqq => 0,
            _ => iterations,
        };
        let best_zero = optimize_zeros(x, &hqq, &inv, &zero, qmax, iterations, solver);
        let mut best = [f64::INFINITY; WIDTH];
        let mut current = [None; WIDTH];
        for l in 0..WIDTH {
            best[l] = rtn_sse[l];
            if hqq[l] {
                current[l] = storage.store(f64::from(scale[l]), f64::from(best_zero[l]), qmax);
            }
        }
        let rounds = match storage {
            Storage::F16Pair => solver.relaxed_refit_rounds,
            Storage::IntegerZero(_) => solver.refit_rounds,
        };
        for _ in 0..=rounds {
            if current.iter().all(Option::is_none) {
                break;
            }
            let mut s = [1f32; WIDTH];
            let mut z = [0f32; WIDTH];
            for l in 0..WIDTH {
                if let Some((sl, zl)) = current[l] {
                    (s[l], z[l]) = (sl, zl);
                }
            }
            let is = s.map(|v| 1.0 / v);
            let [sse, sq, sqq, sqx] = score_pass(x, &s, &is, &z, qmax);
            let next = match storage {
                Storage::F16Pair => {
                    let sums = [sq, sqq, sum_x, sqx];
                    refit_f16_lanes(n, &sums, &s, &z, solver.refit_relax)
                }
                Storage::IntegerZero(_) => std::array::from_fn(|l| match current[l] {
                    Some(_) => storage.refit(n, [sq[l], sqq[l], sum_x[l], sqx[l]], qmax),
                    None => None,
                }),
            };
            for l in 0..WIDTH {
                let Some(pair) = current[l] else { continue };
                if sse[l] < best[l] {
                    best[l] = sse[l];
                    choice[l] = Choice::Hqq(pair.0, pair.1);
                }
                current[l] = if next[l] == Some(pair) { None } else { next[l] };
            }
        }
    }

    // The HQQ codes of every lane in one sweep; RTN lanes are then coded on their own.
    let (mut is, mut z) = ([1f32; WIDTH], [0f32; WIDTH]);
    for l in 0..WIDTH {
        if let Choice::Hqq(sl, zl) = choice[l] {
            (is[l], z[l]) = (1.0 / sl, zl);
        }
    }
    scratch.codes.clear();
    scratch.codes.resize(len, [0; WIDTH]);
    write_codes(&scratch.x, &is, &z, qmax, &mut scratch.codes);
    for l in 0..count {
        let (g, c) = &mut batch[l];
        match choice[l] {
            Choice::Scalar => out[l] = hqq_group(bits, iterations, solver, storage, g, c),
            Choice::Rtn => {
                let r = &rtn;
                for (c, &v) in c.iter_mut().zip(g.iter()) {
                    *c = r.code(l, v) as u8;
                }
                out[l] = rtn_params[l];
            }
            Choice::Hqq(sl, zl) => {
                for (c, row) in c.iter_mut().zip(&scratch.codes) {
                    *c = row[l] as u8;
                }
                out[l] = (sl, zl);
            }
        }
    }
}

/// `v` rounded to the nearest f16 value, ties to even, for `2^-14 <= |v| < 65504` (normal
/// f16 magnitudes), with integer arithmetic on the f32 bits.
#[inline(always)]
fn round_f16_normal(v: f32) -> f32 {
    let b = v.to_bits();
    f32::from_bits((b + 0x0FFF + ((b >> 13) & 1)) & 0xFFFF_E000)
}

/// Whether [`round_f16_normal`] applies to `v`.
#[inline(always)]
fn f16_normal(v: f32) -> bool {
    let a = v.abs();
    (6.103_515_6e-5..65_504.0).contains(&a)
}

/// `v` rounded to the nearest f16 value, ties to even, by way of f32 (as an F16C conversion
/// of an f64 does; infinite on overflow).
pub(super) fn round_f16(v: f32) -> f32 {
    match f16_normal(v) {
        true => round_f16_normal(v),
        false => half::f16::from_f32(v).to_f32(),
    }
}

/// The over-relaxed least-squares fits of [`refit_f16_lanes`] before rounding: `(a, zero)`
/// as f32, and whether the fit is valid.
#[inline(always)]
fn refit_lanes_body(
    n: f64,
    sums: &[[f64; WIDTH]; 4],
    s: &Lanes,
    z: &Lanes,
    relax: f64,
) -> (Lanes, Lanes, [bool; WIDTH]) {
    let [sq, sqq, sx, sqx] = sums;
    let (mut a_out, mut z_out, mut fits) = ([0f32; WIDTH], [0f32; WIDTH], [false; WIDTH]);
    let inv_n = 1.0 / n;
    for l in 0..WIDTH {
        let den = n * sqq[l] - sq[l] * sq[l];
        let a = (n * sqx[l] - sq[l] * sx[l]) / den;
        let c = (sx[l] - a * sq[l]) * inv_n;
        let (s0, c0) = (f64::from(s[l]), -f64::from(z[l]) * f64::from(s[l]));
        let a = s0 + relax * (a - s0);
        let c = c0 + relax * (c - c0);
        fits[l] = den > 0.0 && a > 0.0 && a < f64::from(f32::MAX);
        a_out[l] = a as f32;
        z_out[l] = (-c / a) as f32;
    }
    (a_out, z_out, fits)
}

crate::dtype::avx2_dispatch!(
    fn refit_lanes(n: f64, sums: &[[f64; WIDTH]; 4], s: &Lanes, z: &Lanes, relax: f64)
        -> (Lanes, Lanes, [bool; WIDTH]) => refit_lanes_body
);

/// The least-squares refit of [`Storage::refit`] for real f16 pairs in every lane at once:
/// `x ~ a q + c` from the sums `[q, q^2, x, q x]` of the codes of the pair `(s, z)`,
/// moved `relax` times as far from `(s, -z s)` (over-relaxation), then
/// `(s, z) = (a, -c / a)` rounded to f16; `None` where the fit or its rounding is not a
/// valid pair.
fn refit_f16_lanes(
    n: f64,
    sums: &[[f64; WIDTH]; 4],
    s: &Lanes,
    z: &Lanes,
    relax: f64,
) -> [Option<(f32, f32)>; WIDTH] {
    let (a, zero, fits) = refit_lanes(n, sums, s, z, relax);
    let mut out = [None; WIDTH];
    for l in 0..WIDTH {
        let (s, z) = match f16_normal(a[l]) && f16_normal(zero[l]) {
            true => (round_f16_normal(a[l]), round_f16_normal(zero[l])),
            false => (round_f16(a[l]), round_f16(zero[l])),
        };
        if fits[l] && s > 0.0 && s.is_finite() && z.is_finite() {
            out[l] = Some((s, z));
        }
    }
    out
}

/// Step 2 for every lane with `active` set: the half-quadratic zero iterations at the fixed
/// scale `1 / inv`, from `start`, each lane stopping once its mean absolute error stops
/// decreasing. Returns each lane's zero with the lowest mean absolute error seen.
fn optimize_zeros(
    x: &[Lanes],
    active: &[bool; WIDTH],
    inv: &Lanes,
    start: &Lanes,
    qmax: f32,
    iterations: usize,
    solver: &Solver,
) -> Lanes {
    let n = x.len() as f64;
    let p1 = solver.lp_norm - 1.0;
    let mut running = *active;
    let mut z = *start;
    let mut best_z = *start;
    let mut best_err = [f64::INFINITY; WIDTH];
    let mut inv_beta = [1.0 / solver.beta; WIDTH];
    let mut beta = [solver.beta; WIDTH];
    let growth = solver.growth();
    // The last step's zero is taken without measuring its error (the least-squares rounds
    // score it), so `steps` updates take `steps - 1` passes.
    for _ in 1..solver.steps(iterations) {
        if !running.iter().any(|&r| r) {
            break;
        }
        let [update, abs_err] = if solver.lp_norm == 0.5 {
            hqq_pass(x, inv, &z, &inv_beta, qmax)
        } else {
            hqq_pass_lp(x, inv, &z, &inv_beta, qmax, p1)
        };
        for l in 0..WIDTH {
            if !running[l] {
                continue;
            }
            let err = abs_err[l] / n;
            if err.is_nan() || err >= best_err[l] {
                running[l] = false;
                continue;
            }
            (best_err[l], best_z[l]) = (err, z[l]);
            z[l] = solver.next_zero(z[l], update[l] / n);
            beta[l] *= growth;
            inv_beta[l] = 1.0 / beta[l];
        }
    }
    for l in 0..WIDTH {
        if running[l] {
            best_z[l] = z[l];
        }
    }
    best_z
}

/// One half-quadratic pass (`p = 1/2`) of every lane at its zero `z`:
/// `[sum (q - y + shrink(e)), sum |e|]`, with the shrinkage threshold `1 / (beta sqrt|e|)`.
#[inline(always)]
fn hqq_pass_body(
    x: &[Lanes],
    inv: &Lanes,
    z: &Lanes,
    inv_beta: &Lanes,
    qmax: f32,
) -> [[f64; WIDTH]; 2] {
    let (inv, z, inv_beta) = (*inv, *z, *inv_beta);
    let mut total = [[0f64; WIDTH]; 2];
    for run in x.chunks(FLUSH) {
        let mut update = [0f32; WIDTH];
        let mut abs_err = [0f32; WIDTH];
        for row in run {
            for l in 0..WIDTH {
                let y = row[l] * inv[l];
                let t = y + z[l];
                let q = code(t, qmax);
                let e = t - q;
                let ae = e.abs();
                let shrunk = at_least_zero(ae - inv_beta[l] / ae.sqrt()).copysign(e);
                update[l] += q - y + shrunk;
                abs_err[l] += ae;
            }
        }
        for l in 0..WIDTH {
            total[0][l] += f64::from(update[l]);
            total[1][l] += f64::from(abs_err[l]);
        }
    }
    total
}

crate::dtype::avx2_dispatch!(
    fn hqq_pass(x: &[Lanes], inv: &Lanes, z: &Lanes, inv_beta: &Lanes, qmax: f32)
        -> [[f64; WIDTH]; 2] => hqq_pass_body
);

/// [`hqq_pass`] for any `p` (threshold `|e|^(p-1) / beta` by [`super::fast_pow`]).
fn hqq_pass_lp(
    x: &[Lanes],
    inv: &Lanes,
    z: &Lanes,
    inv_beta: &Lanes,
    qmax: f32,
    p1: f32,
) -> [[f64; WIDTH]; 2] {
    lane_sums(x, |l, row| {
        let y = row[l] * inv[l];
        let t = y + z[l];
        let q = code(t, qmax);
        let e = t - q;
        let ae = e.abs();
        let shrunk = at_least_zero(ae - super::fast_pow(ae, p1) * inv_beta[l]).copysign(e);
        [q - y + shrunk, ae]
    })
}

/// One least-squares round of every lane at its stored pair `(s, z)` (`is = 1 / s`):
/// `[sum (x - dq)^2, sum q, sum q^2, sum q*x]`.
#[inline(always)]
fn score_pass_body(x: &[Lanes], s: &Lanes, is: &Lanes, z: &Lanes, qmax: f32) -> [[f64; WIDTH]; 4] {
    let (s, is, z) = (*s, *is, *z);
    let mut total = [[0f64; WIDTH]; 4];
    for run in x.chunks(FLUSH) {
        let mut part = [[0f32; WIDTH]; 4];
        for row in run {
            for l in 0..WIDTH {
                let xv = row[l];
                let q = code(xv * is[l] + z[l], qmax);
                let d = xv - (q - z[l]) * s[l];
                part[0][l] += d * d;
                part[1][l] += q;
                part[2][l] += q * q;
                part[3][l] += q * xv;
            }
        }
        for k in 0..4 {
            for l in 0..WIDTH {
                total[k][l] += f64::from(part[k][l]);
            }
        }
    }
    total
}

crate::dtype::avx2_dispatch!(
    fn score_pass(x: &[Lanes], s: &Lanes, is: &Lanes, z: &Lanes, qmax: f32) -> [[f64; WIDTH]; 4]
        => score_pass_body
);

/// `max(v, 0)` with a plain compare.
#[inline(always)]
fn at_least_zero(v: f32) -> f32 {
    if v > 0.0 {
        v
    } else {
        0.0
    }
}

/// The RTN candidate's squared error in every lane, and the lane's sum of `x`.
#[inline(always)]
fn rtn_pass_body(x: &[Lanes], rtn: &RtnLanes) -> [[f64; WIDTH]; 2] {
    let rtn = *rtn;
    let mut total = [[0f64; WIDTH]; 2];
    for run in x.chunks(FLUSH) {
        let mut sse = [0f32; WIDTH];
        let mut sum = [0f32; WIDTH];
        for row in run {
            for l in 0..WIDTH {
                let xv = row[l];
                let d = xv - (rtn.code(l, xv) - rtn.zero[l]) * rtn.scale[l];
                sse[l] += d * d;
                sum[l] += xv;
            }
        }
        for l in 0..WIDTH {
            total[0][l] += f64::from(sse[l]);
            total[1][l] += f64::from(sum[l]);
        }
    }
    total
}

crate::dtype::avx2_dispatch!(
    fn rtn_pass(x: &[Lanes], rtn: &RtnLanes) -> [[f64; WIDTH]; 2] => rtn_pass_body
);

/// The HQQ codes `round(clamp(x / s + z))` (`is = 1 / s`) of every lane.
#[inline(always)]
fn write_codes_body(x: &[Lanes], is: &Lanes, z: &Lanes, qmax: f32, out: &mut [[u32; WIDTH]]) {
    let (is, z) = (*is, *z);
    for (row, c) in x.iter().zip(out.iter_mut()) {
        for l in 0..WIDTH {
            // `v + 2^23` for `0 <= v < 2^23` holds `round(v)` in its low mantissa bits.
            let biased = clamp(row[l] * is[l] + z[l], 0.0, qmax) + ROUND_MAGIC;
            c[l] = biased.to_bits() & 0xFF;
        }
    }
}

crate::dtype::avx2_dispatch!(
    fn write_codes(x: &[Lanes], is: &Lanes, z: &Lanes, qmax: f32, out: &mut [[u32; WIDTH]])
        => write_codes_body
);
