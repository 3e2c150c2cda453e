import pytest

from raygpt.cli import main


@pytest.fixture
def run_cli(capsys):
    """Run `raygpt ARGS...` in-process; return (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
