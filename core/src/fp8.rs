//! FP8 E4M3 (the OCP "E4M3FN" format) with a per-row or per-tensor f32 scale.
//!
//! An E4M3FN byte is `s eeee mmm`: sign, 4 exponent bits with bias 7, 3 mantissa bits.
//! Exponent field `e > 0` encodes `(-1)^s * 2^(e-7) * (1 + m/8)`, `e = 0` encodes the
//! subnormals `(-1)^s * 2^-6 * m/8 = m * 2^-9`. There are no infinities: `s 1111 111`
//! (`0x7F`/`0xFF`) is NaN, so the largest finite magnitude is `2^8 * 1.75 = 448` (`0x7E`).
//!
//! Encoding ([`e4m3_from_f32`]) rounds to nearest, ties to even: in the normal range by
//! rounding the f32 mantissa to 3 bits (`bits + 0x7FFFF + lsb`, then dropping 20 bits, which
//! also carries into the exponent), below `2^-6` by rounding `|x| * 2^9` to an integer (the
//! product is exact). Magnitudes beyond 448 (including infinity) saturate to ±448; NaN
//! encodes as `0x7F`. Both paths are computed and selected without branches, so encoding
//! loops vectorize. Relative error is at most `2^-4` (half a unit in the last place of a
//! 4-bit significand) in the normal range `[2^-6, 448]`, and absolute error at most `2^-10`
//! below it.
//!
//! Quantization ([`fp8_e4m3_codes`]) divides by `scale = absmax / 448` (absmax over the
//! finite values of each row, or of the whole slice) so the largest value maps to ±448, and
//! dequantizes as `decode(byte) * scale` with a 256-entry table. Rows are independent and
//! the absmax is exact, so the parallel split does not change the bytes.

use crate::quantize::{check_rows, finite_absmax, par_group_pieces, QuantizeError};
use crate::recipe::ScaleDtype;
use rayon::prelude::*;

/// Largest finite E4M3FN magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// The NaN code (sign clear).
pub const E4M3_NAN: u8 = 0x7F;
/// `2^23`: `(v + M) - M` rounds `0 <= v < 2^23` to an integer, ties to even.
const ROUND_MAGIC: f32 = 8_388_608.0;
/// Smallest normal E4M3 magnitude, `2^-6`.
const MIN_NORMAL: f32 = 0.015_625;

/// Encodes `x` as E4M3FN: round to nearest even, saturate to ±448, NaN -> `0x7F`.
#[inline(always)]
pub fn e4m3_from_f32(x: f32) -> u8 {
    let sign = (x.to_bits() >> 24) & 0x80;
    let a = x.abs();
    // Subnormal (and zero) range: round(|x| * 2^9) in 0..=8; 8 is the code of 2^-6.
    let sub = ((a * 512.0 + ROUND_MAGIC) - ROUND_MAGIC) as u32;
    // Normal range: round the 23-bit mantissa to 3 bits, ties to even, then rebias 127 -> 7.
    let ab = a.to_bits();
    let rounded = ab.wrapping_add(0x7FFFF + ((ab >> 20) & 1)) >> 20;
    let normal = rounded.wrapping_sub(120 << 3).min(0x7E);
    let magnitude = if a < MIN_NORMAL { sub } else { normal };
    if a.is_nan() {
        E4M3_NAN
    } else {
        (sign | magnitude) as u8
    }
}

/// Decodes one E4M3FN byte (usable in `const` context).
pub const fn e4m3_to_f32(b: u8) -> f32 {
    let exponent = ((b >> 3) & 0xF) as u32;
    let mantissa = (b & 7) as u32;
    let magnitude = if b & 0x7F == 0x7F {
        f32::NAN
    } else if exponent == 0 {
        mantissa as f32 * (1.0 / 512.0)
    } else {
        f32::from_bits(((exponent + 120) << 23) | (mantissa << 20))
    };
    if b & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// All 256 decoded values, indexed by byte.
static E4M3_TABLE: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_to_f32(i as u8);
        i += 1;
    }
    t
};

/// FP8 E4M3 bytes with one scale per row or one for the whole slice.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Codes {
    /// Elements per row, as given to [`fp8_e4m3_codes`].
    pub row_len: usize,
    /// One scale per row when true, else one for the whole slice.
    pub per_channel: bool,
    /// `absmax / 448` (0 for a row with no non-zero finite value).
    pub scales: Vec<f32>,
    /// One E4M3FN byte per element.
    pub bytes: Vec<u8>,
}

impl Fp8Codes {
    /// Writes `decode(byte) * scale` for every element, in parallel. `out` should have
    /// `bytes.len()` elements; only the common prefix is written otherwise. A missing scale
    /// dequantizes to 0.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        let n = out.len().min(self.bytes.len());
        let bytes = &self.bytes[..n];
        let group_len = if self.per_channel { self.row_len } else { n };
        let row_len = group_len;
        par_group_pieces(&mut out[..n], row_len, group_len, |start, g, piece| {
            let scale = self.scales.get(g).copied().unwrap_or(0.0);
            let bytes = &bytes[start..start + piece.len()];
            for (o, &b) in piece.iter_mut().zip(bytes) {
                *o = E4M3_TABLE[usize::from(b)] * scale;
            }
        });
    }
}

/// The stored scale for a slice whose finite absmax is `absmax`, rounded up onto `grid`.
fn scale_for(grid: ScaleDtype, absmax: f32) -> f32 {
    if absmax > 0.0 {
        // A tiny subnormal absmax could underflow to 0; values then saturate instead.
        grid.round_up((absmax / E4M3_MAX).max(f32::from_bits(1)))
    } else {
        0.0
    }
}

/// FP8 E4M3 codes of `values` (rows of `row_len`): `scale = absmax / 448` per row
/// (`per_channel`) or for the whole slice, `byte = e4m3(x / scale)` (a scale of 0, for
/// all-zero input, encodes `x` itself). Infinities saturate to ±448 (times the scale), NaN
/// stays NaN.
///
/// Errors: `row_len == 0` or `values.len()` not a multiple of `row_len`.
pub fn fp8_e4m3_codes(
    per_channel: bool,
    values: &[f32],
    row_len: usize,
) -> Result<Fp8Codes, QuantizeError> {
    fp8_e4m3_codes_on(ScaleDtype::F32, per_channel, values, row_len)
}

/// [`fp8_e4m3_codes`] with each scale rounded up onto `grid` (so it is exact in that dtype
/// and `x / scale` still stays within ±448).
pub fn fp8_e4m3_codes_on(
    grid: ScaleDtype,
    per_channel: bool,
    values: &[f32],
    row_len: usize,
) -> Result<Fp8Codes, QuantizeError> {
    fp8_codes_with(grid, per_channel, values, row_len, None)
}

/// Per-tensor [`fp8_e4m3_codes_on`] with the whole tensor's finite absmax fixed in advance
/// (gathered chunk by chunk in a first pass): applied to each chunk of rows it gives bit for
/// bit the bytes of the whole tensor encoded at once, each chunk carrying its one scale.
pub fn fp8_e4m3_codes_with_absmax(
    grid: ScaleDtype,
    values: &[f32],
    row_len: usize,
    absmax: f32,
) -> Result<Fp8Codes, QuantizeError> {
    fp8_codes_with(grid, false, values, row_len, Some(absmax))
}

/// [`fp8_e4m3_codes_on`], with the per-tensor absmax given rather than measured when `Some`.
fn fp8_codes_with(
    grid: ScaleDtype,
    per_channel: bool,
    values: &[f32],
    row_len: usize,
    tensor_absmax: Option<f32>,
) -> Result<Fp8Codes, QuantizeError> {
    check_rows(values.len(), row_len)?;
    let scales: Vec<f32> = if values.is_empty() {
        Vec::new()
    } else if per_channel {
        values
            .par_chunks(row_len)
            .map(|row| scale_for(grid, finite_absmax(row)))
            .collect()
    } else {
        vec![scale_for(
            grid,
            tensor_absmax.unwrap_or_else(|| finite_absmax(values)),
        )]
    };
    let mut bytes = vec![0u8; values.len()];
    let group_len = if per_channel { row_len } else { values.len() };
    par_group_pieces(&mut bytes, group_len, group_len, |start, g, piece| {
        let scale = scales[g];
        let divisor = if scale > 0.0 { scale } else { 1.0 };
        let xs = &values[start..start + piece.len()];
        for (b, &x) in piece.iter_mut().zip(xs) {
            *b = e4m3_from_f32(x / divisor);
        }
    });
    Ok(Fp8Codes {
        row_len,
        per_channel,
        scales,
        bytes,
    })
}

/// Decodes whole rows of an FP8 E4M3 weight stored with scales, starting at weight row
/// `first_row`: `out[i] = decode(raw[i]) * scale` of the element's block, where `scales` is
/// the row-major grid of `[ceil(rows / block[0]), scale_cols]` scales and `cols` the
/// weight's row length (DeepSeek-V3's `weight_scale_inv` multiplies the same way). Errors
/// when `raw` is not whole rows or a block has no scale.
pub fn decode_scaled_rows(
    raw: &[u8],
    first_row: u64,
    cols: usize,
    scales: &[f32],
    scale_cols: usize,
    block: [u64; 2],
    out: &mut [f32],
) -> Result<(), String> {
    if cols == 0 || raw.len() % cols != 0 || out.len() != raw.len() {
        return Err(format!(
            "{} FP8 bytes are not whole rows of {cols} (output of {})",
            raw.len(),
            out.len()
        ));
    }
    let (block_rows, block_cols) = (block[0].max(1), block[1].max(1) as usize);
    let last_row = first_row + (raw.len() / cols) as u64;
    let needed = (last_row.div_ceil(block_rows) as usize) * scale_cols;
    if cols.div_ceil(block_cols) > scale_cols || scales.len() < needed {
        return Err(format!(
            "{} scales with {scale_cols} columns do not cover rows ..{last_row} of {cols} columns in {block_rows}x{block_cols} blocks",
            scales.len()
        ));
    }
    raw.par_chunks(cols)
        .zip(out.par_chunks_mut(cols))
        .enumerate()
        .for_each(|(r, (bytes, values))| {
            let scale_row = &scales[((first_row + r as u64) / block_rows) as usize * scale_cols..];
            for ((bytes, values), &scale) in bytes
                .chunks(block_cols)
                .zip(values.chunks_mut(block_cols))
                .zip(scale_row)
            {
                for (v, &b) in values.iter_mut().zip(bytes) {
                    *v = E4M3_TABLE[usize::from(b)] * scale;
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests;
