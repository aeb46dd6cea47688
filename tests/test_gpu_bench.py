"""bench/gpu_train.py: the CPU smoke run writes every figure; a CUDA request without CUDA
is one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    from bench import gpu_train

    return gpu_train


@pytest.mark.slow
def test_cpu_smoke_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_train-cpu.json"
    args = ["--device", "cpu", "--presets", "tiny", "--objectives", "inst+mlm+kl+amf"]
    args += ["--batch", "4", "--image-size", "64", "--steps", "1", "--warmup", "0"]
    args += ["--embed-batch", "4", "--text-batch", "8", "--threads", "1", "--out", str(out)]
    assert _bench().main(args) == 0
    report = json.loads(out.read_text())
    (train,) = report["train"]
    assert train["objectives"] == "inst+mlm+kl+amf" and train["pairs_per_s"] > 0
    assert train["gflop_per_pair"] > 0 and 0 < train["fraction_of_peak"] < 1
    assert train["peak_memory_gib"] > 0
    (embed,) = report["embed"]
    assert embed["images_per_s"] > 0 and embed["captions_per_s"] > 0
    assert embed["onnxruntime"]["provider"] == "CPUExecutionProvider"
    assert report["peak_source"] == "measured matmul" and report["command"].startswith("python")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_cuda_request_without_cuda_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^bench/gpu_train.py: no CUDA device \(torch "):
        _bench().main(["--device", "cuda", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_flops_count_attention_on_every_backend():
    # The bench counts FLOPs under the math attention kernel: the fused ones are invisible
    # to the counter on CPU.
    bench = _bench()
    q = torch.randn(2, 4, 16, 8)
    with bench.sdpa_kernel(bench.SDPBackend.MATH), bench.count_flops() as f:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert f.get_total_flops() == 2 * (2 * 2 * 4 * 16 * 16 * 8)  # q k^T and (softmax) v


@pytest.mark.parametrize("groups", [1, 8])
def test_conv_backward_costs_two_forwards(groups):
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, groups=groups)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    with _bench().count_flops() as f:
        out = conv(x)
        forward = f.get_total_flops()
        out.sum().backward()
    assert forward == 2 * 2 * 16 * 100 * (8 // groups) * 9
    assert f.get_total_flops() == 3 * forward  # forward, grad input, grad weight
