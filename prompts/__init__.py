r"""Agent prompt files: the fixed prompt p that GenPI internalizes, read into chat turns.

The three shipped files are the AgentBench v0.2 agent prompts of the paper's appendix B: os.txt
(figure 5, OS Interaction, 1-shot), mind2web.txt (figure 6, Web Browsing, 3-shot) and webshop.txt
(figure 7, Web Shopping, 1-shot), with AgentBench's own text where the paper's OCR is damaged. Two
changes to AgentBench's OS text: its literal backslash-n pair "\n\n" (a quoting slip) before "Now, my
problem is:" is a real blank line, and a trailing space is dropped. WebShop's clickables lists are "..."
in AgentBench's shot itself, so they stay "...".

Format (METHOD.md, "Prompt file format"): each turn opens with a marker line, `<USER>:` or
`<AGENT>:`, alone on its line; the turn's text follows; turns are separated by blank lines. Blank
lines at the start and end of a turn are dropped, everything between is kept as written (so a turn
may hold blank lines and code fences). Turns alternate, the first is `<USER>:`,
and the last `<USER>:` block is the slot for the new user input: its text (possibly empty) is a
prefix joined to every input, with a blank line when the prefix is not empty (OS: "... My problem
is:\n\n" + input) and with nothing when it is empty (the web tasks, whose environments write the
whole user message, e.g. WebShop's "Observation:\n...\n\nAvailable Actions:\n...").

    p = load_prompt("os")                       # or load_prompt("path/to/file.txt")
    p.messages("list the files in /tmp")        # chat history + the new user message, no system message
    p.text                                      # the prompt as one string: the PG loss target (section 4)
"""
import os
from dataclasses import dataclass

USER, AGENT = "<USER>:", "<AGENT>:"
ROLE_OF = {USER: "user", AGENT: "assistant"}
MARKER_OF = {"user": USER, "assistant": AGENT}
PROMPT_DIR = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ("os", "webshop", "mind2web")


class PromptFileError(ValueError):
    """A prompt file that cannot be used: names the file, the line (when there is one) and the problem."""

    def __init__(self, source, line, problem):
        self.source, self.line, self.problem = source, line, problem
        where = f"{source}, line {line}" if line else str(source)
        super().__init__(f"{where}: {problem}")


@dataclass
class AgentPrompt:
    turns: list[dict]   # the history before the input slot: {"role": "user" | "assistant", "content": str}
    input_prefix: str   # text of the last <USER>: block, put before every new input ("" for none)
    joiner: str         # between prefix and input: "\n\n" after a non-empty prefix, else ""
    path: str           # the file it came from ("<string>" when parsed from text)
    name: str           # file name without extension: "os", "webshop", "mind2web"
    text: str           # the prompt in canonical file form (markers included, input slot last, no final
                        # newline): what the PG loss asks the student to regenerate as the context p

    def user_message(self, user_input: str) -> str:
        """The new user turn: prefix + joiner + input."""
        return self.input_prefix + self.joiner + user_input

    def messages(self, user_input: str) -> list[dict]:
        """The chat the agent answers: the prompt's turns, then the new user message."""
        return [dict(t) for t in self.turns] + [{"role": "user", "content": self.user_message(user_input)}]


def format_prompt(turns: list[dict], input_prefix: str) -> str:
    """Write turns and input slot in the file format (the inverse of parse_prompt, without final newline)."""
    blocks = [MARKER_OF[t["role"]] + "\n" + t["content"] for t in turns]
    blocks.append(USER + ("\n" + input_prefix if input_prefix else ""))
    return "\n\n".join(blocks)


def _strip_blank_lines(lines: list[str]) -> str:
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return "\n".join(lines[start:end])


def _split_blocks(text: str, source: str) -> list[tuple[str, int, str]]:
    """(marker, line number, content) for every marker line, in order."""
    blocks, stray_line = [], None
    for number, line in enumerate(text.split("\n"), start=1):
        bare = line.rstrip()
        if bare in ROLE_OF:
            blocks.append((bare, number, []))
        elif bare.startswith((USER, AGENT)):
            marker = USER if bare.startswith(USER) else AGENT
            raise PromptFileError(source, number, f"text on the marker line; put {marker} alone on its line "
                                                  "and the turn's text on the lines below it")
        elif blocks:
            blocks[-1][2].append(line)
        elif bare.strip() and stray_line is None:
            stray_line = number
    if not blocks:
        raise PromptFileError(source, 1, f"no {USER} or {AGENT} marker line: not a prompt file")
    if stray_line is not None:
        raise PromptFileError(source, stray_line, f"text before the first {USER} marker line")
    return [(marker, number, _strip_blank_lines(lines)) for marker, number, lines in blocks]


def parse_prompt(text: str, source: str = "<string>") -> AgentPrompt:
    """Parse prompt-file text into an AgentPrompt; PromptFileError names the line of any problem."""
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise PromptFileError(source, line, "NUL byte: binary content, not a text prompt file")
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    blocks = _split_blocks(text, source)
    if blocks[0][0] != USER:
        raise PromptFileError(source, blocks[0][1], f"the first turn must be {USER}, not {blocks[0][0]}")
    for (prev, prev_line, _), (marker, number, _) in zip(blocks, blocks[1:]):
        if marker == prev:
            raise PromptFileError(source, number, f"two {marker} turns in a row (the other at line {prev_line}); "
                                                  f"{USER} and {AGENT} turns must alternate")
    last_marker, last_line, input_prefix = blocks[-1]
    if last_marker != USER:
        raise PromptFileError(source, last_line, f"the last block must be {USER} (the slot for the new input), "
                                                 f"not {last_marker}")
    for marker, number, content in blocks[:-1]:
        if not content.strip():
            raise PromptFileError(source, number, f"empty {marker} turn (only the last {USER} block may be empty)")
    turns = [{"role": ROLE_OF[marker], "content": content} for marker, _, content in blocks[:-1]]
    name = os.path.splitext(os.path.basename(source))[0] if source != "<string>" else source
    return AgentPrompt(turns=turns, input_prefix=input_prefix, joiner="\n\n" if input_prefix else "",
                       path=source, name=name, text=format_prompt(turns, input_prefix))


def load_prompt(path) -> AgentPrompt:
    """Read and parse a prompt file. A bare name from PROMPTS ("os") means the shipped file prompts/os.txt."""
    path = os.fspath(path)
    if path in PROMPTS and not os.path.exists(path):
        path = os.path.join(PROMPT_DIR, path + ".txt")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise PromptFileError(path, None, "file not found") from None
    except IsADirectoryError:
        raise PromptFileError(path, None, "is a directory, not a prompt file") from None
    except OSError as e:
        raise PromptFileError(path, None, f"cannot read the file ({e.strerror})") from None
    if b"\x00" in data:
        line = data.count(b"\n", 0, data.index(b"\x00")) + 1
        raise PromptFileError(path, line, "NUL byte: binary content, not a text prompt file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PromptFileError(path, line, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    return parse_prompt(text, source=path)


def check_fits(prompt: AgentPrompt, n_tokens: int, max_len: int) -> None:
    """Raise PromptFileError if the prompt's n_tokens leave no room in a context of max_len tokens."""
    if n_tokens >= max_len:
        raise PromptFileError(prompt.path, None, f"the prompt is {n_tokens} tokens, which does not fit the "
                                                 f"model's context of {max_len} tokens with room for an input")


def _is_acknowledgement(content: str) -> bool:
    return content.strip().rstrip(".!").lower() in ("ok", "okay")


def example_inputs(prompt: AgentPrompt) -> list[str]:
    """The example user inputs inside the prompt's shots: demonstrations for pseudo-input generation
    (section 5, appendix A). They have the shape of what fills the input slot. Three layouts:
    - with an input prefix (OS): the text after the prefix's last sentence ("My problem is:") wherever a
      user turn contains it, i.e. the shot's question;
    - an instruction turn answered by "Ok." (WebShop): the user turn after it, which opens the shot;
    - otherwise (Mind2Web): every user turn, each a separate single-step example."""
    users = [t["content"] for t in prompt.turns if t["role"] == "user"]
    if prompt.input_prefix:
        phrase = prompt.input_prefix.strip().rsplit(". ", 1)[-1].lower()
        found = [u[u.lower().rfind(phrase) + len(phrase):].strip() for u in users if phrase in u.lower()]
        if found:
            return found
    turns = prompt.turns
    for k in range(1, len(turns) - 1):
        if turns[k]["role"] == "assistant" and _is_acknowledgement(turns[k]["content"]):
            return [turns[k + 1]["content"]]
    return users
