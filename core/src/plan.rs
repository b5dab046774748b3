//! Planning: splitting a model's tensors into tasks under a byte budget.
//!
//! The plan is a pure, deterministic function of the source headers and the budget (file
//! order does not matter). Tensors are grouped by transformer layer (parsed from names like
//! `model.layers.12.mlp.up_proj.weight`); the unnumbered tensors (embeddings, final norm, LM
//! head) form the "other" group, planned first. Each group is packed greedily in name order
//! (a mixture-of-experts layer's `experts.E.` tensors ordered by projection, then by expert
//! number, so each projection's experts are consecutive, as GGUF stacks them) into tasks of
//! at most `budget_bytes`; a tensor larger than the budget gets a task of its
//! own and is never split (workers stream it in row chunks). Each task becomes one output
//! file, `model-00001-of-000NN.safetensors`.
//!
//! FP8 weights stored with scales (DeepSeek-V3/R1's `W.weight` F8_E4M3 with
//! `W.weight_scale_inv`, 128x128 blocks; compressed-tensors' `W.weight` with `W.weight_scale`
//! per channel or per tensor) are planned as one BF16 tensor: the scale tensor travels with
//! its weight ([`BlockScales`]), workers decode `fp8 * scale` to BF16 as they read, and the
//! scale tensor is not an output of its own. Passes, formats and reports see a BF16 weight.
//! compressed-tensors `pack-quantized` weights (`W.weight_packed` with `W.weight_scale`,
//! `W.weight_zero_point`, `W.weight_shape`) are planned the same way as `W.weight` in the
//! scales' dtype ([`PackedInts`]; the caller reads each `weight_shape`'s two numbers, see
//! [`plan_tasks_with`]).

use crate::dtype::DType;
use crate::header::SafetensorsHeader;
use regex::Regex;
use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

/// One source safetensors file and its parsed header.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Object name relative to the model root, e.g. `model-00001-of-00002.safetensors`.
    pub name: String,
    pub size: u64,
    pub header: SafetensorsHeader,
}

/// A tensor assigned to a task, with its absolute byte range in the source file.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlannedTensor {
    pub name: String,
    pub source_file: String,
    /// The dtype of the values passes see: the stored dtype, or BF16 for FP8 with scales.
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Absolute offset of the first data byte in the source file.
    pub data_start: u64,
    /// Absolute offset one past the last data byte.
    pub data_end: u64,
    /// The scales of FP8 values decoded on reading (see the module docs).
    pub scales: Option<BlockScales>,
    /// The layout of packed integer codes decoded on reading (see the module docs).
    pub packed: Option<PackedInts>,
}

/// A compressed-tensors `pack-quantized` weight: `32 / bits` codes per little-endian `i32`
/// along each row (the first in the low bits, stored unsigned), `value = (q - zero) * scale`
/// of the element's group, zero `2^(bits-1)` when there are no zero points.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PackedInts {
    pub bits: u8,
    /// `[rows, groups]` scales; `block` is `[1, columns per group]`.
    pub scales: BlockScales,
    /// `[ceil(rows / (32 / bits)), groups]` I32 zero points, packed along the rows.
    pub zero_points: Option<BlockScales>,
}

impl PlannedTensor {
    /// Data length in bytes (as stored, scales and zero points included).
    pub fn byte_len(&self) -> u64 {
        let own = self.data_end.saturating_sub(self.data_start);
        let side = self.scales.iter().map(BlockScales::byte_len).sum::<u64>()
            + self.packed.as_ref().map_or(0, |p| {
                p.scales.byte_len() + p.zero_points.as_ref().map_or(0, BlockScales::byte_len)
            });
        own.saturating_add(side)
    }

    /// The dtype of the stored bytes (`dtype` unless decoded from FP8 or packed codes).
    pub fn stored_dtype(&self) -> DType {
        match (&self.scales, &self.packed) {
            (Some(_), _) => DType::F8_E4M3,
            (_, Some(_)) => DType::I32,
            _ => self.dtype,
        }
    }

    /// Whether the stored bytes are decoded (FP8 with scales, packed codes) as they are read.
    pub fn is_decoded(&self) -> bool {
        self.scales.is_some() || self.packed.is_some()
    }

    /// Stored bytes per row of `row_len` values (decoded tensors: per row of the weight).
    pub fn stored_row_bytes(&self, row_len: u64) -> u64 {
        let cols = self.shape.last().copied().unwrap_or(1);
        match (&self.scales, &self.packed) {
            (Some(_), _) => cols,
            (_, Some(p)) => cols.div_ceil(32 / u64::from(p.bits)) * 4,
            _ => row_len * self.dtype.size_bytes() as u64,
        }
    }
}

/// The scale tensor of an FP8 weight: `value = fp8 * scale` of the weight's block
/// (`block` rows by columns; `[1, cols]` is per channel, `[rows, cols]` per tensor).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BlockScales {
    pub name: String,
    pub source_file: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data_start: u64,
    pub data_end: u64,
    pub block: [u64; 2],
}

impl BlockScales {
    /// Data length in bytes.
    pub fn byte_len(&self) -> u64 {
        self.data_end.saturating_sub(self.data_start)
    }

    /// Scale columns (blocks per weight row).
    pub fn cols(&self) -> u64 {
        self.shape.get(1).copied().unwrap_or(1)
    }
}

/// The block edge DeepSeek-V3/R1 (and every FP8 block checkpoint we know) use; a scale grid
/// that fits it is read with it, whatever other edge would also fit.
pub const FP8_BLOCK: u64 = 128;

/// The suffixes a weight's FP8 scale tensor has: DeepSeek's and compressed-tensors'.
const SCALE_SUFFIXES: [&str; 2] = ["_scale_inv", "_scale"];

/// One unit of work: a set of tensors written to one output file.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlannedTask {
    /// 0-based position in the plan.
    pub index: u32,
    /// `"layer N"` or `"other"`.
    pub group: String,
    /// In plan order (by name, experts by projection then number).
    pub tensors: Vec<PlannedTensor>,
    /// `model-{index+1:05}-of-{total:05}.safetensors`.
    pub output_name: String,
    /// Sum of the tensors' data lengths.
    pub input_bytes: u64,
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("tensor {name:?} appears in both {first_file:?} and {second_file:?}")]
    DuplicateTensor {
        name: String,
        first_file: String,
        second_file: String,
    },
    #[error("the model has no tensors")]
    Empty,
    #[error("task budget must be at least one byte")]
    InvalidBudget,
    #[error("tensor {tensor:?} in {file:?} has data offsets beyond u64")]
    OffsetOverflow { tensor: String, file: String },
    #[error("plan would have {count} tasks, more than u32 can index")]
    TooManyTasks { count: usize },
    #[error("packed weight {weight:?}: {reason}")]
    BadPacked { weight: String, reason: String },
    #[error("FP8 weight {weight:?} has scales {scales:?} that do not fit it: {reason}")]
    BadScales {
        weight: String,
        scales: String,
        reason: String,
    },
}

static EXPERT_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\.experts\.(\d+)\.").expect("static regex is valid"));

/// The key tensors are planned in within a group: the name, except that an expert's number
/// (`….experts.12.w1.weight`) sorts numerically after its projection.
fn plan_order(name: &str) -> (String, u64, String) {
    match EXPERT_RE.captures(name) {
        Some(c) => {
            let whole = c.get(0).expect("group 0 always matches");
            let number = c[1].parse().unwrap_or(u64::MAX);
            let key = format!(
                "{}.experts.{}",
                &name[..whole.start()],
                &name[whole.end()..]
            );
            (key, number, name.to_owned())
        }
        None => (name.to_owned(), 0, String::new()),
    }
}

static LAYER_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:^|\.)(?:layers|h|block|blocks|layer)\.(\d+)\.").expect("static regex is valid")
});

/// The layer number in a tensor name, e.g. `"model.layers.12.mlp.up_proj.weight"` -> 12 and
/// `"transformer.h.3.attn.c_attn.weight"` -> 3; `None` when absent or beyond u64.
pub fn layer_index(tensor_name: &str) -> Option<u64> {
    LAYER_RE
        .captures(tensor_name)?
        .get(1)?
        .as_str()
        .parse()
        .ok()
}

/// Splits all tensors of `files` into tasks of at most `budget_bytes` (see the module docs).
pub fn plan_tasks(files: &[SourceFile], budget_bytes: u64) -> Result<Vec<PlannedTask>, PlanError> {
    plan_tasks_with(files, budget_bytes, &HashMap::new())
}

/// [`plan_tasks`] for a model that may hold compressed-tensors packed weights:
/// `weight_shapes` maps each `….weight_shape` tensor to the two numbers it holds.
pub fn plan_tasks_with(
    files: &[SourceFile],
    budget_bytes: u64,
    weight_shapes: &HashMap<String, [u64; 2]>,
) -> Result<Vec<PlannedTask>, PlanError> {
    if budget_bytes == 0 {
        return Err(PlanError::InvalidBudget);
    }
    let tensors = attach_packed(gather(files)?, weight_shapes)?;
    if tensors.is_empty() {
        return Err(PlanError::Empty);
    }
    // None (the "other" group) sorts before every layer.
    let mut groups: BTreeMap<Option<u64>, Vec<PlannedTensor>> = BTreeMap::new();
    for t in tensors {
        groups.entry(layer_index(&t.name)).or_default().push(t);
    }
    let mut packed: Vec<(String, Vec<PlannedTensor>)> = Vec::new();
    for (layer, mut members) in groups {
        members.sort_by_cached_key(|t| plan_order(&t.name));
        let label = layer.map_or_else(|| "other".to_owned(), |l| format!("layer {l}"));
        for chunk in pack(members, budget_bytes) {
            packed.push((label.clone(), chunk));
        }
    }
    let total = packed.len();
    if u32::try_from(total).is_err() {
        return Err(PlanError::TooManyTasks { count: total });
    }
    Ok(packed
        .into_iter()
        .zip(0u32..)
        .map(|((group, tensors), index)| PlannedTask {
            index,
            group,
            input_bytes: tensors
                .iter()
                .fold(0u64, |a, t| a.saturating_add(t.byte_len())),
            output_name: output_name(index, total),
            tensors,
        })
        .collect())
}

/// `model-{index+1:05}-of-{total:05}.safetensors`.
pub fn output_name(index: u32, total: usize) -> String {
    format!(
        "model-{:05}-of-{total:05}.safetensors",
        u64::from(index) + 1
    )
}

/// All tensors of all files, visiting files in name order so duplicates report stably.
fn gather(files: &[SourceFile]) -> Result<Vec<PlannedTensor>, PlanError> {
    let mut sorted: Vec<&SourceFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut owner: HashMap<&str, &str> = HashMap::new();
    let mut out = Vec::new();
    for file in sorted {
        let base = file.header.data_start();
        for t in &file.header.tensors {
            if let Some(first) = owner.insert(&t.name, &file.name) {
                return Err(PlanError::DuplicateTensor {
                    name: t.name.clone(),
                    first_file: first.to_owned(),
                    second_file: file.name.clone(),
                });
            }
            let overflow = || PlanError::OffsetOverflow {
                tensor: t.name.clone(),
                file: file.name.clone(),
            };
            out.push(PlannedTensor {
                name: t.name.clone(),
                source_file: file.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_start: base.checked_add(t.data_offsets.0).ok_or_else(overflow)?,
                data_end: base.checked_add(t.data_offsets.1).ok_or_else(overflow)?,
                scales: None,
                packed: None,
            });
        }
    }
    attach_fp8_scales(out)
}

/// Moves each FP8 weight's scale tensor (`<weight>_scale_inv` or `<weight>_scale`, a float
/// tensor) into the weight (see the module docs); other tensors are left as they are.
fn attach_fp8_scales(tensors: Vec<PlannedTensor>) -> Result<Vec<PlannedTensor>, PlanError> {
    let index: HashMap<&str, usize> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut pairs: Vec<(usize, usize)> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        if t.dtype != DType::F8_E4M3 || t.shape.len() != 2 {
            continue;
        }
        let found = SCALE_SUFFIXES
            .iter()
            .filter_map(|suffix| index.get(format!("{}{suffix}", t.name).as_str()))
            .find(|&&j| tensors[j].dtype.is_decodable_float());
        if let Some(&j) = found {
            pairs.push((i, j));
        }
    }
    let mut scales: HashMap<usize, BlockScales> = HashMap::new();
    for &(i, j) in &pairs {
        let (weight, s) = (&tensors[i], &tensors[j]);
        let block =
            scale_block(&weight.shape, &s.shape).map_err(|reason| PlanError::BadScales {
                weight: weight.name.clone(),
                scales: s.name.clone(),
                reason,
            })?;
        let grid = vec![
            weight.shape[0].div_ceil(block[0]),
            weight.shape[1].div_ceil(block[1]),
        ];
        scales.insert(i, side(s, grid, block));
    }
    let consumed: std::collections::HashSet<usize> = pairs.iter().map(|p| p.1).collect();
    Ok(tensors
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !consumed.contains(i))
        .map(|(i, mut t)| {
            if let Some(s) = scales.remove(&i) {
                t.dtype = DType::BF16;
                t.scales = Some(s);
            }
            t
        })
        .collect())
}

/// The tensor's place as a side tensor of a decoded weight.
fn side(t: &PlannedTensor, shape: Vec<u64>, block: [u64; 2]) -> BlockScales {
    BlockScales {
        name: t.name.clone(),
        source_file: t.source_file.clone(),
        dtype: t.dtype,
        shape,
        data_start: t.data_start,
        data_end: t.data_end,
        block,
    }
}

/// Turns each compressed-tensors packed weight (`M.weight_packed` with `M.weight_scale`,
/// `M.weight_shape` and, if asymmetric, `M.weight_zero_point`) into the tensor `M.weight`
/// it decodes to (see the module docs); other tensors are left as they are.
fn attach_packed(
    tensors: Vec<PlannedTensor>,
    weight_shapes: &HashMap<String, [u64; 2]>,
) -> Result<Vec<PlannedTensor>, PlanError> {
    let index: HashMap<String, usize> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let mut consumed = std::collections::HashSet::new();
    let mut decoded: HashMap<usize, PlannedTensor> = HashMap::new();
    for (i, t) in tensors.iter().enumerate() {
        let Some(module) = t.name.strip_suffix(".weight_packed") else {
            continue;
        };
        let bad = |reason: String| PlanError::BadPacked {
            weight: t.name.clone(),
            reason,
        };
        let find = |suffix: &str| {
            index
                .get(&format!("{module}.{suffix}"))
                .map(|&j| (j, &tensors[j]))
        };
        let (Some((si, scale)), Some((hi, shape_t))) = (find("weight_scale"), find("weight_shape"))
        else {
            return Err(bad("needs its weight_scale and weight_shape tensors".into()));
        };
        let [rows, cols] = *weight_shapes
            .get(&shape_t.name)
            .ok_or_else(|| bad(format!("{} was not read", shape_t.name)))?;
        let (packed_rows, words) = match t.shape.as_slice() {
            [r, w] if t.dtype == DType::I32 => (*r, *w),
            _ => {
                return Err(bad(format!(
                    "{} {:?} is not a 2-D I32 tensor",
                    t.dtype.as_safetensors(),
                    t.shape
                )))
            }
        };
        let bits = match (cols.div_ceil(8) == words, cols.div_ceil(4) == words) {
            (true, false) => 4u8,
            (false, true) => 8,
            _ => {
                return Err(bad(format!(
                    "{words} words per row do not hold {cols} 4- or 8-bit codes"
                )))
            }
        };
        let groups = match scale.shape.as_slice() {
            [r, g] if *r == rows && scale.dtype.is_decodable_float() && *g > 0 => *g,
            _ => {
                return Err(bad(format!(
                    "weight_scale {:?} is not [{rows}, groups] floats",
                    scale.shape
                )))
            }
        };
        let group = if groups == 1 {
            cols.max(1)
        } else {
            cols / groups
        };
        if packed_rows != rows || group == 0 || group * groups != cols {
            return Err(bad(format!("{rows}x{cols} with {groups} scale groups per row and {packed_rows} packed rows do not agree")));
        }
        let pf = 32 / u64::from(bits);
        let zero_points = match find("weight_zero_point") {
            None => None,
            Some((zi, z)) => {
                if z.dtype != DType::I32 || z.shape != [rows.div_ceil(pf), groups] {
                    return Err(bad(format!(
                        "weight_zero_point {:?} is not [{}, {groups}] I32",
                        z.shape,
                        rows.div_ceil(pf)
                    )));
                }
                consumed.insert(zi);
                Some(side(z, z.shape.clone(), [pf, group]))
            }
        };
        consumed.extend([si, hi]);
        decoded.insert(
            i,
            PlannedTensor {
                name: format!("{module}.weight"),
                dtype: scale.dtype,
                shape: vec![rows, cols],
                packed: Some(PackedInts {
                    bits,
                    scales: side(scale, vec![rows, groups], [1, group]),
                    zero_points,
                }),
                ..t.clone()
            },
        );
    }
    Ok(tensors
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !consumed.contains(i))
        .map(|(i, t)| decoded.remove(&i).unwrap_or(t))
        .collect())
}

/// The block `[rows, cols]` a scale tensor of shape `scale` covers in a weight of shape
/// `weight` (`[rows, cols]`): one scale per tensor (`[]`, `[1]`, `[1, 1]`), per row
/// (`[rows]`, `[rows, 1]`), or a grid of `[ceil(rows/b), ceil(cols/b)]` square blocks, `b`
/// being [`FP8_BLOCK`] when it fits and otherwise an edge the grid implies.
fn scale_block(weight: &[u64], scale: &[u64]) -> Result<[u64; 2], String> {
    let (rows, cols) = (weight[0], weight[1]);
    let elems: u64 = scale.iter().product();
    if elems == 1 {
        return Ok([rows.max(1), cols.max(1)]);
    }
    let grid = match scale {
        [r] | [r, 1] if *r == rows => return Ok([1, cols.max(1)]),
        [r, c] if *r > 0 && *c > 0 => [*r, *c],
        _ => {
            return Err(format!(
                "scale shape {scale:?} is not a per-tensor, per-row or 2-D block grid"
            ))
        }
    };
    let fits = |b: u64| b > 0 && rows.div_ceil(b) == grid[0] && cols.div_ceil(b) == grid[1];
    let candidates = [FP8_BLOCK, rows.div_ceil(grid[0]), cols.div_ceil(grid[1])];
    if let Some(&b) = candidates.iter().find(|&&b| fits(b)) {
        return Ok([b, b]);
    }
    Err(format!(
        "a {rows}x{cols} weight has no square block size giving a {}x{} grid",
        grid[0], grid[1]
    ))
}

/// Greedy packing in the given order; an over-budget tensor is alone in its chunk.
fn pack(tensors: Vec<PlannedTensor>, budget: u64) -> Vec<Vec<PlannedTensor>> {
    let mut chunks = Vec::new();
    let mut current: Vec<PlannedTensor> = Vec::new();
    let mut bytes = 0u64;
    for t in tensors {
        let size = t.byte_len();
        let fits = bytes.checked_add(size).is_some_and(|b| b <= budget);
        if !fits && !current.is_empty() {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes = bytes.saturating_add(size);
        current.push(t);
        if size > budget {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests;
