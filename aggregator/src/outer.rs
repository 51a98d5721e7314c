//! Outer optimizers: how the averaged pseudo-gradient Δ̄ = mean(θ_global − θ_local) moves the
//! global model. Pure functions over flat vectors; the state (momentum, second moments) is saved
//! with each checkpoint so a restarted aggregator continues exactly.

/// The optimizer and its hyper-parameters, as `federation.toml` states them: one definition,
/// matched exhaustively, so a new optimizer cannot silently run as another.
pub use quorum_policies::config::federation::OuterOptimizer;

/// Optimizer state carried between rounds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OuterState {
    /// First moment / momentum buffer (empty until the first step).
    pub momentum: Vec<f32>,
    /// Second moment (FedAdam only).
    pub second_moment: Vec<f32>,
}

/// One outer step of an [`OuterOptimizer`] over the flat model.
pub trait OuterStep {
    /// Applies one outer step in place. `delta` is the averaged pseudo-gradient.
    fn step(&self, params: &mut [f32], delta: &[f32], state: &mut OuterState);
}

impl OuterStep for OuterOptimizer {
    // Hyper-parameters are kept in f64 as configured and applied in the model's f32.
    #[allow(clippy::cast_possible_truncation)]
    fn step(&self, params: &mut [f32], delta: &[f32], state: &mut OuterState) {
        assert_eq!(
            params.len(),
            delta.len(),
            "caller checks lengths against the model"
        );
        let ensure = |buf: &mut Vec<f32>| {
            if buf.len() != delta.len() {
                *buf = vec![0.0; delta.len()];
            }
        };
        match *self {
            Self::FedAvg { lr } => {
                let lr = lr as f32;
                for (p, d) in params.iter_mut().zip(delta) {
                    *p -= lr * d;
                }
            }
            Self::FedMom { lr, momentum } => {
                let (lr, momentum) = (lr as f32, momentum as f32);
                ensure(&mut state.momentum);
                for ((p, d), m) in params.iter_mut().zip(delta).zip(&mut state.momentum) {
                    *m = momentum * *m + d;
                    *p -= lr * *m;
                }
            }
            Self::Nesterov { lr, momentum } => {
                let (lr, momentum) = (lr as f32, momentum as f32);
                ensure(&mut state.momentum);
                for ((p, d), m) in params.iter_mut().zip(delta).zip(&mut state.momentum) {
                    *m = momentum * *m + d;
                    *p -= lr * (d + momentum * *m);
                }
            }
            Self::FedAdam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                let (lr, beta1, beta2, eps) = (lr as f32, beta1 as f32, beta2 as f32, eps as f32);
                ensure(&mut state.momentum);
                ensure(&mut state.second_moment);
                let moments = state.momentum.iter_mut().zip(&mut state.second_moment);
                for ((p, d), (m, v)) in params.iter_mut().zip(delta).zip(moments) {
                    *m = beta1 * *m + (1.0 - beta1) * d;
                    *v = beta2 * *v + (1.0 - beta2) * d * d;
                    *p -= lr * *m / (v.sqrt() + eps);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(opt: OuterOptimizer, deltas: &[[f32; 2]]) -> Vec<f32> {
        let mut params = vec![1.0, -1.0];
        let mut state = OuterState::default();
        for d in deltas {
            opt.step(&mut params, d, &mut state);
        }
        params
    }

    fn close(a: &[f32], b: &[f32]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} != {b:?}");
        }
    }

    #[test]
    fn fedavg_with_unit_lr_is_model_averaging() {
        // θ − (θ − mean local) = mean local.
        close(
            &run(OuterOptimizer::FedAvg { lr: 1.0 }, &[[0.5, -0.25]]),
            &[0.5, -0.75],
        );
    }

    #[test]
    fn fedmom_by_hand() {
        // m1 = 1; θ = 1 − 0.5 = 0.5. m2 = 0.9 + 1 = 1.9; θ = 0.5 − 0.95 = −0.45.
        let p = run(
            OuterOptimizer::FedMom {
                lr: 0.5,
                momentum: 0.9,
            },
            &[[1.0, 0.0], [1.0, 0.0]],
        );
        close(&p, &[-0.45, -1.0]);
    }

    #[test]
    fn nesterov_by_hand() {
        // m1 = 1; θ = 1 − 0.7·(1 + 0.7) = −0.19. m2 = 0.7 + 1 = 1.7; θ = −0.19 − 0.7·(1 + 1.19).
        let p = run(
            OuterOptimizer::Nesterov {
                lr: 0.7,
                momentum: 0.7,
            },
            &[[1.0, 0.0], [1.0, 0.0]],
        );
        close(&p, &[-0.19 - 0.7 * 2.19, -1.0]);
    }

    #[test]
    fn fedadam_by_hand() {
        // m = 0.1·2 = 0.2; v = 0.01·4 = 0.04; θ = 1 − 0.1·0.2/(0.2 + 1e-3).
        let opt = OuterOptimizer::FedAdam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-3,
        };
        close(&run(opt, &[[2.0, 0.0]]), &[1.0 - 0.1 * 0.2 / 0.201, -1.0]);
    }
}
