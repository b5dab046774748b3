//! GGUF output (`--format gguf`): one file that llama.cpp and ollama load, written by the
//! whole cluster ([`crate::gguf`] holds the block quantizers and the file layout).
//!
//! Every tensor's size in the file follows from its shape and ggml type, so the file is laid
//! out before any data exists:
//!
//! - at submit, [`Format::adapt_plan`] gives each tensor its GGUF name, its ggml type (the
//!   `gguf` pass's type, as `llama-quantize` chooses it; F32 for 1-D tensors; the input dtype
//!   for tensors the recipe leaves alone) and, for llama's Q/K projections, the converter's
//!   row permutation; a tensor, architecture or pass GGUF cannot hold is refused there;
//! - each task writes a *part*: its tensors' bytes in task order, each padded to the file's
//!   alignment (rows are quantized independently and the converter's Q/K permutation never
//!   moves a row out of its head, so it is applied to whole output rows, head by head, as
//!   they stream); a mixture-of-experts layer's experts are the slices of one stacked
//!   tensor, written back to back in expert order (the plan orders them so, possibly across
//!   consecutive tasks) with the padding after the last;
//! - the coordinator builds the *head* ([`files`]: header, metadata, tokenizer and the
//!   synthesized tensors) from the plan alone and a worker concatenates head and parts into
//!   `model.gguf`, every tensor landing at the offset the header names; above a size limit the
//!   output is llama.cpp's split files instead, each with its own head, assembled in parallel.
//!
//! The same `gguf` pass under `--format safetensors` or `spz` stores the same blocks'
//! dequantized values, which is how the tests compare a GGUF reader's values with ours.

use serde_json::Value;

use super::{
    Assembly, ChunkOutput, FinishPlan, FinishedTask, Format, FormatError, ModelFacts, OutputTensor,
    TensorDesc, TensorWriter,
};
use crate::codec::{CodecError, EncodedChunk, PlanError, TensorPlan, TypedValues};
use crate::dtype::{decode_to_f32, DType};
use crate::gguf::writer::DEFAULT_ALIGNMENT;
use crate::gguf::MetaValue;
use crate::gguf::{
    architecture, expert_index, extra_tensors, layout, map_tensor, metadata, permute_rows,
    tensor_type_in, tokenizer_metadata, Arch, FileType, GgmlType, GgufError, HParams,
    TokenizerFiles, TypeContext,
};
use crate::recipe::{PassKind, Recipe};

/// The GGUF format; see the module docs.
pub struct Gguf;

/// Folder (under the output) where the tasks write their parts and the coordinator the
/// files' heads.
pub const PARTS_DIR: &str = ".gguf-parts";

/// Object name of the assembled file.
pub const FILE_NAME: &str = "model.gguf";

/// The data alignment of the files written (GGUF's default, so no metadata key is needed).
pub const ALIGNMENT: u64 = DEFAULT_ALIGNMENT;

/// The built-in recipes with a `gguf` pass, for messages.
const GGUF_RECIPES: &str = "q8_0, q4_0, q4_k_m, q6_k";

/// The llama-family model a GGUF file is made for, from its `config.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GgufModel {
    pub arch: Arch,
    pub n_head: u64,
    pub n_head_kv: u64,
    pub head_dim: u64,
    /// What `llama-quantize`'s per-tensor type choice depends on.
    pub types: TypeContext,
}

impl GgufModel {
    /// The model of `config`; `has_output_weight`: the checkpoint has `lm_head.weight`.
    pub fn from_config(config: &Value, has_output_weight: bool) -> Result<GgufModel, GgufError> {
        let arch = architecture(config)?;
        let hp = HParams::from_config(arch, config)?;
        Ok(GgufModel {
            arch,
            n_head: hp.n_head,
            n_head_kv: hp.n_head_kv,
            head_dim: hp.head_dim,
            types: TypeContext::from_config(arch, config, has_output_weight)?,
        })
    }

    /// For a tensor the converter permutes (llama's `q_proj`/`k_proj` weights and biases),
    /// the number of heads its rows are permuted in.
    fn permuted_heads(&self, hf_name: &str) -> Option<u64> {
        if !self.arch.permutes_qk() {
            return None;
        }
        let is = |module: &str| {
            hf_name.ends_with(&format!("{module}.weight"))
                || hf_name.ends_with(&format!("{module}.bias"))
        };
        if is("q_proj") {
            Some(self.n_head)
        } else if is("k_proj") {
            Some(self.n_head_kv)
        } else {
            None
        }
    }
}

/// Where one tensor goes in a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    /// Its name in the file; `None` for a tensor the converter drops (`rotary_emb.inv_freq`).
    pub name: Option<String>,
    pub ty: GgmlType,
    /// The rows are permuted as llama.cpp's converter permutes Q/K, in this many heads.
    pub permute_heads: Option<u64>,
    /// For an expert: its slice `(expert, experts)` of the stacked tensor `name`.
    pub expert: Option<(u64, u64)>,
}

/// The ggml type a `gguf` pass of `file_type` gives tensor `name`, as `llama-quantize` would.
pub fn resolve_type(
    model: &ModelFacts,
    file_type: FileType,
    name: &str,
    shape: &[u64],
) -> Result<GgmlType, PlanError> {
    let incompatible = |reason: String| PlanError::Incompatible {
        tensor: name.to_owned(),
        reason,
    };
    let model = model.gguf.as_ref().ok_or_else(|| {
        incompatible(
            "a gguf pass chooses each tensor's type from the model's config.json, which this job has not read"
                .into(),
        )
    })?;
    let gguf_name = map_tensor(model.arch, name)
        .map_err(|e| incompatible(format!("a gguf pass cannot quantize it: {e}")))?
        .ok_or_else(|| {
            incompatible(
                "llama.cpp's converter drops this tensor, so a gguf pass has no type for it".into(),
            )
        })?;
    Ok(tensor_type_in(file_type, &gguf_name, shape, &model.types))
}

impl Format for Gguf {
    fn name(&self) -> &'static str {
        "gguf"
    }

    fn describe(&self) -> &'static str {
        "gguf (llama.cpp block types, one file)"
    }

    fn check_recipe(&self, recipe: &Recipe) -> Result<(), FormatError> {
        let refuse = |reason: String| FormatError::Recipe {
            format: "gguf",
            recipe: recipe.name.clone(),
            reason,
        };
        if let Some(pass) = recipe
            .passes
            .iter()
            .find(|p| !matches!(p.kind, PassKind::Ggml { .. }))
        {
            return Err(refuse(format!(
                "stores llama.cpp block types, not {}: use a `gguf:` pass (built-in recipes {GGUF_RECIPES})",
                pass.kind.describe()
            )));
        }
        if recipe.passes.is_empty() {
            return Err(refuse(format!(
                "needs a `gguf:` pass choosing the file type (built-in recipes {GGUF_RECIPES})"
            )));
        }
        if recipe.share_cosine.is_some() {
            return Err(refuse(
                "cannot share near-identical tensors: a GGUF file stores every tensor".into(),
            ));
        }
        super::refuse_kept_rows("gguf", recipe)
    }

    fn adapt_plan(
        &self,
        tensor: TensorDesc<'_>,
        plan: &mut TensorPlan,
        model: &ModelFacts,
    ) -> Result<(), FormatError> {
        let model = model.gguf.as_ref().ok_or_else(|| FormatError::Model {
            format: "gguf",
            reason: "the model's config.json was not read (a GGUF file needs a llama-family config.json)".into(),
        })?;
        let layout_err = |reason: String| FormatError::Layout {
            tensor: tensor.name.to_owned(),
            reason,
        };
        let unsupported = |reason: String| FormatError::Unsupported {
            format: "gguf",
            tensor: tensor.name.to_owned(),
            pass: plan.describe(),
            reason,
        };
        if plan.structure.is_some() {
            return Err(unsupported(
                "llama.cpp stores dense tensors, so pruning cannot be written".into(),
            ));
        }
        let name = map_tensor(model.arch, tensor.name).map_err(|e| layout_err(e.to_string()))?;
        let ty = match &plan.values {
            Some(PassKind::Ggml { ty: Some(ty), .. }) => *ty,
            Some(PassKind::Ggml { ty: None, .. }) => {
                return Err(layout_err(
                    "the gguf pass's type was not resolved from the model".into(),
                ))
            }
            Some(_) => {
                return Err(unsupported(format!(
                    "GGUF stores llama.cpp block types: use a `gguf:` pass (built-in recipes {GGUF_RECIPES})"
                )))
            }
            None => match tensor.dtype {
                DType::F32 | DType::F16 | DType::BF16 if tensor.shape.len() < 2 => GgmlType::F32,
                DType::F32 => GgmlType::F32,
                DType::F16 => GgmlType::F16,
                DType::BF16 => GgmlType::BF16,
                other => {
                    return Err(layout_err(format!(
                        "dtype {} has no GGUF type (F32, F16, BF16 or a llama.cpp block type)",
                        other.as_safetensors()
                    )))
                }
            },
        };
        let (_, row_len) = tensor.matrix();
        if name.is_some() {
            ty.row_bytes(row_len)
                .map_err(|e| layout_err(e.to_string()))?;
        }
        let expert = match expert_index(model.arch, tensor.name) {
            None => None,
            Some(e) if e < model.types.n_expert => Some((e, model.types.n_expert)),
            Some(e) => {
                return Err(layout_err(format!(
                    "expert {e}, but config.json gives {} experts per layer",
                    model.types.n_expert
                )))
            }
        };
        let permute_heads = name.as_ref().and(model.permuted_heads(tensor.name));
        if let Some(heads) = permute_heads {
            let rows = tensor.shape.first().copied().unwrap_or(0);
            if rows != heads * model.head_dim {
                return Err(layout_err(format!(
                    "{rows} rows, but config.json gives {heads} heads of {} rows",
                    model.head_dim
                )));
            }
            permute_rows(rows, heads).map_err(|e| layout_err(e.to_string()))?;
        }
        plan.gguf = Some(GgufTensor {
            name,
            ty,
            permute_heads,
            expert,
        });
        Ok(())
    }

    fn assembles_parts(&self) -> bool {
        true
    }

    fn task_output_name(&self, index: usize, total: usize) -> String {
        format!("{PARTS_DIR}/part-{:05}-of-{total:05}.bin", index + 1)
    }

    fn output_tensors(&self, _tensor: TensorDesc<'_>, _plan: &TensorPlan) -> Vec<OutputTensor> {
        Vec::new()
    }

    fn tensor_writer(&self, tensor: TensorDesc<'_>, plan: &TensorPlan) -> TensorWriter {
        let heads = match &plan.gguf {
            Some(GgufTensor {
                permute_heads: Some(heads),
                ty,
                ..
            }) => head_permutation(tensor, *ty, *heads).map(Some),
            _ => Ok(None),
        };
        TensorWriter::Gguf(GgufState {
            tensor: plan.gguf.clone(),
            heads,
            pending: Vec::new(),
            written: 0,
        })
    }

    fn finish_plan(&self, tasks: &[FinishedTask<'_>]) -> FinishPlan {
        let mut assembly = GgufAssembly::default();
        for task in tasks {
            let mut part = Vec::new();
            for (tensor, plan) in &task.tensors {
                if let Some(PassKind::Ggml { file_type, .. }) = plan.values {
                    assembly.file_type.get_or_insert(file_type);
                }
                if let Some(GgufTensor {
                    name: Some(name),
                    ty,
                    expert,
                    ..
                }) = &plan.gguf
                {
                    part.push(PartTensor {
                        name: name.clone(),
                        shape: tensor.shape.to_vec(),
                        ty: *ty,
                        expert: *expert,
                    });
                }
            }
            assembly.parts.push(part);
        }
        FinishPlan {
            index: None,
            quantization_config: None,
            copy_companions: false,
            assembly: Some(Assembly::Gguf(assembly)),
        }
    }
}

/// What the coordinator needs to build a GGUF file's head.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufAssembly {
    /// The file type of the job's `gguf` pass (`None` when it quantized no tensor).
    pub file_type: Option<FileType>,
    /// Per task, in order, its tensors as written.
    pub parts: Vec<Vec<PartTensor>>,
}

/// One tensor of a part as written: a whole GGUF tensor, or one expert's slice of a stacked
/// one.
#[derive(Debug, Clone, PartialEq)]
pub struct PartTensor {
    /// Its GGUF name (a stacked tensor's, for an expert).
    pub name: String,
    /// Row-major shape (of the slice, for an expert).
    pub shape: Vec<u64>,
    pub ty: GgmlType,
    /// `(expert, experts)` of a stacked tensor's slice.
    pub expert: Option<(u64, u64)>,
}

/// A GGUF tensor to lay out: (name, row-major shape, type).
type Laid = (String, Vec<u64>, GgmlType);

/// The GGUF tensors of consecutive parts (each expert run merged into its stacked tensor,
/// `[experts, rows, cols]`), and for each part whether a stacked tensor is still open after
/// it. Every expert slice must follow the previous one of its tensor directly, in order.
/// `requantized`: shapes as `llama-quantize` writes them ([`ggml_n_dims`]).
fn stack_parts(
    parts: &[Vec<PartTensor>],
    requantized: bool,
) -> Result<(Vec<Laid>, Vec<bool>), GgufError> {
    let mut out = Vec::new();
    let mut open_after = Vec::with_capacity(parts.len());
    let mut open: Option<(&PartTensor, u64)> = None;
    let broken = |name: &str, reason: String| {
        GgufError::Invalid(format!(
            "the experts of {name} are not written consecutively in expert order: {reason}"
        ))
    };
    for part in parts {
        for t in part {
            match (t.expert, open) {
                (None, None) => out.push((t.name.clone(), t.shape.clone(), t.ty)),
                (None, Some((first, next))) => {
                    return Err(broken(
                        &first.name,
                        format!("{} follows expert {next}", t.name),
                    ))
                }
                (Some((e, n)), None) => {
                    if e != 0 {
                        return Err(broken(&t.name, format!("it starts at expert {e}")));
                    }
                    open = Some((t, 1));
                    if n == 1 {
                        open = None;
                        out.push(stacked(t, 1));
                    }
                }
                (Some((e, n)), Some((first, next))) => {
                    if t.name != first.name
                        || e != next
                        || t.shape != first.shape
                        || t.ty != first.ty
                    {
                        return Err(broken(
                            &first.name,
                            format!("expert {next} expected, found {} expert {e}", t.name),
                        ));
                    }
                    open = Some((first, next + 1));
                    if e + 1 == n {
                        open = None;
                        out.push(stacked(first, n));
                    }
                }
            }
        }
        open_after.push(open.is_some());
    }
    if let Some((first, next)) = open {
        return Err(broken(
            &first.name,
            format!("it ends after expert {}", next - 1),
        ));
    }
    if requantized {
        for t in &mut out {
            ggml_n_dims(&mut t.1);
        }
    }
    Ok((out, open_after))
}

/// A shape as `llama-quantize` writes it (`ggml_n_dims`: no trailing `ne` of 1, i.e. no
/// leading 1 of the row-major shape; Qwen2-MoE's `[1, n_embd]` shared-expert gate becomes
/// 1-D).
fn ggml_n_dims(shape: &mut Vec<u64>) {
    let ones = shape.iter().take_while(|&&d| d == 1).count();
    shape.drain(..ones.min(shape.len().saturating_sub(1)));
}

/// The stacked tensor of `n` slices like `first`.
fn stacked(first: &PartTensor, n: u64) -> Laid {
    let mut shape = vec![n];
    shape.extend(&first.shape);
    (first.name.clone(), shape, first.ty)
}

/// The bytes a part tensor takes in its part: its data, and the padding after a whole tensor
/// or after a stacked tensor's last slice.
fn part_bytes(t: &PartTensor) -> Result<u64, GgufError> {
    let rows: u64 = t.shape.iter().rev().skip(1).product();
    let cols = t.shape.last().copied().unwrap_or(1);
    let len =
        t.ty.row_bytes(cols)?
            .checked_mul(rows)
            .ok_or(GgufError::Overflow)?;
    let pad = |total: u64| total.div_ceil(ALIGNMENT) * ALIGNMENT - total;
    Ok(match t.expert {
        None => len + pad(len),
        Some((e, n)) if e + 1 == n => len + pad(len.checked_mul(n).ok_or(GgufError::Overflow)?),
        Some(_) => len,
    })
}

/// One file of a GGUF output and what the parts after its head must hold.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    /// `model.gguf`, or llama.cpp's split name `model-0000k-of-0000n.gguf`.
    pub name: String,
    /// Header (metadata, tokenizer, tensor infos, padding) and, in the first file, the
    /// synthesized tensors.
    pub head: Vec<u8>,
    /// The tasks (indices into [`GgufAssembly::parts`]) whose parts follow the head, in order.
    pub tasks: std::ops::Range<usize>,
    /// The exact size of each of those parts.
    pub part_sizes: Vec<u64>,
    /// The size of the whole file.
    pub file_size: u64,
    /// Tensors in the file.
    pub tensors: usize,
}

/// The model files a GGUF head is made from.
#[derive(Debug, Clone, Copy)]
pub struct HeadSources<'a> {
    pub config: &'a Value,
    pub tokenizer: TokenizerFiles<'a>,
    /// `general.name`.
    pub name: &'a str,
}

/// Lays out the output: metadata from `config.json` and the tokenizer files, the synthesized
/// tensors first (llama3 `rope_freqs`), then every task's tensors in task order. One
/// `model.gguf`, or, when `max_file_bytes` is set and the tensors exceed it, llama.cpp's split
/// files (as `gguf-split` writes them: consecutive tasks per file, each file a complete GGUF,
/// the first with every metadata key, all with `split.no`, `split.count` and
/// `split.tensors.count`; llama.cpp loads them from the first file's name). A task's part
/// never spans two files.
pub fn files(
    model: &GgufModel,
    assembly: &GgufAssembly,
    sources: HeadSources<'_>,
    max_file_bytes: Option<u64>,
) -> Result<Vec<GgufFile>, GgufError> {
    let file_type = assembly.file_type.ok_or_else(|| {
        GgufError::Invalid(
            "the recipe's gguf pass matched no tensor, so the file type is unknown".into(),
        )
    })?;
    let hp = HParams::from_config(model.arch, sources.config)?;
    let mut meta = metadata(model.arch, sources.config, file_type, sources.name)?;
    meta.extend(tokenizer_metadata(
        &sources.tokenizer,
        model.arch,
        hp.vocab_size,
    )?);
    let extras = extra_tensors(model.arch, sources.config)?;
    let extra_layout: Vec<Laid> = extras
        .iter()
        .map(|(name, shape, _)| (name.clone(), shape.clone(), GgmlType::F32))
        .collect();
    let requantized = file_type.is_requantized();
    let (stacked_all, open_after) = stack_parts(&assembly.parts, requantized)?;
    let all: Vec<Laid> = extra_layout.iter().chain(&stacked_all).cloned().collect();
    let total_tensors = all.len();
    let laid = layout(&meta, &all, ALIGNMENT)?;
    // Every part's size (padding does not depend on the file).
    let part_sizes: Vec<u64> = assembly
        .parts
        .iter()
        .map(|part| part.iter().map(part_bytes).sum::<Result<u64, _>>())
        .collect::<Result<_, _>>()?;
    let extras_size: u64 = laid.tensors[..extras.len()]
        .iter()
        .map(|t| t.padded_len)
        .sum();
    // Consecutive tasks per file, a new file when the next part would pass the limit (never
    // inside a stacked tensor).
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    let (mut start, mut size) = (0, extras_size);
    for (i, &part) in part_sizes.iter().enumerate() {
        let splittable = i > start && !open_after[i - 1];
        if max_file_bytes.is_some_and(|max| splittable && size + part > max) {
            groups.push(start..i);
            (start, size) = (i, 0);
        }
        size += part;
    }
    groups.push(start..part_sizes.len());
    let count = u16::try_from(groups.len())
        .map_err(|_| GgufError::Invalid(format!("{} split files (at most 65535)", groups.len())))?;
    let tensors_count = i32::try_from(total_tensors).map_err(|_| GgufError::Overflow)?;
    let mut out = Vec::with_capacity(groups.len());
    for (no, tasks) in groups.into_iter().enumerate() {
        let first = no == 0;
        let mut tensors: Vec<Laid> = if first {
            extra_layout.clone()
        } else {
            Vec::new()
        };
        tensors.extend(stack_parts(&assembly.parts[tasks.clone()], requantized)?.0);
        let mut file_meta = if first { meta.clone() } else { Vec::new() };
        let name = if count == 1 {
            FILE_NAME.to_string()
        } else {
            file_meta.push(("split.no".into(), MetaValue::U16(no as u16)));
            file_meta.push(("split.count".into(), MetaValue::U16(count)));
            file_meta.push(("split.tensors.count".into(), MetaValue::I32(tensors_count)));
            split_name(no, count)
        };
        let laid = layout(&file_meta, &tensors, ALIGNMENT)?;
        let mut head = laid.header;
        if first {
            for ((_, _, values), placed) in extras.iter().zip(&laid.tensors) {
                crate::gguf::quants::quantize_f32(values, &mut head)?;
                head.resize((placed.start + placed.padded_len) as usize, 0);
            }
        }
        out.push(GgufFile {
            name,
            head,
            part_sizes: part_sizes[tasks.clone()].to_vec(),
            tasks,
            file_size: laid.file_size,
            tensors: tensors.len(),
        });
    }
    Ok(out)
}

/// llama.cpp's name of split file `no` (from 0) of `count`: `model-00001-of-00003.gguf`.
pub fn split_name(no: usize, count: u16) -> String {
    let stem = FILE_NAME.trim_end_matches(".gguf");
    format!("{stem}-{:05}-of-{count:05}.gguf", no + 1)
}

/// Writes one tensor of a part: its bytes in the planned ggml type, rows permuted where the
/// converter permutes them, zeros up to the alignment.
#[derive(Debug)]
pub struct GgufState {
    /// `None` when the plan was not adapted to GGUF (an error on first use).
    tensor: Option<GgufTensor>,
    /// For a permuted tensor, one head's bytes and its row permutation.
    heads: Result<Option<HeadPermutation>, String>,
    /// Rows received of a head not yet complete.
    pending: Vec<u8>,
    written: u64,
}

/// The converter's Q/K permutation of one head's rows (the same in every head).
#[derive(Debug)]
struct HeadPermutation {
    head_bytes: usize,
    row_bytes: usize,
    /// `out[r] = in[perm[r]]` within a head.
    perm: Vec<u32>,
}

/// The permutation of `tensor`'s rows, `heads` heads, once stored as `ty`.
fn head_permutation(
    tensor: TensorDesc<'_>,
    ty: GgmlType,
    heads: u64,
) -> Result<HeadPermutation, String> {
    let rows = tensor.shape.first().copied().unwrap_or(0);
    let (matrix_rows, row_len) = tensor.matrix();
    let total = ty
        .row_bytes(row_len)
        .ok()
        .and_then(|b| b.checked_mul(matrix_rows))
        .ok_or_else(|| format!("{ty} cannot hold rows of {row_len} values"))?;
    if heads == 0 || rows % heads != 0 || total % rows.max(1) != 0 {
        return Err(format!("{rows} rows are not {heads} equal heads"));
    }
    let head_rows = rows / heads;
    let row_bytes = (total / rows) as usize;
    Ok(HeadPermutation {
        head_bytes: head_rows as usize * row_bytes,
        row_bytes,
        perm: permute_rows(head_rows, 1).map_err(|e| e.to_string())?,
    })
}

fn gguf_err(message: String) -> CodecError {
    CodecError::Pass {
        pass: "gguf",
        message,
    }
}

impl GgufState {
    fn planned(&self) -> Result<&GgufTensor, CodecError> {
        self.tensor
            .as_ref()
            .ok_or_else(|| gguf_err("the tensor's plan has no place in the GGUF file".into()))
    }

    /// A tensor the recipe leaves alone: its values in the planned float type.
    pub fn unchanged(&mut self, dtype: DType, input: &[u8]) -> Result<ChunkOutput, CodecError> {
        let ty = self.planned()?.ty;
        let same = matches!(
            (dtype, ty),
            (DType::F32, GgmlType::F32)
                | (DType::F16, GgmlType::F16)
                | (DType::BF16, GgmlType::BF16)
        );
        let bytes = if same {
            input.to_vec()
        } else {
            let mut values = vec![0f32; input.len() / dtype.size_bytes().max(1)];
            decode_to_f32(dtype, input, &mut values)?;
            let mut bytes = Vec::new();
            ty.quantize(&values, &mut bytes)
                .map_err(|e| gguf_err(e.to_string()))?;
            bytes
        };
        let repr_bits = bytes.len() as u64 * 8;
        Ok(ChunkOutput {
            bytes: self.emit(bytes)?,
            repr_bits,
            kept_rows: 0,
        })
    }

    /// A chunk the `gguf` pass quantized.
    pub fn chunk(&mut self, encoded: EncodedChunk) -> Result<Vec<u8>, CodecError> {
        let planned = self.planned()?.ty;
        match encoded.typed {
            Some(TypedValues::Ggml { ty, blocks }) if ty == planned => self.emit(blocks),
            _ => Err(gguf_err(format!(
                "the pass did not produce {planned} blocks, the tensor's planned type"
            ))),
        }
    }

    /// The bytes to write now: none for a dropped tensor; for a permuted one, its complete
    /// heads, permuted.
    fn emit(&mut self, bytes: Vec<u8>) -> Result<Vec<u8>, CodecError> {
        if self.planned()?.name.is_none() {
            return Ok(Vec::new());
        }
        self.written += bytes.len() as u64;
        let heads = match &self.heads {
            Ok(None) => return Ok(bytes),
            Ok(Some(heads)) => heads,
            Err(reason) => return Err(gguf_err(reason.clone())),
        };
        self.pending.extend(bytes);
        let whole = self.pending.len() / heads.head_bytes * heads.head_bytes;
        let mut out = Vec::with_capacity(whole);
        for head in self.pending[..whole].chunks_exact(heads.head_bytes) {
            for &source in &heads.perm {
                out.extend_from_slice(
                    &head[source as usize * heads.row_bytes..][..heads.row_bytes],
                );
            }
        }
        self.pending.drain(..whole);
        Ok(out)
    }

    /// The padding after the tensor.
    pub fn finish(self) -> Result<Vec<u8>, CodecError> {
        if !self.pending.is_empty() {
            return Err(gguf_err(format!(
                "the tensor ends {} bytes into a head",
                self.pending.len()
            )));
        }
        // An expert's slice is padded only as the stacked tensor's last: the stacked tensor
        // is `experts` slices of this size.
        let total = match self.tensor.as_ref().and_then(|t| t.expert) {
            None => self.written,
            Some((e, n)) if e + 1 == n => self.written * n,
            Some(_) => return Ok(Vec::new()),
        };
        let padded = total.div_ceil(ALIGNMENT) * ALIGNMENT;
        Ok(vec![0; (padded - total) as usize])
    }
}
