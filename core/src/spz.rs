//! The `.spz` archive: one object holding a whole compressed model.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! "SHARDPZ1"                       8-byte magic
//! tensor records ...               one per tensor, written by the workers (parts, concatenated)
//! companion blobs ...              config/tokenizer files, entropy-coded
//! index                            JSON [`SpzIndex`]
//! footer                           u64 index offset, u64 index length, blake3 of the index
//!                                  (32 bytes), "SPZINDX2"
//! ```
//!
//! Every byte a restore depends on is checksummed: the footer holds the index's blake3, and the
//! index holds the blake3 of every record and companion blob, each checked before its bytes are
//! used. The index is also checked against itself: every source file's stored header must be a
//! valid safetensors header of exactly the file's size, and the tensors must be exactly that
//! header's tensors, at its offsets, with its dtypes and shapes; records and blobs must lie in
//! the archive's body. So a damaged archive is refused, never restored into wrong files.
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
pub const FOOTER_MAGIC: &[u8; 8] = b"SPZINDX2";
/// Last bytes of archives of format 1 (no checksums over the index and companion files).
const FORMAT_1_MAGIC: &[u8; 8] = b"SPZINDEX";
/// Footer length: index offset, index length, index blake3, magic.
pub const FOOTER_LEN: usize = 56;
/// Index format version.
pub const VERSION: u32 = 2;
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
    /// blake3 of the stored (coded) bytes, checked before decoding.
    pub blake3: String,
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

/// Where the index is, and its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub offset: u64,
    pub len: u64,
    pub blake3: [u8; 32],
}

/// The footer for `index`, written at `offset`.
pub fn footer(offset: u64, index: &[u8]) -> [u8; FOOTER_LEN] {
    let mut f = [0u8; FOOTER_LEN];
    f[..8].copy_from_slice(&offset.to_le_bytes());
    f[8..16].copy_from_slice(&(index.len() as u64).to_le_bytes());
    f[16..48].copy_from_slice(blake3::hash(index).as_bytes());
    f[48..].copy_from_slice(FOOTER_MAGIC);
    f
}

/// The footer from the last [`FOOTER_LEN`] bytes of an archive of `archive_len` bytes.
pub fn parse_footer(tail: &[u8], archive_len: u64) -> Result<Footer, SpzError> {
    if tail.ends_with(FORMAT_1_MAGIC) {
        return Err(SpzError::NotAnArchive(
            "written by an older shardpress (archive format 1, without checksums over its index); compress the model again"
                .into(),
        ));
    }
    if tail.len() != FOOTER_LEN || &tail[48..] != FOOTER_MAGIC {
        return Err(SpzError::NotAnArchive(
            "missing the SPZINDX2 footer (truncated or not an archive)".into(),
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
    Ok(Footer {
        offset,
        len,
        blake3: tail[16..48].try_into().expect("32 bytes"),
    })
}

impl SpzIndex {
    /// Serializes the index.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("index serializes")
    }

    /// Checks the index bytes the footer points at against its checksum, then parses and
    /// validates them (see the module docs).
    pub fn parse(bytes: &[u8], footer: &Footer) -> Result<SpzIndex, SpzError> {
        if blake3::hash(bytes).as_bytes() != &footer.blake3 {
            return Err(SpzError::Index(
                "its checksum does not match the footer's (the archive is damaged)".into(),
            ));
        }
        let index: SpzIndex =
            serde_json::from_slice(bytes).map_err(|e| SpzError::Index(e.to_string()))?;
        if index.version != VERSION {
            return Err(SpzError::Index(format!(
                "version {} (this build reads {VERSION})",
                index.version
            )));
        }
        index.validate(footer.offset)?;
        Ok(index)
    }

    /// The index's own consistency, for an index starting at `index_offset` of the archive.
    fn validate(&self, index_offset: u64) -> Result<(), SpzError> {
        let in_body = |offset: u64, len: u64| {
            offset >= MAGIC.len() as u64
                && offset.checked_add(len).is_some_and(|e| e <= index_offset)
        };
        // name -> (file, absolute data range, dtype, shape, covered) from the stored headers.
        let mut expected = std::collections::HashMap::new();
        let mut file_names = std::collections::HashSet::new();
        for (i, file) in self.files.iter().enumerate() {
            let bad = |reason: String| SpzError::Index(format!("file {:?}: {reason}", file.name));
            if file.name.is_empty() || !file_names.insert(file.name.as_str()) {
                return Err(bad("empty or repeated file name".into()));
            }
            let header =
                crate::header::parse_header(file.header.as_bytes(), file.size).map_err(|e| {
                    bad(format!(
                        "stored header does not describe its {} bytes: {e}",
                        file.size
                    ))
                })?;
            let base = header.data_start();
            for t in header.tensors {
                let range = (base + t.data_offsets.0, base + t.data_offsets.1);
                let dtype = t.dtype.as_safetensors().to_string();
                expected.insert(t.name, (i, range, dtype, t.shape, false));
            }
        }
        for t in &self.tensors {
            let bad = |reason: String| SpzError::Index(format!("tensor {}: {reason}", t.name));
            if !in_body(t.offset, t.len) {
                return Err(bad(format!(
                    "record {}+{} outside the archive body",
                    t.offset, t.len
                )));
            }
            let entry = expected
                .get_mut(t.name.as_str())
                .ok_or_else(|| bad("not in any stored file header".into()))?;
            let (file, range, dtype, shape, covered) = entry;
            if *covered {
                return Err(bad("listed twice".into()));
            }
            if t.file != *file
                || (t.data_start, t.data_end) != *range
                || &t.dtype != dtype
                || &t.shape != shape
            {
                return Err(bad(format!(
                    "file {} {} {:?} bytes {}..{} disagrees with the stored header's {dtype} {shape:?} bytes {}..{} of file {file}",
                    t.file, t.dtype, t.shape, t.data_start, t.data_end, range.0, range.1
                )));
            }
            *covered = true;
        }
        if let Some((name, _)) = expected.iter().find(|(_, e)| !e.4) {
            return Err(SpzError::Index(format!(
                "tensor {name} of a stored header has no record"
            )));
        }
        let mut blob_names = std::collections::HashSet::new();
        for b in &self.companions {
            if !in_body(b.offset, b.len) || !blob_names.insert(b.name.as_str()) {
                return Err(SpzError::Index(format!(
                    "companion {} repeated or outside the archive body",
                    b.name
                )));
            }
        }
        Ok(())
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

    const HEADER: &str = r#"{"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}}  "#;

    fn index() -> SpzIndex {
        let start = 8 + HEADER.len() as u64;
        SpzIndex {
            version: VERSION,
            recipe: "lossless".into(),
            files: vec![SpzFile {
                name: "model.safetensors".into(),
                header: HEADER.into(),
                size: start + 8,
            }],
            tensors: vec![SpzTensor {
                name: "w".into(),
                file: 0,
                dtype: "BF16".into(),
                shape: vec![2, 2],
                data_start: start,
                data_end: start + 8,
                offset: 8,
                len: 30,
                blake3: String::new(),
                plan: String::new(),
                same_as: None,
            }],
            companions: vec![SpzBlob {
                name: "config.json".into(),
                offset: 38,
                len: 2,
                blake3: String::new(),
            }],
        }
    }

    /// Parses `ix` as if its index started at `offset`, with a footer written for it.
    fn parse_at(ix: &SpzIndex, offset: u64) -> Result<SpzIndex, SpzError> {
        let bytes = ix.to_json();
        let footer = parse_footer(
            &footer(offset, &bytes),
            offset + bytes.len() as u64 + FOOTER_LEN as u64,
        )?;
        SpzIndex::parse(&bytes, &footer)
    }

    #[test]
    fn footer_round_trip_and_rejections() {
        let index = vec![7u8; 100];
        let f = footer(40, &index);
        let parsed = parse_footer(&f, 196).unwrap();
        assert_eq!((parsed.offset, parsed.len), (40, 100));
        assert_eq!(&parsed.blake3, blake3::hash(&index).as_bytes());
        assert!(parse_footer(&f, 197).is_err());
        assert!(parse_footer(&f[1..], 196).is_err());
        let mut bad = f;
        bad[50] = b'X';
        assert!(parse_footer(&bad, 196).is_err());
        assert!(parse_footer(&footer(0, &[0; 140]), 196).is_err());
        // A format-1 archive (24-byte footer, no checksums) is named, not misread.
        let mut old = [0u8; FOOTER_LEN];
        old[48..].copy_from_slice(b"SPZINDEX");
        let err = parse_footer(&old, 196).unwrap_err().to_string();
        assert!(err.contains("older shardpress"), "{err}");
    }

    #[test]
    fn a_damaged_index_is_refused_by_its_checksum() {
        let ix = index();
        assert_eq!(parse_at(&ix, 40).unwrap(), ix);
        let mut bytes = ix.to_json();
        let f = parse_footer(
            &footer(40, &bytes),
            40 + bytes.len() as u64 + FOOTER_LEN as u64,
        )
        .unwrap();
        let at = bytes.iter().position(|&b| b == b'3').unwrap(); // a digit of "len": 30
        bytes[at] = b'4';
        let err = SpzIndex::parse(&bytes, &f).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn an_index_must_agree_with_its_stored_headers_and_the_archive() {
        let ix = index();
        let refused = |edit: &dyn Fn(&mut SpzIndex), what: &str| {
            let mut bad = ix.clone();
            edit(&mut bad);
            assert!(parse_at(&bad, 40).is_err(), "{what} was accepted");
        };
        refused(&|i| i.tensors[0].offset = u64::MAX, "a record past the end");
        refused(&|i| i.tensors[0].len = 33, "a record overlapping the index");
        refused(&|i| i.tensors[0].file = 3, "an unknown file");
        refused(
            &|i| i.tensors[0].data_end += 1,
            "a range the header does not give",
        );
        refused(&|i| i.tensors[0].data_start -= 8, "a shifted range");
        refused(&|i| i.tensors[0].shape = vec![4, 1], "another shape");
        refused(&|i| i.tensors[0].dtype = "F16".into(), "another dtype");
        refused(&|i| i.files[0].size = 10_000_000_000_000, "a 10 TB file");
        refused(
            &|i| i.files[0].size -= 1,
            "a file shorter than its header says",
        );
        refused(&|i| i.tensors.clear(), "a header tensor without a record");
        refused(
            &|i| {
                let t = i.tensors[0].clone();
                i.tensors.push(t);
            },
            "a tensor listed twice",
        );
        refused(
            &|i| {
                let f = i.files[0].clone();
                i.files.push(f);
            },
            "two files of one name",
        );
        refused(
            &|i| {
                let b = i.companions[0].clone();
                i.companions.push(b);
            },
            "a repeated companion",
        );
        refused(
            &|i| i.companions[0].offset = 39,
            "a companion overlapping the index",
        );
        refused(&|i| i.version = 9, "another version");
        let bytes = b"{not json";
        let f = parse_footer(&footer(40, bytes), 40 + 9 + FOOTER_LEN as u64).unwrap();
        assert!(SpzIndex::parse(bytes, &f).is_err());
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
