"""The docs as a set: the generated chapters match the code, the README stays a front door, links resolve.

The commands in the docs run in tests/test_readme_commands.py; the recipe lines in docs/training.md are
checked against the presets in tests/test_presets.py.
"""
import re

import pytest

from devtools import docgen
from tests.support import REPO
from twa_scale import knobs
from twa_scale.train.config import parse_train_args
from twa_scale.store.format import RunPaths
from twa_scale.twa.config import parse_twa_args

DOCS = REPO / "docs"


def test_generated_docs_are_current():
    assert not docgen.stale(), f"stale: {docgen.stale()}; regenerate with python -m devtools.docgen"


@pytest.mark.parametrize("parse", [parse_train_args, parse_twa_args])
def test_configuration_documents_every_flag_the_parser_takes(parse, capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]  # every flag the parser takes, once
    flags = set(re.findall(r"(--[a-z][\w-]*)", usage)) - {"--config"}
    doc = (DOCS / "configuration.md").read_text()
    missing = sorted(f for f in flags if f"| `{f}` |" not in doc)
    assert len(flags) > 20 and not missing, f"docs/configuration.md lacks {missing}"


def test_configuration_lists_every_knob_and_only_knobs_reads_the_environment():
    """Every TWA_SCALE_* variable is declared once in knobs.py and listed in docs/configuration.md; no other
    module reads a TWA_* variable itself."""
    doc = (DOCS / "configuration.md").read_text()
    section = doc[doc.index("## Environment variables"):]
    section = section[:section.index("\n## ")]
    listed = set(re.findall(r"^\| `(TWA_SCALE_[A-Z0-9_]+)`", section, re.M))
    source = (REPO / "twa_scale" / "knobs.py").read_text()
    declared = set(knobs.KNOBS) | {n for n in re.findall(r'"(TWA_SCALE_[A-Z0-9_]+)"', source) if not n.endswith("_")}
    assert listed == declared, (f"docs/configuration.md lacks {sorted(declared - listed)}; "
                                f"has undeclared {sorted(listed - declared)}")
    reads = re.compile(r"""(?:environ\.get|getenv|environ\[|env_int|env_float)\(?\s*["']TWA""")
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "twa_scale").rglob("*.py")
                 if p.name != "knobs.py" and reads.search(p.read_text())]
    assert not offenders, f"read TWA_* environment variables outside knobs.py: {offenders}"


def test_storage_format_lists_every_object_of_a_run():
    """Each object name RunPaths builds appears in the listing of docs/storage-format.md (LEASE.json,
    control/STOP.json and twa/probes.json included)."""
    doc = (DOCS / "storage-format.md").read_text()
    listing = doc[doc.index("```\n") + 4:doc.index("\n```", doc.index("```\n"))]
    paths = RunPaths("<run>")
    names = [v for k, v in vars(paths).items() if k not in ("run_id", "root", "snapshots", "epoch_rows")]
    names += [paths.epoch_row(0).replace("000000", "<epoch:06d>"), paths.commit(0).replace("00000000", "<seq:08d>")]
    missing = [n for n in names if f"<url>/{n} " not in listing]
    assert not missing and "<url>/<run>/LEASE.json" in listing, f"the listing lacks {missing}"


def test_ci_runs_the_readme_test_command():
    block = re.search(r"<!-- ci:test-command -->\s*```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)
    assert block, "README.md lost its ci:test-command block"
    assert block.group(1).strip() in (REPO / ".ci" / "run").read_text().splitlines()


def test_readme_is_a_front_door_and_every_link_resolves():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for doc in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)} links to missing {target}"
    linked = set(re.findall(r"\(docs/([\w-]+\.md)\)", readme))
    assert linked == {p.name for p in DOCS.glob("*.md")}, "the README links every chapter of docs/"
