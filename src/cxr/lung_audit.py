"""The shortcut audit of a trained model: every test image scored intact, with the lungs
hidden and with only the lungs visible (cxr.lungs), and the share of each image's Grad-CAM
heat that falls inside its lungs. A model that reads the disease loses its accuracy without
the lungs and keeps it with them alone."""

from __future__ import annotations

from typing import Any

import numpy as np

from cxr.lungs import audit_inputs, heat_inside
from cxr.metrics import intervals, macro_f1


def grad_cam(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps in [0, 1] at the images' size, probabilities) for the predicted class.

    The feature map is the last 4-D output of the model's top-level graph: the base's output
    for the transfer models, the last conv block for the CNNs. The model is cut there into
    a body (images to feature maps) and a head (feature maps to probabilities), and the
    predicted class's log-probability is differentiated with respect to the feature maps
    by the backend (cxr.backend.value_and_grad); the rest is keras.ops."""
    import keras
    from keras import ops

    from cxr.backend import value_and_grad

    target = [layer for layer in model.layers if len(layer.output.shape) == 4][-1]
    # The tensor of the layer's call in this graph: for a nested base model, `.output` is
    # the base's own output, which is not connected to this model's inputs. Keras 3 has no
    # public way to it (no get_output_at): the private `_inbound_nodes`, pinned by
    # tests/test_private_apis.py, which fails when `.output` becomes usable here.
    features = target._inbound_nodes[-1].output_tensors[0]
    body = keras.Model(model.inputs, features)
    head = keras.Model(features, model.output)
    maps = ops.cast(body(ops.convert_to_tensor(images, "float32"), training=False), "float32")

    def score(maps):
        probs = ops.cast(head(maps, training=False), "float32")
        chosen = ops.argmax(probs, axis=1)
        # log-probability: its gradient does not vanish when the softmax saturates. Each
        # image's score depends on its own maps only: the sum's gradient is each one's.
        picked = ops.take_along_axis(probs, chosen[:, None], axis=1)
        return ops.sum(ops.log(picked + 1e-7)), probs

    (_, probs), grads = value_and_grad(score, maps)
    weights = ops.mean(grads, axis=(1, 2), keepdims=True)
    cam = ops.relu(ops.sum(weights * maps, axis=-1))
    cam = cam / (ops.max(cam, axis=(1, 2), keepdims=True) + 1e-7)
    # With the lung focus the feature maps cover only the crop (cxr.models): the heatmap goes
    # back into the crop's place in the image, zero where the network saw nothing.
    (top, bottom), (left, right) = _lung_crop(model)
    height, width = images.shape[1:3]
    inner = (height - top - bottom, width - left - right)
    cam = ops.image.resize(cam[..., None], inner, interpolation="bilinear")[..., 0]
    cam = ops.pad(cam, ((0, 0), (top, bottom), (left, right)))
    return ops.convert_to_numpy(cam), ops.convert_to_numpy(probs)


def _lung_crop(model) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) pixels the model's lung focus crops off; zeros without."""
    crops = [layer for layer in model.layers if layer.name == "lung_crop"]
    return tuple(map(tuple, crops[0].cropping)) if crops else ((0, 0), (0, 0))


def audit_scores(
    y: np.ndarray,
    probs: dict[str, np.ndarray],
    classes: list[str],
    cfg: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Accuracy and macro-F1 of each audit view's probabilities (`lungs_hidden`,
    `lungs_only`): test.json's `<view>_accuracy`, `<view>_macro_f1`, and their intervals
    when `cfg` (evaluate's bootstrap settings) is given."""
    figures = {}
    for view, p in probs.items():
        pred = p.argmax(axis=1)
        figures[f"{view}_accuracy"] = float(np.mean(pred == y))
        figures[f"{view}_macro_f1"] = macro_f1(y, pred, len(classes))
        if cfg is not None:
            ci = intervals(y, pred, len(classes), cfg["bootstrap"], cfg["ci_level"], cfg["seed"])
            for key in ("accuracy", "macro_f1"):
                figures[f"{view}_{key}_ci_low"], figures[f"{view}_{key}_ci_high"] = ci[key]
    return figures


def lung_audit(
    model,
    x: np.ndarray,
    y: np.ndarray,
    masks: np.ndarray,
    classes: list[str],
    cfg: dict[str, Any],
) -> tuple[dict[str, float], dict[str, np.ndarray], np.ndarray]:
    """(audit figures, the audit's predicted probabilities per view, every image's Grad-CAM
    heatmap) of the test images `x` with lung masks `masks`: accuracy and macro-F1 with the
    lungs hidden and with only the lungs visible, with intervals as for the intact images;
    the mean share of Grad-CAM heat inside the lungs, overall and per actual class, beside
    the lungs' share of the image (what heat spread evenly would give)."""
    views = audit_inputs(x, masks)
    probs = {
        view: model.predict(views[view], batch_size=cfg["batch_size"], verbose=0).astype(np.float64)
        for view in ("lungs_hidden", "lungs_only")
    }
    figures = audit_scores(y, probs, classes, cfg)
    step = cfg["batch_size"]
    cams = np.concatenate([grad_cam(model, x[i : i + step])[0] for i in range(0, len(x), step)])
    inside = heat_inside(cams, masks)
    for key, members in [("", y >= 0)] + [(f"_{c}", y == k) for k, c in enumerate(classes)]:
        values = inside[members & np.isfinite(inside)]
        if len(values):  # left out, as a class's ROC-AUC is, when there is nothing to average
            figures[f"gradcam_lung_share{key}"] = float(values.mean())
    figures["lung_area_share"] = float(masks.mean())
    # The lung focus (1.0: in the graph) and the template as the audit's lungs see the
    # same region: the audit then measures little (cxr.metrics.lung_verdict says so).
    figures["lung_focus"] = float(_lung_crop(model) != ((0, 0), (0, 0)))
    return figures, probs, cams
