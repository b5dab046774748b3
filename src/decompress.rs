//! `shardpress decompress`: restore safetensors files from an `.spz` archive.
//!
//! The archive is read by range through the library's reader
//! ([`shardpress_store::spz::SpzReader`]: footer, index, then each tensor's record, every part
//! checksummed), so restoring a few tensors (`--tensor`) reads only their bytes. A full restore rebuilds every original file
//! with its original header verbatim and each tensor at its original offset (dequantized into
//! its original dtype), plus the companion files; for a lossless recipe the files are
//! byte-identical to the input. Files are written under a `.partial` name and renamed when
//! complete, so an interrupted restore never leaves a file that looks finished; a restore that
//! fails (a corrupt record, say) removes its `.partial` file. `--out` may also be an object
//! store URL (`s3://…`): each file is then one multipart upload written in file order, which
//! the store shows only once complete (a failed one is aborted).

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, WriteMultipart};
use shardpress_core::dtype::DType;
use shardpress_core::header::encode_header;
use shardpress_store::spz::SpzReader;
use shardpress_store::StoreLocation;

/// Tensors read and decoded concurrently during a restore.
const DECODE_AHEAD: usize = 2;
/// Part size of a restored file's upload to an object store.
const UPLOAD_PART_BYTES: usize = 16 << 20;

#[derive(Args)]
pub struct DecompressArgs {
    /// The archive (path, file:// or s3:// URL of a .spz file, or of a directory holding
    /// model.spz).
    pub archive: String,
    /// Where to write the restored files: a directory, or an object store URL (s3://…).
    #[arg(long)]
    pub out: String,
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

/// Where restored files go.
enum Destination {
    Directory(PathBuf),
    Store(StoreLocation),
}

impl Destination {
    fn parse(out: &str) -> anyhow::Result<Destination> {
        if !out.contains("://") {
            return Ok(Destination::Directory(PathBuf::from(out)));
        }
        let store = StoreLocation::open(out)?;
        Ok(match store.local_root() {
            Some(dir) => Destination::Directory(dir), // file://, percent-encoding decoded
            None => Destination::Store(store),
        })
    }

    fn describe(&self) -> String {
        match self {
            Destination::Directory(dir) => dir.display().to_string(),
            Destination::Store(store) => store.url().to_string(),
        }
    }

    /// Writes a small file (an index, a companion file) whole.
    async fn put(&self, name: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Destination::Directory(dir) => {
                let path = safe_join(dir, name)?;
                std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
            }
            Destination::Store(store) => {
                safe_join(Path::new("."), name)?;
                Ok(store.put(name, Bytes::from(bytes)).await?)
            }
        }
    }
}

pub async fn decompress(args: DecompressArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let archive = SpzReader::open(&args.archive).await?;
    let out = Destination::parse(&args.out)?;
    if let Destination::Directory(dir) = &out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let written = if args.tensor.is_empty() {
        restore_all(&archive, &out).await?
    } else {
        restore_selected(&archive, &args.tensor, &out).await?
    };
    let secs = started.elapsed().as_secs_f64();
    say!(
        "restored {} tensors ({:.1} MB) from {} into {} in {secs:.1}s ({:.0} MB/s); recipe: {}",
        written.0,
        written.1 as f64 / 1e6,
        archive.describe(),
        out.describe(),
        written.1 as f64 / 1e6 / secs.max(1e-9),
        archive.index().recipe
    );
    Ok(())
}

async fn restore_all(archive: &SpzReader, out: &Destination) -> anyhow::Result<(usize, u64)> {
    let index = archive.index();
    let (mut tensors, mut bytes) = (0, 0);
    for (file_index, file) in index.files.iter().enumerate() {
        let out = match out {
            Destination::Directory(dir) => dir,
            Destination::Store(store) => {
                safe_join(Path::new("."), &file.name)?;
                let restored = upload_file(archive, file_index, store).await?;
                tensors += restored.0;
                bytes += restored.1;
                eprintln!(
                    "  {} ({:.1} MB)",
                    store.describe(&file.name),
                    file.size as f64 / 1e6
                );
                continue;
            }
        };
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
        let json = serde_json::to_vec_pretty(&json)?;
        out.put(shardpress_store::INDEX_NAME, json).await?;
    }
    for blob in &index.companions {
        let data = archive.read_companion(blob).await?;
        out.put(&blob.name, data).await?;
    }
    Ok((tensors, bytes))
}

/// Appends `count` zero bytes (a gap between tensors), a piece at a time.
async fn write_zeros(upload: &mut WriteMultipart, mut count: u64) -> anyhow::Result<()> {
    static PIECE: [u8; 1 << 16] = [0; 1 << 16];
    while count > 0 {
        let n = count.min(PIECE.len() as u64) as usize;
        upload.write(&PIECE[..n]);
        upload.wait_for_capacity(2).await?;
        count -= n as u64;
    }
    Ok(())
}

/// Uploads file `file_index` of the archive to `store` as one multipart upload, in file
/// order (header, then each tensor at its offset, any gap as zeros); aborted on failure, so
/// the object appears only complete. Returns its tensor count and tensor bytes.
async fn upload_file(
    archive: &SpzReader,
    file_index: usize,
    store: &StoreLocation,
) -> anyhow::Result<(usize, u64)> {
    let file = &archive.index().files[file_index];
    let object = store.describe(&file.name);
    let upload = store
        .store()
        .put_multipart(&store.path(&file.name))
        .await
        .with_context(|| format!("cannot start uploading {object}"))?;
    let mut upload = WriteMultipart::new_with_chunk_size(upload, UPLOAD_PART_BYTES);
    let mut ordered: Vec<_> = (archive.index().tensors.iter())
        .filter(|t| t.file == file_index)
        .collect();
    ordered.sort_by_key(|t| t.data_start);
    let written = async {
        let header = file.header.as_bytes();
        upload.write(&(header.len() as u64).to_le_bytes());
        upload.write(header);
        let mut at = 8 + header.len() as u64;
        let (mut tensors, mut bytes) = (0, 0);
        let mut restored = futures::stream::iter(ordered)
            .map(|tensor| async move {
                Ok::<_, anyhow::Error>((tensor, archive.read_tensor(tensor).await?))
            })
            .buffered(DECODE_AHEAD);
        while let Some((tensor, data)) = restored.try_next().await? {
            if tensor.data_start < at {
                bail!(
                    "{object}: tensor {} overlaps the one before it",
                    tensor.name
                );
            }
            write_zeros(&mut upload, tensor.data_start - at).await?;
            upload.wait_for_capacity(2).await?;
            upload.write(&data);
            at = tensor.data_start + data.len() as u64;
            tensors += 1;
            bytes += data.len() as u64;
        }
        if at > file.size {
            bail!("{object}: its tensors run past its {} bytes", file.size);
        }
        write_zeros(&mut upload, file.size - at).await?;
        Ok((tensors, bytes))
    }
    .await;
    match written {
        Ok(counts) => {
            upload
                .finish()
                .await
                .with_context(|| format!("cannot complete the upload of {object}"))?;
            Ok(counts)
        }
        Err(e) => {
            let _ = upload.abort().await;
            Err(e)
        }
    }
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
    out: &Destination,
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
    match out {
        Destination::Directory(dir) => {
            let path = dir.join("tensors.safetensors");
            let partial = partial_name(&path);
            std::fs::write(&partial, &file)
                .with_context(|| format!("writing {}", partial.display()))?;
            std::fs::rename(&partial, &path)?;
        }
        Destination::Store(_) => out.put("tensors.safetensors", file).await?,
    }
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
