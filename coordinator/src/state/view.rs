//! A read-only view of the whole cluster at one instant — every job's progress and ETA, every
//! worker and the tasks it holds — taken under the state's lock in one go, for the metrics'
//! gauges and the status page ([`crate::http`]); and the counting of a completed task into the
//! metrics, which needs the task's slot. URLs and messages are redacted here, so no credential
//! written into a URL reaches a page or a scrape.

use serde::Serialize;
use shardpress_store::redact;

use shardpress_proto::v1::TaskRef;

use super::{Coordinator, Inner, Instant};
use crate::job::TaskStatus;
use crate::metrics::Metrics;

/// The cluster as the status page and the metrics show it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterView {
    /// Newest first.
    pub jobs: Vec<JobView>,
    /// By name.
    pub workers: Vec<WorkerView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: String,
    /// `running`, `finalizing`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// The job's step (`measuring`, `compressing`, `assembling`, `finalizing`).
    pub phase: String,
    pub message: String,
    pub model_url: String,
    pub out_url: String,
    pub recipe: String,
    pub tasks_total: u32,
    pub tasks_done: u32,
    pub tasks_running: u32,
    /// Tasks waiting for a worker (none once the job has ended).
    pub tasks_queued: u32,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub retries: u32,
    pub elapsed_seconds: f64,
    /// Time left at the rate so far, while the job runs and has made progress.
    pub eta_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    pub id: String,
    pub name: String,
    /// Heard from within three lease TTLs.
    pub live: bool,
    pub seconds_since_seen: f64,
    pub memory_limit: Option<u64>,
    pub tasks: Vec<WorkerTask>,
}

/// A task a worker holds the lease of, with the progress its heartbeats reported.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerTask {
    pub job_id: String,
    pub task_index: u32,
    pub attempt: u32,
    pub output: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Since the task was leased.
    pub seconds: f64,
    pub bytes_per_second: f64,
}

impl JobView {
    /// A job with nothing done, for tests.
    #[cfg(test)]
    pub fn example(id: &str, state: &str) -> Self {
        JobView {
            id: id.into(),
            state: state.into(),
            phase: "compressing".into(),
            message: String::new(),
            model_url: "file:///m".into(),
            out_url: "file:///o".into(),
            recipe: "int4".into(),
            tasks_total: 0,
            tasks_done: 0,
            tasks_running: 0,
            tasks_queued: 0,
            bytes_total: 0,
            bytes_done: 0,
            retries: 0,
            elapsed_seconds: 0.0,
            eta_seconds: None,
        }
    }
}

/// Seconds left at the rate so far.
fn eta(elapsed: f64, done: u64, total: u64) -> Option<f64> {
    (done > 0 && elapsed > 0.0).then(|| elapsed * total.saturating_sub(done) as f64 / done as f64)
}

impl Inner {
    /// Counts the result of `task`, just accepted, into `metrics`: what it read and wrote,
    /// and by which worker.
    pub(super) fn count_completion(&self, metrics: &Metrics, task: &TaskRef) {
        let job = self.jobs.get(&task.job_id).map(|e| &e.job);
        let Some(slot) = job.and_then(|j| j.tasks.get(task.task_index as usize)) else {
            return;
        };
        let written = slot.result.as_ref().map_or(0, |r| r.report.output_bytes);
        let name = self.workers.get(&task.worker_id).map(|w| w.name.as_str());
        let name = name.unwrap_or(&task.worker_id);
        metrics.task_completed(name, slot.plan.input_bytes, written);
    }
}

impl Coordinator {
    /// The cluster now (see [`ClusterView`]).
    pub fn view(&self) -> ClusterView {
        let ttl = self.config.lease_ttl;
        let now = Instant::now();
        let inner = self.lock();
        let mut workers: Vec<WorkerView> = (inner.workers.iter())
            .map(|(id, w)| WorkerView {
                id: id.clone(),
                name: w.name.clone(),
                live: now.duration_since(w.last_seen) < ttl * 3,
                seconds_since_seen: now.duration_since(w.last_seen).as_secs_f64(),
                memory_limit: w.memory_limit,
                tasks: Vec::new(),
            })
            .collect();
        let mut jobs = Vec::with_capacity(inner.jobs.len());
        for entry in inner.jobs.values() {
            let job = &entry.job;
            let status = job.status(0);
            let elapsed = now.saturating_duration_since(job.started).as_secs_f64();
            let running = job.state == shardpress_proto::v1::JobState::Running;
            for (index, slot) in job.tasks.iter().enumerate() {
                let TaskStatus::Leased { worker, .. } = &slot.status else {
                    continue;
                };
                let Some(view) = workers.iter_mut().find(|w| &w.id == worker) else {
                    continue;
                };
                let seconds = (elapsed - slot.leased_at_seconds).max(0.0);
                view.tasks.push(WorkerTask {
                    job_id: job.id.clone(),
                    task_index: index as u32,
                    attempt: slot.attempt,
                    output: redact(&slot.plan.output_name),
                    bytes_done: slot.progress_bytes,
                    bytes_total: slot.plan.input_bytes,
                    seconds,
                    bytes_per_second: match seconds > 0.0 {
                        true => slot.progress_bytes as f64 / seconds,
                        false => 0.0,
                    },
                });
            }
            let queued = (job.tasks.iter())
                .filter(|t| matches!(t.status, TaskStatus::Pending))
                .count() as u32;
            jobs.push((
                job.started,
                JobView {
                    id: job.id.clone(),
                    state: job.state.label().to_string(),
                    phase: job.phase.label().to_string(),
                    message: redact(&job.message),
                    model_url: redact(&job.spec.model_url),
                    out_url: redact(&job.spec.out_url),
                    recipe: redact(&status.recipe),
                    tasks_total: status.tasks_total,
                    tasks_done: status.tasks_done,
                    tasks_running: status.tasks_running,
                    tasks_queued: if running { queued } else { 0 },
                    bytes_total: status.bytes_total,
                    bytes_done: status.bytes_done,
                    retries: job.retries,
                    elapsed_seconds: elapsed,
                    eta_seconds: running
                        .then(|| eta(elapsed, status.bytes_done, status.bytes_total))
                        .flatten(),
                },
            ));
        }
        drop(inner);
        jobs.sort_by_key(|(started, _)| std::cmp::Reverse(*started));
        workers.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        ClusterView {
            jobs: jobs.into_iter().map(|(_, job)| job).collect(),
            workers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::eta;

    #[test]
    fn eta_is_the_time_left_at_the_rate_so_far() {
        assert_eq!(eta(10.0, 25, 100), Some(30.0));
        assert_eq!(eta(10.0, 0, 100), None);
        assert_eq!(eta(10.0, 100, 100), Some(0.0));
    }
}
