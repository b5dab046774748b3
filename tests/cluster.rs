//! Whole-system tests on a real multi-process cluster: a coordinator process and worker
//! processes of the built binary talking gRPC over loopback, with the local filesystem as the
//! object store.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const RECIPE_INT4: &str = "int4-g128";

fn is_targeted(name: &str, shape: &[usize]) -> bool {
    name.ends_with(".weight")
        && shape.len() >= 2
        && !name.contains("embed_tokens")
        && !name.contains("lm_head")
}

/// Checks every output tensor against the input: targeted ones equal an independent RTN
/// dequantization (group 128, symmetric, 4 bits) rounded to the input dtype; the rest are
/// byte-identical copies.
fn check_against_reference(model: &Path, out: &Path) {
    let input = load_tensors(model);
    let output = load_tensors(out);
    assert_eq!(
        input.keys().collect::<Vec<_>>(),
        output.keys().collect::<Vec<_>>()
    );
    let mut compressed = 0;
    for (name, (dtype, shape, bytes)) in &input {
        let (out_dtype, out_shape, out_bytes) = &output[name];
        assert_eq!((dtype, shape), (out_dtype, out_shape), "{name}");
        if !is_targeted(name, shape) {
            assert_eq!(bytes, out_bytes, "{name} should be copied unchanged");
            continue;
        }
        compressed += 1;
        let original = decode(*dtype, bytes);
        let got = decode(*dtype, out_bytes);
        let row_len: usize = shape[1..].iter().product();
        let mut differing = 0;
        for (row, got_row) in original.chunks(row_len).zip(got.chunks(row_len)) {
            for (group, got_group) in row.chunks(128).zip(got_row.chunks(128)) {
                let expected = reference_rtn(*dtype, group, 4, true);
                for (e, g) in expected.iter().zip(got_group) {
                    if encode_like(*dtype, *e) != *g {
                        differing += 1;
                    }
                }
            }
        }
        assert_eq!(
            differing, 0,
            "{name}: {differing} values differ from the reference dequantization"
        );
        assert_ne!(bytes, out_bytes, "{name} was not quantized");
    }
    assert!(compressed > 0);
}

fn check_index(model: &Path, out: &Path) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let weight_map = index["weight_map"].as_object().unwrap();
    let output = load_tensors(out);
    assert_eq!(weight_map.len(), output.len());
    for (tensor, file) in weight_map {
        let bytes = std::fs::read(out.join(file.as_str().unwrap())).unwrap();
        let shard = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(shard.tensor(tensor).is_ok(), "{tensor} not in {file}");
    }
    assert_eq!(load_tensors(model).len(), weight_map.len());
}

#[test]
fn three_worker_processes_compress_a_sharded_model_matching_an_independent_dequantization() {
    let mut cluster = TestCluster::start(5.0);
    let model = cluster.dir.path().join("model");
    let out = cluster.dir.path().join("out");
    gen_model(&model, "6MB", "bf16", 2);
    assert!(
        model.join("model.safetensors.index.json").exists(),
        "the model should be sharded"
    );
    for name in ["w1", "w2", "w3"] {
        cluster.add_worker(name, &[]);
    }
    let result = cluster.compress(&model, &out, RECIPE_INT4);
    assert_success(&result, "compress");
    check_against_reference(&model, &out);
    check_index(&model, &out);
    let objects = manifest_objects(&out);
    assert!(objects.contains_key("config.json") && objects.contains_key("report.json"));
    let report: serde_json::Value = serde_json::from_slice(&objects["report.json"]).unwrap();
    let summary = &report["summary"];
    let err = summary["rel_fro_error_weighted"].as_f64().unwrap();
    assert!(
        err > 0.01 && err < 0.2,
        "int4 g128 relative error {err} out of the plausible range"
    );
    // Exact accounting: 4-bit codes plus one f16 scale per group (the last group of a row
    // may be short, so a row of n values has ceil(n / 128) scales).
    for tensor in report["tensors"].as_array().unwrap() {
        if tensor["rel_fro_error"].is_null() {
            continue;
        }
        let row_len = tensor["shape"].as_array().unwrap()[1..]
            .iter()
            .map(|d| d.as_u64().unwrap())
            .product::<u64>();
        let expected = 4.0 + 16.0 * row_len.div_ceil(128) as f64 / row_len as f64;
        let bpw = tensor["bits_per_weight"].as_f64().unwrap();
        assert!(
            (bpw - expected).abs() < 1e-9,
            "{}: bits/weight {bpw}, expected {expected}",
            tensor["name"]
        );
    }
    let workers = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["worker"].as_str().unwrap())
        .collect::<std::collections::BTreeSet<_>>();
    assert!(
        workers.len() >= 2,
        "tasks should spread over workers, got {workers:?}"
    );
    // The timeline: each task's lease comes before its result, both within the job's wall
    // time, and the span holds the worker's own measured time.
    let wall = summary["wall_seconds"].as_f64().unwrap();
    for task in report["tasks"].as_array().unwrap() {
        let leased = task["leased_at_seconds"].as_f64().unwrap();
        let completed = task["completed_at_seconds"].as_f64().unwrap();
        let own = task["seconds"].as_f64().unwrap();
        assert!(
            0.0 <= leased && leased + own <= completed && completed <= wall,
            "task timeline out of order: {task}"
        );
    }
    assert_success(&shardpress(&["verify", out.to_str().unwrap()]), "verify");
}

fn run_with_workers(model: &Path, out: &Path, workers: usize) {
    let output = run_job(model, out, RECIPE_INT4, workers, &["--task-budget-mb", "1"]);
    assert_success(&output, &format!("run --workers {workers}"));
}

/// Shards and index of an output, without the reports (timings) and manifest (which hashes it).
fn deterministic_objects(out: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut objects = manifest_objects(out);
    objects.remove("report.json");
    objects.remove("report.html");
    objects
}

#[test]
fn one_and_four_workers_give_byte_identical_output() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "5MB", "bf16", 5000);
    run_with_workers(&model, &dir.path().join("one"), 1);
    run_with_workers(&model, &dir.path().join("four"), 4);
    let one = deterministic_objects(&dir.path().join("one"));
    let four = deterministic_objects(&dir.path().join("four"));
    assert!(one.len() > 3);
    assert_eq!(
        one.keys().collect::<Vec<_>>(),
        four.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &one {
        assert!(
            bytes == &four[name],
            "{name} differs between 1 and 4 workers"
        );
    }
}

#[test]
fn a_worker_killed_mid_task_loses_its_lease_and_the_output_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "5MB", "bf16", 5000);
    run_with_workers(&model, &dir.path().join("reference"), 2);

    let mut cluster = TestCluster::start(1.0);
    let out = dir.path().join("out");
    // A slow victim: 256 KB chunks with a pause after each, so it is surely mid-task.
    cluster.add_worker(
        "victim",
        &["--chunk-mb", "0.25", "--debug-delay-per-chunk-ms", "200"],
    );
    let mut client = cluster
        .compress_command(&model, &out, RECIPE_INT4)
        .spawn()
        .unwrap();
    cluster.wait_for_log("victim", "task acquired", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    cluster.kill_worker("victim");
    cluster.add_worker("rescuer-1", &[]);
    cluster.add_worker("rescuer-2", &[]);
    let status = client.wait().unwrap();
    assert!(status.success(), "job failed after the worker was killed");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert!(
        report["summary"]["task_retries"].as_u64().unwrap() >= 1,
        "the killed lease should have been retried"
    );
    let expected = deterministic_objects(&dir.path().join("reference"));
    let got = deterministic_objects(&out);
    assert_eq!(
        expected.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &expected {
        assert!(
            bytes == &got[name],
            "{name} differs from the run without a kill"
        );
    }
    // The victim's unfinished upload (object_store's `NAME#N` file, under its attempt's
    // staging name) was deleted with the rest of the job's journal.
    assert!(!out.join(".shardpress").exists(), "the journal was left");
    let leftovers: Vec<String> = files_under(&out)
        .into_iter()
        .filter(|name| name.contains('#'))
        .collect();
    assert!(leftovers.is_empty(), "left in the output: {leftovers:?}");
}

/// Processes whose command line contains `needle` (from /proc).
fn processes_with(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn sigterm_to_run_stops_its_worker_processes() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "50MB", "bf16", 5000);
    let mut run = std::process::Command::new(BIN)
        .args(["run", "--workers", "2", "--recipe", "hqq4"])
        .args(["--model", model.to_str().unwrap()])
        .args(["--out", dir.path().join("out").to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(run.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("local cluster: coordinator on ") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "run ended early");
    }
    let address = line
        .split_whitespace()
        .nth(4)
        .unwrap()
        .trim_end_matches(',');
    let workers_url = format!("http://{address}");
    let started = std::time::Instant::now();
    while processes_with(&workers_url).len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "workers never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = run.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(!status.success());
    assert!(rest.contains("interrupted"), "{rest}");
    // The workers are gone with it (before, they ran on until they gave up on the coordinator).
    let started = std::time::Instant::now();
    while !processes_with(&workers_url).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "worker processes outlived run: {:?}",
            processes_with(&workers_url)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!dir.path().join("out/manifest.json").exists());
}

#[test]
fn an_output_is_never_mixed_with_another_or_written_over_the_input() {
    let mut cluster = TestCluster::start(10.0);
    cluster.add_worker("slow", &["--debug-delay-per-chunk-ms", "150"]);
    let model = cluster.dir.path().join("model");
    gen_model(&model, "4MB", "bf16", 5000);
    let out = cluster.dir.path().join("out");
    // While a job writes to OUT, a second job to the same OUT (under another spelling) is
    // refused.
    let first = cluster
        .compress_command(&model, &out, "int8")
        .arg("--no-wait")
        .output()
        .unwrap();
    assert_success(&first, "submit the first job");
    let again = cluster.compress(&model, &cluster.dir.path().join("./out/"), "int8");
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("is writing to"),
        "{}",
        stderr(&again)
    );
    let started = std::time::Instant::now();
    // Finished: the manifest written and then the journal removed.
    while !out.join("manifest.json").exists() || out.join(".shardpress").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "first job never finished"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A finished output is not replaced unless asked.
    let files_before = std::fs::read_dir(&out).unwrap().count();
    assert!(
        files_before > 4,
        "{files_before} files: the first output has several shards"
    );
    let refused = cluster.compress(&model, &out, "int4-g128");
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("already holds a finished output")
            && stderr(&refused).contains("--overwrite"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), files_before);
    // --overwrite replaces what the old manifest lists, keeps a file it does not, says so.
    std::fs::write(out.join("notes.txt"), b"mine").unwrap();
    // In one shard this time: the first job's other shards must go.
    let replaced = std::process::Command::new(BIN)
        .args([
            "compress",
            "--coordinator",
            &cluster.url,
            "--recipe",
            "int4-g128",
        ])
        .args([
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args(["--overwrite", "--task-budget-mb", "64"])
        .output()
        .unwrap();
    assert_success(&replaced, "compress --overwrite");
    assert!(
        stderr(&replaced).contains("notes.txt"),
        "{}",
        stderr(&replaced)
    );
    let objects = manifest_objects(&out);
    let mut on_disk: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "manifest.json" && n != "notes.txt")
        .collect();
    on_disk.sort();
    assert_eq!(on_disk, objects.keys().cloned().collect::<Vec<_>>());
    // A symlink to the model's folder is the model's folder.
    let link = cluster.dir.path().join("link-to-model");
    std::os::unix::fs::symlink(&model, &link).unwrap();
    let onto_input = cluster.compress(&model, &link, "int8");
    assert!(!onto_input.status.success());
    assert!(
        stderr(&onto_input).contains("the model's own directory"),
        "{}",
        stderr(&onto_input)
    );
}

#[test]
fn relative_paths_are_the_clients_not_the_coordinators() {
    let mut cluster = TestCluster::start(10.0);
    cluster.add_worker("w1", &[]);
    let here = cluster.dir.path().join("client-dir");
    gen_model(&here.join("model"), "2MB", "bf16", 5000);
    // The coordinator runs in another directory; "model" and "out" are the client's.
    let result = std::process::Command::new(BIN)
        .current_dir(&here)
        .args([
            "compress",
            "--coordinator",
            &cluster.url,
            "--recipe",
            "int8",
        ])
        .args(["--model", "model", "--out", "out"])
        .output()
        .unwrap();
    assert_success(&result, "compress with relative paths");
    assert!(here.join("out/manifest.json").exists());
}

#[test]
fn a_terminated_worker_gives_its_task_back_at_once_and_exits() {
    // A long lease time: the task can only move on this quickly if it is given back.
    let mut cluster = TestCluster::start(60.0);
    let model = cluster.dir.path().join("model");
    gen_model(&model, "5MB", "bf16", 5000);
    let out = cluster.dir.path().join("out");
    cluster.add_worker(
        "leaving",
        &["--chunk-mb", "0.25", "--debug-delay-per-chunk-ms", "200"],
    );
    let mut client = cluster
        .compress_command(&model, &out, RECIPE_INT4)
        .spawn()
        .unwrap();
    cluster.wait_for_log("leaving", "task acquired", Duration::from_secs(60));
    cluster.add_worker("staying", &[]);
    let (took, clean) = cluster.terminate_worker("leaving");
    assert!(clean, "a terminated worker exits successfully");
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");
    let status = client.wait().unwrap();
    assert!(status.success(), "the job failed after a worker left");
    let log = std::fs::read_to_string(cluster.log_path("leaving")).unwrap();
    assert!(log.contains("giving its lease back"), "{log}");
    // Given back, not failed: nothing counts as a retry, and no lease had to expire.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["summary"]["task_retries"], 0);
    let coordinator = std::fs::read_to_string(cluster.dir.path().join("coordinator.log")).unwrap();
    assert!(!coordinator.contains("expired"), "{coordinator}");
}

#[test]
fn a_worker_told_to_exit_when_idle_runs_its_tasks_then_exits() {
    let mut cluster = TestCluster::start(15.0);
    let model = cluster.dir.path().join("model");
    gen_model(&model, "2MB", "bf16", 5000);
    let out = cluster.dir.path().join("out");
    // Idle for less than 3 s while the job is submitted: still there to run it.
    cluster.add_worker("oneshot", &["--exit-when-idle", "3"]);
    assert_success(&cluster.compress(&model, &out, RECIPE_INT4), "job");
    let started = std::time::Instant::now();
    while cluster.worker_alive("oneshot") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "an idle worker with --exit-when-idle 3 did not exit"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(cluster.log_path("oneshot")).unwrap();
    assert!(log.contains("task completed"), "{log}");
    assert!(log.contains("exiting"), "{log}");
}

#[test]
fn jobs_are_listed_shown_followed_and_cancelled_from_the_command_line() {
    let mut cluster = TestCluster::start(10.0);
    cluster.add_worker(
        "slow",
        &["--chunk-mb", "0.25", "--debug-delay-per-chunk-ms", "200"],
    );
    let model = cluster.dir.path().join("model");
    gen_model(&model, "5MB", "bf16", 5000);
    let url = cluster.url.clone();
    let job = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--coordinator", &url]);
        shardpress(&all)
    };
    let submitted = cluster
        .compress_command(&model, &cluster.dir.path().join("a"), RECIPE_INT4)
        .arg("--no-wait")
        .output()
        .unwrap();
    assert_success(&submitted, "compress --no-wait");
    let id = String::from_utf8(submitted.stdout)
        .unwrap()
        .trim()
        .to_string();
    let listed = job(&["jobs", "--json"]);
    assert_success(&listed, "jobs --json");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["job_id"], id.as_str());
    assert_eq!(listed[0]["state"], "running");
    assert!(listed[0]["out_url"].as_str().unwrap().ends_with("/a"));
    let shown = job(&["status", &id, "--json"]);
    assert_success(&shown, "status --json");
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["tasks_total"], listed[0]["tasks_total"]);
    // Cancelled while it runs: it ends without a manifest, and watching it is a failure.
    let cancelled = job(&["cancel", &id]);
    assert_success(&cancelled, "cancel");
    assert!(String::from_utf8_lossy(&cancelled.stdout).contains("cancelled"));
    let watched = job(&["watch", &id]);
    assert_eq!(
        watched.status.code(),
        Some(1),
        "a cancelled job's watch fails"
    );
    assert!(!cluster.dir.path().join("a/manifest.json").exists());
    // An unknown job is a bad request.
    assert_eq!(job(&["status", "job-0-0"]).status.code(), Some(3));
    // A job followed with `watch` prints its summary and succeeds.
    cluster.add_worker("fast", &[]);
    let second = cluster
        .compress_command(&model, &cluster.dir.path().join("b"), RECIPE_INT4)
        .arg("--no-wait")
        .output()
        .unwrap();
    let id = String::from_utf8(second.stdout).unwrap().trim().to_string();
    let watched = job(&["watch", &id]);
    assert_success(&watched, "watch");
    assert!(String::from_utf8_lossy(&watched.stdout).contains("gates        passed"));
    let listed: serde_json::Value =
        serde_json::from_slice(&job(&["jobs", "--json"]).stdout).unwrap();
    let states: Vec<&str> = (listed.as_array().unwrap().iter())
        .map(|j| j["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["succeeded", "cancelled"]);
}

#[test]
fn logs_have_no_colour_codes_in_files_and_can_be_json() {
    let mut cluster = TestCluster::start(10.0);
    cluster.add_worker("w1", &[]);
    let model = cluster.dir.path().join("model");
    gen_model(&model, "2MB", "bf16", 5000);
    let out = cluster.dir.path().join("out");
    assert_success(&cluster.compress(&model, &out, "int8"), "compress");
    for name in ["coordinator", "w1"] {
        let log = std::fs::read_to_string(cluster.dir.path().join(format!("{name}.log"))).unwrap();
        assert!(log.contains("INFO"), "{name}: {log}");
        assert!(
            !log.contains('\x1b'),
            "{name}'s log file holds colour codes:\n{log}"
        );
    }
    let run = std::process::Command::new(BIN)
        .args(["run", "--workers", "1", "--recipe", "int8"])
        .args(["--model", model.to_str().unwrap()])
        .args(["--out", cluster.dir.path().join("json").to_str().unwrap()])
        .env("SHARDPRESS_LOG", "info")
        .env("SHARDPRESS_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert_success(&run, "run with JSON logs");
    let stderr = String::from_utf8_lossy(&run.stderr);
    let records: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(
        records
            .iter()
            .any(|r| r["level"] == "INFO" && r["fields"]["message"] == "job planned"),
        "{stderr}"
    );
}
