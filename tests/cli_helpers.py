"""Run the ``lynx`` CLI in-process for tests: ``(exit code, stdout, stderr)``."""

from __future__ import annotations

from lynx_moe.cli import main


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
