//! Record-level differential privacy in local training (DP-SGD): every local step samples each
//! of the site's training sequences independently with probability `q` (Poisson sampling),
//! clips each sampled sequence's gradient to L2 norm `C`, sums, adds Gaussian noise of
//! standard deviation `σ·C` to every coordinate, and divides by the expected batch `q·N`.
//! The optimizer only ever sees that noised mean, so each step is the subsampled Gaussian
//! mechanism that [`quorum_policies::rdp`] accounts, whatever happens to the update later.
//!
//! The unit of privacy is one training sequence (a packed block of `seq_len + 1` tokens): a
//! document spanning several blocks is protected as a group of that many records.
//!
//! Per-sequence gradient norms come from the activations and output gradients each parameter
//! saw ("ghost" norms), never from per-sequence gradients:
//!
//! ```text
//! linear  y = a·Wᵀ:    ‖∇W_i‖² = ⟨a_i a_iᵀ, g_i g_iᵀ⟩            (T×T per sequence)
//! embedding y = E[x]:  ‖∇E_i‖² = Σ_{t,s} [x_t = x_s] g_t·g_s
//! RMSNorm scale y = n⊙w: ‖∇w_i‖² = ‖Σ_t g_t ⊙ n_t‖²
//! tied head (E used by the embedding, gradient e, and the head, input h, gradient G):
//!                      ‖∇E_i‖² = ‖emb‖² + ‖head‖² + 2 Σ_{t,s} G[s, x_t] (h_s·e_t)
//! ```
//!
//! where `g` is the gradient of the summed sequence losses with respect to the layer's output.
//! One backward pass to the layers' outputs gives every norm; a second, of the losses weighted
//! by their clip factors, gives the clipped sum in the parameters' gradients. Computing each
//! sequence's gradient alone ([`NormMethod::MicroBatch`]) is the reference the ghost norms are
//! tested against, and a fallback.
//!
//! The noise comes from LibTorch's generator, reseeded every step from a ChaCha20 stream that
//! the site seeds from the operating system. It is floating-point Gaussian noise, as in every
//! DP-SGD implementation; the site-level discrete mechanism on the update stays on beside it.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tch::{Kind, TchError, Tensor, nn};

use crate::model::{Llama, ModelError, Tap};

/// How per-sequence gradient norms are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormMethod {
    /// From each layer's activations and output gradients, two backward passes per batch.
    Ghost,
    /// One backward pass per sequence: exact by construction, slow.
    MicroBatch,
}

/// DP-SGD settings of one site (its `[record_dp]` policy).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpSgdConfig {
    /// Probability `q` that a step samples any one training sequence.
    pub sampling_rate: f64,
    /// Noise standard deviation as a multiple `σ` of the clipping norm.
    pub noise_multiplier: f64,
    /// Largest L2 norm `C` a sequence's gradient may contribute.
    pub clip_norm: f64,
    /// How per-sequence norms are computed.
    pub method: NormMethod,
}

/// What one DP-SGD step saw, for logs and tests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Sequences the Poisson sample drew.
    pub sampled: usize,
    /// Mean loss of the sampled sequences (NaN when none was drawn).
    pub mean_loss: f64,
    /// Sampled sequences whose gradient was scaled down to the clipping norm.
    pub clipped: usize,
}

/// Draws a Poisson sample: each index of `0..records` independently with probability `q`.
pub fn poisson_sample(records: usize, q: f64, rng: &mut ChaCha20Rng) -> Vec<usize> {
    (0..records).filter(|_| rng.random::<f64>() < q).collect()
}

/// The sequences' losses `[B]` (their graph kept for a second backward) and each parameter's
/// per-sequence squared gradient norms `[B]`, from one forward and one backward pass.
pub fn ghost_squared_norms(
    model: &Llama,
    tokens: &Tensor,
) -> Result<(Tensor, BTreeMap<String, Tensor>), ModelError> {
    let mut taps = Vec::new();
    let losses = model.sequence_losses_with_taps(tokens, &mut taps)?;
    let outputs: Vec<&Tensor> = taps.iter().map(tap_output).collect();
    let grads = Tensor::f_run_backward(&[losses.f_sum(Kind::Float)?], &outputs, true, false)?;
    let mut uses: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, tap) in taps.iter().enumerate() {
        uses.entry(tap_param(tap)).or_default().push(i);
    }
    let mut norms = BTreeMap::new();
    for (param, at) in uses {
        let squared = match at[..] {
            [i] => tap_squared_norms(&taps[i], &grads[i])?,
            [i, j] => tied_squared_norms((&taps[i], &grads[i]), (&taps[j], &grads[j]))?,
            _ => {
                return Err(ModelError::InvalidConfig(format!(
                    "parameter {param} is used {} times in one forward pass; per-sequence \
                     norms support one use, or an embedding tied to the output head",
                    at.len()
                )));
            }
        };
        norms.insert(param.to_owned(), squared);
    }
    Ok((losses, norms))
}

/// Each parameter's per-sequence squared gradient norms, one backward pass per sequence (the
/// reference for [`ghost_squared_norms`]). Leaves the gradients of the last sequence in `vs`.
pub fn micro_batch_squared_norms(
    model: &Llama,
    vs: &nn::VarStore,
    tokens: &Tensor,
) -> Result<BTreeMap<String, Vec<f64>>, ModelError> {
    let vars = vs.variables();
    let mut norms: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    each_sequence_alone(model, vs, tokens, |_| {
        for (name, var) in &vars {
            norms
                .entry(name.clone())
                .or_default()
                .push(squared_norm(&var.grad())?);
        }
        Ok(())
    })?;
    Ok(norms)
}

/// Runs one backward pass per sequence of `tokens`, calling `each(loss)` while `vs`'s
/// gradients hold that sequence's gradient alone.
fn each_sequence_alone(
    model: &Llama,
    vs: &nn::VarStore,
    tokens: &Tensor,
    mut each: impl FnMut(f64) -> Result<(), TchError>,
) -> Result<(), ModelError> {
    for row in 0..tokens.size()[0] {
        zero_grads(vs)?;
        let loss = model.loss(&tokens.f_narrow(0, row, 1)?)?;
        let value = loss.f_double_value(&[])?;
        loss.f_backward()?;
        each(value)?;
    }
    Ok(())
}

/// Computes the clipped sum of the gradients of `tokens`' sequences into `vs`'s gradients
/// (added to what is there); returns (sum of the sequences' losses, number clipped).
pub fn accumulate_clipped(
    model: &Llama,
    vs: &nn::VarStore,
    tokens: &Tensor,
    clip_norm: f64,
    method: NormMethod,
) -> Result<(f64, usize), ModelError> {
    match method {
        NormMethod::Ghost => {
            let (losses, norms) = ghost_squared_norms(model, tokens)?;
            let total = norms
                .values()
                .try_fold(Tensor::f_zeros_like(&losses)?, |acc, n| acc.f_add(n))?;
            let factors = clip_factors(&total, clip_norm)?;
            let clipped = total.f_gt(clip_norm * clip_norm)?.f_sum(Kind::Int64)?;
            losses.f_mul(&factors)?.f_sum(Kind::Float)?.f_backward()?;
            Ok((
                losses.f_sum(Kind::Double)?.f_double_value(&[])?,
                usize::try_from(clipped.f_int64_value(&[])?).unwrap_or(0),
            ))
        }
        NormMethod::MicroBatch => {
            let vars: Vec<Tensor> = vs.trainable_variables();
            // Start from what the caller accumulated, then add one clipped sequence at a time.
            let mut sums = vars
                .iter()
                .map(|v| match v.grad() {
                    g if g.defined() => g.f_detach_copy(),
                    _ => v.f_zeros_like(),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let (mut loss_sum, mut clipped) = (0.0, 0);
            each_sequence_alone(model, vs, tokens, |loss| {
                loss_sum += loss;
                let squared = vars.iter().try_fold(0.0, |acc, v| {
                    Ok::<_, TchError>(acc + squared_norm(&v.grad())?)
                })?;
                let factor = (clip_norm / squared.sqrt().max(f64::MIN_POSITIVE)).min(1.0);
                clipped += usize::from(factor < 1.0);
                for (sum, v) in sums.iter_mut().zip(&vars) {
                    *sum = sum.f_add(&v.grad().f_mul_scalar(factor)?)?;
                }
                Ok(())
            })?;
            let _guard = tch::no_grad_guard();
            for (sum, v) in sums.iter().zip(&vars) {
                v.grad().f_copy_(sum)?;
            }
            Ok((loss_sum, clipped))
        }
    }
}

/// Turns the clipped sum in `vs`'s gradients into the noised mean the optimizer steps on:
/// `(sum + N(0, σ²C²)) / (q·N)`, the noise drawn under a seed taken from `rng`.
pub fn noise_and_average(
    vs: &nn::VarStore,
    config: &DpSgdConfig,
    expected_batch: f64,
    rng: &mut ChaCha20Rng,
) -> Result<(), TchError> {
    tch::manual_seed(rng.random::<i64>());
    if vs.device().is_cuda() {
        tch::Cuda::manual_seed(rng.random::<u64>());
    }
    let std = config.noise_multiplier * config.clip_norm;
    let _guard = tch::no_grad_guard();
    for var in vs.trainable_variables() {
        let mut grad = var.grad();
        let noise = grad.f_randn_like()?.f_mul_scalar(std)?;
        let _ = grad.f_add_(&noise)?;
        let _ = grad.f_div_scalar_(expected_batch)?;
    }
    Ok(())
}

/// A fresh ChaCha20 stream for sampling and noise, seeded by the operating system.
pub fn private_rng() -> ChaCha20Rng {
    ChaCha20Rng::from_os_rng()
}

/// Sets every gradient of `vs` to zero (defining it where no backward pass has yet).
pub fn zero_grads(vs: &nn::VarStore) -> Result<(), TchError> {
    for var in vs.trainable_variables() {
        let mut grad = var.grad();
        if grad.defined() {
            let _guard = tch::no_grad_guard();
            let _ = grad.f_zero_()?;
        } else {
            // Defines the gradient: a backward pass of zero into the variable.
            var.f_mul_scalar(0.0)?.f_sum(Kind::Float)?.f_backward()?;
        }
    }
    Ok(())
}

/// `‖x‖²`, summed in double precision.
fn squared_norm(x: &Tensor) -> Result<f64, TchError> {
    x.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])
}

/// `min(1, C / ‖g_i‖)` for squared norms `[B]`.
fn clip_factors(squared: &Tensor, clip_norm: f64) -> Result<Tensor, TchError> {
    squared
        .f_sqrt()?
        .f_clamp_min(f64::from(f32::MIN_POSITIVE))?
        .f_reciprocal()?
        .f_mul_scalar(clip_norm)?
        .f_clamp_max(1.0)?
        .f_detach()
}

fn tap_output(tap: &Tap) -> &Tensor {
    match tap {
        Tap::Linear { output, .. } | Tap::Embedding { output, .. } | Tap::Scale { output, .. } => {
            output
        }
    }
}

fn tap_param(tap: &Tap) -> &str {
    match tap {
        Tap::Linear { param, .. } | Tap::Embedding { param, .. } | Tap::Scale { param, .. } => {
            param
        }
    }
}

/// Per-sequence squared norm `[B]` of the gradient one use of a parameter received, given the
/// gradient `grad` with respect to that use's output.
fn tap_squared_norms(tap: &Tap, grad: &Tensor) -> Result<Tensor, TchError> {
    let g = grad.f_to_kind(Kind::Float)?;
    match tap {
        Tap::Linear { input, .. } => {
            let a = input.f_to_kind(Kind::Float)?;
            gram(&a)?
                .f_mul(&gram(&g)?)?
                .f_sum_dim_intlist(&[1i64, 2][..], false, Kind::Float)
        }
        Tap::Embedding { tokens, .. } => same_token(tokens)?.f_mul(&gram(&g)?)?.f_sum_dim_intlist(
            &[1i64, 2][..],
            false,
            Kind::Float,
        ),
        Tap::Scale { normalized, .. } => g
            .f_mul(normalized)?
            .f_sum_dim_intlist(&[1i64][..], false, Kind::Float)?
            .f_square()?
            .f_sum_dim_intlist(&[1i64][..], false, Kind::Float),
    }
}

/// A matrix used twice: the token embedding and the output head tied to it.
fn tied_squared_norms(first: (&Tap, &Tensor), second: (&Tap, &Tensor)) -> Result<Tensor, TchError> {
    let ((Tap::Embedding { tokens, .. }, e), (Tap::Linear { input: h, .. }, g)) = (first, second)
    else {
        return Err(TchError::Kind(
            "a shared parameter must be the embedding first and the head second".into(),
        ));
    };
    let (e, g, h) = (
        e.f_to_kind(Kind::Float)?,
        g.f_to_kind(Kind::Float)?,
        h.f_to_kind(Kind::Float)?,
    );
    let own =
        tap_squared_norms(first.0, first.1)?.f_add(&tap_squared_norms(second.0, second.1)?)?;
    // cross[b] = Σ_{s,t} G[b, s, x[b, t]] · (h[b, s] · e[b, t])
    let t = tokens.size()[1];
    let index = tokens.f_unsqueeze(1)?.f_expand([-1, t, -1], false)?;
    let picked = g.f_gather(2, &index, false)?;
    let cross = picked
        .f_mul(&h.f_bmm(&e.f_transpose(1, 2)?)?)?
        .f_sum_dim_intlist(&[1i64, 2][..], false, Kind::Float)?;
    own.f_add(&cross.f_mul_scalar(2.0)?)
}

/// `x xᵀ` per sequence: `[B, T, k]` → `[B, T, T]`.
fn gram(x: &Tensor) -> Result<Tensor, TchError> {
    x.f_bmm(&x.f_transpose(1, 2)?)
}

/// `[B, T, T]`, 1 where two positions hold the same token.
fn same_token(tokens: &Tensor) -> Result<Tensor, TchError> {
    tokens
        .f_unsqueeze(2)?
        .f_eq_tensor(&tokens.f_unsqueeze(1)?)?
        .f_to_kind(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use crate::train::{LocalTrainer, TrainConfig};

    /// A tiny model with a small vocabulary, so that sequences repeat tokens (the embedding's
    /// same-token terms) and the tied head's cross term is exercised.
    fn trainer(tie: bool) -> LocalTrainer {
        let mut cfg = ModelConfig::preset("tiny", 48).unwrap();
        cfg.tie_embeddings = tie;
        let train = TrainConfig {
            batch_size: 4,
            seq_len: 24,
            mixed_precision: false,
            ..TrainConfig::default()
        };
        LocalTrainer::new(cfg, train, tch::Device::Cpu, 7).unwrap()
    }

    fn tokens(rows: i64, seed: u64) -> Tensor {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let flat: Vec<i64> = (0..rows * 25).map(|_| rng.random_range(0..48)).collect();
        Tensor::from_slice(&flat).reshape([rows, 25])
    }

    fn assert_ghost_equals_micro_batch(tie: bool) {
        let t = trainer(tie);
        let batch = tokens(4, 1);
        let (_, ghost) = ghost_squared_norms(t.model(), &batch).unwrap();
        let micro = micro_batch_squared_norms(t.model(), t.var_store(), &batch).unwrap();
        let names: Vec<&String> = ghost.keys().collect();
        assert_eq!(
            names,
            micro.keys().collect::<Vec<_>>(),
            "every parameter is covered"
        );
        let kinds = [
            "embed_tokens",
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
        ];
        let kinds = kinds
            .iter()
            .chain(&["up_proj", "down_proj", "layernorm", "model.norm"]);
        for kind in kinds {
            assert!(names.iter().any(|n| n.contains(kind)), "{kind} is checked");
        }
        for (name, expected) in &micro {
            let got = Vec::<f64>::try_from(ghost[name].to_kind(Kind::Double)).unwrap();
            for (g, e) in got.iter().zip(expected) {
                assert!(
                    (g - e).abs() <= 1e-4 * e.abs() + 1e-10,
                    "{name}: ghost {g} vs micro-batch {e}"
                );
            }
        }
    }

    #[test]
    fn dpsgd_ghost_norms_equal_micro_batch_norms_with_a_tied_head() {
        assert_ghost_equals_micro_batch(true);
    }

    #[test]
    fn dpsgd_ghost_norms_equal_micro_batch_norms_with_an_untied_head() {
        assert_ghost_equals_micro_batch(false);
    }

    fn flat_grads(vs: &nn::VarStore) -> Vec<f64> {
        let mut vars: Vec<_> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars.iter()
            .flat_map(|(_, v)| {
                Vec::<f64>::try_from(v.grad().flatten(0, -1).to_kind(Kind::Double)).unwrap()
            })
            .collect()
    }

    /// The clipped sum of a batch, by `method`, after zeroing the gradients.
    fn clipped_sum(t: &LocalTrainer, batch: &Tensor, clip: f64, method: NormMethod) -> Vec<f64> {
        zero_grads(t.var_store()).unwrap();
        accumulate_clipped(t.model(), t.var_store(), batch, clip, method).unwrap();
        flat_grads(t.var_store())
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn dpsgd_ghost_clipping_gives_the_micro_batch_clipped_sum() {
        let t = trainer(true);
        let batch = tokens(4, 2);
        let micro = micro_batch_squared_norms(t.model(), t.var_store(), &batch).unwrap();
        let norms: Vec<f64> = (0..4)
            .map(|i| micro.values().map(|n| n[i]).sum::<f64>().sqrt())
            .collect();
        // A norm between the smallest and the largest clips some sequences and not others.
        let clip = norms.iter().sum::<f64>() / 4.0;
        assert!(norms.iter().any(|&n| n < clip) && norms.iter().any(|&n| n > clip));
        let ghost = clipped_sum(&t, &batch, clip, NormMethod::Ghost);
        let reference = clipped_sum(&t, &batch, clip, NormMethod::MicroBatch);
        let scale = reference.iter().fold(0.0, |m: f64, x| m.max(x.abs()));
        assert!(max_abs_diff(&ghost, &reference) <= 1e-4 * scale);
        // The clipped sum's norm is at most the batch times the clipping norm.
        let norm = ghost.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(norm <= 4.0 * clip * (1.0 + 1e-5), "{norm}");
        // With a clipping norm no sequence reaches, the clipped sum is the plain summed gradient.
        let unclipped = clipped_sum(&t, &batch, 1e6, NormMethod::Ghost);
        zero_grads(t.var_store()).unwrap();
        t.model()
            .loss(&batch)
            .unwrap()
            .multiply_scalar(4.0)
            .backward();
        let plain = flat_grads(t.var_store());
        assert!(max_abs_diff(&unclipped, &plain) <= 1e-4 * scale);
    }

    #[test]
    fn dpsgd_noised_mean_has_the_expected_distribution() {
        let t = trainer(true);
        let batch = tokens(4, 3);
        let config = DpSgdConfig {
            sampling_rate: 0.01,
            noise_multiplier: 1.3,
            clip_norm: 0.5,
            method: NormMethod::Ghost,
        };
        let expected_batch = 4.0;
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let mean_of = |rng: &mut ChaCha20Rng, noise: f64| {
            let clipped = clipped_sum(&t, &batch, config.clip_norm, config.method);
            let c = DpSgdConfig {
                noise_multiplier: noise,
                ..config
            };
            noise_and_average(t.var_store(), &c, expected_batch, rng).unwrap();
            (clipped, flat_grads(t.var_store()))
        };
        let (clipped, quiet) = mean_of(&mut rng, 0.0);
        // Noise off: the mean is the clipped sum over the expected batch.
        let scale = clipped.iter().fold(0.0, |m: f64, x| m.max(x.abs()));
        let off: Vec<f64> = clipped.iter().map(|x| x / expected_batch).collect();
        assert!(max_abs_diff(&quiet, &off) <= 1e-6 * scale);
        // Noise on: (mean − clipped sum / B) · B / (σC) is standard normal, coordinate-wise.
        let (_, noisy) = mean_of(&mut rng, config.noise_multiplier);
        let std = config.noise_multiplier * config.clip_norm;
        let z: Vec<f64> = noisy
            .iter()
            .zip(&off)
            .map(|(n, o)| (n - o) * expected_batch / std)
            .collect();
        let d = z.len() as f64;
        let mean = z.iter().sum::<f64>() / d;
        let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / d;
        let kurtosis = z.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / d / var.powi(2);
        let within_one = z.iter().filter(|x| x.abs() < 1.0).count() as f64 / d;
        // Five standard errors each, at d of about 4·10⁵.
        assert!(mean.abs() < 5.0 / d.sqrt(), "mean {mean}");
        assert!((var - 1.0).abs() < 5.0 * (2.0 / d).sqrt(), "variance {var}");
        assert!(
            (kurtosis - 3.0).abs() < 5.0 * (24.0 / d).sqrt(),
            "kurtosis {kurtosis}"
        );
        assert!(
            (within_one - 0.682_689).abs() < 5.0 * (0.2167 / d).sqrt(),
            "{within_one}"
        );
        // A second draw differs: the seed advances with the stream.
        let (_, again) = mean_of(&mut rng, config.noise_multiplier);
        assert!(max_abs_diff(&again, &noisy) > std / expected_batch);
    }

    #[test]
    fn dpsgd_poisson_sample_draws_each_record_at_the_sampling_rate() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let (n, q) = (200_000, 0.01);
        let sample = poisson_sample(n, q, &mut rng);
        let sd = (n as f64 * q * (1.0 - q)).sqrt();
        assert!(
            (sample.len() as f64 - n as f64 * q).abs() < 5.0 * sd,
            "{}",
            sample.len()
        );
        assert!(sample.windows(2).all(|w| w[0] < w[1]));
        assert!(poisson_sample(n, 0.0, &mut rng).is_empty());
        assert_eq!(poisson_sample(10, 1.0, &mut rng).len(), 10);
    }
}
