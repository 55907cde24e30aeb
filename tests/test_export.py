"""Export: a model traced at one input size gives eager's detections at other sizes."""

import io

import pytest
import torch
from detectron2.modeling import build_model
from model_utils import load_cfg, load_script

from ion_d2.export import get_tracing_adapter, trace_ion_model
from ion_d2.modeling.context.irnn_scan import IRNN_DIRECTIONS, _scripted_step_scans, _StepScans
from ion_d2.modeling.padding import valid_cell_mask

TINY = "configs/ION_VGG16_tiny_cpu.yaml"


def _image(height: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(height * 1000 + width)
    return torch.randint(0, 256, (3, height, width), generator=g).float()


def _tiny_model(**overrides):
    # Random weights; score threshold 0 so that every image has detections to compare.
    cfg = load_cfg(TINY, {"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0, **overrides})
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the paper's model: learned IRNN, ROIPool (the CPU sparse-table path in eager)
        {
            "MODEL.ION.CONTEXT.IRNN.RECURRENT": "removed",
            "MODEL.ION.CONTEXT.IRNN.FIRST_STEP_BIAS": True,
        },
        # The local-context branch on the image (issue 26): the image tensor and the valid-cell
        # masks are traced values.
        {"MODEL.ION.LOCAL_CONTEXT.IN_FEATURE": "image"},
    ],
    ids=["irnn_learned", "irnn_identity_first_step_bias", "local_context"],
)
def test_traced_model_matches_eager_at_other_sizes(overrides):
    model = _tiny_model(**overrides)
    branch = getattr(model.roi_heads, "local_context", None)
    if branch is not None:  # zero-initialised: give it scores that move the detections
        torch.nn.init.normal_(branch.cls_score.weight, std=0.5)
    traced, adapter = trace_ion_model(model, _image(96, 128))
    # Saved and loaded: no Python calls left in the graph (torch.jit.save refuses them).
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    # Other sizes, neither a multiple of conv5's stride 16 nor of the traced size.
    for height, width in [(112, 80), (100, 150)]:
        image = _image(height, width)
        with torch.no_grad():
            eager = model.inference([{"image": image}], do_postprocess=False)[0]
            got = adapter.outputs_schema(loaded(image))[0]["instances"]
        assert len(eager) > 0
        assert tuple(int(v) for v in got.image_size) == eager.image_size == (height, width)
        assert len(got) == len(eager)
        assert torch.equal(got.pred_classes, eager.pred_classes)
        torch.testing.assert_close(
            got.pred_boxes.tensor, eager.pred_boxes.tensor, atol=1e-3, rtol=0
        )
        torch.testing.assert_close(got.scores, eager.scores, atol=1e-4, rtol=0)


def test_box_voting_is_refused_by_the_export():
    model = _tiny_model(**{"MODEL.ION.BOX_VOTING.ENABLED": True})
    with pytest.raises(ValueError, match="BOX_VOTING.ENABLED is True"):
        trace_ion_model(model, _image(96, 128))


def test_tracing_adapter_is_detectron2s():
    adapter = get_tracing_adapter()
    assert adapter.__name__ == "TracingAdapter"
    assert adapter.__module__ == "detectron2.export.flatten"


@pytest.mark.parametrize("learned", [True, False])
def test_scripted_scan_equals_step_scans(learned):
    # The loop a trace runs (scripted, over the map's actual size) against eager's _StepScans,
    # with padding (valid cells) and two images.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 1, 3, generator=g)
    whh = torch.randn(4, 3, 3, generator=g) * 0.5 if learned else None
    valid = torch.tensor([[5, 7], [3, 4]])
    outside = ~valid_cell_mask(valid, 5, 7)[:, 0, :, :, None, None]
    x = x.masked_fill(outside, 0.0)
    expected = _StepScans.apply(x, whh, IRNN_DIRECTIONS, outside)
    got = _scripted_step_scans()(x, whh, [0, 1, 2, 3], outside)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_export_tool_writes_a_module_that_runs_at_another_size(tmp_path):
    tool = load_script("tools/export_model.py")
    out = tmp_path / "model.ts"
    argv = ["--config-file", TINY, "--weights", "", "--output", str(out), "--size", "96", "128"]
    assert tool.main(argv + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]) == 0
    boxes, classes, scores, image_size = torch.jit.load(str(out))(_image(80, 112))
    assert image_size.tolist() == [80, 112]
    assert len(boxes) == len(classes) == len(scores) > 0 and classes.dtype == torch.long
    assert float(boxes[:, 2].max()) <= 112 and float(boxes[:, 3].max()) <= 80
