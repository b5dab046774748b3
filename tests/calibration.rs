//! Calibrated compression through real processes: GPTQ on a generated Llama, layer by layer
//! through the object store, with the output identical for any number of workers and when a
//! worker dies mid-step; the function-space evaluation reported and gated; bad input refused
//! before anything is written.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const CALIBRATION: &str = "data/calibration.txt";
const EVALUATION: &str = "data/eval.txt";

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// `shardpress run` of `recipe` on `model` with the repository's calibration and evaluation
/// samples (a few of them, to keep the test short).
fn run_calibrated(
    model: &Path,
    out: &Path,
    recipe: &str,
    workers: usize,
    extra: &[&str],
) -> std::process::Output {
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let mut args: Vec<String> = vec![
        "--eval".into(),
        path(&repo_file(EVALUATION)),
        "--eval-samples".into(),
        "16".into(),
        "--calibration-seq-len".into(),
        "64".into(),
    ];
    if !extra.contains(&"--no-calibration") {
        args.extend(["--calibration".into(), path(&repo_file(CALIBRATION))]);
        args.extend(["--calibration-samples".into(), "32".into()]);
    }
    args.extend(
        extra
            .iter()
            .filter(|a| **a != "--no-calibration")
            .map(|a| a.to_string()),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_job(model, out, recipe, workers, &args)
}

/// A generated 4 MB Llama in `dir/model` compressed by the data-free recipe `yaml` into
/// `dir/out` (2 workers) and evaluated: the model, the output and the run's result.
fn run_evaluated(dir: &Path, yaml: &str) -> (PathBuf, PathBuf, std::process::Output) {
    let model = dir.join("model");
    gen_model(&model, "4MB", "bf16", 5000);
    let recipe = dir.join("recipe.yaml");
    std::fs::write(&recipe, yaml).unwrap();
    let out = dir.join("out");
    let output = run_calibrated(
        &model,
        &out,
        recipe.to_str().unwrap(),
        2,
        &["--no-calibration"],
    );
    (model, out, output)
}

/// `shardpress eval` of `compressed` against `model`, in one process on the written files,
/// on the samples the jobs here evaluate: its JSON.
fn eval_alone(model: &Path, compressed: &Path) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("eval.json");
    let output = shardpress(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--compressed",
        compressed.to_str().unwrap(),
        "--data",
        repo_file(EVALUATION).to_str().unwrap(),
        "--samples",
        "16",
        "--seq-len",
        "64",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_success(&output, "shardpress eval");
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

/// A generated 4 MB Llama in `dir/model` and its GPTQ output by an uninterrupted 2-worker run
/// (with `extra` flags) in `dir/reference`: what a run that loses a process must reproduce.
fn model_and_reference(dir: &Path, extra: &[&str]) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    gen_model(&model, "4MB", "bf16", 5000);
    let reference = dir.join("reference");
    let flags = [&["--task-budget-mb", "1"][..], extra].concat();
    assert_success(
        &run_calibrated(&model, &reference, "gptq-w4a16-asym", 2, &flags),
        "reference run",
    );
    (model, reference)
}

/// `shardpress compress` of a GPTQ job with the calibration and evaluation samples
/// [`run_calibrated`] uses, to `cluster`.
fn calibrated_compress(cluster: &TestCluster, model: &Path, out: &Path) -> std::process::Command {
    let (calibration, eval) = (repo_file(CALIBRATION), repo_file(EVALUATION));
    let mut command = cluster.compress_command(model, out, "gptq-w4a16-asym");
    command
        .args(["--calibration", calibration.to_str().unwrap()])
        .args(["--calibration-samples", "32", "--calibration-seq-len", "64"])
        .args(["--eval", eval.to_str().unwrap(), "--eval-samples", "16"]);
    command
}

/// The output's shards and index, without the reports (timings) and the manifest.
fn deterministic_objects(out: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut objects = manifest_objects(out);
    objects.remove("report.json");
    objects.remove("report.html");
    objects
}

/// The two outputs hold the same objects, byte for byte (reports aside).
fn assert_same_objects(a: &Path, b: &Path) {
    let (a, b) = (deterministic_objects(a), deterministic_objects(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, bytes) in &a {
        assert!(bytes == &b[name], "{name} differs");
    }
}

#[test]
fn gptq_on_a_generated_llama_beats_rtn_and_is_the_same_for_1_and_3_workers() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "4MB", "bf16", 5000);
    let one = dir.path().join("one");
    let output = run_calibrated(&model, &one, "gptq-w4a16-asym", 1, &[]);
    assert_success(&output, "gptq with 1 worker");
    let three = dir.path().join("three");
    let output = run_calibrated(&model, &three, "gptq-w4a16-asym", 3, &[]);
    assert_success(&output, "gptq with 3 workers");
    let message = String::from_utf8_lossy(&output.stdout).into_owned() + &stderr(&output);
    assert!(message.contains("Linears calibrated"), "{message}");
    assert_same_objects(&one, &three);
    // Nothing of the round is left behind.
    assert!(
        files_under(&three)
            .iter()
            .all(|f| !f.starts_with(".shardpress")),
        "{:?}",
        files_under(&three)
    );

    let gptq = report(&three);
    let calibration = &gptq["calibration"];
    let solved = calibration["tensors"].as_array().unwrap();
    let layers = gptq["layers"].as_array().unwrap().len();
    assert!(solved.len() >= 7, "{solved:?}");
    for t in solved {
        assert!(
            t["method"]
                .as_str()
                .unwrap()
                .starts_with("gptq int4 asym g128"),
            "{t}"
        );
        assert!(t["rows_seen"].as_u64().unwrap() > 100, "{t}");
    }
    // On the calibration inputs, every Linear's output error is below RTN's.
    let (loss, baseline) = solved.iter().fold((0.0, 0.0), |(l, b), t| {
        (
            l + t["proxy_loss"].as_f64().unwrap(),
            b + t["baseline_proxy_loss"].as_f64().unwrap(),
        )
    });
    assert!(
        loss < 0.9 * baseline,
        "gptq {loss} vs rtn {baseline} over {layers} layers"
    );
    // The tensors' passes say GPTQ, and the shards hold exactly the codes (the report's
    // per-tensor error is measured on them).
    let tensors = gptq["tensors"].as_array().unwrap();
    let q_proj = tensors
        .iter()
        .find(|t| t["name"] == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert!(
        q_proj["pass"].as_str().unwrap().starts_with("gptq"),
        "{q_proj}"
    );

    // The same evaluation of RTN at the same bits: GPTQ's outputs are closer to the original.
    let rtn = dir.path().join("rtn");
    let output = run_calibrated(&model, &rtn, "int4-g128-asym", 2, &["--no-calibration"]);
    assert_success(&output, "rtn with --eval");
    let rtn = report(&rtn);
    let kld = |r: &serde_json::Value| r["calibration"]["evaluation"]["mean_kld"].as_f64().unwrap();
    let top1 = |r: &serde_json::Value| {
        r["calibration"]["evaluation"]["top1_agreement"]
            .as_f64()
            .unwrap()
    };
    assert!(kld(&gptq) > 0.0 && kld(&rtn) > 0.0);
    assert!(
        kld(&gptq) < kld(&rtn),
        "KL divergence gptq {} vs rtn {}",
        kld(&gptq),
        kld(&rtn)
    );
    assert!((0.0..=1.0).contains(&top1(&gptq)));
    let evaluation = &gptq["calibration"]["evaluation"];
    assert!(
        evaluation["perplexity_original"].as_f64().unwrap() > 1.0,
        "{evaluation}"
    );
    assert!(evaluation["tokens"].as_u64().unwrap() > 50, "{evaluation}");

    // `shardpress eval`, in one process on the written files, finds what the job reported.
    let alone = eval_alone(&model, &three);
    for key in ["mean_kld", "top1_agreement", "perplexity_compressed"] {
        let (a, b) = (
            alone[key].as_f64().unwrap(),
            evaluation[key].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-9 * b.abs().max(1.0),
            "{key}: eval {a}, job {b}"
        );
    }
}

/// The evaluation sees the model as the output stores it: a recipe that quantizes only the
/// embeddings and the head changes the outputs it reports, and `shardpress eval` on the
/// written files finds the same.
#[test]
fn the_evaluation_includes_quantized_embeddings_and_head() {
    let dir = tempfile::tempdir().unwrap();
    let (model, out, output) = run_evaluated(
        dir.path(),
        "name: ends\npasses:\n  - quantize: { bits: 3, granularity: group, group_size: 32 }\n    targets: ['re:.*(embed_tokens|lm_head)\\.weight$']\n",
    );
    assert_success(&output, "embeddings and head quantized, evaluated");
    let r = report(&out);
    let evaluation = &r["calibration"]["evaluation"];
    let kld = evaluation["mean_kld"].as_f64().unwrap();
    assert!(kld > 1e-4, "{evaluation}");
    assert!(
        evaluation["top1_agreement"].as_f64().unwrap() < 1.0,
        "{evaluation}"
    );
    let alone = eval_alone(&model, &out);
    let a = alone["mean_kld"].as_f64().unwrap();
    assert!((a - kld).abs() <= 1e-9 * kld, "eval {a}, job {kld}");
}

#[test]
fn a_function_space_gate_fails_the_job_without_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let (_, out, output) = run_evaluated(
        dir.path(),
        "name: gated\npasses:\n  - quantize: { bits: 2, granularity: channel }\n    targets: ['re:.*proj\\.weight$']\ngates: { max_kld: 0.000001 }\n",
    );
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("function-space gate failed"), "{message}");
    assert!(message.contains("KL divergence"), "{message}");
    assert!(!out.join("manifest.json").exists());
    let report = report(&out);
    assert_eq!(report["gates"]["passed"], false);
}

#[test]
fn a_worker_killed_mid_step_leaves_the_output_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (model, reference) = model_and_reference(dir.path(), &[]);
    let mut cluster = TestCluster::start(1.0);
    // A slow victim: a pause after each tensor it reads, so it is surely mid-step.
    cluster.add_worker("victim", &["--debug-delay-per-chunk-ms", "300"]);
    let out = dir.path().join("out");
    let mut client = calibrated_compress(&cluster, &model, &out).spawn().unwrap();
    cluster.wait_for_log("victim", "task acquired", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    cluster.kill_worker("victim");
    cluster.add_worker("healthy", &[]);
    let status = client.wait().unwrap();
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(cluster.log_path("coordinator")).unwrap();
    assert!(
        log.contains("expired"),
        "the victim's lease never expired:\n{log}"
    );
    assert_same_objects(&out, &reference);
}

#[test]
fn a_coordinator_killed_mid_calibration_resumes_without_redoing_finished_steps() {
    coordinator_killed_mid_calibration(&[]);
}

/// The same with a bit budget: the job measures, then calibrates, then compresses, and a
/// restart mid-calibration keeps the measuring round's choice and the finished steps.
#[test]
fn a_mixed_precision_job_killed_mid_calibration_resumes_with_the_same_choice() {
    coordinator_killed_mid_calibration(&["--target-bpw", "4.6"]);
}

/// The same killed while the measuring round's sensitivity steps run (the calibration
/// batches through the original layers, each Linear's widths scored): the finished steps
/// and their objects are kept, the rest run again, and the choice is the same.
#[test]
fn a_mixed_precision_job_killed_mid_sensitivity_resumes_with_the_same_choice() {
    coordinator_killed_mid(&["--target-bpw", "4.6"], Round::Sensitivity);
}

fn coordinator_killed_mid_calibration(extra: &[&str]) {
    coordinator_killed_mid(extra, Round::Calibration);
}

/// When [`coordinator_killed_mid`] kills the coordinator.
#[derive(PartialEq)]
enum Round {
    /// Once the measuring round's sensitivity pass has written its statistics.
    Sensitivity,
    /// Once a few calibration steps are journaled.
    Calibration,
}

/// Kills the coordinator mid-`round` of a GPTQ job (with `extra` flags), restarts it, and
/// checks the resumed job's output against an uninterrupted run.
fn coordinator_killed_mid(extra: &[&str], round: Round) {
    let dir = tempfile::tempdir().unwrap();
    let (model, reference) = model_and_reference(dir.path(), extra);
    let mut cluster = TestCluster::start(5.0);
    for name in ["a", "b"] {
        cluster.add_worker(name, &["--debug-delay-per-chunk-ms", "100"]);
    }
    let out = cluster.dir.path().join("out");
    let compress = |cluster: &TestCluster| {
        let mut command = calibrated_compress(cluster, &model, &out);
        command.args(extra);
        command
    };
    let mut first = compress(&cluster)
        .args(["--reconnect-secs", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let done = out.join(".shardpress/done");
    let started = std::time::Instant::now();
    let count = |dir: &Path, prefix: &str| {
        std::fs::read_dir(dir).map_or(0, |d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with(prefix))
            })
            .count()
        })
    };
    let sensitivity_stats = out.join(".shardpress/calib/ms");
    let ready = || match round {
        // Both batches' statistics of the (one-layer) model: the sensitivity steps are next.
        Round::Sensitivity => count(&sensitivity_stats, "") >= 2,
        Round::Calibration => count(&done, "k-") >= 3,
    };
    while !ready() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no step was journaled: {:?}",
            files_under(&out)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.kill_coordinator();
    let finished_before = match round {
        Round::Sensitivity => {
            assert_eq!(count(&done, "k-"), 0, "the measuring round was over");
            count(&done, "m-")
        }
        Round::Calibration => count(&done, "k-"),
    };
    assert!(!first.wait().unwrap().success());
    cluster.restart_coordinator(&["--lease-ttl-secs", "5"]);
    let again = compress(&cluster).output().unwrap();
    assert_success(&again, "the calibrated job submitted again");
    assert!(stderr(&again).contains("resuming:"), "{}", stderr(&again));
    assert_same_objects(&out, &reference);
    assert!(
        !out.join(".shardpress").exists(),
        "the journal outlived the job"
    );
    // The steps finished before the kill were not leased again.
    let log = std::fs::read_to_string(cluster.log_path("coordinator-2")).unwrap();
    let leased = log.lines().filter(|l| l.contains("task leased")).count();
    let report = report(&out);
    let steps = report["calibration"]["steps"].as_u64().unwrap() as usize;
    let compressing = report["tasks"].as_array().unwrap().len();
    // A measuring round's tasks (all finished before the kill) are not leased again either.
    let measuring = report["measuring_tasks"].as_array().map_or(0, Vec::len);
    if !extra.is_empty() {
        assert!(measuring > 0 && report["mixed_precision"].is_object());
    }
    let rerun = match round {
        Round::Sensitivity => measuring,
        Round::Calibration => 0,
    };
    assert!(
        leased <= rerun + steps + compressing - finished_before,
        "{leased} leases after the restart for {rerun} measuring tasks and steps, {steps} steps ({finished_before} done before) and {compressing} tasks"
    );
}

#[test]
fn bad_calibration_input_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "4MB", "bf16", 5000);
    let refused = |model: &Path, extra: &[&str], expected: &str| {
        let out = dir.path().join("out");
        let output = run_calibrated(model, &out, "gptq-w4a16-asym", 1, extra);
        assert!(!output.status.success(), "{extra:?} was accepted");
        let message = stderr(&output);
        assert!(message.contains(expected), "{extra:?}: {message}");
        assert!(
            !out.exists() || files_under(&out).is_empty(),
            "{:?}",
            files_under(&out)
        );
    };
    // No calibration data for a calibrated recipe.
    refused(&model, &["--no-calibration"], "needs calibration data");
    // An empty and a missing calibration file.
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    refused(
        &model,
        &["--no-calibration", "--calibration", empty.to_str().unwrap()],
        "empty.txt",
    );
    let missing = dir.path().join("missing.txt");
    refused(
        &model,
        &[
            "--no-calibration",
            "--calibration",
            missing.to_str().unwrap(),
        ],
        "missing.txt",
    );
    // A model without its tokenizer.
    let no_tokenizer = dir.path().join("no-tokenizer");
    copy_model(&model, &no_tokenizer);
    std::fs::remove_file(no_tokenizer.join("tokenizer.json")).unwrap();
    refused(&no_tokenizer, &[], "tokenizer.json is missing");
    // An architecture the forward engine does not know.
    let unknown = dir.path().join("unknown");
    copy_model(&model, &unknown);
    let config = std::fs::read_to_string(unknown.join("config.json")).unwrap();
    let config = config
        .replace("\"llama\"", "\"gpt_neox\"")
        .replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
    std::fs::write(unknown.join("config.json"), config).unwrap();
    refused(&unknown, &[], "unknown model architecture");
}

fn copy_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A generated Mixtral: each token goes to 2 of 4 experts, so each expert's Linears are
/// calibrated on the tokens routed to it (together twice the attention's tokens), and the
/// output is the same for any number of workers.
#[test]
fn gptq_on_a_generated_mixtral_calibrates_each_expert_on_its_routed_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let output = shardpress(&[
        "gen-model",
        "--out",
        model.to_str().unwrap(),
        "--size",
        "8MB",
        "--experts",
        "4",
        "--expert-width",
        "256",
    ]);
    assert_success(&output, "gen-model --experts 4");
    let one = dir.path().join("one");
    assert_success(
        &run_calibrated(&model, &one, "gptq-w4a16-asym", 1, &[]),
        "mixtral gptq with 1 worker",
    );
    let three = dir.path().join("three");
    assert_success(
        &run_calibrated(&model, &three, "gptq-w4a16-asym", 3, &[]),
        "mixtral gptq with 3 workers",
    );
    assert_same_objects(&one, &three);
    let r = report(&three);
    let solved = r["calibration"]["tensors"].as_array().unwrap();
    let rows = |name: &str| {
        let t = solved.iter().find(|t| t["name"] == name);
        t.unwrap_or_else(|| panic!("{name} not calibrated"))["rows_seen"]
            .as_u64()
            .unwrap()
    };
    for layer in 0..2 {
        let attention = rows(&format!("model.layers.{layer}.self_attn.q_proj.weight"));
        let experts: Vec<u64> = (0..4)
            .map(|e| {
                rows(&format!(
                    "model.layers.{layer}.block_sparse_moe.experts.{e}.w1.weight"
                ))
            })
            .collect();
        assert_eq!(
            experts.iter().sum::<u64>(),
            2 * attention,
            "layer {layer}: {experts:?}"
        );
        for (e, routed) in experts.iter().enumerate() {
            let down = rows(&format!(
                "model.layers.{layer}.block_sparse_moe.experts.{e}.w2.weight"
            ));
            assert_eq!(down, *routed, "layer {layer} expert {e}");
        }
    }
    // The router is not a calibrated Linear (the preset leaves it unquantized).
    assert!(!solved
        .iter()
        .any(|t| t["name"].as_str().unwrap().ends_with(".gate.weight")));
    let kld = r["calibration"]["evaluation"]["mean_kld"].as_f64().unwrap();
    assert!(kld > 0.0 && kld.is_finite(), "{kld}");
}

/// Calibration steps declare what they hold (STATS its layer's Hessians, SOLVE its Linear's
/// Hessian and factors), so a worker whose `--memory-limit` is too small is not leased them,
/// and the job says which step waits for a larger worker instead of running it into the limit.
#[test]
fn a_calibration_step_waits_for_a_worker_whose_memory_limit_holds_its_hessians() {
    let mut cluster =
        TestCluster::start_with(&["--lease-ttl-secs", "30", "--unassignable-timeout-secs", "2"]);
    let model = cluster.dir.path().join("model");
    gen_model(&model, "4MB", "bf16", 5000);
    cluster.add_worker("small", &["--memory-limit", "5MB"]);
    cluster.wait_for_log("small", "registered", Duration::from_secs(20));
    let out = cluster.dir.path().join("out");
    let result = calibrated_compress(&cluster, &model, &out)
        .output()
        .unwrap();
    assert!(
        !result.status.success(),
        "layer 0's steps ran on a 5 MB worker"
    );
    let err = stderr(&result);
    for needle in ["Hessian", "--memory-limit", "5.0 MB", "model.layers.0."] {
        assert!(err.contains(needle), "error should name {needle:?}: {err}");
    }
    assert!(!out.join("manifest.json").exists());
    assert!(cluster.worker_alive("small"), "never leased, not killed");
}
