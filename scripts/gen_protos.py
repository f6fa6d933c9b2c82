"""Regenerate `generated/` from `protos/` (the one command behind `make gen`).

protoc names imports after the proto's path (`orders.v1`), so the gRPC module is rewritten to
import its messages as `generated.orders.v1`: the descriptors keep their proto file names (what
reflection serves) while Python sees one `generated` package.

`--check` regenerates into a temporary folder and fails on any difference from `generated/`.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "generated"


def generate(out: Path) -> None:
    from grpc_tools import protoc  # imported late: only this tool needs grpcio-tools

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out.rglob("*.py*"):
        text = path.read_text()
        fixed = re.sub(r"^from (orders\.[\w.]+) import", rf"from {PACKAGE}.\1 import", text, flags=re.M)
        if fixed != text:
            path.write_text(fixed)
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        if folder.name != "__pycache__":
            (folder / "__init__.py").touch()


def differences(a: Path, b: Path) -> list[str]:
    diffs: list[str] = []
    names_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    names_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    diffs += [f"missing: {n}" for n in sorted(names_a - names_b)]
    diffs += [f"not generated: {n}" for n in sorted(names_b - names_a)]
    diffs += [
        f"differs: {n}" for n in sorted(names_a & names_b) if not filecmp.cmp(a / n, b / n, shallow=False)
    ]
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated/ is stale")
    args = parser.parse_args()
    target = ROOT / PACKAGE
    if not args.check:
        generate(target)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / PACKAGE
        generate(fresh)
        diffs = differences(fresh, target)
    if diffs:
        print("generated/ does not match protos/ (run `make gen`):", *diffs, sep="\n  ", file=sys.stderr)
        return 1
    print("generated/ is fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
