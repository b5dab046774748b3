//! Bad input gets a clear error naming the object and the problem, and never a manifest:
//! truncated and hostile safetensors headers, unknown dtypes, missing objects, malformed
//! recipes, failed accuracy gates, tampered outputs and an unreachable coordinator.

mod common;

use std::path::Path;

use common::*;

/// Writes a safetensors file from a raw JSON header and `data_len` zero bytes of data.
fn write_raw(path: &Path, header: &str, data_len: usize) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    std::fs::write(path, bytes).unwrap();
}

/// Refused at submit: exit code 3 (a bad request), the error naming `needles`, no manifest.
fn expect_rejected(cluster: &TestCluster, model: &Path, recipe: &str, needles: &[&str]) {
    expect_failure(cluster, model, recipe, needles, 3);
}

fn expect_failure(cluster: &TestCluster, model: &Path, recipe: &str, needles: &[&str], code: i32) {
    let out = model.parent().unwrap().join(format!(
        "{}-out",
        model.file_name().unwrap().to_str().unwrap()
    ));
    let result = cluster.compress(model, &out, recipe);
    let err = stderr(&result);
    assert_eq!(
        result.status.code(),
        Some(code),
        "{} should have failed with exit code {code}: {err}",
        model.display()
    );
    for needle in needles {
        assert!(
            err.contains(needle),
            "error for {} should mention {needle:?}:\n{err}",
            model.display()
        );
    }
    assert!(
        !out.join("manifest.json").exists(),
        "no manifest may be written for bad input"
    );
}

#[test]
fn hostile_and_broken_inputs_are_rejected_with_clear_errors_and_no_manifest() {
    let mut cluster = TestCluster::start(5.0);
    cluster.add_worker("w1", &[]);
    let root = cluster.dir.path().to_path_buf();

    // A real model cut in half: the header's offsets now point past the end.
    let truncated = root.join("truncated");
    gen_model(&truncated, "2MB", "bf16", 5000);
    let file = truncated.join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    expect_rejected(
        &cluster,
        &file,
        "int8",
        &["truncated/model.safetensors", "beyond"],
    );

    // Shorter than the 8-byte length prefix.
    let tiny = root.join("tiny/model.safetensors");
    std::fs::create_dir_all(tiny.parent().unwrap()).unwrap();
    std::fs::write(&tiny, [1u8, 2, 3]).unwrap();
    expect_rejected(&cluster, &tiny, "int8", &["tiny/model.safetensors"]);

    let oob = root.join("oob/model.safetensors");
    write_raw(
        &oob,
        r#"{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}}"#,
        32,
    );
    expect_rejected(&cluster, &oob, "int8", &["oob/model.safetensors", "\"w\""]);

    let overlap = root.join("overlap/model.safetensors");
    write_raw(
        &overlap,
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        24,
    );
    expect_rejected(&cluster, &overlap, "int8", &["overlap/model.safetensors"]);

    let dtype = root.join("dtype/model.safetensors");
    write_raw(
        &dtype,
        r#"{"w":{"dtype":"F7","shape":[2,2],"data_offsets":[0,8]}}"#,
        8,
    );
    expect_rejected(&cluster, &dtype, "int8", &["dtype/model.safetensors", "F7"]);

    let huge = root.join("huge/model.safetensors");
    std::fs::create_dir_all(huge.parent().unwrap()).unwrap();
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&huge, bytes).unwrap();
    expect_rejected(&cluster, &huge, "int8", &["huge/model.safetensors"]);

    let missing = root.join("does-not-exist");
    expect_rejected(&cluster, &missing, "int8", &["does-not-exist"]);

    // A sharded model whose index names a shard that is gone.
    let sharded = root.join("sharded");
    gen_model(&sharded, "3MB", "bf16", 1);
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sharded.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shard = index["weight_map"]["lm_head.weight"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(sharded.join(&shard)).unwrap();
    expect_rejected(&cluster, &sharded, "int8", &[&shard, "not found"]);
}

#[test]
fn malformed_recipes_are_rejected_before_any_work() {
    let mut cluster = TestCluster::start(5.0);
    cluster.add_worker("w1", &[]);
    let root = cluster.dir.path().to_path_buf();
    let model = root.join("model");
    gen_model(&model, "2MB", "bf16", 5000);
    let cases = [
        ("syntax.yaml", "passes: [quantize: {bits: 4", "syntax.yaml"),
        ("bits.yaml", "passes:\n  - quantize: {bits: 17, symmetric: true, granularity: channel}\n    targets: [\"re:.*\"]\n", "bits"),
        ("regex.yaml", "passes:\n  - quantize: {bits: 4, symmetric: true, granularity: channel}\n    targets: [\"re:([\"]\n", "regex"),
        ("typo.yaml", "passes:\n  - quantise: {bits: 4}\n    targets: [\"re:.*\"]\n", "typo.yaml"),
    ];
    for (file, yaml, needle) in cases {
        let path = root.join(file);
        std::fs::write(&path, yaml).unwrap();
        expect_rejected(&cluster, &model, path.to_str().unwrap(), &[needle]);
    }
    expect_rejected(
        &cluster,
        &model,
        "no-such-preset",
        &["no-such-preset", "int4-g128"],
    );
    // A mistyped flag is a bad request too (clap's own code would be 2, a failed gate's).
    let typo = shardpress(&["run", "--model", "m", "--out", "o", "--wrokers", "2"]);
    assert_eq!(typo.status.code(), Some(3), "{}", stderr(&typo));
    // A built-in's YAML, printed to start a recipe file from, is that recipe.
    let shown = shardpress(&["recipes", "--show", "int4-g128"]);
    assert_success(&shown, "recipes --show");
    let path = root.join("copied.yaml");
    std::fs::write(&path, &shown.stdout).unwrap();
    let copied = cluster.compress(&model, &root.join("copied-out"), path.to_str().unwrap());
    assert_success(&copied, "compress with the shown recipe");
    let unknown = shardpress(&["recipes", "--show", "int5"]);
    assert_eq!(unknown.status.code(), Some(3));
    assert!(
        stderr(&unknown).contains("int4-g128"),
        "{}",
        stderr(&unknown)
    );
}

#[test]
fn recipe_entries_that_select_nothing_are_refused_unless_allowed() {
    let mut cluster = TestCluster::start(5.0);
    cluster.add_worker("w1", &[]);
    let root = cluster.dir.path().to_path_buf();
    let model = root.join("model");
    gen_model(&model, "2MB", "bf16", 5000);
    // llm-compressor's class name `Linear` is not a tensor name: it would compress nothing.
    let recipe = root.join("linear.yaml");
    std::fs::write(
        &recipe,
        "passes:\n  - quantize: {bits: 8, granularity: channel}\n    targets: [Linear]\n    ignore: [lm_head]\n",
    )
    .unwrap();
    let recipe = recipe.to_str().unwrap();
    expect_rejected(
        &cluster,
        &model,
        recipe,
        &[
            "targets entry \"Linear\" selects no tensor",
            "--allow-unmatched",
        ],
    );
    // Allowed, it runs with a warning (and, selecting nothing, stores every tensor as it is).
    let out = root.join("allowed");
    let result = cluster
        .compress_command(&model, &out, recipe)
        .arg("--allow-unmatched")
        .output()
        .unwrap();
    assert_success(&result, "compress with --allow-unmatched");
    assert!(stderr(&result).contains("warning: pass 1 (quantize"));
    // A module name selects its weight: `ignore: [lm_head]` keeps lm_head.weight exact.
    let recipe = root.join("ignore-head.yaml");
    std::fs::write(
        &recipe,
        "passes:\n  - quantize: {bits: 4, granularity: channel}\n    targets: ['re:.*']\n    ignore: [lm_head]\n",
    )
    .unwrap();
    let out = root.join("head-kept");
    assert_success(
        &cluster.compress(&model, &out, recipe.to_str().unwrap()),
        "compress ignoring lm_head",
    );
    let (input, output) = (load_tensors(&model), load_tensors(&out));
    assert_eq!(input["lm_head.weight"], output["lm_head.weight"]);
    let name = "model.layers.0.mlp.down_proj.weight";
    assert_ne!(input[name], output[name]);
}

#[test]
fn a_failed_accuracy_gate_fails_the_job_naming_the_worst_tensors_and_writes_no_manifest() {
    let mut cluster = TestCluster::start(5.0);
    cluster.add_worker("w1", &[]);
    let root = cluster.dir.path().to_path_buf();
    let model = root.join("model");
    gen_model(&model, "2MB", "bf16", 5000);
    let recipe = root.join("strict.yaml");
    std::fs::write(
        &recipe,
        "passes:\n  - quantize: {bits: 2, symmetric: true, granularity: channel}\n    targets: [\"re:.*_proj\\\\.weight\"]\ngates:\n  max_rel_error: 0.01\n",
    )
    .unwrap();
    let out = root.join("out");
    let result = cluster.compress(&model, &out, recipe.to_str().unwrap());
    let err = stderr(&result);
    assert_eq!(
        result.status.code(),
        Some(2),
        "a failed gate exits 2: {err}"
    );
    assert!(
        err.contains("accuracy gate failed") && err.contains("_proj.weight rel_fro_error"),
        "{err}"
    );
    assert!(!out.join("manifest.json").exists());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["gates"]["passed"], false);
}

#[test]
fn verify_names_a_tampered_shard_a_stray_file_and_an_empty_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let out = dir.path().join("out");
    gen_model(&model, "2MB", "bf16", 5000);
    let run = shardpress(&[
        "run",
        "--workers",
        "1",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--recipe",
        "int8",
    ]);
    assert_success(&run, "run");
    assert_success(&shardpress(&["verify", out.to_str().unwrap()]), "verify");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let shard = out.join(index["weight_map"]["lm_head.weight"].as_str().unwrap());
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();
    let verify = shardpress(&["verify", out.to_str().unwrap()]);
    assert!(!verify.status.success());
    let name = shard.file_name().unwrap().to_str().unwrap();
    assert!(stderr(&verify).contains(name), "{}", stderr(&verify));
    // A file the manifest does not list (a stale shard of another run, at any depth) and an
    // empty manifest are failures too.
    let clean = dir.path().join("clean");
    std::fs::create_dir_all(&clean).unwrap();
    for name in ["manifest.json", "report.json"] {
        std::fs::copy(out.join(name), clean.join(name)).unwrap();
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(clean.join("manifest.json")).unwrap()).unwrap();
    let mut only_report = manifest.clone();
    only_report["objects"] = serde_json::Value::Array(
        (manifest["objects"].as_array().unwrap().iter())
            .filter(|o| o["name"] == "report.json")
            .cloned()
            .collect(),
    );
    std::fs::write(clean.join("manifest.json"), only_report.to_string()).unwrap();
    assert_success(
        &shardpress(&["verify", clean.to_str().unwrap()]),
        "verify clean",
    );
    std::fs::create_dir_all(clean.join("old")).unwrap();
    std::fs::write(clean.join("old/model-00001-of-00002.safetensors"), b"stale").unwrap();
    let verify = shardpress(&["verify", clean.to_str().unwrap()]);
    assert!(!verify.status.success());
    assert!(
        stderr(&verify).contains("old/model-00001-of-00002.safetensors: not listed"),
        "{}",
        stderr(&verify)
    );
    std::fs::remove_dir_all(clean.join("old")).unwrap();
    let mut empty = manifest;
    empty["objects"] = serde_json::json!([]);
    std::fs::write(clean.join("manifest.json"), empty.to_string()).unwrap();
    std::fs::remove_file(clean.join("report.json")).unwrap();
    let verify = shardpress(&["verify", clean.to_str().unwrap()]);
    assert!(!verify.status.success());
    assert!(
        stderr(&verify).contains("lists no objects"),
        "{}",
        stderr(&verify)
    );
}

#[test]
fn an_unreachable_coordinator_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let result = shardpress(&[
        "compress",
        "--coordinator",
        "http://127.0.0.1:1",
        "--model",
        dir.path().to_str().unwrap(),
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]);
    assert_eq!(
        result.status.code(),
        Some(1),
        "an infrastructure failure exits 1"
    );
    assert!(
        stderr(&result).contains("cannot reach the coordinator at http://127.0.0.1:1"),
        "{}",
        stderr(&result)
    );
}

#[test]
fn a_non_finite_weight_fails_the_job_naming_the_tensor() {
    let mut cluster = TestCluster::start(5.0);
    cluster.add_worker("w1", &[]);
    let model = cluster.dir.path().join("inf");
    let file = model.join("model.safetensors");
    let header = r#"{"model.layers.0.mlp.up_proj.weight":{"dtype":"F32","shape":[2,128],"data_offsets":[0,1024]}}"#;
    write_raw(&file, header, 1024);
    let mut bytes = std::fs::read(&file).unwrap();
    let data = 8 + header.len();
    for (i, v) in bytes[data..].chunks_exact_mut(4).enumerate() {
        v.copy_from_slice(&((i % 17) as f32 * 0.03 - 0.2).to_le_bytes());
    }
    bytes[data + 4 * 130..data + 4 * 131].copy_from_slice(&f32::INFINITY.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    // Found by the worker while the job runs: the job fails (exit code 1), naming it.
    expect_failure(
        &cluster,
        &model,
        "w4a16",
        &[
            "model.layers.0.mlp.up_proj.weight",
            "1 non-finite",
            "is inf",
            "non_finite: keep",
        ],
        1,
    );
    // An archive's staging file, begun at submit, does not outlive the failed job.
    let failed = cluster.dir.path().join("inf-failed-spz");
    let result = cluster
        .compress_command(&model, &failed, "int4-g128")
        .args(["--format", "spz"])
        .output()
        .unwrap();
    assert_eq!(result.status.code(), Some(1), "{}", stderr(&result));
    let staging = failed.join(".spz-parts/model.spz.assembling");
    let started = std::time::Instant::now();
    while staging.exists() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{} outlived its failed job",
            staging.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // With `non_finite: keep` the row holding it is stored exactly, the other compressed.
    let recipe = cluster.dir.path().join("keep.yaml");
    std::fs::write(
        &recipe,
        "non_finite: keep\npasses:\n  - quantize: { bits: 4, granularity: group, group_size: 128 }\n    targets: ['re:.*']\n",
    )
    .unwrap();
    let out = cluster.dir.path().join("inf-kept");
    let result = cluster.compress(&model, &out, recipe.to_str().unwrap());
    assert!(result.status.success(), "{}", stderr(&result));
    let tensors = common::load_tensors(&out);
    let (_, _, stored) = &tensors["model.layers.0.mlp.up_proj.weight"];
    assert!(
        stored[512..] == bytes[data + 512..],
        "the row with the infinity is unchanged"
    );
    assert!(
        stored[..512] != bytes[data..data + 512],
        "the finite row is quantized"
    );
    let report = std::fs::read_to_string(out.join("report.json")).unwrap();
    assert!(
        report.contains("1 row(s) holding NaN or infinities"),
        "{report}"
    );
    // An `.spz` archive holds the row too: restored, it equals the safetensors output.
    let archived = cluster.dir.path().join("inf-spz");
    let result = cluster
        .compress_command(&model, &archived, recipe.to_str().unwrap())
        .args(["--format", "spz"])
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", stderr(&result));
    let restored = cluster.dir.path().join("inf-restored");
    let archive = archived.join("model.spz");
    let result = common::shardpress(&[
        "decompress",
        archive.to_str().unwrap(),
        "--out",
        restored.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(common::load_tensors(&restored) == tensors);
    // A format that stores codes cannot hold such rows: refused at submit.
    let refused = cluster.dir.path().join("inf-ct");
    let result = cluster
        .compress_command(&model, &refused, recipe.to_str().unwrap())
        .args(["--format", "compressed-tensors"])
        .output()
        .unwrap();
    assert!(!result.status.success());
    assert!(
        stderr(&result).contains("non_finite: keep"),
        "{}",
        stderr(&result)
    );
}

#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "2MB", "bf16", 5000);
    // `shardpress inspect MODEL | head -0`: the reader is gone before anything is written.
    let mut child = std::process::Command::new(BIN)
        .args(["inspect", model.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let err = stderr(&output);
    assert!(output.status.success(), "{:?}: {err}", output.status);
    assert!(!err.contains("panicked"), "{err}");
}
