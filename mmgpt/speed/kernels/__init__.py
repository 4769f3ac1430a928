"""CPU kernels that torch lacks, built on first use.

`rows_linear`: y = x W + b for a few rows of x (greedy decoding: 1-16 rows per step), fp32, AVX2 + FMA
(`rows_linear.c`); several rows take AVX-512 code (up to 16 rows per pass over a panel, the panel
prefetched ahead) where the CPU has it (`set_avx512`, `MMGPT_KERNELS_AVX512=0` to keep AVX2). torch's one-row and few-row products (MKL's addmm and gemv, oneDNN) read the
weights at 5-9 GB/s on the 2-core AVX2 machine this was written on, where memory streams 15-22
(`python -m benchmarks.decode_kernels`); this kernel reads weights packed in 16-column panels,
which the hardware prefetchers stream whole. `rows_linear_int8`: the same product on int8 weights with one
scale per output column (`mmgpt.speed.quantize`), widened to fp32 in registers: a quarter of the bytes.

The C file is compiled once per source version with the system's C compiler (`gcc`, else `$CC` or
`cc`; well under a second, no torch headers) into `$XDG_CACHE_HOME/mmgpt/kernels` (default
`~/.cache/mmgpt/kernels`), and called through ctypes. Its OpenMP threads are torch's own: the library
names the same OpenMP runtime (libgomp.so.1) that torch has already loaded. Anything missing (no
compiler, no AVX2, not Linux x86-64, a failed build) means `available()` is False and callers keep
torch's kernels, with one log line saying why. `MMGPT_KERNELS=0` turns the kernels off.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("mmgpt.speed.kernels")

SOURCE = Path(__file__).with_name("rows_linear.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
PANEL = 16
MAX_ROWS = 32  # above this, MKL's blocked GEMM is the better product
_state: dict = {}


class Lin(ctypes.Structure):
    """A packed product as `mmgpt_decode_step` reads it (rows_linear.c's `Lin`)."""

    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("K", ctypes.c_int64), ("N", ctypes.c_int64), ("P", ctypes.c_int64), ("int8", ctypes.c_int64),
                ("w4", ctypes.c_void_p), ("colsum", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    """One decoder block for `mmgpt_decode_step` (rows_linear.c's `Layer`)."""

    _fields_ = ([(n, ctypes.c_void_p) for n in ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "lnc_w", "lnc_b")]
                + [(n, Lin) for n in ("qkv", "proj", "fc", "fc_proj", "cq", "cproj")]
                + [(n, ctypes.c_void_p) for n in ("k_cache", "v_cache", "ck", "cv")] + [("n_mem", ctypes.c_int64)]
                + [(n, ctypes.c_float) for n in ("ln1_eps", "ln2_eps", "lnc_eps", "scale", "cscale", "pad_")])


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmgpt" / "kernels"


def _why_not() -> str | None:
    """Why the kernel cannot run here, or None. Called on every generate(): the machine is looked at
    once, the MMGPT_KERNELS switch each time."""
    if os.environ.get("MMGPT_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "MMGPT_KERNELS=0"
    if "machine" not in _state:
        why = None
        if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
            why = f"{platform.system()} {platform.machine()}: the kernel is written for x86-64 Linux"
        elif (cap := torch.backends.cpu.get_cpu_capability()) not in ("AVX2", "AVX512"):
            why = f"this CPU's vector capability is {cap}; the kernel needs AVX2 and FMA"
        _state["machine"] = why
    return _state["machine"]


def _compiler() -> str | None:
    # gcc first: its -fopenmp names libgomp, the OpenMP runtime torch has loaded (clang's would be a second one)
    for name in ("gcc", os.environ.get("CC"), "cc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def library_path() -> Path:
    """Where the library of this source and these flags is cached."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return _cache_dir() / f"rows_linear-{key}.so"


def _build() -> Path:
    """Compile rows_linear.c once per source and flags; returns the shared library's path."""
    lib = library_path()
    if lib.is_file():
        return lib
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        run = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120,
                             check=False)
        if run.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(run.stderr or run.stdout).strip()[-500:]}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # mkstemp's 0600 would keep the library from other users of a cache
        os.replace(tmp, lib)  # atomic: a process building beside this one sees a whole library or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load():
    if "fn" in _state:
        return _state["fn"]
    fn = None
    why = _why_not()
    if why is None:
        for attempt in range(2):
            path = None
            try:
                path = _build()
                lib = ctypes.CDLL(str(path))
                fn, fn_i8, step = lib.mmgpt_rows_linear, lib.mmgpt_rows_linear_i8, lib.mmgpt_decode_step
                i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
                fn.restype = fn_i8.restype = step.restype = None
                fn.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, ptr, ctypes.c_int]
                fn_i8.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, i64, ptr, ctypes.c_int]
                step.argtypes = [ctypes.POINTER(Layer), i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, f32,
                                 ctypes.POINTER(Lin), ptr, ptr, ptr, ptr, i64, ctypes.c_int]
                _state["fn_i8"], _state["step"] = fn_i8, step
                for name in ("mmgpt_set_avx512", "mmgpt_set_vnni"):
                    getattr(lib, name).argtypes, getattr(lib, name).restype = [ctypes.c_int], ctypes.c_int
                lib.mmgpt_lin.argtypes, lib.mmgpt_lin.restype = [ctypes.POINTER(Lin), ptr, i64, ptr, ctypes.c_int], None
                _state["set_avx512"], _state["set_vnni"], _state["lin"] = (lib.mmgpt_set_avx512, lib.mmgpt_set_vnni,
                                                                           lib.mmgpt_lin)
                lib.mmgpt_vit_attention.argtypes = [ptr, i64, i64, i64, i64, f32, ptr, ctypes.c_int]
                lib.mmgpt_vit_attention.restype = ctypes.c_int
                _state["vit_attention"] = lib.mmgpt_vit_attention
                _state["avx512"] = bool(lib.mmgpt_set_avx512(_wanted("MMGPT_KERNELS_AVX512")))
                _state["vnni"] = bool(lib.mmgpt_set_vnni(_wanted("MMGPT_KERNELS_VNNI")))
                break
            except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as err:
                why, fn = f"build failed: {err}", None
                if attempt == 0 and path is not None and path.is_file():  # a corrupt or stale cached library
                    with contextlib.suppress(OSError):
                        path.unlink()
                    continue
                break
    if fn is None:
        log.info("mmgpt.speed.kernels: using torch's kernels for decoding (%s)", why)
    _state["fn"] = fn
    return fn


def _wanted(var: str) -> int:
    return int(os.environ.get(var, "1").strip().lower() not in ("0", "false", "no", "off"))


def set_avx512(on: bool) -> bool:
    """Let several-row products use the AVX-512 code (where the CPU has it; the default, unless
    MMGPT_KERNELS_AVX512=0) or keep them on the AVX2 code. Returns whether AVX-512 is now used."""
    if not available():
        return False
    _state["avx512"] = bool(_state["set_avx512"](int(on)))
    return _state["avx512"]


def set_vnni(on: bool) -> bool:
    """Let int8 products round the activations to int8 too and run on AVX-512 VNNI (where the CPU has
    it; the default, unless MMGPT_KERNELS_VNNI=0), or keep fp32 activations. Returns whether VNNI is now used."""
    if not available():
        return False
    _state["vnni"] = bool(_state["set_vnni"](int(on)))
    return _state["vnni"]


def vnni() -> bool:
    """Whether int8 products run int8 x int8 on VNNI now (`set_vnni`)."""
    return available() and _state.get("vnni", False)


def pack_vnni(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(in, out) int8 -> ((P, K4, 16, 4) int8: 4 consecutive inputs of 16 output columns per 64 bytes, zero-
    padded; P = ceil(out / 16), K4 = ceil(in / 4)), and the (P * 16,) int32 column sums."""
    k, n = qweight.shape
    p, k4 = -(-n // PANEL), -(-k // 4)
    w = F.pad(qweight.detach(), (0, p * PANEL - n, 0, 4 * k4 - k))  # (4 K4, 16 P)
    colsum = w.sum(dim=0, dtype=torch.int32).contiguous()
    return w.view(k4, 4, p, PANEL).permute(2, 0, 3, 1).contiguous(), colsum


def available() -> bool:
    """True when the kernel is built (or can be) and not turned off by MMGPT_KERNELS=0."""
    if _why_not() is not None:
        return False
    return _load() is not None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(in, out) weight -> (P, in, 16) panels of 16 output columns, zero-padded; P = ceil(out / 16).
    An int8 weight stays int8; any other becomes fp32."""
    k, n = weight.shape
    p = -(-n // PANEL)
    w = weight.detach() if weight.dtype == torch.int8 else weight.detach().float()
    w = F.pad(w, (0, p * PANEL - n))
    return w.view(k, p, PANEL).permute(1, 0, 2).contiguous()


def rows_linear(weight: torch.Tensor, bias: torch.Tensor | None):
    """-> f(x): x (R, in) fp32 on the CPU -> x @ weight + bias, (R, out); weight (in, out) as
    transformers' Conv1D stores it. Packs the weight once; more than MAX_ROWS rows, or an input that is
    not a 2-D fp32 CPU tensor of `in` columns, go to torch's addmm on the original weight. Call only
    when `available()`."""
    fn = _load()
    if fn is None:
        raise RuntimeError("mmgpt.speed.kernels.rows_linear is not available here; check available() first")
    k, n = weight.shape
    wp = pack(weight)
    p = wp.shape[0]
    b = None if bias is None else bias.detach().float().contiguous()
    w_ref = weight.detach()
    w_ptr, b_ptr = wp.data_ptr(), (None if b is None else b.data_ptr())

    def run(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if (rows > MAX_ROWS or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2
                or x.shape[1] != k or torch.is_autocast_enabled("cpu")):  # torch's product and its own errors
            return torch.mm(x, w_ref) if b is None else torch.addmm(b, x, w_ref)
        x = x.contiguous()
        out = torch.empty(rows, n, dtype=torch.float32)
        fn(x.data_ptr(), rows, k, w_ptr, p, b_ptr, n, out.data_ptr(), torch.get_num_threads())
        return out

    run.packed = (wp, b)  # keeps the buffers alive with the function
    run.lin = Lin(w_ptr, None, b_ptr, k, n, p, 0)  # what decode_step reads
    return run


def rows_linear_int8(qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """-> f(x): x (R, in) fp32 on the CPU -> (x @ qweight) * scale + bias, (R, out), for an int8 weight
    (in, out) with one fp32 scale per output column (`mmgpt.speed.quantize`). The products run in fp32 on
    int8 weights widened in registers: a quarter of the bytes of `rows_linear`. Inputs it cannot read
    (as `rows_linear`) go to torch's addmm on the dequantized weight. Call only when `available()`."""
    _load()
    fn = _state.get("fn_i8")
    if fn is None:
        raise RuntimeError("mmgpt.speed.kernels.rows_linear_int8 is not available here; check available() first")
    if qweight.dtype != torch.int8 or scale.shape != (qweight.shape[1],):
        raise ValueError(f"rows_linear_int8 takes an int8 (in, out) weight and (out,) scales, got "
                         f"{qweight.dtype} {tuple(qweight.shape)} and {tuple(scale.shape)}")
    k, n = qweight.shape
    wp = pack(qweight)
    w4, colsum = pack_vnni(qweight)
    p = wp.shape[0]
    s = scale.detach().float().contiguous()
    b = None if bias is None else bias.detach().float().contiguous()
    w_ref = None  # the dequantized weight, made only if an input needs torch's product
    lin = Lin(wp.data_ptr(), s.data_ptr(), None if b is None else b.data_ptr(), k, n, p, 1, w4.data_ptr(),
              colsum.data_ptr())
    lin_fn, lin_ref = _state["lin"], ctypes.byref(lin)

    def run(x: torch.Tensor) -> torch.Tensor:
        nonlocal w_ref
        rows = x.shape[0]
        if (rows > MAX_ROWS or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2
                or x.shape[1] != k or torch.is_autocast_enabled("cpu")):
            if w_ref is None:
                w_ref = qweight.float() * s
            return torch.mm(x, w_ref.to(x.dtype)) if b is None else torch.addmm(b.to(x.dtype), x, w_ref.to(x.dtype))
        x = x.contiguous()
        out = torch.empty(rows, n, dtype=torch.float32)
        lin_fn(lin_ref, x.data_ptr(), rows, out.data_ptr(), torch.get_num_threads())  # VNNI where it is on
        return out

    run.packed = (wp, s, b, w4, colsum)
    run.lin = lin
    return run


def vit_attention(qkv: torch.Tensor, b: int, n: int, heads: int, scale: float) -> torch.Tensor | None:
    """A ViT's self-attention for inference, from its fused QKV product: qkv (B*N, 3D) fp32 on the CPU
    (q | k | v, each head's hd columns together) -> (B*N, D), the heads side by side as the output
    projection reads them; or None where the AVX-512 code cannot run (not on, head width not a multiple of
    16, not a contiguous fp32 CPU tensor): the caller then runs SDPA."""
    if (not available() or not _state.get("avx512") or qkv.dtype != torch.float32 or qkv.device.type != "cpu"
            or qkv.dim() != 2 or not qkv.is_contiguous() or qkv.shape[0] != b * n or qkv.shape[1] % (3 * heads)):
        return None
    d = qkv.shape[1] // 3
    out = torch.empty(b * n, d)
    if _state["vit_attention"](qkv.data_ptr(), b, n, heads, d // heads, scale, out.data_ptr(),
                               torch.get_num_threads()) != 0:
        return None
    return out


def decode_step():
    """The C function that runs a whole one-token step (rows_linear.c `mmgpt_decode_step`), or None where
    the kernels do not build. mmgpt.speed.decode lays out its arguments."""
    if not available():
        return None
    return _state.get("step")
