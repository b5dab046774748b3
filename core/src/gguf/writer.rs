//! The GGUF v3 file layout as pure functions: [`layout`] builds a complete header and places
//! every tensor, [`parse_header`] reads a header back.
//!
//! A GGUF file is, all integers little-endian:
//!
//! ```text
//! "GGUF"  u32 version (3)  u64 tensor_count  u64 metadata_kv_count
//! metadata_kv_count x { string key, u32 value_type, value }
//! tensor_count x { string name, u32 n_dims, u64 dims[n_dims] (innermost first),
//!                  u32 ggml_type, u64 offset (from the data section start, aligned) }
//! zero padding to a multiple of `alignment`            <- data section starts here
//! each tensor's bytes, followed by zero padding to a multiple of `alignment`
//! ```
//!
//! where a string is `u64 len, len UTF-8 bytes` and an array value is
//! `u32 element_type, u64 count, elements`. The alignment is the metadata key
//! `general.alignment` (u32), 32 when absent. Each tensor's padding is part of the file, the
//! last one's included (llama.cpp reads the data section as the sum of padded sizes), so the
//! file is exactly `header ++ for each tensor (bytes ++ zeros up to padded_len)`.
//!
//! [`layout`] needs only names, shapes and types, so a distributed job lays the whole file out
//! before any tensor is quantized, and each worker then writes its tensors' byte ranges on its
//! own. It validates what llama.cpp's loader checks: unique keys and tensor names, names
//! shorter than 64 bytes, 1 to 4 dimensions, whole blocks per row, sizes that fit in `i64`.

use super::quants::GgmlType;
use super::GgufError;
use std::collections::HashSet;
use std::ops::Range;

/// The file magic.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The version [`layout`] writes.
pub const GGUF_VERSION: u32 = 3;
/// The alignment GGUF uses when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key holding the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Longest tensor name in bytes (ggml's `GGML_MAX_NAME` is 64 including the NUL).
pub const MAX_NAME_LEN: usize = 63;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

// GGUF metadata value type ids (`enum gguf_type`).
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(MetaArray),
}

/// A metadata array: all elements of one type (arrays of arrays are not supported).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
}

impl MetaValue {
    /// The GGUF value type id (`GGUFValueType`).
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => T_U8,
            MetaValue::I8(_) => T_I8,
            MetaValue::U16(_) => T_U16,
            MetaValue::I16(_) => T_I16,
            MetaValue::U32(_) => T_U32,
            MetaValue::I32(_) => T_I32,
            MetaValue::U64(_) => T_U64,
            MetaValue::I64(_) => T_I64,
            MetaValue::F32(_) => T_F32,
            MetaValue::F64(_) => T_F64,
            MetaValue::Bool(_) => T_BOOL,
            MetaValue::String(_) => T_STRING,
            MetaValue::Array(_) => T_ARRAY,
        }
    }

    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    fn write(&self, buf: &mut Vec<u8>) {
        match self {
            MetaValue::U8(v) => buf.push(*v),
            MetaValue::I8(v) => buf.extend_from_slice(&v.to_le_bytes()),
            MetaValue::U16(v) => buf.extend_from_slice(&v.to_le_bytes()),
            MetaValue::I16(v) => buf.extend_from_slice(&v.to_le_bytes()),
            MetaValue::U32(v) => buf.extend_from_slice(&v.to_le_bytes()),
            MetaValue::I32(v) => buf.extend_from_slice(&v.to_le_bytes()),
            MetaValue::U64(v) => buf.extend_from_slice(&v.to_le_bytes()),
            MetaValue::I64(v) => buf.extend_from_slice(&v.to_le_bytes()),
            MetaValue::F32(v) => buf.extend_from_slice(&v.to_le_bytes()),
            MetaValue::F64(v) => buf.extend_from_slice(&v.to_le_bytes()),
            MetaValue::Bool(v) => buf.push(u8::from(*v)),
            MetaValue::String(s) => put_str(buf, s),
            MetaValue::Array(a) => a.write(buf),
        }
    }
}

impl MetaArray {
    /// The GGUF value type id of the elements.
    pub fn elem_type_id(&self) -> u32 {
        match self {
            MetaArray::U8(_) => T_U8,
            MetaArray::I8(_) => T_I8,
            MetaArray::U16(_) => T_U16,
            MetaArray::I16(_) => T_I16,
            MetaArray::U32(_) => T_U32,
            MetaArray::I32(_) => T_I32,
            MetaArray::U64(_) => T_U64,
            MetaArray::I64(_) => T_I64,
            MetaArray::F32(_) => T_F32,
            MetaArray::F64(_) => T_F64,
            MetaArray::Bool(_) => T_BOOL,
            MetaArray::String(_) => T_STRING,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::F64(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
        }
    }

    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write(&self, buf: &mut Vec<u8>) {
        put_u32(buf, self.elem_type_id());
        put_u64(buf, self.len() as u64);
        fn each<T: Copy, const N: usize>(buf: &mut Vec<u8>, v: &[T], f: fn(T) -> [u8; N]) {
            for &x in v {
                buf.extend_from_slice(&f(x));
            }
        }
        match self {
            MetaArray::U8(v) => buf.extend_from_slice(v),
            MetaArray::I8(v) => each(buf, v, i8::to_le_bytes),
            MetaArray::U16(v) => each(buf, v, u16::to_le_bytes),
            MetaArray::I16(v) => each(buf, v, i16::to_le_bytes),
            MetaArray::U32(v) => each(buf, v, u32::to_le_bytes),
            MetaArray::I32(v) => each(buf, v, i32::to_le_bytes),
            MetaArray::U64(v) => each(buf, v, u64::to_le_bytes),
            MetaArray::I64(v) => each(buf, v, i64::to_le_bytes),
            MetaArray::F32(v) => each(buf, v, f32::to_le_bytes),
            MetaArray::F64(v) => each(buf, v, f64::to_le_bytes),
            MetaArray::Bool(v) => buf.extend(v.iter().map(|&b| u8::from(b))),
            MetaArray::String(v) => {
                for s in v {
                    put_str(buf, s);
                }
            }
        }
    }
}

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_u64(buf, s.len() as u64);
    buf.extend_from_slice(s.as_bytes());
}

/// Where one tensor's bytes go in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLayout {
    pub name: String,
    /// Row-major shape (the last dimension is the row).
    pub shape: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section, as stored in the tensor info.
    pub offset: u64,
    /// Absolute file offset of the first byte.
    pub start: u64,
    /// Bytes of tensor data.
    pub len: u64,
    /// Bytes from `start` to the next tensor (or the end of the file): `len` rounded up to the
    /// alignment; the bytes past `len` are zeros.
    pub padded_len: u64,
}

impl TensorLayout {
    /// Absolute byte range of the tensor's data in the file.
    pub fn range(&self) -> Range<u64> {
        self.start..self.start + self.len
    }

    /// Number of values.
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A complete GGUF file layout: the header bytes and where every tensor goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufLayout {
    /// Everything before the data section, padding included (`header.len() == data_start`).
    pub header: Vec<u8>,
    /// Absolute offset of the data section.
    pub data_start: u64,
    pub alignment: u64,
    /// The tensors, in file order (the order given to [`layout`]).
    pub tensors: Vec<TensorLayout>,
    /// Total file size, the padding after the last tensor included.
    pub file_size: u64,
}

impl GgufLayout {
    /// Looks a tensor up by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorLayout> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Rounds `x` up to a multiple of `align` (a power of two).
fn align_up(x: u64, align: u64) -> Result<u64, GgufError> {
    x.checked_add(align - 1)
        .map(|v| v & !(align - 1))
        .ok_or(GgufError::Overflow)
}

fn check_alignment(alignment: u64) -> Result<(), GgufError> {
    if alignment == 0 || !alignment.is_power_of_two() || alignment > u64::from(u32::MAX) {
        return Err(GgufError::BadAlignment(alignment));
    }
    Ok(())
}

/// Bytes of a tensor of `ty` with GGUF dims `ne` (innermost first), checked like llama.cpp.
fn tensor_bytes(name: &str, ne: &[u64], ty: GgmlType) -> Result<u64, GgufError> {
    let bad = |reason: String| GgufError::BadTensor {
        name: name.to_string(),
        reason,
    };
    if ne.is_empty() || ne.len() > MAX_DIMS {
        return Err(bad(format!(
            "{} dimensions (1 to {MAX_DIMS} allowed)",
            ne.len()
        )));
    }
    let mut elems: u64 = 1;
    for &d in ne {
        elems = elems
            .checked_mul(d)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| bad("element count overflows i64".to_string()))?;
    }
    let row = ty.row_bytes(ne[0]).map_err(|e| bad(e.to_string()))?;
    ne[1..]
        .iter()
        .try_fold(row, |acc, &d| acc.checked_mul(d))
        .ok_or(GgufError::Overflow)
}

/// Lays out a GGUF v3 file: `metadata` in order, then `tensors` (name, row-major shape, type)
/// in order, each at the next multiple of `alignment` in the data section.
///
/// If `alignment` is not [`DEFAULT_ALIGNMENT`] and `metadata` has no `general.alignment`, the
/// key is appended as a u32; if `metadata` has it, it must be `U32(alignment)`.
pub fn layout(
    metadata: &[(String, MetaValue)],
    tensors: &[(String, Vec<u64>, GgmlType)],
    alignment: u64,
) -> Result<GgufLayout, GgufError> {
    check_alignment(alignment)?;

    let mut keys = HashSet::new();
    let mut has_alignment_key = false;
    for (key, value) in metadata {
        if !keys.insert(key.as_str()) {
            return Err(GgufError::DuplicateKey(key.clone()));
        }
        if key == ALIGNMENT_KEY {
            if *value != MetaValue::U32(alignment as u32) {
                return Err(GgufError::AlignmentConflict {
                    expected: alignment,
                    found: format!("{value:?}"),
                });
            }
            has_alignment_key = true;
        }
    }
    let extra_alignment_kv = (!has_alignment_key && alignment != DEFAULT_ALIGNMENT)
        .then(|| (ALIGNMENT_KEY.to_string(), MetaValue::U32(alignment as u32)));

    let mut names = HashSet::new();
    let mut placed = Vec::with_capacity(tensors.len());
    let mut offset: u64 = 0;
    for (name, shape, ty) in tensors {
        if !names.insert(name.as_str()) {
            return Err(GgufError::DuplicateTensor(name.clone()));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(GgufError::BadTensor {
                name: name.clone(),
                reason: format!("name is {} bytes (at most {MAX_NAME_LEN})", name.len()),
            });
        }
        let ne: Vec<u64> = shape.iter().rev().copied().collect();
        let len = tensor_bytes(name, &ne, *ty)?;
        let padded_len = align_up(len, alignment)?;
        placed.push((name, shape, *ty, ne, offset, len, padded_len));
        offset = offset.checked_add(padded_len).ok_or(GgufError::Overflow)?;
    }
    let data_len = offset;

    let mut header = Vec::new();
    header.extend_from_slice(&GGUF_MAGIC);
    put_u32(&mut header, GGUF_VERSION);
    put_u64(&mut header, tensors.len() as u64);
    let n_kv = metadata.len() + usize::from(extra_alignment_kv.is_some());
    put_u64(&mut header, n_kv as u64);
    for (key, value) in metadata.iter().chain(extra_alignment_kv.iter()) {
        put_str(&mut header, key);
        put_u32(&mut header, value.type_id());
        value.write(&mut header);
    }
    for (name, _, ty, ne, offset, _, _) in &placed {
        put_str(&mut header, name);
        put_u32(&mut header, ne.len() as u32);
        for &d in ne {
            put_u64(&mut header, d);
        }
        put_u32(&mut header, ty.id());
        put_u64(&mut header, *offset);
    }
    let data_start = align_up(header.len() as u64, alignment)?;
    header.resize(data_start as usize, 0);

    let file_size = data_start
        .checked_add(data_len)
        .ok_or(GgufError::Overflow)?;
    let tensors = placed
        .into_iter()
        .map(
            |(name, shape, ggml_type, _, offset, len, padded_len)| TensorLayout {
                name: name.clone(),
                shape: shape.clone(),
                ggml_type,
                offset,
                start: data_start + offset,
                len,
                padded_len,
            },
        )
        .collect();
    Ok(GgufLayout {
        header,
        data_start,
        alignment,
        tensors,
        file_size,
    })
}

// ----------------------------------------------------------------------------------------
// Reading.

/// A tensor info read from a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedTensor {
    pub name: String,
    /// Dimensions as GGUF stores them: innermost first.
    pub dims: Vec<u64>,
    /// The raw ggml type id (see [`ParsedTensor::ggml_type`]).
    pub type_id: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl ParsedTensor {
    /// The row-major shape (`dims` reversed).
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }

    /// The ggml type, if this crate supports it.
    pub fn ggml_type(&self) -> Result<GgmlType, GgufError> {
        GgmlType::from_id(self.type_id).ok_or(GgufError::UnknownType(self.type_id))
    }

    /// Bytes of tensor data (an error for types this crate does not know).
    pub fn n_bytes(&self) -> Result<u64, GgufError> {
        tensor_bytes(&self.name, &self.dims, self.ggml_type()?)
    }
}

/// A GGUF header read by [`parse_header`].
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedGguf {
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<ParsedTensor>,
    /// `general.alignment`, or [`DEFAULT_ALIGNMENT`].
    pub alignment: u64,
    /// Absolute offset of the data section (may be past the end of the bytes parsed).
    pub data_start: u64,
}

impl ParsedGguf {
    /// The value of metadata key `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Looks a tensor up by name.
    pub fn tensor(&self, name: &str) -> Option<&ParsedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// A bounds-checked little-endian reader.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], GgufError> {
        let available = self.remaining();
        if n > available as u64 {
            return Err(GgufError::Truncated {
                at: self.pos,
                needed: n,
                available,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        self.array().map(u64::from_le_bytes)
    }

    fn bool(&mut self) -> Result<bool, GgufError> {
        match self.array::<1>()?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(GgufError::Invalid(format!(
                "bool byte {b} at offset {}",
                self.pos - 1
            ))),
        }
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let at = self.pos;
        let len = self.u64()?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| GgufError::Invalid(format!("string at offset {at} is not UTF-8")))
    }

    /// Reads a count of items that take at least `min_size` bytes each, refusing counts the
    /// remaining bytes cannot hold (so a hostile count cannot make us allocate).
    fn count(&mut self, min_size: u64, what: &str) -> Result<usize, GgufError> {
        let at = self.pos;
        let n = self.u64()?;
        let available = self.remaining();
        if n.saturating_mul(min_size) > available as u64 {
            return Err(GgufError::Invalid(format!(
                "{what} count {n} at offset {at} does not fit in the {available} bytes left"
            )));
        }
        Ok(n as usize)
    }

    fn vec<T, const N: usize>(
        &mut self,
        n: usize,
        f: fn([u8; N]) -> T,
    ) -> Result<Vec<T>, GgufError> {
        (0..n).map(|_| self.array::<N>().map(f)).collect()
    }

    fn value(&mut self, ty: u32) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            T_U8 => MetaValue::U8(self.array::<1>()?[0]),
            T_I8 => MetaValue::I8(i8::from_le_bytes(self.array()?)),
            T_U16 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            T_I16 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            T_U32 => MetaValue::U32(self.u32()?),
            T_I32 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            T_U64 => MetaValue::U64(self.u64()?),
            T_I64 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            T_F32 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            T_F64 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            T_BOOL => MetaValue::Bool(self.bool()?),
            T_STRING => MetaValue::String(self.string()?),
            T_ARRAY => MetaValue::Array(self.meta_array()?),
            other => {
                return Err(GgufError::Invalid(format!(
                    "unknown metadata value type {other} at offset {}",
                    self.pos - 4
                )))
            }
        })
    }

    fn meta_array(&mut self) -> Result<MetaArray, GgufError> {
        let elem = self.u32()?;
        let min_size = match elem {
            T_U8 | T_I8 | T_BOOL => 1,
            T_U16 | T_I16 => 2,
            T_U32 | T_I32 | T_F32 => 4,
            T_U64 | T_I64 | T_F64 | T_STRING => 8,
            T_ARRAY => {
                return Err(GgufError::Invalid(
                    "nested metadata arrays are not supported".to_string(),
                ))
            }
            other => {
                return Err(GgufError::Invalid(format!(
                    "unknown metadata array element type {other}"
                )))
            }
        };
        let n = self.count(min_size, "array element")?;
        Ok(match elem {
            T_U8 => MetaArray::U8(self.take(n as u64)?.to_vec()),
            T_I8 => MetaArray::I8(self.vec(n, i8::from_le_bytes)?),
            T_U16 => MetaArray::U16(self.vec(n, u16::from_le_bytes)?),
            T_I16 => MetaArray::I16(self.vec(n, i16::from_le_bytes)?),
            T_U32 => MetaArray::U32(self.vec(n, u32::from_le_bytes)?),
            T_I32 => MetaArray::I32(self.vec(n, i32::from_le_bytes)?),
            T_U64 => MetaArray::U64(self.vec(n, u64::from_le_bytes)?),
            T_I64 => MetaArray::I64(self.vec(n, i64::from_le_bytes)?),
            T_F32 => MetaArray::F32(self.vec(n, f32::from_le_bytes)?),
            T_F64 => MetaArray::F64(self.vec(n, f64::from_le_bytes)?),
            T_BOOL => MetaArray::Bool((0..n).map(|_| self.bool()).collect::<Result<_, _>>()?),
            _ => MetaArray::String((0..n).map(|_| self.string()).collect::<Result<_, _>>()?),
        })
    }
}

/// Parses a GGUF (v2 or v3) header from the start of a file. `bytes` needs to reach only the
/// end of the tensor infos; nothing of the data section is read. Every length and count is
/// checked against the bytes present, keys and tensor names must be unique, tensors must have
/// 1 to 4 dimensions and aligned offsets, and `general.alignment` (if present) must be a u32
/// power of two.
pub fn parse_header(bytes: &[u8]) -> Result<ParsedGguf, GgufError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let magic: [u8; 4] = r.array()?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = r.u32()?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = r.u64()?;
    // Smallest KV: an empty key (8), a type (4) and a one-byte value.
    let n_kv = r.count(13, "metadata")?;

    let mut metadata = Vec::with_capacity(n_kv);
    let mut keys = HashSet::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        let value = r.value(ty)?;
        if !keys.insert(key.clone()) {
            return Err(GgufError::DuplicateKey(key));
        }
        if key == ALIGNMENT_KEY {
            alignment = match value {
                MetaValue::U32(a) => u64::from(a),
                ref other => {
                    return Err(GgufError::Invalid(format!(
                        "{ALIGNMENT_KEY} is {other:?}, expected a u32"
                    )))
                }
            };
            check_alignment(alignment)?;
        }
        metadata.push((key, value));
    }

    // Smallest tensor info: an empty name (8), n_dims (4), one dim (8), type (4), offset (8).
    if n_tensors.saturating_mul(32) > r.remaining() as u64 {
        return Err(GgufError::Invalid(format!(
            "tensor count {n_tensors} does not fit in the {} bytes left",
            r.remaining()
        )));
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::new();
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(GgufError::BadTensor {
                name,
                reason: format!("{n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
            });
        }
        let dims = r.vec(n_dims as usize, u64::from_le_bytes)?;
        let type_id = r.u32()?;
        let offset = r.u64()?;
        if offset % alignment != 0 {
            return Err(GgufError::BadTensor {
                name,
                reason: format!("offset {offset} is not a multiple of the alignment {alignment}"),
            });
        }
        if !names.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor(name));
        }
        tensors.push(ParsedTensor {
            name,
            dims,
            type_id,
            offset,
        });
    }
    let data_start = align_up(r.pos as u64, alignment)?;
    Ok(ParsedGguf {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}
