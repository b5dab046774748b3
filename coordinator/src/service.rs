//! The two gRPC services. Handlers only decode, check the caller (see [`crate::auth`]: a
//! client's own jobs, a worker's own session), delegate to [`Coordinator`] and encode.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use shardpress_proto::v1::{
    AcquireTaskRequest, AcquireTaskResponse, CancelJobRequest, CompleteTaskRequest,
    CompleteTaskResponse, FailTaskRequest, FailTaskResponse, GetJobRequest, HeartbeatRequest,
    HeartbeatResponse, JobStatus, ListJobsRequest, ListJobsResponse, RegisterWorkerRequest,
    RegisterWorkerResponse, ReportChunk, SubmitJobRequest, SubmitJobResponse,
};
use shardpress_proto::{JobService, WorkerService};
use shardpress_store::staged::StagedOutput;
use shardpress_store::{StoreError, StoreLocation};
use tonic::{Request, Response, Status};

use crate::auth::{caller, session, AuthConfig, Caller};
use crate::state::{Accepting, Completion, SessionCheck};
use crate::Coordinator;

/// Longest long-poll a worker may ask for.
const MAX_ACQUIRE_WAIT: Duration = Duration::from_secs(30);

pub struct JobApi {
    coordinator: Arc<Coordinator>,
    auth: Arc<AuthConfig>,
}

impl JobApi {
    pub fn new(coordinator: Arc<Coordinator>, auth: Arc<AuthConfig>) -> Self {
        Self { coordinator, auth }
    }

    /// Refuses a client a job another client submitted.
    fn authorize(&self, caller: &Caller, job_id: &str) -> Result<(), Status> {
        let owner = self.coordinator.job_owner(job_id)?;
        if caller.may_access(owner.as_deref()) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "job {job_id} was submitted by another client"
        )))
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<JobStatus, Status>> + Send>>;
type ReportStream = Pin<Box<dyn Stream<Item = Result<ReportChunk, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        let caller = caller(&request);
        let request = request.into_inner();
        self.auth
            .check_locations(&caller, &request.model_url, &request.out_url)?;
        for data in [&request.calibration_url, &request.eval_url] {
            if !data.is_empty() {
                self.auth.check_locations(&caller, data, &request.out_url)?;
            }
        }
        let submitted = crate::submit::submit(&self.coordinator, request, caller.owner()).await?;
        Ok(Response::new(SubmitJobResponse {
            job_id: submitted.job_id,
            task_count: submitted.task_count,
            total_bytes: submitted.total_bytes,
            warnings: submitted.warnings,
            resumed_tasks: submitted.resumed_tasks,
        }))
    }

    async fn get_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<JobStatus>, Status> {
        self.authorize(&caller(&request), &request.get_ref().job_id)?;
        Ok(Response::new(
            self.coordinator.status(&request.get_ref().job_id)?,
        ))
    }

    type WatchJobStream = StatusStream;

    async fn watch_job(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<StatusStream>, Status> {
        self.authorize(&caller(&request), &request.get_ref().job_id)?;
        let receiver = self.coordinator.watch(&request.get_ref().job_id)?;
        // The current status first, then every change; the stream ends after the first
        // terminal status.
        let stream = futures::stream::unfold(
            (receiver, true, false),
            |(mut receiver, first, done)| async move {
                if done || (!first && receiver.changed().await.is_err()) {
                    return None;
                }
                let status = receiver.borrow_and_update().clone();
                let done = status.is_terminal();
                Some((Ok(status), (receiver, false, done)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<JobStatus>, Status> {
        self.authorize(&caller(&request), &request.get_ref().job_id)?;
        Ok(Response::new(
            self.coordinator.cancel(&request.get_ref().job_id)?,
        ))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let caller = caller(&request);
        Ok(Response::new(ListJobsResponse {
            jobs: self.coordinator.list_jobs(|owner| caller.may_access(owner)),
        }))
    }

    type GetReportStream = ReportStream;

    async fn get_report(
        &self,
        request: Request<GetJobRequest>,
    ) -> Result<Response<ReportStream>, Status> {
        let job_id = &request.get_ref().job_id;
        self.authorize(&caller(&request), job_id)?;
        let report = self.coordinator.report(job_id)?.ok_or_else(|| {
            Status::failed_precondition(format!(
                "job {job_id} has not ended; its report is written when it does"
            ))
        })?;
        let report = bytes::Bytes::from(report);
        let chunks: Vec<Result<ReportChunk, Status>> = (0..report.len())
            .step_by(shardpress_proto::REPORT_CHUNK_BYTES)
            .map(|at| {
                let end = (at + shardpress_proto::REPORT_CHUNK_BYTES).min(report.len());
                Ok(ReportChunk {
                    data: report.slice(at..end).to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
}

/// Commits an accepted attempt's staged output under its final name.
async fn commit(
    accepting: &Accepting,
    staged: &StagedOutput,
    request: &CompleteTaskRequest,
) -> Result<(), StoreError> {
    let out = StoreLocation::open(&accepting.out_url)?;
    out.commit_staged(staged, &request.upload_parts, request.output_bytes)
        .await?;
    accepting.journal.forget_upload(staged).await;
    Ok(())
}

pub struct WorkerApi {
    coordinator: Arc<Coordinator>,
}

impl WorkerApi {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }

    /// Whether the call about `worker_id` comes from the process that registered it.
    fn session<T>(&self, request: &Request<T>, worker_id: &str) -> SessionCheck {
        self.coordinator.check_session(worker_id, session(request))
    }
}

/// The refusal of a call with another process's worker id.
fn wrong_session(worker_id: &str) -> String {
    format!("worker {worker_id} was registered by another process (its session does not match)")
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        let request = request.get_ref();
        let limit = (request.memory_limit_bytes > 0).then_some(request.memory_limit_bytes);
        let (worker_id, session) = self.coordinator.register_worker(&request.name, limit);
        Ok(Response::new(RegisterWorkerResponse {
            worker_id,
            lease_ttl_ms: self.coordinator.config().lease_ttl.as_millis() as u32,
            session,
        }))
    }

    async fn acquire_task(
        &self,
        request: Request<AcquireTaskRequest>,
    ) -> Result<Response<AcquireTaskResponse>, Status> {
        if self.session(&request, &request.get_ref().worker_id) == SessionCheck::WrongSession {
            return Err(Status::permission_denied(wrong_session(
                &request.get_ref().worker_id,
            )));
        }
        let request = request.into_inner();
        let wait = Duration::from_millis(request.wait_ms.into()).min(MAX_ACQUIRE_WAIT);
        let lease = self.coordinator.acquire(&request.worker_id, wait).await?;
        Ok(Response::new(AcquireTaskResponse { lease }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let task = request.get_ref().task.clone().unwrap_or_default();
        if self.session(&request, &task.worker_id) == SessionCheck::WrongSession {
            return Ok(Response::new(HeartbeatResponse {
                keep_going: false,
                reason: wrong_session(&task.worker_id),
            }));
        }
        let request = request.into_inner();
        let response = match self.coordinator.heartbeat(&task, request.bytes_done) {
            Ok(()) => HeartbeatResponse {
                keep_going: true,
                reason: String::new(),
            },
            Err(rejection) => HeartbeatResponse {
                keep_going: false,
                reason: rejection.to_string(),
            },
        };
        Ok(Response::new(response))
    }

    async fn complete_task(
        &self,
        request: Request<CompleteTaskRequest>,
    ) -> Result<Response<CompleteTaskResponse>, Status> {
        let task = request.get_ref().task.clone().unwrap_or_default();
        if self.session(&request, &task.worker_id) != SessionCheck::Valid {
            // Unknown workers hold no lease here either (a restarted coordinator).
            return Ok(Response::new(CompleteTaskResponse {
                accepted: false,
                reason: wrong_session(&task.worker_id),
            }));
        }
        let request = request.into_inner();
        if let Some(accepting) = self.coordinator.accepting(&task) {
            // The attempt's output appears under its final name only now, and only for the
            // attempt that holds the lease.
            if let Some(staged) = &accepting.staged {
                if let Err(e) = commit(&accepting, staged, &request).await {
                    let reason = format!("cannot commit {}: {e}", staged.name);
                    tracing::warn!(job = %task.job_id, task = task.task_index, "{reason}");
                    let failure = FailTaskRequest {
                        task: Some(task.clone()),
                        message: reason.clone(),
                        retryable: true,
                        worker_leaving: false,
                    };
                    let _ = self.coordinator.fail(&failure);
                    return Ok(Response::new(CompleteTaskResponse {
                        accepted: false,
                        reason,
                    }));
                }
            }
            // Recorded before it is acknowledged: a coordinator killed from here on keeps it.
            if let Some(round) = accepting.round {
                let mut recorded = request.clone();
                if let Some(t) = recorded.task.as_mut() {
                    t.worker_id = accepting.worker_name.clone();
                }
                (accepting.journal)
                    .record(round, task.task_index, &recorded)
                    .await
                    .map_err(|e| {
                        tracing::error!(job = %task.job_id, task = task.task_index, "cannot journal a result: {e}");
                        Status::unavailable(format!("cannot record the result in the job's journal: {e}"))
                    })?;
            }
        }
        let response = match self.coordinator.complete(request) {
            Completion::Accepted => CompleteTaskResponse {
                accepted: true,
                reason: String::new(),
            },
            Completion::Rejected(rejection) => CompleteTaskResponse {
                accepted: false,
                reason: rejection.to_string(),
            },
        };
        Ok(Response::new(response))
    }

    async fn fail_task(
        &self,
        request: Request<FailTaskRequest>,
    ) -> Result<Response<FailTaskResponse>, Status> {
        let worker_id = request.get_ref().task.as_ref().map(|t| t.worker_id.clone());
        if self.session(&request, &worker_id.unwrap_or_default()) != SessionCheck::Valid {
            tracing::info!("ignored a failure report of a worker not registered by its sender");
            return Ok(Response::new(FailTaskResponse {}));
        }
        let request = request.into_inner();
        if let Err(rejection) = self.coordinator.fail(&request) {
            tracing::info!(%rejection, "ignored a failure report");
        }
        Ok(Response::new(FailTaskResponse {}))
    }
}
