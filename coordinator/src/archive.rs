//! The data region of an `.spz` archive, laid out from the compressing tasks' reports: the
//! magic, then each task's part in task order, leaving out the records of tensors identical to
//! an earlier one ([`crate::share`]). A record is only ever left out for an *earlier* one, so
//! the tasks `0..k` lay out exactly the first bytes of the archive that all tasks lay out:
//! slices of the archive that lie within them are assembled while later tasks still run
//! ([`early_slices`]), and the tail (companion files, index, footer) follows the last task.

use std::collections::HashMap;

use bytes::Bytes;

use shardpress_core::format::spz::PARTS_DIR;
use shardpress_core::spz;
use shardpress_proto::v1::{AssembleSlice, PartRange};
use shardpress_store::{StoreError, StoreLocation};

use crate::job::TaskSlot;
use crate::share::shared_tensors;

/// The part holding the archive's magic, written by the coordinator.
pub fn head_name() -> String {
    format!("{PARTS_DIR}/head.bin")
}

/// Writes the head part (the archive's magic), which the first slice reads.
pub async fn write_head(out: &StoreLocation) -> Result<(), StoreError> {
    out.put(&head_name(), Bytes::from_static(spz::MAGIC)).await
}

/// The archive from its first byte to the end of the last task's part.
pub struct DataLayout<'a> {
    /// The parts (the head first) and the ranges of them the region copies, in order.
    pub layout: AssembleSlice,
    /// The region's length: where the next byte of the archive goes.
    pub end: u64,
    /// Each stored record: (offset in the archive, length, blake3), by tensor name.
    pub located: HashMap<&'a str, (u64, u64, &'a str)>,
    /// Tensors stored as a reference to another's record (see [`shared_tensors`]).
    pub shared: HashMap<String, String>,
}

/// Lays out the archive's data region for `tasks` (assembly slots are skipped; a task
/// without a result contributes nothing, so pass only finished ones).
pub fn data_layout(tasks: &[TaskSlot]) -> Result<DataLayout<'_>, StoreError> {
    let shared = shared_tensors(tasks);
    let mut located: HashMap<&str, (u64, u64, &str)> = HashMap::new();
    let mut offset = spz::MAGIC.len() as u64;
    let mut parts = vec![head_name()];
    let mut part_sizes = vec![spz::MAGIC.len() as u64];
    let mut ranges = vec![PartRange {
        part: 0,
        start: 0,
        end: spz::MAGIC.len() as u64,
    }];
    for slot in tasks.iter().filter(|t| t.assemble.is_none()) {
        let Some(outcome) = &slot.result else {
            continue;
        };
        let part = parts.len() as u32;
        let part_size = outcome.report.output_bytes;
        let mut records: Vec<_> = outcome
            .report
            .tensors
            .iter()
            .filter(|r| r.record_len > 0)
            .collect();
        records.sort_by_key(|r| r.record_offset);
        let mut cursor = 0;
        for r in records {
            let record_end = r.record_offset.saturating_add(r.record_len);
            if r.record_offset < cursor || record_end > part_size {
                return Err(StoreError::Invalid {
                    object: slot.plan.output_name.clone(),
                    reason: format!(
                        "record of {} at {}+{} overlaps another or runs past the part's {part_size} bytes",
                        r.name, r.record_offset, r.record_len
                    ),
                });
            }
            let location = match shared
                .get(&r.name)
                .and_then(|kept| located.get(kept.as_str()))
            {
                Some(&kept) => {
                    ranges.push(PartRange {
                        part,
                        start: cursor,
                        end: r.record_offset,
                    });
                    offset += r.record_offset - cursor;
                    cursor = record_end;
                    kept
                }
                None => (
                    offset + (r.record_offset - cursor),
                    r.record_len,
                    r.record_blake3.as_str(),
                ),
            };
            located.insert(&r.name, location);
        }
        ranges.push(PartRange {
            part,
            start: cursor,
            end: part_size,
        });
        offset += part_size - cursor;
        parts.push(slot.plan.output_name.clone());
        part_sizes.push(part_size);
    }
    ranges.retain(|r| r.end > r.start);
    Ok(DataLayout {
        layout: AssembleSlice {
            parts,
            part_sizes,
            ranges,
            ..Default::default()
        },
        end: offset,
        located,
        shared,
    })
}

/// The slices numbered `from` on that lie wholly within the data region of `prefix` (the
/// first finished tasks, in order), cut as [`crate::assembly::cut`] cuts the whole archive:
/// they are final, whatever the later tasks write. Their file's slice count is not known yet
/// (`slices` is 0).
pub fn early_slices(
    prefix: &[TaskSlot],
    slice_bytes: u64,
    from: u32,
) -> Result<Vec<AssembleSlice>, StoreError> {
    let data = data_layout(prefix)?;
    let full = data.end / slice_bytes;
    if full <= u64::from(from) {
        return Ok(Vec::new());
    }
    let mut slices = crate::assembly::cut(&data.layout, slice_bytes);
    slices.truncate(full as usize);
    Ok(slices
        .into_iter()
        .skip(from as usize)
        .map(|slice| AssembleSlice { slices: 0, ..slice })
        .collect())
}
