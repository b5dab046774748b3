//! The GGUF tokenizer metadata of a byte-level BPE (GPT-2 style) Hugging Face tokenizer, as
//! llama.cpp's `convert_hf_to_gguf.py` writes it (`_set_vocab_gpt2`: `get_vocab_base` and
//! gguf-py's `SpecialVocab`), from the parsed `tokenizer.json`, `tokenizer_config.json` and
//! `config.json`. Pure: the caller reads the files.
//!
//! Keys, in the converter's order: [`tokenizer.ggml.add_space_prefix` (llama arch, when
//! `tokenizer_config.json` has `add_prefix_space`)], `tokenizer.ggml.model` = "gpt2",
//! `tokenizer.ggml.pre`, `tokenizer.ggml.tokens` (ids `0..vocab_size`, missing ids as
//! `[PAD{i}]`), `tokenizer.ggml.token_type` (i32: 1 normal, 3 control, 4 user-defined,
//! 5 unused), `tokenizer.ggml.merges` ("a b"), the special token ids (`bos_token_id`,
//! `eos_token_id`, `unknown_token_id`, `seperator_token_id` [sic], `padding_token_id`,
//! `mask_token_id`, `eot_token_id`, `eom_token_id`, u32), `add_bos_token` / `add_eos_token` /
//! `add_sep_token` (bool), `tokenizer.chat_template`, `tokenizer.ggml.normalizer.*`.
//!
//! Differences from the converter, all documented at the functions:
//! - `tokenizer.ggml.pre` is not found by hashing the token ids of a test string (that needs a
//!   full tokenizer) but from the pre-tokenizer's split regex: Llama 3's → "llama-bpe", Qwen2's
//!   → "qwen2", a plain GPT-2 `ByteLevel` → "gpt-2", anything else "default" (see
//!   [`detect_pre_tokenizer`]); the caller can override it.
//! - Added tokens marked `"normalized": false` are taken as they are; the converter round-trips
//!   them through `decode(encode(...))`, which leaves byte-level BPE special tokens unchanged.
//! - Special tokens that transformers would add on load because `tokenizer_config.json`
//!   names a token absent from the vocabulary are not added.
//!
//! Refused with typed errors: no `tokenizer.json` ([`GgufError::MissingTokenizer`]); a
//! SentencePiece `tokenizer.model`, a byte-fallback BPE (Llama 2 / Mistral `tokenizer.json`),
//! Unigram, WordPiece and other non-BPE models ([`GgufError::UnsupportedTokenizer`]).

use super::llama::Arch;
use super::writer::{MetaArray, MetaValue};
use super::GgufError;
use serde_json::{Map, Value};
use std::collections::HashMap;

/// `tokenizer.ggml.token_type` values (gguf-py `TokenType`).
pub const TOKEN_TYPE_NORMAL: i32 = 1;
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
pub const TOKEN_TYPE_CONTROL: i32 = 3;
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;
pub const TOKEN_TYPE_UNUSED: i32 = 5;
pub const TOKEN_TYPE_BYTE: i32 = 6;

/// The pre-tokenizer split regex of Llama 3's `tokenizer.json`.
pub const LLAMA3_PRE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The pre-tokenizer split regex of Qwen2/Qwen2.5/Qwen3's `tokenizer.json`.
pub const QWEN2_PRE_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer files of a model folder, parsed; `None` when absent.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenizerFiles<'a> {
    /// `tokenizer.json`.
    pub tokenizer_json: Option<&'a Value>,
    /// `tokenizer_config.json`.
    pub tokenizer_config: Option<&'a Value>,
    /// `config.json` (`bos_token_id`, `eos_token_id`, ... fill ids not found otherwise).
    pub config: Option<&'a Value>,
    /// `chat_template.jinja`, used when `tokenizer_config.json` has no `chat_template`.
    pub chat_template_jinja: Option<&'a str>,
    /// `chat_template.json`, used when neither of the above has a template.
    pub chat_template_json: Option<&'a Value>,
    /// Whether the folder has a SentencePiece `tokenizer.model` (the converter then builds a
    /// "llama" SentencePiece vocabulary, which is not supported).
    pub has_tokenizer_model: bool,
}

/// `tokenizer.ggml.pre` from `tokenizer.json`'s pre-tokenizer: "llama-bpe" when a `Split`
/// uses [`LLAMA3_PRE_REGEX`], "qwen2" for [`QWEN2_PRE_REGEX`], "gpt-2" for a lone `ByteLevel`
/// pre-tokenizer with its built-in GPT-2 regex (`use_regex` true), otherwise "default".
///
/// The converter instead hashes the ids of a fixed test string and knows ~100 hashes; for
/// the three families above the regex decides the pre-tokenization llama.cpp applies.
pub fn detect_pre_tokenizer(tokenizer_json: &Value) -> &'static str {
    let mut splits = Vec::new();
    let mut byte_level_regex = false;
    fn walk<'v>(p: &'v Value, splits: &mut Vec<&'v str>, byte_level_regex: &mut bool) {
        match p.get("type").and_then(Value::as_str) {
            Some("Sequence") => {
                for q in p
                    .get("pretokenizers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    walk(q, splits, byte_level_regex);
                }
            }
            Some("Split") => {
                if let Some(r) = p
                    .get("pattern")
                    .and_then(|pat| pat.get("Regex"))
                    .and_then(Value::as_str)
                {
                    splits.push(r);
                }
            }
            Some("ByteLevel") if p.get("use_regex").and_then(Value::as_bool).unwrap_or(true) => {
                *byte_level_regex = true;
            }
            _ => {}
        }
    }
    if let Some(p) = tokenizer_json.get("pre_tokenizer") {
        walk(p, &mut splits, &mut byte_level_regex);
    }
    if splits.contains(&LLAMA3_PRE_REGEX) {
        "llama-bpe"
    } else if splits.contains(&QWEN2_PRE_REGEX) {
        "qwen2"
    } else if splits.is_empty() && byte_level_regex {
        "gpt-2"
    } else {
        "default"
    }
}

/// Python truthiness of a JSON value.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// `d.get(key, {}).get('id')` of a template piece.
fn piece_id<'v>(piece: &'v Value, kind: &str) -> &'v Value {
    piece
        .get(kind)
        .and_then(|p| p.get("id"))
        .unwrap_or(&Value::Null)
}

fn bad(msg: impl Into<String>) -> GgufError {
    GgufError::BadTokenizer(msg.into())
}

/// An ordered map with Python dict semantics for the few keys used here.
#[derive(Default)]
struct Ordered<V> {
    entries: Vec<(String, V)>,
}

impl<V: Clone> Ordered<V> {
    fn get(&self, key: &str) -> Option<&V> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    fn set(&mut self, key: &str, v: V) {
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.entries.push((key.to_string(), v)),
        }
    }
    fn setdefault(&mut self, key: &str, v: V) {
        if self.get(key).is_none() {
            self.entries.push((key.to_string(), v));
        }
    }
}

/// gguf-py `SpecialVocab` (with `load_merges=True`, `n_vocab=None`): merges, special token
/// ids, add-special-token flags, chat template, normalizer flags.
struct SpecialVocab {
    merges: Vec<String>,
    ids: Ordered<u64>,
    add: Ordered<bool>,
    chat_template: Option<Value>,
    lowercase: Option<bool>,
    strip_accents: Option<bool>,
}

impl SpecialVocab {
    fn set_special(&mut self, typ: &str, id: &Value) -> Result<(), GgufError> {
        // Python: isinstance(tid, int) -- JSON integers only; negative ones are an error.
        if let Some(u) = id.as_u64() {
            self.ids.setdefault(typ, u);
        } else if let Some(i) = id.as_i64() {
            return Err(bad(format!(
                "invalid value for special token type {typ}: {i}"
            )));
        }
        Ok(())
    }

    fn parse_normalizer(&mut self, n: &Value) {
        match n.get("type").and_then(Value::as_str) {
            Some("Lowercase") => self.lowercase = Some(true),
            Some("StripAccents") => self.strip_accents = Some(true),
            Some("BertNormalizer") => {
                if let Some(v) = n.get("lowercase") {
                    self.lowercase = v.as_bool();
                }
                if let Some(v) = n.get("strip_accents") {
                    self.strip_accents = v.as_bool();
                }
            }
            Some("Sequence") => {
                for m in n
                    .get("normalizers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    self.parse_normalizer(m);
                }
            }
            _ => {}
        }
    }

    fn load(files: &TokenizerFiles, tj: &Value) -> Result<SpecialVocab, GgufError> {
        let mut sv = SpecialVocab {
            merges: vec![],
            ids: Ordered::default(),
            add: Ordered::default(),
            chat_template: None,
            lowercase: None,
            strip_accents: None,
        };
        // Merges: strings as they are, or [a, b] pairs joined with a space (a space inside a
        // part encoded as U+0120, as gguf-py does).
        match tj.get("model").and_then(|m| m.get("merges")) {
            Some(Value::Array(merges)) if !merges.is_empty() => {
                if merges[0].is_string() {
                    for m in merges {
                        sv.merges.push(
                            m.as_str()
                                .ok_or_else(|| bad("merges mix strings and other values"))?
                                .to_string(),
                        );
                    }
                } else if merges[0]
                    .as_array()
                    .is_some_and(|p| p.len() == 2 && p[0].is_string())
                {
                    for m in merges {
                        let pair = m
                            .as_array()
                            .filter(|p| p.len() == 2)
                            .ok_or_else(|| bad(format!("merge {m} is not a pair")))?;
                        let part = |v: &Value| -> Result<String, GgufError> {
                            let s = v.as_str().ok_or_else(|| {
                                bad(format!("merge {m} is not a pair of strings"))
                            })?;
                            Ok(s.chars()
                                .map(|c| if c == ' ' { '\u{0120}' } else { c })
                                .collect())
                        };
                        sv.merges
                            .push(format!("{} {}", part(&pair[0])?, part(&pair[1])?));
                    }
                } else {
                    return Err(bad("unknown tokenizer merges format"));
                }
            }
            _ => {}
        }
        if let Some(n) = tj.get("normalizer").filter(|n| truthy(n)) {
            sv.parse_normalizer(n);
        }
        let added_tokens: &[Value] = tj
            .get("added_tokens")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut tc: Option<Map<String, Value>> = match files.tokenizer_config {
            None => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(_) => return Err(bad("tokenizer_config.json is not a JSON object")),
        };
        let tc_truthy =
            |tc: &Option<Map<String, Value>>| tc.as_ref().is_some_and(|m| !m.is_empty());
        let tc_get = |tc: &Option<Map<String, Value>>, k: &str| -> Value {
            tc.as_ref()
                .and_then(|m| m.get(k))
                .cloned()
                .unwrap_or(Value::Null)
        };
        let mut types: Vec<&str> = vec!["bos", "eos", "unk", "sep", "pad", "cls", "mask"];
        let mut special_bos = tc_get(&tc, "bos_token");
        let mut special_cls = tc_get(&tc, "cls_token");
        let mut special_eos = tc_get(&tc, "eos_token");
        let mut special_sep = tc_get(&tc, "sep_token");
        if !truthy(&special_bos) && truthy(&special_cls) && tc_truthy(&tc) {
            special_bos = special_cls.clone();
            tc.as_mut()
                .unwrap()
                .insert("bos_token".into(), special_bos.clone());
        }
        if !truthy(&special_eos) && truthy(&special_sep) && tc_truthy(&tc) {
            special_eos = special_sep.clone();
            tc.as_mut()
                .unwrap()
                .insert("eos_token".into(), special_eos.clone());
        }
        if let Some(pp) = tj.get("post_processor").filter(|p| truthy(p)) {
            let single = [pp.clone()];
            let processors: &[Value] = match pp.get("processors") {
                Some(Value::Array(a)) => a,
                Some(_) => return Err(bad("post_processor.processors is not a list")),
                None => &single,
            };
            for p in processors {
                match p.get("type").and_then(Value::as_str) {
                    Some("ByteLevel") => {
                        sv.add.setdefault("bos", false);
                        sv.add.setdefault("eos", false);
                    }
                    Some("RobertaProcessing") => {
                        sv.add.set("bos", true);
                        sv.add.set("eos", true);
                        sv.add.set("sep", true);
                        if !truthy(&special_cls) && tc_truthy(&tc) {
                            special_cls = p
                                .get("cls")
                                .and_then(|c| c.get(0))
                                .cloned()
                                .unwrap_or_else(|| special_bos.clone());
                            tc.as_mut()
                                .unwrap()
                                .insert("cls_token".into(), special_cls.clone());
                        }
                        if !truthy(&special_sep) && tc_truthy(&tc) {
                            special_sep = p
                                .get("sep")
                                .and_then(|c| c.get(0))
                                .cloned()
                                .unwrap_or_else(|| special_eos.clone());
                            tc.as_mut()
                                .unwrap()
                                .insert("sep_token".into(), special_sep.clone());
                        }
                    }
                    Some("TemplateProcessing") => {
                        let empty = vec![];
                        let tmpl_single =
                            p.get("single").and_then(Value::as_array).unwrap_or(&empty);
                        let tmpl_pair = p.get("pair").and_then(Value::as_array).unwrap_or(&empty);
                        let mut special_first = Value::Null;
                        let mut special_last = Value::Null;
                        if tmpl_single.len() > 1 {
                            special_first = piece_id(&tmpl_single[0], "SpecialToken").clone();
                            if truthy(&special_first) {
                                if !tc_truthy(&tc) {
                                    special_bos = special_first.clone();
                                } else if special_first != special_bos
                                    && special_first != special_cls
                                {
                                    if !truthy(&special_bos) {
                                        special_bos = special_first.clone();
                                        tc.as_mut()
                                            .unwrap()
                                            .insert("bos_token".into(), special_bos.clone());
                                    }
                                    if !truthy(&special_cls) {
                                        special_cls = special_first.clone();
                                        tc.as_mut()
                                            .unwrap()
                                            .insert("cls_token".into(), special_cls.clone());
                                    }
                                }
                                let known =
                                    special_first == special_bos || special_first == special_cls;
                                sv.add.set("bos", known);
                            }
                            special_last =
                                piece_id(&tmpl_single[tmpl_single.len() - 1], "SpecialToken")
                                    .clone();
                            if truthy(&special_last) {
                                if !tc_truthy(&tc) {
                                    special_eos = special_last.clone();
                                } else if special_last != special_eos {
                                    let m = tc.as_mut().unwrap();
                                    if !types.contains(&"eot") {
                                        types.push("eot");
                                        m.insert("eot_token".into(), special_eos.clone());
                                    } else if !types.contains(&"eom") {
                                        types.push("eom");
                                        m.insert("eom_token".into(), special_eos.clone());
                                    }
                                    special_eos = special_last.clone();
                                    m.insert("eos_token".into(), special_eos.clone());
                                }
                                sv.add.set("eos", special_last == special_eos);
                            }
                        }
                        if !tmpl_pair.is_empty() {
                            let start = usize::from(
                                truthy(&special_first)
                                    && *piece_id(&tmpl_pair[0], "SpecialToken") == special_first,
                            );
                            let stop_trim = truthy(&special_last)
                                && *piece_id(&tmpl_pair[tmpl_pair.len() - 1], "SpecialToken")
                                    == special_last;
                            let end = tmpl_pair.len() - usize::from(stop_trim);
                            let sliced = if start < end {
                                &tmpl_pair[start..end]
                            } else {
                                &[][..]
                            };
                            if !sliced.is_empty() {
                                let a = piece_id(&sliced[0], "Sequence");
                                let b = piece_id(&sliced[sliced.len() - 1], "Sequence");
                                let mid = if sliced.len() >= 2 {
                                    &sliced[1..sliced.len() - 1]
                                } else {
                                    &[][..]
                                };
                                if a.as_str() == Some("A")
                                    && b.as_str() == Some("B")
                                    && !mid.is_empty()
                                {
                                    let mut add_sep = false;
                                    let e = piece_id(&mid[0], "SpecialToken");
                                    if truthy(e)
                                        && (*e == special_sep || *e == special_eos)
                                        && !truthy(&special_last)
                                    {
                                        add_sep = true;
                                    }
                                    if mid.len() == 2 {
                                        let e2 = piece_id(&mid[1], "SpecialToken");
                                        if truthy(e2) && (*e2 == special_sep || *e2 == special_eos)
                                        {
                                            add_sep = true;
                                        }
                                    }
                                    sv.add.set("sep", add_sep);
                                    if add_sep && !truthy(&special_sep) && tc_truthy(&tc) {
                                        tc.as_mut()
                                            .unwrap()
                                            .insert("sep_token".into(), special_eos.clone());
                                    }
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if tc_truthy(&tc) {
            let tc = tc.as_ref().unwrap();
            let alt = match (files.chat_template_jinja, files.chat_template_json) {
                (Some(j), _) => Some(Value::String(j.to_string())),
                (None, Some(json)) => {
                    Some(json.get("chat_template").cloned().unwrap_or(Value::Null))
                }
                (None, None) => None,
            };
            let template = match tc.get("chat_template") {
                Some(t) => Some(t.clone()),
                None => alt,
            };
            // Only strings and lists are kept ("Bad type ... ignoring" otherwise).
            sv.chat_template = template.filter(|t| t.is_string() || t.is_array());
            for typ in types.iter().copied() {
                if let Some(Value::Bool(b)) = tc.get(&format!("add_{typ}_token")) {
                    sv.add.setdefault(typ, *b);
                }
                let content = match tc.get(&format!("{typ}_token")) {
                    Some(Value::String(s)) => s.as_str(),
                    Some(Value::Object(o)) => match o.get("content") {
                        Some(Value::String(s)) => s.as_str(),
                        _ => continue,
                    },
                    _ => continue,
                };
                let id = added_tokens
                    .iter()
                    .find(|t| t.get("content").and_then(Value::as_str) == Some(content))
                    .and_then(|t| t.get("id"))
                    .cloned()
                    .unwrap_or(Value::Null);
                sv.set_special(typ, &id)?;
            }
        }
        if let Some(config) = files.config {
            for typ in types.iter().copied() {
                let key = format!("{typ}_token_id");
                let mut id = config.get(&key).cloned().unwrap_or(Value::Null);
                if id.is_null() {
                    if let Some(tc) = config.get("text_config") {
                        id = tc.get(&key).cloned().unwrap_or(Value::Null);
                    }
                }
                sv.set_special(typ, &id)?;
            }
        }
        Ok(sv)
    }

    /// gguf-py `SpecialVocab.add_to_gguf`.
    fn write(&self, out: &mut Vec<(String, MetaValue)>) -> Result<(), GgufError> {
        if !self.merges.is_empty() {
            out.push((
                "tokenizer.ggml.merges".into(),
                MetaValue::Array(MetaArray::String(self.merges.clone())),
            ));
        }
        for (typ, id) in &self.ids.entries {
            let key = match typ.as_str() {
                "bos" => "bos_token_id",
                "eos" => "eos_token_id",
                "unk" => "unknown_token_id",
                "sep" => "seperator_token_id",
                "pad" => "padding_token_id",
                "mask" => "mask_token_id",
                "eot" => "eot_token_id",
                "eom" => "eom_token_id",
                _ => continue, // cls: gguf-py has no handler and skips it
            };
            let id = u32::try_from(*id)
                .map_err(|_| bad(format!("special token {typ} id {id} does not fit in u32")))?;
            set_key(out, &format!("tokenizer.ggml.{key}"), MetaValue::U32(id));
        }
        for (typ, value) in &self.add.entries {
            if matches!(typ.as_str(), "bos" | "eos" | "sep") {
                set_key(
                    out,
                    &format!("tokenizer.ggml.add_{typ}_token"),
                    MetaValue::Bool(*value),
                );
            }
        }
        match &self.chat_template {
            Some(Value::String(t)) => {
                set_key(out, "tokenizer.chat_template", MetaValue::String(t.clone()));
            }
            Some(Value::Array(choices)) => {
                let mut default = None;
                let mut names = Vec::new();
                for choice in choices {
                    let name: String = choice
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                        .collect();
                    let Some(template) = choice.get("template").and_then(Value::as_str) else {
                        continue;
                    };
                    if name.is_empty() {
                        continue;
                    }
                    if name == "default" {
                        default = Some(template.to_string());
                    } else {
                        if !names.contains(&name) {
                            names.push(name.clone());
                        }
                        set_key(
                            out,
                            &format!("tokenizer.chat_template.{name}"),
                            MetaValue::String(template.to_string()),
                        );
                    }
                }
                if !names.is_empty() {
                    // gguf-py writes a Python set here (unordered); sorted for determinism.
                    names.sort();
                    set_key(
                        out,
                        "tokenizer.chat_templates",
                        MetaValue::Array(MetaArray::String(names)),
                    );
                }
                if let Some(t) = default {
                    set_key(out, "tokenizer.chat_template", MetaValue::String(t));
                }
            }
            _ => {}
        }
        if let Some(v) = self.lowercase {
            set_key(
                out,
                "tokenizer.ggml.normalizer.lowercase",
                MetaValue::Bool(v),
            );
        }
        if let Some(v) = self.strip_accents {
            set_key(
                out,
                "tokenizer.ggml.normalizer.strip_accents",
                MetaValue::Bool(v),
            );
        }
        Ok(())
    }
}

/// Sets `key`, in place when present (gguf-py overwrites a duplicated key's value).
fn set_key(out: &mut Vec<(String, MetaValue)>, key: &str, value: MetaValue) {
    match out.iter_mut().find(|(k, _)| k == key) {
        Some(e) => e.1 = value,
        None => out.push((key.to_string(), value)),
    }
}

/// An added token: `tokenizer.json` `added_tokens`, completed by `tokenizer_config.json`
/// `added_tokens_decoder`.
struct Added {
    content: String,
    special: bool,
}

/// The converter's "does_token_look_special".
fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<\u{ff5c}") && token.ends_with("\u{ff5c}>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// The tokenizer metadata of a byte-level BPE tokenizer for a model with `vocab_size`
/// embedding rows (the token list is padded with `[PAD{i}]` up to it), `tokenizer.ggml.pre`
/// from [`detect_pre_tokenizer`].
pub fn tokenizer_metadata(
    files: &TokenizerFiles,
    arch: Arch,
    vocab_size: u64,
) -> Result<Vec<(String, MetaValue)>, GgufError> {
    tokenizer_metadata_with_pre(files, arch, vocab_size, None)
}

/// [`tokenizer_metadata`] with `tokenizer.ggml.pre` given by the caller when `pre` is `Some`.
pub fn tokenizer_metadata_with_pre(
    files: &TokenizerFiles,
    arch: Arch,
    vocab_size: u64,
    pre: Option<&str>,
) -> Result<Vec<(String, MetaValue)>, GgufError> {
    if files.has_tokenizer_model {
        return Err(GgufError::UnsupportedTokenizer(
            "the model has a SentencePiece tokenizer.model (tokenizer.ggml.model \"llama\"); \
             only byte-level BPE tokenizer.json tokenizers (\"gpt2\") are supported"
                .into(),
        ));
    }
    let tj = files.tokenizer_json.ok_or_else(|| {
        GgufError::MissingTokenizer(
            "no tokenizer.json next to the model (needed for the GGUF vocabulary)".into(),
        )
    })?;
    let model = tj
        .get("model")
        .filter(|m| m.is_object())
        .ok_or_else(|| bad("tokenizer.json has no \"model\" object"))?;
    let model_type = model.get("type").and_then(Value::as_str).unwrap_or("");
    match model_type {
        "BPE" => {}
        "Unigram" => {
            return Err(GgufError::UnsupportedTokenizer(
                "SentencePiece Unigram tokenizer.json (tokenizer.ggml.model \"t5\"/\"llama\") \
                 is not supported; only byte-level BPE is"
                    .into(),
            ))
        }
        other => {
            return Err(GgufError::UnsupportedTokenizer(format!(
                "tokenizer.json model type {other:?} is not supported; only byte-level BPE is"
            )))
        }
    }
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let ignore_merges = model
        .get("ignore_merges")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let decoder_type = tj
        .get("decoder")
        .and_then(|d| d.get("type"))
        .and_then(Value::as_str);
    // LlamaModel tries gguf-py's LlamaHfVocab first: a byte-fallback BPE with a Sequence
    // decoder becomes a SentencePiece-style "llama" vocabulary.
    let llama3 = ignore_merges && !byte_fallback;
    if arch == Arch::Llama && !llama3 && byte_fallback && decoder_type == Some("Sequence") {
        return Err(GgufError::UnsupportedTokenizer(
            "byte-fallback BPE tokenizer.json (Llama 2 / Mistral style, tokenizer.ggml.model \
             \"llama\") is not supported; only byte-level BPE is"
                .into(),
        ));
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("tokenizer.json model has no \"vocab\" object"))?;

    // tokenizer.vocab (model vocabulary, added tokens on top) and the added tokens.
    let mut token_to_id: HashMap<&str, u64> = HashMap::with_capacity(vocab.len() + 64);
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("vocab id of {token:?} is {id}, not an integer")))?;
        token_to_id.insert(token.as_str(), id);
    }
    let mut added: HashMap<u64, Added> = HashMap::new();
    let mut added_vocab: HashMap<String, u64> = HashMap::new();
    for t in tj
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let id = t
            .get("id")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("added token {t} has no integer id")))?;
        let content = t
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("added token {t} has no content")))?;
        let special = t.get("special").and_then(Value::as_bool).unwrap_or(false);
        added.insert(
            id,
            Added {
                content: content.to_string(),
                special,
            },
        );
        added_vocab.insert(content.to_string(), id);
    }
    if let Some(decoder) = files
        .tokenizer_config
        .and_then(|tc| tc.get("added_tokens_decoder"))
        .and_then(Value::as_object)
    {
        for (id, t) in decoder {
            let Ok(id) = id.parse::<u64>() else { continue };
            let Some(content) = t.get("content").and_then(Value::as_str) else {
                continue;
            };
            if added.contains_key(&id) {
                continue;
            }
            let special = t.get("special").and_then(Value::as_bool).unwrap_or(false);
            added.insert(
                id,
                Added {
                    content: content.to_string(),
                    special,
                },
            );
            added_vocab.insert(content.to_string(), id);
        }
    }
    let mut added_sorted: Vec<(&u64, &Added)> = added.iter().collect();
    added_sorted.sort_by_key(|(id, _)| **id);
    for (id, a) in &added_sorted {
        token_to_id.insert(a.content.as_str(), **id);
    }
    if let Some(max) = token_to_id.values().max() {
        if *max >= vocab_size {
            return Err(bad(format!(
                "token id {max} is not below the model's vocab_size {vocab_size}"
            )));
        }
    }
    let n = usize::try_from(vocab_size).map_err(|_| bad("vocab_size too large"))?;
    let mut reverse: Vec<Option<&str>> = vec![None; n];
    for (token, id) in &token_to_id {
        reverse[*id as usize] = Some(token);
    }
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for (i, token) in reverse.iter().enumerate() {
        match token {
            None => {
                tokens.push(format!("[PAD{i}]"));
                types.push(TOKEN_TYPE_UNUSED);
            }
            Some(token) => {
                if added_vocab.contains_key(*token) {
                    let special = added.get(&(i as u64)).is_some_and(|a| a.special);
                    if special || looks_special(token) {
                        tokens.push(token.to_string());
                        types.push(TOKEN_TYPE_CONTROL);
                    } else {
                        tokens.push(token.replace('\u{2581}', " "));
                        types.push(TOKEN_TYPE_USER_DEFINED);
                    }
                } else {
                    tokens.push(token.to_string());
                    types.push(TOKEN_TYPE_NORMAL);
                }
            }
        }
    }

    let mut out: Vec<(String, MetaValue)> = Vec::new();
    if arch == Arch::Llama {
        if let Some(Value::Bool(b)) = files
            .tokenizer_config
            .and_then(|tc| tc.get("add_prefix_space"))
        {
            out.push((
                "tokenizer.ggml.add_space_prefix".into(),
                MetaValue::Bool(*b),
            ));
        }
    }
    out.push((
        "tokenizer.ggml.model".into(),
        MetaValue::String("gpt2".into()),
    ));
    let pre = pre.unwrap_or_else(|| detect_pre_tokenizer(tj));
    out.push(("tokenizer.ggml.pre".into(), MetaValue::String(pre.into())));
    out.push((
        "tokenizer.ggml.tokens".into(),
        MetaValue::Array(MetaArray::String(tokens)),
    ));
    out.push((
        "tokenizer.ggml.token_type".into(),
        MetaValue::Array(MetaArray::I32(types)),
    ));
    SpecialVocab::load(files, tj)?.write(&mut out)?;
    // LlamaModel.set_vocab: "granite small models" (vocab 49152) never add a BOS token.
    if arch == Arch::Llama && vocab_size == 49152 {
        set_key(
            &mut out,
            "tokenizer.ggml.add_bos_token",
            MetaValue::Bool(false),
        );
    }
    Ok(out)
}
