//! Tensor codecs: what a recipe does to one tensor, and the compact representation it stores.
//!
//! A tensor's passes form a [`TensorPlan`] of at most two stages, checked when a job is
//! submitted (so a bad combination is an error before any work starts):
//!
//! 1. *structure* (optional, pruning): which weights are stored at all. Unstructured magnitude
//!    pruning keeps a bitmask, N:M keeps `ceil(log2 m)`-bit positions per kept weight,
//!    row/column pruning keeps one bit per row/column. The kept weights are *compacted*: rows
//!    or columns are removed, masked weights are gathered into one row of `nnz` values (N:M
//!    keeps rows of `row_len*n/m`).
//! 2. *values* (optional): how the compacted weights are stored: affine codes (RTN or HQQ),
//!    a codebook (k-means, NF4), FP8, two low-rank factors, sparse DCT coefficients or hashed
//!    buckets. Without a values pass the kept weights stay in the tensor's dtype.
//!
//! [`encode_chunk`] applies a plan to a chunk of whole rows and returns both the
//! reconstruction (what a reader of dequantized safetensors sees, in the original dtype) and
//! the representation as named byte *sections*. [`EncodedChunk::frame`] entropy-codes the
//! sections into a self-describing frame (a small JSON header, then the sections);
//! [`decode_frame`] reverses it. Anything stored in the tensor's dtype (kept values, factors,
//! coefficients) is rounded to that dtype *before* the reconstruction is computed, so the
//! reconstruction is exactly what decoding a frame yields.
//!
//! The general path decodes the whole chunk to f32, runs the stages on it and encodes the
//! reconstruction back. Dense RTN plans (no structure pass, per-group or per-channel RTN)
//! instead take a fused path that decodes, quantizes and encodes block by block in cache
//! (with AVX2 when the CPU has it) and writes every output straight into place; it produces
//! the same bytes, and [`encode_chunk_measured`] also yields the error metrics from the
//! same pass. [`encode_chunk_general`] keeps the general path callable as the reference.

use crate::dtype::{self, decode_to_f32, encode_from_f32, DType, DTypeError};
use crate::entropy::{self, Layout};
use crate::metrics::ErrorAccumulator;
use crate::prune::GlobalCut;
use crate::recipe::{PassKind, PruneConfig, RankRule, Recipe, Width};
use crate::stream::{FixedStructure, FixedValues, TensorStatistic};
use crate::{codebook, fp8, ggml_fused, hashnet, hqq, lowrank, prune, quantize, rtn_fused, sparse};
use half::f16;
use serde::{Deserialize, Serialize};

/// Fixed seed for the randomized passes (SVD sketch, hashing) so results are reproducible.
pub(crate) const PASS_SEED: u64 = 0x5eed_5eed;

/// Weights per chunk of a magnitude-pruned tensor ([`TensorPlan::fixed_chunk_rows`]): 1 MiB
/// of F32, small beside any memory limit a worker runs under.
pub const MAGNITUDE_BLOCK_WEIGHTS: u64 = 1 << 18;

/// Why a recipe cannot be applied to a tensor (reported at submit time).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("tensor {tensor}: passes[{later}] ({later_kind}) and passes[{earlier}] ({earlier_kind}) both {stage}; a tensor takes at most one of each stage")]
    TwoOfAStage {
        tensor: String,
        stage: &'static str,
        earlier: usize,
        earlier_kind: String,
        later: usize,
        later_kind: String,
    },
    #[error("tensor {tensor}: pruning passes[{prune}] must come before passes[{values}] ({values_kind}) in the recipe")]
    PruneAfterValues {
        tensor: String,
        prune: usize,
        values: usize,
        values_kind: String,
    },
    #[error("tensor {tensor}: {reason}")]
    Incompatible { tensor: String, reason: String },
    #[error(transparent)]
    Format(#[from] crate::format::FormatError),
}

/// Why a chunk could not be encoded or a frame decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("dtype {dtype} cannot be compressed (supported: BF16, F16, F32)")]
    UnsupportedDtype { dtype: DType },
    #[error("chunk of {len} bytes is not a whole number of rows ({row_len} elements of {elem_size} bytes)")]
    RaggedInput {
        len: usize,
        row_len: usize,
        elem_size: usize,
    },
    #[error("{pass} failed: {message}")]
    Pass { pass: &'static str, message: String },
    #[error("{count} non-finite weight(s) in a chunk (the first, its element {first}, is {value}); a quantizer would spread them over their group, so the tensor is refused: fix the checkpoint, add the tensor to the recipe's ignore list, or set `non_finite: keep` to store such rows unchanged (safetensors output)")]
    NonFinite {
        count: usize,
        first: usize,
        value: f32,
    },
    #[error("corrupt frame: {0}")]
    Corrupt(String),
    #[error(transparent)]
    DType(#[from] DTypeError),
    #[error("corrupt frame section: {0}")]
    Entropy(#[from] entropy::EntropyError),
}

fn corrupt(msg: impl Into<String>) -> CodecError {
    CodecError::Corrupt(msg.into())
}

fn pass_err(pass: &'static str) -> impl Fn(String) -> CodecError {
    move |message| CodecError::Pass { pass, message }
}

/// The stages a recipe applies to one tensor.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TensorPlan {
    pub structure: Option<PruneConfig>,
    pub values: Option<PassKind>,
    /// Why targeted passes were not applied (non-float dtype, 1-D tensor); empty otherwise.
    pub note: String,
    /// For a global magnitude prune: the cut of the whole job's merged histogram, set by
    /// the worker from its lease ([`TensorPlan::needs_global_cut`]).
    pub global_cut: Option<GlobalCut>,
    /// Where the tensor goes in a GGUF file (its name there, type, row permutation); set by
    /// the gguf format's `adapt_plan`.
    pub gguf: Option<crate::format::gguf::GgufTensor>,
    /// Rows holding NaN or infinities are stored unchanged (recipe `non_finite: keep`).
    pub keep_non_finite_rows: bool,
    /// Whole-tensor statistics of the values stage, gathered by a first pass over the
    /// tensor's chunks ([`crate::stream`]); used instead of each chunk's own.
    pub fixed_values: Option<FixedValues>,
    /// The row/column pruning decision for the whole tensor, gathered the same way.
    pub fixed_structure: Option<FixedStructure>,
    /// The calibrated method (GPTQ, SparseGPT, ...) that chooses this tensor's codes or
    /// kept weights; its result, computed by the calibration round, comes in as
    /// [`FixedValues::Solved`]. Without that result the data-free pass of `values` /
    /// `structure` runs (and the report says the tensor was not calibrated).
    pub calibrated: Option<crate::recipe::Calibrated>,
}

impl TensorPlan {
    /// The plan for `name` under `recipe`, or why the recipe's passes cannot be combined on it.
    /// A width the recipe's mixed precision chose for the tensor replaces its quantizing
    /// pass's.
    pub fn for_tensor(
        recipe: &Recipe,
        name: &str,
        dtype: DType,
        shape: &[u64],
    ) -> Result<TensorPlan, PlanError> {
        let chosen = (recipe.mixed_precision.as_ref()).and_then(|m| m.chosen.get(name).copied());
        TensorPlan::for_tensor_at(recipe, name, dtype, shape, chosen)
    }

    /// [`Self::for_tensor`] with the quantizing pass at `width` (`None`: as the recipe says).
    fn for_tensor_at(
        recipe: &Recipe,
        name: &str,
        dtype: DType,
        shape: &[u64],
        width: Option<Width>,
    ) -> Result<TensorPlan, PlanError> {
        let chosen = || {
            (recipe.passes.iter().enumerate())
                .filter(|(_, p)| p.targets.iter().any(|m| m.matches(name)))
                .filter(|(_, p)| !p.ignore.iter().any(|m| m.matches(name)))
        };
        let selected: Vec<(usize, &PassKind)> = chosen().map(|(i, p)| (i, &p.kind)).collect();
        let calibrated = chosen().find_map(|(_, p)| p.calibrated);
        if selected.is_empty() {
            return Ok(TensorPlan::default());
        }
        if !dtype.is_decodable_float() {
            return Ok(TensorPlan {
                note: format!(
                    "not compressed: dtype {} is not BF16/F16/F32",
                    dtype.as_safetensors()
                ),
                ..TensorPlan::default()
            });
        }
        if shape.len() < 2 {
            return Ok(TensorPlan {
                note: "not compressed: 1-D tensor".into(),
                ..TensorPlan::default()
            });
        }
        let mut structure: Option<(usize, PruneConfig)> = None;
        let mut values: Option<(usize, &PassKind)> = None;
        for &(i, kind) in &selected {
            if let PassKind::Prune(p) = kind {
                if let Some((j, _)) = structure {
                    return Err(two_of(name, "prune", j, &selected, i));
                }
                if let Some((j, v)) = values {
                    return Err(PlanError::PruneAfterValues {
                        tensor: name.into(),
                        prune: i,
                        values: j,
                        values_kind: v.describe(),
                    });
                }
                structure = Some((i, *p));
            } else {
                if let Some((j, _)) = values {
                    return Err(two_of(name, "store values", j, &selected, i));
                }
                values = Some((i, kind));
            }
        }
        let incompatible = |reason: String| PlanError::Incompatible {
            tensor: name.into(),
            reason,
        };
        let row_len = quantize::row_len_of(shape);
        if let Some((i, PruneConfig::NOfM { m, .. })) = structure {
            if row_len % m as u64 != 0 {
                return Err(incompatible(format!(
                    "passes[{i}] N:M pruning needs rows that are a multiple of {m} long, this tensor's rows have {row_len} weights"
                )));
            }
        }
        if let (Some((i, s)), Some((j, v))) = (structure, values) {
            let unstructured =
                matches!(s, PruneConfig::Magnitude { .. } | PruneConfig::NOfM { .. });
            let needs_matrix = matches!(
                v,
                PassKind::LowRank { .. } | PassKind::Dct { .. } | PassKind::Hashed { .. }
            );
            if let PassKind::Ggml { .. } = v {
                return Err(incompatible(format!(
                    "passes[{j}] ({}) stores dense rows of llama.cpp blocks, which cannot hold passes[{i}]'s pruning; drop one of them",
                    v.describe()
                )));
            }
            if unstructured && needs_matrix {
                return Err(incompatible(format!(
                    "passes[{j}] ({}) needs a dense matrix, but passes[{i}] (unstructured pruning) leaves scattered weights; use row/column pruning or drop one of them",
                    v.describe()
                )));
            }
        }
        let values = values.map(|(_, v)| match width.and_then(|w| w.apply(v)) {
            Some(narrowed) => narrowed,
            None => v.clone(),
        });
        Ok(TensorPlan {
            structure: structure.map(|(_, s)| s),
            values,
            note: String::new(),
            global_cut: None,
            gguf: None,
            keep_non_finite_rows: false,
            fixed_values: None,
            fixed_structure: None,
            calibrated,
        })
    }

    /// [`Self::for_tensor`] with what depends on the whole model resolved from `model` (a
    /// `gguf` pass's per-tensor type), checked against and adapted to the output `format`
    /// (which may refuse a pass it cannot store, or fix the dtype of stored scales).
    pub fn for_output(
        recipe: &Recipe,
        format: crate::format::OutputFormat,
        model: &crate::format::ModelFacts,
        name: &str,
        dtype: DType,
        shape: &[u64],
    ) -> Result<TensorPlan, PlanError> {
        let chosen = (recipe.mixed_precision.as_ref()).and_then(|m| m.chosen.get(name).copied());
        TensorPlan::for_output_at(recipe, format, model, (name, dtype, shape), chosen)
    }

    /// [`Self::for_output`] with the quantizing pass at `width` (`None`: as the recipe says):
    /// one of a mixed-precision job's candidates.
    pub fn for_output_at(
        recipe: &Recipe,
        format: crate::format::OutputFormat,
        model: &crate::format::ModelFacts,
        (name, dtype, shape): (&str, DType, &[u64]),
        width: Option<Width>,
    ) -> Result<TensorPlan, PlanError> {
        let mut plan = TensorPlan::for_tensor_at(recipe, name, dtype, shape, width)?;
        plan.keep_non_finite_rows = recipe.keep_non_finite_rows && !plan.is_identity();
        if let Some(PassKind::Ggml { file_type, ty }) = plan.values.as_mut() {
            let preset = crate::format::gguf::resolve_type(model, *file_type, name, shape)?;
            // A chosen width replaces the type only of tensors the file type block-quantizes
            // (norms and biases stay as they are), with llama.cpp's fallback for rows that are
            // not whole blocks of it.
            let ncols = shape.last().copied().unwrap_or(0);
            *ty = Some(match *ty {
                Some(chosen) if preset.is_quantized() => crate::gguf::type_fallback(chosen, ncols),
                _ => preset,
            });
        }
        let tensor = crate::format::TensorDesc { name, dtype, shape };
        format.spec().adapt_plan(tensor, &mut plan, model)?;
        Ok(plan)
    }

    /// True when the plan's values stage is a quantizing pass whose width a recipe's mixed
    /// precision chooses (for a `gguf` pass: an output plan whose type is block-quantized).
    pub fn has_width(&self) -> bool {
        match &self.values {
            // An output plan's resolved type: only block-quantized tensors get a width.
            Some(PassKind::Ggml { ty, .. }) => ty.is_some_and(|t| t.is_quantized()),
            Some(v) => v.with_bits(4).is_some(),
            None => false,
        }
    }

    /// True for a magnitude prune against a global target, which needs [`Self::global_cut`].
    pub fn needs_global_cut(&self) -> bool {
        matches!(
            self.structure,
            Some(PruneConfig::Magnitude { global: true, .. })
        )
    }

    /// True when the plan changes nothing (the tensor is stored as is).
    pub fn is_identity(&self) -> bool {
        self.structure.is_none() && self.values.is_none()
    }

    /// True when a stage needs the whole tensor in memory at once, so the worker must process
    /// it as one chunk instead of streaming row chunks (see [`Self::whole_tensor_pass`]).
    pub fn needs_whole_tensor(&self) -> bool {
        self.whole_tensor_pass().is_some()
    }

    /// The pass that needs the whole tensor in memory at once, if any: low-rank and hashed
    /// sharing after row/column pruning or under `non_finite: keep` (the matrix they factor
    /// or index is then the kept rows, renumbered), and row pruning combined with
    /// `non_finite: keep` (the kept rows shift the row numbering). Every other whole-tensor
    /// statistic streams ([`Self::pending_statistic`]), and so do low-rank, hashed sharing and
    /// per-tensor HQQ on their own ([`crate::stream::solver`]).
    pub fn whole_tensor_pass(&self) -> Option<String> {
        let values = match &self.values {
            Some(PassKind::LowRank { .. } | PassKind::Hashed { .. }) => {
                self.structure.is_some() || self.keep_non_finite_rows
            }
            _ => false,
        };
        if values {
            return self.values.as_ref().map(PassKind::describe);
        }
        match self.structure {
            Some(s @ PruneConfig::Rows { .. }) if self.keep_non_finite_rows => Some(format!(
                "{} with non_finite: keep",
                PassKind::Prune(s).describe()
            )),
            _ => None,
        }
    }

    /// The next whole-tensor statistic this plan needs before its chunks can be encoded
    /// independently, or `None` once every one is fixed. The structure stage's comes first
    /// (the values stage's statistic is over the weights the structure keeps).
    pub fn pending_statistic(&self) -> Option<TensorStatistic> {
        use crate::recipe::Granularity::Tensor;
        if self.whole_tensor_pass().is_some() || self.is_solved() {
            return None;
        }
        let structure = match self.structure {
            Some(PruneConfig::Magnitude { global: false, .. }) if self.global_cut.is_none() => {
                Some(TensorStatistic::MagnitudeHistogram)
            }
            Some(PruneConfig::Rows { .. }) if self.fixed_structure.is_none() => {
                Some(TensorStatistic::RowScores)
            }
            Some(PruneConfig::Columns { .. }) if self.fixed_structure.is_none() => {
                Some(TensorStatistic::ColumnScores)
            }
            _ => None,
        };
        if structure.is_some() || self.fixed_values.is_some() {
            return structure;
        }
        match &self.values {
            Some(PassKind::Quantize(q)) if q.granularity == Tensor => Some(TensorStatistic::Range),
            Some(PassKind::Nf4 {
                granularity: Tensor,
            })
            | Some(PassKind::Fp8 {
                per_channel: false, ..
            }) => Some(TensorStatistic::Absmax),
            Some(PassKind::Kmeans { .. }) => Some(TensorStatistic::ValueHistogram),
            _ => None,
        }
    }

    /// The plan for the chunk whose first row is `first_row` of the tensor: the same plan,
    /// except that fixed row-pruning flags, low-rank factors and hashed buckets start at that
    /// row.
    pub fn for_chunk(&self, first_row: usize) -> TensorPlan {
        let mut plan = self.clone();
        if let Some(FixedStructure::Rows { first_row: at, .. }) = &mut plan.fixed_structure {
            *at = first_row;
        }
        if let Some(
            FixedValues::LowRank { first_row: at, .. }
            | FixedValues::Hashed { first_row: at, .. }
            | FixedValues::Solved { first_row: at, .. },
        ) = &mut plan.fixed_values
        {
            *at = first_row;
        }
        plan
    }

    /// Rows per chunk for a plan whose result would otherwise depend on where chunks end,
    /// `None` for the others: a magnitude prune (per tensor or global) rounds the count it
    /// drops inside the cut's bin per chunk, and the values stage after it sees each chunk's
    /// kept weights as one row (its scales, groups or codebook span the chunk). Such a tensor
    /// is therefore cut into blocks of [`MAGNITUDE_BLOCK_WEIGHTS`] weights (whole rows, at
    /// least one), whatever the configured chunk size or memory limit, so that its output is
    /// the same under any of them.
    pub fn fixed_chunk_rows(&self, row_len: u64) -> Option<u64> {
        match self.structure {
            Some(PruneConfig::Magnitude { .. }) => {
                Some((MAGNITUDE_BLOCK_WEIGHTS / row_len.max(1)).max(1))
            }
            _ => None,
        }
    }

    /// Whether a chunk under this plan writes a `.spz` frame of its own: not for the chunks
    /// after the first of a tensor whose low-rank factors or hashed buckets are fixed, whose
    /// one frame (written with the first chunk) holds the whole tensor.
    pub fn writes_frame(&self) -> bool {
        match &self.fixed_values {
            Some(
                FixedValues::LowRank { first_row, .. } | FixedValues::Hashed { first_row, .. },
            ) => *first_row == 0,
            _ => true,
        }
    }

    /// `"prune 2:4 + rtn int4 sym g64"`, or empty for the identity. A calibrated method is
    /// named only where its result is in the plan (`"gptq int4 asym g128"`).
    pub fn describe(&self) -> String {
        let solved = matches!(self.fixed_values, Some(FixedValues::Solved { .. }));
        let name = |kind: PassKind, calibrated: bool| match self.calibrated {
            Some(method) if solved && method.prunes() == calibrated => method.describe(&kind),
            _ => kind.describe(),
        };
        let mut parts = Vec::new();
        if let Some(s) = self.structure {
            parts.push(name(PassKind::Prune(s), true));
        }
        if let Some(v) = &self.values {
            parts.push(name(v.clone(), false));
        }
        parts.join(" + ")
    }

    /// True when the calibration round's result for this tensor is in the plan.
    pub fn is_solved(&self) -> bool {
        matches!(self.fixed_values, Some(FixedValues::Solved { .. }))
    }
}

fn two_of(
    tensor: &str,
    stage: &'static str,
    earlier: usize,
    selected: &[(usize, &PassKind)],
    later: usize,
) -> PlanError {
    let kind = |i: usize| {
        selected
            .iter()
            .find(|(j, _)| *j == i)
            .map(|(_, k)| k.describe())
            .unwrap_or_default()
    };
    PlanError::TwoOfAStage {
        tensor: tensor.into(),
        stage,
        earlier,
        earlier_kind: kind(earlier),
        later,
        later_kind: kind(later),
    }
}

/// The entropy layout matching a dtype's bytes.
pub fn layout_of(dtype: DType) -> Layout {
    match dtype {
        DType::BF16 => Layout::Bf16,
        DType::F16 => Layout::F16,
        DType::F32 => Layout::F32,
        _ => Layout::Bytes,
    }
}

/// How the kept weights are stored in a frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ValuesMeta {
    /// The kept weights in the tensor's dtype (section `values`).
    Raw,
    /// Sections `codes`, `scales`, `zeros` (scales/zeros as f16).
    Affine {
        bits: u8,
        row_len: usize,
        group_len: usize,
    },
    /// Sections `codebook`, `scales` (f16), `codes`.
    Codebook {
        bits: u8,
        row_len: usize,
        group_len: usize,
    },
    /// Sections `scales` (f32), `bytes` (E4M3).
    Fp8 { row_len: usize, per_channel: bool },
    /// Sections `left` (rows x rank) and `right` (rank x cols), in the tensor's dtype.
    LowRank {
        rows: usize,
        cols: usize,
        rank: usize,
    },
    /// Sections `kept` (u16 per block), `positions` (u8), `coeffs` (tensor dtype).
    Dct { row_len: usize, block: usize },
    /// Section `buckets` in the tensor's dtype.
    Hashed { len: usize, seed: u64 },
    /// Section `blocks`: whole rows of the ggml type with this id (llama.cpp's layout).
    Ggml { ty: u32 },
}

/// Which weights of the chunk are stored.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StructureMeta {
    Dense,
    /// Section `mask`: one bit per weight.
    Mask,
    /// Section `positions`: N:M positions.
    Nm {
        n: usize,
        m: usize,
    },
    /// Section `keep`: one bit per row.
    Rows,
    /// Section `keep`: one bit per column.
    Columns,
    /// Rows holding NaN or infinities stored unchanged (`non_finite: keep`): section `keep`
    /// (one bit per row, set where kept), `kept` (those rows in the tensor's dtype) and,
    /// unless every row is kept, `inner` (a whole frame of the other rows).
    KeptRows,
}

/// One section of a frame as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SectionMeta {
    pub name: String,
    pub layout: Layout,
    /// Bytes before entropy coding.
    pub raw_len: u64,
    /// Bytes in the frame.
    pub len: u64,
}

/// The JSON header of a frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameMeta {
    pub rows: usize,
    pub row_len: usize,
    pub structure: StructureMeta,
    pub values: ValuesMeta,
    pub sections: Vec<SectionMeta>,
}

/// A chunk after its passes: the reconstruction and the representation's sections.
#[derive(Debug, Clone)]
pub struct EncodedChunk {
    /// What a reader sees, in the input's dtype (same length as the input).
    pub reconstruction: Vec<u8>,
    pub rows: usize,
    pub row_len: usize,
    pub structure: StructureMeta,
    pub values: ValuesMeta,
    /// (name, layout, raw bytes) of each section held as bytes: the structure stage's, then
    /// the values stage's unless it is [`Self::typed`]; [`Self::sections`] lists them all.
    pub sections: Vec<(String, Layout, Vec<u8>)>,
    /// The values stage's codes when it produced affine or FP8 codes, which output formats
    /// write in their own layouts (the sections are derived from them on demand).
    pub typed: Option<TypedValues>,
    /// Exact bits of the representation before entropy coding (codes at their bit width).
    pub repr_bits: u64,
}

/// A values stage's representation as typed codes.
#[derive(Debug, Clone)]
pub enum TypedValues {
    /// RTN or HQQ codes (one code per byte), scales and zero points.
    Affine(quantize::AffineCodes),
    /// FP8 E4M3 bytes and their f32 scales.
    Fp8(fp8::Fp8Codes),
    /// llama.cpp blocks of `ty`, whole rows, exactly as a GGUF file stores them.
    Ggml {
        ty: crate::gguf::GgmlType,
        blocks: Vec<u8>,
    },
}

impl TypedValues {
    /// The frame sections this representation is stored as.
    fn sections(&self) -> Vec<(String, Layout, std::borrow::Cow<'_, [u8]>)> {
        use std::borrow::Cow;
        match self {
            TypedValues::Affine(codes) => {
                let (scales, _) = scale_section("scales", &codes.scales);
                let (zeros, _) = scale_section("zeros", &codes.zeros);
                vec![
                    (
                        "codes".to_owned(),
                        Layout::Bytes,
                        Cow::Borrowed(&codes.codes[..]),
                    ),
                    (scales.0, scales.1, Cow::Owned(scales.2)),
                    (zeros.0, zeros.1, Cow::Owned(zeros.2)),
                ]
            }
            TypedValues::Fp8(codes) => vec![
                (
                    "scales".to_owned(),
                    Layout::F32,
                    Cow::Owned(f32_bytes(&codes.scales)),
                ),
                (
                    "bytes".to_owned(),
                    Layout::Bytes,
                    Cow::Borrowed(&codes.bytes[..]),
                ),
            ],
            TypedValues::Ggml { blocks, .. } => {
                vec![(
                    "blocks".to_owned(),
                    Layout::Bytes,
                    Cow::Borrowed(&blocks[..]),
                )]
            }
        }
    }
}

fn check_whole_rows(dtype: DType, row_len: usize, len: usize) -> Result<usize, CodecError> {
    let elem_size = dtype.size_bytes();
    let ragged = CodecError::RaggedInput {
        len,
        row_len,
        elem_size,
    };
    match row_len.checked_mul(elem_size) {
        Some(0) if len == 0 => Ok(0),
        Some(row_bytes) if row_bytes > 0 && len % row_bytes == 0 => Ok(len / row_bytes),
        _ => Err(ragged),
    }
}

/// Rounds `values` to `dtype` in place and returns their encoded bytes.
fn round_to_dtype(dtype: DType, values: &mut [f32]) -> Result<Vec<u8>, CodecError> {
    let mut bytes = vec![0u8; values.len() * dtype.size_bytes()];
    encode_from_f32(dtype, values, &mut bytes)?;
    decode_to_f32(dtype, &bytes, values)?;
    Ok(bytes)
}

fn f16_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Output of the values stage on a compacted matrix.
struct ValuesOut {
    meta: ValuesMeta,
    sections: Vec<(String, Layout, Vec<u8>)>,
    typed: Option<TypedValues>,
    repr_bits: u64,
    /// The compacted matrix as a reader reconstructs it.
    recon: Vec<f32>,
}

fn section(name: &str, layout: Layout, bytes: Vec<u8>) -> (String, Layout, Vec<u8>) {
    (name.to_owned(), layout, bytes)
}

/// Scales or zeros as f16 when every value survives the round trip through f16 (NaN
/// aside), else f32; returns (section, bits). The conversions are `half`'s slice ones (F16C
/// when the CPU has it), which equal its scalar `f16::from_f32`/`to_f32`.
fn scale_section(name: &str, values: &[f32]) -> ((String, Layout, Vec<u8>), u64) {
    let mut halves = vec![0u8; values.len() * 2];
    dtype::encode_f16(values, &mut halves);
    let mut back = vec![0f32; values.len()];
    dtype::decode_f16(&halves, &mut back);
    let exact = values
        .iter()
        .zip(&back)
        .all(|(v, b)| b.to_bits() == v.to_bits() || v.is_nan());
    if exact {
        (section(name, Layout::F16, halves), values.len() as u64 * 16)
    } else {
        (
            section(name, Layout::F32, f32_bytes(values)),
            values.len() as u64 * 32,
        )
    }
}

/// The frame metadata and exact representation bits of affine codes (RTN or HQQ, per `pass`).
fn affine_meta(pass: Option<&PassKind>, codes: &quantize::AffineCodes) -> (ValuesMeta, u64) {
    let (_, scale_bits) = scale_section("scales", &codes.scales);
    let (_, zero_bits) = scale_section("zeros", &codes.zeros);
    // RTN zero points are integer codes (`bits` each), all equal when symmetric (a
    // constant, not counted); HQQ's are fractional f16 values.
    let zero_bits = match pass {
        Some(PassKind::Quantize(q)) if q.symmetric => 0,
        Some(PassKind::Quantize(_)) => codes.zeros.len() as u64 * u64::from(codes.bits),
        _ => zero_bits,
    };
    let meta = ValuesMeta::Affine {
        bits: codes.bits,
        row_len: codes.row_len,
        group_len: codes.group_len,
    };
    let repr_bits = codes.codes.len() as u64 * u64::from(codes.bits) + scale_bits + zero_bits;
    (meta, repr_bits)
}

fn encode_values(
    pass: Option<&PassKind>,
    fixed: Option<&FixedValues>,
    dtype: DType,
    mut values: Vec<f32>,
    row_len: usize,
) -> Result<ValuesOut, CodecError> {
    let n = values.len() as u64;
    let code_bits = |bits: u8| n * u64::from(bits);
    Ok(match pass {
        None | Some(PassKind::Prune(_)) => {
            let bytes = round_to_dtype(dtype, &mut values)?;
            ValuesOut {
                meta: ValuesMeta::Raw,
                repr_bits: bytes.len() as u64 * 8,
                sections: vec![section("values", layout_of(dtype), bytes)],
                typed: None,
                recon: values,
            }
        }
        Some(PassKind::Quantize(_) | PassKind::Hqq(_)) => {
            // RTN computes codes and their dequantized values in one pass (bit for bit what
            // `dequantize_into` writes); HQQ dequantizes its optimized codes afterwards.
            let codes = match pass {
                Some(PassKind::Quantize(cfg)) => match fixed {
                    Some(&FixedValues::Range { lo, hi }) => {
                        quantize::rtn_codes_dequantize_in_range(cfg, &mut values, row_len, (lo, hi))
                    }
                    Some(FixedValues::Solved { solved, first_row }) => match &**solved {
                        crate::solved::Solved::Codes(codes) => {
                            crate::solved::codes_rows(codes, cfg, *first_row, row_len, values.len())
                                .inspect(|c| c.dequantize_into(&mut values))
                        }
                        crate::solved::Solved::Dense { .. } => {
                            quantize::rtn_codes_dequantize(cfg, &mut values, row_len)
                        }
                    },
                    _ => quantize::rtn_codes_dequantize(cfg, &mut values, row_len),
                },
                Some(PassKind::Hqq(cfg)) => match fixed {
                    Some(FixedValues::HqqTensor(group)) => Ok(group.encode(cfg, &mut values)),
                    _ => hqq::hqq_codes(cfg, &values, row_len).inspect(|c| {
                        c.dequantize_into(&mut values);
                    }),
                },
                _ => unreachable!("matched above"),
            }
            .map_err(|e| pass_err("quantize")(e.to_string()))?;
            let (meta, repr_bits) = affine_meta(pass, &codes);
            ValuesOut {
                meta,
                repr_bits,
                sections: Vec::new(),
                typed: Some(TypedValues::Affine(codes)),
                recon: values,
            }
        }
        Some(PassKind::Kmeans { .. } | PassKind::Nf4 { .. }) => {
            let codes = match pass {
                Some(PassKind::Kmeans { bits, iterations }) => match fixed {
                    Some(FixedValues::Codebook(levels)) => {
                        codebook::codes_for_levels(*bits, levels.clone(), &values)
                    }
                    _ => codebook::kmeans_codes(*bits, &values, *iterations),
                },
                Some(PassKind::Nf4 { granularity }) => match fixed {
                    Some(&FixedValues::Absmax(absmax)) => {
                        codebook::nf4_codes_with_absmax(&values, row_len, absmax)
                    }
                    _ => codebook::nf4_codes(*granularity, &values, row_len),
                },
                _ => unreachable!("matched above"),
            }
            .map_err(|e| pass_err("codebook")(e.to_string()))?;
            codes.dequantize_into(&mut values);
            let (book, book_bits) = scale_section("codebook", &codes.codebook);
            let (scales, scale_bits) = scale_section("scales", &codes.scales);
            ValuesOut {
                meta: ValuesMeta::Codebook {
                    bits: codes.bits,
                    row_len: codes.row_len,
                    group_len: codes.group_len,
                },
                repr_bits: code_bits(codes.bits) + book_bits + scale_bits,
                sections: vec![book, scales, section("codes", Layout::Bytes, codes.codes)],
                typed: None,
                recon: values,
            }
        }
        Some(PassKind::Fp8 {
            per_channel,
            scale_dtype,
        }) => {
            let codes = match fixed {
                Some(&FixedValues::Absmax(absmax)) if !per_channel => {
                    fp8::fp8_e4m3_codes_with_absmax(*scale_dtype, &values, row_len, absmax)
                }
                _ => fp8::fp8_e4m3_codes_on(*scale_dtype, *per_channel, &values, row_len),
            }
            .map_err(|e| pass_err("fp8")(e.to_string()))?;
            codes.dequantize_into(&mut values);
            ValuesOut {
                meta: ValuesMeta::Fp8 {
                    row_len: codes.row_len,
                    per_channel: codes.per_channel,
                },
                repr_bits: n * 8 + codes.scales.len() as u64 * 32,
                sections: Vec::new(),
                typed: Some(TypedValues::Fp8(codes)),
                recon: values,
            }
        }
        Some(PassKind::Ggml { ty, .. }) => {
            let ty = ty.ok_or_else(|| {
                pass_err("gguf")(
                    "the tensor's ggml type was not resolved from the model's config".into(),
                )
            })?;
            if row_len % ty.block_size() != 0 {
                return Err(pass_err("gguf")(format!(
                    "rows of {row_len} values are not whole {ty} blocks of {}",
                    ty.block_size()
                )));
            }
            let mut blocks = Vec::new();
            ty.quantize(&values, &mut blocks)
                .and_then(|()| ty.dequantize(&blocks, &mut values))
                .map_err(|e| pass_err("gguf")(e.to_string()))?;
            ValuesOut {
                meta: ValuesMeta::Ggml { ty: ty.id() },
                repr_bits: blocks.len() as u64 * 8,
                sections: Vec::new(),
                typed: Some(TypedValues::Ggml { ty, blocks }),
                recon: values,
            }
        }
        Some(PassKind::LowRank { .. }) if fixed.is_some() => {
            fixed_lowrank(fixed, dtype, values, row_len)?
        }
        Some(PassKind::Hashed { .. }) if fixed.is_some() => {
            fixed_hashed(fixed, dtype, values, row_len)?
        }
        Some(PassKind::LowRank { rule, power_iters }) => {
            let rule = match *rule {
                RankRule::Rank(r) => lowrank::RankRule::Rank(r),
                RankRule::Energy(e) => lowrank::RankRule::Energy(e),
                RankRule::StorageFraction(f) => lowrank::RankRule::StorageFraction(f),
            };
            let mut lr = lowrank::svd_lowrank(&values, row_len, rule, *power_iters, PASS_SEED)
                .map_err(|e| pass_err("lowrank")(e.to_string()))?;
            let left = round_to_dtype(dtype, &mut lr.left)?;
            let right = round_to_dtype(dtype, &mut lr.right)?;
            lr.reconstruct_into(&mut values);
            ValuesOut {
                meta: ValuesMeta::LowRank {
                    rows: lr.rows,
                    cols: lr.cols,
                    rank: lr.rank,
                },
                repr_bits: (left.len() + right.len()) as u64 * 8,
                sections: vec![
                    section("left", layout_of(dtype), left),
                    section("right", layout_of(dtype), right),
                ],
                typed: None,
                recon: values,
            }
        }
        Some(PassKind::Dct { block, keep }) => {
            let mut d = crate::dct::dct_topk(&values, row_len, *block, *keep)
                .map_err(|e| pass_err("dct")(e.to_string()))?;
            let coeffs = round_to_dtype(dtype, &mut d.coeffs)?;
            d.reconstruct_into(&mut values)
                .map_err(|e| pass_err("dct")(e.to_string()))?;
            let kept: Vec<u8> = d
                .kept_per_block
                .iter()
                .flat_map(|k| k.to_le_bytes())
                .collect();
            let positions: Vec<u8> = d.positions.iter().map(|&p| p as u8).collect();
            let position_bits = u64::from(usize::BITS - (block - 1).leading_zeros());
            ValuesOut {
                meta: ValuesMeta::Dct {
                    row_len: d.row_len,
                    block: d.block,
                },
                repr_bits: coeffs.len() as u64 * 8
                    + positions.len() as u64 * position_bits
                    + kept.len() as u64 * 8,
                sections: vec![
                    section("kept", Layout::Bytes, kept),
                    section("positions", Layout::Bytes, positions),
                    section("coeffs", layout_of(dtype), coeffs),
                ],
                typed: None,
                recon: values,
            }
        }
        Some(PassKind::Hashed { fraction }) => {
            let buckets = ((values.len() as f64 * fraction).ceil() as usize).max(1);
            let mut h = hashnet::hashed_share(&values, buckets, PASS_SEED)
                .map_err(|e| pass_err("hashed")(e.to_string()))?;
            let bytes = round_to_dtype(dtype, &mut h.buckets)?;
            h.reconstruct_into(&mut values);
            ValuesOut {
                meta: ValuesMeta::Hashed {
                    len: h.len,
                    seed: h.seed,
                },
                repr_bits: bytes.len() as u64 * 8,
                sections: vec![section("buckets", layout_of(dtype), bytes)],
                typed: None,
                recon: values,
            }
        }
    })
}

/// A chunk of a tensor whose low-rank factors are fixed ([`FixedValues::LowRank`]): its rows
/// of `left * right`. The first chunk carries the tensor's whole frame (both factors); the
/// others are written by no frame ([`TensorPlan::writes_frame`]), and each counts its rows of
/// `left`, the first also `right`.
fn fixed_lowrank(
    fixed: Option<&FixedValues>,
    dtype: DType,
    mut values: Vec<f32>,
    row_len: usize,
) -> Result<ValuesOut, CodecError> {
    let Some(FixedValues::LowRank { factors, first_row }) = fixed else {
        return Err(pass_err("lowrank")(
            "the plan holds no low-rank factors".into(),
        ));
    };
    if row_len != factors.cols {
        return Err(pass_err("lowrank")(format!(
            "rows of {row_len} for factors of {} columns",
            factors.cols
        )));
    }
    factors
        .reconstruct_rows(*first_row, &mut values)
        .map_err(|e| pass_err("lowrank")(e.to_string()))?;
    let rows = values.len() / row_len.max(1);
    let bits = dtype.size_bytes() as u64 * 8;
    let mut repr_bits = (rows * factors.rank) as u64 * bits;
    let mut sections = Vec::new();
    if *first_row == 0 {
        repr_bits += factors.right.len() as u64 * bits;
        let left = round_to_dtype(dtype, &mut factors.left.clone())?;
        let right = round_to_dtype(dtype, &mut factors.right.clone())?;
        sections.push(section("left", layout_of(dtype), left));
        sections.push(section("right", layout_of(dtype), right));
    }
    Ok(ValuesOut {
        meta: ValuesMeta::LowRank {
            rows: factors.rows,
            cols: factors.cols,
            rank: factors.rank,
        },
        repr_bits,
        sections,
        typed: None,
        recon: values,
    })
}

/// A chunk of a tensor whose hashed buckets are fixed ([`FixedValues::Hashed`]): its weights
/// from the buckets; the first chunk carries the frame (every bucket) and counts its bits.
fn fixed_hashed(
    fixed: Option<&FixedValues>,
    dtype: DType,
    mut values: Vec<f32>,
    row_len: usize,
) -> Result<ValuesOut, CodecError> {
    let Some(FixedValues::Hashed { weights, first_row }) = fixed else {
        return Err(pass_err("hashed")(
            "the plan holds no hashed buckets".into(),
        ));
    };
    let first = first_row.saturating_mul(row_len);
    if first.saturating_add(values.len()) > weights.len {
        return Err(pass_err("hashed")(format!(
            "weights {first}..{} are past the tensor's {}",
            first + values.len(),
            weights.len
        )));
    }
    weights.reconstruct_range(first, &mut values);
    let (mut repr_bits, mut sections) = (0, Vec::new());
    if *first_row == 0 {
        let bytes = round_to_dtype(dtype, &mut weights.buckets.clone())?;
        repr_bits = bytes.len() as u64 * 8;
        sections.push(section("buckets", layout_of(dtype), bytes));
    }
    Ok(ValuesOut {
        meta: ValuesMeta::Hashed {
            len: weights.len,
            seed: weights.seed,
        },
        repr_bits,
        sections,
        typed: None,
        recon: values,
    })
}

/// Applies `plan` to a chunk of whole rows of `dtype` (row length `row_len`).
///
/// Dense RTN plans (no structure pass; per-group or per-channel quantization) and dense ggml
/// plans run fused (decode, quantize, encode block by block in cache, with AVX2 when the CPU
/// has it), everything else through the general path ([`encode_chunk_general`]); both give
/// the same bytes.
pub fn encode_chunk(
    plan: &TensorPlan,
    dtype: DType,
    row_len: usize,
    input: &[u8],
) -> Result<EncodedChunk, CodecError> {
    encode_chunk_with(plan, dtype, row_len, input, None, true, true)
}

/// [`encode_chunk`] that also adds the reconstruction's error to `acc`, exactly (bit for bit)
/// as `acc.add_encoded(dtype, input, &chunk.reconstruction)` would after it; nothing is added
/// for an identity plan or on error. The fused RTN path computes the error while it encodes
/// instead of decoding both buffers again.
pub fn encode_chunk_measured(
    plan: &TensorPlan,
    dtype: DType,
    row_len: usize,
    input: &[u8],
    acc: &mut ErrorAccumulator,
) -> Result<EncodedChunk, CodecError> {
    encode_chunk_with(plan, dtype, row_len, input, Some(acc), true, true)
}

/// [`encode_chunk_measured`] for outputs that store the representation rather than the
/// values: the fused paths then do not write the reconstruction out (it is only rounded
/// through the dtype in cache, for the metrics), so `reconstruction` may be empty.
pub fn encode_chunk_representation(
    plan: &TensorPlan,
    dtype: DType,
    row_len: usize,
    input: &[u8],
    acc: &mut ErrorAccumulator,
) -> Result<EncodedChunk, CodecError> {
    encode_chunk_with(plan, dtype, row_len, input, Some(acc), true, false)
}

/// [`encode_chunk`] without the fused RTN path: decode the whole chunk to f32, apply the
/// stages, encode the reconstruction back. The reference the fused path is tested (and
/// benchmarked) against; not meant for production use.
#[doc(hidden)]
pub fn encode_chunk_general(
    plan: &TensorPlan,
    dtype: DType,
    row_len: usize,
    input: &[u8],
) -> Result<EncodedChunk, CodecError> {
    encode_chunk_with(plan, dtype, row_len, input, None, false, true)
}

/// [`encode_chunk`] (`fused` allows the fused paths), adding the error to `acc` if given;
/// without `keep_reconstruction` the fused paths leave the reconstruction empty.
fn encode_chunk_with(
    plan: &TensorPlan,
    dtype: DType,
    row_len: usize,
    input: &[u8],
    acc: Option<&mut ErrorAccumulator>,
    fused: bool,
    keep_reconstruction: bool,
) -> Result<EncodedChunk, CodecError> {
    let rows = check_whole_rows(dtype, row_len, input.len())?;
    if !plan.is_identity() {
        check_finite(dtype, input)?;
    }
    if fused && plan.structure.is_none() && !plan.is_solved() {
        if let Some(pass @ PassKind::Quantize(cfg)) = &plan.values {
            if let Some(layout) =
                rtn_fused::fused_layout(cfg, dtype, input.len() / dtype.size_bytes(), row_len)
            {
                let metrics = acc.is_some();
                let out =
                    rtn_fused::encode(cfg, dtype, layout, input, metrics, keep_reconstruction);
                if let Some(acc) = acc {
                    for partial in &out.metrics {
                        acc.merge(partial);
                    }
                }
                let codes = quantize::AffineCodes {
                    bits: cfg.bits,
                    row_len: layout.0,
                    group_len: layout.1,
                    codes: out.codes,
                    scales: out.scales,
                    zeros: out.zeros,
                };
                let (values, repr_bits) = affine_meta(Some(pass), &codes);
                return Ok(EncodedChunk {
                    reconstruction: out.reconstruction,
                    rows,
                    row_len,
                    structure: StructureMeta::Dense,
                    values,
                    sections: Vec::new(),
                    typed: Some(TypedValues::Affine(codes)),
                    repr_bits,
                });
            }
        }
        if let Some(PassKind::Ggml { ty: Some(ty), .. }) = &plan.values {
            let metrics = acc.is_some();
            let fused =
                ggml_fused::encode(*ty, dtype, row_len, input, metrics, keep_reconstruction);
            if let Some(out) = fused {
                if let Some(acc) = acc {
                    for partial in &out.metrics {
                        acc.merge(partial);
                    }
                }
                return Ok(EncodedChunk {
                    reconstruction: out.reconstruction,
                    rows,
                    row_len,
                    structure: StructureMeta::Dense,
                    values: ValuesMeta::Ggml { ty: ty.id() },
                    sections: Vec::new(),
                    repr_bits: out.blocks.len() as u64 * 8,
                    typed: Some(TypedValues::Ggml {
                        ty: *ty,
                        blocks: out.blocks,
                    }),
                });
            }
        }
    }
    let chunk = encode_chunk_general_impl(plan, dtype, row_len, input, rows)?;
    if let Some(acc) = acc {
        if !plan.is_identity() {
            acc.add_encoded(dtype, input, &chunk.reconstruction)?;
        }
    }
    Ok(chunk)
}

/// Refuses a chunk holding an infinity or NaN: one +Inf turns the other values of its group
/// into NaN under any scaled quantizer, and metrics could not measure it honestly. The scan
/// only tests exponent bits, so it vectorizes and costs little next to the passes.
fn check_finite(dtype: DType, input: &[u8]) -> Result<(), CodecError> {
    let (size, mask): (usize, u32) = match dtype {
        DType::BF16 => (2, 0x7F80),
        DType::F16 => (2, 0x7C00),
        DType::F32 => (4, 0x7F80_0000),
        _ => return Ok(()),
    };
    let bits = |b: &[u8]| -> u32 {
        match size {
            2 => u32::from(u16::from_le_bytes([b[0], b[1]])),
            _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    };
    let count = input
        .chunks_exact(size)
        .filter(|b| bits(b) & mask == mask)
        .count();
    if count == 0 {
        return Ok(());
    }
    let first = input
        .chunks_exact(size)
        .position(|b| bits(b) & mask == mask)
        .unwrap_or(0);
    let mut value = [0f32];
    decode_to_f32(dtype, &input[first * size..(first + 1) * size], &mut value)?;
    Err(CodecError::NonFinite {
        count,
        first,
        value: value[0],
    })
}

/// The general path of [`encode_chunk`] for a chunk of `rows` whole rows (already checked).
fn encode_chunk_general_impl(
    plan: &TensorPlan,
    dtype: DType,
    row_len: usize,
    input: &[u8],
    rows: usize,
) -> Result<EncodedChunk, CodecError> {
    if plan.is_identity() {
        return Ok(EncodedChunk {
            reconstruction: input.to_vec(),
            rows,
            row_len,
            structure: StructureMeta::Dense,
            values: ValuesMeta::Raw,
            sections: vec![section("values", layout_of(dtype), input.to_vec())],
            typed: None,
            repr_bits: input.len() as u64 * 8,
        });
    }
    if !dtype.is_decodable_float() {
        return Err(CodecError::UnsupportedDtype { dtype });
    }
    let mut original = vec![0f32; input.len() / dtype.size_bytes()];
    decode_to_f32(dtype, input, &mut original)?;
    // A calibrated pruner's result: its kept (and updated) weights replace the chunk's, and
    // its zeros are the mask (the error is still measured against the input).
    let solved_dense = match &plan.fixed_values {
        Some(FixedValues::Solved { solved, first_row }) if plan.structure.is_some() => {
            let rows = solved
                .dense_rows(*first_row, original.len())
                .ok_or_else(|| {
                    pass_err("prune")(format!(
                        "the calibrated weights do not cover rows {first_row}..{} of {row_len}",
                        first_row + rows
                    ))
                })?;
            Some(rows)
        }
        _ => None,
    };
    if let Some(rows) = solved_dense {
        original.copy_from_slice(rows);
    }
    let values_pass = plan.values.as_ref();
    let values_stage = |values: Vec<f32>, row_len: usize| {
        encode_values(
            values_pass,
            plan.fixed_values.as_ref(),
            dtype,
            values,
            row_len,
        )
    };
    let (structure, structure_sections, structure_bits, out) = match plan.structure {
        None => {
            let out = values_stage(original, row_len)?;
            (StructureMeta::Dense, Vec::new(), 0, out)
        }
        Some(PruneConfig::Magnitude { .. }) => {
            let mask = match solved_dense {
                Some(_) => original.iter().map(|&w| w != 0.0).collect(),
                None => magnitude_mask_of(plan, &original)?,
            };
            let kept = sparse::compact(&original, &mask);
            let kept_len = kept.len().max(1);
            let mut out = values_stage(kept, kept_len)?;
            out.recon = scatter(&out.recon, &mask, original.len())?;
            let bits = sparse::pack_bitmask(&mask);
            let nbits = mask.len() as u64;
            (
                StructureMeta::Mask,
                vec![section("mask", Layout::Bytes, bits)],
                nbits,
                out,
            )
        }
        Some(PruneConfig::NOfM { n, m }) => {
            let mask = prune::nm_mask(&original, row_len, n, m)
                .map_err(|e| pass_err("prune")(e.to_string()))?;
            let kept = sparse::compact(&original, &mask);
            let positions = sparse::nm_pack_positions(&mask, m)
                .map_err(|e| pass_err("prune")(e.to_string()))?;
            let kept_row = row_len / m * n;
            let mut out = values_stage(kept, kept_row.max(1))?;
            out.recon = scatter(&out.recon, &mask, original.len())?;
            let position_bits =
                kept_count(&mask) * u64::from(usize::BITS - (m - 1).leading_zeros());
            (
                StructureMeta::Nm { n, m },
                vec![section("positions", Layout::Bytes, positions)],
                position_bits,
                out,
            )
        }
        Some(PruneConfig::Rows { .. }) => {
            let keep = row_keep_of(plan, &original, row_len, rows)?;
            let kept = sparse::select_rows(&original, row_len, &keep);
            let mut out = values_stage(kept, row_len)?;
            let mut full = vec![0f32; original.len()];
            sparse::scatter_rows(&out.recon, row_len, &keep, &mut full)
                .map_err(|e| corrupt(e.to_string()))?;
            out.recon = full;
            let nbits = keep.len() as u64;
            let bits = sparse::pack_bitmask(&keep);
            (
                StructureMeta::Rows,
                vec![section("keep", Layout::Bytes, bits)],
                nbits,
                out,
            )
        }
        Some(PruneConfig::Columns { .. }) => {
            let keep = col_keep_of(plan, &original, row_len)?;
            let kept_cols = keep.iter().filter(|k| **k).count();
            let kept = sparse::select_cols(&original, row_len, &keep);
            let mut out = values_stage(kept, kept_cols.max(1))?;
            let mut full = vec![0f32; original.len()];
            sparse::scatter_cols(&out.recon, row_len, &keep, &mut full)
                .map_err(|e| corrupt(e.to_string()))?;
            out.recon = full;
            let nbits = keep.len() as u64;
            let bits = sparse::pack_bitmask(&keep);
            (
                StructureMeta::Columns,
                vec![section("keep", Layout::Bytes, bits)],
                nbits,
                out,
            )
        }
    };
    let mut reconstruction = vec![0u8; input.len()];
    encode_from_f32(dtype, &out.recon, &mut reconstruction)?;
    let mut sections = structure_sections;
    sections.extend(out.sections);
    // Fixed factors or buckets are one frame for the whole tensor.
    let rows = match &plan.fixed_values {
        Some(FixedValues::LowRank { factors, .. }) => factors.rows,
        Some(FixedValues::Hashed { weights, .. }) => weights.len / row_len.max(1),
        _ => rows,
    };
    Ok(EncodedChunk {
        reconstruction,
        rows,
        row_len,
        structure,
        values: out.meta,
        sections,
        typed: out.typed,
        repr_bits: structure_bits + out.repr_bits,
    })
}

/// The magnitude mask of a chunk: the plan's cut (global, or the tensor's own gathered by
/// a first pass) when it has one, else the chunk's own `sparsity` ranking.
fn magnitude_mask_of(plan: &TensorPlan, original: &[f32]) -> Result<Vec<bool>, CodecError> {
    let Some(PruneConfig::Magnitude { sparsity, global }) = plan.structure else {
        return Err(pass_err("prune")("not a magnitude prune".into()));
    };
    let sparsity = match (&plan.global_cut, global) {
        (Some(cut), _) => cut.local_sparsity(original),
        (None, false) => sparsity,
        (None, true) => {
            return Err(pass_err("prune")(
                "a global magnitude target needs the job's cut, which this plan lacks".into(),
            ))
        }
    };
    Ok(prune::magnitude_mask(original, sparsity))
}

/// The row keep flags of a chunk of `rows` rows: its slice of the tensor's fixed flags, or
/// (whole-tensor path) ranked within the chunk.
fn row_keep_of(
    plan: &TensorPlan,
    original: &[f32],
    row_len: usize,
    rows: usize,
) -> Result<Vec<bool>, CodecError> {
    match (&plan.fixed_structure, plan.structure) {
        (Some(FixedStructure::Rows { keep, first_row }), _) => keep
            .get(*first_row..first_row + rows)
            .map(<[bool]>::to_vec)
            .ok_or_else(|| {
                pass_err("prune")(format!(
                    "rows {first_row}..{} are past the tensor's {} row flags",
                    first_row + rows,
                    keep.len()
                ))
            }),
        (_, Some(PruneConfig::Rows { fraction, norm })) => {
            prune::row_keep(original, row_len, fraction, norm)
                .map_err(|e| pass_err("prune")(e.to_string()))
        }
        _ => Err(pass_err("prune")("not a row prune".into())),
    }
}

/// The column keep flags of a chunk: the tensor's fixed flags, or ranked within the chunk.
fn col_keep_of(
    plan: &TensorPlan,
    original: &[f32],
    row_len: usize,
) -> Result<Vec<bool>, CodecError> {
    match (&plan.fixed_structure, plan.structure) {
        (Some(FixedStructure::Columns { keep }), _) if keep.len() == row_len => {
            Ok(keep.as_ref().clone())
        }
        (Some(FixedStructure::Columns { keep }), _) => Err(pass_err("prune")(format!(
            "{} column flags for rows of {row_len}",
            keep.len()
        ))),
        (_, Some(PruneConfig::Columns { fraction, norm })) => {
            prune::col_keep(original, row_len, fraction, norm)
                .map_err(|e| pass_err("prune")(e.to_string()))
        }
        _ => Err(pass_err("prune")("not a column prune".into())),
    }
}

/// The weights of a decoded chunk of `rows` rows that the plan's structure stage keeps, in
/// the order the values stage sees them (what a values statistic is gathered over).
pub(crate) fn structure_kept(
    plan: &TensorPlan,
    original: &[f32],
    row_len: usize,
    rows: usize,
) -> Result<Vec<f32>, CodecError> {
    Ok(match plan.structure {
        None => original.to_vec(),
        Some(PruneConfig::Magnitude { .. }) => {
            sparse::compact(original, &magnitude_mask_of(plan, original)?)
        }
        Some(PruneConfig::NOfM { n, m }) => {
            let mask = prune::nm_mask(original, row_len, n, m)
                .map_err(|e| pass_err("prune")(e.to_string()))?;
            sparse::compact(original, &mask)
        }
        Some(PruneConfig::Rows { .. }) => sparse::select_rows(
            original,
            row_len,
            &row_keep_of(plan, original, row_len, rows)?,
        ),
        Some(PruneConfig::Columns { .. }) => {
            sparse::select_cols(original, row_len, &col_keep_of(plan, original, row_len)?)
        }
    })
}

fn kept_count(mask: &[bool]) -> u64 {
    mask.iter().filter(|k| **k).count() as u64
}

fn scatter(kept: &[f32], mask: &[bool], len: usize) -> Result<Vec<f32>, CodecError> {
    let mut full = vec![0f32; len];
    sparse::scatter(kept, mask, &mut full).map_err(|e| corrupt(e.to_string()))?;
    Ok(full)
}

impl EncodedChunk {
    /// Every section of the frame, in order: structure, then values (derived from
    /// [`Self::typed`] when the values stage produced typed codes).
    pub fn sections(&self) -> Vec<(String, Layout, std::borrow::Cow<'_, [u8]>)> {
        let mut all: Vec<_> = self
            .sections
            .iter()
            .map(|(name, layout, bytes)| {
                (
                    name.clone(),
                    *layout,
                    std::borrow::Cow::Borrowed(&bytes[..]),
                )
            })
            .collect();
        if let Some(typed) = &self.typed {
            all.extend(typed.sections());
        }
        all
    }

    /// The entropy-coded frame: `u32` LE header length, JSON [`FrameMeta`], then sections.
    pub fn frame(&self) -> Vec<u8> {
        write_frame(
            self.rows,
            self.row_len,
            self.structure,
            self.values.clone(),
            &self.sections(),
        )
    }
}

/// Entropy-codes `sections` (name, layout, raw bytes) behind their [`FrameMeta`].
fn write_frame<N: AsRef<str>, B: AsRef<[u8]>>(
    rows: usize,
    row_len: usize,
    structure: StructureMeta,
    values: ValuesMeta,
    sections: &[(N, Layout, B)],
) -> Vec<u8> {
    let coded: Vec<Vec<u8>> = sections
        .iter()
        .map(|(_, layout, bytes)| entropy::compress(*layout, bytes.as_ref()))
        .collect();
    let meta = FrameMeta {
        rows,
        row_len,
        structure,
        values,
        sections: sections
            .iter()
            .zip(&coded)
            .map(|((name, layout, raw), c)| SectionMeta {
                name: name.as_ref().to_string(),
                layout: *layout,
                raw_len: raw.as_ref().len() as u64,
                len: c.len() as u64,
            })
            .collect(),
    };
    let json = serde_json::to_vec(&meta).expect("frame meta serializes");
    let mut out = Vec::with_capacity(4 + json.len() + coded.iter().map(Vec::len).sum::<usize>());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    for c in coded {
        out.extend_from_slice(&c);
    }
    out
}

/// Largest frame header accepted when decoding.
const MAX_FRAME_META: usize = 1 << 20;

/// A frame's header and where its sections start.
fn frame_meta(frame: &[u8]) -> Result<(FrameMeta, usize), CodecError> {
    let len_bytes: [u8; 4] = frame
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("shorter than its 4-byte header length"))?;
    let meta_len = u32::from_le_bytes(len_bytes) as usize;
    if meta_len > MAX_FRAME_META || 4 + meta_len > frame.len() {
        return Err(corrupt(format!("header length {meta_len} out of range")));
    }
    let meta: FrameMeta = serde_json::from_slice(&frame[4..4 + meta_len])
        .map_err(|e| corrupt(format!("header: {e}")))?;
    Ok((meta, 4 + meta_len))
}

/// Splits a frame into its header and decompressed sections (by name).
fn open_frame(frame: &[u8]) -> Result<(FrameMeta, Sections), CodecError> {
    let (meta, mut at) = frame_meta(frame)?;
    let mut sections = Vec::with_capacity(meta.sections.len());
    for s in &meta.sections {
        let end = usize::try_from(s.len)
            .ok()
            .and_then(|l| at.checked_add(l))
            .filter(|&e| e <= frame.len())
            .ok_or_else(|| corrupt(format!("section {} overruns the frame", s.name)))?;
        let raw = entropy::decompress(&frame[at..end])?;
        if raw.len() as u64 != s.raw_len {
            return Err(corrupt(format!(
                "section {} decodes to {} bytes, header says {}",
                s.name,
                raw.len(),
                s.raw_len
            )));
        }
        sections.push((s.name.clone(), raw));
        at = end;
    }
    if at != frame.len() {
        return Err(corrupt(format!("{} trailing bytes", frame.len() - at)));
    }
    Ok((meta, Sections(sections)))
}

/// A frame's decompressed sections by name.
struct Sections(Vec<(String, Vec<u8>)>);

impl Sections {
    fn take(&mut self, name: &str) -> Result<Vec<u8>, CodecError> {
        let i = self
            .0
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| corrupt(format!("missing section {name}")))?;
        Ok(self.0.swap_remove(i).1)
    }

    /// A scale-like section stored as f16 or f32 (by its byte count vs `count`).
    fn floats(&mut self, name: &str, count: usize) -> Result<Vec<f32>, CodecError> {
        let bytes = self.take(name)?;
        match bytes.len() {
            l if l == count * 2 => Ok(f16_values(&bytes)),
            l if l == count * 4 => Ok(f32_values(&bytes)),
            l => Err(corrupt(format!(
                "section {name} has {l} bytes for {count} values"
            ))),
        }
    }

    fn in_dtype(&mut self, name: &str, dtype: DType, count: usize) -> Result<Vec<f32>, CodecError> {
        let bytes = self.take(name)?;
        if bytes.len() != count * dtype.size_bytes() {
            return Err(corrupt(format!(
                "section {name} has {} bytes, expected {count} {} values",
                bytes.len(),
                dtype.as_safetensors()
            )));
        }
        let mut out = vec![0f32; count];
        decode_to_f32(dtype, &bytes, &mut out)?;
        Ok(out)
    }
}

/// Decodes a frame of `dtype` into the chunk's bytes (appended to `out`). `max_elems` bounds
/// the element count a (possibly hostile) header may claim.
pub fn decode_frame(
    frame: &[u8],
    dtype: DType,
    max_elems: usize,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let (meta, mut sections) = open_frame(frame)?;
    let elems = meta
        .rows
        .checked_mul(meta.row_len)
        .filter(|&e| e <= max_elems)
        .ok_or_else(|| {
            corrupt(format!(
                "{} rows of {} exceed the tensor",
                meta.rows, meta.row_len
            ))
        })?;
    if meta.structure == StructureMeta::KeptRows {
        return decode_kept_rows(&meta, sections, dtype, elems, out);
    }
    if meta.structure == StructureMeta::Dense && meta.values == ValuesMeta::Raw {
        let bytes = sections.take("values")?;
        if bytes.len() != elems * dtype.size_bytes() {
            return Err(corrupt("raw section length does not match its rows"));
        }
        out.extend_from_slice(&bytes);
        return Ok(());
    }
    if !dtype.is_decodable_float() {
        return Err(CodecError::UnsupportedDtype { dtype });
    }
    let (row_len, rows) = (meta.row_len, meta.rows);
    let full = match meta.structure {
        StructureMeta::Dense => decode_values(&meta.values, &mut sections, dtype, elems)?,
        StructureMeta::Mask => {
            let mask = sparse::unpack_bitmask(&sections.take("mask")?, elems)
                .map_err(|e| corrupt(e.to_string()))?;
            let kept = decode_values(
                &meta.values,
                &mut sections,
                dtype,
                kept_count(&mask) as usize,
            )?;
            scatter(&kept, &mask, elems)?
        }
        StructureMeta::Nm { n, m } => {
            if m == 0 || n >= m || row_len % m != 0 {
                return Err(corrupt(format!("bad N:M {n}:{m} for rows of {row_len}")));
            }
            let kept_len = elems / m * n;
            let mask = sparse::nm_unpack_positions(&sections.take("positions")?, elems, n, m)
                .map_err(|e| corrupt(e.to_string()))?;
            let kept = decode_values(&meta.values, &mut sections, dtype, kept_len)?;
            scatter(&kept, &mask, elems)?
        }
        StructureMeta::KeptRows => unreachable!("decoded above"),
        StructureMeta::Rows | StructureMeta::Columns => {
            let is_rows = meta.structure == StructureMeta::Rows;
            let flags = if is_rows { rows } else { row_len };
            let keep = sparse::unpack_bitmask(&sections.take("keep")?, flags)
                .map_err(|e| corrupt(e.to_string()))?;
            let kept_flags = kept_count(&keep) as usize;
            let kept_len = if is_rows {
                kept_flags * row_len
            } else {
                kept_flags * rows
            };
            let kept = decode_values(&meta.values, &mut sections, dtype, kept_len)?;
            let mut full = vec![0f32; elems];
            if is_rows {
                sparse::scatter_rows(&kept, row_len, &keep, &mut full)
            } else {
                sparse::scatter_cols(&kept, row_len, &keep, &mut full)
            }
            .map_err(|e| corrupt(e.to_string()))?;
            full
        }
    };
    let start = out.len();
    out.resize(start + elems * dtype.size_bytes(), 0);
    encode_from_f32(dtype, &full, &mut out[start..])?;
    Ok(())
}

/// A frame of `rows` rows of `row_len` where the rows flagged in `keep` are stored unchanged
/// (`kept`, their bytes in order) and the others are `inner`, their own frame (None when every
/// row is kept). See [`StructureMeta::KeptRows`].
pub fn kept_rows_frame(
    rows: usize,
    row_len: usize,
    keep: &[bool],
    kept: &[u8],
    inner: Option<&[u8]>,
) -> Vec<u8> {
    let keep = sparse::pack_bitmask(keep);
    let mut sections = vec![
        ("keep", Layout::Bytes, &keep[..]),
        ("kept", Layout::Bytes, kept),
    ];
    if let Some(inner) = inner {
        sections.push(("inner", Layout::Bytes, inner));
    }
    write_frame(
        rows,
        row_len,
        StructureMeta::KeptRows,
        ValuesMeta::Raw,
        &sections,
    )
}

/// Decodes a [`StructureMeta::KeptRows`] frame: the inner frame's rows with the kept rows
/// put back in their places. An inner frame may not keep rows itself (no nesting).
fn decode_kept_rows(
    meta: &FrameMeta,
    mut sections: Sections,
    dtype: DType,
    elems: usize,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let row_bytes = meta.row_len * dtype.size_bytes();
    if row_bytes == 0 {
        return Err(corrupt("kept rows of no bytes"));
    }
    let keep = sparse::unpack_bitmask(&sections.take("keep")?, meta.rows)
        .map_err(|e| corrupt(e.to_string()))?;
    let kept_rows = kept_count(&keep) as usize;
    let kept = sections.take("kept")?;
    if kept.len() != kept_rows * row_bytes {
        return Err(corrupt(format!(
            "{} bytes of kept rows for {kept_rows} rows of {row_bytes} bytes",
            kept.len()
        )));
    }
    let mut inner = Vec::new();
    if kept_rows < meta.rows {
        let frame = sections.take("inner")?;
        if frame_meta(&frame)?.0.structure == StructureMeta::KeptRows {
            return Err(corrupt("a frame of kept rows nested in another"));
        }
        decode_frame(&frame, dtype, elems - kept_rows * meta.row_len, &mut inner)?;
    }
    if inner.len() != (meta.rows - kept_rows) * row_bytes {
        return Err(corrupt(format!(
            "the inner frame decodes to {} bytes, not {} rows",
            inner.len(),
            meta.rows - kept_rows
        )));
    }
    let (mut kept, mut inner) = (kept.chunks_exact(row_bytes), inner.chunks_exact(row_bytes));
    out.reserve(elems * dtype.size_bytes());
    for &k in &keep {
        let row = if k { kept.next() } else { inner.next() };
        out.extend_from_slice(row.ok_or_else(|| corrupt("fewer rows than flags"))?);
    }
    Ok(())
}

/// Rebuilds `count` compacted values from the values stage's sections.
fn decode_values(
    meta: &ValuesMeta,
    sections: &mut Sections,
    dtype: DType,
    count: usize,
) -> Result<Vec<f32>, CodecError> {
    let mut out = vec![0f32; count];
    let bad = |what: &str| corrupt(format!("{what} does not match {count} values"));
    match meta {
        ValuesMeta::Raw => return sections.in_dtype("values", dtype, count),
        ValuesMeta::Affine {
            bits,
            row_len,
            group_len,
        } => {
            let codes = sections.take("codes")?;
            if codes.len() != count || *row_len == 0 || *group_len == 0 || count % row_len != 0 {
                return Err(bad("affine codes"));
            }
            let groups = count / row_len * row_len.div_ceil(*group_len);
            let q = quantize::AffineCodes {
                bits: *bits,
                row_len: *row_len,
                group_len: *group_len,
                codes,
                scales: sections.floats("scales", groups)?,
                zeros: sections.floats("zeros", groups)?,
            };
            q.dequantize_into(&mut out);
        }
        ValuesMeta::Codebook {
            bits,
            row_len,
            group_len,
        } => {
            let levels = 1usize << (*bits).min(8);
            let codebook = sections.floats("codebook", levels)?;
            let groups = if *group_len == 0 {
                0
            } else if *row_len == 0 || count % row_len != 0 {
                return Err(bad("codebook rows"));
            } else {
                count / row_len * row_len.div_ceil(*group_len)
            };
            let scales = sections.floats("scales", groups)?;
            let codes = sections.take("codes")?;
            if codes.len() != count || codes.iter().any(|&c| c as usize >= levels) {
                return Err(bad("codebook codes"));
            }
            let c = codebook::CodebookCodes {
                bits: *bits,
                codebook,
                row_len: *row_len,
                group_len: *group_len,
                scales,
                codes,
            };
            c.dequantize_into(&mut out);
        }
        ValuesMeta::Fp8 {
            row_len,
            per_channel,
        } => {
            let bytes = sections.take("bytes")?;
            if bytes.len() != count || *row_len == 0 || count % row_len != 0 {
                return Err(bad("fp8 bytes"));
            }
            let nscales = if *per_channel { count / row_len } else { 1 };
            let scales = f32_values(&sections.take("scales")?);
            if scales.len() != nscales {
                return Err(bad("fp8 scales"));
            }
            let f = fp8::Fp8Codes {
                row_len: *row_len,
                per_channel: *per_channel,
                scales,
                bytes,
            };
            f.dequantize_into(&mut out);
        }
        ValuesMeta::Ggml { ty } => {
            let ty = crate::gguf::GgmlType::from_id(*ty)
                .ok_or_else(|| corrupt(format!("unknown ggml type id {ty}")))?;
            let blocks = sections.take("blocks")?;
            ty.dequantize(&blocks, &mut out)
                .map_err(|e| corrupt(e.to_string()))?;
        }
        ValuesMeta::LowRank { rows, cols, rank } => {
            if rows.checked_mul(*cols) != Some(count) {
                return Err(bad("low-rank shape"));
            }
            let left = sections.in_dtype("left", dtype, rows.saturating_mul(*rank))?;
            let right = sections.in_dtype("right", dtype, rank.saturating_mul(*cols))?;
            let lr = lowrank::LowRank {
                rows: *rows,
                cols: *cols,
                rank: *rank,
                left,
                right,
                singular_values: Vec::new(),
            };
            lr.reconstruct_into(&mut out);
        }
        ValuesMeta::Dct { row_len, block } => {
            if *row_len == 0 || *block == 0 || count % row_len != 0 {
                return Err(bad("dct rows"));
            }
            let kept_bytes = sections.take("kept")?;
            let kept: Vec<u16> = kept_bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect();
            let positions: Vec<u16> = sections
                .take("positions")?
                .iter()
                .map(|&p| p.into())
                .collect();
            let coeffs = sections.in_dtype("coeffs", dtype, positions.len())?;
            let d = crate::dct::DctSparse {
                row_len: *row_len,
                block: *block,
                kept_per_block: kept,
                positions,
                coeffs,
            };
            d.reconstruct_into(&mut out)
                .map_err(|e| corrupt(e.to_string()))?;
        }
        ValuesMeta::Hashed { len, seed } => {
            if *len != count {
                return Err(bad("hashed length"));
            }
            let bytes = sections.take("buckets")?;
            let nb = bytes.len() / dtype.size_bytes();
            let buckets = {
                let mut b = vec![0f32; nb];
                decode_to_f32(dtype, &bytes, &mut b)?;
                b
            };
            if buckets.is_empty() {
                return Err(bad("hashed buckets"));
            }
            let h = hashnet::HashedWeights {
                len: *len,
                seed: *seed,
                buckets,
            };
            h.reconstruct_into(&mut out);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
