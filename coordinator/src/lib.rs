//! The shardpress coordinator: the control plane of a compression job.
//!
//! It plans a job from the model's safetensors headers (two range reads per file, never the
//! data), leases tasks to workers that pull them, fences stale attempts, and when every task is
//! done reassembles the model (index, config and tokenizer files), writes `report.json` (and
//! `report.html`), applies the recipe's accuracy gates and finally writes `manifest.json`, the
//! commit point.
//!
//! Layout:
//! - [`job`]: a job's tasks and lease table, a plain state machine with no I/O;
//! - [`journal`]: each job's finished tasks recorded in its output, so a restarted coordinator
//!   resumes it;
//! - [`state`]: every job and worker behind one lock, plus the wake-ups for long-polls;
//! - [`submit`]: recipe validation and planning from headers;
//! - [`service`]: the two gRPC services, thin: decode, delegate, encode;
//! - [`finalize`]: reassembly, gates and the manifest;
//! - [`assembly`]: an `.spz` archive or GGUF file assembled in slices by several workers;
//! - [`gguf`]: reading the config and tokenizer a GGUF file's head is made from;
//! - [`report`]: the report's types and aggregation; [`report_html`]: the same as a page;
//! - [`http`]: the HTTP port (`--http-listen`): Prometheus [`metrics`] and a status page;
//! - [`share`]: tensors stored once in an `.spz` archive because their records are identical;
//! - [`error`]: the error enum and its one mapping to `tonic::Status`.

pub mod archive;
pub mod assembly;
pub mod driver;
pub mod error;
pub mod finalize;
pub mod gguf;
pub mod http;
pub mod job;
pub mod journal;
pub mod metrics;
pub mod report;
pub mod report_html;
pub mod routing;
pub mod service;
pub mod share;
pub mod state;
pub mod submit;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shardpress_proto::{JobServiceServer, WorkerServiceServer, MAX_MESSAGE_BYTES};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;

pub use error::CoordinatorError;
pub use state::Coordinator;

/// Coordinator settings, with defaults suited to a laptop run.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// A lease not renewed by a heartbeat within this time returns its task to the queue.
    pub lease_ttl: Duration,
    /// Task byte budget used when a submission does not set one.
    pub default_task_budget: u64,
    /// How many times a task may fail (lease loss included) before the job fails.
    pub max_attempts: u32,
    /// Fault injection for tests: finalizing pauses this long before it writes the report and
    /// manifest (a window in which to kill the coordinator).
    pub finalize_delay: Duration,
    /// This coordinator, as the claims of the outputs it writes name it (see [`journal`]).
    pub claimant: journal::Claimant,
    /// How long a claim that is no longer renewed keeps other coordinators off an output.
    pub claim_ttl: Duration,
    /// A job fails when one of its tasks needs more memory than every live worker's
    /// `--memory-limit` for this long (see [`routing`]).
    pub unassignable_timeout: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(15),
            default_task_budget: 64 * 1024 * 1024,
            max_attempts: 5,
            finalize_delay: Duration::ZERO,
            claimant: journal::Claimant::this_process("?"),
            claim_ttl: Duration::from_secs(30),
            unassignable_timeout: Duration::from_secs(60),
        }
    }
}

/// Serves both gRPC services (and the standard health service) on `listener` until `shutdown`
/// resolves.
pub async fn serve(
    listener: TcpListener,
    coordinator: Arc<Coordinator>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<JobServiceServer<service::JobApi>>()
        .await;
    let reaper = coordinator.clone().spawn_lease_reaper();
    let claims = coordinator.clone().spawn_claim_keeper();
    // TCP_NODELAY on every accepted connection: with Nagle's algorithm, HTTP/2's separate
    // small writes of one response wait for the peer's delayed ACK (~40 ms per task round
    // trip on Linux loopback, measured in the per-task timeline of report.json).
    let incoming = TcpListenerStream::new(listener).map(|stream| {
        let stream = stream?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(stream)
    });
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(
            JobServiceServer::new(service::JobApi::new(coordinator.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            WorkerServiceServer::new(service::WorkerApi::new(coordinator))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    reaper.abort();
    claims.abort();
    result
}

/// Binds `addr` (port 0 picks a free port) and returns the listener and its real address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
