"""Installs the `guided_diffusion` package; extras add MPI, the evaluator, plots and tests."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def requirements(path):
    """Non-comment lines of a requirements file."""
    lines = (HERE / path).read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


EXTRAS = {
    "mpich": ["mpich"],
    "eval": requirements("evaluations/requirements.txt"),
    "plot": ["matplotlib"],
    "digits": ["scikit-learn"],
    "safetensors": ["safetensors"],
    "test": ["pytest", "diffusers>=0.26"],  # diffusers: the peer of the DPM-Solver++ loops in tests/test_dpm_solver.py (0.26: final sigma zero)
}
EXTRAS["all"] = sorted({r for reqs in EXTRAS.values() for r in reqs})

setup(
    name="guided-diffusion-pxp",
    version="0.1.0",
    description="Guided diffusion sampling with PixelAsParam projection (a fork of openai/guided-diffusion).",
    packages=["guided_diffusion", "evaluations"],
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy", "blobfile>=1.0.5", "mpi4py", "tqdm", "pillow"],
    extras_require=EXTRAS,
)
