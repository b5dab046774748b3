//! The I/O around a GGUF job's pure parts ([`shardpress_core::format::gguf`]): reading the
//! model's `config.json` into [`ModelFacts`] at submit, and the config and tokenizer files
//! into the files' heads when the tasks are done (and at submit, so a missing or unsupported
//! tokenizer is refused before any work starts).

use serde_json::Value;
use shardpress_core::format::gguf::{files, GgufAssembly, GgufFile, GgufModel, HeadSources};
use shardpress_core::format::ModelFacts;
use shardpress_core::gguf::TokenizerFiles;
use shardpress_store::{StoreError, StoreLocation};

/// Reads a JSON file of the model folder; `None` when it does not exist.
async fn json_file(model: &StoreLocation, name: &str) -> Result<Option<Value>, StoreError> {
    let bytes = match model.get(name).await {
        Ok(bytes) => bytes,
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StoreError::Invalid {
            object: model.describe(name),
            reason: format!("not valid JSON: {e}"),
        })
}

/// The facts a GGUF file or a `gguf` pass needs: the llama-family model of `config.json`.
pub async fn model_facts(
    model: &StoreLocation,
    has_lm_head: bool,
) -> Result<ModelFacts, StoreError> {
    let config = json_file(model, "config.json")
        .await?
        .ok_or_else(|| StoreError::Invalid {
            object: model.describe("config.json"),
            reason: "not found; GGUF output and gguf passes read the architecture from it".into(),
        })?;
    let gguf = GgufModel::from_config(&config, has_lm_head).map_err(|e| StoreError::Invalid {
        object: model.describe("config.json"),
        reason: format!("cannot make a GGUF file of this model: {e}"),
    })?;
    Ok(ModelFacts { gguf: Some(gguf) })
}

/// The output's files (one, or llama.cpp's split files above `max_file_bytes`) with their
/// heads, from the model's config and tokenizer files.
pub async fn build_files(
    model: &StoreLocation,
    facts: &ModelFacts,
    assembly: &GgufAssembly,
    max_file_bytes: Option<u64>,
) -> Result<Vec<GgufFile>, StoreError> {
    let invalid = |reason: String| StoreError::Invalid {
        object: model.url().to_string(),
        reason,
    };
    let gguf = facts
        .gguf
        .as_ref()
        .ok_or_else(|| invalid("the job has no GGUF model facts".into()))?;
    let config = json_file(model, "config.json")
        .await?
        .ok_or_else(|| invalid("config.json is gone".into()))?;
    let tokenizer_json = json_file(model, "tokenizer.json").await?;
    let tokenizer_config = json_file(model, "tokenizer_config.json").await?;
    let chat_template_json = json_file(model, "chat_template.json").await?;
    let chat_template_jinja = match model.get("chat_template.jinja").await {
        Ok(bytes) => Some(
            String::from_utf8(bytes.to_vec()).map_err(|_| StoreError::Invalid {
                object: model.describe("chat_template.jinja"),
                reason: "not UTF-8".into(),
            })?,
        ),
        Err(StoreError::NotFound { .. }) => None,
        Err(e) => return Err(e),
    };
    let has_tokenizer_model = model.exists("tokenizer.model").await?;
    let name = model
        .url()
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("model")
        .to_string();
    let sources = HeadSources {
        config: &config,
        tokenizer: TokenizerFiles {
            tokenizer_json: tokenizer_json.as_ref(),
            tokenizer_config: tokenizer_config.as_ref(),
            config: Some(&config),
            chat_template_jinja: chat_template_jinja.as_deref(),
            chat_template_json: chat_template_json.as_ref(),
            has_tokenizer_model,
        },
        name: &name,
    };
    files(gguf, assembly, sources, max_file_bytes)
        .map_err(|e| invalid(format!("cannot lay out the GGUF file: {e}")))
}
