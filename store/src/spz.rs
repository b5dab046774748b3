//! Reading an `.spz` archive by range (the reader side of `core::format::spz`): footer, index,
//! then only the records asked for. Every byte used is checked against the checksums the
//! archive carries (the footer holds the index's blake3, the index every record's and
//! companion file's) before it is decoded, so a damaged archive is an error naming the part,
//! never wrong bytes.

use shardpress_core::codec::{decode_frame, CodecError};
use shardpress_core::dtype::DType;
use shardpress_core::entropy;
use shardpress_core::spz::{self, SpzBlob, SpzError, SpzIndex, SpzTensor};

use crate::{StoreError, StoreLocation};

/// Why an archive, or a part of it, cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SpzReadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{object}: {reason}")]
    NotAnArchive { object: String, reason: String },
    #[error("{object}: {cause}")]
    Index { object: String, cause: SpzError },
    #[error("{object}: {part} is corrupt: {reason}")]
    Corrupt {
        object: String,
        part: String,
        reason: String,
    },
    #[error("no tensor {name:?} in {object}")]
    UnknownTensor { object: String, name: String },
}

/// An opened archive: where it is and its validated index.
pub struct SpzReader {
    location: StoreLocation,
    name: String,
    index: SpzIndex,
}

/// `(directory, object)` of an archive URL: a `.spz` object, or a directory holding
/// `model.spz`.
pub fn split_archive_url(archive: &str) -> (String, String) {
    let trimmed = archive.trim_end_matches('/');
    if !trimmed.ends_with(".spz") {
        return (trimmed.to_string(), "model.spz".to_string());
    }
    match trimmed.rsplit_once('/') {
        Some((dir, name)) if !dir.is_empty() && !dir.ends_with(':') && !dir.ends_with("//") => {
            (dir.to_string(), name.to_string())
        }
        _ => (".".to_string(), trimmed.to_string()),
    }
}

impl SpzReader {
    /// Opens the archive at `archive` (see [`split_archive_url`]): checks its magic, reads
    /// the footer and the index (checksum and bounds checked).
    pub async fn open(archive: &str) -> Result<SpzReader, SpzReadError> {
        let (dir, name) = split_archive_url(archive);
        let location = StoreLocation::open(&dir)?;
        let object = location.describe(&name);
        let size = location.size(&name).await?;
        let not_archive = |reason: String| SpzReadError::NotAnArchive {
            object: object.clone(),
            reason,
        };
        if size < (spz::MAGIC.len() + spz::FOOTER_LEN) as u64 {
            return Err(not_archive(format!(
                "{size} bytes is too short for an .spz archive"
            )));
        }
        let magic = location
            .get_range(&name, 0..spz::MAGIC.len() as u64)
            .await?;
        if magic.as_ref() != spz::MAGIC {
            return Err(not_archive("not an .spz archive (bad magic)".into()));
        }
        let index_err = |cause| SpzReadError::Index {
            object: object.clone(),
            cause,
        };
        let tail = location
            .get_range(&name, size - spz::FOOTER_LEN as u64..size)
            .await?;
        let footer = spz::parse_footer(&tail, size).map_err(index_err)?;
        let bytes = location
            .get_range(&name, footer.offset..footer.offset + footer.len)
            .await?;
        let index = SpzIndex::parse(&bytes, &footer).map_err(index_err)?;
        Ok(SpzReader {
            location,
            name,
            index,
        })
    }

    /// The archive's validated index.
    pub fn index(&self) -> &SpzIndex {
        &self.index
    }

    /// The archive as messages name it.
    pub fn describe(&self) -> String {
        self.location.describe(&self.name)
    }

    /// The index entry of tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<&SpzTensor, SpzReadError> {
        self.index
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| SpzReadError::UnknownTensor {
                object: self.describe(),
                name: name.to_owned(),
            })
    }

    /// Reads `len` bytes at `offset` and checks them against `blake3`.
    async fn checked_range(
        &self,
        part: &str,
        offset: u64,
        len: u64,
        blake3: &str,
    ) -> Result<bytes::Bytes, SpzReadError> {
        let bytes = self
            .location
            .get_range(&self.name, offset..offset + len)
            .await?;
        let hash = blake3::hash(&bytes).to_hex();
        if hash.as_str() != blake3 {
            return Err(self.corrupt(part, format!("blake3 {hash}, the index says {blake3}")));
        }
        Ok(bytes)
    }

    fn corrupt(&self, part: &str, reason: String) -> SpzReadError {
        SpzReadError::Corrupt {
            object: self.describe(),
            part: part.to_owned(),
            reason,
        }
    }

    /// Reads and decodes one tensor's record into its original bytes (dequantized into its
    /// original dtype), exactly the length of its range in the original file.
    pub async fn read_tensor(&self, tensor: &SpzTensor) -> Result<Vec<u8>, SpzReadError> {
        let part = format!("the record of tensor {}", tensor.name);
        let dtype = DType::from_safetensors(&tensor.dtype)
            .ok_or_else(|| self.corrupt(&part, format!("unknown dtype {}", tensor.dtype)))?;
        let expected = tensor.data_end - tensor.data_start;
        let max_elems = (expected / dtype.size_bytes().max(1) as u64) as usize;
        let record = self
            .checked_range(&part, tensor.offset, tensor.len, &tensor.blake3)
            .await?;
        let name = tensor.name.clone();
        let decoded = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
            let mut data = Vec::with_capacity(expected as usize);
            for frame in spz::split_record(&name, &record).map_err(|e| e.to_string())? {
                let room = max_elems.saturating_sub(data.len() / dtype.size_bytes().max(1));
                decode_frame(frame, dtype, room, &mut data)
                    .map_err(|e: CodecError| e.to_string())?;
            }
            Ok(data)
        })
        .await
        .map_err(|e| self.corrupt(&part, format!("decoding stopped: {e}")))?
        .map_err(|reason| self.corrupt(&part, reason))?;
        if decoded.len() as u64 != expected {
            return Err(self.corrupt(
                &part,
                format!(
                    "it decodes to {} bytes, its file range holds {expected}",
                    decoded.len()
                ),
            ));
        }
        Ok(decoded)
    }

    /// Reads and decodes one companion file (config.json, tokenizer...).
    pub async fn read_companion(&self, blob: &SpzBlob) -> Result<Vec<u8>, SpzReadError> {
        let part = format!("companion file {}", blob.name);
        let coded = self
            .checked_range(&part, blob.offset, blob.len, &blob.blake3)
            .await?;
        entropy::decompress(&coded).map_err(|e| self.corrupt(&part, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_urls_split_into_directory_and_object() {
        let split = |s: &str| split_archive_url(s);
        assert_eq!(split("out"), ("out".into(), "model.spz".into()));
        assert_eq!(split("out/"), ("out".into(), "model.spz".into()));
        assert_eq!(split("out/model.spz"), ("out".into(), "model.spz".into()));
        assert_eq!(split("m.spz"), (".".into(), "m.spz".into()));
        assert_eq!(
            split("s3://bucket/a/model.spz"),
            ("s3://bucket/a".into(), "model.spz".into())
        );
    }
}
