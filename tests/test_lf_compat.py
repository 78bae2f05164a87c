"""LLaMA-Factory configs: the key registry (implemented / ignored / refused / unknown) and its example YAMLs, run
from their unchanged text with a `data/` folder beside them (a few records each) on tiny local checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat

import pytest

from hybridmoe import lf_compat
from hybridmoe.cli import main
from hybridmoe.config import TrainConfig, load_config
from hybridmoe.errors import ConfigError

from .helpers import make_checkpoint, read_log, write_dataset

# Every key of LLaMA-Factory's training argument set (ModelArguments, DataArguments, TrainingArguments,
# FinetuningArguments, GeneratingArguments of src/llamafactory/hparams/*.py, 2026-08, with transformers 5.17's
# Seq2SeqTrainingArguments), as the names HfArgumentParser accepts.
LF_KEYS = ["accelerator_config", "adam_beta1", "adam_beta2", "adam_epsilon", "adapter_folder", "adapter_name_or_path", "add_special_tokens", "add_tokens", "additional_target", "apollo_layerwise", "apollo_proj", "apollo_proj_type", "apollo_rank", "apollo_scale", "apollo_scale_front", "apollo_scale_type", "apollo_target", "apollo_update_interval", "asft_alpha", "audio_sampling_rate", "auto_find_batch_size", "average_tokens_across_devices", "badam_mask_mode", "badam_mode", "badam_start_block", "badam_switch_interval", "badam_switch_mode", "badam_update_ratio", "badam_verbose", "batch_eval_metrics", "bf16", "bf16_full_eval", "block_diag_attn", "buffer_size", "cache_dir", "compute_accuracy", "compute_dtype", "create_new_adapter", "crop_to_patches", "cutoff_len", "data_seed", "data_shared_file_system", "dataloader_drop_last", "dataloader_in_order", "dataloader_multiprocessing_context", "dataloader_num_workers", "dataloader_persistent_workers", "dataloader_pin_memory", "dataloader_prefetch_factor", "dataset", "dataset_dir", "ddp_backend", "ddp_broadcast_buffers", "ddp_bucket_cap_mb", "ddp_find_unused_parameters", "ddp_static_graph", "ddp_timeout", "debug", "deepspeed", "default_system", "device_map", "disable_gradient_checkpointing", "disable_shuffling", "disable_tqdm", "do_eval", "do_predict", "do_sample", "do_train", "double_quantization", "dpo_label_smoothing", "eaft_alpha", "early_stopping_steps", "enable_jit_checkpoint", "enable_liger_kernel", "enable_thinking", "enable_torch_profiler", "eval_accumulation_steps", "eval_dataset", "eval_delay", "eval_do_concat_batches", "eval_num_beams", "eval_on_each_dataset", "eval_on_start", "eval_steps", "eval_strategy", "eval_use_gather_object", "export_device", "export_dir", "export_hub_model_id", "export_legacy_format", "export_quantization_bit", "export_quantization_dataset", "export_quantization_maxlen", "export_quantization_nsamples", "export_size", "finetuning_type", "flash_attn", "fp16", "fp16_full_eval", "fp8", "fp8_backend", "fp8_enable_fsdp_float8_all_gather", "freeze_extra_modules", "freeze_language_model", "freeze_multi_modal_projector", "freeze_trainable_layers", "freeze_trainable_modules", "freeze_vision_tower", "fsdp", "fsdp_config", "full_determinism", "galore_layerwise", "galore_proj_type", "galore_rank", "galore_scale", "galore_target", "galore_update_interval", "generation_config", "generation_max_length", "generation_num_beams", "gradient_accumulation_steps", "gradient_checkpointing", "gradient_checkpointing_kwargs", "greater_is_better", "hf_hub_token", "hub_always_push", "hub_model_id", "hub_private_repo", "hub_revision", "hub_strategy", "hub_token", "hyper_parallel_args", "hyper_parallel_cp_size", "ignore_data_skip", "ignore_pad_token_for_loss", "image_do_pan_and_scan", "image_max_pixels", "image_min_pixels", "include_effective_tokens_per_second", "include_for_metrics", "include_num_input_tokens_seen", "infer_backend", "infer_dtype", "init_special_tokens", "interleave_probs", "kt_cpu_activation", "kt_expert_checkpoint_path", "kt_lora_expert_intermediate_size", "kt_lora_expert_num", "kt_non_expert_weight_path", "kt_use_lora_experts", "kt_weight_path", "kto_chosen_weight", "kto_rejected_weight", "label_names", "label_smoothing_factor", "ld_alpha", "learning_rate", "length_column_name", "length_penalty", "liger_kernel_config", "load_best_model_at_end", "local_rank", "log_level", "log_level_replica", "log_on_each_node", "logging_first_step", "logging_nan_inf_filter", "logging_steps", "logging_strategy", "lora_alpha", "lora_dropout", "lora_rank", "lora_target", "loraplus_lr_embedding", "loraplus_lr_ratio", "low_cpu_mem_usage", "lr_scheduler_kwargs", "lr_scheduler_type", "mask_history", "master_addr", "master_port", "max_grad_norm", "max_length", "max_new_tokens", "max_samples", "max_steps", "media_dir", "megatron_bridge_args", "metric_for_best_model", "mix_strategy", "mixture_of_depths", "model_max_length", "model_name_or_path", "model_revision", "module_dropout", "moe_aux_loss_coef", "ms_hub_token", "neat_packing", "neftune_noise_alpha", "new_special_tokens_config", "num_beams", "num_train_epochs", "offload_folder", "oft_block_size", "oft_rank", "oft_target", "om_hub_token", "optim", "optim_args", "optim_target_modules", "output_dir", "overwrite_cache", "overwrite_output_dir", "packing", "parallelism_config", "per_device_eval_batch_size", "per_device_train_batch_size", "pissa_convert", "pissa_init", "pissa_iter", "plot_loss", "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target", "ppo_whiten_rewards", "predict_with_generate", "prediction_loss_only", "pref_bco_weight", "pref_beta", "pref_ftx", "pref_loss", "preprocessing_batch_size", "preprocessing_num_workers", "preserve_thinking", "print_param_status", "profile_modules", "profiler_active_steps", "profiler_output_dir", "profiler_profile_memory", "profiler_record_shapes", "profiler_repeat", "profiler_wait_steps", "profiler_warmup_steps", "profiler_with_stack", "project", "pure_bf16", "push_to_hub", "quantization_bit", "quantization_device_map", "quantization_method", "quantization_type", "ray_init_kwargs", "ray_num_workers", "ref_model", "ref_model_adapters", "ref_model_quantization_bit", "remove_unused_columns", "repetition_penalty", "report_to", "resize_vocab", "restore_callback_states_from_checkpoint", "resume_from_checkpoint", "reward_model", "reward_model_adapters", "reward_model_quantization_bit", "reward_model_type", "rope_scaling", "run_name", "save_on_each_node", "save_only_model", "save_steps", "save_strategy", "save_total_limit", "seed", "sglang_config", "sglang_lora_backend", "sglang_maxlen", "sglang_mem_fraction", "sglang_tp_size", "shift_attn", "simpo_gamma", "skip_memory_metrics", "skip_special_tokens", "sortish_sampler", "split_special_tokens", "stage", "streaming", "swanlab_api_key", "swanlab_lark_secret", "swanlab_lark_webhook_url", "swanlab_logdir", "swanlab_mode", "swanlab_project", "swanlab_run_name", "swanlab_workspace", "temperature", "template", "tf32", "tokenized_path", "tool_format", "top_k", "top_p", "torch_compile", "torch_compile_backend", "torch_compile_mode", "torch_empty_cache_steps", "trackio_bucket_id", "trackio_space_id", "trackio_static_space_id", "train_from_scratch", "train_on_prompt", "train_sampling_strategy", "trust_remote_code", "upcast_layernorm", "upcast_lmhead_output", "use_adam_mini", "use_apollo", "use_asft_loss", "use_audio_in_video", "use_badam", "use_cache", "use_cpu", "use_dft_loss", "use_dora", "use_eaft_loss", "use_fast_tokenizer", "use_galore", "use_hyper_parallel", "use_kt", "use_kv_cache", "use_liger_kernel", "use_llama_pro", "use_mca", "use_megatron_bridge", "use_muon", "use_reentrant_gc", "use_rslora", "use_swanlab", "use_unsloth", "use_unsloth_gc", "use_v1_kernels", "val_size", "video_fps", "video_max_pixels", "video_maxlen", "video_min_pixels", "vllm_config", "vllm_enforce_eager", "vllm_gpu_util", "vllm_max_lora_rank", "vllm_maxlen", "warmup_steps", "weight_decay"]

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
BASE = {"model_name_or_path": "m", "dataset": "d.jsonl", "output_dir": "o"}


def test_every_llamafactory_key_is_classified():
    known = lf_compat.known_keys(FIELDS)
    assert len(LF_KEYS) > 300
    assert [k for k in LF_KEYS if k not in known and not k.startswith("kt_")] == []
    # none is both implemented and ignored
    assert not set(lf_compat.IGNORED) & set(FIELDS) and not set(lf_compat.REFUSED) & set(FIELDS)


def test_ignored_keys_warn_once_each(caplog):
    cfg = {**BASE, "use_kt": True, "kt_weight_path": "/x", "kt_some_future_key": 1, "dataloader_num_workers": 4,
           "save_only_model": False, "flash_attn": "fa2"}
    with caplog.at_level(logging.WARNING, logger="hybridmoe"):
        load_config(cfg)
    lines = [r.getMessage() for r in caplog.records]
    for key in ("use_kt", "kt_weight_path", "kt_some_future_key", "dataloader_num_workers", "save_only_model",
                "flash_attn"):
        assert sum(f"'{key}' has no effect here" in line for line in lines) == 1, key
    assert any("KTransformers" in line for line in lines)
    assert len(lines) == 6


def test_implemented_keys_take_effect():
    cfg = load_config({**BASE, "dataset": "identity, alpaca_en_demo", "dataset_dir": "mydata", "max_samples": 10,
                       "overwrite_cache": True, "preprocessing_num_workers": 16, "val_size": 0.1,
                       "per_device_eval_batch_size": 2, "evaluation_strategy": "steps", "eval_steps": 5,
                       "disable_gradient_checkpointing": True, "report_to": ["tensorboard"], "adam_beta2": 0.95,
                       "template": "qwen3_nothink", "disable_tqdm": True})
    assert (cfg.dataset_dir, cfg.max_samples, cfg.preprocessing_num_workers) == ("mydata", 10, 16)
    assert (cfg.eval_strategy, cfg.eval_steps, cfg.per_device_eval_batch_size) == ("steps", 5, 2)
    assert cfg.gradient_checkpointing is False and cfg.progress is False
    assert cfg.report_to == "tensorboard" and cfg.adam_beta2 == 0.95


def test_yaml_exponent_floats_without_a_dot(tmp_path):
    """YAML 1.1 reads `1e-4` (no dot) as a string; LLaMA-Factory's configs use it: it is a number here too, and a
    word is still an error."""
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\ndataset: d.jsonl\noutput_dir: o\nlearning_rate: 1e-4\nweight_decay: 5e-2\n")
    cfg = load_config(str(path))
    assert cfg.learning_rate == 1e-4 and cfg.weight_decay == 0.05
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config({**BASE, "learning_rate": "fast"})


def test_unknown_keys_reported_at_once_with_closest_match():
    with pytest.raises(ConfigError) as info:
        load_config({**BASE, "learning_rat": 1e-4, "lora_rnak": 8, "xyzzy_plugh": 1})
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("unknown config keys: ")
    assert "'learning_rat' (did you mean 'learning_rate'?)" in msg
    assert "'lora_rnak' (did you mean 'lora_rank'?)" in msg
    assert "'xyzzy_plugh'" in msg


@pytest.mark.parametrize("key,value,ok", [("use_dora", True, False), ("use_dora", False, True),
                                          ("quantization_bit", 4, False), ("quantization_bit", None, True),
                                          ("packing", True, False), ("packing", False, True)])
def test_refused_keys(key, value, ok):
    if ok:
        load_config({**BASE, key: value})
    else:
        with pytest.raises(ConfigError, match=f"'{key}: {value}' is not supported"):
            load_config({**BASE, key: value})


@pytest.mark.parametrize("bad,match", [
    ({"template": "vicuna"}, "template 'vicuna' is not one hybridmoe knows; known: qwen, qwen3"),
    ({"report_to": "tensorbord"}, "report_to 'tensorbord'"),
    ({"eval_strategy": "sometimes"}, "eval_strategy"),
    ({"val_size": 2.5}, "val_size"),
    ({"max_samples": 0}, "max_samples"),
    ({"eval_steps": 2.5}, "'eval_steps' is 2.5: give a whole number of steps, or a fraction below 1"),
    ({"logging_steps": 0}, "logging_steps"),
    ({"save_strategy": "best"}, "save_strategy 'best' saves on a best metric"),
    ({"save_strategy": "always"}, "save_strategy 'always' is not one of no, steps, epoch"),
    ({"logging_strategy": "often"}, "logging_strategy"),
])
def test_bad_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config({**BASE, **bad})


# ---------------------------------------------------------------------------------------------------------------
# LLaMA-Factory's own example YAMLs, unchanged but for model_name_or_path
# ---------------------------------------------------------------------------------------------------------------

# examples/ktransformers/train_lora/{deepseek_v2,qwen3moe}_lora_sft_kt.yaml differ only in these three values
KT_YAML = """### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: {dataset}
template: {template}
cutoff_len: 2048
max_samples: 100000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/{out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### ktransformers
use_kt: true
# Pair with fsdp2_kt_bf16.yaml for original BF16 checkpoints.
# For pre-converted expert weights, uncomment kt_weight_path and use fsdp2_kt_int8.yaml or fsdp2_kt_int4.yaml.
# kt_weight_path: /path/to/DeepSeek-V2-Lite-AMXINT8
"""

# examples/train_lora/qwen3_lora_sft.yaml
QWEN3_YAML = """### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen3-4b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
# eval_dataset: alpaca_en_demo
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""

# data/ as LLaMA-Factory ships it: its dataset_info.json entries and a few (short) records of each file.
DATASET_INFO = {
    "identity": {"file_name": "identity.json"},
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "glaive_toolcall_en_demo": {"file_name": "glaive_toolcall_en_demo.json", "formatting": "sharegpt",
                                "columns": {"messages": "conversations", "tools": "tools"}},
    "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en", "ms_hub_url": "llamafactory/alpaca_en",
                  "om_hub_url": "HaM/alpaca_en"},
}
IDENTITY = [
    {"instruction": "hi", "input": "", "output": "Hello! I am {{name}}, an AI assistant developed by {{author}}. "
                                                 "How can I assist you today?"},
    {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, an AI assistant developed by {{author}}."},
]
ALPACA = [
    {"instruction": "Calculate 15% of 500.", "input": "", "output": "15% of 500 is 75."},
    {"instruction": "Sum up the numbers.", "input": "3, 2, 5", "output": "The sum of the numbers is 10."},
]
AGE_TOOL = {"name": "calculate_age", "description": "Calculate the age based on birthdate",
            "parameters": {"type": "object", "properties": {"birthdate": {
                "type": "string", "description": "The birthdate in YYYY-MM-DD format"}}, "required": ["birthdate"]}}
NAME_TOOL = {"name": "generate_random_name", "description": "Generate a random name",
             "parameters": {"type": "object", "properties": {"gender": {"type": "string"}}, "required": ["gender"]}}
GLAIVE = [
    {"conversations": [
        {"from": "human", "value": "Hi, I was born on 1990-05-15. Can you tell me how old I am today?"},
        {"from": "function_call", "value": json.dumps({"name": "calculate_age",
                                                       "arguments": {"birthdate": "1990-05-15"}})},
        {"from": "observation", "value": json.dumps({"age": 31})},
        {"from": "gpt", "value": "Based on the birthdate you provided, you are 31 years old today."}],
     "tools": json.dumps([AGE_TOOL])},
    {"conversations": [
        {"from": "human", "value": "Can you please book a flight for me from New York to London?"},
        {"from": "gpt", "value": "I'm sorry, but I'm unable to assist with booking flights."}],
     "tools": json.dumps([NAME_TOOL])},
]


def write_lf_data(root) -> None:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=2))
    for name, records in (("identity", IDENTITY), ("alpaca_en_demo", ALPACA), ("glaive_toolcall_en_demo", GLAIVE)):
        (data / f"{name}.json").write_text(json.dumps(records, indent=2))


def strip_chat_template(path):
    """A checkpoint whose tokenizer has no chat template (the `template:` key then supplies one)."""
    (path / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    return path


CASES = {
    # name: (YAML text, architecture, tokenizer keeps its ChatML template, output_dir)
    "deepseek_v2_kt": (KT_YAML.format(model="{model}", dataset="identity, alpaca_en_demo", template="deepseek",
                                      out="KT_FT_deepseekV2"), "deepseek_v2", False, "saves/KT_FT_deepseekV2"),
    "qwen3moe_kt": (KT_YAML.format(model="{model}", dataset="identity, alpaca_en_demo", template="qwen3",
                                   out="KT_FT_qwen3Moe"), "qwen3_moe", True, "saves/KT_FT_qwen3Moe"),
    "qwen3_lora_sft": (QWEN3_YAML, "qwen3_moe", True, "saves/qwen3-4b/lora/sft"),
    "glaive_toolcall": (KT_YAML.format(model="{model}", dataset="glaive_toolcall_en_demo", template="qwen3",
                                       out="glaive"), "qwen3_moe", False, "saves/glaive"),
}


def _example(case, tmp_path, monkeypatch):
    text, arch, keep_template, out = CASES[case]
    model = make_checkpoint(arch, tmp_path / "model")
    if not keep_template:
        strip_chat_template(model)
    write_lf_data(tmp_path)
    (tmp_path / "train.yaml").write_text(text.replace("{model}", str(model)))
    monkeypatch.chdir(tmp_path)  # LLaMA-Factory resolves dataset_dir and output_dir from the working directory
    monkeypatch.setenv("HYBRIDMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / out


# A run of these YAMLs is 3 steps of 8 micro-batches in bf16 (their settings). Gradient checkpointing (on by default)
# makes a tiny model's CPU steps ~4x slower, so CI adds `disable_gradient_checkpointing=true` on the command line:
# the YAML stays as it is, and the key is one of LLaMA-Factory's. Two run to the end here (one per architecture, one
# with tool calls); the other two, whose YAMLs differ from these in the template name and output_dir only, are read
# and their data tokenized. All four ran to the end without the override in development (notes/issue-17.md).
@pytest.mark.parametrize("case", ["deepseek_v2_kt", "glaive_toolcall"])
def test_llamafactory_example_runs_unchanged(case, tmp_path, monkeypatch, caplog):
    out = _example(case, tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="hybridmoe"):
        assert main(["train", "train.yaml", "disable_gradient_checkpointing=true"]) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    log = read_log(out)
    assert log[-1]["step"] == 3  # 4 records, 8 micro-batches a step: 1 step an epoch, 3 epochs
    assert (out / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "runs").exists() and not (out / "wandb").exists()  # report_to: none
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "disagrees" not in warned  # template and tokenizer agree (or the template supplied the chat format)
    for key in ("dataloader_num_workers", "save_only_model") + (("use_kt",) if "kt" in case else ()):
        assert f"'{key}' has no effect here" in warned


def test_overwrite_output_dir_false_keeps_an_adapter(tmp_path, monkeypatch, capsys):
    model = make_checkpoint("qwen3_moe", tmp_path / "model")
    write_lf_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    (tmp_path / "c.yaml").write_text(f"model_name_or_path: {model}\ndataset: identity\noutput_dir: out\n"
                                     "overwrite_output_dir: false\nmax_steps: 1\ndevice: cpu\nprogress: false\n")
    assert main(["train", "c.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hybridmoe: error: output_dir 'out' already holds an adapter and overwrite_output_dir is "
                          "false")
    assert (out / "adapter_config.json").read_text() == "{}"


def test_published_files_follow_the_umask(tmp_path):
    from hybridmoe.io import atomic_replace_dir, atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_replace_dir(tmp_path / "ckpt", lambda d: (d / "f.bin").write_bytes(b"1"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640  # mkstemp alone: 0600
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o750  # mkdtemp alone: 0700
    assert stat.S_IMODE((tmp_path / "ckpt" / "f.bin").stat().st_mode) == 0o640


@pytest.mark.parametrize("case", ["qwen3moe_kt", "qwen3_lora_sft"])
def test_llamafactory_example_reads_unchanged(case, tmp_path, monkeypatch, caplog):
    from hybridmoe.loading import load_tokenizer
    from hybridmoe.train_data import build_datasets

    _example(case, tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="hybridmoe"):
        cfg = load_config("train.yaml")
        data = build_datasets(cfg, load_tokenizer(cfg.model_name_or_path))
    assert len(data.train) == 4 and data.eval is None
    assert (cfg.gradient_accumulation_steps, cfg.dtype, cfg.plot_loss, cfg.report_to) == (8, "bfloat16", True, "none")
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "disagrees" not in warned and "'dataloader_num_workers' has no effect here" in warned


# ---------------------------------------------------------------------------------------------------------------
# logging/eval/save_steps as a fraction of the total steps; logging/eval/save_strategy steps | epoch | no
# ---------------------------------------------------------------------------------------------------------------


def test_step_keys_as_fractions_follow_transformers():
    """transformers' TrainerState.compute_steps: below 1, ceil(fraction x total steps); eval_steps defaults to
    logging_steps (inheriting a fraction); whole floats become ints."""
    from hybridmoe.training import _log_due, _save_due, every_steps

    cfg = load_config({**BASE, "logging_steps": 0.1, "save_steps": 500.0, "eval_steps": 0.25})
    assert (cfg.logging_steps, cfg.save_steps, cfg.eval_steps) == (0.1, 500, 0.25)
    assert type(cfg.save_steps) is int
    assert [every_steps(0.1, t) for t in (1, 9, 10, 11, 1000)] == [1, 1, 1, 2, 100]
    assert every_steps(0.25, 10) == 3 and every_steps(7, 10) == 7 and every_steps(0, 10) == 0
    assert not any(_log_due("no", s, 1, True, 4) for s in range(1, 5))
    assert [s for s in range(1, 9) if _log_due("epoch", s, 1, s % 3 == 0, 8)] == [3, 6, 8]  # + the last step
    assert not any(_save_due("no", s, 1, True) for s in range(1, 5))
    assert [s for s in range(1, 9) if _save_due("steps", s, 3, False)] == [3, 6]
    assert not any(_save_due("steps", s, 0, True) for s in range(1, 9))


def _run_schedule(ckpt_dir, tmp_path, name, **keys):
    """8 train records, 4 a step: 2 steps an epoch, 2 epochs = 4 steps."""
    from hybridmoe import train

    out = tmp_path / name
    data = write_dataset(tmp_path / "d.jsonl", n=10)
    train({"model_name_or_path": str(ckpt_dir("qwen3_moe")), "dataset": str(data), "output_dir": str(out),
           "num_train_epochs": 2, "per_device_train_batch_size": 4,
           "val_size": 2, "per_device_eval_batch_size": 2, "device": "cpu", "dtype": "float32", "progress": False,
           "lora_rank": 2, "disable_gradient_checkpointing": True, "save_total_limit": 5, **keys})
    log = read_log(out)
    return ([r["step"] for r in log if "loss" in r], [r["step"] for r in log if "eval_loss" in r],
            sorted(p.name for p in out.glob("checkpoint-*")))


def test_fractions_and_epoch_strategies_in_a_run(ckpt_dir, tmp_path):
    # fractions of the 4 steps: logging 0.5 -> every 2, eval 0.25 -> every step, save 0.5 -> every 2 (the last
    # step's result is the adapter, not a checkpoint)
    assert _run_schedule(ckpt_dir, tmp_path, "frac", logging_steps=0.5, eval_steps=0.25, save_steps=0.5) == (
        [2, 4], [1, 2, 3, 4], ["checkpoint-2"])
    # epoch: at the step that ends each epoch (2 and 4), whatever the *_steps say; the last step is the adapter
    assert _run_schedule(ckpt_dir, tmp_path, "epoch", logging_strategy="epoch", logging_steps=1,
                         eval_strategy="epoch", eval_steps=1, save_strategy="epoch", save_steps=1) == (
        [2, 4], [2, 4], ["checkpoint-2"])
    # (strategy "no" is checked on _log_due/_save_due above)
