"""The benchmark's FLOP counts (its GFLOP/s and "ratio at peak" columns rest on them)."""
import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from jaxconv.bench import model_macs, torch_lenet5


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "resnet18", "resnet50", "resnext50_32x4d",
                                  "densenet121", "googlenet", "efficientnet_b0"])
def test_inference_macs_are_torchvisions(name):
    # torchvision publishes its ImageNet weights' forward cost in GMACs ("GFLOPS" in its
    # docs) to three decimals; GoogLeNet's auxiliary heads (8.4M MACs) run in training
    # only and are not in it
    published = torchvision.models.get_model_weights(name).IMAGENET1K_V1.meta["_ops"]
    assert round(model_macs(name)[0] / 1e9, 3) == published


@pytest.mark.parametrize("name", ["lenet5", "alexnet", "resnet18", "googlenet"])
def test_train_step_flops_match_torchs_flop_counter(name):
    # torch counts what its train step runs: the forward (GoogLeNet's auxiliary heads
    # included), every weight gradient and every input gradient that autograd needs (none
    # for the image's own). (Its counter is no reference for grouped convolutions'
    # gradients: it counts EfficientNet-B0's backward as 14x what the forward's depthwise
    # layers can need.)
    extra = {"init_weights": False} if name == "googlenet" else {}    # counts need no initialisation
    model = torch_lenet5() if name == "lenet5" else getattr(torchvision.models, name)(**extra)
    x = torch.zeros((2, 1, 28, 28) if name == "lenet5" else (2, 3, 224, 224))
    counter = FlopCounterMode(display=False)
    with counter:
        out = model.train()(x)
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    flops = 2 * model_macs(name)[1] * x.shape[0]
    assert abs(counter.get_total_flops() - flops) / flops < 0.005


def test_a_failing_model_is_reported_and_every_finished_one_is_saved_as_it_ends(tmp_path, monkeypatch, capsys):
    import json

    from jaxconv import bench

    out = tmp_path / "bench.json"
    saved_before = {}

    def fake_bench_model(name, args):
        if name == "alexnet":
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        if name == "resnet18":  # by now the file holds the models that finished
            saved_before[name] = json.loads(out.read_text())
        ratio = {"jax": 2.0, "torch": 1.0}
        return {"model": name, "infer1": ratio, "infer16": ratio, "train32": ratio, "train_batch": 32,
                "gmacs": 1.0, "train_gmacs": 3.0}

    monkeypatch.setattr(bench, "bench_model", fake_bench_model)
    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype: {"jax": 100.0, "torch": 90.0})
    rc = bench.main(["--models", "lenet5", "alexnet", "resnet18", "--no-epoch", "--no-compile-time",
                     "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 1
    partial = saved_before["resnet18"]
    assert [r["model"] for r in partial["rows"]] == ["lenet5"] and not partial["complete"]
    assert "RESOURCE_EXHAUSTED" in partial["failed"]["alexnet"]
    final = json.loads(out.read_text())
    assert [r["model"] for r in final["rows"]] == ["lenet5", "resnet18"] and final["complete"]
    assert "alexnet FAILED" in printed and "FAILED (left out of the table): alexnet" in printed
    table_lines = [line for line in printed.splitlines() if line.startswith(("lenet5", "alexnet", "resnet18"))]
    assert [line.split()[0] for line in table_lines] == ["lenet5", "resnet18"]
    assert not (tmp_path / "bench.json.tmp").exists()


def test_asking_for_a_gpu_where_a_side_has_none_is_a_clear_error(capsys):
    import jax

    from jaxconv import bench
    if torch.cuda.is_available() and any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("both sides see a GPU here")
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--device", "gpu", "--models", "lenet5", "--no-epoch", "--no-compile-time"])
    assert exit_.value.code == 2
    assert "--device gpu: no GPU visible to" in capsys.readouterr().err


def test_each_ratio_comes_with_its_range_within_single_rounds():
    from jaxconv import bench

    # torch ran 2 s a call in both rounds; jaxconv 1 s in the first and 4 s in the second
    # (a moment of load), its 4-steps call 2 s and 4 s: per round, 2.0x and 0.5x; 4.0x and 2.0x
    v = bench.figure({"jax": [1.0, 4.0], "jax_steps": [2.0, 4.0], "torch": [2.0, 2.0]},
                     {"jax": 8, "jax_steps": 32, "torch": 8})
    assert v["jax"] == 8 / 2.5 and v["torch"] == 4.0 and v["jax_steps"] == 32 / 3.0
    assert v["round_ratios"] == {"jax": [2.0, 0.5], "jax_steps": [4.0, 2.0]}
    assert bench._ratio(v) == "0.80x (0.50-2.00)"
    assert bench._ratio(v, "jax_steps") == "2.67x (2.00-4.00)"
    assert bench._ratio({"jax": 3.0, "torch": 2.0}) == "1.50x"      # one round: no range
