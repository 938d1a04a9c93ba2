"""The vision encoder: shapes, target sub-layers, masking semantics, and Hugging Face equivalence."""
import pytest
import torch

from d2v.core.config import VisionModelConfig
from d2v.models.vision import VisionEncoder, auto_patch_size


def small_cfg(**kw):
    base = dict(image_size=8, patch_size=2, in_chans=1, dim=24, depth=3, num_heads=2, drop_path=0.0)
    base.update(kw)
    return VisionModelConfig(**base)


@pytest.mark.parametrize("size,patch,chans", [(8, 2, 1), (28, 4, 1), (28, 7, 1), (32, 4, 3), (8, 8, 3)])
def test_shapes(size, patch, chans):
    enc = VisionEncoder(small_cfg(image_size=size, patch_size=patch, in_chans=chans)).eval()
    x = torch.rand(3, chans, size, size)
    n = (size // patch) ** 2
    assert enc(x).shape == (3, 1 + n, 24)
    assert enc.embed(x).shape == (3, 24)
    out = enc.encode(x, output_layers="ffn", top_k=2)
    assert len(out.layers) == 2 and all(layer.shape == (3, 1 + n, 24) for layer in out.layers)


def test_auto_patch_size():
    assert auto_patch_size(8) == 2 and auto_patch_size(28) == 4 and auto_patch_size(224) == 28
    assert auto_patch_size(7) == 7  # prime sizes: one patch


def test_block_layers_are_residual_stream_and_ffn_differs():
    enc = VisionEncoder(small_cfg()).eval()
    x = torch.rand(2, 1, 8, 8)
    blocks = enc.encode(x, output_layers="block", top_k=3).layers
    ffn = enc.encode(x, output_layers="ffn", top_k=3).layers
    torch.testing.assert_close(enc.norm(blocks[-1]), enc(x))
    assert not torch.allclose(blocks[-1], ffn[-1])


def test_student_cannot_see_masked_patches():
    enc = VisionEncoder(small_cfg()).eval()
    x = torch.rand(2, 1, 8, 8)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True  # patches 0..4 = grid cells (0,0),(0,1),(0,2),(0,3),(1,0)
    y = x.clone()
    y[:, :, 0:2, :] = torch.rand(2, 1, 2, 8)  # change only pixels of masked patches (first patch row)
    y[:, :, 2:4, 0:2] = torch.rand(2, 1, 2, 2)
    torch.testing.assert_close(enc.encode(x, mask=mask).hidden, enc.encode(y, mask=mask).hidden)
    assert not torch.allclose(enc.encode(x).hidden, enc.encode(y).hidden)


def test_layout_matches_spec():
    enc = VisionEncoder(small_cfg())
    names = dict(enc.named_parameters())
    assert sum(1 for n in names if "rel_pos_bias" in n) == 1  # one shared table, no per-block bias
    assert not any("pos_embed" in n for n in names)  # no absolute positions
    assert "blocks.0.attn.q_bias" in names and "blocks.0.attn.v_bias" in names
    assert not any(n.endswith("k_bias") for n in names) and enc.blocks[0].attn.qkv.bias is None
    assert torch.all(names["blocks.0.gamma_1"] == 1e-4)  # the released recipe (base)


def test_rejects_wrong_image_shape():
    enc = VisionEncoder(small_cfg())
    with pytest.raises(ValueError, match="expected images"):
        enc(torch.rand(2, 3, 8, 8))


def test_matches_huggingface_data2vec_vision():
    transformers = pytest.importorskip("transformers")
    from d2v.encoders.hf_export import convert

    cfg = small_cfg(image_size=12, patch_size=3, in_chans=3, pixel_mean=[0.4, 0.5, 0.6], pixel_std=[0.2, 0.3, 0.25])
    enc = VisionEncoder(cfg).eval()
    with torch.no_grad():  # make every parameter matter
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    config, tensors, _ = convert(cfg.__dict__, enc.state_dict())
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    hf = transformers.Data2VecVisionModel(transformers.Data2VecVisionConfig(**config), add_pooling_layer=False).eval()
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert not unexpected and not [m for m in missing if "relative_position_index" not in m]
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        want = hf(pixel_values=(x - enc.pixel_mean) / enc.pixel_std).last_hidden_state
        torch.testing.assert_close(enc(x), want, atol=1e-5, rtol=1e-4)
