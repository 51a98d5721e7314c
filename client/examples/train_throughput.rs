//! Training throughput of the tch model: full optimizer steps (forward, backward, gradient
//! clipping, AdamW) on random tokens, printed as one JSON line. `bench/torch_reference.py` runs
//! the same model in PyTorch eager for comparison.
//!
//! `cargo run --release -p quorum-client --example train_throughput -- --preset tiny --batch 8
//! --seq 128 --threads 2 --steps 20`

use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use quorum_client::model::ModelConfig;
use quorum_client::train::{LocalTrainer, TrainConfig};
use tch::{Device, Kind, Tensor};

#[derive(Parser, Debug)]
struct Args {
    /// Model preset.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Vocabulary size (258 = bytes tokenizer, 50257 = GPT-2).
    #[arg(long, default_value_t = 258)]
    vocab: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// LibTorch intra-op threads.
    #[arg(long, default_value_t = 2)]
    threads: i32,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    steps: u64,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Use CUDA when available (bf16 matrix products).
    #[arg(long)]
    cuda: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(args.threads);
    let device = if args.cuda {
        quorum_client::cuda::load_backend().map_err(anyhow::Error::msg)?;
        Device::cuda_if_available()
    } else {
        Device::Cpu
    };
    let model_cfg = ModelConfig::preset(&args.preset, args.vocab)?;
    let params = model_cfg.parameter_count();
    let train_cfg = TrainConfig {
        batch_size: args.batch,
        seq_len: args.seq,
        warmup_steps: 1,
        total_steps: args.warmup + args.steps,
        ..TrainConfig::default()
    };
    let mut trainer = LocalTrainer::new(model_cfg, train_cfg, device, 0)?;
    tch::manual_seed(0);
    let batch = Tensor::randint(
        args.vocab as i64,
        [args.batch as i64, args.seq as i64 + 1],
        (Kind::Int64, Device::Cpu),
    );
    let mut step = |i: u64| {
        trainer
            .train_step(i, || Ok(batch.shallow_clone()))
            .with_context(|| format!("step {i}"))
    };
    for i in 0..args.warmup {
        step(i)?;
    }
    if device.is_cuda() {
        tch::Cuda::synchronize(0);
    }
    let start = Instant::now();
    let mut loss = 0.0;
    // The fastest single step is the least disturbed by other load on a shared machine.
    let mut fastest = f64::INFINITY;
    for i in 0..args.steps {
        let t = Instant::now();
        loss = step(args.warmup + i)?;
        fastest = fastest.min(t.elapsed().as_secs_f64());
    }
    if device.is_cuda() {
        tch::Cuda::synchronize(0);
    }
    let secs = start.elapsed().as_secs_f64();
    let tokens = (args.steps as usize * args.batch * args.seq) as f64;
    let report = serde_json::json!({
        "impl": "tch",
        "preset": args.preset,
        "params": params,
        "vocab": args.vocab,
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "device": format!("{device:?}"),
        "steps": args.steps,
        "step_ms": 1000.0 * secs / args.steps as f64,
        "tokens_per_s": tokens / secs,
        "min_step_ms": 1000.0 * fastest,
        "peak_tokens_per_s": (args.batch * args.seq) as f64 / fastest,
        "final_loss": loss,
    });
    println!("{report}");
    Ok(())
}
