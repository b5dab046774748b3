//! Function-space comparison of an original and a compressed model's outputs: embedding
//! cosine for encoders; KL divergence, top-1 agreement (argmax) and log-probabilities
//! (perplexity) for decoders. All sums in f64.
//!
//! These return numbers, not Results, so they compose in report code: inputs that admit no
//! answer (lengths that differ, empty logits) give NaN, which fails every gate comparison.

/// Cosine similarity; 0 when either vector is all zeros, NaN when the lengths differ.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let (mut dot, mut norm_a, mut norm_b) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        dot += x * y;
        norm_a += x * x;
        norm_b += y * y;
    }
    if norm_a == 0.0 || norm_b == 0.0 {
        return 0.0;
    }
    dot / (norm_a.sqrt() * norm_b.sqrt())
}

/// log Σ exp(logits), stable.
fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    if !max.is_finite() {
        return max;
    }
    max + logits
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// KL(P_ref ‖ P_other) of the two softmaxes, in nats; NaN when the lengths differ or are 0.
pub fn kl_divergence(reference_logits: &[f32], other_logits: &[f32]) -> f64 {
    if reference_logits.len() != other_logits.len() || reference_logits.is_empty() {
        return f64::NAN;
    }
    let (ref_norm, other_norm) = (log_sum_exp(reference_logits), log_sum_exp(other_logits));
    reference_logits
        .iter()
        .zip(other_logits)
        .map(|(&r, &o)| {
            let log_p = r as f64 - ref_norm;
            let log_q = o as f64 - other_norm;
            let p = log_p.exp();
            if p == 0.0 {
                0.0
            } else {
                p * (log_p - log_q)
            }
        })
        .sum::<f64>()
        .max(0.0)
}

/// Index of the largest logit (the first on ties; NaNs never win; 0 for an empty slice).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best: Option<(usize, f32)> = None;
    for (index, &value) in logits.iter().enumerate() {
        if value.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, top)| value > top) {
            best = Some((index, value));
        }
    }
    best.map_or(0, |(index, _)| index)
}

/// log softmax(logits)[token]; NaN when `token` is out of range.
pub fn log_prob(logits: &[f32], token: usize) -> f64 {
    match logits.get(token) {
        Some(&value) => value as f64 - log_sum_exp(logits),
        None => f64::NAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_of_parallel_orthogonal_and_opposite_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-12);
        assert!((cosine(&[1.0, -1.0], &[-1.0, 1.0]) + 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
        assert!(cosine(&[1.0], &[1.0, 2.0]).is_nan());
    }

    #[test]
    fn kl_is_zero_for_equal_distributions_and_matches_a_hand_computation() {
        assert!(kl_divergence(&[1.0, 2.0, 3.0], &[11.0, 12.0, 13.0]).abs() < 1e-12);
        // P = softmax(0, ln 3) = (1/4, 3/4); Q = (1/2, 1/2).
        let expected = 0.25 * (0.5f64).ln() + 0.75 * (1.5f64).ln();
        let kl = kl_divergence(&[0.0, 3.0f32.ln()], &[0.0, 0.0]);
        assert!((kl - expected).abs() < 1e-7, "{kl} vs {expected}");
        assert!(kl_divergence(&[0.0, 0.0], &[0.0, 5.0]) > 0.0);
        // Huge logits do not overflow.
        assert!(kl_divergence(&[1000.0, 0.0], &[1000.0, 0.0]).abs() < 1e-12);
        assert!(kl_divergence(&[1.0], &[1.0, 2.0]).is_nan());
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[0.5, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -5.0, -6.0]), 1);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn log_prob_is_a_log_softmax_entry() {
        let lp = log_prob(&[0.0, 3.0f32.ln()], 1);
        assert!((lp - 0.75f64.ln()).abs() < 1e-7);
        let total: f64 = (0..3).map(|t| log_prob(&[1.0, 2.0, 3.0], t).exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!(log_prob(&[1.0], 4).is_nan());
    }
}
