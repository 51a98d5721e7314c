//! Local training: AdamW with warmup + cosine decay on the federation's global step, gradient
//! clipping and accumulation, DP-SGD steps ([`crate::dpsgd`]), evaluation, pseudo-gradients,
//! and the centralized baseline.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Tensor};

use crate::checkpoint::{self, CheckpointError};
use crate::data::{BlockStream, DataError};
use crate::dpsgd::{self, DpSgdConfig};
use crate::model::{Llama, ModelConfig, ModelError, classify_error};

/// Errors raised while training.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A training setting is out of range.
    #[error("invalid training config: {0}")]
    InvalidConfig(String),
    /// The global checkpoint is for a different model than this trainer's.
    #[error("the global model is {found}, but this site is configured for {expected}")]
    ModelMismatch {
        /// This trainer's model.
        expected: String,
        /// The checkpoint's model.
        found: String,
    },
    /// The loss became NaN or infinite.
    #[error("training diverged at global step {step} (loss {loss}); lower the learning rate")]
    Diverged {
        /// Global step of the bad loss.
        step: u64,
        /// The loss value.
        loss: f64,
    },
    /// A vector passed in has the wrong length.
    #[error("parameter vector has {found} values, the model has {expected}")]
    LengthMismatch {
        /// Parameters in the model.
        expected: usize,
        /// Values given.
        found: usize,
    },
    /// Evaluation was asked for with no blocks.
    #[error("no validation blocks to evaluate on")]
    NoValidationData,
    /// The model failed (including out-of-memory).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Reading training data failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Reading or writing a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// Local optimization settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence (the model sees `seq_len` inputs and predicts `seq_len` targets).
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Linear warmup length in global steps.
    pub warmup_steps: u64,
    /// Global step at which the cosine reaches `min_lr_ratio * lr`.
    pub total_steps: u64,
    /// AdamW decoupled weight decay (not applied to norm weights).
    pub weight_decay: f64,
    /// Maximum global gradient L2 norm; 0 disables clipping.
    pub grad_clip: f64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Start every round with fresh AdamW moments (the seed work's choice).
    pub reset_optimizer_each_round: bool,
    /// On CUDA, run matrix products in bfloat16 (see [`Llama::set_bf16`]).
    pub mixed_precision: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 8,
            seq_len: 128,
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 100,
            total_steps: 1000,
            weight_decay: 0.1,
            grad_clip: 1.0,
            grad_accum: 1,
            reset_optimizer_each_round: true,
            mixed_precision: true,
        }
    }
}

impl TrainConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: &str| Err(TrainError::InvalidConfig(m.to_owned()));
        if self.batch_size == 0 || self.seq_len == 0 || self.grad_accum == 0 {
            return bad("batch_size, seq_len and grad_accum must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr must be a positive number");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min_lr_ratio must be within [0, 1]");
        }
        if !(self.weight_decay >= 0.0 && self.grad_clip >= 0.0) {
            return bad("weight_decay and grad_clip must not be negative");
        }
        Ok(())
    }

    /// Learning rate at a global step: linear warmup to `lr` over `warmup_steps`, then cosine
    /// decay to `min_lr_ratio * lr` at `total_steps`, constant afterwards.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }

    /// Tokens consumed by one optimizer step.
    pub fn tokens_per_step(&self) -> u64 {
        (self.batch_size * self.grad_accum * self.seq_len) as u64
    }
}

/// Summary of one local round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundStats {
    /// Mean training loss over the round's steps.
    pub mean_loss: f64,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// A site's model, optimizer and schedule.
pub struct LocalTrainer {
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    device: Device,
    vs: nn::VarStore,
    model: Llama,
    opt: Option<nn::Optimizer>,
}

impl std::fmt::Debug for LocalTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTrainer")
            .field("model_cfg", &self.model_cfg)
            .field("train_cfg", &self.train_cfg)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl LocalTrainer {
    /// A model on `device` with weights from [`checkpoint::init_checkpoint`]`(model_cfg, seed)`,
    /// so that every site and the centralized baseline start identical when given the same seed.
    pub fn new(
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        device: Device,
        seed: u64,
    ) -> Result<Self, TrainError> {
        train_cfg.validate()?;
        if train_cfg.seq_len > model_cfg.max_seq_len {
            return Err(TrainError::InvalidConfig(format!(
                "seq_len {} exceeds the model's max_seq_len {}",
                train_cfg.seq_len, model_cfg.max_seq_len
            )));
        }
        let vs = nn::VarStore::new(device);
        let mut model = Llama::new(&vs.root(), &model_cfg)?;
        model.set_bf16(train_cfg.mixed_precision && device.is_cuda());
        checkpoint::copy_into(&vs, &checkpoint::init_checkpoint(&model_cfg, seed)?)?;
        Ok(Self {
            model_cfg,
            train_cfg,
            device,
            vs,
            model,
            opt: None,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The model's parameters.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The training settings.
    pub fn train_config(&self) -> &TrainConfig {
        &self.train_cfg
    }

    /// Replaces the local weights with the global model; drops the optimizer state when
    /// `reset_optimizer_each_round` is set.
    pub fn load_global(&mut self, checkpoint_bytes: &[u8]) -> Result<(), TrainError> {
        let (cfg, _) = checkpoint::decode(checkpoint_bytes)?;
        if !cfg.same_architecture(&self.model_cfg) {
            return Err(TrainError::ModelMismatch {
                expected: format!("{:?}", self.model_cfg),
                found: format!("{cfg:?}"),
            });
        }
        checkpoint::copy_into(&self.vs, checkpoint_bytes)?;
        if self.train_cfg.reset_optimizer_each_round {
            self.opt = None;
        }
        Ok(())
    }

    /// Runs `steps` optimizer steps numbered from `global_step_start` (the schedule follows the
    /// federation's step, not the round's), calling `on_step(global_step, loss)` after each.
    pub fn train_round(
        &mut self,
        steps: u64,
        global_step_start: u64,
        data: &mut BlockStream,
        mut on_step: impl FnMut(u64, f64),
    ) -> Result<RoundStats, TrainError> {
        let start = Instant::now();
        let batch = self.train_cfg.batch_size;
        let mut sum = 0.0;
        for i in 0..steps {
            let step = global_step_start + i;
            let loss = self.train_step(step, || data.next_batch(batch))?;
            sum += loss;
            on_step(step, loss);
        }
        Ok(RoundStats {
            mean_loss: if steps == 0 {
                f64::NAN
            } else {
                sum / steps as f64
            },
            tokens: steps * self.train_cfg.tokens_per_step(),
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// One optimizer step at `step` of the global schedule over `grad_accum` micro-batches, each
    /// an int64 `[batch, seq + 1]` tensor from `next_batch`; returns the mean micro-batch loss.
    pub fn train_step(
        &mut self,
        step: u64,
        mut next_batch: impl FnMut() -> Result<Tensor, DataError>,
    ) -> Result<f64, TrainError> {
        let (accum, clip) = (self.train_cfg.grad_accum, self.train_cfg.grad_clip);
        let lr = self.train_cfg.lr_at(step);
        if self.opt.is_none() {
            self.opt = Some(self.build_optimizer()?);
        }
        let Some(opt) = self.opt.as_mut() else {
            return Err(TrainError::InvalidConfig(
                "optimizer could not be created".into(),
            ));
        };
        opt.set_lr(lr);
        opt.zero_grad();
        let mut total = 0.0;
        for _ in 0..accum {
            let batch = next_batch()?.to_device(self.device);
            let (b, t) = match batch.size()[..] {
                [b, t1] => (b, t1 - 1),
                _ => (0, 0), // Llama::loss rejects the shape with a clear error.
            };
            let oom = |e| classify_error(e, &self.model_cfg, self.device, b, t);
            let loss = self.model.loss(&batch)?;
            total += loss.f_double_value(&[]).map_err(oom)?;
            loss.f_div_scalar(accum as f64)
                .and_then(|l| l.f_backward())
                .map_err(oom)?;
        }
        let mean = total / accum as f64;
        if !mean.is_finite() {
            return Err(TrainError::Diverged { step, loss: mean });
        }
        optimizer_step(opt, clip).map_err(|e| self.step_failed(e))?;
        Ok(mean)
    }

    /// Runs `steps` DP-SGD steps (see [`crate::dpsgd`]) on Poisson samples of `records` (each
    /// `seq_len + 1` tokens), numbered from `global_step_start`; sampling and noise draw from
    /// `rng`. Sampled sequences are processed `batch_size` at a time, so memory does not grow
    /// with the sample. `on_step(global_step, stats)` runs after each step.
    pub fn train_round_private(
        &mut self,
        steps: u64,
        global_step_start: u64,
        records: &[Vec<i64>],
        dp: &DpSgdConfig,
        rng: &mut ChaCha20Rng,
        mut on_step: impl FnMut(u64, &dpsgd::StepStats),
    ) -> Result<RoundStats, TrainError> {
        let start = Instant::now();
        let expected_batch = dp.sampling_rate * records.len() as f64;
        if records.is_empty() || expected_batch.is_nan() || expected_batch <= 0.0 {
            return Err(TrainError::InvalidConfig(
                "DP-SGD needs training sequences and a positive sampling rate".into(),
            ));
        }
        let (mut loss_sum, mut sampled_total) = (0.0, 0u64);
        for i in 0..steps {
            let step = global_step_start + i;
            let stats = self.private_step(step, records, dp, expected_batch, rng)?;
            if stats.sampled > 0 {
                loss_sum += stats.mean_loss * stats.sampled as f64;
                sampled_total += stats.sampled as u64;
            }
            on_step(step, &stats);
        }
        Ok(RoundStats {
            mean_loss: loss_sum / sampled_total as f64,
            tokens: sampled_total * self.train_cfg.seq_len as u64,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// One DP-SGD step: sample, clip, sum, noise, average, then the optimizer's step. The
    /// gradient clipping of [`TrainConfig::grad_clip`] is not applied: each sequence is
    /// already clipped, and clipping the noised mean would only rescale the noise.
    fn private_step(
        &mut self,
        step: u64,
        records: &[Vec<i64>],
        dp: &DpSgdConfig,
        expected_batch: f64,
        rng: &mut ChaCha20Rng,
    ) -> Result<dpsgd::StepStats, TrainError> {
        if self.opt.is_none() {
            self.opt = Some(self.build_optimizer()?);
        }
        let width = (self.train_cfg.seq_len + 1) as i64;
        let rows = self.train_cfg.batch_size;
        let oom = |e| classify_error(e, &self.model_cfg, self.device, rows as i64, width - 1);
        dpsgd::zero_grads(&self.vs).map_err(oom)?;
        let sample = dpsgd::poisson_sample(records.len(), dp.sampling_rate, rng);
        let (mut loss_sum, mut clipped) = (0.0, 0);
        for chunk in sample.chunks(rows) {
            let flat: Vec<i64> = chunk
                .iter()
                .flat_map(|&r| records[r].iter().copied())
                .collect();
            let batch = self.batch_on_device(&flat, chunk.len()).map_err(oom)?;
            let (sum, n) =
                dpsgd::accumulate_clipped(&self.model, &self.vs, &batch, dp.clip_norm, dp.method)?;
            loss_sum += sum;
            clipped += n;
        }
        let mean_loss = loss_sum / sample.len() as f64;
        if !sample.is_empty() && !mean_loss.is_finite() {
            return Err(TrainError::Diverged {
                step,
                loss: mean_loss,
            });
        }
        dpsgd::noise_and_average(&self.vs, dp, expected_batch, rng).map_err(oom)?;
        let lr = self.train_cfg.lr_at(step);
        let opt = self
            .opt
            .as_mut()
            .ok_or_else(|| TrainError::InvalidConfig("optimizer could not be created".into()))?;
        opt.set_lr(lr);
        optimizer_step(opt, 0.0).map_err(|e| self.step_failed(e))?;
        Ok(dpsgd::StepStats {
            sampled: sample.len(),
            mean_loss,
            clipped,
        })
    }

    /// `rows` equal-length blocks, concatenated in `flat`, as an int64 `[rows, width]` tensor
    /// on the trainer's device.
    fn batch_on_device(&self, flat: &[i64], rows: usize) -> Result<Tensor, tch::TchError> {
        Tensor::f_from_slice(flat)?
            .f_reshape([rows as i64, -1])?
            .f_to_device(self.device)
    }

    /// The error of a failed optimizer step, recognising allocation failures.
    fn step_failed(&self, text: String) -> TrainError {
        let b = self.train_cfg.batch_size as i64;
        let t = self.train_cfg.seq_len as i64;
        classify_error(
            tch::TchError::Torch(text),
            &self.model_cfg,
            self.device,
            b,
            t,
        )
        .into()
    }

    fn build_optimizer(&self) -> Result<nn::Optimizer, TrainError> {
        let oom = |e| classify_error(e, &self.model_cfg, self.device, 0, 0);
        let mut opt = nn::adamw(0.9, 0.95, self.train_cfg.weight_decay)
            .build(&self.vs, self.train_cfg.lr)
            .map_err(oom)?;
        // Group 1 holds the norm weights (see Llama::new), which are not decayed.
        opt.set_weight_decay_group(1, 0.0);
        Ok(opt)
    }

    /// Mean next-token loss over `blocks` (each `seq_len + 1` tokens), without gradients.
    pub fn evaluate(&self, blocks: &[Vec<i64>]) -> Result<f64, TrainError> {
        if blocks.is_empty() {
            return Err(TrainError::NoValidationData);
        }
        let _guard = tch::no_grad_guard();
        let mut sum = 0.0;
        for chunk in blocks.chunks(self.train_cfg.batch_size) {
            let width = chunk[0].len();
            if chunk.iter().any(|b| b.len() != width) {
                return Err(TrainError::InvalidConfig(
                    "validation blocks differ in length".into(),
                ));
            }
            let flat: Vec<i64> = chunk.iter().flatten().copied().collect();
            let (b, t) = (chunk.len() as i64, width as i64);
            let oom = |e| classify_error(e, &self.model_cfg, self.device, b, t - 1);
            let batch = self.batch_on_device(&flat, chunk.len()).map_err(oom)?;
            let loss = self.model.loss(&batch)?.f_double_value(&[]).map_err(oom)?;
            sum += loss * chunk.len() as f64;
        }
        Ok(sum / blocks.len() as f64)
    }

    /// The pseudo-gradient θ_global − θ_local in canonical order.
    pub fn delta(&self, global_flat: &[f32]) -> Result<Vec<f32>, TrainError> {
        let local = checkpoint::flat_parameters(&self.vs)?;
        if local.len() != global_flat.len() {
            return Err(TrainError::LengthMismatch {
                expected: local.len(),
                found: global_flat.len(),
            });
        }
        Ok(global_flat.iter().zip(&local).map(|(g, l)| g - l).collect())
    }

    /// The current weights as a checkpoint.
    pub fn save_checkpoint(&self) -> Result<Vec<u8>, TrainError> {
        Ok(checkpoint::save(&self.vs, &self.model_cfg)?)
    }
}

/// Clips the gradients' global norm to `clip` (0: not at all) and steps. tch's clip and step
/// panic on LibTorch errors; they are caught so that an allocation failure becomes the same
/// out-of-memory error as in the forward pass.
fn optimizer_step(opt: &mut nn::Optimizer, clip: f64) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| {
        if clip > 0.0 {
            opt.clip_grad_norm(clip);
        }
        opt.step();
    }))
    .map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "optimizer step failed".to_owned())
    })
}

/// Centralized baseline: trains `trainer` for `steps` optimizer steps on the union of `sites`
/// (each micro-batch takes its rows from the sites in turn), with the trainer's schedule starting
/// at global step 0, and evaluates on `val_blocks` before training, every `eval_every` steps and
/// at the end. Returns the curve as (training tokens seen, validation loss), also passed to
/// `on_eval` as it is measured.
pub fn train_centralized(
    trainer: &mut LocalTrainer,
    sites: &mut [BlockStream],
    steps: u64,
    eval_every: u64,
    val_blocks: &[Vec<i64>],
    mut on_eval: impl FnMut(u64, f64),
) -> Result<Vec<(u64, f64)>, TrainError> {
    if sites.is_empty() {
        return Err(TrainError::InvalidConfig(
            "centralized training needs at least one site".into(),
        ));
    }
    let batch = trainer.train_cfg.batch_size;
    let per_step = trainer.train_cfg.tokens_per_step();
    let mut curve = Vec::new();
    let mut record = |tokens: u64, trainer: &LocalTrainer| -> Result<(), TrainError> {
        let loss = trainer.evaluate(val_blocks)?;
        on_eval(tokens, loss);
        curve.push((tokens, loss));
        Ok(())
    };
    record(0, trainer)?;
    let mut row = 0usize;
    for step in 0..steps {
        trainer.train_step(step, || {
            let mut flat = Vec::new();
            for _ in 0..batch {
                let n = sites.len();
                flat.extend(sites[row % n].next_block()?);
                row += 1;
            }
            let width = (flat.len() / batch) as i64;
            // Every block has the same length, so the reshape cannot fail.
            Ok(Tensor::from_slice(&flat).reshape([batch as i64, width]))
        })?;
        let done = step + 1;
        if done == steps || (eval_every > 0 && done % eval_every == 0) {
            record(done * per_step, trainer)?;
        }
    }
    Ok(curve)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_floor() {
        let cfg = TrainConfig {
            lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
            ..Default::default()
        };
        assert!((cfg.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((cfg.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((cfg.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((cfg.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((cfg.lr_at(110) - 0.1).abs() < 1e-12);
        assert!((cfg.lr_at(10_000) - 0.1).abs() < 1e-12);
        assert!((10..110).all(|s| cfg.lr_at(s + 1) <= cfg.lr_at(s)));
    }

    #[test]
    fn invalid_train_configs_are_rejected() {
        assert!(
            TrainConfig {
                grad_accum: 0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            TrainConfig {
                min_lr_ratio: 1.5,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(TrainConfig::default().validate().is_ok());
    }
}
