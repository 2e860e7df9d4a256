"""jobs/eval_quality.py on the committed demo model and twig: TTP rows, their budgets, and --merge."""

import json
from pathlib import Path

import pytest

from evaluation.quality import evaluate, main
from operators.budgets import layer_mean
from operators.loading import load_vlm
from operators.twig import load_twig
from synthetic.world import iter_items

MODEL = Path(__file__).resolve().parent.parent / "models" / "shapes-llava"
SMALL = ["--model", str(MODEL), "--seed", "31337", "--images", "2", "--videos", "1", "--batch-size", "16"]
PATCHES = 64  # the demo model's visual tokens per frame


def by_method(rows: list[dict], method: str) -> list[dict]:
    return [r for r in rows if r["method"] == method]


def check_ttp_rows(rows: list[dict]) -> None:
    ttp = by_method(rows, "ttp")
    at_r = [r for r in ttp if r["basis"] == "R"]
    assert [(r["fraction"], r["budget_per_frame"]) for r in at_r] == [("1/3", 21), ("2/9", 14), ("1/9", 7)]
    for r in ttp:
        K, K_f = r["twig_K"], r["finalwipe_layer"]
        assert (K, K_f) == (1, 3)  # the demo twig's K; 3/4 of the 4 layers
        assert r["kept_per_frame"] == r["budget_per_frame"]  # R survives layer K, per frame
        assert r["layer_mean_per_frame"] < PATCHES
        assert r["layer_mean_per_frame"] == pytest.approx(layer_mean(4, K, K_f, PATCHES, r["budget_per_frame"]))
    # R-bar-matched: only 1/3 is reachable (layer 1 keeps all 64 tokens, so R-bar >= 16.5).
    at_mean = [r for r in ttp if r["basis"] == "R̄"]
    assert [(r["fraction"], r["budget_per_frame"], r["layer_mean_per_frame"]) for r in at_mean] == [("1/3", 10, 21.0)]


def test_evaluate_ttp_rows_and_skip_without_a_twig(capsys):
    model, processor = load_vlm(MODEL)
    twig = load_twig(MODEL / "twig", model)
    items = list(iter_items(31337, 1, "video"))
    rows = evaluate(model, processor, items, 4, 16, methods=("ttp",), twig=twig, blank=False)
    assert [r["method"] for r in rows] == ["none"] + ["ttp"] * 4
    assert rows[0]["layer_mean_per_frame"] == rows[0]["kept_per_frame"] == PATCHES
    check_ttp_rows(rows)

    rows = evaluate(model, processor, items, 4, 16, methods=("pool", "ttp"), twig=None, blank=False)
    assert "ttp: skipped" in capsys.readouterr().err
    assert [r["method"] for r in rows] == ["none"] + ["pool"] * 3

    # FastV at matched R-bar prunes at the twig's K=1: R = ceil((4 x 21 - 64) / 3) = 7 reaches R-bar 21.25;
    # 14 and 7 are below the floor (64 + 3) / 4 with R >= 1.
    rows = evaluate(model, processor, items, 4, 16, methods=("fastv",), twig=twig, blank=False)
    at_r = [r for r in rows if r.get("basis") == "R"]
    assert [(r["budget_per_frame"], r["prune_layer"]) for r in at_r] == [(21, 2), (14, 2), (7, 2)]
    at_mean = [r for r in rows if r.get("basis") == "R̄"]
    summary = [(r["fraction"], r["budget_per_frame"], r["prune_layer"], r["layer_mean_per_frame"]) for r in at_mean]
    assert summary == [("1/3", 7, 1, 21.25)]
    assert "fastv: R̄ = 14/frame (2/9) is out of reach" in capsys.readouterr().err


def test_merge_replaces_only_the_listed_methods(tmp_path, capsys):
    out = tmp_path / "quality"
    main([*SMALL, "--out", str(out), "--methods", "pool", "ttp", "--twig", "none"])
    first = json.loads((out / "quality.json").read_text())
    for rows in first["results"].values():
        assert [r["method"] for r in rows] == ["none", "pool", "pool", "pool", "blank media"]
    assert "ttp: skipped" in capsys.readouterr().err

    main([*SMALL, "--out", str(out), "--methods", "ttp", "--merge"])  # twig: <model>/twig
    assert "recomputed `none` row equals the stored one" in capsys.readouterr().err
    merged = json.loads((out / "quality.json").read_text())
    assert merged["twig"] == str(MODEL / "twig")
    assert merged["merges"][0]["methods"] == ["none", "ttp"]
    for kind, rows in merged["results"].items():
        old = first["results"][kind]
        assert [r["method"] for r in rows] == ["none", "pool", "pool", "pool"] + ["ttp"] * 4 + ["blank media"]
        assert by_method(rows, "pool") == by_method(old, "pool")
        assert by_method(rows, "blank media") == by_method(old, "blank media")
        assert rows[0]["accuracy"] == old[0]["accuracy"]
        check_ttp_rows(rows)
    table = (out / "quality.md").read_text()
    assert "| ttp | 1/3 | 21 | 26.5 |" in table and "| ttp | 1/3 (R̄) | 10 | 21 |" in table
    assert (out / "quality.png").stat().st_size > 0

    # Merging again replaces the ttp rows instead of adding more.
    main([*SMALL, "--out", str(out), "--methods", "ttp", "--merge"])
    again = json.loads((out / "quality.json").read_text())
    assert [len(by_method(rows, "ttp")) for rows in again["results"].values()] == [4, 4]
    with pytest.raises(SystemExit, match="questions"):
        main([*SMALL, "--images", "3", "--out", str(out), "--methods", "ttp", "--merge"])  # last --images wins
