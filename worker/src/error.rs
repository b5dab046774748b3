//! What can go wrong in a task, and whether another attempt (maybe elsewhere) may succeed:
//! storage and network trouble is retryable; corrupt input or an invalid recipe is not.

use shardpress_core::codec::CodecError;
use shardpress_core::recipe::RecipeError;
use shardpress_proto::convert::ConvertError;
use shardpress_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid recipe in lease: {0}")]
    Recipe(#[from] RecipeError),
    #[error("invalid lease: {0}")]
    Lease(#[from] ConvertError),
    #[error("invalid lease: {0}")]
    BadLease(String),
    #[error("tensor {tensor:?}: {source}")]
    Pipeline {
        tensor: String,
        #[source]
        source: CodecError,
    },
    #[error("tensor {tensor:?}: {reason}")]
    BadTensor { tensor: String, reason: String },
    #[error("compute failed on tensor {tensor:?}: {message}")]
    Compute { tensor: String, message: String },
    /// A lease naming a location outside the worker's `--allow` prefixes.
    #[error("refused: {0}")]
    Refused(String),
    #[error("task stopped: {0}")]
    Cancelled(String),
    #[error("tensor {tensor:?}: {pass} needs about {} in memory, over this worker's --memory-limit of {}; run it on a worker with --memory-limit of at least that, or use a pass that streams (see BENCHMARKS.md, peak memory per pass)", crate::memory::human_bytes(*needed), crate::memory::human_bytes(*limit))]
    OverMemoryLimit {
        tensor: String,
        pass: String,
        needed: u64,
        limit: u64,
    },
}

impl TaskError {
    pub fn is_retryable(&self) -> bool {
        match self {
            TaskError::Store(e) => e.is_retryable(),
            // Another worker may be allowed there.
            TaskError::Refused(_) => true,
            _ => false,
        }
    }
}
