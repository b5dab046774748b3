//! Tests for planning: layer parsing, grouping, budgets, determinism and error cases.

use super::*;
use crate::header::{encode_header, parse_header};
use proptest::prelude::*;
use std::collections::BTreeSet;

/// A source file holding `tensors` (name, element count) as BF16 vectors.
fn file(name: &str, tensors: &[(&str, u64)]) -> SourceFile {
    let shapes: Vec<[u64; 1]> = tensors.iter().map(|(_, elems)| [*elems]).collect();
    let spec: Vec<(&str, DType, &[u64])> = tensors
        .iter()
        .zip(&shapes)
        .map(|((n, _), s)| (*n, DType::BF16, s.as_slice()))
        .collect();
    typed_file(name, &spec)
}

fn model() -> Vec<SourceFile> {
    vec![
        file(
            "model-00002-of-00002.safetensors",
            &[
                ("model.layers.10.mlp.up_proj.weight", 100),
                ("model.layers.10.self_attn.q_proj.weight", 50),
                ("model.norm.weight", 4),
                ("lm_head.weight", 400),
            ],
        ),
        file(
            "model-00001-of-00002.safetensors",
            &[
                ("model.embed_tokens.weight", 400),
                ("model.layers.2.mlp.up_proj.weight", 100),
                ("model.layers.2.self_attn.q_proj.weight", 50),
                ("model.layers.2.input_layernorm.weight", 4),
            ],
        ),
    ]
}

#[test]
fn layer_names() {
    assert_eq!(layer_index("model.layers.12.mlp.up_proj.weight"), Some(12));
    assert_eq!(layer_index("transformer.h.3.attn.c_attn.weight"), Some(3));
    assert_eq!(layer_index("blocks.0.attn.weight"), Some(0));
    assert_eq!(layer_index("encoder.block.7.layer.1.weight"), Some(7));
    assert_eq!(layer_index("model.embed_tokens.weight"), None);
    assert_eq!(layer_index("mylayers.3.weight"), None);
    assert_eq!(layer_index("layers.3"), None);
    assert_eq!(layer_index("layers.99999999999999999999999.x"), None);
}

#[test]
fn groups_other_first_then_layers_numerically() {
    let plan = plan_tasks(&model(), 10_000).unwrap();
    let groups: Vec<&str> = plan.iter().map(|t| t.group.as_str()).collect();
    assert_eq!(groups, ["other", "layer 2", "layer 10"]);
    let other: Vec<&str> = plan[0].tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        other,
        [
            "lm_head.weight",
            "model.embed_tokens.weight",
            "model.norm.weight"
        ]
    );
    assert_eq!(plan[0].input_bytes, 2 * 804);
    assert_eq!(plan[2].output_name, "model-00003-of-00003.safetensors");
    assert_eq!(plan[0].index, 0);
    let embed = &plan[0].tensors[1];
    assert_eq!(embed.source_file, "model-00001-of-00002.safetensors");
    assert_eq!(embed.byte_len(), 800);
}

#[test]
fn budget_splits_groups_and_isolates_big_tensors() {
    // lm_head and embed (800 B) exceed a 500 B budget; norm (8 B) packs alone after them.
    let plan = plan_tasks(&model(), 500).unwrap();
    let summary: Vec<(String, Vec<String>)> = plan
        .iter()
        .map(|t| {
            (
                t.group.clone(),
                t.tensors.iter().map(|x| x.name.clone()).collect(),
            )
        })
        .collect();
    assert_eq!(summary[0].1, ["lm_head.weight"]);
    assert_eq!(summary[1].1, ["model.embed_tokens.weight"]);
    assert_eq!(summary[2].1, ["model.norm.weight"]);
    assert_eq!(summary[3].0, "layer 2");
    for t in &plan {
        assert!(t.input_bytes <= 500 || t.tensors.len() == 1);
    }
    // With 200 B, layer 2 (8 + 200 + 100 bytes) splits in name order.
    let plan = plan_tasks(&model(), 200).unwrap();
    let l2: Vec<Vec<&str>> = plan
        .iter()
        .filter(|t| t.group == "layer 2")
        .map(|t| t.tensors.iter().map(|x| x.name.as_str()).collect())
        .collect();
    assert_eq!(
        l2,
        [
            vec!["model.layers.2.input_layernorm.weight"],
            vec!["model.layers.2.mlp.up_proj.weight"],
            vec!["model.layers.2.self_attn.q_proj.weight"],
        ]
    );
}

#[test]
fn errors() {
    assert_eq!(plan_tasks(&model(), 0), Err(PlanError::InvalidBudget));
    assert_eq!(plan_tasks(&[], 10), Err(PlanError::Empty));
    assert_eq!(plan_tasks(&[file("a", &[])], 10), Err(PlanError::Empty));
    let dup = [
        file("b.safetensors", &[("x", 1)]),
        file("a.safetensors", &[("x", 1)]),
    ];
    assert_eq!(
        plan_tasks(&dup, 10),
        Err(PlanError::DuplicateTensor {
            name: "x".into(),
            first_file: "a.safetensors".into(),
            second_file: "b.safetensors".into()
        })
    );
}

#[test]
fn absolute_offsets() {
    let files = model();
    let plan = plan_tasks(&files, 10_000).unwrap();
    for t in plan.iter().flat_map(|t| &t.tensors) {
        let f = files.iter().find(|f| f.name == t.source_file).unwrap();
        let info = f.header.tensor(&t.name).unwrap();
        assert_eq!(t.data_start, f.header.data_start() + info.data_offsets.0);
        assert_eq!(t.data_end, f.header.data_start() + info.data_offsets.1);
        assert!(t.data_end <= f.size);
    }
}

fn arb_model() -> impl Strategy<Value = Vec<(String, u64)>> {
    let name = prop_oneof![
        (0u64..6, "[a-d]{1,3}").prop_map(|(l, s)| format!("model.layers.{l}.{s}.weight")),
        "[a-z]{1,6}\\.weight",
    ];
    prop::collection::btree_map(name, 0u64..300, 1..40).prop_map(|m| m.into_iter().collect())
}

proptest! {
    #[test]
    fn every_tensor_once_budget_respected_and_order_independent(
        tensors in arb_model(),
        split in 0usize..40,
        budget in 1u64..700,
    ) {
        let split = split.min(tensors.len());
        let refs: Vec<(&str, u64)> = tensors.iter().map(|(n, e)| (n.as_str(), *e)).collect();
        let a = vec![file("f1", &refs[..split]), file("f2", &refs[split..])];
        let b = vec![a[1].clone(), a[0].clone()];
        let plan = plan_tasks(&a, budget).unwrap();
        prop_assert_eq!(&plan, &plan_tasks(&b, budget).unwrap());
        let names: Vec<&str> = plan.iter().flat_map(|t| t.tensors.iter().map(|x| x.name.as_str())).collect();
        let unique: BTreeSet<&str> = names.iter().copied().collect();
        prop_assert_eq!(names.len(), tensors.len());
        prop_assert_eq!(unique.len(), tensors.len());
        let n = plan.len();
        for (i, t) in plan.iter().enumerate() {
            prop_assert_eq!(t.index as usize, i);
            prop_assert!(t.input_bytes <= budget || t.tensors.len() == 1);
            prop_assert_eq!(&t.output_name, &format!("model-{:05}-of-{:05}.safetensors", i + 1, n));
            prop_assert!(t.tensors.windows(2).all(|w| w[0].name < w[1].name));
            let groups: BTreeSet<Option<u64>> = t.tensors.iter().map(|x| layer_index(&x.name)).collect();
            prop_assert_eq!(groups.len(), 1);
        }
    }
}

/// A source file holding `tensors` (name, dtype, shape).
fn typed_file(name: &str, tensors: &[(&str, DType, &[u64])]) -> SourceFile {
    let spec: Vec<(String, DType, Vec<u64>)> = tensors
        .iter()
        .map(|(n, d, s)| (n.to_string(), *d, s.to_vec()))
        .collect();
    let (prefix, offsets) = encode_header(&spec, &Default::default()).unwrap();
    let size = prefix.len() as u64 + offsets.last().map_or(0, |o| o.1);
    let header = parse_header(&prefix[8..], size).unwrap();
    SourceFile {
        name: name.into(),
        size,
        header,
    }
}

#[test]
fn fp8_weights_take_their_scales_and_become_bf16() {
    // DeepSeek-V3's layout, including a 576-row weight whose grid is 5 x 56 at 128x128.
    let q = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight";
    let o = "model.layers.0.self_attn.o_proj.weight";
    let c = "model.layers.0.mlp.up_proj.weight";
    let files = [
        typed_file(
            "a.safetensors",
            &[
                (q, DType::F8_E4M3, &[576, 7168]),
                (o, DType::F8_E4M3, &[7168, 16384]),
                (
                    "model.layers.0.self_attn.o_proj.weight_scale_inv",
                    DType::F32,
                    &[56, 128],
                ),
                (c, DType::F8_E4M3, &[64, 32]),
                (
                    "model.layers.0.mlp.up_proj.weight_scale",
                    DType::BF16,
                    &[64, 1],
                ),
                (
                    "model.layers.0.input_layernorm.weight",
                    DType::BF16,
                    &[7168],
                ),
            ],
        ),
        typed_file(
            "b.safetensors",
            &[(
                "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv",
                DType::F32,
                &[5, 56],
            )],
        ),
    ];
    let plan = plan_tasks(&files, u64::MAX).unwrap();
    let tensors: Vec<&PlannedTensor> = plan.iter().flat_map(|t| &t.tensors).collect();
    let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(names.iter().all(|n| !n.contains("_scale")), "{names:?}");
    let find = |n: &str| tensors.iter().find(|t| t.name == n).unwrap();
    let (tq, to, tc) = (find(q), find(o), find(c));
    for t in [tq, to, tc] {
        assert_eq!(t.dtype, DType::BF16);
        assert_eq!(t.stored_dtype(), DType::F8_E4M3);
    }
    let sq = tq.scales.as_ref().unwrap();
    assert_eq!(
        (sq.block, sq.source_file.as_str()),
        ([128, 128], "b.safetensors")
    );
    assert_eq!(sq.shape, [5, 56]);
    assert_eq!(to.scales.as_ref().unwrap().block, [128, 128]);
    assert_eq!(tc.scales.as_ref().unwrap().block, [1, 32]);
    // The task's input bytes count the scales.
    let total: u64 = plan.iter().map(|t| t.input_bytes).sum();
    assert_eq!(
        total,
        576 * 7168 + 5 * 56 * 4 + 7168 * 16384 + 56 * 128 * 4 + 64 * 32 + 64 * 2 + 7168 * 2
    );
}

#[test]
fn fp8_scales_that_do_not_fit_their_weight_are_an_error() {
    let w = "model.layers.0.mlp.down_proj.weight";
    let files = [typed_file(
        "a.safetensors",
        &[
            (w, DType::F8_E4M3, &[256, 256]),
            (
                "model.layers.0.mlp.down_proj.weight_scale_inv",
                DType::F32,
                &[3, 7],
            ),
        ],
    )];
    let err = plan_tasks(&files, u64::MAX).unwrap_err().to_string();
    assert!(
        err.contains(w) && err.contains("weight_scale_inv") && err.contains("3x7"),
        "{err}"
    );
}

#[test]
fn experts_are_planned_by_projection_then_expert_number() {
    let names: Vec<String> = (0..12)
        .flat_map(|e| {
            ["w1", "w2", "w3"]
                .map(|w| format!("model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"))
        })
        .chain(["model.layers.0.block_sparse_moe.gate.weight".to_string()])
        .collect();
    let spec: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 4)).collect();
    let plan = plan_tasks(&[file("a.safetensors", &spec)], 8).unwrap();
    let order: Vec<&str> = plan
        .iter()
        .flat_map(|t| &t.tensors)
        .map(|t| t.name.as_str())
        .collect();
    let expected: Vec<String> = ["w1", "w2", "w3"]
        .iter()
        .flat_map(|w| {
            (0..12).map(move |e| format!("model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"))
        })
        .chain(["model.layers.0.block_sparse_moe.gate.weight".to_string()])
        .collect();
    assert_eq!(order, expected);
}

#[test]
fn packed_weights_become_the_tensors_they_decode_to() {
    let m = "model.layers.0.mlp.up_proj";
    let files = [typed_file(
        "a.safetensors",
        &[
            (&format!("{m}.weight_packed"), DType::I32, &[16, 32]),
            (&format!("{m}.weight_scale"), DType::BF16, &[16, 2]),
            (&format!("{m}.weight_zero_point"), DType::I32, &[2, 2]),
            (&format!("{m}.weight_shape"), DType::I64, &[2]),
            ("model.layers.0.input_layernorm.weight", DType::BF16, &[256]),
        ],
    )];
    let shapes = HashMap::from([(format!("{m}.weight_shape"), [16u64, 256])]);
    let plan = plan_tasks_with(&files, u64::MAX, &shapes).unwrap();
    let tensors: Vec<&PlannedTensor> = plan.iter().flat_map(|t| &t.tensors).collect();
    assert_eq!(tensors.len(), 2);
    let w = tensors
        .iter()
        .find(|t| t.name == format!("{m}.weight"))
        .unwrap();
    assert_eq!(
        (w.dtype, w.shape.clone(), w.stored_dtype()),
        (DType::BF16, vec![16, 256], DType::I32)
    );
    let p = w.packed.as_ref().unwrap();
    assert_eq!((p.bits, p.scales.block), (4, [1, 128]));
    assert!(p.zero_points.is_some());
    assert_eq!(w.stored_row_bytes(256), 128);
    // Without the shape's numbers, or with a shape the words cannot hold: a clear error.
    let err = plan_tasks(&files, u64::MAX).unwrap_err().to_string();
    assert!(err.contains("weight_shape was not read"), "{err}");
    let wrong = HashMap::from([(format!("{m}.weight_shape"), [16u64, 1000])]);
    let err = plan_tasks_with(&files, u64::MAX, &wrong)
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not hold"), "{err}");
}
