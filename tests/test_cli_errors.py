"""One line, not a traceback, for every user mistake, in every command.

Each case runs ``python -m vitkit ...`` in its own fresh folder and must exit with status 2, print exactly one line
on stderr (``vitkit COMMAND: error: ...`` naming the key, flag or file at fault), no traceback, and leave the folder
exactly as it was (no run folder, no half-written output). A mistake that shows only once the model is built (a class
index beyond its head) follows the load's info lines. Each case's result is checked by its own test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

import vitkit

RECIPE = {
    "model": {"name": "vit_tiny_patch16_224", "overrides": {"patch_size": 4, "depth": 1, "embed_dim": 24,
                                                            "num_heads": 2}},
    "data": {"name": "fake", "img_size": 16, "train_limit": 64, "test_limit": 16, "num_workers": 0},
    "train": {"steps": 2, "batch_size": 8},
    "log": {"progress": False, "plots": False, "tensorboard": False},
}


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    expected: str  # must appear in the error line
    absent: str | None = None  # must not appear in it
    needs_no_cuda: bool = False
    loads_model: bool = False  # found only once the model is built: the load's info lines come first


def _cifar_recipe(root: str) -> dict:
    return {**RECIPE, "data": {**RECIPE["data"], "name": "cifar10", "root": root}}


CASES: dict[str, Case] = {
    # item 7: devices
    "eval --device cuda": Case(("eval", "model", "--device", "cuda", "--set", "data.name=digits"),
                               "--device cuda: ", needs_no_cuda=True),
    "predict --device gpu0": Case(("predict", "img.png", "--pretrained", "model", "--device", "gpu0"),
                                  "--device gpu0: not a device name"),
    "bench --device cuda": Case(("bench", "vit_tiny_patch16_224", "--device", "cuda"), "--device cuda: ",
                                needs_no_cuda=True),
    "train.device=cuda": Case(("train", "r.yaml", "--out", "run", "--set", "train.device=cuda"), "train.device cuda: ",
                              needs_no_cuda=True),
    # items 5, 7: values that pass the schema but cannot work
    "train.epochs=1e400": Case(("train", "r.yaml", "--out", "run", "--set", "train.epochs=1e400"),
                               "train.epochs: expected a finite number"),
    "optim.lr=nan": Case(("train", "r.yaml", "--out", "run", "--set", "optim.lr=nan"),
                         "optim.lr: expected a finite number, got nan"),
    "optim.lr=-inf": Case(("train", "r.yaml", "--out", "run", "--set", "optim.lr=-.inf"), "optim.lr: "),
    "data.img_size: 16.5": Case(("train", "r.yaml", "--out", "run", "--set", "data.img_size=16.5"),
                                "data.img_size: expected an integer", absent="model.img_size"),
    "unknown key": Case(("train", "r.yaml", "--out", "run", "--set", "optim.lrr=1"), "optim.lrr"),
    "train without arguments": Case(("train",), "give a RECIPE or --resume RUN_DIR", absent="not both"),
    "train recipe and --resume": Case(("train", "r.yaml", "--resume", "run"), "not both"),
    "train: unknown flag": Case(("train", "r.yaml", "--nonsense"), "unrecognized arguments: --nonsense"),
    "demo --out EXISTING": Case(("demo", "--out", "existing"), "existing already holds a run"),
    # items 6, 11: runs, data
    "resume: no run": Case(("train", "--resume", "nowhere"), "nowhere is not a vitkit run folder"),
    "resume: damaged train_state.json": Case(("train", "--resume", "damaged"),
                                             "damaged/checkpoints/last/train_state.json is damaged"),
    "resume: last/ deleted": Case(("train", "--resume", "no_last"), "checkpoints/last is missing"),
    "CIFAR offline": Case(("train", "cifar.yaml", "--out", "run"), "--set data.root=DIR"),
    "eval without data options": Case(("eval", "model"), "which data?"),
    "models: no match": Case(("models", "nomatch*"), "no model matches"),
    "predict --topk 0": Case(("predict", "img.png", "--pretrained", "model", "--topk", "0"), "--topk"),
    "bench without a model": Case(("bench",), "give a MODEL"),
    "eval TARGET and --pretrained": Case(("eval", "model", "--pretrained", "model"), "not both"),
    # item 8: safe writes
    "convert into a model folder": Case(("convert", "model", "other"), "pass --force"),
    "convert into a non-model folder": Case(("convert", "model", "notes", "--force"), "not a vitkit model folder"),
    "convert --img-size big": Case(("convert", "model", "out", "--img-size", "big"), "--img-size"),
    # paths, names and values that escaped the rule once
    "predict MISSING": Case(("predict", "missing.png", "--pretrained", "model"), "missing.png: no such file or folder"),
    "predict an empty folder": Case(("predict", "empty", "--pretrained", "model"), "no image files (.jpg"),
    "predict --pretrained MISSING": Case(("predict", "img.png", "--pretrained", "nope"), "nope: no such file"),
    "explain MISSING": Case(("explain", "missing.png", "--pretrained", "model", "--out", "out"),
                            "missing.png: no such file or folder"),
    "explain a non-image": Case(("explain", "notes/todo.txt", "--pretrained", "model", "--out", "out"),
                                "notes/todo.txt is not an image"),
    "explain --out FILE": Case(("explain", "img.png", "--pretrained", "model", "--out", "r.yaml"),
                               "--out r.yaml is a file"),
    "explain --max-images 0": Case(("explain", "img.png", "--pretrained", "model", "--max-images", "0"),
                                   "--max-images must be >= 1"),
    "explain --target 99": Case(("explain", "img.png", "--pretrained", "model", "--out", "out", "--target", "99"),
                                "--target 99: vit_tiny_patch16_224 has 10 classes", loads_model=True),
    "eval MISSING_RUN": Case(("eval", "runs/nope"), "runs/nope: no such run or model folder", absent="which data"),
    "eval --data-config MISSING": Case(("eval", "model", "--data-config", "missing.yaml"),
                                       "--data-config missing.yaml: no such file"),
    "export MISSING_RUN": Case(("export", "runs/nope", "out"), "runs/nope: no such model or run folder"),
    "data.img_size=-3": Case(("train", "r.yaml", "--out", "run", "--set", "data.img_size=-3"),
                             "data.img_size: must be positive, got -3"),
    "model.img_size=-3": Case(("train", "r.yaml", "--out", "run", "--set", "model.img_size=-3"),
                              "model.img_size: must be positive, got -3"),
    "train FOLDER": Case(("train", "notes"), "recipe notes is a folder, not a YAML file"),
    "train a binary recipe": Case(("train", "img.png"), "img.png: not a YAML text file"),
    "bench --json FOLDER": Case(("bench", "vit_tiny_patch16_224", "--json", "notes"), "--json notes is a folder"),
    "swin_tiny: the variant it abbreviates": Case(("predict", "img.png", "--model", "swin_tiny"),
                                                  "did you mean swin_tiny_patch4_window7_224?"),
    "vit_tiny: the variants with weights": Case(("train", "r.yaml", "--out", "run", "--set", "model.name=vit_tiny"),
                                                "did you mean vit_tiny_patch16_224 or vit_tiny_patch16_384? "
                                                "(`vitkit models 'vit_tiny*'` lists all", absent="pvt_tiny"),
    "a misspelt name: difflib": Case(("convert", "model", "out", "--model", "deit_tiny_patch16_244"),
                                     "did you mean deit_tiny_patch16_224"),
}

def _setup(folder: Path, model_dir: Path) -> None:
    """The files the cases refer to, in every case's folder (each case gets its own copy)."""
    import shutil
    (folder / "r.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False))  # model first, as recipes are written
    (folder / "cifar.yaml").write_text(yaml.safe_dump(_cifar_recipe("no_cifar_here")))
    shutil.copytree(model_dir, folder / "model")
    shutil.copytree(model_dir, folder / "other")
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.txt").write_text("mine")
    (folder / "empty").mkdir()
    from PIL import Image
    Image.new("RGB", (16, 16), (120, 30, 200)).save(folder / "img.png")
    existing = folder / "existing"  # a run that got somewhere
    existing.mkdir()
    (existing / "config.yaml").write_text(yaml.safe_dump(RECIPE))
    (existing / "summary.json").write_text('{"status": "completed"}')
    for name in ("damaged", "no_last"):
        run = folder / name
        shutil.copytree(model_dir, run / "checkpoints" / ("last" if name == "damaged" else "best"))
        (run / "config.yaml").write_text(yaml.safe_dump(RECIPE))
        (run / "metrics.csv").write_text("epoch,step\n0,2\n")
    (folder / "damaged" / "checkpoints" / "last" / "train_state.json").write_text('{"format": 1, "state": {"st')


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


# Runs the cases like `python -m vitkit ARGS` in a fresh process each, without paying the torch import per case: the
# driver imports vitkit (and torch) once, then forks a child per case that changes into the case's folder, points
# stdout/stderr at files and calls the CLI's main(); an exception main() lets through prints its traceback, as the
# interpreter would. (The parent runs no torch operation before forking, so no thread pool is copied mid-use.)
DRIVER = r"""
import json, os, sys, traceback
import vitkit.cli.main as cli
import vitkit.train, vitkit.evaluate, vitkit.weights, vitkit.cli.convert
cli.build_parser()
codes = {}
for name, folder, argv in json.load(sys.stdin):
    pid = os.fork()
    if pid == 0:
        os.chdir(folder)
        for fd, path in ((1, "stdout.txt"), (2, "stderr.txt")):
            out = os.open(os.path.join(folder, "..", os.path.basename(folder) + "." + path),
                          os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, fd)
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    codes[name] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(codes))
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every case; ``{case id: (exit status, stderr, files before, files after)}``."""
    base = tmp_path_factory.mktemp("cli_errors")
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16_224", patch_size=4, depth=1, embed_dim=24, num_heads=2,
                                img_size=16, num_classes=10)
    vitkit.save_pretrained(model, base / "model_src")
    jobs, before = [], {}
    for i, (name, case) in enumerate(CASES.items()):
        folder = base / f"case{i}"
        folder.mkdir()
        _setup(folder, base / "model_src")
        before[name] = _snapshot(folder)
        jobs.append((name, str(folder), list(case.argv)))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(jobs), capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: (codes[name], (base / f"{Path(folder).name}.stderr.txt").read_text(), before[name],
                   _snapshot(Path(folder))) for name, folder, _ in jobs}


@pytest.mark.parametrize("name", list(CASES))
def test_user_mistake_is_one_line(results, name):
    case = CASES[name]
    if case.needs_no_cuda and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, stderr, before, after = results[name]
    lines = stderr.splitlines()
    assert code == 2, stderr
    assert "Traceback" not in stderr
    if case.loads_model:
        assert lines and lines[0].startswith("loaded ") and sum("error" in line for line in lines) == 1, stderr
        lines = lines[-1:]
    assert len(lines) == 1, stderr
    command = case.argv[0] if not case.argv[-1].startswith("--nonsense") else ""
    assert lines[0].startswith(f"vitkit {command}".rstrip() + ": error: "), lines[0]
    assert case.expected in lines[0], lines[0]
    if case.absent:
        assert case.absent not in lines[0]
    assert after == before, "the folder changed: " + ", ".join(sorted(set(after) ^ set(before)) or
                                                               [k for k in after if after[k] != before.get(k)])


def test_a_model_called_on_one_image_says_the_expected_shape():
    model = vitkit.create_model("vit_tiny_patch16_224", depth=1).eval()
    with pytest.raises(ValueError, match=r"expected a batch of images of shape \(B, 3, H, W\), got a tensor of "
                                         r"shape \(3, 224, 224\); add a batch dimension"):
        model(torch.zeros(3, 224, 224))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got a tensor of shape \(2, 1, 224, 224\)"):
        model.forward_intermediates(torch.zeros(2, 1, 224, 224))


def test_offline_cifar_download_says_where_to_put_the_files(tmp_path):
    """A download that cannot connect (a closed port on this machine) names the URL, the folder and the --set."""
    import socket

    from vitkit.data import CIFAR10
    from vitkit.data.download import DownloadError
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as e:
        CIFAR10(tmp_path, "train", download=True, url=f"http://127.0.0.1:{port}/cifar-10-python.tar.gz",
                progress=False)
    message = str(e.value)
    assert "Offline?" in message and "cifar-10-python.tar.gz" in message and "--set data.root=DIR" in message
    assert "\n" not in message
    with pytest.raises(FileNotFoundError, match="--set data.download=true"):
        CIFAR10(tmp_path, "test")


def test_a_bad_image_in_predict_is_reported_once(tmp_path, capfd):
    """The error row is the report: no second copy as a log warning."""
    from vitkit.cli.main import main
    model = vitkit.create_model("vit_tiny_patch16_224", patch_size=4, depth=1, embed_dim=24, num_heads=2,
                                img_size=16, num_classes=3)
    vitkit.save_pretrained(model, tmp_path / "m")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    from PIL import Image
    Image.new("RGB", (16, 16)).save(tmp_path / "good.png")
    assert main(["predict", str(tmp_path / "bad.png"), str(tmp_path / "good.png"), "--pretrained",
                 str(tmp_path / "m")]) == 0
    out, err = capfd.readouterr()
    assert out.count("error: ") == 1 and "cannot identify" in out  # one error row ...
    assert "bad.png" not in err  # ... and no warning repeating it


def test_model_filters_ignore_case(capsys):
    """`vitkit models 'Swin*'` lists the Swin variants, as timm's filter would."""
    from vitkit.cli.main import main
    assert vitkit.list_models("Swin*") == vitkit.list_models("swin*") != []
    assert main(["models", "Swin*", "--format", "csv"]) == 0
    names = [line.split(",")[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names == vitkit.list_models("swin*")
