//! Round-to-nearest ("RTN") quantization, applied as quantize-then-dequantize in place.
//!
//! A tensor is viewed as a row-major matrix of rows of `row_len` weights; each row is split
//! into groups of `group_size` (the last may be shorter), or is one group for per-channel
//! granularity, or the whole slice is one group for per-tensor granularity. Each group gets
//! one scale, stored as f16 rounded *up* so no value clips:
//!
//! - symmetric: `qmax = 2^(b-1)-1`, `s = f16_up(absmax/(qmax+1/2))`, `q = clamp(round(x/s), -qmax-1, qmax)`,
//!   dequantized as `q*s` (compressed-tensors' rule: the largest magnitude maps to 7.5 for
//!   4 bits, so both ends of the code range are used);
//! - asymmetric: the range `[min(min,0), max(max,0)]`, `qmax = 2^b-1`, `s = f16_up((max-min)/qmax)`,
//!   `zero = clamp(round(-min/s), 0, qmax)`, `q = clamp(round(x/s)+zero, 0, qmax)`, dequantized
//!   as `(q-zero)*s`.
//!
//! `f16_up` rounds up onto the f16 grid; a config's `scale_dtype` picks the bf16 grid or
//! exact f32 scales instead (the output format decides, see [`crate::format`]).
//!
//! Every element then satisfies `|x - dequant| <= s/2` up to f32 rounding of `x/s` and `q*s`.
//! A group whose values are all zero gets scale 0 and dequantizes to zeros. If `f16_up` would
//! overflow f16 (huge weights), the exact f32 scale is used instead so the bound still holds
//! (f32 inputs within a few ulps of `f32::MAX` may still dequantize to infinity).
//!
//! Bit-exactness: the result must match an independent implementation, so the hot loop divides
//! (`x / s`, never `x * (1/s)`) and rounds half away from zero exactly like `f32::round`.
//! (The fused codec path's kernel, [`rtn_group_codes_dequantize_to`], multiplies by `1/s` and
//! rounds ties to even where that provably gives the same code, and falls back to the
//! division for any 64 values where a quotient comes within `2^-12` of a rounding boundary;
//! see `CodeKernel::code_fast`.) The
//! rounding is written with a magic-number add (`round_half_away`) so it vectorizes on
//! baseline x86-64; it equals `f32::round` on the clamped code range (values are clamped
//! first, which commutes with rounding because the bounds are integers). A group containing
//! NaN dequantizes that element to NaN. Rows are independent, so the rayon split over rows
//! cannot change results (per-tensor granularity takes an exact parallel min/max first).
//!
//! The same quantizer is also available as stored codes ([`rtn_codes`] -> [`AffineCodes`],
//! the shared layout of the affine quantizers, see also [`crate::hqq`]): unsigned codes with a
//! per-group `(scale, zero)`, dequantized as `(code - zero) * scale`. Symmetric codes are
//! stored offset by `2^(b-1)` with zero `2^(b-1)`; the in-place path computes exactly
//! `(code - zero) * scale` too (so a zero code gives `+0.0`), which makes the two bit-identical
//! on finite input. [`rtn_codes_dequantize`] computes the codes and overwrites the input with
//! exactly what [`AffineCodes::dequantize_into`] would write, in one pass per group while it
//! is in cache (this is what the codec runs).
//!
//! Speed: every per-element loop is branch-free f32 arithmetic (the group range is scanned in
//! 16 independent min/max lanes, the code clamp is one `maxps`/`minps`, the code is turned
//! into a byte through its mantissa bits instead of a saturating cast), so the loops
//! auto-vectorize on baseline x86-64 with no `unsafe`.

use crate::recipe::{Granularity, QuantizeConfig};
use half::f16;
use rayon::prelude::*;

/// Minimum elements handed to one rayon task, so short rows are batched.
const MIN_PAR_ELEMS: usize = 1 << 14;

/// Scale and code range of one group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GroupParams {
    /// Stored scale (an f16 value unless that would overflow); 0 for an all-zero group.
    pub(crate) scale: f32,
    /// Zero point (0 for symmetric), an integer held as f32.
    zero: f32,
    /// Smallest and largest code, as f32 integers.
    lo: f32,
    hi: f32,
}

/// `2^23`: adding then subtracting it rounds a non-negative f32 below `2^23` to an integer.
const ROUND_MAGIC: f32 = 8_388_608.0;

/// `round(y)` with ties away from zero, equal to `f32::round` for `|y| < 2^23` (and NaN).
///
/// The magic-number add rounds `|y|` half-to-even; an exact tie that went down is bumped up.
/// Unlike `f32::round` (a libm call without SSE4.1) this is plain adds, compares and
/// selects, so the quantize loops vectorize on baseline x86-64.
#[inline(always)]
pub(crate) fn round_half_away(y: f32) -> f32 {
    let a = y.abs();
    let r = (a + ROUND_MAGIC) - ROUND_MAGIC;
    let r = if a - r == 0.5 { r + 1.0 } else { r };
    r.copysign(y)
}

/// The smallest f16 value `>= scale` (for positive finite `scale`), or `scale` itself when
/// that would be infinite.
///
/// Positive scales are rounded up on the f16 grid with integer arithmetic (no conversion
/// calls; this runs once per group): above `2^-14` by rounding the f32 bits up to a multiple
/// of `2^13` (f16 keeps 10 of f32's 23 mantissa bits, and a carry moves to the next binade
/// exactly as the f16 grid does), below it to a multiple of `2^-24` (the f16 subnormals).
/// Other inputs (zero, negative, NaN) take the `half` round trip; the tests check the two
/// agree.
#[inline]
pub(crate) fn f16_round_up(scale: f32) -> f32 {
    /// Largest finite f16.
    const F16_MAX: f32 = 65504.0;
    /// Smallest normal f16, `2^-14`.
    const F16_MIN_NORMAL: f32 = 1.0 / 16384.0;
    /// `2^24`: f16 subnormals are the multiples of `2^-24`.
    const SUBNORMAL_STEPS: f32 = 16_777_216.0;
    if scale > F16_MAX {
        return scale;
    }
    if scale >= F16_MIN_NORMAL {
        return f32::from_bits((scale.to_bits() + 0x1FFF) & !0x1FFF);
    }
    if scale > 0.0 {
        // ceil(scale * 2^24) (exact: below 2^10), then back: both scalings are exact.
        let t = scale * SUBNORMAL_STEPS;
        let r = (t + ROUND_MAGIC) - ROUND_MAGIC;
        let r = if r < t { r + 1.0 } else { r };
        return r / SUBNORMAL_STEPS;
    }
    f16_round_up_half(scale)
}

/// [`f16_round_up`] through `half`'s conversions (the definition; used for inputs outside
/// the positive range and by the tests).
pub(crate) fn f16_round_up_half(scale: f32) -> f32 {
    let h = f16::from_f32(scale);
    let mut v = h.to_f32();
    if v < scale {
        v = f16::from_bits(h.to_bits().wrapping_add(1)).to_f32();
    }
    if v.is_finite() {
        v
    } else {
        scale
    }
}

/// The smallest bf16 value `>= scale` for positive finite `scale` (`scale` itself where that
/// would be infinite): the f32 bits rounded up to a multiple of `2^16`, which carries into the
/// exponent exactly as the bf16 grid does (bf16 keeps f32's exponent range).
#[inline]
pub(crate) fn bf16_round_up(scale: f32) -> f32 {
    if scale.is_nan() || scale <= 0.0 || scale.is_infinite() {
        return scale;
    }
    let up = f32::from_bits((scale.to_bits() + 0xFFFF) & !0xFFFF);
    if up.is_finite() {
        up
    } else {
        scale
    }
}

/// Turns a raw positive scale into the stored one on the F16 grid (never 0 when the group
/// is non-zero).
pub(crate) fn stored_scale(raw: f32) -> f32 {
    stored_scale_on(crate::recipe::ScaleDtype::F16, raw)
}

/// [`stored_scale`] on `grid`.
pub(crate) fn stored_scale_on(grid: crate::recipe::ScaleDtype, raw: f32) -> f32 {
    let s = grid.round_up(raw);
    if s > 0.0 {
        s
    } else {
        // raw underflowed to 0 for a subnormal-only group; the smallest f16 still covers it
        // (and is exact in bf16 and f32 too).
        f16::from_bits(1).to_f32()
    }
}

/// Independent accumulators in the range scans (lets the compiler vectorize them: two AVX2
/// registers, or four SSE ones, so consecutive `maxps` do not wait on each other).
const LANES: usize = 16;

/// Min and max of `g`, ignoring NaN; (0, 0) for an empty group.
///
/// Lane `l` scans elements `i % LANES == l` of the whole chunks, then the lanes and the
/// remainder are folded in; min and max are exact, so this is the sequential result.
/// `if x < lo { x } else { lo }` is one `minps` (NaN keeps `lo`).
#[inline(always)]
pub(crate) fn min_max(g: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = ([0f32; LANES], [0f32; LANES]);
    let chunks = g.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        let c: &[f32; LANES] = c.try_into().expect("chunks_exact");
        for l in 0..LANES {
            lo[l] = if c[l] < lo[l] { c[l] } else { lo[l] };
            hi[l] = if c[l] > hi[l] { c[l] } else { hi[l] };
        }
    }
    let lo = lo
        .iter()
        .chain(rem)
        .fold(0f32, |a, &b| if b < a { b } else { a });
    let hi = hi
        .iter()
        .chain(rem)
        .fold(0f32, |a, &b| if b > a { b } else { a });
    (lo, hi)
}

/// Largest `|x|` of `g` ignoring NaN (infinities included); 0 for an empty group. Equals
/// `hi.max(-lo)` of [`min_max`] whenever that is non-zero, which is all symmetric RTN needs.
#[inline(always)]
pub(crate) fn abs_max(g: &[f32]) -> f32 {
    let mut m = [0f32; LANES];
    let chunks = g.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        let c: &[f32; LANES] = c.try_into().expect("chunks_exact");
        for l in 0..LANES {
            let a = c[l].abs();
            m[l] = if a > m[l] { a } else { m[l] };
        }
    }
    m.iter().chain(rem).fold(0f32, |a, &b| {
        let b = b.abs();
        if b > a {
            b
        } else {
            a
        }
    })
}

/// The scale, zero point and code range for one group.
#[inline(always)]
pub(crate) fn group_params(cfg: &QuantizeConfig, g: &[f32]) -> GroupParams {
    if cfg.symmetric {
        // Symmetric RTN only uses `max(hi, -lo)`, the largest magnitude.
        let m = abs_max(g);
        return params_from_range(cfg, -m, m);
    }
    // min_max starts at 0, so the range always contains 0 (as asymmetric requires).
    let (lo, hi) = min_max(g);
    params_from_range(cfg, lo, hi)
}

/// [`min_max`] of a whole (possibly huge) slice, in parallel. Min and max are exact and
/// associative, so the result does not depend on the split (nor on streaming the slice in
/// chunks and combining their ranges, which [`crate::stream`] relies on).
pub(crate) fn min_max_par(values: &[f32]) -> (f32, f32) {
    values
        .par_chunks(MIN_PAR_ELEMS)
        .map(min_max)
        .reduce(|| (0.0, 0.0), |a, b| (a.0.min(b.0), a.1.max(b.1)))
}

/// The scale, zero point and code range for a group whose NaN-free range is `[lo, hi]`
/// with `lo <= 0 <= hi`.
pub(crate) fn params_from_range(cfg: &QuantizeConfig, lo: f32, hi: f32) -> GroupParams {
    let bits = u32::from(cfg.bits.clamp(2, 8));
    if cfg.symmetric {
        let qmax = ((1u32 << (bits - 1)) - 1) as f32;
        let absmax = hi.max(-lo);
        // The largest magnitude maps to qmax + 1/2 (7.5 for 4 bits), as compressed-tensors
        // does: the code -2^(b-1) is used and the grid is finer than absmax/qmax, while
        // +absmax (rounding to qmax + 1, clamped to qmax) still errs by at most half a step.
        let scale = if absmax > 0.0 {
            stored_scale_on(cfg.scale_dtype, absmax / (qmax + 0.5))
        } else {
            0.0
        };
        GroupParams {
            scale,
            zero: 0.0,
            lo: -qmax - 1.0,
            hi: qmax,
        }
    } else {
        let qmax = ((1u32 << bits) - 1) as f32;
        let range = hi - lo;
        if range > 0.0 {
            // hi - lo can overflow f32 for finite extremes; divide first in that case.
            let raw = if range.is_finite() {
                range / qmax
            } else {
                hi / qmax - lo / qmax
            };
            let scale = stored_scale_on(cfg.scale_dtype, raw);
            // -lo / scale is inf / inf = NaN when lo is -inf; any zero then does.
            let zero = (-lo / scale).round();
            let zero = if zero.is_nan() {
                0.0
            } else {
                zero.clamp(0.0, qmax)
            };
            GroupParams {
                scale,
                zero,
                lo: 0.0,
                hi: qmax,
            }
        } else {
            GroupParams {
                scale: 0.0,
                zero: 0.0,
                lo: 0.0,
                hi: qmax,
            }
        }
    }
}

/// The code of `x` (before dequantization) under `p`; `p.scale` must be non-zero.
#[inline(always)]
fn code_of(p: &GroupParams, x: f32) -> f32 {
    // Clamp first (to integer bounds, so it commutes with rounding) to keep round exact.
    let y = (x / p.scale).clamp(p.lo - p.zero, p.hi - p.zero);
    round_half_away(y) + p.zero
}

/// Quantizes then dequantizes `g` in place with the parameters `p` (computed from a range
/// that contains all of `g`).
fn qdq_with_params(cfg: &QuantizeConfig, p: &GroupParams, g: &mut [f32]) {
    if p.scale == 0.0 {
        g.fill(0.0);
        return;
    }
    // Both branches compute `(code - zero) * scale` literally: symmetric codes are stored
    // offset by 2^(b-1) (see [`rtn_codes`]), so a zero code gives +0.0, never -0.0, and
    // [`AffineCodes::dequantize_into`] reproduces this bit for bit.
    if cfg.symmetric {
        let (lo, hi, scale) = (p.lo, p.hi, p.scale);
        let offset = -p.lo;
        for x in g.iter_mut() {
            *x = (round_half_away((*x / scale).clamp(lo, hi)) + offset - offset) * scale;
        }
    } else {
        let (lo, hi, zero, scale) = (p.lo - p.zero, p.hi - p.zero, p.zero, p.scale);
        for x in g.iter_mut() {
            *x = (round_half_away((*x / scale).clamp(lo, hi)) + zero - zero) * scale;
        }
    }
}

fn qdq_group(cfg: &QuantizeConfig, g: &mut [f32]) {
    let p = group_params(cfg, g);
    qdq_with_params(cfg, &p, g);
}

/// Elements per group for rows of `row_len` (at least 1, at most `row_len`); for
/// [`Granularity::Tensor`] see [`layout`] (here it is only used by [`bits_per_weight`]).
fn group_len(cfg: &QuantizeConfig, row_len: usize) -> usize {
    match cfg.granularity {
        Granularity::Channel | Granularity::Tensor => row_len.max(1),
        Granularity::Group(g) => g.clamp(1, row_len.max(1)),
    }
}

/// Quantizes then dequantizes `rows` (a flat row-major matrix) in place, in parallel over
/// rows. A trailing partial row (if `rows.len()` is not a multiple of `row_len`) is treated
/// as a shorter row. `row_len == 0` does nothing. With [`Granularity::Tensor`] the whole
/// slice is one group (one scale), whatever `row_len` is.
pub fn quantize_dequantize_rows(cfg: &QuantizeConfig, rows: &mut [f32], row_len: usize) {
    if row_len == 0 {
        return;
    }
    if cfg.granularity == Granularity::Tensor {
        let (lo, hi) = min_max_par(rows);
        let p = params_from_range(cfg, lo, hi);
        rows.par_chunks_mut(MIN_PAR_ELEMS)
            .for_each(|chunk| qdq_with_params(cfg, &p, chunk));
        return;
    }
    let group = group_len(cfg, row_len);
    let min_rows = (MIN_PAR_ELEMS / row_len).max(1);
    rows.par_chunks_mut(row_len)
        .with_min_len(min_rows)
        .for_each(|row| row.chunks_mut(group).for_each(|g| qdq_group(cfg, g)));
}

/// Why a quantizer rejected its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuantizeError {
    #[error("row length must be at least 1")]
    ZeroRowLen,
    #[error("{len} values do not split into whole rows of {row_len}")]
    RaggedRows { len: usize, row_len: usize },
    #[error("{0} bits is outside the supported range 2..=8")]
    Bits(u8),
    #[error("a range fixed for the whole tensor needs per-tensor granularity")]
    NotTensorGranularity,
    #[error("a codebook of {len} levels for {bits}-bit codes (needs 2^{bits})")]
    CodebookLength { len: usize, bits: u8 },
    #[error("the calibrated codes ({solved_bits}-bit, rows of {solved_row_len}) do not fit a {bits}-bit pass over rows of {row_len}")]
    SolvedLayout {
        solved_bits: u8,
        solved_row_len: usize,
        bits: u8,
        row_len: usize,
    },
    #[error("rows {first_row}..{end} are beyond the {solved_rows} rows of the calibrated codes")]
    SolvedRows {
        first_row: usize,
        end: usize,
        solved_rows: usize,
    },
}

/// Checks `bits` is in `2..=8`.
pub(crate) fn check_bits(bits: u8) -> Result<(), QuantizeError> {
    if (2..=8).contains(&bits) {
        Ok(())
    } else {
        Err(QuantizeError::Bits(bits))
    }
}

/// Checks `len` values form whole rows of `row_len >= 1` (an empty slice always does).
pub(crate) fn check_rows(len: usize, row_len: usize) -> Result<(), QuantizeError> {
    if row_len == 0 {
        Err(QuantizeError::ZeroRowLen)
    } else if len % row_len != 0 {
        Err(QuantizeError::RaggedRows { len, row_len })
    } else {
        Ok(())
    }
}

/// `(row_len, group_len)` of the codes for `len` values in rows of `row_len` (already
/// checked): the whole slice is one row and one group for [`Granularity::Tensor`], a row is
/// one group for [`Granularity::Channel`], and `Group(g)` is clamped to `1..=row_len`.
pub(crate) fn layout(granularity: Granularity, len: usize, row_len: usize) -> (usize, usize) {
    match granularity {
        Granularity::Tensor => (len, len),
        Granularity::Channel => (row_len, row_len),
        Granularity::Group(g) => (row_len, g.clamp(1, row_len.max(1))),
    }
}

/// Elements per rayon task when splitting rows into pieces.
const PIECE: usize = 1 << 14;

/// Runs `f(start, group_index, piece)` in parallel over contiguous pieces of `out`, each lying
/// inside one group: `out` is rows of `row_len` (the last may be shorter), each split into
/// groups of `group_len` (the last of a row may be shorter), groups numbered row-major, and
/// `start` is the piece's offset in `out`. Short rows are batched per task and a long group
/// is cut into several pieces, so both many small rows and one huge group run in parallel.
/// Pieces are disjoint, so the result cannot depend on the thread count.
pub(crate) fn par_group_pieces<T, F>(out: &mut [T], row_len: usize, group_len: usize, f: F)
where
    T: Send,
    F: Fn(usize, usize, &mut [T]) + Sync,
{
    if out.is_empty() || row_len == 0 {
        return;
    }
    let group_len = group_len.clamp(1, row_len);
    let groups_per_row = row_len.div_ceil(group_len);
    let f = &f;
    out.par_chunks_mut(row_len)
        .enumerate()
        .with_min_len((PIECE / row_len).max(1))
        .for_each(|(r, row)| {
            let row_start = r * row_len;
            let first_group = r * groups_per_row;
            if row.len() <= PIECE {
                for (gi, g) in row.chunks_mut(group_len).enumerate() {
                    f(row_start + gi * group_len, first_group + gi, g);
                }
                return;
            }
            row.par_chunks_mut(PIECE)
                .enumerate()
                .for_each(|(pi, mut rest): (usize, &mut [T])| {
                    let mut off = pi * PIECE;
                    while !rest.is_empty() {
                        let gi = off / group_len;
                        let take = ((gi + 1) * group_len - off).min(rest.len());
                        let (head, tail) = std::mem::take(&mut rest).split_at_mut(take);
                        f(row_start + off, first_group + gi, head);
                        off += take;
                        rest = tail;
                    }
                });
        });
}

/// Unsigned integer codes with one (scale, zero) per group; dequantize as
/// `(code - zero) * scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct AffineCodes {
    /// Bits per code (2..=8).
    pub bits: u8,
    /// Elements per row (for [`Granularity::Tensor`]: the whole slice's length).
    pub row_len: usize,
    /// Elements per group within a row (the last group of a row may be shorter).
    pub group_len: usize,
    /// One code per element, in `[0, 2^bits)`.
    pub codes: Vec<u8>,
    /// One per group, row-major (row 0's groups, then row 1's, ...).
    pub scales: Vec<f32>,
    /// One per group (a real number, not necessarily an integer, for HQQ).
    pub zeros: Vec<f32>,
}

impl AffineCodes {
    /// Groups in each row (`ceil(row_len / group_len)`, 0 for an empty layout).
    pub fn groups_per_row(&self) -> usize {
        if self.group_len == 0 {
            0
        } else {
            self.row_len.div_ceil(self.group_len)
        }
    }

    /// Writes `(code - zero) * scale` for every element, in parallel over rows (and over
    /// pieces of long rows). `out` should have `codes.len()` elements; only the common prefix
    /// is written otherwise. A group whose scale or zero is missing dequantizes to 0.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        let n = out.len().min(self.codes.len());
        let codes = &self.codes[..n];
        par_group_pieces(
            &mut out[..n],
            self.row_len,
            self.group_len,
            |start, g, piece| {
                let (scale, zero) = match (self.scales.get(g), self.zeros.get(g)) {
                    (Some(&s), Some(&z)) => (s, z),
                    _ => (0.0, 0.0),
                };
                let codes = &codes[start..start + piece.len()];
                for (o, &c) in piece.iter_mut().zip(codes) {
                    *o = (f32::from(c) - zero) * scale;
                }
            },
        );
    }
}

/// The stored-code computation of one group, in the form the hot loops use.
///
/// The stored code of `x` is `round(clamp(x / scale, lo, hi)) + zero`, where `[lo, hi]` is
/// the code range shifted by the stored zero point (so the stored code lies in `[0, 2^b)`)
/// and `zero` is the stored zero point (`2^(b-1)` symmetric). This is [`code_of`] plus the
/// symmetric offset, with one difference that only affects NaN: the clamp is written as
/// `if y > lo { y } else { lo }` (one `maxps`), which sends NaN to `lo`, i.e. to stored code
/// 0, exactly the code the saturating `NaN as u8` cast gives. Everything is plain f32
/// arithmetic, so the loops over a group vectorize on baseline x86-64.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CodeKernel {
    /// The group's scale (0 for an all-zero group, whose codes are all `zero`).
    scale: f32,
    /// Bounds of `x / scale`, integer-valued.
    lo: f32,
    hi: f32,
    /// The stored zero point (an integer in `[0, 2^b)`).
    pub(crate) zero: f32,
    /// `1 / scale` when that is a normal f32 (so [`Self::code_fast`] may be used), else 0.
    inv: f32,
    /// `1.5 * 2^23 + zero`: adding it to a quotient in `[-2^22, 2^22]` rounds it to an
    /// integer and adds the zero point, exactly.
    magic_zero: f32,
}

/// `1.5 * 2^23`: `y + ROUND_MAGIC_SIGNED` lies in `[2^23, 2^24)` (where f32 spacing is 1)
/// for any `|y| <= 2^22`, so it rounds `y` to the nearest integer, ties to even.
const ROUND_MAGIC_SIGNED: f32 = 12_582_912.0;

/// How close (in code units) a quotient multiplied out by [`CodeKernel::code_fast`] may come
/// to a rounding boundary before the division has to decide: `2^-12`, well above the at most
/// `3 * 2^-24 * 257 < 2^-14` the product can differ from the quotient where it matters.
const NEAR_TIE: f32 = 0.5 - 1.0 / 4096.0;

impl CodeKernel {
    #[inline]
    pub(crate) fn new(cfg: &QuantizeConfig, p: &GroupParams) -> Self {
        let offset = if cfg.symmetric { -p.lo } else { 0.0 };
        let inv = 1.0 / p.scale;
        CodeKernel {
            scale: p.scale,
            lo: p.lo - p.zero,
            hi: p.hi - p.zero,
            zero: p.zero + offset,
            inv: if inv.is_normal() { inv } else { 0.0 },
            magic_zero: ROUND_MAGIC_SIGNED + (p.zero + offset),
        }
    }

    /// [`Self::code`] computed faster, and whether it may differ from it: when the flag is
    /// false, `byte` is [`Self::byte`] of [`Self::code`] and `r * scale` is
    /// [`Self::dequantize`] of it (`r = code - zero`), bit for bit. Needs `inv != 0`.
    ///
    /// Two shortcuts, both only wrong where the flag is raised:
    /// - `x * (1 / scale)` for `x / scale`: with `inv` normal, `fl(x * fl(1/s))` and
    ///   `fl(x / s)` are both within `2^-24` relative of `x / s` (plus one more rounding),
    ///   so they differ by less than `3 * 2^-24 * |x / s|`. Past `|x / s| > 257` both clamp
    ///   to the same integer bound (all bounds lie in `[-256, 255]`); below it they differ
    ///   by less than `2^-14` code units. So unless the clamped product lies within `2^-12`
    ///   of a half-integer (a rounding boundary: flagged), both round to the same integer.
    /// - rounding ties to even (one add of [`ROUND_MAGIC_SIGNED`] plus the zero point)
    ///   instead of away from zero: the two differ only on exact ties, which are flagged.
    ///
    /// NaN, infinities and signed zeros: `x * inv` and `x / s` agree on them (NaN clamps to
    /// `lo`), and `r` is `+0.0` whenever it is zero, as `code - zero` is.
    #[inline(always)]
    fn code_fast(&self, x: f32) -> (u8, f32, bool) {
        let y = x * self.inv;
        let y = if y > self.lo { y } else { self.lo };
        let y = if y < self.hi { y } else { self.hi };
        // t = rne(y) + zero + 1.5 * 2^23, exactly; its low mantissa bits hold the code
        // (2^22 is a multiple of 256).
        let t = y + self.magic_zero;
        let r = t - self.magic_zero;
        ((t.to_bits() & 0xFF) as u8, r, (y - r).abs() >= NEAR_TIE)
    }

    /// The stored code of `x` as an integer-valued f32 in `[0, 2^b)` (0 for NaN).
    #[inline(always)]
    fn code(&self, x: f32) -> f32 {
        let y = x / self.scale;
        let y = if y > self.lo { y } else { self.lo };
        let y = if y < self.hi { y } else { self.hi };
        round_half_away(y) + self.zero
    }

    /// `code` (from [`Self::code`]) as a byte: exact because `code` is an integer in
    /// `[0, 256)`, so `code + 2^23` holds it in its low mantissa bits (no saturating cast).
    #[inline(always)]
    fn byte(code: f32) -> u8 {
        (code + ROUND_MAGIC).to_bits() as u8
    }

    /// `(code - zero) * scale`, exactly as [`AffineCodes::dequantize_into`] computes it.
    #[inline(always)]
    fn dequantize(&self, code: f32) -> f32 {
        (code - self.zero) * self.scale
    }

    /// The stored code of `x` and its dequantized value, exactly as [`rtn_codes`] and
    /// [`AffineCodes::dequantize_into`] give them for a group with these parameters (an
    /// all-zero group, scale 0, gives code `zero` and `+0.0`). For methods that quantize one
    /// element at a time with RTN's group parameters (`crate::calibrated`).
    #[inline(always)]
    pub(crate) fn code_and_value(&self, x: f32) -> (u8, f32) {
        if self.scale == 0.0 {
            return (self.zero as u8, 0.0);
        }
        let code = self.code(x);
        (Self::byte(code), self.dequantize(code))
    }
}

/// Writes the RTN codes of `g` under `p` into `codes` (stored unsigned: symmetric codes are
/// offset by `2^(b-1)`), returning the stored zero point.
fn rtn_group_codes(cfg: &QuantizeConfig, p: &GroupParams, g: &[f32], codes: &mut [u8]) -> f32 {
    let k = CodeKernel::new(cfg, p);
    if p.scale == 0.0 {
        codes.fill(k.zero as u8);
        return k.zero;
    }
    for (c, &x) in codes.iter_mut().zip(g) {
        *c = CodeKernel::byte(k.code(x));
    }
    k.zero
}

/// [`rtn_group_codes`], also overwriting `g` with the dequantized codes (what
/// [`AffineCodes::dequantize_into`] writes for this group), in the same pass.
fn rtn_group_codes_dequantize(
    cfg: &QuantizeConfig,
    p: &GroupParams,
    g: &mut [f32],
    codes: &mut [u8],
) -> f32 {
    let k = CodeKernel::new(cfg, p);
    if p.scale == 0.0 {
        codes.fill(k.zero as u8);
        // (zero - zero) * 0.0 = +0.0
        g.fill(0.0);
        return k.zero;
    }
    for (c, x) in codes.iter_mut().zip(g.iter_mut()) {
        let code = k.code(*x);
        *c = CodeKernel::byte(code);
        *x = k.dequantize(code);
    }
    k.zero
}

/// Elements per piece of a group in [`rtn_group_codes_dequantize_to`]'s fast path: a piece
/// with a quotient near a rounding boundary is redone with the division.
const FAST_PIECE: usize = 64;

/// [`rtn_group_codes_dequantize`] reading `g` and writing the dequantized codes to `out`
/// instead of over `g` (for the fused encode, which still needs the original values). Same
/// codes and values bit for bit, computed with [`CodeKernel::code_fast`] where it is exact.
#[inline(always)]
pub(crate) fn rtn_group_codes_dequantize_to(
    k: &CodeKernel,
    g: &[f32],
    codes: &mut [u8],
    out: &mut [f32],
) {
    if k.scale == 0.0 {
        codes.fill(k.zero as u8);
        out.fill(0.0);
        return;
    }
    let pieces = g
        .chunks(FAST_PIECE)
        .zip(codes.chunks_mut(FAST_PIECE))
        .zip(out.chunks_mut(FAST_PIECE));
    for ((g, codes), out) in pieces {
        if k.inv != 0.0 {
            // Multiply instead of divide (a vector divide costs several multiplies), and
            // redo the piece with the division below if any quotient came near a rounding
            // boundary (about one piece in 32), so the codes are the same.
            let mut near = false;
            for ((c, o), &x) in codes.iter_mut().zip(out.iter_mut()).zip(g) {
                let (byte, r, n) = k.code_fast(x);
                near |= n;
                *c = byte;
                *o = r * k.scale;
            }
            if !near {
                continue;
            }
        }
        for ((c, o), &x) in codes.iter_mut().zip(out.iter_mut()).zip(g) {
            let code = k.code(x);
            *c = CodeKernel::byte(code);
            *o = k.dequantize(code);
        }
    }
}

/// Largest `|x|` over the finite values of `x` (0 when there are none), in parallel for a
/// long slice (max is exact, so the split cannot change the result).
pub(crate) fn finite_absmax(x: &[f32]) -> f32 {
    let part = |x: &[f32]| {
        let mut m = [0f32; 8];
        let chunks = x.chunks_exact(8);
        let rem = chunks.remainder();
        for c in chunks {
            for l in 0..8 {
                let a = c[l].abs();
                m[l] = if a > m[l] && a < f32::INFINITY {
                    a
                } else {
                    m[l]
                };
            }
        }
        for &v in rem {
            let a = v.abs();
            m[0] = if a > m[0] && a < f32::INFINITY {
                a
            } else {
                m[0]
            };
        }
        m.iter().fold(0f32, |a, &b| a.max(b))
    };
    if x.len() <= MIN_PAR_ELEMS {
        part(x)
    } else {
        x.par_chunks(MIN_PAR_ELEMS)
            .map(part)
            .reduce(|| 0.0, f32::max)
    }
}

/// Asymmetric RTN of a group whose range is `[lo, hi]` (`lo <= 0 <= hi`, NaN-free): the
/// parameters and code formula of [`quantize_dequantize_rows`], for callers that score
/// RTN before deciding what to store.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RtnAsym {
    params: GroupParams,
    /// Stored scale (0 for an all-zero group).
    pub scale: f32,
    /// Stored (integer) zero point.
    pub zero: f32,
}

impl RtnAsym {
    /// Asymmetric RTN of the range `[lo, hi]`, its scale on `grid`.
    pub(crate) fn new(bits: u8, grid: crate::recipe::ScaleDtype, lo: f32, hi: f32) -> Self {
        let cfg = QuantizeConfig {
            bits,
            symmetric: false,
            granularity: Granularity::Channel,
            scale_dtype: grid,
        };
        let params = params_from_range(&cfg, lo, hi);
        RtnAsym {
            params,
            scale: params.scale,
            zero: params.zero,
        }
    }

    /// The code of `x`, as an integer-valued f32 in `[0, 2^b)`.
    #[inline(always)]
    pub(crate) fn code(&self, x: f32) -> f32 {
        if self.scale == 0.0 {
            self.zero
        } else {
            code_of(&self.params, x)
        }
    }

    /// `(code - zero) * scale`.
    #[inline(always)]
    pub(crate) fn dequantize(&self, code: f32) -> f32 {
        (code - self.zero) * self.scale
    }
}

/// Asymmetric min-max RTN of one group of any size (a long group runs in parallel): writes
/// the codes into `codes` and returns `(scale, zero)`, exactly as [`rtn_codes`] would with
/// scales on `grid`.
pub(crate) fn rtn_asym_group_codes(
    bits: u8,
    grid: crate::recipe::ScaleDtype,
    g: &[f32],
    codes: &mut [u8],
) -> (f32, f32) {
    let cfg = QuantizeConfig {
        bits,
        symmetric: false,
        granularity: Granularity::Channel,
        scale_dtype: grid,
    };
    if g.len() <= MIN_PAR_ELEMS {
        let p = group_params(&cfg, g);
        let zero = rtn_group_codes(&cfg, &p, g, codes);
        return (p.scale, zero);
    }
    let (lo, hi) = min_max_par(g);
    let p = params_from_range(&cfg, lo, hi);
    g.par_chunks(MIN_PAR_ELEMS)
        .zip(codes.par_chunks_mut(MIN_PAR_ELEMS))
        .for_each(|(g, c)| {
            rtn_group_codes(&cfg, &p, g, c);
        });
    (p.scale, p.zero)
}

/// Round-to-nearest codes of `values` (rows of `row_len`) under `cfg`, laid out as
/// [`AffineCodes`]. [`AffineCodes::dequantize_into`] reproduces [`quantize_dequantize_rows`]
/// bit for bit on finite input (symmetric codes are stored offset by `2^(b-1)` with zero
/// `2^(b-1)`; NaN elements get code 0 instead of dequantizing to NaN).
///
/// Errors: `row_len == 0`, `values.len()` not a multiple of `row_len`, bits outside 2..=8.
pub fn rtn_codes(
    cfg: &QuantizeConfig,
    values: &[f32],
    row_len: usize,
) -> Result<AffineCodes, QuantizeError> {
    let mut out = empty_codes(cfg, values.len(), row_len)?;
    if values.is_empty() {
        return Ok(out);
    }
    let (row_len, group_len, groups_per_row) = (out.row_len, out.group_len, out.groups_per_row());
    if cfg.granularity == Granularity::Tensor {
        let (lo, hi) = min_max_par(values);
        let p = params_from_range(cfg, lo, hi);
        values
            .par_chunks(MIN_PAR_ELEMS)
            .zip(out.codes.par_chunks_mut(MIN_PAR_ELEMS))
            .for_each(|(g, c)| {
                rtn_group_codes(cfg, &p, g, c);
            });
        out.scales[0] = p.scale;
        out.zeros[0] = CodeKernel::new(cfg, &p).zero;
        return Ok(out);
    }
    let min_rows = (MIN_PAR_ELEMS / row_len).max(1);
    values
        .par_chunks(row_len)
        .zip(out.codes.par_chunks_mut(row_len))
        .zip(out.scales.par_chunks_mut(groups_per_row))
        .zip(out.zeros.par_chunks_mut(groups_per_row))
        .with_min_len(min_rows)
        .for_each(|(((row, codes), scales), zeros)| {
            let groups = row.chunks(group_len).zip(codes.chunks_mut(group_len));
            for (i, (g, c)) in groups.enumerate() {
                let p = group_params(cfg, g);
                scales[i] = p.scale;
                zeros[i] = rtn_group_codes(cfg, &p, g, c);
            }
        });
    Ok(out)
}

/// [`rtn_codes`] and [`AffineCodes::dequantize_into`] fused: returns the codes of `values`
/// and overwrites `values` with their dequantized values, bit for bit what
/// `rtn_codes(cfg, values, row_len)?.dequantize_into(values)` would leave there, but in one
/// pass over the data while each group is in cache.
///
/// Errors: as [`rtn_codes`] (then `values` is unchanged).
pub fn rtn_codes_dequantize(
    cfg: &QuantizeConfig,
    values: &mut [f32],
    row_len: usize,
) -> Result<AffineCodes, QuantizeError> {
    let mut out = empty_codes(cfg, values.len(), row_len)?;
    if values.is_empty() {
        return Ok(out);
    }
    let (row_len, group_len, groups_per_row) = (out.row_len, out.group_len, out.groups_per_row());
    if cfg.granularity == Granularity::Tensor {
        let range = min_max_par(values);
        tensor_codes_dequantize(cfg, values, range, &mut out);
        return Ok(out);
    }
    let min_rows = (MIN_PAR_ELEMS / row_len).max(1);
    values
        .par_chunks_mut(row_len)
        .zip(out.codes.par_chunks_mut(row_len))
        .zip(out.scales.par_chunks_mut(groups_per_row))
        .zip(out.zeros.par_chunks_mut(groups_per_row))
        .with_min_len(min_rows)
        .for_each(|(((row, codes), scales), zeros)| {
            let groups = row.chunks_mut(group_len).zip(codes.chunks_mut(group_len));
            for (i, (g, c)) in groups.enumerate() {
                let p = group_params(cfg, g);
                scales[i] = p.scale;
                zeros[i] = rtn_group_codes_dequantize(cfg, &p, g, c);
            }
        });
    Ok(out)
}

/// [`rtn_codes_dequantize`] under [`Granularity::Tensor`] with the whole tensor's range
/// fixed in advance: `range` is what [`min_max`] gives over every value of the tensor (NaN
/// ignored, always containing 0), gathered chunk by chunk in a first pass. Applied to each
/// chunk of rows, the codes and dequantized values are bit for bit those of the whole tensor
/// quantized at once (every element sees the same scale and zero point); each chunk's
/// codes carry that one scale.
///
/// Errors: as [`rtn_codes`], and [`QuantizeError::NotTensorGranularity`] for a config with
/// another granularity (whose statistics are local to a group).
pub fn rtn_codes_dequantize_in_range(
    cfg: &QuantizeConfig,
    values: &mut [f32],
    row_len: usize,
    range: (f32, f32),
) -> Result<AffineCodes, QuantizeError> {
    if cfg.granularity != Granularity::Tensor {
        return Err(QuantizeError::NotTensorGranularity);
    }
    let mut out = empty_codes(cfg, values.len(), row_len)?;
    if !values.is_empty() {
        tensor_codes_dequantize(cfg, values, range, &mut out);
    }
    Ok(out)
}

/// The [`Granularity::Tensor`] body of [`rtn_codes_dequantize`] for the range `(lo, hi)`.
fn tensor_codes_dequantize(
    cfg: &QuantizeConfig,
    values: &mut [f32],
    (lo, hi): (f32, f32),
    out: &mut AffineCodes,
) {
    let p = params_from_range(cfg, lo, hi);
    values
        .par_chunks_mut(MIN_PAR_ELEMS)
        .zip(out.codes.par_chunks_mut(MIN_PAR_ELEMS))
        .for_each(|(g, c)| {
            rtn_group_codes_dequantize(cfg, &p, g, c);
        });
    out.scales[0] = p.scale;
    out.zeros[0] = CodeKernel::new(cfg, &p).zero;
}

/// Checks the arguments of [`rtn_codes`] and allocates its (zeroed) output for `len` values.
fn empty_codes(
    cfg: &QuantizeConfig,
    len: usize,
    row_len: usize,
) -> Result<AffineCodes, QuantizeError> {
    check_bits(cfg.bits)?;
    check_rows(len, row_len)?;
    let (row_len, group_len) = layout(cfg.granularity, len, row_len);
    let mut out = AffineCodes {
        bits: cfg.bits,
        row_len,
        group_len,
        codes: vec![0; len],
        scales: Vec::new(),
        zeros: Vec::new(),
    };
    if len > 0 {
        let groups = len / row_len * out.groups_per_row();
        out.scales = vec![0.0; groups];
        out.zeros = vec![0.0; groups];
    }
    Ok(out)
}

/// Quantizes one group, returning `(scale, zero, codes)`. Symmetric codes lie in
/// `[-2^(b-1), 2^(b-1)-1]` with zero 0; asymmetric codes and zero lie in `[0, 2^b-1]`.
/// Dequantize as `(code - zero) * scale`.
pub fn quantize_group_codes(cfg: &QuantizeConfig, group: &[f32]) -> (f32, i32, Vec<i32>) {
    let p = group_params(cfg, group);
    if p.scale == 0.0 {
        let zero = p.zero as i32;
        return (0.0, zero, vec![zero; group.len()]);
    }
    let codes = group.iter().map(|&x| code_of(&p, x) as i32).collect();
    (p.scale, p.zero as i32, codes)
}

/// Average stored bits per weight for rows of `row_len`: the code bits plus, per group, a
/// 16-bit scale (and a `bits`-bit zero point when asymmetric), with `ceil(row_len/group)`
/// groups per row. [`Granularity::Tensor`] counts just the code bits.
pub fn bits_per_weight(cfg: &QuantizeConfig, row_len: usize) -> f64 {
    let bits = f64::from(cfg.bits);
    if row_len == 0 {
        return bits;
    }
    if cfg.granularity == Granularity::Tensor {
        // One scale for the whole tensor: its cost per weight is negligible (and the tensor
        // size is not known here).
        return bits;
    }
    let per_group = 16.0 + if cfg.symmetric { 0.0 } else { bits };
    let groups = row_len.div_ceil(group_len(cfg, row_len));
    bits + per_group * groups as f64 / row_len as f64
}

/// Row length of a tensor of `shape`: the product of all dims after the first, or the whole
/// tensor for 1-D (and 1 for a scalar). Saturates at `u64::MAX`.
pub fn row_len_of(shape: &[u64]) -> u64 {
    match shape {
        [] => 1,
        [n] => *n,
        [_, rest @ ..] => rest.iter().fold(1u64, |a, d| a.saturating_mul(*d)),
    }
}

#[cfg(test)]
pub(crate) mod tests;

/// Tests of the fused encode's shortcuts against the definitions they replace.
#[cfg(test)]
mod fast_path_tests {
    use super::*;

    #[test]
    fn f16_round_up_matches_the_half_round_trip() {
        // A stride through every bit pattern (both signs, NaN, infinities, subnormals), plus
        // the f16 grid's edges: every f16 value and its f32 neighbours.
        let strided = (0..=u32::MAX).step_by(4099).map(f32::from_bits);
        let edges = (0..=u16::MAX).flat_map(|h| {
            let v = f16::from_bits(h).to_f32();
            [
                v,
                f32::from_bits(v.to_bits().wrapping_add(1)),
                f32::from_bits(v.to_bits().wrapping_sub(1)),
            ]
        });
        let specials = [
            0.0,
            -0.0,
            65504.0,
            65504.5,
            65520.0,
            1e-45,
            5.96e-8,
            6.1035156e-5,
        ];
        for x in strided.chain(edges).chain(specials) {
            let (got, want) = (f16_round_up(x), f16_round_up_half(x));
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{x:e} ({:#010x}): {got:e} vs {want:e}",
                x.to_bits()
            );
        }
    }

    /// xorshift64* uniforms in [0, 1).
    fn uniforms(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn fast_codes_match_the_division_unless_flagged() {
        let mut u = uniforms(42);
        let mut flagged = 0usize;
        let mut total = 0usize;
        for case in 0..4000 {
            let bits = 2 + (case % 7) as u8;
            let symmetric = case % 2 == 0;
            let cfg = QuantizeConfig {
                bits,
                symmetric,
                granularity: Granularity::Channel,
                scale_dtype: crate::recipe::ScaleDtype::F16,
            };
            // Scales across the whole f16 range and beyond (the f32 fallback).
            let mag = 10f64.powf(u() * 16.0 - 9.0) as f32;
            let (lo, hi) = if symmetric {
                (-mag, mag)
            } else {
                (-(mag * u() as f32), mag * u() as f32)
            };
            let p = params_from_range(&cfg, lo, hi);
            let k = CodeKernel::new(&cfg, &p);
            if k.inv == 0.0 {
                continue;
            }
            for i in 0..64 {
                // Random values, exact ties (k + 1/2) * s, and their neighbours.
                let x = match i % 4 {
                    0 => (lo + (hi - lo) * u() as f32) * 1.1,
                    _ => {
                        let half = ((u() * 2f64.powi(i32::from(bits))
                            - 2f64.powi(i32::from(bits) - 1))
                        .floor()
                            + 0.5) as f32;
                        let t = half * p.scale;
                        f32::from_bits(t.to_bits().wrapping_add(i % 4).wrapping_sub(2))
                    }
                };
                for x in [x, -x] {
                    total += 1;
                    let (byte, r, near) = k.code_fast(x);
                    if near {
                        flagged += 1;
                        continue;
                    }
                    let code = k.code(x);
                    assert_eq!(
                        byte,
                        CodeKernel::byte(code),
                        "{cfg:?} s={} x={x:e}",
                        p.scale
                    );
                    let want = k.dequantize(code);
                    assert_eq!((r * k.scale).to_bits(), want.to_bits(), "{cfg:?} x={x:e}");
                }
            }
        }
        // Ties and their neighbours are flagged; most random values are not.
        assert!(
            flagged > total / 4 && flagged < total * 4 / 5,
            "{flagged} of {total}"
        );
    }

    #[test]
    fn specials_take_the_same_codes() {
        let cfg = QuantizeConfig {
            bits: 4,
            symmetric: false,
            granularity: Granularity::Channel,
            scale_dtype: crate::recipe::ScaleDtype::F16,
        };
        let p = params_from_range(&cfg, -0.3, 1.7);
        let k = CodeKernel::new(&cfg, &p);
        for x in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1e-45,
            -1e-45,
            f32::MAX,
        ] {
            let (byte, r, near) = k.code_fast(x);
            assert!(!near, "{x}");
            let code = k.code(x);
            assert_eq!(byte, CodeKernel::byte(code), "{x}");
            assert_eq!((r * k.scale).to_bits(), k.dequantize(code).to_bits(), "{x}");
        }
    }
}
