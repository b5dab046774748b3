//! [`Tokenizer`]: a model's tokenizer.json through Hugging Face's `tokenizers` crate.
//!
//! Texts are encoded with the model's special tokens (`[CLS] … [SEP]` for BERT, the BOS token
//! for Llama) and truncated the way `tokenizers`' own truncation does it: the text's tokens
//! are cut so that they plus the special tokens fit `max_len`. Padding and truncation settings
//! stored in tokenizer.json (MiniLM's pads every text to 128) are dropped: each sequence is
//! processed alone, at its own length.

use tokenizers::{TruncationDirection, TruncationParams};

use crate::ModelError;

/// A loaded tokenizer.json.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Special tokens the post-processor adds to a single text.
    added_tokens: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("added_tokens", &self.added_tokens)
            .finish()
    }
}

impl Tokenizer {
    /// Parses tokenizer.json.
    pub fn from_bytes(tokenizer_json: &[u8]) -> Result<Tokenizer, ModelError> {
        let mut inner = tokenizers::Tokenizer::from_bytes(tokenizer_json).map_err(|error| {
            ModelError::Tokenizer(format!("tokenizer.json cannot be loaded: {error}"))
        })?;
        inner
            .with_truncation(None::<TruncationParams>)
            .map_err(|error| ModelError::Tokenizer(error.to_string()))?;
        inner.with_padding(None);
        let added_tokens = inner.get_post_processor().map_or(0, |processor| {
            tokenizers::PostProcessor::added_tokens(processor, false)
        });
        Ok(Tokenizer {
            inner,
            added_tokens,
        })
    }

    /// The ids of `text` with the model's special tokens, at most `max_len` of them.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Vec<u32>, ModelError> {
        if max_len <= self.added_tokens {
            return Err(ModelError::Tokenizer(format!(
                "max_len {max_len} leaves no room for text next to the {} special tokens",
                self.added_tokens
            )));
        }
        let mut encoding = self
            .inner
            .encode(text, false)
            .map_err(|error| ModelError::Tokenizer(format!("cannot encode text: {error}")))?;
        encoding.truncate(max_len - self.added_tokens, 0, TruncationDirection::Right);
        let encoding = self
            .inner
            .post_process(encoding, None, true)
            .map_err(|error| {
                ModelError::Tokenizer(format!("cannot add special tokens: {error}"))
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The id of a token string (e.g. "[CLS]"), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A Llama-3-style tokenizer.json: byte-level BPE behind Llama-3's split regex (with its
    /// look-ahead), and a BOS token added by a TemplateProcessing post-processor.
    fn llama3_style() -> Vec<u8> {
        let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .collect();
        alphabet.sort_unstable();
        let mut vocab: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
        vocab.extend(["he", "ll", "hell", "Ġw"].map(String::from));
        let bos = vocab.len();
        let vocab_map: serde_json::Map<String, serde_json::Value> = vocab
            .iter()
            .enumerate()
            .map(|(id, token)| (token.clone(), json!(id)))
            .collect();
        let pattern = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        let special = json!({"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos], "tokens": ["<|begin_of_text|>"]}});
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": bos, "content": "<|begin_of_text|>", "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
            "post_processor": {"type": "Sequence", "processors": [
                {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                 "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                          {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                 "special_tokens": special}]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
                "vocab": vocab_map, "merges": [["h", "e"], ["l", "l"], ["he", "ll"], ["Ġ", "w"]]}
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn a_llama3_style_tokenizer_adds_bos_merges_and_truncates() {
        let tokenizer = Tokenizer::from_bytes(&llama3_style()).unwrap();
        let bos = tokenizer.token_to_id("<|begin_of_text|>").unwrap();
        let id = |token: &str| tokenizer.token_to_id(token).unwrap();
        let ids = tokenizer.encode("hello world", 64).unwrap();
        assert_eq!(&ids[..4], &[bos, id("hell"), id("o"), id("Ġw")]);
        assert_eq!(ids.len(), 1 + 2 + 5);
        assert_eq!(
            tokenizer.encode("hello world", 3).unwrap(),
            vec![bos, id("hell"), id("o")]
        );
        // Runs of spaces and newlines go through the look-ahead branch of the pattern.
        let spaced = tokenizer.encode("a   b\n\nc", 64).unwrap();
        assert_eq!(spaced.len(), 1 + 8, "{spaced:?}");
    }

    #[test]
    fn max_len_without_room_for_text_and_bad_json_are_refused() {
        let tokenizer = Tokenizer::from_bytes(&llama3_style()).unwrap();
        let error = tokenizer.encode("hello", 1).unwrap_err();
        assert!(
            matches!(error, ModelError::Tokenizer(ref m) if m.contains("max_len 1")),
            "{error}"
        );
        let error = Tokenizer::from_bytes(b"{\"model\": 5}").unwrap_err();
        assert!(
            matches!(error, ModelError::Tokenizer(ref m) if m.contains("cannot be loaded")),
            "{error}"
        );
        assert!(Tokenizer::from_bytes(b"\xff\xfe").is_err());
    }
}
