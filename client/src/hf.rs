//! Export to a Hugging Face `transformers` folder loadable as `LlamaForCausalLM`.
//!
//! The checkpoint's tensor names already are Hugging Face's and the model's RoPE uses their
//! `rotate_half` convention, so export copies weights unchanged. A tied LM head is exported as
//! `tie_word_embeddings: true` without `lm_head.weight`.

use std::path::{Path, PathBuf};

use crate::checkpoint::{self, CheckpointError};
use crate::model::ModelConfig;

/// Errors raised while exporting.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The output folder or a file in it could not be written.
    #[error("cannot write {path}: {source}")]
    Unwritable {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The `config.json` of a Hugging Face Llama model with this shape.
pub fn hf_config(cfg: &ModelConfig) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "num_hidden_layers": cfg.n_layers,
        "head_dim": cfg.head_dim(),
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "initializer_range": checkpoint::INIT_STD,
        "torch_dtype": "float32",
    })
}

/// Writes `config.json` and `model.safetensors` for `checkpoint_bytes` into `out_dir` (created if
/// needed).
pub fn export_hf(checkpoint_bytes: &[u8], out_dir: &Path) -> Result<(), ExportError> {
    let (cfg, flat) = checkpoint::decode(checkpoint_bytes)?;
    let unwritable = |path: PathBuf| move |source| ExportError::Unwritable { path, source };
    std::fs::create_dir_all(out_dir).map_err(unwritable(out_dir.to_owned()))?;
    // transformers refuses safetensors files whose metadata lacks a known "format".
    let weights = checkpoint::encode_with_metadata(&cfg, &flat, &[("format", "pt")])?;
    let path = out_dir.join("model.safetensors");
    std::fs::write(&path, weights).map_err(unwritable(path.clone()))?;
    // Serializing a `serde_json::Value` cannot fail.
    let config = serde_json::to_string_pretty(&hf_config(&cfg)).unwrap_or_default();
    let path = out_dir.join("config.json");
    std::fs::write(&path, config).map_err(unwritable(path.clone()))?;
    Ok(())
}
