"""Process-group setup over MPI, the device of this rank, and checkpoint reading."""

import io
import os
import pickle
import socket
import zipfile

import blobfile as bf
import torch as th
import torch.distributed as dist

from .errors import UsageError

# Upstream's cluster-layout constants, kept for code that reads them. A rank's GPU is its index
# among the ranks on its node, modulo the GPUs it sees, so GPUS_PER_NODE needs no editing here.
GPUS_PER_NODE = 8
SETUP_RETRY_COUNT = 3


def mpi_comm():
    """MPI's world communicator, or None when mpi4py or an MPI runtime is unavailable."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError):
        return None
    return MPI.COMM_WORLD


def setup_dist():
    """Join all MPI ranks in a torch.distributed group (NCCL on GPUs, gloo on CPUs).

    Without a usable MPI the process runs alone as rank 0 of 1.
    """
    if dist.is_initialized():
        return
    comm = mpi_comm()
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    backend = "nccl" if th.cuda.is_available() else "gloo"
    if th.cuda.is_available():
        th.cuda.set_device(dev())
    hostname = "127.0.0.1" if backend == "gloo" else socket.gethostbyname(socket.getfqdn())
    port = _find_free_port()
    if comm is not None:
        hostname, port = comm.bcast((hostname, port), root=0)
    os.environ.update(MASTER_ADDR=hostname, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size))
    dist.init_process_group(backend=backend, init_method="env://")


def _local_rank():
    """This rank's index among the ranks on its node."""
    comm = mpi_comm()
    if comm is None:
        return 0
    from mpi4py import MPI

    return comm.Split_type(MPI.COMM_TYPE_SHARED).rank


def dev():
    """The device for this rank: its own GPU when there are GPUs, else the CPU."""
    if th.cuda.is_available():
        return th.device("cuda", _local_rank() % th.cuda.device_count())
    return th.device("cpu")


def load_state_dict(path, **kwargs):
    """Read what a checkpoint file holds: a `.pt` with weights_only, or a `.safetensors`.

    A `.pt` may hold tensors, numbers, strings and lists, tuples and dicts of them (a model's
    or an optimizer's state); pickled code or objects are refused. kwargs go to torch.load
    (e.g. map_location); `weights_only` is accepted and ignored, as a file is always read with
    weights_only=True. Every problem with the file raises UsageError in one line.
    """
    kwargs.pop("weights_only", None)
    if not bf.exists(path):
        raise UsageError(f"checkpoint not found: {path} (check the path; official ones: python models/download.py NAME)")
    if bf.isdir(path):
        raise UsageError(f"checkpoint {path} is a directory: name the checkpoint file (.pt or .safetensors) itself")
    try:
        with bf.BlobFile(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if str(path).endswith(".safetensors"):
        return _read_safetensors(path, data, kwargs.get("map_location"))
    try:
        return th.load(io.BytesIO(data), weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "global" in str(e):
            raise UsageError(
                f"{path} holds pickled Python objects or code, which are refused (they could run code): "
                "re-save it as a state dict of tensors, torch.save(model.state_dict(), path)"
            ) from None
        raise UsageError(f"cannot read checkpoint {path} ({len(data)} bytes): not a PyTorch checkpoint (truncated or damaged? fetch or save it again)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in reason:  # PyTorch's advice to unpickle code is not repeated
            reason = "not a PyTorch checkpoint"
        raise UsageError(f"cannot read checkpoint {path} ({len(data)} bytes): {reason} (truncated or damaged? fetch or save it again)") from e


def _read_safetensors(path, data, map_location):
    """The tensors of a `.safetensors` file's bytes, moved to map_location if given."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        state_dict = load_safetensors(data)
    except SafetensorError as e:
        raise UsageError(f"cannot read {path} ({len(data)} bytes): bad .safetensors header ({e}); fetch or export it again") from None
    if map_location is not None:
        state_dict = {k: v.to(map_location) for k, v in state_dict.items()}
    return state_dict


def load_model_state_dict(path, map_location=None):
    """A network's state dict read from path: like load_state_dict, but it must map names to tensors."""
    state_dict = load_state_dict(path, map_location=map_location)
    if not isinstance(state_dict, dict) or not all(isinstance(v, th.Tensor) for v in state_dict.values()):
        raise UsageError(f"{path} is not a state dict of tensors (save one with torch.save(model.state_dict(), path))")
    return state_dict


def sync_params(params):
    """Broadcast parameters from rank 0 so all ranks start identical."""
    for p in params:
        with th.no_grad():
            dist.broadcast(p, 0)


def _find_free_port():
    """A TCP port free on this host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]
