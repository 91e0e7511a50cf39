"""The benchmark's world is the same whichever process builds it, and chunked sampling changes no sample.

A cold run with ``--jobs 2`` trains the metric classifier in a worker process while the main
process trains the source, and splits the source's adapters by style between them
(``run._world_job``); the cache must then hold the tensors a one-process run would have built.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.quality.evaluate import Sampler
from benchmarks.quality.model import Diffusion, TextEncoder, ToyLDM
from benchmarks.quality.run import (
    BenchConfig,
    _adapters,
    _build_bases,
    _classifier_state,
    _world_job,
    build_adapters,
)


@pytest.fixture
def threads() -> Iterator[None]:
    """``_world_job`` sets the worker's thread count; give the test process its own back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_sampler_chunks_give_the_same_samples() -> None:
    cfg = BenchConfig.quick_config()
    torch.manual_seed(0)
    model = ToyLDM(cfg.model).eval()
    text, diffusion = TextEncoder(cfg.model), Diffusion()
    whole = Sampler(text, diffusion, 2, 4, 3, 3.0, chunk=8)(model, model.state_dict())
    parts = Sampler(text, diffusion, 2, 4, 3, 3.0, chunk=3)(model, model.state_dict())
    assert whole.shape == (8, 3, 16, 16)
    torch.testing.assert_close(parts, whole, rtol=0.0, atol=1e-5)  # float rounding of other kernel sizes
    other = Sampler(text, diffusion, 2, 4, 3, 1.0, chunk=3)(model, model.state_dict())
    assert not torch.allclose(other, whole, atol=1e-3)  # the comparison can fail: guidance changes the samples


def test_world_jobs_build_what_one_process_builds(tmp_path: Path, threads: None) -> None:
    cfg = replace(BenchConfig.quick_config(), styles=("palette", "stripes"))
    text, diffusion = TextEncoder(cfg.model), Diffusion()
    serial, jobs = tmp_path / "serial", tmp_path / "jobs"
    torch.set_num_threads(cfg.threads)  # as run() does: the thread count changes float reductions
    # one process, in run()'s order with jobs=1: classifier, source, the source's adapters
    _classifier_state(cfg, serial)
    bases = _build_bases(replace(cfg, targets=()), text, diffusion, serial)
    build_adapters(cfg, bases, text, diffusion, serial, ("source",), lambda _: None)
    # jobs: the main process trains the source; each piece then starts from another global RNG state
    _build_bases(replace(cfg, targets=()), text, diffusion, jobs)
    for what in ("adapters:stripes", "classifier", "adapters:palette"):
        torch.manual_seed(12345)
        torch.rand(7)
        assert _world_job((cfg, jobs, what)) >= 0.0
    names = sorted(f.name for f in serial.glob("*.pt"))
    assert names == sorted(f.name for f in jobs.glob("*.pt"))
    assert "classifier.pt" in names
    assert sum(n.startswith("adapter_source_stripes_") for n in names) == len(_adapters(cfg))
    for name in names:
        a, b = torch.load(serial / name, weights_only=True), torch.load(jobs / name, weights_only=True)
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
