//! `shardpress decompress`: restore safetensors files from an `.spz` archive.
//!
//! The archive is read by range: footer, index, then each tensor's record, so restoring a few
//! tensors (`--tensor`) reads only their bytes. A full restore rebuilds every original file
//! with its original header verbatim and each tensor at its original offset (dequantized into
//! its original dtype), plus the companion files; for a lossless recipe the files are
//! byte-identical to the input. Files are written under a `.partial` name and renamed when
//! complete, so an interrupted restore never leaves a file that looks finished; a restore that
//! fails (a corrupt record, say) removes its `.partial` file.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use shardpress_core::codec::decode_frame;
use shardpress_core::dtype::DType;
use shardpress_core::entropy;
use shardpress_core::header::encode_header;
use shardpress_core::spz::{self, SpzIndex, SpzTensor};
use shardpress_store::StoreLocation;

#[derive(Args)]
pub struct DecompressArgs {
    /// The archive (path, file:// or s3:// URL of a .spz file, or of a directory holding
    /// model.spz).
    pub archive: String,
    /// Directory to write the restored files into.
    #[arg(long)]
    pub out: PathBuf,
    /// Restore only these tensors (repeatable) into `tensors.safetensors`; only their records
    /// are read from the archive.
    #[arg(long)]
    pub tensor: Vec<String>,
}

/// An opened archive: where it is and its validated index.
struct Archive {
    location: StoreLocation,
    name: String,
    index: SpzIndex,
}

fn split_archive_url(archive: &str) -> (String, String) {
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

async fn open_archive(archive: &str) -> anyhow::Result<Archive> {
    let (dir, name) = split_archive_url(archive);
    let location = StoreLocation::open(&dir)?;
    let object = location.describe(&name);
    let size = location.size(&name).await?;
    if size < (spz::MAGIC.len() + spz::FOOTER_LEN) as u64 {
        bail!("{object}: {size} bytes is too short for an .spz archive");
    }
    let magic = location
        .get_range(&name, 0..spz::MAGIC.len() as u64)
        .await?;
    if magic.as_ref() != spz::MAGIC {
        bail!("{object}: not an .spz archive (bad magic)");
    }
    let tail = location
        .get_range(&name, size - spz::FOOTER_LEN as u64..size)
        .await?;
    let footer = spz::parse_footer(&tail, size).with_context(|| object.clone())?;
    let bytes = location
        .get_range(&name, footer.offset..footer.offset + footer.len)
        .await?;
    let index = SpzIndex::parse(&bytes, &footer).with_context(|| object.clone())?;
    Ok(Archive {
        location,
        name,
        index,
    })
}

/// Reads and decodes one tensor's record into its original bytes.
async fn restore_tensor(archive: &Archive, tensor: &SpzTensor) -> anyhow::Result<Vec<u8>> {
    let object = archive.location.describe(&archive.name);
    let dtype = DType::from_safetensors(&tensor.dtype).with_context(|| {
        format!(
            "{object}: tensor {} has unknown dtype {}",
            tensor.name, tensor.dtype
        )
    })?;
    let expected = tensor.data_end - tensor.data_start;
    let max_elems = (expected / dtype.size_bytes().max(1) as u64) as usize;
    let record = archive
        .location
        .get_range(&archive.name, tensor.offset..tensor.offset + tensor.len)
        .await?;
    let hash = blake3::hash(&record).to_hex();
    if hash.as_str() != tensor.blake3 {
        bail!(
            "{object}: the record of tensor {} is corrupt (blake3 {hash}, index says {})",
            tensor.name,
            tensor.blake3
        );
    }
    let name = tensor.name.clone();
    let data = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
        let mut data = Vec::with_capacity(expected as usize);
        for frame in spz::split_record(&name, &record)? {
            let room = max_elems.saturating_sub(data.len() / dtype.size_bytes().max(1));
            decode_frame(frame, dtype, room, &mut data)
                .with_context(|| format!("tensor {name}"))?;
        }
        Ok(data)
    })
    .await??;
    if data.len() as u64 != expected {
        bail!(
            "{object}: tensor {} decodes to {} bytes, its file range holds {expected}",
            tensor.name,
            data.len()
        );
    }
    Ok(data)
}

/// A file name from the archive, refused if it could escape the output directory.
fn safe_join(out: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = Path::new(name);
    let plain = path
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if name.is_empty() || !plain {
        bail!("archive names a file {name:?} outside the output directory; refusing it");
    }
    Ok(out.join(path))
}

fn partial_name(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

pub async fn decompress(args: DecompressArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let archive = open_archive(&args.archive).await?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let written = if args.tensor.is_empty() {
        restore_all(&archive, &args.out).await?
    } else {
        restore_selected(&archive, &args.tensor, &args.out).await?
    };
    let secs = started.elapsed().as_secs_f64();
    println!(
        "restored {} tensors ({:.1} MB) from {} into {} in {secs:.1}s ({:.0} MB/s); recipe: {}",
        written.0,
        written.1 as f64 / 1e6,
        archive.location.describe(&archive.name),
        args.out.display(),
        written.1 as f64 / 1e6 / secs.max(1e-9),
        archive.index.recipe
    );
    Ok(())
}

async fn restore_all(archive: &Archive, out: &Path) -> anyhow::Result<(usize, u64)> {
    let index = &archive.index;
    let (mut tensors, mut bytes) = (0, 0);
    for (file_index, file) in index.files.iter().enumerate() {
        let path = safe_join(out, &file.name)?;
        let partial = partial_name(&path);
        // A restore that fails part-way leaves nothing behind: not even the `.partial` file.
        let restored = match restore_file(archive, file_index, &partial).await {
            Ok(restored) => restored,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        std::fs::rename(&partial, &path)?;
        tensors += restored.0;
        bytes += restored.1;
        eprintln!("  {} ({:.1} MB)", path.display(), file.size as f64 / 1e6);
    }
    if index.files.len() > 1 {
        let weight_map: BTreeMap<&str, &str> = index
            .tensors
            .iter()
            .filter_map(|t| {
                index
                    .files
                    .get(t.file)
                    .map(|f| (t.name.as_str(), f.name.as_str()))
            })
            .collect();
        let total: u64 = index
            .tensors
            .iter()
            .map(|t| t.data_end - t.data_start)
            .sum();
        let json = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(
            out.join(shardpress_store::INDEX_NAME),
            serde_json::to_vec_pretty(&json)?,
        )?;
    }
    for blob in &index.companions {
        let path = safe_join(out, &blob.name)?;
        let coded = archive
            .location
            .get_range(&archive.name, blob.offset..blob.offset + blob.len)
            .await?;
        let hash = blake3::hash(&coded).to_hex();
        if hash.as_str() != blob.blake3 {
            bail!(
                "{}: companion file {} is corrupt (blake3 {hash}, index says {})",
                archive.location.describe(&archive.name),
                blob.name,
                blob.blake3
            );
        }
        let data = entropy::decompress(&coded)
            .with_context(|| format!("companion file {} in the archive", blob.name))?;
        std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok((tensors, bytes))
}

/// Writes file `file_index` of the archive's index, complete and synced, to `partial`;
/// returns its tensor count and tensor bytes.
async fn restore_file(
    archive: &Archive,
    file_index: usize,
    partial: &Path,
) -> anyhow::Result<(usize, u64)> {
    let file = &archive.index.files[file_index];
    let handle = std::fs::File::create(partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    handle.set_len(file.size)?;
    let header = file.header.as_bytes();
    handle.write_all_at(&(header.len() as u64).to_le_bytes(), 0)?;
    handle.write_all_at(header, 8)?;
    let (mut tensors, mut bytes) = (0, 0);
    for tensor in archive
        .index
        .tensors
        .iter()
        .filter(|t| t.file == file_index)
    {
        let data = restore_tensor(archive, tensor).await?;
        handle
            .write_all_at(&data, tensor.data_start)
            .with_context(|| format!("writing {}", partial.display()))?;
        tensors += 1;
        bytes += data.len() as u64;
    }
    handle.sync_all()?;
    Ok((tensors, bytes))
}

async fn restore_selected(
    archive: &Archive,
    names: &[String],
    out: &Path,
) -> anyhow::Result<(usize, u64)> {
    let mut selected = Vec::new();
    for name in names {
        let tensor = archive
            .index
            .tensors
            .iter()
            .find(|t| &t.name == name)
            .with_context(|| {
                format!(
                    "no tensor {name:?} in {}",
                    archive.location.describe(&archive.name)
                )
            })?;
        selected.push(tensor);
    }
    let layout: Vec<(String, DType, Vec<u64>)> = selected
        .iter()
        .map(|t| {
            let dtype = DType::from_safetensors(&t.dtype)
                .with_context(|| format!("tensor {} has unknown dtype {}", t.name, t.dtype))?;
            Ok((t.name.clone(), dtype, t.shape.clone()))
        })
        .collect::<anyhow::Result<_>>()?;
    let (prefix, _) = encode_header(&layout, &BTreeMap::new())?;
    let path = out.join("tensors.safetensors");
    let partial = partial_name(&path);
    let mut file = prefix.to_vec();
    let mut bytes = 0;
    // encode_header lays tensors out in name order.
    let mut ordered = selected.clone();
    ordered.sort_by(|a, b| a.name.cmp(&b.name));
    ordered.dedup_by(|a, b| a.name == b.name);
    for tensor in &ordered {
        let data = restore_tensor(archive, tensor).await?;
        bytes += data.len() as u64;
        file.extend_from_slice(&data);
    }
    std::fs::write(&partial, &file).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &path)?;
    Ok((ordered.len(), bytes))
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

    #[test]
    fn names_cannot_escape_the_output() {
        let out = Path::new("/tmp/x");
        assert!(safe_join(out, "model.safetensors").is_ok());
        assert!(safe_join(out, "../evil").is_err());
        assert!(safe_join(out, "/etc/passwd").is_err());
        assert!(safe_join(out, "").is_err());
    }
}
