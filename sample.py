"""Sample images from an FPDM or DiT checkpoint on one process (CPU or GPU).

Writes one PNG per image, a grid PNG and setup.json (checkpoint, every flag, the compute plan and the
transformer-block forward passes and GMACs actually spent) to --output_dir, and prints the blocks used. A folder
holding another setup's images (or PNGs without a setup.json) is refused, so a folder never mixes runs; the same
setup overwrites its own files. Examples:

    python sample.py                                             # the bundled digits FPDM
    python sample.py --ckpt results/000-DiT-Ti-2/checkpoints/latest.pt --budget 280 --fixed_point_iters 8
    python sample.py --ckpt ... --fixed_point_iters 12 --num_sampling_steps 40 --fixed_point_reuse_solution True
    python sample.py --budget_gmacs 0.5 --fixed_point_iters 3   # a FLOP-matched plan
"""
from __future__ import annotations

from typing import Any, Sequence

import cli
import sampling
from config import ModelConfig, SampleConfig, UserError, build_config, given_fields, parse_flags
from sample_folders import PngFolder

DESCRIPTION = "Sample images from an FPDM or DiT checkpoint (architecture read from --ckpt)."


def parse_args(argv: Sequence[str] | None, config_cls: type = SampleConfig,
               description: str = DESCRIPTION) -> tuple[Any, dict[str, Any]]:
    """Parse flags: (validated sampling config, the model flags given, to be checked against the checkpoint)."""
    note = "Read from --ckpt; a flag given here must agree with the checkpoint (the defaults shown are train.py's)."
    given = parse_flags(description, [config_cls, ModelConfig], argv, notes={ModelConfig: note})
    return build_config(config_cls, given).validate(), given_fields(ModelConfig, given)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the recorded setup and statistics. Everything that can fail does so
    before anything is written."""
    config, model_flags = parse_args(argv)
    loaded = sampling.load(config, model_flags)
    request = sampling.plan_request(loaded, config)
    indices = list(range(request.config.num_samples))
    labels = request.labels(indices, loaded.model_config.num_classes, label_mode="cycle")
    folder = PngFolder.claim(loaded, request, labels)
    try:
        generated = sampling.draw(loaded, request, indices, labels, on_batch=folder.save)
    except sampling.NonFiniteError as error:
        raise UserError(f"--ckpt {str(loaded.ckpt)!r}: {error}; stopped before writing that batch") from None
    return folder.finish(generated, loaded, request)


if __name__ == "__main__":
    cli.run(main)
