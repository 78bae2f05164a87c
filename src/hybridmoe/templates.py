"""LLaMA-Factory's `template:` names, mapped to the chat formats of the architectures hybridmoe trains.

LLaMA-Factory renders conversations with its own template objects and replaces the tokenizer's Jinja template with
them. hybridmoe renders with the tokenizer's chat template, the one the model was released with and the one `chat`,
`serve` and vLLM use after export, so training and inference see the same text. `template:` therefore

- is checked against the tokenizer's template: when that renders a different format, one warning names both and the
  tokenizer's template is used;
- supplies a chat template (with ``{% generation %}`` markers, so the labels are exact) when the tokenizer has none;
- passes its switches to the template: ``qwen3_nothink`` renders with ``enable_thinking=False``.

An unknown name is an error that lists the known ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .errors import ConfigError

log = logging.getLogger("hybridmoe")

_NO_TOOLS = ("{%- if tools or messages | selectattr('tool_calls') | list %}"
             "{{- raise_exception('this chat template has no tool-calling format; use the tokenizer\\'s own "
             "template (chat_template) for tool data') }}{%- endif %}")

# ChatML as Qwen2.5/Qwen3 render it, tool calls as <tool_call> JSON, tool results as <tool_response> in a user turn.
_CHATML = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{%- generation %}"
    "{{- message.content or '' }}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}"
    "{%- if call.function.arguments is string %}{{- call.function.arguments }}"
    "{%- else %}{{- call.function.arguments | tojson }}{%- endif %}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_LLAMA3 = _NO_TOOLS + (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- generation %}{{- message.content + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + "
    "'<|eot_id|>' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# DeepSeek-V2 chat: "User: ...\n\nAssistant: ...<eos>", the system prompt first.
_DEEPSEEK = _NO_TOOLS + (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message.role == 'system' %}{{- message.content + '\\n\\n' }}"
    "{%- elif message.role == 'user' %}{{- 'User: ' + message.content + '\\n\\n' }}"
    "{%- else %}{{- 'Assistant: ' }}{%- generation %}{{- message.content + eos_token }}{%- endgeneration %}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"
)

# DeepSeek-V3 / R1: <｜User｜>...<｜Assistant｜>...<eos>
_DEEPSEEK3 = _NO_TOOLS + (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message.role == 'system' %}{{- message.content }}"
    "{%- elif message.role == 'user' %}{{- '<｜User｜>' + message.content }}"
    "{%- else %}{{- '<｜Assistant｜>' }}{%- generation %}{{- message.content + eos_token }}{%- endgeneration %}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<｜Assistant｜>' }}{%- endif %}"
)

# Mistral/Mixtral: [INST] system\n\nuser[/INST] reply</s>
_MISTRAL = _NO_TOOLS + (
    "{{- bos_token }}{%- set ns = namespace(system='') %}{%- for message in messages %}"
    "{%- if message.role == 'system' %}{%- set ns.system = message.content + '\\n\\n' %}"
    "{%- elif message.role == 'user' %}{{- '[INST] ' + ns.system + message.content + '[/INST]' }}"
    "{%- set ns.system = '' %}"
    "{%- else %}{{- ' ' }}{%- generation %}{{- message.content + eos_token }}{%- endgeneration %}"
    "{%- endif %}{%- endfor %}"
)

# GLM-4 / GLM-4.5 (MoE): [gMASK]<sop><|system|>\n...<|user|>\n...<|assistant|>\n...
_GLM4 = _NO_TOOLS + (
    "{{- '[gMASK]<sop>' }}{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- '<|assistant|>\\n' }}"
    "{%- generation %}{{- message.content }}{%- if loop.last %}{{- eos_token }}{%- endif %}{%- endgeneration %}"
    "{%- else %}{{- '<|' + message.role + '|>\\n' + message.content }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)

# gpt-oss (harmony): replies on the final channel; the last one ends with <|return|>, earlier ones with <|end|>.
_HARMONY = _NO_TOOLS + (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- '<|start|>assistant<|channel|>final<|message|>' }}"
    "{%- generation %}{{- message.content }}{{- '<|return|>' if loop.last else '<|end|>' }}{%- endgeneration %}"
    "{%- else %}{{- '<|start|>' + message.role + '<|message|>' + message.content + '<|end|>' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    family: str
    description: str
    marker: str  # text a rendering of a user turn in this format contains
    jinja: str  # used when the tokenizer has no chat template


FORMATS: dict[str, ChatFormat] = {f.family: f for f in (
    ChatFormat("chatml", "ChatML (<|im_start|>, Qwen)", "<|im_start|>user", _CHATML),
    ChatFormat("llama3", "Llama 3 (<|start_header_id|>)", "<|start_header_id|>user", _LLAMA3),
    ChatFormat("deepseek3", "DeepSeek-V3 (<｜User｜>)", "<｜User｜>", _DEEPSEEK3),
    ChatFormat("mistral", "Mistral ([INST])", "[INST]", _MISTRAL),
    ChatFormat("glm4", "GLM-4 (<|user|>)", "<|user|>", _GLM4),
    ChatFormat("harmony", "gpt-oss harmony (<|start|>user)", "<|start|>user", _HARMONY),
    ChatFormat("deepseek", "DeepSeek-V2 (User: / Assistant:)", "User: ", _DEEPSEEK),  # generic marker: last
)}


@dataclass(frozen=True)
class Template:
    name: str
    family: str
    kwargs: dict = field(default_factory=dict)  # extra apply_chat_template arguments


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("qwen", "chatml"),
    Template("qwen3", "chatml"),
    Template("qwen3_nothink", "chatml", {"enable_thinking": False}),
    Template("qwen3_5", "chatml"),
    Template("qwen3_5_nothink", "chatml", {"enable_thinking": False}),
    Template("chatml", "chatml"),
    Template("llama3", "llama3"),
    Template("deepseek", "deepseek"),
    Template("deepseek3", "deepseek3"),
    Template("deepseekr1", "deepseek3"),
    Template("mistral", "mistral"),
    Template("glm4", "glm4"),
    Template("glm4_moe", "glm4"),
    Template("gpt_oss", "harmony"),
    Template("gpt", "harmony"),  # short names people use for gpt-oss
    Template("harmony", "harmony"),
)}


def check_template_name(name: str) -> Template:
    if name not in TEMPLATES:
        raise ConfigError(f"template '{name}' is not one hybridmoe knows; known: {', '.join(TEMPLATES)} (or leave "
                          "template out: the tokenizer's own chat template is used)")
    return TEMPLATES[name]


def detect_family(tokenizer) -> str | None:
    """The chat format the tokenizer's template renders (by its user-turn marker), or None if unrecognised."""
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that needs more than a plain exchange: it is its own, unrecognised format
        return None
    for fmt in FORMATS.values():
        if fmt.marker in text:
            return fmt.family
    return None


def apply_template(tokenizer, name: str | None) -> dict:
    """Reconcile `template:` with the tokenizer (see the module docstring); returns chat-template kwargs.

    `enable_thinking` from the config, when set, is added by the caller and wins over the template's."""
    if name is None:
        return {}
    tpl = check_template_name(name)
    want = FORMATS[tpl.family]
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = want.jinja
        log.info("the tokenizer has no chat template: using template '%s' (%s)", name, want.description)
        return dict(tpl.kwargs)
    have = detect_family(tokenizer)
    if have != tpl.family:
        seen = FORMATS[have].description if have else "a format hybridmoe does not recognise"
        log.warning("template '%s' (%s) disagrees with the tokenizer's own chat template, which renders %s; training "
                    "uses the tokenizer's template, as chat, serve and vLLM will (set chat_template to use another)",
                    name, want.description, seen)
    return dict(tpl.kwargs)
