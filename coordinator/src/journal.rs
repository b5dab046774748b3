//! A job's journal in its output location, so that a coordinator killed at any moment (SIGKILL,
//! a rescheduled pod, a lost machine) loses no finished task.
//!
//! `OUT/.shardpress/job.json` names the job (its id, what was asked, and a digest of the plan)
//! and is written when the job starts; `OUT/.shardpress/done/{round}-{task}.pb` holds each
//! accepted result (the worker's `CompleteTaskRequest`, protobuf) and is written *before* the
//! coordinator acknowledges it. Submitting the same job to the same output again (the same
//! model, recipe, format and options, so the same plan), or starting a coordinator with
//! `--resume OUT`, reloads it: finished tasks are kept and only the rest are leased. The
//! journal is deleted once the manifest is written.
//!
//! `OUT/.shardpress/claim.json` names the coordinator running the job (host, process id and
//! address) and is renewed while it runs: another coordinator's submission to the same output
//! is refused until the claim is released, has not been renewed for the claim's TTL, or names
//! a process of this host that no longer runs (a coordinator restarted on the same machine, or
//! `run` run again, takes over at once).
//!
//! Only compressing and measuring tasks are journaled. Assembly slices of `.spz` and GGUF files
//! are cheap copies and run again; a task whose part an early assembly slice already consumed
//! is run again too, since its output is no longer there to assemble.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use serde::{Deserialize, Serialize};
use shardpress_core::plan::PlannedTask;
use shardpress_proto::v1::{CompleteTaskRequest, SubmitJobRequest};
use shardpress_store::shared::SharedObject;
use shardpress_store::staged::StagedOutput;
use shardpress_store::{StoreError, StoreLocation};

/// The folder of the journal in the output location.
pub const JOURNAL_DIR: &str = ".shardpress";
const HEAD_NAME: &str = ".shardpress/job.json";
const CLAIM_NAME: &str = ".shardpress/claim.json";
const DONE_DIR: &str = ".shardpress/done";
/// Where attempts stage their outputs until the coordinator commits them (see
/// `shardpress_store::staged`).
const ATTEMPTS_DIR: &str = ".shardpress/attempts";
/// The S3 multipart uploads begun for attempts and not yet completed or aborted, so that a
/// restarted coordinator aborts those of the one before (S3 cannot list them for us).
const UPLOADS_DIR: &str = ".shardpress/uploads";
const HEAD_FORMAT: &str = "shardpress-journal-v1";
/// Results read concurrently when a journal is loaded.
const LOAD_CONCURRENCY: usize = 32;

/// Which round of a job a result belongs to: jobs with a global prune or near-identical
/// sharing measure every task before compressing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// A step of a calibrated job's calibration round.
    Calibrate,
    Measure,
    Compress,
}

impl Round {
    fn prefix(self) -> &'static str {
        match self {
            Round::Calibrate => "k",
            Round::Measure => "m",
            Round::Compress => "c",
        }
    }
}

/// What `job.json` records: enough to resubmit the job, and to tell whether a submission is
/// the same job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalHead {
    pub format: String,
    pub job_id: String,
    /// The model's resolved URL.
    pub model_url: String,
    pub out_url: String,
    pub recipe_yaml: String,
    pub output_format: String,
    pub task_budget: u64,
    pub max_file_bytes: u64,
    pub assembly_slice_bytes: u64,
    pub tasks: u32,
    /// BLAKE3 of the plan (every task's tensors, their source byte ranges, output names): a
    /// model changed since the job started plans differently.
    pub plan_blake3: String,
    /// A calibrated or evaluated job: where its samples come from, and a digest of them as
    /// tokenized (other samples make another job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<JournalCalibration>,
}

/// The calibration part of [`JournalHead`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalCalibration {
    pub request: crate::calibration::CalibrationRequest,
    pub tokens_blake3: String,
    pub steps: u32,
}

impl JournalHead {
    /// The head of job `job_id`: `request` with the model and output as resolved, and the
    /// task budget and slice length the coordinator chose.
    pub fn new(
        job_id: &str,
        request: &SubmitJobRequest,
        spec: &crate::job::JobSpec,
        plan: &[PlannedTask],
    ) -> Self {
        Self {
            format: HEAD_FORMAT.into(),
            job_id: job_id.to_string(),
            model_url: spec.model_url.clone(),
            out_url: spec.out_url.clone(),
            recipe_yaml: request.recipe_yaml.clone(),
            output_format: spec.format.as_str().to_string(),
            task_budget: spec.task_budget,
            max_file_bytes: request.max_file_bytes,
            assembly_slice_bytes: spec.assembly_slice_bytes,
            tasks: plan.len() as u32,
            plan_blake3: plan_digest(plan),
            calibration: spec.calibration.as_ref().map(|c| JournalCalibration {
                request: c.request.clone(),
                tokens_blake3: c.digest.clone(),
                steps: c.plan.steps.len() as u32,
            }),
        }
    }

    /// True when `other` (a new submission's head) asks for the same job.
    pub fn same_job(&self, other: &JournalHead) -> bool {
        let key = |h: &JournalHead| {
            (
                h.model_url.clone(),
                h.recipe_yaml.clone(),
                h.output_format.clone(),
                h.task_budget,
                h.max_file_bytes,
                h.assembly_slice_bytes,
                h.tasks,
                h.plan_blake3.clone(),
                h.calibration.clone(),
            )
        };
        key(self) == key(other)
    }

    /// The submission that resumes this job.
    pub fn request(&self) -> SubmitJobRequest {
        let calibration = (self.calibration.as_ref())
            .map(|c| c.request.clone())
            .unwrap_or_default();
        SubmitJobRequest {
            model_url: self.model_url.clone(),
            out_url: self.out_url.clone(),
            recipe_yaml: self.recipe_yaml.clone(),
            format: self.output_format.clone(),
            task_budget_bytes: self.task_budget,
            max_file_bytes: self.max_file_bytes,
            assembly_slice_bytes: self.assembly_slice_bytes,
            // The recipe was checked when the job began.
            allow_unmatched: true,
            calibration_url: calibration.calibration_url,
            calibration_samples: calibration.calibration_samples,
            calibration_seq_len: calibration.calibration_seq_len,
            eval_url: calibration.eval_url,
            eval_samples: calibration.eval_samples,
            ..Default::default()
        }
    }
}

fn plan_digest(plan: &[PlannedTask]) -> String {
    let mut hasher = blake3::Hasher::new();
    for task in plan {
        // Plain data of our own: serialization cannot fail.
        hasher.update(&serde_json::to_vec(task).unwrap_or_default());
    }
    hasher.finalize().to_hex().to_string()
}

/// Who runs the job writing to an output, renewed while it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claim {
    host: String,
    pid: u32,
    address: String,
    job_id: String,
    renewed_unix_ms: u64,
}

/// The coordinator process making a claim.
#[derive(Debug, Clone)]
pub struct Claimant {
    pub host: String,
    pub pid: u32,
    /// Where it listens, for messages.
    pub address: String,
}

impl Claimant {
    /// This process, listening on `address`.
    pub fn this_process(address: &str) -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        Self {
            host,
            pid: std::process::id(),
            address: address.to_string(),
        }
    }
}

/// Whether process `pid` of this host runs (unknown, so assumed, where `/proc` is missing).
fn process_runs(pid: u32) -> bool {
    let proc = std::path::Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// One accepted result read back from a journal.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub round: Round,
    pub task: u32,
    pub report: CompleteTaskRequest,
}

/// An upload begun for an attempt (see [`Journal::record_upload`]).
#[derive(Serialize, Deserialize)]
struct UploadRecord {
    name: String,
    upload_id: String,
}

/// A job's journal in its output location.
#[derive(Debug, Clone)]
pub struct Journal {
    out: StoreLocation,
}

impl Journal {
    /// The journal of the job writing to `out` (which may not have one yet).
    pub fn at(out: StoreLocation) -> Self {
        Self { out }
    }

    /// The journal's head, if `out` holds one.
    pub async fn head(&self) -> Result<Option<JournalHead>, StoreError> {
        let bytes = match self.out.get(HEAD_NAME).await {
            Ok(bytes) => bytes,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Invalid {
                object: self.out.describe(HEAD_NAME),
                reason: format!("not a shardpress journal: {e}"),
            })
    }

    /// Refuses an output that another coordinator claimed less than `ttl` ago (unless that
    /// process of this host is gone). Only reads.
    pub async fn check_claim(
        &self,
        me: &Claimant,
        ttl: std::time::Duration,
    ) -> Result<(), crate::CoordinatorError> {
        let bytes = match self.out.get(CLAIM_NAME).await {
            Ok(bytes) => bytes,
            Err(StoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        // An unreadable claim is no claim: it was not written by a running coordinator.
        let Ok(claim) = serde_json::from_slice::<Claim>(&bytes) else {
            return Ok(());
        };
        let age = std::time::Duration::from_millis(unix_ms().saturating_sub(claim.renewed_unix_ms));
        let here = claim.host == me.host;
        let mine = here && claim.pid == me.pid;
        let gone = here && !process_runs(claim.pid);
        if mine || gone || age >= ttl {
            return Ok(());
        }
        Err(crate::CoordinatorError::InvalidRequest(format!(
            "the output {} is claimed by job {} of the coordinator at {} (host {}, pid {}; renewed {:.0} s ago): one coordinator at a time writes there; wait for that job to end, or for its claim to lapse {:.0} s after that coordinator stops",
            self.out.url(),
            claim.job_id,
            claim.address,
            claim.host,
            claim.pid,
            age.as_secs_f64(),
            ttl.as_secs_f64()
        )))
    }

    /// Claims the output for `job_id` of `me`, or renews the claim.
    pub async fn claim(&self, me: &Claimant, job_id: &str) -> Result<(), StoreError> {
        let claim = Claim {
            host: me.host.clone(),
            pid: me.pid,
            address: me.address.clone(),
            job_id: job_id.to_string(),
            renewed_unix_ms: unix_ms(),
        };
        let bytes = serde_json::to_vec_pretty(&claim).unwrap_or_default();
        self.out.put(CLAIM_NAME, Bytes::from(bytes)).await
    }

    /// Releases the claim of a job that ended without finishing (its journal stays, to
    /// resume from).
    pub async fn release_claim(&self) -> Result<(), StoreError> {
        self.out.delete(CLAIM_NAME).await
    }

    /// Starts the journal of a new job (replacing any earlier one's).
    pub async fn begin(&self, head: &JournalHead) -> Result<(), StoreError> {
        self.remove().await?;
        let bytes = serde_json::to_vec_pretty(head).unwrap_or_default();
        self.out.put(HEAD_NAME, Bytes::from(bytes)).await
    }

    /// Records an accepted result; returns once it is stored.
    pub async fn record(
        &self,
        round: Round,
        task: u32,
        report: &CompleteTaskRequest,
    ) -> Result<(), StoreError> {
        let name = format!("{DONE_DIR}/{}-{task:07}.pb", round.prefix());
        self.out
            .put(&name, Bytes::from(report.encode_to_vec()))
            .await
    }

    /// The staging object of `attempt` of `task`, leased by the coordinator started at
    /// `epoch` (attempt numbers start again when a coordinator restarts).
    pub fn staging_name(job_id: &str, task: u32, epoch: &str, attempt: u32) -> String {
        format!("{}/{task:07}.{epoch}.{attempt}", Self::attempts_of(job_id))
    }

    /// The folder of the staging objects of `job_id`'s attempts.
    pub fn attempts_of(job_id: &str) -> String {
        format!("{ATTEMPTS_DIR}/{job_id}")
    }

    fn upload_record(staged: &StagedOutput) -> String {
        staged.staging.replacen(ATTEMPTS_DIR, UPLOADS_DIR, 1)
    }

    /// Records an S3 upload begun for an attempt, before the worker is told of it.
    pub async fn record_upload(&self, staged: &StagedOutput) -> Result<(), StoreError> {
        let record = Self::upload_record(staged);
        self.put_upload_record(&record, &staged.name, &staged.upload_id)
            .await
    }

    fn shared_upload_record(object: &SharedObject) -> String {
        format!("{UPLOADS_DIR}/shared/{}", object.name)
    }

    /// Records the S3 upload of a file that several workers write (an assembled `.spz` or
    /// GGUF file), before any worker is told of it.
    pub async fn record_shared_upload(&self, object: &SharedObject) -> Result<(), StoreError> {
        let record = Self::shared_upload_record(object);
        self.put_upload_record(&record, &object.name, &object.upload_id)
            .await
    }

    /// Forgets the upload of a shared file that was completed or aborted (best effort).
    pub async fn forget_shared_upload(&self, object: &SharedObject) {
        if !object.upload_id.is_empty() {
            (self.out.delete(&Self::shared_upload_record(object)).await).ok();
        }
    }

    async fn put_upload_record(
        &self,
        record: &str,
        name: &str,
        upload_id: &str,
    ) -> Result<(), StoreError> {
        let upload = UploadRecord {
            name: name.to_string(),
            upload_id: upload_id.to_string(),
        };
        let bytes = serde_json::to_vec(&upload).unwrap_or_default();
        self.out.put(record, Bytes::from(bytes)).await
    }

    /// Forgets an upload that was completed or aborted (best effort: a record left over only
    /// costs an abort of an upload that is gone).
    pub async fn forget_upload(&self, staged: &StagedOutput) {
        if !staged.upload_id.is_empty() {
            self.out.delete(&Self::upload_record(staged)).await.ok();
        }
    }

    /// Aborts every recorded upload (those of a coordinator that was stopped, or all that
    /// are left when the job ends) and forgets them; returns how many there were.
    pub async fn abort_recorded_uploads(&self) -> Result<usize, StoreError> {
        let uploads = self.out.child_location(UPLOADS_DIR);
        let names = match uploads.list_all().await {
            Ok(names) => names,
            Err(StoreError::NotFound { .. }) => return Ok(0),
            Err(e) => return Err(e),
        };
        let aborted: Vec<()> = futures::stream::iter(names)
            .map(|name| {
                let (uploads, out) = (uploads.clone(), self.out.clone());
                async move {
                    if let Ok(bytes) = uploads.get(&name).await {
                        if let Ok(record) = serde_json::from_slice::<UploadRecord>(&bytes) {
                            let staged = StagedOutput {
                                name: record.name,
                                staging: String::new(),
                                upload_id: record.upload_id,
                            };
                            out.discard_staged(&staged).await;
                        }
                    }
                    uploads.delete(&name).await
                }
            })
            .buffer_unordered(LOAD_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(aborted.len())
    }

    /// Every result recorded, in task order (measuring round first).
    pub async fn results(&self) -> Result<Vec<Recorded>, StoreError> {
        let done = self.out.child_location(DONE_DIR);
        let names = done.list_all().await?;
        let parsed: Vec<(String, Round, u32)> = names
            .into_iter()
            .filter_map(|name| {
                let stem = name.strip_suffix(".pb")?;
                let (round, task) = stem.split_once('-')?;
                let round = match round {
                    "k" => Round::Calibrate,
                    "m" => Round::Measure,
                    "c" => Round::Compress,
                    _ => return None,
                };
                Some((name.clone(), round, task.parse().ok()?))
            })
            .collect();
        let done = &done;
        let mut results: Vec<Recorded> = futures::stream::iter(parsed)
            .map(|(name, round, task)| async move {
                let bytes = done.get(&name).await?;
                let report =
                    CompleteTaskRequest::decode(bytes).map_err(|e| StoreError::Invalid {
                        object: done.describe(&name),
                        reason: format!("not a journaled task result: {e}"),
                    })?;
                Ok::<_, StoreError>(Recorded {
                    round,
                    task,
                    report,
                })
            })
            .buffer_unordered(LOAD_CONCURRENCY)
            .try_collect()
            .await?;
        results.sort_by_key(|r| (r.round == Round::Compress, r.task));
        Ok(results)
    }

    /// Deletes the journal (after the manifest is written, or before a new job starts), with
    /// what attempts staged and the uploads begun for them.
    pub async fn remove(&self) -> Result<(), StoreError> {
        self.abort_recorded_uploads().await?;
        // Staging files of killed workers are hidden from listings (object_store writes
        // `NAME#N` and renames it when complete).
        self.out.remove_local_tree(ATTEMPTS_DIR);
        let journal = self.out.child_location(JOURNAL_DIR);
        let names = journal.list_all().await?;
        futures::stream::iter(names)
            .map(|name| {
                let journal = &journal;
                async move { journal.delete(&name).await }
            })
            .buffer_unordered(LOAD_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        self.out.remove_local_tree(crate::calibration::CALIB_DIR);
        self.out.remove_empty_dir(DONE_DIR);
        self.out.remove_empty_dir(JOURNAL_DIR);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn claim_json(host: &str, pid: u32, age: Duration) -> Bytes {
        let claim = Claim {
            host: host.into(),
            pid,
            address: "10.0.0.7:50051".into(),
            job_id: "job-1".into(),
            renewed_unix_ms: unix_ms() - age.as_millis() as u64,
        };
        Bytes::from(serde_json::to_vec(&claim).unwrap())
    }

    #[tokio::test]
    async fn a_claim_holds_off_other_coordinators_until_it_lapses_or_its_process_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let out = StoreLocation::open(dir.path().to_str().unwrap()).unwrap();
        let journal = Journal::at(out.clone());
        let me = Claimant::this_process("127.0.0.1:1");
        let ttl = Duration::from_secs(30);
        // Nothing claimed, and a claim of our own: free.
        journal.check_claim(&me, ttl).await.unwrap();
        journal.claim(&me, "job-1").await.unwrap();
        journal.check_claim(&me, ttl).await.unwrap();
        // Another host's fresh claim is refused, naming it; a lapsed one is not.
        let fresh = claim_json("elsewhere", 7, Duration::from_secs(3));
        out.put(CLAIM_NAME, fresh).await.unwrap();
        let refused = journal.check_claim(&me, ttl).await.unwrap_err().to_string();
        assert!(
            refused.contains("10.0.0.7:50051") && refused.contains("job-1"),
            "{refused}"
        );
        let lapsed = claim_json("elsewhere", 7, Duration::from_secs(31));
        out.put(CLAIM_NAME, lapsed).await.unwrap();
        journal.check_claim(&me, ttl).await.unwrap();
        // This host: a running process's claim holds, a gone process's does not.
        let parent = std::os::unix::process::parent_id();
        out.put(CLAIM_NAME, claim_json(&me.host, parent, Duration::ZERO))
            .await
            .unwrap();
        assert!(journal.check_claim(&me, ttl).await.is_err());
        let gone = u32::MAX - 1;
        out.put(CLAIM_NAME, claim_json(&me.host, gone, Duration::ZERO))
            .await
            .unwrap();
        journal.check_claim(&me, ttl).await.unwrap();
        journal.release_claim().await.unwrap();
        journal.check_claim(&me, ttl).await.unwrap();
    }
}
