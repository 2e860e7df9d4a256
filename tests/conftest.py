"""Shared fixtures: tiny random-weight LLaVA-family models built from configs in code, and a real S3 server."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.s3_server import S3Server, start_s3_server, stop_s3_server
from tests.tiny_models import BUILDERS

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """One SeaweedFS S3 server per test session, on free loopback ports, with a pre-created bucket."""
    server, proc = start_s3_server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        stop_s3_server(proc)


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
