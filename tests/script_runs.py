"""Tiny seeded checkpoints and subprocess runs of the scripts, shared by the script tests.

The checkpoints (image size 16, 32 channels) are made here and carry their flags in a sidecar
`<checkpoint>.json`; every script runs in its own process, as a user runs it (warm_python spares the
torch import of each run).
"""

import json
import os
import sys

import numpy as np
import torch

import warm_python
from conftest import ROOT
from guided_diffusion.checkpoints import DEFAULTS, OFFICIAL, build, parse_flags


TINY = "--num_channels 32 --num_res_blocks 1 --attention_resolutions 8 --num_head_channels 32 --learn_sigma True --diffusion_steps 100 --noise_schedule cosine --num_classes 10"
MODEL = f"--image_size 16 --channel_mult 1,2 {TINY}"
CLASSIFIER = "--num_classes 10 --classifier_width 32 --classifier_depth 1 --classifier_channel_mult 1,2 --classifier_attention_resolutions 8"
UPSAMPLER = f"--large_size 64 --small_size 16 --class_cond True {TINY}"


def save_checkpoint(path, kind, flags, seed, sidecar=True, edit=None):
    """A network with seeded N(0, 0.05) weights (the UNet's zero-initialised layers too), saved with its sidecar."""
    torch.manual_seed(seed)
    net = build(kind, parse_flags(flags, DEFAULTS[kind]()))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    state_dict = net.state_dict()
    if edit:
        edit(state_dict)
    torch.save(state_dict, path)
    if sidecar:
        (path.parent / f"{path.name}.json").write_text(json.dumps({"kind": kind, "flags": flags}))
    return str(path)


def official_meta(path, name):
    """A state dict with the official checkpoint's keys and shapes but no data (meta tensors): a few kB."""
    kind, flags = OFFICIAL[name]
    with torch.device("meta"):
        torch.save(build(kind, parse_flags(flags, DEFAULTS[kind]())).state_dict(), path)
    return str(path)


def script_command(script, flags, mpi=0):
    """The command line of a script (under mpiexec -n mpi when mpi)."""
    command = [sys.executable, str(ROOT / "scripts" / script), *map(str, flags)]
    return ["mpiexec", "-n", str(mpi), *command] if mpi else command


def script_env(**extra):
    """The environment of a script run: no OPENAI_LOGDIR, one torch thread, plus extra."""
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_LOGDIR"}
    return dict(env, OMP_NUM_THREADS="1", **extra)


def run(script, *flags, mpi=0, status=0, cwd=None, **env):
    """Run a script (in cwd); assert its exit status; returns the CompletedProcess."""
    proc = warm_python.run(script_command(script, flags, mpi), env=script_env(**env), cwd=cwd)
    assert proc.returncode == status, proc.stdout + proc.stderr
    return proc


def guided_flags(models, out, *extra):
    """classifier_sample.py's flags for a short, seeded, guided run of the tiny models into out."""
    return [
        "--model_path", models["cond"], "--classifier_path", models["clf"], "--classifier_scale", 5, "--num_samples", 5,
        "--timestep_respacing", 4, "--seed", 7, "--output", out, *extra,
    ]


def read_npz(path):
    """Every array of an .npz file, read into memory."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}
