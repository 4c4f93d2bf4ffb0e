"""Guards found by trying to break a run (issue 18): never destroy, never race, never leave a user guessing.

Each case checks the exit status, the one line the user sees, and that every byte of the source
model and of unrelated files is unchanged (sha256 of every file before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import REPO, run_nvfp4_pp, write_config
from nvfp4_pp.run import main
from nvfp4_pp.checkpoint.verify import verify
from tiny_models import write_tiny_model

pytestmark = pytest.mark.whole  # every test here launches runs or rank processes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random-weight 6-layer Llama with a 256-word tokenizer: a full run takes seconds."""
    return write_tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("tiny") / "llama")


def checksums(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (and the set of directories), by path."""
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def config(tmp: Path, model: Path, output: Path | str, **sections) -> Path:
    base = {"model": str(model), "output": str(output), "format": "modelopt",
            "calibration": {"dataset": "builtin:pydoc", "samples": 2, "max_length": 16}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return write_config(tmp / "run.yaml", **base)


def run(capsys, cfg: Path, *args: str) -> tuple[int, str, str]:
    """One in-process run (a single rank): exit status, stdout, stderr."""
    code = main([str(cfg), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("nvfp4_pp: error")]
    assert len(lines) == 1, err
    return lines[0]


def rank_traceback(text: str) -> list[str]:
    """Traceback frames in nvfp4_pp's code or a library a rank calls (torchrun's agent prints its own
    SignalException / ChildFailedError traceback, in torch.distributed's launcher only)."""
    frames = [line for line in text.splitlines() if line.lstrip().startswith('File "')]
    return [f for f in frames if "torch/distributed/run.py" not in f and "/elastic/" not in f
            and "torch/distributed/launcher" not in f and "<frozen runpy>" not in f]


def modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [directory, *directory.iterdir()]}


def test_files_honour_the_umask(tmp_path, capsys, tiny):
    """Shards were written 0600 (safetensors' own mode), work-dir shards hard-linked into the output too."""
    out = tmp_path / "out"
    cfg = config(tmp_path, tiny, out)
    old = os.umask(0o027)
    try:
        code, _, err = run(capsys, cfg, "--stop-after", "export")
        assert code == 0, err
        rank_dir = tmp_path / "out.nvfp4_pp-work" / "rank0"
        shards = {n: m for n, m in modes(rank_dir).items() if n.endswith(".safetensors")}
        assert shards and set(shards.values()) == {0o640}, shards
        code, _, err = run(capsys, cfg)
        assert code == 0, err
    finally:
        os.umask(old)
    found = modes(out)
    assert found.pop("out") == 0o750
    assert any(n.endswith(".safetensors") for n in found) and set(found.values()) == {0o640}, found
    assert stat.S_IMODE((tiny / "model.safetensors").stat().st_mode) == 0o600  # the source's own mode is not copied


# ---- --overwrite replaces only what nvfp4_pp wrote --------------------------------------------


@pytest.fixture
def model_in_dir(tmp_path, tiny) -> tuple[Path, Path]:
    """A copy of the model inside a directory that also holds an unrelated file."""
    parent = tmp_path / "models"
    model = parent / "llama"
    shutil.copytree(tiny, model)
    (parent / "notes.txt").write_text("not nvfp4_pp's to delete\n")
    return parent, model


@pytest.mark.parametrize("where,message", [
    ("model", "output {output} is the model directory; nvfp4_pp never writes into its source: choose another 'output'"),
    ("parent", "output {output} contains the model directory {model}; replacing it would delete the model: choose "
               "another 'output'"),
    ("inside", "output {output} lies inside the model directory {model}; choose an 'output' outside it"),
])
def test_output_overlapping_the_model_is_refused_whatever_the_flags(tmp_path, capsys, model_in_dir, where, message):
    parent, model = model_in_dir
    output = {"model": model, "parent": parent, "inside": model / "nvfp4"}[where]
    cfg = config(tmp_path, model, output)
    before = checksums(tmp_path)
    code, _, err = run(capsys, cfg, "--overwrite", "--fresh")
    assert code == 2
    assert one_error(err) == "nvfp4_pp: error: " + message.format(output=output, model=model)
    assert checksums(tmp_path) == before  # no byte of the model or the unrelated file changed, nothing added


def test_work_dir_overlapping_the_model_is_refused(tmp_path, capsys, model_in_dir):
    parent, model = model_in_dir
    before = checksums(parent)
    code, _, err = run(capsys, config(tmp_path, model, tmp_path / "out", gather={"work_dir": str(model)}))
    assert code == 2
    assert one_error(err) == (f"nvfp4_pp: error: the work directory {model} and the model directory {model} overlap; "
                              "set gather.work_dir (or 'output', which it defaults beside) outside the model")
    assert checksums(parent) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [(), ("--overwrite",)])
@pytest.mark.parametrize("record, why", [
    (None, "it holds thesis.tex, and no nvfp4_pp.json"),
    ("{}", "it holds thesis.tex, and an nvfp4_pp.json that nvfp4_pp did not write (no producer or file list)"),
    ('{"producer": {"name": "nvfp4_pp", "version": "0.1.0"}}', "it holds thesis.tex, and an nvfp4_pp.json of nvfp4_pp "
     "before 0.2, which kept no list of the files it wrote (delete the directory yourself if it holds nothing else)"),
    ('{"producer": {"name": "nvfp4_pp"}, "files": {"README.md": null}}',
     "it holds thesis.tex, which nvfp4_pp did not write"),
])
def test_foreign_directory_is_never_replaced(tmp_path, capsys, tiny, flags, record, why):
    """A record file alone (`{}`, or one of nvfp4_pp's that does not list every file) makes no directory
    nvfp4_pp's: --overwrite refuses it, naming the first foreign file."""
    output = tmp_path / "mine"
    output.mkdir()
    (output / "thesis.tex").write_text("years of work\n")
    if record is not None:
        (output / "nvfp4_pp.json").write_text(record)
    cfg = config(tmp_path, tiny, output)
    before = checksums(tmp_path, tiny)
    code, _, err = run(capsys, cfg, *flags)
    assert code == 2
    assert one_error(err) == (f"nvfp4_pp: error: output {output} is a non-empty directory that nvfp4_pp did not write: "
                              f"{why}; nvfp4_pp replaces only its own checkpoints or an empty directory: choose "
                              "another 'output' (or move those files away)")  # no advice to pass --overwrite
    assert checksums(tmp_path, tiny) == before


def test_output_that_is_a_file_is_refused(tmp_path, capsys, tiny):
    output = tmp_path / "out"
    output.write_text("a file\n")
    cfg = config(tmp_path, tiny, output)
    before = checksums(tmp_path, tiny)
    code, _, err = run(capsys, cfg, "--overwrite")
    assert code == 2
    assert one_error(err) == (f"nvfp4_pp: error: output {output} exists and is not a directory; choose another "
                              "'output'")
    assert checksums(tmp_path, tiny) == before


def test_empty_directory_is_used_and_own_checkpoint_replaced_only_with_overwrite(tmp_path, capsys, tiny):
    output = tmp_path / "out"
    output.mkdir()
    (tmp_path / "notes.txt").write_text("unrelated\n")
    cfg = config(tmp_path, tiny, output)
    code, _, err = run(capsys, cfg)
    assert code == 0, err
    first = json.loads((output / "nvfp4_pp.json").read_text())
    assert first["verification"] == "passed"
    assert set(first["files"]) == {p.name for p in output.iterdir()} - {"nvfp4_pp.json"}
    (output / "stray.txt").write_text("added by the user\n")
    before = checksums(tmp_path, tiny)
    code, _, err = run(capsys, cfg, "--overwrite")  # a file the run did not write: the directory is not its own
    assert code == 2 and "it holds stray.txt, which nvfp4_pp did not write" in one_error(err)
    assert checksums(tmp_path, tiny) == before
    (output / "stray.txt").unlink()
    before = checksums(tmp_path, tiny)

    code, _, err = run(capsys, cfg)
    assert code == 2
    assert one_error(err) == (f"nvfp4_pp: error: output {output} already holds an nvfp4_pp checkpoint; pass "
                              "--overwrite to replace it or choose another 'output'")
    assert checksums(tmp_path, tiny) == before

    code, _, err = run(capsys, cfg, "--overwrite")
    assert code == 0, err
    assert (output / "nvfp4_pp.json").is_file()
    after = checksums(tmp_path / "notes.txt", tiny)
    assert after == {k: v for k, v in before.items() if k in after}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "out", "run.yaml"]  # no lock, tmp or old dir


def test_read_only_filesystem(tmp_path, capsys, tiny):
    disk = tmp_path / "ro"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        code, _, err = run(capsys, config(tmp_path, tiny, disk / "out"))
        assert code == 2
        assert one_error(err) == (f"nvfp4_pp: error: output {disk / 'out'} is on a read-only filesystem ({disk}); "
                                  "choose an 'output' on a writable one")
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ---- one run per output ------------------------------------------------------------------------


def _started(path: Path) -> tuple[subprocess.Popen, float]:
    """`python -m nvfp4_pp.run CONFIG` (one rank), its output in `path`, and when it was started."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cfg = path.parent / "run.yaml"
    log = open(path, "w")
    return subprocess.Popen([sys.executable, "-m", "nvfp4_pp.run", str(cfg)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT), time.monotonic()


def test_two_runs_on_one_output(tmp_path, tiny):
    """Started half a second apart: one finishes with a verified checkpoint, the other refuses at once."""
    output = tmp_path / "out"
    config(tmp_path, tiny, output)
    runs = [_started(tmp_path / "first.log")]
    time.sleep(0.5)
    runs.append(_started(tmp_path / "second.log"))
    refused_after = {}
    while any(p.poll() is None for p, _ in runs):
        for i, (p, t0) in enumerate(runs):
            log = tmp_path / f"{['first', 'second'][i]}.log"
            if i not in refused_after and "is in use by another nvfp4_pp run" in log.read_text():
                refused_after[i] = time.monotonic() - t0
        time.sleep(0.05)
    logs = [(tmp_path / f"{name}.log").read_text() for name in ("first", "second")]
    codes = [p.returncode for p, _ in runs]
    assert sorted(codes) == [0, 2], logs
    loser = codes.index(2)
    line = one_error(logs[loser])
    assert line.startswith(f"nvfp4_pp: error: output {output} is in use by another nvfp4_pp run (host "
                           f"{socket.gethostname()}, pid {runs[1 - loser][0].pid}, started "), line
    assert line.endswith("); wait for it to finish or stop it, or choose another 'output'")
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)  # every rank's floor: it needs torch.distributed
    assert refused_after[loser] < 10, (f"refused {refused_after[loser]:.1f} s after its start; `import torch` alone "
                                       f"takes {time.monotonic() - t0:.1f} s on this machine now")
    assert verify(output, tiny) == [] and json.loads((output / "nvfp4_pp.json").read_text())["verification"] == "passed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.log", "out", "run.yaml", "second.log"]


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, capsys, tiny):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    lock = tmp_path / "out.nvfp4_pp-work" / ".nvfp4_pp-lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"run": "killed", "host": socket.gethostname(), "pid": pid,
                                "started": "2026-01-01 00:00:00"}))
    code, out, err = run(capsys, config(tmp_path, tiny, tmp_path / "out"))
    assert code == 0, err
    assert (f"taking over the lock of work directory {tmp_path / 'out.nvfp4_pp-work'} from a run that is gone "
            f"(host {socket.gethostname()}, pid {pid}, started 2026-01-01 00:00:00)") in out
    assert not lock.parent.exists()  # removed with the work directory at the end


def test_killed_launcher_leaves_no_rank_running(tmp_path, smol_dir):
    """SIGKILL the torchrun agent mid-calibration: every rank says so in one line and is gone well within
    pipeline.timeout_s; nothing appears under the output name."""
    timeout_s = 30
    output = tmp_path / "out"
    cfg = config(tmp_path, smol_dir, output, calibration={"samples": 24, "max_length": 64},
                 pipeline={"timeout_s": timeout_s})
    log = tmp_path / "torchrun.log"
    launcher = _torchrun(cfg, 2, log)
    try:
        _wait_for(log, "calibration micro-batch 2/24 done", 300)
        ranks = psutil.Process(launcher.pid).children(recursive=True)
        assert len(ranks) == 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        killed_at = time.monotonic()
        while any(_running(r) for r in ranks) and time.monotonic() - killed_at < timeout_s:
            time.sleep(0.1)
        assert not any(_running(r) for r in ranks), f"ranks still running {timeout_s} s after the launcher died"
    finally:
        for r in ranks:
            if _running(r):
                r.kill()
    text = log.read_text()
    for rank in (0, 1):
        lines = [line for line in text.splitlines() if line.startswith(f"nvfp4_pp: error (rank {rank})")]
        assert lines == [f"nvfp4_pp: error (rank {rank}): interrupted by SIGTERM (its launcher, pid {launcher.pid}, "
                         "is gone) during calibrate; rerun the same command to resume from the beginning (no phase "
                         "was finished)"], text[-3000:]
    assert not output.exists()


def test_ctrl_c_ends_every_rank_with_one_line_and_the_rerun_says_what_it_redoes(tmp_path, smol_dir):
    output = tmp_path / "out"
    cfg = config(tmp_path, smol_dir, output, calibration={"samples": 24, "max_length": 64})
    log = tmp_path / "torchrun.log"
    launcher = _torchrun(cfg, 2, log)
    _wait_for(log, "calibration micro-batch 2/24 done", 300)
    os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
    launcher.wait(timeout=120)
    text = log.read_text()
    assert launcher.returncode != 0
    for rank in (0, 1):
        lines = [line for line in text.splitlines() if line.startswith(f"nvfp4_pp: error (rank {rank})")]
        assert lines == [f"nvfp4_pp: error (rank {rank}): interrupted by SIGINT during calibrate; rerun the same "
                         "command to resume from the beginning (no phase was finished)"], text[-3000:]
    assert not rank_traceback(text) and "KeyboardInterrupt" not in text, text[-3000:]
    assert not output.exists()

    rerun = run_nvfp4_pp(cfg, 2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "calibrate: running it (it was not finished before)" in rerun.stdout


def _torchrun(cfg: Path, nproc: int, log: Path) -> subprocess.Popen:
    """torchrun in its own process group (as a shell starts a foreground job), output into `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "NVFP4_PP_LOG": "debug"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "nvfp4_pp.run", str(cfg)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(path: Path, text: str, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}:\n{path.read_text()[-2000:]}"
        time.sleep(0.2)


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- bad input found before any weight is loaded -------------------------------------------------


def _two_ranks_one_line(cfg: Path, *args: str) -> str:
    """Two torchrun ranks: exit status non-zero, exactly one error line, no rank advises a rerun."""
    result = run_nvfp4_pp(cfg, 2, *args, timeout=300)
    assert result.returncode != 0
    assert "rerun the same command" not in result.stderr and not rank_traceback(result.stderr), result.stderr[-3000:]
    return one_error(result.stderr)


def test_token_id_past_the_vocabulary(tmp_path, tiny):
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n" + json.dumps({"input_ids": [4, 300, 5, 999]}) + "\n")
    cfg = config(tmp_path, tiny, tmp_path / "out", calibration={"dataset": str(calib), "samples": 2})
    before = checksums(tmp_path, tiny)
    line = _two_ranks_one_line(cfg)
    assert line == (f"nvfp4_pp: error: {calib}:2: token id 300 is outside the model's vocabulary of 256 ids (0..255; 2 "
                    "such ids on this line); were these ids made with another tokenizer? Tokenize with the model's "
                    "own, or give 'text' instead")
    assert checksums(tmp_path, tiny) == before  # nothing written: no output, no work directory


def test_tokenizer_larger_than_the_embeddings(tmp_path, capsys, tiny):
    from transformers import AutoTokenizer

    model = shutil.copytree(tiny, tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    tok.save_pretrained(model)
    cfg = config(tmp_path, model, tmp_path / "out")
    before = checksums(tmp_path)
    code, _, err = run(capsys, cfg)
    assert code == 2
    assert one_error(err) == (f"nvfp4_pp: error: the tokenizer in {model} has token ids up to 257 (2 beyond the embeddings) but "
                              f"model.embed_tokens.weight in {model / 'model.safetensors'} has 256 rows (ids 0..255); "
                              "resize the model's embeddings to the tokenizer (resize_token_embeddings) or use the "
                              "tokenizer the model was trained with")
    assert checksums(tmp_path) == before


def test_config_vocab_smaller_than_the_embeddings(tmp_path, capsys, tiny):
    model = shutil.copytree(tiny, tmp_path / "m")
    config_json = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config_json, "vocab_size": 200}))
    cfg = config(tmp_path, model, tmp_path / "out")
    before = checksums(tmp_path)
    code, _, err = run(capsys, cfg)
    assert code == 2
    assert one_error(err) == (f"nvfp4_pp: error: {model / 'config.json'}: vocab_size is 200 but model.embed_tokens.weight "
                              f"in {model / 'model.safetensors'} has 256 rows; the config does not describe these "
                              "weights: set vocab_size to the embedding rows (or use the config of this checkpoint)")
    assert checksums(tmp_path) == before


def test_fewer_samples_than_asked(tmp_path, capsys, tiny):
    """An error naming what was found and why rows were skipped; `samples: all` takes what there is."""
    calib = tmp_path / "calib.jsonl"
    rows = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11], [12], [13, 14, 15]]
    calib.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    cfg = config(tmp_path, tiny, tmp_path / "out", calibration={"dataset": str(calib), "samples": 32, "min_length": 4})
    before = checksums(tmp_path, tiny)
    code, _, err = run(capsys, cfg)
    assert code == 2
    assert one_error(err) == (f"nvfp4_pp: error: calibration.dataset '{calib}' gave 2 of the 32 samples asked (5 rows "
                              "read: 3 shorter than min_length 4, 0 longer than max_length 16 skipped); add data, "
                              "widen calibration.min_length / max_length, or set calibration.samples to 2 (or all)")
    assert checksums(tmp_path, tiny) == before

    code, out, err = run(capsys, cfg, "--set", "calibration.samples=all")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "nvfp4_pp.json").read_text())["calibration"]["manifest"]
    assert manifest["samples"] == 2 and manifest["sources"][0]["skipped_short"] == 3


def test_malformed_set_value_is_one_line_from_all_ranks(tmp_path, tiny):
    cfg = config(tmp_path, tiny, tmp_path / "out")
    before = checksums(tmp_path, tiny)
    result = run_nvfp4_pp(cfg, 2, "--set", "pipeline.layers=[3,3", timeout=300)
    assert result.returncode != 0 and not rank_traceback(result.stderr), result.stderr[-3000:]
    assert one_error(result.stderr) == (
        "nvfp4_pp: error: --set 'pipeline.layers=[3,3': the value '[3,3' is not valid YAML (expected ',' or ']', but "
        "got '<stream end>'); write a list as [1, 2] or quote text: --set 'pipeline.layers=\"...\"'")
    assert checksums(tmp_path, tiny) == before


def test_device_missing_on_one_rank_fails_every_rank_at_once(tmp_path, tiny):
    """Found on rank 1 only: every rank learns it before anything else, so no rank waits or advises a rerun."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    cfg = config(tmp_path, tiny, tmp_path / "out", pipeline={"device": ["cpu", "cuda"]})
    line = _two_ranks_one_line(cfg)
    assert line == (f"nvfp4_pp: error: rank 1: pipeline.device is 'cuda' but rank 1 on host {socket.gethostname()} sees no "
                    "CUDA device; set pipeline.device: cpu (or auto) for CPU-only ranks")


def test_home_and_variables_in_paths_are_expanded(tmp_path, capsys, tiny, monkeypatch):
    home, data = tmp_path / "home", tmp_path / "data"
    shutil.copytree(tiny, home / "models" / "llama")
    data.mkdir()
    (data / "calib.jsonl").write_text(json.dumps({"input_ids": list(range(1, 17))}) + "\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NVFP4_PP_DATA", str(data))
    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, "~/models/llama", "$NVFP4_PP_DATA/out", gather={"work_dir": "~/work"},
                 calibration={"dataset": "${NVFP4_PP_DATA}/calib.jsonl", "samples": 1})
    code, _, err = run(capsys, cfg)
    assert code == 0, err
    assert (data / "out" / "nvfp4_pp.json").is_file() and not (home / "work").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "home", "run.yaml"]  # no literal '~' or '$...'


def test_evaluate_checks_the_quantized_path_before_loading_the_source(tmp_path, capsys, tiny):
    """The source here is damaged: reading it first would fail differently (and, for a 123B source, slowly)."""
    from nvfp4_pp.evaluate.__main__ import main as evaluate_main

    source = shutil.copytree(tiny, tmp_path / "m")
    shard = source / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    missing = tmp_path / "no-such-output"
    assert evaluate_main(["--source", str(source), "--quantized", str(missing)]) == 1
    assert capsys.readouterr().err == (f"nvfp4_pp.evaluate: error: --quantized {missing} does not exist; pass the output "
                                       "directory of an nvfp4_pp run\n")
    assert evaluate_main(["--source", str(source), "--quantized", str(tiny)]) == 1
    assert capsys.readouterr().err == (f"nvfp4_pp.evaluate: error: {tiny / 'config.json'} has no quantization_config: "
                                       f"{tiny} is not a quantized checkpoint; pass the output directory of an nvfp4_pp "
                                       "run\n")
