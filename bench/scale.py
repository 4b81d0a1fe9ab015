"""Checkpoints larger than memory: spectrakit's streamed paths and weightwatcher on one sharded Llama folder.

Run:  python bench/scale.py generate [--size-gb 8.6]
      python bench/scale.py run [--size-gb 8.6] [--only analyze,analyze-2:900,...] [--timeout 600] [--json out.json]
      python bench/scale.py report --merge a.json b.json --json all.json   (the tables of several runs)

``generate`` writes, once, a Llama-architecture checkpoint of random float32 weights (seeded, each
tensor from its own generator, so a tensor's values do not depend on the order of writing) as
Hugging Face safetensors shards plus ``model.safetensors.index.json`` and ``config.json``, under
``bench/.cache/llama-<size>g/`` (gitignored). It is written tensor by tensor: each shard's header
is computed from the shapes of a meta-device model, then every tensor is drawn, written and freed,
so the generator never holds more than one tensor. A ``manifest.json`` (shape, seed, file sizes)
is written last; a folder whose manifest matches is reused as it is.

``run`` measures each path in a child process (its own interpreter, one intra-op thread per
process): wall time, and peak resident memory of the whole process tree (psutil, polled every
20 ms) and of its largest process (the kernel's ``VmHWM``, exact). The paths:

* ``analyze`` / ``analyze-2``: ``spectrakit analyze FOLDER`` (streamed, one tensor at a time), one
  process, and under ``torchrun --nproc-per-node 2``;
* ``weightwatcher``: ``weightwatcher.WeightWatcher(model=FOLDER).analyze()``, its model-directory
  mode (it opens every shard with ``safe_open`` and reads the tensors lazily);
* ``compress-svd`` / ``compress-svd-2`` / ``compress-svd-warm`` / ``compress-svd-llm``: low-memory
  ``compress(FOLDER, method, out=DIR, low_memory=True)``, cold, under torchrun, with a spectrum
  cache filled by the cold run;
* ``pissa`` / ``pissa-2`` / ``pissa-warm``: PiSSA adapter init from the folder
  (``spectrakit.adapt.init_from_checkpoint``), cold, under torchrun, with a warm cache;
* ``baseline``: the interpreter with torch, transformers (and its Llama modeling code, which
  building the skeleton imports: 124 MB of heap) and spectrakit imported, nothing else —
  subtracted to give the memory each path adds; ``baseline-cli``: what ``spectrakit analyze``
  imports; ``baseline-ww``: weightwatcher imported.

The "largest block" is the bytes of the biggest decoder block's tensors (its attention and MLP
matrices and norms); the issue's bar is a peak of at most 1.5× that.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
SEED = 0
SHARD_BYTES = 1 << 30  # shards of at most 1 GiB, as Hugging Face writes them (it defaults to 5 GB)

# float32, hidden 1024, MLP 2816 (2.75×, Llama's ratio), 16 heads of 64 (no grouped KV, as Llama-2).
# The cost of a spectrum grows with the matrix's smaller side, so many moderate blocks keep one
# full pass over 8 GB within minutes on two cores. The vocabulary (8192) keeps the embedding below
# a block (0.65 of one, Llama-2-7B's own ratio: 524 MB against 808 MB).
SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 16,
         "vocab_size": 8192, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


# --- the checkpoint ---------------------------------------------------------------------------

def folder_for(size_gb: float) -> Path:
    return CACHE / f"llama-{size_gb:g}g"


def llama_config(size_gb: float) -> Any:
    """The Llama config whose float32 weights take at least ``size_gb`` × 10⁹ bytes."""
    from transformers import LlamaConfig

    hidden, inter, vocab = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    block = 4 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    outside = 4 * (2 * vocab * hidden + hidden)  # embeddings, untied head, final norm
    layers = max(1, math.ceil((size_gb * 1e9 - outside) / block))
    return LlamaConfig(num_hidden_layers=layers, **SHAPE)


def tensor_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor of the model, from a meta-device instance (no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def draw(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One tensor's values: norms are ones, matrices N(0, 0.02²), each from its own generator."""
    if len(shape) == 1:
        return torch.ones(shape)
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return torch.randn(shape, generator=generator).mul_(0.02)


def shard_plan(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """Tensor names per shard, in model order, each shard at most ``SHARD_BYTES``."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 4 * math.prod(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_shard(path: Path, names: list[str], shapes: dict[str, tuple[int, ...]], seed: int) -> int:
    """A safetensors file written one tensor at a time (header first, then each tensor's bytes)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        nbytes = 4 * math.prod(shapes[name])
        header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for name in names:
            handle.write(draw(name, shapes[name], seed).numpy().tobytes())
    os.replace(tmp, path)
    return offset


def manifest_of(config: Any, files: dict[str, int]) -> dict[str, Any]:
    return {"config": {k: getattr(config, k) for k in ("num_hidden_layers", *SHAPE)}, "seed": SEED,
            "dtype": "float32", "files": files}


def checkpoint(size_gb: float, *, quiet: bool = False) -> Path:
    """The folder of a ``size_gb`` checkpoint, generated unless a matching one is there."""
    folder = folder_for(size_gb)
    config = llama_config(size_gb)
    manifest = folder / "manifest.json"
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        sizes_ok = all((folder / f).is_file() and (folder / f).stat().st_size == n for f, n in saved["files"].items())
        if sizes_ok and saved == manifest_of(config, saved["files"]):
            return folder
        if not quiet:
            print(f"{folder}: manifest does not match; regenerating")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shapes = tensor_shapes(config)
    plan = shard_plan(shapes)
    start = time.perf_counter()
    weight_map, files, total = {}, {}, 0
    for index, names in enumerate(plan, 1):
        filename = f"model-{index:05d}-of-{len(plan):05d}.safetensors"
        total += write_shard(folder / filename, names, shapes, SEED)
        weight_map.update(dict.fromkeys(names, filename))
        files[filename] = (folder / filename).stat().st_size
        if not quiet:
            print(f"  {filename}: {len(names)} tensors, {files[filename] / 1e9:.2f} GB "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.dtype = "float32"
    config.to_json_file(str(folder / "config.json"))
    for extra in ("model.safetensors.index.json", "config.json"):
        files[extra] = (folder / extra).stat().st_size
    manifest.write_text(json.dumps(manifest_of(config, files), indent=1))
    return folder


def sizes(folder: Path) -> dict[str, Any]:
    """Bytes on disk, the largest decoder block's bytes and the largest tensor's."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    from transformers import LlamaConfig

    shapes = tensor_shapes(LlamaConfig(**{k: v for k, v in config.items() if k in (
        "num_hidden_layers", *SHAPE)}))
    blocks: dict[int, int] = {}
    for name, shape in shapes.items():
        if (block := block_of(name)) is not None:
            blocks[block] = blocks.get(block, 0) + 4 * math.prod(shape)
    return {"total_bytes": index["metadata"]["total_size"],
            "disk_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
            "shards": len(list(folder.glob("*.safetensors"))), "layers": config["num_hidden_layers"],
            "largest_block_bytes": max(blocks.values()),
            "largest_tensor_bytes": max(4 * math.prod(s) for s in shapes.values()),
            "matrices": sum(1 for s in shapes.values() if len(s) == 2)}



# --- measuring a child process ----------------------------------------------------------------

PYTHON = sys.executable
BIN = Path(PYTHON).parent


def one_thread_env() -> dict[str, str]:
    """One intra-op thread per process, for torch and for numpy/scipy's BLAS alike."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[key] = "1"
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def memory_status(pid: int) -> dict[str, int]:
    """``VmHWM`` (peak resident set), ``RssAnon`` and ``RssFile`` of a process, in bytes."""
    found = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key = line.split(":", 1)[0]
            if key in ("VmHWM", "RssAnon", "RssFile"):
                found[key] = int(line.split()[1]) * 1024
    return found


def measure(command: list[str], timeout: float, *, poll: float = 0.02) -> dict[str, Any]:
    """Wall time and peak memory of ``command`` (and every process it starts) in a fresh session.

    ``peak_rss_tree``: the largest sum of the tree's resident sets seen while polling;
    ``peak_rss_process``: the largest process's resident high-water mark (``VmHWM``, kept by the
    kernel, so a peak between two polls is not missed; only growth in the last poll interval
    before a process exits is); ``peak_anon_process`` / ``peak_file_process``: the largest
    polled anonymous (heap) and file-backed (memory-mapped shards, shared libraries) parts of it.
    ``ru_maxrss`` of ``wait4`` would not do: Linux carries the parent's resident set at ``fork``
    into the child's maximum. ``result``: what the child
    printed after ``SCALE_RESULT``.
    """
    import psutil

    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=one_thread_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=ROOT)
    peak_tree, timed_out, status = 0, False, 0
    usage: Any = None
    cpu: dict[int, float] = {}  # each process's user + system seconds, as last polled
    hwm: dict[int, int] = {}
    anon: dict[int, int] = {}  # polled: the kernel keeps no high-water mark of these two
    mapped: dict[int, int] = {}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        try:
            tree = [psutil.Process(proc.pid)]
            tree += tree[0].children(recursive=True)
            total = 0
            for member in tree:
                try:
                    total += member.memory_info().rss
                    times = member.cpu_times()
                    cpu[member.pid] = times.user + times.system
                    status_now = memory_status(member.pid)
                    hwm[member.pid] = max(hwm.get(member.pid, 0), status_now.get("VmHWM", 0))
                    anon[member.pid] = max(anon.get(member.pid, 0), status_now.get("RssAnon", 0))
                    mapped[member.pid] = max(mapped.get(member.pid, 0), status_now.get("RssFile", 0))
                except (psutil.Error, OSError):
                    pass
            peak_tree = max(peak_tree, total)
        except psutil.Error:
            pass
        if time.perf_counter() - start > timeout:
            timed_out = True
            os.killpg(proc.pid, 9)
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(poll)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.seek(0)
    output = log.read()
    log.close()
    os.unlink(log.name)
    result: dict[str, Any] = {}
    for line in output.splitlines():
        if line.startswith("SCALE_RESULT "):
            result = json.loads(line.removeprefix("SCALE_RESULT "))
    # CPU seconds of the whole tree (the kernel's, for the child and every descendant it reaped) and of
    # its busiest process (polled): with one thread per process these do not grow with other agents' load
    cpu_tree = usage.ru_utime + usage.ru_stime if usage is not None else math.nan
    return {"command": command, "wall_s": wall, "cpu_s": cpu_tree, "cpu_s_max_process": max(cpu.values(), default=0.0),
            "timed_out": timed_out, "returncode": proc.returncode,
            "peak_rss_tree": peak_tree, "peak_rss_process": max(hwm.values(), default=0),
            "peak_anon_process": max(anon.values(), default=0), "peak_file_process": max(mapped.values(), default=0),
            "result": result, "tail": "\n".join(output.splitlines()[-15:]) if proc.returncode else ""}


# --- what each child does ---------------------------------------------------------------------

RATIO = 0.3  # compress: remove 30 % of the decoder matrices' weights (uniform ranks)
RANK = 16  # PiSSA's adapter rank


def calibration_batches(batches: int, seq_len: int) -> list[torch.Tensor]:
    """Byte windows of the stdlib code corpus (the model's vocabulary covers the 256 byte values)."""
    from spectrakit.data import byte_batches, code_corpus

    return [x[:, :-1] for x in byte_batches(code_corpus("train", max_bytes=1 << 22), batch_size=1,
                                             seq_len=seq_len, seed=0, steps=batches)]


def join_group() -> int:
    """Under torchrun, join the gloo process group; this process's rank."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank() if dist.is_initialized() else 0


def unavailable(reason: str) -> None:
    """End a child whose path is not in the library (yet): the report says so instead of a figure."""
    print("SCALE_RESULT " + json.dumps({"unavailable": reason}), flush=True)
    raise SystemExit(3)


def missing(function: Any, *names: str) -> None:
    import inspect

    parameters = inspect.signature(function).parameters
    absent = [n for n in names if n not in parameters]  # named parameters: **options would take anything
    if absent:
        unavailable(f"{function.__module__}.{function.__name__} takes no {', '.join(absent)}")


def child(task: str, folder: Path, out: Path | None, cache: Path | None, warm: bool,
          calibration: tuple[int, int]) -> None:
    """One measured path, run in its own interpreter; prints ``SCALE_RESULT {json}``."""
    import inspect

    import spectrakit as sk

    if task != "baseline-cli":  # what the API paths import (analyze's CLI does without transformers)
        import transformers  # noqa: F401

    torch.set_num_threads(1)
    rank = join_group()
    start = time.perf_counter()
    info: dict[str, Any] = {}
    if task == "baseline":
        # what building the Llama skeleton imports (transformers loads the modeling code lazily):
        # 124 MB of resident heap on this machine that no streamed path can avoid
        import transformers.models.llama.modeling_llama  # noqa: F401
    elif task == "baseline-cli":
        pass
    elif task == "baseline-ww":
        import weightwatcher  # noqa: F401
    elif task == "weightwatcher":
        import logging
        import warnings

        import weightwatcher as ww

        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = ww.WeightWatcher(model=str(folder)).analyze()
        info["rows"] = len(frame)
    elif task in ("compress-svd", "compress-svd-llm"):
        missing(sk.compress, "low_memory", "out")
        method = task.removeprefix("compress-")
        options: dict[str, Any] = {"ratio": RATIO, "out": str(out), "low_memory": True}
        if cache is not None:
            if "cache" in inspect.signature(sk.compress).parameters:
                options["cache"] = str(cache)
            elif warm:
                unavailable("spectrakit.compress takes no cache= yet")
            else:
                info["cache"] = "not supported yet: run without one"
        if method != "svd":
            options["calibration"] = calibration_batches(*calibration)
        report = sk.compress(str(folder), method, **options)
        info["parameters_after"] = getattr(report, "parameters_after", None)
    elif task == "pissa":
        import spectrakit.adapt

        init_from_checkpoint = getattr(spectrakit.adapt, "init_from_checkpoint", None)
        if init_from_checkpoint is None:
            unavailable("spectrakit.adapt.init_from_checkpoint does not exist yet")
        missing(init_from_checkpoint, "out", "rank")
        if cache is not None and "cache" not in inspect.signature(init_from_checkpoint).parameters:
            if warm:
                unavailable("init_from_checkpoint takes no cache= yet")
            info["cache"] = "not supported yet: run without one"
            cache = None

        init_from_checkpoint(str(folder), "pissa", rank=RANK, out=str(out),
                             **({} if cache is None else {"cache": str(cache)}))
    else:
        raise SystemExit(f"unknown task {task!r}")
    if rank == 0:
        info["work_s"] = time.perf_counter() - start
        print("SCALE_RESULT " + json.dumps(info), flush=True)


# --- the measured paths -----------------------------------------------------------------------

RUNS = ("baseline-cli", "baseline-cli-2", "baseline", "baseline-2", "baseline-ww", "analyze", "analyze-2",
        "weightwatcher", "compress-svd", "compress-svd-2", "compress-svd-warm", "pissa", "pissa-2", "pissa-warm",
        "compress-svd-llm", "compress-svd-llm-2")


def run_command(name: str, folder: Path, scratch: Path, include: str | None,
                calibration: tuple[int, int]) -> list[str]:
    """The command line of one measured path (``-2``: under ``torchrun --nproc-per-node 2``)."""
    ranks = 2 if name.endswith("-2") else 1
    base = name.removesuffix("-2").removesuffix("-warm")
    launcher = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--no-python"] if ranks == 2 else []
    if base == "analyze":
        command = [str(BIN / "spectrakit"), "analyze", str(folder), "--out", str(scratch / name), "--quiet",
                   "--no-html"]
        return launcher + command + (["--include", include] if include else [])
    # the cold run of a path fills its cache, the -warm run reads it; -2 starts from an empty one
    cache = scratch / (f"cache-{base}" if ranks == 1 else f"cache-{base}-2")
    command = [PYTHON, str(Path(__file__).resolve()), "child", base, "--folder", str(folder),
               "--out", str(scratch / f"out-{name}"), "--calibration", f"{calibration[0]}x{calibration[1]}"]
    if base in ("compress-svd", "pissa"):
        command += ["--cache", str(cache)] + (["--warm"] if name.endswith("-warm") else [])
    return launcher + command


def deadline_of(text: str | None) -> float | None:
    """``HH:MM`` (UTC, today) as a Unix time, or ``None``."""
    if not text:
        return None
    import datetime as dt

    hours, minutes = (int(v) for v in text.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    return now.replace(hour=hours, minute=minutes, second=0, microsecond=0).timestamp()


def read_through(folder: Path) -> None:
    """Read every shard once, so each run starts with the checkpoint in the page cache (memory allowing)."""
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


def run(args: argparse.Namespace) -> None:
    folder = checkpoint(args.size_gb)
    facts = sizes(folder)
    print(f"machine: {machine()}\ncheckpoint: {folder} {facts}\n", flush=True)
    # NAME or NAME:SECONDS (that run's own timeout)
    wanted = [item.partition(":") for item in (args.only.split(",") if args.only else RUNS)]
    names = [name for name, _, _ in wanted]
    timeouts = {name: float(limit) if limit else args.timeout for name, _, limit in wanted}
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="scale-", dir=CACHE))
    calibration = tuple(int(v) for v in args.calibration.split("x"))
    results: dict[str, Any] = {}
    path = Path(args.json) if args.json else None
    if path and path.is_file() and args.resume:
        results = json.loads(path.read_text())["runs"]
    unknown = [name for name in names if name not in RUNS]
    if unknown:
        raise SystemExit(f"unknown run {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    deadline = deadline_of(args.deadline)
    for name in names:
        command = run_command(name, folder, scratch, args.include, calibration)  # type: ignore[arg-type]
        print(f"{name}: {' '.join(command)}", flush=True)
        left = deadline - time.time() if deadline else math.inf
        if left < 30:
            results[name] = {"command": command, "skipped": f"not run: the time window ended ({args.deadline} UTC)"}
            print("  " + results[name]["skipped"], flush=True)
            continue
        read_through(folder)
        result = measure(command, min(timeouts[name], left))
        result["threads_per_process"] = 1
        results[name] = result
        for output in scratch.glob(f"out-{name}"):
            shutil.rmtree(output, ignore_errors=True)  # the outputs are several GB; the caches stay
        print(f"  wall {result['wall_s']:.1f} s, peak tree {result['peak_rss_tree'] / 1e6:.0f} MB, "
              f"largest process {result['peak_rss_process'] / 1e6:.0f} MB, rc {result['returncode']}"
              f"{' TIMED OUT' if result['timed_out'] else ''} {result['result']}\n{result['tail']}", flush=True)
        if path:
            path.write_text(json.dumps({"machine": machine(), "checkpoint": str(folder), "sizes": facts,
                                        "include": args.include, "runs": results}, indent=1))
    print()
    print(report(results, facts))
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)


def baseline_of(name: str) -> str:
    """The baseline run whose imports match this run's (analyze's CLI imports no transformers)."""
    if name.startswith("baseline"):
        return name
    return {"analyze": "baseline-cli", "weightwatcher": "baseline-ww"}.get(name.split("-")[0], "baseline")


def seconds(value: float) -> object:
    """Seconds as the table shows them: whole from 100 on (``.3g`` would write 1.4e+03), else 0.1."""
    if math.isnan(value):
        return "–"
    return int(round(value)) if abs(value) >= 100 else round(value, 1)


def report(results: dict[str, Any], facts: dict[str, Any]) -> str:
    block = facts["largest_block_bytes"]
    rows = []
    for name, r in results.items():
        if "skipped" in r:
            rows.append([name, r["skipped"]] + [""] * 11)
            continue
        peak = r["peak_rss_process"]
        base = results.get(baseline_of(name), {}).get("peak_rss_process", 0)
        if "unavailable" in r["result"]:
            rows.append([name, "not available: " + r["result"]["unavailable"]] + [""] * 11)
            continue
        rows.append([name, "timed out" if r["timed_out"] else ("failed" if r["returncode"] else "ok"),
                     seconds(r["wall_s"]), seconds(r["result"].get("work_s", math.nan)),
                     seconds(r.get("cpu_s", math.nan)), seconds(r.get("cpu_s_max_process", math.nan)),
                     round(r["peak_rss_tree"] / 1e6),
                     round(peak / 1e6), round(r.get("peak_anon_process", 0) / 1e6),
                     round(r.get("peak_file_process", 0) / 1e6), round(peak / block, 2), round((peak - base) / 1e6),
                     round((peak - base) / block, 2)])
    table = markdown_table(["run", "status", "wall s", "work s", "CPU s (tree)", "CPU s (busiest process)",
                            "peak tree MB", "peak process MB",
                            "of it anon. MB", "file MB", "process ÷ block", "process − baseline MB",
                            "(process − baseline) ÷ block"], rows)
    return table + "\n\n" + markdown_table(["ratio", "wall", "wall without start-up", "CPU (busiest process)",
                                            "CPU without start-up"], ratios(results))


RATIOS = (("analyze-2", "analyze", "2 ranks ÷ 1 rank"), ("compress-svd-2", "compress-svd", "2 ranks ÷ 1 rank"),
          ("pissa-2", "pissa", "2 ranks ÷ 1 rank"), ("compress-svd-llm-2", "compress-svd-llm", "2 ranks ÷ 1 rank"),
          ("compress-svd", "compress-svd-warm", "cold ÷ warm"), ("pissa", "pissa-warm", "cold ÷ warm"),
          ("weightwatcher", "analyze", "weightwatcher ÷ analyze"))


def startup(results: dict[str, Any], name: str, key: str = "wall_s") -> float:
    """Seconds (``key``: wall, or the busiest process's CPU) an empty run of the same launcher
    takes (interpreter, imports, torchrun's rendezvous)."""
    ranks = "-2" if name.endswith("-2") else ""
    reference = ("baseline-cli" if name.startswith("analyze") else baseline_of(name)) + ranks
    run = results.get(reference, {})
    return float(run.get(key, 0.0)) if run.get("returncode") == 0 else 0.0


def ratios(results: dict[str, Any]) -> list[list[object]]:
    def ok(name: str) -> bool:
        run = results.get(name, {})
        return run.get("returncode") == 0 and not run.get("timed_out")

    rows: list[list[object]] = []
    for top, bottom, label in RATIOS:
        if ok(top) and ok(bottom):
            a, b = results[top]["wall_s"], results[bottom]["wall_s"]
            a_net, b_net = a - startup(results, top), b - startup(results, bottom)
            # with one thread per process, the busiest process's CPU seconds are the wall time a
            # machine with a free core per rank would show (other agents' load does not enter)
            key = "cpu_s_max_process"
            cpu_a, cpu_b = (results[n].get(key, math.nan) for n in (top, bottom))
            cpu_a_net, cpu_b_net = cpu_a - startup(results, top, key), cpu_b - startup(results, bottom, key)
            rows.append([f"{top} ÷ {bottom} ({label})", round(a / b, 3), round(a_net / b_net, 3),
                         round(cpu_a / cpu_b, 3) if cpu_b else math.nan,
                         round(cpu_a_net / cpu_b_net, 3) if cpu_b_net else math.nan])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["generate", "run", "child", "report"])
    parser.add_argument("task", nargs="?", help="child only: the path to run")
    parser.add_argument("--size-gb", type=float, default=8.6, help="checkpoint size in 10⁹ bytes (default 8.6)")
    parser.add_argument("--only", help="comma-separated runs, in this order, each NAME or NAME:SECONDS (its own "
                        "timeout); default all: " + ", ".join(RUNS))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run before it is killed")
    parser.add_argument("--include", help="analyze only: matrices matching this pattern (for sizing runs)")
    parser.add_argument("--calibration", default="8x256", help="svd-llm calibration: batches x tokens (default 8x256)")
    parser.add_argument("--json", help="write every figure to this JSON file (after each run)")
    parser.add_argument("--deadline", help="HH:MM UTC: runs that would start later are reported as not run, "
                        "and each run's timeout ends there")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --json")
    parser.add_argument("--scratch", help="folder for outputs and caches (default: a fresh one under bench/.cache)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--merge", nargs="*", default=[], help="report: JSON files of run (later ones win per "
                        "run), merged into --json and printed as the tables")
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.action == "generate":
        folder = checkpoint(args.size_gb)
        print(folder, sizes(folder))
    elif args.action == "report":
        merged: dict[str, Any] = {}
        for name in args.merge:
            part = json.loads(Path(name).read_text())
            merged = {**part, "runs": {**merged.get("runs", {}), **part["runs"]}}
        if args.json:
            Path(args.json).write_text(json.dumps(merged, indent=1))
        print(report(merged["runs"], merged["sizes"]))
    elif args.action == "child":
        child(args.task, args.folder, args.out, args.cache, args.warm,
              tuple(int(v) for v in args.calibration.split("x")))  # type: ignore[arg-type]
    else:
        run(args)


if __name__ == "__main__":
    main()
