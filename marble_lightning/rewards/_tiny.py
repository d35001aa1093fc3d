"""Tiny randomly initialised reward models in the real on-disk formats (tests, offline demos).

Each builder writes files that the rewards load through their public constructors, exactly as a
user's downloaded checkpoint would be loaded. Nothing here touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# GPT-2/CLIP byte-level BPE alphabet: printable bytes map to themselves, the rest to 256+.
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
_MERGES = (
    "t h",
    "c a",
    "a t</w>",
    "o g</w>",
    "d og</w>",
    "c at</w>",
    "th e</w>",
    "r e",
    "re d</w>",
)


def byte_alphabet() -> list[str]:
    """The 256 unicode stand-ins of bytes 0..255 used by byte-level BPE vocabularies."""
    table = {b: chr(b) for b in _PRINTABLE}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def write_clip_tokenizer_files(folder: str | Path) -> tuple[Path, Path]:
    """Write a small CLIP BPE ``vocab.json`` + ``merges.txt`` (bytes, a few merges, specials).

    Returns:
        ``(vocab_path, merges_path)``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_alphabet()
    tokens = [*chars, *(c + "</w>" for c in chars)]
    tokens += ["".join(m.split(" ")) for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab))
    merges_path.write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    return vocab_path, merges_path


def tiny_clip_config(vocab_size: int, projection_dim: int = 16, image_size: int = 32):
    """A transformers ``CLIPConfig`` with 2-layer, width-32 towers."""
    from transformers import CLIPConfig

    text = {
        "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1,
    }  # fmt: skip
    vision = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": image_size, "patch_size": 8,
    }  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_tiny_clip(
    folder: str | Path, projection_dim: int = 16, image_size: int = 32, seed: int = 0
) -> Path:
    """Save a random tiny ``CLIPModel`` + ``CLIPProcessor`` to ``folder`` (``from_pretrained`` format).

    The image processor resizes the shortest side to ``image_size`` and centre-crops to it.
    """
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    vocab, merges = write_clip_tokenizer_files(folder / "_tokenizer_src")
    tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges))
    vocab_size = len(json.loads(vocab.read_text()))
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(vocab_size, projection_dim, image_size)).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


TINY_OPEN_CLIP_CONFIG: dict = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
"""A 2-layer open_clip ViT config; the vocabulary matches open_clip's default BPE tokenizer."""


def save_tiny_open_clip(
    folder: str | Path, name: str = "tiny-open-clip", seed: int = 0
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (open_clip model config) and ``<name>.safetensors`` (random weights).

    Returns:
        ``(config_path, checkpoint_path)``.
    """
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():  # random projections instead of open_clip's near-degenerate init
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ckpt = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return config_path, ckpt


def save_aesthetic_mlp(path: str | Path, input_dim: int = 16, seed: int = 0) -> Path:
    """Save a random LAION aesthetic-predictor MLP state dict (``layers.{0,2,4,6,7}``) to ``path``.

    ``.safetensors`` suffix -> safetensors, otherwise ``torch.save``.
    """
    from marble_lightning.rewards.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    mlp = AestheticMLP(input_dim)
    path = Path(path)
    state = {k: v.contiguous() for k, v in mlp.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def save_tiny_owlv2(folder: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Save a random tiny ``Owlv2ForObjectDetection`` + ``Owlv2Processor`` to ``folder``.

    Vision tower: patch 8 on ``image_size`` (16 boxes at 32 px); text tower: 2 layers, context 16.
    """
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    folder = Path(folder)
    vocab, merges = write_clip_tokenizer_files(folder / "_tokenizer_src")
    vocab_size = len(json.loads(vocab.read_text()))
    tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=16)
    text = {
        "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1,
    }  # fmt: skip
    vision = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": image_size, "patch_size": 8,
    }  # fmt: skip
    torch.manual_seed(seed)
    # OWL's class head needs projection_dim == text hidden size (as in the released models)
    model = Owlv2ForObjectDetection(
        Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
    ).eval()
    with torch.no_grad():  # untrained heads saturate; shrink them so scores and boxes stay graded
        for layer in (
            model.class_head.logit_scale,
            model.class_head.logit_shift,
            model.box_head.dense2,
        ):
            layer.weight.mul_(0.01)
            layer.bias.zero_()
        model.class_head.logit_scale.bias.fill_(2.0)
    model.save_pretrained(folder)
    image_processor = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
