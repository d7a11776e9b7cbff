"""The README's sampling table runs as written: every row's flags, against the shipped checkpoints, spend the
blocks per image the table states."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import sample

README = Path(__file__).resolve().parents[1] / "README.md"


def technique_rows() -> list[tuple[str, str, str]]:
    """(technique, flags, blocks column) of the table under '### Sample under a compute budget'."""
    text = README.read_text()
    section = text[text.index("### Sample under a compute budget"):text.index("### FID")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`--"):
            rows.append((cells[0], re.match(r"`([^`]*)`", cells[1]).group(1), cells[2]))
    return rows


def test_the_table_is_found():
    assert len(technique_rows()) >= 7


@pytest.mark.parametrize("technique, flags, blocks", technique_rows(), ids=lambda v: str(v)[:20])
def test_readme_sampling_row_spends_the_stated_blocks(technique, flags, blocks, tmp_path, monkeypatch):
    monkeypatch.chdir(README.parent)  # pretrained/ paths in the table are relative to the repository root
    argv = shlex.split(flags)
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out")  # each row names its own folder
    record = sample.main(argv + ["--num_samples", "2"])
    stated = int(re.search(r"\d+", blocks).group())
    spent = record["stats"]["blocks_per_image_max"]
    if blocks.startswith("at most"):
        assert spent <= stated, technique
    else:
        assert spent == stated, technique
    assert record["stats"]["within_budget"]
