//! Write fencing on the coordinator's side (see `shardpress_store::staged`): where each
//! attempt stages its output, what accepting a result commits first, and dropping what
//! attempts that were given up staged.

use shardpress_proto::v1::task_lease::Kind;
use shardpress_proto::v1::{JobState, StagedOutput as ProtoStaged, TaskLease, TaskRef};
use shardpress_store::staged::StagedOutput;
use shardpress_store::StoreLocation;

use super::{Coordinator, Instant};
use crate::job::{Phase, TaskStatus};
use crate::journal::{Journal, Round};

/// What must be done before a result is accepted (see [`Coordinator::accepting`]).
pub struct Accepting {
    /// Where the result is recorded first.
    pub journal: Journal,
    /// The round it belongs to; `None` for an assembly slice, which is not journaled.
    pub round: Option<Round>,
    /// The name of the worker that sent it.
    pub worker_name: String,
    pub out_url: String,
    /// The attempt's staged output, committed under its final name first.
    pub staged: Option<StagedOutput>,
}

/// Deletes or aborts (in the background, best effort) what attempts that were given up
/// staged: nothing of theirs can be committed any more.
pub(super) fn discard_staged(out_url: &str, journal: &Journal, discarded: Vec<StagedOutput>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let (out_url, journal) = (out_url.to_string(), journal.clone());
    runtime.spawn(async move {
        let Ok(out) = StoreLocation::open(&out_url) else {
            return;
        };
        for staged in &discarded {
            out.discard_staged(staged).await;
            journal.forget_upload(staged).await;
        }
    });
}

impl Coordinator {
    /// What accepting a result of `task` needs done first, if `task` is the current attempt
    /// of a running job (`None`: the result will be refused).
    pub fn accepting(&self, task: &TaskRef) -> Option<Accepting> {
        let inner = self.lock();
        let entry = inner.jobs.get(&task.job_id)?;
        let job = &entry.job;
        let slot = job.tasks.get(task.task_index as usize)?;
        let current = job.state == JobState::Running
            && slot.attempt == task.attempt
            && matches!(&slot.status, TaskStatus::Leased { worker, .. } if *worker == task.worker_id);
        if !current {
            return None;
        }
        let round = match job.phase {
            Phase::Calibrating => Round::Calibrate,
            Phase::Measuring => Round::Measure,
            _ => Round::Compress,
        };
        let name = (inner.workers.get(&task.worker_id))
            .map_or_else(|| task.worker_id.clone(), |w| w.name.clone());
        Some(Accepting {
            journal: entry.journal.clone(),
            round: slot.assemble.is_none().then_some(round),
            worker_name: name,
            out_url: job.spec.out_url.clone(),
            staged: slot.staged.clone(),
        })
    }

    /// Says where the lease's attempt writes its output, when it writes an object of its
    /// own (see `shardpress_store::staged`): an S3 upload is begun (and journaled, so that a
    /// restarted coordinator can abort it) before the worker hears of it. `None` when the
    /// lease was lost meanwhile or staging failed (the attempt then counts as failed).
    pub(super) async fn stage(&self, mut lease: TaskLease) -> Option<TaskLease> {
        let writes_own_object = match &lease.kind {
            Some(Kind::Compress(task)) => task.write_at.is_none(),
            Some(Kind::Assemble(slice)) => slice.slices == 1 && !slice.hash_only,
            Some(Kind::Calibrate(step)) => {
                !lease.output_name.is_empty()
                    && step.step != shardpress_proto::v1::calibrate_task::Step::Eval as i32
            }
            Some(Kind::Measure(_)) | None => false,
        };
        if !writes_own_object {
            return Some(lease);
        }
        let journal = {
            let inner = self.lock();
            inner.jobs.get(&lease.job_id).map(|e| e.journal.clone())?
        };
        let staging =
            Journal::staging_name(&lease.job_id, lease.task_index, &self.epoch, lease.attempt);
        let begun = async {
            let out = StoreLocation::open(&lease.out_url)?;
            let staged = out.begin_staged(&lease.output_name, &staging).await?;
            if !staged.upload_id.is_empty() {
                if let Err(e) = journal.record_upload(&staged).await {
                    out.discard_staged(&staged).await;
                    return Err(e);
                }
            }
            Ok::<_, shardpress_store::StoreError>(staged)
        }
        .await;
        let task = TaskRef {
            job_id: lease.job_id.clone(),
            task_index: lease.task_index,
            attempt: lease.attempt,
            worker_id: String::new(),
        };
        let mut inner = self.lock();
        let entry = inner.jobs.get_mut(&lease.job_id)?;
        let slot = entry.job.tasks.get_mut(lease.task_index as usize)?;
        let current = slot.attempt == lease.attempt
            && matches!(slot.status, TaskStatus::Leased { .. })
            && entry.job.state == JobState::Running;
        let holder = match &slot.status {
            TaskStatus::Leased { worker, .. } => worker.clone(),
            _ => String::new(),
        };
        match begun {
            Ok(staged) if current => {
                lease.staged = Some(ProtoStaged {
                    staging: staged.staging.clone(),
                    upload_id: staged.upload_id.clone(),
                });
                slot.staged = Some(staged);
                Some(lease)
            }
            Ok(staged) => {
                entry.job.discarded.push(staged);
                inner.publish(&task.job_id, self.config.lease_ttl);
                None
            }
            Err(e) => {
                let message = format!("cannot begin writing {}: {e}", lease.output_name);
                tracing::warn!(job = %task.job_id, task = task.task_index, "{message}");
                if current {
                    let _ = entry.job.fail(
                        task.task_index,
                        task.attempt,
                        &holder,
                        &message,
                        e.is_retryable(),
                        self.config.max_attempts,
                        Some(Instant::now()),
                    );
                    inner.publish(&task.job_id, self.config.lease_ttl);
                }
                None
            }
        }
    }
}
