//! Canonical, length-limited Huffman coding of one block of byte symbols in four streams.
//!
//! **Code lengths.** For the `k >= 2` symbols present with counts `c_i`, lengths `l_i <= L`
//! (`L =` [`MAX_CODE_LEN`] `= 11`) minimizing `sum c_i l_i` subject to the Kraft equality
//! `sum 2^-l_i = 1` are found by package-merge (Larmore & Hirschberg): with the leaves
//! sorted by `(count, symbol)`, level lists are built bottom-up, each one the sorted merge of
//! the leaves with the pairwise "packages" of the previous list; the first `2k - 2` items of
//! the top list are selected and, walking down, the selected items of a list are a prefix
//! whose packages select twice as many items of the list below. A leaf's length is the
//! number of lists in which it is selected. `L = 11` keeps the decode table at 2^11 `u16`
//! entries (4 KiB, L1-resident); since `k <= 256 <= 2^L` a length-limited code always exists.
//!
//! **Canonical codes.** Codes are assigned in `(length, symbol)` order as in DEFLATE, so only
//! the lengths are stored: the smallest and largest present symbol, then one 4-bit length per
//! symbol in that range (0 = absent). The decoder rejects lengths above `L`, fewer than two
//! symbols, and any table whose Kraft sum is not exactly 1, so every 11-bit window decodes
//! to exactly one symbol and the decode table is fully and uniquely populated.
//!
//! **Streams.** The block of `n` symbols is cut into four segments of `ceil(n/4)` symbols (the
//! last ones possibly shorter or empty), each written as its own MSB-first bit stream padded
//! to a byte. The encoder knows each stream's exact size from per-segment histograms, so it
//! writes the four streams interleaved (four independent shift/or chains) straight into the
//! output with 8-byte stores. The decoder also interleaves the four streams. Its table has
//! 2^11 `u64` entries (16 KiB), each giving the run of up to four codes that fit entirely in
//! the 11-bit window, so one lookup yields up to four symbols (exponent planes average ~2.6
//! bits per symbol), stored with one 4-byte write. A window is refilled with one unaligned
//! big-endian 8-byte load giving at least 57 valid bits, enough for 5 lookups of at most
//! 11 bits. Reads past the payload see zero bits (never out of bounds); every lookup emits
//! at least one symbol, so decoding always ends; and afterwards each stream must have
//! consumed exactly its stored byte length, which catches most truncation and corruption.
//!
//! Payload layout: `first: u8, last: u8, lengths: ceil((last-first+1)/2) bytes (low nibble
//! first), size0..size2: u32 LE (bytes of streams 0..2; stream 3 takes the rest), streams`.

/// Longest allowed code, in bits.
pub(super) const MAX_CODE_LEN: u32 = 11;
/// Entries of the single-level decode table.
const TABLE_SIZE: usize = 1 << MAX_CODE_LEN;
/// Independent bit streams per block.
pub(super) const STREAMS: usize = 4;
/// Symbols decoded per window refill (`5 * 11 <= 57`).
const SYMS_PER_REFILL: usize = 5;

/// Counts of each byte value.
pub(super) fn histogram(data: &[u8]) -> [u32; 256] {
    sum_histograms(&segment_histograms(data))
}

/// Counts of each byte value in each of the four stream segments (see [`segment`]). The four
/// independent tables also avoid store-to-load stalls when a symbol repeats.
pub(super) fn segment_histograms(data: &[u8]) -> [[u32; 256]; STREAMS] {
    let n = data.len();
    let seg = n.div_ceil(STREAMS);
    let full = n / seg.max(1);
    if full == STREAMS {
        // Two tables per segment (even and odd positions): eight independent counters per
        // step, so runs of one symbol do not serialize on a single counter.
        let mut h = [[[0u32; 256]; 2]; STREAMS];
        let (s0, rest) = data.split_at(seg);
        let (s1, rest) = rest.split_at(seg);
        let (s2, s3) = rest.split_at(seg);
        // s3 may be shorter: count the common even-length prefix interleaved, then the rest.
        let common = s3.len() & !1;
        for (((a, b), c), d) in s0[..common]
            .chunks_exact(2)
            .zip(s1[..common].chunks_exact(2))
            .zip(s2[..common].chunks_exact(2))
            .zip(s3[..common].chunks_exact(2))
        {
            h[0][0][a[0] as usize] += 1;
            h[1][0][b[0] as usize] += 1;
            h[2][0][c[0] as usize] += 1;
            h[3][0][d[0] as usize] += 1;
            h[0][1][a[1] as usize] += 1;
            h[1][1][b[1] as usize] += 1;
            h[2][1][c[1] as usize] += 1;
            h[3][1][d[1] as usize] += 1;
        }
        for (h, s) in h.iter_mut().zip([s0, s1, s2, s3]) {
            for &x in &s[common..] {
                h[0][x as usize] += 1;
            }
        }
        h.map(|[even, odd]| {
            let mut t = even;
            for (t, &c) in t.iter_mut().zip(&odd) {
                *t += c;
            }
            t
        })
    } else {
        let mut hists = [[0u32; 256]; STREAMS];
        for (s, h) in hists.iter_mut().enumerate() {
            for &x in &data[segment(n, s)] {
                h[x as usize] += 1;
            }
        }
        hists
    }
}

/// Element-wise sum of the segment histograms.
pub(super) fn sum_histograms(hists: &[[u32; 256]; STREAMS]) -> [u32; 256] {
    let mut total = [0u32; 256];
    for (i, t) in total.iter_mut().enumerate() {
        *t = hists.iter().map(|h| h[i]).sum();
    }
    total
}

/// Order-0 entropy in bits per symbol of a histogram (0 for an empty one).
pub(super) fn entropy_bits_per_symbol(hist: &[u32; 256]) -> f64 {
    let n: f64 = hist.iter().map(|&c| f64::from(c)).sum();
    if n == 0.0 {
        return 0.0;
    }
    hist.iter()
        .filter(|&&c| c > 0)
        .map(|&c| f64::from(c) / n * (n / f64::from(c)).log2())
        .sum()
}

/// Optimal code lengths limited to [`MAX_CODE_LEN`] (package-merge); 0 for absent symbols.
/// Needs at least two symbols with a non-zero count. Works in fixed arrays (no allocation):
/// a level list holds at most `k + (2k - 1) / 2 < 2 * 256` items, and only the previous
/// level's weights and every level's leaf flags are kept.
pub(super) fn code_lengths(hist: &[u32; 256]) -> [u8; 256] {
    const MAX_ITEMS: usize = 512;
    const LEVELS: usize = MAX_CODE_LEN as usize;
    let mut leaves = [(0u64, 0u8); 256];
    let mut k = 0;
    for (s, &c) in hist.iter().enumerate().filter(|(_, &c)| c > 0) {
        leaves[k] = (u64::from(c), s as u8);
        k += 1;
    }
    let leaves = &mut leaves[..k];
    leaves.sort_unstable();
    debug_assert!(k >= 2);
    // Per level: item count and whether each item is a leaf; `weights` holds the previous
    // level's weights (ascending), `next` the level being built.
    let mut len = [0usize; LEVELS];
    let mut is_leaf = [[false; MAX_ITEMS]; LEVELS];
    let mut weights = [0u64; MAX_ITEMS];
    let mut next = [0u64; MAX_ITEMS];
    for (i, &(w, _)) in leaves.iter().enumerate() {
        weights[i] = w;
        is_leaf[0][i] = true;
    }
    len[0] = k;
    for level in 1..LEVELS {
        let packages = len[level - 1] / 2;
        let (mut li, mut pi, mut n) = (0, 0, 0);
        while li < k || pi < packages {
            let package = (pi < packages).then(|| weights[2 * pi] + weights[2 * pi + 1]);
            match package {
                Some(pw) if li >= k || pw < leaves[li].0 => {
                    next[n] = pw;
                    pi += 1;
                }
                _ => {
                    next[n] = leaves[li].0;
                    is_leaf[level][n] = true;
                    li += 1;
                }
            }
            n += 1;
        }
        len[level] = n;
        weights[..n].copy_from_slice(&next[..n]);
    }
    let mut lengths = [0u8; 256];
    let mut selected = 2 * k - 2;
    for level in (0..LEVELS).rev() {
        let n_leaves = is_leaf[level][..selected].iter().filter(|&&l| l).count();
        for &(_, sym) in &leaves[..n_leaves] {
            lengths[sym as usize] += 1;
        }
        selected = 2 * (selected - n_leaves);
    }
    lengths
}

/// Canonical (DEFLATE-order) codes for the given lengths, MSB-first, indexed by symbol.
fn canonical_codes(lengths: &[u8; 256]) -> [u32; 256] {
    let mut count_per_len = [0u32; MAX_CODE_LEN as usize + 1];
    for &l in lengths.iter().filter(|&&l| l > 0) {
        count_per_len[l as usize] += 1;
    }
    let mut next_code = [0u32; MAX_CODE_LEN as usize + 1];
    let mut code = 0u32;
    for len in 1..=MAX_CODE_LEN as usize {
        code = (code + count_per_len[len - 1]) << 1;
        next_code[len] = code;
    }
    let mut codes = [0u32; 256];
    for (sym, &l) in lengths.iter().enumerate() {
        if l > 0 {
            codes[sym] = next_code[l as usize];
            next_code[l as usize] += 1;
        }
    }
    codes
}

/// Exact size in bits of each stream when the segments are coded with `lengths`.
fn stream_bits(seg_hists: &[[u32; 256]; STREAMS], lengths: &[u8; 256]) -> [u64; STREAMS] {
    seg_hists.map(|h| {
        h.iter()
            .zip(lengths)
            .map(|(&c, &l)| u64::from(c) * u64::from(l))
            .sum()
    })
}

/// Exact payload size in bytes of [`encode`] for these segment histograms and lengths.
pub(super) fn encoded_size(seg_hists: &[[u32; 256]; STREAMS], lengths: &[u8; 256]) -> usize {
    let (first, last) = symbol_range(lengths);
    let streams: u64 = stream_bits(seg_hists, lengths)
        .iter()
        .map(|b| b.div_ceil(8))
        .sum();
    table_size(first, last) + streams as usize
}

/// Bytes of the table and stream-size fields.
fn table_size(first: usize, last: usize) -> usize {
    2 + (last - first + 1).div_ceil(2) + 4 * (STREAMS - 1)
}

/// First and last symbol with a non-zero length (`(0, 0)` if none).
fn symbol_range(lengths: &[u8; 256]) -> (usize, usize) {
    let first = lengths.iter().position(|&l| l > 0).unwrap_or(0);
    let last = lengths.iter().rposition(|&l| l > 0).unwrap_or(0);
    (first, last)
}

/// Bounds of segment `s` of a block of `n` symbols.
pub(super) fn segment(n: usize, s: usize) -> std::ops::Range<usize> {
    let seg = n.div_ceil(STREAMS);
    (s * seg).min(n)..((s + 1) * seg).min(n)
}

/// MSB-first bit writer into a fixed region `[pos, end)` of a shared buffer. Between
/// flushes `acc` holds `nbits <= 7` pending bits, so five codes (<= 55 bits) always fit.
struct BitWriter {
    pos: usize,
    end: usize,
    acc: u64,
    nbits: u32,
}

impl BitWriter {
    #[inline(always)]
    fn put(&mut self, packed: u32) {
        let len = packed & 0xff;
        self.acc = (self.acc << len) | u64::from(packed >> 8);
        self.nbits += len;
    }

    /// Appends `(code, len)` (at most 56 bits; see [`join5`]).
    #[inline(always)]
    fn put_joined(&mut self, (code, len): (u64, u32)) {
        self.acc = (self.acc << len) | code;
        self.nbits += len;
    }

    /// Writes the whole pending bytes. The 8-byte store may write zeros past them, which is
    /// harmless while `pos + 8 <= end` (this stream rewrites them later); near the end only
    /// the bytes inside the region are stored.
    #[inline(always)]
    fn flush(&mut self, buf: &mut [u8]) {
        // Left-align the pending bits (`<< 1` after `<< (63 - n)` avoids a shift by 64).
        let word = (self.acc << (63 - self.nbits) << 1).to_be_bytes();
        if self.pos + 8 <= self.end {
            buf[self.pos..self.pos + 8].copy_from_slice(&word);
        } else {
            let room = self.end - self.pos;
            buf[self.pos..self.end].copy_from_slice(&word[..room]);
        }
        let whole = self.nbits / 8;
        self.pos += whole as usize;
        self.nbits -= whole * 8;
        self.acc &= (1u64 << self.nbits) - 1;
    }

    /// [`Self::flush`] when the caller knows that `pos + 8 <= end`.
    #[inline(always)]
    fn flush_unchecked_end(&mut self, buf: &mut [u8]) {
        debug_assert!(self.pos + 8 <= self.end);
        let word = (self.acc << (63 - self.nbits) << 1).to_be_bytes();
        buf[self.pos..self.pos + 8].copy_from_slice(&word);
        let whole = self.nbits / 8;
        self.pos += whole as usize;
        self.nbits -= whole * 8;
        self.acc &= (1u64 << self.nbits) - 1;
    }

    /// Flushes the final partial byte (zero-padded).
    fn finish(&mut self, buf: &mut [u8]) {
        self.flush(buf);
        if self.nbits > 0 {
            self.pos += 1;
            self.nbits = 0;
        }
        debug_assert_eq!(self.pos, self.end);
    }
}

/// Appends the payload (table, stream sizes, four streams) coding `data` with `lengths`,
/// which must give every symbol of `data` a non-zero length; `seg_hists` are the segment
/// histograms of `data` (they give each stream's exact size, so all four streams are written
/// interleaved straight into `out`).
pub(super) fn encode(
    data: &[u8],
    seg_hists: &[[u32; 256]; STREAMS],
    lengths: &[u8; 256],
    out: &mut Vec<u8>,
) {
    let (first, last) = symbol_range(lengths);
    out.push(first as u8);
    out.push(last as u8);
    for pair in lengths[first..=last].chunks(2) {
        out.push(pair[0] | (pair.get(1).copied().unwrap_or(0) << 4));
    }
    let bytes = stream_bits(seg_hists, lengths).map(|b| b.div_ceil(8) as usize);
    for &b in &bytes[..STREAMS - 1] {
        out.extend_from_slice(&(b as u32).to_le_bytes());
    }
    let codes = canonical_codes(lengths);
    // Packed as code << 8 | length for one lookup per symbol.
    let mut packed = [0u32; 256];
    for ((p, &c), &l) in packed.iter_mut().zip(&codes).zip(lengths) {
        *p = (c << 8) | u32::from(l);
    }
    let base = out.len();
    out.resize(base + bytes.iter().sum::<usize>(), 0);
    let buf = &mut out[..];
    let mut start = base;
    let mut writers: [BitWriter; STREAMS] = std::array::from_fn(|s| {
        let w = BitWriter {
            pos: start,
            end: start + bytes[s],
            acc: 0,
            nbits: 0,
        };
        start += bytes[s];
        w
    });
    let n = data.len();
    let segs: [&[u8]; STREAMS] = std::array::from_fn(|s| &data[segment(n, s)]);
    // Interleaved part, two streams at a time (few enough live values to stay in
    // registers): five symbols per stream per step, then tails one stream at a time.
    let [w0, w1, w2, w3] = &mut writers;
    let [s0, s1, s2, s3] = segs;
    let done01 = encode_interleaved([w0, w1], [s0, s1], &packed, buf);
    let done23 = encode_interleaved([w2, w3], [s2, s3], &packed, buf);
    let done = [done01, done01, done23, done23];
    for ((w, s), done) in writers.iter_mut().zip(&segs).zip(done) {
        for group in s[done..].chunks(SYMS_PER_REFILL) {
            for &x in group {
                w.put(packed[x as usize]);
            }
            w.flush(buf);
        }
        w.finish(buf);
    }
}

/// The codes of five symbols (packed as `code << 8 | length`) joined into one
/// `(code, length)`, the first symbol's code in the highest bits (at most 55 bits).
#[inline(always)]
fn join5(packed: &[u32; 256], s: &[u8]) -> (u64, u32) {
    let p: [u32; 5] = std::array::from_fn(|i| packed[s[i] as usize]);
    let join = |(c0, l0): (u64, u32), (c1, l1): (u64, u32)| ((c0 << l1) | c1, l0 + l1);
    let unpack = |p: u32| (u64::from(p >> 8), p & 0xff);
    let c01 = join(unpack(p[0]), unpack(p[1]));
    let c23 = join(unpack(p[2]), unpack(p[3]));
    join(join(c01, c23), unpack(p[4]))
}

/// Codes the common prefix of `segs` in steps of [`SYMS_PER_REFILL`] symbols per stream,
/// stopping before a stream could come within 8 bytes of its end; returns the symbols coded
/// per stream. A step advances a writer by at most 7 bytes (`7 + 5 * 11 <= 63` pending
/// bits), so the number of steps that stay clear of every end is computed up front and
/// the inner loop runs without end checks.
#[inline(always)]
fn encode_interleaved(
    [w0, w1]: [&mut BitWriter; 2],
    [s0, s1]: [&[u8]; 2],
    packed: &[u32; 256],
    buf: &mut [u8],
) -> usize {
    let total = s0.len().min(s1.len()) / SYMS_PER_REFILL;
    let safe_steps = |w: &BitWriter| match w.end.checked_sub(w.pos + 8) {
        Some(room) => room / 7 + 1,
        None => 0,
    };
    let mut step = 0;
    loop {
        let safe = safe_steps(w0).min(safe_steps(w1)).min(total - step);
        if safe == 0 {
            return step * SYMS_PER_REFILL;
        }
        let range = step * SYMS_PER_REFILL..(step + safe) * SYMS_PER_REFILL;
        for (a, b) in s0[range.clone()]
            .chunks_exact(SYMS_PER_REFILL)
            .zip(s1[range].chunks_exact(SYMS_PER_REFILL))
        {
            // The five codes are joined off the accumulator's dependency chain.
            w0.put_joined(join5(packed, a));
            w1.put_joined(join5(packed, b));
            w0.flush_unchecked_end(buf);
            w1.flush_unchecked_end(buf);
        }
        step += safe;
    }
}

/// Reads a big-endian u64 at byte `at`, with zeros past the end of `data`.
#[inline(always)]
fn load_be(data: &[u8], at: usize) -> u64 {
    match data.get(at..at + 8) {
        Some(b) => u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        None => {
            let mut tmp = [0u8; 8];
            if at < data.len() {
                let rest = &data[at..];
                tmp[..rest.len()].copy_from_slice(rest);
            }
            u64::from_be_bytes(tmp)
        }
    }
}

/// Reads a little-endian u32 at `at` (caller checked bounds).
fn read_u32(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
}

/// Decodes a payload written by [`encode`] into `out` (whose length is the symbol count).
/// Returns a description of the defect on malformed input; never panics.
pub(super) fn decode(payload: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
    if payload.len() < 2 {
        return Err("truncated Huffman table");
    }
    let (first, last) = (payload[0] as usize, payload[1] as usize);
    if last < first {
        return Err("Huffman symbol range is reversed");
    }
    let table_end = 2 + (last - first + 1).div_ceil(2);
    let sizes_end = table_size(first, last);
    if payload.len() < sizes_end {
        return Err("truncated Huffman table");
    }
    let mut lengths = [0u8; 256];
    for (i, l) in lengths[first..=last].iter_mut().enumerate() {
        let byte = payload[2 + i / 2];
        *l = if i % 2 == 0 { byte & 0xf } else { byte >> 4 };
    }
    let mut kraft = 0u32;
    let mut present = 0u32;
    for &l in lengths.iter().filter(|&&l| l > 0) {
        if u32::from(l) > MAX_CODE_LEN {
            return Err("Huffman code length exceeds the limit");
        }
        kraft += 1 << (MAX_CODE_LEN - u32::from(l));
        present += 1;
    }
    if present < 2 || kraft != TABLE_SIZE as u32 {
        return Err("Huffman code lengths do not form a complete prefix code");
    }
    let table = decode_table(&lengths);

    let mut bounds = [0usize; STREAMS + 1];
    bounds[0] = sizes_end;
    for s in 0..STREAMS - 1 {
        let size = read_u32(payload, table_end + 4 * s) as usize;
        bounds[s + 1] = bounds[s]
            .checked_add(size)
            .filter(|&end| end <= payload.len())
            .ok_or("Huffman stream sizes exceed the block")?;
    }
    bounds[STREAMS] = payload.len();

    let n = out.len();
    // Per stream: bit position in `payload`, left-aligned window, output cursor and end.
    let mut pos: [usize; STREAMS] = std::array::from_fn(|s| bounds[s] * 8);
    let mut cur: [usize; STREAMS] = std::array::from_fn(|s| segment(n, s).start);
    let end: [usize; STREAMS] = std::array::from_fn(|s| segment(n, s).end);
    // Interleaved fast part: each step refills every window and does five lookups of up to
    // four symbols each (each lookup stores four bytes), so it needs room for twenty
    // symbols in every segment.
    let room = MAX_SYMS_PER_LOOKUP * SYMS_PER_REFILL;
    while (0..STREAMS).all(|s| cur[s] + room <= end[s]) {
        let mut window: [u64; STREAMS] =
            std::array::from_fn(|s| load_be(payload, pos[s] >> 3) << (pos[s] & 7));
        // Lookup-by-lookup across the streams: four independent dependency chains.
        for _ in 0..SYMS_PER_REFILL {
            for s in 0..STREAMS {
                let e = table.multi[(window[s] >> (64 - MAX_CODE_LEN)) as usize];
                out[cur[s]..cur[s] + 4].copy_from_slice(&(e as u32).to_le_bytes());
                let used = (e >> 32) & 0xf;
                window[s] <<= used;
                pos[s] += used as usize;
                cur[s] += (e >> 36) as usize;
            }
        }
    }
    // Tails: one symbol per lookup.
    for s in 0..STREAMS {
        while cur[s] < end[s] {
            let window = load_be(payload, pos[s] >> 3) << (pos[s] & 7);
            let e = table.single[(window >> (64 - MAX_CODE_LEN)) as usize];
            out[cur[s]] = e as u8;
            pos[s] += usize::from(e >> 8);
            cur[s] += 1;
        }
        if pos[s].div_ceil(8) != bounds[s + 1] {
            return Err("Huffman stream length does not match its symbol count");
        }
    }
    Ok(())
}

/// Most symbols one lookup of [`DecodeTable::multi`] yields.
const MAX_SYMS_PER_LOOKUP: usize = 4;

/// Decode tables indexed by the next 11 bits `w` of a stream.
struct DecodeTable {
    /// `sym | len << 8`: the code that prefixes `w`.
    single: [u16; TABLE_SIZE],
    /// `syms | bits << 32 | count << 36`: the `count` (1 to 4) codes that follow one another
    /// at the start of `w` and fit entirely in its 11 bits, their symbols packed into the low
    /// bytes of `syms` (first symbol lowest; the unused high bytes are zero), `bits` their
    /// total length.
    multi: [u64; TABLE_SIZE],
}

/// The decode tables of `lengths`. Requires a complete code (Kraft sum exactly 1), so every
/// 11-bit window starts with exactly one code.
fn decode_table(lengths: &[u8; 256]) -> DecodeTable {
    let codes = canonical_codes(lengths);
    let mut single = [0u16; TABLE_SIZE];
    for (sym, (&l, &code)) in lengths.iter().zip(&codes).enumerate() {
        if l == 0 {
            continue;
        }
        let shift = MAX_CODE_LEN - u32::from(l);
        let start = (code << shift) as usize;
        let entry = (u16::from(l) << 8) | sym as u16;
        single[start..start + (1 << shift)].fill(entry);
    }
    let mask = TABLE_SIZE - 1;
    let mut multi = [0u64; TABLE_SIZE];
    for (w, t) in multi.iter_mut().enumerate() {
        // Codes are read from `w` shifted left, so bits past the window read as zeros; a
        // code is taken only if it ends inside the 11 bits.
        let (mut syms, mut bits, mut count) = (0u64, 0u32, 0u64);
        while count < MAX_SYMS_PER_LOOKUP as u64 {
            let e = single[(w << bits) & mask];
            let len = u32::from(e >> 8);
            if bits + len > MAX_CODE_LEN {
                break;
            }
            syms |= u64::from(e & 0xff) << (8 * count);
            bits += len;
            count += 1;
        }
        *t = syms | u64::from(bits) << 32 | count << 36;
    }
    DecodeTable { single, multi }
}
