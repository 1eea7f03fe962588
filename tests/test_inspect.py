"""`ldit inspect`: the order of a step equals what the training reader yields in real processes; --verify
names bad shards; a checkpoint's completeness, resumability and config differences; a run's status."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data_prep.manifest import load_manifest, sha256_file
from data_prep.reader import StreamReader, latent_decoder
from slurm.cli import run_local
from slurm.inspect import main
from tests.conftest import ROOT, WORKERS, clean_env, read_ranks
from tests.data_fixtures import gaussian_latent_set, latent_set

B, V, SEED, STEPS = 12, 4, 5, 14  # as tests/test_reader.py (tests/workers/reader_keys.py reads with seed 5)
LDIT = str(Path(sys.executable).parent / "ldit")


def ldit(*args: str) -> subprocess.CompletedProcess:
    """The real `ldit` console script in a subprocess."""
    return subprocess.run([LDIT, *map(str, args)], cwd=ROOT, env=clean_env(), capture_output=True, text=True)


def inspect(capsys, *args: str) -> tuple[int, str, str]:
    """`ldit inspect …` in this process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("latents")
    latent_set(folder)  # 78 samples in 12 shards; sample n: key s{n:04d}, class n % 3, latent[0, 0, 0] = -n
    return folder


# ------------------------------------------------------------------------------------------- order


def order_json(shard_set: Path, *variants: tuple[str, ...]) -> list[list[dict]]:
    """The batches `ldit inspect order --json` prints for steps 0 … STEPS - 1, one list per variant of
    the extra flags (the commands run at once)."""
    common = ["inspect", "order", shard_set, "--seed", SEED, "--global-batch", B, "--streams", V, "--steps",
              f"0:{STEPS}", "--json"]  # fmt: skip
    procs = [
        subprocess.Popen(
            [LDIT, *map(str, common + list(extra))],
            cwd=ROOT,
            env=clean_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for extra in variants
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    return [json.loads(out)["batches"] for out, _ in outs]


def reader_keys(shard_set: Path, out: Path, world: int, monkeypatch) -> list[dict]:
    """{step: keys} of each rank, from tests/workers/reader_keys.py run as `world` real processes."""
    out.mkdir()
    cmd = [sys.executable, str(WORKERS / "reader_keys.py"), str(shard_set), str(out), "0", str(STEPS), "0",
           str(B), str(V)]  # fmt: skip
    for k, v in clean_env().items():
        monkeypatch.setenv(k, v)
    assert run_local(cmd, world) == 0
    return [{int(k): v["keys"] for k, v in rank.items()} for rank in read_ranks(out, world)]


def test_order_equals_what_the_training_reader_yields(shard_set, tmp_path, monkeypatch):
    whole, rank0, rank1 = order_json(shard_set, (), *[("--world-size", 2, "--rank", r) for r in (0, 1)])
    parts = {0: rank0, 1: rank1}
    assert [b["step"] for b in whole] == list(range(STEPS)) and {b["rank"] for b in whole} == {0}
    (one,) = reader_keys(shard_set, tmp_path / "w1", 1, monkeypatch)
    assert {b["step"]: [s["key"] for s in b["samples"]] for b in whole} == one
    two = reader_keys(shard_set, tmp_path / "w2", 2, monkeypatch)
    for r in (0, 1):
        assert {b["step"]: [s["key"] for s in b["samples"]] for b in parts[r]} == two[r], f"rank {r}"
    for k in range(STEPS):
        g = whole[k]["samples"]
        assert [s["position"] for s in g] == list(range(B))  # the global batch, in stream order
        both = parts[0][k]["samples"] + parts[1][k]["samples"]
        assert len(parts[0][k]["samples"]) == len(parts[1][k]["samples"]) == B // 2
        assert Counter(s["key"] for s in both) == Counter(s["key"] for s in g)  # as multisets
        assert sorted(both, key=lambda s: s["position"]) == g  # and, merged by place, in stream order
    assert parts[0][0]["streams"] == [0, 2] and parts[1][0]["streams"] == [1, 3]


def test_order_reports_the_flips_the_latent_decoder_applies(shard_set, capsys):
    code, out, _ = inspect(capsys, "order", shard_set, "--seed", SEED, "--global-batch", B, "--streams", V,
                           "--steps", "0:7", "--json")  # fmt: skip
    assert code == 0
    m = load_manifest(shard_set)
    reader = StreamReader(shard_set, m, seed=SEED, global_batch=B, streams=V, rank=0, world_size=1,
                          decode=latent_decoder())  # fmt: skip
    flips = []
    for batch, shown in zip(reader.batches(0), json.loads(out)["batches"]):
        assert batch.keys == [s["key"] for s in shown["samples"]]
        assert batch.y.tolist() == [s["class"] for s in shown["samples"]]
        for s, x in zip(shown["samples"], batch.x[:, 0, 0, 0].tolist()):
            n = int(s["key"][1:])
            if n:  # latent[0, 0, 0] is -n; the flipped latent holds +n there
                assert s["flipped"] == (x == n) and (x == -n) != s["flipped"]
                flips.append(s["flipped"])
    assert 0.3 < sum(flips) / len(flips) < 0.7  # both kinds occur (probability 1/2)


def test_order_text_and_config_defaults(shard_set, tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"_base_: {ROOT / 'configs/dit/tiny_cpu.yaml'}\n"
        f"data: {{shards: {shard_set}, seed: {SEED}, global_batch: {B}, streams: {V}}}\n"
    )
    part = ("--step", 3, "--world-size", 2, "--rank", 1)
    code, by_config, _ = inspect(capsys, "order", "--config", cfg, *part)
    assert code == 0
    code, by_flags, _ = inspect(
        capsys, "order", shard_set, "--seed", SEED, "--global-batch", B, "--streams", V, *part
    )
    assert code == 0 and by_config == by_flags
    lines = by_flags.splitlines()
    assert (
        lines[0] == f"order of {shard_set} (latents): seed 5, global batch 12 = 4 streams × 3, world size 2"
    )
    assert lines[1] == "step 3, rank 1 of 2 (streams 1, 3): 6 samples"
    assert lines[2].split() == ["position", "stream", "key", "class", "flipped"]
    positions = [int(line.split()[0]) for line in lines[3:]]
    assert positions == [3, 4, 5, 9, 10, 11]  # streams 1 and 3, 3 samples each
    # a flag beats the config: another seed, another order
    code, other, _ = inspect(capsys, "order", "--config", cfg, "--seed", 6, *part)
    assert code == 0 and other != by_config


def test_order_errors_are_one_line(shard_set, tmp_path, capsys):
    cases = [
        (["order", shard_set, "--seed", 5, "--global-batch", 12, "--streams", 4, "--step", 0, "--world-size", 2,
          "--rank", 2], 2, "ldit inspect: error: --rank 2 must be in 0 … 1 (--world-size 2)"),
        (["order", shard_set, "--global-batch", 12, "--step", 0], 2,
         "ldit inspect: error: --seed, --streams needed (or --config TRAIN.yaml, whose data.* keys give them)"),
        (["order", shard_set, "--seed", 5, "--global-batch", 12, "--streams", 4, "--step", 0, "--world-size", 3],
         1, "ldit inspect: error: world size 3 must divide the stream count 4"),
        (["order", shard_set, "--seed", 5, "--global-batch", 12, "--streams", 4, "--steps", "3:3"], 2,
         "ldit inspect: error: --steps 3:3 must be K1:K2 with 0 <= K1 < K2 (steps K1, …, K2 - 1)"),
        (["order", shard_set, "--step", "x"], 2, "ldit inspect: error: argument --step: invalid int value: 'x'"),
        (["data", tmp_path], 1, f"ldit inspect: error: {tmp_path}: no manifest.json; is this a shard set written "
         "by `ldit prep-images` or `ldit extract-latents`?"),
        (["checkpoint", tmp_path / "nowhere"], 1, f"ldit inspect: error: {tmp_path / 'nowhere'} does not exist"),
        (["checkpoint", tmp_path], 1, f"ldit inspect: error: {tmp_path}: neither a run directory (with "
         "checkpoints/) nor a checkpoint folder (step-*/ with meta.json)"),
        (["run", tmp_path / "nowhere"], 1, f"ldit inspect: error: run directory {tmp_path / 'nowhere'} does not exist"),
        (["bogus"], 2, "ldit inspect: error: argument <what>: invalid choice: 'bogus' "
         "(choose from 'data', 'order', 'checkpoint', 'run')"),
    ]  # fmt: skip
    for args, status, message in cases:
        code, out, err = inspect(capsys, *args)
        assert (code, out, err) == (status, "", message + "\n"), args


# -------------------------------------------------------------------------------------------- data


def test_data_summary_and_verify(shard_set, tmp_path, capsys):
    folder = tmp_path / "set"
    shutil.copytree(shard_set, folder)
    m = load_manifest(folder)
    m.producer = {"job": "extract-latents", "vavae_sha256": "ab" * 32, "config": {"dtype": "fp16", "seed": 0}}
    m.skipped = [
        {"path": "n1/a.JPEG", "reason": "truncated image"},
        {"path": "n1/b.txt", "reason": "not an image"},
    ]
    m.notes = {"cmyk": 2, "greyscale": 1}
    m.save(folder)
    proc = ldit("inspect", "data", folder, "--verify")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"shard set {folder}",
        f"  latents: {m.total} samples in 12 shards (3 to 10 samples each), {sum(s.bytes for s in m.shards) / 1024:.1f} KiB",
        "  classes: 3: 0 c0, 1 c1, 2 c2",
        "  latents: float32 (4, 2, 2) (C, H, W)",
        "    per-channel mean: 0 0 0 0",
        "    per-channel std:  1 1 1 1",
        f"  producer: job extract-latents; vavae sha256 {'ab' * 32}",
        "    config: dtype=fp16, seed=0",
        "  skipped inputs: 2",
        "    n1/a.JPEG: truncated image",
        "    n1/b.txt: not an image",
        "  converted when read: cmyk 2, greyscale 1",
        "verify: all 12 shards verified (size, sha256, sample count)",
    ]
    assert "100%" in proc.stderr  # the progress bar

    s1, s2 = folder / m.shards[1].name, folder / m.shards[2].name
    s1.write_bytes(s1.read_bytes()[:1536])  # truncated
    data = bytearray(s2.read_bytes())
    data[data.index(b"\x93NUMPY") + 130] ^= 0x01  # one bit of a latent's values: same size, still a tar
    s2.write_bytes(bytes(data))
    code, out, _ = inspect(capsys, "data", folder, "--verify", "--json")
    assert code == 1
    report = json.loads(out)
    assert report["count"] == m.total == 78 and report["verify"]["checked"] == 12
    assert report["verify"]["problems"] == [
        f"shard {s1}: size 1536 bytes, manifest says {m.shards[1].bytes} (truncated or replaced?)",
        f"shard {s2}: sha256 {sha256_file(s2)[:16]}…, manifest says {m.shards[2].sha256[:16]}… (contents changed)",
    ]
    proc = ldit("inspect", "data", folder, "--verify", "--no-progress")  # the real command: exit status 1
    assert proc.returncode == 1 and proc.stderr == ""
    assert proc.stdout.splitlines()[-3:] == [
        "verify: 2 of 12 shards do not match the manifest:",
        *(f"  {p}" for p in report["verify"]["problems"]),
    ]


# -------------------------------------------------------------------------- checkpoints and runs


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The tiny DiT trained 4 steps on 2 local processes, checkpoints at steps 2 and 4."""
    latents = tmp_path_factory.mktemp("gauss")
    gaussian_latent_set(latents)
    root = tmp_path_factory.mktemp("runs")
    proc = subprocess.run(
        [sys.executable, "-m", "slurm.cli", "train", ROOT / "configs/dit/tiny_cpu.yaml", f"data.shards={latents}",
         f"run.root={root}", "run.name=tiny", "steps=4", "ckpt.every=2", "--local", "2"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "tiny"


def copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "tiny", symlinks=True)
    return tmp_path / "tiny"


def test_complete_checkpoint(run, tmp_path, capsys):
    ck = run / "checkpoints" / "step-00000004"
    code, out, _ = inspect(capsys, "checkpoint", run, "--world-size", 2, "--world-size", 1)
    assert code == 0
    lines = out.splitlines()
    assert lines[:3] == [
        f"checkpoint {ck} (run {run})",
        "  step 4, samples seen 64, kind dit",
        "  topology: world size 2, global batch 16, micro batch 8, accumulation 1, ZeRO stage 2, dtype float32 (cpu)",
    ]
    assert lines[3].startswith("  size on disk: ") and " (model/ " in lines[3]
    n_files = len(json.loads((ck / "meta.json").read_text())["files"])
    assert lines[4:] == [
        f"  complete: yes (meta.json lists {n_files} files, all present with their sizes)",
        "  resumable at world size 2: yes, exact (same world size; 8 samples per rank = micro batch 8 × 1)",
        "  resumable at world size 1: yes, via whole tensors (ZeRO stage 2 → 0; the first resume writes "
        "model_universal/; 16 samples per rank = micro batch 16 × 1)",
        "  other checkpoints: step-00000002 (complete)",
    ]
    code, out, _ = inspect(capsys, "checkpoint", run, "--json", "--world-size", 3)
    r = json.loads(out)
    assert code == 1  # a requested world size cannot resume
    assert r["resume"] == [{"world_size": 3, "ok": False, "text": "no: world size 3 must divide data.streams=4 (each rank reads streams r, r+W, …): "
                            "run on a divisor of 4 ranks, or start a new run with another data.streams"}]  # fmt: skip
    sizes = r["sizes"]
    on_disk = {f: f.stat().st_size for f in ck.rglob("*") if f.is_file()}
    assert sizes["total"] == sum(sizes["parts"].values()) == sum(on_disk.values())
    assert sizes["parts"]["model/"] == sum(n for f, n in on_disk.items() if f.parent.name == "model")
    assert sizes["parts"]["rng-rank*.pt (2 files)"] > 0
    # a universal copy already there is reported as such (the folder given directly, not the run)
    other = copy(run, tmp_path) / "checkpoints" / "step-00000004"
    (other / "model_universal").mkdir()
    code, out, _ = inspect(capsys, "checkpoint", other, "--world-size", 4)
    assert code == 0
    assert "  resumable at world size 4: yes, via universal conversion (model_universal/ already written; " \
           "4 samples per rank = micro batch 4 × 1)" in out.splitlines()  # fmt: skip


def test_config_differences(run, capsys, tmp_path):
    base = [ROOT / "configs/dit/tiny_cpu.yaml", f"run.root={run.parent}", "run.name=tiny", "steps=4",
            "ckpt.every=2"]  # fmt: skip
    shards = json.loads((run / "checkpoints/step-00000004/meta.json").read_text())["config"]["data"]["shards"]
    code, out, _ = inspect(capsys, "checkpoint", run, "--against", *base, f"data.shards={shards}",
                           "optim.lr=0.0005", "--json")  # fmt: skip
    assert code == 0
    assert json.loads(out)["against"]["differences"] == [
        {"key": "optim.lr", "checkpoint": 0.001, "config": 0.0005}
    ]
    code, out, _ = inspect(
        capsys, "checkpoint", run, "--against", *base, f"data.shards={shards}", "optim.lr=0.0005"
    )
    assert out.splitlines()[-2:] == [
        f"  config differences (checkpoint → {' '.join(map(str, base))} data.shards={shards} optim.lr=0.0005): 1 key(s)",
        "    optim.lr: 0.001 → 0.0005",
    ]
    code, _, err = inspect(capsys, "checkpoint", run, "--against", *base, "optim.lr_=1")
    assert code == 2 and err.startswith("ldit inspect: error: --against: command line: Key 'lr_' not in")


def test_incomplete_checkpoint_names_what_is_wrong(run, tmp_path, capsys):
    run = copy(run, tmp_path)
    ck = run / "checkpoints" / "step-00000004"
    rng1 = ck / "rng-rank1.pt"
    (ck / "ema.safetensors").unlink()
    size = rng1.stat().st_size
    rng1.write_bytes(rng1.read_bytes()[:3])
    code, out, _ = inspect(capsys, "checkpoint", run)
    assert code == 1
    assert out.splitlines()[4:] == [
        "  complete: no, 2 problem(s):",
        f"    {ck}/ema.safetensors: missing",
        f"    {rng1}: 3 bytes, meta.json says {size} (truncated?)",
        "  resumable at world size 2: no: the checkpoint is incomplete; a resume would use step-00000002",
        "  other checkpoints: step-00000002 (complete)",
    ]


def test_unfinished_save_lists_what_is_there_and_what_is_missing(run, tmp_path, capsys):
    run = copy(run, tmp_path)
    ck = run / "checkpoints" / "step-00000004"
    # as if the save of step 4 stopped after rank 0 wrote its files: latest still names step 2
    (run / "checkpoints" / "latest").write_text("step-00000002")
    for name in ("meta.json", "ema.safetensors", "rng-rank1.pt"):
        (ck / name).unlink()
    optim1 = next((ck / "model").glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    optim1.unlink()
    n_model = sum(1 for f in (ck / "model").rglob("*") if f.is_file())
    scripts = sorted(p.name for p in ck.glob("zero_to_*.py"))  # DeepSpeed's conversion scripts
    code, out, _ = inspect(capsys, "checkpoint", ck)
    assert code == 1
    lines = out.splitlines()
    assert lines[:2] == [f"checkpoint {ck} (run {run})", "  step 4, kind dit"]
    assert lines[3:] == [
        "  complete: no: no meta.json (the save did not finish)",
        ", ".join([f"  present: model/ ({n_model} files)", "rng-rank0.pt", *scripts]),
        "  a complete dit checkpoint at world size 2 also needs: meta.json, rng-rank1.pt, ema.safetensors, "
        f"model/{optim1.name}",
        "  resumable: no; a resume would use step-00000002",
        "  other checkpoints: step-00000002 (complete)",
    ]
    code, out, _ = inspect(capsys, "checkpoint", run)  # the run: its latest, and step 4 listed as incomplete
    assert code == 0
    assert out.splitlines()[0] == f"checkpoint {run}/checkpoints/step-00000002 (run {run})"
    assert out.splitlines()[-1] == "  other checkpoints: step-00000004 (incomplete)"


def test_run_is_what_status_prints(run, capsys):
    status = ldit("status", run)
    assert status.returncode == 0, status.stderr
    code, out, _ = inspect(capsys, "run", run)
    age = re.compile(r"\(\d+ s ago\)")  # the two calls may straddle a second
    assert code == 0 and age.sub("(N s ago)", out) == age.sub("(N s ago)", status.stdout)
    lines = out.splitlines()
    assert lines[:2] == [
        f"run {run}",
        "  checkpoints: step-00000004 (latest, complete), step-00000002 (complete)",
    ]
    assert re.match(r"  last logged step 4 \(\d+ s ago\): loss/total ", lines[2]), lines[2]
    assert lines[3:] == [
        "  export: export/latest -> step-00000004",
        "  SLURM jobs: none submitted with --slurm",
    ]
    code, out, _ = inspect(capsys, "run", run, "--json")
    r = json.loads(out)
    assert [c["name"] for c in r["checkpoints"]] == ["step-00000004", "step-00000002"]
    assert r["last_log"]["step"] == 4 and set(r["last_log"]["losses"]) == {
        "loss/total",
        "loss/mse",
        "loss/cos",
    }
    assert r["export"] == "step-00000004" and r["jobs"] is None


def test_verify_fails_a_set_of_no_sample(tmp_path, capsys):
    """Issue #15: `inspect data --verify` passed the 0-shard manifest an all-skipped prep-images wrote."""
    from data_prep.manifest import ClassInfo, Manifest

    Manifest("images", [], [ClassInfo("n0", 0, "n0")]).save(tmp_path)
    code, out, err = inspect(capsys, "data", tmp_path, "--verify", "--no-progress")
    assert code == 1 and err == ""
    assert out.splitlines()[-1] == (
        f"verify: {tmp_path}: the shard set holds 0 samples (0 shards in its manifest): nothing can be read "
        "from it; write it again with `ldit prep-images` from a folder of readable images"
    )
    code, out, _ = inspect(capsys, "data", tmp_path)  # without --verify the summary is shown, exit 0
    assert code == 0 and "  images: 0 samples in 0 shards" in out
