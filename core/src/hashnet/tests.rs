//! Tests for HashedNets sharing: buckets equal the sign-corrected member means, the
//! least-squares property (perturbing any bucket raises the squared error), lossless sharing
//! when every member of a bucket agrees, determinism and input validation.

use super::*;

fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 250.0 - 2.0)
        .collect()
}

fn sq_err(v: &[f32], buckets: &[f32], seed: u64) -> f64 {
    v.iter()
        .enumerate()
        .map(|(i, &w)| {
            let (b, s) = bucket_and_sign(seed, i, buckets.len());
            (f64::from(w) - f64::from(s * buckets[b])).powi(2)
        })
        .sum()
}

#[test]
fn buckets_are_member_means_and_reconstruct() {
    let v = values(5000);
    let h = hashed_share(&v, 97, 12345).unwrap();
    assert_eq!((h.len, h.buckets.len(), h.stored_bytes()), (5000, 97, 388));
    let mut members: Vec<Vec<f64>> = vec![Vec::new(); 97];
    for (i, &w) in v.iter().enumerate() {
        let (b, s) = bucket_and_sign(12345, i, 97);
        members[b].push(f64::from(s) * f64::from(w));
    }
    for (m, &got) in members.iter().zip(&h.buckets) {
        let mean = m.iter().sum::<f64>() / m.len() as f64;
        assert!((f64::from(got) - mean).abs() < 1e-6);
    }
    let mut out = vec![0f32; v.len()];
    h.reconstruct_into(&mut out);
    for (i, &o) in out.iter().enumerate() {
        let (b, s) = bucket_and_sign(12345, i, 97);
        assert_eq!(o, s * h.buckets[b]);
    }
    // Both signs occur and all buckets are used.
    assert!(v
        .iter()
        .enumerate()
        .any(|(i, _)| bucket_and_sign(12345, i, 97).1 < 0.0));
    assert!(members.iter().all(|m| !m.is_empty()));
}

#[test]
fn buckets_are_least_squares_optimal() {
    let v = values(3000);
    let h = hashed_share(&v, 50, 7).unwrap();
    let base = sq_err(&v, &h.buckets, 7);
    for b in 0..h.buckets.len() {
        for delta in [1e-3f32, -1e-3] {
            let mut p = h.buckets.clone();
            p[b] += delta;
            assert!(sq_err(&v, &p, 7) > base, "bucket {b} delta {delta}");
        }
    }
}

#[test]
fn consistent_members_are_lossless() {
    // w_i = xi(i) * c[h(i)] for arbitrary bucket values c: sharing recovers it exactly.
    let c: Vec<f32> = (0..31).map(|b| b as f32 * 0.5 - 7.0).collect();
    let v: Vec<f32> = (0..2000)
        .map(|i| {
            let (b, s) = bucket_and_sign(99, i, c.len());
            s * c[b]
        })
        .collect();
    let h = hashed_share(&v, c.len(), 99).unwrap();
    let mut out = vec![0f32; v.len()];
    h.reconstruct_into(&mut out);
    assert_eq!(out, v);
}

#[test]
fn edge_cases_and_determinism() {
    assert_eq!(hashed_share(&[1.0], 0, 0), Err(HashNetError::ZeroBuckets));
    assert_eq!(
        hashed_share(&[1.0, f32::NAN], 3, 0),
        Err(HashNetError::NonFinite { index: 1 })
    );
    let empty = hashed_share(&[], 4, 0).unwrap();
    assert_eq!(empty.buckets, vec![0.0; 4]);
    // More buckets than weights: empty buckets are 0.
    let h = hashed_share(&[1.0, 2.0], 64, 3).unwrap();
    assert!(h.buckets.iter().filter(|&&b| b == 0.0).count() >= 62);
    let v = values(40_000);
    assert_eq!(
        hashed_share(&v, 1000, 5).unwrap(),
        hashed_share(&v, 1000, 5).unwrap()
    );
    assert_ne!(
        hashed_share(&v, 1000, 5).unwrap(),
        hashed_share(&v, 1000, 6).unwrap()
    );
    // Short output: only the prefix is written.
    let h = hashed_share(&v[..10], 4, 5).unwrap();
    let mut out = vec![9f32; 20];
    h.reconstruct_into(&mut out);
    assert!(out[10..].iter().all(|&x| x == 9.0));
}

#[test]
fn many_buckets_match_sequential_reference_exactly() {
    // More buckets than one accumulation range and more weights than one hashing pass.
    let v = values(SUPER + 12_345);
    let buckets = 3 * RANGE + 17;
    let h = hashed_share(&v, buckets, 77).unwrap();
    let mut sums = vec![0f64; buckets];
    let mut counts = vec![0u64; buckets];
    for (i, &w) in v.iter().enumerate() {
        let (b, s) = bucket_and_sign(77, i, buckets);
        sums[b] += f64::from(s) * f64::from(w);
        counts[b] += 1;
    }
    let want: Vec<f32> = sums
        .iter()
        .zip(&counts)
        .map(|(&s, &c)| if c == 0 { 0.0 } else { (s / c as f64) as f32 })
        .collect();
    assert_eq!(h.buckets, want);
}
