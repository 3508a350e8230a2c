"""``accel-models check``: run the conformance kit on a backend and print a per-op table."""

from __future__ import annotations

import argparse
import json
import sys

from accel_models.backends import BackendError, OP_NAMES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="run the conformance kit on a backend (ops vs float64 reference, then models)")
    p.add_argument("--backend", required=True, help="backend to check")
    p.add_argument("--ops", help=f"comma list of ops to check (default: all of {', '.join(OP_NAMES)})")
    p.add_argument("--quick", action="store_true", help="fewer, smaller cases (a minute or less)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--native-only", action="store_true", help="skip the ops the backend falls back on")
    p.add_argument("--no-models", action="store_true", help="skip the model-level checks (tiny models vs the reference; device graphs vs eager steps)")
    p.add_argument("--allow-unavailable", action="store_true",
                   help="check a backend that reports itself unusable here (e.g. through an emulation)")
    p.add_argument("--device", help="device to run on (default: the backend's device type)")
    p.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        from accel_models.testing.conformance import run_conformance
    except ModuleNotFoundError as exc:  # hypothesis missing
        print(f"error: the conformance kit needs {exc.name}: pip install 'accel-models[testing]'", file=sys.stderr)
        return 2
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else None
    try:
        report = run_conformance(args.backend, ops=ops, quick=args.quick, device=args.device,
                                 allow_unavailable=args.allow_unavailable, native_only=args.native_only)
        if not args.no_models:
            from accel_models.testing.models import run_model_checks

            report.models = run_model_checks(args.backend, quick=args.quick, device=args.device,
                                             allow_unavailable=args.allow_unavailable)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        from accel_models.cli import _table

        rows = []
        for r in report.ops:
            worst = "-" if r.status == "skip" else ("inf" if r.worst == float("inf") else f"{r.worst:.3f}")
            provider = "native" if r.native else "composite" if r.provider == "composite" else f"fallback ({r.provider})"
            rows.append((r.op, provider, r.status.upper(), worst,
                         str(r.cases), ",".join(r.dtypes) or "-", r.message[:100]))
        print(f"conformance of backend {args.backend!r} (worst = max |err| / tolerance; <= 1 passes)\n")
        print(_table(("op", "provider", "result", "worst", "cases", "dtypes", "note"), rows))
        if report.models:
            print()
            print(_table(("model", "dtype", "result", "max |diff| / max |logit|", "note"),
                         [(m["model"], m["dtype"], m["status"].upper(), m.get("error", "-"), m.get("message", ""))
                          for m in report.models]))
        failed = report.failures()
        print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 0 if report.passed else 1
