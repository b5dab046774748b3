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
    let chunks = (len / elem).div_ceil(1 << chunk_log2(layout));
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
fn compress_into_appends_and_reuses_the_buffer() {
    let data = gaussian_bf16(70_000, 0.02, 3);
    let mut out = b"prefix".to_vec();
    compress_into(Layout::Bf16, &data, &mut out);
    assert_eq!(&out[..6], b"prefix");
    assert_eq!(out[6..], compress(Layout::Bf16, &data)[..]);
    out.clear();
    compress_into(Layout::Bf16, &data, &mut out);
    assert_eq!(decompress(&out).unwrap(), data);
}

#[test]
fn odd_lengths_across_chunk_boundaries_round_trip() {
    let mut rng = Rng(7);
    for layout in LAYOUTS {
        let elem = layout.element_size();
        let chunk = (1 << chunk_log2(layout)) * elem;
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
        let chunks = (data.len() / layout.element_size()).div_ceil(1 << chunk_log2(layout));
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

/// Overwrites the bytes of `enc` named by `edits` (positions modulo its length), truncates
/// it at `cut` if `truncate`, and decodes it: the result must be an error or bytes of the
/// declared length, never a panic.
fn corrupted_decodes_safely(
    mut enc: Vec<u8>,
    edits: Vec<(usize, u8)>,
    cut: usize,
    truncate: bool,
) -> Result<(), TestCaseError> {
    for (at, byte) in edits {
        let i = at % enc.len();
        enc[i] = byte;
    }
    if truncate {
        enc.truncate(cut % (enc.len() + 1));
    }
    if let Ok(out) = decompress(&enc) {
        let declared = u64::from_le_bytes(enc[7..15].try_into().unwrap());
        prop_assert_eq!(out.len() as u64, declared);
    }
    Ok(())
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
        let enc = compress(layout, &data);
        corrupted_decodes_safely(enc, edits, cut, truncate)?;
    }
}

/// Symmetric round-to-nearest int4 codes (0..=15, zero point 8) of Gaussian weights, one
/// per byte, with an absmax scale per group of 128 (like real quantized checkpoints).
fn int4_group_codes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let group: Vec<f64> = (0..128).map(|_| rng.gaussian()).collect();
        let scale = group.iter().fold(0f64, |m, w| m.max(w.abs())) / 7.0;
        out.extend(
            group
                .iter()
                .map(|w| ((w / scale).round().clamp(-8.0, 7.0) + 8.0) as u8),
        );
    }
    out.truncate(n);
    out
}

/// Encodes one block directly with the rANS coder and decodes it back.
fn rans_round_trip(kind: rans::Kind, data: &[u8]) -> Vec<u8> {
    let model = rans::Model::new(kind, &huffman::histogram(data));
    let mut payload = Vec::new();
    let len = rans::encode(data, &model, &mut payload);
    assert_eq!(len, payload.len());
    let mut out = vec![0u8; data.len()];
    rans::decode(&payload, &mut out).expect("valid rANS payload decodes");
    assert!(
        out == data,
        "{kind:?} len {} did not round-trip",
        data.len()
    );
    payload
}

#[test]
fn rans_blocks_round_trip() {
    let mut rng = Rng(31);
    for len in [
        2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1001, 65_535, 65_536,
    ] {
        let skewed: Vec<u8> = (0..len)
            .map(|_| (rng.gaussian() * 1.5 + 8.0).round().clamp(0.0, 15.0) as u8)
            .collect();
        let uniform: Vec<u8> = (0..len).map(|_| (rng.next_u64() % 16) as u8).collect();
        let two: Vec<u8> = (0..len).map(|i| [3, 12][(i % 3 == 0) as usize]).collect();
        for data in [skewed, uniform, two] {
            if data.iter().any(|&b| b != data[0]) {
                rans_round_trip(rans::Kind::Pairs, &data);
                rans_round_trip(rans::Kind::Bytes, &data);
            }
        }
        let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        if bytes.iter().any(|&b| b != bytes[0]) {
            rans_round_trip(rans::Kind::Bytes, &bytes);
        }
    }
    // Very skewed: one dominant symbol and a rare one (frequency 1 at the precision).
    let mut data = vec![5u8; 100_000];
    data[77] = 6;
    data[99_999] = 0;
    rans_round_trip(rans::Kind::Pairs, &data);
    rans_round_trip(rans::Kind::Bytes, &data);
}

#[test]
fn rans_rejects_hostile_payloads() {
    let data = int4_group_codes(5001, 3);
    let payload = rans_round_trip(rans::Kind::Pairs, &data);
    let decode = |p: &[u8]| rans::decode(p, &mut vec![0u8; data.len()]);
    // Every truncation fails (the stream must be consumed exactly and end in the initial
    // states), as does any appended byte.
    for cut in 0..payload.len() {
        assert!(decode(&payload[..cut]).is_err(), "truncated to {cut}");
    }
    assert!(decode(&[payload.as_slice(), &[0, 0]].concat()).is_err());
    // Bad headers and frequency tables.
    let mut p = payload.clone();
    p[0] = 7; // unknown kind
    assert!(decode(&p).is_err());
    let mut p = payload.clone();
    p[1] = 13; // precision above the decoder's table
    assert!(decode(&p).is_err());
    let mut p = payload.clone();
    p[1] = 7;
    assert!(decode(&p).is_err());
    let mut p = payload.clone();
    (p[2], p[3]) = (p[3], p[2].wrapping_sub(1)); // reversed symbol range
    assert!(decode(&p).is_err());
    let mut p = payload.clone();
    p[3] = 16; // a nibble above 15
    assert!(decode(&p).is_err());
    let mut p = payload.clone();
    p[4] ^= 1; // frequencies no longer sum to 2^12
    assert!(decode(&p).is_err());
    // A table with a single symbol holding every slot.
    let mut p = vec![1, 12, 8, 8, 0x80, 0x20];
    p.extend_from_slice(&[0; 64]);
    assert!(decode(&p).is_err());
    // Initial states out of range: the states (u64) start after the kind, precision, range,
    // the one-byte nibble frequencies (or two bytes from 128 on) and the raw tail of
    // 5001 % 4 = 1 byte.
    let mut at = 4;
    for _ in payload[2]..=payload[3] {
        at += if payload[at] < 0x80 { 1 } else { 2 };
    }
    at += 1;
    for bad in [0x7fff_ffffu64, 1 << 63] {
        let mut p = payload.clone();
        p[at..at + 8].copy_from_slice(&bad.to_le_bytes());
        assert_eq!(decode(&p), Err("rANS state out of range"));
    }
    // Flipping any single bit never panics.
    for i in 0..payload.len() {
        for bit in [0, 3, 7] {
            let mut p = payload.clone();
            p[i] ^= 1 << bit;
            let _ = decode(&p);
        }
    }
}

#[test]
fn int4_codes_use_rans_near_the_entropy() {
    let data = int4_group_codes(1 << 18, 9);
    let enc = round_trip(Layout::Bytes, &data);
    // Every block of the chunked encoding is a rANS block.
    let mut pos = HEADER_LEN;
    while pos < enc.len() {
        assert_eq!(enc[pos], MODE_RANS, "block at {pos}");
        pos += 5 + payload_len(&enc, pos + 1);
    }
    let (r, bound) = (ratio(&enc, &data), order0_bound(Layout::Bytes, &data));
    assert!(r < bound * 1.005, "ratio {r} vs bound {bound}");
    // And clearly below Huffman's redundancy on the same codes.
    let hist = huffman::histogram(&data);
    let lengths = huffman::code_lengths(&hist);
    let huff_bits: u64 = hist
        .iter()
        .zip(&lengths)
        .map(|(&c, &l)| u64::from(c) * u64::from(l))
        .sum();
    assert!((enc.len() as f64) < huff_bits as f64 / 8.0 * 0.995);
}

/// A version-1 encoding (Huffman exponent block, raw mantissa block, raw tail) and a
/// version-1 constant block, both written by the coder before rANS existed.
#[test]
fn version_1_encodings_still_decode() {
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let v1 = hex(concat!(
        "5350454e01011091010000000000000254000000717a0656342332100000001000000010000000c60168a903",
        "52a2e04c362d63f3d1994069517b8319f55302d9ee7170aa9ea3950033dd534da285eaad2aadfd8889ac304b",
        "6f6303e10636dd39e5f25911b155ad40003ed9ad24a5e886fb6dbbd721486994ca54a5171630e17b1cee9698",
        "be8482a64116ca16274a81cbc65fae65795dbcdb885ab024916f353760ae8a09fb988bf2ff405e26ab903743",
        "bf3e2088add87c8f820a8c127712e20c75c10ce47144e98e7e2b2c0092ab04903047e15a9310f1b4d8226518",
        "2383b48aa56a0fdbad1e8e8810a2b3bfad80816941d32e3437417b39cf8cea8b8dda8f08c7dda173368be167",
        "80df2defa672b6cf1185db44c4bf0b078b5683708210f31c18370c4033a964c4de0384a49f9f2b19ddab",
    ));
    assert_eq!((v1[4], v1[HEADER_LEN]), (1, MODE_HUFFMAN));
    let mut want = gaussian_bf16(200, 0.02, 21);
    want.push(0xab);
    assert_eq!(decompress(&v1).unwrap(), want);
    let v1 = hex("5350454e01001028000000000000000107");
    assert_eq!(decompress(&v1).unwrap(), vec![7u8; 40]);
    // Version 1 has no rANS blocks.
    let mut forged = compress(Layout::Bytes, &int4_group_codes(20_000, 1));
    assert_eq!(forged[HEADER_LEN], MODE_RANS);
    forged[4] = 1;
    assert!(matches!(
        decompress(&forged),
        Err(EntropyError::BadBlockMode { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// 4-bit codes (rANS blocks) round-trip, and corrupting or truncating their encoding
    /// yields an error or bytes of the declared length, never a panic.
    #[test]
    fn rans_encodings_round_trip_and_never_panic_when_corrupted(
        seed in any::<u64>(),
        len in 0usize..70_000,
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
        truncate in any::<bool>(),
    ) {
        let data = int4_group_codes(len, seed);
        let enc = compress(Layout::Bytes, &data);
        prop_assert_eq!(&decompress(&enc).unwrap(), &data);
        corrupted_decodes_safely(enc, edits, cut, truncate)?;
    }
}

/// Kind-2 test blocks of `len` nibble bytes: skewed, uniform, two symbols, and one
/// dominant symbol with rare ones (frequency 1 at the precision); each with at least two
/// distinct symbols.
fn nibble_blocks(len: usize, rng: &mut Rng) -> Vec<Vec<u8>> {
    let skewed: Vec<u8> = (0..len)
        .map(|_| (rng.gaussian() * 1.5 + 8.0).round().clamp(0.0, 15.0) as u8)
        .collect();
    let uniform: Vec<u8> = (0..len).map(|_| (rng.next_u64() % 16) as u8).collect();
    let two: Vec<u8> = (0..len).map(|i| [3, 12][(i % 3 == 0) as usize]).collect();
    let mut rare = vec![5u8; len];
    rare[len / 3] = 6;
    rare[len - 1] = 0;
    [skewed, uniform, two, rare]
        .into_iter()
        .filter(|d| d.iter().any(|&b| b != d[0]))
        .collect()
}

/// Lengths around the kind-2 boundaries: tiny, one lane short or over, exact rounds (64
/// bytes), the seeds (128 bytes), odd tails, and whole 64 KiB blocks.
const LANE_LENGTHS: [usize; 24] = [
    2, 3, 4, 5, 63, 64, 65, 127, 128, 129, 130, 131, 191, 192, 193, 255, 256, 257, 1000, 1001,
    4096, 40_003, 65_535, 65_536,
];

#[test]
fn rans_lane_blocks_round_trip() {
    let mut rng = Rng(41);
    for len in LANE_LENGTHS {
        for data in nibble_blocks(len, &mut rng) {
            rans_round_trip(rans::Kind::PairLanes, &data);
        }
    }
}

#[test]
fn int4_codes_over_several_blocks_use_rans_lanes() {
    // The last block is shorter but large enough for the 124 bytes of states to pay off.
    let data = int4_group_codes(3 * (1 << chunk_log2(Layout::Bytes)) + 30_001, 17);
    let enc = round_trip(Layout::Bytes, &data);
    let mut pos = HEADER_LEN;
    while pos < enc.len() {
        assert_eq!(enc[pos], MODE_RANS, "block at {pos}");
        assert_eq!(enc[pos + 5], 2, "rANS payload kind at {pos}");
        pos += 5 + payload_len(&enc, pos + 1);
    }
}

/// Encodes and decodes `data` as kind 2 on the AVX2 path (where the CPU has it) and on
/// the forced scalar path: payloads and outputs must be identical.
fn lanes_paths_agree(data: &[u8]) {
    let run = || {
        let payload = rans_round_trip(rans::Kind::PairLanes, data);
        let mut out = vec![0u8; data.len()];
        rans::decode(&payload, &mut out).unwrap();
        (payload, out)
    };
    assert!(
        run() == crate::dtype::with_baseline(run),
        "len {}",
        data.len()
    );
}

#[test]
fn rans_lanes_avx2_and_scalar_paths_agree() {
    let mut rng = Rng(43);
    for len in LANE_LENGTHS {
        for data in nibble_blocks(len, &mut rng) {
            lanes_paths_agree(&data);
        }
    }
}

#[test]
fn rans_lanes_reject_hostile_payloads() {
    let data = int4_group_codes(5001, 5);
    let payload = rans_round_trip(rans::Kind::PairLanes, &data);
    assert_eq!(payload[0], 2);
    let decode = |p: &[u8]| rans::decode(p, &mut vec![0u8; data.len()]);
    for cut in 0..payload.len() {
        assert!(decode(&payload[..cut]).is_err(), "truncated to {cut}");
    }
    assert!(decode(&[payload.as_slice(), &[0]].concat()).is_err());
    assert!(decode(&[payload.as_slice(), &[0, 0]].concat()).is_err());
    let mut p = payload.clone();
    p[1] = 11; // kind 2 is coded at P = 12 only
    assert_eq!(decode(&p), Err("rANS precision out of range"));
    let mut p = payload.clone();
    p[3] = 16; // a nibble above 15
    assert!(decode(&p).is_err());
    // The packed states start after the header, the nibble frequencies and the raw tail
    // of 5001 % 2 = 1 byte; state 0 is the low 31 bits. Below L it is rejected.
    let mut at = 4;
    for _ in payload[2]..=payload[3] {
        at += if payload[at] < 0x80 { 1 } else { 2 };
    }
    at += 1;
    let mut p = payload.clone();
    let state0 = u32::from_le_bytes(p[at..at + 4].try_into().unwrap());
    p[at..at + 4].copy_from_slice(&(state0 & !0x7fff_ffff).to_le_bytes());
    assert_eq!(decode(&p), Err("rANS state out of range"));
    // Flipping any single bit never panics, and both paths agree on the outcome.
    for i in 0..payload.len() {
        for bit in [0, 4, 7] {
            let mut p = payload.clone();
            p[i] ^= 1 << bit;
            let run = || {
                let mut out = vec![0u8; data.len()];
                rans::decode(&p, &mut out).map(|()| out)
            };
            assert_eq!(
                run(),
                crate::dtype::with_baseline(run),
                "byte {i} bit {bit}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Kind-2 payloads of random nibble data: the AVX2 and scalar paths write the same
    /// payload and decode it (and any corruption of it) to the same result.
    #[test]
    fn rans_lanes_paths_agree_on_valid_and_corrupted_payloads(
        seed in any::<u64>(),
        len in 2usize..20_000,
        spread in 1u64..16,
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let mut rng = Rng(seed);
        let mut data: Vec<u8> = (0..len).map(|_| (rng.next_u64() % (spread + 1)) as u8).collect();
        data[0] = 0;
        data[len - 1] = spread as u8;
        lanes_paths_agree(&data);
        let mut payload = rans_round_trip(rans::Kind::PairLanes, &data);
        for (at, byte) in edits {
            let i = at % payload.len();
            payload[i] = byte;
        }
        let run = || {
            let mut out = vec![0u8; len];
            rans::decode(&payload, &mut out).map(|()| out)
        };
        prop_assert_eq!(run(), crate::dtype::with_baseline(run));
    }
}

#[test]
fn nibble_histograms_match_plain_counting() {
    let mut rng = Rng(11);
    let plain = |data: &[u8]| {
        let mut hists = [[0u32; 256]; huffman::STREAMS];
        let seg = data.len().div_ceil(huffman::STREAMS);
        for (s, h) in hists.iter_mut().enumerate() {
            for &b in &data[(s * seg).min(data.len())..((s + 1) * seg).min(data.len())] {
                h[usize::from(b)] += 1;
            }
        }
        hists
    };
    // Lengths around the 32-byte vectors and the 8-bit counter groups; one value so
    // frequent that its counters would wrap without the groups.
    for n in [1, 31, 32, 33, 255 * 32 * 4 + 7, 65_536, 200_001] {
        let mut data: Vec<u8> = rng.bytes(n).iter().map(|&b| b & 15).collect();
        for b in data.iter_mut().step_by(3) {
            *b = 7;
        }
        let expected = plain(&data);
        assert_eq!(huffman::segment_histograms(&data), expected, "n = {n}");
        assert_eq!(nibble_segment_histograms(&data), Some(expected), "n = {n}");
        let base = crate::dtype::with_baseline(|| nibble_segment_histograms(&data));
        assert_eq!(base, Some(expected), "baseline, n = {n}");
        // One byte of 16 or more anywhere refuses the nibble path.
        for at in [0, n / 2, n - 1] {
            let mut high = data.clone();
            high[at] = 16 + (at % 200) as u8;
            assert_eq!(nibble_segment_histograms(&high), None, "n = {n}, at {at}");
        }
    }
}
