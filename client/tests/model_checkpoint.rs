//! Checkpoint format: round trips, the canonical flat order, and rejection of mismatched files.

use quorum_client::checkpoint::{self, CONFIG_KEY, CheckpointError};
use quorum_client::model::{Llama, ModelConfig};
use safetensors::SafeTensors;
use tch::{Device, Kind, Tensor, nn};

fn tiny() -> ModelConfig {
    ModelConfig::preset("tiny", 258).unwrap()
}

fn store(cfg: &ModelConfig) -> (nn::VarStore, Llama) {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Llama::new(&vs.root(), cfg).unwrap();
    (vs, model)
}

#[test]
fn save_load_round_trip_preserves_values_and_logits() {
    let cfg = tiny();
    let (vs, model) = store(&cfg);
    let bytes = checkpoint::save(&vs, &cfg).unwrap();
    let (loaded_cfg, tensors) = checkpoint::load(&bytes).unwrap();
    assert_eq!(loaded_cfg, cfg);
    let vars = vs.variables();
    assert_eq!(tensors.len(), vars.len());
    for (name, t) in &tensors {
        assert!(t.equal(&vars[name]), "{name} changed in the round trip");
    }
    let (vs2, model2) = store(&cfg);
    checkpoint::copy_into(&vs2, &bytes).unwrap();
    let tokens = Tensor::randint(258, [2, 9], (Kind::Int64, Device::Cpu));
    assert!(
        model
            .forward(&tokens)
            .unwrap()
            .equal(&model2.forward(&tokens).unwrap())
    );
    assert_eq!(
        checkpoint::flat_parameters(&vs2).unwrap(),
        checkpoint::flat_parameters(&vs).unwrap()
    );
}

#[test]
fn flat_order_is_sorted_names_row_major() {
    let cfg = tiny();
    let (vs, _) = store(&cfg);
    let flat = checkpoint::flat_parameters(&vs).unwrap();
    let mut names: Vec<String> = vs.variables().keys().cloned().collect();
    names.sort();
    let vars = vs.variables();
    let mut expected = Vec::new();
    for name in &names {
        expected.extend(Vec::<f32>::try_from(vars[name].flatten(0, -1)).unwrap());
    }
    assert_eq!(flat, expected);
    let (_, decoded) = checkpoint::decode(&checkpoint::save(&vs, &cfg).unwrap()).unwrap();
    assert_eq!(decoded, expected);
    // A row-major check on one matrix: element [1, 0] sits one row width after [0, 0].
    let q = &vars["model.layers.0.self_attn.q_proj.weight"];
    let offset: usize = names
        .iter()
        .take_while(|n| n.as_str() != "model.layers.0.self_attn.q_proj.weight")
        .map(|n| vars[n].numel())
        .sum();
    assert_eq!(flat[offset + 128], f32::try_from(q.get(1).get(0)).unwrap());
}

#[test]
fn init_is_deterministic_and_llama_scaled() {
    let cfg = tiny();
    let a = checkpoint::init_checkpoint(&cfg, 11).unwrap();
    assert_eq!(a, checkpoint::init_checkpoint(&cfg, 11).unwrap());
    assert_ne!(a, checkpoint::init_checkpoint(&cfg, 12).unwrap());
    let st = SafeTensors::deserialize(&a).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&a).unwrap();
    assert!(meta.metadata().as_ref().unwrap().contains_key(CONFIG_KEY));
    let (_, tensors) = checkpoint::load(&a).unwrap();
    for (name, t) in tensors {
        if t.dim() == 1 {
            assert!(t.equal(&Tensor::ones_like(&t)), "{name} should start at 1");
        } else {
            let std = f64::try_from(t.std(true)).unwrap();
            assert!((std - 0.02).abs() < 0.002, "{name} std {std}");
        }
    }
    assert_eq!(st.names().len(), cfg.tensor_specs().len());
}

#[test]
fn copy_into_rejects_wrong_shape_and_missing_names() {
    let cfg = tiny();
    let (vs, _) = store(&cfg);
    let wider = ModelConfig {
        ffn_hidden: 256,
        ..cfg.clone()
    };
    let err = checkpoint::copy_into(&vs, &checkpoint::init_checkpoint(&wider, 1).unwrap());
    assert!(
        matches!(err, Err(CheckpointError::ShapeDiffers { .. })),
        "{err:?}"
    );
    let untied = ModelConfig {
        tie_embeddings: false,
        ..cfg.clone()
    };
    let err = checkpoint::copy_into(&vs, &checkpoint::init_checkpoint(&untied, 1).unwrap());
    match err {
        Err(CheckpointError::NamesDiffer { missing, extra }) => {
            assert!(missing.is_empty());
            assert_eq!(extra, vec!["lm_head.weight".to_owned()]);
        }
        other => panic!("expected NamesDiffer, got {other:?}"),
    }
}

#[test]
fn malformed_checkpoints_are_errors() {
    let cfg = tiny();
    let good = checkpoint::init_checkpoint(&cfg, 1).unwrap();
    assert!(matches!(
        checkpoint::decode(&good[..good.len() - 4]),
        Err(CheckpointError::NotSafetensors(_))
    ));
    assert!(matches!(
        checkpoint::decode(b"garbage"),
        Err(CheckpointError::NotSafetensors(_))
    ));
    // A valid safetensors file without Quorum's metadata.
    let data = [0u8; 4];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &data).unwrap();
    let plain = safetensors::serialize([("x", view)], None).unwrap();
    assert!(matches!(
        checkpoint::decode(&plain),
        Err(CheckpointError::MissingConfig)
    ));
    let short = vec![0f32; 10];
    assert!(matches!(
        checkpoint::encode(&cfg, &short),
        Err(CheckpointError::FlatLength { .. })
    ));
}
