//! [`HessianAccumulator`]: the running sum `S = Σ x xᵀ` over a Linear's input rows `x`, in
//! f64, kept as its upper triangle, plus the number of rows summed.
//!
//! Workers add calibration batches with [`HessianAccumulator::add_rows`] (a blocked
//! `XᵀX` through matrixmultiply's dgemm, split over strips of output rows in parallel: each
//! strip is written by one task, so the bits do not depend on the thread count), ship the
//! sums as bytes ([`HessianAccumulator::to_bytes`]) and the partial sums are added in a fixed
//! order ([`HessianAccumulator::merge`]). f64 addition is not associative: the same rows
//! summed in a different grouping (other batches, another merge order) may differ in the last
//! bits, so the pipeline fixes both.
//!
//! Byte layout (little-endian): magic `SPHESSIA` (8 bytes), version `u32` (1), `n: u64`,
//! `rows: u64`, then the `n(n+1)/2` values of the upper triangle row by row as f64
//! (`S_00 .. S_0(n-1), S_11 .. S_1(n-1), ...`). [`HessianAccumulator::from_bytes`] checks the
//! length against `n` before allocating anything, and that every value is finite, diagonal
//! values are not negative and an accumulator of zero rows is all zeros.
//! [`SerializedHessian`] and [`HessianAccumulator::add_serialized_values`] add serialized
//! bytes to a sum piece by piece, with the same checks, so a worker summing the batches of a
//! wide Linear holds its sum and one piece of the next batch, never a second triangle.

use super::linalg::{dgemm, View};
use super::CalibratedError;
use rayon::prelude::*;

/// The first 8 bytes of a serialized accumulator.
const MAGIC: [u8; 8] = *b"SPHESSIA";
/// The layout version written (and the only one read).
const VERSION: u32 = 1;
/// Bytes before the values: magic, version, n, rows.
const HEADER_LEN: usize = 8 + 4 + 8 + 8;
/// Input rows converted to f64 and multiplied at once (bounds the working copy).
const CHUNK_ROWS: usize = 256;
/// Output rows of `S` per parallel task.
const STRIP: usize = 32;

/// Sum of `x xᵀ` over the input rows `x` (length `n`) seen so far, in f64, and their count.
#[derive(Debug, Clone, PartialEq)]
pub struct HessianAccumulator {
    n: usize,
    rows: u64,
    /// The upper triangle of `S`, row by row: row `i` holds `S_ii .. S_i(n-1)`.
    upper: Vec<f64>,
}

/// Offset of row `i`'s first element (`S_ii`) in the packed upper triangle of an `n × n`.
pub(crate) fn row_offset(n: usize, i: usize) -> usize {
    // Σ_{k<i} (n - k)
    i * n - i * i.saturating_sub(1) / 2
}

/// Bytes of a serialized accumulator a reader adds to a sum at once
/// ([`HessianAccumulator::add_serialized_values`]): summing a batch into a wide Linear's sum
/// holds the sum and one such piece.
pub const SERIALIZED_PIECE_BYTES: u64 = 64 << 20;

/// The header of a serialized accumulator ([`HessianAccumulator::to_bytes`]), read before its
/// values so that a sum can add them piece by piece
/// ([`HessianAccumulator::add_serialized_values`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerializedHessian {
    pub n: usize,
    pub rows: u64,
}

impl SerializedHessian {
    /// Bytes before the values: magic, version, `n`, rows.
    pub const HEADER_LEN: usize = HEADER_LEN;

    /// Parses the first [`Self::HEADER_LEN`] bytes of a serialized accumulator of `total_len`
    /// bytes: the magic, the version, and a length that is exactly what `n` implies.
    pub fn parse(header: &[u8], total_len: u64) -> Result<SerializedHessian, CalibratedError> {
        let bad = |m: String| Err(CalibratedError::BadBytes(m));
        if header.len() < HEADER_LEN || total_len < HEADER_LEN as u64 {
            return bad(format!(
                "{total_len} bytes is shorter than the {HEADER_LEN}-byte header"
            ));
        }
        if header[..8] != MAGIC {
            return bad("the magic is not SPHESSIA".into());
        }
        let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().expect("8 bytes"));
        let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return bad(format!("version {version} is not the supported {VERSION}"));
        }
        let (n, rows) = (u64_at(12), u64_at(20));
        let expected = (n.checked_add(1).and_then(|m| m.checked_mul(n)))
            .map(|v| v / 2)
            .and_then(|v| v.checked_mul(8))
            .and_then(|b| b.checked_add(HEADER_LEN as u64));
        let n = usize::try_from(n).ok();
        match (n, expected) {
            (Some(n), Some(expected)) if expected == total_len => Ok(SerializedHessian { n, rows }),
            _ => bad(format!(
                "{total_len} bytes do not hold the upper triangle of a {}x{0} Hessian",
                u64_at(12)
            )),
        }
    }

    /// Values in the triangle.
    pub fn values(&self) -> usize {
        self.n * (self.n + 1) / 2
    }
}

/// Checks `bytes`, values `first ..` of the triangle of the serialized accumulator `from`:
/// whole values within the triangle, every value finite, diagonal entries not negative, all
/// zero when it saw no rows.
fn check_serialized_values(
    from: &SerializedHessian,
    first: usize,
    bytes: &[u8],
) -> Result<(), CalibratedError> {
    let bad = |m: String| Err(CalibratedError::BadBytes(m));
    let (n, count) = (from.n, bytes.len() / 8);
    if bytes.len() % 8 != 0 || first.checked_add(count).is_none_or(|e| e > from.values()) {
        return bad(format!(
            "{} bytes at value {first} run past the {} values of the triangle",
            bytes.len(),
            from.values()
        ));
    }
    let values = |i: usize| f64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().expect("8"));
    if let Some(i) = (0..count).find(|&i| !values(i).is_finite()) {
        return bad(format!(
            "value {} of the upper triangle is {}",
            first + i,
            values(i)
        ));
    }
    // The diagonal entries among these values: rows from the one holding `first`.
    let (mut row, mut above) = (0, n);
    while above - row > 1 {
        let mid = (row + above) / 2;
        if row_offset(n, mid) <= first {
            row = mid;
        } else {
            above = mid;
        }
    }
    while row < n && row_offset(n, row) < first + count {
        let at = row_offset(n, row);
        if at >= first && values(at - first) < 0.0 {
            return bad(format!(
                "diagonal entry {row} is negative ({})",
                values(at - first)
            ));
        }
        row += 1;
    }
    if from.rows == 0 && (0..count).any(|i| values(i) != 0.0) {
        return bad("zero rows seen but the sums are not zero".into());
    }
    Ok(())
}

impl HessianAccumulator {
    /// An empty accumulator for inputs of length `n`.
    pub fn new(n: usize) -> Self {
        HessianAccumulator {
            n,
            rows: 0,
            upper: vec![0.0; n * (n + 1) / 2],
        }
    }

    /// Adds the input rows in `rows` (row-major, each of length `n`) to the sum.
    ///
    /// Errors: `n` differs from [`Self::dim`], `rows.len()` is not a multiple of `n`, or an
    /// input is NaN or infinite (nothing is added then).
    pub fn add_rows(&mut self, rows: &[f32], n: usize) -> Result<(), CalibratedError> {
        if n != self.n {
            return Err(CalibratedError::ShapeMismatch(format!(
                "input rows of {n} values for a Hessian of dimension {}",
                self.n
            )));
        }
        if n == 0 || rows.len() % n != 0 {
            return Err(CalibratedError::ShapeMismatch(format!(
                "{} values do not form whole input rows of {n}",
                rows.len()
            )));
        }
        if let Some(i) = rows.iter().position(|x| !x.is_finite()) {
            return Err(CalibratedError::NonFinite(format!(
                "input row {} column {} is {}",
                i / n,
                i % n,
                rows[i]
            )));
        }
        for chunk in rows.chunks(CHUNK_ROWS * n) {
            let x: Vec<f64> = chunk.iter().map(|&v| f64::from(v)).collect();
            self.add_gram(&x, chunk.len() / n);
        }
        self.rows += (rows.len() / n) as u64;
        Ok(())
    }

    /// `upper += upper triangle of XᵀX` for `X` (`m × n`, row-major f64).
    fn add_gram(&mut self, x: &[f64], m: usize) {
        let n = self.n;
        // Split the packed triangle into strips of STRIP rows, each owned by one task.
        let mut strips = Vec::with_capacity(n.div_ceil(STRIP));
        let mut rest: &mut [f64] = &mut self.upper;
        for i0 in (0..n).step_by(STRIP) {
            let i1 = (i0 + STRIP).min(n);
            let len = row_offset(n, i1) - row_offset(n, i0);
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
            strips.push((i0, i1, head));
            rest = tail;
        }
        strips.into_par_iter().for_each(|(i0, i1, strip)| {
            let (h, w) = (i1 - i0, n - i0);
            let mut tmp = vec![0.0; h * w];
            // tmp[a][b] = Σ_k X[k][i0 + a] · X[k][i0 + b]: A = Xᵀ (strided), B = X.
            let cols = &x[i0..];
            dgemm(
                h,
                m,
                w,
                1.0,
                View::new(cols, 1, n),
                View::new(cols, n, 1),
                0.0,
                &mut tmp,
                w,
            );
            let mut off = 0;
            for a in 0..h {
                let row = &mut strip[off..off + (w - a)];
                for (s, t) in row.iter_mut().zip(&tmp[a * w + a..(a + 1) * w]) {
                    *s += t;
                }
                off += w - a;
            }
        });
    }

    /// Adds another accumulator's sums and row count (the partial sums of other batches).
    pub fn merge(&mut self, other: &HessianAccumulator) -> Result<(), CalibratedError> {
        if other.n != self.n {
            return Err(CalibratedError::ShapeMismatch(format!(
                "cannot merge a Hessian of dimension {} into one of dimension {}",
                other.n, self.n
            )));
        }
        let rows = self.rows.checked_add(other.rows).ok_or_else(|| {
            CalibratedError::BadConfig("the merged row count overflows u64".into())
        })?;
        self.upper
            .par_iter_mut()
            .zip(other.upper.par_iter())
            .for_each(|(a, b)| *a += b);
        self.rows = rows;
        Ok(())
    }

    /// Adds `bytes`, values `first ..` of the triangle of the serialized accumulator whose
    /// header is `from`, to this sum, checking them as [`Self::from_bytes`] does (finite,
    /// diagonal not negative, all zero when it saw no rows). Call
    /// [`Self::add_serialized_rows`] once all its values are added. An error leaves the sum
    /// partly added: the caller discards it.
    pub fn add_serialized_values(
        &mut self,
        from: &SerializedHessian,
        first: usize,
        bytes: &[u8],
    ) -> Result<(), CalibratedError> {
        if from.n != self.n {
            return Err(CalibratedError::ShapeMismatch(format!(
                "cannot merge a Hessian of dimension {} into one of dimension {}",
                from.n, self.n
            )));
        }
        check_serialized_values(from, first, bytes)?;
        let count = bytes.len() / 8;
        let values = |i: usize| f64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().expect("8"));
        self.upper[first..first + count]
            .par_iter_mut()
            .enumerate()
            .for_each(|(i, a)| *a += values(i));
        Ok(())
    }

    /// Counts the rows of the serialized accumulator `from`, whose values were all added by
    /// [`Self::add_serialized_values`].
    pub fn add_serialized_rows(&mut self, from: &SerializedHessian) -> Result<(), CalibratedError> {
        self.rows = self.rows.checked_add(from.rows).ok_or_else(|| {
            CalibratedError::BadConfig("the merged row count overflows u64".into())
        })?;
        Ok(())
    }

    /// Input rows summed so far.
    pub fn rows_seen(&self) -> u64 {
        self.rows
    }

    /// The input length `n` (the Hessian is `n × n`).
    pub fn dim(&self) -> usize {
        self.n
    }

    /// The serialized accumulator (see the module doc for the layout).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.upper.len() * 8);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.n as u64).to_le_bytes());
        out.extend_from_slice(&self.rows.to_le_bytes());
        for v in &self.upper {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Parses [`Self::to_bytes`]' output, treating `bytes` as hostile: the length must be
    /// exactly what the header's `n` implies (checked before allocating), values finite,
    /// diagonal values not negative, and a zero row count must come with all-zero sums.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CalibratedError> {
        let from = SerializedHessian::parse(bytes, bytes.len() as u64)?;
        let values = &bytes[HEADER_LEN..];
        check_serialized_values(&from, 0, values)?;
        let upper: Vec<f64> = values
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok(HessianAccumulator {
            n: from.n,
            rows: from.rows,
            upper,
        })
    }

    /// The full `n × n` Hessian, row-major: `H = 2/rows · Σ x xᵀ` (the normalisation of the
    /// GPTQ reference; all zeros when no rows were seen). The methods' results do not
    /// depend on the factor (damping is relative to the mean diagonal); the proxy losses do.
    /// This is a dense `n × n` copy (6.6 GB at n = 28672): the methods do not use it, they
    /// read the packed triangle.
    pub fn hessian(&self) -> Vec<f64> {
        let n = self.n;
        let factor = self.normalisation();
        let mut h = vec![0.0; n * n];
        h.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
            for (j, v) in row.iter_mut().enumerate() {
                let (a, b) = if i <= j { (i, j) } else { (j, i) };
                *v = factor * self.upper[row_offset(n, a) + (b - a)];
            }
        });
        h
    }

    /// The packed upper triangle of `S` (unnormalised), row by row: row `i` holds
    /// `S_ii .. S_i(n-1)` from [`row_offset`]`(n, i)` on.
    pub(crate) fn packed_upper(&self) -> &[f64] {
        &self.upper
    }

    /// The packed upper triangle of `S`, taken out of the accumulator (which is used up):
    /// a SOLVE factors it in place.
    pub(crate) fn into_packed_upper(self) -> Vec<f64> {
        self.upper
    }

    /// The factor taking `S` to the normalised `H` of [`Self::hessian`]: `2 / rows` (0
    /// when no rows were seen).
    pub(crate) fn normalisation(&self) -> f64 {
        if self.rows == 0 {
            0.0
        } else {
            2.0 / self.rows as f64
        }
    }

    /// `‖X_j‖₂` for every input column `j` over all rows seen: `sqrt(S_jj)` (Wanda's norms).
    pub fn column_norms(&self) -> Vec<f64> {
        (0..self.n)
            .map(|j| self.upper[row_offset(self.n, j)].sqrt())
            .collect()
    }

    /// The diagonal of `S` (unnormalised).
    pub(crate) fn raw_diagonal(&self) -> Vec<f64> {
        (0..self.n)
            .map(|j| self.upper[row_offset(self.n, j)])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{correlated_inputs, hessian_of};
    use super::*;

    #[test]
    fn accumulator_matches_the_definition_and_merges_halves() {
        let n = 45; // strips of the triangle are 32 rows: a partial one
        let x = correlated_inputs(600, n, 21);
        let all = hessian_of(&x, n);
        let (first, second) = x.split_at(300 * n);
        let mut merged = hessian_of(first, n);
        merged.merge(&hessian_of(second, n)).unwrap();
        assert_eq!(merged.rows_seen(), 600);
        let (h, hm) = (all.hessian(), merged.hessian());
        for i in 0..n {
            for j in 0..n {
                let want: f64 = 2.0 / 600.0
                    * x.chunks(n)
                        .map(|r| f64::from(r[i]) * f64::from(r[j]))
                        .sum::<f64>();
                let tol = 1e-12 * (h[i * n + i] * h[j * n + j]).sqrt();
                assert!((h[i * n + j] - want).abs() <= tol, "({i},{j})");
                assert!((hm[i * n + j] - want).abs() <= tol, "({i},{j}) merged");
                assert_eq!(h[i * n + j], h[j * n + i]);
            }
        }
        let norms = all.column_norms();
        for (j, norm) in norms.iter().enumerate() {
            let want = x
                .chunks(n)
                .map(|r| f64::from(r[j]).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!((norm - want).abs() <= 1e-12 * want);
        }
        // Small integers: every sum is exact, so halves + merge equal one pass bit for bit
        // (more rows than one internal chunk, too).
        let ints: Vec<f32> = (0..700 * n)
            .map(|i| ((i * 7919 % 13) as f32) - 6.0)
            .collect();
        let once = hessian_of(&ints, n);
        let mut halves = hessian_of(&ints[..350 * n], n);
        halves.merge(&hessian_of(&ints[350 * n..], n)).unwrap();
        assert_eq!(once, halves);
    }

    #[test]
    fn accumulator_bytes_round_trip_and_hostile_bytes_are_refused() {
        let n = 9;
        let acc = hessian_of(&correlated_inputs(50, n, 2), n);
        let bytes = acc.to_bytes();
        assert_eq!(bytes.len(), 28 + n * (n + 1) / 2 * 8);
        assert_eq!(HessianAccumulator::from_bytes(&bytes).unwrap(), acc);
        for len in 0..bytes.len() {
            assert!(
                matches!(
                    HessianAccumulator::from_bytes(&bytes[..len]),
                    Err(CalibratedError::BadBytes(_))
                ),
                "truncated to {len}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(HessianAccumulator::from_bytes(&longer).is_err());
        let patched = |at: usize, with: &[u8]| {
            let mut b = bytes.clone();
            b[at..at + with.len()].copy_from_slice(with);
            HessianAccumulator::from_bytes(&b)
        };
        let refused = |r: Result<HessianAccumulator, CalibratedError>, what: &str| match r {
            Err(CalibratedError::BadBytes(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("{what}: {other:?}"),
        };
        refused(patched(0, b"X"), "magic");
        refused(patched(8, &2u32.to_le_bytes()), "version");
        // A huge n with few bytes: refused from the length alone, nothing allocated.
        refused(patched(12, &u64::MAX.to_le_bytes()), "upper triangle");
        refused(patched(12, &(1u64 << 31).to_le_bytes()), "upper triangle");
        refused(patched(28, &f64::NAN.to_le_bytes()), "value 0");
        refused(patched(28 + 8, &f64::INFINITY.to_le_bytes()), "value 1");
        refused(patched(28, &(-1.0f64).to_le_bytes()), "negative");
        refused(patched(20, &0u64.to_le_bytes()), "zero rows");
        let empty = HessianAccumulator::new(3);
        assert_eq!(
            HessianAccumulator::from_bytes(&empty.to_bytes()).unwrap(),
            empty
        );
    }

    /// Adds `bytes` (a whole serialized accumulator) to `sum` in pieces of `piece` values.
    fn add_in_pieces(
        sum: &mut HessianAccumulator,
        bytes: &[u8],
        piece: usize,
    ) -> Result<(), CalibratedError> {
        let from =
            SerializedHessian::parse(&bytes[..HEADER_LEN.min(bytes.len())], bytes.len() as u64)?;
        let values = &bytes[HEADER_LEN..];
        for (k, chunk) in values.chunks(8 * piece).enumerate() {
            sum.add_serialized_values(&from, k * piece, chunk)?;
        }
        sum.add_serialized_rows(&from)
    }

    #[test]
    fn serialized_accumulators_add_piece_by_piece_as_merge_does_and_hostile_pieces_are_refused() {
        let n = 11;
        let a = hessian_of(&correlated_inputs(40, n, 3), n);
        let b = hessian_of(&correlated_inputs(60, n, 4), n);
        let mut merged = a.clone();
        merged.merge(&b).unwrap();
        for piece in [1, 5, 11, 12, 65, 1000] {
            let mut sum = a.clone();
            add_in_pieces(&mut sum, &b.to_bytes(), piece).unwrap();
            assert_eq!(sum, merged, "pieces of {piece}");
        }
        let bytes = b.to_bytes();
        let patched = |at: usize, with: &[u8]| {
            let mut p = bytes.clone();
            p[at..at + with.len()].copy_from_slice(with);
            let mut sum = a.clone();
            add_in_pieces(&mut sum, &p, 4)
        };
        let refused = |r: Result<(), CalibratedError>, what: &str| match r {
            Err(CalibratedError::BadBytes(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("{what}: {other:?}"),
        };
        refused(patched(0, b"X"), "magic");
        refused(patched(8, &2u32.to_le_bytes()), "version");
        refused(patched(12, &u64::MAX.to_le_bytes()), "upper triangle");
        refused(patched(28 + 8 * 5, &f64::NAN.to_le_bytes()), "value 5");
        // Row 3's diagonal entry, in a later piece than the first.
        let diagonal = row_offset(n, 3);
        refused(
            patched(28 + 8 * diagonal, &(-1.0f64).to_le_bytes()),
            "diagonal entry 3",
        );
        refused(patched(20, &0u64.to_le_bytes()), "zero rows");
        // Another dimension; values past the triangle.
        let other = hessian_of(&correlated_inputs(10, 5, 1), 5).to_bytes();
        let mut sum = a.clone();
        assert!(matches!(
            add_in_pieces(&mut sum, &other, 4),
            Err(CalibratedError::ShapeMismatch(_))
        ));
        let from = SerializedHessian::parse(&bytes[..HEADER_LEN], bytes.len() as u64).unwrap();
        let mut sum = a.clone();
        refused(
            sum.add_serialized_values(&from, from.values() - 1, &[0u8; 16]),
            "run past",
        );
        refused(sum.add_serialized_values(&from, 0, &[0u8; 7]), "run past");
    }
}
