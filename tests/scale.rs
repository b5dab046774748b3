//! Limits that grow with the model: a model of many tensors runs through a real cluster and
//! the client gets its whole report, however large (streamed, never one gRPC message).

mod common;

use std::collections::HashMap;

use common::*;

/// A model of `count` small BF16 expert weights in one layer (one task).
fn many_tensor_model(dir: &std::path::Path, count: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let (rows, cols) = (8usize, 32usize);
    let data: Vec<Vec<u8>> = (0..count)
        .map(|t| {
            (0..rows * cols)
                .flat_map(|i| {
                    let v = (((t * 31 + i * 7) % 97) as f32 - 48.0) / 64.0;
                    half::bf16::from_f32(v).to_le_bytes()
                })
                .collect()
        })
        .collect();
    let tensors: HashMap<String, safetensors::tensor::TensorView<'_>> = data
        .iter()
        .enumerate()
        .map(|(t, bytes)| {
            let name = format!("model.layers.0.mlp.experts.{t}.up_proj.weight");
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::BF16,
                vec![rows, cols],
                bytes,
            )
            .unwrap();
            (name, view)
        })
        .collect();
    safetensors::serialize_to_file(&tensors, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn a_report_larger_than_a_grpc_message_reaches_the_client() {
    let mut cluster = TestCluster::start(30.0);
    cluster.add_worker("w1", &[]);
    let model = cluster.dir.path().join("model");
    many_tensor_model(&model, 12_000);
    let out = cluster.dir.path().join("out");
    let result = cluster.compress(&model, &out, "int8");
    assert_success(&result, "compress 12,000 tensors");
    let report = std::fs::metadata(out.join("report.json")).unwrap().len();
    assert!(
        report > 4 << 20,
        "report.json is {report} bytes, not above gRPC's 4 MiB"
    );
    // The summary is printed from the streamed report.
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        stdout.contains("tensors      12000 (12000 compressed)"),
        "{stdout}"
    );
}
