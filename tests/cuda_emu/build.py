"""Builds the CUDA-kernel emulator (README.md): copies cuda/ as it is now, applies the mechanical edits
that let g++ compile the device code as host code, and links it with emu_rt.cpp and driver.cpp.

    python tests/cuda_emu/build.py OUT_DIR      # prints the path of the driver binary

An edit whose pattern no longer matches raises EditError naming the file and the pattern: a change to the
kernels that needs a new edit fails the build instead of testing something else than cuda/ holds."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CUDA_DIR = REPO / "cuda"
INCLUDE_DIR = REPO / "csrc" / "include"
# Translation units linked into the driver (probe.cu is not part of the recurrent kernels).
KERNEL_UNITS = ("rnn_fwd.cu", "rnn_bwd.cu", "rnn_pack.cu", "rnn_plan.cu")
CXXFLAGS = ("-std=c++17", "-O1", "-g0", "-w")
# Extra flags for compiling and linking (build()'s `extra`, else this variable's words).
EXTRA_FLAGS_ENV = "PYSEQKERN_EMU_FLAGS"
# The kernels' index arithmetic under AddressSanitizer and UndefinedBehaviorSanitizer (the driver poisons its
# guard zones then). ucontext fibers: ASan follows swapcontext, not the hand-written x86-64 switch.
SANITIZER_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g",
                   "-DPSK_EMU_UCONTEXT")


class EditError(RuntimeError):
    pass


# extern __shared__ unsigned char smem[];  ->  the running block's buffer (a per-fiber local otherwise).
SMEM_RE = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?unsigned\s+char\s+(\w+)\s*\[\s*\]\s*;")
# reinterpret_cast<const void*>(&kernel<...>)  ->  psk_emu_kernel(&kernel<...>), which registers it.
KERNEL_PTR_RE = re.compile(r"reinterpret_cast<const\s+void\s*\*>\(\s*&\s*(\w+(?:<[^;()]*?>)?)\s*\)")
# callee of kernel<...><<<config>>>(args)
LAUNCH_RE = re.compile(r"(\w+(?:<[^<>;]*>)?)\s*<<<")

# (file, pattern name, minimum matches): the edits each kernel file must take.
REQUIRED = (
    ("rnn_fwd.cu", "smem", 1), ("rnn_fwd.cu", "kernel_ptr", 2),
    ("rnn_bwd.cu", "smem", 1), ("rnn_bwd.cu", "kernel_ptr", 2),
    ("rnn_pack.cu", "launch", 1),
)
PATTERNS = {"smem": SMEM_RE.pattern, "kernel_ptr": KERNEL_PTR_RE.pattern, "launch": LAUNCH_RE.pattern}


def _close(text: str, i: int, open_: str, close: str, name: str) -> int:
    """Index just past the bracket that closes the one opened at text[i] (brackets of one kind)."""
    depth = 0
    for j in range(i, len(text)):
        if text.startswith(open_, j):
            depth += 1
        elif text.startswith(close, j):
            depth -= 1
            if depth == 0:
                return j + len(close)
    raise EditError(f"{name}: unbalanced {open_!r} at offset {i}")


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def _rewrite_launches(text: str, name: str) -> tuple[str, int]:
    """kernel<<<grid, block[, smem[, stream]]>>>(args)  ->  psk_emu_launch(dim3(grid), dim3(block), smem,
    [&] { kernel(args); })"""
    out, pos, count = [], 0, 0
    while (m := LAUNCH_RE.search(text, pos)) is not None:
        cfg_end = text.find(">>>", m.end())
        if cfg_end < 0:
            raise EditError(f"{name}: '<<<' without '>>>' at offset {m.start()}")
        cfg = _split_top(text[m.end():cfg_end])
        args_start = cfg_end + 3
        while text[args_start].isspace():
            args_start += 1
        if text[args_start] != "(" or len(cfg) < 2:
            raise EditError(f"{name}: cannot parse the launch at offset {m.start()}: {text[m.start():args_start + 1]!r}")
        args_end = _close(text, args_start, "(", ")", name)
        smem = cfg[2] if len(cfg) > 2 else "0"
        out.append(text[pos:m.start()])
        out.append(f"psk_emu_launch(dim3({cfg[0]}), dim3({cfg[1]}), size_t({smem}), [&] {{ {m.group(1)}"
                   f"{text[args_start:args_end]}; }})")
        pos, count = args_end, count + 1
    out.append(text[pos:])
    return "".join(out), count


def emulated_source(text: str, name: str) -> tuple[str, dict[str, int]]:
    """The edited text of one file of cuda/ and the number of matches of each edit."""
    text, n_smem = SMEM_RE.subn(r"unsigned char* \1 = psk_cur_smem;", text)
    text, n_ptr = KERNEL_PTR_RE.subn(r"psk_emu_kernel(&\1)", text)
    text, n_launch = _rewrite_launches(text, name)
    return text, {"smem": n_smem, "kernel_ptr": n_ptr, "launch": n_launch}


def prepare_sources(src_dir: Path, dst_dir: Path) -> None:
    """Copies every .cu/.cuh/.h of src_dir into dst_dir with the edits applied, and checks them."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for path in sorted(src_dir.iterdir()):
        if path.suffix not in (".cu", ".cuh", ".h"):
            continue
        text, counts[path.name] = emulated_source(path.read_text(), path.name)
        if path.name in KERNEL_UNITS or path.suffix != ".cu":
            code = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)
            for leftover in ("__shared__", "<<<"):
                if leftover in code:
                    raise EditError(f"{path}: {leftover!r} left after the edits: the emulator cannot run it "
                                    f"(extend tests/cuda_emu/build.py)")
        (dst_dir / path.name).write_text(text)
    for fname, edit, least in REQUIRED:
        got = counts.get(fname, {}).get(edit, 0)
        if got < least:
            raise EditError(f"{src_dir / fname}: the {edit!r} edit matched {got} time(s), expected at least {least}; "
                            f"pattern: {PATTERNS[edit]}")


def _compile(src: Path, obj: Path, includes: list[Path], extra: tuple) -> None:
    cmd = ["g++", *CXXFLAGS, *extra, "-x", "c++", *(f"-I{i}" for i in includes), "-c", str(src), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {src.name} failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")


def build(out_dir: Path, src_dir: Path = CUDA_DIR, jobs: int = 2, extra=None) -> Path:
    """Builds out_dir/driver from the kernels in src_dir; returns its path. extra: flags for g++ beyond
    CXXFLAGS (SANITIZER_FLAGS, say); None takes $PYSEQKERN_EMU_FLAGS."""
    extra = tuple(os.environ.get(EXTRA_FLAGS_ENV, "").split() if extra is None else extra)
    out_dir = Path(out_dir)
    src = out_dir / "src"
    if src.exists():
        shutil.rmtree(src)
    prepare_sources(Path(src_dir), src)
    includes = [HERE / "shim", src, INCLUDE_DIR]
    units = [src / u for u in KERNEL_UNITS] + [HERE / "emu_rt.cpp", HERE / "driver.cpp"]
    objs = [out_dir / (u.stem + ".o") for u in units]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for f in [pool.submit(_compile, u, o, [HERE, *includes], extra) for u, o in zip(units, objs)]:
            f.result()
    driver = out_dir / "driver"
    proc = subprocess.run(["g++", *extra, *(str(o) for o in objs), "-o", str(driver)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"linking the emulator failed:\n{proc.stderr[-6000:]}")
    return driver


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(build(Path(sys.argv[1])))
