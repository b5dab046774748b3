//! The YAML form of each pass and its validation into [`PassKind`].
//!
//! Every pass is one mapping with exactly one kind key (`quantize`, `codebook`, `fp8`, `prune`,
//! `lowrank`, `dct`, `hashed`, `gguf`) plus `targets` and `ignore`. Each kind's settings are a struct
//! with `deny_unknown_fields`; ranges are checked here so a bad value is rejected with the
//! field's path (`passes[1].prune.n`) when the recipe is submitted, never mid-job.

use super::RecipeError;
use super::{
    invalid, Calibrated, Granularity, Matcher, PassKind, PassSpec, PruneConfig, QuantizeConfig,
    RankRule, ScaleDtype,
};
use crate::gguf::FileType;
use crate::hqq::HqqConfig;
use crate::prune::Norm;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPass {
    quantize: Option<RawQuantize>,
    codebook: Option<RawCodebook>,
    fp8: Option<RawFp8>,
    prune: Option<RawPrune>,
    lowrank: Option<RawLowRank>,
    dct: Option<RawDct>,
    hashed: Option<RawHashed>,
    gguf: Option<RawGguf>,
    #[serde(default)]
    targets: Vec<String>,
    #[serde(default)]
    ignore: Vec<String>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum RawGranularity {
    Channel,
    Group,
    Tensor,
}

#[derive(Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum QuantizeMethod {
    #[default]
    Rtn,
    Hqq,
    Gptq,
    Awq,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuantize {
    #[serde(default)]
    method: QuantizeMethod,
    bits: u8,
    symmetric: Option<bool>,
    granularity: RawGranularity,
    group_size: Option<usize>,
    iterations: Option<usize>,
    zero_point: Option<ZeroPoint>,
    act_order: Option<bool>,
    dampening: Option<f64>,
}

/// How an HQQ pass stores zero points.
#[derive(Deserialize, PartialEq, Clone, Copy)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum ZeroPoint {
    /// Real f16 zeros (HQQ's own layout; the default).
    Float,
    /// Integers in `[0, 2^bits)`, as compressed-tensors stores them.
    Integer,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum CodebookMethod {
    Kmeans,
    Nf4,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCodebook {
    method: CodebookMethod,
    bits: Option<u8>,
    iterations: Option<usize>,
    granularity: Option<RawGranularity>,
    group_size: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFp8 {
    granularity: RawGranularity,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGguf {
    /// A `llama-quantize` file type name (`q4_k_m`).
    #[serde(rename = "type")]
    file_type: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum PruneMethod {
    Magnitude,
    Nm,
    Rows,
    Columns,
    Sparsegpt,
    Wanda,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum RawNorm {
    L1,
    L2,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum RawScope {
    Tensor,
    Global,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrune {
    method: PruneMethod,
    sparsity: Option<f64>,
    n: Option<usize>,
    m: Option<usize>,
    fraction: Option<f64>,
    norm: Option<RawNorm>,
    scope: Option<RawScope>,
    dampening: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLowRank {
    rank: Option<usize>,
    energy: Option<f64>,
    storage: Option<f64>,
    power_iters: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDct {
    block: Option<usize>,
    keep: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHashed {
    fraction: f64,
}

const DEFAULT_GROUP_SIZE: usize = 128;
/// GPTQ's and SparseGPT's default dampening: 1 % of the Hessian's mean diagonal, as in the
/// reference implementations and llm-compressor.
const DEFAULT_DAMPENING: f64 = 0.01;
const DEFAULT_HQQ_ITERATIONS: usize = 20;
const DEFAULT_KMEANS_ITERATIONS: usize = 15;
const DEFAULT_NF4_GROUP: usize = 64;
const DEFAULT_POWER_ITERS: usize = 2;
const DEFAULT_DCT_BLOCK: usize = 64;
const MAX_DCT_BLOCK: usize = 256;

fn granularity(
    field: &str,
    raw: RawGranularity,
    group_size: Option<usize>,
    default_group: usize,
) -> Result<Granularity, RecipeError> {
    match (raw, group_size) {
        (RawGranularity::Group, Some(0)) => {
            Err(invalid(format!("{field}.group_size"), "must be at least 1"))
        }
        (RawGranularity::Group, size) => Ok(Granularity::Group(size.unwrap_or(default_group))),
        (_, Some(_)) => Err(invalid(
            format!("{field}.group_size"),
            "only allowed with granularity: group",
        )),
        (RawGranularity::Channel, None) => Ok(Granularity::Channel),
        (RawGranularity::Tensor, None) => Ok(Granularity::Tensor),
    }
}

fn fraction_in(field: String, v: f64, lo_open: f64, hi_open: f64) -> Result<f64, RecipeError> {
    if v.is_finite() && v > lo_open && v < hi_open {
        Ok(v)
    } else {
        Err(invalid(
            field,
            format!("{v} must lie strictly between {lo_open} and {hi_open}"),
        ))
    }
}

fn dampening(field: &str, raw: Option<f64>) -> Result<f64, RecipeError> {
    match raw {
        None => Ok(DEFAULT_DAMPENING),
        Some(d) if d.is_finite() && d > 0.0 && d <= 1.0 => Ok(d),
        Some(d) => Err(invalid(
            format!("{field}.dampening"),
            format!("{d} must lie in (0, 1] (a fraction of the Hessian's mean diagonal)"),
        )),
    }
}

fn convert_quantize(
    field: &str,
    raw: RawQuantize,
) -> Result<(PassKind, Option<Calibrated>), RecipeError> {
    let calibrated = matches!(raw.method, QuantizeMethod::Gptq | QuantizeMethod::Awq);
    if !calibrated && (raw.act_order.is_some() || raw.dampening.is_some()) {
        let key = if raw.act_order.is_some() {
            "act_order"
        } else {
            "dampening"
        };
        return Err(invalid(
            format!("{field}.{key}"),
            "only allowed with method: gptq",
        ));
    }
    if !(2..=8).contains(&raw.bits) {
        return Err(invalid(
            format!("{field}.bits"),
            format!("{} is outside 2..=8", raw.bits),
        ));
    }
    let granularity = granularity(field, raw.granularity, raw.group_size, DEFAULT_GROUP_SIZE)?;
    let rtn = |granularity| QuantizeConfig {
        bits: raw.bits,
        symmetric: raw.symmetric.unwrap_or(true),
        granularity,
        scale_dtype: ScaleDtype::F16,
    };
    match raw.method {
        QuantizeMethod::Gptq | QuantizeMethod::Awq => {
            let name = if raw.method == QuantizeMethod::Gptq {
                "gptq"
            } else {
                "awq"
            };
            if granularity == Granularity::Tensor {
                return Err(invalid(
                    format!("{field}.granularity"),
                    format!("{name} needs channel or group scales"),
                ));
            }
            if raw.iterations.is_some() || raw.zero_point.is_some() {
                let key = if raw.iterations.is_some() {
                    "iterations"
                } else {
                    "zero_point"
                };
                return Err(invalid(
                    format!("{field}.{key}"),
                    "only allowed with method: hqq",
                ));
            }
            let method = if raw.method == QuantizeMethod::Gptq {
                Calibrated::Gptq {
                    dampening: dampening(field, raw.dampening)?,
                    act_order: raw.act_order.unwrap_or(false),
                }
            } else {
                if raw.act_order.is_some() || raw.dampening.is_some() {
                    let key = if raw.act_order.is_some() {
                        "act_order"
                    } else {
                        "dampening"
                    };
                    return Err(invalid(
                        format!("{field}.{key}"),
                        "only allowed with method: gptq",
                    ));
                }
                Calibrated::Awq
            };
            Ok((PassKind::Quantize(rtn(granularity)), Some(method)))
        }
        QuantizeMethod::Rtn => {
            if raw.iterations.is_some() {
                return Err(invalid(
                    format!("{field}.iterations"),
                    "only allowed with method: hqq",
                ));
            }
            if raw.zero_point.is_some() {
                return Err(invalid(
                    format!("{field}.zero_point"),
                    "only allowed with method: hqq (rtn's asymmetric zero points are integers)",
                ));
            }
            Ok((PassKind::Quantize(rtn(granularity)), None))
        }
        QuantizeMethod::Hqq => {
            if raw.symmetric == Some(true) {
                return Err(invalid(
                    format!("{field}.symmetric"),
                    "hqq optimizes a zero point per group, so it is always asymmetric",
                ));
            }
            let iterations = raw.iterations.unwrap_or(DEFAULT_HQQ_ITERATIONS);
            if !(1..=1000).contains(&iterations) {
                return Err(invalid(
                    format!("{field}.iterations"),
                    format!("{iterations} is outside 1..=1000"),
                ));
            }
            let hqq = HqqConfig {
                bits: raw.bits,
                granularity,
                iterations,
                integer_zero: raw.zero_point == Some(ZeroPoint::Integer),
                scale_dtype: ScaleDtype::F16,
            };
            Ok((PassKind::Hqq(hqq), None))
        }
    }
}

fn convert_codebook(field: &str, raw: RawCodebook) -> Result<PassKind, RecipeError> {
    match raw.method {
        CodebookMethod::Kmeans => {
            if raw.granularity.is_some() || raw.group_size.is_some() {
                return Err(invalid(
                    format!("{field}.granularity"),
                    "k-means learns one codebook per tensor; granularity does not apply",
                ));
            }
            let bits = raw.bits.unwrap_or(4);
            if !(2..=8).contains(&bits) {
                return Err(invalid(
                    format!("{field}.bits"),
                    format!("{bits} is outside 2..=8"),
                ));
            }
            let iterations = raw.iterations.unwrap_or(DEFAULT_KMEANS_ITERATIONS);
            if !(1..=1000).contains(&iterations) {
                return Err(invalid(
                    format!("{field}.iterations"),
                    format!("{iterations} is outside 1..=1000"),
                ));
            }
            Ok(PassKind::Kmeans { bits, iterations })
        }
        CodebookMethod::Nf4 => {
            if raw.bits.is_some_and(|b| b != 4) {
                return Err(invalid(format!("{field}.bits"), "nf4 is always 4 bits"));
            }
            if raw.iterations.is_some() {
                return Err(invalid(
                    format!("{field}.iterations"),
                    "only allowed with method: kmeans",
                ));
            }
            let g = raw.granularity.unwrap_or(RawGranularity::Group);
            Ok(PassKind::Nf4 {
                granularity: granularity(field, g, raw.group_size, DEFAULT_NF4_GROUP)?,
            })
        }
    }
}

fn convert_fp8(field: &str, raw: RawFp8) -> Result<PassKind, RecipeError> {
    match raw.granularity {
        RawGranularity::Channel => Ok(PassKind::Fp8 {
            per_channel: true,
            scale_dtype: ScaleDtype::F32,
        }),
        RawGranularity::Tensor => Ok(PassKind::Fp8 {
            per_channel: false,
            scale_dtype: ScaleDtype::F32,
        }),
        RawGranularity::Group => Err(invalid(
            format!("{field}.granularity"),
            "fp8 supports channel or tensor scales",
        )),
    }
}

fn convert_gguf(field: &str, raw: RawGguf) -> Result<PassKind, RecipeError> {
    let file_type = FileType::from_name(&raw.file_type).map_err(|_| {
        let names: Vec<String> = FileType::ALL
            .iter()
            .map(|t| t.name().to_ascii_lowercase())
            .collect();
        invalid(
            format!("{field}.type"),
            format!(
                "{:?} is not a GGUF file type; use one of {}",
                raw.file_type,
                names.join(", ")
            ),
        )
    })?;
    Ok(PassKind::Ggml {
        file_type,
        ty: None,
    })
}

fn convert_prune(
    field: &str,
    raw: RawPrune,
) -> Result<(PassKind, Option<Calibrated>), RecipeError> {
    let only = |name: &str, present: bool| -> Result<(), RecipeError> {
        if present {
            Err(invalid(
                format!("{field}.{name}"),
                "does not apply to this prune method",
            ))
        } else {
            Ok(())
        }
    };
    if !matches!(raw.method, PruneMethod::Sparsegpt) {
        only("dampening", raw.dampening.is_some())?;
    }
    let mut calibrated = None;
    let config = match raw.method {
        PruneMethod::Sparsegpt | PruneMethod::Wanda => {
            only("scope", raw.scope.is_some())?;
            only("fraction", raw.fraction.is_some())?;
            only("norm", raw.norm.is_some())?;
            calibrated = Some(match raw.method {
                PruneMethod::Sparsegpt => Calibrated::SparseGpt {
                    dampening: dampening(field, raw.dampening)?,
                },
                _ => Calibrated::Wanda,
            });
            match (raw.sparsity, raw.n, raw.m) {
                (Some(s), None, None) => PruneConfig::Magnitude {
                    sparsity: fraction_in(format!("{field}.sparsity"), s, 0.0, 1.0)?,
                    global: false,
                },
                (None, Some(n), Some(m)) => n_of_m(field, n, m)?,
                _ => {
                    return Err(invalid(
                        field,
                        "give either sparsity (unstructured) or both n and m (N:M)",
                    ))
                }
            }
        }
        PruneMethod::Magnitude => {
            only("n", raw.n.is_some())?;
            only("m", raw.m.is_some())?;
            only("fraction", raw.fraction.is_some())?;
            only("norm", raw.norm.is_some())?;
            let Some(s) = raw.sparsity else {
                return Err(invalid(format!("{field}.sparsity"), "is required"));
            };
            PruneConfig::Magnitude {
                sparsity: fraction_in(format!("{field}.sparsity"), s, 0.0, 1.0)?,
                global: matches!(raw.scope, Some(RawScope::Global)),
            }
        }
        PruneMethod::Nm => {
            only("scope", raw.scope.is_some())?;
            only("sparsity", raw.sparsity.is_some())?;
            only("fraction", raw.fraction.is_some())?;
            only("norm", raw.norm.is_some())?;
            let (Some(n), Some(m)) = (raw.n, raw.m) else {
                return Err(invalid(field, "nm pruning needs both n and m"));
            };
            n_of_m(field, n, m)?
        }
        PruneMethod::Rows | PruneMethod::Columns => {
            only("scope", raw.scope.is_some())?;
            only("sparsity", raw.sparsity.is_some())?;
            only("n", raw.n.is_some())?;
            only("m", raw.m.is_some())?;
            let Some(f) = raw.fraction else {
                return Err(invalid(format!("{field}.fraction"), "is required"));
            };
            let fraction = fraction_in(format!("{field}.fraction"), f, 0.0, 1.0)?;
            let norm = match raw.norm {
                Some(RawNorm::L1) => Norm::L1,
                Some(RawNorm::L2) | None => Norm::L2,
            };
            if matches!(raw.method, PruneMethod::Rows) {
                PruneConfig::Rows { fraction, norm }
            } else {
                PruneConfig::Columns { fraction, norm }
            }
        }
    };
    Ok((PassKind::Prune(config), calibrated))
}

fn n_of_m(field: &str, n: usize, m: usize) -> Result<PruneConfig, RecipeError> {
    if !(2..=16).contains(&m) {
        return Err(invalid(
            format!("{field}.m"),
            format!("{m} is outside 2..=16"),
        ));
    }
    if n == 0 || n >= m {
        return Err(invalid(
            format!("{field}.n"),
            format!("{n} must be in 1..{m}"),
        ));
    }
    Ok(PruneConfig::NOfM { n, m })
}

fn convert_lowrank(field: &str, raw: RawLowRank) -> Result<PassKind, RecipeError> {
    let rule = match (raw.rank, raw.energy, raw.storage) {
        (Some(0), None, None) => {
            return Err(invalid(format!("{field}.rank"), "must be at least 1"));
        }
        (Some(r), None, None) => RankRule::Rank(r),
        (None, Some(e), None) => {
            let e = if e == 1.0 {
                e
            } else {
                fraction_in(format!("{field}.energy"), e, 0.0, 1.0)?
            };
            RankRule::Energy(e)
        }
        (None, None, Some(f)) => {
            RankRule::StorageFraction(fraction_in(format!("{field}.storage"), f, 0.0, 1.0)?)
        }
        _ => {
            return Err(invalid(
                field,
                "give exactly one of rank, energy (fraction of squared Frobenius norm kept) \
                 or storage (fraction of the dense size)",
            ))
        }
    };
    let power_iters = raw.power_iters.unwrap_or(DEFAULT_POWER_ITERS);
    if power_iters > 10 {
        return Err(invalid(
            format!("{field}.power_iters"),
            format!("{power_iters} is outside 0..=10"),
        ));
    }
    Ok(PassKind::LowRank { rule, power_iters })
}

fn convert_dct(field: &str, raw: RawDct) -> Result<PassKind, RecipeError> {
    let block = raw.block.unwrap_or(DEFAULT_DCT_BLOCK);
    if !(2..=MAX_DCT_BLOCK).contains(&block) {
        return Err(invalid(
            format!("{field}.block"),
            format!("{block} is outside 2..={MAX_DCT_BLOCK}"),
        ));
    }
    let keep = if raw.keep == 1.0 {
        1.0
    } else {
        fraction_in(format!("{field}.keep"), raw.keep, 0.0, 1.0)?
    };
    Ok(PassKind::Dct { block, keep })
}

fn convert_hashed(field: &str, raw: RawHashed) -> Result<PassKind, RecipeError> {
    Ok(PassKind::Hashed {
        fraction: fraction_in(format!("{field}.fraction"), raw.fraction, 0.0, 1.0)?,
    })
}

pub(super) fn convert_pass(index: usize, raw: RawPass) -> Result<PassSpec, RecipeError> {
    let field = format!("passes[{index}]");
    let mut kinds = Vec::new();
    let mut calibrated = None;
    if let Some(q) = raw.quantize {
        let (kind, method) = convert_quantize(&format!("{field}.quantize"), q)?;
        kinds.push(kind);
        calibrated = calibrated.or(method);
    }
    if let Some(c) = raw.codebook {
        kinds.push(convert_codebook(&format!("{field}.codebook"), c)?);
    }
    if let Some(f) = raw.fp8 {
        kinds.push(convert_fp8(&format!("{field}.fp8"), f)?);
    }
    if let Some(p) = raw.prune {
        let (kind, method) = convert_prune(&format!("{field}.prune"), p)?;
        kinds.push(kind);
        calibrated = calibrated.or(method);
    }
    if let Some(l) = raw.lowrank {
        kinds.push(convert_lowrank(&format!("{field}.lowrank"), l)?);
    }
    if let Some(d) = raw.dct {
        kinds.push(convert_dct(&format!("{field}.dct"), d)?);
    }
    if let Some(h) = raw.hashed {
        kinds.push(convert_hashed(&format!("{field}.hashed"), h)?);
    }
    if let Some(g) = raw.gguf {
        kinds.push(convert_gguf(&format!("{field}.gguf"), g)?);
    }
    let kind =
        match kinds.len() {
            1 => kinds.remove(0),
            0 => return Err(invalid(
                &field,
                "a pass needs a kind: quantize, codebook, fp8, prune, lowrank, dct, hashed or gguf",
            )),
            _ => {
                let keys: Vec<&str> = kinds.iter().map(PassKind::key).collect();
                return Err(invalid(
                    &field,
                    format!(
                        "one kind per pass, found {}; list them as separate passes",
                        keys.join(" and ")
                    ),
                ));
            }
        };
    if raw.targets.is_empty() {
        return Err(invalid(
            format!("{field}.targets"),
            "at least one target is required",
        ));
    }
    let parse_all = |v: &[String]| {
        v.iter()
            .map(|p| Matcher::parse(p))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(PassSpec {
        kind,
        calibrated,
        targets: parse_all(&raw.targets)?,
        ignore: parse_all(&raw.ignore)?,
    })
}
