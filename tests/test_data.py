"""Data readers (every layout, built small in tmp_path), augmentation and batching; one test reads the
real shared data (``ADDERQUANT_DATA``, via conftest's ``data_root``)."""

from __future__ import annotations

import hashlib
import json
import pathlib
import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from adderquant.data import (
    CIFAR_ADDERNET_NORM,
    CIFAR_APOT_NORM,
    IMAGENET_NORM,
    batches,
    calibration_subset,
    load_dataset,
    normalize,
    normalized_black,
    random_crop_flip,
)
from adderquant.data.augment import crop_flip, crop_flip_params
from adderquant.data.dataset import CIFAR10_CLASSES

RNG = np.random.default_rng(0)


def hwc(n: int, h: int = 32, w: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def assert_round_trip(ds, x_train, y_train, x_test, y_test):
    for got, want in ((ds.x_train, x_train), (ds.x_test, x_test)):
        assert got.dtype == torch.uint8 and got.is_contiguous()
        assert torch.equal(got, nchw(want))
    for got, want in ((ds.y_train, y_train), (ds.y_test, y_test)):
        assert got.dtype == torch.int64
        assert got.tolist() == list(want)


# --- npz shards with meta.json -------------------------------------------------------------------

def write_shards(root: pathlib.Path, k: int = 3):
    root.mkdir()
    xs, ys = [hwc(5) for _ in range(2)], [RNG.integers(0, k, 5) for _ in range(2)]
    xt, yt = hwc(4), RNG.integers(0, k, 4)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        np.savez_compressed(root / f"train-{i}.npz", x=x, y=y)
    np.savez_compressed(root / "test.npz", x=xt, y=yt)
    digest = {"train": hashlib.sha256(b"".join(x.tobytes() for x in xs)).hexdigest(),
              "test": hashlib.sha256(xt.tobytes()).hexdigest()}
    meta = {"name": "tiny", "classes": [f"c{i}" for i in range(k)], "train": ["train-0.npz", "train-1.npz"],
            "test": ["test.npz"], "sha256_pixels": digest}
    (root / "meta.json").write_text(json.dumps(meta))
    return np.concatenate(xs), np.concatenate(ys), xt, yt


def test_shard_dir_round_trips_and_verifies(tmp_path):
    arrays = write_shards(tmp_path / "tiny")
    ds = load_dataset(tmp_path / "tiny", verify=True)
    assert_round_trip(ds, *arrays)
    assert ds.name == "tiny" and ds.classes == ["c0", "c1", "c2"]
    assert str(tmp_path / "tiny") in ds.source and "shards" in ds.source


def test_shard_digest_mismatch_names_the_files(tmp_path):
    write_shards(tmp_path / "tiny")
    x = hwc(5)
    np.savez_compressed(tmp_path / "tiny" / "train-1.npz", x=x, y=np.zeros(5, np.int64))
    load_dataset(tmp_path / "tiny")  # not verified by default
    with pytest.raises(ValueError, match=r"train-1\.npz.*SHA-256"):
        load_dataset(tmp_path / "tiny", verify=True)


def test_shard_verify_without_digests_is_an_error(tmp_path):
    write_shards(tmp_path / "tiny")
    meta = json.loads((tmp_path / "tiny" / "meta.json").read_text())
    del meta["sha256_pixels"]
    (tmp_path / "tiny" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sha256_pixels"):
        load_dataset(tmp_path / "tiny", verify=True)


def test_bad_shard_names_the_file(tmp_path):
    write_shards(tmp_path / "tiny")
    np.savez_compressed(tmp_path / "tiny" / "test.npz", x=hwc(4).astype(np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"test\.npz.*uint8"):
        load_dataset(tmp_path / "tiny")


# --- CIFAR python pickles ------------------------------------------------------------------------

def planar(x: np.ndarray) -> np.ndarray:
    """HWC images -> the CIFAR pickle rows: R plane, G plane, B plane."""
    return x.transpose(0, 3, 1, 2).reshape(len(x), -1)


def dump(path: pathlib.Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def test_cifar10_pickles_round_trip_and_parent_dir(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    xs, ys = [hwc(3) for _ in range(5)], [RNG.integers(0, 10, 3) for _ in range(5)]
    for i, (x, y) in enumerate(zip(xs, ys, strict=True), 1):
        dump(root / f"data_batch_{i}", {b"batch_label": b"b", b"data": planar(x), b"labels": y.tolist()})
    xt, yt = hwc(4), RNG.integers(0, 10, 4)
    dump(root / "test_batch", {b"data": planar(xt), b"labels": yt.tolist()})
    dump(root / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES]})
    for path in (root, tmp_path):
        ds = load_dataset(path)
        assert_round_trip(ds, np.concatenate(xs), np.concatenate(ys), xt, yt)
        assert ds.name == "CIFAR-10" and ds.classes == CIFAR10_CLASSES
        assert "cifar-10-batches-py" in ds.source

    (root / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset(root)


def write_cifar100(root: pathlib.Path):
    root.mkdir()
    x, y, xt, yt = hwc(6), RNG.integers(0, 100, 6), hwc(3), RNG.integers(0, 100, 3)
    for name, (a, b) in {"train": (x, y), "test": (xt, yt)}.items():
        coarse = (b // 5).tolist()
        dump(root / name, {b"data": planar(a), b"fine_labels": b.tolist(), b"coarse_labels": coarse})
    dump(root / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                         b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    return x, y, xt, yt


def test_cifar100_pickles_round_trip_with_fine_labels(tmp_path):
    arrays = write_cifar100(tmp_path / "cifar-100-python")
    ds = load_dataset(tmp_path)
    assert_round_trip(ds, *arrays)
    assert ds.name == "CIFAR-100" and ds.classes == [f"f{i}" for i in range(100)]


def test_cifar_pickle_with_code_is_refused(tmp_path):
    write_cifar100(tmp_path / "c")
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    dump(tmp_path / "c" / "test", {b"data": Evil(), b"fine_labels": []})
    with pytest.raises(ValueError, match=r"test: not a CIFAR pickle.*refusing"):
        load_dataset(tmp_path / "c")
    assert not marker.exists()


def test_cifar_pickle_missing_key_names_file(tmp_path):
    write_cifar100(tmp_path / "c")
    dump(tmp_path / "c" / "train", {b"data": planar(hwc(2)), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"train: expected a dict with keys .*fine_labels"):
        load_dataset(tmp_path / "c")


# --- ImageFolder ---------------------------------------------------------------------------------

def write_png(path: pathlib.Path, x: np.ndarray, mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(x[..., 0] if mode == "L" else x, mode).save(path)


def test_image_folder_round_trips_sorted(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "pets"
    layout = {"train": {"dog": 2, "cat": 3}, "test": {"cat": 1, "dog": 2}}
    expected = {}
    for split, classes in layout.items():
        xs, ys = [], []
        for label, name in enumerate(["cat", "dog"]):
            for i in range(classes[name]):
                x = hwc(1, 6, 5)[0]
                if split == "test" and name == "dog" and i == 0:  # grey PNG: read back as R = G = B
                    x = np.repeat(x[..., :1], 3, axis=2)
                    write_png(root / split / name / f"{i:03d}.PNG", x, "L")
                else:
                    write_png(root / split / name / f"{i:03d}.png", x)
                xs.append(x)
                ys.append(label)
        expected[split] = (np.stack(xs), ys)
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    ds = load_dataset(root)
    assert_round_trip(ds, *expected["train"], *expected["test"])
    assert ds.classes == ["cat", "dog"] and ds.name == "pets" and "image folder" in ds.source


def test_image_folder_rejects_mixed_sizes_and_unknown_classes(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "f"
    write_png(root / "train" / "a" / "0.png", hwc(1, 8, 8)[0])
    write_png(root / "train" / "a" / "1.png", hwc(1, 8, 9)[0])
    write_png(root / "test" / "a" / "0.png", hwc(1, 8, 8)[0])
    with pytest.raises(ValueError, match=r"1\.png: image is 9x8"):
        load_dataset(root)
    (root / "train" / "a" / "1.png").unlink()
    write_png(root / "test" / "zebra" / "0.png", hwc(1, 8, 8)[0])
    with pytest.raises(ValueError, match="zebra"):
        load_dataset(root)


# --- single .npz ---------------------------------------------------------------------------------

def write_npz(path: pathlib.Path, k: int = 10, **override):
    arrays = {"x_train": hwc(7), "y_train": np.arange(7) % k, "x_test": hwc(3), "y_test": np.arange(k - 3, k)}
    arrays.update(override)
    np.savez(path, **{key: v for key, v in arrays.items() if v is not None})
    return arrays


@pytest.mark.parametrize(("k", "classes"), [(10, CIFAR10_CLASSES), (3, ["0", "1", "2"])])
def test_npz_round_trips_with_default_classes(tmp_path, k, classes):
    a = write_npz(tmp_path / "sub.npz", k)
    ds = load_dataset(tmp_path / "sub.npz")
    assert_round_trip(ds, a["x_train"], a["y_train"], a["x_test"], a["y_test"])
    assert ds.classes == classes and ds.name == "sub" and ds.source.endswith("[npz]")


def test_npz_class_names_are_read(tmp_path):
    write_npz(tmp_path / "s.npz", 3, classes=np.array(["x", "y", "z"]))
    assert load_dataset(tmp_path / "s.npz").classes == ["x", "y", "z"]


@pytest.mark.parametrize(("override", "problem"), [
    ({"y_test": None}, r"missing keys \['y_test'\]"),
    ({"x_train": hwc(7).astype(np.int16)}, "dtype int16, expected uint8"),
    ({"x_train": hwc(7).transpose(0, 3, 1, 2)}, r"shape \(7, 3, 32, 32\), expected \(N, H, W, 3\)"),
    ({"y_train": np.zeros(6, np.int64)}, "6 labels for 7 images"),
    ({"y_train": np.zeros(7, np.float32)}, "expected \\(N,\\) integers"),
    ({"x_test": hwc(3, 16, 16)}, "train images are .* but test images are"),
])
def test_bad_npz_names_file_and_problem(tmp_path, override, problem):
    write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(ValueError, match=rf"bad\.npz.*{problem}"):
        load_dataset(tmp_path / "bad.npz")


def test_labels_out_of_range_for_named_classes(tmp_path):
    write_npz(tmp_path / "s.npz", 3, classes=np.array(["x", "y"]))
    with pytest.raises(ValueError, match=r"labels span \[0, 2\], expected \[0, 2\)"):
        load_dataset(tmp_path / "s.npz")


# --- detection -----------------------------------------------------------------------------------

def test_directory_prefers_the_dataset_directory_over_npz(tmp_path):
    arrays = write_shards(tmp_path / "full")
    write_npz(tmp_path / "subset.npz")
    ds = load_dataset(tmp_path)
    assert_round_trip(ds, *arrays)
    assert "found in" in ds.source and "ignored subset.npz" in ds.source


def test_directory_with_one_npz_uses_it(tmp_path):
    write_npz(tmp_path / "only.npz")
    assert load_dataset(tmp_path).name == "only"


def test_ambiguous_and_unrecognised_directories(tmp_path):
    with pytest.raises(ValueError, match="no data set recognised"):
        load_dataset(tmp_path)
    write_npz(tmp_path / "a.npz")
    write_npz(tmp_path / "b.npz")
    with pytest.raises(ValueError, match=r"several data sets \(a\.npz, b\.npz\)"):
        load_dataset(tmp_path)
    write_shards(tmp_path / "one")
    write_cifar100(tmp_path / "two")
    with pytest.raises(ValueError, match=r"several data sets \(one, two\)"):
        load_dataset(tmp_path)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="must be a .npz"):
        load_dataset(tmp_path / "x.txt")


def test_path_from_env_or_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("ADDERQUANT_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="--data.*ADDERQUANT_DATA"):
        load_dataset()
    monkeypatch.setenv("ADDERQUANT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere.*from ADDERQUANT_DATA"):
        load_dataset()
    write_npz(tmp_path / "e.npz")
    monkeypatch.setenv("ADDERQUANT_DATA", str(tmp_path / "e.npz"))
    assert load_dataset().name == "e"


# --- augmentation and normalisation --------------------------------------------------------------

def brute_force(x: torch.Tensor, dy, dx, flips, padding: int) -> torch.Tensor:
    """One image at a time: zero-pad, slice, mirror."""
    h, w = x.shape[2:]
    out = []
    for img, i, j, f in zip(x, dy.tolist(), dx.tolist(), flips.tolist(), strict=True):
        crop = torch.nn.functional.pad(img, (padding,) * 4)[:, i:i + h, j:j + w]
        out.append(crop.flip(2) if f else crop)
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_flip_matches_brute_force(dtype):
    x = torch.from_numpy(RNG.integers(1, 256, (64, 3, 8, 10))).to(dtype)
    params = crop_flip_params(len(x), 4, generator=torch.Generator().manual_seed(3))
    out = random_crop_flip(x, 4, generator=torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(out, brute_force(x, *params, 4))
    dy, dx, flips = params
    assert {dy.min().item(), dy.max().item(), dx.min().item(), dx.max().item()} == {0, 8}
    assert 0 < flips.sum() < len(x)


def test_crop_flip_pixels_by_hand():
    x = torch.arange(1, 10).reshape(1, 1, 3, 3)  # 1 2 3 / 4 5 6 / 7 8 9
    zero, two = torch.tensor([0]), torch.tensor([2])
    assert crop_flip(x, zero, zero, torch.tensor([True]), 0).flatten().tolist() == [3, 2, 1, 6, 5, 4, 9, 8, 7]
    # padded by 1, window at (0, 2): the top row is padding, then columns 2..3 of the image and padding
    assert crop_flip(x, zero, two, torch.tensor([False]), 1).flatten().tolist() == [0, 0, 0, 2, 3, 0, 5, 6, 0]


def test_crop_of_normalised_images_padded_with_normalised_black_is_the_normalised_crop_of_the_raw_image():
    """``fill`` per channel: BN re-estimation crops normalised images; padded with the normalised value of
    black they equal what the training pipeline feeds (crop the raw uint8 image, then normalise)."""
    x = torch.from_numpy(RNG.integers(0, 256, (16, 3, 8, 8), dtype=np.uint8))
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    black = normalized_black(mean, std)
    assert torch.equal(black, normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), mean, std).flatten())
    params = crop_flip_params(len(x), 4, generator=torch.Generator().manual_seed(5))
    raw_then_normalised = normalize(crop_flip(x, *params, 4), mean, std)
    assert torch.equal(crop_flip(normalize(x, mean, std), *params, 4, fill=black), raw_then_normalised)
    zero_padded = crop_flip(normalize(x, mean, std), *params, 4)  # the old padding: the mean colour
    assert not torch.equal(zero_padded, raw_then_normalised)


def test_no_padding_no_flip_is_identity():
    x = torch.from_numpy(RNG.integers(0, 256, (5, 3, 4, 4), dtype=np.uint8))
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)


def test_random_crop_flip_default_generator_runs():
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    assert random_crop_flip(x).shape == x.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_crop_flip_on_cuda_matches_cpu():
    x = torch.from_numpy(RNG.integers(0, 256, (32, 3, 8, 8), dtype=np.uint8))
    params = crop_flip_params(len(x), 4, generator=torch.Generator().manual_seed(1))
    out = random_crop_flip(x.cuda(), 4, generator=torch.Generator().manual_seed(1))
    assert out.is_cuda and torch.equal(out.cpu(), brute_force(x, *params, 4))


@pytest.mark.parametrize("norm", [CIFAR_ADDERNET_NORM, CIFAR_APOT_NORM, IMAGENET_NORM])
def test_normalize_matches_float64(norm):
    x = torch.from_numpy(RNG.integers(0, 256, (4, 3, 5, 5), dtype=np.uint8))
    out = normalize(x, *norm)
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in norm)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), (x.double() / 255 - mean) / std, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        normalize(x.float(), *norm)


# --- batching ------------------------------------------------------------------------------------

def test_batches_cover_everything_reproducibly():
    x, y = torch.arange(10).repeat_interleave(3).reshape(10, 3), torch.arange(10)
    it = batches(x, y, 4, shuffle=True)
    assert len(it) == 3
    epoch1 = [(xb.clone(), yb.clone()) for xb, yb in it]
    epoch2 = [yb for _, yb in it]
    assert [len(yb) for _, yb in epoch1] == [4, 4, 2]
    assert sorted(torch.cat([yb for _, yb in epoch1]).tolist()) == list(range(10))
    assert all(torch.equal(xb[:, 0], yb) for xb, yb in epoch1)  # pairs stay together
    assert not torch.equal(torch.cat(epoch2), torch.cat([yb for _, yb in epoch1]))  # reshuffled per pass
    again = [yb for _, yb in batches(x, y, 4, shuffle=True)]
    assert torch.equal(torch.cat(again), torch.cat([yb for _, yb in epoch1]))  # fixed default seed


def test_batches_in_order_and_drop_last():
    x, y = torch.zeros(10, 1), torch.arange(10)
    assert [yb.tolist() for _, yb in batches(x, y, 4, shuffle=False)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    it = batches(x, y, 4, shuffle=False, drop_last=True, device="cpu")
    assert len(it) == 2 and len(list(it)) == 2
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        batches(x, y[:9], 4, shuffle=False)


def test_calibration_subset_is_fixed_by_seed(tmp_path):
    write_npz(tmp_path / "s.npz")
    ds = load_dataset(tmp_path / "s.npz")
    a, b, c = (calibration_subset(ds, 4, seed=s) for s in (0, 0, 1))
    assert a.dtype == torch.uint8 and a.shape == (4, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    train = {r.numpy().tobytes(): i for i, r in enumerate(ds.x_train)}
    assert len({train[r.numpy().tobytes()] for r in a}) == 4  # distinct training images
    with pytest.raises(ValueError, match="n=8"):
        calibration_subset(ds, 8)


# --- the real data -------------------------------------------------------------------------------

@pytest.mark.data
def test_real_shared_data(data_root, monkeypatch):
    if not (data_root / "cifar10").is_dir() or not (data_root / "cifar10-subset.npz").is_file():
        pytest.skip(f"{data_root} lacks cifar10/ or cifar10-subset.npz")
    monkeypatch.setenv("ADDERQUANT_DATA", str(data_root))
    full = load_dataset(verify=True)
    assert "cifar10 [npz shards]" in full.source and "ignored cifar10-subset.npz" in full.source
    assert (len(full.x_train), len(full.x_test)) == (50000, 10000)
    assert full.x_train.shape[1:] == (3, 32, 32) and full.classes == CIFAR10_CLASSES
    assert Counter(full.y_train.tolist()) == dict.fromkeys(range(10), 5000)
    assert Counter(full.y_test.tolist()) == dict.fromkeys(range(10), 1000)

    sub = load_dataset(data_root / "cifar10-subset.npz")
    assert (len(sub.x_train), len(sub.x_test)) == (5085, 1017)
    assert torch.bincount(sub.y_train).tolist() == [517, 524, 490, 493, 537, 475, 503, 516, 529, 501]
    assert torch.bincount(sub.y_test).tolist() == [105, 93, 100, 104, 92, 87, 114, 102, 110, 110]
    # the subset is the first 1017 images of each official batch
    idx = torch.cat([torch.arange(1017) + 10000 * k for k in range(5)])
    assert torch.equal(sub.x_train, full.x_train[idx]) and torch.equal(sub.y_train, full.y_train[idx])
    assert torch.equal(sub.x_test, full.x_test[:1017])


def test_calibration_tensor_reads_an_iterable_no_further_than_needed():
    from adderquant.data import calibration_tensor

    x = torch.arange(10.0).view(10, 1)
    read = []

    def loader():
        for i in range(0, 10, 4):
            read.append(i)
            yield x[i:i + 4], torch.zeros(len(x[i:i + 4]))

    assert torch.equal(calibration_tensor(loader(), 5), x[:5]) and read == [0, 4]
    assert torch.equal(calibration_tensor(loader()), x) and calibration_tensor(x, 3) is not None
    with pytest.raises(ValueError, match="no calibration images"):
        calibration_tensor(iter([]))
