//! The shardpress wire protocol: gRPC services and messages generated from
//! `proto/shardpress.proto` (codegen in `build.rs`, protoc vendored), re-exported once here, plus
//! [`convert`], the one place where wire types and core types meet.
//!
//! gRPC is the control plane only. Tensor bytes never travel in these messages.

/// Generated code for package `shardpress.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("shardpress.v1");
}

pub mod convert;

pub use v1::job_service_client::JobServiceClient;
pub use v1::job_service_server::{JobService, JobServiceServer};
pub use v1::worker_service_client::WorkerServiceClient;
pub use v1::worker_service_server::{WorkerService, WorkerServiceServer};
