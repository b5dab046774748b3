//! Memory routing: a task whose tensors need more memory than streaming chunks (a pass that
//! holds the whole tensor, or a solver's state; see [`shardpress_core::memory`]) is leased
//! only to a worker whose advertised `--memory-limit` is enough (a worker without a limit
//! takes anything). A task that no live worker can take is reported in the job's message,
//! naming the task, the tensor, the pass and the memory it needs; if that lasts
//! [`crate::CoordinatorConfig::unassignable_timeout`] the job fails with that message rather
//! than wait for a worker that may never come.

use shardpress_core::codec::TensorPlan;
use shardpress_core::memory::{human_bytes, tensor_need};
use shardpress_core::plan::PlannedTask;

use crate::job::JobSpec;

/// The most memory a task's tensors need, and which tensor and pass need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskNeed {
    /// Bytes of memory a worker needs for the task.
    pub bytes: u64,
    pub tensor: String,
    pub pass: String,
}

/// What `task` needs beyond streaming chunks under `spec`'s recipe, or `None`. A tensor
/// whose plan cannot be made here is left to the worker (which reports why).
pub fn task_need(spec: &JobSpec, task: &PlannedTask) -> Option<TaskNeed> {
    task.tensors
        .iter()
        .filter_map(|t| {
            let plan = TensorPlan::for_output(
                &spec.recipe,
                spec.format,
                &spec.facts,
                &t.name,
                t.dtype,
                &t.shape,
            )
            .ok()?;
            let need = tensor_need(&plan, t.dtype, &t.shape)?;
            Some(TaskNeed {
                bytes: need.bytes,
                tensor: t.name.clone(),
                pass: need.pass,
            })
        })
        .max_by_key(|n| n.bytes)
}

/// True when a worker with `memory_limit` (`None`: unlimited) can take a task needing `need`.
pub fn fits(need: Option<&TaskNeed>, memory_limit: Option<u64>) -> bool {
    match (need, memory_limit) {
        (Some(need), Some(limit)) => need.bytes <= limit,
        _ => true,
    }
}

/// The job message for task `index` (`output`), which no live worker can take; `largest`
/// is the largest limit among the live workers.
pub fn unassignable_message(index: usize, output: &str, need: &TaskNeed, largest: u64) -> String {
    format!(
        "task {index} ({output}) waits for a worker with --memory-limit of at least {}: tensor {:?} under {} needs about that much, and the largest live worker has --memory-limit {}; start a worker with a larger (or no) --memory-limit",
        human_bytes(need.bytes),
        need.tensor,
        need.pass,
        human_bytes(largest)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_takes_a_task_its_limit_covers_and_an_unlimited_one_takes_any() {
        let need = TaskNeed {
            bytes: 300_000_000,
            tensor: "w".into(),
            pass: "hashed 0.5".into(),
        };
        assert!(fits(Some(&need), None));
        assert!(fits(Some(&need), Some(300_000_000)));
        assert!(!fits(Some(&need), Some(160_000_000)));
        assert!(fits(None, Some(1)));
        let message =
            unassignable_message(3, "model-00004-of-00009.safetensors", &need, 160_000_000);
        for needle in [
            "task 3",
            "\"w\"",
            "hashed 0.5",
            "300.0 MB",
            "160.0 MB",
            "--memory-limit",
        ] {
            assert!(message.contains(needle), "{needle}: {message}");
        }
    }
}
