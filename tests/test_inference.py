"""cryopick.inference loading and cryopick.device helpers: read-ahead order, failures, batching by shape,
channels-last and autocast (dense scoring itself is tested against patch scoring in test_pick.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryopick.device import autocast_factory, channels_last
from cryopick.errors import CryopickError, InputFileError
from cryopick.inference import LoadedMicrograph, LoadFailure, MapGeometry, iter_batches, iter_loaded


def fake_load(plan: int) -> LoadedMicrograph:
    if plan == 2:
        raise InputFileError("mic2.mrc", "truncated: 10 of 400 bytes")
    if plan == 4:
        raise CryopickError("too small")
    shape = (8, 8) if plan < 5 else (8, 12)
    return LoadedMicrograph(plan, torch.zeros(shape), (2.0, 2.0), (16, 2 * shape[1]), 1.0, True)


@pytest.mark.parametrize("workers", [0, 3])
def test_loading_keeps_order_and_turns_bad_files_into_failures(workers):
    loaded = list(iter_loaded(list(range(7)), fake_load, workers, lookahead=2))
    assert [item.plan for item in loaded] == list(range(7))
    failures = {item.plan: item.reason for item in loaded if isinstance(item, LoadFailure)}
    assert failures == {2: "truncated: 10 of 400 bytes", 4: "too small"}


def test_batches_hold_one_shape_and_at_most_batch_size_and_failures_pass_at_once():
    batches = list(iter_batches(iter_loaded(list(range(8)), fake_load, 0, 1), batch_size=2))
    shown = [b.plan if isinstance(b, LoadFailure) else [m.plan for m in b] for b in batches]
    assert shown == [2, [0, 1], 4, [3], [5, 6], [7]]


def test_map_geometry_round_trip_and_binned_centres():
    geometry = MapGeometry(output_stride=8, pad=64, scales=(1.5, 2.0))
    x, y = geometry.to_original([8, 9.5], [10, 12.25])
    assert x.tolist() == [(10 * 8 - 64) * 2.0, (12.25 * 8 - 64) * 2.0]
    assert y.tolist() == [(8 * 8 - 64) * 1.5, (9.5 * 8 - 64) * 1.5]
    rows, cols = geometry.to_map(x, y)
    np.testing.assert_allclose(rows, [8, 9.5])
    np.testing.assert_allclose(cols, [10, 12.25])
    assert [a.tolist() for a in geometry.to_binned(np.array([8]), np.array([10]))] == [[0], [16]]


def test_channels_last_only_when_enabled():
    batch = torch.zeros(2, 1, 6, 5)
    assert channels_last(batch, False) is batch
    assert channels_last(batch, True).is_contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(1, 4, 3)
    assert channels_last(conv, True).weight.is_contiguous(memory_format=torch.channels_last)


def test_autocast_off_keeps_float32():
    with autocast_factory(False)():
        out = torch.nn.Linear(3, 2)(torch.ones(1, 3))
    assert out.dtype == torch.float32


def test_a_gpu_index_beyond_the_machine_is_refused(monkeypatch):
    from cryopick.device import resolve_device
    from cryopick.errors import CryopickError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0") and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(CryopickError, match=r"device cuda:7: this machine has 1 GPU\(s\), cuda:0 to cuda:0"):
        resolve_device("cuda:7")
