//! Tests for sparse storage: bitmask and N:M metadata round trips (proptest), exact storage
//! sizes, corruption detection, and row/column select-scatter producing zero rows/columns.

use super::*;
use crate::prune::{col_keep, nm_mask, row_keep, Norm};
use proptest::prelude::*;

proptest! {
    #[test]
    fn bitmask_round_trip(mask in proptest::collection::vec(any::<bool>(), 0..300)) {
        let bits = pack_bitmask(&mask);
        prop_assert_eq!(bits.len(), mask.len().div_ceil(8));
        prop_assert_eq!(unpack_bitmask(&bits, mask.len()).unwrap(), mask);
    }

    #[test]
    fn compact_scatter_round_trip(pairs in proptest::collection::vec((-5.0f32..5.0, any::<bool>()), 0..300)) {
        let values: Vec<f32> = pairs.iter().map(|p| p.0).collect();
        let mask: Vec<bool> = pairs.iter().map(|p| p.1).collect();
        let kept = compact(&values, &mask);
        prop_assert_eq!(kept.len(), mask.iter().filter(|&&k| k).count());
        let mut out = vec![f32::NAN; values.len()];
        scatter(&kept, &mask, &mut out).unwrap();
        for ((o, v), k) in out.iter().zip(&values).zip(&mask) {
            prop_assert_eq!(*o, if *k { *v } else { 0.0 });
        }
    }

    #[test]
    fn nm_positions_round_trip(values in proptest::collection::vec(-3.0f32..3.0, 0..12), nm in prop_oneof![Just((2usize, 4usize)), Just((4, 8)), Just((1, 1)), Just((0, 4)), Just((3, 5)), Just((7, 16))], rows in 0usize..4) {
        let (n, m) = nm;
        let row_len = m * 3;
        let v: Vec<f32> = values.iter().cycle().take(if values.is_empty() { 0 } else { rows * row_len }).copied().collect();
        let mask = nm_mask(&v, row_len, n, m).unwrap();
        let packed = nm_pack_positions(&mask, m).unwrap();
        prop_assert_eq!(packed.len(), nm_metadata_bytes(v.len(), n, m));
        prop_assert_eq!(nm_unpack_positions(&packed, v.len(), n, m).unwrap(), mask);
    }
}

#[test]
fn compact_and_scatter_keep_exact_bits() {
    // NaN payloads, infinities and -0.0 pass through bit for bit; dropped slots are +0.0.
    let values = [
        f32::from_bits(0x7fc0_1234),
        -0.0,
        f32::INFINITY,
        1.5,
        -7.25,
        f32::MIN,
    ];
    let mask = [true, true, false, true, false, true];
    let kept = compact(&values, &mask);
    let kept_bits: Vec<u32> = kept.iter().map(|v| v.to_bits()).collect();
    let expected = [values[0], values[1], values[3], values[5]].map(f32::to_bits);
    assert_eq!(kept_bits, expected);
    let mut out = [f32::NAN; 6];
    scatter(&kept, &mask, &mut out).unwrap();
    for ((o, v), k) in out.iter().zip(&values).zip(&mask) {
        assert_eq!(o.to_bits(), if *k { v.to_bits() } else { 0 });
    }
}

#[test]
fn nm_metadata_sizes() {
    // 2:4 costs 2 bits per kept weight, i.e. 1 bit per weight; 4:8 costs 12 bits per 8.
    assert_eq!(nm_metadata_bytes(4096, 2, 4), 512);
    assert_eq!(nm_metadata_bytes(4096, 4, 8), 4096 / 8 * 12 / 8);
    assert_eq!(nm_position_bits(1), 0);
    assert_eq!(nm_position_bits(5), 3);
    assert_eq!(nm_position_bits(16), 4);
}

#[test]
fn corrupt_inputs_are_rejected() {
    assert!(matches!(
        unpack_bitmask(&[0xff], 3),
        Err(SparseError::DirtyPadding)
    ));
    assert!(matches!(
        unpack_bitmask(&[0, 0], 3),
        Err(SparseError::Length { .. })
    ));
    // Uneven blocks cannot be described by one n.
    let mask = [true, true, false, false, true, false, false, false];
    assert!(matches!(
        nm_pack_positions(&mask, 4),
        Err(SparseError::UnevenBlocks { block: 1, .. })
    ));
    assert!(matches!(
        nm_pack_positions(&mask, 3),
        Err(SparseError::NotMultiple { .. })
    ));
    assert!(matches!(
        nm_pack_positions(&mask, 0),
        Err(SparseError::InvalidPattern { .. })
    ));
    // 2:4 block with positions (2, 1): not increasing.
    assert!(matches!(
        nm_unpack_positions(&[0b0110], 4, 2, 4),
        Err(SparseError::CorruptPositions { block: 0 })
    ));
    // 1:3 with position 3 (out of range, 2-bit field).
    assert!(matches!(
        nm_unpack_positions(&[0b11], 3, 1, 3),
        Err(SparseError::CorruptPositions { block: 0 })
    ));
    assert!(matches!(
        nm_unpack_positions(&[0b0100_1000], 4, 2, 4),
        Err(SparseError::DirtyPadding)
    ));
    let mut out = [0f32; 4];
    assert!(scatter(&[1.0], &[true, true, false, false], &mut out).is_err());
    assert!(scatter_rows(&[1.0, 2.0], 2, &[true, false], &mut out[..3]).is_err());
    assert!(scatter_cols(&[1.0, 2.0], 2, &[true, false, true], &mut out).is_err());
    assert!(scatter_cols(&[1.0, 2.0], 0, &[], &mut out).is_err());
}

fn matrix(rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 10.0)
        .collect()
}

#[test]
fn rows_round_trip_and_zero_dropped() {
    let (rows, cols) = (9, 7);
    let v = matrix(rows, cols);
    let keep = row_keep(&v, cols, 0.4, Norm::L2).unwrap();
    let kept = select_rows(&v, cols, &keep);
    assert_eq!(kept.len(), keep.iter().filter(|&&k| k).count() * cols);
    let mut out = vec![f32::NAN; v.len()];
    scatter_rows(&kept, cols, &keep, &mut out).unwrap();
    for ((o, x), k) in out.chunks(cols).zip(v.chunks(cols)).zip(&keep) {
        if *k {
            assert_eq!(o, x);
        } else {
            assert!(o.iter().all(|&y| y == 0.0));
        }
    }
}

#[test]
fn cols_round_trip_and_zero_dropped() {
    let (rows, cols) = (6, 11);
    let v = matrix(rows, cols);
    let keep = col_keep(&v, cols, 0.5, Norm::L1).unwrap();
    let kept = select_cols(&v, cols, &keep);
    let kept_cols = keep.iter().filter(|&&k| k).count();
    assert_eq!(kept.len(), rows * kept_cols);
    let mut out = vec![f32::NAN; v.len()];
    scatter_cols(&kept, cols, &keep, &mut out).unwrap();
    for (o, x) in out.chunks(cols).zip(v.chunks(cols)) {
        for c in 0..cols {
            assert_eq!(o[c], if keep[c] { x[c] } else { 0.0 });
        }
    }
    // All columns dropped.
    let none = vec![false; cols];
    scatter_cols(&[], cols, &none, &mut out).unwrap();
    assert!(out.iter().all(|&y| y == 0.0));
}
