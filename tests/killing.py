"""kill -9 at a chosen point of a `jaxgpt` command, then the same command again: shared by the durability tests.

The driver runs `jaxgpt ARGS...` in a subprocess that SIGKILLs itself at step `kill_at`: right after that step's
save started ("save"), after its metrics line ("step"), or halfway through writing that line ("mid-line").
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from jaxgpt.cli import main
    from jaxgpt.train import checkpoint, metrics_log

    args, kill_at, where = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    save, write = checkpoint.Checkpointer.save, metrics_log.MetricsLog.write

    def killing_save(self, step, *rest):
        save(self, step, *rest)  # the async write is now in flight
        if step == kill_at and where == "save":
            die()

    def killing_write(self, record):
        mine = record.get("step") == kill_at and self.path.name.endswith("metrics.jsonl")
        if mine and where == "mid-line":
            with open(self.path, "a") as f:
                f.write(json.dumps(record)[:25])
            die()
        write(self, record)
        if mine and where == "step":
            die()

    checkpoint.Checkpointer.save, metrics_log.MetricsLog.write = killing_save, killing_write
    sys.exit(main(args))
""")


def kill_then_resume(args: list[str], plan: list[tuple[int, str]], after_each=None) -> str:
    """Run `jaxgpt ARGS` killed at each (step, where) of `plan`, then once more to the end; its stdout.

    `after_each(kill_at, where)` runs after every process, to check the run dir between kills."""
    for kill_at, where in plan + [(-1, "never")]:
        proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([str(a) for a in args]), str(kill_at), where],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        expected = 0 if where == "never" else -signal.SIGKILL
        assert proc.returncode == expected, f"{kill_at} {where}: {proc.stderr[-2000:]}"
        if after_each:
            after_each(kill_at, where)
    return proc.stdout
