//! Near-identical tensors (layer sharing): a small deterministic sketch per tensor so the
//! coordinator can shortlist pairs without moving weights, and the exact cosine a worker
//! computes before a tensor is stored as a reference to another.
//!
//! The sketch samples [`SKETCH_LEN`] values at evenly strided positions, the same positions
//! for every tensor of the same size, so two sketches compare like-for-like elements. For
//! unrelated tensors the sketch cosine scatters around 0 by about `1/sqrt(SKETCH_LEN)`; for a
//! pair at cosine 0.999 it stays near 0.999, so [`SHORTLIST_MARGIN`] below the threshold
//! misses almost none while the exact check removes every false candidate.

/// Values sampled per tensor.
pub const SKETCH_LEN: usize = 2048;
/// Candidates are pairs whose sketch cosine reaches the threshold minus this.
pub const SHORTLIST_MARGIN: f64 = 0.02;

/// The sketch of `values`: every value when there are at most [`SKETCH_LEN`], otherwise
/// [`SKETCH_LEN`] values at evenly strided positions.
pub fn sketch(values: &[f32]) -> Vec<f32> {
    let mut sketcher = Sketcher::new(values.len());
    sketcher.feed(values);
    sketcher.finish()
}

/// Builds a [`sketch`] from a tensor streamed in consecutive pieces.
#[derive(Debug, Clone)]
pub struct Sketcher {
    len: usize,
    seen: usize,
    values: Vec<f32>,
}

impl Sketcher {
    /// For a tensor of `len` values.
    pub fn new(len: usize) -> Self {
        Self {
            len,
            seen: 0,
            values: Vec::with_capacity(len.min(SKETCH_LEN)),
        }
    }

    /// Index of the `i`-th sampled value.
    fn position(&self, i: usize) -> usize {
        if self.len <= SKETCH_LEN {
            i
        } else {
            (i as u128 * self.len as u128 / SKETCH_LEN as u128) as usize
        }
    }

    /// The next piece of the tensor, in order.
    pub fn feed(&mut self, piece: &[f32]) {
        let end = self.seen + piece.len();
        while self.values.len() < self.len.min(SKETCH_LEN) {
            let p = self.position(self.values.len());
            if p >= end {
                break;
            }
            self.values.push(piece[p - self.seen]);
        }
        self.seen = end;
    }

    /// The sketch (shorter than promised only if fewer values were fed than announced).
    pub fn finish(self) -> Vec<f32> {
        self.values
    }
}

/// Cosine similarity in f64; 0 when either side is all zeros or the lengths differ.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return 0.0;
    }
    let mut acc = CosineAccumulator::default();
    acc.feed(a, b);
    acc.finish()
}

/// [`cosine`] of two tensors streamed chunk by chunk (equal-length pieces, in order): the
/// same sums in the same order, so fed the whole tensors piece by piece it gives exactly
/// `cosine` of the whole tensors while holding one chunk of each.
#[derive(Debug, Clone, Default)]
pub struct CosineAccumulator {
    dot: f64,
    aa: f64,
    bb: f64,
    mismatched: bool,
}

impl CosineAccumulator {
    /// Adds the next pieces of both tensors (pieces of different lengths make the cosine 0).
    pub fn feed(&mut self, a: &[f32], b: &[f32]) {
        if a.len() != b.len() {
            self.mismatched = true;
            return;
        }
        let (mut dot, mut aa, mut bb) = (self.dot, self.aa, self.bb);
        for (&x, &y) in a.iter().zip(b) {
            let (x, y) = (f64::from(x), f64::from(y));
            dot += x * y;
            aa += x * x;
            bb += y * y;
        }
        (self.dot, self.aa, self.bb) = (dot, aa, bb);
    }

    /// The cosine of everything fed; 0 when either side is all zeros.
    pub fn finish(&self) -> f64 {
        if self.mismatched || self.aa == 0.0 || self.bb == 0.0 || !self.dot.is_finite() {
            return 0.0;
        }
        self.dot / (self.aa.sqrt() * self.bb.sqrt())
    }
}

/// Picks, for each tensor in order, an earlier tensor it may share: same kind (dtype and
/// shape), sketch cosine at least `threshold - SHORTLIST_MARGIN`, best first. A tensor that
/// may share is never offered as someone else's source, so references never chain.
/// `kinds[i]` groups comparable tensors; returns `(tensor, candidate source)` index pairs.
pub fn shortlist<K: PartialEq, S: AsRef<[f32]>>(
    kinds: &[K],
    sketches: &[S],
    threshold: f64,
) -> Vec<(usize, usize)> {
    let floor = threshold - SHORTLIST_MARGIN;
    let mut sources: Vec<usize> = Vec::new();
    let mut pairs = Vec::new();
    for (i, (kind, s)) in kinds.iter().zip(sketches).enumerate() {
        let best = sources
            .iter()
            .filter(|&&j| kinds[j] == *kind)
            .map(|&j| (j, cosine(s.as_ref(), sketches[j].as_ref())))
            .filter(|&(_, c)| c >= floor)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match best {
            Some((j, _)) => pairs.push((i, j)),
            None => sources.push(i),
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn a_cosine_streamed_in_chunks_equals_the_whole_tensors_cosine() {
        let a = noise(10_000, 4);
        let b: Vec<f32> = a
            .iter()
            .zip(noise(10_000, 5))
            .map(|(x, e)| x + 0.1 * e)
            .collect();
        let mut acc = CosineAccumulator::default();
        for (x, y) in a.chunks(777).zip(b.chunks(777)) {
            acc.feed(x, y);
        }
        assert_eq!(acc.finish().to_bits(), cosine(&a, &b).to_bits());
        assert!(acc.finish() > 0.9 && acc.finish() < 1.0);
        acc.feed(&a[..3], &b[..2]);
        assert_eq!(
            acc.finish(),
            0.0,
            "pieces of different lengths do not compare"
        );
    }

    #[test]
    fn near_identical_pairs_are_shortlisted_and_unrelated_ones_are_not() {
        let a = noise(100_000, 1);
        let b = noise(100_000, 2);
        // a plus 3% noise: cosine ~0.9995.
        let a2: Vec<f32> = a
            .iter()
            .zip(noise(100_000, 3))
            .map(|(x, e)| x + 0.03 * e)
            .collect();
        assert!(cosine(&a, &a2) > 0.999);
        assert!(cosine(&a, &b).abs() < 0.02);
        let sketches = [sketch(&a), sketch(&b), sketch(&a2), sketch(&a2[..50_000])];
        assert_eq!(sketches[0].len(), SKETCH_LEN);
        assert!((cosine(&sketches[0], &sketches[2]) - cosine(&a, &a2)).abs() < 0.001);
        let kinds = ["x", "x", "x", "y"];
        assert_eq!(shortlist(&kinds, &sketches, 0.999), vec![(2, 0)]);
        // A different kind never pairs, even if identical.
        assert_eq!(
            shortlist(&["x", "y"], &[sketch(&a), sketch(&a)], 0.99),
            vec![]
        );
        // The source of a pair is never itself a referencing tensor.
        let pairs = shortlist(&["x"; 3], &[sketch(&a), sketch(&a2), sketch(&a2)], 0.999);
        assert_eq!(pairs, vec![(1, 0), (2, 0)]);
    }

    #[test]
    fn cosine_edge_cases() {
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 2.0]), 0.0);
        assert_eq!(cosine(&[1.0], &[1.0, 2.0]), 0.0);
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert_eq!(sketch(&[1.0, 2.0]), vec![1.0, 2.0]);
        // Streaming in uneven pieces gives the same sketch.
        let v: Vec<f32> = (0..10_007).map(|i| i as f32).collect();
        let mut s = Sketcher::new(v.len());
        for piece in v.chunks(333) {
            s.feed(piece);
        }
        assert_eq!(s.finish(), sketch(&v));
        assert_eq!(sketch(&v)[1], (10_007 / SKETCH_LEN) as f32);
    }
}
