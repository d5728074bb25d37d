"""Model cards: a README.md and a card.json per trained guide: what it is, how to load it, its data,
its training, and the held-out accuracy of both values (each card carries both: they were made from the
same samples and are used together)."""

import json
from pathlib import Path

ACCURACY_NOTE = ("Gold accuracy: how often a value orders a pair (chosen, rejected) as the gold reward does; "
                 "a tie counts as wrong, chance is 50%. Held-out pairs: one per held-out prompt, never trained "
                 "on (nor any prompt repeating one).")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def card_data(record: dict, role: str) -> dict:
    """The machine-readable card of `role` (tuned | explicit)."""
    c, m = record["config"], record["metrics"]
    heldout = {"pairs": m["heldout_pairs"], "prompts": record["prompts"]["heldout"],
               "implicit_accuracy": m["implicit"]["heldout"],
               "token_rm_accuracy": (m.get("token_rm") or {}).get("heldout")}
    common = {"gold": {k: record["gold"][k] for k in ("name", "kind")}, "heldout": heldout,
              "data": {"untuned": c["untuned"]["name"], "settings": c["settings"], "prompts": record["prompts"],
                       "responses": record["responses"], "usable_responses": record["usable_responses"],
                       "samples": "../samples.jsonl"},
              "checked_against_saved_folder": m["checked"], "timings_s": record["timings"]}
    if role == "tuned":
        return {"guide": "tuned", "value": "implicit: sum_t log pi_tuned - log pi_untuned",
                "load": {"name": "<this folder>", "kind": "causal_lm", "template": c["untuned"]["template"]},
                "untuned": c["untuned"]["name"], "training": {"method": "DPO, ranking (Plackett-Luce) form", **c["dpo"],
                "prompts": m["dpo_prompts"], "responses": m["dpo_responses"], "validation_pairs": m["val_pairs"],
                **record["dpo"]},
                "train_accuracy": m["implicit"]["train"], **common}
    return {"guide": "explicit", "value": "token reward model Q(s, a); chunk-level: Q at the last token",
            "load": {"name": "<this folder>", "kind": "token_reward", "template": c["untuned"]["template"]},
            "body": c["untuned"]["name"], "training": {"method": "fitted head W[a] = w + b_a c on the frozen body",
            **c["token_rm"], **record["token_rm"]}, "train_accuracy": m["token_rm"]["train"], **common}


def write_cards(folder: Path, record: dict) -> None:
    c, s, m = record["config"], record["config"]["settings"], record["metrics"]
    d = c["dpo"]
    data = (f"- samples: {record['responses']} responses of `{c['untuned']['name']}` (max_new_tokens={s['max_new_tokens']}, "
            f"temperature={s['temperature']}, stop={s['stop']}, seed={s['seed']}), scored by the gold "
            f"`{record['gold']['name']}` ({record['gold']['kind']}).\n"
            f"- held out: {record['prompts']['heldout']} prompts, one pair each ({m['heldout_pairs']} usable: ties and "
            "empty responses dropped), right after the evaluated prompts; never trained on.\n"
            f"- training: {s['n_prompts']} prompts (openings repeating an evaluated or held-out one dropped), "
            f"{s['responses']} responses each.\n"
            "- exact samples: `../samples.jsonl`; every setting: `../ivg-build.json`; this card as data: `card.json`.\n")
    heldout = (f"## Held-out gold accuracy (n = {m['heldout_pairs']} pairs)\n{ACCURACY_NOTE}\n\n"
               f"- implicit value (this DPO pair): {_pct(m['implicit']['heldout'])}\n"
               f"- token reward model: {_pct((m.get('token_rm') or {}).get('heldout'))}\n")
    dpo = record["dpo"]
    layers = f"the top {d['layers']} decoder layers (fed the cached states below them: exact)" if d["layers"] else "every decoder layer"
    cards = {"tuned": (
        "# DPO-tuned guide (implicit value)\n\n"
        f"`{c['untuned']['name']}` tuned with DPO on gold-labelled pairs of its own samples. Used with its untuned "
        "start as the implicit value sum_t (log pi_tuned - log pi_untuned).\n"
        f"Load: `ModelSpec(<this folder>, kind='causal_lm', template={c['untuned']['template']!r})`; a plain HF "
        "causal LM (safetensors).\n\n"
        f"{heldout}- implicit value on the first pairs of its training prompts: {_pct(m['implicit']['train'])}\n\n"
        f"## Data\n{data}\n"
        f"## Training (ivg/train/dpo.py)\nDPO in its ranking form (Plackett-Luce over each prompt's responses ranked "
        f"by gold; for two responses the sigmoid loss): {m['dpo_responses']} responses to {m['dpo_prompts']} prompts, "
        f"beta={d['beta']}, AdamW lr={d['lr']} (constant), {d['batch_size']} prompts a step, {d['epochs']} epoch(s), "
        f"{layers}; " + (f"validation on {m['val_pairs']} pairs of {d['val_prompts']} held-back training prompts every "
        f"{d['eval_every'] or 'epoch'} steps, the best kept (step {dpo['kept_step']} of {dpo['steps']}, validation "
        f"accuracy {_pct(dpo['kept_val_accuracy'])}); " if d['val_prompts'] else f"{dpo['steps']} steps; ")
        + f"loss {dpo['loss_first']:.4f} -> {dpo['loss_last']:.4f}; {record['timings']['dpo_s']:.0f}s.\n")}
    if record["token_rm"]:
        r, t = c["token_rm"], record["token_rm"]
        cards["explicit"] = (
            "# Token reward model (explicit value)\n\n"
            f"The frozen body of `{c['untuned']['name']}` with a fitted head Linear(hidden, vocab), stored as an ordinary "
            "causal LM whose logits are Q(s, .). Chunk-level, the value of a response is Q at its last token.\n"
            "Load: `ModelSpec(<this folder>, kind='token_reward')`.\n\n"
            f"{heldout}- token RM on the first pairs of its training prompts: {_pct(m['token_rm']['train'])}\n\n"
            f"## Data\n{data}\n"
            "## Training (ivg/train/token_rm.py)\n"
            f"1. w: logistic regression (C={r['C']}, standardised states) of every response position's final hidden "
            f"state on the response's win fraction among the {s['responses']} responses to its prompt, each sequence "
            f"weighted equally: FUDGE's per-token BCE with one row shared by all tokens ({t['sequences']} responses, "
            f"{t['positions']} positions).\n"
            f"2. W[a] = w + b_a c, c a direction with h . c ~ 1 ({t['h_dot_c_mean']:.4f} +- {t['h_dot_c_std']:.4f}), "
            f"b_a the mean value increment after token a shrunk by {r['shrink']} pseudo-counts "
            f"({t['tokens_seen']} tokens seen; an unseen token has b_a = 0: neutral token-wise); "
            f"{record['timings']['token_rm_s']:.0f}s.\n")
    for role, text in cards.items():
        (folder / role / "README.md").write_text(text)
        (folder / role / "card.json").write_text(json.dumps(card_data(record, role), indent=1) + "\n")
