"""The fixtures' input recipes: every input of tests/fixtures/ is rebuilt with numpy's legacy RandomState.

Only the reference's outputs are stored; recipes.json holds the seeds, shapes, flags and key lists
these functions take, and the SHA-256 of every input they rebuild (see tests/fixtures/README.md).
"""

import hashlib
import json
import math

import numpy as np

from conftest import FIXTURES

RECIPES = json.loads((FIXTURES / "recipes.json").read_text())


def normal(seed, shape):
    """Standard normal float32 values: the images, x_t, x_T, low-resolution inputs and every noise z."""
    return np.random.RandomState(seed).standard_normal(tuple(shape)).astype(np.float32)


def weights(seed, keys):
    """A state dict for [(name, shape), ...]: entry i drawn from seed * 1000 + i, scaled by 0.5 / sqrt(fan_in)
    (0.1 for vectors), and rounded to float16 so that it is the same in every precision."""
    state = {}
    for i, (name, shape) in enumerate(keys):
        scale = 0.5 / max(1, math.prod(shape[1:])) ** 0.5 if len(shape) > 1 else 0.1
        values = np.random.RandomState(seed * 1000 + i).standard_normal(tuple(shape)) * scale
        state[name] = values.astype(np.float16).astype(np.float32)
    return state


def acts(seed, n, dim, scale, shift):
    """n synthetic pool features: non-negative, correlated through one shared normal column."""
    z = np.random.RandomState(seed).standard_normal((n, dim + 1))
    return np.maximum((0.8 * z[:, 1:] + 0.6 * z[:, :1]) * scale + shift, 0.0).astype(np.float32)


def probs(seed, n, classes):
    """n synthetic class distributions: (u + 0.25) ** 16 for uniform u, normalised per row."""
    q = np.random.RandomState(seed).random_sample((n, classes)) + 0.25
    for _ in range(4):
        q = q * q
    return (q / q.sum(axis=1, keepdims=True)).astype(np.float32)


def normal_input(spec):
    """The normal array of a recipes.json entry {"seed", "shape", "sha256"}."""
    return normal(spec["seed"], spec["shape"])


def eval_input(spec):
    """An evaluator input of recipes.json ("eval" section): activations or class probabilities."""
    if spec["recipe"] == "acts":
        return acts(spec["seed"], spec["n"], spec["dim"], spec["scale"], spec["shift"])
    return probs(spec["seed"], spec["n"], spec["classes"])


def sha256(*arrays):
    """SHA-256 of the arrays' C-order bytes, concatenated: how recipes.json records every input."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
