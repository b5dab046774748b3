//! The coordinator's Prometheus metrics (served at `/metrics` by [`crate::http`]).
//!
//! Two kinds, kept apart on purpose:
//! - counters of events, incremented where the event happens in [`crate::state`] (a task
//!   leased, completed, failed or retried, a lease that expired, the bytes a completed task
//!   read and wrote, and by which worker): a restart of the coordinator starts them at zero,
//!   which Prometheus' `rate()` handles;
//! - gauges of what is true now (jobs by state, tasks queued and running, live workers, each
//!   worker's throughput on its current task from the progress its heartbeats carry), set
//!   from a [`ClusterView`] at each scrape, so nothing has to keep them in step.
//!
//! Workers need no scrape of their own: their progress arrives with their heartbeats, so one
//! scrape of the coordinator shows the whole cluster.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::state::ClusterView;

/// The `Content-Type` of what [`Metrics::encode`] returns (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Every state a job's `state` label may take, listed even when no job is in it (so a
/// dashboard's query finds a zero rather than nothing).
const JOB_STATES: [&str; 5] = ["running", "finalizing", "succeeded", "failed", "cancelled"];

type Label = [(&'static str, String); 1];

/// The coordinator's metrics and the registry they are encoded from.
pub struct Metrics {
    /// Held while gauges are set and everything encoded, so two scrapes never interleave.
    registry: Mutex<Registry>,
    tasks_leased: Counter,
    tasks_completed: Counter,
    tasks_failed: Counter,
    tasks_retried: Counter,
    lease_expiries: Counter,
    bytes_read: Counter,
    bytes_written: Counter,
    worker_bytes: Family<Label, Counter>,
    jobs: Family<Label, Gauge>,
    tasks_queued: Gauge,
    tasks_running: Gauge,
    workers_live: Gauge,
    worker_rate: Family<Label, Gauge<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let metrics = Metrics {
            registry: Mutex::new(Registry::with_prefix("shardpress")),
            tasks_leased: Counter::default(),
            tasks_completed: Counter::default(),
            tasks_failed: Counter::default(),
            tasks_retried: Counter::default(),
            lease_expiries: Counter::default(),
            bytes_read: Counter::default(),
            bytes_written: Counter::default(),
            worker_bytes: Family::default(),
            jobs: Family::default(),
            tasks_queued: Gauge::default(),
            tasks_running: Gauge::default(),
            workers_live: Gauge::default(),
            worker_rate: Family::default(),
        };
        metrics.register();
        metrics
    }

    fn register(&self) {
        let mut r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let counters = [
            (
                "tasks_leased",
                "Task leases handed to workers (retries included)",
                &self.tasks_leased,
            ),
            (
                "tasks_completed",
                "Task results accepted",
                &self.tasks_completed,
            ),
            (
                "tasks_failed",
                "Task attempts a worker reported failed",
                &self.tasks_failed,
            ),
            (
                "tasks_retried",
                "Failed or expired task attempts queued again",
                &self.tasks_retried,
            ),
            (
                "lease_expiries",
                "Leases that expired without a heartbeat",
                &self.lease_expiries,
            ),
            (
                "input_bytes",
                "Model bytes read by completed tasks",
                &self.bytes_read,
            ),
            (
                "output_bytes",
                "Output bytes written by completed tasks",
                &self.bytes_written,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
        r.register(
            "worker_input_bytes",
            "Model bytes read by each worker's completed tasks (rate() is its throughput)",
            self.worker_bytes.clone(),
        );
        r.register("jobs", "Jobs by state", self.jobs.clone());
        r.register(
            "tasks_queued",
            "Tasks of running jobs waiting for a worker",
            self.tasks_queued.clone(),
        );
        r.register(
            "tasks_running",
            "Tasks leased now",
            self.tasks_running.clone(),
        );
        r.register(
            "workers_live",
            "Workers heard from within three lease TTLs",
            self.workers_live.clone(),
        );
        r.register(
            "worker_task_bytes_per_second",
            "Each worker's throughput on its current tasks, from its heartbeats' progress",
            self.worker_rate.clone(),
        );
    }

    /// A task was leased.
    pub fn task_leased(&self) {
        self.tasks_leased.inc();
    }

    /// A task's result was accepted from `worker` (its name): it read `input_bytes` of the
    /// model and wrote `output_bytes`.
    pub fn task_completed(&self, worker: &str, input_bytes: u64, output_bytes: u64) {
        self.tasks_completed.inc();
        self.bytes_read.inc_by(input_bytes);
        self.bytes_written.inc_by(output_bytes);
        (self
            .worker_bytes
            .get_or_create(&[("worker", worker.to_string())]))
        .inc_by(input_bytes);
    }

    /// A worker reported a task failed; `retried`: it was queued again.
    pub fn task_failed(&self, retried: bool) {
        self.tasks_failed.inc();
        if retried {
            self.tasks_retried.inc();
        }
    }

    /// `count` leases expired, `retried` of their tasks were queued again.
    pub fn leases_expired(&self, count: u64, retried: u64) {
        self.lease_expiries.inc_by(count);
        self.tasks_retried.inc_by(retried);
    }

    /// Every metric in the Prometheus text format, the gauges set from `view`.
    pub fn encode(&self, view: &ClusterView) -> String {
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        self.jobs.clear();
        for state in JOB_STATES {
            let count = view.jobs.iter().filter(|j| j.state == state).count();
            self.jobs
                .get_or_create(&[("state", state.to_string())])
                .set(count as i64);
        }
        let sum = |f: fn(&crate::state::JobView) -> u32| -> i64 {
            view.jobs.iter().map(|j| i64::from(f(j))).sum()
        };
        self.tasks_queued.set(sum(|j| j.tasks_queued));
        self.tasks_running.set(sum(|j| j.tasks_running));
        self.workers_live
            .set(view.workers.iter().filter(|w| w.live).count() as i64);
        self.worker_rate.clear();
        for worker in view.workers.iter().filter(|w| w.live) {
            let rate = worker.tasks.iter().map(|t| t.bytes_per_second).sum::<f64>();
            let label = [("worker", worker.name.clone())];
            self.worker_rate.get_or_create(&label).set(rate);
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut text, &registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{JobView, WorkerTask, WorkerView};

    fn value(text: &str, series: &str) -> f64 {
        let line = (text.lines())
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn counters_add_up_events_and_gauges_show_the_view() {
        let metrics = Metrics::new();
        metrics.task_leased();
        metrics.task_leased();
        metrics.task_completed("w-a", 100, 30);
        metrics.task_failed(true);
        metrics.leases_expired(1, 1);
        let view = ClusterView {
            jobs: vec![JobView {
                tasks_queued: 3,
                tasks_running: 1,
                ..JobView::example("job-1", "running")
            }],
            workers: vec![WorkerView {
                id: "w1".into(),
                name: "w-a".into(),
                live: true,
                seconds_since_seen: 0.1,
                memory_limit: None,
                tasks: vec![WorkerTask {
                    job_id: "job-1".into(),
                    task_index: 0,
                    attempt: 1,
                    output: "model-00001-of-00002.safetensors".into(),
                    bytes_done: 50,
                    bytes_total: 100,
                    seconds: 2.0,
                    bytes_per_second: 25.0,
                }],
            }],
        };
        let text = metrics.encode(&view);
        assert_eq!(value(&text, "shardpress_tasks_leased_total"), 2.0);
        assert_eq!(value(&text, "shardpress_tasks_completed_total"), 1.0);
        assert_eq!(value(&text, "shardpress_tasks_failed_total"), 1.0);
        assert_eq!(value(&text, "shardpress_tasks_retried_total"), 2.0);
        assert_eq!(value(&text, "shardpress_lease_expiries_total"), 1.0);
        assert_eq!(value(&text, "shardpress_input_bytes_total"), 100.0);
        assert_eq!(value(&text, "shardpress_output_bytes_total"), 30.0);
        let worker_bytes = "shardpress_worker_input_bytes_total{worker=\"w-a\"}";
        assert_eq!(value(&text, worker_bytes), 100.0);
        assert_eq!(value(&text, "shardpress_jobs{state=\"running\"}"), 1.0);
        assert_eq!(value(&text, "shardpress_jobs{state=\"failed\"}"), 0.0);
        assert_eq!(value(&text, "shardpress_tasks_queued"), 3.0);
        assert_eq!(value(&text, "shardpress_tasks_running"), 1.0);
        assert_eq!(value(&text, "shardpress_workers_live"), 1.0);
        let rate = "shardpress_worker_task_bytes_per_second{worker=\"w-a\"}";
        assert_eq!(value(&text, rate), 25.0);
    }

    #[test]
    fn a_worker_gone_leaves_the_throughput_gauge() {
        let metrics = Metrics::new();
        let mut view = ClusterView {
            jobs: Vec::new(),
            workers: vec![WorkerView {
                id: "w1".into(),
                name: "gone".into(),
                live: true,
                seconds_since_seen: 0.0,
                memory_limit: None,
                tasks: Vec::new(),
            }],
        };
        assert!(metrics.encode(&view).contains("worker=\"gone\""));
        view.workers[0].live = false;
        let text = metrics.encode(&view);
        assert!(!text.contains("worker=\"gone\""), "{text}");
        assert_eq!(value(&text, "shardpress_workers_live"), 0.0);
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::new();
        metrics.task_completed("evil\"}\nx 1", 1, 1);
        let text = metrics.encode(&ClusterView::default());
        assert!(!text.contains("\nx 1"), "{text}");
    }
}
