//! The per-chunk compute a worker runs: decode, apply the recipe's passes, encode, measure.
//!
//! Workers stream each tensor in chunks of whole rows. [`process_chunk`] turns one input
//! chunk into the output bytes (same dtype, same length) and feeds the metrics accumulator
//! with the original values and the values a reader of the output will actually see (the
//! reconstruction *after* re-encoding, so BF16/F16 rounding is included in the error).
//! Because every pass works row by row, chunking never changes the output bytes.

use crate::dtype::{decode_to_f32, encode_from_f32, DType, DTypeError};
use crate::metrics::ErrorAccumulator;
use crate::quantize;
use crate::recipe::PassKind;

/// Why a chunk could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("dtype {dtype} cannot be compressed (supported: BF16, F16, F32)")]
    UnsupportedDtype { dtype: DType },
    #[error("chunk of {len} bytes is not a whole number of rows ({row_len} elements of {elem_size} bytes)")]
    RaggedInput {
        len: usize,
        row_len: usize,
        elem_size: usize,
    },
    #[error(transparent)]
    DType(#[from] DTypeError),
}

/// Compresses one chunk of whole rows: decode `input` (`dtype`) to f32, apply `passes` in
/// order, encode back to `dtype` into `output` (cleared, then the same length as `input`),
/// and add (original, reconstruction decoded from `output`) to `acc`. With no passes the
/// output is a byte copy and `acc` is untouched.
pub fn process_chunk(
    passes: &[PassKind],
    dtype: DType,
    row_len: usize,
    input: &[u8],
    output: &mut Vec<u8>,
    acc: &mut ErrorAccumulator,
) -> Result<(), PipelineError> {
    output.clear();
    if passes.is_empty() {
        output.extend_from_slice(input);
        return Ok(());
    }
    if !dtype.is_decodable_float() {
        return Err(PipelineError::UnsupportedDtype { dtype });
    }
    check_whole_rows(dtype, row_len, input.len())?;
    let elems = input.len() / dtype.size_bytes();
    let mut original = vec![0f32; elems];
    decode_to_f32(dtype, input, &mut original)?;
    let mut work = original.clone();
    for pass in passes {
        apply(pass, &mut work, row_len);
    }
    output.resize(input.len(), 0);
    encode_from_f32(dtype, &work, output)?;
    decode_to_f32(dtype, output, &mut work)?;
    acc.add(&original, &work);
    Ok(())
}

fn check_whole_rows(dtype: DType, row_len: usize, len: usize) -> Result<(), PipelineError> {
    let elem_size = dtype.size_bytes();
    let ragged = PipelineError::RaggedInput {
        len,
        row_len,
        elem_size,
    };
    match row_len.checked_mul(elem_size) {
        Some(0) if len == 0 => Ok(()),
        Some(row_bytes) if row_bytes > 0 && len % row_bytes == 0 => Ok(()),
        _ => Err(ragged),
    }
}

fn apply(pass: &PassKind, values: &mut [f32], row_len: usize) {
    match pass {
        PassKind::Quantize(cfg) => quantize::quantize_dequantize_rows(cfg, values, row_len),
    }
}

/// Stored bits per weight: the dtype's bits with no passes, else the last quantize pass's.
pub fn bits_per_weight(passes: &[PassKind], dtype: DType, row_len: usize) -> f64 {
    passes
        .iter()
        .rev()
        .map(|p| match p {
            PassKind::Quantize(cfg) => quantize::bits_per_weight(cfg, row_len),
        })
        .next()
        .unwrap_or_else(|| f64::from(dtype.bits()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::{Granularity, QuantizeConfig};

    fn q(bits: u8, granularity: Granularity) -> PassKind {
        PassKind::Quantize(QuantizeConfig {
            bits,
            symmetric: true,
            granularity,
        })
    }

    fn bf16_bytes(xs: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; xs.len() * 2];
        encode_from_f32(DType::BF16, xs, &mut out).unwrap();
        out
    }

    fn sample(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect()
    }

    #[test]
    fn no_passes_is_a_byte_copy() {
        let input = vec![1u8, 2, 3];
        let mut out = vec![9u8; 10];
        let mut acc = ErrorAccumulator::new();
        process_chunk(&[], DType::I8, 3, &input, &mut out, &mut acc).unwrap();
        assert_eq!(out, input);
        assert_eq!(acc.count(), 0);
    }

    #[test]
    fn quantizes_and_measures_after_encoding() {
        let xs = sample(4 * 64);
        let input = bf16_bytes(&xs);
        let mut out = Vec::new();
        let mut acc = ErrorAccumulator::new();
        let passes = [q(4, Granularity::Group(32))];
        process_chunk(&passes, DType::BF16, 64, &input, &mut out, &mut acc).unwrap();
        assert_eq!(out.len(), input.len());
        assert_eq!(acc.count(), xs.len() as u64);
        let m = acc.finish();
        assert!(m.rel_fro_error > 0.0 && m.rel_fro_error < 0.2, "{m:?}");
        // The same rows split into two chunks give the same bytes.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut acc2 = ErrorAccumulator::new();
        process_chunk(&passes, DType::BF16, 64, &input[..256], &mut a, &mut acc2).unwrap();
        process_chunk(&passes, DType::BF16, 64, &input[256..], &mut b, &mut acc2).unwrap();
        a.extend(b);
        assert_eq!(a, out);
    }

    #[test]
    fn f32_and_f16_round_trip_lengths() {
        for dtype in [DType::F32, DType::F16] {
            let xs = sample(96);
            let mut input = vec![0u8; 96 * dtype.size_bytes()];
            encode_from_f32(dtype, &xs, &mut input).unwrap();
            let mut out = Vec::new();
            let mut acc = ErrorAccumulator::new();
            process_chunk(
                &[q(8, Granularity::Channel)],
                dtype,
                32,
                &input,
                &mut out,
                &mut acc,
            )
            .unwrap();
            assert_eq!(out.len(), input.len());
            assert!(acc.finish().cosine > 0.999);
        }
    }

    #[test]
    fn errors() {
        let mut out = Vec::new();
        let mut acc = ErrorAccumulator::new();
        let passes = [q(8, Granularity::Channel)];
        assert!(matches!(
            process_chunk(&passes, DType::I32, 1, &[0; 4], &mut out, &mut acc),
            Err(PipelineError::UnsupportedDtype { dtype: DType::I32 })
        ));
        assert!(matches!(
            process_chunk(&passes, DType::BF16, 3, &[0; 4], &mut out, &mut acc),
            Err(PipelineError::RaggedInput { len: 4, .. })
        ));
        assert!(matches!(
            process_chunk(&passes, DType::BF16, 0, &[0; 4], &mut out, &mut acc),
            Err(PipelineError::RaggedInput { .. })
        ));
        assert!(matches!(
            process_chunk(
                &passes,
                DType::BF16,
                usize::MAX,
                &[0; 4],
                &mut out,
                &mut acc
            ),
            Err(PipelineError::RaggedInput { .. })
        ));
        process_chunk(&passes, DType::BF16, 0, &[], &mut out, &mut acc).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn bits_per_weight_uses_last_pass() {
        assert_eq!(bits_per_weight(&[], DType::BF16, 128), 16.0);
        let passes = [q(8, Granularity::Channel), q(4, Granularity::Group(128))];
        assert_eq!(bits_per_weight(&passes, DType::BF16, 4096), 4.125);
    }
}
