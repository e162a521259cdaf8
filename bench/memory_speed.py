"""Peak memory and samples/s of one training step (forward + InfoNCE + backward + AdamW step) of a ViT-tiny
dual encoder on CPU, for each memory/speed switch against the baseline: ``grad_checkpointing``
(``DualEncoder(grad_checkpointing=True)``), ``patch_dropout_0.5`` (``ImageTower(..., patch_dropout=0.5)``),
``compile`` (``DualEncoder(compile=True)``, compile time excluded) and ``bf16_mixed`` (the forward and loss
under ``torch.autocast("cpu", dtype=torch.bfloat16)``, as Lightning's ``bf16-mixed`` does).

Every configuration runs in its own subprocess (``--worker CONFIG``), built from the same seed on the same
batch. Memory (one short-lived worker each, with ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` set so
freed tensors go back to the OS): after warm-up steps (optimizer state exists), the rise of the peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) over the resident set before one step,
median of ``--repeats``; and, deterministic, the bytes of tensors saved for backward during the forward
(``saved_tensors_hooks``; parameters and the input batch excluded; with checkpointing, what is saved outside
the recomputed segments plus the segments' inputs). Speed (one long-lived worker each, ordinary malloc
settings): ``--rounds`` rounds of ``--steps`` timed steps, the configurations interleaved step by step;
samples/s from the median step time; "cores busy" (process CPU time / step time, median) is 2.0 when
the step had both cores to itself, less when other work on the machine took them. A baseline worker at
twice the batch checks the memory method.
Rewrites the memory/speed section of docs/results.md. Last line: one JSON object with every figure and
``ratio`` = grad_checkpointing / baseline peak step memory (target <= 0.6).

    python bench/memory_speed.py [--batch-size 16] [--steps 4] [--warmup 2] [--rounds 3] [--repeats 2]
                                 [--configs baseline,...] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from autoglm_train.losses.infonce import infonce_loss
from autoglm_train.model import towers as towers_module
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.towers import ImageTower, TextTower

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_memory import PeakMemory  # noqa: E402  (loss_comparison, which imports Lightning, only to write)

CONFIGS = ("baseline", "grad_checkpointing", "patch_dropout_0.5", "compile", "bf16_mixed")
IMAGE_MODEL, IMAGE_SIZE = "vit_tiny_patch16_224", 224
VOCAB, TEXT_WIDTH, TEXT_DEPTH, TEXT_HEADS, CONTEXT, EMBED = 1000, 256, 4, 4, 32, 256
OPTIMIZER = partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
MARK = "@@memory_speed "  # worker lines on stdout start with this; anything else a library prints is ignored
MiB = 2**20
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
TARGET_CKPT_MEMORY, TARGET_CKPT_TIME, TARGET_DROPOUT_SPEED = 0.6, 1.4, 1.5
CONTENDED = (
    "the steps mostly ran on less than the 2 cores asked for (cores busy < 1.6): other work was using "
    "the machine, and the speed figures measure that contention as much as the switches (OpenMP threads "
    "that lose their core stall each other), so the speed ratios are unreliable; the memory figures are "
    "not affected"
)


# ----------------------------------------------------------------------------------------------- worker


def make_batch(batch_size: int) -> dict[str, torch.Tensor]:
    """Random images; random token ids with random lengths (id 0 = padding after the end), the first row
    full, so the text tower always runs all ``CONTEXT`` positions whatever the batch size."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    tokens = torch.randint(1, VOCAB, (batch_size, CONTEXT), generator=g)
    lengths = torch.randint(CONTEXT // 4, CONTEXT + 1, (batch_size,), generator=g)
    lengths[0] = CONTEXT
    tokens[torch.arange(CONTEXT)[None, :] >= lengths[:, None]] = 0
    return {"image": images, "text": tokens}


def build(config: str) -> DualEncoder:
    torch.manual_seed(0)  # same initial weights in every configuration
    image = ImageTower(IMAGE_MODEL, patch_dropout=0.5 if config == "patch_dropout_0.5" else 0.0)
    text = TextTower(VOCAB, TEXT_WIDTH, TEXT_DEPTH, TEXT_HEADS, CONTEXT)
    return DualEncoder(
        image,
        text,
        embed_dim=EMBED,
        grad_checkpointing=config == "grad_checkpointing",
        compile=config == "compile",
    )


def autocast(config: str):
    if config == "bf16_mixed":  # Lightning's bf16-mixed: forward + loss under autocast, backward outside
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: DualEncoder, optimizer, batch: dict, config: str) -> None:
    with autocast(config):
        image, text, scale = model(batch["image"], batch["text"])
        loss = infonce_loss(image, text, image, text, scale)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # no gradients live between steps


class SavedBytes:
    """Bytes of distinct storages saved for backward, by phase; ``exclude``: storages not to count."""

    def __init__(self, exclude: set[int]) -> None:
        self.seen = set(exclude)
        self.bytes: dict[str, int] = {}
        self.current = ""

    def add(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = storage.data_ptr()
        if key and key not in self.seen:
            self.seen.add(key)
            self.bytes[self.current] = self.bytes.get(self.current, 0) + storage.nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    @contextlib.contextmanager
    def phase(self, name: str):
        self.current = name
        self.bytes.setdefault(name, 0)
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield

    @contextlib.contextmanager
    def counting_checkpoint_inputs(self):
        """A checkpointed segment keeps its inputs alive (non-reentrant checkpoint holds them in the
        recompute closure, unseen by saved-tensor hooks): count them too."""
        original = torch.utils.checkpoint.checkpoint

        def counted(function, *args, **kwargs):
            for a in args:
                if isinstance(a, torch.Tensor):
                    self.add(a)
            return original(function, *args, **kwargs)

        torch.utils.checkpoint.checkpoint = counted  # what timm's checkpoint_seq calls
        towers_module.checkpoint = counted  # TextTower's own import
        try:
            yield
        finally:
            torch.utils.checkpoint.checkpoint = original
            towers_module.checkpoint = original


def saved_for_backward(model: DualEncoder, optimizer, batch: dict, config: str) -> dict[str, int]:
    """One training step whose forward is split by phase (the same calls as ``DualEncoder.forward``)."""
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {t.untyped_storage().data_ptr() for t in batch.values()}
    counter = SavedBytes(exclude)
    with counter.counting_checkpoint_inputs(), autocast(config):
        with counter.phase("image"):
            image = model.encode_image(batch["image"])
        with counter.phase("text"):
            text = model.encode_text(batch["text"])
        with counter.phase("loss"):
            loss = infonce_loss(image, text, image, text, model.logit_scale())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return counter.bytes


def emit(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    config = args.worker
    try:
        model = build(config)
        model.train()
        optimizer = OPTIMIZER(model.param_groups(0.1))
        batch = make_batch(args.batch_size)
        start = time.perf_counter()
        train_step(model, optimizer, batch, config)  # compiles, under compile
        first = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            train_step(model, optimizer, batch, config)
        warmup_s = time.perf_counter() - start
    except Exception as exc:  # reported as the configuration's figure, e.g. compile failing on this CPU
        emit({"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"})
        return
    emit({"event": "ready", "first_step_s": first, "warmup_s": warmup_s})

    if args.mode == "memory":
        peaks, before = [], []
        for _ in range(args.repeats):
            with PeakMemory(torch.device("cpu")) as memory:
                train_step(model, optimizer, batch, config)
            peaks.append(memory.peak)
            before.append(memory.before)
        gc.collect()
        saved = saved_for_backward(model, optimizer, batch, config)
        emit(
            {
                "peak_step_bytes": statistics.median(peaks),
                "peaks": peaks,
                "rss_before_bytes": statistics.median(before),
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "saved_bytes": saved,
            }
        )
        return

    for line in sys.stdin:  # speed: "time N" -> N timed steps; anything else -> exit
        words = line.split()
        if not words or words[0] != "time":
            return
        times, cpu = [], []
        for _ in range(int(words[1])):
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(model, optimizer, batch, config)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        emit({"times": times, "cpu": cpu})


# ------------------------------------------------------------------------------------------------- main


class Worker:
    """A ``--worker`` subprocess; its stderr goes to a file, shown only if it fails."""

    def __init__(self, config: str, mode: str, batch_size: int, args, env: dict[str, str]) -> None:
        self.config = config
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            config,
            "--mode",
            mode,
            "--batch-size",
            str(batch_size),
            "--warmup",
            str(args.warmup),
            "--repeats",
            str(args.repeats),
            "--threads",
            str(args.threads),
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, **env},
        )

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        self.proc.wait()
        self.log.seek(0)
        tail = self.log.read()[-3000:]
        raise RuntimeError(f"worker {self.config} exited ({self.proc.returncode}) without a result:\n{tail}")

    def send(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


def measure_memory(config: str, batch_size: int, args, env: dict[str, str]) -> dict:
    w = Worker(config, "memory", batch_size, args, {**env, **MALLOC_ENV})
    try:
        ready = w.read()
        result = ready if "error" in ready else {**ready, **w.read()}
    finally:
        w.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile happens here)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="measured steps for peak memory (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/results.md alone")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("memory", "speed"), default="speed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    started = time.perf_counter()
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown or configs[0] != "baseline":
        parser.error(f"--configs: known {CONFIGS}, baseline first; got {args.configs}")
    env: dict[str, str] = {}  # inductor's on-disk cache as found: warm after an earlier run
    load_start = os.getloadavg()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", file=sys.stderr, flush=True)

    # memory: one short-lived worker per configuration, one after another
    memory: dict[str, dict] = {}
    for config in configs:
        memory[config] = measure_memory(config, args.batch_size, args, env)
        m = memory[config]
        log(
            f"memory {config:>18}: "
            + (
                m["error"]
                if "error" in m
                else f"peak step {m['peak_step_bytes'] / MiB:7.1f} MiB, "
                f"saved {sum(m['saved_bytes'].values()) / MiB:7.1f} MiB"
            )
        )
    double = measure_memory("baseline", 2 * args.batch_size, args, env)
    log(f"memory baseline @ batch {2 * args.batch_size}: peak step {double['peak_step_bytes'] / MiB:.1f} MiB")

    # speed: one long-lived worker per configuration, warmed up, then round-robin
    workers: dict[str, Worker] = {}
    speed: dict[str, dict] = {c: {"times": [], "cpu": [], "rounds": []} for c in configs}
    try:
        for config in configs:
            if "error" in memory[config]:
                speed[config]["error"] = memory[config]["error"]
                continue
            w = Worker(config, "speed", args.batch_size, args, env)
            ready = w.read()
            if "error" in ready:
                speed[config]["error"] = ready["error"]
                w.close()
                continue
            workers[config] = w
            speed[config]["first_step_s"] = ready["first_step_s"]
            log(f"speed  {config:>18}: ready (first step {ready['first_step_s']:.1f} s)")
        for r in range(args.rounds):
            # round-robin step by step: a change in the machine's load hits every configuration alike
            times: dict[str, list[float]] = {c: [] for c in workers}
            for _ in range(args.steps):
                for config, w in workers.items():
                    reply = w.send("time 1")
                    times[config] += reply["times"]
                    speed[config]["cpu"] += reply["cpu"]
            for config in workers:
                speed[config]["times"] += times[config]
                speed[config]["rounds"].append(args.batch_size / statistics.median(times[config]))
            log(
                f"round {r + 1}/{args.rounds} samples/s: "
                + ", ".join(f"{c} {speed[c]['rounds'][-1]:.2f}" for c in workers)
            )
    finally:
        for w in workers.values():
            w.close()

    figures = summarize(configs, memory, speed, double, args)
    figures["load_average_1min"] = [round(load_start[0], 2), round(os.getloadavg()[0], 2)]
    figures["elapsed_s"] = round(time.perf_counter() - started, 1)
    table = render(configs, figures, args)
    print(table)
    print(
        f"machine load average (1 min) at start / end: {figures['load_average_1min'][0]} / "
        f"{figures['load_average_1min'][1]} on {os.cpu_count()} cores; took {figures['elapsed_s']:.0f} s"
    )
    if figures["contended"]:
        print(f"WARNING: {CONTENDED}")
    if not args.no_write:
        from loss_comparison import RESULTS, replace_section

        text = RESULTS.read_text() if RESULTS.exists() else "# Results\n"
        RESULTS.write_text(replace_section(text, "memory_speed", docs_section(table, figures, args)))
    print(json.dumps(figures))


def summarize(configs, memory, speed, double, args) -> dict:
    out: dict = {
        "bench": "memory_speed",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": args.threads,
        "configs": {},
    }
    base_mem, base_speed = memory["baseline"], speed["baseline"]
    base_peak = base_mem["peak_step_bytes"]
    base_saved = sum(base_mem["saved_bytes"].values())
    base_step = statistics.median(base_speed["times"])
    for config in configs:
        m, s = memory[config], speed[config]
        row: dict = {}
        if "error" in m:
            row["error"] = m["error"]
        else:
            saved = sum(m["saved_bytes"].values())
            row |= {
                "peak_step_mib": round(m["peak_step_bytes"] / MiB, 1),
                "peak_step_ratio": round(m["peak_step_bytes"] / base_peak, 3),
                "saved_mib": round(saved / MiB, 1),
                "saved_mib_by_phase": {k: round(v / MiB, 1) for k, v in m["saved_bytes"].items()},
                "saved_ratio": round(saved / base_saved, 3),
                "rss_before_mib": round(m["rss_before_bytes"] / MiB, 1),
                "trainable_params": m["trainable_params"],
            }
        if s["times"]:
            step = statistics.median(s["times"])
            row |= {
                "step_s": round(step, 3),
                "step_time_ratio": round(step / base_step, 3),
                "samples_per_s": round(args.batch_size / step, 2),
                "speed_ratio": round(base_step / step, 3),
                "step_cpu_s": round(statistics.median(s["cpu"]), 3),
                "cores_busy": round(
                    statistics.median([c / t for c, t in zip(s["cpu"], s["times"], strict=True)]), 2
                ),
                "samples_per_s_by_round": [round(x, 2) for x in s["rounds"]],
                "first_step_s": round(s["first_step_s"], 1),
            }
        elif "error" in s:
            row["error"] = s["error"]
        out["configs"][config] = row
    c = out["configs"]
    out["scaling_check"] = {
        "batch": 2 * args.batch_size,
        "peak_step_mib": round(double["peak_step_bytes"] / MiB, 1),
        "peak_step_ratio_vs_batch": round(double["peak_step_bytes"] / base_peak, 3),
        "saved_ratio_vs_batch": round(sum(double["saved_bytes"].values()) / base_saved, 3),
    }
    targets = {}
    ckpt = c.get("grad_checkpointing", {})
    if "peak_step_ratio" in ckpt and "step_time_ratio" in ckpt:
        targets["grad_checkpointing_memory"] = ckpt["peak_step_ratio"] <= TARGET_CKPT_MEMORY
        targets["grad_checkpointing_time"] = ckpt["step_time_ratio"] <= TARGET_CKPT_TIME
    drop = c.get("patch_dropout_0.5", {})
    if "speed_ratio" in drop:
        targets["patch_dropout_speed"] = drop["speed_ratio"] >= TARGET_DROPOUT_SPEED
    out["targets_met"] = targets
    busy = [r["cores_busy"] for r in c.values() if "cores_busy" in r]
    out["contended"] = bool(busy) and statistics.median(busy) < 1.6
    out["ratio"] = ckpt.get("peak_step_ratio")
    return out


def render(configs, figures, args) -> str:
    head = (
        "| configuration | peak step MiB | x baseline | saved for backward MiB (image / text / loss) "
        "| x baseline | step s | samples/s | x baseline | samples/s by round | cores busy |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for config in configs:
        r = figures["configs"][config]
        mem = (
            f"{r['peak_step_mib']:.1f} | {r['peak_step_ratio']:.2f} | {r['saved_mib']:.1f} ("
            + " / ".join(f"{r['saved_mib_by_phase'][p]:.1f}" for p in ("image", "text", "loss"))
            + f") | {r['saved_ratio']:.2f}"
            if "peak_step_mib" in r
            else "- | - | - | -"
        )
        spd = (
            f"{r['step_s']:.2f} | {r['samples_per_s']:.1f} | {r['speed_ratio']:.2f} | "
            + " / ".join(f"{x:.1f}" for x in r["samples_per_s_by_round"])
            + f" | {r['cores_busy']:.2f}"
            if "step_s" in r
            else "- | - | - | - | -"
        )
        error = f" (error: {r['error']})" if "error" in r else ""
        rows.append(f"| {config}{error} | {mem} | {spd} |")
    return head + "\n" + "\n".join(rows)


def docs_section(table: str, figures: dict, args) -> str:
    c, t, s = figures["configs"], figures["targets_met"], figures["scaling_check"]
    ckpt, drop = c.get("grad_checkpointing", {}), c.get("patch_dropout_0.5", {})
    met = {True: "met", False: "**not met**"}
    params = c["baseline"]["trainable_params"]
    sane = (
        "it does"
        if 1.8 <= s["peak_step_ratio_vs_batch"] <= 2.2
        else "**it does not: do not trust the peak figures**"
    )
    lines = [
        "## Memory and speed switches",
        "",
        f"`python bench/memory_speed.py --batch-size {args.batch_size} --steps {args.steps} "
        f"--rounds {args.rounds}`: one training step (forward, InfoNCE, backward, AdamW step) of a dual "
        f"encoder with timm `{IMAGE_MODEL}` ({IMAGE_SIZE} px, random init) and our `TextTower` (width "
        f"{TEXT_WIDTH}, depth {TEXT_DEPTH}, {TEXT_HEADS} heads, context {CONTEXT}, random tokens with "
        f"padding), embed {EMBED}, batch {args.batch_size}, fp32 weights, CPU, {args.threads} threads, on "
        "a machine with 2 CPU cores shared with other work (AMD EPYC with AVX-512 BF16). Each "
        "configuration runs in its own process from the same initial weights and batch.",
        "",
        "- **Peak step memory**: after model, optimizer state and "
        f"{args.warmup} warm-up steps, the rise of the process's peak resident set (`VmHWM`, reset through "
        "`/proc/self/clear_refs`) over its resident set just before one step (activations, gradients and "
        f"the optimizer's temporaries), median of {args.repeats} steps; the worker runs with "
        "`MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0` so freed tensors leave the resident set.",
        "- **Saved for backward**: bytes of distinct storages saved for backward during the forward "
        "(`torch.autograd.graph.saved_tensors_hooks`; parameters and the input batch excluded; with "
        "checkpointing, what is saved outside the recomputed segments plus the segments' inputs, which "
        "the checkpoint keeps alive). Deterministic; split into image tower / text tower / loss.",
        f"- **Speed**: samples/s from the median step time over {args.rounds} rounds x {args.steps} "
        "timed steps, the configurations interleaved round-robin step by step (each in a warmed-up "
        "process of its own, ordinary malloc settings). *Cores busy* is the process's CPU time over "
        "the step's wall time (median): 2.0 when the step had both cores to itself, less when other "
        "work took them "
        f"(load average {figures['load_average_1min'][0]} at the start, "
        f"{figures['load_average_1min'][1]} at the end, on 2 cores). Compile time is spent in "
        "the warm-up and excluded (first compiled step "
        f"{c.get('compile', {}).get('first_step_s', '-')} s, with inductor's on-disk cache as found). "
        f"The whole run took {figures['elapsed_s']:.0f} s.",
        "",
        table,
        "",
        f"Method check: at batch {s['batch']} the baseline's peak step memory is "
        f"{s['peak_step_ratio_vs_batch']:.2f}x that at batch {args.batch_size} (saved for backward "
        f"{s['saved_ratio_vs_batch']:.2f}x). Without checkpointing the peak falls at the start of backward, "
        "before any gradient exists, so it is almost all saved activations and should double with the "
        f"batch: {sane}. With checkpointing the peak comes later in backward: saved tensors + one "
        "block's recomputed activations + the fp32 gradients "
        f"({params / 1e6:.1f} M parameters, {params * 4 / MiB:.0f} MiB), a part that does not shrink "
        "with the batch, so the checkpointing ratio improves at larger batches.",
        "",
    ]
    if figures["contended"]:
        lines += [f"**Warning**: {CONTENDED}.", ""]
    unreliable = " (speed unreliable: machine contended)" if figures["contended"] else ""
    lines.append("Targets:")
    if "grad_checkpointing_memory" in t:
        lines.append(
            f"- gradient checkpointing cuts peak step memory by >= 40 %: "
            f"{(1 - ckpt['peak_step_ratio']) * 100:.0f} % cut ({ckpt['peak_step_ratio']:.2f}x baseline; "
            f"saved for backward {ckpt['saved_ratio']:.2f}x), {met[t['grad_checkpointing_memory']]}; "
            f"at <= 1.4x step time: {ckpt['step_time_ratio']:.2f}x, {met[t['grad_checkpointing_time']]}"
            f"{unreliable}."
        )
    if "patch_dropout_speed" in t:
        lines.append(
            f"- patch dropout 0.5 gives >= 1.5x samples/s: {drop['speed_ratio']:.2f}x, "
            f"{met[t['patch_dropout_speed']]}{unreliable}."
        )
    for config in ("compile", "bf16_mixed"):
        r = c.get(config, {})
        if "error" in r:
            lines.append(f"- {config}: failed: `{r['error']}`.")
        elif "speed_ratio" in r:
            lines.append(
                f"- {config} (no target): {r['speed_ratio']:.2f}x samples/s, "
                f"{r['peak_step_ratio']:.2f}x peak step memory{unreliable}."
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
