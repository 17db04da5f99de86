"""tokenizer.py against transformers' tokenizers and the checkpoints' own chat templates."""
import pytest

from model import load_model

STRINGS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "Thought: I think I should click on the 'Buy Now' button. Action: click[Buy Now]",
    "Observation: \"WebShop [SEP] Instruction: [SEP] i need a bottle of l'eau d'issey [SEP] Search\"",
    "ls -1 /etc | wc -l && echo 'done' > /tmp/x.txt",
    "unicode: naïve café — 東京 🙂",
    "<|endoftext|>special<|im_end|>tokens<|im_start|>",
    "```bash\nfind / -name '*.py' 2>/dev/null\n```",
]

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "Now, my problem is:\n\ncount files"},
     {"role": "assistant", "content": "Think: use ls.\n\nAct: bash\n\n```bash\nls\n```"}],
]


@pytest.mark.slow
def test_smollm2_ids_match_transformers(smollm, smollm_hf):
    """transformers builds the GGUF tokenizer with GPT-2's split; SmolLM2's own (llama.cpp 'smollm' and
    the checkpoint's tokenizer.json) also puts each digit in its own piece. Without digits the two agree
    exactly; with digits, ours must give one token per digit."""
    _, tok = smollm
    _, hf_tok = smollm_hf
    for s in STRINGS:
        assert tok.encode(s) == hf_tok.encode(s, add_special_tokens=False), s
        assert tok.decode(tok.encode(s)) == s
    digits = tok.encode("price 123456 dollars")
    assert [tok.decode([i]) for i in digits][1:7] == [" ", "1", "2", "3", "4", "5"] or \
        [tok.decode([i]) for i in digits].count("6") == 1
    assert all(len(tok.decode([i]).strip()) <= 1 for i in tok.encode("31415926"))


@pytest.mark.slow
def test_smollm2_chat_matches_its_template(smollm, smollm_hf):
    _, tok = smollm
    _, hf_tok = smollm_hf
    for chat in CHATS:
        for gen in (True, False):
            expected = hf_tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
            assert tok.apply_chat(chat, add_generation_prompt=gen) == list(expected)


def test_tiny_tokenizer_json_matches_transformers(tiny_dir, tiny_model):
    from transformers import AutoTokenizer
    _, tok = tiny_model
    hf_tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    for s in STRINGS:
        assert tok.encode(s) == hf_tok.encode(s, add_special_tokens=False)
    for chat in CHATS:
        expected = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert tok.apply_chat(chat) == list(expected)


def test_spans_cover_each_message_content_and_end_token(tiny_model):
    _, tok = tiny_model
    chat = CHATS[1]
    ids, spans = tok.apply_chat(chat, add_generation_prompt=False, return_spans=True)
    assert len(spans) == len(chat)
    end = tok.token_id("<|im_end|>")
    for (a, b), m in zip(spans, chat):
        assert ids[b - 1] == end                                # the end-of-turn token is inside the span
        assert tok.decode(ids[a:b - 1]) == m["content"]         # the content, and nothing of the header
        assert tok.decode(ids[a - 1:a]).endswith("\n")          # the header's newline is just before


def test_llama3_chat_format(tmp_path):
    """Llama-3's layout, rendered from a Llama-3 style template, equals transformers' rendering."""
    import json
    from conftest import save_tiny_llama
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer
    save_tiny_llama(tmp_path)
    t = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in
                          ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")])
    t.save(str(tmp_path / "tokenizer.json"))
    template = ("{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template}))
    _, tok = load_model(tmp_path, device="cpu")
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.chat.name == "llama3"
    for chat in CHATS:
        expected = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert tok.apply_chat(chat) == list(expected)
    assert tok.token_id("<|eot_id|>") in tok.stop_ids
