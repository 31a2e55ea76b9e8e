"""The docs cannot rot: every ```bash command in docs/ runs here, in order, on CPU-sized data,
and every ```gpu command is checked for existing flags and files."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO

DOCS = REPO / "docs"
# The order in which the pages build on each other's outputs.
ORDER = ["quickstart.md", "data.md", "shards.md", "training.md", "kfold.md", "report.md", "pseudo-labelling.md", "export.md", "monitoring.md",
         "performance.md", "troubleshooting.md", "design.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# What some commands must print: a command that ran but printed nonsense fails the test.
EXPECT = {
    "maskdist layout": "people",
    "maskdist shards inspect shards/demo-set --json": '"train_samples"',
    "maskdist shards inspect": "training samples per fold and class",
    "maskdist shards verify": "ok",
    "maskdist oof runs/kfold-doc --json": '"oof"',
    "maskdist oof": "macro F1",
    "maskdist score": "macro F1",
    "maskdist kfold --shards shards/synth --out runs/kfold-plan": "fold 0: ACCELERATE_USE_CPU=1",  # --dry-run
    "maskdist kfold": "out-of-fold macro F1",
    "maskdist pseudo-label": "pseudo-labelled",
    "maskdist demo": "ensemble macro F1 on the hidden eval answers",
    "maskdist bench loader": "ratio shard stream / webdataset pipeline",
    "maskdist bench epoch": "in memory (ceiling)",
    "maskdist bench predict": "ratio predict / bare",
    "maskdist bench memory": "worker",
    "maskdist bench crop": "found bare",
    "maskdist bench compare": "no detectable difference",
    "maskdist export": "wrote",
    "maskdist report": "wrote",
    "maskdist bench onnx": "ratio onnxruntime / PyTorch",
}


def blocks(page: Path, language: str) -> list[str]:
    """Command lines of the page's fenced blocks of one language."""
    lines = []
    for lang, body in FENCE.findall(page.read_text()):
        if lang == language:
            lines += [line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return lines


def runnable(page: Path) -> list[tuple[str, str]]:
    """In page order: each ```bash command line, and each ```python block whole."""
    out = []
    for lang, body in FENCE.findall(page.read_text()):
        if lang == "bash":
            out += [("bash", line) for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        elif lang == "python":
            out.append(("python", body))
    return out


def test_every_doc_page_is_listed_in_order_and_in_the_index():
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert pages == set(ORDER)
    index = (DOCS / "README.md").read_text()
    for page in ORDER:
        assert f"({page})" in index, page


# The pages run as two chains, one per core. The second starts from the synthetic data and
# shards the quickstart makes (the same commands, run again in its own folder).
CHAINS = {
    "guide": ["quickstart.md", "data.md", "shards.md", "training.md", "monitoring.md", "troubleshooting.md", "design.md"],
    "ensemble": ["kfold.md", "report.md", "pseudo-labelling.md", "export.md", "performance.md"],
}
SETUP = {"guide": (), "ensemble": ("maskdist synth data/synth ", "maskdist shards build data/synth/train ")}


def test_the_chains_cover_every_page_in_order():
    covered = [page for pages in CHAINS.values() for page in pages]
    assert sorted(covered) == sorted(ORDER) and len(covered) == len(set(covered))
    for pages in CHAINS.values():
        assert pages == sorted(pages, key=ORDER.index)


@pytest.mark.duration(300)
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_bash_commands_run(chain, tmp_path):
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env.update(PATH=bin_dir + os.pathsep + env.get("PATH", ""), HF_HOME=str(tmp_path / "hf"), CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    (tmp_path / "launch").symlink_to(REPO / "launch")  # commands name launch/ files relative to the repo
    setup = [("quickstart.md", ("bash", code)) for _lang, code in runnable(DOCS / "quickstart.md")
             if any(code.startswith(prefix) for prefix in SETUP[chain])]
    assert len(setup) == len(SETUP[chain])
    steps = setup + [(page, item) for page in CHAINS[chain] for item in runnable(DOCS / page)]
    ran, printed = 0, set()
    for page, (language, code) in steps:
        argv = ["bash", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{page}: {code}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        for prefix, needle in EXPECT.items():
            if code.startswith(prefix):
                assert needle in result.stdout, f"{page}: {code} did not print {needle!r}:\n{result.stdout[-2000:]}"
                break
        if language == "python" and "webdataset" in code:  # the recipe reads exactly the selection
            read, counted = (int(n) for n in re.findall(r"read (\d+) samples.*counts (\d+)", result.stdout)[0])
            assert read == counted > 0, result.stdout
        printed |= {_shape(line) for line in (result.stdout + result.stderr).splitlines() if line.startswith("epoch ")}
        ran += 1
    if chain == "guide":
        assert ran >= 20
        # the epoch lines the pages show have the shape of the lines the runs print
        shown = {_shape(m) for page in ORDER for m in EPOCH_LINE.findall((DOCS / page).read_text())}
        assert shown and shown <= printed, (shown - printed, printed)
        # the quickstart's submission is a real one: info.csv order, classes 0..17
        info = pd.read_csv(tmp_path / "data/synth/eval/info.csv", dtype=str)
        sub = pd.read_csv(tmp_path / "runs/quick/submission.csv", dtype=str)
        assert sub["ImageID"].tolist() == info["ImageID"].tolist() and sub["ans"].astype(int).between(0, 17).all()
    else:
        assert ran >= 10
        assert (tmp_path / "shards/synth-extra/train/extra").is_dir()


EPOCH_LINE = re.compile(r"^\s*`?(epoch \d+: loss [^`\n]*)", re.M)


def _shape(line: str) -> str:
    """An epoch line with its figures blanked, and its optional ending (*best*) dropped."""
    return re.sub(r"\d+(\.\d+)?", "N", line.split(" *best*")[0].strip())


def test_gpu_commands_use_existing_flags_and_files():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    checked = 0
    for page in ORDER:
        for command in blocks(DOCS / page, "gpu"):
            words = shlex.split(command)
            while re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # an environment prefix (VAR=value command)
                words = words[1:]
            if words[0].startswith("launch/"):
                assert os.access(REPO / words[0], os.X_OK), f"{page}: {words[0]} is not an executable script"
                syntax = subprocess.run(["bash", "-n", str(REPO / words[0])], capture_output=True, text=True)
                assert syntax.returncode == 0, f"{page}: {words[0]}: {syntax.stderr}"
                if words[0] != "launch/kfold.sh":  # run by its own test (gpu_check.sh) or by SLURM
                    checked += 1
                    continue
                words = ["maskdist", "kfold", *words[3:]]  # the script passes the rest to maskdist kfold
            if words[:2] == ["accelerate", "launch"]:
                config = words[words.index("--config_file") + 1]
                assert (REPO / config).is_file(), f"{page}: {config} does not exist"
                words = ["maskdist", *words[words.index("maskdist") + 1:]]
            assert words[0] == "maskdist", f"{page}: unexpected command {command}"
            if "--config" in words:
                preset = words[words.index("--config") + 1]
                assert (REPO / "maskdist" / "presets" / f"{preset}.yaml").is_file() or (REPO / preset).is_file(), preset
            # click validates every option name before --help (eager) ends the command
            result = subprocess.run([sys.executable, "-m", *words, "--help"], env=env, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, f"{page}: {command}\n{result.stderr[-1500:]}"
            checked += 1
    assert checked >= 8


def test_every_launch_script_parses():
    scripts = sorted(p for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))
    assert {p.name for p in scripts} >= {"kfold.sh", "gpu_check.sh", "slurm_multinode.sbatch"}
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
    sbatch = (REPO / "launch" / "slurm_multinode.sbatch").read_text()
    # preemption: an early signal to the script, requeue, and every launch resuming
    assert "#SBATCH --signal=B:USR1@" in sbatch and "#SBATCH --requeue" in sbatch and "--resume" in sbatch


def test_no_page_holds_a_placeholder():
    for page in [*DOCS.glob("*.md"), REPO / "README.md", REPO / "shards" / "README.md"]:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            assert not re.fullmatch(r"[A-Z][A-Z_]{5,}", line.strip()), f"{page.name}:{number}: {line}"


DEMO_FIGURES = [  # how the pages describe a demo run: (pattern, the names of its numbers)
    (re.compile(r"(\d+) folds x (\d+) epochs of (\d+) steps, (\d+) process(?:es)? per fold"), ("folds", "epochs", "steps", "processes")),
    (re.compile(r"(\d+) epochs of (\d+) steps, (\d+) CPU process(?:es)? per fold"), ("epochs", "steps", "processes")),
    (re.compile(r"(\d+) training people \(([\d,]+) images\) and (\d+) eval people \(([\d,]+) images\)"),
     ("people", "images", "eval_people", "eval_images")),
]


def test_the_demo_figures_the_docs_give_are_the_demos():
    """A page that says what the demo runs (folds, epochs, steps per epoch, processes per fold
    on two cores, people and images) says what today's demo prints, computed from its own
    defaults: a change of the demo that leaves these figures behind fails here. Figures of an
    earlier demo must say so ("when it ran ..."), which these patterns do not match."""
    import math

    from maskdist import config as config_mod, demo
    from maskdist.data.synth import IMAGES_PER_PERSON

    options, preset = demo.DemoOptions(), config_mod.load(demo.DemoOptions().config, validate=False)
    processes = demo.demo_processes(cores=2)[0]
    images = options.people * IMAGES_PER_PERSON
    expected = {"folds": options.folds, "epochs": preset.epochs, "processes": processes, "people": options.people,
                "images": images, "eval_people": options.eval_people, "eval_images": options.eval_people * IMAGES_PER_PERSON,
                # each fold trains on the other folds' people, in batches of batch_size on every process
                "steps": math.ceil(images * (options.folds - 1) / options.folds / (preset.batch_size * processes))}
    found = 0
    for page in [*DOCS.glob("*.md"), REPO / "README.md"]:
        text = " ".join(page.read_text().split())  # as one line: figures wrap anywhere
        for pattern, names in DEMO_FIGURES:
            for match in pattern.finditer(text):
                said = dict(zip(names, (int(g.replace(",", "")) for g in match.groups())))
                assert said == {k: expected[k] for k in names}, f"{page.name}: {match.group(0)!r}, the demo runs {expected}"
                found += 1
    assert found >= 3  # the quickstart, monitoring and performance pages describe it
