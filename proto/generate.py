"""Regenerate the Python code for proto/graphgrad/v1/*.proto (messages, gRPC stubs, .pyi).

python proto/generate.py           # write the generated files
python proto/generate.py --check   # exit 1 if they differ from what is committed
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE = PROTO_ROOT / "graphgrad" / "v1"
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out: Path) -> None:
    # With proto/ as the include root, generated imports read `from graphgrad.v1 import ...`,
    # which is where the package is installed.
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE.glob("*.proto"))
    plugins = Path(sys.executable).parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={plugins / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugins / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    subprocess.run(cmd, check=True)


def generated_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith(GENERATED))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        fresh = out / "graphgrad" / "v1"
        if args.check:
            names = generated_files(fresh)
            stale = [
                n
                for n in names
                if not (PACKAGE / n).exists()
                or not filecmp.cmp(fresh / n, PACKAGE / n, shallow=False)
            ]
            stale += [n for n in generated_files(PACKAGE) if n not in names]
            if stale:
                print(f"stale generated code: {', '.join(stale)}; run python proto/generate.py")
                return 1
            return 0
        for name in generated_files(PACKAGE):
            (PACKAGE / name).unlink()
        for name in generated_files(fresh):
            shutil.copy(fresh / name, PACKAGE / name)
    print(f"generated {len(generated_files(PACKAGE))} files in {PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
