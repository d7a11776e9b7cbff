"""Sample images from an FPDM or DiT checkpoint on one process (CPU or GPU).

Writes one PNG per image, a grid PNG and setup.json (checkpoint, every flag, the compute plan and the
transformer-block forward passes actually spent) to --output_dir, and prints the blocks used. Examples:

    python sample.py                                             # the bundled digits FPDM
    python sample.py --ckpt results/000-DiT-Ti-2/checkpoints/latest.pt --budget 280 --fixed_point_iters 8
    python sample.py --ckpt ... --fixed_point_iters 12 --num_sampling_steps 40 --fixed_point_reuse_solution True
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import cli
import sampling
from config import ModelConfig, SampleConfig, build_config, given_fields, parse_flags
from images import make_grid, save_png
from records import SETUP_FILE, describe_plan, sampling_setup, summarize_stats, write_diagnostics, write_json
from vae import load_vae_for

DESCRIPTION = "Sample images from an FPDM or DiT checkpoint (architecture read from --ckpt)."


def parse_args(argv: Sequence[str] | None, config_cls: type = SampleConfig,
               description: str = DESCRIPTION) -> tuple[Any, dict[str, Any]]:
    """Parse flags: (validated sampling config, the model flags given, to be checked against the checkpoint)."""
    note = "Read from --ckpt; a flag given here must agree with the checkpoint (the defaults shown are train.py's)."
    given = parse_flags(description, [config_cls, ModelConfig], argv, notes={ModelConfig: note})
    return build_config(config_cls, given).validate(), given_fields(ModelConfig, given)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the recorded setup and statistics."""
    config, model_flags = parse_args(argv)
    device = sampling.resolve_device(config.device)

    # Everything that can fail does so before anything is written.
    model, model_config, ckpt = sampling.load_sampling_model(config.ckpt, device, config.use_ema, model_flags)
    config, plan, notes = sampling.prepare_sampling(model_config, config, model=model)
    class_labels = sampling.parse_class_labels(config.class_labels, model_config.num_classes)
    indices = list(range(config.num_samples))
    labels = sampling.image_labels(indices, config.seed, model_config.num_classes, class_labels, label_mode="cycle")
    vae = load_vae_for(model_config, config.vae, device)
    print(describe_plan(plan))
    for note in notes + plan.notes:
        print(f"note: {note}")

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    images, trajectories, counts = [], [], []
    for batch, pixels in sampling.sample_images(model, model_config, config, plan, indices, labels,
                                                seed=config.seed, batch_size=config.batch_size, device=device,
                                                vae=vae):
        for index, image in zip(batch.indices, pixels):
            save_png(image, output_dir / f"{index:06d}.png")
        images.append(pixels)
        trajectories.append(batch.stats)
        counts.append(len(batch.indices))
    seconds = time.time() - start
    save_png(make_grid(np.concatenate(images)), output_dir / "grid.png")

    stats = summarize_stats(plan, trajectories, counts)
    setup = sampling_setup(ckpt=ckpt, model_config=model_config, config=config, plan=plan, notes=notes,
                           labels=None if labels is None else labels.tolist(), device=str(device),
                           vae=config.vae if model_config.latent else None)
    record = {"setup": setup, "stats": {**stats, "seconds": seconds},
              "trajectories": [s.to_dict() for s in trajectories]}
    write_json(output_dir / SETUP_FILE, record)
    if config.diagnostics:
        plot = write_diagnostics(config.diagnostics, plan, trajectories, setup)
        print(f"diagnostics: {config.diagnostics}" + (f" (plot {plot})" if plot else ""))
    spent = f"{stats['blocks_per_image_max']}"
    if stats["blocks_per_image_min"] != stats["blocks_per_image_max"]:  # adaptive: batches stop at different points
        spent = f"{stats['blocks_per_image_mean']:.1f} on average, at most {stats['blocks_per_image_max']}"
    print(f"Total transformer-block forward passes per image: {spent} "
          f"(planned {plan.blocks_per_image}; {len(indices)} images in {seconds:.1f}s)")
    print(f"Saved {len(indices)} PNGs, grid.png and setup.json to {output_dir}")
    return record


if __name__ == "__main__":
    cli.run(main)
