"""Collects what scripts/bench.sh measured into results.json and RESULTS.md (plus PNG plots
when matplotlib is importable).

    python3 bench/collect.py bench-out [--elapsed SECONDS]

Every number comes from a file in the output folder; a missing measurement shows as
"not measured" rather than a guess.
"""

import argparse
import datetime as dt
import glob
import json
import math
import os
import re

NM = "not measured"


def load_json(path):
    """The last JSON object line of a file (or the whole file as JSON); None if absent."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    lines = [line for line in text.splitlines() if line.startswith("{")]
    try:
        return json.loads(lines[-1]) if len(lines) > 0 and lines[-1].endswith("}") else json.loads(text)
    except ValueError:
        return None


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def duration_s(text):
    """A Rust `Duration` Debug string (e.g. 622.1ms, 2.3s, 950µs) in seconds."""
    m = re.fullmatch(r"([\d.]+)(ns|µs|us|ms|s)", text.strip())
    if not m:
        return None
    scale = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]
    return float(m.group(1)) * scale


def parse_prg(text):
    out = {}
    for m in re.finditer(r"PRG add_to, (\d+) threads?:\s+([\d.]+) GB/s", text):
        out[f"prg_gbps_{m.group(1)}t"] = float(m.group(2))
    for m in re.finditer(
        r"client mask \((\d+) streams\), (\d+) threads?: ([\d.]+) s.*?\(([\d.]+) GB/s keystream\)", text
    ):
        t = m.group(2)
        out["mask_streams"] = int(m.group(1))
        out[f"mask_s_{t}t"] = float(m.group(3))
        out[f"mask_gbps_{t}t"] = float(m.group(4))
    m = re.search(r"for (\d+) elements", text)
    if m:
        out["mask_elements"] = int(m.group(1))
    for t in ("1", "2"):
        if f"mask_gbps_{t}t" in out and f"prg_gbps_{t}t" in out:
            out[f"mask_vs_prg_{t}t"] = out[f"mask_gbps_{t}t"] / out[f"prg_gbps_{t}t"]
    return out


def parse_dp(text):
    out = {"sampler": [], "encode": []}
    for m in re.finditer(
        r"sigma ([\d.e+]+): ([\d.]+) M/s \(ChaCha12\), ([\d.]+) M/s \(ChaCha8\), ([\d.]+) M/s \((\d+) threads\)",
        text,
    ):
        out["sampler"].append({
            "sigma": float(m.group(1)), "chacha12_msps": float(m.group(2)),
            "chacha8_msps": float(m.group(3)), "parallel_msps": float(m.group(4)),
            "threads": int(m.group(5)),
        })
    for m in re.finditer(
        r"d = (\d+) \(padded (\d+)\), noise ([\d.]+): encode (\S+), decode (\S+)", text
    ):
        out["encode"].append({
            "dim": int(m.group(1)), "padded": int(m.group(2)), "noise": float(m.group(3)),
            "encode_s": duration_s(m.group(4).rstrip(",")), "decode_s": duration_s(m.group(5)),
        })
    return out


def parse_audit(text):
    out = {}
    for m in re.finditer(r"(\w+): durable appends: (\d+) in ([\d.]+) s = (\d+)/s", text):
        out[m.group(1)] = {"appends": int(m.group(2)), "appends_per_s": float(m.group(4))}
    for m in re.finditer(
        r"(\w+): verify: (\d+) records \((\d+) signed heads\) in ([\d.]+) s = (\d+) records/s", text
    ):
        out.setdefault(m.group(1), {}).update(
            {"verified": int(m.group(2)), "verify_records_per_s": float(m.group(5))}
        )
    return out


def parse_time(s):
    # RFC 3339 with nanoseconds and Z; Python's fromisoformat takes at most microseconds.
    m = re.fullmatch(r"(.*?T\d\d:\d\d:\d\d)(?:\.(\d+))?Z", s)
    base = dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.timezone.utc)
    frac = float("0." + m.group(2)) if m.group(2) else 0.0
    return base.timestamp() + frac


def phases(audit_path):
    """Where the last training round's time went, from the aggregator's audit log."""
    records = []
    for line in read(audit_path).splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    done = [r["round"] for r in records if r.get("kind") == "round_completed"]
    if not done:
        return None
    rnd = max(done)
    mine = [r for r in records if r.get("round") == rnd]

    def at(kind, phase=None):
        ts = [parse_time(r["time"]) for r in mine if r["kind"] == kind
              and (phase is None or r["details"].get("phase") == phase)]
        return max(ts) if ts else None

    t0, t_end = at("cohort_selected"), at("round_completed")
    t_up = at("upload_digest")
    out = {"round": rnd, "sites_s": t_up - t0, "server_tail_s": t_end - t_up}
    t_adv = at("phase_completed", "advertise")
    if t_adv is not None:
        out["until_advertised_s"] = t_adv - t0
        out["mask_and_upload_s"] = t_up - at("phase_completed", "share-keys")
    return out


def final_row(report):
    """Validation loss of the final model from the aggregator's printed summary: the row
    `final secs up down ε global-val site-vals...`."""
    for line in report.splitlines():
        fields = line.split()
        if fields[:1] == ["final"] and len(fields) > 5:
            try:
                return float(fields[5])
            except ValueError:
                return None
    return None


def fmt(x, digits=2, unit=""):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return NM
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    if isinstance(x, str):
        return x
    if abs(x) >= 1000 and digits <= 2:
        return f"{x:,.0f}{unit}"
    return f"{x:.{digits}f}{unit}"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def verdict(value, limit):
    if value is None:
        return NM
    return "met" if value <= limit else "**not met**"


def bytes_per_param(r):
    """Aggregator peak RSS per model parameter."""
    return r["aggregator_peak_rss_mib"] * 2**20 / r["dim"]


def human_d(d):
    if d >= 1e9:
        return f"{d / 1e9:g}B"
    return f"{d / 1e6:g}M" if d >= 1e6 else f"{d / 1e3:g}k"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--elapsed", type=float)
    args = ap.parse_args()
    out = args.out
    R = {"machine": load_json(f"{out}/machine.json") or {}}
    R["elapsed_s"] = args.elapsed
    R["crypto"] = {"prg": parse_prg(read(f"{out}/raw/prg.txt")), "dp": parse_dp(read(f"{out}/raw/dp.txt"))}
    R["audit"] = parse_audit(read(f"{out}/raw/audit.txt"))
    load = {}
    for path in sorted(glob.glob(f"{out}/load/*.json")):
        name = os.path.basename(path)[:-5]
        r = load_json(path)
        if r is None:
            continue
        if not name.startswith("skipped-"):
            r["phases"] = phases(f"{out}/load/{name}/audit.jsonl")
        load[name] = r
    R["load"] = load
    R["flower"] = load_json(f"{out}/flower.json")
    train = {}
    for path in sorted(glob.glob(f"{out}/train/*.json")):
        train[os.path.basename(path)[:-5]] = load_json(path)
    R["train"] = train
    dp_runs = {}
    for path in sorted(glob.glob(f"{out}/dp/noise-*/aggregator-state/state.json")):
        run_dir = path.split("/aggregator-state/")[0]
        noise = run_dir.split("/noise-")[1]
        # The final evaluation of the last model, from the summary the aggregator prints when
        # it stops (older state.json files do not keep that pass).
        history = json.load(open(path))["history"]
        training = [h for h in history if not h["evaluation_only"]]
        final = final_row(read(f"{run_dir}/aggregator-report.txt"))

        def mean_val(h):
            # Secure rounds carry only the survivors' summed metrics, plain ones each report.
            if h.get("metrics"):
                return h["metrics"]["val_loss_before"]
            reps = list(h["reports"].values())
            return sum(r["val_loss_before"] for r in reps) / len(reps) if reps else None

        dp_on = bool(training) and training[-1]["rho"] > 0
        dp_runs[noise] = {
            "noise_multiplier": float(noise),
            "dp": dp_on,
            "rounds": len(training),
            "initial_val_loss": mean_val(training[0]) if training else None,
            "final_val_loss": final,
            "curve": [mean_val(h) for h in training] + [final],
            "epsilon": training[-1]["epsilon"] if dp_on else None,
            "seconds": sum(h["seconds"] for h in training),
        }
    R["dp_utility"] = dp_runs
    R["dpsgd_step"] = {os.path.basename(p)[:-5]: load_json(p) for p in sorted(glob.glob(f"{out}/dpsgd/*.json"))}
    record = {}
    for path in sorted(glob.glob(f"{out}/record/*/aggregator-report.txt")):
        run_dir = os.path.dirname(path)
        name = os.path.basename(run_dir)
        plan = load_json(f"{run_dir}.json") or {}
        site_out = read(f"{run_dir}/logs/alpha.out")
        m = re.search(r"record-level ε ([0-9.]+)", site_out)
        record[name] = {
            "target_epsilon": plan.get("epsilon"),
            "epsilon": float(m.group(1)) if m else None,
            "batch": plan.get("batch", 8),
            "steps": plan.get("steps"),
            "q": plan.get("q"),
            "sigma": plan.get("sigma"),
            "final_val_loss": final_row(read(path)),
        }
    R["record_level"] = record
    with open(f"{out}/results.json", "w") as f:
        json.dump(R, f, indent=1, default=str)
    plots = make_plots(out, R)
    with open(f"{out}/RESULTS.md", "w") as f:
        f.write(markdown(R, plots))


def make_plots(out, R):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    curve = sorted((r for k, r in R["load"].items() if k.startswith("curve-")), key=lambda r: r["sites"])
    if len(curve) >= 2:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ns = [r["sites"] for r in curve]
        ax.plot(ns, [r["round_s"] for r in curve], "o-", label="round wall time (s)")
        ax.set_xlabel("sites (n)")
        ax.set_ylabel("seconds")
        ax2 = ax.twinx()
        ax2.plot(ns, [r["aggregator_peak_rss_mib"] for r in curve], "s--", color="C1",
                 label="aggregator peak RSS (MiB)")
        ax2.set_ylabel("MiB")
        ax2.set_ylim(bottom=0)
        ax.set_ylim(bottom=0)
        fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
        ax.set_title(f"Secure round at d={human_d(curve[0]['dim'])} against n")
        fig.tight_layout()
        fig.savefig(f"{out}/load_vs_n.png", dpi=110)
        plt.close(fig)
        made.append("load_vs_n.png")
    by_d = sorted((r for k, r in R["load"].items()
                   if k in ("curve-n10", "secure-n10") or k.startswith(("huge-n", "giant-n"))),
                  key=lambda r: r["dim"])
    if len(by_d) >= 2:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ds = [r["dim"] for r in by_d]
        ax.plot(ds, [r["round_s"] for r in by_d], "o-", label="round wall time (s)")
        for r in by_d:
            ax.annotate(f"n={r['sites']}", (r["dim"], r["round_s"]), textcoords="offset points",
                        xytext=(-24 if r is by_d[-1] else 4, -10), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model parameters (d)")
        ax.set_ylabel("seconds")
        ax2 = ax.twinx()
        ax2.plot(ds, [bytes_per_param(r) for r in by_d], "s--", color="C1",
                 label="aggregator peak RSS (B per parameter)")
        ax2.axhline(12, color="C1", linestyle=":", linewidth=1, label="target: 12 B per parameter")
        ax2.set_ylabel("bytes per parameter")
        ax2.set_ylim(bottom=0)
        fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
        ax.set_title("Secure round against model size")
        fig.tight_layout()
        fig.savefig(f"{out}/load_vs_d.png", dpi=110)
        plt.close(fig)
        made.append("load_vs_d.png")
    if R["dp_utility"]:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for noise, r in sorted(R["dp_utility"].items(), key=lambda kv: float(kv[0])):
            eps = r["epsilon"]
            label = "no DP" if not r["dp"] else f"z={noise}, ε={eps:.3g}"
            ax.plot(range(1, len(r["curve"]) + 1), r["curve"], "o-", label=label)
        ax.set_xlabel("round (the model each round starts from; last: the final model)")
        ax.set_xticks(range(1, max(len(r["curve"]) for r in R["dp_utility"].values()) + 1))
        ax.set_ylabel("validation loss of the global model")
        ax.set_yscale("log")
        ax.set_title("Demo federation (3 sites, tiny model) against DP noise")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{out}/dp_utility.png", dpi=110)
        plt.close(fig)
        made.append("dp_utility.png")
    return made


def dp_comment(D):
    """What the DP table says, in words, from its own numbers."""
    off = next((r for r in D.values() if not r["dp"]), None)
    noisy = sorted((r for r in D.values() if r["dp"]), key=lambda r: r["noise_multiplier"])
    text = ("Small federations cannot get strong privacy from distributed noise: the noise that "
            "bounds one site's influence on the sum comes from only 3 sites, and the accountant "
            "assumes the worst case (only the minimum number of survivors adds noise).")
    if noisy:
        most = noisy[-1]
        text += (f" Here the largest noise, z = {most['noise_multiplier']:g}, still ends at "
                 f"ε = {fmt(most['epsilon'], 2)} after {most['rounds']} rounds")
        if off and off["final_val_loss"] is not None and most["final_val_loss"] is not None:
            text += (f", with a final validation loss of {most['final_val_loss']:.3f} against "
                     f"{off['final_val_loss']:.3f} without DP")
        text += (". With distributed noise, a small ε at useful utility comes from many more "
                 "sites sharing the noise, not from more noise among 3.")
    return text


def markdown(R, plots):
    m = R["machine"]
    L = R["load"]
    parts = []
    parts.append("# Quorum benchmarks\n")
    parts.append(
        f"Run {m.get('date', '?')} on {m.get('cores', '?')} cores ({m.get('cpu', '?')}), "
        f"{m.get('mem_gib', '?')} GiB memory, commit {m.get('commit', '?')}"
        f"{' (with uncommitted changes)' if m.get('dirty') else ''}, {m.get('rustc', '')}"
        + (f"; `make bench` took {R['elapsed_s'] / 60:.1f} min" if R.get("elapsed_s") else "")
        + (f"; load average at the start {m['loadavg_at_start'][0]:.1f}" if m.get("loadavg_at_start") else "")
        + (". **Quick mode (small sizes): not the reference numbers.**" if m.get("quick") else ".")
        + "\n\nThe machine is small and shared with other work: expect ±20 % between runs on "
        "anything timed, more on multi-threaded numbers. Every number below comes from this one "
        "run (`scripts/bench.sh`, raw outputs in `bench-out/`).\n"
    )

    # 1. crypto
    p = R["crypto"]["prg"]
    d = R["crypto"]["dp"]
    rows = [
        ["mask PRG (AES-256-CTR keystream added mod 2^b), 1 thread", fmt(p.get("prg_gbps_1t"), unit=" GB/s")],
        ["mask PRG, 2 threads", fmt(p.get("prg_gbps_2t"), unit=" GB/s")],
    ]
    if "mask_s_1t" in p:
        rows += [
            [f"client masking, {p['mask_elements']:,} elements × {p['mask_streams']} streams (self + 16 pairwise), 1 thread",
             f"{p['mask_s_1t']:.3f} s = {p['mask_gbps_1t']:.2f} GB/s, {p['mask_vs_prg_1t']:.2f}× the PRG bound"],
            ["client masking, same, 2 threads",
             f"{p['mask_s_2t']:.3f} s = {p['mask_gbps_2t']:.2f} GB/s, {p['mask_vs_prg_2t']:.2f}× the PRG bound"],
        ]
    for s in d["sampler"]:
        rows.append([f"discrete Gaussian sampler, σ = {s['sigma']:g}",
                     f"{s['chacha12_msps']:.1f} M samples/s (1 thread), {s['parallel_msps']:.1f} M/s ({s['threads']} threads)"])
    for e in d["encode"]:
        rows.append([f"DP encode / decode, d = {e['dim']:,} (padded {e['padded']:,}), noise {e['noise']:g}",
                     f"{fmt(e['encode_s'])} s / {fmt(e['decode_s'])} s"])
    big = L.get("secure-n10")
    if big:
        # The payload is bit-packed at b bits per element of the padded vector.
        padded = round(big["upload_bytes_per_site_round"] * 8 / big["bits"])
        per_padded = big["upload_bytes_per_site_round"] / padded
        rows.append([f"upload per site per round, d = {big['dim']:,} at b = {big['bits']} (measured payload)",
                     f"{big['upload_bytes_per_site_round'] / 1e6:.2f} MB = {per_padded:.3f} B per padded element "
                     f"(b/8 = {big['bits'] / 8:g}), {big['payload_bytes_per_param']:.3f} B per parameter (padded to {padded:,} in rotation blocks)"])
        if big.get("wire_bytes_per_site_round"):
            over = big["wire_bytes_per_site_round"] / big["upload_bytes_per_site_round"] - 1
            rows.append(["on the wire per site per round (TCP payload the aggregator received: TLS, HTTP/2, gRPC, protobuf, all protocol messages)",
                         f"{big['wire_bytes_per_site_round'] / 1e6:.2f} MB = {big['wire_bytes_per_param']:.3f} B per parameter; "
                         f"framing and the other messages add {100 * over:.2f} % to the payload"])
    parts.append("## 1. Crypto\n\n" + table(["measurement", "result"], rows) + "\n")

    # 2. rounds
    parts.append(
        "## 2. Rounds over loopback mTLS\n\n"
        "`client/examples/loadgen.rs`: a real `quorum-aggregator serve` process and n synthetic "
        "sites in one process (the production session code; the update is a fresh random vector "
        "each round instead of training). Modulus 20 bits, DP on (noise multiplier 1, clip 1) unless stated, "
        "no dropouts. **All n sites share this machine's cores with the aggregator**, so the round "
        "time is dominated by n sites' client work (DP encoding, masking) run back to back, "
        "which in a real federation runs on n machines at once. The split below separates it: "
        "*sites* = offer → last update received (model download, DP encoding, key exchange, "
        "masking, upload), *server tail* = last update → round done (unmasking, decoding, outer "
        "step, checkpoint, audit). Times are the last training round (all sites connected); "
        "aggregator CPU is for the whole run (all rounds and the final evaluation). *Per-site "
        "peak RSS* is the sites' process's peak beyond its size before the sites started, "
        "divided by n: what a site holds beyond its model and optimizer (a synthetic site has "
        "neither), its update included.\n"
    )

    def row(name, r):
        ph = r.get("phases") or {}
        return [name, r["sites"], human_d(r["dim"]), fmt(r["round_s"]), fmt(ph.get("sites_s")),
                fmt(ph.get("server_tail_s")), fmt(r["aggregator_cpu_s"], 1),
                fmt(r["aggregator_peak_rss_mib"], 0), fmt(bytes_per_param(r), 1),
                fmt(r.get("site_peak_rss_mib_each"), 0)]

    head = ["run", "n", "d", "round s", "sites s", "server tail s", "aggregator CPU s",
            "aggregator peak RSS MiB", "aggregator B per parameter", "per-site peak RSS MiB"]
    sec = L.get("secure-n10")
    pla = L.get("plain-n10")
    if sec and pla:
        ratio = sec["round_s"] / pla["round_s"]
        parts.append(
            f"### Secure vs plain, n = 10, d = {human_d(sec['dim'])}\n\n"
            + table(head, [row("SecAgg+", sec), row("plain (encoded, unmasked)", pla)])
            + f"\n\nSecure / plain round time: **{ratio:.2f}×** (target ≤ 1.5×: {verdict(ratio, 1.5)}).\n"
        )
    else:
        parts.append(f"### Secure vs plain\n\n{NM}\n")

    if sec:
        nbig = next((r for k, r in L.items() if k.startswith("secure-n") and k != "secure-n10"), None)
        if nbig:
            ratio = nbig["aggregator_peak_rss_mib"] / sec["aggregator_peak_rss_mib"]
            parts.append(
                f"### Aggregator memory against n, d = {human_d(sec['dim'])}\n\n"
                + table(head, [row("SecAgg+", sec), row("SecAgg+", nbig)])
                + f"\n\nAggregator peak RSS n = {nbig['sites']} / n = 10: **{ratio:.2f}×** "
                f"(target ≤ 1.2×: {verdict(ratio, 1.2)}), about "
                f"{(nbig['aggregator_peak_rss_mib'] - sec['aggregator_peak_rss_mib']) / (nbig['sites'] - 10):.1f} MiB "
                "more per site. Uploads go to disk as they arrive and are added to the sum a "
                "window at a time, so what grows with n is per-connection state.\n"
            )

    small = sorted((r for k, r in L.items() if k.startswith("curve-")), key=lambda r: r["sites"])
    if small:
        parts.append(
            f"### Load curve against n, d = {human_d(small[0]['dim'])}\n\n"
            + table(head, [row("SecAgg+", r) for r in small])
            + ("\n\n![round time and aggregator memory against n](load_vs_n.png)" if "load_vs_n.png" in plots else "")
            + "\n"
        )
    by_d = sorted((r for k, r in L.items()
                   if k in ("curve-n10", "secure-n10") or k.startswith(("huge-n", "giant-n"))),
                  key=lambda r: r["dim"])
    if by_d:
        text = ("### Load curve against d\n\n"
                + table(head, [row("SecAgg+", r) for r in by_d])
                + ("\n\n![round time and aggregator memory against d](load_vs_d.png)"
                   if "load_vs_d.png" in plots else ""))
        for r in by_d:
            if r["dim"] >= 10**8:
                b = bytes_per_param(r)
                text += (f"\n\nAggregator at d = {human_d(r['dim'])}, n = {r['sites']}: "
                         f"**{b:.2f} B per parameter** (target ≤ 12: {verdict(b, 12)}).")
        for k, r in L.items():
            if k.startswith("skipped-"):
                text += (f"\n\nd = {human_d(r['dim'])} was **not run**: scaled from the runs before it, "
                         f"its sites plus the aggregator would need about {r['need_mib'] / 1024:.1f} GiB, "
                         f"and {r['available_mib'] / 1024:.1f} GiB was available.")
        if any(r["sites"] != 10 for r in by_d):
            text += ("\n\nThe largest model ran with fewer than 10 sites: every site's update lives in "
                     "this one process, where in a federation each has a machine of its own (the "
                     "aggregator's memory does not depend on n).")
        parts.append(text + "\n")

    # 6. Flower
    fl = R["flower"]
    fl_ok = fl and fl.get("status") != "not measured"
    nodp = L.get("nodp-n10")
    rows = []

    def quorum_row(name, r):
        return [name, fmt(r["round_s"]), fmt(r.get("site_cpu_s_per_round")),
                fmt(r.get("aggregator_cpu_s_per_round")),
                f"{r['upload_bytes_per_site_round'] / 1e6:.1f}", fmt(r["payload_bytes_per_param"]),
                fmt(r["aggregator_peak_rss_mib"], 0),
                fmt(r["aggregator_peak_rss_mib"] + r["sites_process_peak_rss_mib"], 0)]

    if nodp:
        rows.append(quorum_row("Quorum SecAgg+, DP off (same work as Flower's)", nodp))
    if sec:
        rows.append(quorum_row("Quorum SecAgg+, DP on (noise multiplier 1)", sec))
    if fl_ok:
        rows.append([f"Flower {fl['flwr']} SecAgg+ (simulation engine)", fmt(fl["round_s"]),
                     fmt(fl.get("client_cpu_s_per_round")), fmt(fl.get("server_cpu_s_per_round")),
                     f"{fl['upload_bytes_per_client'] / 1e6:.1f}", fmt(fl["upload_bytes_per_param"]),
                     fmt(fl["driver_peak_rss_mib"], 0), fmt(fl["tree_peak_rss_mib"], 0)])
        fl_text = (f"Flower: `SecAggPlusWorkflow` + `secaggplus_mod`, n = {fl['clients']}, d = {human_d(fl['dim'])}, "
                   "every client a neighbour of every other, reconstruction threshold half the shares, "
                   "no dropouts, last of two rounds. Its simulation engine passes messages in memory "
                   "(no TLS, no sockets) and it quantises to 22 bits inside a 2^32 modulus, shipped as "
                   "int64. Quorum's \"server\" memory is the aggregator process; Flower's is the driver "
                   "process that runs the ServerApp; \"all processes\" adds the sites' process "
                   "(Quorum) or Ray's workers and services (Flower).\n\n"
                   "CPU-seconds per round, measured so that any doubt favours Flower. Quorum: the "
                   "aggregator process's whole CPU time, and the sites' process's divided by n "
                   "(TLS, HTTP/2, audit log and runtime included), from the first site's training "
                   "call of one round to that of the next. Flower: its server is the thread that "
                   "runs the SecAgg+ workflow (the driver process as a whole spent "
                   f"{fmt(fl.get('driver_cpu_s_per_round'))} s, adding the simulation engine's message "
                   "passing); a client is the thread that runs `secaggplus_mod` and `fit`, without "
                   "Ray's (de)serialisation around it.")
        if nodp and nodp.get("site_cpu_s_per_round") and fl.get("client_cpu_s_per_round"):
            site_x = fl["client_cpu_s_per_round"] / nodp["site_cpu_s_per_round"]
            server_x = fl["server_cpu_s_per_round"] / nodp["aggregator_cpu_s_per_round"]
            fl_text += (f"\n\nFlower client / Quorum site CPU-seconds: **{site_x:.1f}×** "
                        f"(target ≥ 10×: {verdict(10, site_x)}); Flower server / Quorum aggregator: "
                        f"**{server_x:.1f}×** (target ≥ 10×: {verdict(10, server_x)}).")
    else:
        reason = (fl or {}).get("reason", "bench/flower/run.sh did not run")
        rows.append(["Flower SecAgg+"] + [NM] * 7)
        fl_text = f"Flower was not measured: {reason}."
    parts.append(
        "## 6. Comparison with Flower's SecAgg+, n = 10, same d, same run\n\n"
        + table(["system", "round s", "CPU s per site", "server CPU s", "upload MB per client",
                 "upload B per parameter", "server peak RSS MiB", "all processes peak RSS MiB"], rows)
        + "\n\n" + fl_text + "\n"
    )

    # 3. audit
    A = R["audit"]
    if A:
        rows = [[k, fmt(v.get("appends_per_s"), 0), fmt(v.get("verify_records_per_s"), 0)] for k, v in A.items()]
        parts.append(
            "## 3. Audit log\n\n"
            + table(["durability", "durable appends/s", "verify records/s"], rows)
            + "\n\n`SyncData`: each append is fsync'ed to disk before it returns (Quorum's default). "
            "`SledFlush`: sled's own flush. One signed head every 100 records.\n"
        )
    else:
        parts.append(f"## 3. Audit log\n\n{NM}\n")

    # 4. training
    T = R["train"]
    rows = []
    for preset in ("tiny", "75m", "125m"):
        a, b = T.get(f"tch-{preset}"), T.get(f"torch-{preset}")
        if not a and not b:
            continue
        ratio = a["tokens_per_s"] / b["tokens_per_s"] if a and b else None
        peak_ratio = a["peak_tokens_per_s"] / b["peak_tokens_per_s"] if a and b else None
        rows.append([preset, f"{(a or b)['params'] / 1e6:.2f}M", f"{(a or b)['batch']}×{(a or b)['seq']}",
                     (a or b)["threads"], fmt(a and a["tokens_per_s"], 0), fmt(b and b["tokens_per_s"], 0),
                     fmt(ratio), fmt(peak_ratio), fmt(a and a["peak_rss_mib"], 0), fmt(b and b["peak_rss_mib"], 0)])
    parts.append(
        "## 4. Training throughput on CPU: tch vs PyTorch eager\n\n"
        + (table(["preset", "parameters", "batch", "threads", "tch tokens/s", "PyTorch tokens/s",
                  "tch / PyTorch (mean)", "tch / PyTorch (fastest step)", "tch peak RSS MiB",
                  "PyTorch peak RSS MiB"], rows) if rows else NM)
        + "\n\nSame model, optimizer step (AdamW, clipping), random batch, thread count and "
        "LibTorch build (the PyTorch wheel tch links against). Byte vocabulary (258). "
        "The fastest-step ratio is the least disturbed by other load on the machine.\n"
    )

    # 5. DP utility
    D = R["dp_utility"]
    if D:
        rows = []
        for noise, r in sorted(D.items(), key=lambda kv: float(kv[0])):
            rows.append(["off" if not r["dp"] else noise, r["rounds"], fmt(r["initial_val_loss"], 3),
                         fmt(r["final_val_loss"], 3),
                         "∞ (no DP)" if not r["dp"] else fmt(r["epsilon"], 3 if r["epsilon"] < 100 else 0)])
        parts.append(
            "## 5. Utility against DP noise\n\n"
            "`scripts/demo.sh`: 3 sites (clinical, finance, academic corpora), tiny model, secure "
            "aggregation, distributed discrete-Gaussian noise; noise multiplier z is the noise "
            "standard deviation of the *sum* in units of the clip norm (5.0). \"off\" is the same "
            "federation with DP disabled at the aggregator and in every site's policy (z = 0 "
            "is not a valid DP setting). ε is the federation's published guarantee at δ = 1e-6 "
            "after all rounds.\n\n"
            + table(["noise multiplier z", "rounds", "validation loss before training",
                     "final validation loss", "ε (δ = 1e-6)"], rows)
            + ("\n\n![validation loss per round against noise](dp_utility.png)" if "dp_utility.png" in plots else "")
            + "\n\n" + dp_comment(D) + "\n"
        )
    else:
        parts.append(f"## 5. Utility against DP noise\n\n{NM}\n")

    # 7. record-level DP
    S = R["dpsgd_step"]
    rows = []
    for preset in ("tiny", "75m"):
        plain = S.get(f"plain-{preset}")
        if not plain:
            continue
        for method in ("ghost", "micro-batch"):
            r = S.get(f"{method}-{preset}")
            if r:
                rows.append([preset, method, fmt(plain["min_step_ms"], 0), fmt(r["min_step_ms"], 0),
                             fmt(r["min_step_ms"] / plain["min_step_ms"]),
                             fmt(plain.get("peak_rss_mib"), 0), fmt(r.get("peak_rss_mib"), 0),
                             fmt(r["peak_rss_mib"] / plain["peak_rss_mib"]) if r.get("peak_rss_mib") and plain.get("peak_rss_mib") else NM])
    U = R["record_level"]
    urows = []
    base = (U.get("eps-inf-b8") or {}).get("final_val_loss")
    for name, r in sorted(U.items(), key=lambda kv: (-(kv[1]["target_epsilon"] or 1e9), kv[1]["batch"])):
        loss = r["final_val_loss"]
        urows.append(["∞ (no DP-SGD)" if r["target_epsilon"] is None else fmt(r["epsilon"], 2),
                      r["batch"], r["steps"] or NM, fmt(r["q"], 6) if r["q"] else "-",
                      fmt(r["sigma"], 3) if r["sigma"] else "-", fmt(loss, 3),
                      f"{100 * (loss / base - 1):+.1f} %" if loss and base else NM])
    parts.append(
        "## 7. Record-level DP (DP-SGD at each site)\n\n"
        "A DP-SGD step against a plain step on the same model and batch (8 × 128 tokens), "
        "fastest of the timed steps, and each process's peak RSS:\n\n"
        + (table(["preset", "per-sequence norms", "plain step ms", "DP-SGD step ms", "ratio",
                  "plain peak RSS MiB", "DP-SGD peak RSS MiB", "memory ratio"], rows) if rows else NM)
        + "\n\nUtility: the 4-site non-IID federation (clinical, finance, academic, legal; tiny "
        "model; secure aggregation; no site-level noise), every site training on the same number "
        "of sequences in every run. B is the expected batch (sampling rate q × the site's "
        "sequences), so a run at B = 32 takes a quarter of the steps; σ is the smallest noise "
        "multiplier keeping each site's record-level ε within the target at δ = 1e-6 "
        "(`quorum-client plan-record-dp`); ε is what alpha's own ledger reports at the end.\n\n"
        + (table(["record-level ε", "B", "steps", "q", "σ", "final validation loss",
                  "vs no DP-SGD"], urows) if urows else NM)
        + "\n"
    )
    return "\n".join(parts)


if __name__ == "__main__":
    main()
