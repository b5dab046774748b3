//! The whole MiniLM-shaped forward (embed, 6 layers, mean pooling) over 64 sentences of 12
//! tokens, with random weights of all-MiniLM-L6-v2's shapes (speed does not depend on the
//! values), on all threads and on one thread: the ratio is the parallel speed-up.
//!
//! `cargo bench -p shardpress-model --bench forward`

use criterion::{criterion_group, criterion_main, Criterion};
use shardpress_model::{Matrix, Model, Weights};

const CONFIG: &str = include_str!("../tests/data/minilm_config.json");

fn shape_of(name: &str) -> (usize, usize) {
    let (hidden, intermediate) = (384, 1536);
    match name {
        n if n.ends_with("word_embeddings.weight") => (30522, hidden),
        n if n.ends_with("position_embeddings.weight") => (512, hidden),
        n if n.ends_with("token_type_embeddings.weight") => (2, hidden),
        n if n.ends_with("intermediate.dense.weight") => (intermediate, hidden),
        n if n.ends_with("intermediate.dense.bias") => (1, intermediate),
        n if n.ends_with("output.dense.weight") && !n.contains("attention") => {
            (hidden, intermediate)
        }
        n if n.ends_with(".weight") && !n.contains("LayerNorm") => (hidden, hidden),
        _ => (1, hidden),
    }
}

fn minilm_shaped() -> (Model, Weights) {
    let embeddings = [
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
    ]
    .map(|part| format!("embeddings.{part}.weight"));
    let mut names: Vec<String> = embeddings.to_vec();
    names.extend([
        "embeddings.LayerNorm.weight".into(),
        "embeddings.LayerNorm.bias".into(),
    ]);
    for layer in 0..6 {
        for part in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
            "attention.output.LayerNorm",
            "output.LayerNorm",
        ] {
            for kind in ["weight", "bias"] {
                names.push(format!("encoder.layer.{layer}.{part}.{kind}"));
            }
        }
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let model = Model::from_config(CONFIG, &refs).expect("MiniLM config");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let weights = names
        .iter()
        .map(|name| {
            let (rows, cols) = shape_of(name);
            let data = (0..rows * cols)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state % 2001) as f32 / 1000.0 - 1.0) * 0.05
                })
                .collect();
            (name.clone(), Matrix { rows, cols, data })
        })
        .collect();
    (model, weights)
}

fn run(model: &Model, weights: &Weights, sequences: &[Vec<u32>]) -> usize {
    let mut hidden = model.embed(weights, sequences).unwrap();
    for layer in 0..model.layers() {
        model
            .forward_layer(layer, weights, &mut hidden, &mut |_, _| {})
            .unwrap();
    }
    match model.finish(weights, &hidden).unwrap() {
        shardpress_model::Finished::Embeddings(e) => e.len(),
        shardpress_model::Finished::Logits(l) => l.len(),
    }
}

fn bench_forward(c: &mut Criterion) {
    let (model, weights) = minilm_shaped();
    let sequences: Vec<Vec<u32>> = (0..64u32)
        .map(|s| {
            (0..12u32)
                .map(|t| 101 + (s * 131 + t * 977) % 30000)
                .collect()
        })
        .collect();
    let mut group = c.benchmark_group("minilm_forward_64x12");
    group.sample_size(10);
    group.bench_function("all threads", |b| {
        b.iter(|| run(&model, &weights, &sequences))
    });
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    group.bench_function("one thread", |b| {
        b.iter(|| one.install(|| run(&model, &weights, &sequences)))
    });
    group.finish();
}

criterion_group!(benches, bench_forward);
criterion_main!(benches);
