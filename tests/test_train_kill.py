"""A training run killed with SIGKILL at random points, many of them inside a checkpoint write, always resumes from a
complete checkpoint with `--resume_from_checkpoint latest` and ends with the loss sequence and the weights of an
uninterrupted run, bit for bit.

Each run of `train_vrfm.py` is a child process forked from a small "zygote" subprocess that has imported torch,
diffusers and the script once (a fresh interpreter costs seconds on a busy 2-core machine; a fork costs
milliseconds). Before calling `train_vrfm.main`, the child wraps a few functions used while a checkpoint is written
(`torch.save`, `os.replace`, `shutil.rmtree` and the helpers of `diffusers_vrfm.training.checkpointing`, among them
`write_model` and `write_ema`, which write each model's weights) so that, when asked, it stops at a chosen point of a
chosen checkpoint write (after truncating the file it just wrote to half its size, where that point is a file write)
and signals it in an event log; the test then kills it with SIGKILL. Other kills land mid-step (between the two
micro-steps of an update) or after a random delay. No production code is changed.

After every kill the test checks that the newest `checkpoint-*` folder is complete and that it is the one `latest`
picks (no incomplete checkpoint ever carries the final name), that no checkpoint that had been completed was lost,
and that its weights equal those of the uninterrupted run's checkpoint at the same step. The kill plan comes from a
seeded RNG; run with `-s` to see it.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import FAST, REPO_ROOT, SCRIPT

from diffusers_vrfm.training.checkpointing import (
    EMA_DIR,
    MANIFEST_NAME,
    POSTERIOR_ENCODER_DIR,
    VELOCITY_MODEL_DIR,
    find_resumable_checkpoint,
    list_checkpoints,
)

REQUIRED_DIRS = (VELOCITY_MODEL_DIR, POSTERIOR_ENCODER_DIR, EMA_DIR)
LOSS_KEYS = ("loss", "mse", "kl", "lr", "beta", "grad_norm", "ema_decay")
# Points inside a checkpoint write where a child can be made to stop (see `_ZYGOTE`), in the order they happen.
WRITE_POINTS = ("weights", "optimizer", "before-manifest", "manifest-tmp", "rename", "before-prune", "prune")
OTHER_POINTS = ("mid-step", "time")
WAIT_S = 120.0

_ZYGOTE = textwrap.dedent(
    r'''
    """Fork server: imports everything once, then forks one child per command line read from stdin."""
    import importlib.util, json, os, re, shutil, sys, time, traceback

    import torch

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("train_vrfm", sys.argv[1])
    train_vrfm = importlib.util.module_from_spec(spec)
    sys.modules["train_vrfm"] = train_vrfm
    spec.loader.exec_module(train_vrfm)
    # What `main` imports lazily, imported here once so that children start fast.
    import accelerate, accelerate.logging, accelerate.utils, numpy, safetensors.torch, tqdm.auto  # noqa
    import diffusers.optimization, diffusers.training_utils  # noqa
    import diffusers_vrfm.training.checkpointing as ckpt
    import diffusers_vrfm.training.step as step_module
    import diffusers_vrfm.training.data, diffusers_vrfm.training.determinism  # noqa
    import diffusers_vrfm.training.model_card, diffusers_vrfm.training.visuals  # noqa


    def child(command):
        log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        events = os.open(command["events"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        start = time.monotonic()
        pause = command.get("pause") or {}
        state = {"writing": None, "update": None, "micro": 0, "in_prune": False, "weights": 0, "started": False}

        def emit(*words):
            line = " ".join(str(w) for w in (f"{time.monotonic() - start:.4f}", *words))
            os.write(events, (line + "\n").encode())

        def armed(point):
            return pause.get("point") == point and state["writing"] == pause.get("step")

        def hold(point):
            emit("paused", point, state["writing"] if state["writing"] is not None else state["update"])
            while True:  # until the test sends SIGKILL
                time.sleep(60)

        def truncate_half(path):
            os.truncate(path, os.path.getsize(path) // 2)

        original = {
            "save_checkpoint": ckpt.save_checkpoint,
            "finalize_checkpoint": ckpt.finalize_checkpoint,
            "prune_checkpoints": ckpt.prune_checkpoints,
            "resolve_resume_path": ckpt.resolve_resume_path,
            "loss": step_module.vrfm_training_loss,
            "write_model": ckpt.write_model,
            "write_ema": ckpt.write_ema,
            "torch_save": torch.save,
            "replace": os.replace,
            "rmtree": shutil.rmtree,
        }

        def resolve_resume_path(*args, **kwargs):
            path = original["resolve_resume_path"](*args, **kwargs)
            step = 0
            if path is not None:
                with open(os.path.join(path, ckpt.MANIFEST_NAME)) as handle:
                    step = json.load(handle)["global_step"]
            state["update"] = step + 1
            emit("resume", path, step)
            return path

        def save_checkpoint(accelerator, output_dir, global_step, *args, **kwargs):
            state["writing"], state["weights"] = global_step, 0
            emit("enter", global_step)
            result = original["save_checkpoint"](accelerator, output_dir, global_step, *args, **kwargs)
            emit("exit", global_step)
            state["writing"], state["update"], state["micro"] = None, global_step + 1, 0
            return result

        def finalize_checkpoint(*args, **kwargs):
            if armed("before-manifest"):
                hold("before-manifest")
            return original["finalize_checkpoint"](*args, **kwargs)

        def prune_checkpoints(*args, **kwargs):
            if armed("before-prune"):
                hold("before-prune")
            state["in_prune"] = True
            try:
                return original["prune_checkpoints"](*args, **kwargs)
            finally:
                state["in_prune"] = False

        def vrfm_training_loss(*args, **kwargs):
            if state["update"] is None:
                state["update"] = 1  # a fresh start (no resume)
            if not state["started"]:
                state["started"] = True
                emit("train-start", state["update"])
            state["micro"] += 1
            if pause.get("point") == "mid-step" and state["update"] == pause["step"] and state["micro"] == 2:
                hold("mid-step")
            return original["loss"](*args, **kwargs)

        def written_weights(folder):
            state["weights"] += 1
            if armed("weights") and state["weights"] == pause.get("occurrence", 1):
                truncate_half(os.path.join(folder, ckpt.WEIGHTS_FILE_NAME))
                hold("weights")

        def write_model(model, folder, digests):
            result = original["write_model"](model, folder, digests)
            written_weights(folder)
            return result

        def write_ema(ema_model, model, folder, digests):
            result = original["write_ema"](ema_model, model, folder, digests)
            written_weights(folder)
            return result

        def torch_save(obj, f, *args, **kwargs):
            result = original["torch_save"](obj, f, *args, **kwargs)
            path = getattr(getattr(f, "handle", None), "name", f)  # a checkpoint file comes as a HashingFile
            if armed("optimizer") and isinstance(path, (str, os.PathLike)) and str(path).endswith("optimizer.bin"):
                f.flush()
                truncate_half(path)
                hold("optimizer")
            return result

        def replace(src, dst, *args, **kwargs):
            if state["writing"] is not None:
                name = os.path.basename(str(src))
                if armed("manifest-tmp") and name.startswith(ckpt.MANIFEST_NAME + ".tmp"):
                    hold("manifest-tmp")  # the manifest is written under its temporary name, not renamed yet
                if armed("rename") and name.startswith(ckpt.TEMPORARY_PREFIX) and os.path.isdir(src):
                    hold("rename")  # the folder is complete, manifest and all, but not renamed yet
            return original["replace"](src, dst, *args, **kwargs)

        def rmtree(path, *args, **kwargs):
            if state["in_prune"] and armed("prune") and re.match(r"^checkpoint-\d+$", os.path.basename(str(path))):
                found = sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names)
                for file_path in found[: len(found) // 2]:
                    os.remove(file_path)  # a deletion cut short
                hold("prune")
            return original["rmtree"](path, *args, **kwargs)

        ckpt.save_checkpoint = save_checkpoint
        ckpt.finalize_checkpoint = finalize_checkpoint
        ckpt.prune_checkpoints = prune_checkpoints
        ckpt.resolve_resume_path = resolve_resume_path
        step_module.vrfm_training_loss = vrfm_training_loss
        ckpt.write_model = write_model
        ckpt.write_ema = write_ema
        torch.save = torch_save
        os.replace = replace
        shutil.rmtree = rmtree
        summary = train_vrfm.main(train_vrfm.parse_args(command["argv"]))
        emit("done", json.dumps(summary, default=str))


    for line in sys.stdin:
        command = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child(command)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"started": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exited": pid, "returncode": os.waitstatus_to_exitcode(status)}), flush=True)
    '''
)


class Zygote:
    """The fork server: `start(argv, ...)` forks a training child; `wait()` returns its exit code."""

    def __init__(self, folder):
        path = os.path.join(folder, "zygote.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(_ZYGOTE)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}
        env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        self.process = subprocess.Popen(
            [sys.executable, path, SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=folder, env=env
        )
        self.pid = None
        self.count = 0
        self.folder = folder
        self._pending = b""

    def _read(self, timeout=WAIT_S) -> dict:
        """The next answer line (read unbuffered, so that `select` never waits for a line already read)."""
        deadline = time.monotonic() + timeout
        descriptor = self.process.stdout.fileno()
        while b"\n" not in self._pending:
            ready, _, _ = select.select([descriptor], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(descriptor, 65536) if ready else b""
            if not chunk:
                raise AssertionError(f"the fork server did not answer (exit code {self.process.poll()})")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def start(self, argv, pause=None) -> tuple[str, str]:
        """Forks a child running `main(parse_args(argv))`; returns the paths of its event log and its output log."""
        self.count += 1
        events = os.path.join(self.folder, f"events-{self.count:03d}.txt")
        log = os.path.join(self.folder, f"run-{self.count:03d}.log")
        command = {"argv": [str(a) for a in argv], "pause": pause, "events": events, "log": log}
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        self.process.stdin.flush()
        self.pid = self._read()["started"]
        return events, log

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def wait(self) -> int:
        answer = self._read()
        assert answer["exited"] == self.pid
        self.pid = None
        return answer["returncode"]

    def kill(self) -> bool:
        """SIGKILLs the running child; False if it had already exited."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def close(self):
        if self.pid is not None:
            self.kill()
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _events(path) -> list[list[str]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [line.split(" ", 2) for line in handle.read().splitlines()]


def _wait_for_event(zygote, path, name, log, plan=None):
    """Polls the event log until an event `name` appears; fails if the child exits first."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for event in _events(path):
            if event[1] == name:
                return event
        if not zygote.alive():
            break
        time.sleep(0.005)
    where = "" if plan is None else f" at {plan['point']} of the checkpoint-{plan['step']} write or step"
    raise AssertionError(
        f"the child never reached {name!r}{where} (a checkpoint not written to a temporary name and renamed only "
        f"when complete has no such point); its log:\n{_tail(log)}"
    )


def _tail(path, lines=40) -> str:
    if not os.path.exists(path):
        return "(no log)"
    with open(path, encoding="utf-8", errors="replace") as handle:
        return "".join(handle.readlines()[-lines:])


def _argv(output_dir, max_steps, total_limit=2):
    argv = [
        "--backbone", "mlp", "--output_dir", output_dir, "--max_train_steps", max_steps,
        "--train_batch_size", "16", "--gradient_accumulation_steps", "2", "--lr_warmup_steps", "2",
        "--checkpointing_steps", "1", "--validation_steps", "100000", "--num_validation_samples", "16", *FAST,
    ]  # fmt: skip
    return argv + (["--checkpoints_total_limit", total_limit] if total_limit else [])


def _metric_records(output_dir) -> list[dict]:
    """Every record of the metrics log, including the steps a resumed run logged again (each line must parse)."""
    with open(os.path.join(output_dir, "logs", "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _weights(checkpoint) -> dict[str, torch.Tensor]:
    tensors = {}
    for folder in REQUIRED_DIRS:
        for key, value in load_file(os.path.join(checkpoint, folder, "diffusion_pytorch_model.safetensors")).items():
            tensors[f"{folder}/{key}"] = value
    return tensors


def _weight_digests(output_dir) -> dict[str, str]:
    """The SHA-256 digests of the final model, posterior and EMA weights that the script records."""
    with open(os.path.join(output_dir, "logs", "rank_0.json"), encoding="utf-8") as handle:
        return {key: value for key, value in json.load(handle).items() if key.endswith("sha256")}


def _files(checkpoint) -> set[str]:
    return {os.path.relpath(os.path.join(r, n), checkpoint) for r, _, names in os.walk(checkpoint) for n in names}


def _check_after_kill(output_dir, reference_dir, events) -> tuple[str | None, int]:
    """The checks after a kill; returns the checkpoint `latest` must now pick and its step (0 for none)."""
    checkpoints = list_checkpoints(output_dir)
    path, skipped = find_resumable_checkpoint(output_dir, REQUIRED_DIRS, log=lambda message: None)
    assert not skipped, f"an incomplete folder carries a checkpoint name: {skipped}"
    completed = [int(e[2]) for e in events if e[1] == "exit"]
    if path is None:
        assert not checkpoints and not completed, "a completed checkpoint was lost"
        return None, 0
    step = int(os.path.basename(path).split("-")[1])
    assert path == checkpoints[-1][1], "latest is the newest checkpoint folder"
    assert step >= max(completed, default=0), f"checkpoint-{max(completed)} had been completed but is gone"
    # Independently of the manifest: the same files as the uninterrupted run's checkpoint, the same weights, and the
    # optimizer and scheduler states loadable.
    expected = os.path.join(reference_dir, f"checkpoint-{step}")
    assert _files(path) == _files(expected), f"{path} does not hold the files of a complete checkpoint"
    got, want = _weights(path), _weights(expected)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), f"weights of {path}"
    for name in ("optimizer.bin", "scheduler.bin"):
        torch.load(os.path.join(path, name), weights_only=False)
    with open(os.path.join(path, MANIFEST_NAME), encoding="utf-8") as handle:
        assert json.load(handle)["global_step"] == step
    return path, step


def _kill_points(rng, num_kills) -> list[str]:
    """The kinds of the kill points: every kind once per cycle, in a random order."""
    points = []
    while len(points) < num_kills:
        cycle = list(WRITE_POINTS + OTHER_POINTS)
        rng.shuffle(cycle)
        points += cycle
    return points[:num_kills]


def _plan(rng, point, resumed, max_steps, step_seconds) -> dict:
    """Where exactly to kill: the update (one or two after the checkpoint resumed from), which weight file, or the
    delay after the training loop started."""
    low = resumed + 1
    if point == "prune":
        low = max(low, 3)  # something older than the newest two checkpoints must exist to be pruned
    plan = {"point": point, "step": rng.randint(low, max(low, min(max_steps, resumed + 2)))}
    if point == "weights":
        plan["occurrence"] = rng.randint(1, len(REQUIRED_DIRS))
    if point == "time":
        plan["delay_s"] = round(rng.uniform(0.0, min(3, max_steps - resumed) * step_seconds), 4)
    return plan


def _run_kill_test(tmp_path, num_kills, max_steps, seed):
    """Kills a run `num_kills` times, resuming after each kill, then lets it finish and compares it with an
    uninterrupted run. Returns the list of kills."""
    wall_start = time.monotonic()
    rng = random.Random(seed)
    zygote = Zygote(str(tmp_path))
    try:
        reference = str(tmp_path / "reference")
        events_path, log = zygote.start(_argv(reference, max_steps, total_limit=None))
        assert zygote.wait() == 0, _tail(log)
        entered = [float(e[0]) for e in _events(events_path) if e[1] == "enter"]
        step_seconds = (entered[-1] - entered[0]) / max(1, len(entered) - 1)

        killed = str(tmp_path / "killed")
        resumed, kills, rows, expected_path = 0, [], [], None
        for point in _kill_points(rng, num_kills):
            if resumed >= max_steps:
                break
            argv = _argv(killed, max_steps) + (["--resume_from_checkpoint", "latest"] if kills else [])
            plan = _plan(rng, point, resumed, max_steps, step_seconds)
            if point == "time":
                events_path, log = zygote.start(argv)
                _wait_for_event(zygote, events_path, "train-start", log)
                time.sleep(plan["delay_s"])
            else:
                events_path, log = zygote.start(argv, pause=plan)
                _wait_for_event(zygote, events_path, "paused", log, plan)
            was_running = zygote.kill()
            returncode = zygote.wait()
            events = _events(events_path)
            if kills:
                resume_event = next(e for e in events if e[1] == "resume")
                assert resume_event[2].split()[0] == str(expected_path), "latest picked another checkpoint"
            if not was_running or returncode != -signal.SIGKILL:
                assert returncode == 0, _tail(log)
                expected_path = find_resumable_checkpoint(killed, REQUIRED_DIRS)[0]
                break  # a delayed kill came after the run had finished: nothing left to kill
            open_writes = {e[2] for e in events if e[1] == "enter"} - {e[2] for e in events if e[1] == "exit"}
            inside = bool(open_writes)
            if point in WRITE_POINTS:
                assert inside, f"the pause {plan} was not inside a checkpoint write"
            expected_path, resumed = _check_after_kill(killed, reference, events)
            kills.append({**plan, "inside": inside, "resumed": resumed})
            where = f"in the checkpoint-{min(open_writes, key=int)} write" if inside else "outside a checkpoint write"
            detail = f"at {point}, step {plan['step']}"
            if point == "weights":
                detail = f"at weights file {plan['occurrence']}/{len(REQUIRED_DIRS)}, step {plan['step']}"
            elif point == "time":
                detail = f"{plan['delay_s']:.3f} s into training"
            rows.append(f"  kill {len(kills):2d}: {detail:<30} {where:<36} -> latest = checkpoint-{resumed}")

        events_path, log = zygote.start(_argv(killed, max_steps) + ["--resume_from_checkpoint", "latest"])
        assert zygote.wait() == 0, _tail(log)
        assert next(e for e in _events(events_path) if e[1] == "resume")[2].split()[0] == str(expected_path)
    finally:
        zygote.close()

    inside = sum(k["inside"] for k in kills)
    print(f"\nkill test (seed {seed}, {max_steps} steps, a checkpoint every step, the newest 2 kept):")
    print("\n".join(rows))
    print(
        f"kill points exercised: {len(kills)}, inside a checkpoint write: {inside}; "
        f"wall time {time.monotonic() - wall_start:.1f} s"
    )
    assert len(kills) >= num_kills - 1, "the run finished before the planned kills"
    assert inside >= sum(k["point"] in WRITE_POINTS for k in kills)

    # The loss sequence: every record logged by any of the runs (a resumed run logs its steps again) equals the
    # uninterrupted run's record for that step, and every step was logged.
    expected = {record["step"]: record for record in _metric_records(reference)}
    records = _metric_records(killed)
    assert sorted(expected) == sorted({r["step"] for r in records}) == list(range(1, max_steps + 1))
    for record in records:
        for key in LOSS_KEYS:
            assert record[key] == expected[record["step"]][key], (record["step"], key)
    # The final weights: model, posterior and EMA, and the saved pipeline.
    assert _weight_digests(killed) == _weight_digests(reference), "model, posterior and EMA weights differ"
    for folder in (VELOCITY_MODEL_DIR, POSTERIOR_ENCODER_DIR):
        name = os.path.join(folder, "diffusion_pytorch_model.safetensors")
        with open(os.path.join(reference, name), "rb") as a, open(os.path.join(killed, name), "rb") as b:
            assert a.read() == b.read(), f"the saved pipeline's {folder} differs"
    return kills


def test_killed_training_resumes_exactly(tmp_path):
    # Every kind of kill point once (7 inside a checkpoint write, one mid-step, one after a random delay).
    kills = _run_kill_test(tmp_path, num_kills=len(WRITE_POINTS + OTHER_POINTS), max_steps=16, seed=0)
    assert {k["point"] for k in kills} == set(WRITE_POINTS + OTHER_POINTS)


@pytest.mark.slow
def test_killed_training_resumes_exactly_many_kills(tmp_path):
    kills = _run_kill_test(tmp_path, num_kills=30, max_steps=60, seed=1)
    assert len(kills) == 30
