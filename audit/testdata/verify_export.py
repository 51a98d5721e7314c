#!/usr/bin/env python3
"""Independent verifier for Quorum audit-log exports (format version 2).

Run: `python3 audit/testdata/verify_export.py EXPORT [--trusted-key FP]... [--expect-head SEQ:HASH]
[--witness OTHER_EXPORT]... [--pruned-export FILE]...` (needs the Python `cryptography` package,
for Ed25519). It implements the format in docs/AUDIT.md on its own and shares no code with the
Rust crate, so an auditor can check a log without trusting Quorum's verifier. Prints one `ok:`
line and exits 0, or one `FAIL:` line naming the first bad record and exits 1; usage errors
exit 2.
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


def pruned_details(details):
    d = members(details, "pruned", "from", "to", "export_sha256", "last_hash", "public_key")
    for name in "from", "to":
        need(type(d[name]) is int and d[name] >= 0, f"pruned {name} is not an integer >= 0")
    need(d["from"] <= d["to"], "pruned from is after to")
    for name in "export_sha256", "last_hash", "public_key":  # public_key null: no key in force
        if name != "public_key" or d[name] is not None:
            hexbytes(d[name], 32, f"pruned {name}")
    return d


def start_of(lines, known):
    """The `pruned` details a log starting at seq S > 0 continues from (`to` = S - 1): its own,
    else one in `known` (the newer log that signed this export). None: the seq check fails."""
    try:
        first, found = json.loads(lines[0])["seq"], []
    except (ValueError, TypeError, KeyError):
        return None
    for line in (x for x in lines if b'"kind":"pruned"' in x):  # every record is checked later
        try:
            found.append(pruned_details(json.loads(line)["details"]))
        except (ValueError, TypeError, KeyError, Fail):
            pass  # a malformed one fails where it stands, in order
    return next((d for d in found + list(known) if d["to"] + 1 == first), None)


class Export:
    """One node's export, checked record by record on load (raises Fail at the first error).
    A pruned one starts at seq S > 0, from the hash and key its `pruned` record names."""

    def __init__(self, path, trusted, known=()):
        self.hashes, self.keys_ever, self.witnesses, self.pruned = {}, set(), [], []  # by seq
        self.actor, self.key, self.heads, self.trusted, self.path = None, None, 0, trusted, path
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        need(lines != [b""], "export is empty")  # must not pass as an empty, valid log
        self.start = start_of(lines, known)
        self.first = self.start["to"] + 1 if self.start else 0
        self.prev = bytes.fromhex(self.start["last_hash"]) if self.start else bytes(32)
        if self.start and self.start["public_key"]:
            pk = bytes.fromhex(self.start["public_key"])
            self.key = (pk, hashlib.sha256(pk).hexdigest())
            self.keys_ever.add(pk)
        # A key put in force by a pruned record is trusted if pinned, or if the export before
        # (checked with the same keys) ends with it in force: settled in with_exports().
        self.vouched = not trusted or not self.key or self.key[1] in trusted
        self.start_key, self.start_seq, self.last_head = self.key, None, -1
        need(not lines[-1],
             f"seq {self.first + len(lines) - 1}: last line does not end in a newline")
        for seq, line in enumerate(lines[:-1], self.first):
            self.round = None  # named in a failure once known
            try:
                self.record(seq, line)
            except Fail as e:
                where = f"seq {seq}" + (f" (round {self.round})" if self.round is not None else "")
                raise Fail(f"{where}: {e}") from None
        need(self.key or not trusted, "no audit_key record, so no key can match --trusted-key")
        need(self.start_seq is None or self.last_head > self.start_seq,  # else nobody signed it
             f"seq {self.start_seq}: no signed head after the pruned record the log starts from")
        self.last = self.first + len(self.hashes) - 1

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
        need(hexbytes(rec["prev_hash"], 32, "prev_hash") == self.prev,
             "prev_hash is not the hash of the record before (chain broken)")
        digest = hashlib.sha256(self.prev + body).digest()
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
        self.hashes[seq] = digest
        check = {"audit_key": self.audit_key, "signed_head": self.own_head, "witness": self.witness,
                 "pruned": self.pruned_record}
        if rec["kind"] in check:
            check[rec["kind"]](seq, rec["details"])
        self.prev = digest

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
        need(head_seq == seq - 1 and head_hash == self.prev,
             f"signed head {head_seq}:{head_hash.hex()} is not the chain before it "
             "(records rewritten and re-linked after signing)")
        self.heads, self.last_head = self.heads + 1, seq

    def witness(self, seq, details):
        d = members(details, "witness", "node", "head_seq", "head_hash", "public_key", "signature")
        node = d["node"]
        need(isinstance(node, str) and ACTOR.fullmatch(node) and node != self.actor,
             f"witness node {node!r} is not another node")
        self.witnesses.append((self.round, seq, node) + signed_head(d, "witness"))

    def pruned_record(self, seq, details):
        d = pruned_details(details)
        need(d["to"] < seq, "pruned record prunes records after itself")
        if self.start_seq is None and d["to"] == self.first - 1:
            self.start_seq = seq
        self.pruned.append((seq, d))


def with_exports(log, paths, trusted):
    """The log, then each --pruned-export checked against the `pruned` record (in the log or an
    export matched before it) that signed its SHA-256; older exports come later."""
    logs, unsigned = [log], {}  # unsigned: digest -> file, until a pruned record names it
    for path in paths:
        with open(path, "rb") as f:
            unsigned.setdefault(hashlib.sha256(f.read()).hexdigest(), path)
    for lg in logs:  # grows as exports match: each may be pruned in turn
        for seq, d in lg.pruned:
            path = unsigned.pop(d["export_sha256"], None)
            if path is None:
                continue
            try:  # its start may be a `pruned` record in a newer log (if pruned after the export)
                e = Export(path, trusted, [q for x in logs for _, q in x.pruned])
                ours = f"the pruned record at seq {seq}"
                need(e.first == d["from"] and e.last == d["to"],
                     f"it holds seqs {e.first}..{e.last}, but {ours} names {d['from']}..{d['to']}")
                need(e.hashes[e.last].hex() == d["last_hash"],
                     f"its last hash is not {ours}'s last_hash")
                need((e.key and e.key[0].hex()) == d["public_key"],
                     f"the key in force at its end is not {ours}'s public_key")
            except Fail as ex:
                raise Fail(f"pruned export {path}: {ex}") from None
            logs.append(e)
    for digest, path in unsigned.items():  # the first file that no pruned record names
        raise Fail(f"pruned export {path} is not the one the log signed (sha256 {digest})")
    for lg in reversed(logs):  # oldest first: trust flows forward through the exports
        lg.vouched = lg.vouched or any(e.vouched and e.last + 1 == lg.first
                                       and e.key == lg.start_key for e in logs)
        if not lg.vouched:
            where = f"pruned export {lg.path}: " if lg is not log else ""
            raise Fail(f"{where}seq {lg.first}: audit key {lg.start_key[1]}, in force from the "
                       "pruned record, is not a --trusted-key (give the export that endorses it)")
    return logs


def check_held(logs, seq, h, head, cut, pk=None):
    """Checks a head held elsewhere against the log or the pruned export holding it; returns
    that one, or None if it falls in a pruned range that no --pruned-export covers."""
    lg = next((x for x in logs if seq in x.hashes), logs[0])
    if seq < lg.first:
        return None
    in_export = f" in pruned export {lg.path}" if lg is not logs[0] else ""
    need(seq in lg.hashes, f"{head} is missing ({cut})")
    need(lg.hashes[seq] == h, f"{head} differs{in_export} (log rewritten)")
    need(pk is None or pk in lg.keys_ever, f"{head} was signed by a key never in force in this log")
    return lg


def main():
    p = argparse.ArgumentParser(description="Verify a Quorum audit-log export (JSONL, format v2).")
    p.add_argument("export")
    p.add_argument("--trusted-key", action="append", default=[], metavar="FINGERPRINT")
    p.add_argument("--expect-head", action="append", default=[], metavar="SEQ:HASH")
    p.add_argument("--witness", action="append", default=[], metavar="OTHER_EXPORT")
    p.add_argument("--pruned-export", action="append", default=[], metavar="FILE")
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
        trusted = {fp.lower() for fp in a.trusted_key}
        log = Export(a.export, trusted)
        logs = with_exports(log, a.pruned_export, trusted)
        held = []  # where each held head was checked: None if pruned and no export covers it
        for seq, h in expected:  # a head kept from an earlier audit: catches truncation
            head = f"seq {seq}: expected head {seq}:{h.hex()}"
            held.append(check_held(logs, seq, h, head, "log truncated"))
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
            held.append(check_held(logs, head_seq, head_hash, head, "log truncated or rolled back",
                                   pk))
    except Fail as e:
        print(f"FAIL: {e}")
        return 1
    except OSError as e:
        p.error(f"cannot read {e.filename}: {e.strerror}")
    fp = log.key[1] if log.key else "none"
    reach, notes = log, []  # follow the exports back from the log's start, as far as they go
    while e := next((e for e in logs if e.last + 1 == reach.first), None):
        reach = e
    if len(logs) > 1:
        notes.append(f"{len(logs) - 1} pruned export(s) verified back to seq {reach.first}, "
                     f"{sum(x not in (None, log) for x in held)} held heads checked there")
    if reach.first:  # heads there cannot be checked here: say so, and which export holds them
        notes.append(f"{held.count(None)} held heads fall in the pruned range (check them against "
                     f"the export, sha256 {reach.start['export_sha256']})")
    lead = f"; pruned before seq {log.first}: " if log.first else "; "
    note = lead + ", ".join(notes) if notes else ""
    print(f"ok: {len(log.hashes)} records{f' from seq {log.first}' if log.first else ''}, "
          f"{log.heads} signed heads, key {fp} in force, "
          f"last {log.last}:{log.hashes[log.last].hex()}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
