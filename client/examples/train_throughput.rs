//! Training throughput of the tch model: full optimizer steps (forward, backward, gradient
//! clipping, AdamW) on random tokens, printed as one JSON line. `bench/torch_reference.py` runs
//! the same model in PyTorch eager for comparison. With `--dpsgd ghost|micro-batch` each step is
//! a DP-SGD step on the same batch instead (every sequence sampled, clipped and noised).
//!
//! `cargo run --release -p quorum-client --example train_throughput -- --preset tiny --batch 8
//! --seq 128 --threads 2 --steps 20`

use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use quorum_client::dpsgd::{DpSgdConfig, NormMethod};
use quorum_client::model::ModelConfig;
use quorum_client::train::{LocalTrainer, TrainConfig};
use rand::SeedableRng;
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
    /// Time DP-SGD steps, with per-sequence norms computed this way, instead of plain steps.
    #[arg(long, value_enum)]
    dpsgd: Option<Method>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Method {
    Ghost,
    MicroBatch,
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
    // Sampling every record makes each DP-SGD step see exactly the plain step's batch.
    let records: Vec<Vec<i64>> = (0..args.batch as i64)
        .map(|r| Vec::<i64>::try_from(batch.get(r)).expect("int64 row"))
        .collect();
    let dp = args.dpsgd.map(|m| DpSgdConfig {
        sampling_rate: 1.0,
        noise_multiplier: 1.0,
        clip_norm: 1.0,
        method: match m {
            Method::Ghost => NormMethod::Ghost,
            Method::MicroBatch => NormMethod::MicroBatch,
        },
    });
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(0);
    let mut step = |i: u64| {
        match &dp {
            None => trainer.train_step(i, || Ok(batch.shallow_clone())),
            Some(dp) => trainer
                .train_round_private(1, i, &records, dp, &mut rng, |_, _| {})
                .map(|s| s.mean_loss),
        }
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
        "dpsgd": args.dpsgd.map(|m| format!("{m:?}")),
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
