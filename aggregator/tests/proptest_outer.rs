//! Properties of the outer optimizers over random models, local updates and hyper-parameters.

use proptest::prelude::*;
use quorum_aggregator::outer::{OuterOptimizer, OuterState, OuterStep as _};

/// Parameters and updates of the size real federations see after clipping, zeros included.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![1 => Just(0.0f32), 9 => -1.0e3f32..1.0e3]
}

/// A global model and `sites` local models of the same length.
fn models() -> impl Strategy<Value = (Vec<f32>, Vec<Vec<f32>>)> {
    (1usize..24, 1usize..7).prop_flat_map(|(dim, sites)| {
        (
            prop::collection::vec(value(), dim),
            prop::collection::vec(prop::collection::vec(value(), dim), sites),
        )
    })
}

/// The averaged pseudo-gradient mean(θ_global − θ_local), accumulated in f64.
fn mean_delta(global: &[f32], locals: &[Vec<f32>]) -> Vec<f32> {
    (0..global.len())
        .map(|j| {
            let sum: f64 = locals
                .iter()
                .map(|l| f64::from(global[j]) - f64::from(l[j]))
                .sum();
            (sum / locals.len() as f64) as f32
        })
        .collect()
}

/// Any optimizer with hyper-parameters in their documented ranges.
fn optimizer() -> impl Strategy<Value = OuterOptimizer> {
    let lr = 1.0e-4f64..10.0;
    let momentum = 0.0f64..0.999;
    prop_oneof![
        lr.clone().prop_map(|lr| OuterOptimizer::FedAvg { lr }),
        (lr.clone(), momentum.clone())
            .prop_map(|(lr, momentum)| OuterOptimizer::FedMom { lr, momentum }),
        (lr.clone(), momentum).prop_map(|(lr, momentum)| OuterOptimizer::Nesterov { lr, momentum }),
        (lr, 0.0f64..0.999, 0.0f64..0.9999, 1.0e-8f64..1.0).prop_map(|(lr, beta1, beta2, eps)| {
            OuterOptimizer::FedAdam {
                lr,
                beta1,
                beta2,
                eps,
            }
        }),
    ]
}

proptest! {
    /// θ − 1·mean(θ − θ_i) = mean(θ_i): FedAvg with unit learning rate is model averaging.
    #[test]
    fn fedavg_with_unit_lr_returns_the_mean_local_model((global, locals) in models()) {
        let mut params = global.clone();
        let delta = mean_delta(&global, &locals);
        OuterOptimizer::FedAvg { lr: 1.0 }.step(&mut params, &delta, &mut OuterState::default());
        for (j, p) in params.iter().enumerate() {
            let mean = locals.iter().map(|l| f64::from(l[j])).sum::<f64>() / locals.len() as f64;
            let scale = 1.0 + f64::from(global[j].abs()) + mean.abs();
            prop_assert!(
                (f64::from(*p) - mean).abs() <= 1.0e-6 * scale,
                "coordinate {j}: got {p}, mean of local models {mean}"
            );
        }
    }

    /// With momentum 0 the momentum buffer is just the current update, so heavy-ball and
    /// Nesterov momentum take exactly FedAvg's steps, round after round.
    #[test]
    fn zero_momentum_equals_fedavg(
        lr in 1.0e-3f64..2.0,
        start in prop::collection::vec(value(), 8),
        deltas in prop::collection::vec(prop::collection::vec(value(), 8), 1..6),
    ) {
        let run = |opt: OuterOptimizer| {
            let mut params = start.clone();
            let mut state = OuterState::default();
            for d in &deltas {
                opt.step(&mut params, d, &mut state);
            }
            params
        };
        let fedavg = run(OuterOptimizer::FedAvg { lr });
        prop_assert_eq!(&run(OuterOptimizer::FedMom { lr, momentum: 0.0 }), &fedavg);
        prop_assert_eq!(&run(OuterOptimizer::Nesterov { lr, momentum: 0.0 }), &fedavg);
    }

    /// Finite models and updates never produce a NaN or an infinity, for any optimizer, even
    /// when an update (and so FedAdam's second moment) is exactly zero.
    #[test]
    fn finite_inputs_stay_finite(
        opt in optimizer(),
        start in prop::collection::vec(value(), 6),
        deltas in prop::collection::vec(prop::collection::vec(value(), 6), 1..8),
    ) {
        let mut params = start;
        let mut state = OuterState::default();
        for d in &deltas {
            opt.step(&mut params, d, &mut state);
            prop_assert!(params.iter().all(|p| p.is_finite()), "{opt:?} gave {params:?}");
            let buffers = state.momentum.iter().chain(&state.second_moment);
            prop_assert!(buffers.clone().all(|m| m.is_finite()), "{opt:?} state {state:?}");
        }
    }
}
