"""The toy world's text encoder: a word-level tokenizer and a 2-layer transformer.

Every word the toy prompts use (template words, colours, shapes, numbers and all the quoted words
of :data:`~marble_lightning.toy.world.WORDS`) is one token, so a quoted word is "spelled" by a
single embedding the model learns to draw. The double quote is a token of its own. Unknown words
map to ``<unk>``. Every sequence starts with ``<bos>``, so the empty prompt (used for
classifier-free guidance) is the one-token sequence ``[<bos>]``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from marble_lightning.checks import check_int
from marble_lightning.toy.prompts import COLORS, NUMBER_WORDS, TEXT_PHRASINGS
from marble_lightning.toy.world import RELATIONS, SHAPES, WORDS

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
_TOKEN_RE = re.compile(r'[a-z]+|"')


def default_vocabulary() -> list[str]:
    """Special tokens, then every word of the toy grammar, in a fixed order."""
    words: list[str] = []
    sources = [
        " ".join(TEXT_PHRASINGS).replace("{}", " "),
        " ".join(NUMBER_WORDS.values()),
        " ".join(COLORS),
        " ".join(SHAPES) + " " + " ".join(s + "s" for s in SHAPES),
        " ".join(RELATIONS),
        " ".join(WORDS),
    ]
    for text in sources:
        for tok in _TOKEN_RE.findall(text.lower()):
            if tok not in words:
                words.append(tok)
    if '"' not in words:
        words.append('"')
    return [PAD, BOS, UNK, *words]


class WordTokenizer:
    """Lower-cases, splits into words and double quotes, maps to ids, pads to ``max_length``.

    Args:
        vocabulary: token strings; must start with ``<pad>``, ``<bos>``, ``<unk>``.
        max_length: sequence length including ``<bos>``; longer prompts raise ``ValueError``.
    """

    def __init__(self, vocabulary: Sequence[str], max_length: int = 16) -> None:
        vocabulary = list(vocabulary)
        if vocabulary[:3] != [PAD, BOS, UNK]:
            raise ValueError(f"vocabulary must start with {[PAD, BOS, UNK]}, got {vocabulary[:3]}")
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("vocabulary has duplicate tokens")
        check_int("max_length", max_length, minimum=2)
        self.vocabulary = vocabulary
        self.index = {t: i for i, t in enumerate(vocabulary)}
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.vocabulary)

    def tokens(self, prompt: str) -> list[str]:
        """The token strings of ``prompt`` (without ``<bos>``)."""
        return _TOKEN_RE.findall(prompt.lower())

    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids ``[B, L]`` (long) and the validity mask ``[B, L]`` (bool),
        ``L = max_length``."""
        if isinstance(prompts, str):
            raise TypeError("WordTokenizer expects a list of prompts, got a single string")
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        unk = self.index[UNK]
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} is not a string: {prompt!r}")
            toks = [self.index[BOS]] + [self.index.get(t, unk) for t in self.tokens(prompt)]
            if len(toks) > self.max_length:
                raise ValueError(
                    f"prompt {prompt!r} has {len(toks)} tokens, more than "
                    f"max_length={self.max_length}"
                )
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = True
        return ids, mask


class ToyTextEncoder(nn.Module):
    """Token + position embeddings, a pre-norm transformer encoder, a final LayerNorm.

    Args:
        vocab_size: number of tokens.
        width: embedding width ``D`` (the UNet's ``cross_attention_dim``).
        layers: transformer layers.
        heads: attention heads.
        max_length: number of position embeddings.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        max_length: int = 16,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, width))
        nn.init.normal_(self.position_embedding, std=0.02)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=heads,
            dim_feedforward=2 * width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Hidden states ``[B, L, D]`` for ids ``[B, L]`` with validity mask ``[B, L]`` (bool)."""
        h = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=~mask)
        return self.final_norm(h)
