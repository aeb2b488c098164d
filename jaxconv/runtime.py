"""Process-wide JAX settings that jaxconv applies when it is imported.

Three things, applied by ``import jaxconv`` and each under the user's control (this module runs
first, before anything in jaxconv touches JAX's backend):

1. **XLA CPU flags.** ``--xla_cpu_experimental_ynn_fusion_type=individual_dot`` is
   appended to ``XLA_FLAGS`` (``=dot`` with a jaxlib that does not know that value):
   each matrix product runs as its own YNNPACK call, and everything else (convolutions,
   elementwise work) takes XLA's own CPU path.

   * XLA:CPU's default sends convolutions into YNNPACK fusions that are slow on x86 CPUs
     without AVX-512.
   * ``=dot`` (jaxconv's earlier choice) grows a YNNPACK fusion from each product through
     its neighbours, up to a whole ResNet stage with its convolutions. Operands that join
     such a fusion from below become full-size inputs: every BatchNorm scale and shift
     there and every ReLU's zero, broadcast to the activation's shape and written to
     memory first (ResNet-50, batch 16: ~300 ms of a 1.2 s inference).
   * ``individual_dot`` keeps XLA's fused elementwise loops. Measured against ``=dot``
     in one process, batch 16: ResNet-50 inference 1161 -> 896 ms, VGG-16 3332 -> 2723
     ms, DenseNet-121 974 -> 785 ms. Train steps did not change, except DenseNet-121's
     (5-6% longer) and GoogLeNet's, which needed ``layers.fan_out``. Figures are in
     ``BENCHMARKS.md``.
   * The flag only concerns the CPU compiler; on a GPU it is parsed and ignored.

   * A flag that ``XLA_FLAGS`` already mentions is left as the user set it.
   * ``JAXCONV_XLA_FLAGS=0`` leaves ``XLA_FLAGS`` alone altogether.
   * XLA aborts the process on an unknown flag or value, so a flag is only added when
     the installed jaxlib's XLA knows its name and, for the fusion type, the value
     (both checked in jaxlib's shared library).
   * XLA reads ``XLA_FLAGS`` once, when JAX initialises its first backend. If that has
     already happened when jaxconv is imported (a JAX computation ran before
     ``import jaxconv``), the flags cannot take effect: a warning says so and nothing is
     changed. Import jaxconv first, or set ``XLA_FLAGS`` yourself.

2. **On request, glibc's malloc keeps the memory it frees** (``JAXCONV_MALLOC=1``; Linux
   with glibc only; off by default). XLA:CPU takes each call's buffers from ``malloc``
   (ResNet-50's inference at batch 16: ~260 MB; its train step at batch 32: ~4 GB) and
   frees them after. glibc serves such sizes as fresh memory maps, or from a thread's own
   arena, and hands them back to the system when freed, so every call pays the kernel's
   page faults again: on a 2-core CPU, ResNet-50 takes 66,000 faults an inference at
   batch 16 and ~770,000 a train step at batch 32, DenseNet-121 a million a train step
   (2.4 s of system time). With ``JAXCONV_MALLOC=1`` jaxconv sets, through ``mallopt``:
   one arena (``M_ARENA_MAX=1``), no memory maps for large blocks (``M_MMAP_MAX=0``) and
   no trimming (``M_TRIM_THRESHOLD`` = -1, which glibc reads as the largest size). Any
   two of the three leave the faults. Train steps at batch 32: ResNet-50 6.8 -> 5.9 s,
   DenseNet-121 6.3 -> 4.9 s (``BENCHMARKS.md``).

   * Why it is not the default: the process keeps what it has freed for reuse instead of
     handing it back to the system, and blocks that no longer fit the holes grow it
     (DenseNet-121's train step settles at 9.8 GB resident against 5.8 GB); all threads
     share one malloc lock; and it is process-wide: PyTorch in the same process gains
     too (more than jaxconv in most of the benchmark's rows).
   * Threads that got an arena of their own before ``import jaxconv`` (NumPy's BLAS
     threads, PyTorch's) keep it, and their blocks over 64 MB are still memory-mapped:
     import jaxconv before anything that starts threads.
   * Any ``MALLOC_*`` variable or ``glibc.malloc`` tunable in ``GLIBC_TUNABLES`` that the
     user set, and a preloaded library (``LD_PRELOAD``, e.g. another allocator), wins:
     jaxconv then leaves malloc alone.

3. **Persistent compilation cache.** JAX's compilation cache is switched on, in
   ``$JAXCONV_COMPILATION_CACHE`` if that is a path, else
   ``$XDG_CACHE_HOME/jaxconv/xla`` (``~/.cache/jaxconv/xla``). Programs that took at
   least 0.1 s to compile are cached whatever their size, so a second process gets
   ResNet-50's train step from disk instead of recompiling it. A cache directory the
   user configured for JAX (``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is kept;
   ``JAXCONV_COMPILATION_CACHE=0`` leaves JAX's cache settings alone. The cache only
   stores compiled programs keyed by the program, the flags and the versions: it never
   changes a result.

:func:`settings` tells what was applied in this process.
"""
from __future__ import annotations

import functools
import mmap
import os
import warnings
from typing import Any

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# the YNNPACK fusion types jaxconv would set, best first: the first one the installed
# jaxlib's XLA knows is used (older ones know ``dot`` but not ``individual_dot``)
YNN_FUSION_TYPES = ("individual_dot", "dot")
# how XLA names an enum flag's values in its protobuf descriptor (in jaxlib's library)
_ENUM_VALUE_PREFIX = {YNN_FLAG: "LIBRARY_FUSION_TYPE_"}
MIN_COMPILE_SECS = 0.1
_OFF = ("0", "false", "no", "off", "")

# glibc's mallopt parameters (malloc.h) and the values jaxconv sets (module docstring)
MALLOPT = {"M_ARENA_MAX": (-8, 1), "M_MMAP_MAX": (-4, 0), "M_TRIM_THRESHOLD": (-1, -1)}

_applied: dict[str, Any] = {"xla_flags": [], "malloc": {}, "compilation_cache": None, "note": ""}


def _disabled(var: str) -> bool:
    value = os.environ.get(var)
    return value is not None and value.strip().lower() in _OFF


def default_cache_dir() -> str:
    """Where jaxconv puts JAX's compilation cache unless told otherwise."""
    explicit = os.environ.get("JAXCONV_COMPILATION_CACHE", "").strip()
    if explicit and explicit.lower() not in _OFF and explicit.lower() not in ("1", "true", "yes", "on"):
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxconv", "xla")


@functools.cache
def xla_knows_flag(flag: str) -> bool:
    """Whether the installed jaxlib's XLA defines ``flag`` (e.g. ``--xla_foo`` or
    ``--xla_foo=value``; the value is checked for the enum flags jaxconv sets).

    XLA aborts on an unknown name or enum value in ``XLA_FLAGS``, and flags marked
    experimental come and go between releases. Flag names are stored as C strings in
    jaxlib's shared library and enum values as names in XLA's protobuf descriptors, so
    look there (a memory-mapped search, milliseconds when present)."""
    import jaxlib

    name, _, value = flag.partition("=")
    wanted = [b"\x00" + name.lstrip("-").encode() + b"\x00"]
    if value and name in _ENUM_VALUE_PREFIX:
        wanted += [(_ENUM_VALUE_PREFIX[name] + v.strip().upper()).encode() for v in value.split(",")]
    folder = os.path.dirname(jaxlib.__file__)
    for lib in ("libjax_common.so", "xla_extension.so", "libjax_common.dylib"):
        path = os.path.join(folder, lib)
        if os.path.exists(path):
            with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return all(m.find(w) >= 0 for w in wanted)
    return False


def default_flags() -> tuple[str, ...]:
    """The flags jaxconv appends to ``XLA_FLAGS``: the YNN fusion flag with the first of
    :data:`YNN_FUSION_TYPES` that this jaxlib's XLA knows (nothing if it knows none)."""
    for fusion_type in YNN_FUSION_TYPES:
        flag = f"{YNN_FLAG}={fusion_type}"
        if xla_knows_flag(flag):
            return (flag,)
    return ()


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # private API: if it moved, assume the backend is not up yet
        return False


def _flag_names(flags: str) -> set[str]:
    return {f.split("=")[0] for f in flags.split() if f.startswith("--")}


def _configure_flags() -> None:
    if _disabled("JAXCONV_XLA_FLAGS"):
        _applied["note"] += "XLA flags disabled by JAXCONV_XLA_FLAGS. "
        return
    current = os.environ.get("XLA_FLAGS", "")
    present = _flag_names(current)
    if YNN_FLAG in present:
        return
    usable = list(default_flags())
    if not usable:
        _applied["note"] += f"{YNN_FLAG} skipped: this jaxlib's XLA knows none of {YNN_FUSION_TYPES}. "
        return
    if _backends_initialized():
        warnings.warn(f"jaxconv: JAX's backend was initialised before jaxconv was imported, so its XLA "
                      f"flags ({' '.join(usable)}) cannot take effect in this process; import jaxconv "
                      f"before running any JAX computation, or set XLA_FLAGS yourself "
                      f"(JAXCONV_XLA_FLAGS=0 silences this).", RuntimeWarning, stacklevel=3)
        _applied["note"] += "backend already initialised: XLA flags not applied. "
        return
    os.environ["XLA_FLAGS"] = " ".join([current.strip(), *usable]).strip()
    _applied["xla_flags"] = usable


def _glibc():
    """The process's C library through ctypes, if it is glibc (else None)."""
    import ctypes
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows, musl)
        return None
    return libc


def _configure_malloc() -> None:
    if os.environ.get("JAXCONV_MALLOC") is None or _disabled("JAXCONV_MALLOC"):
        return
    users = sorted(k for k in os.environ if k.startswith("MALLOC_"))
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        users.append("GLIBC_TUNABLES")
    if os.environ.get("LD_PRELOAD", "").strip():
        users.append("LD_PRELOAD")
    if users:
        _applied["note"] += f"malloc left as the user set it ({', '.join(users)}). "
        return
    libc = _glibc()
    if libc is None:
        _applied["note"] += "JAXCONV_MALLOC ignored: the C library is not glibc. "
        return
    for name, (param, value) in MALLOPT.items():
        if libc.mallopt(param, value) != 1:
            _applied["note"] += f"mallopt({name}, {value}) refused. "
            continue
        _applied["malloc"][name] = value


def _configure_cache() -> None:
    import jax

    if _disabled("JAXCONV_COMPILATION_CACHE"):
        _applied["note"] += "compilation cache left to JAX (JAXCONV_COMPILATION_CACHE=0). "
        return
    if jax.config.jax_compilation_cache_dir:
        _applied["compilation_cache"] = jax.config.jax_compilation_cache_dir
        _applied["note"] += "compilation cache directory set by the user, kept. "
        return
    path = default_cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        _applied["note"] += f"compilation cache off: cannot create {path} ({e}). "
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _applied["compilation_cache"] = path


def configure() -> dict[str, Any]:
    """Apply jaxconv's malloc parameters (where ``JAXCONV_MALLOC=1``), XLA flags and
    compilation cache (idempotent); see the module docstring. Called by ``import jaxconv``."""
    if not _applied.get("done"):
        _configure_malloc()
        _configure_flags()
        _configure_cache()
        _applied["done"] = True
    return settings()


def settings() -> dict[str, Any]:
    """What jaxconv applied in this process: ``xla_flags`` (the flags it appended),
    ``malloc`` (the ``mallopt`` parameters it set, name: value), ``compilation_cache``
    (the cache directory in use, or None) and ``note``."""
    return {k: (type(v)(v) if isinstance(v, (list, dict)) else v) for k, v in _applied.items() if k != "done"}


configure()
