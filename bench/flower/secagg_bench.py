"""Flower SecAgg+ round cost, for comparison with Quorum's secure round.

Runs Flower's own SecAgg+ (`SecAggPlusWorkflow` on the server, `secaggplus_mod` on the clients)
in Flower's simulation engine with N clients, each returning a random float32 vector of D
elements (no training, like Quorum's load generator). Complete neighbour graph and a threshold
of half the shares, as Quorum uses for 10 sites without dropouts.

Prints one JSON line: seconds per SecAgg+ round (setup, key sharing, masked upload including
the model broadcast, unmasking and dequantisation), bytes of masked vector each client uploads,
peak RSS of the driver process (which runs the ServerApp) and peak summed RSS of the whole
process tree (driver plus Ray's workers and services), polled every 100 ms, and CPU-seconds
per round: the server's (the thread that runs the SecAgg+ workflow; also the whole driver
process, which adds the simulation engine's message passing) and each client's (the thread
that runs `secaggplus_mod` and `fit`, summed over the round's messages; Ray's own work in the
worker is not counted). Both leave out work a real deployment would add, so they favour Flower.

Differences to keep in mind: the simulation passes messages in memory between processes (no
TLS, no network stack), Flower quantises to `quantization_range` (2^22) inside a 2^32 modulus
and ships int64 arrays.

    bench/flower/.venv/bin/python bench/flower/secagg_bench.py --clients 10 --dim 10000000
"""

import argparse
import json
import os
import shutil
import tempfile
import threading
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Each client appends the CPU-seconds of every message it handles to a file of its own here;
# Ray's workers inherit this environment.
CPU_DIR_ENV = "SECAGG_BENCH_CPU_DIR"
os.environ.setdefault(CPU_DIR_ENV, tempfile.mkdtemp(prefix="flower-cpu-"))

import numpy as np  # noqa: E402
from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.common import Context, ndarrays_to_parameters  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import (  # noqa: E402
    RECORD_KEY_CONFIGS,
    Key,
)
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--dim", type=int, default=10_000_000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    return ap.parse_args()


ARGS = parse_args()
ROUND_SECONDS = []
SERVER_CPU_SECONDS = []
DRIVER_CPU_SECONDS = []
MASKED_BYTES = []


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def tree_rss_kib(root):
    """Summed VmRSS of `root` and all its descendants."""
    children = {}
    rss = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        pid = int(entry)
        children.setdefault(int(fields["PPid"].strip()), []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class TreePeak(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_rss_kib(os.getpid()))
            time.sleep(0.1)


class TimedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, timed per round."""

    def __call__(self, grid, context):
        start = time.perf_counter()
        thread_start, process_start = time.thread_time(), time.process_time()
        super().__call__(CountingGrid(grid), context)
        ROUND_SECONDS.append(time.perf_counter() - start)
        SERVER_CPU_SECONDS.append(time.thread_time() - thread_start)
        DRIVER_CPU_SECONDS.append(time.process_time() - process_start)


class CountingGrid:
    """Passes everything to Flower's grid; adds up the masked vectors in the replies."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        for msg in replies:
            if msg.has_error():
                continue
            cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if cfg is not None and Key.MASKED_PARAMETERS in cfg:
                MASKED_BYTES.append(sum(len(b) for b in cfg[Key.MASKED_PARAMETERS]))
        return replies


class RandomUpdate(NumPyClient):
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def fit(self, parameters, config):
        dim = parameters[0].shape[0]
        update = self.rng.uniform(-1e-3, 1e-3, dim).astype(np.float32)
        return [update], 1, {}


def client_fn(context: Context):
    return RandomUpdate(int(context.node_id) % (2**32)).to_client()


def timed_secaggplus_mod(msg, context, call_next):
    """Flower's `secaggplus_mod`, with the CPU time of the calling thread written down."""
    start = time.thread_time()
    reply = secaggplus_mod(msg, context, call_next)
    spent = time.thread_time() - start
    with open(os.path.join(os.environ[CPU_DIR_ENV], f"client-{os.getpid()}"), "a") as f:
        f.write(f"{spent}\n")
    return reply


def client_cpu_seconds():
    """Every client message's CPU-seconds, from the files the clients wrote."""
    folder = os.environ[CPU_DIR_ENV]
    seconds = [float(line) for name in os.listdir(folder) for line in open(os.path.join(folder, name))]
    shutil.rmtree(folder, ignore_errors=True)
    return seconds


client_app = ClientApp(client_fn=client_fn, mods=[timed_secaggplus_mod])
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    initial = [np.zeros(ARGS.dim, dtype=np.float32)]
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=ARGS.clients,
        min_available_clients=ARGS.clients,
        initial_parameters=ndarrays_to_parameters(initial),
    )
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=ARGS.rounds),
        strategy=strategy,
    )
    # num_shares 1.0: every client is every other's neighbour (Quorum's graph at n <= 10);
    # threshold 0.5 of the shares, as Quorum's t = k/2 + 1 with no corrupt clients.
    fit = TimedSecAggPlus(num_shares=1.0, reconstruction_threshold=0.5, max_weight=1.0)
    DefaultWorkflow(fit_workflow=fit)(grid, legacy)


def run():
    peak = TreePeak()
    peak.start()
    start = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=ARGS.clients,
        backend_config={
            "init_args": {"num_cpus": ARGS.cpus, "include_dashboard": False},
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        },
    )
    wall = time.perf_counter() - start
    peak.stop.set()
    peak.join()
    if len(ROUND_SECONDS) != ARGS.rounds or not MASKED_BYTES:
        raise SystemExit(
            f"Flower finished {len(ROUND_SECONDS)} of {ARGS.rounds} SecAgg+ rounds "
            f"with {len(MASKED_BYTES)} masked uploads; see the log above"
        )
    import flwr

    per_client = sum(MASKED_BYTES) / len(MASKED_BYTES)
    client_cpu = client_cpu_seconds()
    print(
        json.dumps(
            {
                "impl": "flower-secaggplus",
                "flwr": flwr.__version__,
                "clients": ARGS.clients,
                "dim": ARGS.dim,
                "rounds": ARGS.rounds,
                "round_seconds": ROUND_SECONDS,
                "round_s": ROUND_SECONDS[-1],
                "masked_uploads": len(MASKED_BYTES),
                "upload_bytes_per_client": per_client,
                "upload_bytes_per_param": per_client / ARGS.dim,
                "driver_peak_rss_mib": vm_hwm_kib(os.getpid()) / 1024,
                "tree_peak_rss_mib": peak.peak / 1024,
                "server_cpu_s_per_round": SERVER_CPU_SECONDS[-1],
                "driver_cpu_s_per_round": DRIVER_CPU_SECONDS[-1],
                # Averaged over every round: the clients' files do not say which round is which.
                "client_cpu_s_per_round": sum(client_cpu) / ARGS.clients / ARGS.rounds if client_cpu else None,
                "client_messages": len(client_cpu),
                "wall_s": wall,
            }
        )
    )


if __name__ == "__main__":
    run()
