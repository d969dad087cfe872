"""Behaviour check for refactors: run fixed specs and compare their results.json byte for byte.

    python scripts/check_unchanged.py save DIR [CASE...]     # before the change: DIR/<case>/run/results.json
    python scripts/check_unchanged.py compare DIR [CASE...]  # after it: rerun into DIR/<case>.new and diff

To take the "before" side from another commit, run `save` with PYTHONPATH=<that checkout>/src.

The cases are the test suite's run specs (tests/test_run.py, tests/test_attacks_pipeline.py) and
`bdsafety demo --quick`. Numbers are the same only for the same seed on the same CPU model, so both
steps must run on one machine.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_spec(module: str) -> str:
    loaded = importlib.util.spec_from_file_location(module, ROOT / "tests" / f"{module}.py")
    code = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(code)
    return code.SPEC


def run_case(name: str, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "bdsafety"]
    if name == "demo-quick":
        command += ["demo", "--quick"]
    else:
        spec = out.parent / f"{name}.yaml"
        spec.write_text(test_spec(name))
        command += ["run", str(spec)]
    subprocess.run(command + ["--out", str(out / "run"), "--device", "cpu", "-q"], check=True,
                   stdout=subprocess.DEVNULL)


CASES = ("test_run", "test_attacks_pipeline", "demo-quick")


def main(mode: str, folder: str, cases: list[str]) -> int:
    base, failed = Path(folder), 0
    for name in cases or CASES:
        out = base / (name if mode == "save" else f"{name}.new")
        run_case(name, out)
        if mode == "compare":
            same = (out / "run/results.json").read_bytes() == (base / name / "run/results.json").read_bytes()
            print(f"{name}: {'identical' if same else 'DIFFERENT'}")
            failed += not same
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("save", "compare") or not set(sys.argv[3:]) <= set(CASES):
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
