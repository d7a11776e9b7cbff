"""Rewrite records holding absolute paths (written by older versions) so that their paths are relative to the
repository root, as records.write_record writes them now. In place, and idempotent: run it again whenever older
code has written more records.

    python -m experiments.portable_records             # every .json / .jsonl file git tracks or would track
    python -m experiments.portable_records --check True   # only list the files with absolute paths; exit 1 if any

A record made in another checkout (e.g. /home/a/fpdm/experiments/results/...) names that checkout's root: the part
of an absolute path before its first component that is a top-level entry of this repository (experiments/,
pretrained/, ...). Every absolute path of the file is written relative to that old root, those outside it too
(`../scratch/run`), which is what records.write_record would have stored.
"""
from __future__ import annotations

import json
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cli
from checkpoint import atomic_write
from config import UserError, build_config, flag, parse_flags
from records import ABSOLUTE_PATH, record_root, relative_paths

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class PortableConfig:
    """Flags of portable_records."""
    check: bool = flag(False, "Only list the records that hold absolute paths (exit status 1 if any).")


def record_files(repo: Path) -> list[Path]:
    """The .json / .jsonl files of `repo` that git tracks or would track (ignored run folders are left alone)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
                                 "*.json", "*.jsonl"], cwd=repo, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise UserError(f"{repo}: cannot list the records with git ({error})") from None
    return sorted({repo / name for name in listed.split("\0") if name and (repo / name).is_file()})


def old_root(text: str, path: Path, repo: Path = REPO_ROOT) -> Path:
    """The checkout root the absolute paths in `text` were written in (the most common one), else `path`'s
    record_root."""
    top_level = {entry.name for entry in repo.iterdir()} - {".git"}
    roots: Counter[Path] = Counter()
    for match in ABSOLUTE_PATH.finditer(text):
        parts = Path(match.group(0)).parts  # ("/", "work", "main", "experiments", ...)
        root = next((Path(*parts[:i]) for i in range(1, len(parts)) if parts[i] in top_level), None)
        if root is not None:
            roots[root] += 1
    return roots.most_common(1)[0][0] if roots else record_root(path)


def rewrite(path: Path, repo: Path = REPO_ROOT) -> bool:
    """Make one record's paths relative, atomically; returns whether it changed."""
    text = path.read_text()
    portable = relative_paths(text, old_root(text, path, repo))
    if portable == text:
        return False
    lines = [portable] if path.suffix == ".json" else [line for line in portable.splitlines() if line.strip()]
    try:
        for line in lines:  # a rewrite that broke the JSON is never written
            json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON after the rewrite ({error}); left as it was") from None
    atomic_write(path, lambda tmp: Path(tmp).write_text(portable))
    return True


def main(argv: list[str] | None = None) -> list[Path]:
    """Rewrite (or with --check, list) the records holding absolute paths; returns those files."""
    config = build_config(PortableConfig, parse_flags(__doc__, [PortableConfig], argv))
    holding = [path for path in record_files(REPO_ROOT) if ABSOLUTE_PATH.search(path.read_text())]
    for path in holding:
        print(f"{path.relative_to(REPO_ROOT)}: {'holds absolute paths' if config.check else 'rewritten'}")
        if not config.check:
            rewrite(path)
    if config.check and holding:
        raise SystemExit(1)
    return holding


if __name__ == "__main__":
    cli.run(main)
