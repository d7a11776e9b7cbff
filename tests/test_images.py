"""Tests for images.py: uint8 conversion, PNG round trip, grids, and the .npz archive reader/writer."""
import numpy as np
import pytest
import torch

from images import (load_png_rgb, load_sample_npz, make_grid, read_npz, save_npz, save_png, save_sample_npz,
                    to_nchw_tensor, to_uint8)


def test_uint8_conversion_png_round_trip_and_grid(tmp_path):
    images = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 1, 1, 5).expand(2, 3, 4, 5)  # (2, 3, 4, 5)
    pixels = to_uint8(images)
    assert pixels.shape == (2, 4, 5, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255]  # [-1, 1] -> 0..255, clamped outside
    assert torch.equal(to_nchw_tensor(pixels), torch.from_numpy(pixels).permute(0, 3, 1, 2))
    save_png(pixels[0], tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_png_rgb(tmp_path / "rgb.png"), pixels[0])
    save_png(pixels[0, ..., :1], tmp_path / "gray.png")        # grayscale comes back as RGB
    np.testing.assert_array_equal(load_png_rgb(tmp_path / "gray.png"), pixels[0, ..., :1].repeat(3, axis=-1))
    grid = make_grid(np.repeat(pixels, 3, axis=0), nrow=3, padding=1, min_cell=8)  # 6 images of 4x5 -> scale 2
    assert grid.shape == (2 * (8 + 1) + 1, 3 * (10 + 1) + 1, 3)
    assert not list(tmp_path.glob(".*tmp"))


def test_save_npz_writes_one_archive_atomically(tmp_path):
    path = tmp_path / "sub" / "arrays.npz"
    save_npz(path, a=np.arange(3), text=np.str_("hello"))
    arrays = read_npz(path, "--x")
    assert arrays["a"].tolist() == [0, 1, 2] and str(arrays["text"]) == "hello"
    assert sorted(p.name for p in path.parent.iterdir()) == ["arrays.npz"]  # no .npz.npz, no temp file left
    images = np.zeros((2, 4, 4, 3), np.uint8)
    save_sample_npz(tmp_path / "samples.npz", images, np.array([3, 1], dtype=np.int32))
    loaded, labels = load_sample_npz(str(tmp_path / "samples.npz"))
    assert loaded.shape == (2, 4, 4, 3) and labels.dtype == np.int64 and labels.tolist() == [3, 1]
    save_sample_npz(tmp_path / "unlabelled.npz", images)
    assert load_sample_npz(str(tmp_path / "unlabelled.npz"))[1] is None
    (tmp_path / "garbage.npz").write_bytes(b"nope")
    with pytest.raises(ValueError, match="--x.*garbage"):
        read_npz(tmp_path / "garbage.npz", "--x")


def test_load_sample_npz_formats_and_errors(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "ok.npz", images, np.arange(5))
    loaded, labels = load_sample_npz(str(tmp_path / "ok.npz"))
    np.testing.assert_array_equal(loaded, images)
    np.testing.assert_array_equal(labels, np.arange(5))
    np.savez(tmp_path / "gray.npz", images[..., :1])
    assert load_sample_npz(str(tmp_path / "gray.npz"))[0].shape == (5, 8, 8, 3)
    assert load_sample_npz(str(tmp_path / "gray.npz"))[1] is None

    with pytest.raises(FileNotFoundError, match="--samples.*nope.npz"):
        load_sample_npz(str(tmp_path / "nope.npz"))
    bad_cases = {
        "float.npz": ({"arr_0": images.astype(np.float32)}, "uint8"),
        "nchw.npz": ({"arr_0": images.transpose(0, 3, 1, 2)}, "N, H, W, 3"),
        "nokey.npz": ({"images": images}, "arr_0"),
        "labels.npz": ({"arr_0": images, "arr_1": np.arange(4)}, "arr_1"),
    }
    for name, (arrays, message) in bad_cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=message):
            load_sample_npz(str(tmp_path / name))
    (tmp_path / "truncated.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="truncated.npz"):
        load_sample_npz(str(tmp_path / "truncated.npz"))


def test_pack_shards_fills_the_archive_once_per_index(tmp_path):
    from images import pack_shards, read_shard, read_shard_indices, save_shard
    gray = np.arange(5 * 2 * 2, dtype=np.uint8).reshape(5, 2, 2, 1)       # images 0..4, one channel
    labels = np.array([7, 1, 4, 4, 0])
    save_shard(tmp_path / "a.npz", [3, 0, 9], np.concatenate([gray[[3, 0]], gray[:1]]), np.array([4, 7, 2]))
    save_shard(tmp_path / "b.npz", [1, 4, 2], gray[[1, 4, 2]], labels[[1, 4, 2]])
    assert read_shard_indices(tmp_path / "a.npz", "--x").tolist() == [3, 0, 9]
    assert read_shard(tmp_path / "b.npz", "--x")["labels"].tolist() == [1, 0, 4]
    shape = pack_shards(tmp_path / "out.npz", [tmp_path / "a.npz", tmp_path / "b.npz"], 5, labels)
    images, packed_labels = load_sample_npz(str(tmp_path / "out.npz"))
    assert shape == (5, 2, 2, 3) and np.array_equal(images, gray.repeat(3, axis=-1))  # index 9 >= 5: unused
    assert packed_labels.tolist() == labels.tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "out.npz"]  # the memmap is gone
    with pytest.raises(ValueError, match=r"3 images missing from the shards \(first \[1, 2, 4\]\)"):
        pack_shards(tmp_path / "c.npz", [tmp_path / "a.npz"], 5, labels)
    with pytest.raises(ValueError, match=r"indices \[0, 3\] occur in more than one shard"):
        pack_shards(tmp_path / "c.npz", [tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "a.npz"], 5, labels)
    with pytest.raises(ValueError, match="other class labels"):
        pack_shards(tmp_path / "c.npz", [tmp_path / "a.npz", tmp_path / "b.npz"], 5, labels[::-1])
    assert not (tmp_path / "c.npz").exists() and not list(tmp_path.glob(".*"))
