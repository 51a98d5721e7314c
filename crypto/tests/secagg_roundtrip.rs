//! End-to-end SecAgg+ rounds in process: exact sums, dropouts in every phase, clean aborts.

mod secagg_support;

use quorum_crypto::secagg::{Error, Params, Phase};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use secagg_support::{DropAt, context, exact_sum, random_inputs, run};

fn assert_exact(ctx: &quorum_crypto::secagg::RoundContext, drops: &[DropAt], seed: u64) {
    let inputs = random_inputs(ctx, &mut ChaCha20Rng::seed_from_u64(seed));
    let out = run(ctx, &inputs, drops, seed);
    assert!(out.client_errors.is_empty(), "{:?}", out.client_errors);
    let agg = out.result.unwrap_or_else(|e| panic!("round failed: {e}"));
    assert_eq!(agg.survivors, out.uploaded);
    assert_eq!(agg.sum, exact_sum(ctx, &inputs, &out.uploaded));
}

#[test]
fn exact_sum_for_several_parameter_sets() {
    // (n, k, t, min_survivors, bits, dim): complete graphs and sparse Harary graphs, odd and
    // even degrees, widths on and off byte boundaries.
    for (i, &(n, k, t, m, bits, dim)) in [
        (2, 1, 1, 2, 8, 5),
        (5, 4, 3, 3, 16, 33),
        (8, 7, 4, 5, 32, 100),
        (20, 6, 4, 11, 13, 64),
        (41, 10, 6, 21, 20, 4097),
        (64, 9, 5, 33, 31, 17),
    ]
    .iter()
    .enumerate()
    {
        let ctx = context(n, k, t, m, bits, dim);
        assert_exact(&ctx, &[], i as u64);
    }
}

#[test]
fn chosen_parameters_run() {
    for n in [4, 16, 50] {
        let mut ctx = context(n, 1, 1, 1, 16, 20);
        ctx.params = Params::choose(n, 16, 20, 0.0, 0.1).unwrap();
        assert_exact(&ctx, &[], u64::from(n));
    }
}

#[test]
fn dropouts_in_every_phase_leave_the_exact_sum_of_uploaders() {
    let ctx = context(30, 10, 6, 16, 16, 50);
    let mut drops = vec![DropAt::Never; 30];
    drops[1] = DropAt::BeforeAdvertise;
    drops[4] = DropAt::AfterAdvertise;
    drops[9] = DropAt::DuringShareKeys;
    drops[14] = DropAt::BeforeUpload;
    drops[19] = DropAt::AfterUpload;
    drops[25] = DropAt::AfterConsistency;
    let inputs = random_inputs(&ctx, &mut ChaCha20Rng::seed_from_u64(7));
    let out = run(&ctx, &inputs, &drops, 7);
    assert!(out.client_errors.is_empty(), "{:?}", out.client_errors);
    let agg = out.result.unwrap();
    // Clients 1, 4, 9 and 14 never uploaded; 19 and 25 did and are in the sum.
    for c in [1, 4, 9, 14] {
        assert!(!agg.survivors.contains(&c));
    }
    for c in [19, 25] {
        assert!(agg.survivors.contains(&c));
    }
    assert_eq!(agg.survivors.len(), 26);
    assert_eq!(agg.sum, exact_sum(&ctx, &inputs, &agg.survivors));
}

#[test]
fn each_dropout_kind_alone() {
    let ctx = context(12, 11, 6, 7, 24, 9);
    for (i, kind) in [
        DropAt::BeforeAdvertise,
        DropAt::AfterAdvertise,
        DropAt::DuringShareKeys,
        DropAt::BeforeUpload,
        DropAt::AfterUpload,
        DropAt::AfterConsistency,
    ]
    .into_iter()
    .enumerate()
    {
        let mut drops = vec![DropAt::Never; 12];
        drops[i] = kind;
        drops[11 - i] = kind;
        assert_exact(&ctx, &drops, 100 + i as u64);
    }
}

#[test]
fn an_input_added_only_in_part_spoils_the_sum_and_the_round_stops() {
    let ctx = context(3, 2, 2, 2, 16, 12);
    let inputs = random_inputs(&ctx, &mut ChaCha20Rng::seed_from_u64(2));
    let secagg_support::Advertised {
        mut server,
        clients,
        lists,
        mut rng,
        auth,
    } = secagg_support::advertised(&ctx, 3);
    for ((c, list), state) in lists.into_iter().zip(clients) {
        let (_, shares) = state.handle_peer_keys(list, &auth, &mut rng).unwrap();
        server.handle_share_keys(c, shares).unwrap();
    }
    server.close_share_keys().unwrap();
    server.add_masked_input(0, &inputs[0]).unwrap();
    server.add_masked_input(1, &inputs[1]).unwrap();
    assert!(!server.add_masked_input_part(2, 0, &inputs[2][..5]).unwrap());
    // A gap or a repeat is refused.
    assert!(matches!(
        server.add_masked_input_part(2, 6, &inputs[2][6..]),
        Err(Error::PartOutOfOrder {
            client: 2,
            offset: 6,
            expected: 5
        })
    ));
    assert!(matches!(
        server.add_masked_input_part(2, 0, &inputs[2][..5]),
        Err(Error::PartOutOfOrder { expected: 5, .. })
    ));
    // Client 2 never sends the rest: its five elements are in the sum, which no unmasking
    // could correct.
    assert!(matches!(
        server.close_masked_input(),
        Err(Error::PartialInput {
            client: 2,
            added: 5,
            expected: 12
        })
    ));
}

#[test]
fn too_many_dropouts_abort_cleanly() {
    let ctx = context(10, 9, 5, 6, 16, 8);
    let inputs = random_inputs(&ctx, &mut ChaCha20Rng::seed_from_u64(1));
    let cases = [
        (DropAt::BeforeAdvertise, Phase::Advertise),
        (DropAt::AfterAdvertise, Phase::ShareKeys),
        (DropAt::BeforeUpload, Phase::MaskedInput),
        (DropAt::AfterUpload, Phase::Consistency),
    ];
    for (kind, phase) in cases {
        let drops: Vec<_> = (0..10)
            .map(|c| if c < 5 { kind } else { DropAt::Never })
            .collect();
        let out = run(&ctx, &inputs, &drops, 1);
        match out.result {
            Err(Error::BelowThreshold {
                phase: p,
                survivors: 5,
                needed: 6,
            }) => assert_eq!(p, phase, "{kind:?}"),
            other => panic!("{kind:?}: expected BelowThreshold, got {other:?}"),
        }
    }
    // Too few unmask answers: the server cannot rebuild a seed and says so.
    let drops: Vec<_> = (0..10)
        .map(|c| {
            if c < 5 {
                DropAt::AfterConsistency
            } else {
                DropAt::Never
            }
        })
        .collect();
    let out = run(&ctx, &inputs, &drops, 1);
    assert!(
        matches!(out.result, Err(Error::ReconstructionFailed { .. })),
        "{:?}",
        out.result
    );
}

#[test]
fn a_thousand_clients_with_dropouts() {
    let params = Params::choose(1000, 16, 64, 0.0, 0.05).unwrap();
    assert!(params.neighbours < 40, "{params:?}");
    let mut ctx = context(1000, 1, 1, 1, 16, 64);
    ctx.params = params;
    // About 3% drop out, spread over the phases.
    let kinds = [
        DropAt::AfterAdvertise,
        DropAt::DuringShareKeys,
        DropAt::BeforeUpload,
        DropAt::AfterUpload,
        DropAt::AfterConsistency,
    ];
    let drops: Vec<_> = (0..1000)
        .map(|c| {
            if c % 33 == 7 {
                kinds[c / 33 % 5]
            } else {
                DropAt::Never
            }
        })
        .collect();
    let inputs = random_inputs(&ctx, &mut ChaCha20Rng::seed_from_u64(1000));
    let out = run(&ctx, &inputs, &drops, 1000);
    assert!(
        out.client_errors.is_empty(),
        "{:?}",
        &out.client_errors[..1]
    );
    let agg = out.result.unwrap();
    assert!(agg.survivors.len() > 970 && agg.survivors.len() < 1000);
    assert_eq!(agg.sum, exact_sum(&ctx, &inputs, &agg.survivors));
}
