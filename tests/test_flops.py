"""The analytic FLOP count of an update (d2v.runtime.flops) against torch.utils.flop_counter on one forward and
backward of the objective, for every preset of every modality and recipe; and the peak-rate table behind MFU.

The tiny presets run on the CPU; the others run on the meta device (shapes only, no arithmetic, so ViT-L and 20 s
speech crops take seconds). Attention is forced onto SDPA's math path so that torch's counter sees its products (it
has no formula for the CPU flash kernel), and its grouped-convolution backward formula is corrected: torch 2.13
counts a grouped conv's weight gradient as if the conv were dense (`groups` times too many; pytorch/pytorch#183405
divides it by groups)."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from d2v.core.presets import preset_config
from d2v.data.synthetic import fill_model_fields, synthetic_batch
from d2v.objective import build_objective
from d2v.runtime.flops import device_peak, flops_per_sample, flops_per_update, mfu, peak_tflops

BATCH = 2


def _conv_backward(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                   _output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """torch's convolution_backward formula (non-transposed convs) with the weight gradient divided by `groups`."""
    assert not transposed
    t = lambda shape: [shape[1], shape[0], *shape[2:]]  # noqa: E731
    flops = conv_flop_count(grad_out_shape, w_shape, x_shape, transposed=True) if output_mask[0] else 0
    if output_mask[1]:
        flops += conv_flop_count(t(x_shape), t(grad_out_shape), t(w_shape)) // groups
    return flops


def counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward})


def build(modality: str, preset: str, recipe: str):
    cfg = preset_config(modality, preset, recipe)
    cfg.run.kernels = "torch"  # plain torch ops: every backend computes the same products
    if modality == "speech":
        cfg.model.layerdrop = 0.0  # a random number of student blocks; its expected share is tested below
    fill_model_fields(cfg)
    device = torch.device("cpu" if preset == "tiny" else "meta")
    with device:
        model = build_objective(cfg)
    return cfg, model.train(), synthetic_batch(cfg, 0, BATCH).to(device)


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "large"])
@pytest.mark.parametrize("recipe", ["v1", "v2"])
@pytest.mark.parametrize("modality", ["vision", "speech", "text"])
def test_flop_count_agrees_with_torch_counter(modality, recipe, preset):
    cfg, model, batch = build(modality, preset, recipe)
    want = {k: v * BATCH for k, v in flops_per_sample(cfg).items()}
    with sdpa_kernel(SDPBackend.MATH), counter() as fc:
        loss, _ = model(batch)
        loss.backward()
    total = fc.get_total_flops()
    assert want["total"] == pytest.approx(total, rel=0.05)
    decoder = sum(fc.get_flop_counts().get("Data2Vec.decoder", {}).values())
    assert want["decoder_forward"] + want["decoder_backward"] == pytest.approx(decoder, rel=0.05, abs=1)
    # the teacher alone, as the objective calls it (speech: on the student's front-end features where it shares them)
    reuse = {}
    if model.reuse_features:
        with torch.no_grad():
            reuse["features"] = model.student.encode(batch.inputs).features
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter() as fc:
        model.teacher.encode(batch.inputs, output_layers=cfg.targets.layer, top_k=cfg.targets.top_k, **reuse)
    assert want["teacher_forward"] == pytest.approx(fc.get_total_flops(), rel=0.05)
    per_update = flops_per_update(cfg)
    assert per_update["total"] == pytest.approx(want["total"] / BATCH * cfg.run.batch_size)


def test_v2_counts_kept_tokens_per_clone_and_layerdrop_its_expected_share():
    cfg = preset_config("vision", "base", "v2")
    full = flops_per_sample(cfg)
    cfg.mask.clones *= 2
    doubled = flops_per_sample(cfg)
    assert doubled["decoder_forward"] == pytest.approx(2 * full["decoder_forward"])
    assert doubled["teacher_forward"] == full["teacher_forward"]  # one teacher pass per sample, however many clones
    speech = preset_config("speech", "base")
    with_drop = flops_per_sample(speech)
    speech.model.layerdrop = 0.0
    assert with_drop["student_forward"] < flops_per_sample(speech)["student_forward"]
    assert with_drop["teacher_forward"] == flops_per_sample(speech)["teacher_forward"]


def test_vision_count_needs_the_data_fields():
    cfg = preset_config("vision", "tiny")  # image size and channels come from the data
    with pytest.raises(ValueError, match="model.image_size"):
        flops_per_update(cfg)


@pytest.mark.parametrize("name,bf16,fp32", [("NVIDIA H100 80GB HBM3", 989.4, 66.9), ("NVIDIA H100 PCIe", 756.5, 51.2),
                                            ("NVIDIA H100 NVL", 835.5, 60.0), ("NVIDIA H200", 989.4, 66.9),
                                            ("NVIDIA A100-SXM4-80GB", 312.0, 19.5), ("NVIDIA A10", 125.0, 31.2),
                                            ("NVIDIA L4", 121.0, 30.3), ("NVIDIA L40S", 362.05, 91.6)])
def test_peak_table_matches_device_names(name, bf16, fp32):
    assert peak_tflops(name, "bf16") == bf16
    assert peak_tflops(name, "fp32") == fp32
    assert device_peak(name).source
    assert mfu(bf16 * 0.5e12, name, "bf16") == pytest.approx(0.5)


def test_unknown_device_has_no_mfu():
    assert device_peak("cpu") is None
    assert mfu(1e12, "cpu", "fp32") is None
    assert peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 tensor cores
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "fp32", tf32=True) == 156.0
