"""Open-vocabulary detector for :class:`~marble_lightning.rewards.composition.CompositionReward`:
OWLv2 (transformers ``Owlv2ForObjectDetection``), no mmcv/mmdet.

Pipeline, per batch of images ``[B, 3, H, W]`` in ``[0, 1]``:

1. Pad each image to a square of side ``S = max(H, W)`` at the bottom/right with grey 0.5 (as
   OWLv2's image processor does), resize to the model's input size (bilinear, antialiased),
   normalise with the processor's mean/std.
2. Text queries ``query_template.format(label)`` for the labels asked for that image (padded to
   the batch's longest query list; padded columns are ignored).
3. Per predicted box: probability ``sigmoid(logit)``, best query = label; keep boxes with
   probability >= ``box_threshold``; per-label NMS at ``nms_iou``; at most ``max_detections``.
4. Boxes (centre/size in the padded square) are mapped back to the original image and
   normalised to ``[0, 1]``.
5. Colour: the mean RGB of the central part of the box (the middle ``color_crop`` fraction of its
   width and height, to avoid background) is named by the nearest reference colour in RGB
   (:data:`COLOR_PROTOTYPES`, GenEval's ten colour names, or a palette you pass). This is simpler
   than GenEval's CLIP-on-masked-crop colour classifier; it is exact for flat colours and crude
   for textured objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from marble_lightning.checks import check_float, check_int
from marble_lightning.rewards._loading import LazyModel, normalize, parse_dtype, resolve_source
from marble_lightning.rewards.base import check_images
from marble_lightning.rewards.detection import Detection

COLOR_PROTOTYPES: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "blue": (30, 70, 220),
    "purple": (130, 50, 170),
    "pink": (245, 150, 190),
    "brown": (130, 80, 40),
    "black": (15, 15, 15),
    "white": (240, 240, 240),
}
"""Reference RGB of GenEval's colour names, for nearest-colour naming."""


def name_color(rgb: Tensor, palette: Mapping[str, Sequence[int]]) -> str:
    """Nearest palette name (Euclidean in RGB) of a colour ``[3]`` in ``[0, 1]``."""
    names = list(palette)
    refs = (
        torch.tensor([list(palette[n]) for n in names], dtype=torch.float32, device=rgb.device)
        / 255.0
    )
    return names[int(((refs - rgb.float()) ** 2).sum(-1).argmin())]


class OwlDetector:
    """OWLv2 open-vocabulary detector implementing the ``Detector`` protocol.

    Args:
        model: local folder or hub id of an ``Owlv2ForObjectDetection`` + ``Owlv2Processor``
            (default ``"google/owlv2-base-patch16-ensemble"``).
        box_threshold: minimum box probability kept.
        nms_iou: IoU above which same-label boxes are suppressed (1.0 disables NMS).
        max_detections: at most this many boxes per image (highest probability first).
        query_template: how a label becomes a text query.
        colors: colour palette ``{name: (r, g, b)}`` in 0..255 for naming box colours.
        color_crop: central fraction of the box (per side) averaged for its colour.
        dtype: model dtype.
    """

    def __init__(
        self,
        model: str = "google/owlv2-base-patch16-ensemble",
        box_threshold: float = 0.1,
        nms_iou: float = 0.3,
        max_detections: int = 32,
        query_template: str = "a photo of a {}",
        colors: Mapping[str, Sequence[int]] | None = None,
        color_crop: float = 0.5,
        dtype: str = "float32",
    ) -> None:
        self.model_ref, self.model_local = resolve_source(model, "OwlDetector")
        self.box_threshold = check_float("box_threshold", box_threshold, minimum=0.0, maximum=1.0)
        self.nms_iou = check_float("nms_iou", nms_iou, minimum=0.0, strict=True, maximum=1.0)
        self.max_detections = check_int("max_detections", max_detections)
        if "{}" not in query_template:
            raise ValueError(
                f"OwlDetector: query_template must contain '{{}}', got {query_template!r}"
            )
        self.query_template = query_template
        self.colors = dict(colors) if colors is not None else dict(COLOR_PROTOTYPES)
        self.color_crop = check_float(
            "color_crop", color_crop, minimum=0.0, strict=True, maximum=1.0
        )
        self.dtype = parse_dtype(dtype, "OwlDetector")
        self._owl = LazyModel(self._build)

    def _build(self):
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        model = Owlv2ForObjectDetection.from_pretrained(
            self.model_ref, local_files_only=self.model_local
        )
        processor = Owlv2Processor.from_pretrained(
            self.model_ref, local_files_only=self.model_local
        )
        return model, processor

    def owl(self, device: torch.device | str):
        """``(Owlv2ForObjectDetection, Owlv2Processor)``, loaded on first use, model on
        ``device``."""
        return self._owl.get(device, self.dtype)

    def _pixel_values(self, images: Tensor, processor) -> Tensor:
        ip = processor.image_processor
        size = ip.size
        get = size.get if hasattr(size, "get") else (lambda k, d=None: getattr(size, k, d))
        h_out = get("height") or get("shortest_edge") or 960
        w_out = get("width") or h_out
        _, _, h, w = images.shape
        side = max(h, w)
        x = F.pad(images.float(), (0, side - w, 0, side - h), value=0.5)
        x = F.interpolate(
            x, size=(int(h_out), int(w_out)), mode="bilinear", antialias=True, align_corners=False
        )
        return normalize(x, ip.image_mean, ip.image_std)

    @torch.no_grad()
    def detect(self, images: Tensor, queries: Sequence[Sequence[str]]) -> list[list[Detection]]:
        """Detections of the queried labels per image (see module docstring)."""
        from torchvision.ops import batched_nms

        check_images(images, "OwlDetector")
        b = images.shape[0]
        if len(queries) != b:
            raise ValueError(f"OwlDetector: got {b} images but {len(queries)} query lists")
        queries = [[q] if isinstance(q, str) else list(q) for q in queries]
        results: list[list[Detection]] = [[] for _ in range(b)]
        q_max = max((len(q) for q in queries), default=0)
        if b == 0 or q_max == 0:
            return results
        device = images.device
        model, processor = self.owl(device)
        texts = [
            self.query_template.format(q[min(j, len(q) - 1)]) if q else ""
            for q in queries
            for j in range(q_max)
        ]
        max_len = model.config.text_config.max_position_embeddings
        tok = processor.tokenizer(
            texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
        )
        out = model(
            input_ids=tok["input_ids"].to(device),
            attention_mask=tok["attention_mask"].to(device),
            pixel_values=self._pixel_values(images, processor).to(self.dtype),
        )
        logits = out.logits.float()  # [B, P, Q]
        valid = torch.zeros(b, q_max, dtype=torch.bool, device=device)
        for i, q in enumerate(queries):
            valid[i, : len(q)] = True
        probs = torch.sigmoid(logits).masked_fill(~valid[:, None, :], -1.0)
        best, label_idx = probs.max(-1)  # [B, P]
        _, _, h, w = images.shape
        side = float(max(h, w))
        cxcywh = out.pred_boxes.float()  # [B, P, 4], relative to the padded square
        boxes = torch.stack(
            [
                (cxcywh[..., 0] - cxcywh[..., 2] / 2) * side / w,
                (cxcywh[..., 1] - cxcywh[..., 3] / 2) * side / h,
                (cxcywh[..., 0] + cxcywh[..., 2] / 2) * side / w,
                (cxcywh[..., 1] + cxcywh[..., 3] / 2) * side / h,
            ],
            dim=-1,
        ).clamp(0.0, 1.0)
        for i in range(b):
            keep = (best[i] >= self.box_threshold).nonzero().squeeze(-1)
            if keep.numel() == 0:
                continue
            kb, ks, kl = boxes[i, keep], best[i, keep], label_idx[i, keep]
            if self.nms_iou < 1.0:
                order = batched_nms(kb, ks, kl, self.nms_iou)
            else:
                order = ks.argsort(descending=True)
            order = order[: self.max_detections]
            for j in order.tolist():
                box = tuple(float(v) for v in kb[j].tolist())
                results[i].append(
                    Detection(
                        label=queries[i][int(kl[j])],
                        box=box,
                        score=float(ks[j]),
                        color=self.box_color(images[i], box),
                    )
                )
        return results

    def box_color(self, image: Tensor, box: tuple[float, float, float, float]) -> str:
        """Colour name of the central ``color_crop`` part of ``box`` in ``image`` ``[3, H, W]``."""
        _, h, w = image.shape
        x0, y0, x1, y1 = box
        m = (1.0 - self.color_crop) / 2
        cx0, cx1 = x0 + m * (x1 - x0), x1 - m * (x1 - x0)
        cy0, cy1 = y0 + m * (y1 - y0), y1 - m * (y1 - y0)
        c0, c1 = int(cx0 * w), max(int(cx0 * w) + 1, round(cx1 * w))
        r0, r1 = int(cy0 * h), max(int(cy0 * h) + 1, round(cy1 * h))
        patch = image[:, min(r0, h - 1) : min(r1, h), min(c0, w - 1) : min(c1, w)]
        return name_color(patch.float().mean(dim=(1, 2)), self.colors)
