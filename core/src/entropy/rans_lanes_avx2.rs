//! AVX2 coder of the whole rounds of rANS payload kind 2 (see `rans_lanes`): the 32 states
//! as four vectors of 8 lanes, picked at run time when the CPU has AVX2 (and POPCNT), else
//! the scalar `rans_lanes::{encode_rounds, decode_rounds}`. Both produce the same bytes.
//!
//! Decoding one round, per vector: the slots `x & (M - 1)` select table entries (eight
//! scalar loads: on Zen 2 they beat `vpgatherdd`); `x = freq * (x >> 12) + bias` (`mullo`);
//! the lanes below `L` form a `movemask`, whose popcount advances the stream position and
//! whose 32-byte `pshufb` control (one of 256) moves the next words, zero-extended, to those
//! lanes, where `x = x << 16 | word` (a blend). Vector `v`'s words precede vector `v + 1`'s,
//! as the format requires. The pairs of two vectors are packed, expanded to two nibble
//! bytes each and written as one 32-byte store.
//!
//! Encoding one round runs the vectors backwards: the lanes with `x >= f << 19` form a
//! `movemask`; their low 16 bits, packed to the top of a 16-byte register by another
//! `pshufb` table, are stored just below the write position, which moves down by twice the
//! popcount; then the step, with the quotient from an `f32` estimate corrected once each
//! way (see `rans_lanes`).

use super::rans_lanes::{EncTable, LANES, L_BITS, PREC, ROUND_OUT, ROUND_READ};

/// Whether the AVX2 coders may run: the CPU has AVX2 (and tests have not forced the
/// baseline, see `dtype::has_avx2`) and POPCNT.
#[cfg(target_arch = "x86_64")]
fn has_avx2_popcnt() -> bool {
    crate::dtype::has_avx2() && std::arch::is_x86_feature_detected!("popcnt")
}

/// Decodes whole rounds into `out` while at least [`ROUND_READ`] stream bytes remain;
/// returns the output bytes done (see `rans_lanes::decode_rounds`).
pub(super) fn decode_rounds(
    x: &mut [u32; LANES],
    table: &[u32; 1 << PREC],
    stream: &[u8],
    pos: &mut usize,
    out: &mut [u8],
) -> usize {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_popcnt() {
        // SAFETY: `avx2::decode_rounds` needs AVX2 and POPCNT, both just detected.
        return unsafe { avx2::decode_rounds(x, table, stream, pos, out) };
    }
    super::rans_lanes::decode_rounds(x, table, stream, pos, out)
}

/// Codes the whole rounds of `data`, last first, writing words below `*pos` (see
/// `rans_lanes::encode_rounds`; the same words and states).
pub(super) fn encode_rounds(
    x: &mut [u32; LANES],
    table: &EncTable,
    data: &[u8],
    words: &mut [u8],
    pos: &mut usize,
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_popcnt() {
        // SAFETY: `avx2::encode_rounds` needs AVX2 and POPCNT, both just detected.
        return unsafe { avx2::encode_rounds(x, table, data, words, pos) };
    }
    super::rans_lanes::encode_rounds(x, table, data, words, pos)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{EncTable, LANES, L_BITS, PREC, ROUND_OUT, ROUND_READ};
    use std::arch::x86_64::*;

    /// `pshufb` controls (both 128-bit halves see the same 16 loaded bytes): for a mask
    /// `m` of the 8 lanes that need a word, lane `i` (bytes `4i..4i + 4` of the result, the
    /// word zero-extended) takes word `popcount(m & ((1 << i) - 1))` of the 16 loaded bytes
    /// if bit `i` is set, else zero (control byte `0x80`).
    static WORD_ROUTES: [[u8; 32]; 256] = word_routes();

    const fn word_routes() -> [[u8; 32]; 256] {
        let mut routes = [[0x80u8; 32]; 256];
        let mut m = 0;
        while m < 256 {
            let mut k = 0u8;
            let mut i = 0;
            while i < 8 {
                if m & (1 << i) != 0 {
                    // Lanes 4..8 are in the upper half, whose byte indices are relative.
                    routes[m][4 * i] = 2 * k;
                    routes[m][4 * i + 1] = 2 * k + 1;
                    k += 1;
                }
                i += 1;
            }
            m += 1;
        }
        routes
    }

    /// `pshufb` controls of the encoder: for a mask `m` of the 8 lanes that emit a word
    /// (`c` of them), the words of those lanes (16-bit lanes of the source), in lane order,
    /// go to the top `2 c` bytes of the result.
    static WORD_PACKS: [[u8; 16]; 256] = word_packs();

    const fn word_packs() -> [[u8; 16]; 256] {
        let mut packs = [[0x80u8; 16]; 256];
        let mut m = 0;
        while m < 256 {
            let mut at = 16 - 2 * (m as u32).count_ones() as usize;
            let mut i = 0;
            while i < 8 {
                if m & (1 << i) != 0 {
                    packs[m][at] = 2 * i as u8;
                    packs[m][at + 1] = 2 * i as u8 + 1;
                    at += 2;
                }
                i += 1;
            }
            m += 1;
        }
        packs
    }

    /// Codes one step of the 8 states `x` (pairs: the 16 nibble bytes `d`), first storing
    /// the words they emit just below `*pos`.
    ///
    /// # Safety
    /// AVX2 and POPCNT must be available.
    #[inline]
    #[target_feature(enable = "avx2,popcnt")]
    unsafe fn enc_step8(
        x: &mut __m256i,
        d: &[u8; 16],
        table: &EncTable,
        words: &mut [u8],
        pos: &mut usize,
    ) {
        // SAFETY: the 16-byte store goes to `words[*pos - 16..*pos]`, a checked slice; the
        // pack table is indexed by an 8-bit movemask. The rest is register arithmetic and
        // checked indexing.
        unsafe {
            // Scalar lookups, with the pair values computed by scalar code straight from the
            // data (faster than gathers, or than indices moved out of a vector; all of it is
            // off the states' dependency chain), then the `f | c << 16` and `1 / f` halves
            // split into two vectors.
            let e = |i: usize| {
                let w = u16::from_le_bytes([d[2 * i], d[2 * i + 1]]);
                table.vector[usize::from((w | w >> 4) as u8)] as i64
            };
            let lo4 = _mm256_castsi256_ps(_mm256_set_epi64x(e(3), e(2), e(1), e(0)));
            let hi4 = _mm256_castsi256_ps(_mm256_set_epi64x(e(7), e(6), e(5), e(4)));
            let fc = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_castps_si256(
                _mm256_shuffle_ps::<0b10_00_10_00>(lo4, hi4),
            ));
            let inv = _mm256_castsi256_ps(_mm256_permute4x64_epi64::<0b11_01_10_00>(
                _mm256_castps_si256(_mm256_shuffle_ps::<0b11_01_11_01>(lo4, hi4)),
            ));
            let f = _mm256_and_si256(fc, _mm256_set1_epi32(0xffff));
            let c = _mm256_srli_epi32::<16>(fc);
            // x >= f << (L_BITS - PREC + 16); states are below 2^31 (signed compares).
            let x_max = _mm256_slli_epi32::<{ (L_BITS - PREC + 16) as i32 }>(f);
            let need = _mm256_cmpgt_epi32(*x, _mm256_sub_epi32(x_max, _mm256_set1_epi32(1)));
            let mask = _mm256_movemask_ps(_mm256_castsi256_ps(need)) as usize;
            let low = _mm256_and_si256(*x, _mm256_set1_epi32(0xffff));
            let w16 = _mm_packus_epi32(
                _mm256_castsi256_si128(low),
                _mm256_extracti128_si256::<1>(low),
            );
            let pack = _mm_loadu_si128(WORD_PACKS[mask].as_ptr().cast::<__m128i>());
            let dst = &mut words[*pos - 16..*pos];
            _mm_storeu_si128(
                dst.as_mut_ptr().cast::<__m128i>(),
                _mm_shuffle_epi8(w16, pack),
            );
            *pos -= 2 * mask.count_ones() as usize;
            let v = _mm256_blendv_epi8(*x, _mm256_srli_epi32::<16>(*x), need);
            // q = v / f from a float estimate (off by at most one, see module docs of
            // `rans_lanes`), corrected with the remainder r = v - q f.
            let q = _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_cvtepi32_ps(v), inv));
            let r = _mm256_sub_epi32(v, _mm256_mullo_epi32(q, f));
            let low_q = _mm256_cmpgt_epi32(_mm256_setzero_si256(), r);
            let q = _mm256_add_epi32(q, low_q);
            let r = _mm256_add_epi32(r, _mm256_and_si256(low_q, f));
            let high_q = _mm256_cmpgt_epi32(r, _mm256_sub_epi32(f, _mm256_set1_epi32(1)));
            let q = _mm256_sub_epi32(q, high_q);
            let r = _mm256_sub_epi32(r, _mm256_and_si256(high_q, f));
            *x = _mm256_add_epi32(
                _mm256_add_epi32(_mm256_slli_epi32::<{ PREC as i32 }>(q), r),
                c,
            );
        }
    }

    /// The AVX2 body of `super::encode_rounds`.
    ///
    /// # Safety
    /// AVX2 and POPCNT must be available.
    #[target_feature(enable = "avx2,popcnt")]
    pub(super) unsafe fn encode_rounds(
        x: &mut [u32; LANES],
        table: &EncTable,
        data: &[u8],
        words: &mut [u8],
        pos: &mut usize,
    ) {
        const V: usize = LANES / 8;
        // SAFETY: the loads and stores of the states are of the `u32` of `x` (32-byte
        // eighths); `enc_step8` bounds-checks its stores.
        unsafe {
            let mut xs = [_mm256_setzero_si256(); V];
            for (v, xv) in xs.iter_mut().enumerate() {
                *xv = _mm256_loadu_si256(x.as_ptr().add(8 * v).cast::<__m256i>());
            }
            for round in data.rchunks_exact(ROUND_OUT) {
                for v in (0..V).rev() {
                    let d = round[16 * v..16 * v + 16].try_into().expect("16 bytes");
                    enc_step8(&mut xs[v], d, table, words, pos);
                }
            }
            for (v, xv) in xs.iter().enumerate() {
                _mm256_storeu_si256(x.as_mut_ptr().add(8 * v).cast::<__m256i>(), *xv);
            }
        }
    }

    /// One step and renormalization of the 8 states `x`, reading words at `*pos`; returns
    /// the 8 table entries (pair in bits 24..32). Slot lookups are scalar loads (masked
    /// again, so the indexing is visibly in bounds).
    ///
    /// # Safety
    /// AVX2 and POPCNT must be available, and `*pos + 16 <= stream.len()`.
    #[inline]
    #[target_feature(enable = "avx2,popcnt")]
    unsafe fn step8(
        x: &mut __m256i,
        table: &[u32; 1 << PREC],
        stream: &[u8],
        pos: &mut usize,
    ) -> __m256i {
        debug_assert!(*pos + 16 <= stream.len());
        // SAFETY: the store of the slots goes to a local array of 8 `u32`; the 16-byte load
        // at `*pos` is in bounds by the caller's contract; the route table is indexed by an
        // 8-bit movemask. The rest is register arithmetic and checked indexing.
        unsafe {
            let slot_mask = _mm256_set1_epi32((1 << PREC) - 1);
            let mut idx = [0u32; 8];
            _mm256_storeu_si256(
                idx.as_mut_ptr().cast::<__m256i>(),
                _mm256_and_si256(*x, slot_mask),
            );
            let t = |i: usize| table[(idx[i] & ((1 << PREC) - 1)) as usize] as i32;
            let e = _mm256_setr_epi32(t(0), t(1), t(2), t(3), t(4), t(5), t(6), t(7));
            let freq = _mm256_and_si256(e, slot_mask);
            let bias = _mm256_and_si256(_mm256_srli_epi32::<12>(e), slot_mask);
            let v = _mm256_add_epi32(_mm256_mullo_epi32(freq, _mm256_srli_epi32::<12>(*x)), bias);
            // States are below 2^31, so the signed compare is exact.
            let need = _mm256_cmpgt_epi32(_mm256_set1_epi32(1 << L_BITS), v);
            let mask = _mm256_movemask_ps(_mm256_castsi256_ps(need)) as usize;
            let loaded = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                stream.as_ptr().add(*pos).cast::<__m128i>(),
            ));
            let route = _mm256_loadu_si256(WORD_ROUTES[mask].as_ptr().cast::<__m256i>());
            let words = _mm256_shuffle_epi8(loaded, route);
            let shifted = _mm256_or_si256(_mm256_slli_epi32::<16>(v), words);
            *x = _mm256_blendv_epi8(v, shifted, need);
            *pos += 2 * mask.count_ones() as usize;
            e
        }
    }

    /// The AVX2 body of `super::decode_rounds`.
    ///
    /// # Safety
    /// AVX2 and POPCNT must be available.
    #[target_feature(enable = "avx2,popcnt")]
    pub(super) unsafe fn decode_rounds(
        x: &mut [u32; LANES],
        table: &[u32; 1 << PREC],
        stream: &[u8],
        pos: &mut usize,
        out: &mut [u8],
    ) -> usize {
        let mut done = 0;
        const V: usize = LANES / 8;
        // SAFETY: the loads and stores of the states are of the `u32` of `x` (32-byte
        // eighths); each round stores 32 bytes per two vectors into its own `ROUND_OUT`-byte
        // chunk of `out`; and a round runs only while `ROUND_READ = 2 * LANES` stream bytes
        // remain at `*pos`, so vector `v`'s 16-byte load at `*pos + 2 k` (`k <= 8 v` words
        // taken by the vectors before it) is in bounds, as `step8` requires.
        unsafe {
            let mut xs = [_mm256_setzero_si256(); V];
            for (v, xv) in xs.iter_mut().enumerate() {
                *xv = _mm256_loadu_si256(x.as_ptr().add(8 * v).cast::<__m256i>());
            }
            let nibbles = _mm256_set1_epi16(0x0f0f);
            for o in out.chunks_exact_mut(ROUND_OUT) {
                if stream.len() - *pos < ROUND_READ {
                    break;
                }
                let mut es = [_mm256_setzero_si256(); V];
                for (e, xv) in es.iter_mut().zip(xs.iter_mut()) {
                    *e = step8(xv, table, stream, pos);
                }
                for (h, e) in es.chunks_exact(2).enumerate() {
                    // Pairs as 16-bit lanes [a0..a3 b0..b3 | a4..a7 b4..b7], each expanded
                    // to `lo | hi << 8`, then put in lane order.
                    let p = _mm256_packus_epi32(
                        _mm256_srli_epi32::<24>(e[0]),
                        _mm256_srli_epi32::<24>(e[1]),
                    );
                    let p =
                        _mm256_and_si256(_mm256_or_si256(p, _mm256_slli_epi16::<4>(p)), nibbles);
                    let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(p);
                    _mm256_storeu_si256(o.as_mut_ptr().add(32 * h).cast::<__m256i>(), p);
                }
                done += ROUND_OUT;
            }
            for (v, xv) in xs.iter().enumerate() {
                _mm256_storeu_si256(x.as_mut_ptr().add(8 * v).cast::<__m256i>(), *xv);
            }
        }
        done
    }
}
