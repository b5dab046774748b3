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

use common::{assert_success, gen_model, load_tensors, shardpress};
use shardpress_core::dtype::{encode_from_f32, DType};
use shardpress_core::format::compressed_tensors::dequantize_packed;
use shardpress_core::gguf::{architecture, parse_header, row_permutation, tensor_name};

/// name -> (shape, bytes in the input dtype).
type Tensors = BTreeMap<String, (Vec<usize>, Vec<u8>)>;

fn run(model: &Path, out: &Path, recipe: &str, format: &str, workers: usize) {
    let output = shardpress(&[
        "run",
        "--workers",
        &workers.to_string(),
        "--threads",
        "1",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--recipe",
        recipe,
        "--format",
        format,
        "--task-budget-mb",
        "1",
    ]);
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
    run(&model, &one, "q4_0", "gguf", 1);
    run(&model, &three, "q4_0", "gguf", 3);
    let a = std::fs::read(one.join("model.gguf")).unwrap();
    let b = std::fs::read(three.join("model.gguf")).unwrap();
    assert!(a == b, "model.gguf differs between 1 and 3 workers");
    // Nothing but the file, its report and its manifest is left in the output.
    let mut names: Vec<String> = std::fs::read_dir(&three)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["manifest.json", "model.gguf", "report.json"]);
}
