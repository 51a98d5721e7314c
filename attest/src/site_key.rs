//! The key types a site certificate may carry, and signing and verifying with them.
//!
//! A site signs its attestation evidence, SecAgg+ advertisements and survivor sets with the
//! key of its certificate. Quorum's own authority issues Ed25519 keys; a site enrolled by an
//! institution's existing PKI may hold an ECDSA P-256 or an RSA key (2048 to 4096 bits)
//! instead. The signature scheme follows from the key: Ed25519, ECDSA P-256 with SHA-256
//! (ASN.1 DER signatures), RSA-PSS with SHA-256.

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RSA_PSS_SHA256,
    RsaKeyPair,
};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::SignatureVerificationAlgorithm;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// The key algorithm of a certificate, where Quorum can sign and verify with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// Ed25519 (what `quorum-client keygen` makes).
    Ed25519,
    /// ECDSA on NIST P-256.
    EcdsaP256,
    /// RSA, 2048 to 4096 bits.
    Rsa,
}

impl KeyAlgorithm {
    /// The algorithm of a subject public key, or `None` for any other (an ECDSA key on
    /// another curve, DSA, ...).
    pub(crate) fn of(spki: &SubjectPublicKeyInfo<'_>) -> Option<Self> {
        let oid = &spki.algorithm.algorithm;
        if *oid == OID_SIG_ED25519 {
            Some(Self::Ed25519)
        } else if *oid == OID_PKCS1_RSAENCRYPTION {
            // ring signs with 2048- to 4096-bit keys.
            let Ok(PublicKey::RSA(key)) = spki.parsed() else {
                return None;
            };
            (2048..=4096)
                .contains(&rsa_bits(key.modulus))
                .then_some(Self::Rsa)
        } else if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
            (curve == OID_EC_P256).then_some(Self::EcdsaP256)
        } else {
            None
        }
    }

    /// How a signature by a key of this algorithm is checked.
    pub(crate) fn verification(self) -> &'static dyn SignatureVerificationAlgorithm {
        match self {
            Self::Ed25519 => webpki::ring::ED25519,
            Self::EcdsaP256 => webpki::ring::ECDSA_P256_SHA256,
            Self::Rsa => webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        }
    }

    /// Lowercase name, for messages and records.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ed25519 => "ed25519",
            Self::EcdsaP256 => "ecdsa-p256",
            Self::Rsa => "rsa",
        }
    }
}

/// The size of an RSA modulus (big-endian, perhaps with leading zero bytes) in bits.
fn rsa_bits(modulus: &[u8]) -> usize {
    match modulus.iter().position(|&b| b != 0) {
        Some(first) => (modulus.len() - first) * 8 - modulus[first].leading_zeros() as usize,
        None => 0,
    }
}

/// A site's private key, ready to sign.
pub(crate) enum SigningKey {
    Ed25519(Ed25519KeyPair),
    EcdsaP256(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

impl SigningKey {
    /// Parses `der` as a key of `algorithm` (the certificate's). PKCS#8 serves every algorithm;
    /// an RSA key may also be PKCS#1 (`BEGIN RSA PRIVATE KEY`). Errors say what to change.
    pub(crate) fn parse(der: &PrivateKeyDer<'_>, algorithm: KeyAlgorithm) -> Result<Self, String> {
        let unusable = |e: ring::error::KeyRejected| e.to_string();
        match (der, algorithm) {
            (PrivateKeyDer::Pkcs8(der), KeyAlgorithm::Ed25519) => {
                Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
                    .map(Self::Ed25519)
                    .map_err(unusable)
            }
            (PrivateKeyDer::Pkcs8(der), KeyAlgorithm::EcdsaP256) => EcdsaKeyPair::from_pkcs8(
                &ECDSA_P256_SHA256_ASN1_SIGNING,
                der.secret_pkcs8_der(),
                &SystemRandom::new(),
            )
            .map(Self::EcdsaP256)
            .map_err(unusable),
            (PrivateKeyDer::Pkcs8(der), KeyAlgorithm::Rsa) => {
                RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
                    .map(Self::Rsa)
                    .map_err(unusable)
            }
            (PrivateKeyDer::Pkcs1(der), KeyAlgorithm::Rsa) => {
                RsaKeyPair::from_der(der.secret_pkcs1_der())
                    .map(Self::Rsa)
                    .map_err(unusable)
            }
            (PrivateKeyDer::Sec1(_), KeyAlgorithm::EcdsaP256) => Err(
                "an SEC1 EC key (BEGIN EC PRIVATE KEY); convert it with `openssl pkcs8 -topk8 \
                 -nocrypt -in site.key -out site.pk8 && mv site.pk8 site.key`"
                    .into(),
            ),
            (_, algorithm) => Err(format!(
                "not a PKCS#8 private key of the certificate's kind ({})",
                algorithm.name()
            )),
        }
    }

    /// The public key as a certificate's subject public key carries it.
    pub(crate) fn public_key(&self) -> &[u8] {
        match self {
            Self::Ed25519(key) => key.public_key().as_ref(),
            Self::EcdsaP256(key) => key.public_key().as_ref(),
            Self::Rsa(key) => key.public_key().as_ref(),
        }
    }

    /// Signs `message` with the scheme [`KeyAlgorithm::verification`] checks.
    pub(crate) fn sign(&self, message: &[u8]) -> Vec<u8> {
        match self {
            Self::Ed25519(key) => key.sign(message).as_ref().to_vec(),
            // Only a failing system random generator makes these fail: nothing to recover.
            Self::EcdsaP256(key) => key
                .sign(&SystemRandom::new(), message)
                .expect("the system random generator failed")
                .as_ref()
                .to_vec(),
            Self::Rsa(key) => {
                let mut signature = vec![0; key.public().modulus_len()];
                key.sign(
                    &RSA_PSS_SHA256,
                    &SystemRandom::new(),
                    message,
                    &mut signature,
                )
                .expect("the system random generator failed");
                signature
            }
        }
    }
}
