//! Llama-family decoders (llama, mistral, qwen2, qwen3): token embeddings, pre-RMSNorm blocks
//! with rotary grouped-query causal attention and a SwiGLU MLP, final norm and lm_head.
//!
//! As in Hugging Face transformers: rotary embeddings use the rotate_half convention with
//! `inv_freq = θ^(−2i/d)`, optionally scaled (`linear`, `llama3`); Qwen2 adds q/k/v biases; Qwen3 RMS-normalises each query and key
//! head before the rotation; Mistral (and Mixtral) may restrict attention to a sliding window.
//!
//! Mixture-of-experts members (mixtral, qwen2_moe, qwen3_moe) share everything but the MLP of
//! their sparse layers, which [`crate::moe`] runs; their dense layers (Qwen's
//! `mlp_only_layers` / `decoder_sparse_step`) are the plain SwiGLU MLP.

use crate::config::{LlamaConfig, MoeConfig};
use crate::matmul::linear;
use crate::moe;
use crate::ops::{self, fetch, fetch_vector, AttentionShape};
use crate::{Hidden, LinearGroup, Matrix, ModelError, Weights};

pub(crate) fn in_layer(config: &LlamaConfig, layer: usize, part: &str) -> String {
    format!("{}layers.{layer}.{part}", config.prefix)
}

fn embed_tokens(config: &LlamaConfig) -> String {
    format!("{}embed_tokens.weight", config.prefix)
}

pub fn embedding_tensors(config: &LlamaConfig) -> Vec<String> {
    vec![embed_tokens(config)]
}

pub fn head_tensors(config: &LlamaConfig) -> Vec<String> {
    // A tied head is the input embedding itself, named as such.
    vec![
        format!("{}norm.weight", config.prefix),
        config.lm_head.clone(),
    ]
}

/// The Linears of a block (name, group, whether it has a bias) in forward order.
fn linears(config: &LlamaConfig) -> [(&'static str, usize, bool); 7] {
    [
        ("self_attn.q_proj", 0, config.qkv_bias),
        ("self_attn.k_proj", 0, config.qkv_bias),
        ("self_attn.v_proj", 0, config.qkv_bias),
        ("self_attn.o_proj", 1, config.o_bias),
        ("mlp.gate_proj", 2, config.mlp_bias),
        ("mlp.up_proj", 2, config.mlp_bias),
        ("mlp.down_proj", 3, config.mlp_bias),
    ]
}

/// The mixture-of-experts settings when `layer`'s MLP is sparse; `None` for a dense MLP.
fn sparse_moe(config: &LlamaConfig, layer: usize) -> Option<&MoeConfig> {
    config.moe.as_ref().filter(|moe| moe.is_sparse(layer))
}

/// The groups of the dense block's Linears: 0 q/k/v, 1 o, 2 gate/up, 3 down.
const FIRST_MLP_GROUP: usize = 2;

pub fn layer_tensors(config: &LlamaConfig, layer: usize) -> Vec<String> {
    let mut names = vec![in_layer(config, layer, "input_layernorm.weight")];
    if config.qk_norm {
        names.push(in_layer(config, layer, "self_attn.q_norm.weight"));
        names.push(in_layer(config, layer, "self_attn.k_norm.weight"));
    }
    names.push(in_layer(config, layer, "post_attention_layernorm.weight"));
    let sparse = sparse_moe(config, layer);
    for (linear, group, bias) in linears(config) {
        if sparse.is_some() && group >= FIRST_MLP_GROUP {
            continue;
        }
        names.push(in_layer(config, layer, &format!("{linear}.weight")));
        if bias {
            names.push(in_layer(config, layer, &format!("{linear}.bias")));
        }
    }
    if let Some(moe) = sparse {
        names.extend(
            moe::layer_weights(moe)
                .iter()
                .map(|part| in_layer(config, layer, &format!("{part}.weight"))),
        );
    }
    names
}

/// The Linear groups of a layer in forward order. A sparse MoE layer has q/k/v and o, then
/// per expert its gate+up (input: the tokens routed to it) and down, then the shared
/// expert's two groups when there is one; its routers are not Linears to calibrate.
pub fn linear_groups(config: &LlamaConfig, layer: usize) -> Vec<LinearGroup> {
    let mut groups = dense_linear_groups(config, layer);
    if let Some(moe) = sparse_moe(config, layer) {
        groups.truncate(FIRST_MLP_GROUP);
        groups.extend(moe::linear_groups(moe, config.hidden_size).into_iter().map(
            |(parts, in_features)| {
                LinearGroup {
                    weights: parts
                        .iter()
                        .map(|part| in_layer(config, layer, &format!("{part}.weight")))
                        .collect(),
                    in_features,
                }
            },
        ));
    }
    groups
}

fn dense_linear_groups(config: &LlamaConfig, layer: usize) -> Vec<LinearGroup> {
    let attention_width = config.heads * config.head_dim;
    let in_features = [
        config.hidden_size,
        attention_width,
        config.hidden_size,
        config.intermediate_size,
    ];
    (0..4)
        .map(|group| LinearGroup {
            weights: linears(config)
                .iter()
                .filter(|(_, g, _)| *g == group)
                .map(|(linear, _, _)| in_layer(config, layer, &format!("{linear}.weight")))
                .collect(),
            in_features: in_features[group],
        })
        .collect()
}

pub fn embed(
    config: &LlamaConfig,
    weights: &Weights,
    sequences: &[Vec<u32>],
) -> Result<Hidden, ModelError> {
    let h = config.hidden_size;
    let table = fetch(weights, &embed_tokens(config), config.vocab_size, h)?;
    let mut out = Vec::with_capacity(sequences.len());
    for (index, ids) in sequences.iter().enumerate() {
        let mut data = Vec::with_capacity(ids.len() * h);
        for &id in ids {
            if id as usize >= config.vocab_size {
                return Err(ModelError::BadActivations(format!(
                    "token id {id} in sequence {index} is outside the vocabulary of {}",
                    config.vocab_size
                )));
            }
            data.extend_from_slice(table.row(id as usize));
        }
        out.push(Matrix {
            rows: ids.len(),
            cols: h,
            data,
        });
    }
    Ok(Hidden { sequences: out })
}

/// One Linear of the block, with its bias when the checkpoint has one.
pub(crate) fn project(
    config: &LlamaConfig,
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
    let has_bias = linears(config)
        .iter()
        .any(|(linear, _, bias)| *linear == name && *bias);
    let bias = if has_bias {
        Some(fetch_vector(
            weights,
            &in_layer(config, layer, &format!("{name}.bias")),
            outputs,
        )?)
    } else {
        None
    };
    Ok(linear(input, weight, bias))
}

/// A SwiGLU MLP `down(silu(gate(x)) · up(x))` over `input` (named by the layer-relative
/// gate, up and down Linears), reporting gate+up's input as group `first_group` and down's
/// input as group `first_group + 1` (0-row matrices when `input` has no rows).
#[allow(clippy::too_many_arguments)]
pub(crate) fn swiglu(
    config: &LlamaConfig,
    weights: &Weights,
    layer: usize,
    [gate_name, up_name, down_name]: [&str; 3],
    intermediate: usize,
    input: &Matrix,
    first_group: usize,
    observe: &mut dyn FnMut(usize, &Matrix),
) -> Result<Matrix, ModelError> {
    observe(first_group, input);
    let mut gate = project(config, weights, layer, gate_name, input, intermediate)?;
    let up = project(config, weights, layer, up_name, input, intermediate)?;
    ops::map_in_place(&mut gate, ops::silu);
    gate.data
        .iter_mut()
        .zip(&up.data)
        .for_each(|(g, u)| *g *= u);
    observe(first_group + 1, &gate);
    project(config, weights, layer, down_name, &gate, config.hidden_size)
}

/// A copy of `x` through the named RMSNorm (over `width`-wide chunks).
fn normed(
    config: &LlamaConfig,
    weights: &Weights,
    name: &str,
    x: &Matrix,
    width: usize,
) -> Result<Matrix, ModelError> {
    let weight = fetch_vector(weights, name, width)?;
    let mut out = x.clone();
    ops::rms_norm(&mut out, width, weight, config.rms_norm_eps);
    Ok(out)
}

/// The attention half of a block: returns the o_proj output (before the residual).
fn attention_block(
    config: &LlamaConfig,
    layer: usize,
    weights: &Weights,
    x: &Matrix,
    ranges: &[std::ops::Range<usize>],
    observe: &mut dyn FnMut(usize, &Matrix),
) -> Result<Matrix, ModelError> {
    let (d, h) = (config.head_dim, config.hidden_size);
    let input = normed(
        config,
        weights,
        &in_layer(config, layer, "input_layernorm.weight"),
        x,
        h,
    )?;
    observe(0, &input);
    let mut q = project(
        config,
        weights,
        layer,
        "self_attn.q_proj",
        &input,
        config.heads * d,
    )?;
    let mut k = project(
        config,
        weights,
        layer,
        "self_attn.k_proj",
        &input,
        config.kv_heads * d,
    )?;
    let v = project(
        config,
        weights,
        layer,
        "self_attn.v_proj",
        &input,
        config.kv_heads * d,
    )?;
    if config.qk_norm {
        q = normed(
            config,
            weights,
            &in_layer(config, layer, "self_attn.q_norm.weight"),
            &q,
            d,
        )?;
        k = normed(
            config,
            weights,
            &in_layer(config, layer, "self_attn.k_norm.weight"),
            &k,
            d,
        )?;
    }
    let inv_freq = config.inv_freq();
    ops::rope(&mut q, ranges, &inv_freq);
    ops::rope(&mut k, ranges, &inv_freq);
    let shape = AttentionShape {
        heads: config.heads,
        kv_heads: config.kv_heads,
        head_dim: d,
        causal: true,
        window: config.sliding_window,
    };
    let context = ops::attention(&q, &k, &v, ranges, shape);
    observe(1, &context);
    project(config, weights, layer, "self_attn.o_proj", &context, h)
}

pub fn forward_layer(
    config: &LlamaConfig,
    layer: usize,
    weights: &Weights,
    hidden: &mut Hidden,
    observe: &mut dyn FnMut(usize, &Matrix),
) -> Result<(), ModelError> {
    let h = config.hidden_size;
    let (mut x, ranges) = ops::stack(&hidden.sequences);
    let attended = attention_block(config, layer, weights, &x, &ranges, observe)?;
    x.data
        .iter_mut()
        .zip(&attended.data)
        .for_each(|(a, b)| *a += b);
    let input = normed(
        config,
        weights,
        &in_layer(config, layer, "post_attention_layernorm.weight"),
        &x,
        h,
    )?;
    let down = match sparse_moe(config, layer) {
        Some(moe) => moe::sparse_block(
            config,
            moe,
            layer,
            weights,
            &input,
            FIRST_MLP_GROUP,
            observe,
        )?,
        None => swiglu(
            config,
            weights,
            layer,
            ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
            config.intermediate_size,
            &input,
            FIRST_MLP_GROUP,
            observe,
        )?,
    };
    x.data.iter_mut().zip(&down.data).for_each(|(a, b)| *a += b);
    hidden.sequences = ops::unstack(&x, &ranges);
    Ok(())
}

/// Final RMSNorm then lm_head: logits for every position of every sequence.
pub fn finish(
    config: &LlamaConfig,
    weights: &Weights,
    hidden: &Hidden,
) -> Result<Vec<Matrix>, ModelError> {
    let norm = format!("{}norm.weight", config.prefix);
    let head = fetch(
        weights,
        &config.lm_head,
        config.vocab_size,
        config.hidden_size,
    )?;
    let (stacked, ranges) = ops::stack(&hidden.sequences);
    let input = normed(config, weights, &norm, &stacked, config.hidden_size)?;
    Ok(ops::unstack(&linear(&input, head, None), &ranges))
}
