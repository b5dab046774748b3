//! Mixture-of-experts tests: Mixtral / Qwen2-MoE / Qwen3-MoE configs, their tensors and
//! Linear groups, routing on a hand-built router, the rows each expert's groups observe, and
//! a sparse layer against a naive per-token computation.

use super::*;
use crate::config::{LlamaConfig, MoeConfig};
use crate::matmul::linear;
use crate::moe::route;
use crate::ops;

const EXPERTS: usize = 4;
const EXPERT_INTERMEDIATE: usize = 32;
const SHARED_INTERMEDIATE: usize = 48;

/// A 2-layer, 64-wide MoE decoder config of `model_type` with `extra` settings.
fn moe_config(model_type: &str, extra: &str) -> String {
    let (class, experts) = match model_type {
        "mixtral" => (
            "MixtralForCausalLM",
            format!(
                r#""num_local_experts": {EXPERTS}, "intermediate_size": {EXPERT_INTERMEDIATE}"#
            ),
        ),
        "qwen2_moe" => (
            "Qwen2MoeForCausalLM",
            format!(
                r#""num_experts": {EXPERTS}, "intermediate_size": 96,
                "moe_intermediate_size": {EXPERT_INTERMEDIATE},
                "shared_expert_intermediate_size": {SHARED_INTERMEDIATE}"#
            ),
        ),
        _ => (
            "Qwen3MoeForCausalLM",
            format!(
                r#""num_experts": {EXPERTS}, "intermediate_size": 96,
                "moe_intermediate_size": {EXPERT_INTERMEDIATE}"#
            ),
        ),
    };
    format!(
        r#"{{"architectures": ["{class}"], "model_type": "{model_type}", "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "vocab_size": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "num_experts_per_tok": 2, {experts}{extra}}}"#
    )
}

/// Every tensor name of a model whose layers have the given tensors.
fn names_of(model: &Model) -> Vec<String> {
    let mut names = model.embedding_tensors();
    names.extend((0..model.layers()).flat_map(|layer| model.layer_tensors(layer)));
    names.extend(model.head_tensors());
    names.sort();
    names.dedup();
    names
}

/// Parses `config` against the names it implies (what a complete checkpoint holds).
fn complete(config: &str, qkv_bias: bool) -> (Model, Vec<String>) {
    let mut names = llama_names(2, true);
    if qkv_bias {
        for layer in 0..2 {
            for p in ["q", "k", "v"] {
                names.push(format!("model.layers.{layer}.self_attn.{p}_proj.bias"));
            }
        }
    }
    // Parse once with a permissive name set to learn the tensors, then check them.
    let model = {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        Model {
            architecture: config::parse(config, &names).unwrap(),
        }
    };
    let all = names_of(&model);
    (build(config, &all).unwrap(), all)
}

fn moe_shape(name: &str) -> (usize, usize) {
    let parts: Vec<&str> = name.split('.').collect();
    let linear = parts[parts.len() - 2];
    let in_shared = name.contains("shared_expert.");
    let in_expert = name.contains(".experts.");
    match linear {
        "gate" => (EXPERTS, 64),
        "shared_expert_gate" => (1, 64),
        "w1" | "w3" => (EXPERT_INTERMEDIATE, 64),
        "w2" => (64, EXPERT_INTERMEDIATE),
        "gate_proj" | "up_proj" if in_expert => (EXPERT_INTERMEDIATE, 64),
        "down_proj" if in_expert => (64, EXPERT_INTERMEDIATE),
        "gate_proj" | "up_proj" if in_shared => (SHARED_INTERMEDIATE, 64),
        "down_proj" if in_shared => (64, SHARED_INTERMEDIATE),
        "q_norm" | "k_norm" => (1, 16),
        "q_proj" if parts.last() == Some(&"bias") => (1, 64),
        "k_proj" | "v_proj" if parts.last() == Some(&"bias") => (1, 32),
        _ => llama_shape(name),
    }
}

fn llama_of(model: &Model) -> &LlamaConfig {
    match model.config() {
        Architecture::Llama(config) => config,
        other => panic!("not a decoder: {other:?}"),
    }
}

fn moe_of(model: &Model) -> &MoeConfig {
    llama_of(model).moe.as_ref().expect("a mixture of experts")
}

#[test]
fn mixtral_config_lists_router_and_experts_and_groups_per_expert() {
    let (model, _) = complete(&moe_config("mixtral", ""), false);
    assert_eq!(
        (model.kind(), model.architecture()),
        (ModelKind::Decoder, "mixtral")
    );
    let moe = moe_of(&model);
    assert_eq!(
        (moe.experts, moe.top_k, moe.expert_intermediate_size),
        (EXPERTS, 2, EXPERT_INTERMEDIATE)
    );
    assert!(moe.normalize_top_k && moe.shared_expert_intermediate_size.is_none());
    let tensors = model.layer_tensors(1);
    assert!(tensors.contains(&"model.layers.1.block_sparse_moe.gate.weight".to_string()));
    assert!(tensors.contains(&"model.layers.1.block_sparse_moe.experts.3.w2.weight".to_string()));
    assert!(!tensors.iter().any(|t| t.contains("mlp.")), "{tensors:?}");
    // 4 norms-or-attention Linears + router + 3 per expert, plus the 2 norms.
    assert_eq!(tensors.len(), 2 + 4 + 1 + 3 * EXPERTS);
    let groups = model.linear_groups(1);
    assert_eq!(groups.len(), 2 + 2 * EXPERTS);
    assert_eq!(groups[0].weights.len(), 3);
    assert_eq!(
        groups[2].weights,
        [
            "model.layers.1.block_sparse_moe.experts.0.w1.weight",
            "model.layers.1.block_sparse_moe.experts.0.w3.weight"
        ]
    );
    assert_eq!(
        groups[9].weights,
        ["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    );
    assert_eq!((groups[8].in_features, groups[9].in_features), (64, 32));
    assert!(!groups
        .iter()
        .any(|g| g.weights.iter().any(|w| w.ends_with("moe.gate.weight"))));
    // A checkpoint missing one expert's weight is refused by name.
    let (_, names) = complete(&moe_config("mixtral", ""), false);
    let truncated: Vec<String> = names
        .into_iter()
        .filter(|n| n != "model.layers.1.block_sparse_moe.experts.2.w3.weight")
        .collect();
    assert_eq!(
        build(&moe_config("mixtral", ""), &truncated).unwrap_err(),
        ModelError::MissingTensor {
            name: "model.layers.1.block_sparse_moe.experts.2.w3.weight".into()
        }
    );
}

#[test]
fn qwen_moe_configs_have_shared_experts_dense_layers_and_their_own_settings() {
    let (qwen2, _) = complete(
        &moe_config("qwen2_moe", r#", "mlp_only_layers": [1]"#),
        true,
    );
    let moe = moe_of(&qwen2);
    assert_eq!(
        moe.shared_expert_intermediate_size,
        Some(SHARED_INTERMEDIATE)
    );
    assert!(!moe.normalize_top_k, "norm_topk_prob defaults to false");
    assert!(llama_of(&qwen2).qkv_bias);
    let groups = qwen2.linear_groups(0);
    assert_eq!(groups.len(), 2 + 2 * EXPERTS + 2);
    assert_eq!(
        groups[2 + 2 * EXPERTS].weights,
        [
            "model.layers.0.mlp.shared_expert.gate_proj.weight",
            "model.layers.0.mlp.shared_expert.up_proj.weight"
        ]
    );
    assert_eq!(groups[3 + 2 * EXPERTS].in_features, SHARED_INTERMEDIATE);
    let tensors = qwen2.layer_tensors(0);
    for router in ["mlp.gate.weight", "mlp.shared_expert_gate.weight"] {
        assert!(
            tensors.contains(&format!("model.layers.0.{router}")),
            "{router}"
        );
    }
    // mlp_only_layers: layer 1 is the dense block, with the dense groups and tensors.
    let dense = qwen2.linear_groups(1);
    assert_eq!(dense.len(), 4);
    assert_eq!(
        dense[2].weights,
        [
            "model.layers.1.mlp.gate_proj.weight",
            "model.layers.1.mlp.up_proj.weight"
        ]
    );
    assert_eq!(dense[3].in_features, 96);
    assert!(!qwen2.layer_tensors(1).iter().any(|t| t.contains("experts")));

    let (qwen3, _) = complete(
        &moe_config(
            "qwen3_moe",
            r#", "norm_topk_prob": true, "decoder_sparse_step": 2, "head_dim": 16"#,
        ),
        false,
    );
    let moe = moe_of(&qwen3);
    assert!(moe.normalize_top_k && moe.shared_expert_intermediate_size.is_none());
    assert!(llama_of(&qwen3).qk_norm);
    // decoder_sparse_step 2: layer 0 dense, layer 1 sparse.
    assert_eq!(qwen3.linear_groups(0).len(), 4);
    assert_eq!(qwen3.linear_groups(1).len(), 2 + 2 * EXPERTS);
    assert_eq!(
        qwen3.linear_groups(1)[3].weights,
        ["model.layers.1.mlp.experts.0.down_proj.weight"]
    );

    // Settings that cannot work are named.
    let too_many = moe_config("qwen3_moe", "")
        .replace(r#""num_experts_per_tok": 2"#, r#""num_experts_per_tok": 5"#);
    let error = config::parse(&too_many, &["model.embed_tokens.weight"]).unwrap_err();
    assert!(
        error.to_string().contains("exceeds the 4 experts"),
        "{error}"
    );
    let no_shared = moe_config("qwen2_moe", "").replace(
        &format!(r#""shared_expert_intermediate_size": {SHARED_INTERMEDIATE}"#),
        r#""shared_expert_intermediate_size": null"#,
    );
    let error = config::parse(&no_shared, &["model.embed_tokens.weight"]).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("shared_expert_intermediate_size"),
        "{error}"
    );
    let bad_list = moe_config("qwen2_moe", r#", "mlp_only_layers": [-1]"#);
    assert!(config::parse(&bad_list, &["model.embed_tokens.weight"]).is_err());
    // The architecture is found from the class alone, MoE before the dense prefix.
    let by_class = moe_config("qwen2_moe", "").replace(r#""model_type": "qwen2_moe","#, "");
    let parsed = config::parse(&by_class, &["model.embed_tokens.weight"]).unwrap();
    assert!(matches!(parsed, Architecture::Llama(ref c) if c.model_type == "qwen2_moe"));
}

/// Runs layer `layer` and returns (the observed calls in order, the hidden state after it,
/// the input of the sparse MLP recomputed from the observed attention context).
fn run_layer(
    model: &Model,
    weights: &Weights,
    hidden: &Hidden,
    layer: usize,
) -> (Vec<(usize, Matrix)>, Hidden, Matrix, Matrix) {
    let config = llama_of(model);
    let mut seen = Vec::new();
    let mut after = hidden.clone();
    model
        .forward_layer(layer, weights, &mut after, &mut |group, input| {
            seen.push((group, input.clone()))
        })
        .unwrap();
    // x + o_proj(context), then the post-attention RMSNorm: the MoE block's input.
    let p = |part: &str| format!("model.layers.{layer}.{part}");
    let context = &seen[1].1;
    let (mut residual, _) = ops::stack(&hidden.sequences);
    let attended = linear(context, &weights[&p("self_attn.o_proj.weight")], None);
    residual
        .data
        .iter_mut()
        .zip(&attended.data)
        .for_each(|(a, b)| *a += b);
    let mut input = residual.clone();
    ops::rms_norm(
        &mut input,
        64,
        &weights[&p("post_attention_layernorm.weight")].data,
        config.rms_norm_eps,
    );
    (seen, after, residual, input)
}

/// A SwiGLU MLP in f64, token by token: down(silu(gate x) · up x).
fn naive_swiglu(weights: &Weights, [gate, up, down]: [&str; 3], x: &[f32]) -> Vec<f64> {
    let dot = |w: &Matrix, row: usize, v: &[f64]| -> f64 {
        w.row(row)
            .iter()
            .zip(v)
            .map(|(&a, b)| f64::from(a) * b)
            .sum()
    };
    let x: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let (g, u, d) = (&weights[gate], &weights[up], &weights[down]);
    let inner: Vec<f64> = (0..g.rows)
        .map(|i| {
            let a = dot(g, i, &x);
            a / (1.0 + (-a).exp()) * dot(u, i, &x)
        })
        .collect();
    (0..d.rows).map(|o| dot(d, o, &inner)).collect()
}

#[test]
fn each_expert_observes_exactly_its_routed_rows_and_the_layer_matches_a_naive_sum() {
    let config = moe_config("qwen2_moe", "");
    let (model, names) = complete(&config, true);
    let weights = random_weights(&names, moe_shape);
    let hidden = model
        .embed(
            &weights,
            &[vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], vec![100, 7, 8]],
        )
        .unwrap();
    let (seen, after, residual, input) = run_layer(&model, &weights, &hidden, 0);
    let groups = model.linear_groups(0);
    assert_eq!(
        seen.iter().map(|(g, _)| *g).collect::<Vec<_>>(),
        (0..groups.len()).collect::<Vec<_>>(),
        "every group observed once, in order"
    );
    for ((group, matrix), expected) in seen.iter().zip(&groups) {
        assert_eq!(matrix.cols, expected.in_features, "group {group}");
    }
    let router = &weights["model.layers.0.mlp.gate.weight"];
    let routes = route(&linear(&input, router, None), 2, false);
    let mut total_routed = 0;
    for e in 0..EXPERTS {
        let tokens: Vec<usize> = (0..input.rows)
            .filter(|&t| routes[t].iter().any(|&(chosen, _)| chosen == e))
            .collect();
        total_routed += tokens.len();
        let observed = &seen[2 + 2 * e].1;
        let expected: Vec<f32> = tokens.iter().flat_map(|&t| input.row(t).to_vec()).collect();
        assert_eq!(observed.rows, tokens.len(), "expert {e}");
        assert_eq!(observed.data, expected, "expert {e}'s gate/up input");
        assert_eq!(
            (seen[3 + 2 * e].1.rows, seen[3 + 2 * e].1.cols),
            (tokens.len(), EXPERT_INTERMEDIATE)
        );
    }
    assert_eq!(total_routed, 2 * input.rows);
    assert_eq!(
        seen[2 + 2 * EXPERTS].1,
        input,
        "the shared expert sees every token"
    );
    // The layer's output, token by token in f64.
    let (out, _) = ops::stack(&after.sequences);
    let p = |part: String| format!("model.layers.0.{part}.weight");
    let gate = &weights["model.layers.0.mlp.shared_expert_gate.weight"];
    let mut worst = 0.0f64;
    for (t, chosen) in routes.iter().enumerate() {
        let mut want: Vec<f64> = residual.row(t).iter().map(|&v| f64::from(v)).collect();
        for &(e, weight) in chosen {
            let names =
                ["gate_proj", "up_proj", "down_proj"].map(|w| p(format!("mlp.experts.{e}.{w}")));
            let y = naive_swiglu(&weights, names.each_ref().map(String::as_str), input.row(t));
            want.iter_mut()
                .zip(y)
                .for_each(|(a, b)| *a += f64::from(weight) * b);
        }
        let names =
            ["gate_proj", "up_proj", "down_proj"].map(|w| p(format!("mlp.shared_expert.{w}")));
        let y = naive_swiglu(&weights, names.each_ref().map(String::as_str), input.row(t));
        let g: f64 = gate
            .row(0)
            .iter()
            .zip(input.row(t))
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum();
        let sigmoid = 1.0 / (1.0 + (-g).exp());
        want.iter_mut().zip(y).for_each(|(a, b)| *a += sigmoid * b);
        for (ours, reference) in out.row(t).iter().zip(&want) {
            worst = worst.max((f64::from(*ours) - reference).abs());
        }
    }
    assert!(worst < 1e-5, "max abs error {worst}");
    // A sequence's result does not depend on its batch (routing is per token).
    let alone = Hidden {
        sequences: vec![hidden.sequences[1].clone()],
    };
    let (_, alone_after, _, _) = run_layer(&model, &weights, &alone, 0);
    assert_eq!(alone_after.sequences[0], after.sequences[1]);
}

#[test]
fn an_expert_no_token_is_routed_to_observes_zero_rows_and_a_hand_built_router_decides() {
    // Mixtral, top-1: router rows +a·v, −a·v, 0, 0. Every token's logits are (s, −s, 0, 0)
    // with s = a·v·x, so it goes to expert 0 when s > 0 and to expert 1 when s < 0, with
    // weight 1, and experts 2 and 3 get nothing.
    let config = moe_config("mixtral", "")
        .replace(r#""num_experts_per_tok": 2"#, r#""num_experts_per_tok": 1"#);
    let (model, names) = complete(&config, false);
    let mut weights = random_weights(&names, moe_shape);
    let direction: Vec<f32> = (0..64)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0)
        .collect();
    let mut router = Vec::new();
    for sign in [4.0f32, -4.0, 0.0, 0.0] {
        router.extend(direction.iter().map(|v| sign * v));
    }
    weights.insert(
        "model.layers.0.block_sparse_moe.gate.weight".into(),
        Matrix::from_vec(EXPERTS, 64, router).unwrap(),
    );
    let hidden = model
        .embed(&weights, &[vec![10, 20, 30, 40, 50, 60, 70, 80, 90]])
        .unwrap();
    let (seen, after, residual, input) = run_layer(&model, &weights, &hidden, 0);
    assert_eq!(seen.len(), 2 + 2 * EXPERTS);
    let s: Vec<f64> = (0..input.rows)
        .map(|t| {
            input
                .row(t)
                .iter()
                .zip(&direction)
                .map(|(&x, &v)| f64::from(x) * f64::from(v))
                .sum()
        })
        .collect();
    let positive: Vec<usize> = (0..input.rows).filter(|&t| s[t] > 0.0).collect();
    let negative: Vec<usize> = (0..input.rows).filter(|&t| s[t] < 0.0).collect();
    assert!(
        !positive.is_empty() && !negative.is_empty(),
        "both experts should be used: {s:?}"
    );
    assert_eq!(positive.len() + negative.len(), input.rows);
    for (expert, tokens) in [(0, &positive), (1, &negative)] {
        let expected: Vec<f32> = tokens.iter().flat_map(|&t| input.row(t).to_vec()).collect();
        assert_eq!(seen[2 + 2 * expert].1.data, expected, "expert {expert}");
    }
    for expert in [2, 3] {
        for offset in [0, 1] {
            let (group, matrix) = &seen[2 + 2 * expert + offset];
            assert_eq!(*group, 2 + 2 * expert + offset);
            let width = if offset == 0 { 64 } else { EXPERT_INTERMEDIATE };
            assert_eq!(*matrix, Matrix::zeros(0, width), "expert {expert}");
        }
    }
    // With weight 1, a token's update is exactly its expert's output.
    let (out, _) = ops::stack(&after.sequences);
    let p = |e: usize, w: &str| format!("model.layers.0.block_sparse_moe.experts.{e}.{w}.weight");
    for (t, &score) in s.iter().enumerate() {
        let e = usize::from(score < 0.0);
        let names = ["w1", "w3", "w2"].map(|w| p(e, w));
        let y = naive_swiglu(&weights, names.each_ref().map(String::as_str), input.row(t));
        for ((ours, r), y) in out.row(t).iter().zip(residual.row(t)).zip(y) {
            assert!((f64::from(*ours) - f64::from(*r) - y).abs() < 1e-5);
        }
    }
    // The Hessian statistics the pipeline accumulates take the empty calls harmlessly.
    let mut accumulator = shardpress_core::calibrated::HessianAccumulator::new(64);
    accumulator.add_rows(&seen[6].1.data, 64).unwrap();
    assert_eq!(accumulator.rows_seen(), 0);
    // A router of the wrong shape is reported by name.
    weights.insert(
        "model.layers.0.block_sparse_moe.gate.weight".into(),
        Matrix::zeros(3, 64),
    );
    let mut h = hidden.clone();
    let error = model
        .forward_layer(0, &weights, &mut h, &mut |_, _| {})
        .unwrap_err();
    assert!(
        matches!(error, ModelError::BadShape { ref name, .. } if name == "model.layers.0.block_sparse_moe.gate.weight"),
        "{error}"
    );
}
