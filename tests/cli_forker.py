"""Run many CLI invocations, each in a process of its own, without paying Python's and NumPy's start-up for
each: this driver imports the tools once, then forks one child per job. The child runs the tool's main()
as `python -m alexnet_cuda.TOOL ARGS` would (an exception that escapes is printed as a traceback, exit 1)
with its stdout and stderr captured; the parent reports the exit status, negative for a signal, as
subprocess does. A child that runs past its time limit is killed by SIGALRM (a hang shows as signal 14).

    python tests/cli_forker.py JOBS.json  ->  JSON list of {"returncode", "stdout", "stderr"} on stdout
    JOBS.json: [{"tool": "evaluate", "argv": [...], "timeout": 60}, ...]
"""
import importlib
import json
import os
import sys
import tempfile
import traceback


def run_job(job):
    module = importlib.import_module(f"alexnet_cuda.{job['tool']}")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            rc = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                import signal

                signal.alarm(int(job.get("timeout", 60)))
                sys.argv = [f"alexnet_cuda.{job['tool']}", *job["argv"]]
                try:
                    rc = module.main(job["argv"])
                except SystemExit as e:  # argparse
                    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                rc = int(rc or 0)
            except BaseException:  # noqa: BLE001 - what the interpreter would print for an uncaught exception
                traceback.print_exc()
                rc = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {"returncode": os.waitstatus_to_exitcode(status),
                "stdout": out.read().decode("utf-8", "replace"), "stderr": err.read().decode("utf-8", "replace")}


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        jobs = json.load(f)
    for tool in {j["tool"] for j in jobs}:
        importlib.import_module(f"alexnet_cuda.{tool}")
    import alexnet_cuda.data  # noqa: F401 - what the tools import lazily, imported once here
    import alexnet_cuda.prepare  # noqa: F401
    import PIL.Image  # noqa: F401

    results = [run_job(j) for j in jobs]
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()
