//! The assembly of an `.spz` job's archive or a GGUF job's files, in parallel: each file's
//! layout (ranges of the parts, in order) is cut into slices that several workers write at
//! once into one shared object (see [`shardpress_store::shared`]), and the file's BLAKE3 hash
//! is merged from the hashes of the slices' subtrees, so nothing reads the file again.
//!
//! Slices are a power of two long (a whole BLAKE3 subtree each, and S3 parts of one size),
//! and at least S3's smallest part there. A file of one slice, or on a store without shared
//! writes, is written whole by one worker as before.
//!
//! An `.spz` archive on a local filesystem is assembled while its tasks run
//! ([`EarlyAssembly`]): a slice is queued as soon as the tasks laying out its bytes are done,
//! leased before any compressing task, and the parts only it read are deleted once it is
//! accepted, so parts are copied from the page cache and never written to the disk.
//!
//! A GGUF file on a local filesystem needs no copy at all: its layout is known from shapes
//! before any data exists, so the coordinator writes each file's head into its staging file at
//! submit ([`in_place`]) and every task writes its tensors at their offset; the slices then
//! only hash the file in place (`hash_only`) before it is renamed.

use std::collections::HashMap;

use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root};
use blake3::hazmat::{ChainingValue, Mode};
use bytes::Bytes;
use shardpress_core::format::gguf::GgufFile;
use shardpress_proto::v1::{AssembleSlice, PartRange, PositionedOutput};
use shardpress_store::shared::{SharedObject, SharedWrites, MIN_PART_BYTES};
use shardpress_store::{StoreError, StoreLocation};

use crate::finalize::ManifestEntry;
use crate::job::TaskSlot;
use crate::journal::Journal;

/// Slice length unless the job says otherwise.
pub const DEFAULT_SLICE_BYTES: u64 = 64 << 20;
/// S3 numbers a multipart upload's parts 1 to 10,000.
const MAX_PARTS: u64 = 10_000;

/// The object a file is assembled in before it is renamed into place, in the parts' folder.
pub fn staging_name(parts_dir: &str, name: &str) -> String {
    format!("{parts_dir}/{name}.assembling")
}

/// Why a slice length is refused at submit.
pub fn check_slice_bytes(bytes: u64) -> Result<(), String> {
    if bytes < 1024 || !bytes.is_power_of_two() {
        return Err(format!(
            "assembly slices must be a power of two of at least 1 KiB, not {bytes} bytes"
        ));
    }
    Ok(())
}

/// The bytes of the file a layout describes.
pub fn file_size(layout: &AssembleSlice) -> u64 {
    layout.ranges.iter().map(|r| r.end - r.start).sum()
}

/// Cuts a whole file's layout into slices of `slice_bytes` (the last may be shorter); each
/// lists only the parts it copies from, and which of them no other slice reads.
pub fn cut(layout: &AssembleSlice, slice_bytes: u64) -> Vec<AssembleSlice> {
    let size = file_size(layout);
    let count = size.div_ceil(slice_bytes).max(1);
    let mut slices: Vec<AssembleSlice> = (0..count)
        .map(|i| AssembleSlice {
            offset: i * slice_bytes,
            slice: i as u32,
            slices: count as u32,
            ..Default::default()
        })
        .collect();
    let mut at = 0u64;
    for range in &layout.ranges {
        let mut start = range.start;
        while start < range.end {
            let slice = &mut slices[(at / slice_bytes) as usize];
            let room = slice.offset + slice_bytes - at;
            let end = range.end.min(start + room);
            let part = match slice.parts.last() {
                Some(last) if *last == layout.parts[range.part as usize] => slice.parts.len() - 1,
                _ => {
                    slice.parts.push(layout.parts[range.part as usize].clone());
                    slice
                        .part_sizes
                        .push(layout.part_sizes[range.part as usize]);
                    slice.parts.len() - 1
                }
            };
            slice.ranges.push(PartRange {
                part: part as u32,
                start,
                end,
            });
            at += end - start;
            start = end;
        }
    }
    // A part that only one slice reads can go as soon as that slice is done.
    let mut readers: HashMap<&str, u32> = HashMap::new();
    for slice in &slices {
        for part in &slice.parts {
            *readers.entry(part.as_str()).or_default() += 1;
        }
    }
    let alone: Vec<Vec<u32>> = slices
        .iter()
        .map(|slice| {
            let only_here = |(_, part): &(usize, &String)| readers[part.as_str()] == 1;
            let parts = slice.parts.iter().enumerate().filter(only_here);
            parts.map(|(i, _)| i as u32).collect()
        })
        .collect();
    for (slice, alone) in slices.iter_mut().zip(alone) {
        slice.delete_after = alone;
    }
    slices
}

/// Cuts the file `name` into slices for the workers and starts the shared object they write
/// into (its staging file named `staging`); one slice where the file is small or the store
/// cannot be written by several processes.
pub async fn prepare(
    out: &StoreLocation,
    name: &str,
    staging: &str,
    layout: AssembleSlice,
    slice_bytes: u64,
) -> Result<Vec<AssembleSlice>, StoreError> {
    let size = file_size(&layout);
    let slice_bytes = match out.shared_writes() {
        None => return Ok(whole(layout)),
        Some(SharedWrites::PositionedFile) => slice_bytes,
        Some(SharedWrites::MultipartParts) => {
            let mut bytes = slice_bytes.max(MIN_PART_BYTES.next_power_of_two());
            while size.div_ceil(bytes) > MAX_PARTS {
                bytes *= 2;
            }
            bytes
        }
    };
    let mut slices = slices(layout, slice_bytes);
    if slices.len() == 1 {
        return Ok(slices);
    }
    let object = out.begin_shared(name, staging, false).await?;
    // A coordinator restarted before completing it aborts it (see `Journal`).
    if let Err(e) = Journal::at(out.clone()).record_shared_upload(&object).await {
        out.abort_shared(&object).await;
        return Err(e);
    }
    let SharedObject {
        staging, upload_id, ..
    } = object;
    for slice in &mut slices {
        slice.staging.clone_from(&staging);
        slice.upload_id.clone_from(&upload_id);
    }
    Ok(slices)
}

/// The layout cut into slices, or whole (all its parts listed) when one slice holds it.
fn slices(layout: AssembleSlice, slice_bytes: u64) -> Vec<AssembleSlice> {
    match file_size(&layout) > slice_bytes {
        true => cut(&layout, slice_bytes),
        false => whole(layout),
    }
}

fn whole(layout: AssembleSlice) -> Vec<AssembleSlice> {
    vec![AssembleSlice {
        offset: 0,
        slice: 0,
        slices: 1,
        staging: String::new(),
        upload_id: String::new(),
        ..layout
    }]
}

/// An `.spz` archive on a local filesystem, assembled while the job runs: its staging file
/// is created at submit, and each slice is queued as soon as the tasks before its end are
/// done (see [`crate::archive`]), so that parts are copied while fresh and deleted before the
/// kernel writes them out; only the last slices wait for the job's end.
#[derive(Debug, Clone)]
pub struct EarlyAssembly {
    pub object: SharedObject,
    pub slice_bytes: u64,
}

/// Starts the archive `name`'s staging object (named `staging`) and writes the archive's head
/// part, which the first slice reads.
pub async fn early_assembly(
    out: &StoreLocation,
    name: &str,
    staging: &str,
    slice_bytes: u64,
) -> Result<EarlyAssembly, StoreError> {
    let object = out.begin_shared(name, staging, false).await?;
    crate::archive::write_head(out).await?;
    Ok(EarlyAssembly {
        object,
        slice_bytes,
    })
}

/// The slices of the whole archive's `layout` not yet queued early; the early ones (the
/// assembly slots of `tasks` so far) are checked to be the same slices. A file of one slice
/// is written whole, as without early assembly.
pub fn after_early(
    layout: AssembleSlice,
    early: &EarlyAssembly,
    tasks: &[TaskSlot],
) -> Result<Vec<AssembleSlice>, StoreError> {
    let queued: Vec<&AssembleSlice> = tasks.iter().filter_map(|t| t.assemble.as_ref()).collect();
    let mut slices = slices(layout, early.slice_bytes);
    if slices.len() == 1 && queued.is_empty() {
        return Ok(slices);
    }
    let count = slices.len() as u32;
    for slice in &mut slices {
        slice.slices = count;
        slice.staging.clone_from(&early.object.staging);
    }
    for (i, done) in queued.iter().enumerate() {
        let same = slices.get(i).is_some_and(|s| {
            (s.offset, &s.parts, &s.part_sizes, &s.ranges)
                == (done.offset, &done.parts, &done.part_sizes, &done.ranges)
        });
        if !same {
            return Err(StoreError::Invalid {
                object: early.object.name.clone(),
                reason: format!("slice {i}, assembled early, differs from the final layout's"),
            });
        }
    }
    let rest = slices.split_off(queued.len());
    if rest.is_empty() {
        return Err(StoreError::Invalid {
            object: early.object.name.clone(),
            reason: "every slice was queued before the archive's tail was known".into(),
        });
    }
    Ok(rest)
}

/// The GGUF files a job's tasks write in place (local filesystem).
#[derive(Debug, Clone)]
pub struct InPlace {
    /// Per compressing task, in task order: where its output goes.
    pub outputs: Vec<PositionedOutput>,
    /// Each file: (final name, staging name, size).
    pub files: Vec<(String, String, u64)>,
}

/// Starts each file's staging object (named by `staging`; with `keep`, a resumed job's files
/// as its finished tasks left them) with its head and places every task's output after it,
/// as the layout gives them.
pub async fn in_place(
    out: &StoreLocation,
    files: Vec<GgufFile>,
    task_count: usize,
    staging: impl Fn(&str) -> String,
    keep: bool,
) -> Result<InPlace, StoreError> {
    let mut outputs = vec![PositionedOutput::default(); task_count];
    let mut placed = Vec::with_capacity(files.len());
    for file in files {
        let object = out
            .begin_shared(&file.name, &staging(&file.name), keep)
            .await?;
        let mut at = file.head.len() as u64;
        let mut head = out.slice_writer(&object, 0, 0)?;
        head.write(Bytes::from(file.head)).await?;
        head.finish().await?;
        for (task, &size) in file.tasks.clone().zip(&file.part_sizes) {
            let slot = outputs.get_mut(task).ok_or_else(|| StoreError::Invalid {
                object: out.describe(&file.name),
                reason: format!("the layout places task {task} of {task_count}"),
            })?;
            *slot = PositionedOutput {
                staging: object.staging.clone(),
                offset: at,
                size,
            };
            at += size;
        }
        placed.push((file.name, object.staging, at));
    }
    Ok(InPlace {
        outputs,
        files: placed,
    })
}

/// The slices that hash the in-place files once every compressing task has written its
/// part: each task's reported size is checked against the layout first.
pub fn hash_in_place(
    out: &StoreLocation,
    in_place: &InPlace,
    tasks: &[TaskSlot],
    slice_bytes: u64,
) -> Result<Vec<(String, AssembleSlice)>, StoreError> {
    let compressing = tasks.iter().filter(|t| t.assemble.is_none());
    for (slot, placed) in compressing.zip(&in_place.outputs) {
        let written = slot.result.as_ref().map_or(0, |r| r.report.output_bytes);
        if written != placed.size {
            return Err(StoreError::Invalid {
                object: out.describe(&placed.staging),
                reason: format!(
                    "task {} wrote {written} bytes, the GGUF layout gives it {}",
                    slot.plan.index, placed.size
                ),
            });
        }
    }
    let mut hashing = Vec::new();
    for (name, staging, size) in &in_place.files {
        let layout = AssembleSlice {
            parts: vec![staging.clone()],
            part_sizes: vec![*size],
            ranges: vec![PartRange {
                part: 0,
                start: 0,
                end: *size,
            }],
            ..Default::default()
        };
        for mut slice in slices(layout, slice_bytes) {
            // The one part is the file itself.
            slice.delete_after.clear();
            slice.hash_only = true;
            slice.staging.clone_from(staging);
            hashing.push((name.clone(), slice));
        }
    }
    Ok(hashing)
}

/// Makes a file that several slices wrote (or hashed in place) appear under its name
/// (renaming the staging file or completing the upload) and returns its manifest entry, the
/// hash merged from the slices'. `slots` are the file's assembly tasks, all done.
pub async fn commit(
    out: &StoreLocation,
    name: &str,
    slots: &[&TaskSlot],
) -> Result<ManifestEntry, StoreError> {
    let invalid = |reason: String| StoreError::Invalid {
        object: out.describe(name),
        reason,
    };
    let mut slices = Vec::with_capacity(slots.len());
    let mut part_ids = Vec::with_capacity(slots.len());
    let mut object = None;
    for (i, slot) in slots.iter().enumerate() {
        let (Some(spec), Some(done)) = (&slot.assemble, &slot.result) else {
            return Err(invalid(format!("assembly slice {i} has not finished")));
        };
        if spec.slice as usize != i {
            return Err(invalid(format!(
                "slice {} listed as number {i}",
                spec.slice
            )));
        }
        let report = &done.report;
        let cv = blake3::Hash::from_hex(&report.output_blake3)
            .map_err(|e| invalid(format!("slice {i} reported a bad hash: {e}")))?;
        slices.push((spec.offset, report.output_bytes, *cv.as_bytes()));
        part_ids.push(report.upload_part.clone());
        object.get_or_insert_with(|| SharedObject {
            name: name.to_string(),
            staging: spec.staging.clone(),
            upload_id: spec.upload_id.clone(),
        });
    }
    let object = object.ok_or_else(|| invalid("no assembly slices".into()))?;
    let size: u64 = slices.iter().map(|s| s.1).sum();
    // One slice hashed the whole file: its hash is the root's.
    let hash = match slices.as_slice() {
        [(_, _, root)] => Some(blake3::Hash::from_bytes(*root)),
        _ => merged_hash(&slices, size),
    };
    let committed = match hash {
        Some(hash) => out
            .complete_shared(&object, part_ids, size)
            .await
            .map(|()| hash),
        None => Err(invalid(
            "the slices' offsets and lengths do not tile the file".into(),
        )),
    };
    if committed.is_ok() {
        Journal::at(out.clone()).forget_shared_upload(&object).await;
    }
    match committed {
        Ok(hash) => Ok(ManifestEntry {
            name: name.to_string(),
            size,
            blake3: hash.to_hex().to_string(),
        }),
        Err(e) => {
            out.abort_shared(&object).await;
            Err(e)
        }
    }
}

/// The BLAKE3 hash of a file of `size` bytes from its slices' (offset, length, chaining
/// value), which must be whole subtrees of its tree; None when they are not.
pub fn merged_hash(slices: &[(u64, u64, ChainingValue)], size: u64) -> Option<blake3::Hash> {
    fn subtree(
        slices: &[(u64, u64, ChainingValue)],
        start: u64,
        len: u64,
    ) -> Option<ChainingValue> {
        if let Some(&(_, _, cv)) = slices.iter().find(|s| s.0 == start && s.1 == len) {
            return Some(cv);
        }
        if len <= blake3::CHUNK_LEN as u64 {
            return None;
        }
        let left = left_subtree_len(len);
        let (l, r) = (
            subtree(slices, start, left)?,
            subtree(slices, start + left, len - left)?,
        );
        Some(merge_subtrees_non_root(&l, &r, Mode::Hash))
    }
    if size <= blake3::CHUNK_LEN as u64 || slices.len() < 2 {
        return None;
    }
    let left = left_subtree_len(size);
    let l = subtree(slices, 0, left)?;
    let r = subtree(slices, left, size - left)?;
    Some(merge_subtrees_root(&l, &r, Mode::Hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use blake3::hazmat::HasherExt;

    fn layout(parts: &[(&str, u64)], ranges: &[(u32, u64, u64)]) -> AssembleSlice {
        AssembleSlice {
            parts: parts.iter().map(|p| p.0.to_string()).collect(),
            part_sizes: parts.iter().map(|p| p.1).collect(),
            ranges: ranges
                .iter()
                .map(|&(part, start, end)| PartRange { part, start, end })
                .collect(),
            ..Default::default()
        }
    }

    /// The bytes a layout describes, byte `i` of a part depending on its name and `i`.
    fn bytes_of(layout: &AssembleSlice) -> Vec<u8> {
        let mut out = Vec::new();
        for r in &layout.ranges {
            let seed: u64 = layout.parts[r.part as usize].bytes().map(u64::from).sum();
            out.extend((r.start..r.end).map(|i| (seed * 31 + i) as u8));
        }
        out
    }

    #[test]
    fn slices_cover_the_file_in_order_and_list_only_their_parts() {
        let whole = layout(
            &[("head", 10), ("a", 5000), ("b", 3000), ("tail", 700)],
            &[
                (0, 0, 10),
                (1, 0, 1000),
                (1, 1500, 5000),
                (2, 0, 3000),
                (3, 0, 700),
            ],
        );
        let size = file_size(&whole);
        assert_eq!(size, 10 + 1000 + 3500 + 3000 + 700);
        let slices = cut(&whole, 2048);
        assert_eq!(slices.len() as u64, size.div_ceil(2048));
        let mut joined = Vec::new();
        for (i, s) in slices.iter().enumerate() {
            assert_eq!(s.slice as usize, i);
            assert_eq!(s.slices as usize, slices.len());
            assert_eq!(s.offset, i as u64 * 2048);
            assert_eq!(s.parts.len(), s.part_sizes.len());
            for r in &s.ranges {
                assert!(r.start < r.end && r.end <= s.part_sizes[r.part as usize]);
            }
            let expected = if i + 1 < slices.len() {
                2048
            } else {
                size % 2048
            };
            assert_eq!(file_size(s), expected);
            joined.extend(bytes_of(s));
        }
        assert_eq!(joined, bytes_of(&whole));
        // The first slice starts with the head and does not list the tail.
        assert_eq!(slices[0].parts, ["head", "a"]);
        assert_eq!(slices.last().unwrap().parts.last().unwrap(), "tail");
    }

    #[test]
    fn merged_hash_equals_hashing_the_whole_file() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for slice in [1024u64, 4096, 16384, 65536] {
            for size in [1025u64, 4096, 4097, 50_000, 65536, 131_073, 200_000] {
                let size = size.min(data.len() as u64);
                if size <= slice {
                    continue;
                }
                let slices: Vec<(u64, u64, ChainingValue)> = (0..size.div_ceil(slice))
                    .map(|i| {
                        let (start, end) = (i * slice, ((i + 1) * slice).min(size));
                        let mut hasher = blake3::Hasher::new();
                        hasher.set_input_offset(start);
                        hasher.update(&data[start as usize..end as usize]);
                        (start, end - start, hasher.finalize_non_root())
                    })
                    .collect();
                assert_eq!(
                    merged_hash(&slices, size),
                    Some(blake3::hash(&data[..size as usize])),
                    "slice {slice}, size {size}"
                );
            }
        }
    }

    #[test]
    fn merged_hash_refuses_slices_that_do_not_tile_the_file() {
        let cv = [7u8; 32];
        assert_eq!(merged_hash(&[(0, 2048, cv), (2048, 1000, cv)], 4000), None);
        assert_eq!(merged_hash(&[(0, 1024, cv), (2048, 1024, cv)], 3072), None);
        assert_eq!(merged_hash(&[(0, 4096, cv)], 4096), None);
    }

    #[test]
    fn slice_lengths_must_be_powers_of_two() {
        assert!(check_slice_bytes(64 << 20).is_ok());
        assert!(check_slice_bytes(1024).is_ok());
        assert!(check_slice_bytes(1000).is_err());
        assert!(check_slice_bytes(3 << 20).is_err());
        assert!(check_slice_bytes(512).is_err());
    }
}
