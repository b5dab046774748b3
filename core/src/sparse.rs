//! Sparse storage forms, so that pruning actually shrinks the stored bytes.
//!
//! - **Bitmask + compacted values** (unstructured sparsity): the keep mask is packed one bit
//!   per weight, LSB-first (`bits[i / 8] >> (i % 8) & 1` is weight `i`; padding bits of the
//!   last byte are 0), i.e. exactly `ceil(n / 8)` bytes, and the kept values are stored
//!   contiguously in index order ([`compact`] / [`scatter`]).
//! - **N:M metadata**: every block of `m` weights keeps exactly `n`; for each kept weight its
//!   position inside its block is written with `b = ceil(log2 m)` bits (0 bits when `m = 1`),
//!   in increasing order within the block and block after block, into an LSB-first bit
//!   stream of `ceil(blocks * n * b / 8)` bytes. 2:4 thus costs 4 bits per 4 weights.
//!   Decoding rejects positions out of range or not strictly increasing, so every packed
//!   stream maps to exactly one mask.
//! - **Structured** (whole rows or columns): the kept rows/columns are stored densely
//!   ([`select_rows`], [`select_cols`]); the keep flags are the metadata.
//!
//! Every `scatter*` writes zeros in the dropped positions and validates all lengths.

/// Invalid sparse-storage input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SparseError {
    #[error("expected {expected} {what}, got {actual}")]
    Length {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("bitmask padding bits are not zero")]
    DirtyPadding,
    #[error("row length must be positive")]
    ZeroRowLen,
    #[error("N:M pattern {n}:{m} is invalid (need 0 < m <= 2^31 and n <= m)")]
    InvalidPattern { n: usize, m: usize },
    #[error("length {len} is not a multiple of {m}")]
    NotMultiple { len: usize, m: usize },
    #[error("block {block} keeps {kept} values but block 0 keeps {first}")]
    UnevenBlocks {
        block: usize,
        kept: usize,
        first: usize,
    },
    #[error("corrupt N:M positions in block {block}")]
    CorruptPositions { block: usize },
}

fn length(what: &'static str, expected: usize, actual: usize) -> Result<(), SparseError> {
    if expected == actual {
        Ok(())
    } else {
        Err(SparseError::Length {
            what,
            expected,
            actual,
        })
    }
}

/// Packs a mask one bit per entry, LSB-first; `ceil(mask.len() / 8)` bytes.
pub fn pack_bitmask(mask: &[bool]) -> Vec<u8> {
    mask.chunks(8)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u8, |b, (i, &k)| b | (u8::from(k) << i))
        })
        .collect()
}

/// Unpacks `n` flags from an LSB-first bitmask of exactly `ceil(n / 8)` bytes with zero
/// padding bits.
pub fn unpack_bitmask(bits: &[u8], n: usize) -> Result<Vec<bool>, SparseError> {
    length("bitmask bytes", n.div_ceil(8), bits.len())?;
    if n % 8 != 0 && bits[n / 8] >> (n % 8) != 0 {
        return Err(SparseError::DirtyPadding);
    }
    let mut out = Vec::with_capacity(n);
    for &b in bits {
        for i in 0..8 {
            out.push((b >> i) & 1 == 1);
        }
    }
    out.truncate(n);
    Ok(out)
}

/// The values whose flag is `true`, in order (pairs beyond the shorter slice are ignored).
pub fn compact(values: &[f32], mask: &[bool]) -> Vec<f32> {
    // Branch-free: every value is written at the next slot, which only a kept one claims
    // (a filter's branch mispredicts on irregular masks such as 2:4).
    let kept = values.iter().zip(mask).filter(|(_, &k)| k).count();
    let mut out = vec![0f32; kept + 1];
    let mut next = 0;
    for (&x, &k) in values.iter().zip(mask) {
        out[next] = x;
        next += usize::from(k);
    }
    out.truncate(kept);
    out
}

/// Inverse of [`compact`]: writes the kept values at the `true` positions of `mask` and
/// zeros elsewhere. `out.len()` must equal `mask.len()` and `kept.len()` the number of `true`s.
pub fn scatter(kept: &[f32], mask: &[bool], out: &mut [f32]) -> Result<(), SparseError> {
    length("output values", mask.len(), out.len())?;
    length(
        "kept values",
        mask.iter().filter(|&&k| k).count(),
        kept.len(),
    )?;
    // Branch-free, as in `compact`.
    let mut next = 0;
    for (o, &k) in out.iter_mut().zip(mask) {
        // The value's bits, or those of +0.0: a mask, which the compiler cannot turn back
        // into a branch as it does with an `if`.
        let bits = kept.get(next).map_or(0, |v| v.to_bits());
        *o = f32::from_bits(bits & 0u32.wrapping_sub(u32::from(k)));
        next += usize::from(k);
    }
    Ok(())
}

/// Bits per N:M position for blocks of `m`: `ceil(log2 m)`.
pub fn nm_position_bits(m: usize) -> u32 {
    if m <= 1 {
        0
    } else {
        usize::BITS - (m - 1).leading_zeros()
    }
}

/// Bytes of N:M metadata for `len` weights at n:m (`len` a multiple of `m`).
pub fn nm_metadata_bytes(len: usize, n: usize, m: usize) -> usize {
    let bits = (len / m.max(1)) as u128 * n as u128 * u128::from(nm_position_bits(m));
    usize::try_from(bits.div_ceil(8)).unwrap_or(usize::MAX)
}

fn check_pattern(len: usize, n: usize, m: usize) -> Result<(), SparseError> {
    if m == 0 || m > 1 << 31 || n > m {
        return Err(SparseError::InvalidPattern { n, m });
    }
    if len % m != 0 {
        return Err(SparseError::NotMultiple { len, m });
    }
    Ok(())
}

/// LSB-first bit stream writer.
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    filled: u32,
}

impl BitWriter {
    fn put(&mut self, value: u64, bits: u32) {
        self.acc |= value << self.filled;
        self.filled += bits;
        while self.filled >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.filled -= 8;
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.filled > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// Packs N:M metadata: every block of `m` flags must keep the same number `n` of weights
/// (as [`crate::prune::nm_mask`] produces); each kept position is written in
/// `ceil(log2 m)` bits. `mask.len()` must be a multiple of `m`.
pub fn nm_pack_positions(mask: &[bool], m: usize) -> Result<Vec<u8>, SparseError> {
    check_pattern(mask.len(), 0, m)?;
    let bits = nm_position_bits(m);
    let first = mask.iter().take(m).filter(|&&k| k).count();
    let mut w = BitWriter {
        out: Vec::with_capacity(nm_metadata_bytes(mask.len(), first, m)),
        acc: 0,
        filled: 0,
    };
    for (block, b) in mask.chunks_exact(m).enumerate() {
        let mut kept = 0;
        if m <= 8 {
            // The block's positions as one value (at most 8 of 3 bits), gathered
            // branch-free.
            let mut value = 0u64;
            for (pos, &k) in b.iter().enumerate() {
                value |= (pos as u64 & 0u64.wrapping_sub(u64::from(k))) << (bits * kept);
                kept += u32::from(k);
            }
            w.put(value, bits * kept);
        } else {
            for (pos, _) in b.iter().enumerate().filter(|(_, &k)| k) {
                w.put(pos as u64, bits);
                kept += 1;
            }
        }
        let kept = kept as usize;
        if kept != first {
            return Err(SparseError::UnevenBlocks { block, kept, first });
        }
    }
    Ok(w.finish())
}

/// Rebuilds the mask of `len` flags from [`nm_pack_positions`] output at `n:m`. Fails on a
/// wrong byte count, non-zero padding, or positions that are out of range or not strictly
/// increasing within a block.
pub fn nm_unpack_positions(
    packed: &[u8],
    len: usize,
    n: usize,
    m: usize,
) -> Result<Vec<bool>, SparseError> {
    check_pattern(len, n, m)?;
    length(
        "N:M metadata bytes",
        nm_metadata_bytes(len, n, m),
        packed.len(),
    )?;
    let bits = nm_position_bits(m);
    let value_mask = (1u64 << bits) - 1;
    let mut mask = vec![false; len];
    let (mut acc, mut filled, mut next_byte) = (0u64, 0u32, 0usize);
    for (block, out) in mask.chunks_exact_mut(m).enumerate() {
        let mut min_pos = 0u64;
        for _ in 0..n {
            while filled < bits {
                acc |= u64::from(packed[next_byte]) << filled;
                next_byte += 1;
                filled += 8;
            }
            let pos = acc & value_mask;
            acc >>= bits;
            filled -= bits;
            if pos < min_pos || pos >= m as u64 {
                return Err(SparseError::CorruptPositions { block });
            }
            out[pos as usize] = true;
            min_pos = pos + 1;
        }
    }
    if acc != 0 {
        return Err(SparseError::DirtyPadding);
    }
    Ok(mask)
}

/// The rows of a row-major matrix whose flag is `true`, concatenated. Rows beyond
/// `keep.len()` (or flags beyond the row count) are ignored; `row_len == 0` gives nothing.
pub fn select_rows(values: &[f32], row_len: usize, keep: &[bool]) -> Vec<f32> {
    if row_len == 0 {
        return Vec::new();
    }
    values
        .chunks_exact(row_len)
        .zip(keep)
        .filter(|(_, &k)| k)
        .flat_map(|(r, _)| r.iter().copied())
        .collect()
}

/// Inverse of [`select_rows`]: `out` holds `keep.len()` rows of `row_len`; kept rows are
/// copied from `kept` in order, dropped rows become zeros.
pub fn scatter_rows(
    kept: &[f32],
    row_len: usize,
    keep: &[bool],
    out: &mut [f32],
) -> Result<(), SparseError> {
    if row_len == 0 {
        return Err(SparseError::ZeroRowLen);
    }
    length(
        "output values",
        keep.len().saturating_mul(row_len),
        out.len(),
    )?;
    let kept_rows = keep.iter().filter(|&&k| k).count();
    length("kept values", kept_rows * row_len, kept.len())?;
    let mut src = kept.chunks_exact(row_len);
    for (row, &k) in out.chunks_exact_mut(row_len).zip(keep) {
        match if k { src.next() } else { None } {
            Some(s) => row.copy_from_slice(s),
            None => row.fill(0.0),
        }
    }
    Ok(())
}

/// The columns whose flag is `true`, as a row-major matrix of `count(keep)` columns. Columns
/// beyond `keep.len()` are dropped; `row_len == 0` gives nothing.
pub fn select_cols(values: &[f32], row_len: usize, keep: &[bool]) -> Vec<f32> {
    if row_len == 0 {
        return Vec::new();
    }
    let kept_cols = keep.iter().take(row_len).filter(|&&k| k).count();
    let mut out = Vec::with_capacity(values.len() / row_len * kept_cols);
    for row in values.chunks_exact(row_len) {
        out.extend(row.iter().zip(keep).filter(|(_, &k)| k).map(|(&x, _)| x));
    }
    out
}

/// Inverse of [`select_cols`]: `keep.len()` must equal `row_len`, `out` must be whole rows
/// and `kept` must hold `rows * count(keep)` values; dropped columns become zeros.
pub fn scatter_cols(
    kept: &[f32],
    row_len: usize,
    keep: &[bool],
    out: &mut [f32],
) -> Result<(), SparseError> {
    if row_len == 0 {
        return Err(SparseError::ZeroRowLen);
    }
    length("column flags", row_len, keep.len())?;
    if out.len() % row_len != 0 {
        return Err(SparseError::NotMultiple {
            len: out.len(),
            m: row_len,
        });
    }
    let kept_cols = keep.iter().filter(|&&k| k).count();
    length("kept values", out.len() / row_len * kept_cols, kept.len())?;
    if kept_cols == 0 {
        out.fill(0.0);
        return Ok(());
    }
    for (row, src) in out
        .chunks_exact_mut(row_len)
        .zip(kept.chunks_exact(kept_cols))
    {
        let mut s = src.iter();
        for (o, &k) in row.iter_mut().zip(keep) {
            *o = if k { *s.next().unwrap_or(&0.0) } else { 0.0 };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
