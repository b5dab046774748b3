//! GGUF building blocks: llama.cpp's block quantizers and the GGUF v3 file layout, as pure
//! functions (no I/O).
//!
//! GGUF is the single-file model format of llama.cpp and ollama: a header (magic `GGUF`,
//! version, key/value metadata, one info record per tensor), padding up to an aligned data
//! section, then every tensor's bytes, each starting at an aligned offset. Tensors are stored
//! in ggml element types; the block types pack a fixed number of consecutive values of one row
//! (32 or 256) into a fixed number of bytes.
//!
//! - [`quants`]: the ggml types this crate writes ([`GgmlType`]: F32, F16, BF16, Q8_0, Q4_0,
//!   Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) and their quantizers/dequantizers, ported from the reference code of
//!   llama.cpp's `ggml/src/ggml-quants.c` (`quantize_row_*_ref`, `dequantize_row_*`) with the
//!   same f32 operations in the same order, so the bytes match llama.cpp (built without FMA
//!   contraction) and the dequantized values match gguf-py's bit for bit.
//! - [`writer`]: [`layout`] computes a whole file's header bytes and every tensor's absolute
//!   byte range from names, shapes and types alone, before any tensor data exists, so the
//!   tensors of one file can be quantized and written by different workers independently;
//!   [`parse_header`] reads a header back (bounds-checked, for verification).
//! - [`llama`]: the model side of llama.cpp's `convert_hf_to_gguf.py` and `llama-quantize` for
//!   llama/Mistral/Qwen2/Qwen3 checkpoints: architecture, metadata keys, tensor names, the Q/K
//!   row permutation, synthesized tensors and each tensor's type for a [`FileType`].
//! - [`tokenizer`]: the GGUF tokenizer metadata of a byte-level BPE `tokenizer.json`.
//!
//! Shapes in this module's API are row-major (as safetensors stores them: the last dimension is
//! the row). GGUF stores dimensions innermost first, so the writer reverses them, and a block
//! never crosses a row: the row length must be a multiple of the type's block size.

pub mod llama;
pub mod quants;
pub mod tokenizer;
pub mod writer;

#[cfg(test)]
pub(crate) mod llama_tests;
#[cfg(test)]
mod tests;

pub use llama::{
    architecture, expert_index, extra_tensors, map_tensor, metadata, permute_rows, row_permutation,
    tensor_name, tensor_type, tensor_type_in, type_fallback, Arch, FileType, HParams, TypeContext,
};
pub use quants::GgmlType;
pub use tokenizer::{detect_pre_tokenizer, tokenizer_metadata, TokenizerFiles};
pub use writer::{
    layout, parse_header, GgufLayout, MetaArray, MetaValue, ParsedGguf, ParsedTensor, TensorLayout,
};

/// Why a GGUF operation was rejected. Bad lengths and hostile headers give errors, never panics.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GgufError {
    #[error("{ty}: {len} values is not a multiple of the block size {block}")]
    RaggedValues {
        ty: GgmlType,
        len: usize,
        block: usize,
    },
    #[error("{ty}: {values} values take {want} bytes, {got} given")]
    ByteLength {
        ty: GgmlType,
        values: usize,
        want: usize,
        got: usize,
    },
    #[error("{ty}: row length {row} is not a multiple of the block size {block}")]
    RaggedRow { ty: GgmlType, row: u64, block: u64 },
    #[error("unknown or unsupported ggml type id {0}")]
    UnknownType(u32),
    #[error("unknown ggml type name {0:?}")]
    UnknownTypeName(String),
    #[error("tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("tensor {0:?} appears more than once")]
    DuplicateTensor(String),
    #[error("metadata key {0:?} appears more than once")]
    DuplicateKey(String),
    #[error("alignment {0} is not a power of two that fits in u32")]
    BadAlignment(u64),
    #[error("metadata general.alignment is {found}, but the layout uses alignment {expected}")]
    AlignmentConflict { expected: u64, found: String },
    #[error("a size or offset overflows u64")]
    Overflow,
    #[error("header truncated: {needed} bytes needed at offset {at}, only {available} left")]
    Truncated {
        at: usize,
        needed: u64,
        available: usize,
    },
    #[error("not a GGUF file (magic {0:?})")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (2 and 3 are read, 3 is written)")]
    UnsupportedVersion(u32),
    #[error("invalid GGUF header: {0}")]
    Invalid(String),
    #[error("unsupported model architecture {found:?}: {reason} (supported: {supported})")]
    UnsupportedArchitecture {
        found: String,
        reason: String,
        supported: String,
    },
    #[error("config.json: {0}")]
    BadConfig(String),
    #[error("missing tokenizer: {0}")]
    MissingTokenizer(String),
    #[error("unsupported tokenizer: {0}")]
    UnsupportedTokenizer(String),
    #[error("invalid tokenizer: {0}")]
    BadTokenizer(String),
}
