"""A pre-warmed launcher of the CLI for the subprocess tests (``test_hardening``).

Starting ``python cli.py`` costs seconds of imports (torch, transformers) before the CLI does anything,
which would make a catalogue of fifty subprocess cases take many minutes. This script imports the package
and its heavy dependencies once, then for each request forks a fresh child process that runs
``compressor.cli.main`` with the request's argv, working directory, environment and standard streams
(files) — a separate process with its own exit status, signals and file descriptors, as a shell would
start it — and reports the child's pid at once and its exit status when it ends.

Protocol, one JSON object per line: requests on stdin
``{"id", "argv", "cwd", "env", "stdin": path | null, "stdout": path, "stderr": path}``; replies on stdout
``{"id", "pid"}`` then ``{"id", "returncode"}`` (negative: killed by that signal).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import warnings


def _child(request: dict) -> None:
    """In the forked child: set up the process as the request says and run the CLI; never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        streams = [(request["stdin"] or os.devnull, os.O_RDONLY), (request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                   (request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)]
        for fd, (path, flags) in enumerate(streams):
            os.dup2(os.open(path, flags, 0o644), fd)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.argv = [request["script"], *request["argv"]]
        from compressor.cli import main

        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # a failure of the launcher itself: shown like an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def main() -> None:
    warnings.simplefilter("ignore", DeprecationWarning)  # fork() with the waiter thread alive
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.models.opt.modeling_opt  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import compressor.api  # noqa: F401  (the heavy imports, once)
    import compressor.cli  # noqa: F401
    import compressor.evaluation.evaluate  # noqa: F401

    lock, children = threading.Lock(), {}

    def reply(message: dict) -> None:
        with lock:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                threading.Event().wait(0.02)
                continue
            with lock:
                request_id = children.pop(pid)
            reply({"id": request_id, "returncode": os.waitstatus_to_exitcode(status)})

    threading.Thread(target=reap, daemon=True).start()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        with lock:  # the child's pid is registered before the reaper can see it end
            pid = os.fork()
            if pid == 0:
                _child(request)
            children[pid] = request["id"]
        reply({"id": request["id"], "pid": pid})


if __name__ == "__main__":
    main()
