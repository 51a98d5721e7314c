//! Round parameters, the degree/threshold rule and the neighbour graph.

use super::Error;
use crate::prg::{MAX_BITS, MIN_BITS, MaskPrg};
use crate::share_crypto::hkdf_sha256;

/// HKDF info label of the keystream that shuffles clients onto the graph ring.
pub const GRAPH_LABEL: &[u8] = b"quorum/graph/v1";

/// Cohorts up to this size use the complete graph.
const COMPLETE_GRAPH_MAX: u32 = 32;
/// Shamir x-coordinates are 1..=255 and a client holds no share of its own secrets.
const MAX_NEIGHBOURS: u32 = 254;
/// Security: probability that any neighbourhood holds more corrupt clients than assumed.
const SECURITY_BITS: i32 = 40;
/// Correctness: probability that any neighbourhood loses more clients than assumed.
const CORRECTNESS_BITS: i32 = 20;

/// SecAgg+ parameters of one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// Cohort size n; clients are indexed 0..n.
    pub clients: u32,
    /// Degree k of the neighbour graph.
    pub neighbours: u32,
    /// Shamir threshold t within each neighbourhood.
    pub threshold: u32,
    /// The server aborts when fewer clients than this survive a phase (also the floor on the
    /// number of summed inputs that DP noise calibration can rely on).
    pub min_survivors: u32,
    /// Element width b: vectors live in Z_(2^b).
    pub bits: u32,
    /// Vector length d.
    pub dim: usize,
}

/// Where the neighbour graph's seed is assumed to come from, when a client judges an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphSeed {
    /// Uniformly random, independent of who colludes: the tail bound of Bell et al. (2020)
    /// bounds a client's corrupt neighbours.
    Random,
    /// Possibly chosen by the server to place colluders: any of them may be a neighbour.
    Adversarial,
}

impl Params {
    /// Chooses the degree and thresholds for `clients` clients of which at most a fraction
    /// `corrupt_fraction` collude with the server and at most `dropout_fraction` drop out.
    ///
    /// The rule, following Bell et al. 2020 ("Secure Single-Server Aggregation with
    /// (Poly)Logarithmic Overhead", CCS, Section 4 and Theorem 6.2), with the threshold taken
    /// as a strict majority so that no neighbour's two secrets can both be rebuilt:
    ///
    /// * n ≤ 32: complete graph, k = n − 1; c = ⌈γ·n⌉ corrupt and e = ⌈δ·n⌉ dropped neighbours
    ///   are assumed (worst case).
    /// * n > 32: Harary graph on a random ring; for each candidate k (ascending, k ≤ 254, k even
    ///   unless n is even), c is the smallest count with n · P[Bin(k, γ) > c] ≤ 2^−40 and e the
    ///   smallest with n · P[Bin(k, δ) > e] ≤ 2^−20 (a union bound over clients; the
    ///   hypergeometric count of a random neighbourhood has no heavier tail than the binomial,
    ///   Hoeffding 1963). The smallest k that admits a threshold is taken, so k = O(log n).
    /// * t = ⌊(k + c)/2⌋ + 1: honest neighbours each reveal only one of an owner's two secrets,
    ///   so rebuilding both would need 2t ≤ k + c shares; t > c also keeps the corrupt
    ///   neighbours alone below threshold. Valid when t ≤ k − e (enough survivors to unmask).
    /// * min_survivors = max(t, ⌊(n + ⌈γ·n⌉)/2⌋ + 1): a strict majority counting corrupt clients
    ///   twice, so two different survivor sets can never both collect that many signatures from
    ///   honest clients that each sign once; it must not exceed n − ⌈δ·n⌉.
    pub fn choose(
        clients: u32,
        bits: u32,
        dim: usize,
        corrupt_fraction: f64,
        dropout_fraction: f64,
    ) -> Result<Self, Error> {
        for (name, f) in [("corrupt", corrupt_fraction), ("dropout", dropout_fraction)] {
            if !(0.0..1.0).contains(&f) {
                return Err(Error::InvalidParams {
                    reason: format!("{name} fraction {f} must be in [0, 1)"),
                });
            }
        }
        let none = || Error::NoValidParams {
            clients,
            corrupt_fraction,
            dropout_fraction,
        };
        if clients < 2 {
            return Err(Error::InvalidParams {
                reason: format!("a cohort needs at least 2 clients, not {clients}"),
            });
        }
        let n = f64::from(clients);
        let worst = |f: f64| worst_case(clients, f);
        let (k, t) = if clients <= COMPLETE_GRAPH_MAX {
            let k = clients - 1;
            let t = (k + worst(corrupt_fraction)) / 2 + 1;
            (t + worst(dropout_fraction) <= k)
                .then_some((k, t))
                .ok_or_else(none)?
        } else {
            let ln_fact = ln_factorials(MAX_NEIGHBOURS);
            let security = 2f64.powi(-SECURITY_BITS) / n;
            let correctness = 2f64.powi(-CORRECTNESS_BITS) / n;
            (2..=MAX_NEIGHBOURS.min(clients - 1))
                .filter(|k| k.is_multiple_of(2) || clients.is_multiple_of(2))
                .find_map(|k| {
                    let c = tail_bound(&ln_fact, k, corrupt_fraction, security);
                    let e = tail_bound(&ln_fact, k, dropout_fraction, correctness);
                    let t = (k + c) / 2 + 1;
                    (t + e <= k).then_some((k, t))
                })
                .ok_or_else(none)?
        };
        let min_survivors = ((clients + worst(corrupt_fraction)) / 2 + 1).max(t);
        if min_survivors + worst(dropout_fraction) > clients {
            return Err(none());
        }
        let params = Self {
            clients,
            neighbours: k,
            threshold: t,
            min_survivors,
            bits,
            dim,
        };
        params.validate()?;
        Ok(params)
    }

    /// [`Params::choose`] tolerating as many dropouts as the cohort allows, up to a fraction
    /// `max_dropout_fraction`: a small cohort tolerates fewer, down to none (with 3 or 4
    /// clients and one assumed colluder a client's masks need every neighbour's share). Fails
    /// only where even a cohort that loses nobody has no parameters.
    pub fn choose_up_to(
        clients: u32,
        bits: u32,
        dim: usize,
        corrupt_fraction: f64,
        max_dropout_fraction: f64,
    ) -> Result<Self, Error> {
        let most = worst_case(clients, max_dropout_fraction);
        let mut outcome = Self::choose(clients, bits, dim, corrupt_fraction, max_dropout_fraction);
        for dropouts in (0..most).rev() {
            if outcome.is_ok() {
                break;
            }
            // A fraction whose worst case is exactly `dropouts` clients.
            let fraction = if dropouts == 0 {
                0.0
            } else {
                (f64::from(dropouts) - 0.5) / f64::from(clients)
            };
            outcome = Self::choose(clients, bits, dim, corrupt_fraction, fraction);
        }
        outcome
    }

    /// How many clients may drop out, whoever they are, with the round still able to unmask:
    /// known for complete graphs (n ≤ 32); a sparse graph's tolerance is a tail bound.
    pub fn guaranteed_dropouts(&self) -> Option<u32> {
        (self.neighbours + 1 == self.clients)
            .then(|| (self.neighbours - self.threshold).min(self.clients - self.min_survivors))
    }

    /// Checks that these parameters keep a client's secrets safe if up to a fraction
    /// `corrupt_fraction` of the cohort colludes with the server, by the rule of
    /// [`Params::choose`]: the threshold must keep the corrupt neighbours plus one share per
    /// honest neighbour below both of an owner's secrets, and `min_survivors` must be a strict
    /// majority counting corrupt clients twice. A client checks an offer with its own fraction,
    /// whatever the server assumed.
    ///
    /// How many colluders may be a client's neighbours depends on who drew the graph: with
    /// [`GraphSeed::Random`] the tail bound of [`Params::choose`] applies to sparse graphs;
    /// with [`GraphSeed::Adversarial`] every colluder may sit next to the client, as when the
    /// server picks the seed, so a sparse graph needs a threshold above all of them.
    pub fn check_safe_against(&self, corrupt_fraction: f64, seed: GraphSeed) -> Result<(), Error> {
        self.validate()?;
        if !(0.0..1.0).contains(&corrupt_fraction) {
            return Err(Error::InvalidParams {
                reason: format!("corrupt fraction {corrupt_fraction} must be in [0, 1)"),
            });
        }
        let (n, k) = (self.clients, self.neighbours);
        let worst = worst_case(n, corrupt_fraction);
        let worst_placement = seed == GraphSeed::Adversarial;
        let corrupt_neighbours = if worst_placement || n <= COMPLETE_GRAPH_MAX || k == n - 1 {
            worst.min(k)
        } else {
            let ln_fact = ln_factorials(MAX_NEIGHBOURS);
            let security = 2f64.powi(-SECURITY_BITS) / f64::from(n);
            tail_bound(&ln_fact, k, corrupt_fraction, security)
        };
        let min_threshold = (k + corrupt_neighbours) / 2 + 1;
        let min_survivors = (n + worst) / 2 + 1;
        let unsafe_ = |reason: String| Err(Error::InvalidParams { reason });
        if self.threshold < min_threshold {
            let hint = if worst_placement && k < n - 1 && worst > 0 {
                " (the server draws this sparse graph, so all colluders may be neighbours; \
                 a denser graph, or trusting the seed, would do)"
            } else {
                ""
            };
            return unsafe_(format!(
                "threshold {} is below {min_threshold}, the least that keeps {corrupt_neighbours} \
                 colluding neighbours of {k} from rebuilding both of a client's secrets{hint}",
                self.threshold
            ));
        }
        if self.min_survivors < min_survivors {
            return unsafe_(format!(
                "min_survivors {} is below {min_survivors}, the least that keeps two survivor \
                 sets from both being signed with {worst} colluding clients among {n}",
                self.min_survivors
            ));
        }
        Ok(())
    }

    /// Checks the parameters are coherent: 2 ≤ n, 1 ≤ k < n, k ≤ 254, n·k even (a k-regular
    /// graph exists), k/2 < t ≤ k, t ≤ min_survivors ≤ n, 8 ≤ b ≤ 32, d ≥ 1.
    pub fn validate(&self) -> Result<(), Error> {
        let Self {
            clients: n,
            neighbours: k,
            threshold: t,
            min_survivors: m,
            bits,
            dim,
        } = *self;
        let fail = |reason: String| Err(Error::InvalidParams { reason });
        if n < 2 {
            return fail(format!("a cohort needs at least 2 clients, not {n}"));
        }
        if k == 0 || k >= n || k > MAX_NEIGHBOURS {
            return fail(format!(
                "degree {k} must be between 1 and min(n - 1, {MAX_NEIGHBOURS}) for n = {n}"
            ));
        }
        if !k.is_multiple_of(2) && !n.is_multiple_of(2) {
            return fail(format!(
                "no {k}-regular graph on {n} clients: n·k must be even"
            ));
        }
        if 2 * t <= k || t > k {
            return fail(format!(
                "threshold {t} must be a strict majority of the degree {k} (k/2 < t <= k)"
            ));
        }
        if m < t || m > n {
            return fail(format!(
                "min_survivors {m} must be between the threshold {t} and the cohort size {n}"
            ));
        }
        if !(MIN_BITS..=MAX_BITS).contains(&bits) {
            return fail(format!(
                "element width {bits} outside {MIN_BITS}..={MAX_BITS}"
            ));
        }
        if dim == 0 {
            return fail("vector length must be at least 1".into());
        }
        Ok(())
    }
}

/// How many of `clients` a `fraction` of them can be, rounded up: the worst case every rule
/// here (and the DP noise calibration above it) assumes.
pub fn worst_case(clients: u32, fraction: f64) -> u32 {
    (fraction * f64::from(clients)).ceil() as u32
}

/// ln(j!) for j = 0..=max.
fn ln_factorials(max: u32) -> Vec<f64> {
    let mut out = vec![0.0; max as usize + 1];
    for j in 1..out.len() {
        out[j] = out[j - 1] + (j as f64).ln();
    }
    out
}

/// Smallest c with P[Bin(k, p) > c] ≤ bound.
fn tail_bound(ln_fact: &[f64], k: u32, p: f64, bound: f64) -> u32 {
    if p <= 0.0 {
        return 0;
    }
    let pmf = |i: u32| {
        let (i_, k_) = (i as usize, k as usize);
        (ln_fact[k_] - ln_fact[i_] - ln_fact[k_ - i_]
            + f64::from(i) * p.ln()
            + f64::from(k - i) * (1.0 - p).ln())
        .exp()
    };
    // tail = P[X > c], accumulated from the top down.
    let mut tail = 0.0;
    for c in (0..k).rev() {
        tail += pmf(c + 1);
        if tail > bound {
            return c + 1;
        }
    }
    0
}

/// Everything all parties agree on for one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundContext {
    /// Federation name (bound into every key derivation and signature).
    pub federation: String,
    /// Round number.
    pub round: u32,
    /// Public per-round randomness that places clients on the graph.
    pub round_seed: [u8; 32],
    /// Digest of everything else the round's offer fixes (cohort and its order, parameters,
    /// DP encoding, model), bound into every advertisement and survivor-set signature: two
    /// clients shown different offers cannot verify each other, so neither proceeds.
    pub offer_digest: [u8; 32],
    /// SecAgg parameters.
    pub params: Params,
}

impl RoundContext {
    /// The neighbours of `client`, sorted ascending (empty for an index outside the cohort).
    pub fn neighbours(&self, client: u32) -> Vec<u32> {
        self.graph().neighbours(client)
    }

    /// The whole neighbour graph, computed once (O(n)) for parties that query it often.
    pub fn graph(&self) -> Graph {
        Graph::new(&self.round_seed, self.round, &self.params)
    }
}

/// The k-regular neighbour graph of a round.
///
/// Construction (byte-exact, for interoperability): a keystream as in [`MaskPrg`] but with key
/// HKDF-SHA256(ikm = round_seed, info = `"quorum/graph/v1"` ‖ round BE u32), read as u32
/// little-endian words w0, w1, …. A Fisher–Yates shuffle of [0, n): for i = n−1 down to 1, draw
/// words until one is below ⌊2^32 / (i+1)⌋·(i+1), set j = word mod (i+1) and swap positions i and
/// j. The client at ring position p is adjacent to those at positions p ± 1, …, p ± ⌊k/2⌋
/// (mod n) and, when k is odd, p + n/2 (a Harary graph; for k = n − 1 the complete graph).
#[derive(Clone, Debug)]
pub struct Graph {
    ring: Vec<u32>,
    position: Vec<u32>,
    degree: u32,
}

impl Graph {
    fn new(round_seed: &[u8; 32], round: u32, params: &Params) -> Self {
        let n = params.clients;
        let stream = MaskPrg::from_key(&hkdf_sha256(
            round_seed,
            &[GRAPH_LABEL, &round.to_be_bytes()],
        ));
        let mut words = Words {
            stream,
            buf: [0; 256],
            next: 256,
            offset: 0,
        };
        let mut ring: Vec<u32> = (0..n).collect();
        for i in (1..n as usize).rev() {
            let m = i as u64 + 1;
            let limit = (1u64 << 32) / m * m;
            let r = loop {
                let w = u64::from(words.next());
                if w < limit {
                    break w;
                }
            };
            ring.swap(i, (r % m) as usize);
        }
        let mut position = vec![0; n as usize];
        for (p, &c) in ring.iter().enumerate() {
            position[c as usize] = p as u32;
        }
        Self {
            ring,
            position,
            degree: params.neighbours,
        }
    }

    /// The neighbours of `client`, sorted ascending (empty outside the cohort).
    pub fn neighbours(&self, client: u32) -> Vec<u32> {
        let n = self.ring.len();
        let Some(&p) = self.position.get(client as usize) else {
            return Vec::new();
        };
        let p = p as usize;
        let mut out = Vec::with_capacity(self.degree as usize);
        for d in 1..=(self.degree / 2) as usize {
            out.push(self.ring[(p + d) % n]);
            out.push(self.ring[(p + n - d) % n]);
        }
        if !self.degree.is_multiple_of(2) {
            out.push(self.ring[(p + n / 2) % n]);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The x-coordinate of the share of `owner`'s secrets held by `holder`: one plus the
    /// holder's index in the owner's sorted neighbour list; `None` if they are not neighbours.
    pub fn x_coordinate(&self, owner: u32, holder: u32) -> Option<u8> {
        let list = self.neighbours(owner);
        let index = list.binary_search(&holder).ok()?;
        u8::try_from(index + 1).ok()
    }
}

/// Sequential u32 words of a keystream.
struct Words {
    stream: MaskPrg,
    buf: [u32; 256],
    next: usize,
    offset: usize,
}

impl Words {
    fn next(&mut self) -> u32 {
        if self.next == self.buf.len() {
            self.stream.fill(self.offset, &mut self.buf, 32);
            self.offset += self.buf.len();
            self.next = 0;
        }
        self.next += 1;
        self.buf[self.next - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_drawn_graph_needs_a_threshold_above_every_colluder() {
        // Sparse graphs chosen for a random seed; their thresholds hold against the colluders
        // a random graph gives a client (tail bound), not against all of them.
        for (n, corrupt) in [(500u32, 0.1), (1000, 0.05)] {
            let p = Params::choose(n, 32, 1000, corrupt, 0.1).unwrap();
            assert!(p.neighbours < n - 1, "{n}: {p:?}");
            // Chosen for a random graph: safe if the seed is random...
            p.check_safe_against(corrupt, GraphSeed::Random).unwrap();
            // ...not if the server placed its worst-case colluders next to a client.
            let err = p
                .check_safe_against(corrupt, GraphSeed::Adversarial)
                .unwrap_err();
            assert!(err.to_string().contains("sparse graph"), "{n}: {err}");
            // With nobody assumed to collude, placement does not matter.
            p.check_safe_against(0.0, GraphSeed::Adversarial).unwrap();
        }
        // Up to a few hundred clients, the chosen threshold already holds against every
        // colluder; complete graphs (up to 32 clients) are judged the same either way.
        let p = Params::choose(200, 32, 1000, 0.1, 0.1).unwrap();
        p.check_safe_against(0.1, GraphSeed::Adversarial).unwrap();
        let p = Params::choose(20, 32, 1000, 0.1, 0.1).unwrap();
        assert_eq!(p.neighbours, 19);
        p.check_safe_against(0.1, GraphSeed::Adversarial).unwrap();
    }

    fn ctx(n: u32, k: u32) -> RoundContext {
        RoundContext {
            federation: "f".into(),
            round: 1,
            round_seed: [4; 32],
            offer_digest: [0; 32],
            params: Params {
                clients: n,
                neighbours: k,
                threshold: k / 2 + 1,
                min_survivors: k / 2 + 1,
                bits: 16,
                dim: 1,
            },
        }
    }

    #[test]
    fn graph_is_regular_and_symmetric() {
        for (n, k) in [(10, 9), (11, 10), (100, 12), (101, 20), (64, 7)] {
            let c = ctx(n, k);
            c.params.validate().unwrap();
            let g = c.graph();
            for a in 0..n {
                let na = g.neighbours(a);
                assert_eq!(na.len(), k as usize, "n={n} k={k} a={a}");
                assert!(!na.contains(&a));
                for &b in &na {
                    assert!(g.neighbours(b).contains(&a), "asymmetric edge {a}-{b}");
                }
            }
        }
    }

    #[test]
    fn graph_depends_on_seed() {
        let a = ctx(100, 10);
        let mut b = a.clone();
        b.round_seed = [5; 32];
        assert_ne!(a.neighbours(0), b.neighbours(0));
        assert_eq!(a.neighbours(0), a.clone().neighbours(0));
    }

    #[test]
    fn choose_small_cohort_uses_complete_graph() {
        let p = Params::choose(8, 16, 10, 0.0, 0.1).unwrap();
        assert_eq!((p.neighbours, p.threshold, p.min_survivors), (7, 4, 5));
    }

    #[test]
    fn pilot_cohorts_tolerate_what_they_can_up_to_the_fraction() {
        // One assumed colluder among 3 or 4 sites leaves no room for a dropout.
        for n in [3, 4] {
            assert!(Params::choose(n, 16, 10, 0.1, 0.1).is_err(), "{n}");
            let p = Params::choose_up_to(n, 16, 10, 0.1, 0.1).unwrap();
            assert_eq!(p.guaranteed_dropouts(), Some(0), "{p:?}");
            assert_eq!((p.neighbours, p.min_survivors), (n - 1, n.min(3)), "{p:?}");
        }
        // From 5 sites the 10 % asked for (one site) is met, as `choose` meets it.
        for n in [5, 10] {
            let p = Params::choose_up_to(n, 16, 10, 0.1, 0.1).unwrap();
            assert_eq!(p, Params::choose(n, 16, 10, 0.1, 0.1).unwrap());
            assert!(p.guaranteed_dropouts() >= Some(1), "{p:?}");
        }
        // Two sites with a colluder: nothing works, whatever the dropouts.
        assert!(matches!(
            Params::choose_up_to(2, 16, 10, 0.1, 0.1),
            Err(Error::NoValidParams { .. })
        ));
        // Sparse graphs give no guarantee by count.
        let sparse = Params::choose_up_to(1000, 16, 10, 0.05, 0.05).unwrap();
        assert_eq!(sparse.guaranteed_dropouts(), None);
    }

    #[test]
    fn choose_large_cohort_is_logarithmic_and_valid() {
        let p = Params::choose(1000, 16, 10, 0.05, 0.05).unwrap();
        assert!(p.neighbours < 120, "{p:?}");
        assert!(2 * p.threshold > p.neighbours);
        let p10k = Params::choose(10_000, 16, 10, 0.05, 0.05).unwrap();
        assert!(p10k.neighbours < 2 * p.neighbours, "{p10k:?} vs {p:?}");
    }

    #[test]
    fn choose_reports_impossible_fractions() {
        assert!(matches!(
            Params::choose(5, 16, 10, 0.3, 0.4),
            Err(Error::NoValidParams { .. })
        ));
        assert!(matches!(
            Params::choose(5, 16, 10, 1.5, 0.0),
            Err(Error::InvalidParams { .. })
        ));
    }

    #[test]
    fn validate_refuses_minority_threshold_and_odd_graph() {
        let mut p = ctx(10, 4).params;
        p.threshold = 2;
        assert!(p.validate().is_err());
        assert!(ctx(11, 5).params.validate().is_err());
    }
}
