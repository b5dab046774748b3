//! [`Model`]: one supported architecture behind one interface — the tensors each stage reads,
//! the Linear groups calibration observes, and embed → forward_layer → finish.
//!
//! A calibration worker holds one layer's weights at a time: it asks `layer_tensors(k)`,
//! range-reads those, and runs `forward_layer(k)` over its batch of [`Hidden`] states while
//! `observe` accumulates each Linear group's input statistics.

use std::collections::HashSet;

use crate::config::{self, Architecture};
use crate::{bert, llama, Hidden, Matrix, ModelError, Weights};

/// Encoders pool an embedding per sequence; decoders predict the next token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Encoder,
    Decoder,
}

/// Linears (full names of their `.weight` tensors) that read the same input, e.g. q/k/v.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearGroup {
    pub weights: Vec<String>,
    pub in_features: usize,
}

/// What [`Model::finish`] produces.
#[derive(Debug, Clone, PartialEq)]
pub enum Finished {
    /// Encoders: one mean-pooled, L2-normalised embedding per sequence.
    Embeddings(Vec<Vec<f32>>),
    /// Decoders: next-token logits per sequence (tokens × vocab).
    Logits(Vec<Matrix>),
}

/// A supported model, described by its config.json and tensor names.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    architecture: Architecture,
}

impl Model {
    /// config.json text plus every tensor name of the checkpoint (to resolve name prefixes
    /// such as "bert."/"model." and tied embeddings). Every tensor the forward pass will read
    /// is checked to be among `tensor_names`, so a truncated checkpoint is refused here.
    pub fn from_config(config_json: &str, tensor_names: &[&str]) -> Result<Model, ModelError> {
        let model = Model {
            architecture: config::parse(config_json, tensor_names)?,
        };
        let present: HashSet<&str> = tensor_names.iter().copied().collect();
        let needed = model
            .embedding_tensors()
            .into_iter()
            .chain((0..model.layers()).flat_map(|layer| model.layer_tensors(layer)))
            .chain(model.head_tensors());
        for name in needed {
            if !present.contains(name.as_str()) {
                return Err(ModelError::MissingTensor { name });
            }
        }
        Ok(model)
    }

    /// The parsed configuration.
    pub fn config(&self) -> &Architecture {
        &self.architecture
    }

    pub fn kind(&self) -> ModelKind {
        match self.architecture {
            Architecture::Bert(_) => ModelKind::Encoder,
            Architecture::Llama(_) => ModelKind::Decoder,
        }
    }

    /// `bert`, `llama`, `mistral`, `qwen2` or `qwen3`.
    pub fn architecture(&self) -> &str {
        match &self.architecture {
            Architecture::Bert(_) => "bert",
            Architecture::Llama(config) => &config.model_type,
        }
    }

    pub fn layers(&self) -> usize {
        match &self.architecture {
            Architecture::Bert(config) => config.layers,
            Architecture::Llama(config) => config.layers,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match &self.architecture {
            Architecture::Bert(config) => config.hidden_size,
            Architecture::Llama(config) => config.hidden_size,
        }
    }

    /// What `embed` reads.
    pub fn embedding_tensors(&self) -> Vec<String> {
        match &self.architecture {
            Architecture::Bert(config) => bert::embedding_tensors(config),
            Architecture::Llama(config) => llama::embedding_tensors(config),
        }
    }

    /// Everything `forward_layer(layer)` reads (weights, biases, norms); empty past the last.
    pub fn layer_tensors(&self, layer: usize) -> Vec<String> {
        if layer >= self.layers() {
            return Vec::new();
        }
        match &self.architecture {
            Architecture::Bert(config) => bert::layer_tensors(config, layer),
            Architecture::Llama(config) => llama::layer_tensors(config, layer),
        }
    }

    /// What `finish` reads: the final norm and lm_head (or the tied embedding); empty for
    /// BERT's mean pooling.
    pub fn head_tensors(&self) -> Vec<String> {
        match &self.architecture {
            Architecture::Bert(_) => Vec::new(),
            Architecture::Llama(config) => llama::head_tensors(config),
        }
    }

    /// The Linear groups of `layer` in forward order (group index = position here); empty
    /// past the last layer.
    pub fn linear_groups(&self, layer: usize) -> Vec<LinearGroup> {
        if layer >= self.layers() {
            return Vec::new();
        }
        match &self.architecture {
            Architecture::Bert(config) => bert::linear_groups(config, layer),
            Architecture::Llama(config) => llama::linear_groups(config, layer),
        }
    }

    /// Token ids → the input of layer 0, one matrix per sequence.
    pub fn embed(&self, weights: &Weights, sequences: &[Vec<u32>]) -> Result<Hidden, ModelError> {
        for (index, ids) in sequences.iter().enumerate() {
            if ids.is_empty() {
                return Err(ModelError::BadActivations(format!(
                    "sequence {index} has no tokens"
                )));
            }
        }
        match &self.architecture {
            Architecture::Bert(config) => bert::embed(config, weights, sequences),
            Architecture::Llama(config) => llama::embed(config, weights, sequences),
        }
    }

    /// Runs layer `layer` in place over every sequence; calls `observe(group_index, input)`
    /// with each LinearGroup's input rows before the group's matmul. The rows of all
    /// sequences are stacked in order (Σ tokens × in_features), one call per group.
    pub fn forward_layer(
        &self,
        layer: usize,
        weights: &Weights,
        hidden: &mut Hidden,
        observe: &mut dyn FnMut(usize, &Matrix),
    ) -> Result<(), ModelError> {
        if layer >= self.layers() {
            return Err(ModelError::BadActivations(format!(
                "layer {layer} does not exist: the model has {} layers",
                self.layers()
            )));
        }
        self.check_hidden(hidden)?;
        match &self.architecture {
            Architecture::Bert(config) => {
                bert::forward_layer(config, layer, weights, hidden, observe)
            }
            Architecture::Llama(config) => {
                llama::forward_layer(config, layer, weights, hidden, observe)
            }
        }
    }

    /// Encoder: one mean-pooled, L2-normalised embedding per sequence (sentence-transformers'
    /// Pooling(mean) + Normalize, as all-MiniLM-L6-v2 does). Decoder: next-token logits per
    /// sequence (tokens × vocab) after the final norm and lm_head.
    pub fn finish(&self, weights: &Weights, hidden: &Hidden) -> Result<Finished, ModelError> {
        self.check_hidden(hidden)?;
        match &self.architecture {
            Architecture::Bert(_) => Ok(Finished::Embeddings(bert::mean_pool_normalize(hidden))),
            Architecture::Llama(config) => {
                llama::finish(config, weights, hidden).map(Finished::Logits)
            }
        }
    }

    /// Every sequence must be non-empty, hidden_size wide and consistent.
    fn check_hidden(&self, hidden: &Hidden) -> Result<(), ModelError> {
        for (index, sequence) in hidden.sequences.iter().enumerate() {
            if sequence.cols != self.hidden_size()
                || sequence.rows == 0
                || Some(sequence.data.len()) != sequence.rows.checked_mul(sequence.cols)
            {
                return Err(ModelError::BadActivations(format!(
                    "sequence {index} is {} × {} with {} values; expected tokens × {} (hidden_size)",
                    sequence.rows,
                    sequence.cols,
                    sequence.data.len(),
                    self.hidden_size()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINILM_CONFIG: &str = include_str!("../tests/data/minilm_config.json");

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
        let mixtral =
            llama_config(r#", "num_local_experts": 8"#).replace("\"llama\"", "\"mixtral\"");
        let error = build(&mixtral, &llama_names(2, true))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("mixture-of-experts") && error.contains("not supported yet"),
            "{error}"
        );
        let qwen_moe = r#"{"model_type": "qwen3_moe", "num_experts": 128}"#;
        assert!(build(qwen_moe, &[])
            .unwrap_err()
            .to_string()
            .contains("not supported yet"));
        let scaled = llama_config(r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#);
        let error = build(&scaled, &llama_names(2, true))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("rope_scaling of type `yarn` is not supported"),
            "{error}"
        );
        let incomplete =
            llama_config(r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#);
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
}
