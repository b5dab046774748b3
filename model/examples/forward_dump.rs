//! forward_dump: runs the forward engine over a model directory and writes every hidden state,
//! so the Python tests can compare them with an independent numpy reference.
//!
//! ```text
//! forward_dump --model DIR --out FILE.safetensors [--max-len N] (--text "..." ... | --ids 1,2,3 ...)
//! ```
//! Reads DIR/config.json, DIR/model.safetensors (F32, BF16 or F16) and, for texts,
//! DIR/tokenizer.json. Writes `ids.{i}` (I32), `hidden.{layer}.{i}` (F32; layer 0 is the
//! embeddings' output, 1..=L the output of each layer) and `final.{i}` (the pooled embedding
//! of an encoder or the logits of a decoder).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use shardpress_core::dtype::{decode_to_f32, DType};
use shardpress_model::{Finished, Matrix, Model, Tokenizer, Weights};

struct Args {
    model: PathBuf,
    out: PathBuf,
    max_len: usize,
    texts: Vec<String>,
    ids: Vec<Vec<u32>>,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let (mut model, mut out, mut max_len) = (None, None, 128);
    let (mut texts, mut ids) = (Vec::new(), Vec::new());
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--max-len" => max_len = value()?.parse().context("--max-len")?,
            "--text" => texts.push(value()?),
            "--ids" => ids.push(
                value()?
                    .split(',')
                    .map(|id| {
                        id.trim()
                            .parse::<u32>()
                            .with_context(|| format!("bad token id `{id}`"))
                    })
                    .collect::<Result<Vec<u32>>>()?,
            ),
            other => bail!("unknown argument `{other}`"),
        }
    }
    if texts.is_empty() == ids.is_empty() {
        bail!("give either --text ... or --ids ... (not both, not neither)");
    }
    Ok(Args {
        model: model.context("--model DIR is required")?,
        out: out.context("--out FILE is required")?,
        max_len,
        texts,
        ids,
    })
}

/// Decodes the named tensors to f32 matrices (1-D → one row, N-D → first dim × the rest).
fn load_weights(file: &SafeTensors, names: &[String]) -> Result<Weights> {
    let mut weights = Weights::new();
    for name in names {
        let view = file
            .tensor(name)
            .with_context(|| format!("tensor {name}"))?;
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::BF16 => DType::BF16,
            Dtype::F16 => DType::F16,
            other => bail!("tensor {name} has dtype {other:?}; F32, BF16 or F16 expected"),
        };
        let shape = view.shape();
        let elements: usize = shape.iter().product();
        let (rows, cols) = match shape {
            [n] => (1, *n),
            [] => (1, 1),
            [first, ..] => (*first, elements / first.max(&1)),
        };
        let mut data = vec![0.0f32; elements];
        decode_to_f32(dtype, view.data(), &mut data).with_context(|| format!("decoding {name}"))?;
        weights.insert(name.clone(), Matrix { rows, cols, data });
    }
    Ok(weights)
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let config =
        std::fs::read_to_string(args.model.join("config.json")).context("reading config.json")?;
    let bytes =
        std::fs::read(args.model.join("model.safetensors")).context("reading model.safetensors")?;
    let file = SafeTensors::deserialize(&bytes).context("parsing model.safetensors")?;
    let names = file.names();
    let model = Model::from_config(&config, &names)?;
    let sequences = if args.texts.is_empty() {
        args.ids.clone()
    } else {
        let json =
            std::fs::read(args.model.join("tokenizer.json")).context("reading tokenizer.json")?;
        let tokenizer = Tokenizer::from_bytes(&json)?;
        args.texts
            .iter()
            .map(|text| tokenizer.encode(text, args.max_len))
            .collect::<Result<Vec<_>, _>>()?
    };
    // (name, dtype, shape, bytes) of everything written.
    let mut outputs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, ids) in sequences.iter().enumerate() {
        let bytes = ids
            .iter()
            .flat_map(|&id| (id as i32).to_le_bytes())
            .collect();
        outputs.push((format!("ids.{i}"), Dtype::I32, vec![ids.len()], bytes));
    }
    let mut dump_hidden = |layer: usize, hidden: &shardpress_model::Hidden| {
        for (i, sequence) in hidden.sequences.iter().enumerate() {
            let shape = vec![sequence.rows, sequence.cols];
            outputs.push((
                format!("hidden.{layer}.{i}"),
                Dtype::F32,
                shape,
                f32_bytes(&sequence.data),
            ));
        }
    };
    let started = std::time::Instant::now();
    let mut hidden = model.embed(
        &load_weights(&file, &model.embedding_tensors())?,
        &sequences,
    )?;
    dump_hidden(0, &hidden);
    for layer in 0..model.layers() {
        let weights = load_weights(&file, &model.layer_tensors(layer))?;
        model.forward_layer(layer, &weights, &mut hidden, &mut |_, _| {})?;
        dump_hidden(layer + 1, &hidden);
    }
    match model.finish(&load_weights(&file, &model.head_tensors())?, &hidden)? {
        Finished::Embeddings(embeddings) => {
            for (i, embedding) in embeddings.iter().enumerate() {
                outputs.push((
                    format!("final.{i}"),
                    Dtype::F32,
                    vec![embedding.len()],
                    f32_bytes(embedding),
                ));
            }
        }
        Finished::Logits(logits) => {
            for (i, matrix) in logits.iter().enumerate() {
                let shape = vec![matrix.rows, matrix.cols];
                outputs.push((
                    format!("final.{i}"),
                    Dtype::F32,
                    shape,
                    f32_bytes(&matrix.data),
                ));
            }
        }
    }
    eprintln!(
        "forward_dump: {} {} sequences through {} layers in {:.3} s (weights decoding included)",
        model.architecture(),
        sequences.len(),
        model.layers(),
        started.elapsed().as_secs_f64()
    );
    let views = outputs
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, &args.out).context("writing the output")?;
    Ok(())
}
