"""Model folders and hub ids for the subcommands: every way a ``--model`` can be unusable is a
one-line :class:`CLIError` *before* weights are loaded, and a hub id never waits on a network
that is not there."""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from typing import Iterator, Optional
from urllib.parse import urlparse

from . import CLIError

HUB_PROBE_SECONDS = 3.0


def looks_local(name: str) -> bool:
    """A path rather than a hub id (``org/name`` or ``name``)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or os.path.exists(name))


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds (name lookup
    included: it runs in a thread, so a hanging resolver cannot stall the command)."""
    url = urlparse(hub_endpoint())
    host = url.hostname
    if not host:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    ok = threading.Event()

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.set()
        except OSError:
            pass
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return ok.is_set()


def resolve(name: str, option: str) -> tuple[str, bool]:
    """``(name, local_files_only)`` for ``from_pretrained``: a local folder (checked to exist),
    or a hub id; a hub id loads from the cache only when the hub is offline or unreachable."""
    if looks_local(name):
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise CLIError(f"{option} {name!r}: no such folder")
        return path, True
    if hub_offline() or not hub_reachable():
        return name, True
    return name, False


def _not_found(name: str, option: str) -> CLIError:
    why = ("HF_HUB_OFFLINE is set" if hub_offline()
           else f"the Hugging Face hub ({hub_endpoint()}) is not reachable")
    return CLIError(f"cannot load {option.lstrip('-')} {name!r}: it is not a local folder and not in the "
                    f"Hugging Face cache, and {why}; give a local model folder")


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


def load_config(name: str, option: str = "--model", *, causal_lm: bool = True):
    """``(config, path, local_files_only)`` for ``from_pretrained``, or a one-line
    :class:`CLIError`: no such folder, no config.json, no ``model_type``, an architecture this
    transformers does not know, (``causal_lm``) no causal-LM head, a hub id that is neither
    reachable nor cached."""
    from transformers import AutoConfig

    path, local_only = resolve(name, option)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIError(f"{option} {name!r}: no config.json in this folder (not a Hugging Face "
                       "model folder)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    except OSError as err:
        if local_only and not os.path.isdir(path):
            raise _not_found(name, option) from None
        raise CLIError(f"cannot load model {name!r}: {first_line(err)}") from None
    except ValueError as err:
        if "model_type" in str(err):
            raise CLIError(f"{option} {name!r}: its config.json has no (known) model_type, so "
                           "the architecture is unknown") from None
        raise CLIError(f"{option} {name!r}: {first_line(err)}") from None
    if causal_lm:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise CLIError(f"{option} {name!r} is a {config.model_type!r} model without a causal "
                           "language-model head (AutoModelForCausalLM); this command needs a "
                           "decoder LM such as Llama, Mistral, Qwen2, Gemma, Phi-3, GPT-2")
    return config, path, local_only


def unsupported_message(err: BaseException, flag: Optional[str] = "--no-strict") -> str:
    """One line from :class:`lrp_kernels.UnsupportedModelError` (whose text lists one module
    per line and suggests ``strict=False``, which the command line spells ``flag``)."""
    items = [ln.strip() for ln in str(err).splitlines()[1:]
             if ln.strip() and not ln.strip().startswith("(")]
    shown = "; ".join(items[:3]) + (f"; and {len(items) - 3} more" if len(items) > 3 else "")
    hint = (f"; {flag} patches the rest and keeps plain gradients there" if flag
            else "")
    return f"the AttnLRP patch has no rule for: {shown or first_line(err)}{hint}"


def usable_device(requested: Optional[str], cuda_default: str = "cuda") -> str:
    """``--device`` as given, else ``cuda_default`` where CUDA is available, else ``cpu``; a
    device torch cannot allocate on is a :class:`CLIError` naming ``--device``."""
    import torch
    device = requested or (cuda_default if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise CLIError(f"--device {device!r} is not usable here: {str(err).splitlines()[0]}") from None
    return device


@contextlib.contextmanager
def model_errors(backend: str, model_id: str, flag: Optional[str] = "--no-strict") -> Iterator[None]:
    """Report, as one :class:`CLIError` line, the two mistakes any explaining command can meet
    once the model runs: a ``--backend`` that cannot run here and a ``--model`` the patch has no
    rule for (``flag``: the option that relaxes that, or ``None``)."""
    from ..backends.dispatch import BackendUnavailableError
    from ..hf.patching import UnsupportedModelError
    try:
        yield
    except BackendUnavailableError as err:
        raise CLIError(f"--backend {backend}: {err}") from None
    except UnsupportedModelError as err:
        raise CLIError(f"--model {model_id!r}: {unsupported_message(err, flag)}") from None
