//! The safetensors header: parsing and validating it (it is hostile input) and writing it.
//!
//! A safetensors file is an 8-byte little-endian length `n`, `n` bytes of JSON describing
//! each tensor (`dtype`, `shape`, `data_offsets` relative to the data section), then the data.
//!
//! Every file the reference loader (huggingface `safetensors/src/tensor.rs`,
//! `SafeTensors::read_metadata` and `Metadata::validate`, which Python's `safetensors` runs)
//! rejects is rejected here too: `n <= 100_000_000` and `8 + n <= file size`; the JSON is UTF-8
//! (leading and trailing JSON whitespace allowed, so no `{`-first rule, as in the reference);
//! sorted by offsets, the tensors' data is contiguous from offset 0 with no gap or overlap
//! (zero-size tensors included), each tensor spans exactly `shape * dtype` bytes, and the last
//! one ends exactly at the end of the file. Every size is checked with checked arithmetic
//! before anything is allocated or indexed, and each failure is its own [`HeaderError`]
//! variant naming the tensor and the rule it broke.
//!
//! Deliberately stricter than the reference, which silently accepts these: duplicate JSON keys
//! at any depth (see the private `json` module; the reference keeps the last one), unknown
//! fields in a tensor entry, `"__metadata__": null`, and dtypes this crate does not model
//! (`F4`, `F6_*`, `F8_E8M0`, `C64`).

mod json;

use crate::dtype::DType;
use json::Json;
use std::collections::{BTreeMap, HashSet};

/// Largest JSON header we accept: the reference's `MAX_HEADER_SIZE` (decimal, not 100 MiB).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The reserved top-level key holding string metadata.
const METADATA_KEY: &str = "__metadata__";

/// One tensor entry of a header.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// `[begin, end)` relative to the start of the data section.
    pub data_offsets: (u64, u64),
}

impl TensorInfo {
    /// Product of the shape (1 for a scalar); saturates at `u64::MAX` for unvalidated shapes.
    pub fn num_elements(&self) -> u64 {
        self.shape
            .iter()
            .fold(1u64, |acc, d| acc.saturating_mul(*d))
    }

    /// Length of the data range in bytes (0 if the offsets are reversed).
    pub fn byte_len(&self) -> u64 {
        self.data_offsets.1.saturating_sub(self.data_offsets.0)
    }
}

/// A validated header.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetensorsHeader {
    /// `n`, the JSON length in bytes.
    pub header_len: u64,
    /// Sorted by `data_offsets.0` (then by name).
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

impl SafetensorsHeader {
    /// Absolute file offset of the data section: `8 + header_len`.
    pub fn data_start(&self) -> u64 {
        self.header_len.saturating_add(8)
    }

    /// Looks a tensor up by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Why a header was rejected (or could not be written).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HeaderError {
    #[error("file too short: {needed} bytes needed, file has {file_size}")]
    FileTooShort { needed: u64, file_size: u64 },
    #[error("header length {len} exceeds the maximum {max}")]
    HeaderTooLarge { len: u64, max: u64 },
    #[error("header length is zero")]
    EmptyHeader,
    #[error("header is not valid UTF-8 (first invalid byte at {valid_up_to})")]
    InvalidUtf8 { valid_up_to: u64 },
    #[error("header is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("header JSON is {found}, expected an object")]
    NotAnObject { found: &'static str },
    #[error("tensor {tensor:?} appears more than once")]
    DuplicateTensor { tensor: String },
    #[error("__metadata__ is invalid: {reason}")]
    InvalidMetadata { reason: String },
    #[error("tensor {tensor:?} has an invalid entry: {reason}")]
    InvalidEntry { tensor: String, reason: String },
    #[error("tensor {tensor:?} has unknown dtype {dtype:?}")]
    UnknownDtype { tensor: String, dtype: String },
    #[error("tensor {tensor:?}: shape size overflows u64")]
    ShapeOverflow { tensor: String },
    #[error("tensor {tensor:?}: shape needs {expected_bytes} bytes but data_offsets span {actual_bytes}")]
    ShapeMismatch {
        tensor: String,
        expected_bytes: u64,
        actual_bytes: u64,
    },
    #[error("tensor {tensor:?}: data ends at {end}, beyond the {data_len}-byte data section")]
    OffsetsOutOfBounds {
        tensor: String,
        end: u64,
        data_len: u64,
    },
    #[error("tensors {first:?} and {second:?} overlap")]
    Overlap { first: String, second: String },
    #[error(
        "tensor {tensor:?}: data begins at {begin}, leaving a gap after offset {expected} \
         (tensor data must be contiguous from offset 0)"
    )]
    Gap {
        tensor: String,
        begin: u64,
        expected: u64,
    },
    #[error(
        "tensor data ends at {covered}{}, but the data section has {data_len} bytes \
         (the last tensor must end at the end of the file)",
        after_tensor(.last)
    )]
    DataNotCovered {
        /// The last tensor (by offset), if any.
        last: Option<String>,
        covered: u64,
        data_len: u64,
    },
}

fn after_tensor(last: &Option<String>) -> String {
    match last {
        Some(name) => format!(" (end of tensor {name:?})"),
        None => " (no tensors)".to_owned(),
    }
}

/// Reads the 8-byte little-endian prefix; checks `0 < n <= MAX_HEADER_BYTES` and `8 + n <= file_size`.
pub fn header_len_from_prefix(prefix: &[u8], file_size: u64) -> Result<u64, HeaderError> {
    let Some(first8) = prefix.get(..8) else {
        return Err(HeaderError::FileTooShort {
            needed: 8,
            file_size: prefix.len() as u64,
        });
    };
    let mut raw = [0u8; 8];
    raw.copy_from_slice(first8);
    let n = u64::from_le_bytes(raw);
    check_header_len(n, file_size)?;
    Ok(n)
}

fn check_header_len(n: u64, file_size: u64) -> Result<(), HeaderError> {
    if n > MAX_HEADER_BYTES {
        return Err(HeaderError::HeaderTooLarge {
            len: n,
            max: MAX_HEADER_BYTES,
        });
    }
    if n == 0 {
        return Err(HeaderError::EmptyHeader);
    }
    // n <= MAX_HEADER_BYTES, so this cannot overflow.
    let needed = n + 8;
    if needed > file_size {
        return Err(HeaderError::FileTooShort { needed, file_size });
    }
    Ok(())
}

/// Parses and validates the JSON header; `file_size` is the whole file's size.
pub fn parse_header(json: &[u8], file_size: u64) -> Result<SafetensorsHeader, HeaderError> {
    let header_len = json.len() as u64;
    check_header_len(header_len, file_size)?;
    let data_len = file_size - 8 - header_len;
    std::str::from_utf8(json).map_err(|e| HeaderError::InvalidUtf8 {
        valid_up_to: e.valid_up_to() as u64,
    })?;
    let root = json::parse(json).map_err(|e| HeaderError::InvalidJson(e.to_string()))?;
    let Json::Obj(entries) = root else {
        return Err(HeaderError::NotAnObject { found: root.kind() });
    };
    let mut seen = HashSet::with_capacity(entries.len());
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if !seen.insert(name.clone()) {
            return Err(HeaderError::DuplicateTensor { tensor: name });
        }
        if name == METADATA_KEY {
            metadata = parse_metadata(value)?;
        } else {
            tensors.push(parse_tensor(name, value, data_len)?);
        }
    }
    tensors.sort_by(|a, b| (a.data_offsets, &a.name).cmp(&(b.data_offsets, &b.name)));
    let covered = check_contiguous(&tensors)?;
    if covered != data_len {
        return Err(HeaderError::DataNotCovered {
            last: tensors.last().map(|t| t.name.clone()),
            covered,
            data_len,
        });
    }
    Ok(SafetensorsHeader {
        header_len,
        tensors,
        metadata,
    })
}

fn parse_metadata(value: Json) -> Result<BTreeMap<String, String>, HeaderError> {
    let invalid = |reason: String| HeaderError::InvalidMetadata { reason };
    let Json::Obj(entries) = value else {
        return Err(invalid(format!(
            "expected an object, found {}",
            value.kind()
        )));
    };
    let mut out = BTreeMap::new();
    for (k, v) in entries {
        let Json::Str(s) = v else {
            return Err(invalid(format!(
                "value of {k:?} is {}, expected a string",
                v.kind()
            )));
        };
        if out.insert(k.clone(), s).is_some() {
            return Err(invalid(format!("duplicate key {k:?}")));
        }
    }
    Ok(out)
}

/// The three fields of a tensor entry, each present exactly once.
#[derive(Default)]
struct RawTensor {
    dtype: Option<Json>,
    shape: Option<Json>,
    data_offsets: Option<Json>,
}

fn collect_fields(tensor: &str, value: Json) -> Result<RawTensor, HeaderError> {
    let invalid = |reason: String| HeaderError::InvalidEntry {
        tensor: tensor.to_owned(),
        reason,
    };
    let Json::Obj(entries) = value else {
        return Err(invalid(format!(
            "expected an object, found {}",
            value.kind()
        )));
    };
    let mut raw = RawTensor::default();
    for (k, v) in entries {
        let slot = match k.as_str() {
            "dtype" => &mut raw.dtype,
            "shape" => &mut raw.shape,
            "data_offsets" => &mut raw.data_offsets,
            _ => return Err(invalid(format!("unknown field {k:?}"))),
        };
        if slot.replace(v).is_some() {
            return Err(invalid(format!("duplicate field {k:?}")));
        }
    }
    Ok(raw)
}

fn uint_array(tensor: &str, field: &str, value: Option<Json>) -> Result<Vec<u64>, HeaderError> {
    let invalid = |reason: String| HeaderError::InvalidEntry {
        tensor: tensor.to_owned(),
        reason,
    };
    let Some(value) = value else {
        return Err(invalid(format!("missing field {field:?}")));
    };
    let Json::Arr(items) = value else {
        return Err(invalid(format!(
            "{field} is {}, expected an array",
            value.kind()
        )));
    };
    items
        .into_iter()
        .map(|item| match item {
            Json::UInt(u) => Ok(u),
            other => Err(invalid(format!(
                "{field} holds {}, expected non-negative integers",
                other.kind()
            ))),
        })
        .collect()
}

fn parse_dtype(tensor: &str, value: Option<Json>) -> Result<DType, HeaderError> {
    let s = match value {
        Some(Json::Str(s)) => s,
        Some(other) => {
            return Err(HeaderError::InvalidEntry {
                tensor: tensor.to_owned(),
                reason: format!("dtype is {}, expected a string", other.kind()),
            })
        }
        None => {
            return Err(HeaderError::InvalidEntry {
                tensor: tensor.to_owned(),
                reason: "missing field \"dtype\"".to_owned(),
            })
        }
    };
    DType::from_safetensors(&s).ok_or_else(|| HeaderError::UnknownDtype {
        tensor: tensor.to_owned(),
        dtype: s,
    })
}

/// Bytes needed by `shape` of `dtype`, or `None` on u64 overflow.
fn checked_byte_size(shape: &[u64], dtype: DType) -> Option<u64> {
    shape
        .iter()
        .try_fold(1u64, |acc, d| acc.checked_mul(*d))?
        .checked_mul(dtype.size_bytes() as u64)
}

fn parse_tensor(name: String, value: Json, data_len: u64) -> Result<TensorInfo, HeaderError> {
    let raw = collect_fields(&name, value)?;
    let dtype = parse_dtype(&name, raw.dtype)?;
    let shape = uint_array(&name, "shape", raw.shape)?;
    let offsets = uint_array(&name, "data_offsets", raw.data_offsets)?;
    let &[begin, end] = offsets.as_slice() else {
        return Err(HeaderError::InvalidEntry {
            tensor: name,
            reason: format!("data_offsets has {} items, expected 2", offsets.len()),
        });
    };
    if begin > end {
        return Err(HeaderError::InvalidEntry {
            tensor: name,
            reason: format!("data_offsets begin {begin} is after end {end}"),
        });
    }
    let Some(expected_bytes) = checked_byte_size(&shape, dtype) else {
        return Err(HeaderError::ShapeOverflow { tensor: name });
    };
    let actual_bytes = end - begin;
    if expected_bytes != actual_bytes {
        return Err(HeaderError::ShapeMismatch {
            tensor: name,
            expected_bytes,
            actual_bytes,
        });
    }
    if end > data_len {
        return Err(HeaderError::OffsetsOutOfBounds {
            tensor: name,
            end,
            data_len,
        });
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        data_offsets: (begin, end),
    })
}

/// `tensors` is sorted by offsets. Like the reference's `InvalidOffset` rule, each tensor,
/// zero-size ones included, must begin exactly where the previous one ends and the first at 0;
/// returns where the last one ends (0 without tensors).
fn check_contiguous(tensors: &[TensorInfo]) -> Result<u64, HeaderError> {
    let mut cursor = 0u64;
    let mut prev: Option<&TensorInfo> = None;
    for t in tensors {
        let begin = t.data_offsets.0;
        if begin > cursor {
            return Err(HeaderError::Gap {
                tensor: t.name.clone(),
                begin,
                expected: cursor,
            });
        }
        if let (true, Some(p)) = (begin < cursor, prev) {
            return Err(HeaderError::Overlap {
                first: p.name.clone(),
                second: t.name.clone(),
            });
        }
        cursor = t.data_offsets.1;
        prev = Some(t);
    }
    Ok(cursor)
}

/// The file prefix bytes (length + padded JSON) and each tensor's data offsets.
pub type EncodedHeader = (Vec<u8>, Vec<(u64, u64)>);

/// Builds a header prefix (8-byte LE length + space-padded JSON, total a multiple of 8) for
/// tensors laid out contiguously in the given order, and returns each tensor's data offsets.
/// Key order is deterministic: `__metadata__` first (if non-empty), then tensors as given.
pub fn encode_header(
    tensors: &[(String, DType, Vec<u64>)],
    metadata: &BTreeMap<String, String>,
) -> Result<EncodedHeader, HeaderError> {
    let mut json = String::from("{");
    let mut first = true;
    if !metadata.is_empty() {
        json.push_str(&quote(METADATA_KEY));
        json.push_str(":{");
        let items: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("{}:{}", quote(k), quote(v)))
            .collect();
        json.push_str(&items.join(","));
        json.push('}');
        first = false;
    }
    let offsets = layout(tensors)?;
    for ((name, dtype, shape), (begin, end)) in tensors.iter().zip(&offsets) {
        if !first {
            json.push(',');
        }
        first = false;
        let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
        json.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{begin},{end}]}}",
            quote(name),
            dtype.as_safetensors(),
            dims.join(",")
        ));
    }
    json.push('}');
    while (json.len() + 8) % 8 != 0 {
        json.push(' ');
    }
    let len = json.len() as u64;
    if len > MAX_HEADER_BYTES {
        return Err(HeaderError::HeaderTooLarge {
            len,
            max: MAX_HEADER_BYTES,
        });
    }
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    Ok((out, offsets))
}

/// Contiguous data offsets for `tensors`, rejecting duplicates, the reserved name and overflow.
fn layout(tensors: &[(String, DType, Vec<u64>)]) -> Result<Vec<(u64, u64)>, HeaderError> {
    let mut seen = HashSet::with_capacity(tensors.len());
    let mut cursor = 0u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    for (name, dtype, shape) in tensors {
        if name == METADATA_KEY {
            return Err(HeaderError::InvalidEntry {
                tensor: name.clone(),
                reason: "reserved name".to_owned(),
            });
        }
        if !seen.insert(name.as_str()) {
            return Err(HeaderError::DuplicateTensor {
                tensor: name.clone(),
            });
        }
        let overflow = || HeaderError::ShapeOverflow {
            tensor: name.clone(),
        };
        let size = checked_byte_size(shape, *dtype).ok_or_else(overflow)?;
        let end = cursor.checked_add(size).ok_or_else(overflow)?;
        offsets.push((cursor, end));
        cursor = end;
    }
    Ok(offsets)
}

fn quote(s: &str) -> String {
    // Serializing a &str cannot fail.
    serde_json::to_string(s).unwrap_or_default()
}

#[cfg(test)]
mod tests;
