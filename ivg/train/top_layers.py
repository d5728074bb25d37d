"""The top-layer trick: fine-tune only the top k decoder layers, fed the cached states below them.

With the layers below `cut = n_layers - k` frozen, their output for a sequence never changes during
training; featurize (ivg/train/features.py) computes it once, and each training step runs only the top
k layers from it. That is exact (the same numbers as running the whole model), and the step costs
k / n_layers of a full forward and backward. `TopLayers.check_exact` measures the exactness on real
examples; an architecture that adds something to `inputs_embeds` (GPT-2's position embeddings, Gemma's
scaling) fails it, and is trained with `layers: null` (every layer, from token ids) instead.

The final norm, embeddings and output head stay frozen (SmolLM2 ties its head to its embeddings).
"""

import copy

import torch

from ivg.train.features import Features, decoder_layers, pad_right, response_positions, token_logps


class TopLayers(torch.nn.Module):
    """A trainable copy of `full` holding only its top `k` decoder layers (k None: every layer, fed token ids)."""

    def __init__(self, full, k: int | None):
        super().__init__()
        n = full.config.num_hidden_layers
        if k is not None and not 1 <= k <= n:
            raise ValueError(f"train.dpo.layers: {k} is not between 1 and the model's {n} layers")
        self.n_layers, self.cut = n, 0 if k is None else n - k
        self.model = copy.deepcopy(full).float().eval()  # eval: no dropout, as TRL does for DPO
        layers = decoder_layers(self.model)
        if self.cut:
            del layers[:self.cut]
            self.model.config.num_hidden_layers = k
        for name, p in self.model.named_parameters():
            p.requires_grad_(False)
        for p in layers.parameters():
            p.requires_grad_(True)

    def response_logps(self, batch: list[Features]) -> torch.Tensor:
        """(B,) sum of log pi(a_t | s_<t) over each response's tokens, with gradients."""
        lengths = [(len(f.prompt_ids), len(f.response_ids)) for f in batch]
        ids, mask = pad_right([f.ids for f in batch])
        if self.cut:
            states = torch.zeros(*ids.shape, batch[0].cut.shape[-1])  # (B, T, H): layer `cut`'s input
            for i, f in enumerate(batch):
                states[i, :len(f.cut)] = f.cut
            hidden = self.model.base_model(inputs_embeds=states, attention_mask=mask, use_cache=False).last_hidden_state
        else:
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        rows, cols = response_positions(lengths)
        per_token = token_logps(self.model.get_output_embeddings(), hidden[rows, cols], ids[rows, cols + 1])
        return torch.zeros(len(batch)).index_add(0, rows, per_token)

    @torch.no_grad()
    def check_exact(self, sample: list[Features], atol: float = 1e-4) -> float:
        """Largest |log-prob sum - the untuned model's| on `sample` before any training; raises if
        the top layers fed the cached states do not reproduce the full model."""
        gap = (self.response_logps(sample) - torch.stack([f.ref.sum() for f in sample])).abs().max().item()
        if gap > atol:
            raise ValueError(f"train.dpo.layers: the top {self.n_layers - self.cut} layers of "
                             f"{type(self.model).__name__} fed the cached states differ from the full model by "
                             f"{gap:.2g} in log-prob; this architecture changes inputs_embeds on the way in: "
                             "set layers: null to train every layer")
        return gap

    def merged_into(self, full):
        """`full` (edited in place and returned) with its top layers replaced by the trained ones."""
        trained = decoder_layers(self.model)
        target = decoder_layers(full)
        for j, layer in enumerate(trained):
            target[self.cut + j].load_state_dict(layer.state_dict())
        return full
