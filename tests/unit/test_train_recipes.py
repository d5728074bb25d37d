"""The guide-training recipes on tiny models and synthetic features: the held-out layout, the features,
the top-layer trick, DPO with early stopping, the token RM's fitted head."""

import random

import numpy as np
import pytest
import torch

from ivg.config import ConfigError
from ivg.tiny import tiny_model
from ivg.train.config import DPOSettings, TokenRMSettings, TrainSettings
from ivg.train.dpo import Pair, Ranking, implicit_rewards, pair_accuracy, ranking_loss, train_dpo
from ivg.train.features import Features, featurize
from ivg.train.layout import guide_layout
from ivg.train.pairs import pair_values
from ivg.train.token_rm import Scored, fit_head, q_last, win_fractions
from ivg.train.top_layers import TopLayers


def examples(n, seed=0, vocab=60):
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randrange(1, 6))],
             [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 9))]) for _ in range(n)]


# ---------------------------------------------------------------------------------------- the layout

def test_layout_never_trains_on_heldout_or_evaluated_prompts():
    evaluated = ["e0", "e1", "dup"]
    guide = ["h0", "h1", "e1", "t0", "h0", "dup", "t1", "t0", "t2", "t3"]
    layout = guide_layout(guide, evaluated, heldout_prompts=2, n_prompts=3)
    assert layout.heldout == ("h0", "h1")
    # e1, dup (evaluated), h0 (held out) and the second t0 are dropped; table order kept
    assert layout.train == ("t0", "t1", "t2")
    assert not set(layout.train) & (set(layout.heldout) | set(evaluated))


def test_layout_with_too_few_prompts_names_the_setting():
    with pytest.raises(ConfigError, match=r"train\.settings\.n_prompts"):
        guide_layout(["h", "t", "t", "h"], [], heldout_prompts=1, n_prompts=2)
    with pytest.raises(ConfigError, match=r"train\.settings\.heldout_prompts"):
        guide_layout(["h"], [], heldout_prompts=2, n_prompts=0)


@pytest.mark.parametrize("kw,field", [({"responses": 3}, "responses"), ({"responses": 0}, "responses"),
                                      ({"heldout_prompts": -1}, "heldout_prompts")])
def test_settings_validation_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"train\.settings\.{field}\b"):
        TrainSettings(**kw)


@pytest.mark.parametrize("kw,field", [({"layers": 0}, "layers"), ({"lr": 0.0}, "lr"), ({"beta": float("nan")}, "beta"),
                                      ({"patience": -1}, "patience")])
def test_dpo_settings_validation_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"train\.dpo\.{field}\b"):
        DPOSettings(**kw)


# ------------------------------------------------------------------- features and the top-layer trick

@pytest.mark.parametrize("name", ["tiny:untuned", "tiny-b:untuned"])
def test_features_are_the_models_own_log_probs_and_states(name):
    model, _ = tiny_model(name)
    ex = examples(9)
    feats = featurize(model, ex, cut=1, batch=4)  # batches of mixed lengths, returned in the order given
    enc = [{"prompt_ids": p, "chosen_ids": r, "rejected_ids": r} for p, r in ex]
    sums = [c for c, _ in pair_values(model, enc, "logp")]
    assert np.allclose([f.ref.sum().item() for f in feats], sums, atol=1e-5)
    for f, (p, r) in zip(feats, ex):  # one at a time, unpadded
        out = model(input_ids=torch.tensor([p + r]), output_hidden_states=True)
        assert torch.allclose(f.final, out.hidden_states[-1][0, len(p) - 1:-1], atol=1e-5)
        assert torch.allclose(f.cut, out.hidden_states[1][0], atol=1e-5) and f.cut.shape[0] == len(p) + len(r)


@pytest.mark.parametrize("name,k", [("tiny-b:untuned", 1), ("shape:mini", 1), ("tiny-b:untuned", None),
                                    ("tiny:untuned", None)])
def test_top_layers_fed_cached_states_equal_the_full_model(name, k):
    model, _ = tiny_model(name)
    feats = featurize(model, examples(8), cut=1 if k else None, batch=3)
    top = TopLayers(model, k)
    assert top.check_exact(feats) < 1e-4
    trainable = {n for n, p in top.named_parameters() if p.requires_grad}
    assert trainable and all("embed" not in n and "wte" not in n and "lm_head" not in n for n in trainable)
    assert len(top.model.get_output_embeddings().weight) == model.config.vocab_size


def test_top_layer_trick_refuses_an_architecture_it_is_not_exact_for():
    model, _ = tiny_model("tiny:untuned")  # GPT-2 adds position embeddings to inputs_embeds
    feats = featurize(model, examples(4), cut=1)
    with pytest.raises(ValueError, match="layers: null"):
        TopLayers(model, 1).check_exact(feats)


# --------------------------------------------------------------------------------------------- DPO

def dpo_pairs(model, n, seed):
    """Pairs whose chosen response is made of low token ids, the rejected of high ones."""
    rng = random.Random(seed)
    ex = []
    for _ in range(n):
        p = [rng.randrange(3, 60) for _ in range(3)]
        ex += [(p, [rng.randrange(3, 13) for _ in range(4)]), (p, [rng.randrange(50, 60) for _ in range(4)])]
    f = featurize(model, ex, cut=1)
    return [Pair(f[i], f[i + 1], 1.0) for i in range(0, len(f), 2)]


def rankings(pairs):
    return [Ranking([p.chosen, p.rejected]) for p in pairs]


def test_ranking_loss_is_plackett_luce_and_dpos_sigmoid_loss_for_two():
    r = torch.tensor([0.3, -1.2])
    assert torch.allclose(ranking_loss(r), -torch.nn.functional.logsigmoid(r[0] - r[1]))
    r = torch.tensor([2.0, 0.5, -0.4, 1.0])
    e = r.exp()
    by_hand = -sum(torch.log(e[k] / e[k:].sum()) for k in range(3))
    assert torch.allclose(ranking_loss(r), by_hand)
    assert ranking_loss(torch.tensor([3.0, 2.0, 1.0])) < ranking_loss(torch.tensor([1.0, 2.0, 3.0]))


def test_dpo_learns_a_three_way_ranking():
    """Responses of low, middle and high token ids, best first: every ordering is learnt, not only the ends."""
    model, _ = tiny_model("tiny-b:untuned")
    rng = random.Random(0)
    def ranked(n):
        ex = []
        for _ in range(n):
            p = [rng.randrange(3, 60) for _ in range(3)]
            ex += [(p, [rng.randrange(lo, lo + 5) for _ in range(4)]) for lo in (3, 28, 55)]
        f = featurize(model, ex, cut=1)
        return [Ranking(f[i:i + 3]) for i in range(0, len(f), 3)]
    train, val = ranked(32), ranked(16)
    policy, _ = train_dpo(model, train, [], DPOSettings(layers=1, lr=3e-3, epochs=4, batch_size=4, beta=0.5),
                          log=lambda _: None)
    top, bottom = ([Pair(g.responses[i], g.responses[i + 1], 1.0) for g in val] for i in (0, 1))
    top, bottom = pair_accuracy(implicit_rewards(policy, top)), pair_accuracy(implicit_rewards(policy, bottom))
    assert min(top, bottom) >= 0.7 and top + bottom >= 1.6, (top, bottom)


def test_dpo_learns_the_pairs_and_the_merged_model_is_the_trained_one():
    model, _ = tiny_model("tiny-b:untuned")
    train, val = dpo_pairs(model, 32, 0), dpo_pairs(model, 16, 1)
    before = [p.detach().clone() for p in model.parameters()]
    policy, stats = train_dpo(model, rankings(train), val, DPOSettings(layers=1, lr=3e-3, epochs=4, batch_size=8, beta=0.5,
                                                                       seed=0), log=lambda _: None)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the untuned model is untouched
    assert pair_accuracy(implicit_rewards(policy, val)) >= 0.9 and stats["kept_val_accuracy"] >= 0.9
    tuned = policy.merged_into(tiny_model("tiny-b:untuned")[0])
    enc = [{"prompt_ids": p.chosen.prompt_ids, "chosen_ids": p.chosen.response_ids,
            "rejected_ids": p.rejected.response_ids} for p in val]
    folder = [(c - p.chosen.ref.sum().item(), r - p.rejected.ref.sum().item())
              for (c, r), p in zip(pair_values(tuned, enc, "logp"), val)]
    assert np.allclose(folder, implicit_rewards(policy, val), atol=1e-4)


def test_early_stopping_keeps_the_best_validated_state():
    model, _ = tiny_model("tiny-b:untuned")
    train = dpo_pairs(model, 16, 0)
    flipped = [Pair(p.rejected, p.chosen, 1.0) for p in dpo_pairs(model, 8, 1)]  # every step makes these worse
    policy, stats = train_dpo(model, rankings(train), flipped, DPOSettings(layers=1, lr=1e-2, epochs=20, batch_size=8,
                                                                           eval_every=1, patience=3), log=lambda _: None)
    history = {h["step"]: h["val_accuracy"] for h in stats["history"]}
    assert stats["steps"] == stats["kept_step"] + 3 < 40  # stopped after 3 evaluations without progress
    assert max(history.values()) == history[stats["kept_step"]] == stats["kept_val_accuracy"]
    assert pair_accuracy(implicit_rewards(policy, flipped)) == stats["kept_val_accuracy"]  # the kept state is back


# ------------------------------------------------------------------------------------------ token RM

def synthetic_groups(n_prompts, rng, direction, vocab=50, hidden=16, responses=4):
    """Responses whose states drift along `direction` by their (hidden) quality; token 7 always raises
    the value, token 9 lowers it. A constant unit component plays the normed states' h . c ~ 1."""
    groups = []
    for _ in range(n_prompts):
        group = []
        for _ in range(responses):
            quality, ids = rng.normal(), list(rng.integers(10, vocab, size=6))
            if rng.random() < 0.5:
                ids[rng.integers(0, 5)] = 7 if quality > 0 else 9
            states = rng.normal(size=(len(ids), hidden)) + np.outer(np.linspace(0.2, 1, len(ids)) * quality, direction)
            states[:, 0] = 1.0
            f = Features([1, 2], [int(i) for i in ids], torch.zeros(len(ids)), torch.tensor(states, dtype=torch.float32))
            group.append(Scored(f, quality + 0.3 * rng.normal()))
        groups.append(group)
    return groups


def test_win_fractions_leave_ties_out():
    g = [Scored(None, 1.0), Scored(None, 0.0), Scored(None, 1.0), Scored(None, 2.0)]
    assert win_fractions(g) == [0.5, 0.0, 0.5, 1.0]
    assert win_fractions([Scored(None, 1.0), Scored(None, 1.0)]) == [None, None]


def test_fitted_head_orders_held_out_pairs_and_is_neutral_for_unseen_tokens():
    rng = np.random.default_rng(0)
    direction = np.r_[0.0, rng.normal(size=15)]
    W, stats = fit_head(synthetic_groups(200, rng, direction), 50, TokenRMSettings(C=1.0, shrink=5.0), log=lambda _: None)
    assert W.shape == (50, 16)
    W = torch.from_numpy(W)
    held = [g[:2] for g in synthetic_groups(200, rng, direction, responses=2)]
    ordered = [(x, y) if x.gold > y.gold else (y, x) for x, y in held]
    acc = np.mean([q_last(W, x.features) > q_last(W, y.features) for x, y in ordered])
    assert acc >= 0.75, acc
    # tokens 0..9 except 7 and 9 never occur: one shared row, so Q(s, .) is the same number for all of
    # them in any state, and token-wise guidance leaves their relative probabilities alone
    unseen = [0, 1, 2, 3, 4, 5, 6, 8]
    assert all(torch.equal(W[a], W[unseen[0]]) for a in unseen)
    state = torch.randn(16)
    state[0] = 1.0  # a state like the data's (h . c ~ 1)
    q = W @ state
    assert q[7] > q[unseen[0]] > q[9]  # the token that raised the value is favoured, the one that lowered it not
    assert abs(stats["h_dot_c_mean"] - 1) < 1e-3
