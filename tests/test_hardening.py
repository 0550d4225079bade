"""Bad inputs and faults against the CLI, as a hostile or careless user would try them (issue 15).

Every case of ``CASES`` runs the CLI in a subprocess of its own (its own directory, holding ``--out`` and
whatever the case prepared; started by ``cli_launcher.py``, which forks a fresh process per run from one
that has done the slow imports once) and must give: a non-zero exit, exactly one line on stderr that starts with ``error:``
and names the culprit (file, option, module or tensor), no traceback, nothing new at or beside ``--out``,
and everything that was there before intact (checksums of the whole directory). The cases run a few at a
time in a thread pool; the test of a case waits for its own.

Then the faults that need a running process: a directory appearing at ``--out`` during the run, two runs
given one ``--out``, SIGINT / SIGTERM during the layer walk and during the save, SIGKILL then a rerun. They
use the pause hook of ``io.output.pause_for_tests`` (``COMPRESSOR_TEST_PAUSE``) to act at a known point.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, str(ROOT / "cli.py")]
SMALL = ["--n-samples", "4", "--seq-len", "32", "--set", "calibration.batch_size=2"]
WORKERS = 3


def cli_env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPRESSOR_")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="250",
               COMPRESSOR_CACHE=str(cache), HF_MODULES_CACHE=str(cache.parent / "modules"), OMP_NUM_THREADS="1",
               **extra)
    return env


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path → sha256 (files) or "dir" of everything under ``folder``."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@dataclass
class World:
    """What the cases share: tiny model directories, a calibration text, a compressed output, a cache, and
    the launcher that starts CLI processes."""

    root: Path
    models: dict[str, Path]
    text: Path
    compressed: Path
    cache: Path
    launcher: "Launcher"

    def copy_model(self, arch: str, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        target = into / f"{arch}-model"
        shutil.copytree(self.models[arch], target)
        return target

    def copy_output(self, into: Path) -> Path:
        target = into / "compressed"
        shutil.copytree(self.compressed, target)
        return target


class Child:
    """A CLI process started by the launcher: ``pid``, its exit status, and its output (files)."""

    def __init__(self, request_id: int, streams: Path):
        self.id, self.streams = request_id, streams
        self.pid_ready, self.done = threading.Event(), threading.Event()
        self.pid = self.returncode = None

    def wait(self, timeout: float = 600) -> int:
        assert self.done.wait(timeout), "the CLI process did not end"
        return self.returncode

    def _read(self, suffix: str) -> str:
        path = self.streams / f"{self.id}.{suffix}"
        return path.read_text() if path.is_file() else ""  # not yet opened by the child

    @property
    def stdout(self) -> str:
        return self._read("out")

    @property
    def stderr(self) -> str:
        return self._read("err")

    def wait_for(self, line: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.done.is_set():
            if line in self.stdout.splitlines():
                return
            time.sleep(0.05)
        raise AssertionError(f"never printed {line!r}: {self.stdout} {self.stderr}")

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)


class Launcher:
    """Client of ``cli_launcher.py``: ``start(argv, cwd, ...)`` → a ``Child``."""

    def __init__(self, env: dict[str, str], streams: Path):
        self.env, self.streams = env, streams
        streams.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_launcher.py"))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
        assert json.loads(self.process.stdout.readline()) == {"ready": True}
        self.children: dict[int, Child] = {}
        self.lock, self.next_id = threading.Lock(), 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            child = self.children[message["id"]]
            if "pid" in message:
                child.pid = message["pid"]
                child.pid_ready.set()
            else:
                child.returncode = message["returncode"]
                child.done.set()

    def start(self, argv: list, cwd: Path, stdin: str | None = None, **env: str) -> Child:
        with self.lock:
            self.next_id += 1
            child = Child(self.next_id, self.streams)
            self.children[child.id] = child
            stdin_file = None
            if stdin is not None:
                stdin_file = self.streams / f"{child.id}.in"
                stdin_file.write_text(stdin)
            request = {"id": child.id, "argv": [str(a) for a in argv], "cwd": str(cwd), "script": CLI[1],
                       "env": {**self.env, **env}, "stdin": str(stdin_file) if stdin_file else None,
                       "stdout": str(self.streams / f"{child.id}.out"),
                       "stderr": str(self.streams / f"{child.id}.err")}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        assert child.pid_ready.wait(60)
        return child

    def close(self) -> None:
        self.process.stdin.close()
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="session")
def world(tmp_path_factory, model_dirs, small_text) -> World:
    from compressor.api import compress

    root = tmp_path_factory.mktemp("hardening")
    compressed = root / "lord-out"
    compress(str(model_dirs["llama"]), "lord", compressed, progress=False,
             overrides=["calibration.n_samples=4", "calibration.seq_len=32", "calibration.batch_size=2",
                        f"calibration.dataset={small_text}"])
    launcher = Launcher(cli_env(root / "cache"), root / "streams")
    yield World(root, dict(model_dirs), Path(small_text), compressed, root / "cache", launcher)
    launcher.close()


# -- the cases ----------------------------------------------------------------------------------------------

Args = Callable[[World, Path], list]  # (world, the case's directory) → CLI arguments (out is dir / "out")


@dataclass
class Case:
    id: str
    args: Args
    culprit: tuple[str, ...]  # fragments the error line must hold
    prepare: Callable[[World, Path], None] | None = None
    early: bool = False  # fails before anything is loaded: nothing on stdout
    stdin: str | None = None
    code: int = 1
    check: Callable[[World, Path], None] | None = None  # more assertions after the run
    extra: dict = field(default_factory=dict)


def compress(model: Callable[[World, Path], object], *extra, recipe: str = "lord") -> Args:
    def args(w: World, d: Path) -> list:
        return ["compress", model(w, d), "--recipe", recipe, "--out", d / "out", *SMALL,
                "--calib-dataset", w.text, *extra]
    return args


def llama(w: World, d: Path) -> Path:
    return w.models["llama"]


def local(name: str) -> Callable[[World, Path], Path]:
    return lambda w, d: d / name


def write(name: str, content: str | bytes) -> Callable[[World, Path], None]:
    def prepare(w: World, d: Path) -> None:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return prepare


def edit_weights(arch: str, edit: Callable[[dict], None]) -> Callable[[World, Path], None]:
    def prepare(w: World, d: Path) -> None:
        model = w.copy_model(arch, d)
        state = load_file(str(model / "model.safetensors"))
        edit(state)
        save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    return prepare


def edit_config(arch: str, **changes) -> Callable[[World, Path], None]:
    def prepare(w: World, d: Path) -> None:
        model = w.copy_model(arch, d)
        config = json.loads((model / "config.json").read_text())
        config.update(changes)
        (model / "config.json").write_text(json.dumps(config))
    return prepare


def edit_manifest(edit: Callable[[dict], None]) -> Callable[[World, Path], None]:
    def prepare(w: World, d: Path) -> None:
        out = w.copy_output(d)
        manifest = json.loads((out / "compression.json").read_text())
        edit(manifest)
        (out / "compression.json").write_text(json.dumps(manifest))
    return prepare


def nan_at(key: str) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        state[key] = state[key].clone()
        state[key][0, 0] = float("nan")
    return edit


DOWN = "model.layers.0.mlp.down_proj.weight"
GPT2_FC = "transformer.h.1.mlp.c_fc.weight"
EVIL_CODE = """import pathlib
pathlib.Path(__file__).with_name("CODE_RAN").write_text("it ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def shipped_code(w: World, d: Path) -> None:
    model = w.copy_model("llama", d)
    (model / "modeling_evil.py").write_text(EVIL_CODE)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                               "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (model / "config.json").write_text(json.dumps(config))


def code_did_not_run(w: World, d: Path) -> None:
    assert not (d / "llama-model" / "CODE_RAN").exists()
    assert not list((w.root / "modules").rglob("*modeling_evil*"))  # not even copied to be imported


def drop(key: str) -> Callable[[dict], None]:
    return lambda state: state.pop(key)


def reshape(key: str) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] - 8)
    return edit


def precious_out(w: World, d: Path) -> None:
    (d / "out").mkdir()
    (d / "out" / "keep.txt").write_text("precious")


def model_is_out(w: World, d: Path) -> list:
    model = d / "llama-model"
    return ["compress", model, "--recipe", "lord", "--out", model, "--overwrite", *SMALL, "--calib-dataset", w.text]


def evaluate(target: Callable[[World, Path], object], *extra) -> Args:
    return lambda w, d: ["eval", target(w, d), "--dataset", w.text, "--seq-len", "32", "--max-tokens", "128",
                         *extra]


def output(w: World, d: Path) -> Path:
    return d / "compressed"


# -- input files: pickles, safetensors headers, links, tokenizers, adapters, config fields (issue 34)

class Unpickled:
    """A pickle that leaves a file beside itself if anything ever unpickles it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def pickled_only(w: World, d: Path) -> None:
    import pickle

    model = w.copy_model("llama", d)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Unpickled(model / "UNPICKLED")))


def edit_header(edit: Callable[[bytes, int, dict], bytes]) -> Callable[[World, Path], None]:
    """The llama model with its model.safetensors rewritten by ``edit(raw bytes, header size, header)``."""
    def prepare(w: World, d: Path) -> None:
        path = w.copy_model("llama", d) / "model.safetensors"
        raw = path.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        path.write_bytes(edit(raw, size, json.loads(raw[8:8 + size])))
    return prepare


def with_header(header: dict, raw: bytes, size: int) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + raw[8 + size:]


def bad_dtype(raw: bytes, size: int, header: dict) -> bytes:
    header["lm_head.weight"]["dtype"] = "X9"
    return with_header(header, raw, size)


def overlapping(raw: bytes, size: int, header: dict) -> bytes:
    header[DOWN]["data_offsets"] = header["lm_head.weight"]["data_offsets"]
    return with_header(header, raw, size)


def nested(raw: bytes, size: int, header: dict) -> bytes:
    """A header of 100,000 nested JSON arrays (a RecursionError to a JSON parser)."""
    return (100_000).to_bytes(8, "little") + b"[" * 100_000 + raw[8 + size:]


def link_weights_to(name: str, into: Callable[[World, Path], Path]) -> Callable[[World, Path], None]:
    def prepare(w: World, d: Path) -> None:
        folder = into(w, d)
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").symlink_to(folder / name)
    return prepare


def truncated_tokenizer(w: World, d: Path) -> None:
    path = w.copy_model("llama", d) / "tokenizer.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def third_layer(state: dict) -> None:
    state.update({k.replace("layers.1.", "layers.2."): v.clone() for k, v in list(state.items()) if "layers.1." in k})


def smaller_vocabulary(w: World, d: Path) -> None:
    edit_config("llama", vocab_size=100)(w, d)
    path = d / "llama-model" / "model.safetensors"
    state = load_file(str(path))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][:100].clone()
    save_file(state, str(path), metadata={"format": "pt"})


def torch_dtype_only(w: World, d: Path) -> None:
    config_path = w.copy_model("llama", d) / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = "float99"
    config_path.write_text(json.dumps(config))


EORA_BUILT = threading.Lock()


def eora_without_adapter_weights(w: World, d: Path) -> None:
    """A copy of an EoRA output (built once) whose adapter/adapter_model.safetensors was deleted."""
    from compressor.api import compress as run

    built = w.root / "eora-out"
    with EORA_BUILT:
        if not built.is_dir():
            run(str(w.models["llama"]), "rtn-w4-eora-r64", built, progress=False,
                overrides=["calibration.n_samples=4", "calibration.seq_len=32", "calibration.batch_size=2",
                           f"calibration.dataset={w.text}", "quantize.group_size=64", "eora.rank=8"])
    shutil.copytree(built, d / "compressed")
    (d / "compressed" / "adapter" / "adapter_model.safetensors").unlink()
def symlinked_out(to_a_file: bool) -> Callable[[World, Path], None]:
    def prepare(w: World, d: Path) -> None:
        target = d / "target"
        target.write_text("x") if to_a_file else target.mkdir()
        (d / "out").symlink_to(target)
    return prepare


def out_named(name: str) -> Args:
    return lambda w, d: compress(llama)(w, d)[:4] + ["--out", d / name] + compress(llama)(w, d)[6:]


def nan_in_output(w: World, d: Path) -> None:
    weights = w.copy_output(d) / "model.safetensors"
    state = load_file(str(weights))
    nan_at(next(k for k, t in sorted(state.items()) if t.is_floating_point() and t.dim() == 2))(state)
    save_file(state, str(weights), metadata={"format": "pt"})


PRUNE = "steps:\n  - method: prune\n    config: {algorithm: wanda, pattern: unstructured}\n"

# -- issue 34, resume state: a recorded --stream run (layer 0 of 2 done) whose files were changed afterwards
RESUMED = ("--set", "steps.0.config.group_size=64", "--set", "steps.1.config.rank=8")  # group 64: nothing to warn
RESUME_RECIPE = "rtn-w4-eora-r64"  # a compensated step: the record holds a lora file too
HIDDEN, LORA = ".resume/hidden-00001.safetensors", ".resume/lora-00000.safetensors"
SHARD = "model-00001-of-00003.safetensors"  # layer 0's
_recording = threading.Lock()


def recorded_run(world: World) -> Path:
    """The ``.out.partial`` of a ``--stream`` run stopped by SIGINT once layer 0 is recorded (made once)."""
    folder = world.root / "recorded"
    with _recording:
        if not (folder / ".out.partial" / ".resume" / "state.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            args = compress(llama, *RESUMED, "--stream", recipe=RESUME_RECIPE)(world, folder)
            child = world.launcher.start(args, folder, COMPRESSOR_TEST_PAUSE="recorded",
                                         COMPRESSOR_TEST_RESUME=str(folder / "go"))
            child.wait_for("paused at recorded")
            child.send_signal(signal.SIGINT)
            assert child.wait() == 130, child.stderr
    return folder / ".out.partial"


def tampered(file: str, edit: Callable[[Path], None], forge: bool = False) -> Callable[[World, Path], None]:
    """A copy of the recorded run beside ``d / "out"`` with ``edit(path of file)`` done to it; ``forge``: the
    record's digest of the file and its seal made to match again (only the checks of the content are left)."""
    def prepare(w: World, d: Path) -> None:
        partial = d / ".out.partial"
        shutil.copytree(recorded_run(w), partial)
        edit(partial / file)
        if forge:
            from compressor.io import durable, resume

            state = json.loads((partial / ".resume" / "state.json").read_text())
            state["digests"][Path(file).name] = durable.digest(partial / file)
            state["seal"] = resume.seal(state)
            (partial / ".resume" / "state.json").write_text(json.dumps(state))
    return prepare


def tensors_edited(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        state = load_file(str(path))
        edit(state)
        save_file(state, str(path))
    return change


def each_tensor(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    return lambda state: state.update({key: change(value) for key, value in state.items()})


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def first_nan(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[0] = float("nan")
    return tensor


def edited_log(path: Path) -> None:
    state = json.loads(path.read_text())
    state["log"][0]["note"] = "edited"
    path.write_text(json.dumps(state))


resumed = compress(llama, *RESUMED, "--resume", recipe=RESUME_RECIPE)
CHANGED = ("changed since the interrupted run wrote it", "remove", ".out.partial to start over")


def billion_laughs(where: str, levels: int = 30) -> str:
    """A recipe whose aliases expand to 2**levels items in a config value, the targets or the calibration."""
    lines = ["a0: &a0 [x, x]"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, levels)]
    bomb = f"*a{levels - 1}"
    step = {"value": f"{{method: lord, config: {{ratio: {bomb}}}}}", "targets": f"{{method: lord, targets: {bomb}}}",
            "calibration": "{method: lord}"}[where]
    calibration = f"calibration: {{dataset: {bomb}}}\n" if where == "calibration" else ""
    return "\n".join(lines) + f"\n{calibration}steps:\n  - {step}\n"


BOMB_VALUE = "[" + ", ".join(["&a0 [x, x]"] + [f"&a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 30)]) + "]"


def own_recipe(w: World, d: Path) -> list:
    return compress(llama, recipe=str(d / "r.yaml"))(w, d)

CASES = [
    # -- 1/10: the output directory
    Case("out-not-empty", compress(llama), ("not empty", "--overwrite"), prepare=precious_out, early=True),
    Case("out-is-a-file", compress(llama), ("not a directory",), prepare=write("out", "x"), early=True),
    Case("out-parent-is-a-file", lambda w, d: compress(llama)(w, d)[:4] + ["--out", d / "file" / "out"]
         + compress(llama)(w, d)[6:], ("file", "not a directory"), prepare=write("file", "x"), early=True),
    Case("out-is-the-model", model_is_out, ("holds the input", "llama-model"),
         prepare=lambda w, d: w.copy_model("llama", d), early=True),
    Case("out-holds-the-model", lambda w, d: ["compress", d / "sub" / "llama-model", "--recipe", "lord", "--out",
                                              d / "sub", "--overwrite", *SMALL, "--calib-dataset", w.text],
         ("holds the input", "llama-model"), prepare=lambda w, d: w.copy_model("llama", d / "sub"), early=True),
    Case("out-is-cwd", lambda w, d: compress(llama)(w, d)[:4] + ["--out", ".", "--overwrite"]
         + compress(llama)(w, d)[6:], ("current directory",), prepare=write("keep.txt", "x"), early=True),
    # -- 9: outputs that cannot be written fail before loading
    Case("out-under-proc", lambda w, d: compress(llama)(w, d)[:4] + ["--out", "/proc/compressor-out"]
         + compress(llama)(w, d)[6:], ("/proc/compressor-out",), early=True),
    # -- 2: incomplete or mis-shaped checkpoints
    Case("missing-tensor", compress(local("llama-model")), ("lacks 1 tensor", DOWN),
         prepare=edit_weights("llama", drop(DOWN))),
    Case("config-claims-more-layers", compress(local("llama-model")), ("model.layers.2.", "config.json"),
         prepare=edit_config("llama", num_hidden_layers=3)),
    Case("tensor-wrong-shape", compress(local("llama-model")), (DOWN, "shape [64, 120]", "[64, 128]"),
         prepare=edit_weights("llama", reshape(DOWN))),
    Case("eval-missing-tensor", evaluate(local("llama-model")), ("lacks", DOWN),
         prepare=edit_weights("llama", drop(DOWN))),
    # -- 3: code shipped in the model directory never runs without --trust-remote-code
    Case("remote-code-refused", compress(local("llama-model")), ("--trust-remote-code",), prepare=shipped_code,
         stdin="y\n" * 20, check=code_did_not_run, early=True),
    Case("remote-code-refused-eval", evaluate(local("llama-model")), ("--trust-remote-code",),
         prepare=shipped_code, stdin="y\n" * 20, check=code_did_not_run),
    # -- 4: non-finite weights refused up front, naming the tensor
    # (group 64: a servable size on the tiny model, so the run has nothing to warn about before the error)
    Case("nan-weight-rtn", compress(local("llama-model"), "--set", "quantize.group_size=64", recipe="rtn-w4"),
         (DOWN, "non-finite"),
         prepare=edit_weights("llama", nan_at(DOWN))),
    Case("nan-weight-lord", compress(local("llama-model")), (DOWN, "non-finite"),
         prepare=edit_weights("llama", nan_at(DOWN))),
    Case("inf-weight-gpt2", compress(local("gpt2-model")), (GPT2_FC, "non-finite"),
         prepare=edit_weights("gpt2", lambda s: s.__setitem__(GPT2_FC, s[GPT2_FC] * float("inf")))),
    # -- 5: the manifest is held to the tensors present
    Case("manifest-says-merged", evaluate(output), ("compression.json", "merged: true"),
         prepare=edit_manifest(lambda m: m.update(merged=True))),
    Case("manifest-wrong-rank", evaluate(output), ("compression.json", "shape"),
         prepare=edit_manifest(lambda m: next(iter(m["modules"].values())).update(rank=3))),
    Case("manifest-wrong-kind", evaluate(output), ("compression.json",),
         prepare=edit_manifest(lambda m: m["modules"].update({k: {**v, "kind": "cur"} for k, v in
                                                              list(m["modules"].items())[:1]}))),
    Case("manifest-unknown-module", evaluate(output), ("compression.json", "model.layers.9.mlp.up_proj"),
         prepare=edit_manifest(lambda m: m["modules"].update(
             {"model.layers.9.mlp.up_proj": next(iter(m["modules"].values()))}))),
    Case("manifest-not-json", lambda w, d: ["inspect", d / "compressed"], ("compression.json", "not valid JSON"),
         prepare=lambda w, d: (w.copy_output(d), (d / "compressed" / "compression.json").write_text("{oops"))),
    Case("manifest-newer-format", lambda w, d: ["inspect", d / "compressed"], ("newer format",),
         prepare=edit_manifest(lambda m: m.update(format_version=99))),
    Case("weights-truncated", evaluate(output), ("model.safetensors",),
         prepare=lambda w, d: (w.copy_output(d), (d / "compressed" / "model.safetensors").write_bytes(b"\0" * 10))),
    Case("weights-missing", evaluate(output), ("model.safetensors", "missing"),
         prepare=lambda w, d: (w.copy_output(d), (d / "compressed" / "model.safetensors").unlink())),
    Case("output-without-tokenizer", evaluate(output), ("compressed", "tokenizer"),
         prepare=lambda w, d: (w.copy_output(d), *(p.unlink() for p in (d / "compressed").glob("tokenizer*")))),
    Case("log-damaged", lambda w, d: ["inspect", d / "compressed"], ("compression_log.jsonl:2",),
         prepare=lambda w, d: (w.copy_output(d), (d / "compressed" / "compression_log.jsonl").write_text(
             (w.compressed / "compression_log.jsonl").read_text().splitlines()[0] + "\n{not json\n"))),
    # -- GGUF export (issue 33): refusals before anything is written
    Case("gguf-family-refused", lambda w, d: ["export", w.models["opt"], "--format", "gguf", "--to", d / "m.gguf"],
         ("opt", "not one this exporter describes")),
    Case("gguf-bad-type", lambda w, d: ["export", w.compressed, "--format", "gguf", "--to", d / "m.gguf",
                                        "--type", "q5_k"], ("--type", "q5_k"), early=True),
    Case("gguf-adapter-without-compensation", lambda w, d: ["export", w.compressed, "--format", "gguf", "--to",
                                                            d / "m.gguf", "--adapter-to", d / "a.gguf"],
         ("--adapter-to", "no low-rank compensation")),
    # -- 7: targets that match nothing
    Case("targets-match-nothing", compress(llama, "--set", "steps.0.targets=[mlp.down]"),
         ("match none", "mlp.down_proj", "self_attn.q_proj"), early=True),
    Case("ignore-everything", compress(llama, "--set", "steps.0.ignore=[re:.*]"), ("match none",), early=True),
    # -- 11: values accepted without a word before
    Case("seq-len-over-positions-llama", compress(llama, "--seq-len", "1000"), ("--seq-len", "1000", "128"),
         early=True),
    Case("seq-len-over-positions-gpt2", compress(lambda w, d: w.models["gpt2"], "--seq-len", "1000"),
         ("--seq-len", "128"), early=True),
    Case("seq-len-over-positions-opt", compress(lambda w, d: w.models["opt"], "--seq-len", "1000"),
         ("--seq-len", "128"), early=True),
    Case("eval-seq-len-over-positions", lambda w, d: ["eval", w.models["gpt2"], "--dataset", w.text, "--seq-len",
                                                      "1000"], ("--seq-len", "1000")),
    Case("eval-seq-len-0", lambda w, d: ["eval", w.models["llama"], "--seq-len", "0"], ("--seq-len",), early=True),
    Case("eval-max-tokens-negative", lambda w, d: ["eval", w.models["llama"], "--max-tokens", "-100"],
         ("--max-tokens",), early=True),
    Case("empty-override", compress(llama, "--set", "lord.ratio="), ("lord.ratio=", "empty value"), early=True),
    Case("two-rank-rules-by-set", compress(llama, "--set", "lord.ratio=0.3", "--set", "lord.rank=8"),
         ("lord.ratio=0.3", "lord.rank=8", "only one of"), early=True),
    Case("n-samples-0", compress(llama, "--n-samples", "0"), ("n_samples",), early=True),
    Case("ratio-out-of-range", compress(llama, "--set", "lord.ratio=1.5"), ("ratio", "1.5"), early=True),
    Case("ratio-not-a-number", compress(llama, "--set", "lord.ratio=abc"), ("lord.ratio=abc", "number"),
         early=True),
    # -- 12: override values by the field's type
    Case("bad-prune-pattern", lambda w, d: compress(llama, "--set", "prune.pattern=3:2", recipe=str(d / "p.yaml"))(
        w, d), ("pattern",), prepare=write("p.yaml", PRUNE), early=True),
    # -- 13: messages that name the culprit
    Case("bad-regex", compress(llama, "--set", "steps.0.targets=re:("), ("re:(", "regular expression"),
         early=True),
    Case("binary-recipe", lambda w, d: compress(llama, recipe=str(d / "r.yaml"))(w, d), ("r.yaml", "UTF-8"),
         prepare=write("r.yaml", b"\xff\xfe\x00binary\x89PNG"), early=True),
    Case("binary-calibration-file", lambda w, d: compress(llama)(w, d)[:-1] + [d / "c.txt"], ("c.txt", "UTF-8"),
         prepare=write("c.txt", b"\xff\xfe\x00\x89PNG" * 100)),
    Case("calibration-section-scalar", compress(llama, "--set", "calibration=5"), ("calibration=5", "section"),
         early=True),
    Case("recipe-section-scalar", lambda w, d: compress(llama, recipe=str(d / "r.yaml"))(w, d),
         ("calibration", "not a mapping"), prepare=write("r.yaml", "calibration: 5\nsteps:\n  - method: lord\n"),
         early=True),
    Case("eval-cuda-missing", lambda w, d: ["eval", w.models["llama"], "--device", "cuda"],
         ("--device cuda", "not available"), early=True,
         extra={"skip_if_cuda": True}),
    Case("model-without-tokenizer-file", compress(local("llama-model")), ("llama-model", "sentencepiece or tiktoken"),
         prepare=lambda w, d: (w.copy_model("llama", d), (d / "llama-model" / "tokenizer.json").unlink())),
    Case("model-without-model-type", compress(local("llama-model")), ("model_type",),
         prepare=lambda w, d: (w.copy_model("llama", d), (d / "llama-model" / "config.json").write_text("{}")),
         early=True),
    # -- the rest of the catalogue
    Case("unknown-model", compress(lambda w, d: d / "no-such-model"), ("model not found",), early=True),
    Case("model-dir-without-config", compress(local("empty")), ("no config.json",),
         prepare=lambda w, d: (d / "empty").mkdir(), early=True),
    Case("unknown-method", lambda w, d: compress(llama, recipe=str(d / "r.yaml"))(w, d), ("lorx",),
         prepare=write("r.yaml", "steps:\n  - method: lorx\n"), early=True),
    Case("misspelt-key", compress(llama, "--set", "lord.ratoi=0.3"), ("ratoi", "valid:"), early=True),
    Case("rank-too-large", compress(llama, "--set", "lord.ratio=null", "--set", "lord.rank=100"), ("rank 100",),
         early=True),
    Case("invalid-yaml", lambda w, d: compress(llama, recipe=str(d / "r.yaml"))(w, d), ("r.yaml", "YAML"),
         prepare=write("r.yaml", "steps: [\n"), early=True),
    Case("missing-recipe", lambda w, d: compress(llama, recipe=str(d / "nope.yaml"))(w, d), ("nope.yaml",),
         early=True),
    Case("missing-calibration-file", lambda w, d: compress(llama)(w, d)[:-1] + [d / "missing.txt"],
         ("missing.txt",), early=True),
    Case("bad-jsonl", lambda w, d: compress(llama)(w, d)[:-1] + [d / "c.jsonl"], ("c.jsonl:2",),
         prepare=write("c.jsonl", '{"text": "fine"}\n{"txt": "no"}\n')),
    Case("calibration-too-short", lambda w, d: compress(llama)(w, d)[:-1] + [d / "c.txt"], ("c.txt", "seq_len"),
         prepare=write("c.txt", "too short")),
    Case("bad-dtype", compress(llama, "--dtype", "float8"), ("--dtype", "float8"), early=True),
    Case("bad-storage-dtype", compress(llama, "--storage-dtype", "int8"), ("--storage-dtype", "int8"), early=True),
    Case("bad-device", compress(llama, "--device", "nodevice"), ("nodevice",), early=True),
    Case("merge-shape-changing", compress(llama, "--merge", recipe="modegpt-mlp-20"), ("--merge", "modegpt"),
         early=True),
    Case("override-without-value", compress(llama, "--set", "lord.ratio"), ("KEY=VALUE",), early=True),
    Case("inspect-plain-model", lambda w, d: ["inspect", w.models["llama"]], ("no compression.json",), early=True),
    Case("eval-unknown-dataset", lambda w, d: ["eval", w.models["llama"], "--dataset", "no-such-set"],
         ("no-such-set",), early=True),
    Case("eval-json-into-missing-dir", evaluate(lambda w, d: w.models["llama"], "--json", "/nonexistent/x.json"),
         ("--json",), early=True),
    # -- issue 34, resume state: every file --resume would reuse is verified first; nothing is continued from
    # a file changed since it was written (or a record consistent with itself but holding wrong hidden states)
    Case("resume-hidden-scaled", resumed, (HIDDEN, *CHANGED),
         prepare=tampered(HIDDEN, tensors_edited(each_tensor(lambda t: t * 7)))),
    Case("resume-hidden-nan", resumed, (HIDDEN, *CHANGED),
         prepare=tampered(HIDDEN, tensors_edited(each_tensor(first_nan)))),
    Case("resume-hidden-truncated", resumed, (HIDDEN, *CHANGED), prepare=tampered(HIDDEN, truncated)),
    Case("resume-hidden-wrong-shape", resumed, (HIDDEN, *CHANGED),
         prepare=tampered(HIDDEN, tensors_edited(each_tensor(lambda t: t[..., :-8].contiguous())))),
    Case("resume-shard-zeroed", resumed, (SHARD, *CHANGED),
         prepare=tampered(SHARD, tensors_edited(each_tensor(torch.zeros_like)))),
    Case("resume-shard-truncated", resumed, (SHARD, *CHANGED), prepare=tampered(SHARD, truncated)),
    Case("resume-shard-missing", resumed, (SHARD, "is missing", "to start over"),
         prepare=tampered(SHARD, Path.unlink)),
    Case("resume-lora-scaled", resumed, (LORA, *CHANGED),
         prepare=tampered(LORA, tensors_edited(each_tensor(lambda t: t * 7)))),
    Case("resume-state-edited", resumed, ("state.json", "seal", "to start over"),
         prepare=tampered(".resume/state.json", edited_log)),
    Case("resume-forged-hidden-nan", resumed, (HIDDEN, "non-finite", "to start over"),
         prepare=tampered(HIDDEN, tensors_edited(each_tensor(first_nan)), forge=True)),
    Case("resume-forged-hidden-wrong-shape", resumed, (HIDDEN, "shape", "to start over"),
         prepare=tampered(HIDDEN, tensors_edited(each_tensor(lambda t: t[:, :-1].contiguous())), forge=True)),
    Case("resume-forged-hidden-batch-missing", resumed, (HIDDEN, "batches", "to start over"),
         prepare=tampered(HIDDEN, tensors_edited(lambda state: state.pop(sorted(state)[-1])), forge=True)),
    # -- issue 34, item 4 and 6 (recipes): bombs and duplicates refused while reading, short windows refused
    *(Case(f"recipe-alias-bomb-{where}", own_recipe, ("r.yaml", "line 2", "alias '*a0'", "not allowed"),
           prepare=write("r.yaml", billion_laughs(where)), early=True)
      for where in ("value", "targets", "calibration")),
    Case("override-alias-bomb", compress(llama, "--set", "steps.0.targets=" + BOMB_VALUE),
         ("override 'steps.0.targets=", "alias '*a0'"), early=True),
    Case("recipe-duplicate-key", own_recipe, ("r.yaml", "line 5", "duplicate key 'ratio'", "line 4"),
         prepare=write("r.yaml", "steps:\n  - method: lord\n    config:\n      ratio: 0.2\n      ratio: 0.9\n"),
         early=True),
    Case("recipe-40mb-of-regexes", own_recipe, ("r.yaml", "bytes", "1 MiB"), early=True,
         prepare=write("r.yaml", "steps:\n  - method: lord\n    targets:\n" + "      - 're:(a|b)*c'\n" * 2_000_000)),
    Case("recipe-too-many-targets", own_recipe, ("r.yaml", "step 0", "20,000 target and ignore patterns"),
         prepare=write("r.yaml", "steps:\n  - method: lord\n    targets:\n"
                       + "".join(f"      - 're:layers\\.{i}\\.'\n" for i in range(20_000))), early=True),
    Case("seq-len-1", compress(llama, "--seq-len", "1"), ("--seq-len", "≥ 8", "got 1"), early=True),
    Case("recipe-step-seq-len-4", own_recipe, ("r.yaml", "step 0 calibration", "calibration.seq_len", "≥ 8"),
         prepare=write("r.yaml", "steps:\n  - method: lord\n    calibration: {seq_len: 4}\n"), early=True),
    # -- issue 34, input files: pickles refused, tensors beyond the config refused, unreadable files named
    Case("pickle-only-compress", compress(local("llama-model")), ("pytorch_model.bin", "save_pretrained"),
         prepare=pickled_only, early=True),
    Case("pickle-only-stream", compress(local("llama-model"), "--stream"), ("pytorch_model.bin", "save_pretrained"),
         prepare=pickled_only, early=True),
    Case("pickle-only-eval", evaluate(local("llama-model")), ("pytorch_model.bin", "save_pretrained"),
         prepare=pickled_only, early=True),
    Case("weights-hold-a-layer-more", compress(local("llama-model")), ("model.layers.2.", "num_hidden_layers"),
         prepare=edit_weights("llama", third_layer)),
    Case("weights-hold-a-layer-more-stream", compress(local("llama-model"), "--stream"),
         ("model.layers.2.", "num_hidden_layers"), prepare=edit_weights("llama", third_layer)),
    Case("weights-hold-a-layer-more-eval", evaluate(local("llama-model")), ("model.layers.2.", "num_hidden_layers"),
         prepare=edit_weights("llama", third_layer)),
    Case("weights-bad-dtype", compress(local("llama-model")), ("model.safetensors", "lm_head.weight", "X9"),
         prepare=edit_header(bad_dtype)),
    Case("weights-bad-dtype-stream", compress(local("llama-model"), "--stream"), ("model.safetensors", "X9"),
         prepare=edit_header(bad_dtype)),
    Case("weights-overlapping-offsets", compress(local("llama-model")), ("model.safetensors", "overlapping"),
         prepare=edit_header(overlapping)),
    Case("weights-overlapping-offsets-stream", compress(local("llama-model"), "--stream"),
         ("model.safetensors", "overlapping"), prepare=edit_header(overlapping)),
    Case("weights-cut-short", compress(local("llama-model")), ("model.safetensors", "truncated"),
         prepare=edit_header(lambda raw, size, header: raw[: len(raw) - 1000])),
    Case("weights-cut-short-stream", compress(local("llama-model"), "--stream"), ("model.safetensors", "truncated"),
         prepare=edit_header(lambda raw, size, header: raw[: len(raw) - 1000])),
    Case("weights-huge-header", compress(local("llama-model")), ("model.safetensors", "header"),
         prepare=edit_header(lambda raw, size, header: (1 << 40).to_bytes(8, "little") + raw[8:])),
    Case("weights-garbage-header", compress(local("llama-model"), "--stream"), ("model.safetensors", "not JSON"),
         prepare=edit_header(lambda raw, size, header: raw[:8] + b"\x01" * size + raw[8 + size:])),
    Case("weights-nested-header", compress(local("llama-model")), ("model.safetensors", "header"),
         prepare=edit_header(nested)),
    Case("weights-link-to-the-tokenizer", compress(local("llama-model")),
         ("model.safetensors", "a link to", "tokenizer.json"),
         prepare=link_weights_to("tokenizer.json", lambda w, d: w.copy_model("llama", d))),
    Case("eval-weights-link-to-the-config", evaluate(output), ("model.safetensors", "a link to", "config.json"),
         prepare=link_weights_to("config.json", lambda w, d: w.copy_output(d))),
    Case("tokenizer-json-truncated", compress(local("llama-model")), ("tokenizer.json", "cannot read the tokenizer"),
         prepare=truncated_tokenizer),
    Case("eval-tokenizer-json-truncated", evaluate(local("llama-model")), ("tokenizer.json",),
         prepare=truncated_tokenizer),
    Case("eval-adapter-weights-deleted", evaluate(output), ("adapter_model.safetensors", "missing"),
         prepare=eora_without_adapter_weights),
    Case("config-heads-do-not-divide-hidden", compress(local("llama-model")), ("config.json", "attention heads"),
         prepare=edit_config("llama", num_attention_heads=5), early=True),
    Case("config-vocabulary-under-the-tokenizer", compress(local("llama-model")), ("config.json", "vocab_size 100"),
         prepare=smaller_vocabulary),
    Case("config-vocabulary-under-the-tokenizer-eval", evaluate(local("llama-model")),
         ("config.json", "vocab_size 100"), prepare=smaller_vocabulary),
    Case("config-dtype-not-a-dtype", compress(local("llama-model")), ("config.json", "dtype", "float99"),
         prepare=edit_config("llama", dtype="float99"), early=True),
    Case("config-torch-dtype-not-a-dtype", evaluate(local("llama-model")), ("config.json", "torch_dtype"),
         prepare=torch_dtype_only, early=True),
    Case("config-no-layers", compress(local("llama-model")), ("config.json", "num_hidden_layers is 0"),
         prepare=edit_config("llama", num_hidden_layers=0), early=True),
    Case("config-negative-layers", compress(local("llama-model"), "--stream"),
         ("config.json", "num_hidden_layers is -1"), prepare=edit_config("llama", num_hidden_layers=-1), early=True),
    # -- issue 34, run options and resources (one run per --out, signals, disk full: the tests further down)
    Case("out-symlink-to-an-empty-dir", compress(llama), ("--out", "symbolic link"), prepare=symlinked_out(False),
         early=True),
    Case("out-symlink-to-a-file", compress(llama), ("--out", "symbolic link"), prepare=symlinked_out(True),
         early=True),
    Case("out-name-too-long", out_named("o" * 300), ("--out", "300 bytes", "longer than the file system allows"),
         early=True),
    Case("seed-negative", compress(llama, "--seed", "-1"), ("--seed", "got -1"), early=True),
    Case("seed-too-large", compress(llama, "--seed", str(2**64)), ("--seed", str(2**32 - 1)), early=True),
    Case("calibration-dataset-offline", compress(llama, "--calib-dataset", "wikitext2"),
         ("dataset wikitext2", "sotu", ".txt")),
    Case("eval-dataset-offline", lambda w, d: ["eval", w.models["llama"], "--dataset", "ptb", "--seq-len", "32"],
         ("dataset ptb", "sotu", ".txt")),
    Case("inspect-nan-tensor", lambda w, d: ["inspect", d / "compressed"], ("model.safetensors", "non-finite"),
         prepare=nan_in_output),
    # -- compressor heal: what it cannot train, and an --out it would not replace
    Case("heal-dense-model", lambda w, d: ["heal", w.models["llama"], "--out", d / "out"],
         ("is not a compressor output",), early=True),
    Case("heal-out-not-empty", lambda w, d: ["heal", d / "compressed", "--out", d / "out"], ("not empty",),
         prepare=lambda w, d: (w.copy_output(d), precious_out(w, d)), early=True),
]


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def run_case(case: Case, world: World, folder: Path) -> tuple[Done, dict, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    if case.prepare:
        case.prepare(world, folder)
    before = snapshot(folder)
    child = world.launcher.start(case.args(world, folder), folder, stdin=case.stdin)
    code = child.wait()
    return Done(code, child.stdout, child.stderr), before, snapshot(folder)


@pytest.fixture(scope="session")
def results(request, world):
    """case id → a future of (process, snapshot before, snapshot after), all selected cases started at once."""
    wanted = {item.callspec.params["case"].id for item in request.session.items
              if item.originalname == "test_bad_input" and hasattr(item, "callspec")}
    pool = ThreadPoolExecutor(WORKERS)
    futures = {case.id: pool.submit(run_case, case, world, world.root / "cases" / case.id)
               for case in CASES if case.id in wanted}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def assert_one_error_line(stderr: str, stdout: str, *culprit: str) -> str:
    assert "Traceback" not in stderr + stdout, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("error: ") and not line.startswith("error: error:"), line
    for fragment in culprit:
        assert fragment in line, line
    return line


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, results, world):
    if case.extra.get("skip_if_cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    done, before, after = results[case.id].result()
    assert done.returncode == case.code, (done.returncode, done.stdout, done.stderr)
    line = assert_one_error_line(done.stderr, done.stdout, *case.culprit)
    if case.id.startswith("resume-"):  # state it cannot verify: start over, never "resume it" again
        assert "--resume to continue" not in line, line
    assert "set COMPRESSOR_DEBUG=1" not in done.stderr  # named by the code that read it, not the CLI's fallback
    assert after == before  # nothing new at or beside --out, everything that was there intact
    if case.early:
        assert done.stdout == "", done.stdout  # refused before the model was loaded
    if case.check:
        case.check(world, world.root / "cases" / case.id)


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


def test_overlapping_calibration_windows_are_one_warning_line(world, tokenizer, tmp_path):
    """Issue 34, item 6: a calibration text of fewer tokens than n_samples × seq_len (4 × 32) is used, and
    the overlap said once on stderr, with the text's token count."""
    from compressor.calibration.text import tokenize

    words = world.text.read_text().split()
    count = next(n for n in range(10, len(words)) if tokenize(tokenizer, " ".join(words[:n])).numel() >= 80)
    text = tmp_path / "short.txt"
    text.write_text(" ".join(words[:count]))
    tokens = tokenize(tokenizer, text.read_text()).numel()
    args = ["compress", world.models["llama"], "--recipe", "lord", "--out", tmp_path / "out", *SMALL,
            "--calib-dataset", text]
    child = world.launcher.start(args, tmp_path)
    assert child.wait() == 0, child.stderr
    said = [line for line in child.stderr.splitlines() if line.startswith("warning:")]
    assert len(said) == 1 and "short.txt" in said[0] and f"has {tokens} tokens" in said[0], child.stderr
    assert "windows overlap" in said[0] and "4 × 32 = 128" in said[0]


# -- faults during a run ----------------------------------------------------------------------------------


class Run:
    """A CLI compression in the background, paused at ``stage`` until ``resume()`` (None: no pause)."""

    def __init__(self, world: World, folder: Path, stage: str | None, *extra: str, tag: str = "a"):
        folder.mkdir(parents=True, exist_ok=True)
        self.out, self.token = folder / "out", folder / f".resume-{tag}"
        env = {"COMPRESSOR_TEST_PAUSE": stage, "COMPRESSOR_TEST_RESUME": str(self.token)} if stage else {}
        args = ["compress", world.models["llama"], "--recipe", "lord", "--out", self.out, *SMALL,
                "--calib-dataset", world.text, *extra]
        self.child = world.launcher.start(args, folder, **env)

    def resume(self) -> None:
        self.token.write_text("go")

    def finish(self) -> tuple[int, str, str]:
        code = self.child.wait()
        return code, self.child.stdout, self.child.stderr


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_a_directory_appearing_at_out_during_the_run_is_not_deleted(world, tmp_path):
    run = Run(world, tmp_path, "walk")
    run.child.wait_for("paused at walk")
    run.out.mkdir()
    (run.out / "mine.txt").write_text("made during the run")
    run.resume()
    code, stdout, stderr = run.finish()
    assert code == 1
    assert_one_error_line(stderr, stdout, str(run.out), "appeared during the run")
    assert [p.name for p in run.out.iterdir()] == ["mine.txt"]
    assert (run.out / "mine.txt").read_text() == "made during the run"
    assert siblings(run.out) == []


@pytest.mark.parametrize("extra", [[], ["--stream"]], ids=["in-memory", "stream"])
def test_a_second_run_on_the_same_out_is_refused_at_once(world, tmp_path, extra):
    """One run per output directory: the second, started while the first works, is refused before any work,
    naming the first (its PID); the first finishes as if alone."""
    first = Run(world, tmp_path, "walk", *extra)
    first.child.wait_for("paused at walk")
    code, stdout, stderr = Run(world, tmp_path, None, *extra, "--set", "lord.ratio=0.5", tag="b").finish()
    assert code == 1 and stdout == "", stderr
    assert_one_error_line(stderr, stdout, str(first.out), f"PID {first.child.pid}", "another run")
    first.resume()
    code, _, stderr = first.finish()
    assert code == 0, stderr
    assert json.loads((first.out / "compression.json").read_text())["recipe"]["steps"][0]["config"]["ratio"] == 0.2
    assert siblings(first.out) == []  # the lock released, nothing of either run left beside --out


def test_the_lock_of_a_dead_run_is_taken_over_and_a_held_one_refused(tmp_path):
    from compressor.errors import CompressorError
    from compressor.io import OutputDirectory

    (tmp_path / ".out.lock").write_text("999999999\n")  # left by a killed run: nobody holds it
    with OutputDirectory(tmp_path / "out") as first:
        assert (tmp_path / ".out.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(CompressorError, match=f"another run \\(PID {os.getpid()}, lock "):
            with OutputDirectory(tmp_path / "out"):
                pass
        (first.tmp / "file").write_text("written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("stage, signum, code", [
    ("walk", signal.SIGINT, 130),
    ("walk", signal.SIGTERM, 143),
    ("save", signal.SIGTERM, 143),
    ("save", signal.SIGINT, 130),
])
def test_signals_leave_nothing_behind(world, tmp_path, stage, signum, code):
    (tmp_path / "out").mkdir()  # an empty --out that exists stays as it was
    run = Run(world, tmp_path, stage)
    run.child.wait_for(f"paused at {stage}")
    if stage == "save":
        assert any((tmp_path / name / "model.safetensors").is_file() for name in siblings(run.out))
    run.child.send_signal(signum)
    returncode, stdout, stderr = run.finish()
    assert returncode == code, stderr
    assert_one_error_line(stderr, "", "nothing was written")
    assert list(run.out.iterdir()) == [] and siblings(run.out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigkill_leaves_a_temporary_directory_that_the_next_run_removes(world, tmp_path):
    run = Run(world, tmp_path, "save")
    run.child.wait_for("paused at save")
    run.child.send_signal(signal.SIGKILL)
    assert run.finish()[0] == -signal.SIGKILL
    stale = siblings(run.out)
    assert len(stale) == 2 and stale[0] == ".out.lock" and stale[1].startswith(".out.tmp-")  # SIGKILL cannot be
    # cleaned up after...
    code, _, stderr = Run(world, tmp_path, None).finish()
    assert code == 0, stderr
    assert siblings(run.out) == [] and (run.out / "compression.json").is_file()  # ...but the next run does


@pytest.mark.parametrize("during", ["20ms", "cleanup"])
@pytest.mark.parametrize("stage, extra, left", [("walk", [], "nothing was written"),
                                               ("recorded", ["--stream"], ".out.partial")], ids=["in-memory", "stream"])
def test_a_second_ctrl_c_does_not_break_the_cleanup(world, tmp_path, stage, extra, left, during):
    """Ctrl-C twice, 20 ms apart or while the first one's cleanup is paused: the cleanup finishes; one line,
    exit 130, nothing left beside --out but a streamed run's kept layers."""
    run = Run(world, tmp_path, f"{stage},cleanup" if during == "cleanup" else stage, *extra)
    run.child.wait_for(f"paused at {stage}")
    run.child.send_signal(signal.SIGINT)
    if during == "cleanup":
        run.child.wait_for("paused at cleanup")
    else:
        time.sleep(0.02)
    try:
        run.child.send_signal(signal.SIGINT)
    except ProcessLookupError:  # the first Ctrl-C's cleanup had already ended: 20 ms is long for a tiny model
        assert during == "20ms"
    run.resume()
    code, stdout, stderr = run.finish()
    assert code == 130, stderr
    assert_one_error_line(stderr, stdout, "interrupted (Ctrl-C)", left)
    assert siblings(run.out) == ([".out.partial"] if extra else [])


def test_ctrl_c_once_the_output_is_in_place_says_so(world, tmp_path):
    run = Run(world, tmp_path, "placed")
    run.child.wait_for("paused at placed")
    run.child.send_signal(signal.SIGINT)
    code, stdout, stderr = run.finish()
    assert code == 130, stderr
    assert_one_error_line(stderr, stdout, "the complete output had been written", str(run.out))
    assert siblings(run.out) == []
    from compressor.io import load

    load(run.out)


def test_a_failed_stream_run_says_that_its_finished_layers_are_kept(world, tmp_path):
    bad = "model.layers.1.mlp.down_proj.weight"
    edit_weights("llama", nan_at(bad))(world, tmp_path)
    child = world.launcher.start(["compress", tmp_path / "llama-model", "--recipe", "lord", "--out", tmp_path / "out",
                                  *SMALL, "--calib-dataset", world.text, "--stream"], tmp_path)
    assert child.wait() == 1
    assert_one_error_line(child.stderr, child.stdout, bad, "kept in", ".out.partial", "--resume", "remove")
    assert siblings(tmp_path / "out") == [".out.partial"]


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "stream"])
def test_disk_full_while_saving_is_one_line_with_the_path_and_bytes(model_dirs, small_text, tmp_path, monkeypatch,
                                                                   stream):
    from compressor.api import compress as run
    from compressor.errors import CompressorError, left_by
    from compressor.io import checkpoint

    def full(folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "README.md"))

    monkeypatch.setattr(checkpoint.model_card, "write", full)
    with pytest.raises(CompressorError) as caught:
        run(str(model_dirs["llama"]), "lord", tmp_path / "out", progress=False, stream=stream,
            overrides=["calibration.n_samples=4", "calibration.seq_len=32", "calibration.batch_size=2",
                       f"calibration.dataset={small_text}"])
    message = str(caught.value)
    for fragment in ("no space left", f"--out {tmp_path / 'out'}", "README.md", "bytes are free", "needs about"):
        assert fragment in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ([".out.partial"] if stream else [])
    assert (left_by(caught.value) is not None) == stream  # the CLI adds where the layers are kept


@pytest.mark.parametrize("error, fragments", [(MemoryError, ("out of memory", "--stream", "--n-samples")),
                                              (RecursionError, ("recursion limit", "nested too deeply"))])
def test_running_out_of_memory_or_recursion_is_one_line(monkeypatch, tmp_path, error, fragments):
    from typer.testing import CliRunner

    from compressor import api
    from compressor.cli import app

    def fail(*args, **kwargs):
        raise error()

    monkeypatch.setattr(api, "compress", fail)
    monkeypatch.delenv("COMPRESSOR_DEBUG", raising=False)
    result = CliRunner().invoke(app, ["compress", "m", "--recipe", "lord", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    line = assert_one_error_line(result.stderr, result.stdout, *fragments)
    assert "COMPRESSOR_DEBUG" not in line  # not the fallback for bugs


def test_the_cli_script_itself_exits_143_on_sigterm(world, tmp_path):
    """The same through ``python cli.py`` (not the launcher): its own SIGTERM handler, exit 143."""
    token = tmp_path / ".resume"
    env = cli_env(world.cache, COMPRESSOR_TEST_PAUSE="walk", COMPRESSOR_TEST_RESUME=str(token))
    out = tmp_path / "out"
    process = subprocess.Popen([*CLI, "compress", str(world.models["gpt2"]), "--recipe", "lord", "--out", str(out),
                                *SMALL, "--calib-dataset", str(world.text)], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.strip() == "paused at walk":
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    assert_one_error_line(stderr, "", "SIGTERM")
    assert list(tmp_path.iterdir()) == []


# -- what now works (before: silently wrong or refused late) ------------------------------------------------


def test_a_245_character_name_is_written(world, tmp_path):
    out = tmp_path / ("o" * 245)
    child = world.launcher.start(["compress", world.models["gpt2"], "--recipe", "lord", "--out", out, *SMALL,
                                  "--calib-dataset", world.text, "--quiet"], tmp_path)
    assert child.wait() == 0, child.stderr
    assert [p.name for p in tmp_path.iterdir()] == [out.name] and (out / "model.safetensors").is_file()


def test_progress_says_the_tokens_up_front_and_an_eta_per_layer(world, tmp_path):
    child = world.launcher.start(["compress", world.models["llama"], "--recipe", "lord", "--out", tmp_path / "out",
                                  *SMALL, "--calib-dataset", world.text], tmp_path)
    assert child.wait() == 0, child.stderr
    lines = child.stdout.splitlines()
    assert lines[0] == f"calibration: 4 windows × 32 tokens = 128 tokens of {world.text}, through 2 decoder layers"
    assert lines[1].startswith("layer 1/2 done") and "eta" in lines[1] and lines[2].startswith("layer 2/2 done")


def test_prune_pattern_override_is_read_as_the_string_it_is(tmp_path):
    from compressor.plan import recipe as recipes

    path = tmp_path / "p.yaml"
    path.write_text(PRUNE)
    assert recipes.load(str(path), ["prune.pattern=2:4"]).steps[0].config["pattern"] == "2:4"
    assert recipes.load(str(path), ["prune.sparsity=.6"]).steps[0].config["sparsity"] == 0.6
    assert recipes.load("lord-svd-llm", ["lord.ratio=null", "lord.rank=8"]).steps[0].config == {
        "rank": 8, "whiten": "gram"}


def test_ratio_zero_keeps_every_matrix_dense(world, tmp_path):
    from compressor.api import compress as run

    summary = run(str(world.models["llama"]), "lord", tmp_path / "out", progress=False,
                  overrides=["lord.ratio=0", "calibration.n_samples=4", "calibration.seq_len=32",
                             "calibration.batch_size=2", f"calibration.dataset={world.text}"])
    assert summary["compressed"] == 0 and summary["params_after"] == summary["params_before"]
    log = [json.loads(line) for line in (tmp_path / "out" / "compression_log.jsonl").read_text().splitlines()]
    assert all(e["kind"] == "dense" and "kept dense" in e["note"] for e in log)


def test_relative_error_of_a_nan_weight_is_not_zero():
    from compressor.kernels.linalg import relative_error

    weight = torch.ones(4, 4)
    weight[0, 0] = float("nan")
    assert relative_error(weight, torch.zeros(4, 4)) != relative_error(weight, torch.zeros(4, 4))  # NaN
    assert relative_error(weight, torch.zeros(4, 4), torch.eye(4)) != 0.0


def test_mount_points_are_refused(monkeypatch, tmp_path):
    from compressor.errors import CompressorError
    from compressor.io import output

    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(output.os.path, "ismount", lambda p: str(p) == str(tmp_path / "mnt"))
    with pytest.raises(CompressorError, match="mount point"):
        output.check_output(tmp_path / "mnt", overwrite=True)


def test_a_damaged_conversion_cache_of_the_default_model_is_rebuilt(world, tmp_path, monkeypatch):
    """The cached conversion of smollm2-135m is a cache too: a NaN in it is not used; it is converted again
    (here the conversion copies a tiny model) and loaded."""
    from compressor.model import loading as models

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path))
    cached = tmp_path / "models" / models.DEFAULT_MODEL
    shutil.copytree(world.models["llama"], cached)
    edit_weights("llama", nan_at(DOWN))(world, tmp_path / "damaged")
    shutil.copy(tmp_path / "damaged" / "llama-model" / "model.safetensors", cached / "model.safetensors")
    conversions = []

    def convert(gguf, out):
        conversions.append(out)
        shutil.rmtree(out)
        shutil.copytree(world.models["llama"], out)
        return out

    monkeypatch.setattr(models, "_smollm2_gguf", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "convert_gguf", convert)
    model, _ = models.load(models.DEFAULT_MODEL)
    assert conversions == [cached]
    assert bool(torch.isfinite(model.get_submodule("model.layers.0.mlp.down_proj").weight).all())


def test_a_previous_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    """Killed between the two renames of a replacement, a run leaves ``--out`` missing and the previous
    output in ``.NAME.old-PID-*/x``: the next run on that ``--out`` puts it back (and then, without
    --overwrite, refuses to replace it)."""
    from compressor.errors import CompressorError
    from compressor.io import OutputDirectory

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    aside = tmp_path / f".out.old-{dead}-abcd" / "x"
    aside.mkdir(parents=True)
    (aside / "model.safetensors").write_text("previous output")
    (tmp_path / f".out.tmp-{dead}-efgh").mkdir()
    with pytest.raises(CompressorError, match="not empty"):
        with OutputDirectory(tmp_path / "out", overwrite=False):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "model.safetensors").read_text() == "previous output"


def test_an_untampered_resume_gives_the_uninterrupted_output(world, tmp_path):
    """The recorded run of the resume cases, continued as it is, writes the uninterrupted run's files bit for bit
    (the checksums recorded while it ran match what it reads back)."""
    shutil.copytree(recorded_run(world), tmp_path / ".out.partial")
    (tmp_path / "whole").mkdir()
    uninterrupted = compress(llama, *RESUMED, "--stream", recipe=RESUME_RECIPE)
    whole = world.launcher.start(uninterrupted(world, tmp_path / "whole"), tmp_path / "whole")
    child = world.launcher.start(resumed(world, tmp_path), tmp_path)
    assert whole.wait() == 0 and child.wait() == 0, whole.stderr + child.stderr
    assert "resuming: 1 of 2 decoder layers were done" in child.stdout
    assert siblings(tmp_path / "out") == []
    written = [{str(p.relative_to(o)): hashlib.sha256(p.read_bytes()).hexdigest() for p in o.rglob("*.safetensors")}
               for o in (tmp_path / "whole" / "out", tmp_path / "out")]
    assert written[1] == written[0] and "adapter/adapter_model.safetensors" in written[0]
    manifests = [json.loads((o / "compression.json").read_text()) for o in (tmp_path / "whole" / "out", tmp_path / "out")]
    assert manifests[1] == manifests[0]
