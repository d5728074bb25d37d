"""Model cards: a README.md per trained guide saying what it is, how to load it, its data, training and accuracy."""

from pathlib import Path


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def write_cards(folder: Path, record: dict) -> None:
    """A README.md per model: what it is, how to load it, the data, the training, its gold accuracy."""
    c, s, m = record["config"], record["config"]["settings"], record["metrics"]
    data = (f"- pairs: {record['pairs_sampled']} sampled from `{c['untuned']['name']}` ({s['pairs_per_prompt']} per "
            f"prompt, {record['n_prompts']} prompts, max_new_tokens={s['max_new_tokens']}, temperature={s['temperature']}, "
            f"stop={s['stop']}, seed={s['seed']}), labelled by the gold `{record['gold']['name']}` ({record['gold']['kind']}); "
            f"{record['pairs_labelled']} kept (ties and empty responses dropped): "
            f"{m['train']['pairs']} train, {m['heldout']['pairs']} held out (by prompt, {s['heldout']:.0%}).\n"
            "- exact pairs: `../pairs.jsonl`; every setting: `../ivg-build.json`.\n")
    lora = f"LoRA r={s['lora_r']} alpha={s['lora_alpha']} on all linear layers, merged into the weights" \
        if s["lora_r"] else "full fine-tuning"
    accuracy_note = ("Gold accuracy: how often the value orders a pair (chosen, rejected) as the gold reward "
                     "does; a tie counts as wrong, chance is 50%.\n")
    cards = {
        "tuned": (
            "# DPO-tuned guide (implicit value)\n\n"
            f"`{c['untuned']['name']}` tuned with DPO (TRL) on gold-labelled pairs of its own samples. Used with "
            "its untuned start as the implicit value log pi_tuned - log pi_untuned.\n"
            f"Load: `ModelSpec(<this folder>, kind='causal_lm', template={c['untuned']['template']!r})`; "
            "a plain HF causal LM (safetensors).\n\n"
            f"## Data\n{data}\n"
            f"## Training\nDPO sigmoid loss, beta={s['beta']}, lr={s['lr']} (constant), epochs={s['epochs']}, "
            f"batch={s['batch_size']} pairs, {record['dpo']['steps']} steps, {lora}; loss "
            f"{record['dpo']['loss_first']} -> {record['dpo']['loss_last']}; {record['timings']['dpo_s']:.0f}s.\n\n"
            f"## Gold accuracy of the implicit reward sum_t (log pi_tuned - log pi_untuned)\n{accuracy_note}"
            f"- train: {_pct(m['train']['implicit_accuracy'])}\n"
            f"- held out: {_pct(m['heldout']['implicit_accuracy'])}\n"
            "- before training: 0% (tuned = untuned: every pair ties)\n"),
    }
    if record["token_rm"]:  # trained only with settings.token_rm
        cards["explicit"] = (
            "# Token reward model (explicit value)\n\n"
            f"Body of `{(c['explicit_init'] or c['untuned'])['name']}` with a fresh head Linear(hidden, vocab), "
            "stored as an ordinary causal LM whose logits are Q(s, .).\n"
            "Load: `ModelSpec(<this folder>, kind='token_reward')`.\n\n"
            f"## Data\n{data}\n"
            "## Training\nFUDGE-style: for each response prefix, Q(s_<t, a_t) is the logit that the response is "
            "the gold-chosen one of its pair (BCE, chosen = 1, rejected = 0, each sequence weighted equally). "
            f"Head initialized at zero (Q = 0 until trained); lr={s['rm_lr']} (AdamW, constant), "
            f"epochs={s['epochs']}, batch={s['batch_size']} sequences, {record['token_rm']['steps']} steps, "
            f"{lora.replace(', merged', ' + the head, merged')}; loss {record['token_rm']['loss_first']} -> "
            f"{record['token_rm']['loss_last']}; {record['timings']['token_rm_s']:.0f}s.\n\n"
            f"## Gold accuracy of Q at the last response token\n{accuracy_note}"
            f"- train: {_pct(m['train']['token_rm_accuracy'])}\n"
            f"- held out: {_pct(m['heldout']['token_rm_accuracy'])}\n")
    for name, text in cards.items():
        (folder / name / "README.md").write_text(text)
