"""The fusion stage: token states from both towers, ITM negatives drawn as ALBEF/BLIP draw them, and
re-ranking retrieval's top-k."""

import pytest
import torch
import torch.nn.functional as F

from autoglm_train.eval.rerank import group_pair_scores, pair_scores, rerank_metrics
from autoglm_train.eval.retrieval import group_recall, retrieval_metrics
from autoglm_train.losses.itm import sample_itm_negatives
from autoglm_train.model.dual_encoder import DualEncoder
from autoglm_train.model.fusion import itm_score
from autoglm_train.model.towers import ImageTower, TextTower


def test_sampled_negatives_never_share_an_id_and_follow_the_similarity():
    g = torch.Generator().manual_seed(0)
    n = 8
    sims = 3 * torch.randn(n, n, generator=g)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])  # images 0-1 and 3-5 are captions of one sample
    same = ids[:, None] == ids[None, :]
    counts = torch.zeros(n, n)
    counts_t = torch.zeros(n, n)
    draws = 4000
    for _ in range(draws):
        captions, images = sample_itm_negatives(sims, ids, g)
        assert not same[torch.arange(n), captions].any() and not same[images, torch.arange(n)].any()
        counts[torch.arange(n), captions] += 1
        counts_t[torch.arange(n), images] += 1
    # the frequencies are the softmax over the other samples' pairs (ALBEF/BLIP's weights)
    want = F.softmax(sims.masked_fill(same, float("-inf")), dim=1)
    want_t = F.softmax(sims.T.masked_fill(same, float("-inf")), dim=1)
    assert (counts / draws - want).abs().max() < 0.04
    assert (counts_t / draws - want_t).abs().max() < 0.04
    with pytest.raises(ValueError, match="share their sample id"):
        sample_itm_negatives(sims[:2, :2], torch.tensor([5, 5]), g)


def tiny_model(image_tower="resnet18_narrow", fusion_layers=1):
    torch.manual_seed(0)
    image = ImageTower(
        image_tower, **({"img_size": 32, "patch_size": 8, "depth": 1} if "vit" in image_tower else {})
    )
    return DualEncoder(
        image, TextTower(40, 32, 1, 2, 12), embed_dim=16, fusion={"layers": fusion_layers, "heads": 2}
    )


@pytest.mark.parametrize("tower, tokens", [("resnet18_narrow", 1), ("vit_tiny_patch16_224", 17)])
def test_token_states_come_from_the_same_pass_as_the_embeddings(tower, tokens):
    model = tiny_model(tower).eval()
    images = torch.randn(3, 3, 32, 32)
    text = torch.randint(1, 40, (3, 12))
    text[0, 6:] = 0  # padding
    image, caption, _, states = model.encode_tokens(images, text)
    torch.testing.assert_close(image, model.encode_image(images))
    torch.testing.assert_close(caption, model.encode_text(text))
    assert states.image.shape == (3, tokens, model.image_tower.width)
    assert states.text.shape == (3, 12, 32) and states.text_padding[0, 6:].all()
    logits = model.itm_logits(states.image, states.text, states.text_padding)
    assert logits.shape == (3, 2)
    # padding is masked: what follows the padding does not change the pair's score
    text[0, 8] = 0
    again = model.encode_tokens(images, text)[3]
    torch.testing.assert_close(model.itm_logits(again.image, again.text, again.text_padding)[0], logits[0])


@pytest.mark.parametrize("tower_grad", [True, False])
def test_tower_grad_decides_whether_the_itm_loss_trains_the_towers(tower_grad):
    model = tiny_model()
    model.fusion_tower_grad = tower_grad
    text = torch.randint(1, 40, (3, 12))
    states = model.encode_tokens(torch.randn(3, 3, 32, 32), text)[3]
    model.itm_logits(states.image, states.text, states.text_padding).sum().backward()
    reached = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert reached == ({"fusion", "image_tower", "text_tower"} if tower_grad else {"fusion"})


def test_a_model_without_token_states_is_refused():
    class Pooled(torch.nn.Module):
        width = 8

    with pytest.raises(ValueError, match="does not give its token states"):
        DualEncoder(Pooled(), TextTower(40, 32, 1, 2, 12), embed_dim=16, fusion={"layers": 1})


def eval_case(n_images=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = tiny_model().eval()
    images = torch.randn(n_images, 3, 32, 32, generator=g)
    text = torch.randint(1, 40, (2 * n_images, 12), generator=g)
    image_emb, image_tokens = model.encode_image_tokens(images)
    text_emb, states, padding = model.encode_text_tokens(text)
    image_ids = torch.arange(n_images) * 3 + 7
    text_ids = image_ids.repeat_interleave(2)
    return model, image_emb, image_ids, text_emb, text_ids, image_tokens, states, padding


@torch.no_grad()
def test_reranking_every_pair_equals_ranking_by_itm_alone():
    model, image_emb, image_ids, text_emb, text_ids, image_tokens, states, padding = eval_case()
    n, m = len(image_ids), len(text_ids)
    # exhaustive: every (image, caption) pair through the fusion stage, ranked by its score alone
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(m), indexing="ij")
    full = pair_scores(model.itm_logits, image_tokens, states, padding, rows.flatten(), cols.flatten()).view(
        n, m
    )
    want = retrieval_metrics(full, image_ids, torch.eye(m), text_ids, ks=(1, 5))  # full @ I = the scores
    got = rerank_metrics(
        image_emb,
        image_ids,
        text_emb,
        text_ids,
        model.itm_logits,
        image_tokens,
        states,
        padding,
        k=m,
        ks=(1, 5),
    )
    assert got["rerank_i2t_r1"] == want["i2t_r1"] and got["rerank_i2t_r5"] == want["i2t_r5"]
    # text->image: each caption against every image by the same scores
    want_t = retrieval_metrics(torch.eye(n), image_ids, full.T.contiguous(), text_ids, ks=(1, 5))
    assert got["rerank_t2i_r1"] == want_t["t2i_r1"] and got["rerank_t2i_r5"] == want_t["t2i_r5"]
    # k = 1 leaves the dual encoder's order: the same figures as without re-ranking
    plain = retrieval_metrics(image_emb, image_ids, text_emb, text_ids, ks=(1, 5))
    once = rerank_metrics(
        image_emb,
        image_ids,
        text_emb,
        text_ids,
        model.itm_logits,
        image_tokens,
        states,
        padding,
        k=1,
        ks=(1, 5),
    )
    assert once["rerank_i2t_r1"] == plain["i2t_r1"] and once["rerank_t2i_r5"] == plain["t2i_r5"]


@torch.no_grad()
def test_group_scores_rank_within_groups_by_the_fusion_stage():
    model, image_emb, image_ids, text_emb, text_ids, image_tokens, states, padding = eval_case()
    groups = torch.arange(12) // 3
    kinds = torch.zeros(12, dtype=torch.long)

    def score_pairs(i, t):
        return pair_scores(model.itm_logits, image_tokens, states, padding, i, t)

    sims = group_pair_scores(image_ids, text_ids, groups, kinds, score_pairs)
    text_rows = torch.arange(24) // 2
    in_group = groups[:, None] == groups[text_rows][None, :]
    assert torch.isinf(sims[~in_group]).all() and torch.isfinite(sims[in_group]).all()
    got = group_recall(image_emb, image_ids, text_emb, text_ids, groups, kinds, ("binding",), sims=sims)
    # by hand: each image's best caption within its group by the ITM score
    hits = []
    for r in range(12):
        cols = in_group[r].nonzero().flatten()
        best = cols[
            itm_score(model.itm_logits(image_tokens[[r] * len(cols)], states[cols], padding[cols])).argmax()
        ]
        hits.append(int(text_rows[best]) == r)
    t2i = []
    for j in range(24):
        cand = (groups == groups[text_rows[j]]).nonzero().flatten()
        scores = itm_score(
            model.itm_logits(image_tokens[cand], states[[j] * len(cand)], padding[[j] * len(cand)])
        )
        t2i.append(int(cand[scores.argmax()]) == int(text_rows[j]))
    assert got["hard_r1_binding"] == pytest.approx((sum(hits) / 12 + sum(t2i) / 24) / 2)


PREPROCESS = {
    "input_size": [3, 32, 32],
    "interpolation": "bicubic",
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "crop_pct": 1.0,
}
CAPTIONS = ["a small red circle at the top left", "a large blue square at the bottom right and a circle"] * 20


@pytest.fixture(scope="module")
def fusion_export(tmp_path_factory):
    from autoglm_train.compress.export import export_model
    from autoglm_train.data.tokenizer import train_bpe

    tokenizer = train_bpe(CAPTIONS, 80, 12)
    model = tiny_model()
    model.text_tower.token_embedding = torch.nn.Embedding(tokenizer.vocab_size, 32)
    model.eval()
    out = export_model(
        model, tokenizer, tmp_path_factory.mktemp("export") / "fp32", PREPROCESS, torch.randn(2, 3, 32, 32)
    )
    return model, tokenizer, out


def test_the_exported_fusion_stage_equals_pytorch(fusion_export):
    from autoglm_train.compress.serving import load_exported

    model, tokenizer, path = fusion_export
    exported = load_exported(path)
    assert exported.has_fusion
    images, tokens = torch.randn(3, 3, 32, 32), tokenizer(CAPTIONS[:3])
    with torch.no_grad():
        grid = model.image_tower.forward_tokens(images)[1]
        states, padding = model.text_tower.forward_tokens(tokens)[1:]
        logits = model.itm_logits(grid, states, padding)
    got_grid = exported.image_tokens(images.numpy())
    got_states, got_padding = exported.text_states(tokens.numpy())
    torch.testing.assert_close(torch.from_numpy(got_grid), grid, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(got_states), states, atol=1e-4, rtol=0)
    assert (got_padding == padding.numpy()).all()
    got = exported.itm_logits(got_grid, got_states, got_padding)
    torch.testing.assert_close(torch.from_numpy(got), logits, atol=1e-4, rtol=0)


def test_embed_reranks_a_query_with_the_exported_fusion_stage(fusion_export, tmp_path, capsys):
    import timm.data

    from autoglm_train.compress.serving import load_exported
    from autoglm_train.data.shapes import write_shapes_shards
    from autoglm_train.data.shards import SkipCounter, usable_samples
    from autoglm_train.embed import load_index, main, query

    model, tokenizer, path = fusion_export
    shards = write_shapes_shards(
        tmp_path / "shapes", n_train=20, n_val=24, image_size=32, samples_per_shard=20, n_val_binding=0
    )
    assert (
        main(
            [
                "--model",
                str(path),
                "--shards",
                *shards["val"][:1],
                "--out",
                str(tmp_path / "index"),
                "--no-progress",
            ]
        )
        == 0
    )
    index, exported = load_index(tmp_path / "index"), load_exported(path)
    n = len(index["ids"])
    assert index["image_tokens"].shape[0] == n
    text = "a small red circle at the top left"
    reranked = query(exported, index, text, k=n, rerank=n)
    # every image re-ranked: the order of the PyTorch fusion stage's scores over all of them
    transform = timm.data.create_transform(**PREPROCESS, is_training=False)
    images = torch.stack(
        [transform(s["image"]) for s in usable_samples(shards["val"][:1], "captions", SkipCounter())]
    )
    with torch.no_grad():
        grid = model.image_tower.forward_tokens(images)[1]
        states, padding = model.text_tower.forward_tokens(tokenizer([text]))[1:]
        want = itm_score(model.itm_logits(grid, states.expand(n, -1, -1), padding.expand(n, -1)))
    # each image scored as the PyTorch fusion stage scores it, best first (ties keep either order)
    row_of = {sample_id: row for row, sample_id in enumerate(index["ids"])}
    got = torch.tensor([score for score, _, _ in reranked])
    torch.testing.assert_close(got, want[[row_of[s] for _, s, _ in reranked]], atol=1e-4, rtol=0)
    assert (got[:-1] >= got[1:]).all() and len(reranked) == n
    assert (
        main(["--model", str(path), "--index", str(tmp_path / "index"), "--query", text, "--rerank", "4"])
        == 0
    )
    assert text in capsys.readouterr().out
