"""Reading transformers Data2Vec*Model directories into d2v encoders (the inverse of the export): a model made
and saved by transformers itself, loaded by d2v, gives transformers' hidden states."""
import json

import pytest
import torch

from d2v.core.errors import CheckpointError

transformers = pytest.importorskip("transformers")


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_vision_model_from_transformers(tmp_path):
    from d2v.encoders.load import load_encoder

    cfg = transformers.Data2VecVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, image_size=8, patch_size=2,
        num_channels=1, use_mask_token=True, use_absolute_position_embeddings=False, use_relative_position_bias=False,
        use_shared_relative_position_bias=True, layer_scale_init_value=0.1, use_mean_pooling=False,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = transformers.Data2VecVisionModel(cfg).eval()
    with torch.no_grad():  # non-trivial values everywhere, including the shared bias table
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    enc = load_encoder(_save(hf, tmp_path / "hf"))
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        want = hf(pixel_values=(x - 0.5) / 0.5).last_hidden_state
    torch.testing.assert_close(enc(x), want, atol=1e-5, rtol=1e-4)


def test_text_model_from_transformers_folds_token_types(tmp_path):
    from d2v.encoders.load import load_encoder

    cfg = transformers.Data2VecTextConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=34, type_vocab_size=1,
                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = transformers.Data2VecTextModel(cfg, add_pooling_layer=False).eval()
    assert hf.embeddings.token_type_embeddings.weight.abs().sum() > 0  # folded into the positions on import
    enc = load_encoder(_save(hf, tmp_path / "hf"))
    assert enc.cfg.max_length == 32
    ids = torch.randint(5, 300, (2, 12))
    ids[1, 9:] = 1  # padding
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=ids.ne(1).long()).last_hidden_state
        hidden, attention = enc(ids)
    real = attention.bool()
    torch.testing.assert_close(hidden[real], want[real], atol=1e-5, rtol=1e-4)


def test_speech_model_from_transformers(tmp_path):
    from d2v.encoders.load import load_encoder

    cfg = transformers.Data2VecAudioConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=[16, 16], conv_kernel=[10, 3], conv_stride=[5, 2], num_conv_pos_embeddings=2,
        conv_pos_kernel_size=5, num_conv_pos_embedding_groups=2, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.Data2VecAudioModel(cfg).eval()
    enc = load_encoder(_save(hf, tmp_path / "hf"))
    wave = torch.randn(2, 1600)
    wave = (wave - wave.mean(1, keepdim=True)) / wave.std(1, keepdim=True, unbiased=False)
    with torch.no_grad():
        want = hf(wave).last_hidden_state
        got = enc(wave)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_layouts_d2v_does_not_have_are_refused(tmp_path):
    from d2v.encoders.load import load_encoder

    cfg = transformers.Data2VecVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64, image_size=8, patch_size=2, num_channels=1,
                                            use_relative_position_bias=True, use_shared_relative_position_bias=False)
    path = _save(transformers.Data2VecVisionModel(cfg), tmp_path / "hf")
    with pytest.raises(CheckpointError, match="shared relative position bias"):
        load_encoder(path)
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "config.json").write_text(json.dumps({"model_type": "data2vec-text"}))
    with pytest.raises(CheckpointError):
        load_encoder(tmp_path / "pt")
