#!/usr/bin/env python3
"""Regenerates the SecAgg known-answer files in this folder.

Run from the repository root: `python3 crypto/testdata/gen_kats.py` (needs the Python
`cryptography` package). This is an independent implementation of the formats documented in
README.md; it shares no code with the Rust crate, so agreement of both is evidence that the
Rust code implements the documented format. The files are deterministic: rerunning this script
must leave them unchanged (`git diff crypto/testdata` stays empty); crypto/tests/secagg_kat.rs
checks the Rust code against every block.
"""
import hashlib
import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = "# Produced by crypto/testdata/gen_kats.py (Python `cryptography`), independent of the Rust code."


def det(label, n):
    """Deterministic test bytes: SHA-256 counter mode over a label."""
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(label.encode() + struct.pack(">I", i)).digest()
        i += 1
    return out[:n]


def hkdf(ikm, info):
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)


def fed_bytes(fed):
    b = fed.encode()
    return struct.pack(">I", len(b)) + b


def keystream(key, start_block, nbytes):
    enc = Cipher(algorithms.AES(key), modes.CTR(start_block.to_bytes(16, "big"))).encryptor()
    return enc.update(b"\0" * nbytes)


def prg_elements(seed, rnd, bits, offset, count, label=b"quorum/mask/v1"):
    key = hkdf(seed, label + struct.pack(">I", rnd))
    ks = keystream(key, 0, 4 * (offset + count))
    mask = (1 << bits) - 1
    return key, [struct.unpack_from("<I", ks, 4 * i)[0] & mask for i in range(offset, offset + count)]


def write(name, header, blocks):
    with open(os.path.join(HERE, name), "w") as f:
        f.write(header.strip() + "\n" + SOURCE + "\n")
        for comment, fields in blocks:
            f.write("\n# " + comment + "\n")
            for k, v in fields:
                f.write(f"{k} = {v}\n")


def ints(xs):
    return ", ".join(str(x) for x in xs)


def gen_prg():
    blocks = []
    cases = [(0, 8, 0, 12), (1, 16, 0, 12), (7, 20, 3, 10), (0xFFFFFFFF, 32, 1021, 9), (42, 13, 5, 11)]
    for i, (rnd, bits, offset, count) in enumerate(cases):
        seed = det(f"prg seed {i}", 32)
        key, elems = prg_elements(seed, rnd, bits, offset, count)
        blocks.append((
            f"Mask PRG case {i}: HKDF-SHA256 key, AES-256-CTR from counter 0, elements from Offset.",
            [("Seed", seed.hex()), ("Round", rnd), ("Bits", bits), ("Offset", offset),
             ("Key", key.hex()), ("Elements", ints(elems))],
        ))
    write("prg_tests.txt", "# Mask PRG known answers (see README.md, \"Mask PRG\").", blocks)


def x25519_pair(label):
    sk = det(label, 32)
    priv = X25519PrivateKey.from_private_bytes(sk)
    pk = priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return sk, pk, priv


def gen_share():
    blocks = []
    for i, (fed, rnd, sender, receiver) in enumerate([("demo", 1, 0, 1), ("hospital-consortium", 77, 12, 3)]):
        a_sk, a_pk, a = x25519_pair(f"share a {i}")
        b_sk, b_pk, b = x25519_pair(f"share b {i}")
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
        shared = a.exchange(X25519PublicKey.from_public_bytes(b_pk))
        binding = fed_bytes(fed) + struct.pack(">III", rnd, sender, receiver)
        key = hkdf(shared, b"quorum/share/v1" + binding)
        seed_share = bytes([i + 1]) + det(f"seed share {i}", 32)
        key_share = bytes([i + 1]) + det(f"key share {i}", 32)
        plaintext = struct.pack(">II", sender, receiver) + seed_share + key_share
        ct = AESGCM(key).encrypt(b"\0" * 12, plaintext, binding)
        blocks.append((
            f"Share encryption case {i}: X25519, HKDF-SHA256 (info = label || binding), AES-256-GCM, zero nonce, AAD = binding.",
            [("Federation", fed), ("Round", rnd), ("Sender", sender), ("Receiver", receiver),
             ("SenderSecret", a_sk.hex()), ("ReceiverPublic", b_pk.hex()),
             ("ReceiverSecret", b_sk.hex()), ("SenderPublic", a_pk.hex()),
             ("SharedSecret", shared.hex()), ("Binding", binding.hex()), ("Key", key.hex()),
             ("SelfMaskSeedShare", seed_share.hex()), ("MaskKeyShare", key_share.hex()),
             ("Plaintext", plaintext.hex()), ("Ciphertext", ct.hex())],
        ))
    write("share_kdf_tests.txt", "# Share-encryption key derivation and AES-256-GCM (README.md, \"Share encryption\").", blocks)


def gen_pairwise():
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    blocks = []
    for i, (fed, rnd, u, v) in enumerate([("demo", 1, 0, 1), ("demo", 2, 9, 4), ("bank-fl", 1000, 500, 999)]):
        u_sk, u_pk, up = x25519_pair(f"pair u {i}")
        v_sk, v_pk, vp = x25519_pair(f"pair v {i}")
        shared = up.exchange(X25519PublicKey.from_public_bytes(v_pk))
        info = b"quorum/pairwise/v1" + fed_bytes(fed) + struct.pack(">III", rnd, min(u, v), max(u, v))
        seed = hkdf(shared, info)
        blocks.append((
            f"Pairwise seed case {i}: HKDF-SHA256(X25519(u, v), info = label || fed || round || min || max).",
            [("Federation", fed), ("Round", rnd), ("U", u), ("V", v), ("USecret", u_sk.hex()),
             ("VPublic", v_pk.hex()), ("Seed", seed.hex())],
        ))
    write("pairwise_kdf_tests.txt", "# Pairwise mask seed derivation (README.md, \"Pairwise seed\").", blocks)


def pack(bits, values):
    acc, n = 0, 0
    for j, v in enumerate(values):
        acc |= (v & ((1 << bits) - 1)) << (j * bits)
        n += bits
    return acc.to_bytes((n + 7) // 8, "little")


def gen_packing():
    blocks = []
    for bits, count in [(8, 5), (9, 7), (12, 4), (16, 3), (17, 5), (24, 3), (31, 3), (32, 3), (13, 0)]:
        values = [int.from_bytes(det(f"pack {bits} {j}", 4), "little") & ((1 << bits) - 1) for j in range(count)]
        blocks.append((
            f"Packing, {bits} bits: LSB-first bit stream, zero-padded last byte.",
            [("Bits", bits), ("Values", ints(values) if values else "-"), ("Packed", pack(bits, values).hex() or "-")],
        ))
    write("packing_tests.txt", "# Bit packing (README.md, \"Packing\"). '-' marks an empty list.", blocks)


def gf_mul(a, b):
    r = 0
    for _ in range(8):
        if b & 1:
            r ^= a
        hi = a & 0x80
        a = (a << 1) & 0xFF
        if hi:
            a ^= 0x1B
        b >>= 1
    return r


def gen_shamir():
    blocks = []
    for i, (t, k, pick) in enumerate([(1, 1, [1]), (2, 3, [3, 1]), (3, 5, [5, 2, 4]), (4, 7, [7, 6, 1, 3, 2])]):
        secret = det(f"shamir secret {i}", 32)
        coeffs = [secret] + [det(f"shamir coeff {i} {j}", 32) for j in range(1, t)]
        shares = []
        for x in pick:
            y = bytearray(32)
            for c in reversed(coeffs):
                for b in range(32):
                    y[b] = gf_mul(y[b], x) ^ c[b]
            shares.append(bytes([x]) + bytes(y))
        fields = [("Threshold", t)] + [(f"Share{j}", s.hex()) for j, s in enumerate(shares)] + [("Secret", secret.hex())]
        blocks.append((f"Shamir {t}-of-{k} over GF(2^8) mod 0x11b, shares x || y; polynomial coefficients from SHA-256.", fields))
    write("shamir_tests.txt", "# Shamir reconstruction (README.md, \"Shamir shares\"). Share<j> keys are numbered from 0.", blocks)


def graph(seed, rnd, n, k):
    key = hkdf(seed, b"quorum/graph/v1" + struct.pack(">I", rnd))
    ks = keystream(key, 0, 4 * 4096)
    words = iter(struct.unpack("<4096I", ks))
    ring = list(range(n))
    for i in range(n - 1, 0, -1):
        m = i + 1
        limit = (1 << 32) // m * m
        while True:
            w = next(words)
            if w < limit:
                break
        j = w % m
        ring[i], ring[j] = ring[j], ring[i]
    pos = {c: p for p, c in enumerate(ring)}
    out = []
    for c in range(n):
        p = pos[c]
        nb = set()
        for d in range(1, k // 2 + 1):
            nb.add(ring[(p + d) % n])
            nb.add(ring[(p - d) % n])
        if k % 2:
            nb.add(ring[(p + n // 2) % n])
        out.append(sorted(nb))
    return out


def gen_graph():
    blocks = []
    for i, (rnd, n, k) in enumerate([(1, 5, 4), (3, 12, 4), (9, 40, 7), (2, 41, 10)]):
        seed = det(f"graph seed {i}", 32)
        g = graph(seed, rnd, n, k)
        fields = [("RoundSeed", seed.hex()), ("Round", rnd), ("Clients", n), ("Degree", k)]
        fields += [(f"Neighbours{c}", ints(g[c])) for c in (0, 1, n - 1)]
        blocks.append((f"Neighbour graph: Fisher-Yates over the graph keystream, Harary ring of degree {k}.", fields))
    write("graph_tests.txt", "# Neighbour graph (README.md, \"Neighbour graph\"). Neighbours<c> lists client c's neighbours.", blocks)


def gen_messages():
    blocks = []
    fed, rnd = "demo", 5
    spk, mpk = det("adv spk", 32), det("adv mpk", 32)
    offer = det("offer digest", 32)
    adv = b"quorum/advertise/v2" + fed_bytes(fed) + struct.pack(">I", rnd) + offer + struct.pack(">I", 3) + spk + mpk
    blocks.append(("Advertisement signing input.", [("Federation", fed), ("Round", rnd), ("OfferDigest", offer.hex()), ("Client", 3),
                   ("SharePublicKey", spk.hex()), ("MaskPublicKey", mpk.hex()), ("Message", adv.hex())]))
    surv = [0, 2, 3, 7]
    msg = b"quorum/survivors/v2" + fed_bytes(fed) + struct.pack(">I", rnd) + offer + struct.pack(">I", len(surv)) + b"".join(struct.pack(">I", s) for s in surv)
    blocks.append(("Survivor-set signing input.", [("Federation", fed), ("Round", rnd), ("OfferDigest", offer.hex()), ("Survivors", ints(surv)), ("Message", msg.hex())]))
    write("message_tests.txt", "# Signed byte strings (README.md, \"Signed messages\").", blocks)


if __name__ == "__main__":
    gen_prg()
    gen_share()
    gen_pairwise()
    gen_packing()
    gen_shamir()
    gen_graph()
    gen_messages()
