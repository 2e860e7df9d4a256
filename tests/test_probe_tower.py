"""jobs/probe_tower.py: the linear probe separates what is linearly encoded and not what is not."""

import numpy as np

from evaluation.probe_tower import probe_accuracy


def test_probe_reads_an_encoded_attribute_and_not_a_random_one():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=800)
    x = rng.normal(size=(800, 32))
    x[:, :4] += 5.0 * np.eye(4)[labels]  # the label is written along four directions
    train = np.arange(800) < 560
    assert probe_accuracy(x, labels, train).mean() > 0.95
    unrelated = rng.integers(0, 4, size=800)  # a label the features know nothing about
    assert probe_accuracy(x, unrelated, train).mean() < 0.4
