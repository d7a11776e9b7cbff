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

from pathlib import Path
from typing import Any, Sequence

import cli
import sampling
from config import ModelConfig, SampleConfig, UserError, build_config, given_fields, parse_flags
from images import make_grid, save_png
from records import (SETUP_FILE, describe_plan, refuse_other_setup, sampling_setup, to_jsonable, write_diagnostics,
                     write_json)
from vae import load_vae_for

DESCRIPTION = "Sample images from an FPDM or DiT checkpoint (architecture read from --ckpt)."

# Flags that change where the output goes or how the work is split, not the images (batch_size does change them
# under the adaptive schedule, whose stopping rule looks at the whole batch).
NOT_COMPARED = {"output_dir", "diagnostics", "device", "batch_size"}


def parse_args(argv: Sequence[str] | None, config_cls: type = SampleConfig,
               description: str = DESCRIPTION) -> tuple[Any, dict[str, Any]]:
    """Parse flags: (validated sampling config, the model flags given, to be checked against the checkpoint)."""
    note = "Read from --ckpt; a flag given here must agree with the checkpoint (the defaults shown are train.py's)."
    given = parse_flags(description, [config_cls, ModelConfig], argv, notes={ModelConfig: note})
    return build_config(config_cls, given).validate(), given_fields(ModelConfig, given)


def comparable_setup(setup: dict[str, Any]) -> dict[str, Any]:
    """The part of a recorded setup that decides the images (what two runs in one folder must share)."""
    setup = to_jsonable(setup)
    sample_config = dict(setup.get("sample_config", {}))
    ignored = NOT_COMPARED - ({"batch_size"} if sample_config.get("iteration_schedule") == "adaptive" else set())
    for name in ignored:
        sample_config.pop(name, None)
    return {**{k: v for k, v in setup.items() if k != "device"}, "sample_config": sample_config}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the recorded setup and statistics."""
    config, model_flags = parse_args(argv)
    device = sampling.resolve_device(config.device)

    # Everything that can fail does so before anything is written.
    model, model_config, ckpt = sampling.load_sampling_model(config.ckpt, device, config.use_ema, model_flags)
    sampling.check_finite_weights(model, ckpt)
    config, plan, notes = sampling.prepare_sampling(model_config, config, model=model, device=device)
    class_labels = sampling.parse_class_labels(config.class_labels, model_config.num_classes)
    indices = list(range(config.num_samples))
    labels = sampling.image_labels(indices, config.seed, model_config.num_classes, class_labels, label_mode="cycle")
    vae = load_vae_for(model_config, config.vae, device)
    output_dir = Path(config.output_dir)
    setup = sampling_setup(ckpt=ckpt, model_config=model_config, config=config, plan=plan, notes=notes,
                           labels=None if labels is None else labels.tolist(), device=str(device),
                           vae=config.vae if model_config.latent else None)
    refuse_other_setup(output_dir, setup, "--output_dir", sorted(output_dir.glob("*.png")), comparable_setup, "PNGs")
    cli.check_writable_folder(output_dir, "--output_dir")
    if config.diagnostics:
        cli.check_writable_folder(Path(config.diagnostics).parent, "--diagnostics")
    print(describe_plan(plan))
    for note in notes + plan.notes:
        print(f"note: {note}")

    def save(batch: sampling.SampleBatch, pixels: Any) -> None:
        if not (output_dir / SETUP_FILE).is_file():  # first batch: claim the folder before any PNG lands there
            output_dir.mkdir(parents=True, exist_ok=True)
            write_json(output_dir / SETUP_FILE, {"setup": setup})
        for index, image in zip(batch.indices, pixels):
            save_png(image, output_dir / f"{index:06d}.png")

    try:
        generated = sampling.generate(model, model_config, config, plan, indices, labels, seed=config.seed,
                                      batch_size=config.batch_size, device=device, vae=vae, on_batch=save)
    except sampling.NonFiniteError as error:
        raise UserError(f"--ckpt {str(ckpt)!r}: {error}; stopped before writing that batch") from None
    save_png(make_grid(generated.images), output_dir / "grid.png")

    stats = generated.summary(plan, model_config, config)
    record = {"setup": setup, "stats": stats, "trajectories": [s.to_dict() for s in generated.trajectories]}
    write_json(output_dir / SETUP_FILE, record)
    if config.diagnostics:
        plot = write_diagnostics(config.diagnostics, plan, generated.trajectories, setup)
        print(f"diagnostics: {config.diagnostics}" + (f" (plot {plot})" if plot else ""))
    spent = f"{stats['blocks_per_image_max']}"
    if stats["blocks_per_image_min"] != stats["blocks_per_image_max"]:  # adaptive: batches stop at different points
        spent = f"{stats['blocks_per_image_mean']:.1f} on average, at most {stats['blocks_per_image_max']}"
    print(f"Total transformer-block forward passes per image: {spent} (planned {plan.blocks_per_image}; "
          f"{stats['gmacs_per_image']:.4g} GMACs; {len(indices)} images in {generated.seconds:.1f}s)")
    print(f"Saved {len(indices)} PNGs, grid.png and setup.json to {output_dir}")
    return record


if __name__ == "__main__":
    cli.run(main)
