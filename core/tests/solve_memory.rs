//! The heap peak of a calibrated SOLVE step, measured with a counting global allocator (only
//! in this test binary): every method on a 1024-wide Linear of 512 rows and a 2048-wide one
//! of 1024 rows must stay under [`solve_memory_bytes`] and under the packed Hessian triangle
//! plus 12 bytes per weight element plus `O(n)` scratch (no `n × n` matrix, no second
//! triangle). GPTQ and SparseGPT get the accumulator by value, as a SOLVE gives it: they
//! factor its triangle in place.
//!
//! The counter is process-wide, so the measuring tests take a lock and run one at a time.
//! `report_peaks` (ignored) prints the peaks of every method for `SOLVE_MEMORY_N` ×
//! `SOLVE_MEMORY_ROWS` (defaults 1024 × 512); BENCHMARKS.md quotes it:
//! `SOLVE_MEMORY_N=4096 SOLVE_MEMORY_ROWS=4096 cargo test --release -p shardpress-core --test
//! solve_memory -- --ignored --nocapture`.

use shardpress_core::calibrated::{
    awq_codes, gptq_codes, solve_memory_bytes, sparsegpt, wanda, GptqConfig, HessianAccumulator,
    SparsityTarget,
};
use shardpress_core::recipe::{Granularity, QuantizeConfig, ScaleDtype};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// [`System`], counting the bytes in use and their peak.
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn allocated(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Ordering::SeqCst) + bytes;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call forwards to `System` with the same arguments; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            allocated(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            allocated(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
            allocated(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One measurement at a time: the counters are process-wide.
static LOCK: Mutex<()> = Mutex::new(());

/// Runs `f` and returns its result and the heap peak it reached *above* the bytes in use
/// when it started (its own allocations, not the caller's inputs).
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst) - base)
}

/// xorshift64* uniforms in [-0.5, 0.5).
fn uniforms(seed: u64, count: usize) -> Vec<f32> {
    let mut s = seed | 1;
    (0..count)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u32 << 24) as f32) - 0.5
        })
        .collect()
}

/// A weight and a Hessian from correlated inputs (a shared component in every input, and
/// per-input scales), `n` wide, `rows` output rows.
fn problem(n: usize, rows: usize) -> (Vec<f32>, HessianAccumulator) {
    let weight: Vec<f32> = uniforms(1, rows * n).iter().map(|w| 0.05 * w).collect();
    let samples = 2 * n;
    let shared = uniforms(2, samples);
    let mut x = uniforms(3, samples * n);
    for (r, row) in x.chunks_mut(n).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (1.0 + (j % 7) as f32) * (*v + shared[r]);
        }
    }
    let mut h = HessianAccumulator::new(n);
    h.add_rows(&x, n).expect("whole rows");
    (weight, h)
}

fn int4_g128() -> QuantizeConfig {
    QuantizeConfig {
        bits: 4,
        symmetric: false,
        granularity: Granularity::Group(128),
        scale_dtype: ScaleDtype::F16,
    }
}

/// Bytes of the packed upper triangle the caller holds.
fn triangle_bytes(n: usize) -> usize {
    n * (n + 1) / 2 * 8
}

/// The peak of a SOLVE counted as the brief counts it: the method's own allocations plus
/// the inputs it works on (the packed triangle and the f32 weight). A method that takes
/// the accumulator by value gets a clone made before the measurement (so the clone is
/// counted once, as an input, and freed inside the measurement).
fn solve_peaks(n: usize, rows: usize) -> Vec<(&'static str, usize)> {
    let (weight, hessian) = problem(n, rows);
    let inputs = triangle_bytes(n) + weight.len() * 4;
    let mut act_order = GptqConfig::new(int4_g128());
    act_order.act_order = true;
    let plain = GptqConfig::new(int4_g128());
    let mut out = Vec::new();
    let owned = hessian.clone();
    let (r, p) = peak_of(|| gptq_codes(&act_order, &weight, n, owned));
    assert!(r.expect("valid").1.proxy_loss > 0.0);
    out.push(("gptq act_order", p + inputs));
    let owned = hessian.clone();
    let (r, p) = peak_of(|| gptq_codes(&plain, &weight, n, owned));
    assert!(r.expect("valid").1.proxy_loss > 0.0);
    out.push(("gptq", p + inputs));
    let owned = hessian.clone();
    let (r, p) = peak_of(|| {
        sparsegpt(
            SparsityTarget::Unstructured(0.5),
            0.01,
            128,
            &weight,
            n,
            owned,
        )
    });
    assert!(r.expect("valid").1.proxy_loss > 0.0);
    out.push(("sparsegpt 50%", p + inputs));
    let owned = hessian.clone();
    let (r, p) = peak_of(|| {
        sparsegpt(
            SparsityTarget::NOfM { n: 2, m: 4 },
            0.01,
            128,
            &weight,
            n,
            owned,
        )
    });
    assert!(r.expect("valid").1.proxy_loss > 0.0);
    out.push(("sparsegpt 2:4", p + inputs));
    let (r, p) = peak_of(|| awq_codes(&int4_g128(), &weight, n, &hessian));
    assert!(r.expect("valid").1.proxy_loss > 0.0);
    out.push(("awq", p + inputs));
    let (r, p) = peak_of(|| wanda(SparsityTarget::Unstructured(0.5), &weight, n, &hessian));
    assert!(r.expect("valid").1.proxy_loss > 0.0);
    out.push(("wanda 50%", p + inputs));
    out
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "a report for BENCHMARKS.md; run with --ignored --nocapture"]
fn report_peaks() {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (n, rows) = (
        env_or("SOLVE_MEMORY_N", 1024),
        env_or("SOLVE_MEMORY_ROWS", 512),
    );
    let square = n * n * 8;
    println!(
        "n = {n}, rows = {rows}: n² f64 {square} B, triangle {} B, f32 weight {} B, \
         solve_memory_bytes {} B",
        triangle_bytes(n),
        rows * n * 4,
        solve_memory_bytes(n, rows)
    );
    for (name, peak) in solve_peaks(n, rows) {
        println!(
            "{name}: peak {peak} B = {:.2} n² f64",
            peak as f64 / square as f64
        );
    }
}

/// The bound the brief sets: the triangle, 12 bytes per weight element, and `O(n)`
/// scratch counted as 2 KiB per column (three `n × 64` f64 panels and per-column vectors)
/// plus, per thread, 512 bytes per column (strip scratch) and 3 MiB (matrixmultiply's
/// packing buffers).
fn tight_bound(n: usize, rows: usize) -> usize {
    let threads = rayon::current_num_threads();
    triangle_bytes(n) + 12 * rows * n + 2048 * n + threads * (512 * n + (3 << 20))
}

fn check_peaks(n: usize, rows: usize) {
    let tight = tight_bound(n, rows);
    let bound = solve_memory_bytes(n, rows);
    let peaks = solve_peaks(n, rows);
    let inputs = triangle_bytes(n) + rows * n * 4;
    for (name, peak) in &peaks {
        println!(
            "{n} x {rows} {name}: peak {peak} B, tight bound {tight} B, solve_memory_bytes \
             {bound} B"
        );
        assert!(
            *peak as u64 <= bound,
            "{name}: peak {peak} B over solve_memory_bytes {bound} B"
        );
        assert!(
            *peak <= tight,
            "{name}: peak {peak} B over the triangle + 12 B per weight + O(n) = {tight} B"
        );
        // No second triangle (and certainly no n × n matrix): beyond the inputs, every
        // method holds at most 8 bytes per weight element plus scratch.
        assert!(
            peak.saturating_sub(inputs + 8 * rows * n) < triangle_bytes(n),
            "{name}: peak {peak} B holds a second triangle"
        );
    }
    assert!(peaks.iter().any(|(name, _)| *name == "gptq act_order"));
    assert!(peaks.iter().any(|(name, _)| name.starts_with("sparsegpt")));
}

#[test]
fn solve_peak_is_the_triangle_plus_twelve_bytes_per_weight() {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    check_peaks(1024, 512);
}

#[test]
fn solve_peak_is_the_triangle_plus_twelve_bytes_per_weight_at_2048() {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    check_peaks(2048, 1024);
}

#[test]
fn solve_memory_bytes_grows_with_both_dimensions_and_saturates() {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let triangle = |n: u64| 4 * n * (n + 1);
    for (n, rows) in [(1, 1), (1024, 512), (28672, 8192)] {
        let b = solve_memory_bytes(n, rows);
        assert!(b >= triangle(n as u64) + 12 * (n * rows) as u64);
        assert!(solve_memory_bytes(n + 1, rows) > b);
        assert!(solve_memory_bytes(n, rows + 1) > b);
    }
    // A 28672-wide down_proj: the triangle (3.3 GB) and 12 bytes per weight (2.8 GB), no
    // n × n matrix: under 7 GB (with the scratch of up to 16 threads).
    let b = solve_memory_bytes(28672, 8192);
    assert!(b < triangle(28672) + 12 * 28672 * 8192 + (1 << 30), "{b}");
    if rayon::current_num_threads() <= 16 {
        assert!(b < 7_000_000_000, "{b}");
    }
    assert_eq!(solve_memory_bytes(usize::MAX, usize::MAX), u64::MAX);
}
