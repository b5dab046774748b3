//! Layer sharing in `.spz` archives: a tensor whose record is byte-identical to an earlier
//! tensor's (same blake3 and length, same dtype, shape and plan) is stored once; its index
//! entry points at the earlier record. Tied embeddings saved twice are the common real case.
//! Records are deterministic functions of the tensor's bytes and its plan, so identical
//! source tensors under the same plan always share. Tensors that a worker found
//! near-identical to another (recipe `share.cosine`) come with no record and name the
//! tensor whose record they use.

use std::collections::HashMap;

use crate::job::TaskSlot;

/// For each tensor stored as a reference: the name of the tensor whose record it shares.
/// Among identical records the first in archive order (task, then offset in its part)
/// keeps it.
pub fn shared_tensors(tasks: &[TaskSlot]) -> HashMap<String, String> {
    let mut first: HashMap<(&str, u64, &str, &[u64], &str), &str> = HashMap::new();
    let mut shared = HashMap::new();
    let results = tasks
        .iter()
        .filter(|slot| slot.assemble.is_none())
        .filter_map(|slot| slot.result.as_ref())
        .flat_map(|outcome| {
            let mut in_part: Vec<_> = outcome.report.tensors.iter().collect();
            in_part.sort_by_key(|r| r.record_offset);
            in_part
        });
    for r in results {
        if !r.shared_with.is_empty() {
            shared.insert(r.name.clone(), r.shared_with.clone());
            continue;
        }
        if r.record_len == 0 || r.record_blake3.is_empty() {
            continue;
        }
        let key = (
            r.record_blake3.as_str(),
            r.record_len,
            r.dtype.as_str(),
            r.shape.as_slice(),
            r.pass.as_str(),
        );
        match first.get(&key) {
            Some(kept) => {
                shared.insert(r.name.clone(), kept.to_string());
            }
            None => {
                first.insert(key, &r.name);
            }
        }
    }
    shared
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{TaskOutcome, TaskStatus};
    use shardpress_core::plan::PlannedTask;
    use shardpress_proto::v1::{CompleteTaskRequest, TensorResult};

    fn result(name: &str, hash: &str, shape: &[u64], pass: &str) -> TensorResult {
        TensorResult {
            name: name.into(),
            dtype: "BF16".into(),
            shape: shape.to_vec(),
            pass: pass.into(),
            record_len: 100,
            record_blake3: hash.into(),
            ..Default::default()
        }
    }

    fn slot(results: Vec<TensorResult>) -> TaskSlot {
        TaskSlot {
            plan: PlannedTask {
                index: 0,
                group: String::new(),
                tensors: Vec::new(),
                output_name: String::new(),
                input_bytes: 0,
            },
            status: TaskStatus::Done,
            attempt: 1,
            failures: 0,
            progress_bytes: 0,
            leased_at_seconds: 0.0,
            retry_at: None,
            need: None,
            deps: Vec::new(),
            result: Some(TaskOutcome {
                worker: "w".into(),
                attempt: 1,
                completed_at_seconds: 0.0,
                report: CompleteTaskRequest {
                    tensors: results,
                    ..Default::default()
                },
                restored: false,
            }),
            assemble: None,
            staged: None,
        }
    }

    #[test]
    fn near_identical_references_are_kept_as_reported() {
        let mut near = result("b", "", &[4, 2], "shared");
        near.record_len = 0;
        near.shared_with = "a".into();
        let shared = shared_tensors(&[slot(vec![result("a", "aa", &[4, 2], ""), near])]);
        assert_eq!(shared.len(), 1);
        assert_eq!(shared["b"], "a");
    }

    #[test]
    fn only_identical_records_of_the_same_kind_share_and_the_first_keeps_its_record() {
        let tasks = vec![
            slot(vec![
                result("embed", "aa", &[4, 2], ""),
                result("a", "bb", &[4, 2], "rtn int4"),
            ]),
            slot(vec![
                result("b", "bb", &[2, 4], "rtn int4"),
                result("c", "bb", &[4, 2], "rtn int8"),
                result("lm_head", "aa", &[4, 2], ""),
                result("a2", "bb", &[4, 2], "rtn int4"),
            ]),
        ];
        let shared = shared_tensors(&tasks);
        assert_eq!(shared.len(), 2, "{shared:?}");
        assert_eq!(shared["lm_head"], "embed");
        assert_eq!(shared["a2"], "a");
    }
}
