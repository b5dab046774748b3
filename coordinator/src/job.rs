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

use crate::calibration::StepKind;
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
    /// A calibrated (or evaluated) job's first round: its steps, and the compressing
    /// round's plan that runs after it (see [`crate::calibration`]).
    pub calibration: Option<std::sync::Arc<crate::calibration::Calibration>>,
    /// What the calibration round concluded, once it is over.
    pub calibrated: Option<crate::calibration::CalibrationOutcome>,
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
    /// Mixed precision: every quantized tensor's measured candidates, and the choice.
    pub precision: Option<MeasuredPrecision>,
}

/// What the measuring round found for a recipe's mixed precision.
#[derive(Debug, Clone)]
pub struct MeasuredPrecision {
    pub tensors: Vec<shardpress_core::precision::TensorCandidates>,
    /// The widths chosen, or why no choice meets the budget (the job fails with it).
    pub choice:
        Result<shardpress_core::precision::Choice, shardpress_core::precision::PrecisionError>,
}

impl JobSpec {
    /// True for a job whose first round measures: a global magnitude prune, near-identical
    /// sharing, or mixed precision (see [`JobSpec::measured`]).
    pub fn has_measuring_round(&self) -> bool {
        self.measured.is_some()
            || self.recipe.global_sparsity().is_some()
            || self.recipe.share_cosine.is_some()
            || self.recipe.needs_precision_choice()
    }

    /// True while the job's tasks only measure.
    pub fn measuring(&self) -> bool {
        self.has_measuring_round() && self.measured.is_none()
    }

    /// True for a job with a calibration round (its calibration data can also serve only
    /// to score mixed precision's widths, in the measuring round).
    pub fn has_calibration_round(&self) -> bool {
        (self.calibration.as_ref()).is_some_and(|c| !c.plan.steps.is_empty())
    }

    /// True while the job's tasks are (or are still to be) its calibration round's steps.
    pub fn calibrating(&self) -> bool {
        self.has_calibration_round() && self.calibrated.is_none()
    }

    /// The measuring round's sensitivity steps (see
    /// [`crate::calibration::Calibration::sensitivity`]).
    pub fn sensitivity_steps(&self) -> &[crate::calibration::CalibStep] {
        (self.calibration.as_ref()).map_or(&[], |c| c.sensitivity.steps.as_slice())
    }

    /// The object holding `tensor`'s calibrated result, once the round has written it.
    pub fn solved_object(&self, tensor: &str) -> Option<&str> {
        self.calibrated.as_ref()?;
        let calibration = self.calibration.as_ref()?;
        calibration.plan.solved.get(tensor).map(String::as_str)
    }
}

/// The steps of a job. Workers run the tasks of the first three; when a step's last task is
/// done the job is `Finalizing` (the coordinator's turn) until its driver
/// ([`crate::driver`]) has done the coordinator's part and started the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The calibration round's steps run (layer by layer: statistics, solving, forwarding;
    /// the evaluation set through both models); nothing of the output is written yet.
    Calibrating,
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
            Phase::Calibrating => "calibrating",
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
    /// Tasks that must be done before this one is leased (a calibration step reads their
    /// objects).
    pub deps: Vec<u32>,
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
            deps: Vec::new(),
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
        let (tasks, phase) = match &spec.calibration {
            Some(calibration) if spec.calibrating() && !spec.measuring() => {
                (calibration_slots(calibration), Phase::Calibrating)
            }
            _ => {
                let measuring = spec.measuring();
                let mut tasks = compressing_slots(&spec, plan);
                let phase = match measuring {
                    true => Phase::Measuring,
                    false => Phase::Compressing,
                };
                if let (true, Some(calibration)) = (measuring, &spec.calibration) {
                    tasks.extend(sensitivity_slots(calibration, tasks.len() as u32));
                }
                (tasks, phase)
            }
        };
        let message = round_message(&spec, phase);
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
    /// [`crate::journal`]); a result of a later round (rounds run measuring, calibrating,
    /// compressing) waits for that round to start.
    pub fn restore(&mut self, recorded: Recorded) {
        let rank = |round: Round| match round {
            Round::Measure => 0,
            Round::Calibrate => 1,
            Round::Compress => 2,
        };
        let round = match self.phase {
            Phase::Calibrating => Round::Calibrate,
            Phase::Measuring => Round::Measure,
            _ => Round::Compress,
        };
        if recorded.round != round {
            if rank(recorded.round) > rank(round) {
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
    /// refused as stale), or a calibrated job's calibration round starts. `recipe`: the
    /// recipe the later rounds run (with the widths mixed precision chose), when it changed.
    pub fn start_compression(&mut self, measured: Measured, recipe: Option<Recipe>) {
        if self.state != JobState::Finalizing || self.phase != Phase::Measuring {
            return;
        }
        self.spec.measured = Some(measured);
        if let Some(recipe) = recipe {
            self.spec.recipe = recipe;
        }
        let attempts = self.tasks.iter().map(|t| t.attempt).max().unwrap_or(0);
        // The sensitivity steps end with the round (they follow its measuring tasks).
        let measuring_tasks =
            (self.tasks.len()).saturating_sub(self.spec.sensitivity_steps().len());
        self.tasks.truncate(measuring_tasks);
        match self.spec.calibration.clone() {
            Some(calibration) if self.spec.calibrating() => {
                self.tasks = calibration_slots(&calibration);
                self.phase = Phase::Calibrating;
            }
            _ => self.phase = Phase::Compressing,
        }
        self.message = round_message(&self.spec, self.phase);
        for slot in &mut self.tasks {
            slot.status = TaskStatus::Pending;
            slot.failures = 0;
            slot.progress_bytes = 0;
            slot.result = None;
            slot.attempt = slot.attempt.max(attempts);
        }
        self.state = JobState::Running;
        for recorded in std::mem::take(&mut self.restored_later) {
            self.restore(recorded);
        }
    }

    /// Ends the calibration round: the compressing round's tasks replace its steps, and
    /// store each calibrated tensor's result (task numbers start again from 0; a late
    /// report of a step is refused, as the job's tasks are then other ones).
    pub fn start_compression_calibrated(
        &mut self,
        outcome: crate::calibration::CalibrationOutcome,
    ) {
        if self.state != JobState::Finalizing || self.phase != Phase::Calibrating {
            return;
        }
        let Some(calibration) = self.spec.calibration.clone() else {
            return;
        };
        self.spec.calibrated = Some(outcome);
        // Steps still running (none, unless the round ended by a restored journal) commit
        // nothing now.
        for slot in &mut self.tasks {
            if !matches!(slot.status, TaskStatus::Done) {
                self.discarded.extend(slot.staged.take());
            }
        }
        // Attempt numbers go on past the round's, so no step's attempt can pass for a
        // compressing task's.
        let attempts = self.tasks.iter().map(|t| t.attempt).max().unwrap_or(0);
        self.tasks = compressing_slots(&self.spec, calibration.compress_plan.clone());
        for slot in &mut self.tasks {
            slot.attempt = attempts;
        }
        self.phase = Phase::Compressing;
        self.message = round_message(&self.spec, self.phase);
        self.state = JobState::Running;
        for recorded in std::mem::take(&mut self.restored_later) {
            self.restore(recorded);
        }
    }

    /// True when every task `slot` waits for is done.
    fn ready(&self, slot: &TaskSlot) -> bool {
        (slot.deps.iter()).all(|&d| {
            (self.tasks.get(d as usize)).is_some_and(|t| matches!(t.status, TaskStatus::Done))
        })
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
        let leasable = |t: &TaskSlot| {
            t.leasable(now) && crate::routing::fits(t.need.as_ref(), memory_limit) && self.ready(t)
        };
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

    /// Returns expired leases to the queue; how many expired. A task that keeps losing its
    /// lease fails the job after `max_attempts`.
    pub fn expire_leases(&mut self, now: Instant, max_attempts: u32) -> usize {
        if self.state != JobState::Running {
            return 0;
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
        expired.len()
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
mod tests;

/// The calibration round's task slots: its steps, each waiting for those it reads.
fn calibration_slots(calibration: &crate::calibration::Calibration) -> Vec<TaskSlot> {
    let steps = &calibration.plan.steps;
    step_slots(calibration, steps, calibration.step_tasks(), 0)
}

/// The measuring round's sensitivity steps as slots numbered from `first`.
fn sensitivity_slots(calibration: &crate::calibration::Calibration, first: u32) -> Vec<TaskSlot> {
    let steps = &calibration.sensitivity.steps;
    step_slots(
        calibration,
        steps,
        calibration.sensitivity_tasks(first),
        first,
    )
}

fn step_slots(
    calibration: &crate::calibration::Calibration,
    steps: &[crate::calibration::CalibStep],
    tasks: Vec<PlannedTask>,
    first: u32,
) -> Vec<TaskSlot> {
    (tasks.into_iter().zip(steps).enumerate())
        .map(|(index, (plan, step))| TaskSlot {
            deps: step.deps.iter().map(|d| d + first).collect(),
            need: calibration.step_need(steps, index),
            ..TaskSlot::pending(plan, None)
        })
        .collect()
}

/// What a job in `phase` says it does: "round k of n: ..." when it has more than one round
/// (measuring, calibrating, compressing), nothing when it only compresses.
fn round_message(spec: &JobSpec, phase: Phase) -> String {
    let measuring = spec.has_measuring_round();
    let calibrating = spec.has_calibration_round();
    let rounds = 1 + usize::from(measuring) + usize::from(calibrating);
    let (round, what) = match phase {
        Phase::Measuring => {
            let sensitivity = spec.calibration.as_ref().map_or(0, |c| {
                let steps = &c.sensitivity.steps;
                let scoring = (steps.iter()).filter(|s| s.kind == StepKind::Sensitivity);
                scoring.count()
            });
            let what = match spec.recipe.needs_precision_choice() {
                true if sensitivity > 0 => format!(
                    "measuring (candidate widths of the quantized tensors, {sensitivity} scored on the calibration data)"
                ),
                true => "measuring (candidate widths of the quantized tensors)".to_string(),
                false => "measuring (magnitudes, sketches)".to_string(),
            };
            (1, what)
        }
        Phase::Calibrating => {
            let steps = spec.calibration.as_ref().map_or(0, |c| c.plan.steps.len());
            let what = format!("calibrating layer by layer ({steps} steps)");
            (1 + usize::from(measuring), what)
        }
        _ => (rounds, "compressing".to_string()),
    };
    match rounds {
        1 => String::new(),
        _ => format!("round {round} of {rounds}: {what}"),
    }
}

/// The compressing round's task slots of `plan`.
fn compressing_slots(spec: &JobSpec, plan: Vec<PlannedTask>) -> Vec<TaskSlot> {
    plan.into_iter()
        .map(|plan| {
            let need = crate::routing::task_need(spec, &plan);
            TaskSlot {
                need,
                ..TaskSlot::pending(plan, None)
            }
        })
        .collect()
}
