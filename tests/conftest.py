"""Shared fixtures: tiny random-weight LLaVA-family models built from configs in code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from operators.tiny_models import BUILDERS
from tests.s3_server import s3_server  # noqa: F401  (session fixture: a real S3 server on 127.0.0.1)

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    """family -> (model, processor), built once per session."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = BUILDERS[family](seed=0)
        return cache[family]

    return get


def random_image(seed: int, height: int = 40, width: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def random_video(seed: int, frames: int = 4, height: int = 40, width: int = 56) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((frames, height, width, 3)) * 255).astype("uint8")


@pytest.fixture(scope="module")
def ray_local():
    """A fresh in-process Ray cluster for one test module (2 CPUs, like this machine)."""
    import ray

    # address="local": a fresh cluster, whatever Ray's record of an earlier `ray start` says
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()
