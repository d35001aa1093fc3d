"""OwlDetector on a tiny random OWLv2 saved in the transformers format; colour naming."""

from __future__ import annotations

import pytest
import torch

from marble_lightning.rewards.composition import CompositionReward
from marble_lightning.rewards.detection import Detector
from marble_lightning.rewards.owl_detector import COLOR_PROTOTYPES, OwlDetector, name_color
from marble_lightning.testing import save_tiny_owlv2


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_owlv2(tmp_path_factory.mktemp("owl"))


def test_is_a_detector(owl_dir) -> None:
    assert isinstance(OwlDetector(str(owl_dir)), Detector)


def test_pixel_values_match_processor(owl_dir) -> None:
    from transformers import Owlv2Processor

    processor = Owlv2Processor.from_pretrained(owl_dir)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=g).float() / 255
    ref = processor.image_processor(images=[im for im in images * 255], return_tensors="pt")[
        "pixel_values"
    ]
    ours = OwlDetector(str(owl_dir))._pixel_values(images, processor)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_boxes_and_scores_match_reference_postprocessing(owl_dir) -> None:
    """Reference: model forward + the processor's post_process on the padded square,
    renormalised."""
    h, w = 32, 48
    g = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, h, w, generator=g)
    labels = ["cat", "dog"]
    det = OwlDetector(str(owl_dir), box_threshold=0.0, nms_iou=1.0, max_detections=1000)
    ours = det.detect(images, [labels])[0]

    model, processor = det.owl("cpu")
    texts = [det.query_template.format(label) for label in labels]
    tok = processor.tokenizer(
        texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(pixel_values=det._pixel_values(images, processor), **tok)
    ref = processor.post_process_grounded_object_detection(
        out, threshold=0.0, target_sizes=[(w, w)]
    )[0]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    ref_boxes = (ref["boxes"] / scale).clamp(0, 1)
    assert len(ours) == len(ref["scores"]) == out.logits.shape[1]
    ours_sorted = sorted(ours, key=lambda d: (d.box, d.label))
    ref_rows = sorted(
        zip(
            [tuple(b) for b in ref_boxes.tolist()],
            [labels[i] for i in ref["labels"].tolist()],
            ref["scores"].tolist(),
        ),
        key=lambda r: (r[0], r[1]),
    )
    for d, (box, label, score) in zip(ours_sorted, ref_rows):
        assert d.label == label
        assert d.box == pytest.approx(box, abs=1e-5)
        assert d.score == pytest.approx(score, abs=1e-6)
        assert d.color in COLOR_PROTOTYPES


def test_masking_thresholds_and_nms(owl_dir) -> None:
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    det = OwlDetector(str(owl_dir), box_threshold=0.0, nms_iou=1.0, max_detections=1000)
    out = det.detect(images, [["cat", "dog"], ["circle"], []])
    assert {d.label for d in out[1]} <= {"circle"}  # padded query columns never win
    assert out[2] == []
    from torchvision.ops import box_iou

    nms = OwlDetector(str(owl_dir), box_threshold=0.0, nms_iou=0.3, max_detections=3)
    for dets in nms.detect(images, [["cat"], ["dog"], ["cat"]]):
        assert 1 <= len(dets) <= 3
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        iou = box_iou(torch.tensor([d.box for d in dets]), torch.tensor([d.box for d in dets]))
        assert (iou.fill_diagonal_(0) <= 0.3 + 1e-6).all()
    none = OwlDetector(str(owl_dir), box_threshold=0.99)
    assert none.detect(images, [["cat"], ["dog"], ["cat"]]) == [[], [], []]
    with pytest.raises(ValueError, match="query lists"):
        det.detect(images, [["cat"]])


def test_box_colour_naming() -> None:
    img = torch.ones(3, 20, 20)
    img[:, 4:12, 2:10] = torch.tensor([0.85, 0.1, 0.1])[:, None, None]  # red square
    det = object.__new__(OwlDetector)
    det.color_crop, det.colors = 0.5, dict(COLOR_PROTOTYPES)
    # a loose box around the square: the central half is all red
    assert det.box_color(img, (0.05, 0.15, 0.55, 0.65)) == "red"
    assert name_color(torch.tensor([0.1, 0.2, 0.9]), COLOR_PROTOTYPES) == "blue"
    assert (
        name_color(torch.tensor([0.5, 0.5, 0.5]), {"grey": (128, 128, 128), "red": (255, 0, 0)})
        == "grey"
    )


def test_composition_with_owl_end_to_end(owl_dir) -> None:
    reward = CompositionReward(OwlDetector(str(owl_dir)), score_threshold=0.0)
    values = reward(torch.rand(2, 3, 32, 32), ["a photo of a red dog", 'a sign that says "x"'])
    assert torch.isfinite(values).all() and 0 <= values[0] <= 1 and values[1] == 0


def test_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="OwlDetector.*owl_missing"):
        OwlDetector(str(tmp_path / "owl_missing"))
    for kwargs, match in [
        ({"box_threshold": 2.0}, "box_threshold"),
        ({"nms_iou": 0.0}, "nms_iou"),
        ({"max_detections": 0}, "max_detections"),
        ({"query_template": "a photo"}, "query_template"),
        ({"color_crop": 0.0}, "color_crop"),
    ]:
        with pytest.raises(ValueError, match=match):
            OwlDetector("google/owlv2-base-patch16-ensemble", **kwargs)
    det = OwlDetector("google/owlv2-base-patch16-ensemble")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        det.detect(torch.rand(1, 3, 8, 8) * 255, [["cat"]])
