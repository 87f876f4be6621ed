"""Training checkpoints: tensors and plain containers only, so they load with ``weights_only=True``, written
atomically, with every RNG state needed for an exact resume."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

from ..atomic import atomic_write
from ..errors import UserError

CHECKPOINT_NAME = "checkpoint.pt"


def check_output_folder(out: Union[str, Path], resume: bool, what: str = "training run") -> Path:
    """Refuse to start a fresh run over an existing one (it would overwrite its checkpoint); ``--resume`` continues."""
    out = Path(out)
    if (out / CHECKPOINT_NAME).exists() and not resume:
        raise UserError(f"{out} already holds a {what} (checkpoint.pt); use --resume to continue it "
                        "or choose another --out")
    return out


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


def save_checkpoint(path: Union[str, Path], state: Dict[str, Any]) -> None:
    """Write a training checkpoint atomically (temp file + os.replace): a crash never leaves half a file."""
    with atomic_write(Path(path)) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint to resume from at {path}; run without --resume to start fresh")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle with code, a truncated or foreign file
        raise UserError(f"checkpoint {path} cannot be loaded safely ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}); delete it or start without --resume") from error
