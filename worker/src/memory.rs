//! The worker's memory budget (`--memory-limit`): how large a chunk of a tensor may be so
//! that a task stays under the limit, and what a pass that needs a whole tensor at once
//! would hold, so that a tensor which cannot fit is refused with its name and the bytes it
//! needs instead of the worker being killed for running out of memory.
//!
//! The figures are deliberately conservative estimates, checked by the process-level test
//! that reads the worker's peak resident memory (`tests/cluster.rs`).

use shardpress_core::plan::PlannedTensor;

use crate::TaskError;

const MIB: u64 = 1024 * 1024;

/// What the worker holds whatever its task: the binary, the async runtime, rayon stacks,
/// the output shard's upload buffers (four parts of 8 MiB in flight) and the allocator's
/// slack.
pub const BASE_BYTES: u64 = 96 * MIB;

/// Bytes alive per byte of a chunk's input while it is compressed: the chunks queued by
/// the reader and the one being read (three), the chunk being compressed, its f32 decoding
/// (two per BF16 byte), the weights a structure stage keeps, the reconstruction in f32 and
/// in the input dtype, codes and the entropy-coded frame.
pub const CHUNK_COPIES: u64 = 12;

/// Bytes per element a pass that needs the whole tensor holds at once: the input, its f32
/// decoding and a second f32 copy, the reconstruction in the input dtype and the pass's own
/// state (codes, buckets, factors).
pub fn whole_tensor_bytes(tensor: &PlannedTensor) -> u64 {
    let elements: u64 = tensor.shape.iter().product();
    let size = tensor.dtype.size_bytes() as u64;
    elements.saturating_mul(2 * size + 12)
}

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
        let needed = BASE_BYTES.saturating_add(whole_tensor_bytes(tensor));
        self.check(tensor, pass, needed)
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

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512_000_000), "512.0 MB");
        assert_eq!(human_bytes(1_500_000_000), "1.50 GB");
    }
}
