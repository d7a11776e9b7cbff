"""Train DiT or FPDM: `accelerate launch train.py [flags]` (or `python train.py` for one process).

`--config configs/digits.yaml` trains the small class-conditional FPDM of the README on scikit-learn's bundled
handwritten digits on CPU; with no flags at all it trains the DiT-Ti/2 baseline there with the dataclass defaults
(config.py). Flags given override the preset. The paper's ImageNet recipes are configs/imagenet256_*.yaml (after
extract_features.py). This script turns flags into configs; training.py's training_loop does the work.
"""
from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Sequence

import cli
from checkpoint import TRAINING_KEYS, load_checkpoint
from config import (ModelConfig, TrainConfig, UserError, build_config, config_diff, given_fields, load_preset,
                    model_config_from_dict, parse_flags)
from training import training_loop

# TrainConfig fields that may change when resuming: they set how long, how loudly and in which arithmetic a run goes,
# not what it learns.
RESUMABLE_CHANGES = {"max_steps", "epochs", "ckpt_every", "log_every", "log_with", "resume", "num_workers",
                     "sample_grid", "compile", "output_dir", "output_subdir", "config", "keep_last_ckpts",
                     "ckpt_milestones_every", "mixed_precision", "tf32"}


#################################################################################
#                           Configuration and resume                            #
#################################################################################

def parse_configs(argv: Sequence[str] | None
                  ) -> tuple[ModelConfig, TrainConfig, dict[str, Any] | None, set[str]]:
    """Parse flags over the --config preset; with --resume, fields not given come from the checkpoint and given
    ones must agree with it.

    Returns the validated configs, the resumed checkpoint (or None) and the names of the ModelConfig fields given
    (by flag or preset).
    """
    flags = parse_flags(__doc__.splitlines()[0], [TrainConfig, ModelConfig], argv)
    given = {**(load_preset(flags["config"], ModelConfig, TrainConfig) if flags.get("config") else {}), **flags}
    given_model, given_train = given_fields(ModelConfig, given), given_fields(TrainConfig, given)
    if not given_train.get("resume"):
        return (build_config(ModelConfig, given).validate(), build_config(TrainConfig, given).validate(), None,
                set(given_model))
    payload = load_checkpoint(given_train["resume"], flag="--resume", require=TRAINING_KEYS)
    saved_model = asdict(model_config_from_dict(payload["config"]["model"]))
    saved_train = payload["config"]["train"]
    if saved_train.get("max_steps") == 0:  # checkpoints of earlier versions wrote 0 for 'no cap'
        saved_train = {**saved_train, "max_steps": None}
    differences = config_diff({k: saved_model[k] for k in given_model}, given_model)
    differences += config_diff({k: saved_train.get(k) for k in given_train if k not in RESUMABLE_CHANGES},
                               {k: v for k, v in given_train.items() if k not in RESUMABLE_CHANGES})
    if differences:
        raise UserError("--resume: the checkpoint was trained with a different configuration "
                         "(checkpoint != flags):\n  " + "\n  ".join(differences))
    model_config = ModelConfig(**saved_model).validate()
    train_config = TrainConfig(**{**{f.name: saved_train.get(f.name, f.default) for f in fields(TrainConfig)},
                                  **given_train}).validate()
    return model_config, train_config, payload, set(given_model)


def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point: returns the run folder."""
    model_config, train_config, payload, given_model = parse_configs(argv)
    return training_loop(model_config, train_config, payload, given_model)


if __name__ == "__main__":
    cli.run(main)
