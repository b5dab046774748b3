//! compressed-tensors output (`--format compressed-tensors`): what llm-compressor writes and
//! vLLM / transformers load (`quant_method: compressed-tensors`).
//!
//! Layout, per quantized `Linear` weight `M.weight` of shape `[rows, cols]`:
//! - `pack-quantized` (integer weight-only, 4 or 8 bits, group or channel, symmetric or with
//!   integer zero points): `M.weight_packed` I32 `[rows, ceil(cols / (32/bits))]`, codes packed
//!   along a row from the low bits up (`32/bits` codes per word, each stored unsigned, i.e. the
//!   signed code plus `2^(bits-1)`); `M.weight_scale` `[rows, groups]` in the tensor's dtype;
//!   for asymmetric schemes `M.weight_zero_point` I32 `[rows / (32/bits), groups]`, zero points
//!   packed along the *rows*; `M.weight_shape` I64 `[2]`. Dequantized as
//!   `(q - zero) * scale`, which is exactly what our affine codes store (our unsigned codes and
//!   zero points are compressed-tensors' signed ones plus `2^(bits-1)`).
//! - `float-quantized` (FP8 E4M3 weights): `M.weight` F8_E4M3 `[rows, cols]` and
//!   `M.weight_scale` in the tensor's dtype, `[rows, 1]` per channel or `[1]` per tensor.
//!
//! HQQ is written as `pack-quantized` with integer zero points: a plan's HQQ pass is converted
//! to [`HqqConfig::integer_zero`] (HQQ-optimised scales for rounded zeros), which the
//! `w4a16-hqq` recipe asks for in every format.
//!
//! 2:4-pruned weights (`2of4-w4a16`, or 2:4 with FP8) are written as the dense layouts above
//! with the pruned positions holding the code of 0 (the group's zero point; FP8 `0x00`), so
//! they dequantize to exactly 0. This is what llm-compressor 0.14 writes: compressed-tensors
//! 0.19 removed its sparse storage (`sparse-24-bitmask` is a legacy format that its
//! `ModelCompressor` no longer reads: "sparsity is removed for now"), so a sparse layout
//! would be a file no current loader opens. The N:M quantization groups count kept values,
//! so a group of `g` kept values is a group of `g * m / n` columns here.
//!
//! Scales are stored in the tensor's dtype, because runtimes load them into parameters of that
//! dtype, and computed on a grid exact there (bf16 for BF16, f16 for F16 and F32; see
//! `set_scale_grid`): a scale rounded on loading would no longer be the one the codes were
//! chosen for.
//!
//! Streaming: the packed codes (or FP8 bytes) are written as chunks of rows are encoded; scales,
//! zero points and shape, a few percent of the tensor, are buffered and written after it.
//!
//! `config.json` gets a `quantization_config` computed from the plan
//! ([`quantization_config`]): one config group per distinct scheme, `ignore` listing every
//! `Linear` left unquantized (such as `lm_head`).

use serde_json::{json, Value};

use super::{
    shard_index, FinishPlan, FinishedTask, Format, FormatError, ModelFacts, OutputTensor,
    TensorDesc, TensorWriter,
};
use crate::codec::{CodecError, EncodedChunk, TensorPlan, TypedValues};
use crate::dtype::{decode_to_f32, encode_from_f32, DType};
use crate::hqq::HqqConfig;
use crate::recipe::{Granularity, PassKind, PruneConfig, QuantizeConfig, Recipe};
use crate::sparse;

/// The compressed-tensors format; see the module docs.
pub struct CompressedTensors;

const NAME: &str = "compressed-tensors";

/// The compressed-tensors library version whose layout this follows (written to config.json).
pub const SPEC_VERSION: &str = "0.12.2";

/// How one tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scheme {
    /// Unchanged, under its own name.
    Dense,
    /// `pack-quantized` integer codes; `cfg.granularity` counts columns of the dense row.
    Int {
        cfg: QuantizeConfig,
        pruned: Option<NOfM>,
    },
    /// `float-quantized` FP8 E4M3.
    Fp8 {
        per_channel: bool,
        pruned: Option<NOfM>,
    },
}

/// An N:M prune before the values pass: `n` of every `m` weights are kept (and coded).
#[derive(Debug, Clone, Copy, PartialEq)]
struct NOfM {
    n: usize,
    m: usize,
}

fn scheme(plan: &TensorPlan) -> Scheme {
    let pruned = match plan.structure {
        None => None,
        Some(PruneConfig::NOfM { n, m }) => Some(NOfM { n, m }),
        Some(_) => return Scheme::Dense,
    };
    // The pass's groups count kept values; the format's count columns of the dense row.
    let dense = |granularity: Granularity| match (granularity, pruned) {
        (Granularity::Group(g), Some(NOfM { n, m })) => Granularity::Group(g / n.max(1) * m),
        _ => granularity,
    };
    match &plan.values {
        Some(PassKind::Quantize(cfg)) => Scheme::Int {
            cfg: QuantizeConfig {
                granularity: dense(cfg.granularity),
                ..*cfg
            },
            pruned,
        },
        Some(PassKind::Hqq(h)) if h.integer_zero => Scheme::Int {
            cfg: QuantizeConfig {
                bits: h.bits,
                symmetric: false,
                granularity: dense(h.granularity),
                scale_dtype: h.scale_dtype,
            },
            pruned,
        },
        Some(PassKind::Fp8 { per_channel, .. }) => Scheme::Fp8 {
            per_channel: *per_channel,
            pruned,
        },
        _ => Scheme::Dense,
    }
}

/// `M` of a weight `M.weight`.
fn module_of(name: &str) -> Option<&str> {
    name.strip_suffix(".weight")
}

/// Whether a tensor is the weight of a `Linear` module as Hugging Face models name them: a
/// 2-D `.weight` that is not an embedding table.
pub fn is_linear_weight(name: &str, shape: &[u64]) -> bool {
    let Some(module) = module_of(name) else {
        return false;
    };
    let last = module
        .rsplit('.')
        .next()
        .unwrap_or(module)
        .to_ascii_lowercase();
    shape.len() == 2 && !last.contains("embed") && last != "wte" && last != "wpe"
}

fn pack_factor(bits: u8) -> u64 {
    32 / u64::from(bits)
}

impl Format for CompressedTensors {
    fn name(&self) -> &'static str {
        NAME
    }

    fn describe(&self) -> &'static str {
        "compressed-tensors (pack-quantized / float-quantized, 2:4 stored dense; vLLM and transformers load it)"
    }

    fn check_recipe(&self, recipe: &Recipe) -> Result<(), FormatError> {
        let refuse = |reason: &str| FormatError::Recipe {
            format: NAME,
            recipe: recipe.name.clone(),
            reason: reason.to_owned(),
        };
        if recipe.passes.is_empty() {
            return Err(refuse(
                "needs a quantize or fp8 pass (a recipe without lossy passes only makes sense with --format spz)",
            ));
        }
        if recipe
            .passes
            .iter()
            .any(|p| matches!(p.kind, PassKind::Ggml { .. }))
        {
            return Err(refuse(
                "cannot hold a gguf pass's llama.cpp blocks; write them with --format gguf",
            ));
        }
        if recipe.share_cosine.is_some() {
            return Err(refuse(
                "cannot store near-identical tensors as one (share:); drop share: or use --format safetensors / spz",
            ));
        }
        super::refuse_kept_rows(NAME, recipe)
    }

    fn adapt_plan(
        &self,
        tensor: TensorDesc<'_>,
        plan: &mut TensorPlan,
        _model: &ModelFacts,
    ) -> Result<(), FormatError> {
        if plan.is_identity() {
            return Ok(());
        }
        let pass = plan.describe();
        let refuse = |reason: String| FormatError::Unsupported {
            format: NAME,
            tensor: tensor.name.to_owned(),
            pass: pass.clone(),
            reason,
        };
        match (plan.structure, plan.values.as_ref()) {
            (None, _) => {}
            (Some(PruneConfig::NOfM { .. }), Some(PassKind::Quantize(_) | PassKind::Hqq(_) | PassKind::Fp8 { .. })) => {}
            (Some(PruneConfig::NOfM { .. }), None) => {
                return Err(refuse(
                    "2:4 pruning alone gives dense weights here (compressed-tensors 0.19 has no sparse storage); add a quantize or fp8 pass (2of4-w4a16) or use --format safetensors".into(),
                ))
            }
            (Some(_), _) => {
                return Err(refuse(
                    "only N:M pruning followed by a quantize or fp8 pass is written (compressed-tensors 0.19 has no sparse storage for other masks); use --format safetensors or spz".into(),
                ))
            }
        }
        if !is_linear_weight(tensor.name, tensor.shape) {
            return Err(refuse(
                "only the 2-D weights of Linear modules (`*.weight`, not embeddings) are quantized in this format; add the tensor to the pass's ignore list".into(),
            ));
        }
        if let Some(PassKind::Hqq(h)) = plan.values.as_mut() {
            // HQQ-optimised scales for integer zero points: what this format can hold.
            h.integer_zero = true;
        }
        let (rows, cols) = (tensor.shape[0], tensor.shape[1]);
        match scheme(plan) {
            Scheme::Int { cfg, pruned } => {
                if cfg.bits != 4 && cfg.bits != 8 {
                    return Err(refuse(format!(
                        "pack-quantized holds 4- or 8-bit codes (vLLM's kernels), not {}-bit",
                        cfg.bits
                    )));
                }
                let kept_group = match plan.values.as_ref() {
                    Some(PassKind::Quantize(QuantizeConfig { granularity, .. }))
                    | Some(PassKind::Hqq(HqqConfig { granularity, .. })) => *granularity,
                    _ => Granularity::Channel,
                };
                if let (Granularity::Group(g), Some(NOfM { n, m })) = (kept_group, pruned) {
                    if g % n != 0 {
                        return Err(refuse(format!(
                            "a group of {g} kept values is not whole {n}:{m} blocks of columns; use a multiple of {n}"
                        )));
                    }
                }
                match cfg.granularity {
                    Granularity::Tensor => {
                        return Err(refuse(
                            "integer weights need group or channel scales (runtimes have no per-tensor int kernel)".into(),
                        ))
                    }
                    Granularity::Group(g) if g == 0 || cols % g as u64 != 0 => {
                        return Err(refuse(format!(
                            "group size {g} does not divide the {cols} columns (compressed-tensors counts cols / group_size groups)"
                        )))
                    }
                    _ => {}
                }
                if !cfg.symmetric && rows % pack_factor(cfg.bits) != 0 {
                    return Err(refuse(format!(
                        "asymmetric zero points are packed {} rows per int32, and {rows} rows are not a multiple",
                        pack_factor(cfg.bits)
                    )));
                }
            }
            Scheme::Fp8 { .. } => {}
            Scheme::Dense => {
                if let Some(other) = &plan.values {
                    return Err(refuse(format!(
                        "{} has no compressed-tensors layout that runtimes execute (it holds integer codes and FP8); use --format safetensors or spz",
                        other.describe()
                    )));
                }
            }
        }
        super::set_scale_grid(tensor.dtype, plan);
        Ok(())
    }

    fn task_output_name(&self, index: usize, total: usize) -> String {
        super::safetensors::shard_name(index, total)
    }

    fn output_tensors(&self, tensor: TensorDesc<'_>, plan: &TensorPlan) -> Vec<OutputTensor> {
        let out = |name: String, dtype: DType, shape: Vec<u64>| OutputTensor { name, dtype, shape };
        let (module, rows, cols) = match (module_of(tensor.name), tensor.shape) {
            (Some(module), [rows, cols]) => (module, *rows, *cols),
            _ => {
                return vec![out(
                    tensor.name.to_owned(),
                    tensor.dtype,
                    tensor.shape.to_vec(),
                )]
            }
        };
        match scheme(plan) {
            Scheme::Dense => vec![out(
                tensor.name.to_owned(),
                tensor.dtype,
                tensor.shape.to_vec(),
            )],
            Scheme::Int { cfg, .. } => {
                let pf = pack_factor(cfg.bits);
                let groups = groups_per_row(&cfg, cols);
                let mut tensors = vec![
                    out(
                        format!("{module}.weight_packed"),
                        DType::I32,
                        vec![rows, cols.div_ceil(pf)],
                    ),
                    out(
                        format!("{module}.weight_scale"),
                        tensor.dtype,
                        vec![rows, groups],
                    ),
                ];
                if !cfg.symmetric {
                    tensors.push(out(
                        format!("{module}.weight_zero_point"),
                        DType::I32,
                        vec![rows.div_ceil(pf), groups],
                    ));
                }
                tensors.push(out(format!("{module}.weight_shape"), DType::I64, vec![2]));
                tensors
            }
            Scheme::Fp8 { per_channel, .. } => vec![
                out(tensor.name.to_owned(), DType::F8_E4M3, vec![rows, cols]),
                out(
                    format!("{module}.weight_scale"),
                    tensor.dtype,
                    if per_channel { vec![rows, 1] } else { vec![1] },
                ),
            ],
        }
    }

    fn tensor_writer(&self, tensor: TensorDesc<'_>, plan: &TensorPlan) -> TensorWriter {
        let (rows, cols) = tensor.matrix();
        match scheme(plan) {
            Scheme::Dense => TensorWriter::Reconstruction,
            Scheme::Int { cfg, pruned } => TensorWriter::PackQuantized(PackState {
                cfg,
                pruned,
                scale_dtype: tensor.dtype,
                rows,
                cols,
                rows_done: 0,
                scales: Vec::new(),
                zeros: Vec::new(),
            }),
            Scheme::Fp8 { pruned, .. } => TensorWriter::FloatQuantized(FloatState {
                pruned,
                scale_dtype: tensor.dtype,
                scales: Vec::new(),
            }),
        }
    }

    fn finish_plan(&self, tasks: &[FinishedTask<'_>]) -> FinishPlan {
        let tensors: Vec<(TensorDesc<'_>, &TensorPlan)> = tasks
            .iter()
            .flat_map(|t| t.tensors.iter().copied())
            .collect();
        FinishPlan {
            index: Some(shard_index(self, tasks)),
            quantization_config: Some(quantization_config(&tensors)),
            copy_companions: true,
            assembly: None,
        }
    }
}

fn groups_per_row(cfg: &QuantizeConfig, cols: u64) -> u64 {
    match cfg.granularity {
        Granularity::Group(g) => cols.div_ceil(g as u64),
        Granularity::Channel | Granularity::Tensor => 1,
    }
}

fn not_typed(what: &str) -> CodecError {
    CodecError::Corrupt(format!(
        "compressed-tensors needs {what} codes from the values stage, which produced none"
    ))
}

/// Streaming state of a `pack-quantized` tensor.
#[derive(Debug)]
pub struct PackState {
    /// The scheme, its groups counted in columns of the dense row.
    cfg: QuantizeConfig,
    /// The N:M prune whose kept values the codes are, if any.
    pruned: Option<NOfM>,
    /// The tensor's dtype, which scales are stored in (exact: they are on its grid).
    scale_dtype: DType,
    rows: u64,
    cols: u64,
    rows_done: u64,
    /// Scales so far, encoded in the scale dtype.
    scales: Vec<u8>,
    /// Zero points so far (asymmetric), one unsigned code per group.
    zeros: Vec<u8>,
}

impl PackState {
    pub(super) fn chunk(&mut self, encoded: EncodedChunk) -> Result<Vec<u8>, CodecError> {
        let mask = nm_mask(&encoded, self.pruned)?;
        let Some(TypedValues::Affine(mut codes)) = encoded.typed else {
            return Err(not_typed("affine"));
        };
        let cols = self.cols as usize;
        let groups = groups_per_row(&self.cfg, self.cols) as usize;
        if let Some(mask) = mask {
            // Pruned positions get their group's zero point: the code of exactly 0.
            let group_cols = cols.div_ceil(groups.max(1)).max(1);
            let kept = codes.codes.len();
            let zero_code = |i: usize| -> u8 {
                let (r, c) = (i / cols, i % cols);
                match codes.zeros.get(r * groups + c / group_cols) {
                    Some(&z) => z as u8,
                    None => 1 << (self.cfg.bits - 1),
                }
            };
            let mut kept_codes = codes.codes.iter();
            let dense: Vec<u8> = (0..mask.len())
                .map(|i| match mask[i] {
                    true => kept_codes.next().copied().unwrap_or(0),
                    false => zero_code(i),
                })
                .collect();
            if mask.iter().filter(|&&k| k).count() != kept {
                return Err(CodecError::Corrupt(format!(
                    "{kept} codes for a mask keeping {} weights",
                    mask.iter().filter(|&&k| k).count()
                )));
            }
            codes.codes = dense;
        }
        let rows = codes.codes.len() / cols.max(1);
        if codes.codes.len() != rows * cols || codes.scales.len() != rows * groups {
            return Err(CodecError::Corrupt(format!(
                "chunk of {} codes and {} scales does not fill rows of {cols} with {groups} groups",
                codes.codes.len(),
                codes.scales.len()
            )));
        }
        self.rows_done += rows as u64;
        let pf = pack_factor(self.cfg.bits) as usize;
        let words_per_row = cols.div_ceil(pf);
        let mut bytes = Vec::with_capacity(rows * words_per_row * 4);
        for row in codes.codes.chunks_exact(cols) {
            for word_codes in row.chunks(pf) {
                bytes.extend_from_slice(&pack_word(word_codes, self.cfg.bits).to_le_bytes());
            }
        }
        let start = self.scales.len();
        let size = self.scale_dtype.size_bytes();
        self.scales.resize(start + codes.scales.len() * size, 0);
        encode_from_f32(self.scale_dtype, &codes.scales, &mut self.scales[start..])?;
        if !self.cfg.symmetric {
            // RTN zero points are integers in [0, 2^bits), held as f32.
            self.zeros.extend(codes.zeros.iter().map(|&z| z as u8));
        }
        Ok(bytes)
    }

    pub(super) fn finish(self) -> Result<Vec<u8>, CodecError> {
        if self.rows_done != self.rows {
            return Err(CodecError::Corrupt(format!(
                "{} of {} rows were encoded",
                self.rows_done, self.rows
            )));
        }
        let mut out = self.scales;
        if !self.cfg.symmetric {
            let groups = groups_per_row(&self.cfg, self.cols) as usize;
            let pf = pack_factor(self.cfg.bits) as usize;
            let rows = self.rows as usize;
            for block in 0..rows.div_ceil(pf) {
                for g in 0..groups {
                    let column: Vec<u8> = (block * pf..((block + 1) * pf).min(rows))
                        .map(|r| self.zeros[r * groups + g])
                        .collect();
                    out.extend_from_slice(&pack_word(&column, self.cfg.bits).to_le_bytes());
                }
            }
        }
        for dim in [self.rows, self.cols] {
            out.extend_from_slice(&(dim as i64).to_le_bytes());
        }
        Ok(out)
    }
}

/// The keep mask of a chunk pruned `pruned` (from its `positions` section), or `None` when
/// it was not pruned.
fn nm_mask(encoded: &EncodedChunk, pruned: Option<NOfM>) -> Result<Option<Vec<bool>>, CodecError> {
    let Some(NOfM { n, m }) = pruned else {
        return Ok(None);
    };
    let positions = encoded
        .sections
        .iter()
        .find(|(name, _, _)| name == "positions")
        .ok_or_else(|| CodecError::Corrupt("a 2:4 chunk without its positions".into()))?;
    sparse::nm_unpack_positions(&positions.2, encoded.rows * encoded.row_len, n, m)
        .map(Some)
        .map_err(|e| CodecError::Corrupt(format!("N:M positions: {e}")))
}

/// Packs up to `32 / bits` unsigned codes into one word, the first in the lowest bits.
fn pack_word(codes: &[u8], bits: u8) -> u32 {
    codes.iter().enumerate().fold(0u32, |word, (i, &c)| {
        word | u32::from(c) << (u32::from(bits) * i as u32)
    })
}

/// Streaming state of a `float-quantized` tensor.
#[derive(Debug)]
pub struct FloatState {
    /// The N:M prune whose kept values the bytes are, if any.
    pruned: Option<NOfM>,
    /// The tensor's dtype, which scales are stored in.
    scale_dtype: DType,
    scales: Vec<f32>,
}

impl FloatState {
    pub(super) fn chunk(&mut self, encoded: EncodedChunk) -> Result<Vec<u8>, CodecError> {
        let mask = nm_mask(&encoded, self.pruned)?;
        let Some(TypedValues::Fp8(codes)) = encoded.typed else {
            return Err(not_typed("FP8"));
        };
        match (codes.per_channel, self.scales.first()) {
            // A per-tensor scale streamed in chunks: every chunk carries the tensor's one.
            (false, Some(&first)) => {
                if codes.scales.iter().any(|&s| s.to_bits() != first.to_bits()) {
                    return Err(CodecError::Corrupt(format!(
                        "a chunk's per-tensor FP8 scale {:?} differs from the tensor's {first}",
                        codes.scales
                    )));
                }
            }
            _ => self.scales.extend_from_slice(&codes.scales),
        }
        let Some(mask) = mask else {
            return Ok(codes.bytes);
        };
        // Pruned positions hold FP8 +0.
        let mut dense = vec![0u8; mask.len()];
        let mut kept = codes.bytes.iter();
        for (out, _) in dense.iter_mut().zip(&mask).filter(|(_, &keep)| keep) {
            *out = *kept
                .next()
                .ok_or_else(|| CodecError::Corrupt("fewer FP8 bytes than kept weights".into()))?;
        }
        if kept.next().is_some() {
            return Err(CodecError::Corrupt(
                "more FP8 bytes than kept weights".into(),
            ));
        }
        Ok(dense)
    }

    pub(super) fn finish(self) -> Result<Vec<u8>, CodecError> {
        let mut out = vec![0u8; self.scales.len() * self.scale_dtype.size_bytes()];
        encode_from_f32(self.scale_dtype, &self.scales, &mut out)?;
        Ok(out)
    }
}

/// The `weights` quantization args and the format of a scheme (None: stored dense).
fn weight_args(scheme: Scheme) -> Option<(Value, &'static str)> {
    let args = |num_bits: u8, kind: &str, symmetric: bool, strategy: &str, group: Value| {
        json!({
            "num_bits": num_bits,
            "type": kind,
            "symmetric": symmetric,
            "group_size": group,
            "strategy": strategy,
            "block_structure": null,
            "dynamic": false,
            "actorder": null,
            "observer": "minmax",
            "observer_kwargs": {}
        })
    };
    match scheme {
        Scheme::Dense => None,
        Scheme::Int { cfg, .. } => {
            let (strategy, group) = match cfg.granularity {
                Granularity::Group(g) => ("group", json!(g)),
                Granularity::Channel | Granularity::Tensor => ("channel", Value::Null),
            };
            Some((
                args(cfg.bits, "int", cfg.symmetric, strategy, group),
                "pack-quantized",
            ))
        }
        Scheme::Fp8 { per_channel, .. } => {
            let strategy = if per_channel { "channel" } else { "tensor" };
            Some((
                args(8, "float", true, strategy, Value::Null),
                "float-quantized",
            ))
        }
    }
}

/// A config group's target for one module: its name as an anchored regex, with a leading
/// `model.` optional, so that both the `*ForCausalLM` class (vLLM, transformers'
/// `AutoModelForCausalLM`), whose modules are named as the checkpoint's tensors, and the bare
/// model under it (`AutoModel`), whose names lack that prefix, match it.
fn module_target(module: &str) -> String {
    match module.strip_prefix("model.") {
        Some(rest) => format!("re:^(model\\.)?{}$", regex::escape(rest)),
        None => format!("re:^{}$", regex::escape(module)),
    }
}

/// The `quantization_config` for `config.json`, as llm-compressor writes it, from every
/// tensor of the job and its plan: one config group per distinct scheme (targeting `Linear`
/// when there is one scheme, else the modules by anchored regex), `ignore` listing every
/// `Linear` stored unquantized.
pub fn quantization_config(tensors: &[(TensorDesc<'_>, &TensorPlan)]) -> Value {
    let mut groups: Vec<(Value, &'static str, Vec<String>)> = Vec::new();
    let mut ignore = Vec::new();
    for (tensor, plan) in tensors {
        if !is_linear_weight(tensor.name, tensor.shape) {
            continue;
        }
        let module = module_of(tensor.name).unwrap_or(tensor.name).to_owned();
        match weight_args(scheme(plan)) {
            None => ignore.push(module),
            Some((args, format)) => match groups.iter_mut().find(|g| g.0 == args) {
                Some(group) => group.2.push(module),
                None => groups.push((args, format, vec![module])),
            },
        }
    }
    ignore.sort();
    let single = groups.len() == 1;
    let mut config_groups = serde_json::Map::new();
    for (i, (weights, format, mut modules)) in groups.iter().cloned().enumerate() {
        modules.sort();
        let targets: Vec<String> = if single {
            vec!["Linear".to_owned()]
        } else {
            modules.iter().map(|m| module_target(m)).collect()
        };
        config_groups.insert(
            format!("group_{i}"),
            json!({
                "targets": targets,
                "weights": weights,
                "input_activations": null,
                "output_activations": null,
                "format": format
            }),
        );
    }
    let formats: Vec<&str> = groups.iter().map(|g| g.1).collect();
    let format = match formats.first() {
        Some(first) if formats.iter().all(|f| f == first) => *first,
        Some(_) => "mixed-precision",
        None => "dense",
    };
    json!({
        "quant_method": "compressed-tensors",
        "format": format,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "global_compression_ratio": null,
        "version": SPEC_VERSION
    })
}

/// Dequantizes a `pack-quantized` weight back to f32, row-major `[rows, cols]`: the reader
/// side of this format, written from the specification (as the tests' numpy reader is).
pub fn dequantize_packed(
    packed: &[u8],
    scales: &[u8],
    scale_dtype: DType,
    zero_points: Option<&[u8]>,
    shape: [u64; 2],
    bits: u8,
    group_size: Option<usize>,
) -> Result<Vec<f32>, FormatError> {
    let bad = |reason: String| FormatError::Layout {
        tensor: "weight_packed".into(),
        reason,
    };
    let [rows, cols] = shape.map(|d| d as usize);
    let pf = pack_factor(bits) as usize;
    let words_per_row = cols.div_ceil(pf);
    let groups = group_size.map_or(1, |g| cols.div_ceil(g.max(1)));
    if packed.len() != rows * words_per_row * 4 {
        return Err(bad(format!(
            "{} packed bytes for shape {shape:?}",
            packed.len()
        )));
    }
    let mut scale_values = vec![0f32; rows * groups];
    decode_to_f32(scale_dtype, scales, &mut scale_values).map_err(|e| bad(e.to_string()))?;
    let mut out = vec![0f32; rows * cols];
    let group = group_size.unwrap_or(cols).max(1);
    dequantize_packed_rows(
        packed,
        0,
        cols,
        bits,
        group,
        &scale_values,
        zero_points,
        &mut out,
    )
    .map_err(bad)?;
    Ok(out)
}

/// Dequantizes whole rows of a `pack-quantized` weight starting at weight row `first_row`
/// (the reader used on compressed-tensors *inputs*): `packed` holds the rows' words, `scales`
/// the whole `[rows, groups]` grid as f32, `zero_points` the whole packed zero-point tensor
/// (or none: zero `2^(bits-1)`), `group` columns per scale. Writes `(q - zero) * scale`.
#[allow(clippy::too_many_arguments)]
pub fn dequantize_packed_rows(
    packed: &[u8],
    first_row: u64,
    cols: usize,
    bits: u8,
    group: usize,
    scales: &[f32],
    zero_points: Option<&[u8]>,
    out: &mut [f32],
) -> Result<(), String> {
    use rayon::prelude::*;
    if !matches!(bits, 4 | 8) || cols == 0 || group == 0 {
        return Err(format!(
            "{bits}-bit codes in rows of {cols} with groups of {group}"
        ));
    }
    let pf = 32 / usize::from(bits);
    let row_bytes = cols.div_ceil(pf) * 4;
    let groups = cols.div_ceil(group);
    let rows = packed.len() / row_bytes;
    let last = first_row as usize + rows;
    if packed.len() % row_bytes != 0 || out.len() != rows * cols || scales.len() < last * groups {
        return Err(format!(
            "{} packed bytes, {} outputs and {} scales do not make rows {first_row}..{last} of {cols}",
            packed.len(),
            out.len(),
            scales.len()
        ));
    }
    if let Some(zp) = zero_points {
        if zp.len() < last.div_ceil(pf) * groups * 4 {
            return Err(format!(
                "{} zero-point bytes do not cover row {last}",
                zp.len()
            ));
        }
    }
    let mask = (1u32 << bits) - 1;
    let word = |bytes: &[u8], i: usize| {
        u32::from_le_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ])
    };
    packed
        .par_chunks(row_bytes)
        .zip(out.par_chunks_mut(cols))
        .enumerate()
        .for_each(|(i, (words, values))| {
            let r = first_row as usize + i;
            for (c, v) in values.iter_mut().enumerate() {
                let g = c / group;
                let q = (word(words, c / pf) >> (usize::from(bits) * (c % pf))) & mask;
                let zero = match zero_points {
                    None => 1u32 << (bits - 1),
                    Some(zp) => {
                        (word(zp, (r / pf) * groups + g) >> (usize::from(bits) * (r % pf))) & mask
                    }
                };
                *v = (q as f32 - zero as f32) * scales[r * groups + g];
            }
        });
    Ok(())
}
