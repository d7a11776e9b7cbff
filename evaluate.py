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
import argparse
import json
import sys
from typing import Optional

import fid


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of evaluate.py."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--samples", type=str, required=True,
                        help="ADM-format .npz: arr_0 uint8 (N, H, W, 3) RGB, optional arr_1 labels")
    parser.add_argument("--features", type=str, choices=["digits", "inception"], default=None,
                        help="feature extractor (default: inception if --inception is given, else digits)")
    parser.add_argument("--ref_stats", type=str, default=None,
                        help="reference statistics .npz (mu, sigma); with --ref_npz/--dataset it is the cache path")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--ref_npz", type=str, default=None, help="ADM-format .npz of real images (arr_0)")
    source.add_argument("--dataset", type=str, choices=["digits"], default=None,
                        help="built-in reference dataset (default for --features digits)")
    parser.add_argument("--ref_split", type=str, choices=["all", "train", "test"], default="all",
                        help="which real digits form the reference (all = 1797 images)")
    parser.add_argument("--inception", type=str, default=None,
                        help="TorchScript FID Inception file (inception-2015-12-05.pt); never downloaded")
    parser.add_argument("--classifier", type=str, default=None,
                        help="safetensors cache of the digits classifier (trained and written if absent)")
    parser.add_argument("--classifier_seed", type=int, default=0)
    parser.add_argument("--setup", type=str, default=None,
                        help="JSON file with the sampling setup (checkpoint, EMA, sampler, steps, budget, cfg, VAE); "
                             "default: setup.json beside --samples (sample_ddp.py writes it)")
    parser.add_argument("--out", type=str, default="results/eval.jsonl",
                        help="JSON-lines file the record is appended to")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--device", type=str, default="cpu")
    return parser


def main(argv: Optional[list] = None) -> dict:
    """Parse flags, evaluate, print the metrics; returns the record."""
    args = build_parser().parse_args(argv)
    features = args.features or ("inception" if args.inception else "digits")
    record = fid.evaluate_samples(
        args.samples, features=features, ref_stats=args.ref_stats, ref_npz=args.ref_npz, dataset=args.dataset,
        ref_split=args.ref_split, inception=args.inception, classifier=args.classifier,
        classifier_seed=args.classifier_seed, setup=args.setup, out=args.out, batch_size=args.batch_size,
        device=args.device)
    print(json.dumps(record["metrics"], indent=2))
    print(f"note: {record['setup']['note']}")
    if args.out:
        print(f"record appended to {args.out}")
    return record


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
