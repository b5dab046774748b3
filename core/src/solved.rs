//! A calibrated method's result for one tensor, as the calibration round stores it in the
//! object store for the compressing round (and for the forward of the compressed layer):
//! either affine integer codes (GPTQ, AWQ: the same codes, scales and zero points RTN
//! stores, so every output format carries them) or the dense weights a calibrated pruner
//! kept and updated (SparseGPT, Wanda: zeros exactly where pruned).
//!
//! Byte layout (little-endian): magic `SPSOLVED`, version `u32` (1), kind `u8` (0 codes,
//! 1 dense), then for codes: bits `u8`, rows, row_len, group_len (`u64` each), the codes
//! (one byte each), the scales and the zero points (`f32` each, one per group); for dense:
//! rows and row_len (`u64`), the values (`f32`). [`Solved::from_bytes`] checks every length
//! against the bytes it was given, so a corrupt object is an error, never a panic or a huge
//! allocation.

use crate::quantize::{AffineCodes, QuantizeError};
use crate::recipe::{Granularity, QuantizeConfig};

const MAGIC: &[u8; 8] = b"SPSOLVED";
const VERSION: u32 = 1;

/// One tensor's calibrated result.
#[derive(Debug, Clone, PartialEq)]
pub enum Solved {
    /// Integer codes for a quantize pass.
    Codes(AffineCodes),
    /// The weights to keep (row-major, `rows × row_len`), zeros where pruned.
    Dense {
        rows: usize,
        row_len: usize,
        values: Vec<f32>,
    },
}

/// Why a stored result cannot be read or used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SolvedError {
    #[error("not a calibrated result: {0}")]
    Corrupt(String),
    #[error("the calibrated result does not fit the tensor: {0}")]
    Mismatch(String),
}

impl Solved {
    /// Rows of the tensor.
    pub fn rows(&self) -> usize {
        match self {
            Solved::Codes(c) if c.row_len > 0 => c.codes.len() / c.row_len,
            Solved::Codes(_) => 0,
            Solved::Dense { rows, .. } => *rows,
        }
    }

    /// Elements per row.
    pub fn row_len(&self) -> usize {
        match self {
            Solved::Codes(c) => c.row_len,
            Solved::Dense { row_len, .. } => *row_len,
        }
    }

    /// The weights as the output stores them (codes dequantized), row-major.
    pub fn weights(&self) -> Vec<f32> {
        match self {
            Solved::Codes(codes) => {
                let mut out = vec![0f32; codes.codes.len()];
                codes.dequantize_into(&mut out);
                out
            }
            Solved::Dense { values, .. } => values.clone(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        let floats = |out: &mut Vec<u8>, values: &[f32]| {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        };
        match self {
            Solved::Codes(c) => {
                out.push(0);
                out.push(c.bits);
                for n in [self.rows(), c.row_len, c.group_len] {
                    out.extend_from_slice(&(n as u64).to_le_bytes());
                }
                out.extend_from_slice(&c.codes);
                floats(&mut out, &c.scales);
                floats(&mut out, &c.zeros);
            }
            Solved::Dense {
                rows,
                row_len,
                values,
            } => {
                out.push(1);
                for n in [*rows, *row_len] {
                    out.extend_from_slice(&(n as u64).to_le_bytes());
                }
                floats(&mut out, values);
            }
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Solved, SolvedError> {
        let mut reader = Reader { bytes, at: 0 };
        if reader.take(8)? != MAGIC {
            return Err(SolvedError::Corrupt("wrong magic".into()));
        }
        let version = u32::from_le_bytes(reader.array()?);
        if version != VERSION {
            return Err(SolvedError::Corrupt(format!(
                "version {version}, this build reads {VERSION}"
            )));
        }
        let solved = match reader.take(1)?[0] {
            0 => {
                let bits = reader.take(1)?[0];
                crate::quantize::check_bits(bits)
                    .map_err(|e| SolvedError::Corrupt(e.to_string()))?;
                let rows = reader.len()?;
                let row_len = reader.len()?;
                let group_len = reader.len()?;
                if row_len == 0 || group_len == 0 || group_len > row_len {
                    return Err(SolvedError::Corrupt(format!(
                        "row length {row_len} with groups of {group_len}"
                    )));
                }
                let n = checked_mul(rows, row_len)?;
                let groups = checked_mul(rows, row_len.div_ceil(group_len))?;
                let codes = reader.take(n)?.to_vec();
                if let Some(c) = codes.iter().find(|&&c| u32::from(c) >> bits != 0) {
                    return Err(SolvedError::Corrupt(format!(
                        "code {c} does not fit {bits} bits"
                    )));
                }
                let scales = reader.floats(groups)?;
                let zeros = reader.floats(groups)?;
                Solved::Codes(AffineCodes {
                    bits,
                    row_len,
                    group_len,
                    codes,
                    scales,
                    zeros,
                })
            }
            1 => {
                let rows = reader.len()?;
                let row_len = reader.len()?;
                let values = reader.floats(checked_mul(rows, row_len)?)?;
                Solved::Dense {
                    rows,
                    row_len,
                    values,
                }
            }
            kind => return Err(SolvedError::Corrupt(format!("unknown kind {kind}"))),
        };
        if reader.at != bytes.len() {
            return Err(SolvedError::Corrupt(format!(
                "{} bytes after the end",
                bytes.len() - reader.at
            )));
        }
        Ok(solved)
    }

    /// Checks the result fits a tensor of `shape` (a 2-D matrix, or rows of the last
    /// dimension) under the pass `cfg` (codes) or a prune pass (dense).
    pub fn check_fits(
        &self,
        shape: &[u64],
        cfg: Option<&QuantizeConfig>,
    ) -> Result<(), SolvedError> {
        let row_len = crate::quantize::row_len_of(shape) as usize;
        let rows = match row_len {
            0 => 0,
            _ => (shape.iter().product::<u64>() as usize) / row_len,
        };
        if self.rows() != rows || self.row_len() != row_len {
            return Err(SolvedError::Mismatch(format!(
                "it has {} rows of {}, the tensor {rows} rows of {row_len}",
                self.rows(),
                self.row_len()
            )));
        }
        match (self, cfg) {
            (Solved::Codes(codes), Some(cfg)) => {
                let group_len = match cfg.granularity {
                    Granularity::Channel | Granularity::Tensor => row_len,
                    Granularity::Group(g) => g.clamp(1, row_len.max(1)),
                };
                if codes.bits != cfg.bits || codes.group_len != group_len {
                    return Err(SolvedError::Mismatch(format!(
                        "{}-bit codes in groups of {}, the pass stores {}-bit codes in groups of {group_len}",
                        codes.bits, codes.group_len, cfg.bits
                    )));
                }
                Ok(())
            }
            (Solved::Dense { .. }, None) => Ok(()),
            (Solved::Codes(_), None) => Err(SolvedError::Mismatch(
                "codes for a tensor whose pass stores no codes".into(),
            )),
            (Solved::Dense { .. }, Some(_)) => Err(SolvedError::Mismatch(
                "dense weights for a tensor whose pass stores codes".into(),
            )),
        }
    }

    /// Rows `first_row..` of the dense weights, `len` values.
    pub(crate) fn dense_rows(&self, first_row: usize, len: usize) -> Option<&[f32]> {
        match self {
            Solved::Dense {
                row_len, values, ..
            } => {
                let start = first_row.checked_mul(*row_len)?;
                values.get(start..start.checked_add(len)?)
            }
            Solved::Codes(_) => None,
        }
    }
}

/// The codes of rows `first_row..` covering `len` values, checked against the pass `cfg`
/// and the chunk's `row_len`.
pub(crate) fn codes_rows(
    codes: &AffineCodes,
    cfg: &QuantizeConfig,
    first_row: usize,
    row_len: usize,
    len: usize,
) -> Result<AffineCodes, QuantizeError> {
    if codes.row_len != row_len || codes.bits != cfg.bits || row_len == 0 {
        return Err(QuantizeError::SolvedLayout {
            solved_bits: codes.bits,
            solved_row_len: codes.row_len,
            bits: cfg.bits,
            row_len,
        });
    }
    let groups = codes.groups_per_row();
    let rows = len / row_len;
    let range = |per: usize| first_row * per..(first_row + rows) * per;
    let (values, params) = (range(row_len), range(groups));
    match (
        codes.codes.get(values),
        codes.scales.get(params.clone()),
        codes.zeros.get(params),
    ) {
        (Some(c), Some(s), Some(z)) => Ok(AffineCodes {
            bits: codes.bits,
            row_len,
            group_len: codes.group_len,
            codes: c.to_vec(),
            scales: s.to_vec(),
            zeros: z.to_vec(),
        }),
        _ => Err(QuantizeError::SolvedRows {
            first_row,
            end: first_row + rows,
            solved_rows: codes.codes.len() / row_len,
        }),
    }
}

fn checked_mul(a: usize, b: usize) -> Result<usize, SolvedError> {
    a.checked_mul(b)
        .ok_or_else(|| SolvedError::Corrupt(format!("{a} x {b} overflows")))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SolvedError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| {
            SolvedError::Corrupt(format!(
                "truncated: {n} bytes wanted at offset {}, {} there",
                self.at,
                self.bytes.len()
            ))
        })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SolvedError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len(&mut self) -> Result<usize, SolvedError> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| SolvedError::Corrupt(format!("length {n}")))
    }

    fn floats(&mut self, n: usize) -> Result<Vec<f32>, SolvedError> {
        let bytes = self.take(checked_mul(n, 4)?)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode_chunk, TensorPlan};
    use crate::dtype::DType;
    use crate::recipe::{Calibrated, PassKind, ScaleDtype};
    use crate::stream::FixedValues;
    use std::sync::Arc;

    fn codes() -> AffineCodes {
        AffineCodes {
            bits: 4,
            row_len: 4,
            group_len: 2,
            codes: vec![0, 15, 3, 4, 7, 8, 9, 1],
            scales: vec![0.5, 0.25, 1.0, 2.0],
            zeros: vec![8.0, 8.0, 7.0, 8.0],
        }
    }

    #[test]
    fn round_trips_and_refuses_corrupt_bytes() {
        for solved in [
            Solved::Codes(codes()),
            Solved::Dense {
                rows: 2,
                row_len: 3,
                values: vec![1.0, 0.0, -2.5, 0.0, 3.0, 4.0],
            },
        ] {
            let bytes = solved.to_bytes();
            assert_eq!(Solved::from_bytes(&bytes).unwrap(), solved);
            for cut in [0, 7, 12, bytes.len() - 1] {
                assert!(Solved::from_bytes(&bytes[..cut]).is_err(), "cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(Solved::from_bytes(&longer).is_err());
        }
        // A code beyond its bits, and a size that would overflow.
        let mut bytes = Solved::Codes(codes()).to_bytes();
        let first_code = 8 + 4 + 1 + 1 + 24;
        bytes[first_code] = 16;
        assert!(Solved::from_bytes(&bytes)
            .unwrap_err()
            .to_string()
            .contains("16"));
        let mut huge = Solved::Dense {
            rows: 1,
            row_len: 1,
            values: vec![1.0],
        }
        .to_bytes();
        huge[13..21].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Solved::from_bytes(&huge).is_err());
    }

    #[test]
    fn a_solved_plan_stores_exactly_the_solved_codes() {
        let cfg = QuantizeConfig {
            bits: 4,
            symmetric: false,
            granularity: Granularity::Group(2),
            scale_dtype: ScaleDtype::F32,
        };
        let weights: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();
        let input: Vec<u8> = weights.iter().flat_map(|w| w.to_le_bytes()).collect();
        let solved = Arc::new(Solved::Codes(codes()));
        let plan = TensorPlan {
            values: Some(PassKind::Quantize(cfg)),
            calibrated: Some(Calibrated::Gptq {
                dampening: 0.01,
                act_order: false,
            }),
            fixed_values: Some(FixedValues::Solved {
                solved: solved.clone(),
                first_row: 0,
            }),
            ..TensorPlan::default()
        };
        assert_eq!(plan.describe(), "gptq int4 asym g2");
        let chunk = encode_chunk(&plan, DType::F32, 4, &input).unwrap();
        let expected = solved.weights();
        let got: Vec<f32> = chunk
            .reconstruction
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(got, expected);
        // The second row alone, as a chunk starting at row 1.
        let second = encode_chunk(&plan.for_chunk(1), DType::F32, 4, &input[16..]).unwrap();
        assert_eq!(second.reconstruction, chunk.reconstruction[16..]);
        // Codes of another bit width are refused, not stored.
        let mut wrong = plan.clone();
        wrong.values = Some(PassKind::Quantize(QuantizeConfig { bits: 3, ..cfg }));
        assert!(encode_chunk(&wrong, DType::F32, 4, &input).is_err());
        // Without the result the plan is the data-free pass, named so.
        let unsolved = TensorPlan {
            fixed_values: None,
            ..plan
        };
        assert_eq!(unsolved.describe(), "rtn int4 asym g2");
    }

    #[test]
    fn a_solved_prune_keeps_the_solved_weights() {
        let weights: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -4.0];
        let input: Vec<u8> = weights.iter().flat_map(|w| w.to_le_bytes()).collect();
        // Keeps the two *smallest* of each four, updated: magnitude would keep the others.
        let kept = vec![1.5, 2.5, 0.0, 0.0, -1.5, 0.0, -2.5, 0.0];
        let plan = TensorPlan {
            structure: Some(crate::recipe::PruneConfig::NOfM { n: 2, m: 4 }),
            calibrated: Some(Calibrated::SparseGpt { dampening: 0.01 }),
            fixed_values: Some(FixedValues::Solved {
                solved: Arc::new(Solved::Dense {
                    rows: 2,
                    row_len: 4,
                    values: kept.clone(),
                }),
                first_row: 0,
            }),
            ..TensorPlan::default()
        };
        assert_eq!(plan.describe(), "sparsegpt 2:4");
        let chunk = encode_chunk(&plan, DType::F32, 4, &input).unwrap();
        let got: Vec<f32> = chunk
            .reconstruction
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(got, kept);
        let unstructured = TensorPlan {
            structure: Some(crate::recipe::PruneConfig::Magnitude {
                sparsity: 0.5,
                global: false,
            }),
            ..plan
        };
        let chunk = encode_chunk(&unstructured, DType::F32, 4, &input).unwrap();
        assert_eq!(
            chunk.reconstruction,
            got.iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
        );
    }
}
