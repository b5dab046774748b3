//! ggml element types and their block quantizers, ported from llama.cpp's reference code.
//!
//! Each block type packs `block_size()` consecutive values of a row into `type_size()` bytes,
//! laid out exactly like ggml's `block_*` structs (all scales little-endian f16):
//!
//! | type | values | bytes | layout |
//! |------|--------|-------|--------|
//! | Q8_0 | 32  | 34  | `d`, `qs[32]` (i8), value `qs*d` |
//! | Q4_0 | 32  | 18  | `d`, `qs[16]` (value `j` in the low nibble of byte `j`, `j+16` in the high nibble), value `(q-8)*d` |
//! | Q5_0 | 32  | 22  | `d`, `qh[4]` (bit `j`: the fifth bit of value `j`), `qs[16]` as Q4_0, value `(q-16)*d` |
//! | Q5_1 | 32  | 24  | `d`, `m`, `qh[4]`, `qs[16]`, value `q*d + m` |
//! | Q4_K | 256 | 144 | `d`, `dmin`, `scales[12]` (8 six-bit scales and mins), `qs[128]` |
//! | Q5_K | 256 | 176 | `d`, `dmin`, `scales[12]`, `qh[32]` (fifth bits), `qs[128]` |
//! | Q6_K | 256 | 210 | `ql[128]`, `qh[64]`, `scales[16]` (i8), `d` |
//!
//! F32, F16 and BF16 are one value per "block" (little-endian, F16/BF16 rounded to
//! nearest-even by [`crate::dtype`], as ggml's `GGML_FP32_TO_FP16` / `GGML_FP32_TO_BF16` do).
//!
//! The quantizers are faithful ports of `quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`,
//! `quantize_row_q5_0_ref`, `quantize_row_q5_1_ref`,
//! `quantize_row_q4_K_ref` (with `make_qkx2_quants`), `quantize_row_q5_K_ref` and
//! `quantize_row_q6_K_ref` (with `make_qx_quants`) from `ggml/src/ggml-quants.c`, and the
//! dequantizers of the `dequantize_row_*` functions: every f32 operation is the C one, in the
//! C evaluation order (int operands converted to f32 where C converts them), rounding through
//! ggml's `nearest_int` (the `+ 1.5*2^23` bit trick: ties to even) where the C uses it and
//! `roundf` (ties away from zero, [`f32::round`]) where the C uses that, and `d` stored as f16
//! rounded to nearest-even. Rust never fuses `a*b + c` into an FMA, so the bytes equal those of
//! llama.cpp's `ggml-base` as it is built for x86-64 (no FMA available, so no contraction);
//! this was checked on 10^6 values of assorted distributions against the `ggml-quants.c`
//! vendored by llama-cpp-python 0.3.36 (pinned in the tests). A build that contracts
//! multiply-adds (`-march=native`, or GCC on aarch64) evaluates the K-quant scale search with
//! different rounding and may store a different, equally good scale in a few blocks (seen in
//! about 1 block in 16 with gcc 12 `-march=native`; Q4_0 and Q8_0 still matched there). These
//! are the quantizers `llama-quantize` runs when no importance matrix is given.
//!
//! Like ggml, the super-block scale is an f16, so K-quant blocks whose values are all below
//! about `1e-5` may store all-zero scales (Q6_K) or lose precision (f16 subnormals).
//!
//! Inputs are whole rows (their length a multiple of the block size), so blocks never cross a
//! row; each block is independent, and large inputs are split over rayon by blocks, which
//! cannot change the result.

use super::GgufError;
use crate::dtype::{self, DType};
use half::f16;
use rayon::prelude::*;
use std::fmt;

/// Values per Q8_0 block.
pub const QK8_0: usize = 32;
/// Values per Q4_0 block.
pub const QK4_0: usize = 32;
/// Values per Q5_0 and Q5_1 block.
pub const QK5_0: usize = 32;
/// Values per K-quant super-block (Q4_K, Q5_K, Q6_K).
pub const QK_K: usize = 256;
/// Bytes of the packed 6-bit scales and mins of Q4_K and Q5_K.
const K_SCALE_SIZE: usize = 12;
/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below this is all zero.
const GROUP_MAX_EPS: f32 = 1e-15;
/// Values per rayon task (whole blocks), so short inputs stay on the calling thread.
const PAR_MIN_VALUES: usize = 1 << 15;

/// A ggml tensor element type this crate can write, with its ggml type id as discriminant
/// (`enum ggml_type` in `ggml.h`; the ids are what a GGUF tensor info stores).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    BF16 = 30,
}

impl GgmlType {
    /// Every supported type, in id order.
    pub const ALL: [GgmlType; 10] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::BF16,
    ];

    /// The ggml type id (as stored in a GGUF tensor info).
    pub fn id(self) -> u32 {
        self as u32
    }

    /// The type with ggml id `id`, if this crate supports it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Self::ALL.iter().copied().find(|t| t.id() == id)
    }

    /// The type's name as gguf-py and `llama-quantize` spell it (`"Q4_K"`, `"BF16"`).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Parses a type name, ignoring ASCII case (`"q4_k"`, `"Q4_K"`).
    pub fn from_name(name: &str) -> Result<GgmlType, GgufError> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| GgufError::UnknownTypeName(name.to_string()))
    }

    /// The block type a mixed-precision width of `bits` gives a tensor of a `gguf` pass:
    /// 4 -> Q4_K, 5 -> Q5_K, 6 -> Q6_K, 8 -> Q8_0 (no other width has a k-quant here).
    pub fn for_width(bits: u8) -> Option<GgmlType> {
        match bits {
            4 => Some(GgmlType::Q4_K),
            5 => Some(GgmlType::Q5_K),
            6 => Some(GgmlType::Q6_K),
            8 => Some(GgmlType::Q8_0),
            _ => None,
        }
    }

    /// True for the block-quantized types (not F32, F16 or BF16).
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Values per block (1 for the float types).
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 => QK4_0,
            GgmlType::Q5_0 | GgmlType::Q5_1 => QK5_0,
            GgmlType::Q8_0 => QK8_0,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => QK_K,
        }
    }

    /// Bytes per block (`ggml_type_size`).
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + QK4_0 / 2,
            GgmlType::Q5_0 => 2 + 4 + QK5_0 / 2,
            GgmlType::Q5_1 => 2 + 2 + 4 + QK5_0 / 2,
            GgmlType::Q8_0 => 2 + QK8_0,
            GgmlType::Q4_K => 4 + K_SCALE_SIZE + QK_K / 2,
            GgmlType::Q5_K => 4 + K_SCALE_SIZE + QK_K / 8 + QK_K / 2,
            GgmlType::Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }

    /// Bytes of a row of `n` values (`ggml_row_size`); an error unless `n` is a multiple of
    /// the block size, or on overflow.
    pub fn row_bytes(self, n: u64) -> Result<u64, GgufError> {
        let block = self.block_size() as u64;
        if n % block != 0 {
            return Err(GgufError::RaggedRow {
                ty: self,
                row: n,
                block,
            });
        }
        (n / block)
            .checked_mul(self.type_size() as u64)
            .ok_or(GgufError::Overflow)
    }

    /// Quantizes `values` (whole blocks) and appends the blocks to `out`.
    pub fn quantize(self, values: &[f32], out: &mut Vec<u8>) -> Result<(), GgufError> {
        match self {
            GgmlType::F32 => quantize_f32(values, out),
            GgmlType::F16 => quantize_f16(values, out),
            GgmlType::BF16 => quantize_bf16(values, out),
            GgmlType::Q8_0 => quantize_q8_0(values, out),
            GgmlType::Q4_0 => quantize_q4_0(values, out),
            GgmlType::Q5_0 => quantize_q5_0(values, out),
            GgmlType::Q5_1 => quantize_q5_1(values, out),
            GgmlType::Q4_K => quantize_q4_k(values, out),
            GgmlType::Q5_K => quantize_q5_k(values, out),
            GgmlType::Q6_K => quantize_q6_k(values, out),
        }
    }

    /// Dequantizes `bytes` (exactly the blocks of `out.len()` values) into `out`.
    pub fn dequantize(self, bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
        match self {
            GgmlType::F32 => dequantize_f32(bytes, out),
            GgmlType::F16 => dequantize_f16(bytes, out),
            GgmlType::BF16 => dequantize_bf16(bytes, out),
            GgmlType::Q8_0 => dequantize_q8_0(bytes, out),
            GgmlType::Q4_0 => dequantize_q4_0(bytes, out),
            GgmlType::Q5_0 => dequantize_q5_0(bytes, out),
            GgmlType::Q5_1 => dequantize_q5_1(bytes, out),
            GgmlType::Q4_K => dequantize_q4_k(bytes, out),
            GgmlType::Q5_K => dequantize_q5_k(bytes, out),
            GgmlType::Q6_K => dequantize_q6_k(bytes, out),
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ----------------------------------------------------------------------------------------
// Shared plumbing: length checks and the block loop.

/// Checks `len` is whole blocks of `ty`; returns the block count.
fn blocks_of(ty: GgmlType, len: usize) -> Result<usize, GgufError> {
    let block = ty.block_size();
    if len % block != 0 {
        return Err(GgufError::RaggedValues { ty, len, block });
    }
    Ok(len / block)
}

/// Checks `bytes_len` holds exactly the blocks of `values` values of `ty`.
fn check_bytes(ty: GgmlType, values: usize, bytes_len: usize) -> Result<(), GgufError> {
    let want = blocks_of(ty, values)? * ty.type_size();
    if bytes_len != want {
        return Err(GgufError::ByteLength {
            ty,
            values,
            want,
            got: bytes_len,
        });
    }
    Ok(())
}

/// Appends the blocks of `values` to `out`, each written by `block(values, bytes)`.
fn quantize_blocks(
    ty: GgmlType,
    values: &[f32],
    out: &mut Vec<u8>,
    block: fn(&[f32], &mut [u8]),
) -> Result<(), GgufError> {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let n_blocks = blocks_of(ty, values.len())?;
    let start = out.len();
    out.resize(start + n_blocks * ts, 0);
    let dst = &mut out[start..];
    let per_task = (PAR_MIN_VALUES / bs).max(1);
    if n_blocks > per_task {
        dst.par_chunks_mut(per_task * ts)
            .zip(values.par_chunks(per_task * bs))
            .for_each(|(d, v)| {
                for (db, vb) in d.chunks_exact_mut(ts).zip(v.chunks_exact(bs)) {
                    block(vb, db);
                }
            });
    } else {
        for (db, vb) in dst.chunks_exact_mut(ts).zip(values.chunks_exact(bs)) {
            block(vb, db);
        }
    }
    Ok(())
}

/// Dequantizes the blocks in `bytes` into `out`, each by `block(bytes, values)`.
fn dequantize_blocks(
    ty: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
    block: fn(&[u8], &mut [f32]),
) -> Result<(), GgufError> {
    check_bytes(ty, out.len(), bytes.len())?;
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let per_task = (PAR_MIN_VALUES / bs).max(1);
    if out.len() > PAR_MIN_VALUES {
        out.par_chunks_mut(per_task * bs)
            .zip(bytes.par_chunks(per_task * ts))
            .for_each(|(v, d)| {
                for (vb, db) in v.chunks_exact_mut(bs).zip(d.chunks_exact(ts)) {
                    block(db, vb);
                }
            });
    } else {
        for (vb, db) in out.chunks_exact_mut(bs).zip(bytes.chunks_exact(ts)) {
            block(db, vb);
        }
    }
    Ok(())
}

/// Little-endian bytes of `x` rounded to f16 (nearest-even, as `GGML_FP32_TO_FP16`).
#[inline]
fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

/// The f32 value of the little-endian f16 at `b[at..at + 2]` (`GGML_FP16_TO_FP32`).
#[inline]
fn read_f16(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// ggml's `nearest_int`: rounds to nearest, ties to even, by adding `1.5 * 2^23` and reading
/// the mantissa bits (valid for `|x| <= 2^22 - 1`; outside that range it returns the same
/// garbage as the C, bit for bit).
#[inline(always)]
fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

// ----------------------------------------------------------------------------------------
// F32 / F16 / BF16 passthrough.

/// Dtype codec for a float passthrough type, and the byte offset to append at.
fn float_encode(ty: GgmlType, dt: DType, values: &[f32], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + values.len() * ty.type_size(), 0);
    // Lengths match by construction, so the codec cannot fail.
    let _ = dtype::encode_from_f32(dt, values, &mut out[start..]);
}

fn float_decode(ty: GgmlType, dt: DType, bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    check_bytes(ty, out.len(), bytes.len())?;
    let _ = dtype::decode_to_f32(dt, bytes, out);
    Ok(())
}

/// Appends `values` as little-endian f32.
pub fn quantize_f32(values: &[f32], out: &mut Vec<u8>) -> Result<(), GgufError> {
    float_encode(GgmlType::F32, DType::F32, values, out);
    Ok(())
}

/// Appends `values` as little-endian f16 (round to nearest-even).
pub fn quantize_f16(values: &[f32], out: &mut Vec<u8>) -> Result<(), GgufError> {
    float_encode(GgmlType::F16, DType::F16, values, out);
    Ok(())
}

/// Appends `values` as little-endian bf16 (round to nearest-even, NaN kept quiet).
pub fn quantize_bf16(values: &[f32], out: &mut Vec<u8>) -> Result<(), GgufError> {
    float_encode(GgmlType::BF16, DType::BF16, values, out);
    Ok(())
}

/// Decodes little-endian f32 `bytes` into `out`.
pub fn dequantize_f32(bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    float_decode(GgmlType::F32, DType::F32, bytes, out)
}

/// Decodes little-endian f16 `bytes` into `out`.
pub fn dequantize_f16(bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    float_decode(GgmlType::F16, DType::F16, bytes, out)
}

/// Decodes little-endian bf16 `bytes` into `out`.
pub fn dequantize_bf16(bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    float_decode(GgmlType::BF16, DType::BF16, bytes, out)
}

// ----------------------------------------------------------------------------------------
// Q8_0 and Q4_0.

/// Appends the Q8_0 blocks of `values` (`quantize_row_q8_0_ref`).
pub fn quantize_q8_0(values: &[f32], out: &mut Vec<u8>) -> Result<(), GgufError> {
    quantize_blocks(GgmlType::Q8_0, values, out, q8_0_block)
}

dtype::avx2_dispatch!(fn q8_0_block(x: &[f32], y: &mut [u8]) => q8_0_block_body);

#[inline(always)]
fn q8_0_block_body(x: &[f32], y: &mut [u8]) {
    let amax = abs_max(x);
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&f16_bytes(d));
    for (q, &v) in y[2..].iter_mut().zip(x) {
        *q = q8_0_code(v * id);
    }
}

/// `(int8_t)roundf(r)` as a byte (halves away from zero), saturating and NaN as 0 like Rust's
/// `as i8`: clamping first (rounding and clamping to integer bounds commute) keeps every
/// step exact and branch-free, so it vectorizes; the dropped fraction `c - trunc(c)` is
/// exact.
#[inline(always)]
fn q8_0_code(r: f32) -> u8 {
    let r = if r.is_nan() { 0.0 } else { r };
    let c = r.clamp(-128.0, 127.0);
    let t = clamp_trunc(c, -128.0, 127.0) as f32;
    let step = if (c - t).abs() >= 0.5 {
        1.0f32.copysign(c)
    } else {
        0.0
    };
    clamp_trunc(t + step, -128.0, 127.0) as i8 as u8
}

/// `v` clamped to `[lo, hi]` (NaN to `lo`) and truncated toward zero. The clamp makes the
/// conversion exact, so it needs no saturation checks and vectorizes; the bounds must lie
/// inside `i32` (callers pass small constants).
#[inline(always)]
fn clamp_trunc(v: f32, lo: f32, hi: f32) -> i32 {
    debug_assert!(lo >= -1e9 && hi <= 1e9 && lo <= hi);
    let c = v.max(lo).min(hi);
    // SAFETY: `max` and `min` with non-NaN bounds return a value in `[lo, hi]` (a NaN `v`
    // becomes `lo`), which is finite and representable in i32.
    unsafe { c.to_int_unchecked::<i32>() }
}

/// `max |x|` over a block (`MAX(amax, fabsf(v))` in any order: the maximum of finite values
/// does not depend on it), in 8 independent lanes so that it vectorizes.
#[inline(always)]
fn abs_max(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            let a = v.abs();
            *l = if *l > a { *l } else { a };
        }
    }
    for &v in rest {
        let a = v.abs();
        lanes[0] = if lanes[0] > a { lanes[0] } else { a };
    }
    lanes.iter().fold(0.0f32, |m, &l| if m > l { m } else { l })
}

/// Decodes Q8_0 `bytes` into `out` (`dequantize_row_q8_0`).
pub fn dequantize_q8_0(bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    dequantize_blocks(GgmlType::Q8_0, bytes, out, |b, y| {
        let d = read_f16(b, 0);
        for (v, &q) in y.iter_mut().zip(&b[2..]) {
            *v = f32::from(q as i8) * d;
        }
    })
}

/// Appends the Q4_0 blocks of `values` (`quantize_row_q4_0_ref`).
pub fn quantize_q4_0(values: &[f32], out: &mut Vec<u8>) -> Result<(), GgufError> {
    quantize_blocks(GgmlType::Q4_0, values, out, q4_0_block)
}

/// The signed value of largest magnitude (the first one on ties), as Q4_0 and Q5_0 find it.
#[inline(always)]
fn signed_absmax(x: &[f32]) -> f32 {
    // The reference keeps the first value whose magnitude beats every earlier one: the first
    // of largest magnitude (0 for an all-zero block).
    let amax = abs_max(x);
    if amax == 0.0 {
        return 0.0;
    }
    if x.len() <= 32 {
        // A bit per value of largest magnitude, without a branch per value.
        let hits = x
            .iter()
            .enumerate()
            .fold(0u32, |m, (i, v)| m | (u32::from(v.abs() == amax) << i));
        return x
            .get(hits.trailing_zeros() as usize)
            .copied()
            .unwrap_or(0.0);
    }
    x.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0)
}

dtype::avx2_dispatch!(fn q4_0_block(x: &[f32], y: &mut [u8]) => q4_0_block_body);

#[inline(always)]
fn q4_0_block_body(x: &[f32], y: &mut [u8]) {
    let d = signed_absmax(x) / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&f16_bytes(d));
    const HALF: usize = QK4_0 / 2;
    let (lo, hi) = x.split_at(HALF);
    for ((q, &a), &b) in y[2..2 + HALF].iter_mut().zip(lo).zip(&hi[..HALF]) {
        // MIN(15, (int8_t)(x + 8.5f)): truncation toward zero, x * id + 8.5 being in
        // [0.5, 16.5] (or NaN or infinite, which the saturating cast maps as the clamp).
        let xi0 = clamp_trunc(a * id + 8.5, 0.0, 15.0) as u8;
        let xi1 = clamp_trunc(b * id + 8.5, 0.0, 15.0) as u8;
        *q = xi0 | (xi1 << 4);
    }
}

/// Decodes Q4_0 `bytes` into `out` (`dequantize_row_q4_0`).
pub fn dequantize_q4_0(bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    dequantize_blocks(GgmlType::Q4_0, bytes, out, |b, y| {
        let d = read_f16(b, 0);
        let half = QK4_0 / 2;
        for j in 0..half {
            let q = b[2 + j];
            y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
            y[j + half] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    })
}

// ----------------------------------------------------------------------------------------
// Q5_0 and Q5_1 (llama-quantize's fallbacks for Q4_K and Q5_K rows that are not whole
// 256-value super-blocks).

/// The 16 low nibbles (value `j` low, `j+16` high) and the 32 fifth bits (`qh` bit `j` for
/// value `j`) of 32 five-bit codes.
fn pack_5bit(codes: &[u8; 32], qh_out: &mut [u8], qs_out: &mut [u8]) {
    let half = 16;
    let mut qh = 0u32;
    for j in 0..half {
        let (xi0, xi1) = (codes[j], codes[half + j]);
        qs_out[j] = (xi0 & 0x0f) | ((xi1 & 0x0f) << 4);
        qh |= u32::from((xi0 & 0x10) >> 4) << j;
        qh |= u32::from((xi1 & 0x10) >> 4) << (j + half);
    }
    qh_out.copy_from_slice(&qh.to_le_bytes());
}

/// The 32 five-bit codes of a block's `qh` and `qs` (`dequantize_row_q5_*`).
fn unpack_5bit(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut codes = [0u8; 32];
    for j in 0..16 {
        let xh_0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh_1 = ((qh >> (j + 12)) & 0x10) as u8;
        codes[j] = (qs[j] & 0x0f) | xh_0;
        codes[j + 16] = (qs[j] >> 4) | xh_1;
    }
    codes
}

/// Appends the Q5_0 blocks of `values` (`quantize_row_q5_0_ref`).
pub fn quantize_q5_0(values: &[f32], out: &mut Vec<u8>) -> Result<(), GgufError> {
    quantize_blocks(GgmlType::Q5_0, values, out, q5_0_block)
}

fn q5_0_block(x: &[f32], y: &mut [u8]) {
    let d = signed_absmax(x) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&f16_bytes(d));
    let mut codes = [0u8; 32];
    for (c, &v) in codes.iter_mut().zip(x) {
        // MIN(31, (int8_t)(x*id + 16.5f)): truncation toward zero.
        *c = ((v * id + 16.5) as i8).min(31) as u8;
    }
    let (qh, qs) = y[2..].split_at_mut(4);
    pack_5bit(&codes, qh, qs);
}

/// Decodes Q5_0 `bytes` into `out` (`dequantize_row_q5_0`).
pub fn dequantize_q5_0(bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    dequantize_blocks(GgmlType::Q5_0, bytes, out, |b, y| {
        let d = read_f16(b, 0);
        for (v, &q) in y.iter_mut().zip(&unpack_5bit(&b[2..6], &b[6..])) {
            *v = (q as i32 - 16) as f32 * d;
        }
    })
}

/// Appends the Q5_1 blocks of `values` (`quantize_row_q5_1_ref`).
pub fn quantize_q5_1(values: &[f32], out: &mut Vec<u8>) -> Result<(), GgufError> {
    quantize_blocks(GgmlType::Q5_1, values, out, q5_1_block)
}

fn q5_1_block(x: &[f32], y: &mut [u8]) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    y[..2].copy_from_slice(&f16_bytes(d));
    y[2..4].copy_from_slice(&f16_bytes(min));
    let mut codes = [0u8; 32];
    for (c, &v) in codes.iter_mut().zip(x) {
        // (uint8_t)((x - min)*id + 0.5f): truncation.
        *c = ((v - min) * id + 0.5) as u8;
    }
    let (qh, qs) = y[4..].split_at_mut(4);
    pack_5bit(&codes, qh, qs);
}

/// Decodes Q5_1 `bytes` into `out` (`dequantize_row_q5_1`).
pub fn dequantize_q5_1(bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    dequantize_blocks(GgmlType::Q5_1, bytes, out, |b, y| {
        let d = read_f16(b, 0);
        let m = read_f16(b, 2);
        for (v, &q) in y.iter_mut().zip(&unpack_5bit(&b[4..8], &b[8..])) {
            *v = f32::from(q) * d + m;
        }
    })
}

// ----------------------------------------------------------------------------------------
// K-quant helpers.

/// ggml's `make_qkx2_quants`: the asymmetric `nmax`-level codes `l[i]` of `x` with weights `w`,
/// searching `nstep + 1` candidate scales; returns `(scale, the_min)` with
/// `x ~= scale * l - the_min` (`the_min >= 0`). The line-by-line port, kept as the reference
/// that [`make_qkx2_quants_x8`] must equal.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(super) fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    l_aux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out[..n].fill(0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let mut diff = scale * l as f32 + min - x[i];
        diff = if use_mad { diff.abs() } else { diff * diff };
        best_error += weights[i] * diff;
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            l_aux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let mut diff = this_scale * l_aux[i] as f32 + this_min - x[i];
                diff = if use_mad { diff.abs() } else { diff * diff };
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&l_aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights (the weights are
/// `x^2`): symmetric codes `l[i] + nmax` in `[0, 2*nmax)`; returns the scale.
#[cfg(test)]
pub(super) fn make_qx_quants_rmse1(nmax: i32, x: &[f32], l_out: &mut [u8]) -> f32 {
    let n = x.len();
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let code = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let iscale = -nmax_f / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..n {
        let l = code(iscale, x[i]);
        l_out[i] = (l + nmax) as u8;
        let w = x[i] * x[i];
        let lf = l as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax_f + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let lf = code(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                l_out[i] = (code(iscale, x[i]) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Sub-blocks fitted at once by the lane-parallel searches below.
pub(super) const LANES: usize = 8;

/// [`make_qkx2_quants`] (with `use_mad` false) on `LANES` sub-blocks of 32 values at once:
/// sub-block `k` is `x[32k..32k + 32]` with weights `weights[i][k]`, and its codes go to
/// `l_out[32k..32k + 32]`. Every lane performs exactly the scalar function's f32 operations in
/// the same order (branches become per-lane selects; a lane whose branch was not taken
/// computes values that are then discarded), so the results are bit-identical; the lanes are
/// what lets the compiler keep eight sub-blocks in one vector register. Returns each lane's
/// `(scale, the_min)`.
#[inline(always)]
pub(super) fn make_qkx2_quants_x8<const AVX2: bool>(
    nmax: i32,
    x: &[f32],
    weights: &[[f32; LANES]; 32],
    l_out: &mut [u8],
    rmin: f32,
    nstep: i32,
) -> ([f32; LANES], [f32; LANES]) {
    const N: usize = 32;
    let rdelta = 0.1f32;
    let mut xt = [[0f32; LANES]; N];
    for k in 0..LANES {
        for i in 0..N {
            xt[i][k] = x[N * k + i];
        }
    }
    let mut min = xt[0];
    let mut max = xt[0];
    let mut sum_w = weights[0];
    let mut sum_x = mul::<AVX2>(sum_w, xt[0]);
    for i in 1..N {
        let v = xt[i];
        for k in 0..LANES {
            min[k] = if v[k] < min[k] { v[k] } else { min[k] };
            max[k] = if v[k] > max[k] { v[k] } else { max[k] };
        }
        sum_w = add::<AVX2>(sum_w, weights[i]);
        sum_x = add::<AVX2>(sum_x, mul::<AVX2>(weights[i], v));
    }
    for m in &mut min {
        *m = if *m > 0.0 { 0.0 } else { *m };
    }
    let flat_min = min;
    let nmax_f = nmax as f32;
    let range = sub::<AVX2>(max, min);
    let mut iscale = [0f32; LANES];
    let mut scale = [0f32; LANES];
    for k in 0..LANES {
        iscale[k] = nmax_f / range[k];
        scale[k] = 1.0 / iscale[k];
    }
    // Codes are kept as f32 (small integers, exact).
    let mut best = [[0f32; LANES]; N];
    let mut best_error = [0f32; LANES];
    for i in 0..N {
        let l = codes::<AVX2>(iscale, sub::<AVX2>(xt[i], min), 0, nmax);
        best[i] = l;
        let diff = sub::<AVX2>(add::<AVX2>(mul::<AVX2>(scale, l), min), xt[i]);
        best_error = add::<AVX2>(best_error, mul::<AVX2>(weights[i], mul::<AVX2>(diff, diff)));
    }
    let mut aux = [[0f32; LANES]; N];
    for is in 0..=nstep {
        let step = rmin + rdelta * is as f32 + nmax_f;
        let range = sub::<AVX2>(max, min);
        for k in 0..LANES {
            iscale[k] = step / range[k];
        }
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
        for i in 0..N {
            let lf = codes::<AVX2>(iscale, sub::<AVX2>(xt[i], min), 0, nmax);
            aux[i] = lf;
            let wl = mul::<AVX2>(weights[i], lf);
            sum_l = add::<AVX2>(sum_l, wl);
            sum_l2 = add::<AVX2>(sum_l2, mul::<AVX2>(wl, lf));
            sum_xl = add::<AVX2>(sum_xl, mul::<AVX2>(wl, xt[i]));
        }
        let det = sub::<AVX2>(mul::<AVX2>(sum_w, sum_l2), mul::<AVX2>(sum_l, sum_l));
        let s = div::<AVX2>(
            sub::<AVX2>(mul::<AVX2>(sum_w, sum_xl), mul::<AVX2>(sum_x, sum_l)),
            det,
        );
        let m = div::<AVX2>(
            sub::<AVX2>(mul::<AVX2>(sum_l2, sum_x), mul::<AVX2>(sum_l, sum_xl)),
            det,
        );
        let fallback = div::<AVX2>(sum_xl, sum_l2);
        let (mut this_scale, mut this_min) = ([0f32; LANES], [0f32; LANES]);
        for k in 0..LANES {
            let positive = m[k] > 0.0;
            this_min[k] = if positive { 0.0 } else { m[k] };
            this_scale[k] = if positive { fallback[k] } else { s[k] };
        }
        let mut cur_error = [0f32; LANES];
        for i in 0..N {
            let diff = sub::<AVX2>(
                add::<AVX2>(mul::<AVX2>(this_scale, aux[i]), this_min),
                xt[i],
            );
            cur_error = add::<AVX2>(cur_error, mul::<AVX2>(weights[i], mul::<AVX2>(diff, diff)));
        }
        let mut better = [false; LANES];
        for k in 0..LANES {
            better[k] = det[k] > 0.0 && cur_error[k] < best_error[k];
            best_error[k] = if better[k] {
                cur_error[k]
            } else {
                best_error[k]
            };
            scale[k] = if better[k] { this_scale[k] } else { scale[k] };
            min[k] = if better[k] { this_min[k] } else { min[k] };
        }
        for i in 0..N {
            for k in 0..LANES {
                best[i][k] = if better[k] { aux[i][k] } else { best[i][k] };
            }
        }
    }
    let mut the_min = [0f32; LANES];
    for k in 0..LANES {
        let flat = max[k] == flat_min[k];
        for i in 0..N {
            l_out[N * k + i] = if flat { 0 } else { best[i][k] as u8 };
        }
        scale[k] = if flat { 0.0 } else { scale[k] };
        the_min[k] = if flat { -flat_min[k] } else { -min[k] };
    }
    (scale, the_min)
}

/// Lane-wise arithmetic for the searches above: with `AVX2` (the copy compiled for CPUs that
/// have it) one 256-bit instruction per operation, otherwise a loop over the lanes; the same
/// IEEE operation per lane either way.
macro_rules! lane_op {
    ($name:ident, $op:tt, $intrinsic:ident) => {
        #[inline(always)]
        fn $name<const AVX2: bool>(a: [f32; LANES], b: [f32; LANES]) -> [f32; LANES] {
            let mut o = [0f32; LANES];
            #[cfg(target_arch = "x86_64")]
            if AVX2 {
                use std::arch::x86_64::*;
                // SAFETY: the AVX2 copy runs only on CPUs with AVX2 (`avx2_dispatch!`); the
                // unaligned loads and store touch exactly the three 8-lane arrays.
                unsafe {
                    let v = $intrinsic(_mm256_loadu_ps(a.as_ptr()), _mm256_loadu_ps(b.as_ptr()));
                    _mm256_storeu_ps(o.as_mut_ptr(), v);
                }
                return o;
            }
            for k in 0..LANES {
                o[k] = a[k] $op b[k];
            }
            o
        }
    };
}
lane_op!(mul, *, _mm256_mul_ps);
lane_op!(add, +, _mm256_add_ps);
lane_op!(sub, -, _mm256_sub_ps);
lane_op!(div, /, _mm256_div_ps);

/// Lane-wise `nearest_int(iscale * v).clamp(lo, hi)` as f32.
#[inline(always)]
fn codes<const AVX2: bool>(
    iscale: [f32; LANES],
    v: [f32; LANES],
    lo: i32,
    hi: i32,
) -> [f32; LANES] {
    let scaled = mul::<AVX2>(iscale, v);
    let mut o = [0f32; LANES];
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        use std::arch::x86_64::*;
        // SAFETY: as in `lane_op!`.
        unsafe {
            let val = _mm256_add_ps(
                _mm256_loadu_ps(scaled.as_ptr()),
                _mm256_set1_ps(12_582_912.0),
            );
            let bits = _mm256_and_si256(_mm256_castps_si256(val), _mm256_set1_epi32(0x007f_ffff));
            let int = _mm256_sub_epi32(bits, _mm256_set1_epi32(0x0040_0000));
            let clamped = _mm256_min_epi32(
                _mm256_max_epi32(int, _mm256_set1_epi32(lo)),
                _mm256_set1_epi32(hi),
            );
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtepi32_ps(clamped));
        }
        return o;
    }
    for k in 0..LANES {
        o[k] = nearest_int(scaled[k]).clamp(lo, hi) as f32;
    }
    o
}

/// [`make_qx_quants_rmse1`] on `LANES` sub-blocks of 16 values at once (sub-block `k` is
/// `x[16k..16k + 16]`, its codes `l_out[16k..16k + 16]`), each lane performing the scalar
/// function's operations in its order (see [`make_qkx2_quants_x8`]). Returns each scale.
#[inline(always)]
pub(super) fn make_qx_quants_rmse1_x8<const AVX2: bool>(
    nmax: i32,
    x: &[f32],
    l_out: &mut [u8],
) -> [f32; LANES] {
    const N: usize = 16;
    let mut xt = [[0f32; LANES]; N];
    for k in 0..LANES {
        for i in 0..N {
            xt[i][k] = x[N * k + i];
        }
    }
    let (mut max, mut amax) = ([0f32; LANES], [0f32; LANES]);
    for row in &xt {
        for k in 0..LANES {
            let ax = row[k].abs();
            let larger = ax > amax[k];
            amax[k] = if larger { ax } else { amax[k] };
            max[k] = if larger { row[k] } else { max[k] };
        }
    }
    let nmax_f = nmax as f32;
    // w * v, per value: the weight times the value, the same in every candidate.
    let mut wx = [[0f32; LANES]; N];
    for i in 0..N {
        wx[i] = mul::<AVX2>(mul::<AVX2>(xt[i], xt[i]), xt[i]);
    }
    let mut iscale = [0f32; LANES];
    for k in 0..LANES {
        iscale[k] = -nmax_f / max[k];
    }
    let mut best_l = [[0f32; LANES]; N];
    let (mut sumlx, mut suml2) = ([0f32; LANES], [0f32; LANES]);
    for i in 0..N {
        let lf = codes::<AVX2>(iscale, xt[i], -nmax, nmax - 1);
        best_l[i] = lf;
        sumlx = add::<AVX2>(sumlx, mul::<AVX2>(wx[i], lf));
        suml2 = add::<AVX2>(
            suml2,
            mul::<AVX2>(mul::<AVX2>(mul::<AVX2>(xt[i], xt[i]), lf), lf),
        );
    }
    let (mut scale, mut best) = ([0f32; LANES], [0f32; LANES]);
    for k in 0..LANES {
        scale[k] = if suml2[k] != 0.0 {
            sumlx[k] / suml2[k]
        } else {
            0.0
        };
        best[k] = scale[k] * sumlx[k];
    }
    let mut aux = [[0f32; LANES]; N];
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        let step = -(nmax_f + 0.1 * is as f32);
        for k in 0..LANES {
            iscale[k] = step / max[k];
        }
        let (mut sumlx, mut suml2) = ([0f32; LANES], [0f32; LANES]);
        for i in 0..N {
            let lf = codes::<AVX2>(iscale, xt[i], -nmax, nmax - 1);
            aux[i] = lf;
            sumlx = add::<AVX2>(sumlx, mul::<AVX2>(wx[i], lf));
            suml2 = add::<AVX2>(
                suml2,
                mul::<AVX2>(mul::<AVX2>(mul::<AVX2>(xt[i], xt[i]), lf), lf),
            );
        }
        let mut better = [false; LANES];
        let ratio = div::<AVX2>(sumlx, suml2);
        for k in 0..LANES {
            better[k] = suml2[k] > 0.0 && sumlx[k] * sumlx[k] > best[k] * suml2[k];
            scale[k] = if better[k] { ratio[k] } else { scale[k] };
            best[k] = if better[k] {
                scale[k] * sumlx[k]
            } else {
                best[k]
            };
        }
        for i in 0..N {
            for k in 0..LANES {
                best_l[i][k] = if better[k] { aux[i][k] } else { best_l[i][k] };
            }
        }
    }
    for k in 0..LANES {
        let flat = amax[k] < GROUP_MAX_EPS;
        for i in 0..N {
            l_out[N * k + i] = if flat {
                0
            } else {
                (best_l[i][k] as i32 + nmax) as u8
            };
        }
        scale[k] = if flat { 0.0 } else { scale[k] };
    }
    scale
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` from the 12 packed bytes.
#[inline]
fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The shared first half of `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`: fits each
/// 32-value sub-block with `make_qkx2_quants`, packs the 6-bit scales and mins into
/// `y[4..16]` and `d`/`dmin` into `y[0..4]`, then requantizes into `l` (codes `0..=nmax`)
/// against the stored scales.
#[inline(always)]
fn k_scales_and_codes<const AVX2: bool>(
    x: &[f32],
    y: &mut [u8],
    l: &mut [u8; QK_K],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) {
    let mut weights = [[0.0f32; LANES]; 32];
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            w[j] = av_x + v.abs();
        }
    }
    let (scales, mins) = make_qkx2_quants_x8::<AVX2>(nmax, x, &weights, &mut l[..], rmin, nstep);
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 32 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }

    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut y[4..4 + K_SCALE_SIZE];
    for j in 0..QK_K / 32 {
        // `uint8_t ls = nearest_int(...)` truncates to 8 bits before the MIN.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    y[0..2].copy_from_slice(&f16_bytes(max_scale / 63.0));
    y[2..4].copy_from_slice(&f16_bytes(max_min / 63.0));

    let d_all = read_f16(y, 0);
    let dmin_all = read_f16(y, 2);
    for j in 0..QK_K / 32 {
        let (sc, m) = get_scale_min_k4(j, &y[4..4 + K_SCALE_SIZE]);
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        for ii in 0..32 {
            let q = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, nmax);
            l[32 * j + ii] = q as u8;
        }
    }
}

// ----------------------------------------------------------------------------------------
// Q4_K.

/// Appends the Q4_K blocks of `values` (`quantize_row_q4_K_ref`).
pub fn quantize_q4_k(values: &[f32], out: &mut Vec<u8>) -> Result<(), GgufError> {
    quantize_blocks(GgmlType::Q4_K, values, out, q4_k_block)
}

dtype::avx2_dispatch!(fn q4_k_block(x: &[f32], y: &mut [u8]) => q4_k_block_body::<AVX2>);

#[inline(always)]
fn q4_k_block_body<const AVX2: bool>(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    k_scales_and_codes::<AVX2>(x, y, &mut l, 15, -1.0, 20);
    let qs = &mut y[4 + K_SCALE_SIZE..];
    for (chunk, q) in l.chunks_exact(64).zip(qs.chunks_exact_mut(32)) {
        for i in 0..32 {
            q[i] = chunk[i] | (chunk[i + 32] << 4);
        }
    }
}

/// Decodes Q4_K `bytes` into `out` (`dequantize_row_q4_K`).
pub fn dequantize_q4_k(bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    dequantize_blocks(GgmlType::Q4_K, bytes, out, |b, y| {
        let d = read_f16(b, 0);
        let min = read_f16(b, 2);
        let scales = &b[4..4 + K_SCALE_SIZE];
        let qs = &b[4 + K_SCALE_SIZE..];
        for (n, (ys, q)) in y.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
            let (sc1, m1) = get_scale_min_k4(2 * n, scales);
            let (sc2, m2) = get_scale_min_k4(2 * n + 1, scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            for i in 0..32 {
                ys[i] = d1 * (q[i] & 0x0f) as f32 - m1;
                ys[i + 32] = d2 * (q[i] >> 4) as f32 - m2;
            }
        }
    })
}

// ----------------------------------------------------------------------------------------
// Q5_K.

/// Appends the Q5_K blocks of `values` (`quantize_row_q5_K_ref`).
pub fn quantize_q5_k(values: &[f32], out: &mut Vec<u8>) -> Result<(), GgufError> {
    quantize_blocks(GgmlType::Q5_K, values, out, q5_k_block)
}

dtype::avx2_dispatch!(fn q5_k_block(x: &[f32], y: &mut [u8]) => q5_k_block_body::<AVX2>);

#[inline(always)]
fn q5_k_block_body<const AVX2: bool>(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    k_scales_and_codes::<AVX2>(x, y, &mut l, 31, -0.5, 15);
    let (qh, ql) = y[4 + K_SCALE_SIZE..].split_at_mut(QK_K / 8);
    qh.fill(0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for (chunk, q) in l.chunks_exact(64).zip(ql.chunks_exact_mut(32)) {
        for j in 0..32 {
            let mut l1 = chunk[j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = chunk[j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            q[j] = l1 | (l2 << 4);
        }
        m1 = m1.wrapping_shl(2);
        m2 = m2.wrapping_shl(2);
    }
}

/// Decodes Q5_K `bytes` into `out` (`dequantize_row_q5_K`).
pub fn dequantize_q5_k(bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    dequantize_blocks(GgmlType::Q5_K, bytes, out, |b, y| {
        let d = read_f16(b, 0);
        let min = read_f16(b, 2);
        let scales = &b[4..4 + K_SCALE_SIZE];
        let (qh, ql) = b[4 + K_SCALE_SIZE..].split_at(QK_K / 8);
        for (n, (ys, q)) in y.chunks_exact_mut(64).zip(ql.chunks_exact(32)).enumerate() {
            let (sc1, m1) = get_scale_min_k4(2 * n, scales);
            let (sc2, m2) = get_scale_min_k4(2 * n + 1, scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            let (u1, u2) = (1u8 << (2 * n), 2u8 << (2 * n));
            for i in 0..32 {
                let h1 = if qh[i] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[i] & u2 != 0 { 16 } else { 0 };
                ys[i] = d1 * ((q[i] & 0x0f) as i32 + h1) as f32 - m1;
                ys[i + 32] = d2 * ((q[i] >> 4) as i32 + h2) as f32 - m2;
            }
        }
    })
}

// ----------------------------------------------------------------------------------------
// Q6_K.

/// Appends the Q6_K blocks of `values` (`quantize_row_q6_K_ref`).
pub fn quantize_q6_k(values: &[f32], out: &mut Vec<u8>) -> Result<(), GgufError> {
    quantize_blocks(GgmlType::Q6_K, values, out, q6_k_block)
}

/// Byte offsets inside a Q6_K block.
const Q6K_QH: usize = QK_K / 2;
const Q6K_SCALES: usize = Q6K_QH + QK_K / 4;
const Q6K_D: usize = Q6K_SCALES + QK_K / 16;

dtype::avx2_dispatch!(fn q6_k_block(x: &[f32], y: &mut [u8]) => q6_k_block_body::<AVX2>);

#[inline(always)]
fn q6_k_block_body<const AVX2: bool>(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for half in 0..2 {
        let at = half * 16 * LANES;
        let found = make_qx_quants_rmse1_x8::<AVX2>(32, &x[at..at + 16 * LANES], &mut l[at..]);
        scales[half * LANES..(half + 1) * LANES].copy_from_slice(&found);
    }
    for &scale in &scales {
        let abs_scale = scale.abs();
        if abs_scale > max_abs_scale {
            max_abs_scale = abs_scale;
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        y.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    y[Q6K_D..Q6K_D + 2].copy_from_slice(&f16_bytes(1.0 / iscale));
    for ib in 0..QK_K / 16 {
        // MIN(127, nearest_int(...)) stored into an int8_t.
        y[Q6K_SCALES + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    let d_all = read_f16(y, Q6K_D);
    for j in 0..QK_K / 16 {
        let d = d_all * f32::from(y[Q6K_SCALES + j] as i8);
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as u8;
        }
    }
    let (ql, rest) = y.split_at_mut(Q6K_QH);
    let qh = &mut rest[..QK_K / 4];
    for ((chunk, ql), qh) in l
        .chunks_exact(128)
        .zip(ql.chunks_exact_mut(64))
        .zip(qh.chunks_exact_mut(32))
    {
        for i in 0..32 {
            let (l1, l2, l3, l4) = (chunk[i], chunk[i + 32], chunk[i + 64], chunk[i + 96]);
            ql[i] = (l1 & 0x0f) | ((l3 & 0x0f) << 4);
            ql[i + 32] = (l2 & 0x0f) | ((l4 & 0x0f) << 4);
            qh[i] = (l1 >> 4) | ((l2 >> 4) << 2) | ((l3 >> 4) << 4) | ((l4 >> 4) << 6);
        }
    }
}

/// Decodes Q6_K `bytes` into `out` (`dequantize_row_q6_K`).
pub fn dequantize_q6_k(bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    dequantize_blocks(GgmlType::Q6_K, bytes, out, |b, y| {
        let d = read_f16(b, Q6K_D);
        let ql_all = &b[..Q6K_QH];
        let qh_all = &b[Q6K_QH..Q6K_SCALES];
        let sc_all = &b[Q6K_SCALES..Q6K_D];
        for (n, ys) in y.chunks_exact_mut(128).enumerate() {
            let ql = &ql_all[64 * n..64 * n + 64];
            let qh = &qh_all[32 * n..32 * n + 32];
            let sc = &sc_all[8 * n..8 * n + 8];
            for i in 0..32 {
                let is = i / 16;
                let q1 = ((ql[i] & 0x0f) | ((qh[i] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[i + 32] & 0x0f) | (((qh[i] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4)) as i32 - 32;
                let s = |k: usize| f32::from(sc[is + k] as i8);
                ys[i] = d * s(0) * q1 as f32;
                ys[i + 32] = d * s(2) * q2 as f32;
                ys[i + 64] = d * s(4) * q3 as f32;
                ys[i + 96] = d * s(6) * q4 as f32;
            }
        }
    })
}
