"""Samples/s of our training step against open_clip's own, on the same towers, batch, precision and data.

open_clip's side is ``open_clip_train.train.train_one_epoch`` itself (its autocast, ``ClipLoss``,
backward, optimizer step and logit-scale clamp), on an ``open_clip.CLIP`` built from a timm tower config
(``timm_model_name``, average pool, linear projection) and a text transformer of our width, depth, heads
and context (no causal mask, first-token pool, as ours), with the AdamW that ``open_clip_train.main``
builds (no weight decay on gains and biases). Ours is the default job's: ``build_model`` from the composed
config, ``DualEncoderModule`` with the configured optimizer, a Lightning Trainer with the callbacks every
run has. Each framework keeps its own defaults beyond the towers (ours: channels_last, fused AdamW).

Two figures, rounds interleaved (ours, open_clip, ours, ...), median samples/s over rounds:
- ``same_batches``: both fed the same in-memory batches (read once from our pipeline);
- ``own_pipelines``: each reads the embedded shapes shards through its own pipeline (ours: the default
  job's ``ShardDataModule``; open_clip: ``get_wds_dataset``'s stages, with its shuffle sizes and its
  ``image_transform``), with the same loader workers and our tokenizer (the text towers share a
  vocabulary). Loading is inside the timed steps.

``--compile`` compiles both sides (compilation happens in the warm-up steps, which are not timed):
- ``none`` (default): both eager;
- ``towers``: ours ``model.compile=towers`` (``torch.compile`` of each tower's forward);
- ``step``: ours ``model.compile=step`` (the forward and the loss as one compiled function, backward through
  AOTAutograd's compiled backward: ``autoglm_train/lit/compiled_step.py``).
With ``towers`` or ``step``, open_clip runs as ``open_clip_train.main --torchcompile`` does,
``torch.compile(model)`` (its forward; the loss, backward and optimizer stay eager: the open_clip_train
installed has no other compile option). Each side starts every round with dynamo's caches emptied
(``torch._dynamo.reset()``), so a round never runs on another round's compiled code nor falls back to eager
past dynamo's recompile limit. Run once per mode; each run's JSON names its mode (``compile``, ``figure``).

Last line: one JSON object; ``ratio`` = ours / open_clip with their own pipelines.

    python bench/vs_open_clip.py [--batch-size 128] [--steps 15] [--warmup 3] [--rounds 3]
        [--precision bf16-mixed|32-true] [--threads N] [--compile none|towers|step] [--no-write]
    # compiled: more warm-up steps (the first compiles; a new text length may compile once more)
    python bench/vs_open_clip.py --compile step --warmup 5
    # on a GPU: ViT-B/16 at 224 px, bf16, batch 256, with model FLOPs utilisation
    python bench/vs_open_clip.py --device cuda --image-model vit_base_patch16_224 --image-size 224 \\
        --batch-size 256 --precision bf16-mixed --peak-tflops 989
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import open_clip
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from open_clip_train.train import train_one_epoch
from torch.utils.flop_counter import FlopCounterMode

from autoglm_train.build import build_model, build_tokenizer, split_optimizer_config
from autoglm_train.data.shards import expand_shards
from autoglm_train.lit.module import DualEncoderModule
from autoglm_train.utils.hardware import cpu_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_comparison import RESULTS, ROOT, replace_section  # noqa: E402
from step_overhead import synced_clock, timed_trainer  # noqa: E402

OPEN_CLIP_PRECISION = {"32-true": "fp32", "bf16-mixed": "amp_bf16"}
# --compile: ours as model.compile=...; open_clip compiled (as its --torchcompile) unless none
COMPILE = {"none": "false", "towers": "towers", "step": "step"}


def default_job_config(args):
    overrides = [
        f"data.batch_size={args.batch_size}",
        f"trainer.precision={args.precision}",
        f"model.image_tower.name={args.image_model}",
        f"data.image_size={args.image_size}",
        f"model.compile={COMPILE[args.compile]}",
        "logger=none",
        *args.override,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def open_clip_model(cfg, vocab_size: int, image_size: int) -> open_clip.CLIP:
    text = cfg.model.text_tower
    return open_clip.CLIP(
        output_dict=True,  # as open_clip_train builds it
        embed_dim=cfg.model.embed_dim,
        vision_cfg={
            "timm_model_name": cfg.model.image_tower.name,
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": image_size,
        },
        text_cfg={
            "context_length": text.context_length,
            "vocab_size": vocab_size,
            "width": text.width,
            "heads": text.heads,
            "layers": text.depth,
            "mlp_ratio": text.mlp_ratio,
            "no_causal_mask": True,
            "pool_type": "first",
        },
    )


def open_clip_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """As open_clip_train.main builds it."""

    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {
                "params": [p for n, p in named if not exclude(n, p)],
                "weight_decay": cfg.optimizer.weight_decay,
            },
        ],
        lr=cfg.optimizer.lr,
        betas=tuple(cfg.optimizer.betas),
        eps=cfg.optimizer.eps,
    )


def open_clip_loader(shards, tokenizer, preprocess, batch_size: int, workers: int):
    """``open_clip_train.data.get_wds_dataset``'s training stages (shard and sample shuffles of its
    sizes, PIL decode, rename, map, batch); the caption is the json's first."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(expand_shards(shards)),
        wds.shuffle(bufsize=2000, initial=500),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(bufsize=5000, initial=1000),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="json"),
        wds.map_dict(image=preprocess, text=lambda meta: tokenizer([meta["captions"][0]])[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch_size, partial=False),
    )
    # page-locked on a GPU, as open_clip_train's loader is
    pin = torch.cuda.is_available()
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin)


def padded(tokens: torch.Tensor, cfg) -> torch.Tensor:
    """Our loader's batches back to the full context (ours drop all-padding columns; open_clip's text
    tower adds its positional embedding to the whole context)."""
    return torch.nn.functional.pad(tokens, (0, cfg.model.text_tower.context_length - tokens.shape[1]))


class DataInfo:
    """What train_one_epoch reads of ``open_clip_train.data.DataInfo`` (that module needs pandas)."""

    def __init__(self, dataloader):
        self.dataloader = dataloader

    def set_epoch(self, epoch: int) -> None:
        pass


class Timed:
    """Yields ``warmup + steps`` batches of ``batches`` to open_clip's loop; the clock runs from handing
    over batch ``warmup`` until the loop asks for the batch after the last (its step is done)."""

    def __init__(self, batches, warmup: int, steps: int, batch_size: int):
        self.batches, self.warmup, self.steps = batches, warmup, steps
        self.num_batches, self.num_samples = warmup + steps, (warmup + steps) * batch_size
        self.start = self.end = 0.0

    def __iter__(self):
        for i, batch in enumerate(itertools.islice(self.batches, self.warmup + self.steps)):
            if i == self.warmup:
                self.start = synced_clock()
            yield batch
        self.end = synced_clock()


def fresh_compile_caches(args) -> None:
    """A compiled run starts without any earlier round's compiled code (nor its recompile count)."""
    if args.compile != "none":
        torch._dynamo.reset()


def run_open_clip(cfg, args, vocab_size, batches, device) -> float:
    torch.manual_seed(0)
    model = open_clip_model(cfg, vocab_size, args.image_size).to(device)
    fresh_compile_caches(args)
    if args.compile != "none":  # open_clip_train.main --torchcompile: torch.compile(model), state unchanged
        model = torch.compile(model)
    timed = Timed(batches, args.warmup, args.steps, args.batch_size)
    oc_args = SimpleNamespace(
        device=device,
        precision=OPEN_CLIP_PRECISION[args.precision],
        accum_freq=1,
        distill=False,
        grad_clip_norm=None,
        horovod=False,
        log_every_n_steps=10**9,
        skip_scheduler=True,
        world_size=1,
        rank=-1,  # not the master: no logging inside the timed loop
        local_rank=-1,
    )
    train_one_epoch(
        model,
        {"train": DataInfo(timed)},
        open_clip.ClipLoss(),
        0,
        open_clip_optimizer(model, cfg),
        None,
        None,
        None,
        oc_args,
    )
    return args.steps * args.batch_size / (timed.end - timed.start)


class Batches(torch.utils.data.IterableDataset):
    def __init__(self, batches: list, n: int):
        self.batches, self.n = batches, n

    def __iter__(self):
        return itertools.islice(itertools.cycle(self.batches), self.n)


def run_ours(cfg, args, tokenizer, datamodule, batches, device) -> float:
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer)
    fresh_compile_caches(args)
    optimizer_cfg, _, _ = split_optimizer_config(cfg.optimizer)
    module = DualEncoderModule(model, instantiate(cfg.loss.objective), optimizer=instantiate(optimizer_cfg))
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    trainer, timer = timed_trainer(args.warmup, args.steps, args.precision, accelerator)
    if batches is None:
        trainer.fit(module, datamodule=datamodule)
    else:
        loader = torch.utils.data.DataLoader(Batches(batches, args.warmup + args.steps), batch_size=None)
        trainer.fit(module, train_dataloaders=loader)
    return args.steps * args.batch_size / (timer.end - timer.start)


def flops_per_sample(cfg, args, tokenizer, vocab_size, batch, device) -> dict[str, float]:
    """Forward + backward FLOPs per sample of each model (torch's FlopCounterMode), for MFU."""
    out = {}
    images, texts = batch["image"][:4].to(device), batch["text"][:4].to(device)
    eager = copy.deepcopy(cfg.model)
    eager.compile = False  # counted eager: the FLOPs are the same, FlopCounterMode sees them all
    models = {
        "ours": build_model(eager, tokenizer),
        "open_clip": open_clip_model(cfg, vocab_size, args.image_size),
    }
    for name, model in models.items():
        model = model.to(device)
        with FlopCounterMode(display=False) as counter:
            result = model(images, texts if name == "ours" else padded(texts, cfg))
            first = result["image_features"] if isinstance(result, dict) else result[0]
            second = result["text_features"] if isinstance(result, dict) else result[1]
            (first.float().sum() + second.float().sum()).backward()
        out[name] = counter.get_total_flops() / images.shape[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default=cpu_precision(), choices=sorted(OPEN_CLIP_PRECISION))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the job's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    parser.add_argument(
        "--compile",
        default="none",
        choices=sorted(COMPILE),
        help="ours: model.compile=towers|step; open_clip: torch.compile(model) unless none",
    )
    parser.add_argument(
        "--profile", default=None, help="write torch.profiler tables of both on the same batches to this file"
    )
    parser.add_argument(
        "--override", action="append", default=[], help="a Hydra override of the job, e.g. model=vit_b16"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/results.md alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = default_job_config(args)
    datamodule = instantiate(cfg.data)
    if args.workers is not None:
        datamodule.num_workers = args.workers
    datamodule.prepare_data()
    tokenizer = build_tokenizer(
        cfg.tokenizer, cfg.model, datamodule.train_shards, datamodule.caption_key, None
    )
    model = build_model(cfg.model, tokenizer)
    datamodule.attach(tokenizer, model.image_tower.data_config, trim_text=model.text_trims_padding)
    same = list(itertools.islice(iter(datamodule.train_dataloader()), 4))
    data_config = datamodule.eval_transform_args
    preprocess = open_clip.image_transform(
        args.image_size, is_train=False, mean=tuple(data_config["mean"]), std=tuple(data_config["std"])
    )

    def open_clip_own():
        loader = open_clip_loader(
            datamodule.train_shards, tokenizer, preprocess, args.batch_size, datamodule.num_workers
        )
        return iter(loader)

    vocab = tokenizer.vocab_size
    rates: dict[str, list[float]] = {
        k: [] for k in ("same/ours", "same/open_clip", "own/ours", "own/open_clip")
    }
    for r in range(args.rounds):
        runs = (
            ("same/ours", lambda: run_ours(cfg, args, tokenizer, datamodule, same, args.device)),
            (
                "same/open_clip",
                lambda: run_open_clip(
                    cfg,
                    args,
                    vocab,
                    itertools.cycle([(b["image"], padded(b["text"], cfg)) for b in same]),
                    args.device,
                ),
            ),
            ("own/ours", lambda: run_ours(cfg, args, tokenizer, datamodule, None, args.device)),
            ("own/open_clip", lambda: run_open_clip(cfg, args, vocab, open_clip_own(), args.device)),
        )
        for name, run in runs:
            rates[name].append(run())
            print(f"round {r + 1}/{args.rounds} {name:>15}: {rates[name][-1]:8.1f} samples/s", flush=True)
    median = {k: statistics.median(v) for k, v in rates.items()}
    if args.profile:
        profile_both(args, runs[:2], Path(args.profile))
    result = {
        "bench": "vs_open_clip",
        "figure": "vs_open_clip" if args.compile == "none" else f"vs_open_clip_compile_{args.compile}",
        "compile": args.compile,
        "open_clip_compile": None if args.compile == "none" else "torch.compile(model)",
        "device": args.device,
        "image_model": args.image_model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "loader_workers": datamodule.num_workers,
        "steps": args.steps,
        "rounds": args.rounds,
        "same_batches": {
            "ours": round(median["same/ours"], 2),
            "open_clip": round(median["same/open_clip"], 2),
            "ratio": round(median["same/ours"] / median["same/open_clip"], 4),
        },
        "own_pipelines": {
            "ours": round(median["own/ours"], 2),
            "open_clip": round(median["own/open_clip"], 2),
            "ratio": round(median["own/ours"] / median["own/open_clip"], 4),
        },
    }
    if args.peak_tflops:
        flops = flops_per_sample(cfg, args, tokenizer, vocab, same[0], args.device)
        peak = args.peak_tflops * 1e12
        result["mfu"] = {
            f"{feed}/{name}": round(flops[name] * median[f"{feed}/{name}"] / peak, 4)
            for feed in ("same", "own")
            for name in ("ours", "open_clip")
        }
        result["flops_per_sample"] = flops
    result["ratio"] = result["own_pipelines"]["ratio"]
    if not args.no_write:
        write_results(args, rates, result)
    print(
        f"compile {args.compile}: median samples/s: same batches ours {median['same/ours']:.1f} vs open_clip "
        f"{median['same/open_clip']:.1f}; own pipelines ours {median['own/ours']:.1f} vs open_clip "
        f"{median['own/open_clip']:.1f}; ratio {result['ratio']:.3f} (target >= 1.0)"
    )
    print(json.dumps(result))


def profile_both(args, runs, out: Path) -> None:
    """Where each side's step time goes: torch.profiler's kernels and operators, top by device time."""
    sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    tables = []
    for name, run in runs:
        with torch.profiler.profile(activities=activities) as prof:
            run()
        tables.append(f"== {name}\n" + prof.key_averages().table(sort_by=sort, row_limit=25))
    out.write_text("\n\n".join(tables))


def write_results(args, rates: dict[str, list[float]], result: dict) -> None:
    compiled = args.compile != "none"
    rows = "\n".join(
        f"| {r + 1} | " + " | ".join(f"{rates[k][r]:.1f}" for k in rates) + " |" for r in range(args.rounds)
    )
    title = f"compiled ({args.compile})" if compiled else "same towers"
    body = (
        f"## Ours vs open_clip, {title}\n\n"
        f"`python bench/vs_open_clip.py --batch-size {args.batch_size} --steps {args.steps} --rounds "
        f"{args.rounds} --precision {args.precision}"
        + (f" --compile {args.compile} --warmup {args.warmup}" if compiled else "")
        + f"`: timm {args.image_model} at {args.image_size} px and a "
        f"{result['loader_workers']}-worker loader, {result['threads']} threads, on {args.device}. open_clip "
        "runs `open_clip_train.train.train_one_epoch` on an `open_clip.CLIP` with the same towers; ours runs "
        "the default job's module and Trainer. `same batches`: both fed the same in-memory batches; `own "
        "pipelines`: each reads the shapes shards through its own pipeline, loading inside the timed "
        "steps."
        + (
            f" Ours with `model.compile={args.compile}`, open_clip `torch.compile(model)` (its "
            "`--torchcompile`); compilation in the untimed warm-up."
            if compiled
            else ""
        )
        + "\n\n"
        "| round | same batches: ours | same batches: open_clip | own pipelines: ours | own pipelines: "
        "open_clip |\n|---|---|---|---|---|\n"
        f"{rows}\n\n"
        f"Median samples/s: same batches {result['same_batches']['ours']} vs "
        f"{result['same_batches']['open_clip']} (ratio {result['same_batches']['ratio']}); own pipelines "
        f"{result['own_pipelines']['ours']} vs {result['own_pipelines']['open_clip']} (**ratio "
        f"{result['ratio']}**).\n"
    )
    section = f"vs-open-clip-compile-{args.compile}" if compiled else "vs-open-clip"
    RESULTS.write_text(replace_section(RESULTS.read_text(), section, body))


if __name__ == "__main__":
    main()
