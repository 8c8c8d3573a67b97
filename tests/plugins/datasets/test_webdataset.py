"""The webdataset dataset: tar shards written by the webdataset library, indexed and read by seeking, held-out
split, labels from .cls members, one-line errors, and a real run through the engine with a label-aware sampler."""

from __future__ import annotations

import gc
import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from orchestrator.data import PackedStrings
from orchestrator.errors import UserError
from orchestrator.registry import Registry
from orchestrator.spec import resolve_component
from orchestrator.store import Store
from plugins.datasets.mnist import MNIST
from plugins.datasets.webdataset import WebDataset
from tests.conftest import orch


def png(image: torch.Tensor) -> bytes:
    out = io.BytesIO()
    Image.fromarray((image[0] * 255).round().byte().numpy(), mode="L").save(out, format="PNG")
    return out.getvalue()


def write_shards(folder: Path, shards: int = 3, per_shard: int = 20) -> tuple[str, list[dict]]:
    """Real MNIST digits (every 50th: the shipped order is by class) in ``shards`` tar files written by
    webdataset's TarWriter; the brace pattern and the samples in shard order."""
    folder.mkdir(parents=True, exist_ok=True)
    split = MNIST().train
    samples = []
    for s in range(shards):
        with wds.TarWriter(str(folder / f"shard-{s:03d}.tar")) as sink:
            for j in range(per_shard):
                i = (s * per_shard + j) * 50
                item = split[i]
                sink.write({"__key__": f"{i:06d}", "png": png(item["image"]), "txt": item["text"],
                            "cls": str(item["label"])})
                samples.append(item)
    return str(folder / f"shard-{{000..{shards - 1:03d}}}.tar"), samples


def queue_options(**raw: str) -> dict:
    return resolve_component(Registry.load().get("dataset", "webdataset"), raw, "data")["options"]


def test_shards_are_indexed_in_order_and_read_back_exactly(tmp_path: Path) -> None:
    pattern, samples = write_shards(tmp_path / "shards")
    data = WebDataset(pattern, label_ext="cls", test_fraction=0.1, image_size=28)
    assert (len(data.train), len(data.test)) == (54, 6)  # the last 10% of the samples, in shard order
    assert [*data.train.captions, *data.test.captions] == [s["text"] for s in samples]
    assert data.train.labels + data.test.labels == [s["label"] for s in samples]
    assert data.class_names == sorted({str(s["label"]) for s in samples}, key=int)
    for i in (0, 19, 20, 53):  # first and last of a shard, the next shard
        item = data.train[i]
        expected = (samples[i]["image"][0] * 255).round() / 255
        assert item["text"] == samples[i]["text"] and item["label"] == samples[i]["label"]
        assert item["image"].shape == (3, 28, 28)
        assert torch.allclose(item["image"][0], expected, atol=1e-6) and torch.equal(item["image"][0], item["image"][2])
    assert torch.allclose(data.test[5]["image"][1], (samples[59]["image"][0] * 255).round() / 255, atol=1e-6)


def test_unlabelled_shards_give_image_text_pairs(tmp_path: Path) -> None:
    pattern, _ = write_shards(tmp_path / "shards", shards=1)
    data = WebDataset(pattern, image_size=16)
    assert data.train.labels is None and not hasattr(data, "class_names")
    assert set(data.train[0]) == {"image", "text"} and data.train[0]["image"].shape == (3, 16, 16)


def test_queue_time_check_finds_missing_shards_in_one_line(tmp_path: Path) -> None:
    pattern, _ = write_shards(tmp_path / "shards", shards=2)
    options = queue_options(shards=pattern)
    assert options["shards"] == pattern
    with pytest.raises(UserError) as exc:
        queue_options(shards=str(tmp_path / "shards" / "shard-{000..003}.tar"))
    message = str(exc.value)
    assert "\n" not in message and "shard-002.tar and 1 more does not exist" in message


def test_a_sample_without_a_caption_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    with wds.TarWriter(str(folder / "bad.tar")) as sink:
        sink.write({"__key__": "a", "png": png(torch.zeros(1, 4, 4)), "txt": "ok"})
        sink.write({"__key__": "b", "png": png(torch.zeros(1, 4, 4)), "json": "{}"})
    with pytest.raises(UserError) as exc:
        WebDataset(str(folder / "bad.tar"))
    assert str(exc.value) == (f"webdataset: sample b in {folder / 'bad.tar'} has no txt member (it has json, png): "
                              f"fix the shard or set caption_ext=/label_ext= to the extensions it uses")


def test_an_unreadable_image_is_named_when_read(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    with wds.TarWriter(str(folder / "bad.tar")) as sink:
        sink.write({"__key__": "good", "png": png(torch.ones(1, 4, 4)), "txt": "fine"})
        sink.write({"__key__": "broken", "jpg": b"not a jpeg", "txt": "broken"})
    data = WebDataset(str(folder / "bad.tar"), test_fraction=0.5)
    assert data.train[0]["text"] == "fine"
    with pytest.raises(UserError) as exc:
        data.test[0]
    assert str(exc.value).startswith(f"webdataset: cannot read image broken in {folder / 'bad.tar'} (")


def test_a_file_that_is_not_a_tar_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError) as exc:
        WebDataset(str(tmp_path / "x.tar"))
    assert str(exc.value).startswith(f"webdataset: cannot read shard {tmp_path / 'x.tar'} (")


@pytest.mark.slow
def test_orch_run_trains_from_shards_on_two_ranks_with_class_balanced_batches(workdir: Path) -> None:
    """The sampler decides the batches, so shards are split across ranks by sample, never duplicated."""
    pattern, _ = write_shards(workdir / "shards", shards=2, per_shard=40)
    result = orch("run", "--data", f"webdataset:shards={pattern},label_ext=cls,image_size=28,test_fraction=0.2",
                  "--encoder", "vit", "--loss", "infonce", "--sampler", "class-balanced:m=2", "--eval", "retrieval",
                  "--steps", "3", "--batch-size", "8", "--gpus", "2", "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = Store.open(f"sqlite:///{workdir}/experiments.db").final_metrics(1)
    assert np.isfinite(metrics["train/loss"]) and 0.0 <= metrics["retrieval/i2t_r1"] <= 100.0


def test_a_shard_is_indexed_once_then_read_from_the_cache_until_it_changes(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / "cache"))
    pattern, _ = write_shards(tmp_path / "shards", shards=2, per_shard=5)
    first = WebDataset(pattern, label_ext="cls", test_fraction=0.1)
    cached = sorted((tmp_path / "cache" / "webdataset").glob("*.npz"))
    assert len(cached) == 2  # one index per shard
    again = WebDataset(pattern, label_ext="cls", test_fraction=0.1)
    assert again.train.captions == first.train.captions and again.train.labels == first.train.labels
    assert again.train.keys == first.train.keys and again.train.shards == first.train.shards
    for name in ("shard_ids", "offsets", "sizes"):
        assert np.array_equal(getattr(again.train, name), getattr(first.train, name))
    assert torch.equal(again.train[7]["image"], first.train[7]["image"])

    with np.load(cached[0]) as entry:  # what a later build reads is the cache, not the shard:
        arrays = dict(entry)
    shard = 0 if bytes(arrays["keys_data"][:6]) == b"000000" else 1  # keys: the MNIST index; shard 1 starts at 250
    captions = PackedStrings.from_buffers(arrays["captions_data"], arrays["captions_bounds"])
    data, bounds = PackedStrings(["read from the cache", *captions[1:]]).buffers()
    np.savez(cached[0], **{**arrays, "captions_data": np.frombuffer(data, np.uint8), "captions_bounds": bounds})
    assert WebDataset(pattern, label_ext="cls", test_fraction=0.1).train.captions[shard * 5] == "read from the cache"
    cached[0].write_bytes(b"not an index")  # an unreadable entry is indexed again
    assert WebDataset(pattern, label_ext="cls", test_fraction=0.1).train.captions == first.train.captions

    with wds.TarWriter(str(tmp_path / "shards" / f"shard-{shard:03d}.tar")) as sink:  # the shard is rewritten
        sink.write({"__key__": "new", "png": png(torch.zeros(1, 4, 4)), "txt": "a new sample", "cls": "3"})
    rebuilt = WebDataset(pattern, label_ext="cls", test_fraction=0.1)
    assert [*rebuilt.train.captions, *rebuilt.test.captions][shard * 5] == "a new sample"
    assert len(rebuilt.train) + len(rebuilt.test) == 6
    # other extensions are another index of the same shard
    WebDataset(pattern, test_fraction=0.1)
    assert len(list((tmp_path / "cache" / "webdataset").glob("*.npz"))) == 5


def test_ranks_start_indexing_at_different_shards_and_agree_on_the_order(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pattern, samples = write_shards(tmp_path / "shards", shards=3, per_shard=4)
    monkeypatch.setenv("WORLD_SIZE", "3")
    builds = []
    for rank in (0, 1, 2):
        monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / f"cache-{rank}"))  # each indexes every shard itself
        monkeypatch.setenv("RANK", str(rank))
        data = WebDataset(pattern, label_ext="cls", test_fraction=0.25)
        builds.append(([*data.train.captions, *data.test.captions],
                       [data.train.shards[i].name for i in data.train.shard_ids]))
    assert all(build == builds[0] for build in builds)
    assert builds[0][0] == [s["text"] for s in samples]

    with wds.TarWriter(str(tmp_path / "shards" / "shard-000.tar")) as sink:  # shard 0 now fails its indexing:
        sink.write({"__key__": "a", "png": png(torch.zeros(1, 4, 4)), "cls": "1"})
    indexed_first = []  # so the shards a rank indexed before it are the ones it started with
    for rank in (0, 1, 2):
        cache = tmp_path / f"cache-bad-{rank}"
        monkeypatch.setenv("ORCH_CACHE_DIR", str(cache))
        monkeypatch.setenv("RANK", str(rank))
        with pytest.raises(UserError, match="has no txt member"):
            WebDataset(pattern, label_ext="cls")
        indexed_first.append(len(list((cache / "webdataset").glob("*.npz"))))
    assert indexed_first == [0, 1, 2]  # rank r starts at shard r, then walks back to shard 0


def test_a_cache_folder_that_cannot_be_written_means_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    pattern, samples = write_shards(tmp_path / "shards", shards=1, per_shard=4)
    data = WebDataset(pattern, test_fraction=0.25)
    assert [*data.train.captions, *data.test.captions] == [s["text"] for s in samples]


def test_the_index_holds_arrays_not_an_object_per_sample(tmp_path: Path) -> None:
    folder, n = tmp_path / "shards", 8000
    folder.mkdir()
    for s in range(2):
        with wds.TarWriter(str(folder / f"{s}.tar")) as sink:
            for i in range(s * n // 2, (s + 1) * n // 2):
                sink.write({"__key__": f"{i:06d}", "jpg": b"tiny", "txt": f"a photo of item {i} on a table."})
    for _ in range(2):  # indexed and cached, then read from the cache once (its first read imports codecs)
        WebDataset(f"{folder}/{{0..1}}.tar")
    gc.collect()
    tracemalloc.start()
    data = WebDataset(f"{folder}/{{0..1}}.tar")
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    text = sum(len(k) + len(c) for split in (data.train, data.test) for k, c in zip(split.keys, split.captions))
    # a shard number, offset, size, and where the key and the caption end: 36 bytes over the text
    assert held < text + 36 * n + 50_000, f"{(held - text) / n:.0f} bytes a sample over the key and caption"
    assert data.train.captions[17] == "a photo of item 17 on a table." and data.test.keys[-1] == f"{n - 1:06d}"
