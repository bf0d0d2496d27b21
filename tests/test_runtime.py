"""The training runtime: random-stream snapshots restore exactly; the loop state keeps its checkpoint keys."""

import math

import torch

from cryopick.runtime import is_main_process, load_rng_state_dict, rng_restore, rng_snapshot, rng_state_dict
from cryopick.train import TrainState


def _draws(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(3, generator=gen), torch.rand(3)


def test_rng_snapshot_and_state_dict_replay_the_same_draws():
    gen = torch.Generator().manual_seed(3)
    snapshot, stored = rng_snapshot(gen), rng_state_dict(gen)
    first = _draws(gen)
    rng_restore(gen, snapshot)
    assert all(torch.equal(a, b) for a, b in zip(first, _draws(gen)))
    load_rng_state_dict(gen, stored)
    assert all(torch.equal(a, b) for a, b in zip(first, _draws(gen)))


def test_train_state_round_trips_through_the_checkpoint_keys():
    state = TrainState(epoch=2, step_in_epoch=1, global_step=7, best=0.8, best_epoch=1, bad_epochs=1,
                       history=[{"epoch": 0}, {"epoch": 1}])
    loop = state.loop_dict()
    assert sorted(loop) == ["bad_epochs", "best", "best_epoch", "epoch", "global_step", "step_in_epoch"]
    assert TrainState.from_saved(loop, state.history) == state
    assert TrainState().best == -math.inf and TrainState().history == []


def test_main_process_is_rank_zero():
    assert is_main_process({}) and is_main_process({"RANK": "0"}) and not is_main_process({"RANK": "1"})
