//! Coordinator errors and their single mapping onto gRPC status codes.

use shardpress_core::plan::PlanError;
use shardpress_core::recipe::RecipeError;
use shardpress_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("invalid recipe: {0}")]
    Recipe(#[from] RecipeError),
    #[error("cannot plan the job: {0}")]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("unknown job {0:?}")]
    UnknownJob(String),
    #[error("unknown worker {0:?}: register first")]
    UnknownWorker(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl From<CoordinatorError> for tonic::Status {
    fn from(err: CoordinatorError) -> Self {
        let message = err.to_string();
        match err {
            CoordinatorError::Recipe(_)
            | CoordinatorError::Plan(_)
            | CoordinatorError::InvalidRequest(_) => tonic::Status::invalid_argument(message),
            CoordinatorError::Store(StoreError::NotFound { .. }) => {
                tonic::Status::not_found(message)
            }
            CoordinatorError::Store(e) if e.is_retryable() => tonic::Status::unavailable(message),
            CoordinatorError::Store(_) => tonic::Status::invalid_argument(message),
            CoordinatorError::UnknownJob(_) | CoordinatorError::UnknownWorker(_) => {
                tonic::Status::not_found(message)
            }
        }
    }
}
