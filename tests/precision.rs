//! Mixed precision to a bit budget through real processes: a measuring round encodes every
//! quantized tensor at every candidate width, the coordinator chooses, and the compressing
//! round (after a calibration round, for GPTQ) stores each tensor at its width. The budget is
//! met on disk, the report's figures are what the shards hold, the choice is the same for any
//! number of workers, and impossible budgets or widths are refused clearly.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::*;

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The most distinct values in any run of `group` weights of a row of `values`.
fn most_distinct_per_group(values: &[f32], row_len: usize, group: usize) -> usize {
    (values.chunks(row_len))
        .flat_map(|row| row.chunks(group))
        .map(|g| g.iter().map(|v| v.to_bits()).collect::<BTreeSet<_>>().len())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_bit_budget_is_met_on_disk_and_spent_where_the_error_falls_most() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "4MB", "bf16", 5000);
    let budget = "4.6";
    let three = dir.path().join("three");
    let output = run_job(
        &model,
        &three,
        "int4-g128-asym",
        3,
        &["--target-bpw", budget],
    );
    assert_success(&output, "mixed precision with 3 workers");
    let printed = String::from_utf8_lossy(&output.stdout).into_owned() + &stderr(&output);
    assert!(printed.contains("mixed prec."), "{printed}");
    let one = dir.path().join("one");
    let output = run_job(&model, &one, "int4-g128-asym", 1, &["--target-bpw", budget]);
    assert_success(&output, "mixed precision with 1 worker");
    let (a, b) = (manifest_objects(&one), manifest_objects(&three));
    for (name, bytes) in a.iter().filter(|(n, _)| n.ends_with(".safetensors")) {
        assert!(bytes == &b[name], "{name} differs between 1 and 3 workers");
    }

    let mixed = report(&three);
    let m = &mixed["mixed_precision"];
    assert_eq!(f(&m["target_bpw"]), 4.6);
    let stored = f(&m["bits_per_weight"]);
    assert!(
        stored <= 4.6 && stored > f(&m["narrowest_bits_per_weight"]),
        "{m}"
    );
    assert!(f(&m["predicted_error"]) < f(&m["narrowest_error"]), "{m}");
    let rows = m["tensors"].as_array().unwrap();
    let widths: BTreeSet<u64> = rows.iter().map(|t| t["bits"].as_u64().unwrap()).collect();
    assert!(widths.len() >= 2, "one width for every tensor: {widths:?}");

    // Every figure is what the shards hold: the report's tensors at their widths, the
    // stored bits and errors exactly as measured, the average over the tensors' own rows.
    let tensors: BTreeMap<&str, &serde_json::Value> = (mixed["tensors"].as_array().unwrap())
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t))
        .collect();
    let written = load_tensors(&three);
    let (mut bits, mut params) = (0.0, 0.0);
    for row in rows {
        let name = row["name"].as_str().unwrap();
        let width = row["bits"].as_u64().unwrap();
        let tensor = tensors[name];
        assert!(
            tensor["pass"]
                .as_str()
                .unwrap()
                .starts_with(&format!("rtn int{width} asym g128")),
            "{tensor}"
        );
        let chosen = (row["candidates"].as_array().unwrap())
            .iter()
            .find(|c| c["bits"].as_u64() == Some(width))
            .unwrap();
        assert_eq!(
            f(&chosen["bits_per_weight"]),
            f(&tensor["bits_per_weight"]),
            "{name}"
        );
        let error = f(&tensor["rel_fro_error"]);
        let measured = f(&chosen["rel_error_sq"]);
        assert!(
            (error * error - measured).abs() <= 1e-9 * measured,
            "{name}: {error}² vs {measured}"
        );
        bits += f(&tensor["bits_per_weight"]) * f(&tensor["params"]);
        params += f(&tensor["params"]);
        // The dequantized weights hold at most 2^width values per group of 128, and a
        // tensor wider than 4 bits more than 16 somewhere.
        let (dtype, shape, data) = &written[name];
        let values = decode(*dtype, data);
        let distinct = most_distinct_per_group(&values, shape[1], 128);
        assert!(
            distinct <= 1 << width,
            "{name}: {distinct} values at {width} bits"
        );
        if width > 4 {
            assert!(
                distinct > 16,
                "{name}: only {distinct} values at {width} bits"
            );
        }
    }
    assert!(
        (bits / params - stored).abs() < 1e-9,
        "{} vs {stored}",
        bits / params
    );

    // The same budget buys a lower error than the plain 4-bit recipe.
    let plain = dir.path().join("plain");
    assert_success(
        &run_job(&model, &plain, "int4-g128-asym", 2, &[]),
        "plain int4",
    );
    let plain = report(&plain);
    let weighted = |r: &serde_json::Value| f(&r["summary"]["rel_fro_error_weighted"]);
    assert!(
        weighted(&mixed) < weighted(&plain),
        "{} vs {}",
        weighted(&mixed),
        weighted(&plain)
    );
}

#[test]
fn gptq_calibrates_each_tensor_at_its_chosen_width() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "4MB", "bf16", 5000);
    let out = dir.path().join("out");
    let calibration = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/calibration.txt");
    let output = run_job(
        &model,
        &out,
        "gptq-w4a16-asym",
        2,
        &[
            "--target-bpw",
            "4.6",
            "--calibration",
            calibration.to_str().unwrap(),
            "--calibration-samples",
            "16",
            "--calibration-seq-len",
            "32",
        ],
    );
    assert_success(&output, "gptq with a bit budget");
    let r = report(&out);
    let chosen: BTreeMap<&str, u64> = (r["mixed_precision"]["tensors"].as_array().unwrap())
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["bits"].as_u64().unwrap()))
        .collect();
    assert!(f(&r["mixed_precision"]["bits_per_weight"]) <= 4.6);
    let solved = r["calibration"]["tensors"].as_array().unwrap();
    assert!(solved.len() >= 7);
    let mut wider = 0;
    for t in solved {
        let name = t["name"].as_str().unwrap();
        let width = chosen[name];
        wider += usize::from(width > 4);
        let method = t["method"].as_str().unwrap();
        assert!(
            method.starts_with(&format!("gptq int{width} asym g128")),
            "{name}: {method}"
        );
    }
    assert!(wider > 0, "no calibrated tensor got more than 4 bits");
}

/// A candidate may change the group size as well as the bits: the tensors that get it are
/// stored in groups of that size (at most 16 values per group of 32 at 4 bits), counted at
/// what those groups cost, and compressed-tensors gets a config group for them.
#[test]
fn candidates_may_change_the_group_size() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "4MB", "bf16", 5000);
    let recipe = dir.path().join("groups.yaml");
    std::fs::write(
        &recipe,
        "passes:\n  - quantize: { bits: 4, symmetric: false, granularity: group, group_size: 128 }\n    targets: ['re:.*proj\\.weight']\nmixed_precision: { target_bpw: 4.5, candidates: [4, '4g32', 8] }\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let output = run_job(&model, &out, recipe.to_str().unwrap(), 2, &[]);
    assert_success(&output, "candidates with a group size");
    let printed = String::from_utf8_lossy(&output.stdout).into_owned() + &stderr(&output);
    assert!(printed.contains("4-bit g32 x"), "{printed}");
    let r = report(&out);
    let m = &r["mixed_precision"];
    assert!(f(&m["bits_per_weight"]) <= 4.5, "{m}");
    assert!(m["widths"]["4g32"].as_u64().unwrap_or(0) > 0, "{m}");
    let tensors: BTreeMap<&str, &serde_json::Value> = (r["tensors"].as_array().unwrap())
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t))
        .collect();
    let written = load_tensors(&out);
    let (mut narrow, mut plain) = (0, 0);
    for row in m["tensors"].as_array().unwrap() {
        let name = row["name"].as_str().unwrap();
        let pass = tensors[name]["pass"].as_str().unwrap();
        let (dtype, shape, data) = &written[name];
        let values = decode(*dtype, data);
        match (row["bits"].as_u64(), row["group_size"].as_u64()) {
            (Some(4), Some(32)) => {
                narrow += 1;
                assert!(pass.starts_with("rtn int4 asym g32"), "{name}: {pass}");
                assert!(
                    most_distinct_per_group(&values, shape[1], 32) <= 16,
                    "{name}"
                );
                // Groups of 128 hold more than 16 values: the scales really are per 32.
                assert!(
                    most_distinct_per_group(&values, shape[1], 128) > 16,
                    "{name}"
                );
            }
            (Some(bits), None) => {
                plain += 1;
                assert!(
                    pass.starts_with(&format!("rtn int{bits} asym g128")),
                    "{name}: {pass}"
                );
            }
            other => panic!("{name}: unexpected width {other:?}"),
        }
    }
    assert!(
        narrow > 0 && plain > 0,
        "{narrow} in groups of 32, {plain} others"
    );

    // compressed-tensors: one config group per scheme, groups of 32 among them.
    let ct = dir.path().join("ct");
    let output = run_job(
        &model,
        &ct,
        recipe.to_str().unwrap(),
        2,
        &["--format", "compressed-tensors"],
    );
    assert_success(&output, "candidates with a group size, compressed-tensors");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ct.join("config.json")).unwrap()).unwrap();
    let groups = config["quantization_config"]["config_groups"]
        .as_object()
        .unwrap();
    let sizes: BTreeSet<u64> = (groups.values())
        .filter_map(|g| g["weights"]["group_size"].as_u64())
        .collect();
    assert!(sizes.contains(&32) && sizes.contains(&128), "{groups:?}");

    // `plan` gives no compressed-tensors size before the widths are chosen, and says why.
    let output = shardpress(&[
        "plan",
        "--json",
        "--model",
        model.to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
    ]);
    assert_success(&output, "plan of a bit budget");
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let sizes = &plan["output_bytes"];
    assert!(sizes["safetensors"]["bytes"].is_u64(), "{sizes}");
    assert!(sizes["compressed-tensors"]["bytes"].is_null(), "{sizes}");
    let why = sizes["compressed-tensors"]["why"].as_str().unwrap();
    assert!(why.contains("widths the measuring round chooses"), "{why}");
}

/// With calibration data a data-free recipe's widths are chosen by the error each causes in
/// its layer's output on held-out calibration inputs: every Linear of the transformer blocks
/// is scored so, the choice and the output are the same for 1 and 3 workers, and the budget
/// is met. Calibration data without a budget to spend it on is refused.
#[test]
fn calibration_data_scores_the_widths_of_a_data_free_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "4MB", "bf16", 5000);
    let calibration = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/calibration.txt");
    let calibration = calibration.to_str().unwrap();
    let flags = [
        "--calibration",
        calibration,
        "--calibration-samples",
        "40",
        "--calibration-seq-len",
        "32",
    ];
    let refused = dir.path().join("refused");
    let output = run_job(&model, &refused, "int4-g128-asym", 1, &flags);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("no bit budget"),
        "{}",
        stderr(&output)
    );
    assert!(files_under(&refused).is_empty());

    let budget = [&flags[..], &["--target-bpw", "4.6"]].concat();
    let three = dir.path().join("three");
    let output = run_job(&model, &three, "int4-g128-asym", 3, &budget);
    assert_success(&output, "calibration-scored mixed precision, 3 workers");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("by output error on 40 calibration samples"),
        "{printed}"
    );
    let one = dir.path().join("one");
    let output = run_job(&model, &one, "int4-g128-asym", 1, &budget);
    assert_success(&output, "calibration-scored mixed precision, 1 worker");
    let (a, b) = (manifest_objects(&one), manifest_objects(&three));
    for (name, bytes) in a.iter().filter(|(n, _)| n.ends_with(".safetensors")) {
        assert!(bytes == &b[name], "{name} differs between 1 and 3 workers");
    }
    let r = report(&three);
    let m = &r["mixed_precision"];
    assert!(f(&m["bits_per_weight"]) <= 4.6, "{m}");
    assert_eq!(f(&m["calibration_samples"]), 40.0);
    let rows = m["tensors"].as_array().unwrap();
    let mut weighted = 0;
    for row in rows {
        let name = row["name"].as_str().unwrap();
        let in_block = name.contains(".layers.");
        assert_eq!(
            row["calibration_weighted"].as_bool(),
            Some(in_block),
            "{name}"
        );
        weighted += usize::from(in_block);
        // Each width is scored by what it does: wider, smaller error.
        let errors: Vec<f64> = (row["candidates"].as_array().unwrap())
            .iter()
            .map(|c| f(&c["rel_error_sq"]))
            .collect();
        assert!(errors.windows(2).all(|w| w[1] < w[0]), "{name}: {errors:?}");
    }
    assert!(
        weighted >= 7,
        "{weighted} tensors scored on the calibration data"
    );
    assert_eq!(
        m["calibration_weighted_tensors"].as_u64(),
        Some(weighted as u64)
    );
    // The layer-output score is not the weight error the measuring tasks report.
    let plain = dir.path().join("plain");
    let output = run_job(
        &model,
        &plain,
        "int4-g128-asym",
        2,
        &["--target-bpw", "4.6"],
    );
    assert_success(&output, "weight-error mixed precision");
    let by_weights = report(&plain);
    let first = |r: &serde_json::Value| {
        let rows = r["mixed_precision"]["tensors"].as_array().unwrap();
        let row = rows
            .iter()
            .find(|t| t["calibration_weighted"] == true)
            .unwrap_or(&rows[0]);
        (
            row["name"].clone(),
            f(&row["candidates"][0]["rel_error_sq"]),
        )
    };
    let (name, scored) = first(&r);
    let unweighted = (by_weights["mixed_precision"]["tensors"].as_array().unwrap())
        .iter()
        .find(|t| t["name"] == name)
        .map(|t| f(&t["candidates"][0]["rel_error_sq"]))
        .unwrap();
    assert!(
        (scored - unweighted).abs() > 1e-3 * unweighted,
        "{name}: {scored} vs {unweighted}"
    );
    // `score: weights` keeps the weight error even with calibration data (GPTQ here).
    let recipe = dir.path().join("gptq-weights.yaml");
    std::fs::write(
        &recipe,
        "passes:\n  - quantize: { method: gptq, bits: 4, symmetric: false, granularity: group, group_size: 128 }\n    targets: ['re:.*proj\\.weight$']\nmixed_precision: { target_bpw: 4.6, score: weights }\n",
    )
    .unwrap();
    let cheap = dir.path().join("cheap");
    let output = run_job(&model, &cheap, recipe.to_str().unwrap(), 2, &flags);
    assert_success(&output, "gptq with widths scored by weight error");
    let m = &report(&cheap)["mixed_precision"];
    assert_eq!(m["calibration_weighted_tensors"].as_u64(), Some(0), "{m}");
    assert!(f(&m["bits_per_weight"]) <= 4.6, "{m}");
}

#[test]
fn impossible_budgets_and_widths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    gen_model(&model, "1MB", "bf16", 5000);
    // Below what the narrowest candidate stores: the job fails after measuring, no output.
    let out = dir.path().join("low");
    let output = run_job(&model, &out, "int4-g128-asym", 2, &["--target-bpw", "2.5"]);
    assert!(!output.status.success());
    let printed = String::from_utf8_lossy(&output.stdout).into_owned() + &stderr(&output);
    assert!(
        printed.contains("below the") && printed.contains("bits/weight"),
        "{printed}"
    );
    assert!(!out.join("manifest.json").exists());

    // compressed-tensors packs 4 and 8 bits only: a 3-bit candidate is refused at submit.
    let recipe = dir.path().join("three-bit.yaml");
    std::fs::write(
        &recipe,
        "passes:\n  - quantize: { bits: 4, granularity: group, group_size: 128 }\n    targets: ['re:.*proj\\.weight']\nmixed_precision: { target_bpw: 4.5, candidates: [3, 4, 8] }\n",
    )
    .unwrap();
    let out = dir.path().join("ct");
    let output = run_job(
        &model,
        &out,
        recipe.to_str().unwrap(),
        1,
        &["--format", "compressed-tensors"],
    );
    assert!(!output.status.success());
    let printed = stderr(&output);
    assert!(
        printed.contains("mixed_precision candidate 3 (3 bits)"),
        "{printed}"
    );
    assert!(files_under(&out).is_empty(), "{:?}", files_under(&out));

    // GGUF has no type narrower than Q4_K (4.5 bits/weight), nor a 3-bit width; a nonsense
    // budget.
    let gguf_three = dir.path().join("gguf-three.yaml");
    std::fs::write(
        &gguf_three,
        "passes:\n  - gguf: { type: q4_k_m }\n    targets: ['re:.*']\nmixed_precision: { target_bpw: 4.5, candidates: [3, 4] }\n",
    )
    .unwrap();
    for (recipe, budget, expected) in [
        ("q4_k_m", "4.4", "below the 4.5000 bits/weight"),
        (
            gguf_three.to_str().unwrap(),
            "4.5",
            "not a width of a gguf pass",
        ),
        ("int4-g128", "0", "target_bpw"),
    ] {
        let out = dir.path().join("refused");
        let output = run_job(&model, &out, recipe, 1, &["--target-bpw", budget]);
        assert!(!output.status.success());
        assert!(
            stderr(&output).contains(expected),
            "{recipe}: {}",
            stderr(&output)
        );
        assert!(!out.join("manifest.json").exists());
    }
}
