"""Every code block of README.md and docs/*.md runs here, one test per page.

How a page's blocks run:

- Every fenced block names its language. ``python``, ``bash`` and ``yaml`` blocks run; ``text``
  blocks are printed output and do not.
- A page's blocks run in document order in one fresh working directory that holds ``photos/``
  (16 tiny unlabelled PNG images) and ``labelled/train/`` and ``labelled/val/`` (class folders
  ``cats/`` and ``dogs/``); its ``python`` blocks share one
  namespace, as cells of a notebook do, so a later block may use what an earlier one made.
- ``python``: executed. Examples keep their own sizes tiny (a one-block ViT, few prototypes).
- ``yaml``: loaded as a dinokit config (``dinokit.config.load_config``), so every key it names must
  exist and every value must pass validation.
- ``bash``: each command (``#`` comments dropped, ``\\`` continuations joined) that starts with
  ``dinokit`` runs in this process through ``dinokit.cli.main`` and must exit 0. ``dinokit train``
  gets :func:`tiny_overrides` appended (a one-block ViT on 32-px crops, 2 steps on the CPU), so the
  documented command line is parsed, validated and run in seconds. Other commands run in ``bash``,
  with a ``dinokit`` on ``PATH``.
- Directives: an HTML comment on the line right above the fence (invisible on the rendered page):

  ``<!-- doctest: skip: REASON -->``  the block does not run; the reason is required.
  ``<!-- doctest: args: KEY=VALUE ... -->``  more overrides for each ``dinokit train`` of the block,
  after the tiny ones.
  ``<!-- doctest: file: NAME -->``  the block's text is also written to ``NAME`` in the working
  directory before it runs (e.g. a YAML config that a later ``dinokit train --config NAME`` reads).

The tiny overrides read the config's key names at run time from ``dinokit.config.all_keys()``.
``mkdocs build --strict`` (in ``scripts/test.sh``) checks the pages' links and API references.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinokit.cli import main
from dinokit.config import all_keys, load_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNS = ("python", "bash", "yaml")
SHOWN = ("text",)
FENCE = re.compile(r"^(`{3,})(\S*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*doctest:\s*(skip|args|file):\s*(.*?)\s*-->$")
LINK = re.compile(r"\]\(([^)\s]+)\)")


@dataclass
class Block:
    """One fenced code block of a page, with its directives."""

    page: Path
    line: int
    lang: str
    text: str
    skip: str | None = None
    args: list[str] = field(default_factory=list)
    file: str | None = None

    @property
    def where(self) -> str:
        name = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{name}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` in order; a directive applies to the fence right below it."""
    lines = page.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip())
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == fence)
        block = Block(page, start + 1, lang, "\n".join(lines[start + 1:end]) + "\n")
        j = start - 1
        while j >= 0 and lines[j].strip().startswith("<!--"):
            d = DIRECTIVE.match(lines[j].strip())
            assert d, f"{block.where}: unreadable directive {lines[j].strip()!r}"
            kind, value = d.groups()
            if kind == "skip":
                assert value, f"{block.where}: a skipped block needs a reason"
                block.skip = value
            elif kind == "args":
                block.args += shlex.split(value)
            else:
                block.file = value
            j -= 1
        out.append(block)
        i = end + 1
    return out


def _key(*names: str) -> str:
    """The first of ``names`` that the config knows (key names are read from the code at run time)."""
    keys = set(all_keys())
    for name in names:
        if name in keys:
            return name
    raise KeyError(f"none of {names} is a config key")


def tiny_overrides() -> list[str]:
    """Overrides that shrink any ``dinokit train`` run to a few seconds on one CPU core."""
    return [
        f"{_key('backbone.name', 'model.backbone')}=vit_tiny_patch16_224",
        f"{_key('backbone.kwargs', 'model.backbone_kwargs')}="
        "{img_size: 32, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
        f"{_key('backbone.pretrained', 'model.pretrained')}=false",
        f"{_key('dino.n_prototypes', 'model.n_prototypes')}=64",
        f"{_key('ibot.n_prototypes', 'model.n_patch_prototypes')}=64",
        f"{_key('heads.hidden_dim', 'model.head_hidden_dim')}=32",
        f"{_key('heads.bottleneck_dim', 'model.head_bottleneck_dim')}=16",
        f"{_key('crops.global_size', 'data.global_size')}=32",
        f"{_key('crops.local_size', 'data.local_size')}=16",
        f"{_key('crops.n_local', 'data.n_local')}=2",
        "data.channels=3", "data.batch_size=8", "data.num_workers=0",
        "trainer.max_steps=2", "trainer.epochs=1", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.precision=32", "trainer.progress=false", "trainer.log_every_n_steps=1",
        "trainer.knn_every_n_epochs=0",
    ]


def make_images(workdir: Path) -> None:
    """``photos/``: 16 unlabelled 40 x 40 RGB PNGs; ``labelled/{train,val}/{cats,dogs}/``: 8 and 4
    per class."""
    rng = np.random.default_rng(0)
    folders = {workdir / "photos": 16}
    for split, n in (("train", 8), ("val", 4)):
        folders.update({workdir / "labelled" / split / label: n for label in ("cats", "dogs")})
    for folder, n in folders.items():
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def commands(text: str) -> list[str]:
    """The commands of a bash block: continuations joined, blank and comment-only lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", text)
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


def run_bash(block: Block, workdir: Path) -> None:
    for line in commands(block.text):
        argv = shlex.split(line, comments=True)
        if argv[0] == "dinokit":
            argv = argv[1:]
            if argv[:1] == ["train"] and "--help" not in argv:
                # after the command's own overrides, before any option that follows them
                at = max((i + 1 for i, a in enumerate(argv) if "=" in a and not a.startswith("-")),
                         default=len(argv))
                argv[at:at] = [*tiny_overrides(), *block.args]
            try:
                code = main(argv)
            except SystemExit as e:  # --help
                code = e.code or 0
            assert code == 0, f"{block.where}: `{line.strip()}` exited {code}"
        else:
            shim = workdir / ".bin" / "dinokit"
            if not shim.exists():
                shim.parent.mkdir()
                shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dinokit "$@"\n')
                shim.chmod(0o755)
            env = {**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}",
                   "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
            res = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=workdir, env=env,
                                 capture_output=True, text=True, timeout=120)
            assert res.returncode == 0, f"{block.where}: `{line.strip()}` exited {res.returncode}:\n{res.stderr}"


def run_page(page: Path, workdir: Path) -> list[str]:
    """Run every block of ``page`` in ``workdir``; returns the skipped blocks with their reasons."""
    make_images(workdir)
    namespace: dict = {"__name__": "__main__"}
    skipped = []
    for block in blocks(page):
        assert block.lang in RUNS + SHOWN, (
            f"{block.where}: a fenced block names its language, one of {RUNS + SHOWN} (got {block.lang!r})")
        if block.file:
            (workdir / block.file).write_text(block.text)
        if block.lang in SHOWN:
            continue
        if block.skip:
            skipped.append(f"{block.where}: {block.skip}")
            continue
        if block.lang == "python":
            exec(compile(block.text, block.where, "exec"), namespace)
        elif block.lang == "yaml":
            path = workdir / (block.file or ".doctest.yaml")
            path.write_text(block.text)
            load_config(path)
        else:
            run_bash(block, workdir)
    return skipped


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_code_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for reason in run_page(page, tmp_path):
        print("not run:", reason)


def test_directives_and_commands_are_read(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- doctest: skip: needs a cluster -->\n```bash\nsbatch x\n```\n\n"
                    "<!-- doctest: file: a.yaml -->\n<!-- doctest: args: trainer.max_steps=3 -->\n"
                    "```bash\ndinokit train --config a.yaml \\\n    data.path=photos  # comment\n\n# only a comment\n```\n")
    a, b = blocks(page)
    assert (a.skip, a.args, a.file) == ("needs a cluster", [], None)
    assert (b.skip, b.args, b.file, b.line) == (None, ["trainer.max_steps=3"], "a.yaml", 8)
    assert commands(b.text) == ["dinokit train --config a.yaml data.path=photos  # comment"]


def test_readme_links_point_at_files():
    """README.md is not part of the mkdocs build, so its relative links are checked here."""
    text = (ROOT / "README.md").read_text()
    for target in LINK.findall(text):
        if "://" in target or target.startswith("#") or target.startswith("mailto:"):
            continue
        assert (ROOT / target.split("#")[0]).exists(), f"README.md links to a missing file: {target}"


def test_config_keys_named_in_the_prose_exist():
    """A key named in the text (`optim.lr`, `trainer.resume=auto`) must be one the config accepts."""
    keys = set(all_keys())
    sections = {k.split(".")[0] for k in keys}
    wrong = []
    for page in PAGES:
        for section, name in re.findall(r"`([a-z_]+)\.([a-z_0-9]+)(?:=[^`]*)?`", page.read_text()):
            if section in sections and f"{section}.{name}" not in keys:
                wrong.append(f"{page.relative_to(ROOT)}: {section}.{name}")
    assert not wrong, "unknown config keys named in the docs:\n" + "\n".join(wrong)


def test_readme_stays_a_short_guide():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 210


def test_configuration_page_lists_exactly_the_config_keys():
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "docs" / "hooks" / "config_table.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    source = (ROOT / "docs" / "configuration.md").read_text()
    assert hook.MARKER in source
    page = hook.on_page_markdown(source)
    listed = re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \|", page, flags=re.M)
    assert sorted(listed) == sorted(all_keys())
    assert len(listed) == len(set(listed))
