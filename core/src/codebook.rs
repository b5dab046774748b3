//! Non-uniform codebook quantization: k-means weight sharing and NF4.
//!
//! A value is stored as a `b`-bit index into a codebook of `2^b` levels (f16 values, kept
//! sorted), optionally times a per-group scale; dequantization is `codebook[code] * scale`.
//! Encoding always picks the nearest level (ties to the lower one) by comparing with the
//! exact midpoints between adjacent levels.
//!
//! **k-means ([`kmeans_codes`], Deep Compression weight sharing, Han et al. 2016):** one
//! codebook for the whole slice minimizing `sum (x - c[code(x)])^2`, found with Lloyd's
//! algorithm. To be fast on 10^8 values it works on a histogram keyed by the top 16 bits of
//! each f32 (sign, exponent and 7 mantissa bits: exactly the BF16 value). Every bin holds its
//! count and the integer sum of the low 16 bits, so its exact mean is known and the
//! histogram is exact and order-independent (bins of BF16 inputs hold one distinct value).
//! The at most 65536 non-empty bins, in increasing order, form weighted 1-D points; with
//! prefix sums of counts and weighted values, one Lloyd iteration (a cluster is the run of
//! points between the midpoints of its centroid and its neighbours; its new centroid is
//! their weighted mean) costs `O(k log bins)`. Initialization is deterministic: the
//! quantiles `(j + 1/2) / k` of the cube root of the (binned) density, which is the
//! asymptotically optimal level density for squared error (Panter & Dite 1951), snapped to
//! distinct points; it starts Lloyd close to the optimum even on heavy tails. Lloyd never
//! increases the (binned) objective, keeps centroids sorted, leaves an empty cluster in
//! place, and stops early at a fixed point. The final levels are rounded to f16 (saturating
//! at ±65504). Codes come from a per-bin lookup table; only bins that straddle a midpoint
//! (at most `2^b - 1`) fall back to a binary search. NaN gets the level closest to zero;
//! ±inf the extreme levels. For BF16 inputs the Lloyd objective is the true squared error;
//! for general f32 inputs a bin is assigned as a whole by its mean (bins are 2^-7 relative
//! wide), while the final codes are exact nearest levels.
//!
//! **NF4 ([`nf4_codes`], QLoRA, Dettmers et al. 2023):** the 16 NormalFloat levels (the
//! quantiles of N(0, 1) normalized to [-1, 1], with an exact zero) rounded to f16, and one
//! absmax scale per group (rounded *up* to f16, so `|x / scale| <= 1`): code = nearest level
//! of `x / scale`. Hence `|x - dequant| <= scale * max_gap / 2` where `max_gap` is the
//! largest distance between adjacent levels (plus f32 rounding). A group with no non-zero
//! finite value gets scale 0; NaN encodes as the zero level, ±inf clips to ±scale.

use crate::quantize::{
    check_bits, check_rows, finite_absmax, layout, par_group_pieces, stored_scale, QuantizeError,
};
use crate::recipe::Granularity;
use half::f16;
use rayon::prelude::*;

/// Codes into a shared codebook, optionally with per-group scales.
#[derive(Debug, Clone, PartialEq)]
pub struct CodebookCodes {
    /// Bits per code.
    pub bits: u8,
    /// `2^bits` sorted levels (f16-representable).
    pub codebook: Vec<f32>,
    /// Elements per row.
    pub row_len: usize,
    /// Elements per scale group within a row; 0 means no scales (every scale is 1).
    pub group_len: usize,
    /// One per group, row-major (empty when `group_len == 0`).
    pub scales: Vec<f32>,
    /// One code per element.
    pub codes: Vec<u8>,
}

impl CodebookCodes {
    /// Writes `codebook[code] * scale` for every element, in parallel. `out` should have
    /// `codes.len()` elements; only the common prefix is written otherwise. Codes beyond the
    /// codebook and missing scales dequantize to 0.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        let n = out.len().min(self.codes.len());
        let codes = &self.codes[..n];
        let mut table = [0f32; 256];
        for (t, &c) in table.iter_mut().zip(&self.codebook) {
            *t = c;
        }
        let table = &table;
        if self.group_len == 0 {
            out[..n]
                .par_chunks_mut(PIECE)
                .zip(codes.par_chunks(PIECE))
                .for_each(|(o, c)| {
                    for (o, &c) in o.iter_mut().zip(c) {
                        *o = table[usize::from(c)];
                    }
                });
            return;
        }
        par_group_pieces(
            &mut out[..n],
            self.row_len,
            self.group_len,
            |start, g, piece| {
                let scale = self.scales.get(g).copied().unwrap_or(0.0);
                let codes = &codes[start..start + piece.len()];
                for (o, &c) in piece.iter_mut().zip(codes) {
                    *o = table[usize::from(c)] * scale;
                }
            },
        );
    }
}

/// Elements per rayon task.
const PIECE: usize = 1 << 14;
/// Number of histogram bins (one per top-16-bit key).
const BINS: usize = 1 << 16;
/// Lookup-table marker for a bin whose values do not all share one code.
const MIXED: u16 = u16::MAX;

/// Per-bin `(count, sum of the low 16 bits)`; integer sums make merging order-free.
pub(crate) type Histogram = Vec<[u64; 2]>;

/// Adds the histogram `b` into `a` (exact: integer counts and sums).
pub(crate) fn merge_histogram(a: &mut Histogram, b: &Histogram) {
    for (x, y) in a.iter_mut().zip(b) {
        x[0] += y[0];
        x[1] += y[1];
    }
}

pub(crate) fn histogram(values: &[f32]) -> Histogram {
    let add = |mut h: Histogram, chunk: &[f32]| {
        for &x in chunk {
            let bits = x.to_bits();
            let bin = &mut h[(bits >> 16) as usize];
            bin[0] += 1;
            bin[1] += u64::from(bits & 0xFFFF);
        }
        h
    };
    if values.len() <= 4 * PIECE {
        return add(vec![[0; 2]; BINS], values);
    }
    values
        .par_chunks(4 * PIECE)
        .fold(|| vec![[0u64; 2]; BINS], add)
        .reduce(
            || vec![[0u64; 2]; BINS],
            |mut a, b| {
                merge_histogram(&mut a, &b);
                a
            },
        )
}

/// True for keys whose exponent is all ones (infinities and NaNs).
fn non_finite_key(key: usize) -> bool {
    key & 0x7F80 == 0x7F80
}

/// Keys of finite bins in increasing order of value: negative keys from the most negative
/// up to -0, then +0 up to the largest positive.
fn keys_in_value_order() -> impl Iterator<Item = usize> {
    (0x8000..BINS)
        .rev()
        .chain(0..0x8000)
        .filter(|&k| !non_finite_key(k))
}

/// Exact mean of the values in bin `key` with `count` values whose low 16 bits sum to `low`.
fn bin_mean(key: usize, count: u64, low: u64) -> f64 {
    let magnitude_bits = ((key as u32) & 0x7FFF) << 16;
    let base = f64::from(f32::from_bits(magnitude_bits));
    let exponent = magnitude_bits >> 23;
    // One step of the low 16 bits: 2^(e - 150) for normals, 2^-149 for subnormals.
    let ulp = 2f64.powi(exponent.max(1) as i32 - 150);
    let magnitude = base + ulp * (low as f64 / count as f64);
    if key & 0x8000 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// Weighted 1-D points (bin means) in increasing order, with prefix sums.
struct Points {
    means: Vec<f64>,
    /// `count_prefix[i]` = total count of points `< i` (length `len + 1`).
    count_prefix: Vec<f64>,
    /// `sum_prefix[i]` = total `count * mean` of points `< i`.
    sum_prefix: Vec<f64>,
}

impl Points {
    fn new(h: &Histogram) -> Points {
        let mut p = Points {
            means: Vec::new(),
            count_prefix: vec![0.0],
            sum_prefix: vec![0.0],
        };
        let (mut c, mut s) = (0f64, 0f64);
        for key in keys_in_value_order() {
            let [count, low] = h[key];
            if count == 0 {
                continue;
            }
            let mean = bin_mean(key, count, low);
            c += count as f64;
            s += count as f64 * mean;
            p.means.push(mean);
            p.count_prefix.push(c);
            p.sum_prefix.push(s);
        }
        p
    }

    /// Initial centroids: quantiles `(j + 1/2) / k` of the cube root of the density, the
    /// asymptotically optimal level density for squared error (Panter & Dite), snapped to
    /// distinct points. Point `i` stands for a cell of width `w_i` (half the distance
    /// between its neighbours) holding `n_i` values, so its share of `integral p^(1/3)` is
    /// `(n_i / w_i)^(1/3) * w_i = n_i^(1/3) * w_i^(2/3)`. Needs more than `k` points.
    fn density_init(&self, k: usize) -> Vec<f64> {
        let n = self.means.len();
        let mut cumulative = Vec::with_capacity(n);
        let mut total = 0f64;
        for i in 0..n {
            let left = self.means[i.saturating_sub(1)];
            let right = self.means[(i + 1).min(n - 1)];
            let width = (0.5 * (right - left)).max(f64::MIN_POSITIVE);
            let count = self.count_prefix[i + 1] - self.count_prefix[i];
            total += count.cbrt() * width.powf(2.0 / 3.0);
            cumulative.push(total);
        }
        let mut idx: Vec<usize> = (0..k)
            .map(|j| {
                let target = (j as f64 + 0.5) / k as f64 * total;
                cumulative.partition_point(|&c| c <= target).min(n - 1)
            })
            .collect();
        // Make the indices strictly increasing within [0, n) (n > k here).
        for j in 1..k {
            idx[j] = idx[j].max(idx[j - 1] + 1);
        }
        for j in (0..k).rev() {
            idx[j] = idx[j].min(n - (k - j));
            if j + 1 < k {
                idx[j] = idx[j].min(idx[j + 1] - 1);
            }
        }
        idx.iter().map(|&i| self.means[i]).collect()
    }

    /// One Lloyd iteration; returns false when nothing moved.
    fn lloyd_step(&self, centroids: &mut [f64]) -> bool {
        let k = centroids.len();
        let mut moved = false;
        let mut lo = 0;
        for j in 0..k {
            let hi = if j + 1 < k {
                let boundary = 0.5 * (centroids[j] + centroids[j + 1]);
                self.means.partition_point(|&m| m <= boundary)
            } else {
                self.means.len()
            };
            let hi = hi.max(lo);
            let count = self.count_prefix[hi] - self.count_prefix[lo];
            if count > 0.0 {
                let mean = (self.sum_prefix[hi] - self.sum_prefix[lo]) / count;
                // Rounding can put the mean a hair outside the run; keep it inside.
                let mean = mean.clamp(self.means[lo], self.means[hi - 1]);
                moved |= mean != centroids[j];
                // Safe to overwrite: the next boundary only reads centroids j+1 and j+2.
                centroids[j] = mean;
            }
            lo = hi;
        }
        moved
    }
}

/// Rounds a centroid to the nearest f16, saturating at ±65504.
fn to_f16_level(c: f64) -> f32 {
    let max = f64::from(f16::MAX.to_f32());
    f16::from_f64(c.clamp(-max, max)).to_f32()
}

/// Nearest-level encoder for a sorted codebook.
struct Encoder {
    /// Exact midpoints between adjacent levels.
    mids: Vec<f64>,
    /// Code used for NaN: the level closest to zero.
    nan_code: u8,
}

impl Encoder {
    fn new(levels: &[f32]) -> Encoder {
        let mids = levels
            .windows(2)
            .map(|w| 0.5 * (f64::from(w[0]) + f64::from(w[1])))
            .collect();
        let nan_code = (0..levels.len())
            .min_by(|&a, &b| levels[a].abs().total_cmp(&levels[b].abs()))
            .unwrap_or(0) as u8;
        Encoder { mids, nan_code }
    }

    /// Nearest level of `x` (ties to the lower one).
    fn code(&self, x: f32) -> u8 {
        if x.is_nan() {
            return self.nan_code;
        }
        let x = f64::from(x);
        self.mids.partition_point(|&m| x > m) as u8
    }

    /// Per-bin codes: the code when the whole bin maps to one, else [`MIXED`].
    fn bin_table(&self) -> Vec<u16> {
        (0..BINS)
            .map(|key| {
                if non_finite_key(key) {
                    return MIXED;
                }
                let a = f32::from_bits((key as u32) << 16);
                let b = f32::from_bits(((key as u32) << 16) | 0xFFFF);
                let (ca, cb) = (self.code(a), self.code(b));
                if ca == cb {
                    u16::from(ca)
                } else {
                    MIXED
                }
            })
            .collect()
    }
}

/// Deep-Compression-style weight sharing: one k-means codebook of `2^bits` levels for the
/// whole slice (see the module docs), after at most `iterations` Lloyd iterations (0 keeps
/// the initialization). The result has `row_len = values.len()`, `group_len = 0`
/// and no scales. A slice with at most `2^bits` distinct (bin) values gets them as levels
/// (padded by repeating the last); one with no finite value gets all-zero levels.
///
/// Errors: bits outside 2..=8.
pub fn kmeans_codes(
    bits: u8,
    values: &[f32],
    iterations: usize,
) -> Result<CodebookCodes, QuantizeError> {
    let codebook = kmeans_levels(bits, &histogram(values), iterations)?;
    codes_for_levels(bits, codebook, values)
}

/// The k-means codebook of [`kmeans_codes`] from the value histogram of a whole slice
/// (which [`histogram`] and [`merge_histogram`] can build chunk by chunk: the histogram is
/// exact, so a streamed tensor gets exactly the levels of the whole one).
///
/// Errors: bits outside 2..=8.
pub(crate) fn kmeans_levels(
    bits: u8,
    hist: &Histogram,
    iterations: usize,
) -> Result<Vec<f32>, QuantizeError> {
    check_bits(bits)?;
    let k = 1usize << bits;
    let points = Points::new(hist);
    let centroids = if points.means.len() <= k {
        let mut c = points.means.clone();
        let last = c.last().copied().unwrap_or(0.0);
        c.resize(k, last);
        c
    } else {
        let mut c = points.density_init(k);
        for _ in 0..iterations {
            if !points.lloyd_step(&mut c) {
                break;
            }
        }
        c
    };
    let mut codebook: Vec<f32> = centroids.into_iter().map(to_f16_level).collect();
    codebook.sort_by(f32::total_cmp);
    Ok(codebook)
}

/// Nearest-level codes of `values` into `codebook` (`2^bits` sorted levels, as
/// [`kmeans_levels`] returns them), laid out as [`kmeans_codes`] lays them out.
///
/// Errors: bits outside 2..=8, or a codebook that is not `2^bits` levels long.
pub fn codes_for_levels(
    bits: u8,
    codebook: Vec<f32>,
    values: &[f32],
) -> Result<CodebookCodes, QuantizeError> {
    check_bits(bits)?;
    if codebook.len() != 1usize << bits {
        return Err(QuantizeError::CodebookLength {
            len: codebook.len(),
            bits,
        });
    }
    let encoder = Encoder::new(&codebook);
    let table = encoder.bin_table();
    let mut codes = vec![0u8; values.len()];
    codes
        .par_chunks_mut(PIECE)
        .zip(values.par_chunks(PIECE))
        .for_each(|(cs, xs)| {
            for (c, &x) in cs.iter_mut().zip(xs) {
                let t = table[(x.to_bits() >> 16) as usize];
                *c = if t == MIXED { encoder.code(x) } else { t as u8 };
            }
        });
    Ok(CodebookCodes {
        bits,
        codebook,
        row_len: values.len(),
        group_len: 0,
        scales: Vec::new(),
        codes,
    })
}

/// The 16 NF4 levels of QLoRA (bitsandbytes), before rounding to f16.
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The NF4 levels as stored (rounded to f16).
pub fn nf4_codebook() -> Vec<f32> {
    NF4_LEVELS
        .iter()
        .map(|&l| f16::from_f32(l).to_f32())
        .collect()
}

/// Code of the NF4 zero level.
const NF4_ZERO_CODE: u8 = 7;

/// NF4 codes (QLoRA): the 16 NormalFloat levels (as f16) and an absmax scale per group
/// (rounded up to f16; an f32 beyond f16's range), see the module docs.
///
/// Errors: `row_len == 0` or `values.len()` not a multiple of `row_len`.
pub fn nf4_codes(
    granularity: Granularity,
    values: &[f32],
    row_len: usize,
) -> Result<CodebookCodes, QuantizeError> {
    nf4_codes_with(granularity, values, row_len, None)
}

/// [`nf4_codes`] under [`Granularity::Tensor`] with the whole tensor's finite absmax fixed
/// in advance (gathered chunk by chunk in a first pass): applied to each chunk of rows it
/// gives bit for bit the codes of the whole tensor encoded at once, each chunk carrying
/// the tensor's one scale.
///
/// Errors: as [`nf4_codes`].
pub fn nf4_codes_with_absmax(
    values: &[f32],
    row_len: usize,
    absmax: f32,
) -> Result<CodebookCodes, QuantizeError> {
    nf4_codes_with(Granularity::Tensor, values, row_len, Some(absmax))
}

/// [`nf4_codes`], with the per-tensor absmax given rather than measured when `Some`.
fn nf4_codes_with(
    granularity: Granularity,
    values: &[f32],
    row_len: usize,
    tensor_absmax: Option<f32>,
) -> Result<CodebookCodes, QuantizeError> {
    check_rows(values.len(), row_len)?;
    let (row_len, group_len) = layout(granularity, values.len(), row_len);
    let codebook = nf4_codebook();
    let mut out = CodebookCodes {
        bits: 4,
        codebook,
        row_len,
        group_len,
        scales: Vec::new(),
        codes: vec![0; values.len()],
    };
    if values.is_empty() {
        return Ok(out);
    }
    let scale_from = |absmax: f32| {
        if absmax > 0.0 {
            stored_scale(absmax)
        } else {
            0.0
        }
    };
    let scale_of = |g: &[f32]| scale_from(finite_absmax(g));
    out.scales = if granularity == Granularity::Tensor {
        vec![tensor_absmax.map_or_else(|| scale_of(values), scale_from)]
    } else {
        let groups_per_row = row_len.div_ceil(group_len);
        let mut scales = vec![0.0; values.len() / row_len * groups_per_row];
        scales
            .par_chunks_mut(groups_per_row)
            .zip(values.par_chunks(row_len))
            .with_min_len((PIECE / row_len).max(1))
            .for_each(|(s, row)| {
                for (s, g) in s.iter_mut().zip(row.chunks(group_len)) {
                    *s = scale_of(g);
                }
            });
        scales
    };
    let mut mids = [0f32; 15];
    for (m, w) in mids.iter_mut().zip(out.codebook.windows(2)) {
        // Exact: both levels are f16 values of similar magnitude.
        *m = 0.5 * (w[0] + w[1]);
    }
    let scales = &out.scales;
    par_group_pieces(&mut out.codes, row_len, group_len, |start, g, piece| {
        let scale = scales[g];
        if scale == 0.0 {
            piece.fill(NF4_ZERO_CODE);
            return;
        }
        let xs = &values[start..start + piece.len()];
        for (c, &x) in piece.iter_mut().zip(xs) {
            let y = x / scale;
            let mut code = 0u8;
            for &m in &mids {
                code += u8::from(y > m);
            }
            *c = if y.is_nan() { NF4_ZERO_CODE } else { code };
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests;
