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
    pub passes: Vec<PassSpec>,
    pub gates: Gates,
    /// The YAML this recipe was parsed from (shipped to workers verbatim).
    pub source_yaml: String,
}

/// One pass and the tensors it applies to.
#[derive(Debug, Clone)]
pub struct PassSpec {
    pub kind: PassKind,
    pub targets: Vec<Matcher>,
    pub ignore: Vec<Matcher>,
}

/// What a pass does.
#[derive(Debug, Clone, PartialEq)]
pub enum PassKind {
    Quantize(QuantizeConfig),
}

/// Round-to-nearest quantization settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuantizeConfig {
    pub bits: u8,
    pub symmetric: bool,
    pub granularity: Granularity,
}

/// How many weights share one scale.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Granularity {
    /// One scale per row (output channel).
    Channel,
    /// One scale per run of this many weights within a row.
    Group(usize),
}

/// Quality thresholds checked against per-tensor metrics; `None` means unchecked.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Gates {
    pub max_rel_error: Option<f64>,
    pub min_cosine: Option<f64>,
    pub min_snr_db: Option<f64>,
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

    /// True when `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Matcher::Exact(s) => s == name,
            Matcher::Regex(re) => re.is_match(name),
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

impl PassKind {
    /// Short description, e.g. `"rtn int4 sym g128"` or `"rtn int8 asym per-channel"`.
    pub fn describe(&self) -> String {
        match self {
            PassKind::Quantize(q) => {
                let sym = if q.symmetric { "sym" } else { "asym" };
                let gran = match q.granularity {
                    Granularity::Channel => "per-channel".to_owned(),
                    Granularity::Group(g) => format!("g{g}"),
                };
                format!("rtn int{} {sym} {gran}", q.bits)
            }
        }
    }

    /// Longer description used by [`Recipe::describe`], e.g. `"quantize 4-bit sym group 128"`.
    fn describe_long(&self) -> String {
        match self {
            PassKind::Quantize(q) => {
                let sym = if q.symmetric { "sym" } else { "asym" };
                let gran = match q.granularity {
                    Granularity::Channel => "per-channel".to_owned(),
                    Granularity::Group(g) => format!("group {g}"),
                };
                format!("quantize {}-bit {sym} {gran}", q.bits)
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    name: Option<String>,
    passes: Vec<RawPass>,
    #[serde(default)]
    gates: Option<RawGates>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPass {
    quantize: Option<RawQuantize>,
    #[serde(default)]
    targets: Vec<String>,
    #[serde(default)]
    ignore: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum RawGranularity {
    Channel,
    Group,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuantize {
    bits: u8,
    #[serde(default = "default_symmetric")]
    symmetric: bool,
    granularity: RawGranularity,
    group_size: Option<usize>,
}

fn default_symmetric() -> bool {
    true
}

const DEFAULT_GROUP_SIZE: usize = 128;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGates {
    max_rel_error: Option<f64>,
    min_cosine: Option<f64>,
    min_snr_db: Option<f64>,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> RecipeError {
    RecipeError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn convert_quantize(field: &str, raw: RawQuantize) -> Result<QuantizeConfig, RecipeError> {
    if !(2..=8).contains(&raw.bits) {
        return Err(invalid(
            format!("{field}.bits"),
            format!("{} is outside 2..=8", raw.bits),
        ));
    }
    let granularity = match (raw.granularity, raw.group_size) {
        (RawGranularity::Channel, None) => Granularity::Channel,
        (RawGranularity::Channel, Some(_)) => {
            return Err(invalid(
                format!("{field}.group_size"),
                "only allowed with granularity: group",
            ))
        }
        (RawGranularity::Group, Some(0)) => {
            return Err(invalid(format!("{field}.group_size"), "must be at least 1"))
        }
        (RawGranularity::Group, size) => Granularity::Group(size.unwrap_or(DEFAULT_GROUP_SIZE)),
    };
    Ok(QuantizeConfig {
        bits: raw.bits,
        symmetric: raw.symmetric,
        granularity,
    })
}

fn convert_pass(index: usize, raw: RawPass) -> Result<PassSpec, RecipeError> {
    let field = format!("passes[{index}]");
    let Some(q) = raw.quantize else {
        return Err(invalid(&field, "a pass needs a kind (quantize)"));
    };
    let kind = PassKind::Quantize(convert_quantize(&format!("{field}.quantize"), q)?);
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
        targets: parse_all(&raw.targets)?,
        ignore: parse_all(&raw.ignore)?,
    })
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
    Ok(Gates {
        max_rel_error: raw.max_rel_error,
        min_cosine: raw.min_cosine,
        min_snr_db: raw.min_snr_db,
    })
}

/// Builds a preset's YAML at compile time: all `.weight` tensors except embeddings, the LM
/// head and norms.
macro_rules! preset_yaml {
    ($name:literal, $bits:literal, $sym:literal, $gran:literal) => {
        concat!(
            "name: ",
            $name,
            "\n",
            "passes:\n",
            "  - quantize: { bits: ",
            $bits,
            ", symmetric: ",
            $sym,
            ", ",
            $gran,
            " }\n",
            "    targets: ['re:.*\\.weight$']\n",
            "    ignore: ['re:.*(embed_tokens|lm_head|norm).*']\n",
        )
    };
}

const PRESETS: [(&str, &str); 4] = [
    (
        "int8",
        preset_yaml!("int8", "8", "true", "granularity: channel"),
    ),
    (
        "int4-g128",
        preset_yaml!(
            "int4-g128",
            "4",
            "true",
            "granularity: group, group_size: 128"
        ),
    ),
    (
        "int4-g128-asym",
        preset_yaml!(
            "int4-g128-asym",
            "4",
            "false",
            "granularity: group, group_size: 128"
        ),
    ),
    (
        "int8-g128",
        preset_yaml!(
            "int8-g128",
            "8",
            "true",
            "granularity: group, group_size: 128"
        ),
    ),
];

const PRESET_NAMES: [&str; 4] = ["int8", "int4-g128", "int4-g128-asym", "int8-g128"];

impl Recipe {
    /// Parses and validates a recipe; keeps `yaml` in `source_yaml`.
    pub fn from_yaml(yaml: &str) -> Result<Recipe, RecipeError> {
        let raw: RawRecipe = serde_norway::from_str(yaml).map_err(|e| {
            let loc = e.location();
            RecipeError::Yaml {
                message: e.to_string(),
                line: loc.as_ref().map(|l| l.line()),
                column: loc.as_ref().map(|l| l.column()),
            }
        })?;
        if raw.passes.is_empty() {
            return Err(invalid("passes", "at least one pass is required"));
        }
        let passes = raw
            .passes
            .into_iter()
            .enumerate()
            .map(|(i, p)| convert_pass(i, p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Recipe {
            name: raw.name.unwrap_or_else(|| "custom".to_owned()),
            passes,
            gates: convert_gates(raw.gates)?,
            source_yaml: yaml.to_owned(),
        })
    }

    /// A built-in recipe by name (see [`Recipe::preset_names`]).
    pub fn preset(name: &str) -> Option<Recipe> {
        let (_, yaml) = PRESETS.iter().find(|(n, _)| *n == name)?;
        Recipe::from_yaml(yaml).ok()
    }

    /// Names of the built-in recipes.
    pub fn preset_names() -> &'static [&'static str] {
        &PRESET_NAMES
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
        let passes: Vec<String> = self.passes.iter().map(|p| p.kind.describe_long()).collect();
        let mut line = format!("{}: {}", self.name, passes.join(", then "));
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
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests;
