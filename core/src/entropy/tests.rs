//! Tests for the entropy coder: bit-exact round trips for every layout and awkward length,
//! sizes against the order-0 bound, zstd and the raw fallback, optimality and completeness of
//! the length-limited codes, determinism, and robustness against forged or corrupted input.

use super::*;
use proptest::prelude::*;

const LAYOUTS: [Layout; 4] = [Layout::Bytes, Layout::Bf16, Layout::F16, Layout::F32];

/// SplitMix64: a tiny deterministic generator.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn gaussian(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

fn gaussian_bf16(n: usize, std: f64, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    (0..n)
        .flat_map(|_| half::bf16::from_f64(rng.gaussian() * std).to_le_bytes())
        .collect()
}

fn gaussian_f16(n: usize, std: f64, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    (0..n)
        .flat_map(|_| half::f16::from_f64(rng.gaussian() * std).to_le_bytes())
        .collect()
}

fn gaussian_f32(n: usize, std: f64, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    (0..n)
        .flat_map(|_| ((rng.gaussian() * std) as f32).to_le_bytes())
        .collect()
}

fn round_trip(layout: Layout, data: &[u8]) -> Vec<u8> {
    let enc = compress(layout, data);
    let dec = decompress(&enc).expect("valid encoding decodes");
    assert!(
        dec == data,
        "{layout:?} len {} did not round-trip",
        data.len()
    );
    enc
}

fn ratio(enc: &[u8], data: &[u8]) -> f64 {
    enc.len() as f64 / data.len() as f64
}

/// Upper bound on the size of an encoding whose blocks are all raw.
fn raw_size(layout: Layout, len: usize) -> usize {
    let elem = layout.element_size();
    let chunks = (len / elem).div_ceil(1 << CHUNK_LOG2);
    HEADER_LEN + len + chunks * layout.planes()
}

#[test]
fn empty_and_tiny_inputs_round_trip() {
    for layout in LAYOUTS {
        for len in 0..=9 {
            let data: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37)).collect();
            let enc = round_trip(layout, &data);
            assert!(enc.len() <= raw_size(layout, len), "{layout:?} {len}");
        }
    }
}

#[test]
fn odd_lengths_across_chunk_boundaries_round_trip() {
    let mut rng = Rng(7);
    for layout in LAYOUTS {
        let elem = layout.element_size();
        let chunk = (1 << CHUNK_LOG2) * elem;
        for len in [chunk - 1, chunk, chunk + 1, chunk + elem + 1, 2 * chunk + 3] {
            // Skewed bytes so Huffman blocks appear, with a tail that is not a whole element.
            let data: Vec<u8> = (0..len)
                .map(|_| (rng.next_u64() % 7) as u8 * (rng.next_u64() % 3) as u8)
                .collect();
            round_trip(layout, &data);
        }
    }
}

#[test]
fn all_equal_input_becomes_constant_blocks() {
    for layout in LAYOUTS {
        let data = vec![0x3cu8; 300_001];
        let enc = round_trip(layout, &data);
        let chunks = (data.len() / layout.element_size()).div_ceil(1 << CHUNK_LOG2);
        // Header, 2 bytes per block, and at most 3 tail bytes.
        assert!(enc.len() <= HEADER_LEN + 2 * chunks * layout.planes() + 3);
        assert_eq!(order0_bound(layout, &data[..300_000]), 0.0);
    }
}

#[test]
fn random_bytes_cost_almost_nothing_extra() {
    let data = Rng(11).bytes(200_003);
    for layout in LAYOUTS {
        let enc = round_trip(layout, &data);
        assert!(enc.len() <= raw_size(layout, data.len()), "{layout:?}");
        let bound = order0_bound(layout, &data);
        assert!(bound > 0.998 && bound <= 1.0, "{layout:?} bound {bound}");
    }
}

#[test]
fn gaussian_bf16_beats_zstd_and_nears_the_order0_bound() {
    let data = gaussian_bf16(1 << 18, 0.02, 1);
    let enc = round_trip(Layout::Bf16, &data);
    let r = ratio(&enc, &data);
    let bound = order0_bound(Layout::Bf16, &data);
    let zstd = zstd::bulk::compress(&data, 3).unwrap().len() as f64 / data.len() as f64;
    assert!(r < 0.70, "ratio {r}");
    assert!(r < zstd, "ratio {r} vs zstd {zstd}");
    // Huffman's redundancy on the exponent plane (~0.04 bit) plus raw mantissas at 8 bits.
    assert!(r < bound + 0.01, "ratio {r} vs bound {bound}");
}

#[test]
fn gaussian_f16_and_f32_beat_zstd() {
    let data = gaussian_f16(1 << 17, 0.5, 2);
    let enc = round_trip(Layout::F16, &data);
    let zstd = zstd::bulk::compress(&data, 3).unwrap().len() as f64 / data.len() as f64;
    let (r, bound) = (ratio(&enc, &data), order0_bound(Layout::F16, &data));
    assert!(
        r < zstd && r < bound + 0.01,
        "f16 {r} zstd {zstd} bound {bound}"
    );

    let data = gaussian_f32(1 << 17, 0.02, 3);
    let enc = round_trip(Layout::F32, &data);
    let zstd = zstd::bulk::compress(&data, 3).unwrap().len() as f64 / data.len() as f64;
    let (r, bound) = (ratio(&enc, &data), order0_bound(Layout::F32, &data));
    assert!(
        r < zstd && r < bound + 0.01,
        "f32 {r} zstd {zstd} bound {bound}"
    );
    assert!(r < 0.84, "f32 ratio {r}");
}

#[test]
fn int4_codes_come_close_to_their_entropy() {
    // Gaussian-distributed 4-bit codes centred on 8: entropy about 3.3 bits.
    let mut rng = Rng(5);
    let data: Vec<u8> = (0..300_000)
        .map(|_| (rng.gaussian() * 2.5 + 8.0).round().clamp(0.0, 15.0) as u8)
        .collect();
    let enc = round_trip(Layout::Bytes, &data);
    let bound = order0_bound(Layout::Bytes, &data);
    let r = ratio(&enc, &data);
    assert!(bound > 0.38 && bound < 0.46, "entropy {} bits", bound * 8.0);
    // Huffman redundancy on this distribution is a few hundredths of a bit.
    assert!(r < bound + 0.006, "ratio {r} vs bound {bound}");
}

#[test]
fn varying_statistics_per_block_adapt() {
    // Two regions with very different scales: per-block tables must code each near its own
    // entropy, so the total is close to the sum of per-region bounds.
    let mut data = gaussian_bf16(1 << 16, 1e-3, 8);
    let second = gaussian_bf16(1 << 16, 10.0, 9);
    let bound = (order0_bound(Layout::Bf16, &data) + order0_bound(Layout::Bf16, &second)) / 2.0;
    data.extend_from_slice(&second);
    let r = ratio(&round_trip(Layout::Bf16, &data), &data);
    assert!(r < bound + 0.01, "ratio {r} vs per-region bound {bound}");
}

#[test]
fn compression_is_deterministic_across_thread_counts() {
    let data = gaussian_bf16(300_000, 0.05, 4);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| compress(Layout::Bf16, &data));
    let four = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap()
        .install(|| compress(Layout::Bf16, &data));
    assert_eq!(one, four);
}

#[test]
fn decompress_into_appends_and_is_untouched_on_error() {
    let data = gaussian_f32(5000, 1.0, 6);
    let enc = compress(Layout::F32, &data);
    let mut out = b"prefix".to_vec();
    decompress_into(&enc, &mut out).unwrap();
    assert_eq!(&out[..6], b"prefix");
    assert_eq!(&out[6..], &data[..]);

    let mut bad = enc.clone();
    bad.pop();
    let mut out = b"prefix".to_vec();
    assert!(decompress_into(&bad, &mut out).is_err());
    assert_eq!(out, b"prefix");
}

/// The one-thread decoder (chunk by chunk into the output) and the parallel one agree on
/// multi-chunk inputs, valid or corrupted, and both leave `out` untouched on error.
#[test]
fn sequential_and_parallel_decoding_agree() {
    let pool = |n| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    };
    let (one, four) = (pool(1), pool(4));
    let decode = |enc: &[u8]| {
        let mut out = b"prefix".to_vec();
        match decompress_into(enc, &mut out) {
            Ok(()) => Ok(out),
            Err(e) => {
                assert_eq!(out, b"prefix");
                Err(e)
            }
        }
    };
    let mut rng = Rng(11);
    for (layout, data) in [
        (Layout::Bf16, gaussian_bf16(150_001, 0.02, 9)),
        (Layout::F32, gaussian_f32(140_000, 0.5, 10)),
        (Layout::Bytes, (0..200_003).map(|i| (i % 7) as u8).collect()),
    ] {
        let enc = compress(layout, &data);
        let want = [b"prefix".as_slice(), &data].concat();
        assert_eq!(one.install(|| decode(&enc)).unwrap(), want);
        assert_eq!(four.install(|| decode(&enc)).unwrap(), want);
        for _ in 0..40 {
            let mut bad = enc.clone();
            let at = HEADER_LEN + rng.next_u64() as usize % (bad.len() - HEADER_LEN);
            bad[at] ^= 1 << (rng.next_u64() % 8);
            assert_eq!(one.install(|| decode(&bad)), four.install(|| decode(&bad)));
        }
    }
}

#[test]
fn header_errors_are_reported() {
    let enc = compress(Layout::Bf16, &gaussian_bf16(100, 1.0, 1));
    let mut e = enc.clone();
    e[0] = b'X';
    assert_eq!(decompress(&e), Err(EntropyError::BadMagic));
    let mut e = enc.clone();
    e[4] = 9;
    assert_eq!(decompress(&e), Err(EntropyError::UnsupportedVersion(9)));
    let mut e = enc.clone();
    e[5] = 17;
    assert_eq!(decompress(&e), Err(EntropyError::UnknownLayout(17)));
    let mut e = enc.clone();
    e[6] = 60;
    assert_eq!(decompress(&e), Err(EntropyError::BadChunkSize(60)));
    let mut e = enc.clone();
    e[7..15].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert_eq!(decompress(&e), Err(EntropyError::TooLarge(1 << 40)));
    // A forged but allowed 15 GiB length fails on the missing blocks, before allocating.
    let mut e = enc.clone();
    e[7..15].copy_from_slice(&(15u64 << 30).to_le_bytes());
    assert!(matches!(
        decompress(&e),
        Err(EntropyError::Truncated { .. }) | Err(EntropyError::BadBlockMode { .. })
    ));
    let mut e = enc.clone();
    e.push(0);
    assert_eq!(decompress(&e), Err(EntropyError::TrailingBytes(1)));
    assert!(matches!(
        decompress(&enc[..10]),
        Err(EntropyError::Truncated { .. })
    ));
    assert_eq!(decompress(b"no"), Err(EntropyError::BadMagic));
}

#[test]
fn corrupt_huffman_tables_are_rejected() {
    let data = gaussian_bf16(4096, 0.02, 12);
    let enc = compress(Layout::Bf16, &data);
    // First block is the exponent plane: mode, u32 length, then first/last symbol.
    assert_eq!(enc[HEADER_LEN], MODE_HUFFMAN);
    let table_at = HEADER_LEN + 5;
    let mut e = enc.clone();
    e[table_at + 2] = 0xff; // two lengths of 15 bits: over the limit
    assert!(matches!(decompress(&e), Err(EntropyError::BadBlock { .. })));
    let mut e = enc.clone();
    e[table_at + 2] ^= 0x01; // Kraft sum no longer exactly 1
    assert!(matches!(decompress(&e), Err(EntropyError::BadBlock { .. })));
}

/// Reference Huffman code cost (unlimited lengths) and maximum depth, via repeated merging.
fn huffman_reference(hist: &[u32; 256]) -> (u64, u32) {
    let mut nodes: Vec<(u64, u32)> = hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| (u64::from(c), 0))
        .collect();
    let mut cost = 0;
    while nodes.len() > 1 {
        nodes.sort_by(|a, b| b.cmp(a));
        let (wa, da) = nodes.pop().unwrap();
        let (wb, db) = nodes.pop().unwrap();
        cost += wa + wb;
        nodes.push((wa + wb, da.max(db) + 1));
    }
    (cost, nodes[0].1)
}

fn check_lengths(hist: &[u32; 256]) {
    let lengths = huffman::code_lengths(hist);
    let mut kraft = 0u64;
    for (&c, &l) in hist.iter().zip(&lengths) {
        assert_eq!(c > 0, l > 0, "present symbols and only they get codes");
        assert!(u32::from(l) <= huffman::MAX_CODE_LEN);
        if l > 0 {
            kraft += 1 << (huffman::MAX_CODE_LEN - u32::from(l));
        }
    }
    assert_eq!(
        kraft,
        1 << huffman::MAX_CODE_LEN,
        "Kraft sum must be exactly 1"
    );
    let cost: u64 = hist
        .iter()
        .zip(&lengths)
        .map(|(&c, &l)| u64::from(c) * u64::from(l))
        .sum();
    let (reference, depth) = huffman_reference(hist);
    assert!(cost >= reference, "no prefix code beats Huffman");
    if depth <= huffman::MAX_CODE_LEN {
        assert_eq!(cost, reference, "limit inactive: must be optimal");
    }
}

#[test]
fn fibonacci_counts_force_the_length_limit() {
    // Fibonacci weights give an unlimited Huffman tree of depth k-1.
    let mut hist = [0u32; 256];
    let (mut a, mut b) = (1u32, 1u32);
    for h in hist.iter_mut().take(30) {
        *h = a;
        (a, b) = (b, a + b);
    }
    check_lengths(&hist);
    let lengths = huffman::code_lengths(&hist);
    assert_eq!(lengths.iter().copied().max(), Some(11));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn code_lengths_are_complete_limited_and_optimal(
        counts in prop::collection::vec(0u32..5000, 2..256),
        skew in 0u32..20,
    ) {
        let mut hist = [0u32; 256];
        for (i, (h, &c)) in hist.iter_mut().zip(&counts).enumerate() {
            // Some geometric skew so the length limit is often active.
            *h = c >> (i as u32 % (skew + 1)).min(31);
        }
        if hist.iter().filter(|&&c| c > 0).count() >= 2 {
            check_lengths(&hist);
        }
    }

    #[test]
    fn arbitrary_bytes_round_trip(
        data in prop::collection::vec(0u8..6, 0..3000),
        layout in prop::sample::select(LAYOUTS.to_vec()),
    ) {
        let enc = compress(layout, &data);
        prop_assert_eq!(decompress(&enc).unwrap(), data);
    }

    #[test]
    fn corrupted_encodings_never_panic(
        seed in any::<u64>(),
        layout in prop::sample::select(LAYOUTS.to_vec()),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
        truncate in any::<bool>(),
    ) {
        let mut rng = Rng(seed);
        let len = (seed % 5000) as usize;
        let data: Vec<u8> = (0..len).map(|_| (rng.next_u64() % 9) as u8 * 17).collect();
        let mut enc = compress(layout, &data);
        for (at, byte) in edits {
            let i = at % enc.len();
            enc[i] = byte;
        }
        if truncate {
            enc.truncate(cut % (enc.len() + 1));
        }
        // Only Ok or Err; when Ok, the output has the declared length.
        if let Ok(out) = decompress(&enc) {
            let declared = u64::from_le_bytes(enc[7..15].try_into().unwrap());
            prop_assert_eq!(out.len() as u64, declared);
        }
    }
}
