"""Shared test fixtures: tiny random Llama checkpoints saved by `transformers`, and the embedded SmolLM2."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                   "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_tokenizer_files(directory: Path):
    """A byte-level BPE with the 256 byte symbols, a few merges and ChatML specials, as tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("o", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}))
    return tok.get_vocab_size()


def save_tiny_llama(directory: Path, *, rope_scaling=None, tie=False, seed=0, **overrides):
    """Save a random tiny LlamaForCausalLM in the Hugging Face layout; returns the transformers model (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    directory.mkdir(parents=True, exist_ok=True)
    vocab = tiny_tokenizer_files(directory)
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
              tie_word_embeddings=tie)
    kw.update(overrides)
    config = LlamaConfig(**kw)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0} if rope_scaling is None else \
        {"rope_theta": 10000.0, **rope_scaling}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(d)
    return d


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from model import load_model
    return load_model(tiny_dir, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def smollm_path():
    from model import CheckpointError, embedded_model_path
    try:
        return embedded_model_path()
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm(smollm_path):
    from model import load_model
    return load_model(smollm_path, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def smollm_hf(smollm_path):
    """transformers' own reading of the same GGUF file (dequantized to fp32): the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    return model.eval(), tok
