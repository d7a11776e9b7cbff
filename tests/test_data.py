"""Datasets (digits, latents, image folders), the latent storage format and extract_features.py."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import extract_features
from config import ModelConfig, TrainConfig
from data import (ImageFolderDataset, LatentDataset, center_crop_image, create_dataset, decode_latents,
                  encode_images, load_digits_tensors, load_vae, vae_downsampling)

CLASS_COLOURS = {"b_red": (255, 0, 0), "a_blue": (0, 0, 255)}  # created in this order, labelled by sorted name
IMAGES_PER_CLASS = {"b_red": 4, "a_blue": 4}  # class boundary inside chunk 1


#################################################################################
#                                   Fixtures                                    #
#################################################################################

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two classes of small images: left-to-right ramps of the class colour, a distinct peak per image."""
    root = tmp_path_factory.mktemp("images")
    for name, colour in CLASS_COLOURS.items():
        (root / name).mkdir()
        for k in range(IMAGES_PER_CLASS[name]):
            height, width = (32, 40) if k == 1 else (32, 32)  # one non-square image
            ramp = np.linspace(0.2, 1.0, width) * (k + 2) / (IMAGES_PER_CLASS[name] + 1)  # (W,), not symmetric
            pixels = np.broadcast_to(ramp[None, :, None] * np.array(colour), (height, width, 3))
            Image.fromarray(pixels.round().astype(np.uint8)).save(root / name / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised AutoencoderKL (4 levels: 8x downsampling) saved with save_pretrained."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
                        scaling_factor=0.5)  # not SD's 0.18215, so a hard-coded factor would be caught
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(vae_dir):
    """The tiny VAE loaded back through load_vae (from_pretrained)."""
    return load_vae(str(vae_dir), "cpu")


def run_extract(image_folder: Path, vae_dir: Path, out: Path, *extra: str) -> dict:
    """extract_features.py in-process (one process) on the test folder: chunks of 3 images, batches of 2."""
    return extract_features.main(["--data_path", str(image_folder), "--features_path", str(out), "--vae", str(vae_dir),
                                  "--image_size", "32", "--chunk_size", "3", "--batch_size", "2", *extra])


@pytest.fixture(scope="module")
def features(tmp_path_factory, image_folder, vae_dir) -> Path:
    """Latents of the test folder with flipped copies, using the posterior mean so they can be recomputed."""
    out = tmp_path_factory.mktemp("features") / "feats"
    run_extract(image_folder, vae_dir, out, "--flip", "True", "--sample_posterior", "False")
    return out


#################################################################################
#                                    Digits                                     #
#################################################################################

def test_digits_tensors():
    images, labels = load_digits_tensors()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert sorted(labels.unique().tolist()) == list(range(10))


def test_create_dataset_digits():
    dataset, resolved = create_dataset(TrainConfig(), ModelConfig())
    assert len(dataset) == 1797 and not dataset.is_sharded
    assert (resolved.in_channels, resolved.latent, resolved.image_size, resolved.num_classes) == (1, False, 8, 10)
    x, y = dataset[5]
    assert x.shape == (1, 8, 8) and y.dtype == torch.int64 and y.ndim == 0
    _, unconditional = create_dataset(TrainConfig(), ModelConfig(num_classes=0))
    assert unconditional.num_classes == 0


#################################################################################
#                          Feature extraction + reading                         #
#################################################################################

def test_extract_features_pairs_latents_with_labels(features, image_folder, vae, vae_dir):
    manifest = json.loads((features / "manifest.json").read_text())
    factor = vae_downsampling(json.loads((vae_dir / "config.json").read_text()))
    assert manifest["latent_shape"] == [4, 32 // factor, 32 // factor] == [4, 4, 4]
    assert manifest["class_names"] == ["a_blue", "b_red"] and manifest["num_classes"] == 2
    assert manifest["num_images"] == 8 and manifest["flip"] is True and manifest["scaling_factor"] == 0.5
    assert [(c["start"], c["end"]) for c in manifest["chunks"]] == [(0, 3), (3, 6), (6, 8)]

    images = ImageFolderDataset(image_folder, 32, random_flip=False)
    dataset = LatentDataset(features)
    assert len(dataset) == 16  # 8 latents, then their 8 flipped copies
    assert dataset.indices.tolist() == list(range(8))
    reference = torch.stack([images.load_image(i) for i in range(8)])              # (8, 3, 32, 32)
    expected = encode_images(vae, reference, sample_posterior=False)                # (8, 4, 4, 4)
    expected_flip = encode_images(vae, reference.flip(-1), sample_posterior=False)
    assert (expected[0] - expected[4]).abs().amax() > 1e-3          # classes, images and flips are
    assert (expected[0] - expected[1]).abs().amax() > 1e-3          # distinguishable, so a mix-up would show
    assert (expected[0] - expected_flip[0]).abs().amax() > 1e-3
    for i in range(8):
        index = int(dataset.indices[i])
        folder = images.samples[index][0].split("/")[0]
        latent, label = dataset[i]
        assert label.dtype == torch.int64 and int(label) == manifest["class_names"].index(folder)
        assert latent.shape == (4, 4, 4) and latent.dtype == torch.float32
        torch.testing.assert_close(latent, expected[index], atol=1e-5, rtol=1e-5)
        flipped, flipped_label = dataset[i + 8]
        torch.testing.assert_close(flipped, expected_flip[index], atol=1e-5, rtol=1e-5)
        assert int(flipped_label) == int(label)
    assert dataset.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    with np.load(features / "chunk_000001.npz") as chunk:  # the chunk keeps the pairs side by side
        assert chunk["indices"].tolist() == [3, 4, 5] and chunk["labels"].tolist() == [0, 1, 1]
        assert [p.split("/")[0] for p in chunk["paths"]] == ["a_blue", "b_red", "b_red"]


def test_extract_features_resumes_and_rebuilds(tmp_path, image_folder, vae_dir):
    out = tmp_path / "feats"
    first = run_extract(image_folder, vae_dir, out)  # posterior samples: seeded per chunk
    chunks = sorted(out.glob("chunk_*.npz"))
    assert [p.name for p in chunks] == ["chunk_000000.npz", "chunk_000001.npz", "chunk_000002.npz"]
    assert "latents_flip" not in np.load(chunks[0]).files and len(LatentDataset(out)) == 8
    before = {p.name: (p.stat().st_mtime_ns, dict(np.load(p))) for p in chunks}

    assert run_extract(image_folder, vae_dir, out) == first  # nothing to do: chunks untouched
    assert {p.name: p.stat().st_mtime_ns for p in chunks} == {k: v[0] for k, v in before.items()}

    (out / "chunk_000001.npz").unlink()
    (out / "chunk_000002.npz").write_bytes(b"not a zip file")  # damaged: rebuilt like a missing chunk
    assert run_extract(image_folder, vae_dir, out) == first
    assert (out / "chunk_000000.npz").stat().st_mtime_ns == before["chunk_000000.npz"][0]
    for name in ("chunk_000001.npz", "chunk_000002.npz"):
        rebuilt = dict(np.load(out / name))
        for key, value in before[name][1].items():
            np.testing.assert_array_equal(rebuilt[key], value)  # bit-identical, posterior draws included
    assert not list(out.glob(".*tmp"))

    with pytest.raises(ValueError, match="--features_path.*image_size"):
        extract_features.main(["--data_path", str(image_folder), "--features_path", str(out), "--vae", str(vae_dir),
                               "--image_size", "16", "--chunk_size", "3"])


def test_latent_dataset_sharding(features, tmp_path):
    shards = [LatentDataset(features, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 8  # 4 images each, plus flips
    assert shards[0].indices.tolist() == [0, 1, 2, 3] and shards[1].indices.tolist() == [4, 5, 6, 7]
    assert shards[0].chunk_files == ["chunk_000000.npz", "chunk_000001.npz"]
    assert shards[1].chunk_files == ["chunk_000001.npz", "chunk_000002.npz"]
    full = LatentDataset(features)
    for shard in shards:
        for i, index in enumerate(shard.indices.tolist()):
            assert torch.equal(shard[i][0], full[index][0]) and torch.equal(shard[i][1], full[index][1])

    thirds = [LatentDataset(features, rank, 3) for rank in range(3)]
    assert {len(s) for s in thirds} == {4}
    assert set.intersection(*(set(s.indices.tolist()) for s in thirds)) == set()
    with pytest.raises(ValueError, match="--feature_path.*fewer than the 9 processes"):
        LatentDataset(features, 0, 9)

    partial = tmp_path / "partial"
    shutil.copytree(features, partial)
    (partial / "chunk_000002.npz").unlink()
    assert LatentDataset(partial, 0, 2).indices.tolist() == [0, 1, 2, 3]  # rank 0 never opens chunk 2
    with pytest.raises(FileNotFoundError, match="--feature_path.*chunk_000002.npz"):
        LatentDataset(partial, 1, 2)


def test_latent_dataset_errors(tmp_path, features):
    with pytest.raises(FileNotFoundError, match="--feature_path.*does not exist"):
        LatentDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--feature_path.*manifest.json"):
        LatentDataset(tmp_path / "empty")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(features, unfinished)
    (unfinished / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="--feature_path.*did not finish"):
        LatentDataset(unfinished)
    no_chunks = tmp_path / "no_chunks"
    no_chunks.mkdir()
    manifest = json.loads((features / "manifest.json").read_text())
    (no_chunks / "manifest.json").write_text(json.dumps({**manifest, "chunks": [], "num_images": 0}))
    with pytest.raises(ValueError, match="--feature_path.*empty"):
        LatentDataset(no_chunks)
    with pytest.raises(ValueError, match="--feature_path"):
        create_dataset(TrainConfig(dataset="latents"), ModelConfig())


def test_create_dataset_latents(features):
    train = TrainConfig(dataset="latents", feature_path=str(features))
    dataset, resolved = create_dataset(train, ModelConfig())
    assert dataset.is_sharded and len(dataset) == 16
    assert (resolved.image_size, resolved.in_channels, resolved.latent, resolved.num_classes) == (32, 4, True, 2)
    assert resolved.input_size == 4
    assert create_dataset(train, ModelConfig(num_classes=0))[1].num_classes == 0
    with pytest.raises(ValueError, match="--image_size 64"):
        create_dataset(train, ModelConfig(image_size=64))
    with pytest.raises(ValueError, match="--num_classes 5"):
        create_dataset(train, ModelConfig(num_classes=5))
    with pytest.raises(ValueError, match="--num_classes 10"):  # explicitly given, even though it is the default
        create_dataset(train, ModelConfig(), explicit={"num_classes"})


def test_create_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="--dataset 'cifar'.*digits, latents, imagefolder"):
        create_dataset(TrainConfig(dataset="cifar"), ModelConfig())
    with pytest.raises(ValueError, match="--image_size must be 8, got 16"):
        create_dataset(TrainConfig(), ModelConfig(image_size=16))
    with pytest.raises(ValueError, match="--num_classes"):
        create_dataset(TrainConfig(), ModelConfig(num_classes=5))
    with pytest.raises(ValueError, match="--feature_path is set but --dataset is 'digits'"):
        create_dataset(TrainConfig(feature_path=str(tmp_path)), ModelConfig())
    with pytest.raises(ValueError, match="--data_path"):
        create_dataset(TrainConfig(dataset="imagefolder"), ModelConfig())
    with pytest.raises(FileNotFoundError, match="--data_path"):
        create_dataset(TrainConfig(dataset="imagefolder", data_path=str(tmp_path / "missing")), ModelConfig())
    (tmp_path / "no_images" / "cats").mkdir(parents=True)
    (tmp_path / "no_images" / "cats" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="--data_path.*no images"):
        create_dataset(TrainConfig(dataset="imagefolder", data_path=str(tmp_path / "no_images")), ModelConfig())


#################################################################################
#                           Image folders and the VAE                           #
#################################################################################

def test_image_folder_center_crop_and_labels(tmp_path):
    (tmp_path / "zebra").mkdir()
    (tmp_path / "apple").mkdir()
    wide = np.zeros((20, 48, 3), np.uint8)  # (H, W, 3): left half red, right half blue
    wide[:, :24, 0] = 255
    wide[:, 24:, 2] = 255
    Image.fromarray(wide).save(tmp_path / "apple" / "wide.png")
    Image.fromarray(np.full((30, 10, 3), (0, 255, 0), np.uint8)).save(tmp_path / "zebra" / "tall.png")

    dataset = ImageFolderDataset(tmp_path, 8, random_flip=True)
    assert dataset.classes == ["apple", "zebra"] and len(dataset) == 4
    image, label = dataset[0]
    assert image.shape == (3, 8, 8) and int(label) == 0 and image.min() >= -1 and image.max() <= 1
    assert image[0, :, 0].min() > 0.5 and image[2, :, 0].max() < -0.5   # left edge of the centre crop: red
    assert image[2, :, -1].min() > 0.5 and image[0, :, -1].max() < -0.5  # right edge: blue
    tall, tall_label = dataset[1]
    assert tall.shape == (3, 8, 8) and int(tall_label) == 1
    torch.testing.assert_close(tall[1], torch.ones(8, 8))
    mirrored, mirrored_label = dataset[2]
    assert torch.equal(mirrored, image.flip(-1)) and int(mirrored_label) == 0

    # A 64 px image of 8x8 blocks at size 8 is box-halved three times: exactly one pixel per block.
    blocks = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    pixels = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)
    cropped = center_crop_image(Image.fromarray(np.stack([pixels] * 3, -1)), 8)
    np.testing.assert_array_equal(cropped[..., 0], blocks)


def test_create_dataset_imagefolder(image_folder, vae_dir):
    train = TrainConfig(dataset="imagefolder", data_path=str(image_folder))
    dataset, resolved = create_dataset(train, ModelConfig(image_size=32))
    assert len(dataset) == 16 and not dataset.is_sharded
    assert (resolved.in_channels, resolved.latent, resolved.num_classes) == (3, False, 2)
    assert dataset[0][0].shape == (3, 32, 32)
    _, latent = create_dataset(TrainConfig(dataset="imagefolder", data_path=str(image_folder), vae=str(vae_dir)),
                               ModelConfig(image_size=32))
    assert (latent.in_channels, latent.latent, latent.input_size) == (4, True, 4)


def test_vae_round_trip_and_errors(vae, tmp_path):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = vae.encode(images).latent_dist.mode()
    torch.testing.assert_close(encode_images(vae, images, sample_posterior=False), mean * 0.5)
    first = encode_images(vae, images, torch.Generator().manual_seed(1))
    assert torch.equal(first, encode_images(vae, images, torch.Generator().manual_seed(1)))
    assert not torch.allclose(first, mean * 0.5)
    decoded = decode_latents(vae, first)
    assert decoded.shape == (2, 3, 32, 32) and decoded.min() >= -1 and decoded.max() <= 1
    with pytest.raises(FileNotFoundError, match="--vae"):
        load_vae(str(tmp_path / "missing_vae"))
    (tmp_path / "not_a_vae").mkdir()
    with pytest.raises(ValueError, match="--vae.*local folder"):
        load_vae(str(tmp_path / "not_a_vae"))


#################################################################################
#                          Training on these datasets                           #
#################################################################################

TINY_TRAIN = ["--model", "DiT-Ti/2", "--global_batch_size", "4", "--max_steps", "2", "--log_every", "1",
              "--fixed_point_no_grad_max_iters", "1", "--fixed_point_with_grad_max_iters", "1"]


def test_train_on_extracted_latents_decodes_its_grid_with_the_manifest_vae(features, tmp_path, monkeypatch):
    import sampling
    import train
    from checkpoint import load_checkpoint
    grid_vaes = []
    real_grid = sampling.sample_grid_png
    monkeypatch.setattr(sampling, "sample_grid_png",
                        lambda *args, **kwargs: grid_vaes.append(kwargs.get("vae")) or real_grid(*args, **kwargs))
    run = train.main([*TINY_TRAIN, "--dataset", "latents", "--feature_path", str(features),
                      "--output_dir", str(tmp_path)])
    saved = load_checkpoint(run)["config"]["model"]
    assert saved["latent"] and saved["in_channels"] == 4 and saved["image_size"] == 32 and saved["num_classes"] == 2
    assert len(grid_vaes) == 1 and grid_vaes[0] is not None  # decoded with the VAE named in the manifest
    assert (run / "samples.png").is_file() and "raw latents" not in (run / "log.txt").read_text()


def test_train_on_image_folder_through_the_vae(image_folder, vae_dir, tmp_path):
    import train
    from checkpoint import load_checkpoint
    run = train.main([*TINY_TRAIN, "--dataset", "imagefolder", "--data_path", str(image_folder), "--vae",
                      str(vae_dir), "--image_size", "32", "--sample_grid", "False", "--output_dir", str(tmp_path)])
    saved = load_checkpoint(run)["config"]["model"]
    assert saved["latent"] and saved["in_channels"] == 4 and saved["num_classes"] == 2
    pixel_run = train.main([*TINY_TRAIN, "--dataset", "imagefolder", "--data_path", str(image_folder),
                            "--image_size", "16", "--sample_grid", "False", "--output_dir", str(tmp_path)])
    assert load_checkpoint(pixel_run)["config"]["model"]["in_channels"] == 3
