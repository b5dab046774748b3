//! Mixed precision to a bit budget: which width (bits per code, and optionally a group size)
//! each quantized tensor gets so that the quantized tensors average at most a target number
//! of bits per weight while the predicted error is as small as it can be.
//!
//! A job with `mixed_precision: { target_bpw: 4.5 }` first measures, for every tensor a
//! quantizing pass targets, what each candidate width ([`Width`]: `4`, `"4g32"`, `"8c"`)
//! costs (its bits per weight, exactly
//! as the codec stores it) and the error it causes: the squared relative Frobenius error of
//! the weight, `‖ΔW‖² / ‖W‖²`, which for a Linear fed inputs of no preferred direction is its
//! relative output error. With calibration data the error is measured on the inputs the
//! Linear really sees: `tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)` with `H = XᵀX` of its calibration inputs,
//! the relative squared error of its outputs, for the result the recipe's method (GPTQ, AWQ)
//! gives at that width ([`TensorCandidates::calibration_weighted`]). Summing it over tensors
//! treats every Linear as one stage of the network whose relative error adds to the output's. [`choose`] then picks one candidate per
//! tensor: the cheapest for everyone first, then the upgrades that buy the most error per bit
//! (along each tensor's lower convex hull of cost and error) while the budget allows. The
//! chosen widths go back into the recipe ([`crate::recipe::MixedPrecision::chosen`]), so
//! every later plan of the job, on any machine, applies them.

use std::collections::BTreeMap;

use crate::recipe::Width;

/// One candidate width of one tensor, as measured.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Candidate {
    #[serde(flatten)]
    pub width: Width,
    /// Stored bits per weight (codes, scales, zero points, masks) under this width.
    pub bits_per_weight: f64,
    /// `‖ΔW‖² / ‖W‖²` under this width.
    pub rel_error_sq: f64,
}

/// A tensor's measured candidates.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TensorCandidates {
    pub name: String,
    /// Weights in the tensor.
    pub params: u64,
    pub candidates: Vec<Candidate>,
    /// The errors are relative output errors on the calibration inputs, not weight errors.
    pub calibration_weighted: bool,
}

/// What [`choose`] decided.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Choice {
    pub target_bpw: f64,
    /// Tensor name -> chosen width.
    pub widths: BTreeMap<String, Width>,
    /// Bits per weight of the choice over every measured tensor (what the codec stores).
    pub bits_per_weight: f64,
    /// Σ `rel_error_sq` of the choice, and of the cheapest and the most precise candidates
    /// for every tensor.
    pub predicted_error: f64,
    pub cheapest_error: f64,
    pub cheapest_bpw: f64,
}

/// Why no choice meets the budget.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrecisionError {
    #[error("target of {target} bits/weight is below the {cheapest:.4} bits/weight that the narrowest candidates store; lower the narrowest candidate or raise mixed_precision.target_bpw")]
    BelowCheapest { target: f64, cheapest: f64 },
    #[error("tensor {tensor}: a width {width:?} was measured, which is not one of the recipe's candidates")]
    UnknownWidth { tensor: String, width: String },
    #[error("tensor {tensor}: no candidate was measured")]
    NoCandidates { tensor: String },
    #[error("tensor {tensor}: candidate {width} measured as {what}")]
    BadMeasurement {
        tensor: String,
        width: Width,
        what: String,
    },
}

/// Picks one candidate per tensor: the stored bits of all tensors together at most
/// `target_bpw` per weight, the summed `rel_error_sq` as small as the greedy hull walk finds.
/// Deterministic: ties go to the tensor earlier by name.
pub fn choose(tensors: &[TensorCandidates], target_bpw: f64) -> Result<Choice, PrecisionError> {
    let mut sorted: Vec<&TensorCandidates> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut hulls = Vec::with_capacity(sorted.len());
    for tensor in &sorted {
        for c in &tensor.candidates {
            let bad = |what: String| PrecisionError::BadMeasurement {
                tensor: tensor.name.clone(),
                width: c.width,
                what,
            };
            if !(c.bits_per_weight.is_finite() && c.bits_per_weight >= 0.0) {
                return Err(bad(format!("{} bits/weight", c.bits_per_weight)));
            }
            if !(c.rel_error_sq.is_finite() && c.rel_error_sq >= 0.0) {
                return Err(bad(format!("relative error² {}", c.rel_error_sq)));
            }
        }
        let hull = lower_hull(&tensor.candidates);
        if hull.is_empty() {
            return Err(PrecisionError::NoCandidates {
                tensor: tensor.name.clone(),
            });
        }
        hulls.push(hull);
    }
    let params: u64 = sorted.iter().map(|t| t.params).sum();
    let cost = |t: &TensorCandidates, c: &Candidate| c.bits_per_weight * t.params as f64;
    let mut at: Vec<usize> = vec![0; hulls.len()];
    let mut spent: f64 = (sorted.iter().zip(&hulls))
        .map(|(t, h)| cost(t, &h[0]))
        .sum();
    let budget = target_bpw * params as f64;
    let cheapest_bpw = if params == 0 {
        0.0
    } else {
        spent / params as f64
    };
    // A relative slack for the sums' rounding: a budget met exactly stays met.
    let slack = budget.abs() * 1e-12;
    if spent > budget + slack {
        return Err(PrecisionError::BelowCheapest {
            target: target_bpw,
            cheapest: cheapest_bpw,
        });
    }
    // Every hull step (error saved per bit spent, decreasing along a hull), best first; a
    // step that no longer fits ends its tensor's walk (the later ones build on it).
    let mut steps: Vec<(f64, usize, usize)> = Vec::new();
    for (i, (tensor, hull)) in sorted.iter().zip(&hulls).enumerate() {
        for k in 1..hull.len() {
            let bits = cost(tensor, &hull[k]) - cost(tensor, &hull[k - 1]);
            let saved = hull[k - 1].rel_error_sq - hull[k].rel_error_sq;
            steps.push((saved / bits, i, k));
        }
    }
    steps.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut blocked = vec![false; hulls.len()];
    for (_, i, k) in steps {
        if blocked[i] || at[i] != k - 1 {
            continue;
        }
        let extra = cost(sorted[i], &hulls[i][k]) - cost(sorted[i], &hulls[i][k - 1]);
        if spent + extra > budget + slack {
            blocked[i] = true;
            continue;
        }
        spent += extra;
        at[i] = k;
    }
    let chosen = |i: usize| &hulls[i][at[i]];
    Ok(Choice {
        target_bpw,
        widths: (0..hulls.len())
            .map(|i| (sorted[i].name.clone(), chosen(i).width))
            .collect(),
        bits_per_weight: if params == 0 {
            0.0
        } else {
            spent / params as f64
        },
        predicted_error: (0..hulls.len()).map(|i| chosen(i).rel_error_sq).sum(),
        cheapest_error: hulls.iter().map(|h| h[0].rel_error_sq).sum(),
        cheapest_bpw,
    })
}

/// The candidates on the lower convex hull of (bits per weight, error), cheapest first: each
/// next one costs more and saves less per bit than the one before (a candidate that costs
/// more without being more precise is never worth it).
fn lower_hull(candidates: &[Candidate]) -> Vec<Candidate> {
    let mut sorted: Vec<Candidate> = candidates.to_vec();
    sorted.sort_by(|a, b| {
        (a.bits_per_weight.total_cmp(&b.bits_per_weight))
            .then(a.rel_error_sq.total_cmp(&b.rel_error_sq))
            .then(a.width.cmp(&b.width))
    });
    let mut hull: Vec<Candidate> = Vec::new();
    for c in sorted {
        // Same cost as the last kept one: the first (lower error) stays.
        if hull
            .last()
            .is_some_and(|l| l.bits_per_weight == c.bits_per_weight)
        {
            continue;
        }
        // Not more precise than a cheaper one: never worth its bits.
        if hull
            .last()
            .is_some_and(|l| c.rel_error_sq >= l.rel_error_sq)
        {
            continue;
        }
        while hull.len() >= 2 {
            let (a, b) = (hull[hull.len() - 2], hull[hull.len() - 1]);
            // b is above the segment a-c (saves less per bit than c does after it).
            let slope_ab =
                (a.rel_error_sq - b.rel_error_sq) / (b.bits_per_weight - a.bits_per_weight);
            let slope_bc =
                (b.rel_error_sq - c.rel_error_sq) / (c.bits_per_weight - b.bits_per_weight);
            if slope_bc >= slope_ab {
                hull.pop();
            } else {
                break;
            }
        }
        hull.push(c);
    }
    hull
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, params: u64, points: &[(u8, f64, f64)]) -> TensorCandidates {
        TensorCandidates {
            calibration_weighted: false,
            name: name.into(),
            params,
            candidates: points
                .iter()
                .map(|&(bits, bits_per_weight, rel_error_sq)| Candidate {
                    width: Width::bits(bits),
                    bits_per_weight,
                    rel_error_sq,
                })
                .collect(),
        }
    }

    /// Every assignment of candidates (small cases only): the best that meets the budget.
    fn brute_force(tensors: &[TensorCandidates], target: f64) -> f64 {
        let params: u64 = tensors.iter().map(|t| t.params).sum();
        let mut best = f64::INFINITY;
        let total: usize = tensors.iter().map(|t| t.candidates.len()).product();
        for mut code in 0..total {
            let (mut bits, mut error) = (0.0, 0.0);
            for t in tensors {
                let c = &t.candidates[code % t.candidates.len()];
                code /= t.candidates.len();
                bits += c.bits_per_weight * t.params as f64;
                error += c.rel_error_sq;
            }
            if bits <= target * params as f64 + 1e-9 {
                best = best.min(error);
            }
        }
        best
    }

    fn widths() -> Vec<(u8, f64, f64)> {
        vec![
            (3, 3.25, 0.04),
            (4, 4.25, 0.01),
            (6, 6.25, 0.0007),
            (8, 8.25, 0.00005),
        ]
    }

    #[test]
    fn the_budget_is_met_and_spent_where_it_saves_most() {
        // b is 4x as sensitive as a at every width, same size: it gets the bits first.
        let scaled = |f: f64| {
            widths()
                .into_iter()
                .map(|(b, p, e)| (b, p, e * f))
                .collect::<Vec<_>>()
        };
        let tensors = vec![
            tensor("a", 1000, &scaled(1.0)),
            tensor("b", 1000, &scaled(4.0)),
        ];
        let choice = choose(&tensors, 5.25).unwrap();
        assert!(choice.bits_per_weight <= 5.25 + 1e-12);
        assert!(
            choice.widths["b"].bits > choice.widths["a"].bits,
            "{choice:?}"
        );
        assert_eq!(choice.predicted_error, brute_force(&tensors, 5.25));
        // A budget at the cheapest: everyone at 3 bits.
        let low = choose(&tensors, 3.25).unwrap();
        assert!(low.widths.values().all(|w| w.bits == 3));
        // Enough for everything: everyone at 8 bits.
        let high = choose(&tensors, 9.0).unwrap();
        assert!(high.widths.values().all(|w| w.bits == 8));
    }

    #[test]
    fn greedy_matches_brute_force_on_varied_cases() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as f64 / (1u64 << 31) as f64
        };
        let mut worse = 0usize;
        for case in 0..200 {
            let tensors: Vec<TensorCandidates> = (0..4)
                .map(|t| {
                    let size = 100 + (next() * 10_000.0) as u64;
                    let sens = 0.1 + next() * 10.0;
                    let points: Vec<(u8, f64, f64)> = widths()
                        .into_iter()
                        .map(|(b, p, e)| (b, p, e * sens))
                        .collect();
                    tensor(&format!("t{case}.{t}"), size, &points)
                })
                .collect();
            let target = 3.25 + next() * 5.0;
            let choice = choose(&tensors, target).unwrap();
            assert!(choice.bits_per_weight <= target + 1e-9);
            let best = brute_force(&tensors, target);
            assert!(choice.predicted_error >= best - 1e-15);
            // The greedy hull walk is exact at the hull's breakpoints, not in between: it may
            // leave a little of the budget unused, never a lot of error on the table.
            if choice.predicted_error > best * 1.5 + 1e-12 {
                worse += 1;
            }
        }
        assert!(worse <= 10, "{worse} of 200 cases far from the optimum");
    }

    #[test]
    fn dominated_candidates_are_never_chosen() {
        // 5 bits costs more than 4 and is no better: never chosen, whatever the budget.
        let t = tensor(
            "a",
            64,
            &[(4, 4.25, 0.01), (5, 5.25, 0.01), (8, 8.25, 0.0001)],
        );
        for target in [4.25, 5.25, 6.0, 8.25] {
            let choice = choose(std::slice::from_ref(&t), target).unwrap();
            assert_ne!(choice.widths["a"].bits, 5);
        }
    }

    #[test]
    fn impossible_and_bad_measurements_are_refused() {
        let t = tensor("a", 64, &widths());
        let err = choose(std::slice::from_ref(&t), 3.0).unwrap_err();
        assert!(err.to_string().contains("below the 3.2500"), "{err}");
        let nan = tensor("b", 64, &[(4, 4.25, f64::NAN)]);
        let err = choose(&[nan], 5.0).unwrap_err();
        assert!(err.to_string().contains("tensor b"), "{err}");
        let none = tensor("c", 64, &[]);
        assert!(matches!(
            choose(&[none], 5.0),
            Err(PrecisionError::NoCandidates { .. })
        ));
    }
}
