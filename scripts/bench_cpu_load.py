"""The default run (``python train.py``) on an idle CPU and against a competing CPU load, side by side.

    python scripts/bench_cpu_load.py                  # the full 14-epoch default run, every variant
    python scripts/bench_cpu_load.py --epochs 3       # shorter (recipe.epochs=3), same comparison

Each variant runs twice, back to back: once as the machine is, once while ``--load`` busy processes
(``python -c "while True: pass"``, started here and ended here by pid, whatever happens) compete for the
cores. Variants: ``default`` (``trainer.threads=auto data.num_workers=auto``), ``threads1``
(``trainer.threads=1``) and ``previous`` (the former defaults: all cores as intra-op threads, one loader
worker, libgomp's 3 ms spin before a waiting thread sleeps). Prints the wall times (launch to exit) and
the ratios, and appends the table with the machine's description to ``benchmarks/cpu_load_<date>.md``.

Targets: the default run under the load within 2x of its time without it; without it, no slower than
``previous``.
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUSY = "while True: pass"
_busy: list[subprocess.Popen] = []


def variants() -> dict[str, tuple[list[str], dict]]:
    """name -> (train.py overrides, extra environment)."""
    cores = len(os.sched_getaffinity(0))
    return {
        "default": ([], {}),
        "threads1": (["trainer.threads=1"], {}),
        "previous": ([f"trainer.threads={cores}", "data.num_workers=1"], {"GOMP_SPINCOUNT": "300000"}),
    }


def start_load(n: int) -> None:
    """``n`` busy Python processes; :func:`end_load` ends exactly these."""
    for _ in range(n):
        _busy.append(subprocess.Popen([sys.executable, "-c", BUSY], stdin=subprocess.DEVNULL))
    time.sleep(1.0)


def end_load() -> None:
    """Terminate (then kill) every busy process this script started, by pid."""
    while _busy:
        p = _busy.pop()
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _on_signal(signum, frame) -> None:
    end_load()
    sys.exit(128 + signum)


def run_once(
    overrides: list[str], env: dict, epochs: int | None, timeout: float, out: Path
) -> tuple[float | None, float]:
    """Wall seconds of one ``train.py`` run (None past ``timeout``) and the CPU seconds of the run and its
    loader workers (OpenMP threads spinning while they wait show up here)."""
    args = [sys.executable, "train.py", f"out_dir={out}", "trainer.progress=false", *overrides]
    if epochs:
        args.append(f"recipe.epochs={epochs}")
    full_env = {**os.environ, **env}
    for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME"):
        full_env.pop(k, None)  # the run's own choices, as a user's shell gives them
    t0, cpu0 = time.perf_counter(), _children_cpu()
    proc = subprocess.Popen(
        args, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the trainer saves and exits; its workers go with it
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        return None, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"error: train.py {' '.join(overrides)} exited {proc.returncode}:\n{stdout[-3000:]}")
    cpu_line = next((ln.strip() for ln in stdout.splitlines() if ln.strip().startswith("cpu: ")), "")
    print(f"    {cpu_line}", flush=True)
    return time.perf_counter() - t0, _children_cpu() - cpu0


def _children_cpu() -> float:
    """User + system seconds of the reaped children (the busy processes are reaped only after a run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine() -> str:
    """CPU model, cores, memory, OS and library versions, in one line."""
    import torch

    model = "unknown CPU"
    try:
        model = next(
            ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.lower().startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    from acon.cpu_budget import usable_cores

    return (
        f"{model}, {os.cpu_count()} CPUs ({usable_cores().text()}), {mem:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"
    )


def fmt(s: float | None, timeout: float) -> str:
    return f"> {timeout:.0f} (stopped)" if s is None else f"{s:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, help="recipe.epochs (default: the recipe's 14)")
    ap.add_argument("--load", type=int, default=2, help="busy processes of the loaded condition (default 2)")
    ap.add_argument("--variants", default="default,threads1,previous", help="comma-separated subset")
    ap.add_argument(
        "--timeout", type=float, default=900, help="seconds before a run is stopped (default 900)"
    )
    ap.add_argument(
        "--out", type=Path, help="markdown file to append to (default benchmarks/cpu_load_<date>.md)"
    )
    ap.add_argument("--no-record", action="store_true", help="print only")
    args = ap.parse_args(argv)
    table = variants()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in table]
    if unknown:
        print(f"error: --variants {','.join(unknown)}: not one of {', '.join(table)}", file=sys.stderr)
        return 2
    atexit.register(end_load)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    times: dict[tuple[str, str], float | None] = {}
    cpu: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_cpu_load_") as tmp:
        for name in names:
            overrides, env = table[name]
            for cond in ("idle", "loaded"):
                print(f"{name} ({' '.join(overrides) or 'no overrides'}), {cond}:", flush=True)
                if cond == "loaded":
                    start_load(args.load)
                try:
                    out = Path(tmp) / f"{name}-{cond}"
                    times[name, cond], cpu[name, cond] = run_once(
                        overrides, env, args.epochs, args.timeout, out
                    )
                finally:
                    end_load()
                print(
                    f"    {fmt(times[name, cond], args.timeout)} s ({cpu[name, cond]:.1f} CPU s)", flush=True
                )
    load_after = os.getloadavg()
    epochs = args.epochs or 14
    lines = [
        f"## {started:%Y-%m-%d %H:%M} UTC: `python scripts/bench_cpu_load.py"
        f"{f' --epochs {args.epochs}' if args.epochs else ''}{f' --load {args.load}' if args.load != 2 else ''}`",
        "",
        f"- machine: {machine()}",
        f"- load average (1/5/15 min) before: {' / '.join(f'{x:.1f}' for x in load_before)}, after: "
        f"{' / '.join(f'{x:.1f}' for x in load_after)} ('idle' is the machine as it was, without our load)",
        f"- run: `python train.py trainer.progress=false` ({epochs} epochs), wall time from launch to exit;"
        f' loaded: {args.load} x `python -c "{BUSY}"` running for the whole run',
        "",
        "| variant | overrides | idle (s) | loaded (s) | loaded / idle | idle / default idle "
        "| CPU s idle / loaded |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    base = times.get(("default", "idle"))
    for name in names:
        overrides, env = table[name]
        what = " ".join(overrides + [f"{k}={v}" for k, v in env.items()]) or "(defaults)"
        idle, loaded = times[name, "idle"], times[name, "loaded"]
        lines.append(
            f"| {name} | `{what}` | {fmt(idle, args.timeout)} | {fmt(loaded, args.timeout)} | "
            f"{ratio(loaded, idle)} | {ratio(idle, base)} | {cpu[name, 'idle']:.1f} / {cpu[name, 'loaded']:.1f} |"
        )
    if ("default", "loaded") in times:
        d_idle, d_loaded = times["default", "idle"], times["default", "loaded"]
        met = d_idle is not None and d_loaded is not None and d_loaded <= 2 * d_idle
        lines += [
            "",
            f"Target, default loaded <= 2x default idle: {'met' if met else 'NOT met'} ({ratio(d_loaded, d_idle)}).",
        ]
        if ("previous", "idle") in times:
            p_idle = times["previous", "idle"]
            # a stopped previous run (None) took longer than the timeout, so longer than a finished default
            ok = d_idle is not None and (p_idle is None or d_idle <= p_idle * 1.05)
            lines.append(
                f"Target, default idle no slower than previous idle (5 % noise allowed): "
                f"{'met' if ok else 'NOT met'} ({ratio(d_idle, p_idle) if p_idle else 'previous stopped'})."
            )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_record:
        out = args.out or ROOT / "benchmarks" / f"cpu_load_{started:%Y-%m-%d}.md"
        new = not out.exists()
        with open(out, "a") as f:
            if new:
                f.write(
                    "# The default run on a busy CPU (`scripts/bench_cpu_load.py`)\n\n"
                    "Each section is one invocation of the script; times are wall seconds of `python train.py`.\n\n"
                )
            f.write(text + "\n")
        print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
