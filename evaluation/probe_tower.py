"""What the demo model's vision tower encodes about each object: linear probes on its patch features.

For every object of some generated images, the layer -2 features (the ones the projector reads) of
the 3x3 patches around the object's centre are concatenated. A logistic-regression probe is fit on
70% of the objects and scored on the rest, for the object's shape and for its colour, per size.
A probe near chance means the language model cannot read that attribute from the tower, however
it is trained. This is how the demo model's weak `yesno` and `relation` answers were traced to the
tower: colour is decodable, shape is not (BENCHMARKS.md, demo model section).

    python jobs/probe_tower.py --model models/shapes-llava
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from operators.loading import load_vlm
from operators.vision import encode_with_cls_attention
from synthetic.world import COLOURS, SHAPES, iter_items
from training.train_demo import pixel_tensor


def object_features(model, processor, items) -> tuple[np.ndarray, list[dict]]:
    """[objects, 9 * C] features of the 3x3 patch neighbourhood of each object's centre, and the objects."""
    patch = model.config.vision_config.patch_size
    with torch.no_grad():
        pixels = pixel_tensor(np.stack([it.frames[0] for it in items]), processor.image_processor)
        features = encode_with_cls_attention(model.model.vision_tower, pixels, -2).features[:, 1:]  # [N, P, C]
    side = int(features.shape[1] ** 0.5)
    grid = features.reshape(len(items), side, side, -1)
    rows, objects = [], []
    for n, item in enumerate(items):
        for obj in item.scene["objects"]:
            x0, y0, x1, y1 = obj["boxes"][0]
            r, c = int((y0 + y1) / 2 // patch), int((x0 + x1) / 2 // patch)
            near = [
                grid[n, min(max(r + dr, 0), side - 1), min(max(c + dc, 0), side - 1)]
                for dr in (-1, 0, 1)
                for dc in (-1, 0, 1)
            ]
            rows.append(torch.cat(near).numpy())
            objects.append(obj)
    return np.stack(rows), objects


def probe_accuracy(x: np.ndarray, y: np.ndarray, train: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Fit an L2-regularised logistic regression on the ``train`` rows; True where a held-out row is right."""
    x = torch.tensor(x, dtype=torch.float32)
    mean, std = x[train].mean(0), x[train].std(0) + 1e-5
    x = (x - mean) / std
    target = torch.tensor(y)
    probe = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=300)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x[train]), target[train]) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (probe(x[~train]).argmax(1) == target[~train]).numpy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/shapes-llava"))
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=99, help="seed of the probed (generated) images")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, processor = load_vlm(args.model)
    x, objects = object_features(model, processor, list(iter_items(args.seed, args.images, "image")))
    train = np.arange(len(objects)) < int(0.7 * len(objects))
    sizes = np.array([o["size"] for o in objects])[~train]
    report = {"model": str(args.model), "objects": len(objects), "chance": {"shape": 1 / len(SHAPES)}}
    for attribute, labels in (("shape", SHAPES), ("colour", list(COLOURS))):
        right = probe_accuracy(x, np.array([labels.index(o[attribute]) for o in objects]), train)
        report[attribute] = {size: round(float(right[sizes == size].mean()), 3) for size in ("small", "large")}
        report[attribute]["all"] = round(float(right.mean()), 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
