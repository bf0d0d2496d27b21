"""EMA teacher: the update formula by hand, BatchNorm buffers, warm-up, wrappers and state round trip."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cryopick.ema import EMATeacher, unwrap_model
from cryopick.errors import CryopickError


def small_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))


def fill(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_teacher_is_a_frozen_eval_copy():
    student = small_net()
    ema = EMATeacher(student)
    assert ema.module is not student
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in student.parameters())  # the student is untouched
    fill(student, 5.0)
    assert all((p != 5.0).any() for p in ema.module.parameters())  # a copy, not shared storage


def test_update_follows_the_hand_formula():
    student = small_net()
    fill(student, 1.0)
    ema = EMATeacher(student, decay=0.9, warmup=False)
    fill(student, 3.0)
    ema.update(student)
    # t = 0.9·1 + 0.1·3 = 1.2
    for p in ema.module.parameters():
        assert torch.allclose(p, torch.full_like(p, 1.2))
    fill(student, -1.0)
    ema.update(student)
    # t = 0.9·1.2 + 0.1·(−1) = 0.98
    for p in ema.module.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.98))
    assert ema.num_updates == 2


def test_warmup_decay_schedule():
    student = small_net()
    fill(student, 0.0)
    ema = EMATeacher(student, decay=0.999, warmup=True)
    # n = 0: d = min(0.999, 1/10) = 0.1 -> t = 0.1·0 + 0.9·1 = 0.9
    assert ema.current_decay() == pytest.approx(0.1)
    fill(student, 1.0)
    ema.update(student)
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 0.9))
    # n = 1: d = 2/11 -> t = (2/11)·0.9 + (9/11)·2 = (1.8 + 18)/11 = 1.8
    fill(student, 2.0)
    ema.update(student)
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 1.8))
    # late in training the configured decay wins: (1 + n)/(10 + n) ≥ 0.999 from n = 8990
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.999


def test_batchnorm_buffers_average_and_counter_is_copied():
    torch.manual_seed(0)
    student = small_net()
    ema = EMATeacher(student, decay=0.75, warmup=False)
    teacher_mean = ema.module[1].running_mean.clone()
    teacher_var = ema.module[1].running_var.clone()
    student.train()
    for _ in range(3):
        student(torch.randn(8, 2) * 3 + 2)
    assert student[1].num_batches_tracked.item() == 3
    ema.update(student)
    bn_s, bn_t = student[1], ema.module[1]
    assert torch.allclose(bn_t.running_mean, 0.75 * teacher_mean + 0.25 * bn_s.running_mean)
    assert torch.allclose(bn_t.running_var, 0.75 * teacher_var + 0.25 * bn_s.running_var)
    assert bn_t.num_batches_tracked.item() == 3
    assert bn_t.num_batches_tracked.dtype == torch.long


def test_state_dict_round_trip():
    student = small_net()
    ema = EMATeacher(student, decay=0.5, warmup=False)
    fill(student, 2.0)
    ema.update(student)
    state = ema.state_dict()
    assert state["decay"] == 0.5 and state["num_updates"] == 1 and state["warmup"] is False
    fresh = EMATeacher(small_net(), decay=0.999)
    fresh.load_state_dict(state)
    assert fresh.decay == 0.5 and fresh.num_updates == 1 and fresh.warmup is False
    for a, b in zip(fresh.module.state_dict().values(), ema.module.state_dict().values()):
        assert torch.equal(a, b)
    # the teacher's own state dict loads into a plain model (what checkpoints store as ema_state)
    plain = small_net()
    plain.load_state_dict(ema.module.state_dict())


def test_load_state_dict_rejects_mismatch():
    ema = EMATeacher(small_net())
    with pytest.raises(CryopickError, match="lacks"):
        ema.load_state_dict({"module": {}})
    other = EMATeacher(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(CryopickError, match="do not match"):
        ema.load_state_dict(other.state_dict())


def test_update_rejects_a_different_model():
    ema = EMATeacher(small_net())
    with pytest.raises(ValueError):
        ema.update(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("decay", [-0.1, 1.5, float("nan")])
def test_rejects_bad_decay(decay):
    with pytest.raises(CryopickError, match="decay"):
        EMATeacher(small_net(), decay=decay)


def test_unwraps_data_parallel():
    student = small_net()
    wrapped = nn.DataParallel(student)
    assert unwrap_model(wrapped) is student
    ema = EMATeacher(wrapped, decay=0.0, warmup=False)
    assert isinstance(ema.module, nn.Sequential)
    fill(student, 4.0)
    ema.update(wrapped)  # decay 0: the teacher becomes the student
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 4.0))


def test_unwraps_distributed_data_parallel(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        student = small_net()
        ddp = nn.parallel.DistributedDataParallel(student)
        ema = EMATeacher(ddp, decay=0.5, warmup=False)
        assert list(ema.module.state_dict()) == list(student.state_dict())  # no "module." prefix
        fill(student, 1.0)
        ema.module.load_state_dict(student.state_dict())
        fill(student, 3.0)
        ema.update(ddp)
        assert torch.allclose(ema.module[0].bias, torch.full((2,), 2.0))  # 0.5·1 + 0.5·3
    finally:
        dist.destroy_process_group()


def test_unwraps_compiled_model_wrapper():
    # torch.compile returns an OptimizedModule holding the original in `_orig_mod`; building a real
    # one costs seconds of dynamo import, so a wrapper of the same shape stands in for it.
    class CompiledLike(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self._orig_mod = inner

    student = small_net()
    assert unwrap_model(nn.DataParallel(CompiledLike(student))) is student
    ema = EMATeacher(CompiledLike(student))
    assert list(ema.module.state_dict()) == list(student.state_dict())
