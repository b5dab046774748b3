//! shardpress-core: the pure, synchronous compute of shardpress.
//!
//! Nothing here does I/O, networking or reads clocks; every function is a deterministic
//! function of its inputs, so the coordinator, workers and CLI share exactly one definition
//! of each rule. Layout:
//! - [`dtype`]: safetensors element types and the BF16/F16/F32 <-> f32 codecs.
//! - [`header`]: parsing and validating (hostile) safetensors headers, and writing them.
//! - [`recipe`]: the YAML compression recipe (passes, targets, quality gates) and presets.
//! - [`quantize`]: round-to-nearest quantization (quantize then dequantize) of rows.
//! - [`metrics`]: deterministic error accumulation (relative error, SNR, cosine).
//! - [`plan`]: splitting a model's tensors into tasks under a byte budget.
//! - [`pipeline`]: the per-chunk compute a worker runs (decode, passes, encode, metrics).

pub mod dtype;
pub mod header;
pub mod metrics;
pub mod pipeline;
pub mod plan;
pub mod quantize;
pub mod recipe;
