//! A lying aggregator and misbehaving peers: every deviation is refused with an error, never a
//! wrong sum, and no client ever reveals both secrets of a neighbour.

mod secagg_support;

use quorum_crypto::secagg::{
    ClientRound, ConsistencySignature, EncryptedShare, Error, Phase, ServerRound, ShareKind,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use secagg_support::{
    Advertised, Ed25519Auth, Ed25519Signer, HmacSigner, advertised, context, exact_sum, masked,
    random_inputs,
};

#[test]
fn ed25519_advertisements_verify_and_forgeries_are_refused() {
    let ctx = context(5, 4, 3, 3, 16, 4);
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut server = ServerRound::new(ctx.clone()).unwrap();
    let mut states = Vec::new();
    for c in 0..5 {
        let (s, adv) =
            ClientRound::start(ctx.clone(), c, &Ed25519Signer::new(c), &mut rng).unwrap();
        server.handle_advertisement(adv, &Ed25519Auth).unwrap();
        states.push(s);
    }
    let mut lists = server.close_advertise().unwrap();
    // Client 1 gets a list where the server swapped in its own mask key for client 2.
    let (_, list1) = &mut lists[1];
    let forged = list1.iter_mut().find(|a| a.client == 2).unwrap();
    forged.mask_public_key[0] ^= 1;
    let mut states = states.into_iter();
    let (s0, s1) = (states.next().unwrap(), states.next().unwrap());
    assert!(
        s0.handle_peer_keys(lists[0].1.clone(), &Ed25519Auth, &mut rng)
            .is_ok()
    );
    match s1.handle_peer_keys(lists[1].1.clone(), &Ed25519Auth, &mut rng) {
        Err(Error::BadSignature { client: 2, .. }) => {}
        other => panic!("expected BadSignature from client 2, got {other:?}"),
    }
}

#[test]
fn advertisement_replayed_from_another_round_is_refused() {
    let ctx = context(5, 4, 3, 3, 16, 4);
    let mut old = ctx.clone();
    old.round -= 1;
    let Advertised {
        mut clients,
        mut lists,
        mut rng,
        auth,
        ..
    } = advertised(&ctx, 2);
    let (_, old_adv) = ClientRound::start(old, 3, &HmacSigner { client: 3 }, &mut rng).unwrap();
    let list = &mut lists[0].1;
    let slot = list.iter_mut().find(|a| a.client == 3).unwrap();
    *slot = old_adv;
    match clients
        .remove(0)
        .handle_peer_keys(lists[0].1.clone(), &auth, &mut rng)
    {
        Err(Error::BadSignature { client: 3, .. }) => {}
        other => panic!("expected BadSignature, got {other:?}"),
    }
}

#[test]
fn advertisements_from_non_neighbours_or_twice_are_refused() {
    let ctx = context(12, 4, 3, 7, 16, 4);
    let Advertised {
        mut clients,
        lists,
        mut rng,
        auth,
        ..
    } = advertised(&ctx, 3);
    let neighbours = ctx.neighbours(0);
    let stranger = (1..12).find(|c| !neighbours.contains(c)).unwrap();
    let foreign = lists
        .iter()
        .flat_map(|(_, l)| l)
        .find(|a| a.client == stranger)
        .unwrap()
        .clone();
    let mut with_stranger = lists[0].1.clone();
    with_stranger.push(foreign);
    let c0 = clients.remove(0);
    match c0.handle_peer_keys(with_stranger, &auth, &mut rng) {
        Err(Error::NotANeighbour { client: 0, other }) => assert_eq!(other, stranger),
        other => panic!("expected NotANeighbour, got {other:?}"),
    }
    let mut twice = lists[1].1.clone();
    twice.push(twice[0].clone());
    match clients.remove(0).handle_peer_keys(twice, &auth, &mut rng) {
        Err(Error::DuplicateMessage { .. }) => {}
        other => panic!("expected DuplicateMessage, got {other:?}"),
    }
}

/// Runs share-keys honestly and returns the server, client states and outgoing shares.
fn shared(
    ctx: &quorum_crypto::secagg::RoundContext,
    seed: u64,
) -> (
    ServerRound,
    Vec<quorum_crypto::secagg::ExpectForwardedShares>,
    Vec<Vec<EncryptedShare>>,
) {
    let Advertised {
        server,
        clients,
        lists,
        mut rng,
        auth,
    } = advertised(ctx, seed);
    let mut states = Vec::new();
    let mut outgoing = Vec::new();
    for ((_, list), state) in lists.into_iter().zip(clients) {
        let (s, shares) = state.handle_peer_keys(list, &auth, &mut rng).unwrap();
        states.push(s);
        outgoing.push(shares);
    }
    (server, states, outgoing)
}

#[test]
fn server_refuses_misaddressed_shares() {
    let ctx = context(12, 4, 3, 7, 16, 4);
    let (mut server, _, outgoing) = shared(&ctx, 4);
    let stranger = (1..12).find(|c| !ctx.neighbours(0).contains(c)).unwrap();
    let mut bad = outgoing[0].clone();
    bad[0].receiver = stranger;
    assert!(matches!(
        server.handle_share_keys(0, bad),
        Err(Error::NotANeighbour { client: 0, other }) if other == stranger
    ));
    assert!(matches!(
        server.handle_share_keys(1, outgoing[0].clone()),
        Err(Error::WrongSender {
            from: 1,
            claimed: 0
        })
    ));
    let mut short = outgoing[0].clone();
    let dropped = short.pop().unwrap().receiver;
    assert!(matches!(
        server.handle_share_keys(0, short),
        Err(Error::MissingShare { client: 0, neighbour }) if neighbour == dropped
    ));
    // Refusals leave no trace: the honest message is still accepted, once.
    server.handle_share_keys(0, outgoing[0].clone()).unwrap();
    assert!(matches!(
        server.handle_share_keys(0, outgoing[0].clone()),
        Err(Error::DuplicateMessage { client: 0 })
    ));
}

#[test]
fn client_refuses_misaddressed_or_tampered_shares() {
    let ctx = context(12, 4, 3, 7, 16, 4);
    let (_, mut states, outgoing) = shared(&ctx, 5);
    let to = |receiver: u32| -> Vec<EncryptedShare> {
        outgoing
            .iter()
            .flatten()
            .filter(|s| s.receiver == receiver)
            .cloned()
            .collect()
    };
    // Shares for client 1 delivered to client 0.
    let s0 = states.remove(0);
    assert!(matches!(
        s0.handle_forwarded_shares(to(1)),
        Err(Error::WrongReceiver { me: 0, receiver: 1 })
    ));
    // A share relabelled as coming from a non-neighbour.
    let s1 = states.remove(0);
    let stranger = (0..12)
        .find(|&c| c != 1 && !ctx.neighbours(1).contains(&c))
        .unwrap();
    let mut relabelled = to(1);
    relabelled[0].sender = stranger;
    assert!(matches!(
        s1.handle_forwarded_shares(relabelled),
        Err(Error::NotANeighbour { client: 1, other }) if other == stranger
    ));
    // A flipped ciphertext bit.
    let s2 = states.remove(0);
    let mut tampered = to(2);
    tampered[0].ciphertext[10] ^= 1;
    let sender = tampered[0].sender;
    assert!(matches!(
        s2.handle_forwarded_shares(tampered),
        Err(Error::ShareDecryptFailed { sender: s, .. }) if s == sender
    ));
    // A share the same sender made for another of its neighbours: the AEAD binds the receiver.
    let s3 = states.remove(0);
    let mut swapped = to(3);
    let sender = swapped[0].sender;
    let elsewhere = outgoing[sender as usize]
        .iter()
        .find(|s| s.receiver != 3)
        .unwrap()
        .ciphertext
        .clone();
    swapped[0].ciphertext = elsewhere;
    assert!(matches!(
        s3.handle_forwarded_shares(swapped),
        Err(Error::ShareDecryptFailed { sender: s, .. }) if s == sender
    ));
}

#[test]
fn split_survivor_sets_make_honest_clients_refuse_to_unmask() {
    // Complete graph of 7; the server tells clients 1-3 that client 0 survived and clients
    // 4-6 that it dropped, hoping to get the self-mask seed share from the first group and the
    // mask-key share from the second.
    let ctx = context(7, 6, 4, 5, 16, 8);
    let inputs = random_inputs(&ctx, &mut ChaCha20Rng::seed_from_u64(6));
    let (_, states, survivors, auth) = masked(&ctx, &inputs, 6);
    assert_eq!(survivors, (0..7).collect::<Vec<_>>());
    let without_victim: Vec<u32> = (1..7).collect();
    let mut waiting = Vec::new();
    let mut signatures: Vec<ConsistencySignature> = Vec::new();
    for (c, state) in (0..7u32).zip(states) {
        let shown = if c >= 4 { &without_victim } else { &survivors };
        let (next, sig) = state
            .handle_survivors(shown, &HmacSigner { client: c })
            .unwrap();
        waiting.push(next);
        signatures.push(sig);
    }
    let mut revealed = Vec::new();
    for (c, state) in (0..7u32).zip(waiting) {
        // The server forwards every signature; those over the other set do not verify.
        match state.handle_unmask_request(signatures.clone(), &auth) {
            Ok(shares) => revealed.push(shares),
            Err(Error::BadSignature { .. }) | Err(Error::InconsistentSurvivorSet { .. }) => {}
            Err(other) => panic!("client {c}: unexpected error {other}"),
        }
    }
    assert!(revealed.is_empty(), "some client unmasked: {revealed:?}");
}

#[test]
fn split_survivor_sets_fail_the_quorum_even_with_filtered_signatures() {
    let ctx = context(7, 6, 4, 5, 16, 8);
    let inputs = random_inputs(&ctx, &mut ChaCha20Rng::seed_from_u64(8));
    let (_, states, survivors, auth) = masked(&ctx, &inputs, 8);
    let without_victim: Vec<u32> = (1..7).collect();
    let mut waiting = Vec::new();
    let mut signatures = Vec::new();
    for (c, state) in (0..7u32).zip(states) {
        let shown = if c >= 4 { &without_victim } else { &survivors };
        let (next, sig) = state
            .handle_survivors(shown, &HmacSigner { client: c })
            .unwrap();
        waiting.push((c, next));
        signatures.push(sig);
    }
    let mut kinds_of_victim = Vec::new();
    for (c, state) in waiting {
        // Only the signatures over the set this client saw: they all verify, but neither group
        // reaches min_survivors = 5 (4 and 3 signers).
        let group: Vec<_> = signatures
            .iter()
            .filter(|s| (s.client >= 4) == (c >= 4))
            .cloned()
            .collect();
        match state.handle_unmask_request(group, &auth) {
            Ok(shares) => kinds_of_victim.extend(
                shares
                    .shares
                    .iter()
                    .filter(|s| s.owner == 0)
                    .map(|s| s.kind),
            ),
            Err(Error::BelowThreshold {
                phase: Phase::Consistency,
                ..
            }) => {}
            Err(other) => panic!("client {c}: unexpected error {other}"),
        }
    }
    assert!(
        !(kinds_of_victim.contains(&ShareKind::SelfMaskSeed)
            && kinds_of_victim.contains(&ShareKind::MaskKey)),
        "both secrets of client 0 were revealed"
    );
    assert!(kinds_of_victim.is_empty());
}

#[test]
fn clients_refuse_malformed_survivor_sets() {
    let ctx = context(7, 6, 4, 5, 16, 8);
    let inputs = random_inputs(&ctx, &mut ChaCha20Rng::seed_from_u64(9));
    let (_, mut states, _, _) = masked(&ctx, &inputs, 9);
    // Case i goes to client i: unsorted, missing the client itself, unknown id, too small.
    type Check = fn(&Error) -> bool;
    let cases: [(&[u32], Check); 4] = [
        (&[1, 0, 2, 3, 4, 5], |e| {
            matches!(e, Error::InconsistentSurvivorSet { .. })
        }),
        (&[0, 2, 3, 4, 5, 6], |e| {
            matches!(e, Error::InconsistentSurvivorSet { .. })
        }),
        (&[0, 1, 2, 3, 9], |e| {
            matches!(e, Error::InconsistentSurvivorSet { .. })
        }),
        (&[0, 1, 2, 3], |e| matches!(e, Error::BelowThreshold { .. })),
    ];
    for (c, (set, check)) in (0u32..).zip(cases) {
        let err = states
            .remove(0)
            .handle_survivors(set, &HmacSigner { client: c })
            .unwrap_err();
        assert!(check(&err), "{set:?}: {err}");
    }
}

#[test]
fn server_enforces_phases_and_upload_rules() {
    let ctx = context(5, 4, 3, 3, 12, 6);
    let mut server = ServerRound::new(ctx.clone()).unwrap();
    assert!(matches!(
        server.handle_share_keys(0, Vec::new()),
        Err(Error::WrongPhase {
            expected: Phase::Advertise,
            got: Phase::ShareKeys
        })
    ));
    assert!(matches!(
        server.add_masked_input(0, &[0; 6]),
        Err(Error::WrongPhase {
            expected: Phase::Advertise,
            got: Phase::MaskedInput
        })
    ));
    assert!(matches!(
        ServerRound::new(ctx.clone()).unwrap().finish(),
        Err(Error::WrongPhase { .. })
    ));

    let inputs = random_inputs(&ctx, &mut ChaCha20Rng::seed_from_u64(10));
    let Advertised {
        mut server,
        clients,
        lists,
        mut rng,
        auth,
    } = advertised(&ctx, 10);
    let mut states = Vec::new();
    // Client 4 never shares.
    for ((c, list), state) in lists.into_iter().zip(clients).take(4) {
        let (s, shares) = state.handle_peer_keys(list, &auth, &mut rng).unwrap();
        server.handle_share_keys(c, shares).unwrap();
        states.push(s);
    }
    let forwarded = server.close_share_keys().unwrap();
    let masker = states
        .remove(0)
        .handle_forwarded_shares(forwarded[0].1.clone())
        .unwrap();
    let mut data = inputs[0].clone();
    masker.mask(0, &mut data);
    assert!(matches!(
        server.add_masked_input(4, &data),
        Err(Error::NotAParticipant { client: 4, .. })
    ));
    assert!(matches!(
        server.add_masked_input(0, &data[..5]),
        Err(Error::WrongLength {
            expected: 6,
            got: 5
        })
    ));
    let mut too_big = data.clone();
    too_big[2] = 1 << 12;
    assert!(matches!(
        server.add_masked_input(0, &too_big),
        Err(Error::ValueOutOfRange {
            client: 0,
            bits: 12
        })
    ));
    server.add_masked_input(0, &data).unwrap();
    assert!(matches!(
        server.add_masked_input(0, &data),
        Err(Error::DuplicateMessage { client: 0 })
    ));
}

#[test]
fn server_refuses_wrong_kind_misplaced_and_corrupted_shares() {
    let ctx = context(6, 5, 3, 4, 16, 8);
    let inputs = random_inputs(&ctx, &mut ChaCha20Rng::seed_from_u64(11));
    let (mut server, states, survivors, auth) = masked(&ctx, &inputs, 11);
    let mut waiting = Vec::new();
    for (c, state) in (0..6u32).zip(states) {
        let (next, sig) = state
            .handle_survivors(&survivors, &HmacSigner { client: c })
            .unwrap();
        server.handle_consistency(sig, &auth).unwrap();
        waiting.push(next);
    }
    let signatures = server.close_consistency().unwrap();
    let answers: Vec<_> = waiting
        .into_iter()
        .map(|s| s.handle_unmask_request(signatures.clone(), &auth).unwrap())
        .collect();
    // Everyone survived: only self-mask-seed shares may be revealed.
    let mut wrong_kind = answers[0].clone();
    wrong_kind.shares[0].kind = ShareKind::MaskKey;
    assert!(matches!(
        server.handle_unmask(wrong_kind),
        Err(Error::WrongShareKind { client: 0, .. })
    ));
    let mut misplaced = answers[0].clone();
    misplaced.shares[0].share[0] ^= 3;
    assert!(matches!(
        server.handle_unmask(misplaced),
        Err(Error::MalformedShare { holder: 0, .. })
    ));
    // A corrupted y value cannot be spotted on arrival, but with more than t shares the
    // reconstruction detects it instead of producing a wrong sum.
    let mut corrupted = answers[0].clone();
    let victim = corrupted.shares[0].owner;
    corrupted.shares[0].share[7] ^= 0x40;
    server.handle_unmask(corrupted).unwrap();
    for a in &answers[1..] {
        server.handle_unmask(a.clone()).unwrap();
    }
    match server.finish() {
        Err(Error::ReconstructionFailed {
            owner,
            kind: ShareKind::SelfMaskSeed,
            ..
        }) => assert_eq!(owner, victim),
        other => panic!("expected ReconstructionFailed, got {other:?}"),
    }
}

#[test]
fn honest_round_through_the_manual_driver_sums_exactly() {
    // Guards the helpers above: without interference the same steps produce the exact sum.
    let ctx = context(6, 5, 3, 4, 16, 8);
    let inputs = random_inputs(&ctx, &mut ChaCha20Rng::seed_from_u64(12));
    let (mut server, states, survivors, auth) = masked(&ctx, &inputs, 12);
    let mut waiting = Vec::new();
    for (c, state) in (0..6u32).zip(states) {
        let (next, sig) = state
            .handle_survivors(&survivors, &HmacSigner { client: c })
            .unwrap();
        server.handle_consistency(sig, &auth).unwrap();
        waiting.push(next);
    }
    let signatures = server.close_consistency().unwrap();
    for s in waiting {
        server
            .handle_unmask(s.handle_unmask_request(signatures.clone(), &auth).unwrap())
            .unwrap();
    }
    let agg = server.finish().unwrap();
    assert_eq!(agg.sum, exact_sum(&ctx, &inputs, &survivors));
}

/// One enrolled client sending a bad advertisement (forged signature, another round's, or a
/// low-order key) is refused by the server, so it becomes a dropout: every honest neighbour
/// accepts the set it is shown, instead of all refusing the round over that one entry.
#[test]
fn server_drops_bad_advertisements_so_one_client_cannot_abort_the_round() {
    let ctx = context(6, 4, 3, 3, 16, 4);
    let auth = secagg_support::HmacAuth::new(ctx.params.clients);
    let mut old = ctx.clone();
    old.round -= 1;
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let signer = |c| HmacSigner { client: c };
    let start = |c| {
        ClientRound::start(
            ctx.clone(),
            c,
            &signer(c),
            &mut ChaCha20Rng::seed_from_u64(u64::from(c)),
        )
    };

    let bad_adverts = {
        let (_, mut forged) = start(5).unwrap();
        forged.signature[0] ^= 1;
        let (_, replayed) = ClientRound::start(old, 5, &signer(5), &mut rng).unwrap();
        let (_, mut low_order) = start(5).unwrap();
        low_order.mask_public_key = [0; 32];
        [forged, replayed, low_order]
    };
    for bad in bad_adverts {
        let mut server = ServerRound::new(ctx.clone()).unwrap();
        let mut honest = Vec::new();
        for c in 0..5 {
            let (state, adv) = start(c).unwrap();
            server.handle_advertisement(adv, &auth).unwrap();
            honest.push(state);
        }
        let refused = server.handle_advertisement(bad.clone(), &auth);
        assert!(
            matches!(
                refused,
                Err(Error::BadSignature { client: 5, .. } | Error::BadPeerKey { client: 5, .. })
            ),
            "{refused:?}"
        );
        let lists = server.close_advertise().unwrap();
        assert!(
            lists
                .iter()
                .all(|(c, list)| *c != 5 && list.iter().all(|a| a.client != 5))
        );
        for ((c, list), state) in lists.into_iter().zip(honest) {
            assert!(
                state.handle_peer_keys(list, &auth, &mut rng).is_ok(),
                "client {c} refused the set after the server dropped client 5"
            );
        }
    }
}
