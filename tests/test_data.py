"""orchestrator.data: labelled splits, captions, the fixed held-out split, loader workers and packed strings."""

import gc
import os
import pickle
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from unittest import mock

import psutil
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.data import (
    LabelledSplit,
    PackedStrings,
    caption,
    held_out,
    in_rank_order,
    labelled_splits,
    loader_workers,
)

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


def test_ranks_take_their_share_first_then_walk_back_through_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    orders = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        orders.append(in_rank_order(range(8)))
    assert orders == [[0, 1, 7, 6, 5, 4, 3, 2], [2, 3, 4, 1, 0, 7, 6, 5], [5, 6, 7, 4, 3, 2, 1, 0]]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert in_rank_order("abc") == ["a", "b", "c"]  # outside a run: one rank, in order


def test_across_machines_the_ranks_of_each_machine_split_the_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_SIZE", "2")  # DeepSpeed's multi-node launcher: 2 machines of 2 ranks
    orders = []
    for rank in range(4):
        monkeypatch.setenv("RANK", str(rank))
        orders.append(in_rank_order(range(8)))
    # blocks [0-3] and [4-7]; machine 0's ranks own the first half of each, machine 1's the second
    assert orders == [[0, 1, 3, 2, 7, 6, 5, 4], [4, 5, 7, 6, 3, 2, 1, 0],
                      [2, 3, 1, 0, 7, 6, 5, 4], [6, 7, 5, 4, 3, 2, 1, 0]]


def test_machines_of_unequal_size_order_as_one_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostfile with 4 slots on one machine and 2 on another: the 2-rank machine alone would pass for one of
    3 machines of 2, and own a share that a rank of the first machine owns too."""
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("CROSS_SIZE", "2")  # DeepSpeed's launcher: the number of machines
    orders = []
    for rank in range(6):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_SIZE", "4" if rank < 4 else "2")
        orders.append(in_rank_order(range(12)))
    monkeypatch.delenv("CROSS_SIZE")
    monkeypatch.delenv("LOCAL_SIZE")
    as_one = []
    for rank in range(6):
        monkeypatch.setenv("RANK", str(rank))
        as_one.append(in_rank_order(range(12)))
    assert orders == as_one
    assert [order[:2] for order in orders] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]


def _computed(orders: list[list[int]], cache_of: list[int]) -> tuple[list[int], int]:
    """Ranks working through their orders in lockstep, one item a tick each, skipping what their cache holds
    (``cache_of[rank]``: which folder); what a tick computes is cached at its end, so two ranks on one item at
    once both compute it. How many items each cache folder had computed, and the ticks it took."""
    caches: dict[int, set[int]] = {c: set() for c in cache_of}
    computed = dict.fromkeys(cache_of, 0)
    todo, ticks = [list(order) for order in orders], 0
    while True:
        doing = []
        for rank, order in enumerate(todo):
            while order and order[0] in caches[cache_of[rank]]:
                order.pop(0)
            if order:
                doing.append((cache_of[rank], order.pop(0)))
        if not doing:
            return [computed[c] for c in sorted(computed)], ticks
        ticks += 1
        for cache, item in doing:
            computed[cache] += 1
            caches[cache].add(item)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 300))
def test_ranks_share_the_work_whether_machines_share_a_cache_or_not(machines: int, local: int, n: int) -> None:
    """With a folder for each machine, its ranks cover the whole list between them, nearly without overlap; with
    one for all, the whole run computes each item nearly once. Each meeting of two ranks costs at most one item."""
    world = machines * local
    orders = []
    for rank in range(world):
        with mock.patch.dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(local)):
            orders.append(in_rank_order(list(range(n))))
    per_machine, ticks = _computed(orders, [rank // local for rank in range(world)])
    assert all(n <= done <= n + local for done in per_machine)
    assert ticks <= -(-n // local) + 1
    (shared,), ticks = _computed(orders, [0] * world)
    assert n <= shared <= n + world
    assert ticks <= -(-n // world) + 1


@given(st.integers(0, 50), st.integers(1, 9))
def test_rank_shares_cover_every_item_once(n: int, world: int) -> None:
    heads = []
    for rank in range(world):
        with mock.patch.dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world)):
            order = in_rank_order(list(range(n)))
        assert sorted(order) == list(range(n))
        heads.append(order[:n * (rank + 1) // world - n * rank // world])
    assert [i for head in heads for i in head] == list(range(n))


def test_a_loader_worker_outlives_sigterm_to_every_process():
    """systemd and Slurm signal every process: the rank is saving its checkpoint, so its loader worker must not die
    under it (without the init, torch raises "DataLoader worker (pid N) is killed by signal: Terminated")."""
    loader = torch.utils.data.DataLoader(_Slow(), batch_size=1, **loader_workers(1))
    others = set(psutil.Process().children())  # what other tests left running here
    batches = iter(loader)
    got = [int(next(batches))]
    (worker,) = set(psutil.Process().children()) - others
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # from a process other than the rank
    got += [int(b) for b in batches]
    assert got == list(range(6))


def test_a_rank_that_exits_with_its_loader_alive_takes_the_workers_along():
    """A rank leaving with its loader still referenced (a crash's traceback holds it; a script's global): Python's
    exit stops the workers with SIGTERM and waits for them, which hung for ever when they ignored it."""
    script = (
        "import torch\n"
        "from orchestrator.data import loader_workers\n"
        "loader = torch.utils.data.DataLoader(range(8), persistent_workers=True, **loader_workers(2))\n"
        "print(sum(int(b) for b in loader), flush=True)\n"
    )
    rank = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert rank.returncode == 0 and rank.stdout.strip() == "28", rank.stderr


@pytest.mark.parametrize("default", ["fork", "forkserver", "spawn"])
def test_loader_workers_are_forks_of_their_rank_whatever_the_default_start_method(default: str):
    """Python 3.14 makes forkserver the default on Linux (spawn is macOS's): workers started so are sent the dataset
    pickled (a run's collate function holds the model, whose DeepSpeed hooks do not pickle) and have the fork server
    for parent, so that the rank's exit, which stops them with SIGTERM, waited for them for ever."""
    script = (
        "import multiprocessing, os, threading, torch\n"
        f"multiprocessing.set_start_method({default!r})\n"
        "from orchestrator.data import loader_workers\n"
        "class Parents(torch.utils.data.Dataset):\n"
        "    def __init__(self): self.lock = threading.Lock()  # does not pickle\n"
        "    def __len__(self): return 8\n"
        "    def __getitem__(self, i): return os.getppid()\n"
        "loader = torch.utils.data.DataLoader(Parents(), batch_size=2, persistent_workers=True, **loader_workers(2))\n"
        "print({int(p) for b in loader for p in b} == {os.getpid()}, flush=True)\n"  # exits with the loader alive
    )
    rank = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert rank.returncode == 0 and rank.stdout.strip() == "True", rank.stderr[-2000:]


def test_a_loader_worker_dies_with_its_rank_at_once():
    """A rank stopped by SIGKILL (a cancel, a lost lease) takes its loader workers along, not after torch's 5 s."""
    script = (
        "import sys, time, torch\n"
        "from orchestrator.data import loader_workers\n"
        "loader = torch.utils.data.DataLoader(range(100), persistent_workers=True, **loader_workers(1))\n"
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


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=6), max_size=8), st.integers(-10, 10), st.integers(-10, 10),
       st.sampled_from([None, 1, 2, -1]), st.integers(-10, 10))
def test_packed_strings_behave_as_the_list(strings: list[str], start: int, stop: int, step: int | None,
                                           i: int) -> None:
    packed = PackedStrings(strings)
    assert len(packed) == len(strings) and list(packed) == strings and packed == strings
    if -len(strings) <= i < len(strings):
        assert packed[i] == strings[i]
    else:
        with pytest.raises(IndexError):
            packed[i]
    part = packed[start:stop:step]
    assert list(part) == strings[start:stop:step] and len(part) == len(strings[start:stop:step])
    assert list(pickle.loads(pickle.dumps(part))) == strings[start:stop:step]
    assert list(PackedStrings.concat([part, packed])) == strings[start:stop:step] + strings
    assert list(PackedStrings.from_buffers(*part.buffers())) == strings[start:stop:step]


def test_a_packed_slice_shares_the_buffer_but_pickles_only_its_own_bytes() -> None:
    packed = PackedStrings(f"caption number {i}" for i in range(10_000))
    part = packed[5000:5002]
    assert part.buffers()[0] == b"caption number 5000caption number 5001"
    assert len(pickle.dumps(part)) < 1000 < len(pickle.dumps(packed))
    with pytest.raises(ValueError, match="bounds must rise"):
        PackedStrings.from_buffers(b"abc", [0, 2, 1, 3])


def test_packed_strings_cost_their_bytes_and_eight_more() -> None:
    captions = [f"a photo of item {i} on a table, with a few more words." for i in range(100_000)]
    text_bytes = sum(len(c.encode()) for c in captions)
    gc.collect()
    tracemalloc.start()
    packed = PackedStrings(captions)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert held < text_bytes + 8 * len(captions) + 10_000
    assert list(packed[-2:]) == captions[-2:]


def _private_dirty_bytes() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Private_Dirty in smaps_rollup")


def _copied_by_reading_in_a_fork(strings: list[str] | PackedStrings) -> int:
    """Bytes a forked child (as a DataLoader worker is) copies from its parent by reading every string once."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = _private_dirty_bytes()
        for i in range(len(strings)):
            strings[i]
        os.write(write, str(_private_dirty_bytes() - before).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    os.close(write)
    with os.fdopen(read) as f:
        return int(f.read())


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads Linux's /proc/self/smaps_rollup")
def test_a_forked_loader_worker_reads_packed_strings_without_copying_them() -> None:
    captions = [f"a photo of item {i} on a table, with a few more words." for i in range(100_000)]
    packed = PackedStrings(captions)
    listed = _copied_by_reading_in_a_fork(captions)  # each str's reference count is written: its page is copied
    assert listed > 4_000_000, f"the measurement should see the list's pages copied ({listed} bytes)"
    assert _copied_by_reading_in_a_fork(packed) < 500_000
