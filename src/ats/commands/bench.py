"""`ats bench`: throughput of the unpatched and patched model in the same run, and how much of the
FLOP saving turns into time saved (efficiency = speedup / FLOP ratio).

Unpatched and patched forwards alternate in every repeat, so drift in this machine's speed hits both;
each number is the median of the repeats. ``--autocast bf16`` (or fp16) times every forward under
``torch.autocast`` on the model's device, as mixed-precision inference runs. ``--static`` times the configs in
static mode; with ``--compile`` they compile whole (``fullgraph=True``), and ``--compile-mode reduce-overhead``
replays them as CUDA graphs on a GPU (the unpatched model is compiled the same way).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

import ats

from ..adapters import data_config, depth_of, family_of
from ..data.build import build_dataset
from ..data.distributed import refuse_torchrun
from ..export import export_onnx, onnx_session, time_sessions
from ..methods import PatchConfig
from ..methods.stacked import with_ats_options
from ..stats import ATSStats
from .evaluate import config_label, set_config, text_table
from .options import REFERENCE_MODELS, add_config_arguments, add_model_arguments, configs_from_arguments, load_model
from .timing import time_forward


@dataclasses.dataclass
class BenchRow:
    config: str
    batch_size: int
    throughput: float
    gflops: float
    speedup: float
    flop_ratio: float
    efficiency: float
    threads: int
    tokens_per_block: List[float]
    autocast: str = "none"
    runtime: str = "torch"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def bench_images(model: nn.Module, batch_size: int, reference: bool, data: Optional[str] = None) -> torch.Tensor:
    """[batch_size, C, H, W] (or clips [batch_size, T, C, H, W]): the first images of the ImageFolder ``data`` (taken
    again from the first when it has fewer), else the bundled test images (or the moving-garment test clips) for a
    reference model, else seeded random ones."""
    device = next(model.parameters()).device
    if data is not None or reference:
        test_set = build_dataset(data, data_config(model), limit=batch_size)
        return torch.stack([test_set[index % len(test_set)][0] for index in range(batch_size)]).to(device)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, *family_of(model).input_size(model), generator=generator).to(device)


#: What one row times: (the callable, the module behind it whose statistics to read, its config or None).
Contender = Tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module, Optional[PatchConfig]]


#: --autocast names -> the dtype forwards run in (None: the model's own, no autocast).
AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, autocast: str):
    """``torch.autocast`` on ``device`` to the dtype ``autocast`` names, or a no-op for "none"."""
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown autocast {autocast!r}; choose one of {', '.join(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[autocast]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


#: --runtime choices: what runs the forwards.
RUNTIMES = ("torch", "onnxruntime")

#: --compile-mode choices: torch.compile's modes ("default": its default).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@torch.inference_mode()
def bench(model: nn.Module, configs: Sequence[PatchConfig], batch_sizes: Sequence[int], repeats: int = 5,
          warmup: int = 2, reference: bool = False, compile: bool = False, autocast: str = "none",
          static: bool = False, compile_mode: str = "default", compile_backend: str = "inductor",
          data: Optional[str] = None) -> List[BenchRow]:
    """Rows for the unpatched model and each config at each batch size; the model is left unpatched.

    compile: time ``torch.compile`` of the unpatched model and of a patched copy per config instead
    (the warm-up repeats then include compiling), in ``compile_mode`` with ``compile_backend``; autocast:
    "none", "bf16" or "fp16" (``autocast_context``); static: the configs in static mode (compiled with
    ``fullgraph=True``); data: an ImageFolder to time on (``bench_images``; default: the bundled images for a
    reference model, else random ones).
    """
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if (compile_mode != "default" or compile_backend != "inductor") and not compile:
        raise ValueError("--compile-mode and --compile-backend need --compile")
    if repeats < 1 or any(size < 1 for size in batch_sizes):
        raise ValueError(f"--repeats and --batch-size must be >= 1, got {repeats} and {list(batch_sizes)}")
    model.eval()
    threads = torch.get_num_threads()
    base_gflops = ats.gflops(model)
    contenders = compiled_contenders(model, configs, static, compile_mode, compile_backend) if compile else [
        (model, model, config) for config in [None, *configs]]
    rows = []
    try:
        for batch_size in batch_sizes:
            images = bench_images(model, batch_size, reference, data)
            timings: List[List[float]] = [[] for _ in contenders]
            for repeat in range(warmup + repeats):
                for index, (forward, _, config) in enumerate(contenders):
                    if not compile:
                        set_config(model, config, static)
                    with autocast_context(images.device, autocast):
                        seconds = time_forward(forward, images)
                    if repeat >= warmup:
                        timings[index].append(seconds)
            patched_stats = []
            for forward, module, config in contenders[1:]:
                if not compile:
                    set_config(model, config, static)
                with autocast_context(images.device, autocast):
                    forward(images)
                patched_stats.append(ats.last_stats(module))
            medians = [statistics.median(seconds) for seconds in timings]
            rows += result_rows(model, base_gflops, batch_size, medians, configs, patched_stats, static, threads,
                                autocast)
    finally:
        set_config(model, None)
    return rows


def result_rows(model: nn.Module, base_gflops: float, batch_size: int, seconds: Sequence[float],
                configs: Sequence[PatchConfig], patched_stats: Sequence[ATSStats], static: bool, threads: int,
                autocast: str = "none", runtime: str = "torch") -> List[BenchRow]:
    """The rows of one batch size: the unpatched model (``base_gflops`` per image, ``seconds[0]`` the median seconds
    of its forward) and each config (``seconds[1:]``, with its forward's ``patched_stats``), with speedup, FLOP ratio
    and efficiency."""
    family = family_of(model)
    depth = depth_of(model)
    full = float(family.shape(model).num_tokens)
    rows = [BenchRow("unpatched", batch_size, batch_size / seconds[0], base_gflops, 1.0, 1.0, 1.0, threads,
                     [full] * depth, autocast, runtime)]
    for config, stats, median in zip(configs, patched_stats, seconds[1:]):
        gflops = float(stats.gflops.mean())
        speedup, flop_ratio = seconds[0] / median, base_gflops / gflops
        rows.append(BenchRow(config_label(config, static), batch_size, batch_size / median, gflops, speedup,
                             flop_ratio, speedup / flop_ratio, threads, stats.tokens.float().mean(0).tolist(), autocast,
                             runtime))
    return rows


def bench_onnxruntime(model: nn.Module, configs: Sequence[PatchConfig], batch_sizes: Sequence[int], repeats: int = 5,
                      warmup: int = 2, reference: bool = False, threads: int = 1,
                      static: bool = False, data: Optional[str] = None) -> List[BenchRow]:
    """``bench``'s rows for ONNX Runtime: the unpatched model and each config (in static mode with ``static``), each
    exported once (``ats.export``, dynamic batch) and run by ONNX Runtime's CPU provider with ``threads`` intra-op
    threads; the graphs alternate in every repeat. GFLOPs and tokens are the PyTorch forward's."""
    model.eval()
    base_gflops = ats.gflops(model)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            example = bench_images(model, 2, reference, data).cpu()
            sessions = []
            for index, config in enumerate([None, *configs]):
                set_config(model, config, static)
                export_onnx(model, example, Path(folder) / f"{index}.onnx")
                sessions.append(onnx_session(Path(folder) / f"{index}.onnx", threads))
            for batch_size in batch_sizes:
                images = bench_images(model, batch_size, reference, data).cpu()
                seconds = time_sessions(sessions, images, repeats, warmup)
                patched_stats = []
                for config in configs:
                    set_config(model, config, static)
                    with torch.inference_mode():
                        model(images)
                    patched_stats.append(ats.last_stats(model))
                rows += result_rows(model, base_gflops, batch_size, seconds, configs, patched_stats, static, threads,
                                    runtime="onnxruntime")
    finally:
        set_config(model, None)
    return rows


def compiled_contenders(model: nn.Module, configs: Sequence[PatchConfig], static: bool = False,
                        mode: str = "default", backend: str = "inductor") -> List[Contender]:
    """torch.compile of the model, then of a patched copy per config (static: in static mode, each compiled whole);
    mode: torch.compile's mode ("default", "reduce-overhead", ...), for its backend (inductor unless named)."""
    copies = [ats.patch(copy.deepcopy(model), config, static=static) for config in configs]
    options = dict(fullgraph=static, mode=None if mode == "default" else mode, backend=backend)
    return [(torch.compile(module, **options), module, config)
            for module, config in zip([model, *copies], [None, *configs])]


def format_rows(rows: Sequence[BenchRow]) -> str:
    lines = [("config", "batch", "img/s", "GFLOPs", "speedup", "FLOP ratio", "efficiency")]
    lines += [(row.config, str(row.batch_size), f"{row.throughput:.1f}", f"{row.gflops:.3f}", f"{row.speedup:.2f}",
               f"{row.flop_ratio:.2f}", f"{row.efficiency:.2f}") for row in rows]
    return text_table(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", description=__doc__)
    add_model_arguments(parser)
    add_config_arguments(parser)
    parser.add_argument("--batch-size", type=int, action="append", metavar="N",
                        help="batch size; repeatable (default: 1 and 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (pinned)")
    parser.add_argument("--compare-padded", action="store_true",
                        help="add each config with packing='padded' (every later block on all padded positions)")
    parser.add_argument("--compile", action="store_true",
                        help="time torch.compile of the unpatched model and of each patched one (first call "
                             "compiles: keep --warmup >= 2)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                        help="torch.compile's mode with --compile; reduce-overhead replays CUDA graphs on a GPU "
                             "(with --static: one graph per model)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend with --compile (default inductor; e.g. eager to check that a "
                             "model traces, without compiling kernels)")
    parser.add_argument("--autocast", choices=tuple(AUTOCAST_DTYPES), default="none",
                        help="time every forward under torch.autocast to bfloat16 or float16 (default none: the "
                             "model's own dtype)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="torch",
                        help="torch (eager PyTorch, default) or onnxruntime: export the unpatched model and each "
                             "config (with --static in static mode) to ONNX and time the graphs in ONNX Runtime on "
                             "the CPU with --threads intra-op threads")
    parser.add_argument("--data", help="an ImageFolder (root/<class>/<image>) whose first images to time on (ATS keeps "
                                       "as many tokens as each image needs, so real images give real timings); "
                                       "default: the bundled test images for a reference model, else seeded random "
                                       "ones")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows")
    parser.set_defaults(func=run)


def refuse_with_onnxruntime(args: argparse.Namespace) -> None:
    """A ValueError naming the flags ``--runtime onnxruntime`` does not take (it times the graphs as exported)."""
    clashing = [flag for flag, given in (("--compile", args.compile), ("--autocast", args.autocast != "none"),
                                         ("--compare-padded", args.compare_padded)) if given]
    if clashing:
        raise ValueError(f"--runtime onnxruntime times the float32 graphs as exported; drop {', '.join(clashing)}")


def run(args: argparse.Namespace) -> int:
    refuse_torchrun("bench")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    model = load_model(args)
    configs = configs_from_arguments(args, depth=depth_of(model))
    if args.compare_padded:
        configs += [padded for config in configs if (padded := with_ats_options(config, packing="padded")) != config]
    reference = args.model in REFERENCE_MODELS
    if args.runtime == "onnxruntime":
        refuse_with_onnxruntime(args)
        rows = bench_onnxruntime(model.cpu(), configs, args.batch_size or [1, 64], args.repeats, args.warmup,
                                 reference, args.threads, args.static, args.data)
    else:
        rows = bench(model, configs, args.batch_size or [1, 64], args.repeats, args.warmup, reference=reference,
                     compile=args.compile, autocast=args.autocast, static=args.static, compile_mode=args.compile_mode,
                     compile_backend=args.compile_backend, data=args.data)
    print(f"threads: {args.threads}, runtime: {args.runtime}", file=sys.stderr)
    print(json.dumps([row.to_json() for row in rows], indent=1) if args.json else format_rows(rows))
    return 0
