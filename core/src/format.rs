//! Output formats: how a job's compressed tensors become bytes that a reader loads.
//!
//! A pass returns a representation (a reconstruction, affine codes, FP8 codes, entropy-coded
//! sections); a format decides what of it is written and in which layout. Each format is one
//! submodule implementing [`Format`], a small trait with the five things a distributed job
//! needs from it:
//!
//! 1. at submit, [`Format::adapt_plan`] refuses a tensor plan the format cannot hold (naming the
//!    tensor and pass) and fixes what the format dictates (the dtype scales are stored in);
//! 2. [`Format::output_tensors`] lays out a task's output before any data exists (the
//!    safetensors header reflects the *output*: packed dtypes and extra tensors such as
//!    scales), so a worker streams its shard;
//! 3. [`Format::tensor_writer`] turns each encoded chunk into the bytes written now, and the
//!    tensor's trailing bytes (buffered side tensors) when it ends;
//! 4. [`Format::finish_plan`] plans the job's finishing step as a pure function of the plan:
//!    the shard index, the `quantization_config` for `config.json`, an assembly task;
//! 5. a reader (per format module) turns the output back into values, for tests and tools.
//!
//! Worker and coordinator only move bytes around these; [`OutputFormat::spec`] is the one
//! exhaustive `match` from the enum to the implementations.

pub mod compressed_tensors;
pub mod gguf;
pub mod safetensors;
pub mod spz;

use std::collections::BTreeMap;

use crate::codec::{self, encode_chunk_measured, CodecError, EncodedChunk, TensorPlan};
use crate::dtype::DType;
use crate::metrics::ErrorAccumulator;

/// Where the compressed model is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    /// Dequantized safetensors shards, readable by any safetensors loader.
    #[default]
    Safetensors,
    /// One `.spz` archive holding every pass's compact representation, entropy-coded.
    Spz,
    /// Hugging Face shards in the compressed-tensors layout (`pack-quantized`,
    /// `float-quantized`), which vLLM and transformers load.
    CompressedTensors,
    /// One GGUF file of llama.cpp block types, which llama.cpp and ollama load.
    Gguf,
}

impl OutputFormat {
    /// Every format, in the order the CLI lists them.
    pub const ALL: [OutputFormat; 4] = [
        OutputFormat::Safetensors,
        OutputFormat::CompressedTensors,
        OutputFormat::Gguf,
        OutputFormat::Spz,
    ];

    /// Parses a format's name (`safetensors`, `spz`, `compressed-tensors`, `gguf`).
    pub fn parse(s: &str) -> Option<OutputFormat> {
        OutputFormat::ALL.into_iter().find(|f| f.as_str() == s)
    }

    /// The name used on the command line and in recipes.
    pub fn as_str(self) -> &'static str {
        self.spec().name()
    }

    /// `"safetensors, compressed-tensors, gguf, spz"`, for messages.
    pub fn names() -> String {
        let names: Vec<&str> = OutputFormat::ALL.iter().map(|f| f.as_str()).collect();
        names.join(", ")
    }

    /// The implementation of this format.
    pub fn spec(self) -> &'static dyn Format {
        match self {
            OutputFormat::Safetensors => &safetensors::Safetensors,
            OutputFormat::Spz => &spz::Spz,
            OutputFormat::CompressedTensors => &compressed_tensors::CompressedTensors,
            OutputFormat::Gguf => &gguf::Gguf,
        }
    }
}

/// What plans and formats need to know about the whole model, beyond one tensor: found once
/// when a job is submitted (from `config.json` and the tensor list) and sent to every worker
/// with its lease, so that all of them make the same plans.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelFacts {
    /// The llama-family model a GGUF file or a `gguf` pass is made for.
    pub gguf: Option<gguf::GgufModel>,
}

impl ModelFacts {
    /// The facts as sent in a lease.
    pub fn to_json(&self) -> String {
        // Plain data always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses [`Self::to_json`]'s output; empty text is "no facts".
    pub fn from_json(text: &str) -> Result<ModelFacts, String> {
        if text.is_empty() {
            return Ok(ModelFacts::default());
        }
        serde_json::from_str(text).map_err(|e| format!("model facts: {e}"))
    }
}

/// One input tensor as a format sees it.
#[derive(Debug, Clone, Copy)]
pub struct TensorDesc<'a> {
    pub name: &'a str,
    pub dtype: DType,
    /// Row-major shape.
    pub shape: &'a [u64],
}

impl TensorDesc<'_> {
    /// Rows and row length of the tensor viewed as a matrix (a 1-D tensor is one row).
    pub fn matrix(&self) -> (u64, u64) {
        let row_len = crate::quantize::row_len_of(self.shape).max(1);
        let elems: u64 = self.shape.iter().product();
        (elems / row_len, row_len)
    }
}

/// One tensor of a task's output file (a safetensors header entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

/// Why a format cannot write what was asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FormatError {
    #[error("tensor {tensor}: --format {format} cannot store {pass}: {reason}")]
    Unsupported {
        format: &'static str,
        tensor: String,
        pass: String,
        reason: String,
    },
    #[error("recipe {recipe}: --format {format} {reason}")]
    Recipe {
        format: &'static str,
        recipe: String,
        reason: String,
    },
    #[error("tensor {tensor}: {reason}")]
    Layout { tensor: String, reason: String },
    #[error("--format {format}: {reason}")]
    Model {
        format: &'static str,
        reason: String,
    },
}

/// What the coordinator does once every task is done (besides report and manifest).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FinishPlan {
    /// `model.safetensors.index.json`: each output tensor's shard.
    pub index: Option<ShardIndex>,
    /// The `quantization_config` to set in the output's `config.json`.
    pub quantization_config: Option<serde_json::Value>,
    /// Companion files (config, tokenizer...) are copied next to the shards; otherwise the
    /// format embeds them (`.spz`, GGUF).
    pub copy_companions: bool,
    /// A worker assembles the task outputs into one object.
    pub assembly: Option<Assembly>,
}

/// How the task outputs become one object.
#[derive(Debug, Clone, PartialEq)]
pub enum Assembly {
    /// `.spz`: the parts' records, then companion files, index and footer.
    Spz,
    /// GGUF: the header (and synthesized tensors), then the parts, each task's tensors in
    /// order, every one padded to the alignment.
    Gguf(gguf::GgufAssembly),
}

/// The content of `model.safetensors.index.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardIndex {
    /// Output tensor name -> shard object name.
    pub weight_map: BTreeMap<String, String>,
    /// Bytes of tensor data in all shards (headers not counted).
    pub total_size: u64,
}

/// A finished task as the finishing step sees it.
#[derive(Debug, Clone)]
pub struct FinishedTask<'a> {
    pub output_name: &'a str,
    pub tensors: Vec<(TensorDesc<'a>, &'a TensorPlan)>,
}

/// An output format; see the module docs.
pub trait Format: Sync {
    /// The name used on the command line and in recipes.
    fn name(&self) -> &'static str;

    /// One line for the report, e.g. `"safetensors (dequantized, input dtype)"`.
    fn describe(&self) -> &'static str;

    /// Checks a recipe as a whole at submit (before any header is read).
    fn check_recipe(&self, recipe: &crate::recipe::Recipe) -> Result<(), FormatError>;

    /// Refuses a plan this format cannot store, and adapts the plan to what the format
    /// dictates (e.g. the dtype of stored scales, a tensor's place in a GGUF file). Called at
    /// submit and by every worker, so both run the same plan.
    /// The default puts the plan's scales on the grid every format shares
    /// ([`set_scale_grid`]) and refuses nothing.
    fn adapt_plan(
        &self,
        tensor: TensorDesc<'_>,
        plan: &mut TensorPlan,
        _model: &ModelFacts,
    ) -> Result<(), FormatError> {
        set_scale_grid(tensor.dtype, plan);
        Ok(())
    }

    /// Object name of task `index`'s output (of `total` tasks).
    fn task_output_name(&self, index: usize, total: usize) -> String;

    /// Whether task outputs are parts that assembly tasks copy into the output files (so
    /// only the files' hashes are needed, not the parts').
    fn assembles_parts(&self) -> bool {
        false
    }

    /// The tensors written for one input tensor, in write order; empty when task outputs
    /// are not safetensors files (`.spz` parts hold records, not tensors).
    fn output_tensors(&self, tensor: TensorDesc<'_>, plan: &TensorPlan) -> Vec<OutputTensor>;

    /// A writer for one tensor's bytes.
    fn tensor_writer(&self, tensor: TensorDesc<'_>, plan: &TensorPlan) -> TensorWriter;

    /// The job's finishing step, a pure function of the finished tasks.
    fn finish_plan(&self, tasks: &[FinishedTask<'_>]) -> FinishPlan;
}

/// Sets the grid a plan's scales are rounded up to, the same in every format so that their
/// outputs dequantize identically: a BF16 tensor's affine scales on the bf16 grid, any other
/// tensor's on the f16 grid (exact in F16 and F32 alike); FP8 scales on the tensor dtype's
/// grid (exact f32 for F32); HQQ's integer-zero scales rounded to nearest on the affine grid.
/// Runtimes load scales into the tensor's dtype, so a scale must be exact there.
pub(crate) fn set_scale_grid(dtype: DType, plan: &mut TensorPlan) {
    use crate::recipe::{PassKind, ScaleDtype};
    match plan.values.as_mut() {
        Some(PassKind::Quantize(cfg)) => {
            cfg.scale_dtype = match dtype {
                DType::BF16 => ScaleDtype::Bf16,
                _ => ScaleDtype::F16,
            }
        }
        Some(PassKind::Hqq(cfg)) => {
            cfg.scale_dtype = match dtype {
                DType::BF16 => ScaleDtype::Bf16,
                _ => ScaleDtype::F16,
            }
        }
        Some(PassKind::Fp8 { scale_dtype, .. }) => *scale_dtype = ScaleDtype::of(dtype),
        _ => {}
    }
}

/// The safetensors header prefix of a task's output under `format` (empty when its outputs
/// are not safetensors files), from the tensors and their (adapted) plans.
pub fn task_prefix(
    format: &dyn Format,
    tensors: &[(TensorDesc<'_>, &TensorPlan)],
) -> Result<Vec<u8>, FormatError> {
    let layout: Vec<(String, DType, Vec<u64>)> = tensors
        .iter()
        .flat_map(|(t, plan)| format.output_tensors(*t, plan))
        .map(|o| (o.name, o.dtype, o.shape))
        .collect();
    if layout.is_empty() {
        return Ok(Vec::new());
    }
    let metadata = [("format".to_string(), "pt".to_string())].into();
    let (prefix, _) =
        crate::header::encode_header(&layout, &metadata).map_err(|e| FormatError::Layout {
            tensor: tensors
                .first()
                .map(|(t, _)| t.name.to_owned())
                .unwrap_or_default(),
            reason: e.to_string(),
        })?;
    Ok(prefix)
}

/// The shard index of a format whose every task output is one safetensors shard.
pub(crate) fn shard_index(format: &dyn Format, tasks: &[FinishedTask<'_>]) -> ShardIndex {
    let mut index = ShardIndex::default();
    for task in tasks {
        for (tensor, plan) in &task.tensors {
            for out in format.output_tensors(*tensor, plan) {
                let elems = out.shape.iter().fold(1u64, |a, &d| a.saturating_mul(d));
                index.total_size = index
                    .total_size
                    .saturating_add(elems.saturating_mul(out.dtype.size_bytes() as u64));
                index
                    .weight_map
                    .insert(out.name, task.output_name.to_owned());
            }
        }
    }
    index
}

/// What one chunk produced.
#[derive(Debug, Clone, Default)]
pub struct ChunkOutput {
    /// Bytes to append to the task's output now.
    pub bytes: Vec<u8>,
    /// Exact bits of the compact representation (before entropy coding).
    pub repr_bits: u64,
    /// Rows stored unchanged because they hold NaN or infinities (`non_finite: keep`).
    pub kept_rows: u64,
}

/// Turns one tensor's chunks into output bytes, in a format's layout.
#[derive(Debug)]
pub enum TensorWriter {
    /// The reconstruction in the input dtype (the input itself for an unchanged tensor).
    Reconstruction,
    /// `.spz` records: each chunk's entropy-coded frame, prefixed with its `u64` length.
    Frames,
    /// compressed-tensors `pack-quantized`: packed codes now, the rest at the end.
    PackQuantized(compressed_tensors::PackState),
    /// compressed-tensors `float-quantized`: FP8 bytes now, the scales at the end.
    FloatQuantized(compressed_tensors::FloatState),
    /// GGUF: the tensor's bytes in its ggml type, padded to the file's alignment.
    Gguf(gguf::GgufState),
}

impl TensorWriter {
    /// Compresses one chunk of whole rows of `dtype` under `plan` (adding its error to
    /// `acc`) and returns the bytes to write now.
    pub fn chunk(
        &mut self,
        plan: &TensorPlan,
        dtype: DType,
        row_len: usize,
        input: &[u8],
        acc: &mut ErrorAccumulator,
    ) -> Result<ChunkOutput, CodecError> {
        if plan.is_identity() {
            match self {
                // `.spz` records every tensor as a frame.
                TensorWriter::Frames => {}
                TensorWriter::Gguf(state) => return state.unchanged(dtype, input),
                _ => {
                    return Ok(ChunkOutput {
                        bytes: input.to_vec(),
                        repr_bits: input.len() as u64 * 8,
                        kept_rows: 0,
                    })
                }
            }
        }
        let keeps = matches!(self, TensorWriter::Reconstruction | TensorWriter::Frames);
        if plan.keep_non_finite_rows && keeps {
            if let Some(split) = split_non_finite_rows(plan, dtype, row_len, input, acc)? {
                return split.output(matches!(self, TensorWriter::Frames), row_len, input);
            }
        }
        let encoded = match self {
            TensorWriter::Reconstruction => {
                encode_chunk_measured(plan, dtype, row_len, input, acc)?
            }
            _ => codec::encode_chunk_representation(plan, dtype, row_len, input, acc)?,
        };
        let repr_bits = encoded.repr_bits;
        let bytes = match self {
            TensorWriter::Reconstruction => encoded.reconstruction,
            TensorWriter::Frames if plan.writes_frame() => length_prefixed(encoded.frame()),
            TensorWriter::Frames => Vec::new(),
            TensorWriter::PackQuantized(state) => state.chunk(encoded)?,
            TensorWriter::FloatQuantized(state) => state.chunk(encoded)?,
            TensorWriter::Gguf(state) => state.chunk(encoded)?,
        };
        Ok(ChunkOutput {
            bytes,
            repr_bits,
            kept_rows: 0,
        })
    }

    /// The bytes that follow the tensor's chunks (side tensors buffered while streaming).
    pub fn finish(self) -> Result<Vec<u8>, CodecError> {
        match self {
            TensorWriter::Reconstruction | TensorWriter::Frames => Ok(Vec::new()),
            TensorWriter::PackQuantized(state) => state.finish(),
            TensorWriter::FloatQuantized(state) => state.finish(),
            TensorWriter::Gguf(state) => state.finish(),
        }
    }
}

/// Refuses `non_finite: keep` for a format that stores codes, not values in the input dtype.
pub(crate) fn refuse_kept_rows(
    format: &'static str,
    recipe: &crate::recipe::Recipe,
) -> Result<(), FormatError> {
    match recipe.keep_non_finite_rows {
        false => Ok(()),
        true => Err(FormatError::Recipe {
            format,
            recipe: recipe.name.clone(),
            reason: "non_finite: keep stores rows with NaN or infinities unchanged, in the input dtype, which only --format safetensors and spz hold".into(),
        }),
    }
}

/// A `.spz` record's frame, preceded by its `u64` length.
fn length_prefixed(frame: Vec<u8>) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(frame.len() + 8);
    bytes.extend_from_slice(&(frame.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&frame);
    bytes
}

/// A chunk holding rows with NaN or infinities (`non_finite: keep`): which rows those are,
/// and the other rows compressed (and measured) together.
struct NonFiniteSplit {
    keep: Vec<bool>,
    kept_rows: usize,
    /// The finite rows, unless every row is kept.
    finite: Option<EncodedChunk>,
}

/// Splits a chunk at its non-finite rows; `None` when every row is finite.
fn split_non_finite_rows(
    plan: &TensorPlan,
    dtype: DType,
    row_len: usize,
    input: &[u8],
    acc: &mut ErrorAccumulator,
) -> Result<Option<NonFiniteSplit>, CodecError> {
    let row_bytes = row_len * dtype.size_bytes();
    if row_bytes == 0 || input.len() % row_bytes != 0 || !dtype.is_decodable_float() {
        return Ok(None);
    }
    let mut values = vec![0f32; row_len];
    let mut keep = Vec::with_capacity(input.len() / row_bytes);
    for row in input.chunks_exact(row_bytes) {
        crate::dtype::decode_to_f32(dtype, row, &mut values)?;
        keep.push(values.iter().any(|v| !v.is_finite()));
    }
    let kept_rows = keep.iter().filter(|&&k| k).count();
    if kept_rows == 0 {
        return Ok(None);
    }
    let finite: Vec<u8> = rows_where(input, row_bytes, &keep, false).concat();
    let finite = match finite.is_empty() {
        true => None,
        false => Some(encode_chunk_measured(plan, dtype, row_len, &finite, acc)?),
    };
    Ok(Some(NonFiniteSplit {
        keep,
        kept_rows,
        finite,
    }))
}

/// The rows of `input` whose flag in `keep` is `flag`.
fn rows_where<'a>(
    input: &'a [u8],
    row_bytes: usize,
    keep: &'a [bool],
    flag: bool,
) -> Vec<&'a [u8]> {
    input
        .chunks_exact(row_bytes)
        .zip(keep)
        .filter(|(_, &k)| k == flag)
        .map(|(row, _)| row)
        .collect()
}

impl NonFiniteSplit {
    /// The chunk's output: the reconstruction with the kept rows unchanged, or (`frames`) an
    /// `.spz` frame holding the kept rows and the others' frame.
    fn output(self, frames: bool, row_len: usize, input: &[u8]) -> Result<ChunkOutput, CodecError> {
        let row_bytes = input.len() / self.keep.len();
        let repr_bits = self.finite.as_ref().map_or(0, |e| e.repr_bits)
            + (self.kept_rows * row_bytes) as u64 * 8;
        let bytes = if frames {
            let kept = rows_where(input, row_bytes, &self.keep, true).concat();
            let inner = self.finite.as_ref().map(EncodedChunk::frame);
            let rows = self.keep.len();
            length_prefixed(codec::kept_rows_frame(
                rows,
                row_len,
                &self.keep,
                &kept,
                inner.as_deref(),
            ))
        } else {
            let mut compressed = self
                .finite
                .as_ref()
                .map(|e| e.reconstruction.chunks_exact(row_bytes))
                .into_iter()
                .flatten();
            let mut bytes = Vec::with_capacity(input.len());
            for (row, &k) in input.chunks_exact(row_bytes).zip(&self.keep) {
                let row = match k {
                    true => Some(row),
                    false => compressed.next(),
                };
                bytes.extend_from_slice(row.ok_or_else(|| {
                    CodecError::Corrupt("fewer compressed rows than finite rows".into())
                })?);
            }
            bytes
        };
        Ok(ChunkOutput {
            bytes,
            repr_bits,
            kept_rows: self.kept_rows as u64,
        })
    }
}

#[cfg(test)]
mod gguf_tests;
#[cfg(test)]
mod tests;
