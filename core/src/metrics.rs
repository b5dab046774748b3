//! Reconstruction-error metrics: relative Frobenius error, SNR, cosine and max error.
//!
//! A tensor is processed in chunks (possibly on different threads or workers), so the
//! sums live in an [`ErrorAccumulator`] that chunks are added to and accumulators merged.
//! Sums are f64 and deterministic: [`ErrorAccumulator::add`] splits its input into fixed
//! 64Ki-element blocks, sums each block into 8 fixed lanes (element `i` goes to lane
//! `i % 8`), combines lanes in order, and adds the block partials to the accumulator in
//! block order. Blocks may be summed on rayon threads; the combining order never changes,
//! so the result depends only on the data and on how it was split into `add`/`merge` calls.
//! Quality gates from the recipe are checked with [`TensorMetrics::check_gates`].

use crate::recipe::Gates;
use rayon::prelude::*;

/// Elements per block summed independently.
const BLOCK: usize = 64 * 1024;
/// Independent partial sums inside a block (lets the compiler vectorize).
const LANES: usize = 8;
/// SNR reported when the original is all zeros but the reconstruction is not.
pub const SNR_FLOOR_DB: f64 = -1000.0;

/// Running sums over (original, reconstructed) pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErrorAccumulator {
    sum_sq_orig: f64,
    sum_sq_err: f64,
    sum_sq_recon: f64,
    dot: f64,
    max_abs_err: f64,
    count: u64,
}

/// Final metrics of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TensorMetrics {
    /// `||x - y|| / ||x||`; 0 when both are zero, 1.0 when `x` is zero but `y` is not.
    pub rel_fro_error: f64,
    /// `10 log10(||x||^2 / ||x - y||^2)`; `None` when the error is exactly 0 (infinite SNR);
    /// never below [`SNR_FLOOR_DB`].
    pub snr_db: Option<f64>,
    /// `<x, y> / (||x|| ||y||)`; 1.0 when both are zero, 0.0 when exactly one is.
    pub cosine: f64,
    /// Largest `|x - y|`, ignoring NaN pairs (which make the other metrics NaN).
    pub max_abs_error: f64,
}

/// One gate a tensor failed.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, thiserror::Error)]
pub enum GateFailure {
    #[error("relative error {value} exceeds {max}")]
    RelError { value: f64, max: f64 },
    #[error("cosine {value} is below {min}")]
    Cosine { value: f64, min: f64 },
    #[error("SNR {value} dB is below {min} dB")]
    Snr { value: f64, min: f64 },
}

impl ErrorAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of pairs added so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds element pairs; if the slices differ in length only the common prefix is used.
    pub fn add(&mut self, original: &[f32], reconstructed: &[f32]) {
        let n = original.len().min(reconstructed.len());
        let (x, y) = (&original[..n], &reconstructed[..n]);
        let partials: Vec<ErrorAccumulator> = x
            .par_chunks(BLOCK)
            .zip(y.par_chunks(BLOCK))
            .map(|(a, b)| block_sums(a, b))
            .collect();
        for p in &partials {
            self.merge(p);
        }
    }

    /// Adds another accumulator's sums (order matters only at f64 rounding level).
    pub fn merge(&mut self, other: &ErrorAccumulator) {
        self.sum_sq_orig += other.sum_sq_orig;
        self.sum_sq_err += other.sum_sq_err;
        self.sum_sq_recon += other.sum_sq_recon;
        self.dot += other.dot;
        self.max_abs_err = self.max_abs_err.max(other.max_abs_err);
        self.count = self.count.saturating_add(other.count);
    }

    /// Computes the metrics from the sums (see [`TensorMetrics`] for the zero cases).
    pub fn finish(&self) -> TensorMetrics {
        let norm_x = self.sum_sq_orig.sqrt();
        let norm_y = self.sum_sq_recon.sqrt();
        let rel_fro_error = if self.sum_sq_orig > 0.0 {
            (self.sum_sq_err / self.sum_sq_orig).sqrt()
        } else if self.sum_sq_err == 0.0 {
            0.0
        } else {
            1.0
        };
        let snr_db = if self.sum_sq_err == 0.0 {
            None
        } else if self.sum_sq_orig > 0.0 {
            Some((10.0 * (self.sum_sq_orig / self.sum_sq_err).log10()).max(SNR_FLOOR_DB))
        } else {
            Some(SNR_FLOOR_DB)
        };
        let cosine = match (norm_x > 0.0, norm_y > 0.0) {
            (false, false) => 1.0,
            (true, true) => (self.dot / norm_x / norm_y).clamp(-1.0, 1.0),
            _ => 0.0,
        };
        TensorMetrics {
            rel_fro_error,
            snr_db,
            cosine,
            max_abs_error: self.max_abs_err,
        }
    }
}

/// Sums one block sequentially in `LANES` fixed lanes, combined in lane order.
fn block_sums(x: &[f32], y: &[f32]) -> ErrorAccumulator {
    let mut oo = [0f64; LANES];
    let mut ee = [0f64; LANES];
    let mut rr = [0f64; LANES];
    let mut dd = [0f64; LANES];
    let mut mx = [0f64; LANES];
    let mut step = |a: &[f32], b: &[f32]| {
        for l in 0..a.len() {
            let (o, r) = (f64::from(a[l]), f64::from(b[l]));
            let e = o - r;
            oo[l] += o * o;
            ee[l] += e * e;
            rr[l] += r * r;
            dd[l] += o * r;
            mx[l] = mx[l].max(e.abs());
        }
    };
    let (xc, yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        step(a, b);
    }
    step(xr, yr);
    let mut acc = ErrorAccumulator {
        count: x.len() as u64,
        ..ErrorAccumulator::default()
    };
    for l in 0..LANES {
        acc.sum_sq_orig += oo[l];
        acc.sum_sq_err += ee[l];
        acc.sum_sq_recon += rr[l];
        acc.dot += dd[l];
        acc.max_abs_err = acc.max_abs_err.max(mx[l]);
    }
    acc
}

impl TensorMetrics {
    /// The gates these metrics fail (empty when all pass). NaN metrics fail any gate set on them.
    pub fn check_gates(&self, gates: &Gates) -> Vec<GateFailure> {
        let mut out = Vec::new();
        if let Some(max) = gates.max_rel_error {
            let ok = self.rel_fro_error <= max;
            if !ok {
                out.push(GateFailure::RelError {
                    value: self.rel_fro_error,
                    max,
                });
            }
        }
        if let Some(min) = gates.min_cosine {
            let ok = self.cosine >= min;
            if !ok {
                out.push(GateFailure::Cosine {
                    value: self.cosine,
                    min,
                });
            }
        }
        if let (Some(min), Some(value)) = (gates.min_snr_db, self.snr_db) {
            let ok = value >= min;
            if !ok {
                out.push(GateFailure::Snr { value, min });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn metrics(x: &[f32], y: &[f32]) -> TensorMetrics {
        let mut a = ErrorAccumulator::new();
        a.add(x, y);
        a.finish()
    }

    #[test]
    fn exact_reconstruction() {
        let m = metrics(&[1.0, -2.0, 3.0], &[1.0, -2.0, 3.0]);
        assert_eq!(m.rel_fro_error, 0.0);
        assert_eq!(m.snr_db, None);
        assert!((m.cosine - 1.0).abs() < 1e-15);
        assert_eq!(m.max_abs_error, 0.0);
    }

    #[test]
    fn known_values() {
        // x = (3, 4), y = (3, 3): err = (0, 1), ||x|| = 5.
        let m = metrics(&[3.0, 4.0], &[3.0, 3.0]);
        assert!((m.rel_fro_error - 0.2).abs() < 1e-15);
        assert!((m.snr_db.unwrap() - 10.0 * 25f64.log10()).abs() < 1e-12);
        assert!((m.cosine - 21.0 / (5.0 * 18f64.sqrt())).abs() < 1e-15);
        assert_eq!(m.max_abs_error, 1.0);
    }

    #[test]
    fn zero_cases() {
        let m = metrics(&[0.0; 4], &[0.0; 4]);
        assert_eq!((m.rel_fro_error, m.snr_db, m.cosine), (0.0, None, 1.0));
        let m = metrics(&[0.0; 2], &[1.0, 0.0]);
        assert_eq!(
            (m.rel_fro_error, m.snr_db, m.cosine),
            (1.0, Some(SNR_FLOOR_DB), 0.0)
        );
        let m = metrics(&[1.0, 0.0], &[0.0; 2]);
        assert_eq!((m.rel_fro_error, m.cosine), (1.0, 0.0));
        let empty = ErrorAccumulator::new().finish();
        assert_eq!((empty.rel_fro_error, empty.snr_db), (0.0, None));
    }

    #[test]
    fn mismatched_lengths_use_common_prefix() {
        let mut a = ErrorAccumulator::new();
        a.add(&[1.0, 2.0, 3.0], &[1.0]);
        assert_eq!(a.count(), 1);
    }

    #[test]
    fn gates() {
        let m = TensorMetrics {
            rel_fro_error: 0.3,
            snr_db: Some(5.0),
            cosine: 0.9,
            max_abs_error: 1.0,
        };
        let g = Gates {
            max_rel_error: Some(0.2),
            min_cosine: Some(0.95),
            min_snr_db: Some(10.0),
        };
        assert_eq!(m.check_gates(&g).len(), 3);
        assert!(m.check_gates(&Gates::default()).is_empty());
        let ok = TensorMetrics {
            rel_fro_error: 0.1,
            snr_db: None,
            cosine: 0.99,
            max_abs_error: 0.0,
        };
        assert!(ok.check_gates(&g).is_empty());
        let nan = TensorMetrics {
            rel_fro_error: f64::NAN,
            ..ok
        };
        assert_eq!(nan.check_gates(&g).len(), 1);
    }

    #[test]
    fn parallel_blocks_are_deterministic() {
        let x: Vec<f32> = (0..300_000).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = x.iter().map(|v| v + 1e-3 * (v * 13.0).cos()).collect();
        let a = metrics(&x, &y);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = pool.install(|| metrics(&x, &y));
        assert_eq!(a, b);
        // Splitting at block boundaries gives the same sums as one call.
        let mut acc = ErrorAccumulator::new();
        acc.add(&x[..BLOCK * 2], &y[..BLOCK * 2]);
        acc.add(&x[BLOCK * 2..], &y[BLOCK * 2..]);
        assert_eq!(acc.finish(), a);
    }

    proptest! {
        #[test]
        fn matches_naive_sums(pairs in prop::collection::vec((-1e3f32..1e3, -1e3f32..1e3), 1..300)) {
            let (x, y): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            let m = metrics(&x, &y);
            let (mut oo, mut ee, mut rr, mut d) = (0f64, 0f64, 0f64, 0f64);
            for (a, b) in x.iter().zip(&y) {
                let (a, b) = (f64::from(*a), f64::from(*b));
                oo += a * a; ee += (a - b) * (a - b); rr += b * b; d += a * b;
            }
            if oo > 0.0 {
                prop_assert!((m.rel_fro_error - (ee / oo).sqrt()).abs() <= 1e-9 * (1.0 + m.rel_fro_error));
            }
            if oo > 0.0 && rr > 0.0 {
                prop_assert!((m.cosine - d / (oo.sqrt() * rr.sqrt())).abs() < 1e-9);
            }
            prop_assert!((-1.0..=1.0).contains(&m.cosine));
        }
    }
}
