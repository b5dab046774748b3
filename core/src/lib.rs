//! shardpress-core: the pure, synchronous compute of shardpress.
//!
//! Nothing here does I/O, networking or reads clocks; every function is a deterministic
//! function of its inputs, so the coordinator, workers and CLI share exactly one definition
//! of each rule. Layout:
//! - [`dtype`]: safetensors element types and the BF16/F16/F32 <-> f32 codecs.
//! - [`header`]: parsing and validating (hostile) safetensors headers, and writing them.
//! - [`recipe`]: the YAML compression recipe (passes, targets, quality gates) and presets.
//! - [`metrics`]: deterministic error accumulation (relative error, SNR, cosine).
//! - [`plan`]: splitting a model's tensors into tasks under a byte budget.
//! - [`format`]: output formats (dequantized safetensors, compressed-tensors, `.spz`): one
//!   trait, one module each; turns a chunk's representation into the bytes a reader loads.
//! - Passes: [`quantize`] (RTN; dense RTN chunks run fused in `rtn_fused`), [`hqq`] (optimized affine), [`codebook`] (k-means, NF4),
//!   [`fp8`], [`prune`] and [`sparse`] (masks and their storage), [`lowrank`] (randomized
//!   SVD), [`dct`] (transform coding), [`hashnet`] (hashed weight sharing).
//! - [`codec`]: a tensor's plan (structure + values stage) and its stored representation.
//! - [`entropy`]: the lossless byte-plane entropy coder applied to every stored section.
//! - [`spz`]: the single-file `.spz` archive format.
//! - [`gguf`]: llama.cpp's GGUF format: bit-compatible block quantizers (Q8_0, Q4_0, Q4_K,
//!   Q5_K, Q6_K) and the file layout computed from shapes before any data exists.
//! - [`similarity`]: sketches and cosine for sharing near-identical tensors.
//! - [`stream`]: whole-tensor statistics (per-tensor scales, magnitude cuts, row/column norms,
//!   k-means histograms) gathered chunk by chunk, so those passes run in bounded memory;
//!   `stream::solver` solves low-rank, per-tensor HQQ and hashed sharing over streamed passes.
//! - [`calibrated`]: calibrated methods from a Linear's input Hessian (GPTQ, AWQ-style range
//!   search, SparseGPT, Wanda) and the Hessian accumulator the workers fill.
//! - [`precision`]: mixed precision to a bit budget (each quantized tensor's width).
//! - [`memory`]: what a tensor's pass needs in memory (for worker limits and task routing).

pub mod calibrated;
pub mod codebook;
pub mod codec;
pub mod dct;
pub mod dtype;
pub mod entropy;
pub mod format;
pub mod fp8;
mod ggml_fused;
pub mod gguf;
pub mod hashnet;
pub mod header;
pub mod hqq;
pub mod lowrank;
pub mod memory;
pub mod metrics;
pub mod plan;
pub mod precision;
pub mod prune;
pub mod quantize;
pub mod recipe;
mod rtn_fused;
pub mod similarity;
pub mod solved;
pub mod sparse;
pub mod spz;
pub mod stream;
