//! The round's plan: which steps exist, what each reads and waits for.

use super::*;

fn layout(layers: usize) -> ModelLayout {
    ModelLayout {
        embedding: vec!["embed".into()],
        layers: (0..layers)
            .map(|k| LayerLayout {
                tensors: vec![
                    format!("l{k}.q"),
                    format!("l{k}.k"),
                    format!("l{k}.o"),
                    format!("l{k}.norm"),
                ],
                groups: vec![
                    vec![format!("l{k}.q"), format!("l{k}.k")],
                    vec![format!("l{k}.o")],
                ],
            })
            .collect(),
        head: vec!["head".into()],
    }
}

fn batches(n: usize) -> Vec<Vec<Vec<u32>>> {
    (0..n).map(|b| vec![vec![b as u32, 1, 2]]).collect()
}

fn count(plan: &StepPlan, kind: StepKind) -> usize {
    plan.steps.iter().filter(|s| s.kind == kind).count()
}

#[test]
fn every_step_waits_for_exactly_the_objects_it_reads() {
    let plan = plan_steps(
        &layout(3),
        &|t| !t.ends_with(".k"),
        &batches(2),
        &batches(1),
    );
    // Calibration: 2 embeds, per layer 2 stats, 2 solves (q, o), and 2 forwards for the
    // first two layers; evaluation: 2 embeds (original, compressed), 3 x 2 forwards, 1 eval.
    assert_eq!(count(&plan, StepKind::Embed), 4);
    assert_eq!(count(&plan, StepKind::Stats), 6);
    assert_eq!(count(&plan, StepKind::Solve), 6);
    assert_eq!(count(&plan, StepKind::Forward), 4 + 6);
    assert_eq!(count(&plan, StepKind::Eval), 1);
    assert_eq!(plan.solved.len(), 6);
    assert!(!plan.solved.contains_key("l0.k"));
    // Each input is the output of exactly one dependency, which comes earlier.
    for (i, step) in plan.steps.iter().enumerate() {
        for input in &step.inputs {
            let producers: Vec<u32> = (plan.steps.iter().enumerate())
                .filter(|(_, s)| &s.output == input)
                .map(|(j, _)| j as u32)
                .collect();
            assert_eq!(producers.len(), 1, "{input}");
            assert!(
                step.deps.contains(&producers[0]),
                "{} reads {input}",
                step.label()
            );
        }
        assert!(
            step.deps.iter().all(|&d| (d as usize) < i),
            "{}",
            step.label()
        );
        // A compressed forward waits for its layer's solves and names their results.
        if step.kind == StepKind::Forward && step.compressed {
            let solves: Vec<&CalibStep> = (plan.steps.iter())
                .filter(|s| s.kind == StepKind::Solve && s.layer == step.layer)
                .collect();
            assert_eq!(step.solved.len(), solves.len());
            for solve in solves {
                let j = plan.steps.iter().position(|s| s == solve).unwrap() as u32;
                assert!(step.deps.contains(&j));
            }
        }
    }
    // A solve sums every batch's statistics of its layer, in batch order.
    let solve = plan
        .steps
        .iter()
        .find(|s| s.kind == StepKind::Solve && s.layer == 1)
        .unwrap();
    assert_eq!(
        solve.inputs,
        vec![
            format!("{CALIB_DIR}/s/001-b0000"),
            format!("{CALIB_DIR}/s/001-b0001")
        ]
    );
    assert_eq!(solve.group, 0);
    assert_unique_outputs(&plan.steps);
}

/// No object is written by two steps.
fn assert_unique_outputs<'a>(steps: impl IntoIterator<Item = &'a CalibStep>) {
    let mut outputs: Vec<&String> = (steps.into_iter())
        .map(|s| &s.output)
        .filter(|o| !o.is_empty())
        .collect();
    let before = outputs.len();
    outputs.sort();
    outputs.dedup();
    assert_eq!(outputs.len(), before);
}

#[test]
fn sensitivity_steps_score_each_linear_on_the_original_model_and_share_no_object() {
    let measured = |t: &str| !t.ends_with(".k");
    let sensitivity = plan_sensitivity(&layout(3), &measured, &batches(3));
    // 3 embeds, per layer 3 stats and 2 sensitivity steps (q, o), 3 forwards for the first
    // two layers, none compressed, no solve.
    assert_eq!(count(&sensitivity, StepKind::Embed), 3);
    assert_eq!(count(&sensitivity, StepKind::Stats), 9);
    assert_eq!(count(&sensitivity, StepKind::Sensitivity), 6);
    assert_eq!(count(&sensitivity, StepKind::Forward), 6);
    assert_eq!(count(&sensitivity, StepKind::Solve), 0);
    assert!(sensitivity.solved.is_empty());
    let steps = &sensitivity.steps;
    for (i, step) in steps.iter().enumerate() {
        assert!(
            !step.compressed && step.solved.is_empty(),
            "{}",
            step.label()
        );
        let reads = step.inputs.iter().chain(Some(&step.scored_on));
        for input in reads.filter(|i| !i.is_empty()) {
            let producer = steps.iter().position(|s| &s.output == input).unwrap() as u32;
            assert!(
                step.deps.contains(&producer),
                "{} reads {input}",
                step.label()
            );
        }
        assert!(step.deps.iter().all(|&d| (d as usize) < i));
    }
    // A sensitivity step: its Linear first, then the rest of its layer; fitted on every
    // batch's statistics, scored on batch 0's inputs to the layer; it writes nothing.
    let o1 = (steps.iter())
        .find(|s| s.kind == StepKind::Sensitivity && s.tensors[0] == "l1.o")
        .unwrap();
    assert_eq!(o1.tensors, ["l1.o", "l1.q", "l1.k", "l1.norm"]);
    assert_eq!(o1.group, 1);
    assert_eq!(o1.inputs.len(), 3);
    assert_eq!(o1.scored_on, format!("{CALIB_DIR}/h/m001-b0000"));
    assert!(o1.output.is_empty());
    assert_eq!(o1.label(), "sensitivity l1.o");
    // Beside the calibration round of the same job, no object is written twice.
    let calibration = plan_steps(&layout(3), &measured, &batches(3), &batches(1));
    assert_unique_outputs(steps.iter().chain(&calibration.steps));
    // Nothing measured, or no batches: no steps.
    assert!(plan_sensitivity(&layout(3), &|_| false, &batches(3))
        .steps
        .is_empty());
    assert!(plan_sensitivity(&layout(3), &measured, &[])
        .steps
        .is_empty());
}

#[test]
fn calibration_stops_at_the_last_calibrated_layer_and_evaluation_alone_needs_no_solve() {
    let only_first = plan_steps(&layout(4), &|t| t.starts_with("l0."), &batches(3), &[]);
    assert_eq!(count(&only_first, StepKind::Stats), 3);
    assert_eq!(count(&only_first, StepKind::Forward), 0);
    let eval_only = plan_steps(&layout(2), &|_| false, &[], &batches(2));
    assert_eq!(count(&eval_only, StepKind::Solve), 0);
    assert_eq!(count(&eval_only, StepKind::Forward), 2 * 2 * 2);
    assert_eq!(count(&eval_only, StepKind::Eval), 2);
    let eval = eval_only
        .steps
        .iter()
        .find(|s| s.kind == StepKind::Eval)
        .unwrap();
    assert_eq!(
        eval.inputs,
        vec![
            format!("{CALIB_DIR}/h/o002-b0000"),
            format!("{CALIB_DIR}/h/q002-b0000")
        ]
    );
    assert_eq!(eval.sequences, batches(2)[0]);
    assert_eq!(eval.tensors, vec!["head".to_string()]);
    // The compressed stream starts from the embeddings as compressed, and ends with the head
    // as compressed.
    assert!(eval.compressed);
    let embeds: Vec<&CalibStep> = (eval_only.steps.iter())
        .filter(|s| s.kind == StepKind::Embed && s.sequences == batches(2)[0])
        .collect();
    assert_eq!(embeds.len(), 2);
    for embed in embeds {
        assert_eq!(embed.compressed, embed.output.ends_with("q000-b0000"));
    }
}

#[test]
fn evaluation_gates_fail_by_name() {
    let gates = shardpress_core::recipe::Gates {
        min_embedding_cosine: Some(0.99),
        ..Default::default()
    };
    let encoder = Evaluation {
        mean_embedding_cosine: Some(0.98),
        ..Default::default()
    };
    assert_eq!(encoder.failed_gates(&gates).len(), 1);
    let good = Evaluation {
        mean_embedding_cosine: Some(0.995),
        ..Default::default()
    };
    assert!(good.failed_gates(&gates).is_empty());
    let decoder_gates = shardpress_core::recipe::Gates {
        min_top1: Some(0.9),
        max_kld: Some(0.1),
        ..Default::default()
    };
    let decoder = Evaluation {
        top1_agreement: Some(0.95),
        mean_kld: Some(0.2),
        ..Default::default()
    };
    let failed = decoder.failed_gates(&decoder_gates);
    assert_eq!(failed.len(), 1);
    assert!(failed[0].contains("KL"), "{failed:?}");
    assert_eq!(encoder.failed_gates(&decoder_gates).len(), 2);
}
