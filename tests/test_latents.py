"""The latent storage format (latents.py) and extract_features.py: chunks, manifest, resumption, flags."""
import json

import numpy as np
import pytest
import torch

import extract_features
from config import UserError
from data import ImageFolderDataset, LatentDataset
from vae import encode_images, vae_downsampling


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


def test_extract_features_resumes_and_rebuilds(tmp_path, image_folder, vae_dir, run_extract):
    out = tmp_path / "feats"
    first = run_extract(out)  # posterior samples: seeded per chunk
    chunks = sorted(out.glob("chunk_*.npz"))
    assert [p.name for p in chunks] == ["chunk_000000.npz", "chunk_000001.npz", "chunk_000002.npz"]
    assert "latents_flip" not in np.load(chunks[0]).files and len(LatentDataset(out)) == 8
    before = {p.name: (p.stat().st_mtime_ns, dict(np.load(p))) for p in chunks}

    assert run_extract(out) == first  # nothing to do: chunks untouched
    assert {p.name: p.stat().st_mtime_ns for p in chunks} == {k: v[0] for k, v in before.items()}

    (out / "chunk_000001.npz").unlink()
    (out / "chunk_000002.npz").write_bytes(b"not a zip file")  # damaged: rebuilt like a missing chunk
    assert run_extract(out) == first
    assert (out / "chunk_000000.npz").stat().st_mtime_ns == before["chunk_000000.npz"][0]
    for name in ("chunk_000001.npz", "chunk_000002.npz"):
        rebuilt = dict(np.load(out / name))
        for key, value in before[name][1].items():
            np.testing.assert_array_equal(rebuilt[key], value)  # bit-identical, posterior draws included
    assert not list(out.glob(".*tmp"))

    with pytest.raises(ValueError, match="--features_path.*image_size"):
        extract_features.main(["--data_path", str(image_folder), "--features_path", str(out), "--vae", str(vae_dir),
                               "--image_size", "16", "--chunk_size", "3"])


@pytest.mark.parametrize("size", ["12", "24", "8"])
def test_extract_features_image_size_must_give_even_latents(tmp_path, image_folder, size, capsys):
    with pytest.raises(UserError, match=f"--image_size: must be a multiple of 16.*got {size}"):
        extract_features.main(["--data_path", str(image_folder), "--features_path", str(tmp_path / "f"),
                               "--image_size", size])
    assert not (tmp_path / "f").exists()
    with pytest.raises(SystemExit):
        extract_features.main(["--help"])
    assert "multiple of 16" in capsys.readouterr().out
