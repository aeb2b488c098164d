"""jaxconv.runtime: XLA flags and glibc's malloc parameters set on import (before JAX's
backend starts), the user's settings win, each can be switched off, and the persistent
compilation cache fills."""
import json
import os
import subprocess
import sys

import pytest

from jaxconv import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REPORT = """
import json, os, warnings
warnings.simplefilter("always")
{before}
import jaxconv, jax
print(json.dumps({{"XLA_FLAGS": os.environ.get("XLA_FLAGS"), "settings": jaxconv.runtime.settings(),
                  "cache_dir": jax.config.jax_compilation_cache_dir}}))
"""


def _python(program, env_extra, cache=None):
    """Run ``program`` in a fresh interpreter with none of the settings jaxconv.runtime reads
    (the compilation cache off unless ``cache``), plus ``env_extra``; its last line of
    output, as JSON, and its stderr."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "JAXCONV_XLA_FLAGS", "JAXCONV_COMPILATION_CACHE",
                        "JAXCONV_MALLOC", "GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MALLOC_")}
    env["JAXCONV_COMPILATION_CACHE"] = str(cache) if cache else "0"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _run(env_extra, before="", cache=None):
    return _python(REPORT.format(before=before), env_extra, cache)


needs_flag = pytest.mark.skipif(not runtime.xla_knows_flag(runtime.YNN_FLAG),
                                reason="this jaxlib's XLA has no YNN fusion flag")


@needs_flag
def test_import_appends_the_flags_and_keeps_the_users_others():
    out, _ = _run({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert out["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", *runtime.default_flags()]
    assert out["settings"]["xla_flags"] == list(runtime.default_flags())


@needs_flag
def test_the_users_flag_wins():
    mine = f"{runtime.YNN_FLAG}=default"
    out, _ = _run({"XLA_FLAGS": mine})
    assert out["XLA_FLAGS"] == mine and out["settings"]["xla_flags"] == []


def test_flags_can_be_switched_off():
    out, _ = _run({"JAXCONV_XLA_FLAGS": "0"})
    assert out["XLA_FLAGS"] is None and out["settings"]["xla_flags"] == []


@needs_flag
def test_warns_and_changes_nothing_when_the_backend_is_already_up():
    out, err = _run({}, before="import jax.numpy as jnp; jnp.ones(2).block_until_ready()")
    assert out["XLA_FLAGS"] is None
    assert "cannot take effect" in err


def test_unknown_flag_names_are_not_known():
    assert not runtime.xla_knows_flag("--xla_no_such_flag_in_any_xla")


def test_compilation_cache_fills_and_can_be_switched_off(tmp_path):
    cache = tmp_path / "xla"
    compile_something = ("import jax, jax.numpy as jnp\n"
                         "import jaxconv\n"
                         "m = jaxconv.get_model('resnet18', num_classes=10)\n"
                         "v = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))\n"
                         "jax.jit(m.apply)(v, jnp.ones((2, 32, 32, 3))).block_until_ready()\n")
    out, _ = _run({}, before=compile_something, cache=cache)
    assert out["cache_dir"] == str(cache) and out["settings"]["compilation_cache"] == str(cache)
    assert cache.is_dir() and any(cache.iterdir())
    off, _ = _run({"JAXCONV_COMPILATION_CACHE": "0"})
    assert off["cache_dir"] is None and off["settings"]["compilation_cache"] is None
    users = tmp_path / "users"
    kept, _ = _run({"JAX_COMPILATION_CACHE_DIR": str(users), "JAXCONV_COMPILATION_CACHE": str(cache)})
    assert kept["cache_dir"] == str(users)


def test_fusion_type_values_are_checked_and_the_first_known_one_is_used(monkeypatch):
    assert not runtime.xla_knows_flag(f"{runtime.YNN_FLAG}=no_such_fusion_type")
    if runtime.xla_knows_flag(f"{runtime.YNN_FLAG}=individual_dot"):
        assert runtime.default_flags() == (f"{runtime.YNN_FLAG}=individual_dot",)
    # a jaxlib whose XLA knows `dot` but not `individual_dot` gets `dot`; one that knows neither, nothing
    monkeypatch.setattr(runtime, "xla_knows_flag", lambda flag: flag.endswith("=dot"))
    assert runtime.default_flags() == (f"{runtime.YNN_FLAG}=dot",)
    monkeypatch.setattr(runtime, "xla_knows_flag", lambda flag: False)
    assert runtime.default_flags() == ()


FUSIONS = """
import json, re
import jax, jax.numpy as jnp
import jaxconv
model = jaxconv.get_model("resnet50", num_classes=10)
x = jnp.ones((2, 64, 64, 3))
variables = model.init(jax.random.key(0), x)


def loss(params, x):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                            mutable=["batch_stats"])
    return logits.sum()


hlo = jax.jit(jax.grad(loss)).lower(variables["params"], x).compile().as_text()
bodies = dict(re.findall(r"\\n(%[\\w.]+) [^\\n]*\\{\\n(.*?)\\n\\}", hlo, re.S))
entry = hlo[hlo.index("\\nENTRY"):]
ynn = [re.search(r"calls=(%[\\w.]+)", line).group(1) for line in entry.splitlines() if "__ynn_fusion" in line]
print(json.dumps({
    "ynn_ops": [sorted(set(re.findall(r"= \\S+ ([a-z-]+)\\(", bodies[c])) - {"parameter", "bitcast"}) for c in ynn],
    "full_size_broadcasts": [name for name, c in re.findall(r"(%[\\w.]+) = f32\\[\\d+,\\d+,\\d+,\\d+\\][^\\n]*"
                                                       r"calls=(%[\\w.]+)", entry)
                             if re.search(r"ROOT [^\\n]* broadcast\\(", bodies[c])],
}))
"""


@pytest.mark.skipif(not runtime.xla_knows_flag(f"{runtime.YNN_FLAG}=individual_dot"),
                    reason="this jaxlib's XLA has no individual_dot fusion type (jaxconv falls back to dot)")
def test_default_fusion_type_keeps_batchnorm_and_relu_in_xlas_loops():
    """With jaxconv's flag every YNNPACK fusion of ResNet-50's gradient is one matrix product.
    Under ``=dot`` a fusion grew over whole ResNet stages, convolutions included, and took
    each BatchNorm's scale and shift and each ReLU's zero as full-size inputs, written to
    memory first; with this code its fusions still take the adds and a BatchNorm's
    broadcast scale. (The gradient, not the inference program: ResNet-50's forward on CPU
    is XLA's convolutions only, the 1x1 ones and the classifier included, which no YNNPACK
    fusion takes; the gradients' matrix products are what it runs.)"""
    out, _ = _python(FUSIONS, {})
    assert out["ynn_ops"] and all(ops == ["dot"] for ops in out["ynn_ops"]), out["ynn_ops"]
    assert out["full_size_broadcasts"] == []


FAULTS = """
import json, resource, statistics
import jaxconv
import jax, jax.numpy as jnp
# XLA:CPU takes this program's buffers (32 MB and 16 MB) from malloc at every call
f = jax.jit(lambda x: (jnp.sin(x) @ x.T).sum())
x = jnp.ones((2048, 4096))
faults = []
for _ in range(30):  # with malloc keeping memory, the first few calls grow the heap until the buffers fit
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": statistics.median(faults), "settings": jaxconv.runtime.settings()}))
"""


def _faults(env_extra):
    return _python(FAULTS, env_extra)[0]


@pytest.mark.skipif(runtime._glibc() is None, reason="malloc parameters are set on glibc only")
def test_malloc_on_request_keeps_xlas_buffers_so_calls_take_no_page_faults():
    default, on = _faults({}), _faults({"JAXCONV_MALLOC": "1"})
    assert default["settings"]["malloc"] == {}
    assert on["settings"]["malloc"] == {"M_ARENA_MAX": 1, "M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1}
    # glibc's default maps and unmaps both buffers at every call: 12,288 pages of 4 kB
    assert default["faults"] > 8000, default
    assert on["faults"] < default["faults"] / 20, (on, default)
    assert _faults({"JAXCONV_MALLOC": "0"})["settings"]["malloc"] == {}


@pytest.mark.parametrize("users", [{"MALLOC_ARENA_MAX": "4"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"},
                                   {"LD_PRELOAD": "libjemalloc.so.2"}])
def test_the_users_malloc_settings_win(users):
    # (the preloaded name need not exist: the loader says so and goes on)
    out, _ = _run({"JAXCONV_MALLOC": "1", **users})
    assert out["settings"]["malloc"] == {}
    assert next(iter(users)) in out["settings"]["note"]
