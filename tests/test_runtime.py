"""`--runtime` of predict, eval and bench: an exported model behind the same commands gives the eager model's answers
(fp32), and bench times every runtime in the same interleaved rounds as transformers; a folder written by `vitkit
export` is a model for all three; an export that fails inside bench is one line."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import vitkit
from vitkit.cli.main import main

from conftest import randomize_


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    model = randomize_(vitkit.create_model("deit_tiny_patch16_224", **vitkit.get_spec("deit_tiny_patch16_224").tiny,
                                           num_classes=5)).eval()
    vitkit.save_pretrained(model, root / "model", class_names=[f"c{i}" for i in range(5)])
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        Image.fromarray((torch.rand(40, 44, 3, generator=g) * 255).byte().numpy()).save(root / f"img{i}.png")
    return root


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "torch-export"])
def test_predict_runtime_matches_eager(saved, runtime, capsys):
    images = [str(saved / f"img{i}.png") for i in range(3)]
    assert main(["predict", *images, "--pretrained", str(saved / "model"), "--format", "json", "--topk", "3"]) == 0
    eager = json.loads(capsys.readouterr().out)
    assert main(["predict", *images, "--pretrained", str(saved / "model"), "--format", "json", "--topk", "3",
                 "--runtime", runtime]) == 0
    exported = json.loads(capsys.readouterr().out)
    for a, b in zip(eager, exported):
        assert [t["index"] for t in a["topk"]] == [t["index"] for t in b["topk"]]
        assert [t["prob"] for t in a["topk"]] == pytest.approx([t["prob"] for t in b["topk"]], abs=1e-5)


def test_runtime_flag_errors_are_one_line(saved, capsys):
    image = str(saved / "img0.png")
    assert main(["predict", image, "--pretrained", str(saved / "model"), "--int8"]) == 2
    assert "--int8 needs --runtime onnxruntime" in capsys.readouterr().err
    assert main(["predict", image, "--pretrained", str(saved / "model"), "--runtime", "openvino", "--int8"]) == 2
    assert "use --runtime onnxruntime" in capsys.readouterr().err
    assert main(["bench", "deit_tiny_patch16_224", "--runtime", "tensorrt"]) == 2
    assert "choose from" in capsys.readouterr().err


def test_bench_times_runtimes_in_the_same_rounds(capsys, tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "deit_tiny_patch16_224", "--set", "depth=1", "--set", "embed_dim=48", "--set", "num_heads=3",
            "--img-size", "32", "--batch-size", "2", "--iters", "2", "--warmup", "1", "--probes", "0",
            "--compare", "transformers", "--runtime", "eager,onnxruntime,onnxruntime-int8", "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "onnxruntime / transformers images/s:" in text and "onnxruntime-int8 / transformers images/s:" in text
    cmp = json.loads(out.read_text())["comparison"]
    assert set(cmp["others"]) == {"onnxruntime", "onnxruntime-int8"}
    assert cmp["other_diffs"]["onnxruntime"] < 1e-4
    for result in (cmp["ours"], cmp["theirs"], *cmp["others"].values()):
        assert len(result["times_ms"]) == 2 and result["latency_ms_p99"] >= result["latency_ms_median"]


def test_an_export_folder_is_a_model(saved, tmp_path, capsys):
    """`vitkit export` writes a folder that predict, eval and bench run directly, without exporting again."""
    images = [str(saved / f"img{i}.png") for i in range(3)]
    assert main(["predict", *images, "--pretrained", str(saved / "model"), "--format", "json", "--topk", "3"]) == 0
    eager = json.loads(capsys.readouterr().out)
    assert main(["export", str(saved / "model"), str(tmp_path / "onnx")]) == 0
    capsys.readouterr()
    assert main(["predict", *images, "--model", str(tmp_path / "onnx"), "--format", "json", "--topk", "3"]) == 0
    exported = json.loads(capsys.readouterr().out)
    for a, b in zip(eager, exported):
        assert [t["label"] for t in a["topk"]] == [t["label"] for t in b["topk"]]  # class names from vitkit.json
        assert [t["prob"] for t in a["topk"]] == pytest.approx([t["prob"] for t in b["topk"]], abs=1e-5)
    assert main(["predict", images[0], "--model", str(tmp_path / "onnx"), "--runtime", "openvino"]) == 2
    assert "is a onnx export: it runs in onnxruntime, not openvino" in capsys.readouterr().err
    assert main(["predict", images[0], "--model", str(tmp_path / "onnx"), "--int8"]) == 2
    assert "int8 is chosen when exporting" in capsys.readouterr().err

    assert main(["bench", str(tmp_path / "onnx"), "--batch-size", "2", "--iters", "2", "--warmup", "1",
                 "--probes", "0", "--json", str(tmp_path / "bench.json")]) == 0
    assert "onnxruntime, fp32" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "bench.json").read_text())["result"]["times_ms"]) == 2
    assert main(["bench", str(tmp_path / "onnx"), "--set", "depth=1"]) == 2
    assert "is an exported model: it runs as exported, on the CPU; drop --set" in capsys.readouterr().err


def test_eval_runs_an_export_folder(tmp_path, capsys):
    model = randomize_(vitkit.create_model("deit_tiny_patch16_224", **vitkit.get_spec("deit_tiny_patch16_224").tiny,
                                           num_classes=10)).eval()
    vitkit.save_pretrained(model, tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "ov"), "--format", "openvino"]) == 0
    data = ["--set", "data.name=fake", "data.test_limit=24", "data.num_workers=0", "data.img_size=32"]
    metrics = {}
    for name, source in (("eager", [str(tmp_path / "model")]), ("exported", ["--model", str(tmp_path / "ov")])):
        assert main(["eval", *source, *data, "--amp", "none", "--out", str(tmp_path / name)]) == 0
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert "openvino fp32" in capsys.readouterr().out
    assert metrics["exported"]["top1"] == metrics["eager"]["top1"] and metrics["exported"]["num_samples"] == 24
    assert metrics["exported"]["runtime"] == "openvino fp32"


def test_a_failed_export_in_bench_is_one_line(monkeypatch, capsys):
    import vitkit.deploy.export as export_module

    def failing(model, path, opset):
        raise RuntimeError("Unsupported op aten::frobnicate\nwith a long second line")
    monkeypatch.setattr(export_module, "_write_onnx", failing)
    args = ["bench", "deit_tiny_patch16_224", "--set", "depth=1", "--set", "embed_dim=48", "--set", "num_heads=3",
            "--img-size", "32", "--probes", "0", "--runtime", "eager,onnxruntime", "--compare", "transformers"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("vitkit bench: error: --runtime onnxruntime: deit_tiny_patch16_224 could not be exported to "
                          "onnx: RuntimeError: Unsupported op aten::frobnicate")


_SIGNAL_AFTER_OPENVINO = """
import gc, os, signal, sys, threading, time
import torch
from vitkit.deploy.runtime import open_runtime
from vitkit.hardware import CPU_KINDS, simulate_cpu
for kind in CPU_KINDS:
    with simulate_cpu(kind):
        a, b = open_runtime(sys.argv[1]), open_runtime(sys.argv[1], runtime="openvino-bf16")
    a(torch.zeros(1, 3, 32, 32)), b(torch.zeros(1, 3, 32, 32))
    del a, b
    gc.collect()
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))  # a Python handler, as torch's SIGCHLD one or Ctrl-C's
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
time.sleep(1.5)  # the signal arrives during a blocking call
print("handled", got)
"""


def test_a_signal_after_openvino_runs_is_handled_not_a_segfault(tmp_path):
    """OpenVINO's compile_model installs an alternate signal stack of its own on the calling thread and unmaps it
    later; Python handles every signal on that stack, so the next signal (Ctrl-C, a child exiting) killed the process
    with SIGSEGV: the test suite itself died so, three times. The runtime restores the thread's own stack."""
    import subprocess
    import sys
    from vitkit.deploy.export import export_model
    model = vitkit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=1, num_classes=10).eval()
    export_model(randomize_(model), tmp_path / "ov", "openvino")
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_AFTER_OPENVINO, str(tmp_path / "ov")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "handled [1]", (proc.returncode, proc.stderr[-1000:])
