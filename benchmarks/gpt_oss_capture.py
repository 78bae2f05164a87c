"""Why a gpt-oss decode step fails CUDA-graph capture (or that it no longer does): a tiny gpt-oss with sliding-window
layers and sinks, graph decode with DEBUG logging (the capture failure's traceback), tokens against eager decode.

    python benchmarks/gpt_oss_capture.py
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import hybridmoe
import hybridmoe.generation as gen
from hybridmoe.testing import build_tokenizer
from hybridmoe.testing.zoo import save_zoo_model


def main() -> None:
    logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    for name in ("urllib3", "filelock", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    path = Path(tempfile.mkdtemp()) / "gpt_oss"
    tok = build_tokenizer()
    save_zoo_model("gpt_oss", path, tokenizer=tok, vocab_size=len(tok))
    gen.eos_token_ids = lambda *a: set()
    model, tok = hybridmoe.load(path, device="cuda", dtype="bfloat16", progress=False)
    out = {}
    for share in (0.0, 0.5):
        model.hybridmoe.settings.gpu_share = share
        res = hybridmoe.generate(model, tok, list(range(5, 40)), max_new_tokens=12, temperature=0)
        out[share] = res.token_ids
        print(json.dumps({"bench": "gpt_oss_capture", "share": share, "mode": res.decode_mode,
                          "tok_s": round(res.decode_tokens_per_s, 1)}), flush=True)
    model.hybridmoe.settings.cpu_kernel = False
    ref = hybridmoe.generate(model, tok, list(range(5, 40)), max_new_tokens=12, temperature=0, static_cache=False)
    print(json.dumps({"bench": "gpt_oss_tokens", "same_share0": out[0.0] == ref.token_ids,
                      "same_share05": out[0.5] == ref.token_ids}), flush=True)


if __name__ == "__main__":
    main()
