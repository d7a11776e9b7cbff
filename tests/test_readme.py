"""The README's sampling table runs as written: every row's flags, against the shipped checkpoints, spend the
blocks per image the table states; RESULTS.md links every figure it names, and every figure the sweep wrote."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import sample

README = Path(__file__).resolve().parents[1] / "README.md"
RESULTS = README.parent / "RESULTS.md"


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


def test_results_links_every_figure_it_names_and_every_sweep_figure():
    text = RESULTS.read_text()
    links = re.findall(r"\]\(([^)\s]+\.png)\)", text)
    assert links, "RESULTS.md links no figure"
    for link in links:
        assert (RESULTS.parent / link).is_file(), f"RESULTS.md links a missing figure: {link}"
    linked = {Path(link).name for link in links}
    unlinked = re.sub(r"\[[^\]]*\]\([^)\s]+\.png\)", "", text)  # every mention of a figure is a link
    assert ".png" not in unlinked, [line for line in unlinked.splitlines() if ".png" in line]
    written = {p.name for p in (RESULTS.parent / "experiments" / "results").glob("sweep_*.png")}
    assert written <= linked, f"sweep figures RESULTS.md does not link: {sorted(written - linked)}"
