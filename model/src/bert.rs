//! BERT-family encoders (MiniLM is one): word + absolute position + token-type-0 embeddings,
//! post-LayerNorm blocks with bidirectional attention and GELU, mean pooling at the end.
//!
//! Tensor names follow Hugging Face's `BertModel` (`embeddings.…`, `encoder.layer.N.…`), with
//! the checkpoint's prefix (`bert.` for `BertForMaskedLM`) in front.

use crate::config::{BertConfig, Gelu};
use crate::matmul::linear;
use crate::ops::{self, fetch, fetch_vector, AttentionShape};
use crate::{Hidden, LinearGroup, Matrix, ModelError, Weights};

fn embedding(config: &BertConfig, part: &str) -> String {
    format!("{}embeddings.{part}", config.prefix)
}

fn in_layer(config: &BertConfig, layer: usize, part: &str) -> String {
    format!("{}encoder.layer.{layer}.{part}", config.prefix)
}

pub fn embedding_tensors(config: &BertConfig) -> Vec<String> {
    [
        "word_embeddings.weight",
        "position_embeddings.weight",
        "token_type_embeddings.weight",
        "LayerNorm.weight",
        "LayerNorm.bias",
    ]
    .iter()
    .map(|part| embedding(config, part))
    .collect()
}

/// The Linears of a block, in forward order, with their groups.
const LINEARS: [(&str, usize); 6] = [
    ("attention.self.query", 0),
    ("attention.self.key", 0),
    ("attention.self.value", 0),
    ("attention.output.dense", 1),
    ("intermediate.dense", 2),
    ("output.dense", 3),
];

pub fn layer_tensors(config: &BertConfig, layer: usize) -> Vec<String> {
    let mut names = Vec::new();
    for (linear, _) in LINEARS {
        names.push(in_layer(config, layer, &format!("{linear}.weight")));
        names.push(in_layer(config, layer, &format!("{linear}.bias")));
    }
    for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
        names.push(in_layer(config, layer, &format!("{norm}.weight")));
        names.push(in_layer(config, layer, &format!("{norm}.bias")));
    }
    names
}

pub fn linear_groups(config: &BertConfig, layer: usize) -> Vec<LinearGroup> {
    let in_features = [
        config.hidden_size,
        config.hidden_size,
        config.hidden_size,
        config.intermediate_size,
    ];
    (0..4)
        .map(|group| LinearGroup {
            weights: LINEARS
                .iter()
                .filter(|(_, g)| *g == group)
                .map(|(linear, _)| in_layer(config, layer, &format!("{linear}.weight")))
                .collect(),
            in_features: in_features[group],
        })
        .collect()
}

pub fn embed(
    config: &BertConfig,
    weights: &Weights,
    sequences: &[Vec<u32>],
) -> Result<Hidden, ModelError> {
    let h = config.hidden_size;
    let words = fetch(
        weights,
        &embedding(config, "word_embeddings.weight"),
        config.vocab_size,
        h,
    )?;
    let positions = fetch(
        weights,
        &embedding(config, "position_embeddings.weight"),
        config.max_positions,
        h,
    )?;
    let types = fetch(
        weights,
        &embedding(config, "token_type_embeddings.weight"),
        config.type_vocab_size,
        h,
    )?;
    let norm_weight = fetch_vector(weights, &embedding(config, "LayerNorm.weight"), h)?;
    let norm_bias = fetch_vector(weights, &embedding(config, "LayerNorm.bias"), h)?;
    let mut out = Vec::with_capacity(sequences.len());
    for (index, ids) in sequences.iter().enumerate() {
        if ids.len() > config.max_positions {
            return Err(ModelError::BadActivations(format!(
                "sequence {index} has {} tokens, more than max_position_embeddings {}",
                ids.len(),
                config.max_positions
            )));
        }
        let mut matrix = Matrix::zeros(ids.len(), h);
        for (position, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= config.vocab_size {
                return Err(ModelError::BadActivations(format!(
                    "token id {id} in sequence {index} is outside the vocabulary of {}",
                    config.vocab_size
                )));
            }
            let row = &mut matrix.data[position * h..(position + 1) * h];
            for (j, value) in row.iter_mut().enumerate() {
                *value = words.row(id)[j] + types.row(0)[j] + positions.row(position)[j];
            }
        }
        ops::layer_norm(&mut matrix, norm_weight, norm_bias, config.layer_norm_eps);
        out.push(matrix);
    }
    Ok(Hidden { sequences: out })
}

/// One Linear of the block: its checked weight and bias applied to `input`.
fn dense(
    config: &BertConfig,
    weights: &Weights,
    layer: usize,
    name: &str,
    input: &Matrix,
    outputs: usize,
) -> Result<Matrix, ModelError> {
    let weight = fetch(
        weights,
        &in_layer(config, layer, &format!("{name}.weight")),
        outputs,
        input.cols,
    )?;
    let bias = fetch_vector(
        weights,
        &in_layer(config, layer, &format!("{name}.bias")),
        outputs,
    )?;
    Ok(linear(input, weight, Some(bias)))
}

/// `x ← LayerNorm(x + residual)` with the named norm.
fn add_norm(
    config: &BertConfig,
    weights: &Weights,
    layer: usize,
    name: &str,
    x: &mut Matrix,
    residual: &Matrix,
) -> Result<(), ModelError> {
    let h = config.hidden_size;
    let weight = fetch_vector(
        weights,
        &in_layer(config, layer, &format!("{name}.weight")),
        h,
    )?;
    let bias = fetch_vector(
        weights,
        &in_layer(config, layer, &format!("{name}.bias")),
        h,
    )?;
    x.data
        .iter_mut()
        .zip(&residual.data)
        .for_each(|(a, b)| *a += b);
    ops::layer_norm(x, weight, bias, config.layer_norm_eps);
    Ok(())
}

pub fn forward_layer(
    config: &BertConfig,
    layer: usize,
    weights: &Weights,
    hidden: &mut Hidden,
    observe: &mut dyn FnMut(usize, &Matrix),
) -> Result<(), ModelError> {
    let h = config.hidden_size;
    let (x, ranges) = ops::stack(&hidden.sequences);
    observe(0, &x);
    let q = dense(config, weights, layer, "attention.self.query", &x, h)?;
    let k = dense(config, weights, layer, "attention.self.key", &x, h)?;
    let v = dense(config, weights, layer, "attention.self.value", &x, h)?;
    let shape = AttentionShape {
        heads: config.heads,
        kv_heads: config.heads,
        head_dim: h / config.heads,
        causal: false,
        window: None,
    };
    let context = ops::attention(&q, &k, &v, &ranges, shape);
    observe(1, &context);
    let mut attended = dense(
        config,
        weights,
        layer,
        "attention.output.dense",
        &context,
        h,
    )?;
    add_norm(
        config,
        weights,
        layer,
        "attention.output.LayerNorm",
        &mut attended,
        &x,
    )?;
    observe(2, &attended);
    let mut intermediate = dense(
        config,
        weights,
        layer,
        "intermediate.dense",
        &attended,
        config.intermediate_size,
    )?;
    match config.gelu {
        Gelu::Erf => ops::map_in_place(&mut intermediate, ops::gelu_erf),
        Gelu::Tanh => ops::map_in_place(&mut intermediate, ops::gelu_tanh),
    }
    observe(3, &intermediate);
    let mut output = dense(config, weights, layer, "output.dense", &intermediate, h)?;
    add_norm(
        config,
        weights,
        layer,
        "output.LayerNorm",
        &mut output,
        &attended,
    )?;
    hidden.sequences = ops::unstack(&output, &ranges);
    Ok(())
}

/// sentence-transformers' Pooling(mean) + Normalize: the mean over tokens, divided by its
/// L2 norm (at least 1e-12, as torch's `F.normalize`).
pub fn mean_pool_normalize(hidden: &Hidden) -> Vec<Vec<f32>> {
    hidden
        .sequences
        .iter()
        .map(|sequence| {
            let mut mean = vec![0.0f64; sequence.cols];
            for row in sequence.data.chunks(sequence.cols.max(1)) {
                mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64);
            }
            mean.iter_mut()
                .for_each(|m| *m /= sequence.rows.max(1) as f64);
            let norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt().max(1e-12);
            mean.iter().map(|m| (m / norm) as f32).collect()
        })
        .collect()
}
