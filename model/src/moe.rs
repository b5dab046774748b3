//! The sparse mixture-of-experts MLP of Mixtral, Qwen2-MoE and Qwen3-MoE layers.
//!
//! As transformers' `MixtralSparseMoeBlock` / `Qwen2MoeSparseMoeBlock` /
//! `Qwen3MoeSparseMoeBlock` in inference: the router (a bias-free Linear, `experts × hidden`)
//! gives each token one logit per expert; a softmax over *all* experts turns them into
//! probabilities; the `top_k` most probable experts are chosen ([`route`]); their
//! probabilities are renormalised to sum to 1 when the model says so (always for Mixtral,
//! `norm_topk_prob` for Qwen) and otherwise used as they are. Each expert is a SwiGLU MLP
//! run over the tokens routed to it only, its output scaled by the token's weight for it and
//! added up in expert order. Qwen2-MoE then adds its shared expert (a SwiGLU MLP over every
//! token) times `sigmoid(shared_expert_gate(x))`.
//!
//! Everything is computed in f32 with the softmax in f64; ties between equal probabilities
//! go to the lower expert index. The routers are plain weights, not calibrated Linears: the
//! Linear groups of a sparse layer are each expert's gate+up and down (observed with the
//! rows of the tokens routed to it, a 0-row matrix when none is) and the shared expert's.

use crate::config::{LlamaConfig, MoeConfig, MoeNaming};
use crate::llama::{in_layer, swiglu};
use crate::matmul::linear;
use crate::ops::fetch;
use crate::{Matrix, ModelError, Weights};

/// The layer-relative name of the router Linear (without `.weight`).
fn router(moe: &MoeConfig) -> &'static str {
    match moe.naming {
        MoeNaming::Mixtral => "block_sparse_moe.gate",
        MoeNaming::Qwen => "mlp.gate",
    }
}

/// Qwen2-MoE's sigmoid gate of the shared expert (a `1 × hidden` Linear).
const SHARED_EXPERT_GATE: &str = "mlp.shared_expert_gate";

/// Expert `e`'s gate, up and down Linears (layer-relative, without `.weight`).
fn expert(moe: &MoeConfig, e: usize) -> [String; 3] {
    match moe.naming {
        MoeNaming::Mixtral => {
            ["w1", "w3", "w2"].map(|w| format!("block_sparse_moe.experts.{e}.{w}"))
        }
        MoeNaming::Qwen => {
            ["gate_proj", "up_proj", "down_proj"].map(|w| format!("mlp.experts.{e}.{w}"))
        }
    }
}

/// The shared expert's gate, up and down Linears.
fn shared_expert() -> [String; 3] {
    ["gate_proj", "up_proj", "down_proj"].map(|w| format!("mlp.shared_expert.{w}"))
}

/// Every weight a sparse layer's MLP reads (layer-relative, without `.weight`): the router,
/// each expert's gate, up and down, then the shared expert's and its gate.
pub(crate) fn layer_weights(moe: &MoeConfig) -> Vec<String> {
    let mut names = vec![router(moe).to_string()];
    for e in 0..moe.experts {
        names.extend(expert(moe, e));
    }
    if moe.shared_expert_intermediate_size.is_some() {
        names.extend(shared_expert());
        names.push(SHARED_EXPERT_GATE.to_string());
    }
    names
}

/// The Linear groups of a sparse layer's MLP in forward order (layer-relative names, input
/// width): per expert [gate, up] then [down], then the shared expert's.
pub(crate) fn linear_groups(moe: &MoeConfig, hidden_size: usize) -> Vec<(Vec<String>, usize)> {
    let mut groups = Vec::new();
    let mut push = |[gate, up, down]: [String; 3], intermediate: usize| {
        groups.push((vec![gate, up], hidden_size));
        groups.push((vec![down], intermediate));
    };
    for e in 0..moe.experts {
        push(expert(moe, e), moe.expert_intermediate_size);
    }
    if let Some(intermediate) = moe.shared_expert_intermediate_size {
        push(shared_expert(), intermediate);
    }
    groups
}

/// Routes every token (row of `router_logits`, tokens × experts): softmax over all experts,
/// the `top_k` most probable (descending probability; equal probabilities: the lower expert
/// first), their probabilities divided by their sum when `normalize`. Returns per token the
/// chosen `(expert, weight)` pairs. `top_k` larger than the expert count chooses them all.
pub fn route(router_logits: &Matrix, top_k: usize, normalize: bool) -> Vec<Vec<(usize, f32)>> {
    let experts = router_logits.cols;
    (0..router_logits.rows)
        .map(|token| {
            let logits = router_logits.row(token);
            let max = logits
                .iter()
                .map(|&l| f64::from(l))
                .fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = logits.iter().map(|&l| (f64::from(l) - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]).then(a.cmp(&b)));
            order.truncate(top_k);
            let chosen: f64 = order.iter().map(|&e| exps[e]).sum();
            let denominator = if normalize { chosen } else { sum };
            order
                .into_iter()
                .map(|e| (e, (exps[e] / denominator) as f32))
                .collect()
        })
        .collect()
}

/// The rows `tokens` of `x`, stacked in that order.
fn gather(x: &Matrix, tokens: &[usize]) -> Matrix {
    let mut data = Vec::with_capacity(tokens.len() * x.cols);
    for &token in tokens {
        data.extend_from_slice(x.row(token));
    }
    Matrix {
        rows: tokens.len(),
        cols: x.cols,
        data,
    }
}

/// `out[t] += weight_t · rows[i]` for the i-th `(t, weight_t)` of `routed`.
fn scatter_add(out: &mut Matrix, rows: &Matrix, routed: &[(usize, f32)]) {
    for (i, &(token, weight)) in routed.iter().enumerate() {
        let target = &mut out.data[token * out.cols..(token + 1) * out.cols];
        for (o, v) in target.iter_mut().zip(rows.row(i)) {
            *o += weight * v;
        }
    }
}

/// The sparse MLP of `layer` over `input` (the post-attention-normed tokens × hidden): the
/// sum of the chosen experts' outputs weighted by the router (plus the gated shared expert),
/// before the residual. Experts' groups start at `first_group` (see [`linear_groups`]).
/// Every expert's weights are fetched and shape-checked, chosen or not.
pub(crate) fn sparse_block(
    config: &LlamaConfig,
    moe: &MoeConfig,
    layer: usize,
    weights: &Weights,
    input: &Matrix,
    first_group: usize,
    observe: &mut dyn FnMut(usize, &Matrix),
) -> Result<Matrix, ModelError> {
    let h = config.hidden_size;
    let router_weight = fetch(
        weights,
        &in_layer(config, layer, &format!("{}.weight", router(moe))),
        moe.experts,
        h,
    )?;
    let routes = route(
        &linear(input, router_weight, None),
        moe.top_k,
        moe.normalize_top_k,
    );
    let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); moe.experts];
    for (token, chosen) in routes.iter().enumerate() {
        for &(e, weight) in chosen {
            routed[e].push((token, weight));
        }
    }
    let mut out = Matrix::zeros(input.rows, h);
    for (e, tokens) in routed.iter().enumerate() {
        let names = expert(moe, e);
        let rows = gather(input, &tokens.iter().map(|&(t, _)| t).collect::<Vec<_>>());
        let expert_out = swiglu(
            config,
            weights,
            layer,
            [&names[0], &names[1], &names[2]].map(String::as_str),
            moe.expert_intermediate_size,
            &rows,
            first_group + 2 * e,
            observe,
        )?;
        scatter_add(&mut out, &expert_out, tokens);
    }
    if let Some(intermediate) = moe.shared_expert_intermediate_size {
        let names = shared_expert();
        let shared = swiglu(
            config,
            weights,
            layer,
            [&names[0], &names[1], &names[2]].map(String::as_str),
            intermediate,
            input,
            first_group + 2 * moe.experts,
            observe,
        )?;
        let gate_weight = fetch(
            weights,
            &in_layer(config, layer, &format!("{SHARED_EXPERT_GATE}.weight")),
            1,
            h,
        )?;
        let gate = linear(input, gate_weight, None);
        let every_token: Vec<(usize, f32)> = gate
            .data
            .iter()
            .enumerate()
            .map(|(token, &g)| (token, (1.0 / (1.0 + (-f64::from(g)).exp())) as f32))
            .collect();
        scatter_add(&mut out, &shared, &every_token);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_picks_the_most_probable_experts_and_renormalises_only_when_asked() {
        // Token 0 prefers expert 2 then 0; token 1 expert 1 then 3; token 2 ties 0 and 3.
        let logits = Matrix::from_vec(
            3,
            4,
            vec![
                1.0, -1.0, 2.0, 0.0, //
                0.0, 3.0, -2.0, 1.0, //
                0.5, 0.0, -1.0, 0.5,
            ],
        )
        .unwrap();
        let softmax = |row: &[f64]| {
            let sum: f64 = row.iter().map(|l| l.exp()).sum();
            row.iter().map(|l| l.exp() / sum).collect::<Vec<f64>>()
        };
        let p0 = softmax(&[1.0, -1.0, 2.0, 0.0]);
        let raw = route(&logits, 2, false);
        let chosen: Vec<Vec<usize>> = raw
            .iter()
            .map(|c| c.iter().map(|&(e, _)| e).collect())
            .collect();
        assert_eq!(chosen, [vec![2, 0], vec![1, 3], vec![0, 3]]);
        assert!((f64::from(raw[0][0].1) - p0[2]).abs() < 1e-7);
        assert!((f64::from(raw[0][1].1) - p0[0]).abs() < 1e-7);
        assert!(raw[0][0].1 + raw[0][1].1 < 0.99, "unnormalised weights");
        let normalized = route(&logits, 2, true);
        for (token, choices) in normalized.iter().enumerate() {
            let sum: f32 = choices.iter().map(|&(_, w)| w).sum();
            assert!((sum - 1.0).abs() < 1e-6, "token {token}: {sum}");
        }
        let expected = p0[2] / (p0[2] + p0[0]);
        assert!((f64::from(normalized[0][0].1) - expected).abs() < 1e-7);
        assert_eq!(normalized[2][0].1, normalized[2][1].1, "tied experts");
        // top-1 renormalised is weight 1; top-k of all experts keeps every one.
        assert_eq!(route(&logits, 1, true)[1], [(1, 1.0)]);
        assert_eq!(route(&logits, 4, false)[0].len(), 4);
    }

    #[test]
    fn gather_and_scatter_add_follow_the_routed_tokens() {
        let x = Matrix::from_vec(3, 2, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let rows = gather(&x, &[2, 0]);
        assert_eq!(rows.data, [5.0, 6.0, 1.0, 2.0]);
        assert_eq!(gather(&x, &[]), Matrix::zeros(0, 2));
        let mut out = Matrix::zeros(3, 2);
        scatter_add(&mut out, &rows, &[(2, 0.5), (0, 2.0)]);
        assert_eq!(out.data, [2.0, 4.0, 0.0, 0.0, 2.5, 3.0]);
    }
}
