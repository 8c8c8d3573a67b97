"""orchestrator.data: labelled splits, captions and the fixed held-out split."""

import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from orchestrator.data import LabelledSplit, caption, held_out, labelled_splits, loader_worker_init

NAMES = ["cat", "dog", "eel"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def test_split_items_carry_image_label_and_text():
    images = torch.rand(3, 1, 4, 4)
    split = LabelledSplit(images, [2, 0, 1], ["x", "y", "z"])
    assert len(split) == 3 and split.labels == [2, 0, 1]
    item = split[1]
    assert item["label"] == 0 and item["text"] == "y" and torch.equal(item["image"], images[1])
    assert "text" not in LabelledSplit(images, [2, 0, 1])[0]


def test_split_refuses_mismatched_lengths():
    with pytest.raises(ValueError):
        LabelledSplit(torch.rand(3, 1, 4, 4), [0, 1])
    with pytest.raises(ValueError):
        LabelledSplit(torch.rand(2, 1, 4, 4), [0, 1], ["only one"])
    with pytest.raises(ValueError):
        LabelledSplit(torch.rand(2, 4, 4), [0, 1])


def test_caption_cycles_through_templates():
    assert caption(1, 0, NAMES, TEMPLATES) == "a photo of a dog."
    assert caption(1, 1, NAMES, TEMPLATES) == "a drawing of a dog."
    assert caption(2, 4, NAMES, TEMPLATES) == "a photo of a eel."


def test_held_out_takes_the_last_fraction_of_each_class():
    labels = [0] * 10 + [1] * 5 + [0, 1]  # 11 zeros, 6 ones
    train, test = held_out(labels, 0.2)
    assert test == [9, 15, 16]  # the last round(0.2 * 11) = 2 zeros and round(0.2 * 6) = 1 one
    assert sorted(train + test) == list(range(len(labels))) and not set(train) & set(test)


def test_held_out_keeps_one_sample_on_each_side():
    train, test = held_out([0, 0, 1, 1, 1], 0.01)
    assert test == [1, 4] and train == [0, 2, 3]
    train, test = held_out([0, 0], 0.99)
    assert train == [0] and test == [1]
    with pytest.raises(ValueError):
        held_out([0, 1], 1.0)


def test_labelled_splits_caption_by_global_index():
    images = torch.arange(6, dtype=torch.float32).reshape(6, 1, 1, 1)
    labels = [0, 1, 2, 0, 1, 2]
    train, test = labelled_splits(images, labels, NAMES, TEMPLATES, 0.5)
    assert test.labels == [0, 1, 2] and [float(test[i]["image"]) for i in range(3)] == [3.0, 4.0, 5.0]
    assert test.captions == ["a drawing of a cat.", "a photo of a dog.", "a drawing of a eel."]
    assert train.captions == ["a photo of a cat.", "a drawing of a dog.", "a photo of a eel."]


class _Slow(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.2)  # the worker is busy when the signal comes
        return torch.tensor(i)


def test_a_loader_worker_outlives_sigterm_to_every_process():
    """systemd and Slurm signal every process: the rank is saving its checkpoint, so its loader worker must not die
    under it (without the init, torch raises "DataLoader worker (pid N) is killed by signal: Terminated")."""
    loader = torch.utils.data.DataLoader(_Slow(), batch_size=1, num_workers=1, worker_init_fn=loader_worker_init)
    others = set(psutil.Process().children())  # what other tests left running here
    batches = iter(loader)
    got = [int(next(batches))]
    (worker,) = set(psutil.Process().children()) - others
    worker.send_signal(signal.SIGTERM)
    got += [int(b) for b in batches]
    assert got == list(range(6))


def test_a_loader_worker_dies_with_its_rank_at_once():
    """A rank stopped by SIGKILL (a cancel, a lost lease) takes its loader workers along, not after torch's 5 s."""
    script = (
        "import sys, time, torch\n"
        "from orchestrator.data import loader_worker_init\n"
        "loader = torch.utils.data.DataLoader(range(100), num_workers=1, worker_init_fn=loader_worker_init,\n"
        "                                     persistent_workers=True)\n"
        "next(iter(loader)); print('ready', flush=True); time.sleep(60)\n"
    )
    rank = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert rank.stdout.readline().strip() == "ready"
    (worker,) = psutil.Process(rank.pid).children()
    rank.kill()
    rank.wait()
    deadline = time.monotonic() + 1
    while not _dead(worker):
        assert time.monotonic() < deadline, "the loader worker outlived its rank"
        time.sleep(0.05)


def _dead(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # an orphan waits for init to reap it
    except psutil.NoSuchProcess:
        return True
