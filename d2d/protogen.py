"""Regenerate the Python code for `protos/` into `d2d/v1/`.

    python -m d2d.protogen           # write
    python -m d2d.protogen --check   # exit 1 if the committed code is stale

The output depends only on `protos/` and the pinned grpcio-tools, so a stale check is a plain
byte comparison of a fresh generation with the committed files.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.resources
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT_PACKAGE = ROOT / "d2d" / "v1"


def _include_dirs() -> list[str]:
    import google.api.field_behavior_pb2 as field_behavior  # googleapis-common-protos ships .proto too
    import grpc_tools

    googleapis_root = Path(field_behavior.__file__).resolve().parent.parent.parent
    well_known = Path(str(importlib.resources.files(grpc_tools) / "_proto"))
    return [str(PROTOS), str(googleapis_root), str(well_known)]


def generate(out_root: Path) -> list[Path]:
    """Generate code for every proto under protos/ into out_root (mirroring the package path)."""
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = ["protoc", *(f"-I{d}" for d in _include_dirs())]
    args += [f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}"]
    if protoc.main(args + sources) != 0:
        raise SystemExit("protoc failed")
    generated = sorted((out_root / "d2d" / "v1").glob("*.py*"))
    (out_root / "d2d" / "v1" / "__init__.py").write_text(
        '"""Generated from protos/d2d/v1 by `python -m d2d.protogen`; do not edit."""\n'
    )
    return generated


def stale_files() -> list[str]:
    """Files in d2d/v1 that differ from a fresh generation (missing, changed or extra)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "d2d" / "v1"
        names = {p.name for p in fresh.iterdir() if p.is_file()}
        committed = {p.name for p in OUT_PACKAGE.glob("*") if p.is_file()} if OUT_PACKAGE.exists() else set()
        stale = sorted(names ^ committed)
        stale += [n for n in sorted(names & committed) if not filecmp.cmp(fresh / n, OUT_PACKAGE / n, shallow=False)]
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if d2d/v1 is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("generated code is stale; run `python -m d2d.protogen`:", *stale, sep="\n  ")
            return 1
        print("generated code is up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        OUT_PACKAGE.mkdir(exist_ok=True)
        for old in OUT_PACKAGE.glob("*_pb2*.py*"):
            old.unlink()
        for path in (Path(tmp) / "d2d" / "v1").iterdir():
            if path.is_file():
                (OUT_PACKAGE / path.name).write_bytes(path.read_bytes())
    print(f"wrote {OUT_PACKAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
