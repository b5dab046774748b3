//! Writes a small GGUF file with one tensor per supported ggml type, for conformance tests
//! against other GGUF implementations (`tests/python/test_gguf_blocks.py` reads it with
//! gguf-py).
//!
//! ```text
//! gguf_fixture OUT_DIR
//! ```
//!
//! Writes `OUT_DIR/blocks.gguf` and, for every tensor `NAME`, `OUT_DIR/NAME.src.f32` (the
//! original values) and `OUT_DIR/NAME.f32` (shardpress's own dequantization of the stored
//! bytes), both raw little-endian f32 in row-major order. The values are deterministic
//! pseudo-random normals with a few special rows: all zeros, constant, strong outliers, all
//! positive, and tiny magnitudes. The file is assembled the way a distributed job would do
//! it: [`layout`] first, from names, shapes and types alone, then each tensor's bytes at its
//! planned offset.

use shardpress_core::gguf::{layout, GgmlType, MetaArray, MetaValue};
use std::path::PathBuf;
use std::process::ExitCode;

type Error = Box<dyn std::error::Error>;

/// splitmix64, so the fixture is identical on every platform.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// A standard normal (Box-Muller), rounded to f32.
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// Row-major values of a `rows x cols` tensor; row `r` gets a special pattern for `r % 8` in
/// 1..=5 (zeros, outliers, positive, tiny, constant).
fn values(seed: u64, rows: usize, cols: usize) -> Vec<f32> {
    let mut rng = Rng(seed);
    let mut x = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let g = rng.normal() * 0.02;
            x.push(match r % 8 {
                1 => 0.0,
                2 if c % 97 == 5 => g.signum() * (1.0 + (c % 7) as f32),
                3 => g.abs() + 0.01,
                4 => g * 1e-3,
                5 => 0.125,
                _ => g,
            });
        }
    }
    x
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn run(out_dir: PathBuf) -> Result<(), Error> {
    std::fs::create_dir_all(&out_dir)?;
    let mut tensors: Vec<(String, Vec<u64>, GgmlType)> = GgmlType::ALL
        .iter()
        .map(|&ty| {
            let name = format!("blk.0.{}.weight", ty.name().to_lowercase());
            (name, vec![8, 512], ty)
        })
        .collect();
    // A 3-D tensor (GGUF stores its dims reversed) and a K-quant one with rows of one block.
    tensors.push((
        "blk.1.q6_k_3d.weight".into(),
        vec![2, 3, 256],
        GgmlType::Q6_K,
    ));
    tensors.push((
        "blk.1.q4_k_rows.weight".into(),
        vec![16, 256],
        GgmlType::Q4_K,
    ));

    let metadata = vec![
        (
            "general.architecture".to_string(),
            MetaValue::String("llama".into()),
        ),
        (
            "general.name".to_string(),
            MetaValue::String("shardpress gguf fixture".into()),
        ),
        ("shardpress.fixture.u32".to_string(), MetaValue::U32(42)),
        ("shardpress.fixture.f32".to_string(), MetaValue::F32(0.25)),
        ("shardpress.fixture.bool".to_string(), MetaValue::Bool(true)),
        (
            "shardpress.fixture.strings".to_string(),
            MetaValue::Array(MetaArray::String(vec![
                "alpha".into(),
                "beta".into(),
                "γάμμα".into(),
            ])),
        ),
        (
            "shardpress.fixture.i32s".to_string(),
            MetaValue::Array(MetaArray::I32(vec![-1, 0, 7])),
        ),
    ];

    let plan = layout(&metadata, &tensors, 32)?;
    let mut file = plan.header.clone();
    for t in &plan.tensors {
        let rows = (t.shape[..t.shape.len() - 1]).iter().product::<u64>() as usize;
        let cols = t.shape[t.shape.len() - 1] as usize;
        let src = values(1000 + rows as u64, rows, cols);
        assert_eq!(
            file.len() as u64,
            t.start,
            "tensors are written at their planned offsets"
        );
        t.ggml_type.quantize(&src, &mut file)?;
        let mut deq = vec![0.0f32; src.len()];
        let range = t.range();
        t.ggml_type
            .dequantize(&file[range.start as usize..range.end as usize], &mut deq)?;
        file.resize((t.start + t.padded_len) as usize, 0);
        std::fs::write(out_dir.join(format!("{}.src.f32", t.name)), f32_bytes(&src))?;
        std::fs::write(out_dir.join(format!("{}.f32", t.name)), f32_bytes(&deq))?;
    }
    assert_eq!(file.len() as u64, plan.file_size);
    let path = out_dir.join("blocks.gguf");
    std::fs::write(&path, &file)?;
    println!(
        "wrote {} ({} bytes, {} tensors)",
        path.display(),
        file.len(),
        plan.tensors.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out_dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: gguf_fixture OUT_DIR");
        return ExitCode::from(2);
    };
    match run(PathBuf::from(out_dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gguf_fixture: {e}");
            ExitCode::FAILURE
        }
    }
}
