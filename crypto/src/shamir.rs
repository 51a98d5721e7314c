//! t-of-k Shamir secret sharing of 32-byte secrets, byte-wise over GF(2^8).
//!
//! Each of the 32 secret bytes is the constant term of its own random polynomial of degree
//! `t - 1` over GF(2^8) with the AES reduction polynomial x^8 + x^4 + x^3 + x + 1 (0x11b). A share
//! is the x-coordinate (1..=255; 0 would be the secret itself) and the 32 polynomial values at it;
//! on the wire it is 33 bytes: `x ‖ y[0..32]`.
//!
//! Side channels: arithmetic on secret bytes (coefficients, y values) is a branch-free,
//! table-free shift-and-add multiply, so its timing does not depend on the secret. Tables are
//! used only on x-coordinates, which are public.
//!
//! Shares carry no integrity of their own: inside a round they travel in the AEAD of
//! [`crate::share_crypto`]. [`combine`] checks that every share beyond the first `threshold`
//! lies on the same polynomial, so a corrupted extra share is detected rather than silently
//! changing the secret.

use rand::CryptoRng;

/// Length of an encoded share: one x byte and 32 y bytes.
pub const SHARE_LEN: usize = 33;

/// Why sharing or reconstruction failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The threshold is 0 or larger than the number of shares.
    #[error("threshold {threshold} must be between 1 and the number of shares {shares}")]
    ThresholdOutOfRange {
        /// Requested threshold.
        threshold: usize,
        /// Requested number of shares.
        shares: usize,
    },
    /// Fewer shares than the threshold were given.
    #[error("{got} shares given but {needed} are needed to reconstruct")]
    TooFewShares {
        /// Shares given.
        got: usize,
        /// Threshold.
        needed: usize,
    },
    /// Two shares have the same x-coordinate.
    #[error("two shares have x-coordinate {x}; each share must come from a different holder")]
    DuplicateX {
        /// The repeated coordinate.
        x: u8,
    },
    /// A share has x-coordinate 0, which would be the secret itself.
    #[error("a share has x-coordinate 0, which no honest split produces")]
    ZeroX,
    /// An encoded share is not 33 bytes long.
    #[error("an encoded share is {got} bytes long but must be {SHARE_LEN}")]
    WrongShareLength {
        /// Length found.
        got: usize,
    },
    /// The shares beyond the threshold do not lie on the polynomial of the first ones.
    #[error("shares are inconsistent: at least one was corrupted")]
    InconsistentShares,
}

/// One share: x-coordinate and the 32 polynomial values at it.
#[derive(Clone, PartialEq, Eq)]
pub struct Share {
    /// x-coordinate, 1..=255.
    pub x: u8,
    /// Value of each byte's polynomial at `x`.
    pub y: [u8; 32],
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // y is secret material: show only the public coordinate.
        write!(f, "Share {{ x: {}, .. }}", self.x)
    }
}

impl Share {
    /// The 33-byte encoding `x ‖ y`.
    pub fn to_bytes(&self) -> [u8; SHARE_LEN] {
        let mut out = [0u8; SHARE_LEN];
        out[0] = self.x;
        out[1..].copy_from_slice(&self.y);
        out
    }

    /// Parses the 33-byte encoding; rejects other lengths and x = 0.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() != SHARE_LEN {
            return Err(Error::WrongShareLength { got: bytes.len() });
        }
        if bytes[0] == 0 {
            return Err(Error::ZeroX);
        }
        let mut y = [0u8; 32];
        y.copy_from_slice(&bytes[1..]);
        Ok(Self { x: bytes[0], y })
    }
}

/// Splits `secret` into `shares` shares with x = 1..=shares, any `threshold` of which recover it.
pub fn split(
    secret: &[u8; 32],
    threshold: u8,
    shares: u8,
    rng: &mut impl CryptoRng,
) -> Result<Vec<Share>, Error> {
    if threshold == 0 || threshold > shares {
        return Err(Error::ThresholdOutOfRange {
            threshold: threshold.into(),
            shares: shares.into(),
        });
    }
    // coefficients[0] is the secret; the others are uniformly random.
    let mut coefficients = vec![*secret; usize::from(threshold)];
    for c in &mut coefficients[1..] {
        rng.fill_bytes(c);
    }
    Ok((1..=shares)
        .map(|x| {
            let mut y = [0u8; 32];
            // Horner's rule from the highest coefficient down.
            for c in coefficients.iter().rev() {
                for (yb, cb) in y.iter_mut().zip(c) {
                    *yb = mul(*yb, x) ^ cb;
                }
            }
            Share { x, y }
        })
        .collect())
}

/// Recovers the secret from at least `threshold` shares.
///
/// Interpolates through the first `threshold` shares and checks that every further share lies on
/// the same polynomial ([`Error::InconsistentShares`] otherwise).
pub fn combine(threshold: usize, shares: &[Share]) -> Result<[u8; 32], Error> {
    if threshold == 0 || shares.len() < threshold {
        return Err(Error::TooFewShares {
            got: shares.len(),
            needed: threshold.max(1),
        });
    }
    let mut seen = [false; 256];
    for s in shares {
        if s.x == 0 {
            return Err(Error::ZeroX);
        }
        if std::mem::replace(&mut seen[usize::from(s.x)], true) {
            return Err(Error::DuplicateX { x: s.x });
        }
    }
    let (base, extra) = shares.split_at(threshold);
    let secret = evaluate(base, 0);
    for s in extra {
        if evaluate(base, s.x) != s.y {
            return Err(Error::InconsistentShares);
        }
    }
    Ok(secret)
}

/// Lagrange interpolation of the polynomial through `points` (distinct, nonzero x), evaluated
/// at `at`.
fn evaluate(points: &[Share], at: u8) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, pi) in points.iter().enumerate() {
        // Basis polynomial l_i(at) = prod_{m != i} (at - x_m) / (x_i - x_m); subtraction is XOR.
        // Only public x-coordinates enter here, so the tables are fine.
        let mut num = 1u8;
        let mut den = 1u8;
        for (m, pm) in points.iter().enumerate() {
            if m != i {
                num = mul(num, at ^ pm.x);
                den = mul(den, pi.x ^ pm.x);
            }
        }
        let coefficient = mul(num, INVERSE[usize::from(den)]);
        for (o, y) in out.iter_mut().zip(&pi.y) {
            *o ^= mul(coefficient, *y);
        }
    }
    out
}

/// Multiplication in GF(2^8) mod 0x11b without branches or tables.
const fn mul(a: u8, b: u8) -> u8 {
    let (mut a, mut b, mut r) = (a, b, 0u8);
    let mut i = 0;
    while i < 8 {
        r ^= a & 0u8.wrapping_sub(b & 1);
        let carry = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (0x1b & carry);
        b >>= 1;
        i += 1;
    }
    r
}

/// Multiplicative inverses (a^254), computed at compile time; `INVERSE[0] = 0` is never used
/// because x-coordinates are distinct.
const INVERSE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut a = 1;
    while a < 256 {
        // a^254 by square-and-multiply over the fixed exponent 0b1111_1110.
        let mut r = 1u8;
        let mut p = a as u8;
        let mut e = 254u32;
        while e > 0 {
            if e & 1 == 1 {
                r = mul(r, p);
            }
            p = mul(p, p);
            e >>= 1;
        }
        table[a] = r;
        a += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn inverse_table_is_correct() {
        for a in 1..=255u8 {
            assert_eq!(mul(a, INVERSE[usize::from(a)]), 1, "a = {a}");
        }
    }

    #[test]
    fn known_product() {
        // FIPS-197 section 4.2: {57} x {83} = {c1}.
        assert_eq!(mul(0x57, 0x83), 0xc1);
    }

    #[test]
    fn fewer_than_threshold_shares_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let shares = split(&[3; 32], 3, 5, &mut rng).unwrap();
        assert_eq!(
            combine(3, &shares[..2]),
            Err(Error::TooFewShares { got: 2, needed: 3 })
        );
    }

    #[test]
    fn duplicate_and_zero_x_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let shares = split(&[3; 32], 2, 3, &mut rng).unwrap();
        let dup = vec![shares[0].clone(), shares[0].clone()];
        assert_eq!(combine(2, &dup), Err(Error::DuplicateX { x: 1 }));
        let mut zero = shares.clone();
        zero[1].x = 0;
        assert_eq!(combine(2, &zero), Err(Error::ZeroX));
        assert_eq!(Share::from_bytes(&[0; 33]), Err(Error::ZeroX));
        assert_eq!(
            Share::from_bytes(&[1; 32]),
            Err(Error::WrongShareLength { got: 32 })
        );
    }

    #[test]
    fn corrupted_extra_share_is_detected() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut shares = split(&[9; 32], 2, 4, &mut rng).unwrap();
        assert_eq!(combine(2, &shares), Ok([9; 32]));
        shares[3].y[5] ^= 1;
        assert_eq!(combine(2, &shares), Err(Error::InconsistentShares));
    }

    #[test]
    fn bad_threshold_is_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        assert!(split(&[0; 32], 0, 3, &mut rng).is_err());
        assert!(split(&[0; 32], 4, 3, &mut rng).is_err());
    }
}
