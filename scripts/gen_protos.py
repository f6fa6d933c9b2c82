"""Regenerate the client package `generated/orders_service_api/` from `protos/` (`make gen`).

`generated/` is the project of the client distribution `orders-service-api` (its `pyproject.toml`,
`README.md` and `LICENSE` are written by hand); everything inside `generated/orders_service_api/` is
written here and never edited by hand:

- protoc's messages (`*_pb2.py`) with their stubs (`*_pb2.pyi`), and grpcio-tools' services
  (`*_pb2_grpc.py`);
- a stub for each services module (`*_pb2_grpc.pyi`), made here from the file descriptors, since
  grpcio-tools writes none: with it a client's `OrderServiceStub(channel)` and a servicer's base
  class are typed rather than unannotated;
- `__init__.py` in every folder and `py.typed` (PEP 561), so that type checkers read the stubs.

Python names: protoc names modules after the proto's path (`orders/v1/orders.proto` is `orders.v1`),
and a top-level `orders` would clash in anyone's site-packages. The proto folder `orders/` becomes the
package `orders_service_api` (as grpcio-health-checking ships `grpc.health.v1` as `grpc_health.v1`),
and the imports between the generated modules are rewritten to match. The descriptors keep their
proto file names and packages (what reflection serves and what goes over the wire).

`--check` regenerates into a temporary folder and fails on any difference from the committed package,
and on generated modules left anywhere else in `generated/` (an older layout).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from google.protobuf.descriptor_pb2 import DescriptorProto, FileDescriptorProto

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROJECT = ROOT / "generated"
# The proto folder (= the first part of the proto package) and the Python package it becomes.
PROTO_FOLDER = "orders"
PACKAGE = "orders_service_api"
# Made by builds and installs of the distribution, not by this script.
BUILD_LEFTOVERS = ("build", "dist", "__pycache__")


def generate(package: Path) -> None:
    """Write the whole client package into `package` (a folder that does not exist yet)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc  # imported late: only this tool needs grpcio-tools

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    outside = [p for p in protos if Path(p).parts[0] != PROTO_FOLDER]
    if outside:
        raise SystemExit(f"protos outside protos/{PROTO_FOLDER}/ have no Python package here: {outside}")
    well_known = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        descriptors = Path(tmp) / "descriptors.binpb"
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            f"--descriptor_set_out={descriptors}",
            "--include_imports",
            "--include_source_info",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        files = descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes()).file
        for proto in files:
            if proto.name in protos and proto.service:
                stub = out / proto.name.replace(".proto", "_pb2_grpc.pyi")
                stub.write_text(services_stub(proto, files))
        shutil.move(out / PROTO_FOLDER, package)
    for path in package.rglob("*.py*"):
        text = path.read_text()
        fixed = re.sub(
            rf"^(from|import) {PROTO_FOLDER}(\.[\w.]+)? ", rf"\1 {PACKAGE}\2 ", text, flags=re.M
        )
        if fixed != text:
            path.write_text(fixed)
    for folder in [package, *(p for p in package.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    (package / "py.typed").touch()


# --- the stubs of the services modules ---------------------------------------------------------

# What grpcio's generated `OrderService.PlaceOrder(request, target, ...)` takes after the target.
EXPERIMENTAL = (
    "options: _abc.Sequence[tuple[str, _Any]] = ..., "
    "channel_credentials: grpc.ChannelCredentials | None = ..., "
    "call_credentials: grpc.CallCredentials | None = ..., "
    "insecure: bool = ..., "
    "compression: grpc.Compression | None = ..., "
    "wait_for_ready: bool | None = ..., "
    "timeout: float | None = ..., "
    "metadata: _abc.Sequence[tuple[str, str | bytes]] | None = ..."
)
CALLABLES = {
    (False, False): "UnaryUnaryMultiCallable",
    (False, True): "UnaryStreamMultiCallable",
    (True, False): "StreamUnaryMultiCallable",
    (True, True): "StreamStreamMultiCallable",
}


def python_module(proto_name: str) -> str:
    """`orders/v1/orders.proto` -> `orders_service_api.v1.orders_pb2` (others keep protoc's name)."""
    dotted = proto_name.removesuffix(".proto").replace("/", ".") + "_pb2"
    if proto_name.split("/")[0] == PROTO_FOLDER:
        return PACKAGE + dotted.removeprefix(PROTO_FOLDER)
    return dotted


def _messages(prefix: str, outer: str, messages: list[DescriptorProto]) -> Iterator[tuple[str, str]]:
    for message in messages:
        yield f"{prefix}.{message.name}", f"{outer}{message.name}"
        yield from _messages(f"{prefix}.{message.name}", f"{outer}{message.name}.", list(message.nested_type))


def services_stub(proto: FileDescriptorProto, files: list[FileDescriptorProto]) -> str:
    """The `.pyi` of the `_pb2_grpc` module that grpcio-tools writes for `proto`."""
    where: dict[str, tuple[str, str]] = {}  # message full name -> (module, name in the module)
    for file in files:
        package = f".{file.package}" if file.package else ""
        for full, name in _messages(package, "", list(file.message_type)):
            where[full] = (python_module(file.name), name)
    modules: dict[str, str] = {}  # module -> its alias in the stub

    def python_type(full_name: str) -> str:
        module, name = where[full_name]
        alias = modules.setdefault(module, module.rsplit(".", 1)[-1])
        if list(modules.values()).count(alias) > 1:
            raise SystemExit(f"two message modules are both named {alias}: give gen_protos.py aliases")
        return f"{alias}.{name}"

    comments = {
        tuple(location.path): location.leading_comments.strip()
        for location in proto.source_code_info.location
        if location.leading_comments
    }
    body: list[str] = []
    for s, service in enumerate(proto.service):
        stub_lines, servicer_lines, static_lines = [], [], []
        for m, method in enumerate(service.method):
            request, response = python_type(method.input_type), python_type(method.output_type)
            callable_type = CALLABLES[(method.client_streaming, method.server_streaming)]
            comment = comments.get((6, s, 2, m), "")
            stub_lines.append(f"    {method.name}: grpc.{callable_type}[{request}, {response}]")
            if comment:
                stub_lines.append(f'    """{_docstring(comment, 4)}"""')
            arg = f"_abc.Iterator[{request}]" if method.client_streaming else request
            result = f"_abc.Iterator[{response}]" if method.server_streaming else response
            servicer_lines.append(
                f"    def {method.name}(self, request: {arg}, context: grpc.ServicerContext) -> {result}: ..."
            )
            static_lines += [
                "    @staticmethod",
                f"    def {method.name}(request: {arg}, target: str, {EXPERIMENTAL}) -> {result}: ...",
            ]
        doc = comments.get((6, s), "")
        docstring = [f'    """{_docstring(doc, 4)}"""'] if doc else []
        body += [
            "",
            f"class {service.name}Stub:",
            *docstring,
            "    def __init__(self, channel: grpc.Channel) -> None: ...",
            *stub_lines,
            "",
            f"class {service.name}Servicer:",
            *docstring,
            *servicer_lines,
            "",
            f"def add_{service.name}Servicer_to_server(",
            f"    servicer: {service.name}Servicer, server: grpc.Server",
            ") -> None: ...",
            "",
            f"class {service.name}:",
            "    # grpcio's EXPERIMENTAL one-off calls (a channel per call).",
            *static_lines,
        ]
    # `from a import b`, with no `as b`: a stub re-exports only what it names twice.
    imports = [f"from {m.rsplit('.', 1)[0]} import {a}" for m, a in modules.items()]
    head = [
        f"# Generated by scripts/gen_protos.py from {proto.name}. DO NOT EDIT!",
        '"""Types of the client and server classes that grpcio-tools generates for the services."""',
        "",
        "import collections.abc as _abc",
        "from typing import Any as _Any",
        "",
        "import grpc",
        *sorted(imports),
        "",
        "GRPC_GENERATED_VERSION: str",
        "GRPC_VERSION: str",
    ]
    return "\n".join([*head, *body]) + "\n"


def _docstring(comment: str, indent: int) -> str:
    lines = [line.strip() for line in comment.replace('"""', "'''").splitlines()]
    return ("\n" + " " * indent).join(lines)


# --- checking ----------------------------------------------------------------------------------


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def differences(fresh: Path, committed: Path) -> list[str]:
    names_fresh, names_committed = _files(fresh), _files(committed) if committed.is_dir() else set()
    diffs = [f"missing: {n}" for n in sorted(names_fresh - names_committed)]
    diffs += [f"not generated: {n}" for n in sorted(names_committed - names_fresh)]
    diffs += [
        f"differs: {n}"
        for n in sorted(names_fresh & names_committed)
        if not filecmp.cmp(fresh / n, committed / n, shallow=False)
    ]
    return diffs


def strays(project: Path, package: Path) -> list[str]:
    """Python modules in `generated/` outside the package (say, of an older layout)."""
    found = []
    for path in project.rglob("*.py*"):
        parts = path.relative_to(project).parts
        if package.name in parts[:1] or parts[0] in BUILD_LEFTOVERS or parts[0].endswith(".egg-info"):
            continue
        if "__pycache__" not in parts:
            found.append(f"not generated: {path.relative_to(project)}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated/ is stale")
    args = parser.parse_args()
    target = PROJECT / PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / PACKAGE
        generate(fresh)
        if not args.check:
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(fresh, target)
            return 0
        diffs = differences(fresh, target) + strays(PROJECT, target)
    if diffs:
        print("generated/ does not match protos/ (run `make gen`):", *diffs, sep="\n  ", file=sys.stderr)
        return 1
    print("generated/ is fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
