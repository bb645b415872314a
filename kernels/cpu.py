"""The fused G-SGD step for CPU tensors, and the gspace module's WA and ICR passes: cpu_step.cpp,
built on first use with the machine's C++ compiler (OpenMP, -O3 -march=native; about 2 s, once: the library is cached under
$IC_CACHE_DIR, default ~/.cache/invariance_compiler) and called through ctypes, which releases the
GIL. Where no compiler works GSGD keeps its PyTorch path and one warning says why and what to set."""
from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
import weakref
from pathlib import Path

import torch

from .layout import META

SOURCE = Path(__file__).with_name("cpu_step.cpp")
# the meta row's columns by name, from layout.META (the source reads IC_META_<NAME>)
META_FLAGS = [f"-DIC_META_{name.upper()}={i}" for i, name in enumerate(META)] + [f"-DIC_META_COLUMNS={len(META)}"]
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=256", "-fopenmp", "-std=c++17", "-shared", "-fPIC",
         *META_FLAGS]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _cpu_id() -> str:
    """The CPU model and flags (-march=native code is only for this kind of CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def _home() -> Path:
    try:
        return Path.home()
    except RuntimeError:                      # no HOME and no password entry
        return Path(tempfile.gettempdir())


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The built library, or None (with one warning) where it cannot be built."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    try:
        if cxx is None:
            raise OSError("no C++ compiler found (c++ or g++ on PATH)")
        source = SOURCE.read_bytes()
        key = hashlib.sha256(b"\0".join([source, cxx.encode(), " ".join(FLAGS).encode(),
                                         _cpu_id().encode()])).hexdigest()[:16]
        cache = Path(os.environ.get("IC_CACHE_DIR") or _home() / ".cache" / "invariance_compiler")
        target = cache / f"cpu_step-{key}.so"
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:    # build aside, then rename: two
                built = Path(tmp) / target.name                      # processes may build at once
                run = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
                if run.returncode:
                    raise OSError(f"{cxx} failed: {run.stderr.strip()[-2000:]}")
                os.replace(built, target)
        return ctypes.CDLL(str(target))
    except OSError as e:
        warnings.warn(f"invariance_compiler: the fused CPU passes (GSGD's step, the gspace module's WA and "
                      f"ICR) could not be built ({e}); using the slower PyTorch path. Install g++ with "
                      "OpenMP, or set CXX to one; IC_KERNELS=off silences this.", RuntimeWarning, stacklevel=3)
        return None


_P, _I, _D, _N = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int


class _Step(ctypes.Structure):
    """Step<T> of cpu_step.cpp, field for field."""
    _fields_ = [("count", _I), ("meta", _P), ("cls", _P), ("n", _I),
                ("gws", _P), ("vs", _P), ("bufs", _P), ("ws", _P),
                ("M", _P), ("path_scale", _P), ("path_root", _P),
                ("carriers", _P), ("carriers_buf", _P), ("nc", _I),
                ("k_val", _P), ("nk", _I),
                ("j_tensor", _P), ("j_idx", _P), ("j_in", _P), ("j_out", _P), ("j_cls", _P), ("nj", _I),
                ("slot_start", _P), ("slot_idx", _P), ("slot_ref", _P),
                ("lr", _D), ("mom", _D), ("wd", _D), ("momentum", _N), ("first", _N), ("threads", _N)]


def _table(ts) -> array.array:
    """The tensors' data pointers (array.array: a third of the cost of a ctypes array)."""
    return array.array("q", [t.data_ptr() for t in ts] or [0])


def _slots(count: int, k_tensor, k_idx, j_tensor, j_idx) -> tuple[torch.Tensor, ...]:
    """The fixed (K) and carrier (J) slots sorted by tensor and flat index, as the step writes them
    row by row: (start (count + 1,): tensor t's slots are [start[t], start[t + 1]), their flat
    indices (int32), ref (int32): a K entry's number, or -1 - a J entry's)."""
    tensor = torch.cat([k_tensor, j_tensor]).long()
    idx = torch.cat([k_idx, j_idx]).long()
    ref = torch.cat([torch.arange(k_idx.numel()), -1 - torch.arange(j_idx.numel())])
    order = torch.argsort(tensor * 2**31 + idx)          # flat indices are int32
    start = torch.searchsorted(tensor[order], torch.arange(count + 1))
    return start.contiguous(), idx[order].int().contiguous(), ref[order].int().contiguous()


class CpuStep:
    """GSGD's whole step on plan tensors 0..k-1 in one call of cpu_step.cpp."""

    def __init__(self, lib: ctypes.CDLL, plan, dtype: torch.dtype):
        self._run = getattr(lib, f"gsgd_cpu_step_{_SUFFIX[dtype]}")
        self.plan, self.dtype = plan, dtype
        lay, count = plan.group.layout, len(plan.group.slots)
        slots = _slots(count, lay.k_tensor, lay.k_idx, lay.j_tensor, lay.j_idx)
        self._keep = (lay, *slots)                                                  # alive
        self._args = _Step(count=count, n=plan.group.n, M=plan.M.data_ptr(), path_scale=plan.path_scale.data_ptr(),
                           path_root=plan.path_root.data_ptr(), nk=lay.k_idx.numel(), nj=lay.j_idx.numel(),
                           **{k: getattr(lay, k).data_ptr() for k in ("meta", "cls", "k_val", "j_tensor", "j_idx",
                                                                     "j_in", "j_out", "j_cls")},
                           **{f"slot_{k}": t.data_ptr() for k, t in zip(("start", "idx", "ref"), slots)})

    def __call__(self, gws, vs, bufs, ws, carriers, carriers_buf, lr, mom, wd, first) -> None:
        """In place on vs, bufs (momentum buffers, [] without momentum), ws, carriers and
        carriers_buf. Raises, W untouched, where the new P_in is zero or non-finite."""
        a = self._args
        tables = [_table(t) for t in (gws, vs, bufs, ws)]        # alive for the call
        a.gws, a.vs, a.bufs, a.ws = (t.buffer_info()[0] for t in tables)
        a.carriers, a.nc = carriers.data_ptr(), carriers.numel()
        a.carriers_buf = carriers_buf.data_ptr() if carriers_buf is not None else None
        a.lr, a.mom, a.wd, a.momentum, a.first = lr, mom, wd, int(mom != 0), int(first)
        a.threads = torch.get_num_threads()
        if self._run(ctypes.byref(a)):
            self.plan.path_in(carriers)                          # raises, naming the classes
            raise FloatingPointError("GSGD: the new carrier path values are zero or non-finite")


def cpu_step(plan, tensors, cached: CpuStep | None = None) -> CpuStep | None:
    """The compiled step for `tensors` (every tensor the step reads or writes), or None where it
    does not apply: not all on the CPU, not one dtype of fp32 / fp64, or not all contiguous."""
    dtype = tensors[0].dtype
    if dtype not in _SUFFIX or not (all([t.is_cpu for t in tensors]) and all([t.dtype is dtype for t in tensors])
                                    and all([t.is_contiguous() for t in tensors])):  # lists: faster here
        return None
    if cached is not None and cached.plan is plan and cached.dtype == dtype:
        return cached
    lib = library()
    return CpuStep(lib, plan, dtype) if lib is not None else None


class CpuPasses:
    """The gspace module's WA (forward) and ICR (backward) over one tensor group in cpu_step.cpp's
    passes, one each (kernels/wa.py and kernels/icr.py dispatch here for fp32 / fp64 CPU tensors)."""

    def __init__(self, lib: ctypes.CDLL, group, dtype: torch.dtype):
        lay, count = group.layout, len(group.slots)
        suffix = _SUFFIX[dtype]
        self._wa, self._icr = getattr(lib, f"ic_cpu_wa_{suffix}"), getattr(lib, f"ic_cpu_icr_{suffix}")
        self._wa.restype = self._icr.restype = None
        slots = _slots(count, lay.k_tensor, lay.k_idx, lay.j_tensor, lay.j_idx)
        # copies, not the layout itself: the cache entry must not keep the layout alive
        arrays = {k: getattr(lay, k).clone() for k in ("meta", "cls", "k_val", "j_tensor", "j_idx", "j_in",
                                                       "j_out", "j_cls")}
        # no carrier roots: the passes' split of moving and still tensors means nothing here
        roots = torch.full((group.n + 1,), group.n, dtype=torch.int64)
        self._keep = (arrays, roots, *slots)                                         # alive
        self.n, self.dtype, self.count = group.n, dtype, count
        self._args = _Step(count=count, n=group.n, path_root=roots.data_ptr(), nk=lay.k_idx.numel(),
                           nj=lay.j_idx.numel(), **{k: t.data_ptr() for k, t in arrays.items()},
                           **{f"slot_{k}": t.data_ptr() for k, t in zip(("start", "idx", "ref"), slots)})

    def _set(self, M, carriers, **tables) -> list:
        a = self._args
        a.M, a.carriers, a.nc = M.data_ptr(), carriers.data_ptr(), carriers.numel()
        a.threads = torch.get_num_threads()
        keep = []
        for name, ts in tables.items():
            keep.append(_table(ts))
            setattr(a, name, keep[-1].buffer_info()[0])
        return keep

    def wa(self, vs, p_in, M, carriers) -> list[torch.Tensor]:
        ws = [torch.empty_like(v, memory_format=torch.contiguous_format) for v in vs]
        keep = self._set(M, carriers, vs=vs, ws=ws)         # noqa: F841 (alive for the call)
        self._wa(ctypes.byref(self._args), ctypes.c_void_p(p_in.data_ptr()))
        return ws

    def icr(self, gws, vs, p_in, M, carriers):
        """(∂L/∂V of each tensor, reduced (n + 1,), ∂L/∂c direct), as icr.reference."""
        gvs = [torch.empty_like(v, memory_format=torch.contiguous_format) for v in vs]
        reduced = torch.zeros(self.n + 1, dtype=torch.float64)
        g_car = torch.zeros(carriers.numel(), dtype=torch.float64)
        keep = self._set(M, carriers, gws=gws, vs=vs)       # noqa: F841
        out = _table(gvs)
        self._icr(ctypes.byref(self._args), ctypes.c_void_p(p_in.data_ptr()), ctypes.c_void_p(out.buffer_info()[0]),
                  ctypes.c_void_p(reduced.data_ptr()), ctypes.c_void_p(g_car.data_ptr()))
        return gvs, reduced.to(p_in.dtype), g_car.to(carriers.dtype)


_PASSES: dict = {}          # id(layout.meta) -> {dtype: CpuPasses}, dropped with the layout


def cpu_passes(group, tensors) -> CpuPasses | None:
    """The fused WA / ICR passes for `group`, or None where they do not apply: under torch.compile,
    kernels not in 'auto' mode, a tensor not on the CPU, not one dtype of fp32 / fp64, not contiguous, or no
    compiler. `tensors`: every tensor the pass reads or writes (carriers included)."""
    from .dispatch import current_mode
    if torch.compiler.is_compiling():            # a compiled graph traces the reference
        return None
    dtype = tensors[0].dtype
    if current_mode() != "auto" or dtype not in _SUFFIX or group.layout.k_val.dtype != dtype or not (
            all([t.is_cpu for t in tensors]) and all([t.dtype is dtype for t in tensors])
            and all([t.is_contiguous() for t in tensors])):
        return None
    key = id(group.layout.meta)
    per_dtype = _PASSES.get(key)
    if per_dtype is None:
        per_dtype = _PASSES[key] = {}
        weakref.finalize(group.layout.meta, _PASSES.pop, key, None)
    if dtype not in per_dtype:
        lib = library()
        if lib is None:
            return None
        per_dtype[dtype] = CpuPasses(lib, group, dtype)
    return per_dtype[dtype]
