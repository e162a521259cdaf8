import math

import pytest
import torch

from autoglm_train.model.dual_encoder import DualEncoder, LowRankLinear, energy_rank
from autoglm_train.model.towers import ImageTower, TextTower, trim_padding_columns


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DualEncoder(
        ImageTower("resnet18"), TextTower(50, width=32, depth=1, heads=2, context_length=12), embed_dim=16
    )


def test_embeddings_are_unit_norm_and_shaped(model):
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(1, 50, (3, 12))
    image, text, scale = model(images, tokens)
    assert image.shape == text.shape == (3, 16)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_logit_scale_is_clamped_at_100(model):
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(1000.0))
    assert model.logit_scale().item() == pytest.approx(100.0)
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(1 / 0.07))


def test_weight_decay_excludes_norms_biases_and_temperature(model):
    decay, no_decay = model.param_groups(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "log_logit_scale" in kept
    assert not any("norm" in n or n.endswith(".bias") or ".bn" in n for n in decayed)
    assert any(n.startswith("image_tower.backbone.bn1") for n in kept)  # batch norm of the timm tower
    assert "text_proj.weight" in decayed and "text_tower.token_embedding.weight" in decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decayed) + len(kept) == sum(1 for _ in model.parameters())


def test_text_tower_output_does_not_depend_on_padding_length():
    torch.manual_seed(0)
    tower = TextTower(30, width=32, depth=2, heads=4, context_length=16, pool="mean").eval()
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0, 0, 0, 0, 0], [1, 8, 2, 0, 0, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(tower(tokens), tower(tokens[:, :6]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="context_length"):
        tower(torch.ones(1, 17, dtype=torch.long))


def test_tokens_trimmed_on_the_host_give_the_untrimmed_output():
    # on a GPU the tower takes its tokens as they come (no length read mid-step); the loader trims them
    torch.manual_seed(0)
    tower = TextTower(30, width=32, depth=2, heads=4, context_length=16, pool="mean").eval()
    tower.trim_padding = False
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0, 0, 0, 0, 0], [1, 8, 2, 0, 0, 0, 0, 0, 0, 0]])
    trimmed = trim_padding_columns(tokens)
    assert trimmed.shape == (2, 5) and torch.equal(trimmed, tokens[:, :5])
    torch.testing.assert_close(tower(tokens), tower(trimmed), rtol=1e-5, atol=1e-6)


def test_frozen_temperature_is_not_trained():
    m = DualEncoder(ImageTower("resnet18"), TextTower(10, 32, 1, 2, 8), learn_temperature=False)
    assert not m.log_logit_scale.requires_grad
    assert all(p is not m.log_logit_scale for g in m.param_groups(0.1) for p in g["params"])


# --- low-rank projection heads ------------------------------------------------------------------------------
def test_lowrank_head_at_full_rank_is_the_full_head_after_svd_init():
    torch.manual_seed(0)
    full = torch.nn.Linear(24, 16, bias=False)
    head = LowRankLinear(24, 16, rank=16)
    head.load_state_dict(full.state_dict())  # a full weight: the factors come from its SVD
    x = torch.randn(5, 24)
    torch.testing.assert_close(head(x), full(x), rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in LowRankLinear(24, 16, rank=4).parameters()) == 4 * (24 + 16)


def test_lowrank_head_is_the_best_approximation_of_its_rank():
    torch.manual_seed(0)
    weight = torch.randn(16, 24)
    head = LowRankLinear(24, 16, rank=3)
    head.factorize_(weight)
    product = head.up.weight @ head.down.weight
    s = torch.linalg.svdvals(weight)
    # Eckart-Young: the error of the best rank-3 approximation is the norm of the dropped singular values
    assert torch.linalg.matrix_norm(weight - product).item() == pytest.approx(s[3:].norm().item(), rel=1e-5)
    assert energy_rank(weight, 1.0) == 16 and energy_rank(weight, 0.0) == 1
    kept = (s[:5] ** 2).sum() / (s**2).sum()
    assert energy_rank(weight, float(kept) - 1e-6) == 5


def test_a_checkpoint_with_linear_heads_loads_into_lowrank_heads():
    torch.manual_seed(0)
    trained = DualEncoder(ImageTower("resnet18"), TextTower(10, 32, 1, 2, 8), embed_dim=16)
    lowrank = DualEncoder(
        ImageTower("resnet18"),
        TextTower(10, 32, 1, 2, 8),
        embed_dim=16,
        projection_kind="lowrank",
        projection_rank=16,
    )
    lowrank.load_state_dict(trained.state_dict())
    trained.eval(), lowrank.eval()
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 10, (2, 8))
    for got, want in zip(lowrank(images, tokens)[:2], trained(images, tokens)[:2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="projection_rank"):
        DualEncoder(ImageTower("resnet18"), TextTower(10, 32, 1, 2, 8), 16, projection_kind="lowrank")
