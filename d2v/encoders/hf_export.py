"""d2v encoder weights -> Hugging Face transformers Data2Vec*Model layout (config dict + renamed tensors).

transformers is not needed to convert; it is only needed to load the result."""
from __future__ import annotations

import torch


def unmappable(model_cfg: dict) -> str:
    """Why the encoder has no transformers Data2Vec*Model equivalent ('' when it maps one to one). transformers has
    no data2vec 2.0 classes: a v2 text encoder is RoBERTa's layout and maps; v2 images (post-LN blocks, sin-cos
    positions, a LayerNorm before the blocks) and v2 speech (ALiBi attention) have no equivalent."""
    if model_cfg.get("modality") == "vision" and model_cfg.get("arch", "beit") != "beit":
        return ("transformers has no class for data2vec 2.0's image encoder (post-LN blocks, fixed sin-cos "
                "positions; Data2VecVisionModel is the pre-LN v1 layout)")
    if model_cfg.get("modality") == "speech" and model_cfg.get("alibi", False):
        return "transformers' Data2VecAudioModel has no ALiBi attention, which this data2vec 2.0 speech encoder uses"
    return ""


def convert(model_cfg: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(config.json dict, tensors, extra JSON files) for the encoder's modality."""
    reason = unmappable(model_cfg)
    if reason:
        raise ValueError(f"no Hugging Face export: {reason}")
    modality = model_cfg["modality"]
    if modality == "vision":
        return _vision(model_cfg, state)
    if modality == "speech":
        return _speech(model_cfg, state)
    if modality == "text":
        return _text(model_cfg, state)
    raise ValueError(f"no Hugging Face export for modality {modality!r}")


def _vision(m: dict, state: dict[str, torch.Tensor]):
    dim = m["dim"]
    config = {
        "architectures": ["Data2VecVisionModel"],
        "model_type": "data2vec-vision",
        "hidden_size": dim,
        "num_hidden_layers": m["depth"],
        "num_attention_heads": m["num_heads"],
        "intermediate_size": int(dim * m["mlp_ratio"]),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": m["ln_eps"],
        "image_size": m["image_size"],
        "patch_size": m["patch_size"],
        "num_channels": m["in_chans"],
        "use_mask_token": True,
        "use_absolute_position_embeddings": False,
        "use_relative_position_bias": False,
        "use_shared_relative_position_bias": True,
        "layer_scale_init_value": m["layer_scale_init"],
        "drop_path_rate": 0.0,
        "use_mean_pooling": False,  # the final LayerNorm applies to every token, as in d2v
    }
    t = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": state["mask_token"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.bias"],
        "encoder.relative_position_bias.relative_position_bias_table": state["rel_pos_bias.table"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for i in range(m["depth"]):
        s, h = f"blocks.{i}.", f"encoder.layer.{i}."
        q, k, v = state[s + "attn.qkv.weight"].chunk(3, dim=0)
        t.update({
            h + "attention.attention.query.weight": q,
            h + "attention.attention.query.bias": state[s + "attn.q_bias"],
            h + "attention.attention.key.weight": k,
            h + "attention.attention.value.weight": v,
            h + "attention.attention.value.bias": state[s + "attn.v_bias"],
            h + "attention.output.dense.weight": state[s + "attn.proj.weight"],
            h + "attention.output.dense.bias": state[s + "attn.proj.bias"],
            h + "layernorm_before.weight": state[s + "norm1.weight"],
            h + "layernorm_before.bias": state[s + "norm1.bias"],
            h + "layernorm_after.weight": state[s + "norm2.weight"],
            h + "layernorm_after.bias": state[s + "norm2.bias"],
            h + "intermediate.dense.weight": state[s + "mlp.fc1.weight"],
            h + "intermediate.dense.bias": state[s + "mlp.fc1.bias"],
            h + "output.dense.weight": state[s + "mlp.fc2.weight"],
            h + "output.dense.bias": state[s + "mlp.fc2.bias"],
            h + "lambda_1": state[s + "gamma_1"],
            h + "lambda_2": state[s + "gamma_2"],
        })
    c = m["in_chans"]
    preprocessor = {
        "image_processor_type": "BeitImageProcessor",
        "do_resize": True,
        "size": {"height": m["image_size"], "width": m["image_size"]},
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": m["pixel_mean"] or [0.5] * c,
        "image_std": m["pixel_std"] or [0.5] * c,
        "do_reduce_labels": False,
    }
    return config, {k: v.contiguous() for k, v in t.items()}, {"preprocessor_config.json": preprocessor}


def _speech(m: dict, state: dict[str, torch.Tensor]):
    """Data2VecAudioModel. Its feature extractor (preprocessor_config.json, do_normalize) normalizes each waveform
    to zero mean and unit variance, which the d2v encoder does inside; the model itself takes normalized input."""
    dim = m["dim"]
    config = {
        "architectures": ["Data2VecAudioModel"],
        "model_type": "data2vec-audio",
        "hidden_size": dim,
        "num_hidden_layers": m["depth"],
        "num_attention_heads": m["num_heads"],
        "intermediate_size": m["ffn_dim"],
        "hidden_act": "gelu",
        "hidden_dropout": m["dropout"],
        "activation_dropout": m["activation_dropout"],
        "attention_dropout": m["attention_dropout"],
        "feat_proj_dropout": 0.0,
        "layerdrop": m["layerdrop"],
        "layer_norm_eps": m["ln_eps"],
        "feat_extract_norm": "layer",
        "feat_extract_activation": "gelu",
        "conv_dim": list(m["conv_dim"]),
        "conv_kernel": list(m["conv_kernel"]),
        "conv_stride": list(m["conv_stride"]),
        "conv_bias": False,
        "num_conv_pos_embeddings": m["pos_conv_depth"],  # transformers' name for the number of position conv layers
        "conv_pos_kernel_size": m["pos_conv_kernel"],
        "num_conv_pos_embedding_groups": m["pos_conv_groups"],
    }
    t = {
        "masked_spec_embed": state["mask_emb"],
        "feature_projection.layer_norm.weight": state["feature_projection.norm.weight"],
        "feature_projection.layer_norm.bias": state["feature_projection.norm.bias"],
        "feature_projection.projection.weight": state["feature_projection.proj.weight"],
        "feature_projection.projection.bias": state["feature_projection.proj.bias"],
        "encoder.layer_norm.weight": state["norm.weight"],
        "encoder.layer_norm.bias": state["norm.bias"],
    }
    for i in range(len(m["conv_dim"])):
        s, h = f"feature_extractor.layers.{i}.", f"feature_extractor.conv_layers.{i}."
        t[h + "conv.weight"] = state[s + "conv.weight"]
        t[h + "layer_norm.weight"] = state[s + "norm.weight"]
        t[h + "layer_norm.bias"] = state[s + "norm.bias"]
    for j in range(m["pos_conv_depth"]):
        t[f"encoder.pos_conv_embed.layers.{j}.conv.weight"] = state[f"pos_conv.layers.{j}.weight"]
        t[f"encoder.pos_conv_embed.layers.{j}.conv.bias"] = state[f"pos_conv.layers.{j}.bias"]
    for i in range(m["depth"]):
        s, h = f"blocks.{i}.", f"encoder.layers.{i}."
        for name, w in zip("qkv", state[s + "attn.qkv.weight"].chunk(3, dim=0)):
            t[h + f"attention.{name}_proj.weight"] = w
        for name, b in zip("qkv", state[s + "attn.qkv.bias"].chunk(3, dim=0)):
            t[h + f"attention.{name}_proj.bias"] = b
        for ours, theirs in (("attn.proj", "attention.out_proj"), ("norm1", "layer_norm"),
                             ("fc1", "feed_forward.intermediate_dense"), ("fc2", "feed_forward.output_dense"),
                             ("norm2", "final_layer_norm")):
            t[h + theirs + ".weight"] = state[s + ours + ".weight"]
            t[h + theirs + ".bias"] = state[s + ours + ".bias"]
    preprocessor = {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": m["sample_rate"],
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": True,
        "return_attention_mask": True,
    }
    return config, {k: v.contiguous() for k, v in t.items()}, {"preprocessor_config.json": preprocessor}


def _text(m: dict, state: dict[str, torch.Tensor]):
    """RoBERTa layout (Data2VecTextModel); the tokenizer.json beside it is copied by export."""
    dim, pad = m["dim"], m["pad_id"]
    config = {
        "architectures": ["Data2VecTextModel"],
        "model_type": "data2vec-text",
        "vocab_size": m["vocab_size"],
        "hidden_size": dim,
        "num_hidden_layers": m["depth"],
        "num_attention_heads": m["num_heads"],
        "intermediate_size": m["ffn_dim"],
        "hidden_act": "gelu",
        "hidden_dropout_prob": m["dropout"],
        "attention_probs_dropout_prob": m["attention_dropout"],
        "max_position_embeddings": m["max_length"] + pad + 1,
        "type_vocab_size": 1,
        "layer_norm_eps": m["ln_eps"],
        "pad_token_id": pad,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "position_embedding_type": "absolute",
    }
    e = "embeddings."
    t = {
        e + "word_embeddings.weight": state["embeddings.tokens.weight"],
        e + "position_embeddings.weight": state["embeddings.positions.weight"],
        e + "token_type_embeddings.weight": torch.zeros(1, dim),  # d2v has no token types: a zero row adds nothing
        e + "LayerNorm.weight": state["embeddings.norm.weight"],
        e + "LayerNorm.bias": state["embeddings.norm.bias"],
    }
    for i in range(m["depth"]):
        s, h = f"blocks.{i}.", f"encoder.layer.{i}."
        qkv_w, qkv_b = state[s + "attn.qkv.weight"].chunk(3, dim=0), state[s + "attn.qkv.bias"].chunk(3, dim=0)
        for j, name in enumerate(("query", "key", "value")):
            t[h + f"attention.self.{name}.weight"] = qkv_w[j]
            t[h + f"attention.self.{name}.bias"] = qkv_b[j]
        t.update({
            h + "attention.output.dense.weight": state[s + "attn.proj.weight"],
            h + "attention.output.dense.bias": state[s + "attn.proj.bias"],
            h + "attention.output.LayerNorm.weight": state[s + "norm1.weight"],
            h + "attention.output.LayerNorm.bias": state[s + "norm1.bias"],
            h + "intermediate.dense.weight": state[s + "fc1.weight"],
            h + "intermediate.dense.bias": state[s + "fc1.bias"],
            h + "output.dense.weight": state[s + "fc2.weight"],
            h + "output.dense.bias": state[s + "fc2.bias"],
            h + "output.LayerNorm.weight": state[s + "norm2.weight"],
            h + "output.LayerNorm.bias": state[s + "norm2.bias"],
        })
    specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": m["max_length"],
                        "padding_side": "right", **specials}
    return config, {k: v.contiguous() for k, v in t.items()}, {"tokenizer_config.json": tokenizer_config,
                                                             "special_tokens_map.json": specials}


# ---------------------------------------------------------------------------------------------- classifiers
CLASSIFIERS = {"vision": ("Data2VecVisionForImageClassification", "data2vec_vision."),
               "speech": ("Data2VecAudioForSequenceClassification", "data2vec_audio."),
               "text": ("Data2VecTextForSequenceClassification", "data2vec_text.")}


def classifier_unmappable(model_cfg: dict, head: str) -> str:
    """Why a fine-tuned classifier has no transformers equivalent with the same logits ('' when it has one)."""
    reason = unmappable(model_cfg)
    if reason:
        return reason
    if head != "data2vec" and model_cfg["modality"] != "speech":
        return ("its head pools with encoder.embed (fine-tuned with --head mean), which transformers' "
                f"{CLASSIFIERS[model_cfg['modality']][0]} does not compute; fine-tune with --head data2vec")
    return ""


def _fold(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
    """Linear(W, b) applied to (x - mean) / std, as one Linear on x: (W / std, b - W (mean / std)), computed in
    float64."""
    w, m, s = weight.double(), mean.double(), std.double()
    return (w / s).float().contiguous(), (bias.double() - w @ (m / s)).float()


def convert_classifier(model_cfg: dict, state: dict[str, torch.Tensor], info: dict,
                       head: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(config.json dict, tensors, extra JSON files) of the transformers Data2Vec...For...Classification model that
    computes the same logits as d2v's Classifier (d2v.encoders.classifier) with encoder `state` and `head` tensors.
    The standardization before the head's first Linear is folded into that Linear."""
    reason = classifier_unmappable(model_cfg, info["head"])
    if reason:
        raise ValueError(f"no Hugging Face classifier: {reason}")
    modality = model_cfg["modality"]
    config, base, extra = convert(model_cfg, state)
    architecture, prefix = CLASSIFIERS[modality]
    labels = [str(x) for x in info["labels"]]
    config.update(architectures=[architecture], id2label={str(i): n for i, n in enumerate(labels)},
                  label2id={n: i for i, n in enumerate(labels)})
    mean, std = head["feature_mean"], head["feature_std"]
    if modality == "vision":  # mean of the patches -> pooler LayerNorm (d2v's fc_norm) -> classifier
        config["use_mean_pooling"] = True  # also makes the final per-token LayerNorm an identity, as d2v's head
        base = {k: v for k, v in base.items() if not k.startswith("layernorm.")}
        base.update({"pooler.layernorm.weight": head["fc_norm.weight"], "pooler.layernorm.bias": head["fc_norm.bias"]})
        weight, bias = _fold(head["head.weight"], head["head.bias"], mean, std)
        tensors = {**{prefix + k: v for k, v in base.items()}, "classifier.weight": weight, "classifier.bias": bias}
    elif modality == "speech":  # projector (the standardization, per frame) -> mean over frames -> classifier
        dim = mean.numel()
        config.update(classifier_proj_size=dim, use_weighted_layer_sum=False)
        tensors = {**{prefix + k: v for k, v in base.items()},
                   "projector.weight": torch.diag(1.0 / std.double()).float(),
                   "projector.bias": (-mean.double() / std.double()).float(),
                   "classifier.weight": head["head.weight"], "classifier.bias": head["head.bias"]}
    else:  # <s> -> dense (with the standardization folded in) -> tanh -> out_proj
        weight, bias = _fold(head["dense.weight"], head["dense.bias"], mean, std)
        config.update(classifier_dropout=None)
        tensors = {**{prefix + k: v for k, v in base.items()}, "classifier.dense.weight": weight,
                   "classifier.dense.bias": bias, "classifier.out_proj.weight": head["head.weight"],
                   "classifier.out_proj.bias": head["head.bias"]}
    return config, {k: v.contiguous() for k, v in tensors.items()}, extra
