//! Every pass through the real distributed path, and the `.spz` archive end to end: one
//! cluster of real worker processes compresses a generated model with each preset in both
//! output formats; the archive, restored with `shardpress decompress`, must equal the
//! dequantized safetensors output tensor for tensor, and the lossless preset must restore
//! byte-identical files.

mod common;

use std::path::Path;

use common::*;

fn compress_format(cluster: &TestCluster, model: &Path, out: &Path, recipe: &str, format: &str) {
    let output = cluster
        .compress_command(model, out, recipe)
        .args(["--format", format])
        .output()
        .unwrap();
    assert_success(&output, &format!("compress {recipe} --format {format}"));
}

fn decompress(archive: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "decompress",
        archive.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    shardpress(&args)
}

#[test]
fn every_preset_runs_distributed_and_the_archive_restores_the_same_tensors() {
    let mut cluster = TestCluster::start(10.0);
    cluster.add_worker("w1", &[]);
    cluster.add_worker("w2", &[]);
    let model = cluster.dir.path().join("model");
    gen_model(&model, "6MB", "bf16", 3);
    let input = load_tensors(&model);
    for preset in [
        "int8",
        "int4-g128",
        "hqq4",
        "nf4",
        "kmeans4",
        "fp8",
        "2of4",
        "2of4-int4",
        "svd50",
        "dct25",
    ] {
        let st = cluster.dir.path().join(format!("{preset}-st"));
        let spz = cluster.dir.path().join(format!("{preset}-spz"));
        let restored = cluster.dir.path().join(format!("{preset}-restored"));
        compress_format(&cluster, &model, &st, preset, "safetensors");
        compress_format(&cluster, &model, &spz, preset, "spz");
        assert!(spz.join("model.spz").is_file());
        assert!(
            !spz.join(".spz-parts").exists(),
            "{preset}: parts (or their empty directory) left behind"
        );
        assert_success(&shardpress(&["verify", spz.to_str().unwrap()]), "verify");
        let out = decompress(&spz.join("model.spz"), &restored, &[]);
        assert_success(&out, &format!("decompress {preset}"));
        let dense = load_tensors(&st);
        let back = load_tensors(&restored);
        assert_eq!(
            back.keys().collect::<Vec<_>>(),
            input.keys().collect::<Vec<_>>()
        );
        for (name, tensor) in &dense {
            assert!(
                back[name] == *tensor,
                "{preset}: {name} differs between formats"
            );
        }
        // The report proves the passes ran and the archive is smaller than the input.
        let r = report(&spz);
        let s = &r["summary"];
        assert!(s["tensors_compressed"].as_u64().unwrap() > 0, "{preset}");
        let err = s["rel_fro_error_weighted"].as_f64().unwrap();
        assert!(err > 0.0 && err < 1.0, "{preset}: error {err}");
        let stored = s["stored_bits_per_weight"].as_f64().unwrap();
        assert!(stored < 16.0, "{preset}: {stored} bits per weight stored");
        assert_eq!(
            report(&st)["summary"]["rel_fro_error_weighted"],
            s["rel_fro_error_weighted"]
        );
        eprintln!("{preset:10} rel_err {err:.4}  stored {stored:.2} bits/weight");
    }
}

#[test]
fn lossless_archive_restores_byte_identical_files_and_single_tensors_by_range() {
    let mut cluster = TestCluster::start(10.0);
    cluster.add_worker("w1", &[]);
    cluster.add_worker("w2", &[]);
    let model = cluster.dir.path().join("model");
    gen_model(&model, "8MB", "bf16", 3);
    let out = cluster.dir.path().join("out");
    let output = cluster.compress(&model, &out, "lossless");
    assert_success(&output, "compress lossless");
    let archive = out.join("model.spz");
    let input_bytes: u64 = std::fs::read_dir(&model)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let archive_bytes = std::fs::metadata(&archive).unwrap().len();
    assert!(
        (archive_bytes as f64) < 0.75 * input_bytes as f64,
        "{archive_bytes} of {input_bytes}"
    );
    // Assembled by both workers at once in 1 MiB slices: the same archive, with the hash in
    // its manifest merged from the slices' and nothing left beside it.
    let sliced = cluster.dir.path().join("sliced");
    let output = cluster
        .compress_command(&model, &sliced, "lossless")
        .args(["--assembly-slice-mib", "1"])
        .output()
        .unwrap();
    assert_success(&output, "compress lossless in 1 MiB slices");
    assert!(
        archive_bytes > 3 << 20,
        "{archive_bytes} bytes: too few slices"
    );
    let objects = manifest_objects(&sliced);
    assert!(objects["model.spz"] == std::fs::read(&archive).unwrap());
    assert!(!sliced.join(".spz-parts").exists());
    let restored = cluster.dir.path().join("restored");
    assert_success(&decompress(&archive, &restored, &[]), "decompress");
    for entry in std::fs::read_dir(&model).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name == "model.safetensors.index.json" {
            continue; // regenerated, not archived
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(restored.join(name)).unwrap(),
            "{name:?} is not byte-identical"
        );
    }
    // One tensor, fetched by range, equals the original.
    let name = "model.layers.1.mlp.down_proj.weight";
    let one = cluster.dir.path().join("one");
    assert_success(
        &decompress(&archive, &one, &["--tensor", name]),
        "decompress --tensor",
    );
    assert_eq!(load_tensors(&one)[name], load_tensors(&model)[name]);
    // Corrupt archives are clear errors, not panics or partial files.
    let bad = cluster.dir.path().join("bad.spz");
    let mut bytes = std::fs::read(&archive).unwrap();
    bytes.truncate(bytes.len() - 5);
    std::fs::write(&bad, &bytes).unwrap();
    let failed = decompress(&bad, &cluster.dir.path().join("bad-out"), &[]);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("bad.spz") && stderr.contains("footer"),
        "{stderr}"
    );
    let mut bytes = std::fs::read(&archive).unwrap();
    let mid = bytes.len() / 3;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xa5;
    }
    std::fs::write(&bad, &bytes).unwrap();
    let failed = decompress(&bad, &cluster.dir.path().join("bad-out2"), &[]);
    assert!(
        !failed.status.success(),
        "a corrupted record must not restore"
    );
    assert!(!String::from_utf8_lossy(&failed.stderr).contains("panicked"));
    // Files restored before the corrupt record are complete; the one being written is removed.
    let leftovers: Vec<_> = std::fs::read_dir(cluster.dir.path().join("bad-out2"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn invalid_pass_combinations_are_rejected_at_submit() {
    let cluster = TestCluster::start(10.0);
    let model = cluster.dir.path().join("model");
    gen_model(&model, "2MB", "bf16", 100);
    let recipe = cluster.dir.path().join("bad.yaml");
    std::fs::write(
        &recipe,
        "passes:\n  - quantize: { bits: 4, granularity: channel }\n    targets: ['re:.*proj\\.weight']\n  - prune: { method: nm, n: 2, m: 4 }\n    targets: ['re:.*proj\\.weight']\n",
    )
    .unwrap();
    // No worker is running: the job must be refused before any task is leased.
    let output = cluster.compress(
        &model,
        &cluster.dir.path().join("out"),
        recipe.to_str().unwrap(),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("job rejected") && stderr.contains("must come before"),
        "{stderr}"
    );
}

fn spz_index(archive: &Path) -> serde_json::Value {
    let bytes = std::fs::read(archive).unwrap();
    let footer = &bytes[bytes.len() - 56..];
    let offset = u64::from_le_bytes(footer[..8].try_into().unwrap()) as usize;
    let len = u64::from_le_bytes(footer[8..16].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[offset..offset + len]).unwrap()
}

#[test]
fn identical_tensors_in_different_files_are_stored_once() {
    let mut cluster = TestCluster::start(10.0);
    cluster.add_worker("w1", &[]);
    cluster.add_worker("w2", &[]);
    let dir = cluster.dir.path();
    let generate = |out: &Path, tie: bool| {
        let out = out.to_str().unwrap();
        let mut args = vec![
            "gen-model",
            "--out",
            out,
            "--size",
            "6MB",
            "--max-shard-mb",
            "2",
        ];
        if tie {
            args.push("--tie-embeddings");
        }
        assert_success(&shardpress(&args), "gen-model");
    };
    let (tied, untied) = (dir.join("tied"), dir.join("untied"));
    generate(&tied, true);
    generate(&untied, false);
    let (embed, head) = ("model.embed_tokens.weight", "lm_head.weight");
    let input = load_tensors(&tied);
    assert!(input[embed] == input[head], "gen-model --tie-embeddings");

    for recipe in ["lossless", "int4-g128"] {
        let (a, b) = (
            dir.join(format!("{recipe}-tied")),
            dir.join(format!("{recipe}-untied")),
        );
        compress_format(&cluster, &tied, &a, recipe, "spz");
        compress_format(&cluster, &untied, &b, recipe, "spz");
        let r = report(&a);
        assert_eq!(r["summary"]["tensors_shared"], 1, "{recipe}");
        // One of the pair keeps the record (whichever comes first in the archive).
        let shared_with = |name: &str| {
            r["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == name)
                .unwrap()["shared_with"]
                .clone()
        };
        let (kept, dup) = if shared_with(head).is_null() {
            (head, embed)
        } else {
            (embed, head)
        };
        assert_eq!(shared_with(dup), kept, "{recipe}");
        assert_eq!(report(&b)["summary"]["tensors_shared"], 0, "{recipe}");

        // The index points both tensors at one record, and the archive is smaller by it.
        let index = spz_index(&a.join("model.spz"));
        let entry = |name: &str| {
            index["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == name)
                .unwrap()
                .clone()
        };
        let (e, h) = (entry(kept), entry(dup));
        assert_eq!((&e["offset"], &e["len"]), (&h["offset"], &h["len"]));
        assert_eq!(h["same_as"], kept);
        let record = e["len"].as_u64().unwrap();
        let size = |p: &Path| std::fs::metadata(p.join("model.spz")).unwrap().len();
        let (tied_size, untied_size) = (size(&a), size(&b));
        assert!(
            tied_size + record * 9 / 10 < untied_size,
            "{recipe}: tied {tied_size} bytes, untied {untied_size}, embedding record {record}"
        );

        // Both tensors restore from the one record.
        let restored = dir.join(format!("{recipe}-restored"));
        assert_success(
            &decompress(&a.join("model.spz"), &restored, &[]),
            "decompress",
        );
        let back = load_tensors(&restored);
        assert!(back[embed] == back[head], "{recipe}");
        assert!(
            back[embed] == input[embed],
            "{recipe}: embeddings are kept lossless"
        );
        if recipe == "lossless" {
            for entry in std::fs::read_dir(&tied).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "safetensors") {
                    assert_eq!(
                        std::fs::read(&path).unwrap(),
                        std::fs::read(restored.join(path.file_name().unwrap())).unwrap(),
                        "{path:?} is not byte-identical"
                    );
                }
            }
        }
    }
}

#[test]
fn a_global_magnitude_target_is_cut_across_tensors_held_by_different_workers() {
    let mut cluster = TestCluster::start(10.0);
    cluster.add_worker("w1", &[]);
    cluster.add_worker("w2", &[]);
    let dir = cluster.dir.path();
    let model = dir.join("model");
    gen_model(&model, "6MB", "bf16", 2);
    let recipe = dir.join("global.yaml");
    std::fs::write(
        &recipe,
        "name: global50\npasses:\n  - prune: { method: magnitude, sparsity: 0.5, scope: global }\n    targets: ['re:.*_proj\\.weight']\n",
    )
    .unwrap();
    let (st, spz, restored) = (dir.join("st"), dir.join("spz"), dir.join("restored"));
    compress_format(
        &cluster,
        &model,
        &st,
        recipe.to_str().unwrap(),
        "safetensors",
    );
    compress_format(&cluster, &model, &spz, recipe.to_str().unwrap(), "spz");
    assert_success(
        &decompress(&spz.join("model.spz"), &restored, &[]),
        "decompress",
    );
    let (input, output) = (load_tensors(&model), load_tensors(&st));
    assert!(
        load_tensors(&restored) == output,
        "spz and safetensors differ"
    );

    let (mut dropped_total, mut params) = (0usize, 0usize);
    let (mut max_dropped, mut min_kept) = (0f32, f32::INFINITY);
    let mut per_tensor = Vec::new();
    for (name, (dtype, _, bytes)) in input.iter().filter(|(n, _)| n.ends_with("_proj.weight")) {
        let before = decode(*dtype, bytes);
        let after = decode(output[name].0, &output[name].2);
        let mut dropped = 0;
        for (x, y) in before.iter().zip(&after) {
            if *y == 0.0 && *x != 0.0 {
                dropped += 1;
                max_dropped = max_dropped.max(x.abs());
            } else {
                assert_eq!(x, y, "{name}: a kept weight changed");
                min_kept = min_kept.min(x.abs());
            }
        }
        per_tensor.push((name.clone(), dropped as f64 / before.len() as f64));
        dropped_total += dropped;
        params += before.len();
    }
    let sparsity = dropped_total as f64 / params as f64;
    assert!((sparsity - 0.5).abs() < 1e-3, "global sparsity {sparsity}");
    // One magnitude order across every tensor and worker, not a per-tensor 50%.
    assert!(
        max_dropped <= min_kept,
        "dropped {max_dropped} > kept {min_kept}"
    );
    let (lo, hi) = per_tensor
        .iter()
        .fold((1f64, 0f64), |(lo, hi), (_, s)| (lo.min(*s), hi.max(*s)));
    assert!(hi - lo > 0.1, "per-tensor sparsities {per_tensor:?}");

    let r = report(&st);
    let g = &r["global_prune"];
    assert!((g["sparsity"].as_f64().unwrap() - 0.5).abs() < 1e-3, "{g}");
    assert_eq!(g["params"].as_u64().unwrap(), params as u64);
    // Both rounds' tasks are listed; the measuring round wrote nothing and ended first.
    let (measuring, compressing) = (
        r["measuring_tasks"].as_array().unwrap(),
        r["tasks"].as_array().unwrap(),
    );
    assert_eq!(measuring.len(), compressing.len());
    let measured_by = r["summary"]["measuring_seconds"].as_f64().unwrap();
    for t in measuring {
        assert_eq!(t["output_bytes"], 0, "{t}");
        assert!(
            t["completed_at_seconds"].as_f64().unwrap() <= measured_by,
            "{t}"
        );
    }
    let note = r["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == per_tensor[0].0.as_str())
        .unwrap()["note"]
        .clone();
    assert!(
        note.as_str().unwrap().contains("global magnitude cut"),
        "{note}"
    );
}

/// Writes an F32 safetensors model of the given tensors.
fn write_model(dir: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    std::fs::create_dir_all(dir).unwrap();
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .unwrap();
            (name.to_string(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// Deterministic values in [-0.5, 0.5).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

#[test]
fn near_identical_tensors_are_stored_once_after_an_exact_cosine_check() {
    let mut cluster = TestCluster::start(10.0);
    cluster.add_worker("w1", &[]);
    cluster.add_worker("w2", &[]);
    let dir = cluster.dir.path();
    let shape = vec![128, 256];
    let n = 128 * 256;
    let base = noise(n, 1);
    // layers.1 = layers.0 plus 1% noise (cosine ~0.99995); layers.2 is unrelated.
    let near: Vec<f32> = base
        .iter()
        .zip(noise(n, 2))
        .map(|(x, e)| x + 0.01 * e)
        .collect();
    let model = dir.join("model");
    write_model(
        &model,
        &[
            ("model.layers.0.mlp.up_proj.weight", shape.clone(), base),
            ("model.layers.1.mlp.up_proj.weight", shape.clone(), near),
            (
                "model.layers.2.mlp.up_proj.weight",
                shape.clone(),
                noise(n, 3),
            ),
        ],
    );
    let recipe = |cosine: &str| {
        let path = dir.join(format!("share-{cosine}.yaml"));
        std::fs::write(
            &path,
            format!("passes:\n  - quantize: {{ bits: 8, granularity: channel }}\n    targets: ['re:.*']\nshare: {{ cosine: {cosine} }}\n"),
        )
        .unwrap();
        path.to_str().unwrap().to_string()
    };
    let (l0, l1, l2) = (
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
    );
    let share = recipe("0.999");
    let (st, spz, restored) = (dir.join("st"), dir.join("spz"), dir.join("restored"));
    compress_format(&cluster, &model, &st, &share, "safetensors");
    compress_format(&cluster, &model, &spz, &share, "spz");
    let out = load_tensors(&st);
    assert!(
        out[l1] == out[l0],
        "layers.1 is stored as layers.0's int8 form"
    );
    assert!(out[l2] != out[l0]);
    let tensor = |r: &serde_json::Value, name: &str| {
        r["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap()
            .clone()
    };
    for r in [report(&st), report(&spz)] {
        assert_eq!(r["summary"]["tensors_shared"], 1);
        assert_eq!(r["summary"]["share_candidates"], 1);
        assert!(r["summary"]["measuring_seconds"].as_f64().unwrap() > 0.0);
        let t1 = tensor(&r, l1);
        assert_eq!(t1["shared_with"], l0);
        assert!(
            t1["note"].as_str().unwrap().contains("cosine 0.9999"),
            "{t1}"
        );
        // Its error is measured against what is stored for it: ~1% noise plus int8.
        let err = t1["rel_fro_error"].as_f64().unwrap();
        assert!(err > 0.01 && err < 0.05, "{err}");
        assert!(tensor(&r, l2)["shared_with"].is_null());
    }
    let index = spz_index(&spz.join("model.spz"));
    let entries = index["tensors"].as_array().unwrap();
    let entry = |name: &str| entries.iter().find(|t| t["name"] == name).unwrap().clone();
    assert_eq!(entry(l1)["offset"], entry(l0)["offset"]);
    assert_success(
        &decompress(&spz.join("model.spz"), &restored, &[]),
        "decompress",
    );
    assert!(
        load_tensors(&restored) == out,
        "spz restores what safetensors wrote"
    );

    // Above the pair's real cosine the sketch still shortlists it, but the worker's exact
    // check refuses: nothing is shared.
    let strict = dir.join("strict");
    compress_format(
        &cluster,
        &model,
        &strict,
        &recipe("0.9999999"),
        "safetensors",
    );
    let strict_report = report(&strict);
    assert_eq!(strict_report["summary"]["tensors_shared"], 0);
    assert_eq!(strict_report["summary"]["share_candidates"], 1);
    assert!(load_tensors(&strict)[l1] != out[l0]);
    let logs: String = ["w1", "w2"]
        .iter()
        .map(|w| std::fs::read_to_string(cluster.log_path(w)).unwrap())
        .collect();
    assert!(
        logs.contains("near-identical candidate below the threshold"),
        "the strict run must have checked (and refused) the candidate"
    );
}

/// The files of a restored folder (name -> bytes), `.partial` leftovers included.
fn restored_files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| {
                    let path = e.unwrap().path();
                    let name = path.file_name().unwrap().to_string_lossy().into_owned();
                    (name, std::fs::read(&path).unwrap())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// An archive with its index replaced by `index` (and a footer whose checksum matches it, as a
/// forger who knows the format would write).
fn with_index(archive: &[u8], index: &serde_json::Value) -> Vec<u8> {
    let tail = &archive[archive.len() - 56..];
    let offset = u64::from_le_bytes(tail[..8].try_into().unwrap());
    let json = serde_json::to_vec(index).unwrap();
    let mut out = archive[..offset as usize].to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(&json).as_bytes());
    out.extend_from_slice(b"SPZINDX2");
    out
}

/// Damaged archives never restore into wrong files: for each of 240 seeded corruptions (single
/// bit flips anywhere, runs of overwritten bytes, index fields edited with the checksum
/// recomputed), `decompress` either fails cleanly (no panic, no `.partial` file) or restores
/// exactly the undamaged archive's files.
#[test]
fn damaged_archives_are_refused_or_restore_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "2MB", "bf16", 1);
    let out = dir.path().join("out");
    assert_success(
        &shardpress(&[
            "run",
            "--workers",
            "1",
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--recipe",
            "int4-g128",
            "--format",
            "spz",
        ]),
        "run --format spz",
    );
    let archive = std::fs::read(out.join("model.spz")).unwrap();
    let clean = dir.path().join("clean");
    assert_success(
        &decompress(&out.join("model.spz"), &clean, &[]),
        "decompress",
    );
    let want = restored_files(&clean);
    let index = spz_index(&out.join("model.spz"));
    let tail = &archive[archive.len() - 56..];
    let index_offset = u64::from_le_bytes(tail[..8].try_into().unwrap()) as usize;

    let mut state = 0x5eed_u64;
    let mut next = move |below: usize| {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % below as u64) as usize
    };
    let fields = [
        ("tensors", "data_start"),
        ("tensors", "data_end"),
        ("tensors", "offset"),
        ("tensors", "len"),
        ("tensors", "file"),
        ("files", "size"),
        ("companions", "offset"),
        ("companions", "len"),
    ];
    let (mut refused, mut identical) = (0, 0);
    for case in 0..240 {
        let damaged = match case % 3 {
            0 => {
                let mut bytes = archive.clone();
                let bit = next(bytes.len() * 8);
                bytes[bit / 8] ^= 1 << (bit % 8);
                bytes
            }
            1 => {
                let mut bytes = archive.clone();
                // Half the runs land in the index, where the damage is most dangerous.
                let start = if case % 2 == 0 {
                    index_offset + next(archive.len() - index_offset - 8)
                } else {
                    next(bytes.len() - 8)
                };
                for b in &mut bytes[start..start + 8] {
                    *b = next(256) as u8;
                }
                bytes
            }
            _ => {
                let (list, field) = fields[next(fields.len())];
                let mut edited = index.clone();
                let entries = edited[list].as_array_mut().unwrap();
                let i = next(entries.len());
                let value = entries[i][field].as_u64().unwrap();
                let delta = [1, 2, 8, 4096, 1 << 40][next(5)];
                let value = if next(2) == 0 {
                    value.saturating_add(delta)
                } else {
                    value.saturating_sub(delta)
                };
                entries[i][field] = serde_json::json!(value);
                with_index(&archive, &edited)
            }
        };
        let path = dir.path().join("damaged.spz");
        std::fs::write(&path, &damaged).unwrap();
        let restore = dir.path().join(format!("restore-{case}"));
        let result = decompress(&path, &restore, &[]);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!stderr.contains("panicked"), "case {case}: {stderr}");
        let got = restored_files(&restore);
        if result.status.success() {
            assert!(
                got == want,
                "case {case}: restored with exit 0, but different files"
            );
            identical += 1;
        } else {
            assert!(
                got.keys().all(|n| !n.ends_with(".partial")),
                "case {case}: left {:?}",
                got.keys()
            );
            // What a failed restore did finish is right.
            for (name, bytes) in &got {
                assert!(want.get(name) == Some(bytes), "case {case}: {name} differs");
            }
            refused += 1;
        }
        let _ = std::fs::remove_dir_all(&restore);
    }
    eprintln!("{refused} damaged archives refused, {identical} restored identically");
    assert!(
        refused > 150,
        "only {refused} of 240 damaged archives refused ({identical} identical)"
    );
}
