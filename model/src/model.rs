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

    /// `bert`, `llama`, `mistral`, `qwen2`, `qwen3`, `mixtral`, `qwen2_moe` or `qwen3_moe`.
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
    /// sequences are stacked in order (Σ tokens × in_features), one call per group. An
    /// expert's groups of a mixture-of-experts layer get only the rows of the tokens routed to
    /// it, in token order (a 0-row matrix when none is). An empty batch is left as it is,
    /// with no call.
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
        if hidden.sequences.is_empty() {
            return Ok(());
        }
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
        if hidden.sequences.is_empty() {
            return Ok(match self.kind() {
                ModelKind::Encoder => Finished::Embeddings(Vec::new()),
                ModelKind::Decoder => Finished::Logits(Vec::new()),
            });
        }
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
mod tests;
