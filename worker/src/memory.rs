//! The worker's memory budget (`--memory-limit`): how large a chunk of a tensor may be so
//! that a task stays under the limit, and what a pass that needs a whole tensor at once
//! would hold, so that a tensor which cannot fit is refused with its name and the bytes it
//! needs instead of the worker being killed for running out of memory.
//!
//! The figures are deliberately conservative estimates, checked by the process-level test
//! that reads the worker's peak resident memory (`tests/cluster.rs`).

use shardpress_core::codec::TensorPlan;
pub use shardpress_core::memory::human_bytes;
use shardpress_core::memory::{tensor_need, whole_tensor_bytes};
pub use shardpress_core::memory::{BASE_BYTES, CHUNK_COPIES};
use shardpress_core::plan::PlannedTensor;

use crate::TaskError;

/// The memory a worker may use for one task (`None`: unbounded, chunks of the configured
/// size).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryBudget {
    pub limit: Option<u64>,
}

impl MemoryBudget {
    /// The largest chunk (bytes of input) under the limit: the configured chunk size, capped
    /// so that [`CHUNK_COPIES`] copies fit beside [`BASE_BYTES`]; at least 64 KiB.
    pub fn chunk_bytes(&self, configured: usize) -> usize {
        match self.limit {
            None => configured,
            Some(limit) => {
                let cap = limit.saturating_sub(BASE_BYTES) / CHUNK_COPIES;
                configured.min(cap.max(64 * 1024) as usize)
            }
        }
    }

    /// Refuses `tensor` when a chunk of `chunk_bytes` of it (a whole row at least) cannot
    /// fit under the limit; `pass` says what needs that much.
    pub fn check_chunk(
        &self,
        tensor: &PlannedTensor,
        row_bytes: u64,
        chunk_bytes: u64,
    ) -> Result<(), TaskError> {
        let needed =
            BASE_BYTES.saturating_add(chunk_bytes.max(row_bytes).saturating_mul(CHUNK_COPIES));
        self.check(tensor, "one row", needed)
    }

    /// Refuses `tensor` when `pass`, which needs the whole tensor in memory, cannot fit.
    pub fn check_whole_tensor(&self, tensor: &PlannedTensor, pass: &str) -> Result<(), TaskError> {
        let needed = BASE_BYTES.saturating_add(whole_tensor_bytes(tensor.dtype, &tensor.shape));
        self.check(tensor, pass, needed)
    }

    /// Refuses `tensor` when the state of `plan`'s solver (low-rank factors, hashed buckets;
    /// see [`shardpress_core::memory`]) and one row's chunk cannot fit; otherwise returns the
    /// chunk size (at most `configured`) that fits beside that state.
    pub fn solver_chunk_bytes(
        &self,
        tensor: &PlannedTensor,
        plan: &TensorPlan,
        configured: usize,
    ) -> Result<usize, TaskError> {
        let Some(need) = tensor_need(plan, tensor.dtype, &tensor.shape) else {
            return Ok(self.chunk_bytes(configured));
        };
        self.check(tensor, &need.pass, need.bytes)?;
        let beside = MemoryBudget {
            limit: self
                .limit
                .map(|limit| limit.saturating_sub(need.bytes.saturating_sub(BASE_BYTES))),
        };
        Ok(beside.chunk_bytes(configured))
    }

    fn check(&self, tensor: &PlannedTensor, pass: &str, needed: u64) -> Result<(), TaskError> {
        match self.limit {
            Some(limit) if needed > limit => Err(TaskError::OverMemoryLimit {
                tensor: tensor.name.clone(),
                pass: pass.to_string(),
                needed,
                limit,
            }),
            _ => Ok(()),
        }
    }
}

/// This process's peak resident memory so far (`VmHWM`, Linux only; `None` elsewhere),
/// logged when a task completes so that a limit can be checked against what was used.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn the_chunk_size_is_capped_by_the_limit_and_never_raised() {
        let unbounded = MemoryBudget { limit: None };
        assert_eq!(unbounded.chunk_bytes(16 * MIB as usize), 16 * MIB as usize);
        let half_gib = MemoryBudget {
            limit: Some(512 * MIB),
        };
        let cap = ((512 - 96) * MIB / CHUNK_COPIES) as usize;
        assert_eq!(half_gib.chunk_bytes(usize::MAX), cap);
        assert_eq!(half_gib.chunk_bytes(MIB as usize), MIB as usize);
        let tiny = MemoryBudget { limit: Some(MIB) };
        assert_eq!(tiny.chunk_bytes(usize::MAX), 64 * 1024);
    }

    fn tensor(rows: u64, cols: u64) -> PlannedTensor {
        PlannedTensor {
            name: "model.w".into(),
            source_file: "model.safetensors".into(),
            dtype: shardpress_core::dtype::DType::BF16,
            shape: vec![rows, cols],
            data_start: 0,
            data_end: rows * cols * 2,
            scales: None,
            packed: None,
        }
    }

    fn plan(pass: &str, t: &PlannedTensor) -> TensorPlan {
        let yaml = format!("passes:\n  - {pass}\n    targets: ['re:.*']\n");
        let recipe = shardpress_core::recipe::Recipe::from_yaml(&yaml).unwrap();
        TensorPlan::for_tensor(&recipe, &t.name, t.dtype, &t.shape).unwrap()
    }

    #[test]
    fn a_solver_state_over_the_limit_is_refused_by_name_and_one_under_it_shrinks_chunks() {
        let t = tensor(16384, 32768);
        let limit = MemoryBudget {
            limit: Some(512_000_000),
        };
        // 10 % hashed buckets of a 1 GiB tensor: 1.3 GB of sums.
        let err = limit
            .solver_chunk_bytes(&t, &plan("hashed: { fraction: 0.1 }", &t), 16 << 20)
            .unwrap_err();
        let message = err.to_string();
        for needle in ["model.w", "hashed", "--memory-limit", "512.0 MB"] {
            assert!(message.contains(needle), "{needle}: {message}");
        }
        // Rank 64: fits, with chunks smaller than beside nothing.
        let low = plan("lowrank: { rank: 64 }", &t);
        let chunk = limit.solver_chunk_bytes(&t, &low, usize::MAX).unwrap();
        assert!(chunk < limit.chunk_bytes(usize::MAX), "{chunk}");
        assert!(chunk > 1 << 20, "{chunk}");
        // Without a limit nothing is refused or shrunk.
        let unbounded = MemoryBudget { limit: None };
        assert_eq!(
            unbounded.solver_chunk_bytes(&t, &low, 16 << 20).unwrap(),
            16 << 20
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512_000_000), "512.0 MB");
        assert_eq!(human_bytes(1_500_000_000), "1.50 GB");
    }
}
