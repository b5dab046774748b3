//! The lease table's rules, on plain `Instant`s.

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
        calibration: None,
        calibrated: None,
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
    job.start_compression(measured(cut), None);
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.phase, Phase::Compressing);
    let cut_now = |job: &Job| job.spec.measured.as_ref().and_then(|m| m.cut);
    assert_eq!(cut_now(&job), Some(cut));
    assert_eq!(job.tasks_done(), 0);
    // A second call (a duplicate finalize) changes nothing.
    job.start_compression(
        measured(GlobalCut {
            bin: 1,
            tie_fraction: 0.0,
        }),
        None,
    );
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
    assert_eq!(job.expire_leases(t0 + TTL, 5), 1);
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
    assert_eq!(job.expire_leases(t0 + TTL, 5), 1);
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
    assert_eq!(job.expire_leases(t0 + TTL, 5), 0);
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
    let rest = crate::assembly::after_early(whole.clone(), &early_assembly, &job.tasks).unwrap();
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
