"""``model.compile=step`` (lit/compiled_step.py): the training step's forward and objective as one compiled
function trains like the eager step, keeps the model's state-dict keys, is built at the first step and
stays out of pickles; gradient caching with it is refused. On a CUDA GPU: the training step makes no
host synchronization (eager and compiled)."""

import copy
import pickle
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import TINY, compose_config
from hydra.utils import instantiate
from torch._dynamo.utils import counters

from autoglm_train.build import build_model, split_optimizer_config
from autoglm_train.config_check import ConfigError, check_train_config
from autoglm_train.lit.compiled_step import CompiledStep, loss_step
from autoglm_train.lit.module import DualEncoderModule
from autoglm_train.model.dual_encoder import DualEncoder, compile_mode
from autoglm_train.train import core_callbacks

VOCAB, BATCH, STEPS = 64, 16, 3
TOKENIZER = SimpleNamespace(vocab_size=VOCAB, pad_id=0)  # what build_model reads of a tokenizer


def tiny_module(tmp_path, *overrides: str) -> DualEncoderModule:
    """TINY's model (ResNet-18 at 32 px, a 1-layer 64-wide text tower), objective and optimizer, as
    train.py assembles them, from the same initial weights every time."""
    cfg = compose_config([*TINY, *overrides], tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model, TOKENIZER)
    optimizer_cfg, _, _ = split_optimizer_config(cfg.optimizer)
    return DualEncoderModule(model, instantiate(cfg.loss.objective), optimizer=instantiate(optimizer_cfg))


def batches(n: int = STEPS, device: str = "cpu") -> list[dict]:
    """Right-padded captions of random lengths, trimmed like the training loader (each batch another
    length), with sample ids."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        tokens = torch.randint(1, VOCAB, (BATCH, 32), generator=g)
        lengths = torch.randint(4, 20 + i, (BATCH,), generator=g)
        tokens[torch.arange(32)[None, :] >= lengths[:, None]] = 0
        out.append(
            {
                "image": torch.randn(BATCH, 3, 32, 32, generator=g).to(device),
                "text": tokens[:, : int(lengths.max())].to(device),
                "id": torch.arange(BATCH, device=device) + i * BATCH,
            }
        )
    return out


class Losses(L.Callback):
    def __init__(self):
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(outputs["loss"].item())


def fit(module: DualEncoderModule, data: list[dict]) -> list[float]:
    losses = Losses()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=len(data),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[losses, *core_callbacks()],  # as train.py runs it
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    return losses.values


def test_compile_values_and_what_each_compiles():
    assert [compile_mode(v) for v in (False, None, True, "towers", "step")] == [
        None,
        None,
        "towers",
        "towers",
        "step",
    ]
    with pytest.raises(ValueError, match="towers or step"):
        compile_mode("sometimes")
    from autoglm_train.model.towers import ImageTower, TextTower

    def model(compile):
        torch.manual_seed(0)
        return DualEncoder(ImageTower("resnet18"), TextTower(VOCAB, 32, 1, 2, 8), 16, compile=compile)

    step, towers = model("step"), model(True)
    # step compiles no tower (the LightningModule compiles its step); true compiles each tower
    assert step.compile_mode == "step" and step.image_tower._compiled_call_impl is None
    assert towers.compile_mode == "towers" and towers.text_tower._compiled_call_impl is not None
    assert step.state_dict().keys() == towers.state_dict().keys() == model(False).state_dict().keys()


def test_compiled_step_trains_like_the_eager_step_and_keeps_the_checkpoint_keys(tmp_path):
    data = batches()
    initial = tiny_module(tmp_path / "initial").state_dict()
    eager = tiny_module(tmp_path / "eager")
    eager_losses = fit(eager, data)

    compiled = tiny_module(tmp_path / "step", "model.compile=step")
    assert getattr(compiled, "compiled_step", None) is None  # nothing compiled before the first step
    # aot_eager: dynamo's graph and AOTAutograd's compiled forward and backward graphs, run by eager
    # kernels. Inductor would add its code generation, minutes on 2 CPU cores for ResNet-18, and change
    # nothing of what is tested here (capture, graph count, the compiled backward, batch-norm buffers
    # updated in place, pickling); see the tolerance below for what it does to the numbers
    compiled.compiled_step = CompiledStep(backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    step_losses = fit(compiled, data)

    # one graph for every batch: the text length is dynamic from the start, the step number is not
    # guarded on, and the text tower's own padding trim (a host read, a graph break) is off inside it
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    # fp32, aot_eager: the same kernels on the same inputs, so equal up to the order in which AOTAutograd's
    # graphs sum a parameter's gradient contributions (bitwise equal here, torch 2.14 on CPU); rtol 1e-5,
    # atol 1e-6 leaves room for that order (~1e-7 relative) and nothing more. Not inductor: its fused,
    # reordered sums move the losses by ~1e-6 relative, and AdamW's first steps (update ~ lr * sign(g))
    # turn that noise on near-zero gradient entries into weight differences up to ~lr (1.2e-3 measured
    # after 3 steps), a tolerance that could not tell a wrong gradient from rounding
    assert len(step_losses) == STEPS
    torch.testing.assert_close(step_losses, eager_losses, rtol=1e-5, atol=1e-6)
    eager_state, step_state = eager.state_dict(), compiled.state_dict()
    assert step_state.keys() == eager_state.keys()
    assert not any("_orig_mod" in k for k in step_state)
    assert not torch.equal(eager_state["model.text_proj.weight"], initial["model.text_proj.weight"])
    for key, value in eager_state.items():
        torch.testing.assert_close(step_state[key], value, rtol=1e-5, atol=1e-6, msg=key)

    # the compiled function stays out of pickles and copies (spawned workers, deepcopy); rebuilt lazily
    assert compiled.compiled_step.fn is not None
    for copied in (pickle.loads(pickle.dumps(compiled)), copy.deepcopy(compiled)):
        assert copied.compiled_step.fn is None and copied.compiled_step.options == {"backend": "aot_eager"}
        assert copied.state_dict().keys() == eager_state.keys()


def test_compiled_step_is_refused_with_gradient_caching(tmp_path):
    check_train_config(compose_config([*TINY, "model.compile=step"], tmp_path))
    check_train_config(compose_config([*TINY, "model.compile=towers"], tmp_path))
    check_train_config(compose_config([*TINY, "model.compile=true", "trainer.grad_cache_chunks=2"], tmp_path))
    with pytest.raises(ConfigError) as err:
        check_train_config(
            compose_config([*TINY, "model.compile=step", "trainer.grad_cache_chunks=2"], tmp_path)
        )
    (problem,) = err.value.problems
    assert problem.startswith("model.compile=step: does not combine with trainer.grad_cache_chunks=2")
    assert "model.compile=towers" in problem
    with pytest.raises(ConfigError, match=r"model.compile=sometimes: must be false, true \(= towers\)"):
        check_train_config(compose_config([*TINY, "model.compile=sometimes"], tmp_path))
    # a module built without the config check refuses it at its first step, before anything runs
    module = tiny_module(tmp_path, "model.compile=step")
    module.automatic_optimization = False  # what grad_cache_chunks > 1 sets
    with pytest.raises(ValueError, match="grad_cache_chunks"):
        module.training_step(batches(1)[0], 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none found)")
@pytest.mark.parametrize("compile", ["none", "step"])
def test_cuda_training_step_makes_no_host_synchronization(tmp_path, compile):
    """Forward + objective (under bf16 autocast, as Lightning's bf16-mixed) + backward + fused AdamW step
    on CUDA: after a warm-up step (compilation, optimizer state), nothing waits for the GPU."""
    module = tiny_module(tmp_path, f"model.compile={'step' if compile == 'step' else 'false'}").cuda()
    model, objective = module.model.train(), module.objective
    optimizer = module.optimizer_factory(model.param_groups(0.1))
    run = CompiledStep() if compile == "step" else loss_step  # inductor on the GPU

    def step(batch: dict, i: int) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = run(model, objective, batch["image"], batch["text"], batch["id"], i, None)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out["loss"].detach()

    data = batches(4, "cuda")  # on the device before the check: the copy of a batch is the loader's
    step(data[0], 0)  # warm-up
    torch.cuda.synchronize()
    losses = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, batch in enumerate(data[1:], start=1):
            losses.append(step(batch, i))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(torch.stack(losses)).tolist())
