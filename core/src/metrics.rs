//! Reconstruction-error metrics: relative Frobenius error, SNR, cosine and max error.
//!
//! A tensor is processed in chunks (possibly on different threads or workers), so the
//! sums live in an [`ErrorAccumulator`] that chunks are added to and accumulators merged.
//! Sums are f64 and deterministic: [`ErrorAccumulator::add`] splits its input into fixed
//! 64Ki-element blocks, sums each block into 8 fixed lanes (element `i` goes to lane
//! `i % 8`), combines lanes in order, and adds the block partials to the accumulator in
//! block order. Blocks may be summed on rayon threads; the combining order never changes,
//! so the result depends only on the data and on how it was split into `add`/`merge` calls.
//! [`ErrorAccumulator::add_encoded`] takes the two buffers still encoded (BF16/F16/F32) and
//! decodes each block piecewise on the stack, with the same sums as decoding first. The
//! block sums run in an AVX2 copy when the CPU has it (same operations in the same order,
//! so the same bits; see [`crate::dtype`]). The fused RTN encode (`rtn_fused`, behind
//! [`crate::codec::encode_chunk_measured`]) feeds the same per-block lane sums while it
//! encodes, so its metrics equal `add_encoded` on its output bit for bit.
//! Quality gates from the recipe are checked with [`TensorMetrics::check_gates`].

use crate::dtype::{avx2_dispatch, decode_prefix, DType, DTypeError};
use crate::recipe::Gates;
use rayon::prelude::*;

/// Elements per block summed independently.
pub(crate) const BLOCK: usize = 64 * 1024;
/// Independent partial sums inside a block (lets the compiler vectorize).
const LANES: usize = 8;
/// Lanes summed together in one sweep (see [`LaneSums::add`]).
const HALF: usize = LANES / 2;
/// Pairs widened to f64 at a time in [`LaneSums::add`] (a multiple of `LANES`).
const WIDE: usize = 256;
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

    /// [`Self::add`] on two buffers of encoded `dtype` elements (BF16, F16 or F32), decoding
    /// them block by block instead of whole: the same sums, without two f32 copies of the
    /// data. Errors as [`crate::dtype::decode_to_f32`] (non-float dtype, a partial element, or buffers of
    /// different element counts); nothing is added then.
    pub fn add_encoded(
        &mut self,
        dtype: DType,
        original: &[u8],
        reconstructed: &[u8],
    ) -> Result<(), DTypeError> {
        if !dtype.is_decodable_float() {
            return Err(DTypeError::NotDecodable(dtype));
        }
        let size = dtype.size_bytes();
        for len in [original.len(), reconstructed.len()] {
            if len % size != 0 {
                return Err(DTypeError::RaggedBytes { dtype, len });
            }
        }
        if original.len() != reconstructed.len() {
            return Err(DTypeError::LengthMismatch {
                want: original.len() / size,
                got: reconstructed.len() / size,
            });
        }
        let partials: Vec<ErrorAccumulator> = original
            .par_chunks(BLOCK * size)
            .zip(reconstructed.par_chunks(BLOCK * size))
            .map(|(a, b)| block_sums_encoded(dtype, a, b))
            .collect();
        for p in &partials {
            self.merge(p);
        }
        Ok(())
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

/// Half of [`LaneSums`]' lanes as local arrays (one AVX2 register each), for
/// [`LaneSums::add_one_sweep`].
struct Quad {
    oo: [f64; HALF],
    ee: [f64; HALF],
    rr: [f64; HALF],
    dd: [f64; HALF],
    mx: [f64; HALF],
}

impl Quad {
    #[inline(always)]
    fn load<const OFF: usize>(s: &LaneSums) -> Self {
        let get =
            |a: &[f64; LANES]| -> [f64; HALF] { a[OFF..OFF + HALF].try_into().expect("HALF") };
        Quad {
            oo: get(&s.oo),
            ee: get(&s.ee),
            rr: get(&s.rr),
            dd: get(&s.dd),
            mx: get(&s.mx),
        }
    }

    #[inline(always)]
    fn store<const OFF: usize>(&self, s: &mut LaneSums) {
        s.oo[OFF..OFF + HALF].copy_from_slice(&self.oo);
        s.ee[OFF..OFF + HALF].copy_from_slice(&self.ee);
        s.rr[OFF..OFF + HALF].copy_from_slice(&self.rr);
        s.dd[OFF..OFF + HALF].copy_from_slice(&self.dd);
        s.mx[OFF..OFF + HALF].copy_from_slice(&self.mx);
    }

    /// Adds one pair per lane; `o * o`, `r * r` and `o * r` are exact in f64, so the FMAs
    /// round exactly like [`LaneSums::lane`]'s multiply-then-add.
    #[inline(always)]
    fn add(&mut self, a: &[f32; HALF], b: &[f32; HALF]) {
        let o: [f64; HALF] = a.map(f64::from);
        let r: [f64; HALF] = b.map(f64::from);
        for l in 0..HALF {
            let e = o[l] - r[l];
            self.oo[l] = o[l].mul_add(o[l], self.oo[l]);
            self.ee[l] += e * e;
            self.rr[l] = r[l].mul_add(r[l], self.rr[l]);
            self.dd[l] = o[l].mul_add(r[l], self.dd[l]);
            let ae = e.abs();
            self.mx[l] = if ae > self.mx[l] { ae } else { self.mx[l] };
        }
    }
}

/// The per-lane running sums of one block: element `i` of the block goes to lane `i % LANES`.
pub(crate) struct LaneSums {
    oo: [f64; LANES],
    ee: [f64; LANES],
    rr: [f64; LANES],
    dd: [f64; LANES],
    mx: [f64; LANES],
}

impl LaneSums {
    #[inline(always)]
    pub(crate) fn new() -> Self {
        LaneSums {
            oo: [0.0; LANES],
            ee: [0.0; LANES],
            rr: [0.0; LANES],
            dd: [0.0; LANES],
            mx: [0.0; LANES],
        }
    }

    /// Adds the pairs of one piece of the block that starts at a multiple of `LANES` (only
    /// the block's last piece may end with a partial group of lanes).
    ///
    /// `AVX2` (true only in code compiled with AVX2 and FMA enabled) selects a form for those
    /// registers with the same sums bit for bit: all 8 lanes in one sweep straight from f32
    /// (16 ymm registers hold the 5 x 8 sums), and `o * o`, `r * r`, `o * r` added with an
    /// FMA. The three products of f32 values are exact in f64 (48 significant bits), so
    /// `fma(o, o, s)` rounds once exactly like `s + o * o`; only `e * e` is not exact, so
    /// it keeps its multiply and add. (NaN sums stay NaN; only their payload may differ.)
    #[inline(always)]
    pub(crate) fn add<const AVX2: bool>(&mut self, x: &[f32], y: &[f32]) {
        if AVX2 {
            self.add_one_sweep(x, y);
        } else {
            self.add_staged(x, y);
        }
    }

    /// [`Self::add`] for AVX2+FMA code.
    #[inline(always)]
    fn add_one_sweep(&mut self, x: &[f32], y: &[f32]) {
        let n = x.len().min(y.len());
        let full = n / LANES * LANES;
        // Opaque to the optimizer, so the sums are loaded from memory as vectors: with
        // them known (zeros from `new` in the same function) LLVM scalarizes the loop.
        let me = std::hint::black_box(&mut *self);
        let mut lo = Quad::load::<0>(me);
        let mut hi = Quad::load::<HALF>(me);
        for (a, b) in x[..full]
            .chunks_exact(LANES)
            .zip(y[..full].chunks_exact(LANES))
        {
            lo.add(
                a[..HALF].try_into().expect("HALF"),
                b[..HALF].try_into().expect("HALF"),
            );
            hi.add(
                a[HALF..].try_into().expect("HALF"),
                b[HALF..].try_into().expect("HALF"),
            );
        }
        lo.store::<0>(self);
        hi.store::<HALF>(self);
        for (l, (&o, &r)) in x[full..n].iter().zip(&y[full..n]).enumerate() {
            self.lane(l, f64::from(o), f64::from(r));
        }
    }

    /// [`Self::add`] for baseline x86-64 (SSE2, no FMA).
    #[inline(always)]
    fn add_staged(&mut self, x: &[f32], y: &[f32]) {
        let n = x.len().min(y.len());
        let full = n / LANES * LANES;
        let (mut o, mut r) = ([0f64; WIDE], [0f64; WIDE]);
        for (xs, ys) in x[..full].chunks(WIDE).zip(y[..full].chunks(WIDE)) {
            // Widen first (a plain loop of conversions), so the lane sweeps below only see
            // contiguous f64 and vectorize without shuffles.
            let (o, r) = (&mut o[..xs.len()], &mut r[..xs.len()]);
            for (d, &s) in o.iter_mut().zip(xs) {
                *d = f64::from(s);
            }
            for (d, &s) in r.iter_mut().zip(ys) {
                *d = f64::from(s);
            }
            // Lanes are independent, so they may be swept separately; each half keeps its
            // 5 x 4 running sums in registers (all 8 lanes would not fit in SSE2's 16).
            self.half_lanes::<0>(o, r);
            self.half_lanes::<HALF>(o, r);
        }
        for (l, (&o, &r)) in x[full..n].iter().zip(&y[full..n]).enumerate() {
            self.lane(l, f64::from(o), f64::from(r));
        }
    }

    /// Adds lanes `OFF..OFF + HALF` of whole groups of `LANES` pairs.
    #[inline(always)]
    fn half_lanes<const OFF: usize>(&mut self, x: &[f64], y: &[f64]) {
        let mut oo: [f64; HALF] = self.oo[OFF..OFF + HALF].try_into().expect("HALF lanes");
        let mut ee: [f64; HALF] = self.ee[OFF..OFF + HALF].try_into().expect("HALF lanes");
        let mut rr: [f64; HALF] = self.rr[OFF..OFF + HALF].try_into().expect("HALF lanes");
        let mut dd: [f64; HALF] = self.dd[OFF..OFF + HALF].try_into().expect("HALF lanes");
        let mut mx: [f64; HALF] = self.mx[OFF..OFF + HALF].try_into().expect("HALF lanes");
        for (a, b) in x.chunks_exact(LANES).zip(y.chunks_exact(LANES)) {
            let a: &[f64; HALF] = a[OFF..OFF + HALF].try_into().expect("HALF lanes");
            let b: &[f64; HALF] = b[OFF..OFF + HALF].try_into().expect("HALF lanes");
            for l in 0..HALF {
                let (o, r) = (a[l], b[l]);
                let e = o - r;
                oo[l] += o * o;
                ee[l] += e * e;
                rr[l] += r * r;
                dd[l] += o * r;
                let ae = e.abs();
                mx[l] = if ae > mx[l] { ae } else { mx[l] };
            }
        }
        self.oo[OFF..OFF + HALF].copy_from_slice(&oo);
        self.ee[OFF..OFF + HALF].copy_from_slice(&ee);
        self.rr[OFF..OFF + HALF].copy_from_slice(&rr);
        self.dd[OFF..OFF + HALF].copy_from_slice(&dd);
        self.mx[OFF..OFF + HALF].copy_from_slice(&mx);
    }

    /// Adds the pair `(o, r)` to lane `l`.
    #[inline(always)]
    fn lane(&mut self, l: usize, o: f64, r: f64) {
        let e = o - r;
        self.oo[l] += o * o;
        self.ee[l] += e * e;
        self.rr[l] += r * r;
        self.dd[l] += o * r;
        // `mx` is never NaN, so this is `mx.max(|e|)` (a NaN `e` keeps `mx`) as one `maxpd`.
        let ae = e.abs();
        self.mx[l] = if ae > self.mx[l] { ae } else { self.mx[l] };
    }

    /// Combines the lanes in order into the block's partial sums (`count` pairs).
    pub(crate) fn finish(&self, count: usize) -> ErrorAccumulator {
        let mut acc = ErrorAccumulator {
            count: count as u64,
            ..ErrorAccumulator::default()
        };
        for l in 0..LANES {
            acc.sum_sq_orig += self.oo[l];
            acc.sum_sq_err += self.ee[l];
            acc.sum_sq_recon += self.rr[l];
            acc.dot += self.dd[l];
            acc.max_abs_err = acc.max_abs_err.max(self.mx[l]);
        }
        acc
    }
}

avx2_dispatch! {
    /// Sums one block sequentially in `LANES` fixed lanes, combined in lane order.
    fn block_sums(x: &[f32], y: &[f32]) -> ErrorAccumulator => block_sums_body::<AVX2>
}

#[inline(always)]
fn block_sums_body<const AVX2: bool>(x: &[f32], y: &[f32]) -> ErrorAccumulator {
    let mut sums = LaneSums::new();
    sums.add::<AVX2>(x, y);
    sums.finish(x.len())
}

/// Elements decoded at a time by [`block_sums_encoded`] (a multiple of `LANES`).
const PIECE: usize = 1024;

avx2_dispatch! {
    /// [`block_sums`] of one block given as encoded bytes of `dtype` (already checked:
    /// decodable, whole elements, equal lengths): decodes it piece by piece into stack
    /// buffers, so nothing is allocated.
    fn block_sums_encoded(dtype: DType, x: &[u8], y: &[u8]) -> ErrorAccumulator
        => block_sums_encoded_body::<AVX2>
}

#[inline(always)]
fn block_sums_encoded_body<const AVX2: bool>(dtype: DType, x: &[u8], y: &[u8]) -> ErrorAccumulator {
    let size = dtype.size_bytes();
    let mut sums = LaneSums::new();
    let (mut a, mut b) = ([0f32; PIECE], [0f32; PIECE]);
    for (xp, yp) in x.chunks(PIECE * size).zip(y.chunks(PIECE * size)) {
        let n = xp.len() / size;
        decode_prefix(dtype, xp, &mut a[..n]);
        decode_prefix(dtype, yp, &mut b[..n]);
        sums.add::<AVX2>(&a[..n], &b[..n]);
    }
    sums.finish(x.len() / size)
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
            ..Gates::default()
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

    #[test]
    fn add_encoded_matches_decode_then_add() {
        use crate::dtype::{decode_to_f32, encode_from_f32};
        // Several blocks, a partial last block and a ragged tail of lanes; NaN and infinity.
        let mut x: Vec<f32> = (0..BLOCK * 2 + 1003)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        x[5] = f32::NAN;
        x[BLOCK + 7] = f32::INFINITY;
        let y: Vec<f32> = x.iter().map(|v| v + 1e-2 * (v * 13.0).cos()).collect();
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            for n in [0, 1, 13, 4096, x.len()] {
                let size = dtype.size_bytes();
                let (mut xb, mut yb) = (vec![0u8; n * size], vec![0u8; n * size]);
                encode_from_f32(dtype, &x[..n], &mut xb).unwrap();
                encode_from_f32(dtype, &y[..n], &mut yb).unwrap();
                let (mut xd, mut yd) = (vec![0f32; n], vec![0f32; n]);
                decode_to_f32(dtype, &xb, &mut xd).unwrap();
                decode_to_f32(dtype, &yb, &mut yd).unwrap();
                let mut want = ErrorAccumulator::new();
                want.add(&xd, &yd);
                let mut got = ErrorAccumulator::new();
                got.add_encoded(dtype, &xb, &yb).unwrap();
                // Bitwise (NaN sums included) via the Debug form of the f64 fields.
                assert_eq!(format!("{got:?}"), format!("{want:?}"), "{dtype} n={n}");
            }
        }
        let mut acc = ErrorAccumulator::new();
        assert!(acc.add_encoded(DType::I8, &[0], &[0]).is_err());
        assert!(acc.add_encoded(DType::BF16, &[0; 3], &[0; 3]).is_err());
        assert!(acc.add_encoded(DType::BF16, &[0; 4], &[0; 2]).is_err());
        assert_eq!(acc.count(), 0);
    }

    #[test]
    fn baseline_and_avx2_sums_agree() {
        use crate::dtype::{encode_from_f32, with_baseline};
        let mut x: Vec<f32> = (0..BLOCK + 4099)
            .map(|i| (i as f32 * 0.37).sin() * 1e3)
            .collect();
        x[11] = 3e38;
        x[BLOCK + 3] = 1e-42;
        let y: Vec<f32> = (0..x.len())
            .map(|i| x[i] + 1e-2 * (i as f32 * 0.7).cos())
            .collect();
        let run = || {
            let mut plain = ErrorAccumulator::new();
            plain.add(&x, &y);
            let mut xb = vec![0u8; x.len() * 2];
            let mut yb = vec![0u8; y.len() * 2];
            encode_from_f32(DType::BF16, &x, &mut xb).unwrap();
            encode_from_f32(DType::BF16, &y, &mut yb).unwrap();
            let mut enc = ErrorAccumulator::new();
            enc.add_encoded(DType::BF16, &xb, &yb).unwrap();
            (plain, enc)
        };
        let (fast, base) = (run(), with_baseline(run));
        // Bitwise (NaN sums are covered by the fused-encode tests).
        assert_eq!(fast, base);
        assert!(fast.0.sum_sq_orig > 1e76 && fast.1.max_abs_err > 0.0);
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
