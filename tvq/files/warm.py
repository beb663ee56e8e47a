"""Warm starts: compiled programs and parameters kept on disk between runs
(docs/DESIGN.md section 14).

JAX's persistent compilation cache skips XLA's compilation, but every process still
traces the Python function and lowers it to StableHLO before it can look the program up:
about a second for the decoding loop of the built-in model, and another 0.8 s goes to
importing orbax and restoring the parameters through it. With a cache folder switched on
(`enable`, done by the CLI), this module keeps

- the compiled executable of a jitted call, keyed by everything it depends on (the
  function, its static arguments, its arguments' shapes, dtypes and placement, tvq's
  source, the JAX and XLA versions and flags, the device), so a later process loads it
  without tracing anything (`call`);
- a model directory's parameters as one `.npz` of plain arrays, keyed by the directory's
  files (name, size, modification time), so a later process skips orbax (`params`).

Both are caches: anything missing, unreadable or stale is rebuilt the normal way and the
numbers never differ (the executables are the ones jit compiles). Writes are atomic
(a temporary file, then a rename), so processes that share the folder may start at once.
Without `enable` (the library's default) nothing is read or written.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import os
import pickle
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np

from tvq.files import cache
from tvq.files.atomic import write_atomically

PARAMS_LIMIT = 512 * 2**20  # bytes: larger models are read through orbax every time
KEEP = {"executables": 64, "params": 8}  # files kept per kind; the least recently used go

_folder: Path | None = None
_loaded: dict[tuple, Any] = {}  # a call's key → its compiled executable, in this process


def enable(folder: str | os.PathLike | None) -> None:
    """Keeps warm-start files under `folder` (None: switches them off)."""
    global _folder
    _folder = None if folder is None else Path(folder)
    _loaded.clear()


def enable_caches() -> None:
    """JAX's persistent compilation cache in the per-user cache folder's `jax/` (the rule
    of tvq/files/cache.py: under `$TVQ_CACHE_DIR`, else `$XDG_CACHE_HOME/tvq`, else
    ~/.cache/tvq), and this module's warm-start files beside it in `warm/` (traced
    programs, parameters): later processes start fast. What every front end calls first
    (the CLI, the llm plugin); the library alone writes nothing. A cache that cannot be
    made or written is skipped (it only costs speed). JAX writes its entries atomically,
    so processes that share a cache may start at the same time."""
    cache_dir = cache.cache_dir("jax")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    enable(cache.cache_dir("warm"))


def _write(path: Path, data: bytes) -> None:
    """Writes atomically, then drops the least recently used files of the folder beyond
    its KEEP (entries of older tvq sources and other models pile up otherwise). A folder
    that cannot be written only costs speed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: f.write(data))
    except OSError:  # a full disk: write_atomically leaves no half-written file behind
        return
    try:
        entries = sorted(path.parent.glob("[!.]*"), key=lambda p: p.stat().st_mtime_ns)
        for old in entries[: max(0, len(entries) - KEEP[path.parent.name])]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def _used(path: Path) -> None:
    """Marks an entry as just used (its modification time orders the pruning)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _digest(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


_environment: str | None = None


def environment() -> str:
    """What a compiled executable depends on beyond its own call: tvq's source, the JAX
    and XLA versions, flags and options, and the device it runs on."""
    global _environment
    if _environment is None:
        source = hashlib.sha256()
        for path in sorted(Path(__file__).parents[1].rglob("*.py")):
            source.update(path.read_bytes())
        device = jax.local_devices()[0]
        try:
            cpu = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
        except (OSError, IndexError):
            cpu = ""
        options = {name: getattr(jax.config, name) for name in (
            "jax_enable_x64", "jax_default_matmul_precision", "jax_disable_most_optimizations",
            "jax_numpy_rank_promotion", "jax_default_prng_impl", "jax_threefry_partitionable",
        ) if hasattr(jax.config, name)}  # fmt: skip
        _environment = _digest(
            source.hexdigest(), jax.__version__, jaxlib.__version__,
            jax.default_backend(), device.platform, device.device_kind,
            device.client.platform_version, jax.device_count(), jax.process_count(),
            os.environ.get("XLA_FLAGS", ""), sorted(options.items()), platform.machine(), cpu,
        )  # fmt: skip
    return _environment


def _signature(leaf: Any) -> tuple:
    """What a compiled executable needs of an argument: shape, dtype, weak type and
    placement (hashable)."""
    if isinstance(leaf, jax.Array):
        aval = leaf.aval
        return (aval.shape, aval.dtype, aval.weak_type, leaf.sharding)
    if isinstance(leaf, bool | int | float):
        return (type(leaf),)
    array = np.asarray(leaf)
    return (array.shape, array.dtype, "host")


@functools.cache
def _parameter_names(jitted: Callable) -> list[str]:
    return list(inspect.signature(jitted.__wrapped__).parameters)


class Entry:
    """A compiled entry point of tvq: `jax.jit(fn, static_argnames, donate_argnums)`,
    called through `call`, so that with a warm-start folder its executable is kept on
    disk for later processes (`store`). Every compiled entry point is declared this way
    (`@entry(...)`), and its callers call it like the function. An entry whose program
    depends on more than its arguments (a closure over settings, a mesh) or that runs
    over several processes is declared with store=False: the store's key could not
    tell two of its programs apart."""

    def __init__(self, fn: Callable, *, static_argnames: tuple[str, ...] = (),
                 donate_argnums: tuple[int, ...] = (), store: bool = True) -> None:  # fmt: skip
        self.jitted = jax.jit(fn, static_argnames=static_argnames, donate_argnums=donate_argnums)
        self.static = tuple(static_argnames)
        self.store = store
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.store:
            return self.jitted(*args, **kwargs)
        return call(self.jitted, self.static, *args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self.jitted.lower(*args, **kwargs)


def entry(*, static_argnames: tuple[str, ...] = (), donate_argnums: tuple[int, ...] = (),
          store: bool = True) -> Callable[[Callable], Entry]:  # fmt: skip
    """Declares a compiled entry point (a decorator): see Entry."""
    return lambda fn: Entry(fn, static_argnames=static_argnames, donate_argnums=donate_argnums,
                            store=store)  # fmt: skip


def programs_held() -> int:
    """Compiled programs this module holds in this process (each holds memory while it
    is loaded: bench/RESULTS.md section 18)."""
    return len(_loaded)


def call(jitted: Callable, static: tuple[str, ...], *args: Any, **kwargs: Any) -> Any:
    """`jitted(*args, **kwargs)`, from an executable stored by an earlier process when
    there is one; `static` names the function's static arguments (its jit
    `static_argnames`), which a compiled executable no longer takes."""
    if _folder is None:
        return jitted(*args, **kwargs)
    try:
        from jax.experimental import serialize_executable
    except ImportError:
        return jitted(*args, **kwargs)
    names = _parameter_names(jitted)
    fixed = {**dict(zip(names, args, strict=False)), **kwargs}
    fixed = {name: value for name, value in fixed.items() if name in static}
    dynamic = [a for name, a in zip(names, args, strict=False) if name not in static]
    dynamic_kw = {name: value for name, value in kwargs.items() if name not in static}
    leaves, tree = jax.tree_util.tree_flatten((dynamic, dynamic_kw))
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):  # inside a trace: inline
        return jitted(*args, **kwargs)
    call_key = (jitted, tuple(sorted(fixed.items())), tree, tuple(map(_signature, leaves)))
    compiled = _loaded.get(call_key)
    if compiled is not None:
        return compiled(*dynamic, **dynamic_kw)
    function = f"{jitted.__wrapped__.__module__}.{jitted.__wrapped__.__qualname__}"
    key = _digest(environment(), function, call_key[1:])
    path = _folder / "executables" / f"{key}.bin"
    if path.is_file():
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
            # a damaged entry fails when it runs: wait for the first result to know
            result = jax.block_until_ready(compiled(*dynamic, **dynamic_kw))
            _loaded[call_key] = compiled
            _used(path)
            return result
        except Exception:  # stale or damaged: compile it again
            path.unlink(missing_ok=True)
    compiled = _fresh_compile(jitted.trace(*args, **kwargs).lower())
    try:
        _write(path, pickle.dumps(serialize_executable.serialize(compiled)))
    except Exception:  # this backend cannot serialize: only the in-process entry
        pass
    _loaded[call_key] = compiled
    return compiled(*dynamic, **dynamic_kw)


def _fresh_compile(lowered: Any) -> Any:
    """Compiles with JAX's persistent cache out of the way: an executable that JAX loaded
    from its cache serializes without its code on XLA:CPU (jaxlib 0.10: "Function …
    not found" when the copy runs), so the stored copy must come from XLA itself."""
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        return lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def _files(path: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.rglob("*") if p.is_file()
    )  # fmt: skip


def params(path: Path, read: Callable[[], Any]) -> Any:
    """The parameter tree stored at `path` (a model directory's params/), through
    `read()` the first time and from a plain copy in the warm-start folder after that.
    The copy is keyed by the files' names, sizes and modification times, so a changed
    checkpoint is read again."""
    if _folder is None:
        return read()
    try:
        files = _files(path)
    except OSError:
        return read()
    key = _digest(str(path.absolute()), files)
    copy = _folder / "params" / f"{key}.npz"
    if copy.is_file():
        try:
            tree = _read_copy(copy)
            _used(copy)
            return tree
        except Exception:  # damaged or half-written by an old tvq: read the checkpoint
            pass
    tree = read()
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if sum(leaf.nbytes for _, leaf in leaves) <= PARAMS_LIMIT:
        _write(copy, _copy_bytes(leaves))
    return tree


def _copy_bytes(leaves: list) -> bytes:
    arrays = {}
    for path, leaf in leaves:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        array = np.asarray(leaf)
        # dtypes numpy cannot store (bfloat16: kind "V") go as raw bytes, their name aside
        raw = array.dtype.kind == "V"
        arrays[f"{array.dtype.name}:{name}"] = array.view(f"V{array.itemsize}") if raw else array
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _read_copy(copy: Path) -> Any:
    import jax.numpy as jnp

    tree: dict[str, Any] = {}
    with np.load(copy) as stored:
        for entry in stored.files:
            dtype, name = entry.split(":", 1)
            array = stored[entry]
            if array.dtype.kind == "V":
                array = array.view(jnp.dtype(dtype))
            *parents, last = name.split("/")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = array
    return jax.device_put(tree, jax.local_devices()[0])
