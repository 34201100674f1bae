"""One runtime for every trainer and for inference: device, precision, distributed set-up, checkpoints.

- Device: `auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`; asking for CUDA without it is one
  clear error (`DeviceError`), never a silent fall-back.
- Precision: `auto` is bf16 autocast where the hardware has it (CPUs with AVX512-BF16, CUDA with bf16), fp16
  autocast with a gradient scaler on CUDA without bf16, and float32 elsewhere; `bf16`, `fp16`, `fp32` on request.
  Weights and optimizer state stay float32 under autocast.
- Distributed: set up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on CUDA with the device
  from LOCAL_RANK, gloo on CPU. Rank 0 logs and saves.
- Checkpoints: safetensors, with everything that is not a tensor (step, config, optimizer hyper-parameters, random
  states) as JSON in the file's header. Nothing is ever unpickled, so a checkpoint a user was handed cannot run
  code. Written to a temporary file and renamed: a kill mid-save leaves the previous checkpoint.
- One resume rule (`check_resume`): a run folder that holds a checkpoint is refused without resume=True, never
  resumed or restarted silently.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
CHECKPOINT_FILE = "checkpoint.safetensors"  # every trainer's resume state, in its run folder
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class DeviceError(ValueError):
    """A device or precision that this machine cannot give; the message says what it has instead."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (truncated, not a racm3 checkpoint); the message names the file."""


# --- device ------------------------------------------------------------------------------------------------


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda[:N]` is checked to exist."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: this machine has no CUDA device (torch {torch.__version__}, "
                              "built for CPU?); use --device cpu, or install a CUDA build of torch (README)")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DeviceError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return torch.device(name)
    raise DeviceError(f"--device {name!r}: choose {DEVICE_CHOICES}")


def bf16_supported(device: torch.device) -> bool:
    """bf16 matrix units: AVX512-BF16 (or AMX) on a CPU, compute capability >= 8 on CUDA."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported())


# --- precision ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """Autocast dtype for one device; float32 = autocast off. fp16 needs a gradient scaler (CUDA only)."""

    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]

    def autocast(self):
        """The forward pass's context: autocast to dtype, or nothing for float32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> "torch.amp.GradScaler":
        """Scales fp16 losses against underflow; a pass-through for bf16 and float32."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


def resolve_precision(name: str, device: torch.device) -> Precision:
    name = (name or "auto").lower()
    if name not in PRECISIONS:
        raise DeviceError(f"--precision {name!r}: choose {', '.join(PRECISIONS)}")
    if name == "auto":
        if bf16_supported(device):
            return Precision(device, torch.bfloat16)
        return Precision(device, torch.float16 if device.type == "cuda" else torch.float32)
    if name == "bf16" and not bf16_supported(device):
        raise DeviceError(f"--precision bf16: {device} has no bf16 support; use --precision auto or fp32")
    if name == "fp16" and device.type != "cuda":
        raise DeviceError("--precision fp16 is for CUDA devices; on a CPU use bf16 (where supported) or fp32")
    return Precision(device, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name])


# --- distributed -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (world 1 without torchrun) and the device it computes on."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP over the job's processes (the model as it is in one process)."""
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def init_distributed(device: str | torch.device | None = "auto") -> Dist:
    """Read torchrun's environment; NCCL with cuda:LOCAL_RANK on CUDA, gloo on CPU; world 1 without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)  # one process per GPU: torchrun's LOCAL_RANK picks it
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)  # this process's GPU, for NCCL and for tensors made without a device
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


# --- checkpoints -------------------------------------------------------------------------------------------

_TENSOR = "__tensor__"  # a JSON leaf that stands for the tensor stored under that key


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], seen: dict[tuple, str]) -> Any:
    """obj with every tensor replaced by {"__tensor__": key}; tensors collected (shared storage stored once)."""
    if isinstance(obj, torch.Tensor):
        ident = (obj.data_ptr(), obj.dtype, tuple(obj.shape), obj.stride()) if obj.numel() else None
        if ident in seen:  # tied weights (Llama's embeddings and output layer): one copy on disk
            return {_TENSOR: seen[ident]}
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared storage
        if ident is not None:
            seen[ident] = key
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"checkpoint keys must be str or int, got {[type(k).__name__ for k in obj]}")
        # JSON keys are strings: remember which were ints (optimizer state is keyed by parameter index)
        return {"__dict__": [[k, _flatten(v, tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__": [_flatten(v, tensors, seen) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (tensors, numbers, strings, lists, dicts)")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    return obj


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Tensors (model, optimizer moments, random states) to safetensors; the rest as JSON in its header.

    Temporary file, fsync, rename: a crash mid-save leaves the previous checkpoint as it was.
    """
    from safetensors.torch import save

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors, {})
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a save that was killed
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:  # our temporary name, so a killed save's leftover is ours to clear
            f.write(save(tensors, metadata={"racm3_checkpoint": json.dumps(skeleton)}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """What save_checkpoint wrote; CheckpointError for a file that is not one (a pickle, truncated, garbage)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if "racm3_checkpoint" not in meta:
                raise CheckpointError(f"{path}: not a racm3 checkpoint (no racm3_checkpoint header); "
                                      "delete it and start the run over")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _unflatten(json.loads(meta["racm3_checkpoint"]), tensors)
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc)[:120]}); it is "
                              "truncated or not a safetensors file: delete it and start the run over") from None


def check_resume(checkpoint: str | os.PathLike, resume: bool) -> bool:
    """The resume rule every trainer follows: True = continue from checkpoint, False = start fresh.

    A checkpoint without resume is refused (FileExistsError); resume without a checkpoint starts fresh.
    """
    checkpoint = Path(checkpoint)
    if checkpoint.exists() and not resume:
        raise FileExistsError(f"{checkpoint} exists: pass --resume to continue that run, or choose another OUT_DIR")
    return resume and checkpoint.exists()
