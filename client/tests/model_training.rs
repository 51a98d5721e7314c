//! Real training of the tiny model on the CPU: the loss falls, evaluation and pseudo-gradients
//! are consistent, and the centralized baseline produces a falling curve.

use quorum_client::checkpoint;
use quorum_client::corpus::Flavour;
use quorum_client::data::{BlockStream, TextSource};
use quorum_client::model::ModelConfig;
use quorum_client::tokenizer::Tokenizer;
use quorum_client::train::{LocalTrainer, TrainConfig, TrainError, train_centralized};
use tch::Device;

fn setup(seq_len: usize) -> (ModelConfig, TrainConfig) {
    tch::set_num_threads(2);
    let model = ModelConfig::preset("tiny", Tokenizer::Bytes.vocab_size()).unwrap();
    let train = TrainConfig {
        batch_size: 8,
        seq_len,
        lr: 3e-3,
        warmup_steps: 10,
        total_steps: 100,
        ..TrainConfig::default()
    };
    (model, train)
}

fn stream(flavour: Flavour, seq_len: usize) -> BlockStream {
    let source = TextSource::builtin(flavour, 7, 200_000);
    BlockStream::new(source, Tokenizer::Bytes, seq_len, 1).with_shuffle_buffer(64)
}

#[test]
fn loss_falls_over_100_steps_and_delta_matches_weights() {
    let (model_cfg, train_cfg) = setup(64);
    let mut trainer = LocalTrainer::new(model_cfg, train_cfg, Device::Cpu, 3).unwrap();
    let global = trainer.save_checkpoint().unwrap();
    let (_, global_flat) = checkpoint::decode(&global).unwrap();
    let mut data = stream(Flavour::Clinical, 64);
    let val = data.validation_blocks(16).unwrap();
    let before = trainer.evaluate(&val).unwrap();
    assert!(
        (before - (258f64).ln()).abs() < 0.3,
        "untrained loss {before} should be near ln(258)"
    );

    let mut losses = Vec::new();
    let stats = trainer
        .train_round(100, 0, &mut data, |_, l| losses.push(l))
        .unwrap();
    assert_eq!(losses.len(), 100);
    assert_eq!(stats.tokens, 100 * 8 * 64);
    let first: f64 = losses[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = losses[90..].iter().sum::<f64>() / 10.0;
    assert!(
        last < first - 1.0,
        "training loss fell only from {first} to {last}"
    );
    let after = trainer.evaluate(&val).unwrap();
    assert!(
        after < before - 1.5,
        "validation loss fell only from {before} to {after}"
    );

    let delta = trainer.delta(&global_flat).unwrap();
    let local = checkpoint::flat_parameters(trainer.var_store()).unwrap();
    assert!(delta.iter().any(|d| d.abs() > 1e-3));
    for ((d, g), l) in delta.iter().zip(&global_flat).zip(&local) {
        assert_eq!(*d, g - l);
    }
    assert!(matches!(
        trainer.delta(&global_flat[1..]),
        Err(TrainError::LengthMismatch { .. })
    ));

    // Loading the global model back restores its exact loss.
    trainer.load_global(&global).unwrap();
    assert_eq!(trainer.evaluate(&val).unwrap(), before);
}

#[test]
fn same_seed_same_data_gives_identical_rounds() {
    let (model_cfg, train_cfg) = setup(32);
    let run = || {
        let mut t =
            LocalTrainer::new(model_cfg.clone(), train_cfg.clone(), Device::Cpu, 5).unwrap();
        let mut data = stream(Flavour::Finance, 32);
        t.train_round(3, 0, &mut data, |_, _| {}).unwrap();
        checkpoint::flat_parameters(t.var_store()).unwrap()
    };
    assert_eq!(run(), run());
}

#[test]
fn load_global_rejects_other_architecture() {
    let (model_cfg, train_cfg) = setup(32);
    let mut trainer = LocalTrainer::new(model_cfg.clone(), train_cfg, Device::Cpu, 1).unwrap();
    let other = ModelConfig {
        ffn_hidden: 256,
        ..model_cfg
    };
    let bytes = checkpoint::init_checkpoint(&other, 1).unwrap();
    assert!(matches!(
        trainer.load_global(&bytes),
        Err(TrainError::ModelMismatch { .. })
    ));
}

#[test]
fn centralized_baseline_curve_falls() {
    let (model_cfg, train_cfg) = setup(32);
    let mut trainer = LocalTrainer::new(model_cfg, train_cfg, Device::Cpu, 2).unwrap();
    let mut sites = vec![stream(Flavour::Academic, 32), stream(Flavour::Legal, 32)];
    let mut val = sites[0].validation_blocks(8).unwrap();
    val.extend(sites[1].validation_blocks(8).unwrap());
    let mut seen = 0;
    let curve =
        train_centralized(&mut trainer, &mut sites, 40, 20, &val, |_, _| seen += 1).unwrap();
    assert_eq!(seen, curve.len());
    let tokens: Vec<u64> = curve.iter().map(|p| p.0).collect();
    assert_eq!(tokens, vec![0, 20 * 8 * 32, 40 * 8 * 32]);
    assert!(
        curve[2].1 < curve[0].1 - 1.0,
        "centralized curve did not fall: {curve:?}"
    );
}
