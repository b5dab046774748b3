//! The shardpress wire protocol: gRPC services and messages generated from
//! `proto/shardpress.proto` (codegen in `build.rs`, protoc vendored), re-exported once here, plus
//! [`convert`], the one place where wire types and core types meet, and [`transport`], how
//! clients and workers connect (TLS, tokens).
//!
//! gRPC is the control plane only. Tensor bytes never travel in these messages.

/// Generated code for package `shardpress.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("shardpress.v1");
}

pub mod convert;
pub mod transport;

/// The largest gRPC message either side accepts (tonic's default is 4 MiB). Messages are kept
/// small by design (reports are streamed in [`REPORT_CHUNK_BYTES`] pieces); this is the
/// backstop for a lease or a result of a task with very many tensors.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// The size of the pieces `GetReport` streams a report in.
pub const REPORT_CHUNK_BYTES: usize = 1 << 20;

pub use v1::job_service_client::JobServiceClient;
pub use v1::job_service_server::{JobService, JobServiceServer};
pub use v1::worker_service_client::WorkerServiceClient;
pub use v1::worker_service_server::{WorkerService, WorkerServiceServer};
