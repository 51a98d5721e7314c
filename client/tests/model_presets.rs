//! Preset shapes: parameter counts within 5 % of the preset names with the GPT-2 vocabulary
//! (embedding counted once, as the seed work's names do), and the analytic count equals the
//! tensors the model actually creates.

use quorum_client::checkpoint;
use quorum_client::model::{Llama, ModelConfig, PRESETS};
use tch::{Device, Kind, Tensor, nn};

const GPT2_VOCAB: usize = 50257;

#[test]
fn presets_are_within_five_percent_of_their_names() {
    for (name, nominal) in PRESETS.into_iter().filter(|(_, n)| *n > 0) {
        let cfg = ModelConfig::preset(name, GPT2_VOCAB).unwrap();
        let count = cfg.parameter_count() as f64;
        let ratio = count / nominal as f64;
        println!(
            "{name}: {} parameters ({:+.1} %)",
            cfg.parameter_count(),
            100.0 * (ratio - 1.0)
        );
        assert!(
            (0.95..=1.05).contains(&ratio),
            "{name}: {count} is {ratio:.3} x nominal"
        );
        assert_eq!(
            cfg.ffn_hidden % 256,
            0,
            "{name}: ffn_hidden not a multiple of 256"
        );
    }
}

#[test]
fn seed_work_shapes_are_kept() {
    let shape = |n: &str| {
        let c = ModelConfig::preset(n, GPT2_VOCAB).unwrap();
        (c.n_layers, c.d_model, c.n_heads)
    };
    assert_eq!(shape("75m"), (3, 896, 16));
    assert_eq!(shape("125m"), (12, 768, 12));
    assert_eq!(shape("350m"), (24, 1024, 16));
    assert_eq!(shape("1.3b"), (24, 2048, 16));
    assert_eq!(
        ModelConfig::preset("75m", GPT2_VOCAB).unwrap().max_seq_len,
        1024
    );
}

#[test]
fn var_store_matches_specs_and_count() {
    for tie in [true, false] {
        let mut cfg = ModelConfig::preset("tiny", 258).unwrap();
        cfg.tie_embeddings = tie;
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Llama::new(&vs.root(), &cfg).unwrap();
        assert_eq!(checkpoint::flat_len(&vs) as u64, cfg.parameter_count());
        let vars = vs.variables();
        assert_eq!(vars.len(), cfg.tensor_specs().len());
        for (name, shape) in cfg.tensor_specs() {
            let t = vars.get(&name).unwrap_or_else(|| panic!("missing {name}"));
            let dims: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            assert_eq!(dims, shape, "{name}");
        }
        let tokens = Tensor::randint(258, [2, 17], (Kind::Int64, Device::Cpu));
        assert_eq!(model.forward(&tokens).unwrap().size(), vec![2, 17, 258]);
    }
}

#[test]
fn forward_is_causal_and_rejects_bad_input() {
    let cfg = ModelConfig::preset("tiny", 258).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Llama::new(&vs.root(), &cfg).unwrap();
    let a = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).view([1, 6]);
    let b = Tensor::from_slice(&[1i64, 2, 3, 9, 9, 9]).view([1, 6]);
    let (la, lb) = (model.forward(&a).unwrap(), model.forward(&b).unwrap());
    let prefix_diff = f64::try_from((la.narrow(1, 0, 3) - lb.narrow(1, 0, 3)).abs().max()).unwrap();
    let suffix_diff = f64::try_from((la.narrow(1, 3, 3) - lb.narrow(1, 3, 3)).abs().max()).unwrap();
    assert!(
        prefix_diff < 1e-6,
        "future tokens leaked into the prefix: {prefix_diff}"
    );
    assert!(suffix_diff > 1e-4);
    assert!(model.forward(&a.to_kind(Kind::Float)).is_err());
    assert!(
        model
            .forward(&Tensor::zeros([1, 129], (Kind::Int64, Device::Cpu)))
            .is_err()
    );
}

#[test]
fn bf16_matmuls_stay_close_to_float32_and_train_float32_weights() {
    let cfg = ModelConfig::preset("tiny", 258).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let mut model = Llama::new(&vs.root(), &cfg).unwrap();
    let tokens = Tensor::randint(258, [2, 33], (Kind::Int64, Device::Cpu));
    let full = f64::try_from(model.loss(&tokens).unwrap()).unwrap();
    model.set_bf16(true);
    let loss = model.loss(&tokens).unwrap();
    assert_eq!(loss.kind(), Kind::Float);
    let half = f64::try_from(&loss).unwrap();
    assert!((full - half).abs() < 0.05, "bf16 loss {half} vs f32 {full}");
    loss.backward();
    for t in vs.trainable_variables() {
        assert_eq!(t.kind(), Kind::Float);
        assert!(t.grad().defined());
    }
}
