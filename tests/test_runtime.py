"""`--runtime` of predict, eval and bench: an exported model behind the same commands gives the eager model's answers
(fp32), and bench times every runtime in the same interleaved rounds as transformers."""
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
