"""OS interaction, the first evaluation task of the local AgentBench (paper section 6.1, appendix B; AgentBench v0.2).

The agent answers `Think: ...` then `Act: bash` with a ```bash block, `Act: finish`, or `Act: answer(...)`; the
last `Act:` line counts. Bash code runs in the task's sandbox and comes back as "The output of the OS:\n\n" + output
(or "The output of the OS is empty."), cut to 780 characters when longer than 800. At most 8 rounds, 30 s a command.
A task is judged by an exact `match` (string or regex) or by a `check` chain (run the reference `example` solution in
the sandbox, compare as integer / string / size / containment), exactly as AgentBench's `os_interaction/task.py`.

Every task runs in a fresh bubblewrap (`bwrap`) sandbox: a private root directory (writable /root, /home, /tmp, /etc,
/var, /usr/local, /opt) over read-only binds of the host's /usr/bin, /usr/lib, ...; no network, its own PID namespace,
a process limit, a file-size limit and a wall-time limit per command. One bash runs inside the sandbox for the whole
task, so files, the working directory and the task's background `start` program persist between rounds.
When run as root, the sandbox's users are shifted to host uids 600000+ so the process limit applies and sandbox root
owns nothing on the host.

    env = OSEnv()                      # the project's tasks, agentbench_env/data/os_tasks.json
    description = env.reset(0)
    observation, done, score = env.step("Think: list it.\n\nAct: bash\n\n```bash\nls /root\n```")

Tests: .venv/bin/python -m pytest tests/test_env_os.py
"""
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time

DEFAULT_TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "os_tasks.json")
ROUND_LIMIT = 8
TIMEOUT = 30.0                 # seconds a command may run
MAX_PROCS = 256                # processes (and threads) of one sandbox user
MAX_FILE_KB = 1024 * 1024      # largest file the sandbox may write, KiB
READ_CAP = 64 * 1024           # bytes of a command's output kept; the rest is read and dropped
OUTPUT_LIMIT, OUTPUT_KEEP = 800, 780
TRUNCATED = "\n[truncated because the output is too long]"   # AgentBench v0.2 puts a newline before the note
OUTPUT_PREFIX = "The output of the OS:\n\n"
EMPTY_OUTPUT = "The output of the OS is empty."
SHIFT_UID = 600000             # host uid of sandbox root when we run as root
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHECKS = ("integer-match", "string-match", "size-match", "containing", "in")   # AgentBench's check/*.py
LANGUAGES = ("bash", "python")
DOCKER_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP", "SETFCAP",
               "NET_BIND_SERVICE", "SYS_CHROOT", "AUDIT_WRITE")


class TaskFormatError(ValueError):
    """A task file that cannot be read: names the file, the task index and the field."""


class SandboxError(RuntimeError):
    """bubblewrap cannot build the sandbox; commands are never run on the host instead."""


# ---------------------------------------------------------------- task files

def _script(obj, field, fail, tasks_dir):
    """AgentBench script object -> (language, code), or ("check", name) for a built-in comparison."""
    if isinstance(obj, str):
        return "bash", obj
    if not isinstance(obj, dict):
        fail(field, f"expected a string or an object with 'code' or 'file', got {type(obj).__name__}")
    language = obj.get("language", "bash")
    if "code" in obj:
        code = obj["code"]
        if not isinstance(code, str):
            fail(field + ".code", "must be a string")
    elif "file" in obj:
        name = os.path.basename(str(obj["file"])).removesuffix(".py")
        if name in CHECKS and language == "python":
            return "check", name
        path = os.path.join(tasks_dir or "", str(obj["file"]))
        if tasks_dir is None or not os.path.isfile(path):
            fail(field + ".file", f"script file {obj['file']!r} not found "
                 f"({'no tasks_dir given' if tasks_dir is None else 'looked in ' + tasks_dir})")
        with open(path, encoding="utf-8") as f:
            code = f.read()
    else:
        fail(field, "a script object needs 'code' or 'file'")
    if language not in LANGUAGES:
        fail(field + ".language", f"{language!r} is not supported (only {', '.join(LANGUAGES)})")
    return language, code


def parse_task(raw, index, tasks_dir=None, source="tasks"):
    """One AgentBench OS task (JSON object) -> config dict; TaskFormatError names the task index and field."""
    def fail(field, problem):
        raise TaskFormatError(f"{source}: task {index}: field '{field}': {problem}")

    if not isinstance(raw, dict):
        fail("(task)", "must be a JSON object")
    if not isinstance(raw.get("description"), str):
        fail("description", "missing or not a string")
    create = raw.get("create", {})
    if not isinstance(create, dict):
        fail("create", f"must be an object, got {type(create).__name__}")
    init = create.get("init", [])
    init = init if isinstance(init, list) else [init]
    init = [_script(s, f"create.init[{k}]", fail, tasks_dir) for k, s in enumerate(init)]
    if any(lang == "check" for lang, _ in init):
        fail("create.init", "a check comparison cannot be an init script")
    start = _script(raw["start"], "start", fail, tasks_dir) if raw.get("start") is not None else None
    evaluation = raw.get("evaluation")
    if not isinstance(evaluation, dict):
        fail("evaluation", "missing or not an object")

    match, check, example = None, None, None
    if "match" in evaluation:
        match = evaluation["match"]
        match = {"answer": match, "strip": True} if isinstance(match, str) else match
        if not isinstance(match, dict) or not isinstance(match.get("answer", match.get("regex")), str):
            fail("evaluation.match", "must be a string, {'answer': str} or {'regex': str}")
        if "regex" in match and "answer" not in match:
            try:
                re.compile(match["regex"])
            except re.error as e:
                fail("evaluation.match.regex", f"bad regular expression: {e}")
    elif "check" in evaluation:
        steps = evaluation["check"] if isinstance(evaluation["check"], list) else [evaluation["check"]]
        check = [None if s is None else _script(s, f"evaluation.check[{k}]", fail, tasks_dir)
                 for k, s in enumerate(steps)]
        for k, step in enumerate(check):
            if step is not None and step[0] == "check" and k == 0:
                fail(f"evaluation.check[{k}]", f"comparison '{step[1]}' needs an earlier step to compare with")
        if None in check:
            if "example" not in evaluation:
                fail("evaluation.example", "check has a null step but no example solution")
            example = _script(evaluation["example"], "evaluation.example", fail, tasks_dir)
            if example[0] == "check":
                fail("evaluation.example", "must be a solution script, not a comparison")
    else:
        fail("evaluation", "needs 'match' or 'check'")
    return {"description": raw["description"], "init": init, "start": start, "match": match,
            "check": check, "example": example, "labels": raw.get("labels", [])}


def load_tasks(path, tasks_dir=None, skip_invalid=False):
    """Read an AgentBench OS task file (.json list/object or .jsonl) -> (raw tasks, configs, skipped).

    skipped lists (index, error message) of tasks left out when skip_invalid; otherwise the first bad task raises."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TaskFormatError(f"{path}: cannot read task file: {e}") from None
    raw = raw if isinstance(raw, list) else [raw]
    tasks, configs, skipped = [], [], []
    for i, item in enumerate(raw):
        try:
            configs.append(parse_task(item, i, tasks_dir, source=path))
            tasks.append(item)
        except TaskFormatError as e:
            if not skip_invalid:
                raise
            skipped.append((i, str(e)))
    if not tasks:
        raise TaskFormatError(f"{path}: no usable tasks")
    return tasks, configs, skipped


# ---------------------------------------------------------------- agent replies and observations

def parse_action(reply):
    """AgentBench's extract_action: -> ("bash", code) | ("commit", answer or None) | (None, None)."""
    for act in re.findall(r"Act:\s*(.+)", reply)[::-1]:     # the last Act: line counts
        if act.lower().startswith("bash"):
            return "bash", "\n\n".join(re.findall(r"```bash\n(.*?)\n```", reply, re.DOTALL))
        if act.lower().startswith("finish"):
            return "commit", None
        if act.lower().startswith("answer"):
            content = act[6:].strip()
            left, right = content.find("("), content.rfind(")")
            if left != -1 and right != -1:
                return "commit", content[left + 1:right]
    return None, None


def format_output(output):
    """Command output -> the OS's reply to the agent (AgentBench v0.2 wording and truncation)."""
    if len(output) > OUTPUT_LIMIT:
        output = output[:OUTPUT_KEEP] + TRUNCATED
    return OUTPUT_PREFIX + output if output else EMPTY_OUTPUT


# ---------------------------------------------------------------- judges (AgentBench's check/*.py)

def _norm(s):
    return s.replace("\r\n", "\n").replace("\r", "\n").strip()


def _size_bytes(s):
    """'4.0K', '12MB', '4096' -> bytes (AgentBench's size-match, also accepting decimals like du -h prints)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B|Bytes?)?", s.strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {s!r}")
    return float(m.group(1)) * 1024 ** " KMGTP".index(m.group(2).upper() or " ")


def compare(name, answer, expected):
    """Built-in check comparison: answer (the agent's) against expected (the example's output)."""
    try:
        if name == "integer-match":
            return int(answer) == int(expected)
        if name == "string-match":
            return _norm(answer) == _norm(expected)
        if name == "size-match":
            return _size_bytes(answer) == _size_bytes(expected)
        if name == "containing":
            return _norm(expected) in _norm(answer)
        if name == "in":
            return _norm(answer) in _norm(expected)
    except ValueError:
        return False
    raise ValueError(f"unknown comparison {name!r}")


# ---------------------------------------------------------------- the sandbox

_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-./,:=+")


def _quote(text):
    """text -> a bash $'...' word that is exactly those bytes; bash decodes it itself, without forking."""
    return "$'" + "".join(chr(b) if b in _PLAIN else f"\\x{b:02x}" for b in text.encode("utf-8", "replace")) + "'"


def _shift_owner(root, shift):
    """Re-own everything under root by +shift uids/gids, so sandbox root (host uid `shift`) owns its files."""
    def shift_one(path):
        st = os.lstat(path)
        os.lchown(path, st.st_uid % 65536 + shift, st.st_gid % 65536 + shift)

    shift_one(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            shift_one(os.path.join(dirpath, name))


def _make_root(parent):
    """A private root directory and the bwrap mount arguments that complete it with read-only host system dirs."""
    root = tempfile.mkdtemp(prefix="agentbench_os_", dir=parent)
    binds = []
    for d in ("root", "home", "tmp", "etc", "opt", "srv", "mnt", "media", "run", "usr/local",
              "var/tmp", "var/log", "var/lib", "var/cache", "var/spool", "var/mail", "var/opt"):
        os.makedirs(os.path.join(root, d))
    for d in ("bin", "etc", "games", "include", "lib", "sbin", "share", "src"):
        os.makedirs(os.path.join(root, "usr/local", d))
    os.chmod(root, 0o755)
    os.chmod(os.path.join(root, "root"), 0o700)
    for d in ("tmp", "var/tmp"):
        os.chmod(os.path.join(root, d), 0o1777)
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):   # merged-/usr links, or real dirs bound
        host = "/" + name
        if os.path.islink(host):
            os.symlink(os.readlink(host), os.path.join(root, name))
        elif os.path.isdir(host):
            binds += ["--ro-bind", host, host]
    for name in sorted(os.listdir("/usr")):
        host = "/usr/" + name
        if name == "local":
            continue
        if os.path.islink(host):
            os.symlink(os.readlink(host), os.path.join(root, "usr", name))
        elif os.path.isdir(host):
            binds += ["--ro-bind", host, host]
    # /etc: the host's files copied (shadow passwords blanked); its big subdirs bound read-only
    for name in sorted(os.listdir("/etc")):
        host, mine = "/etc/" + name, os.path.join(root, "etc", name)
        try:
            if os.path.islink(host):
                os.symlink(os.readlink(host), mine)
            elif os.path.isdir(host):
                if name in ("default", "pam.d", "security", "skel", "profile.d", "ld.so.conf.d", "sudoers.d"):
                    shutil.copytree(host, mine, symlinks=True)
                else:
                    binds += ["--ro-bind", host, host]
            elif os.path.isfile(host):
                shutil.copy2(host, mine)
        except OSError:     # unreadable host entry: the sandbox goes without it
            continue
    _blank_passwords(os.path.join(root, "etc"))
    return root, binds


def _blank_passwords(etc):
    """Rewrite shadow/gshadow with locked passwords for the copied users and groups (no host hashes in the sandbox)."""
    for table, shadow, line in (("passwd", "shadow", "{}:*:19000:0:99999:7:::\n"), ("group", "gshadow", "{}:*::\n")):
        try:
            with open(os.path.join(etc, table)) as f:
                names = [row.split(":", 1)[0] for row in f if row.strip() and not row.startswith("#")]
        except OSError:
            continue
        path = os.path.join(etc, shadow)
        with open(path, "w") as f:
            f.writelines(line.format(n) for n in names)
        os.chmod(path, 0o640)


def _process_tree():
    """host pid -> parent pid, for every process."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return parents


def _descendants(pid):
    parents = _process_tree()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


class Sandbox:
    """One task's sandbox: a private root directory and a persistent bash inside bwrap."""

    def __init__(self, timeout=TIMEOUT, max_procs=MAX_PROCS, parent_dir=None):
        self.timeout, self.max_procs = timeout, max_procs
        self.marker = ("__agentbench_done_" + secrets.token_hex(8)).encode()
        self.as_root = os.geteuid() == 0
        self.root, self.binds = _make_root(parent_dir)
        if self.as_root:
            _shift_owner(self.root, SHIFT_UID)
        self.proc = None
        try:
            self._launch()
        except BaseException:
            self.close()
            raise

    def _bwrap_command(self):
        cmd = ["bwrap", "--bind", self.root, "/", *self.binds, "--proc", "/proc", "--dev", "/dev",
               "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
               "--hostname", "agentbench", "--die-with-parent", "--new-session", "--chdir", "/",
               "--clearenv", "--setenv", "PATH", PATH, "--setenv", "HOME", "/root", "--setenv", "USER", "root",
               "--setenv", "TERM", "dumb", "--cap-drop", "ALL"]
        for cap in DOCKER_CAPS:     # sandbox root keeps Docker's default capabilities, within its user namespace
            cmd += ["--cap-add", "CAP_" + cap]
        if not self.as_root:        # bwrap maps our one uid to root; useradd cannot chown to other uids then
            cmd += ["--unshare-user", "--uid", "0", "--gid", "0"]
        return cmd + ["bash", "--noprofile", "--norc"]

    def _user_namespace(self):
        """As root: a user namespace mapping sandbox uids 0..65535 to host SHIFT_UID.., held by a short sleep."""
        holder = subprocess.Popen(["unshare", "--user", "--", "sleep", "60"], start_new_session=True)
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 5
        while True:
            if time.monotonic() > deadline or holder.poll() is not None:
                holder.kill()
                raise SandboxError("could not create a user namespace for the sandbox (unshare --user failed)")
            if os.readlink(f"/proc/{holder.pid}/ns/user") != own:
                break
            time.sleep(0.002)
        for table in ("uid_map", "gid_map"):
            with open(f"/proc/{holder.pid}/{table}", "w") as f:
                f.write(f"0 {SHIFT_UID} 65536\n")
        return holder

    def _launch(self):
        holder = None
        try:
            holder = self._user_namespace() if self.as_root else None
            prefix = ["nsenter", f"--user=/proc/{holder.pid}/ns/user", "-S", "0", "-G", "0", "--"] if holder else []
            self.proc = subprocess.Popen(prefix + self._bwrap_command(), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            out, rc, status = self._run_line(f"ulimit -u {self.max_procs}; ulimit -f {MAX_FILE_KB}; cd /", 10.0)
        except FileNotFoundError as e:
            raise SandboxError(f"cannot start the sandbox: {e.filename} is not installed") from None
        finally:
            if holder:
                holder.kill()
                holder.wait()
        if status != "ok" or rc != 0:
            raise SandboxError("bubblewrap could not start the sandbox: "
                               + (out.decode("utf-8", "replace").strip() or status))

    def _run_line(self, line, timeout):
        """Send one line to the sandbox's bash, ending with our marker; -> (output, exit code, status)."""
        try:
            self.proc.stdin.write(f"{line}\nbuiltin printf '\\n%s %s\\n' {self.marker.decode()} \"$?\"\n".encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return b"", None, "eof"
        return self._read_until_marker(timeout)

    def _read_until_marker(self, timeout):
        fd = self.proc.stdout.fileno()
        pattern = re.compile(rb"\n" + self.marker + rb" (\d+)\n")
        kept, window, seen = bytearray(), b"", 0
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(kept), None, "timeout"
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return bytes(kept), None, "eof"
            window_start = seen - len(window)
            window += chunk
            seen += len(chunk)
            if len(kept) < READ_CAP:
                kept += chunk[:READ_CAP - len(kept)]
            found = pattern.search(window)
            if found:
                return bytes(kept[:window_start + found.start()]), int(found.group(1)), "ok"
            window = window[-(len(self.marker) + 16):]

    def _execute(self, line):
        """Run a line in the persistent shell; on timeout kill what it started (or restart the shell)."""
        if self.proc.poll() is not None:      # the agent ended the shell (exit): a new one over the same files
            self._restart()
        before = _descendants(self.proc.pid)
        out, rc, status = self._run_line(line, self.timeout)
        if status == "timeout":
            for _ in range(20):
                new = _descendants(self.proc.pid) - before
                if not new:
                    break
                for pid in new:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.05)
            _, rc, status = self._read_until_marker(1.0)
            if status != "ok":
                self._restart()
            rc = None
        elif status == "eof":
            self._stop()
        return out.decode("utf-8", "replace"), rc

    def run(self, code):
        """Agent's bash code in the task's shell (state persists) -> (stdout+stderr, exit code or None)."""
        return self._execute(f"eval {_quote(code)} </dev/null")

    def run_independent(self, language, code, params=()):
        """A script run like docker exec (fresh environment, cwd /, params as arguments) -> (stdout, exit code).

        Unlike AgentBench, stderr is dropped: the sandbox has unreadable host paths (a `find /` warns about them)
        that a Docker container does not, and a warning must not spoil an integer-match."""
        args = " ".join(_quote(p) for p in params)
        program = f"bash -c {_quote(code)} --" if language == "bash" else f"python3 -c {_quote(code)}"
        env = f"env -i PATH={PATH} HOME=/root USER=root"
        return self._execute(f"(cd / && exec {env} {program} {args}) </dev/null 2>/dev/null")

    def _stop(self):
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)   # bwrap dies -> its PID namespace dies with it
            except OSError:
                pass
        if self.proc:
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass

    def _restart(self):
        self._stop()
        self._launch()

    def close(self):
        """Kill everything in the sandbox and delete its root directory."""
        self._stop()
        self.proc = None
        if self.root and os.path.isdir(self.root):
            shutil.rmtree(self.root, onerror=_force_remove)
        self.root = None


def _force_remove(func, path, _):
    """rmtree helper: a directory the sandbox chmod-ed to 000 is opened up, then removal retried."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            shutil.rmtree(path, ignore_errors=True)
        else:
            func(path)
    except OSError:
        pass


_SANDBOX_CHECKED = False


def check_sandbox():
    """Raise SandboxError unless a bwrap sandbox can run a command here (checked once per process)."""
    global _SANDBOX_CHECKED
    if _SANDBOX_CHECKED:
        return
    if shutil.which("bwrap") is None:
        raise SandboxError("bubblewrap (bwrap) is not installed: apt-get install bubblewrap; "
                           "the OS environment never runs agent commands on the host")
    box = Sandbox(timeout=10.0)
    try:
        out, rc = box.run("echo sandbox-ok")
    finally:
        box.close()
    if out.strip() != "sandbox-ok" or rc != 0:
        raise SandboxError(f"the bwrap sandbox does not work here (got {out!r}, exit code {rc})")
    _SANDBOX_CHECKED = True


# ---------------------------------------------------------------- the environment

class OSEnv:
    """AgentBench OS interaction: reset(i) -> task description; step(reply) -> (observation, done, score).

    tasks_file: AgentBench OS task JSON (default: the project's 52 tasks). tasks_dir: where `{"file": ...}` scripts
    live (AgentBench's script_dir). skip_invalid: leave out tasks that cannot be read, listed in `skipped` as
    (index in file, error); `tasks` and `configs` then hold the readable ones only. sandbox_dir: where sandbox roots
    are made (default the temp dir; /dev/shm is 5x faster to set up)."""

    def __init__(self, tasks_file=None, tasks_dir=None, timeout=TIMEOUT, round_limit=ROUND_LIMIT,
                 max_procs=MAX_PROCS, skip_invalid=False, sandbox_dir=None):
        self.tasks, self.configs, self.skipped = load_tasks(tasks_file or DEFAULT_TASKS, tasks_dir, skip_invalid)
        self.timeout, self.round_limit, self.max_procs, self.sandbox_dir = timeout, round_limit, max_procs, sandbox_dir
        check_sandbox()
        self.sandbox, self.config, self.rounds = None, None, 0

    def reset(self, i):
        """Fresh sandbox for task i: run its init scripts and start its background program; -> the description."""
        if not 0 <= i < len(self.configs):
            raise IndexError(f"task index {i} out of range: {len(self.configs)} tasks")
        self.close()
        self.config, self.rounds = self.configs[i], 0
        self.sandbox = Sandbox(self.timeout, self.max_procs, self.sandbox_dir)
        for language, code in self.config["init"]:
            self.sandbox.run_independent(language, code)
        if self.config["start"]:
            self.sandbox.run(self.config["start"][1])
        return self.config["description"]

    def step(self, reply):
        """Agent reply -> (OS output, False, None) after bash; (None, True, 1.0 or 0.0) when the episode ends."""
        if self.sandbox is None:
            raise RuntimeError("call reset(i) before step()")
        action, content = parse_action(reply)
        if action is None:                         # no parsable action: AgentBench's AGENT_INVALID_ACTION
            return self._finish(0.0)
        if action == "commit":
            return self._finish(1.0 if self.judge(content) else 0.0)
        output, _ = self.sandbox.run(content)
        self.rounds += 1
        if self.rounds >= self.round_limit:       # AgentBench's TASK_LIMIT_REACHED
            return self._finish(0.0)
        return format_output(output.rstrip("\n")), False, None

    def judge(self, answer):
        """AgentBench's judge: exact/regex match, or the check chain run in the (still open) sandbox."""
        match, check = self.config["match"], self.config["check"]
        if match is not None:
            if answer is None:
                return False
            answer = answer.strip() if match.get("strip", True) else answer
            if "answer" in match:
                return answer == match["answer"]
            return re.search(match["regex"], answer) is not None
        params = [str(answer)]
        for step in check:
            language, code = self.config["example"] if step is None else step
            if language == "check":
                ok, out = compare(code, params[0], params[1]), ""
            else:
                out, rc = self.sandbox.run_independent(language, code, params)
                ok = rc == 0
            if not ok:
                return False
            params.append(out)
        return True

    def _finish(self, score):
        self.close()
        return None, True, score

    def close(self):
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
