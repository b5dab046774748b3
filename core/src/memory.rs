//! What compressing a tensor needs in memory, as a pure function of its plan, dtype and
//! shape, so that a worker can refuse a tensor it cannot hold before reading it and the
//! coordinator can lease a task only to a worker whose `--memory-limit` is enough.
//!
//! A worker streams every tensor in chunks of whole rows; a chunk costs [`CHUNK_COPIES`]
//! times its bytes and the worker itself [`BASE_BYTES`], so any pass that only streams fits
//! any limit that holds one row. Beyond that, a pass holds either the whole tensor at once
//! ([`TensorPlan::whole_tensor_pass`]) or a solver's state and result for the whole of the
//! job's passes over it ([`crate::stream::solver`]: low-rank factors, hashed buckets);
//! [`tensor_need`] says how much, or `None` when streaming is all it needs. The figures are
//! deliberately conservative estimates, checked by the process-level tests that read a
//! worker's peak resident memory.

use crate::codec::TensorPlan;
use crate::dtype::DType;
use crate::stream::solver::solver_bytes;

const MIB: u64 = 1024 * 1024;

/// What a worker holds whatever its task: the binary, the async runtime, rayon stacks,
/// the output shard's upload buffers (four parts of 8 MiB in flight) and the allocator's
/// slack.
pub const BASE_BYTES: u64 = 96 * MIB;

/// Bytes alive per byte of a chunk's input while it is compressed: the chunks queued by
/// the reader and the one being read (three), the chunk being compressed, its f32 decoding
/// (two per BF16 byte), the weights a structure stage keeps, the reconstruction in f32 and
/// in the input dtype, codes and the entropy-coded frame.
pub const CHUNK_COPIES: u64 = 12;

/// Bytes a pass that needs the whole tensor holds at once: per element the input, its f32
/// decoding and a second f32 copy, the reconstruction in the input dtype and the pass's own
/// state (codes, buckets, factors).
pub fn whole_tensor_bytes(dtype: DType, shape: &[u64]) -> u64 {
    let elements = shape.iter().fold(1u64, |acc, &d| acc.saturating_mul(d));
    elements.saturating_mul(2 * dtype.size_bytes() as u64 + 12)
}

/// The memory a tensor's pass needs besides streamed chunks, and which pass needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryNeed {
    /// Bytes of memory a worker needs for the tensor, [`BASE_BYTES`] included.
    pub bytes: u64,
    /// The pass that needs it (`"lowrank rank 64"`).
    pub pass: String,
    /// True when the pass holds the whole tensor at once (not a streamed solver's state).
    pub whole_tensor: bool,
}

/// What compressing a tensor of `dtype` and `shape` under `plan` needs beyond streaming its
/// chunks, or `None` when streaming chunks of whole rows is all it needs.
pub fn tensor_need(plan: &TensorPlan, dtype: DType, shape: &[u64]) -> Option<MemoryNeed> {
    if let Some(pass) = plan.whole_tensor_pass() {
        return Some(MemoryNeed {
            bytes: BASE_BYTES.saturating_add(whole_tensor_bytes(dtype, shape)),
            pass,
            whole_tensor: true,
        });
    }
    let state = solver_bytes(plan, shape);
    if state == 0 {
        return None;
    }
    let row_bytes = crate::quantize::row_len_of(shape).saturating_mul(dtype.size_bytes() as u64);
    let bytes = BASE_BYTES
        .saturating_add(state)
        .saturating_add(row_bytes.saturating_mul(CHUNK_COPIES));
    Some(MemoryNeed {
        bytes,
        pass: plan.describe(),
        whole_tensor: false,
    })
}

/// `bytes` for humans, in the units `--memory-limit` takes: `1.50 GB`, `512.0 MB`.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else {
        format!("{:.1} MB", b / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::Recipe;

    fn plan(pass: &str, shape: &[u64]) -> TensorPlan {
        let yaml = format!("passes:\n  - {pass}\n    targets: ['re:.*']\n");
        TensorPlan::for_tensor(&Recipe::from_yaml(&yaml).unwrap(), "w", DType::BF16, shape).unwrap()
    }

    #[test]
    fn streamed_passes_need_nothing_beyond_their_chunks() {
        let shape = [16384, 32768];
        for pass in [
            "quantize: { bits: 8, granularity: tensor }",
            "quantize: { method: hqq, bits: 4, granularity: tensor }",
            "codebook: { method: kmeans, bits: 4 }",
            "prune: { method: magnitude, sparsity: 0.5 }",
        ] {
            assert_eq!(
                tensor_need(&plan(pass, &shape), DType::BF16, &shape),
                None,
                "{pass}"
            );
        }
    }

    #[test]
    fn solvers_need_their_state_and_whole_tensor_passes_the_tensor() {
        let shape = [16384, 32768];
        // Rank 64 of a 1 GiB tensor: Q^T and a few l x n matrices, tens of MB.
        let low = tensor_need(&plan("lowrank: { rank: 64 }", &shape), DType::BF16, &shape).unwrap();
        assert!(!low.whole_tensor);
        assert!(low.bytes < 512_000_000, "{low:?}");
        assert!(low.bytes > BASE_BYTES + 74 * 32768 * 16, "{low:?}");
        // An energy target may need every column: as much as a full factorization.
        let energy = tensor_need(
            &plan("lowrank: { energy: 0.9 }", &shape),
            DType::BF16,
            &shape,
        )
        .unwrap();
        assert!(energy.bytes > 8_000_000_000, "{energy:?}");
        // 10 % buckets: 24 bytes each while they are summed.
        let hashed = tensor_need(
            &plan("hashed: { fraction: 0.1 }", &shape),
            DType::BF16,
            &shape,
        )
        .unwrap();
        let buckets = (16384u64 * 32768).div_ceil(10);
        assert!(hashed.bytes >= BASE_BYTES + buckets * 24, "{hashed:?}");
        assert!(hashed.pass.contains("hashed"), "{hashed:?}");
        // After row pruning low-rank factors the kept rows, held whole.
        let yaml = "passes:\n  - prune: { method: rows, fraction: 0.25 }\n    targets: ['re:.*']\n  - lowrank: { rank: 8 }\n    targets: ['re:.*']\n";
        let rows =
            TensorPlan::for_tensor(&Recipe::from_yaml(yaml).unwrap(), "w", DType::BF16, &shape)
                .unwrap();
        let whole = tensor_need(&rows, DType::BF16, &shape).unwrap();
        assert!(whole.whole_tensor);
        assert_eq!(whole.bytes, BASE_BYTES + 16384 * 32768 * 16);
    }
}
