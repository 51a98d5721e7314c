#!/usr/bin/env python3
"""Independent verifier for Quorum audit-log exports (format version 2).

Run: `python3 audit/testdata/verify_export.py EXPORT [--trusted-key FP]... [--expect-head SEQ:HASH]
[--witness OTHER_EXPORT]...` (needs the Python `cryptography` package, for Ed25519). It implements
the format in docs/AUDIT.md on its own and shares no code with the Rust crate, so an auditor can
check a log without trusting Quorum's verifier. Prints one `ok:` line and exits 0, or one `FAIL:`
line naming the first bad record and exits 1; usage errors exit 2.
"""
import argparse
import datetime
import hashlib
import json
import re
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

HEAD_LABEL = b"quorum-audit/head/v1"      # ‖ head_seq (u64 BE) ‖ head_hash: 60 bytes signed
ROTATE_LABEL = b"quorum-audit/rotate/v1"  # ‖ new public key: signed by the key in force
MEMBERS = {"actor", "details", "kind", "prev_hash", "round", "seq", "site", "time"}
ACTOR = re.compile(r"aggregator|authority|releases|site:.+", re.S)
TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|\+00:00)")
HEX64 = re.compile("[0-9a-fA-F]{64}")
SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


class Fail(Exception):
    """The first problem found; its text follows `FAIL: `."""


def need(ok, message):
    if not ok:
        raise Fail(message)


# ---- RFC 8785 (JSON Canonicalization Scheme) -----------------------------------------------

def jcs(v):
    """The canonical text of a parsed JSON value (encode as UTF-8 for the bytes)."""
    if v is None or isinstance(v, bool):
        return "null" if v is None else "true" if v else "false"
    if isinstance(v, (int, float)):
        return jcs_number(v)
    if isinstance(v, str):  # only `"`, `\` and U+0000..U+001F are escaped; the rest is raw
        return '"' + "".join(SHORT.get(c) or (f"\\u{ord(c):04x}" if c < " " else c) for c in v) + '"'
    if isinstance(v, list):
        return "[" + ",".join(jcs(x) for x in v) + "]"
    # Members sorted by key as UTF-16 code units: big-endian UTF-16 bytes sort the same way.
    keys = sorted(v, key=lambda k: k.encode("utf-16-be", "surrogatepass"))
    return "{" + ",".join(jcs(k) + ":" + jcs(v[k]) for k in keys) + "}"


def jcs_number(x):
    """ECMAScript Number.prototype.toString, from Python's shortest round-trip digits."""
    if isinstance(x, int):
        return str(x)  # |x| <= 2^53 (checked when parsed), so the double is exact
    need(x == x and abs(x) != float("inf"), "NaN or infinity is not JSON")
    if x <= 0:
        return "-" + jcs_number(-x) if x else "0"  # -0 is "0"
    mant, _, exp = repr(x).partition("e")  # e.g. '0.1', '1e-07', '1.5e+300', '123.0'
    whole, _, frac = mant.partition(".")
    digits = (whole + frac).lstrip("0")
    n = len(whole) + int(exp or 0) - (len(whole + frac) - len(digits))  # x = 0.digits × 10^n
    digits = digits.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + digits
    return digits[0] + ("." + digits[1:] if k > 1 else "") + "e" + format(n - 1, "+d")


def exact_int(text):
    # I-JSON: every number is a double, so a larger integer would be silently rounded.
    need(abs(int(text)) <= 2 ** 53, f"integer {text} is beyond ±2^53 (not I-JSON)")
    return int(text)


def no_constant(name):
    raise Fail(f"{name} is not JSON")


# ---- Record checks --------------------------------------------------------------------------

def hexbytes(value, n, what):
    ok = isinstance(value, str) and len(value) == 2 * n and re.fullmatch("[0-9a-f]*", value)
    need(ok, f"{what} is not {n} bytes of lower-case hex")
    return bytes.fromhex(value)


def members(details, kind, *names):
    ok = isinstance(details, dict) and set(details) == set(names)
    need(ok, f"{kind} details must have exactly the members {', '.join(names)}")
    return details


def ed25519_ok(public_key, signature, message):
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


def signed_head(d, kind):
    """Checks a head's fields and Ed25519 signature (own or witnessed); returns them."""
    head_seq = d["head_seq"]
    need(type(head_seq) is int and head_seq >= 0, f"{kind} head_seq is not a non-negative integer")
    head_hash = hexbytes(d["head_hash"], 32, f"{kind} head_hash")
    pk = hexbytes(d["public_key"], 32, f"{kind} public_key")
    sig = hexbytes(d["signature"], 64, f"{kind} signature")
    message = HEAD_LABEL + head_seq.to_bytes(8, "big") + head_hash
    need(ed25519_ok(pk, sig, message), f"{kind} signature is invalid")
    return head_seq, head_hash, pk


class Export:
    """One node's export, checked record by record on load (raises Fail at the first error)."""

    def __init__(self, path, trusted):
        self.hashes, self.keys_ever, self.witnesses = [], set(), []
        self.actor, self.key, self.heads, self.trusted = None, None, 0, trusted
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        need(lines != [b""], "export is empty")  # must not pass as an empty, valid log
        need(not lines[-1], f"seq {len(lines) - 1}: last line does not end in a newline")
        for seq, line in enumerate(lines[:-1]):
            self.round = None  # named in a failure once known
            try:
                self.record(seq, line)
            except Fail as e:
                where = f"seq {seq}" + (f" (round {self.round})" if self.round is not None else "")
                raise Fail(f"{where}: {e}") from None
        need(self.key or not trusted, "no audit_key record, so no key can match --trusted-key")

    def record(self, seq, line):
        try:
            rec = json.loads(line.decode("utf-8"), parse_int=exact_int, parse_constant=no_constant)
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise Fail(f"line is not UTF-8 JSON ({e})")
        ok = isinstance(rec, dict) and set(rec) == MEMBERS | {"hash"}
        need(ok, "line is not an object with exactly the record members and hash")
        rnd = rec["round"]
        need(rnd is None or type(rnd) is int and rnd >= 0, "round is not null or an integer >= 0")
        self.round = rnd
        try:  # the line must be exactly the JCS of what it holds (a lone surrogate is not UTF-8)
            canonical = (jcs(rec) + "\n").encode("utf-8")
            body = jcs({k: v for k, v in rec.items() if k != "hash"}).encode("utf-8")
        except UnicodeEncodeError:
            raise Fail("a string holds a lone surrogate (not UTF-8)")
        need(canonical == line + b"\n", "line is not in canonical (RFC 8785) form")
        need(type(rec["seq"]) is int and rec["seq"] == seq,
             f"record holds seq {rec['seq']!r} (records deleted or reordered)")
        prev = self.hashes[-1] if self.hashes else bytes(32)
        need(hexbytes(rec["prev_hash"], 32, "prev_hash") == prev,
             "prev_hash is not the hash of the record before (chain broken)")
        digest = hashlib.sha256(prev + body).digest()
        need(hexbytes(rec["hash"], 32, "hash") == digest, "hash does not match the record (edited)")
        actor = rec["actor"]
        need(isinstance(actor, str) and ACTOR.fullmatch(actor),
             f"actor {actor!r} is not aggregator or site:<name>")
        need(self.actor in (None, actor), f"actor {actor} differs from the export's {self.actor}")
        self.actor = actor
        need(isinstance(rec["kind"], str) and isinstance(rec["site"], (str, type(None))),
             "kind is not a string, or site is neither null nor a string")
        try:
            datetime.datetime.strptime(TIME.fullmatch(rec["time"])[1], "%Y-%m-%dT%H:%M:%S")
        except (TypeError, ValueError):  # no match (or not a string), or not a real date
            raise Fail(f"time {rec['time']!r} is not an RFC 3339 UTC timestamp")
        self.hashes.append(digest)
        check = {"audit_key": self.audit_key, "signed_head": self.own_head, "witness": self.witness}
        if rec["kind"] in check:
            check[rec["kind"]](seq, rec["details"])

    def audit_key(self, seq, details):
        d = members(details, "audit_key", "public_key", "fingerprint", "previous", "endorsement")
        pk = hexbytes(d["public_key"], 32, "audit_key public_key")
        fp = hashlib.sha256(pk).hexdigest()
        need(d["fingerprint"] == fp, "audit_key fingerprint is not SHA-256 of its public key")
        if self.key is None:  # the first key is in force by being first; trust comes from outside
            need(d["previous"] is None and d["endorsement"] is None,
                 "first audit_key has a previous key or an endorsement")
            need(not self.trusted or fp in self.trusted,
                 f"audit key {fp} is not a --trusted-key (log re-signed with another key?)")
        else:  # a rotation: endorsed by the key in force
            old_pk, old_fp = self.key
            need(d["previous"] == old_fp,
                 f"key rotation names previous {d['previous']}, but {old_fp} is in force")
            sig = hexbytes(d["endorsement"], 64, "audit_key endorsement")
            need(ed25519_ok(old_pk, sig, ROTATE_LABEL + pk),
                 "key rotation endorsement is not a valid signature by the key in force")
        self.key = (pk, fp)
        self.keys_ever.add(pk)

    def own_head(self, seq, details):
        d = members(details, "signed_head", "head_hash", "head_seq", "public_key", "signature")
        need(seq >= 1 and self.key, "signed_head at seq 0, or before any audit_key record")
        head_seq, head_hash, pk = signed_head(d, "signed_head")
        need(pk == self.key[0], "signed_head public_key is not the key in force")
        need(head_seq == seq - 1 and head_hash == self.hashes[seq - 1],
             f"signed head {head_seq}:{head_hash.hex()} is not the chain before it "
             "(records rewritten and re-linked after signing)")
        self.heads += 1

    def witness(self, seq, details):
        d = members(details, "witness", "node", "head_seq", "head_hash", "public_key", "signature")
        node = d["node"]
        need(isinstance(node, str) and ACTOR.fullmatch(node) and node != self.actor,
             f"witness node {node!r} is not another node")
        self.witnesses.append((self.round, seq, node) + signed_head(d, "witness"))


def main():
    p = argparse.ArgumentParser(description="Verify a Quorum audit-log export (JSONL, format v2).")
    p.add_argument("export")
    p.add_argument("--trusted-key", action="append", default=[], metavar="FINGERPRINT")
    p.add_argument("--expect-head", action="append", default=[], metavar="SEQ:HASH")
    p.add_argument("--witness", action="append", default=[], metavar="OTHER_EXPORT")
    a = p.parse_args()
    for fp in a.trusted_key:
        if not HEX64.fullmatch(fp):
            p.error(f"--trusted-key {fp!r} is not a key fingerprint (64 hex digits)")  # exit 2
    expected = []
    for head in a.expect_head:
        seq, _, h = head.partition(":")
        if not seq.isdigit() or not HEX64.fullmatch(h):
            p.error(f"--expect-head {head!r} is not SEQ:HASH (64 hex digits)")
        expected.append((int(seq), bytes.fromhex(h)))
    try:
        log = Export(a.export, {fp.lower() for fp in a.trusted_key})
        for seq, h in expected:  # a head kept from an earlier audit: catches truncation
            head = f"seq {seq}: expected head {seq}:{h.hex()}"
            need(seq < len(log.hashes), f"{head} is missing (log truncated)")
            need(log.hashes[seq] == h, f"{head} differs (log rewritten)")
        mine = []  # this node's heads that other nodes stored, from every --witness export
        for path in a.witness:
            try:
                other = Export(path, set())  # its chain and witness signatures must hold too
            except Fail as e:
                raise Fail(f"witness export {path}: {e}") from None
            mine += [w + (path,) for w in other.witnesses if w[2] == log.actor]
        # Report the first by round (witnesses without a round last, by file and seq).
        for rnd, wseq, _, head_seq, head_hash, pk, path in sorted(
                mine, key=lambda w: (w[0] is None, w[0] or 0, a.witness.index(w[6]), w[1])):
            by = f"round {rnd}" if rnd is not None else f"{path} seq {wseq}"
            head = f"{by}: witnessed head {head_seq}:{head_hash.hex()}"
            need(head_seq < len(log.hashes), f"{head} is missing (log truncated or rolled back)")
            need(log.hashes[head_seq] == head_hash, f"{head} differs (log rewritten)")
            need(pk in log.keys_ever, f"{head} was signed by a key never in force in this log")
    except Fail as e:
        print(f"FAIL: {e}")
        return 1
    except OSError as e:
        p.error(f"cannot read {e.filename}: {e.strerror}")
    fp = log.key[1] if log.key else "none"
    print(f"ok: {len(log.hashes)} records, {log.heads} signed heads, key {fp} in force, "
          f"last {len(log.hashes) - 1}:{log.hashes[-1].hex()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
