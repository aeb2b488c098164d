"""jaxconv.train on one device: optimizers, losses, the loop, checkpoints and faults, CLI."""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxconv.train import checkpoint as ck
from jaxconv.train.distributed import to_host
from jaxconv.train.losses import cross_entropy, model_loss
from jaxconv.train.loop import TrainConfig, TrainingDiverged, train
from jaxconv.train.optim import OptimConfig, make_optimizer, make_schedule

SMALL = dict(model="lenet5", data="synthetic", data_options={"n": 96}, batch_size=16, steps=8, lr=0.05,
             log_every=4, progress=False, quiet=True, eval_every=-1, threads=1)


def _equal_trees(a, b) -> bool:
    return jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))


# ----------------------------------------------------------------------------- optimizers and losses

def test_schedules():
    step = make_schedule(OptimConfig(lr=1.0, schedule="step", milestones=(10, 20), gamma=0.1), 30)
    assert [float(step(i)) for i in (0, 9, 10, 19, 20)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    cos = make_schedule(OptimConfig(lr=2.0, schedule="cosine", warmup_steps=4), 14)
    assert [float(cos(i)) for i in (0, 2, 4, 9, 14)] == pytest.approx([0, 1.0, 2.0, 1.0, 0.0], abs=1e-6)


@pytest.mark.parametrize("name", ["sgd", "nesterov", "adamw"])
def test_weight_decay_leaves_bias_and_batchnorm_out(name):
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones((2,))}, "bn": {"scale": jnp.ones((2,))}}
    zero = jax.tree.map(jnp.zeros_like, params)
    for decay_all in (False, True):
        tx, _ = make_optimizer(OptimConfig(optimizer=name, lr=0.1, weight_decay=0.5, decay_bn_bias=decay_all,
                                           schedule="constant"), 10)
        updates, _ = tx.update(zero, tx.init(params), params)
        assert float(jnp.abs(updates["conv"]["kernel"]).max()) > 0
        moved = float(jnp.abs(updates["conv"]["bias"]).max()) + float(jnp.abs(updates["bn"]["scale"]).max())
        assert (moved > 0) == decay_all


def test_label_smoothing_and_aux_losses():
    logits = jnp.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    labels = jnp.array([0, 2])
    logp = jax.nn.log_softmax(logits)
    a = 0.1
    target = (1 - a) * jax.nn.one_hot(labels, 3) + a / 3       # torch's definition
    np.testing.assert_allclose(cross_entropy(logits, labels, a), -(target * logp).sum(-1), rtol=1e-6)
    aux1, aux2 = logits * 0.5, logits[::-1]
    main = cross_entropy(logits, labels).mean()
    loss, out = model_loss("googlenet", (logits, aux1, aux2), labels)
    expect = main + 0.3 * cross_entropy(aux1, labels).mean() + 0.3 * cross_entropy(aux2, labels).mean()
    assert float(loss) == pytest.approx(float(expect), rel=1e-6) and out is logits
    loss, _ = model_loss("inception_v3", (logits, aux1), labels)
    assert float(loss) == pytest.approx(float(main + 0.4 * cross_entropy(aux1, labels).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="inception_v3 returned 2 auxiliary outputs"):
        model_loss("inception_v3", (logits, aux1, aux2), labels)
    assert float(model_loss("lenet5", logits, labels)[0]) == pytest.approx(float(main))


# ----------------------------------------------------------------------------- the loop

def test_train_learns_and_writes_outputs(tmp_path):
    r = train(TrainConfig(**dict(SMALL, steps=None, epochs=3, eval_every=1, optimizer="adamw", lr=3e-3,
                                 data_options={"n": 256}, keep=2)), out=str(tmp_path / "run"))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tests = [x for x in records if x["split"] == "test"]
    assert len(tests) == 3 and tests[-1]["top1"] > 0.5 and tests[-1]["top1"] == r.test["top1"]
    assert {"loss", "accuracy", "lr", "images_per_sec", "step", "epoch"} <= set(records[0])
    from PIL import Image
    with Image.open(run / "curves.png") as im:
        assert im.size == (960, 380) and len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 3
    from jaxconv.serialization import load_variables
    v = load_variables(run / "variables.npz")
    assert _equal_trees(v, r.variables())
    assert sorted(os.listdir(run / "checkpoints")) == ["32", "48"]   # one per epoch of 16 steps, the last 2 kept
    # the same data and run directory again without --resume: refused, nothing overwritten
    with pytest.raises(ck.CheckpointError, match="already holds checkpoints .*--resume"):
        train(TrainConfig(**SMALL), out=str(run))


def test_resume_is_bit_identical(tmp_path):
    cfg = TrainConfig(**dict(SMALL, checkpoint_every=3))
    straight = train(cfg, out=str(tmp_path / "a"))
    first = train(cfg, out=str(tmp_path / "b"), stop_after=4)
    assert first.step == 4 and sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["3", "4"]
    resumed = train(cfg, out=str(tmp_path / "b"), resume=True)
    assert resumed.step == 8
    assert _equal_trees(to_host(straight.state), to_host(resumed.state))
    # and the continued run's metrics continue the same curve
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [3, 4, 6, 8]


def _close_trees(a, b, rtol=1e-5, atol=1e-6) -> bool:
    return jax.tree.all(jax.tree.map(lambda x, y: np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol),
                                     a, b))


def test_steps_per_call_runs_the_same_steps(tmp_path, monkeypatch):
    from jaxconv.train import loop

    calls = []
    real = loop.make_train_steps

    def counting(*args, **kwargs):
        fn = real(*args, **kwargs)

        def call(state, metrics, images, labels):
            calls.append(len(images))
            return fn(state, metrics, images, labels)
        return call

    monkeypatch.setattr(loop, "make_train_steps", counting)
    loop._train_functions.cache_clear()
    # 96 images / 16 = 6 steps an epoch; logs and checkpoints every 7 steps, 14 in all: calls
    # of 3 steps must end at 6, 7, 12 and 14, so the loop runs 3-step calls for steps 1-3,
    # 4-6 and 8-10 and single steps for the rest
    base = dict(SMALL, steps=14, log_every=7, checkpoint_every=7, keep=10)
    one = train(TrainConfig(**base), out=str(tmp_path / "one"))
    assert calls == []
    three = train(TrainConfig(**dict(base, steps_per_call=3)), out=str(tmp_path / "three"))
    assert calls == [3, 3, 3]
    assert three.step == 14 and int(to_host(three.state.step)) == 14
    assert _close_trees(to_host(one.state.params), to_host(three.state.params))
    assert [h["step"] for h in three.history] == [h["step"] for h in one.history] == [6, 7, 12, 14]
    for a, b in zip(three.history, one.history):
        assert (a["loss"], a["accuracy"]) == pytest.approx((b["loss"], b["accuracy"]), rel=1e-4)
    assert sorted(os.listdir(tmp_path / "three" / "checkpoints"), key=int) == ["7", "14"]
    # stopped after step 8 (inside what would have been a call) and resumed
    calls.clear()
    part = train(TrainConfig(**dict(base, steps_per_call=3)), out=str(tmp_path / "part"), stop_after=8)
    assert part.step == 8 and calls == [3, 3]
    resumed = train(TrainConfig(**dict(base, steps_per_call=3)), out=str(tmp_path / "part"), resume=True)
    assert calls == [3, 3, 3]
    assert _close_trees(to_host(three.state.params), to_host(resumed.state.params))
    with pytest.raises(ValueError, match="--steps-per-call 0: must be at least 1"):
        train(TrainConfig(**dict(base, steps_per_call=0)), out=str(tmp_path / "zero"))
    assert not (tmp_path / "zero").exists()


def test_make_train_steps_matches_single_steps():
    from jaxconv.data.datasets import get_dataset
    from jaxconv.train.distributed import data_mesh
    from jaxconv.train.loop import setup_model
    from jaxconv.train.state import init_state
    from jaxconv.train.step import make_train_step, make_train_steps, zero_metrics

    ds = get_dataset("synthetic", "train", n=48)
    setup = setup_model("lenet5", ds)
    tx = optax.sgd(0.05, momentum=0.9)
    mesh = data_mesh()
    state = init_state(setup.model, tx, 0, (28, 28, 1))
    rng = np.random.default_rng(0)
    images = tuple(jnp.asarray(rng.standard_normal((8, 28, 28, 1)), jnp.float32) for _ in range(3))
    labels = tuple(jnp.asarray(rng.integers(0, 10, 8), jnp.int32) for _ in range(3))
    copy = lambda t: jax.tree.map(jnp.array, t)
    one = make_train_step(setup.model, tx, "lenet5", mesh)
    a, ma = copy(state), zero_metrics()
    for x, y in zip(images, labels):
        a, ma = one(a, ma, x, y)
    three = make_train_steps(setup.model, tx, "lenet5", mesh, 3)
    b, mb = three(copy(state), zero_metrics(), images, labels)
    assert int(b.step) == 3
    assert _close_trees(to_host(a.params), to_host(b.params))
    assert _close_trees(to_host(ma), to_host(mb))
    with pytest.raises(ValueError, match="expected 3 batches of images and labels, got 2 and 2"):
        three(copy(state), zero_metrics(), images[:2], labels[:2])
    with pytest.raises(ValueError, match="steps per call must be at least 1, got 0"):
        make_train_steps(setup.model, tx, "lenet5", mesh, 0)


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite at step \d+ .*last good checkpoint is step \d+"):
        train(TrainConfig(**dict(SMALL, steps=40, lr=1e6, momentum=0.0, checkpoint_every=1, log_every=1)),
              out=str(tmp_path / "nan"))
    # the checkpoint it names restores, and holds finite parameters
    cfg_meta = json.loads((tmp_path / "nan" / "config.json").read_text())
    import orbax.checkpoint as ocp
    steps = ocp.CheckpointManager(str(tmp_path / "nan" / "checkpoints")).all_steps()
    assert steps and cfg_meta["total_steps"] == 40
    restored = ocp.CheckpointManager(str(tmp_path / "nan" / "checkpoints")).restore(
        max(steps), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))


def test_mismatched_checkpoint_directory(tmp_path):
    out = str(tmp_path / "run")
    train(TrainConfig(**SMALL), out=out, stop_after=2)
    with pytest.raises(ck.CheckpointError, match=r"different run \(optimizer: checkpoint has 'sgd', this run 'adamw'"):
        train(TrainConfig(**dict(SMALL, optimizer="adamw")), out=out, resume=True)
    with pytest.raises(ck.CheckpointError, match=r"model: checkpoint has 'lenet5'"):
        train(TrainConfig(**dict(SMALL, model="resnet20")), out=out, resume=True)
    before = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert before == ["2"]
    stray = tmp_path / "stray" / "checkpoints"
    stray.mkdir(parents=True)
    (stray / "my_notes.txt").write_text("mine")
    with pytest.raises(ck.CheckpointError, match="not empty and holds no jaxconv checkpoints .*my_notes.txt"):
        train(TrainConfig(**SMALL), out=str(tmp_path / "stray"))
    assert (stray / "my_notes.txt").read_text() == "mine"


def test_bfloat16_compute_float32_state(tmp_path):
    r = train(TrainConfig(**dict(SMALL, dtype="bfloat16")), out=str(tmp_path / "bf"), stop_after=3)
    leaves = jax.tree.leaves(to_host(r.state.params)) + jax.tree.leaves(to_host(r.state.opt_state))
    assert all(x.dtype == np.float32 for x in leaves if np.issubdtype(x.dtype, np.floating))
    x = jnp.zeros((2, 28, 28, 1), jnp.float32)
    out = r.model.apply(r.state.variables(), x)
    assert out.dtype == jnp.bfloat16
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(to_host(r.state.params)))
    # a BatchNorm model: after a bfloat16 step, parameters and statistics are still float32
    # (checked on the traced step with eval_shape: no compilation needed)
    from jaxconv.data.datasets import synthetic
    from jaxconv.train.loop import setup_model
    from jaxconv.train.state import init_state
    from jaxconv.train.step import train_step_fn, zero_metrics

    setup = setup_model("resnet20", synthetic("train", n=8, size=(16, 16)), dtype="bfloat16")
    tx, _ = make_optimizer(OptimConfig(), 10)
    state = jax.eval_shape(lambda: init_state(setup.model, tx, 0, (16, 16, 1)))
    step = train_step_fn(setup.model, tx, "resnet20", compute_dtype=setup.compute_dtype)
    new_state, _ = jax.eval_shape(step, state, zero_metrics(), jax.ShapeDtypeStruct((4, 16, 16, 1), jnp.float32),
                                  jax.ShapeDtypeStruct((4,), jnp.int32))
    stats = jax.tree.leaves(new_state.batch_stats)
    assert stats and all(s.dtype == jnp.float32 for s in stats + jax.tree.leaves(new_state.params))
    logits = jax.eval_shape(lambda v, x: setup.model.apply(v, x), new_state.variables(),
                            jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32))
    assert logits.dtype == jnp.bfloat16


def test_cli_train_and_eval(tmp_path, capsys):
    from jaxconv.cli import main

    out = str(tmp_path / "cli")
    assert main(["train", "--model", "lenet5", "--data", "synthetic", "--synthetic-size", "96", "--steps", "8",
                 "--batch-size", "16", "--lr", "0.05", "--threads", "1", "--out", out, "--no-progress", "--eval-every", "0",
                 "--steps-per-call", "4"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["steps_per_call"] == 4
    assert re.fullmatch(r"top1 \d\.\d{4} top5 \d\.\d{4}", last)
    assert main(["eval", "--model", "lenet5", "--data", "synthetic", "--weights",
                 os.path.join(out, "variables.npz")]) == 0
    again = capsys.readouterr().out.strip().splitlines()[-1]
    assert again == last          # the same variables on the same test split
    assert main(["eval", "--model", "lenet5", "--data", "synthetic", "--weights", str(tmp_path / "none.npz")]) == 2
    assert "no such variables file" in capsys.readouterr().err


def test_cli_choices_match_the_library():
    from jaxconv.cli import build_parser
    from jaxconv.data.augment import RECIPES
    from jaxconv.train.optim import OPTIMIZERS, SCHEDULES

    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    choices = {a.dest: tuple(a.choices) for a in sub._actions if a.choices}
    assert choices["augment"] == RECIPES and choices["optimizer"] == OPTIMIZERS and choices["schedule"] == SCHEDULES


# ----------------------------------------------------------------------------- the recorded real-data runs

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")


@pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION_MNIST, "t10k-images-idx3-ubyte.gz")),
                    reason="needs `apt-get install -y dataset-fashion-mnist` (scripts/test installs it)")
@pytest.mark.parametrize("model, weights, target", [
    ("lenet5", None, 0.905),                                   # issue 7: LeNet5, 10 epochs, >= 0.905
    ("resnet20", "resnet20_fashion_mnist.npz", 0.93),          # issue 7: a CIFAR-style ResNet, >= 0.93
])
def test_shipped_fashion_mnist_weights_reach_the_issue_targets(model, weights, target):
    from jaxconv.train.loop import evaluate

    r = evaluate(model, "fashion-mnist", weights=weights and os.path.join(WEIGHTS_DIR, weights), threads=1)
    assert r["count"] == 10_000
    assert r["top1"] >= target, (model, r)
