"""Where models come from (local, object store, Hugging Face hub) and the model checks run before Ray.

The hub is a fake one on 127.0.0.1: a ``http.server`` thread serving just what huggingface_hub's
``model_info``, ``snapshot_download`` and ``hf_hub_download`` ask for (repo info, tree listing,
``HEAD``/``GET`` of ``resolve`` URLs), over tiny checkpoints saved in the test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import fsspec
import pytest
import torch
from PIL import Image

from operators import registry
from operators.cpu_linear import PackedLinear
from operators.loading import load_vlm
from pipeline.config import ConfigError, load_config
from pipeline.models import (
    HUB,
    LOCAL,
    OBJECT_STORE,
    TWIG_FORMAT,
    ModelSource,
    check_model,
    checkpoint_directory,
    local_twig,
    parse_model_path,
)
from tests.tiny_models import BUILDERS

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "shapes-llava"


# --- a fake Hugging Face hub ------------------------------------------------------------------------


class FakeHub:
    """repo id -> refs (branch/tag -> commit) and commits (commit -> {path: bytes}); every request logged."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.log: list[tuple[str, str]] = []

    def add(self, repo: str, files: dict[str, bytes], ref: str = "main") -> str:
        commit = hashlib.sha1(f"{repo}@{ref}".encode()).hexdigest()
        entry = self.repos.setdefault(repo, {"refs": {}, "commits": {}})
        entry["refs"][ref] = commit
        entry["commits"][commit] = files
        return commit

    def lookup(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        entry = self.repos[repo]
        commit = entry["refs"].get(revision, revision)
        return (commit, entry["commits"][commit]) if commit in entry["commits"] else None


def handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self.serve(body=False)

        def do_GET(self):
            self.serve(body=True)

        def reply(self, status: int, data: bytes = b"", body: bool = True, **headers) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key.replace("_", "-"), value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.log.append((self.command, path))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"]:  # /api/models/{org}/{name}[/revision/{rev} | /tree/{rev}]
                repo, rest = "/".join(parts[2:4]), parts[4:]
                revision = rest[1] if len(rest) >= 2 else "main"
                kind = rest[0] if rest else "revision"
            else:  # /{org}/{name}/resolve/{rev}/{path}
                repo, rest = "/".join(parts[:2]), parts[2:]
                if len(rest) < 2 or rest[0] != "resolve":  # telemetry and the like: not served
                    return self.reply(404, b"{}", body)
                kind, revision, name = "resolve", rest[1], "/".join(rest[2:])
            if repo not in hub.repos:
                return self.reply(404, b'{"error": "Repository not found"}', body, X_Error_Code="RepoNotFound")
            found = hub.lookup(repo, revision)
            if found is None:
                return self.reply(404, b'{"error": "Invalid rev id"}', body, X_Error_Code="RevisionNotFound")
            commit, files = found
            if kind == "revision":
                info = {"id": repo, "sha": commit, "siblings": [{"rfilename": n} for n in sorted(files)]}
                return self.reply(200, json.dumps(info).encode(), body, Content_Type="application/json")
            if kind == "tree":
                tree = [
                    {"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                    for n, d in sorted(files.items())
                ]
                return self.reply(200, json.dumps(tree).encode(), body, Content_Type="application/json")
            if name not in files:
                return self.reply(404, b"", body, X_Error_Code="EntryNotFound", X_Repo_Commit=commit)
            data = files[name]
            etag = f'"{hashlib.sha1(data).hexdigest()}"'
            return self.reply(200, data, body, X_Repo_Commit=commit, ETag=etag)

    return Handler


def read_folder(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def twig_json(model, **changes) -> bytes:
    """A twig.json matching ``model``'s geometry (the driver checks geometry, not weights)."""
    text = model.config.text_config
    config = {
        "format": TWIG_FORMAT,
        "K": 1,
        "T": 1,
        "base_fingerprint": "0" * 32,
        "base_model_type": model.config.model_type,
        "base_layers": text.num_hidden_layers,
        "hidden_size": text.hidden_size,
        "vocab_size": model.lm_head.out_features,
    }
    return json.dumps({**config, **changes}).encode()


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Two tiny LLaVA checkpoints (different seeds) saved with their processor, and the models;
    seed 0's folder also has a (grown, untrained) twig under twig/."""
    from operators.twig import grow_twig, save_twig

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for seed in (0, 1):
        model, processor = BUILDERS["llava"](seed=seed)
        directory = root / f"seed{seed}"
        model.save_pretrained(directory, safe_serialization=True)
        processor.save_pretrained(directory)
        out[seed] = (directory, model)
    model = out[0][1]
    save_twig(grow_twig(model, K=1, T=1), root / "twig0", model)
    qwen, qwen_processor = BUILDERS["qwen2_5_vl"](seed=0)  # a family beyond LLaVA, served from the hub too
    qwen.save_pretrained(root / "qwen", safe_serialization=True)
    qwen_processor.save_pretrained(root / "qwen")
    out["qwen"] = (root / "qwen", qwen)
    return out, root / "twig0"


@pytest.fixture(scope="module")
def tiny_models(tiny_checkpoints):
    return tiny_checkpoints[0]


@pytest.fixture(scope="module")
def fake_hub(tiny_checkpoints):
    """org/tiny: main (seed 0, a twig, and a .bin beside the safetensors) and v1 (seed 1, no twig);
    org/pickled: pickle weights only."""
    models, twig_dir = tiny_checkpoints
    main_files = read_folder(models[0][0])
    twig_files = {f"twig/{name}": data for name, data in read_folder(twig_dir).items()}
    hub = FakeHub()
    hub.add("org/tiny", {**main_files, **twig_files, "pytorch_model.bin": b"not for loading"})
    hub.add("org/tiny", read_folder(models[1][0]), ref="v1")
    pickled = {k: v for k, v in main_files.items() if not k.endswith(".safetensors")}
    hub.add("org/pickled", {**pickled, "pytorch_model.bin": b"pickle"})
    hub.add("org/tiny-qwen-vl", read_folder(models["qwen"][0]))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield hub
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub_env(fake_hub, tmp_path, monkeypatch):
    """HF_ENDPOINT at the fake hub, a fresh HF_HOME, online."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("VLM_MODEL_CACHE", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    fake_hub.log.clear()
    return fake_hub


def config_for(model_path: str, *overrides: str):
    return load_config(None, [f"model.path='{model_path}'", *overrides])


# --- where model.path points --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, expected",
    [
        ("llava-hf/llava-1.5-7b-hf", ModelSource(HUB, "llava-hf/llava-1.5-7b-hf")),
        ("org/name@v1.0", ModelSource(HUB, "org/name", "v1.0")),
        ("hf://org/name", ModelSource(HUB, "org/name")),
        ("hf://org/name@0123abc", ModelSource(HUB, "org/name", "0123abc")),
        ("s3://bucket/models/llava/", ModelSource(OBJECT_STORE, "s3://bucket/models/llava/")),
        ("file:///data/llava", ModelSource(LOCAL, "/data/llava")),
        ("/data/llava", ModelSource(LOCAL, "/data/llava")),
        ("./x/y", ModelSource(LOCAL, "./x/y")),
        ("a/b/c", ModelSource(LOCAL, "a/b/c")),
        ("models/shapes-llava", ModelSource(LOCAL, "models/shapes-llava")),  # exists (run from the root)
    ],
)
def test_model_path_sources(path, expected, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert parse_model_path(path) == expected


def test_local_directory_wins_over_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_model_path("org/name").kind == HUB
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_model_path("org/name") == ModelSource(LOCAL, "org/name")


# --- the Hugging Face hub ---------------------------------------------------------------------------


def test_hub_id_passes_with_config_and_file_list_only(hub_env):
    info = check_model(config_for("org/tiny"))
    assert (info.source, info.model_type, info.family) == (ModelSource(HUB, "org/tiny"), "llava", "LLaVA-1.5")
    assert info.local_dir is None and info.twig is None
    assert info.visual_tokens_per_image == (48 // 4) ** 2
    fetched = {path.rsplit("/", 1)[-1] for method, path in hub_env.log if method == "GET" and "/resolve/" in path}
    assert fetched == {"config.json"}  # no weights on the driver


def test_load_vlm_downloads_a_revision_without_pickles(hub_env, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_MODEL_CACHE", str(tmp_path / "cache"))
    model, processor = load_vlm(checkpoint_directory("org/tiny@v1"))
    original = tiny_models[1][1].state_dict()
    loaded = model.state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(loaded[k], v) for k, v in original.items())
    assert not torch.equal(loaded["lm_head.weight"], tiny_models[0][1].lm_head.weight)  # not main's weights
    repo = tmp_path / "cache" / "hub" / "models--org--tiny"
    assert (repo / "refs" / "v1").read_text() == hub_env.lookup("org/tiny", "v1")[0]
    assert ("GET", "/api/models/org/tiny/revision/v1") in hub_env.log

    # main has a pytorch_model.bin beside its safetensors: never requested, never on disk
    load_vlm(checkpoint_directory("hf://org/tiny"))
    assert not any(path.endswith(".bin") for _, path in hub_env.log)
    assert not list(repo.rglob("*.bin"))
    assert processor is not None


def test_a_qwen_vl_repo_from_the_hub_checks_loads_and_generates(hub_env, tiny_models, tmp_path, monkeypatch):
    from operators.engine import Engine, EngineConfig, Request, format_prompt
    from tests.conftest import random_image

    monkeypatch.setenv("VLM_MODEL_CACHE", str(tmp_path / "cache"))
    info = check_model(config_for("org/tiny-qwen-vl"))
    assert (info.model_type, info.family) == ("qwen2_5_vl", "Qwen2.5-VL (M-RoPE)")
    model, processor = load_vlm(checkpoint_directory("org/tiny-qwen-vl"))
    original = tiny_models["qwen"][1]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.state_dict().items())
    request = Request(format_prompt(processor, "red ?"), images=[random_image(2, 40, 56)])
    result = Engine(model, processor, EngineConfig("vispruner", budget=3, max_new_tokens=3)).generate([request])[0]
    assert result.visual_tokens_kept == 3 and result.visual_tokens_total > 3


def test_pickle_only_repo_is_refused(hub_env):
    with pytest.raises(ConfigError) as error:
        check_model(config_for("org/pickled"))
    message = str(error.value)
    assert message.startswith("model.path: org/pickled has only pickle weights (pytorch_model.bin); only safetensors")
    assert "hf download org/pickled --local-dir models/pickled" in message and "\n" not in message
    assert not any(path.endswith(".bin") for _, path in hub_env.log)


def test_offline_says_how_to_get_the_model(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as error:
        check_model(config_for("org/tiny"))
    message = str(error.value)
    assert message.startswith("model.path: cannot fetch org/tiny")
    assert "(offline: HF_HUB_OFFLINE is set" in message
    assert "`hf download org/tiny --local-dir models/tiny` and pass model.path=models/tiny" in message
    assert "model.path=s3://BUCKET/models/tiny" in message and "\n" not in message
    assert hub_env.log == []  # nothing asked of the network


def test_offline_uses_the_cache_when_the_model_is_there(hub_env, monkeypatch):
    load_vlm(checkpoint_directory("org/tiny"))  # fills HF_HOME's cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_env.log.clear()
    assert check_model(config_for("org/tiny")).model_type == "llava"
    assert hub_env.log == []


def test_missing_repo_and_unreachable_hub(hub_env, monkeypatch):
    with pytest.raises(ConfigError, match=r"^model.path: org/missing \(no local directory org/missing exists.*"):
        check_model(config_for("org/missing"))
    with pytest.raises(ConfigError, match="no such model repo"):
        check_model(config_for("hf://org/missing"))
    with pytest.raises(ConfigError, match="has no revision 'v9'"):
        check_model(config_for("org/tiny@v9"))
    with socket_closed() as port:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        with pytest.raises(ConfigError, match=rf"cannot reach http://127.0.0.1:{port}: ConnectError"):
            check_model(config_for("org/tiny"))


class socket_closed:
    """A loopback port nobody listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        return False


def test_hub_model_twig_default(hub_env):
    config = config_for("org/tiny", "decode.strategy=ssd")
    assert config.decode.twig is None  # not decidable without the hub: preflight decides
    before = config.fingerprint()
    info = check_model(config)
    assert info.twig == config.decode.twig == "hf://org/tiny/twig"
    assert config.fingerprint() != before
    assert (
        config.fingerprint()
        == config_for("org/tiny", "decode.strategy=ssd", "decode.twig=hf://org/tiny/twig").fingerprint()
    )
    assert (Path(local_twig(config.decode.twig)) / "twig.json").is_file()  # what the actor hands load_twig
    with pytest.raises(ConfigError, match=r"decode.twig is required .*; org/tiny@v1 has no twig/ folder"):
        check_model(config_for("org/tiny@v1", "decode.strategy=ssd"))


def test_inference_actor_loads_a_hub_model_and_its_twig(hub_env, monkeypatch):
    """What each actor does: download the model (weights included) and load the twig from that snapshot."""
    from pipeline.inference import InferenceStage

    config = config_for("org/tiny", "decode.strategy=ssd", "model.device=cpu", "model.dtype=float32")
    check_model(config)  # preflight: decode.twig = hf://org/tiny/twig
    stage = InferenceStage(config, None, "run")
    assert stage.engine.twig is not None and stage.engine.twig.K == 1
    assert any(path.endswith("/model.safetensors") for _, path in hub_env.log)
    # A model this small is not packed (it stays in the caches, where aten is faster) ...
    assert not any(isinstance(m, PackedLinear) for m in stage.engine.model.modules())
    # ... a large one is: a CPU actor runs base and twig linears through oneDNN (compute.cpu_linear's
    # default), and aten keeps them.
    monkeypatch.setattr("operators.cpu_linear.MIN_PACKED_BYTES", 0)
    stage = InferenceStage(config, None, "run")
    assert isinstance(stage.engine.model.lm_head, PackedLinear) and isinstance(stage.engine.twig.head, PackedLinear)
    aten = config_for("org/tiny", "decode.strategy=ssd", "model.device=cpu", "compute.cpu_linear=aten")
    check_model(aten)
    plain = InferenceStage(aten, None, "run")
    assert not any(isinstance(m, PackedLinear) for m in plain.engine.model.modules())


# --- local and object-store checkpoints -------------------------------------------------------------


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError) as error:
        check_model(config_for(str(folder)))
    supported = ", ".join(registry.family_names())
    assert str(error.value) == (
        f"model.path: {folder} has model_type 'qwen2_vl', which this job does not serve; supported: {supported}"
    )
    assert supported == "llava, llava_next, video_llava, llava_onevision, qwen2_5_vl, qwen3_vl"


def test_missing_processor_is_refused(tmp_path, tiny_models):
    folder = shutil.copytree(tiny_models[0][0], tmp_path / "noproc")
    (folder / "processor_config.json").unlink()
    with pytest.raises(ConfigError, match=r"has no processor \(missing preprocessor_config.json or processor_config"):
        check_model(config_for(str(folder)))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="tokenizer.json or tokenizer.model"):
        check_model(config_for(str(folder)))


def test_incompatible_twig_names_both_values(tmp_path, tiny_models):
    folder = shutil.copytree(tiny_models[0][0], tmp_path / "model")
    with pytest.raises(ConfigError) as error:
        check_model(config_for(str(folder), "decode.strategy=ssd", f"decode.twig={DEMO / 'twig'}"))
    assert str(error.value).startswith(
        f"decode.twig: {DEMO / 'twig'} does not fit model.path {folder}: the twig was trained on a base with "
        "hidden_size=192 but this model has hidden_size=64"
    )
    (folder / "twig").mkdir()
    (folder / "twig" / "twig.json").write_bytes(twig_json(tiny_models[0][1], vocab_size=7))
    with pytest.raises(ConfigError, match="vocab_size=7 but this model has vocab_size="):
        check_model(config_for(str(folder), "pruning.method=ttp", "pruning.budget=4"))


def test_local_twig_default_has_the_explicit_fingerprint(tmp_path):
    demo = str(DEMO)
    implicit = config_for(demo, "decode.strategy=ssd")
    explicit = config_for(demo, "decode.strategy=ssd", f"decode.twig={DEMO / 'twig'}")
    assert implicit.decode.twig == str(DEMO / "twig")
    assert implicit.fingerprint() == explicit.fingerprint()
    assert check_model(implicit).twig == str(DEMO / "twig")  # and the demo twig fits the demo model
    ttp = config_for(demo, "pruning.method=ttp", "pruning.budget=8")
    assert ttp.decode.twig == str(DEMO / "twig")
    bare = shutil.copytree(DEMO, tmp_path / "bare", ignore=shutil.ignore_patterns("twig", "*.safetensors"))
    with pytest.raises(ConfigError, match=rf"; {bare} has no twig/ folder \(train one with jobs/train_twig.py\)"):
        config_for(str(bare), "decode.strategy=ssd")


def test_greedy_runs_get_no_twig_and_keep_their_fingerprint(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / "demo.yaml")
    assert config.decode.twig is None
    assert config.fingerprint() == "e3e1a25a46743e8c"  # outputs written before this change still resume
    assert check_model(config).twig is None and config.fingerprint() == "e3e1a25a46743e8c"


def test_object_store_model_twig_default(tiny_models):
    fs = fsspec.filesystem("memory")
    directory, model = tiny_models[0]
    for name, data in {**read_folder(directory), "twig/twig.json": twig_json(model)}.items():
        fs.pipe(f"/models-test/tiny/{name}", data)
    config = config_for("memory://models-test/tiny", "decode.strategy=ssd")
    assert config.decode.twig is None
    info = check_model(config)
    assert info.twig == config.decode.twig == "memory://models-test/tiny/twig"
    assert info.source.kind == OBJECT_STORE and info.local_dir is None


# --- through the real command line ------------------------------------------------------------------


def test_cli_refuses_an_unsupported_model_before_touching_the_output(tmp_path):
    media = tmp_path / "in"
    media.mkdir()
    Image.new("RGB", (8, 8)).save(media / "a.png")
    model = tmp_path / "qwen"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    (model / "model.safetensors").write_bytes(b"")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "jobs/caption.py", "--config", "configs/demo.yaml", "--input", str(media)]
        + ["--output", str(out), f"model.path={model}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: model.path: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "model_type 'qwen2_vl', which this job does not serve" in proc.stderr
    assert not out.exists()


def test_twig_constants_match_the_twig_module():
    """pipeline.models repeats two names of operators.twig so that the driver need not import torch."""
    from operators import twig
    from pipeline import models

    assert (models.TWIG_FORMAT, models.TWIG_CONFIG) == (twig.FORMAT, twig.CONFIG_NAME)


def test_cli_dry_run_with_a_hub_id_and_offline(hub_env, tmp_path):
    """Through the real command line: a hub id is checked on the hub (dry run: config.json and the
    file list only, no weights); offline, one line saying how to stage the model."""
    import os

    media = tmp_path / "in"
    media.mkdir()
    Image.new("RGB", (8, 8)).save(media / "a.png")
    args = [sys.executable, "jobs/caption.py", "--config", "configs/demo.yaml", "--input", str(media)]
    args += ["--output", str(tmp_path / "out"), "model.path=org/tiny@v1", "--dry-run"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "model: org/tiny@v1: model_type llava" in done.stdout
    assert hub_env.log and not any(path.endswith(".safetensors") for _, path in hub_env.log)
    offline = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**env, "HF_HUB_OFFLINE": "1"}
    )
    assert offline.returncode == 2
    assert offline.stderr.startswith("error: model.path: cannot fetch org/tiny@v1") and offline.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
