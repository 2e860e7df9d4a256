"""Job configuration: every shipped YAML validates; bad keys and values give one clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"demo.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    config.require_paths()  # shipped configs name their input, output and model
    assert len(config.fingerprint()) == 16


@pytest.mark.parametrize(
    "override, fragment",
    [
        (
            ["pruning.method=visprune"],
            "pruning.method: unknown pruning method 'visprune'; allowed: none, vispruner, fastv, random, pool, ttp",
        ),
        (["pruning.budgt=3"], "unknown key 'pruning.budgt': pruning has method, budget"),
        (["nope=1"], "unknown key 'nope': top level has task, input"),
        (["pruning.method=fastv", "pruning.budget=null"], "pruning.budget: required when pruning.method is 'fastv'"),
        (
            ["task=translate"],
            "task: Input should be 'caption' or 'qa' (got 'translate'; from the command line: task=translate)",
        ),
        (["decode.strategy=beam"], "decode.strategy: unknown decode strategy 'beam'; allowed: greedy, ssd"),
        (
            ["decode.strategy=ssd", "model.path=/no/such/model"],  # (the demo model ships a twig: the default)
            "decode.twig is required when decode.strategy is 'ssd' and pruning.method is 'vispruner'",
        ),
        (["pruning.budget_unit=rbar"], "pruning.budget_unit: unknown 'rbar'; allowed: kept, layer_mean"),
        (["decode.top_p=1.5"], "decode.top_p: must be in (0, 1], got 1.5"),
        (["compute.batch_tokens=0"], "compute.batch_tokens: must be >= 1 or null, got 0"),
        (["decode.max_new_tokens=9000"], "decode.max_new_tokens: must be >= 1 and <= 8192, got 9000"),
        (["decode.max_draft=65"], "decode.max_draft: must be >= 1 and <= 64, got 65"),
        (["pruning.method=ttp", "model.path=/no/such/model"], "decode.twig is required"),
        (["media.num_frames=0"], "media.num_frames: Input should be greater than or equal to 1"),
        (["media.sampling=fps"], "media.fps is required"),
        (["compute.batch_size=many"], "compute.batch_size: Input should be a valid integer"),
        (["pruning.budget.x=1"], "pruning.budget is not a section"),
        (["pruning"], "not of the form dotted.key=value"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "demo.yaml", override)
    assert fragment in str(e.value)


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("task: caption\npruning:\n  methd: none\n")
    with pytest.raises(ConfigError, match=r"pruning.methd: unknown key; pruning has method, budget"):
        load_config(path)


def test_overrides_apply_in_order_and_parse_yaml_values():
    config = load_config(
        ROOT / "configs" / "demo.yaml",
        ["pruning.method=random", "pruning.budget=7", "pruning.budget=9", "media.max_side=null", "task=qa"],
    )
    assert (config.pruning.method, config.pruning.budget, config.media.max_side, config.task) == (
        "random",
        9,
        None,
        "qa",
    )


def test_fingerprint_tracks_what_changes_outputs_only():
    base = load_config(ROOT / "configs" / "demo.yaml")
    same = [
        "output.uri=/elsewhere",
        "input.uri=/other",
        "compute.batch_size=3",
        "compute.actors=4",
        "media.timeout_s=5",
    ]
    assert load_config(ROOT / "configs" / "demo.yaml", same).fingerprint() == base.fingerprint()
    for change in [
        "pruning.budget=7",
        "pruning.method=none",
        "decode.max_new_tokens=5",
        "media.num_frames=2",
        "prompt.caption=hi",
        "model.path=/m",
        "task=qa",
        "decode.ignore_eos=true",
        "decode.draft_alternatives=[3,1]",
    ]:
        assert load_config(ROOT / "configs" / "demo.yaml", [change]).fingerprint() != base.fingerprint(), change
    # A key added later enters the hash only when set: earlier output still resumes.
    assert load_config(ROOT / "configs" / "demo.yaml", ["decode.ignore_eos=false"]).fingerprint() == base.fingerprint()
    no_tree = load_config(ROOT / "configs" / "demo.yaml", ["decode.draft_alternatives=[]"])
    assert no_tree.fingerprint() == base.fingerprint()


def test_draft_alternatives_reach_the_engine_and_bad_ones_name_the_key():
    config = load_config(ROOT / "configs" / "demo.yaml", ["decode.draft_alternatives=[3,1]"])
    assert config.to_engine_config().draft_alternatives == (3, 1)
    with pytest.raises(ConfigError, match="decode.draft_alternatives: must be a list of at most decode.max_draft"):
        load_config(ROOT / "configs" / "demo.yaml", ["decode.max_draft=1", "decode.draft_alternatives=[1,1]"])
    with pytest.raises(ConfigError, match="decode.draft_alternatives: must be >= 0"):
        load_config(ROOT / "configs" / "demo.yaml", ["decode.draft_alternatives=[-2]"])


def test_require_paths_names_the_missing_key():
    with pytest.raises(ConfigError, match="input.uri is not set"):
        load_config(None, []).require_paths()


def test_caption_cli_rejects_a_bad_config_before_any_cluster_work():
    """Exit code 2 and one message; Ray is never imported (checked by the child)."""
    code = (
        "import sys; sys.argv=['caption.py','--config','configs/demo.yaml','pruning.method=nope'];"
        "sys.path.insert(0,'jobs'); import runpy\n"
        "try:\n    runpy.run_path('jobs/caption.py', run_name='__main__')\n"
        "except SystemExit as e:\n    assert 'ray' not in sys.modules, 'ray imported'; raise\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "pruning.method: unknown pruning method 'nope'; allowed: none, vispruner" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_and_engine_settings_load_without_torch():
    """Names and rules live in torch-free modules: the driver validates a config without importing torch."""
    code = (
        "import sys; from pipeline.config import load_config\n"
        "c = load_config('configs/demo.yaml', ['pruning.method=fastv', 'decode.temperature=0.5'])\n"
        "assert c.to_engine_config().sampling\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
