"""Make the repository's distributions importable and discoverable on a machine without pip access.

    python3 bench/cuda/device_setup.py SITE   # then: export PYTHONPATH=SITE

Writes SITE/<dist>.dist-info (METADATA + entry_points.txt, read from each pyproject.toml) and a .pth file
pointing at the source trees, so importlib.metadata finds the backends' entry points exactly as after
``pip install -e``, without building anything (the GPU machine has no network for build isolation).
"""

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DISTS = [ROOT, ROOT / "backends" / "reference", ROOT / "backends" / "cuda"]


def main() -> None:
    site = Path(sys.argv[1])
    site.mkdir(parents=True, exist_ok=True)
    for d in DISTS:
        proj = tomllib.loads((d / "pyproject.toml").read_text())["project"]
        name, version = proj["name"], proj["version"]
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        eps = proj.get("entry-points", {})
        lines = []
        for group, entries in eps.items():
            lines.append(f"[{group}]")
            lines += [f"{k} = {v}" for k, v in entries.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    # (a .pth file is not read from PYTHONPATH entries: put the source trees on PYTHONPATH too)
    print("installed", [d.name for d in DISTS], "into", site)


if __name__ == "__main__":
    main()
