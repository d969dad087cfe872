"""A results page of the documentation site (`docs/results/NAME.md`) from one or more run directories.

`bdsafety report DIR... --docs docs/results/NAME.md` calls `write_docs_page`. The page holds, for each run, what the
run directory records about where it ran (the command, the commit, the date, the machine, the thread count, the
versions; "not recorded by the run" where it records nothing), then the run's claims, tables and figures, built by the
same code as its report.md (rendered from results.json, never recomputed). The figures go to
`docs/results/NAME/`, linked relatively. The page's `commit:` line follows docs/results/index.md. A new page is
added to the list in docs/results/index.md and to the Results section of mkdocs.yml's nav, so that the site builds
in strict mode (tests/test_docs.py). `write_measurement_page` gives a benchmark's output folder (benchmarks/pages.py)
the same header and commit line.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import store
from ..errors import UsageError
from . import build_content, with_timings
from .figures import slug
from .html import _md_text, markdown_sections

log = logging.getLogger(__name__)

ENV_FILE = store.ENV_FILE  # where the run ran (store.environment(): command, commit, date, machine, threads, torch)
#: The first line of every page this module writes: a page without it is never overwritten.
MARKER = "<!-- written by 'bdsafety report --docs': regenerate it with the command below, do not edit it by hand -->"
INDEX_START = "<!-- the pages written by 'bdsafety report --docs', one a line: the command keeps this list -->"
INDEX_END = "<!-- end of the pages written by 'bdsafety report --docs' -->"
HEX = re.compile(r"[0-9a-f]{7,40}")
ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"]+")
NOT_RECORDED = "not recorded by the run"


@dataclass(frozen=True)
class Run:
    """One run directory as the page shows it."""

    label: str  # the section's heading
    shown: str  # the directory as written on the page: relative to the current directory, or its name
    env: dict  # env.json's content ({} without one)
    versions: dict[str, list[str]]  # each version key of the stages' records -> its distinct values
    facts: list[tuple[str, str]]  # (what, text) of the run's header


@dataclass(frozen=True)
class DocsPage:
    """What `write_docs_page` wrote, and what is left to the user."""

    page: Path
    figures: list[Path]
    registered: list[Path]  # index.md and mkdocs.yml, where the page was added
    todo: list[str]  # what the user still has to do to keep the site building (empty: nothing)
    unrecorded: list[str]  # the facts that some run does not record (commit, machine, ...)


def write_docs_page(run_dirs: list[Path], page: Path, title: str | None = None) -> DocsPage:
    """Write the results page `page` from `run_dirs` (each holding results.json), its figures in `page`'s stem folder.

    Args:
        run_dirs: the run directories, one section each, in this order.
        page: the Markdown page to write, e.g. docs/results/NAME.md.
        title: the page's title (default: the page's name).

    Returns:
        The written page and figures, the files it was registered in and what is left to do.

    Raises:
        UsageError: a page that is not Markdown, is an index, or exists without having been written here; a run
            directory without results.json; a figure folder that holds other files.
    """
    page, title = Path(page), title or Path(page).stem
    check_page(page)
    check_run_dirs([Path(d) for d in run_dirs])
    results = [with_timings(store.read_json(Path(d) / store.RESULTS_FILE), Path(d) / store.TIMINGS_FILE)
               for d in run_dirs]  # every run is read before anything is written
    runs = [run_of(Path(d), label) for d, label in zip(run_dirs, run_labels([Path(d) for d in run_dirs]))]
    folder = page.with_suffix("")
    contents, command = [build_content(r) for r in results], page_command(run_dirs, page, title)
    lines = [MARKER, "", f"# {_md_text(title)}", "", commit_line(runs, git_head(page)), "",
             f"Written by `{command}` from the runs' results.json: every number is a field "
             "of it, shown by the code that writes each run's report.md. Regenerate the page with that command "
             "rather than editing it.", ""]
    figures: dict[Path, bytes] = {}
    for run, run_dir, content in zip(runs, run_dirs, contents):
        sub = folder if len(runs) == 1 else folder / slug(run.label)
        links = {name: (sub / name).relative_to(page.parent).as_posix() for name, _, _ in content.figures}
        figures.update({sub / name: run_figure(Path(run_dir) / name, png) for name, _, png in content.figures})
        lines += [f"## {_md_text(run.label)}", ""] + [f"- {what}: {text}" for what, text in run.facts] + [""]
        lines += markdown_sections(content, level=3, figure_links=links, nested="    ")
    write_figures(folder, figures)
    store.atomic_write_bytes(page, ("\n".join(lines).rstrip() + "\n").encode("utf-8"))
    registered, todo = register(page, title, command)
    return DocsPage(page, sorted(figures), registered, todo, unrecorded(runs))


def write_measurement_page(folder: Path, page: Path, title: str, command: str, body: list[str]) -> DocsPage:
    """Write the results page `page` of a measurement that is not a run directory (a benchmark's output folder):
    the header and `commit:` line that `write_docs_page` gives a run, from `folder`'s env.json
    (`store.environment()` at the measurement), then `body`, Markdown lines built by the measurement's own code.

    Args:
        folder: the measurement's folder, holding its env.json and its results.
        page: the Markdown page to write, e.g. docs/results/NAME.md.
        title: the page's title.
        command: the command that rewrites the page from `folder`, as the page shows it.
        body: the page's tables and text.

    Raises:
        UsageError: as `write_docs_page` for the page; a folder without env.json.
    """
    page, folder = Path(page), Path(folder)
    check_page(page)
    if not (folder / ENV_FILE).is_file():
        raise UsageError(f"{folder} has no {ENV_FILE}, so its page could not name the commit and machine: measure "
                         f"again with the current code")
    run = run_of(folder, Path(os.path.abspath(folder)).name)
    lines = [MARKER, "", f"# {_md_text(title)}", "", commit_line([run], git_head(page)), "",
             f"Written by `{command}` from the measurement's files. Regenerate the page with that command rather "
             "than editing it.", "", f"## {_md_text(run.label)}", ""]
    lines += [f"- {what}: {text}" for what, text in run.facts if what != "time"] + [""] + body
    store.atomic_write_bytes(page, ("\n".join(lines).rstrip() + "\n").encode("utf-8"))
    registered, todo = register(page, title, command)
    return DocsPage(page, [], registered, todo, unrecorded([run]))


def check_page(page: Path) -> None:
    """Refuse, before anything is written, a page that is not a new or generated Markdown page."""
    if page.suffix != ".md":
        raise UsageError(f"--docs takes a Markdown page, e.g. docs/results/NAME.md; got {page}")
    if page.name == "index.md":
        raise UsageError(f"{page} is a section's index, written by hand; choose another page name")
    if page.exists() and not page.read_text(errors="replace").startswith(MARKER):
        raise UsageError(f"{page} exists and was not written by 'bdsafety report --docs'; choose another page name")
    folder = page.with_suffix("")
    others = [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".png"] if folder.is_dir() else []
    if folder.exists() and (not folder.is_dir() or others):
        raise UsageError(f"{folder} holds other files than the page's figures; choose another page name")


def check_run_dirs(run_dirs: list[Path]) -> None:
    """Refuse, before anything is written, a directory without results.json."""
    for run_dir in run_dirs:
        if not (run_dir / store.RESULTS_FILE).is_file():
            raise UsageError(f"{run_dir} has no {store.RESULTS_FILE}: is it a run directory of 'bdsafety run' or "
                             f"'bdsafety demo'?")


def shown_path(path: Path) -> str:
    """`path` relative to the current directory when it lies below it, else its name: a page never names a
    machine's absolute path (tests/test_docs.py)."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return absolute.name


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's section heading: its directory's name, or where two runs share a name, its shown path."""
    names = [Path(os.path.abspath(d)).name for d in run_dirs]
    return [name if names.count(name) == 1 else shown_path(d) for name, d in zip(names, run_dirs)]


def run_of(run_dir: Path, label: str) -> Run:
    """What `run_dir` records about where it ran: its env.json, else the versions its stages' records keep."""
    env = store.read_json(run_dir / ENV_FILE) if (run_dir / ENV_FILE).is_file() else {}
    versions: dict[str, set[str]] = {}
    for record in sorted((run_dir / store.STAGES_DIR).glob(f"*/{store.RECORD_FILE}")):
        for key, value in (store.read_json(record).get("versions") or {}).items():
            versions.setdefault(key, set()).add(str(value))
    distinct = {key: sorted(values) for key, values in versions.items()}
    return Run(label, shown_path(run_dir), env, distinct, run_facts(run_dir, env, distinct))


def run_facts(run_dir: Path, env: dict, versions: dict[str, list[str]]) -> list[tuple[str, str]]:
    """The run's header: (what, Markdown text), saying where a fact is not recorded."""
    command = env.get("command")
    spec = f" (its resolved spec is `{store.SPEC_YAML}` in the run directory)" \
        if (run_dir / store.SPEC_YAML).is_file() else ""
    return [("run directory", f"`{shown_path(run_dir)}`"),
            ("command", f"`{scrub(command)}`" if command else NOT_RECORDED + spec),
            ("commit", commit_text(env)),
            ("date", _md_text(env["date"]) if env.get("date") else date_text(run_dir)),
            ("machine", machine_text(env, versions)),
            ("threads", str(env["threads"]) if env.get("threads") else NOT_RECORDED),
            ("torch", version_text("torch", env, versions)),
            ("bdsafety", version_text("bdsafety", env, versions)),
            ("time", time_text(run_dir))]


def scrub(command: str) -> str:
    """A recorded command with each absolute path written as `shown_path` writes it."""
    return ABSOLUTE_PATH.sub(lambda match: shown_path(Path(match.group(0))), str(command)).replace("`", "'")


def commit_text(env: dict) -> str:
    """The run's recorded commit, with whether its working tree was clean."""
    commit = str(env.get("commit") or "")
    if not HEX.fullmatch(commit):
        return NOT_RECORDED
    return commit if env.get("dirty") is False else f"{commit} with uncommitted changes" if env.get("dirty") else \
        f"{commit} (the run does not record whether the working tree was clean)"


def date_text(run_dir: Path) -> str:
    """Where the run records no date: when its results.json was last written."""
    stamp = datetime.datetime.fromtimestamp((run_dir / store.RESULTS_FILE).stat().st_mtime, datetime.timezone.utc)
    return f"{stamp:%Y-%m-%d %H:%M} UTC, the modification time of {store.RESULTS_FILE} ({NOT_RECORDED})"


def machine_text(env: dict, versions: dict[str, list[str]]) -> str:
    """The recorded GPU and CPU models, else the operating system that the stages' records name."""
    parts = [str(env[key]) for key in ("gpu", "cpu") if env.get(key)]
    if parts:
        return _md_text(" on ".join(parts) + (f" (device {env['device']})" if env.get("device") else ""))
    system = versions.get("platform")
    return NOT_RECORDED + (f" (its stages' records name the system only: {_md_text(', '.join(system))})"
                           if system else "")


def version_text(key: str, env: dict, versions: dict[str, list[str]]) -> str:
    """The version of `key` (torch, bdsafety) from env.json, else from the stages' records."""
    if env.get(key):
        return _md_text(str(env[key]))
    values = versions.get(key) or []
    if len(values) > 1:
        return _md_text(" and ".join(values)) + " (the stages' records differ: the run was resumed with another " \
                                                "version)"
    return f"{_md_text(values[0])} (from the stages' records)" if values else NOT_RECORDED


def time_text(run_dir: Path) -> str:
    """The last invocation's wall time from timings.json (a resumed run's earlier invocations are not in it)."""
    path = run_dir / store.TIMINGS_FILE
    timings = store.read_json(path) if path.is_file() else {}
    if not isinstance(timings.get("total_s"), (int, float)):
        return NOT_RECORDED
    computed, reused = (len(timings.get(key) or []) for key in ("computed", "reused"))
    return (f"{timings['total_s']:,.0f} s for its last invocation, which computed {computed} stages and reused "
            f"{reused} ({store.TIMINGS_FILE})")


def git_head(page: Path) -> str | None:
    """The short hash of the commit checked out where `page` goes, or None outside a git checkout."""
    folder = next(p for p in Path(os.path.abspath(page)).parents if p.is_dir())
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    hash_ = head.stdout.strip()
    return hash_ if head.returncode == 0 and HEX.fullmatch(hash_) else None


def commit_line(runs: list[Run], head: str | None) -> str:
    """The page's `commit:` line (docs/results/index.md): the runs' commit where each recorded a clean one, else
    `unknown (measured before <the checkout's commit>)`."""
    commits = [str(run.env.get("commit") or "") for run in runs]
    if all(HEX.fullmatch(c) and run.env.get("dirty") is False for c, run in zip(commits, runs)):
        distinct = list(dict.fromkeys(commits))
        if len(distinct) > 1:
            return f"commit: {', '.join(distinct)} (each run's section names its own)"
        summaries = {machine_summary(run.env) for run in runs}
        summary = summaries.pop() if len(summaries) == 1 else "each run's section names its machine"
        return f"commit: {distinct[0]}" + (f" ({summary})" if summary else "")
    why = "the runs did not record a clean commit; each run's section says what it records"
    if head is None:
        log.warning("no git checkout holds the page, and the runs do not record their commit: tests/test_docs.py "
                    "will refuse the page's commit line")
        return f"commit: unknown ({why}, and no git checkout holds this page)"
    return f"commit: unknown (measured before {head}, the checkout's commit when the page was written: {why})"


def machine_summary(env: dict) -> str:
    """The recorded torch version, machine and thread count in a few words, e.g. 'torch 2.13.0, AMD EPYC, 2 threads'."""
    parts = [f"torch {env['torch']}" if env.get("torch") else "", str(env.get("gpu") or env.get("cpu") or ""),
             f"{env['threads']} threads" if env.get("threads") else ""]
    return _md_text(", ".join(part for part in parts if part))


def page_command(run_dirs: list[Path], page: Path, title: str) -> str:
    """The command that (re)writes the page, with the paths as the page shows them."""
    words = ["bdsafety", "report", *(shown_path(Path(d)) for d in run_dirs), "--docs", shown_path(page)]
    return shlex.join(words + (["--title", title] if title != page.stem else []))


def run_figure(path: Path, rendered: bytes) -> bytes:
    """The run's own figure file where its report wrote one, else the same figure rendered from results.json."""
    return path.read_bytes() if path.is_file() else rendered


def write_figures(folder: Path, figures: dict[Path, bytes]) -> None:
    """Write each figure atomically, then remove the folder's PNGs that an earlier version of the page had."""
    for path, png in figures.items():
        store.atomic_write_bytes(path, png)
    if folder.is_dir():
        for stale in [p for p in folder.rglob("*.png") if p not in figures]:
            stale.unlink()
        for directory in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
            if not any(directory.iterdir()):
                directory.rmdir()
        if not any(folder.iterdir()):
            folder.rmdir()


def unrecorded(runs: list[Run]) -> list[str]:
    """The facts that at least one run does not record."""
    return [what for what in ("command", "commit", "date", "machine", "threads", "torch")
            if any(NOT_RECORDED in dict(run.facts)[what] for run in runs)]


def register(page: Path, title: str, command: str) -> tuple[list[Path], list[str]]:
    """List a page of `<docs_dir>/results/` in that folder's index.md and in mkdocs.yml's nav under Results, where
    it is not yet; return the files changed and what the user has to do by hand (where either cannot be done)."""
    site = find_site(page)
    if site is None:
        return [], []  # a page outside a MkDocs site: nothing to keep building
    config, docs_dir = site
    nav_path = Path(os.path.abspath(page)).relative_to(docs_dir).as_posix()
    index = docs_dir / "results" / "index.md"
    if not nav_path.startswith("results/") or not index.is_file():
        return [], [f"the page is outside {shown_path(docs_dir / 'results')}: add {nav_path} to the nav of "
                    f"{shown_path(config)} and link it from a page of the site (tests/test_docs.py checks both)"]
    link = nav_path.removeprefix("results/")
    registered, todo = [], []
    if list_in_index(index, link, f"- [{_md_text(title)}]({link}): `{command}`"):
        registered.append(index)
    else:
        todo.append(f"link {link} from {shown_path(index)}: it has no list between the lines {INDEX_START} and "
                    f"{INDEX_END}")
    added = add_to_nav(config, nav_path, title)
    if added:
        registered.append(config)
    elif added is None:
        todo.append(f"add '- \"{title}\": {nav_path}' to the Results section of {shown_path(config)}'s nav")
    return registered, todo


def find_site(page: Path) -> tuple[Path, Path] | None:
    """(mkdocs.yml, its docs folder) of the MkDocs site that holds `page`, or None."""
    absolute = Path(os.path.abspath(page))
    for folder in absolute.parents:
        config = folder / "mkdocs.yml"
        if config.is_file():
            docs_dir = Path(os.path.abspath(folder / (read_config(config).get("docs_dir") or "docs")))
            return (config, docs_dir) if docs_dir in absolute.parents else None
    return None


def read_config(config: Path) -> dict:
    try:
        loaded = yaml.safe_load(config.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{config} is not valid YAML ({exc}); fix it before writing a page into its site") from None
    return loaded if isinstance(loaded, dict) else {}


def list_in_index(index: Path, link: str, line: str) -> bool:
    """Put `line` in the index's list of generated pages, in place of the line linking `link` if there is one;
    False where the index has no such list."""
    text = index.read_text()
    if INDEX_START not in text or INDEX_END not in text.split(INDEX_START, 1)[1]:
        return False
    head, rest = text.split(INDEX_START, 1)
    body, tail = rest.split(INDEX_END, 1)
    entries = [entry for entry in body.splitlines() if entry.strip()]
    mine = [i for i, entry in enumerate(entries) if f"]({link})" in entry]
    if mine:
        entries[mine[0]] = line
    else:
        entries.append(line)
    # Blank lines around the list: Python-Markdown would read lines right after an HTML comment as raw HTML.
    new = head + INDEX_START + "\n\n" + "\n".join(entries) + "\n\n" + INDEX_END + tail
    if new != text:
        store.atomic_write_bytes(index, new.encode("utf-8"))
    return True


def nav_pages(nav) -> set[str]:
    """Every page path that a MkDocs nav names, at any depth."""
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, list):
        return set().union(*(nav_pages(item) for item in nav))
    if isinstance(nav, dict):
        return set().union(*(nav_pages(value) for value in nav.values()))
    return set()


def add_to_nav(config: Path, nav_path: str, title: str) -> bool | None:
    """Append `nav_path` to the `- Results:` section of mkdocs.yml's nav, editing the text so that its comments and
    layout stay. False: it is there already; None: the nav has no such section (or the edit would not parse)."""
    text = config.read_text()
    before = nav_pages(read_config(config).get("nav"))
    if nav_path in before:
        return False
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.fullmatch(r"\s*- Results:\s*", line)), None)
    items = [i for i in range(start + 1, len(lines)) if lines[i].strip()] if start is not None else []
    if not items:
        return None
    indent = len(lines[items[0]]) - len(lines[items[0]].lstrip())
    end = items[0]
    for i in items:
        if len(lines[i]) - len(lines[i].lstrip()) < indent:
            break
        end = i
    entry = f"{' ' * indent}- {json.dumps(title)}: {nav_path}\n"
    new_lines = lines[:end + 1] + [entry] + lines[end + 1:]
    new_lines[end] = new_lines[end].rstrip("\n") + "\n"
    new = "".join(new_lines)
    try:
        after = nav_pages((yaml.safe_load(new) or {}).get("nav"))
    except yaml.YAMLError:
        return None
    if after != before | {nav_path}:
        return None
    store.atomic_write_bytes(config, new.encode("utf-8"))
    return True
