"""The ``accel-models`` command: backends | ops | check | generate | demo.

``backends`` and ``ops`` live here; other subcommands are contributed by modules that define
``register(subparsers)`` (see ``COMMAND_MODULES``), so the CLI does not import the runtime until needed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

from accel_models.backends import (
    COMPOSITE_OPS,
    KV_CACHE_GROUP,
    LINEAR_GROUP,
    OP_NAMES,
    PORTABLE_OPS,
    PRIMITIVE_OPS,
    BackendError,
    list_backends,
    parse_ops_override,
    resolve_ops,
)

#: Modules that add subcommands with ``register(subparsers)``.
COMMAND_MODULES = ("accel_models.runtime.cli", "accel_models.testing.cli")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*(str(c) for c in row)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def cmd_backends(args: argparse.Namespace) -> int:
    rows = []
    data = []
    for b in list_backends():
        status = "usable" if b.usable else f"unusable: {b.reason}"
        device = b.info.device_type if b.info else "?"
        prio = str(b.info.priority) if b.info else "?"
        fused = len(b.ops & COMPOSITE_OPS.keys())
        count = f"{len(b.ops & frozenset(PRIMITIVE_OPS))}/{len(PRIMITIVE_OPS)}" + (f" +{fused} fused" if fused else "")
        rows.append((b.name, device, b.version or "-", prio, count, status))
        data.append({"name": b.name, "device_type": device, "version": b.version, "usable": b.usable,
                     "reason": b.reason, "ops": sorted(b.ops), "source": b.source})
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(_table(("backend", "device", "version", "priority", "ops", "status"), rows))
    return 0


def cmd_ops(args: argparse.Namespace) -> int:
    parse_ops_override(os.environ.get("ACCEL_OPS", ""))  # a malformed ACCEL_OPS is an error here too
    backends = list_backends()
    names = [b.name for b in backends]
    rows = []
    for op in OP_NAMES:
        row = [op + (" *" if op in KV_CACHE_GROUP else " +" if op in LINEAR_GROUP
                     else " ~" if op in PORTABLE_OPS else "")]
        for b in backends:
            row.append("native" if op in b.ops else "composite" if op in COMPOSITE_OPS else "fallback")
        rows.append(row)
    if args.json:
        print(json.dumps({op: {b.name: op in b.ops for b in backends} for op in OP_NAMES}, indent=2))
        return 0
    print(_table(["op", *names], rows))
    print("\n* KV-cache group: these four ops always come from one backend (fallback moves them together).")
    print("+ linear group: both from one backend; their fallback is the device's own torch matmul (F.linear).")
    print("~ portable: the reference's plain torch runs on the backend's device (not a fallback in strict mode).")
    print(f"{', '.join(COMPOSITE_OPS)}: fused ops (API 1.3-1.5); 'composite' = the same backend's own ops called "
          "in turn (no fallback; for the whole-layer ops: the layer runs op by op), also bound where a native "
          "one's backend does not provide every op it fuses.")
    unusable = [b for b in backends if not b.usable]
    for b in unusable:
        print(f"note: {b.name} is unusable here ({b.reason})")
    if args.backend:
        try:
            table = resolve_ops(args.backend, allow_unavailable=True)
        except BackendError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"\nbound for {args.backend!r}: " + ", ".join(f"{op}={p}" for op, p in table.providers.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel-models", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("backends", help="list installed backends: device, version, usable or why not")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_backends)
    p = sub.add_parser("ops", help="op x backend matrix: native, fallback or composite")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--backend", help="also show what each op binds to for this backend")
    p.set_defaults(func=cmd_ops)
    for module in COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module.startswith(exc.name):
                continue  # that part of accel-models is not present
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
