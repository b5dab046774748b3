//! shardpress-model: the pure layer forward engine that calibrated compression runs on.
//!
//! Calibration (GPTQ, Wanda, SparseGPT, AWQ) and function-space evaluation need a model's
//! activations, computed one transformer block at a time so that no machine ever holds more
//! than one layer. This crate provides exactly that, with no I/O and no async:
//!
//! - [`config`]: `config.json` plus the checkpoint's tensor names → a [`Model`] (architecture,
//!   shapes, tensor names of every part). Supported: `bert` encoders and the Llama family
//!   (`llama`, `mistral`, `qwen2`, `qwen3`) with its mixture-of-experts members (`mixtral`,
//!   `qwen2_moe`, `qwen3_moe`); other mixture-of-experts models are refused.
//! - [`Model`] ([`model`]): `embed` → `forward_layer` (one block, in place, reporting each
//!   Linear group's input to an observer) → `finish` (pooled embeddings or logits).
//!   The architectures live in [`bert`] and [`llama`] (its expert routing in [`moe`]), their
//!   shared kernels in [`ops`] and the matrix products (matrixmultiply, split over rayon) in
//!   [`matmul`].
//! - [`Hidden`] ([`hidden`]): the activations between layers and their byte format for the
//!   object store, validated as hostile input.
//! - [`Tokenizer`] ([`tokenizer`]): Hugging Face `tokenizers` with the model's special tokens.
//! - [`parse_samples`] ([`samples`]): calibration / evaluation text (plain lines or JSONL).
//! - [`eval`]: cosine, KL divergence, argmax and log-probabilities for the evaluation report.

pub mod bert;
pub mod config;
pub mod eval;
pub mod hidden;
pub mod llama;
pub mod matmul;
pub mod model;
pub mod moe;
pub mod ops;
pub mod samples;
pub mod tokenizer;

pub use hidden::Hidden;
pub use model::{Finished, LinearGroup, Model, ModelKind};
pub use samples::parse_samples;
pub use tokenizer::Tokenizer;

/// Everything that can go wrong in this crate; every message names the offending tensor,
/// setting, sequence or line.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ModelError {
    /// `model_type` / `architectures` of config.json name an architecture we do not run.
    #[error(
        "unknown model architecture `{found}`: supported are bert (BertModel, BertForMaskedLM), \
         llama, mistral, qwen2 and qwen3, and the mixture-of-experts mixtral, qwen2_moe and \
         qwen3_moe"
    )]
    UnknownArchitecture { found: String },
    /// config.json is malformed, lacks a setting, or asks for a feature we do not implement.
    #[error("config.json: {0}")]
    BadConfig(String),
    /// A tensor the forward pass needs is absent from the checkpoint or from the weights given.
    #[error("tensor `{name}` is missing from the checkpoint (or from the weights passed in)")]
    MissingTensor { name: String },
    /// A tensor has a shape other than the configuration implies.
    #[error("tensor `{name}` has shape {found}, the config implies {expected}")]
    BadShape {
        name: String,
        expected: String,
        found: String,
    },
    /// tokenizer.json could not be loaded or a text could not be encoded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Activations (token ids, hidden states or their serialized bytes) do not fit the model.
    #[error("activations: {0}")]
    BadActivations(String),
    /// Calibration / evaluation data is unusable.
    #[error("calibration data: {0}")]
    BadCalibration(String),
}

/// A dense row-major f32 matrix; a 1-D tensor is one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    /// A rows × cols matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Matrix {
        Matrix {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// Wraps `data` as rows × cols; refuses a length that does not match.
    pub fn from_vec(rows: usize, cols: usize, data: Vec<f32>) -> Result<Matrix, ModelError> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(ModelError::BadActivations(format!(
                "{} values cannot form a {rows} × {cols} matrix",
                data.len()
            )));
        }
        Ok(Matrix { rows, cols, data })
    }

    /// Row `index` as a slice.
    pub fn row(&self, index: usize) -> &[f32] {
        &self.data[index * self.cols..(index + 1) * self.cols]
    }
}

/// f32 weights by safetensors tensor name, shapes as stored (`[out, in]` for Linears).
pub type Weights = std::collections::HashMap<String, Matrix>;
