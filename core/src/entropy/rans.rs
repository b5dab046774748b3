//! Order-0 interleaved rANS (range asymmetric numeral system) coding of one block of byte
//! symbols, either one byte per coding step or, when every byte is below 16, one *nibble
//! pair* (two 4-bit codes) per step.
//!
//! Three payload kinds share a header and the frequency model: kind 0 (bytes) and kind 1
//! (nibble pairs), coded here by 4 states of 64 bits with one stream each, and kind 2
//! (nibble pairs), 32 states of 31 bits sharing one stream of 16-bit words, laid out for an
//! AVX2 decoder (see `rans_lanes`). The encoder writes kind 2 for every rANS block; kinds 0
//! and 1 are still decoded (kind 1 is what format version 2 wrote) and written only by
//! tests. The rest of this documentation describes kinds 0 and 1 and the shared parts.
//!
//! **rANS.** With symbol frequencies `f_s` summing to `M = 2^P` and cumulative starts `c_s`, a
//! state `x` codes symbol `s` as `C(s, x) = (x / f_s) * M + x % f_s + c_s`; the decoder
//! recovers `s` from the slot `x' % M` (the `s` with `c_s <= slot < c_s + f_s`) and sets
//! `x = f_s * (x' / M) + slot - c_s`. The state grows by `log2(M / f_s)` bits per symbol, so
//! the cost is within a hair of the ideal `-log2(f_s / M)`. Encoding runs backwards over the
//! block and decoding forwards, so the decoder emits symbols in order.
//!
//! **Units, states and streams.** Steps are grouped in *units* of two consecutive steps (2
//! bytes, or 4 nibbles for pairs); the `n % 2` resp. `n % 4` bytes after the last whole unit
//! are stored raw. [`STATES`] = 4 states of 64 bits code the units round-robin (unit `i` uses
//! state `i % 4`), and each state has its *own* stream of 32-bit words, so the four
//! dependency chains share nothing (no serial offset through a shared stream).
//!
//! **Renormalization: once per unit.** States live in `[L, 2^63)` with `L = 2^31`, and
//! renormalize with `b = 2^32` (one 32-bit word) once per unit, after its *two* steps. This
//! is exact rANS: when `M` divides `L'`, `C(s, x)` lies in `[L', bL')` exactly for `x` in
//! `[L' f / M, b L' f / M)`; `L = 2^31` is a multiple of `M^2 = 2^24`, so coding a unit
//! (`C(s0, C(s1, x))`, `f0`, `f1`: the frequencies of its first and second step) lands in
//! `[L, bL)` exactly for `x` in `[L f0 f1 / M^2, b L f0 f1 / M^2)`. Hence the decoder, after
//! the unit's two steps, reads one word into `x` (`x = x << 32 | word`) iff `x < L`, and one
//! word always suffices (then `x` is at least `L f0 f1 / M^2`, so at least `2^7`). The
//! encoder, before coding a unit (second step first), emits the low 32 bits of `x` and
//! shifts them out iff `x >= f0 f1 2^(63 - 2P)`, i.e. `x >> (63 - 2P) >= f0 f1`. Both are
//! branch-free: the decoder loads the word at its stream position unconditionally and
//! computes `need = ((x >> 31) - 1) >> 63` (1 iff `x < L`), then
//! `x = x * (1 + need * (2^32 - 1)) + word * need` and `position += need`: arithmetic the
//! compiler does not turn into an unpredictable branch (a plain `if` or a mask select was
//! compiled to one). The encoder stores its word unconditionally and moves its position by
//! `need` (a `cmov`).
//!
//! **Windows.** The fast paths work on chunks of [`CHUNK`] = 16 units per state: the decoder
//! copies each state's next `4 * CHUNK` stream bytes into a local window (when all four
//! streams have them; else that chunk and the rest decode unit by unit with checked reads)
//! and indexes it with `k & (CHUNK - 1)`, so no bounds checks and no pointer registers are
//! needed; the encoder fills local windows from the top down and copies each out below its
//! state's position (the junk below the words lands where later words or nothing goes).
//!
//! **Division-free encoding** (Alverson, as in ryg's `rans64`): for `f >= 2`, with `shift =
//! ceil(log2 f)` and `rcp = ceil(2^(shift + 63) / f)` (below `2^64`), `x / f` equals
//! `mulhi64(x, rcp) >> (shift - 1)` for every `x < 2^63`; for `f = 1`, `rcp = 2^64 - 1` and
//! shift 0 give `x - 1`, compensated by a bias of `c + M - 1`. Then `C(s, x) = x + bias + q
//! (M - f)`. The encoder's states stay below `2^63` (they start at `L` and each unit ends
//! in `[L, bL)`).
//!
//! **Frequencies.** All steps use `P =` [`PREC`] `= 12`. Byte steps: counts are scaled to
//! `M`, every present symbol gets at least 1, and the rounding deficit is settled greedily
//! where it costs least. Nibble-pair steps use an order-0 *product* model, so that only 16
//! numbers are stored: the nibble counts are normalized to `2^`[`NIBBLE_PREC`] the same way,
//! and the frequency of pair `(a, b)` (value `a | b << 4`, `a` first in the data) is `g_a *
//! g_b` rounded to `M`, at least 1, with the rounding error spread one unit at a time over
//! the pairs in descending frequency order (ties: ascending value). This derivation is
//! deterministic integer arithmetic done identically by both sides. Pairs halve the number
//! of steps; on int4 codes the product model at `P = 12` costs ~0.001 bit per code over the
//! entropy.
//!
//! **Decoder table.** `2^P` slot entries of 8 bytes (32 KiB at `P = 12`): `freq: u32`,
//! `bias: u16` (`slot - c`) and `out: u16`, the step's output bytes little-endian (the byte;
//! or the low nibble, then the high nibble), so a step is one masked index, three loads, a
//! shift, a multiply, an add and one store.
//!
//! **Payload layout** (`n` = the block's symbol count, known to the caller):
//! `kind: u8` (0 bytes, 1 or 2 nibble pairs), `precision P: u8`, `first: u8, last: u8`, one
//! LEB128 frequency (at most 2 bytes) per symbol `first..=last` (0 = absent; the nibble
//! frequencies for pairs), the raw tail (`n % 2` bytes for bytes, `n % 4` for kind 1, `n %
//! 2` for kind 2), then for kinds 0 and 1 the 4 final encoder states (`u64` LE, state 0
//! first), the sizes of streams 0 to 2 in words (LEB128, at most 5 bytes each), then streams
//! 0 to 3 (`u32` LE words, each in decoding order); stream 3 is the rest of the payload. Kind
//! 2 continues as `rans_lanes` describes (packed states, one word stream), with `P = 12`.
//!
//! **Hostile input.** The decoder accepts only `P` in `8..=12`, tables whose frequencies sum
//! exactly to `M` (`2^NIBBLE_PREC` for nibbles, and nibbles below 16) with at least two
//! present symbols, so every frequency is below `M`, every slot maps to exactly one symbol
//! and `f * (x >> P) + slot - c < 2^63`; and initial states in `[L, 2^63)`, an interval every
//! unit then preserves (after two steps `x >= 2^7`, and a word is read only below `L`). All
//! arithmetic thus stays in `u64` without overflow. Every stream size is checked against the
//! bytes left in the payload before the streams are split; reads are bounds-checked (whole
//! windows via `get`, else per word), and at the end every state must be back at `L` (the
//! encoder's initial value) and every stream consumed exactly. Corruption that survives
//! these checks yields wrong bytes of the right length, never a panic. No `unsafe`.

use super::rans_lanes;
pub(super) use super::rans_lanes::EncodeScratch;

/// Interleaved states, each with its own word stream.
pub(super) const STATES: usize = 4;
/// Lower bound of the normalized state interval `[L, 2^63)`.
const L: u64 = 1 << 31;
/// Upper bound (exclusive) of the normalized state interval.
const L_END: u64 = 1 << 63;
/// Precision `P` of the step frequencies written by the encoder (bytes and pairs).
pub(super) const PREC: u32 = 12;
/// Precision of the stored nibble frequencies of the pair model.
const NIBBLE_PREC: u32 = 12;
/// Largest precision accepted by the decoder (sizes its slot table).
const MAX_PREC: u32 = 12;
/// Units per state in one window of the fast paths (see module docs).
const CHUNK: usize = 16;
/// Bytes of one state's window: one 32-bit word per unit at most.
const WIN: usize = 4 * CHUNK;
/// Payload kinds.
const KIND_BYTES: u8 = 0;
const KIND_PAIRS: u8 = 1;
const KIND_PAIR_LANES: u8 = 2;

/// Which alphabet and stream layout a block is coded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// One byte per step (kind 0). Decoded, but written only by tests: on BF16/F32 planes it
    /// has not been measured against Huffman's speed, so the encoder uses `PairLanes` only.
    #[cfg_attr(not(test), allow(dead_code))]
    Bytes,
    /// Two nibbles per step, 4 states of 64 bits (kind 1, written by format version 2).
    /// Decoded, but written only by tests since `PairLanes` replaced it.
    #[cfg_attr(not(test), allow(dead_code))]
    Pairs,
    /// Two nibbles per step, 32 states of 31 bits sharing one stream (kind 2; see
    /// `rans_lanes`). Every byte of the block is below 16.
    PairLanes,
}

impl Kind {
    /// Bytes per step.
    fn width(self) -> usize {
        match self {
            Kind::Bytes => 1,
            Kind::Pairs | Kind::PairLanes => 2,
        }
    }

    /// Bytes of a coded unit; the `n % unit` bytes after the last whole unit are stored raw.
    fn unit(self) -> usize {
        match self {
            Kind::Bytes | Kind::Pairs => 2 * self.width(),
            Kind::PairLanes => 2,
        }
    }
}

/// A frequency table ready for encoding: the kind, the stored table and the step
/// frequencies.
pub(super) struct Model {
    kind: Kind,
    prec: u32,
    /// Stored frequencies (per byte, or per nibble for pairs), indexed by symbol.
    stored: [u32; 256],
    /// Frequencies of the step alphabet (bytes or pair values), summing to `2^prec`.
    freqs: [u32; 256],
}

impl Model {
    /// The model for a block with histogram `hist` (at least two distinct symbols). `Pairs`
    /// requires every symbol below 16.
    pub(super) fn new(kind: Kind, hist: &[u32; 256]) -> Model {
        match kind {
            Kind::Bytes => {
                let freqs = normalize(hist, PREC);
                Model {
                    kind,
                    prec: PREC,
                    stored: freqs,
                    freqs,
                }
            }
            Kind::Pairs | Kind::PairLanes => {
                debug_assert!(hist[16..].iter().all(|&c| c == 0));
                let stored = normalize(hist, NIBBLE_PREC);
                let mut nib = [0u32; 16];
                nib.copy_from_slice(&stored[..16]);
                Model {
                    kind,
                    prec: PREC,
                    stored,
                    freqs: pair_freqs(&nib, PREC),
                }
            }
        }
    }

    /// Estimated payload size in bytes for a block with histogram `hist` of `n` symbols:
    /// table, states, stream sizes and the ideal cost of the steps (for pairs under the
    /// product model), which the real coder matches within a few bytes.
    pub(super) fn estimated_size(&self, hist: &[u32; 256], n: usize) -> usize {
        let m = f64::from(1u32 << self.prec);
        let bits = match self.kind {
            Kind::Bytes => hist
                .iter()
                .zip(&self.freqs)
                .filter(|(&c, _)| c > 0)
                .map(|(&c, &f)| f64::from(c) * (m / f64::from(f)).log2())
                .sum::<f64>(),
            Kind::Pairs | Kind::PairLanes => {
                let total = n as f64;
                let steps = (n / 2) as f64;
                let mut bits = 0.0;
                for a in 0..16 {
                    for b in 0..16 {
                        let f = self.freqs[a | b << 4];
                        if f > 0 {
                            let p = f64::from(hist[a]) * f64::from(hist[b]) / (total * total);
                            bits += p * steps * (m / f64::from(f)).log2();
                        }
                    }
                }
                bits
            }
        };
        if self.kind == Kind::PairLanes {
            // The stream carries the bits of the coded steps plus those of the initial states
            // (log2 L = 15, about 16.3 with two seed pairs), less those held by the final
            // states (15 to 31 bits, ~23 on average).
            let pairs = n / 2;
            let seeded = rans_lanes::seeded(pairs);
            let coded_bits = bits * (pairs - seeded) as f64 / pairs.max(1) as f64;
            let initial = if seeded > 0 { 16.3 } else { 15.0 };
            let lanes = rans_lanes::LANES as f64;
            let stream = ((coded_bits + lanes * (initial - 23.0)) / 16.0).max(0.0);
            return self.table_len(n) + rans_lanes::STATES_LEN + 2 * stream.round() as usize;
        }
        // Each stream carries its share of the bits plus the 31 of the initial state L, less
        // those held by its final state (31 to 63 bits, ~47 on average).
        let per_stream = ((bits / STATES as f64 - 16.0) / 32.0).max(0.0).round() as usize;
        let sizes = (STATES - 1) * varint_len(per_stream);
        self.table_len(n) + 8 * STATES + sizes + STATES * 4 * per_stream
    }

    /// Bytes of the payload before the states.
    fn table_len(&self, n: usize) -> usize {
        let (first, last) = range(&self.stored);
        let varints: usize = self.stored[first..=last]
            .iter()
            .map(|&f| if f < 128 { 1 } else { 2 })
            .sum();
        4 + varints + n % self.kind.unit()
    }
}

/// First and last symbol with a non-zero entry.
fn range(freqs: &[u32; 256]) -> (usize, usize) {
    let first = freqs.iter().position(|&f| f > 0).unwrap_or(0);
    let last = freqs.iter().rposition(|&f| f > 0).unwrap_or(0);
    (first, last)
}

/// Scales counts to frequencies summing to `2^prec`, at least 1 for every present symbol.
/// The rounding deficit is settled greedily by the marginal cost `c * log2(f / (f -/+ 1))`,
/// compared exactly as `c_a / f_a` against `c_b / f_b` by cross-multiplication.
fn normalize(hist: &[u32; 256], prec: u32) -> [u32; 256] {
    let m = 1u64 << prec;
    let n: u64 = hist.iter().map(|&c| u64::from(c)).sum();
    let mut f = [0u32; 256];
    let mut sum = 0u64;
    for (f, &c) in f.iter_mut().zip(hist) {
        if c > 0 {
            *f = ((u64::from(c) * m / n) as u32).max(1);
            sum += u64::from(*f);
        }
    }
    // The present symbols (only they change) lie in `first..=last`.
    let (first, last) = range(hist);
    // Largest ratio c / f first: gains most from +1.
    while sum < m {
        let mut best = usize::MAX;
        for s in first..=last {
            if hist[s] > 0
                && (best == usize::MAX
                    || u64::from(hist[s]) * u64::from(f[best])
                        > u64::from(hist[best]) * u64::from(f[s]))
            {
                best = s;
            }
        }
        f[best] += 1;
        sum += 1;
    }
    // Smallest ratio c / (f - 1) first: loses least from -1.
    while sum > m {
        let mut best = usize::MAX;
        for s in first..=last {
            if f[s] > 1
                && (best == usize::MAX
                    || u64::from(hist[s]) * u64::from(f[best] - 1)
                        < u64::from(hist[best]) * u64::from(f[s] - 1))
            {
                best = s;
            }
        }
        f[best] -= 1;
        sum -= 1;
    }
    f
}

/// Pair frequencies (index `a | b << 4`) of the product model of nibble frequencies `g`
/// summing to `2^NIBBLE_PREC`, normalized to sum to `2^prec` (see module docs).
fn pair_freqs(g: &[u32; 16], prec: u32) -> [u32; 256] {
    let shift = 2 * NIBBLE_PREC - prec;
    let m = 1i64 << prec;
    let mut f = [0u32; 256];
    let mut sum = 0i64;
    for a in 0..16 {
        for b in 0..16 {
            let w = g[a] * g[b];
            if w > 0 {
                let v = ((w + (1 << (shift - 1))) >> shift).max(1);
                f[a | b << 4] = v;
                sum += i64::from(v);
            }
        }
    }
    let mut diff = m - sum;
    if diff != 0 {
        // Present pairs by descending frequency, then ascending index: sort keys
        // `(2^13 - f) << 8 | i` (every f is at most 2^12).
        let mut keys = [0u32; 256];
        let mut count = 0;
        for (i, &v) in f.iter().enumerate() {
            if v > 0 {
                keys[count] = ((1 << 13) - v) << 8 | i as u32;
                count += 1;
            }
        }
        let order = &mut keys[..count];
        // Usually only the first pass's first |diff| pairs change, each by one unit: they are
        // the |diff| smallest keys, found without sorting. Decrements need them all above 1,
        // which holds when at least |diff| pairs are (those come first in the order).
        let k = diff.unsigned_abs() as usize;
        let eligible = if diff > 0 {
            count
        } else {
            order
                .iter()
                .filter(|&&key| (1 << 13) - (key >> 8) > 1)
                .count()
        };
        if k <= eligible {
            if k < count {
                order.select_nth_unstable(k - 1);
            }
            let step = if diff > 0 { 1 } else { u32::MAX };
            for &key in &order[..k] {
                let i = (key & 0xff) as usize;
                f[i] = f[i].wrapping_add(step);
            }
            return f;
        }
        order.sort_unstable();
        while diff != 0 {
            for &key in order.iter() {
                let i = (key & 0xff) as usize;
                if diff > 0 {
                    f[i] += 1;
                    diff -= 1;
                } else if diff < 0 && f[i] > 1 {
                    f[i] -= 1;
                    diff += 1;
                }
                if diff == 0 {
                    break;
                }
            }
        }
    }
    f
}

/// LEB128 length of `v`.
fn varint_len(v: usize) -> usize {
    let mut len = 1;
    let mut v = v >> 7;
    while v > 0 {
        len += 1;
        v >>= 7;
    }
    len
}

/// Encoder entry for one symbol.
#[derive(Clone, Copy, Default)]
struct EncSym {
    /// Reciprocal of `f` (see module docs).
    rcp: u64,
    /// Added to `x`: the start `c` of the symbol (plus `M - 1` when `f = 1`).
    bias: u64,
    /// `M - f`.
    cmpl: u32,
    /// Shift of the reciprocal.
    shift: u32,
    /// The frequency `f`.
    freq: u32,
}

/// The division-free quotient by `f >= 2` (see module docs): `(rcp, shift)` such that `x / f
/// = mulhi64(x, rcp) >> shift` for every `x < 2^63`. With `s = ceil(log2 f)`, `rcp =
/// ceil(2^(s + 63) / f)` by two 64-bit divisions (`2^(s + 63) = 2^(s + 31) * 2^32`) and
/// `shift = s - 1`.
pub(super) fn reciprocal(f: u32) -> (u64, u32) {
    let s = 32 - (f - 1).leading_zeros();
    let f64 = u64::from(f);
    let hi = 1u64 << (s + 31);
    let lo = ((hi % f64) << 32).div_ceil(f64);
    (lo + ((hi / f64) << 32), s - 1)
}

fn enc_table(freqs: &[u32; 256], prec: u32) -> [EncSym; 256] {
    let m = 1u32 << prec;
    let mut t = [EncSym::default(); 256];
    let mut cum = 0u32;
    for (e, &f) in t.iter_mut().zip(freqs) {
        if f == 1 {
            *e = EncSym {
                rcp: u64::MAX,
                bias: u64::from(cum + m - 1),
                cmpl: m - 1,
                shift: 0,
                freq: 1,
            };
        } else if f > 1 {
            let (rcp, shift) = reciprocal(f);
            *e = EncSym {
                rcp,
                bias: u64::from(cum),
                cmpl: m - f,
                shift,
                freq: f,
            };
        }
        cum += f;
    }
    t
}

/// Codes one step of symbol `e` onto the state `x < 2^63`: `C(s, x) = (x / f) * M + x % f + c`
/// computed as `x + bias + q * (M - f)`, `q = x / f` by the reciprocal.
#[inline(always)]
fn enc_put(x: u64, e: &EncSym) -> u64 {
    let q = ((u128::from(x) * u128::from(e.rcp)) >> 64) as u64 >> e.shift;
    x + e.bias + q * u64::from(e.cmpl)
}

/// Whether the state `x` must emit a word before coding a unit of symbols `e0` then `e1`:
/// `x >= f0 * f1 * 2^(63 - 2P)`.
#[inline(always)]
fn enc_need<const PREC: u32>(x: u64, e0: &EncSym, e1: &EncSym) -> bool {
    x >> (63 - 2 * PREC) >= u64::from(e0.freq * e1.freq)
}

/// Codes one unit (`e0` then `e1` in decoding order) onto `x`, in a window: the
/// renormalization word is stored unconditionally at word `*k & (CHUNK - 1)` of `win` and `*k`
/// (counting down from `CHUNK - 1`) moves only when the word is needed; branch-free.
#[inline(always)]
fn enc_unit(x: &mut u64, e0: &EncSym, e1: &EncSym, win: &mut [u8; WIN], k: &mut usize) {
    let need = enc_need::<PREC>(*x, e0, e1);
    let at = 4 * (*k & (CHUNK - 1));
    win[at..at + 4].copy_from_slice(&(*x as u32).to_le_bytes());
    *k = k.wrapping_sub(usize::from(need));
    let v = if need { *x >> 32 } else { *x };
    *x = enc_put(enc_put(v, e1), e0);
}

/// [`enc_unit`] writing below `*pos` in a state's whole stream region.
#[inline(always)]
fn enc_unit_checked(x: &mut u64, e0: &EncSym, e1: &EncSym, region: &mut [u8], pos: &mut usize) {
    let v = if enc_need::<PREC>(*x, e0, e1) {
        region[*pos - 4..*pos].copy_from_slice(&(*x as u32).to_le_bytes());
        *pos -= 4;
        *x >> 32
    } else {
        *x
    };
    *x = enc_put(enc_put(v, e1), e0);
}

/// The step symbols of a unit at `d` (`2 * W` bytes): bytes (`W = 1`) or nibble pairs, low
/// nibble first (`W = 2`).
#[inline(always)]
fn unit_syms<const W: usize>(d: &[u8]) -> (usize, usize) {
    if W == 1 {
        (usize::from(d[0]), usize::from(d[1]))
    } else {
        (usize::from(d[0] | d[1] << 4), usize::from(d[2] | d[3] << 4))
    }
}

/// [`encode_with`] with a fresh scratch buffer.
#[cfg(test)]
pub(super) fn encode(data: &[u8], model: &Model, out: &mut Vec<u8>) -> usize {
    encode_with(data, model, &mut EncodeScratch::default(), out)
}

/// Appends the payload coding `data` (non-empty; at least two distinct symbols, all with a
/// non-zero frequency in `model`) to `out`, using `scratch`; returns its size.
pub(super) fn encode_with(
    data: &[u8],
    model: &Model,
    scratch: &mut EncodeScratch,
    out: &mut Vec<u8>,
) -> usize {
    assert_eq!(model.prec, PREC, "the encoder codes at PREC");
    let base = out.len();
    out.push(match model.kind {
        Kind::Bytes => KIND_BYTES,
        Kind::Pairs => KIND_PAIRS,
        Kind::PairLanes => KIND_PAIR_LANES,
    });
    out.push(model.prec as u8);
    let (first, last) = range(&model.stored);
    out.push(first as u8);
    out.push(last as u8);
    for &f in &model.stored[first..=last] {
        if f < 128 {
            out.push(f as u8);
        } else {
            out.push((f & 0x7f) as u8 | 0x80);
            out.push((f >> 7) as u8);
        }
    }
    let unit = model.kind.unit();
    let coded = data.len() / unit * unit;
    out.extend_from_slice(&data[coded..]);
    let data = &data[..coded];
    match model.kind {
        Kind::Bytes => encode_streams::<1>(data, &enc_table(&model.freqs, model.prec), out),
        Kind::Pairs => encode_streams::<2>(data, &enc_table(&model.freqs, model.prec), out),
        Kind::PairLanes => rans_lanes::encode(data, &model.freqs, scratch, out),
    }
    out.len() - base
}

/// Appends the states, stream sizes and streams coding the units of `data` (`2 * W` bytes
/// each).
fn encode_streams<const W: usize>(data: &[u8], table: &[EncSym; 256], out: &mut Vec<u8>) {
    let u = 2 * W;
    let units = data.len() / u;
    // Each state's stream is written backwards from the end of its own region, which has
    // room for one word per unit of that state; the regions follow room for the states and
    // the stream sizes.
    let full = units / STATES;
    let rest = units % STATES;
    let caps: [usize; STATES] = std::array::from_fn(|j| 4 * (full + usize::from(j < rest)));
    let head = 8 * STATES + 5 * (STATES - 1);
    let start = out.len();
    out.resize(start + head + caps.iter().sum::<usize>(), 0);
    let mut regions: [&mut [u8]; STATES] = Default::default();
    let mut tail = &mut out[start + head..];
    for (r, &cap) in regions.iter_mut().zip(&caps) {
        let (a, b) = std::mem::take(&mut tail).split_at_mut(cap);
        *r = a;
        tail = b;
    }
    let mut pos = caps;
    let mut x = [L; STATES];
    // The last, partial round, backwards.
    for i in (full * STATES..units).rev() {
        let j = i % STATES;
        let (s0, s1) = unit_syms::<W>(&data[u * i..]);
        enc_unit_checked(&mut x[j], &table[s0], &table[s1], regions[j], &mut pos[j]);
    }
    // Whole rounds, backwards, CHUNK rounds at a time in windows of the regions (a state
    // with CHUNK units left has at least WIN bytes of room below its position).
    let mut chunks = data[..full * STATES * u].rchunks_exact(CHUNK * STATES * u);
    for chunk in &mut chunks {
        // The words go to local windows (no pointer registers), copied out afterwards: the
        // junk below a state's words lands below its new position, overwritten later.
        let mut wins = [[0u8; WIN]; STATES];
        let mut k = [CHUNK - 1; STATES];
        for r in chunk.rchunks_exact(STATES * u) {
            for j in (0..STATES).rev() {
                let (s0, s1) = unit_syms::<W>(&r[u * j..u * j + u]);
                enc_unit(&mut x[j], &table[s0], &table[s1], &mut wins[j], &mut k[j]);
            }
        }
        for ((r, p), (k, win)) in regions.iter_mut().zip(&mut pos).zip(k.iter().zip(&wins)) {
            r[*p - WIN..*p].copy_from_slice(win);
            *p -= 4 * (CHUNK - 1).wrapping_sub(*k);
        }
    }
    let rem = chunks.remainder();
    for i in (0..rem.len() / u).rev() {
        let j = i % STATES;
        let (s0, s1) = unit_syms::<W>(&rem[u * i..]);
        enc_unit_checked(&mut x[j], &table[s0], &table[s1], regions[j], &mut pos[j]);
    }
    // Header: the states, then the sizes of streams 0..STATES-1 in words.
    let mut at = start;
    for x in x {
        out[at..at + 8].copy_from_slice(&x.to_le_bytes());
        at += 8;
    }
    for j in 0..STATES - 1 {
        let mut v = (caps[j] - pos[j]) / 4;
        while v >= 0x80 {
            out[at] = (v & 0x7f) as u8 | 0x80;
            at += 1;
            v >>= 7;
        }
        out[at] = v as u8;
        at += 1;
    }
    let mut from = start + head;
    for j in 0..STATES {
        out.copy_within(from + pos[j]..from + caps[j], at);
        at += caps[j] - pos[j];
        from += caps[j];
    }
    out.truncate(at);
}

/// Reads a LEB128 frequency (at most two bytes, below `2^15`) at `*at`.
fn read_freq(payload: &[u8], at: &mut usize) -> Result<u32, &'static str> {
    let b0 = *payload.get(*at).ok_or("truncated rANS table")?;
    *at += 1;
    if b0 < 0x80 {
        return Ok(u32::from(b0));
    }
    let b1 = *payload.get(*at).ok_or("truncated rANS table")?;
    *at += 1;
    if b1 >= 0x80 {
        return Err("rANS frequency too large");
    }
    Ok(u32::from(b0 & 0x7f) | u32::from(b1) << 7)
}

/// Reads a LEB128 stream size in words (at most five bytes) at `*at`.
fn read_size(payload: &[u8], at: &mut usize) -> Result<u64, &'static str> {
    let mut v = 0u64;
    for i in 0..5 {
        let b = *payload.get(*at).ok_or("truncated rANS stream sizes")?;
        *at += 1;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err("rANS stream size too large")
}

/// Checks that `freqs` sum to `2^prec` with at least two present symbols.
fn check_freqs(freqs: &[u32; 256], prec: u32) -> Result<(), &'static str> {
    let sum: u64 = freqs.iter().map(|&f| u64::from(f)).sum();
    let present = freqs.iter().filter(|&&f| f > 0).count();
    if sum != 1u64 << prec || present < 2 {
        return Err("rANS frequencies do not sum to the precision");
    }
    Ok(())
}

/// Decodes a payload written by [`encode`] into `out` (whose length is the symbol count).
/// Returns a description of the defect on malformed input; never panics.
pub(super) fn decode(payload: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
    if payload.len() < 4 {
        return Err("truncated rANS header");
    }
    let (kind, prec) = (payload[0], u32::from(payload[1]));
    let (first, last) = (payload[2] as usize, payload[3] as usize);
    if !(8..=MAX_PREC).contains(&prec) {
        return Err("rANS precision out of range");
    }
    if last < first {
        return Err("rANS symbol range is reversed");
    }
    let mut at = 4;
    let mut stored = [0u32; 256];
    for f in &mut stored[first..=last] {
        *f = read_freq(payload, &mut at)?;
    }
    let (freqs, kind) = match kind {
        KIND_BYTES => {
            check_freqs(&stored, prec)?;
            (stored, Kind::Bytes)
        }
        KIND_PAIRS | KIND_PAIR_LANES => {
            if last >= 16 {
                return Err("rANS nibble out of range");
            }
            check_freqs(&stored, NIBBLE_PREC)?;
            let mut nib = [0u32; 16];
            nib.copy_from_slice(&stored[..16]);
            if kind == KIND_PAIRS {
                (pair_freqs(&nib, prec), Kind::Pairs)
            } else if prec == rans_lanes::PREC {
                (pair_freqs(&nib, prec), Kind::PairLanes)
            } else {
                return Err("rANS precision out of range");
            }
        }
        _ => return Err("unknown rANS kind"),
    };
    let unit = kind.unit();
    let coded = out.len() / unit * unit;
    let tail = payload
        .get(at..at + out.len() - coded)
        .ok_or("truncated rANS tail")?;
    out[coded..].copy_from_slice(tail);
    at += tail.len();
    let (payload, out) = (&payload[at..], &mut out[..coded]);
    // Monomorphized per precision: constant shifts and masks in the inner loop.
    macro_rules! dispatch {
        ($w:literal) => {
            match prec {
                8 => decode_streams::<8, $w>(payload, &freqs, out),
                9 => decode_streams::<9, $w>(payload, &freqs, out),
                10 => decode_streams::<10, $w>(payload, &freqs, out),
                11 => decode_streams::<11, $w>(payload, &freqs, out),
                _ => decode_streams::<12, $w>(payload, &freqs, out),
            }
        };
    }
    match kind {
        Kind::Bytes => dispatch!(1),
        Kind::Pairs => dispatch!(2),
        Kind::PairLanes => rans_lanes::decode(payload, &freqs, out),
    }
}

/// Decoder slot entry: `x = freq * (x >> P) + bias`, and the step's output bytes (`out`
/// little-endian: the symbol, or the low then the high nibble of a pair).
#[derive(Clone, Copy, Default)]
struct DecSym {
    freq: u32,
    bias: u16,
    out: u16,
}

/// The slot tables of frequencies `freqs` (validated: they sum to `2^PREC`).
#[inline(always)]
fn dec_table<const PREC: u32, const W: usize>(freqs: &[u32; 256]) -> [DecSym; 1 << MAX_PREC] {
    let mut table = [DecSym::default(); 1 << MAX_PREC];
    let mut cum = 0usize;
    for (s, &f) in freqs.iter().enumerate() {
        let out = if W == 1 {
            s as u16
        } else {
            (s & 0xf) as u16 | ((s >> 4) as u16) << 8
        };
        let f = f as usize;
        for (bias, t) in table[cum..cum + f].iter_mut().enumerate() {
            *t = DecSym {
                freq: f as u32,
                bias: bias as u16,
                out,
            };
        }
        cum += f;
    }
    table
}

/// Decodes one step of the state `x`, without renormalization; returns the output bytes.
#[inline(always)]
fn dec_get<const PREC: u32>(x: &mut u64, table: &[DecSym; 1 << MAX_PREC]) -> u16 {
    let e = table[(*x & ((1 << PREC) - 1)) as usize];
    *x = u64::from(e.freq) * (*x >> PREC) + u64::from(e.bias);
    e.out
}

/// Writes the two steps' output bytes of a unit to `o` (`2 * W` bytes).
#[inline(always)]
fn put_unit<const W: usize>(o: &mut [u8], a: u16, b: u16) {
    o[..W].copy_from_slice(&a.to_le_bytes()[..W]);
    o[W..2 * W].copy_from_slice(&b.to_le_bytes()[..W]);
}

/// Decodes one unit of the state `x`, reading the renormalization word at word
/// `*k & (CHUNK - 1)` of its window; branch-free.
#[inline(always)]
fn dec_unit<const PREC: u32, const W: usize>(
    x: &mut u64,
    table: &[DecSym; 1 << MAX_PREC],
    win: &[u8; WIN],
    k: &mut usize,
    o: &mut [u8],
) {
    let a = dec_get::<PREC>(x, table);
    let b = dec_get::<PREC>(x, table);
    let at = 4 * (*k & (CHUNK - 1));
    let w = u64::from(u32::from_le_bytes([
        win[at],
        win[at + 1],
        win[at + 2],
        win[at + 3],
    ]));
    // need = 1 iff x < L (x >> 31 == 0), in arithmetic the compiler keeps branch-free.
    let need = (*x >> 31).wrapping_sub(1) >> 63;
    *x = *x * (1 + need * 0xffff_ffff) + w * need;
    *k += need as usize;
    put_unit::<W>(o, a, b);
}

/// [`dec_unit`] with a bounds-checked read at `*pos` of the state's whole stream.
#[inline(always)]
fn dec_unit_checked<const PREC: u32, const W: usize>(
    x: &mut u64,
    table: &[DecSym; 1 << MAX_PREC],
    stream: &[u8],
    pos: &mut usize,
    o: &mut [u8],
) -> Result<(), &'static str> {
    let a = dec_get::<PREC>(x, table);
    let b = dec_get::<PREC>(x, table);
    if *x < L {
        let w = stream.get(*pos..*pos + 4).ok_or("rANS stream truncated")?;
        *x = *x << 32 | u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        *pos += 4;
    }
    put_unit::<W>(o, a, b);
    Ok(())
}

/// Decodes the units of `out` (`2 * W` bytes each) from `payload` (states, stream sizes,
/// streams) with validated `freqs` summing to `2^PREC`.
fn decode_streams<const PREC: u32, const W: usize>(
    payload: &[u8],
    freqs: &[u32; 256],
    out: &mut [u8],
) -> Result<(), &'static str> {
    let table = dec_table::<PREC, W>(freqs);
    if payload.len() < 8 * STATES {
        return Err("truncated rANS states");
    }
    let mut x = [0u64; STATES];
    for (x, b) in x.iter_mut().zip(payload.chunks_exact(8)) {
        *x = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        if !(L..L_END).contains(x) {
            return Err("rANS state out of range");
        }
    }
    let mut at = 8 * STATES;
    let mut words = [0u64; STATES];
    for w in &mut words[..STATES - 1] {
        *w = read_size(payload, &mut at)?;
    }
    let mut rest = &payload[at..];
    let mut streams: [&[u8]; STATES] = [&[]; STATES];
    for (s, &w) in streams[..STATES - 1].iter_mut().zip(&words) {
        if w > rest.len() as u64 / 4 {
            return Err("rANS stream size exceeds the payload");
        }
        (*s, rest) = rest.split_at(4 * w as usize);
    }
    streams[STATES - 1] = rest;
    let u = 2 * W;
    let mut pos = [0usize; STATES];
    let mut chunks = out.chunks_exact_mut(CHUNK * STATES * u);
    for chunk in &mut chunks {
        // Each state's next WIN bytes, copied to local windows (no pointer registers).
        let mut wins = [[0u8; WIN]; STATES];
        let mut whole = true;
        for ((win, s), &p) in wins.iter_mut().zip(&streams).zip(&pos) {
            match s.get(p..p + WIN) {
                Some(w) => win.copy_from_slice(w),
                None => whole = false,
            }
        }
        if !whole {
            // Near the end of a stream: unit by unit with checked reads.
            for (i, o) in chunk.chunks_exact_mut(u).enumerate() {
                let j = i % STATES;
                dec_unit_checked::<PREC, W>(&mut x[j], &table, streams[j], &mut pos[j], o)?;
            }
            continue;
        }
        let mut k = [0usize; STATES];
        for r in chunk.chunks_exact_mut(STATES * u) {
            for (j, o) in r.chunks_exact_mut(u).enumerate() {
                dec_unit::<PREC, W>(&mut x[j], &table, &wins[j], &mut k[j], o);
            }
        }
        for (p, k) in pos.iter_mut().zip(k) {
            *p += 4 * k;
        }
    }
    for (i, o) in chunks.into_remainder().chunks_exact_mut(u).enumerate() {
        let j = i % STATES;
        dec_unit_checked::<PREC, W>(&mut x[j], &table, streams[j], &mut pos[j], o)?;
    }
    if x.iter().any(|&x| x != L) || pos.iter().zip(&streams).any(|(&p, s)| p != s.len()) {
        return Err("rANS stream does not end in the initial state");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pair_freqs` as first written: every present pair sorted, then whole passes.
    fn pair_freqs_by_full_sort(g: &[u32; 16], prec: u32) -> [u32; 256] {
        let shift = 2 * NIBBLE_PREC - prec;
        let mut f = [0u32; 256];
        let mut sum = 0i64;
        for a in 0..16 {
            for b in 0..16 {
                if g[a] * g[b] > 0 {
                    f[a | b << 4] = ((g[a] * g[b] + (1 << (shift - 1))) >> shift).max(1);
                    sum += i64::from(f[a | b << 4]);
                }
            }
        }
        let mut diff = (1i64 << prec) - sum;
        let mut order: Vec<u32> = (0..256)
            .filter(|&i| f[i] > 0)
            .map(|i| ((1 << 13) - f[i]) << 8 | i as u32)
            .collect();
        order.sort_unstable();
        while diff != 0 {
            for &key in &order {
                let i = (key & 0xff) as usize;
                if diff > 0 {
                    f[i] += 1;
                    diff -= 1;
                } else if diff < 0 && f[i] > 1 {
                    f[i] -= 1;
                    diff += 1;
                }
                if diff == 0 {
                    break;
                }
            }
        }
        f
    }

    #[test]
    fn pair_frequencies_match_the_full_sort() {
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as u32
        };
        for case in 0..3000 {
            // Skewed, flat and sparse nibble histograms, 2 to 16 symbols present.
            let present = 2 + case % 15;
            let mut hist = [0u32; 256];
            for _ in 0..present {
                let scale = [1, 30, 1000, 100_000][next() as usize % 4];
                hist[next() as usize % 16] += 1 + next() % scale;
            }
            if hist.iter().filter(|&&c| c > 0).count() < 2 {
                continue;
            }
            let stored = normalize(&hist, NIBBLE_PREC);
            let mut g = [0u32; 16];
            g.copy_from_slice(&stored[..16]);
            for prec in 8..=12 {
                let fast = pair_freqs(&g, prec);
                assert_eq!(fast, pair_freqs_by_full_sort(&g, prec), "g {g:?}, P {prec}");
                assert_eq!(fast.iter().sum::<u32>(), 1 << prec);
            }
        }
    }
}
