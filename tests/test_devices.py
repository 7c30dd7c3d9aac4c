"""The package's one device resolver: names checked early, devices resolved where they are used."""

from __future__ import annotations

import pytest
import torch

from singan_insert.devices import check_device, select_device
from singan_insert.errors import SinganInsertError
from singan_insert.integrations import _draw
from singan_insert.stages import _training


def test_check_device_keeps_the_name_and_leaves_cuda_to_the_resolver():
    assert check_device("auto") == "auto"
    assert check_device(torch.device("cpu")) == "cpu"
    assert check_device("cuda:3") == "cuda:3"  # a valid name, whether or not that GPU is there


@pytest.mark.parametrize("device, message", [
    ("gpu", "Unknown device 'gpu'; use 'auto', 'cpu' or 'cuda\\[:n\\]'"),
    (None, "device must be a string such as 'cpu' or 'cuda:0', got None"),
    (0, "device must be a string"),
])
def test_check_device_refuses_what_is_not_a_device_name(device, message):
    with pytest.raises(SinganInsertError, match=message):
        check_device(device)


def test_select_device_resolves_auto_and_reports_names_as_check_device_does():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device().type == select_device("auto").type == expected
    assert select_device("cpu", local_rank=1) == torch.device("cpu")
    with pytest.raises(SinganInsertError, match="Unknown device 'gpu'; use 'auto', 'cpu' or 'cuda"):
        select_device("gpu")
    if torch.cuda.is_available():
        assert select_device("cuda", local_rank=0) == torch.device("cuda", 0)
        assert select_device("cuda").index is None
    else:
        with pytest.raises(SinganInsertError, match="CUDA was requested but is not available"):
            select_device("cuda", local_rank=0)


def test_the_integrations_and_the_stages_use_the_one_implementation():
    assert _draw.check_device is check_device
    assert _training.select_device is select_device
