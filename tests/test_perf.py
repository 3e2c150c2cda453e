"""FLOPs per token, device peaks and MFU against hand counts."""

import pytest
import torch

from raygpt.model import GPTModel
from raygpt.training import perf


def test_matmul_params_are_the_linear_weights_of_the_model():
    model = GPTModel(embedding_dim=32, num_layers=2, num_heads=2, context_len=16, vocabulary_size=100)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert perf.matmul_params(32, 2, 100) == linear == 2 * 12 * 32 * 32 + 32 * 100 == 27_776


def test_flops_per_token_by_hand():
    # 6 * 27,776 + 12 * L(2) * d(32) * T(16)
    assert perf.flops_per_token(32, 2, 16, 100) == 6 * 27_776 + 12 * 2 * 32 * 16 == 178_944
    # GPT-2 small, context 1024: N = 12·12·768² + 768·50257 = 123,532,032; 6N + 12·12·768·1024
    assert perf.flops_per_token(768, 12, 1024, 50257) == 6 * 123_532_032 + 113_246_208 == 854_438_400


def test_mfu():
    assert perf.mfu(1000.0, 178_944, 1.78944e9) == 0.1
    assert perf.mfu(1000.0, 178_944, None) is None


def test_gpu_table_matches_names_as_torch_reports_them():
    assert perf.gpu_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert perf.gpu_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert perf.gpu_peak("NVIDIA H200", "bf16") == 989e12
    assert perf.gpu_peak("NVIDIA A100-SXM4-80GB", "tf32") == 156e12
    assert perf.gpu_peak("NVIDIA L40S", "bf16") == 362e12
    assert perf.gpu_peak("NVIDIA A10", "bf16") == 125e12


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA A10G", "bf16", 70e12),  # cluster.yaml's g5 GPU: half the A10's tensor rate
    ("NVIDIA A10G", "fp32", 31.2e12),
    ("NVIDIA GH200 480GB", "bf16", 989e12),  # the Hopper GPU of a Grace Hopper superchip
    ("Tesla T4", "bf16", 65e12),  # no bf16 tensor cores: the fp16 rate (auto picks fp32 there)
    ("Tesla T4", "fp32", 8.1e12),
    ("NVIDIA L40", "bf16", 181e12),
    ("NVIDIA L40S", "bf16", 362e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA B200", "bf16", 2250e12),
    ("NVIDIA H100 NVL", "bf16", 835e12),  # not the SXM's 989
    ("NVIDIA H200 NVL", "bf16", 835e12),
    ("NVIDIA H100 80GB HBM3", "tf32", 494e12),
])
def test_gpu_table_knows_the_gpus_people_rent(name, precision, peak):
    assert perf.gpu_peak(name, precision) == peak


def test_gpu_table_falls_back_to_fp16_and_unknowns_stay_unknown():
    assert perf.gpu_peak("Tesla V100-SXM2-16GB", "bf16") == 125e12  # fp16 tensor cores
    assert perf.gpu_peak("Some Future GPU", "bf16") is None


def test_cpu_peak_is_probed_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYGPT_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(perf, "measure_cpu_peak", lambda precision: calls.append(precision) or 1.5e11)
    assert perf.cpu_peak("fp32") == 1.5e11 and perf.cpu_peak("fp32") == 1.5e11
    assert calls == ["fp32"] and (tmp_path / "cpu_peak.json").is_file()
    assert perf.device_peak(torch.device("cpu"), "fp32") == 1.5e11
    assert perf.device_peak(torch.device("cpu"), "fp32", override_tflops=2.0) == 2e12
    # A refresh probes again and keeps the best: a probe on a busy machine never lowers the peak.
    monkeypatch.setattr(perf, "measure_cpu_peak", lambda precision: 1.0e11)
    assert perf.cpu_peak("fp32", refresh=True) == 1.5e11
    monkeypatch.setattr(perf, "measure_cpu_peak", lambda precision: 2.0e11)
    assert perf.cpu_peak("fp32", refresh=True) == 2.0e11 and perf.cpu_peak("fp32") == 2.0e11


def test_the_cpu_probe_measures_something_plausible():
    peak = perf.measure_cpu_peak("fp32", seconds=0.2, size=256)
    assert 1e8 < peak < 1e13
