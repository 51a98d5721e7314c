"""Runs a command and prints its last JSON line with the command's peak RSS added.

    python3 bench/peak_rss.py CMD [ARGS...]

The peak is the largest resident set of any waited-for child (getrusage RUSAGE_CHILDREN), so
run one measured command per invocation.
"""

import json
import resource
import subprocess
import sys


def main():
    proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout)
        sys.exit(proc.returncode)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"{sys.argv[1]} printed no JSON line")
    result = json.loads(lines[-1])
    # ru_maxrss is in KiB on Linux.
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(result))


if __name__ == "__main__":
    main()
