"""Streaming WebDataset shards: written by ``dinokit data shard``, split over 2 simulated
processes x 2 loader workers so that every sample is read exactly once per pass, resumed exactly."""

from __future__ import annotations

import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit.data.streaming as streaming_mod
from dinokit.cli import main
from dinokit.data.streaming import ShardStream, StreamLoader, list_shards

N_IMAGES = 24


def _labels(items):
    return [y for _, y in items]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 tiny PNGs, each in its own class folder (label = image number), in 8 shards of 3."""
    root = tmp_path_factory.mktemp("images")
    for i in range(N_IMAGES):
        (root / f"c{i:02d}").mkdir()
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(root / f"c{i:02d}" / "x.png")
    out = tmp_path_factory.mktemp("shards")
    assert main(["data", "shard", "--input", str(root), "--output", str(out), "--shard-size", "3"]) == 0
    return out


def test_shard_command_writes_webdataset_tars_and_an_index(shards, tmp_path):
    index = json.loads((shards / "index.json").read_text())
    assert index["total"] == N_IMAGES and [s["count"] for s in index["shards"]] == [3] * 8
    with tarfile.open(shards / index["shards"][0]["url"]) as tar:
        names = sorted(tar.getnames())
    assert len(names) == 6 and {n.rsplit(".", 1)[1] for n in names} == {"png", "cls"}
    assert len(list_shards(shards)) == 8
    assert list_shards(str(shards / "shard-{000000..000002}.tar"))[-1].endswith("shard-000002.tar")
    # a second write into the same folder is refused, naming it
    assert main(["data", "shard", "--input", str(shards), "--output", str(shards)]) == 2


def _loader(shards, rank, monkeypatch, *, workers=2, iterations=3, shuffle=4, batch=2):
    monkeypatch.setattr(streaming_mod, "_rank_world", lambda: (rank, 2))
    stream = ShardStream(shards, batch_size=batch, collate=_labels, seed=3, shuffle=shuffle)
    return StreamLoader(stream, iterations, num_workers=workers)


def test_two_ranks_times_two_workers_see_every_sample_once_per_pass(shards, monkeypatch):
    seen = Counter()
    for rank in range(2):
        dl = _loader(shards, rank, monkeypatch)
        for _ in range(2):  # 2 epochs of 3 batches of 2 = 12 samples = this rank's share of a pass
            for labels in dl:
                seen.update(labels)
        assert all((p, pos) == (0, 6) for p, pos in dl.positions.values())  # each slot: 2 shards
        assert sorted(dl.positions) == [2 * rank, 2 * rank + 1]
    assert sorted(seen) == list(range(N_IMAGES)) and set(seen.values()) == {1}


def test_resume_continues_the_stream_exactly(shards, monkeypatch):
    def run(dl, epochs):
        return [labels for _ in range(epochs) for labels in dl]

    full = run(_loader(shards, 1, monkeypatch, iterations=5), 3)
    dl = _loader(shards, 1, monkeypatch, iterations=5)
    first = run(dl, 1)
    part = []
    for labels in dl:  # stop mid-epoch after 2 batches: 7 consumed, the next comes from worker 1
        part.append(labels)
        if len(part) == 2:
            break
    state = json.loads(json.dumps(dl.state_dict()))  # checkpoints store plain types
    assert state["epoch"] == 1 and state["batches"] == 2 and state["consumed"] == 7
    resumed = _loader(shards, 1, monkeypatch, iterations=5)
    resumed.load_state_dict(state)
    rest = run(resumed, 2)
    assert first + part + rest == full
    assert len(rest) == 3 + 5 and resumed.epoch == 2


def test_too_few_shards_for_the_slots_is_one_clear_error(shards, monkeypatch):
    monkeypatch.setattr(streaming_mod, "_rank_world", lambda: (0, 2))
    dl = StreamLoader(ShardStream(list_shards(shards)[:1], batch_size=2, collate=_labels), 2)
    with pytest.raises(ValueError, match="1 shard.*2 process"):
        next(iter(dl))


def _pixels_and_masks(items):
    """Stands for multi-crop + mask collate: the crops and the masks are random draws."""
    return [(y, float(v)) for v, y in items], torch.rand(1)


def test_crops_follow_the_sample_and_masks_the_slot(shards, monkeypatch):
    """A sample's crops depend on (seed, pass, key) only; each slot draws its own masks."""
    def run(rank, workers):
        monkeypatch.setattr(streaming_mod, "_rank_world", lambda: (rank, 2))
        stream = ShardStream(shards, batch_size=3, transform=lambda im: torch.rand(()),
                             collate=_pixels_and_masks, seed=5, shuffle=2)
        dl = StreamLoader(stream, 1, num_workers=workers)
        return [b for _ in range(2) for b in dl]

    a, b = run(0, 2), run(1, 2)
    crops = {y: v for batch, _ in a + b for y, v in batch}
    again = {y: v for batch, _ in run(0, 1) + run(1, 1) for y, v in batch}  # other slots, same crops
    common = crops.keys() & again.keys()
    assert len(crops) == 12 and len(common) >= 3 and all(crops[y] == again[y] for y in common)
    masks = [m.item() for _, m in a + b]
    assert len(set(masks)) == len(masks)  # no two batches (slots, positions) share their masks
