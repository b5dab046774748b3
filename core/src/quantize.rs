//! Round-to-nearest ("RTN") quantization, applied as quantize-then-dequantize in place.
//!
//! A tensor is viewed as a row-major matrix of rows of `row_len` weights; each row is split
//! into groups of `group_size` (the last may be shorter), or is one group for per-channel
//! granularity. Each group gets one scale, stored as f16 rounded *up* so no value clips:
//!
//! - symmetric: `qmax = 2^(b-1)-1`, `s = f16_up(absmax/qmax)`, `q = clamp(round(x/s), -qmax-1, qmax)`,
//!   dequantized as `q*s`;
//! - asymmetric: the range `[min(min,0), max(max,0)]`, `qmax = 2^b-1`, `s = f16_up((max-min)/qmax)`,
//!   `zero = clamp(round(-min/s), 0, qmax)`, `q = clamp(round(x/s)+zero, 0, qmax)`, dequantized
//!   as `(q-zero)*s`.
//!
//! Every element then satisfies `|x - dequant| <= s/2` up to f32 rounding of `x/s` and `q*s`.
//! A group whose values are all zero gets scale 0 and dequantizes to zeros. If `f16_up` would
//! overflow f16 (huge weights), the exact f32 scale is used instead so the bound still holds
//! (f32 inputs within a few ulps of `f32::MAX` may still dequantize to infinity).
//!
//! Bit-exactness: the result must match an independent implementation, so the hot loop divides
//! (`x / s`, never `x * (1/s)`) and rounds half away from zero exactly like `f32::round`. The
//! rounding is written with a magic-number add (`round_half_away`) so it vectorizes on
//! baseline x86-64; it equals `f32::round` on the clamped code range (values are clamped
//! first, which commutes with rounding because the bounds are integers). A group containing
//! NaN dequantizes that element to NaN. Rows are independent, so the rayon split over rows
//! cannot change results.

use crate::recipe::{Granularity, QuantizeConfig};
use half::f16;
use rayon::prelude::*;

/// Minimum elements handed to one rayon task, so short rows are batched.
const MIN_PAR_ELEMS: usize = 1 << 14;

/// Scale and code range of one group.
#[derive(Debug, Clone, Copy, PartialEq)]
struct GroupParams {
    /// Stored scale (an f16 value unless that would overflow); 0 for an all-zero group.
    scale: f32,
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
fn round_half_away(y: f32) -> f32 {
    let a = y.abs();
    let r = (a + ROUND_MAGIC) - ROUND_MAGIC;
    let r = if a - r == 0.5 { r + 1.0 } else { r };
    r.copysign(y)
}

/// The smallest f16 value `>= scale` (for positive finite `scale`), or `scale` itself when
/// that would be infinite.
fn f16_round_up(scale: f32) -> f32 {
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

/// Turns a raw positive scale into the stored one (never 0 when the group is non-zero).
fn stored_scale(raw: f32) -> f32 {
    let s = f16_round_up(raw);
    if s > 0.0 {
        s
    } else {
        // raw underflowed to 0 for a subnormal-only group; the smallest f16 still covers it.
        f16::from_bits(1).to_f32()
    }
}

/// Min and max of `g`, ignoring NaN; (0, 0) for an empty group.
fn min_max(g: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = (0f32, 0f32);
    for &x in g {
        if x < lo {
            lo = x;
        }
        if x > hi {
            hi = x;
        }
    }
    (lo, hi)
}

/// The scale, zero point and code range for one group.
fn group_params(cfg: &QuantizeConfig, g: &[f32]) -> GroupParams {
    let bits = u32::from(cfg.bits.clamp(2, 8));
    // min_max starts at 0, so the range always contains 0 (as asymmetric requires).
    let (lo, hi) = min_max(g);
    if cfg.symmetric {
        let qmax = ((1u32 << (bits - 1)) - 1) as f32;
        let absmax = hi.max(-lo);
        let scale = if absmax > 0.0 {
            stored_scale(absmax / qmax)
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
            let scale = stored_scale(raw);
            let zero = (-lo / scale).round().clamp(0.0, qmax);
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

fn qdq_group(cfg: &QuantizeConfig, g: &mut [f32]) {
    let p = group_params(cfg, g);
    if p.scale == 0.0 {
        g.fill(0.0);
        return;
    }
    // Two loops so each follows its formula literally (down to the sign of zero).
    if cfg.symmetric {
        let (lo, hi, scale) = (p.lo, p.hi, p.scale);
        for x in g.iter_mut() {
            *x = round_half_away((*x / scale).clamp(lo, hi)) * scale;
        }
    } else {
        let (lo, hi, zero, scale) = (p.lo - p.zero, p.hi - p.zero, p.zero, p.scale);
        for x in g.iter_mut() {
            *x = (round_half_away((*x / scale).clamp(lo, hi)) + zero - zero) * scale;
        }
    }
}

/// Elements per group for rows of `row_len` (at least 1, at most `row_len`).
fn group_len(cfg: &QuantizeConfig, row_len: usize) -> usize {
    match cfg.granularity {
        Granularity::Channel => row_len.max(1),
        Granularity::Group(g) => g.clamp(1, row_len.max(1)),
    }
}

/// Quantizes then dequantizes `rows` (a flat row-major matrix) in place, in parallel over
/// rows. A trailing partial row (if `rows.len()` is not a multiple of `row_len`) is treated
/// as a shorter row. `row_len == 0` does nothing.
pub fn quantize_dequantize_rows(cfg: &QuantizeConfig, rows: &mut [f32], row_len: usize) {
    if row_len == 0 {
        return;
    }
    let group = group_len(cfg, row_len);
    let min_rows = (MIN_PAR_ELEMS / row_len).max(1);
    rows.par_chunks_mut(row_len)
        .with_min_len(min_rows)
        .for_each(|row| row.chunks_mut(group).for_each(|g| qdq_group(cfg, g)));
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
/// groups per row.
pub fn bits_per_weight(cfg: &QuantizeConfig, row_len: usize) -> f64 {
    let bits = f64::from(cfg.bits);
    if row_len == 0 {
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
mod tests;
