//! Model tests: config parsing (MiniLM, Llama, refused architectures and settings), tensor
//! lists and Linear groups, and forward-pass behaviour on small random decoders.

use super::*;

const MINILM_CONFIG: &str = include_str!("../../tests/data/minilm_config.json");

fn minilm_names() -> Vec<String> {
    let mut names: Vec<String> = [
        "word_embeddings.weight",
        "position_embeddings.weight",
        "token_type_embeddings.weight",
        "LayerNorm.weight",
        "LayerNorm.bias",
    ]
    .iter()
    .map(|part| format!("embeddings.{part}"))
    .collect();
    names.push("embeddings.position_ids".into());
    for layer in 0..6 {
        for linear in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
            "attention.output.LayerNorm",
            "output.LayerNorm",
        ] {
            for kind in ["weight", "bias"] {
                names.push(format!("encoder.layer.{layer}.{linear}.{kind}"));
            }
        }
    }
    names
}

fn llama_config(extra: &str) -> String {
    format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
        "num_hidden_layers": 2, "vocab_size": 128, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "hidden_act": "silu"{extra}}}"#
    )
}

fn llama_names(layers: usize, lm_head: bool) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    if lm_head {
        names.push("lm_head.weight".into());
    }
    for layer in 0..layers {
        for part in [
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            names.push(format!("model.layers.{layer}.{part}.weight"));
        }
    }
    names
}

fn build(config: &str, names: &[String]) -> Result<Model, ModelError> {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    Model::from_config(config, &names)
}

#[test]
fn minilm_config_is_a_six_layer_bert_encoder() {
    let model = build(MINILM_CONFIG, &minilm_names()).unwrap();
    assert_eq!(
        (model.kind(), model.architecture()),
        (ModelKind::Encoder, "bert")
    );
    assert_eq!((model.layers(), model.hidden_size()), (6, 384));
    assert!(model.head_tensors().is_empty());
    assert_eq!(model.layer_tensors(5).len(), 16);
    let groups = model.linear_groups(0);
    assert_eq!(groups.len(), 4);
    assert_eq!(
        groups[0].weights,
        [
            "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.0.attention.self.key.weight",
            "encoder.layer.0.attention.self.value.weight",
        ]
    );
    assert_eq!((groups[2].in_features, groups[3].in_features), (384, 1536));
    assert!(model.linear_groups(6).is_empty());
}

#[test]
fn a_masked_lm_checkpoint_resolves_the_bert_prefix() {
    let names: Vec<String> = minilm_names()
        .into_iter()
        .map(|n| format!("bert.{n}"))
        .collect();
    let model = build(MINILM_CONFIG, &names).unwrap();
    assert_eq!(
        model.embedding_tensors()[0],
        "bert.embeddings.word_embeddings.weight"
    );
}

#[test]
fn llama_config_gives_gqa_decoder_with_tied_or_separate_head() {
    let model = build(&llama_config(""), &llama_names(2, true)).unwrap();
    assert_eq!(
        (model.kind(), model.architecture(), model.layers()),
        (ModelKind::Decoder, "llama", 2)
    );
    assert_eq!(
        model.head_tensors(),
        ["model.norm.weight", "lm_head.weight"]
    );
    let groups = model.linear_groups(1);
    assert_eq!(
        groups[2].weights,
        [
            "model.layers.1.mlp.gate_proj.weight",
            "model.layers.1.mlp.up_proj.weight"
        ]
    );
    assert_eq!(groups[3].in_features, 96);
    let tied = build(&llama_config(""), &llama_names(2, false)).unwrap();
    assert_eq!(
        tied.head_tensors(),
        ["model.norm.weight", "model.embed_tokens.weight"]
    );
    let error = build(
        &llama_config(r#", "tie_word_embeddings": false"#),
        &llama_names(2, false),
    )
    .unwrap_err();
    assert_eq!(
        error,
        ModelError::MissingTensor {
            name: "lm_head.weight".into()
        }
    );
}

#[test]
fn a_missing_layer_tensor_is_named() {
    let error = build(&llama_config(""), &llama_names(1, true)).unwrap_err();
    assert!(
        matches!(error, ModelError::MissingTensor { ref name } if name.starts_with("model.layers.1.")),
        "{error}"
    );
    let qwen2 = llama_config("").replace("\"llama\"", "\"qwen2\"");
    let error = build(&qwen2, &llama_names(2, true)).unwrap_err();
    assert_eq!(
        error,
        ModelError::MissingTensor {
            name: "model.layers.0.self_attn.q_proj.bias".into()
        }
    );
}

#[test]
fn unknown_and_moe_architectures_and_unsupported_settings_are_refused() {
    let gpt2 = r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}"#;
    let error = build(gpt2, &[]).unwrap_err();
    assert_eq!(
        error,
        ModelError::UnknownArchitecture {
            found: "gpt2".into()
        }
    );
    assert!(error
        .to_string()
        .contains("llama, mistral, qwen2 and qwen3"));
    // mixtral / qwen2_moe / qwen3_moe run (tests/moe.rs); other MoE families stay refused.
    let deepseek =
        llama_config(r#", "n_routed_experts": 256"#).replace("\"llama\"", "\"deepseek_v3\"");
    let error = build(&deepseek, &llama_names(2, true))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`deepseek_v3` is a mixture-of-experts model")
            && error.contains("not supported yet")
            && error.contains("mixtral, qwen2_moe, qwen3_moe"),
        "{error}"
    );
    let olmoe = r#"{"model_type": "olmoe", "num_experts": 64}"#;
    assert!(build(olmoe, &[])
        .unwrap_err()
        .to_string()
        .contains("not supported yet"));
    let llama_with_experts = llama_config(r#", "num_local_experts": 8"#);
    assert!(build(&llama_with_experts, &llama_names(2, true))
        .unwrap_err()
        .to_string()
        .contains("mixture-of-experts"));
    let scaled = llama_config(r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#);
    let error = build(&scaled, &llama_names(2, true))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("rope_scaling of type `yarn` is not supported"),
        "{error}"
    );
    let incomplete = llama_config(r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#);
    let error = build(&incomplete, &llama_names(2, true))
        .unwrap_err()
        .to_string();
    assert!(error.contains("needs `low_freq_factor`"), "{error}");
    let error = build(
        &llama_config("").replace("\"hidden_size\": 64,", ""),
        &llama_names(2, true),
    )
    .unwrap_err();
    assert_eq!(
        error,
        ModelError::BadConfig("the setting `hidden_size` is missing".into())
    );
    assert!(matches!(
        build("not json", &[]),
        Err(ModelError::BadConfig(_))
    ));
    assert!(matches!(build("[1]", &[]), Err(ModelError::BadConfig(_))));
}

#[test]
fn embed_and_forward_refuse_bad_ids_and_shapes() {
    let model = build(&llama_config(""), &llama_names(2, true)).unwrap();
    let mut weights = Weights::new();
    weights.insert("model.embed_tokens.weight".into(), Matrix::zeros(128, 64));
    let error = model.embed(&weights, &[vec![1, 128]]).unwrap_err();
    assert!(
        error.to_string().contains("token id 128 in sequence 0"),
        "{error}"
    );
    assert!(model.embed(&weights, &[vec![]]).is_err());
    let mut hidden = Hidden {
        sequences: vec![Matrix::zeros(3, 63)],
    };
    let error = model
        .forward_layer(0, &weights, &mut hidden, &mut |_, _| {})
        .unwrap_err();
    assert!(error.to_string().contains("hidden_size"), "{error}");
    let mut hidden = model.embed(&weights, &[vec![1, 2]]).unwrap();
    let error = model
        .forward_layer(0, &weights, &mut hidden, &mut |_, _| {})
        .unwrap_err();
    assert_eq!(
        error,
        ModelError::MissingTensor {
            name: "model.layers.0.input_layernorm.weight".into()
        }
    );
    assert!(model
        .forward_layer(2, &weights, &mut hidden, &mut |_, _| {})
        .is_err());
}

/// Random weights for the named tensors, shaped by `shape`.
fn random_weights(names: &[String], shape: impl Fn(&str) -> (usize, usize)) -> Weights {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    names
        .iter()
        .map(|name| {
            let (rows, cols) = shape(name);
            let data = (0..rows * cols)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % 2001) as f32 / 4000.0 - 0.25
                        + if name.contains("norm") { 1.0 } else { 0.0 }
                })
                .collect();
            (name.clone(), Matrix { rows, cols, data })
        })
        .collect()
}

fn llama_shape(name: &str) -> (usize, usize) {
    match name.rsplit('.').nth(1).unwrap_or("") {
        "embed_tokens" | "lm_head" => (128, 64),
        "q_proj" => (64, 64),
        "k_proj" | "v_proj" => (32, 64),
        "o_proj" => (64, 64),
        "gate_proj" | "up_proj" => (96, 64),
        "down_proj" => (64, 96),
        _ => (1, 64),
    }
}

#[test]
fn observe_sees_every_group_input_and_sequences_do_not_interact() {
    let names = llama_names(2, true);
    let model = build(&llama_config(""), &names).unwrap();
    let weights = random_weights(&names, llama_shape);
    let a: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
    let b: Vec<u32> = vec![100, 7];
    let mut batch = model.embed(&weights, &[a.clone(), b]).unwrap();
    let mut alone = model.embed(&weights, &[a]).unwrap();
    let groups = model.linear_groups(0);
    let mut seen = Vec::new();
    model
        .forward_layer(0, &weights, &mut batch, &mut |group, input| {
            seen.push((group, input.rows, input.cols))
        })
        .unwrap();
    let expected: Vec<_> = groups
        .iter()
        .enumerate()
        .map(|(g, group)| (g, 10, group.in_features))
        .collect();
    assert_eq!(seen, expected);
    model
        .forward_layer(0, &weights, &mut alone, &mut |_, _| {})
        .unwrap();
    assert_eq!(
        batch.sequences[0], alone.sequences[0],
        "a sequence's result depends on its batch"
    );
    assert_ne!(
        batch.sequences[0].data,
        model
            .embed(&weights, &[vec![3, 1, 4, 1, 5, 9, 2, 6]])
            .unwrap()
            .sequences[0]
            .data
    );
    // Causality: the first token's state does not depend on what follows it.
    let mut prefix = model.embed(&weights, &[vec![3]]).unwrap();
    model
        .forward_layer(0, &weights, &mut prefix, &mut |_, _| {})
        .unwrap();
    assert_eq!(prefix.sequences[0].row(0), alone.sequences[0].row(0));
    let Finished::Logits(logits) = model.finish(&weights, &batch).unwrap() else {
        panic!("a decoder finishes with logits")
    };
    assert_eq!((logits[1].rows, logits[1].cols), (2, 128));
    let mut empty = Hidden { sequences: vec![] };
    let mut no_call = |_: usize, _: &Matrix| panic!("nothing to observe");
    model
        .forward_layer(1, &weights, &mut empty, &mut no_call)
        .unwrap();
    assert_eq!(
        model.finish(&weights, &empty).unwrap(),
        Finished::Logits(vec![])
    );
}

#[test]
fn a_weight_of_the_wrong_shape_is_reported_by_name() {
    let names = llama_names(2, true);
    let model = build(&llama_config(""), &names).unwrap();
    let mut weights = random_weights(&names, llama_shape);
    weights.insert(
        "model.layers.0.mlp.up_proj.weight".into(),
        Matrix::zeros(64, 96),
    );
    let mut hidden = model.embed(&weights, &[vec![1, 2, 3]]).unwrap();
    let error = model
        .forward_layer(0, &weights, &mut hidden, &mut |_, _| {})
        .unwrap_err();
    assert_eq!(
        error,
        ModelError::BadShape {
            name: "model.layers.0.mlp.up_proj.weight".into(),
            expected: "[96, 64]".into(),
            found: "[64, 96] (6144 values)".into()
        }
    );
}

mod moe;
