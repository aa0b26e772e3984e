"""A process that imports what `python -m prefrun` imports, once, then forks a child per `prefrun <args>` run that
the tests ask of it (`conftest.run_cli`): each run then skips the 5-6 s of CPU an interpreter spends importing
torch, transformers, accelerate and peft. Nothing is computed here before a fork (no thread, no OpenMP pool, no
process group, no Hydra or logging set up), so each child starts as a fresh `python -m prefrun` would, in the
working directory and environment of the request, with its output in files of the caller's choice.

Protocol, one JSON object per line: on stdin `{"args", "cwd", "env", "stdout", "stderr"}`; on stdout
`{"pid"}` once the child runs, then `{"returncode"}` (negative: the signal that ended it, as subprocess says)."""

import json
import os
import runpy
import sys


def _child(request: dict) -> None:
    """Becomes `python -m prefrun <args>`: leaves through SystemExit (or an exception's traceback and status 1) as
    that would, never back into the loop."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    sys.argv = ["prefrun", *request["args"]]
    sys.path[0] = request["cwd"]  # as `python -m` puts the working directory first
    runpy.run_module("prefrun", run_name="__main__", alter_sys=True)
    sys.exit(0)


def main() -> None:
    import prefrun.cli  # noqa: F401 - what every run imports first
    import prefrun.run  # noqa: F401 - and what `prefrun train` imports next: torch, transformers, accelerate, peft

    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"returncode": code}), flush=True)


if __name__ == "__main__":
    main()
