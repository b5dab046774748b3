//! Fused GGUF encode of a dense chunk: decode, quantize to ggml blocks, dequantize, encode
//! the reconstruction and (optionally) accumulate the error metrics piece by piece, in
//! buffers that stay in L1, instead of the general path's passes over chunk-sized buffers
//! (decode the chunk to f32, quantize it, dequantize it, encode the reconstruction, then
//! decode input and reconstruction again for the metrics).
//!
//! The chunk is split into the metrics' blocks of [`BLOCK`] elements (in parallel on a
//! multi-thread pool), each walked in pieces of [`PIECE`] elements. A chunk is whole rows and
//! a row whole ggml blocks, so every piece is whole ggml blocks: ggml quantizes each block on
//! its own, so the blocks are the general path's bytes, and the lane sums are fed the same
//! pairs in the same order within the same blocks, so the metrics are the same bits (as in
//! [`crate::rtn_fused`], whose dtype codecs this module shares).

use rayon::prelude::*;

use crate::dtype::{self, DType};
use crate::gguf::GgmlType;
use crate::metrics::{ErrorAccumulator, LaneSums, BLOCK};
use crate::rtn_fused::{Bf16, Elem, F16, F32};

/// Elements per piece: whole blocks of every ggml type (at most 256 values), and a multiple
/// of the metrics' lanes.
const PIECE: usize = 1024;

/// What the fused encode produced.
pub(crate) struct FusedGgml {
    /// The chunk's ggml blocks.
    pub blocks: Vec<u8>,
    /// The dequantized blocks in the input dtype (empty unless asked for).
    pub reconstruction: Vec<u8>,
    /// One per metrics block, in order (empty unless asked for).
    pub metrics: Vec<ErrorAccumulator>,
}

/// Encodes `input` (whole rows of `row_len` values of `dtype`) as ggml `ty` blocks, with the
/// error sums if `metrics` and the reconstruction if `keep_reconstruction`; `None` when this
/// path does not apply (another dtype, rows that are not whole blocks), and the caller takes
/// the general path.
pub(crate) fn encode(
    ty: GgmlType,
    dtype: DType,
    row_len: usize,
    input: &[u8],
    metrics: bool,
    keep_reconstruction: bool,
) -> Option<FusedGgml> {
    let size = dtype.size_bytes();
    let (bs, ts) = (ty.block_size(), ty.type_size());
    if !matches!(dtype, DType::BF16 | DType::F16 | DType::F32)
        || row_len == 0
        || row_len % bs != 0
        || input.len() % (row_len * size) != 0
        || PIECE % bs != 0
    {
        return None;
    }
    let n = input.len() / size;
    let mut blocks = vec![0u8; n / bs * ts];
    // Reconstruction bytes kept per element (none when not kept).
    let kept = if keep_reconstruction { size } else { 0 };
    let mut reconstruction = vec![0u8; n * kept];
    let avx2 = dtype::has_avx2();
    // Each metrics block's share of the kept reconstruction (empty slices when not kept).
    let blocks_count = n.div_ceil(BLOCK);
    let recon: Vec<&mut [u8]> = match kept {
        0 => (0..blocks_count).map(|_| Default::default()).collect(),
        _ => reconstruction.chunks_mut(BLOCK * kept).collect(),
    };
    let partials: Option<Vec<Option<ErrorAccumulator>>> = input
        .par_chunks(BLOCK * size)
        .zip(recon)
        .zip(blocks.par_chunks_mut(BLOCK / bs * ts))
        .map(|((input, recon), blocks)| {
            let b = Block {
                ty,
                input,
                recon,
                blocks,
            };
            match (dtype, metrics) {
                (DType::BF16, true) => b.dispatch::<Bf16, true>(avx2),
                (DType::BF16, false) => b.dispatch::<Bf16, false>(avx2),
                (DType::F16, true) => b.dispatch::<F16, true>(avx2),
                (DType::F16, false) => b.dispatch::<F16, false>(avx2),
                (_, true) => b.dispatch::<F32, true>(avx2),
                (_, false) => b.dispatch::<F32, false>(avx2),
            }
        })
        .collect();
    Some(FusedGgml {
        blocks,
        reconstruction,
        metrics: partials?.into_iter().flatten().collect(),
    })
}

/// One metrics block: its input, and where its reconstruction and ggml blocks go.
struct Block<'a> {
    ty: GgmlType,
    input: &'a [u8],
    recon: &'a mut [u8],
    blocks: &'a mut [u8],
}

/// [`Block::run`] in its AVX2+FMA copy.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
fn run_avx2<E: Elem, const METRICS: bool>(b: Block<'_>) -> Option<Option<ErrorAccumulator>> {
    b.run::<E, METRICS, true>()
}

impl Block<'_> {
    fn dispatch<E: Elem, const METRICS: bool>(
        self,
        avx2: bool,
    ) -> Option<Option<ErrorAccumulator>> {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        if avx2 {
            // SAFETY: `run_avx2` only needs AVX2 and FMA, and `avx2` comes from
            // `dtype::has_avx2()`, which confirmed the running CPU supports both.
            return unsafe { run_avx2::<E, METRICS>(self) };
        }
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        let _ = avx2;
        self.run::<E, METRICS, false>()
    }

    /// Encodes the block piece by piece; its metric sums with `METRICS`. `None` if a ggml
    /// codec refused a piece (it cannot: pieces are whole blocks).
    #[inline(always)]
    fn run<E: Elem, const METRICS: bool, const AVX2: bool>(
        self,
    ) -> Option<Option<ErrorAccumulator>> {
        let (bs, ts) = (self.ty.block_size(), self.ty.type_size());
        let (mut x, mut y) = ([0f32; PIECE], [0f32; PIECE]);
        // A piece's reconstruction when it is not kept (for the metrics' rounding).
        let mut unkept = [0u8; PIECE * 4];
        let keep = !self.recon.is_empty();
        let mut recon_pieces = self.recon.chunks_mut(PIECE * E::SIZE);
        let mut coded = Vec::with_capacity(PIECE / bs * ts);
        let mut lanes = LaneSums::new();
        let count = self.input.len() / E::SIZE;
        let pieces = self
            .input
            .chunks(PIECE * E::SIZE)
            .zip(self.blocks.chunks_mut(PIECE / bs * ts));
        for (input, blocks) in pieces {
            let n = input.len() / E::SIZE;
            let recon = match keep {
                true => recon_pieces.next()?,
                false => &mut unkept[..input.len()],
            };
            let (x, y) = (&mut x[..n], &mut y[..n]);
            E::decode(input, x);
            coded.clear();
            self.ty.quantize(x, &mut coded).ok()?;
            self.ty.dequantize(&coded, y).ok()?;
            blocks.copy_from_slice(&coded);
            if !keep && !METRICS {
                continue;
            }
            E::encode(y, recon);
            if METRICS {
                // The metrics see the reconstruction as stored in the input dtype.
                E::decode(recon, y);
                lanes.add::<AVX2>(x, y);
            }
        }
        Some(METRICS.then(|| lanes.finish(count)))
    }
}

#[cfg(test)]
mod tests {
    use crate::codec::{
        encode_chunk_general, encode_chunk_measured, encode_chunk_representation, TensorPlan,
    };
    use crate::dtype::{encode_from_f32, with_baseline, DType};
    use crate::gguf::GgmlType;
    use crate::metrics::ErrorAccumulator;
    use crate::recipe::PassKind;

    /// Weights with per-row scales, outliers, zero stretches, subnormals and -0.0.
    fn data(len: usize, row_len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut row_scale = 0.02;
        (0..len)
            .map(|i| {
                if i % row_len == 0 {
                    row_scale = 0.02 * (4.0 * next() - 2.0).exp();
                }
                let u = next();
                match i % 3000 {
                    0..=40 if i > 3000 => 0.0,
                    41 => 1e-40,
                    42 => -0.0,
                    43 => 6e4,
                    _ => ((next() - 0.5) * row_scale * if u > 0.999 { 10.0 } else { 1.0 }) as f32,
                }
            })
            .collect()
    }

    /// The fused path (through the codec, both the baseline and the AVX2 copies) gives the
    /// general path's blocks, reconstruction and metrics, bit for bit, for every ggml type
    /// and input dtype, on chunks of one and of several metrics blocks.
    #[test]
    fn fused_matches_the_general_path() {
        for ty in GgmlType::ALL {
            let plan = TensorPlan {
                values: Some(PassKind::Ggml {
                    file_type: crate::gguf::FileType::Q4_0,
                    ty: Some(ty),
                }),
                ..TensorPlan::default()
            };
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                for (row_len, rows) in [(256, 3), (4096, 40), (768, 100)] {
                    let values = data(row_len * rows, row_len, ty.id() as u64 + rows as u64);
                    let mut input = vec![0u8; values.len() * dtype.size_bytes()];
                    encode_from_f32(dtype, &values, &mut input).unwrap();
                    let what = format!("{ty} {dtype} {rows} rows of {row_len}");
                    assert!(super::encode(ty, dtype, row_len, &input, true, true).is_some());
                    let want = encode_chunk_general(&plan, dtype, row_len, &input).unwrap();
                    let mut want_acc = ErrorAccumulator::new();
                    want_acc
                        .add_encoded(dtype, &input, &want.reconstruction)
                        .unwrap();
                    let fused = || {
                        let mut acc = ErrorAccumulator::new();
                        let chunk = encode_chunk_measured(&plan, dtype, row_len, &input, &mut acc);
                        (chunk.unwrap(), acc)
                    };
                    // Without the reconstruction kept: the same blocks and metrics.
                    let mut acc = ErrorAccumulator::new();
                    let codes =
                        encode_chunk_representation(&plan, dtype, row_len, &input, &mut acc)
                            .unwrap();
                    assert!(codes.reconstruction.is_empty(), "{what}");
                    assert!(codes.sections() == want.sections(), "{what}");
                    assert_eq!(format!("{acc:?}"), format!("{want_acc:?}"), "{what}");
                    for (got, acc) in [fused(), with_baseline(fused)] {
                        assert_eq!(format!("{acc:?}"), format!("{want_acc:?}"), "{what}");
                        assert!(got.reconstruction == want.reconstruction, "{what}");
                        assert!(got.sections() == want.sections(), "{what}");
                        assert_eq!(got.values, want.values, "{what}");
                        assert_eq!(got.repr_bits, want.repr_bits, "{what}");
                    }
                }
            }
        }
    }
}
