//! Finding a model's safetensors files under a URL: a single `.safetensors` object, a sharded
//! model with `model.safetensors.index.json`, or a directory of `.safetensors` files.

use std::collections::BTreeSet;

use crate::{StoreError, StoreLocation};

/// The Hugging Face index of a sharded safetensors model.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// A model's root location and the safetensors objects (relative names) that make it up.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub root: StoreLocation,
    pub files: Vec<String>,
}

/// Resolves `url_or_path` to the model's safetensors files, checking that they all exist.
pub async fn resolve_model(url_or_path: &str) -> Result<ModelFiles, StoreError> {
    let trimmed = url_or_path.trim_end_matches('/');
    if let Some((parent, file)) = trimmed.rsplit_once('/') {
        if file.ends_with(".safetensors") {
            let root = StoreLocation::open(if parent.is_empty() { "/" } else { parent })?;
            root.size(file).await?;
            return Ok(ModelFiles {
                root,
                files: vec![file.to_string()],
            });
        }
    } else if trimmed.ends_with(".safetensors") {
        let root = StoreLocation::open(".")?;
        root.size(trimmed).await?;
        return Ok(ModelFiles {
            root,
            files: vec![trimmed.to_string()],
        });
    }
    let root = StoreLocation::open(trimmed)?;
    let files = files_in_directory(&root).await?;
    Ok(ModelFiles { root, files })
}

/// The files of a model directory: the index's weight map if there is one, else every
/// top-level `*.safetensors` object.
pub async fn files_in_directory(root: &StoreLocation) -> Result<Vec<String>, StoreError> {
    if root.exists(INDEX_NAME).await? {
        let files = files_from_index(root, &root.get(INDEX_NAME).await?)?;
        for file in &files {
            root.size(file).await?;
        }
        return Ok(files);
    }
    let files: Vec<String> = root
        .list_top_level()
        .await?
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name.ends_with(".safetensors"))
        .collect();
    if files.is_empty() {
        return Err(StoreError::NotFound {
            object: format!("{}/*.safetensors (no safetensors files there)", root.url()),
        });
    }
    Ok(files)
}

fn files_from_index(root: &StoreLocation, bytes: &[u8]) -> Result<Vec<String>, StoreError> {
    let invalid = |reason: String| StoreError::Invalid {
        object: root.describe(INDEX_NAME),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| invalid("no \"weight_map\" object".into()))?;
    let mut files = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| invalid(format!("weight_map[{tensor:?}] is not a string")))?;
        if file.contains("..") || file.starts_with('/') {
            return Err(invalid(format!(
                "weight_map[{tensor:?}] = {file:?} escapes the model directory"
            )));
        }
        files.insert(file.to_string());
    }
    if files.is_empty() {
        return Err(invalid("weight_map is empty".into()));
    }
    Ok(files.into_iter().collect())
}
