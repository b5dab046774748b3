//! Compression recipes: which passes run on which tensors, and the quality gates a result
//! must pass.
//!
//! Recipes are YAML (parsed with `serde_norway`). Parsing goes through private `Raw*` structs
//! marked `deny_unknown_fields`, so a typo is an error rather than a silently ignored key,
//! and is then validated and converted into the public types. Tensor targets are exact names
//! or `re:`-prefixed regexes that must match the whole name. A few presets are embedded.

use serde::Deserialize;

/// A validated recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// `"custom"` when the YAML has no name.
    pub name: String,
    /// The output format this recipe asks for (the CLI's `--format` overrides it).
    pub format: OutputFormat,
    pub passes: Vec<PassSpec>,
    pub gates: Gates,
    /// Near-identical tensors stored once: a tensor whose cosine similarity with an earlier
    /// tensor of the same dtype and shape reaches this threshold becomes a reference to that
    /// tensor's compressed form (its error is measured against it). `None`: only exactly
    /// identical records are shared (always, in `.spz`).
    pub share_cosine: Option<f64>,
    /// `non_finite: keep`: rows holding NaN or an infinity are stored exactly as they are
    /// (the tensor's other rows compressed) instead of failing the job; only outputs that can
    /// hold values in the input dtype (`--format safetensors`, `spz`) can store them.
    pub keep_non_finite_rows: bool,
    /// Mixed precision to a bit budget (see [`crate::precision`]): the bit widths the
    /// quantizing passes may use per tensor, the average to meet, and once the job has
    /// measured them, each tensor's choice.
    pub mixed_precision: Option<MixedPrecision>,
    /// The YAML this recipe was parsed from (shipped to workers verbatim).
    pub source_yaml: String,
}

/// `mixed_precision:` of a recipe: the quantizing passes' tensors get one of `candidates`
/// widths each (a bit width, and optionally a group size or per-channel scales in place of
/// the pass's granularity; symmetry and method unchanged), chosen so that the tensors
/// together store at most `target_bpw` bits per weight.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedPrecision {
    pub target_bpw: f64,
    /// The widths to choose from; `None`: [`MixedPrecision::default_candidates`].
    pub candidates: Option<Vec<Width>>,
    /// Tensor name -> its width: what the job's measuring round chose (written into the
    /// recipe the job's later rounds run, and into the output's report). A tensor not
    /// listed keeps its pass's width.
    pub chosen: std::collections::BTreeMap<String, Width>,
    /// How each width's error is scored when the job has calibration data.
    pub score: PrecisionScore,
}

/// One width mixed precision may give a tensor: `bits` per code, and the scales' granularity
/// (`None`: the pass's own). Written in a recipe as `4` (the pass's granularity), `"4g64"`
/// (groups of 64 weights) or `"8c"` (one scale per output channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Width {
    pub bits: u8,
    /// Serialized as `group_size` (a number, or `"channel"`), left out for the pass's own.
    #[serde(
        rename = "group_size",
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_granularity"
    )]
    pub granularity: Option<Granularity>,
}

fn serialize_granularity<S: serde::Serializer>(
    granularity: &Option<Granularity>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match granularity {
        Some(Granularity::Group(g)) => serializer.serialize_u64(*g as u64),
        Some(Granularity::Channel) => serializer.serialize_str("channel"),
        Some(Granularity::Tensor) => serializer.serialize_str("tensor"),
        None => serializer.serialize_none(),
    }
}

impl Width {
    /// `bits` at the pass's own granularity.
    pub fn bits(bits: u8) -> Width {
        Width {
            bits,
            granularity: None,
        }
    }

    /// Parses `4`, `4g64` or `8c`; checks the bits are 2..=8 and a group size is 1..=2²⁰.
    pub fn parse(text: &str) -> Result<Width, String> {
        let bad = || {
            format!("{text:?} is not a width: write 4, \"4g64\" (4 bits, groups of 64) or \"8c\" (8 bits, per channel)")
        };
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let bits: u8 = text[..digits].parse().map_err(|_| bad())?;
        let granularity = match &text[digits..] {
            "" => None,
            "c" => Some(Granularity::Channel),
            rest => {
                let group = rest.strip_prefix('g').ok_or_else(bad)?;
                let group: usize = group.parse().map_err(|_| bad())?;
                if !(1..=1 << 20).contains(&group) {
                    return Err(format!(
                        "{text:?}: group size {group} is outside 1..=1048576"
                    ));
                }
                Some(Granularity::Group(group))
            }
        };
        if !(2..=8).contains(&bits) {
            return Err(format!("{text:?}: {bits} bits is outside 2..=8"));
        }
        Ok(Width { bits, granularity })
    }

    /// `"3 bits"`, `"4 bits in groups of 32"`, `"8 bits per channel"`.
    pub fn describe(&self) -> String {
        match self.granularity {
            None => format!("{} bits", self.bits),
            Some(Granularity::Group(g)) => format!("{} bits in groups of {g}", self.bits),
            Some(Granularity::Channel) => format!("{} bits per channel", self.bits),
            Some(Granularity::Tensor) => format!("{} bits per tensor", self.bits),
        }
    }

    /// What [`Width::parse`] reads after the bits: `""`, `"g64"` or `"c"`.
    pub fn granularity_suffix(&self) -> String {
        match self.granularity {
            None => String::new(),
            Some(Granularity::Group(g)) => format!("g{g}"),
            Some(Granularity::Channel) => "c".into(),
            Some(Granularity::Tensor) => "t".into(),
        }
    }

    /// `kind` at this width, or `None` when `kind` is not a pass whose width can change.
    pub fn apply(&self, kind: &PassKind) -> Option<PassKind> {
        let mut narrowed = kind.with_bits(self.bits)?;
        if let Some(granularity) = self.granularity {
            match &mut narrowed {
                PassKind::Quantize(q) => q.granularity = granularity,
                PassKind::Hqq(h) => h.granularity = granularity,
                _ => return None,
            }
        }
        Some(narrowed)
    }

    /// The YAML value this width is written as: a number, or a string with a granularity.
    fn to_yaml(self) -> serde_norway::Value {
        match self.granularity {
            None => u64::from(self.bits).into(),
            Some(_) => self.to_string().into(),
        }
    }
}

impl std::fmt::Display for Width {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.bits, self.granularity_suffix())
    }
}

/// A width as a recipe writes it: a bare number or a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawWidth {
    Bits(u64),
    Text(String),
}

impl RawWidth {
    fn parse(self) -> Result<Width, String> {
        match self {
            RawWidth::Bits(bits) => Width::parse(&bits.to_string()),
            RawWidth::Text(text) => Width::parse(&text),
        }
    }
}

/// How mixed precision scores a candidate width of a Linear in a transformer block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionScore {
    /// By the error it causes in its layer's output on held-out calibration inputs, when the
    /// job has calibration data (else by weight error). Costs one more pass of the
    /// calibration batches through the model, and per Linear and width a fit and a layer
    /// forward.
    #[default]
    Outputs,
    /// By its relative weight error `‖ΔW‖² / ‖W‖²` alone (cheap: one encode per width).
    Weights,
}

impl MixedPrecision {
    /// The widths tried when a recipe names none: what `format` can store (compressed-tensors'
    /// pack-quantized holds 4 and 8 bits; the other formats any width from 2 to 8), at the
    /// pass's granularity. (A recipe with a `gguf` pass gets [`GGUF_WIDTHS`] whatever the
    /// format.)
    pub fn default_candidates(format: OutputFormat) -> Vec<Width> {
        let bits: &[u8] = match format {
            OutputFormat::CompressedTensors => &[4, 8],
            _ => &[3, 4, 5, 6, 8],
        };
        bits.iter().map(|&b| Width::bits(b)).collect()
    }

    /// The widths to choose from for an output in `format`.
    pub fn candidates_for(&self, format: OutputFormat) -> Vec<Width> {
        self.candidates
            .clone()
            .unwrap_or_else(|| MixedPrecision::default_candidates(format))
    }
}

/// One pass and the tensors it applies to.
#[derive(Debug, Clone)]
pub struct PassSpec {
    pub kind: PassKind,
    /// Set when the pass's result comes from a method fitted on calibration data (GPTQ,
    /// AWQ, SparseGPT, Wanda); `kind` is then the stored form (integer codes, or an N:M or
    /// magnitude pattern), exactly as the data-free pass of that kind stores it.
    pub calibrated: Option<Calibrated>,
    pub targets: Vec<Matcher>,
    pub ignore: Vec<Matcher>,
}

/// A compression method fitted on calibration data, layer by layer: its result is stored in
/// the same form as the data-free pass it replaces (RTN's codes, scales and zero points; a
/// prune pass's pattern), so every output format carries it unchanged.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Calibrated {
    /// GPTQ (Frantar et al. 2022): codes chosen column by column, each column's rounding
    /// error compensated on the columns not yet quantized through the inverse Hessian of the
    /// layer's inputs. `dampening` is the fraction of the Hessian's mean diagonal added to
    /// it; `act_order` quantizes columns in decreasing order of their activation energy.
    Gptq { dampening: f64, act_order: bool },
    /// An activation-aware scale search (AWQ-style): each group's range is shrunk by the
    /// factor that minimises the activation-weighted error.
    Awq,
    /// SparseGPT (Frantar & Alistarh 2023): a pruning mask chosen and the kept weights
    /// updated to compensate, through the inverse Hessian.
    SparseGpt { dampening: f64 },
    /// Wanda (Sun et al. 2023): weights pruned by |w| times their input's activation norm.
    Wanda,
}

impl Calibrated {
    /// `"gptq"`, `"awq"`, `"sparsegpt"` or `"wanda"`.
    pub fn name(&self) -> &'static str {
        match self {
            Calibrated::Gptq { .. } => "gptq",
            Calibrated::Awq => "awq",
            Calibrated::SparseGpt { .. } => "sparsegpt",
            Calibrated::Wanda => "wanda",
        }
    }

    /// True for the methods that choose what a prune pass keeps (the others choose codes).
    pub fn prunes(&self) -> bool {
        matches!(self, Calibrated::SparseGpt { .. } | Calibrated::Wanda)
    }

    /// `kind`'s description with this method's name in place of the data-free one:
    /// `"gptq int4 asym g128"`, `"sparsegpt 2:4"`.
    pub fn describe(&self, kind: &PassKind) -> String {
        let plain = kind.describe();
        let rest = plain
            .strip_prefix("rtn ")
            .or_else(|| plain.strip_prefix("prune magnitude "))
            .or_else(|| plain.strip_prefix("prune "))
            .unwrap_or(&plain);
        match self {
            Calibrated::Gptq {
                act_order: true, ..
            } => format!("gptq {rest} act-order"),
            _ => format!("{} {rest}", self.name()),
        }
    }
}

/// What a pass does. Passes fall in two stages: a *structure* stage (pruning, which decides
/// which weights are stored at all) and a *values* stage (how the kept weights are stored).
/// A tensor gets at most one of each, structure first; see [`crate::codec::TensorPlan`].
#[derive(Debug, Clone, PartialEq)]
pub enum PassKind {
    /// Round-to-nearest uniform affine quantization.
    Quantize(QuantizeConfig),
    /// Data-free optimized (HQQ-style) affine quantization.
    Hqq(crate::hqq::HqqConfig),
    /// One k-means codebook per tensor (Deep Compression weight sharing).
    Kmeans { bits: u8, iterations: usize },
    /// NormalFloat-4 codebook with an absmax scale per group.
    Nf4 { granularity: Granularity },
    /// FP8 E4M3 with a per-channel or per-tensor scale.
    Fp8 {
        per_channel: bool,
        scale_dtype: ScaleDtype,
    },
    /// Magnitude, N:M or structured pruning.
    Prune(PruneConfig),
    /// Truncated SVD into two factors.
    LowRank { rule: RankRule, power_iters: usize },
    /// Blockwise DCT of each row keeping the largest coefficients (experimental).
    Dct { block: usize, keep: f64 },
    /// HashedNets bucket sharing: `fraction` of the weights' count as shared buckets.
    Hashed { fraction: f64 },
    /// llama.cpp block quantization: each tensor gets the ggml type `llama-quantize` would
    /// give it in a file of `file_type` (Q4_K_M: Q6_K for the tensors it promotes, Q4_K for
    /// the rest). `ty` is that type, resolved from the model's config when a tensor's plan
    /// is made ([`crate::codec::TensorPlan::for_output`]); `None` in a recipe.
    Ggml {
        file_type: crate::gguf::FileType,
        ty: Option<crate::gguf::GgmlType>,
    },
}

/// How a low-rank pass picks its rank.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RankRule {
    /// A fixed rank (capped at the matrix's smaller side).
    Rank(usize),
    /// The smallest rank keeping this fraction of the squared Frobenius norm.
    Energy(f64),
    /// The largest rank whose two factors take at most this fraction of the dense size.
    StorageFraction(f64),
}

/// Which weights a pruning pass removes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PruneConfig {
    /// Unstructured: the `sparsity` fraction of weights with the smallest magnitude, per
    /// tensor, or (`global`) over every tensor the pass targets together, cut from the
    /// merged magnitude histograms of all workers before compression starts.
    Magnitude { sparsity: f64, global: bool },
    /// In every run of `m` weights of a row, keep the `n` largest.
    NOfM { n: usize, m: usize },
    /// Whole rows (output channels) with the smallest norm ("model pruning").
    Rows {
        fraction: f64,
        norm: crate::prune::Norm,
    },
    /// Whole input columns with the smallest norm ("feature pruning").
    Columns {
        fraction: f64,
        norm: crate::prune::Norm,
    },
}

pub use crate::format::OutputFormat;

/// Round-to-nearest quantization settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuantizeConfig {
    pub bits: u8,
    pub symmetric: bool,
    pub granularity: Granularity,
    /// The grid scales are rounded up to (set per tensor by the output format).
    pub scale_dtype: ScaleDtype,
}

/// The grid a pass's scales are rounded *up* onto (no value clips), so that they are exact in
/// the dtype they are stored in; the output format sets it per tensor
/// (`crate::format::set_scale_grid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum ScaleDtype {
    #[default]
    F16,
    Bf16,
    F32,
}

impl ScaleDtype {
    /// The scale dtype matching a tensor's dtype (F32 for anything but BF16/F16).
    pub fn of(dtype: crate::dtype::DType) -> ScaleDtype {
        match dtype {
            crate::dtype::DType::BF16 => ScaleDtype::Bf16,
            crate::dtype::DType::F16 => ScaleDtype::F16,
            _ => ScaleDtype::F32,
        }
    }

    /// The smallest value of this grid `>= raw` for positive finite `raw` (`raw` itself
    /// where that would overflow); see [`crate::quantize`] for f16.
    pub fn round_up(self, raw: f32) -> f32 {
        match self {
            ScaleDtype::F16 => crate::quantize::f16_round_up(raw),
            ScaleDtype::Bf16 => crate::quantize::bf16_round_up(raw),
            ScaleDtype::F32 => raw,
        }
    }

    /// The value of this grid nearest `raw` (ties to even; overflow gives an infinity).
    pub fn round_nearest(self, raw: f32) -> f32 {
        match self {
            ScaleDtype::F16 => half::f16::from_f32(raw).to_f32(),
            ScaleDtype::Bf16 => half::bf16::from_f32(raw).to_f32(),
            ScaleDtype::F32 => raw,
        }
    }
}

/// How many weights share one scale.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Granularity {
    /// One scale per row (output channel).
    Channel,
    /// One scale per run of this many weights within a row.
    Group(usize),
    /// One scale for the whole tensor (needs the whole tensor in memory).
    Tensor,
}

/// Quality thresholds checked against per-tensor metrics; `None` means unchecked.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Gates {
    pub max_rel_error: Option<f64>,
    pub min_cosine: Option<f64>,
    pub min_snr_db: Option<f64>,
    /// Function-space gates, checked against the evaluation of a calibrated job (see
    /// `calibration`): an encoder's mean embedding cosine to the original model's, a
    /// decoder's top-1 next-token agreement and mean KL divergence.
    pub min_embedding_cosine: Option<f64>,
    pub min_top1: Option<f64>,
    pub max_kld: Option<f64>,
}

/// Selects tensors by exact name or by a fully anchored regex.
#[derive(Debug, Clone)]
pub enum Matcher {
    Exact(String),
    Regex(regex::Regex),
}

/// Why a recipe was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecipeError {
    #[error("recipe YAML is invalid{}: {message}", location(*line, *column))]
    Yaml {
        message: String,
        line: Option<usize>,
        column: Option<usize>,
    },
    #[error("recipe field {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("target pattern {pattern:?} is not a valid regex: {message}")]
    Regex { pattern: String, message: String },
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" at line {l} column {c}"),
        (Some(l), None) => format!(" at line {l}"),
        _ => String::new(),
    }
}

const REGEX_PREFIX: &str = "re:";

/// The largest recipe accepted: real ones are a few KB; a coordinator parses what any
/// client sends.
pub const MAX_RECIPE_BYTES: usize = 256 * 1024;
/// The deepest nesting accepted, in brackets (`[`, `{`) or in columns of indentation.
pub const MAX_RECIPE_NESTING: usize = 64;
/// The most YAML aliases (`*name`) accepted: each may expand to a copy of what it names.
pub const MAX_RECIPE_ALIASES: usize = 256;

/// Refuses, before parsing, a recipe too large or too deeply nested to be one (a hostile
/// one could otherwise hold a coordinator's parser for a long time).
fn check_recipe_shape(yaml: &str) -> Result<(), RecipeError> {
    let refuse = |reason: String| RecipeError::Invalid {
        field: "(the recipe)".into(),
        reason,
    };
    if yaml.len() > MAX_RECIPE_BYTES {
        return Err(refuse(format!(
            "{} bytes, over the limit of {MAX_RECIPE_BYTES}",
            yaml.len()
        )));
    }
    let (mut depth, mut aliases) = (0usize, 0usize);
    for (number, line) in yaml.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        if indent > MAX_RECIPE_NESTING * 2 {
            return Err(refuse(format!(
                "line {} is indented {indent} columns, over the limit of {}",
                number + 1,
                MAX_RECIPE_NESTING * 2
            )));
        }
        // Brackets and aliases outside quotes and comments (closing brackets of a line may
        // follow on later lines, so depth carries over).
        let mut quote: Option<char> = None;
        let mut previous = ' ';
        for c in line.chars() {
            match (quote, c) {
                (Some(q), _) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') if previous.is_whitespace() => break,
                (None, '[' | '{') => depth += 1,
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                (None, '*') if matches!(previous, ' ' | '[' | ',' | ':') => aliases += 1,
                _ => {}
            }
            if depth > MAX_RECIPE_NESTING {
                return Err(refuse(format!(
                    "brackets nested more than {MAX_RECIPE_NESTING} deep at line {}",
                    number + 1
                )));
            }
            previous = c;
        }
    }
    if aliases > MAX_RECIPE_ALIASES {
        return Err(refuse(format!(
            "{aliases} YAML aliases, over the limit of {MAX_RECIPE_ALIASES}"
        )));
    }
    Ok(())
}

/// A `targets` or `ignore` entry of a recipe that selects no tensor of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Unmatched {
    /// The pass, numbered from 1, and what it does.
    pub pass: usize,
    pub pass_name: String,
    /// `"targets"` or `"ignore"`.
    pub list: &'static str,
    pub pattern: String,
}

impl std::fmt::Display for Unmatched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pass {} ({}): {} entry {:?} selects no tensor",
            self.pass, self.pass_name, self.list, self.pattern
        )
    }
}

impl Matcher {
    /// Parses `"re:<regex>"` (anchored to the whole name) or an exact name.
    pub fn parse(pattern: &str) -> Result<Matcher, RecipeError> {
        let Some(re) = pattern.strip_prefix(REGEX_PREFIX) else {
            return Ok(Matcher::Exact(pattern.to_owned()));
        };
        regex::Regex::new(&format!("^(?:{re})$"))
            .map(Matcher::Regex)
            .map_err(|e| RecipeError::Regex {
                pattern: pattern.to_owned(),
                message: e.to_string(),
            })
    }

    /// True when `name` is selected: the entry names the tensor, or the module whose weight
    /// it is (`lm_head` selects `lm_head.weight`, as llm-compressor's module names do).
    pub fn matches(&self, name: &str) -> bool {
        let module = name.strip_suffix(".weight");
        match self {
            Matcher::Exact(s) => s == name || module == Some(s.as_str()),
            Matcher::Regex(re) => re.is_match(name) || module.is_some_and(|m| re.is_match(m)),
        }
    }

    /// The pattern as written in the recipe (`re:` form for regexes).
    pub fn pattern(&self) -> String {
        match self {
            Matcher::Exact(s) => s.clone(),
            Matcher::Regex(re) => {
                let s = re.as_str();
                let inner = s
                    .strip_prefix("^(?:")
                    .and_then(|s| s.strip_suffix(")$"))
                    .unwrap_or(s);
                format!("{REGEX_PREFIX}{inner}")
            }
        }
    }
}

impl Granularity {
    fn describe(self) -> String {
        match self {
            Granularity::Channel => "per-channel".to_owned(),
            Granularity::Group(g) => format!("g{g}"),
            Granularity::Tensor => "per-tensor".to_owned(),
        }
    }
}

impl PassKind {
    /// Short description, e.g. `"rtn int4 sym g128"` or `"prune 2:4"`.
    pub fn describe(&self) -> String {
        match self {
            PassKind::Quantize(q) => {
                let sym = if q.symmetric { "sym" } else { "asym" };
                format!("rtn int{} {sym} {}", q.bits, q.granularity.describe())
            }
            PassKind::Hqq(h) => format!(
                "hqq int{} {}{}",
                h.bits,
                h.granularity.describe(),
                if h.integer_zero { " int-zero" } else { "" }
            ),
            PassKind::Kmeans { bits, .. } => format!("kmeans {bits}-bit"),
            PassKind::Nf4 { granularity } => format!("nf4 {}", granularity.describe()),
            PassKind::Fp8 { per_channel, .. } => {
                let g = if *per_channel {
                    "per-channel"
                } else {
                    "per-tensor"
                };
                format!("fp8-e4m3 {g}")
            }
            PassKind::Prune(p) => match p {
                PruneConfig::Magnitude { sparsity, global } => {
                    let scope = if *global { " global" } else { "" };
                    format!("prune magnitude {sparsity}{scope}")
                }
                PruneConfig::NOfM { n, m } => format!("prune {n}:{m}"),
                PruneConfig::Rows { fraction, norm } => format!("prune rows {fraction} {norm:?}"),
                PruneConfig::Columns { fraction, norm } => {
                    format!("prune columns {fraction} {norm:?}")
                }
            },
            PassKind::LowRank { rule, .. } => match rule {
                RankRule::Rank(r) => format!("lowrank rank {r}"),
                RankRule::Energy(e) => format!("lowrank energy {e}"),
                RankRule::StorageFraction(f) => format!("lowrank storage {f}"),
            },
            PassKind::Dct { block, keep } => format!("dct b{block} keep {keep}"),
            PassKind::Hashed { fraction } => format!("hashed {fraction}"),
            PassKind::Ggml { file_type, ty } => match ty {
                Some(ty) => format!("gguf {}", ty.name()),
                None => format!("gguf {file_type}"),
            },
        }
    }

    /// This quantizing pass at `bits` wide (RTN and HQQ; a calibrated method's pass is its
    /// RTN form; a `gguf` pass with [`crate::gguf::GgmlType::for_width`]'s type, which the
    /// output plan applies to the tensors the file type block-quantizes); `None` for passes
    /// without a bit width to choose, and for a width a `gguf` pass has no type for.
    pub fn with_bits(&self, bits: u8) -> Option<PassKind> {
        match self {
            PassKind::Quantize(q) => Some(PassKind::Quantize(QuantizeConfig { bits, ..*q })),
            PassKind::Hqq(h) => Some(PassKind::Hqq(crate::hqq::HqqConfig { bits, ..*h })),
            PassKind::Ggml { file_type, .. } => Some(PassKind::Ggml {
                file_type: *file_type,
                ty: Some(crate::gguf::GgmlType::for_width(bits)?),
            }),
            _ => None,
        }
    }

    /// True for pruning passes (the structure stage).
    pub fn is_structure(&self) -> bool {
        matches!(self, PassKind::Prune(_))
    }

    /// The YAML key this pass is written under.
    pub fn key(&self) -> &'static str {
        match self {
            PassKind::Quantize(_) | PassKind::Hqq(_) => "quantize",
            PassKind::Kmeans { .. } | PassKind::Nf4 { .. } => "codebook",
            PassKind::Fp8 { .. } => "fp8",
            PassKind::Prune(_) => "prune",
            PassKind::LowRank { .. } => "lowrank",
            PassKind::Dct { .. } => "dct",
            PassKind::Hashed { .. } => "hashed",
            PassKind::Ggml { .. } => "gguf",
        }
    }

    /// Longer description used by [`Recipe::describe`].
    fn describe_long(&self) -> String {
        match self {
            PassKind::Quantize(q) => {
                let sym = if q.symmetric { "sym" } else { "asym" };
                let gran = match q.granularity {
                    Granularity::Channel => "per-channel".to_owned(),
                    Granularity::Group(g) => format!("group {g}"),
                    Granularity::Tensor => "per-tensor".to_owned(),
                };
                format!("quantize {}-bit {sym} {gran}", q.bits)
            }
            other => other.describe(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    name: Option<String>,
    #[serde(default)]
    format: Option<OutputFormat>,
    passes: Vec<RawPass>,
    #[serde(default)]
    gates: Option<RawGates>,
    #[serde(default)]
    share: Option<RawShare>,
    #[serde(default)]
    non_finite: Option<NonFinite>,
    #[serde(default)]
    mixed_precision: Option<RawMixedPrecision>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMixedPrecision {
    target_bpw: f64,
    #[serde(default)]
    candidates: Option<Vec<RawWidth>>,
    #[serde(default)]
    chosen: std::collections::BTreeMap<String, RawWidth>,
    #[serde(default)]
    score: PrecisionScore,
}

/// What a job does with NaN and infinite weights in a tensor it compresses.
#[derive(Deserialize, Clone, Copy, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum NonFinite {
    /// Fail the tensor's task, naming it (the default).
    Refuse,
    /// Store the rows holding them unchanged.
    Keep,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShare {
    cosine: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGates {
    max_rel_error: Option<f64>,
    min_cosine: Option<f64>,
    min_snr_db: Option<f64>,
    min_embedding_cosine: Option<f64>,
    min_top1: Option<f64>,
    max_kld: Option<f64>,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> RecipeError {
    RecipeError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

mod passes;
use passes::RawPass;

fn convert_mixed_precision(
    raw: RawMixedPrecision,
    passes: &[PassSpec],
) -> Result<MixedPrecision, RecipeError> {
    let target = raw.target_bpw;
    if !(target.is_finite() && target > 0.0 && target <= 32.0) {
        return Err(invalid(
            "mixed_precision.target_bpw",
            format!("{target} must be a number of bits per weight in (0, 32]"),
        ));
    }
    if !passes.iter().any(|p| p.kind.with_bits(4).is_some()) {
        return Err(invalid(
            "mixed_precision",
            "needs a quantize pass (rtn, hqq, gptq or awq) or a gguf pass whose width it chooses per tensor",
        ));
    }
    let gguf = passes
        .iter()
        .any(|p| matches!(p.kind, PassKind::Ggml { .. }));
    let candidates = match raw.candidates {
        None if gguf => Some(GGUF_WIDTHS.iter().map(|&b| Width::bits(b)).collect()),
        None => None,
        Some(candidates) if candidates.is_empty() => {
            return Err(invalid(
                "mixed_precision.candidates",
                "lists no width (leave it out for the format's default)",
            ))
        }
        Some(candidates) => {
            let mut widths: Vec<Width> = Vec::with_capacity(candidates.len());
            for (i, raw) in candidates.into_iter().enumerate() {
                let field = || format!("mixed_precision.candidates[{i}]");
                let width = raw.parse().map_err(|reason| invalid(field(), reason))?;
                if gguf {
                    gguf_width(width).map_err(|reason| invalid(field(), reason))?;
                }
                if widths.contains(&width) {
                    return Err(invalid(field(), format!("{width} is listed twice")));
                }
                widths.push(width);
            }
            Some(widths)
        }
    };
    let mut chosen = std::collections::BTreeMap::new();
    for (name, raw) in raw.chosen {
        let field = || format!("mixed_precision.chosen[{name:?}]");
        let width = raw.parse().map_err(|reason| invalid(field(), reason))?;
        if gguf {
            gguf_width(width).map_err(|reason| invalid(field(), reason))?;
        }
        chosen.insert(name, width);
    }
    Ok(MixedPrecision {
        target_bpw: target,
        candidates,
        chosen,
        score: raw.score,
    })
}

/// The widths a `gguf` pass's tensors may get: Q4_K, Q5_K, Q6_K and Q8_0.
pub const GGUF_WIDTHS: [u8; 4] = [4, 5, 6, 8];

/// Checks that a `gguf` pass has a block type for `width`.
fn gguf_width(width: Width) -> Result<(), String> {
    if width.granularity.is_some() || crate::gguf::GgmlType::for_width(width.bits).is_none() {
        return Err(format!(
            "{width} is not a width of a gguf pass: its widths are 4 (Q4_K), 5 (Q5_K), 6 (Q6_K) and 8 (Q8_0)"
        ));
    }
    Ok(())
}

/// Parses `yaml`, lets `edit` change its `mixed_precision` mapping (created if absent), and
/// writes it back.
fn edit_mixed_precision(
    yaml: &str,
    edit: impl FnOnce(&mut serde_norway::Mapping),
) -> Result<String, RecipeError> {
    check_recipe_shape(yaml)?;
    let yaml_error = |e: serde_norway::Error| RecipeError::Yaml {
        message: e.to_string(),
        line: e.location().map(|l| l.line()),
        column: e.location().map(|l| l.column()),
    };
    let mut document: serde_norway::Value = serde_norway::from_str(yaml).map_err(yaml_error)?;
    let root = document
        .as_mapping_mut()
        .ok_or_else(|| invalid("(the recipe)", "is not a mapping of fields"))?;
    let key = serde_norway::Value::from("mixed_precision");
    let section = root
        .entry(key)
        .or_insert_with(|| serde_norway::Value::Mapping(Default::default()));
    let section = section
        .as_mapping_mut()
        .ok_or_else(|| invalid("mixed_precision", "is not a mapping of fields"))?;
    edit(section);
    serde_norway::to_string(&document).map_err(yaml_error)
}

fn convert_gates(raw: Option<RawGates>) -> Result<Gates, RecipeError> {
    let Some(raw) = raw else {
        return Ok(Gates::default());
    };
    if let Some(v) = raw.max_rel_error {
        if !(v.is_finite() && v > 0.0) {
            return Err(invalid(
                "gates.max_rel_error",
                format!("{v} must be a positive number"),
            ));
        }
    }
    if let Some(v) = raw.min_cosine {
        if !(-1.0..=1.0).contains(&v) {
            return Err(invalid(
                "gates.min_cosine",
                format!("{v} is outside [-1, 1]"),
            ));
        }
    }
    if let Some(v) = raw.min_snr_db {
        if !v.is_finite() {
            return Err(invalid("gates.min_snr_db", format!("{v} must be finite")));
        }
    }
    if let Some(v) = raw.min_embedding_cosine {
        if !(-1.0..=1.0).contains(&v) {
            return Err(invalid(
                "gates.min_embedding_cosine",
                format!("{v} is outside [-1, 1]"),
            ));
        }
    }
    if let Some(v) = raw.min_top1 {
        if !(0.0..=1.0).contains(&v) {
            return Err(invalid(
                "gates.min_top1",
                format!("{v} is outside [0, 1] (a fraction of tokens)"),
            ));
        }
    }
    if let Some(v) = raw.max_kld {
        if !(v.is_finite() && v >= 0.0) {
            return Err(invalid(
                "gates.max_kld",
                format!("{v} must be a non-negative number (nats)"),
            ));
        }
    }
    Ok(Gates {
        max_rel_error: raw.max_rel_error,
        min_cosine: raw.min_cosine,
        min_snr_db: raw.min_snr_db,
        min_embedding_cosine: raw.min_embedding_cosine,
        min_top1: raw.min_top1,
        max_kld: raw.max_kld,
    })
}

/// Tensors the built-in recipes compress: the Linear weights of the language model, as
/// llm-compressor's recipes do; not token or position embeddings (GPT-2's `wte`/`wpe`), the
/// output head, norms, MoE router gates (`mlp.gate`, `block_sparse_moe.gate`, `router`,
/// `shared_expert_gate`) or a vision tower and its projector. 1-D tensors are always stored
/// unchanged.
macro_rules! weights {
    () => {
        "    targets: ['re:.*\\.weight$']\n    ignore: ['re:(?i).*(embed|lm_head|norm|wte|wpe|router|shared_expert_gate|vision|visual|mm_projector|multi_modal_projector).*', 're:.*\\.gate\\.weight$']\n"
    };
}

/// Tensors the GGUF presets quantize: every `.weight` (the embeddings and output too, as
/// `llama-quantize` does; 1-D norms stay F32).
macro_rules! gguf_weights {
    () => {
        "    targets: ['re:.*\\.weight$']\n"
    };
}

/// The built-in recipes: (name, YAML).
const PRESETS: [(&str, &str); 29] = [
    ("int8", concat!("name: int8\npasses:\n  - quantize: { bits: 8, granularity: channel }\n", weights!())),
    ("int8-g128", concat!("name: int8-g128\npasses:\n  - quantize: { bits: 8, granularity: group, group_size: 128 }\n", weights!())),
    ("int4-g128", concat!("name: int4-g128\npasses:\n  - quantize: { bits: 4, granularity: group, group_size: 128 }\n", weights!())),
    ("int4-g128-asym", concat!("name: int4-g128-asym\npasses:\n  - quantize: { bits: 4, symmetric: false, granularity: group, group_size: 128 }\n", weights!())),
    ("w4a16", concat!("name: w4a16\npasses:\n  - quantize: { bits: 4, granularity: group, group_size: 128 }\n", weights!())),
    ("w4a16-asym", concat!("name: w4a16-asym\npasses:\n  - quantize: { bits: 4, symmetric: false, granularity: group, group_size: 128 }\n", weights!())),
    ("w8a16", concat!("name: w8a16\npasses:\n  - quantize: { bits: 8, granularity: channel }\n", weights!())),
    ("w4a16-hqq", concat!("name: w4a16-hqq\npasses:\n  - quantize: { method: hqq, bits: 4, granularity: group, group_size: 128, zero_point: integer }\n", weights!())),
    ("hqq4", concat!("name: hqq4\npasses:\n  - quantize: { method: hqq, bits: 4, granularity: group, group_size: 64 }\n", weights!())),
    ("hqq3", concat!("name: hqq3\npasses:\n  - quantize: { method: hqq, bits: 3, granularity: group, group_size: 64 }\n", weights!())),
    ("nf4", concat!("name: nf4\npasses:\n  - codebook: { method: nf4, granularity: group, group_size: 64 }\n", weights!())),
    ("kmeans4", concat!("name: kmeans4\npasses:\n  - codebook: { method: kmeans, bits: 4 }\n", weights!())),
    ("fp8", concat!("name: fp8\npasses:\n  - fp8: { granularity: channel }\n", weights!())),
    ("2of4", concat!("name: 2of4\npasses:\n  - prune: { method: nm, n: 2, m: 4 }\n", weights!())),
    ("2of4-int4", concat!("name: 2of4-int4\npasses:\n  - prune: { method: nm, n: 2, m: 4 }\n", weights!(), "  - quantize: { bits: 4, granularity: group, group_size: 64 }\n", weights!())),
    // Groups of 64 kept values are the groups of 128 columns of the dense row.
    ("2of4-w4a16", concat!("name: 2of4-w4a16\npasses:\n  - prune: { method: nm, n: 2, m: 4 }\n", weights!(), "  - quantize: { bits: 4, granularity: group, group_size: 64 }\n", weights!())),
    ("svd50", concat!("name: svd50\npasses:\n  - lowrank: { storage: 0.5 }\n", weights!())),
    ("dct25", concat!("name: dct25\npasses:\n  - dct: { block: 64, keep: 0.25 }\n", weights!())),
    ("q8_0", concat!("name: q8_0\nformat: gguf\npasses:\n  - gguf: { type: q8_0 }\n", gguf_weights!())),
    ("q4_0", concat!("name: q4_0\nformat: gguf\npasses:\n  - gguf: { type: q4_0 }\n", gguf_weights!())),
    ("q4_k_m", concat!("name: q4_k_m\nformat: gguf\npasses:\n  - gguf: { type: q4_k_m }\n", gguf_weights!())),
    ("q6_k", concat!("name: q6_k\nformat: gguf\npasses:\n  - gguf: { type: q6_k }\n", gguf_weights!())),
    ("lossless", "name: lossless\nformat: spz\npasses: []\n"),
    // Calibrated (they need --calibration): llm-compressor's GPTQ W4A16 schemes, and the
    // calibrated counterparts of the data-free 2of4 and int4 presets.
    ("gptq-w4a16", concat!("name: gptq-w4a16\npasses:\n  - quantize: { method: gptq, bits: 4, granularity: group, group_size: 128 }\n", weights!())),
    ("gptq-w4a16-asym", concat!("name: gptq-w4a16-asym\npasses:\n  - quantize: { method: gptq, bits: 4, symmetric: false, granularity: group, group_size: 128 }\n", weights!())),
    ("gptq-w8a16", concat!("name: gptq-w8a16\npasses:\n  - quantize: { method: gptq, bits: 8, granularity: channel }\n", weights!())),
    ("awq-w4a16-asym", concat!("name: awq-w4a16-asym\npasses:\n  - quantize: { method: awq, bits: 4, symmetric: false, granularity: group, group_size: 128 }\n", weights!())),
    ("sparsegpt-2of4", concat!("name: sparsegpt-2of4\npasses:\n  - prune: { method: sparsegpt, n: 2, m: 4 }\n", weights!())),
    ("wanda-2of4", concat!("name: wanda-2of4\npasses:\n  - prune: { method: wanda, n: 2, m: 4 }\n", weights!())),
];

impl Recipe {
    /// Parses and validates a recipe; keeps `yaml` in `source_yaml`.
    pub fn from_yaml(yaml: &str) -> Result<Recipe, RecipeError> {
        check_recipe_shape(yaml)?;
        let raw: RawRecipe = serde_norway::from_str(yaml).map_err(|e| {
            let loc = e.location();
            RecipeError::Yaml {
                message: e.to_string(),
                line: loc.as_ref().map(|l| l.line()),
                column: loc.as_ref().map(|l| l.column()),
            }
        })?;
        let passes = raw
            .passes
            .into_iter()
            .enumerate()
            .map(|(i, p)| passes::convert_pass(i, p))
            .collect::<Result<Vec<_>, _>>()?;
        let global: Vec<usize> = passes
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                matches!(
                    p.kind,
                    PassKind::Prune(PruneConfig::Magnitude { global: true, .. })
                )
            })
            .map(|(i, _)| i)
            .collect();
        if global.len() > 1 {
            return Err(invalid(
                format!("passes[{}].prune.scope", global[1]),
                format!(
                    "only one global magnitude target per recipe (passes[{}] has one already)",
                    global[0]
                ),
            ));
        }
        let format = raw.format.unwrap_or_default();
        if passes.is_empty() && format != OutputFormat::Spz {
            return Err(invalid(
                "passes",
                "at least one pass is required (a recipe without passes only makes sense with \
                 format: spz, where the lossless entropy stage still shrinks the model)",
            ));
        }
        let share_cosine = match raw.share {
            Some(RawShare { cosine }) if !(cosine > 0.0 && cosine <= 1.0) => {
                return Err(invalid(
                    "share.cosine",
                    format!("{cosine} is outside (0, 1]; near-identical means e.g. 0.999"),
                ))
            }
            share => share.map(|s| s.cosine),
        };
        let mixed_precision = match raw.mixed_precision {
            Some(raw) => Some(convert_mixed_precision(raw, &passes)?),
            None => None,
        };
        Ok(Recipe {
            name: raw.name.unwrap_or_else(|| "custom".to_owned()),
            format,
            passes,
            gates: convert_gates(raw.gates)?,
            share_cosine,
            keep_non_finite_rows: raw.non_finite == Some(NonFinite::Keep),
            mixed_precision,
            source_yaml: yaml.to_owned(),
        })
    }

    /// `yaml` with `mixed_precision.target_bpw` set to `target_bpw` (the CLI's
    /// `--target-bpw`), checked by parsing the result.
    pub fn with_target_bpw(yaml: &str, target_bpw: f64) -> Result<String, RecipeError> {
        let edited = edit_mixed_precision(yaml, |section| {
            section.insert("target_bpw".into(), target_bpw.into());
        })?;
        Recipe::from_yaml(&edited)?;
        Ok(edited)
    }

    /// This recipe with `mixed_precision.chosen` set to `widths` (the measuring round's
    /// choice).
    pub fn with_chosen_widths(
        &self,
        widths: &std::collections::BTreeMap<String, Width>,
    ) -> Result<Recipe, RecipeError> {
        let edited = edit_mixed_precision(&self.source_yaml, |section| {
            let chosen: serde_norway::Mapping = (widths.iter())
                .map(|(name, w)| (name.as_str().into(), w.to_yaml()))
                .collect();
            section.insert("chosen".into(), serde_norway::Value::Mapping(chosen));
        })?;
        Recipe::from_yaml(&edited)
    }

    /// True when the job must measure its quantized tensors' candidate widths before it
    /// compresses: the recipe has a bit budget and no choice yet.
    pub fn needs_precision_choice(&self) -> bool {
        self.mixed_precision
            .as_ref()
            .is_some_and(|m| m.chosen.is_empty())
    }

    /// The sparsity of the recipe's global magnitude prune, if it has one: such a job first
    /// measures every targeted tensor's magnitudes, then compresses.
    pub fn global_sparsity(&self) -> Option<f64> {
        self.passes.iter().find_map(|p| match p.kind {
            PassKind::Prune(PruneConfig::Magnitude {
                sparsity,
                global: true,
            }) => Some(sparsity),
            _ => None,
        })
    }

    /// The calibrated methods the recipe uses (empty: a data-free recipe).
    pub fn calibrated_methods(&self) -> Vec<Calibrated> {
        let mut methods: Vec<Calibrated> = Vec::new();
        for method in self.passes.iter().filter_map(|p| p.calibrated) {
            if !methods.contains(&method) {
                methods.push(method);
            }
        }
        methods
    }

    /// True when some pass needs calibration data.
    pub fn needs_calibration(&self) -> bool {
        self.passes.iter().any(|p| p.calibrated.is_some())
    }

    /// True when the recipe gates the function-space evaluation.
    pub fn has_function_gates(&self) -> bool {
        let g = &self.gates;
        g.min_embedding_cosine.is_some() || g.min_top1.is_some() || g.max_kld.is_some()
    }

    /// The calibrated method of the pass that applies `kind` to `tensor_name`, if any.
    pub fn calibrated_for(&self, tensor_name: &str) -> Option<(Calibrated, &PassKind)> {
        self.passes
            .iter()
            .filter(|p| p.targets.iter().any(|m| m.matches(tensor_name)))
            .filter(|p| !p.ignore.iter().any(|m| m.matches(tensor_name)))
            .find_map(|p| p.calibrated.map(|c| (c, &p.kind)))
    }

    /// A built-in recipe by name (see [`Recipe::preset_names`]).
    pub fn preset(name: &str) -> Option<Recipe> {
        let (_, yaml) = PRESETS.iter().find(|(n, _)| *n == name)?;
        Recipe::from_yaml(yaml).ok()
    }

    /// Names of the built-in recipes.
    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|(n, _)| *n).collect()
    }

    /// True when this is a built-in recipe, unchanged but for a bit budget
    /// (`mixed_precision`, e.g. from `--target-bpw`).
    pub fn is_builtin(&self) -> bool {
        let Some(preset) = Recipe::preset(&self.name) else {
            return false;
        };
        if preset.source_yaml == self.source_yaml {
            return true;
        }
        let without_budget = |yaml: &str| {
            let mut value: serde_norway::Value = serde_norway::from_str(yaml).ok()?;
            value.as_mapping_mut()?.remove("mixed_precision");
            Some(value)
        };
        without_budget(&self.source_yaml)
            .is_some_and(|v| Some(v) == without_budget(&preset.source_yaml))
    }

    /// The `targets` and `ignore` entries that select none of `names` (a typo, or a module
    /// or class name the model does not have), in recipe order.
    pub fn unmatched<'a>(&self, names: impl Iterator<Item = &'a str>) -> Vec<Unmatched> {
        let entries: Vec<(usize, &'static str, &Matcher)> = (self.passes.iter().enumerate())
            .flat_map(|(i, p)| {
                let targets = p.targets.iter().map(move |m| (i, "targets", m));
                targets.chain(p.ignore.iter().map(move |m| (i, "ignore", m)))
            })
            .collect();
        let mut hit = vec![false; entries.len()];
        for name in names {
            for (seen, (_, _, m)) in hit.iter_mut().zip(&entries) {
                *seen = *seen || m.matches(name);
            }
        }
        entries
            .iter()
            .zip(hit)
            .filter(|(_, hit)| !hit)
            .map(|(&(i, list, m), _)| Unmatched {
                pass: i + 1,
                pass_name: self.passes[i].kind.describe_long(),
                list,
                pattern: m.pattern(),
            })
            .collect()
    }

    /// The passes that apply to `tensor_name` (a target matches, no ignore does), in order.
    pub fn passes_for(&self, tensor_name: &str) -> Vec<&PassKind> {
        self.passes
            .iter()
            .filter(|p| p.targets.iter().any(|m| m.matches(tensor_name)))
            .filter(|p| !p.ignore.iter().any(|m| m.matches(tensor_name)))
            .map(|p| &p.kind)
            .collect()
    }

    /// One line, e.g. `"int4-g128: quantize 4-bit sym group 128"`.
    pub fn describe(&self) -> String {
        let passes: Vec<String> = (self.passes.iter())
            .map(|p| match p.calibrated {
                Some(method) => method.describe(&p.kind),
                None => p.kind.describe_long(),
            })
            .collect();
        let passes = if passes.is_empty() {
            "no lossy pass (entropy coding only)".to_owned()
        } else {
            passes.join(", then ")
        };
        let mut line = format!("{}: {}", self.name, passes);
        if let Some(mixed) = &self.mixed_precision {
            // The default candidates depend on the job's output format, not known here.
            let widths = match &mixed.candidates {
                Some(c) => {
                    let c: Vec<String> = c.iter().map(Width::to_string).collect();
                    format!("widths of {} bits", c.join("/"))
                }
                None => "widths".to_string(),
            };
            line.push_str(&format!(
                "; {widths} mixed to {} bits/weight",
                mixed.target_bpw
            ));
        }
        if let Some(c) = self.share_cosine {
            line.push_str(&format!(
                "; tensors with cosine >= {c} to an earlier one stored once"
            ));
        }
        if self.format != OutputFormat::default() {
            line.push_str(&format!(" [{}]", self.format.as_str()));
        }
        let gates = self.gates.describe();
        if !gates.is_empty() {
            line.push_str(&format!(" (gates: {gates})"));
        }
        line
    }
}

impl Gates {
    /// Comma-separated thresholds that are set, e.g. `"rel_error <= 0.2, cosine >= 0.98"`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(v) = self.max_rel_error {
            parts.push(format!("rel_error <= {v}"));
        }
        if let Some(v) = self.min_cosine {
            parts.push(format!("cosine >= {v}"));
        }
        if let Some(v) = self.min_snr_db {
            parts.push(format!("snr >= {v} dB"));
        }
        if let Some(v) = self.min_embedding_cosine {
            parts.push(format!("embedding cosine >= {v}"));
        }
        if let Some(v) = self.min_top1 {
            parts.push(format!("top-1 agreement >= {v}"));
        }
        if let Some(v) = self.max_kld {
            parts.push(format!("KL divergence <= {v}"));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests;
