//! Tests for recipe parsing, validation, matching and presets.

use super::*;

const EXAMPLE: &str = r#"
name: int4-g128
passes:
  - quantize: { bits: 4, symmetric: true, granularity: group, group_size: 128 }
    targets: ["re:.*\\.(q|k|v|o|gate|up|down)_proj\\.weight$"]
    ignore: ["lm_head.weight"]
gates:
  max_rel_error: 0.2
  min_cosine: 0.98
  min_snr_db: 10.0
"#;

fn err(yaml: &str) -> RecipeError {
    Recipe::from_yaml(yaml).unwrap_err()
}

#[test]
fn parses_the_documented_example() {
    let r = Recipe::from_yaml(EXAMPLE).unwrap();
    assert_eq!(r.name, "int4-g128");
    assert_eq!(r.source_yaml, EXAMPLE);
    assert_eq!(
        r.passes[0].kind,
        PassKind::Quantize(QuantizeConfig {
            bits: 4,
            symmetric: true,
            granularity: Granularity::Group(128),
            scale_dtype: crate::recipe::ScaleDtype::F16,
        })
    );
    assert_eq!(
        r.gates,
        Gates {
            max_rel_error: Some(0.2),
            min_cosine: Some(0.98),
            min_snr_db: Some(10.0),
            ..Gates::default()
        }
    );
    assert_eq!(
        r.passes_for("model.layers.0.self_attn.q_proj.weight").len(),
        1
    );
    assert!(r
        .passes_for("model.layers.0.self_attn.q_proj.bias")
        .is_empty());
    // Full match: a prefix or suffix alone is not enough.
    assert!(r.passes_for("x.q_proj.weight.extra").is_empty());
    assert_eq!(
        r.describe(),
        "int4-g128: quantize 4-bit sym group 128 (gates: rel_error <= 0.2, cosine >= 0.98, snr >= 10 dB)"
    );
}

#[test]
fn defaults_and_ignore() {
    let r = Recipe::from_yaml(
        "passes:\n  - quantize: { bits: 8, granularity: group }\n    targets: [a, 're:b.*']\n    ignore: [bz]\n",
    )
    .unwrap();
    assert_eq!(r.name, "custom");
    assert_eq!(r.gates, Gates::default());
    let PassKind::Quantize(q) = &r.passes[0].kind else {
        panic!("not a quantize pass")
    };
    assert_eq!(q.granularity, Granularity::Group(128));
    assert!(q.symmetric);
    assert_eq!(r.passes_for("a").len(), 1);
    assert_eq!(r.passes_for("bar").len(), 1);
    assert!(r.passes_for("bz").is_empty());
    assert!(r.passes_for("ab").is_empty());
    assert_eq!(r.passes[0].targets[1].pattern(), "re:b.*");
    assert_eq!(r.passes[0].targets[0].pattern(), "a");
}

#[test]
fn multiple_passes_apply_in_order() {
    let r = Recipe::from_yaml(
        "passes:\n  - quantize: { bits: 8, granularity: channel }\n    targets: ['re:.*']\n  - quantize: { bits: 4, symmetric: false, granularity: group, group_size: 32 }\n    targets: [w]\n",
    )
    .unwrap();
    let kinds: Vec<String> = r.passes_for("w").iter().map(|k| k.describe()).collect();
    assert_eq!(kinds, ["rtn int8 sym per-channel", "rtn int4 asym g32"]);
    assert_eq!(r.passes_for("v").len(), 1);
}

#[test]
fn typos_and_yaml_errors_are_reported() {
    let e = err(
        "passes:\n  - quantize: { bits: 4, granularity: group, grop_size: 3 }\n    targets: [a]\n",
    );
    assert!(matches!(e, RecipeError::Yaml { .. }), "{e}");
    let e = err("passes: [\n");
    assert!(
        matches!(e, RecipeError::Yaml { line: Some(_), .. }),
        "{e:?}"
    );
    assert!(matches!(
        err("name: x\npasses: []\nextra: 1\n"),
        RecipeError::Yaml { .. }
    ));
    let e = err("passes:\n  - quantize: { bits: 4, granularity: row }\n    targets: [a]\n");
    assert!(matches!(e, RecipeError::Yaml { .. }));
}

#[test]
fn validation_errors_name_the_field() {
    let cases = [
        ("passes: []\n", "passes"),
        ("passes:\n  - quantize: { bits: 9, granularity: channel }\n    targets: [a]\n", "passes[0].quantize.bits"),
        ("passes:\n  - quantize: { bits: 1, granularity: channel }\n    targets: [a]\n", "passes[0].quantize.bits"),
        ("passes:\n  - quantize: { bits: 4, granularity: group, group_size: 0 }\n    targets: [a]\n", "passes[0].quantize.group_size"),
        ("passes:\n  - quantize: { bits: 4, granularity: channel, group_size: 8 }\n    targets: [a]\n", "passes[0].quantize.group_size"),
        ("passes:\n  - quantize: { bits: 4, granularity: channel }\n", "passes[0].targets"),
        ("passes:\n  - targets: [a]\n", "passes[0]"),
        ("passes:\n  - quantize: { bits: 4, granularity: channel }\n    targets: [a]\ngates: { max_rel_error: 0 }\n", "gates.max_rel_error"),
        ("passes:\n  - quantize: { bits: 4, granularity: channel }\n    targets: [a]\ngates: { min_cosine: 1.5 }\n", "gates.min_cosine"),
        ("passes:\n  - quantize: { bits: 4, granularity: channel }\n    targets: [a]\ngates: { min_snr_db: .nan }\n", "gates.min_snr_db"),
    ];
    for (yaml, want) in cases {
        match err(yaml) {
            RecipeError::Invalid { field, .. } => assert_eq!(field, want, "{yaml}"),
            other => panic!("{yaml}: {other:?}"),
        }
    }
}

#[test]
fn bad_regex_names_the_pattern() {
    let e = err(
        "passes:\n  - quantize: { bits: 4, granularity: channel }\n    targets: ['re:(unclosed']\n",
    );
    assert!(
        matches!(e, RecipeError::Regex { ref pattern, .. } if pattern == "re:(unclosed"),
        "{e:?}"
    );
}

#[test]
fn presets_parse_and_target_linear_weights() {
    for name in Recipe::preset_names() {
        let r = Recipe::preset(name).unwrap_or_else(|| panic!("preset {name}"));
        assert_eq!(&r.name, name);
        let expected = match name {
            "lossless" => 0,
            "2of4-int4" | "2of4-w4a16" => 2,
            _ => 1,
        };
        assert_eq!(
            r.passes_for("model.layers.3.mlp.up_proj.weight").len(),
            expected,
            "{name}"
        );
        assert!(r.passes_for("model.layers.3.mlp.up_proj.bias").is_empty());
        if r.format == OutputFormat::Gguf {
            // llama-quantize quantizes the embeddings and the output too (1-D norms are
            // stored F32 whatever the recipe targets).
            assert_eq!(r.passes_for("model.embed_tokens.weight").len(), 1);
            assert_eq!(r.passes_for("lm_head.weight").len(), 1);
            continue;
        }
        assert!(r
            .passes_for("bert.encoder.layer.0.attention.output.LayerNorm.weight")
            .is_empty());
        assert!(r.passes_for("model.embed_tokens.weight").is_empty());
        assert!(r.passes_for("lm_head.weight").is_empty());
        assert!(r
            .passes_for("model.layers.3.input_layernorm.weight")
            .is_empty());
    }
    assert!(Recipe::preset("nope").is_none());
    for name in [
        "int8",
        "int4-g128",
        "hqq4",
        "nf4",
        "fp8",
        "2of4",
        "2of4-int4",
        "svd50",
        "lossless",
        "q8_0",
        "q4_0",
        "q4_k_m",
        "q6_k",
    ] {
        assert!(Recipe::preset_names().contains(&name), "{name}");
    }
    assert_eq!(
        Recipe::preset("lossless").unwrap().format,
        OutputFormat::Spz
    );
    let asym = Recipe::preset("int4-g128-asym").unwrap();
    assert_eq!(asym.passes[0].kind.describe(), "rtn int4 asym g128");
    assert_eq!(
        Recipe::preset("int8").unwrap().describe(),
        "int8: quantize 8-bit sym per-channel"
    );
    assert_eq!(
        Recipe::preset("int8-g128").unwrap().passes[0]
            .kind
            .describe(),
        "rtn int8 sym g128"
    );
}

#[test]
fn magnitude_pruning_takes_a_per_tensor_or_one_global_scope() {
    let prune = |extra: &str| {
        format!("passes:\n  - prune: {{ method: magnitude, sparsity: 0.4{extra} }}\n    targets: ['re:.*']\n")
    };
    let tensor = Recipe::from_yaml(&prune("")).unwrap();
    assert_eq!(tensor.global_sparsity(), None);
    assert_eq!(
        Recipe::from_yaml(&prune(", scope: tensor")).unwrap().passes[0].kind,
        tensor.passes[0].kind
    );
    let global = Recipe::from_yaml(&prune(", scope: global")).unwrap();
    assert_eq!(global.global_sparsity(), Some(0.4));
    assert!(global.describe().contains("prune magnitude 0.4 global"));
    assert!(err(&prune(", scope: layer")).to_string().contains("scope"));
    let nm =
        "passes:\n  - prune: { method: nm, n: 2, m: 4, scope: global }\n    targets: ['re:.*']\n";
    assert!(err(nm).to_string().contains("does not apply"));
    let two = format!(
        "{}  - prune: {{ method: magnitude, sparsity: 0.2, scope: global }}\n    targets: [b]\n",
        prune(", scope: global")
    );
    let e = err(&two).to_string();
    assert!(
        e.contains("passes[1]") && e.contains("only one global"),
        "{e}"
    );
}

#[test]
fn sharing_near_identical_tensors_takes_a_cosine_threshold() {
    let base = "passes:\n  - quantize: { bits: 8, granularity: channel }\n    targets: ['re:.*']\n";
    assert_eq!(Recipe::from_yaml(base).unwrap().share_cosine, None);
    let r = Recipe::from_yaml(&format!("{base}share: {{ cosine: 0.999 }}\n")).unwrap();
    assert_eq!(r.share_cosine, Some(0.999));
    assert!(r.describe().contains("cosine >= 0.999"));
    for bad in ["0", "1.5", "-0.2", ".nan"] {
        let e = err(&format!("{base}share: {{ cosine: {bad} }}\n")).to_string();
        assert!(e.contains("share.cosine"), "{bad}: {e}");
    }
    assert!(err(&format!("{base}share: {{ cos: 0.9 }}\n"))
        .to_string()
        .contains("cos"));
}

#[test]
fn module_names_select_their_weight() {
    let recipe = Recipe::from_yaml(
        "passes:\n  - quantize: { bits: 8, granularity: channel }\n    targets: ['re:.*mlp\\.down_proj', lm_head]\n    ignore: [model.layers.1.mlp.down_proj]\n",
    )
    .unwrap();
    assert!(!recipe.passes_for("lm_head.weight").is_empty());
    assert!(!recipe
        .passes_for("model.layers.0.mlp.down_proj.weight")
        .is_empty());
    assert!(recipe
        .passes_for("model.layers.1.mlp.down_proj.weight")
        .is_empty());
    // Only the weight: a module's bias, or a longer name, is not selected.
    assert!(recipe.passes_for("lm_head.bias").is_empty());
    assert!(recipe.passes_for("lm_head_2.weight").is_empty());
}

#[test]
fn entries_that_select_no_tensor_are_listed() {
    let recipe = Recipe::from_yaml(
        "passes:\n  - quantize: { bits: 8, granularity: channel }\n    targets: [Linear, 're:.*proj\\.weight']\n    ignore: [lm_head, 're:.*norm.*']\n",
    )
    .unwrap();
    let names = ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"];
    let unmatched = recipe.unmatched(names.into_iter());
    assert_eq!(unmatched.len(), 2, "{unmatched:?}");
    assert_eq!(
        (unmatched[0].list, unmatched[0].pattern.as_str()),
        ("targets", "Linear")
    );
    assert_eq!(
        (unmatched[1].list, unmatched[1].pattern.as_str()),
        ("ignore", "re:.*norm.*")
    );
    assert!(unmatched[0].to_string().starts_with("pass 1 (quantize"));
    assert!(!recipe.is_builtin());
    for name in Recipe::preset_names() {
        assert!(Recipe::preset(name).unwrap().is_builtin(), "{name}");
    }
}

#[test]
fn built_in_recipes_compress_the_language_models_linear_weights_and_nothing_else() {
    let recipe = Recipe::preset("int4-g128").unwrap();
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.3.mlp.experts.7.down_proj.weight",
        "model.layers.3.block_sparse_moe.experts.0.w1.weight",
        "transformer.h.0.attn.c_attn.weight",
        "encoder.layer.0.attention.self.query.weight",
    ] {
        assert_eq!(
            recipe.passes_for(name).len(),
            1,
            "{name} should be compressed"
        );
    }
    for name in [
        "model.embed_tokens.weight",
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "lm_head.weight",
        "model.norm.weight",
        "encoder.layer.0.attention.output.LayerNorm.weight",
        "model.layers.3.mlp.gate.weight",
        "model.layers.3.block_sparse_moe.gate.weight",
        "model.layers.3.mlp.shared_expert_gate.weight",
        "model.layers.3.mlp.router.weight",
        "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "visual.blocks.0.attn.qkv.weight",
        "multi_modal_projector.linear_1.weight",
    ] {
        assert!(
            recipe.passes_for(name).is_empty(),
            "{name} should be left alone"
        );
    }
}

#[test]
fn recipes_too_large_or_too_deeply_nested_are_refused_before_parsing() {
    let refused = |yaml: &str| Recipe::from_yaml(yaml).unwrap_err().to_string();
    let deep = format!("passes: {}{}", "[".repeat(100), "]".repeat(100));
    assert!(
        refused(&deep).contains("nested more than 64 deep"),
        "{}",
        refused(&deep)
    );
    let indented = format!("passes:\n{}- x\n", " ".repeat(200));
    assert!(refused(&indented).contains("indented 200 columns"));
    let large = format!("name: {}\npasses: []\n", "x".repeat(MAX_RECIPE_BYTES));
    assert!(refused(&large).contains("over the limit"));
    let aliases = format!("passes: [{}]\n", vec!["*a"; 300].join(", "));
    assert!(refused(&aliases).contains("300 YAML aliases"));
    // Brackets in quotes, comments and regexes are not nesting; a real recipe passes.
    let fine = "passes:\n  - quantize: { bits: 4, granularity: group, group_size: 128 }\n    targets: ['re:.*layers\\.[0-9]+\\.mlp.*', \"[[[[\"]  # [[[[\n";
    Recipe::from_yaml(fine).unwrap();
}

#[test]
fn calibrated_methods_parse_into_the_pass_that_stores_them() {
    use crate::recipe::Calibrated;
    let r = Recipe::preset("gptq-w4a16-asym").unwrap();
    assert!(r.needs_calibration());
    assert_eq!(
        r.passes[0].calibrated,
        Some(Calibrated::Gptq {
            dampening: 0.01,
            act_order: false
        })
    );
    assert!(matches!(r.passes[0].kind, PassKind::Quantize(q) if !q.symmetric && q.bits == 4));
    assert_eq!(r.describe(), "gptq-w4a16-asym: gptq int4 asym g128");
    let yaml = "passes:\n  - quantize: { method: gptq, bits: 4, granularity: channel, act_order: true, dampening: 0.05 }\n    targets: ['re:.*']\n";
    let r = Recipe::from_yaml(yaml).unwrap();
    assert_eq!(
        r.passes[0].calibrated,
        Some(Calibrated::Gptq {
            dampening: 0.05,
            act_order: true
        })
    );
    let r = Recipe::preset("sparsegpt-2of4").unwrap();
    assert!(matches!(
        r.passes[0].kind,
        PassKind::Prune(PruneConfig::NOfM { n: 2, m: 4 })
    ));
    assert!(r.passes[0].calibrated.unwrap().prunes());
    let yaml = "passes:\n  - prune: { method: wanda, sparsity: 0.5 }\n    targets: ['re:.*']\n";
    let r = Recipe::from_yaml(yaml).unwrap();
    assert_eq!(r.passes[0].calibrated, Some(Calibrated::Wanda));
    assert!(!Recipe::preset("int4-g128").unwrap().needs_calibration());
    let bad = [
        (
            "quantize: { method: gptq, bits: 4, granularity: tensor }",
            "passes[0].quantize.granularity",
        ),
        (
            "quantize: { bits: 4, granularity: channel, act_order: true }",
            "passes[0].quantize.act_order",
        ),
        (
            "quantize: { method: awq, bits: 4, granularity: channel, dampening: 0.1 }",
            "passes[0].quantize.dampening",
        ),
        (
            "quantize: { method: gptq, bits: 4, granularity: channel, dampening: 0 }",
            "passes[0].quantize.dampening",
        ),
        (
            "prune: { method: sparsegpt, sparsity: 0.5, n: 2, m: 4 }",
            "passes[0].prune",
        ),
        (
            "prune: { method: wanda, n: 2, m: 4, dampening: 0.1 }",
            "passes[0].prune.dampening",
        ),
        (
            "prune: { method: sparsegpt, sparsity: 0.5, scope: global }",
            "passes[0].prune.scope",
        ),
    ];
    for (pass, field) in bad {
        let yaml = format!("passes:\n  - {pass}\n    targets: ['re:.*']\n");
        let err = Recipe::from_yaml(&yaml).unwrap_err().to_string();
        assert!(err.contains(field), "{pass}: {err}");
    }
}

#[test]
fn function_space_gates_are_validated() {
    let yaml = "passes:\n  - quantize: { bits: 8, granularity: channel }\n    targets: ['re:.*']\ngates: { min_embedding_cosine: 0.98, min_top1: 0.9, max_kld: 0.05 }\n";
    let r = Recipe::from_yaml(yaml).unwrap();
    assert!(r.has_function_gates());
    assert_eq!(r.gates.min_top1, Some(0.9));
    for bad in ["min_top1: 1.5", "max_kld: -1", "min_embedding_cosine: 2"] {
        let yaml = format!("passes:\n  - quantize: {{ bits: 8, granularity: channel }}\n    targets: ['re:.*']\ngates: {{ {bad} }}\n");
        assert!(Recipe::from_yaml(&yaml).is_err(), "{bad}");
    }
}

#[test]
fn mixed_precision_is_validated_and_its_choice_applies_per_tensor() {
    let base = Recipe::preset("gptq-w4a16-asym").unwrap();
    let yaml = Recipe::with_target_bpw(&base.source_yaml, 4.5).unwrap();
    let r = Recipe::from_yaml(&yaml).unwrap();
    let mixed = r.mixed_precision.clone().unwrap();
    assert_eq!(mixed.target_bpw, 4.5);
    assert!(r.needs_precision_choice());
    assert_eq!(
        r.describe(),
        "gptq-w4a16-asym: gptq int4 asym g128; widths mixed to 4.5 bits/weight"
    );
    assert_eq!(mixed.score, PrecisionScore::Outputs);
    let weights = yaml.replace("target_bpw: 4.5", "target_bpw: 4.5\n  score: weights");
    let weights = Recipe::from_yaml(&weights)
        .unwrap()
        .mixed_precision
        .unwrap();
    assert_eq!(weights.score, PrecisionScore::Weights);
    let bad = yaml.replace("target_bpw: 4.5", "target_bpw: 4.5\n  score: hessian");
    assert!(Recipe::from_yaml(&bad).is_err());
    assert_eq!(
        mixed.candidates_for(OutputFormat::CompressedTensors),
        vec![Width::bits(4), Width::bits(8)]
    );
    // The choice goes into the recipe and into every plan made from it.
    let name = "model.layers.0.mlp.down_proj.weight";
    let chosen = [(name.to_string(), Width::bits(8))].into_iter().collect();
    let resolved = r.with_chosen_widths(&chosen).unwrap();
    assert!(!resolved.needs_precision_choice());
    assert_eq!(resolved.name, "gptq-w4a16-asym");
    let width = |recipe: &Recipe, tensor: &str| {
        let plan = crate::codec::TensorPlan::for_tensor(
            recipe,
            tensor,
            crate::dtype::DType::BF16,
            &[8, 128],
        )
        .unwrap();
        match plan.values {
            Some(PassKind::Quantize(q)) => q.bits,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(width(&resolved, name), 8);
    assert_eq!(width(&resolved, "model.layers.0.mlp.up_proj.weight"), 4);
    assert_eq!(width(&r, name), 4);
    // The calibrated method stays.
    assert!(resolved.calibrated_for(name).is_some());

    let pass = "passes:\n  - quantize: { bits: 4, granularity: group, group_size: 64 }\n    targets: ['re:.*']\n";
    let bad = [
        (
            "mixed_precision: { target_bpw: 0 }",
            "mixed_precision.target_bpw",
        ),
        (
            "mixed_precision: { target_bpw: .nan }",
            "mixed_precision.target_bpw",
        ),
        (
            "mixed_precision: { target_bpw: 4.5, candidates: [] }",
            "mixed_precision.candidates",
        ),
        (
            "mixed_precision: { target_bpw: 4.5, candidates: [4, 9] }",
            "mixed_precision.candidates[1]",
        ),
        (
            "mixed_precision: { target_bpw: 4.5, candidates: [4, 4] }",
            "mixed_precision.candidates[1]",
        ),
        (
            "mixed_precision: { target_bpw: 4.5, chosen: { a: 1 } }",
            "mixed_precision.chosen",
        ),
        (
            "mixed_precision: { target_bpw: 4.5, budget: 3 }",
            "unknown field",
        ),
    ];
    for (section, field) in bad {
        let err = Recipe::from_yaml(&format!("{pass}{section}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{section}: {err}");
    }
    let prune_only = "passes:\n  - prune: { method: nm, n: 2, m: 4 }\n    targets: ['re:.*']\nmixed_precision: { target_bpw: 4 }\n";
    let err = Recipe::from_yaml(prune_only).unwrap_err().to_string();
    assert!(err.contains("needs a quantize pass"), "{err}");
    assert!(Recipe::with_target_bpw(pass, -1.0).is_err());
}

#[test]
fn mixed_precision_candidates_may_change_the_group_size() {
    let yaml = "passes:\n  - quantize: { bits: 4, granularity: group, group_size: 128 }\n    targets: ['re:.*']\nmixed_precision: { target_bpw: 4.5, candidates: [4, '4g32', 8c, 3g64] }\n";
    let r = Recipe::from_yaml(yaml).unwrap();
    let candidates = r
        .mixed_precision
        .as_ref()
        .unwrap()
        .candidates
        .clone()
        .unwrap();
    let written: Vec<String> = candidates.iter().map(|w| w.to_string()).collect();
    assert_eq!(written, ["4", "4g32", "8c", "3g64"]);
    let plan_of = |recipe: &Recipe| {
        let plan =
            crate::codec::TensorPlan::for_tensor(recipe, "w", crate::dtype::DType::BF16, &[8, 256])
                .unwrap();
        match plan.values {
            Some(PassKind::Quantize(q)) => (q.bits, q.granularity),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(plan_of(&r), (4, Granularity::Group(128)));
    for (width, expected) in [
        (candidates[1], (4, Granularity::Group(32))),
        (candidates[2], (8, Granularity::Channel)),
        (candidates[0], (4, Granularity::Group(128))),
    ] {
        let chosen = [("w".to_string(), width)].into_iter().collect();
        let resolved = r.with_chosen_widths(&chosen).unwrap();
        assert_eq!(
            resolved.mixed_precision.as_ref().unwrap().chosen["w"],
            width
        );
        assert_eq!(plan_of(&resolved), expected, "{width}");
    }
    let pass = "passes:\n  - quantize: { bits: 4, granularity: group, group_size: 64 }\n    targets: ['re:.*']\n";
    for (candidates, reason) in [
        ("[4, '4x']", "is not a width"),
        ("['g32']", "is not a width"),
        ("['4g0']", "group size 0"),
        ("['9g32']", "9 bits"),
        ("['4g32', 4g32]", "listed twice"),
        ("[4, '4g']", "is not a width"),
    ] {
        let section = format!("mixed_precision: {{ target_bpw: 4.5, candidates: {candidates} }}");
        let err = Recipe::from_yaml(&format!("{pass}{section}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mixed_precision.candidates") && err.contains(reason),
            "{candidates}: {err}"
        );
    }
}

#[test]
fn a_gguf_recipe_mixes_block_types() {
    let yaml =
        Recipe::with_target_bpw(&Recipe::preset("q4_k_m").unwrap().source_yaml, 5.0).unwrap();
    let r = Recipe::from_yaml(&yaml).unwrap();
    let mixed = r.mixed_precision.as_ref().unwrap();
    // Q4_K, Q5_K, Q6_K and Q8_0, whatever the output format.
    for format in [OutputFormat::Gguf, OutputFormat::Safetensors] {
        let widths: Vec<u8> = mixed
            .candidates_for(format)
            .iter()
            .map(|w| w.bits)
            .collect();
        assert_eq!(widths, GGUF_WIDTHS);
    }
    let PassKind::Ggml { file_type, .. } = r.passes[0].kind else {
        panic!("{:?}", r.passes[0].kind)
    };
    assert_eq!(
        Width::bits(6).apply(&r.passes[0].kind),
        Some(PassKind::Ggml {
            file_type,
            ty: Some(crate::gguf::GgmlType::Q6_K)
        })
    );
    for bad in ["[3, 4]", "['4g32', 5]", "[4, 8c]"] {
        let edited = format!(
            "passes:\n  - gguf: {{ type: q4_k_m }}\n    targets: ['re:.*']\nmixed_precision: {{ target_bpw: 5, candidates: {bad} }}\n"
        );
        let err = Recipe::from_yaml(&edited).unwrap_err().to_string();
        assert!(err.contains("not a width of a gguf pass"), "{bad}: {err}");
    }
}
