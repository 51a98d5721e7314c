//! Known-answer tests against `crypto/testdata/*_tests.txt` (produced by `gen_kats.py`, an
//! independent Python implementation). The runner fails on a missing key, an unused key, or a
//! file without blocks.

use aes::Aes256;
use aes::cipher::{BlockEncrypt, KeyInit};
use quorum_crypto::packing::{pack, unpack};
use quorum_crypto::prg::{MaskPrg, mask_key};
use quorum_crypto::secagg::{Params, RoundContext, advertisement_message, survivors_message};
use quorum_crypto::shamir::{Share, combine};
use quorum_crypto::share_crypto::{
    SharePayload, agree, open_payload, pairwise_seed, seal_payload, share_binding, share_key,
};
use x25519_dalek::{PublicKey, StaticSecret};

/// One `key = value` block; every key must be consumed before [`Block::finish`].
struct Block {
    file: &'static str,
    line: usize,
    fields: Vec<(String, String, bool)>,
}

impl Block {
    fn take(&mut self, key: &str) -> String {
        let (file, line) = (self.file, self.line);
        let field = self
            .fields
            .iter_mut()
            .find(|(k, _, _)| k == key)
            .unwrap_or_else(|| panic!("{file}:{line}: missing key {key}"));
        assert!(!field.2, "{file}:{line}: key {key} read twice");
        field.2 = true;
        field.1.clone()
    }

    fn bytes(&mut self, key: &str) -> Vec<u8> {
        let v = self.take(key);
        if v == "-" {
            return Vec::new();
        }
        hex::decode(&v).unwrap_or_else(|e| panic!("{}:{}: {key}: {e}", self.file, self.line))
    }

    fn array(&mut self, key: &str) -> [u8; 32] {
        let b = self.bytes(key);
        b.try_into()
            .unwrap_or_else(|_| panic!("{}:{}: {key} is not 32 bytes", self.file, self.line))
    }

    fn u32(&mut self, key: &str) -> u32 {
        self.take(key).parse().expect("decimal u32")
    }

    fn u32s(&mut self, key: &str) -> Vec<u32> {
        let v = self.take(key);
        if v == "-" {
            return Vec::new();
        }
        v.split(',')
            .map(|x| x.trim().parse().expect("u32 list"))
            .collect()
    }

    fn count_prefixed(&self, prefix: &str) -> usize {
        self.fields
            .iter()
            .filter(|f| f.0.starts_with(prefix))
            .count()
    }

    fn finish(self) {
        let unused: Vec<_> = self.fields.iter().filter(|f| !f.2).map(|f| &f.0).collect();
        assert!(
            unused.is_empty(),
            "{}:{}: unused keys {unused:?}",
            self.file,
            self.line
        );
    }
}

fn blocks(file: &'static str) -> Vec<Block> {
    let path = format!("{}/testdata/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out = Vec::new();
    let mut current: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            out.extend(current.take());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once(" = ")
            .unwrap_or_else(|| panic!("{file}:{}: expected `key = value`", i + 1));
        current
            .get_or_insert_with(|| Block {
                file,
                line: i + 1,
                fields: Vec::new(),
            })
            .fields
            .push((k.to_string(), v.to_string(), false));
    }
    out.extend(current);
    assert!(!out.is_empty(), "{file} has no test blocks");
    out
}

#[test]
fn prg_known_answers() {
    for mut b in blocks("prg_tests.txt") {
        let (seed, round, bits) = (b.array("Seed"), b.u32("Round"), b.u32("Bits"));
        let offset = b.u32("Offset") as usize;
        let key = b.array("Key");
        let expected = b.u32s("Elements");
        assert_eq!(mask_key(&seed, round), key, "HKDF key, block at {}", b.line);
        let prg = MaskPrg::new(&seed, round);
        let mut got = vec![0; expected.len()];
        prg.fill(offset, &mut got, bits);
        assert_eq!(got, expected, "elements, block at {}", b.line);
        // Adding onto zeros is the same as filling; subtracting gives the negation.
        let mut added = vec![0; expected.len()];
        prg.add_to(offset, &mut added, bits);
        assert_eq!(added, expected);
        // Cross-check counter mode: keystream block 0 = AES-256-ECB(key, 0^128), via the block
        // cipher directly.
        let mut block = [0u8; 16].into();
        Aes256::new(&key.into()).encrypt_block(&mut block);
        let mut first = [0u32; 4];
        prg.fill(0, &mut first, 32);
        let first: Vec<u8> = first.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(first.as_slice(), block.as_slice());
        b.finish();
    }
}

#[test]
fn share_encryption_known_answers() {
    for mut b in blocks("share_kdf_tests.txt") {
        let fed = b.take("Federation");
        let (round, sender, receiver) = (b.u32("Round"), b.u32("Sender"), b.u32("Receiver"));
        let sender_secret = StaticSecret::from(b.array("SenderSecret"));
        let receiver_public = b.array("ReceiverPublic");
        let receiver_secret = StaticSecret::from(b.array("ReceiverSecret"));
        let sender_public = b.array("SenderPublic");
        let shared = b.array("SharedSecret");
        assert_eq!(PublicKey::from(&sender_secret).to_bytes(), sender_public);
        assert_eq!(agree(&sender_secret, &receiver_public).unwrap(), shared);
        assert_eq!(agree(&receiver_secret, &sender_public).unwrap(), shared);
        assert_eq!(
            share_binding(&fed, round, sender, receiver),
            b.bytes("Binding")
        );
        assert_eq!(
            share_key(&shared, &fed, round, sender, receiver),
            b.array("Key")
        );
        let payload = SharePayload {
            sender,
            receiver,
            self_mask_seed: Share::from_bytes(&b.bytes("SelfMaskSeedShare")).unwrap(),
            mask_key: Share::from_bytes(&b.bytes("MaskKeyShare")).unwrap(),
        };
        assert_eq!(payload.to_bytes().to_vec(), b.bytes("Plaintext"));
        let ciphertext = b.bytes("Ciphertext");
        assert_eq!(seal_payload(&shared, &fed, round, &payload), ciphertext);
        assert_eq!(
            open_payload(&shared, &fed, round, sender, receiver, &ciphertext).unwrap(),
            payload
        );
        b.finish();
    }
}

#[test]
fn pairwise_seed_known_answers() {
    for mut b in blocks("pairwise_kdf_tests.txt") {
        let fed = b.take("Federation");
        let (round, u, v) = (b.u32("Round"), b.u32("U"), b.u32("V"));
        let shared = agree(&StaticSecret::from(b.array("USecret")), &b.array("VPublic")).unwrap();
        let seed = b.array("Seed");
        assert_eq!(pairwise_seed(&shared, &fed, round, u, v), seed);
        assert_eq!(pairwise_seed(&shared, &fed, round, v, u), seed);
        b.finish();
    }
}

#[test]
fn packing_known_answers() {
    for mut b in blocks("packing_tests.txt") {
        let bits = b.u32("Bits");
        let values = b.u32s("Values");
        let packed = b.bytes("Packed");
        assert_eq!(pack(bits, &values), packed, "bits {bits}");
        assert_eq!(unpack(bits, &packed, values.len()).unwrap(), values);
        b.finish();
    }
}

#[test]
fn shamir_known_answers() {
    for mut b in blocks("shamir_tests.txt") {
        let threshold = b.u32("Threshold") as usize;
        // Blocks may hold more shares than the threshold; combine checks the extras agree.
        let shares: Vec<Share> = (0..b.count_prefixed("Share"))
            .map(|j| Share::from_bytes(&b.bytes(&format!("Share{j}"))).unwrap())
            .collect();
        assert_eq!(combine(threshold, &shares).unwrap(), b.array("Secret"));
        b.finish();
    }
}

#[test]
fn graph_known_answers() {
    for mut b in blocks("graph_tests.txt") {
        let round_seed = b.array("RoundSeed");
        let (round, clients, degree) = (b.u32("Round"), b.u32("Clients"), b.u32("Degree"));
        let ctx = RoundContext {
            federation: "kat".into(),
            round,
            round_seed,
            offer_digest: [0; 32],
            params: Params {
                clients,
                neighbours: degree,
                threshold: degree / 2 + 1,
                min_survivors: degree / 2 + 1,
                bits: 16,
                dim: 1,
            },
        };
        ctx.params.validate().unwrap();
        for c in [0, 1, clients - 1] {
            assert_eq!(
                ctx.neighbours(c),
                b.u32s(&format!("Neighbours{c}")),
                "client {c}"
            );
        }
        b.finish();
    }
}

#[test]
fn signed_message_known_answers() {
    let mut blocks = blocks("message_tests.txt").into_iter();
    let (Some(mut adv), Some(mut surv), None) = (blocks.next(), blocks.next(), blocks.next())
    else {
        panic!("message_tests.txt must hold exactly two blocks");
    };
    let fed = adv.take("Federation");
    let msg = advertisement_message(
        &fed,
        adv.u32("Round"),
        &adv.array("OfferDigest"),
        adv.u32("Client"),
        &adv.array("SharePublicKey"),
        &adv.array("MaskPublicKey"),
    );
    assert_eq!(msg, adv.bytes("Message"));
    adv.finish();
    let fed = surv.take("Federation");
    let msg = survivors_message(
        &fed,
        surv.u32("Round"),
        &surv.array("OfferDigest"),
        &surv.u32s("Survivors"),
    );
    assert_eq!(msg, surv.bytes("Message"));
    surv.finish();
}
