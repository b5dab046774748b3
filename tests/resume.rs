//! A coordinator killed with SIGKILL at seeded random moments of a job, including while it
//! finalizes, then started again on the same address: its workers (never restarted) register
//! again, the job resumes from the journal in its output when submitted again (or with
//! `coordinator --resume`), no task finished before the kill runs again, and the output is
//! byte-identical to an undisturbed run's.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Every worker's chunk length: small, so that tasks take several chunks.
const CHUNKS: &[&str] = &["--chunk-mb", "0.25"];

/// Tasks whose results the journal in `out` holds.
fn journaled(out: &Path) -> BTreeSet<u32> {
    let Ok(entries) = std::fs::read_dir(out.join(".shardpress/done")) else {
        return BTreeSet::new();
    };
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("c-")?.strip_suffix(".pb")?.parse().ok()
        })
        .collect()
}

/// The output's files but the report and manifest (which hold timings and the report's
/// hash), each with its size and BLAKE3.
fn model_files(out: &Path) -> BTreeMap<String, (usize, String)> {
    let mut files = manifest_objects(out);
    files.remove("report.json");
    files.remove("report.html");
    files.remove("manifest.json");
    let hashed = files.into_iter().map(|(name, bytes)| {
        let hash = blake3::hash(&bytes).to_hex().to_string();
        (name, (bytes.len(), hash))
    });
    hashed.collect()
}

/// Task indices a coordinator's log shows leased.
fn leased(log: &Path) -> Vec<u32> {
    let log = std::fs::read_to_string(log).unwrap();
    log.lines()
        .filter(|l| l.contains("task leased"))
        .filter_map(|l| l.split(" task=").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

/// splitmix64: the test's kill moments, fixed by seed.
fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Assembled in 1 MiB slices: an .spz archive's early slices consume parts while tasks run.
const SLICES: &[&str] = &["--assembly-slice-mib", "1"];

fn spawn_compress(
    cluster: &TestCluster,
    model: &Path,
    out: &Path,
    recipe: &str,
    format: &str,
) -> Child {
    cluster
        .compress_command(model, out, recipe)
        .args(["--format", format])
        .args(SLICES)
        .args(["--reconnect-secs", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn compress(
    cluster: &TestCluster,
    model: &Path,
    out: &Path,
    recipe: &str,
    format: &str,
) -> std::process::Output {
    let mut command = cluster.compress_command(model, out, recipe);
    command
        .args(["--format", format])
        .args(SLICES)
        .output()
        .unwrap()
}

/// An undisturbed run's output files.
fn reference(model: &Path, recipe: &str, format: &str) -> BTreeMap<String, (usize, String)> {
    let mut cluster = TestCluster::start(5.0);
    // An .spz archive's records follow the chunks its workers read.
    cluster.add_worker("r1", CHUNKS);
    let out = cluster.dir.path().join("reference");
    let done = compress(&cluster, model, &out, recipe, format);
    assert_success(&done, "undisturbed run");
    model_files(&out)
}

#[test]
fn a_coordinator_killed_at_random_moments_resumes_its_job_without_redoing_finished_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "12MB", "bf16", 2);
    // (seed, recipe, format): safetensors shards; an .spz archive assembled while the tasks
    // run (its slices consume parts, whose tasks then run again); GGUF written in place.
    let runs = [
        (1u64, "int8", "safetensors"),
        (2, "int4-g128", "safetensors"),
        (3, "int8", "spz"),
        (4, "q8_0", "gguf"),
        (5, "int8", "spz"),
    ];
    let mut references = BTreeMap::new();
    for (seed, recipe, format) in runs {
        let expected = references
            .entry((recipe, format))
            .or_insert_with(|| reference(&model, recipe, format))
            .clone();
        let mut cluster = TestCluster::start(5.0);
        for name in ["a", "b"] {
            cluster.add_worker(
                name,
                &["--chunk-mb", "0.25", "--debug-delay-per-chunk-ms", "30"],
            );
        }
        let out = cluster.dir.path().join("out");
        let mut first = spawn_compress(&cluster, &model, &out, recipe, format);
        cluster.wait_for_log("coordinator", "task leased", Duration::from_secs(30));
        let kill_after = Duration::from_millis(100 + splitmix(seed) % 1000);
        std::thread::sleep(kill_after);
        cluster.kill_coordinator();
        let finished_before = journaled(&out);
        // The client loses its coordinator and says so.
        assert!(!first.wait().unwrap().success(), "seed {seed}");
        let log = cluster.restart_coordinator(&["--lease-ttl-secs", "5"]);
        let again = compress(&cluster, &model, &out, recipe, format);
        assert_success(
            &again,
            &format!("seed {seed}: the same job submitted again"),
        );
        let what = format!("seed {seed} ({recipe}, {format}), killed after {kill_after:?}");
        assert!(
            stderr(&again).contains("resuming:") || finished_before.is_empty(),
            "{what}"
        );
        assert_eq!(
            model_files(&out),
            expected,
            "{what}: output differs from an undisturbed run"
        );
        assert!(
            !out.join(".shardpress").exists(),
            "{what}: the journal outlived the job"
        );
        let report = report(&out);
        let restored = report["summary"]["tasks_restored"].as_u64().unwrap() as usize;
        eprintln!(
            "{what}: {} of {} tasks journaled, {restored} kept",
            finished_before.len(),
            report["tasks"].as_array().map_or(0, Vec::len)
        );
        let redone: Vec<u32> = leased(&cluster.log_path(&log))
            .into_iter()
            .filter(|t| finished_before.contains(t))
            .collect();
        if format == "safetensors" {
            // Every journaled task's shard is there: none runs again.
            assert_eq!(restored, finished_before.len(), "{what}");
            assert!(
                redone.is_empty(),
                "{what}: finished tasks leased again: {redone:?}"
            );
        } else {
            // A part already copied into the archive is gone; only those tasks run again.
            assert!(restored <= finished_before.len(), "{what}");
            assert_eq!(redone.len(), finished_before.len() - restored, "{what}");
        }
        for name in ["a", "b"] {
            assert!(cluster.worker_alive(name), "{what}: worker {name} exited");
            let log = std::fs::read_to_string(cluster.log_path(name)).unwrap();
            assert!(
                log.contains("registering again"),
                "{what}: worker {name} log:\n{log}"
            );
        }
        let verify = shardpress(&["verify", out.to_str().unwrap()]);
        assert_success(&verify, &what);
    }
}

#[test]
fn a_coordinator_killed_while_finalizing_resumes_with_its_resume_flag() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "6MB", "bf16", 2);
    let expected = reference(&model, "int8", "safetensors");
    // Finalizing pauses before the report and manifest: the kill lands inside it.
    let mut cluster = TestCluster::start_with(&["--debug-finalize-delay-ms", "60000"]);
    cluster.add_worker("a", &[]);
    let out = cluster.dir.path().join("out");
    let mut first = spawn_compress(&cluster, &model, &out, "int8", "safetensors");
    let started = Instant::now();
    let tasks = loop {
        let status = Command::new(BIN)
            .args(["jobs", "--coordinator", &cluster.url, "--json"])
            .output()
            .unwrap();
        let jobs: serde_json::Value =
            serde_json::from_slice(&status.stdout).unwrap_or(serde_json::Value::Null);
        let job = &jobs[0];
        if job["state"].as_str() == Some("finalizing") {
            break job["tasks_total"].as_u64().unwrap() as usize;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never finalizing: {jobs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    cluster.kill_coordinator();
    assert!(!first.wait().unwrap().success());
    assert_eq!(journaled(&out).len(), tasks);
    assert!(!out.join("manifest.json").exists());
    let out_url = out.to_str().unwrap();
    let log = cluster.restart_coordinator(&["--resume", out_url]);
    // The resumed job keeps its id; `watch` follows it to the end.
    let head: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join(".shardpress/job.json")).unwrap_or_default(),
    )
    .unwrap_or(serde_json::Value::Null);
    let job_id = head["job_id"].as_str().map(str::to_string);
    let watched = match job_id {
        Some(id) => Command::new(BIN)
            .args(["watch", &id, "--coordinator", &cluster.url])
            .output()
            .unwrap(),
        // Finished already: the journal is gone with it.
        None => Command::new("true").output().unwrap(),
    };
    assert_success(&watched, "watch the resumed job");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !out.join("manifest.json").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(model_files(&out), expected);
    assert_eq!(
        report(&out)["summary"]["tasks_restored"].as_u64(),
        Some(tasks as u64)
    );
    assert!(
        leased(&cluster.log_path(&log)).is_empty(),
        "a finished task ran again"
    );
}

#[test]
fn another_job_is_refused_an_output_holding_an_unfinished_job_unless_it_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "6MB", "bf16", 2);
    let mut cluster = TestCluster::start(5.0);
    cluster.add_worker("a", &["--debug-delay-per-chunk-ms", "40"]);
    let out = cluster.dir.path().join("out");
    let mut first = spawn_compress(&cluster, &model, &out, "int8", "safetensors");
    let deadline = Instant::now() + Duration::from_secs(60);
    while journaled(&out).len() < 2 {
        assert!(Instant::now() < deadline, "no task finished");
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.kill_coordinator();
    let _ = first.wait();
    cluster.restart_coordinator(&[]);
    let other = compress(&cluster, &model, &out, "int4-g128", "safetensors");
    assert_eq!(other.status.code(), Some(3), "{}", stderr(&other));
    assert!(
        stderr(&other).contains("holds the unfinished job"),
        "{}",
        stderr(&other)
    );
    let replaced = cluster
        .compress_command(&model, &out, "int4-g128")
        .arg("--overwrite")
        .output()
        .unwrap();
    assert_success(&replaced, "--overwrite");
    assert!(!stderr(&replaced).contains("resuming"));
    assert!(!out.join(".shardpress").exists());
    assert_eq!(report(&out)["summary"]["tasks_restored"].as_u64(), Some(0));
    assert_success(&shardpress(&["verify", out.to_str().unwrap()]), "verify");
}

#[test]
fn a_worker_that_cannot_renew_its_lease_stops_and_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "6MB", "bf16", 2);
    let mut cluster = TestCluster::start(1.0);
    // Tasks of several chunks, each slower than a third of the lease.
    cluster.add_worker(
        "a",
        &[CHUNKS, &["--debug-delay-per-chunk-ms", "400"]].concat(),
    );
    let out = cluster.dir.path().join("out");
    let mut client = spawn_compress(&cluster, &model, &out, "int8", "safetensors");
    cluster.wait_for_log("a", "task acquired", Duration::from_secs(30));
    cluster.kill_coordinator();
    let _ = client.wait();
    let log = std::fs::read_to_string(cluster.log_path("a")).unwrap();
    let running = log
        .lines()
        .rfind(|l| l.contains("task acquired"))
        .and_then(|l| l.split(" output=").nth(1)?.split(' ').next())
        .unwrap()
        .to_string();
    cluster.wait_for_log(
        "a",
        "no heartbeat reached the coordinator for a whole lease",
        Duration::from_secs(30),
    );
    // Long enough for the task's remaining chunks to have run.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !out.join(&running).exists(),
        "{running} was written after its lease was lost"
    );
    assert!(
        cluster.worker_alive("a"),
        "the worker waits for its coordinator"
    );
}

#[test]
fn one_coordinator_at_a_time_writes_to_an_output() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "6MB", "bf16", 2);
    let mut first = TestCluster::start(5.0);
    first.add_worker(
        "a",
        &[CHUNKS, &["--debug-delay-per-chunk-ms", "40"]].concat(),
    );
    let out = dir.path().join("out");
    let mut client = spawn_compress(&first, &model, &out, "int8", "safetensors");
    let deadline = Instant::now() + Duration::from_secs(60);
    while journaled(&out).is_empty() {
        assert!(Instant::now() < deadline, "no task finished");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A second coordinator may neither join the running job (same job: it would resume it
    // beside the first) nor replace it.
    let mut second = TestCluster::start(5.0);
    second.add_worker("b", CHUNKS);
    let same = compress(&second, &model, &out, "int8", "safetensors");
    assert_eq!(same.status.code(), Some(3), "{}", stderr(&same));
    assert!(
        stderr(&same).contains("is claimed by job"),
        "{}",
        stderr(&same)
    );
    let replacing = second
        .compress_command(&model, &out, "int4-g128")
        .arg("--overwrite")
        .output()
        .unwrap();
    assert_eq!(replacing.status.code(), Some(3), "{}", stderr(&replacing));
    // Once the first coordinator is gone (a process of this host that no longer runs), the
    // second resumes the job at once.
    first.kill_coordinator();
    let _ = client.wait();
    let resumed = compress(&second, &model, &out, "int8", "safetensors");
    assert_success(&resumed, "the job resumed by the second coordinator");
    assert!(
        stderr(&resumed).contains("resuming:"),
        "{}",
        stderr(&resumed)
    );
    assert_success(&shardpress(&["verify", out.to_str().unwrap()]), "verify");
}

#[test]
fn a_client_waits_for_a_restarted_coordinator_and_submits_its_job_again() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "6MB", "bf16", 2);
    let expected = reference(&model, "int8", "safetensors");
    let mut cluster = TestCluster::start(5.0);
    cluster.add_worker(
        "a",
        &[CHUNKS, &["--debug-delay-per-chunk-ms", "30"]].concat(),
    );
    let out = cluster.dir.path().join("out");
    let client = cluster
        .compress_command(&model, &out, "int8")
        .args(SLICES)
        .arg("--overwrite")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while journaled(&out).len() < 2 {
        assert!(Instant::now() < deadline, "no task finished");
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.kill_coordinator();
    std::thread::sleep(Duration::from_millis(500));
    cluster.restart_coordinator(&[]);
    let done = client.wait_with_output().unwrap();
    assert_success(&done, "the client across a coordinator restart");
    let said = stderr(&done);
    assert!(
        said.contains("lost the coordinator") && said.contains("resuming:"),
        "{said}"
    );
    assert_eq!(model_files(&out), expected);
    // --overwrite applied to the first submission only: the journal was kept.
    assert!(report(&out)["summary"]["tasks_restored"].as_u64().unwrap() >= 2);
}

#[test]
fn a_stale_worker_never_replaces_a_committed_object() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "6MB", "bf16", 2);
    let mut cluster = TestCluster::start(1.0);
    // Stopped after its last check of the lease, before its output is finished: what a
    // process paused at the worst moment (SIGSTOP, a frozen VM) does.
    cluster.add_worker(
        "paused",
        &[CHUNKS, &["--debug-stall-before-finish-ms", "10000"]].concat(),
    );
    let out = dir.path().join("out");
    let mut client = spawn_compress(&cluster, &model, &out, "int8", "safetensors");
    cluster.wait_for_log("paused", "task acquired", Duration::from_secs(30));
    let log = std::fs::read_to_string(cluster.log_path("paused")).unwrap();
    let stale = log
        .lines()
        .find(|l| l.contains("task acquired"))
        .and_then(|l| l.split(" output=").nth(1)?.split(' ').next())
        .unwrap()
        .to_string();
    // Its coordinator dies; a new one runs another job into the same output to the end
    // while the stale attempt sleeps.
    cluster.kill_coordinator();
    let _ = client.wait();
    cluster.restart_coordinator(&[]);
    cluster.add_worker("b", CHUNKS);
    let second = cluster
        .compress_command(&model, &out, "int4-g128")
        .arg("--overwrite")
        .output()
        .unwrap();
    assert_success(&second, "the second job");
    assert!(
        manifest_objects(&out).contains_key(&stale),
        "the second job writes {stale} too"
    );
    // The stale attempt wakes up and finishes its output (int8: not the second job's bytes).
    // It was staged, in a journal the second job has deleted: it fails, and nothing of it is
    // left (a result it could still report would be refused, and its staging deleted).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(cluster.log_path("paused")).unwrap();
        if log.contains("task failed") || log.contains("result not accepted") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stale attempt never ended:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_success(&shardpress(&["verify", out.to_str().unwrap()]), "verify");
    let left: Vec<String> = files_under(&out)
        .into_iter()
        .filter(|f| f.starts_with(".shardpress") || f.contains('#'))
        .collect();
    assert!(left.is_empty(), "left in the output: {left:?}");
}
