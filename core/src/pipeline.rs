//! The per-chunk compute a worker runs: decode, apply the tensor's plan, encode, measure.
//!
//! Workers stream each tensor in chunks of whole rows (or, when a pass needs whole-tensor
//! statistics, as one chunk). [`process_chunk`] turns one input chunk into the bytes the
//! output format stores: the reconstruction in the input dtype for safetensors output, or an
//! entropy-coded frame for `.spz` output. Either way it feeds the metrics accumulator with
//! the original values and the values a reader will actually see (decoded from the
//! reconstruction, so BF16/F16 rounding is included in the error). Row-local passes give the
//! same result however the rows are chunked.

use crate::codec::{encode_chunk_measured, CodecError, TensorPlan};
use crate::dtype::DType;
use crate::metrics::ErrorAccumulator;
use crate::recipe::OutputFormat;

/// What one chunk produced.
#[derive(Debug, Clone, Default)]
pub struct ChunkOutput {
    /// Bytes to append to the output: reconstruction (safetensors) or a frame (spz).
    pub bytes: Vec<u8>,
    /// Exact bits of the compact representation (before entropy coding).
    pub repr_bits: u64,
}

/// Compresses one chunk of whole rows of `dtype` under `plan`; see the module docs.
pub fn process_chunk(
    plan: &TensorPlan,
    dtype: DType,
    row_len: usize,
    input: &[u8],
    format: OutputFormat,
    acc: &mut ErrorAccumulator,
) -> Result<ChunkOutput, CodecError> {
    if plan.is_identity() && format == OutputFormat::Safetensors {
        return Ok(ChunkOutput {
            bytes: input.to_vec(),
            repr_bits: input.len() as u64 * 8,
        });
    }
    // Adds the error to `acc` (nothing for an identity plan); the fused RTN path measures it
    // while it encodes.
    let encoded = encode_chunk_measured(plan, dtype, row_len, input, acc)?;
    let repr_bits = encoded.repr_bits;
    let bytes = match format {
        OutputFormat::Safetensors => encoded.reconstruction,
        OutputFormat::Spz => encoded.frame(),
    };
    Ok(ChunkOutput { bytes, repr_bits })
}

#[cfg(test)]
mod tests;
