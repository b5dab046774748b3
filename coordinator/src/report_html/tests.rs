//! The report page: what it shows, that nothing from a job reaches it unescaped, and that an
//! empty report still renders.

use super::*;
use crate::report::{check_gates, layer_reports, summarize, RecipeInfo};
use shardpress_core::recipe::Gates;

fn tensor(name: &str, err: f64, cos: f64) -> TensorReport {
    TensorReport {
        name: name.into(),
        dtype: "BF16".into(),
        shape: vec![8, 4],
        params: 32,
        pass: "rtn int4".into(),
        bits_per_weight: 4.5,
        stored_bits_per_weight: None,
        rel_fro_error: Some(err),
        snr_db: Some(-20.0 * err.log10()),
        cosine: Some(cos),
        max_abs_error: Some(0.1),
        note: String::new(),
        output: "model-00001-of-00001.safetensors".into(),
        shared_with: None,
    }
}

fn task(worker: &str) -> TaskReport {
    TaskReport {
        index: 0,
        output: "model-00001-of-00001.safetensors".into(),
        worker: worker.into(),
        attempt: 1,
        input_bytes: 4096,
        output_bytes: 1024,
        leased_at_seconds: 0.0,
        completed_at_seconds: 1.0,
        seconds: 0.9,
        read_seconds: 0.2,
        compute_seconds: 0.6,
        write_seconds: 0.1,
        restored: false,
    }
}

fn report(tensors: Vec<TensorReport>, tasks: Vec<TaskReport>, gates: &Gates) -> Report {
    let summary = summarize(&tensors, &tasks, 1.5, 0);
    Report {
        job_id: "job-1".into(),
        model_url: "s3://bucket/model".into(),
        out_url: "s3://bucket/out".into(),
        recipe: RecipeInfo {
            name: "int4-g128".into(),
            description: "int4 per-group 128".into(),
            yaml: "passes:\n  - quantize: { bits: 4 }\n".into(),
        },
        format: "safetensors",
        output_format: "dequantized safetensors",
        summary,
        global_prune: None,
        gates: check_gates(gates, &tensors),
        calibration: None,
        mixed_precision: None,
        layers: layer_reports(&tensors),
        measuring_tasks: Vec::new(),
        tasks,
        tensors,
    }
}

fn no_gates() -> Gates {
    Gates {
        max_rel_error: None,
        min_cosine: None,
        min_snr_db: None,
        ..Gates::default()
    }
}

#[test]
fn the_page_shows_layers_worst_tensors_sizes_and_times() {
    let tensors = vec![
        tensor("model.layers.0.mlp.up_proj.weight", 0.02, 0.999),
        tensor("model.layers.1.mlp.up_proj.weight", 0.09, 0.99),
        tensor("lm_head.weight", 0.01, 0.9999),
    ];
    let page = render(&report(
        tensors,
        vec![task("w-a"), task("w-b")],
        &no_gates(),
    ));
    assert!(page.starts_with("<!doctype html>"));
    assert!(page.trim_end().ends_with("</html>"));
    for expected in [
        "layer 0",
        "layer 1",
        "other",
        "model.layers.1.mlp.up_proj.weight",
    ] {
        assert!(page.contains(expected), "missing {expected}");
    }
    // The worst tensor is listed first.
    let worst = page.find("model.layers.1.mlp.up_proj.weight").unwrap();
    let better = page.rfind("model.layers.0.mlp.up_proj.weight").unwrap();
    assert!(worst < better);
    // Four per-layer charts and the time bar, each with a bar per layer.
    assert_eq!(page.matches("<svg").count(), 5);
    assert!(page.matches("<rect").count() >= 4 * 3);
    assert!(page.contains("8.19 kB"), "size before");
    assert!(page.contains("2.05 kB"), "size after");
    assert!(page.contains("w-a") && page.contains("w-b"));
    assert!(page.contains("quantize: { bits: 4 }"));
    assert!(page.contains("passed"));
}

#[test]
fn text_from_the_job_is_escaped() {
    let evil = "<script>alert('x')</script>\"&";
    let mut r = report(vec![tensor(evil, 0.5, 0.5)], vec![task(evil)], &no_gates());
    r.recipe.yaml = format!("name: {evil}\n");
    r.recipe.name = evil.into();
    r.job_id = evil.into();
    r.tensors[0].note = evil.into();
    r.model_url = format!("http://user:secret@host/{evil}");
    let page = render(&r);
    assert!(!page.contains("<script"), "{page}");
    assert!(!page.contains("alert('x')"));
    assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&amp;"));
    assert!(
        !page.contains("secret"),
        "a URL's password reached the page"
    );
}

#[test]
fn a_report_without_tensors_renders() {
    let page = render(&report(Vec::new(), Vec::new(), &no_gates()));
    assert!(page.contains("no layers"));
    assert!(page.contains("no tensor was transformed"));
    assert!(!page.contains("NaN") && !page.contains("inf"), "{page}");
}

#[test]
fn sizes_read_in_decimal_units() {
    assert_eq!(bytes(999), "999 B");
    assert_eq!(bytes(8192), "8.19 kB");
    assert_eq!(bytes(1_500_000_000), "1.50 GB");
}

#[test]
fn failed_gates_list_their_violations() {
    let gates = Gates {
        max_rel_error: Some(0.05),
        ..no_gates()
    };
    let r = report(
        vec![tensor("model.layers.3.w", 0.2, 0.9)],
        vec![task("w")],
        &gates,
    );
    assert!(!r.gates.passed);
    let page = render(&r);
    assert!(page.contains("1 violations"));
    assert!(page.contains("rel_fro_error"));
}

#[test]
fn odd_values_do_not_break_the_charts() {
    let mut t = tensor("model.layers.0.w", f64::NAN, f64::NEG_INFINITY);
    t.bits_per_weight = f64::INFINITY;
    let page = render(&report(vec![t], vec![task("w")], &no_gates()));
    assert!(!page.contains("NaN"));
    assert!(page.contains("<svg"));
}
