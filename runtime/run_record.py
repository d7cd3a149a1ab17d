"""The settings a training run keeps beside its checkpoints: `model_dir/settings.json`.

It holds the network-defining fields (which bind later runs on that folder), what the run used
(dtype, batch size, backend, ...) and the tool's version. It is written atomically with every
checkpoint; evaluate, predict and --resume_training read it back through `saved_network`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Optional

from common.errors import UserError
from common.output_files import replacing
from common.version import VERSION

FILE_NAME = "settings.json"


def record_path(model_dir: str) -> str:
    """Where a run's settings are kept."""
    return os.path.join(model_dir, FILE_NAME)


def write(model_dir: str, network: dict[str, Any], used: dict[str, Any]) -> None:
    """Write {network, run, version} into model_dir/settings.json atomically."""
    body = {"version": VERSION, "network": network, "run": used}
    with replacing(record_path(model_dir)) as tmp:
        with open(tmp, "w") as handle:
            json.dump(body, handle, indent=2, sort_keys=True)
            handle.write("\n")


def read(model_dir: str) -> Optional[dict[str, Any]]:
    """The saved {network, run, version} of model_dir, or None when it has none."""
    path = record_path(model_dir)
    try:
        with open(path) as handle:
            body = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable run settings ({err}); remove it to run from the "
                        "flags alone") from None
    if not isinstance(body, dict) or not isinstance(body.get("network"), dict):
        raise UserError(f"{path}: not the tool's run settings (no 'network' section); remove it to "
                        "run from the flags alone")
    return body


def former_update_rule(model_dir: str, rule: str) -> Optional[str]:
    """None when model_dir's saved run names the optimizer update rule `rule`; else a phrase for
    the rule its optimizer state came from (the tool's former one where it names none)."""
    body = read(model_dir)
    saved = body.get("run", {}).get("update_rule") if body is not None else None
    if saved == rule:
        return None
    if saved is None:
        return "the tool's former update rule (Keras' optimizers, ε 1e-7, RMSprop's mean square from 0)"
    return f"the update rule {saved!r}"


def saved_network(model_dirs: Iterable[str], has_checkpoint: Callable[[str], bool]
                  ) -> Optional[tuple[str, dict[str, Any]]]:
    """(model_dir, network fields) that bind this run, or None.

    Every folder's saved network must be the same (an ensemble is one network): folders that
    disagree are a UserError naming both. A folder with a checkpoint but no settings.json (trained
    before the tool kept them) runs from the flags after a one-line notice.
    """
    found = []
    for model_dir in model_dirs:
        body = read(model_dir)
        if body is None:
            if has_checkpoint(model_dir):
                print(f"{model_dir} holds no {FILE_NAME} (trained before version 2.0): its network "
                      "comes from the flags", flush=True)
            continue
        found.append((model_dir, body["network"]))
    for model_dir, network in found[1:]:
        first_dir, first = found[0]
        differs = sorted(k for k in set(first) | set(network) if first.get(k) != network.get(k))
        if differs:
            shown = ", ".join(f"{k} {first.get(k)} and {network.get(k)}" for k in differs)
            raise UserError(f"--model_dir {first_dir} and {model_dir} hold different networks "
                            f"({shown}); an ensemble needs one network")
    return found[0] if found else None
