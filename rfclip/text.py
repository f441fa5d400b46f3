"""Text side: query embeddings from the 80 OpenAI ImageNet prompt templates (METHODS.md §1).

For each name: fill every template, encode, L2-normalise each, average, L2-normalise again.
Embeddings are cached per (weights identity, name) in a process-wide table, so a vocabulary is
encoded once per process even when several Segmenters (one per method, say) share the weights.
That cache is why this is not ``open_clip.build_zero_shot_classifier``, which does the same average
for a whole class list at a time and keeps nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)

# weights identity -> name -> (D,) float32 CPU embedding
_SHARED_CACHE: dict[str, dict[str, torch.Tensor]] = {}


class TextEncoder:
    """Encodes query names into ``(Q, D)`` float32 unit vectors, with a cache.

    Args:
        model: an open_clip CLIP model (its text tower is used).
        tokenizer: the open_clip tokenizer for that model.
        device: where to run the text tower.
        templates: prompt templates with one ``{}``.
        identity: a key that identifies the weights (e.g. their sha256 and architecture); encoders with
            the same identity and templates share one cache. None gives a private cache.
    """

    def __init__(self, model, tokenizer, device: torch.device, templates: tuple[str, ...] = TEMPLATES,
                 identity: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.templates = templates
        key = None if identity is None else f"{identity}|{hash(templates)}"
        self._cache: dict[str, torch.Tensor] = _SHARED_CACHE.setdefault(key, {}) if key else {}

    @torch.no_grad()
    def encode_names(self, names: list[str], batch_templates: int = 1024) -> torch.Tensor:
        """``(Q, D)`` float32 embeddings of ``names`` on the encoder's device."""
        missing = [n for n in dict.fromkeys(names) if n not in self._cache]
        if missing:
            prompts = [t.format(n) for n in missing for t in self.templates]
            feats = []
            for i in range(0, len(prompts), batch_templates):
                tokens = self.tokenizer(prompts[i:i + batch_templates]).to(self.device)
                feats.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
            per_prompt = torch.cat(feats).view(len(missing), len(self.templates), -1)
            per_name = F.normalize(per_prompt.mean(dim=1), dim=-1)
            for n, e in zip(missing, per_name):
                self._cache[n] = e.cpu()
        return torch.stack([self._cache[n] for n in names]).to(self.device)
