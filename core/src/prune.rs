//! Pruning masks: unstructured magnitude, N:M semi-structured, and structured row/column.
//!
//! Every function returns *keep* flags (`true` = the weight, row or column survives); the
//! storage side lives in [`crate::sparse`]. A tensor is a row-major matrix of `row_len` columns.
//!
//! **Ordering.** Weights are ranked by magnitude through the key `k(w) = bits(w) & 0x7fff_ffff`
//! (the IEEE-754 bits with the sign cleared). For finite and infinite values this order is
//! exactly the order of `|w|` (`-0` and `+0` share key 0); NaN keys lie above infinity, so a
//! NaN is treated as the largest magnitude and is never pruned before a number. Equal keys
//! are broken by position: among equals the *lower* index is pruned first (magnitude and
//! structured) and the lower index is kept first (N:M). Results are therefore a pure function
//! of the input, independent of the rayon thread count.
//!
//! **Magnitude pruning** drops exactly `d = round(s * n)` weights (`s` clamped to `[0, 1]`,
//! NaN treated as 0): all keys below the `d`-th smallest key `t`, plus the first
//! `d - #{k < t}` positions whose key equals `t`. `t` is found by a two-pass radix select
//! (a 32768-bin histogram of the top 16 key bits, then a 65536-bin histogram of the low 16
//! bits inside the selected bin), so the cost is O(n) with no copy of the data; histograms
//! are integer counts, so the rayon reduction is exact. The same select over several tensors
//! gives the global threshold ([`global_threshold`], [`global_masks`]).
//!
//! **N:M** keeps, in every run of `m` consecutive weights of a row, the `n` with the largest
//! keys; a weight's rank is the number of weights in its block that beat it.
//!
//! **Structured** pruning scores row `r` (or column `c`) by its L1 norm `sum |w|` or L2
//! norm `sqrt(sum w^2)` (compared as `sum w^2`), accumulated in f64 in a fixed order, and
//! drops the `round(fraction * count)` lowest-scoring ones (NaN scores count as largest).

use rayon::prelude::*;

/// Elements per rayon task in the streaming passes (fixed, so work splitting never depends
/// on the thread count).
const CHUNK: usize = 1 << 16;
/// Bins of the first radix-select pass (top 16 bits of a 31-bit key).
const HI_BINS: usize = 1 << 15;
/// Bins of the second radix-select pass (low 16 bits).
const LO_BINS: usize = 1 << 16;

/// Norm used to score rows or columns in structured pruning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Norm {
    /// Sum of absolute values.
    L1,
    /// Euclidean norm.
    L2,
}

/// Invalid pruning input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PruneError {
    #[error("row length must be positive")]
    ZeroRowLen,
    #[error("tensor of {len} values is not a whole number of rows of {row_len}")]
    RaggedRows { len: usize, row_len: usize },
    #[error("fraction {0} is not in [0, 1]")]
    InvalidFraction(f64),
    #[error("N:M pattern {n}:{m} is invalid (need 0 < m and n <= m)")]
    InvalidPattern { n: usize, m: usize },
    #[error("row length {row_len} is not a multiple of m = {m}")]
    RowLenNotMultiple { row_len: usize, m: usize },
}

/// Magnitude sort key: the f32 bits without the sign (monotone in `|w|`, NaN on top).
#[inline(always)]
fn mag_key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Number of weights to drop for `sparsity` of `n` (clamped; NaN means 0).
fn drop_count(n: usize, sparsity: f64) -> usize {
    let s = if sparsity.is_nan() {
        0.0
    } else {
        sparsity.clamp(0.0, 1.0)
    };
    ((s * n as f64).round() as usize).min(n)
}

/// Adds `a` into `b` element-wise (histogram reduction).
fn add_hist(mut a: Vec<u64>, b: Vec<u64>) -> Vec<u64> {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
    a
}

/// Finds the bin holding the 0-based `rank` in histogram `h`: `(bin, count below bin)`.
fn locate(h: &[u64], rank: u64) -> (usize, u64) {
    let mut below = 0u64;
    for (bin, &c) in h.iter().enumerate() {
        if below + c > rank {
            return (bin, below);
        }
        below += c;
    }
    // Unreachable when rank < total; fall back to the last bin.
    (h.len() - 1, below)
}

/// The key of the 0-based `rank`-th smallest key over all `tensors` (rank < total), and the
/// number of keys strictly below it.
fn select_key(tensors: &[&[f32]], rank: u64) -> (u32, u64) {
    let hi = tensors
        .iter()
        .flat_map(|t| t.chunks(CHUNK))
        .collect::<Vec<_>>()
        .into_par_iter()
        .fold(
            || vec![0u64; HI_BINS],
            |mut h, c| {
                for &x in c {
                    h[(mag_key(x) >> 16) as usize] += 1;
                }
                h
            },
        )
        .reduce(|| vec![0u64; HI_BINS], add_hist);
    let (hi_bin, below_hi) = locate(&hi, rank);
    let hi_bin = hi_bin as u32;
    let lo = tensors
        .iter()
        .flat_map(|t| t.chunks(CHUNK))
        .collect::<Vec<_>>()
        .into_par_iter()
        .fold(
            || vec![0u64; LO_BINS],
            |mut h, c| {
                for &x in c {
                    let k = mag_key(x);
                    if k >> 16 == hi_bin {
                        h[(k & 0xffff) as usize] += 1;
                    }
                }
                h
            },
        )
        .reduce(|| vec![0u64; LO_BINS], add_hist);
    let (lo_bin, below_lo) = locate(&lo, rank - below_hi);
    ((hi_bin << 16) | lo_bin as u32, below_hi + below_lo)
}

/// Keep masks for several tensors pruned as one concatenation (see the module docs).
fn masks_for(tensors: &[&[f32]], sparsity: f64) -> Vec<Vec<bool>> {
    let total: usize = tensors.iter().map(|t| t.len()).sum();
    let drop = drop_count(total, sparsity);
    if drop == 0 {
        return tensors.iter().map(|t| vec![true; t.len()]).collect();
    }
    if drop == total {
        return tensors.iter().map(|t| vec![false; t.len()]).collect();
    }
    let (t, below) = select_key(tensors, drop as u64 - 1);
    let ties_to_drop = drop as u64 - below;
    // Per-chunk counts of keys equal to t, in concatenation order, so each chunk knows how
    // many ties before it were already dropped.
    let eq_counts: Vec<Vec<u64>> = tensors
        .iter()
        .map(|v| {
            v.par_chunks(CHUNK)
                .map(|c| c.iter().filter(|&&x| mag_key(x) == t).count() as u64)
                .collect()
        })
        .collect();
    let mut ties_before = 0u64;
    let mut out = Vec::with_capacity(tensors.len());
    for (v, counts) in tensors.iter().zip(&eq_counts) {
        let mut starts = Vec::with_capacity(counts.len());
        for &c in counts {
            starts.push(ties_before);
            ties_before += c;
        }
        let mut mask = vec![false; v.len()];
        mask.par_chunks_mut(CHUNK)
            .zip(v.par_chunks(CHUNK))
            .zip(starts.par_iter())
            .for_each(|((m, c), &start)| {
                let mut seen = start;
                for (keep, &x) in m.iter_mut().zip(c) {
                    let k = mag_key(x);
                    *keep = if k == t {
                        seen += 1;
                        seen > ties_to_drop
                    } else {
                        k > t
                    };
                }
            });
        out.push(mask);
    }
    out
}

/// Unstructured magnitude pruning: drops exactly `round(sparsity * n)` weights with the
/// smallest `|w|` (ties: lower index dropped first). `sparsity` is clamped to `[0, 1]`; NaN
/// means no pruning. O(n) via radix select.
pub fn magnitude_mask(values: &[f32], sparsity: f64) -> Vec<bool> {
    masks_for(&[values], sparsity).pop().unwrap_or_default()
}

/// Magnitude pruning of several tensors against one global target: exactly
/// `round(sparsity * total)` weights are dropped across all of them, as if they were one
/// concatenated tensor (ties broken by position in that concatenation).
pub fn global_masks(tensors: &[&[f32]], sparsity: f64) -> Vec<Vec<bool>> {
    masks_for(tensors, sparsity)
}

/// The `|w|` threshold of a global magnitude target over several tensors: the magnitude of
/// the largest dropped weight, so every dropped `|w| <= t <= ` every kept `|w|` in
/// [`global_masks`]. Returns 0.0 when nothing is dropped (and NaN only when NaNs must be
/// dropped, i.e. `sparsity` reaches them).
pub fn global_threshold(tensors: &[&[f32]], sparsity: f64) -> f32 {
    let total: usize = tensors.iter().map(|t| t.len()).sum();
    let drop = drop_count(total, sparsity);
    if drop == 0 {
        return 0.0;
    }
    f32::from_bits(select_key(tensors, drop as u64 - 1).0)
}

/// Bins of [`magnitude_histogram`]: the top 16 bits of `|w|` as f32 bits (sign dropped), so
/// one bin per BF16 magnitude.
pub const MAGNITUDE_BINS: usize = HI_BINS;

/// Histogram of `|w|` over [`MAGNITUDE_BINS`] bins: what a worker reports so that a global
/// magnitude target over tensors on many machines can be cut without moving the weights.
pub fn magnitude_histogram(values: &[f32]) -> Vec<u64> {
    values
        .par_chunks(CHUNK)
        .fold(
            || vec![0u64; HI_BINS],
            |mut h, c| {
                for &x in c {
                    h[(mag_key(x) >> 16) as usize] += 1;
                }
                h
            },
        )
        .reduce(|| vec![0u64; HI_BINS], add_hist)
}

/// Where a global magnitude target cuts the merged histogram of every targeted tensor: all
/// weights in bins below `bin` are dropped, and `tie_fraction` of those in `bin` (in each
/// tensor, the smallest of them). Exact for BF16 weights up to one rounding per tensor; for
/// F16/F32 the tie share is taken by magnitude inside the bin, so the total is as exact.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalCut {
    pub bin: u32,
    pub tie_fraction: f64,
}

impl GlobalCut {
    /// The cut dropping `round(sparsity * total)` weights of the merged histogram `hist`
    /// ([`MAGNITUDE_BINS`] bins); `None` when the histogram is empty or has the wrong size.
    pub fn from_histogram(hist: &[u64], sparsity: f64) -> Option<GlobalCut> {
        let total: u64 = hist.iter().sum();
        if total == 0 || hist.len() != HI_BINS {
            return None;
        }
        let drop = drop_count(total as usize, sparsity) as u64;
        if drop == 0 {
            return Some(GlobalCut {
                bin: 0,
                tie_fraction: 0.0,
            });
        }
        let (bin, below) = locate(hist, drop - 1);
        Some(GlobalCut {
            bin: bin as u32,
            tie_fraction: (drop - below) as f64 / hist[bin] as f64,
        })
    }

    /// Smallest `|w|` of the cut's bin: weights below it are all dropped.
    pub fn threshold(&self) -> f32 {
        f32::from_bits(self.bin << 16)
    }

    /// The fraction of `values` this cut drops: every weight below the bin plus
    /// `round(tie_fraction * in_bin)`; [`magnitude_mask`] with it drops exactly those.
    pub fn local_sparsity(&self, values: &[f32]) -> f64 {
        if values.is_empty() {
            return 0.0;
        }
        let (below, within) = values
            .par_chunks(CHUNK)
            .map(|c| {
                c.iter().fold((0u64, 0u64), |(b, w), &x| {
                    let bin = mag_key(x) >> 16;
                    (
                        b + u64::from(bin < self.bin),
                        w + u64::from(bin == self.bin),
                    )
                })
            })
            .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        let dropped = below + (self.tie_fraction * within as f64).round() as u64;
        dropped as f64 / values.len() as f64
    }
}

/// Checks that `len` values form whole rows of `row_len`; returns the row count.
fn check_rows(len: usize, row_len: usize) -> Result<usize, PruneError> {
    if row_len == 0 {
        return Err(PruneError::ZeroRowLen);
    }
    if len % row_len != 0 {
        return Err(PruneError::RaggedRows { len, row_len });
    }
    Ok(len / row_len)
}

/// Keeps the `n` largest of one block of a compile-time size (rank counting, branch-free).
#[inline(always)]
fn nm_block_fixed<const M: usize>(block: &[f32], n: usize, out: &mut [bool]) {
    let keys: [u32; M] = std::array::from_fn(|i| mag_key(block[i]));
    for i in 0..M {
        let mut rank = 0usize;
        for j in 0..M {
            let beats = keys[j] > keys[i] || (keys[j] == keys[i] && j < i);
            rank += usize::from(beats);
        }
        out[i] = rank < n;
    }
}

fn nm_fixed<const M: usize>(values: &[f32], n: usize, out: &mut [bool]) {
    for (b, o) in values.chunks_exact(M).zip(out.chunks_exact_mut(M)) {
        nm_block_fixed::<M>(b, n, o);
    }
}

fn nm_generic(values: &[f32], n: usize, m: usize, out: &mut [bool]) {
    let mut order: Vec<usize> = Vec::with_capacity(m);
    for (b, o) in values.chunks_exact(m).zip(out.chunks_exact_mut(m)) {
        order.clear();
        order.extend(0..m);
        // Largest key first, ties by lower index; only the first n matter.
        let by_rank = |&i: &usize, &j: &usize| mag_key(b[j]).cmp(&mag_key(b[i])).then(i.cmp(&j));
        if n > 0 && n < m {
            order.select_nth_unstable_by(n - 1, by_rank);
        }
        o.fill(false);
        for &i in &order[..n] {
            o[i] = true;
        }
    }
}

/// N:M semi-structured pruning: in every run of `m` consecutive weights of a row keep the
/// `n` with the largest `|w|` (ties: lower index kept). Requires `0 < m`, `n <= m` and
/// `row_len % m == 0`.
pub fn nm_mask(
    values: &[f32],
    row_len: usize,
    n: usize,
    m: usize,
) -> Result<Vec<bool>, PruneError> {
    if m == 0 || n > m {
        return Err(PruneError::InvalidPattern { n, m });
    }
    check_rows(values.len(), row_len)?;
    if row_len % m != 0 {
        return Err(PruneError::RowLenNotMultiple { row_len, m });
    }
    let mut mask = vec![false; values.len()];
    // Blocks never straddle rows (row_len % m == 0), so the flat array is a run of blocks.
    let piece = (CHUNK / m).max(1) * m;
    mask.par_chunks_mut(piece)
        .zip(values.par_chunks(piece))
        .for_each(|(o, v)| match m {
            2 => nm_fixed::<2>(v, n, o),
            4 => nm_fixed::<4>(v, n, o),
            8 => nm_fixed::<8>(v, n, o),
            16 => nm_fixed::<16>(v, n, o),
            _ => nm_generic(v, n, m, o),
        });
    Ok(mask)
}

/// Validates a structured-pruning fraction.
fn check_fraction(fraction: f64) -> Result<(), PruneError> {
    if (0.0..=1.0).contains(&fraction) {
        Ok(())
    } else {
        Err(PruneError::InvalidFraction(fraction))
    }
}

/// Keep flags dropping the `round(fraction * len)` smallest scores (NaN counts as largest,
/// ties: lower index dropped first). [`row_keep`] and [`col_keep`] are this over
/// [`row_scores`] and [`col_scores`]; a streamed tensor gathers the scores chunk by chunk.
pub fn keep_by_score(scores: &[f64], fraction: f64) -> Vec<bool> {
    let drop = ((fraction * scores.len() as f64).round() as usize).min(scores.len());
    let mut order: Vec<usize> = (0..scores.len()).collect();
    let key = |i: usize| (scores[i].is_nan(), scores[i]);
    order.sort_by(|&i, &j| {
        let (ni, si) = key(i);
        let (nj, sj) = key(j);
        ni.cmp(&nj)
            .then(if ni {
                std::cmp::Ordering::Equal
            } else {
                si.total_cmp(&sj)
            })
            .then(i.cmp(&j))
    });
    let mut keep = vec![true; scores.len()];
    for &i in &order[..drop] {
        keep[i] = false;
    }
    keep
}

/// Contribution of one weight to a norm score (`|w|` or `w^2`), in f64.
#[inline(always)]
fn norm_term(norm: Norm, x: f32) -> f64 {
    let x = f64::from(x);
    match norm {
        Norm::L1 => x.abs(),
        Norm::L2 => x * x,
    }
}

/// Per-row scores (L1 norm or squared L2 norm).
pub fn row_scores(values: &[f32], row_len: usize, norm: Norm) -> Result<Vec<f64>, PruneError> {
    check_rows(values.len(), row_len)?;
    Ok(values
        .par_chunks(row_len)
        .map(|row| row.iter().map(|&x| norm_term(norm, x)).sum())
        .collect())
}

/// Per-column scores (L1 norm or squared L2 norm), summed over rows in a fixed blocking.
pub fn col_scores(values: &[f32], row_len: usize, norm: Norm) -> Result<Vec<f64>, PruneError> {
    let rows = check_rows(values.len(), row_len)?;
    // Fixed block of rows per partial sum (depends only on the shape), combined in order.
    let block_rows = rows.div_ceil(64).max(64);
    let partials: Vec<Vec<f64>> = values
        .par_chunks(block_rows * row_len)
        .map(|block| {
            let mut acc = vec![0f64; row_len];
            for row in block.chunks_exact(row_len) {
                for (a, &x) in acc.iter_mut().zip(row) {
                    *a += norm_term(norm, x);
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0f64; row_len];
    for p in partials {
        for (t, x) in total.iter_mut().zip(p) {
            *t += x;
        }
    }
    Ok(total)
}

/// Structured pruning of rows (output channels): keep flags per row, dropping the
/// `round(fraction * rows)` rows with the smallest L1/L2 norm. `fraction` must be in `[0, 1]`.
pub fn row_keep(
    values: &[f32],
    row_len: usize,
    fraction: f64,
    norm: Norm,
) -> Result<Vec<bool>, PruneError> {
    check_fraction(fraction)?;
    Ok(keep_by_score(&row_scores(values, row_len, norm)?, fraction))
}

/// Structured pruning of columns (input features): keep flags per column, dropping the
/// `round(fraction * row_len)` columns with the smallest L1/L2 norm.
pub fn col_keep(
    values: &[f32],
    row_len: usize,
    fraction: f64,
    norm: Norm,
) -> Result<Vec<bool>, PruneError> {
    check_fraction(fraction)?;
    Ok(keep_by_score(&col_scores(values, row_len, norm)?, fraction))
}

#[cfg(test)]
mod tests;
