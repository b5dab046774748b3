//! A human summary of `report.json`: totals, errors, per-layer table, time and gates.

use serde_json::Value;

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

fn worst(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(w) if !w.is_null() => format!(
            "{:.5} ({})",
            num(w, "value"),
            w.get("tensor").and_then(Value::as_str).unwrap_or("?")
        ),
        _ => "n/a".into(),
    }
}

/// A GGUF job's mixed-precision tensors counted by the block type stored (a width's type, or
/// llama.cpp's fallback for rows that are not whole blocks of it), widest first.
fn gguf_types(report: &Value, mixed: &Value) -> Vec<String> {
    let chosen: std::collections::HashSet<&str> = (mixed["tensors"].as_array().into_iter())
        .flatten()
        .filter_map(|t| t["name"].as_str())
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    for t in report["tensors"].as_array().into_iter().flatten() {
        if chosen.contains(t["name"].as_str().unwrap_or("")) {
            let ty = t["pass"]
                .as_str()
                .unwrap_or("?")
                .trim_start_matches("gguf ");
            *counts.entry(ty.to_owned()).or_insert(0u64) += 1;
        }
    }
    (counts.iter().rev())
        .map(|(ty, count)| format!("{ty} x{count}"))
        .collect()
}

pub fn print_summary(report: &Value) {
    let s = &report["summary"];
    let recipe = report["recipe"]["description"].as_str().unwrap_or("?");
    say!("recipe       {recipe}");
    say!(
        "tensors      {} ({} compressed), {:.2}M parameters",
        num(s, "tensors"),
        num(s, "tensors_compressed"),
        num(s, "params") / 1e6
    );
    let input = num(s, "input_bytes");
    let packed = num(s, "packed_size_bytes");
    say!(
        "bits/weight  {:.3} on compressed tensors, {:.3} overall (the representation: {:.1} MB if packed exactly)",
        num(s, "bits_per_weight_compressed"),
        num(s, "bits_per_weight"),
        packed / 1e6,
    );
    if let Some(stored) = s.get("stored_bits_per_weight").and_then(Value::as_f64) {
        let out = num(s, "output_bytes");
        let format = report["format"].as_str().unwrap_or("?");
        let what = match format {
            "spz" => "archive",
            "gguf" => "file",
            _ => "shards",
        };
        say!(
            "written      {:.1} MB of {format} {what} for {:.1} MB of input = {stored:.3} bits/weight on disk ({:.3} of the input)",
            out / 1e6,
            input / 1e6,
            if input > 0.0 { out / input } else { 0.0 }
        );
    }
    let shared = num(s, "tensors_shared");
    if shared > 0.0 {
        say!(
            "sharing      {shared} tensor(s) stored as another's compressed form (identical or near-identical; see shared_with in report.json)"
        );
    }
    if let Some(g) = report.get("global_prune").filter(|g| g.is_object()) {
        say!(
            "global prune {:.2}% of {:.2}M targeted weights below |w| {:.4e} (target {:.2}%)",
            100.0 * num(g, "sparsity"),
            num(g, "params") / 1e6,
            num(g, "threshold"),
            100.0 * num(g, "target_sparsity")
        );
    }
    if let Some(m) = report.get("mixed_precision").filter(|m| m.is_object()) {
        let widths = if report["format"] == "gguf" {
            gguf_types(report, m)
        } else {
            (m["widths"].as_object().into_iter().flatten())
                .rev()
                .map(|(width, count)| {
                    let count = count.as_u64().unwrap_or(0);
                    let split = width
                        .find(|c: char| !c.is_ascii_digit())
                        .unwrap_or(width.len());
                    match &width[split..] {
                        "" => format!("{width}-bit x{count}"),
                        "c" => format!("{}-bit per channel x{count}", &width[..split]),
                        rest => format!("{}-bit {rest} x{count}", &width[..split]),
                    }
                })
                .collect()
        };
        say!(
            "mixed prec.  {:.4} bits/weight stored on the quantized tensors (target {}): {}",
            num(m, "bits_per_weight"),
            num(m, "target_bpw"),
            widths.join(", ")
        );
        let weighted = num(m, "calibration_weighted_tensors") as u64;
        let scored = match weighted {
            0 => "by weight error".to_string(),
            n => format!(
                "{n} tensors by output error on {} calibration samples, the rest by weight error",
                num(m, "calibration_samples")
            ),
        };
        say!("             widths chosen {scored}");
        say!(
            "             predicted error (sum of squared relative errors) {:.4e}, {:.4e} at the narrowest width ({:.4} bits/weight)",
            num(m, "predicted_error"),
            num(m, "narrowest_error"),
            num(m, "narrowest_bits_per_weight")
        );
    }
    if let Some(c) = report.get("calibration").filter(|c| c.is_object()) {
        print_calibration(c);
    }
    say!(
        "error        rel. Frobenius {:.5} (parameter-weighted), worst {}",
        num(s, "rel_fro_error_weighted"),
        worst(s, "worst_rel_fro_error")
    );
    say!("             min cosine {}", worst(s, "min_cosine"));
    if let Some(layers) = report["layers"].as_array() {
        say!(
            "  {:<10} {:>7} {:>9} {:>6} {:>10} {:>10} {:>9}",
            "layer",
            "tensors",
            "params",
            "bpw",
            "rel_err",
            "worst",
            "min_cos"
        );
        let shown = 12;
        for (i, layer) in layers.iter().enumerate() {
            if layers.len() > shown && i == shown / 2 {
                say!("  … {} more layers …", layers.len() - shown);
            }
            if layers.len() > shown && i >= shown / 2 && i < layers.len() - shown / 2 {
                continue;
            }
            let errors = if num(layer, "tensors_compressed") > 0.0 {
                format!(
                    "{:>10.5} {:>10.5} {:>9.5}",
                    num(layer, "rel_fro_error_weighted"),
                    num(layer, "worst_rel_fro_error"),
                    num(layer, "min_cosine")
                )
            } else {
                format!("{:>10} {:>10} {:>9}", "copied", "-", "-")
            };
            say!(
                "  {:<10} {:>7} {:>8.2}M {:>6.2} {errors}",
                layer["layer"].as_str().unwrap_or("?"),
                num(layer, "tensors"),
                num(layer, "params") / 1e6,
                num(layer, "bits_per_weight"),
            );
        }
    }
    say!(
        "time         {:.2} s wall, {:.1} MB/s of input, {} workers, {} task retries",
        num(s, "wall_seconds"),
        num(s, "input_mb_per_second"),
        num(s, "workers_used"),
        num(s, "task_retries")
    );
    if num(s, "tasks_restored") > 0.0 {
        say!(
            "resumed      {} tasks finished by an earlier run of the job were kept (MB/s counts this run's reads)",
            num(s, "tasks_restored")
        );
    }
    // Both rounds' tasks of a job that measured first, so that idle time is not overstated.
    let tasks: Vec<&Value> = ["measuring_tasks", "tasks"]
        .iter()
        .filter_map(|key| report.get(*key).and_then(Value::as_array))
        .flatten()
        .collect();
    if !tasks.is_empty() {
        let total = |key: &str| tasks.iter().map(|t| num(t, key)).sum::<f64>();
        let spans: f64 = tasks
            .iter()
            .map(|t| num(t, "completed_at_seconds") - num(t, "leased_at_seconds"))
            .sum();
        let slots = num(s, "workers_used") * num(s, "wall_seconds");
        say!(
            "             tasks: read {:.2} s, compute {:.2} s, write {:.2} s, round trips {:.2} s (summed over {}); workers idle {:.2} s",
            total("read_seconds"),
            total("compute_seconds"),
            total("write_seconds"),
            (spans - total("seconds")).max(0.0),
            tasks.len(),
            (slots - spans).max(0.0)
        );
    }
    if let Some(measuring) = s.get("measuring_seconds").and_then(Value::as_f64) {
        let candidates = match s.get("share_candidates").and_then(Value::as_u64) {
            Some(n) => format!(", {n} near-identical candidate pair(s) checked"),
            None => String::new(),
        };
        say!("             of which {measuring:.2} s measuring before compressing{candidates}");
    }
    let gates = &report["gates"];
    let passed = gates["passed"].as_bool().unwrap_or(false);
    let violations = gates["violations"].as_array().map(Vec::len).unwrap_or(0);
    say!(
        "gates        {}",
        if passed {
            "passed".to_string()
        } else {
            format!("FAILED ({violations} violations)")
        }
    );
    say!(
        "format       {}",
        report["output_format"].as_str().unwrap_or("?")
    );
}

/// The calibration round and the function-space evaluation of `report.json`.
fn print_calibration(c: &Value) {
    let solved = c["tensors"].as_array().map_or(&[][..], Vec::as_slice);
    if !solved.is_empty() {
        let loss: f64 = solved.iter().map(|t| num(t, "proxy_loss")).sum();
        let baseline: f64 = solved.iter().map(|t| num(t, "baseline_proxy_loss")).sum();
        let method = solved[0]["method"].as_str().unwrap_or("?");
        say!(
            "calibrated   {} Linears ({method}) on {} samples ({} tokens): output error on the calibration inputs {:.3}x the data-free pass's",
            solved.len(),
            num(c, "calibration_samples"),
            num(c, "calibration_tokens"),
            if baseline > 0.0 { loss / baseline } else { 1.0 }
        );
    }
    let skipped = c["not_calibrated"].as_array().map_or(0, Vec::len);
    if skipped > 0 {
        say!("             {skipped} targeted tensor(s) stored data-free (not_calibrated in report.json)");
    }
    let Some(e) = c.get("evaluation").filter(|e| e.is_object()) else {
        return;
    };
    if let Some(mean) = e.get("mean_embedding_cosine").and_then(Value::as_f64) {
        say!(
            "evaluation   embedding cosine to the original {mean:.5} (mean), {:.5} (worst) over {} samples",
            num(e, "min_embedding_cosine"),
            num(e, "samples")
        );
    }
    if let Some(top1) = e.get("top1_agreement").and_then(Value::as_f64) {
        say!(
            "evaluation   top-1 agreement {top1:.5}, KL divergence {:.5} nats/token over {} tokens; perplexity {:.3} -> {:.3}",
            num(e, "mean_kld"),
            num(e, "tokens"),
            num(e, "perplexity_original"),
            num(e, "perplexity_compressed")
        );
    }
}
