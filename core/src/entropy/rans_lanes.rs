//! The streams of rANS payload kind 2 (nibble pairs): [`LANES`] = 32 interleaved 31-bit
//! states sharing *one* stream of 16-bit words, laid out so that an AVX2 coder (see
//! `rans_lanes_avx2`) runs the states as four vectors of 8 lanes. Four independent vectors
//! hide the latency of a step's chain (lookup, multiply, renormalization shuffle); with two
//! (16 states) the decoder was ~20% slower on Zen 2.
//!
//! **Steps and rounds.** Every step codes one nibble pair (value `a | b << 4`, `a` first in
//! the data) with the pair frequencies of `rans::pair_freqs` at `P = 12` (`M = 2^12`). Of
//! the block's `k` pairs, the last [`SEEDED`] = 64 are *seeds* (see below) when `k >= 64`;
//! coded pair `i` is coded by state `i % 32` as its step `i / 32`; a *round* is one step of
//! every state in lane order, and the last round may be partial (states `0..coded % 32`).
//!
//! **States and renormalization.** States live in `[L, 2^31)` with `L = 2^15` and
//! renormalize with `b = 2^16` after *every* step. This is exact rANS (`L` is a multiple of
//! `M`): coding `s` (frequency `f`) lands in `[L, bL)` exactly for `x` in `[8 f, f 2^19)`,
//! so the decoder, after a step (then `x >= 8 f`), reads one word (`x = x << 16 | word`) iff
//! `x < L`, and one word always suffices; the encoder, before a step, emits the low 16 bits
//! of `x` and shifts them out iff `x >= f << 19`. States below `2^31` allow signed vector
//! compares; `L = 2^15` rather than `M` keeps the coding loss of a small `L / M` negligible
//! (`L = M` cost ~20 bytes per 64 KiB block).
//!
//! **Seeds.** An interleaved coder pays, per state, the `log2 L` bits of its initial state
//! plus the unused top of its stored final state. Instead of starting at `L`, state `j`
//! starts at `L + (p_j | p_{j + 32} << 8)`, holding raw the seed pairs `j` and `j + 32` (of
//! the last 64); they cost ~1.3 bits over `log2 L` instead of ~13 coded bits, which saves
//! ~50 bytes per block. The decoder ends with exactly these values and reads the seeds off.
//!
//! **One shared stream.** In each round, after all 32 steps, the states that need a word
//! read consecutive words in lane order (state 0 first): exactly the order in which the
//! SIMD decoder consumes them (a `movemask` of the lanes below `L`, a popcount to advance,
//! and a 256-entry `pshufb` table that routes the next words to those lanes). The encoder
//! runs backwards (last round first, lanes from 31 down to 0) and writes its words from the
//! end of a buffer towards the front, so they come out in decoding order.
//!
//! **Division-free encoding.** The scalar encoder computes `q = x / f` with the 64-bit
//! reciprocals of `rans` (exact for `x < 2^63`) and `C(s, x) = x + c + q (M - f)`. The AVX2
//! encoder estimates `q` as `trunc(float(x) * (1 / f))` in `f32`: with `x < f 2^19` the
//! relative error (three roundings of `2^-24`) is below `0.1 / q`, so the estimate is `q - 1`,
//! `q` or `q + 1`, and one correction each way on the remainder `r = x - q f` (into `[0,
//! f)`) makes it exact; then `C = q M + r + c`. Both produce the same words and states.
//!
//! **Decoder table.** `M` slot entries of one `u32`: `freq` (bits 0..12; every pair frequency
//! is below `M` because at least two nibbles, hence four pairs, are present), `bias = slot -
//! c` (bits 12..24) and the pair (bits 24..32). A step is `x = freq * (x >> 12) + bias` after
//! one lookup at `x & (M - 1)`.
//!
//! **Layout** (after the shared header and raw tail, see `rans`): the 32 final encoder
//! states as one little-endian bit string of 31 bits each, state 0 first ([`STATES_LEN`] =
//! 124 bytes), then the word stream (`u16` LE, in decoding order) to the end of the payload.
//!
//! **Hostile input.** Every unpacked state must be at least `L` (and is below `2^31` by
//! construction), so every step keeps `x` in `[L, 2^31)` without overflow. The stream must
//! have an even length. The fast paths run a round only while at least the 64 bytes it may
//! read remain (so unchecked windows or SIMD loads are in bounds); the rest of the block
//! decodes step by step with checked reads. At the end the stream must be consumed exactly
//! and every state must be an initial value of the encoder: `L` without seeds, else in `[L,
//! L + 2^16)` (the seeds are any 16 bits, so this check is weaker than `x == L`, but still
//! rejects a random state with probability ~1 - 2^-15 per state).

/// Interleaved states (four AVX2 vectors of 8 lanes).
pub(super) const LANES: usize = 32;
/// Precision of the pair frequencies (`M = 2^PREC` slots).
pub(super) const PREC: u32 = 12;
/// log2 of the lower bound `L` of the normalized state interval `[L, 2^STATE_BITS)`.
pub(super) const L_BITS: u32 = 15;
/// Lower bound `L` of the normalized state interval.
pub(super) const L: u32 = 1 << L_BITS;
/// Width of a state.
const STATE_BITS: u32 = L_BITS + 16;
/// Bytes of the packed final states.
pub(super) const STATES_LEN: usize = (LANES * STATE_BITS as usize).div_ceil(8);
/// Bytes of decoded output per round (two nibble bytes per state).
pub(super) const ROUND_OUT: usize = 2 * LANES;
/// Most stream bytes one round may read (one 16-bit word per state).
pub(super) const ROUND_READ: usize = 2 * LANES;
/// Mask of the slot (and of the 12-bit table fields).
const SLOT_MASK: u32 = (1 << PREC) - 1;

/// Encoder entry for one pair value (see module docs).
#[derive(Clone, Copy, Default)]
struct EncSym {
    /// Reciprocal of `f` for the 64-bit division-free quotient.
    rcp: u64,
    shift: u32,
    /// `f << (L_BITS - PREC + 16)`: the state must be below it before the step.
    x_max: u32,
    /// The start `c` (plus `M - 1` when `f = 1`).
    bias: u32,
    /// `M - f`.
    cmpl: u32,
}

/// The encoder's table for the AVX2 encoder: per pair value, `f | c << 16` (low half) and
/// the bits of `1 / f` as `f32` (high half); and the frequencies, from which the scalar
/// steps' entries are derived only where the scalar encoder runs ([`scalar_syms`]: two
/// 64-bit divisions per pair value, ~10% of a block's encoding time).
pub(super) struct EncTable {
    freqs: [u32; 256],
    pub(super) vector: [u64; 256],
}

fn enc_table(freqs: &[u32; 256]) -> EncTable {
    let mut t = EncTable {
        freqs: *freqs,
        vector: [0; 256],
    };
    let mut cum = 0u32;
    for (v, &f) in t.vector.iter_mut().zip(freqs) {
        let inverse = if f > 0 { 1.0 / f as f32 } else { 0.0 };
        *v = u64::from(f | cum << 16) | u64::from(inverse.to_bits()) << 32;
        cum += f;
    }
    t
}

/// The scalar encoder's entries for `freqs`.
fn scalar_syms(freqs: &[u32; 256]) -> [EncSym; 256] {
    let mut syms = [EncSym::default(); 256];
    let mut cum = 0u32;
    for (e, &f) in syms.iter_mut().zip(freqs) {
        let x_max = f << (L_BITS - PREC + 16);
        if f == 1 {
            // q = x - 1 (mulhi(x, 2^64 - 1)), compensated in the bias.
            *e = EncSym {
                rcp: u64::MAX,
                shift: 0,
                x_max,
                bias: cum + (1 << PREC) - 1,
                cmpl: (1 << PREC) - 1,
            };
        } else if f > 1 {
            let (rcp, shift) = super::rans::reciprocal(f);
            *e = EncSym {
                rcp,
                shift,
                x_max,
                bias: cum,
                cmpl: (1 << PREC) - f,
            };
        }
        cum += f;
    }
    syms
}

/// Reusable encoder buffer (one per thread), so blocks do not zero-fill fresh memory.
#[derive(Default)]
pub(super) struct EncodeScratch {
    words: Vec<u8>,
}

/// Codes one step of `e` onto `x`, first emitting the word the step needs: the word is
/// stored unconditionally just below `*pos` and `*pos` moves only if it is needed.
#[inline(always)]
fn enc_step(x: &mut u32, e: &EncSym, words: &mut [u8], pos: &mut usize) {
    let need = *x >= e.x_max;
    words[*pos - 2..*pos].copy_from_slice(&(*x as u16).to_le_bytes());
    *pos -= 2 * usize::from(need);
    let v = u64::from(*x >> (16 * u32::from(need)));
    let q = ((u128::from(v) * u128::from(e.rcp)) >> 64) as u64 >> e.shift;
    *x = (v + u64::from(e.bias) + q * u64::from(e.cmpl)) as u32;
}

/// The pair value of the two nibble bytes at `d`.
#[inline(always)]
fn pair(d: &[u8]) -> usize {
    usize::from(d[0] | d[1] << 4)
}

/// Pairs held raw by the initial states (two per state) when the block has that many.
pub(super) const SEEDED: usize = 2 * LANES;

/// How many of `pairs` pairs are seeds (the last [`SEEDED`], or none in a shorter block).
pub(super) fn seeded(pairs: usize) -> usize {
    if pairs >= SEEDED {
        SEEDED
    } else {
        0
    }
}

/// Appends the packed states and the word stream coding the nibble pairs of `data` (even
/// length; every pair value present with a non-zero frequency in `freqs`, which sum to
/// `M`).
pub(super) fn encode(
    data: &[u8],
    freqs: &[u32; 256],
    scratch: &mut EncodeScratch,
    out: &mut Vec<u8>,
) {
    debug_assert_eq!(data.len() % 2, 0);
    let table = enc_table(freqs);
    let pairs = data.len() / 2;
    let (data, seeds) = data.split_at(2 * (pairs - seeded(pairs)));
    let mut x = [L; LANES];
    if !seeds.is_empty() {
        for (j, x) in x.iter_mut().enumerate() {
            let (a, b) = (pair(&seeds[2 * j..]), pair(&seeds[2 * (LANES + j)..]));
            *x = L + (a | b << 8) as u32;
        }
    }
    let coded = data.len() / 2;
    let rounds = coded / LANES;
    // At most one word per step, plus room below the last one for the unconditional
    // stores (16 bytes for a vector of words).
    let cap = 2 * coded + 16;
    if scratch.words.len() < cap {
        scratch.words.resize(cap, 0);
    }
    let words = &mut scratch.words[..cap];
    let mut pos = cap;
    let (whole, partial) = data.split_at(rounds * ROUND_OUT);
    if !partial.is_empty() {
        let syms = scalar_syms(freqs);
        for (j, d) in partial.chunks_exact(2).enumerate().rev() {
            enc_step(&mut x[j], &syms[pair(d)], words, &mut pos);
        }
    }
    super::rans_lanes_avx2::encode_rounds(&mut x, &table, whole, words, &mut pos);
    // The states as one little-endian bit string, STATE_BITS each, state 0 first.
    let (mut acc, mut bits) = (0u64, 0);
    for &x in &x {
        acc |= u64::from(x) << bits;
        bits += STATE_BITS;
        while bits >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            bits -= 8;
        }
    }
    if bits > 0 {
        out.push(acc as u8);
    }
    out.extend_from_slice(&words[pos..]);
}

/// Codes the whole rounds of `data` (a multiple of [`ROUND_OUT`] bytes), last round first,
/// writing words below `*pos` (which must leave room for one word per step).
pub(super) fn encode_rounds(
    x: &mut [u32; LANES],
    table: &EncTable,
    data: &[u8],
    words: &mut [u8],
    pos: &mut usize,
) {
    let syms = scalar_syms(&table.freqs);
    for round in data.rchunks_exact(ROUND_OUT) {
        for j in (0..LANES).rev() {
            enc_step(&mut x[j], &syms[pair(&round[2 * j..])], words, pos);
        }
    }
}

/// The decoder's slot table for `freqs` (validated: at least two present pairs, summing to
/// `M`, so every frequency is below `M`).
pub(super) fn dec_table(freqs: &[u32; 256]) -> [u32; 1 << PREC] {
    let mut table = [0u32; 1 << PREC];
    let mut cum = 0usize;
    for (s, &f) in freqs.iter().enumerate() {
        let base = f | (s as u32) << 24;
        for (bias, t) in table[cum..cum + f as usize].iter_mut().enumerate() {
            *t = base | (bias as u32) << 12;
        }
        cum += f as usize;
    }
    table
}

/// Decodes one step of `x`, without renormalization; returns the pair.
#[inline(always)]
fn dec_step(x: &mut u32, table: &[u32; 1 << PREC]) -> u8 {
    let e = table[(*x & SLOT_MASK) as usize];
    *x = (e & SLOT_MASK) * (*x >> PREC) + ((e >> PREC) & SLOT_MASK);
    (e >> 24) as u8
}

/// Writes pair `p` as its two nibble bytes, low nibble first.
#[inline(always)]
fn put_pair(o: &mut [u8], p: u8) {
    o[0] = p & 0xf;
    o[1] = p >> 4;
}

/// Unpacks and validates the final encoder states at the start of `payload`.
pub(super) fn read_states(payload: &[u8]) -> Result<[u32; LANES], &'static str> {
    let packed = payload.get(..STATES_LEN).ok_or("truncated rANS states")?;
    let mut x = [0u32; LANES];
    let (mut acc, mut bits) = (0u64, 0);
    let mut bytes = packed.iter();
    for x in &mut x {
        while bits < STATE_BITS {
            acc |= u64::from(*bytes.next().expect("STATES_LEN bytes")) << bits;
            bits += 8;
        }
        *x = (acc & ((1 << STATE_BITS) - 1)) as u32;
        acc >>= STATE_BITS;
        bits -= STATE_BITS;
    }
    if x.iter().any(|&x| x < L) {
        return Err("rANS state out of range");
    }
    Ok(x)
}

/// Decodes whole rounds into `out` (a multiple of [`ROUND_OUT`] bytes) while at least
/// [`ROUND_READ`] stream bytes remain at `*pos`, branch-free, reading each round's words
/// from a local window; returns the number of output bytes done.
pub(super) fn decode_rounds(
    x: &mut [u32; LANES],
    table: &[u32; 1 << PREC],
    stream: &[u8],
    pos: &mut usize,
    out: &mut [u8],
) -> usize {
    let mut done = 0;
    for o in out.chunks_exact_mut(ROUND_OUT) {
        let Some(win) = stream.get(*pos..*pos + ROUND_READ) else {
            break;
        };
        let win: &[u8; ROUND_READ] = win.try_into().expect("ROUND_READ bytes");
        let mut k = 0usize;
        for (j, o) in o.chunks_exact_mut(2).enumerate() {
            let p = dec_step(&mut x[j], table);
            put_pair(o, p);
            // need = 1 iff x < L; x = x << 16 | word then, else unchanged.
            let need = u32::from(x[j] < L);
            let at = 2 * (k & (LANES - 1));
            let w = u32::from(u16::from_le_bytes([win[at], win[at + 1]]));
            x[j] = x[j] << (16 * need) | (w & need.wrapping_neg());
            k += need as usize;
        }
        *pos += 2 * k;
        done += ROUND_OUT;
    }
    done
}

/// Decodes the steps of `out` (two nibble bytes each, rounds of [`LANES`] steps, the last
/// one possibly partial) with a bounds-checked read per word.
pub(super) fn decode_rest_checked(
    x: &mut [u32; LANES],
    table: &[u32; 1 << PREC],
    stream: &[u8],
    pos: &mut usize,
    out: &mut [u8],
) -> Result<(), &'static str> {
    for (i, o) in out.chunks_exact_mut(2).enumerate() {
        let x = &mut x[i % LANES];
        put_pair(o, dec_step(x, table));
        if *x < L {
            let w = stream.get(*pos..*pos + 2).ok_or("rANS stream truncated")?;
            *x = *x << 16 | u32::from(u16::from_le_bytes([w[0], w[1]]));
            *pos += 2;
        }
    }
    Ok(())
}

/// Decodes the nibble pairs of `out` (even length) from `payload` (packed states, word
/// stream) with validated `freqs` (see [`dec_table`]).
pub(super) fn decode(
    payload: &[u8],
    freqs: &[u32; 256],
    out: &mut [u8],
) -> Result<(), &'static str> {
    let mut x = read_states(payload)?;
    let stream = &payload[STATES_LEN..];
    if stream.len() % 2 != 0 {
        return Err("rANS word stream has an odd length");
    }
    let table = dec_table(freqs);
    let pairs = out.len() / 2;
    let (out, seeds) = out.split_at_mut(2 * (pairs - seeded(pairs)));
    let mut pos = 0;
    let whole = out.len() / ROUND_OUT * ROUND_OUT;
    let done =
        super::rans_lanes_avx2::decode_rounds(&mut x, &table, stream, &mut pos, &mut out[..whole]);
    decode_rest_checked(&mut x, &table, stream, &mut pos, &mut out[done..])?;
    if pos != stream.len() {
        return Err("rANS stream not consumed exactly");
    }
    // The states must be back at the encoder's initial values: L plus the seeds.
    let seed_end = if seeds.is_empty() {
        L + 1
    } else {
        L + (1 << 16)
    };
    if x.iter().any(|&x| !(L..seed_end).contains(&x)) {
        return Err("rANS stream does not end in an initial state");
    }
    if !seeds.is_empty() {
        let (first, second) = seeds.split_at_mut(2 * LANES);
        for ((x, a), b) in x
            .iter()
            .zip(first.chunks_exact_mut(2))
            .zip(second.chunks_exact_mut(2))
        {
            put_pair(a, (x - L) as u8);
            put_pair(b, ((x - L) >> 8) as u8);
        }
    }
    Ok(())
}
