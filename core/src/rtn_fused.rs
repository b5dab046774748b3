//! Fused round-to-nearest encode of a dense chunk: decode, quantize, dequantize, encode the
//! reconstruction and (optionally) accumulate the error metrics in one pass over the input.
//!
//! The general path of [`crate::codec::encode_chunk`] decodes the whole chunk to an f32
//! vector, quantizes it in place ([`crate::quantize::rtn_codes_dequantize`]), encodes the
//! reconstruction back to the input dtype, and the pipeline then decodes input and
//! reconstruction once more for the metrics: several passes over chunk-sized buffers that do
//! not fit in cache. For a plan with no structure pass and an RTN values pass with per-group
//! or per-channel granularity (groups of at most [`BLOCK`] elements, BF16/F16/F32 input)
//! the codec runs [`encode`] instead:
//!
//! - the chunk is split into *blocks* of [`BLOCK`] elements (exactly the metrics' blocks);
//!   each block writes its codes, reconstruction bytes and the scales and zero points of the
//!   groups that *start* in it straight into their final buffers. On a multi-thread pool
//!   the blocks run in parallel on zeroed chunk-sized outputs ([`Slices`]); on one thread
//!   they run in order and grow the outputs piece by piece ([`Growing`]), so no separate
//!   zero-fill pass over the chunk's memory is needed;
//! - a block is walked in *pieces* of [`PIECE`] elements staged in stack buffers: decode the
//!   piece, quantize each group segment in it, encode the reconstruction into the output, and
//!   add (original, decoded reconstruction) to the block's lane sums;
//! - a group's scale comes from a range scan of the whole group: of the decoded piece when
//!   the group lies inside it, else of the group's input bytes decoded piecewise (they are
//!   then in cache for the quantize step). A group straddling two blocks is scanned by both
//!   (at most one extra scan of one group per block boundary).
//!
//! Bit-identical to the general path: the same scans (min/max are exact, so the piecewise
//! combination equals the whole-group scan), the same [`crate::quantize::params_from_range`],
//! the same dtype codecs, and the same [`LaneSums`] fed element by element in the same order
//! within the same blocks, merged in block order as [`ErrorAccumulator::add_encoded`] does.
//! The per-element codes come from [`crate::quantize::rtn_group_codes_dequantize_to`], which
//! multiplies by `1/scale` instead of dividing but redoes with the division any 64 values
//! where that could change a code. The body of a block runs in an AVX2+FMA copy when the
//! CPU has both (see [`crate::dtype`]): the same IEEE operations, FMAs only where they round
//! exactly like the multiply-add they replace. The tests compare both copies against the
//! general path on random and hostile data (NaN, infinities, subnormals, huge values).

use crate::dtype::{self, DType};
use crate::metrics::{ErrorAccumulator, LaneSums, BLOCK};
use crate::quantize::{
    abs_max, check_bits, group_params, layout, min_max, params_from_range,
    rtn_group_codes_dequantize_to, CodeKernel, GroupParams,
};
use crate::recipe::{Granularity, QuantizeConfig};
use rayon::prelude::*;

/// Elements staged per step inside a block (a multiple of the metrics' lanes, so every piece
/// but a block's last starts its lane sums at lane 0). Three f32 buffers of it stay in L1.
const PIECE: usize = 1024;

/// Rows and groups of a chunk: rows of `row_len`, each split into `groups_per_row` groups of
/// `group_len` (the last of a row may be shorter), numbered row-major.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    row_len: usize,
    group_len: usize,
    groups_per_row: usize,
}

/// One group: its index and element range `[start, end)` in the chunk.
#[derive(Debug, Clone, Copy)]
struct Group {
    index: usize,
    start: usize,
    end: usize,
}

impl Geometry {
    fn new(row_len: usize, group_len: usize) -> Self {
        Geometry {
            row_len,
            group_len,
            groups_per_row: row_len.div_ceil(group_len),
        }
    }

    /// Number of groups that start before element `i`.
    fn groups_before(&self, i: usize) -> usize {
        i / self.row_len * self.groups_per_row + (i % self.row_len).div_ceil(self.group_len)
    }

    /// The group numbered `index`.
    #[inline]
    fn group(&self, index: usize) -> Group {
        let (row, j) = (index / self.groups_per_row, index % self.groups_per_row);
        let offset = j * self.group_len;
        let start = row * self.row_len + offset;
        Group {
            index,
            start,
            end: start + self.group_len.min(self.row_len - offset),
        }
    }

    /// The group containing element `i`.
    fn containing(&self, i: usize) -> Group {
        let j = (i % self.row_len) / self.group_len;
        self.group(i / self.row_len * self.groups_per_row + j)
    }
}

/// `(row_len, group_len)` of the codes when the fused path applies to `len` elements of
/// `dtype` in rows of `row_len` under `cfg`; `None` sends the chunk to the general path
/// (per-tensor granularity, groups longer than [`BLOCK`], bad bits or shapes, which the
/// general path reports as errors, and empty chunks).
pub(crate) fn fused_layout(
    cfg: &QuantizeConfig,
    dtype: DType,
    len: usize,
    row_len: usize,
) -> Option<(usize, usize)> {
    let shape_ok = row_len > 0 && len > 0 && len % row_len == 0;
    if !dtype.is_decodable_float() || check_bits(cfg.bits).is_err() || !shape_ok {
        return None;
    }
    if cfg.granularity == Granularity::Tensor {
        return None;
    }
    let (row_len, group_len) = layout(cfg.granularity, len, row_len);
    (group_len <= BLOCK).then_some((row_len, group_len))
}

/// What [`encode`] produced: the fields of [`crate::quantize::AffineCodes`], the
/// reconstruction in the input dtype, and the metrics' per-block partial sums.
pub(crate) struct FusedRtn {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub zeros: Vec<f32>,
    /// Empty unless asked for.
    pub reconstruction: Vec<u8>,
    /// One per block, in block order (empty unless metrics were asked for): merging them in
    /// order is exactly [`ErrorAccumulator::add_encoded`] of (input, reconstruction).
    pub metrics: Vec<ErrorAccumulator>,
}

/// One block's work: its range, the scales and zero points of the groups starting in it,
/// and where its codes and reconstruction go.
struct Block<'a, O> {
    /// Element range `[start, end)` in the chunk.
    start: usize,
    end: usize,
    /// Index of the first group starting in the block (`scales[0]` is its scale).
    first_group: usize,
    scales: &'a mut [f32],
    zeros: &'a mut [f32],
    out: O,
}

/// Where a block writes its codes and reconstruction bytes.
trait Outputs {
    /// The codes and reconstruction bytes of the block's elements `[start, end)` (relative
    /// to the block, visited in order), `size` bytes per reconstructed element.
    fn piece(&mut self, start: usize, end: usize, size: usize) -> (&mut [u8], &mut [u8]);
}

/// A block's share of chunk-sized output buffers (for blocks run in parallel).
struct Slices<'a> {
    codes: &'a mut [u8],
    reconstruction: &'a mut [u8],
}

impl Outputs for Slices<'_> {
    #[inline(always)]
    fn piece(&mut self, start: usize, end: usize, size: usize) -> (&mut [u8], &mut [u8]) {
        (
            &mut self.codes[start..end],
            &mut self.reconstruction[start * size..end * size],
        )
    }
}

/// The chunk's output vectors, grown piece by piece (for blocks run in order), so the
/// zero-fill of each piece happens in cache right before it is overwritten instead of in
/// a separate pass over the whole chunk's memory.
struct Growing<'a> {
    codes: &'a mut Vec<u8>,
    reconstruction: &'a mut Vec<u8>,
    /// The block's first element.
    base: usize,
}

impl Outputs for Growing<'_> {
    #[inline(always)]
    fn piece(&mut self, start: usize, end: usize, size: usize) -> (&mut [u8], &mut [u8]) {
        let (start, end) = (self.base + start, self.base + end);
        self.codes.resize(end, 0);
        self.reconstruction.resize(end * size, 0);
        (
            &mut self.codes[start..end],
            &mut self.reconstruction[start * size..end * size],
        )
    }
}

/// RTN-encodes `input` (whole rows of `dtype`) with the `(row_len, group_len)` returned by
/// [`fused_layout`]; with `metrics`, also returns the per-block error sums, and with
/// `keep_reconstruction` the reconstruction (else only rounded through the dtype in cache,
/// for the metrics).
pub(crate) fn encode(
    cfg: &QuantizeConfig,
    dtype: DType,
    (row_len, group_len): (usize, usize),
    input: &[u8],
    metrics: bool,
    keep_reconstruction: bool,
) -> FusedRtn {
    // Outputs hold reconstruction bytes of `kept` bytes per element (none when not kept).
    let kept = if keep_reconstruction {
        dtype.size_bytes()
    } else {
        0
    };
    let size = dtype.size_bytes();
    let len = input.len() / size;
    let geo = Geometry::new(row_len, group_len);
    let groups = len / row_len * geo.groups_per_row;
    let mut scales = vec![0f32; groups];
    let mut zeros = vec![0f32; groups];
    let job = Job {
        cfg,
        geo,
        input,
        dtype,
        metrics,
        kept,
        avx2: dtype::has_avx2(),
    };
    let block_range = |start: usize| {
        let end = (start + BLOCK).min(len);
        (end, geo.groups_before(start), geo.groups_before(end))
    };
    let (codes, reconstruction, partials) = if rayon::current_num_threads() == 1 || len <= BLOCK {
        // One thread: blocks in order, growing the outputs (see [`Growing`]).
        let mut codes = Vec::with_capacity(len);
        let mut reconstruction = Vec::with_capacity(len * kept);
        let mut partials = Vec::new();
        let mut start = 0;
        while start < len {
            let (end, first_group, next_group) = block_range(start);
            partials.push(job.run(Block {
                start,
                end,
                first_group,
                scales: &mut scales[first_group..next_group],
                zeros: &mut zeros[first_group..next_group],
                out: Growing {
                    codes: &mut codes,
                    reconstruction: &mut reconstruction,
                    base: start,
                },
            }));
            start = end;
        }
        (codes, reconstruction, partials)
    } else {
        let mut codes = vec![0u8; len];
        let mut reconstruction = vec![0u8; len * kept];
        let mut blocks = Vec::with_capacity(len.div_ceil(BLOCK));
        let (mut c, mut r) = (&mut codes[..], &mut reconstruction[..]);
        let (mut s, mut z) = (&mut scales[..], &mut zeros[..]);
        let mut start = 0;
        while start < len {
            let (end, first_group, next_group) = block_range(start);
            let (bc, rest) = std::mem::take(&mut c).split_at_mut(end - start);
            c = rest;
            let (br, rest) = std::mem::take(&mut r).split_at_mut((end - start) * kept);
            r = rest;
            let (bs, rest) = std::mem::take(&mut s).split_at_mut(next_group - first_group);
            s = rest;
            let (bz, rest) = std::mem::take(&mut z).split_at_mut(next_group - first_group);
            z = rest;
            blocks.push(Block {
                start,
                end,
                first_group,
                scales: bs,
                zeros: bz,
                out: Slices {
                    codes: bc,
                    reconstruction: br,
                },
            });
            start = end;
        }
        let partials: Vec<_> = blocks.into_par_iter().map(|b| job.run(b)).collect();
        (codes, reconstruction, partials)
    };
    FusedRtn {
        codes,
        scales,
        zeros,
        reconstruction,
        metrics: partials.into_iter().flatten().collect(),
    }
}

/// An input dtype's codec, inlined into the block body.
pub(crate) trait Elem {
    const SIZE: usize;
    fn decode(bytes: &[u8], out: &mut [f32]);
    fn encode(src: &[f32], out: &mut [u8]);
}

pub(crate) struct Bf16;
pub(crate) struct F16;
pub(crate) struct F32;

impl Elem for Bf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn decode(bytes: &[u8], out: &mut [f32]) {
        dtype::decode_bf16(bytes, out)
    }
    #[inline(always)]
    fn encode(src: &[f32], out: &mut [u8]) {
        dtype::encode_bf16(src, out)
    }
}

impl Elem for F16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn decode(bytes: &[u8], out: &mut [f32]) {
        dtype::decode_f16(bytes, out)
    }
    #[inline(always)]
    fn encode(src: &[f32], out: &mut [u8]) {
        dtype::encode_f16(src, out)
    }
}

impl Elem for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn decode(bytes: &[u8], out: &mut [f32]) {
        dtype::decode_f32(bytes, out)
    }
    #[inline(always)]
    fn encode(src: &[f32], out: &mut [u8]) {
        dtype::encode_f32(src, out)
    }
}

/// What every block shares.
struct Job<'a> {
    cfg: &'a QuantizeConfig,
    geo: Geometry,
    input: &'a [u8],
    dtype: DType,
    /// Whether to return the blocks' error sums.
    metrics: bool,
    /// Reconstruction bytes kept per element: the dtype's size, or 0.
    kept: usize,
    /// From [`dtype::has_avx2`]: run the blocks' AVX2+FMA copy.
    avx2: bool,
}

/// Runs [`Job::block`] in its AVX2+FMA copy.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
fn block_avx2<E: Elem, const METRICS: bool, O: Outputs>(
    job: &Job<'_>,
    b: Block<'_, O>,
) -> Option<ErrorAccumulator> {
    job.block::<E, METRICS, O, true>(b)
}

impl Job<'_> {
    /// Encodes block `b`; returns its error sums if the job wants metrics.
    fn run<O: Outputs>(&self, b: Block<'_, O>) -> Option<ErrorAccumulator> {
        match (self.dtype, self.metrics) {
            (DType::BF16, true) => self.dispatch::<Bf16, true, O>(b),
            (DType::BF16, false) => self.dispatch::<Bf16, false, O>(b),
            (DType::F16, true) => self.dispatch::<F16, true, O>(b),
            (DType::F16, false) => self.dispatch::<F16, false, O>(b),
            (_, true) => self.dispatch::<F32, true, O>(b),
            (_, false) => self.dispatch::<F32, false, O>(b),
        }
    }

    fn dispatch<E: Elem, const METRICS: bool, O: Outputs>(
        &self,
        b: Block<'_, O>,
    ) -> Option<ErrorAccumulator> {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        if self.avx2 {
            // SAFETY: `block_avx2` only needs AVX2 and FMA, and `self.avx2` comes from
            // `dtype::has_avx2()`, which confirmed the running CPU supports both.
            return unsafe { block_avx2::<E, METRICS, O>(self, b) };
        }
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        let _ = self.avx2;
        self.block::<E, METRICS, O, false>(b)
    }

    /// Encodes one block (see the module docs); returns its metric sums with `METRICS`.
    /// `AVX2` is true in the copy compiled with AVX2+FMA (see [`LaneSums::add`]).
    #[inline(always)]
    fn block<E: Elem, const METRICS: bool, O: Outputs, const AVX2: bool>(
        &self,
        mut b: Block<'_, O>,
    ) -> Option<ErrorAccumulator> {
        let size = E::SIZE;
        let (mut x, mut y) = ([0f32; PIECE], [0f32; PIECE]);
        let mut scan = [0f32; PIECE];
        // The reconstruction of a piece when it is not kept (for the metrics' rounding).
        let mut unkept = [0u8; PIECE * 4];
        let mut lanes = LaneSums::new();
        let mut group = self.geo.containing(b.start);
        let mut kernel: Option<CodeKernel> = None;
        let mut p = b.start;
        while p < b.end {
            let q = (p + PIECE).min(b.end);
            let n = q - p;
            let (x, y) = (&mut x[..n], &mut y[..n]);
            E::decode(&self.input[p * size..q * size], x);
            let (codes, kept) = b.out.piece(p - b.start, q - b.start, self.kept);
            let mut at = p;
            while at < q {
                if at == group.end {
                    group = self.geo.group(group.index + 1);
                    kernel = None;
                }
                let k = match kernel {
                    Some(k) => k,
                    None => {
                        let params = if group.start >= p && group.end <= q {
                            group_params(self.cfg, &x[group.start - p..group.end - p])
                        } else {
                            let bytes = &self.input[group.start * size..group.end * size];
                            self.scan_params::<E>(bytes, &mut scan)
                        };
                        let k = CodeKernel::new(self.cfg, &params);
                        if group.start >= b.start {
                            b.scales[group.index - b.first_group] = params.scale;
                            b.zeros[group.index - b.first_group] = k.zero;
                        }
                        kernel = Some(k);
                        k
                    }
                };
                let end = group.end.min(q);
                let (i, j) = (at - p, end - p);
                rtn_group_codes_dequantize_to(&k, &x[i..j], &mut codes[i..j], &mut y[i..j]);
                at = end;
            }
            if self.kept > 0 || METRICS {
                let out = match self.kept {
                    0 => &mut unkept[..n * size],
                    _ => kept,
                };
                E::encode(y, out);
                if METRICS {
                    // The metrics see what a reader sees: the reconstruction as stored.
                    E::decode(out, y);
                    lanes.add::<AVX2>(x, y);
                }
            }
            p = q;
        }
        METRICS.then(|| lanes.finish(b.end - b.start))
    }

    /// [`group_params`] of a group given as its encoded bytes, decoded piecewise into `scan`
    /// (min and max are exact, so combining the pieces' ranges gives the whole group's).
    #[inline(always)]
    fn scan_params<E: Elem>(&self, bytes: &[u8], scan: &mut [f32; PIECE]) -> GroupParams {
        let (mut lo, mut hi) = (0f32, 0f32);
        for piece in bytes.chunks(PIECE * E::SIZE) {
            let v = &mut scan[..piece.len() / E::SIZE];
            E::decode(piece, v);
            if self.cfg.symmetric {
                let m = abs_max(v);
                hi = if m > hi { m } else { hi };
            } else {
                let (l, h) = min_max(v);
                lo = if l < lo { l } else { lo };
                hi = if h > hi { h } else { hi };
            }
        }
        if self.cfg.symmetric {
            params_from_range(self.cfg, -hi, hi)
        } else {
            params_from_range(self.cfg, lo, hi)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{
        encode_chunk, encode_chunk_general, encode_chunk_measured, encode_chunk_representation,
        EncodedChunk, TensorPlan,
    };
    use crate::dtype::{encode_from_f32, with_baseline};
    use crate::recipe::PassKind;
    use proptest::prelude::*;

    /// xorshift64* uniforms in [0, 1).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Roughly Gaussian weights with per-row scales, outliers, all-zero stretches and (with
    /// `hostile`) NaN, infinities, subnormals, -0.0 and huge values sprinkled in.
    fn data(len: usize, row_len: usize, seed: u64, hostile: bool) -> Vec<f32> {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut row_scale = 0.02;
        (0..len)
            .map(|i| {
                if i % row_len == 0 {
                    row_scale = 0.02 * (4.0 * rng.next() - 2.0).exp();
                }
                let u = rng.next();
                if i % 5000 < 150 && i > 5000 {
                    return 0.0; // all-zero groups (scale 0)
                }
                if hostile && u < 0.002 {
                    let specials = [
                        f32::NAN,
                        f32::INFINITY,
                        f32::NEG_INFINITY,
                        1e-40,
                        -3e-42,
                        -0.0,
                        f32::MAX,
                        -1e30,
                        f32::MIN_POSITIVE,
                    ];
                    return specials[(rng.next() * specials.len() as f64) as usize];
                }
                let g = (0..4).map(|_| rng.next()).sum::<f64>() - 2.0;
                let x = g * row_scale * if u > 0.999 { 8.0 } else { 1.0 };
                x as f32
            })
            .collect()
    }

    fn plan(cfg: QuantizeConfig) -> TensorPlan {
        TensorPlan {
            values: Some(PassKind::Quantize(cfg)),
            ..TensorPlan::default()
        }
    }

    /// One way of encoding a chunk: the chunk (or the error message) and the metrics.
    type Outcome = (Result<EncodedChunk, String>, String);

    /// Encodes `values` as `dtype` under `cfg` with the general path on the baseline copies
    /// (the reference: what this crate computed before the fused path) and then fused and
    /// general on both the baseline and the AVX2 copies (also in parallel), and checks
    /// every output agrees, the metrics bitwise (NaN sums included). Returns whether the
    /// fused path applied.
    fn check(cfg: QuantizeConfig, dtype: DType, row_len: usize, values: &[f32]) -> bool {
        let mut input = vec![0u8; values.len() * dtype.size_bytes()];
        encode_from_f32(dtype, values, &mut input).unwrap();
        let plan = plan(cfg);
        let what = format!("{cfg:?} {dtype} row_len {row_len} len {}", values.len());
        let general = || -> Outcome {
            let chunk = encode_chunk_general(&plan, dtype, row_len, &input);
            let mut acc = ErrorAccumulator::new();
            if let Ok(c) = &chunk {
                acc.add_encoded(dtype, &input, &c.reconstruction).unwrap();
            }
            (chunk.map_err(|e| e.to_string()), format!("{acc:?}"))
        };
        let fused = || -> [Outcome; 2] {
            let mut acc = ErrorAccumulator::new();
            let measured = encode_chunk_measured(&plan, dtype, row_len, &input, &mut acc);
            let plain = encode_chunk(&plan, dtype, row_len, &input);
            [
                (measured.map_err(|e| e.to_string()), format!("{acc:?}")),
                (plain.map_err(|e| e.to_string()), format!("{acc:?}")),
            ]
        };
        // Without the reconstruction kept: the same representation and metrics.
        let unkept = || -> Outcome {
            let mut acc = ErrorAccumulator::new();
            let mut chunk = encode_chunk_representation(&plan, dtype, row_len, &input, &mut acc);
            if let Ok(c) = &mut chunk {
                assert!(
                    c.reconstruction.is_empty()
                        || fused_layout(&cfg, dtype, values.len(), row_len).is_none(),
                    "the fused path kept the reconstruction"
                );
                c.reconstruction.clear();
            }
            (chunk.map_err(|e| e.to_string()), format!("{acc:?}"))
        };
        let (want, want_acc) = with_baseline(general);
        let [a, b] = with_baseline(fused);
        let [c, d] = fused();
        let (e, e_acc) = unkept();
        assert_eq!(e_acc, want_acc, "{what}");
        match (e, &want) {
            (Ok(e), Ok(w)) => assert_eq!(e.sections(), w.sections(), "{what}"),
            (Err(e), Err(w)) => assert_eq!(&e, w, "{what}"),
            (e, w) => panic!("{what}: {:?} vs {:?}", e.is_ok(), w.is_ok()),
        }
        for (got, got_acc) in [a, b, c, d, general()] {
            assert_eq!(got_acc, want_acc, "{what}");
            let (got, want) = match (got, &want) {
                (Ok(g), Ok(w)) => (g, w),
                (Err(g), Err(w)) => {
                    assert_eq!(&g, w, "{what}");
                    continue;
                }
                (g, w) => panic!("{what}: {:?} vs {:?}", g.is_ok(), w.is_ok()),
            };
            assert!(got.reconstruction == want.reconstruction, "{what}");
            assert_eq!(got.sections(), want.sections(), "{what}");
            assert_eq!(got.values, want.values, "{what}");
            assert_eq!(got.structure, want.structure, "{what}");
            assert_eq!(
                (got.rows, got.row_len, got.repr_bits),
                (want.rows, want.row_len, want.repr_bits),
                "{what}"
            );
            assert!(got.frame() == want.frame(), "{what}");
        }
        fused_layout(&cfg, dtype, values.len(), row_len).is_some()
    }

    fn cfg(bits: u8, symmetric: bool, granularity: Granularity) -> QuantizeConfig {
        QuantizeConfig {
            bits,
            symmetric,
            granularity,
            scale_dtype: crate::recipe::ScaleDtype::F16,
        }
    }

    #[test]
    fn fused_matches_general_path() {
        // (row_len, rows): block-aligned rows, rows straddling blocks, one-element rows,
        // a chunk shorter than one block, and rows longer than a piece.
        let shapes = [
            (1024, 80),
            (1000, 70),
            (13, 5100),
            (1, 700),
            (4096, 17),
            (3001, 23),
            (50_000, 3),
        ];
        let grans = [
            Granularity::Group(128),
            Granularity::Group(64),
            Granularity::Group(100),
            Granularity::Group(1),
            Granularity::Group(7),
            Granularity::Group(5000),
            Granularity::Channel,
        ];
        let mut fused = 0;
        let mut case = 0u64;
        for (row_len, rows) in shapes {
            for (gi, &g) in grans.iter().enumerate() {
                case += 1;
                let bits = 2 + (case % 7) as u8;
                let symmetric = case % 2 == 0;
                let dtype = [DType::BF16, DType::F16, DType::F32][(case % 3) as usize];
                let hostile = gi % 3 == 1;
                let values = data(row_len * rows, row_len, case, hostile);
                let c = cfg(bits, symmetric, g);
                fused += usize::from(check(c, dtype, row_len, &values));
                // The same data in the other symmetry and the other two dtypes.
                let c2 = cfg(10 - bits, !symmetric, g);
                let d2 = [DType::BF16, DType::F16, DType::F32][((case + 1) % 3) as usize];
                fused += usize::from(check(c2, d2, row_len, &values));
            }
        }
        assert!(fused > 80, "the fused path ran in only {fused} cases");
    }

    #[test]
    fn every_bit_width_and_dtype_on_the_bench_shape() {
        let values = data(1024 * 70, 1024, 99, true);
        for bits in 2..=8 {
            for symmetric in [true, false] {
                for dtype in [DType::BF16, DType::F16, DType::F32] {
                    for g in [Granularity::Group(128), Granularity::Channel] {
                        assert!(check(cfg(bits, symmetric, g), dtype, 1024, &values));
                    }
                }
            }
        }
    }

    #[test]
    fn general_path_keeps_what_fusion_does_not_cover() {
        let values = data(2000, 100, 5, true);
        // Per-tensor, groups longer than a block, bad bits, empty chunks: all general.
        assert!(!check(
            cfg(4, true, Granularity::Tensor),
            DType::BF16,
            100,
            &values
        ));
        assert!(!check(
            cfg(9, true, Granularity::Group(8)),
            DType::BF16,
            100,
            &values
        ));
        assert!(!check(
            cfg(1, false, Granularity::Channel),
            DType::F16,
            100,
            &values
        ));
        assert!(!check(
            cfg(4, true, Granularity::Channel),
            DType::F32,
            100,
            &[]
        ));
        let long = data(BLOCK + 8, BLOCK + 8, 6, false);
        assert!(!check(
            cfg(8, true, Granularity::Channel),
            DType::BF16,
            BLOCK + 8,
            &long
        ));
        let exact = data(BLOCK * 2, BLOCK, 7, true);
        assert!(check(
            cfg(8, false, Granularity::Channel),
            DType::BF16,
            BLOCK,
            &exact
        ));
    }

    #[test]
    fn geometry_counts_groups() {
        let geo = Geometry::new(10, 4);
        // Rows of 10: groups start at 0, 4, 8, 10, 14, 18, 20, ...
        let starts: Vec<usize> = (0..7).map(|g| geo.group(g).start).collect();
        assert_eq!(starts, [0, 4, 8, 10, 14, 18, 20]);
        assert_eq!(geo.group(2).end, 10);
        for i in 0..40 {
            let before = starts
                .iter()
                .chain(&[24, 28, 30, 34, 38])
                .filter(|&&s| s < i);
            assert_eq!(geo.groups_before(i), before.count(), "{i}");
            let g = geo.containing(i);
            assert!(g.start <= i && i < g.end, "{i}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn fused_matches_general_on_random_shapes(
            row_len in 1usize..300,
            rows in 1usize..40,
            group in 1usize..200,
            channel in any::<bool>(),
            bits in 2u8..=8,
            symmetric in any::<bool>(),
            which in 0usize..3,
            seed in any::<u64>(),
            hostile in any::<bool>(),
        ) {
            let g = if channel { Granularity::Channel } else { Granularity::Group(group) };
            let dtype = [DType::BF16, DType::F16, DType::F32][which];
            let values = data(row_len * rows, row_len, seed, hostile);
            prop_assert!(check(cfg(bits, symmetric, g), dtype, row_len, &values));
        }
    }
}
