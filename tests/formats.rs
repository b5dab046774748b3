//! Conformance of every output format: the real cluster (`shardpress run`: a coordinator and
//! worker processes on loopback) writes one generated model in each format, the format's own
//! reader turns the output back into tensors, and every tensor must equal, bit for bit, the
//! dequantized safetensors output of the same recipe. Readers: compressed-tensors with
//! `dequantize_packed` (written from the specification), GGUF with the header parser and
//! llama.cpp's dequantization (undoing the converter's name mapping and Q/K permutation),
//! `.spz` with `shardpress decompress`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{assert_success, gen_model, load_tensors, run_job, shardpress};
use shardpress_core::dtype::{encode_from_f32, DType};
use shardpress_core::format::compressed_tensors::dequantize_packed;
use shardpress_core::gguf::{architecture, parse_header, row_permutation, tensor_name};

/// name -> (shape, bytes in the input dtype).
type Tensors = BTreeMap<String, (Vec<usize>, Vec<u8>)>;

fn run(model: &Path, out: &Path, recipe: &str, format: &str, workers: usize) {
    run_with(model, out, recipe, format, workers, &[]);
}

fn run_with(model: &Path, out: &Path, recipe: &str, format: &str, workers: usize, extra: &[&str]) {
    let flags = [&["--format", format, "--task-budget-mb", "1"][..], extra].concat();
    let output = run_job(model, out, recipe, workers, &flags);
    assert_success(&output, &format!("run --recipe {recipe} --format {format}"));
    assert_success(&shardpress(&["verify", out.to_str().unwrap()]), "verify");
}

fn safetensors_dir(dir: &Path) -> Tensors {
    load_tensors(dir)
        .into_iter()
        .map(|(name, (_, shape, bytes))| (name, (shape, bytes)))
        .collect()
}

fn bf16(values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * 2];
    encode_from_f32(DType::BF16, values, &mut out).unwrap();
    out
}

/// compressed-tensors shards back to dense BF16 tensors under their original names.
fn read_compressed_tensors(dir: &Path) -> Tensors {
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let weights = &config["quantization_config"]["config_groups"]["group_0"]["weights"];
    let bits = weights["num_bits"].as_u64().unwrap() as u8;
    let group = weights["group_size"].as_u64().map(|g| g as usize);
    let raw = load_tensors(dir);
    let mut out = Tensors::new();
    for (name, (_, shape, bytes)) in &raw {
        if let Some(module) = name.strip_suffix(".weight_packed") {
            let shape_bytes = &raw[&format!("{module}.weight_shape")].2;
            let dims: Vec<u64> = shape_bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u64)
                .collect();
            let zeros = raw
                .get(&format!("{module}.weight_zero_point"))
                .map(|t| t.2.as_slice());
            let values = dequantize_packed(
                bytes,
                &raw[&format!("{module}.weight_scale")].2,
                DType::BF16,
                zeros,
                [dims[0], dims[1]],
                bits,
                group,
            )
            .unwrap();
            let shape = dims.iter().map(|&d| d as usize).collect();
            out.insert(format!("{module}.weight"), (shape, bf16(&values)));
        } else if !name.ends_with(".weight_scale")
            && !name.ends_with(".weight_zero_point")
            && !name.ends_with(".weight_shape")
        {
            out.insert(name.clone(), (shape.clone(), bytes.clone()));
        }
    }
    out
}

/// `model.gguf` back to BF16 tensors under their Hugging Face names (`names`), rows put back
/// in Hugging Face order.
fn read_gguf(file: &Path, config: &serde_json::Value, names: &[&String]) -> Tensors {
    let bytes = std::fs::read(file).unwrap();
    let parsed = parse_header(&bytes).unwrap();
    let arch = architecture(config).unwrap();
    assert_eq!(
        parsed.tensors.len(),
        names.len(),
        "one GGUF tensor per input tensor"
    );
    let mut out = Tensors::new();
    for &name in names {
        let gguf_name = tensor_name(arch, name).unwrap();
        let t = parsed
            .tensor(&gguf_name)
            .unwrap_or_else(|| panic!("{gguf_name} missing"));
        let ty = t.ggml_type().unwrap();
        let start = (parsed.data_start + t.offset) as usize;
        let data = &bytes[start..start + t.n_bytes().unwrap() as usize];
        let shape: Vec<usize> = t.shape().iter().map(|&d| d as usize).collect();
        let mut values = vec![0f32; shape.iter().product()];
        ty.dequantize(data, &mut values).unwrap();
        if let Some(perm) = row_permutation(arch, name, config).unwrap() {
            let row = values.len() / perm.len();
            let mut unpermuted = vec![0f32; values.len()];
            for (r, &source) in perm.iter().enumerate() {
                unpermuted[source as usize * row..][..row]
                    .copy_from_slice(&values[r * row..][..row]);
            }
            values = unpermuted;
        }
        out.insert(name.clone(), (shape, bf16(&values)));
    }
    out
}

fn assert_same(format: &str, got: &Tensors, want: &Tensors) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{format}: tensor names"
    );
    for (name, (shape, bytes)) in want {
        let (got_shape, got_bytes) = &got[name];
        assert_eq!(got_shape, shape, "{format}: shape of {name}");
        assert!(got_bytes == bytes, "{format}: values of {name} differ");
    }
}

#[test]
fn every_format_reads_back_to_the_dequantized_output_of_the_same_job() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "6MB", "bf16", 2);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    for (format, recipe) in [
        ("safetensors", "int4-g128"),
        ("compressed-tensors", "w4a16-asym"),
        ("compressed-tensors", "2of4-w4a16"),
        ("gguf", "q4_k_m"),
        ("spz", "q6_k"),
        ("spz", "int4-g128"),
    ] {
        let out = dir.path().join(format!("{format}-{recipe}"));
        run(&model, &out, recipe, format, 2);
        let reference = dir.path().join(format!("dequantized-{recipe}"));
        if !reference.exists() {
            run(&model, &reference, recipe, "safetensors", 2);
        }
        let want = safetensors_dir(&reference);
        let got = match format {
            "safetensors" => safetensors_dir(&out),
            "compressed-tensors" => read_compressed_tensors(&out),
            "gguf" => {
                let names: Vec<&String> = want.keys().collect();
                read_gguf(&out.join("model.gguf"), &config, &names)
            }
            "spz" => {
                let restored = dir.path().join(format!("restored-{recipe}"));
                assert_success(
                    &shardpress(&[
                        "decompress",
                        out.to_str().unwrap(),
                        "--out",
                        restored.to_str().unwrap(),
                    ]),
                    "decompress",
                );
                safetensors_dir(&restored)
            }
            other => panic!("no reader for {other}"),
        };
        assert_same(format, &got, &want);
    }
}

#[test]
fn a_gguf_file_is_byte_identical_whatever_the_number_of_workers() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "6MB", "bf16", 2);
    let one = dir.path().join("one");
    let three = dir.path().join("three");
    // With 3 workers the file is assembled in 1 MiB slices written at once (verify checks
    // the hash merged from the slices' against the file).
    let sliced = ["--assembly-slice-mib", "1"];
    run(&model, &one, "q4_0", "gguf", 1);
    run_with(&model, &three, "q4_0", "gguf", 3, &sliced);
    let a = std::fs::read(one.join("model.gguf")).unwrap();
    let b = std::fs::read(three.join("model.gguf")).unwrap();
    assert!(a.len() > 1 << 20, "{} bytes: one slice", a.len());
    assert!(a == b, "model.gguf differs between 1 and 3 workers");
    // Nothing but the file, its report and its manifest is left in the output.
    let mut names: Vec<String> = std::fs::read_dir(&three)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["manifest.json", "model.gguf", "report.html", "report.json"]
    );
    // A Mixtral-shaped model: each layer's experts, spread over several tasks, are written
    // into their stacked tensors identically whatever the number of workers.
    let moe = dir.path().join("moe");
    let output = shardpress(&[
        "gen-model",
        "--out",
        moe.to_str().unwrap(),
        "--size",
        "12MB",
        "--experts",
        "4",
    ]);
    assert_success(&output, "gen-model --experts 4");
    let (one, three) = (dir.path().join("moe-one"), dir.path().join("moe-three"));
    run(&moe, &one, "q4_k_m", "gguf", 1);
    run_with(&moe, &three, "q4_k_m", "gguf", 3, &sliced);
    let a = std::fs::read(one.join("model.gguf")).unwrap();
    let b = std::fs::read(three.join("model.gguf")).unwrap();
    assert!(a == b, "the MoE model.gguf differs between 1 and 3 workers");
    let parsed = parse_header(&a).unwrap();
    let stacked: Vec<_> = parsed
        .tensors
        .iter()
        .filter(|t| t.name.ends_with("_exps.weight"))
        .collect();
    assert!(!stacked.is_empty() && stacked.iter().all(|t| t.dims.last() == Some(&4)));
}

/// Writes `tensors` (name, dtype, shape, bytes) as one safetensors file.
fn write_safetensors(path: &Path, tensors: &[(String, DType, Vec<u64>, Vec<u8>)]) {
    let spec: Vec<(String, DType, Vec<u64>)> = tensors
        .iter()
        .map(|(n, d, s, _)| (n.clone(), *d, s.clone()))
        .collect();
    let (mut bytes, _) =
        shardpress_core::header::encode_header(&spec, &Default::default()).unwrap();
    for (_, _, _, data) in tensors {
        bytes.extend_from_slice(data);
    }
    std::fs::write(path, bytes).unwrap();
}

/// FP8 inputs with scales (DeepSeek-V3's 128x128 `weight_scale_inv`, and compressed-tensors'
/// per-channel `weight_scale` on one weight) are decoded to BF16 and compressed: the output
/// is exactly what the same recipe gives on the decoded BF16 model, holds no scale tensors,
/// and its config.json drops the input's FP8 quantization_config. `.spz`, which restores
/// original files, refuses such a model at submit.
#[test]
fn fp8_inputs_with_scales_are_decoded_then_compressed() {
    use shardpress_core::fp8::{e4m3_from_f32, e4m3_to_f32};
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    gen_model(&source, "6MB", "bf16", 100);
    let (fp8, decoded) = (dir.path().join("fp8"), dir.path().join("decoded"));
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(source.join("config.json")).unwrap()).unwrap();
    for target in [&fp8, &decoded] {
        std::fs::create_dir_all(target).unwrap();
        for entry in std::fs::read_dir(&source).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if !name.contains("safetensors") && name != "config.json" {
                std::fs::copy(&path, target.join(&name)).unwrap();
            }
        }
    }
    std::fs::write(decoded.join("config.json"), config.to_string()).unwrap();
    config["quantization_config"] = serde_json::json!({
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [128, 128]
    });
    std::fs::write(fp8.join("config.json"), config.to_string()).unwrap();

    let (mut fp8_tensors, mut bf16_tensors) = (Vec::new(), Vec::new());
    let mut per_channel_done = false;
    for (name, (dtype, shape, bytes)) in load_tensors(&source) {
        assert_eq!(dtype, safetensors::Dtype::BF16);
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        if !(name.contains("layers.") && name.ends_with("_proj.weight")) {
            fp8_tensors.push((name.clone(), DType::BF16, dims.clone(), bytes.clone()));
            bf16_tensors.push((name, DType::BF16, dims, bytes));
            continue;
        }
        let values = common::decode(dtype, &bytes);
        let (rows, cols) = (shape[0], shape[1]);
        // One weight per channel (compressed-tensors' layout), the rest in 128x128 blocks.
        let (block_rows, block_cols, suffix) = if per_channel_done {
            (128, 128, "_scale_inv")
        } else {
            per_channel_done = true;
            (1, cols, "_scale")
        };
        let grid = (rows.div_ceil(block_rows), cols.div_ceil(block_cols));
        let mut scales = vec![0f32; grid.0 * grid.1];
        for (i, v) in values.iter().enumerate() {
            let b = (i / cols / block_rows) * grid.1 + (i % cols) / block_cols;
            scales[b] = scales[b].max(v.abs() / 448.0);
        }
        let scale_of =
            |i: usize| scales[(i / cols / block_rows) * grid.1 + (i % cols) / block_cols];
        let codes: Vec<u8> = values
            .iter()
            .enumerate()
            .map(|(i, v)| e4m3_from_f32(v / scale_of(i).max(f32::MIN_POSITIVE)))
            .collect();
        let real: Vec<f32> = codes
            .iter()
            .enumerate()
            .map(|(i, &c)| e4m3_to_f32(c) * scale_of(i))
            .collect();
        let scale_bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        let scale_shape = if block_rows == 1 {
            vec![rows as u64, 1]
        } else {
            vec![grid.0 as u64, grid.1 as u64]
        };
        fp8_tensors.push((name.clone(), DType::F8_E4M3, dims.clone(), codes));
        fp8_tensors.push((
            format!("{name}{suffix}"),
            DType::F32,
            scale_shape,
            scale_bytes,
        ));
        bf16_tensors.push((name, DType::BF16, dims, bf16(&real)));
    }
    write_safetensors(&fp8.join("model.safetensors"), &fp8_tensors);
    write_safetensors(&decoded.join("model.safetensors"), &bf16_tensors);

    for (recipe, format) in [
        ("int4-g128", "safetensors"),
        ("w4a16", "compressed-tensors"),
    ] {
        let (a, b) = (
            dir.path().join(format!("fp8-{format}")),
            dir.path().join(format!("decoded-{format}")),
        );
        run(&fp8, &a, recipe, format, 2);
        run(&decoded, &b, recipe, format, 2);
        let (got, want) = (safetensors_dir(&a), safetensors_dir(&b));
        assert!(got.keys().all(|k| !k.contains("_scale_inv")), "{format}");
        assert_same(format, &got, &want);
        let out_config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(a.join("config.json")).unwrap()).unwrap();
        let q = &out_config["quantization_config"];
        match format {
            "safetensors" => assert!(q.is_null(), "{q}"),
            _ => assert_eq!(q["quant_method"], "compressed-tensors"),
        }
    }
    let refused = dir.path().join("fp8-spz");
    let output = shardpress(&[
        "run",
        "--workers",
        "1",
        "--model",
        fp8.to_str().unwrap(),
        "--out",
        refused.to_str().unwrap(),
        "--recipe",
        "int4-g128",
        "--format",
        "spz",
    ]);
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(message.contains("FP8 with scales"), "{message}");
    assert!(!refused.join("model.spz").exists());
}

/// compressed-tensors inputs: the job's own `pack-quantized` output (symmetric and with zero
/// points), compressed again, gives exactly what the same recipe gives on the dequantized
/// output of that job, in safetensors and compressed-tensors alike.
#[test]
fn compressed_tensors_inputs_are_decoded_then_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "6MB", "bf16", 2);
    for first in ["w4a16", "w4a16-asym", "w8a16"] {
        let (ct, dq) = (
            dir.path().join(format!("{first}-ct")),
            dir.path().join(format!("{first}-dq")),
        );
        run(&model, &ct, first, "compressed-tensors", 2);
        run(&model, &dq, first, "safetensors", 2);
        for (recipe, format) in [("int8", "safetensors"), ("w4a16-hqq", "compressed-tensors")] {
            let (a, b) = (
                dir.path().join(format!("{first}-ct-{recipe}")),
                dir.path().join(format!("{first}-dq-{recipe}")),
            );
            run(&ct, &a, recipe, format, 2);
            run(&dq, &b, recipe, format, 2);
            assert_same(
                &format!("{first} then {recipe}"),
                &safetensors_dir(&a),
                &safetensors_dir(&b),
            );
        }
    }
}

/// `shardpress plan` reads headers only and tells, before any work, what each pass touches and
/// how large each format's output is: the figures match what a job then writes.
#[test]
fn plan_predicts_what_a_job_touches_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "6MB", "bf16", 2);
    let plan = |recipe: &str| -> serde_json::Value {
        let output = shardpress(&[
            "plan",
            "--model",
            model.to_str().unwrap(),
            "--recipe",
            recipe,
            "--task-budget-mb",
            "1",
            "--json",
        ]);
        assert_success(&output, "plan");
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let w4a16 = plan("w4a16");
    let out = dir.path().join("ct");
    run(&model, &out, "w4a16", "compressed-tensors", 2);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    assert_eq!(w4a16["tasks"], report["tasks"].as_array().unwrap().len());
    assert_eq!(
        w4a16["passes"][0]["touches"]["tensors"],
        report["summary"]["tensors_compressed"]
    );
    assert_eq!(
        w4a16["output_bytes"]["compressed-tensors"]["bytes"],
        index["metadata"]["total_size"]
    );
    let refused = w4a16["output_bytes"]["gguf"]["refused"].as_str().unwrap();
    assert!(refused.contains("gguf"), "{refused}");
    let q4 = plan("q4_k_m");
    let out = dir.path().join("gguf");
    run(&model, &out, "q4_k_m", "gguf", 2);
    let size = std::fs::metadata(out.join("model.gguf")).unwrap().len();
    assert_eq!(q4["output_bytes"]["gguf"]["bytes"], size);
}
