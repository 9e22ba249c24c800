"""Fused CPU kernels for CBN's per-pixel path (``cbn_cpu.c``), built on first use and called by the
CPU kernel of CBN's custom operators (:mod:`ltbench.nn.cbn_ops`, used by
:class:`ltbench.nn.cbn.CompoundBatchNorm2d`) for contiguous float32 CPU input.

The torch implementation of the per-pixel layer moves its activation through about 40 full-size
passes per training step (every matmul, product and sum reads or writes an (N, C, H, W)-sized
tensor). These three loops do the same arithmetic in about ten: ``quad`` (the E-step log-densities,
and the backward's ∂L/∂r), ``moments`` (the M-step's weighted moments, and ∂L/∂scale, ∂L/∂offset)
and ``mix`` (the mixed affine of Eq. 16, and ∂L/∂x), each reading x once and recomputing x − shift
instead of storing it. The softmax over M and all (M, C) algebra stay in torch.

The shared library is compiled with the C compiler (``$CC`` or ``cc``: ``-O3 -fopenmp``, plus
``-march=native``) into ``$LTBENCH_KERNEL_CACHE`` (default ``~/.cache/ltbench``), named by a hash of
the source, the flags, the compiler and the CPU, written to a temporary file and renamed (concurrent
jobs may build it at once). It runs on torch's own OpenMP runtime and thread count.

``LTBENCH_CBN_KERNEL`` chooses: ``auto`` (default: these kernels when they build, else the torch
implementation with one warning), ``torch`` (never these kernels), ``c`` (these kernels or an error).
:func:`describe` says which is in use (``metrics.json`` records it). CUDA tensors and channels_last
input always take the torch implementation.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

SOURCE = Path(__file__).with_suffix(".c")
CHOICES = ("auto", "torch", "c")
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-march=native")

_lib: ctypes.CDLL | None = None
_state: str | None = None  # None: not tried yet; else "c", "torch" (chosen) or "torch (…why…)"


def choice() -> str:
    value = os.environ.get("LTBENCH_CBN_KERNEL", "auto")
    if value not in CHOICES:
        raise ValueError(f"LTBENCH_CBN_KERNEL={value!r}: expected one of {', '.join(CHOICES)}")
    return value


def cache_dir() -> Path:
    root = os.environ.get("LTBENCH_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ltbench"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def compiler_found() -> bool:
    """Whether the C compiler (``$CC`` or ``cc``) is on the PATH (tests skip the kernels without one)."""
    return shutil.which(_compiler()) is not None


def library_path() -> Path:
    """Where the library for this source, compiler, flags and CPU lives (built or not)."""
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        version = "unavailable"
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), cc, version, _cpu_flags()]).encode())
    return cache_dir() / f"cbn_cpu-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the library if it is not in the cache; returns its path. Raises RuntimeError with the
    compiler's message when it cannot."""
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.so", dir=path.parent)
    os.close(fd)
    try:
        try:
            proc = subprocess.run(
                [_compiler(), *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"cannot run the C compiler {_compiler()!r}: {e}") from e
        if proc.returncode != 0:
            raise RuntimeError(f"{_compiler()} failed on {SOURCE.name}:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load() -> str:
    """Load (building if needed) the kernels as ``LTBENCH_CBN_KERNEL`` asks; the resulting state."""
    global _lib, _state
    mode = choice()
    if mode == "torch":
        _state = "torch"
        return _state
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        if mode == "c":
            raise RuntimeError(f"LTBENCH_CBN_KERNEL=c but the CBN CPU kernels are unavailable: {e}") from e
        warnings.warn(f"CBN CPU kernels unavailable, using the torch implementation: {e}", RuntimeWarning, stacklevel=3)
        _state = f"torch ({str(e).splitlines()[0]})"
        return _state
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    shape = (i64, i64, i64, i64, ctypes.c_int)
    lib.cbn_quad.argtypes = (*[ptr] * 6, *shape)
    lib.cbn_moments.argtypes = (*[ptr] * 5, *shape)
    lib.cbn_mix.argtypes = (*[ptr] * 8, *shape)
    for f in (lib.cbn_quad, lib.cbn_moments, lib.cbn_mix):
        f.restype = None
    _lib, _state = lib, "c"
    return _state


def reset() -> None:
    """Forget the loaded library and the choice: the next call reads ``LTBENCH_CBN_KERNEL`` again."""
    global _lib, _state
    _lib, _state = None, None


@contextlib.contextmanager
def choosing(value: str) -> Iterator[None]:
    """``LTBENCH_CBN_KERNEL=value`` inside the block (the layer benchmark times both implementations)."""
    old = os.environ.get("LTBENCH_CBN_KERNEL")
    os.environ["LTBENCH_CBN_KERNEL"] = value
    reset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LTBENCH_CBN_KERNEL")
        else:
            os.environ["LTBENCH_CBN_KERNEL"] = old
        reset()


def describe() -> str:
    """Which implementation the per-pixel CBN layer uses on CPU: ``c``, ``torch`` or ``torch (why)``."""
    return _load() if _state is None else _state


def usable(x: torch.Tensor) -> bool:
    """Whether ``x`` (4-D input of the layer) takes these kernels."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        return False
    if _state is None:
        _load()
    return _lib is not None


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _library() -> ctypes.CDLL:
    """The loaded kernels; callers check :func:`usable` first."""
    if _lib is None:
        raise RuntimeError("the CBN CPU kernels are not loaded: check cbn_cpu.usable(x) before calling them")
    return _lib


def _call(fn: Callable[..., None], x: torch.Tensor, M: int, K: int, **tensors: torch.Tensor | None) -> None:
    """Call a C loop on raw pointers after checking what it will index: every tensor float32,
    contiguous, on the CPU, with the element count its role implies (x, g, out: N·C·L; r, da,
    logits: N·M·L; shift: C; cst: M; w, wr: M·K·C; wd: M·2·C; part: threads·M·2C, float64)."""
    N, C = x.shape[:2]
    L, nt = x.numel() // max(N * C, 1), torch.get_num_threads()
    size = {
        "x": N * C * L,
        "g": N * C * L,
        "out": N * C * L,
        "r": N * M * L,
        "da": N * M * L,
        "logits": N * M * L,
        "shift": C,
        "cst": M,
        "w": M * K * C,
        "wr": M * K * C,
        "wd": M * 2 * C,
        "part": nt * M * 2 * C,
    }
    for name, t in {"x": x, **tensors}.items():
        dtype = torch.float64 if name == "part" else torch.float32
        if t is not None and (
            t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() or t.numel() != size[name]
        ):
            raise ValueError(
                f"cbn_cpu.{fn.__name__}: {name} must be a contiguous {dtype} CPU tensor of "
                f"{size[name]} elements, got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    fn(*(_p(t) for t in [x, *tensors.values()]), N, C, L, M, nt)


def quad(
    x: torch.Tensor, g: torch.Tensor | None, shift: torch.Tensor, w: torch.Tensor, cst: torch.Tensor
) -> torch.Tensor:
    """(N, M, L): cst_k + Σ_c xc (w[k,0] + w[k,1] xc) [+ g (w[k,2] xc + w[k,3])], w: (M, 2 or 4, C)."""
    M = w.shape[0]
    out = x.new_empty((x.shape[0], M, x.numel() // (x.shape[0] * x.shape[1])))
    _call(
        _library().cbn_quad, x, M, 2 if g is None else 4, g=g, shift=_f32(shift), w=_f32(w), cst=_f32(cst), logits=out
    )
    return out


def moments(x: torch.Tensor, g: torch.Tensor | None, shift: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(M, 2C): [Σ r xc | Σ r xc²] over all points, or [Σ r g xc | Σ r g] with g."""
    M, C = r.shape[1], x.shape[1]
    part = torch.zeros((torch.get_num_threads(), M, 2 * C), dtype=torch.float64)
    _call(_library().cbn_moments, x, M, 2, g=g, shift=_f32(shift), r=r, part=part)
    return part.sum(0).to(torch.float32)


def mix(
    x: torch.Tensor,
    g: torch.Tensor | None,
    shift: torch.Tensor,
    r: torch.Tensor,
    da: torch.Tensor | None,
    wr: torch.Tensor,
    wd: torch.Tensor | None,
    out: torch.Tensor,
) -> torch.Tensor:
    """out (like x) = B + A xc [+ G g]: A, B, G = Σ_k r_k wr[k, 0/1/2] (+ Σ_k da_k wd[k, 0/1])."""
    M = r.shape[1]
    _call(
        _library().cbn_mix,
        x,
        M,
        2 if g is None else 3,
        g=g,
        shift=_f32(shift),
        r=r,
        da=da,
        wr=_f32(wr),
        wd=None if wd is None else _f32(wd),
        out=out,
    )
    return out
