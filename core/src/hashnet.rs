//! HashedNets weight sharing (Chen et al. 2015, "Compressing Neural Networks with the
//! Hashing Trick").
//!
//! Weight `i` of a tensor is tied to bucket `h(i) = H(seed, i) mod B` with a sign
//! `xi(i) = +1` if bit 63 of `H(seed, i)` is 0, else `-1`, and is reconstructed as
//! `w'_i = xi(i) * v[h(i)]`. `H(seed, i) = mix(mix(i) + seed)` with `mix` the splitmix64
//! finalizer (a bijection on u64), so the bucket (low bits modulo `B`) and the sign (top
//! bit) are effectively independent for any `B`, and nothing but `(seed, len, v)` has to be
//! stored.
//!
//! Given the assignment, the squared error `sum_i (w_i - xi(i) v[h(i)])^2` separates by
//! bucket, and since `xi^2 = 1` each term is `(xi(i) w_i - v_b)^2`; it is minimised by the
//! mean `v_b = (1/|S_b|) sum_{i in S_b} xi(i) w_i` (least squares). Empty buckets get 0.
//! Sums are accumulated in f64 and every bucket receives its members in index order, so the
//! result is bit-identical to a sequential loop whatever the thread count. For speed the
//! weights are hashed in parallel in passes of 2^20, stably grouped by bucket range (2^14
//! buckets, which stay in cache) and the ranges accumulated in parallel; the
//! reconstruction hashes every element independently in parallel. [`BucketSums`] gathers
//! the same sums from a tensor fed in pieces, so a worker never holds the tensor itself.

use rayon::prelude::*;

/// Weights hashed per pass (bounds the temporary buffers to a few tens of MiB).
const SUPER: usize = 1 << 20;
/// Buckets per accumulation range (16 B each: the range stays cache-resident).
const RANGE: usize = 1 << 14;

/// Invalid HashedNets input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HashNetError {
    #[error("the number of buckets must be positive")]
    ZeroBuckets,
    #[error("value at index {index} is not finite")]
    NonFinite { index: usize },
}

/// A tensor of `len` weights shared through `buckets.len()` hashed buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct HashedWeights {
    pub len: usize,
    pub seed: u64,
    /// Bucket values (sign-corrected means of their members).
    pub buckets: Vec<f32>,
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The bucket (`< buckets`, which must be positive) and sign (`+1.0` or `-1.0`) of weight
/// `index` under `seed`.
#[inline]
pub fn bucket_and_sign(seed: u64, index: usize, buckets: usize) -> (usize, f32) {
    let h = mix64(mix64(index as u64).wrapping_add(seed));
    let bucket = (h % buckets as u64) as usize;
    let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
    (bucket, sign)
}

/// Shares `values` through `buckets` hashed buckets, each set to the least-squares optimal
/// value (the mean of its sign-corrected members; 0 when empty).
pub fn hashed_share(
    values: &[f32],
    buckets: usize,
    seed: u64,
) -> Result<HashedWeights, HashNetError> {
    let mut sums = BucketSums::new(buckets, seed)?;
    sums.feed(values)?;
    Ok(sums.finish())
}

/// The bucket sums of a tensor fed in index order, any number of weights at a time: the
/// streamed form of [`hashed_share`], bit for bit equal to it however the weights are split
/// (each bucket still receives its members in index order). Holds 16 bytes per bucket.
#[derive(Debug, Clone)]
pub struct BucketSums {
    seed: u64,
    /// Weights fed so far (the index of the next one).
    len: usize,
    sums: Vec<f64>,
    counts: Vec<u64>,
}

impl BucketSums {
    /// Empty sums over `buckets` buckets (which must be positive).
    pub fn new(buckets: usize, seed: u64) -> Result<BucketSums, HashNetError> {
        if buckets == 0 {
            return Err(HashNetError::ZeroBuckets);
        }
        Ok(BucketSums {
            seed,
            len: 0,
            sums: vec![0.0; buckets],
            counts: vec![0; buckets],
        })
    }

    /// Bytes held for `buckets` buckets.
    pub fn held_bytes(buckets: usize) -> u64 {
        buckets as u64 * 16
    }

    /// Adds the next weights (indices `len..len + values.len()`).
    pub fn feed(&mut self, values: &[f32]) -> Result<(), HashNetError> {
        if let Some(i) = values.iter().position(|x| !x.is_finite()) {
            return Err(HashNetError::NonFinite {
                index: self.len + i,
            });
        }
        let (seed, buckets) = (self.seed, self.sums.len());
        let ranges = buckets.div_ceil(RANGE);
        let mut sorted: Vec<(u64, f32)> = Vec::new();
        for (s, piece) in values.chunks(SUPER).enumerate() {
            let base = self.len + s * SUPER;
            // Hash in parallel: (bucket, sign-corrected weight) in index order.
            let tagged: Vec<(u64, f32)> = piece
                .par_iter()
                .enumerate()
                .map(|(j, &w)| {
                    let (b, sign) = bucket_and_sign(seed, base + j, buckets);
                    (b as u64, sign * w)
                })
                .collect();
            let grouped: &[(u64, f32)] = if ranges == 1 {
                &tagged
            } else {
                group_by_range(&tagged, ranges, &mut sorted);
                &sorted
            };
            // Each range owns a disjoint slice of the sums, so ranges run in parallel while
            // every bucket still receives its members in index order.
            let mut bounds = Vec::with_capacity(ranges);
            let mut at = 0;
            for r in 0..ranges {
                let lo = at;
                let limit = ((r + 1) * RANGE) as u64;
                while at < grouped.len() && grouped[at].0 < limit {
                    at += 1;
                }
                bounds.push(lo..at);
            }
            self.sums
                .par_chunks_mut(RANGE)
                .zip(self.counts.par_chunks_mut(RANGE))
                .zip(bounds.into_par_iter())
                .enumerate()
                .for_each(|(r, ((sum, count), span))| {
                    let first = (r * RANGE) as u64;
                    for &(b, w) in &grouped[span] {
                        let i = (b - first) as usize;
                        sum[i] += f64::from(w);
                        count[i] += 1;
                    }
                });
        }
        self.len += values.len();
        Ok(())
    }

    /// The shared weights: each bucket the mean of its members (0 when empty).
    pub fn finish(self) -> HashedWeights {
        let buckets = self
            .sums
            .iter()
            .zip(&self.counts)
            .map(|(&s, &c)| if c == 0 { 0.0 } else { (s / c as f64) as f32 })
            .collect();
        HashedWeights {
            len: self.len,
            seed: self.seed,
            buckets,
        }
    }
}

/// Stable counting sort of `tagged` by bucket range into `sorted`: index order is kept
/// inside a range.
fn group_by_range(tagged: &[(u64, f32)], ranges: usize, sorted: &mut Vec<(u64, f32)>) {
    let mut starts = vec![0usize; ranges + 1];
    for &(b, _) in tagged {
        starts[b as usize / RANGE + 1] += 1;
    }
    for r in 0..ranges {
        starts[r + 1] += starts[r];
    }
    let mut next = starts;
    sorted.clear();
    sorted.resize(tagged.len(), (0, 0.0));
    for &t in tagged {
        let r = t.0 as usize / RANGE;
        sorted[next[r]] = t;
        next[r] += 1;
    }
}

impl HashedWeights {
    /// Writes `w'_i = xi(i) * bucket[h(i)]` for `i < min(len, out.len())` (the rest of `out`
    /// is left untouched). With no buckets the weights are 0.
    pub fn reconstruct_into(&self, out: &mut [f32]) {
        self.reconstruct_range(0, out);
    }

    /// Writes weights `first..first + out.len()` (clipped at `len`) into `out`: a slice of
    /// what [`Self::reconstruct_into`] writes.
    pub fn reconstruct_range(&self, first: usize, out: &mut [f32]) {
        let n = self.len.saturating_sub(first).min(out.len());
        let out = &mut out[..n];
        if self.buckets.is_empty() {
            out.fill(0.0);
            return;
        }
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (j, o) in chunk.iter_mut().enumerate() {
                    let index = first + c * CHUNK + j;
                    let (b, sign) = bucket_and_sign(self.seed, index, self.buckets.len());
                    *o = sign * self.buckets[b];
                }
            });
    }

    /// Bytes stored: the f32 buckets (the seed and length are O(1) metadata).
    pub fn stored_bytes(&self) -> usize {
        4 * self.buckets.len()
    }
}

#[cfg(test)]
mod tests;
