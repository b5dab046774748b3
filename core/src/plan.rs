//! Planning: splitting a model's tensors into tasks under a byte budget.
//!
//! The plan is a pure, deterministic function of the source headers and the budget (file
//! order does not matter). Tensors are grouped by transformer layer (parsed from names like
//! `model.layers.12.mlp.up_proj.weight`); the unnumbered tensors (embeddings, final norm, LM
//! head) form the "other" group, planned first. Each group is packed greedily in name order
//! into tasks of at most `budget_bytes`; a tensor larger than the budget gets a task of its
//! own and is never split (workers stream it in row chunks). Each task becomes one output
//! file, `model-00001-of-000NN.safetensors`.

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
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Absolute offset of the first data byte in the source file.
    pub data_start: u64,
    /// Absolute offset one past the last data byte.
    pub data_end: u64,
}

impl PlannedTensor {
    /// Data length in bytes.
    pub fn byte_len(&self) -> u64 {
        self.data_end.saturating_sub(self.data_start)
    }
}

/// One unit of work: a set of tensors written to one output file.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlannedTask {
    /// 0-based position in the plan.
    pub index: u32,
    /// `"layer N"` or `"other"`.
    pub group: String,
    /// Sorted by name.
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
    if budget_bytes == 0 {
        return Err(PlanError::InvalidBudget);
    }
    let tensors = gather(files)?;
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
        members.sort_by(|a, b| a.name.cmp(&b.name));
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
            });
        }
    }
    Ok(out)
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
