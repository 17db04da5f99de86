"""Training samples and losses of GenPI (paper section 4, appendix C.4) and of its baselines/ablations.

Each synthetic record (synth.py) holds a pseudo input x, a role-play conversation, the student's
AS-IS output y_S (no prompt), the teacher's TO-BE output y_T (with prompt) and a reason r.

- SFT  (sequence-level KD): the conversation WITHOUT the prompt; user turns masked, every agent turn
  and its end-of-turn token trained.                                   L_SFT = -log P(y_conv | x)
- PG   (prompt generation): user turn = instruction + x + y_S + y_T (masked); target = p then r.
                                                                       L_PG  = -log P(p, r | x, y_S, y_T)
- joint: L = (1 - λ)·L_PG + λ·L_SFT, two forward passes, each a token-mean cross-entropy (λ = 0.7).
- baselines: prompt prepending (SFT with p in the input, always or half the time), token-level KLD to
  the teacher (same base, adapter off, prompt given), SeqKD (SFT on single-turn teacher outputs).
- ablations: PG targets `prompt` P(p|x,y), `reason` P(r|x,y), `reason_given_prompt` P(r|p,x,y),
  `prompt_given_reason` P(p|x,y,r).
"""
import functools
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import ONEDNN_KERNELS, Linear, packed_product

IGNORE = -100  # label of a token that is not trained

PG_INSTRUCTION = ("When some context and an input were given together, the bad output below changed into the "
                  "good output. Guess the context, then explain why the output changed.")
PG_TARGETS = ("prompt+reason", "prompt", "reason", "reason_given_prompt", "prompt_given_reason")
METHODS = ("genpi", "sft", "prepend", "prepend50", "kld", "seqkd", "seqkd_kld")


@dataclass
class Sample:
    ids: list[int]
    labels: list[int]        # IGNORE where not trained; else the token itself (shifted in the loss)


def chat_sample(tok, messages, train_from: int = 0) -> Sample:
    """Token ids of a chat, trained on the assistant messages at index >= `train_from` (content and
    end-of-turn token); everything else (system, user turns, earlier shots) is masked."""
    ids, spans = tok.apply_chat(messages, add_generation_prompt=False, return_spans=True)
    labels = [IGNORE] * len(ids)
    for i, (m, (a, b)) in enumerate(zip(messages, spans)):
        if m["role"] == "assistant" and i >= train_from:
            labels[a:b] = ids[a:b]
    return Sample(ids, labels)


def sft_sample(tok, record, prompt=None) -> Sample:
    """The role-play conversation, optionally with the prompt's turns in front (prompt prepending)."""
    history = list(prompt.turns) if prompt is not None else []
    return chat_sample(tok, history + record["conversation"], train_from=len(history))


def seqkd_sample(tok, record, prompt=None) -> Sample:
    """Single turn: the user input and the teacher's (with-prompt) output y_T."""
    history = list(prompt.turns) if prompt is not None else []
    messages = history + [record["conversation"][0], {"role": "assistant", "content": record["teacher_output"]}]
    return chat_sample(tok, messages, train_from=len(history))


def pg_sample(tok, record, prompt, target: str = "prompt+reason") -> Sample:
    """Prompt generation: the masked user turn shows x, y_S and y_T; the target is p and/or r."""
    if target not in PG_TARGETS:
        raise ValueError(f"--pg-target must be one of {', '.join(PG_TARGETS)}, not {target!r}")
    p, r = prompt.text, record["reason"]
    shown = [PG_INSTRUCTION, f"Input:\n{record['input']}", f"Bad Output:\n{record['student_output']}",
             f"Good Output:\n{record['teacher_output']}"]
    if target == "reason_given_prompt":
        shown.insert(1, f"Context:\n{p}")
    if target == "prompt_given_reason":
        shown.append(f"Reason:\n{r}")
    answer = {"prompt+reason": f"Context:\n{p}\n\nReason:\n{r}", "prompt": f"Context:\n{p}",
              "reason": f"Reason:\n{r}", "reason_given_prompt": f"Reason:\n{r}",
              "prompt_given_reason": f"Context:\n{p}"}[target]
    return chat_sample(tok, [{"role": "user", "content": "\n\n".join(shown)},
                             {"role": "assistant", "content": answer}])


def build_samples(tok, records, prompt, method: str, pg_target: str, max_len: int, seed: int = 0):
    """-> (sft_samples, pg_samples, teacher_samples, report). Samples longer than `max_len` are dropped
    (never truncated: a cut PG target would never train the reason and end token) and counted."""
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    rng = random.Random(seed)
    sft, pg, teacher = [], [], []
    for rec in records:
        if method in ("seqkd", "seqkd_kld", "kld"):
            sft.append(seqkd_sample(tok, rec))
            teacher.append(seqkd_sample(tok, rec, prompt) if method != "seqkd" else None)
        elif method in ("prepend", "prepend50"):
            with_prompt = method == "prepend" or rng.random() < 0.5
            sft.append(sft_sample(tok, rec, prompt if with_prompt else None))
        else:
            sft.append(sft_sample(tok, rec))
        pg.append(pg_sample(tok, rec, prompt, pg_target) if method == "genpi" else None)
    keep = [i for i in range(len(records))
            if len(sft[i].ids) <= max_len and (pg[i] is None or len(pg[i].ids) <= max_len)
            and (not teacher or teacher[i] is None or len(teacher[i].ids) <= max_len)]
    report = {"records": len(records), "kept": len(keep), "dropped_over_max_len": len(records) - len(keep),
              "max_len": max_len}
    pick = lambda xs: [xs[i] for i in keep] if xs and any(x is not None for x in xs) else []
    return pick(sft), pick(pg), pick(teacher), report


def collate(samples, pad_id: int, device="cpu"):
    """Right-pad a list of samples -> tokens (B, T), labels (B, T) with IGNORE on padding."""
    T = max(len(s.ids) for s in samples)
    tokens = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    for i, s in enumerate(samples):
        tokens[i, :len(s.ids)] = torch.tensor(s.ids)
        labels[i, :len(s.labels)] = torch.tensor(s.labels)
    return tokens.to(device), labels.to(device)


def token_ce(logits, labels):
    """Token-mean cross-entropy: logits (B, T, V) predict labels shifted by one (B, T)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def lm_loss(model, tokens, labels):
    """token_ce(model(tokens), labels) without the (B, T, vocab) logits: only the trained positions go
    through the LM head, in chunks (linear_cross_entropy)."""
    hidden = model(tokens, head=False)                              # (B, T, dim)
    keep = labels[:, 1:] != IGNORE                                  # (B, T-1)
    head = model.lm_head
    packed = None
    if (hidden.device.type == "cpu" and hidden.dtype == head.weight.dtype == torch.bfloat16 and ONEDNN_KERNELS
            and type(head) is Linear):               # not a head with an adapter
        packed = (head.onednn_weight(), head.onednn_weight_t())
    return linear_cross_entropy(hidden[:, :-1][keep], head.weight, labels[:, 1:][keep],
                                compiled=model.compiled_training, packed=packed)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = h @ W^T, computed chunk by chunk of rows so the (N, vocab) logits
    never exist at once; the gradient for h is computed in the same pass (softmax - one-hot) @ W and
    kept, so backward only scales it. W (the frozen LM head) gets no gradient."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, compiled, packed):  # h: (N, dim), weight: (V, dim)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        for i in range(0, len(h), chunk):
            t = targets[i:i + chunk]                                # (c,)
            logits = h[i:i + chunk] @ weight.t() if packed is None else packed_product(h[i:i + chunk], packed[0])  # (c, V)
            if compiled:
                nll, grad_logits = _compiled_nll_and_grad()(logits, t)
            else:
                nll, grad_logits = _nll_and_grad(logits, t, grad_h is not None)
            total += nll.sum()
            if grad_h is not None:
                grad_h[i:i + chunk] = grad_logits @ weight if packed is None else packed_product(grad_logits, packed[1])  # (c, dim)
        n = len(h)
        ctx.save_for_backward(grad_h / n if grad_h is not None else None)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), None, None, None, None, None


def _nll_and_grad(logits, t, need_grad=True):
    """A chunk's cross-entropy per row and its gradient for the logits: logits (c, V), targets t (c,) ->
    nll (c,) fp32, and d nll / d logits = softmax - one-hot (c, V) in the logits' dtype (None without
    need_grad). In fp32 inside: one fused softmax pass; where p_t underflows, the exact form."""
    x = logits.float()                                              # (c, V)
    probs = x.softmax(-1)                                           # (c, V): one fused pass
    nll = -probs.gather(1, t[:, None])[:, 0].log()                  # (c,)
    tiny = ~torch.isfinite(nll)                                     # p_t underflowed: the exact form
    if bool(tiny.any()):
        nll[tiny] = x[tiny].logsumexp(-1) - x[tiny].gather(1, t[tiny, None])[:, 0]
    if not need_grad:
        return nll, None
    probs[torch.arange(len(t), device=x.device), t] -= 1
    return nll, probs.to(logits.dtype)


def _nll_and_grad_fused(logits, t):
    """_nll_and_grad written for inductor, which fuses it into two passes over the chunk (the bf16 logits in,
    the bf16 gradient out, no fp32 copy of either): logsumexp - logit_t, exact everywhere, and
    exp(logit - logsumexp) - one-hot. A 128-row chunk of SmolLM2's 49,152 logits on the 2-core Xeon, with
    its two matmuls: 16.7-17.9 against 27.2-29.5 ms eager (written this way, eager took 57-59 ms)."""
    x = logits.float()                                              # (c, V)
    lse = x.logsumexp(-1, keepdim=True)                             # (c, 1)
    nll = lse[:, 0] - x.gather(1, t[:, None])[:, 0]                 # (c,)
    one_hot = torch.arange(x.shape[1], device=x.device) == t[:, None]             # (c, V)
    return nll, ((x - lse).exp() - one_hot.float()).to(logits.dtype)


@functools.cache
def _compiled_nll_and_grad():
    return torch.compile(_nll_and_grad_fused, dynamic=True)


def linear_cross_entropy(h, weight, targets, chunk: int = 512, compiled: bool = False, packed=None):
    """F.cross_entropy(h @ weight.T, targets) for h (N, dim) and a frozen weight (vocab, dim), in chunks
    of rows. Measured on SmolLM2 (vocab 49,152), 2 CPU threads: saves the full-vocabulary log-softmax
    and its backward over a (B*T, vocab) tensor (~0.7 s of a 9 s step of 1,024 tokens).
    Fewer, larger products pay, as long as freed memory is reused (`model.keep_freed_memory`, which train.py
    calls: otherwise chunks over glibc's 32 MB mmap threshold, 256 rows and more, come fresh from the OS each
    time, with 220,000-330,000 page faults per QLoRA step on the 2-core Xeon). With it, 1,800 rows of SmolLM2
    forward + backward in bf16 on that Xeon, best of 3, twice: 64 rows 417-432 ms, 128 rows 325-338 ms, 256
    rows 281-294 ms. On the 2-core AMD EPYC (32 MB L3, no AMX; the 57-MB head is read from memory once per
    chunk and product), 2,044 rows compiled, best of 2, three times: 128 rows 761-769 ms, 256 680-687 ms, 512
    643-651 ms, 1,024 637-656 ms. Chunks of 512 rows: their fp32 logits take 100 MB.
    `compiled` (lm_loss: with the blocks compiled for training): each chunk's softmax and gradient through
    inductor (_nll_and_grad_fused): a QLoRA step of 4 x 512 tokens 1.02x faster (2.69 against 2.74 s, medians
    of 6 alternating steps).
    `packed` (lm_loss: a bf16 head on a CPU): the weight and its transpose reordered for oneDNN once
    (model.Linear.onednn_weight, onednn_weight_t), for the two products of each chunk; a plain bf16 product
    reorders the weight on every call. 2,044 rows of SmolLM2 in chunks of 512 on the 2-core AMD EPYC, best of 2,
    three times: 600-605 against 677-700 ms."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy computes no gradient for the LM head; freeze it")
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, compiled, packed)


def joint_loss(pg_loss, sft_loss, lam: float):
    """GenPI: L = (1 - λ)·L_PG + λ·L_SFT."""
    return (1 - lam) * pg_loss + lam * sft_loss


def trained_logits(logits, labels):
    """The logits that predict trained tokens, in order: (N, V)."""
    keep = labels[:, 1:] != IGNORE                                  # (B, T-1)
    return logits[:, :-1][keep]


def kld_loss(student_logits, student_labels, teacher_logits, teacher_labels):
    """Token-level KL(teacher || student) over the agent tokens. The student sees the conversation
    without the prompt, the teacher with it; their trained tokens are the same text, so they align."""
    s = trained_logits(student_logits, student_labels).float()     # (N, V)
    t = trained_logits(teacher_logits, teacher_labels).float()     # (N, V)
    if s.shape != t.shape:
        raise ValueError(f"student and teacher trained tokens differ: {tuple(s.shape)} vs {tuple(t.shape)}")
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
