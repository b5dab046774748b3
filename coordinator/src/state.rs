//! The coordinator's shared state: every job and worker behind one short-held lock, a wake-up
//! for long-polling workers, and a watch channel per job for progress streams.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shardpress_core::plan::PlannedTask;
use shardpress_proto::v1::task_lease::Kind;
use shardpress_proto::v1::{
    AssembleSlice, CompleteTaskRequest, CompressTask, FailTaskRequest, GlobalCut, JobState,
    JobStatus, MeasureTask, TaskLease, TaskRef, TensorSlice, TensorWork,
};
use shardpress_store::shared::SharedObject;
use shardpress_store::StoreLocation;
use tokio::sync::{watch, Notify};

use crate::job::{Job, JobSpec, Measured, Phase, Rejection, TaskSlot};
use crate::journal::{Journal, Recorded};
use crate::{CoordinatorConfig, CoordinatorError};

mod staging;
mod view;
use staging::discard_staged;
pub use staging::Accepting;
pub use view::{ClusterView, JobView, WorkerTask, WorkerView};

/// The outcome of [`Coordinator::check_session`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionCheck {
    Valid,
    /// Not registered here (a restarted coordinator): the worker registers again.
    UnknownWorker,
    /// Registered by another process.
    WrongSession,
}

struct JobEntry {
    job: Job,
    /// Where accepted results are recorded before they are acknowledged.
    journal: Journal,
    watch: watch::Sender<JobStatus>,
    /// The shared objects of a job that failed or was cancelled have been let go.
    abandoned: bool,
    /// The client that submitted it (`None`: an admin, or the coordinator's own `--resume`).
    owner: Option<String>,
}

struct WorkerInfo {
    name: String,
    /// The hash of the session secret given at registration (see [`Coordinator::check_session`]).
    session: blake3::Hash,
    last_seen: Instant,
    /// The worker's `--memory-limit` (`None`: unlimited).
    memory_limit: Option<u64>,
}

#[derive(Default)]
struct Inner {
    jobs: BTreeMap<String, JobEntry>,
    workers: HashMap<String, WorkerInfo>,
    next_worker: u64,
    next_job: u64,
    /// Output locations of jobs being submitted (see [`Coordinator::reserve_output`]).
    reserved_outputs: std::collections::HashSet<String>,
}

/// An output location held for a job being submitted; released when dropped.
pub struct OutputReservation<'a> {
    coordinator: &'a Coordinator,
    identity: String,
}

impl Drop for OutputReservation<'_> {
    fn drop(&mut self) {
        self.coordinator
            .lock()
            .reserved_outputs
            .remove(&self.identity);
    }
}

/// A job that failed or was cancelled lets go of its output's claim and of the files it was
/// writing: staging files are deleted (those of shared objects, and the uploads of killed
/// workers) and S3 multipart uploads aborted (in the background, best effort), so neither a
/// staging file nor an open upload (billed by S3 until aborted) outlives it.
fn abandon_shared_objects(job: &Job, journal: &Journal) {
    let mut objects: Vec<SharedObject> = Vec::new();
    let spec = &job.spec;
    objects.extend(spec.early_assembly.iter().map(|e| e.object.clone()));
    for (name, staging, _) in spec.in_place.iter().flat_map(|p| &p.files) {
        objects.push(SharedObject {
            name: name.clone(),
            staging: staging.clone(),
            upload_id: String::new(),
        });
    }
    for slot in &job.tasks {
        if let Some(a) = slot.assemble.as_ref() {
            if !a.staging.is_empty() || !a.upload_id.is_empty() {
                objects.push(SharedObject {
                    name: slot.plan.output_name.clone(),
                    staging: a.staging.clone(),
                    upload_id: a.upload_id.clone(),
                });
            }
        }
    }
    objects.sort_by(|a, b| {
        (&a.name, &a.staging, &a.upload_id).cmp(&(&b.name, &b.staging, &b.upload_id))
    });
    objects.dedup();
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    // The journal stays, to resume from; the output is free for another coordinator.
    let journal = journal.clone();
    runtime.spawn(async move {
        if let Err(e) = journal.release_claim().await {
            tracing::warn!("cannot release the output's claim: {e}");
        }
    });
    let (out_url, job_id) = (spec.out_url.clone(), job.id.clone());
    let attempts = Journal::attempts_of(&job_id);
    runtime.spawn(async move {
        let Ok(out) = StoreLocation::open(&out_url) else {
            return;
        };
        // What the attempts staged (uploads begun for them are aborted as they are given up,
        // and any left by a coordinator before this one here).
        out.remove_local_tree(&attempts);
        if let Err(e) = Journal::at(out.clone()).abort_recorded_uploads().await {
            tracing::warn!(job = %job_id, "cannot abort the uploads begun for the job: {e}");
        }
        for object in &objects {
            out.abort_shared(object).await;
        }
        tracing::info!(job = %job_id, objects = objects.len(), "let go of the unfinished files");
    });
}

impl Inner {
    fn live_workers(&self, ttl: Duration) -> u32 {
        self.live_limits(ttl).len() as u32
    }

    /// The `--memory-limit` of every live worker (`None`: unlimited).
    fn live_limits(&self, ttl: Duration) -> Vec<Option<u64>> {
        let now = Instant::now();
        self.workers
            .values()
            .filter(|w| now.duration_since(w.last_seen) < ttl * 3)
            .map(|w| w.memory_limit)
            .collect()
    }

    fn publish(&mut self, job_id: &str, ttl: Duration) {
        let workers = self.live_workers(ttl);
        if let Some(entry) = self.jobs.get_mut(job_id) {
            entry.watch.send_replace(entry.job.status(workers));
            let discarded = std::mem::take(&mut entry.job.discarded);
            if !discarded.is_empty() {
                discard_staged(&entry.job.spec.out_url, &entry.journal, discarded);
            }
            let failed = entry.job.state.is_terminal() && entry.job.state != JobState::Succeeded;
            if failed && !entry.abandoned {
                entry.abandoned = true;
                abandon_shared_objects(&entry.job, &entry.journal);
            }
        }
    }

    fn touch(&mut self, worker_id: &str) -> Result<(), CoordinatorError> {
        let worker = self
            .workers
            .get_mut(worker_id)
            .ok_or_else(|| CoordinatorError::UnknownWorker(worker_id.to_string()))?;
        worker.last_seen = Instant::now();
        Ok(())
    }
}

/// The coordinator's state and the operations the gRPC services delegate to.
pub struct Coordinator {
    config: CoordinatorConfig,
    /// When this coordinator started (seconds since the epoch, base 36).
    epoch: String,
    inner: Mutex<Inner>,
    task_ready: Notify,
    /// Counters of events, incremented where they happen (see [`crate::metrics`]).
    pub metrics: crate::metrics::Metrics,
}

/// A job as its driver sees it between two steps.
pub struct Snapshot {
    pub spec: JobSpec,
    pub tasks: Vec<TaskSlot>,
    /// The step whose tasks are done.
    pub phase: Phase,
    pub started: Instant,
    pub retries: u32,
}

/// Result of a completion.
pub enum Completion {
    Accepted,
    Rejected(Rejection),
}

impl Coordinator {
    pub fn new(config: CoordinatorConfig) -> Arc<Self> {
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        Arc::new(Self {
            config,
            epoch: base36(seconds),
            inner: Mutex::new(Inner::default()),
            task_ready: Notify::new(),
            metrics: crate::metrics::Metrics::new(),
        })
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug; the state is still consistent
        // because every mutation is a single assignment sequence, so recover the guard.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a worker with its `--memory-limit` (`None`: unlimited), which decides the
    /// tasks it is leased (see [`crate::routing`]).
    /// Registers a worker; returns its id and the session secret that must come with every
    /// later call about it.
    pub fn register_worker(&self, name: &str, memory_limit: Option<u64>) -> (String, String) {
        let session: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut inner = self.lock();
        inner.next_worker += 1;
        // The start time in the id keeps the ids of a restarted coordinator from repeating
        // those its workers had before (they register again).
        let id = format!("w{}.{}-{}", inner.next_worker, self.epoch, name);
        inner.workers.insert(
            id.clone(),
            WorkerInfo {
                name: name.to_string(),
                session: blake3::hash(session.as_bytes()),
                last_seen: Instant::now(),
                memory_limit,
            },
        );
        tracing::info!(worker = %id, memory_limit, "worker registered");
        (id, session)
    }

    /// Whether `session` is the secret `worker_id` was registered with: a worker id (shown
    /// in job statuses) is not enough to act for that worker.
    pub fn check_session(&self, worker_id: &str, session: Option<&str>) -> SessionCheck {
        let inner = self.lock();
        let Some(worker) = inner.workers.get(worker_id) else {
            return SessionCheck::UnknownWorker;
        };
        match session.map(|s| blake3::hash(s.as_bytes())) {
            Some(hash) if hash == worker.session => SessionCheck::Valid,
            _ => SessionCheck::WrongSession,
        }
    }

    /// Reserves the output location `identity` (see `StoreLocation::identity`) for a job
    /// being submitted: refused while another submission or an unfinished job has it. The
    /// reservation ends when dropped; by then the job, if inserted, holds the location.
    pub fn reserve_output(
        &self,
        identity: &str,
    ) -> Result<OutputReservation<'_>, CoordinatorError> {
        let mut inner = self.lock();
        let running = inner
            .jobs
            .values()
            .find(|e| !e.job.state.is_terminal() && e.job.spec.out_identity == identity);
        if let Some(entry) = running {
            return Err(CoordinatorError::InvalidRequest(format!(
                "job {} is writing to {identity}; wait for it to end or choose another output",
                entry.job.id
            )));
        }
        if !inner.reserved_outputs.insert(identity.to_string()) {
            return Err(CoordinatorError::InvalidRequest(format!(
                "another job is being submitted to {identity}; choose another output"
            )));
        }
        Ok(OutputReservation {
            coordinator: self,
            identity: identity.to_string(),
        })
    }

    /// A new job id, unique to this coordinator and unlikely to repeat across restarts.
    pub fn new_job_id(&self) -> String {
        let mut inner = self.lock();
        inner.next_job += 1;
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        format!("job-{millis:x}-{}", inner.next_job)
    }

    /// Adds a planned job (replacing an ended one of the same id, resumed) with the results
    /// an earlier run of it recorded; when those finish every task, the job starts
    /// `Finalizing` (its driver's turn).
    pub fn insert_job(
        &self,
        id: &str,
        spec: JobSpec,
        plan: Vec<PlannedTask>,
        journal: Journal,
        restored: Vec<Recorded>,
        owner: Option<String>,
    ) {
        let mut inner = self.lock();
        let mut job = Job::new(id.to_string(), spec, plan, Instant::now());
        for recorded in restored {
            job.restore(recorded);
        }
        if job.tasks_done() == job.tasks.len() {
            job.finish(JobState::Finalizing, String::new());
        }
        let (watch, _) = watch::channel(job.status(0));
        let entry = JobEntry {
            job,
            journal,
            watch,
            abandoned: false,
            owner,
        };
        inner.jobs.insert(id.to_string(), entry);
        inner.publish(id, self.config.lease_ttl);
        drop(inner);
        self.task_ready.notify_waiters();
    }

    /// Waits up to `wait` for a task and leases it to `worker_id`.
    pub async fn acquire(
        &self,
        worker_id: &str,
        wait: Duration,
    ) -> Result<Option<TaskLease>, CoordinatorError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.task_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(lease) = self.try_lease(worker_id)? {
                if let Some(lease) = self.stage(lease).await {
                    return Ok(Some(lease));
                }
                continue;
            }
            // A task waiting out a failure becomes leasable without anyone notifying.
            let retry = self.next_retry().map(tokio::time::Instant::from_std);
            let wake = retry.map_or(deadline, |at| at.min(deadline));
            if tokio::time::timeout_at(wake, notified).await.is_err() && wake == deadline {
                return Ok(None);
            }
        }
    }

    fn next_retry(&self) -> Option<Instant> {
        let inner = self.lock();
        inner.jobs.values().filter_map(|e| e.job.next_retry()).min()
    }

    fn try_lease(&self, worker_id: &str) -> Result<Option<TaskLease>, CoordinatorError> {
        let ttl = self.config.lease_ttl;
        let mut inner = self.lock();
        inner.touch(worker_id)?;
        let now = Instant::now();
        let limit = inner.workers.get(worker_id).and_then(|w| w.memory_limit);
        let mut leased = None;
        for entry in inner.jobs.values_mut() {
            if let Some(index) = entry.job.lease_next_within(worker_id, limit, ttl, now) {
                leased = Some((entry.job.id.clone(), lease_for(&entry.job, index, ttl)));
                break;
            }
        }
        let Some((job_id, lease)) = leased else {
            return Ok(None);
        };
        self.metrics.task_leased();
        inner.publish(&job_id, ttl);
        tracing::info!(job = %job_id, task = lease.task_index, attempt = lease.attempt,
            worker = %worker_id, "task leased");
        Ok(Some(lease))
    }

    pub fn heartbeat(&self, task: &TaskRef, bytes_done: u64) -> Result<(), Rejection> {
        let ttl = self.config.lease_ttl;
        let mut inner = self.lock();
        let _ = inner.touch(&task.worker_id);
        let entry = inner
            .jobs
            .get_mut(&task.job_id)
            .ok_or(Rejection::NoSuchTask)?;
        entry.job.heartbeat(
            task.task_index,
            task.attempt,
            &task.worker_id,
            bytes_done,
            ttl,
            Instant::now(),
        )?;
        inner.publish(&task.job_id, ttl);
        Ok(())
    }

    pub fn complete(&self, report: CompleteTaskRequest) -> Completion {
        let task = report.task.clone().unwrap_or_default();
        let mut inner = self.lock();
        let _ = inner.touch(&task.worker_id);
        let Some(entry) = inner.jobs.get_mut(&task.job_id) else {
            return Completion::Rejected(Rejection::NoSuchTask);
        };
        let result = entry.job.complete(
            task.task_index,
            task.attempt,
            &task.worker_id,
            report,
            Instant::now(),
        );
        let completion = match result {
            // The step's last task: the job's driver takes over.
            Ok(true) => {
                entry.job.finish(JobState::Finalizing, String::new());
                Completion::Accepted
            }
            Ok(false) => Completion::Accepted,
            Err(rejection) => Completion::Rejected(rejection),
        };
        if let Completion::Accepted = completion {
            inner.count_completion(&self.metrics, &task);
        }
        inner.publish(&task.job_id, self.config.lease_ttl);
        drop(inner);
        // A completion may have queued slices of an archive assembled early.
        self.task_ready.notify_waiters();
        completion
    }

    pub fn fail(&self, request: &FailTaskRequest) -> Result<(), Rejection> {
        let task = request.task.clone().unwrap_or_default();
        let mut inner = self.lock();
        let entry = inner
            .jobs
            .get_mut(&task.job_id)
            .ok_or(Rejection::NoSuchTask)?;
        if request.worker_leaving {
            entry
                .job
                .release(task.task_index, task.attempt, &task.worker_id)?;
        } else {
            let job_failed = entry.job.fail(
                task.task_index,
                task.attempt,
                &task.worker_id,
                &format!("failed on worker {}: {}", task.worker_id, request.message),
                request.retryable,
                self.config.max_attempts,
                Some(Instant::now()),
            )?;
            self.metrics.task_failed(!job_failed);
        }
        inner.publish(&task.job_id, self.config.lease_ttl);
        drop(inner);
        self.task_ready.notify_waiters();
        Ok(())
    }

    pub fn status(&self, job_id: &str) -> Result<JobStatus, CoordinatorError> {
        let inner = self.lock();
        let entry = inner
            .jobs
            .get(job_id)
            .ok_or_else(|| CoordinatorError::UnknownJob(job_id.to_string()))?;
        Ok(entry.job.status(inner.live_workers(self.config.lease_ttl)))
    }

    /// Every job's status, newest first.
    /// The jobs whose owner `visible` accepts, newest first.
    pub fn list_jobs(&self, visible: impl Fn(Option<&str>) -> bool) -> Vec<JobStatus> {
        let inner = self.lock();
        let workers = inner.live_workers(self.config.lease_ttl);
        let mut jobs: Vec<(Instant, JobStatus)> = (inner.jobs.values())
            .filter(|e| visible(e.owner.as_deref()))
            .map(|e| (e.job.started, e.job.status(workers)))
            .collect();
        jobs.sort_by_key(|(started, _)| std::cmp::Reverse(*started));
        jobs.into_iter().map(|(_, status)| status).collect()
    }

    /// The client that submitted `job_id` (`None`: an admin).
    pub fn job_owner(&self, job_id: &str) -> Result<Option<String>, CoordinatorError> {
        let inner = self.lock();
        let entry = inner
            .jobs
            .get(job_id)
            .ok_or_else(|| CoordinatorError::UnknownJob(job_id.to_string()))?;
        Ok(entry.owner.clone())
    }

    pub fn watch(&self, job_id: &str) -> Result<watch::Receiver<JobStatus>, CoordinatorError> {
        let inner = self.lock();
        let entry = inner
            .jobs
            .get(job_id)
            .ok_or_else(|| CoordinatorError::UnknownJob(job_id.to_string()))?;
        Ok(entry.watch.subscribe())
    }

    /// Moves a job to `state` with `message` (and the report, when there is one).
    pub fn set_outcome(&self, job_id: &str, state: JobState, message: String, report_json: String) {
        let mut inner = self.lock();
        if let Some(entry) = inner.jobs.get_mut(job_id) {
            entry.job.finish(state, message);
            if !report_json.is_empty() {
                entry.job.report_json = report_json;
            }
        }
        inner.publish(job_id, self.config.lease_ttl);
    }

    /// The report of a job that has ended (empty when it failed before one was written);
    /// `None` while it runs.
    pub fn report(&self, job_id: &str) -> Result<Option<String>, CoordinatorError> {
        let inner = self.lock();
        let entry = inner
            .jobs
            .get(job_id)
            .ok_or_else(|| CoordinatorError::UnknownJob(job_id.to_string()))?;
        let job = &entry.job;
        Ok(job.state.is_terminal().then(|| job.report_json.clone()))
    }

    /// Cancels a running job; a job already finalizing or finished is left as it is.
    pub fn cancel(&self, job_id: &str) -> Result<JobStatus, CoordinatorError> {
        // Checked and changed under one lock: a job whose last task completes meanwhile is
        // finalizing and ends succeeded (with its manifest), never "cancelled" beside one.
        let mut inner = self.lock();
        let entry = inner
            .jobs
            .get_mut(job_id)
            .ok_or_else(|| CoordinatorError::UnknownJob(job_id.to_string()))?;
        if entry.job.state == JobState::Running {
            entry
                .job
                .finish(JobState::Cancelled, "cancelled by request".into());
        }
        inner.publish(job_id, self.config.lease_ttl);
        drop(inner);
        self.status(job_id)
    }

    /// Starts the assembly step of an `.spz` or GGUF job (see [`Job::start_assembly`]).
    pub fn start_assembly(&self, job_id: &str, tasks: Vec<(PlannedTask, AssembleSlice)>) {
        let mut inner = self.lock();
        if let Some(entry) = inner.jobs.get_mut(job_id) {
            entry.job.start_assembly(tasks);
        }
        inner.publish(job_id, self.config.lease_ttl);
        drop(inner);
        self.task_ready.notify_waiters();
    }

    /// Moves a job whose tasks are all done to its last step (see [`Job::start_finalizing`]).
    pub fn start_finalizing(&self, job_id: &str) {
        let mut inner = self.lock();
        if let Some(entry) = inner.jobs.get_mut(job_id) {
            entry.job.start_finalizing();
        }
    }

    /// Ends the measuring round and requeues every task to compress with what was measured
    /// (but those an earlier run of the job finished; when that is all of them, the job's
    /// driver goes on at once).
    pub fn start_compression(
        &self,
        job_id: &str,
        measured: Measured,
        recipe: Option<shardpress_core::recipe::Recipe>,
    ) {
        let mut inner = self.lock();
        if let Some(entry) = inner.jobs.get_mut(job_id) {
            entry.job.start_compression(measured, recipe);
            // An earlier run of the job compressed every task already.
            if entry.job.tasks_done() == entry.job.tasks.len() {
                entry.job.finish(JobState::Finalizing, String::new());
            }
        }
        inner.publish(job_id, self.config.lease_ttl);
        drop(inner);
        self.task_ready.notify_waiters();
    }

    /// Ends the calibration round: the compressing round's tasks replace its steps (but
    /// those an earlier run of the job finished).
    pub fn start_compression_calibrated(
        &self,
        job_id: &str,
        outcome: crate::calibration::CalibrationOutcome,
    ) {
        let mut inner = self.lock();
        if let Some(entry) = inner.jobs.get_mut(job_id) {
            entry.job.start_compression_calibrated(outcome);
            discard_staged(
                &entry.job.spec.out_url,
                &entry.journal,
                std::mem::take(&mut entry.job.discarded),
            );
            if entry.job.tasks_done() == entry.job.tasks.len() {
                entry.job.finish(JobState::Finalizing, String::new());
            }
        }
        inner.publish(job_id, self.config.lease_ttl);
        drop(inner);
        self.task_ready.notify_waiters();
    }

    /// A copy of what the job's driver needs (see [`Snapshot`]).
    pub fn snapshot(&self, job_id: &str) -> Option<Snapshot> {
        let inner = self.lock();
        let job = &inner.jobs.get(job_id)?.job;
        Some(Snapshot {
            spec: job.spec.clone(),
            tasks: job.tasks.clone(),
            phase: job.phase,
            started: job.started,
            retries: job.retries,
        })
    }

    /// Worker names by id, for the report.
    pub fn worker_names(&self) -> HashMap<String, String> {
        let inner = self.lock();
        inner
            .workers
            .iter()
            .map(|(id, w)| (id.clone(), w.name.clone()))
            .collect()
    }

    /// Renews the output claims of the running jobs three times per claim TTL.
    pub fn spawn_claim_keeper(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(self.config.claim_ttl / 3);
            loop {
                ticker.tick().await;
                let running: Vec<(Journal, String)> = {
                    let inner = self.lock();
                    (inner.jobs.values())
                        .filter(|e| !e.job.state.is_terminal())
                        .map(|e| (e.journal.clone(), e.job.id.clone()))
                        .collect()
                };
                for (journal, job_id) in running {
                    if let Err(e) = journal.claim(&self.config.claimant, &job_id).await {
                        tracing::warn!(job = %job_id, "cannot renew the output's claim: {e}");
                    }
                }
            }
        })
    }

    /// Periodically returns expired leases to the queue and checks that every pending task
    /// fits some live worker's memory.
    pub fn spawn_lease_reaper(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let period = (self.config.lease_ttl / 4).max(Duration::from_millis(50));
            let mut ticker = tokio::time::interval(period);
            loop {
                ticker.tick().await;
                self.expire_leases();
            }
        })
    }

    fn expire_leases(&self) {
        let ttl = self.config.lease_ttl;
        let now = Instant::now();
        let mut inner = self.lock();
        let mut changed = Vec::new();
        let limits = inner.live_limits(ttl);
        let timeout = self.config.unassignable_timeout;
        for (id, entry) in inner.jobs.iter_mut() {
            let retries = entry.job.retries;
            let expired = entry.job.expire_leases(now, self.config.max_attempts);
            let retried = entry.job.retries - retries;
            self.metrics.leases_expired(expired as u64, retried.into());
            let stuck = entry.job.check_unassignable(&limits, now, timeout);
            if expired > 0 || stuck {
                changed.push(id.clone());
            }
        }
        for id in &changed {
            inner.publish(id, ttl);
        }
        drop(inner);
        if !changed.is_empty() {
            self.task_ready.notify_waiters();
        }
    }
}

fn base36(mut n: u64) -> String {
    let mut digits = Vec::new();
    loop {
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

fn lease_for(job: &Job, index: usize, ttl: Duration) -> TaskLease {
    let slot = &job.tasks[index];
    let (spec, measured) = (&job.spec, job.spec.measured.as_ref());
    let work = || TensorWork {
        recipe_yaml: spec.recipe.source_yaml.clone(),
        tensors: (slot.plan.tensors.iter())
            .map(|t| {
                let mut slice = TensorSlice::from(t);
                slice.solved = spec.solved_object(&t.name).unwrap_or_default().to_string();
                slice.share_candidate = measured
                    .and_then(|m| m.share_candidates.get(&t.name))
                    .map(|a| Box::new(TensorSlice::from(a)));
                slice
            })
            .collect(),
        format: spec.format.as_str().to_string(),
        model_facts: spec.facts.to_json(),
    };
    // The measuring round's sensitivity steps follow its measuring tasks.
    let sensitivity = match job.phase {
        Phase::Measuring => spec.sensitivity_steps(),
        _ => &[],
    };
    let first_sensitivity = job.tasks.len().saturating_sub(sensitivity.len());
    let kind = match (&slot.assemble, job.phase) {
        (Some(assemble), _) => Kind::Assemble(assemble.clone()),
        (None, Phase::Calibrating) => {
            let step = (spec.calibration.as_ref()).and_then(|c| c.plan.steps.get(index));
            Kind::Calibrate(step.map_or_else(Default::default, |s| calibrate_task(job, index, s)))
        }
        (None, Phase::Measuring) if index >= first_sensitivity => Kind::Calibrate(calibrate_task(
            job,
            index,
            &sensitivity[index - first_sensitivity],
        )),
        (None, Phase::Measuring) => Kind::Measure(MeasureTask {
            work: Some(work()),
            magnitudes: spec.recipe.global_sparsity().is_some(),
            sketches: spec.recipe.share_cosine.is_some(),
            precision: spec.recipe.needs_precision_choice(),
        }),
        (None, _) => Kind::Compress(CompressTask {
            work: Some(work()),
            global_cut: measured.and_then(|m| m.cut).map(|c| GlobalCut {
                bin: c.bin,
                tie_fraction: c.tie_fraction,
            }),
            share_cosine: spec.recipe.share_cosine.unwrap_or_default(),
            write_at: (spec.in_place.as_ref()).and_then(|p| p.outputs.get(index).cloned()),
        }),
    };
    TaskLease {
        job_id: job.id.clone(),
        task_index: index as u32,
        attempt: slot.attempt,
        lease_ttl_ms: ttl.as_millis() as u32,
        model_url: spec.model_url.clone(),
        out_url: spec.out_url.clone(),
        output_name: slot.plan.output_name.clone(),
        staged: None,
        kind: Some(kind),
    }
}

/// The lease of the job's task `index`, calibration step `step` (see
/// [`crate::calibration`]).
fn calibrate_task(
    job: &Job,
    index: usize,
    step: &crate::calibration::CalibStep,
) -> shardpress_proto::v1::CalibrateTask {
    use crate::calibration::StepKind;
    use shardpress_proto::v1::calibrate_task::Step;
    let spec = &job.spec;
    let Some(calibration) = spec.calibration.as_ref() else {
        return Default::default();
    };
    let kind = match step.kind {
        StepKind::Embed => Step::Embed,
        StepKind::Stats => Step::Stats,
        StepKind::Solve => Step::Solve,
        StepKind::Forward => Step::Forward,
        StepKind::Eval => Step::Eval,
        StepKind::Sensitivity => Step::Sensitivity,
    };
    shardpress_proto::v1::CalibrateTask {
        step: kind as i32,
        work: Some(TensorWork {
            recipe_yaml: spec.recipe.source_yaml.clone(),
            tensors: (job.tasks[index].plan.tensors.iter())
                .map(TensorSlice::from)
                .collect(),
            format: spec.format.as_str().to_string(),
            model_facts: spec.facts.to_json(),
        }),
        config_json: calibration.config_json.clone(),
        model_tensors: calibration.model_tensors.clone(),
        layer: step.layer,
        inputs: step.inputs.clone(),
        sequences: (step.sequences.iter())
            .map(|ids| shardpress_proto::v1::TokenSequence { ids: ids.clone() })
            .collect(),
        compressed: step.compressed,
        solved: step.solved.iter().cloned().collect(),
        group: step.group,
        scored_on: step.scored_on.clone(),
    }
}
