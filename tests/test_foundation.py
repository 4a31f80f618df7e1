"""Package layering and the CLI entry point."""

import subprocess
import sys

from rlhf_ray.cli import COMMANDS, main


def test_algorithms_import_without_ray_or_vllm():
    code = ("import sys, rlhf_ray.algorithms, rlhf_ray.config.base; "
            "bad=[m for m in ('ray','vllm') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_lists_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_cli_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
