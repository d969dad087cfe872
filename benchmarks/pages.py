"""A results page of the documentation site from a benchmark's output folder (docs/results/index.md): the
`--docs`, `--title` and `--from` options that the benchmark scripts share, and the page they write."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Callable

from bdsafety import __version__, store
from bdsafety.errors import UsageError
from bdsafety.report.docs_page import shown_path, write_measurement_page


def add_page_arguments(parser: argparse.ArgumentParser, title: str) -> None:
    parser.add_argument("--docs", type=Path, help="also write this results page of the docs (docs/results/NAME.md)")
    parser.add_argument("--title", default=title, help=f"the --docs page's title (default: {title!r})")
    parser.add_argument("--from", dest="source", type=Path,
                        help="with --docs: write the page from this earlier measurement's folder; measure nothing")


def write_page(script: str, parser: argparse.ArgumentParser, args: argparse.Namespace, folder: Path,
               result_file: str, body_of: Callable[[dict], list[str]]) -> int:
    """Write `args.docs` from `folder`'s `result_file` (Markdown lines by `body_of`) and env.json, with the command
    that rewrites it; `script` is the benchmark's path in the checkout."""
    if not (Path(folder) / result_file).is_file():
        raise UsageError(f"{folder} has no {result_file}: give --from the --out folder of a {script} run")
    title = args.title
    command = shlex.join(["python", script, "--from", shown_path(folder), "--docs", shown_path(args.docs),
                          *(["--title", title] if title != parser.get_default("title") else [])])
    body = body_of(store.read_json(Path(folder) / result_file))
    written = write_measurement_page(folder, args.docs, title, command, body)
    print(f"results page: {written.page}" + "".join(f"\n{todo}" for todo in written.todo))
    return 0


def environment(device: str) -> dict:
    """Where the measurement runs (store.environment() and the bdsafety version), as its page names it: taken when
    it starts, so that the commit and the state of the working tree are those of the code that measured."""
    return {**store.environment(device), "bdsafety": __version__}


def run_script(main: Callable[[list[str]], int]) -> None:
    """Run a benchmark's `main` on the command line's arguments; bad input is one line and exit code 2, as on the
    bdsafety command line."""
    try:
        sys.exit(main(sys.argv[1:]))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
