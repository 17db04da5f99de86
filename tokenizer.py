"""Tokenizer and chat formats: byte-level BPE (via the `tokenizers` library) plus the two chat layouts.

The engine half of the project (with model.py). It builds the tokenizer from a Hugging Face
`tokenizer.json` or from a GGUF file's vocabulary and merges, and renders chats in the layout of the
checkpoint: Llama-3 (`<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>`) or ChatML
(`<|im_start|>role\n...<|im_end|>\n`, SmolLM2). `apply_chat` also says which tokens belong to which
message, which training needs to mask user turns (paper section 4: the SFT loss trains agent turns only).

    tok = Tokenizer.from_file("path/to/tokenizer.json", "path/to/tokenizer_config.json")
    ids, spans = tok.apply_chat([{"role": "user", "content": "hi"}], return_spans=True)
"""
import json
import re
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers


@dataclass
class ChatFormat:
    """How one checkpoint writes a conversation. `default_system` is what its template inserts when
    the first message is not a system message (SmolLM2's does; Llama-3's does not)."""
    name: str                   # "chatml" or "llama3"
    begin: str                  # text before the first message
    header: str                 # format string with {role}
    end_of_turn: str            # closes a message (its first token is the stop token)
    default_system: str | None = None

    def render(self, messages, add_generation_prompt=True):
        """The chat as text, plus (start, end) character spans of each message's trained part:
        its content and the end-of-turn token (not the role header)."""
        if self.default_system is not None and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
            n_added = 1
        else:
            n_added = 0
        text, spans = self.begin, []
        for m in messages:
            text += self.header.format(role=m["role"])
            content = m["content"].strip() if self.name == "llama3" else m["content"]
            start = len(text)
            text += content + self.end_of_turn
            spans.append((start, len(text) - len(self.end_of_turn) + len(self.stop_token)))
        if add_generation_prompt:
            text += self.header.format(role="assistant")
        return text, spans[n_added:]

    @property
    def stop_token(self):
        return self.end_of_turn.split(">", 1)[0] + ">"


LLAMA3 = ChatFormat("llama3", "<|begin_of_text|>", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>")
CHATML = ChatFormat("chatml", "", "<|im_start|>{role}\n", "<|im_end|>\n")


def chat_format_from_template(template: str | None, vocab: dict) -> ChatFormat:
    """Pick the chat layout from a checkpoint's Jinja chat template (or, failing that, its vocabulary)."""
    template = template or ""
    if "<|start_header_id|>" in template or ("<|start_header_id|>" in vocab and "<|im_start|>" not in template):
        return LLAMA3
    if "<|im_start|>" in template or "<|im_start|>" in vocab:
        match = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, re.S)
        if match and "messages[0]['role'] != 'system'" in template:  # SmolLM2 adds its own system line
            return ChatFormat(**{**CHATML.__dict__, "default_system": match.group(1).replace("\\n", "\n")})
        return CHATML
    raise ValueError("cannot tell the chat format: the chat template names neither <|im_start|> nor "
                     "<|start_header_id|>; only ChatML and Llama-3 chats are supported")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the checkpoint's special ids and chat format."""

    def __init__(self, backend: HFTokenizer, chat: ChatFormat, bos_id=None, eos_id=None, add_bos=False):
        self.backend, self.chat, self.add_bos = backend, chat, add_bos
        self.bos_id, self.eos_id = bos_id, eos_id
        stops = {eos_id, backend.token_to_id(chat.stop_token), backend.token_to_id("<|end_of_text|>")}
        self.stop_ids = sorted(i for i in stops if i is not None)  # generation ends on any of these
        self.vocab_size = backend.get_vocab_size()

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_file(cls, tokenizer_json, tokenizer_config_json=None):
        """From a Hugging Face `tokenizer.json` (+ `tokenizer_config.json` for the chat template)."""
        backend = HFTokenizer.from_file(str(tokenizer_json))
        config = {}
        if tokenizer_config_json is not None:
            with open(tokenizer_config_json) as f:
                config = json.load(f)
        def special_id(key):
            tok = config.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return backend.token_to_id(tok) if tok else None
        chat = chat_format_from_template(config.get("chat_template"), backend.get_vocab())
        add_bos = chat.name != "llama3" and bool(config.get("add_bos_token", False))  # llama3 chat writes its own
        return cls(backend, chat, special_id("bos_token"), special_id("eos_token"), add_bos)

    @classmethod
    def from_gguf_fields(cls, fields: dict):
        """From GGUF metadata (`tokenizer.ggml.*`): byte-level BPE vocabulary and merges.

        The split regex follows llama.cpp's `tokenizer.ggml.pre` (what the vocabulary was trained with):
        'smollm' (and starcoder-style vocabularies) put every digit in its own piece; 'llama-bpe' uses
        Llama-3's regex; anything else falls back to GPT-2's."""
        if fields.get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"only byte-level BPE (gpt2) GGUF tokenizers are supported, "
                             f"not {fields.get('tokenizer.ggml.model')!r}")
        tokens = fields["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        pre = fields.get("tokenizer.ggml.pre", "default")
        if pre in ("smollm", "starcoder", "refact", "codeshell"):
            backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe"):
            split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        token_types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, kind in zip(tokens, token_types) if kind == 3])  # 3 = control
        chat = chat_format_from_template(fields.get("tokenizer.chat_template"), vocab)
        return cls(backend, chat, fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.eos_token_id"),
                   bool(fields.get("tokenizer.ggml.add_bos_token", False)) and chat.name != "llama3")

    # --- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str, add_bos=None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special=False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def apply_chat(self, messages, add_generation_prompt=True, return_spans=False):
        """Token ids of a chat in the checkpoint's format. With `return_spans`, also one (start, end)
        token range per message covering its content and its end-of-turn token (what SFT trains on an
        agent turn); the role header is outside the span."""
        for i, m in enumerate(messages):
            if set(m) < {"role", "content"} or m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"message {i} needs a 'role' (system/user/assistant) and a 'content': {m!r}")
        text, char_spans = self.chat.render(messages, add_generation_prompt)
        enc = self.backend.encode(text, add_special_tokens=False)
        ids = enc.ids
        if self.add_bos and self.bos_id is not None and not self.chat.begin:
            ids = [self.bos_id] + ids
        if not return_spans:
            return ids
        shift = len(ids) - len(enc.ids)
        starts = [o[0] for o in enc.offsets]
        spans = []
        for lo, hi in char_spans:  # first token starting at/after lo, first token starting at/after hi
            a = next(i for i, s in enumerate(starts) if s >= lo)
            b = next((i for i, s in enumerate(starts) if s >= hi), len(starts))
            spans.append((a + shift, b + shift))
        return ids, spans
