//! What a site contributes to a round. The protocol around it (admission, download, DP
//! encoding, secure aggregation, audit) is the same whatever produces the update, so the
//! session drives any [`Participant`]: the LibTorch trainer in production, a synthetic one in
//! load tests and benchmarks.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use quorum_proto::v1 as pb;

use quorum_policies::config::site::RecordDp;
use rand_chacha::ChaCha20Rng;

use crate::{
    checkpoint,
    data::{BlockStream, TextSource},
    dpsgd::{self, DpSgdConfig, NormMethod},
    model::ModelConfig,
    tokenizer::Tokenizer,
    train::{LocalTrainer, TrainConfig},
};

/// How often an unattended site says how its training goes.
const PROGRESS_LINE_EVERY: Duration = Duration::from_secs(30);

pub use quorum_round::TrainedUpdate as LocalUpdate;

/// Produces a site's contribution to a round.
pub trait Participant {
    /// Loads the global model and returns its validation loss on this site's data.
    fn load_and_evaluate(&mut self, config: &pb::RoundConfig, model: &[u8]) -> anyhow::Result<f64>;
    /// Trains from the loaded global model and returns the update, counting the local steps
    /// taken in `done` (the site's heartbeats report it).
    fn train(
        &mut self,
        config: &pb::RoundConfig,
        site: &str,
        done: &AtomicU32,
    ) -> anyhow::Result<LocalUpdate>;
}

/// DP-SGD settings of a site that protects each record (its `[record_dp]` policy).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrivateTraining {
    /// Sampling, clipping and noise.
    pub config: DpSgdConfig,
    /// δ of the record-level ε: it must stay below 1 / (training records).
    pub delta: f64,
}

impl PrivateTraining {
    /// The site policy's `[record_dp]`, with ghost norms.
    pub fn from_policy(record: &RecordDp) -> Self {
        Self {
            config: DpSgdConfig {
                sampling_rate: record.sampling_rate,
                noise_multiplier: record.noise_multiplier,
                clip_norm: record.clip_norm,
                method: NormMethod::Ghost,
            },
            delta: record.delta.get(),
        }
    }
}

/// DP-SGD state kept across rounds: the records sampled from and the secret random stream.
struct PrivateState {
    settings: PrivateTraining,
    records: Vec<Vec<i64>>,
    rng: ChaCha20Rng,
}

/// Local pre-training with LibTorch on the site's own data.
pub struct TchParticipant {
    data_spec: String,
    device: tch::Device,
    seed: u64,
    validation_blocks: usize,
    trainer: Option<LocalTrainer>,
    data: Option<BlockStream>,
    validation: Vec<Vec<i64>>,
    global_flat: Vec<f32>,
    /// Global step and data position at the start of the last local training.
    last_start: Option<(u64, u64)>,
    /// DP-SGD, for a site with `[record_dp]`; its records are loaded with the data.
    record_dp: Option<PrivateTraining>,
    private: Option<PrivateState>,
}

impl TchParticipant {
    /// A participant reading `data_spec` (a path or `builtin:<flavour>`).
    pub fn new(
        data_spec: String,
        device: tch::Device,
        seed: u64,
        validation_blocks: usize,
    ) -> Self {
        Self {
            data_spec,
            device,
            seed,
            validation_blocks,
            trainer: None,
            data: None,
            validation: Vec::new(),
            global_flat: Vec::new(),
            last_start: None,
            record_dp: None,
            private: None,
        }
    }

    /// Trains with DP-SGD under `settings` instead of plain AdamW steps.
    pub fn with_record_dp(mut self, settings: PrivateTraining) -> Self {
        self.record_dp = Some(settings);
        self
    }

    /// Creates the trainer and data pipeline on first use (or when the settings change).
    fn prepare(&mut self, model_cfg: &ModelConfig, config: &pb::RoundConfig) -> anyhow::Result<()> {
        let train_cfg = TrainConfig {
            batch_size: config.batch_size.max(1) as usize,
            seq_len: config.seq_len.max(1) as usize,
            lr: config.lr,
            warmup_steps: config.warmup_steps,
            total_steps: config.total_steps.max(1),
            reset_optimizer_each_round: config.reset_local_optimizer,
            ..TrainConfig::default()
        };
        let fresh = self.trainer.as_ref().is_none_or(|t| {
            !t.model().config().same_architecture(model_cfg) || *t.train_config() != train_cfg
        });
        if fresh {
            let seq_len = train_cfg.seq_len;
            self.trainer = Some(LocalTrainer::new(
                model_cfg.clone(),
                train_cfg,
                self.device,
                self.seed,
            )?);
            let source = TextSource::open(&self.data_spec)?;
            let tokenizer = Tokenizer::for_vocab(model_cfg.vocab_size)?;
            let stream = BlockStream::new(source, tokenizer, seq_len, self.seed);
            self.validation = stream.validation_blocks(self.validation_blocks)?;
            if self.validation.is_empty() {
                bail!(
                    "the data at {} has no validation documents; add more text",
                    self.data_spec
                );
            }
            self.private = self
                .record_dp
                .map(|settings| private_state(settings, &stream, &self.data_spec))
                .transpose()?;
            self.data = Some(stream);
            self.last_start = None;
        }
        Ok(())
    }
}

impl Participant for TchParticipant {
    fn load_and_evaluate(&mut self, config: &pb::RoundConfig, model: &[u8]) -> anyhow::Result<f64> {
        let (model_cfg, global_flat) = checkpoint::decode(model)?;
        self.prepare(&model_cfg, config)?;
        let trainer = self.trainer.as_mut().context("trainer prepared above")?;
        trainer.load_global(model)?;
        self.global_flat = global_flat;
        Ok(trainer.evaluate(&self.validation)?)
    }

    fn train(
        &mut self,
        config: &pb::RoundConfig,
        site: &str,
        done: &AtomicU32,
    ) -> anyhow::Result<LocalUpdate> {
        let steps = u64::from(config.local_steps);
        let attended = quorum_observe::attended();
        let bar = if attended {
            ProgressBar::new(steps)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} round {msg} [{bar:30}] {pos}/{len} steps {elapsed}",
            )
            .expect("static template is valid")
            .progress_chars("=> "),
        );
        bar.set_prefix(site.to_owned());
        bar.set_message(config.round.to_string());
        let trainer = self
            .trainer
            .as_mut()
            .context("load_and_evaluate runs first")?;
        let data = self.data.as_mut().context("load_and_evaluate runs first")?;
        // A round offered again at the same global step redoes one that never completed
        // (aborted, or the aggregator restarted): train on the same blocks as the first attempt,
        // so a recovered federation follows the path an uninterrupted one would have taken.
        match self.last_start {
            Some((step, position)) if step == config.global_step => data.rewind(position)?,
            _ => self.last_start = Some((config.global_step, data.position())),
        }
        // Training blocks this thread; the connection is driven by the runtime's workers.
        // Unattended, a line every half minute (and at the end) says how training goes.
        let started = Instant::now();
        let mut last_line = started;
        // `detail` says what a DP-SGD step sampled and clipped: a clip fraction near 1 or 0
        // tells the site its clip_norm is far from its gradients' norms.
        let mut on_step = |loss: f64, detail: &str| {
            let step = done.fetch_add(1, Ordering::Relaxed) + 1;
            bar.inc(1);
            bar.set_message(format!("{} loss {loss:.3}{detail}", config.round));
            if !attended && (last_line.elapsed() >= PROGRESS_LINE_EVERY || u64::from(step) == steps)
            {
                last_line = Instant::now();
                let rate = f64::from(step) / started.elapsed().as_secs_f64().max(1e-9);
                quorum_observe::line(&format!(
                    "{site}: round {} training: step {step}/{steps}, loss {loss:.3}{detail}, \
                     {rate:.2} steps/s",
                    config.round
                ));
            }
        };
        let stats = match self.private.as_mut() {
            // The data stream's position is not used: every step samples all records afresh.
            Some(p) => trainer.train_round_private(
                steps,
                config.global_step,
                &p.records,
                &p.settings.config,
                &mut p.rng,
                |_, s| {
                    let detail = format!(", {} sampled, {} clipped", s.sampled, s.clipped);
                    on_step(s.mean_loss, &detail);
                },
            )?,
            None => {
                trainer.train_round(steps, config.global_step, data, |_, loss| on_step(loss, ""))?
            }
        };
        bar.finish_and_clear();
        let val_loss_after = trainer.evaluate(&self.validation)?;
        Ok(LocalUpdate {
            delta: trainer.delta(&self.global_flat)?,
            train_loss: stats.mean_loss,
            val_loss_after,
            tokens: stats.tokens,
            seconds: stats.seconds,
        })
    }
}

/// Loads the records DP-SGD samples from, refusing a δ that does not protect them: with δ at
/// or above 1 / records, a mechanism that publishes one record outright meets the guarantee.
fn private_state(
    settings: PrivateTraining,
    stream: &BlockStream,
    data_spec: &str,
) -> anyhow::Result<PrivateState> {
    let records = stream.training_blocks()?;
    let n = records.len() as f64;
    if settings.delta * n >= 1.0 {
        bail!(
            "record_dp.delta = {} is not below 1 / {} (the training sequences in {data_spec}); \
             set it below {:.1e} in site.toml",
            settings.delta,
            records.len(),
            1.0 / n
        );
    }
    Ok(PrivateState {
        settings,
        records,
        rng: dpsgd::private_rng(),
    })
}
