//! Throughput of the mask PRG and of client masking on a 10M-element vector.
//!
//! `cargo run --release -p quorum-crypto --example prg_throughput`

use std::time::Instant;

use quorum_crypto::prg::{MaskPrg, default_threads, mask_parallel};
use quorum_crypto::secagg::{
    ClientRound, PeerAuthError, PeerAuthenticator, RoundContext, ServerRound, Signed, Signer,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const DIM: usize = 10_000_000;
const BITS: u32 = 20;

/// Benchmark identities: the signature is the message length, which is enough for a local run.
struct NoSigner;
impl Signer for NoSigner {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        message.len().to_be_bytes().to_vec()
    }
    fn certificate_der(&self) -> Vec<u8> {
        Vec::new()
    }
}
impl PeerAuthenticator for NoSigner {
    fn verify(&self, _: u32, s: Signed<'_>) -> Result<(), PeerAuthError> {
        (s.signature == s.message.len().to_be_bytes())
            .then_some(())
            .ok_or_else(|| PeerAuthError::new("bad"))
    }
}

fn gbps(bytes: usize, start: Instant) -> f64 {
    bytes as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads = default_threads();
    let prg = MaskPrg::new(&[7; 32], 1);
    let mut v = vec![0u32; DIM];
    prg.add_to(0, &mut v, BITS); // warm up
    let start = Instant::now();
    prg.add_to(0, &mut v, BITS);
    println!(
        "PRG add_to, 1 thread:       {:.2} GB/s of keystream",
        gbps(4 * DIM, start)
    );
    let start = Instant::now();
    mask_parallel(&mut v, threads, |off, c| prg.add_to(off, c, BITS));
    println!(
        "PRG add_to, {threads} threads:      {:.2} GB/s of keystream",
        gbps(4 * DIM, start)
    );

    // A real round of 17 clients on the complete graph: each mask is 1 self + 16 pairwise streams.
    let mut ctx = RoundContext {
        federation: "bench".into(),
        round: 1,
        round_seed: [1; 32],
        offer_digest: [0; 32],
        params: quorum_crypto::secagg::Params::choose(17, BITS, DIM, 0.0, 0.0)?,
    };
    ctx.params.dim = DIM;
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut server = ServerRound::new(ctx.clone())?;
    let mut states = Vec::new();
    for c in 0..ctx.params.clients {
        let (s, adv) = ClientRound::start(ctx.clone(), c, &NoSigner, &mut rng)?;
        server.handle_advertisement(adv, &NoSigner)?;
        states.push(s);
    }
    let mut next = Vec::new();
    for ((c, list), s) in server.close_advertise()?.into_iter().zip(states) {
        let (s, shares) = s.handle_peer_keys(list, &NoSigner, &mut rng)?;
        server.handle_share_keys(c, shares)?;
        next.push(s);
    }
    let (_, forwarded) = server.close_share_keys()?.swap_remove(0);
    let masker = next.swap_remove(0).handle_forwarded_shares(forwarded)?;
    let streams = 1 + masker.pairwise_neighbours().len();
    let start = Instant::now();
    masker.mask(0, &mut v);
    let t1 = start.elapsed().as_secs_f64();
    let start = Instant::now();
    mask_parallel(&mut v, threads, |off, c| masker.mask(off, c));
    let tn = start.elapsed().as_secs_f64();
    println!(
        "client mask ({streams} streams), 1 thread: {:.3} s for {DIM} elements ({:.2} GB/s keystream)",
        t1,
        (4 * DIM * streams) as f64 / t1 / 1e9
    );
    println!(
        "client mask ({streams} streams), {threads} threads: {:.3} s ({:.2} GB/s keystream)",
        tn,
        (4 * DIM * streams) as f64 / tn / 1e9
    );
    Ok(())
}
