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
//! - [`service`]: the two gRPC services, thin: decode, check the caller, delegate, encode;
//! - [`auth`]: tokens, roles and `--allow` prefixes, checked in front of both services;
//! - [`finalize`]: reassembly, gates and the manifest;
//! - [`assembly`]: an `.spz` archive or GGUF file assembled in slices by several workers;
//! - [`gguf`]: reading the config and tokenizer a GGUF file's head is made from;
//! - [`report`]: the report's types and aggregation; [`report_html`]: the same as a page;
//! - [`http`]: the HTTP port (`--http-listen`): Prometheus [`metrics`] and a status page;
//! - [`share`]: tensors stored once in an `.spz` archive because their records are identical;
//! - [`signing`]: Ed25519 key files and the signature of `manifest.json`;
//! - [`verify`]: an output checked against its manifest and signature;
//! - [`error`]: the error enum and its one mapping to `tonic::Status`.

pub mod archive;
pub mod assembly;
pub mod auth;
pub mod calibration;
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
pub mod signing;
pub mod state;
pub mod submit;
pub mod verify;

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
    /// Signs each job's `manifest.json` (as `manifest.json.sig`, written before it).
    pub signing_key: Option<Arc<signing::SigningKey>>,
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
            signing_key: None,
        }
    }
}

/// How the coordinator's gRPC port is guarded.
#[derive(Debug, Default)]
pub struct ServerSecurity {
    pub auth: auth::AuthConfig,
    pub tls: Option<ServerTls>,
}

/// The coordinator's certificate and key (PEM) and, for mutual TLS, the CA whose certificates
/// clients and workers must present.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// Serves both gRPC services (and the standard health service, which needs no token) on
/// `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    coordinator: Arc<Coordinator>,
    security: ServerSecurity,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let jobs_gate = auth::Gate::new(&security.auth, auth::Service::Jobs);
    let workers_gate = auth::Gate::new(&security.auth, auth::Service::Workers);
    let auth = Arc::new(security.auth);
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
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = security.tls {
        let mut config = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
        );
        if let Some(ca) = &tls.client_ca_pem {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        server = server.tls_config(config)?;
    }
    let jobs = JobServiceServer::new(service::JobApi::new(coordinator.clone(), auth))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let workers = WorkerServiceServer::new(service::WorkerApi::new(coordinator))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let result = server
        .add_service(health_service)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            jobs, jobs_gate,
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            workers,
            workers_gate,
        ))
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
