"""--init-from: a new run that starts from an encoder (a d2v export or run, or a transformers model) keeps that
encoder's layout and loads its weights into the student and the teacher."""
from __future__ import annotations

from pathlib import Path

from d2v.core.config import PretrainConfig
from d2v.core.errors import CheckpointError, ConfigError
from d2v.encoders.load import TOKENIZER, read_encoder, run_file
from d2v.objective import Data2Vec

TRAINING_ONLY = ("drop_path", "dropout", "attention_dropout", "activation_dropout", "layerdrop")


def adopt_layout(cfg: PretrainConfig) -> None:
    """--init-from: the model's layout (sizes, vocabulary, pixel statistics) comes from the source encoder; the
    run's preset keeps the training-only fields (drop-path, dropouts)."""
    source_cfg, _ = read_encoder(cfg.run.init_from, weights=False)
    if source_cfg.get("modality") != cfg.modality:
        raise ConfigError(f"--init-from {cfg.run.init_from} is a {source_cfg.get('modality')} encoder but this run "
                          f"pretrains {cfg.modality}")
    for name, value in source_cfg.items():
        if hasattr(cfg.model, name) and name not in TRAINING_ONLY:
            setattr(cfg.model, name, type(getattr(cfg.model, name))(value) if isinstance(value, list) else value)
    if cfg.modality == "vision":
        cfg.data.image_size = cfg.model.image_size  # the data is resized to what the encoder was trained on
    if cfg.modality == "text":
        tokenizer = run_file(Path(cfg.run.init_from).expanduser(), TOKENIZER)
        if tokenizer is None or not hasattr(cfg.data, "tokenizer"):
            raise ConfigError(f"--init-from {cfg.run.init_from} has no tokenizer.json beside the weights; a text "
                              "encoder continues only with its own tokenizer")
        cfg.data.tokenizer = str(tokenizer.resolve())


def source_recipe(path: str, modality: str, default: str) -> str:
    """The recipe of a run that starts from the encoder at `path` when --recipe is not given. A vision encoder's
    architecture decides it (data2vec 2.0 cannot train the BEiT-style v1 layout, nor 1.0 the v2 one; a transformers
    Data2VecVisionModel is the v1 layout); speech and text encoders train under either recipe, so `default` (the
    modality's) stays, as it does when the source cannot be read (adopt_layout reports that)."""
    if modality != "vision":
        return default
    try:
        source_cfg, _ = read_encoder(path, weights=False)
    except CheckpointError:
        return default
    if source_cfg.get("modality", modality) != modality:
        return default
    return "v2" if source_cfg.get("arch", "beit") == "v2" else "v1"


def layout_conflicts(cfg: PretrainConfig, given: set[str]) -> list[tuple[str, object, object]]:
    """The options among `given` (dotted keys the user set) that --init-from's encoder would override: (key, the
    user's value, the encoder's). --init-from keeps the source's layout, so each would be dropped silently."""
    try:
        source_cfg, _ = read_encoder(cfg.run.init_from, weights=False)
    except CheckpointError:
        return []  # the config's validation names --init-from and what is wrong with it
    if source_cfg.get("modality") != cfg.modality:
        return []  # adopt_layout says so
    out = []
    for key in sorted(given):
        section, _, name = key.partition(".")
        if section == "model" and name in source_cfg and name not in TRAINING_ONLY:
            mine, theirs = getattr(cfg.model, name, None), source_cfg[name]
            if key == "model.image_size" and mine == 0:
                continue  # "follow the data": the CLI's own companion of --image-size
            if (list(mine) if isinstance(mine, (list, tuple)) else mine) != theirs:
                out.append((key, mine, theirs))
    if cfg.modality == "vision" and "data.image_size" in given and cfg.data.image_size not in (
            0, source_cfg.get("image_size")):
        out.append(("data.image_size", cfg.data.image_size, source_cfg.get("image_size")))
    if cfg.modality == "text":
        if "data.vocab_size" in given and cfg.data.vocab_size != source_cfg.get("vocab_size"):
            out.append(("data.vocab_size", cfg.data.vocab_size, source_cfg.get("vocab_size")))
        if "data.tokenizer" in given:
            out.append(("data.tokenizer", cfg.data.tokenizer, "its own tokenizer.json"))
    return out


def init_from(model: Data2Vec, path: str, say) -> None:
    """Load an encoder's weights into the student and the teacher (a fresh run that continues a model)."""
    _, tensors = read_encoder(path)
    for name, net in (("student", model.student), ("teacher", model.teacher)):
        own = net.state_dict()
        for key, value in tensors.items():
            if key in own and own[key].shape != value.shape:
                raise CheckpointError(f"--init-from {path}: tensor {key} has shape {tuple(value.shape)}, the "
                                      f"{name} expects {tuple(own[key].shape)}")
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise CheckpointError(f"--init-from {path} lacks tensor {missing[0]}")
        net.load_state_dict({k: tensors[k] for k in own})
    say(f"Initialized the student and the teacher from {path}.")
