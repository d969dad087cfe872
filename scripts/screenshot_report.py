"""Save a PNG screenshot of a report.html with headless Chromium (for checking the rendered page by eye).

Usage: python scripts/screenshot_report.py RUN_DIR/report.html out.png [--width 1280] [--height 3000]

Needs a Chromium binary (`chromium`, `chromium-browser` or `google-chrome`); on Debian: apt-get install -y chromium.
The page is self-contained, so no network access is needed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("screenshot_report")

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(f"no Chromium found (looked for {', '.join(BROWSERS)}); install it: apt-get install -y chromium")


def screenshot(page: Path, out: Path, width: int, height: int, timeout_s: float = 120) -> None:
    """Render `page` in headless Chromium and write a `width`×`height` PNG to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [find_browser(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                   "--no-first-run", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                   f"--screenshot={out.resolve()}", page.resolve().as_uri()]
        log.info("running %s", " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="the report.html to render")
    parser.add_argument("out", type=Path, help="where to write the PNG")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.page.is_file():
        raise SystemExit(f"{args.page} does not exist; run write_report(run_dir) first")
    screenshot(args.page, args.out, args.width, args.height)
    log.info("saved %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
