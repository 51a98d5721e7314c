//! Llama-style decoder-only transformer on LibTorch.
//!
//! Architecture (the Hugging Face `LlamaForCausalLM` layout, so that [`crate::hf`] exports weights
//! without any permutation): token embedding; `n_layers` blocks of RMSNorm → causal multi-head
//! self-attention with rotary position embeddings (RoPE) → residual, RMSNorm → SwiGLU MLP →
//! residual; final RMSNorm; LM head. No biases anywhere.
//!
//! - RoPE follows Hugging Face's convention: each head vector is split into two halves that are
//!   rotated together (`rotate_half`), not interleaved pairs.
//! - Attention runs through `scaled_dot_product_attention` with `is_causal = true`, so LibTorch
//!   picks its fused (flash / memory-efficient) kernel on every device.
//! - The LM head is tied to the token embedding in every preset ([`ModelConfig::tie_embeddings`]):
//!   the seed work's model names (75M … 1.3B) count the embedding matrix once, and with an untied
//!   head and the GPT-2 vocabulary the "75m" shape alone would hold 90M embedding parameters.
//!   An untied head is supported for custom configs and exports as `lm_head.weight`.
//!
//! Variable names inside the `VarStore` are the Hugging Face names
//! (`model.layers.{i}.self_attn.q_proj.weight`, …); the checkpoint format reuses them.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor, nn};

/// Errors raised while building or running the model.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The preset name is not one of [`PRESETS`].
    #[error("unknown model preset {0:?}: choose one of tiny, 75m, 125m, 350m, 1.3b")]
    UnknownPreset(String),
    /// A configuration field is out of range.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// The input batch does not fit the model.
    #[error("invalid model input: {0}")]
    InvalidInput(String),
    /// LibTorch could not allocate memory for this model, batch and sequence length.
    #[error(
        "out of memory running the {model} model on {device:?} with batch {batch} x sequence \
         {seq}: lower the batch size (use gradient accumulation to keep the token budget), \
         shorten the sequence, or choose a smaller preset ({detail})"
    )]
    OutOfMemory {
        /// The preset name or shape of the model.
        model: String,
        /// The device that ran out of memory.
        device: Device,
        /// Rows in the failing batch.
        batch: i64,
        /// Tokens per row in the failing batch.
        seq: i64,
        /// LibTorch's message.
        detail: String,
    },
    /// Any other LibTorch failure.
    #[error("LibTorch failed: {0}")]
    Torch(#[from] TchError),
}

/// Preset names accepted by [`ModelConfig::preset`], with the parameter count each name stands
/// for (0 for "tiny", which only exists for tests and the demo).
pub const PRESETS: [(&str, u64); 5] = [
    ("tiny", 0),
    ("75m", 75_000_000),
    ("125m", 125_000_000),
    ("350m", 350_000_000),
    ("1.3b", 1_300_000_000),
];

/// Shape of the decoder. Serialized into every checkpoint (`quorum.model_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Tokens in the vocabulary (set by the tokenizer).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of decoder blocks.
    pub n_layers: usize,
    /// Attention heads per block (`d_model / n_heads` must be even for RoPE).
    pub n_heads: usize,
    /// Hidden width of the SwiGLU MLP.
    pub ffn_hidden: usize,
    /// Longest sequence the rotary cache covers.
    pub max_seq_len: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Whether the LM head reuses the token embedding matrix.
    #[serde(default = "default_tie")]
    pub tie_embeddings: bool,
    /// The preset this config came from, used in messages only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
}

fn default_tie() -> bool {
    true
}

/// Llama's MLP width rule: 8/3 of the model width, rounded up to a multiple of `multiple_of`.
fn llama_ffn(d_model: usize, multiple_of: usize) -> usize {
    let raw = 8 * d_model / 3;
    raw.div_ceil(multiple_of) * multiple_of
}

impl ModelConfig {
    /// A named preset; `vocab_size` comes from the tokenizer.
    ///
    /// Shapes (layers / width / heads) follow the seed work: 75m 3/896/16, 125m 12/768/12,
    /// 350m 24/1024/16, 1.3b 24/2048/16; "tiny" is 2/128/4 with sequence 128.
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self, ModelError> {
        let (n_layers, d_model, n_heads, max_seq_len, multiple_of) = match name {
            "tiny" => (2, 128, 4, 128, 128),
            "75m" => (3, 896, 16, 1024, 256),
            "125m" => (12, 768, 12, 2048, 256),
            "350m" => (24, 1024, 16, 2048, 256),
            "1.3b" => (24, 2048, 16, 2048, 256),
            other => return Err(ModelError::UnknownPreset(other.to_owned())),
        };
        let cfg = Self {
            vocab_size,
            d_model,
            n_layers,
            n_heads,
            ffn_hidden: llama_ffn(d_model, multiple_of),
            max_seq_len,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
            preset: Some(name.to_owned()),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the invariants the model relies on.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: &str| Err(ModelError::InvalidConfig(m.to_owned()));
        if self.vocab_size == 0 || self.d_model == 0 || self.n_layers == 0 || self.n_heads == 0 {
            return bad("vocab_size, d_model, n_layers and n_heads must be positive");
        }
        if self.ffn_hidden == 0 || self.max_seq_len == 0 {
            return bad("ffn_hidden and max_seq_len must be positive");
        }
        if !self.d_model.is_multiple_of(self.n_heads)
            || !(self.d_model / self.n_heads).is_multiple_of(2)
        {
            return bad("d_model / n_heads must be an even integer (RoPE rotates pairs)");
        }
        if !(self.rope_theta > 1.0 && self.norm_eps > 0.0) {
            return bad("rope_theta must exceed 1 and norm_eps must be positive");
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Number of trainable parameters, computed from the shape: the embedding matrix (once when
    /// tied, twice otherwise), per block four attention projections, three MLP projections and
    /// two norm weights, plus the final norm.
    pub fn parameter_count(&self) -> u64 {
        let (v, d, f, l) = (
            self.vocab_size as u64,
            self.d_model as u64,
            self.ffn_hidden as u64,
            self.n_layers as u64,
        );
        let embeddings = if self.tie_embeddings {
            v * d
        } else {
            2 * v * d
        };
        embeddings + l * (4 * d * d + 3 * d * f + 2 * d) + d
    }

    /// Every tensor of the model as (Hugging Face name, shape), sorted byte-wise by name: the
    /// canonical order of checkpoints and flat parameter vectors.
    pub fn tensor_specs(&self) -> Vec<(String, Vec<usize>)> {
        let (v, d, f) = (self.vocab_size, self.d_model, self.ffn_hidden);
        let mut specs = vec![
            ("model.embed_tokens.weight".to_owned(), vec![v, d]),
            ("model.norm.weight".to_owned(), vec![d]),
        ];
        if !self.tie_embeddings {
            specs.push(("lm_head.weight".to_owned(), vec![v, d]));
        }
        for i in 0..self.n_layers {
            let p = format!("model.layers.{i}");
            specs.push((format!("{p}.input_layernorm.weight"), vec![d]));
            specs.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
            for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                specs.push((format!("{p}.self_attn.{proj}.weight"), vec![d, d]));
            }
            specs.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
            specs.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
            specs.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
        }
        specs.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        specs
    }

    /// Whether two configs describe the same tensors and computation (ignores the preset label).
    pub fn same_architecture(&self, other: &Self) -> bool {
        Self {
            preset: None,
            ..self.clone()
        } == Self {
            preset: None,
            ..other.clone()
        }
    }

    /// Human-readable name for messages: the preset, or the shape.
    pub fn describe(&self) -> String {
        match &self.preset {
            Some(p) => format!("\"{p}\""),
            None => format!("{}-layer d_model {}", self.n_layers, self.d_model),
        }
    }
}

/// Turns a LibTorch error into [`ModelError`], recognising allocation failures so the user is told
/// what to change.
pub fn classify_error(
    err: TchError,
    cfg: &ModelConfig,
    device: Device,
    batch: i64,
    seq: i64,
) -> ModelError {
    let text = err.to_string();
    if text.to_ascii_lowercase().contains("out of memory")
        || text.contains("DefaultCPUAllocator: can't allocate")
    {
        ModelError::OutOfMemory {
            model: cfg.describe(),
            device,
            batch,
            seq,
            detail: text.lines().next().unwrap_or_default().to_owned(),
        }
    } else {
        ModelError::Torch(err)
    }
}

/// Where one parameter entered a forward pass, kept by [`Llama::sequence_losses_with_taps`] so that
/// per-example gradient norms can be computed from activations and output gradients
/// ([`crate::dpsgd`]) without materialising per-example gradients.
#[derive(Debug)]
#[non_exhaustive]
pub enum Tap {
    /// `output = input · weightᵀ` (`input` in the compute precision).
    Linear {
        /// The weight's Hugging Face name.
        param: String,
        /// `[B, T, in]`.
        input: Tensor,
        /// `[B, T, out]`.
        output: Tensor,
    },
    /// `output = weight[tokens]`.
    Embedding {
        /// The weight's Hugging Face name.
        param: String,
        /// `[B, T]` int64.
        tokens: Tensor,
        /// `[B, T, d]`.
        output: Tensor,
    },
    /// `output = normalized ⊙ weight`: RMSNorm's scale, applied after normalising.
    Scale {
        /// The weight's Hugging Face name.
        param: String,
        /// `[B, T, d]`.
        normalized: Tensor,
        /// `[B, T, d]`.
        output: Tensor,
    },
}

/// Where a forward pass records its [`Tap`]s, if anywhere.
type Taps<'a> = Option<&'a mut Vec<Tap>>;

struct Block {
    /// `model.layers.{i}`, the prefix of this block's parameter names.
    prefix: String,
    input_norm: Tensor,
    post_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
}

/// The decoder. Parameters live in the `VarStore` passed to [`Llama::new`].
///
/// Activation (gradient) checkpointing is not offered: `tch` exposes no
/// `torch.utils.checkpoint`, so memory grows with layers × batch × sequence; use gradient
/// accumulation with a smaller batch instead.
pub struct Llama {
    cfg: ModelConfig,
    embed: Tensor,
    lm_head: Option<Tensor>,
    final_norm: Tensor,
    blocks: Vec<Block>,
    cos: Tensor,
    sin: Tensor,
    compute_kind: Kind,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("cfg", &self.cfg)
            .field("compute_kind", &self.compute_kind)
            .finish_non_exhaustive()
    }
}

impl Llama {
    /// Creates the parameters under `vs` (normal(0, 0.02) matrices, unit norm weights) and the
    /// rotary cache. Norm weights go to optimizer group 1 so that they can be kept out of weight
    /// decay; everything else is in group 0.
    pub fn new(vs: &nn::Path<'_>, cfg: &ModelConfig) -> Result<Self, ModelError> {
        cfg.validate()?;
        let (v, d, f) = (
            cfg.vocab_size as i64,
            cfg.d_model as i64,
            cfg.ffn_hidden as i64,
        );
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let model = vs.sub("model").set_group(0);
        let norms = vs.sub("model").set_group(1);
        let embed = var(&model, "embed_tokens.weight", &[v, d], Some(init))?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(var(
                &vs.set_group(0),
                "lm_head.weight",
                &[v, d],
                Some(init),
            )?)
        };
        let final_norm = var(&norms, "norm.weight", &[d], None)?;
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = model.sub("layers").sub(i);
            let n = norms.sub("layers").sub(i);
            let attn = p.sub("self_attn");
            let mlp = p.sub("mlp");
            blocks.push(Block {
                prefix: format!("model.layers.{i}"),
                input_norm: var(&n, "input_layernorm.weight", &[d], None)?,
                post_norm: var(&n, "post_attention_layernorm.weight", &[d], None)?,
                wq: var(&attn, "q_proj.weight", &[d, d], Some(init))?,
                wk: var(&attn, "k_proj.weight", &[d, d], Some(init))?,
                wv: var(&attn, "v_proj.weight", &[d, d], Some(init))?,
                wo: var(&attn, "o_proj.weight", &[d, d], Some(init))?,
                w_gate: var(&mlp, "gate_proj.weight", &[f, d], Some(init))?,
                w_up: var(&mlp, "up_proj.weight", &[f, d], Some(init))?,
                w_down: var(&mlp, "down_proj.weight", &[d, f], Some(init))?,
            });
        }
        let (cos, sin) = rope_cache(cfg, vs.device())?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            lm_head,
            final_norm,
            blocks,
            cos,
            sin,
            compute_kind: Kind::Float,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Mixed precision: when on, matrix products and attention run in bfloat16 on bfloat16 copies
    /// of the float32 weights (gradients still reach the float32 weights); norms, softmax and the
    /// loss stay in float32. `tch::autocast` is not used because it always picks float16 on CUDA,
    /// which needs a gradient scaler that `tch` does not provide.
    pub fn set_bf16(&mut self, on: bool) {
        self.compute_kind = if on { Kind::BFloat16 } else { Kind::Float };
    }

    /// Logits `[B, T, vocab]` (float32) for int64 tokens `[B, T]`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor, ModelError> {
        let (b, t) = self.check_input(tokens, 0)?;
        self.f_forward(tokens, None)
            .map_err(|e| classify_error(e, &self.cfg, self.embed.device(), b, t))
    }

    /// Mean next-token cross-entropy of int64 tokens `[B, T+1]`: positions `0..T` predict
    /// `1..T+1`.
    pub fn loss(&self, tokens: &Tensor) -> Result<Tensor, ModelError> {
        self.next_token_loss(tokens, None, false)
    }

    /// Each sequence's mean next-token cross-entropy `[B]` for int64 tokens `[B, T+1]`, with
    /// every parameter's [`Tap`] pushed onto `taps` (the order of use).
    pub fn sequence_losses_with_taps(
        &self,
        tokens: &Tensor,
        taps: &mut Vec<Tap>,
    ) -> Result<Tensor, ModelError> {
        self.next_token_loss(tokens, Some(taps), true)
    }

    /// Next-token cross-entropy of int64 tokens `[B, T+1]` (positions `0..T` predict
    /// `1..T+1`): the mean over every token, or with `per_sequence` each sequence's mean `[B]`.
    fn next_token_loss(
        &self,
        tokens: &Tensor,
        taps: Taps<'_>,
        per_sequence: bool,
    ) -> Result<Tensor, ModelError> {
        let (b, t) = self.check_input(tokens, 1)?;
        let run = || -> Result<Tensor, TchError> {
            let inputs = tokens.f_narrow(1, 0, t)?;
            let targets = tokens.f_narrow(1, 1, t)?.f_reshape([-1])?;
            let logits = self
                .f_forward(&inputs, taps)?
                .f_reshape([-1, self.cfg.vocab_size as i64])?;
            if !per_sequence {
                return logits.f_cross_entropy_loss::<Tensor>(
                    &targets,
                    None,
                    tch::Reduction::Mean,
                    -100,
                    0.0,
                );
            }
            logits
                .f_cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::None, -100, 0.0)?
                .f_reshape([b, t])?
                .f_mean_dim(1, false, tch::Kind::Float)
        };
        run().map_err(|e| classify_error(e, &self.cfg, self.embed.device(), b, t))
    }

    /// Validates shape and dtype; returns (batch, usable sequence length).
    fn check_input(&self, tokens: &Tensor, extra: i64) -> Result<(i64, i64), ModelError> {
        let size = tokens.size();
        let [b, t1] = size[..] else {
            return Err(ModelError::InvalidInput(format!(
                "expected [batch, seq], got {size:?}"
            )));
        };
        if tokens.kind() != Kind::Int64 {
            return Err(ModelError::InvalidInput(format!(
                "tokens must be int64, got {:?}",
                tokens.kind()
            )));
        }
        let t = t1 - extra;
        if b < 1 || t < 1 || t > self.cfg.max_seq_len as i64 {
            return Err(ModelError::InvalidInput(format!(
                "need batch >= 1 and 1 <= sequence <= {}, got batch {b} sequence {t}",
                self.cfg.max_seq_len
            )));
        }
        Ok((b, t))
    }

    fn f_forward(&self, tokens: &Tensor, mut taps: Taps<'_>) -> Result<Tensor, TchError> {
        let size = tokens.size();
        let (b, t) = (size[0], size[1]);
        let (d, h) = (self.cfg.d_model as i64, self.cfg.n_heads as i64);
        let hd = d / h;
        let ck = self.compute_kind;
        let cos = self.cos.f_narrow(0, 0, t)?.f_to_kind(ck)?;
        let sin = self.sin.f_narrow(0, 0, t)?.f_to_kind(ck)?;
        let heads =
            |x: Tensor| -> Result<Tensor, TchError> { x.f_view([b, t, h, hd])?.f_transpose(1, 2) };
        let mut x = Tensor::f_embedding(&self.embed, tokens, -1, false, false)?;
        if let Some(taps) = taps.as_deref_mut() {
            taps.push(Tap::Embedding {
                param: "model.embed_tokens.weight".into(),
                tokens: tokens.shallow_clone(),
                output: x.shallow_clone(),
            });
        }
        for blk in &self.blocks {
            let p = &blk.prefix;
            let name = |suffix: &str| format!("{p}.{suffix}.weight");
            let hn = self.rms_norm(&x, &blk.input_norm, &mut taps, || name("input_layernorm"))?;
            let q = self.linear(&hn, &blk.wq, &mut taps, || name("self_attn.q_proj"))?;
            let k = self.linear(&hn, &blk.wk, &mut taps, || name("self_attn.k_proj"))?;
            let v = self.linear(&hn, &blk.wv, &mut taps, || name("self_attn.v_proj"))?;
            let q = apply_rope(&heads(q)?, &cos, &sin)?;
            let k = apply_rope(&heads(k)?, &cos, &sin)?;
            let att = Tensor::f_scaled_dot_product_attention::<Tensor>(
                &q,
                &k,
                &heads(v)?,
                None,
                0.0,
                true,
                None,
                false,
            )?;
            let att = att.f_transpose(1, 2)?.f_reshape([b, t, d])?;
            let out = self.linear(&att, &blk.wo, &mut taps, || name("self_attn.o_proj"))?;
            x = x.f_add(&out.f_to_kind(Kind::Float)?)?;
            let hn = self.rms_norm(&x, &blk.post_norm, &mut taps, || {
                name("post_attention_layernorm")
            })?;
            let gate = self.linear(&hn, &blk.w_gate, &mut taps, || name("mlp.gate_proj"))?;
            let up = self.linear(&hn, &blk.w_up, &mut taps, || name("mlp.up_proj"))?;
            let gated = gate.f_silu()?.f_mul(&up)?;
            let down = self.linear(&gated, &blk.w_down, &mut taps, || name("mlp.down_proj"))?;
            x = x.f_add(&down.f_to_kind(Kind::Float)?)?;
        }
        let x = self.rms_norm(&x, &self.final_norm, &mut taps, || {
            "model.norm.weight".into()
        })?;
        let (head, head_name) = match &self.lm_head {
            Some(w) => (w, "lm_head.weight"),
            None => (&self.embed, "model.embed_tokens.weight"),
        };
        self.linear(&x, head, &mut taps, || head_name.into())?
            .f_to_kind(Kind::Float)
    }

    /// `x · wᵀ` in the compute precision, recorded as a [`Tap::Linear`] named by `param`.
    fn linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        taps: &mut Taps<'_>,
        param: impl FnOnce() -> String,
    ) -> Result<Tensor, TchError> {
        let ck = self.compute_kind;
        let input = x.f_to_kind(ck)?;
        let output = input.f_linear::<Tensor>(&w.f_to_kind(ck)?, None)?;
        if let Some(taps) = taps.as_deref_mut() {
            taps.push(Tap::Linear {
                param: param(),
                input,
                output: output.shallow_clone(),
            });
        }
        Ok(output)
    }

    /// RMSNorm in float32, as Hugging Face's `LlamaRMSNorm`. Fused, unless taps are kept: then
    /// the scale is applied apart, so that [`Tap::Scale`] sees the normalised input.
    fn rms_norm(
        &self,
        x: &Tensor,
        weight: &Tensor,
        taps: &mut Taps<'_>,
        param: impl FnOnce() -> String,
    ) -> Result<Tensor, TchError> {
        let shape = &[self.cfg.d_model as i64][..];
        let Some(taps) = taps.as_deref_mut() else {
            return x.f_rms_norm(shape, Some(weight), self.cfg.norm_eps);
        };
        let normalized = x.f_rms_norm::<Tensor>(shape, None, self.cfg.norm_eps)?;
        let output = normalized.f_mul(weight)?;
        taps.push(Tap::Scale {
            param: param(),
            normalized,
            output: output.shallow_clone(),
        });
        Ok(output)
    }
}

/// Creates the variable `dotted` (a name with `.` separators, which tch paths cannot hold) under
/// `p`: normal(0, 0.02) when `init` is given, ones otherwise.
fn var(
    p: &nn::Path<'_>,
    dotted: &str,
    dims: &[i64],
    init: Option<nn::Init>,
) -> Result<Tensor, TchError> {
    match (dotted.split_once('.'), init) {
        (Some((head, rest)), _) => var(&p.sub(head), rest, dims, init),
        (None, Some(init)) => p.f_var(dotted, dims, init),
        (None, None) => p.f_ones(dotted, dims),
    }
}

/// Rotary tables `[max_seq_len, head_dim]` computed exactly as Hugging Face's default rotary
/// embedding: `inv_freq = 1 / theta^(2i/dim)`, angles duplicated over both halves.
fn rope_cache(cfg: &ModelConfig, device: Device) -> Result<(Tensor, Tensor), TchError> {
    let hd = cfg.head_dim() as i64;
    let opts = (Kind::Float, device);
    let exponent = Tensor::f_arange_start_step(0, hd, 2, (Kind::Int64, device))?
        .f_to_kind(Kind::Float)?
        .f_div_scalar(hd as f64)?;
    let inv_freq = Tensor::f_pow_scalar(cfg.rope_theta, &exponent)?.f_reciprocal()?;
    let pos = Tensor::f_arange(cfg.max_seq_len as i64, opts)?;
    let freqs = pos.f_unsqueeze(1)?.f_mul(&inv_freq.f_unsqueeze(0)?)?;
    let emb = Tensor::f_cat(&[&freqs, &freqs], 1)?;
    Ok((emb.f_cos()?, emb.f_sin()?))
}

/// `x * cos + rotate_half(x) * sin` on `[B, H, T, hd]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, TchError> {
    let half = x.size()[3] / 2;
    let x1 = x.f_narrow(3, 0, half)?;
    let x2 = x.f_narrow(3, half, half)?;
    let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], 3)?;
    x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_ffn_rounds_up_to_multiple() {
        assert_eq!(llama_ffn(768, 256), 2048);
        assert_eq!(llama_ffn(896, 256), 2560);
        assert_eq!(llama_ffn(2048, 256), 5632);
    }

    #[test]
    fn specs_are_sorted_and_sum_to_parameter_count() {
        for tie in [true, false] {
            let mut cfg = ModelConfig::preset("tiny", 258).unwrap();
            cfg.tie_embeddings = tie;
            let specs = cfg.tensor_specs();
            assert!(
                specs
                    .windows(2)
                    .all(|w| w[0].0.as_bytes() < w[1].0.as_bytes())
            );
            let total: u64 = specs
                .iter()
                .map(|(_, s)| s.iter().product::<usize>() as u64)
                .sum();
            assert_eq!(total, cfg.parameter_count());
        }
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let mut cfg = ModelConfig::preset("tiny", 258).unwrap();
        cfg.n_heads = 3;
        assert!(matches!(cfg.validate(), Err(ModelError::InvalidConfig(_))));
        assert!(matches!(
            ModelConfig::preset("huge", 258),
            Err(ModelError::UnknownPreset(_))
        ));
    }

    #[test]
    fn out_of_memory_is_recognised() {
        let cfg = ModelConfig::preset("350m", 50257).unwrap();
        let err = TchError::Torch("CUDA out of memory. Tried to allocate 2.00 GiB".into());
        let e = classify_error(err, &cfg, Device::Cpu, 8, 1024);
        let msg = e.to_string();
        assert!(matches!(e, ModelError::OutOfMemory { .. }));
        assert!(
            msg.contains("\"350m\"") && msg.contains("smaller preset"),
            "{msg}"
        );
        let other = classify_error(
            TchError::Torch("shape mismatch".into()),
            &cfg,
            Device::Cpu,
            1,
            1,
        );
        assert!(matches!(other, ModelError::Torch(_)));
    }
}
