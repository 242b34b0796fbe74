"""Checkpoints and their flags: the published OpenAI ones, sidecar files, flag resolution, loading with readable errors.

A network's flags come from the script's defaults, then the flags its checkpoint carries (its
sidecar `<checkpoint>.json`, else the README flags of the official checkpoint with the same
architecture), then the flags typed on the command line. A state dict that does not fit the
model raises one line naming the missing, unexpected and mis-shaped keys and, when the file is
an official checkpoint, the flag string that builds it.
"""

import hashlib
import json
import os
import shlex

import blobfile as bf
import torch as th

from . import dist_util
from .errors import UsageError
from .script_util import (
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    pxp_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
    str2bool,
)

DOWNLOAD_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/{name}"

_MODEL_256 = (
    "--attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 256 --learn_sigma True "
    "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)

# name -> (kind, the README flag string that builds it)
OFFICIAL = {
    "64x64_diffusion.pt": (
        "model",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
        "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
        "--resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True",
    ),
    "64x64_classifier.pt": ("classifier", "--image_size 64 --classifier_depth 4"),
    "128x128_diffusion.pt": (
        "model",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 --learn_sigma True "
        "--noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 --resblock_updown True "
        "--use_fp16 True --use_scale_shift_norm True",
    ),
    "128x128_classifier.pt": ("classifier", "--image_size 128"),
    "256x256_diffusion.pt": ("model", "--class_cond True " + _MODEL_256),
    "256x256_diffusion_uncond.pt": ("model", "--class_cond False " + _MODEL_256),
    "256x256_classifier.pt": ("classifier", "--image_size 256"),
    "512x512_diffusion.pt": (
        "model",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 --learn_sigma True "
        "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True "
        "--use_fp16 False --use_scale_shift_norm True",
    ),
    "512x512_classifier.pt": ("classifier", "--image_size 512"),
    "64_256_upsampler.pt": (
        "sr",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --large_size 256 --small_size 64 "
        "--learn_sigma True --noise_schedule linear --num_channels 192 --num_heads 4 --num_res_blocks 2 "
        "--resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    ),
    "128_512_upsampler.pt": (
        "sr",
        "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 --large_size 512 --small_size 128 "
        "--learn_sigma True --noise_schedule linear --num_channels 192 --num_head_channels 64 --num_res_blocks 2 "
        "--resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    ),
    "lsun_bedroom.pt": ("model", "--class_cond False --dropout 0.1 " + _MODEL_256),
    "lsun_cat.pt": ("model", "--class_cond False --dropout 0.1 " + _MODEL_256),
    "lsun_horse.pt": ("model", "--class_cond False --dropout 0.1 " + _MODEL_256),
    "lsun_horse_nodropout.pt": ("model", "--class_cond False --dropout 0.0 " + _MODEL_256),
}

DEFAULTS = {"model": model_and_diffusion_defaults, "classifier": classifier_defaults, "sr": sr_model_and_diffusion_defaults}
KIND_NAMES = {"model": "diffusion model", "sr": "super-resolution model", "classifier": "classifier"}

# flags that choose how a network is sampled, not which network it is: kept out of sidecars
SAMPLING_FLAGS = ("timestep_respacing", *pxp_defaults())


def parse_flags(flag_string, defaults):
    """Flag values from a README-style string (`--name value ...`), typed like `defaults`."""
    tokens = shlex.split(flag_string)
    if len(tokens) % 2:
        raise UsageError(f"flags must come in --name value pairs: {flag_string!r}")
    values = dict(defaults)
    for name, value in zip(tokens[::2], tokens[1::2]):
        key = name[2:] if name.startswith("--") else None
        if key not in defaults:
            raise UsageError(f"unknown flag {name} (known: {', '.join('--' + k for k in defaults)})")
        default = defaults[key]
        try:
            values[key] = str2bool(value) if isinstance(default, bool) else type(default)(value)
        except (TypeError, ValueError) as e:
            raise UsageError(f"bad value for {name}: {value!r} ({type(default).__name__} expected)") from e
    return values


def build(kind, flags):
    """The network of a kind ("model", "classifier", "sr") from a dict of flag values."""
    if kind == "classifier":
        names = classifier_defaults()
        return create_classifier(**{k: flags[k] for k in names})
    if kind == "sr":
        return sr_create_model_and_diffusion(**flags)[0]
    return create_model_and_diffusion(**flags)[0]


def architecture(model_or_state_dict):
    """The (key, shape) list that a state dict must match."""
    state_dict = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, th.nn.Module) else model_or_state_dict
    return [(k, tuple(v.shape)) for k, v in state_dict.items()]


def official_architectures():
    """Each official checkpoint's (key, shape) set, built once on the meta device."""
    if not hasattr(official_architectures, "cache"):
        cache = {}
        with th.device("meta"):
            for name, (kind, flag_string) in OFFICIAL.items():
                flags = parse_flags(flag_string, DEFAULTS[kind]())
                cache[name] = frozenset(architecture(build(kind, flags)))
        official_architectures.cache = cache
    return official_architectures.cache


def identify(state_dict):
    """Names of the official checkpoints whose architecture the state dict has (LSUN ones share one)."""
    arch = frozenset(architecture(state_dict))
    return [name for name, official in official_architectures().items() if official == arch]


def read_sidecar(path):
    """The sidecar `<path>.json` of a checkpoint, {"kind": ..., "flags": "--name value ..."}, or None."""
    sidecar = f"{path}.json"
    if not os.path.exists(sidecar):
        return None
    try:
        with open(sidecar) as f:
            content = json.load(f)
        if not isinstance(content.get("flags"), str):
            raise ValueError("no 'flags' string")
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"cannot read {sidecar}: expected JSON with a 'flags' string ({e})") from e
    return content


def sidecar_flags(path):
    """The flag string stored beside a checkpoint in `<path>.json`, or None."""
    sidecar = read_sidecar(path)
    return sidecar and sidecar["flags"]


def make_sidecar(kind, args, defaults):
    """The sidecar of a checkpoint trained with args: its kind and the flags (of `defaults`) that build it."""
    names = [k for k in defaults if k not in SAMPLING_FLAGS]
    return dict(kind=kind, flags=" ".join(f"--{k} {shlex.quote(str(getattr(args, k)))}" for k in names))


def write_sidecar(checkpoint_path, kind, flags):
    """Write `<checkpoint_path>.json` = {"kind", "flags"}: what builds the network the checkpoint fits."""
    tmp_path = f"{checkpoint_path}.json.tmp"
    with open(tmp_path, "w") as f:
        json.dump({"kind": kind, "flags": flags}, f, indent=1)
        f.write("\n")
    os.replace(tmp_path, f"{checkpoint_path}.json")


def carried_flags(path, kind, state_dict, flag="checkpoint"):
    """(flags the checkpoint carries, where they come from): its sidecar's, else the official checkpoint's it matches.

    Only the flags named in that flag string are returned, typed; ({}, None) when it carries none.
    `flag` names the checkpoint in errors (e.g. --model_path).
    """
    sidecar, source = read_sidecar(path), f"{path}.json"
    if sidecar is not None:
        flag_string, found = sidecar["flags"], sidecar.get("kind", kind)
        if found != kind:
            raise UsageError(f"{flag} {path} is a {KIND_NAMES.get(found, found)} (says {source}), not a {KIND_NAMES[kind]}")
    else:
        names = identify(state_dict)
        if not names:
            return {}, None
        found, flag_string = OFFICIAL[names[0]]
        if found != kind:
            raise UsageError(f"{flag} {path} is the official {names[0]}, a {KIND_NAMES[found]}, not a {KIND_NAMES[kind]}")
        source = f"the official {' / '.join(names)}"
    try:
        values = parse_flags(flag_string, DEFAULTS[kind]())
    except UsageError as e:
        raise UsageError(f"flags of {path} from {source}: {e}") from e
    return {name[2:]: values[name[2:]] for name in shlex.split(flag_string)[::2]}, source


def resolve_flags(defaults, carried, typed):
    """A network's flags: the script's defaults, then those its checkpoint carries, then those typed (only names in defaults)."""
    flags = dict(defaults)
    flags.update({k: v for k, v in carried.items() if k in flags})
    flags.update({k: v for k, v in typed.items() if k in flags})
    return flags


def file_sha256(path, chunk_size=1 << 20):
    """The SHA-256 of a file as hex, read in chunks (memory stays small whatever the file's size)."""
    digest = hashlib.sha256()
    with bf.BlobFile(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _key_list(keys, limit=3):
    """A few keys and a count of the rest."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def mismatch_message(model, state_dict, path):
    """One line describing why state_dict does not fit model, or None if it fits exactly."""
    expected = dict(architecture(model))
    found = dict(architecture(state_dict))
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [f"{k} {list(found[k])} vs {list(expected[k])}" for k in expected if k in found and found[k] != expected[k]]
    if not (missing or unexpected or misshaped):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_key_list(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_key_list(unexpected)})")
    if misshaped:
        parts.append(f"{len(misshaped)} mis-shaped (file vs model: {_key_list(misshaped)})")
    message = f"checkpoint {path} does not fit the model built from these flags: {'; '.join(parts)}"
    names = identify(state_dict)
    if names:
        kind, flag_string = OFFICIAL[names[0]]
        message += f"; it is the official {' / '.join(names)}: use {flag_string}"
    else:
        message += "; pass the flags it was trained with"
    return message


def load_weights(model, path):
    """Load a checkpoint file into model (strict), raising UsageError in one line if it does not fit."""
    state_dict = dist_util.load_model_state_dict(path, map_location="cpu")
    message = mismatch_message(model, state_dict, path)
    if message:
        raise UsageError(message)
    model.load_state_dict(state_dict)
    return model


def load_with_sidecar(path):
    """(network in eval mode, its flags) of a checkpoint whose sidecar `<path>.json` says its kind and flags."""
    sidecar = read_sidecar(path)
    if sidecar is None:
        raise UsageError(f"{path} has no sidecar {path}.json saying which flags build it")
    kind = sidecar.get("kind", "model")
    flags = parse_flags(sidecar["flags"], DEFAULTS[kind]())
    return load_weights(build(kind, flags), path).eval(), flags
