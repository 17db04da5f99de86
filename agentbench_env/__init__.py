"""The local AgentBench: three agent environments used to evaluate GenPI (paper section 6.1, appendix B).

    from agentbench_env import make
    env = make("os")                       # or "webshop", "mind2web"
    first_user_message = env.reset(0)
    observation, done, score = env.step(agent_reply_text)

Every environment has the same API: `env.tasks` (list of task dicts), `env.reset(i) -> str`,
`env.step(reply) -> (observation or None, done, score or None)`. Environments never import the model.
Submodules are imported only when asked for, so one environment's dependencies never break another.
"""
import importlib
import json

# name -> (submodule, class)
_ENVS = {
    "os": ("os_env", "OSEnv"),
    "webshop": ("webshop", "WebShopEnv"),
    "mind2web": ("mind2web", "Mind2WebEnv"),
}


def make(name, tasks_file=None):
    """Build the environment `name` ("os", "webshop", "mind2web"), reading its tasks from `tasks_file` or the shipped default."""
    if name not in _ENVS:
        raise ValueError(f"unknown AgentBench environment {name!r}; choose one of {sorted(_ENVS)}")
    module_name, class_name = _ENVS[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)(tasks_file=tasks_file)


def load_records(path, fields, what):
    """A JSON list of dicts, each with `fields` (name -> type); one clear error otherwise."""
    try:
        with open(path) as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of {what}s")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: {what} {i} is not a JSON object")
        for name, kind in fields.items():
            if name not in rec:
                raise ValueError(f"{path}: {what} {i}: missing field '{name}'")
            if not isinstance(rec[name], kind):
                raise ValueError(f"{path}: {what} {i}: field '{name}' has type {type(rec[name]).__name__}")
    return records
