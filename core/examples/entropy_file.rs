//! Single-thread speed of shardpress's compute on real files, for `bench/peers.sh`.
//!
//! ```text
//! entropy_file entropy --layout bf16|f16|f32|bytes [--repeat N] FILE...
//! entropy_file passes --presets int8,int4-g128,hqq4,my-recipe.yaml [--repeat N] MODEL.safetensors
//! ```
//!
//! `entropy` reads each FILE as raw bytes (e.g. a safetensors data section extracted by
//! `bench/peers.py`), and times, on a one-thread rayon pool, [`entropy::compress_into`] with
//! the given layout and [`entropy::decompress_into`] (checking the round trip), plus a memcpy
//! of the same bytes, all three into an output buffer reused across repeats.
//!
//! `passes` times, per preset, [`encode_chunk`] (the whole pass with the reconstruction),
//! [`encode_chunk_measured`] (the same plus the error metrics, as a worker runs it) and
//! [`EncodedChunk::frame`] (entropy stage) on every tensor of the file that the preset
//! compresses, one tensor at a time on one thread, and reports the relative Frobenius error
//! over all of them (`sqrt(sum err^2 / sum w^2)`). An entry of
//! `--presets` ending in `.yaml` is read as a recipe file and reported under its `name`.
//!
//! Each timing is the best of `--repeat` runs (default 3). Output: one JSON object per line;
//! rates are in MB/s (10^6 bytes) of *input* bytes, `ratio` is compressed / original.

use shardpress_core::codec::{encode_chunk, encode_chunk_measured, TensorPlan};
use shardpress_core::entropy::{self, Layout};
use shardpress_core::header::{header_len_from_prefix, parse_header};
use shardpress_core::metrics::ErrorAccumulator;
use shardpress_core::quantize::row_len_of;
use shardpress_core::recipe::Recipe;
use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

type Error = Box<dyn std::error::Error>;

const USAGE: &str = "usage: entropy_file entropy --layout bf16|f16|f32|bytes [--repeat N] FILE...\n       entropy_file passes --presets P1,P2 [--repeat N] MODEL.safetensors";

/// Parsed command line.
struct Args {
    mode: String,
    layout: Layout,
    presets: Vec<String>,
    repeat: usize,
    files: Vec<String>,
}

fn parse_args() -> Result<Args, Error> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().ok_or(USAGE)?;
    let mut args = Args {
        mode,
        layout: Layout::Bytes,
        presets: Vec::new(),
        repeat: 3,
        files: Vec::new(),
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--layout" => {
                args.layout = match it.next().as_deref() {
                    Some("bf16") => Layout::Bf16,
                    Some("f16") => Layout::F16,
                    Some("f32") => Layout::F32,
                    Some("bytes") => Layout::Bytes,
                    other => return Err(format!("bad --layout {other:?}\n{USAGE}").into()),
                }
            }
            "--presets" => {
                let list = it.next().ok_or("--presets needs a value")?;
                args.presets = list.split(',').map(str::to_owned).collect();
            }
            "--repeat" => args.repeat = it.next().ok_or("--repeat needs a value")?.parse()?,
            _ if arg.starts_with("--") => return Err(format!("unknown flag {arg}\n{USAGE}").into()),
            _ => args.files.push(arg),
        }
    }
    if args.files.is_empty() || args.repeat == 0 {
        return Err(USAGE.into());
    }
    Ok(args)
}

/// Best wall time in seconds of `repeat` runs of `f`.
fn best_of<T>(repeat: usize, mut f: impl FnMut() -> T) -> f64 {
    (0..repeat)
        .map(|_| {
            let start = Instant::now();
            black_box(f());
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn mb_per_s(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 / 1e6 / seconds
}

fn entropy_mode(args: &Args, pool: &rayon::ThreadPool) -> Result<(), Error> {
    for file in &args.files {
        let data = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
        let mut copy = Vec::with_capacity(data.len());
        let memcpy_s = best_of(args.repeat, || {
            copy.clear();
            copy.extend_from_slice(&data);
            copy.len()
        });
        drop(copy);
        let encoded = pool.install(|| entropy::compress(args.layout, &data));
        // Into a reused buffer, like the memcpy and the decompression: fresh pages would
        // add the kernel's page faults to every repeat.
        let mut reused = Vec::with_capacity(encoded.len());
        let compress_s = best_of(args.repeat, || {
            reused.clear();
            pool.install(|| entropy::compress_into(args.layout, black_box(&data), &mut reused))
        });
        drop(reused);
        let mut out = Vec::with_capacity(data.len());
        pool.install(|| entropy::decompress_into(&encoded, &mut out))?;
        if out != data {
            return Err(format!("{file}: round trip differs").into());
        }
        let decompress_s = best_of(args.repeat, || {
            out.clear();
            pool.install(|| entropy::decompress_into(black_box(&encoded), &mut out))
        });
        println!(
            "{}",
            serde_json::json!({
                "file": file,
                "layout": format!("{:?}", args.layout),
                "bytes": data.len(),
                "compressed": encoded.len(),
                "ratio": encoded.len() as f64 / data.len() as f64,
                "compress_mbps": mb_per_s(data.len(), compress_s),
                "decompress_mbps": mb_per_s(data.len(), decompress_s),
                "memcpy_mbps": mb_per_s(data.len(), memcpy_s),
            })
        );
    }
    Ok(())
}

fn passes_mode(args: &Args, pool: &rayon::ThreadPool) -> Result<(), Error> {
    let [file] = args.files.as_slice() else {
        return Err(format!("passes takes one safetensors file\n{USAGE}").into());
    };
    let bytes = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
    let size = bytes.len() as u64;
    let header_len = header_len_from_prefix(&bytes, size)?;
    let header = parse_header(&bytes[8..8 + header_len as usize], size)?;
    let data = &bytes[header.data_start() as usize..];
    for preset in &args.presets {
        let recipe = if preset.ends_with(".yaml") {
            let yaml = std::fs::read_to_string(preset).map_err(|e| format!("{preset}: {e}"))?;
            Recipe::from_yaml(&yaml).map_err(|e| format!("{preset}: {e}"))?
        } else {
            Recipe::preset(preset).ok_or_else(|| format!("unknown preset {preset}"))?
        };
        let (mut input, mut stored) = (0usize, 0usize);
        let (mut encode_s, mut measured_s, mut frame_s) = (0.0, 0.0, 0.0);
        let mut error = ErrorAccumulator::new();
        for t in &header.tensors {
            let plan = TensorPlan::for_tensor(&recipe, &t.name, t.dtype, &t.shape)?;
            if plan.is_identity() {
                continue;
            }
            let tensor = &data[t.data_offsets.0 as usize..t.data_offsets.1 as usize];
            let row_len = row_len_of(&t.shape) as usize;
            let encode = || encode_chunk(&plan, t.dtype, row_len, black_box(tensor));
            let encoded = pool.install(encode)?;
            error.add_encoded(t.dtype, tensor, &encoded.reconstruction)?;
            encode_s += best_of(args.repeat, || pool.install(encode));
            measured_s += best_of(args.repeat, || {
                let mut acc = ErrorAccumulator::new();
                pool.install(|| encode_chunk_measured(&plan, t.dtype, row_len, tensor, &mut acc))
            });
            frame_s += best_of(args.repeat, || pool.install(|| encoded.frame()));
            stored += encoded.frame().len();
            input += tensor.len();
        }
        if input == 0 {
            return Err(format!("preset {preset} compresses no tensor of {file}").into());
        }
        println!(
            "{}",
            serde_json::json!({
                "file": file,
                "preset": recipe.name,
                "bytes": input,
                "ratio": stored as f64 / input as f64,
                "encode_mbps": mb_per_s(input, encode_s),
                "encode_metrics_mbps": mb_per_s(input, measured_s),
                "encode_frame_mbps": mb_per_s(input, encode_s + frame_s),
                "rel_fro_error": error.finish().rel_fro_error,
            })
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
        match args.mode.as_str() {
            "entropy" => entropy_mode(&args, &pool),
            "passes" => passes_mode(&args, &pool),
            other => Err(format!("unknown mode {other:?}\n{USAGE}").into()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("entropy_file: {e}");
            ExitCode::FAILURE
        }
    }
}
