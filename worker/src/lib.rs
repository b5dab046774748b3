//! The shardpress worker: pulls task leases from the coordinator, range-reads its tensors from
//! object storage, runs the recipe's passes from core on a rayon pool (never on the async
//! runtime), streams one output shard per task back to object storage and reports sizes,
//! checksums and per-tensor metrics. Heartbeats keep the lease while it works. Told to shut
//! down (SIGTERM, a scale-down), it stops taking leases, stops its running task at the next
//! chunk and gives the lease back, to be leased again at once elsewhere.
//!
//! Layout: [`cpu`] (the bridge to the rayon pool), [`task`] (one lease, chunk by chunk),
//! [`memory`] (the `--memory-limit` budget: chunk size and what cannot fit), [`error`] (what can fail and whether a retry elsewhere may help), and the lease loop here.

pub mod assemble;
pub mod calibrate;
pub mod cpu;
pub mod error;
pub mod memory;
pub mod task;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardpress_proto::transport::{AuthChannel, ClientSecurity, Credentials};
use shardpress_proto::v1::task_lease::Kind;
use shardpress_proto::v1::{
    AcquireTaskRequest, FailTaskRequest, HeartbeatRequest, RegisterWorkerRequest, TaskLease,
    TaskRef,
};
use shardpress_proto::WorkerServiceClient;
use shardpress_store::allow::AllowList;

pub use error::TaskError;

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Coordinator address, e.g. `http://127.0.0.1:50051` (`https://` with TLS).
    pub coordinator_url: String,
    /// TLS settings and the token sent with every call.
    pub security: ClientSecurity,
    /// The model and output locations this worker reads and writes, whatever its coordinator
    /// asks (`--allow`); `None`: any.
    pub allow: Option<AllowList>,
    /// Name shown in reports and logs.
    pub name: String,
    /// Threads for compression passes (0 = all cores).
    pub threads: usize,
    /// Largest slice of a tensor held in memory at once (bytes of input).
    pub chunk_bytes: usize,
    /// Bound on the memory a task holds (`--memory-limit`): caps the chunk size, and a
    /// tensor that cannot fit under it is refused by name. `None`: no bound.
    pub memory_limit: Option<u64>,
    /// Give up when the coordinator has been unreachable this long.
    pub unreachable_timeout: Duration,
    /// Exit (successfully) once no task has come for this long (`--exit-when-idle`, for
    /// one-shot runs such as a Kubernetes Job); `None`: run until told to stop.
    pub exit_when_idle: Option<Duration>,
    /// Fault injection for tests: sleep this long after every chunk.
    pub delay_per_chunk: Duration,
    /// Fault injection for tests: pause this long before finishing each output, whatever
    /// happens to the lease meanwhile.
    pub stall_before_finish: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            coordinator_url: "http://127.0.0.1:50051".into(),
            security: ClientSecurity::default(),
            allow: None,
            name: "worker".into(),
            threads: 0,
            chunk_bytes: 16 * 1024 * 1024,
            memory_limit: None,
            unreachable_timeout: Duration::from_secs(600),
            exit_when_idle: None,
            delay_per_chunk: Duration::ZERO,
            stall_before_finish: Duration::ZERO,
        }
    }
}

/// Why the worker loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot reach the coordinator at {url} for {seconds}s: {message}")]
    Unreachable {
        url: String,
        seconds: u64,
        message: String,
    },
    #[error(transparent)]
    Transport(#[from] shardpress_proto::transport::TransportError),
    #[error("the coordinator refused this worker: {0}")]
    Refused(String),
    #[error("cannot start the compute pool: {0}")]
    Pool(String),
}

/// The worker service's client; its [`Credentials`] carry the token and, once registered,
/// the session.
type Client = WorkerServiceClient<AuthChannel>;

async fn connect(config: &WorkerConfig) -> Result<(Client, Credentials), WorkerError> {
    let url = &config.coordinator_url;
    let (channel, credentials) =
        shardpress_proto::transport::connect(url, &config.security, config.unreachable_timeout)
            .await
            .map_err(|e| match e {
                shardpress_proto::transport::TransportError::Unreachable { message, .. } => {
                    WorkerError::Unreachable {
                        url: url.clone(),
                        seconds: config.unreachable_timeout.as_secs(),
                        message,
                    }
                }
                other => other.into(),
            })?;
    let client = WorkerServiceClient::with_interceptor(channel, credentials.clone())
        .max_decoding_message_size(shardpress_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(shardpress_proto::MAX_MESSAGE_BYTES);
    Ok((client, credentials))
}

fn unreachable(config: &WorkerConfig, since: tokio::time::Instant, message: String) -> WorkerError {
    WorkerError::Unreachable {
        url: config.coordinator_url.clone(),
        seconds: since.elapsed().as_secs(),
        message,
    }
}

/// Registers with the coordinator and processes leases until `shutdown` resolves or the
/// coordinator stays unreachable past the configured timeout.
pub async fn run_worker(
    config: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WorkerError> {
    cpu::init_pool(config.threads).map_err(WorkerError::Pool)?;
    tokio::pin!(shutdown);
    let (mut client, credentials) = connect(&config).await?;
    let mut worker_id = register(&mut client, &credentials, &config).await?;
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut idle_since = tokio::time::Instant::now();
    loop {
        if let Some(limit) = config.exit_when_idle {
            if idle_since.elapsed() >= limit {
                tracing::info!(
                    idle_secs = limit.as_secs_f64(),
                    "no task came for --exit-when-idle; exiting"
                );
                return Ok(());
            }
        }
        let acquire = client.acquire_task(AcquireTaskRequest {
            worker_id: worker_id.clone(),
            // Long polls no longer than the idle limit, so that it is kept to.
            wait_ms: config
                .exit_when_idle
                .map_or(5_000, |idle| idle.as_millis().clamp(100, 5_000) as u32),
        });
        let response = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            response = acquire => response,
        };
        match response {
            Ok(response) => {
                failing_since = None;
                if let Some(lease) = response.into_inner().lease {
                    let shutdown = shutdown.as_mut();
                    if run_lease(&mut client, &config, &worker_id, lease, shutdown).await {
                        return Ok(());
                    }
                    idle_since = tokio::time::Instant::now();
                }
            }
            // A restarted coordinator does not know this worker: register again and go on.
            Err(status) if status.code() == tonic::Code::NotFound => {
                tracing::warn!(error = %status.message(),
                    "the coordinator does not know this worker (restarted?); registering again");
                worker_id = register(&mut client, &credentials, &config).await?;
            }
            Err(status) => {
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= config.unreachable_timeout {
                    return Err(unreachable(&config, since, status.message().into()));
                }
                tracing::warn!(error = %status.message(), "coordinator call failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Registers with the coordinator, retrying while it is unreachable (a coordinator being
/// restarted) up to the configured timeout; returns the worker id it gave and sends the
/// session it gave with every later call. A refused token ends the worker at once.
async fn register(
    client: &mut Client,
    credentials: &Credentials,
    config: &WorkerConfig,
) -> Result<String, WorkerError> {
    let started = tokio::time::Instant::now();
    loop {
        let request = RegisterWorkerRequest {
            name: config.name.clone(),
            threads: rayon::current_num_threads() as u32,
            version: env!("CARGO_PKG_VERSION").into(),
            memory_limit_bytes: config.memory_limit.unwrap_or(0),
        };
        match client.register_worker(request).await {
            Ok(response) => {
                let response = response.into_inner();
                credentials.set_session(&response.session);
                let worker_id = response.worker_id;
                tracing::info!(worker = %worker_id, coordinator = %config.coordinator_url, "registered");
                return Ok(worker_id);
            }
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) =>
            {
                return Err(WorkerError::Refused(status.message().to_string()))
            }
            Err(status) if started.elapsed() >= config.unreachable_timeout => {
                return Err(unreachable(config, started, status.message().into()))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// How long a worker told to shut down waits for its running task to stop (at its next
/// chunk) before it gives the lease back anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs one lease to its end and returns false; if `shutdown` resolves first, stops the
/// task at its next chunk, gives the lease back (re-leased at once elsewhere) and returns
/// true.
async fn run_lease(
    client: &mut Client,
    config: &WorkerConfig,
    worker_id: &str,
    lease: TaskLease,
    shutdown: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> bool {
    let cancel = Arc::new(AtomicBool::new(false));
    let leaving = Arc::new(AtomicBool::new(false));
    let task = lease_task(
        client,
        config,
        worker_id,
        lease,
        cancel.clone(),
        leaving.clone(),
    );
    tokio::pin!(task);
    tokio::select! {
        () = &mut task => return false,
        () = shutdown => {}
    }
    tracing::warn!("shutting down: stopping the running task and giving its lease back");
    leaving.store(true, Ordering::Relaxed);
    cancel.store(true, Ordering::Relaxed);
    if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
        tracing::warn!("the task did not stop within {SHUTDOWN_GRACE:?}; its lease will expire");
    }
    true
}

/// One lease with a heartbeat beside it, and its outcome reported.
async fn lease_task(
    client: &mut Client,
    config: &WorkerConfig,
    worker_id: &str,
    lease: TaskLease,
    cancelled: Arc<AtomicBool>,
    leaving: Arc<AtomicBool>,
) {
    let task_ref = TaskRef {
        job_id: lease.job_id.clone(),
        task_index: lease.task_index,
        attempt: lease.attempt,
        worker_id: worker_id.to_string(),
    };
    let kind = match &lease.kind {
        Some(Kind::Compress(_)) => "compress",
        Some(Kind::Measure(_)) => "measure",
        Some(Kind::Assemble(_)) => "assemble",
        Some(Kind::Calibrate(_)) => "calibrate",
        None => "none",
    };
    tracing::info!(job = %lease.job_id, task = lease.task_index, attempt = lease.attempt,
        kind, output = %lease.output_name, "task acquired");
    let progress = Arc::new(AtomicU64::new(0));
    let heartbeat = tokio::spawn(heartbeat_loop(
        client.clone(),
        task_ref.clone(),
        Duration::from_millis(lease.lease_ttl_ms.max(300).into()),
        progress.clone(),
        cancelled.clone(),
    ));
    let budget = memory::MemoryBudget {
        limit: config.memory_limit,
    };
    let ctx = task::TaskContext {
        progress,
        cancelled,
        chunk_bytes: budget.chunk_bytes(config.chunk_bytes),
        budget,
        delay_per_chunk: config.delay_per_chunk,
        stall_before_finish: config.stall_before_finish,
    };
    let result = match permitted(config, &lease) {
        Ok(()) => task::execute(&lease, &ctx).await,
        Err(refusal) => Err(refusal),
    };
    heartbeat.abort();
    match result {
        Ok(mut report) => {
            report.task = Some(task_ref);
            match client.complete_task(report).await {
                Ok(r) if r.get_ref().accepted => {
                    let peak_rss_mb = memory::peak_rss_bytes().map(|b| b as f64 / 1e6);
                    tracing::info!(task = lease.task_index, peak_rss_mb, "task completed");
                    if let Some(Kind::Assemble(slice)) = &lease.kind {
                        assemble::delete_consumed(&lease, slice).await;
                    }
                }
                Ok(r) => {
                    tracing::warn!(task = lease.task_index, reason = %r.get_ref().reason,
                        "result not accepted");
                    discard_staged(&lease).await;
                }
                Err(e) => tracing::warn!(task = lease.task_index, error = %e.message(),
                    "could not report the result; the lease will expire and the task rerun"),
            }
        }
        Err(TaskError::Cancelled(_)) if leaving.load(Ordering::Relaxed) => {
            let request = FailTaskRequest {
                task: Some(task_ref),
                message: "the worker is shutting down".into(),
                retryable: true,
                worker_leaving: true,
            };
            if let Err(e) = client.fail_task(request).await {
                tracing::warn!(error = %e.message(), "could not give the lease back; it will expire");
            }
        }
        Err(TaskError::Cancelled(reason)) => {
            tracing::warn!(task = lease.task_index, %reason, "task abandoned")
        }
        Err(error) => {
            tracing::error!(task = lease.task_index, %error, retryable = error.is_retryable(),
                "task failed");
            let request = FailTaskRequest {
                task: Some(task_ref),
                message: error.to_string(),
                retryable: error.is_retryable(),
                worker_leaving: false,
            };
            if let Err(e) = client.fail_task(request).await {
                tracing::warn!(error = %e.message(), "could not report the failure");
            }
        }
    }
}

/// Refuses a lease whose model or output lies outside the worker's `--allow` prefixes: a
/// coordinator (or something posing as one) cannot make it read or write elsewhere.
fn permitted(config: &WorkerConfig, lease: &TaskLease) -> Result<(), TaskError> {
    let Some(allow) = &config.allow else {
        return Ok(());
    };
    for (what, url) in [("model", &lease.model_url), ("output", &lease.out_url)] {
        if !url.is_empty() {
            allow
                .check(what, url)
                .map_err(|e| TaskError::Refused(format!("worker {}: {e}", config.name)))?;
        }
    }
    Ok(())
}

/// Deletes the staging object of an attempt whose result was refused (a stale attempt: the
/// coordinator let it go, maybe long ago). An upload is the coordinator's to abort.
async fn discard_staged(lease: &TaskLease) {
    let Some(staged) = &lease.staged else {
        return;
    };
    if !staged.upload_id.is_empty() {
        return;
    }
    if let Ok(out) = shardpress_store::StoreLocation::open(&lease.out_url) {
        let staged = shardpress_store::staged::StagedOutput {
            name: lease.output_name.clone(),
            staging: staged.staging.clone(),
            upload_id: String::new(),
        };
        out.discard_staged(&staged).await;
        // The folders of a job that has ended are not left behind either.
        let mut dir = std::path::Path::new(&staged.staging).parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            out.remove_empty_dir(&d.to_string_lossy());
            dir = d.parent();
        }
    }
}

/// Renews the lease every third of its `ttl`. A worker whose heartbeats have not reached
/// the coordinator for a whole `ttl` (a dead or partitioned coordinator) must assume the task
/// was given to another worker: it stops the task, so that it never commits an output of a
/// lease it may no longer hold.
async fn heartbeat_loop(
    mut client: Client,
    task: TaskRef,
    ttl: Duration,
    progress: Arc<AtomicU64>,
    cancelled: Arc<AtomicBool>,
) {
    let mut ticker = tokio::time::interval(ttl / 3);
    ticker.tick().await;
    let mut renewed = tokio::time::Instant::now();
    loop {
        ticker.tick().await;
        let request = HeartbeatRequest {
            task: Some(task.clone()),
            bytes_done: progress.load(Ordering::Relaxed),
        };
        match client.heartbeat(request).await {
            Ok(response) if !response.get_ref().keep_going => {
                tracing::warn!(reason = %response.get_ref().reason, "lease lost; stopping task");
                cancelled.store(true, Ordering::Relaxed);
                return;
            }
            Ok(_) => renewed = tokio::time::Instant::now(),
            Err(e) if renewed.elapsed() >= ttl => {
                tracing::warn!(error = %e.message(),
                    "no heartbeat reached the coordinator for a whole lease; stopping task");
                cancelled.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => tracing::warn!(error = %e.message(), "heartbeat failed"),
        }
    }
}
