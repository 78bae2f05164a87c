"""lm-evaluation-harness against `hybridmoe serve` (the README's route), on a tiny model and a local task.

Runs only where lm_eval is installed (`pip install "lm_eval[api]"`; it is not in the test extra: it brings ~35
packages). The harness's greedy answers must be the server's own greedy replies to the same prompts.
"""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from hybridmoe.serve import build_app, serve_in_thread  # noqa: E402

from .helpers import make_checkpoint  # noqa: E402

TASK = """task: hybridmoe_smoke
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


def test_lm_eval_harness_through_serve(tmp_path, monkeypatch):
    import openai
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = make_checkpoint("qwen3_moe", tmp_path / "tiny")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}."}) + "\n"
                            for i in range(3)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "smoke.yaml").write_text(TASK.format(data=data))
    app = build_app(ckpt, {}, device="cpu", model_name="tiny", max_batch_size=4)
    with serve_in_thread(app) as url:
        results = lm_eval.simple_evaluate(
            model="local-chat-completions",
            model_args=f"model=tiny,base_url={url}/v1/chat/completions,num_concurrent=1,tokenized_requests=False",
            tasks=["hybridmoe_smoke"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
            apply_chat_template=True, log_samples=True)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        samples = results["samples"]["hybridmoe_smoke"]
        assert len(samples) == 3 and "exact_match,none" in results["results"]["hybridmoe_smoke"]
        for s in samples:
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": s["doc"]["question"]}],
                                               temperature=0, max_tokens=8, stop=["\n"])
            assert s["resps"][0][0] == r.choices[0].message.content
