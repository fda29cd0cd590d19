"""The official COCO box metrics through pycocotools' COCOeval, over predictions of every rank."""

from __future__ import annotations

import contextlib
import copy
import io

from torchvision.ops import box_convert

from acon.distributed import all_gather_object

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""COCOeval's first six numbers (IoU .50:.95, .50, .75; small, medium, large), in percent."""


def coco_ground_truth(data: dict):
    """A pycocotools ``COCO`` built from a parsed instances dict (quietly)."""
    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = copy.deepcopy(data)
    for ann in gt.dataset["annotations"]:  # COCOeval needs an area; COCO files have one, others may not
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def to_coco_results(outputs: list[dict], image_ids: list[int], label_to_category: dict[int, int]) -> list:
    """torchvision detector outputs (xyxy boxes, contiguous labels) as COCO result dicts (xywh, ids).

    Label 0 is the background: RetinaNet has a score for it too (its head has no separate background),
    never trained as a positive; such detections are dropped."""
    results = []
    for out, image_id in zip(outputs, image_ids, strict=True):
        xywh = box_convert(out["boxes"].detach().float().cpu(), "xyxy", "xywh").tolist()
        for box, score, label in zip(xywh, out["scores"].tolist(), out["labels"].tolist(), strict=True):
            if int(label) == 0:
                continue
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": label_to_category[int(label)],
                    "bbox": [round(v, 3) for v in box],
                    "score": round(float(score), 5),
                }
            )
    return results


def coco_box_metrics(gt, results: list[dict], image_ids: list[int] | None = None) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl in percent for ``results`` against ``gt`` (a pycocotools COCO).

    ``image_ids`` restricts the evaluation (default: every image of ``gt``). With no detection at all
    every AP is 0. An area range without ground truth gives -1, as pycocotools reports it.
    """
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys(METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iouType="bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (float(v) * 100 if v >= 0 else -1.0) for k, v in zip(METRICS, ev.stats[:6], strict=True)}


def gathered_box_metrics(gt, local_results: list[dict], local_image_ids: list[int]) -> dict[str, float]:
    """COCO metrics over the results and image ids of every rank (the same numbers on each rank)."""
    results = [r for part in all_gather_object(local_results) for r in part]
    image_ids = sorted({i for part in all_gather_object(local_image_ids) for i in part})
    results.sort(key=lambda r: (r["image_id"], -r["score"], r["category_id"], r["bbox"]))
    return coco_box_metrics(gt, results, image_ids)
