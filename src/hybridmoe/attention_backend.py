"""Which attention backends torch may pick on CUDA once hybridmoe has loaded a model there.

torch's cuDNN attention builds an execution plan the first time it meets a shape (batch, heads, lengths, head dims):
143 ms on average and up to 1.4 s per new shape on the H200 host, against 1.5 ms for the memory-efficient kernel, while
a shape met before costs about the same on either (0.10 against 0.08 ms; S9-b, ``benchmarks/sdpa_shapes.py``,
V2-Lite's attention with a padding mask). Prompts come in every length: each chat turn and each batched prefill of
the server is a new shape, so with cuDNN the server's time to first token under 16 clients was 0.52 s against 0.34 s
without it (S9-b, issue 18's table). hybridmoe therefore turns the cuDNN backend off when it loads a model onto a GPU;
torch's switch is process-wide, so this is said once in the log. ``HYBRIDMOE_CUDNN_SDPA=1`` leaves torch's choice.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("hybridmoe")

KEEP_CUDNN = os.environ.get("HYBRIDMOE_CUDNN_SDPA", "0") not in ("0", "false", "no", "off")


def avoid_per_shape_plans(device: torch.device) -> None:
    """On a CUDA `device`, take cuDNN off torch's list of attention backends (unless HYBRIDMOE_CUDNN_SDPA=1)."""
    if device.type != "cuda" or KEEP_CUDNN or not torch.backends.cuda.cudnn_sdp_enabled():
        return
    torch.backends.cuda.enable_cudnn_sdp(False)
    log.info("cuDNN attention off for this process (it plans each new prompt shape: ~0.14 s each); "
             "HYBRIDMOE_CUDNN_SDPA=1 keeps it")
