//! The `.spz` archive: one object holding a whole compressed model.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! "SHARDPZ1"                       8-byte magic
//! tensor records ...               one per tensor, written by the workers (parts, concatenated)
//! companion blobs ...              config/tokenizer files, entropy-coded
//! index                            JSON [`SpzIndex`]
//! footer                           u64 index offset, u64 index length, "SPZINDEX"
//! ```
//!
//! A tensor record is a sequence of frames ([`crate::codec`]), each preceded by its `u64`
//! length; frames hold whole rows in order. The index names every tensor with its dtype,
//! shape, original file and byte range there, and the record's range in the archive, so a
//! reader fetches the footer, then the index, then only the records it wants (range reads).
//! The index also keeps each source file's original safetensors header verbatim, so
//! decompression rebuilds files with the same header and layout: for a lossless recipe the
//! restored files are byte-identical to the input.

use serde::{Deserialize, Serialize};

/// First bytes of every archive.
pub const MAGIC: &[u8; 8] = b"SHARDPZ1";
/// Last bytes of every archive.
pub const FOOTER_MAGIC: &[u8; 8] = b"SPZINDEX";
/// Footer length: index offset, index length, magic.
pub const FOOTER_LEN: usize = 24;
/// Index format version.
pub const VERSION: u32 = 1;
/// Largest index accepted when reading.
pub const MAX_INDEX_BYTES: u64 = 1 << 30;

/// Why an archive could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpzError {
    #[error("not an .spz archive: {0}")]
    NotAnArchive(String),
    #[error("corrupt .spz index: {0}")]
    Index(String),
    #[error("corrupt .spz record of tensor {tensor}: {reason}")]
    Record { tensor: String, reason: String },
}

/// A source safetensors file as it was before compression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpzFile {
    pub name: String,
    /// The original JSON header text (with its padding), written back verbatim.
    pub header: String,
    /// Total size of the original file.
    pub size: u64,
}

/// One tensor: where it lived and where its record is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpzTensor {
    pub name: String,
    /// Index into [`SpzIndex::files`].
    pub file: usize,
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Absolute byte range of the tensor's data in the original file.
    pub data_start: u64,
    pub data_end: u64,
    /// Byte range of the record in the archive.
    pub offset: u64,
    pub len: u64,
    /// blake3 of the record, checked before decoding.
    pub blake3: String,
    /// The plan applied, e.g. `"prune 2:4 + rtn int4 sym g64"` (empty: stored losslessly).
    pub plan: String,
    /// Set when the record is another tensor's (identical values under the same plan,
    /// stored once): that tensor's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_as: Option<String>,
}

/// A small file stored beside the weights (config, tokenizer), entropy-coded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpzBlob {
    pub name: String,
    pub offset: u64,
    pub len: u64,
}

/// The archive's index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpzIndex {
    pub version: u32,
    pub recipe: String,
    pub files: Vec<SpzFile>,
    pub tensors: Vec<SpzTensor>,
    pub companions: Vec<SpzBlob>,
}

/// The footer for an index at `offset` of `len` bytes.
pub fn footer(offset: u64, len: u64) -> [u8; FOOTER_LEN] {
    let mut f = [0u8; FOOTER_LEN];
    f[..8].copy_from_slice(&offset.to_le_bytes());
    f[8..16].copy_from_slice(&len.to_le_bytes());
    f[16..].copy_from_slice(FOOTER_MAGIC);
    f
}

/// The index range `(offset, len)` from the last [`FOOTER_LEN`] bytes of an archive of
/// `archive_len` bytes.
pub fn parse_footer(tail: &[u8], archive_len: u64) -> Result<(u64, u64), SpzError> {
    if tail.len() != FOOTER_LEN || &tail[16..] != FOOTER_MAGIC {
        return Err(SpzError::NotAnArchive(
            "missing the SPZINDEX footer (truncated or not an archive)".into(),
        ));
    }
    let word = |i: usize| u64::from_le_bytes(tail[i..i + 8].try_into().expect("8 bytes"));
    let (offset, len) = (word(0), word(8));
    let body_end = archive_len.saturating_sub(FOOTER_LEN as u64);
    if len > MAX_INDEX_BYTES
        || offset < MAGIC.len() as u64
        || offset.checked_add(len) != Some(body_end)
    {
        return Err(SpzError::NotAnArchive(format!(
            "footer points at index bytes {offset}+{len}, outside the archive of {archive_len} bytes"
        )));
    }
    Ok((offset, len))
}

impl SpzIndex {
    /// Serializes the index.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("index serializes")
    }

    /// Parses and validates an index read from bytes `index_offset..` of an archive: every
    /// record and blob lies between the magic and the index, tensors point at known files,
    /// and their original ranges fit those files.
    pub fn parse(bytes: &[u8], index_offset: u64) -> Result<SpzIndex, SpzError> {
        let index: SpzIndex =
            serde_json::from_slice(bytes).map_err(|e| SpzError::Index(e.to_string()))?;
        if index.version != VERSION {
            return Err(SpzError::Index(format!(
                "version {} (this build reads {VERSION})",
                index.version
            )));
        }
        let in_body = |offset: u64, len: u64| {
            offset >= MAGIC.len() as u64
                && offset.checked_add(len).is_some_and(|e| e <= index_offset)
        };
        for t in &index.tensors {
            let bad = |reason: String| SpzError::Index(format!("tensor {}: {reason}", t.name));
            if !in_body(t.offset, t.len) {
                return Err(bad(format!(
                    "record {}+{} outside the archive body",
                    t.offset, t.len
                )));
            }
            let file = index
                .files
                .get(t.file)
                .ok_or_else(|| bad(format!("file index {} out of range", t.file)))?;
            if t.data_start > t.data_end || t.data_end > file.size {
                return Err(bad(format!(
                    "data {}..{} outside {} ({} bytes)",
                    t.data_start, t.data_end, file.name, file.size
                )));
            }
        }
        for b in &index.companions {
            if !in_body(b.offset, b.len) {
                return Err(SpzError::Index(format!(
                    "companion {} outside the archive body",
                    b.name
                )));
            }
        }
        Ok(index)
    }
}

/// Splits a tensor record into its frames.
pub fn split_record<'a>(tensor: &str, record: &'a [u8]) -> Result<Vec<&'a [u8]>, SpzError> {
    let mut frames = Vec::new();
    let mut rest = record;
    while !rest.is_empty() {
        let bad = |reason: String| SpzError::Record {
            tensor: tensor.to_owned(),
            reason,
        };
        let len_bytes: [u8; 8] = rest
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("truncated frame length".into()))?;
        let len = u64::from_le_bytes(len_bytes);
        let body = &rest[8..];
        if len > body.len() as u64 {
            return Err(bad(format!("frame of {len} bytes overruns the record")));
        }
        let (frame, tail) = body.split_at(len as usize);
        frames.push(frame);
        rest = tail;
    }
    Ok(frames)
}

/// Appends one frame, length-prefixed, to a record.
pub fn push_frame(record: &mut Vec<u8>, frame: &[u8]) {
    record.extend_from_slice(&(frame.len() as u64).to_le_bytes());
    record.extend_from_slice(frame);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> SpzIndex {
        SpzIndex {
            version: VERSION,
            recipe: "lossless".into(),
            files: vec![SpzFile {
                name: "model.safetensors".into(),
                header: "{}".into(),
                size: 100,
            }],
            tensors: vec![SpzTensor {
                name: "w".into(),
                file: 0,
                dtype: "BF16".into(),
                shape: vec![2, 2],
                data_start: 10,
                data_end: 18,
                offset: 8,
                len: 30,
                blake3: String::new(),
                plan: String::new(),
                same_as: None,
            }],
            companions: vec![],
        }
    }

    #[test]
    fn footer_round_trip_and_rejections() {
        let f = footer(40, 100);
        assert_eq!(parse_footer(&f, 164).unwrap(), (40, 100));
        assert!(parse_footer(&f, 165).is_err());
        assert!(parse_footer(&f[1..], 164).is_err());
        let mut bad = f;
        bad[20] = b'X';
        assert!(parse_footer(&bad, 164).is_err());
        assert!(parse_footer(&footer(0, 140), 164).is_err());
    }

    #[test]
    fn index_validation() {
        let ix = index();
        assert_eq!(SpzIndex::parse(&ix.to_json(), 38).unwrap(), ix);
        assert!(
            SpzIndex::parse(&ix.to_json(), 37).is_err(),
            "record overlaps the index"
        );
        let mut bad = ix.clone();
        bad.tensors[0].file = 3;
        assert!(SpzIndex::parse(&bad.to_json(), 38).is_err());
        let mut bad = ix.clone();
        bad.tensors[0].data_end = 101;
        assert!(SpzIndex::parse(&bad.to_json(), 38).is_err());
        let mut bad = ix.clone();
        bad.tensors[0].offset = u64::MAX;
        assert!(SpzIndex::parse(&bad.to_json(), 38).is_err());
        let mut bad = ix;
        bad.version = 9;
        assert!(SpzIndex::parse(&bad.to_json(), 38).is_err());
        assert!(SpzIndex::parse(b"{not json", 38).is_err());
    }

    #[test]
    fn records_split_into_frames() {
        let mut record = Vec::new();
        push_frame(&mut record, b"abc");
        push_frame(&mut record, b"");
        push_frame(&mut record, b"hello");
        assert_eq!(
            split_record("t", &record).unwrap(),
            vec![&b"abc"[..], &b""[..], &b"hello"[..]]
        );
        assert!(split_record("t", &record[..record.len() - 1]).is_err());
        assert!(split_record("t", &record[..5]).is_err());
    }
}
