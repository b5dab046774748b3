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
//! skip these steps), and with the shrinkage threshold `1 / (beta sqrt|e|)` from a
//! bit-level reciprocal square root estimate and one Newton step ([`rsqrt`]: IEEE operations,
//! so the same bits on every CPU; 0.2 % is plenty for a threshold), least-squares rounds
//! with the same fixed-point stop (over-relaxed; their f16 rounding goes by way of f32, as an
//! F16C conversion does, whatever the CPU), and the same per-group choice against the same
//! asymmetric RTN candidate, scored by its squared error, so a group is never worse than RTN.
//! Every squared error (each candidate's and RTN's) is summed in code units,
//! `s^2 sum (t - round(clamp(t)))^2` with `t = x / s + z` computed by the reciprocal of `s`
//! (for RTN too, whose written codes still come from the exact division of
//! [`RtnAsym::code`]): `sum (x - (q - z) s)^2` up to f32 rounding, in 3 operations a weight
//! instead of 5, and without RTN's division in the pass that measures it.
//! The sums are per lane, in f32 over runs of [`FLUSH`] elements, added in f64. A lane's
//! result depends only on its own group, never on the other lanes, so it does not depend on
//! how groups are batched or on the thread count.
//!
//! Where the time goes is kept down by doing as few sweeps as possible: the transposition
//! (8 x 8 blocks by AVX2 shuffles) also scans min, max and NaN; the RTN candidate's error is
//! measured in the first half-quadratic pass (or the first least-squares round when there is
//! none); the codes are written from each group in place (no transposed code buffer to
//! gather); the next batch's weights are prefetched a quarter at a time between the
//! passes; the RTN candidates of all lanes are set up at once ([`rtn_setup`], bit for bit
//! `RtnAsym::new`); and a least-squares round of real f16 pairs (score pass, refit, f16
//! rounding, choice) is one AVX2-dispatched function whose per-lane bookkeeping is selects
//! on plain arrays ([`Rounds`]), not branches on `Option`s.
//!
//! Groups that hold NaN or infinities, all-zero groups and lanes without a group are handed
//! to [`super::hqq_group`] (which falls back to RTN for them).

use super::{hqq_group, Solver, Storage};
use crate::quantize::{round_half_away, RtnAsym};
use crate::recipe::ScaleDtype;

/// Groups solved together.
pub(crate) const WIDTH: usize = 16;
/// Elements summed in f32 before a lane's sum is added to its f64 total.
const FLUSH: usize = 16;
/// `2^23`: `(v + M) - M` rounds `0 <= v < 2^23` to the nearest integer, ties to even.
const ROUND_MAGIC: f32 = 8_388_608.0;

pub(super) type Lanes = [f32; WIDTH];

/// Buffers reused across batches (one per rayon task).
#[derive(Default)]
pub(crate) struct Scratch {
    /// The groups, transposed: `x[i][lane]`.
    x: Vec<Lanes>,
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

/// The RTN candidate of one lane (asymmetric, codes `[0, qmax]`, non-zero scale), as
/// per-lane constants.
#[derive(Clone, Copy, Default)]
struct RtnLanes {
    scale: Lanes,
    /// `1 / scale`.
    inv: Lanes,
    zero: Lanes,
    /// `qmax - zero`.
    top: Lanes,
}

impl RtnLanes {
    /// The squared rounding error of `x` in code units, `(t - round(clamp(t)))^2` with
    /// `t = x / scale + zero` (by the reciprocal): the RTN candidate's squared error over
    /// `scale^2`. The codes written are those of [`RtnAsym::code`] (an exact division, ties
    /// away from zero); where the reciprocal or the tie rule picks the other neighbour of a
    /// midpoint, both neighbours are half a step away, so the error is the same up to f32
    /// rounding, like every error scored here.
    #[inline(always)]
    fn code_error(&self, l: usize, x: f32, qmax: f32) -> f32 {
        let t = x * self.inv[l] + self.zero[l];
        let e = t - code(t, qmax);
        e * e
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
#[allow(clippy::too_many_arguments)]
pub(crate) fn hqq_batch(
    bits: u8,
    iterations: usize,
    solver: &Solver,
    storage: Storage,
    batch: &mut [(&[f32], &mut [u8])],
    next: &[(&[f32], &mut [u8])],
    out: &mut [(f32, f32)],
    scratch: &mut Scratch,
) {
    let count = batch.len().min(WIDTH);
    let len = batch.first().map_or(0, |g| g.0.len());
    let qmax = ((1u32 << bits) - 1) as f32;
    let n = len as f64;

    // Transpose (missing lanes are all-zero groups, handed to the scalar path below) and
    // scan: min and max (plain compares skip NaN), and `sum x * 0`, which is NaN exactly
    // when the lane holds a NaN or an infinity.
    if scratch.x.len() < len {
        scratch.x.resize(len, [0.0; WIDTH]);
    }
    let x = &mut scratch.x[..len];
    let scanned = match count == WIDTH {
        true => {
            let groups: [&[f32]; WIDTH] = std::array::from_fn(|l| &batch[l].0[..len]);
            transpose_scan(&groups, x)
        }
        false => {
            for row in x.iter_mut() {
                *row = [0.0; WIDTH];
            }
            for (l, (g, _)) in batch.iter().take(count).enumerate() {
                for (row, &v) in x.iter_mut().zip(g.iter()) {
                    row[l] = v;
                }
            }
            scan_rows(x)
        }
    };
    let x = &scratch.x[..len];
    let Scanned { lo, hi, poison } = scanned;
    // The next batch is prefetched a quarter at a time between the passes (all at once, the
    // prefetches wait for each other).
    let quarter = next.len().div_ceil(4).max(1);
    let mut next_quarters = next.chunks(quarter);
    let mut prefetch_quarter = || {
        if let Some(groups) = next_quarters.next() {
            prefetch(groups);
        }
    };
    prefetch_quarter();

    let mut choice = [Choice::Scalar; WIDTH];
    let mut rtn = RtnLanes::default();
    let mut rtn_params = [(0f32, 0f32); WIDTH];
    let mut inv = [1f32; WIDTH];
    let mut scale = [1f32; WIDTH];
    let mut zero = [0f32; WIDTH];
    let mut hqq = [false; WIDTH];
    let (fast_scale, fast_zero, fast) = rtn_setup(&lo, &hi, storage.rtn_grid(), qmax);
    for l in 0..WIDTH {
        // Neutral constants, so an unused lane computes finite numbers.
        (rtn.scale[l], rtn.inv[l], rtn.zero[l], rtn.top[l]) = (1.0, 1.0, 0.0, qmax);
        let range = hi[l] - lo[l];
        let finite = range.is_finite() && lo[l].is_finite() && hi[l].is_finite();
        if l >= count || poison[l] != 0.0 || !finite {
            continue;
        }
        let (r_scale, r_zero) = match fast[l] {
            true => (fast_scale[l], fast_zero[l]),
            false => {
                let r = RtnAsym::new(bits, storage.rtn_grid(), lo[l].min(0.0), hi[l].max(0.0));
                (r.scale, r.zero)
            }
        };
        if r_scale == 0.0 {
            continue;
        }
        rtn_params[l] = (r_scale, r_zero);
        (rtn.scale[l], rtn.zero[l], rtn.top[l]) = (r_scale, r_zero, qmax - r_zero);
        rtn.inv[l] = 1.0 / r_scale;
        choice[l] = Choice::Rtn;
        // Lanes HQQ runs on (those whose RTN error turns out infinite are dropped below),
        // their min-max scale and start zero.
        if range > 0.0 && len >= 2 {
            hqq[l] = true;
            scale[l] = range / qmax;
            inv[l] = qmax / range;
            zero[l] = -lo[l] * inv[l];
        }
    }

    let hqq_iterations = match storage {
        Storage::IntegerZero(_) if !solver.integer_zero_hqq => 0,
        _ => iterations,
    };
    // The RTN candidate's squared error and the sum of x (the same for every refit), measured
    // in the first half-quadratic pass when there is one, else in the first least-squares
    // round, else alone.
    let any_hqq = hqq.iter().any(|&h| h);
    // One half-quadratic step stands for `batched_relax` reference iterations here.
    let batched = Solver {
        relax: solver.batched_relax,
        ..*solver
    };
    let (rtn_sums, best_zero) =
        optimize_zeros(x, &rtn, &hqq, &inv, &zero, qmax, hqq_iterations, &batched);
    prefetch_quarter();
    let mut rtn_sums = match (rtn_sums, any_hqq) {
        (None, false) => Some(rtn_pass(x, &rtn, qmax)),
        (sums, _) => sums,
    };

    if any_hqq {
        let mut st = Rounds {
            active: [false; WIDTH],
            cur_s: [1.0; WIDTH],
            cur_z: [0.0; WIDTH],
            best: [f64::NAN; WIDTH],
            won: [false; WIDTH],
            best_s: [0.0; WIDTH],
            best_z: [0.0; WIDTH],
        };
        for l in 0..WIDTH {
            if !hqq[l] {
                continue;
            }
            let start = match storage {
                Storage::F16Pair => {
                    let (s, z) = (round_f16(scale[l]), round_f16(best_zero[l]));
                    (s > 0.0 && s.is_finite() && z.is_finite()).then_some((s, z))
                }
                Storage::IntegerZero(_) => {
                    storage.store(f64::from(scale[l]), f64::from(best_zero[l]), qmax)
                }
            };
            if let Some((s, z)) = start {
                (st.active[l], st.cur_s[l], st.cur_z[l]) = (true, s, z);
            }
        }
        let rounds = match storage {
            Storage::F16Pair => solver.relaxed_refit_rounds,
            Storage::IntegerZero(_) => solver.int_refit_rounds,
        };
        for round in 0..=rounds {
            if !st.active.iter().any(|&a| a) {
                break;
            }
            prefetch_quarter();
            if let (Storage::F16Pair, Some([rtn_sse, sum_x])) = (storage, rtn_sums) {
                if round == 0 {
                    st.start(&rtn_sse);
                }
                f16_round(x, &mut st, &sum_x, n, solver.refit_relax, qmax);
                continue;
            }
            let is = st.cur_s.map(|v| 1.0 / v);
            let [sse, sq, sqq, sqx] = match rtn_sums {
                Some(_) => score_pass(x, &st.cur_s, &is, &st.cur_z, qmax),
                None => {
                    let [sse, sq, sqq, sqx, rtn_sse, sum_x] =
                        rtn_score_pass(x, &rtn, &st.cur_s, &is, &st.cur_z, qmax);
                    rtn_sums = Some([rtn_sse, sum_x]);
                    [sse, sq, sqq, sqx]
                }
            };
            let [rtn_sse, sum_x] = rtn_sums.unwrap_or([[f64::NAN; WIDTH]; 2]);
            if round == 0 {
                st.start(&rtn_sse);
            }
            let (next_s, next_z, valid) = match storage {
                Storage::F16Pair => {
                    let sums = [sq, sqq, sum_x, sqx];
                    refit_f16_lanes(n, &sums, &st.cur_s, &st.cur_z, solver.refit_relax)
                }
                Storage::IntegerZero(_) => {
                    let (mut next_s, mut next_z) = (st.cur_s, st.cur_z);
                    let mut valid = [false; WIDTH];
                    for l in 0..WIDTH {
                        if !st.active[l] {
                            continue;
                        }
                        let ls = [sq[l], sqq[l], sum_x[l], sqx[l]];
                        let from = (solver.int_refit_relax != 1.0)
                            .then_some(((st.cur_s[l], st.cur_z[l]), solver.int_refit_relax));
                        if let Some((s, z)) = storage.refit_relaxed(n, ls, qmax, from) {
                            (next_s[l], next_z[l], valid[l]) = (s, z, true);
                        }
                    }
                    (next_s, next_z, valid)
                }
            };
            st.update(&sse, &next_s, &next_z, &valid);
        }
        for (l, choice) in choice.iter_mut().enumerate() {
            if st.won[l] {
                *choice = Choice::Hqq(st.best_s[l], st.best_z[l]);
            }
        }
    }

    for _ in 0..4 {
        prefetch_quarter();
    }

    // The codes of every lane, from its group in place.
    for l in 0..count {
        let (g, c) = &mut batch[l];
        match choice[l] {
            Choice::Scalar => out[l] = hqq_group(bits, iterations, solver, storage, g, c),
            Choice::Rtn => {
                let (s, z, top) = (rtn.scale[l], rtn.zero[l], rtn.top[l]);
                write_rtn_codes(g, s, z, top, c);
                out[l] = rtn_params[l];
            }
            Choice::Hqq(sl, zl) => {
                write_codes(g, 1.0 / sl, zl, qmax, c);
                out[l] = (sl, zl);
            }
        }
    }
}

/// [`RtnAsym::new`]'s scale and zero for the range `[min(lo, 0), max(hi, 0)]` in every lane
/// whose raw scale `range / qmax` is finite and a normal number of `grid` (rounding it up
/// to the grid is then a bit operation), and in which lanes that holds (the others must call
/// [`RtnAsym::new`]): the same operations as `quantize::params_from_range`, on all lanes at
/// once (a test compares the two).
#[inline(always)]
fn rtn_setup_body(
    lo: &Lanes,
    hi: &Lanes,
    grid: ScaleDtype,
    qmax: f32,
) -> (Lanes, Lanes, [bool; WIDTH]) {
    // Bits added before clearing them (rounding up to the grid), and the raw scales whose
    // rounded value is a normal, finite number of the grid.
    let (mask, min, max) = match grid {
        ScaleDtype::F16 => (0x1FFFu32, 6.103_515_6e-5f32, 65_504.0f32),
        ScaleDtype::Bf16 => (0xFFFF, f32::MIN_POSITIVE, 3.389_531_4e38),
        ScaleDtype::F32 => (0, f32::MIN_POSITIVE, f32::MAX),
    };
    let (mut scale, mut zero, mut ok) = ([1f32; WIDTH], [0f32; WIDTH], [false; WIDTH]);
    for l in 0..WIDTH {
        let (lo, hi) = (lo[l].min(0.0), hi[l].max(0.0));
        let raw = (hi - lo) / qmax;
        ok[l] = (raw >= min) & (raw <= max);
        let s = f32::from_bits(raw.to_bits().wrapping_add(mask) & !mask);
        let s = if ok[l] { s } else { 1.0 };
        let z = (-lo / s).round();
        scale[l] = s;
        zero[l] = if z.is_nan() { 0.0 } else { z.clamp(0.0, qmax) };
    }
    (scale, zero, ok)
}

crate::dtype::avx2_dispatch!(
    pub(super) fn rtn_setup(lo: &Lanes, hi: &Lanes, grid: ScaleDtype, qmax: f32)
        -> (Lanes, Lanes, [bool; WIDTH]) => rtn_setup_body
);

/// The least-squares rounds' state, per lane: whether a pair is still being refitted
/// (`active`), that pair `(cur_s, cur_z)`, the lowest squared error so far (`best`, the RTN
/// candidate's to start with) and the pair that scored it where one beat RTN (`won`). Plain
/// arrays updated by selects, so a round's bookkeeping has no branch per lane.
struct Rounds {
    active: [bool; WIDTH],
    cur_s: Lanes,
    cur_z: Lanes,
    best: [f64; WIDTH],
    won: [bool; WIDTH],
    best_s: Lanes,
    best_z: Lanes,
}

impl Rounds {
    /// Before the first round's choice: the RTN candidate's error is the one to beat, and a
    /// lane whose RTN error is not finite keeps the RTN result.
    fn start(&mut self, rtn_sse: &[f64; WIDTH]) {
        for (active, sse) in self.active.iter_mut().zip(rtn_sse) {
            *active &= sse.is_finite();
        }
        self.best = *rtn_sse;
    }

    /// After a round scored the current pairs (`sse`) and refitted them (`next_*`, `valid`):
    /// keeps a pair that beats the best so far, moves on to the refitted pairs, and ends
    /// lanes whose refit is not valid or gives back the scored pair (a fixed point).
    #[inline(always)]
    fn update(
        &mut self,
        sse: &[f64; WIDTH],
        next_s: &Lanes,
        next_z: &Lanes,
        valid: &[bool; WIDTH],
    ) {
        for l in 0..WIDTH {
            let better = self.active[l] & (sse[l] < self.best[l]);
            self.best[l] = if better { sse[l] } else { self.best[l] };
            self.best_s[l] = if better {
                self.cur_s[l]
            } else {
                self.best_s[l]
            };
            self.best_z[l] = if better {
                self.cur_z[l]
            } else {
                self.best_z[l]
            };
            self.won[l] |= better;
            let same = (next_s[l] == self.cur_s[l]) & (next_z[l] == self.cur_z[l]);
            self.active[l] = self.active[l] & valid[l] & !same;
            self.cur_s[l] = if valid[l] { next_s[l] } else { self.cur_s[l] };
            self.cur_z[l] = if valid[l] { next_z[l] } else { self.cur_z[l] };
        }
    }
}

/// One least-squares round of real f16 pairs in every lane, all in one function (score
/// pass, over-relaxed refit, bookkeeping): [`score_pass`], [`refit_f16_lanes`],
/// [`Rounds::update`]. `sum_x` is each lane's sum of `x`.
#[inline(always)]
fn f16_round_body(
    x: &[Lanes],
    st: &mut Rounds,
    sum_x: &[f64; WIDTH],
    n: f64,
    relax: f64,
    qmax: f32,
) {
    let is = st.cur_s.map(|v| 1.0 / v);
    let [sse, sq, sqq, sqx] = score_pass_body(x, &st.cur_s, &is, &st.cur_z, qmax);
    let sums = [sq, sqq, *sum_x, sqx];
    let (next_s, next_z, valid) = refit_f16_lanes(n, &sums, &st.cur_s, &st.cur_z, relax);
    st.update(&sse, &next_s, &next_z, &valid);
}

crate::dtype::avx2_dispatch!(
    fn f16_round(x: &[Lanes], st: &mut Rounds, sum_x: &[f64; WIDTH], n: f64, relax: f64,
        qmax: f32) => f16_round_body
);

/// Asks the CPU to bring the weights of `groups` into cache (a hint: no effect on results).
pub(crate) fn prefetch(groups: &[(&[f32], &mut [u8])]) {
    #[cfg(target_arch = "x86_64")]
    for (g, _) in groups {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for line in g.chunks(16) {
            // SAFETY: prefetching is a hint that never faults; the address is in `g`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast::<i8>()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = groups;
}

/// What [`transpose_scan`] finds in each lane: min, max (NaN skipped) and `sum x * 0`
/// (NaN exactly when the lane holds a NaN or an infinity).
struct Scanned {
    lo: Lanes,
    hi: Lanes,
    poison: Lanes,
}

/// [`Scanned`] of transposed rows.
fn scan_rows(x: &[Lanes]) -> Scanned {
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
    Scanned { lo, hi, poison }
}

/// Transposes [`WIDTH`] groups of `x.len()` weights into `x` (`x[i][lane]`) and scans them:
/// with AVX2, 8 x 8 blocks moved by shuffles with the scan on the transposed rows; otherwise
/// four lanes at a time, then [`scan_rows`]. Both give the same rows and the same scan (the
/// compares see every lane's weights in order).
fn transpose_scan(groups: &[&[f32]; WIDTH], x: &mut [Lanes]) -> Scanned {
    #[cfg(target_arch = "x86_64")]
    if crate::dtype::has_avx2() && groups.iter().all(|g| g.len() >= x.len()) {
        // SAFETY: the CPU has AVX2 (checked just now), and every group holds at least
        // `x.len()` weights (checked just now), which is all `transpose_scan_avx2` reads.
        return unsafe { transpose_scan_avx2(groups, x) };
    }
    let len = x.len();
    for (quad, g) in groups.chunks_exact(4).enumerate() {
        // Four loads and one 16-byte store per row (four group pointers stay in registers,
        // sixteen would not).
        let [g0, g1, g2, g3] = [0, 1, 2, 3].map(|k| &g[k][..len]);
        for (i, row) in x.iter_mut().enumerate() {
            row[4 * quad..4 * quad + 4].copy_from_slice(&[g0[i], g1[i], g2[i], g3[i]]);
        }
    }
    scan_rows(x)
}

/// [`transpose_scan`] with AVX2 shuffles.
///
/// # Safety
/// The CPU must have AVX2, and every group must hold at least `x.len()` weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_scan_avx2(groups: &[&[f32]; WIDTH], x: &mut [Lanes]) -> Scanned {
    use std::arch::x86_64::*;
    let len = x.len();
    let whole = len / 8 * 8;
    let mut lo = [_mm256_set1_ps(f32::INFINITY); 2];
    let mut hi = [_mm256_set1_ps(f32::NEG_INFINITY); 2];
    let mut poison = [_mm256_setzero_ps(); 2];
    let zero = _mm256_setzero_ps();
    let out = x.as_mut_ptr().cast::<f32>();
    for i in (0..whole).step_by(8) {
        for half in 0..2 {
            // SAFETY: `i + 8 <= len <= groups[k].len()`.
            let r: [__m256; 8] = std::array::from_fn(|k| unsafe {
                _mm256_loadu_ps(groups[8 * half + k].as_ptr().add(i))
            });
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let rows = [
                _mm256_permute2f128_ps::<0x20>(s0, s4),
                _mm256_permute2f128_ps::<0x20>(s1, s5),
                _mm256_permute2f128_ps::<0x20>(s2, s6),
                _mm256_permute2f128_ps::<0x20>(s3, s7),
                _mm256_permute2f128_ps::<0x31>(s0, s4),
                _mm256_permute2f128_ps::<0x31>(s1, s5),
                _mm256_permute2f128_ps::<0x31>(s2, s6),
                _mm256_permute2f128_ps::<0x31>(s3, s7),
            ];
            for (j, &v) in rows.iter().enumerate() {
                // MINPS/MAXPS return their second operand unless the first compares
                // less/greater: the scalar `if v < lo { v } else { lo }`.
                lo[half] = _mm256_min_ps(v, lo[half]);
                hi[half] = _mm256_max_ps(v, hi[half]);
                poison[half] = _mm256_add_ps(poison[half], _mm256_mul_ps(v, zero));
                // SAFETY: row `i + j < len` of `x`, lanes `8 half .. 8 half + 8`.
                unsafe { _mm256_storeu_ps(out.add((i + j) * WIDTH + 8 * half), v) };
            }
        }
    }
    let mut scanned = Scanned {
        lo: [0.0; WIDTH],
        hi: [0.0; WIDTH],
        poison: [0.0; WIDTH],
    };
    for half in 0..2 {
        // SAFETY: each destination holds 8 lanes from `8 half`.
        unsafe {
            _mm256_storeu_ps(scanned.lo.as_mut_ptr().add(8 * half), lo[half]);
            _mm256_storeu_ps(scanned.hi.as_mut_ptr().add(8 * half), hi[half]);
            _mm256_storeu_ps(scanned.poison.as_mut_ptr().add(8 * half), poison[half]);
        }
    }
    for i in whole..len {
        for l in 0..WIDTH {
            let v = groups[l][i];
            x[i][l] = v;
            let (lo, hi) = (&mut scanned.lo[l], &mut scanned.hi[l]);
            *lo = if v < *lo { v } else { *lo };
            *hi = if v > *hi { v } else { *hi };
            scanned.poison[l] += v * 0.0;
        }
    }
    scanned
}

/// `v` rounded to the nearest f16 value, ties to even, for `2^-14 <= |v| < 65504` (normal
/// f16 magnitudes), with integer arithmetic on the f32 bits.
#[inline(always)]
fn round_f16_normal(v: f32) -> f32 {
    let b = v.to_bits();
    f32::from_bits(b.wrapping_add(0x0FFF + ((b >> 13) & 1)) & 0xFFFF_E000)
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

/// The least-squares refit of [`Storage::refit`] for real f16 pairs in every lane at once:
/// `x ~ a q + c` from the sums `[q, q^2, x, q x]` of the codes of the pair `(s, z)`,
/// moved `relax` times as far from `(s, -z s)` (over-relaxation), then
/// `(s, z) = (a, -c / a)` rounded to f16, and whether that is a valid pair (the fit and its
/// rounding; where not, the returned pair is meaningless).
#[inline(always)]
fn refit_f16_lanes(
    n: f64,
    sums: &[[f64; WIDTH]; 4],
    s: &Lanes,
    z: &Lanes,
    relax: f64,
) -> (Lanes, Lanes, [bool; WIDTH]) {
    let (a, zero, fits) = refit_lanes_body(n, sums, s, z, relax);
    // Normal f16 magnitudes by bit arithmetic in every lane, the rest (rare) one by one.
    let mut out_s = a.map(round_f16_normal);
    let mut out_z = zero.map(round_f16_normal);
    let mut normal = [false; WIDTH];
    for l in 0..WIDTH {
        normal[l] = f16_normal(a[l]) & f16_normal(zero[l]);
    }
    if !normal.iter().all(|&v| v) {
        for l in 0..WIDTH {
            if !normal[l] {
                (out_s[l], out_z[l]) = (round_f16(a[l]), round_f16(zero[l]));
            }
        }
    }
    let mut valid = [false; WIDTH];
    for l in 0..WIDTH {
        let (s, z) = (out_s[l], out_z[l]);
        valid[l] = fits[l] & (s > 0.0) & (s < f32::INFINITY) & (z.abs() < f32::INFINITY);
    }
    (out_s, out_z, valid)
}

/// Step 2 for every lane with `active` set: the half-quadratic zero iterations at the fixed
/// scale `1 / inv`, from `start`, each lane stopping once its mean absolute error stops
/// decreasing. Returns the RTN candidate's squared error in every lane and the lane's sum
/// of `x` when a pass measured them (the first, for `p = 1/2`), and each lane's zero with
/// the lowest mean absolute error seen.
#[allow(clippy::too_many_arguments)]
fn optimize_zeros(
    x: &[Lanes],
    rtn: &RtnLanes,
    active: &[bool; WIDTH],
    inv: &Lanes,
    start: &Lanes,
    qmax: f32,
    iterations: usize,
    solver: &Solver,
) -> (Option<[[f64; WIDTH]; 2]>, Lanes) {
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
    let passes = solver.steps(iterations).saturating_sub(1);
    let fused = solver.lp_norm == 0.5 && passes > 0 && active.iter().any(|&a| a);
    let mut rtn_sums = None;
    for pass in 0..passes {
        if !running.iter().any(|&r| r) {
            break;
        }
        let [update, abs_err] = if pass == 0 && fused {
            let [update, abs_err, sse, sum] = rtn_hqq_pass(x, rtn, inv, &z, &inv_beta, qmax);
            rtn_sums = Some([sse, sum]);
            [update, abs_err]
        } else if solver.lp_norm == 0.5 {
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
    (rtn_sums, best_z)
}

/// `1 / sqrt(a)` for `a >= 0` to about 0.2 %: the classic bit-level estimate refined by one
/// Newton step, IEEE operations only (the same bits on every CPU, unlike `rsqrtps`); finite
/// (about `2e19`) for `a = 0`.
#[inline(always)]
fn rsqrt(a: f32) -> f32 {
    let y = f32::from_bits(0x5F37_5A86u32.wrapping_sub(a.to_bits() >> 1));
    let half_a = 0.5 * a;
    y * (1.5 - half_a * y * y)
}

/// One half-quadratic pass (`p = 1/2`) of every lane at its zero `z`:
/// `[sum (q - y + shrink(e)), sum |e|]`, with the shrinkage threshold `1 / (beta sqrt|e|)`
/// (by [`rsqrt`]); with `RTN`, also the RTN candidate's squared error and the sum of `x`
/// (what [`rtn_pass`] measures).
#[inline(always)]
fn hqq_pass_generic<const RTN: bool>(
    x: &[Lanes],
    rtn: &RtnLanes,
    inv: &Lanes,
    z: &Lanes,
    inv_beta: &Lanes,
    qmax: f32,
) -> [[f64; WIDTH]; 4] {
    let (inv, z, inv_beta, rtn) = (*inv, *z, *inv_beta, *rtn);
    let mut total = [[0f64; WIDTH]; 4];
    for run in x.chunks(FLUSH) {
        let mut update = [0f32; WIDTH];
        let mut abs_err = [0f32; WIDTH];
        let mut sse = [0f32; WIDTH];
        let mut sum = [0f32; WIDTH];
        for row in run {
            for l in 0..WIDTH {
                let xv = row[l];
                let y = xv * inv[l];
                let t = y + z[l];
                let q = code(t, qmax);
                let e = t - q;
                let ae = e.abs();
                let shrunk = at_least_zero(ae - inv_beta[l] * rsqrt(ae)).copysign(e);
                update[l] += q - y + shrunk;
                abs_err[l] += ae;
                if RTN {
                    sse[l] += rtn.code_error(l, xv, qmax);
                    sum[l] += xv;
                }
            }
        }
        for l in 0..WIDTH {
            total[0][l] += f64::from(update[l]);
            total[1][l] += f64::from(abs_err[l]);
            if RTN {
                total[2][l] += f64::from(sse[l]);
                total[3][l] += f64::from(sum[l]);
            }
        }
    }
    if RTN {
        for (sse, &scale) in total[2].iter_mut().zip(&rtn.scale) {
            *sse *= f64::from(scale) * f64::from(scale);
        }
    }
    total
}

#[inline(always)]
fn hqq_pass_body(
    x: &[Lanes],
    inv: &Lanes,
    z: &Lanes,
    inv_beta: &Lanes,
    qmax: f32,
) -> [[f64; WIDTH]; 2] {
    let [update, abs_err, _, _] =
        hqq_pass_generic::<false>(x, &RtnLanes::default(), inv, z, inv_beta, qmax);
    [update, abs_err]
}

crate::dtype::avx2_dispatch!(
    fn hqq_pass(x: &[Lanes], inv: &Lanes, z: &Lanes, inv_beta: &Lanes, qmax: f32)
        -> [[f64; WIDTH]; 2] => hqq_pass_body
);

crate::dtype::avx2_dispatch!(
    /// [`hqq_pass`] and [`rtn_pass`] in one sweep: `[update, |e|, RTN error, sum x]`.
    fn rtn_hqq_pass(x: &[Lanes], rtn: &RtnLanes, inv: &Lanes, z: &Lanes, inv_beta: &Lanes,
        qmax: f32) -> [[f64; WIDTH]; 4] => rtn_hqq_pass_body
);

#[inline(always)]
fn rtn_hqq_pass_body(
    x: &[Lanes],
    rtn: &RtnLanes,
    inv: &Lanes,
    z: &Lanes,
    inv_beta: &Lanes,
    qmax: f32,
) -> [[f64; WIDTH]; 4] {
    hqq_pass_generic::<true>(x, rtn, inv, z, inv_beta, qmax)
}

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
/// `[sum (x - dq)^2, sum q, sum q^2, sum q*x]`; with `RTN`, also the RTN candidate's
/// squared error and the sum of `x` (what [`rtn_pass`] measures). The squared error is
/// summed in code units, `s^2 sum (t - q)^2` with `t = x / s + z` (by the reciprocal, as
/// the codes are written), which is `sum (x - (q - z) s)^2` up to f32 rounding.
#[inline(always)]
fn score_pass_generic<const RTN: bool>(
    x: &[Lanes],
    rtn: &RtnLanes,
    s: &Lanes,
    is: &Lanes,
    z: &Lanes,
    qmax: f32,
) -> [[f64; WIDTH]; 6] {
    let (s, is, z, rtn) = (*s, *is, *z, *rtn);
    let mut total = [[0f64; WIDTH]; 6];
    for run in x.chunks(FLUSH) {
        let mut part = [[0f32; WIDTH]; 6];
        for row in run {
            for l in 0..WIDTH {
                let xv = row[l];
                let t = xv * is[l] + z[l];
                let q = code(t, qmax);
                let e = t - q;
                part[0][l] += e * e;
                part[1][l] += q;
                part[2][l] += q * q;
                part[3][l] += q * xv;
                if RTN {
                    part[4][l] += rtn.code_error(l, xv, qmax);
                    part[5][l] += xv;
                }
            }
        }
        for k in 0..if RTN { 6 } else { 4 } {
            for l in 0..WIDTH {
                total[k][l] += f64::from(part[k][l]);
            }
        }
    }
    for l in 0..WIDTH {
        total[0][l] *= f64::from(s[l]) * f64::from(s[l]);
        if RTN {
            total[4][l] *= f64::from(rtn.scale[l]) * f64::from(rtn.scale[l]);
        }
    }
    total
}

#[inline(always)]
fn score_pass_body(x: &[Lanes], s: &Lanes, is: &Lanes, z: &Lanes, qmax: f32) -> [[f64; WIDTH]; 4] {
    let [sse, sq, sqq, sqx, _, _] =
        score_pass_generic::<false>(x, &RtnLanes::default(), s, is, z, qmax);
    [sse, sq, sqq, sqx]
}

crate::dtype::avx2_dispatch!(
    fn score_pass(x: &[Lanes], s: &Lanes, is: &Lanes, z: &Lanes, qmax: f32) -> [[f64; WIDTH]; 4]
        => score_pass_body
);

#[inline(always)]
fn rtn_score_pass_body(
    x: &[Lanes],
    rtn: &RtnLanes,
    s: &Lanes,
    is: &Lanes,
    z: &Lanes,
    qmax: f32,
) -> [[f64; WIDTH]; 6] {
    score_pass_generic::<true>(x, rtn, s, is, z, qmax)
}

crate::dtype::avx2_dispatch!(
    /// [`score_pass`] and [`rtn_pass`] in one sweep: `[sse, q, q^2, q x, RTN error, x]`.
    fn rtn_score_pass(x: &[Lanes], rtn: &RtnLanes, s: &Lanes, is: &Lanes, z: &Lanes, qmax: f32)
        -> [[f64; WIDTH]; 6] => rtn_score_pass_body
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
fn rtn_pass_body(x: &[Lanes], rtn: &RtnLanes, qmax: f32) -> [[f64; WIDTH]; 2] {
    let rtn = *rtn;
    let mut total = [[0f64; WIDTH]; 2];
    for run in x.chunks(FLUSH) {
        let mut sse = [0f32; WIDTH];
        let mut sum = [0f32; WIDTH];
        for row in run {
            for l in 0..WIDTH {
                let xv = row[l];
                sse[l] += rtn.code_error(l, xv, qmax);
                sum[l] += xv;
            }
        }
        for l in 0..WIDTH {
            total[0][l] += f64::from(sse[l]);
            total[1][l] += f64::from(sum[l]);
        }
    }
    for (sse, &scale) in total[0].iter_mut().zip(&rtn.scale) {
        *sse *= f64::from(scale) * f64::from(scale);
    }
    total
}

crate::dtype::avx2_dispatch!(
    fn rtn_pass(x: &[Lanes], rtn: &RtnLanes, qmax: f32) -> [[f64; WIDTH]; 2] => rtn_pass_body
);

/// The HQQ codes `round(clamp(x / s + z))` (`is = 1 / s`) of one group.
#[inline(always)]
fn write_codes_body(g: &[f32], is: f32, z: f32, qmax: f32, out: &mut [u8]) {
    for (c, &v) in out.iter_mut().zip(g) {
        // `v + 2^23` for `0 <= v < 2^23` holds `round(v)` in its low mantissa bits.
        let biased = clamp(v * is + z, 0.0, qmax) + ROUND_MAGIC;
        *c = (biased.to_bits() & 0xFF) as u8;
    }
}

crate::dtype::avx2_dispatch!(
    fn write_codes(g: &[f32], is: f32, z: f32, qmax: f32, out: &mut [u8]) => write_codes_body
);

/// The RTN candidate's codes of one group (the arithmetic of [`RtnAsym::code`]: an exact
/// division, as `rtn_codes` computes them).
#[inline(always)]
fn write_rtn_codes_body(g: &[f32], scale: f32, zero: f32, top: f32, out: &mut [u8]) {
    for (c, &v) in out.iter_mut().zip(g) {
        let y = clamp(v / scale, -zero, top);
        *c = (round_half_away(y) + zero) as u8;
    }
}

crate::dtype::avx2_dispatch!(
    fn write_rtn_codes(g: &[f32], scale: f32, zero: f32, top: f32, out: &mut [u8])
        => write_rtn_codes_body
);
