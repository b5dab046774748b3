//! An activation-aware range search in the spirit of AWQ (Lin et al. 2023), kept inside the
//! formats RTN already writes.
//!
//! For every group (as RTN groups a row for the same [`QuantizeConfig`]) the quantization
//! range is shrunk by a factor `α ∈ {1, 0.975, 0.95, …, 0.5}` (RTN's range: `[α·lo, α·hi]`
//! asymmetric, `α·absmax` symmetric; parameters then exactly as RTN derives them from a
//! range) and the `α` with the smallest activation-weighted error
//! `Σ_j H_jj (w_j - q_j)²` over the group's columns is kept (ties: the larger `α`).
//! Weighting by `diag(H)` (each input's mean energy) rather than the group's full block of
//! `H` ignores the correlation of inputs within the group; it keeps the search linear in the
//! group size. `α = 1` is RTN itself, so every group's weighted error is at most RTN's; if
//! the cross terms nevertheless make the whole result's proxy loss `tr(ΔW H ΔWᵀ)` larger than
//! RTN's, the RTN codes are returned instead (never worse than the data-free baseline).
//!
//! **Why AWQ's per-input-channel scaling is not applied.** AWQ multiplies input channel `j`
//! of the weight by `s_j` and divides the *previous* operation's output (a norm's weight, or
//! the previous Linear's rows) by `s_j`, so the product is unchanged. That division has to be
//! folded into another tensor, owned by another task, and in some graphs (a residual stream
//! read by several Linears, an activation in between) it cannot be folded at all; without the
//! fold the stored weight would need an extra per-input scale vector that neither
//! compressed-tensors nor GGUF readers apply. So only the clipping half of AWQ's search is
//! done here; the codes stay plain RTN-format codes.

use super::{
    check_weight, has_statistics, no_statistics_stats, proxy_against, CalibratedError,
    HessianAccumulator, MethodStats,
};
use crate::quantize::{
    abs_max, check_bits, layout, min_max, params_from_range, rtn_codes, rtn_codes_dequantize,
    AffineCodes, CodeKernel,
};
use crate::recipe::{Granularity, QuantizeConfig};
use rayon::prelude::*;

/// Shrink steps searched: `α = 1 - k / STEPS_PER_UNIT` for `k` in `0..=MAX_STEP`.
const STEPS_PER_UNIT: u32 = 40;
/// The last step (`α = 0.5`).
const MAX_STEP: u32 = 20;

/// Searches the best shrink of one group's range, writes its codes and returns
/// `(scale, zero)`. `importance(j)` is the importance of `g[j]`.
fn search_group(
    cfg: &QuantizeConfig,
    g: &[f32],
    importance: impl Fn(usize) -> f64,
    codes: &mut [u8],
) -> (f32, f32) {
    let (lo, hi) = if cfg.symmetric {
        let m = abs_max(g);
        (-m, m)
    } else {
        min_max(g)
    };
    let error_of = |k: &CodeKernel| -> f64 {
        g.iter()
            .enumerate()
            .map(|(j, &x)| {
                let (_, v) = k.code_and_value(x);
                importance(j) * (f64::from(x) - f64::from(v)).powi(2)
            })
            .sum()
    };
    let mut best: Option<(f64, f32, CodeKernel)> = None;
    for step in 0..=MAX_STEP {
        let alpha = (STEPS_PER_UNIT - step) as f32 / STEPS_PER_UNIT as f32;
        let p = params_from_range(cfg, alpha * lo, alpha * hi);
        let k = CodeKernel::new(cfg, &p);
        let e = error_of(&k);
        if best.is_none_or(|(b, _, _)| e < b) {
            best = Some((e, p.scale, k));
        }
    }
    let (_, scale, k) = best.expect("at least one step");
    for (c, &x) in codes.iter_mut().zip(g) {
        *c = k.code_and_value(x).0;
    }
    (scale, k.zero)
}

/// AWQ-style codes of `weight` (rows of `cols`, f32 row-major) under `quant`, in RTN's
/// format, using `diag(H)` from `hessian`; see the module doc.
///
/// A Hessian without statistics ([`super::has_statistics`]) gives RTN's codes.
///
/// Errors: shapes that disagree, a non-finite weight, bits outside 2..=8.
pub fn awq_codes(
    quant: &QuantizeConfig,
    weight: &[f32],
    cols: usize,
    hessian: &HessianAccumulator,
) -> Result<(AffineCodes, MethodStats), CalibratedError> {
    check_weight(weight, cols, hessian)?;
    check_bits(quant.bits).map_err(|e| CalibratedError::BadConfig(e.to_string()))?;
    let diag = hessian.raw_diagonal();
    if !has_statistics(hessian) {
        let rtn = rtn_codes(quant, weight, cols)
            .map_err(|e| CalibratedError::BadConfig(e.to_string()))?;
        return Ok((rtn, no_statistics_stats()));
    }
    // Memory: one f32 buffer of decoded values and one set of codes at a time (RTN's codes
    // become the search's output; RTN is recomputed in the rare case it wins).
    let mut values = weight.to_vec();
    let mut out = rtn_codes_dequantize(quant, &mut values, cols)
        .map_err(|e| CalibratedError::BadConfig(e.to_string()))?;
    let rtn_proxy_loss = proxy_against(weight, &values, cols, hessian);
    if quant.granularity == Granularity::Tensor {
        if !weight.is_empty() {
            let (s, z) = search_group(quant, weight, |j| diag[j % cols], &mut out.codes);
            out.scales[0] = s;
            out.zeros[0] = z;
        }
    } else {
        let (_, group_len) = layout(quant.granularity, weight.len(), cols);
        let gpr = out.groups_per_row();
        weight
            .par_chunks(cols)
            .zip(out.codes.par_chunks_mut(cols))
            .zip(out.scales.par_chunks_mut(gpr))
            .zip(out.zeros.par_chunks_mut(gpr))
            .for_each(|(((row, codes), scales), zeros)| {
                let groups = row
                    .chunks(group_len)
                    .zip(codes.chunks_mut(group_len))
                    .zip(diag.chunks(group_len));
                for (i, ((g, c), d)) in groups.enumerate() {
                    (scales[i], zeros[i]) = search_group(quant, g, |j| d[j], c);
                }
            });
    }
    out.dequantize_into(&mut values);
    let mut proxy_loss = proxy_against(weight, &values, cols, hessian);
    drop(values);
    if proxy_loss > rtn_proxy_loss {
        out = rtn_codes(quant, weight, cols)
            .map_err(|e| CalibratedError::BadConfig(e.to_string()))?;
        proxy_loss = rtn_proxy_loss;
    }
    let stats = MethodStats {
        proxy_loss,
        rtn_proxy_loss,
        dead_columns: diag.iter().filter(|&&d| d == 0.0).count(),
    };
    Ok((out, stats))
}
