//! [`Hidden`]: the activations between layers, and their byte format in the object store.
//!
//! Format (all integers little-endian): magic `SPHIDDEN`, version u32 = 1, sequence count
//! u32, then per sequence rows u32 and cols u32, then every sequence's rows × cols f32 values
//! in order. The bytes come back from storage written by another worker, so `from_bytes`
//! treats them as hostile: every count is checked against the bytes actually present before
//! anything is allocated, and the total must match exactly.

use crate::{Matrix, ModelError};

const MAGIC: &[u8; 8] = b"SPHIDDEN";
const VERSION: u32 = 1;
/// Magic, version and count.
const FIXED_HEADER: usize = 8 + 4 + 4;
/// Rows and cols of one sequence.
const SHAPE_BYTES: usize = 8;

/// One (tokens × hidden) matrix per sequence; no padding, each sequence is processed alone.
#[derive(Debug, Clone, PartialEq)]
pub struct Hidden {
    pub sequences: Vec<Matrix>,
}

fn bad(message: String) -> ModelError {
    ModelError::BadActivations(message)
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

impl Hidden {
    /// Serializes to the format above. Shapes beyond u32 cannot occur in practice (a single
    /// sequence of 4 billion tokens); they would be refused by `from_bytes`'s length check.
    pub fn to_bytes(&self) -> Vec<u8> {
        let values: usize = self.sequences.iter().map(|s| s.data.len()).sum();
        let mut out =
            Vec::with_capacity(FIXED_HEADER + SHAPE_BYTES * self.sequences.len() + 4 * values);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.sequences.len() as u32).to_le_bytes());
        for sequence in &self.sequences {
            out.extend_from_slice(&(sequence.rows as u32).to_le_bytes());
            out.extend_from_slice(&(sequence.cols as u32).to_le_bytes());
        }
        for sequence in &self.sequences {
            for value in &sequence.data {
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
        out
    }

    /// Parses and validates bytes written by [`Hidden::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Hidden, ModelError> {
        if bytes.len() < FIXED_HEADER || &bytes[..8] != MAGIC {
            return Err(bad(
                "not serialized hidden states (no SPHIDDEN header)".into()
            ));
        }
        let version = read_u32(bytes, 8);
        if version != VERSION {
            return Err(bad(format!(
                "hidden-state format version {version}, this build reads {VERSION}"
            )));
        }
        let count = read_u32(bytes, 12) as usize;
        let shapes_end = count
            .checked_mul(SHAPE_BYTES)
            .and_then(|n| n.checked_add(FIXED_HEADER))
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| {
                bad(format!(
                    "header announces {count} sequences but the data is only {} bytes",
                    bytes.len()
                ))
            })?;
        let mut shapes = Vec::with_capacity(count);
        let mut total: usize = 0;
        for index in 0..count {
            let at = FIXED_HEADER + index * SHAPE_BYTES;
            let (rows, cols) = (
                read_u32(bytes, at) as usize,
                read_u32(bytes, at + 4) as usize,
            );
            if rows == 0 || cols == 0 {
                return Err(bad(format!(
                    "sequence {index} has an empty shape {rows} × {cols}"
                )));
            }
            if let Some((_, first_cols)) = shapes.first() {
                if *first_cols != cols {
                    return Err(bad(format!(
                        "sequence {index} is {cols} wide, sequence 0 is {first_cols}"
                    )));
                }
            }
            total = rows
                .checked_mul(cols)
                .and_then(|n| total.checked_add(n))
                .ok_or_else(|| {
                    bad(format!(
                        "sequence {index}'s shape {rows} × {cols} overflows"
                    ))
                })?;
            shapes.push((rows, cols));
        }
        let expected = total.checked_mul(4).and_then(|n| n.checked_add(shapes_end));
        if expected != Some(bytes.len()) {
            return Err(bad(format!(
                "the shapes need {} bytes of values, {} are present",
                total.saturating_mul(4),
                bytes.len() - shapes_end
            )));
        }
        let mut values = bytes[shapes_end..]
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]));
        let sequences = shapes
            .into_iter()
            .map(|(rows, cols)| Matrix {
                rows,
                cols,
                data: values.by_ref().take(rows * cols).collect(),
            })
            .collect();
        Ok(Hidden { sequences })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Hidden {
        Hidden {
            sequences: vec![
                Matrix::from_vec(2, 3, vec![1.0, -2.0, 3.5, f32::MIN_POSITIVE, 0.0, -0.0]).unwrap(),
                Matrix::from_vec(1, 3, vec![7.0, 8.0, 9.0]).unwrap(),
            ],
        }
    }

    #[test]
    fn round_trip_is_exact() {
        let hidden = sample();
        let bytes = hidden.to_bytes();
        assert_eq!(bytes.len(), 16 + 2 * 8 + 9 * 4);
        assert_eq!(Hidden::from_bytes(&bytes).unwrap(), hidden);
        let empty = Hidden { sequences: vec![] };
        assert_eq!(Hidden::from_bytes(&empty.to_bytes()).unwrap(), empty);
    }

    #[test]
    fn truncated_extended_and_foreign_bytes_are_refused() {
        let bytes = sample().to_bytes();
        for cut in 0..bytes.len() {
            assert!(Hidden::from_bytes(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Hidden::from_bytes(&longer).is_err());
        let mut wrong_version = bytes.clone();
        wrong_version[8] = 2;
        assert!(Hidden::from_bytes(&wrong_version)
            .unwrap_err()
            .to_string()
            .contains("version 2"));
        assert!(Hidden::from_bytes(b"PK\x03\x04 not hidden states").is_err());
    }

    #[test]
    fn hostile_counts_and_shapes_are_refused_without_allocating() {
        let mut huge_count = sample().to_bytes();
        huge_count[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Hidden::from_bytes(&huge_count)
            .unwrap_err()
            .to_string()
            .contains("sequences"));
        let mut huge_shape = sample().to_bytes();
        huge_shape[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        huge_shape[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Hidden::from_bytes(&huge_shape).is_err());
        let mut zero_rows = sample().to_bytes();
        zero_rows[16..20].copy_from_slice(&0u32.to_le_bytes());
        assert!(Hidden::from_bytes(&zero_rows)
            .unwrap_err()
            .to_string()
            .contains("empty shape"));
        let mut ragged = sample().to_bytes();
        ragged[28..32].copy_from_slice(&4u32.to_le_bytes());
        assert!(Hidden::from_bytes(&ragged)
            .unwrap_err()
            .to_string()
            .contains("wide"));
    }
}
