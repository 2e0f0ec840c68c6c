"""Both runners are reachable by name through the `retrieval.updaters` entry points, and drive the same stages."""

from __future__ import annotations

from retrieval.index import load_updater


def test_the_local_and_ray_runners_are_registered() -> None:
    from retrieval.indexer.runners import ray as ray_runner
    from retrieval.indexer.updater import update

    assert load_updater("local") is update
    assert load_updater("ray") is ray_runner.update  # importing the runner does not import Ray


def test_the_ray_runner_cuts_one_shard_per_model_batch() -> None:
    from retrieval.indexer.runners.ray import shard_count

    assert [shard_count(n) for n in (0, 1, 7)] == [1, 1, 7]
