"""The batched, cached engine against the naive reference decoder, cell by cell, and its contracts."""

import dataclasses
import random

import pytest

from helpers.models import PROMPTS, cell, config, rows
from ivg.config import GUIDANCE, MethodConfig
from ivg.engine import Engine
from ivg.protocol import Chunk
from ivg.reference import naive_search
from ivg.search import Beam, Child, keep_top

CELLS = [(t, c) for t in GUIDANCE for c in GUIDANCE]


def reference_rows(engine: Engine, method: MethodConfig, prompt_rows, eos: set[int] | None = None):
    """The naive reference's (text, n tokens, score, chunk scores) per prompt, on the engine's models.
    eos: the ids that end a response (default: the base tokenizer's EOS, as the engine takes it)."""
    models = reference_models(engine)
    eos = eos if eos is not None else {models["base"].tokenizer.eos_token_id}
    out = []
    for r in prompt_rows:
        tokens, text, score, scores = naive_search(models, r["id"], r["prompt"], method, engine.config.decode,
                                                   eos, engine.config.seed)
        out.append((text, len(tokens), score, scores))
    return out


def reference_models(engine: Engine) -> dict:
    return {_role_of(engine, m): m for role in engine.roles.roles.values() for m in role.models}


def _role_of(engine: Engine, loaded) -> str:
    spec = loaded.spec
    for role in ("base", "tuned", "untuned", "explicit"):
        if getattr(engine.config.models, role) is spec:
            return role
    raise AssertionError(spec)


def assert_same(engine_rows, reference):
    for got, (text, n, score, scores) in zip(engine_rows, reference):
        assert got["status"] == "ok", got["error"]
        assert (got["response"], got["n_new_tokens"]) == (text, n)
        if got["chunk"] == "none":  # no chunk-level scorer: no score (the naive decoder's 0 is not one)
            assert got["score"] is None and got["chunk_scores"] is None
        else:
            assert got["score"] == pytest.approx(score, abs=1e-9)
            assert got["chunk_scores"] == pytest.approx(scores, abs=1e-9)


# How a search treats finished beams: ivg's own (a finished beam competes once, the stop token scored
# as it is) and the paper's code's (each kept beam repeated K times, finished ones included, and a
# response that ended on a stop string scored with EOS appended).
PROFILES = {"ivg": {"finished": "keep_once"}, "paper": {"finished": "repeat", "score_eos": True}}
# Rows end all three ways: on a stop string, on an EOS (<eos>, and "a" made one), at max_new_tokens;
# top-k and top-p are on, so the oracle's warpers are compared with the engine's.
GRID_DECODE = {"stop": ("g", "i"), "top_k": 12, "top_p": 0.9}


def grid_engine(method: MethodConfig, **decode) -> tuple[Engine, set[int]]:
    cfg = config([method], **{**GRID_DECODE, **decode})
    local = Engine.local(cfg)
    tok = local.tokenizer
    eos = {tok.eos_token_id, tok.convert_tokens_to_ids("a")}
    return Engine(cfg, local.roles, tok, eos), eos


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("token,chunk", CELLS)
def test_every_cell_matches_naive_reference(token, chunk, profile):
    settings = dict(PROFILES[profile])
    if chunk == "none":
        settings.pop("score_eos", None)  # nothing is scored
    method = cell(token, chunk, **settings)
    engine, eos = grid_engine(method)
    got = engine.run(rows(), method)
    assert_same(got, reference_rows(engine, method, rows(), eos))
    assert len({(r["response"], r["score"]) for r in got}) == len(got)  # different prompts, different outputs


def test_grid_rows_end_every_way():
    """The grid's settings reach every stop case: a stop string, an EOS, max_new_tokens."""
    ends = set()
    for token, chunk in CELLS[:4]:
        method = cell(token, chunk)
        engine, eos = grid_engine(method)
        for r in rows():
            t = naive_search(reference_models(engine), r["id"], r["prompt"], method, engine.config.decode, eos, 7)[0]
            ends.add("eos" if t[-1] in eos else "length" if len(t) == 10 else "stop")
    assert ends == {"eos", "stop", "length"}, ends


def test_the_finished_policies_differ_and_repeat_costs_no_more():
    """Repeating a finished beam K times changes which beams survive (somewhere on this grid), and its
    copies cost no forwards: never more base tokens than keeping it once."""
    differ, tokens = 0, {"keep_once": 0, "repeat": 0}
    for token, chunk in [(t, c) for t, c in CELLS if c != "none"]:
        out = {}
        for finished in tokens:
            method = cell(token, chunk, finished=finished, L=1)
            got = grid_engine(method)[0].run(rows(), method)
            out[finished] = [(r["response"], r["score"]) for r in got]
            tokens[finished] += sum(r["model_tokens"]["base"] for r in got)
        differ += sum(a != b for a, b in zip(out["keep_once"], out["repeat"]))
    assert differ >= 2 and tokens["repeat"] <= tokens["keep_once"], (differ, tokens)


def test_finished_policies_agree_when_nothing_finishes_early():
    """The paper's IMDB setting (no stop strings, EOS off): every row runs to max_new_tokens, all
    finish in the same round, and the two policies (and score_eos) give the same outputs."""
    rows_of = {}
    for name, settings in [("ivg", {}), *PROFILES.items()]:
        method = cell("implicit", "explicit", **settings)
        engine = Engine.local(config([method], stop_at_eos=False))
        rows_of[name] = [(r["response"], r["score"], r["chunk_scores"], r["model_tokens"]) for r in engine.run(rows(), method)]
    assert rows_of["ivg"] == rows_of["paper"]


@pytest.mark.parametrize("token,chunk", [("none", "implicit"), ("implicit", "implicit"), ("none", "explicit"),
                                         ("explicit", "explicit")])  # scored by `chunk`, or reused from sampling
def test_score_eos_scores_the_eos_after_a_stop_string(token, chunk):
    """score_eos changes the final score of a row that ended on a stop string by exactly the value at
    EOS: + log-ratio(EOS) to the implicit sum, Q(s, EOS) replacing the explicit Q. Plain sampling with
    W=K=1 keeps the same tokens with either setting, so the two scores differ by that value alone."""
    decode = {"stop": ("g",), "max_new_tokens": 12, "stop_at_eos": False}
    plain, eos = cell(token, chunk, W=1, K=1, L=4), cell(token, chunk, W=1, K=1, L=4, score_eos=True)
    engine = Engine.local(config([plain, dataclasses.replace(eos, name="eos")], **decode))
    prompts = rows([f"{p} {i}" for i in range(2) for p in PROMPTS])
    a, b = engine.run(prompts, plain), engine.run(prompts, eos)
    assert [r["response"] for r in a] == [r["response"] for r in b]
    stopped = [i for i, r in enumerate(a) if r["n_new_tokens"] < 12]  # EOS is off: only "g" stops early
    assert stopped and len(stopped) < len(a)  # some rows end on a stop string, some run to the end
    models, tok = reference_models(engine), engine.tokenizer
    for i, r in enumerate(prompts):
        tokens, *_ = naive_search(models, r["id"], r["prompt"], plain, engine.config.decode, set(), 7)
        if i in stopped:
            at_eos = eos_value(chunk, models, r["prompt"], tokens, tok)
            expected = a[i]["score"] + at_eos if chunk == "implicit" else at_eos
            assert b[i]["score"] == pytest.approx(expected, abs=1e-9)
        else:  # cut at max_new_tokens: not ended, no EOS (padding may change the last bits)
            assert b[i]["score"] == pytest.approx(a[i]["score"], abs=1e-9)


def eos_value(chunk, models, prompt, tokens, tok) -> float:
    """The chunk role's value of EOS after `tokens`: log-ratio(EOS), or the token RM's Q(s, EOS)."""
    from ivg.reference import next_vector
    return next_vector(chunk, models, prompt, tokens, tok)[tok.eos_token_id].item()


def test_score_eos_needs_a_shared_vocabulary_and_a_scorer():
    from ivg.config import ConfigError
    with pytest.raises(ConfigError, match=r"methods\[0\]\.score_eos.*share the base's vocabulary"):
        Engine.local(config([cell("none", "explicit", score_eos=True)], explicit="rm-b"))
    with pytest.raises(ConfigError, match=r"score_eos.*has none"):
        cell("implicit", "none", score_eos=True).validate("m", config([cell("none", "none")]).models)
    with pytest.raises(ConfigError, match=r"finished.*not one of"):
        cell("none", "implicit", finished="twice").validate("m", config([cell("none", "none")]).models)


@pytest.mark.parametrize("explicit,guides", [("rm", "tiny"), ("rm-b", "tiny-b")])
@pytest.mark.parametrize("token,chunk", [("none", "explicit"), ("implicit", "explicit"), ("explicit", "implicit"),
                                         ("none", "implicit")])
def test_classifier_and_cross_tokenizer_scorers_match_reference(token, chunk, explicit, guides):
    if token == "explicit":  # token-wise explicit needs a token reward model: keep the TRM there
        explicit = "trm"
    if token == "implicit" and guides == "tiny-b":
        guides = "tiny"
    method = cell(token, chunk)
    engine = Engine.local(config([method], explicit=explicit, guides=guides))
    assert_same(engine.run(rows(), method), reference_rows(engine, method, rows()))


def test_deterministic_alone_batched_and_shuffled():
    method = cell("implicit", "explicit")
    engine = Engine.local(config([method]))
    many = rows([f"{p} #{i}" for i in range(8) for p in PROMPTS])  # 32 prompts
    def key(r):  # scores agree to rounding: padding changes the order of float additions
        return r["response"], round(r["score"], 9)
    batched = {r["id"]: key(r) for r in engine.run(many, method)}
    shuffled = list(many)
    random.Random(0).shuffle(shuffled)
    assert {r["id"]: key(r) for r in engine.run(shuffled, method)} == batched
    for r in many[:5]:
        [alone] = engine.run([r], method)
        assert key(alone) == batched[r["id"]]


def test_seed_changes_outputs():
    method = cell("none", "implicit")
    a = Engine.local(config([method])).run(rows(), method)
    other = config([method])
    other = type(other)(models=other.models, decode=other.decode, methods=other.methods, seed=8)
    b = Engine.local(other).run(rows(), method)
    assert [r["response"] for r in a] != [r["response"] for r in b]


class SpyRoles:
    """Records the chunk values the search sees."""

    def __init__(self, inner):
        self.inner, self.chunk_values = inner, []

    def call(self, messages):
        out = self.inner.call(messages)
        for role, message in messages.items():
            if isinstance(message, Chunk):
                self.chunk_values.append(out[role].values.tolist())
        return out


def test_best_of_n_is_one_round_that_keeps_the_best_of_n():
    bon = MethodConfig(chunk="explicit", W=1, K=4, L=None, name="bon-4")
    engine = Engine.local(config([bon], explicit="rm"))
    engine.roles = spy = SpyRoles(engine.roles)
    [row] = engine.run(rows()[:1], bon)
    assert len(spy.chunk_values) == 1 and len(spy.chunk_values[0]) == 4  # one scoring round of N rows
    assert row["score"] == pytest.approx(max(spy.chunk_values[0]))
    assert row["chunk_scores"] == [row["score"]]


def test_plain_sampling_is_the_w1_k1_case():
    plain = MethodConfig()
    engine = Engine.local(config([plain], max_new_tokens=6, stop_at_eos=False))
    reference = reference_rows(engine, plain, rows())
    engine.roles = spy = SpyRoles(engine.roles)
    got = engine.run(rows(), plain)
    assert spy.chunk_values == [] and all(r["n_new_tokens"] == 6 for r in got)
    assert_same(got, reference)


def test_stop_strings_end_rows_and_are_cut_from_the_response():
    method = cell("none", "implicit")
    stops = ("e", "a")  # frequent: most rows stop early
    engine = Engine.local(config([method], stop=stops, max_new_tokens=30))
    got = engine.run(rows(), method)
    assert all(not any(s in r["response"] for s in stops) for r in got)
    assert any(r["n_new_tokens"] < 30 for r in got)
    assert_same(got, reference_rows(engine, method, rows()))


def test_finished_beams_cost_no_more_compute():
    method = cell("none", "implicit", L=2)
    stopped = Engine.local(config([method], stop=("e", "a"), max_new_tokens=30)).run(rows(), method)
    free = Engine.local(config([method], max_new_tokens=30, stop_at_eos=False)).run(rows(), method)
    assert any(r["n_new_tokens"] < 30 for r in stopped)
    assert sum(r["model_tokens"]["base"] for r in stopped) < sum(r["model_tokens"]["base"] for r in free)


def test_finished_beams_compete_with_children():
    finished = Beam([1, 2], score=5.0, done=True)
    live = Beam([3], score=1.0, row=0)
    children = [Child(0, Beam([3, 4])), Child(0, Beam([3, 5], done=True)), Child(0, Beam([3, 6]))]
    kept = keep_top([[finished, live]], children, [6.0, 4.0, 5.0], W=2)
    assert [b.tokens for b in kept[0]] == [[3, 4], [1, 2]]  # a tie keeps the earlier (finished) beam
    assert [b.row for b in kept[0]] == [0, -1] and kept[0][0].scores == [6.0]


def test_repeat_enters_a_finished_beam_k_times():
    """The paper's policy: each kept beam is repeated K times, a finished one as identical copies, which
    compete with the children and can fill several of the W slots; ties keep the earlier (finished)."""
    def round_(finished, child_scores):
        kept = [[Beam([1, 2], score=5.0, scores=[5.0], done=True), Beam([3], score=1.0, row=0)]]
        children = [Child(0, Beam([3, c])) for c in range(len(child_scores))]
        return keep_top(kept, children, child_scores, W=3, finished=finished, K=2)[0]
    once, repeat = round_("keep_once", [6.0, 4.0]), round_("repeat", [6.0, 4.0])
    assert [b.tokens for b in once] == [[3, 0], [1, 2], [3, 1]]
    assert [b.tokens for b in repeat] == [[3, 0], [1, 2], [1, 2]]  # two copies: the weaker child is out
    assert all(b.done and b.score == 5.0 and b.scores == [5.0] for b in repeat[1:])
    assert repeat[1] is not repeat[2]  # copies, not one object twice
    tie = round_("repeat", [5.0, 5.0])
    assert [b.tokens for b in tie] == [[1, 2], [1, 2], [3, 0]]  # a tie keeps the finished copies first


def test_template_reaches_base_only():
    method = MethodConfig(token="implicit")
    engine = Engine.local(config([method], max_new_tokens=4, stop_at_eos=False))
    [row] = engine.run(rows(["abc"]), method)
    base_prefill = len("Review: abc")  # char-level tiny tokenizer
    # base: prefill + 3 fed tokens (the 4th is never fed); each guide: 3 + 3
    assert row["model_tokens"] == {"base": base_prefill + 3, "implicit": 2 * (3 + 3)}


def test_chat_template():
    from ivg.models import load, prompt_ids

    from helpers.models import tiny
    loaded = load(tiny("tiny:base", template="chat"))
    ids = prompt_ids(loaded, "hi")
    assert loaded.tokenizer.decode(ids) == "<user>hi\n<assistant>"


def test_chunk_scoring_is_incremental():
    """Scorer tokens grow linearly with response length: each response token is fed once."""
    def implicit_tokens(n):
        method = cell("none", "implicit", L=4)
        engine = Engine.local(config([method], max_new_tokens=n, stop_at_eos=False))
        [row] = engine.run(rows(["abc"]), method)
        return row["model_tokens"]["implicit"]
    prefill, rows_per_prompt = len("abc"), 4  # W*K rows, no stop strings: every row runs to the end
    for n in (8, 16, 32):
        assert implicit_tokens(n) == 2 * (prefill + rows_per_prompt * n)  # two models: tuned, untuned
    # a re-encoding scorer would process sum over chunks of the whole prefix: quadratic in n
    reencode = sum(rows_per_prompt * (prefill + 4 * c) for c in range(1, 32 // 4 + 1)) * 2
    assert implicit_tokens(32) < reencode / 2


def test_accounting_columns():
    method = cell("implicit", "explicit")
    [row] = Engine.local(config([method])).run(rows()[:1], method)
    assert set(row["model_tokens"]) == {"base", "implicit", "explicit"}
    assert row["wall_s"] > 0 and row["n_new_tokens"] == 10
    assert len(row["chunk_scores"]) == 4  # ceil(10 / L=3) chunks
    assert row["method"] == "tok-implicit+cbs-explicit" and (row["W"], row["K"], row["L"]) == (2, 2, 3)


def test_failed_prompt_does_not_lose_neighbours():
    method = cell("none", "implicit")
    engine = Engine.local(config([method]))
    got = engine.run(rows(["the movie", "x" * 2000, "good"]), method)
    assert [r["status"] for r in got] == ["ok", "failed", "ok"]
    assert "context" in got[1]["error"] and got[1]["response"] is None
    ok = engine.run(rows(["the movie", "good"]), method)
    assert [got[0]["response"], got[2]["response"]] != [None, None]
    assert got[0]["response"] == ok[0]["response"]  # same id p0 → same stream


def test_max_new_tokens_auto_fills_each_prompts_room_in_the_context():
    """auto: per prompt, the room its views leave in the tightest context of the models the method
    uses (here the base's, whose template makes its view the longest); a prompt that fills the
    context fails with a reason, its neighbours run. The reference computes the room itself."""
    method = cell("implicit", "explicit")
    engine = Engine.local(config([method], max_new_tokens="auto", stop_at_eos=False))
    for role in engine.roles.roles.values():
        for m in role.models:
            m.model.config.n_positions = 36  # a 36-token context (GPT-2 reads it only when built)
    prompts = rows()  # base views "Review: <prompt>": 21, 9, 40 and 34 tokens (characters)
    got = engine.run(prompts, method)
    assert [r["status"] for r in got] == ["ok", "ok", "failed", "ok"]
    assert [r["n_new_tokens"] for r in got] == [15, 27, 0, 2]
    assert "fills the model's context" in got[2]["error"] and got[2]["error"].startswith("base:")
    ok = [r for r, g in zip(prompts, got) if g["status"] == "ok"]
    assert_same([g for g in got if g["status"] == "ok"], reference_rows(engine, method, ok))


def test_max_new_tokens_auto_is_validated():
    from ivg.config import ConfigError, DecodeConfig, from_dict
    assert from_dict(DecodeConfig, {"max_new_tokens": "auto"}).max_new_tokens == "auto"
    for bad in ("lots", 0, 2.5):
        with pytest.raises(ConfigError, match=r"^decode\.max_new_tokens"):
            from_dict(DecodeConfig, {"max_new_tokens": bad}, "decode").validate()
    cfg = config([cell("none", "none")], max_new_tokens="auto")
    with pytest.raises(ConfigError, match=r"^truncate.*auto"):
        Engine.local(cfg, truncate="left")
