"""The memory line after the first step (report.first_step_memory): the step's peak split into what was allocated
before it and the activations + workspace it added, and the host memory the offload flags hold."""

import re

import pytest
import torch

from surogate.cli.report import first_step_memory


def test_on_the_cpu_the_line_is_the_process_peak():
    line = first_step_memory(torch.device("cpu"), 0, 0)
    assert re.fullmatch(r"peak host memory \(RSS\) after the first step: \d+\.\d\d GB", line), line


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_peak_splits_into_resident_and_transient():
    device = torch.device("cuda")
    kept = torch.empty(300 * 2**20, dtype=torch.uint8, device=device)  # "weights": allocated before the step
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    transient = torch.empty(500 * 2**20, dtype=torch.uint8, device=device)  # "activations", freed by the end
    del transient
    line = first_step_memory(device, resident, 3 * 10**9)
    numbers = [float(x) for x in re.findall(r"(\d+\.\d\d) GB", line)]
    peak, before, added, host = numbers
    assert before == pytest.approx(resident / 1e9, abs=0.006) and before >= 0.31
    assert added == pytest.approx(500 * 2**20 / 1e9, abs=0.006)
    assert peak == pytest.approx(before + added, abs=0.011) and host == 3.0
    del kept
