"""LLaMA-Factory's training keys: which ones hybridmoe implements, which it accepts without effect, and why.

A LLaMA-Factory SFT YAML is parsed by HfArgumentParser over five dataclasses (ModelArguments, DataArguments,
TrainingArguments = transformers' Seq2SeqTrainingArguments + extras, FinetuningArguments, GeneratingArguments).
Every key of that set falls in one of three classes here:

- **implemented**: a :class:`~hybridmoe.config.TrainConfig` field (or an alias of one, :data:`ALIASES`);
- **ignored**: accepted, with one warning naming the key and why it has no effect here (:data:`IGNORED`);
- **refused**: accepted at LLaMA-Factory's default value (which describes what hybridmoe does anyway, so no
  warning), an error at any other value, because training would silently become a different method
  (:data:`REFUSED`: DoRA, GaLore, a bitsandbytes quantization, ...).

Anything else is an unknown key; all of them are reported at once, each with its closest known key.
The table was taken from LLaMA-Factory's ``src/llamafactory/hparams/*.py`` (2026-08) and transformers 5.17's
``Seq2SeqTrainingArguments``, plus a few keys older transformers releases had, which old YAMLs still carry.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from .errors import ConfigError

# LLaMA-Factory / transformers names for a TrainConfig field.
ALIASES: dict[str, str] = {
    "evaluation_strategy": "eval_strategy",  # transformers < 4.46
}

# LLaMA-Factory keys that set a TrainConfig field with another meaning of the value.
TRANSLATED = {
    "disable_gradient_checkpointing": lambda v: ("gradient_checkpointing", not v),
}

# -- ignored keys, grouped by the reason they have no effect -----------------------------------------------------------
_KT = ("hybridmoe keeps the routed experts in CPU RAM and runs them itself (KTransformers is not used; int8 experts: "
       "expert_dtype: int8)")
_LOOP = "hybridmoe runs its own training loop, not the transformers Trainer, which this setting configures"
_DATALOADER = ("examples are tokenized up front and batched in the training process; there is no DataLoader to "
               "configure")
_HUB = "hybridmoe works offline: models, datasets and adapters are local directories"
_MULTIMODAL = "hybridmoe trains text-only models"
_INFER = "an inference/export setting; use `hybridmoe chat`, `serve` or `export` for that"
_GEN = "a generation setting; training never generates (set sampling per request in chat/serve)"
_OTHER_METHOD = "a setting of a method hybridmoe does not run (it trains LoRA SFT only)"
_ATTENTION = "attention is the model's own transformers implementation (sdpa)"
_DIST = "several ranks are launched by `hybridmoe train --nproc N` or torchrun; see the README"
_TRACKER = "of the trackers only tensorboard and wandb are supported (report_to)"
_PROFILER = "no profiler hook; run under torch.profiler or nsys yourself"

_IGNORED_GROUPS: list[tuple[str, tuple[str, ...]]] = [
    (_KT, ("use_kt", "kt_config")),  # every other kt_* key too: see _reason
    (_DATALOADER, ("dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
                   "dataloader_prefetch_factor", "dataloader_drop_last", "dataloader_multiprocessing_context",
                   "dataloader_in_order", "remove_unused_columns", "label_names", "length_column_name",
                   "group_by_length", "train_sampling_strategy", "preprocessing_batch_size", "buffer_size",
                   "data_shared_file_system", "tokenized_path", "ignore_pad_token_for_loss", "sortish_sampler")),
    (_LOOP, ("save_only_model", "save_on_each_node", "save_safetensors", "log_on_each_node", "logging_first_step",
             "logging_nan_inf_filter", "log_level", "log_level_replica", "include_num_input_tokens_seen",
             "include_tokens_per_second", "include_effective_tokens_per_second", "skip_memory_metrics",
             "torch_empty_cache_steps", "auto_find_batch_size", "ignore_data_skip",
             "restore_callback_states_from_checkpoint", "enable_jit_checkpoint", "load_best_model_at_end",
             "metric_for_best_model", "greater_is_better", "prediction_loss_only", "eval_on_start", "eval_delay",
             "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps", "include_for_metrics",
             "include_inputs_for_metrics", "batch_eval_metrics", "predict_with_generate",
             "generation_max_length", "generation_num_beams", "generation_config", "average_tokens_across_devices",
             "full_determinism", "data_seed", "debug", "accelerator_config", "parallelism_config", "use_cpu",
             "no_cuda", "use_mps_device", "use_ipex", "jit_mode_eval", "past_index", "half_precision_backend",
             "split_batches", "dispatch_batches", "torchdynamo", "torch_compile", "torch_compile_backend",
             "torch_compile_mode", "use_cache", "lr_scheduler_kwargs", "optim_args",
             "optim_target_modules", "tf32", "bf16_full_eval", "fp16_full_eval", "print_param_status",
             "compute_accuracy", "early_stopping_steps", "disable_shuffling", "eval_num_beams",
             "eval_on_each_dataset", "project", "run_name", "low_cpu_mem_usage", "use_fast_tokenizer",
             "model_revision", "cache_dir", "offload_folder", "device_map", "model_max_length",
             "gradient_checkpointing_kwargs", "use_reentrant_gc", "upcast_layernorm", "upcast_lmhead_output",
             "moe_aux_loss_coef", "compute_dtype", "use_v1_kernels", "pure_bf16", "label_smoothing_factor",
             "neftune_noise_alpha")),
    (_HUB, ("push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push",
            "hub_revision", "hf_hub_token", "ms_hub_token", "om_hub_token", "trackio_space_id", "trackio_bucket_id",
            "trackio_static_space_id", "export_hub_model_id")),
    (_MULTIMODAL, ("media_dir", "image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches",
                   "video_max_pixels", "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video",
                   "audio_sampling_rate", "freeze_vision_tower", "freeze_multi_modal_projector",
                   "freeze_language_model")),
    (_INFER, ("infer_backend", "infer_dtype", "use_kv_cache", "export_dir", "export_size", "export_device",
              "export_quantization_bit", "export_quantization_dataset", "export_quantization_nsamples",
              "export_quantization_maxlen", "export_legacy_format", "vllm_maxlen", "vllm_gpu_util",
              "vllm_enforce_eager", "vllm_max_lora_rank", "vllm_config", "sglang_maxlen", "sglang_mem_fraction",
              "sglang_tp_size", "sglang_config", "sglang_lora_backend", "adapter_folder")),
    (_GEN, ("do_sample", "temperature", "top_p", "top_k", "num_beams", "max_length", "max_new_tokens",
            "repetition_penalty", "length_penalty", "skip_special_tokens")),
    (_OTHER_METHOD, ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules", "module_dropout",
                     "oft_rank", "oft_block_size", "oft_target", "pref_beta", "pref_ftx", "pref_bco_weight",
                     "pref_loss", "dpo_label_smoothing", "kto_chosen_weight", "kto_rejected_weight", "simpo_gamma",
                     "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target", "ppo_whiten_rewards",
                     "ref_model", "ref_model_adapters", "ref_model_quantization_bit", "reward_model",
                     "reward_model_adapters", "reward_model_quantization_bit", "reward_model_type", "ld_alpha",
                     "galore_target", "galore_rank", "galore_update_interval", "galore_scale", "galore_proj_type",
                     "galore_layerwise", "apollo_target", "apollo_rank", "apollo_update_interval", "apollo_scale",
                     "apollo_proj", "apollo_proj_type", "apollo_scale_type", "apollo_layerwise", "apollo_scale_front",
                     "badam_mode", "badam_start_block", "badam_switch_mode", "badam_switch_interval",
                     "badam_update_ratio", "badam_mask_mode", "badam_verbose", "pissa_iter", "pissa_convert",
                     "loraplus_lr_embedding", "asft_alpha", "eaft_alpha", "quantization_method",
                     "quantization_type", "double_quantization", "quantization_device_map", "megatron_bridge_args",
                     "hyper_parallel_args", "hyper_parallel_cp_size", "init_special_tokens",
                     "new_special_tokens_config")),
    (_ATTENTION, ("flash_attn", "shift_attn", "rope_scaling", "block_diag_attn")),
    (_DIST, ("local_rank", "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers",
             "ddp_static_graph", "ddp_backend", "fsdp", "fsdp_config", "fsdp_min_num_params",
             "fsdp_transformer_layer_cls_to_wrap", "deepspeed", "ray_num_workers", "ray_init_kwargs", "ray_scope",
             "master_addr", "master_port")),
    (_TRACKER, ("use_swanlab", "swanlab_project", "swanlab_workspace", "swanlab_run_name", "swanlab_mode",
                "swanlab_api_key", "swanlab_logdir", "swanlab_lark_webhook_url", "swanlab_lark_secret")),
    (_PROFILER, ("enable_torch_profiler", "profiler_output_dir", "profiler_wait_steps", "profiler_warmup_steps",
                 "profiler_active_steps", "profiler_repeat", "profiler_record_shapes", "profiler_profile_memory",
                 "profiler_with_stack", "profile_modules")),
]

# Keys with their own reason.
_IGNORED_SINGLE: dict[str, str] = {
    "optim": "the optimizer is always fused AdamW over the LoRA tensors on both devices",
    "fp16": "float16 is not supported (its range overflows in MoE layers); bf16: true or dtype: float32",
    "tool_format": "tools are rendered by the tokenizer's chat template (the `tools` column goes to it as is)",
    "resize_vocab": "the vocabulary is the checkpoint's; new tokens are not trained",
    "add_tokens": "the vocabulary is the checkpoint's; new tokens are not trained",
    "add_special_tokens": "the vocabulary is the checkpoint's; new tokens are not trained",
    "split_special_tokens": "special tokens are never split (the tokenizer's default)",
    "create_new_adapter": "resume_from_checkpoint continues an adapter; a new run starts a new one",
    "adapter_name_or_path": ("starting from an existing adapter is not supported; resume_from_checkpoint continues "
                             "one of this run's checkpoints"),
    "preserve_thinking": "reasoning text is kept as the chat template renders it",
    "streaming": "datasets are read into memory (tokenized ids take ~8 bytes a token)",
}

# Refused unless at LLaMA-Factory's default: key -> (default, why a different value cannot be honoured).
REFUSED: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA is not implemented for the routed experts"),
    "use_rslora": (False, "rank-stabilised scaling is not implemented for the routed experts"),
    "pissa_init": (False, "PiSSA initialisation is not implemented"),
    "loraplus_lr_ratio": (None, "LoRA+ learning rates are not implemented"),
    "additional_target": (None, "only LoRA tensors train; modules_to_save is not supported"),
    "use_galore": (False, "GaLore is a full fine-tuning optimizer; hybridmoe trains LoRA"),
    "use_apollo": (False, "APOLLO is a full fine-tuning optimizer; hybridmoe trains LoRA"),
    "use_badam": (False, "BAdam is a full fine-tuning optimizer; hybridmoe trains LoRA"),
    "use_adam_mini": (False, "the optimizer is fused AdamW"),
    "use_muon": (False, "the optimizer is fused AdamW"),
    "use_llama_pro": (False, "LLaMA Pro block expansion is not supported"),
    "use_unsloth": (False, "unsloth's kernels are not used"),
    "use_unsloth_gc": (False, "unsloth's kernels are not used"),
    "enable_liger_kernel": (False, "liger kernels are not used (the loss is already chunked, see loss.py)"),
    "use_liger_kernel": (False, "liger kernels are not used (the loss is already chunked, see loss.py)"),
    "liger_kernel_config": (None, "liger kernels are not used"),
    "use_dft_loss": (False, "only the cross-entropy SFT loss is implemented"),
    "use_asft_loss": (False, "only the cross-entropy SFT loss is implemented"),
    "use_eaft_loss": (False, "only the cross-entropy SFT loss is implemented"),
    "quantization_bit": (None, "bitsandbytes quantization is not supported; expert_dtype: int8 quantizes the routed "
                               "experts (half the host RAM)"),
    "packing": (None, "packing several examples into one sequence is not implemented; each example is its own row"),
    "neat_packing": (False, "packing is not implemented"),
    "mixture_of_depths": (None, "mixture-of-depths conversion is not supported"),
    "train_from_scratch": (False, "LoRA needs the pretrained weights"),
    "use_mca": (False, "Megatron-Core training is not supported"),
    "use_megatron_bridge": (False, "Megatron training is not supported"),
    "use_hyper_parallel": (False, "hyper-parallel training is not supported"),
    "fp8": (False, "fp8 training is not supported"),
    "fp8_backend": ("auto", "fp8 training is not supported"),
    "fp8_enable_fsdp_float8_all_gather": (False, "fp8 training is not supported"),
    "do_predict": (False, "prediction with generation is not part of training; use `hybridmoe chat` or `serve`"),
}

IGNORED: dict[str, str] = {k: reason for reason, keys in _IGNORED_GROUPS for k in keys}
IGNORED.update(_IGNORED_SINGLE)


def _reason(key: str) -> str | None:
    """Why `key` has no effect here, or None when it is not an ignored key."""
    if key in IGNORED:
        return IGNORED[key]
    if key.startswith("kt_"):  # KTransformers' keys change between releases; they all configure its backend
        return _KT
    return None


def classify(data: dict[str, Any], fields: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """Split a raw config mapping into TrainConfig kwargs and warnings (one per ignored key, in YAML order).

    Raises:
        ConfigError: for refused keys at a non-default value, and once for all unknown keys, each with its closest
        known key.
    """
    fields = set(fields)
    kwargs: dict[str, Any] = {}
    warnings: list[str] = []
    unknown: list[str] = []
    for key, value in data.items():
        name = ALIASES.get(key, key)
        if name in fields:
            kwargs[name] = value
        elif key in TRANSLATED:
            field_name, field_value = TRANSLATED[key](value)
            kwargs[field_name] = field_value
        elif key in REFUSED:
            default, why = REFUSED[key]
            if value != default and not (default is None and value is False):
                raise ConfigError(f"config key '{key}: {value}' is not supported: {why}; remove the key")
        elif (why := _reason(key)) is not None:
            warnings.append(f"config key '{key}' has no effect here: {why}")
        else:
            unknown.append(key)
    if unknown:
        known = sorted(known_keys(fields))
        close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        if len(unknown) == 1:
            (key,) = unknown
            hint = f"; did you mean '{close[key][0]}'?" if close[key] else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        hints = [f"'{k}'" + (f" (did you mean '{close[k][0]}'?)" if close[k] else "") for k in unknown]
        raise ConfigError(f"unknown config keys: {', '.join(hints)}")
    return kwargs, warnings


def known_keys(fields: Iterable[str]) -> set[str]:
    """Every key a config may carry (implemented, aliased, ignored, refused); kt_* keys are accepted by prefix."""
    return set(fields) | set(ALIASES) | set(TRANSLATED) | set(IGNORED) | set(REFUSED)
