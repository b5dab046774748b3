//! `shardpress decompress`: restore safetensors files from an `.spz` archive.
//!
//! The archive is read by range through the library's reader
//! ([`shardpress_store::spz::SpzReader`]: footer, index, then each tensor's record, every part
//! checksummed), so restoring a few tensors (`--tensor`) reads only their bytes. A full restore rebuilds every original file
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
use futures::{StreamExt, TryStreamExt};
use shardpress_core::dtype::DType;
use shardpress_core::header::encode_header;
use shardpress_store::spz::SpzReader;

/// Tensors read and decoded concurrently during a restore.
const DECODE_AHEAD: usize = 2;

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
    let archive = SpzReader::open(&args.archive).await?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let written = if args.tensor.is_empty() {
        restore_all(&archive, &args.out).await?
    } else {
        restore_selected(&archive, &args.tensor, &args.out).await?
    };
    let secs = started.elapsed().as_secs_f64();
    say!(
        "restored {} tensors ({:.1} MB) from {} into {} in {secs:.1}s ({:.0} MB/s); recipe: {}",
        written.0,
        written.1 as f64 / 1e6,
        archive.describe(),
        args.out.display(),
        written.1 as f64 / 1e6 / secs.max(1e-9),
        archive.index().recipe
    );
    Ok(())
}

async fn restore_all(archive: &SpzReader, out: &Path) -> anyhow::Result<(usize, u64)> {
    let index = archive.index();
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
        let data = archive.read_companion(blob).await?;
        std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok((tensors, bytes))
}

/// Writes file `file_index` of the archive's index, complete and synced, to `partial`;
/// returns its tensor count and tensor bytes.
async fn restore_file(
    archive: &SpzReader,
    file_index: usize,
    partial: &Path,
) -> anyhow::Result<(usize, u64)> {
    let file = &archive.index().files[file_index];
    let handle = std::fs::File::create(partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    handle.set_len(file.size)?;
    let header = file.header.as_bytes();
    handle.write_all_at(&(header.len() as u64).to_le_bytes(), 0)?;
    handle.write_all_at(header, 8)?;
    let (mut tensors, mut bytes) = (0, 0);
    // The next tensor is read and decoded while one is written (both cores busy; memory
    // bounded by two decoded tensors).
    let mut restored =
        futures::stream::iter(
            archive
                .index()
                .tensors
                .iter()
                .filter(|t| t.file == file_index),
        )
        .map(|tensor| async move {
            Ok::<_, anyhow::Error>((tensor, archive.read_tensor(tensor).await?))
        })
        .buffered(DECODE_AHEAD);
    while let Some((tensor, data)) = restored.try_next().await? {
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
    archive: &SpzReader,
    names: &[String],
    out: &Path,
) -> anyhow::Result<(usize, u64)> {
    let selected = names
        .iter()
        .map(|name| archive.tensor(name))
        .collect::<Result<Vec<_>, _>>()?;
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
        let data = archive.read_tensor(tensor).await?;
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
    fn names_cannot_escape_the_output() {
        let out = Path::new("/tmp/x");
        assert!(safe_join(out, "model.safetensors").is_ok());
        assert!(safe_join(out, "../evil").is_err());
        assert!(safe_join(out, "/etc/passwd").is_err());
        assert!(safe_join(out, "").is_err());
    }
}
