//! `inspect`: a model's tensors, dtypes, sizes and layers, from the safetensors headers alone
//! (two range reads per file, so it works on huge models in object storage).

use std::collections::BTreeMap;

use clap::Args;
use shardpress_core::plan::layer_index;
use shardpress_store::{read_source_file, resolve_model};

#[derive(Args)]
pub struct InspectArgs {
    /// A .safetensors file or model directory (path, file://, s3://).
    pub model: String,
    /// Print every tensor, not only the per-layer summary.
    #[arg(long)]
    pub tensors: bool,
}

pub async fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let model = resolve_model(&args.model).await?;
    let mut layers: BTreeMap<(u64, String), (usize, u64)> = BTreeMap::new();
    let mut dtypes: BTreeMap<&'static str, (usize, u64)> = BTreeMap::new();
    let (mut count, mut bytes) = (0usize, 0u64);
    for name in &model.files {
        let file = read_source_file(&model.root, name).await?;
        say!(
            "{name}: {} tensors, {:.1} MB, header {} bytes",
            file.header.tensors.len(),
            file.size as f64 / 1e6,
            file.header.header_len
        );
        for t in &file.header.tensors {
            let size = t.byte_len();
            if args.tensors {
                say!(
                    "  {:<60} {:>8} {:>20} {:>10.2} MB",
                    t.name,
                    t.dtype.as_safetensors(),
                    format!("{:?}", t.shape),
                    size as f64 / 1e6
                );
            }
            let key = layer_index(&t.name).map_or((u64::MAX, "other".to_string()), |i| {
                (i, format!("layer {i}"))
            });
            let entry = layers.entry(key).or_default();
            entry.0 += 1;
            entry.1 += size;
            let entry = dtypes.entry(t.dtype.as_safetensors()).or_default();
            entry.0 += 1;
            entry.1 += size;
            count += 1;
            bytes += size;
        }
    }
    say!(
        "{} files, {count} tensors, {:.1} MB of tensor data",
        model.files.len(),
        bytes as f64 / 1e6
    );
    for (dtype, (n, b)) in &dtypes {
        say!("  {dtype:<8} {n:>6} tensors {:>10.1} MB", *b as f64 / 1e6);
    }
    say!("  {:<10} {:>7} {:>10}", "layer", "tensors", "MB");
    for ((_, layer), (n, b)) in &layers {
        say!("  {layer:<10} {n:>7} {:>10.2}", *b as f64 / 1e6);
    }
    Ok(())
}
