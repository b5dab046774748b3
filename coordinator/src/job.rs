//! One job's tasks and their lease table: a plain state machine over `Instant`s, no I/O, so the
//! lease rules (expiry, fencing by attempt, retry limits) are unit-tested directly.

use std::time::{Duration, Instant};

use std::collections::HashMap;

use shardpress_core::format::ModelFacts;
use shardpress_core::plan::{PlannedTask, PlannedTensor};
use shardpress_core::prune::GlobalCut;
use shardpress_core::recipe::{OutputFormat, Recipe};
use shardpress_proto::v1::{AssembleSlice, CompleteTaskRequest, JobState, JobStatus};

use shardpress_store::staged::StagedOutput;

use crate::journal::{Recorded, Round};

/// What the job was asked to do.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub model_url: String,
    pub out_url: String,
    /// Where the output really is (`StoreLocation::identity`): one job at a time writes there.
    pub out_identity: String,
    pub recipe: Recipe,
    pub task_budget: u64,
    pub format: OutputFormat,
    /// What plans need to know about the whole model (sent to workers with every lease).
    pub facts: ModelFacts,
    /// GGUF: the largest file written before the output is split into llama.cpp's
    /// `-0000k-of-0000n` files (`None`: one file).
    pub max_file_bytes: Option<u64>,
    /// `.spz` and GGUF: the length of the slices each assembled file is written in at once.
    pub assembly_slice_bytes: u64,
    /// GGUF on a local filesystem: the files the tasks write in place.
    pub in_place: Option<crate::assembly::InPlace>,
    /// `.spz` on a local filesystem: the archive, assembled while the tasks run.
    pub early_assembly: Option<crate::assembly::EarlyAssembly>,
    /// A recipe with a global magnitude prune or near-identical sharing runs every task
    /// twice: first measuring (magnitude histograms, sketches), then compressing with what
    /// the coordinator concluded from the measurements, kept here.
    pub measured: Option<Measured>,
}

/// What the measuring round concluded.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// Wall time from the job's start to the end of the round.
    pub seconds: f64,
    /// Global magnitude prune: the cut of the merged histograms, the weights it covers and
    /// the fraction of them it drops.
    pub cut: Option<GlobalCut>,
    pub pruned_params: u64,
    pub pruned_fraction: f64,
    /// Near-identical sharing: tensor name -> the earlier tensor it may be stored as (its
    /// worker checks the exact cosine).
    pub share_candidates: HashMap<String, PlannedTensor>,
    /// The round's tasks as the report lists them (the compressing round reuses the slots).
    pub tasks: Vec<crate::report::TaskReport>,
}

impl JobSpec {
    /// True while the job's tasks only measure (see [`JobSpec::measured`]).
    pub fn measuring(&self) -> bool {
        let needs = self.recipe.global_sparsity().is_some() || self.recipe.share_cosine.is_some();
        needs && self.measured.is_none()
    }
}

/// The steps of a job. Workers run the tasks of the first three; when a step's last task is
/// done the job is `Finalizing` (the coordinator's turn) until its driver
/// ([`crate::driver`]) has done the coordinator's part and started the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Every task measures (magnitude histograms, tensor sketches) and writes nothing: the
    /// first round of a job with a global prune or near-identical sharing.
    Measuring,
    /// Every task compresses its tensors into its output (an archive assembled early also
    /// gets its first slices, queued as the tasks before them finish).
    Compressing,
    /// Workers copy the tasks' parts into the `.spz` or GGUF files.
    Assembling,
    /// The coordinator writes the index, companion files, report and, last, the manifest.
    Finalizing,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::Measuring => "measuring",
            Phase::Compressing => "compressing",
            Phase::Assembling => "assembling",
            Phase::Finalizing => "finalizing",
        }
    }
}

/// Where one task stands.
#[derive(Debug, Clone)]
pub enum TaskStatus {
    Pending,
    Leased { worker: String, deadline: Instant },
    Done,
}

#[derive(Debug, Clone)]
pub struct TaskSlot {
    pub plan: PlannedTask,
    pub status: TaskStatus,
    /// Attempt number of the latest lease (0 = never leased).
    pub attempt: u32,
    /// Leases lost or failed so far.
    pub failures: u32,
    pub progress_bytes: u64,
    /// When the latest attempt was leased, in seconds since the job started.
    pub leased_at_seconds: f64,
    /// A failed task is not leased again before this (see [`retry_delay`]).
    pub retry_at: Option<Instant>,
    pub result: Option<TaskOutcome>,
    /// Set on the assembly slices of an `.spz` or GGUF file, which copy (or hash) parts of
    /// the other tasks' output into it.
    pub assemble: Option<AssembleSlice>,
    /// Where the current attempt writes its output, committed when its result is accepted
    /// (see `shardpress_store::staged`); `None` for tasks that write in place or nothing.
    pub staged: Option<StagedOutput>,
    /// What the task needs in memory beyond streamed chunks (see [`crate::routing`]).
    pub need: Option<crate::routing::TaskNeed>,
}

impl TaskSlot {
    /// A task not yet leased.
    fn pending(plan: PlannedTask, assemble: Option<AssembleSlice>) -> TaskSlot {
        TaskSlot {
            plan,
            status: TaskStatus::Pending,
            attempt: 0,
            failures: 0,
            progress_bytes: 0,
            leased_at_seconds: 0.0,
            retry_at: None,
            result: None,
            assemble,
            staged: None,
            need: None,
        }
    }

    fn leasable(&self, now: Instant) -> bool {
        matches!(self.status, TaskStatus::Pending) && self.retry_at.is_none_or(|at| at <= now)
    }
}

/// How long a task waits after its `failures`-th failed attempt: 250 ms doubling per failure
/// up to 8 s, plus up to half as much again (a jitter fixed by task and attempt, so that tasks
/// failing together, say on a storage outage, come back spread out).
pub fn retry_delay(task: u32, failures: u32) -> Duration {
    let base = Duration::from_millis(250) * 2u32.pow(failures.clamp(1, 6) - 1);
    let spread =
        (u64::from(task).wrapping_mul(0x9E37_79B9) ^ (u64::from(failures) * 0x85EB)) % 1000;
    base + base.mul_f64(spread as f64 / 2000.0)
}

/// A finished task: who did it and what it reported.
#[derive(Debug, Clone)]
pub struct TaskOutcome {
    pub worker: String,
    pub attempt: u32,
    /// When the coordinator accepted the result, in seconds since the job started.
    pub completed_at_seconds: f64,
    pub report: CompleteTaskRequest,
    /// Finished by an earlier run of the job, read back from its journal.
    pub restored: bool,
}

/// Why a completion or heartbeat was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    NoSuchTask,
    JobNotRunning(&'static str),
    StaleAttempt {
        current: u32,
        given: u32,
    },
    AlreadyDone,
    /// The attempt number is current but leased to another worker (a coordinator that was
    /// restarted leases attempt numbers again).
    OtherWorker(String),
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::NoSuchTask => write!(f, "no such task"),
            Rejection::JobNotRunning(state) => write!(f, "job is {state}"),
            Rejection::StaleAttempt { current, given } => {
                write!(
                    f,
                    "stale attempt {given}: the task was re-leased as attempt {current}"
                )
            }
            Rejection::AlreadyDone => write!(f, "task already completed"),
            Rejection::OtherWorker(holder) => {
                write!(f, "the task's lease is held by worker {holder}")
            }
        }
    }
}

#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub spec: JobSpec,
    pub tasks: Vec<TaskSlot>,
    /// The step the job is in; `state` says whether its tasks run (`Running`), the
    /// coordinator works (`Finalizing`) or the job ended.
    pub phase: Phase,
    pub state: JobState,
    pub message: String,
    pub started: Instant,
    pub retries: u32,
    pub report_json: String,
    /// Compressing results of an earlier run, restored once the measuring round ends.
    restored_later: Vec<Recorded>,
    /// Staged outputs of attempts given up, for the coordinator to delete or abort.
    pub discarded: Vec<StagedOutput>,
    /// Since when a task has needed more memory than any live worker has, and the message
    /// the job had before it said so.
    unassignable: Option<(Instant, String)>,
}

impl Job {
    pub fn new(id: String, spec: JobSpec, plan: Vec<PlannedTask>, now: Instant) -> Self {
        let tasks = plan
            .into_iter()
            .map(|plan| {
                let need = crate::routing::task_need(&spec, &plan);
                TaskSlot {
                    need,
                    ..TaskSlot::pending(plan, None)
                }
            })
            .collect();
        let (phase, message) = match spec.measuring() {
            true => (
                Phase::Measuring,
                "round 1 of 2: measuring (magnitudes, sketches)".to_string(),
            ),
            false => (Phase::Compressing, String::new()),
        };
        Self {
            id,
            spec,
            tasks,
            phase,
            state: JobState::Running,
            message,
            started: now,
            retries: 0,
            report_json: String::new(),
            restored_later: Vec::new(),
            discarded: Vec::new(),
            unassignable: None,
        }
    }

    /// Marks a task finished with the result an earlier run of this job recorded (see
    /// [`crate::journal`]); a compressing result of a job still measuring waits for
    /// [`Job::start_compression`].
    pub fn restore(&mut self, recorded: Recorded) {
        let round = match self.phase {
            Phase::Measuring => Round::Measure,
            _ => Round::Compress,
        };
        if recorded.round != round {
            if recorded.round == Round::Compress {
                self.restored_later.push(recorded);
            }
            return;
        }
        let Some(slot) = self.tasks.get_mut(recorded.task as usize) else {
            return;
        };
        if slot.assemble.is_some() || matches!(slot.status, TaskStatus::Done) {
            return;
        }
        let report = recorded.report;
        let task = report.task.clone().unwrap_or_default();
        slot.status = TaskStatus::Done;
        slot.progress_bytes = slot.plan.input_bytes;
        slot.attempt = slot.attempt.max(task.attempt);
        slot.result = Some(TaskOutcome {
            worker: task.worker_id,
            attempt: task.attempt,
            completed_at_seconds: 0.0,
            report,
            restored: true,
        });
        self.queue_early_slices();
    }

    /// Starts the assembly of an `.spz` or GGUF job whose compressing tasks are done: appends
    /// its assembly tasks (the slices of each output file) for workers to pick up.
    pub fn start_assembly(&mut self, tasks: Vec<(PlannedTask, AssembleSlice)>) {
        if self.state != JobState::Finalizing || self.phase != Phase::Compressing {
            return;
        }
        for (plan, assemble) in tasks {
            self.tasks.push(TaskSlot::pending(plan, Some(assemble)));
        }
        self.phase = Phase::Assembling;
        self.state = JobState::Running;
    }

    /// The coordinator writes what is left (index, companion files, report, manifest).
    pub fn start_finalizing(&mut self) {
        if self.state == JobState::Finalizing {
            self.phase = Phase::Finalizing;
        }
    }

    /// Ends the measuring round: every task runs again, now compressing with what was
    /// `measured` (attempt numbers go on, so a late report of the measuring round is
    /// refused as stale).
    pub fn start_compression(&mut self, measured: Measured) {
        if self.state != JobState::Finalizing || self.phase != Phase::Measuring {
            return;
        }
        self.spec.measured = Some(measured);
        self.phase = Phase::Compressing;
        self.message = "round 2 of 2: compressing".into();
        for slot in &mut self.tasks {
            slot.status = TaskStatus::Pending;
            slot.failures = 0;
            slot.progress_bytes = 0;
            slot.result = None;
        }
        self.state = JobState::Running;
        for recorded in std::mem::take(&mut self.restored_later) {
            self.restore(recorded);
        }
    }

    /// Leases the lowest-numbered pending assembly slice, else the lowest-numbered pending
    /// task, to `worker`, if the job is running.
    pub fn lease_next(&mut self, worker: &str, ttl: Duration, now: Instant) -> Option<usize> {
        self.lease_next_within(worker, None, ttl, now)
    }

    /// [`Self::lease_next`] for a worker with `memory_limit` (`None`: unlimited): tasks that
    /// need more memory are left to other workers (see [`crate::routing`]).
    pub fn lease_next_within(
        &mut self,
        worker: &str,
        memory_limit: Option<u64>,
        ttl: Duration,
        now: Instant,
    ) -> Option<usize> {
        if self.state != JobState::Running {
            return None;
        }
        let leasable =
            |t: &TaskSlot| t.leasable(now) && crate::routing::fits(t.need.as_ref(), memory_limit);
        // Assembly first: its parts are fresh in the page cache, and deleted once copied.
        let index = (self.tasks.iter())
            .position(|t| t.assemble.is_some() && leasable(t))
            .or_else(|| self.tasks.iter().position(leasable))?;
        let slot = &mut self.tasks[index];
        slot.retry_at = None;
        slot.attempt += 1;
        slot.progress_bytes = 0;
        slot.leased_at_seconds = now.saturating_duration_since(self.started).as_secs_f64();
        slot.status = TaskStatus::Leased {
            worker: worker.to_string(),
            deadline: now + ttl,
        };
        Some(index)
    }

    /// The slot of task `index` if `attempt` on `worker` holds its lease.
    fn leased_slot(
        &mut self,
        index: u32,
        attempt: u32,
        worker: &str,
    ) -> Result<&mut TaskSlot, Rejection> {
        if self.state != JobState::Running {
            return Err(Rejection::JobNotRunning(self.state.label()));
        }
        let slot = self
            .tasks
            .get_mut(index as usize)
            .ok_or(Rejection::NoSuchTask)?;
        match slot.status {
            TaskStatus::Done => Err(Rejection::AlreadyDone),
            _ if slot.attempt != attempt => Err(Rejection::StaleAttempt {
                current: slot.attempt,
                given: attempt,
            }),
            TaskStatus::Pending => Err(Rejection::StaleAttempt {
                current: slot.attempt,
                given: attempt,
            }),
            // The same attempt number leased by a coordinator that was restarted since.
            TaskStatus::Leased {
                worker: ref holder, ..
            } if holder != worker => Err(Rejection::OtherWorker(holder.clone())),
            TaskStatus::Leased { .. } => Ok(slot),
        }
    }

    /// Extends a live lease and records progress.
    pub fn heartbeat(
        &mut self,
        index: u32,
        attempt: u32,
        worker: &str,
        bytes_done: u64,
        ttl: Duration,
        now: Instant,
    ) -> Result<(), Rejection> {
        let slot = self.leased_slot(index, attempt, worker)?;
        if let TaskStatus::Leased { deadline, .. } = &mut slot.status {
            *deadline = now + ttl;
        }
        slot.progress_bytes = bytes_done.min(slot.plan.input_bytes);
        Ok(())
    }

    /// Accepts a result from the current attempt; returns true when it was the last task.
    pub fn complete(
        &mut self,
        index: u32,
        attempt: u32,
        worker: &str,
        report: CompleteTaskRequest,
        now: Instant,
    ) -> Result<bool, Rejection> {
        let started = self.started;
        let slot = self.leased_slot(index, attempt, worker)?;
        slot.status = TaskStatus::Done;
        slot.progress_bytes = slot.plan.input_bytes;
        slot.result = Some(TaskOutcome {
            worker: worker.to_string(),
            attempt,
            completed_at_seconds: now.saturating_duration_since(started).as_secs_f64(),
            report,
            restored: false,
        });
        if slot.assemble.is_none() {
            self.queue_early_slices();
        }
        Ok(self.tasks_done() == self.tasks.len())
    }

    /// Early assembly (see [`crate::assembly::EarlyAssembly`]): queues the archive's slices
    /// that lie within what the finished tasks before the first unfinished one lay out.
    fn queue_early_slices(&mut self) {
        let Some(early) = &self.spec.early_assembly else {
            return;
        };
        if self.phase != Phase::Compressing {
            return;
        }
        let compressing = self.tasks.iter().take_while(|t| t.assemble.is_none());
        let compressing = compressing.count();
        let queued = (self.tasks.len() - compressing) as u32;
        let finished = self.tasks[..compressing].iter();
        let prefix = finished.take_while(|t| t.result.is_some()).count();
        // A cheap bound first: leaving out identical records only shortens the archive.
        let bound: u64 = self.tasks[..prefix]
            .iter()
            .filter_map(|t| t.result.as_ref())
            .map(|r| r.report.output_bytes)
            .sum::<u64>()
            + shardpress_core::spz::MAGIC.len() as u64;
        if bound < (u64::from(queued) + 1) * early.slice_bytes {
            return;
        }
        let slices =
            match crate::archive::early_slices(&self.tasks[..prefix], early.slice_bytes, queued) {
                Ok(slices) => slices,
                // Finalizing lays out the whole archive and fails the job with this error.
                Err(e) => {
                    tracing::warn!(job = %self.id, "no early assembly: {e}");
                    return;
                }
            };
        for slice in slices {
            let plan = PlannedTask {
                index: self.tasks.len() as u32,
                group: "assemble".into(),
                tensors: Vec::new(),
                output_name: early.object.name.clone(),
                input_bytes: 0,
            };
            let staging = early.object.staging.clone();
            let slice = AssembleSlice { staging, ..slice };
            self.tasks.push(TaskSlot::pending(plan, Some(slice)));
        }
    }

    /// Takes back the lease of a worker that is shutting down: the task is leased again at
    /// once, and this is not one of its failures.
    pub fn release(&mut self, index: u32, attempt: u32, worker: &str) -> Result<(), Rejection> {
        let slot = self.leased_slot(index, attempt, worker)?;
        let staged = slot.staged.take();
        slot.status = TaskStatus::Pending;
        slot.retry_at = None;
        slot.progress_bytes = 0;
        self.discarded.extend(staged);
        Ok(())
    }

    /// When the next task waiting out a failure may be leased, if any is.
    pub fn next_retry(&self) -> Option<Instant> {
        if self.state != JobState::Running {
            return None;
        }
        let waiting = self
            .tasks
            .iter()
            .filter(|t| matches!(t.status, TaskStatus::Pending));
        waiting.filter_map(|t| t.retry_at).min()
    }

    /// Records a failed attempt. Retryable failures requeue the task until `max_attempts`,
    /// after a delay growing with each failure ([`retry_delay`]) counted from `delay_from`, or
    /// at once without it (a lost lease: its worker is gone, not the storage in trouble);
    /// anything else fails the job. Returns true if the job failed.
    #[allow(clippy::too_many_arguments)]
    pub fn fail(
        &mut self,
        index: u32,
        attempt: u32,
        worker: &str,
        message: &str,
        retryable: bool,
        max_attempts: u32,
        delay_from: Option<Instant>,
    ) -> Result<bool, Rejection> {
        let slot = self.leased_slot(index, attempt, worker)?;
        slot.failures += 1;
        let staged = slot.staged.take();
        let output = slot.plan.output_name.clone();
        self.discarded.extend(staged);
        let slot = &mut self.tasks[index as usize];
        if retryable && slot.failures < max_attempts {
            slot.retry_at = delay_from.map(|now| now + retry_delay(index, slot.failures));
            slot.status = TaskStatus::Pending;
            self.retries += 1;
            return Ok(false);
        }
        let why = if retryable {
            format!("failed {max_attempts} times, last: {message}")
        } else {
            message.to_string()
        };
        self.finish(JobState::Failed, format!("task {index} ({output}) {why}"));
        Ok(true)
    }

    /// Returns expired leases to the queue; true if any expired. A task that keeps losing its
    /// lease fails the job after `max_attempts`.
    pub fn expire_leases(&mut self, now: Instant, max_attempts: u32) -> bool {
        if self.state != JobState::Running {
            return false;
        }
        let mut expired = Vec::new();
        for (index, slot) in self.tasks.iter_mut().enumerate() {
            if let TaskStatus::Leased { worker, deadline } = &slot.status {
                if *deadline <= now {
                    expired.push((index, worker.clone(), slot.attempt));
                }
            }
        }
        for (index, worker, attempt) in &expired {
            let message = format!("lease of attempt {attempt} on worker {worker} expired");
            tracing::warn!(job = %self.id, task = index, "{message}; requeueing");
            // The lease is current by construction, so `fail` cannot reject it.
            let _ = self.fail(
                *index as u32,
                *attempt,
                worker,
                &message,
                true,
                max_attempts,
                None,
            );
        }
        !expired.is_empty()
    }

    pub fn tasks_done(&self) -> usize {
        self.tasks
            .iter()
            .filter(|t| matches!(t.status, TaskStatus::Done))
            .count()
    }

    /// Moves to a terminal (or finalizing) state and drops outstanding leases.
    pub fn finish(&mut self, state: JobState, message: String) {
        if self.state.is_terminal() {
            return;
        }
        self.state = state;
        self.message = message;
        if state.is_terminal() {
            for slot in &mut self.tasks {
                if !matches!(slot.status, TaskStatus::Done) {
                    slot.status = TaskStatus::Pending;
                    self.discarded.extend(slot.staged.take());
                }
            }
        }
    }

    /// Checks that every pending task fits some live worker (`limits`: their
    /// `--memory-limit`s, `None` unlimited): says in the job's message which task does not,
    /// and fails the job once one has not for `timeout`. Nothing is checked without live
    /// workers (the job waits for them). Returns true if the job's status changed.
    pub fn check_unassignable(
        &mut self,
        limits: &[Option<u64>],
        now: Instant,
        timeout: Duration,
    ) -> bool {
        if self.state != JobState::Running {
            return false;
        }
        let stuck = (self.tasks.iter().enumerate())
            .filter(|(_, t)| matches!(t.status, TaskStatus::Pending))
            .find_map(|(i, t)| {
                let need = t.need.as_ref()?;
                let fits = |l: &Option<u64>| crate::routing::fits(Some(need), *l);
                (!limits.is_empty() && !limits.iter().any(fits)).then_some((i, t, need))
            });
        let Some((index, slot, need)) = stuck else {
            return match self.unassignable.take() {
                Some((_, before)) => {
                    self.message = before;
                    true
                }
                None => false,
            };
        };
        let largest = limits.iter().flatten().copied().max().unwrap_or(0);
        let message =
            crate::routing::unassignable_message(index, &slot.plan.output_name, need, largest);
        let since = match &self.unassignable {
            Some((since, _)) => *since,
            None => {
                tracing::warn!(job = %self.id, task = index, tensor = %need.tensor,
                    needed = need.bytes, largest_limit = largest, "{message}");
                self.unassignable = Some((now, std::mem::take(&mut self.message)));
                now
            }
        };
        if now.saturating_duration_since(since) >= timeout {
            let message = format!(
                "{message} (no such worker came within {} s)",
                timeout.as_secs_f64()
            );
            self.finish(JobState::Failed, message);
            return true;
        }
        let changed = self.message != message;
        self.message = message;
        changed
    }

    pub fn status(&self, workers: u32) -> JobStatus {
        let running = self
            .tasks
            .iter()
            .filter(|t| matches!(t.status, TaskStatus::Leased { .. }))
            .count();
        let bytes_done = self
            .tasks
            .iter()
            .map(|t| match t.status {
                TaskStatus::Done => t.plan.input_bytes,
                TaskStatus::Leased { .. } => t.progress_bytes,
                TaskStatus::Pending => 0,
            })
            .sum();
        JobStatus {
            job_id: self.id.clone(),
            state: self.state as i32,
            tasks_total: self.tasks.len() as u32,
            tasks_done: self.tasks_done() as u32,
            tasks_running: running as u32,
            bytes_total: self.tasks.iter().map(|t| t.plan.input_bytes).sum(),
            bytes_done,
            message: self.message.clone(),
            workers,
            task_retries: self.retries,
            model_url: self.spec.model_url.clone(),
            out_url: self.spec.out_url.clone(),
            recipe: self.spec.recipe.describe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardpress_proto::v1::PartRange;

    fn job_with_tasks(n: usize) -> Job {
        let plan = (0..n)
            .map(|i| PlannedTask {
                index: i as u32,
                group: format!("layer {i}"),
                tensors: vec![],
                output_name: format!("model-{:05}-of-{:05}.safetensors", i + 1, n),
                input_bytes: 100,
            })
            .collect();
        let recipe = Recipe::preset("int8").expect("preset");
        let spec = JobSpec {
            model_url: "memory:///m".into(),
            out_url: "memory:///o".into(),
            out_identity: "memory:///o".into(),
            recipe,
            task_budget: 1 << 20,
            format: OutputFormat::Safetensors,
            facts: ModelFacts::default(),
            max_file_bytes: None,
            assembly_slice_bytes: crate::assembly::DEFAULT_SLICE_BYTES,
            in_place: None,
            early_assembly: None,
            measured: None,
        };
        Job::new("job-1".into(), spec, plan, Instant::now())
    }

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn a_global_prune_job_measures_first_then_compresses_every_task_again() {
        let Job {
            id,
            mut spec,
            tasks,
            ..
        } = job_with_tasks(2);
        spec.recipe = Recipe::from_yaml(
            "passes:\n  - prune: { method: magnitude, sparsity: 0.5, scope: global }\n    targets: ['re:.*']\n",
        )
        .unwrap();
        let plan = tasks.into_iter().map(|t| t.plan).collect();
        let mut job = Job::new(id, spec, plan, Instant::now());
        assert_eq!(job.phase, Phase::Measuring);
        let t0 = Instant::now();
        for i in 0..2 {
            assert_eq!(job.lease_next("w1", TTL, t0), Some(i));
        }
        // The last measuring report moves the job to finalizing, as for any job.
        assert_eq!(
            job.complete(0, 1, "w1", CompleteTaskRequest::default(), Instant::now()),
            Ok(false)
        );
        assert_eq!(
            job.complete(1, 1, "w1", CompleteTaskRequest::default(), Instant::now()),
            Ok(true)
        );
        job.finish(JobState::Finalizing, String::new());
        let cut = GlobalCut {
            bin: 7,
            tie_fraction: 0.5,
        };
        let measured = |cut| Measured {
            cut: Some(cut),
            ..Default::default()
        };
        job.start_compression(measured(cut));
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.phase, Phase::Compressing);
        let cut_now = |job: &Job| job.spec.measured.as_ref().and_then(|m| m.cut);
        assert_eq!(cut_now(&job), Some(cut));
        assert_eq!(job.tasks_done(), 0);
        // A second call (a duplicate finalize) changes nothing.
        job.start_compression(measured(GlobalCut {
            bin: 1,
            tie_fraction: 0.0,
        }));
        assert_eq!(cut_now(&job), Some(cut));
        // Round two leases are new attempts: a late round-one report is stale.
        assert_eq!(job.lease_next("w2", TTL, t0), Some(0));
        assert_eq!(
            job.complete(0, 1, "w1", CompleteTaskRequest::default(), Instant::now()),
            Err(Rejection::StaleAttempt {
                current: 2,
                given: 1
            })
        );
        assert_eq!(
            job.complete(0, 2, "w2", CompleteTaskRequest::default(), Instant::now()),
            Ok(false)
        );
    }

    #[test]
    fn an_expired_lease_is_requeued_and_its_stale_result_rejected() {
        let mut job = job_with_tasks(1);
        let t0 = Instant::now();
        assert_eq!(job.lease_next("w1", TTL, t0), Some(0));
        assert!(job.expire_leases(t0 + TTL, 5));
        assert_eq!(job.lease_next("w2", TTL, t0 + TTL), Some(0));
        let stale = job.complete(0, 1, "w1", CompleteTaskRequest::default(), Instant::now());
        assert_eq!(
            stale,
            Err(Rejection::StaleAttempt {
                current: 2,
                given: 1
            })
        );
        assert_eq!(
            job.complete(0, 2, "w2", CompleteTaskRequest::default(), Instant::now()),
            Ok(true)
        );
        assert_eq!(job.retries, 1);
    }

    #[test]
    fn only_the_lease_holder_may_report_and_given_up_attempts_are_discarded() {
        let mut job = job_with_tasks(2);
        let t0 = Instant::now();
        let staged = |n: u32| StagedOutput {
            name: format!("shard-{n}"),
            staging: format!(".shardpress/staging/t{n}"),
            upload_id: String::new(),
        };
        assert_eq!(job.lease_next("w1", TTL, t0), Some(0));
        job.tasks[0].staged = Some(staged(0));
        // A restarted coordinator leases attempt numbers again: the number alone is no proof.
        let other = Rejection::OtherWorker("w1".into());
        assert_eq!(job.heartbeat(0, 1, "w9", 0, TTL, t0), Err(other.clone()));
        assert_eq!(job.complete(0, 1, "w9", Default::default(), t0), Err(other));
        job.heartbeat(0, 1, "w1", 0, TTL, t0).unwrap();
        // An expired attempt's staged output is given up; so is a cancelled job's.
        assert!(job.expire_leases(t0 + TTL, 5));
        assert_eq!(job.discarded, vec![staged(0)]);
        assert_eq!(job.lease_next("w2", TTL, t0 + TTL), Some(0));
        job.tasks[0].staged = Some(staged(2));
        assert_eq!(job.lease_next("w2", TTL, t0 + TTL), Some(1));
        job.tasks[1].staged = Some(staged(1));
        job.finish(JobState::Cancelled, "cancelled".into());
        assert_eq!(job.discarded, vec![staged(0), staged(2), staged(1)]);
    }

    #[test]
    fn a_job_steps_from_compressing_to_assembling_to_finalizing() {
        let mut job = job_with_tasks(1);
        let now = Instant::now();
        assert_eq!(job.phase, Phase::Compressing);
        // Assembly is queued only by the driver, once the compressing tasks are done.
        let slice = |n: u32| {
            let plan = PlannedTask {
                index: n,
                group: "assemble".into(),
                tensors: vec![],
                output_name: "model.spz".into(),
                input_bytes: 0,
            };
            (plan, AssembleSlice::default())
        };
        job.start_assembly(vec![slice(1)]);
        assert_eq!((job.phase, job.tasks.len()), (Phase::Compressing, 1));
        job.lease_next("w", TTL, now);
        assert_eq!(job.complete(0, 1, "w", Default::default(), now), Ok(true));
        job.finish(JobState::Finalizing, String::new());
        assert_eq!(job.lease_next("w", TTL, now), None, "the driver's turn");
        job.start_assembly(vec![slice(1)]);
        assert_eq!(
            (job.phase, job.state),
            (Phase::Assembling, JobState::Running)
        );
        assert_eq!(job.lease_next("w", TTL, now), Some(1));
        assert_eq!(job.complete(1, 1, "w", Default::default(), now), Ok(true));
        job.finish(JobState::Finalizing, String::new());
        job.start_finalizing();
        assert_eq!(job.phase, Phase::Finalizing);
        // A late call of an earlier step changes nothing.
        job.start_assembly(vec![slice(2)]);
        assert_eq!((job.phase, job.tasks.len()), (Phase::Finalizing, 2));
    }

    #[test]
    fn heartbeats_keep_a_lease_alive() {
        let mut job = job_with_tasks(1);
        let t0 = Instant::now();
        job.lease_next("w1", TTL, t0);
        job.heartbeat(0, 1, "w1", 50, TTL, t0 + TTL / 2).unwrap();
        assert!(!job.expire_leases(t0 + TTL, 5));
        assert_eq!(job.status(1).bytes_done, 50);
    }

    #[test]
    fn a_non_retryable_failure_fails_the_job() {
        let mut job = job_with_tasks(2);
        job.lease_next("w1", TTL, Instant::now());
        let now = Instant::now();
        assert_eq!(
            job.fail(0, 1, "w1", "corrupt input", false, 5, Some(now)),
            Ok(true)
        );
        assert_eq!(job.state, JobState::Failed);
        assert!(job.message.contains("corrupt input"));
        assert_eq!(job.lease_next("w1", TTL, Instant::now()), None);
    }

    #[test]
    fn retryable_failures_give_up_after_max_attempts() {
        let mut job = job_with_tasks(1);
        let mut now = Instant::now();
        for attempt in 1..=3 {
            assert_eq!(job.lease_next("w", TTL, now), Some(0));
            let failed = (job.fail(0, attempt, "w", "timeout", true, 3, Some(now))).unwrap();
            assert_eq!(failed, attempt == 3);
            // Each retry waits longer, and not before its time.
            if !failed {
                let delay = retry_delay(0, attempt);
                assert_eq!(job.next_retry(), Some(now + delay));
                assert_eq!(job.lease_next("w", TTL, now + delay / 2), None);
                now += delay;
            }
        }
        assert_eq!(job.state, JobState::Failed);
    }

    #[test]
    fn retry_delays_double_up_to_a_limit_with_a_bounded_jitter() {
        for task in 0..50 {
            let delays: Vec<Duration> = (1..=8).map(|f| retry_delay(task, f)).collect();
            for (failures, delay) in (1..).zip(&delays) {
                let base = Duration::from_millis(250) * 2u32.pow(failures.min(6) - 1);
                assert!(
                    *delay >= base && *delay <= base * 3 / 2,
                    "{task} {failures}"
                );
            }
        }
        // Tasks failing together come back spread out.
        let first: std::collections::BTreeSet<Duration> =
            (0..20).map(|task| retry_delay(task, 1)).collect();
        assert!(first.len() > 10);
    }

    #[test]
    fn tasks_are_leased_in_order_and_done_once() {
        let mut job = job_with_tasks(2);
        let now = Instant::now();
        assert_eq!(job.lease_next("a", TTL, now), Some(0));
        assert_eq!(job.lease_next("b", TTL, now), Some(1));
        assert_eq!(job.lease_next("c", TTL, now), None);
        assert_eq!(
            job.complete(1, 1, "b", Default::default(), Instant::now()),
            Ok(false)
        );
        assert_eq!(
            job.complete(1, 1, "b", Default::default(), Instant::now()),
            Err(Rejection::AlreadyDone)
        );
        assert_eq!(
            job.complete(0, 1, "a", Default::default(), Instant::now()),
            Ok(true)
        );
    }

    /// A compressing task's report: a part of `bytes` bytes holding one record per
    /// `(name, hash, offset, len)`.
    fn part_report(bytes: u64, records: &[(&str, &str, u64, u64)]) -> CompleteTaskRequest {
        let tensors = records
            .iter()
            .map(
                |&(name, hash, offset, len)| shardpress_proto::v1::TensorResult {
                    name: name.into(),
                    dtype: "BF16".into(),
                    shape: vec![len],
                    record_offset: offset,
                    record_len: len,
                    record_blake3: hash.into(),
                    ..Default::default()
                },
            )
            .collect();
        CompleteTaskRequest {
            output_bytes: bytes,
            tensors,
            ..Default::default()
        }
    }

    /// The slice as the whole file's cut gives it, without what depends on when it was
    /// queued.
    fn shape_of(slice: &AssembleSlice) -> (u64, Vec<String>, Vec<u64>, Vec<PartRange>) {
        let s = slice.clone();
        (s.offset, s.parts, s.part_sizes, s.ranges)
    }

    #[test]
    fn an_early_assembled_archive_is_cut_as_if_assembled_at_the_end() {
        use crate::assembly::{cut, EarlyAssembly};
        let mut job = job_with_tasks(4);
        job.spec.format = OutputFormat::Spz;
        job.spec.early_assembly = Some(EarlyAssembly {
            object: shardpress_store::shared::SharedObject {
                name: "model.spz".into(),
                staging: ".spz-parts/model.spz.assembling".into(),
                upload_id: String::new(),
            },
            slice_bytes: 1024,
        });
        let reports = [
            part_report(3000, &[("a", "h1", 0, 1000), ("b", "h2", 1000, 2000)]),
            // "c" repeats "a"'s record: left out of the archive.
            part_report(2500, &[("c", "h1", 100, 1000), ("d", "h3", 1100, 1400)]),
            part_report(700, &[("e", "h4", 0, 700)]),
            part_report(4100, &[("f", "h5", 0, 4100)]),
        ];
        let now = Instant::now();
        for i in 0..4 {
            assert_eq!(job.lease_next("w", TTL, now), Some(i));
        }
        let early = |job: &Job| job.tasks.len() - 4;
        // Task 1 first: nothing before it is known, so nothing is queued.
        assert_eq!(job.complete(1, 1, "w", reports[1].clone(), now), Ok(false));
        assert_eq!(early(&job), 0);
        // Task 0: tasks 0 and 1 lay out 8 + 3000 + 1500 bytes, four whole slices.
        assert_eq!(job.complete(0, 1, "w", reports[0].clone(), now), Ok(false));
        assert_eq!(early(&job), 4);
        // The early slices are leased before the last compressing tasks would be.
        job.tasks[3].status = TaskStatus::Pending;
        assert_eq!(job.lease_next("w", TTL, now), Some(4));
        job.tasks[3].status = TaskStatus::Leased {
            worker: "w".into(),
            deadline: now + TTL,
        };
        assert_eq!(job.complete(2, 1, "w", reports[2].clone(), now), Ok(false));
        assert_eq!(job.complete(3, 1, "w", reports[3].clone(), now), Ok(false));
        assert_eq!(early(&job), 9, "8 + 3000 + 1500 + 700 + 4100 bytes");
        // The first slice reads the head and task 0's part, and deletes the head, which no
        // other slice reads (task 0's part runs on into two more).
        let first = job.tasks[4].assemble.clone().unwrap();
        assert_eq!(first.slices, 0);
        assert_eq!(
            first.parts[..2],
            [
                crate::archive::head_name(),
                "model-00001-of-00004.safetensors".to_string()
            ]
        );
        assert_eq!(first.delete_after, [0]);
        let mut whole = crate::archive::data_layout(&job.tasks).unwrap().layout;
        let tail = whole.parts.len() as u32;
        whole.parts.push("tail".into());
        whole.part_sizes.push(300);
        whole.ranges.push(PartRange {
            part: tail,
            start: 0,
            end: 300,
        });
        let early_assembly = job.spec.early_assembly.clone().unwrap();
        let rest =
            crate::assembly::after_early(whole.clone(), &early_assembly, &job.tasks).unwrap();
        let mut all: Vec<_> = job.tasks[4..]
            .iter()
            .map(|t| shape_of(t.assemble.as_ref().unwrap()))
            .collect();
        all.extend(rest.iter().map(shape_of));
        let at_the_end: Vec<_> = cut(&whole, 1024).iter().map(shape_of).collect();
        assert_eq!(all, at_the_end);
        assert!(rest.iter().all(|s| s.slices == 10 && !s.staging.is_empty()));
        // An early slice that differs from the final layout's is an error, not a wrong file.
        job.tasks[5].assemble.as_mut().unwrap().ranges[0].start += 1;
        assert!(crate::assembly::after_early(whole, &early_assembly, &job.tasks).is_err());
    }
    #[test]
    fn a_task_needing_more_memory_goes_only_to_a_worker_whose_limit_covers_it() {
        let mut job = job_with_tasks(2);
        job.tasks[0].need = Some(crate::routing::TaskNeed {
            bytes: 300_000_000,
            tensor: "w".into(),
            pass: "hashed 0.5".into(),
        });
        let now = Instant::now();
        // The small worker gets the other task, never task 0.
        assert_eq!(
            job.lease_next_within("small", Some(160_000_000), TTL, now),
            Some(1)
        );
        assert_eq!(
            job.lease_next_within("small", Some(160_000_000), TTL, now),
            None
        );
        assert_eq!(job.lease_next_within("big", None, TTL, now), Some(0));
    }

    #[test]
    fn a_task_no_live_worker_can_take_is_named_then_fails_the_job() {
        let mut job = job_with_tasks(1);
        job.tasks[0].need = Some(crate::routing::TaskNeed {
            bytes: 300_000_000,
            tensor: "model.w".into(),
            pass: "hashed 0.5".into(),
        });
        let (now, timeout) = (Instant::now(), Duration::from_secs(5));
        // No live worker: the job waits, saying nothing.
        assert!(!job.check_unassignable(&[], now, timeout));
        assert_eq!(job.message, "");
        assert!(job.check_unassignable(&[Some(160_000_000)], now, timeout));
        assert_eq!(job.state, JobState::Running);
        for needle in [
            "task 0",
            "model.w",
            "hashed 0.5",
            "300.0 MB",
            "--memory-limit",
        ] {
            assert!(job.message.contains(needle), "{needle}: {}", job.message);
        }
        // A worker that can take it clears the message ...
        assert!(job.check_unassignable(&[Some(160_000_000), None], now, timeout));
        assert_eq!(job.message, "");
        // ... and one that stays unassignable for the timeout fails the job.
        job.check_unassignable(&[Some(160_000_000)], now, timeout);
        assert!(job.check_unassignable(&[Some(160_000_000)], now + timeout, timeout));
        assert_eq!(job.state, JobState::Failed);
        assert!(job.message.contains("model.w"), "{}", job.message);
    }
}
