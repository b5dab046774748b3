//! Lossless entropy coding of tensor bytes: byte-plane regrouping plus per-block order-0
//! Huffman coding (the ZipNN approach), with rANS for blocks of 4-bit codes.
//!
//! **Planes.** Floating-point weights have a skewed exponent and a near-uniform mantissa, so
//! each element (little-endian) is regrouped into byte planes that are each either skewed or
//! uniform. Writing the top two bytes of an element as `hi = s e7..e1`, `lo = e0 m..`
//! (BF16, and the top half of F32) or `hi = s e4..e0 m9 m8`, `lo = m7..m0` (F16), the
//! regrouping is the same bijection in both cases:
//!
//! - plane 0: `(hi << 1 | lo >> 7) & 0xff` (the 8 exponent bits; for F16 the 5 exponent bits
//!   and the top 3 mantissa bits),
//! - plane 1: `(hi & 0x80) | (lo & 0x7f)` (sign and the 7 mantissa bits below),
//!
//! inverted by `lo = plane0 << 7 | plane1 & 0x7f`, `hi = plane1 & 0x80 | plane0 >> 1`. On the
//! 16-bit word `w = hi << 8 | lo` this is `plane0 = w >> 7`, `plane1 = (w >> 8) & 0x80 |
//! w & 0x7f` (truncated to bytes), computed on fixed arrays of 32 words so it vectorizes.
//! F32 adds planes 2 and 3: the two low mantissa bytes (byte 1, then byte 0). `Bytes` is one
//! plane (quantized codes or anything else). A length that is not a multiple of the element
//! size keeps its tail bytes, stored raw.
//!
//! **Blocks.** Elements are cut into chunks of `2^16` elements (`2^18` for `Bytes`, where
//! the blocks are usually quantized codes: fewer tables and per-block setups, measured
//! ~9% faster both ways and slightly smaller on int4 codes); each plane of a chunk is one
//! block, coded independently with its own statistics so the coding adapts per tensor and
//! region. A block is coded as the smallest of: *constant* (one distinct symbol: 1 byte),
//! *Huffman* (canonical, length-limited to 11 bits, four interleaved streams; see
//! `huffman`) when it saves at least 1/64 of the block, *rANS* (see `rans`) on blocks whose
//! symbols are all below 16, else *raw* (a copy). Blocks of at least 4 Ki symbols are first
//! tested on every 8th symbol: a sample entropy above 7.8 bits per symbol (near-uniform
//! mantissa bytes) sends the block raw at once, so such planes cost one strided pass and a
//! copy (float exponent planes skip this test: they are skewed in real weights; so do blocks
//! that start with 4-bit values, i.e. quantized codes, which are then counted with vector
//! compares). Otherwise the full histogram gives the order-0 entropy
//! `H = sum_s c_s log2(n / c_s)` bits; a block with `H >= n * 8 * (1 - 1/64)` goes raw
//! without building a code. Huffman's redundancy over `H` is below `p_max + 0.086` bits per
//! symbol (Gallager), in practice ~0.04 bit on exponent planes.
//!
//! **rANS for 4-bit codes.** Quantized int4 codes stored one per byte (values `0..16`) cost
//! Huffman ~0.04 bit per code above `H` as well (~1% of the output). When every symbol of a
//! block is below 16, the block is also sized as rANS on nibble pairs (two codes per step,
//! frequencies at 12 bits from an order-0 product model, 32 interleaved 31-bit states sharing
//! one stream of 16-bit words, decoded with AVX2 where available; see `rans_lanes`): its
//! size is estimated from the histogram (table + states + ideal cost, exact to a few bytes)
//! and it replaces Huffman when that estimate plus 1/256 of it is still below Huffman's exact
//! size. Other planes (BF16/F32 exponents and mantissas) keep Huffman.
//!
//! **Format** (all integers little-endian): `magic "SPEN"`, `version: u8 = 3`,
//! `layout: u8`, `log2(chunk elements): u8`, `original length: u64`; then per chunk, per plane,
//! a block `mode: u8` followed by `0 raw: n bytes` | `1 constant: 1 byte` |
//! `2 Huffman: payload length u32, payload` | `3 rANS: payload length u32, payload`; then the
//! raw tail; nothing may follow. Version 3 writes rANS payload kind 2; version 2 (rANS
//! payload kind 1) and version 1 (no mode 3) still decode, as does any rANS kind in a
//! version-2 or -3 block.
//!
//! **Hostile input.** Decoding first walks all block headers, checking every length against
//! the bytes actually present (so the walk is bounded by the encoded size), caps the declared
//! length at [`MAX_DECODED_LEN`], and only then reserves the output (fallibly). Huffman
//! tables must form a complete prefix code and every stream must end exactly at its stored
//! size; rANS frequency tables must sum exactly to the precision, and every rANS stream must
//! be consumed exactly and end with the states at their initial value. Decoding never
//! panics; corrupt input yields an [`EntropyError`] (or, when the damage is undetectable
//! without a checksum, different bytes of the declared length).
//!
//! **Parallelism and determinism.** Chunks are coded independently on rayon threads and
//! concatenated in order, so the encoding depends only on the input bytes and layout.

mod huffman;
mod rans;
mod rans_lanes;
mod rans_lanes_avx2;
#[cfg(test)]
mod tests;

use rayon::prelude::*;

/// File magic of an encoding.
const MAGIC: [u8; 4] = *b"SPEN";
/// Format version written; versions `1..=VERSION` are accepted (1 has no rANS blocks, 2
/// writes rANS payload kind 1, 3 kind 2).
const VERSION: u8 = 3;
/// Bytes of the fixed header.
const HEADER_LEN: usize = 4 + 1 + 1 + 1 + 8;
/// log2 of the elements per chunk written by [`compress`] (see module docs).
fn chunk_log2(layout: Layout) -> u8 {
    match layout {
        Layout::Bytes => 18,
        Layout::Bf16 | Layout::F16 | Layout::F32 => 16,
    }
}
/// Accepted range of the chunk-size exponent when decoding.
const CHUNK_LOG2_RANGE: std::ops::RangeInclusive<u8> = 8..=24;
/// Largest decoded length accepted (16 GiB), so a forged header cannot demand more.
pub const MAX_DECODED_LEN: u64 = 16 << 30;
/// Block modes.
const MODE_RAW: u8 = 0;
const MODE_CONST: u8 = 1;
const MODE_HUFFMAN: u8 = 2;
const MODE_RANS: u8 = 3;
/// Huffman is used only if it saves at least `1 / MIN_SAVING_FRACTION` of a block.
const MIN_SAVING_FRACTION: usize = 64;
/// rANS replaces Huffman only if its estimated size plus `1 / RANS_MARGIN` of it is still
/// below Huffman's exact size.
const RANS_MARGIN: usize = 256;
/// Stride of the symbol sample used to send near-uniform blocks straight to raw.
const SAMPLE_STRIDE: usize = 8;
/// Blocks shorter than this skip the sample test.
const SAMPLE_MIN: usize = 1 << 12;
/// Sample entropy (bits per symbol) above which a block is stored raw. Huffman could then
/// save at most ~0.2 bit per symbol plus the sampling bias (~0.06 bit at 8 Ki samples).
const RAW_SAMPLE_ENTROPY: f64 = 7.8;

/// How the input bytes are split into byte planes before coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Layout {
    /// One plane: the bytes as they are (e.g. quantized codes, one per byte).
    Bytes,
    /// Little-endian bfloat16: exponent plane, sign+mantissa plane.
    Bf16,
    /// Little-endian IEEE half: exponent+top-3-mantissa plane, sign+low-7-mantissa plane.
    F16,
    /// Little-endian IEEE single: exponent, sign+top-7 mantissa, mantissa bytes 1 and 0.
    F32,
}

impl Layout {
    /// Bytes per element.
    pub fn element_size(self) -> usize {
        match self {
            Layout::Bytes => 1,
            Layout::Bf16 | Layout::F16 => 2,
            Layout::F32 => 4,
        }
    }

    /// Byte planes per element (equal to the element size: the regrouping is a bijection).
    pub fn planes(self) -> usize {
        self.element_size()
    }

    fn tag(self) -> u8 {
        match self {
            Layout::Bytes => 0,
            Layout::Bf16 => 1,
            Layout::F16 => 2,
            Layout::F32 => 3,
        }
    }

    fn from_tag(tag: u8) -> Option<Layout> {
        [Layout::Bytes, Layout::Bf16, Layout::F16, Layout::F32]
            .into_iter()
            .find(|l| l.tag() == tag)
    }
}

/// Why an encoding could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntropyError {
    #[error("encoding truncated: needed {needed} bytes at offset {offset}, {available} present")]
    Truncated {
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("bad magic: not an entropy-coded stream")]
    BadMagic,
    #[error("unsupported format version {0} (this build reads 1 to {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown layout tag {0}")]
    UnknownLayout(u8),
    #[error("invalid chunk-size exponent {0}")]
    BadChunkSize(u8),
    #[error("declared length {0} exceeds the {MAX_DECODED_LEN}-byte cap")]
    TooLarge(u64),
    #[error("unknown block mode {mode} at offset {offset}")]
    BadBlockMode { offset: usize, mode: u8 },
    #[error("corrupt block at offset {offset}: {reason}")]
    BadBlock { offset: usize, reason: &'static str },
    #[error("{0} unexpected bytes after the end of the encoding")]
    TrailingBytes(usize),
    #[error("cannot allocate {0} bytes for the decoded output")]
    OutOfMemory(u64),
}

/// Compresses `data` split into planes per `layout`. Self-describing (records the layout and
/// length); [`decompress`] always returns the exact input. Never fails.
pub fn compress(layout: Layout, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    compress_into(layout, data, &mut out);
    out
}

/// [`compress`], appending the encoding to `out` (so a caller coding many inputs can reuse
/// one buffer instead of faulting in fresh pages for each).
pub fn compress_into(layout: Layout, data: &[u8], out: &mut Vec<u8>) {
    let elem = layout.element_size();
    let body_len = data.len() / elem * elem;
    let (body, tail) = data.split_at(body_len);
    out.reserve(HEADER_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(layout.tag());
    let chunk_log2 = chunk_log2(layout);
    out.push(chunk_log2);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    let chunk_bytes = (1usize << chunk_log2) * elem;
    let n_chunks = body.len().div_ceil(chunk_bytes);
    let threads = rayon::current_num_threads();
    if threads == 1 || n_chunks <= 1 {
        // No parallelism to gain: code straight into `out`, saving a copy.
        out.reserve(data.len() + 64);
        let mut scratch = PlaneScratch::default();
        for chunk in body.chunks(chunk_bytes) {
            encode_chunk(layout, chunk, &mut scratch, out);
        }
    } else {
        // A few groups of whole chunks per thread; each group is coded into its own buffer.
        // Chunk codings do not depend on the grouping, so neither does the output.
        let chunks_per_group = n_chunks.div_ceil(4 * threads);
        let encoded: Vec<Vec<u8>> = body
            .par_chunks(chunks_per_group * chunk_bytes)
            .map_init(PlaneScratch::default, |scratch, group| {
                let mut enc = Vec::with_capacity(group.len() + 8);
                for chunk in group.chunks(chunk_bytes) {
                    encode_chunk(layout, chunk, scratch, &mut enc);
                }
                enc
            })
            .collect();
        out.reserve(encoded.iter().map(Vec::len).sum::<usize>() + tail.len());
        for e in &encoded {
            out.extend_from_slice(e);
        }
    }
    out.extend_from_slice(tail);
}

/// Decodes an encoding made by [`compress`].
pub fn decompress(encoded: &[u8]) -> Result<Vec<u8>, EntropyError> {
    let mut out = Vec::new();
    decompress_into(encoded, &mut out)?;
    Ok(out)
}

/// Decodes an encoding made by [`compress`], appending the bytes to `out`. On error `out`
/// is left as it was.
pub fn decompress_into(encoded: &[u8], out: &mut Vec<u8>) -> Result<(), EntropyError> {
    let header = parse_header(encoded)?;
    let chunks = scan_chunks(encoded, &header)?;
    let len = header.len as usize;
    let base = out.len();
    out.try_reserve_exact(len)
        .map_err(|_| EntropyError::OutOfMemory(header.len))?;
    let elem = header.layout.element_size();
    let body_len = len / elem * elem;
    if rayon::current_num_threads() == 1 || chunks.len() <= 1 {
        // No parallelism to gain: grow the output chunk by chunk, so the zero fill of each
        // chunk stays in cache just before it is overwritten.
        let mut scratch = PlaneScratch::default();
        for chunk in &chunks {
            let at = out.len();
            out.resize(at + chunk.elements * elem, 0);
            let dst = &mut out[at..];
            if let Err(err) = decode_chunk(header.layout, encoded, chunk, &mut scratch, dst) {
                out.truncate(base);
                return Err(err);
            }
        }
        debug_assert_eq!(out.len(), base + body_len);
        out.extend_from_slice(&encoded[encoded.len() - (len - body_len)..]);
        return Ok(());
    }
    out.resize(base + len, 0);
    let (body, tail) = out[base..].split_at_mut(body_len);
    tail.copy_from_slice(&encoded[encoded.len() - tail.len()..]);
    let chunk_bytes = (1usize << header.chunk_log2) * elem;
    let results: Vec<Result<(), EntropyError>> = body
        .par_chunks_mut(chunk_bytes)
        .zip(chunks.par_iter())
        .map_init(PlaneScratch::default, |scratch, (dst, chunk)| {
            decode_chunk(header.layout, encoded, chunk, scratch, dst)
        })
        .collect();
    if let Some(err) = results.into_iter().find_map(Result::err) {
        out.truncate(base);
        return Err(err);
    }
    Ok(())
}

/// Order-0 entropy of each plane (over the whole input), summed, plus 8 bits per tail byte,
/// as a fraction of the input size in bits. A reporting aid: the size an ideal order-0 coder
/// with one table per plane would reach, without table costs. 0 for empty input.
pub fn order0_bound(layout: Layout, data: &[u8]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let elem = layout.element_size();
    let body_len = data.len() / elem * elem;
    let mut hists = vec![[0u64; 256]; layout.planes()];
    let mut scratch = PlaneScratch::default();
    for chunk in data[..body_len].chunks((1 << chunk_log2(layout)) * elem) {
        let planes = split_planes(layout, chunk, &mut scratch);
        for (plane, total) in planes.iter().zip(hists.iter_mut()) {
            let h = huffman::histogram(plane);
            for (t, &c) in total.iter_mut().zip(&h) {
                *t += u64::from(c);
            }
        }
    }
    let n = (body_len / elem) as f64;
    let plane_bits: f64 = hists
        .iter()
        .flat_map(|h| h.iter())
        .filter(|&&c| c > 0)
        .map(|&c| c as f64 * (n / c as f64).log2())
        .sum();
    (plane_bits + 8.0 * (data.len() - body_len) as f64) / (8.0 * data.len() as f64)
}

/// Per-thread buffers holding the planes of one chunk, and the rANS encoder's words.
#[derive(Default)]
struct PlaneScratch {
    planes: [Vec<u8>; 4],
    rans: rans::EncodeScratch,
}

/// Splits a chunk of whole elements into planes (see module docs). For `Bytes` the chunk
/// itself is the single plane.
fn split_planes<'a>(
    layout: Layout,
    chunk: &'a [u8],
    scratch: &'a mut PlaneScratch,
) -> Vec<&'a [u8]> {
    let elem = layout.element_size();
    let n = chunk.len() / elem;
    if layout == Layout::Bytes {
        return vec![chunk];
    }
    for p in &mut scratch.planes[..elem] {
        p.resize(n, 0);
    }
    let [p0, p1, p2, p3] = &mut scratch.planes;
    match layout {
        Layout::Bytes => unreachable!("handled above"),
        Layout::Bf16 | Layout::F16 => {
            let mut src = chunk.chunks_exact(2 * LANE);
            let mut dst = p0.chunks_exact_mut(LANE).zip(p1.chunks_exact_mut(LANE));
            for (s, (a, b)) in (&mut src).zip(&mut dst) {
                let mut words = [0u16; LANE];
                for (w, e) in words.iter_mut().zip(s.chunks_exact(2)) {
                    *w = u16::from_le_bytes([e[0], e[1]]);
                }
                for j in 0..LANE {
                    (a[j], b[j]) = regroup16(words[j]);
                }
            }
            let done = chunk.len() / (2 * LANE) * LANE;
            for (i, e) in src.remainder().chunks_exact(2).enumerate() {
                (p0[done + i], p1[done + i]) = regroup16(u16::from_le_bytes([e[0], e[1]]));
            }
        }
        Layout::F32 => {
            let mut src = chunk.chunks_exact(4 * LANE);
            let mut dst = p0
                .chunks_exact_mut(LANE)
                .zip(p1.chunks_exact_mut(LANE))
                .zip(p2.chunks_exact_mut(LANE).zip(p3.chunks_exact_mut(LANE)));
            for (s, ((a, b), (c, d))) in (&mut src).zip(&mut dst) {
                let mut words = [0u32; LANE];
                for (w, e) in words.iter_mut().zip(s.chunks_exact(4)) {
                    *w = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
                }
                for j in 0..LANE {
                    (a[j], b[j]) = regroup16((words[j] >> 16) as u16);
                    c[j] = (words[j] >> 8) as u8;
                    d[j] = words[j] as u8;
                }
            }
            let done = chunk.len() / (4 * LANE) * LANE;
            for (i, e) in src.remainder().chunks_exact(4).enumerate() {
                (p0[done + i], p1[done + i]) = regroup16(u16::from_le_bytes([e[2], e[3]]));
                p2[done + i] = e[1];
                p3[done + i] = e[0];
            }
        }
    }
    scratch.planes[..elem].iter().map(Vec::as_slice).collect()
}

/// Elements regrouped per inner step (fixed-size arrays so the loops vectorize).
const LANE: usize = 32;

/// The top 16 bits `s e.. m..` of an element -> (plane 0, plane 1): `(w >> 7) as u8` and
/// `(w >> 8) & 0x80 | w & 0x7f` (see module docs).
#[inline(always)]
fn regroup16(w: u16) -> (u8, u8) {
    ((w >> 7) as u8, (((w >> 8) & 0x80) | (w & 0x7f)) as u8)
}

/// (plane 0, plane 1) -> the top 16 bits of the element; inverse of [`regroup16`].
#[inline(always)]
fn ungroup16(p0: u8, p1: u8) -> u16 {
    let (p0, p1) = (u16::from(p0), u16::from(p1));
    ((p1 & 0x80) << 8) | (p0 << 7) | (p1 & 0x7f)
}

/// Appends the blocks of every plane of one chunk. Each mantissa plane is first tested on a
/// sample read straight from the chunk; a plane that goes raw is then regrouped straight
/// into `out` (no scratch copy), the others into a scratch buffer that is then coded. The
/// exponent plane (plane 0) skips the sample: it is skewed in any real weights, and the
/// full histogram still sends a near-uniform one to raw.
fn encode_chunk(layout: Layout, chunk: &[u8], scratch: &mut PlaneScratch, out: &mut Vec<u8>) {
    if layout == Layout::Bytes {
        encode_block(chunk, true, &mut scratch.rans, out);
        return;
    }
    let n = chunk.len() / layout.element_size();
    for p in 0..layout.planes() {
        if p > 0 && n >= SAMPLE_MIN {
            let hist = with_plane(layout, p, SampleHistogram { chunk });
            if huffman::entropy_bits_per_symbol(&hist) > RAW_SAMPLE_ENTROPY {
                out.push(MODE_RAW);
                with_plane(layout, p, AppendPlane { chunk, dst: out });
                continue;
            }
        }
        let plane = &mut scratch.planes[0];
        plane.clear();
        with_plane(layout, p, AppendPlane { chunk, dst: plane });
        encode_block(plane, false, &mut scratch.rans, out);
    }
}

/// An operation on one plane of a chunk of `E`-byte elements, given the function that maps
/// an element to its plane byte (monomorphized per plane so the loops vectorize).
trait PlaneOp {
    type Output;
    fn run<const E: usize>(self, f: impl Fn([u8; E]) -> u8 + Copy) -> Self::Output;
}

/// Runs `op` with plane `p` of `layout` (not `Bytes`; see module docs).
#[inline(always)]
fn with_plane<O: PlaneOp>(layout: Layout, p: usize, op: O) -> O::Output {
    match (layout, p) {
        (Layout::Bf16 | Layout::F16, 0) => op.run(|e: [u8; 2]| regroup16(u16::from_le_bytes(e)).0),
        (Layout::Bf16 | Layout::F16, _) => op.run(|e: [u8; 2]| regroup16(u16::from_le_bytes(e)).1),
        (Layout::F32, 0) => op.run(|e: [u8; 4]| regroup16(u16::from_le_bytes([e[2], e[3]])).0),
        (Layout::F32, 1) => op.run(|e: [u8; 4]| regroup16(u16::from_le_bytes([e[2], e[3]])).1),
        (Layout::F32, 2) => op.run(|e: [u8; 4]| e[1]),
        (Layout::F32, _) => op.run(|e: [u8; 4]| e[0]),
        (Layout::Bytes, _) => op.run(|e: [u8; 1]| e[0]),
    }
}

/// Appends the plane of `chunk` (whole elements) to `dst`.
struct AppendPlane<'a> {
    chunk: &'a [u8],
    dst: &'a mut Vec<u8>,
}

impl PlaneOp for AppendPlane<'_> {
    type Output = ();

    #[inline(always)]
    fn run<const E: usize>(self, f: impl Fn([u8; E]) -> u8 + Copy) {
        let dst = self.dst;
        dst.reserve(self.chunk.len() / E);
        let mut src = self.chunk.chunks_exact(E * LANE);
        for s in &mut src {
            let mut lane = [0u8; LANE];
            for (l, e) in lane.iter_mut().zip(s.chunks_exact(E)) {
                *l = f(e.try_into().expect("chunks_exact(E)"));
            }
            dst.extend_from_slice(&lane);
        }
        for e in src.remainder().chunks_exact(E) {
            dst.push(f(e.try_into().expect("chunks_exact(E)")));
        }
    }
}

/// Histogram of every [`SAMPLE_STRIDE`]-th symbol of the plane of `chunk`.
struct SampleHistogram<'a> {
    chunk: &'a [u8],
}

impl PlaneOp for SampleHistogram<'_> {
    type Output = [u32; 256];

    #[inline(always)]
    fn run<const E: usize>(self, f: impl Fn([u8; E]) -> u8 + Copy) -> [u32; 256] {
        // Two tables so that repeated symbols do not serialize on one counter.
        let mut h = [[0u32; 256]; 2];
        let mut rows = self.chunk.chunks_exact(2 * E * SAMPLE_STRIDE);
        for r in &mut rows {
            h[0][usize::from(f(r[..E].try_into().expect("E bytes")))] += 1;
            let b = &r[E * SAMPLE_STRIDE..E * SAMPLE_STRIDE + E];
            h[1][usize::from(f(b.try_into().expect("E bytes")))] += 1;
        }
        for e in rows.remainder().chunks(E * SAMPLE_STRIDE) {
            if let Some(e) = e.get(..E) {
                h[0][usize::from(f(e.try_into().expect("E bytes")))] += 1;
            }
        }
        let mut total = h[0];
        for (t, &c) in total.iter_mut().zip(&h[1]) {
            *t += c;
        }
        total
    }
}

/// Appends one block in the cheapest mode (see module docs). `plane` is non-empty. With
/// `sample` the raw pre-test is done here; otherwise the caller has done it.
fn encode_block(
    plane: &[u8],
    sample: bool,
    rans_scratch: &mut rans::EncodeScratch,
    out: &mut Vec<u8>,
) {
    let n = plane.len();
    // Blocks that start with 4-bit values are probably quantized codes (one per byte).
    let nibbles = plane.iter().take(64).all(|&b| b < 16);
    // Cheap pre-test on every SAMPLE_STRIDE-th symbol: a near-uniform plane goes raw without
    // a full histogram (the sample entropy underestimates by ~(k-1)/(2 m ln 2) bits). Codes
    // skip it: they are rarely near-uniform, and the full histogram still sends one that is
    // to raw.
    if sample && n >= SAMPLE_MIN && !nibbles {
        let hist = with_plane(Layout::Bytes, 0, SampleHistogram { chunk: plane });
        let h = huffman::entropy_bits_per_symbol(&hist);
        if h > RAW_SAMPLE_ENTROPY {
            out.push(MODE_RAW);
            out.extend_from_slice(plane);
            return;
        }
    }
    // Codes are counted with vector compares (if every byte is below 16).
    let seg_hists = nibbles
        .then(|| nibble_segment_histograms(plane))
        .flatten()
        .unwrap_or_else(|| huffman::segment_histograms(plane));
    let hist = huffman::sum_histograms(&seg_hists);
    let distinct = hist.iter().filter(|&&c| c > 0).count();
    if distinct == 1 {
        out.push(MODE_CONST);
        out.push(plane[0]);
        return;
    }
    let budget = n - n / MIN_SAVING_FRACTION;
    if huffman::entropy_bits_per_symbol(&hist) * n as f64 / 8.0 < budget as f64 {
        let lengths = huffman::code_lengths(&hist);
        let size = huffman::encoded_size(&seg_hists, &lengths);
        if hist[16..].iter().all(|&c| c == 0) {
            // 4-bit codes: rANS on nibble pairs, if it clearly beats Huffman.
            let model = rans::Model::new(rans::Kind::PairLanes, &hist);
            let est = model.estimated_size(&hist, n);
            if est + est / RANS_MARGIN < size && est + 4 < budget {
                out.push(MODE_RANS);
                let len_at = out.len();
                out.extend_from_slice(&[0; 4]);
                let len = rans::encode_with(plane, &model, rans_scratch, out);
                out[len_at..len_at + 4].copy_from_slice(&(len as u32).to_le_bytes());
                return;
            }
        }
        if size + 4 < budget {
            out.push(MODE_HUFFMAN);
            out.extend_from_slice(&(size as u32).to_le_bytes());
            let at = out.len();
            huffman::encode(plane, &seg_hists, &lengths, out);
            debug_assert_eq!(out.len() - at, size);
            return;
        }
    }
    out.push(MODE_RAW);
    out.extend_from_slice(plane);
}

/// [`huffman::segment_histograms`] of a block whose bytes are all below 16, else `None`.
fn nibble_segment_histograms(data: &[u8]) -> Option<[[u32; 256]; huffman::STREAMS]> {
    let n = data.len();
    let mut hists = [[0u32; 256]; huffman::STREAMS];
    for (s, h) in hists.iter_mut().enumerate() {
        h[..16].copy_from_slice(&nibble_counts(&data[huffman::segment(n, s)])?);
    }
    Some(hists)
}

/// Bytes per group of [`nibble_counts`]: each 8-bit counter sees at most 255 of them.
const NIBBLE_GROUP: usize = 255 * 32;

crate::dtype::avx2_dispatch! {
    /// Counts of each value `0..16` in `data`, or `None` if a byte is 16 or more.
    fn nibble_counts(data: &[u8]) -> Option<[u32; 16]> => nibble_counts_body
}

/// Per 32 bytes, one compare and one subtract per value in 8-bit lanes (vectorized by the
/// compiler), summed into `u32` counts after every [`NIBBLE_GROUP`] bytes.
#[inline(always)]
fn nibble_counts_body(data: &[u8]) -> Option<[u32; 16]> {
    let mut counts = [0u32; 16];
    let mut high = 0u8;
    for group in data.chunks(NIBBLE_GROUP) {
        let mut lanes = [[0u8; 32]; 16];
        let mut or = [0u8; 32];
        let mut blocks = group.chunks_exact(32);
        for block in &mut blocks {
            let block: &[u8; 32] = block.try_into().expect("32-byte chunk");
            for (o, &b) in or.iter_mut().zip(block) {
                *o |= b;
            }
            for (v, lane) in lanes.iter_mut().enumerate() {
                for (c, &b) in lane.iter_mut().zip(block) {
                    *c = c.wrapping_add(u8::from(b == v as u8));
                }
            }
        }
        high |= or.iter().fold(0, |a, &b| a | b);
        for (count, lane) in counts.iter_mut().zip(&lanes) {
            *count += lane.iter().map(|&c| u32::from(c)).sum::<u32>();
        }
        for &b in blocks.remainder() {
            high |= b;
            counts[usize::from(b & 15)] += 1;
        }
    }
    (high < 16).then_some(counts)
}

/// The fixed header, validated.
struct Header {
    version: u8,
    layout: Layout,
    chunk_log2: u8,
    len: u64,
}

fn parse_header(encoded: &[u8]) -> Result<Header, EntropyError> {
    if encoded.len() < HEADER_LEN {
        if !MAGIC.starts_with(&encoded[..encoded.len().min(4)]) {
            return Err(EntropyError::BadMagic);
        }
        return Err(EntropyError::Truncated {
            offset: 0,
            needed: HEADER_LEN,
            available: encoded.len(),
        });
    }
    if encoded[..4] != MAGIC {
        return Err(EntropyError::BadMagic);
    }
    if !(1..=VERSION).contains(&encoded[4]) {
        return Err(EntropyError::UnsupportedVersion(encoded[4]));
    }
    let layout = Layout::from_tag(encoded[5]).ok_or(EntropyError::UnknownLayout(encoded[5]))?;
    let chunk_log2 = encoded[6];
    if !CHUNK_LOG2_RANGE.contains(&chunk_log2) {
        return Err(EntropyError::BadChunkSize(chunk_log2));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&encoded[7..15]);
    let len = u64::from_le_bytes(len_bytes);
    if len > MAX_DECODED_LEN || usize::try_from(len).is_err() {
        return Err(EntropyError::TooLarge(len));
    }
    Ok(Header {
        version: encoded[4],
        layout,
        chunk_log2,
        len,
    })
}

/// Where one block's bytes lie in the encoding.
#[derive(Debug, Clone, Copy)]
struct BlockRef {
    mode: u8,
    /// Offset of the block's payload (after the mode byte and any length field).
    start: usize,
    end: usize,
}

/// The blocks of one chunk and its element count.
#[derive(Debug)]
struct ChunkRef {
    elements: usize,
    blocks: [BlockRef; 4],
}

/// Walks all block headers, checking that every block and the tail lie inside `encoded` and
/// that nothing follows. Work and memory are bounded by `encoded.len()`.
fn scan_chunks(encoded: &[u8], header: &Header) -> Result<Vec<ChunkRef>, EntropyError> {
    let elem = header.layout.element_size();
    let len = header.len as usize;
    let mut remaining_elems = len / elem;
    let tail_len = len - remaining_elems * elem;
    let chunk_elems = 1usize << header.chunk_log2;
    let mut pos = HEADER_LEN;
    let need = |pos: usize, needed: usize| -> Result<(), EntropyError> {
        if encoded.len() - pos < needed {
            Err(EntropyError::Truncated {
                offset: pos,
                needed,
                available: encoded.len() - pos,
            })
        } else {
            Ok(())
        }
    };
    let mut chunks = Vec::new();
    while remaining_elems > 0 {
        let n = remaining_elems.min(chunk_elems);
        let empty = BlockRef {
            mode: MODE_RAW,
            start: 0,
            end: 0,
        };
        let mut blocks = [empty; 4];
        for block in &mut blocks[..elem] {
            need(pos, 1)?;
            let mode = encoded[pos];
            let block_at = pos;
            pos += 1;
            let payload_len = match mode {
                MODE_RAW => n,
                MODE_CONST => 1,
                MODE_HUFFMAN | MODE_RANS if mode == MODE_HUFFMAN || header.version >= 2 => {
                    need(pos, 4)?;
                    let l = payload_len(encoded, pos);
                    pos += 4;
                    l
                }
                _ => {
                    return Err(EntropyError::BadBlockMode {
                        offset: block_at,
                        mode,
                    })
                }
            };
            need(pos, payload_len)?;
            *block = BlockRef {
                mode,
                start: pos,
                end: pos + payload_len,
            };
            pos += payload_len;
        }
        chunks.push(ChunkRef {
            elements: n,
            blocks,
        });
        remaining_elems -= n;
    }
    need(pos, tail_len)?;
    pos += tail_len;
    if pos != encoded.len() {
        return Err(EntropyError::TrailingBytes(encoded.len() - pos));
    }
    Ok(chunks)
}

fn payload_len(encoded: &[u8], at: usize) -> usize {
    u32::from_le_bytes([
        encoded[at],
        encoded[at + 1],
        encoded[at + 2],
        encoded[at + 3],
    ]) as usize
}

/// Decodes one chunk (already bounds-checked by [`scan_chunks`]) into `dst`.
fn decode_chunk(
    layout: Layout,
    encoded: &[u8],
    chunk: &ChunkRef,
    scratch: &mut PlaneScratch,
    dst: &mut [u8],
) -> Result<(), EntropyError> {
    let n = chunk.elements;
    let elem = layout.element_size();
    debug_assert_eq!(dst.len(), n * elem);
    if layout == Layout::Bytes {
        return decode_block(encoded, &chunk.blocks[0], dst);
    }
    // Raw planes are used in place; others are decoded into scratch.
    let mut planes: [&[u8]; 4] = [&[]; 4];
    for ((plane, block), buf) in planes
        .iter_mut()
        .zip(&chunk.blocks)
        .zip(scratch.planes.iter_mut())
        .take(elem)
    {
        if block.mode == MODE_RAW {
            *plane = &encoded[block.start..block.end];
        } else {
            buf.resize(n, 0);
            decode_block(encoded, block, buf)?;
            *plane = buf;
        }
    }
    match layout {
        Layout::Bytes => unreachable!("handled above"),
        Layout::Bf16 | Layout::F16 => {
            let mut dst = dst.chunks_exact_mut(2 * LANE);
            let mut src = planes[0]
                .chunks_exact(LANE)
                .zip(planes[1].chunks_exact(LANE));
            for (e, (a, b)) in (&mut dst).zip(&mut src) {
                let mut words = [0u16; LANE];
                for j in 0..LANE {
                    words[j] = ungroup16(a[j], b[j]);
                }
                for (o, w) in e.chunks_exact_mut(2).zip(words) {
                    o.copy_from_slice(&w.to_le_bytes());
                }
            }
            let done = n / LANE * LANE;
            for (i, o) in dst.into_remainder().chunks_exact_mut(2).enumerate() {
                o.copy_from_slice(
                    &ungroup16(planes[0][done + i], planes[1][done + i]).to_le_bytes(),
                );
            }
        }
        Layout::F32 => {
            let mut dst = dst.chunks_exact_mut(4 * LANE);
            let mut src = planes[0]
                .chunks_exact(LANE)
                .zip(planes[1].chunks_exact(LANE))
                .zip(
                    planes[2]
                        .chunks_exact(LANE)
                        .zip(planes[3].chunks_exact(LANE)),
                );
            for (e, ((a, b), (c, d))) in (&mut dst).zip(&mut src) {
                let mut words = [0u32; LANE];
                for j in 0..LANE {
                    words[j] = u32::from(ungroup16(a[j], b[j])) << 16
                        | u32::from(c[j]) << 8
                        | u32::from(d[j]);
                }
                for (o, w) in e.chunks_exact_mut(4).zip(words) {
                    o.copy_from_slice(&w.to_le_bytes());
                }
            }
            let done = n / LANE * LANE;
            for (i, o) in dst.into_remainder().chunks_exact_mut(4).enumerate() {
                let j = done + i;
                let hi = ungroup16(planes[0][j], planes[1][j]).to_le_bytes();
                o.copy_from_slice(&[planes[3][j], planes[2][j], hi[0], hi[1]]);
            }
        }
    }
    Ok(())
}

/// Decodes one block into `dst` (its length is the block's symbol count).
fn decode_block(encoded: &[u8], block: &BlockRef, dst: &mut [u8]) -> Result<(), EntropyError> {
    let payload = &encoded[block.start..block.end];
    let bad = |reason| EntropyError::BadBlock {
        offset: block.start,
        reason,
    };
    match block.mode {
        MODE_RAW => dst.copy_from_slice(payload),
        MODE_CONST => dst.fill(payload[0]),
        MODE_HUFFMAN => huffman::decode(payload, dst).map_err(bad)?,
        _ => rans::decode(payload, dst).map_err(bad)?,
    }
    Ok(())
}
