"""How ranks share the data, and which failure the launcher reports (no processes started)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from visiontune.dist import ShardedBatches, root_cause, shard
from visiontune.train import EpochSampler


@pytest.mark.parametrize(("n", "world", "per_rank"), [(24, 2, 4), (25, 2, 4), (7, 3, 2), (5, 4, 1)])
def test_every_global_batch_is_the_single_process_batch(n, world, per_rank):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist()
    shards = [shard(order, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal shares: ranks step together
    padded = order + order[: len(shards[0]) * world - n]  # DistributedSampler's padding
    batch = per_rank * world
    for k in range(0, len(shards[0]), per_rank):
        together = sorted(i for s in shards for i in s[k : k + per_rank])
        assert together == sorted(padded[k * world : k * world + batch])
    assert set().union(*map(set, shards)) == set(range(n))  # nothing left out


def test_sharded_epoch_sampler_resumes_inside_the_rank_share():
    full = [list(EpochSampler(24, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert not {i for i, _ in full[0]} & {i for i, _ in full[1]}
    one = list(EpochSampler(24, seed=3))
    assert sorted(full[0] + full[1]) == sorted(one)  # same samples, same per-sample seeds
    resumed = EpochSampler(24, seed=3, rank=1, world_size=2)
    resumed.set_epoch(0, start=8)
    assert list(resumed) == full[1][8:] and len(resumed) == 4


def test_evaluation_batches_are_dealt_round_robin():
    dealt = [list(ShardedBatches(10, 4, r, 2)) for r in range(2)]
    assert dealt == [[[0, 1, 2, 3], [8, 9]], [[4, 5, 6, 7]]]
    assert [ShardedBatches(10, 4, r, 2).num_samples for r in range(2)] == [6, 4]
    assert list(ShardedBatches(10, 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@dataclass
class Failure:  # the fields of torchrun's ProcessFailure that root_cause reads
    exitcode: int
    timestamp: int = 0
    message: str = ""
    error_file_data: dict = field(default_factory=dict)

    def signal_name(self) -> str:
        return {-9: "SIGKILL", -15: "SIGTERM"}[self.exitcode]


def test_launcher_reports_the_rank_at_fault_not_those_that_saw_it_fail():
    peer = Failure(1, message="rank 0 stopped because another rank failed (Connection reset)",
                   error_file_data={"visiontune": {"peer": True, "time": 1.0}})  # fmt: skip
    own = Failure(1, message="rank 1: [Errno 5] Input/output error: 'x.jpg'",
                  error_file_data={"visiontune": {"peer": False, "time": 2.0}})  # fmt: skip
    assert root_cause({0: peer, 1: own}) == own.message
    assert root_cause({0: peer, 1: Failure(-9)}) == "rank 1 was killed by SIGKILL"
    # torchrun SIGTERMs the ranks still running after one died: the dead rank is the cause.
    assert root_cause({0: Failure(-15), 1: Failure(-9)}) == "rank 1 was killed by SIGKILL"
    assert root_cause({0: peer}) == peer.message
