"""Hostile model directories at the CLI and job level: refused with a clear error that names the file.

tests/test_model.py checks `load_encoder`'s errors; here every hostile model goes through
`embedpipe inspect`, `embedpipe embed`, `embedpipe mine` and `embedpipe dedup` (raw corpus + --model):
exit code 2, one error line naming the offending file, no traceback, no Ray cluster started, no code
from the model directory run (planted modules would leave a marker file), and nothing written
anywhere (the whole temporary tree is snapshot before and after).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from tests.support.tiny_models import convert_to_pickle

EVIL_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('remote code ran')\n"


def edit_json(path: Path, change: Callable[[dict | list], object]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    result = change(data)
    path.write_text(json.dumps(data if result is None else result, indent=2), encoding="utf-8")


def plant_code(root: Path, module: str, marker: Path) -> None:
    """A Python module that leaves a marker if anything ever imports it."""
    (root / f"{module}.py").write_text(EVIL_CODE.format(marker=str(marker)))


# --------------------------------------------------------------------------- hostile models
# Each takes a fresh copy of the tiny model (and a marker path) and returns (offending file, words).


def pickle_checkpoint(root: Path, marker: Path) -> tuple[Path, list[str]]:
    convert_to_pickle(root)
    return root / "pytorch_model.bin", ["pickle checkpoint refused", "--allow-pickle"]


def auto_map_model(root: Path, marker: Path) -> tuple[Path, list[str]]:
    plant_code(root, "modeling_evil", marker)
    edit_json(root / "config.json", lambda c: c.update(auto_map={"AutoModel": "modeling_evil.EvilModel"}))
    return root / "config.json", ["auto_map", "remote code"]


def auto_map_tokenizer(root: Path, marker: Path) -> tuple[Path, list[str]]:
    plant_code(root, "tokenization_evil", marker)
    edit_json(
        root / "tokenizer_config.json",
        lambda c: c.update(auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}),
    )
    return root / "tokenizer_config.json", ["auto_map", "remote code"]


def router_with_custom_module(root: Path, marker: Path) -> tuple[Path, list[str]]:
    """A Router (modules.json's first module) whose route names a class from a planted file."""
    plant_code(root, "modeling_evil", marker)
    (root / "query_0_Evil").mkdir()
    (root / "router_config.json").write_text(
        json.dumps(
            {
                "types": {"query_0_Evil": "modeling_evil.EvilTransformer"},
                "structure": {"query": ["query_0_Evil"], "document": ["query_0_Evil"]},
                "parameters": {"default_route": "document"},
            }
        )
    )
    edit_json(
        root / "modules.json",
        lambda modules: [
            dict(m, type="sentence_transformers.base.modules.router.Router") if m["idx"] == 0 else m
            for m in modules
        ],
    )
    return root / "router_config.json", [
        "unknown module type",
        "modeling_evil.EvilTransformer",
        "custom module code is never imported",
    ]


def with_dense(root: Path, activation: str) -> Path:
    """Insert a well-formed Dense module (real safetensors weights) before Normalize, with `activation`."""
    import torch
    from safetensors.torch import save_file

    folder = root / "2_Dense"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"in_features": 32, "out_features": 32, "bias": True, "activation_function": activation})
    )
    save_file(
        {"linear.weight": torch.eye(32), "linear.bias": torch.zeros(32)}, str(folder / "model.safetensors")
    )

    def insert(modules: list) -> list:
        dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
        rest = [dict(m, idx=m["idx"] + 1) if m["idx"] >= 2 else m for m in modules]
        return sorted([*rest, dense], key=lambda m: m["idx"])

    edit_json(root / "modules.json", insert)
    return folder / "config.json"


def dense_activation(activation: str) -> Callable[[Path, Path], tuple[Path, list[str]]]:
    def make(root: Path, marker: Path) -> tuple[Path, list[str]]:
        return with_dense(root, activation), ["activation_function", activation, "not a torch.nn activation"]

    return make


def module_path(path_of: Callable[[Path], str]) -> Callable[[Path, Path], tuple[Path, list[str]]]:
    """Point the Pooling module at `path_of(root)`; a well-formed Pooling folder waits there."""

    def make(root: Path, marker: Path) -> tuple[Path, list[str]]:
        target = path_of(root)
        if not target.startswith("/"):
            destination = (root / target).resolve()
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(root / "1_Pooling", destination, dirs_exist_ok=True)
        edit_json(
            root / "modules.json",
            lambda modules: [dict(m, path=target) if m["type"].endswith("Pooling") else m for m in modules],
        )
        return root / "modules.json", ["module path", "escapes the model directory"]

    return make


def symlinked_module(root: Path, marker: Path) -> tuple[Path, list[str]]:
    outside = root.parent / "outside-pooling"
    shutil.copytree(root / "1_Pooling", outside)
    shutil.rmtree(root / "1_Pooling")
    (root / "1_Pooling").symlink_to(outside, target_is_directory=True)
    return root / "modules.json", ["module path '1_Pooling'", "escapes the model directory"]


@dataclass(frozen=True)
class Hostile:
    name: str
    make: Callable[[Path, Path], tuple[Path, list[str]]]


MODELS = [
    Hostile("pickle checkpoint", pickle_checkpoint),
    Hostile("auto_map in config.json", auto_map_model),
    Hostile("auto_map in tokenizer_config.json", auto_map_tokenizer),
    Hostile("Dense activation os.system", dense_activation("os.system")),
    Hostile("Dense activation builtins.eval", dense_activation("builtins.eval")),
    Hostile("Dense activation torch.nn.functional.relu", dense_activation("torch.nn.functional.relu")),
    Hostile("Dense activation torch.nn.Tanh.__init__", dense_activation("torch.nn.Tanh.__init__")),
    Hostile("module path ../../", module_path(lambda root: "../../escaped-pooling")),
    Hostile("module path absolute", module_path(lambda root: "/etc")),
    Hostile("module folder a symlink out", symlinked_module),
    Hostile("Router naming a custom module", router_with_custom_module),
]


# --------------------------------------------------------------------------- the runs


def snapshot(tree: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [*filenames, *dirnames]:
            info = os.lstat(os.path.join(dirpath, name))
            found[os.path.join(dirpath, name)] = (info.st_size, info.st_mtime_ns)
    return found


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused model must be refused before any Ray cluster is joined or started."""
    from pipeline.runtime import cluster

    def refuse(*_args, **_kwargs):
        raise AssertionError("Ray was started for a model that should have been refused")

    monkeypatch.setattr(cluster, "connect", refuse)


def commands(model: Path, data: Path, out: Path) -> dict[str, list[str]]:
    common = ["--no-progress", "--workers", "1"]
    return {
        "inspect": ["inspect", str(model)],
        "embed": [
            "embed",
            "--model",
            str(model),
            "--input",
            str(data / "corpus.parquet"),
            "--output",
            str(out / "embed"),
            *common,
        ],
        "mine": [
            "mine",
            "--model",
            str(model),
            "--input",
            str(data / "pairs.parquet"),
            "--output",
            str(out / "mine"),
            *common,
        ],
        "dedup": [
            "dedup",
            "--model",
            str(model),
            "--input",
            str(data / "corpus.parquet"),
            "--threshold",
            "0.9",
            "--output",
            str(out / "dedup"),
            *common,
        ],
    }


FIGURES = {"hostile models": 0, "refusals": 0}


@pytest.mark.parametrize("hostile", MODELS, ids=[m.name for m in MODELS])
def test_hostile_model_is_refused_everywhere(
    hostile: Hostile, tiny_model_dir: Path, tmp_path: Path, no_ray, capsys
) -> None:
    model = tmp_path / "models" / "deep" / "m"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "REMOTE_CODE_RAN"
    offending, words = hostile.make(model, marker)
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(
        pa.table({"id": list(range(6)), "text": [f"text number {i}" for i in range(6)]}),
        data / "corpus.parquet",
    )
    pq.write_table(
        pa.table({"query": [f"question {i}" for i in range(6)], "answer": [f"answer {i}" for i in range(6)]}),
        data / "pairs.parquet",
    )
    out = tmp_path / "out"
    before = snapshot(tmp_path)

    for job, argv in commands(model, data, out).items():
        code = cli.main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith(f"embedpipe {job}: error: ")]
        assert code == 2, (job, err)
        assert len(lines) == 1 and "Traceback" not in err, (job, err)  # (dedup logs what it starts first)
        assert str(offending) in lines[0], (job, lines[0])
        for word in words:
            assert word in lines[0], (job, word, lines[0])
        FIGURES["refusals"] += 1

    assert not marker.exists(), "code from the model directory ran"
    assert snapshot(tmp_path) == before, "something was written"
    assert not out.exists()
    FIGURES["hostile models"] += 1


def test_pickle_checkpoint_loads_with_allow_pickle(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    """The opt-in works: the same pickle model inspects (and so loads) with --allow-pickle."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    pickle_checkpoint(model, tmp_path / "marker")
    assert cli.main(["inspect", str(model), "--allow-pickle", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dim"] == 32 and info["normalized"] is True


def test_figures() -> None:
    print("FIGURES", json.dumps(FIGURES))
