"""Import times of each layer, in fresh interpreters: what a Ray worker pays for
`import graphgrad.engine`, a notebook for `import graphgrad`, a client for the remote SDK, and
the server. The reference, timed the same way in the same run, is what `import graphgrad.engine`
cost while the package imported its remote client eagerly (the engine plus gRPC, protobuf and
the generated modules): the engine alone should cost well under it.

    python bench/imports.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CASES = {
    "graphgrad.engine": "import graphgrad.engine",
    "graphgrad (in-process SDK)": "import graphgrad; graphgrad.connect()",
    "graphgrad.wire": "import graphgrad.wire",
    "graphgrad.RemoteClient": "import graphgrad; graphgrad.RemoteClient",
    "graphgrad.server.app": "import graphgrad.server.app",
    "reference: engine + remote SDK": "import graphgrad.engine, graphgrad._remote",
}


def seconds(code: str) -> float:
    probe = f"import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    medians = {}
    for name, code in CASES.items():
        medians[name] = statistics.median(seconds(code) for _ in range(args.runs))
    ref = medians["reference: engine + remote SDK"]
    for name, t in medians.items():
        print(
            f"{name:30s} {t * 1000:7.1f} ms median of {args.runs}  ({t / ref:.2f}x the reference)"
        )


if __name__ == "__main__":
    main()
