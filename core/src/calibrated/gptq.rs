//! GPTQ (Frantar et al. 2022): quantize a Linear's weight column by column, spreading each
//! column's rounding error over the columns not yet quantized through the inverse Hessian,
//! with the reference implementation's lazy block updates (see the `obs` module).
//!
//! Following the reference: dead inputs (`H_jj == 0`) get `H_jj = 1` and weight 0; damping
//! `λ = dampening · mean(diag H)` is added to the diagonal; the upper Cholesky factor of
//! `H⁻¹` drives the updates, all in f64 (if `H + λI` is not positive definite the damping is
//! raised 10× a few times before [`CalibratedError::NotPositiveDefinite`]).
//!
//! **Output.** [`AffineCodes`] in exactly RTN's conventions for the same
//! [`QuantizeConfig`] (codes in `[0, 2^b)`, symmetric zero `2^(b-1)`, asymmetric integer
//! zeros, scales rounded up onto the config's `scale_dtype` grid, contiguous groups along
//! each row). Each group's parameters are RTN's (`quantize::group_params`) applied to the
//! values the group holds when its first column is reached, and each element is coded with
//! RTN's kernel, so with `H = I` (no error to spread) the codes are RTN's, bit for bit.
//!
//! **Groups.** Without act-order, a group's parameters come from its columns' *current*
//! values (every earlier column's error already applied) when its first column is reached.
//! Blocks are cut so that a group never starts inside a block and crosses its end, which is
//! what makes "current" exact; the reference instead reads the group's columns from the
//! not-yet-updated global copy when a group starts mid-block (groups smaller than the
//! block), a difference of the errors of the block's earlier columns only.
//! [`Granularity::Tensor`] is one group whose parameters are computed up front.
//!
//! **act-order** visits columns in descending `diag(H)` order but with *static* groups: each
//! contiguous group's parameters are computed up front from the original weights (dead
//! columns zeroed), as the reference's `static_groups`. The stored layout is therefore the
//! plain contiguous one and needs no `g_idx` permutation in any output format.

use super::obs::{blocks, check_dampening, inverse_factor, sweep, ColumnRule, InverseFactor};
use super::{
    check_weight, check_weight_dim, has_statistics, no_statistics_stats, proxy_against,
    CalibratedError, HessianInput, MethodStats,
};
use crate::quantize::{
    check_bits, group_params, layout, rtn_codes, rtn_codes_dequantize, AffineCodes, CodeKernel,
};
use crate::recipe::{Granularity, QuantizeConfig};
use rayon::prelude::*;

/// GPTQ settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    /// The quantizer (bits, symmetric, granularity, scale grid): the output is in its format.
    pub quant: QuantizeConfig,
    /// Damping as a fraction of the mean Hessian diagonal (the reference's 0.01).
    pub dampening: f64,
    /// Visit columns in descending `diag(H)` order (with static groups).
    pub act_order: bool,
    /// Columns per lazy-update block (the reference's 128).
    pub block_size: usize,
}

impl GptqConfig {
    /// The reference defaults for `quant`: dampening 0.01, no act-order, blocks of 128.
    pub fn new(quant: QuantizeConfig) -> Self {
        GptqConfig {
            quant,
            dampening: 0.01,
            act_order: false,
            block_size: 128,
        }
    }
}

/// Per-row state of the sweep: the row's output slices and its current group's kernel.
struct RowCodes<'a> {
    row: usize,
    codes: &'a mut [u8],
    /// The row's per-group scales and zeros (`None` when the parameters are static).
    params: Option<(&'a mut [f32], &'a mut [f32])>,
    kernel: Option<CodeKernel>,
    group_values: Vec<f32>,
}

/// The GPTQ decision: code each column with RTN's kernel for its group.
struct GptqRule<'a> {
    quant: &'a QuantizeConfig,
    group_len: usize,
    groups_per_row: usize,
    perm: Option<&'a [usize]>,
    /// Static kernels, one per group of the output (act-order, or per-tensor granularity).
    fixed: Option<&'a [CodeKernel]>,
}

impl ColumnRule<RowCodes<'_>> for GptqRule<'_> {
    fn target(&self, st: &mut RowCodes<'_>, i: usize, w: &[f64]) -> f64 {
        let col = self.perm.map_or(i, |p| p[i]);
        let kernel = match (self.fixed, st.params.as_mut()) {
            (Some(fixed), _) => {
                let g = if self.quant.granularity == Granularity::Tensor {
                    0
                } else {
                    st.row * self.groups_per_row + col / self.group_len
                };
                fixed[g]
            }
            (None, Some((scales, zeros))) if i % self.group_len == 0 => {
                let end = (i + self.group_len).min(w.len());
                st.group_values.clear();
                st.group_values.extend(w[i..end].iter().map(|&v| v as f32));
                let p = group_params(self.quant, &st.group_values);
                let k = CodeKernel::new(self.quant, &p);
                scales[i / self.group_len] = p.scale;
                zeros[i / self.group_len] = k.zero;
                st.kernel = Some(k);
                k
            }
            _ => st.kernel.expect("a group's first column sets its kernel"),
        };
        let (code, value) = kernel.code_and_value(w[i] as f32);
        st.codes[col] = code;
        f64::from(value)
    }
}

/// GPTQ codes of `weight` (rows of `cols`, f32 row-major) under `cfg.quant`, using the
/// calibration statistics in `hessian`; see the module doc.
///
/// `hessian` is a `&HessianAccumulator` (kept by the caller: its packed triangle is copied
/// to be factored) or a `HessianAccumulator` (consumed: the triangle is factored in place,
/// the memory [`super::solve_memory_bytes`] bounds). The RTN baseline's proxy loss is
/// computed from the triangle before it is factored, the result's from the sweep itself
/// (see the `obs` module).
///
/// A Hessian without statistics ([`super::has_statistics`]: no rows, or only zero inputs)
/// gives RTN's codes, which are what GPTQ computes with `H = I`.
///
/// Errors: shapes that disagree, a non-finite weight, bits outside 2..=8,
/// `block_size == 0`, a negative or non-finite dampening, or a Hessian that stays
/// indefinite after the damping retries.
pub fn gptq_codes<'h>(
    cfg: &GptqConfig,
    weight: &[f32],
    cols: usize,
    hessian: impl Into<HessianInput<'h>>,
) -> Result<(AffineCodes, MethodStats), CalibratedError> {
    let hessian = hessian.into();
    check_weight(weight, cols, hessian.get())?;
    check_config(cfg)?;
    let quant = &cfg.quant;
    if !has_statistics(hessian.get()) {
        let rtn = rtn_codes(quant, weight, cols)
            .map_err(|e| CalibratedError::BadConfig(e.to_string()))?;
        return Ok((rtn, no_statistics_stats()));
    }
    // The baseline's loss needs H: before the factor consumes it.
    let rtn_proxy_loss = {
        let mut rtn_values = weight.to_vec();
        rtn_codes_dequantize(quant, &mut rtn_values, cols)
            .map_err(|e| CalibratedError::BadConfig(e.to_string()))?;
        proxy_against(weight, &rtn_values, cols, hessian.get())
    };
    let factor = inverse_factor(hessian, cfg.dampening, cfg.act_order)?;
    let (out, proxy_loss) = sweep_codes(cfg, &factor, weight, cols);
    let stats = MethodStats {
        proxy_loss,
        rtn_proxy_loss,
        dead_columns: factor.dead.iter().filter(|&&d| d).count(),
    };
    Ok((out, stats))
}

/// GPTQ's inverse-Hessian factor of one Linear: it depends on the Hessian, the dampening
/// and act-order only, so one factor serves every quantizer fitted on the same Hessian
/// ([`gptq_codes_with`]; mixed precision scores each candidate width so). Holds one packed
/// triangle of `n(n+1)/2` f64 (the accumulator's own when it is given by value).
pub struct GptqFactor {
    factor: InverseFactor,
    cols: usize,
    dampening: f64,
    act_order: bool,
}

impl GptqFactor {
    /// The factor of `hessian` for `dampening` and `act_order` (as [`GptqConfig`] has them).
    /// `hessian` as in [`gptq_codes`]: borrowed (its triangle copied) or by value (its
    /// triangle becomes the factor, no copy).
    /// Errors: a bad dampening, no calibration statistics in `hessian`, or a Hessian that
    /// stays indefinite after the damping retries.
    pub fn new<'h>(
        hessian: impl Into<HessianInput<'h>>,
        dampening: f64,
        act_order: bool,
    ) -> Result<GptqFactor, CalibratedError> {
        let hessian = hessian.into();
        check_dampening(dampening)?;
        if !has_statistics(hessian.get()) {
            return Err(CalibratedError::BadConfig(
                "the Hessian holds no calibration statistics".into(),
            ));
        }
        let cols = hessian.get().dim();
        Ok(GptqFactor {
            factor: inverse_factor(hessian, dampening, act_order)?,
            cols,
            dampening,
            act_order,
        })
    }
}

/// [`gptq_codes`]' codes (identical, bit for bit) with a factor computed once, and without
/// the proxy losses. Errors as [`gptq_codes`], and when `factor` was built for another
/// input width, dampening or act-order than `weight` and `cfg` have.
pub fn gptq_codes_with(
    cfg: &GptqConfig,
    factor: &GptqFactor,
    weight: &[f32],
    cols: usize,
) -> Result<AffineCodes, CalibratedError> {
    check_weight_dim(weight, cols, factor.cols)?;
    check_config(cfg)?;
    if (cfg.dampening, cfg.act_order) != (factor.dampening, factor.act_order) {
        return Err(CalibratedError::BadConfig(format!(
            "a factor for dampening {}, act_order {} used with dampening {}, act_order {}",
            factor.dampening, factor.act_order, cfg.dampening, cfg.act_order
        )));
    }
    Ok(sweep_codes(cfg, &factor.factor, weight, cols).0)
}

/// Refuses bits outside 2..=8, `block_size == 0` and a bad dampening.
fn check_config(cfg: &GptqConfig) -> Result<(), CalibratedError> {
    check_bits(cfg.quant.bits).map_err(|e| CalibratedError::BadConfig(e.to_string()))?;
    if cfg.block_size == 0 {
        return Err(CalibratedError::BadConfig(
            "block_size must be at least 1".into(),
        ));
    }
    check_dampening(cfg.dampening)
}

/// The sweep: `weight`'s codes under `cfg`, its errors spread through `factor`, and their
/// proxy loss.
fn sweep_codes(
    cfg: &GptqConfig,
    factor: &InverseFactor,
    weight: &[f32],
    cols: usize,
) -> (AffineCodes, f64) {
    let quant = &cfg.quant;
    let rows = weight.len() / cols.max(1);
    let (row_len, group_len) = layout(quant.granularity, weight.len(), cols);
    // Within a row: one group per `group_len` columns (the whole row for per-tensor).
    let (row_group_len, groups_per_row) = match quant.granularity {
        Granularity::Tensor => (cols, 1),
        _ => (group_len, cols.div_ceil(group_len.max(1))),
    };
    let total_groups = match quant.granularity {
        Granularity::Tensor => usize::from(rows > 0),
        _ => rows * groups_per_row,
    };
    let mut out = AffineCodes {
        bits: quant.bits,
        row_len,
        group_len,
        codes: vec![0; weight.len()],
        scales: vec![0.0; total_groups],
        zeros: vec![0.0; total_groups],
    };
    let fixed = (cfg.act_order || quant.granularity == Granularity::Tensor)
        .then(|| static_kernels(quant, weight, cols, &factor.dead, &mut out));
    let rule = GptqRule {
        quant,
        group_len: row_group_len,
        groups_per_row,
        perm: factor.perm.as_deref(),
        fixed: fixed.as_deref(),
    };
    let mut states = row_states(&mut out, cols, groups_per_row, fixed.is_none());
    let align = if fixed.is_some() { 1 } else { row_group_len };
    let proxy_loss = sweep(
        &rule,
        &mut states,
        weight,
        factor,
        &blocks(cols, cfg.block_size, align),
    );
    drop(states);
    (out, proxy_loss)
}

/// The per-row sweep states over `out`'s slices (scales and zeros only when the groups are
/// computed during the sweep).
fn row_states(
    out: &mut AffineCodes,
    cols: usize,
    groups_per_row: usize,
    dynamic: bool,
) -> Vec<RowCodes<'_>> {
    let mut params: Vec<Option<(&mut [f32], &mut [f32])>> = if dynamic {
        out.scales
            .chunks_mut(groups_per_row)
            .zip(out.zeros.chunks_mut(groups_per_row))
            .map(Some)
            .collect()
    } else {
        Vec::new()
    };
    params.resize_with(out.codes.len() / cols, || None);
    out.codes
        .chunks_mut(cols)
        .zip(params)
        .enumerate()
        .map(|(row, (codes, params))| RowCodes {
            row,
            codes,
            params,
            kernel: None,
            group_values: Vec::new(),
        })
        .collect()
}

/// Static group kernels computed from the original weights with dead columns zeroed, as
/// RTN computes them; their scales and zeros are written into `out`. Each group is copied
/// (dead columns zeroed) on its own, so no second weight-sized buffer is made except for
/// the single group of [`Granularity::Tensor`].
fn static_kernels(
    quant: &QuantizeConfig,
    weight: &[f32],
    cols: usize,
    dead: &[bool],
    out: &mut AffineCodes,
) -> Vec<CodeKernel> {
    let zeroed = |values: &[f32], dead: &[bool]| -> Vec<f32> {
        values
            .iter()
            .zip(dead)
            .map(|(&w, &d)| if d { 0.0 } else { w })
            .collect()
    };
    let params = |g: &[f32]| {
        let p = group_params(quant, g);
        (p.scale, CodeKernel::new(quant, &p))
    };
    let kernels: Vec<(f32, CodeKernel)> = match quant.granularity {
        Granularity::Tensor if weight.is_empty() => Vec::new(),
        Granularity::Tensor => {
            let all: Vec<f32> = weight
                .par_chunks(cols)
                .flat_map_iter(|row| zeroed(row, dead))
                .collect();
            vec![params(&all)]
        }
        _ => {
            let group_len = out.group_len.max(1);
            weight
                .par_chunks(cols)
                .flat_map_iter(|row| {
                    (0..cols).step_by(group_len).map(move |g0| {
                        let g1 = (g0 + group_len).min(cols);
                        params(&zeroed(&row[g0..g1], &dead[g0..g1]))
                    })
                })
                .collect()
        }
    };
    for (i, (scale, k)) in kernels.iter().enumerate() {
        out.scales[i] = *scale;
        out.zeros[i] = k.zero;
    }
    kernels.into_iter().map(|(_, k)| k).collect()
}
