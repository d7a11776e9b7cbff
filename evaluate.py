"""
Evaluate a sample archive from sample_ddp.py: FID (digits-FID or Inception FID) and classifier accuracy.

Examples:
    # digits-FID against all 1797 real digits, classifier trained now (seed 0) or read from a cache
    python evaluate.py --samples samples/fpdm-digits.npz --classifier results/digits_classifier.safetensors \\
        --setup samples/fpdm-digits.json --out results/eval.jsonl
    # Inception FID with the TorchScript FID Inception and an ADM reference batch (statistics are read from it)
    python evaluate.py --samples samples/fpdm-XL-2.npz --features inception \\
        --inception weights/inception-2015-12-05.pt --ref_stats VIRTUAL_imagenet256_labeled.npz

All logic lives in fid.py; this script only parses flags. Every run appends one JSON line (metrics + full setup +
warnings) to --out.
"""
import json
from typing import Optional, Sequence

import cli
import fid
from config import EvaluateConfig, build_config, make_parser


def build_parser():
    """Command-line flags of evaluate.py (one per EvaluateConfig field)."""
    return make_parser(__doc__, EvaluateConfig)


def parse_args(argv: Optional[Sequence[str]] = None) -> EvaluateConfig:
    """The validated EvaluateConfig of `argv`."""
    return build_config(EvaluateConfig, vars(build_parser().parse_args(argv))).validate()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse flags, evaluate, print the metrics; returns the record."""
    args = parse_args(argv)
    features = args.features or ("inception" if args.inception else "digits")
    record = fid.evaluate_samples(
        args.samples, features=features, ref_stats=args.ref_stats or None, ref_npz=args.ref_npz or None,
        dataset=args.dataset or None, ref_split=args.ref_split, inception=args.inception or None,
        classifier=args.classifier or None, classifier_seed=args.classifier_seed, setup=args.setup or None,
        out=args.out, batch_size=args.batch_size, device=args.device)
    print(json.dumps(record["metrics"], indent=2))
    print(f"note: {record['setup']['note']}")
    if args.out:
        print(f"record appended to {args.out}")
    return record


if __name__ == "__main__":
    cli.run(main)
