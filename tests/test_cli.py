"""The jaxconv command: list and summary (the seed's printed listings, torchvision's counts)."""
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchvision

import jaxconv
from jaxconv.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def section_params(text, section):
    match = re.search(rf"^  {section}: ([\d,]+) parameters", text, re.M)
    return int(match.group(1).replace(",", ""))


@pytest.mark.parametrize("name", ["alexnet", "vgg19"])
def test_summary_reports_torchvisions_classifier_and_total(capsys, name):
    code, out, _ = run_cli(capsys, "summary", name)
    assert code == 0
    tv = getattr(torchvision.models, name)()
    assert section_params(out, "classifier") == sum(p.numel() for p in tv.classifier.parameters())
    assert section_params(out, "features") == sum(p.numel() for p in tv.features.parameters())
    total = int(re.search(r"^total: ([\d,]+) parameters", out, re.M).group(1).replace(",", ""))
    assert total == sum(p.numel() for p in tv.parameters())
    assert "Conv2d(3, 64, kernel_size=" in out


@pytest.mark.parametrize("name", ["alexnet", "vgg11_bn"])
def test_summary_flops_match_torchs_flop_counter(capsys, name):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    code, out, _ = run_cli(capsys, "summary", name)
    flops = float(re.search(r"\(([\d.]+)G FLOPs\) per image", out).group(1)) * 1e9
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        getattr(torchvision.models, name)()(torch.zeros(1, 3, 224, 224))
    assert abs(counter.get_total_flops() - flops) / flops < 0.005


def test_list_and_unknown_names(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == jaxconv.list_models()
    code, _, err = run_cli(capsys, "summary", "alexnett")
    assert code == 2 and "unknown model 'alexnett'" in err and "alexnet" in err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "jaxconv.cli", "summary", "lenet5"], capture_output=True,
                         text=True, check=True).stdout
    assert "total: 44,426 parameters" in out  # 156 + 2416 + 30840 + 10164 + 850, the seed's listing


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_summary_macs_are_inferences_with_auxiliary_heads_listed(capsys, name):
    # torchvision's published cost is an eval-mode call's: the auxiliary heads (listed,
    # they hold parameters) run only in training and are left out of the MAC totals
    code, out, _ = run_cli(capsys, "summary", name)
    published = torchvision.models.get_model_weights(name).IMAGENET1K_V1.meta["_ops"]
    assert re.search(r"^total: [\d,]+ parameters, ([\d.]+)G MACs", out, re.M).group(1) == f"{published:.2f}"
    aux_rows = [line for line in out.splitlines() if line.strip().startswith(("aux", "AuxLogits"))]
    assert aux_rows and all(line.split()[-1] == "train" for line in aux_rows)
